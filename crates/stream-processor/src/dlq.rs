//! The dead-letter topic: late and invalid events, and batches the sink refused, each with the
//! reason and where it came from in headers. Delivery is retried until the broker has it, so
//! a checkpoint that moves past an event only happens once its dead letter is stored.

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use service_common::kafka::HealingProducer;

/// Why a message went to the dead-letter topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Late,
    Invalid,
    SinkRefused,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Late => "late",
            Reason::Invalid => "invalid",
            Reason::SinkRefused => "sink_refused",
        }
    }
}

/// A message for the dead-letter topic.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub reason: Reason,
    pub detail: String,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub source_partition: i32,
    pub source_offset: i64,
}

/// Producer for the dead-letter topic.
pub struct DeadLetters {
    producer: HealingProducer,
    topic: String,
    source_topic: String,
}

impl std::fmt::Debug for DeadLetters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadLetters").field("topic", &self.topic).finish()
    }
}

impl DeadLetters {
    pub fn new(brokers: &str, topic: &str, source_topic: &str) -> Result<Self, KafkaError> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("message.timeout.ms", "30000");
        Ok(DeadLetters {
            producer: HealingProducer::new(config)?,
            topic: topic.to_owned(),
            source_topic: source_topic.to_owned(),
        })
    }

    /// Sends one dead letter, retrying until the broker acknowledges it.
    pub async fn send(&self, letter: DeadLetter) {
        let partition = letter.source_partition.to_string();
        let offset = letter.source_offset.to_string();
        let mut failures = 0u32;
        loop {
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: "reason",
                    value: Some(letter.reason.as_str()),
                })
                .insert(Header {
                    key: "detail",
                    value: Some(letter.detail.as_str()),
                })
                .insert(Header {
                    key: "source-topic",
                    value: Some(self.source_topic.as_str()),
                })
                .insert(Header {
                    key: "source-partition",
                    value: Some(partition.as_str()),
                })
                .insert(Header {
                    key: "source-offset",
                    value: Some(offset.as_str()),
                });
            let mut record = FutureRecord::to(&self.topic)
                .payload(&letter.payload)
                .headers(headers);
            if let Some(k) = &letter.key {
                record = record.key(k);
            }
            let producer = self.producer.current();
            match producer.send(record, Duration::from_secs(5)).await {
                Ok(_) => {
                    crate::metrics::dead_lettered(letter.reason.as_str(), 1);
                    return;
                }
                Err((e, _)) => {
                    self.producer.replace_if_fatal(&producer);
                    failures += 1;
                    let delay =
                        crate::sink::backoff(Duration::from_millis(100), Duration::from_secs(5), failures);
                    tracing::warn!(error = %e, failures, "dead-letter produce failed, retrying");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}
