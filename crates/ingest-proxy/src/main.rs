use anyhow::Context;
use clap::Parser;
use ingest_proxy::{Application, Settings};

/// mimalloc, as in the stream-processor and ingest-api.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    service_common::init_tracing();
    // Flags and environment variables; `--help` lists every one with its default.
    let settings = Settings::parse();
    let app = Application::build(settings)
        .await
        .context("starting ingest-proxy")?;
    app.run_until_stopped(service_common::shutdown_signal())
        .await
        .context("running ingest-proxy")
}
