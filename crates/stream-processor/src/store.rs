//! The local SQLite state store (WAL): the cache of the changelog. After each committed
//! checkpoint its encoded records are appended here, with the changelog position they reach, so a
//! restart on the same machine restores from this file and reads only what the changelog holds
//! beyond it. The changelog stays the truth: a lost, stale or foreign file is rebuilt from it,
//! so this file needs no fsync per checkpoint (`synchronous=NORMAL`: a power cut may only make
//! it older).
//!
//! The cache is a copy of the partition's changelog since its latest snapshot: the records as
//! written, one row each, rebuilt into a state by the same `PartitionState::apply` as a restore
//! from the broker. Appending a checkpoint costs a few row inserts whatever it holds (a state
//! kept as rows, one per dedup key, cost a B-tree insert per event and most of a core under
//! load); a snapshot starts the copy over. Rows are keyed by the changelog topic and
//! partition. One thread owns the connection; callers send it jobs, in order.

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::oneshot;

use crate::changelog::{PartitionState, Record};

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

/// One committed checkpoint, as the cache takes it.
#[derive(Debug, Clone)]
pub struct Committed {
    /// Its records as written to the changelog, in order.
    pub encoded: Vec<Vec<u8>>,
    /// It starts with a `Reset`: the copy starts over.
    pub snapshot: bool,
    /// Offset and id of its `Commit` record.
    pub commit_offset: i64,
    pub commit_id: String,
}

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

/// Handle to the state store; cheap to clone.
#[derive(Debug, Clone)]
pub struct StateStore {
    jobs: std::sync::mpsc::Sender<Job>,
    topic: String,
    input_topic: String,
}

/// Layout version of the cache (`PRAGMA user_version`); a file of another is rebuilt.
const SCHEMA_VERSION: i64 = 3;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS cached_partition (
    topic TEXT NOT NULL, partition INTEGER NOT NULL,
    changelog_offset INTEGER NOT NULL, commit_id TEXT NOT NULL, bytes_since_snapshot INTEGER NOT NULL,
    PRIMARY KEY (topic, partition)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS cached_record (
    id INTEGER PRIMARY KEY,
    topic TEXT NOT NULL, partition INTEGER NOT NULL,
    record BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS cached_record_by_partition ON cached_record (topic, partition, id);
";

impl StateStore {
    /// Opens (creating the file and its directory as needed) the cache of changelog `topic`,
    /// whose batches belong to `input_topic`.
    pub fn open(path: &Path, topic: &str, input_topic: &str) -> Result<StateStore> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let mut conn = Connection::open(path)?;
        // Large pages for a new file (an existing one keeps its size): a record is a blob of
        // up to about half a megabyte, kept on a chain of overflow pages that is written, and
        // read back again when the next snapshot deletes it; 64 KiB pages make that chain a
        // sixteenth as long as the default 4 KiB ones.
        conn.pragma_update(None, "page_size", 65536)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version != SCHEMA_VERSION {
            // A cache of another layout: dropped, and rebuilt from the changelog.
            let tables: Vec<String> = conn
                .prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE 'cached_%'")?
                .query_map([], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            for t in tables {
                conn.execute_batch(&format!("DROP TABLE IF EXISTS {t}"))?;
            }
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

    /// The cached state of one partition and the changelog position it reflects, if any. A copy
    /// with a record this version cannot read counts as none.
    pub async fn load(&self, partition: i32) -> Result<Option<(PartitionState, Position)>> {
        let (topic, input) = (self.topic.clone(), self.input_topic.clone());
        self.call(move |c| load(c, &topic, &input, partition)).await
    }

    /// Appends one committed checkpoint on top of the cached checkpoint `prev` (offset, id)
    /// that came before it. A delta on top of anything else (the cache missed a checkpoint: a
    /// crash between commit and cache update, a failed write) would make the cache claim a state
    /// it does not hold, so then the partition's cache is dropped instead, until the next
    /// snapshot rebuilds it. Queued; the changelog stays the truth.
    pub fn apply(&self, partition: i32, checkpoint: Committed, prev: Option<(i64, String)>) {
        let topic = self.topic.clone();
        let job: Job = Box::new(move |c| {
            let result = (|| {
                if !checkpoint.snapshot && cached_position(c, &topic, partition)? != prev {
                    tracing::debug!(partition, "local state cache is not at the previous checkpoint; dropped until the next snapshot");
                    return clear(c, &topic, partition);
                }
                append(c, &topic, partition, &checkpoint, None)
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

    /// Replaces the cached state of a partition (after a restore from the changelog) with a
    /// snapshot of `state` at `position`.
    pub fn replace(&self, partition: i32, state: &PartitionState, position: &Position) {
        let checkpoint = Committed {
            encoded: state
                .to_records(&position.id)
                .iter()
                .map(Record::encode)
                .collect(),
            snapshot: true,
            commit_offset: position.offset,
            commit_id: position.id.clone(),
        };
        let topic = self.topic.clone();
        let bytes = position.bytes_since_snapshot;
        let job: Job = Box::new(move |c| {
            if let Err(e) = append(c, &topic, partition, &checkpoint, Some(bytes)) {
                tracing::warn!(partition, error = %e, "local state cache update failed");
                let _ = clear(c, &topic, partition);
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
    for table in ["cached_partition", "cached_record"] {
        c.execute(
            &format!("DELETE FROM {table} WHERE topic = ?1 AND partition = ?2"),
            params![topic, partition],
        )?;
    }
    Ok(())
}

/// Appends (or, for a snapshot, starts the copy over with) one checkpoint's records and moves
/// the position, in one transaction. `bytes_since_snapshot` overrides the counted value.
fn append(
    c: &mut Connection,
    topic: &str,
    partition: i32,
    checkpoint: &Committed,
    bytes_since_snapshot: Option<usize>,
) -> rusqlite::Result<()> {
    let tx = c.transaction()?;
    if checkpoint.snapshot {
        tx.execute(
            "DELETE FROM cached_record WHERE topic = ?1 AND partition = ?2",
            params![topic, partition],
        )?;
    }
    {
        let mut insert =
            tx.prepare_cached("INSERT INTO cached_record (topic, partition, record) VALUES (?1, ?2, ?3)")?;
        for record in &checkpoint.encoded {
            insert.execute(params![topic, partition, record])?;
        }
    }
    let added: usize = checkpoint.encoded.iter().map(Vec::len).sum();
    let bytes_expr = match (bytes_since_snapshot, checkpoint.snapshot) {
        (Some(_), _) | (None, true) => "excluded.bytes_since_snapshot",
        (None, false) => "bytes_since_snapshot + excluded.bytes_since_snapshot",
    };
    tx.execute(
        &format!(
            "INSERT INTO cached_partition (topic, partition, changelog_offset, commit_id, bytes_since_snapshot)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (topic, partition) DO UPDATE SET changelog_offset = excluded.changelog_offset,
               commit_id = excluded.commit_id, bytes_since_snapshot = {bytes_expr}"
        ),
        params![
            topic,
            partition,
            checkpoint.commit_offset,
            checkpoint.commit_id,
            bytes_since_snapshot.unwrap_or(added) as i64
        ],
    )?;
    tx.commit()
}

fn load(
    c: &mut Connection,
    topic: &str,
    input_topic: &str,
    partition: i32,
) -> rusqlite::Result<Option<(PartitionState, Position)>> {
    let position = c
        .query_row(
            "SELECT changelog_offset, commit_id, bytes_since_snapshot FROM cached_partition
             WHERE topic = ?1 AND partition = ?2",
            params![topic, partition],
            |r| {
                Ok(Position {
                    offset: r.get(0)?,
                    id: r.get(1)?,
                    bytes_since_snapshot: r.get::<_, i64>(2)? as usize,
                })
            },
        )
        .optional()?;
    let Some(position) = position else {
        return Ok(None);
    };
    let mut state = PartitionState::default();
    let mut stmt = c.prepare_cached(
        "SELECT id, record FROM cached_record WHERE topic = ?1 AND partition = ?2 ORDER BY id",
    )?;
    let mut rows = stmt.query(params![topic, partition])?;
    while let Some(row) = rows.next()? {
        let id: i64 = row.get(0)?;
        let bytes = row.get_ref(1)?.as_blob()?;
        match Record::decode(bytes, id) {
            Ok(record) => state.apply(input_topic, partition, &record),
            Err(e) => {
                tracing::warn!(partition, error = %e, "local state cache holds an unreadable record; ignoring the cache");
                return Ok(None);
            }
        }
    }
    Ok(Some((state, position)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::changelog::{Commit, StateDelta};

    fn committed(records: &[Record], offset: i64) -> Committed {
        Committed {
            encoded: records.iter().map(Record::encode).collect(),
            snapshot: matches!(records.first(), Some(Record::Reset)),
            commit_offset: offset,
            commit_id: match records.last() {
                Some(Record::Commit(c)) => c.id.clone(),
                _ => unreachable!("a checkpoint ends with its commit"),
            },
        }
    }

    fn commit(id: &str, resume: i64, next_seq: i64, acked: Option<i64>) -> Record {
        Record::Commit(Commit {
            id: id.into(),
            resume_offset: resume,
            decided_offset: resume,
            next_seq,
            acked_through: acked,
            waiting_known: true,
            clock_ms: None,
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
                    waiting_removed: vec![],
                    waiting_added: vec![(7, 8)],
                    forgotten: vec![("quiet".into(), 3, 1_700_000_000_000)],
                    forgotten_through: None,
                    former_floor: Some((5, 1_800_000_000_000)),
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
        let mut bytes = 0;
        {
            let store = StateStore::open(&path, "t-changelog", "t").expect("opens");
            let mut prev = None;
            for (i, records) in checkpoints.into_iter().enumerate() {
                for r in &records {
                    expected.apply("t", 0, r);
                }
                let c = committed(&records, 100 + i as i64);
                bytes += c.encoded.iter().map(Vec::len).sum::<usize>();
                let id = c.commit_id.clone();
                store.apply(0, c, prev.clone());
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
                bytes_since_snapshot: bytes
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
            committed(&[commit("y-1", 30, 6, None)], 310),
            Some((299, "x-0".into())),
        );
        assert!(
            store.load(0).await.expect("loads").is_none(),
            "a cache with a gap is dropped"
        );
        // The next one does not follow either (nothing is cached): still nothing.
        store.apply(
            0,
            committed(&[commit("y-2", 31, 6, None)], 311),
            Some((310, "y-1".into())),
        );
        assert!(store.load(0).await.expect("loads").is_none());
    }

    fn page_size(path: &Path) -> i64 {
        Connection::open(path)
            .expect("opens")
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .expect("page size")
    }

    #[tokio::test]
    async fn a_new_cache_file_has_large_pages_and_an_older_file_keeps_working_with_its_own() {
        let dir = tempfile::tempdir().expect("temp dir");
        let fresh = dir.path().join("new.db");
        drop(StateStore::open(&fresh, "t-changelog", "t").expect("opens"));
        assert_eq!(page_size(&fresh), 65536);

        // A file made with the default page size, before the cache used larger ones.
        let old = dir.path().join("old.db");
        {
            let c = Connection::open(&old).expect("opens");
            c.pragma_update(None, "journal_mode", "WAL").expect("wal");
            c.execute_batch("CREATE TABLE other (x INTEGER)")
                .expect("creates");
        }
        assert_eq!(page_size(&old), 4096);
        let store = StateStore::open(&old, "t-changelog", "t").expect("opens");
        let records = vec![batch(0), commit("w-1", 3, 1, None)];
        let mut expected = PartitionState::default();
        for r in &records {
            expected.apply("t", 0, r);
        }
        store.apply(0, committed(&records, 10), None);
        let (state, position) = store.load(0).await.expect("loads").expect("cached");
        assert_eq!((state, position.offset), (expected, 10));
        assert_eq!(page_size(&old), 4096);
    }
}
