use anyhow::Context;
use stream_processor::{Application, Settings};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    service_common::init_tracing();
    let settings = <Settings as clap::Parser>::parse();
    let app = Application::build(settings)
        .await
        .context("starting stream-processor")?;
    app.run_until_stopped(service_common::shutdown_signal())
        .await
        .context("running stream-processor")
}
