//! The SQLite state store (WAL, synchronous=FULL): per partition the resume offset and next
//! batch sequence, per device its watermark marks, the dedup keys, and the outbox of batches
//! built but not yet acknowledged by the sink. A checkpoint is one transaction.
//!
//! One thread owns the connection; callers send it closures and await the answer.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use rusqlite::{params, Connection};
use telemetry_core::{Changes, DeviceMark, SeenKey};
use tokio::sync::oneshot;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("state store: {0}")]
    Io(#[from] std::io::Error),
    #[error("state store thread has stopped")]
    Closed,
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A batch in the outbox: its deterministic id (`{topic}-{partition}-{seq}`, the sink's
/// Idempotency-Key), its JSON body, and the resume offset to commit once the sink has it.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxBatch {
    pub id: String,
    pub partition: i32,
    pub seq: i64,
    pub resume_offset: i64,
    pub events: usize,
    pub body: bytes::Bytes,
}

/// What a partition's state looked like at its last checkpoint.
#[derive(Debug, Default)]
pub struct PartitionState {
    pub resume_offset: Option<i64>,
    pub next_seq: i64,
    pub marks: Vec<(String, DeviceMark)>,
    pub keys: Vec<SeenKey>,
}

/// One checkpoint of one partition.
#[derive(Debug)]
pub struct Checkpoint {
    pub partition: i32,
    pub batches: Vec<OutboxBatch>,
    pub changes: Changes,
    pub resume_offset: i64,
    pub next_seq: i64,
}

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

/// Handle to the state store; cheap to clone.
#[derive(Debug, Clone)]
pub struct StateStore {
    jobs: std::sync::mpsc::Sender<Job>,
    topic: String,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS partitions (
    topic TEXT NOT NULL, partition INTEGER NOT NULL,
    resume_offset INTEGER NOT NULL, next_seq INTEGER NOT NULL,
    PRIMARY KEY (topic, partition)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS devices (
    topic TEXT NOT NULL, partition INTEGER NOT NULL, device_id TEXT NOT NULL,
    max_ts INTEGER NOT NULL, released_max INTEGER NOT NULL,
    PRIMARY KEY (topic, partition, device_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dedup_keys (
    topic TEXT NOT NULL, partition INTEGER NOT NULL, device_id TEXT NOT NULL, ts INTEGER NOT NULL,
    latitude_bits INTEGER NOT NULL, longitude_bits INTEGER NOT NULL,
    PRIMARY KEY (topic, partition, device_id, ts)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outbox (
    id TEXT PRIMARY KEY, topic TEXT NOT NULL, partition INTEGER NOT NULL, seq INTEGER NOT NULL,
    resume_offset INTEGER NOT NULL, events INTEGER NOT NULL, body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_order ON outbox (topic, partition, seq);
";

impl StateStore {
    /// Opens (creating the file, its directory and the schema) the store for `topic`.
    pub fn open(path: &Path, topic: &str) -> Result<StateStore> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let mut conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        conn.set_prepared_statement_cache_capacity(32);
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("state-store".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    job(&mut conn);
                }
            })?;
        Ok(StateStore {
            jobs: tx,
            topic: topic.to_owned(),
        })
    }

    async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Box::new(move |conn| {
                let _ = tx.send(f(conn));
            }))
            .map_err(|_| StoreError::Closed)?;
        Ok(rx.await.map_err(|_| StoreError::Closed)??)
    }

    /// Resume offsets of every partition with a checkpoint.
    pub async fn resume_offsets(&self) -> Result<HashMap<i32, i64>> {
        let topic = self.topic.clone();
        self.call(move |c| {
            let mut stmt = c.prepare("SELECT partition, resume_offset FROM partitions WHERE topic = ?1")?;
            let rows = stmt.query_map([topic], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })
        .await
    }

    /// The state of one partition as its last checkpoint left it.
    pub async fn load_partition(&self, partition: i32) -> Result<PartitionState> {
        let topic = self.topic.clone();
        self.call(move |c| {
            let mut state = PartitionState::default();
            let row: Option<(i64, i64)> = c
                .query_row(
                    "SELECT resume_offset, next_seq FROM partitions WHERE topic = ?1 AND partition = ?2",
                    params![topic, partition],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .map(Some)
                .or_else(|e| if e == rusqlite::Error::QueryReturnedNoRows { Ok(None) } else { Err(e) })?;
            if let Some((resume, seq)) = row {
                state.resume_offset = Some(resume);
                state.next_seq = seq;
            }
            let mut stmt =
                c.prepare("SELECT device_id, max_ts, released_max FROM devices WHERE topic = ?1 AND partition = ?2")?;
            state.marks = stmt
                .query_map(params![topic, partition], |r| {
                    Ok((r.get(0)?, DeviceMark { max_ts: r.get(1)?, released_max: r.get(2)? }))
                })?
                .collect::<rusqlite::Result<_>>()?;
            let mut stmt = c.prepare(
                "SELECT device_id, ts, latitude_bits, longitude_bits FROM dedup_keys WHERE topic = ?1 AND partition = ?2",
            )?;
            state.keys = stmt
                .query_map(params![topic, partition], |r| {
                    Ok(SeenKey {
                        device_id: r.get(0)?,
                        ts: r.get(1)?,
                        latitude_bits: r.get::<_, i64>(2)? as u64,
                        longitude_bits: r.get::<_, i64>(3)? as u64,
                    })
                })?
                .collect::<rusqlite::Result<_>>()?;
            Ok(state)
        })
        .await
    }

    /// Every outbox batch, per partition in sequence order.
    pub async fn outbox(&self) -> Result<Vec<OutboxBatch>> {
        let topic = self.topic.clone();
        self.call(move |c| {
            let mut stmt = c.prepare(
                "SELECT id, partition, seq, resume_offset, events, body FROM outbox WHERE topic = ?1 ORDER BY partition, seq",
            )?;
            let rows = stmt.query_map([topic], |r| {
                Ok(OutboxBatch {
                    id: r.get(0)?,
                    partition: r.get(1)?,
                    seq: r.get(2)?,
                    resume_offset: r.get(3)?,
                    events: r.get::<_, i64>(4)? as usize,
                    body: bytes::Bytes::from(r.get::<_, Vec<u8>>(5)?),
                })
            })?;
            rows.collect()
        })
        .await
    }

    /// Writes one checkpoint in one transaction; returns how long it took.
    pub async fn checkpoint(&self, cp: Checkpoint) -> Result<f64> {
        let (tx, rx) = oneshot::channel();
        self.checkpoint_then(cp, move |r| {
            let _ = tx.send(r);
        })?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Queues one checkpoint; `then` runs on the store's thread once it committed (or failed),
    /// checkpoints in the order they were queued.
    pub fn checkpoint_then(
        &self,
        cp: Checkpoint,
        then: impl FnOnce(Result<f64>) + Send + 'static,
    ) -> Result<()> {
        let topic = self.topic.clone();
        self.jobs
            .send(Box::new(move |c| {
                then(write_checkpoint(c, &topic, cp).map_err(StoreError::from))
            }))
            .map_err(|_| StoreError::Closed)
    }

    /// Removes a batch the sink acknowledged.
    pub async fn remove_outbox(&self, id: String) -> Result<()> {
        self.call(move |c| c.execute("DELETE FROM outbox WHERE id = ?1", [id]).map(|_| ()))
            .await
    }
}

fn write_checkpoint(c: &mut Connection, topic: &str, cp: Checkpoint) -> rusqlite::Result<f64> {
    let start = Instant::now();
    let tx = c.transaction()?;
    {
        let p = cp.partition;
        let mut put_batch = tx.prepare_cached(
            "INSERT INTO outbox (id, topic, partition, seq, resume_offset, events, body) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?;
        for b in &cp.batches {
            put_batch.execute(params![
                b.id,
                topic,
                p,
                b.seq,
                b.resume_offset,
                b.events as i64,
                &b.body[..]
            ])?;
        }
        let mut put_mark = tx.prepare_cached(
            "INSERT INTO devices (topic, partition, device_id, max_ts, released_max) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (topic, partition, device_id) DO UPDATE SET max_ts = excluded.max_ts, released_max = excluded.released_max",
        )?;
        for (device, mark) in &cp.changes.devices {
            put_mark.execute(params![topic, p, device, mark.max_ts, mark.released_max])?;
        }
        let mut put_key = tx.prepare_cached(
            "INSERT OR REPLACE INTO dedup_keys (topic, partition, device_id, ts, latitude_bits, longitude_bits) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?;
        for k in &cp.changes.new_keys {
            put_key.execute(params![
                topic,
                p,
                k.device_id,
                k.ts,
                k.latitude_bits as i64,
                k.longitude_bits as i64
            ])?;
        }
        let mut prune = tx.prepare_cached(
            "DELETE FROM dedup_keys WHERE topic = ?1 AND partition = ?2 AND device_id = ?3 AND ts < ?4",
        )?;
        for (device, below) in &cp.changes.pruned {
            prune.execute(params![topic, p, device, below])?;
        }
        tx.prepare_cached(
            "INSERT INTO partitions (topic, partition, resume_offset, next_seq) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (topic, partition) DO UPDATE SET resume_offset = excluded.resume_offset, next_seq = excluded.next_seq",
        )?
        .execute(params![topic, p, cp.resume_offset, cp.next_seq])?;
    }
    tx.commit()?;
    Ok(start.elapsed().as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(seq: i64) -> OutboxBatch {
        OutboxBatch {
            id: format!("t-0-{seq}"),
            partition: 0,
            seq,
            resume_offset: seq * 10,
            events: 1,
            body: bytes::Bytes::from_static(b"[]"),
        }
    }

    #[tokio::test]
    async fn checkpoint_is_read_back_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        {
            let store = StateStore::open(&path, "t").unwrap();
            let changes = Changes {
                devices: vec![(
                    "d".into(),
                    DeviceMark {
                        max_ts: 50,
                        released_max: 40,
                    },
                )],
                new_keys: vec![
                    SeenKey {
                        device_id: "d".into(),
                        ts: 10,
                        latitude_bits: 1,
                        longitude_bits: u64::MAX,
                    },
                    SeenKey {
                        device_id: "d".into(),
                        ts: 40,
                        latitude_bits: 1,
                        longitude_bits: 2,
                    },
                ],
                pruned: vec![],
            };
            store
                .checkpoint(Checkpoint {
                    partition: 0,
                    batches: vec![batch(0), batch(1)],
                    changes,
                    resume_offset: 7,
                    next_seq: 2,
                })
                .await
                .unwrap();
            let prune = Changes {
                pruned: vec![("d".into(), 20)],
                ..Changes::default()
            };
            store
                .checkpoint(Checkpoint {
                    partition: 0,
                    batches: vec![],
                    changes: prune,
                    resume_offset: 9,
                    next_seq: 2,
                })
                .await
                .unwrap();
            store.remove_outbox("t-0-0".into()).await.unwrap();
        }
        let store = StateStore::open(&path, "t").unwrap();
        assert_eq!(store.resume_offsets().await.unwrap(), HashMap::from([(0, 9)]));
        let state = store.load_partition(0).await.unwrap();
        assert_eq!(state.next_seq, 2);
        assert_eq!(
            state.marks,
            vec![(
                "d".to_owned(),
                DeviceMark {
                    max_ts: 50,
                    released_max: 40
                }
            )]
        );
        assert_eq!(state.keys.iter().map(|k| k.ts).collect::<Vec<_>>(), vec![40]);
        let outbox = store.outbox().await.unwrap();
        assert_eq!(outbox, vec![batch(1)]);
        assert!(store.load_partition(3).await.unwrap().resume_offset.is_none());
    }

    #[tokio::test]
    async fn many_keys_are_written_in_multi_row_inserts_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(&dir.path().join("s.db"), "t").unwrap();
        let keys: Vec<SeenKey> = (0..150)
            .map(|ts| SeenKey {
                device_id: format!("d{}", ts % 7),
                ts,
                latitude_bits: ts as u64,
                longitude_bits: !(ts as u64),
            })
            .collect();
        let changes = Changes {
            new_keys: keys.clone(),
            ..Changes::default()
        };
        store
            .checkpoint(Checkpoint {
                partition: 2,
                batches: vec![],
                changes,
                resume_offset: 150,
                next_seq: 0,
            })
            .await
            .unwrap();
        let mut back = store.load_partition(2).await.unwrap().keys;
        back.sort_by_key(|k| k.ts);
        assert_eq!(back, keys);
    }
}
