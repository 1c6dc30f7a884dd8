//! Bounded-state benchmark (run by scripts/bench-devices): pushes BENCH_DEVICES (1,000,000)
//! distinct devices, three events each, through one partition's state machine with its
//! checkpoints applied to a real local state store (SQLite), then moves processing time past
//! FORGET_AFTER_MS (every device but one is forgotten, leaving a record) and past the records'
//! retention, and prints memory (RSS, peak RSS) and the store's size before
//! and after (file, and live: pages in use; freed pages are reused, the file only shrinks with
//! VACUUM). No broker: the changelog records are the ones the store applies.

use std::time::Instant;

use stream_processor::changelog::{PartitionState, Record};
use stream_processor::partition::{Actions, Partition, PartitionConfig};
use stream_processor::store::{Committed, StateStore};
use telemetry_core::CleanupConfig;

/// The processor's allocator, so memory is measured as the processor holds and returns it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const BASE: i64 = 1_700_000_000_000;
const HORIZON_MS: i64 = 600_000;
const FORGET_AFTER_MS: u64 = 600_000;
const RETENTION_MS: u64 = 7 * 24 * 3_600_000;

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

/// (current RSS, peak RSS) in MB, from /proc.
fn rss_mb() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| -> f64 {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    (field("VmRSS:"), field("VmHWM:"))
}

struct Driver {
    p: Partition,
    store: StateStore,
    commit_offset: i64,
    prev: Option<(i64, String)>,
    checkpoints: u64,
}

impl Driver {
    /// Commits every checkpoint at once (applying it to the store) and acknowledges every batch.
    fn drive(&mut self, mut actions: Actions, now: u64) {
        loop {
            let mut next = Actions::default();
            if let Some(plan) = actions.checkpoint.take() {
                self.commit_offset += plan.records.len() as i64;
                let id = match plan.records.last() {
                    Some(Record::Commit(c)) => c.id.clone(),
                    _ => unreachable!("a checkpoint ends with its commit"),
                };
                let encoded = plan.encode();
                let bytes = stream_processor::partition::encoded_len(&encoded);
                self.store.apply(
                    0,
                    Committed {
                        encoded,
                        snapshot: plan.snapshot,
                        commit_offset: self.commit_offset,
                        commit_id: id.clone(),
                    },
                    self.prev.clone(),
                );
                self.prev = Some((self.commit_offset, id));
                self.checkpoints += 1;
                next = self.p.on_committed(plan.number, bytes, now);
            }
            if let Some(batch) = actions.send.take() {
                let more = self.p.on_acknowledged(batch.seq, now);
                next.checkpoint = next.checkpoint.or(more.checkpoint);
                next.send = next.send.or(more.send);
            }
            if next.checkpoint.is_none() && next.send.is_none() {
                return;
            }
            actions = next;
        }
    }
}

fn store_mb(path: &std::path::Path) -> (f64, f64) {
    let conn = rusqlite::Connection::open(path).expect("open store");
    let _ = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
    let file = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0) as f64 / 1e6;
    let pages: i64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0)).unwrap_or(0);
    let free: i64 = conn
        .query_row("PRAGMA freelist_count", [], |r| r.get(0))
        .unwrap_or(0);
    let size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0)).unwrap_or(0);
    (file, ((pages - free) * size) as f64 / 1e6)
}

fn report(label: &str, d: &Driver, path: &std::path::Path) {
    let (devices, evicted, forgotten) = d.p.devices();
    let (rss, peak) = rss_mb();
    let (file, live) = store_mb(path);
    println!(
        "{label:<28} devices={devices:>8} evicted={evicted:>8} records={forgotten:>8} dedup_keys={:>8}  rss={rss:>7.1} MB (peak {peak:.1})  store file={file:>7.1} MB live={live:>7.1} MB",
        d.p.dedup_len()
    );
}

#[tokio::main]
async fn main() {
    let n: usize = env("BENCH_DEVICES", "1000000").parse().expect("BENCH_DEVICES");
    let dir = std::path::PathBuf::from(env("BENCH_DIR", ".local/bench/devices"));
    std::fs::create_dir_all(&dir).expect("bench dir");
    let path = dir.join("state.db");
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    let store = StateStore::open(&path, "bench-changelog", "bench").expect("store");
    let cfg = PartitionConfig {
        topic: "bench".into(),
        partition: 0,
        cleanup: CleanupConfig {
            allowed_lateness_ms: 5_000,
            dedup_horizon_ms: HORIZON_MS,
            idle_timeout_ms: 1_000,
            forget_after_ms: FORGET_AFTER_MS,
            forgotten_retention_ms: RETENTION_MS,
        },
        batch_size: 1_000,
        batch_linger_ms: 200,
        checkpoint_interval_ms: 1_000,
        snapshot_min_bytes: 4 * 1024 * 1024,
        writer: "bench".into(),
    };
    let mut d = Driver {
        p: Partition::restore(cfg, PartitionState::default(), 0, 0),
        store,
        commit_offset: 0,
        prev: None,
        checkpoints: 0,
    };
    println!(
        "bench-devices: {n} devices, 3 events each, event time spread over 500 s, dedup horizon {} s",
        HORIZON_MS / 1000
    );
    report("start", &d, &path);
    let start = Instant::now();
    let (mut offset, mut now) = (0i64, 0u64);
    for i in 0..n {
        let ts = BASE + (i as i64 * 500_000 / n as i64);
        for k in 0..3i64 {
            let payload = format!(
                r#"{{"deviceId":"bench-device-{i}","ts":{},"latitude":37.7,"longitude":-122.4}}"#,
                ts + k * 100
            );
            let actions = d.p.on_event(None, payload.as_bytes(), offset, now);
            d.drive(actions, now);
            offset += 1;
        }
        if i % 1_000 == 999 {
            now += 20;
            let actions = d.p.on_tick(now, Some(now));
            d.drive(actions, now);
        }
    }
    // Everything released (idle flush) and checkpointed.
    now += 10_000;
    let actions = d.p.on_tick(now, Some(now));
    d.drive(actions, now);
    let actions = d.p.flush(now);
    d.drive(actions, now);
    d.store.sync().await.expect("store synced");
    let took = start.elapsed().as_secs_f64();
    println!(
        "{} events in {took:.1} s ({:.0} events/s through the state machine and the store), {} checkpoints",
        offset,
        offset as f64 / took,
        d.checkpoints
    );
    report("all devices within horizon", &d, &path);

    // Processing time passes FORGET_AFTER_MS while one device keeps sending: the others are
    // forgotten, each leaving a record.
    let mut ts = BASE + 500_000;
    let mut pass = |d: &mut Driver, offset: &mut i64, now: &mut u64, until: u64, step: u64| {
        while *now < until {
            *now += step;
            ts += 1_000;
            let payload = format!(r#"{{"deviceId":"clock","ts":{ts},"latitude":37.7,"longitude":-122.4}}"#);
            let actions = d.p.on_event(None, payload.as_bytes(), *offset, *now);
            d.drive(actions, *now);
            *offset += 1;
            let actions = d.p.on_tick(*now, Some(*now));
            d.drive(actions, *now);
        }
        let actions = d.p.flush(*now);
        d.drive(actions, *now);
    };
    let until = now + FORGET_AFTER_MS + 60_000;
    pass(&mut d, &mut offset, &mut now, until, 1_000);
    d.store.sync().await.expect("store synced");
    report("after FORGET_AFTER_MS", &d, &path);
    // And their records' retention: the records are dropped.
    // Records are dropped up to a sixty-fourth of the retention after it.
    let until = now + RETENTION_MS + RETENTION_MS / 32;
    pass(&mut d, &mut offset, &mut now, until, 60_000);
    d.store.sync().await.expect("store synced");
    report("after FORGOTTEN_RETENTION_MS", &d, &path);
}
