//! The changelog's records and the partition state they rebuild, as pure code (no I/O).
//!
//! Partition p of the changelog topic holds input partition p's state as a sequence of
//! checkpoints, each one Kafka transaction ending with a [`Record::Commit`]. A checkpoint is
//! either a delta (new outbox batches, changed marks, new and pruned dedup keys) or a full
//! snapshot that starts with [`Record::Reset`]; everything before the latest snapshot can be
//! deleted from the log, so a restore reads at most one snapshot plus the deltas after it.
//! The same records, applied in order, rebuild the state anywhere: on a new owner from the
//! broker, and in the local SQLite cache.

use std::collections::{BTreeMap, HashMap};

use std::io::Write as _;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use telemetry_core::{DeviceMark, Forgotten, SeenKey};

/// A batch built but not yet known to be acknowledged by the sink. Its id
/// (`{topic}-{partition}-{seq}`) is the sink's Idempotency-Key.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxBatch {
    pub id: String,
    pub partition: i32,
    pub seq: i64,
    pub events: usize,
    /// The JSON array sent to the sink.
    pub body: Bytes,
}

/// The id of a batch: the same on every owner, so a resend is a replay at the sink.
pub fn batch_id(topic: &str, partition: i32, seq: i64) -> String {
    format!("{topic}-{partition}-{seq}")
}

/// A partition's state as of its last committed checkpoint.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct PartitionState {
    /// Offset to read from after a restore (the oldest event still waiting, or the next one).
    pub resume_offset: Option<i64>,
    /// Everything below this offset was decided in a committed checkpoint: its dead letters
    /// are written, so reading it again must not dead-letter it twice.
    pub decided_offset: i64,
    /// Sequence number of the next batch.
    pub next_seq: i64,
    /// Per device: its marks.
    pub marks: HashMap<String, DeviceMark>,
    /// Per device: identities kept for deduplication, ts -> coordinates' bits.
    pub keys: HashMap<String, BTreeMap<i64, (u64, u64)>>,
    /// Batches not yet acknowledged, by sequence.
    pub outbox: BTreeMap<i64, OutboxBatch>,
    /// The offsets below `decided_offset` whose events were waiting in a reorder buffer: read
    /// again after a restore, exactly these go back into the buffers, and every other event
    /// below the decided offset was decided already (released, dropped or dead-lettered).
    pub waiting: OffsetRanges,
    /// The last commit records `waiting` (a changelog written before it did not: its events
    /// below the decided offset can only be decided again).
    pub waiting_known: bool,
    /// Forgotten devices' records: each replaces the device's mark and keys.
    pub forgotten: HashMap<String, Forgotten>,
    /// The partition-wide floor of forgotten devices a changelog of an earlier version recorded
    /// (`Cleaner::with_former_floor`), and until when it holds once a restore set that.
    pub forgotten_through: Option<i64>,
    pub forgotten_through_until: Option<u64>,
    /// The last commit's writer clock ([`Commit::clock_ms`]).
    pub clock_ms: Option<u64>,
}

/// A set of offsets as disjoint ranges `[start, end)`: the events waiting in reorder buffers,
/// which come mostly in runs of consecutive offsets.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct OffsetRanges(BTreeMap<i64, i64>);

impl OffsetRanges {
    pub fn contains(&self, offset: i64) -> bool {
        self.0
            .range(..=offset)
            .next_back()
            .is_some_and(|(_, end)| offset < *end)
    }

    pub fn insert(&mut self, start: i64, end: i64) {
        if start >= end {
            return;
        }
        let (mut start, mut end) = (start, end);
        // Merge every range that overlaps or touches [start, end).
        if let Some((&s, &e)) = self.0.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
            }
        }
        let touching: Vec<(i64, i64)> = self.0.range(start..=end).map(|(s, e)| (*s, *e)).collect();
        for (s, e) in touching {
            self.0.remove(&s);
            end = end.max(e);
        }
        self.0.insert(start, end);
    }

    pub fn remove(&mut self, start: i64, end: i64) {
        if start >= end {
            return;
        }
        if let Some((&s, &e)) = self.0.range(..start).next_back() {
            if e > start {
                self.0.insert(s, start);
                if e > end {
                    self.0.insert(end, e);
                }
            }
        }
        let inside: Vec<(i64, i64)> = self.0.range(start..end).map(|(s, e)| (*s, *e)).collect();
        for (s, e) in inside {
            self.0.remove(&s);
            if e > end {
                self.0.insert(end, e);
            }
        }
    }

    pub fn ranges(&self) -> impl Iterator<Item = (i64, i64)> + '_ {
        self.0.iter().map(|(s, e)| (*s, *e))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Offsets held.
    pub fn len(&self) -> u64 {
        self.0.iter().map(|(s, e)| (e - s) as u64).sum()
    }
}

impl PartitionState {
    /// How far the topic's log must reach for this state to hold: every offset up to the
    /// decided one was read (a log that ends before lost acknowledged writes, or was recreated;
    /// new events there would be skipped, or taken for the ones decided there).
    pub fn log_must_reach(&self) -> i64 {
        self.decided_offset.max(self.resume_offset.unwrap_or(0))
    }

    pub fn key_count(&self) -> usize {
        self.keys.values().map(BTreeMap::len).sum()
    }

    /// The dedup keys as a flat list (for restoring a cleaner).
    pub fn seen_keys(&self) -> Vec<SeenKey> {
        let mut out = Vec::with_capacity(self.key_count());
        for (device, keys) in &self.keys {
            out.extend(keys.iter().map(|(ts, (lat, lon))| SeenKey {
                device_id: device.clone(),
                ts: *ts,
                latitude_bits: *lat,
                longitude_bits: *lon,
            }));
        }
        out
    }

    /// Applies one record. `topic` and `partition` name the batches.
    pub fn apply(&mut self, topic: &str, partition: i32, record: &Record) {
        match record {
            Record::Reset => *self = PartitionState::default(),
            Record::Batch { seq, events, body } => {
                self.outbox.insert(
                    *seq,
                    OutboxBatch {
                        id: batch_id(topic, partition, *seq),
                        partition,
                        seq: *seq,
                        events: *events,
                        body: body.clone(),
                    },
                );
            }
            Record::State(delta) => {
                for device in &delta.evicted {
                    self.marks.remove(device);
                    self.keys.remove(device);
                    self.forgotten.remove(device);
                }
                for (device, through, at_ms) in &delta.forgotten {
                    self.marks.remove(device);
                    self.keys.remove(device);
                    self.forgotten.insert(
                        device.clone(),
                        Forgotten {
                            through: *through,
                            at_ms: *at_ms,
                        },
                    );
                }
                for (device, max_ts, released_max) in &delta.marks {
                    self.forgotten.remove(device);
                    self.marks.insert(
                        device.clone(),
                        DeviceMark {
                            max_ts: *max_ts,
                            released_max: *released_max,
                        },
                    );
                }
                for (device, ts, lat, lon) in &delta.keys {
                    self.keys
                        .entry(device.clone())
                        .or_default()
                        .insert(*ts, (*lat, *lon));
                }
                for (device, below) in &delta.pruned {
                    if let Some(keys) = self.keys.get_mut(device) {
                        *keys = keys.split_off(below);
                        if keys.is_empty() {
                            self.keys.remove(device);
                        }
                    }
                }
                for (start, end) in &delta.waiting_removed {
                    self.waiting.remove(*start, *end);
                }
                for (start, end) in &delta.waiting_added {
                    self.waiting.insert(*start, *end);
                }
                if let Some(through) = delta.forgotten_through {
                    // Written by an earlier version: its expiry is set by the first restore.
                    self.forgotten_through = Some(through);
                }
                if let Some((through, until)) = delta.former_floor {
                    self.forgotten_through = Some(through);
                    self.forgotten_through_until = Some(until);
                }
            }
            Record::Commit(c) => {
                self.resume_offset = Some(c.resume_offset);
                self.decided_offset = c.decided_offset;
                self.next_seq = c.next_seq;
                self.waiting_known = c.waiting_known;
                self.clock_ms = c.clock_ms;
                if let Some(acked) = c.acked_through {
                    self.outbox = self.outbox.split_off(&(acked + 1));
                }
            }
        }
    }

    /// The whole state as records (a snapshot), without the closing commit: a `Reset`, the
    /// marks, forgotten records, keys and waiting offsets in chunks, then the outbox.
    pub fn snapshot_records(
        marks: Vec<(String, DeviceMark)>,
        keys: Vec<SeenKey>,
        forgotten: Vec<(String, Forgotten)>,
        waiting: Vec<(i64, i64)>,
        former_floor: (Option<i64>, Option<u64>),
        outbox: impl IntoIterator<Item = OutboxBatch>,
    ) -> Vec<Record> {
        let mut out = vec![Record::Reset];
        let (through, until) = former_floor;
        let all = StateDelta {
            // An earlier version's floor whose expiry no restore has set yet stays as it was.
            forgotten_through: through.filter(|_| until.is_none()),
            former_floor: through.zip(until),
            waiting_added: waiting,
            waiting_removed: Vec::new(),
            evicted: Vec::new(),
            forgotten: forgotten
                .into_iter()
                .map(|(d, f)| (d, f.through, f.at_ms))
                .collect(),
            marks: marks
                .into_iter()
                .map(|(d, m)| (d, m.max_ts, m.released_max))
                .collect(),
            keys: keys
                .into_iter()
                .map(|k| (k.device_id, k.ts, k.latitude_bits, k.longitude_bits))
                .collect(),
            pruned: Vec::new(),
        };
        out.extend(all.into_chunks().into_iter().map(Record::State));
        out.extend(outbox.into_iter().map(|b| Record::Batch {
            seq: b.seq,
            events: b.events,
            body: b.body,
        }));
        out
    }

    /// This state as snapshot records (with its commit), e.g. to seed the local cache.
    pub fn to_records(&self, id: &str) -> Vec<Record> {
        let marks = self.marks.iter().map(|(d, m)| (d.clone(), *m)).collect();
        let forgotten = self.forgotten.iter().map(|(d, f)| (d.clone(), *f)).collect();
        let mut records = PartitionState::snapshot_records(
            marks,
            self.seen_keys(),
            forgotten,
            self.waiting.ranges().collect(),
            (self.forgotten_through, self.forgotten_through_until),
            self.outbox.values().cloned(),
        );
        records.push(Record::Commit(Commit {
            id: id.to_owned(),
            resume_offset: self.resume_offset.unwrap_or(0),
            decided_offset: self.decided_offset,
            next_seq: self.next_seq,
            acked_through: None,
            waiting_known: self.waiting_known,
            clock_ms: self.clock_ms,
        }));
        records
    }
}

/// Largest state record, estimated: well under the usual broker limit of one megabyte.
pub const CHUNK_BYTES: usize = 512 * 1024;

/// Changes to marks and keys.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateDelta {
    /// Devices whose mark, keys and forgotten record are dropped; applied before the rest.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub evicted: Vec<String>,
    /// (device, through, at_ms): forgotten devices' records, each replacing the device's mark
    /// and keys; applied after `evicted`, before `marks`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forgotten: Vec<(String, i64, u64)>,
    /// (device, max_ts, released_max)
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub marks: Vec<(String, i64, i64)>,
    /// (device, ts, latitude bits, longitude bits)
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<(String, i64, u64, u64)>,
    /// (device, every key below this ts is dropped)
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pruned: Vec<(String, i64)>,
    /// Waiting offsets that left the buffers: ranges `[start, end)` (they may span offsets
    /// that were not waiting).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waiting_removed: Vec<(i64, i64)>,
    /// Offsets newly waiting: ranges `[start, end)`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waiting_added: Vec<(i64, i64)>,
    /// The partition-wide forgotten floor, as versions before per-device records wrote it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forgotten_through: Option<i64>,
    /// That floor with the processing time it holds until (set by the first restore since).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub former_floor: Option<(i64, u64)>,
}

/// Estimated JSON bytes of one item of each list of a [`StateDelta`].
fn device_bytes(device: &str) -> usize {
    device.len() + 4
}
fn mark_bytes(m: &(String, i64, i64)) -> usize {
    m.0.len() + 48
}
fn forgotten_bytes(f: &(String, i64, u64)) -> usize {
    f.0.len() + 48
}
fn key_bytes(k: &(String, i64, u64, u64)) -> usize {
    k.0.len() + 64
}
fn prune_bytes(p: &(String, i64)) -> usize {
    p.0.len() + 28
}
const RANGE_BYTES: usize = 44;

impl StateDelta {
    /// Roughly the bytes of this delta as JSON (an upper estimate).
    pub fn estimated_bytes(&self) -> usize {
        self.evicted.iter().map(|d| device_bytes(d)).sum::<usize>()
            + self.forgotten.iter().map(forgotten_bytes).sum::<usize>()
            + self.marks.iter().map(mark_bytes).sum::<usize>()
            + self.keys.iter().map(key_bytes).sum::<usize>()
            + self.pruned.iter().map(prune_bytes).sum::<usize>()
            + (self.waiting_removed.len() + self.waiting_added.len()) * RANGE_BYTES
    }

    /// The same changes as records of at most about [`CHUNK_BYTES`] each, in an order that
    /// applies the same: evictions, forgotten records, marks, keys, prunes, waiting offsets
    /// removed, then added.
    pub fn into_chunks(self) -> Vec<StateDelta> {
        let mut out = Vec::new();
        let mut cur = StateDelta {
            forgotten_through: self.forgotten_through,
            former_floor: self.former_floor,
            ..StateDelta::default()
        };
        let mut bytes = 0usize;
        let room = |cur: &mut StateDelta, bytes: &mut usize, more: usize, out: &mut Vec<StateDelta>| {
            if *bytes + more > CHUNK_BYTES && *cur != StateDelta::default() {
                out.push(std::mem::take(cur));
                *bytes = 0;
            }
            *bytes += more;
        };
        for d in self.evicted {
            room(&mut cur, &mut bytes, device_bytes(&d), &mut out);
            cur.evicted.push(d);
        }
        for f in self.forgotten {
            room(&mut cur, &mut bytes, forgotten_bytes(&f), &mut out);
            cur.forgotten.push(f);
        }
        for m in self.marks {
            room(&mut cur, &mut bytes, mark_bytes(&m), &mut out);
            cur.marks.push(m);
        }
        for k in self.keys {
            room(&mut cur, &mut bytes, key_bytes(&k), &mut out);
            cur.keys.push(k);
        }
        for p in self.pruned {
            room(&mut cur, &mut bytes, prune_bytes(&p), &mut out);
            cur.pruned.push(p);
        }
        for r in self.waiting_removed {
            room(&mut cur, &mut bytes, RANGE_BYTES, &mut out);
            cur.waiting_removed.push(r);
        }
        for r in self.waiting_added {
            room(&mut cur, &mut bytes, RANGE_BYTES, &mut out);
            cur.waiting_added.push(r);
        }
        if cur != StateDelta::default() {
            out.push(cur);
        }
        out
    }
}

/// The record that ends every checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Commit {
    /// Unique id of this checkpoint: `{writer}-{n}`, the writer being one producer instance.
    pub id: String,
    pub resume_offset: i64,
    pub decided_offset: i64,
    pub next_seq: i64,
    /// Batches up to this sequence were acknowledged by the sink: they leave the outbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acked_through: Option<i64>,
    /// The checkpoint's state records the waiting offsets below `decided_offset` (always, since
    /// they were introduced; absent in an older changelog).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub waiting_known: bool,
    /// The writer's processing time at the checkpoint (ms): a restore measures the age of the
    /// state's processing times (when a device was forgotten) from it, so another machine's
    /// clock, or the time no owner ran, does not age them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_ms: Option<u64>,
}

/// One changelog record.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// Starts a snapshot: the state so far is replaced by what follows.
    Reset,
    /// A new outbox batch.
    Batch { seq: i64, events: usize, body: Bytes },
    /// Marks and keys.
    State(StateDelta),
    /// Ends a checkpoint.
    Commit(Commit),
}

/// Every field any record has (an internally tagged enum cannot borrow a raw JSON value).
#[derive(Deserialize)]
struct Wire<'a> {
    t: &'a str,
    seq: Option<i64>,
    events: Option<usize>,
    #[serde(borrow)]
    body: Option<&'a serde_json::value::RawValue>,
    #[serde(default)]
    evicted: Vec<String>,
    #[serde(default)]
    forgotten: Vec<(String, i64, u64)>,
    #[serde(default)]
    marks: Vec<(String, i64, i64)>,
    #[serde(default)]
    keys: Vec<(String, i64, u64, u64)>,
    #[serde(default)]
    pruned: Vec<(String, i64)>,
    #[serde(default)]
    waiting_removed: Vec<(i64, i64)>,
    #[serde(default)]
    waiting_added: Vec<(i64, i64)>,
    forgotten_through: Option<i64>,
    former_floor: Option<(i64, u64)>,
    id: Option<String>,
    resume_offset: Option<i64>,
    decided_offset: Option<i64>,
    next_seq: Option<i64>,
    acked_through: Option<i64>,
    #[serde(default)]
    waiting_known: bool,
    clock_ms: Option<u64>,
}

/// A record that could not be read.
#[derive(Debug, thiserror::Error)]
#[error("changelog record at offset {offset} is unreadable: {source}")]
pub struct DecodeError {
    pub offset: i64,
    #[source]
    pub source: serde_json::Error,
}

/// First byte of a compressed record: [`LZ4_TAG`], the JSON's length (u32, little endian), then
/// the JSON as one LZ4 block. A JSON record starts with `{`, so both read back. Compressed once
/// here, the same bytes go to the changelog and to the local cache, which then writes a fifth of
/// the bytes.
const LZ4_TAG: u8 = 0x01;
/// Records at least this long are compressed (commits and small deltas stay plain JSON).
const COMPRESS_FROM: usize = 512;
/// Largest record a compressed one may claim to expand to (records are chunked well below it):
/// a damaged length must not ask for gigabytes.
const MAX_RECORD_BYTES: usize = 64 << 20;

impl Record {
    /// The record's bytes on the changelog and in the cache: its JSON, compressed when long.
    pub fn encode(&self) -> Vec<u8> {
        let json = self.to_json();
        // Beyond what a reader accepts compressed, it stays JSON, which the producer refuses
        // above its message limit before anything commits (as before records were compressed).
        if json.len() < COMPRESS_FROM || json.len() > MAX_RECORD_BYTES {
            return json;
        }
        let mut out = vec![0u8; 5 + lz4_flex::block::get_maximum_output_size(json.len())];
        out[0] = LZ4_TAG;
        out[1..5].copy_from_slice(&(json.len() as u32).to_le_bytes());
        let n = lz4_flex::block::compress_into(&json, &mut out[5..])
            .expect("the output has the block's maximum size");
        out.truncate(5 + n);
        out
    }

    /// The record as JSON (a batch carries its body as is).
    pub fn to_json(&self) -> Vec<u8> {
        match self {
            Record::Reset => br#"{"t":"reset"}"#.to_vec(),
            Record::Batch { seq, events, body } => {
                let mut out = Vec::with_capacity(body.len() + 64);
                write!(out, r#"{{"t":"batch","seq":{seq},"events":{events},"body":"#)
                    .expect("writes to a Vec");
                out.extend_from_slice(body);
                out.push(b'}');
                out
            }
            Record::State(d) => {
                // Sized up front: a large delta would otherwise be copied each time it doubles.
                let mut out = Vec::with_capacity(d.estimated_bytes() + 64);
                serde_json::to_writer(&mut out, &WireRef::State(d)).expect("state serializes");
                out
            }
            Record::Commit(c) => serde_json::to_vec(&WireRef::Commit(c)).expect("commit serializes"),
        }
    }

    /// Reads a record written by [`Record::encode`], compressed or not.
    pub fn decode(bytes: &[u8], offset: i64) -> Result<Record, DecodeError> {
        use serde::de::Error as _;
        if bytes.first() != Some(&LZ4_TAG) {
            return Record::from_json(bytes, offset);
        }
        let err = |detail: String| DecodeError {
            offset,
            source: serde_json::Error::custom(detail),
        };
        let len = bytes
            .get(1..5)
            .map(|b| u32::from_le_bytes(b.try_into().expect("four bytes")) as usize)
            .ok_or_else(|| err("compressed record shorter than its header".into()))?;
        if len > MAX_RECORD_BYTES {
            return Err(err(format!("compressed record claims {len} bytes")));
        }
        let json = lz4_flex::block::decompress(&bytes[5..], len).map_err(|e| err(format!("lz4: {e}")))?;
        if json.len() != len {
            return Err(err(format!(
                "compressed record expands to {} bytes, not {len}",
                json.len()
            )));
        }
        Record::from_json(&json, offset)
    }

    fn from_json(bytes: &[u8], offset: i64) -> Result<Record, DecodeError> {
        use serde::de::Error as _;
        let err = |source| DecodeError { offset, source };
        let w: Wire<'_> = serde_json::from_slice(bytes).map_err(err)?;
        let missing = |field: &'static str| err(serde_json::Error::missing_field(field));
        Ok(match w.t {
            "reset" => Record::Reset,
            "batch" => Record::Batch {
                seq: w.seq.ok_or_else(|| missing("seq"))?,
                events: w.events.ok_or_else(|| missing("events"))?,
                body: Bytes::copy_from_slice(w.body.ok_or_else(|| missing("body"))?.get().as_bytes()),
            },
            "state" => Record::State(StateDelta {
                evicted: w.evicted,
                forgotten: w.forgotten,
                marks: w.marks,
                keys: w.keys,
                pruned: w.pruned,
                waiting_removed: w.waiting_removed,
                waiting_added: w.waiting_added,
                forgotten_through: w.forgotten_through,
                former_floor: w.former_floor,
            }),
            "commit" => Record::Commit(Commit {
                id: w.id.ok_or_else(|| missing("id"))?,
                resume_offset: w.resume_offset.ok_or_else(|| missing("resume_offset"))?,
                decided_offset: w.decided_offset.ok_or_else(|| missing("decided_offset"))?,
                next_seq: w.next_seq.ok_or_else(|| missing("next_seq"))?,
                acked_through: w.acked_through,
                waiting_known: w.waiting_known,
                clock_ms: w.clock_ms,
            }),
            other => {
                return Err(err(serde_json::Error::unknown_variant(
                    other,
                    &["reset", "batch", "state", "commit"],
                )))
            }
        })
    }
}

#[derive(Serialize)]
#[serde(tag = "t", rename_all = "snake_case")]
enum WireRef<'a> {
    State(&'a StateDelta),
    Commit(&'a Commit),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commit(id: &str, resume: i64, next_seq: i64, acked: Option<i64>) -> Record {
        Record::Commit(Commit {
            id: id.into(),
            resume_offset: resume,
            decided_offset: resume + 1,
            next_seq,
            acked_through: acked,
            waiting_known: true,
            clock_ms: Some(1_700_000_000_000),
        })
    }

    fn batch(seq: i64) -> Record {
        Record::Batch {
            seq,
            events: 1,
            body: Bytes::from(format!(r#"[{{"deviceId":"d","ts":{seq}}}]"#)),
        }
    }

    #[test]
    fn every_record_survives_encoding() {
        let records = vec![
            Record::Reset,
            batch(3),
            Record::State(StateDelta {
                evicted: vec!["gone".into()],
                forgotten: vec![("quiet".into(), 12, 1_700_000_000_000)],
                marks: vec![("d".into(), 10, 5)],
                keys: vec![("d".into(), 5, u64::MAX, 1)],
                pruned: vec![("e".into(), 2)],
                waiting_removed: vec![(0, 4)],
                waiting_added: vec![(7, 9), (12, 13)],
                forgotten_through: Some(-3),
                former_floor: Some((-3, 9)),
            }),
            commit("w-1", 7, 4, Some(2)),
        ];
        for r in records {
            assert_eq!(Record::decode(&r.encode(), 0).expect("decodes"), r);
        }
        assert!(
            Record::decode(b"{\"t\":\"nope\"}", 9).is_err(),
            "unknown record type"
        );
    }

    #[test]
    fn long_records_are_compressed_short_ones_stay_json_and_plain_json_still_reads() {
        let body: Vec<String> = (0..200)
            .map(|i| {
                format!(
                    r#"{{"deviceId":"device-{}","ts":{i},"latitude":1.5,"longitude":2.5}}"#,
                    i % 7
                )
            })
            .collect();
        let long = vec![
            Record::Batch {
                seq: 9,
                events: 200,
                body: Bytes::from(format!("[{}]", body.join(","))),
            },
            Record::State(StateDelta {
                keys: (0..300).map(|i| (format!("device-{}", i % 7), i, 1, 2)).collect(),
                ..StateDelta::default()
            }),
        ];
        for r in &long {
            let (json, encoded) = (r.to_json(), r.encode());
            assert_eq!(encoded[0], LZ4_TAG);
            assert!(
                encoded.len() * 3 < json.len(),
                "{} of {} bytes",
                encoded.len(),
                json.len()
            );
            assert_eq!(&Record::decode(&encoded, 0).expect("decodes"), r);
            // As an older version wrote it.
            assert_eq!(&Record::decode(&json, 0).expect("decodes"), r);
        }
        let short = commit("w-1", 7, 4, Some(2));
        assert_eq!(short.encode(), short.to_json());
        // Too long to be read back compressed: left as JSON (the producer refuses it whole).
        let huge = Record::Batch {
            seq: 1,
            events: 1,
            body: Bytes::from(format!("[\"{}\"]", "x".repeat(MAX_RECORD_BYTES))),
        };
        assert_eq!(huge.encode()[0], b'{');

        // Damaged: an error naming the offset, never a panic or a huge allocation.
        let good = long[0].encode();
        let mut wrong_len = good.clone();
        wrong_len[1..5].copy_from_slice(&7u32.to_le_bytes());
        let mut huge = good.clone();
        huge[1..5].copy_from_slice(&u32::MAX.to_le_bytes());
        for bad in [&good[..3], &good[..good.len() / 2], &wrong_len[..], &huge[..]] {
            let e = Record::decode(bad, 42).expect_err("damaged record refused");
            assert_eq!(e.offset, 42);
        }
    }

    #[test]
    fn deltas_then_a_snapshot_then_deltas_rebuild_the_latest_state() {
        let mut s = PartitionState::default();
        let delta = |keys: Vec<(&str, i64)>, pruned: Vec<(&str, i64)>| {
            Record::State(StateDelta {
                evicted: vec![],
                marks: keys.iter().map(|(d, ts)| (d.to_string(), *ts, *ts)).collect(),
                keys: keys.iter().map(|(d, ts)| (d.to_string(), *ts, 1, 2)).collect(),
                pruned: pruned.iter().map(|(d, b)| (d.to_string(), *b)).collect(),
                ..StateDelta::default()
            })
        };
        for r in [
            batch(0),
            batch(1),
            delta(vec![("a", 1), ("a", 2), ("b", 1)], vec![]),
            commit("w-1", 10, 2, None),
        ] {
            s.apply("t", 0, &r);
        }
        assert_eq!(s.outbox.len(), 2);
        assert_eq!(s.key_count(), 3);
        for r in [
            delta(vec![("a", 3)], vec![("a", 2)]),
            commit("w-2", 12, 2, Some(0)),
        ] {
            s.apply("t", 0, &r);
        }
        assert_eq!(s.outbox.keys().copied().collect::<Vec<_>>(), vec![1]);
        assert_eq!(s.outbox[&1].id, "t-0-1");
        assert_eq!(s.keys["a"].keys().copied().collect::<Vec<_>>(), vec![2, 3]);

        // A snapshot of that state, applied on top of anything, gives the same state.
        let mut other = PartitionState::default();
        other.apply("t", 0, &batch(99));
        for r in s.to_records("w-3") {
            other.apply("t", 0, &Record::decode(&r.encode(), 0).expect("decodes"));
        }
        assert_eq!(other, s);
    }

    #[test]
    fn forgotten_records_replace_marks_and_keys_and_a_live_mark_replaces_a_record() {
        let mut s = PartitionState::default();
        let state = |d: StateDelta| Record::State(d);
        s.apply(
            "t",
            0,
            &state(StateDelta {
                marks: vec![("a".into(), 5, 5), ("b".into(), 7, 7)],
                keys: vec![("a".into(), 5, 1, 2), ("b".into(), 7, 1, 2)],
                ..StateDelta::default()
            }),
        );
        s.apply(
            "t",
            0,
            &state(StateDelta {
                forgotten: vec![("a".into(), 5, 100), ("b".into(), 7, 100)],
                ..StateDelta::default()
            }),
        );
        assert!(
            s.marks.is_empty() && s.keys.is_empty(),
            "a record replaces what the device had"
        );
        assert_eq!(
            s.forgotten["a"],
            Forgotten {
                through: 5,
                at_ms: 100
            }
        );
        // a comes back (dropped first, then its live mark); b's record expires.
        s.apply(
            "t",
            0,
            &state(StateDelta {
                evicted: vec!["a".into(), "b".into()],
                marks: vec![("a".into(), 9, 5)],
                ..StateDelta::default()
            }),
        );
        assert!(s.forgotten.is_empty());
        assert_eq!(
            s.marks["a"],
            DeviceMark {
                max_ts: 9,
                released_max: 5
            }
        );
        // A live mark alone also supersedes a record.
        s.apply(
            "t",
            0,
            &state(StateDelta {
                forgotten: vec![("c".into(), 3, 1)],
                ..StateDelta::default()
            }),
        );
        s.apply(
            "t",
            0,
            &state(StateDelta {
                marks: vec![("c".into(), 4, 4)],
                ..StateDelta::default()
            }),
        );
        assert!(s.forgotten.is_empty());
        // A snapshot carries the records, and an earlier version's floor as it was read.
        s.apply(
            "t",
            0,
            &state(StateDelta {
                forgotten: vec![("d".into(), 8, 2)],
                ..StateDelta::default()
            }),
        );
        s.apply(
            "t",
            0,
            &state(StateDelta {
                forgotten_through: Some(42),
                ..StateDelta::default()
            }),
        );
        assert_eq!((s.forgotten_through, s.forgotten_through_until), (Some(42), None));
        let mut other = PartitionState::default();
        for r in s.to_records("w-1") {
            other.apply("t", 0, &Record::decode(&r.encode(), 0).expect("decodes"));
        }
        s.resume_offset = Some(0);
        assert_eq!(other, s);
        s.apply(
            "t",
            0,
            &state(StateDelta {
                former_floor: Some((42, 77)),
                ..StateDelta::default()
            }),
        );
        assert_eq!(
            (s.forgotten_through, s.forgotten_through_until),
            (Some(42), Some(77))
        );
        let mut other = PartitionState::default();
        for r in s.to_records("w-2") {
            other.apply("t", 0, &Record::decode(&r.encode(), 0).expect("decodes"));
        }
        assert_eq!(other, s);
    }

    #[test]
    fn a_state_record_of_the_version_before_forgotten_records_still_reads() {
        let old = br#"{"t":"state","evicted":["x"],"marks":[["d",10,10]],"forgotten_through":1700000000000}"#;
        let Record::State(d) = Record::decode(old, 0).expect("decodes") else {
            panic!("a state record")
        };
        assert_eq!(d.forgotten_through, Some(1_700_000_000_000));
        let mut s = PartitionState::default();
        s.apply("t", 0, &Record::State(d));
        assert_eq!(s.forgotten_through, Some(1_700_000_000_000));
        assert_eq!(s.forgotten_through_until, None, "set by the first restore");
    }

    proptest::proptest! {
        /// The range set agrees with a plain set under any inserts and removes.
        #[test]
        fn offset_ranges_behave_like_a_set(
            ops in proptest::collection::vec((proptest::bool::ANY, 0i64..300, 0i64..40), 1..200),
        ) {
            let mut ranges = OffsetRanges::default();
            let mut model = std::collections::BTreeSet::new();
            for (insert, start, len) in ops {
                if insert {
                    ranges.insert(start, start + len);
                    model.extend(start..start + len);
                } else {
                    ranges.remove(start, start + len);
                    model.retain(|o| !(start..start + len).contains(o));
                }
                let held: Vec<i64> = ranges.ranges().flat_map(|(a, b)| a..b).collect();
                proptest::prop_assert_eq!(&held, &model.iter().copied().collect::<Vec<_>>());
                let runs: Vec<(i64, i64)> = ranges.ranges().collect();
                proptest::prop_assert!(runs.windows(2).all(|w| w[0].1 < w[1].0), "maximal: {:?}", runs);
                proptest::prop_assert_eq!(ranges.len(), model.len() as u64);
                for o in -1..345 {
                    proptest::prop_assert_eq!(ranges.contains(o), model.contains(&o));
                }
            }
        }
    }

    #[test]
    fn the_log_must_reach_the_decided_offset_not_only_the_resume_offset() {
        let mut s = PartitionState::default();
        assert_eq!(s.log_must_reach(), 0, "nothing read yet");
        s.apply("t", 0, &commit("w-1", 6, 0, None));
        assert_eq!(
            s.log_must_reach(),
            7,
            "offset 6 waits, and was read: a log ending at 6 lost it"
        );
    }

    #[test]
    fn a_large_snapshot_is_chunked() {
        let keys: Vec<SeenKey> = (0..25_000)
            .map(|ts| SeenKey {
                device_id: "d".into(),
                ts,
                latitude_bits: 0,
                longitude_bits: 0,
            })
            .collect();
        let records = PartitionState::snapshot_records(vec![], keys, vec![], vec![], (None, None), vec![]);
        assert!(records.len() >= 4, "reset and several chunks: {}", records.len());
        for r in &records {
            assert!(
                r.to_json().len() < 1_000_000,
                "each record fits a broker's default message limit"
            );
        }
        let mut s = PartitionState::default();
        for r in &records {
            s.apply("t", 0, r);
        }
        assert_eq!(s.key_count(), 25_000);
    }
}
