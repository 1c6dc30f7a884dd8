//! Restoring a partition's state: from the local cache when its position is still on the
//! changelog (then only what follows it is read), otherwise from the changelog's start, which
//! is at most one snapshot before its end. Reads committed records only (aborted checkpoints of
//! fenced owners stay invisible). Blocking: run it off the async threads.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use crate::changelog::{PartitionState, Record};
use crate::store::Position;

/// Where a restored state came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The local cache was current.
    Cache,
    /// The local cache, brought up to date from the changelog.
    CacheAndChangelog,
    /// The changelog alone (no cache, or a stale or foreign one).
    Changelog,
    /// The local cache, which is ahead of a changelog that lost records.
    CacheAheadOfChangelog,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Cache => "cache",
            Source::CacheAndChangelog => "cache+changelog",
            Source::Changelog => "changelog",
            Source::CacheAheadOfChangelog => "cache-ahead-of-changelog",
        }
    }
}

/// A restored partition.
#[derive(Debug)]
pub struct Restored {
    pub state: PartitionState,
    /// The last checkpoint's position (none: nothing was ever committed).
    pub position: Option<Position>,
    pub source: Source,
    /// Changelog records and bytes read.
    pub records: usize,
    pub bytes: usize,
    pub seconds: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("reading changelog partition {partition}: {source}")]
    Kafka {
        partition: i32,
        #[source]
        source: KafkaError,
    },
    #[error(transparent)]
    Decode(#[from] crate::changelog::DecodeError),
    #[error("changelog partition {partition} was not read to its end within {seconds} s")]
    Timeout { partition: i32, seconds: u64 },
}

/// Restores `partition` of `input_topic` from `changelog`, starting from `cached` if usable.
pub fn restore(
    conn: &service_common::kafka::Connection,
    changelog: &str,
    input_topic: &str,
    partition: i32,
    cached: Option<(PartitionState, Position)>,
    timeout: Duration,
) -> Result<Restored, RestoreError> {
    let start = Instant::now();
    let consumer: BaseConsumer<Quiet> =
        service_common::kafka::manual_consumer(conn, &format!("{changelog}-restore"))
            .set("enable.partition.eof", "true")
            .set("fetch.max.bytes", "52428800")
            .create_with_context(Quiet)
            .map_err(|source| RestoreError::Kafka { partition, source })?;
    let restored = restore_with(
        &consumer,
        changelog,
        input_topic,
        partition,
        cached,
        start,
        timeout,
    );
    // Destroying the consumer takes about 100 ms; the partition need not wait for it.
    service_common::kafka::drop_in_background(consumer);
    restored
}

fn restore_with(
    consumer: &BaseConsumer<Quiet>,
    changelog: &str,
    input_topic: &str,
    partition: i32,
    cached: Option<(PartitionState, Position)>,
    start: Instant,
    timeout: Duration,
) -> Result<Restored, RestoreError> {
    let kafka = |source| RestoreError::Kafka { partition, source };
    let (low, high) = consumer
        .fetch_watermarks(changelog, partition, Duration::from_secs(10))
        .map_err(kafka)?;
    let mut reader = Reader {
        consumer,
        changelog,
        input_topic,
        partition,
        deadline: start + timeout,
        timeout,
        records: 0,
        bytes: 0,
    };
    if let Some((state, pos)) = cached {
        if pos.offset >= low && pos.offset < high {
            if let Some((state, position, more)) = reader.catch_up(state, pos.clone())? {
                return Ok(Restored {
                    state,
                    position: Some(position),
                    source: if more {
                        Source::CacheAndChangelog
                    } else {
                        Source::Cache
                    },
                    records: reader.records,
                    bytes: reader.bytes,
                    seconds: start.elapsed().as_secs_f64(),
                });
            }
            tracing::warn!(
                partition,
                cached_offset = pos.offset,
                "local state cache does not match the changelog; restoring from the changelog"
            );
        } else if pos.offset >= high {
            // The broker lost committed records (or the topic was recreated): the cache holds a
            // later committed checkpoint than the changelog. It is the better truth; the first
            // checkpoint then writes a full snapshot, so the changelog holds it again.
            tracing::warn!(
                partition,
                cached_offset = pos.offset,
                changelog_end = high,
                "the changelog ends before the local cache's position (the broker lost records, or the topic was recreated); restoring from the cache and re-seeding the changelog with a snapshot"
            );
            return Ok(Restored {
                state,
                position: Some(Position {
                    bytes_since_snapshot: usize::MAX,
                    ..pos
                }),
                source: Source::CacheAheadOfChangelog,
                records: 0,
                bytes: 0,
                seconds: start.elapsed().as_secs_f64(),
            });
        } else {
            tracing::info!(
                partition,
                cached_offset = pos.offset,
                changelog_start = low,
                "local state cache is older than the changelog's start; restoring from the changelog"
            );
        }
    }
    let (state, position) = if high > low {
        reader.read_from(low, PartitionState::default(), None)?
    } else {
        (PartitionState::default(), None)
    };
    Ok(Restored {
        state,
        position,
        source: Source::Changelog,
        records: reader.records,
        bytes: reader.bytes,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// The restore consumer's context: reaching the end of the partition is the goal, not an error.
struct Quiet;

impl rdkafka::ClientContext for Quiet {
    fn error(&self, error: KafkaError, reason: &str) {
        if !is_end_of_partition(&error) {
            tracing::warn!(error = %error, reason, "changelog reader error");
        }
    }
}

/// Whether `error` only says a partition was read to its end (it comes both as its own variant
/// and as a global error carrying the code).
fn is_end_of_partition(error: &KafkaError) -> bool {
    matches!(error, KafkaError::PartitionEOF(_))
        || error.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::PartitionEOF)
}

impl rdkafka::consumer::ConsumerContext for Quiet {}

struct Reader<'a> {
    consumer: &'a BaseConsumer<Quiet>,
    changelog: &'a str,
    input_topic: &'a str,
    partition: i32,
    deadline: Instant,
    timeout: Duration,
    records: usize,
    bytes: usize,
}

impl Reader<'_> {
    fn assign(&self, offset: i64) -> Result<(), RestoreError> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(self.changelog, self.partition, Offset::Offset(offset))
            .and_then(|()| self.consumer.assign(&tpl))
            .map_err(|source| RestoreError::Kafka {
                partition: self.partition,
                source,
            })
    }

    /// Checks that the record at the cached position is the cached checkpoint's commit, then
    /// applies what follows. `None` when it is not (the cache belongs to another history).
    fn catch_up(
        &mut self,
        state: PartitionState,
        pos: Position,
    ) -> Result<Option<(PartitionState, Position, bool)>, RestoreError> {
        self.assign(pos.offset)?;
        let Some((offset, payload)) = self.next()? else {
            return Ok(None);
        };
        let matches = offset == pos.offset
            && matches!(Record::decode(&payload, offset), Ok(Record::Commit(c)) if c.id == pos.id);
        if !matches {
            return Ok(None);
        }
        let before = self.records;
        let (state, position) = self.read_rest(state, Some(pos))?;
        let more = self.records > before;
        Ok(Some((
            state,
            position.expect("the cached position at least"),
            more,
        )))
    }

    fn read_from(
        &mut self,
        offset: i64,
        state: PartitionState,
        position: Option<Position>,
    ) -> Result<(PartitionState, Option<Position>), RestoreError> {
        self.assign(offset)?;
        self.read_rest(state, position)
    }

    /// Applies every committed record up to the end of the partition.
    fn read_rest(
        &mut self,
        mut state: PartitionState,
        mut position: Option<Position>,
    ) -> Result<(PartitionState, Option<Position>), RestoreError> {
        let mut since_snapshot = position.as_ref().map_or(0, |p| p.bytes_since_snapshot);
        while let Some((offset, payload)) = self.next()? {
            self.records += 1;
            self.bytes += payload.len();
            let record = Record::decode(&payload, offset)?;
            if record == Record::Reset {
                since_snapshot = 0;
            }
            since_snapshot += payload.len();
            state.apply(self.input_topic, self.partition, &record);
            if let Record::Commit(c) = &record {
                position = Some(Position {
                    offset,
                    id: c.id.clone(),
                    bytes_since_snapshot: since_snapshot,
                });
            }
        }
        Ok((state, position))
    }

    /// The next committed record, or `None` at the end of the partition.
    fn next(&mut self) -> Result<Option<(i64, Vec<u8>)>, RestoreError> {
        loop {
            if Instant::now() > self.deadline {
                return Err(RestoreError::Timeout {
                    partition: self.partition,
                    seconds: self.timeout.as_secs(),
                });
            }
            match self.consumer.poll(Duration::from_millis(500)) {
                None => continue,
                Some(Ok(m)) => return Ok(Some((m.offset(), m.payload().unwrap_or_default().to_vec()))),
                Some(Err(KafkaError::PartitionEOF(_))) => return Ok(None),
                Some(Err(e)) => {
                    return Err(RestoreError::Kafka {
                        partition: self.partition,
                        source: e,
                    })
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_end_of_a_partition_is_not_a_reader_error_in_either_form() {
        use rdkafka::types::RDKafkaErrorCode;
        assert!(is_end_of_partition(&KafkaError::PartitionEOF(3)));
        assert!(is_end_of_partition(&KafkaError::Global(
            RDKafkaErrorCode::PartitionEOF
        )));
        assert!(!is_end_of_partition(&KafkaError::Global(
            RDKafkaErrorCode::AllBrokersDown
        )));
    }
}
