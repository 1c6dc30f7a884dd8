//! Reads the processor's dead-letter topic (read_committed, from its start) for `verify`: the
//! identity of each dead-lettered event, with its reason and detail headers.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Headers;
use rdkafka::{Message, Offset, TopicPartitionList};

/// One dead letter: the event's identity and why (`reason: detail`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub device_id: String,
    pub ts: i64,
    pub why: String,
}

/// A consumer of the whole dead-letter topic that keeps its position between catch-ups.
pub struct DlqReader {
    consumer: BaseConsumer,
    partitions: usize,
    /// Partitions read to their end, and nothing from them since.
    at_end: HashSet<i32>,
}

impl std::fmt::Debug for DlqReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DlqReader")
            .field("partitions", &self.partitions)
            .finish()
    }
}

impl DlqReader {
    /// Assigns every partition of `topic` from its start (none when the topic does not exist),
    /// connecting with the security settings of the environment (`KAFKA_SECURITY_PROTOCOL`...).
    pub fn open(brokers: &str, topic: &str) -> anyhow::Result<DlqReader> {
        let group = format!("load-generator-verify-{}", std::process::id());
        let conn = service_common::kafka::connection_from_env(brokers).map_err(anyhow::Error::msg)?;
        let consumer: BaseConsumer = service_common::kafka::manual_consumer(&conn, &group)
            .set("enable.partition.eof", "true")
            .set("allow.auto.create.topics", "false")
            .create()?;
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .map_err(|e| anyhow::anyhow!("dead-letter topic {topic}: {e}"))?;
        let partitions = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
            .map_or(0, |t| t.partitions().len());
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p as i32, Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
        Ok(DlqReader {
            consumer,
            partitions,
            at_end: HashSet::new(),
        })
    }

    /// Everything committed since the last call: read until every partition has reported its
    /// end (librdkafka says so once each time it gets there, so that is remembered across
    /// calls) and a poll brings nothing more.
    pub fn catch_up(&mut self) -> anyhow::Result<Vec<DeadLetter>> {
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if Instant::now() >= deadline {
                anyhow::bail!(
                    "the dead-letter topic did not reach its end within 60 s ({} of {} partitions)",
                    self.at_end.len(),
                    self.partitions
                );
            }
            match self.consumer.poll(Duration::from_millis(200)) {
                None if self.at_end.len() >= self.partitions => break,
                None => {}
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    self.at_end.insert(p);
                }
                Some(Err(e)) => anyhow::bail!("reading the dead-letter topic: {e}"),
                Some(Ok(m)) => {
                    self.at_end.remove(&m.partition());
                    let header = |name: &str| {
                        m.headers()
                            .and_then(|h| h.iter().find(|h| h.key == name))
                            .and_then(|h| h.value)
                            .map(|v| String::from_utf8_lossy(v).into_owned())
                            .unwrap_or_default()
                    };
                    let Some(payload) = m.payload() else { continue };
                    // An invalid payload may have no identity: it cannot be an acknowledged
                    // event (the proxy validates what it accepts).
                    let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload) else {
                        continue;
                    };
                    let (Some(device), Some(ts)) = (v["deviceId"].as_str(), v["ts"].as_i64()) else {
                        continue;
                    };
                    out.push(DeadLetter {
                        device_id: device.to_owned(),
                        ts,
                        why: format!("{}: {}", header("reason"), header("detail")),
                    });
                }
            }
        }
        Ok(out)
    }
}
