//! The validation answers of ingest-api's router, called with `oneshot` (a socket adds nothing
//! to them): each bad input gets its status code and a JSON body naming the problem, and
//! nothing is stored.

use axum::http::StatusCode;
use serde_json::{json, Value};

use test_support::hostile::events_with_a_bad_field;

use crate::helpers::{batch, event, route_app, route_app_with};

#[tokio::test]
async fn batch_with_one_bad_item_stores_nothing_and_names_item_and_field() {
    let app = route_app();
    let mut items: Vec<Value> = (0..3).map(|ts| event("d", ts)).collect();
    items[2]["longitude"] = json!(181);
    let body = app
        .post_batch(None, Value::Array(items).to_string())
        .await
        .json_with(StatusCode::BAD_REQUEST);
    assert_eq!(body["field"], "longitude");
    assert_eq!(body["index"], 2);
    assert_eq!(app.total().await, 0);
}

#[tokio::test]
async fn invalid_idempotency_key_is_refused() {
    let app = route_app();
    let body = app
        .post_batch(Some(&"k".repeat(300)), batch("d", 0, 1))
        .await
        .json_with(StatusCode::BAD_REQUEST);
    assert_eq!(body["field"], "Idempotency-Key");
    assert_eq!(app.total().await, 0);
}

#[tokio::test]
async fn bad_inputs_get_json_errors_naming_the_problem_and_store_nothing() {
    let app = route_app();
    let cases: Vec<(&str, String, &str)> = vec![
        ("/event", "{\"deviceId\":".into(), "malformed_json"),
        (
            "/event",
            "{\"deviceId\":\"d\",\"ts\":1,\"latitude\":NaN,\"longitude\":0}".into(),
            "malformed_json",
        ),
        (
            "/event",
            "{\"deviceId\":\"d\",\"ts\":1,\"latitude\":1e999,\"longitude\":0}".into(),
            "malformed_json",
        ),
        ("/event", "[1,2]".into(), "invalid_event"),
        (
            "/event",
            "{\"ts\":1,\"latitude\":0,\"longitude\":0}".into(),
            "invalid_event",
        ),
        (
            "/event",
            "{\"deviceId\":\"d\",\"ts\":\"now\",\"latitude\":0,\"longitude\":0}".into(),
            "invalid_event",
        ),
        (
            "/event",
            "{\"deviceId\":\"d\",\"ts\":1,\"latitude\":-91,\"longitude\":0}".into(),
            "invalid_event",
        ),
        ("/events/batch", "{\"not\":\"an array\"}".into(), "invalid_body"),
        (
            "/events/batch",
            "[{\"deviceId\":\"\",\"ts\":1,\"latitude\":0,\"longitude\":0}]".into(),
            "invalid_event",
        ),
    ];
    for (path, body, code) in cases {
        let json = app
            .post_json(path, body.clone())
            .await
            .json_with(StatusCode::BAD_REQUEST);
        assert_eq!(json["error"], code, "body {body}");
        assert!(!json["message"].as_str().expect("message is a string").is_empty());
    }
    let missing = app
        .post_json("/event", "{\"ts\":1,\"latitude\":0,\"longitude\":0}")
        .await
        .json_with(StatusCode::BAD_REQUEST);
    assert_eq!(missing["field"], "deviceId");

    let empty = app
        .post_json("/event", "")
        .await
        .json_with(StatusCode::BAD_REQUEST);
    assert_eq!(empty["error"], "empty_body");

    let text = app
        .post("/event", Some("text/plain"), None, event("d", 1).to_string())
        .await
        .json_with(StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(text["field"], "content-type");

    let no_type = app.post("/events/batch", None, None, batch("d", 0, 1)).await;
    assert_eq!(no_type.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);

    let bad_utf8 = app.post_json("/event", vec![b'{', 0xff, 0xfe, b'}']).await;
    assert_eq!(
        bad_utf8.json_with(StatusCode::BAD_REQUEST)["error"],
        "malformed_json"
    );

    assert_eq!(app.total().await, 0);
}

#[tokio::test]
async fn a_missing_or_wrongly_typed_field_is_named_with_its_batch_item() {
    let app = route_app();
    for (body, field) in events_with_a_bad_field() {
        let single = app
            .post_json("/event", body.to_string())
            .await
            .json_with(StatusCode::BAD_REQUEST);
        assert_eq!(single["error"], "invalid_event", "body {body}");
        assert_eq!(single["field"], field, "body {body}");

        let in_batch = json!([event("d", 1), body]).to_string();
        let item = app
            .post_batch(None, in_batch)
            .await
            .json_with(StatusCode::BAD_REQUEST);
        assert_eq!(item["field"], field, "batch item {body}");
        assert_eq!(item["index"], 1, "batch item {body}");
    }
    assert_eq!(app.total().await, 0);
}

#[tokio::test]
async fn body_and_batch_limits_answer_413() {
    let app = route_app_with(|s| {
        s.http.max_body_bytes = 4096;
        s.http.max_batch_len = 10;
    });
    let big = app.post_batch(None, batch("d", 0, 100)).await; // ~7 KB
    assert_eq!(
        big.json_with(StatusCode::PAYLOAD_TOO_LARGE)["error"],
        "body_too_large"
    );
    let long = app.post_batch(None, batch("d", 0, 11)).await;
    assert_eq!(
        long.json_with(StatusCode::PAYLOAD_TOO_LARGE)["error"],
        "batch_too_large"
    );
    assert_eq!(
        app.post_batch(None, batch("d", 0, 10)).await.status,
        StatusCode::CREATED
    );
    assert_eq!(app.total().await, 10);
}

#[tokio::test]
async fn bad_page_parameters_get_400_naming_the_parameter() {
    let app = route_app();
    for (query, field) in [
        ("page=0", "page"),
        ("page=-1", "page"),
        ("page=abc", "page"),
        ("size=0", "size"),
        ("size=1001", "size"),
        ("size=1.5", "size"),
        ("page=1&size=", "size"),
        ("after=-1", "after"),
        ("after=x", "after"),
        ("page=2&after=10", "after"),
    ] {
        let body = app
            .get(&format!("/events?{query}"))
            .await
            .json_with(StatusCode::BAD_REQUEST);
        assert_eq!(body["error"], "invalid_query", "query {query}");
        assert_eq!(body["field"], field, "query {query}");
    }
}
