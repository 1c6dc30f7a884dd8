//! Hostile input against ingest-api: each case gets its 4xx with a JSON body, the service stays
//! up, and valid events sent at the same time are all stored.

use std::time::Duration;

use ingest_api::{Application, Settings};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_is_refused_while_valid_events_are_all_stored() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let mut settings = Settings::for_tests(dir.path().join("api.db"));
    settings.http.body_timeout_ms = 800;
    let app = Application::build(settings).await.expect("the app starts");
    let port = app.port();
    tokio::spawn(app.run_until_stopped(std::future::pending()));
    let base = format!("http://127.0.0.1:{port}");

    let valid = test_support::hostile::valid_traffic(base.clone(), 300, 201);
    let addr = format!("127.0.0.1:{port}").parse().expect("a socket address");
    test_support::hostile::run_all(addr, "/event", Duration::from_secs(5)).await;
    test_support::hostile::run_all(addr, "/events/batch", Duration::from_secs(5)).await;
    valid.await.expect("the task ran to its end");

    let client = reqwest::Client::new();
    assert_eq!(
        client
            .get(format!("{base}/healthz"))
            .send()
            .await
            .expect("the server answers")
            .status(),
        200
    );
    let page: Value = client
        .get(format!("{base}/events?size=1000"))
        .send()
        .await
        .expect("the server answers")
        .json()
        .await
        .expect("a JSON body");
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
