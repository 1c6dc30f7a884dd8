//! ingest-proxy's metrics, emitted once per request, never per event, through handles kept
//! for reuse (a registry lookup per use cost more than the recording).

use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};
use service_common::metrics::Cached;

/// What became of an event the proxy was sent.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Outcome {
    Accepted,
    Invalid,
    /// The broker or the in-flight bound refused it (503).
    Rejected,
}

impl Outcome {
    const ALL: [Outcome; 3] = [Outcome::Accepted, Outcome::Invalid, Outcome::Rejected];

    fn label(self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::Invalid => "invalid",
            Outcome::Rejected => "rejected",
        }
    }
}

/// Events of one request by outcome.
pub(crate) fn events(outcome: Outcome, n: usize) {
    static COUNTERS: [Cached<Counter>; 3] = [Cached::new(), Cached::new(), Cached::new()];
    if n > 0 {
        COUNTERS[outcome as usize]
            .get(|| counter!("ingest_proxy_events_total", "outcome" => outcome.label()))
            .increment(n as u64);
    }
}

/// Time from handing a request's events to the producer to the broker's last acknowledgement.
pub(crate) fn produce_latency(seconds: f64) {
    static H: Cached<Histogram> = Cached::new();
    H.get(|| histogram!("ingest_proxy_produce_duration_seconds"))
        .record(seconds);
}

/// Set when `/metrics` is read (a gauge is its value at the scrape), not by every request.
pub(crate) fn in_flight(n: usize) {
    static G: Cached<Gauge> = Cached::new();
    G.get(|| gauge!("ingest_proxy_events_in_flight")).set(n as f64);
}

pub(crate) fn broker_up(up: bool) {
    gauge!("ingest_proxy_broker_up").set(if up { 1.0 } else { 0.0 });
}

/// Registers the series at zero, so dashboards and alerts see them before the first event.
pub(crate) fn init() {
    for outcome in Outcome::ALL {
        counter!("ingest_proxy_events_total", "outcome" => outcome.label()).increment(0);
    }
    in_flight(0);
    broker_up(false);
}
