use clap::Parser;
use load_generator::config::{Cli, Command};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Verify(v)) => {
            let r = load_generator::verify::verify(&v).await?;
            println!(
                "verify: expected={} stored={} missing={} duplicated={} out_of_order={} unexpected={}",
                r.expected, r.stored, r.missing, r.duplicated, r.out_of_order, r.unexpected
            );
            if let Some((p50, p99, max)) = r.latency_ms {
                println!("latency_ms p50={p50} p99={p99} max={max}");
            }
            if !r.clean() {
                std::process::exit(1);
            }
        }
        None => {
            let summary = load_generator::run::run(cli.load).await?;
            if summary.refused > 0 {
                std::process::exit(1);
            }
        }
    }
    Ok(())
}
