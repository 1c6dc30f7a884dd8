//! Delivery of outbox batches to the sink (ingest-api `/events/batch`) with the batch id as
//! `Idempotency-Key`: retried with capped exponential backoff and jitter on 5xx, 408, 429,
//! timeouts and connection errors, until acknowledged, refused (other 4xx) or cancelled.

use std::time::{Duration, Instant};

use rand::Rng;
use tokio_util::sync::CancellationToken;

use crate::store::OutboxBatch;

/// How a delivery ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// The sink stored the batch (or had stored it before: a replay).
    Acknowledged { replayed: bool },
    /// The sink refused the batch for good (a 4xx other than 408/429); it goes to the DLQ.
    Refused { status: u16, reason: String },
    /// Shutdown came first; the batch stays in the outbox.
    Cancelled,
}

/// The sink client.
#[derive(Debug, Clone)]
pub struct Sink {
    client: reqwest::Client,
    url: String,
    backoff_min: Duration,
    backoff_max: Duration,
}

/// Whether a failed attempt is worth repeating.
#[derive(Debug)]
enum Attempt {
    Done(Delivery),
    Retry(String),
}

impl Sink {
    pub fn new(url: &str, timeout: Duration, backoff_min: Duration, backoff_max: Duration) -> Sink {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .pool_max_idle_per_host(16)
            .build()
            .expect("http client builds");
        Sink {
            client,
            url: url.to_owned(),
            backoff_min,
            backoff_max,
        }
    }

    async fn attempt(&self, batch: &OutboxBatch) -> Attempt {
        let start = Instant::now();
        let sent = self
            .client
            .post(&self.url)
            .header("content-type", "application/json")
            .header("idempotency-key", &batch.id)
            .body(batch.body.clone())
            .send()
            .await;
        let seconds = start.elapsed().as_secs_f64();
        match sent {
            Ok(resp) if resp.status().is_success() => {
                let replayed = resp
                    .headers()
                    .get("idempotent-replayed")
                    .is_some_and(|v| v == "true");
                crate::metrics::sink_request(if replayed { "replayed" } else { "ok" }, seconds);
                Attempt::Done(Delivery::Acknowledged { replayed })
            }
            Ok(resp) => {
                let status = resp.status().as_u16();
                let body = resp.text().await.unwrap_or_default();
                let reason: String = body.chars().take(500).collect();
                if status == 408 || status == 429 || status >= 500 {
                    crate::metrics::sink_request("retryable", seconds);
                    Attempt::Retry(format!("status {status}: {reason}"))
                } else {
                    crate::metrics::sink_request("rejected", seconds);
                    Attempt::Done(Delivery::Refused { status, reason })
                }
            }
            Err(e) => {
                crate::metrics::sink_request("retryable", seconds);
                Attempt::Retry(e.to_string())
            }
        }
    }

    /// Delivers one batch, retrying until it is acknowledged or refused, or `cancel` fires.
    pub async fn deliver(&self, batch: &OutboxBatch, cancel: &CancellationToken) -> Delivery {
        let mut failures = 0u32;
        loop {
            let outcome = tokio::select! {
                biased;
                _ = cancel.cancelled() => return Delivery::Cancelled,
                a = self.attempt(batch) => a,
            };
            match outcome {
                Attempt::Done(d) => {
                    if failures > 0 {
                        tracing::info!(batch = %batch.id, failures, "sink accepted batch after retries");
                    }
                    return d;
                }
                Attempt::Retry(why) => {
                    failures += 1;
                    crate::metrics::sink_retry();
                    let delay = backoff(self.backoff_min, self.backoff_max, failures);
                    tracing::warn!(batch = %batch.id, failures, error = %why, delay_ms = delay.as_millis() as u64, "sink request failed, retrying");
                    tokio::select! {
                        _ = cancel.cancelled() => return Delivery::Cancelled,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }
}

/// Capped exponential backoff with jitter: a random delay in [d/2, d], d = min(max, min·2^(n-1)).
pub fn backoff(min: Duration, max: Duration, failures: u32) -> Duration {
    let exp = min.saturating_mul(1u32 << failures.saturating_sub(1).min(20));
    let cap = exp.min(max).max(Duration::from_millis(1));
    let half = cap / 2;
    half + cap.saturating_sub(half).mul_f64(rand::rng().random::<f64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_then_stays_capped_with_jitter() {
        let (min, max) = (Duration::from_millis(100), Duration::from_millis(1000));
        for _ in 0..50 {
            let first = backoff(min, max, 1);
            assert!(first >= Duration::from_millis(50) && first <= min, "{first:?}");
            let third = backoff(min, max, 3);
            assert!(
                third >= Duration::from_millis(200) && third <= Duration::from_millis(400),
                "{third:?}"
            );
            let late = backoff(min, max, 30);
            assert!(late >= Duration::from_millis(500) && late <= max, "{late:?}");
        }
    }
}
