//! Building and running the ingest-api application.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::routes::{router, AppState};
use crate::store::Store;
use crate::Settings;

/// A bound, ready-to-run ingest-api.
#[derive(Debug)]
pub struct Application {
    listener: TcpListener,
    state: AppState,
}

impl Application {
    /// Opens the database and binds the port (port 0 picks a free one).
    pub async fn build(settings: Settings) -> std::io::Result<Application> {
        let store = Store::open(&settings.database_path, settings.sqlite_synchronous).map_err(|e| {
            std::io::Error::other(format!("opening {}: {e}", settings.database_path.display()))
        })?;
        crate::store::spawn_key_pruner(
            &settings.database_path,
            settings.sqlite_synchronous,
            Duration::from_millis(settings.idempotency_retention_ms),
            Duration::from_millis(settings.idempotency_prune_interval_ms.max(1)),
        )
        .map_err(|e| std::io::Error::other(format!("starting the key pruner: {e}")))?;
        let listener = settings.http.bind().await?;
        // Make the metric families exist from the start.
        let _ = service_common::metrics_handle();
        crate::metrics::init();
        tracing::info!(
            addr = %listener.local_addr()?,
            database = %settings.database_path.display(),
            synchronous = settings.sqlite_synchronous.pragma(),
            "ingest-api listening"
        );
        Ok(Application {
            listener,
            state: AppState {
                store,
                settings: Arc::new(settings),
            },
        })
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    pub fn store(&self) -> &Store {
        &self.state.store
    }

    /// Serves until `shutdown` resolves, then finishes in-flight requests.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let settings = Arc::clone(&self.state.settings);
        settings
            .http
            .serve(self.listener, router(self.state), shutdown)
            .await?;
        tracing::info!("ingest-api stopped");
        Ok(())
    }
}
