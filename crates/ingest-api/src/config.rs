//! Settings for ingest-api: every environment variable, its default and meaning, in one place
//! (those it shares with ingest-proxy are declared once in `HttpArgs`; their defaults that differ
//! between the two are given here).

use std::path::PathBuf;

use clap::Parser;
use service_common::settings::{HttpArgs, HttpDefaults};

use crate::store::Synchronous;

/// ingest-api's defaults of the `HttpArgs` that differ between the services (kept as each
/// shipped them).
pub const HTTP_DEFAULTS: HttpDefaults = HttpDefaults {
    port: 3000,
    max_body_bytes: 16 * 1024 * 1024,
    request_timeout_ms: 10_000,
};

/// ingest-api: HTTP API that stores telemetry events in SQLite.
#[derive(Debug, Clone, Parser)]
#[command(name = "ingest-api", version, about, mut_args = |arg| HTTP_DEFAULTS.apply(arg))]
pub struct Settings {
    #[command(flatten)]
    pub http: HttpArgs,
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
    /// Default page size of `GET /events`.
    #[arg(long, env = "DEFAULT_PAGE_SIZE", default_value_t = 100)]
    pub default_page_size: u64,
    /// Largest page size of `GET /events` (larger answers 400).
    #[arg(long, env = "MAX_PAGE_SIZE", default_value_t = 1000)]
    pub max_page_size: u64,
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
    /// Defaults with a given database path and port 0, for tests and benchmarks.
    pub fn for_tests(database_path: PathBuf) -> Self {
        let mut s: Settings = service_common::settings::defaults();
        s.database_path = database_path;
        s.http.port = 0;
        s.http.bind_addr = "127.0.0.1".into();
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_http_defaults_are_ingest_apis_own() {
        let s: Settings = service_common::settings::defaults();
        assert_eq!(s.http.port, 3000);
        assert_eq!(s.http.bind_addr, "0.0.0.0");
        assert_eq!(s.http.max_body_bytes, 16 * 1024 * 1024);
        assert_eq!(s.http.max_batch_len, 10_000);
        assert_eq!(s.http.body_timeout_ms, 5_000);
        assert_eq!(s.http.request_timeout_ms, 10_000);
    }
}
