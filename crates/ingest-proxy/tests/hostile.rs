//! Hostile input against ingest-proxy (real broker): each case gets its 4xx with a JSON body,
//! the proxy stays up, and valid events sent at the same time all reach the topic.

use std::collections::HashSet;
use std::time::Duration;

use ingest_proxy::{Application, Settings};
use serde_json::json;
use test_support::{brokers, consume, payload_json, unique};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_is_refused_while_valid_events_all_reach_the_topic() {
    let topic = unique("hostile");
    let mut settings = Settings::for_tests(&brokers(), &topic);
    settings.http.body_timeout_ms = 800;
    let app = Application::build(settings).await.expect("the app starts");
    let port = app.port();
    tokio::spawn(app.run_until_stopped(std::future::pending()));
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    for _ in 0..300 {
        if client
            .get(format!("{base}/readyz"))
            .send()
            .await
            .map(|r| r.status() == 200)
            .unwrap_or(false)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let valid = test_support::hostile::valid_traffic(base.clone(), 300, 202);
    let addr = format!("127.0.0.1:{port}").parse().expect("a socket address");
    test_support::hostile::run_all(addr, "/event", Duration::from_secs(5)).await;
    test_support::hostile::run_all(addr, "/events/batch", Duration::from_secs(5)).await;
    valid.await.expect("the task ran to its end");

    assert_eq!(
        client
            .get(format!("{base}/healthz"))
            .send()
            .await
            .expect("the proxy answers")
            .status(),
        200
    );
    let msgs = consume(&brokers(), &topic, 300, Duration::from_secs(30));
    let ts: HashSet<i64> = msgs
        .iter()
        .map(|m| payload_json(m)["ts"].as_i64().expect("ts is an integer"))
        .collect();
    assert_eq!(ts.len(), 300, "every valid event is in the topic");
    assert!(
        msgs.iter().all(|m| payload_json(m)["deviceId"] == "steady"),
        "nothing hostile reached the topic"
    );
}

#[tokio::test]
async fn with_a_token_set_only_bearers_of_it_may_post() {
    let topic = unique("token");
    let mut settings = Settings::for_tests(&brokers(), &topic);
    settings.ingest_token = Some("s3cret".into());
    let app = Application::build(settings).await.expect("the app starts");
    let base = format!("http://127.0.0.1:{}", app.port());
    tokio::spawn(app.run_until_stopped(std::future::pending()));
    let client = reqwest::Client::new();
    let ev = json!({"deviceId": "d", "ts": 1, "latitude": 1.0, "longitude": 2.0});
    let none = client
        .post(format!("{base}/event"))
        .json(&ev)
        .send()
        .await
        .expect("the request is answered");
    assert_eq!(none.status(), 401);
    assert_eq!(
        none.json::<serde_json::Value>().await.expect("a JSON body")["field"],
        "authorization"
    );
    let wrong = client
        .post(format!("{base}/event"))
        .bearer_auth("guess")
        .json(&ev)
        .send()
        .await
        .expect("the request is answered");
    assert_eq!(wrong.status(), 401);
    assert_eq!(
        client
            .get(format!("{base}/healthz"))
            .send()
            .await
            .expect("the proxy answers")
            .status(),
        200,
        "health stays open"
    );
    let mut status = 0;
    for _ in 0..300 {
        status = client
            .post(format!("{base}/event"))
            .bearer_auth("s3cret")
            .json(&ev)
            .send()
            .await
            .expect("the request is answered")
            .status()
            .as_u16();
        if status == 202 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, 202);
}
