//! The consume → clean → checkpoint → deliver → commit loop (DESIGN.md, exactly-once protocol).
//!
//! One task consumes every assigned partition and runs each partition's cleanup; a checkpoint
//! (one state-store transaction) records new outbox batches with the dedup keys and watermarks
//! that led to them and the partition's resume offset. One sender task per partition then
//! delivers its outbox batches in order (one in flight per partition, partitions in parallel),
//! removes each from the outbox once the sink has it, and commits the resume offset to Kafka.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use telemetry_core::{Batcher, Cleaner, Event, Outcome};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::dlq::{DeadLetter, DeadLetters, Reason};
use crate::failpoint;
use crate::metrics::{self, OutcomeCounts};
use crate::sink::{Delivery, Sink};
use crate::store::{Checkpoint, OutboxBatch, StateStore};
use crate::Settings;

/// Partition assignment changes, forwarded from librdkafka's callback thread.
#[derive(Debug)]
pub enum Rebalanced {
    Assigned(Vec<i32>),
    Revoked(Vec<i32>),
}

/// The consumer's context: starts assigned partitions at the state store's resume offsets,
/// forwards rebalances to the pipeline, and turns librdkafka statistics into lag gauges.
#[derive(Debug)]
pub struct Ctx {
    topic: String,
    resume: Arc<Mutex<HashMap<i32, i64>>>,
    /// Partitions this member owns now; offsets are committed only for these (a commit before
    /// the group is joined is fenced by the broker, fatally, under static membership).
    assigned: Assigned,
    events: mpsc::UnboundedSender<Rebalanced>,
}

impl ClientContext for Ctx {
    fn stats(&self, statistics: Statistics) {
        if let Some(topic) = statistics.topics.get(&self.topic) {
            for (p, stats) in &topic.partitions {
                if *p >= 0 && stats.consumer_lag >= 0 {
                    metrics::lag(*p, stats.consumer_lag);
                }
            }
        }
    }
}

impl ConsumerContext for Ctx {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                // The state store's offset wins over Kafka's committed one.
                let resume = self.resume.lock().unwrap_or_else(|p| p.into_inner());
                for mut elem in tpl.elements_for_topic(&self.topic) {
                    if let Some(offset) = resume.get(&elem.partition()) {
                        let _ = elem.set_offset(Offset::Offset(*offset));
                    }
                }
            }
            Rebalance::Revoke(tpl) => {
                let parts: Vec<i32> = tpl
                    .elements_for_topic(&self.topic)
                    .iter()
                    .map(|e| e.partition())
                    .collect();
                let mut assigned = self.assigned.lock().unwrap_or_else(|p| p.into_inner());
                for p in &parts {
                    assigned.remove(p);
                }
                let _ = self.events.send(Rebalanced::Revoked(parts));
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let parts: Vec<i32> = tpl
                .elements_for_topic(&self.topic)
                .iter()
                .map(|e| e.partition())
                .collect();
            tracing::info!(partitions = ?parts, "partitions assigned");
            self.assigned
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(parts.iter().copied());
            let _ = self.events.send(Rebalanced::Assigned(parts));
        }
    }
}

pub type KafkaConsumer = StreamConsumer<Ctx>;

/// The partitions currently assigned to this member.
pub type Assigned = Arc<Mutex<std::collections::HashSet<i32>>>;

/// Builds the consumer: group with static membership, auto-commit off, statistics for lag.
pub fn consumer(
    settings: &Settings,
    resume: Arc<Mutex<HashMap<i32, i64>>>,
    assigned: Assigned,
) -> anyhow::Result<(KafkaConsumer, mpsc::UnboundedReceiver<Rebalanced>)> {
    let (tx, rx) = mpsc::unbounded_channel();
    let ctx = Ctx {
        topic: settings.kafka_topic.clone(),
        resume,
        assigned,
        events: tx,
    };
    let consumer: KafkaConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &settings.kafka_brokers)
        .set("group.id", &settings.group_id)
        .set("group.instance.id", &settings.group_instance_id)
        .set("session.timeout.ms", settings.session_timeout_ms.to_string())
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("statistics.interval.ms", "5000")
        .set("fetch.wait.max.ms", "50")
        // Ask for modest fetches, but accept large ones: the test broker answers a fetch with
        // everything it has, past fetch.max.bytes.
        .set("fetch.max.bytes", "16777216")
        .set("receive.message.max.bytes", "1073741824")
        .create_with_context(ctx)?;
    consumer.subscribe(&[&settings.kafka_topic])?;
    Ok((consumer, rx))
}

/// Commits `offset` (the next offset to read) for one partition, without waiting, if this
/// member owns the partition now (otherwise a later commit, or the state store, covers it).
fn commit(consumer: &KafkaConsumer, assigned: &Assigned, topic: &str, partition: i32, offset: i64) {
    if !assigned
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .contains(&partition)
    {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    if tpl
        .add_partition_offset(topic, partition, Offset::Offset(offset))
        .is_ok()
    {
        if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
            tracing::debug!(partition, offset, error = %e, "offset commit failed (partition may be revoked)");
        }
    }
}

fn fatal(what: &str, err: impl std::fmt::Display) -> ! {
    // The state store is the source of truth; a restart resumes from its last checkpoint.
    tracing::error!(error = %err, "{what}; exiting so a restart resumes from the last checkpoint");
    std::process::exit(70);
}

/// Asks the broker for the high watermark of every partition in `marks` twice a second,
/// recording the processing time each was asked at (before the request: conservative).
async fn watch_high_watermarks(
    consumer: Arc<KafkaConsumer>,
    topic: String,
    marks: Arc<Mutex<HashMap<i32, (i64, u64)>>>,
    clock: Instant,
) {
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let parts: Vec<i32> = marks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .copied()
            .collect();
        for p in parts {
            let asked_at = clock.elapsed().as_millis() as u64;
            let (c, t) = (Arc::clone(&consumer), topic.clone());
            let fetched =
                tokio::task::spawn_blocking(move || c.fetch_watermarks(&t, p, Duration::from_secs(1))).await;
            if let Ok(Ok((_, high))) = fetched {
                marks
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(p, (high, asked_at));
            }
        }
    }
}

/// What the sender tasks share.
#[derive(Clone)]
struct SenderShared {
    sink: Sink,
    store: StateStore,
    dlq: Arc<DeadLetters>,
    consumer: Arc<KafkaConsumer>,
    assigned: Assigned,
    topic: String,
    cancel: CancellationToken,
    started: Instant,
    first_delivered: Arc<AtomicBool>,
}

/// A partition's sender: its queue and how many outbox batches it still holds.
#[derive(Debug, Clone)]
struct SenderHandle {
    tx: mpsc::UnboundedSender<OutboxBatch>,
    pending: Arc<AtomicUsize>,
}

impl SenderHandle {
    fn push(&self, partition: i32, batch: OutboxBatch) {
        let n = self.pending.fetch_add(1, Ordering::SeqCst) + 1;
        metrics::outbox(partition, n);
        if self.tx.send(batch).is_err() {
            fatal("sender task is gone", partition);
        }
    }
}

async fn run_sender(
    partition: i32,
    mut rx: mpsc::UnboundedReceiver<OutboxBatch>,
    pending: Arc<AtomicUsize>,
    s: SenderShared,
) {
    while let Some(batch) = rx.recv().await {
        match s.sink.deliver(&batch, &s.cancel).await {
            Delivery::Cancelled => return,
            Delivery::Acknowledged { replayed } => {
                if !s.first_delivered.swap(true, Ordering::SeqCst) {
                    let secs = s.started.elapsed().as_secs_f64();
                    metrics::restart_to_first_batch(secs);
                    tracing::info!(seconds = secs, batch = %batch.id, replayed, "first batch delivered since start");
                }
            }
            Delivery::Refused { status, reason } => {
                tracing::error!(batch = %batch.id, status, reason = %reason, events = batch.events, "sink refused batch; sent to the dead-letter topic");
                s.dlq
                    .send(DeadLetter {
                        reason: Reason::SinkRefused,
                        detail: format!("status {status}: {reason}"),
                        key: Some(batch.id.clone().into_bytes()),
                        payload: batch.body.to_vec(),
                        source_partition: partition,
                        source_offset: batch.resume_offset,
                    })
                    .await;
            }
        }
        failpoint::hit("after_post_before_outbox_clear");
        if let Err(e) = s.store.remove_outbox(batch.id.clone()).await {
            fatal("removing a delivered batch from the outbox failed", e);
        }
        failpoint::hit("after_outbox_clear_before_commit");
        commit(&s.consumer, &s.assigned, &s.topic, partition, batch.resume_offset);
        let n = pending.fetch_sub(1, Ordering::SeqCst) - 1;
        metrics::outbox(partition, n);
    }
}

/// The in-memory work of one assigned partition.
#[derive(Debug)]
struct PartitionWork {
    cleaner: Cleaner,
    batcher: Batcher<Event>,
    next_offset: i64,
    next_seq: i64,
    counts: OutcomeCounts,
    dead_letters: Vec<JoinHandle<()>>,
    dirty: bool,
    last_checkpoint_ms: u64,
    paused: bool,
    sender: SenderHandle,
}

/// The pipeline.
pub struct Pipeline {
    settings: Arc<Settings>,
    consumer: Arc<KafkaConsumer>,
    rebalances: mpsc::UnboundedReceiver<Rebalanced>,
    store: StateStore,
    dlq: Arc<DeadLetters>,
    resume: Arc<Mutex<HashMap<i32, i64>>>,
    partitions: HashMap<i32, PartitionWork>,
    senders: HashMap<i32, (SenderHandle, JoinHandle<()>)>,
    shared: SenderShared,
    clock: Instant,
    last_tick_ms: u64,
    /// Checkpoints queued at the store and not yet committed, at most a few.
    checkpoint_slots: Arc<tokio::sync::Semaphore>,
    /// Per partition: the high watermark and the processing time it was asked for.
    high_watermarks: Arc<Mutex<HashMap<i32, (i64, u64)>>>,
    ready: Arc<AtomicBool>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("topic", &self.settings.kafka_topic)
            .field("partitions", &self.partitions.len())
            .finish()
    }
}

impl Pipeline {
    /// Opens the pieces and queues every outbox batch left by the previous run for resending.
    pub async fn new(
        settings: Arc<Settings>,
        store: StateStore,
        ready: Arc<AtomicBool>,
    ) -> anyhow::Result<Pipeline> {
        let resume = Arc::new(Mutex::new(store.resume_offsets().await?));
        let assigned: Assigned = Arc::default();
        let (consumer, rebalances) = consumer(&settings, Arc::clone(&resume), Arc::clone(&assigned))?;
        let consumer = Arc::new(consumer);
        let dlq = Arc::new(DeadLetters::new(
            &settings.kafka_brokers,
            &settings.dlq_topic,
            &settings.kafka_topic,
        )?);
        let sink = Sink::new(
            &settings.ingest_url,
            Duration::from_millis(settings.sink_timeout_ms),
            Duration::from_millis(settings.retry_backoff_min_ms),
            Duration::from_millis(settings.retry_backoff_max_ms),
        );
        let shared = SenderShared {
            sink,
            store: store.clone(),
            dlq: Arc::clone(&dlq),
            consumer: Arc::clone(&consumer),
            assigned,
            topic: settings.kafka_topic.clone(),
            cancel: CancellationToken::new(),
            started: Instant::now(),
            first_delivered: Arc::new(AtomicBool::new(false)),
        };
        let mut pipeline = Pipeline {
            settings,
            consumer,
            rebalances,
            store,
            dlq,
            resume,
            partitions: HashMap::new(),
            senders: HashMap::new(),
            shared,
            clock: Instant::now(),
            last_tick_ms: 0,
            checkpoint_slots: Arc::new(tokio::sync::Semaphore::new(4)),
            high_watermarks: Arc::new(Mutex::new(HashMap::new())),
            ready,
        };
        let outbox = pipeline.store.outbox().await?;
        if !outbox.is_empty() {
            tracing::info!(
                batches = outbox.len(),
                "resending outbox batches left by the previous run"
            );
        }
        for batch in outbox {
            let p = batch.partition;
            pipeline.sender(p).push(p, batch);
        }
        Ok(pipeline)
    }

    fn now_ms(&self) -> u64 {
        self.clock.elapsed().as_millis() as u64
    }

    fn sender(&mut self, partition: i32) -> SenderHandle {
        let shared = &self.shared;
        self.senders
            .entry(partition)
            .or_insert_with(|| {
                let (tx, rx) = mpsc::unbounded_channel();
                let pending = Arc::new(AtomicUsize::new(0));
                let task = tokio::spawn(run_sender(partition, rx, Arc::clone(&pending), shared.clone()));
                (SenderHandle { tx, pending }, task)
            })
            .0
            .clone()
    }

    /// The partition's work, loaded from the state store on first use.
    async fn work(&mut self, partition: i32) -> &mut PartitionWork {
        if !self.partitions.contains_key(&partition) {
            let state = match self.store.load_partition(partition).await {
                Ok(s) => s,
                Err(e) => fatal("loading partition state failed", e),
            };
            tracing::info!(
                partition,
                resume_offset = ?state.resume_offset,
                devices = state.marks.len(),
                dedup_keys = state.keys.len(),
                "partition state loaded"
            );
            let now = self.now_ms();
            let work = PartitionWork {
                cleaner: Cleaner::restore(self.settings.cleanup(), state.marks, state.keys, now),
                batcher: Batcher::new(self.settings.batch_size, self.settings.batch_linger_ms),
                next_offset: state.resume_offset.unwrap_or(0),
                next_seq: state.next_seq,
                counts: OutcomeCounts::default(),
                dead_letters: Vec::new(),
                dirty: false,
                last_checkpoint_ms: now,
                paused: false,
                sender: self.sender(partition),
            };
            self.partitions.insert(partition, work);
            self.high_watermarks
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(partition, (-1, 0));
        }
        self.partitions.get_mut(&partition).expect("inserted above")
    }

    /// Runs until `shutdown` resolves, then drains (checkpoint, deliver, commit).
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let consumer = Arc::clone(&self.consumer);
        let watcher = tokio::spawn(watch_high_watermarks(
            Arc::clone(&self.consumer),
            self.settings.kafka_topic.clone(),
            Arc::clone(&self.high_watermarks),
            self.clock,
        ));
        let tick_ms = self.settings.batch_linger_ms.clamp(10, 100);
        let mut tick = tokio::time::interval(Duration::from_millis(tick_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                // Messages before the timer, so a stall is followed by reading what waits, not
                // by idle flushes; the timer still runs under sustained load (checked below).
                biased;
                _ = &mut shutdown => break,
                Some(event) = self.rebalances.recv() => self.on_rebalance(event).await,
                msg = consumer.recv() => {
                    match msg {
                        Ok(m) => self.on_message(&m).await,
                        Err(KafkaError::MessageConsumptionFatal(code)) => {
                            fatal("the consumer failed fatally", code)
                        }
                        Err(e) => tracing::warn!(error = %e, "consumer error"),
                    }
                    if self.now_ms().saturating_sub(self.last_tick_ms) >= tick_ms {
                        self.on_tick().await;
                    }
                }
                _ = tick.tick() => self.on_tick().await,
            }
        }
        watcher.abort();
        self.drain().await;
        Ok(())
    }

    async fn on_message(&mut self, msg: &BorrowedMessage<'_>) {
        let partition = msg.partition();
        let offset = msg.offset();
        let now = self.now_ms();
        let dlq = Arc::clone(&self.dlq);
        let work = self.work(partition).await;
        if offset < work.next_offset {
            return; // below the resume offset: the restored state already covers it
        }
        work.next_offset = offset + 1;
        work.dirty = true;
        work.counts.consumed += 1;
        let payload = msg.payload().unwrap_or_default();
        let dead = match Event::from_json(payload) {
            Err(e) => {
                work.counts.invalid += 1;
                Some((Reason::Invalid, e.to_string()))
            }
            Ok(event) => match work.cleaner.process(event, offset, now) {
                Outcome::Buffered => None,
                Outcome::Duplicate => {
                    work.counts.duplicate += 1;
                    None
                }
                Outcome::Conflict => {
                    work.counts.conflict += 1;
                    None
                }
                Outcome::Late => {
                    work.counts.late += 1;
                    Some((Reason::Late, "ts below the device's watermark".to_owned()))
                }
            },
        };
        if let Some((reason, detail)) = dead {
            let letter = DeadLetter {
                reason,
                detail,
                key: msg.key().map(<[u8]>::to_vec),
                payload: payload.to_vec(),
                source_partition: partition,
                source_offset: offset,
            };
            work.dead_letters
                .push(tokio::spawn(async move { dlq.send(letter).await }));
        }
        if work.cleaner.has_released() {
            let released = work.cleaner.drain_released();
            work.batcher.extend(released.into_iter().map(|r| r.event), now);
        }
        if work.batcher.is_due(now) {
            self.checkpoint(partition, now).await;
        }
    }

    async fn on_tick(&mut self) {
        let now = self.now_ms();
        self.last_tick_ms = now;
        let interval = self.settings.checkpoint_interval_ms;
        let parts: Vec<i32> = self.partitions.keys().copied().collect();
        for p in parts {
            let quiet_at = self.quiet_at(p);
            let Some(work) = self.partitions.get_mut(&p) else {
                continue;
            };
            // Idle flush judged at a moment when nothing of the partition waited unread: after
            // a restart, a stall or a pause, a device's next events may still be in the topic.
            if let Some(at) = quiet_at {
                work.cleaner.tick(at);
            }
            if work.cleaner.has_released() {
                let released = work.cleaner.drain_released();
                work.batcher.extend(released.into_iter().map(|r| r.event), now);
            }
            let due = work.batcher.is_due(now)
                || (work.batcher.is_empty()
                    && work.dirty
                    && now.saturating_sub(work.last_checkpoint_ms) >= interval);
            work.counts.flush();
            let delay = work.cleaner.max_watermark().map(|wm| {
                let wall = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as i64)
                    .unwrap_or(0);
                (wall - wm) as f64 / 1000.0
            });
            metrics::partition_gauges(p, work.cleaner.buffered_len(), work.cleaner.dedup_len(), delay);
            if due {
                self.checkpoint(p, now).await;
            }
            self.apply_backpressure(p);
        }
    }

    /// The latest processing time at which the partition had nothing unread: the time a high
    /// watermark was asked for, if everything below it has been read since.
    fn quiet_at(&self, partition: i32) -> Option<u64> {
        let work = self.partitions.get(&partition)?;
        let (high, asked_at) = *self
            .high_watermarks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&partition)?;
        (high >= 0 && work.next_offset >= high).then_some(asked_at)
    }

    /// Pauses a partition whose outbox is full; resumes it once half has drained.
    fn apply_backpressure(&mut self, partition: i32) {
        let max = self.settings.max_outbox_per_partition.max(1);
        let Some(work) = self.partitions.get_mut(&partition) else {
            return;
        };
        let pending = work.sender.pending.load(Ordering::SeqCst);
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.settings.kafka_topic, partition);
        if !work.paused && pending >= max {
            if self.consumer.pause(&tpl).is_ok() {
                work.paused = true;
                tracing::info!(partition, pending, "outbox full, partition paused");
            }
        } else if work.paused && pending <= max / 2 && self.consumer.resume(&tpl).is_ok() {
            work.paused = false;
            tracing::info!(partition, pending, "outbox drained, partition resumed");
        }
    }

    /// One checkpoint of one partition: every released event into outbox batches, with the
    /// state that led to them and the resume offset, in one transaction; then hand the batches
    /// to the partition's sender.
    async fn checkpoint(&mut self, partition: i32, now: u64) {
        let topic = self.settings.kafka_topic.clone();
        let Some(work) = self.partitions.get_mut(&partition) else {
            return;
        };
        // Dead letters are stored before the offsets move past their events.
        for h in work.dead_letters.drain(..) {
            let _ = h.await;
        }
        failpoint::hit("after_consume_before_checkpoint");
        let resume_offset = work.cleaner.min_buffered_offset().unwrap_or(work.next_offset);
        let changes = work.cleaner.take_changes();
        let batches: Vec<OutboxBatch> = work
            .batcher
            .take_batches()
            .into_iter()
            .map(|events| {
                let seq = work.next_seq;
                work.next_seq += 1;
                OutboxBatch {
                    id: format!("{topic}-{partition}-{seq}"),
                    partition,
                    seq,
                    resume_offset,
                    events: events.len(),
                    body: serde_json::to_vec(&events).expect("events serialize").into(),
                }
            })
            .collect();
        let cp = Checkpoint {
            partition,
            batches: batches.clone(),
            changes,
            resume_offset,
            next_seq: work.next_seq,
        };
        work.dirty = false;
        work.last_checkpoint_ms = now;
        // The main loop goes on reading while the store commits; what must follow the commit
        // (resume offset, handing batches to the sender, committing to Kafka) runs after it,
        // on the store's thread, in checkpoint order. A bounded number wait at once.
        let slot = Arc::clone(&self.checkpoint_slots)
            .acquire_owned()
            .await
            .expect("never closed");
        let sender = work.sender.clone();
        let resume = Arc::clone(&self.resume);
        let consumer = Arc::clone(&self.consumer);
        let assigned = Arc::clone(&self.shared.assigned);
        let queued = self.store.checkpoint_then(cp, move |result| {
            let _slot = slot;
            match result {
                Ok(seconds) => metrics::checkpoint(seconds),
                Err(e) => fatal("checkpoint failed", e),
            }
            resume
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(partition, resume_offset);
            failpoint::hit("after_checkpoint_before_post");
            if batches.is_empty() && sender.pending.load(Ordering::SeqCst) == 0 {
                commit(&consumer, &assigned, &topic, partition, resume_offset);
            }
            for b in batches {
                metrics::emitted(b.events);
                sender.push(partition, b);
            }
        });
        if let Err(e) = queued {
            fatal("checkpoint could not be queued", e);
        }
        self.apply_backpressure(partition);
    }

    async fn on_rebalance(&mut self, event: Rebalanced) {
        match event {
            Rebalanced::Assigned(parts) => {
                if !parts.is_empty() {
                    self.ready.store(true, Ordering::SeqCst);
                }
            }
            Rebalanced::Revoked(parts) => {
                let now = self.now_ms();
                for p in parts {
                    if self.partitions.contains_key(&p) {
                        // What was released is checkpointed and delivered; what waits in the
                        // reorder buffer is read again by the partition's next owner.
                        self.checkpoint(p, now).await;
                        self.partitions.remove(&p);
                        tracing::info!(partition = p, "partition revoked, state checkpointed");
                    }
                }
            }
        }
    }

    /// Shutdown: checkpoint every partition, let the senders deliver the outbox within the
    /// shutdown timeout, then stop. What is left stays in the outbox for the next start.
    async fn drain(mut self) {
        tracing::info!("draining: checkpointing and delivering the outbox");
        let now = self.now_ms();
        let parts: Vec<i32> = self.partitions.keys().copied().collect();
        for p in parts {
            self.checkpoint(p, now).await;
        }
        self.partitions.clear();
        // Every queued checkpoint has committed (and handed its batches over) once all slots
        // are free again.
        let _all = self.checkpoint_slots.acquire_many(4).await.expect("never closed");
        let deadline = Instant::now() + Duration::from_millis(self.settings.shutdown_timeout_ms);
        let senders: Vec<(SenderHandle, JoinHandle<()>)> = self.senders.drain().map(|(_, s)| s).collect();
        let mut tasks = Vec::new();
        for (handle, task) in senders {
            drop(handle);
            tasks.push(task);
        }
        let cancel = self.shared.cancel.clone();
        let all = futures::future::join_all(tasks);
        tokio::pin!(all);
        tokio::select! {
            _ = &mut all => tracing::info!("outbox delivered"),
            _ = tokio::time::sleep_until(deadline.into()) => {
                tracing::warn!("shutdown timeout: undelivered batches stay in the outbox for the next start");
                cancel.cancel();
                all.await;
            }
        }
    }
}
