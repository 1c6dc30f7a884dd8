//! The SQLite store: one writer thread that owns the write connection and commits concurrent
//! requests together (one fsync for many batches, each in its own savepoint so they stay all
//! or nothing), and a read connection for queries. WAL mode lets reads run beside writes.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension};

use telemetry_core::Event;
use tokio::sync::{mpsc, oneshot};

/// How many queued write requests one transaction may take.
const MAX_GROUP: usize = 64;

/// Store errors; all but `KeyReused` and `TooLarge` are the server's fault.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("idempotency key was already used with a different body")]
    KeyReused,
    #[error("batch has {len} events, the limit is {max}")]
    TooLarge { len: usize, max: usize },
    #[error("store writer has stopped")]
    Closed,
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// SQLite's `synchronous` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Synchronous {
    Off,
    Normal,
    Full,
    Extra,
}

impl Synchronous {
    pub fn pragma(self) -> &'static str {
        match self {
            Synchronous::Off => "OFF",
            Synchronous::Normal => "NORMAL",
            Synchronous::Full => "FULL",
            Synchronous::Extra => "EXTRA",
        }
    }
}

pub use telemetry_core::StoredEvent;

/// The answer to a batch insert, kept with its idempotency key so a replay answers the same.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchReceipt {
    pub status: u16,
    pub body: String,
    pub replayed: bool,
}

/// An idempotency key and the SHA-256 of the body it first came with.
#[derive(Debug, Clone)]
pub struct IdempotencyKey {
    pub key: String,
    pub body_hash: [u8; 32],
}

enum WriteOp {
    One {
        event: Event,
        reply: oneshot::Sender<Result<StoredEvent>>,
    },
    Batch {
        events: Vec<Event>,
        key: Option<IdempotencyKey>,
        max_len: usize,
        reply: oneshot::Sender<Result<BatchReceipt>>,
    },
}

/// Handle to the store; cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    writer: mpsc::Sender<WriteOp>,
    reader: Arc<Mutex<Connection>>,
    path: PathBuf,
}

impl std::fmt::Debug for WriteOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WriteOp::One { .. } => f.write_str("WriteOp::One"),
            WriteOp::Batch { events, .. } => write!(f, "WriteOp::Batch({})", events.len()),
        }
    }
}

/// The tables of the events database.
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id   TEXT    NOT NULL,
    ts          INTEGER NOT NULL,
    latitude    REAL    NOT NULL,
    longitude   REAL    NOT NULL,
    received_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS idempotency_keys (
    key         TEXT PRIMARY KEY,
    body_sha256 BLOB    NOT NULL,
    status      INTEGER NOT NULL,
    response    TEXT    NOT NULL,
    created_at  INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS idempotency_keys_created ON idempotency_keys (created_at);
-- The number of rows in `events`, kept in each insert's transaction (the service never deletes
-- events), so a page never counts the table. A database from before it is counted once here.
CREATE TABLE IF NOT EXISTS event_count (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    total INTEGER NOT NULL
);
INSERT OR IGNORE INTO event_count (id, total) SELECT 1, COUNT(*) FROM events;
";

/// Opens a connection with the pragmas every connection of this store uses.
pub fn open_connection(path: &Path, synchronous: Synchronous) -> Result<Connection> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", synchronous.pragma())?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(conn)
}

impl Store {
    /// Opens (creating the file, its directory and the schema as needed) and starts the writer.
    pub fn open(path: &Path, synchronous: Synchronous) -> Result<Store> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let writer_conn = open_connection(path, synchronous)?;
        writer_conn.execute_batch(SCHEMA)?;
        let reader = open_connection(path, synchronous)?;
        let (tx, rx) = mpsc::channel(1024);
        std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || writer_loop(writer_conn, rx))?;
        Ok(Store {
            writer: tx,
            reader: Arc::new(Mutex::new(reader)),
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stores one event; returns it with its id.
    pub async fn insert_one(&self, event: Event) -> Result<StoredEvent> {
        let (reply, rx) = oneshot::channel();
        self.writer
            .send(WriteOp::One { event, reply })
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Stores a batch of at most `max_len` events in one transaction, or replays the answer of
    /// an applied key. A replay is answered whatever the batch's length: a batch stored before
    /// the limit was lowered is acknowledged again, not refused (a client that split it on a
    /// refusal would store its events twice).
    pub async fn insert_batch(
        &self,
        events: Vec<Event>,
        key: Option<IdempotencyKey>,
        max_len: usize,
    ) -> Result<BatchReceipt> {
        let (reply, rx) = oneshot::channel();
        self.writer
            .send(WriteOp::Batch {
                events,
                key,
                max_len,
                reply,
            })
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// One page of stored events in insertion order, and the total count. Pages cost the same
    /// at any depth: the count is kept by the inserts, and since ids run from 1 without gaps
    /// (events are never deleted; checked on each read), page N is an id range. A database
    /// whose ids have gaps (rows deleted by hand) is served with `OFFSET` instead.
    pub async fn page(&self, page: u64, size: u64) -> Result<Page> {
        self.read(move |tx, total, max_id| {
            let skip = (page - 1).saturating_mul(size).min(i64::MAX as u64) as i64;
            if max_id == total {
                select_after(tx, skip, size)
            } else {
                let mut stmt =
                    tx.prepare_cached(&format!("{SELECT_EVENTS} ORDER BY id LIMIT ?1 OFFSET ?2"))?;
                let rows = stmt.query_map(params![size as i64, skip], stored_event)?;
                rows.collect()
            }
        })
        .await
    }

    /// Up to `size` events with ids above `after`, in insertion order, and the total count:
    /// the keyset form of [`Store::page`], constant time at any depth whatever the ids.
    pub async fn after(&self, after: i64, size: u64) -> Result<Page> {
        self.read(move |tx, _, _| select_after(tx, after, size)).await
    }

    /// Runs `rows` in one read snapshot with the row count and the largest id.
    async fn read(
        &self,
        rows: impl FnOnce(&Connection, i64, i64) -> rusqlite::Result<Vec<StoredEvent>> + Send + 'static,
    ) -> Result<Page> {
        let reader = Arc::clone(&self.reader);
        tokio::task::spawn_blocking(move || {
            let conn = reader.lock().unwrap_or_else(|p| p.into_inner());
            let tx = conn.unchecked_transaction()?; // one snapshot for rows and count
            let total: i64 = tx.query_row("SELECT total FROM event_count WHERE id = 1", [], |r| r.get(0))?;
            let max_id: i64 = tx.query_row("SELECT COALESCE(MAX(id), 0) FROM events", [], |r| r.get(0))?;
            let data = rows(&tx, total, max_id)?;
            tx.finish()?;
            let more = data.last().is_some_and(|e| e.id < max_id);
            Ok(Page {
                total: total as u64,
                next: if more { data.last().map(|e| e.id) } else { None },
                data,
            })
        })
        .await
        .map_err(|_| StoreError::Closed)?
    }

    /// True when the database answers a trivial query.
    pub async fn ping(&self) -> bool {
        let reader = Arc::clone(&self.reader);
        tokio::task::spawn_blocking(move || {
            let conn = reader.lock().unwrap_or_else(|p| p.into_inner());
            conn.query_row("SELECT 1", [], |r| r.get::<_, i64>(0)).is_ok()
        })
        .await
        .unwrap_or(false)
    }
}

/// A read of stored events.
#[derive(Debug)]
pub struct Page {
    pub data: Vec<StoredEvent>,
    /// Rows in the table.
    pub total: u64,
    /// The id to read after for the next page; `None` when this page reaches the last row.
    pub next: Option<i64>,
}

const SELECT_EVENTS: &str = "SELECT id, device_id, ts, latitude, longitude, received_at FROM events";

fn stored_event(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredEvent> {
    Ok(StoredEvent {
        id: r.get(0)?,
        event: Event {
            device_id: r.get(1)?,
            ts: r.get(2)?,
            latitude: r.get(3)?,
            longitude: r.get(4)?,
        },
        received_at: r.get(5)?,
    })
}

fn select_after(tx: &Connection, after: i64, size: u64) -> rusqlite::Result<Vec<StoredEvent>> {
    let mut stmt = tx.prepare_cached(&format!("{SELECT_EVENTS} WHERE id > ?1 ORDER BY id LIMIT ?2"))?;
    let rows = stmt.query_map(params![after, size as i64], stored_event)?;
    rows.collect()
}

/// Keys deleted per pruning transaction: each holds the write lock for a few milliseconds, so
/// inserts never wait long behind it.
const PRUNE_CHUNK: i64 = 2_000;

/// Deletes idempotency keys older than `retention`, every `interval`, in small transactions on
/// a connection of its own, until the process ends. A batch resent after its key expired is
/// stored again, so the retention must outlast any resend (see README).
pub fn spawn_key_pruner(
    path: &Path,
    synchronous: Synchronous,
    retention: std::time::Duration,
    interval: std::time::Duration,
) -> Result<()> {
    let conn = open_connection(path, synchronous)?;
    std::thread::Builder::new()
        .name("key-pruner".into())
        .spawn(move || loop {
            std::thread::sleep(interval);
            let before = now_ms() - retention.as_millis() as i64;
            let mut pruned = 0usize;
            loop {
                match conn.execute(
                    "DELETE FROM idempotency_keys WHERE rowid IN
                     (SELECT rowid FROM idempotency_keys WHERE created_at < ?1 LIMIT ?2)",
                    params![before, PRUNE_CHUNK],
                ) {
                    Ok(0) => break,
                    Ok(n) => {
                        pruned += n;
                        std::thread::yield_now();
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "pruning expired idempotency keys failed; retried later");
                        break;
                    }
                }
            }
            if pruned > 0 {
                crate::metrics::keys_pruned(pruned);
                tracing::info!(pruned, "expired idempotency keys deleted");
            }
        })?;
    Ok(())
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Inserts rows with one prepared statement and adds them to the row count; returns the first
/// and last ids.
pub fn insert_rows(
    tx: &Connection,
    events: &[Event],
    received_at: i64,
) -> rusqlite::Result<Option<(i64, i64)>> {
    let mut stmt = tx.prepare_cached(
        "INSERT INTO events (device_id, ts, latitude, longitude, received_at) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    let mut first = None;
    let mut last = 0;
    for e in events {
        stmt.execute(params![e.device_id, e.ts, e.latitude, e.longitude, received_at])?;
        last = tx.last_insert_rowid();
        first.get_or_insert(last);
    }
    if !events.is_empty() {
        tx.prepare_cached("UPDATE event_count SET total = total + ?1 WHERE id = 1")?
            .execute([events.len() as i64])?;
    }
    Ok(first.map(|f| (f, last)))
}

fn apply_batch(
    tx: &Connection,
    events: &[Event],
    key: Option<&IdempotencyKey>,
    max_len: usize,
    now: i64,
) -> Result<BatchReceipt> {
    if let Some(k) = key {
        let found: Option<(Vec<u8>, u16, String)> = tx
            .prepare_cached("SELECT body_sha256, status, response FROM idempotency_keys WHERE key = ?1")?
            .query_row([&k.key], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .optional()?;
        if let Some((hash, status, body)) = found {
            if hash != k.body_hash {
                return Err(StoreError::KeyReused);
            }
            return Ok(BatchReceipt {
                status,
                body,
                replayed: true,
            });
        }
    }
    if events.len() > max_len {
        return Err(StoreError::TooLarge {
            len: events.len(),
            max: max_len,
        });
    }
    let ids = insert_rows(tx, events, now)?;
    let body = serde_json::json!({
        "inserted": events.len(),
        "firstId": ids.map(|i| i.0),
        "lastId": ids.map(|i| i.1),
    })
    .to_string();
    if let Some(k) = key {
        tx.prepare_cached(
            "INSERT INTO idempotency_keys (key, body_sha256, status, response, created_at) VALUES (?1, ?2, 201, ?3, ?4)",
        )?
        .execute(params![k.key, &k.body_hash[..], body, now])?;
    }
    Ok(BatchReceipt {
        status: 201,
        body,
        replayed: false,
    })
}

fn apply_one(tx: &Connection, event: Event, now: i64) -> Result<StoredEvent> {
    let (id, _) = insert_rows(tx, std::slice::from_ref(&event), now)?.expect("one row was inserted");
    Ok(StoredEvent {
        id,
        event,
        received_at: now,
    })
}

enum Done {
    One(oneshot::Sender<Result<StoredEvent>>, Result<StoredEvent>),
    Batch(oneshot::Sender<Result<BatchReceipt>>, Result<BatchReceipt>, usize),
}

fn writer_loop(mut conn: Connection, mut rx: mpsc::Receiver<WriteOp>) {
    let mut ops = Vec::with_capacity(MAX_GROUP);
    while let Some(first) = rx.blocking_recv() {
        ops.push(first);
        while ops.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(op) => ops.push(op),
                Err(_) => break,
            }
        }
        let start = Instant::now();
        let now = now_ms();
        let mut done = Vec::with_capacity(ops.len());
        let committed = (|| -> rusqlite::Result<()> {
            let mut tx = conn.transaction()?;
            for op in ops.drain(..) {
                // Each request in its own savepoint: one failing request leaves the others.
                let mut sp = tx.savepoint()?;
                let outcome = match op {
                    WriteOp::One { event, reply } => {
                        let r = apply_one(&sp, event, now);
                        Done::One(reply, r)
                    }
                    WriteOp::Batch {
                        events,
                        key,
                        max_len,
                        reply,
                    } => {
                        let r = apply_batch(&sp, &events, key.as_ref(), max_len, now);
                        Done::Batch(reply, r, events.len())
                    }
                };
                let ok = match &outcome {
                    Done::One(_, r) => r.is_ok(),
                    Done::Batch(_, r, _) => r.is_ok(),
                };
                if ok {
                    sp.commit()?;
                } else {
                    sp.rollback()?;
                }
                done.push(outcome);
            }
            tx.commit()
        })();
        let elapsed = start.elapsed().as_secs_f64();
        crate::metrics::commit(elapsed, done.len());
        for d in done {
            match d {
                Done::One(reply, r) => {
                    let r = match (&committed, r) {
                        (Ok(()), r) => {
                            if r.is_ok() {
                                crate::metrics::rows_inserted(1);
                            }
                            r
                        }
                        (Err(e), _) => Err(StoreError::Sqlite(clone_err(e))),
                    };
                    let _ = reply.send(r);
                }
                Done::Batch(reply, r, n) => {
                    let r = match (&committed, r) {
                        (Ok(()), r) => {
                            if let Ok(receipt) = &r {
                                crate::metrics::batch(receipt.replayed, if receipt.replayed { 0 } else { n });
                            }
                            r
                        }
                        (Err(e), _) => Err(StoreError::Sqlite(clone_err(e))),
                    };
                    let _ = reply.send(r);
                }
            }
        }
        if let Err(e) = committed {
            tracing::error!(error = %e, "sqlite commit failed; the group's requests were answered with 500");
        }
    }
}

fn clone_err(e: &rusqlite::Error) -> rusqlite::Error {
    rusqlite::Error::ToSqlConversionFailure(e.to_string().into())
}
