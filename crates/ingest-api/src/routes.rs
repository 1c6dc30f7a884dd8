//! HTTP routes of ingest-api. Bodies are read by hand so every bad input answers JSON.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use service_common::{require_json, ApiError};
use sha2::{Digest, Sha256};
use telemetry_core::{parse_batch, Event};

use crate::store::{IdempotencyKey, Store, StoreError};
use crate::Settings;

/// Header carrying a batch's idempotency key.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// Header set on an answer replayed from an idempotency key.
pub const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";
const MAX_KEY_LEN: usize = 255;

/// What every handler can reach.
#[derive(Debug, Clone)]
pub struct AppState {
    pub store: Store,
    pub settings: Arc<Settings>,
}

const REQUEST_METRICS: service_common::RequestMetrics = service_common::RequestMetrics {
    requests: "ingest_api_http_requests_total",
    duration: "ingest_api_http_request_duration_seconds",
};

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/event", post(post_event))
        .route("/events/batch", post(post_batch))
        .route("/events", get(get_events))
        .route("/healthz", get(healthz))
        .route("/metrics", get(service_common::handlers::metrics))
        .fallback(service_common::handlers::not_found)
        .method_not_allowed_fallback(service_common::handlers::method_not_allowed)
        // Inside the request metrics, so a request that timed out is counted as a 408.
        .layer(state.settings.http.timeout_layer())
        .layer(service_common::TrackRequests(REQUEST_METRICS))
        .with_state(state)
}

fn store_error(err: StoreError) -> ApiError {
    match err {
        StoreError::KeyReused => {
            let mut e = ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                "idempotency key was already used with a different body",
            );
            e.field = Some("Idempotency-Key");
            e
        }
        StoreError::TooLarge { .. } => {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "batch_too_large", err.to_string())
        }
        other => {
            tracing::error!(error = %other, "store request failed");
            ApiError::internal()
        }
    }
}

async fn post_event(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    require_json(&headers, false)?;
    let bytes = state.settings.http.read_body(body).await?;
    let event = Event::from_json(&bytes)?;
    let stored = state.store.insert_one(event).await.map_err(store_error)?;
    Ok((StatusCode::CREATED, Json(stored)).into_response())
}

fn idempotency_key(headers: &HeaderMap, body: &[u8]) -> Result<Option<IdempotencyKey>, ApiError> {
    let Some(raw) = headers.get(IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    let key = raw
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= MAX_KEY_LEN && k.bytes().all(|b| b.is_ascii_graphic()))
        .ok_or_else(|| {
            let mut e = ApiError::bad_request(
                "invalid_idempotency_key",
                "Idempotency-Key must be 1 to 255 visible ASCII characters",
            );
            e.field = Some("Idempotency-Key");
            e
        })?;
    Ok(Some(IdempotencyKey {
        key: key.to_owned(),
        body_hash: Sha256::digest(body).into(),
    }))
}

async fn post_batch(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    require_json(&headers, false)?;
    let bytes = state.settings.http.read_body(body).await?;
    let key = idempotency_key(&headers, &bytes)?;
    let events = parse_batch(&bytes)?;
    // The length limit is checked by the store after the key: a replay is answered at any length.
    let receipt = state
        .store
        .insert_batch(events, key, state.settings.http.max_batch_len)
        .await
        .map_err(store_error)?;
    let status = StatusCode::from_u16(receipt.status).unwrap_or(StatusCode::CREATED);
    let mut response = (
        status,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        receipt.body,
    )
        .into_response();
    if receipt.replayed {
        response
            .headers_mut()
            .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    }
    Ok(response)
}

/// Where a read of `GET /events` starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum From {
    /// `page=N` (1-based), the default.
    Page(u64),
    /// `after=ID`: the rows with ids above ID (the keyset form).
    After(u64),
}

/// Parses `page` or `after`, and `size`; anything else in the query is ignored.
fn page_params(query: Option<&str>, settings: &Settings) -> Result<(From, u64), ApiError> {
    let (mut page, mut after) = (None, None);
    let mut size = settings.default_page_size;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let (field, min, max, rule) = match name {
            "page" => ("page", 1, u64::MAX / 2, "page must be an integer >= 1".to_owned()),
            "after" => (
                "after",
                0,
                i64::MAX as u64,
                "after must be an event id (an integer >= 0)".to_owned(),
            ),
            "size" => (
                "size",
                1,
                settings.max_page_size,
                format!("size must be an integer from 1 to {}", settings.max_page_size),
            ),
            _ => continue,
        };
        let value = value
            .parse::<u64>()
            .ok()
            .filter(|v| (min..=max).contains(v))
            .ok_or_else(|| {
                let mut e = ApiError::bad_request("invalid_query", rule);
                e.field = Some(field);
                e
            })?;
        match field {
            "page" => page = Some(value),
            "after" => after = Some(value),
            _ => size = value,
        }
    }
    let from = match (page, after) {
        (Some(_), Some(_)) => {
            let mut e = ApiError::bad_request("invalid_query", "give page or after, not both");
            e.field = Some("after");
            return Err(e);
        }
        (_, Some(a)) => From::After(a),
        (p, None) => From::Page(p.unwrap_or(1)),
    };
    Ok((from, size))
}

async fn get_events(State(state): State<AppState>, RawQuery(query): RawQuery) -> Result<Response, ApiError> {
    let (from, size) = page_params(query.as_deref(), &state.settings)?;
    let body = match from {
        From::Page(page) => {
            let p = state.store.page(page, size).await.map_err(store_error)?;
            let total_pages = p.total.div_ceil(size);
            json!({
                "page": page,
                "size": size,
                "total": p.total,
                "totalPages": total_pages,
                "hasMore": page < total_pages,
                "next": p.next,
                "data": p.data,
            })
        }
        From::After(after) => {
            let p = state.store.after(after as i64, size).await.map_err(store_error)?;
            json!({
                "after": after,
                "size": size,
                "total": p.total,
                "hasMore": p.next.is_some(),
                "next": p.next,
                "data": p.data,
            })
        }
    };
    Ok(Json(body).into_response())
}

async fn healthz(State(state): State<AppState>) -> Response {
    if state.store.ping().await {
        Json(json!({"status": "ok"})).into_response()
    } else {
        ApiError::unavailable("database is not answering", 1).into_response()
    }
}
