//! Kafka helpers shared by the proxy and the processor.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// Creates `topic` with `partitions` partitions; an existing topic is fine (its partition
/// count is left as it is).
pub async fn ensure_topic(
    brokers: &str,
    topic: &str,
    partitions: i32,
    replication: i32,
) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("socket.connection.setup.timeout.ms", "5000")
        .create()?;
    let new_topic = NewTopic::new(topic, partitions, TopicReplication::Fixed(replication));
    let opts = AdminOptions::new()
        .request_timeout(Some(Duration::from_secs(5)))
        .operation_timeout(Some(Duration::from_secs(5)));
    for result in admin.create_topics([&new_topic], &opts).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => return Err(KafkaError::AdminOp(code)),
        }
    }
    Ok(())
}

/// Retries `ensure_topic` with capped backoff until it succeeds (for start-up while the broker
/// is still coming up).
pub async fn ensure_topic_with_retry(brokers: &str, topic: &str, partitions: i32, replication: i32) {
    let mut delay = Duration::from_millis(200);
    loop {
        match ensure_topic(brokers, topic, partitions, replication).await {
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
