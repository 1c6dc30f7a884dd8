//! ingest-proxy: HTTP ingress that publishes validated events to Kafka with an idempotent
//! producer, answering only once the broker has them.

pub mod config;
pub mod healing;
mod metrics;
pub mod publisher;
pub mod routes;
pub mod startup;

pub use config::Settings;
pub use startup::Application;
