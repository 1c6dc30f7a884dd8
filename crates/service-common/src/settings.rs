//! Settings helpers shared by the services.

use clap::Parser;

/// The broker and topic settings every Kafka service shares, flattened into its `Settings`: one
/// declaration, so the proxy and the processor cannot drift apart (both create the topics, and
/// whichever starts first decides their partitions and replication).
#[derive(Debug, Clone, clap::Args)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers, comma separated.
    #[arg(
        long = "kafka-brokers",
        env = "KAFKA_BROKERS",
        default_value = "redpanda:9092"
    )]
    pub brokers: String,
    /// The events topic.
    #[arg(long = "kafka-topic", env = "KAFKA_TOPIC", default_value = "telemetry-events")]
    pub topic: String,
    /// Partitions of the topics a service creates when they do not exist yet: the events topic,
    /// its dead-letter topic and the processor's changelog (which needs as many as the events
    /// topic has).
    #[arg(long = "topic-partitions", env = "TOPIC_PARTITIONS", default_value_t = 6)]
    pub partitions: i32,
    /// Replication factor of the topics a service creates.
    #[arg(long = "topic-replication", env = "TOPIC_REPLICATION", default_value_t = 1)]
    pub replication: i32,
}

impl KafkaArgs {
    /// Checks what a broker would refuse later, naming the variable.
    pub fn validate(&self) -> Result<(), String> {
        if self.partitions < 1 {
            return Err("TOPIC_PARTITIONS must be at least 1".into());
        }
        if self.replication < 1 {
            return Err("TOPIC_REPLICATION must be at least 1".into());
        }
        Ok(())
    }
}

/// A service's settings at their defaults, reading neither the command line nor the process
/// environment (for tests and benchmarks: a variable set in the shell cannot leak into them).
pub fn defaults<T: Parser>() -> T {
    let cmd = T::command().mut_args(|a| a.env(None::<&str>));
    let name = cmd.get_name().to_owned();
    let matches = cmd.get_matches_from([name]);
    T::from_arg_matches(&matches).expect("every setting has a default")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Parser)]
    struct Demo {
        /// Bound to PATH, which every test process has.
        #[arg(long, env = "PATH", default_value = "unset")]
        search: String,
    }

    #[test]
    fn defaults_ignore_the_environment() {
        assert_ne!(
            Demo::parse_from(["demo"]).search,
            "unset",
            "clap reads the environment"
        );
        assert_eq!(defaults::<Demo>().search, "unset", "defaults do not");
    }
}
