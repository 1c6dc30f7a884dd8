//! stream-processor: consumes the topic, deduplicates and orders events per device, and
//! delivers them to the sink exactly once, whichever processor of the group owns a partition
//! (per-partition state machine, changelog on the broker written in Kafka transactions,
//! local SQLite cache, idempotency keys).

pub mod admin;
pub mod changelog;
pub mod config;
pub mod consumer;
pub mod failpoint;
mod metrics;
pub mod partition;
pub mod pipeline;
#[cfg(test)]
mod replay_tests;
pub mod restore;
pub mod sink;
pub mod startup;
pub mod store;
pub mod txn;

pub use config::Settings;
pub use startup::Application;
