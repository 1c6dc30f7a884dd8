//! ingest-proxy against the real test broker (scripts/broker), through real HTTP.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use rdkafka::Message;
use reqwest::StatusCode;
use serde_json::{json, Value};
use test_support::{brokers, consume, consume_until_quiet, key_str, payload_json, unique, PrivateBroker};

use crate::helpers::{event, spawn_proxy, spawn_proxy_with, TestProxy};

#[tokio::test]
async fn accepted_event_is_in_the_topic_keyed_by_device() {
    let proxy = spawn_proxy().await;
    let resp = proxy.post_event(&event("dev-42", 1_700_000_000_123)).await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let body: Value = resp.json().await.expect("a JSON body");
    assert_eq!(body["status"], "accepted");
    let msgs = consume(&brokers(), &proxy.topic, 1, Duration::from_secs(20));
    assert_eq!(msgs.len(), 1);
    assert_eq!(key_str(&msgs[0]), "dev-42");
    assert_eq!(payload_json(&msgs[0]), event("dev-42", 1_700_000_000_123));
    assert_eq!(
        msgs[0].partition() as i64,
        body["partition"].as_i64().expect("partition is an integer")
    );
    assert_eq!(
        msgs[0].offset(),
        body["offset"].as_i64().expect("offset is an integer")
    );
}

#[tokio::test]
async fn one_device_lands_in_one_partition_in_send_order() {
    let proxy = spawn_proxy().await;
    let devices = ["alpha", "bravo", "charlie", "delta"];
    for i in 0..40 {
        for d in devices {
            assert_eq!(
                proxy.post_event(&event(d, 1000 + i)).await.status(),
                StatusCode::ACCEPTED
            );
        }
    }
    let msgs = consume(&brokers(), &proxy.topic, 160, Duration::from_secs(20));
    assert_eq!(msgs.len(), 160);
    let mut by_device: HashMap<String, Vec<(i32, i64, i64)>> = HashMap::new();
    for m in &msgs {
        by_device.entry(key_str(m)).or_default().push((
            m.partition(),
            m.offset(),
            payload_json(m)["ts"].as_i64().expect("ts is an integer"),
        ));
    }
    let mut partitions_used = HashSet::new();
    for (device, mut rows) in by_device {
        let partitions: HashSet<i32> = rows.iter().map(|r| r.0).collect();
        assert_eq!(partitions.len(), 1, "{device} spread over {partitions:?}");
        partitions_used.extend(partitions);
        rows.sort_by_key(|r| r.1);
        let ts: Vec<i64> = rows.iter().map(|r| r.2).collect();
        assert_eq!(ts, (1000..1040).collect::<Vec<_>>(), "{device} out of send order");
    }
    assert!(partitions_used.len() > 1, "keys should spread over partitions");
}

#[tokio::test]
async fn invalid_input_gets_400_and_nothing_is_produced() {
    let proxy = spawn_proxy().await;
    let bad = [
        (
            "application/json",
            "{\"deviceId\":\"d\",\"ts\":1,\"latitude\":91,\"longitude\":0}".to_owned(),
            "latitude",
        ),
        (
            "application/json",
            "{\"deviceId\":\"d\",\"ts\":-5,\"latitude\":0,\"longitude\":0}".to_owned(),
            "ts",
        ),
        (
            "application/json",
            "{\"ts\":1,\"latitude\":0,\"longitude\":0}".to_owned(),
            "deviceId",
        ),
    ];
    for (ct, body, field) in bad {
        let resp = proxy.post("/event", ct, body).await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        let json: Value = resp.json().await.expect("a JSON body");
        assert_eq!(json["field"], field);
    }
    let malformed = proxy.post("/event", "application/json", "{nope").await;
    assert_eq!(malformed.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        malformed.json::<Value>().await.expect("a JSON body")["error"],
        "malformed_json"
    );
    let wrong_type = proxy
        .post("/event", "text/plain", event("d", 1).to_string())
        .await;
    assert_eq!(wrong_type.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let all_bad = proxy
        .post("/events/batch", "application/json", "[{\"deviceId\":\"\"}]")
        .await;
    assert_eq!(all_bad.status(), StatusCode::BAD_REQUEST);
    let msgs = consume_until_quiet(&brokers(), &proxy.topic, Duration::from_secs(2));
    assert!(
        msgs.is_empty(),
        "invalid input reached the topic: {} messages",
        msgs.len()
    );
}

#[tokio::test]
async fn batch_answers_a_result_per_item_for_json_and_ndjson() {
    let proxy = spawn_proxy().await;
    let mut items: Vec<Value> = (0..5).map(|i| event("batch-dev", i)).collect();
    items[3]["longitude"] = json!("west");
    let resp = proxy.post_batch(items).await;
    assert_eq!(resp.status(), StatusCode::MULTI_STATUS);
    let body: Value = resp.json().await.expect("a JSON body");
    assert_eq!(body["accepted"], 4);
    assert_eq!(body["invalid"], 1);
    let results = body["results"].as_array().expect("results is an array");
    assert_eq!(results.len(), 5);
    assert_eq!(results[3]["status"], "invalid");
    assert_eq!(results[3]["field"], "longitude");
    assert_eq!(results[3]["index"], 3);
    assert!(results
        .iter()
        .enumerate()
        .all(|(i, r)| i == 3 || r["status"] == "accepted"));

    let ndjson = format!("{}\n{}\n\n", event("nd-dev", 1), event("nd-dev", 2));
    let resp = proxy.post("/events/batch", "application/x-ndjson", ndjson).await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    assert_eq!(resp.json::<Value>().await.expect("a JSON body")["accepted"], 2);

    let msgs = consume(&brokers(), &proxy.topic, 6, Duration::from_secs(20));
    let mut got: Vec<(String, i64)> = msgs
        .iter()
        .map(|m| {
            (
                key_str(m),
                payload_json(m)["ts"].as_i64().expect("ts is an integer"),
            )
        })
        .collect();
    got.sort();
    let mut want: Vec<(String, i64)> = [0, 1, 2, 4]
        .iter()
        .map(|t| ("batch-dev".to_owned(), *t))
        .collect();
    want.extend([("nd-dev".to_owned(), 1), ("nd-dev".to_owned(), 2)]);
    want.sort();
    assert_eq!(got, want);
}

#[tokio::test]
async fn full_in_flight_bound_answers_503_with_retry_after() {
    let proxy = spawn_proxy_with(&brokers(), |s| s.max_in_flight = 3).await;
    let items: Vec<Value> = (0..4).map(|i| event("big", i)).collect();
    let resp = proxy.post_batch(items).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(resp.headers().contains_key("retry-after"));
    let body: Value = resp.json().await.expect("a JSON body");
    assert_eq!(body["unavailable"], 4);
    assert_eq!(
        proxy.post_event(&event("small", 1)).await.status(),
        StatusCode::ACCEPTED
    );
}

#[tokio::test]
async fn broker_outage_gives_503_within_the_deadline_and_recovers() {
    let broker = PrivateBroker::start();
    let proxy = spawn_proxy_with(&broker.address(), |s| s.produce_timeout_ms = 2000).await;
    assert_eq!(
        proxy.post_event(&event("d", 1)).await.status(),
        StatusCode::ACCEPTED
    );

    broker.stop();
    let start = Instant::now();
    let resp = proxy.post_event(&event("d", 2)).await;
    let waited = start.elapsed();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        resp.headers().contains_key("retry-after"),
        "503 carries Retry-After"
    );
    assert!(
        // The deadline is 2 s; librdkafka scans for timed-out messages once a second and the
        // proxy's own backstop fires 1 s after the deadline. Slack for a loaded machine.
        waited < Duration::from_millis(2000 + 3000),
        "answered after {waited:?}, deadline 2 s"
    );
    proxy
        .wait_ready(StatusCode::SERVICE_UNAVAILABLE, Duration::from_secs(15))
        .await;

    broker.resume();
    proxy.wait_ready(StatusCode::OK, Duration::from_secs(30)).await;
    let start = Instant::now();
    loop {
        let status = proxy.post_event(&event("d", 3)).await.status();
        if status == StatusCode::ACCEPTED {
            break;
        }
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "proxy did not recover after the broker came back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let msgs = consume(&broker.address(), &proxy.topic, 2, Duration::from_secs(20));
    let ts: HashSet<i64> = msgs
        .iter()
        .map(|m| payload_json(m)["ts"].as_i64().expect("ts is an integer"))
        .collect();
    assert!(
        ts.contains(&1) && ts.contains(&3),
        "accepted events are in the topic: {ts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_event_acknowledged_before_sigterm_is_in_the_topic() {
    let topic = unique("proxy-sigterm");
    let port = test_support::free_port();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ingest-proxy"))
        .env("PORT", port.to_string())
        .env("BIND_ADDR", "127.0.0.1")
        .env("KAFKA_BROKERS", brokers())
        .env("KAFKA_TOPIC", &topic)
        .env("TOPIC_PARTITIONS", "3")
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("spawn ingest-proxy");
    let proxy = TestProxy::at(port, &topic);
    let start = Instant::now();
    while proxy
        .client
        .get(format!("{}/readyz", proxy.base))
        .send()
        .await
        .map(|r| r.status() != 200)
        .unwrap_or(true)
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "proxy child did not become ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // 8 senders post until the proxy stops answering; SIGTERM arrives mid-stream.
    let mut senders = Vec::new();
    for s in 0..8 {
        let base = proxy.base.clone();
        senders.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut acked = Vec::new();
            for i in 0..100_000i64 {
                let ev = event(&format!("sig-{s}"), i);
                match client
                    .post(format!("{base}/event"))
                    .header("content-type", "application/json")
                    .body(ev.to_string())
                    .send()
                    .await
                {
                    Ok(r) if r.status() == StatusCode::ACCEPTED => acked.push((s, i)),
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            acked
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
    let exit = child.wait().expect("the child exits");
    assert!(exit.success(), "proxy exited with {exit:?} after SIGTERM");
    let mut acked = HashSet::new();
    for s in senders {
        acked.extend(s.await.expect("the task ran to its end"));
    }
    assert!(
        acked.len() > 50,
        "too few events were sent before SIGTERM: {}",
        acked.len()
    );
    let msgs = consume(&brokers(), &topic, acked.len(), Duration::from_secs(30));
    let in_topic: HashSet<(i32, i64)> = msgs
        .iter()
        .map(|m| {
            let dev = key_str(m);
            (
                dev.trim_start_matches("sig-").parse().expect("a numbered device"),
                payload_json(m)["ts"].as_i64().expect("ts is an integer"),
            )
        })
        .collect();
    let missing: Vec<_> = acked.iter().filter(|k| !in_topic.contains(k)).take(5).collect();
    assert!(
        missing.is_empty(),
        "acknowledged events missing from the topic, e.g. {missing:?}"
    );
}

/// A broker restart under load can leave librdkafka's idempotent producer with sequence numbers
/// the broker no longer accepts, a fatal error; the proxy must replace the producer and accept
/// events again instead of answering 503 for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_accepts_again_after_a_broker_restart_under_load() {
    let broker = PrivateBroker::start();
    let proxy = spawn_proxy_with(&broker.address(), |s| s.produce_timeout_ms = 2000).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut senders = Vec::new();
    for s in 0..32 {
        let (base, stop) = (proxy.base.clone(), std::sync::Arc::clone(&stop));
        senders.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut i = 0i64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                let _ = client
                    .post(format!("{base}/event"))
                    .header("content-type", "application/json")
                    .body(event(&format!("load-{s}"), i).to_string())
                    .send()
                    .await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    broker.stop();
    tokio::time::sleep(Duration::from_millis(500)).await;
    broker.resume();
    tokio::time::sleep(Duration::from_millis(2000)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for s in senders {
        s.await.expect("the task ran to its end");
    }
    let start = Instant::now();
    let mut ts = 1_000_000;
    loop {
        ts += 1;
        if proxy.post_event(&event("after-restart", ts)).await.status() == StatusCode::ACCEPTED {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(45),
            "proxy did not accept events again after the broker restart"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test]
async fn coordinates_reach_the_topic_as_sent_and_an_integral_float_ts_is_an_integer() {
    let proxy = spawn_proxy().await;
    // Written by hand: 1.7e12 for the ts, and coordinates whose shortest forms are long.
    let body = r#"{"deviceId":"exact","ts":1.7e12,"latitude":-12.345678901234567,"longitude":3.0404516262184098e-92}"#;
    let resp = proxy.post("/event", "application/json", body).await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let msgs = consume(&brokers(), &proxy.topic, 1, Duration::from_secs(20));
    let got = payload_json(&msgs[0]);
    assert_eq!(got["ts"], json!(1_700_000_000_000i64), "an integer in the topic");
    let bits = |v: &Value| v.as_f64().expect("a number").to_bits();
    assert_eq!(bits(&got["latitude"]), (-12.345678901234567f64).to_bits());
    assert_eq!(bits(&got["longitude"]), 3.0404516262184098e-92f64.to_bits());
}
