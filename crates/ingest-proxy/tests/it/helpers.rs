//! Test helpers: `spawn_proxy` (the proxy on port 0 with a topic of its own on the test broker,
//! served over real HTTP), `route_proxy` (its router alone, called with `oneshot`), and event
//! builders.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::Router;
use ingest_proxy::publisher::Publisher;
use ingest_proxy::routes::{router, AppState};
use ingest_proxy::{Application, Settings};
use reqwest::StatusCode;
use serde_json::{json, Value};
use test_support::oneshot::{self, Answer};
use test_support::{brokers, unique};

pub(crate) struct TestProxy {
    pub(crate) base: String,
    pub(crate) port: u16,
    pub(crate) topic: String,
    pub(crate) client: reqwest::Client,
}

impl TestProxy {
    /// A proxy that is already running on `port` (a child process).
    pub(crate) fn at(port: u16, topic: &str) -> TestProxy {
        TestProxy {
            base: format!("http://127.0.0.1:{port}"),
            port,
            topic: topic.to_owned(),
            client: reqwest::Client::new(),
        }
    }

    pub(crate) async fn post(
        &self,
        path: &str,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::Response {
        self.client
            .post(format!("{}{path}", self.base))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .expect("request failed")
    }

    pub(crate) async fn post_event(&self, event: &Value) -> reqwest::Response {
        self.post("/event", "application/json", event.to_string()).await
    }

    /// `POST /event` with `Authorization: Bearer <token>`.
    pub(crate) async fn post_event_as(&self, token: &str, event: &Value) -> reqwest::Response {
        self.client
            .post(format!("{}/event", self.base))
            .bearer_auth(token)
            .json(event)
            .send()
            .await
            .expect("request failed")
    }

    pub(crate) async fn post_batch(&self, items: Vec<Value>) -> reqwest::Response {
        self.post(
            "/events/batch",
            "application/json",
            Value::Array(items).to_string(),
        )
        .await
    }

    pub(crate) async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .expect("the proxy answers")
    }

    pub(crate) async fn ready_status(&self) -> StatusCode {
        self.get("/readyz").await.status()
    }

    pub(crate) async fn wait_ready(&self, want: StatusCode, within: Duration) {
        let start = Instant::now();
        while self.ready_status().await != want {
            assert!(
                start.elapsed() < within,
                "/readyz did not turn {want} within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The proxy against `brokers`, with a topic of its own and `tweak`ed settings, once ready.
pub(crate) async fn spawn_proxy_with(brokers: &str, tweak: impl FnOnce(&mut Settings)) -> TestProxy {
    let topic = unique("proxy-test");
    let mut settings = Settings::for_tests(brokers, &topic);
    settings.ready_check_interval_ms = 200;
    tweak(&mut settings);
    let app = Application::build(settings).await.expect("proxy builds");
    let proxy = TestProxy::at(app.port(), &topic);
    tokio::spawn(app.run_until_stopped(std::future::pending()));
    proxy.wait_ready(StatusCode::OK, Duration::from_secs(30)).await;
    proxy
}

pub(crate) async fn spawn_proxy() -> TestProxy {
    spawn_proxy_with(&brokers(), |_| {}).await
}

/// The proxy's router, its producer pointed at an address where no broker listens: what these
/// tests send must be answered before anything is published.
pub(crate) struct RouteProxy {
    router: Router,
}

impl RouteProxy {
    pub(crate) async fn post(&self, path: &str, content_type: &str, body: impl Into<Body>) -> Answer {
        oneshot::post(&self.router, path, &[("content-type", content_type)], body).await
    }

    pub(crate) async fn post_json(&self, path: &str, body: impl Into<Body>) -> Answer {
        self.post(path, "application/json", body).await
    }
}

pub(crate) fn route_proxy_with(tweak: impl FnOnce(&mut Settings)) -> RouteProxy {
    let mut settings = Settings::for_tests("127.0.0.1:1", "never-written");
    settings.produce_timeout_ms = 500;
    tweak(&mut settings);
    let publisher = Publisher::new(&settings).expect("the producer is created");
    let state = AppState::new(
        Arc::new(publisher),
        Arc::new(settings),
        Arc::new(AtomicBool::new(false)),
    );
    RouteProxy {
        router: router(state),
    }
}

pub(crate) fn route_proxy() -> RouteProxy {
    route_proxy_with(|_| {})
}

pub(crate) fn event(device: &str, ts: i64) -> Value {
    json!({"deviceId": device, "ts": ts, "latitude": 37.5, "longitude": -122.25})
}
