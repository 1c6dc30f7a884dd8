//! Sink benchmark: events/s through `POST /events/batch` (1000-event batches, sequential and
//! 4 concurrent clients) against the raw rusqlite insert rate of the same rows with the same
//! `synchronous` setting, in one run. Run with `scripts/bench-sink`.

use std::time::Instant;

use ingest_api::store::{insert_rows, open_connection, Synchronous, SCHEMA};
use ingest_api::{Application, Settings};
use telemetry_core::Event;

const BATCH: usize = 1000;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn make_batches(n: usize, salt: &str) -> Vec<Vec<Event>> {
    (0..n)
        .map(|b| {
            (0..BATCH)
                .map(|i| Event {
                    device_id: format!("{salt}-device-{}", i % 50),
                    ts: 1_700_000_000_000 + (b * BATCH + i) as i64,
                    latitude: 37.7749 + (i as f64) * 1e-5,
                    longitude: -122.4194 - (b as f64) * 1e-5,
                })
                .collect()
        })
        .collect()
}

async fn http_rate(base: &str, batches: Vec<Vec<Event>>, clients: usize, label: &str) -> f64 {
    let bodies: Vec<String> = batches
        .iter()
        .map(|b| serde_json::to_string(b).expect("a batch serializes"))
        .collect();
    let total_events = batches.len() * BATCH;
    let chunks: Vec<Vec<(usize, String)>> = {
        let mut c = vec![Vec::new(); clients];
        for (i, body) in bodies.into_iter().enumerate() {
            c[i % clients].push((i, body));
        }
        c
    };
    let start = Instant::now();
    let tasks: Vec<_> = chunks
        .into_iter()
        .map(|chunk| {
            let url = format!("{base}/events/batch");
            let label = label.to_owned();
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                for (i, body) in chunk {
                    let resp = client
                        .post(&url)
                        .header("content-type", "application/json")
                        .header("Idempotency-Key", format!("{label}-{i}"))
                        .body(body)
                        .send()
                        .await
                        .expect("request");
                    assert_eq!(resp.status(), 201, "batch refused");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("a client task ran to its end");
    }
    total_events as f64 / start.elapsed().as_secs_f64()
}

fn raw_rate(path: &std::path::Path, sync: Synchronous, batches: &[Vec<Event>]) -> f64 {
    let mut conn = open_connection(path, sync).expect("open the database");
    conn.execute_batch(SCHEMA).expect("create the schema");
    let start = Instant::now();
    for b in batches {
        let tx = conn.transaction().expect("begin a transaction");
        insert_rows(&tx, b, 0).expect("insert a batch");
        tx.commit().expect("commit a batch");
    }
    (batches.len() * BATCH) as f64 / start.elapsed().as_secs_f64()
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let n = env_usize("BENCH_BATCHES", 300);
    let dir = tempfile::tempdir_in(std::env::var("BENCH_DIR").unwrap_or_else(|_| ".".into()))
        .expect("a temp dir in BENCH_DIR");
    let settings = Settings::for_tests(dir.path().join("api.db"));
    let sync = settings.sqlite_synchronous;
    let app = Application::build(settings).await.expect("ingest-api starts");
    let base = format!("http://127.0.0.1:{}", app.port());
    tokio::spawn(app.run_until_stopped(std::future::pending()));

    println!(
        "bench-sink: {n} batches x {BATCH} events per measurement, synchronous={}",
        sync.pragma()
    );
    let raw_batches = make_batches(n, "raw");
    let raw = tokio::task::block_in_place(|| raw_rate(&dir.path().join("raw.db"), sync, &raw_batches));
    let seq = http_rate(&base, make_batches(n, "seq"), 1, "seq").await;
    let conc = http_rate(&base, make_batches(n, "conc"), 4, "conc").await;
    println!("raw rusqlite insert            {raw:>12.0} events/s");
    println!(
        "POST /events/batch, 1 client   {seq:>12.0} events/s  ({:.0}% of raw)",
        100.0 * seq / raw
    );
    println!(
        "POST /events/batch, 4 clients  {conc:>12.0} events/s  ({:.0}% of raw)",
        100.0 * conc / raw
    );
    println!("ratio_4_clients_to_raw={:.2} (target >= 0.75)", conc / raw);
}
