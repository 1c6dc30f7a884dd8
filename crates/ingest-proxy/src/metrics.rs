//! ingest-proxy's metrics, emitted once per request, never per event, through handles kept
//! for reuse (a registry lookup per use cost more than the recording).

use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};
use service_common::metrics::Cached;

/// Events of one request by outcome: `accepted`, `invalid` or `rejected` (broker or capacity).
pub(crate) fn events(outcome: &'static str, n: usize) {
    static ACCEPTED: Cached<Counter> = Cached::new();
    static INVALID: Cached<Counter> = Cached::new();
    static REJECTED: Cached<Counter> = Cached::new();
    if n == 0 {
        return;
    }
    let make = || counter!("ingest_proxy_events_total", "outcome" => outcome);
    let counter = match outcome {
        "accepted" => ACCEPTED.get(make),
        "invalid" => INVALID.get(make),
        "rejected" => REJECTED.get(make),
        _ => make(),
    };
    counter.increment(n as u64);
}

/// Time from handing a request's events to the producer to the broker's last acknowledgement.
pub(crate) fn produce_latency(seconds: f64) {
    static H: Cached<Histogram> = Cached::new();
    H.get(|| histogram!("ingest_proxy_produce_duration_seconds"))
        .record(seconds);
}

pub(crate) fn in_flight(n: usize) {
    static G: Cached<Gauge> = Cached::new();
    G.get(|| gauge!("ingest_proxy_events_in_flight")).set(n as f64);
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
