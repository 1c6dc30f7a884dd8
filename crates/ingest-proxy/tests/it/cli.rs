//! The ingest-proxy binary's command line: `--help`, and a flag winning over its variable.

use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use test_support::{brokers, free_port, output_within, spawn_listening, unique};

#[test]
fn help_lists_the_variables_with_their_defaults_and_exits_0() {
    let out = output_within(
        Command::new(env!("CARGO_BIN_EXE_ingest-proxy")).arg("--help"),
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "--help exited with {:?}", out.status);
    let help = String::from_utf8(out.stdout).expect("help is UTF-8");
    for line in [
        "[env: PORT=] [default: 4000]",
        "[env: MAX_BODY_BYTES=] [default: 4194304]",
        "[env: REQUEST_TIMEOUT_MS=] [default: 15000]",
    ] {
        assert!(help.contains(line), "help lacks {line}:\n{help}");
    }
}

#[test]
fn a_flag_overrides_its_environment_variable() {
    let env_port = free_port();
    let flag_port = std::iter::repeat_with(free_port)
        .find(|p| *p != env_port)
        .expect("another free port");
    let _proxy = spawn_listening(
        Command::new(env!("CARGO_BIN_EXE_ingest-proxy"))
            .env("PORT", env_port.to_string())
            .env("BIND_ADDR", "127.0.0.1")
            .env("KAFKA_BROKERS", brokers())
            .env("KAFKA_TOPIC", unique("proxy-cli"))
            .env("TOPIC_PARTITIONS", "1")
            .env("RUST_LOG", "warn")
            .args(["--port", &flag_port.to_string()])
            .stdout(Stdio::null()),
        flag_port,
    );
    assert!(
        TcpStream::connect(("127.0.0.1", env_port)).is_err(),
        "nothing listens on the variable's port {env_port}"
    );
}
