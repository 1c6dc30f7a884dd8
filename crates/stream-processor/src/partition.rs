//! One input partition's processing as a pure state machine (no I/O, time passed in): the
//! cleaner, the batcher, the outbox, and the checkpoint and delivery protocol. The drivers in
//! `pipeline` feed it events, ticks, commits and acknowledgements and carry out what it
//! returns: a checkpoint to commit (one Kafka transaction), a batch to send.
//!
//! Protocol, per partition: a checkpoint takes the batches released since the last one, the
//! cleaner's changes, the dead letters decided, and the resume offset; at most one is in
//! flight. Its batches become sendable only once it committed. One batch is in flight to the
//! sink at a time, in sequence order; an acknowledgement is recorded by the next checkpoint.
//!
//! A batch the sink refuses as too large (413) is split, and the split is a checkpoint like any
//! other: the whole outbox is re-cut into batches of at most half the refused one's length, under
//! fresh sequence numbers, and the old ones are retired in the same commit. Only then is anything
//! sent again, so no owner ever sends both a batch and a part of it, and batch ids never repeat.
//! The batches after the refused one were never sent (one at a time, in order), so re-cutting
//! them too keeps the order. The lower limit stays for new batches while this owner lives.

use std::collections::VecDeque;

use bytes::Bytes;
use telemetry_core::{balanced_chunks, Batcher, Cleaner, CleanupConfig, Event, Forgotten, Outcome};

use crate::changelog::{batch_id, Commit, OffsetRanges, OutboxBatch, PartitionState, Record, StateDelta};

/// What a partition needs to know besides its state.
#[derive(Debug, Clone)]
pub struct PartitionConfig {
    pub topic: String,
    pub partition: i32,
    pub cleanup: CleanupConfig,
    pub batch_size: usize,
    pub batch_linger_ms: u64,
    /// Longest a state-only change (offsets, marks, acknowledgements) waits for a checkpoint.
    pub checkpoint_interval_ms: u64,
    /// A snapshot replaces the deltas once they outgrow the last snapshot or this size.
    pub snapshot_min_bytes: usize,
    /// Unique per owner instance: commit ids are `{writer}-{n}`.
    pub writer: String,
}

/// Why an event goes to the dead-letter topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Late,
    Invalid,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Late => "late",
            Reason::Invalid => "invalid",
        }
    }
}

/// An event for the dead-letter topic, written in the checkpoint that decided it.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub reason: Reason,
    pub detail: String,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub source_partition: i32,
    pub source_offset: i64,
}

/// A checkpoint to commit: changelog records, dead letters, and the consumer offset.
#[derive(Debug, Clone)]
pub struct CheckpointPlan {
    pub number: u64,
    pub records: Vec<Record>,
    pub dead_letters: Vec<DeadLetter>,
    /// The consumer offset committed with it (the resume offset).
    pub resume_offset: i64,
    /// Starts with a `Reset`: once committed, the log before it may be deleted.
    pub snapshot: bool,
    /// Events in each new batch it adds to the outbox (not counting re-cut ones).
    pub batch_sizes: Vec<usize>,
    /// When it splits the outbox: how many batches were replaced by how many.
    pub split: Option<(usize, usize)>,
}

impl CheckpointPlan {
    /// The records as the changelog and the cache hold them (long ones compressed). The
    /// partition's writer thread encodes them, off the thread that runs every partition, and
    /// reports their length back with the commit ([`Partition::on_committed`]).
    pub fn encode(&self) -> Vec<Vec<u8>> {
        self.records.iter().map(Record::encode).collect()
    }
}

/// The length of a checkpoint's encoded records: what its writer reports with the commit.
pub fn encoded_len(encoded: &[Vec<u8>]) -> usize {
    encoded.iter().map(Vec::len).sum()
}

/// What the drivers must do next for this partition.
#[derive(Debug, Default)]
pub struct Actions {
    pub checkpoint: Option<CheckpointPlan>,
    pub send: Option<OutboxBatch>,
}

/// Event outcomes since the drivers last took them (for metrics).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub consumed: u64,
    pub duplicate: u64,
    pub conflict: u64,
    pub late: u64,
    pub invalid: u64,
}

#[derive(Debug)]
struct InFlight {
    number: u64,
    batches: Vec<OutboxBatch>,
    acked: Option<i64>,
    snapshot: bool,
}

/// After a restore, the events below the committed decided offset are read again; they were
/// decided then, and are not decided again (against restored marks that already count later
/// events, an event could come out otherwise: stored after its dead letter, or late and lost).
#[derive(Debug)]
struct Replay {
    until: i64,
    /// The offsets below `until` that were waiting: exactly these go back into the buffers.
    /// `None` for a changelog that did not record them: those events are decided again.
    waiting: Option<OffsetRanges>,
}

/// One partition's state and protocol.
#[derive(Debug)]
pub struct Partition {
    cfg: PartitionConfig,
    cleaner: Cleaner,
    batcher: Batcher<Event>,
    next_offset: i64,
    /// Below this offset every event was decided in a committed checkpoint.
    decided_offset: i64,
    /// Reading again what the restored checkpoint decided; no checkpoint is taken meanwhile
    /// (the buffers are not whole until the decided offset is reached).
    replay: Option<Replay>,
    /// The decided offset of the last checkpoint taken: the waiting offsets below it are on
    /// the changelog, and those released since must be removed there.
    recorded_through: i64,
    /// Offsets below `recorded_through` released since the last checkpoint.
    released_below: Vec<i64>,
    /// The next checkpoint is a snapshot (the changelog's waiting offsets are not known).
    force_snapshot: bool,
    next_seq: i64,
    /// Committed batches not yet acknowledged, in sequence order.
    outbox: VecDeque<OutboxBatch>,
    sending: Option<i64>,
    /// The sink refused a batch as too large: the next checkpoint re-cuts the outbox into
    /// batches of at most this many events; nothing is sent until it commits.
    split_to: Option<usize>,
    /// Batches up to this sequence number are acknowledged, or retired by a split.
    acked_through: Option<i64>,
    acked_recorded: Option<i64>,
    dead_letters: Vec<DeadLetter>,
    dirty: bool,
    last_checkpoint_ms: u64,
    in_flight: Option<InFlight>,
    checkpoints: u64,
    bytes_since_snapshot: usize,
    snapshot_bytes: usize,
    stopped: bool,
    keep_sending: bool,
    counts: Counts,
}

impl Partition {
    /// The partition as its last committed checkpoint left it. `bytes_since_snapshot` is how
    /// much changelog the restore read after the latest snapshot began.
    pub fn restore(
        cfg: PartitionConfig,
        state: PartitionState,
        bytes_since_snapshot: usize,
        now: u64,
    ) -> Partition {
        let keys = state.seen_keys();
        let marks = state.marks.into_iter().collect();
        // Processing times in the state keep their age as of the last checkpoint: the writer's
        // clock and this one may differ, and no time passes for them while no owner runs.
        let rebase = |at: u64| match state.clock_ms {
            Some(then) => now.saturating_sub(then.saturating_sub(at)),
            None => at.min(now),
        };
        let forgotten: Vec<_> = state
            .forgotten
            .into_iter()
            .map(|(id, f)| {
                (
                    id,
                    Forgotten {
                        at_ms: rebase(f.at_ms),
                        ..f
                    },
                )
            })
            .collect();
        let until = state.forgotten_through_until.map(|until| match state.clock_ms {
            Some(then) => now.saturating_add(until.saturating_sub(then)),
            None => until,
        });
        let former = (state.forgotten_through, until);
        let resume = state.resume_offset.unwrap_or(0);
        let replay = (state.decided_offset > resume).then(|| Replay {
            until: state.decided_offset,
            waiting: state.waiting_known.then_some(state.waiting),
        });
        Partition {
            cleaner: Cleaner::restore(cfg.cleanup, marks, keys, now)
                .with_forgotten(forgotten)
                .with_former_floor(former.0, former.1, now),
            force_snapshot: state.resume_offset.is_some() && !state.waiting_known,
            replay,
            recorded_through: state.decided_offset,
            released_below: Vec::new(),
            batcher: Batcher::new(cfg.batch_size, cfg.batch_linger_ms),
            next_offset: resume,
            decided_offset: state.decided_offset,
            next_seq: state.next_seq,
            outbox: state.outbox.into_values().collect(),
            sending: None,
            split_to: None,
            acked_through: None,
            acked_recorded: None,
            dead_letters: Vec::new(),
            dirty: false,
            last_checkpoint_ms: now,
            in_flight: None,
            checkpoints: 0,
            bytes_since_snapshot,
            snapshot_bytes: 0,
            stopped: false,
            keep_sending: true,
            counts: Counts::default(),
            cfg,
        }
    }

    pub fn id(&self) -> i32 {
        self.cfg.partition
    }

    /// The next offset this partition expects to read.
    pub fn next_offset(&self) -> i64 {
        self.next_offset
    }

    /// Batches committed and not yet acknowledged.
    pub fn outbox_len(&self) -> usize {
        self.outbox.len()
    }

    pub fn buffered_len(&self) -> usize {
        self.cleaner.buffered_len()
    }

    pub fn dedup_len(&self) -> usize {
        self.cleaner.dedup_len()
    }

    pub fn max_watermark(&self) -> Option<i64> {
        self.cleaner.max_watermark()
    }

    /// Devices known, devices forgotten since this owner restored the partition, and forgotten
    /// devices' records kept.
    pub fn devices(&self) -> (usize, u64, usize) {
        (
            self.cleaner.device_count(),
            self.cleaner.evicted_total(),
            self.cleaner.forgotten_count(),
        )
    }

    pub fn take_counts(&mut self) -> Counts {
        std::mem::take(&mut self.counts)
    }

    /// One message read at `offset`.
    pub fn on_event(&mut self, key: Option<&[u8]>, payload: &[u8], offset: i64, now: u64) -> Actions {
        if self.stopped || offset < self.next_offset {
            // Stopped, or below the resume offset: the restored state already covers it.
            return Actions::default();
        }
        match self.replay.as_ref().filter(|r| offset < r.until) {
            Some(Replay {
                waiting: Some(waiting),
                ..
            }) => {
                // Decided before: what was waiting goes back as it was, the rest was released,
                // dropped or dead-lettered then.
                if waiting.contains(offset) {
                    if let Ok(event) = Event::from_json(payload) {
                        self.cleaner.rebuffer(event, offset, now);
                    }
                }
                self.next_offset = offset + 1;
            }
            // An older changelog: decided again (no dead letter below the decided offset).
            Some(Replay { waiting: None, .. }) => self.decide(key, payload, offset, now),
            None => {
                self.end_replay();
                self.decide(key, payload, offset, now);
            }
        }
        if self.replay.as_ref().is_some_and(|r| self.next_offset >= r.until) {
            self.end_replay();
        }
        self.take_released(now);
        self.next_actions(now, false)
    }

    /// The buffers are whole again: what waits at or below its device's watermark under this
    /// owner's settings (a lower lateness than the checkpoint's) is released, and checkpoints
    /// resume.
    fn end_replay(&mut self) {
        if self.replay.take().is_some() {
            self.cleaner.release_below_watermarks();
        }
    }

    fn decide(&mut self, key: Option<&[u8]>, payload: &[u8], offset: i64, now: u64) {
        self.next_offset = offset + 1;
        self.dirty = true;
        self.counts.consumed += 1;
        let dead = match Event::from_json(payload) {
            Err(e) => Some((Reason::Invalid, e.to_string())),
            Ok(event) => match self.cleaner.process(event, offset, now) {
                Outcome::Buffered => None,
                Outcome::Duplicate => {
                    self.counts.duplicate += 1;
                    None
                }
                Outcome::Conflict => {
                    self.counts.conflict += 1;
                    None
                }
                Outcome::Late(rule) => Some((Reason::Late, rule.detail().to_owned())),
            },
        };
        // Below `decided_offset` the dead letter was written with an earlier checkpoint.
        if let Some((reason, detail)) = dead.filter(|_| offset >= self.decided_offset) {
            match reason {
                Reason::Late => self.counts.late += 1,
                Reason::Invalid => self.counts.invalid += 1,
            }
            self.dead_letters.push(DeadLetter {
                reason,
                detail,
                key: key.map(<[u8]>::to_vec),
                payload: payload.to_vec(),
                source_partition: self.cfg.partition,
                source_offset: offset,
            });
        }
    }

    /// Timer: releases idle devices (judged at `quiet_at`, the latest processing time at which
    /// nothing of the partition waited unread) and checkpoints what is due.
    pub fn on_tick(&mut self, now: u64, quiet_at: Option<u64>) -> Actions {
        if !self.stopped {
            // Not while reading again: the buffers are not whole (and a stale "quiet" may come).
            if let Some(at) = quiet_at.filter(|_| self.replay.is_none()) {
                self.cleaner.tick(at);
            }
            self.take_released(now);
        }
        self.next_actions(now, false)
    }

    /// The checkpoint `number` is committed, its records `bytes` long encoded: its batches may
    /// go to the sink.
    pub fn on_committed(&mut self, number: u64, bytes: usize, now: u64) -> Actions {
        let Some(done) = self.in_flight.take_if(|f| f.number == number) else {
            return Actions::default();
        };
        self.outbox.extend(done.batches);
        if done.acked.is_some() {
            self.acked_recorded = done.acked;
        }
        if done.snapshot {
            self.snapshot_bytes = bytes;
            self.bytes_since_snapshot = 0;
        } else {
            self.bytes_since_snapshot = self.bytes_since_snapshot.saturating_add(bytes);
        }
        self.next_actions(now, false)
    }

    /// The sink acknowledged batch `seq` (the one in flight).
    pub fn on_acknowledged(&mut self, seq: i64, now: u64) -> Actions {
        if self.sending == Some(seq) {
            self.sending = None;
            if self.outbox.front().is_some_and(|b| b.seq == seq) {
                self.outbox.pop_front();
            }
            self.acked_through = Some(seq);
        }
        self.next_actions(now, false)
    }

    /// The sink refused batch `seq` (the one in flight) as too large. Returns the limit the
    /// outbox will be re-cut to, or `None` when the batch has one event (it cannot be split).
    pub fn on_too_large(&mut self, seq: i64, now: u64) -> (Option<usize>, Actions) {
        if self.sending != Some(seq) {
            return (None, Actions::default());
        }
        self.sending = None;
        let events = self
            .outbox
            .front()
            .filter(|b| b.seq == seq)
            .map_or(0, |b| b.events);
        if events <= 1 {
            // Not splittable (the sink reports this only for longer batches): send it again.
            return (None, self.next_actions(now, false));
        }
        let limit = events.div_ceil(2);
        self.split_to = Some(self.split_to.map_or(limit, |l| l.min(limit)));
        if self.batcher.max_len() > limit {
            self.batcher.set_max_len(limit);
        }
        (Some(limit), self.next_actions(now, true))
    }

    /// The send of batch `seq` was abandoned (shutdown or revocation): it stays in the outbox.
    pub fn on_send_abandoned(&mut self, seq: i64) {
        if self.sending == Some(seq) {
            self.sending = None;
        }
    }

    /// Whether the drivers should stop reading the partition: its outbox holds `max` batches
    /// or more. Never while reading again, which adds nothing to the outbox: until it ends
    /// nothing is checkpointed, not even the split a `413` asks for, so a paused partition
    /// would never get there.
    pub fn outbox_full(&self, max: usize) -> bool {
        self.replay.is_none() && self.outbox.len() >= max
    }

    /// Whether a paused partition may be read again: half its outbox has drained, or it must
    /// read again what it decided before.
    pub fn outbox_drained(&self, max: usize) -> bool {
        self.replay.is_some() || self.outbox.len() <= max / 2
    }

    /// Whether the events below the restored checkpoint's decided offset are still being read
    /// again (no checkpoint is taken meanwhile).
    pub fn is_replaying(&self) -> bool {
        self.replay.is_some()
    }

    /// Stops feeding the partition (revocation or shutdown); with `keep_sending`, the outbox
    /// still goes to the sink.
    pub fn stop(&mut self, keep_sending: bool) {
        self.stopped = true;
        self.keep_sending = keep_sending;
    }

    /// Checkpoints whatever is not yet recorded (if no checkpoint is in flight).
    pub fn flush(&mut self, now: u64) -> Actions {
        self.next_actions(now, true)
    }

    /// Nothing left to checkpoint, no checkpoint in flight, nothing being sent, and (when
    /// still sending) an empty outbox.
    pub fn is_settled(&self) -> bool {
        self.in_flight.is_none()
            && !self.has_unrecorded()
            && self.sending.is_none()
            && (!self.keep_sending || self.outbox.is_empty())
    }

    /// Nothing left to checkpoint and no checkpoint in flight (a send may still run).
    pub fn is_recorded(&self) -> bool {
        self.in_flight.is_none() && !self.has_unrecorded()
    }

    /// Something to checkpoint; never while reading again (stopped then, what was rebuilt is
    /// dropped: the next owner rebuilds it from the same checkpoint).
    fn has_unrecorded(&self) -> bool {
        self.replay.is_none() && self.has_changes()
    }

    fn has_changes(&self) -> bool {
        !self.batcher.is_empty()
            || self.dirty
            || !self.dead_letters.is_empty()
            || self.acked_through != self.acked_recorded
            || self.split_to.is_some()
            || self.cleaner.has_released()
            || self.cleaner.has_forgetting()
    }

    /// Roughly what a snapshot of this state would take on the changelog, in bytes.
    fn state_estimate(&self) -> usize {
        let outbox: usize = self.outbox.iter().map(|b| b.body.len()).sum();
        self.cleaner.dedup_len() * 40
            + (self.cleaner.device_count() + self.cleaner.forgotten_count()) * 48
            + outbox
    }

    fn take_released(&mut self, now: u64) {
        if self.cleaner.has_released() {
            let released = self.cleaner.drain_released();
            let below = self.recorded_through;
            self.released_below
                .extend(released.iter().map(|r| r.offset).filter(|o| *o < below));
            self.batcher.extend(released.into_iter().map(|r| r.event), now);
        }
    }

    fn next_actions(&mut self, now: u64, force: bool) -> Actions {
        let mut actions = Actions::default();
        if self.in_flight.is_none() {
            let interval_passed =
                now.saturating_sub(self.last_checkpoint_ms) >= self.cfg.checkpoint_interval_ms;
            // A split is taken at once: nothing is sent until it commits.
            let due = self.has_unrecorded()
                && (self.batcher.is_due(now) || interval_passed || force || self.split_to.is_some());
            if due {
                actions.checkpoint = Some(self.checkpoint(now));
            }
        }
        if self.sending.is_none() && self.split_to.is_none() && (!self.stopped || self.keep_sending) {
            if let Some(b) = self.outbox.front() {
                self.sending = Some(b.seq);
                actions.send = Some(b.clone());
            }
        }
        actions
    }

    /// Released offsets as few ranges as can be: two join when no offset between them waits
    /// (whatever lies between was not waiting, so removing it too changes nothing).
    fn removed_ranges(&self, mut released: Vec<i64>) -> Vec<(i64, i64)> {
        released.sort_unstable();
        let mut out: Vec<(i64, i64)> = Vec::new();
        for offset in released {
            match out.last_mut() {
                Some(last) if offset < last.1 => {}
                Some(last) if !self.cleaner.any_buffered_in(last.1, offset) => last.1 = offset + 1,
                _ => out.push((offset, offset + 1)),
            }
        }
        out
    }

    fn checkpoint(&mut self, now: u64) -> CheckpointPlan {
        self.take_released(now);
        let partition = self.cfg.partition;
        let resume_offset = self.cleaner.min_buffered_offset().unwrap_or(self.next_offset);
        // A split re-cuts the outbox first (it comes before the new batches), retiring it.
        let mut recut: Vec<Vec<Event>> = Vec::new();
        let mut split = None;
        if let Some(limit) = self.split_to.take() {
            let old = std::mem::take(&mut self.outbox);
            if let Some(last) = old.back() {
                self.acked_through = Some(last.seq);
            }
            for b in &old {
                let events: Vec<Event> = serde_json::from_slice(&b.body)
                    .expect("an outbox batch is the JSON array this partition wrote");
                recut.extend(balanced_chunks(events, limit));
            }
            split = Some((old.len(), recut.len()));
        }
        let fresh = self.batcher.take_batches();
        let batch_sizes = fresh.iter().map(Vec::len).collect();
        let batches: Vec<OutboxBatch> = recut
            .into_iter()
            .chain(fresh)
            .map(|events| {
                let seq = self.next_seq;
                self.next_seq += 1;
                OutboxBatch {
                    id: batch_id(&self.cfg.topic, partition, seq),
                    partition,
                    seq,
                    events: events.len(),
                    body: batch_body(&events),
                }
            })
            .collect();
        let changes = self.cleaner.take_changes();
        self.checkpoints += 1;
        let number = self.checkpoints;
        // A snapshot once the deltas outgrow the last snapshot, or twice the state as it is now
        // (after a wave of evictions the log, and the cache copying it, shrink back soon).
        let threshold = self
            .snapshot_bytes
            .min(2 * self.state_estimate())
            .max(self.cfg.snapshot_min_bytes);
        let snapshot = self.force_snapshot || self.bytes_since_snapshot >= threshold;
        self.force_snapshot = false;
        // Read again after a restore, the events below the committed decided offset were
        // decided then: the position never goes back, or their dead letters would be written
        // twice.
        let decided_offset = self.decided_offset.max(self.next_offset);
        // The waiting offsets below it: those released since the last checkpoint leave, the
        // ones read since and still waiting come in (a snapshot holds them all).
        let released = std::mem::take(&mut self.released_below);
        let (waiting_removed, waiting_added) = if snapshot {
            (Vec::new(), Vec::new())
        } else {
            (
                self.removed_ranges(released),
                self.cleaner.buffered_offset_ranges(self.recorded_through),
            )
        };
        self.recorded_through = decided_offset;
        let acked = (self.acked_through != self.acked_recorded)
            .then_some(self.acked_through)
            .flatten();
        let mut records = if snapshot {
            let (marks, keys) = self.cleaner.snapshot();
            let waiting = self.cleaner.buffered_offset_ranges(i64::MIN);
            let outbox = self.outbox.iter().chain(batches.iter()).cloned();
            let forgotten = self.cleaner.forgotten_records();
            let former = self.cleaner.former_floor();
            let former = (former.map(|f| f.through), former.map(|f| f.until_ms));
            PartitionState::snapshot_records(
                marks,
                keys,
                forgotten,
                waiting,
                former,
                outbox.collect::<Vec<_>>(),
            )
        } else {
            let mut records: Vec<Record> = batches
                .iter()
                .map(|b| Record::Batch {
                    seq: b.seq,
                    events: b.events,
                    body: b.body.clone(),
                })
                .collect();
            let delta = StateDelta {
                evicted: changes.evicted,
                forgotten: changes
                    .forgotten
                    .into_iter()
                    .map(|(d, f)| (d, f.through, f.at_ms))
                    .collect(),
                marks: changes
                    .devices
                    .into_iter()
                    .map(|(d, m)| (d, m.max_ts, m.released_max))
                    .collect(),
                keys: changes
                    .new_keys
                    .into_iter()
                    .map(|k| (k.device_id, k.ts, k.latitude_bits, k.longitude_bits))
                    .collect(),
                pruned: changes.pruned,
                waiting_removed,
                waiting_added,
                forgotten_through: None,
                former_floor: changes.former_floor.map(|f| (f.through, f.until_ms)),
            };
            records.extend(delta.into_chunks().into_iter().map(Record::State));
            records
        };
        records.push(Record::Commit(Commit {
            id: format!("{}-{number}", self.cfg.writer),
            resume_offset,
            decided_offset,
            waiting_known: true,
            clock_ms: Some(now),
            next_seq: self.next_seq,
            // A snapshot holds only unacknowledged batches already.
            acked_through: if snapshot { None } else { acked },
        }));
        // Dead letters of events read so far are written with this checkpoint.
        self.decided_offset = decided_offset;
        self.dirty = false;
        self.last_checkpoint_ms = now;
        self.in_flight = Some(InFlight {
            number,
            batches,
            acked,
            snapshot,
        });
        CheckpointPlan {
            number,
            records,
            dead_letters: std::mem::take(&mut self.dead_letters),
            resume_offset,
            snapshot,
            batch_sizes,
            split,
        }
    }
}

/// A batch's body: the JSON array of its events (sized up front; an event takes about 110
/// bytes, and a body that outgrows its buffer is copied each time the buffer doubles).
fn batch_body(events: &[Event]) -> Bytes {
    let mut out = Vec::with_capacity(events.len() * 128 + 2);
    serde_json::to_writer(&mut out, events).expect("events serialize");
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> PartitionConfig {
        PartitionConfig {
            topic: "t".into(),
            partition: 2,
            cleanup: CleanupConfig {
                allowed_lateness_ms: 100,
                dedup_horizon_ms: 10_000,
                idle_timeout_ms: 1_000,
                ..CleanupConfig::default()
            },
            batch_size: 3,
            batch_linger_ms: 50,
            checkpoint_interval_ms: 500,
            snapshot_min_bytes: usize::MAX,
            writer: "w".into(),
        }
    }

    fn ev(ts: i64) -> Vec<u8> {
        format!(r#"{{"deviceId":"d","ts":{ts},"latitude":1,"longitude":2}}"#).into_bytes()
    }

    fn with_cleanup(allowed_lateness_ms: i64, dedup_horizon_ms: i64) -> PartitionConfig {
        PartitionConfig {
            cleanup: CleanupConfig {
                allowed_lateness_ms,
                dedup_horizon_ms,
                idle_timeout_ms: 1_000,
                ..CleanupConfig::default()
            },
            ..cfg()
        }
    }

    /// Device d's events at (offset, ts), each checkpoint committed at once, then a flush;
    /// returns the dead letters written.
    fn feed(p: &mut Partition, state: &mut PartitionState, events: &[(i64, i64)]) -> Vec<DeadLetter> {
        let mut letters = Vec::new();
        for (o, ts) in events {
            let a = p.on_event(None, &ev(*ts), *o, 0);
            letters.extend(commit_through(p, state, a, 0).0);
        }
        let a = p.flush(0);
        letters.extend(commit_through(p, state, a, 0).0);
        letters
    }

    fn of(device: &str, ts: i64) -> Vec<u8> {
        format!(r#"{{"deviceId":"{device}","ts":{ts},"latitude":1,"longitude":2}}"#).into_bytes()
    }

    fn offsets(letters: &[DeadLetter]) -> Vec<i64> {
        letters.iter().map(|d| d.source_offset).collect()
    }

    /// Everything read is quiet at `now`: idle devices are released, then all is checkpointed
    /// and committed; returns the dead letters written.
    fn settle(p: &mut Partition, state: &mut PartitionState, now: u64) -> Vec<DeadLetter> {
        let a = p.on_tick(now, Some(now));
        let mut letters = commit_through(p, state, a, now).0;
        let a = p.flush(now);
        letters.extend(commit_through(p, state, a, now).0);
        letters
    }

    fn fresh() -> Partition {
        Partition::restore(cfg(), PartitionState::default(), 0, 0)
    }

    /// Applies a checkpoint's records to `state`, as the changelog and the cache do.
    fn apply(state: &mut PartitionState, plan: &CheckpointPlan) {
        for r in &plan.records {
            state.apply("t", 2, r);
        }
    }

    #[test]
    fn batches_are_sent_only_after_their_checkpoint_commits_and_one_at_a_time() {
        let mut p = fresh();
        let mut plan = None;
        for (i, ts) in [1000, 1100, 1200, 1300, 1400, 1500, 1600].into_iter().enumerate() {
            let a = p.on_event(Some(b"d"), &ev(ts), i as i64, 0);
            assert!(a.send.is_none(), "nothing is committed yet");
            if a.checkpoint.is_some() {
                assert!(plan.is_none(), "one checkpoint in flight at a time");
                plan = a.checkpoint;
            }
        }
        let plan = plan.expect("a full batch made a checkpoint");
        assert_eq!(plan.batch_sizes, vec![3]);
        let a = p.on_committed(plan.number, encoded_len(&plan.encode()), 1);
        let sent = a.send.expect("the committed batch goes out");
        assert_eq!(sent.id, "t-2-0");
        let next = a.checkpoint.expect("more released events wait");
        let a = p.on_committed(next.number, encoded_len(&next.encode()), 2);
        assert!(a.send.is_none(), "the first batch is still in flight");
        let a = p.on_acknowledged(0, 3);
        assert_eq!(a.send.map(|b| b.seq), Some(1));
    }

    #[test]
    fn late_and_invalid_events_go_out_with_the_checkpoint_that_decided_them() {
        let mut p = fresh();
        p.on_event(None, &ev(5000), 0, 0);
        p.on_event(None, &ev(100), 1, 0);
        p.on_event(None, b"not json", 2, 0);
        let plan = p.flush(0).checkpoint.expect("forced");
        let reasons: Vec<_> = plan
            .dead_letters
            .iter()
            .map(|d| (d.reason, d.source_offset))
            .collect();
        assert_eq!(reasons, vec![(Reason::Late, 1), (Reason::Invalid, 2)]);
        let Some(Record::Commit(c)) = plan.records.last() else {
            panic!("a checkpoint ends with its commit")
        };
        assert_eq!(
            (c.resume_offset, c.decided_offset),
            (0, 3),
            "5000 still waits at offset 0"
        );
    }

    /// Commits every checkpoint `actions` leads to at once (as a quick broker would), applying
    /// it to `state`; returns the dead letters written and the batches sent.
    fn commit_through(
        p: &mut Partition,
        state: &mut PartitionState,
        mut actions: Actions,
        now: u64,
    ) -> (Vec<DeadLetter>, Vec<OutboxBatch>) {
        let (mut letters, mut sent) = (Vec::new(), Vec::new());
        loop {
            sent.extend(actions.send.take());
            let Some(plan) = actions.checkpoint.take() else {
                return (letters, sent);
            };
            apply(state, &plan);
            letters.extend(plan.dead_letters.iter().cloned());
            actions = p.on_committed(plan.number, encoded_len(&plan.encode()), now);
        }
    }

    #[test]
    fn replay_after_restore_repeats_no_dead_letter_and_no_batch() {
        let mut p = fresh();
        let mut state = PartitionState::default();
        let stream: Vec<(i64, Vec<u8>)> = vec![
            (0, ev(1000)),
            (1, ev(1500)),
            (2, ev(10)),
            (3, b"{".to_vec()),
            (4, ev(1550)),
            (5, ev(1460)),
        ];
        let mut letters = Vec::new();
        for (o, payload) in &stream[..5] {
            let a = p.on_event(None, payload, *o, 0);
            letters.extend(commit_through(&mut p, &mut state, a, 0).0);
        }
        let a = p.flush(0);
        letters.extend(commit_through(&mut p, &mut state, a, 0).0);
        assert_eq!(letters.len(), 2, "one late, one invalid");
        // A new owner restores and reads again from the resume offset.
        let mut q = Partition::restore(cfg(), state.clone(), 0, 0);
        let resume = state.resume_offset.expect("committed");
        assert!(
            resume <= 1,
            "1500 and 1550 wait, so offsets from {resume} are read again"
        );
        let mut all = state.clone();
        let mut again = Vec::new();
        for (o, payload) in stream.iter().filter(|(o, _)| *o >= resume) {
            let a = q.on_event(None, payload, *o, 10);
            again.extend(commit_through(&mut q, &mut all, a, 10).0);
        }
        again.extend(settle(&mut q, &mut all, 5_000));
        assert!(again.is_empty(), "dead letters were written before: {again:?}");
        let ts: Vec<i64> = all
            .outbox
            .values()
            .flat_map(|b| serde_json::from_slice::<Vec<serde_json::Value>>(&b.body).expect("json"))
            .map(|e| e["ts"].as_i64().expect("ts"))
            .collect();
        assert_eq!(ts, vec![1000, 1460, 1500, 1550], "each event once, in order");
        assert_eq!(
            all.outbox.keys().copied().collect::<Vec<_>>(),
            (0..all.next_seq).collect::<Vec<_>>()
        );
    }

    #[test]
    fn acknowledgements_are_recorded_and_shrink_the_outbox() {
        let mut p = fresh();
        let mut state = PartitionState::default();
        let mut sent = Vec::new();
        for (i, ts) in [1000, 1100, 1200, 1300, 1400].into_iter().enumerate() {
            let a = p.on_event(None, &ev(ts), i as i64, 0);
            sent.extend(commit_through(&mut p, &mut state, a, 0).1);
        }
        let a = p.flush(0);
        sent.extend(commit_through(&mut p, &mut state, a, 0).1);
        assert_eq!(sent.len(), 1, "one batch in flight at a time");
        assert_eq!(p.outbox_len(), 2, "1000..1200, then 1300");
        let a = p.on_acknowledged(sent[0].seq, 1);
        assert!(!p.is_recorded(), "the acknowledgement is not recorded yet");
        let (_, more) = commit_through(&mut p, &mut state, a, 1);
        assert_eq!(
            more.len(),
            1,
            "the next batch goes once the first is acknowledged"
        );
        let a = p.on_acknowledged(more[0].seq, 1);
        commit_through(&mut p, &mut state, a, 1);
        let a = p.flush(2);
        commit_through(&mut p, &mut state, a, 2);
        assert!(
            state.outbox.is_empty(),
            "the recorded acknowledgement emptied the outbox"
        );
        assert!(p.is_settled());
    }

    #[test]
    fn a_snapshot_replaces_the_deltas_and_rebuilds_the_same_state() {
        let mut c = cfg();
        c.snapshot_min_bytes = 600;
        let mut p = Partition::restore(c, PartitionState::default(), 0, 0);
        let mut state = PartitionState::default();
        let mut snapshots = 0;
        for i in 0..60 {
            if let Some(plan) = p.on_event(None, &ev(1000 + i * 50), i, 0).checkpoint {
                snapshots += usize::from(plan.snapshot);
                apply(&mut state, &plan);
                p.on_committed(plan.number, encoded_len(&plan.encode()), 0);
            }
        }
        assert!(snapshots >= 2, "snapshots were taken: {snapshots}");
        let plan = p.flush(0).checkpoint.expect("forced");
        apply(&mut state, &plan);
        p.on_committed(plan.number, encoded_len(&plan.encode()), 0);
        // Replaying only from the last snapshot gives the same state as every record.
        assert_eq!(state.next_seq, p.next_seq);
        assert_eq!(state.key_count(), p.dedup_len());
        assert_eq!(state.outbox.len(), p.outbox_len());
    }

    #[test]
    fn a_stopped_partition_takes_no_events_and_sends_nothing_new() {
        let mut p = fresh();
        let mut plan = None;
        for (i, ts) in [1000, 1100, 1200, 1300, 1400].into_iter().enumerate() {
            plan = plan.or(p.on_event(None, &ev(ts), i as i64, 0).checkpoint);
        }
        let plan = plan.expect("a full batch made a checkpoint");
        p.stop(false);
        assert!(p.on_event(None, &ev(2000), 5, 0).checkpoint.is_none());
        assert_eq!(p.next_offset(), 5);
        let a = p.on_committed(plan.number, encoded_len(&plan.encode()), 0);
        assert!(a.send.is_none(), "a revoked partition starts no send");
        let last = a
            .checkpoint
            .or(p.flush(0).checkpoint)
            .expect("the rest is checkpointed");
        assert!(p
            .on_committed(last.number, encoded_len(&last.encode()), 0)
            .send
            .is_none());
        assert!(
            p.is_settled(),
            "revoked: settled once recorded, outbox left for the next owner"
        );
        assert_eq!(p.outbox_len(), 2);
    }

    fn outbox_ts(state: &PartitionState) -> Vec<i64> {
        state
            .outbox
            .values()
            .flat_map(|b| serde_json::from_slice::<Vec<serde_json::Value>>(&b.body).expect("json"))
            .map(|e| e["ts"].as_i64().expect("ts"))
            .collect()
    }

    #[test]
    fn a_batch_refused_as_too_large_splits_the_outbox_in_a_checkpoint_with_fresh_ids() {
        let mut p = fresh();
        let mut state = PartitionState::default();
        // Seven events released by an idle flush: batches of 3 (seq 0), 2 and 2 (seq 1, 2).
        for (i, ts) in (0..7).map(|i| 1000 + 10 * i).enumerate() {
            let a = p.on_event(None, &ev(ts), i as i64, 0);
            commit_through(&mut p, &mut state, a, 0);
        }
        let a = p.on_tick(2_000, Some(2_000));
        let (_, sent) = commit_through(&mut p, &mut state, a, 2_000);
        assert_eq!(sent.iter().map(|b| b.seq).collect::<Vec<_>>(), vec![0]);
        let before = outbox_ts(&state);
        assert_eq!(state.outbox.len(), 3);

        let (limit, a) = p.on_too_large(0, 2_001);
        assert_eq!(limit, Some(2), "half of the refused batch's 3 events, rounded up");
        assert!(a.send.is_none(), "nothing is sent before the split commits");
        let plan = a.checkpoint.expect("the split is a checkpoint");
        assert_eq!(plan.split, Some((3, 4)), "3 + 2 + 2 events re-cut to 2+1, 2, 2");
        assert!(
            plan.batch_sizes.is_empty(),
            "no new events: re-cut batches are not counted again"
        );
        apply(&mut state, &plan);
        assert_eq!(
            state.outbox.keys().copied().collect::<Vec<_>>(),
            vec![3, 4, 5, 6],
            "fresh ids only"
        );
        assert!(state.outbox.values().all(|b| b.events <= 2));
        assert_eq!(outbox_ts(&state), before, "same events, same order");
        assert!(
            p.on_tick(2_002, None).send.is_none(),
            "still waiting for the split's commit"
        );

        let a = p.on_committed(plan.number, encoded_len(&plan.encode()), 2_003);
        let first = a.send.expect("the first part goes out once the split committed");
        assert_eq!((first.seq, first.id.as_str(), first.events), (3, "t-2-3", 2));
        // A new owner restored from the changelog has the split outbox, not the old batches.
        let q = Partition::restore(cfg(), state.clone(), 0, 0);
        assert_eq!(q.outbox_len(), 4);
        // New batches of this owner respect the lower limit.
        for (i, ts) in (0..4).map(|i| 3000 + 10 * i).enumerate() {
            let a = p.on_event(None, &ev(ts), 7 + i as i64, 2_004);
            commit_through(&mut p, &mut state, a, 2_004);
        }
        let a = p.flush(2_004);
        commit_through(&mut p, &mut state, a, 2_004);
        let a = p.on_tick(9_000, Some(9_000));
        commit_through(&mut p, &mut state, a, 9_000);
        assert!(
            state.outbox.values().all(|b| b.events <= 2),
            "{:?}",
            state.outbox.values().map(|b| b.events).collect::<Vec<_>>()
        );
    }

    #[test]
    fn events_read_again_are_not_decided_again_and_new_settings_apply_from_the_decided_offset() {
        let mut p = fresh();
        let mut state = PartitionState::default();
        // Lateness 100 ms: 1000 and 1050 wait (offsets 0, 1), both decided by the checkpoint.
        for (o, ts) in [(0, 1000), (1, 1050)] {
            let a = p.on_event(None, &ev(ts), o, 0);
            commit_through(&mut p, &mut state, a, 0);
        }
        let a = p.flush(0);
        commit_through(&mut p, &mut state, a, 0);
        assert_eq!((state.resume_offset, state.decided_offset), (Some(0), 2));
        assert_eq!(state.waiting.ranges().collect::<Vec<_>>(), vec![(0, 2)]);
        // Restarted with lateness 10 ms: under it, 1000 is late behind 1050 and, being below the
        // decided offset, would get no dead letter if it were decided again: it would vanish.
        let mut strict = cfg();
        strict.cleanup.allowed_lateness_ms = 10;
        let mut q = Partition::restore(strict, state.clone(), 0, 0);
        assert!(q.is_replaying());
        let mut again = state.clone();
        let a = q.on_tick(10_000, Some(10_000));
        assert!(a.checkpoint.is_none(), "no checkpoint while reading again");
        let a = q.on_event(None, &ev(1000), 0, 1);
        assert!(a.checkpoint.is_none());
        let a = q.on_tick(20_000, Some(20_000));
        assert!(
            a.checkpoint.is_none() && q.buffered_len() == 1,
            "a quiet tick (a stale high watermark) before the decided offset releases nothing"
        );
        let mut letters = Vec::new();
        for (o, ts) in [(1, 1050), (2, 1070), (3, 1055)] {
            let a = q.on_event(None, &ev(ts), o, 20_001);
            if o == 1 {
                assert!(!q.is_replaying(), "the decided offset is reached");
                assert_eq!(
                    q.buffered_len(),
                    1,
                    "1000, below the new watermark (1040), is released at once; 1050 waits"
                );
            }
            letters.extend(commit_through(&mut q, &mut again, a, 20_001).0);
        }
        letters.extend(settle(&mut q, &mut again, 30_000));
        assert_eq!(
            outbox_ts(&again),
            vec![1000, 1050, 1070],
            "nothing read again vanished"
        );
        let late: Vec<i64> = letters.iter().map(|d| d.source_offset).collect();
        assert_eq!(
            late,
            vec![3],
            "1055 is late by the new 10 ms, and it is new: dead-lettered once"
        );
        assert!(again.waiting.is_empty() && again.waiting_known);
    }

    #[test]
    fn an_event_waiting_when_the_lateness_is_lowered_survives_a_second_restart() {
        let mut p = fresh();
        let mut state = PartitionState::default();
        // Lateness 100 ms: d@1000 and d@1060 wait (offsets 0, 1).
        for (o, ts) in [(0, 1000), (1, 1060)] {
            let a = p.on_event(None, &of("d", ts), o, 0);
            commit_through(&mut p, &mut state, a, 0);
        }
        let a = p.flush(0);
        commit_through(&mut p, &mut state, a, 0);
        assert_eq!((state.resume_offset, state.decided_offset), (Some(0), 2));
        // Restarted with lateness 10 ms: offsets 0 and 1 are decided as before, then e@5000 at
        // offset 2 under 10 ms. d sends nothing newer, yet d@1000 is below d's new watermark
        // (1050); had it kept waiting, the checkpoint (with 10 ms) would be followed, after a
        // second restart, by d@1000 read again as late against the restored mark (1060) and,
        // below the decided offset, without a dead letter: lost.
        let mut strict = cfg();
        strict.cleanup.allowed_lateness_ms = 10;
        let mut letters = Vec::new();
        for restart in 0..2 {
            let mut q = Partition::restore(strict.clone(), state.clone(), 0, 1);
            for (o, device, ts) in [(0, "d", 1000), (1, "d", 1060), (2, "e", 5000)] {
                let a = q.on_event(None, &of(device, ts), o, 1);
                letters.extend(commit_through(&mut q, &mut state, a, 1).0);
            }
            let a = q.flush(1);
            letters.extend(commit_through(&mut q, &mut state, a, 1).0);
            if restart == 1 {
                let a = q.on_tick(10_000, Some(10_000));
                letters.extend(commit_through(&mut q, &mut state, a, 10_000).0);
                let a = q.flush(10_000);
                letters.extend(commit_through(&mut q, &mut state, a, 10_000).0);
            }
        }
        assert!(letters.is_empty(), "{letters:?}");
        let mut stored = outbox_ts(&state);
        stored.sort_unstable();
        assert_eq!(
            stored,
            vec![1000, 1060, 5000],
            "nothing read again vanished or repeated"
        );
    }

    #[test]
    fn nothing_is_checkpointed_while_reading_again_and_a_stop_then_leaves_the_checkpoint_as_it_was() {
        let mut p = fresh();
        let mut state = PartitionState::default();
        // 1000 waits at offset 0; 10 (offset 1) is late; 1020 waits (offset 2).
        let letters = feed(&mut p, &mut state, &[(0, 1000), (1, 10), (2, 1020)]);
        assert_eq!(letters.len(), 1);
        assert_eq!(state.decided_offset, 3);
        assert_eq!(state.waiting.ranges().collect::<Vec<_>>(), vec![(0, 1), (2, 3)]);
        let mut q = Partition::restore(cfg(), state.clone(), 0, 0);
        let a = q.on_event(None, &ev(1000), 0, 0);
        assert!(a.checkpoint.is_none());
        assert!(
            q.flush(0).checkpoint.is_none(),
            "the buffers are not whole before the decided offset"
        );
        q.stop(false);
        assert!(
            q.is_settled(),
            "a revocation while reading again has nothing to record"
        );
        // Another owner reads all of it again: no second dead letter, and nothing changed.
        let mut r = Partition::restore(cfg(), state.clone(), 0, 0);
        let mut again = Vec::new();
        for (o, ts) in [(0, 1000), (1, 10), (2, 1020)] {
            let a = r.on_event(None, &ev(ts), o, 0);
            again.extend(commit_through(&mut r, &mut state, a, 0).0);
        }
        assert!(again.is_empty(), "{again:?}");
        assert!(!r.is_replaying());
        assert_eq!(r.buffered_len(), 2, "1000 and 1020 wait again, 10 stays decided");
        assert!(
            r.flush(0).checkpoint.is_none(),
            "the rebuilt state is the checkpoint's"
        );
        let a = r.on_event(None, &ev(1200), 3, 0);
        commit_through(&mut r, &mut state, a, 0);
        let a = r.flush(0);
        commit_through(&mut r, &mut state, a, 0);
        assert_eq!(outbox_ts(&state), vec![1000, 1020]);
        assert_eq!(state.waiting.ranges().collect::<Vec<_>>(), vec![(3, 4)]);
        assert_eq!((state.resume_offset, state.decided_offset), (Some(3), 4));
    }

    #[test]
    fn an_event_late_for_a_forgotten_device_stays_dead_lettered_after_its_record_expired() {
        let mut c = cfg();
        c.cleanup.forget_after_ms = 300;
        c.cleanup.forgotten_retention_ms = 1_000;
        let mut p = Partition::restore(c.clone(), PartitionState::default(), 0, 0);
        let mut state = PartitionState::default();
        let mut letters = Vec::new();
        // e's first event waits throughout (e keeps sending within its lateness), so the
        // partition resumes from offset 0; d is flushed, forgotten, and resends.
        let stream = [
            (("e", 5_000), 0),
            (("d", 1_000), 0),
            (("e", 4_910), 900),
            (("d", 1_000), 1_000),
            (("e", 4_920), 1_500),
        ];
        for (o, ((device, ts), now)) in stream.iter().enumerate() {
            if o == 3 {
                let a = p.on_tick(1_000, Some(1_000));
                letters.extend(commit_through(&mut p, &mut state, a, 1_000).0);
            }
            let a = p.on_event(None, &of(device, *ts), o as i64, *now);
            letters.extend(commit_through(&mut p, &mut state, a, *now).0);
        }
        let a = p.on_tick(2_100, Some(2_100));
        letters.extend(commit_through(&mut p, &mut state, a, 2_100).0);
        let a = p.flush(2_100);
        letters.extend(commit_through(&mut p, &mut state, a, 2_100).0);
        assert_eq!(
            offsets(&letters),
            vec![3],
            "the resend is late: d's record says it was released"
        );
        assert!(
            state.forgotten.is_empty() && !state.marks.contains_key("d"),
            "then d's record expired"
        );
        assert_eq!(state.resume_offset, Some(0));
        // Read again, d is new (its record expired): decided again, the resend would be stored
        // after its dead letter.
        let mut q = Partition::restore(c, state.clone(), 0, 2_100);
        for (o, ((device, ts), _)) in stream.iter().enumerate() {
            let a = q.on_event(None, &of(device, *ts), o as i64, 2_100);
            letters.extend(commit_through(&mut q, &mut state, a, 2_100).0);
        }
        letters.extend(settle(&mut q, &mut state, 10_000));
        assert_eq!(offsets(&letters), vec![3]);
        let mut stored = outbox_ts(&state);
        stored.sort_unstable();
        assert_eq!(stored, vec![1_000, 4_910, 4_920, 5_000]);
    }

    #[test]
    fn a_full_outbox_does_not_pause_reading_again_so_a_split_asked_for_meanwhile_is_taken() {
        let mut p = fresh();
        let mut state = PartitionState::default();
        for i in 0..7i64 {
            let a = p.on_event(None, &ev(1000 + 200 * i), i, 0);
            commit_through(&mut p, &mut state, a, 0);
        }
        let a = p.flush(0);
        commit_through(&mut p, &mut state, a, 0);
        assert_eq!(state.outbox.len(), 2, "nothing acknowledged");
        assert_eq!((state.resume_offset, state.decided_offset), (Some(6), 7));
        // A new owner, the sink's MAX_BATCH_LEN lowered meanwhile, MAX_OUTBOX_PER_PARTITION 2.
        let mut q = Partition::restore(cfg(), state.clone(), 0, 0);
        assert!(p.outbox_full(2), "the first owner would pause");
        assert!(
            !q.outbox_full(2) && q.outbox_drained(2),
            "reading again is not paused"
        );
        let sent = q.on_tick(0, None).send.expect("the outbox is resent");
        let (limit, a) = q.on_too_large(sent.seq, 1);
        assert_eq!(limit, Some(2));
        assert!(a.checkpoint.is_none(), "no checkpoint while reading again");
        let a = q.on_event(None, &ev(2200), 6, 2);
        let plan = a.checkpoint.expect("the split, once the buffers are whole");
        assert_eq!(plan.split, Some((2, 4)), "3 + 3 events re-cut to 2 + 1, 2 + 1");
        let a = q.on_committed(plan.number, encoded_len(&plan.encode()), 3);
        assert_eq!(a.send.map(|b| b.events), Some(2), "the first part goes out");
        assert!(
            q.outbox_full(2),
            "past the decided offset backpressure applies again"
        );
    }

    #[test]
    fn a_forgotten_device_stays_forgotten_across_a_restart_with_a_longer_forget_after() {
        let mut short = with_cleanup(0, 100_000);
        short.cleanup.forget_after_ms = 300;
        let long = with_cleanup(0, 100_000);
        let mut state = PartitionState::default();
        let mut p = Partition::restore(short, PartitionState::default(), 0, 0);
        for (o, payload, now) in [
            (0, of("d", 1_000), 0),
            (1, of("e", 2_000), 0),
            (2, of("e", 2_100), 1_300),
        ] {
            let a = p.on_event(None, &payload, o, now);
            commit_through(&mut p, &mut state, a, now);
        }
        let a = p.on_tick(1_400, Some(1_400));
        commit_through(&mut p, &mut state, a, 1_400);
        let a = p.flush(1_400);
        commit_through(&mut p, &mut state, a, 1_400);
        assert!(!state.marks.contains_key("d"), "d is forgotten");
        assert_eq!(
            state.forgotten.get("d").map(|f| f.through),
            Some(1_000),
            "and its record persisted"
        );
        assert!(state.marks.contains_key("e"), "e is not: it sent 100 ms ago");
        // Restarted with FORGET_AFTER_MS raised, d resends its stored event.
        let mut q = Partition::restore(long, state.clone(), 0, 2_000);
        let a = q.on_event(None, &of("d", 1_000), 3, 2_000);
        let (mut letters, _) = commit_through(&mut q, &mut state, a, 2_000);
        letters.extend(settle(&mut q, &mut state, 10_000));
        let mut stored = outbox_ts(&state);
        stored.sort_unstable();
        assert_eq!(stored, vec![1_000, 2_000, 2_100], "d@1000 once");
        assert_eq!(offsets(&letters), vec![3]);
        assert!(letters[0].detail.contains("forgotten"), "{}", letters[0].detail);
    }

    #[test]
    fn a_restored_record_keeps_its_age_whatever_the_new_owners_clock_says() {
        let mut c = cfg();
        c.cleanup.forgotten_retention_ms = 5_000;
        let mut state = PartitionState::default();
        let writer = 1_000_000_000u64;
        state.forgotten.insert(
            "d".into(),
            Forgotten {
                through: 1_000,
                at_ms: writer - 4_000,
            },
        );
        state.clock_ms = Some(writer); // the record was 4 s old at the last checkpoint
                                       // A new owner whose clock is far ahead of the writer's, then one far behind it.
        for start in [2 * writer, writer / 2] {
            let mut p = Partition::restore(c.clone(), state.clone(), 0, start);
            drop(p.on_tick(start + 500, Some(start + 500)));
            assert_eq!(p.devices().2, 1, "4.5 s old: kept (owner starting at {start})");
            drop(p.on_tick(start + 1_100, Some(start + 1_100)));
            assert_eq!(
                p.devices().2,
                0,
                "5.1 s old, past the scan's slack: dropped ({start})"
            );
        }
    }

    #[test]
    fn a_pruned_identity_stays_late_after_the_lateness_is_raised_above_the_former_horizon() {
        let narrow = with_cleanup(50, 300);
        let wide = with_cleanup(1_500, 1_500);
        let mut state = PartitionState::default();
        let mut p = Partition::restore(narrow, PartitionState::default(), 0, 0);
        let a = p.on_event(None, &ev(1_000), 0, 0);
        commit_through(&mut p, &mut state, a, 0);
        let a = p.on_tick(2_000, Some(2_000));
        commit_through(&mut p, &mut state, a, 2_000);
        // 2000 waits; 1000, released by the idle flush, falls out of the horizon (1700).
        let a = p.on_event(None, &ev(2_000), 1, 2_000);
        commit_through(&mut p, &mut state, a, 2_000);
        let a = p.flush(2_000);
        commit_through(&mut p, &mut state, a, 2_000);
        assert!(
            !state.keys.get("d").is_some_and(|k| k.contains_key(&1_000)),
            "pruned"
        );
        let mut q = Partition::restore(wide, state.clone(), 0, 2_000);
        let mut letters = Vec::new();
        for (o, ts) in [(1, 2_000), (2, 1_000)] {
            let a = q.on_event(None, &ev(ts), o, 2_000);
            letters.extend(commit_through(&mut q, &mut state, a, 2_000).0);
        }
        letters.extend(settle(&mut q, &mut state, 9_000));
        assert_eq!(outbox_ts(&state), vec![1_000, 2_000], "1000 once, in order");
        assert_eq!(offsets(&letters), vec![2]);
    }

    #[test]
    fn a_checkpoint_without_waiting_offsets_is_decided_again_then_snapshotted() {
        let mut p = fresh();
        let mut state = PartitionState::default();
        feed(&mut p, &mut state, &[(0, 1000), (1, 10), (2, 1020)]);
        // As an older changelog left it: no waiting offsets.
        state.waiting = OffsetRanges::default();
        state.waiting_known = false;
        let mut q = Partition::restore(cfg(), state.clone(), 0, 0);
        let mut again = Vec::new();
        for (o, ts) in [(0, 1000), (1, 10), (2, 1020), (3, 1050)] {
            let a = q.on_event(None, &ev(ts), o, 0);
            again.extend(commit_through(&mut q, &mut state, a, 0).0);
        }
        assert!(
            again.is_empty(),
            "decided again, not dead-lettered again: {again:?}"
        );
        let plan = q.flush(0).checkpoint.expect("offset 3 is new");
        assert!(plan.snapshot, "the first checkpoint records every waiting offset");
        apply(&mut state, &plan);
        assert!(state.waiting_known);
        assert_eq!(state.waiting.ranges().collect::<Vec<_>>(), vec![(0, 1), (2, 4)]);
    }
}
