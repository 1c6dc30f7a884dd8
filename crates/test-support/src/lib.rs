//! Helpers for integration tests that need the real test broker: finding or starting it,
//! private brokers that a test may stop, unique names, and reading a topic back; and for the
//! HTTP services: the hostile-input cases (`hostile`), calling a router without a socket
//! (`oneshot`) and running a service binary (`cli`).

pub mod cli;
pub mod hostile;
pub mod oneshot;

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rand::Rng;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};

/// The repository root (two levels above this crate).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repo root exists")
}

/// The shared test broker: `KAFKA_BROKERS` when set (scripts/test sets it), otherwise the one
/// `scripts/broker start` runs (started on first use, left running for later test binaries).
pub fn brokers() -> String {
    static BROKERS: OnceLock<String> = OnceLock::new();
    BROKERS
        .get_or_init(|| match std::env::var("KAFKA_BROKERS") {
            Ok(b) if !b.trim().is_empty() => b,
            _ => run_broker_script("start", None, None).expect("scripts/broker start failed"),
        })
        .clone()
}

fn run_broker_script(
    action: &str,
    port: Option<u16>,
    data: Option<&std::path::Path>,
) -> Result<String, String> {
    let mut cmd = Command::new(repo_root().join("scripts/broker"));
    cmd.arg(action);
    if let Some(p) = port {
        cmd.env("BROKER_PORT", p.to_string());
    }
    if let Some(d) = data {
        cmd.env("BROKER_DATA", d);
    }
    let out = cmd.output().map_err(|e| format!("running scripts/broker: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "scripts/broker {action}: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .trim()
        .lines()
        .last()
        .unwrap_or("")
        .to_owned())
}

/// A broker of a test's own, on a free port with its own data directory, so the test may stop
/// and restart it without disturbing others. Stopped on drop.
#[derive(Debug)]
pub struct PrivateBroker {
    pub port: u16,
    data: tempfile_dir::Dir,
}

mod tempfile_dir {
    /// A directory removed on drop.
    #[derive(Debug)]
    pub(crate) struct Dir(pub(crate) std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl PrivateBroker {
    pub fn start() -> PrivateBroker {
        let port = free_port();
        let dir = repo_root()
            .join(".local")
            .join(format!("test-broker-{port}-{}", unique("d")));
        std::fs::create_dir_all(&dir).expect("create broker data dir");
        let b = PrivateBroker {
            port,
            data: tempfile_dir::Dir(dir),
        };
        b.resume();
        b
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Stops the broker process (its data stays).
    pub fn stop(&self) {
        run_broker_script("stop", Some(self.port), Some(&self.data.0)).expect("stop private broker");
    }

    /// Starts it again on the same port and data directory.
    pub fn resume(&self) {
        run_broker_script("start", Some(self.port), Some(&self.data.0)).expect("start private broker");
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        let _ = run_broker_script("stop", Some(self.port), Some(&self.data.0));
    }
}

/// A TCP port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind port 0")
        .local_addr()
        .expect("a bound socket has an address")
        .port()
}

/// How tests reach `brokers`: with the security settings of the environment
/// (`KAFKA_SECURITY_PROTOCOL`, `KAFKA_SASL_*`, `KAFKA_SSL_*`, `KAFKA_OPTIONS`; plaintext when
/// unset), so the suite runs against a secured cluster too.
pub fn connection(brokers: &str) -> service_common::kafka::Connection {
    service_common::kafka::connection_from_env(brokers).expect("the connection settings of the environment")
}

/// A name no other test run uses: `prefix-<random>`.
pub fn unique(prefix: &str) -> String {
    let n: u64 = rand::rng().random();
    format!("{prefix}-{n:016x}")
}

/// A reader of the whole topic from the beginning, without a consumer group (so no join delay).
pub fn reader(brokers: &str, topic: &str) -> BaseConsumer {
    let consumer: BaseConsumer =
        service_common::kafka::manual_consumer(&connection(brokers), &unique("test-reader"))
            .create()
            .expect("consumer");
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("topic metadata");
    let mut tpl = TopicPartitionList::new();
    for t in md.topics().iter().filter(|t| t.name() == topic) {
        for p in t.partitions() {
            tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
                .expect("add partition");
        }
    }
    assert!(tpl.count() > 0, "topic {topic} has no partitions");
    consumer.assign(&tpl).expect("assign");
    consumer
}

/// Reads `topic` from the beginning until `expected` messages arrived or `timeout` passed.
pub fn consume(brokers: &str, topic: &str, expected: usize, timeout: Duration) -> Vec<OwnedMessage> {
    let consumer = reader(brokers, topic);
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    while out.len() < expected && Instant::now() < deadline {
        if let Some(result) = consumer.poll(Duration::from_millis(200)) {
            out.push(result.expect("consume error").detach());
        }
    }
    out
}

/// Reads `topic` from the beginning until nothing arrived for `quiet` (for "nothing more").
pub fn consume_until_quiet(brokers: &str, topic: &str, quiet: Duration) -> Vec<OwnedMessage> {
    let consumer = reader(brokers, topic);
    let mut last = Instant::now();
    let mut out = Vec::new();
    while last.elapsed() < quiet {
        if let Some(result) = consumer.poll(Duration::from_millis(100)) {
            out.push(result.expect("consume error").detach());
            last = Instant::now();
        }
    }
    out
}

/// The message payload as JSON.
pub fn payload_json(msg: &OwnedMessage) -> serde_json::Value {
    serde_json::from_slice(msg.payload().expect("payload")).expect("payload is JSON")
}

/// The message key as text.
pub fn key_str(msg: &OwnedMessage) -> String {
    String::from_utf8(msg.key().expect("key").to_vec()).expect("utf-8 key")
}

/// Creates a topic with `partitions` partitions (fine if it exists).
pub async fn create_topic(brokers: &str, topic: &str, partitions: i32) {
    service_common::kafka::ensure_topic(&connection(brokers), topic, partitions, 1)
        .await
        .expect("create topic");
}

/// Produces keyed raw payloads in order (idempotent, acks=all, murmur2 like the proxy), waiting
/// for every acknowledgement.
pub async fn produce(brokers: &str, topic: &str, records: &[(Option<String>, Vec<u8>)]) {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = service_common::kafka::idempotent_producer(&connection(brokers))
        .set("linger.ms", "5")
        .create()
        .expect("producer");
    let mut waits = Vec::with_capacity(records.len());
    for (key, payload) in records {
        let mut record = FutureRecord::to(topic).payload(payload);
        if let Some(k) = key {
            record = record.key(k);
        }
        waits.push(producer.send_result(record).map_err(|(e, _)| e).expect("enqueue"));
    }
    for w in futures::future::join_all(waits).await {
        w.expect("delivery canceled").expect("delivery failed");
    }
}
