//! Logging setup shared by the services.

/// Logs to stdout, one line per event of interest; JSON when `LOG_FORMAT=json`.
/// Level from `RUST_LOG` (default `info`).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::stdout().is_terminal());
    let json = std::env::var("LOG_FORMAT").map(|v| v == "json").unwrap_or(false);
    let result = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
    // A second init (tests spawning several apps) is harmless.
    let _ = result;
}
