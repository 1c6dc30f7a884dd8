//! The exactly-once guarantee with one processor: crafted streams, failpoints at every step
//! of the protocol, random SIGKILLs under load, a sink outage, a lost state file.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::Value;
use test_support::{brokers, produce};

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crafted_stream_reaches_the_sink_exactly_once_in_order_with_late_and_invalid_in_the_dlq() {
    let mut h = Harness::new().await;
    let c = crafted(6, 700, 7);
    produce(&brokers(), &h.topic, &c.records).await;
    h.start_processor(&[]);
    let total: usize = c.expected.values().map(Vec::len).sum();
    let stored = h.settle(total, Duration::from_secs(90)).await;
    assert_exactly(&stored, &c.expected);

    let letters = dead_letters(&h, c.late.len() + c.invalid);
    let late: HashSet<(String, i64)> = letters
        .iter()
        .filter(|(r, _)| r == "late")
        .map(|(_, p)| {
            let v: Value = serde_json::from_slice(p).expect("a JSON payload");
            (
                v["deviceId"].as_str().expect("deviceId is a string").to_owned(),
                v["ts"].as_i64().expect("ts is an integer"),
            )
        })
        .collect();
    assert_eq!(late, c.late, "late events in the dead-letter topic");
    assert_eq!(
        letters.iter().filter(|(r, _)| r == "invalid").count(),
        c.invalid,
        "invalid payloads in the dead-letter topic"
    );
}

async fn failpoint_scenario(step: &str, hit: u64) {
    let mut h = Harness::new().await;
    let c = crafted(4, 500, 11);
    produce(&brokers(), &h.topic, &c.records).await;
    h.start_processor(&[("FAILPOINT", step.to_owned()), ("FAILPOINT_HIT", hit.to_string())]);
    let status = h
        .wait_processor_exit(Duration::from_secs(90))
        .expect("processor did not reach the failpoint");
    assert!(!status.success(), "processor should have aborted at {step}");
    assert!(
        h.log(MAIN).contains(&format!("failpoint {step}: aborting")),
        "abort was not at {step}"
    );
    h.start_processor(&[]);
    let total: usize = c.expected.values().map(Vec::len).sum();
    let stored = h.settle(total, Duration::from_secs(90)).await;
    assert_exactly(&stored, &c.expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_after_consume_before_checkpoint_then_restart_gives_identical_sink() {
    failpoint_scenario("after_consume_before_checkpoint", 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_during_restore_then_restart_gives_identical_sink() {
    failpoint_scenario("during_restore", 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_after_checkpoint_before_post_then_restart_gives_identical_sink() {
    failpoint_scenario("after_checkpoint_before_post", 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_after_post_before_ack_recorded_then_restart_gives_identical_sink() {
    failpoint_scenario("after_post_before_ack_recorded", 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_after_changelog_commit_before_cache_then_restart_gives_identical_sink() {
    failpoint_scenario("after_changelog_commit_before_cache", 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_random_kills_during_a_100k_event_stream_lose_and_duplicate_nothing() {
    let mut h = Harness::new().await;
    let (records, expected) = steady_stream(8, 100_000, 42);
    let topic = h.topic.clone();
    // About 20 s of production at a steady rate, while the processor is killed and restarted.
    let producer = tokio::spawn(async move {
        for chunk in records.chunks(1000) {
            produce(&brokers(), &topic, chunk).await;
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    });
    // Devices must not count as idle (IDLE_TIMEOUT_MS) while the producer is merely slow on a
    // loaded machine: an idle flush makes the events that follow late, by design.
    let env = [("IDLE_TIMEOUT_MS", "8000".to_owned())];
    h.start_processor(&env);
    let mut rng = 99u64;
    let mut kills = 0;
    while kills < 10 {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        tokio::time::sleep(Duration::from_millis(800 + (rng >> 33) % 1700)).await;
        h.kill_processor();
        kills += 1;
        h.start_processor(&env);
    }
    producer.await.expect("the task ran to its end");
    let total: usize = expected.values().map(Vec::len).sum();
    let stored = h.settle(total, Duration::from_secs(180)).await;
    assert_exactly(&stored, &expected);
    // Restarted processors got their partitions back at once (static membership).
    let mut times = Vec::new();
    for log in h.run_logs(MAIN).iter().skip(1) {
        if let Some(line) = log
            .lines()
            .find(|l| l.contains("first batch delivered since start"))
        {
            let secs: f64 = line
                .split("seconds=")
                .nth(1)
                .and_then(|s| s.split_whitespace().next())
                .and_then(|s| s.parse().ok())
                .unwrap_or(f64::NAN);
            times.push(secs);
        }
    }
    eprintln!("restart-to-first-batch seconds: {times:?}");
    assert!(times.len() >= 5, "most restarts delivered a batch: {times:?}");
    assert!(
        times.iter().all(|t| *t < 15.0),
        "a restart waited too long for its first batch: {times:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_down_for_seconds_mid_stream_loses_and_duplicates_nothing() {
    let mut h = Harness::new().await;
    let (records, expected) = steady_stream(5, 20_000, 5);
    let (first, second) = records.split_at(records.len() / 2);
    produce(&brokers(), &h.topic, first).await;
    h.start_processor(&[("IDLE_TIMEOUT_MS", "8000".to_owned())]);
    let start = Instant::now();
    while h.sink.count().await < 2_000 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "processor delivered nothing"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    h.sink.pause().await;
    produce(&brokers(), &h.topic, second).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    h.sink.resume().await;
    let total: usize = expected.values().map(Vec::len).sum();
    let stored = h.settle(total, Duration::from_secs(120)).await;
    assert_exactly(&stored, &expected);
    assert!(
        h.log(MAIN).contains("sink request failed, retrying"),
        "the outage was noticed and retried"
    );
}

/// Where each partition's changelog starts: above 0 once a snapshot let the log before it go.
fn changelog_starts(h: &Harness) -> Vec<i64> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer =
        service_common::kafka::manual_consumer(&test_support::connection(&brokers()), "changelog-starts")
            .create()
            .expect("consumer");
    (0..PARTITIONS)
        .map(|p| {
            consumer
                .fetch_watermarks(&h.changelog(), p, Duration::from_secs(10))
                .expect("changelog watermarks")
                .0
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_state_file_is_rebuilt_from_the_changelog_and_nothing_repeats() {
    let mut h = Harness::new().await;
    let (records, expected) = steady_stream(6, 20_000, 9);
    let (first, second) = records.split_at(records.len() / 2);
    // Small snapshots: the changelog is cut before each one (by the encoded bytes the writers
    // report), so the restore below reads a snapshot and what followed, not the whole history.
    let env = [
        ("IDLE_TIMEOUT_MS", "8000".to_owned()),
        ("SNAPSHOT_MIN_BYTES", "16384".to_owned()),
    ];
    produce(&brokers(), &h.topic, first).await;
    h.start_processor(&env);
    h.wait_sink(5_000, Duration::from_secs(60)).await;
    h.kill_processor();
    let starts = changelog_starts(&h);
    assert!(
        starts.iter().any(|s| *s > 0),
        "a snapshot by size cut some partition's changelog: starts {starts:?}"
    );
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(h.state_path(&format!("state.db{suffix}")));
    }
    produce(&brokers(), &h.topic, second).await;
    h.start_processor(&env);
    let total: usize = expected.values().map(Vec::len).sum();
    let stored = h.settle(total, Duration::from_secs(120)).await;
    assert_exactly(&stored, &expected);
    let restart = &h.run_logs(MAIN)[1];
    let restores: Vec<&str> = restart
        .lines()
        .filter(|l| l.contains("partition state restored"))
        .collect();
    assert_eq!(restores.len(), PARTITIONS as usize, "every partition restored");
    assert!(
        restores
            .iter()
            .all(|l| l.contains("changelog") && !l.contains("cache")),
        "restored from the changelog alone: {restores:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_that_refuses_batches_blocks_delivery_and_loses_nothing() {
    let mut h = Harness::new().await;
    let c = crafted(4, 400, 21);
    produce(&brokers(), &h.topic, &c.records).await;
    // A wrong path: the sink answers 404 to every batch.
    let wrong = h.sink.url().replace("/events/batch", "/events/batches");
    h.start_processor(&[("INGEST_URL", wrong), ("SHUTDOWN_TIMEOUT_MS", "1000".to_owned())]);
    h.wait_log(
        MAIN,
        "delivery of this partition is blocked",
        1,
        Duration::from_secs(60),
    )
    .await;
    h.wait_unready(MAIN, "the blocked sink").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(h.sink.count().await, 0, "nothing reached the sink");
    h.signal(MAIN, "TERM");
    let status = h
        .wait_processor_exit(Duration::from_secs(60))
        .expect("stops on SIGTERM");
    assert!(status.success(), "{status:?}");
    // The right URL: every in-time event arrives, and the dead-letter topic holds only the
    // late and invalid events.
    h.start_processor(&[]);
    let total: usize = c.expected.values().map(Vec::len).sum();
    let stored = h.settle(total, Duration::from_secs(120)).await;
    assert_exactly(&stored, &c.expected);
    assert_only_late_and_invalid_dead_lettered_once(&h, &c);
    // After a clean stop the local cache is current: the restart restores every partition that
    // has a committed state from it alone (the others have an empty changelog).
    let restores: Vec<String> = h.run_logs(MAIN)[1]
        .lines()
        .filter(|l| l.contains("partition state restored") && l.contains("resume_offset=Some"))
        .map(str::to_owned)
        .collect();
    assert!(!restores.is_empty(), "a partition with state was restored");
    assert!(
        restores.iter().all(|l| l.contains(r#"source="cache""#)),
        "restored from the local cache: {restores:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_size_above_the_sinks_limit_splits_batches_and_loses_nothing_across_a_kill() {
    let mut h = Harness::new().await;
    h.sink.limit_batches(60).await;
    let c = crafted(4, 600, 23);
    produce(&brokers(), &h.topic, &c.records).await;
    // BATCH_SIZE 500 against MAX_BATCH_LEN 60: every batch is refused (413) until split.
    let big = [
        ("BATCH_SIZE", "500".to_owned()),
        ("BATCH_LINGER_MS", "1000".to_owned()),
    ];
    h.start_processor(&big);
    h.wait_log(MAIN, "the outbox is split", 2, Duration::from_secs(60))
        .await;
    h.kill_processor();
    // The next owner finds the split outbox (or the unsplit one, if the kill came before the
    // split committed) and splits again where it must.
    h.start_processor(&big);
    let total: usize = c.expected.values().map(Vec::len).sum();
    let stored = h.settle(total, Duration::from_secs(120)).await;
    assert_exactly(&stored, &c.expected);
    assert!(
        h.run_logs(MAIN)
            .iter()
            .all(|l| !l.contains("delivery of this partition is blocked")),
        "a batch over the limit is split, not blocked"
    );
    assert_only_late_and_invalid_dead_lettered_once(&h, &c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_log_that_ends_before_the_committed_position_stops_the_partition() {
    let mut h = Harness::new().await;
    let (records, expected) = steady_stream(3, 3_000, 17);
    produce(&brokers(), &h.topic, &records).await;
    h.start_processor(&[]);
    let total: usize = expected.values().map(Vec::len).sum();
    h.settle(total, Duration::from_secs(90)).await;
    h.signal(MAIN, "TERM");
    let status = h
        .wait_processor_exit(Duration::from_secs(60))
        .expect("stops on SIGTERM");
    assert!(status.success(), "{status:?}");
    // The same committed state against a log that ends earlier, as after the topic was
    // recreated: the new events sit below the stored positions and must not be skipped quietly.
    let recreated = test_support::unique("eo-recreated");
    test_support::create_topic(&brokers(), &recreated, PARTITIONS).await;
    let (few, _) = steady_stream(3, 30, 18);
    produce(&brokers(), &recreated, &few).await;
    let changelog = h.changelog();
    h.start_processor(&[("KAFKA_TOPIC", recreated), ("CHANGELOG_TOPIC", changelog)]);
    h.wait_run_log(
        MAIN,
        "the topic's log ends before this partition's committed position",
        Duration::from_secs(60),
    )
    .await;
    h.wait_unready(MAIN, "the stopped partition").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        h.sink.count().await as usize,
        total,
        "nothing of the shorter log was delivered"
    );
}
