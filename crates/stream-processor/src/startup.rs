//! Building and running the stream-processor.

use std::future::Future;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use rand::Rng;
use rdkafka::consumer::Consumer;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::admin::Health;
use crate::consumer;
use crate::pipeline::{Parts, Pipeline};
use crate::store::StateStore;
use crate::Settings;

/// How many partitions `topic` has, from the broker's metadata.
async fn partition_count(consumer: &Arc<consumer::GroupConsumer>, topic: &str) -> anyhow::Result<i32> {
    let (c, t) = (Arc::clone(consumer), topic.to_owned());
    let count = tokio::task::spawn_blocking(move || {
        c.fetch_metadata(Some(&t), Duration::from_secs(10))
            .map(|m| m.topics().first().map_or(0, |t| t.partitions().len()))
    })
    .await?
    .with_context(|| format!("reading the partition count of {topic}"))?;
    Ok(count as i32)
}

/// A ready-to-run processor: topics in place, state cache open, admin port bound, consumer
/// thread started.
#[derive(Debug)]
pub struct Application {
    pipeline: Pipeline,
    admin: TcpListener,
    health: Arc<Health>,
}

/// Input chunks waiting for the pipeline (each up to 512 messages).
const INPUT_QUEUE: usize = 16;

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Application> {
        settings.validate().map_err(anyhow::Error::msg)?;
        crate::failpoint::arm(settings.failpoint, settings.failpoint_hit);
        let _ = service_common::metrics_handle();
        crate::metrics::init();
        let cache = StateStore::open(&settings.state_path, &settings.changelog(), &settings.kafka.topic)
            .with_context(|| format!("opening state store {}", settings.state_path.display()))?;
        let conn = settings.kafka.connection().map_err(anyhow::Error::msg)?;
        service_common::kafka::ensure_shared_topic(&settings.kafka, &conn, &settings.kafka.topic).await;
        // Dead letters are kept until someone deletes them: a broker's default retention would
        // let them expire unread.
        service_common::kafka::ensure_topic_with_config_retry(
            &conn,
            &settings.dlq_topic,
            settings.kafka.partitions,
            settings.kafka.replication,
            &[("retention.ms", "-1"), ("retention.bytes", "-1")],
        )
        .await;
        let admin = TcpListener::bind((settings.admin_bind_addr.as_str(), settings.admin_port))
            .await
            .with_context(|| format!("binding admin port {}", settings.admin_port))?;
        let instance_id = settings.instance_id();
        let (inputs_tx, inputs) = mpsc::channel(INPUT_QUEUE);
        let consumer = Arc::new(
            consumer::create(
                &conn,
                &settings.group_id,
                instance_id.as_deref(),
                settings.session_timeout_ms,
                &settings.assignment_strategy,
                &settings.kafka.topic,
                inputs_tx.clone(),
            )
            .context("creating the consumer")?,
        );
        // The changelog has one partition per input partition.
        let partitions = partition_count(&consumer, &settings.kafka.topic).await?;
        let changelog = settings.changelog();
        service_common::kafka::ensure_topic_with_config_retry(
            &conn,
            &changelog,
            partitions,
            settings.kafka.replication,
            &[
                ("cleanup.policy", "delete"),
                ("retention.ms", "-1"),
                ("retention.bytes", "-1"),
                // A batch record holds a whole batch body.
                ("max.message.bytes", "16777216"),
            ],
        )
        .await;
        let changelog_partitions = partition_count(&consumer, &changelog).await?;
        if changelog_partitions < partitions {
            bail!("changelog topic {changelog} has {changelog_partitions} partitions, fewer than the {partitions} of {}", settings.kafka.topic);
        }
        let health = Arc::new(Health::default());
        let writer_prefix = format!("{:08x}", rand::rng().random::<u32>());
        let settings = Arc::new(settings);
        tracing::info!(
            brokers = %settings.kafka.brokers,
            security_protocol = settings.kafka.security_protocol.as_str(),
            topic = %settings.kafka.topic,
            changelog = %changelog,
            group = %settings.group_id,
            instance = instance_id.as_deref().unwrap_or("(dynamic)"),
            writer = %writer_prefix,
            sink = %settings.ingest_url,
            state = %settings.state_path.display(),
            admin = %admin.local_addr()?,
            "stream-processor starting"
        );
        let consumer_stop = Arc::new(AtomicBool::new(false));
        consumer::spawn(
            Arc::clone(&consumer),
            settings.kafka.topic.clone(),
            inputs_tx,
            Arc::clone(&consumer_stop),
        )
        .context("starting the consumer thread")?;
        let pipeline = Pipeline::new(Parts {
            settings,
            conn,
            consumer,
            inputs,
            consumer_stop,
            cache,
            health: Arc::clone(&health),
            writer_prefix,
        })?;
        Ok(Application {
            pipeline,
            admin,
            health,
        })
    }

    pub fn admin_port(&self) -> u16 {
        self.admin.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// Runs until `shutdown` resolves, then drains.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let admin = axum::serve(self.admin, crate::admin::router(self.health));
        tokio::spawn(async move {
            if let Err(e) = admin.await {
                tracing::warn!(error = %e, "admin server failed");
            }
        });
        self.pipeline.run(shutdown).await?;
        tracing::info!("stream-processor stopped");
        Ok(())
    }
}
