//! Delivery of outbox batches to the sink (ingest-api `/events/batch`) with the batch id as
//! `Idempotency-Key`, until acknowledged or cancelled. 5xx, 408, 429, timeouts and connection
//! errors are retried with capped exponential backoff and jitter. Any other answer means the
//! sink and this processor disagree (wrong URL, auth, version skew, a batch over the sink's
//! limit, a reused key): the batch is never dropped or dead-lettered; the partition is marked
//! blocked (metric, `/readyz` 503, one log line per change of answer) and the batch is retried
//! at the longest backoff until the sink takes it. The exception is ingest-api's 413
//! `batch_too_large` for a batch of more than one event: the delivery ends with `TooLarge` and
//! the partition splits the batch. ingest-api answers a stored batch's key as a replay before it
//! checks that limit, so this 413 proves the batch was never stored. Its other 413
//! (`body_too_large`, checked before the key can be looked up) proves nothing and blocks.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use tokio_util::sync::CancellationToken;

use crate::changelog::OutboxBatch;

/// How a delivery ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// The sink stored the batch (or had stored it before: a replay).
    Acknowledged { replayed: bool },
    /// The sink answered 413 (too many events or bytes) to a batch of more than one event: the
    /// partition splits it (a checkpoint) before anything more is sent.
    TooLarge { answer: String },
    /// Shutdown or revocation came first; the batch stays in the outbox.
    Cancelled,
}

/// Partitions stopped for a reason an operator must fix, with the reason (for `/readyz`): the
/// sink refusing their batches, or a topic log that ends before their committed position.
#[derive(Debug, Clone, Default)]
pub struct Blocked(Arc<Mutex<BTreeMap<i32, String>>>);

impl Blocked {
    /// The sink refuses the partition's batch (`Some(answer)`), or takes it again (`None`).
    fn sink_refuses(&self, partition: i32, answer: Option<String>) {
        crate::metrics::sink_blocked(partition, answer.is_some());
        self.set(partition, answer);
    }

    /// Marks a partition as stopped for another reason than the sink (its own metric says which).
    pub fn block(&self, partition: i32, reason: String) {
        self.set(partition, Some(reason));
    }

    /// Forgets a partition this process no longer owns.
    pub fn clear(&self, partition: i32) {
        crate::metrics::sink_blocked(partition, false);
        self.set(partition, None);
    }

    fn set(&self, partition: i32, reason: Option<String>) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match reason {
            Some(r) => map.insert(partition, r),
            None => map.remove(&partition),
        };
    }

    /// The stopped partitions and the reason for each.
    pub fn snapshot(&self) -> BTreeMap<i32, String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The sink client.
#[derive(Debug, Clone)]
pub struct Sink {
    client: reqwest::Client,
    url: String,
    backoff_min: Duration,
    backoff_max: Duration,
    blocked: Blocked,
}

/// What one attempt gave.
#[derive(Debug)]
enum Attempt {
    Done(Delivery),
    Retry(String),
    /// An answer that retrying soon will not change.
    Blocked(String),
}

impl Sink {
    pub fn new(
        url: &str,
        timeout: Duration,
        backoff_min: Duration,
        backoff_max: Duration,
        blocked: Blocked,
    ) -> Sink {
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
            blocked,
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
                let reason: String = body.chars().take(300).collect();
                if status == 413 && batch.events > 1 && body.contains("\"batch_too_large\"") {
                    crate::metrics::sink_request("too_large", seconds);
                    Attempt::Done(Delivery::TooLarge {
                        answer: format!("status {status}: {reason}"),
                    })
                } else if status == 408 || status == 429 || status >= 500 {
                    crate::metrics::sink_request("retryable", seconds);
                    Attempt::Retry(format!("status {status}: {reason}"))
                } else {
                    crate::metrics::sink_request("rejected", seconds);
                    Attempt::Blocked(format!("status {status}: {reason}"))
                }
            }
            Err(e) => {
                crate::metrics::sink_request("retryable", seconds);
                Attempt::Retry(e.to_string())
            }
        }
    }

    /// Delivers one batch, retrying until it is acknowledged or `cancel` fires.
    pub async fn deliver(&self, batch: &OutboxBatch, cancel: &CancellationToken) -> Delivery {
        let mut failures = 0u32;
        let mut blocked_by: Option<String> = None;
        loop {
            let outcome = tokio::select! {
                biased;
                _ = cancel.cancelled() => return Delivery::Cancelled,
                a = self.attempt(batch) => a,
            };
            let delay = match outcome {
                Attempt::Done(d) => {
                    if blocked_by.is_some() {
                        self.blocked.sink_refuses(batch.partition, None);
                        tracing::info!(partition = batch.partition, batch = %batch.id, "sink accepts batches again; partition unblocked");
                    } else if failures > 0 {
                        tracing::info!(batch = %batch.id, failures, "sink accepted batch after retries");
                    }
                    return d;
                }
                Attempt::Retry(why) => {
                    failures += 1;
                    crate::metrics::sink_retry();
                    let delay = backoff(self.backoff_min, self.backoff_max, failures);
                    tracing::warn!(batch = %batch.id, failures, error = %why, delay_ms = delay.as_millis() as u64, "sink request failed, retrying");
                    delay
                }
                Attempt::Blocked(answer) => {
                    failures += 1;
                    crate::metrics::sink_retry();
                    if blocked_by.as_deref() != Some(answer.as_str()) {
                        let reused = answer.contains("idempotency_key_reused");
                        tracing::error!(
                            partition = batch.partition,
                            batch = %batch.id,
                            events = batch.events,
                            answer = %answer,
                            hint = if reused {
                                "the sink already stored another batch under this id: the changelog and the sink disagree (changelog lost, or two pipelines on one sink)"
                            } else {
                                "check INGEST_URL, the sink's auth and version, and BATCH_SIZE against the sink's MAX_BATCH_LEN and MAX_BODY_BYTES"
                            },
                            "sink refuses the batch; delivery of this partition is blocked (nothing is dropped, retrying)"
                        );
                        self.blocked.sink_refuses(batch.partition, Some(answer.clone()));
                        blocked_by = Some(answer);
                    }
                    backoff(self.backoff_max, self.backoff_max, 1)
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => return Delivery::Cancelled,
                _ = tokio::time::sleep(delay) => {}
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
