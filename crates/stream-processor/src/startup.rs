//! Building and running the stream-processor.

use std::future::Future;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::pipeline::Pipeline;
use crate::store::StateStore;
use crate::Settings;

/// A ready-to-run processor: state store open, outbox queued, admin port bound.
#[derive(Debug)]
pub struct Application {
    pipeline: Pipeline,
    admin: TcpListener,
    ready: Arc<AtomicBool>,
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Application> {
        crate::failpoint::arm(settings.failpoint.as_deref(), settings.failpoint_hit)
            .map_err(anyhow::Error::msg)?;
        let _ = service_common::metrics_handle();
        crate::metrics::init();
        let store = StateStore::open(&settings.state_path, &settings.kafka_topic)
            .with_context(|| format!("opening state store {}", settings.state_path.display()))?;
        for topic in [&settings.kafka_topic, &settings.dlq_topic] {
            service_common::kafka::ensure_topic_with_retry(
                &settings.kafka_brokers,
                topic,
                settings.topic_partitions,
                1,
            )
            .await;
        }
        let admin = TcpListener::bind((settings.admin_bind_addr.as_str(), settings.admin_port))
            .await
            .with_context(|| format!("binding admin port {}", settings.admin_port))?;
        let ready = Arc::new(AtomicBool::new(false));
        let settings = Arc::new(settings);
        tracing::info!(
            brokers = %settings.kafka_brokers,
            topic = %settings.kafka_topic,
            sink = %settings.ingest_url,
            state = %settings.state_path.display(),
            admin = %admin.local_addr()?,
            "stream-processor starting"
        );
        let pipeline = Pipeline::new(Arc::clone(&settings), store, Arc::clone(&ready)).await?;
        Ok(Application {
            pipeline,
            admin,
            ready,
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
        let admin = axum::serve(self.admin, crate::admin::router(self.ready));
        tokio::spawn(async move {
            if let Err(e) = admin.await {
                tracing::error!(error = %e, "admin server failed");
            }
        });
        self.pipeline.run(shutdown).await?;
        tracing::info!("stream-processor stopped");
        Ok(())
    }
}
