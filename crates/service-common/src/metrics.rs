//! The Prometheus recorder and the per-route request metrics shared by the HTTP services.

use std::borrow::Cow;
use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request};
use axum::http::StatusCode;
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

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Whether [`metrics_handle`] has installed the recorder: a metric handle taken before that is
/// a no-op for good, so handles are kept for reuse only after it.
pub fn recorder_installed() -> bool {
    HANDLE.get().is_some()
}

/// A metric handle made once and reused (a lookup in the recorder's registry per use costs more
/// than the recording), or made afresh while no recorder is installed yet.
#[derive(Debug)]
pub struct Cached<T>(OnceLock<T>);

impl<T: Clone> Cached<T> {
    pub const fn new() -> Cached<T> {
        Cached(OnceLock::new())
    }

    /// The kept handle, borrowed (a clone would cost two atomic operations on a count that every
    /// request thread shares).
    pub fn get(&self, make: impl FnOnce() -> T) -> Cow<'_, T> {
        if let Some(h) = self.0.get() {
            return Cow::Borrowed(h);
        }
        if recorder_installed() {
            Cow::Borrowed(self.0.get_or_init(make))
        } else {
            Cow::Owned(make())
        }
    }
}

impl<T: Clone> Default for Cached<T> {
    fn default() -> Self {
        Cached::new()
    }
}

/// The names of a service's request metrics (static: no formatting per request).
#[derive(Debug, Clone, Copy)]
pub struct RequestMetrics {
    /// Counter by route, method and status, e.g. `ingest_api_http_requests_total`.
    pub requests: &'static str,
    /// Latency histogram by route, e.g. `ingest_api_http_request_duration_seconds`.
    pub duration: &'static str,
}

/// Layer: counts requests by route, method and status and times them by route. Labels are static
/// strings (routes, methods and statuses are few, interned on first sight), and each request
/// thread keeps its own count and histogram per label set, added up when `/metrics` is read
/// ([`render_request_metrics`]): a request allocates nothing here and writes nothing another
/// thread writes. (Measured on the proxy at 1024 connections: as an `axum::middleware::from_fn`
/// with a registry lookup per metric this cost about 10 µs of CPU a request; with handles of
/// the recorder shared by the threads, several per cent of the proxy's throughput.)
#[derive(Debug, Clone, Copy)]
pub struct TrackRequests(pub RequestMetrics);

impl<S> tower::Layer<S> for TrackRequests {
    type Service = Tracked<S>;

    fn layer(&self, inner: S) -> Tracked<S> {
        Tracked { inner, names: self.0 }
    }
}

/// The service [`TrackRequests`] wraps around each route.
#[derive(Debug, Clone)]
pub struct Tracked<S> {
    inner: S,
    names: RequestMetrics,
}

impl<S> tower::Service<Request> for Tracked<S>
where
    S: tower::Service<Request, Response = Response> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = S::Error;
    type Future = TrackedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let (route, method) = route_and_method(&req);
        TrackedFuture {
            start: Instant::now(),
            inner: self.inner.call(req),
            names: self.names,
            route,
            method,
        }
    }
}

pin_project_lite::pin_project! {
    /// A request's future, recording it when it completes (not boxed: the route's future is
    /// large, and moving it to the heap per request cost more than the recording).
    #[derive(Debug)]
    pub struct TrackedFuture<F> {
        #[pin]
        inner: F,
        start: Instant,
        names: RequestMetrics,
        route: &'static str,
        method: &'static str,
    }
}

impl<F, E> Future for TrackedFuture<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = std::task::ready!(this.inner.poll(cx))?;
        record_request(
            *this.names,
            this.route,
            this.method,
            response.status(),
            this.start.elapsed(),
        );
        Poll::Ready(Ok(response))
    }
}

fn route_and_method(req: &Request) -> (&'static str, &'static str) {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| intern(p.as_str()));
    (route, method_label(req.method()))
}

/// One label set's requests as one thread recorded them: their count by latency bucket and the
/// sum of their latencies. Only that thread writes it, with plain loads and stores (no
/// read-modify-write on a cache line the other threads write too); `/metrics` reads every
/// thread's and adds them up.
#[derive(Debug)]
struct Series {
    names: RequestMetrics,
    route: &'static str,
    method: &'static str,
    status: &'static str,
    /// Requests by the first of [`LATENCY_BUCKETS`] at or above their latency, then `+Inf`.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    /// The sum of their latencies in seconds (the bits of an `f64`).
    sum: AtomicU64,
}

impl Series {
    /// Called by the owning thread only.
    fn record(&self, seconds: f64) {
        let slot = &self.buckets[LATENCY_BUCKETS.partition_point(|le| *le < seconds)];
        slot.store(slot.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        let sum = f64::from_bits(self.sum.load(Ordering::Relaxed)) + seconds;
        self.sum.store(sum.to_bits(), Ordering::Relaxed);
    }
}

/// A series' label set: the metric name, route and method (static strings, compared by
/// address) and the status.
type SeriesKey = (usize, usize, usize, u16);

/// Every thread's series, for `/metrics`.
static ALL_SERIES: Mutex<Vec<Arc<Series>>> = Mutex::new(Vec::new());

fn record_request(
    names: RequestMetrics,
    route: &'static str,
    method: &'static str,
    status: StatusCode,
    took: Duration,
) {
    // Each request thread keeps its own series: the label sets are few, and a count shared by
    // the threads cost more than the recording (scripts/bench-proxy).
    thread_local! {
        static MINE: RefCell<Vec<(SeriesKey, Arc<Series>)>> = const { RefCell::new(Vec::new()) };
    }
    let key = (
        names.requests.as_ptr() as usize,
        route.as_ptr() as usize,
        method.as_ptr() as usize,
        status.as_u16(),
    );
    MINE.with_borrow_mut(|mine| {
        let i = match mine.iter().position(|(k, _)| *k == key) {
            Some(i) => i,
            None => {
                let series = Arc::new(Series {
                    names,
                    route,
                    method,
                    status: intern(status.as_str()),
                    buckets: Default::default(),
                    sum: AtomicU64::new(0f64.to_bits()),
                });
                ALL_SERIES
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(Arc::clone(&series));
                mine.push((key, series));
                mine.len() - 1
            }
        };
        mine[i].1.record(took.as_secs_f64());
    });
}

/// Appends the request metrics in Prometheus text format: the counter by route, method and
/// status, and the latency histogram by route, each summed over the threads that recorded it.
pub fn render_request_metrics(out: &mut String) {
    use std::collections::BTreeMap;
    use std::fmt::Write;
    let all = ALL_SERIES.lock().unwrap_or_else(|p| p.into_inner());
    let mut counts: BTreeMap<(&str, &str, &str, &str), u64> = BTreeMap::new();
    let mut histograms: BTreeMap<(&str, &str), (Vec<u64>, f64)> = BTreeMap::new();
    for s in all.iter() {
        let buckets: Vec<u64> = s.buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect();
        *counts
            .entry((s.names.requests, s.route, s.method, s.status))
            .or_default() += buckets.iter().sum::<u64>();
        let (sums, sum) = histograms
            .entry((s.names.duration, s.route))
            .or_insert_with(|| (vec![0; buckets.len()], 0.0));
        sums.iter_mut().zip(&buckets).for_each(|(a, b)| *a += b);
        *sum += f64::from_bits(s.sum.load(Ordering::Relaxed));
    }
    drop(all);
    let mut last = "";
    for ((name, route, method, status), n) in counts {
        if name != last {
            let _ = writeln!(out, "# TYPE {name} counter");
            last = name;
        }
        let (route, method) = (escape(route), escape(method));
        let _ = writeln!(
            out,
            r#"{name}{{route="{route}",method="{method}",status="{status}"}} {n}"#
        );
    }
    for ((name, route), (buckets, sum)) in histograms {
        if name != last {
            let _ = writeln!(out, "# TYPE {name} histogram");
            last = name;
        }
        let route = escape(route);
        let mut cumulative = 0;
        for (i, n) in buckets.iter().enumerate() {
            cumulative += n;
            match LATENCY_BUCKETS.get(i) {
                Some(le) => {
                    let _ = writeln!(out, r#"{name}_bucket{{route="{route}",le="{le}"}} {cumulative}"#);
                }
                None => {
                    let _ = writeln!(out, r#"{name}_bucket{{route="{route}",le="+Inf"}} {cumulative}"#);
                }
            }
        }
        let _ = writeln!(out, r#"{name}_sum{{route="{route}"}} {sum}"#);
        let _ = writeln!(out, r#"{name}_count{{route="{route}"}} {cumulative}"#);
    }
}

/// A label value as Prometheus text format writes it.
fn escape(value: &str) -> Cow<'_, str> {
    if value.contains(['\\', '"', '\n']) {
        Cow::Owned(
            value
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n"),
        )
    } else {
        Cow::Borrowed(value)
    }
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
/// Each thread remembers what it has seen, so a known string takes no lock.
fn intern(s: &str) -> &'static str {
    thread_local! {
        static KNOWN: RefCell<Vec<&'static str>> = const { RefCell::new(Vec::new()) };
    }
    if let Some(found) = KNOWN.with_borrow(|known| known.iter().find(|k| **k == s).copied()) {
        return found;
    }
    static SEEN: OnceLock<std::sync::Mutex<std::collections::HashSet<&'static str>>> = OnceLock::new();
    let mut all = SEEN
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let found = match all.get(s) {
        Some(found) => *found,
        None => {
            let leaked: &'static str = Box::leak(s.to_owned().into_boxed_str());
            all.insert(leaked);
            leaked
        }
    };
    KNOWN.with_borrow_mut(|known| known.push(found));
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAMES: RequestMetrics = RequestMetrics {
        requests: "test_threads_requests_total",
        duration: "test_threads_request_duration_seconds",
    };

    fn lines_of(text: &str, name: &str) -> Vec<String> {
        text.lines()
            .filter(|l| l.starts_with(name))
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn what_each_thread_recorded_is_added_up_at_render() {
        let threads: Vec<_> = (0..3)
            .map(|_| {
                std::thread::spawn(|| {
                    for ms in [0.05, 3.0, 3.0, 20_000.0] {
                        let took = Duration::from_secs_f64(ms / 1000.0);
                        record_request(NAMES, "/event", "POST", StatusCode::ACCEPTED, took);
                    }
                    record_request(
                        NAMES,
                        "/event",
                        "POST",
                        StatusCode::SERVICE_UNAVAILABLE,
                        Duration::ZERO,
                    );
                })
            })
            .collect();
        threads
            .into_iter()
            .for_each(|t| t.join().expect("a recording thread"));

        let mut text = String::new();
        render_request_metrics(&mut text);
        assert_eq!(
            lines_of(&text, NAMES.requests),
            [
                r#"test_threads_requests_total{route="/event",method="POST",status="202"} 12"#,
                r#"test_threads_requests_total{route="/event",method="POST",status="503"} 3"#,
            ]
        );
        let histogram = lines_of(&text, NAMES.duration);
        let bucket = |le: &str| {
            let prefix = format!(r#"{}_bucket{{route="/event",le="{le}"}} "#, NAMES.duration);
            let line = histogram
                .iter()
                .find(|l| l.starts_with(&prefix))
                .expect("the bucket");
            line[prefix.len()..].parse::<u64>().expect("a count")
        };
        // 3 threads: each 2 requests at or under 100 µs (0 and 50 µs), 2 at 3 ms, 1 over 10 s.
        assert_eq!(bucket("0.0001"), 6);
        assert_eq!(bucket("0.0025"), 6);
        assert_eq!(bucket("0.005"), 12);
        assert_eq!(bucket("10"), 12);
        assert_eq!(bucket("+Inf"), 15);
        assert!(histogram.contains(&format!(r#"{}_count{{route="/event"}} 15"#, NAMES.duration)));
        let sum_prefix = format!(r#"{}_sum{{route="/event"}} "#, NAMES.duration);
        let sum: f64 = histogram
            .iter()
            .find_map(|l| l.strip_prefix(&sum_prefix))
            .expect("the sum")
            .parse()
            .expect("a number");
        assert!((sum - 3.0 * 20.00605).abs() < 1e-9, "sum {sum}");
        assert_eq!(
            text.matches("# TYPE test_threads_requests_total counter").count(),
            1,
            "one TYPE line per metric"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape("/events/batch"), "/events/batch");
    }
}
