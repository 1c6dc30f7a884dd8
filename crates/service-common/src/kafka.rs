//! Kafka helpers shared by the proxy and the processor: the one place every client's
//! configuration starts from ([`Connection`]), so no client role can miss the connection
//! settings or the pass-through options.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::{ClientConfig, FromClientConfig, FromClientConfigAndContext};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};

use crate::settings::KafkaArgs;

/// How every client reaches the brokers: `bootstrap.servers`, the security settings and the
/// pass-through options of [`KafkaArgs`], resolved once (the SASL password read from its file).
#[derive(Clone)]
pub struct Connection {
    brokers: String,
    /// (key, value, secret), security settings first, pass-through options last.
    settings: Arc<[(String, String, bool)]>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let settings: Vec<String> = self
            .settings
            .iter()
            .map(|(k, v, secret)| {
                if *secret {
                    format!("{k}=<redacted>")
                } else {
                    format!("{k}={v}")
                }
            })
            .collect();
        f.debug_struct("Connection")
            .field("brokers", &self.brokers)
            .field("settings", &settings)
            .finish()
    }
}

impl KafkaArgs {
    /// The connection these settings describe; an error names the variable.
    pub fn connection(&self) -> Result<Connection, String> {
        let settings = self.security_settings()?;
        // librdkafka checks every property and value now, so a wrong one stops the service at
        // start, not at the first client it builds (the value is not shown: it may be secret).
        let mut probe = ClientConfig::new();
        for (key, value, _) in &settings {
            probe.set(key, value);
        }
        if let Err(e) = probe.create_native_config() {
            return Err(match e {
                KafkaError::ClientConfig(_, description, key, value) => {
                    let variable = if self.options.iter().any(|o| o.key == key) {
                        "KAFKA_OPTIONS"
                    } else {
                        "the Kafka settings"
                    };
                    let description = if value.is_empty() {
                        description
                    } else {
                        description.replace(&value, "<value>")
                    };
                    format!("{variable}: {key}: {description}")
                }
                other => format!("the Kafka settings: {other}"),
            });
        }
        Ok(Connection {
            brokers: self.brokers.clone(),
            settings: settings.into(),
        })
    }
}

/// The connection to `brokers` with the security settings of the process environment
/// (`KAFKA_SECURITY_PROTOCOL`, `KAFKA_SASL_*`, `KAFKA_SSL_*`, `KAFKA_OPTIONS`), for tools and
/// tests that take their broker address elsewhere.
pub fn connection_from_env(brokers: &str) -> Result<Connection, String> {
    let mut args = kafka_args_from_env()?;
    args.brokers = brokers.to_owned();
    args.connection()
}

/// The Kafka settings of the process environment alone (no command line).
pub fn kafka_args_from_env() -> Result<KafkaArgs, String> {
    #[derive(clap::Parser)]
    struct FromEnv {
        #[command(flatten)]
        kafka: KafkaArgs,
    }
    <FromEnv as clap::Parser>::try_parse_from(["connection"])
        .map(|a| a.kafka)
        .map_err(|e| e.to_string())
}

impl Connection {
    /// Plaintext to `brokers`, nothing else (tests, benchmarks).
    pub fn plaintext(brokers: &str) -> Connection {
        Connection {
            brokers: brokers.to_owned(),
            settings: Arc::new([]),
        }
    }

    pub fn brokers(&self) -> &str {
        &self.brokers
    }

    /// The base of every client's configuration: the brokers and the security settings now;
    /// the pass-through options when the client is created, after the caller's own settings.
    pub fn config(&self) -> KafkaConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        let mut options = Vec::new();
        for (key, value, _) in self.settings.iter() {
            if is_security_key(key) {
                config.set(key, value);
            } else {
                options.push((key.clone(), value.clone()));
            }
        }
        KafkaConfig {
            config,
            options: options.into(),
            secrets: self
                .settings
                .iter()
                .filter(|s| s.2)
                .map(|s| s.0.clone())
                .collect(),
        }
    }

    /// An admin client's configuration (topic creation, offsets).
    pub fn admin(&self) -> KafkaConfig {
        let mut c = self.config();
        c.set("socket.connection.setup.timeout.ms", "5000");
        c
    }
}

/// Names librdkafka reads as one property.
const ALIASES: &[&[&str]] = &[
    &["linger.ms", "queue.buffering.max.ms"],
    &["compression.type", "compression.codec"],
    &["message.timeout.ms", "delivery.timeout.ms"],
    &["max.in.flight.requests.per.connection", "max.in.flight"],
];

fn same_property(a: &str, b: &str) -> bool {
    let strip = |k: &str| k.strip_prefix("topic.").unwrap_or(k).to_owned();
    let (a, b) = (strip(a), strip(b));
    a == b
        || ALIASES
            .iter()
            .any(|g| g.contains(&a.as_str()) && g.contains(&b.as_str()))
}

fn is_security_key(key: &str) -> bool {
    key == "security.protocol" || key.starts_with("sasl.") || key.starts_with("ssl.")
}

/// A client configuration from a [`Connection`]: `set` as on rdkafka's `ClientConfig`, and
/// `create` applies the pass-through options last. Its `Debug` never shows a secret.
#[derive(Clone)]
pub struct KafkaConfig {
    config: ClientConfig,
    options: Arc<[(String, String)]>,
    secrets: Vec<String>,
}

impl std::fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut keys: Vec<String> = self
            .finished()
            .config_map()
            .iter()
            .map(|(k, v)| {
                if self.secrets.iter().any(|s| s == k) {
                    format!("{k}=<redacted>")
                } else {
                    format!("{k}={v}")
                }
            })
            .collect();
        keys.sort();
        f.debug_list().entries(keys).finish()
    }
}

impl KafkaConfig {
    pub fn set<K: Into<String>, V: Into<String>>(&mut self, key: K, value: V) -> &mut KafkaConfig {
        self.config.set(key, value);
        self
    }

    /// A property as the client will get it (pass-through options included).
    pub fn get(&self, key: &str) -> Option<String> {
        self.finished().get(key).map(str::to_owned)
    }

    /// The configuration as the client gets it: the pass-through options applied last, each
    /// replacing what the project set for the same property under another of its names (librdkafka
    /// would take whichever it met first).
    fn finished(&self) -> ClientConfig {
        let mut c = self.config.clone();
        for (k, v) in self.options.iter() {
            let same: Vec<String> = c
                .config_map()
                .keys()
                .filter(|p| **p != k.as_str() && same_property(p, k))
                .map(|p| (*p).to_owned())
                .collect();
            for p in same {
                c.remove(&p);
            }
            c.set(k, v);
        }
        c
    }

    pub fn create<T: FromClientConfig>(&self) -> KafkaResult<T> {
        self.finished().create()
    }

    pub fn create_with_context<C: ClientContext, T: FromClientConfigAndContext<C>>(
        &self,
        context: C,
    ) -> KafkaResult<T> {
        self.finished().create_with_context(context)
    }
}

/// The producer every writer of events and state starts from (the proxy, the processor's
/// checkpoint writers, the tests and the benchmarks): idempotent, `acks=all`, and murmur2 on the
/// key, so a device lands on the partition Java clients and Redpanda tools pick for it. Callers
/// add only tuning (linger, batch sizes, timeouts).
pub fn idempotent_producer(conn: &Connection) -> KafkaConfig {
    let mut c = conn.config();
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("partitioner", "murmur2_random")
        .set("compression.type", "lz4");
    c
}

/// Destroys a librdkafka client on a thread of its own. Destroying one waits for its threads to
/// end (an admin client's poller wakes every 100 ms), which start-up and restores need not wait
/// for.
pub fn drop_in_background<T: Send + 'static>(client: T) {
    // If no thread can be started, the closure and the client are dropped right here.
    let _ = std::thread::Builder::new()
        .name("kafka-client-drop".into())
        .spawn(move || drop(client));
}

/// A transactional producer: [`idempotent_producer`] with a `transactional.id`, whose
/// `init_transactions` fences every earlier producer with the same id.
pub fn transactional_producer(conn: &Connection, transactional_id: &str) -> KafkaConfig {
    let mut c = idempotent_producer(conn);
    c.set("transactional.id", transactional_id);
    c
}

/// A consumer that commits nothing by itself (offsets go with the processor's transactions, or
/// nowhere), reads only committed records from the earliest offset, and accepts fetch answers
/// larger than it asked for (the test broker answers a fetch with everything it has). Callers
/// add group membership and fetch tuning.
pub fn manual_consumer(conn: &Connection, group: &str) -> KafkaConfig {
    let mut c = conn.config();
    c.set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .set("receive.message.max.bytes", "1073741824");
    c
}

/// A client context that keeps the first error librdkafka reported for the client (a refused
/// authentication, a TLS handshake that failed), so an operation that only times out can say
/// why.
#[derive(Debug, Clone, Default)]
pub struct Noted {
    last: Arc<std::sync::Mutex<Option<String>>>,
}

impl Noted {
    pub fn last_error(&self) -> Option<String> {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl ClientContext for Noted {
    fn error(&self, error: KafkaError, reason: &str) {
        // The first is the cause ("all brokers down" follows it).
        let mut first = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if first.is_none() {
            *first = Some(format!("{error}: {reason}"));
        }
    }
}

impl rdkafka::producer::ProducerContext for Noted {
    type DeliveryOpaque = ();

    fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, _: ()) {}
}

/// What a client connecting with `conn` reports within `within`, when anything: an admin
/// operation that cannot reach the brokers only times out, while a client that is polled hears
/// why (authentication refused, TLS handshake failed, ...).
pub fn diagnose(conn: &Connection, within: Duration) -> Option<String> {
    use rdkafka::producer::{BaseProducer, Producer};
    let noted = Noted::default();
    let probe: BaseProducer<Noted> = conn.config().create_with_context(noted.clone()).ok()?;
    let deadline = std::time::Instant::now() + within;
    while noted.last_error().is_none() && std::time::Instant::now() < deadline {
        probe.poll(Duration::from_millis(100));
        if probe
            .client()
            .fetch_metadata(None, Duration::from_millis(100))
            .is_ok()
        {
            break;
        }
    }
    drop_in_background(probe);
    noted.last_error()
}

/// A topic could not be created or found; `cause` is what the client last reported, when
/// anything (the broker's answer alone may be only a timeout).
#[derive(Debug)]
pub struct TopicError {
    pub error: KafkaError,
    pub cause: Option<String>,
}

impl std::fmt::Display for TopicError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.cause {
            Some(cause) => write!(f, "{} (client error: {cause})", self.error),
            None => write!(f, "{}", self.error),
        }
    }
}

impl std::error::Error for TopicError {}

/// Creates `topic` with `partitions` partitions; an existing topic is fine (its partition
/// count is left as it is).
pub async fn ensure_topic(
    conn: &Connection,
    topic: &str,
    partitions: i32,
    replication: i32,
) -> Result<(), TopicError> {
    ensure_topic_with_config(conn, topic, partitions, replication, &[]).await
}

/// As [`ensure_topic`], with topic configuration (`retention.ms`, ...) for a new topic.
pub async fn ensure_topic_with_config(
    conn: &Connection,
    topic: &str,
    partitions: i32,
    replication: i32,
    configs: &[(&str, &str)],
) -> Result<(), TopicError> {
    let fail = |error| TopicError {
        error,
        cause: diagnose(conn, Duration::from_secs(2)),
    };
    let admin: AdminClient<DefaultClientContext> = conn.admin().create().map_err(fail)?;
    let mut new_topic = NewTopic::new(topic, partitions, TopicReplication::Fixed(replication));
    for (k, v) in configs {
        new_topic = new_topic.set(k, v);
    }
    let opts = AdminOptions::new()
        .request_timeout(Some(Duration::from_secs(5)))
        .operation_timeout(Some(Duration::from_secs(5)));
    let results = admin.create_topics([&new_topic], &opts).await;
    drop_in_background(admin);
    for result in results.map_err(fail)? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => return Err(fail(KafkaError::AdminOp(code))),
        }
    }
    Ok(())
}

/// Creates `topic` when missing with the partitions and replication every service shares
/// (`TOPIC_PARTITIONS`, `TOPIC_REPLICATION`), retrying until the broker answers.
pub async fn ensure_shared_topic(kafka: &KafkaArgs, conn: &Connection, topic: &str) {
    ensure_topic_with_retry(conn, topic, kafka.partitions, kafka.replication).await
}

/// Retries `ensure_topic` with capped backoff until it succeeds (for start-up while the broker
/// is still coming up).
pub async fn ensure_topic_with_retry(conn: &Connection, topic: &str, partitions: i32, replication: i32) {
    ensure_topic_with_config_retry(conn, topic, partitions, replication, &[]).await
}

/// Retries `ensure_topic_with_config` with capped backoff until it succeeds.
pub async fn ensure_topic_with_config_retry(
    conn: &Connection,
    topic: &str,
    partitions: i32,
    replication: i32,
    configs: &[(&str, &str)],
) {
    let mut delay = Duration::from_millis(200);
    loop {
        match ensure_topic_with_config(conn, topic, partitions, replication, configs).await {
            Ok(()) => {
                tracing::info!(topic, partitions, "topic ready");
                return;
            }
            Err(e) => {
                tracing::warn!(topic, error = %e, retry_in_ms = delay.as_millis() as u64, "topic not ready");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secured() -> Connection {
        Connection {
            brokers: "broker:9093".into(),
            settings: vec![
                ("security.protocol".to_owned(), "sasl_ssl".to_owned(), false),
                ("sasl.mechanism".to_owned(), "SCRAM-SHA-256".to_owned(), false),
                ("sasl.username".to_owned(), "user".to_owned(), false),
                ("sasl.password".to_owned(), "sekrit-2".to_owned(), true),
                ("ssl.ca.location".to_owned(), "/ca.pem".to_owned(), false),
                ("socket.keepalive.enable".to_owned(), "true".to_owned(), false),
                ("linger.ms".to_owned(), "50".to_owned(), false),
                ("topic.compression.codec".to_owned(), "zstd".to_owned(), false),
            ]
            .into(),
        }
    }

    /// Every client role the project builds, each from the one connection.
    fn roles(conn: &Connection) -> Vec<(&'static str, KafkaConfig)> {
        let mut tuned = idempotent_producer(conn);
        tuned.set("linger.ms", "5");
        vec![
            ("proxy producer, tests' and benchmarks' producers", tuned),
            (
                "checkpoint writer (changelog, dead letters, offsets)",
                transactional_producer(conn, "g-t-0"),
            ),
            (
                "group consumer, restore consumer, dead-letter reader",
                manual_consumer(conn, "g"),
            ),
            ("admin client (topics)", conn.admin()),
            ("admin client (offsets, metadata)", conn.config()),
        ]
    }

    #[test]
    fn every_client_role_carries_the_connection_settings_and_the_options_last() {
        let conn = secured();
        for (role, config) in roles(&conn) {
            assert_eq!(
                config.get("bootstrap.servers").as_deref(),
                Some("broker:9093"),
                "{role}"
            );
            assert_eq!(
                config.get("security.protocol").as_deref(),
                Some("sasl_ssl"),
                "{role}"
            );
            assert_eq!(
                config.get("sasl.mechanism").as_deref(),
                Some("SCRAM-SHA-256"),
                "{role}"
            );
            assert_eq!(config.get("sasl.username").as_deref(), Some("user"), "{role}");
            assert_eq!(config.get("sasl.password").as_deref(), Some("sekrit-2"), "{role}");
            assert_eq!(
                config.get("ssl.ca.location").as_deref(),
                Some("/ca.pem"),
                "{role}"
            );
            assert_eq!(
                config.get("socket.keepalive.enable").as_deref(),
                Some("true"),
                "{role}"
            );
            assert_eq!(
                config.get("linger.ms").as_deref(),
                Some("50"),
                "{role}: an option wins over the tuning"
            );
            assert_eq!(
                config.get("compression.type"),
                None,
                "{role}: and over it under another name"
            );
            assert_eq!(
                config.get("topic.compression.codec").as_deref(),
                Some("zstd"),
                "{role}"
            );
            let shown = format!("{config:?} {conn:?}");
            assert!(
                !shown.contains("sekrit-2") && shown.contains("sasl.password=<redacted>"),
                "{role}: {shown}"
            );
        }
        let plain = Connection::plaintext("b:1");
        for (role, config) in roles(&plain) {
            assert_eq!(
                config.get("security.protocol"),
                None,
                "{role}: librdkafka's default, plaintext"
            );
        }
    }

    #[test]
    fn a_property_librdkafka_refuses_stops_at_start_without_its_value() {
        #[derive(clap::Parser)]
        struct Args {
            #[command(flatten)]
            kafka: KafkaArgs,
        }
        let parse = |option: &str| {
            <Args as clap::Parser>::try_parse_from(["t", "--kafka-option", option])
                .expect("parses")
                .kafka
        };
        let e = parse("sasl.oauthbearer.client.secrett=hush-1")
            .connection()
            .expect_err("unknown");
        assert!(
            e.starts_with("KAFKA_OPTIONS: sasl.oauthbearer.client.secrett"),
            "{e}"
        );
        let e = parse("socket.timeout.ms=soon-hush-2")
            .connection()
            .expect_err("not a number");
        assert!(e.starts_with("KAFKA_OPTIONS: socket.timeout.ms"), "{e}");
        assert!(!e.contains("hush"), "{e}");
        assert!(parse("socket.timeout.ms=20000").connection().is_ok());
    }

    /// No client is configured outside this module: every place that builds one starts from a
    /// [`Connection`], so none can miss the connection settings.
    #[test]
    fn no_client_configuration_is_built_anywhere_else() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut offenders = Vec::new();
        let mut dirs = vec![root.clone()];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).expect("crates dir").flatten() {
                let path = entry.path();
                if path.is_dir() {
                    dirs.push(path);
                } else if path.extension().is_some_and(|e| e == "rs")
                    && !path.ends_with("service-common/src/kafka.rs")
                {
                    let text = std::fs::read_to_string(&path).expect("source");
                    for needle in ["ClientConfig::new(", "set(\"bootstrap.servers\""] {
                        if text.contains(needle) {
                            offenders.push(format!("{} ({needle})", path.display()));
                        }
                    }
                }
            }
        }
        assert!(
            offenders.is_empty(),
            "clients configured outside service_common::kafka: {offenders:?}"
        );
    }
}
