//! The ingest-proxy binary's command line: `--help`, and a flag winning over its variable.

use std::process::Command;

use test_support::cli::{assert_help_lists, assert_port_flag_overrides_its_variable};
use test_support::{brokers, unique};

const BIN: &str = env!("CARGO_BIN_EXE_ingest-proxy");

#[test]
fn help_lists_the_variables_with_their_defaults_and_exits_0() {
    assert_help_lists(
        BIN,
        &[
            "[env: PORT=] [default: 4000]",
            "[env: MAX_BODY_BYTES=] [default: 4194304]",
            "[env: REQUEST_TIMEOUT_MS=] [default: 15000]",
            "[env: KAFKA_BROKERS=] [default: redpanda:9092]",
        ],
    );
}

#[test]
fn a_flag_overrides_its_environment_variable() {
    assert_port_flag_overrides_its_variable(
        Command::new(BIN)
            .env("KAFKA_BROKERS", brokers())
            .env("KAFKA_TOPIC", unique("proxy-cli"))
            .env("TOPIC_PARTITIONS", "1"),
    );
}

#[test]
fn secrets_never_appear_in_help_and_a_bad_connection_setting_stops_it_naming_the_variable() {
    let help = test_support::cli::output_within(
        Command::new(BIN)
            .arg("--help")
            .env("KAFKA_SASL_PASSWORD", "sekrit-in-env")
            .env("KAFKA_SSL_KEY_PASSWORD", "key-sekrit"),
        std::time::Duration::from_secs(20),
    );
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(
        text.contains("KAFKA_SASL_PASSWORD") && text.contains("KAFKA_OPTIONS"),
        "{text}"
    );
    assert!(
        !text.contains("sekrit"),
        "a secret from the environment in --help: {text}"
    );
    let cases: [(&[(&str, &str)], &str); 4] = [
        (
            &[("KAFKA_OPTIONS", "enable.idempotence=false")],
            "KAFKA_OPTIONS: enable.idempotence cannot be set here",
        ),
        (
            &[
                ("KAFKA_SECURITY_PROTOCOL", "sasl_ssl"),
                ("KAFKA_SASL_PASSWORD", "sekrit-in-env"),
            ],
            "KAFKA_SECURITY_PROTOCOL=sasl_ssl needs KAFKA_SASL_MECHANISM",
        ),
        (
            &[("KAFKA_SASL_PASSWORD", "sekrit-in-env")],
            "KAFKA_SASL_PASSWORD is set, but KAFKA_SECURITY_PROTOCOL=plaintext",
        ),
        (&[("KAFKA_SECURITY_PROTOCOL", "tls")], "KAFKA_SECURITY_PROTOCOL"),
    ];
    for (env, says) in cases {
        let mut cmd = Command::new(BIN);
        cmd.env("KAFKA_BROKERS", brokers()).env("PORT", "0");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = test_support::cli::output_within(&mut cmd, std::time::Duration::from_secs(20));
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.status.success(), "{env:?} must stop it: {all}");
        assert!(all.contains(says), "{env:?}: {all}");
        assert!(!all.contains("sekrit"), "a secret in the error output: {all}");
    }
}
