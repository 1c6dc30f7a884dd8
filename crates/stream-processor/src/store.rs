//! The local SQLite state store (WAL): the cache of the changelog. After each committed
//! checkpoint the same records are applied here, with the changelog position they reach, so a
//! restart on the same machine restores from this file and reads only what the changelog holds
//! beyond it. The changelog stays the truth: a lost, stale or foreign file is rebuilt from it,
//! so this file needs no fsync per checkpoint (`synchronous=NORMAL`: a power cut may only make
//! it older).
//!
//! Rows are keyed by the changelog topic and partition. One thread owns the connection;
//! callers send it jobs, in order.

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};
use telemetry_core::DeviceMark;
use tokio::sync::oneshot;

use crate::changelog::{batch_id, DecidedWith, OutboxBatch, PartitionState, Record};

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

/// The changelog position a cached state reflects: the offset and id of the last checkpoint's
/// `Commit` record, and how many changelog bytes follow the latest snapshot up to there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub offset: i64,
    pub id: String,
    pub bytes_since_snapshot: usize,
}

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

/// Handle to the state store; cheap to clone.
#[derive(Debug, Clone)]
pub struct StateStore {
    jobs: std::sync::mpsc::Sender<Job>,
    /// The changelog topic: the rows' key.
    topic: String,
    /// The input topic: batch ids are `{input}-{partition}-{seq}`.
    input_topic: String,
}

/// Layout version of the cache (`PRAGMA user_version`).
const SCHEMA_VERSION: i64 = 2;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS cached_partition (
    topic TEXT NOT NULL, partition INTEGER NOT NULL,
    resume_offset INTEGER NOT NULL, decided_offset INTEGER NOT NULL, next_seq INTEGER NOT NULL,
    changelog_offset INTEGER NOT NULL, commit_id TEXT NOT NULL, bytes_since_snapshot INTEGER NOT NULL,
    decided_lateness_ms INTEGER, decided_horizon_ms INTEGER,
    PRIMARY KEY (topic, partition)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS cached_device (
    topic TEXT NOT NULL, partition INTEGER NOT NULL, device_id TEXT NOT NULL,
    max_ts INTEGER NOT NULL, released_max INTEGER NOT NULL,
    PRIMARY KEY (topic, partition, device_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS cached_key (
    topic TEXT NOT NULL, partition INTEGER NOT NULL, device_id TEXT NOT NULL, ts INTEGER NOT NULL,
    latitude_bits INTEGER NOT NULL, longitude_bits INTEGER NOT NULL,
    PRIMARY KEY (topic, partition, device_id, ts)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS cached_outbox (
    topic TEXT NOT NULL, partition INTEGER NOT NULL, seq INTEGER NOT NULL,
    events INTEGER NOT NULL, body BLOB NOT NULL,
    PRIMARY KEY (topic, partition, seq)
) WITHOUT ROWID;
";

impl StateStore {
    /// Opens (creating the file, its directory and the schema) the store for the changelog
    /// topic `topic` of the input topic `input_topic`.
    pub fn open(path: &Path, topic: &str, input_topic: &str) -> Result<StateStore> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let mut conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // The file is a cache of the changelog: one of another layout is dropped and rebuilt.
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version != SCHEMA_VERSION {
            conn.execute_batch(
                "DROP TABLE IF EXISTS cached_partition; DROP TABLE IF EXISTS cached_device;
                 DROP TABLE IF EXISTS cached_key; DROP TABLE IF EXISTS cached_outbox;",
            )?;
            conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        }
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
            input_topic: input_topic.to_owned(),
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

    /// The cached state of one partition and the changelog position it reflects, if any.
    pub async fn load(&self, partition: i32) -> Result<Option<(PartitionState, Position)>> {
        let (topic, input) = (self.topic.clone(), self.input_topic.clone());
        self.call(move |c| load(c, &topic, &input, partition)).await
    }

    /// Applies one committed checkpoint's records (`sizes`: their encoded lengths), whose
    /// `Commit` is at `commit_offset` on the changelog, on top of the cached checkpoint `prev`
    /// (offset, id) that came before it. A delta on top of anything else (the cache missed a
    /// checkpoint: a crash between commit and cache update, a failed write) would make the
    /// cache claim a state it does not hold, so then the partition's cache is dropped instead,
    /// until the next snapshot rebuilds it. Queued; the changelog stays the truth.
    pub fn apply(
        &self,
        partition: i32,
        records: Vec<Record>,
        sizes: Vec<usize>,
        commit_offset: i64,
        prev: Option<(i64, String)>,
    ) {
        let topic = self.topic.clone();
        let job: Job = Box::new(move |c| {
            let snapshot = matches!(records.first(), Some(Record::Reset));
            let result = (|| {
                if !snapshot && cached_position(c, &topic, partition)? != prev {
                    tracing::debug!(partition, "local state cache is not at the previous checkpoint; dropped until the next snapshot");
                    return clear(c, &topic, partition);
                }
                // Pages freed by forgotten devices and replaced snapshots are reused by later
                // writes (the file itself only shrinks with VACUUM).
                apply(c, &topic, partition, &records, &sizes, commit_offset)
            })();
            if let Err(e) = result {
                tracing::warn!(partition, error = %e, "local state cache update failed; dropping it (the changelog has the state)");
                let _ = clear(c, &topic, partition);
            }
        });
        let _ = self.jobs.send(job);
    }

    /// Forgets a partition's cached state.
    pub fn clear(&self, partition: i32) {
        let topic = self.topic.clone();
        let _ = self.jobs.send(Box::new(move |c| {
            let _ = clear(c, &topic, partition);
        }));
    }

    /// Replaces the cached state of a partition (after a restore from the changelog).
    pub fn replace(&self, partition: i32, state: &PartitionState, position: &Position) {
        let records = state.to_records(&position.id);
        let sizes = vec![0; records.len()];
        let topic = self.topic.clone();
        let pos = position.clone();
        let job: Job = Box::new(move |c| {
            let r = apply(c, &topic, partition, &records, &sizes, pos.offset).and_then(|()| {
                c.execute(
                    "UPDATE cached_partition SET bytes_since_snapshot = ?3 WHERE topic = ?1 AND partition = ?2",
                    params![topic, partition, pos.bytes_since_snapshot as i64],
                )
                .map(|_| ())
            });
            if let Err(e) = r {
                tracing::warn!(partition, error = %e, "local state cache update failed");
            }
        });
        let _ = self.jobs.send(job);
    }

    /// Waits until every queued job has run.
    pub async fn sync(&self) -> Result<()> {
        self.call(|_| Ok(())).await
    }
}

fn cached_position(c: &Connection, topic: &str, partition: i32) -> rusqlite::Result<Option<(i64, String)>> {
    c.query_row(
        "SELECT changelog_offset, commit_id FROM cached_partition WHERE topic = ?1 AND partition = ?2",
        params![topic, partition],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .optional()
}

fn clear(c: &Connection, topic: &str, partition: i32) -> rusqlite::Result<()> {
    for table in ["cached_partition", "cached_device", "cached_key", "cached_outbox"] {
        c.execute(
            &format!("DELETE FROM {table} WHERE topic = ?1 AND partition = ?2"),
            params![topic, partition],
        )?;
    }
    Ok(())
}

fn load(
    c: &mut Connection,
    topic: &str,
    input_topic: &str,
    partition: i32,
) -> rusqlite::Result<Option<(PartitionState, Position)>> {
    let row = c
        .query_row(
            "SELECT resume_offset, decided_offset, next_seq, changelog_offset, commit_id, bytes_since_snapshot,
                    decided_lateness_ms, decided_horizon_ms
             FROM cached_partition WHERE topic = ?1 AND partition = ?2",
            params![topic, partition],
            |r| {
                let lateness: Option<i64> = r.get(6)?;
                let horizon: Option<i64> = r.get(7)?;
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                    Position {
                        offset: r.get(3)?,
                        id: r.get(4)?,
                        bytes_since_snapshot: r.get::<_, i64>(5)? as usize,
                    },
                    lateness.zip(horizon).map(|(l, h)| DecidedWith {
                        allowed_lateness_ms: l,
                        dedup_horizon_ms: h,
                    }),
                ))
            },
        )
        .optional()?;
    let Some((resume, decided, next_seq, position, decided_with)) = row else {
        return Ok(None);
    };
    let mut state = PartitionState {
        resume_offset: Some(resume),
        decided_offset: decided,
        next_seq,
        decided_with,
        ..PartitionState::default()
    };
    let mut stmt = c.prepare_cached(
        "SELECT device_id, max_ts, released_max FROM cached_device WHERE topic = ?1 AND partition = ?2",
    )?;
    let rows = stmt.query_map(params![topic, partition], |r| {
        Ok((
            r.get::<_, String>(0)?,
            DeviceMark {
                max_ts: r.get(1)?,
                released_max: r.get(2)?,
            },
        ))
    })?;
    for row in rows {
        let (d, m) = row?;
        state.marks.insert(d, m);
    }
    let mut stmt = c.prepare_cached(
        "SELECT device_id, ts, latitude_bits, longitude_bits FROM cached_key WHERE topic = ?1 AND partition = ?2",
    )?;
    let rows = stmt.query_map(params![topic, partition], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, i64>(2)? as u64,
            r.get::<_, i64>(3)? as u64,
        ))
    })?;
    for row in rows {
        let (d, ts, lat, lon) = row?;
        state.keys.entry(d).or_default().insert(ts, (lat, lon));
    }
    let mut stmt = c.prepare_cached(
        "SELECT seq, events, body FROM cached_outbox WHERE topic = ?1 AND partition = ?2 ORDER BY seq",
    )?;
    let rows = stmt.query_map(params![topic, partition], |r| {
        Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, Vec<u8>>(2)?))
    })?;
    for row in rows {
        let (seq, events, body) = row?;
        state.outbox.insert(
            seq,
            OutboxBatch {
                id: batch_id(input_topic, partition, seq),
                partition,
                seq,
                events: events as usize,
                body: bytes::Bytes::from(body),
            },
        );
    }
    Ok(Some((state, position)))
}

fn apply(
    c: &mut Connection,
    topic: &str,
    p: i32,
    records: &[Record],
    sizes: &[usize],
    commit_offset: i64,
) -> rusqlite::Result<()> {
    let tx = c.transaction()?;
    let mut added: i64 = 0;
    let mut reset = false;
    for (i, record) in records.iter().enumerate() {
        let size = sizes.get(i).copied().unwrap_or(0) as i64;
        match record {
            Record::Reset => {
                for table in ["cached_device", "cached_key", "cached_outbox"] {
                    tx.execute(
                        &format!("DELETE FROM {table} WHERE topic = ?1 AND partition = ?2"),
                        params![topic, p],
                    )?;
                }
                // As `PartitionState::apply`: a reset forgets the settings until a commit names them.
                tx.execute(
                    "UPDATE cached_partition SET decided_lateness_ms = NULL, decided_horizon_ms = NULL
                     WHERE topic = ?1 AND partition = ?2",
                    params![topic, p],
                )?;
                reset = true;
                added = 0;
            }
            Record::Batch { seq, events, body } => {
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO cached_outbox (topic, partition, seq, events, body) VALUES (?1, ?2, ?3, ?4, ?5)",
                )?
                .execute(params![topic, p, seq, *events as i64, &body[..]])?;
            }
            Record::State(delta) => {
                for d in &delta.evicted {
                    tx.prepare_cached(
                        "DELETE FROM cached_device WHERE topic = ?1 AND partition = ?2 AND device_id = ?3",
                    )?
                    .execute(params![topic, p, d])?;
                    tx.prepare_cached(
                        "DELETE FROM cached_key WHERE topic = ?1 AND partition = ?2 AND device_id = ?3",
                    )?
                    .execute(params![topic, p, d])?;
                }
                let mut put_mark = tx.prepare_cached(
                    "INSERT INTO cached_device (topic, partition, device_id, max_ts, released_max) VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT (topic, partition, device_id) DO UPDATE SET max_ts = excluded.max_ts, released_max = excluded.released_max",
                )?;
                for (d, max_ts, released_max) in &delta.marks {
                    put_mark.execute(params![topic, p, d, max_ts, released_max])?;
                }
                let mut put_key = tx.prepare_cached(
                    "INSERT OR REPLACE INTO cached_key (topic, partition, device_id, ts, latitude_bits, longitude_bits) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )?;
                for (d, ts, lat, lon) in &delta.keys {
                    put_key.execute(params![topic, p, d, ts, *lat as i64, *lon as i64])?;
                }
                let mut prune = tx.prepare_cached(
                    "DELETE FROM cached_key WHERE topic = ?1 AND partition = ?2 AND device_id = ?3 AND ts < ?4",
                )?;
                for (d, below) in &delta.pruned {
                    prune.execute(params![topic, p, d, below])?;
                }
            }
            Record::Commit(commit) => {
                if let Some(acked) = commit.acked_through {
                    tx.prepare_cached(
                        "DELETE FROM cached_outbox WHERE topic = ?1 AND partition = ?2 AND seq <= ?3",
                    )?
                    .execute(params![topic, p, acked])?;
                }
                let bytes_expr = if reset { "?8" } else { "bytes_since_snapshot + ?8" };
                tx.execute(
                    &format!(
                        "INSERT INTO cached_partition (topic, partition, resume_offset, decided_offset, next_seq, changelog_offset, commit_id, bytes_since_snapshot,
                                                       decided_lateness_ms, decided_horizon_ms)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                         ON CONFLICT (topic, partition) DO UPDATE SET resume_offset = excluded.resume_offset,
                           decided_offset = excluded.decided_offset, next_seq = excluded.next_seq,
                           changelog_offset = excluded.changelog_offset, commit_id = excluded.commit_id,
                           bytes_since_snapshot = {bytes_expr},
                           decided_lateness_ms = COALESCE(excluded.decided_lateness_ms, decided_lateness_ms),
                           decided_horizon_ms = COALESCE(excluded.decided_horizon_ms, decided_horizon_ms)"
                    ),
                    params![
                        topic,
                        p,
                        commit.resume_offset,
                        commit.decided_offset,
                        commit.next_seq,
                        commit_offset,
                        commit.id,
                        added + size,
                        commit.decided_with.map(|d| d.allowed_lateness_ms),
                        commit.decided_with.map(|d| d.dedup_horizon_ms)
                    ],
                )?;
            }
        }
        added += size;
    }
    tx.commit()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::changelog::{Commit, StateDelta};

    fn commit(id: &str, resume: i64, next_seq: i64, acked: Option<i64>) -> Record {
        Record::Commit(Commit {
            id: id.into(),
            resume_offset: resume,
            decided_offset: resume,
            next_seq,
            acked_through: acked,
            decided_with: Some(DecidedWith {
                allowed_lateness_ms: 5_000,
                dedup_horizon_ms: resume,
            }),
        })
    }

    fn batch(seq: i64) -> Record {
        Record::Batch {
            seq,
            events: 1,
            body: bytes::Bytes::from_static(b"[]"),
        }
    }

    #[tokio::test]
    async fn the_cache_holds_what_the_records_rebuild_after_reopening() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("s.db");
        let checkpoints = vec![
            vec![
                batch(0),
                batch(1),
                Record::State(StateDelta {
                    evicted: vec![],
                    marks: vec![("d".into(), 50, 40)],
                    keys: vec![("d".into(), 10, 1, u64::MAX), ("d".into(), 40, 1, 2)],
                    pruned: vec![],
                }),
                commit("w-1", 7, 2, None),
            ],
            vec![
                Record::State(StateDelta {
                    pruned: vec![("d".into(), 20)],
                    ..StateDelta::default()
                }),
                commit("w-2", 9, 2, Some(0)),
            ],
        ];
        let mut expected = PartitionState::default();
        {
            let store = StateStore::open(&path, "t-changelog", "t").expect("opens");
            let mut prev = None;
            for (i, records) in checkpoints.into_iter().enumerate() {
                for r in &records {
                    expected.apply("t", 0, r);
                }
                let sizes = vec![10; records.len()];
                let id = match records.last() {
                    Some(Record::Commit(c)) => c.id.clone(),
                    _ => unreachable!("a checkpoint ends with its commit"),
                };
                store.apply(0, records, sizes, 100 + i as i64, prev.clone());
                prev = Some((100 + i as i64, id));
            }
            store.sync().await.expect("synced");
        }
        let store = StateStore::open(&path, "t-changelog", "t").expect("reopens");
        let (state, position) = store.load(0).await.expect("loads").expect("cached");
        assert_eq!(state, expected);
        assert_eq!(state.outbox.keys().copied().collect::<Vec<_>>(), vec![1]);
        assert_eq!(
            position,
            Position {
                offset: 101,
                id: "w-2".into(),
                bytes_since_snapshot: 60
            }
        );
        assert!(store.load(3).await.expect("loads").is_none());

        // A snapshot replaces everything.
        let snap = PartitionState {
            resume_offset: Some(20),
            next_seq: 5,
            ..PartitionState::default()
        };
        store.replace(
            0,
            &snap,
            &Position {
                offset: 300,
                id: "x-1".into(),
                bytes_since_snapshot: 3,
            },
        );
        let (state, position) = store.load(0).await.expect("loads").expect("cached");
        assert_eq!(state, snap);
        assert_eq!((position.offset, position.bytes_since_snapshot), (300, 3));

        // A delta that does not follow the cached checkpoint drops the cache.
        store.apply(
            0,
            vec![commit("y-1", 30, 6, None)],
            vec![1],
            310,
            Some((299, "x-0".into())),
        );
        assert!(
            store.load(0).await.expect("loads").is_none(),
            "a cache with a gap is dropped"
        );
        // The next one does not follow either (nothing is cached): still nothing.
        store.apply(
            0,
            vec![commit("y-2", 31, 6, None)],
            vec![1],
            311,
            Some((310, "y-1".into())),
        );
        assert!(store.load(0).await.expect("loads").is_none());
    }
}
