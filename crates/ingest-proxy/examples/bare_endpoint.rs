//! The HTTP ceiling for scripts/bench-proxy: the same server stack answering `POST /event`
//! after parsing and validating the JSON, with no broker behind it.

use axum::body::Bytes;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use serde_json::json;
use telemetry_core::Event;

/// The proxy's allocator, so the comparison is like with like.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(4001);
    let app = Router::new().route(
        "/event",
        post(|body: Bytes| async move {
            match Event::from_json(&body) {
                Ok(_) => (StatusCode::ACCEPTED, Json(json!({"status": "accepted"}))),
                Err(e) => (StatusCode::BAD_REQUEST, Json(json!({"error": e.to_string()}))),
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind");
    axum::serve(listener, app).await.expect("serve");
}
