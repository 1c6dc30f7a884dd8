//! The ingest-api binary's command line: `--help`, and a flag winning over its variable.

use std::process::Command;

use test_support::cli::{assert_help_lists, assert_port_flag_overrides_its_variable};

const BIN: &str = env!("CARGO_BIN_EXE_ingest-api");

#[test]
fn help_lists_the_variables_with_their_defaults_and_exits_0() {
    assert_help_lists(
        BIN,
        &[
            "[env: PORT=] [default: 3000]",
            "[env: MAX_BODY_BYTES=] [default: 16777216]",
            "[env: REQUEST_TIMEOUT_MS=] [default: 10000]",
            "[env: DATABASE_PATH=] [default: data/ingest.db]",
        ],
    );
}

#[test]
fn a_flag_overrides_its_environment_variable() {
    let dir = tempfile::tempdir().expect("a temp dir");
    assert_port_flag_overrides_its_variable(
        Command::new(BIN).env("DATABASE_PATH", dir.path().join("ingest.db")),
    );
}
