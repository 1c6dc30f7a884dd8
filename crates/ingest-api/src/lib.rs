//! ingest-api: the pipeline's sink, an HTTP API over SQLite with idempotent batches.

pub mod config;
mod metrics;
pub mod routes;
pub mod startup;
pub mod store;

pub use config::Settings;
pub use startup::Application;
