//! Settings helpers shared by the services.

use std::future::Future;
use std::time::Duration;

use axum::body::Body;
use axum::http::StatusCode;
use axum::Router;
use bytes::Bytes;
use clap::{Arg, Parser};
use tokio::net::TcpListener;
use tower_http::timeout::TimeoutLayer;

use crate::{read_body, ApiError};

/// The broker and topic settings every Kafka service shares, flattened into its `Settings`: one
/// declaration, so the proxy and the processor cannot drift apart (both create the topics, and
/// whichever starts first decides their partitions and replication).
#[derive(Debug, Clone, clap::Args)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers, comma separated.
    #[arg(
        long = "kafka-brokers",
        env = "KAFKA_BROKERS",
        default_value = "redpanda:9092"
    )]
    pub brokers: String,
    /// The events topic.
    #[arg(long = "kafka-topic", env = "KAFKA_TOPIC", default_value = "telemetry-events")]
    pub topic: String,
    /// Partitions of the topics a service creates when they do not exist yet: the events topic,
    /// its dead-letter topic and the processor's changelog (which needs as many as the events
    /// topic has).
    #[arg(long = "topic-partitions", env = "TOPIC_PARTITIONS", default_value_t = 6)]
    pub partitions: i32,
    /// Replication factor of the topics a service creates.
    #[arg(long = "topic-replication", env = "TOPIC_REPLICATION", default_value_t = 1)]
    pub replication: i32,
}

impl KafkaArgs {
    /// Checks what a broker would refuse later, naming the variable.
    pub fn validate(&self) -> Result<(), String> {
        if self.partitions < 1 {
            return Err("TOPIC_PARTITIONS must be at least 1".into());
        }
        if self.replication < 1 {
            return Err("TOPIC_REPLICATION must be at least 1".into());
        }
        Ok(())
    }
}

/// The HTTP settings both HTTP services (ingest-api and ingest-proxy) share, flattened into
/// their `Settings`. `PORT`, `MAX_BODY_BYTES` and `REQUEST_TIMEOUT_MS` have no default here:
/// each service gives its own with [`HttpDefaults`] (ingest-api stores whole batches in one
/// transaction, the proxy holds every event of a request until the broker acknowledges it).
#[derive(Debug, Clone, clap::Args)]
pub struct HttpArgs {
    /// TCP port to listen on.
    #[arg(long, env = "PORT")]
    pub port: u16,
    /// Address to bind.
    #[arg(long, env = "BIND_ADDR", default_value = "0.0.0.0")]
    pub bind_addr: String,
    /// Largest accepted request body in bytes (larger answers 413).
    #[arg(long, env = "MAX_BODY_BYTES")]
    pub max_body_bytes: usize,
    /// Most events in one `POST /events/batch` (more answers 413).
    #[arg(long, env = "MAX_BATCH_LEN", default_value_t = 10_000)]
    pub max_batch_len: usize,
    /// Longest wait for a request body to arrive, in milliseconds (then 408).
    #[arg(long, env = "BODY_TIMEOUT_MS", default_value_t = 5_000)]
    pub body_timeout_ms: u64,
    /// Longest a request may take, body included, in milliseconds (then 408).
    #[arg(long, env = "REQUEST_TIMEOUT_MS")]
    pub request_timeout_ms: u64,
}

impl HttpArgs {
    pub fn body_timeout(&self) -> Duration {
        Duration::from_millis(self.body_timeout_ms)
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    /// Binds the listener (port 0 picks a free one).
    pub async fn bind(&self) -> std::io::Result<TcpListener> {
        TcpListener::bind((self.bind_addr.as_str(), self.port)).await
    }

    /// Answers 408 to a request not done within `REQUEST_TIMEOUT_MS` (a timer per request:
    /// layered only on the routes that need one).
    pub fn timeout_layer(&self) -> TimeoutLayer {
        TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, self.request_timeout())
    }

    /// Serves `router` on `listener` until `shutdown` resolves; then finishes the requests in
    /// flight.
    pub async fn serve(
        &self,
        listener: TcpListener,
        router: Router,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        axum::serve(listener, router)
            .with_graceful_shutdown(shutdown)
            .await
    }

    /// Reads a request body within `MAX_BODY_BYTES` and `BODY_TIMEOUT_MS` ([`read_body`]).
    pub async fn read_body(&self, body: Body) -> Result<Bytes, ApiError> {
        read_body(body, self.max_body_bytes, self.body_timeout()).await
    }
}

/// A service's defaults of the [`HttpArgs`] that differ between services, set on its command
/// with `#[command(mut_args = |arg| DEFAULTS.apply(arg))]`.
#[derive(Debug, Clone, Copy)]
pub struct HttpDefaults {
    /// `PORT`.
    pub port: u16,
    /// `MAX_BODY_BYTES`.
    pub max_body_bytes: usize,
    /// `REQUEST_TIMEOUT_MS`.
    pub request_timeout_ms: u64,
}

impl HttpDefaults {
    /// Gives `arg` its default when it is one of the settings this holds; other arguments pass
    /// through unchanged.
    pub fn apply(self, arg: Arg) -> Arg {
        let default = match arg.get_id().as_str() {
            "port" => self.port.to_string(),
            "max_body_bytes" => self.max_body_bytes.to_string(),
            "request_timeout_ms" => self.request_timeout_ms.to_string(),
            _ => return arg,
        };
        arg.default_value(default).required(false)
    }
}

/// A service's settings at their defaults, reading neither the command line nor the process
/// environment (for tests and benchmarks: a variable set in the shell cannot leak into them).
pub fn defaults<T: Parser>() -> T {
    let cmd = T::command().mut_args(|a| a.env(None::<&str>));
    let name = cmd.get_name().to_owned();
    let matches = cmd.get_matches_from([name]);
    T::from_arg_matches(&matches).expect("every setting has a default")
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[derive(Debug, Parser)]
    struct Demo {
        /// Bound to PATH, which every test process has.
        #[arg(long, env = "PATH", default_value = "unset")]
        search: String,
    }

    const DEMO_HTTP: HttpDefaults = HttpDefaults {
        port: 1234,
        max_body_bytes: 99,
        request_timeout_ms: 7,
    };

    #[derive(Debug, Parser)]
    #[command(mut_args = |arg| DEMO_HTTP.apply(arg))]
    struct DemoHttp {
        #[command(flatten)]
        http: HttpArgs,
    }

    #[test]
    fn a_service_gives_the_http_defaults_that_differ_between_services() {
        let http = defaults::<DemoHttp>().http;
        assert_eq!(http.port, 1234);
        assert_eq!(http.max_body_bytes, 99);
        assert_eq!(http.request_timeout_ms, 7);
        assert_eq!(http.bind_addr, "0.0.0.0", "the shared defaults stay");
        assert_eq!(http.max_batch_len, 10_000);
        assert_eq!(http.body_timeout_ms, 5_000);
    }

    #[test]
    fn without_a_service_default_the_setting_is_required() {
        #[derive(Debug, Parser)]
        struct NoDefaults {
            #[command(flatten)]
            http: HttpArgs,
        }
        let err = NoDefaults::command()
            .mut_args(|a| a.env(None::<&str>))
            .try_get_matches_from(["no-defaults"])
            .expect_err("PORT has no default");
        assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
    }

    #[test]
    fn defaults_ignore_the_environment() {
        assert_ne!(
            Demo::parse_from(["demo"]).search,
            "unset",
            "clap reads the environment"
        );
        assert_eq!(defaults::<Demo>().search, "unset", "defaults do not");
    }
}
