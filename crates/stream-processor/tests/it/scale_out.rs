//! Partition state that moves: several processors in one group, joining, leaving, killed,
//! restarted with or without their state file, frozen and resumed as zombies. The sink must
//! still hold every event exactly once, each device in ts order, and a zombie must write
//! nothing after another processor took its partitions.
//!
//! What the test broker (noida-db) can do with group membership shapes these tests: it never
//! evicts a dead member, so partitions move by joins, by dynamic members that stop (they leave
//! the group), and by static members that restart under the same id (with or without their
//! state file). A member that dies for good and is evicted after its session timeout is a
//! Redpanda/Kafka scenario, not exercised here.

use std::collections::HashMap;
use std::time::Duration;

use stream_processor::changelog::Record;
use test_support::{brokers, consume, consume_until_quiet, produce};

use crate::harness::*;

/// Produces `records` in chunks of 1,000 with `pause` between chunks, in the background.
fn produce_slowly(
    topic: &str,
    records: Vec<(Option<String>, Vec<u8>)>,
    pause: Duration,
) -> tokio::task::JoinHandle<()> {
    let topic = topic.to_owned();
    tokio::spawn(async move {
        for chunk in records.chunks(1000) {
            produce(&brokers(), &topic, chunk).await;
            tokio::time::sleep(pause).await;
        }
    })
}

fn remove_state(h: &Harness, file: &str) {
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(h.state_path(&format!("{file}{suffix}")));
    }
}

/// `key=value` or `key="value"` of the first log line containing `marker`.
fn log_field(log: &str, marker: &str, key: &str) -> Option<String> {
    let line = log.lines().find(|l| l.contains(marker))?;
    let rest = line.split(&format!("{key}=")).nth(1)?;
    let value: String = rest
        .trim_start_matches('"')
        .chars()
        .take_while(|c| !c.is_whitespace() && *c != '"')
        .collect();
    Some(value)
}

/// How many restores each log line reports per source.
fn restore_sources(logs: &[String]) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for log in logs {
        for line in log.lines().filter(|l| l.contains("partition state restored")) {
            if let Some(src) = log_field(line, "partition state restored", "source") {
                *out.entry(src).or_insert(0) += 1;
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processors_with_partitions_moving_under_load_deliver_exactly_once() {
    let mut h = Harness::with_partitions(6).await;
    let (records, expected) = steady_stream(24, 60_000, 31);
    let producer = produce_slowly(&h.topic, records, Duration::from_millis(400));
    // A long idle timeout: rebalances stall partitions for seconds, and a device's stragglers
    // must not turn late by the idle-flush policy (that is policy, not this test's subject).
    let env = [("IDLE_TIMEOUT_MS", "8000".to_owned())];
    let (a, b, c) = (
        format!("{}-a", h.group),
        format!("{}-b", h.group),
        format!("{}-c", h.group),
    );
    h.start("a", Some(&a), "a.db", &env);
    h.start("b", Some(&b), "b.db", &env);
    h.wait_sink(1_000, Duration::from_secs(60)).await;
    // Each move waits for the group to settle before the next: the test broker mishandles a
    // static member rejoining while another rebalance is still running (the group then stops
    // assigning altogether), which is its coordinator's problem, not this test's subject.
    let restored = "partition state restored";
    let settle = Duration::from_secs(60);
    let restores = |h: &Harness| -> usize {
        ["a", "b", "c", "d"]
            .iter()
            .map(|n| h.log(n).matches(restored).count())
            .sum()
    };

    // A third static member joins.
    h.start("c", Some(&c), "c.db", &env);
    h.wait_run_log("c", restored, settle).await;
    // b dies, loses its state file, and comes back under its id: its partitions return to it
    // and are rebuilt from the changelog.
    h.kill("b");
    remove_state(&h, "b.db");
    h.start("b", Some(&b), "b.db", &env);
    h.wait_run_log("b", restored, settle).await;
    // A static member stops (it stays in the group) and restarts from its local store.
    h.signal("c", "TERM");
    let status = h
        .wait_exit("c", Duration::from_secs(60))
        .expect("c stops on SIGTERM");
    assert!(status.success(), "c exits cleanly on SIGTERM: {status:?}");
    h.start("c", Some(&c), "c.db", &env);
    h.wait_run_log("c", restored, settle).await;
    // a is killed and restarted.
    h.kill("a");
    h.start("a", Some(&a), "a.db", &env);
    h.wait_run_log("a", restored, settle).await;
    // A dynamic member with an empty store joins (the static restarts come before it: on the
    // test broker, a static member rejoining while a dynamic one is in the group was handed
    // that member's partitions without a rebalance; fencing stopped the other, as it must, but
    // the rejoining member's own partitions were left without an owner).
    h.start("d", None, "d.db", &env);
    h.wait_run_log("d", restored, settle).await;
    // The dynamic member stops and leaves: its partitions move back to members whose local
    // stores are now stale for them.
    let before = restores(&h);
    h.signal("d", "TERM");
    let status = h
        .wait_exit("d", Duration::from_secs(60))
        .expect("d stops on SIGTERM");
    assert!(status.success(), "d exits cleanly on SIGTERM: {status:?}");
    let start = std::time::Instant::now();
    while restores(&h) == before {
        assert!(
            start.elapsed() < settle,
            "d's partitions found no new owner; logs:\n{}",
            h.log_tails()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    producer.await.expect("producer");

    let total: usize = expected.values().map(Vec::len).sum();
    let stored = h.settle(total, Duration::from_secs(180)).await;
    assert_exactly(&stored, &expected);
    let letters = consume(&brokers(), &h.dlq, 1, Duration::from_secs(5));
    assert!(
        letters.is_empty(),
        "no late or invalid events were sent, so no dead letters: {}",
        letters.len()
    );

    // The moves happened as intended.
    let b_restart = &h.run_logs("b")[1];
    assert!(
        b_restart.contains("partition state restored") && b_restart.contains("changelog"),
        "b rebuilt its partitions from the changelog after losing its file"
    );
    let all: Vec<String> = ["a", "b", "c", "d"].iter().flat_map(|n| h.run_logs(n)).collect();
    let sources = restore_sources(&all);
    eprintln!("restores by source: {sources:?}");
    assert!(sources.get("changelog").copied().unwrap_or(0) >= 1, "{sources:?}");
    let owners = ["a", "b", "c", "d"]
        .iter()
        .filter(|n| h.log(n).contains("partition state restored"))
        .count();
    assert!(owners >= 3, "partitions were spread over the members");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zombie_writes_nothing_after_another_processor_took_its_partitions() {
    let mut h = Harness::new().await;
    let (records, expected) = steady_stream(8, 30_000, 77);
    let producer = produce_slowly(&h.topic, records, Duration::from_millis(300));
    let id = format!("{}-z", h.group);
    let env = [("IDLE_TIMEOUT_MS", "8000".to_owned())];
    h.start("a", Some(&id), "a.db", &env);
    h.wait_sink(2_000, Duration::from_secs(60)).await;

    // Freeze a; b joins under the same static id, so the broker hands it a's partitions, and
    // b's transactional producers fence a's.
    h.signal("a", "STOP");
    let frozen_at = h.sink.count().await;
    h.start("b", Some(&id), "b.db", &env);
    h.wait_log(
        "b",
        "partition state restored",
        PARTITIONS as usize,
        Duration::from_secs(60),
    )
    .await;
    h.wait_sink(frozen_at + 2_000, Duration::from_secs(60)).await;

    // Wake the zombie: whatever it tries must fail, and it must stop.
    h.signal("a", "CONT");
    let status = h
        .wait_exit("a", Duration::from_secs(60))
        .unwrap_or_else(|| panic!("the zombie kept running; its log:\n{}", h.log("a")));
    assert!(!status.success(), "the zombie stops with an error");
    let zombie_log = h.log("a").to_lowercase();
    assert!(
        zombie_log.contains("fenced"),
        "the zombie was stopped by fencing; its log:\n{}",
        h.log("a")
    );

    producer.await.expect("producer");
    let total: usize = expected.values().map(Vec::len).sum();
    let stored = h.settle(total, Duration::from_secs(120)).await;
    assert_exactly(&stored, &expected);

    // In each changelog partition, nothing of a's is committed after b's first checkpoint.
    let writer_a = log_field(&h.log("a"), "stream-processor starting", "writer").expect("a's writer id");
    let writer_b = log_field(&h.log("b"), "stream-processor starting", "writer").expect("b's writer id");
    assert_ne!(writer_a, writer_b);
    let records = consume_until_quiet(&brokers(), &h.changelog(), Duration::from_secs(3));
    let mut seen_b: HashMap<i32, bool> = HashMap::new();
    let mut commits = 0;
    for m in &records {
        use rdkafka::message::Message;
        let record = Record::decode(m.payload().unwrap_or_default(), m.offset()).expect("changelog record");
        let Record::Commit(commit) = record else {
            continue;
        };
        commits += 1;
        let writer = commit.id.split('.').next().expect("prefix").to_owned();
        let b_started = seen_b.entry(m.partition()).or_insert(false);
        if writer == writer_b {
            *b_started = true;
        } else if writer == writer_a {
            assert!(
                !*b_started,
                "partition {}: the zombie committed after the new owner: {commit:?}",
                m.partition()
            );
        }
    }
    assert!(commits > 0, "the changelog holds committed checkpoints");
    assert_eq!(
        seen_b.values().filter(|b| **b).count(),
        PARTITIONS as usize,
        "b checkpointed every partition"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_during_revoke_then_restart_gives_identical_sink() {
    let mut h = Harness::new().await;
    let c = crafted(4, 500, 13);
    produce(&brokers(), &h.topic, &c.records).await;
    let (a, b) = (format!("{}-a", h.group), format!("{}-b", h.group));
    h.start(
        "a",
        Some(&a),
        "a.db",
        &[("FAILPOINT", "during_revoke".to_owned())],
    );
    h.wait_sink(200, Duration::from_secs(60)).await;
    // b joins: some of a's partitions are revoked, and a aborts while handing them over.
    h.start("b", Some(&b), "b.db", &[]);
    let status = h
        .wait_exit("a", Duration::from_secs(60))
        .expect("a reached the failpoint");
    assert!(!status.success());
    assert!(h.log("a").contains("failpoint during_revoke: aborting"));
    h.start("a", Some(&a), "a.db", &[]);
    let total: usize = c.expected.values().map(Vec::len).sum();
    let stored = h.settle(total, Duration::from_secs(120)).await;
    assert_exactly(&stored, &c.expected);
    assert_only_late_and_invalid_dead_lettered_once(&h, &c);
}
