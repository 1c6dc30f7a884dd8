//! Restores at random points, with the cleanup settings changed between runs, against a run
//! that never stopped: a restored partition must decide every event exactly as one uninterrupted
//! cleaner that takes the new settings at the decided offset each restore started from.

use proptest::prelude::*;
use telemetry_core::{Cleaner, CleanupConfig, Event, Outcome};

use crate::changelog::PartitionState;
use crate::partition::{
    encoded_len, Actions, CheckpointPlan, DeadLetter, Partition, PartitionConfig, Reason,
};

fn config(cleanup: CleanupConfig) -> PartitionConfig {
    PartitionConfig {
        topic: "t".into(),
        partition: 0,
        cleanup,
        batch_size: 4,
        batch_linger_ms: 0,
        checkpoint_interval_ms: 0,
        snapshot_min_bytes: 2_000,
        writer: "w".into(),
    }
}

fn payload(device: &str, ts: i64, latitude: f64) -> Vec<u8> {
    format!(r#"{{"deviceId":"{device}","ts":{ts},"latitude":{latitude},"longitude":2}}"#).into_bytes()
}

const DEVICES: [&str; 5] = ["a", "b", "c", "d", "e"];

/// A bursty stream of five devices: in order, reordered, repeated, conflicting, far behind,
/// and now and then unreadable.
fn stream() -> impl Strategy<Value = Vec<Vec<u8>>> {
    proptest::collection::vec((0usize..5, 0u8..100, 0i64..400), 10..120).prop_map(|steps| {
        let mut clocks = [1_000i64; 5];
        let mut sent: Vec<(usize, i64, f64)> = Vec::new();
        let mut out = Vec::new();
        for (device, kind, amount) in steps {
            let name = DEVICES[device];
            let (ts, latitude) = match kind {
                0..=49 => {
                    clocks[device] += amount;
                    (clocks[device], 1.0)
                }
                50..=56 => (clocks[device] - amount, 1.0),
                57..=64 => {
                    // Catching up with the device furthest ahead, from behind its horizon.
                    let front = clocks.iter().copied().max().unwrap_or(0);
                    clocks[device] = clocks[device].max(front - amount);
                    (clocks[device], 1.0)
                }
                65..=79 if !sent.is_empty() => {
                    let (d, ts, lat) = sent[amount as usize % sent.len()];
                    out.push(payload(DEVICES[d], ts, lat));
                    continue;
                }
                80..=84 if !sent.is_empty() => {
                    let (d, ts, _) = sent[amount as usize % sent.len()];
                    out.push(payload(DEVICES[d], ts, 3.0));
                    continue;
                }
                85..=92 => (clocks[device] - 5 * amount, 1.0),
                93..=96 => {
                    // A device far ahead makes the others fall behind the horizon.
                    clocks[device] += 10 * amount;
                    (clocks[device], 1.0)
                }
                _ => {
                    out.push(b"{\"deviceId\":".to_vec());
                    continue;
                }
            };
            sent.push((device, ts, latitude));
            out.push(payload(name, ts, latitude));
        }
        out
    })
}

/// Any settings the processor accepts (lateness at most the horizon), changed between owners in
/// any direction.
fn settings() -> impl Strategy<Value = CleanupConfig> {
    (
        prop_oneof![Just(0i64), Just(50), Just(200), Just(1_500)],
        prop_oneof![Just(300i64), Just(1_000), Just(1_500), Just(100_000)],
    )
        .prop_map(|(lateness, horizon)| CleanupConfig {
            allowed_lateness_ms: lateness,
            dedup_horizon_ms: horizon.max(lateness),
            idle_timeout_ms: 1_000,
            ..CleanupConfig::default()
        })
}

/// One owner of the partition, from its restore to its crash (or, for the last, the end).
struct Owner<'a> {
    p: Partition,
    state: &'a mut PartitionState,
    letters: &'a mut Vec<DeadLetter>,
    pending: Option<CheckpointPlan>,
    coin: &'a mut u64,
    taken: u64,
    committed: Vec<u64>,
}

impl Owner<'_> {
    fn flip(&mut self) -> bool {
        // xorshift64
        let mut x = *self.coin;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *self.coin = x;
        x % 10 < 7
    }

    fn handle(&mut self, mut actions: Actions) {
        while let Some(plan) = actions.checkpoint.take() {
            assert!(self.pending.is_none(), "one checkpoint in flight at a time");
            self.taken = plan.number;
            if self.flip() {
                actions = self.commit(plan);
            } else {
                self.pending = Some(plan);
            }
        }
    }

    fn commit(&mut self, plan: CheckpointPlan) -> Actions {
        for r in &plan.records {
            let decoded = crate::changelog::Record::decode(&r.encode(), 0).expect("decodes");
            self.state.apply("t", 0, &decoded);
        }
        self.letters.extend(plan.dead_letters.iter().cloned());
        self.committed.push(plan.number);
        self.p.on_committed(plan.number, encoded_len(&plan.encode()), 0)
    }

    fn maybe_commit_pending(&mut self) {
        if self.pending.is_some() && self.flip() {
            let plan = self.pending.take().expect("pending");
            let a = self.commit(plan);
            self.handle(a);
        }
    }
}

/// What happened at a position of the stream in the uninterrupted run, in the order it happened.
enum Step {
    Settings(CleanupConfig),
    Tick,
}

fn check(events: &[Vec<u8>], owners: &[(CleanupConfig, usize)], seed: u64) -> Result<(), TestCaseError> {
    let n = events.len() as i64;
    let mut state = PartitionState::default();
    let mut letters = Vec::new();
    let mut coin = seed | 1;
    // (position, step) of what the committed history holds, in order.
    let mut history: Vec<(i64, Step)> = Vec::new();
    for (i, (cleanup, crash_at)) in owners.iter().enumerate() {
        let last = i + 1 == owners.len();
        let from = state.resume_offset.unwrap_or(0);
        let restored_at = state.decided_offset;
        let mut owner = Owner {
            p: Partition::restore(config(*cleanup), state.clone(), 0, 0),
            state: &mut state,
            letters: &mut letters,
            pending: None,
            coin: &mut coin,
            taken: 0,
            committed: Vec::new(),
        };
        let end = if last { n } else { (*crash_at as i64).min(n) };
        let mut ticks = Vec::new();
        for offset in from..end {
            let a = owner.p.on_event(None, &events[offset as usize], offset, 0);
            owner.handle(a);
            if owner.flip() && owner.flip() && !owner.p.is_replaying() {
                // A quiet moment: processing time stands still, so nothing is idle or forgotten
                // (when a device is forgotten may change how a resend counts, which this exact
                // comparison would see; the cleaner's crash property covers forgetting).
                ticks.push((owner.p.next_offset(), owner.taken));
                let a = owner.p.on_tick(0, Some(0));
                owner.handle(a);
            }
            owner.maybe_commit_pending();
        }
        if last {
            if let Some(plan) = owner.pending.take() {
                let a = owner.commit(plan);
                owner.handle(a);
            }
            let a = owner.p.on_tick(1_000_000, Some(1_000_000));
            owner.handle(a);
            while let Some(plan) = owner
                .pending
                .take()
                .or_else(|| owner.p.flush(1_000_000).checkpoint)
            {
                let a = owner.commit(plan);
                owner.handle(a);
            }
            prop_assert!(owner.p.is_recorded());
            prop_assert_eq!(owner.p.buffered_len(), 0);
        }
        // Only what a committed checkpoint holds happened, as far as the next owner knows.
        if let Some(&top) = owner.committed.iter().max() {
            history.push((restored_at, Step::Settings(*cleanup)));
            for (at, taken) in ticks {
                if top > taken {
                    history.push((at, Step::Tick));
                }
            }
        }
    }

    // The uninterrupted run.
    history.sort_by_key(|(at, _)| *at); // stable: what happened first at a position stays first
    let first = match history.first() {
        Some((0, Step::Settings(c))) => *c,
        _ => {
            return Err(TestCaseError::fail(
                "the first owner to commit starts at offset 0",
            ))
        }
    };
    let mut cleaner = Cleaner::new(first);
    let mut steps = history.iter().peekable();
    let mut expected_letters = Vec::new();
    let mut released = Vec::new();
    for (offset, bytes) in events.iter().enumerate() {
        let offset = offset as i64;
        while let Some((_, step)) = steps.next_if(|(at, _)| *at <= offset) {
            match step {
                Step::Settings(c) => cleaner.set_config(*c),
                Step::Tick => cleaner.tick(0),
            }
        }
        match Event::from_json(bytes) {
            Err(_) => expected_letters.push((offset, Reason::Invalid)),
            Ok(event) => {
                if matches!(cleaner.process(event, offset, 0), Outcome::Late(_)) {
                    expected_letters.push((offset, Reason::Late));
                }
            }
        }
        released.extend(cleaner.drain_released());
    }
    for (_, step) in steps {
        match step {
            Step::Settings(c) => cleaner.set_config(*c),
            Step::Tick => cleaner.tick(0),
        }
    }
    cleaner.tick(1_000_000);
    released.extend(cleaner.drain_released());

    let mut got_letters: Vec<(i64, Reason)> = letters.iter().map(|d| (d.source_offset, d.reason)).collect();
    got_letters.sort_by_key(|(o, _)| *o);
    let case = || {
        let stream: Vec<String> = events
            .iter()
            .map(|e| String::from_utf8_lossy(e).into_owned())
            .collect();
        format!(
            "stream {stream:#?}\nowners {owners:?}\nhistory {:?}",
            history
                .iter()
                .map(|(at, s)| (
                    at,
                    match s {
                        Step::Tick => "tick".to_owned(),
                        Step::Settings(c) => format!("{}/{}", c.allowed_lateness_ms, c.dedup_horizon_ms),
                    }
                ))
                .collect::<Vec<_>>()
        )
    };
    prop_assert_eq!(got_letters, expected_letters, "dead letters; {}", case());
    let stored: Vec<Event> = state
        .outbox
        .values()
        .flat_map(|b| serde_json::from_slice::<Vec<Event>>(&b.body).expect("a batch is a JSON array"))
        .collect();
    for device in DEVICES {
        let got: Vec<(i64, u64)> = stored
            .iter()
            .filter(|e| e.device_id == device)
            .map(|e| (e.ts, e.latitude.to_bits()))
            .collect();
        let want: Vec<(i64, u64)> = released
            .iter()
            .filter(|r| r.event.device_id == device)
            .map(|r| (r.event.ts, r.event.latitude.to_bits()))
            .collect();
        prop_assert_eq!(got, want, "device {}; {}", device, case());
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn restores_with_changed_settings_decide_like_one_uninterrupted_run(
        events in stream(),
        owners in proptest::collection::vec((settings(), 0usize..100), 1..5),
        seed in any::<u64>(),
    ) {
        let mut owners = owners;
        owners.sort_by_key(|(_, crash_at)| *crash_at);
        check(&events, &owners, seed)?;
    }

    #[test]
    fn restores_with_unchanged_settings_decide_like_one_uninterrupted_run(
        events in stream(),
        crashes in proptest::collection::vec(0usize..100, 0..5),
        cleanup in settings(),
        seed in any::<u64>(),
    ) {
        let mut owners: Vec<(CleanupConfig, usize)> = crashes.into_iter().map(|c| (cleanup, c)).collect();
        owners.sort_by_key(|(_, crash_at)| *crash_at);
        owners.push((cleanup, usize::MAX));
        check(&events, &owners, seed)?;
    }
}

/// Without a reference model: owners that crash (losing or landing their checkpoint in flight)
/// or are revoked at random, idle flushes and forgetting as processing time moves, a sink that stores each
/// batch id once, loses acknowledgements and refuses batches over its limit (413 splits), and
/// settings changed between owners. Whatever happens, no
/// offset is dead-lettered twice, no identity is stored twice, each device is stored in ts
/// order, an invalid payload is dead-lettered, and every identity is stored or dead-lettered
/// (and not both, when it was sent once).
mod invariants {
    use std::collections::{HashMap, HashSet};

    use super::*;
    use crate::changelog::{OutboxBatch, Record};

    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn percent(&mut self, p: u64) -> bool {
            self.next() % 100 < p
        }

        fn pick<T: Copy>(&mut self, of: &[T]) -> T {
            of[(self.next() % of.len() as u64) as usize]
        }
    }

    /// The sink: stores a batch id once, refuses batches over its limit.
    struct Sink {
        limit: usize,
        ids: HashSet<String>,
        stored: Vec<Event>,
    }

    /// What the drivers hold for one owner: its checkpoint and its send in flight.
    struct World<'a> {
        state: &'a mut PartitionState,
        letters: &'a mut Vec<DeadLetter>,
        sink: &'a mut Sink,
        pending: Option<CheckpointPlan>,
        sending: Option<OutboxBatch>,
    }

    impl World<'_> {
        fn handle(&mut self, a: Actions) -> Result<(), TestCaseError> {
            if let Some(plan) = a.checkpoint {
                prop_assert!(self.pending.is_none(), "one checkpoint in flight at a time");
                for r in &plan.encode() {
                    prop_assert!(r.len() < 1_000_000, "a record of {} bytes", r.len());
                }
                self.pending = Some(plan);
            }
            if let Some(b) = a.send {
                prop_assert!(self.sending.is_none(), "one batch in flight at a time");
                self.sending = Some(b);
            }
            Ok(())
        }

        fn commit(&mut self, p: &mut Partition, now: u64) -> Result<(), TestCaseError> {
            let Some(plan) = self.pending.take() else {
                return Ok(());
            };
            let encoded = plan.encode();
            for r in &encoded {
                self.state.apply("t", 0, &Record::decode(r, 0).expect("decodes"));
            }
            self.letters.extend(plan.dead_letters.iter().cloned());
            let resume = self.state.resume_offset.unwrap_or(0);
            for (start, end) in self.state.waiting.ranges() {
                prop_assert!(
                    start >= resume && end <= self.state.decided_offset,
                    "waiting [{start}, {end}) outside [{resume}, {})",
                    self.state.decided_offset
                );
            }
            let a = p.on_committed(plan.number, encoded_len(&encoded), now);
            self.handle(a)
        }

        fn deliver(&mut self, p: &mut Partition, now: u64, ack: bool) -> Result<(), TestCaseError> {
            let Some(b) = self.sending.take() else {
                return Ok(());
            };
            if b.events > self.sink.limit {
                let (_, a) = p.on_too_large(b.seq, now);
                return self.handle(a);
            }
            if self.sink.ids.insert(b.id.clone()) {
                let events: Vec<Event> = serde_json::from_slice(&b.body).expect("a JSON array");
                self.sink.stored.extend(events);
            }
            if ack {
                let a = p.on_acknowledged(b.seq, now);
                self.handle(a)
            } else {
                p.on_send_abandoned(b.seq);
                Ok(())
            }
        }
    }

    fn run(events: &[Vec<u8>], seed: u64, owners: usize) -> Result<(), TestCaseError> {
        let mut rng = Rng(seed | 1);
        let n = events.len() as i64;
        let mut state = PartitionState::default();
        let mut letters = Vec::new();
        let limit = 1 + (rng.next() % 4) as usize;
        let mut sink = Sink {
            limit,
            ids: HashSet::new(),
            stored: Vec::new(),
        };
        let mut clock = 0u64;
        for i in 0..owners {
            let last = i + 1 == owners;
            let lateness = rng.pick(&[0, 50, 200, 1_500]);
            let mut cfg = config(CleanupConfig {
                allowed_lateness_ms: lateness,
                dedup_horizon_ms: rng.pick(&[300, 1_000, 1_500, 100_000]).max(lateness),
                idle_timeout_ms: 1_000,
                // Forgetting as processing time moves: records go through the changelog, the
                // snapshots and the restores (kept for good here: a record that expired would
                // let a resend be stored again, by design).
                forget_after_ms: rng.pick(&[1_000, 4_000, 600_000]),
                forgotten_retention_ms: u64::MAX / 4,
            });
            cfg.batch_size = 1 + (rng.next() % 5) as usize;
            let mut p = Partition::restore(cfg, state.clone(), 0, clock);
            let mut w = World {
                state: &mut state,
                letters: &mut letters,
                sink: &mut sink,
                pending: None,
                sending: None,
            };
            let a = p.on_tick(clock, None);
            w.handle(a)?;
            let mut offset = w.state.resume_offset.unwrap_or(0);
            for _ in 0..100_000 {
                if !last && rng.percent(3) {
                    if rng.percent(50) {
                        // Revoked: what was released is checkpointed, the outbox stays.
                        p.stop(false);
                        let a = p.flush(clock);
                        w.handle(a)?;
                        while w.pending.is_some() {
                            w.commit(&mut p, clock)?;
                            let a = p.flush(clock);
                            w.handle(a)?;
                        }
                    } else if rng.percent(50) {
                        // Killed just after its checkpoint in flight committed.
                        w.commit(&mut p, clock)?;
                    }
                    break;
                }
                if last && offset >= n {
                    break;
                }
                match rng.next() % 10 {
                    0..=4 if offset < n => {
                        let a = p.on_event(None, &events[offset as usize], offset, clock);
                        w.handle(a)?;
                        offset += 1;
                    }
                    5 => w.commit(&mut p, clock)?,
                    6 => {
                        let ack = rng.percent(85);
                        w.deliver(&mut p, clock, ack)?;
                    }
                    7 => {
                        clock += rng.next() % 1_500;
                        // Quiet only when everything was read (or the high watermark is stale).
                        let quiet = (offset >= n || rng.percent(30)).then_some(clock);
                        let a = p.on_tick(clock, quiet);
                        w.handle(a)?;
                    }
                    8 => {
                        let a = p.flush(clock);
                        w.handle(a)?;
                    }
                    _ => {}
                }
            }
            if last {
                let mut settled = false;
                for _ in 0..10_000 {
                    clock += 2_000;
                    w.commit(&mut p, clock)?;
                    w.deliver(&mut p, clock, true)?;
                    let a = p.on_tick(clock, Some(clock));
                    w.handle(a)?;
                    let a = p.flush(clock);
                    w.handle(a)?;
                    if w.pending.is_none()
                        && w.sending.is_none()
                        && p.is_settled()
                        && p.buffered_len() == 0
                        && p.outbox_len() == 0
                    {
                        settled = true;
                        break;
                    }
                }
                prop_assert!(
                    settled,
                    "the last owner never settles (replaying {})",
                    p.is_replaying()
                );
            }
        }

        let mut lettered: HashMap<i64, Reason> = HashMap::new();
        for l in &letters {
            prop_assert!(
                lettered.insert(l.source_offset, l.reason).is_none(),
                "offset {} dead-lettered twice",
                l.source_offset
            );
        }
        let mut stored: HashMap<(String, i64), usize> = HashMap::new();
        let mut newest: HashMap<String, i64> = HashMap::new();
        for e in &sink.stored {
            *stored.entry((e.device_id.clone(), e.ts)).or_default() += 1;
            let before = newest.insert(e.device_id.clone(), e.ts);
            prop_assert!(
                before.is_none_or(|b| b < e.ts),
                "{} stored out of order: {:?} then {}",
                e.device_id,
                before,
                e.ts
            );
        }
        for (identity, times) in &stored {
            prop_assert_eq!(*times, 1, "{:?} stored {} times", identity, times);
        }
        let mut copies: HashMap<(String, i64), Vec<i64>> = HashMap::new();
        for (o, bytes) in events.iter().enumerate() {
            match Event::from_json(bytes) {
                Ok(e) => copies.entry((e.device_id, e.ts)).or_default().push(o as i64),
                Err(_) => prop_assert_eq!(lettered.get(&(o as i64)), Some(&Reason::Invalid), "offset {}", o),
            }
        }
        for (identity, offsets) in &copies {
            let is_stored = stored.contains_key(identity);
            let lettered_any = offsets.iter().any(|o| lettered.contains_key(o));
            prop_assert!(is_stored || lettered_any, "{:?} at {:?} lost", identity, offsets);
            if offsets.len() == 1 {
                prop_assert!(
                    !(is_stored && lettered_any),
                    "{:?} at {:?} stored and dead-lettered",
                    identity,
                    offsets
                );
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1_000))]

        #[test]
        fn owners_that_crash_or_are_revoked_keep_every_event_exactly_once(
            events in stream(),
            seed in any::<u64>(),
            owners in 1usize..6,
        ) {
            run(&events, seed, owners)?;
        }
    }
}
