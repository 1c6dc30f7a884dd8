//! Settings: the exercise's variables with its defaults, and the extras.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// load-generator: sends bursts of single-event POSTs with duplicates and out-of-order
/// timestamps; `verify` checks what the API stored against a manifest.
#[derive(Debug, Clone, Parser)]
#[command(name = "load-generator", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub load: Settings,
}

#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Compare a manifest with what ingest-api holds: missing, duplicated, out of order.
    Verify(VerifySettings),
}

/// The load run.
#[derive(Debug, Clone, Args)]
pub struct Settings {
    /// URL to send events to (the proxy's /event, or ingest-api's).
    #[arg(long, env = "INGEST_URL", default_value = "http://localhost:3000/event")]
    pub ingest_url: String,
    /// Number of devices to simulate.
    #[arg(long, env = "DEVICES", default_value_t = 5)]
    pub devices: usize,
    /// Number of bursts to send.
    #[arg(long, env = "BURSTS", default_value_t = 10)]
    pub bursts: usize,
    /// Number of events per burst (duplicates included).
    #[arg(long, env = "BURST_SIZE", default_value_t = 100)]
    pub burst_size: usize,
    /// Interval between burst starts in milliseconds.
    #[arg(long, env = "BURST_INTERVAL_MS", default_value_t = 1000)]
    pub burst_interval_ms: u64,
    /// Share of events that are exact resends of an event already sent.
    #[arg(long, env = "DUPLICATE_RATE", default_value_t = 0.05)]
    pub duplicate_rate: f64,
    /// Share of events whose ts is moved back.
    #[arg(long, env = "OUT_OF_ORDER_RATE", default_value_t = 0.1)]
    pub out_of_order_rate: f64,
    /// Largest move back of an out-of-order event, in milliseconds.
    #[arg(long, env = "MAX_OUT_OF_ORDER_MS", default_value_t = 5000)]
    pub max_out_of_order_ms: i64,
    /// Latitude the devices move around.
    #[arg(long, env = "BASE_LAT", default_value_t = 37.7749)]
    pub base_lat: f64,
    /// Longitude the devices move around.
    #[arg(long, env = "BASE_LON", default_value_t = -122.4194)]
    pub base_lon: f64,
    /// Most requests in flight at once (each device still sends its events one after another).
    #[arg(long, env = "CONCURRENCY", default_value_t = 64)]
    pub concurrency: usize,
    /// Seed for a reproducible run (device paths, which events are duplicates or moved back).
    #[arg(long, env = "SEED")]
    pub seed: Option<u64>,
    /// Prefix of device ids (`<prefix>-<n>`); defaults to `device`.
    #[arg(long, env = "DEVICE_PREFIX", default_value = "device")]
    pub device_prefix: String,
    /// Write every acknowledged event (and every unanswered one, marked) to this JSONL file.
    #[arg(long, env = "MANIFEST")]
    pub manifest: Option<PathBuf>,
    /// Attempts per event after the first, on 503/429/5xx or a transport error.
    #[arg(long, env = "MAX_RETRIES", default_value_t = 8)]
    pub max_retries: u32,
    /// Timeout of one request in milliseconds.
    #[arg(long, env = "REQUEST_TIMEOUT_MS", default_value_t = 10_000)]
    pub request_timeout_ms: u64,
    /// Bearer token sent as `Authorization` (for a proxy started with INGEST_TOKEN).
    #[arg(long, env = "INGEST_TOKEN")]
    pub ingest_token: Option<String>,
}

/// `verify`.
#[derive(Debug, Clone, Args)]
pub struct VerifySettings {
    /// Manifest written by a load run.
    #[arg(long)]
    pub manifest: PathBuf,
    /// ingest-api base URL (its /events is paged through).
    #[arg(long, default_value = "http://localhost:3000")]
    pub api: String,
    /// Keep polling up to this many seconds until the API holds every expected event.
    #[arg(long, default_value_t = 0)]
    pub wait_secs: u64,
    /// Only count stored events whose deviceId starts with this prefix (others are ignored).
    #[arg(long)]
    pub device_prefix: Option<String>,
    /// Kafka brokers: when set, the dead-letter topic is read (read_committed) and every
    /// acknowledged event is accounted for as stored, dropped as a duplicate, or dead-lettered
    /// with its reason; without it, a dead-lettered event counts as missing.
    #[arg(long, env = "KAFKA_BROKERS")]
    pub brokers: Option<String>,
    /// The processor's dead-letter topic.
    #[arg(long, env = "DLQ_TOPIC", default_value = "telemetry-events-dlq")]
    pub dlq_topic: String,
}
