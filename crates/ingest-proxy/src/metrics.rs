//! ingest-proxy's metrics, emitted once per request, never per event.

use metrics::{counter, gauge, histogram};

/// Events of one request by outcome: `accepted`, `invalid` or `rejected` (broker or capacity).
pub(crate) fn events(outcome: &'static str, n: usize) {
    if n > 0 {
        counter!("ingest_proxy_events_total", "outcome" => outcome).increment(n as u64);
    }
}

/// Time from handing a request's events to the producer to the broker's last acknowledgement.
pub(crate) fn produce_latency(seconds: f64) {
    histogram!("ingest_proxy_produce_duration_seconds").record(seconds);
}

pub(crate) fn in_flight(n: usize) {
    gauge!("ingest_proxy_events_in_flight").set(n as f64);
}

pub(crate) fn broker_up(up: bool) {
    gauge!("ingest_proxy_broker_up").set(if up { 1.0 } else { 0.0 });
}

/// Registers the series at zero, so dashboards and alerts see them before the first event.
pub(crate) fn init() {
    for outcome in ["accepted", "invalid", "rejected"] {
        counter!("ingest_proxy_events_total", "outcome" => outcome).increment(0);
    }
    in_flight(0);
    broker_up(false);
}
