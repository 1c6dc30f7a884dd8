//! The exactly-once guarantee, end to end: the real test broker, the processor as a child
//! process (killed with SIGKILL or aborted at failpoints), and a real ingest-api over HTTP on a
//! real SQLite file. Each test uses its own topic, group, state store and database.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ingest_api::{Application, Settings as ApiSettings};
use serde_json::{json, Value};
use test_support::{brokers, consume, create_topic, free_port, produce, unique};
use tokio::sync::oneshot;

const PARTITIONS: i32 = 3;

/// The sink: ingest-api in-process on a fixed port, so it can be stopped and started again.
struct Sink {
    port: u16,
    db: PathBuf,
    stop: Option<(oneshot::Sender<()>, tokio::task::JoinHandle<()>)>,
}

impl Sink {
    async fn start(port: u16, db: PathBuf) -> Sink {
        let mut s = Sink { port, db, stop: None };
        s.resume().await;
        s
    }

    async fn resume(&mut self) {
        let mut settings = ApiSettings::for_tests(self.db.clone());
        settings.port = self.port;
        let start = Instant::now();
        let app = loop {
            match Application::build(settings.clone()).await {
                Ok(app) => break app,
                Err(e) => {
                    assert!(
                        start.elapsed() < Duration::from_secs(10),
                        "sink did not rebind: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            app.run_until_stopped(async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        self.stop = Some((tx, task));
    }

    async fn pause(&mut self) {
        if let Some((tx, task)) = self.stop.take() {
            let _ = tx.send(());
            task.await.unwrap();
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/events/batch", self.port)
    }

    /// Every stored event as (deviceId, ts), in insertion order.
    async fn events(&self) -> Vec<(String, i64)> {
        let client = reqwest::Client::new();
        let mut out = Vec::new();
        for page in 1.. {
            let url = format!("http://127.0.0.1:{}/events?page={page}&size=1000", self.port);
            let body: Value = client.get(url).send().await.unwrap().json().await.unwrap();
            let data = body["data"].as_array().unwrap();
            if data.is_empty() {
                break;
            }
            out.extend(data.iter().map(|e| {
                (
                    e["deviceId"].as_str().unwrap().to_owned(),
                    e["ts"].as_i64().unwrap(),
                )
            }));
        }
        out
    }

    async fn count(&self) -> u64 {
        let url = format!("http://127.0.0.1:{}/events?size=1", self.port);
        match reqwest::get(url).await {
            Ok(r) => r
                .json::<Value>()
                .await
                .map(|b| b["total"].as_u64().unwrap_or(0))
                .unwrap_or(0),
            Err(_) => 0,
        }
    }
}

/// One test's world: topic, dead-letter topic, group, state store, sink, processor.
struct Harness {
    topic: String,
    dlq: String,
    group: String,
    dir: tempfile::TempDir,
    sink: Sink,
    processor: Option<Child>,
    runs: usize,
}

impl Harness {
    async fn new() -> Harness {
        let topic = unique("eo");
        let dlq = format!("{topic}-dlq");
        create_topic(&brokers(), &topic, PARTITIONS).await;
        create_topic(&brokers(), &dlq, PARTITIONS).await;
        let dir = tempfile::tempdir().unwrap();
        let sink = Sink::start(free_port(), dir.path().join("sink.db")).await;
        Harness {
            topic,
            dlq,
            group: unique("group"),
            dir,
            sink,
            processor: None,
            runs: 0,
        }
    }

    fn log_path(&self, run: usize) -> PathBuf {
        self.dir.path().join(format!("processor-{run}.log"))
    }

    fn start_processor(&mut self, env: &[(&str, String)]) {
        assert!(self.processor.is_none(), "a processor is already running");
        self.runs += 1;
        let log = std::fs::File::create(self.log_path(self.runs)).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_stream-processor"));
        cmd.env("KAFKA_BROKERS", brokers())
            .env("KAFKA_TOPIC", &self.topic)
            .env("DLQ_TOPIC", &self.dlq)
            .env("INGEST_URL", self.sink.url())
            .env("GROUP_ID", &self.group)
            .env("GROUP_INSTANCE_ID", format!("{}-member", self.group))
            .env("STATE_PATH", self.dir.path().join("state.db"))
            .env("ADMIN_PORT", free_port().to_string())
            .env("ADMIN_BIND_ADDR", "127.0.0.1")
            .env("TOPIC_PARTITIONS", PARTITIONS.to_string())
            .env("BATCH_SIZE", "200")
            .env("BATCH_LINGER_MS", "50")
            .env("IDLE_TIMEOUT_MS", "1500")
            .env("RETRY_BACKOFF_MAX_MS", "500")
            .env("RUST_LOG", "info")
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log));
        for (k, v) in env {
            cmd.env(k, v);
        }
        self.processor = Some(cmd.spawn().expect("spawn stream-processor"));
    }

    fn kill_processor(&mut self) {
        if let Some(mut child) = self.processor.take() {
            let _ = child.kill(); // SIGKILL
            let _ = child.wait();
        }
    }

    /// Waits for the processor to end by itself (a failpoint abort); returns whether it did.
    fn wait_processor_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        let child = self.processor.as_mut()?;
        while start.elapsed() < within {
            if let Some(status) = child.try_wait().unwrap() {
                self.processor = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    fn processor_log(&self, run: usize) -> String {
        std::fs::read_to_string(self.log_path(run)).unwrap_or_default()
    }

    /// Waits until the sink holds `expected` events, then a little longer to see nothing more
    /// arrives; returns the sink's contents.
    async fn settle(&self, expected: usize, within: Duration) -> Vec<(String, i64)> {
        let start = Instant::now();
        loop {
            let n = self.sink.count().await as usize;
            if n >= expected {
                break;
            }
            if start.elapsed() > within {
                let log = self.processor_log(self.runs);
                let tail: String = log
                    .lines()
                    .rev()
                    .take(30)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join("\n");
                panic!("sink holds {n} of {expected} events after {within:?}; processor log tail:\n{tail}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tokio::time::sleep(Duration::from_millis(2500)).await;
        self.sink.events().await
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.kill_processor();
    }
}

fn payload(device: &str, ts: i64) -> Vec<u8> {
    // Coordinates derived from the identity, so a resend is an exact duplicate.
    json!({"deviceId": device, "ts": ts, "latitude": 37.0 + (ts % 1000) as f64 / 1e4, "longitude": -122.0 - (ts % 777) as f64 / 1e4})
        .to_string()
        .into_bytes()
}

/// A crafted stream: per device, distinct events 100 ms apart delivered with reordering within
/// 2 s (lateness is 5 s), exact duplicates, a few events 20 s too late, and invalid payloads.
struct Crafted {
    records: Vec<(Option<String>, Vec<u8>)>,
    expected: HashMap<String, Vec<i64>>,
    late: HashSet<(String, i64)>,
    invalid: usize,
}

fn crafted(devices: usize, per_device: i64, seed: u64) -> Crafted {
    let mut rng = seed.max(1);
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let base = 1_700_000_000_000i64;
    let mut arrivals: Vec<(i64, u64, Option<String>, Vec<u8>)> = Vec::new();
    let mut expected = HashMap::new();
    let mut late = HashSet::new();
    for d in 0..devices {
        let device = format!("device-{d}");
        let mut ts_list = Vec::new();
        for i in 0..per_device {
            let ts = base + i * 100 + d as i64;
            ts_list.push(ts);
            let delay = (next() % 2000) as i64;
            arrivals.push((ts - delay, next(), Some(device.clone()), payload(&device, ts)));
            if next() % 10 == 0 {
                let resend = ts - delay + (next() % 3000) as i64;
                arrivals.push((resend, next(), Some(device.clone()), payload(&device, ts)));
            }
            if i > 300 && i % 97 == 0 {
                // 20 s behind this arrival's event time: far below the watermark.
                let lts = ts - 20_000 + 50;
                late.insert((device.clone(), lts));
                arrivals.push((ts + 1, next(), Some(device.clone()), payload(&device, lts)));
            }
        }
        expected.insert(device, ts_list);
    }
    arrivals.sort_by_key(|a| (a.0, a.1));
    let mut records: Vec<(Option<String>, Vec<u8>)> = arrivals.into_iter().map(|a| (a.2, a.3)).collect();
    let bad: [&[u8]; 4] = [
        b"not json at all",
        br#"{"deviceId":"device-0","ts":"yesterday","latitude":0,"longitude":0}"#,
        br#"{"deviceId":"device-1","ts":5,"latitude":123,"longitude":0}"#,
        br#"[1,2,3]"#,
    ];
    let invalid = bad.len();
    for (i, b) in bad.iter().enumerate() {
        let at = (records.len() / (bad.len() + 1)) * (i + 1);
        records.insert(at, (Some(format!("device-{i}")), b.to_vec()));
    }
    Crafted {
        records,
        expected,
        late,
        invalid,
    }
}

/// The sink's contents are exactly the expected events, each device's in ts order.
fn assert_exactly(stored: &[(String, i64)], expected: &HashMap<String, Vec<i64>>) {
    let mut seen = HashSet::new();
    let dups: Vec<_> = stored
        .iter()
        .filter(|e| !seen.insert((*e).clone()))
        .take(5)
        .collect();
    assert!(dups.is_empty(), "duplicated in the sink, e.g. {dups:?}");
    let mut per_device: HashMap<&str, Vec<i64>> = HashMap::new();
    for (d, ts) in stored {
        per_device.entry(d.as_str()).or_default().push(*ts);
    }
    for (d, got) in &per_device {
        if let Some(w) = got.windows(2).find(|w| w[0] >= w[1]) {
            panic!("{d} out of order in the sink: {} then {}", w[0], w[1]);
        }
    }
    let total: usize = expected.values().map(Vec::len).sum();
    let missing: Vec<_> = expected
        .iter()
        .flat_map(|(d, ts)| ts.iter().map(move |t| (d.clone(), *t)))
        .filter(|k| !seen.contains(k))
        .take(5)
        .collect();
    assert!(missing.is_empty(), "missing from the sink, e.g. {missing:?}");
    assert_eq!(stored.len(), total, "sink holds events that were not expected");
}

fn dead_letters(h: &Harness, expected: usize) -> Vec<(String, Vec<u8>)> {
    consume(&brokers(), &h.dlq, expected, Duration::from_secs(20))
        .into_iter()
        .map(|m| {
            use rdkafka::message::{Headers, Message};
            let reason = m
                .headers()
                .and_then(|hs| {
                    hs.iter()
                        .find(|h| h.key == "reason")
                        .and_then(|h| h.value.map(|v| String::from_utf8_lossy(v).into_owned()))
                })
                .unwrap_or_default();
            (reason, m.payload().unwrap_or_default().to_vec())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crafted_stream_reaches_the_sink_exactly_once_in_order_with_late_and_invalid_in_the_dlq() {
    let mut h = Harness::new().await;
    let c = crafted(6, 700, 7);
    produce(&brokers(), &h.topic, &c.records).await;
    h.start_processor(&[]);
    let total: usize = c.expected.values().map(Vec::len).sum();
    let stored = h.settle(total, Duration::from_secs(90)).await;
    assert_exactly(&stored, &c.expected);

    let letters = dead_letters(&h, c.late.len() + c.invalid);
    let late: HashSet<(String, i64)> = letters
        .iter()
        .filter(|(r, _)| r == "late")
        .map(|(_, p)| {
            let v: Value = serde_json::from_slice(p).unwrap();
            (
                v["deviceId"].as_str().unwrap().to_owned(),
                v["ts"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(late, c.late, "late events in the dead-letter topic");
    assert_eq!(
        letters.iter().filter(|(r, _)| r == "invalid").count(),
        c.invalid,
        "invalid payloads in the dead-letter topic"
    );
}

async fn failpoint_scenario(step: &str, hit: u64) {
    let mut h = Harness::new().await;
    let c = crafted(4, 500, 11);
    produce(&brokers(), &h.topic, &c.records).await;
    h.start_processor(&[("FAILPOINT", step.to_owned()), ("FAILPOINT_HIT", hit.to_string())]);
    let status = h
        .wait_processor_exit(Duration::from_secs(90))
        .expect("processor did not reach the failpoint");
    assert!(!status.success(), "processor should have aborted at {step}");
    assert!(
        h.processor_log(1)
            .contains(&format!("failpoint {step}: aborting")),
        "abort was not at {step}"
    );
    h.start_processor(&[]);
    let total: usize = c.expected.values().map(Vec::len).sum();
    let stored = h.settle(total, Duration::from_secs(90)).await;
    assert_exactly(&stored, &c.expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_after_consume_before_checkpoint_then_restart_gives_identical_sink() {
    failpoint_scenario("after_consume_before_checkpoint", 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_after_checkpoint_before_post_then_restart_gives_identical_sink() {
    failpoint_scenario("after_checkpoint_before_post", 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_after_post_before_ack_recorded_then_restart_gives_identical_sink() {
    failpoint_scenario("after_post_before_ack_recorded", 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_after_changelog_commit_before_cache_then_restart_gives_identical_sink() {
    failpoint_scenario("after_changelog_commit_before_cache", 3).await;
}

/// Distinct events for `devices` devices, `n` in all, reordered within 2 s and with 5%
/// duplicates, as records in arrival order.
fn steady_stream(
    devices: usize,
    n: usize,
    seed: u64,
) -> (Vec<(Option<String>, Vec<u8>)>, HashMap<String, Vec<i64>>) {
    let per_device = (n / devices) as i64;
    let mut rng = seed.max(1);
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut arrivals = Vec::new();
    let mut expected = HashMap::new();
    for d in 0..devices {
        let device = format!("steady-{d}");
        let mut list = Vec::new();
        for i in 0..per_device {
            let ts = 1_700_000_000_000 + i * 10;
            list.push(ts);
            let arrive = ts
                - if next() % 10 == 0 {
                    (next() % 2000) as i64
                } else {
                    0
                };
            arrivals.push((arrive, next(), device.clone(), ts));
            if next() % 20 == 0 {
                arrivals.push((arrive + (next() % 1000) as i64, next(), device.clone(), ts));
            }
        }
        expected.insert(device, list);
    }
    arrivals.sort_by_key(|a| (a.0, a.1));
    (
        arrivals
            .into_iter()
            .map(|(_, _, d, ts)| (Some(d.clone()), payload(&d, ts)))
            .collect(),
        expected,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_random_kills_during_a_100k_event_stream_lose_and_duplicate_nothing() {
    let mut h = Harness::new().await;
    let (records, expected) = steady_stream(8, 100_000, 42);
    let topic = h.topic.clone();
    // About 20 s of production at a steady rate, while the processor is killed and restarted.
    let producer = tokio::spawn(async move {
        for chunk in records.chunks(1000) {
            produce(&brokers(), &topic, chunk).await;
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    });
    h.start_processor(&[]);
    let mut rng = 99u64;
    let mut kills = 0;
    while kills < 10 {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        tokio::time::sleep(Duration::from_millis(800 + (rng >> 33) % 1700)).await;
        h.kill_processor();
        kills += 1;
        h.start_processor(&[]);
    }
    producer.await.unwrap();
    let total: usize = expected.values().map(Vec::len).sum();
    let stored = h.settle(total, Duration::from_secs(180)).await;
    assert_exactly(&stored, &expected);
    // Restarted processors got their partitions back at once (static membership).
    let mut times = Vec::new();
    for run in 2..=h.runs {
        let log = h.processor_log(run);
        if let Some(line) = log
            .lines()
            .find(|l| l.contains("first batch delivered since start"))
        {
            let secs: f64 = line
                .split("seconds=")
                .nth(1)
                .and_then(|s| s.split_whitespace().next())
                .and_then(|s| s.parse().ok())
                .unwrap_or(f64::NAN);
            times.push(secs);
        }
    }
    eprintln!("restart-to-first-batch seconds: {times:?}");
    assert!(times.len() >= 5, "most restarts delivered a batch: {times:?}");
    assert!(
        times.iter().all(|t| *t < 15.0),
        "a restart waited too long for its first batch: {times:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_down_for_seconds_mid_stream_loses_and_duplicates_nothing() {
    let mut h = Harness::new().await;
    let (records, expected) = steady_stream(5, 20_000, 5);
    let (first, second) = records.split_at(records.len() / 2);
    produce(&brokers(), &h.topic, first).await;
    h.start_processor(&[]);
    let start = Instant::now();
    while h.sink.count().await < 2_000 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "processor delivered nothing"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    h.sink.pause().await;
    produce(&brokers(), &h.topic, second).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    h.sink.resume().await;
    let total: usize = expected.values().map(Vec::len).sum();
    let stored = h.settle(total, Duration::from_secs(120)).await;
    assert_exactly(&stored, &expected);
    assert!(
        h.processor_log(1).contains("sink request failed, retrying"),
        "the outage was noticed and retried"
    );
}
