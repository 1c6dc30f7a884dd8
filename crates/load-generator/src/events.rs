//! A typed client of ingest-api's `GET /events`, reading with its keyset form (`after=`,
//! constant cost per page at any depth). `verify` and the tests of every crate read with it.

use serde::Deserialize;
use telemetry_core::StoredEvent;

/// Rows per request when reading everything (ingest-api's largest page).
pub const PAGE_SIZE: u32 = 1000;

/// One keyset page.
#[derive(Debug, Clone, Deserialize)]
pub struct Page {
    pub data: Vec<StoredEvent>,
    /// Rows in the table.
    pub total: u64,
    /// The id to read after for the next page; `None` at the end.
    pub next: Option<i64>,
}

/// The client, for one ingest-api base URL (`http://host:port`).
#[derive(Debug, Clone)]
pub struct EventsClient {
    http: reqwest::Client,
    base: String,
}

impl EventsClient {
    pub fn new(base: &str) -> EventsClient {
        EventsClient {
            http: reqwest::Client::new(),
            base: base.trim_end_matches('/').to_owned(),
        }
    }

    /// Up to `size` rows with ids above `after`.
    pub async fn after(&self, after: i64, size: u32) -> anyhow::Result<Page> {
        let url = format!("{}/events?after={after}&size={size}", self.base);
        let resp = self.http.get(&url).send().await?.error_for_status()?;
        resp.json()
            .await
            .map_err(|e| anyhow::anyhow!("{url}: not a page of events: {e}"))
    }

    /// Every stored row, in insertion order.
    pub async fn all(&self) -> anyhow::Result<Vec<StoredEvent>> {
        let mut out = Vec::new();
        let mut after = 0;
        loop {
            let page = self.after(after, PAGE_SIZE).await?;
            out.extend(page.data);
            match page.next {
                Some(next) => after = next,
                None => return Ok(out),
            }
        }
    }

    /// The number of stored rows.
    pub async fn total(&self) -> anyhow::Result<u64> {
        Ok(self.after(i64::MAX, 1).await?.total)
    }
}
