//! Building and running the ingest-proxy application.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::publisher::Publisher;
use crate::routes::{router, AppState};
use crate::Settings;

/// A bound, ready-to-run ingest-proxy.
#[derive(Debug)]
pub struct Application {
    listener: TcpListener,
    state: AppState,
}

impl Application {
    /// Creates the producer and binds the port (port 0 picks a free one). The topic is created
    /// and the broker watched in the background, so the proxy starts even before the broker.
    pub async fn build(settings: Settings) -> anyhow::Result<Application> {
        settings.kafka.validate().map_err(anyhow::Error::msg)?;
        let publisher = Arc::new(Publisher::new(&settings)?);
        let listener = settings.http.bind().await?;
        let _ = service_common::metrics_handle();
        crate::metrics::init();
        let ready = Arc::new(AtomicBool::new(false));
        let settings = Arc::new(settings);
        tokio::spawn(watch_broker(
            Arc::clone(&publisher),
            Arc::clone(&settings),
            Arc::clone(&ready),
        ));
        tracing::info!(
            addr = %listener.local_addr()?,
            brokers = %settings.kafka.brokers,
            security_protocol = settings.kafka.security_protocol.as_str(),
            topic = %settings.kafka.topic,
            "ingest-proxy listening"
        );
        Ok(Application {
            listener,
            state: AppState::new(publisher, settings, ready),
        })
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// Serves until `shutdown` resolves; in-flight requests finish (their events acknowledged or
    /// answered 503), then the producer is flushed.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let publisher = Arc::clone(&self.state.publisher);
        let settings = Arc::clone(&self.state.settings);
        settings
            .http
            .serve(self.listener, router(self.state), shutdown)
            .await?;
        let flush_for = Duration::from_millis(settings.produce_timeout_ms);
        tokio::task::spawn_blocking(move || publisher.flush(flush_for))
            .await
            .ok();
        tracing::info!("ingest-proxy stopped");
        Ok(())
    }
}

/// Creates the topic once the broker answers, then keeps `ready` up to date.
async fn watch_broker(publisher: Arc<Publisher>, settings: Arc<Settings>, ready: Arc<AtomicBool>) {
    service_common::kafka::ensure_shared_topic(
        &settings.kafka,
        publisher.connection(),
        &settings.kafka.topic,
    )
    .await;
    let interval = Duration::from_millis(settings.ready_check_interval_ms);
    loop {
        let p = Arc::clone(&publisher);
        let check_timeout = interval.max(Duration::from_millis(500));
        let up = tokio::task::spawn_blocking(move || {
            p.heal();
            p.broker_reachable(check_timeout)
        })
        .await
        .unwrap_or(false);
        if ready.swap(up, Ordering::Relaxed) != up {
            if up {
                tracing::info!("broker reachable, ready");
            } else {
                tracing::warn!("broker unreachable, not ready");
            }
        }
        crate::metrics::broker_up(up);
        tokio::time::sleep(interval).await;
    }
}
