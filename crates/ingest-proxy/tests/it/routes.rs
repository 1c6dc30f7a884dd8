//! The validation answers of ingest-proxy's router, called with `oneshot` (a socket adds nothing
//! to them). Its producer points where no broker listens, so an event that got past validation
//! would be answered 503, not 4xx.

use reqwest::StatusCode;
use serde_json::{json, Value};

use test_support::hostile::events_with_a_bad_field;

use crate::helpers::{event, route_proxy, route_proxy_with};

#[tokio::test]
async fn malformed_json_gets_400_malformed_json() {
    let proxy = route_proxy();
    for path in ["/event", "/events/batch"] {
        let body = proxy
            .post_json(path, "{\"deviceId\":")
            .await
            .json_with(StatusCode::BAD_REQUEST);
        assert_eq!(body["error"], "malformed_json", "{path}");
        assert!(
            !body["message"].as_str().expect("message is a string").is_empty(),
            "{path}"
        );
    }
}

#[tokio::test]
async fn a_missing_or_wrongly_typed_field_of_an_event_is_named() {
    let proxy = route_proxy();
    for (body, field) in events_with_a_bad_field() {
        let answer = proxy
            .post_json("/event", body.to_string())
            .await
            .json_with(StatusCode::BAD_REQUEST);
        assert_eq!(answer["error"], "invalid_event", "body {body}");
        assert_eq!(answer["field"], field, "body {body}");
    }
}

#[tokio::test]
async fn a_batch_of_bad_items_names_each_items_field_and_index() {
    let proxy = route_proxy();
    let (items, fields): (Vec<Value>, Vec<&str>) = events_with_a_bad_field().into_iter().unzip();
    let ndjson: String = items.iter().map(|i| format!("{i}\n")).collect();
    for (content_type, body) in [
        ("application/json", Value::Array(items.clone()).to_string()),
        ("application/x-ndjson", ndjson),
    ] {
        let answer = proxy
            .post("/events/batch", content_type, body)
            .await
            .json_with(StatusCode::BAD_REQUEST);
        assert_eq!(answer["accepted"], 0, "{content_type}");
        assert_eq!(answer["invalid"], items.len(), "{content_type}");
        let results = answer["results"].as_array().expect("results is an array");
        assert_eq!(results.len(), items.len(), "{content_type}");
        for (index, (result, field)) in results.iter().zip(&fields).enumerate() {
            assert_eq!(result["status"], "invalid", "{content_type} item {index}");
            assert_eq!(result["field"], *field, "{content_type} item {index}");
            assert_eq!(result["index"], index, "{content_type} item {index}");
        }
    }
}

#[tokio::test]
async fn a_batch_longer_than_max_batch_len_gets_413_batch_too_large() {
    let proxy = route_proxy_with(|s| s.http.max_batch_len = 3);
    let long: Vec<Value> = (0..4).map(|ts| event("d", ts)).collect();
    let answer = proxy
        .post_json("/events/batch", Value::Array(long).to_string())
        .await
        .json_with(StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(answer["error"], "batch_too_large");
    assert!(
        answer["message"]
            .as_str()
            .expect("message is a string")
            .contains("the limit is 3"),
        "the message names the limit: {answer}"
    );

    // At the limit the length is fine; these items are refused for their content instead.
    let at_limit = json!([{}, {}, {}]).to_string();
    let answer = proxy
        .post_json("/events/batch", at_limit)
        .await
        .json_with(StatusCode::BAD_REQUEST);
    assert_eq!(answer["invalid"], 3);
}

#[tokio::test]
async fn bodies_that_are_not_a_batch_get_400_or_415_naming_the_problem() {
    let proxy = route_proxy_with(|s| s.http.max_body_bytes = 1024);
    let not_array = proxy
        .post_json("/events/batch", "{\"not\":\"an array\"}")
        .await
        .json_with(StatusCode::BAD_REQUEST);
    assert_eq!(not_array["error"], "invalid_body");
    // An empty batch is taken, as ingest-api takes one: nothing to publish, nothing refused.
    let empty_batch = proxy
        .post_json("/events/batch", "[]")
        .await
        .json_with(StatusCode::ACCEPTED);
    assert_eq!(empty_batch["accepted"], 0);
    assert_eq!(empty_batch["results"], serde_json::json!([]));
    let empty_body = proxy
        .post_json("/event", "")
        .await
        .json_with(StatusCode::BAD_REQUEST);
    assert_eq!(empty_body["error"], "empty_body");
    let text = proxy
        .post("/event", "text/plain", event("d", 1).to_string())
        .await
        .json_with(StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(text["field"], "content-type");
    let big: Vec<Value> = (0..20).map(|ts| event("d", ts)).collect();
    let too_big = proxy
        .post_json("/events/batch", Value::Array(big).to_string())
        .await
        .json_with(StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(too_big["error"], "body_too_large");
}

#[tokio::test]
async fn a_request_timeout_shorter_than_the_ingest_deadlines_answers_408_in_time() {
    // No broker listens, so the event waits for PRODUCE_TIMEOUT_MS (5 s): the request timer
    // of 300 ms must end it first.
    let proxy = route_proxy_with(|s| {
        s.produce_timeout_ms = 5_000;
        s.http.request_timeout_ms = 300;
    });
    let start = std::time::Instant::now();
    let answer = proxy.post_json("/event", event("d", 1).to_string()).await;
    assert_eq!(answer.status, StatusCode::REQUEST_TIMEOUT);
    assert!(
        start.elapsed() < std::time::Duration::from_secs(4),
        "answered after {:?}, not at the request timeout",
        start.elapsed()
    );
}

#[tokio::test]
async fn with_a_long_request_timeout_the_produce_deadline_answers_503() {
    // PRODUCE_TIMEOUT_MS 500 ms and the default REQUEST_TIMEOUT_MS (15 s): no request timer is
    // armed, and librdkafka's deadline ends the request.
    let proxy = route_proxy();
    let start = std::time::Instant::now();
    let answer = proxy.post_json("/event", event("d", 1).to_string()).await;
    let body = answer.json_with(StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["error"], "unavailable");
    assert!(answer.headers.contains_key("retry-after"));
    assert!(
        start.elapsed() < std::time::Duration::from_secs(5),
        "answered after {:?}",
        start.elapsed()
    );
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after the epoch")
        .as_millis() as i64
}

#[tokio::test]
async fn a_ts_more_than_max_future_skew_ahead_gets_400_naming_ts_and_one_within_it_passes() {
    let proxy = route_proxy_with(|s| s.max_future_skew_ms = 3_600_000);
    let micros = now_ms() * 1_000;
    let answer = proxy
        .post_json("/event", event("d", micros).to_string())
        .await
        .json_with(StatusCode::BAD_REQUEST);
    assert_eq!(answer["error"], "invalid_event");
    assert_eq!(answer["field"], "ts");
    assert!(
        answer["message"]
            .as_str()
            .is_some_and(|m| m.contains("MAX_FUTURE_SKEW_MS")),
        "{answer}"
    );
    // Within the skew (half an hour ahead) it passes validation: no broker here, so 503.
    let ahead = proxy
        .post_json("/event", event("d", now_ms() + 1_800_000).to_string())
        .await;
    assert_eq!(ahead.status, StatusCode::SERVICE_UNAVAILABLE);
    // In a batch, the item is named with its index and the others are taken.
    let batch = json!([event("d", now_ms()), event("d", now_ms() + 7_200_000)]);
    let answer = proxy
        .post_json("/events/batch", batch.to_string())
        .await
        .json_with(StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer["invalid"], 1);
    assert_eq!(answer["results"][1]["field"], "ts");
    assert_eq!(answer["results"][1]["index"], 1);
    assert_eq!(answer["results"][0]["status"], "unavailable");
}
