//! Event model, validation and the stream cleanup logic, as pure synchronous code.

pub mod event;

pub use event::{parse_batch, Event, EventKey, ParseError, ValidationError};
