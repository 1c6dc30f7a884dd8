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
