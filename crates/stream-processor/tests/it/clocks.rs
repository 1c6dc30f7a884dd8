//! Per-device semantics on the real broker and sink: devices whose clocks disagree share one
//! partition, and each is judged by its own history only.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::Value;
use test_support::{brokers, produce};

use crate::harness::*;

const BASE: i64 = 1_700_000_000_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_with_clocks_minutes_or_years_apart_on_one_partition_all_store_everything() {
    let mut h = Harness::with_partitions(1).await;
    let mut expected: HashMap<String, Vec<i64>> = HashMap::new();
    let mut records = Vec::new();
    fn send(
        records: &mut Vec<(Option<String>, Vec<u8>)>,
        expected: &mut HashMap<String, Vec<i64>>,
        device: &str,
        ts: i64,
        expect: bool,
    ) {
        records.push((Some(device.to_owned()), payload(device, ts)));
        if expect {
            expected.entry(device.to_owned()).or_default().push(ts);
        }
    }
    let healthy = ["healthy-1", "healthy-2", "healthy-3", "healthy-4"];
    for i in 0..300i64 {
        for d in healthy {
            send(&mut records, &mut expected, d, BASE + i * 100, true);
        }
        // 11 minutes behind the others, new to the partition.
        send(
            &mut records,
            &mut expected,
            "behind",
            BASE - 11 * 60_000 + i * 100,
            true,
        );
        if i == 100 {
            // Microseconds instead of milliseconds (written by another producer: the proxy
            // refuses it): in time for its own device, and nobody else's business.
            send(
                &mut records,
                &mut expected,
                "micros",
                (BASE + i * 100) * 1_000,
                true,
            );
        }
        if i >= 150 {
            // New after the far-future event.
            send(&mut records, &mut expected, "newcomer", BASE + i * 100, true);
        }
    }
    produce(&brokers(), &h.topic, &records).await;
    // Devices silent 2 s are forgotten, so the pause below forgets them.
    let env = [("FORGET_AFTER_MS", "2000".to_owned())];
    h.start_processor(&env);
    let first: usize = expected.values().map(Vec::len).sum();
    let stored = h.settle(first, Duration::from_secs(90)).await;
    assert_exactly(&stored, &expected);

    // A pause: every device is forgotten, and that is checkpointed.
    let start = Instant::now();
    while h
        .metric(MAIN, "stream_processor_devices_forgotten")
        .await
        .unwrap_or(0.0)
        < 7.0
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "devices not forgotten: {:?}\n{}",
            h.metric(MAIN, "stream_processor_devices_forgotten").await,
            h.log_tails()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Killed, and its state file lost: the records come back from the changelog.
    h.kill_processor();
    std::fs::remove_file(h.state_path("state.db")).expect("state file removed");
    h.start_processor(&env);

    // The healthy devices come back with newer events (stored), and one resends its last
    // stored event and an older one (dead-lettered: released before it was forgotten).
    let mut more = Vec::new();
    for i in 300..600i64 {
        for d in healthy {
            send(&mut more, &mut expected, d, BASE + i * 100, true);
        }
        if i == 310 {
            send(&mut more, &mut expected, "healthy-1", BASE + 299 * 100, false);
            send(&mut more, &mut expected, "healthy-1", BASE + 100, false);
        }
    }
    produce(&brokers(), &h.topic, &more).await;
    let total: usize = expected.values().map(Vec::len).sum();
    let stored = h.settle(total, Duration::from_secs(90)).await;
    assert_exactly(&stored, &expected);
    let letters = dead_letters(&h, 2);
    let late: Vec<i64> = letters
        .iter()
        .filter(|(r, _)| r == "late")
        .map(|(_, p)| {
            serde_json::from_slice::<Value>(p).expect("JSON")["ts"]
                .as_i64()
                .expect("ts")
        })
        .collect();
    assert_eq!(
        late.len(),
        2,
        "the two resends, dead-lettered once each: {letters:?}"
    );
    assert!(late.contains(&(BASE + 299 * 100)) && late.contains(&(BASE + 100)));
}
