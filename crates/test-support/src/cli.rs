//! Running a service binary in a test: its `--help`, and a flag winning over its variable.

use std::io::Read;
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::free_port;

/// A child process, killed and reaped when dropped, so a test that fails leaves none behind.
#[derive(Debug)]
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `cmd` to its end and returns what it printed (less than a pipe holds, 64 KiB); kills it
/// and panics when it has not ended `within` (a binary that ignored `--help` would serve on).
pub fn output_within(cmd: &mut Command, within: Duration) -> std::process::Output {
    let mut child = KillOnDrop(
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the command starts"),
    );
    let start = Instant::now();
    while child.0.try_wait().expect("the child can be polled").is_none() {
        assert!(start.elapsed() < within, "{cmd:?} did not end within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut out = std::process::Output {
        status: child.0.wait().expect("the child has ended"),
        stdout: Vec::new(),
        stderr: Vec::new(),
    };
    if let Some(mut stdout) = child.0.stdout.take() {
        stdout.read_to_end(&mut out.stdout).expect("read stdout");
    }
    if let Some(mut stderr) = child.0.stderr.take() {
        stderr.read_to_end(&mut out.stderr).expect("read stderr");
    }
    out
}

/// Spawns a service binary and waits until it listens on 127.0.0.1:`port`; panics when it exits
/// first or 30 s pass. The child is killed when the guard drops.
pub fn spawn_listening(cmd: &mut Command, port: u16) -> KillOnDrop {
    let mut child = KillOnDrop(cmd.spawn().expect("the service starts"));
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(status) = child.0.try_wait().expect("the child can be polled") {
            panic!("{cmd:?} exited with {status} before listening on port {port}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{cmd:?} did not listen on port {port} within 30 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

/// `bin --help`, with an empty environment, exits 0 within 30 s and prints each of `lines` (e.g. a
/// variable and its default).
pub fn assert_help_lists(bin: &str, lines: &[&str]) {
    // No environment: clap shows a set variable's value in the help (the test scripts set
    // KAFKA_BROKERS, for one), and the help must not depend on the caller.
    let out = output_within(
        Command::new(bin).arg("--help").env_clear(),
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "--help exited with {:?}", out.status);
    let help = String::from_utf8(out.stdout).expect("help is UTF-8");
    for line in lines {
        assert!(help.contains(line), "help lacks {line}:\n{help}");
    }
}

/// `service` started with `PORT` set to one free port and `--port` to another listens on the
/// flag's port, not on the variable's. `service` carries whatever else it needs to start.
pub fn assert_port_flag_overrides_its_variable(service: &mut Command) {
    assert_listen_flag_overrides_its_variable(service.env("BIND_ADDR", "127.0.0.1"), "PORT", "--port");
}

/// `service` started with the port variable `var` set to one free port and `flag` to another
/// listens on the flag's port, not on the variable's.
pub fn assert_listen_flag_overrides_its_variable(service: &mut Command, var: &str, flag: &str) {
    let env_port = free_port();
    let flag_port = std::iter::repeat_with(free_port)
        .find(|p| *p != env_port)
        .expect("another free port");
    let _service = spawn_listening(
        service
            .env(var, env_port.to_string())
            .env("RUST_LOG", "warn")
            .args([flag, &flag_port.to_string()])
            .stdout(Stdio::null()),
        flag_port,
    );
    assert!(
        TcpStream::connect(("127.0.0.1", env_port)).is_err(),
        "nothing listens on the variable's port {env_port}"
    );
}
