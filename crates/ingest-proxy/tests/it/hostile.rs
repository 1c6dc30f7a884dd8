//! Hostile input against ingest-proxy (real broker): each case gets its 4xx with a JSON body,
//! the proxy stays up, and valid events sent at the same time all reach the topic.

use std::collections::HashSet;
use std::time::Duration;

use test_support::{brokers, consume, payload_json};

use crate::helpers::{event, spawn_proxy_with};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_is_refused_while_valid_events_all_reach_the_topic() {
    let proxy = spawn_proxy_with(&brokers(), |s| s.http.body_timeout_ms = 800).await;

    let addr = format!("127.0.0.1:{}", proxy.port)
        .parse()
        .expect("a socket address");
    test_support::hostile::run_all_beside_valid_traffic(addr, 300, 202).await;

    assert_eq!(proxy.get("/healthz").await.status(), 200);
    let msgs = consume(&brokers(), &proxy.topic, 300, Duration::from_secs(30));
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
    let proxy = spawn_proxy_with(&brokers(), |s| s.ingest_token = Some("s3cret".into())).await;
    let ev = event("d", 1);
    let none = proxy.post_event(&ev).await;
    assert_eq!(none.status(), 401);
    assert_eq!(
        none.json::<serde_json::Value>().await.expect("a JSON body")["field"],
        "authorization"
    );
    let wrong = proxy.post_event_as("guess", &ev).await;
    assert_eq!(wrong.status(), 401);
    assert_eq!(proxy.get("/healthz").await.status(), 200, "health stays open");
    let mut status = 0;
    for _ in 0..300 {
        status = proxy.post_event_as("s3cret", &ev).await.status().as_u16();
        if status == 202 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, 202);
}
