//! Kafka helpers shared by the proxy and the processor.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// The producer every writer of events and state starts from (the proxy, the processor's
/// checkpoint writers, the tests and the benchmarks): idempotent, `acks=all`, and murmur2 on the
/// key, so a device lands on the partition Java clients and Redpanda tools pick for it. Callers
/// add only tuning (linger, batch sizes, timeouts).
pub fn idempotent_producer(brokers: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
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
pub fn transactional_producer(brokers: &str, transactional_id: &str) -> ClientConfig {
    let mut c = idempotent_producer(brokers);
    c.set("transactional.id", transactional_id);
    c
}

/// A consumer that commits nothing by itself (offsets go with the processor's transactions, or
/// nowhere), reads only committed records from the earliest offset, and accepts fetch answers
/// larger than it asked for (the test broker answers a fetch with everything it has). Callers
/// add group membership and fetch tuning.
pub fn manual_consumer(brokers: &str, group: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .set("receive.message.max.bytes", "1073741824");
    c
}

/// Creates `topic` with `partitions` partitions; an existing topic is fine (its partition
/// count is left as it is).
pub async fn ensure_topic(
    brokers: &str,
    topic: &str,
    partitions: i32,
    replication: i32,
) -> Result<(), KafkaError> {
    ensure_topic_with_config(brokers, topic, partitions, replication, &[]).await
}

/// As [`ensure_topic`], with topic configuration (`retention.ms`, ...) for a new topic.
pub async fn ensure_topic_with_config(
    brokers: &str,
    topic: &str,
    partitions: i32,
    replication: i32,
    configs: &[(&str, &str)],
) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("socket.connection.setup.timeout.ms", "5000")
        .create()?;
    let mut new_topic = NewTopic::new(topic, partitions, TopicReplication::Fixed(replication));
    for (k, v) in configs {
        new_topic = new_topic.set(k, v);
    }
    let opts = AdminOptions::new()
        .request_timeout(Some(Duration::from_secs(5)))
        .operation_timeout(Some(Duration::from_secs(5)));
    let results = admin.create_topics([&new_topic], &opts).await;
    drop_in_background(admin);
    for result in results? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => return Err(KafkaError::AdminOp(code)),
        }
    }
    Ok(())
}

/// Creates `topic` when missing with the partitions and replication every service shares
/// (`TOPIC_PARTITIONS`, `TOPIC_REPLICATION`), retrying until the broker answers.
pub async fn ensure_shared_topic(kafka: &crate::settings::KafkaArgs, topic: &str) {
    ensure_topic_with_retry(&kafka.brokers, topic, kafka.partitions, kafka.replication).await
}

/// Retries `ensure_topic` with capped backoff until it succeeds (for start-up while the broker
/// is still coming up).
pub async fn ensure_topic_with_retry(brokers: &str, topic: &str, partitions: i32, replication: i32) {
    ensure_topic_with_config_retry(brokers, topic, partitions, replication, &[]).await
}

/// Retries `ensure_topic_with_config` with capped backoff until it succeeds.
pub async fn ensure_topic_with_config_retry(
    brokers: &str,
    topic: &str,
    partitions: i32,
    replication: i32,
    configs: &[(&str, &str)],
) {
    let mut delay = Duration::from_millis(200);
    loop {
        match ensure_topic_with_config(brokers, topic, partitions, replication, configs).await {
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
