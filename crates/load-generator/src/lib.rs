//! load-generator: the bursty client of the exercise, and a verifier of what was stored.

pub mod config;
pub mod dlq;
pub mod events;
pub mod plan;
pub mod run;
pub mod verify;
