//! The consumer driver: a thread that polls the group consumer and hands messages, in chunks,
//! to the pipeline. Rebalances are a handshake: on assignment the thread waits until the
//! pipeline restored each new partition (and sets its start offset from the restored state);
//! on revocation it waits until the pipeline checkpointed and released each partition, so the
//! next owner starts from a committed state and never fences a live owner.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{ClientContext, Offset};
use tokio::sync::mpsc;

/// One message, owned.
#[derive(Debug)]
pub struct Msg {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
}

/// What the consumer thread hands the pipeline.
#[derive(Debug)]
pub enum Input {
    Messages(Vec<Msg>),
    /// Restore these partitions; answer each one's start offset (`None`: the beginning).
    Assign(Vec<i32>, std::sync::mpsc::SyncSender<Vec<(i32, Option<i64>)>>),
    /// Checkpoint and release these partitions; answer when done. `lost`: the group already
    /// gave them to another member (membership lost): release them without a checkpoint.
    Revoke(Vec<i32>, bool, std::sync::mpsc::SyncSender<()>),
    /// The consumer cannot go on (for example fenced by a member with the same instance id).
    Fatal(String),
}

/// Messages per chunk handed over.
const CHUNK: usize = 512;

/// The consumer's context: the rebalance handshake.
#[derive(Debug)]
pub struct Ctx {
    topic: String,
    inputs: mpsc::Sender<Input>,
}

impl ClientContext for Ctx {}

impl Ctx {
    /// The partitions of the events topic in a rebalance's list.
    fn partitions_of(&self, tpl: &rdkafka::TopicPartitionList) -> Vec<i32> {
        tpl.elements_for_topic(&self.topic)
            .iter()
            .map(|e| e.partition())
            .collect()
    }
}

impl ConsumerContext for Ctx {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if tokio::runtime::Handle::try_current().is_ok() {
            // Only the final close can land on a runtime thread, after the pipeline released
            // every partition: nothing to hand over, and blocking there is not allowed.
            return;
        }
        match rebalance {
            Rebalance::Assign(tpl) => {
                let parts = self.partitions_of(tpl);
                if parts.is_empty() {
                    return;
                }
                tracing::info!(partitions = ?parts, "partitions assigned; restoring their state");
                let (tx, rx) = std::sync::mpsc::sync_channel(1);
                if self.inputs.blocking_send(Input::Assign(parts, tx)).is_err() {
                    return;
                }
                let Ok(offsets) = rx.recv() else { return };
                for mut elem in tpl.elements_for_topic(&self.topic) {
                    if let Some((_, start)) = offsets.iter().find(|(p, _)| *p == elem.partition()) {
                        let offset = start.map_or(Offset::Beginning, Offset::Offset);
                        let _ = elem.set_offset(offset);
                    }
                }
            }
            Rebalance::Revoke(tpl) => {
                let parts = self.partitions_of(tpl);
                if parts.is_empty() {
                    return;
                }
                let lost = consumer.assignment_lost();
                if lost {
                    tracing::warn!(partitions = ?parts, "partitions lost (this member's group membership was lost); dropping them without a checkpoint");
                } else {
                    tracing::info!(partitions = ?parts, "partitions revoked; checkpointing them");
                }
                let (tx, rx) = std::sync::mpsc::sync_channel(1);
                if self.inputs.blocking_send(Input::Revoke(parts, lost, tx)).is_ok() {
                    let _ = rx.recv();
                }
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }
}

pub type GroupConsumer = BaseConsumer<Ctx>;

/// Builds the group consumer: auto-commit off (offsets go in checkpoint transactions), static
/// membership when `instance_id` is set.
pub fn create(
    conn: &service_common::kafka::Connection,
    group: &str,
    instance_id: Option<&str>,
    session_timeout_ms: u64,
    assignment_strategy: &str,
    topic: &str,
    inputs: mpsc::Sender<Input>,
) -> Result<GroupConsumer, KafkaError> {
    let mut config = service_common::kafka::manual_consumer(conn, group);
    config
        .set("session.timeout.ms", session_timeout_ms.to_string())
        .set("partition.assignment.strategy", assignment_strategy)
        .set("fetch.wait.max.ms", "50")
        .set("fetch.max.bytes", "16777216");
    if let Some(id) = instance_id {
        config.set("group.instance.id", id);
    }
    config.create_with_context(Ctx {
        topic: topic.to_owned(),
        inputs,
    })
}

/// Polls `consumer` on a thread of its own until `stop` is set, then closes it (serving the
/// last revocation). The input channel closes when the thread ends.
pub fn spawn(
    consumer: Arc<GroupConsumer>,
    topic: String,
    inputs: mpsc::Sender<Input>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("consumer".into())
        .spawn(move || {
            if let Err(e) = consumer.subscribe(&[&topic]) {
                let _ = inputs.blocking_send(Input::Fatal(format!("subscribing to {topic}: {e}")));
                return;
            }
            let mut chunk = Vec::with_capacity(CHUNK);
            while !stop.load(Ordering::SeqCst) {
                let wait = if chunk.is_empty() {
                    Duration::from_millis(100)
                } else {
                    Duration::ZERO
                };
                match consumer.poll(wait) {
                    Some(Ok(m)) => {
                        chunk.push(Msg {
                            partition: m.partition(),
                            offset: m.offset(),
                            key: m.key().map(<[u8]>::to_vec),
                            payload: m.payload().unwrap_or_default().to_vec(),
                        });
                        if chunk.len() < CHUNK {
                            continue;
                        }
                    }
                    Some(Err(KafkaError::MessageConsumptionFatal(code))) => {
                        let _ = inputs
                            .blocking_send(Input::Fatal(format!("the consumer failed fatally: {code}")));
                        return;
                    }
                    Some(Err(e)) => tracing::warn!(error = %e, "consumer error"),
                    None => {}
                }
                if !chunk.is_empty()
                    && inputs
                        .blocking_send(Input::Messages(std::mem::take(&mut chunk)))
                        .is_err()
                {
                    return;
                }
            }
            drop(chunk);
            // Closing serves the final revocation through the same handshake.
            drop(consumer);
        })
}
