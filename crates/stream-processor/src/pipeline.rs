//! The drivers around the partition state machines (the exactly-once protocol and partition
//! ownership of README.md, "Cleanup rules and the guarantee"). One task owns every assigned [`Partition`] and feeds it what the
//! consumer thread reads, timer ticks, checkpoint commits and sink acknowledgements; it carries
//! out what the partition returns: a checkpoint goes to the partition's transactional writer,
//! a batch to a sender task (one in flight per partition).
//!
//! Assignment of p: create p's writer (its `init_transactions` fences every earlier owner),
//! restore p's state (local cache, then changelog), start reading at its resume offset, resend
//! its outbox. Revocation of p: stop feeding p, checkpoint what was released, wait for the
//! batch in flight within a deadline, drop p.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::Consumer;
use rdkafka::TopicPartitionList;
use service_common::kafka::{Connection, KafkaConfig};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::admin::Health;
use crate::consumer::{GroupConsumer, Input};
use crate::failpoint::{self, Step};
use crate::metrics;
use crate::partition::{Actions, Partition, PartitionConfig};
use crate::restore::{self, Source};
use crate::sink::{Delivery, Sink};
use crate::store::StateStore;
use crate::txn::{self, Topics, TxnOutcome, TxnWriter};
use crate::Settings;

/// An assigned partition: its state machine, its writer, and the token that stops its sends.
#[derive(Debug)]
struct Owned {
    /// Which assignment of the partition in this process: results of an earlier one (a writer
    /// or a send still finishing after its partition was lost) are ignored.
    generation: u64,
    core: Partition,
    writer: TxnWriter,
    cancel: CancellationToken,
    paused: bool,
}

/// What restoring a partition needs, cloned off the pipeline so restores run side by side.
#[derive(Clone)]
struct Restorer {
    settings: Arc<Settings>,
    cache: StateStore,
    admin: Arc<AdminClient<DefaultClientContext>>,
    producer_config: KafkaConfig,
    conn: Connection,
    topics: Topics,
    txn_done: mpsc::UnboundedSender<(i32, u64, TxnOutcome)>,
    consumer: Arc<GroupConsumer>,
    writer_prefix: String,
}

/// The pipeline.
pub struct Pipeline {
    settings: Arc<Settings>,
    consumer: Option<Arc<GroupConsumer>>,
    inputs: mpsc::Receiver<Input>,
    consumer_stop: Arc<AtomicBool>,
    restorer: Restorer,
    sink: Sink,
    health: Arc<Health>,
    txn_done: mpsc::UnboundedReceiver<(i32, u64, TxnOutcome)>,
    acks_tx: mpsc::UnboundedSender<(i32, u64, i64, Delivery)>,
    acks: mpsc::UnboundedReceiver<(i32, u64, i64, Delivery)>,
    owned: HashMap<i32, Owned>,
    assignments: u64,
    clock: Clock,
    last_tick_ms: u64,
    /// Per partition: the high watermark and the processing time it was asked for.
    high_watermarks: Arc<Mutex<HashMap<i32, (i64, u64)>>>,
    first_delivered: bool,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("topic", &self.settings.kafka.topic)
            .field("partitions", &self.owned.len())
            .finish()
    }
}

/// The pieces the pipeline is built from (see `startup`).
#[allow(missing_debug_implementations)]
pub struct Parts {
    pub settings: Arc<Settings>,
    /// How every client of the pipeline connects (resolved once at start).
    pub conn: Connection,
    pub consumer: Arc<GroupConsumer>,
    pub inputs: mpsc::Receiver<Input>,
    pub consumer_stop: Arc<AtomicBool>,
    pub cache: StateStore,
    pub health: Arc<Health>,
    /// Unique to this process: checkpoint ids start with it.
    pub writer_prefix: String,
}

impl Pipeline {
    pub fn new(parts: Parts) -> anyhow::Result<Pipeline> {
        let Parts {
            settings,
            conn,
            consumer,
            inputs,
            consumer_stop,
            cache,
            health,
            writer_prefix,
        } = parts;
        let admin: AdminClient<DefaultClientContext> =
            conn.config().create().context("creating the admin client")?;
        // Each partition's writer adds its `transactional.id` (`txn::transactional_id`).
        let mut producer_config = service_common::kafka::idempotent_producer(&conn);
        // The producer keeps lz4 (from `idempotent_producer`): long changelog records come
        // compressed already and barely grow, but a dead letter is the input's payload as read,
        // which fit the broker's limit compressed and may not uncompressed.
        producer_config
            .set("linger.ms", "1")
            .set("message.max.bytes", "16777216")
            .set("transaction.timeout.ms", "60000");
        let (txn_tx, txn_done) = mpsc::unbounded_channel();
        let (acks_tx, acks) = mpsc::unbounded_channel();
        let sink = Sink::new(
            &settings.ingest_url,
            Duration::from_millis(settings.sink_timeout_ms),
            Duration::from_millis(settings.retry_backoff_min_ms),
            Duration::from_millis(settings.retry_backoff_max_ms),
            health.blocked.clone(),
        );
        let topics = Topics {
            input: settings.kafka.topic.clone(),
            changelog: settings.changelog(),
            dlq: settings.dlq_topic.clone(),
        };
        Ok(Pipeline {
            restorer: Restorer {
                settings: Arc::clone(&settings),
                cache,
                admin: Arc::new(admin),
                producer_config,
                conn,
                topics,
                txn_done: txn_tx,
                consumer: Arc::clone(&consumer),
                writer_prefix,
            },
            settings,
            consumer: Some(consumer),
            inputs,
            consumer_stop,
            sink,
            health,
            txn_done,
            acks_tx,
            acks,
            owned: HashMap::new(),
            assignments: 0,
            clock: Clock::new(),
            last_tick_ms: 0,
            high_watermarks: Arc::new(Mutex::new(HashMap::new())),
            first_delivered: false,
        })
    }

    fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// Runs until `shutdown` resolves, then drains (checkpoint, deliver, hand over). Returns an
    /// error when the processor must stop at once: fenced by another owner, a checkpoint the
    /// broker keeps refusing (or whose writer panicked), a fatal consumer error. A restart
    /// resumes from the last checkpoint.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let watcher = tokio::spawn(watch_high_watermarks(
            Arc::clone(self.consumer.as_ref().expect("consumer")),
            self.settings.kafka.topic.clone(),
            Arc::clone(&self.high_watermarks),
            self.clock,
        ));
        let tick_ms = self.settings.batch_linger_ms.clamp(10, 100);
        let mut tick = tokio::time::interval(Duration::from_millis(tick_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        tokio::pin!(shutdown);
        let result: anyhow::Result<()> = loop {
            let step = tokio::select! {
                // Commits and acknowledgements first (they unblock sends), then input; the
                // timer still runs under sustained input (checked below).
                biased;
                _ = &mut shutdown => break Ok(()),
                Some((p, generation, outcome)) = self.txn_done.recv() => self.on_txn(p, generation, outcome),
                Some((p, generation, seq, d)) = self.acks.recv() => self.on_ack(p, generation, seq, d),
                input = self.inputs.recv() => match input {
                    Some(input) => self.on_input(input).await,
                    None => Err(anyhow!("the consumer thread stopped")),
                },
                _ = tick.tick() => self.on_tick(),
            };
            if let Err(e) = step {
                break Err(e);
            }
            if self.now_ms().saturating_sub(self.last_tick_ms) >= tick_ms {
                if let Err(e) = self.on_tick() {
                    break Err(e);
                }
            }
        };
        watcher.abort();
        let _ = watcher.await;
        match result {
            Ok(()) => {
                let drained = self.drain().await;
                self.close().await;
                drained
            }
            Err(e) => {
                // Nothing more may be written for these partitions; leave at once.
                self.consumer_stop.store(true, Ordering::SeqCst);
                Err(e)
            }
        }
    }

    async fn on_input(&mut self, input: Input) -> anyhow::Result<()> {
        match input {
            Input::Messages(msgs) => {
                let now = self.now_ms();
                for m in msgs {
                    let Some(o) = self.owned.get_mut(&m.partition) else {
                        continue;
                    };
                    let actions = o.core.on_event(m.key.as_deref(), &m.payload, m.offset, now);
                    self.act(m.partition, actions)?;
                }
                Ok(())
            }
            Input::Assign(parts, reply) => {
                let offsets = self.assign(parts).await?;
                self.health.assigned.store(true, Ordering::SeqCst);
                let _ = reply.send(offsets);
                Ok(())
            }
            Input::Revoke(parts, lost, reply) => {
                self.revoke(&parts, lost).await?;
                let _ = reply.send(());
                Ok(())
            }
            Input::Fatal(why) => Err(anyhow!(why)),
        }
    }

    /// Carries out what a partition asked for.
    fn act(&mut self, p: i32, actions: Actions) -> anyhow::Result<()> {
        let Some(o) = self.owned.get_mut(&p) else {
            return Ok(());
        };
        if let Some(plan) = actions.checkpoint {
            failpoint::hit(Step::AfterConsumeBeforeCheckpoint);
            for &events in &plan.batch_sizes {
                metrics::emitted(events);
            }
            if !o.writer.submit(plan) {
                bail!("the checkpoint writer of partition {p} stopped");
            }
        }
        if let Some(batch) = actions.send {
            let sink = self.sink.clone();
            let cancel = o.cancel.clone();
            let acks = self.acks_tx.clone();
            let generation = o.generation;
            tokio::spawn(async move {
                let d = sink.deliver(&batch, &cancel).await;
                let _ = acks.send((p, generation, batch.seq, d));
            });
        }
        Ok(())
    }

    fn owns(&self, p: i32, generation: u64) -> bool {
        self.owned.get(&p).is_some_and(|o| o.generation == generation)
    }

    fn on_txn(&mut self, p: i32, generation: u64, outcome: TxnOutcome) -> anyhow::Result<()> {
        if !self.owns(p, generation) {
            // A writer of a partition released since (lost while committing): whatever it says
            // concerns an owner that no longer exists here.
            tracing::debug!(
                partition = p,
                generation,
                "result of a released partition's writer ignored"
            );
            return Ok(());
        }
        match outcome {
            TxnOutcome::Committed {
                number,
                seconds,
                snapshot,
                bytes,
            } => {
                metrics::checkpoint(seconds, snapshot);
                failpoint::hit(Step::AfterCheckpointBeforePost);
                let now = self.now_ms();
                if let Some(o) = self.owned.get_mut(&p) {
                    let actions = o.core.on_committed(number, bytes, now);
                    self.act(p, actions)?;
                }
                Ok(())
            }
            TxnOutcome::Fenced(e) => Err(anyhow!(
                "partition {p} was taken over by another processor (its producer is fenced: {e}); \
                 stopping so that nothing more is written for it"
            )),
            TxnOutcome::Failed(e) => Err(anyhow!("partition {p}: its checkpoint failed: {e}")),
        }
    }

    fn on_ack(&mut self, p: i32, generation: u64, seq: i64, delivery: Delivery) -> anyhow::Result<()> {
        if !self.owns(p, generation) {
            return Ok(());
        }
        let now = self.now_ms();
        match delivery {
            Delivery::Acknowledged { replayed } => {
                failpoint::hit(Step::AfterPostBeforeAckRecorded);
                if !self.first_delivered {
                    self.first_delivered = true;
                    let secs = self.clock.start.elapsed().as_secs_f64();
                    metrics::restart_to_first_batch(secs);
                    tracing::info!(
                        seconds = secs,
                        partition = p,
                        seq,
                        replayed,
                        "first batch delivered since start"
                    );
                }
                if let Some(o) = self.owned.get_mut(&p) {
                    let actions = o.core.on_acknowledged(seq, now);
                    self.act(p, actions)?;
                }
            }
            Delivery::TooLarge { answer } => {
                if let Some(o) = self.owned.get_mut(&p) {
                    let (limit, actions) = o.core.on_too_large(seq, now);
                    if let Some(limit) = limit {
                        metrics::batch_split(p);
                        tracing::warn!(
                            partition = p,
                            seq,
                            answer = %answer,
                            limit,
                            hint = "lower BATCH_SIZE to at most the sink's MAX_BATCH_LEN (and its MAX_BODY_BYTES)",
                            "sink refuses the batch as too large; the outbox is split into batches of at most `limit` events (checkpointed, nothing lost)"
                        );
                    }
                    self.act(p, actions)?;
                }
            }
            Delivery::Cancelled => {
                if let Some(o) = self.owned.get_mut(&p) {
                    o.core.on_send_abandoned(seq);
                }
            }
        }
        Ok(())
    }

    fn on_tick(&mut self) -> anyhow::Result<()> {
        let now = self.now_ms();
        self.last_tick_ms = now;
        let high_watermarks = self
            .high_watermarks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let parts: Vec<i32> = self.owned.keys().copied().collect();
        for p in parts {
            let quiet_at = self.quiet_at(p);
            let Some(o) = self.owned.get_mut(&p) else { continue };
            let actions = o.core.on_tick(now, quiet_at);
            metrics::outcomes(o.core.take_counts());
            let delay = o
                .core
                .max_watermark()
                .map(|wm| (wall_clock_ms() - wm) as f64 / 1000.0);
            metrics::partition_gauges(p, o.core.buffered_len(), o.core.dedup_len(), delay);
            let (devices, evicted, forgotten) = o.core.devices();
            metrics::devices(p, devices, evicted, forgotten);
            metrics::outbox(p, o.core.outbox_len());
            // Lag from the high watermark the watcher last saw (librdkafka's own figure needs
            // offsets committed by the consumer; here the checkpoint transactions commit them).
            if let Some(high) = high_watermarks.get(&p).map(|(h, _)| *h).filter(|h| *h >= 0) {
                metrics::lag(p, (high - o.core.next_offset()).max(0));
            }
            self.act(p, actions)?;
            self.apply_backpressure(p);
        }
        Ok(())
    }

    /// The latest processing time at which the partition had nothing unread: the time a high
    /// watermark was asked for, if everything below it has been read since.
    fn quiet_at(&self, partition: i32) -> Option<u64> {
        let o = self.owned.get(&partition)?;
        let (high, asked_at) = *self
            .high_watermarks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&partition)?;
        (high >= 0 && o.core.next_offset() >= high).then_some(asked_at)
    }

    /// Pauses a partition whose outbox is full; resumes it once half has drained.
    fn apply_backpressure(&mut self, partition: i32) {
        let max = self.settings.max_outbox_per_partition;
        let Some(consumer) = self.consumer.as_deref() else {
            return;
        };
        let Some(o) = self.owned.get_mut(&partition) else {
            return;
        };
        let pending = o.core.outbox_len();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.settings.kafka.topic, partition);
        if !o.paused && o.core.outbox_full(max) {
            if consumer.pause(&tpl).is_ok() {
                o.paused = true;
                tracing::info!(partition, pending, "outbox full, partition paused");
            }
        } else if o.paused && o.core.outbox_drained(max) && consumer.resume(&tpl).is_ok() {
            o.paused = false;
            tracing::info!(partition, pending, "outbox drained, partition resumed");
        }
    }

    /// Takes over `parts`: fences earlier owners, restores each one's state (side by side),
    /// and answers where to start reading each.
    async fn assign(&mut self, parts: Vec<i32>) -> anyhow::Result<Vec<(i32, Option<i64>)>> {
        let new: Vec<i32> = parts
            .iter()
            .copied()
            .filter(|p| !self.owned.contains_key(p))
            .collect();
        let now = self.now_ms();
        let restores = new.iter().map(|&p| {
            self.assignments += 1;
            self.restorer.clone().take_over(p, self.assignments, now)
        });
        for result in futures::future::join_all(restores).await {
            let (p, generation, core, writer, regressed) = result?;
            self.resume_partition(p);
            self.high_watermarks
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                // Stamped now: a fetch that began before this assignment cannot land in it.
                .insert(p, (-1, now));
            let mut owned = Owned {
                generation,
                core,
                writer,
                cancel: CancellationToken::new(),
                paused: false,
            };
            metrics::sink_blocked(p, false);
            metrics::partition_stopped(p, regressed.is_some());
            if let Some((decided, log_end)) = regressed {
                tracing::error!(
                    partition = p,
                    decided_offset = decided,
                    log_end,
                    "the topic's log ends before this partition's committed position (the broker lost acknowledged writes, or the topic was recreated); the partition is stopped rather than skipping every event below that position"
                );
                owned.core.stop(true);
                self.health.blocked.block(
                    p,
                    format!("topic log ends at {log_end}, before the committed position {decided}"),
                );
            }
            // Resend the restored outbox, in order.
            let actions = owned.core.on_tick(now, None);
            self.owned.insert(p, owned);
            self.act(p, actions)?;
        }
        metrics::partitions_owned(self.owned.len());
        Ok(parts
            .iter()
            .map(|p| {
                (
                    *p,
                    self.owned.get(p).map(|o| o.core.next_offset()).filter(|o| *o > 0),
                )
            })
            .collect())
    }

    /// Hands `parts` over: stop feeding them, checkpoint what was released, let the batch in
    /// flight finish within the revoke timeout, drop them. Lost partitions (another member may
    /// own them already) are dropped at once: their next owner resumes from the last commit.
    async fn revoke(&mut self, parts: &[i32], lost: bool) -> anyhow::Result<()> {
        if lost {
            for &p in parts {
                self.release(p);
            }
            metrics::partitions_owned(self.owned.len());
            return Ok(());
        }
        let now = self.now_ms();
        for &p in parts {
            if let Some(o) = self.owned.get_mut(&p) {
                o.core.stop(false);
                let actions = o.core.flush(now);
                self.act(p, actions)?;
            }
        }
        failpoint::hit(Step::DuringRevoke);
        self.settle(parts, Duration::from_millis(self.settings.revoke_timeout_ms))
            .await?;
        for &p in parts {
            if self.owned.contains_key(&p) {
                self.release(p);
                tracing::info!(partition = p, "partition handed over: checkpoint committed");
            }
        }
        metrics::partitions_owned(self.owned.len());
        Ok(())
    }

    /// Serves commits and acknowledgements until each of `parts` is settled (or, past the
    /// timeout, at least has everything recorded), pushing further checkpoints as they come due.
    async fn settle(&mut self, parts: &[i32], timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let now = self.now_ms();
            for &p in parts {
                if let Some(o) = self.owned.get_mut(&p) {
                    let actions = o.core.flush(now);
                    self.act(p, actions)?;
                }
            }
            let late = Instant::now() >= deadline;
            let done = parts.iter().all(|p| {
                self.owned
                    .get(p)
                    .is_none_or(|o| o.core.is_settled() || (late && o.core.is_recorded()))
            });
            if done {
                return Ok(());
            }
            tokio::select! {
                Some((p, generation, outcome)) = self.txn_done.recv() => self.on_txn(p, generation, outcome)?,
                Some((p, generation, seq, d)) = self.acks.recv() => self.on_ack(p, generation, seq, d)?,
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
    }

    /// Clears a pause this process set on `p` (librdkafka keeps it across reassignment).
    fn resume_partition(&self, p: i32) {
        if let Some(consumer) = self.consumer.as_deref() {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(&self.settings.kafka.topic, p);
            let _ = consumer.resume(&tpl);
        }
    }

    fn release(&mut self, p: i32) {
        if let Some(o) = self.owned.remove(&p) {
            o.cancel.cancel();
            drop(o.writer);
            if o.paused {
                self.resume_partition(p);
            }
        }
        self.health.blocked.clear(p);
        metrics::partition_stopped(p, false);
        self.high_watermarks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&p);
    }

    /// Shutdown: checkpoint every partition, deliver the outbox within the shutdown timeout,
    /// record the acknowledgements, release everything.
    async fn drain(&mut self) -> anyhow::Result<()> {
        tracing::info!("draining: checkpointing and delivering the outbox");
        let now = self.now_ms();
        let parts: Vec<i32> = self.owned.keys().copied().collect();
        for &p in &parts {
            if let Some(o) = self.owned.get_mut(&p) {
                o.core.stop(true);
                let actions = o.core.flush(now);
                self.act(p, actions)?;
            }
        }
        self.settle(&parts, Duration::from_millis(self.settings.shutdown_timeout_ms))
            .await?;
        let left: usize = self.owned.values().map(|o| o.core.outbox_len()).sum();
        if left > 0 {
            tracing::warn!(
                batches = left,
                "shutdown timeout: undelivered batches stay in the changelog for the next owner"
            );
        } else {
            tracing::info!("outbox delivered");
        }
        for p in parts {
            self.release(p);
        }
        Ok(())
    }

    /// Stops the consumer thread and answers its last rebalance callbacks until it has closed.
    async fn close(self) {
        // Only the input channel is kept: every other holder of the consumer goes, so the
        // consumer thread's drop is the last one and closes it there.
        let Pipeline {
            mut inputs,
            consumer_stop,
            consumer,
            restorer,
            ..
        } = self;
        drop(consumer);
        drop(restorer);
        consumer_stop.store(true, Ordering::SeqCst);
        let deadline = tokio::time::sleep(Duration::from_secs(15));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut deadline => {
                    tracing::warn!("the consumer did not close in time");
                    return;
                }
                input = inputs.recv() => match input {
                    None => return,
                    Some(Input::Assign(parts, reply)) => {
                        let _ = reply.send(parts.into_iter().map(|p| (p, None)).collect());
                    }
                    Some(Input::Revoke(_, _, reply)) => {
                        let _ = reply.send(());
                    }
                    Some(_) => {}
                },
            }
        }
    }
}

impl Restorer {
    fn partition_config(&self, p: i32, writer: String) -> PartitionConfig {
        let s = &self.settings;
        PartitionConfig {
            topic: s.kafka.topic.clone(),
            partition: p,
            cleanup: s.cleanup(),
            batch_size: s.batch_size,
            batch_linger_ms: s.batch_linger_ms,
            checkpoint_interval_ms: s.checkpoint_interval_ms,
            snapshot_min_bytes: s.snapshot_min_bytes,
            writer,
        }
    }

    /// Fences p's earlier owners (by initializing p's transactional producer), then restores
    /// p's last committed state.
    async fn take_over(
        self,
        p: i32,
        generation: u64,
        now: u64,
    ) -> anyhow::Result<(i32, u64, Partition, TxnWriter, Option<(i64, i64)>)> {
        let writer_id = format!("{}.{p}.{generation}", self.writer_prefix);
        let s = Arc::clone(&self.settings);
        let mut config = self.producer_config.clone();
        config.set(
            "transactional.id",
            txn::transactional_id(&s.group_id, &s.kafka.topic, p),
        );
        let (topics, cache, admin, consumer, done) = (
            self.topics.clone(),
            self.cache.clone(),
            Arc::clone(&self.admin),
            Arc::clone(&self.consumer),
            self.txn_done.clone(),
        );
        let writer = tokio::task::spawn_blocking(move || {
            TxnWriter::start(&config, p, generation, topics, cache, admin, consumer, done)
        })
        .await?
        .with_context(|| format!("partition {p}: initializing its transactional producer"))?;
        failpoint::hit(Step::DuringRestore);
        let cached = match self.cache.load(p).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(partition = p, error = %e, "local state cache unreadable; restoring from the changelog");
                None
            }
        };
        let (conn, changelog, topic) = (
            self.conn.clone(),
            self.topics.changelog.clone(),
            s.kafka.topic.clone(),
        );
        let timeout = Duration::from_millis(s.restore_timeout_ms);
        let restored = tokio::task::spawn_blocking(move || {
            restore::restore(&conn, &changelog, &topic, p, cached, timeout)
        })
        .await?
        .with_context(|| format!("partition {p}: restoring its state"))?;
        // The cache must hold exactly the restored state before the writer applies deltas to
        // it: rewrite it whenever the changelog added anything, forget it if there is nothing.
        match (&restored.position, restored.source) {
            (None, _) => self.cache.clear(p),
            (Some(pos), Source::Changelog | Source::CacheAndChangelog) => {
                self.cache.replace(p, &restored.state, pos)
            }
            (Some(_), Source::Cache | Source::CacheAheadOfChangelog) => {}
        }
        writer.set_base(restored.position.as_ref().map(|pos| (pos.offset, pos.id.clone())));
        metrics::restored(restored.source.as_str(), restored.seconds);
        tracing::info!(
            partition = p,
            source = restored.source.as_str(),
            seconds = restored.seconds,
            changelog_records = restored.records,
            changelog_bytes = restored.bytes,
            resume_offset = ?restored.state.resume_offset,
            next_seq = restored.state.next_seq,
            devices = restored.state.marks.len(),
            dedup_keys = restored.state.key_count(),
            outbox_batches = restored.state.outbox.len(),
            waiting_events = restored.state.waiting.len(),
            "partition state restored"
        );
        // The topic's log must reach the decided offset; if it does not, the partition stops
        // rather than skip new events or take them for the ones decided at their offsets.
        let decided = restored.state.log_must_reach();
        let regressed = if decided > 0 {
            let (c, t) = (Arc::clone(&self.consumer), s.kafka.topic.clone());
            let (_, high) =
                tokio::task::spawn_blocking(move || c.fetch_watermarks(&t, p, Duration::from_secs(10)))
                    .await?
                    .with_context(|| format!("partition {p}: reading the topic's log end"))?;
            (high < decided).then_some((decided, high))
        } else {
            None
        };
        let since_snapshot = restored.position.as_ref().map_or(0, |p| p.bytes_since_snapshot);
        let core = Partition::restore(
            self.partition_config(p, writer_id),
            restored.state,
            since_snapshot,
            now,
        );
        Ok((p, generation, core, writer, regressed))
    }
}

/// Processing time: milliseconds since the Unix epoch as of the process start, advanced by a
/// monotonic clock (so it never goes back within a process, and records persisted with it, such
/// as when a device was forgotten, mean the same on the next owner).
#[derive(Debug, Clone, Copy)]
struct Clock {
    start: Instant,
    epoch_ms: u64,
}

impl Clock {
    fn new() -> Self {
        Clock {
            start: Instant::now(),
            epoch_ms: wall_clock_ms().max(0) as u64,
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch_ms + self.start.elapsed().as_millis() as u64
    }
}

fn wall_clock_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Asks the broker for the high watermark of every owned partition twice a second, recording
/// the processing time each was asked at (before the request: conservative).
async fn watch_high_watermarks(
    consumer: Arc<GroupConsumer>,
    topic: String,
    marks: Arc<Mutex<HashMap<i32, (i64, u64)>>>,
    clock: Clock,
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
            let asked_at = clock.now_ms();
            let (c, t) = (Arc::clone(&consumer), topic.clone());
            let fetched =
                tokio::task::spawn_blocking(move || c.fetch_watermarks(&t, p, Duration::from_secs(1))).await;
            if let Ok(Ok((_, high))) = fetched {
                let mut marks = marks.lock().unwrap_or_else(|p| p.into_inner());
                // Only onto a slot older than this fetch (not one reset by a newer assignment).
                if let Some(slot) = marks.get_mut(&p).filter(|s| s.1 <= asked_at) {
                    *slot = (high, asked_at);
                }
            }
        }
    }
}
