//! The idempotent producer behind the proxy, with a bound on events awaiting acknowledgement:
//! an event counts as accepted only once the broker has acknowledged it (acks=all).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::healing::HealingProducer;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use service_common::kafka::{Connection, KafkaConfig};
use std::sync::atomic::{AtomicUsize, Ordering};
use telemetry_core::Event;

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
    conn: Connection,
    topic: String,
    /// Events handed to the producer and not yet acknowledged (a counter, not a semaphore:
    /// nothing waits for room, a request that finds none is answered 503 at once).
    in_flight: AtomicUsize,
    max_in_flight: usize,
}

/// Room for some events within the in-flight bound, given back when dropped.
struct Reserved<'a> {
    in_flight: &'a AtomicUsize,
    n: usize,
}

impl<'a> Reserved<'a> {
    /// Reserves room for `n` events, or none when the bound leaves less.
    fn take(in_flight: &'a AtomicUsize, n: usize, max: usize) -> Option<Reserved<'a>> {
        in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |now| {
                now.checked_add(n).filter(|after| *after <= max)
            })
            .ok()
            .map(|_| Reserved { in_flight, n })
    }
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        self.in_flight.fetch_sub(self.n, Ordering::AcqRel);
    }
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("topic", &self.topic)
            .field("max_in_flight", &self.max_in_flight)
            .finish()
    }
}

/// The proxy's producer: idempotent, acks=all, murmur2 on the key (per-device order, and an
/// accepted event is durable before it is answered).
pub fn producer_config(settings: &Settings, conn: &Connection) -> KafkaConfig {
    let mut c = service_common::kafka::idempotent_producer(conn);
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
    /// The producer for `settings`; an error names the setting or the client problem.
    pub fn new(settings: &Settings) -> Result<Publisher, KafkaError> {
        let conn = settings.kafka.connection().map_err(KafkaError::ClientCreation)?;
        Ok(Publisher {
            producer: HealingProducer::new(producer_config(settings, &conn))?,
            conn,
            topic: settings.kafka.topic.clone(),
            in_flight: AtomicUsize::new(0),
            max_in_flight: settings.max_in_flight,
        })
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// How the producer connects (for the admin client that creates the topic).
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Events awaiting acknowledgement now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Publishes one event and waits for the broker (the single-event request, the common one:
    /// no vectors, no join).
    pub async fn publish_one(&self, event: &Event) -> Result<Ack, PublishError> {
        let Some(reserved) = Reserved::take(&self.in_flight, 1, self.max_in_flight) else {
            return Err(PublishError::Busy);
        };
        let start = Instant::now();
        // Held until the answer: a producer replaced meanwhile must live on, so that what it
        // already sent gets its real outcome (dropping it would purge those messages).
        let producer = self.current();
        let result = acknowledgement(self.send(&producer, event)).await;
        self.finish(&producer, result.is_err(), start);
        drop(reserved);
        result
    }

    /// Publishes the events in order (keyed by deviceId) and waits for the broker. The result
    /// has one entry per event. When the in-flight bound has no room for all of them, none is
    /// sent and every entry is `Busy`.
    pub async fn publish(&self, events: &[Event]) -> Vec<Result<Ack, PublishError>> {
        if events.is_empty() {
            return Vec::new();
        }
        let Some(reserved) = Reserved::take(&self.in_flight, events.len(), self.max_in_flight) else {
            return vec![Err(PublishError::Busy); events.len()];
        };
        let start = Instant::now();
        let producer = self.current(); // held until the answers, as in `publish_one`
        let mut pending = Vec::with_capacity(events.len());
        for event in events {
            let delivery = self.send(&producer, event);
            let refused = delivery.is_none();
            pending.push(delivery);
            if refused {
                // Later events of the same device must not overtake this one.
                pending.resize_with(events.len(), || None);
                break;
            }
        }
        // librdkafka fails each message at message.timeout.ms (PRODUCE_TIMEOUT_MS); a request
        // timer bounds the request besides only where REQUEST_TIMEOUT_MS could end it sooner
        // (`Settings::ingest_ends_in_time`). No timer of its own here.
        let results = futures::future::join_all(pending.into_iter().map(acknowledgement)).await;
        self.finish(&producer, results.iter().any(Result::is_err), start);
        drop(reserved);
        results
    }

    /// Hands one event to `producer` (`None`: its queue refused it).
    fn send(&self, producer: &FutureProducer, event: &Event) -> Option<DeliveryFuture> {
        let payload = serde_json::to_vec(event).expect("an event always serializes");
        let record = FutureRecord::to(&self.topic)
            .key(event.device_id.as_bytes())
            .payload(&payload);
        match producer.send_result(record) {
            Ok(delivery) => Some(delivery),
            Err((err, _)) => {
                tracing::warn!(error = %err, "producer queue refused an event");
                None
            }
        }
    }

    /// After a request's acknowledgements: replaces `producer` if a failure was fatal to it
    /// (unless that was done already), and records how long the broker took.
    fn finish(&self, producer: &Arc<FutureProducer>, failed: bool, start: Instant) {
        if failed {
            self.producer.replace_if_fatal(producer);
        }
        crate::metrics::produce_latency(start.elapsed().as_secs_f64());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_is_reserved_within_the_bound_and_given_back() {
        let in_flight = AtomicUsize::new(0);
        let three = Reserved::take(&in_flight, 3, 4).expect("3 of 4 fit");
        assert!(Reserved::take(&in_flight, 2, 4).is_none(), "all or nothing");
        assert_eq!(in_flight.load(Ordering::Acquire), 3, "a refusal reserves nothing");
        let one = Reserved::take(&in_flight, 1, 4).expect("the last one fits");
        assert!(Reserved::take(&in_flight, 1, 4).is_none());
        drop(three);
        assert_eq!(in_flight.load(Ordering::Acquire), 1);
        drop(one);
        assert_eq!(in_flight.load(Ordering::Acquire), 0);
        assert!(
            Reserved::take(&in_flight, 5, 4).is_none(),
            "more than the bound never fits"
        );
        assert!(Reserved::take(&in_flight, usize::MAX, usize::MAX).is_some());
    }
}
