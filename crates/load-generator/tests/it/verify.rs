//! `verify` with the dead-letter topic on the real test broker and a real ingest-api: every
//! acknowledged send is accounted for, and reading the topic again and again does not stall.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ingest_api::{Application, Settings as ApiSettings};
use load_generator::config::VerifySettings;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;
use test_support::{brokers, connection, create_topic, unique};

fn event(device: &str, ts: i64) -> serde_json::Value {
    json!({"deviceId": device, "ts": ts, "latitude": 1.0, "longitude": 2.0})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_accounts_for_stored_duplicate_and_dead_lettered_sends_and_names_what_is_missing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut settings = ApiSettings::for_tests(dir.path().join("api.db"));
    settings.http.port = 0;
    let app = Application::build(settings).await.expect("ingest-api");
    let api = format!("http://127.0.0.1:{}", app.port());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    let prefix = unique("verify");
    let d = |n: &str| format!("{prefix}-{n}");
    let stored = json!([event(&d("a"), 1), event(&d("a"), 2), event(&d("c"), 1)]);
    let answer = reqwest::Client::new()
        .post(format!("{api}/events/batch"))
        .json(&stored)
        .send()
        .await
        .expect("batch sent");
    assert!(answer.status().is_success(), "{}", answer.status());

    // The dead letters: b@1 twice (both sends late), c@1 once (its resend), one of another run.
    let dlq = unique("verify-dlq");
    create_topic(&brokers(), &dlq, 2).await;
    let producer: FutureProducer = service_common::kafka::idempotent_producer(&connection(&brokers()))
        .create()
        .expect("producer");
    let letters = [
        (d("b"), 1, "ts below the device's watermark"),
        (d("b"), 1, "ts below the device's watermark"),
        (
            d("c"),
            1,
            "ts at or below what was released for the device before it was forgotten",
        ),
        ("someone-else".to_owned(), 9, "ts below the device's watermark"),
    ];
    for (device, ts, detail) in &letters {
        let payload = event(device, *ts).to_string();
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "reason",
                value: Some("late"),
            })
            .insert(Header {
                key: "detail",
                value: Some(*detail),
            });
        producer
            .send(
                FutureRecord::to(&dlq)
                    .key(device)
                    .payload(&payload)
                    .headers(headers),
                Duration::from_secs(10),
            )
            .await
            .expect("dead letter written");
    }

    let sends = [
        ("a", 1),
        ("a", 1),
        ("a", 2),
        ("b", 1),
        ("b", 1),
        ("b", 2),
        ("c", 1),
        ("c", 1),
        ("c", 1),
    ];
    let manifest: String = sends
        .iter()
        .map(|(n, ts)| format!("{}\n", json!({"deviceId": d(n), "ts": ts, "status": "accepted"})))
        .collect();
    let path = dir.path().join("manifest.jsonl");
    std::fs::write(&path, manifest).expect("manifest written");
    let settings = VerifySettings {
        manifest: path,
        api: api.clone(),
        // b@2 stays missing, so verify keeps polling (and reading the topic) until this ends.
        wait_secs: 3,
        device_prefix: Some(format!("{prefix}-")),
        brokers: Some(brokers()),
        dlq_topic: dlq,
    };
    let start = Instant::now();
    let r = load_generator::verify::verify(&settings)
        .await
        .expect("verify runs");
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "each read of the topic returns once it is at its end: {:?}",
        start.elapsed()
    );
    assert_eq!(r.expected, 5);
    assert_eq!(r.acknowledged, 9);
    assert_eq!(r.missing, 1, "b@2: neither stored nor dead-lettered");
    assert_eq!(
        r.dead_lettered,
        BTreeMap::from([("late: ts below the device's watermark".to_owned(), 1)])
    );
    assert_eq!(r.resends_dead_lettered.values().sum::<usize>(), 1, "c@1's resend");
    assert_eq!(r.dropped_duplicates, 2, "a@1's second send and c@1's third");
    assert!(!r.clean());
    let _ = stop.send(());
    server.await.expect("server task").expect("server stops");
}
