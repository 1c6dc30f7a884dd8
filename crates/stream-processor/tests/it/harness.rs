//! The test harness: the real test broker, processors as child processes (killed, stopped,
//! aborted at failpoints), and a real ingest-api over HTTP on a real SQLite file. Each test
//! uses its own topic, group, state files and database.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ingest_api::{Application, Settings as ApiSettings};
use load_generator::events::EventsClient;
use serde_json::json;
use test_support::{brokers, consume, create_topic, free_port, unique};
use tokio::sync::oneshot;

pub(crate) const PARTITIONS: i32 = 3;

/// The sink: ingest-api in-process on a fixed port, so it can be stopped and started again.
pub(crate) struct Sink {
    port: u16,
    db: PathBuf,
    /// The sink's `MAX_BATCH_LEN` (ingest-api's default when `None`).
    max_batch_len: Option<usize>,
    stop: Option<(oneshot::Sender<()>, tokio::task::JoinHandle<()>)>,
}

impl Sink {
    pub(crate) async fn start(port: u16, db: PathBuf) -> Sink {
        let mut s = Sink {
            port,
            db,
            max_batch_len: None,
            stop: None,
        };
        s.resume().await;
        s
    }

    pub(crate) async fn resume(&mut self) {
        let mut settings = ApiSettings::for_tests(self.db.clone());
        settings.http.port = self.port;
        if let Some(n) = self.max_batch_len {
            settings.http.max_batch_len = n;
        }
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
            .expect("the sink stops cleanly");
        });
        self.stop = Some((tx, task));
    }

    /// Restarts the sink with `MAX_BATCH_LEN` = `n`.
    pub(crate) async fn limit_batches(&mut self, n: usize) {
        self.pause().await;
        self.max_batch_len = Some(n);
        self.resume().await;
    }

    pub(crate) async fn pause(&mut self) {
        if let Some((tx, task)) = self.stop.take() {
            let _ = tx.send(());
            task.await.expect("the task ran to its end");
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("http://127.0.0.1:{}/events/batch", self.port)
    }

    /// Every stored event as (deviceId, ts), in insertion order.
    pub(crate) async fn events(&self) -> Vec<(String, i64)> {
        self.client()
            .all()
            .await
            .expect("read every stored event")
            .into_iter()
            .map(|e| (e.event.device_id, e.event.ts))
            .collect()
    }

    fn client(&self) -> EventsClient {
        EventsClient::new(&format!("http://127.0.0.1:{}", self.port))
    }

    /// Rows stored (0 while the sink is down).
    pub(crate) async fn count(&self) -> u64 {
        self.client().total().await.unwrap_or(0)
    }
}

/// One test's world: topic, dead-letter topic, group, sink, and any number of processors,
/// each by name with its own state file and log.
pub(crate) struct Harness {
    pub(crate) topic: String,
    pub(crate) dlq: String,
    pub(crate) group: String,
    pub(crate) partitions: i32,
    pub(crate) dir: tempfile::TempDir,
    keep: bool,
    pub(crate) sink: Sink,
    procs: HashMap<String, Child>,
    admin_ports: HashMap<String, u16>,
    /// Every run's log, by processor name, in start order.
    logs: Vec<(String, PathBuf)>,
}

/// The processor of single-processor tests.
pub(crate) const MAIN: &str = "main";

impl Harness {
    pub(crate) async fn new() -> Harness {
        Harness::with_partitions(PARTITIONS).await
    }

    pub(crate) async fn with_partitions(partitions: i32) -> Harness {
        let topic = unique("eo");
        let dlq = format!("{topic}-dlq");
        create_topic(&brokers(), &topic, partitions).await;
        create_topic(&brokers(), &dlq, partitions).await;
        let dir = tempfile::tempdir().expect("temp dir");
        let sink = Sink::start(free_port(), dir.path().join("sink.db")).await;
        Harness {
            topic,
            dlq,
            group: unique("group"),
            partitions,
            dir,
            sink,
            keep: std::env::var_os("TEST_KEEP_DIR").is_some(),
            procs: HashMap::new(),
            admin_ports: HashMap::new(),
            logs: Vec::new(),
        }
    }

    pub(crate) fn changelog(&self) -> String {
        format!("{}-{}-changelog", self.group, self.topic)
    }

    pub(crate) fn state_path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// The single-processor tests' processor: static member, state file `state.db`.
    pub(crate) fn start_processor(&mut self, env: &[(&str, String)]) {
        let id = format!("{}-member", self.group);
        self.start(MAIN, Some(&id), "state.db", env);
    }

    /// Starts processor `name`: static member `instance` (dynamic when `None`), state file
    /// `state` in the test's directory.
    pub(crate) fn start(&mut self, name: &str, instance: Option<&str>, state: &str, env: &[(&str, String)]) {
        assert!(
            !self.procs.contains_key(name),
            "processor {name} is already running"
        );
        let path = self.dir.path().join(format!("{name}-{}.log", self.logs.len()));
        let log = std::fs::File::create(&path).expect("create log");
        let admin_port = free_port();
        self.admin_ports.insert(name.to_owned(), admin_port);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_stream-processor"));
        cmd.env("KAFKA_BROKERS", brokers())
            .env("KAFKA_TOPIC", &self.topic)
            .env("DLQ_TOPIC", &self.dlq)
            .env("INGEST_URL", self.sink.url())
            .env("GROUP_ID", &self.group)
            .env("GROUP_INSTANCE_ID", instance.unwrap_or(""))
            .env("STATE_PATH", self.dir.path().join(state))
            .env("ADMIN_PORT", admin_port.to_string())
            .env("ADMIN_BIND_ADDR", "127.0.0.1")
            .env("TOPIC_PARTITIONS", self.partitions.to_string())
            .env("BATCH_SIZE", "200")
            .env("BATCH_LINGER_MS", "50")
            .env("IDLE_TIMEOUT_MS", "1500")
            .env("RETRY_BACKOFF_MAX_MS", "500")
            .env("RUST_LOG", "info")
            .stdout(Stdio::from(log.try_clone().expect("log handle")))
            .stderr(Stdio::from(log));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn stream-processor");
        self.procs.insert(name.to_owned(), child);
        self.logs.push((name.to_owned(), path));
    }

    /// The status code of the processor's `/readyz` (0 when it does not answer).
    pub(crate) async fn readyz(&self, name: &str) -> u16 {
        let port = self.admin_ports.get(name).copied().unwrap_or(0);
        match reqwest::get(format!("http://127.0.0.1:{port}/readyz")).await {
            Ok(r) => r.status().as_u16(),
            Err(_) => 0,
        }
    }

    /// The value of a gauge or counter on `name`'s `/metrics` (summed over its series), when it
    /// is there.
    pub(crate) async fn metric(&self, name: &str, metric: &str) -> Option<f64> {
        let port = self.admin_ports.get(name).copied().unwrap_or(0);
        let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        let values: Vec<f64> = text
            .lines()
            .filter(|l| l.starts_with(metric) && l[metric.len()..].starts_with(['{', ' ']))
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect();
        (!values.is_empty()).then(|| values.iter().sum())
    }

    /// Waits up to 20 s until `name`'s `/readyz` answers 503; `what` says why it should.
    pub(crate) async fn wait_unready(&self, name: &str, what: &str) {
        let start = Instant::now();
        while self.readyz(name).await != 503 {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "/readyz reports {what}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until `name`'s logs contain `needle` `times` times.
    pub(crate) async fn wait_log(&self, name: &str, needle: &str, times: usize, within: Duration) {
        let start = Instant::now();
        while self.log(name).matches(needle).count() < times {
            assert!(
                start.elapsed() < within,
                "{name} did not log {needle:?} {times} times within {within:?}; logs:\n{}",
                self.log_tails()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the latest run of `name` logged `needle`.
    pub(crate) async fn wait_run_log(&self, name: &str, needle: &str, within: Duration) {
        let start = Instant::now();
        while !self.run_logs(name).last().is_some_and(|l| l.contains(needle)) {
            assert!(
                start.elapsed() < within,
                "the latest run of {name} did not log {needle:?} within {within:?}; logs:\n{}",
                self.log_tails()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the sink holds at least `n` events.
    pub(crate) async fn wait_sink(&self, n: u64, within: Duration) {
        let start = Instant::now();
        while self.sink.count().await < n {
            assert!(
                start.elapsed() < within,
                "the sink did not reach {n} events within {within:?}; logs:\n{}",
                self.log_tails()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILL.
    pub(crate) fn kill(&mut self, name: &str) {
        if let Some(mut child) = self.procs.remove(name) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub(crate) fn kill_processor(&mut self) {
        self.kill(MAIN);
    }

    /// Sends a signal (TERM, STOP, CONT) to a running processor.
    pub(crate) fn signal(&self, name: &str, signal: &str) {
        let child = self
            .procs
            .get(name)
            .unwrap_or_else(|| panic!("processor {name} is not running"));
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {name}");
    }

    /// Waits for a processor to end by itself (a failpoint abort, SIGTERM, fencing).
    pub(crate) fn wait_exit(&mut self, name: &str, within: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < within {
            let child = self.procs.get_mut(name)?;
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.procs.remove(name);
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub(crate) fn wait_processor_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        self.wait_exit(MAIN, within)
    }

    /// The logs of every run of processor `name`, in start order.
    pub(crate) fn run_logs(&self, name: &str) -> Vec<String> {
        self.logs
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, p)| std::fs::read_to_string(p).unwrap_or_default())
            .collect()
    }

    /// Every run of `name` in one text.
    pub(crate) fn log(&self, name: &str) -> String {
        self.run_logs(name).join("\n")
    }

    /// Every processor's log, for failure messages.
    pub(crate) fn log_tails(&self) -> String {
        let mut out = String::new();
        for (name, path) in &self.logs {
            let log = std::fs::read_to_string(path).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(15)..];
            out.push_str(&format!("--- {name} ({})\n{}\n", path.display(), tail.join("\n")));
        }
        out
    }

    /// Waits until the sink holds `expected` events, then a little longer to see nothing more
    /// arrives; returns the sink's contents.
    pub(crate) async fn settle(&self, expected: usize, within: Duration) -> Vec<(String, i64)> {
        let start = Instant::now();
        loop {
            let n = self.sink.count().await as usize;
            if n >= expected {
                break;
            }
            if start.elapsed() > within {
                panic!(
                    "sink holds {n} of {expected} events after {within:?}; processor logs:\n{}",
                    self.log_tails()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tokio::time::sleep(Duration::from_millis(2500)).await;
        self.sink.events().await
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        let names: Vec<String> = self.procs.keys().cloned().collect();
        for name in names {
            // A stopped process must be continued to die promptly on some kernels.
            if let Some(child) = self.procs.get(&name) {
                let _ = Command::new("kill")
                    .arg("-CONT")
                    .arg(child.id().to_string())
                    .status();
            }
            self.kill(&name);
        }
        if self.keep || std::thread::panicking() {
            // Logs and state files stay for a look (TEST_KEEP_DIR=1, or on failure).
            let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("temp dir"));
            eprintln!("test files kept in {}", dir.keep().display());
        }
    }
}

pub(crate) fn payload(device: &str, ts: i64) -> Vec<u8> {
    // Coordinates derived from the identity, so a resend is an exact duplicate.
    json!({"deviceId": device, "ts": ts, "latitude": 37.0 + (ts % 1000) as f64 / 1e4, "longitude": -122.0 - (ts % 777) as f64 / 1e4})
        .to_string()
        .into_bytes()
}

/// A crafted stream: per device, distinct events 100 ms apart delivered with reordering within
/// 2 s (lateness is 5 s), exact duplicates, a few events 20 s too late, and invalid payloads.
pub(crate) struct Crafted {
    pub(crate) records: Vec<(Option<String>, Vec<u8>)>,
    pub(crate) expected: HashMap<String, Vec<i64>>,
    pub(crate) late: HashSet<(String, i64)>,
    pub(crate) invalid: usize,
}

pub(crate) fn crafted(devices: usize, per_device: i64, seed: u64) -> Crafted {
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
pub(crate) fn assert_exactly(stored: &[(String, i64)], expected: &HashMap<String, Vec<i64>>) {
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

/// The dead-letter topic holds the crafted stream's late and invalid events, each once: one
/// more is waited for, briefly, and must not come.
pub(crate) fn assert_only_late_and_invalid_dead_lettered_once(h: &Harness, c: &Crafted) {
    let expected = c.late.len() + c.invalid;
    let letters = consume(&brokers(), &h.dlq, expected + 1, Duration::from_secs(5));
    assert_eq!(
        letters.len(),
        expected,
        "the dead-letter topic holds each late and invalid event once, and nothing else"
    );
}

pub(crate) fn dead_letters(h: &Harness, expected: usize) -> Vec<(String, Vec<u8>)> {
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

/// Distinct events for `devices` devices, `n` in all, reordered within 2 s and with 5%
/// duplicates, as records in arrival order.
pub(crate) fn steady_stream(
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
