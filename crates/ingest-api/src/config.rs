//! Settings for ingest-api: every environment variable, its default and meaning, in one place.

use std::path::PathBuf;

use clap::Parser;

use crate::store::Synchronous;

/// ingest-api: HTTP API that stores telemetry events in SQLite.
#[derive(Debug, Clone, Parser)]
#[command(name = "ingest-api", version, about)]
pub struct Settings {
    /// TCP port to listen on.
    #[arg(long, env = "PORT", default_value_t = 3000)]
    pub port: u16,
    /// Address to bind.
    #[arg(long, env = "BIND_ADDR", default_value = "0.0.0.0")]
    pub bind_addr: String,
    /// SQLite database file; its directory is created when missing.
    #[arg(long, env = "DATABASE_PATH", default_value = "data/ingest.db")]
    pub database_path: PathBuf,
    /// SQLite `synchronous` setting. FULL makes every acknowledged write survive power loss.
    #[arg(
        long,
        env = "SQLITE_SYNCHRONOUS",
        value_enum,
        default_value = "full",
        ignore_case = true
    )]
    pub sqlite_synchronous: Synchronous,
    /// Largest accepted request body in bytes (larger answers 413).
    #[arg(long, env = "MAX_BODY_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Most events in one `POST /events/batch` (more answers 413).
    #[arg(long, env = "MAX_BATCH_LEN", default_value_t = 10_000)]
    pub max_batch_len: usize,
    /// Default page size of `GET /events`.
    #[arg(long, env = "DEFAULT_PAGE_SIZE", default_value_t = 100)]
    pub default_page_size: u64,
    /// Largest page size of `GET /events` (larger answers 400).
    #[arg(long, env = "MAX_PAGE_SIZE", default_value_t = 1000)]
    pub max_page_size: u64,
    /// Longest wait for a request body to arrive, in milliseconds (then 408).
    #[arg(long, env = "BODY_TIMEOUT_MS", default_value_t = 5_000)]
    pub body_timeout_ms: u64,
    /// Longest a request may take, body included, in milliseconds (then 408).
    #[arg(long, env = "REQUEST_TIMEOUT_MS", default_value_t = 10_000)]
    pub request_timeout_ms: u64,
    /// How long an `Idempotency-Key` is remembered, in milliseconds (default 7 days). A batch
    /// resent after that is stored again, so keep it longer than any sender can take to resend
    /// (for the stream-processor: its longest outage plus a restore).
    #[arg(long, env = "IDEMPOTENCY_RETENTION_MS", default_value_t = 7 * 24 * 3_600_000)]
    pub idempotency_retention_ms: u64,
    /// How often expired idempotency keys are deleted, in milliseconds.
    #[arg(long, env = "IDEMPOTENCY_PRUNE_INTERVAL_MS", default_value_t = 60_000)]
    pub idempotency_prune_interval_ms: u64,
}

impl Settings {
    pub fn body_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.body_timeout_ms)
    }

    /// Defaults with a given database path and port 0, for tests and benchmarks.
    pub fn for_tests(database_path: PathBuf) -> Self {
        let mut s: Settings = service_common::settings::defaults();
        s.database_path = database_path;
        s.port = 0;
        s.bind_addr = "127.0.0.1".into();
        s
    }
}
