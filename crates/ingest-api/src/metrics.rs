//! ingest-api's metrics, emitted once per request or commit, never per event.

use metrics::{counter, histogram};

/// A write transaction committed `requests` queued requests in `seconds`.
pub(crate) fn commit(seconds: f64, requests: usize) {
    histogram!("ingest_api_insert_duration_seconds").record(seconds);
    histogram!("ingest_api_commit_group_size").record(requests as f64);
}

pub(crate) fn rows_inserted(n: usize) {
    counter!("ingest_api_rows_inserted_total").increment(n as u64);
}

/// A batch was applied (`replayed` false) or answered from its idempotency key.
pub(crate) fn batch(replayed: bool, rows: usize) {
    counter!("ingest_api_batches_total", "replayed" => if replayed { "true" } else { "false" }).increment(1);
    rows_inserted(rows);
}

/// Expired idempotency keys deleted.
pub(crate) fn keys_pruned(n: usize) {
    counter!("ingest_api_idempotency_keys_pruned_total").increment(n as u64);
}

/// Registers the series at zero, so dashboards and alerts see them before the first write.
pub(crate) fn init() {
    rows_inserted(0);
    keys_pruned(0);
    for replayed in ["true", "false"] {
        counter!("ingest_api_batches_total", "replayed" => replayed).increment(0);
    }
}
