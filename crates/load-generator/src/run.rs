//! Sending the plan: each burst's events grouped by device, each device's sent one after
//! another (as a real device would), devices in parallel up to the concurrency bound.
//! 503/429/5xx and transport errors are retried, honouring `Retry-After`.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::Semaphore;

use crate::config::Settings;
use crate::plan::{Kind, Planned, Planner};

/// Totals of a run.
#[derive(Debug, Default, Clone)]
pub struct Summary {
    pub sent: u64,
    pub accepted: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    pub refused: u64,
    pub retries: u64,
    pub latencies_ms: Vec<f64>,
}

impl Summary {
    fn add(&mut self, other: &Summary) {
        self.sent += other.sent;
        self.accepted += other.accepted;
        self.duplicates += other.duplicates;
        self.out_of_order += other.out_of_order;
        self.refused += other.refused;
        self.retries += other.retries;
        self.latencies_ms.extend_from_slice(&other.latencies_ms);
    }

    pub fn percentile(&self, p: f64) -> f64 {
        if self.latencies_ms.is_empty() {
            return 0.0;
        }
        let mut v = self.latencies_ms.clone();
        v.sort_by(f64::total_cmp);
        v[((v.len() - 1) as f64 * p).round() as usize]
    }
}

enum Sent {
    Accepted,
    /// Refused for good; `maybe_stored` when the answer leaves that open (timeout, 503).
    Refused {
        maybe_stored: bool,
        why: String,
    },
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

async fn send_one(client: &reqwest::Client, s: &Settings, body: &str, stats: &mut Summary) -> Sent {
    let mut attempt = 0u32;
    loop {
        let start = Instant::now();
        let mut req = client
            .post(&s.ingest_url)
            .header("content-type", "application/json")
            .body(body.to_owned());
        if let Some(token) = &s.ingest_token {
            req = req.bearer_auth(token);
        }
        let result = req.send().await;
        stats.sent += 1;
        stats.latencies_ms.push(start.elapsed().as_secs_f64() * 1000.0);
        let (retry_after, why) = match result {
            Ok(resp) if resp.status().is_success() => return Sent::Accepted,
            Ok(resp) => {
                let status = resp.status().as_u16();
                let retry_after = resp
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok());
                let text = resp.text().await.unwrap_or_default();
                if !(status == 503 || status == 429 || status == 408 || status >= 500) {
                    return Sent::Refused {
                        maybe_stored: false,
                        why: format!("status {status}: {text}"),
                    };
                }
                (retry_after, format!("status {status}"))
            }
            Err(e) => (None, e.to_string()),
        };
        if attempt >= s.max_retries {
            return Sent::Refused {
                maybe_stored: true,
                why,
            };
        }
        attempt += 1;
        stats.retries += 1;
        let backoff = Duration::from_millis((100u64 << attempt.min(5)).min(2000));
        let wait = retry_after
            .map(|secs| Duration::from_secs(secs.min(30)))
            .unwrap_or(backoff);
        tokio::time::sleep(wait).await;
    }
}

type Manifest = Arc<Mutex<Option<std::io::BufWriter<std::fs::File>>>>;

fn record(manifest: &Manifest, planned: &Planned, status: &str) {
    let mut guard = manifest.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(w) = guard.as_mut() {
        let mut line = serde_json::to_value(&planned.event).expect("event serializes");
        line["status"] = serde_json::Value::from(status);
        if status == "accepted" {
            // When the acknowledgement came (unix ms), for verify's end-to-end latency.
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64);
            line["ackedAt"] = serde_json::Value::from(now);
        }
        let _ = writeln!(w, "{line}");
    }
}

async fn send_lane(
    client: reqwest::Client,
    s: Arc<Settings>,
    lane: Vec<Planned>,
    limit: Arc<Semaphore>,
    manifest: Manifest,
) -> Summary {
    let mut stats = Summary::default();
    for planned in lane {
        let _permit = limit.acquire().await.expect("semaphore open");
        let body = serde_json::to_string(&planned.event).expect("event serializes");
        match planned.kind {
            Kind::Duplicate => stats.duplicates += 1,
            Kind::OutOfOrder => stats.out_of_order += 1,
            Kind::Fresh => {}
        }
        match send_one(&client, &s, &body, &mut stats).await {
            Sent::Accepted => {
                stats.accepted += 1;
                record(&manifest, &planned, "accepted");
            }
            Sent::Refused { maybe_stored, why } => {
                stats.refused += 1;
                eprintln!(
                    "event {}@{} refused: {why}",
                    planned.event.device_id, planned.event.ts
                );
                if maybe_stored {
                    record(&manifest, &planned, "unacknowledged");
                }
            }
        }
    }
    stats
}

/// Runs every burst and returns the totals.
pub async fn run(settings: Settings) -> anyhow::Result<Summary> {
    let seed = settings.seed.unwrap_or_else(rand::random);
    let mut planner = Planner::new(
        seed,
        settings.devices,
        &settings.device_prefix,
        settings.base_lat,
        settings.base_lon,
        settings.duplicate_rate,
        settings.out_of_order_rate,
        settings.max_out_of_order_ms,
    );
    let manifest: Manifest = Arc::new(Mutex::new(match &settings.manifest {
        Some(path) => Some(std::io::BufWriter::new(std::fs::File::create(path)?)),
        None => None,
    }));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(settings.request_timeout_ms))
        .pool_max_idle_per_host(settings.concurrency.max(1))
        .build()?;
    let limit = Arc::new(Semaphore::new(settings.concurrency.max(1)));
    let settings = Arc::new(settings);
    println!(
        "load: {} bursts of {} events to {} ({} devices, seed {seed})",
        settings.bursts, settings.burst_size, settings.ingest_url, settings.devices
    );
    let mut total = Summary::default();
    let started = Instant::now();
    for b in 0..settings.bursts {
        let burst_start = Instant::now();
        let plan = planner.burst(settings.burst_size, now_ms());
        let mut lanes: Vec<Vec<Planned>> = vec![Vec::new(); settings.devices.max(1)];
        for p in plan {
            lanes[p.device].push(p);
        }
        let tasks: Vec<_> = lanes
            .into_iter()
            .filter(|l| !l.is_empty())
            .map(|lane| {
                tokio::spawn(send_lane(
                    client.clone(),
                    Arc::clone(&settings),
                    lane,
                    Arc::clone(&limit),
                    Arc::clone(&manifest),
                ))
            })
            .collect();
        let mut burst = Summary::default();
        for t in tasks {
            burst.add(&t.await?);
        }
        println!(
            "burst {}/{}: events={} accepted={} refused={} retries={} in {} ms",
            b + 1,
            settings.bursts,
            burst.accepted + burst.refused,
            burst.accepted,
            burst.refused,
            burst.retries,
            burst_start.elapsed().as_millis()
        );
        total.add(&burst);
        if b + 1 < settings.bursts {
            let interval = Duration::from_millis(settings.burst_interval_ms);
            tokio::time::sleep(interval.saturating_sub(burst_start.elapsed())).await;
        }
    }
    if let Some(w) = manifest.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
        w.flush()?;
    }
    println!(
        "load: events={} accepted={} duplicates={} out_of_order={} refused={} retries={} requests={} p50_ms={:.2} p99_ms={:.2} elapsed_s={:.1}",
        total.accepted + total.refused,
        total.accepted,
        total.duplicates,
        total.out_of_order,
        total.refused,
        total.retries,
        total.sent,
        total.percentile(0.50),
        total.percentile(0.99),
        started.elapsed().as_secs_f64()
    );
    Ok(total)
}
