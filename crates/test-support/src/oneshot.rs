//! Calling a service's router without a socket (`tower::ServiceExt::oneshot`), for the answers
//! a real connection adds nothing to.

use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use axum::Router;
use bytes::Bytes;
use serde_json::Value;
use tower::ServiceExt;

/// An answer of the router, its body read whole.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }

    /// The JSON body, once the status is `status` and the body says it is JSON.
    pub fn json_with(&self, status: StatusCode) -> Value {
        assert_eq!(self.status, status, "unexpected status, body {:?}", self.body);
        assert!(
            self.headers["content-type"]
                .to_str()
                .expect("content-type is text")
                .starts_with("application/json"),
            "answers are JSON"
        );
        self.json()
    }
}

/// Sends `request` through `router`.
pub async fn call(router: &Router, request: Request<Body>) -> Answer {
    let response = router
        .clone()
        .oneshot(request)
        .await
        .expect("a router never fails");
    let (parts, body) = response.into_parts();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: axum::body::to_bytes(body, usize::MAX)
            .await
            .expect("the body is read whole"),
    }
}

/// `POST path` with `headers` (name, value) and `body`.
pub async fn post(router: &Router, path: &str, headers: &[(&str, &str)], body: impl Into<Body>) -> Answer {
    let mut request = Request::post(path);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    call(router, request.body(body.into()).expect("a valid request")).await
}

/// `GET path_and_query`.
pub async fn get(router: &Router, path_and_query: &str) -> Answer {
    let request = Request::get(path_and_query)
        .body(Body::empty())
        .expect("a valid request");
    call(router, request).await
}
