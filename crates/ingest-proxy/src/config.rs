//! Settings for ingest-proxy: every environment variable, its default and meaning, in one place.

use clap::Parser;

/// ingest-proxy: accepts telemetry events over HTTP and publishes them to a Kafka topic.
#[derive(Debug, Clone, Parser)]
#[command(name = "ingest-proxy", version, about)]
pub struct Settings {
    /// TCP port to listen on.
    #[arg(long, env = "PORT", default_value_t = 4000)]
    pub port: u16,
    /// Address to bind.
    #[arg(long, env = "BIND_ADDR", default_value = "0.0.0.0")]
    pub bind_addr: String,
    #[command(flatten)]
    pub kafka: service_common::settings::KafkaArgs,
    /// Most events waiting for a broker acknowledgement at once; past it, 503.
    #[arg(long, env = "MAX_IN_FLIGHT", default_value_t = 20_000)]
    pub max_in_flight: usize,
    /// Longest wait for the broker to acknowledge an event, in milliseconds; past it, 503.
    #[arg(long, env = "PRODUCE_TIMEOUT_MS", default_value_t = 5_000)]
    pub produce_timeout_ms: u64,
    /// Producer linger (`linger.ms`): how long the producer waits to fill a batch.
    #[arg(long, env = "PRODUCER_LINGER_MS", default_value_t = 5)]
    pub producer_linger_ms: u64,
    /// Producer batch size in messages (`batch.num.messages`).
    #[arg(long, env = "PRODUCER_BATCH_MESSAGES", default_value_t = 10_000)]
    pub producer_batch_messages: u32,
    /// `Retry-After` seconds sent with a 503.
    #[arg(long, env = "RETRY_AFTER_SECS", default_value_t = 1)]
    pub retry_after_secs: u64,
    /// Largest accepted request body in bytes (larger answers 413).
    #[arg(long, env = "MAX_BODY_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Most events in one `POST /events/batch` (more answers 413).
    #[arg(long, env = "MAX_BATCH_LEN", default_value_t = 10_000)]
    pub max_batch_len: usize,
    /// Longest wait for a request body to arrive, in milliseconds (then 408).
    #[arg(long, env = "BODY_TIMEOUT_MS", default_value_t = 5_000)]
    pub body_timeout_ms: u64,
    /// Longest a request may take, body included, in milliseconds (then 408).
    #[arg(long, env = "REQUEST_TIMEOUT_MS", default_value_t = 15_000)]
    pub request_timeout_ms: u64,
    /// When set, `POST` requests must carry `Authorization: Bearer <token>` (else 401).
    /// Unset means open, as the exercise has it.
    #[arg(long, env = "INGEST_TOKEN", hide_env_values = true)]
    pub ingest_token: Option<String>,
    /// How often `/readyz` re-checks the broker, in milliseconds.
    #[arg(long, env = "READY_CHECK_INTERVAL_MS", default_value_t = 1_000)]
    pub ready_check_interval_ms: u64,
}

impl Settings {
    pub fn body_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.body_timeout_ms)
    }

    /// Defaults for a given broker and topic on 127.0.0.1 port 0, for tests.
    pub fn for_tests(brokers: &str, topic: &str) -> Self {
        let mut s: Settings = service_common::settings::defaults();
        s.kafka.brokers = brokers.to_owned();
        s.kafka.topic = topic.to_owned();
        s.port = 0;
        s.bind_addr = "127.0.0.1".into();
        s.kafka.partitions = 3;
        s
    }
}
