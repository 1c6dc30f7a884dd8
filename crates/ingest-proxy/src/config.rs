//! Settings for ingest-proxy: every environment variable, its default and meaning, in one place
//! (those it shares with ingest-api are declared once in `HttpArgs`; their defaults that differ
//! between the two are given here).

use clap::Parser;
use service_common::settings::{HttpArgs, HttpDefaults};

/// ingest-proxy's defaults of the `HttpArgs` that differ between the services (kept as each
/// shipped them). A proxy request waits for its body, then up to `PRODUCE_TIMEOUT_MS`
/// for the broker's acknowledgement, hence the longer request timeout.
pub const HTTP_DEFAULTS: HttpDefaults = HttpDefaults {
    port: 4000,
    max_body_bytes: 4 * 1024 * 1024,
    request_timeout_ms: 15_000,
};

/// ingest-proxy: accepts telemetry events over HTTP and publishes them to a Kafka topic.
#[derive(Debug, Clone, Parser)]
#[command(name = "ingest-proxy", version, about, mut_args = |arg| HTTP_DEFAULTS.apply(arg))]
pub struct Settings {
    #[command(flatten)]
    pub http: HttpArgs,
    #[command(flatten)]
    pub kafka: service_common::settings::KafkaArgs,
    /// Most events waiting for a broker acknowledgement at once; past it, 503.
    #[arg(long, env = "MAX_IN_FLIGHT", default_value_t = 20_000)]
    pub max_in_flight: usize,
    /// Longest wait for the broker to acknowledge an event, in milliseconds; past it, 503.
    #[arg(long, env = "PRODUCE_TIMEOUT_MS", default_value_t = 5_000)]
    pub produce_timeout_ms: u64,
    /// Producer linger (`linger.ms`): how long the producer waits to fill a batch.
    #[arg(long, env = "PRODUCER_LINGER_MS", default_value_t = 5)]
    pub producer_linger_ms: u64,
    /// Producer batch size in messages (`batch.num.messages`).
    #[arg(long, env = "PRODUCER_BATCH_MESSAGES", default_value_t = 10_000)]
    pub producer_batch_messages: u32,
    /// `Retry-After` seconds sent with a 503.
    #[arg(long, env = "RETRY_AFTER_SECS", default_value_t = 1)]
    pub retry_after_secs: u64,
    /// When set, `POST` requests must carry `Authorization: Bearer <token>` (else 401).
    /// Unset means open, as the exercise has it.
    #[arg(long, env = "INGEST_TOKEN", hide_env_values = true)]
    pub ingest_token: Option<String>,
    /// Largest amount an event's ts may be ahead of this proxy's clock (ms; default one day);
    /// beyond it the event gets 400 naming `ts` (a client sending microseconds, or with a clock
    /// far off).
    #[arg(long, env = "MAX_FUTURE_SKEW_MS", default_value_t = 86_400_000)]
    pub max_future_skew_ms: i64,
    /// How often `/readyz` re-checks the broker, in milliseconds.
    #[arg(long, env = "READY_CHECK_INTERVAL_MS", default_value_t = 1_000)]
    pub ready_check_interval_ms: u64,
}

/// What an ingest request may take beyond `BODY_TIMEOUT_MS` and `PRODUCE_TIMEOUT_MS`:
/// librdkafka checks message deadlines once a second, and the producer's poll hands the failure
/// over within 100 ms.
pub const INGEST_SLACK_MS: u64 = 2_000;

impl Settings {
    /// Whether `POST /event` and `POST /events/batch` end within `REQUEST_TIMEOUT_MS` by their own
    /// deadlines: the body within `BODY_TIMEOUT_MS` (else 408), the broker's acknowledgement
    /// within `PRODUCE_TIMEOUT_MS` (else 503), plus [`INGEST_SLACK_MS`]. Then a request timer
    /// could never fire first and none is armed for them (with the defaults: 5 + 5 + 2 s against
    /// 15 s); otherwise they get one like every other route.
    /// A `PRODUCE_TIMEOUT_MS` of 0 is librdkafka's "no deadline", so the timer stays.
    pub fn ingest_ends_in_time(&self) -> bool {
        self.produce_timeout_ms > 0
            && self
                .http
                .body_timeout_ms
                .saturating_add(self.produce_timeout_ms)
                .saturating_add(INGEST_SLACK_MS)
                <= self.http.request_timeout_ms
    }

    /// Defaults for a given broker and topic on 127.0.0.1 port 0, for tests; the connection's
    /// security settings come from the environment (`KAFKA_SECURITY_PROTOCOL`...), as for the
    /// tests' own clients, so the suite runs against a secured cluster too.
    pub fn for_tests(brokers: &str, topic: &str) -> Self {
        let mut s: Settings = service_common::settings::defaults();
        s.kafka =
            service_common::kafka::kafka_args_from_env().expect("the Kafka settings of the environment");
        s.kafka.brokers = brokers.to_owned();
        s.kafka.topic = topic.to_owned();
        s.http.port = 0;
        s.http.bind_addr = "127.0.0.1".into();
        s.kafka.partitions = 3;
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_http_defaults_are_the_proxys_own() {
        let s: Settings = service_common::settings::defaults();
        assert_eq!(s.http.port, 4000);
        assert_eq!(s.http.bind_addr, "0.0.0.0");
        assert_eq!(s.http.max_body_bytes, 4 * 1024 * 1024);
        assert_eq!(s.http.max_batch_len, 10_000);
        assert_eq!(s.http.body_timeout_ms, 5_000);
        assert_eq!(s.http.request_timeout_ms, 15_000);
    }

    #[test]
    fn the_ingest_routes_need_no_request_timer_only_when_their_own_deadlines_come_first() {
        let mut s: Settings = service_common::settings::defaults();
        assert!(s.ingest_ends_in_time(), "5 s + 5 s + 2 s within 15 s");
        s.http.request_timeout_ms = 11_999;
        assert!(!s.ingest_ends_in_time());
        s.http.request_timeout_ms = 12_000;
        assert!(s.ingest_ends_in_time());
        s.produce_timeout_ms = 5_001;
        assert!(!s.ingest_ends_in_time());
        s.produce_timeout_ms = 0;
        assert!(!s.ingest_ends_in_time(), "0 is no deadline at all");
        s.produce_timeout_ms = 1;
        s.http.body_timeout_ms = u64::MAX;
        s.http.request_timeout_ms = 20_000;
        assert!(!s.ingest_ends_in_time(), "no overflow into a short sum");
    }
}
