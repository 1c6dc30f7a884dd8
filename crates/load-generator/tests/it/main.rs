//! load-generator's integration tests: its command line (`--help`, and a flag winning over its
//! variable), run as the real binary; `verify` against a real ingest-api and dead-letter topic.

mod verify;

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use test_support::cli::assert_help_lists;
use test_support::free_port;

const BIN: &str = env!("CARGO_BIN_EXE_load-generator");

#[test]
fn help_lists_the_variables_with_their_defaults_and_exits_0() {
    assert_help_lists(
        BIN,
        &[
            "[env: INGEST_URL=] [default: http://localhost:3000/event]",
            "[env: BURSTS=] [default: 10]",
            "[env: BURST_SIZE=] [default: 100]",
        ],
    );
}

#[test]
fn a_flag_overrides_its_environment_variable() {
    // INGEST_URL names a port nobody listens on; --ingest-url names this listener.
    let listener = TcpListener::bind("127.0.0.1:0").expect("a listener");
    listener.set_nonblocking(true).expect("non-blocking");
    let flag_url = format!(
        "http://127.0.0.1:{}/event",
        listener.local_addr().expect("its address").port()
    );
    let mut child = Command::new(BIN)
        .env_clear()
        .env("INGEST_URL", format!("http://127.0.0.1:{}/event", free_port()))
        .args(["--ingest-url", &flag_url, "--bursts", "1", "--burst-size", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("load-generator starts");
    let start = Instant::now();
    let connected = loop {
        if listener.accept().is_ok() {
            break true;
        }
        if start.elapsed() > Duration::from_secs(30) {
            break false;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(connected, "load-generator sent to the flag's URL within 30 s");
}
