//! Reading request bodies with a size limit and a content-type check, answering JSON errors
//! (axum's own extractors answer in plain text).

use axum::body::Body;
use axum::http::{header, HeaderMap, StatusCode};
use bytes::Bytes;
use http_body_util::LengthLimitError;
use std::future::Future;
use std::task::Poll;
use std::time::Duration;

use crate::ApiError;

/// What a body claims to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// `application/json` (or any `+json` type).
    Json,
    /// `application/x-ndjson` or `application/jsonl`: one JSON document a line.
    Ndjson,
}

/// Accepts JSON (and NDJSON when `ndjson_ok`); anything else is 415.
pub fn require_json(headers: &HeaderMap, ndjson_ok: bool) -> Result<BodyKind, ApiError> {
    let raw = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    // Compared without case and without a lowercased copy (this runs for every request).
    let mime = raw.split(';').next().unwrap_or("").trim();
    let is = |want: &str| mime.eq_ignore_ascii_case(want);
    let has = |at: usize, part: &str| {
        mime.get(at..at + part.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(part))
    };
    if is("application/json")
        || (mime.len() > "application/+json".len()
            && has(0, "application/")
            && has(mime.len() - "+json".len(), "+json"))
    {
        return Ok(BodyKind::Json);
    }
    if ndjson_ok && (is("application/x-ndjson") || is("application/ndjson") || is("application/jsonl")) {
        return Ok(BodyKind::Ndjson);
    }
    let expected = if ndjson_ok {
        "application/json or application/x-ndjson"
    } else {
        "application/json"
    };
    let mut e = ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        format!("content-type must be {expected}"),
    );
    e.field = Some("content-type");
    Err(e)
}

/// Reads the whole body, refusing more than `limit` bytes with 413, a body not complete within
/// `timeout` with 408 (a slow client holds no resources for long) and an empty body with 400.
pub async fn read_body(body: Body, limit: usize, timeout: Duration) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("request body exceeds {limit} bytes"),
        )
    };
    // A declared Content-Length over the limit is refused before reading anything.
    if http_body::Body::size_hint(&body).lower() > limit as u64 {
        return Err(too_large());
    }
    let mut read = std::pin::pin!(axum::body::to_bytes(body, limit));
    // A small body has usually arrived with the headers: then it is read without a timer (one
    // per request costs more than the read).
    let first = std::future::poll_fn(|cx| Poll::Ready(read.as_mut().poll(cx))).await;
    let read = match first {
        Poll::Ready(read) => read,
        Poll::Pending => tokio::time::timeout(timeout, read).await.map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                format!("request body not received within {} ms", timeout.as_millis()),
            )
        })?,
    };
    let bytes = read.map_err(|err| {
        // to_bytes reports both "too large" and transport errors; tell them apart.
        if err.into_inner().downcast_ref::<LengthLimitError>().is_some() {
            too_large()
        } else {
            ApiError::bad_request("body_read_failed", "could not read request body")
        }
    })?;
    if bytes.is_empty() {
        return Err(ApiError::bad_request("empty_body", "request body is empty"));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(content_type: &str, ndjson_ok: bool) -> Option<BodyKind> {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            content_type.parse().expect("a header value"),
        );
        require_json(&headers, ndjson_ok).ok()
    }

    #[test]
    fn json_types_are_told_apart_without_regard_to_case() {
        for ct in [
            "application/json",
            "Application/JSON; charset=utf-8",
            " application/json ",
            "application/vnd.api+json",
            "APPLICATION/PROBLEM+JSON",
        ] {
            assert_eq!(kind(ct, false), Some(BodyKind::Json), "{ct}");
        }
        for ct in ["application/x-ndjson", "Application/NDJSON", "application/jsonl"] {
            assert_eq!(kind(ct, true), Some(BodyKind::Ndjson), "{ct}");
            assert_eq!(kind(ct, false), None, "{ct} where NDJSON is not taken");
        }
        for ct in [
            "text/json",
            "application/+json",
            "application/jsonx",
            "text/plain",
            "application/xml+json5",
            "",
        ] {
            assert_eq!(kind(ct, true), None, "{ct}");
        }
    }
}
