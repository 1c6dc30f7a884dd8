//! The stream-processor binary's command line: `--help`, and a flag winning over its variable.

use std::process::Command;

use test_support::cli::{assert_help_lists, assert_listen_flag_overrides_its_variable};
use test_support::{brokers, unique};

const BIN: &str = env!("CARGO_BIN_EXE_stream-processor");

#[test]
fn help_lists_the_variables_with_their_defaults_and_exits_0() {
    assert_help_lists(
        BIN,
        // The long form (some settings have several paragraphs): each on its own line.
        &[
            "[env: KAFKA_BROKERS=]\n          [default: redpanda:9092]",
            "[env: GROUP_ID=]\n          [default: stream-processor]",
            "[env: ALLOWED_LATENESS_MS=]\n          [default: 5000]",
            "[env: ADMIN_PORT=]\n          [default: 9000]",
        ],
    );
}

#[test]
fn a_flag_overrides_its_environment_variable() {
    let dir = tempfile::tempdir().expect("temp dir");
    let topic = unique("processor-cli");
    assert_listen_flag_overrides_its_variable(
        Command::new(BIN)
            .env("KAFKA_BROKERS", brokers())
            .env("KAFKA_TOPIC", &topic)
            .env("DLQ_TOPIC", format!("{topic}-dlq"))
            .env("GROUP_ID", format!("{topic}-group"))
            .env("TOPIC_PARTITIONS", "1")
            .env("STATE_PATH", dir.path().join("state.db"))
            .env("ADMIN_BIND_ADDR", "127.0.0.1")
            .env("INGEST_URL", "http://127.0.0.1:9/events/batch"),
        "ADMIN_PORT",
        "--admin-port",
    );
}
