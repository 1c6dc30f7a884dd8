//! The Prometheus recorder and the per-route request metrics shared by the HTTP services.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Latency buckets in seconds, from 100 µs to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Size buckets for batch lengths and similar counts.
const SIZE_BUCKETS: &[f64] = &[
    1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
];

/// How often the recorder's upkeep runs (drains histogram samples into their buckets).
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// The process-wide Prometheus recorder, installed on first use. Histograms (names ending in
/// `_seconds`, `_size` or `_events`) get buckets so `histogram_quantile` works.
///
/// The recorder keeps histogram samples until they are folded into buckets, which a scrape
/// does; a thread does it every `UPKEEP_INTERVAL` too, so a process nobody scrapes does not
/// grow.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_events".into()), SIZE_BUCKETS))
                .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_size".into()), SIZE_BUCKETS))
                .expect("static bucket lists are not empty")
                .install_recorder()
                .expect("no other metrics recorder is installed");
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || loop {
                    std::thread::sleep(UPKEEP_INTERVAL);
                    upkeep.run_upkeep();
                })
                .expect("spawn the metrics upkeep thread");
            handle
        })
        .clone()
}

/// The names of a service's request metrics (static: no formatting per request).
#[derive(Debug, Clone, Copy)]
pub struct RequestMetrics {
    /// Counter by route, method and status, e.g. `ingest_api_http_requests_total`.
    pub requests: &'static str,
    /// Latency histogram by route, e.g. `ingest_api_http_request_duration_seconds`.
    pub duration: &'static str,
}

/// Middleware: counts requests by route, method and status and times them by route. Labels are
/// static strings (routes, methods and statuses are few, interned on first sight), so a request
/// allocates nothing here.
pub async fn track_requests(names: RequestMetrics, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| intern(p.as_str()));
    let method = method_label(req.method());
    let start = Instant::now();
    let response = next.run(req).await;
    let status = intern(response.status().as_str());
    metrics::histogram!(names.duration, "route" => route).record(start.elapsed().as_secs_f64());
    metrics::counter!(names.requests, "route" => route, "method" => method, "status" => status).increment(1);
    response
}

/// The standard methods by name; any other (clients may send any token) as `other`.
fn method_label(m: &axum::http::Method) -> &'static str {
    match m.as_str() {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        "PATCH" => "PATCH",
        _ => "other",
    }
}

/// The same `&'static str` for equal strings. Only for small, closed sets (routes the router
/// matched, HTTP methods, status codes): each distinct string is kept for the process's life.
fn intern(s: &str) -> &'static str {
    static SEEN: std::sync::OnceLock<std::sync::RwLock<std::collections::HashSet<&'static str>>> =
        std::sync::OnceLock::new();
    let seen = SEEN.get_or_init(Default::default);
    if let Some(found) = seen.read().unwrap_or_else(|p| p.into_inner()).get(s) {
        return found;
    }
    let mut all = seen.write().unwrap_or_else(|p| p.into_inner());
    match all.get(s) {
        Some(found) => found,
        None => {
            let leaked: &'static str = Box::leak(s.to_owned().into_boxed_str());
            all.insert(leaked);
            leaked
        }
    }
}
