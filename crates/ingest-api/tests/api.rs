//! ingest-api through real HTTP on port 0 and a real SQLite file.

use std::path::PathBuf;

use ingest_api::{Application, Settings};
use load_generator::events::EventsClient;
use reqwest::StatusCode;
use serde_json::{json, Value};
use telemetry_core::StoredEvent;
use tokio::sync::oneshot;

struct TestApp {
    base: String,
    client: reqwest::Client,
    db: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    _dir: Option<tempfile::TempDir>,
}

impl TestApp {
    async fn post_json(&self, path: &str, body: impl Into<reqwest::Body>) -> reqwest::Response {
        self.client
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("request failed")
    }

    async fn post_batch(&self, key: Option<&str>, body: String) -> reqwest::Response {
        let mut req = self
            .client
            .post(format!("{}/events/batch", self.base))
            .header("content-type", "application/json")
            .body(body);
        if let Some(k) = key {
            req = req.header("Idempotency-Key", k);
        }
        req.send().await.expect("request failed")
    }

    async fn get(&self, path_and_query: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path_and_query}", self.base))
            .send()
            .await
            .expect("request failed")
    }

    /// Every stored event, read through `GET /events` with the shared typed client.
    async fn all_events(&self) -> Vec<StoredEvent> {
        EventsClient::new(&self.base)
            .all()
            .await
            .expect("read every stored event")
    }

    async fn get_json(&self, path_and_query: &str) -> Value {
        self.get(path_and_query).await.json().await.expect("a JSON body")
    }

    async fn total(&self) -> u64 {
        let body: Value = self.get_json("/events?size=1").await;
        body["total"].as_u64().expect("total is a count")
    }

    /// Stops the server and waits until it has let go of the database.
    async fn stop(mut self) -> (PathBuf, Option<tempfile::TempDir>) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.expect("the task ran to its end");
        }
        (self.db.clone(), self._dir.take())
    }
}

async fn spawn_app_at(
    db: PathBuf,
    dir: Option<tempfile::TempDir>,
    tweak: impl FnOnce(&mut Settings),
) -> TestApp {
    let mut settings = Settings::for_tests(db.clone());
    tweak(&mut settings);
    let app = Application::build(settings).await.expect("app builds");
    let port = app.port();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        app.run_until_stopped(async {
            let _ = stopped.await;
        })
        .await
        .expect("the server stops cleanly");
    });
    TestApp {
        base: format!("http://127.0.0.1:{port}"),
        client: reqwest::Client::new(),
        db,
        stop: Some(stop),
        task: Some(task),
        _dir: dir,
    }
}

async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

async fn spawn_app_with(tweak: impl FnOnce(&mut Settings)) -> TestApp {
    let dir = tempfile::tempdir().expect("a temp dir");
    let db = dir.path().join("sub").join("ingest.db");
    spawn_app_at(db, Some(dir), tweak).await
}

fn event(device: &str, ts: i64) -> Value {
    json!({"deviceId": device, "ts": ts, "latitude": 37.77, "longitude": -122.41})
}

fn batch(device: &str, from: i64, len: i64) -> String {
    Value::Array((from..from + len).map(|ts| event(device, ts)).collect()).to_string()
}

async fn error_body(resp: reqwest::Response, status: StatusCode) -> Value {
    assert_eq!(resp.status(), status, "unexpected status");
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .expect("content-type is text")
            .starts_with("application/json"),
        "error bodies are JSON"
    );
    resp.json().await.expect("a JSON body")
}

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
async fn batch_with_one_bad_item_stores_nothing_and_names_item_and_field() {
    let app = spawn_app().await;
    let mut items: Vec<Value> = (0..3).map(|ts| event("d", ts)).collect();
    items[2]["longitude"] = json!(181);
    let body = error_body(
        app.post_batch(None, Value::Array(items).to_string()).await,
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert_eq!(body["field"], "longitude");
    assert_eq!(body["index"], 2);
    assert_eq!(app.total().await, 0);
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
async fn invalid_idempotency_key_is_refused() {
    let app = spawn_app().await;
    let body = error_body(
        app.post_batch(Some(&"k".repeat(300)), batch("d", 0, 1)).await,
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert_eq!(body["field"], "Idempotency-Key");
    assert_eq!(app.total().await, 0);
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
async fn bad_inputs_get_json_errors_naming_the_problem_and_store_nothing() {
    let app = spawn_app().await;
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
        let resp = app.post_json(path, body.clone()).await;
        let json = error_body(resp, StatusCode::BAD_REQUEST).await;
        assert_eq!(json["error"], code, "body {body}");
        assert!(!json["message"].as_str().expect("message is a string").is_empty());
    }
    let missing = error_body(
        app.post_json("/event", "{\"ts\":1,\"latitude\":0,\"longitude\":0}")
            .await,
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert_eq!(missing["field"], "deviceId");

    let empty = error_body(app.post_json("/event", "").await, StatusCode::BAD_REQUEST).await;
    assert_eq!(empty["error"], "empty_body");

    let text = app
        .client
        .post(format!("{}/event", app.base))
        .header("content-type", "text/plain")
        .body(event("d", 1).to_string())
        .send()
        .await
        .expect("the request is answered");
    let text = error_body(text, StatusCode::UNSUPPORTED_MEDIA_TYPE).await;
    assert_eq!(text["field"], "content-type");

    let no_type = app
        .client
        .post(format!("{}/events/batch", app.base))
        .body(batch("d", 0, 1))
        .send()
        .await
        .expect("the request is answered");
    assert_eq!(no_type.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);

    let bad_utf8 = app.post_json("/event", vec![b'{', 0xff, 0xfe, b'}']).await;
    assert_eq!(
        error_body(bad_utf8, StatusCode::BAD_REQUEST).await["error"],
        "malformed_json"
    );

    assert_eq!(app.total().await, 0);
}

#[tokio::test]
async fn body_and_batch_limits_answer_413() {
    let app = spawn_app_with(|s| {
        s.http.max_body_bytes = 4096;
        s.http.max_batch_len = 10;
    })
    .await;
    let big = app.post_batch(None, batch("d", 0, 100)).await; // ~7 KB
    assert_eq!(
        error_body(big, StatusCode::PAYLOAD_TOO_LARGE).await["error"],
        "body_too_large"
    );
    let long = app.post_batch(None, batch("d", 0, 11)).await;
    assert_eq!(
        error_body(long, StatusCode::PAYLOAD_TOO_LARGE).await["error"],
        "batch_too_large"
    );
    assert_eq!(
        app.post_batch(None, batch("d", 0, 10)).await.status(),
        StatusCode::CREATED
    );
    assert_eq!(app.total().await, 10);
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
        let page: Value = app
            .get(&format!("/events?after={after}&size=10"))
            .await
            .json()
            .await
            .expect("json");
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
    let numbered: Value = app
        .get("/events?page=2&size=10")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(ids(&numbered), (11..=20).collect::<Vec<_>>());
    assert_eq!(numbered["next"], 20, "numbered pages carry next too");
    let last: Value = app
        .get("/events?page=3&size=10")
        .await
        .json()
        .await
        .expect("json");
    assert!(last["next"].is_null());
    let past: Value = app.get("/events?after=25").await.json().await.expect("json");
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
    let p1: Value = app.get("/events?page=1&size=4").await.json().await.expect("json");
    assert_eq!(ids(&p1), vec![1, 2, 4, 5]);
    let p2: Value = app.get("/events?page=2&size=4").await.json().await.expect("json");
    assert_eq!(ids(&p2), vec![6, 7, 8, 9]);
    app.post_json("/event", event("d", 99).to_string()).await;
    assert_eq!(app.total().await, 10, "kept by the inserts from then on");
    let p3: Value = app.get("/events?page=3&size=4").await.json().await.expect("json");
    assert_eq!(ids(&p3), vec![10, 11]);
    assert_eq!(p3["hasMore"], false);
}

#[tokio::test]
async fn bad_page_parameters_get_400_naming_the_parameter() {
    let app = spawn_app().await;
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
        let body = error_body(
            app.get(&format!("/events?{query}")).await,
            StatusCode::BAD_REQUEST,
        )
        .await;
        assert_eq!(body["field"], field, "query {query}");
    }
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
