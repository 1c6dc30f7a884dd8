//! Settings for stream-processor: every environment variable, its default and meaning.

use std::path::PathBuf;

use clap::Parser;
use telemetry_core::CleanupConfig;

/// stream-processor: consumes the topic, cleans the stream and delivers batches exactly once.
#[derive(Debug, Clone, Parser)]
#[command(name = "stream-processor", version, about)]
pub struct Settings {
    /// Kafka bootstrap servers, comma separated.
    #[arg(long, env = "KAFKA_BROKERS", default_value = "redpanda:9092")]
    pub kafka_brokers: String,
    /// Topic to consume.
    #[arg(long, env = "KAFKA_TOPIC", default_value = "telemetry-events")]
    pub kafka_topic: String,
    /// The sink: ingest-api's batch endpoint.
    #[arg(
        long,
        env = "INGEST_URL",
        default_value = "http://ingest-api:3000/events/batch"
    )]
    pub ingest_url: String,
    /// Consumer group id.
    #[arg(long, env = "GROUP_ID", default_value = "stream-processor")]
    pub group_id: String,
    /// Static group membership id, stable across restarts, so a restarted processor gets its
    /// partitions back at once instead of waiting for its dead predecessor to be evicted.
    #[arg(long, env = "GROUP_INSTANCE_ID", default_value = "stream-processor-1")]
    pub group_instance_id: String,
    /// Consumer session timeout in milliseconds.
    #[arg(long, env = "SESSION_TIMEOUT_MS", default_value_t = 10_000)]
    pub session_timeout_ms: u64,
    /// Partitions of the topic (and of the dead-letter topic) when the processor creates them.
    #[arg(long, env = "TOPIC_PARTITIONS", default_value_t = 6)]
    pub topic_partitions: i32,
    /// SQLite state store file (resume offsets, watermarks, dedup keys, outbox).
    #[arg(long, env = "STATE_PATH", default_value = "data/processor-state.db")]
    pub state_path: PathBuf,
    /// How far behind a device's highest ts an event may arrive and still be in time (ms).
    #[arg(long, env = "ALLOWED_LATENESS_MS", default_value_t = 5_000)]
    pub allowed_lateness_ms: i64,
    /// How long released identities are kept for deduplication, in event time behind the
    /// device's highest ts (ms).
    #[arg(long, env = "DEDUP_HORIZON_MS", default_value_t = 600_000)]
    pub dedup_horizon_ms: i64,
    /// Processing time after a device's last event when its reorder buffer is released (ms).
    /// Defaults to ALLOWED_LATENESS_MS.
    #[arg(long, env = "IDLE_TIMEOUT_MS")]
    pub idle_timeout_ms: Option<u64>,
    /// Events per batch sent to the sink. A release burst that tips a batch just past this
    /// joins it rather than going alone, so a batch holds at most 1.5 times this.
    #[arg(long, env = "BATCH_SIZE", default_value_t = 1_000)]
    pub batch_size: usize,
    /// Longest a released event waits for its batch to fill (ms).
    #[arg(long, env = "BATCH_LINGER_MS", default_value_t = 200)]
    pub batch_linger_ms: u64,
    /// Dead-letter topic for late and invalid events and batches the sink refused.
    #[arg(long, env = "DLQ_TOPIC", default_value = "telemetry-events-dlq")]
    pub dlq_topic: String,
    /// First retry delay after a failed sink request (ms).
    #[arg(long, env = "RETRY_BACKOFF_MIN_MS", default_value_t = 100)]
    pub retry_backoff_min_ms: u64,
    /// Longest retry delay (ms).
    #[arg(long, env = "RETRY_BACKOFF_MAX_MS", default_value_t = 5_000)]
    pub retry_backoff_max_ms: u64,
    /// Timeout of one sink request (ms).
    #[arg(long, env = "SINK_TIMEOUT_MS", default_value_t = 10_000)]
    pub sink_timeout_ms: u64,
    /// Outbox batches per partition awaiting the sink before that partition's consumption pauses.
    /// Pausing drops what librdkafka prefetched for the partition, so it is a last resort.
    #[arg(long, env = "MAX_OUTBOX_PER_PARTITION", default_value_t = 128)]
    pub max_outbox_per_partition: usize,
    /// Longest a state-only checkpoint (offsets, watermarks) may be put off (ms).
    #[arg(long, env = "CHECKPOINT_INTERVAL_MS", default_value_t = 1_000)]
    pub checkpoint_interval_ms: u64,
    /// On SIGTERM, longest wait for the outbox to reach the sink (ms); what is left is resent
    /// on the next start.
    #[arg(long, env = "SHUTDOWN_TIMEOUT_MS", default_value_t = 20_000)]
    pub shutdown_timeout_ms: u64,
    /// Admin port: /metrics, /healthz, /readyz.
    #[arg(long, env = "ADMIN_PORT", default_value_t = 9000)]
    pub admin_port: u16,
    /// Address the admin port binds.
    #[arg(long, env = "ADMIN_BIND_ADDR", default_value = "0.0.0.0")]
    pub admin_bind_addr: String,
    /// Test switch, off by default: abort the process at this protocol step
    /// (after_consume_before_checkpoint, after_checkpoint_before_post,
    /// after_post_before_outbox_clear, after_outbox_clear_before_commit).
    #[arg(long, env = "FAILPOINT")]
    pub failpoint: Option<String>,
    /// With FAILPOINT: abort on this hit of the step (1 = the first time).
    #[arg(long, env = "FAILPOINT_HIT", default_value_t = 1)]
    pub failpoint_hit: u64,
}

impl Settings {
    /// Reads the environment only; a bad value exits with one line naming the variable.
    pub fn from_env() -> Self {
        Settings::parse_from(std::iter::once("stream-processor"))
    }

    pub fn cleanup(&self) -> CleanupConfig {
        CleanupConfig {
            allowed_lateness_ms: self.allowed_lateness_ms,
            dedup_horizon_ms: self.dedup_horizon_ms,
            idle_timeout_ms: self
                .idle_timeout_ms
                .unwrap_or(self.allowed_lateness_ms.max(0) as u64),
        }
    }
}
