//! What the pipeline's services share, one module per seam: HTTP (`body`, `error`,
//! `handlers`: they answer bad input the same way), Kafka (`kafka`: client roles and topic
//! creation, behind the `kafka` feature), observability (`logging`, `metrics`), `settings` and
//! `shutdown`.

pub mod body;
pub mod error;
pub mod handlers;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod logging;
pub mod metrics;
pub mod settings;
pub mod shutdown;

pub use body::{read_body, require_json, BodyKind};
pub use error::ApiError;
pub use logging::init_tracing;
pub use metrics::{metrics_handle, RequestMetrics, TrackRequests};
pub use shutdown::shutdown_signal;
