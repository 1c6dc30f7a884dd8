//! The JSON error answer every service gives: a status code and a body naming the problem.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use telemetry_core::{ParseError, ValidationError};

/// An HTTP error with a body a client can act on:
/// `{"error": code, "message": text, "field": name?, "index": n?}`.
#[derive(Debug, Clone, Serialize)]
pub struct ApiError {
    #[serde(skip)]
    pub status: StatusCode,
    /// Machine-readable error code, e.g. `invalid_event`.
    pub error: &'static str,
    /// Human-readable explanation, lowercase, no trailing period.
    pub message: String,
    /// The JSON field at fault, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<&'static str>,
    /// The batch item at fault, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    /// Seconds a client should wait before retrying (sent as `Retry-After`).
    #[serde(skip)]
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, error: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            error,
            message: message.into(),
            field: None,
            index: None,
            retry_after: None,
        }
    }

    pub fn bad_request(error: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, error, message)
    }

    /// A 5xx that says little; the caller logs the cause.
    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error, try again",
        )
    }

    /// 503 with `Retry-After`.
    pub fn unavailable(message: impl Into<String>, retry_after_secs: u64) -> Self {
        let mut e = Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message);
        e.retry_after = Some(retry_after_secs);
        e
    }

    pub fn invalid(error: &ValidationError, index: Option<usize>) -> Self {
        let mut e = Self::bad_request("invalid_event", error.to_string());
        e.field = Some(error.field);
        e.index = index;
        e
    }

    /// The JSON body as a value (for per-item results).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }
}

impl From<ParseError> for ApiError {
    fn from(err: ParseError) -> Self {
        match err {
            ParseError::Json(e) => ApiError::bad_request("malformed_json", format!("malformed JSON: {e}")),
            ParseError::NotArray => {
                ApiError::bad_request("invalid_body", "body must be a JSON array of events")
            }
            ParseError::Invalid(e) => ApiError::invalid(&e, None),
            ParseError::Item { index, error } => {
                let mut e = ApiError::invalid(&error, Some(index));
                e.message = format!("item {index}: {error}");
                e
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(&self)).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}
