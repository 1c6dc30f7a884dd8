//! The admin port (inside the network only): /metrics, /healthz, /readyz.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::sink::Blocked;

/// What `/readyz` reports: ready once the group assigned this member (even nothing), and no
/// partition is stopped (the sink refusing its batches, or its topic log gone backwards).
#[derive(Debug, Default)]
pub struct Health {
    pub assigned: AtomicBool,
    pub blocked: Blocked,
}

pub(crate) fn router(health: Arc<Health>) -> Router {
    Router::new()
        .route("/metrics", get(service_common::handlers::metrics))
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route(
            "/readyz",
            get(move || {
                let health = Arc::clone(&health);
                async move {
                    let blocked = health.blocked.snapshot();
                    if !health.assigned.load(Ordering::SeqCst) {
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            Json(json!({"status": "waiting for partitions"})),
                        )
                    } else if !blocked.is_empty() {
                        let partitions: serde_json::Map<String, serde_json::Value> = blocked
                            .into_iter()
                            .map(|(p, answer)| (p.to_string(), json!(answer)))
                            .collect();
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            Json(json!({"status": "partitions stopped", "blocked": partitions})),
                        )
                    } else {
                        (StatusCode::OK, Json(json!({"status": "ready"})))
                    }
                }
            }),
        )
}
