//! Event model, validation and the stream cleanup logic, as pure synchronous code.

pub mod batch;
pub mod cleanup;
pub mod event;

pub use batch::{balanced_chunks, Batcher};
pub use cleanup::{
    Changes, Cleaner, CleanupConfig, DeviceMark, Forgotten, FormerFloor, Late, Outcome, Released, SeenKey,
};
pub use event::{parse_batch, Event, EventKey, ParseError, StoredEvent, ValidationError};
