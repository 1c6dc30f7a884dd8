//! ingest-api through real HTTP on port 0 and a real SQLite file.

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{batch, error_body, event, spawn_app, spawn_app_at, spawn_app_with};

#[tokio::test]
async fn post_event_stores_it_and_answers_the_row_with_its_id() {
    let app = spawn_app().await;
    let resp = app
        .post_json("/event", event("dev-1", 1_700_000_000_000).to_string())
        .await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let row: Value = resp.json().await.expect("a JSON body");
    assert_eq!(row["id"], 1);
    assert_eq!(row["deviceId"], "dev-1");
    assert_eq!(row["ts"], 1_700_000_000_000i64);
    let stored = app.all_events().await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].event.latitude, 37.77);
    assert!(app.db.exists(), "database file and its directory are created");
}

#[tokio::test]
async fn coordinates_are_stored_and_read_back_as_sent_and_an_integral_float_ts_is_taken() {
    let app = spawn_app().await;
    let one = r#"{"deviceId":"exact","ts":1.7e12,"latitude":-12.345678901234567,"longitude":3.0404516262184098e-92}"#;
    assert_eq!(app.post_json("/event", one).await.status(), StatusCode::CREATED);
    let batch = r#"[{"deviceId":"exact","ts":1700000000001.0,"latitude":89.99999999999999,"longitude":-179.99999999999997}]"#;
    assert_eq!(
        app.post_batch(None, batch.to_owned()).await.status(),
        StatusCode::CREATED
    );
    let page: Value = app.get_json("/events?page=1&size=10").await;
    let rows = page["data"].as_array().expect("rows");
    let bits = |v: &Value| v.as_f64().expect("a number").to_bits();
    assert_eq!(rows[0]["ts"], json!(1_700_000_000_000i64));
    assert_eq!(bits(&rows[0]["latitude"]), (-12.345678901234567f64).to_bits());
    assert_eq!(bits(&rows[0]["longitude"]), 3.0404516262184098e-92f64.to_bits());
    assert_eq!(rows[1]["ts"], json!(1_700_000_000_001i64));
    assert_eq!(bits(&rows[1]["latitude"]), 89.99999999999999f64.to_bits());
    assert_eq!(bits(&rows[1]["longitude"]), (-179.99999999999997f64).to_bits());
    let fractional = r#"{"deviceId":"exact","ts":1700000000000.5,"latitude":0,"longitude":0}"#;
    let body = error_body(app.post_json("/event", fractional).await, StatusCode::BAD_REQUEST).await;
    assert_eq!(body["field"], "ts");
}

#[tokio::test]
async fn batch_is_stored_in_order_and_reports_ids() {
    let app = spawn_app().await;
    let resp = app.post_batch(None, batch("d", 10, 5)).await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let body: Value = resp.json().await.expect("a JSON body");
    assert_eq!(body, json!({"inserted": 5, "firstId": 1, "lastId": 5}));
    let ts: Vec<i64> = app.all_events().await.iter().map(|e| e.event.ts).collect();
    assert_eq!(ts, vec![10, 11, 12, 13, 14]);
}

#[tokio::test]
async fn repeated_idempotency_key_replays_the_first_answer_and_stores_nothing() {
    let app = spawn_app().await;
    let body = batch("d", 0, 3);
    let first = app.post_batch(Some("batch-1"), body.clone()).await;
    assert_eq!(first.status(), StatusCode::CREATED);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first_body = first.text().await.expect("a text body");
    let again = app.post_batch(Some("batch-1"), body.clone()).await;
    assert_eq!(again.status(), StatusCode::CREATED);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.text().await.expect("a text body"), first_body);
    assert_eq!(app.total().await, 3);
}

#[tokio::test]
async fn key_reused_with_another_body_is_refused() {
    let app = spawn_app().await;
    assert_eq!(
        app.post_batch(Some("k"), batch("d", 0, 2)).await.status(),
        StatusCode::CREATED
    );
    let body = error_body(
        app.post_batch(Some("k"), batch("d", 5, 2)).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(body["field"], "Idempotency-Key");
    assert_eq!(app.total().await, 2);
}

#[tokio::test]
async fn batch_without_key_is_a_plain_insert_each_time() {
    let app = spawn_app().await;
    let body = batch("d", 0, 2);
    app.post_batch(None, body.clone()).await;
    app.post_batch(None, body).await;
    assert_eq!(app.total().await, 4);
}

#[tokio::test]
async fn pages_are_in_insertion_order_with_metadata() {
    let app = spawn_app().await;
    app.post_batch(None, batch("d", 0, 25)).await;
    let p1: Value = app.get_json("/events?page=1&size=10").await;
    assert_eq!(p1["total"], 25);
    assert_eq!(p1["totalPages"], 3);
    assert_eq!(p1["page"], 1);
    assert_eq!(p1["size"], 10);
    assert_eq!(p1["hasMore"], true);
    let p3: Value = app.get_json("/events?page=3&size=10").await;
    let ts: Vec<i64> = p3["data"]
        .as_array()
        .expect("data is an array")
        .iter()
        .map(|e| e["ts"].as_i64().expect("ts is an integer"))
        .collect();
    assert_eq!(ts, vec![20, 21, 22, 23, 24]);
    assert_eq!(p3["hasMore"], false);
    let beyond: Value = app.get_json("/events?page=9&size=10").await;
    assert_eq!(beyond["data"].as_array().expect("data is an array").len(), 0);
    let default: Value = app.get_json("/events").await;
    assert_eq!(default["size"], 100);
    assert_eq!(default["data"].as_array().expect("data is an array").len(), 25);
}

fn ids(page: &Value) -> Vec<i64> {
    page["data"]
        .as_array()
        .expect("data is an array")
        .iter()
        .map(|e| e["id"].as_i64().expect("id"))
        .collect()
}

#[tokio::test]
async fn keyset_reads_follow_next_through_every_row_once() {
    let app = spawn_app().await;
    app.post_batch(None, batch("d", 0, 25)).await;
    let mut seen = Vec::new();
    let mut after = 0;
    loop {
        let page: Value = app.get_json(&format!("/events?after={after}&size=10")).await;
        assert_eq!(page["total"], 25);
        assert_eq!(page["after"], after);
        seen.extend(ids(&page));
        match page["next"].as_i64() {
            Some(next) => {
                assert_eq!(page["hasMore"], true);
                assert_eq!(Some(&next), seen.last(), "next is the page's last id");
                after = next;
            }
            None => {
                assert_eq!(page["hasMore"], false);
                break;
            }
        }
    }
    assert_eq!(seen, (1..=25).collect::<Vec<_>>());
    let numbered: Value = app.get_json("/events?page=2&size=10").await;
    assert_eq!(ids(&numbered), (11..=20).collect::<Vec<_>>());
    assert_eq!(numbered["next"], 20, "numbered pages carry next too");
    let last: Value = app.get_json("/events?page=3&size=10").await;
    assert!(last["next"].is_null());
    let past: Value = app.get_json("/events?after=25").await;
    assert_eq!(ids(&past), Vec::<i64>::new());
}

#[tokio::test]
async fn the_count_of_an_older_database_is_taken_once_and_pages_survive_gaps_in_ids() {
    let app = spawn_app().await;
    app.post_batch(None, batch("d", 0, 10)).await;
    let (db, dir) = app.stop().await;
    {
        let conn = rusqlite::Connection::open(&db).expect("open the database by hand");
        // A database from before the row count, with a row deleted by hand.
        conn.execute_batch("DROP TABLE event_count; DELETE FROM events WHERE id = 3;")
            .expect("edit by hand");
    }
    let app = spawn_app_at(db, dir, |_| {}).await;
    assert_eq!(app.total().await, 9, "counted once at start");
    let p1: Value = app.get_json("/events?page=1&size=4").await;
    assert_eq!(ids(&p1), vec![1, 2, 4, 5]);
    let p2: Value = app.get_json("/events?page=2&size=4").await;
    assert_eq!(ids(&p2), vec![6, 7, 8, 9]);
    app.post_json("/event", event("d", 99).to_string()).await;
    assert_eq!(app.total().await, 10, "kept by the inserts from then on");
    let p3: Value = app.get_json("/events?page=3&size=4").await;
    assert_eq!(ids(&p3), vec![10, 11]);
    assert_eq!(p3["hasMore"], false);
}

#[tokio::test]
async fn health_metrics_and_unknown_routes() {
    let app = spawn_app().await;
    assert_eq!(app.get("/healthz").await.status(), StatusCode::OK);
    app.post_batch(Some("m"), batch("d", 0, 3)).await;
    app.post_batch(Some("m"), batch("d", 0, 3)).await;
    let metrics = app.get("/metrics").await.text().await.expect("a text body");
    for name in [
        "ingest_api_http_requests_total{route=\"/events/batch\",method=\"POST\",status=\"201\"}",
        "ingest_api_rows_inserted_total",
        "ingest_api_batches_total{replayed=\"true\"}",
        "ingest_api_batches_total{replayed=\"false\"}",
        "ingest_api_insert_duration_seconds_bucket",
    ] {
        assert!(metrics.contains(name), "metrics lack {name}:\n{metrics}");
    }
    assert_eq!(
        error_body(app.get("/nope").await, StatusCode::NOT_FOUND).await["error"],
        "not_found"
    );
    let wrong_method = app.get("/event").await;
    assert_eq!(
        error_body(wrong_method, StatusCode::METHOD_NOT_ALLOWED).await["error"],
        "method_not_allowed"
    );
}

/// 32 clients post 100 keyed batches each; keys 0..800 are shared, so each key is posted by
/// four clients. The store must apply each key exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_clients_with_repeated_keys_store_each_key_once() {
    const CLIENTS: usize = 32;
    const PER_CLIENT: usize = 100;
    const DISTINCT_KEYS: usize = 800;
    const BATCH_LEN: i64 = 5;
    let app = spawn_app().await;
    let base = app.base.clone();
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let base = base.clone();
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut replays = 0;
            for i in 0..PER_CLIENT {
                let k = (c * PER_CLIENT + i) % DISTINCT_KEYS;
                let resp = client
                    .post(format!("{base}/events/batch"))
                    .header("content-type", "application/json")
                    .header("Idempotency-Key", format!("key-{k}"))
                    .body(batch(&format!("dev-{k}"), 0, BATCH_LEN))
                    .send()
                    .await
                    .expect("the request is answered");
                assert_eq!(resp.status(), StatusCode::CREATED);
                if resp.headers().get("idempotent-replayed").is_some() {
                    replays += 1;
                }
            }
            replays
        }));
    }
    let replays: usize = futures::future::join_all(tasks)
        .await
        .into_iter()
        .map(|r| r.expect("a client task ran to its end"))
        .sum();
    assert_eq!(replays, CLIENTS * PER_CLIENT - DISTINCT_KEYS);
    let stored = app.all_events().await;
    assert_eq!(stored.len(), DISTINCT_KEYS * BATCH_LEN as usize);
    // Each batch stayed contiguous and in order.
    for chunk in stored.chunks(BATCH_LEN as usize) {
        let dev = &chunk[0].event.device_id;
        let ts: Vec<i64> = chunk.iter().map(|e| e.event.ts).collect();
        assert!(chunk.iter().all(|e| &e.event.device_id == dev));
        assert_eq!(ts, (0..BATCH_LEN).collect::<Vec<_>>());
    }
}

#[tokio::test]
async fn data_and_keys_survive_a_restart_on_the_same_file() {
    let app = spawn_app().await;
    app.post_json("/event", event("a", 1).to_string()).await;
    app.post_batch(Some("restart-key"), batch("b", 0, 4)).await;
    let (db, dir) = app.stop().await;
    let app = spawn_app_at(db, dir, |_| {}).await;
    assert_eq!(app.total().await, 5);
    let replay = app.post_batch(Some("restart-key"), batch("b", 0, 4)).await;
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(app.total().await, 5);
    let next: Value = app
        .post_json("/event", event("a", 2).to_string())
        .await
        .json()
        .await
        .expect("a JSON body");
    assert_eq!(next["id"], 6);
}

#[tokio::test]
async fn a_stored_batch_is_replayed_after_the_length_limit_is_lowered_not_refused() {
    let app = spawn_app().await;
    let stored = app.post_batch(Some("long-key"), batch("b", 0, 8)).await;
    assert_eq!(stored.status(), StatusCode::CREATED);
    let (db, dir) = app.stop().await;
    let app = spawn_app_at(db, dir, |s| s.http.max_batch_len = 4).await;
    let replay = app.post_batch(Some("long-key"), batch("b", 0, 8)).await;
    assert_eq!(
        replay.status(),
        StatusCode::CREATED,
        "a replay is answered at any length"
    );
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    let fresh = app.post_batch(Some("other-key"), batch("c", 0, 8)).await;
    assert_eq!(
        error_body(fresh, StatusCode::PAYLOAD_TOO_LARGE).await["error"],
        "batch_too_large",
        "a new batch over the limit is refused"
    );
    assert_eq!(app.total().await, 8);
}

#[tokio::test]
async fn idempotency_keys_expire_after_the_retention_and_a_late_resend_is_stored_again() {
    let app = spawn_app_with(|s| {
        s.idempotency_retention_ms = 300;
        s.idempotency_prune_interval_ms = 100;
    })
    .await;
    let body = batch("exp", 0, 3);
    assert_eq!(
        app.post_batch(Some("k-expiring"), body.clone()).await.status(),
        StatusCode::CREATED
    );
    let replay = app.post_batch(Some("k-expiring"), body.clone()).await;
    assert_eq!(
        replay.headers()["idempotent-replayed"],
        "true",
        "within the retention: a replay"
    );
    // Past the retention the pruner deletes the key; the same batch is then new again.
    let start = std::time::Instant::now();
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let again = app.post_batch(Some("k-expiring"), body.clone()).await;
        if again.headers().get("idempotent-replayed").is_none() {
            assert_eq!(again.status(), StatusCode::CREATED);
            break;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "the key never expired"
        );
    }
    assert_eq!(
        app.total().await,
        6,
        "stored twice: once before and once after the key expired"
    );
}
