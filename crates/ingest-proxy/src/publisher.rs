//! The idempotent producer behind the proxy, with a bound on events awaiting acknowledgement:
//! an event counts as accepted only once the broker has acknowledged it (acks=all).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::healing::HealingProducer;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use telemetry_core::Event;
use tokio::sync::Semaphore;

use crate::Settings;

/// Why an event was not accepted; every variant is worth retrying later.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PublishError {
    #[error("too many events in flight, retry later")]
    Busy,
    #[error("broker did not acknowledge the event in time")]
    Timeout,
    #[error("broker refused the event: {0}")]
    Broker(String),
}

/// Where the broker stored an accepted event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    pub partition: i32,
    pub offset: i64,
}

/// Producer, topic and in-flight bound.
pub struct Publisher {
    producer: HealingProducer,
    topic: String,
    permits: Arc<Semaphore>,
    max_in_flight: usize,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("topic", &self.topic)
            .field("max_in_flight", &self.max_in_flight)
            .finish()
    }
}

/// The producer configuration DESIGN.md asks for: idempotent, acks=all, murmur2 on the key.
pub fn producer_config(settings: &Settings) -> ClientConfig {
    let mut c = service_common::kafka::idempotent_producer(&settings.kafka.brokers);
    c.set("linger.ms", settings.producer_linger_ms.to_string())
        .set("batch.num.messages", settings.producer_batch_messages.to_string())
        .set(
            "queue.buffering.max.messages",
            (settings.max_in_flight * 2).max(1000).to_string(),
        )
        // A message the broker has not acknowledged by the deadline fails instead of waiting on.
        .set("message.timeout.ms", settings.produce_timeout_ms.to_string())
        .set(
            "request.timeout.ms",
            settings.produce_timeout_ms.clamp(1, 30_000).to_string(),
        )
        .set(
            "socket.connection.setup.timeout.ms",
            settings.produce_timeout_ms.clamp(1000, 30_000).to_string(),
        )
        .set("reconnect.backoff.max.ms", "1000");
    c
}

/// What became of one event handed to the producer (`None`: it was not handed over).
async fn acknowledgement(pending: Option<DeliveryFuture>) -> Result<Ack, PublishError> {
    let Some(delivery) = pending else {
        return Err(PublishError::Busy);
    };
    match delivery.await {
        Ok(Ok(d)) => Ok(Ack {
            partition: d.partition,
            offset: d.offset,
        }),
        Ok(Err((KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut), _))) => {
            Err(PublishError::Timeout)
        }
        Ok(Err((err, _))) => Err(PublishError::Broker(err.to_string())),
        Err(_canceled) => Err(PublishError::Broker("producer shut down".into())),
    }
}

impl Publisher {
    pub fn new(settings: &Settings) -> Result<Publisher, KafkaError> {
        Ok(Publisher {
            producer: HealingProducer::new(producer_config(settings))?,
            topic: settings.kafka.topic.clone(),
            permits: Arc::new(Semaphore::new(settings.max_in_flight)),
            max_in_flight: settings.max_in_flight,
        })
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Events awaiting acknowledgement now.
    pub fn in_flight(&self) -> usize {
        self.max_in_flight - self.permits.available_permits()
    }

    /// Publishes the events in order (keyed by deviceId) and waits for the broker. The result
    /// has one entry per event. When the in-flight bound has no room for all of them, none is
    /// sent and every entry is `Busy`.
    pub async fn publish(&self, events: &[Event]) -> Vec<Result<Ack, PublishError>> {
        if events.is_empty() {
            return Vec::new();
        }
        let Ok(permit) = Arc::clone(&self.permits).try_acquire_many_owned(events.len() as u32) else {
            return vec![Err(PublishError::Busy); events.len()];
        };
        crate::metrics::in_flight(self.in_flight());
        let start = Instant::now();
        let producer = self.current();
        let mut pending = Vec::with_capacity(events.len());
        let mut stopped = false;
        for event in events {
            if stopped {
                pending.push(None);
                continue;
            }
            let payload = serde_json::to_vec(event).expect("an event always serializes");
            let record = FutureRecord::to(&self.topic)
                .key(event.device_id.as_bytes())
                .payload(&payload);
            match producer.send_result(record) {
                Ok(delivery) => pending.push(Some(delivery)),
                Err((err, _)) => {
                    // Later events of the same device must not overtake this one.
                    tracing::warn!(error = %err, "producer queue refused an event");
                    stopped = true;
                    pending.push(None);
                }
            }
        }
        // librdkafka fails each message at message.timeout.ms (PRODUCE_TIMEOUT_MS), and the
        // request timeout bounds the whole request besides: no timer of its own here.
        let results = if pending.len() == 1 {
            // The single-event request, the common one: no join machinery.
            vec![acknowledgement(pending.pop().expect("one pending")).await]
        } else {
            futures::future::join_all(pending.into_iter().map(acknowledgement)).await
        };
        if results.iter().any(Result::is_err) {
            self.producer.replace_if_fatal(&producer);
        }
        crate::metrics::produce_latency(start.elapsed().as_secs_f64());
        drop(permit);
        crate::metrics::in_flight(self.in_flight());
        results
    }

    fn current(&self) -> Arc<FutureProducer> {
        self.producer.current()
    }

    /// Replaces the producer if librdkafka declared it dead (called by the readiness checker,
    /// so an idle proxy recovers too).
    pub fn heal(&self) {
        self.producer.heal();
    }

    /// True when the broker answers a metadata request for the topic within `timeout`.
    /// Blocking: call from a blocking thread.
    pub fn broker_reachable(&self, timeout: Duration) -> bool {
        match self
            .current()
            .client()
            .fetch_metadata(Some(&self.topic), Timeout::After(timeout))
        {
            Ok(md) => md
                .topics()
                .iter()
                .any(|t| t.name() == self.topic && t.error().is_none() && !t.partitions().is_empty()),
            Err(_) => false,
        }
    }

    /// Waits until every produced event is acknowledged or `timeout` passes.
    pub fn flush(&self, timeout: Duration) {
        if let Err(e) = self.current().flush(Timeout::After(timeout)) {
            tracing::warn!(error = %e, "producer flush did not finish; unacknowledged events were answered 503");
        }
    }
}
