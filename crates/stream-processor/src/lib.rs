//! stream-processor: consumes the topic, deduplicates and orders events per device, and
//! delivers them to the sink exactly once (state store + outbox + idempotency keys + offsets
//! committed by hand).

mod admin;
pub mod config;
pub mod dlq;
pub mod failpoint;
mod metrics;
pub mod pipeline;
pub mod sink;
pub mod startup;
pub mod store;

pub use config::Settings;
pub use startup::Application;
