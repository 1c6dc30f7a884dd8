//! stream-processor's metrics, emitted per batch, checkpoint or tick, never per event.

use metrics::{counter, gauge, histogram};

/// Flushes one partition's event outcomes.
pub(crate) fn outcomes(c: crate::partition::Counts) {
    for (outcome, n) in [
        ("consumed", c.consumed),
        ("duplicate", c.duplicate),
        ("conflict", c.conflict),
        ("late", c.late),
        ("invalid", c.invalid),
    ] {
        if n > 0 {
            counter!("stream_processor_events_total", "outcome" => outcome).increment(n);
        }
    }
}

pub(crate) fn emitted(batch_len: usize) {
    counter!("stream_processor_events_total", "outcome" => "emitted").increment(batch_len as u64);
    histogram!("stream_processor_batch_size_events").record(batch_len as f64);
}

pub(crate) fn checkpoint(seconds: f64, snapshot: bool) {
    histogram!("stream_processor_checkpoint_duration_seconds").record(seconds);
    if snapshot {
        counter!("stream_processor_snapshots_total").increment(1);
    }
}

/// A partition's state restored: `source` is cache, cache+changelog or changelog.
pub(crate) fn restored(source: &'static str, seconds: f64) {
    counter!("stream_processor_restores_total", "source" => source).increment(1);
    histogram!("stream_processor_restore_duration_seconds").record(seconds);
}

pub(crate) fn partitions_owned(n: usize) {
    gauge!("stream_processor_partitions_owned").set(n as f64);
}

/// 1 while the partition is stopped because the topic's log ends before its committed position.
pub(crate) fn partition_stopped(partition: i32, stopped: bool) {
    gauge!("stream_processor_partition_stopped", "partition" => partition.to_string()).set(if stopped {
        1.0
    } else {
        0.0
    });
}

/// 1 while the sink refuses the partition's next batch.
pub(crate) fn sink_blocked(partition: i32, blocked: bool) {
    gauge!("stream_processor_sink_blocked", "partition" => partition.to_string()).set(if blocked {
        1.0
    } else {
        0.0
    });
}

/// The sink refused one of the partition's batches as too large, and its outbox was split.
pub(crate) fn batch_split(partition: i32) {
    counter!("stream_processor_batch_splits_total", "partition" => partition.to_string()).increment(1);
}

/// One sink request: `result` is ok, replayed, too_large, retryable or rejected.
pub(crate) fn sink_request(result: &'static str, seconds: f64) {
    counter!("stream_processor_sink_requests_total", "result" => result).increment(1);
    histogram!("stream_processor_sink_request_duration_seconds").record(seconds);
}

pub(crate) fn sink_retry() {
    counter!("stream_processor_sink_retries_total").increment(1);
}

pub(crate) fn dead_lettered(reason: &'static str, n: usize) {
    counter!("stream_processor_dlq_messages_total", "reason" => reason).increment(n as u64);
}

pub(crate) fn partition_gauges(
    partition: i32,
    buffered: usize,
    dedup_keys: usize,
    watermark_delay_s: Option<f64>,
) {
    let p = partition.to_string();
    gauge!("stream_processor_reorder_buffer_events", "partition" => p.clone()).set(buffered as f64);
    gauge!("stream_processor_dedup_state_keys", "partition" => p.clone()).set(dedup_keys as f64);
    if let Some(d) = watermark_delay_s {
        gauge!("stream_processor_watermark_delay_seconds", "partition" => p).set(d);
    }
}

/// Devices the partition knows, how many it forgot since its owner restored it, and how many
/// forgotten devices' records it keeps.
pub(crate) fn devices(partition: i32, known: usize, evicted: u64, forgotten: usize) {
    let p = partition.to_string();
    gauge!("stream_processor_devices", "partition" => p.clone()).set(known as f64);
    gauge!("stream_processor_devices_evicted", "partition" => p.clone()).set(evicted as f64);
    gauge!("stream_processor_devices_forgotten", "partition" => p).set(forgotten as f64);
}

pub(crate) fn outbox(partition: i32, batches: usize) {
    gauge!("stream_processor_outbox_batches", "partition" => partition.to_string()).set(batches as f64);
}

pub(crate) fn lag(partition: i32, lag: i64) {
    gauge!("stream_processor_consumer_lag_events", "partition" => partition.to_string()).set(lag as f64);
}

pub(crate) fn restart_to_first_batch(seconds: f64) {
    gauge!("stream_processor_restart_to_first_batch_seconds").set(seconds);
}

/// Registers every labelled counter at zero, so dashboards and alerts see the series before the
/// first event of each kind.
pub(crate) fn init() {
    for outcome in ["consumed", "duplicate", "conflict", "late", "invalid", "emitted"] {
        counter!("stream_processor_events_total", "outcome" => outcome).increment(0);
    }
    for result in ["ok", "replayed", "too_large", "retryable", "rejected"] {
        counter!("stream_processor_sink_requests_total", "result" => result).increment(0);
    }
    for reason in ["late", "invalid"] {
        counter!("stream_processor_dlq_messages_total", "reason" => reason).increment(0);
    }
    counter!("stream_processor_sink_retries_total").increment(0);
    counter!("stream_processor_snapshots_total").increment(0);
    for source in [
        "cache",
        "cache+changelog",
        "changelog",
        "cache-ahead-of-changelog",
    ] {
        counter!("stream_processor_restores_total", "source" => source).increment(0);
    }
    gauge!("stream_processor_partitions_owned").set(0.0);
}
