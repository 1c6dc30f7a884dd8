//! Hostile input against ingest-api: each case gets its 4xx with a JSON body, the service stays
//! up, and valid events sent at the same time are all stored.

use serde_json::Value;

use crate::helpers::spawn_app_with;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_is_refused_while_valid_events_are_all_stored() {
    let app = spawn_app_with(|s| s.http.body_timeout_ms = 800).await;

    let addr = format!("127.0.0.1:{}", app.port)
        .parse()
        .expect("a socket address");
    test_support::hostile::run_all_beside_valid_traffic(addr, 300, 201).await;

    assert_eq!(app.get("/healthz").await.status(), 200);
    let page: Value = app.get_json("/events?size=1000").await;
    assert_eq!(
        page["total"], 300,
        "only the valid events are stored, all of them"
    );
    assert!(page["data"]
        .as_array()
        .expect("data is an array")
        .iter()
        .all(|e| e["deviceId"] == "steady"));
}
