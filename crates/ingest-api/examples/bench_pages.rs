//! Read benchmark: `GET /events` on a large table (default 2,000,000 rows) through real HTTP:
//! page 1, a middle page and the last page by number, and the last keyset page (`after=`),
//! each read many times; prints the median and p99 in milliseconds, and what one full count
//! of the table costs (what every page paid before the row count was kept). Run with
//! `scripts/bench-pages`.

use std::time::{Duration, Instant};

use ingest_api::store::{insert_rows, open_connection, SCHEMA};
use ingest_api::{Application, Settings};
use telemetry_core::Event;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Fills the table with `rows` events in transactions of 10,000.
fn fill(path: &std::path::Path, sync: ingest_api::store::Synchronous, rows: u64) {
    let mut conn = open_connection(path, sync).expect("open database");
    conn.execute_batch(SCHEMA).expect("schema");
    let mut done = 0u64;
    while done < rows {
        let n = (rows - done).min(10_000);
        let events: Vec<Event> = (done..done + n)
            .map(|i| Event {
                device_id: format!("device-{}", i % 1000),
                ts: 1_700_000_000_000 + i as i64,
                latitude: 37.7749 + (i % 1000) as f64 * 1e-5,
                longitude: -122.4194,
            })
            .collect();
        let tx = conn.transaction().expect("transaction");
        insert_rows(&tx, &events, 0).expect("insert");
        tx.commit().expect("commit");
        done += n;
    }
}

async fn measure(client: &reqwest::Client, url: &str, reads: usize, expect_rows: usize) -> (f64, f64) {
    let mut times = Vec::with_capacity(reads);
    for _ in 0..reads {
        let start = Instant::now();
        let resp = client.get(url).send().await.expect("request");
        assert_eq!(resp.status(), 200, "{url}");
        let body: serde_json::Value = resp.json().await.expect("json");
        times.push(start.elapsed());
        let rows = body["data"].as_array().map_or(0, Vec::len);
        assert_eq!(rows, expect_rows, "{url}: rows");
    }
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    (
        ms(times[times.len() / 2]),
        ms(times[(times.len() * 99).div_ceil(100) - 1]),
    )
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let rows = env_u64("BENCH_ROWS", 2_000_000);
    let size = env_u64("BENCH_PAGE_SIZE", 100);
    let reads = env_u64("BENCH_READS", 200) as usize;
    let dir =
        tempfile::tempdir_in(std::env::var("BENCH_DIR").unwrap_or_else(|_| ".".into())).expect("temp dir");
    let db = dir.path().join("pages.db");
    let settings = Settings::for_tests(db.clone());
    let start = Instant::now();
    fill(&db, settings.sqlite_synchronous, rows);
    println!(
        "bench-pages: {rows} rows written in {:.1} s; {reads} reads of size={size} each",
        start.elapsed().as_secs_f64()
    );

    let count_start = Instant::now();
    let conn = open_connection(&db, settings.sqlite_synchronous).expect("open database");
    let counted: i64 = conn
        .query_row("SELECT COUNT(*) FROM events", [], |r| r.get(0))
        .expect("count");
    let count_ms = count_start.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(counted as u64, rows);

    let app = Application::build(settings).await.expect("ingest-api starts");
    let base = format!("http://127.0.0.1:{}/events", app.port());
    tokio::spawn(app.run_until_stopped(std::future::pending()));
    let client = reqwest::Client::new();
    let pages = rows.div_ceil(size);
    let last_len = (rows - (pages - 1) * size) as usize;
    let cases = [
        ("page 1", format!("{base}?page=1&size={size}"), size as usize),
        (
            "middle page",
            format!("{base}?page={}&size={size}", pages / 2),
            size as usize,
        ),
        ("last page", format!("{base}?page={pages}&size={size}"), last_len),
        (
            "last keyset page",
            format!("{base}?after={}&size={size}", (pages - 1) * size),
            last_len,
        ),
    ];
    for (label, url, expect) in &cases {
        let (p50, p99) = measure(&client, url, reads, *expect).await;
        println!("{label:<18} p50_ms={p50:.2} p99_ms={p99:.2}");
    }
    println!("for reference: one SELECT COUNT(*) over the table takes {count_ms:.1} ms (what every read paid before)");
}
