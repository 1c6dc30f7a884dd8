//! Settings for stream-processor: every environment variable, its default and meaning.

use std::path::PathBuf;

use clap::Parser;
use telemetry_core::CleanupConfig;

use crate::failpoint::Step;

/// stream-processor: consumes the topic, cleans the stream and delivers batches exactly once.
#[derive(Debug, Clone, Parser)]
#[command(name = "stream-processor", version, about)]
pub struct Settings {
    #[command(flatten)]
    pub kafka: service_common::settings::KafkaArgs,
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
    /// Unset: `stream-processor-<hostname>` (distinct per container, so replicas started by
    /// `docker compose up --scale` each have their own). Empty: dynamic membership. Two live
    /// processes must never share one id (the second fences the first).
    #[arg(long, env = "GROUP_INSTANCE_ID")]
    pub group_instance_id: Option<String>,
    /// How partitions are spread over the group's members: cooperative-sticky moves only the
    /// partitions that change owner; range or roundrobin stop every partition at each change.
    #[arg(long, env = "ASSIGNMENT_STRATEGY", default_value = "range,roundrobin")]
    pub assignment_strategy: String,
    /// Consumer session timeout in milliseconds.
    #[arg(long, env = "SESSION_TIMEOUT_MS", default_value_t = 10_000)]
    pub session_timeout_ms: u64,
    /// The changelog topic holding each partition's state (one changelog partition per input
    /// partition). Default: `<GROUP_ID>-<KAFKA_TOPIC>-changelog`.
    #[arg(long, env = "CHANGELOG_TOPIC")]
    pub changelog_topic: Option<String>,
    /// A checkpoint writes a full snapshot instead of a delta once the deltas since the last
    /// snapshot outgrow it or this many bytes; the changelog before a snapshot is deleted.
    #[arg(long, env = "SNAPSHOT_MIN_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub snapshot_min_bytes: usize,
    /// Longest a partition's state restore may take before the processor gives up (ms).
    #[arg(long, env = "RESTORE_TIMEOUT_MS", default_value_t = 120_000)]
    pub restore_timeout_ms: u64,
    /// On revocation, longest wait for the batch in flight to the sink before the partition is
    /// handed over (the next owner resends it; the sink replays it) (ms).
    #[arg(long, env = "REVOKE_TIMEOUT_MS", default_value_t = 5_000)]
    pub revoke_timeout_ms: u64,
    /// Local SQLite cache of the partitions' state (resume offsets, watermarks, dedup keys,
    /// outbox), so a restart restores without reading the whole changelog. Losing it is safe.
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
    /// Processing time after a device's last event when it is forgotten, once nothing of it
    /// waits (ms): its marks and dedup identities leave memory and a small record stays (its id
    /// and the newest ts released for it). Shorter saves memory; a resend arriving after it is
    /// dead-lettered as late instead of dropped as a duplicate. Never changes what is stored.
    #[arg(long, env = "FORGET_AFTER_MS", default_value_t = 600_000)]
    pub forget_after_ms: u64,
    /// Processing time a forgotten device's record is kept (ms; default 7 days). A device silent
    /// longer than this is new again: a resend of an event it sent before then is stored again.
    #[arg(long, env = "FORGOTTEN_RETENTION_MS", default_value_t = 604_800_000)]
    pub forgotten_retention_ms: u64,
    /// Most events per batch sent to the sink (keep it at or below the sink's MAX_BATCH_LEN).
    #[arg(long, env = "BATCH_SIZE", default_value_t = 1_000)]
    pub batch_size: usize,
    /// Longest a released event waits for its batch to fill (ms).
    #[arg(long, env = "BATCH_LINGER_MS", default_value_t = 200)]
    pub batch_linger_ms: u64,
    /// Dead-letter topic for late and invalid events (never batches: a refused batch is kept).
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
    /// Test switch, off by default: abort the process at this protocol step.
    #[arg(long, env = "FAILPOINT", value_enum)]
    pub failpoint: Option<Step>,
    /// With FAILPOINT: abort on this hit of the step (1 = the first time).
    #[arg(long, env = "FAILPOINT_HIT", default_value_t = 1)]
    pub failpoint_hit: u64,
}

impl Settings {
    /// The static membership id, if any (see `group_instance_id`).
    pub fn instance_id(&self) -> Option<String> {
        match self.group_instance_id.as_deref() {
            Some("") => None,
            Some(id) => Some(id.to_owned()),
            None => {
                let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .ok()
                    .or_else(|| std::env::var("HOSTNAME").ok())
                    .map(|h| h.trim().to_owned())
                    .filter(|h| !h.is_empty())
                    .unwrap_or_else(|| "local".to_owned());
                Some(format!("stream-processor-{host}"))
            }
        }
    }

    pub fn changelog(&self) -> String {
        self.changelog_topic
            .clone()
            .unwrap_or_else(|| format!("{}-{}-changelog", self.group_id, self.kafka.topic))
    }

    /// Rejects values the processor cannot run with, naming the variable.
    pub fn validate(&self) -> Result<(), String> {
        if self.batch_size == 0 {
            return Err("BATCH_SIZE must be at least 1".into());
        }
        if self.allowed_lateness_ms < 0 {
            return Err("ALLOWED_LATENESS_MS must be >= 0".into());
        }
        if self.dedup_horizon_ms < self.allowed_lateness_ms {
            return Err("DEDUP_HORIZON_MS must be >= ALLOWED_LATENESS_MS".into());
        }
        if self.forgotten_retention_ms < self.forget_after_ms {
            return Err("FORGOTTEN_RETENTION_MS must be >= FORGET_AFTER_MS".into());
        }
        self.kafka.validate()?;
        if self.max_outbox_per_partition == 0 {
            return Err("MAX_OUTBOX_PER_PARTITION must be at least 1".into());
        }
        Ok(())
    }

    pub fn cleanup(&self) -> CleanupConfig {
        CleanupConfig {
            allowed_lateness_ms: self.allowed_lateness_ms,
            dedup_horizon_ms: self.dedup_horizon_ms,
            idle_timeout_ms: self
                .idle_timeout_ms
                .unwrap_or(self.allowed_lateness_ms.max(0) as u64),
            forget_after_ms: self.forget_after_ms,
            forgotten_retention_ms: self.forgotten_retention_ms,
        }
    }
}
