//! The honest ceiling for scripts/bench-proxy: the cheapest HTTP -> broker program, with the
//! proxy's own producer settings (`producer_config`: idempotent, acks=all, murmur2, the same
//! linger and batch size). `POST /event` parses the event for its key, produces it, awaits the
//! broker's acknowledgement and answers 202; nothing else (no in-flight bound, no metrics, no
//! validation errors beyond the parse, no middleware).
//!
//! Environment: PORT (default 4002) and the proxy's variables (KAFKA_BROKERS, KAFKA_TOPIC,
//! PRODUCER_LINGER_MS, ...).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::Router;
use clap::Parser;
use ingest_proxy::publisher::producer_config;
use ingest_proxy::Settings;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use telemetry_core::Event;

/// The proxy's allocator, so the comparison is like with like.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Ceiling {
    producer: FutureProducer,
    topic: String,
}

async fn post_event(State(c): State<Arc<Ceiling>>, body: Bytes) -> StatusCode {
    let Ok(event) = Event::from_json(&body) else {
        return StatusCode::BAD_REQUEST;
    };
    let record = FutureRecord::to(&c.topic)
        .key(event.device_id.as_bytes())
        .payload(&body[..]);
    match c.producer.send(record, Timeout::Never).await {
        Ok(_) => StatusCode::ACCEPTED,
        Err(_) => StatusCode::SERVICE_UNAVAILABLE,
    }
}

#[tokio::main]
async fn main() {
    let settings = Settings::parse_from(["produce-ceiling"]);
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(4002);
    // The topic as the proxy creates it (the benchmark gives each program a fresh broker).
    let conn = settings.kafka.connection().expect("connection settings");
    service_common::kafka::ensure_shared_topic(&settings.kafka, &conn, &settings.kafka.topic).await;
    let producer: FutureProducer = producer_config(&settings, &conn).create().expect("producer");
    let state = Arc::new(Ceiling {
        producer,
        topic: settings.kafka.topic.clone(),
    });
    let app = Router::new().route("/event", post(post_event)).with_state(state);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind");
    axum::serve(listener, app).await.expect("serve");
}
