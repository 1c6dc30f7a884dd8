//! Settings helpers shared by the services.

use std::future::Future;
use std::path::PathBuf;
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
    /// How every Kafka client connects: plaintext, ssl, sasl_plaintext or sasl_ssl.
    #[arg(
        long = "kafka-security-protocol",
        env = "KAFKA_SECURITY_PROTOCOL",
        value_name = "KAFKA_SECURITY_PROTOCOL",
        value_enum,
        ignore_case = true,
        default_value = "plaintext"
    )]
    pub security_protocol: SecurityProtocol,
    /// SASL mechanism (with sasl_plaintext or sasl_ssl): PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512.
    #[arg(
        long = "kafka-sasl-mechanism",
        env = "KAFKA_SASL_MECHANISM",
        value_name = "KAFKA_SASL_MECHANISM",
        value_enum,
        ignore_case = true
    )]
    pub sasl_mechanism: Option<SaslMechanism>,
    /// SASL user name.
    #[arg(
        long = "kafka-sasl-username",
        env = "KAFKA_SASL_USERNAME",
        value_name = "KAFKA_SASL_USERNAME"
    )]
    pub sasl_username: Option<String>,
    /// SASL password (or KAFKA_SASL_PASSWORD_FILE). Never logged or shown.
    #[arg(
        long = "kafka-sasl-password",
        env = "KAFKA_SASL_PASSWORD",
        value_name = "KAFKA_SASL_PASSWORD",
        hide_env_values = true
    )]
    pub sasl_password: Option<Secret>,
    /// File holding the SASL password (a Docker or Kubernetes secret); a final newline is not
    /// part of it.
    #[arg(
        long = "kafka-sasl-password-file",
        env = "KAFKA_SASL_PASSWORD_FILE",
        value_name = "KAFKA_SASL_PASSWORD_FILE"
    )]
    pub sasl_password_file: Option<PathBuf>,
    /// PEM file of the CA certificates that sign the brokers' certificates (with ssl or
    /// sasl_ssl; unset: the system's CA store).
    #[arg(
        long = "kafka-ssl-ca-location",
        env = "KAFKA_SSL_CA_LOCATION",
        value_name = "KAFKA_SSL_CA_LOCATION"
    )]
    pub ssl_ca_location: Option<PathBuf>,
    /// PEM file of this client's certificate, for mutual TLS.
    #[arg(
        long = "kafka-ssl-certificate-location",
        env = "KAFKA_SSL_CERTIFICATE_LOCATION",
        value_name = "KAFKA_SSL_CERTIFICATE_LOCATION"
    )]
    pub ssl_certificate_location: Option<PathBuf>,
    /// PEM file of this client's private key, for mutual TLS.
    #[arg(
        long = "kafka-ssl-key-location",
        env = "KAFKA_SSL_KEY_LOCATION",
        value_name = "KAFKA_SSL_KEY_LOCATION"
    )]
    pub ssl_key_location: Option<PathBuf>,
    /// Password of that private key, when it is encrypted. Never logged or shown.
    #[arg(
        long = "kafka-ssl-key-password",
        env = "KAFKA_SSL_KEY_PASSWORD",
        value_name = "KAFKA_SSL_KEY_PASSWORD",
        hide_env_values = true
    )]
    pub ssl_key_password: Option<Secret>,
    /// Any other librdkafka property as key=value, applied last to every client (repeatable;
    /// KAFKA_OPTIONS takes them separated by `;`, so values may hold commas). The properties
    /// the guarantee depends on are refused. Never shown (values may be secret).
    #[arg(
        long = "kafka-option",
        env = "KAFKA_OPTIONS",
        value_name = "KAFKA_OPTIONS",
        value_delimiter = ';',
        hide_env_values = true,
        value_parser = parse_kafka_option
    )]
    pub options: Vec<KafkaOption>,
}

/// `KAFKA_SECURITY_PROTOCOL`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SecurityProtocol {
    #[value(name = "plaintext")]
    Plaintext,
    #[value(name = "ssl")]
    Ssl,
    #[value(name = "sasl_plaintext")]
    SaslPlaintext,
    #[value(name = "sasl_ssl")]
    SaslSsl,
}

impl SecurityProtocol {
    /// librdkafka's `security.protocol` value.
    pub fn as_str(self) -> &'static str {
        match self {
            SecurityProtocol::Plaintext => "plaintext",
            SecurityProtocol::Ssl => "ssl",
            SecurityProtocol::SaslPlaintext => "sasl_plaintext",
            SecurityProtocol::SaslSsl => "sasl_ssl",
        }
    }

    pub fn uses_sasl(self) -> bool {
        matches!(self, SecurityProtocol::SaslPlaintext | SecurityProtocol::SaslSsl)
    }

    pub fn uses_tls(self) -> bool {
        matches!(self, SecurityProtocol::Ssl | SecurityProtocol::SaslSsl)
    }
}

/// `KAFKA_SASL_MECHANISM`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SaslMechanism {
    #[value(name = "PLAIN")]
    Plain,
    #[value(name = "SCRAM-SHA-256")]
    ScramSha256,
    #[value(name = "SCRAM-SHA-512")]
    ScramSha512,
}

impl SaslMechanism {
    /// librdkafka's `sasl.mechanism` value.
    pub fn as_str(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// A secret setting: its value is never printed (`Debug` shows a placeholder).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The value, for the one place that hands it to a client.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

/// One pass-through librdkafka property (`--kafka-option key=value`).
#[derive(Clone, PartialEq, Eq)]
pub struct KafkaOption {
    pub key: String,
    pub value: String,
    /// The entry had no `=` (refused by `KafkaArgs::security_settings`, without showing it: it
    /// may be part of a secret).
    pub malformed: bool,
}

impl KafkaOption {
    /// Whether the value is kept out of logs (any property whose name says it may be secret).
    pub fn is_secret(&self) -> bool {
        let key = self.key.to_ascii_lowercase();
        [
            "password",
            "secret",
            "token",
            "key.pem",
            "jaas",
            "oauthbearer.config",
        ]
        .iter()
        .any(|w| key.contains(w))
    }

    /// The property it sets as librdkafka reads it: a `topic.` prefix names the same property.
    pub fn property(&self) -> &str {
        self.key.strip_prefix("topic.").unwrap_or(&self.key)
    }
}

impl std::fmt::Debug for KafkaOption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_secret() {
            write!(f, "{}=<redacted>", self.key)
        } else {
            write!(f, "{}={}", self.key, self.value)
        }
    }
}

/// Never fails here: an entry without `=` is refused later without being shown (clap's own error
/// would print it, and it may be part of a secret).
fn parse_kafka_option(s: &str) -> Result<KafkaOption, std::convert::Infallible> {
    Ok(match s.split_once('=') {
        Some((key, value)) => KafkaOption {
            key: key.trim().to_owned(),
            value: value.trim().to_owned(),
            malformed: key.trim().is_empty(),
        },
        None => KafkaOption {
            key: String::new(),
            value: String::new(),
            malformed: !s.trim().is_empty(),
        },
    })
}

/// Properties the project sets itself and refuses from `KAFKA_OPTIONS`: the guarantee depends on
/// them (idempotent acks=all producers, transactions per partition, read_committed consumers
/// whose offsets go with the transactions, the murmur2 key partitioner), or a variable of its
/// own sets them.
pub const REFUSED_OPTIONS: &[(&str, &str)] = &[
    ("enable.idempotence", "the exactly-once guarantee depends on it"),
    ("acks", "the exactly-once guarantee depends on it"),
    (
        "request.required.acks",
        "the exactly-once guarantee depends on it (acks)",
    ),
    ("isolation.level", "the exactly-once guarantee depends on it"),
    ("enable.auto.commit", "the exactly-once guarantee depends on it"),
    (
        "enable.auto.offset.store",
        "the exactly-once guarantee depends on it",
    ),
    ("transactional.id", "the exactly-once guarantee depends on it"),
    (
        "partitioner",
        "per-device order depends on it (murmur2 on the key)",
    ),
    (
        "auto.offset.reset",
        "a group without committed offsets would skip events in the topic",
    ),
    (
        "enable.partition.eof",
        "restores and the dead-letter reader depend on it",
    ),
    ("group.id", "set GROUP_ID"),
    ("group.instance.id", "set GROUP_INSTANCE_ID"),
    ("bootstrap.servers", "set KAFKA_BROKERS"),
    ("metadata.broker.list", "set KAFKA_BROKERS"),
    ("security.protocol", "set KAFKA_SECURITY_PROTOCOL"),
    ("sasl.mechanism", "set KAFKA_SASL_MECHANISM"),
    ("sasl.mechanisms", "set KAFKA_SASL_MECHANISM"),
    ("sasl.username", "set KAFKA_SASL_USERNAME"),
    (
        "sasl.password",
        "set KAFKA_SASL_PASSWORD or KAFKA_SASL_PASSWORD_FILE",
    ),
    ("ssl.ca.location", "set KAFKA_SSL_CA_LOCATION"),
    ("ssl.certificate.location", "set KAFKA_SSL_CERTIFICATE_LOCATION"),
    ("ssl.key.location", "set KAFKA_SSL_KEY_LOCATION"),
    ("ssl.key.password", "set KAFKA_SSL_KEY_PASSWORD"),
];

impl KafkaArgs {
    /// Checks what a broker would refuse later, and the connection settings, naming the variable.
    pub fn validate(&self) -> Result<(), String> {
        if self.partitions < 1 {
            return Err("TOPIC_PARTITIONS must be at least 1".into());
        }
        if self.replication < 1 {
            return Err("TOPIC_REPLICATION must be at least 1".into());
        }
        self.security_settings().map(|_| ())
    }

    /// The connection's librdkafka properties, from the variables (the password read from its
    /// file), then the pass-through options; each `(key, value, secret)`.
    pub fn security_settings(&self) -> Result<Vec<(String, String, bool)>, String> {
        let protocol = self.security_protocol;
        let mut out = vec![(
            "security.protocol".to_owned(),
            protocol.as_str().to_owned(),
            false,
        )];
        let sasl_set = [
            ("KAFKA_SASL_MECHANISM", self.sasl_mechanism.is_some()),
            ("KAFKA_SASL_USERNAME", self.sasl_username.is_some()),
            ("KAFKA_SASL_PASSWORD", self.sasl_password.is_some()),
            ("KAFKA_SASL_PASSWORD_FILE", self.sasl_password_file.is_some()),
        ];
        let tls_set = [
            ("KAFKA_SSL_CA_LOCATION", &self.ssl_ca_location),
            ("KAFKA_SSL_CERTIFICATE_LOCATION", &self.ssl_certificate_location),
            ("KAFKA_SSL_KEY_LOCATION", &self.ssl_key_location),
        ];
        if protocol.uses_sasl() {
            let mechanism = self.sasl_mechanism.ok_or_else(|| {
                format!(
                    "KAFKA_SECURITY_PROTOCOL={} needs KAFKA_SASL_MECHANISM",
                    protocol.as_str()
                )
            })?;
            let user = self.sasl_username.clone().ok_or_else(|| {
                format!(
                    "KAFKA_SECURITY_PROTOCOL={} needs KAFKA_SASL_USERNAME",
                    protocol.as_str()
                )
            })?;
            let password = match (&self.sasl_password, &self.sasl_password_file) {
                (Some(p), None) => p.expose().to_owned(),
                (None, Some(file)) => {
                    let text = std::fs::read_to_string(file).map_err(|e| {
                        format!("KAFKA_SASL_PASSWORD_FILE: cannot read {}: {e}", file.display())
                    })?;
                    let password = text.strip_suffix('\n').unwrap_or(&text);
                    let password = password.strip_suffix('\r').unwrap_or(password);
                    if password.is_empty() {
                        return Err(format!("KAFKA_SASL_PASSWORD_FILE: {} is empty", file.display()));
                    }
                    password.to_owned()
                }
                (Some(_), Some(_)) => {
                    return Err("set KAFKA_SASL_PASSWORD or KAFKA_SASL_PASSWORD_FILE, not both".into())
                }
                (None, None) => {
                    return Err(format!(
                        "KAFKA_SECURITY_PROTOCOL={} needs KAFKA_SASL_PASSWORD or KAFKA_SASL_PASSWORD_FILE",
                        protocol.as_str()
                    ))
                }
            };
            out.push(("sasl.mechanism".into(), mechanism.as_str().into(), false));
            out.push(("sasl.username".into(), user, false));
            out.push(("sasl.password".into(), password, true));
        } else if let Some((name, _)) = sasl_set.iter().find(|(_, set)| *set) {
            return Err(format!(
                "{name} is set, but KAFKA_SECURITY_PROTOCOL={} does not use SASL (sasl_plaintext or sasl_ssl does)",
                protocol.as_str()
            ));
        }
        if protocol.uses_tls() {
            for (name, key, path) in [
                ("KAFKA_SSL_CA_LOCATION", "ssl.ca.location", &self.ssl_ca_location),
                (
                    "KAFKA_SSL_CERTIFICATE_LOCATION",
                    "ssl.certificate.location",
                    &self.ssl_certificate_location,
                ),
                (
                    "KAFKA_SSL_KEY_LOCATION",
                    "ssl.key.location",
                    &self.ssl_key_location,
                ),
            ] {
                if let Some(path) = path {
                    std::fs::File::open(path)
                        .map_err(|e| format!("{name}: cannot read {}: {e}", path.display()))?;
                    out.push((key.into(), path.display().to_string(), false));
                }
            }
            if self.ssl_certificate_location.is_some() != self.ssl_key_location.is_some() {
                return Err(
                    "mutual TLS needs both KAFKA_SSL_CERTIFICATE_LOCATION and KAFKA_SSL_KEY_LOCATION".into(),
                );
            }
            if let Some(p) = &self.ssl_key_password {
                if self.ssl_key_location.is_none() {
                    return Err("KAFKA_SSL_KEY_PASSWORD is set, but KAFKA_SSL_KEY_LOCATION is not".into());
                }
                out.push(("ssl.key.password".into(), p.expose().to_owned(), true));
            }
        } else if let Some((name, _)) = tls_set.iter().find(|(_, p)| p.is_some()) {
            return Err(format!(
                "{name} is set, but KAFKA_SECURITY_PROTOCOL={} does not use TLS (ssl or sasl_ssl does)",
                protocol.as_str()
            ));
        } else if self.ssl_key_password.is_some() {
            return Err(format!(
                "KAFKA_SSL_KEY_PASSWORD is set, but KAFKA_SECURITY_PROTOCOL={} does not use TLS",
                protocol.as_str()
            ));
        }
        for o in &self.options {
            if o.malformed {
                return Err("KAFKA_OPTIONS: an entry is not key=value (entries are separated by ';')".into());
            }
            if o.key.is_empty() {
                continue; // an empty entry (a trailing ';')
            }
            if let Some((_, why)) = REFUSED_OPTIONS.iter().find(|(k, _)| *k == o.property()) {
                return Err(format!("KAFKA_OPTIONS: {} cannot be set here: {why}", o.key));
            }
            out.push((o.key.clone(), o.value.clone(), o.is_secret()));
        }
        Ok(out)
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

    #[derive(Debug, Parser)]
    struct DemoKafka {
        #[command(flatten)]
        kafka: KafkaArgs,
    }

    fn kafka(args: &[&str]) -> KafkaArgs {
        let mut argv = vec!["demo"];
        argv.extend_from_slice(args);
        DemoKafka::command()
            .mut_args(|a| a.env(None::<&str>))
            .try_get_matches_from(argv)
            .map(|m| {
                <DemoKafka as clap::FromArgMatches>::from_arg_matches(&m)
                    .expect("parses")
                    .kafka
            })
            .expect("valid arguments")
    }

    fn refused(args: &[&str]) -> String {
        kafka(args).security_settings().expect_err("refused")
    }

    #[test]
    fn plaintext_by_default_and_sasl_needs_its_mechanism_user_and_one_password() {
        let plain = kafka(&[]).security_settings().expect("valid");
        assert_eq!(
            plain,
            vec![("security.protocol".into(), "plaintext".into(), false)]
        );
        let sasl = ["--kafka-security-protocol", "SASL_SSL"];
        assert!(refused(&sasl).contains("KAFKA_SASL_MECHANISM"));
        let with_mech = [&sasl[..], &["--kafka-sasl-mechanism", "scram-sha-512"]].concat();
        assert!(refused(&with_mech).contains("KAFKA_SASL_USERNAME"));
        let with_user = [&with_mech[..], &["--kafka-sasl-username", "u"]].concat();
        let e = refused(&with_user);
        assert!(
            e.contains("KAFKA_SASL_PASSWORD") && e.contains("KAFKA_SASL_PASSWORD_FILE"),
            "{e}"
        );
        let full = [&with_user[..], &["--kafka-sasl-password", "sekrit-1"]].concat();
        let settings = kafka(&full).security_settings().expect("valid");
        assert!(settings.contains(&("security.protocol".into(), "sasl_ssl".into(), false)));
        assert!(settings.contains(&("sasl.mechanism".into(), "SCRAM-SHA-512".into(), false)));
        assert!(
            settings.contains(&("sasl.password".into(), "sekrit-1".into(), true)),
            "marked secret"
        );
        assert!(
            !format!("{:?}", kafka(&full)).contains("sekrit-1"),
            "the settings' Debug never shows the password"
        );
        let both = [&full[..], &["--kafka-sasl-password-file", "/etc/hostname"]].concat();
        assert!(refused(&both).contains("not both"));
    }

    #[test]
    fn the_password_file_is_read_without_its_final_newline_and_a_bad_one_is_named() {
        let dir = std::env::temp_dir().join(format!("kafka-args-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("password");
        std::fs::write(&file, "from-a-secret\n").expect("written");
        let path = file.display().to_string();
        let base = [
            "--kafka-security-protocol",
            "sasl_plaintext",
            "--kafka-sasl-mechanism",
            "PLAIN",
            "--kafka-sasl-username",
            "u",
        ];
        let args = [&base[..], &["--kafka-sasl-password-file", &path]].concat();
        let settings = kafka(&args).security_settings().expect("valid");
        assert!(settings.contains(&("sasl.password".into(), "from-a-secret".into(), true)));
        std::fs::write(&file, "").expect("written");
        assert!(refused(&args).contains("KAFKA_SASL_PASSWORD_FILE"));
        let missing = [
            &base[..],
            &["--kafka-sasl-password-file", "/nonexistent/password"],
        ]
        .concat();
        assert!(refused(&missing).starts_with("KAFKA_SASL_PASSWORD_FILE: cannot read"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn settings_of_a_protocol_not_in_use_and_unreadable_certificates_are_named() {
        let e = refused(&["--kafka-sasl-mechanism", "PLAIN"]);
        assert!(
            e.starts_with("KAFKA_SASL_MECHANISM is set") && e.contains("plaintext"),
            "{e}"
        );
        let e = refused(&[
            "--kafka-security-protocol",
            "sasl_plaintext",
            "--kafka-sasl-mechanism",
            "PLAIN",
            "--kafka-sasl-username",
            "u",
            "--kafka-sasl-password",
            "p",
            "--kafka-ssl-ca-location",
            "/etc/hostname",
        ]);
        assert!(e.starts_with("KAFKA_SSL_CA_LOCATION is set"), "{e}");
        let e = refused(&[
            "--kafka-security-protocol",
            "ssl",
            "--kafka-ssl-ca-location",
            "/nonexistent/ca.pem",
        ]);
        assert!(e.starts_with("KAFKA_SSL_CA_LOCATION: cannot read"), "{e}");
        let e = refused(&[
            "--kafka-security-protocol",
            "ssl",
            "--kafka-ssl-certificate-location",
            "/etc/hostname",
        ]);
        assert!(e.contains("KAFKA_SSL_KEY_LOCATION"), "{e}");
        let ok = kafka(&[
            "--kafka-security-protocol",
            "ssl",
            "--kafka-ssl-ca-location",
            "/etc/hostname",
        ]);
        assert!(ok.security_settings().expect("valid").contains(&(
            "ssl.ca.location".into(),
            "/etc/hostname".into(),
            false
        )));
    }

    #[test]
    fn pass_through_options_come_last_and_the_guarantees_properties_are_refused() {
        let args = kafka(&[
            "--kafka-option",
            "socket.keepalive.enable=true;client.rack=r1;",
            "--kafka-option",
            "sasl.oauthbearer.client.secret=hush",
            "--kafka-option",
            "debug=broker,topic",
        ]);
        let settings = args.security_settings().expect("valid");
        assert_eq!(
            &settings[1..],
            &[
                ("socket.keepalive.enable".into(), "true".into(), false),
                ("client.rack".into(), "r1".into(), false),
                ("sasl.oauthbearer.client.secret".into(), "hush".into(), true),
                ("debug".into(), "broker,topic".into(), false),
            ]
        );
        assert!(
            !format!("{args:?}").contains("hush"),
            "a secret-looking option's value is not shown"
        );
        for (key, _) in REFUSED_OPTIONS {
            for key in [key.to_string(), format!("topic.{key}")] {
                let e = refused(&["--kafka-option", &format!("{key}=x")]);
                assert!(
                    e.starts_with(&format!("KAFKA_OPTIONS: {key} cannot be set here")),
                    "{e}"
                );
            }
        }
        let e = refused(&["--kafka-option", "a=b;part-of-a-secret"]);
        assert!(
            e.contains("not key=value") && !e.contains("part-of-a-secret"),
            "{e}"
        );
        let e = refused(&[
            "--kafka-security-protocol",
            "ssl",
            "--kafka-ssl-key-password",
            "k",
        ]);
        assert!(e.contains("KAFKA_SSL_KEY_LOCATION"), "{e}");
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
