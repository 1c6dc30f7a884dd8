//! Restores at random points, with the cleanup settings changed between runs, against a run
//! that never stopped: a restored partition must decide every event exactly as one uninterrupted
//! cleaner that takes the new settings at the decided offset each restore started from.

use proptest::prelude::*;
use telemetry_core::{Cleaner, CleanupConfig, Event, Outcome};

use crate::changelog::PartitionState;
use crate::partition::{Actions, CheckpointPlan, DeadLetter, Partition, PartitionConfig, Reason};

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

/// Lateness never above any horizon (a lateness above a former horizon lets an identity
/// forgotten under it be stored again, restored or not).
fn settings() -> impl Strategy<Value = CleanupConfig> {
    (
        prop_oneof![Just(0i64), Just(50), Just(200)],
        prop_oneof![Just(300i64), Just(1_000), Just(100_000)],
    )
        .prop_map(|(lateness, horizon)| CleanupConfig {
            allowed_lateness_ms: lateness,
            dedup_horizon_ms: horizon,
            idle_timeout_ms: 1_000,
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
        self.p.on_committed(plan.number, 0)
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
                // A quiet moment: nothing is idle yet (processing time stands still), but
                // devices behind the horizon are forgotten.
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
                if cleaner.process(event, offset, 0) == Outcome::Late {
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
