//! stream-processor's metrics, emitted per batch, checkpoint or tick, never per event.

use metrics::{counter, gauge, histogram};

/// Events of one partition by outcome since the last flush.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct OutcomeCounts {
    pub(crate) consumed: u64,
    pub(crate) duplicate: u64,
    pub(crate) conflict: u64,
    pub(crate) late: u64,
    pub(crate) invalid: u64,
}

impl OutcomeCounts {
    pub(crate) fn flush(&mut self) {
        for (outcome, n) in [
            ("consumed", self.consumed),
            ("duplicate", self.duplicate),
            ("conflict", self.conflict),
            ("late", self.late),
            ("invalid", self.invalid),
        ] {
            if n > 0 {
                counter!("stream_processor_events_total", "outcome" => outcome).increment(n);
            }
        }
        *self = OutcomeCounts::default();
    }
}

pub(crate) fn emitted(batch_len: usize) {
    counter!("stream_processor_events_total", "outcome" => "emitted").increment(batch_len as u64);
    histogram!("stream_processor_batch_size_events").record(batch_len as f64);
}

pub(crate) fn checkpoint(seconds: f64) {
    histogram!("stream_processor_checkpoint_duration_seconds").record(seconds);
}

/// One sink request: `result` is ok, replayed, retryable or rejected.
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
    for result in ["ok", "replayed", "retryable", "rejected"] {
        counter!("stream_processor_sink_requests_total", "result" => result).increment(0);
    }
    for reason in ["late", "invalid", "sink_refused"] {
        counter!("stream_processor_dlq_messages_total", "reason" => reason).increment(0);
    }
    counter!("stream_processor_sink_retries_total").increment(0);
}
