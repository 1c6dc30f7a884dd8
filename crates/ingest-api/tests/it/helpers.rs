//! Test helpers: `spawn_app` (the application on port 0 with a SQLite file of its own, served
//! over real HTTP), `route_app` (its router alone, called with `oneshot`), and event builders.

use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Body;
use axum::http::StatusCode;
use axum::Router;
use ingest_api::routes::{router, AppState};
use ingest_api::store::Store;
use ingest_api::{Application, Settings};
use load_generator::events::EventsClient;
use serde_json::{json, Value};
use telemetry_core::StoredEvent;
use test_support::oneshot::{self, Answer};

pub(crate) struct TestApp {
    pub(crate) base: String,
    pub(crate) port: u16,
    pub(crate) client: reqwest::Client,
    pub(crate) db: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    _dir: Option<tempfile::TempDir>,
}

impl TestApp {
    pub(crate) async fn post_json(&self, path: &str, body: impl Into<reqwest::Body>) -> reqwest::Response {
        self.client
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("request failed")
    }

    pub(crate) async fn post_batch(&self, key: Option<&str>, body: String) -> reqwest::Response {
        let mut req = self
            .client
            .post(format!("{}/events/batch", self.base))
            .header("content-type", "application/json")
            .body(body);
        if let Some(k) = key {
            req = req.header("Idempotency-Key", k);
        }
        req.send().await.expect("request failed")
    }

    pub(crate) async fn get(&self, path_and_query: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path_and_query}", self.base))
            .send()
            .await
            .expect("request failed")
    }

    /// Every stored event, read through `GET /events` with the shared typed client.
    pub(crate) async fn all_events(&self) -> Vec<StoredEvent> {
        EventsClient::new(&self.base)
            .all()
            .await
            .expect("read every stored event")
    }

    pub(crate) async fn get_json(&self, path_and_query: &str) -> Value {
        self.get(path_and_query).await.json().await.expect("a JSON body")
    }

    pub(crate) async fn total(&self) -> u64 {
        let body: Value = self.get_json("/events?size=1").await;
        body["total"].as_u64().expect("total is a count")
    }

    /// Stops the server and waits until it has let go of the database.
    pub(crate) async fn stop(mut self) -> (PathBuf, Option<tempfile::TempDir>) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.expect("the task ran to its end");
        }
        (self.db.clone(), self._dir.take())
    }
}

/// The application on port 0 with the database at `db` (kept by `dir`, when given).
pub(crate) async fn spawn_app_at(
    db: PathBuf,
    dir: Option<tempfile::TempDir>,
    tweak: impl FnOnce(&mut Settings),
) -> TestApp {
    let mut settings = Settings::for_tests(db.clone());
    tweak(&mut settings);
    let app = Application::build(settings).await.expect("app builds");
    let port = app.port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        app.run_until_stopped(async {
            let _ = stopped.await;
        })
        .await
        .expect("the server stops cleanly");
    });
    TestApp {
        base: format!("http://127.0.0.1:{port}"),
        port,
        client: reqwest::Client::new(),
        db,
        stop: Some(stop),
        task: Some(task),
        _dir: dir,
    }
}

pub(crate) async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// The application with a fresh database in a directory not created yet, with `tweak`ed settings.
pub(crate) async fn spawn_app_with(tweak: impl FnOnce(&mut Settings)) -> TestApp {
    let dir = tempfile::tempdir().expect("a temp dir");
    let db = dir.path().join("sub").join("ingest.db");
    spawn_app_at(db, Some(dir), tweak).await
}

/// ingest-api's router on a fresh database, called without a socket.
pub(crate) struct RouteApp {
    router: Router,
    _dir: tempfile::TempDir,
}

impl RouteApp {
    /// `POST path` with `content_type` (none when `None`) and an optional idempotency key.
    pub(crate) async fn post(
        &self,
        path: &str,
        content_type: Option<&str>,
        key: Option<&str>,
        body: impl Into<Body>,
    ) -> Answer {
        let headers: Vec<(&str, &str)> = [("content-type", content_type), ("idempotency-key", key)]
            .into_iter()
            .filter_map(|(name, value)| Some((name, value?)))
            .collect();
        oneshot::post(&self.router, path, &headers, body).await
    }

    pub(crate) async fn post_json(&self, path: &str, body: impl Into<Body>) -> Answer {
        self.post(path, Some("application/json"), None, body).await
    }

    pub(crate) async fn post_batch(&self, key: Option<&str>, body: String) -> Answer {
        self.post("/events/batch", Some("application/json"), key, body)
            .await
    }

    pub(crate) async fn get(&self, path_and_query: &str) -> Answer {
        oneshot::get(&self.router, path_and_query).await
    }

    pub(crate) async fn total(&self) -> u64 {
        let answer = self.get("/events?size=1").await;
        assert_eq!(answer.status, StatusCode::OK);
        answer.json()["total"].as_u64().expect("total is a count")
    }
}

pub(crate) fn route_app() -> RouteApp {
    route_app_with(|_| {})
}

pub(crate) fn route_app_with(tweak: impl FnOnce(&mut Settings)) -> RouteApp {
    let dir = tempfile::tempdir().expect("a temp dir");
    let mut settings = Settings::for_tests(dir.path().join("ingest.db"));
    tweak(&mut settings);
    let store = Store::open(&settings.database_path, settings.sqlite_synchronous).expect("the store opens");
    RouteApp {
        router: router(AppState {
            store,
            settings: Arc::new(settings),
        }),
        _dir: dir,
    }
}

pub(crate) fn event(device: &str, ts: i64) -> Value {
    json!({"deviceId": device, "ts": ts, "latitude": 37.77, "longitude": -122.41})
}

pub(crate) fn batch(device: &str, from: i64, len: i64) -> String {
    Value::Array((from..from + len).map(|ts| event(device, ts)).collect()).to_string()
}

/// The JSON error body of a response, once its status is `status` and it says it is JSON.
pub(crate) async fn error_body(resp: reqwest::Response, status: StatusCode) -> Value {
    assert_eq!(resp.status(), status, "unexpected status");
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .expect("content-type is text")
            .starts_with("application/json"),
        "error bodies are JSON"
    );
    resp.json().await.expect("a JSON body")
}
