//! HTTP plumbing shared by the pipeline's services, so they answer bad input the same way:
//! JSON error bodies, bounded body reading, request metrics, tracing and shutdown.

pub mod body;
pub mod error;
pub mod handlers;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod observe;
pub mod settings;

pub use body::{read_body, require_json, BodyKind};
pub use error::ApiError;
pub use observe::{init_tracing, metrics_handle, shutdown_signal, track_requests, RequestMetrics};
