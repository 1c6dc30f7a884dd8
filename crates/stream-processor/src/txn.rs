//! The checkpoint writer of one input partition: a thread owning that partition's
//! transactional producer (`transactional.id` derived from group, topic and partition). Its
//! creation fences every earlier owner of the partition; each checkpoint is one transaction
//! holding the changelog records, the dead letters and the consumer offset. After a commit it
//! hands the records to the local cache and reports back; after a snapshot it deletes the
//! changelog before the snapshot.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;

use crate::changelog::Record;
use crate::consumer::GroupConsumer;
use crate::failpoint::{self, Step};
use crate::partition::{CheckpointPlan, DeadLetter};
use crate::store::{Committed, StateStore};

/// Where the writer writes.
#[derive(Debug, Clone)]
pub struct Topics {
    pub input: String,
    pub changelog: String,
    pub dlq: String,
}

/// How a checkpoint ended.
#[derive(Debug)]
pub enum TxnOutcome {
    Committed {
        number: u64,
        seconds: f64,
        snapshot: bool,
        /// The encoded length of its records.
        bytes: usize,
    },
    /// Another owner took the partition: nothing of this process may be written for it again.
    Fenced(String),
    /// The broker kept refusing the transaction, or the writer panicked.
    Failed(String),
}

enum Job {
    /// The changelog position of the partition's last commit as restored (for the cache).
    Base(Option<(i64, String)>),
    Checkpoint(Box<CheckpointPlan>),
}

/// Handle to one partition's writer thread; dropping it ends the thread once its queue is done.
#[derive(Debug)]
pub struct TxnWriter {
    jobs: std::sync::mpsc::Sender<Job>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Job")
    }
}

/// The transactional id of an input partition's writer: the same on every owner.
pub fn transactional_id(group: &str, topic: &str, partition: i32) -> String {
    format!("{group}-{topic}-{partition}")
}

/// What a caught panic said, for the error that stops the pipeline.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let said = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_owned());
    format!("the checkpoint writer panicked: {said}")
}

/// Attempts at one transaction before the writer gives up (each after an abort).
const ATTEMPTS: u32 = 5;
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

impl TxnWriter {
    /// Creates the producer and initializes its transactions, which fences the previous owner
    /// (blocking: call it off the async threads). Reports land on `done`, tagged with the
    /// partition and this assignment's `generation`.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        config: &service_common::kafka::KafkaConfig,
        partition: i32,
        generation: u64,
        topics: Topics,
        cache: StateStore,
        admin: Arc<AdminClient<DefaultClientContext>>,
        consumer: Arc<GroupConsumer>,
        done: mpsc::UnboundedSender<(i32, u64, TxnOutcome)>,
    ) -> Result<TxnWriter, KafkaError> {
        let producer: FutureProducer = config.create()?;
        // A producer created a moment ago may ask for its transaction coordinator while it is
        // between the bootstrap connection (dropped once the cluster names its brokers) and
        // the named broker's, and then waits for librdkafka's 500 ms retry timer: one to three
        // of six partitions did in four of five start-ups measured. Two metadata requests
        // first wait for a usable connection each; with them no partition waited (three
        // start-ups).
        for _ in 0..2 {
            producer
                .client()
                .fetch_metadata(Some(&topics.changelog), CALL_TIMEOUT)?;
        }
        producer.init_transactions(CALL_TIMEOUT)?;
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let mut thread = Writer {
            producer,
            partition,
            topics,
            cache,
            admin,
            consumer,
            last: None,
        };
        std::thread::Builder::new()
            .name(format!("txn-{partition}"))
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    let mut plan = match job {
                        Job::Base(position) => {
                            thread.last = position;
                            continue;
                        }
                        Job::Checkpoint(plan) => plan,
                    };
                    // A panic here would otherwise end the thread unheard and leave the
                    // partition waiting for this checkpoint forever: it fails the pipeline
                    // instead, which restarts from the last committed checkpoint.
                    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        thread.checkpoint(&mut plan)
                    }))
                    .unwrap_or_else(|panic| TxnOutcome::Failed(panic_message(panic.as_ref())));
                    let stop = !matches!(outcome, TxnOutcome::Committed { .. });
                    if done.send((partition, generation, outcome)).is_err() || stop {
                        return;
                    }
                }
            })
            .map_err(|e| KafkaError::ClientCreation(e.to_string()))?;
        Ok(TxnWriter { jobs: tx })
    }

    /// Sets the changelog position (offset, commit id) the restored state reflects.
    pub fn set_base(&self, position: Option<(i64, String)>) {
        let _ = self.jobs.send(Job::Base(position));
    }

    /// Queues a checkpoint; its outcome arrives on the `done` channel.
    pub fn submit(&self, plan: CheckpointPlan) -> bool {
        self.jobs.send(Job::Checkpoint(Box::new(plan))).is_ok()
    }
}

struct Writer {
    producer: FutureProducer,
    partition: i32,
    topics: Topics,
    cache: StateStore,
    admin: Arc<AdminClient<DefaultClientContext>>,
    consumer: Arc<GroupConsumer>,
    /// The last commit (offset, id) on the changelog: the cache applies a checkpoint only on
    /// top of the one before it.
    last: Option<(i64, String)>,
}

enum Failure {
    Fatal(String),
    Abortable(String),
}

fn classify(e: KafkaError) -> Failure {
    match &e {
        KafkaError::Transaction(t) if t.is_fatal() => Failure::Fatal(e.to_string()),
        _ => Failure::Abortable(e.to_string()),
    }
}

impl Writer {
    /// Encodes and commits `plan` (retrying); once committed, its encoded records move to the
    /// cache.
    fn checkpoint(&mut self, plan: &mut CheckpointPlan) -> TxnOutcome {
        let start = Instant::now();
        let mut encoded = plan.encode();
        let bytes = crate::partition::encoded_len(&encoded);
        let mut last = String::new();
        for attempt in 1..=ATTEMPTS {
            match self.transaction(plan, &encoded) {
                Ok((reset_offset, commit_offset)) => {
                    failpoint::hit(Step::AfterChangelogCommitBeforeCache);
                    for letter in &plan.dead_letters {
                        crate::metrics::dead_lettered(letter.reason.as_str(), 1);
                    }
                    let commit_id = match plan.records.last() {
                        Some(Record::Commit(c)) => c.id.clone(),
                        _ => String::new(),
                    };
                    let prev = self.last.replace((commit_offset, commit_id.clone()));
                    self.cache.apply(
                        self.partition,
                        Committed {
                            encoded: std::mem::take(&mut encoded),
                            snapshot: plan.snapshot,
                            commit_offset,
                            commit_id,
                        },
                        prev,
                    );
                    if let Some(offset) = reset_offset {
                        self.truncate_before(offset);
                    }
                    return TxnOutcome::Committed {
                        number: plan.number,
                        seconds: start.elapsed().as_secs_f64(),
                        snapshot: plan.snapshot,
                        bytes,
                    };
                }
                Err(Failure::Fatal(e)) => return TxnOutcome::Fenced(e),
                Err(Failure::Abortable(e)) => {
                    tracing::warn!(partition = self.partition, attempt, error = %e, "checkpoint transaction failed, aborting and retrying");
                    if let Err(e) = self.producer.abort_transaction(CALL_TIMEOUT) {
                        if let Failure::Fatal(e) = classify(e) {
                            return TxnOutcome::Fenced(e);
                        }
                    }
                    last = e;
                    std::thread::sleep(crate::sink::backoff(
                        Duration::from_millis(100),
                        Duration::from_secs(3),
                        attempt,
                    ));
                }
            }
        }
        TxnOutcome::Failed(format!("the broker refused it {ATTEMPTS} times, last: {last}"))
    }

    /// One transaction; returns the offsets of its `Reset` (for a snapshot) and its `Commit`.
    fn transaction(&self, plan: &CheckpointPlan, encoded: &[Vec<u8>]) -> Result<(Option<i64>, i64), Failure> {
        self.producer.begin_transaction().map_err(classify)?;
        let mut deliveries = Vec::with_capacity(encoded.len());
        for bytes in encoded {
            let record = FutureRecord::<(), [u8]>::to(&self.topics.changelog)
                .partition(self.partition)
                .payload(bytes.as_slice());
            deliveries.push(self.enqueue(record)?);
        }
        let mut letters = Vec::with_capacity(plan.dead_letters.len());
        for letter in &plan.dead_letters {
            letters.push(self.enqueue_dead_letter(letter)?);
        }
        // Every record acknowledged before the commit: rust-rdkafka's commit flushes by polling
        // in steps of 100 ms, a step the background thread's delivery reports never end early,
        // so committing with records still in flight costs 100 ms each time.
        let offset_of = |f: DeliveryFuture| -> Result<i64, Failure> {
            match futures::executor::block_on(f) {
                Ok(Ok(d)) => Ok(d.offset),
                Ok(Err((e, _))) => Err(Failure::Abortable(e.to_string())),
                Err(_) => Err(Failure::Abortable("delivery report lost".into())),
            }
        };
        let offsets: Vec<i64> = deliveries.into_iter().map(offset_of).collect::<Result<_, _>>()?;
        for f in letters {
            offset_of(f)?;
        }
        // The group's metadata as of now (its generation changes with every rebalance).
        if let Some(cgm) = self.consumer.group_metadata() {
            let mut offsets = TopicPartitionList::new();
            offsets
                .add_partition_offset(
                    &self.topics.input,
                    self.partition,
                    Offset::Offset(plan.resume_offset),
                )
                .map_err(classify)?;
            self.producer
                .send_offsets_to_transaction(&offsets, &cgm, CALL_TIMEOUT)
                .map_err(classify)?;
        }
        // A commit that timed out or hit a retriable error is retried as such (aborting then
        // would not be allowed); other errors abort the attempt.
        let mut tries = 0;
        loop {
            match self.producer.commit_transaction(CALL_TIMEOUT) {
                Ok(()) => break,
                Err(KafkaError::Transaction(t)) if t.is_retriable() && !t.is_fatal() && tries < 3 => {
                    tries += 1;
                    tracing::warn!(partition = self.partition, error = %t, "checkpoint commit not confirmed yet, retrying it");
                }
                Err(e) => return Err(classify(e)),
            }
        }
        let reset = matches!(plan.records.first(), Some(Record::Reset));
        let first_offset = *offsets.first().expect("a checkpoint has a commit record");
        let commit_offset = *offsets.last().expect("a checkpoint has a commit record");
        Ok((reset.then_some(first_offset), commit_offset))
    }

    /// Queues one record, waiting while librdkafka's queue is full.
    fn enqueue<K: rdkafka::message::ToBytes + ?Sized>(
        &self,
        mut record: FutureRecord<'_, K, [u8]>,
    ) -> Result<DeliveryFuture, Failure> {
        loop {
            match self.producer.send_result(record) {
                Ok(f) => return Ok(f),
                Err((KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((e, _)) => return Err(classify(e)),
            }
        }
    }

    fn enqueue_dead_letter(&self, letter: &DeadLetter) -> Result<DeliveryFuture, Failure> {
        let partition = letter.source_partition.to_string();
        let offset = letter.source_offset.to_string();
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
                value: Some(self.topics.input.as_str()),
            })
            .insert(Header {
                key: "source-partition",
                value: Some(partition.as_str()),
            })
            .insert(Header {
                key: "source-offset",
                value: Some(offset.as_str()),
            });
        let mut record = FutureRecord::<[u8], [u8]>::to(&self.topics.dlq)
            .payload(letter.payload.as_slice())
            .headers(headers);
        if let Some(k) = &letter.key {
            record = record.key(k.as_slice());
        }
        self.enqueue(record)
    }

    /// Deletes the changelog before a committed snapshot: restore time stays bounded by the
    /// state's size. A failure only postpones it to the next snapshot.
    fn truncate_before(&self, offset: i64) {
        let mut tpl = TopicPartitionList::new();
        if tpl
            .add_partition_offset(&self.topics.changelog, self.partition, Offset::Offset(offset))
            .is_err()
        {
            return;
        }
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        match futures::executor::block_on(self.admin.delete_records(&tpl, &opts)) {
            Ok(_) => tracing::debug!(
                partition = self.partition,
                before = offset,
                "changelog truncated before snapshot"
            ),
            Err(e) => {
                tracing::warn!(partition = self.partition, error = %e, "changelog truncation failed; retried after the next snapshot")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caught_panic_names_what_it_said() {
        let caught = std::panic::catch_unwind(|| panic!("encoding failed")).expect_err("panicked");
        assert_eq!(
            panic_message(caught.as_ref()),
            "the checkpoint writer panicked: encoding failed"
        );
        let formatted = std::panic::catch_unwind(|| panic!("record {} too long", 7)).expect_err("panicked");
        assert_eq!(
            panic_message(formatted.as_ref()),
            "the checkpoint writer panicked: record 7 too long"
        );
    }
}
