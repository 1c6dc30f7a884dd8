//! The proxy's producer handle that survives librdkafka's fatal errors.

use rdkafka::error::KafkaError;
use service_common::kafka::KafkaConfig;

/// A producer that is replaced as a whole when librdkafka declares it dead (a fatal error: an
/// idempotent producer whose sequence numbers the broker no longer accepts, for example after
/// the broker lost its producer state in a restart). Unacknowledged messages of the dead one
/// fail; senders retry them on the new one.
pub struct HealingProducer {
    producer: std::sync::RwLock<std::sync::Arc<rdkafka::producer::FutureProducer>>,
    config: KafkaConfig,
}

impl std::fmt::Debug for HealingProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HealingProducer")
    }
}

impl HealingProducer {
    pub fn new(config: KafkaConfig) -> Result<Self, KafkaError> {
        let producer = config.create()?;
        Ok(HealingProducer {
            producer: std::sync::RwLock::new(std::sync::Arc::new(producer)),
            config,
        })
    }

    /// The producer to use now.
    pub fn current(&self) -> std::sync::Arc<rdkafka::producer::FutureProducer> {
        std::sync::Arc::clone(&self.producer.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Replaces `failed` with a new producer if librdkafka declared it dead.
    pub fn replace_if_fatal(&self, failed: &std::sync::Arc<rdkafka::producer::FutureProducer>) {
        use rdkafka::producer::Producer;
        let Some((code, reason)) = failed.client().fatal_error() else {
            return;
        };
        let mut slot = self.producer.write().unwrap_or_else(|p| p.into_inner());
        if !std::sync::Arc::ptr_eq(&slot, failed) {
            return; // replaced already
        }
        match self.config.create::<rdkafka::producer::FutureProducer>() {
            Ok(fresh) => {
                tracing::warn!(code = ?code, reason = %reason, "producer hit a fatal error; replaced it with a new one");
                *slot = std::sync::Arc::new(fresh);
            }
            Err(e) => {
                tracing::error!(error = %e, "producer hit a fatal error and a new one could not be created")
            }
        }
    }

    /// Replaces the current producer if it is dead.
    pub fn heal(&self) {
        let current = self.current();
        self.replace_if_fatal(&current);
    }
}
