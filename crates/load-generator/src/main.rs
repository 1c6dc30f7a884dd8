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
            if r.dlq_read {
                let dead: usize = r.dead_lettered.values().sum();
                println!(
                    "accounted: acknowledged_sends={} stored_once={} dropped_as_duplicates={} dead_lettered={dead}",
                    r.acknowledged,
                    r.expected - r.missing - dead,
                    r.dropped_duplicates
                );
                for (why, n) in &r.dead_lettered {
                    println!("dead-lettered: {n} {why}");
                }
                for (why, n) in &r.resends_dead_lettered {
                    println!("resend dead-lettered (its first send stored): {n} {why}");
                }
            } else {
                println!("(dead-letter topic not read: give --brokers to tell dead-lettered events from missing ones)");
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
