//! HTTP routes of ingest-proxy. `POST /event` keeps ingest-api's contract (so a client only
//! changes its URL) but answers 202 once the broker has the event; `POST /events/batch` takes a
//! JSON array or NDJSON and answers a result per item.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use service_common::{require_json, ApiError, BodyKind};
use telemetry_core::{Event, ParseError};

use crate::metrics::Outcome;
use crate::publisher::{Ack, PublishError, Publisher};
use crate::Settings;

/// What every handler can reach, behind one `Arc` (the router clones it per request).
#[derive(Debug, Clone)]
pub struct AppState(Arc<Shared>);

#[derive(Debug)]
pub struct Shared {
    pub publisher: Arc<Publisher>,
    pub settings: Arc<Settings>,
    /// Set by the readiness checker: the broker answers and the topic exists.
    pub ready: Arc<AtomicBool>,
}

impl AppState {
    pub fn new(publisher: Arc<Publisher>, settings: Arc<Settings>, ready: Arc<AtomicBool>) -> AppState {
        AppState(Arc::new(Shared {
            publisher,
            settings,
            ready,
        }))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

const REQUEST_METRICS: service_common::RequestMetrics = service_common::RequestMetrics {
    requests: "ingest_proxy_http_requests_total",
    duration: "ingest_proxy_http_request_duration_seconds",
};

/// The routes. Request metrics are a plain layer and the token check a call at the top of each
/// ingest handler: as `from_fn` middlewares they cost about a third of the proxy's CPU per
/// single-event request at 1024 connections (scripts/bench-proxy). The ingest routes get a
/// request timer only when `REQUEST_TIMEOUT_MS` could end them sooner than their own deadlines
/// do ([`Settings::ingest_ends_in_time`]).
pub fn router(state: AppState) -> Router {
    let timeout = state.settings.http.timeout_layer();
    let mut ingest = Router::new()
        .route("/event", post(post_event))
        .route("/events/batch", post(post_batch));
    if !state.settings.ingest_ends_in_time() {
        ingest = ingest.layer(timeout);
    }
    let admin = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .layer(timeout);
    ingest
        .merge(admin)
        .fallback(service_common::handlers::not_found)
        .method_not_allowed_fallback(service_common::handlers::method_not_allowed)
        .layer(service_common::TrackRequests(REQUEST_METRICS))
        .with_state(state)
}

/// With INGEST_TOKEN set, only requests with `Authorization: Bearer <token>` get through.
fn require_token(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    if let Some(token) = &state.settings.ingest_token {
        let given = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !constant_time_eq(given.as_bytes(), token.as_bytes()) {
            let mut e = ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "a valid bearer token is required",
            );
            e.field = Some("authorization");
            return Err(e);
        }
    }
    Ok(())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl AppState {
    /// The event, unless its ts is more than `MAX_FUTURE_SKEW_MS` ahead of this clock.
    fn not_ahead(&self, event: Event, index: Option<usize>) -> Result<Event, ApiError> {
        self.not_ahead_at(event, index, wall_clock_ms())
    }

    fn not_ahead_at(&self, event: Event, index: Option<usize>, now_ms: i64) -> Result<Event, ApiError> {
        match event.check_not_ahead(now_ms, self.settings.max_future_skew_ms) {
            Ok(()) => Ok(event),
            Err(e) => Err(ApiError::invalid(&e, index)),
        }
    }
}

fn wall_clock_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn unavailable(err: &PublishError, settings: &Settings) -> ApiError {
    ApiError::unavailable(err.to_string(), settings.retry_after_secs)
}

async fn post_event(
    State(state): State<AppState>,
    req: axum::extract::Request,
) -> Result<Response, ApiError> {
    // The request itself rather than a `HeaderMap` extractor, which would copy every header.
    let (parts, body) = req.into_parts();
    require_token(&state, &parts.headers)?;
    require_json(&parts.headers, false)?;
    let bytes = state.settings.http.read_body(body).await?;
    let event = Event::from_json(&bytes)
        .map_err(ApiError::from)
        .and_then(|e| state.not_ahead(e, None))
        .inspect_err(|_| crate::metrics::events(Outcome::Invalid, 1))?;
    match state.publisher.publish_one(&event).await {
        Ok(ack) => {
            crate::metrics::events(Outcome::Accepted, 1);
            let body = format!(
                r#"{{"status":"accepted","partition":{},"offset":{}}}"#,
                ack.partition, ack.offset
            );
            let mut response = Response::new(Body::from(body));
            *response.status_mut() = StatusCode::ACCEPTED;
            response
                .headers_mut()
                .insert(axum::http::header::CONTENT_TYPE, JSON_CONTENT_TYPE);
            Ok(response)
        }
        Err(e) => {
            crate::metrics::events(Outcome::Rejected, 1);
            Err(unavailable(&e, &state.settings))
        }
    }
}

const JSON_CONTENT_TYPE: HeaderValue = HeaderValue::from_static("application/json");

fn accepted_json(ack: &Ack) -> Value {
    json!({"status": "accepted", "partition": ack.partition, "offset": ack.offset})
}

/// Splits a batch body into per-item parse results.
fn parse_items(bytes: &[u8], kind: BodyKind) -> Result<Vec<Result<Event, ApiError>>, ApiError> {
    match kind {
        BodyKind::Json => {
            if let Ok(events) = serde_json::from_slice::<Vec<Event>>(bytes) {
                if events.iter().all(|e| e.validate().is_ok()) {
                    return Ok(events.into_iter().map(Ok).collect());
                }
            }
            let items: Vec<Value> = match serde_json::from_slice(bytes) {
                Ok(Value::Array(items)) => items,
                Ok(_) => return Err(ParseError::NotArray.into()),
                Err(e) => return Err(ParseError::Json(e).into()),
            };
            Ok(items
                .iter()
                .enumerate()
                .map(|(index, item)| Event::from_value(item).map_err(|e| ApiError::invalid(&e, Some(index))))
                .collect())
        }
        BodyKind::Ndjson => Ok(bytes
            .split(|b| *b == b'\n')
            .filter(|line| !line.iter().all(u8::is_ascii_whitespace))
            .enumerate()
            .map(|(index, line)| {
                Event::from_json(line).map_err(|e| {
                    let mut err = ApiError::from(e);
                    err.index = Some(index);
                    err
                })
            })
            .collect()),
    }
}

async fn post_batch(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    require_token(&state, &headers)?;
    let kind = require_json(&headers, true)?;
    let bytes = state.settings.http.read_body(body).await?;
    let now = wall_clock_ms();
    let items: Vec<Result<Event, ApiError>> = parse_items(&bytes, kind)?
        .into_iter()
        .enumerate()
        .map(|(index, item)| item.and_then(|e| state.not_ahead_at(e, Some(index), now)))
        .collect();
    if items.len() > state.settings.http.max_batch_len {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "batch_too_large",
            format!(
                "batch has {} events, the limit is {}",
                items.len(),
                state.settings.http.max_batch_len
            ),
        ));
    }
    let valid: Vec<Event> = items.iter().filter_map(|r| r.as_ref().ok().cloned()).collect();
    let mut outcomes = state.publisher.publish(&valid).await.into_iter();

    let (mut accepted, mut invalid, mut rejected) = (0usize, 0usize, 0usize);
    let mut last_error: Option<PublishError> = None;
    let results: Vec<Value> = items
        .iter()
        .map(|item| match item {
            Err(e) => {
                invalid += 1;
                let mut v = e.to_json();
                v["status"] = json!("invalid");
                v
            }
            Ok(_) => match outcomes.next().expect("one outcome per valid event") {
                Ok(ack) => {
                    accepted += 1;
                    accepted_json(&ack)
                }
                Err(e) => {
                    rejected += 1;
                    let v = json!({"status": "unavailable", "message": e.to_string()});
                    last_error = Some(e);
                    v
                }
            },
        })
        .collect();
    crate::metrics::events(Outcome::Accepted, accepted);
    crate::metrics::events(Outcome::Invalid, invalid);
    crate::metrics::events(Outcome::Rejected, rejected);

    let status = if accepted == items.len() {
        StatusCode::ACCEPTED
    } else if accepted == 0 && rejected > 0 {
        StatusCode::SERVICE_UNAVAILABLE
    } else if accepted == 0 {
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::MULTI_STATUS
    };
    let body = json!({"accepted": accepted, "invalid": invalid, "unavailable": rejected, "results": results});
    let mut response = (status, Json(body)).into_response();
    if last_error.is_some() {
        response.headers_mut().insert(
            axum::http::header::RETRY_AFTER,
            state.settings.retry_after_secs.into(),
        );
    }
    Ok(response)
}

/// `GET /metrics`, with the in-flight gauge read now.
async fn metrics(State(state): State<AppState>) -> Response {
    crate::metrics::in_flight(state.publisher.in_flight());
    service_common::handlers::metrics().await
}

async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn readyz(State(state): State<AppState>) -> Response {
    if state.ready.load(Ordering::Relaxed) {
        Json(json!({"status": "ready"})).into_response()
    } else {
        ApiError::unavailable(
            "broker is unreachable or the topic is missing",
            state.settings.retry_after_secs,
        )
        .into_response()
    }
}
