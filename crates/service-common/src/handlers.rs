//! Handlers every service mounts the same way: Prometheus text, and JSON answers for unknown
//! routes and methods.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::ApiError;

/// `GET /metrics`: the process's metrics in Prometheus text format (the recorder's, then the
/// request metrics each thread keeps).
pub async fn metrics() -> Response {
    let mut text = crate::metrics_handle().render();
    crate::metrics::render_request_metrics(&mut text);
    (
        [(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        text,
    )
        .into_response()
}

/// Fallback for unknown routes.
pub async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

/// Fallback for a known route with a method it does not take.
pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this route",
    )
}
