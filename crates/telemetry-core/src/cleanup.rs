//! Stream cleanup for one partition, as pure synchronous code: deduplication by `(deviceId, ts)`,
//! per-device watermarks, a reorder buffer released in ts order, idle flush, and forgetting of
//! devices that fell silent. Time is passed in (processing time, milliseconds since the Unix
//! epoch in the processor); nothing here reads a clock or does I/O.
//!
//! Every rule is per device: an event's fate depends only on its own device's history, never on
//! another device's clock or on which devices share the partition.
//! - A device's watermark is `max(max_ts - allowed_lateness, released_max)`. An event below its
//!   device's watermark on arrival is late, and so is one at or below `released_max` that is not
//!   a duplicate of a kept identity. Buffered events with `ts <= watermark` are released in ts
//!   order. A device silent for `idle_timeout_ms` has its whole buffer released, which raises
//!   `released_max`. Identities of released events are kept while `ts >= max_ts - dedup_horizon`.
//! - A device never seen has nothing that could be a duplicate: it is judged from its first
//!   event on.
//! - A device with nothing buffered and silent for `forget_after_ms` (processing time, its own
//!   last arrival) is forgotten: its marks and identities leave memory, and a small record stays
//!   (its id and `through`, the newest ts released for it). Back, it is judged against that:
//!   nothing at or below `through` is stored again (late), everything newer by its own
//!   watermark, starting at `through`. Forgotten or not, a device releases the same events; when
//!   it is forgotten changes only whether a resend of a released event counts as a duplicate or
//!   as late.
//! - A forgotten device's record is dropped `forgotten_retention_ms` (plus up to a sixty-fourth of
//!   it) after it was forgotten: a device silent longer than that is new again, and a resend of
//!   an event it sent before then would be stored again (after its newer events).
//!
//! Work per event, per tick and per checkpoint follows the devices concerned, not all devices:
//! changed devices are listed as they change, waiting ones are indexed, and devices are bucketed
//! by their last arrival for forgetting; records are scanned for expiry at most 64 times per
//! retention.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::Event;

/// The cleanup parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CleanupConfig {
    /// How far behind a device's highest ts an event may arrive and still be in time (ms).
    pub allowed_lateness_ms: i64,
    /// How long (event time behind the device's highest ts) released identities are kept (ms).
    pub dedup_horizon_ms: i64,
    /// Processing time after a device's last event when its buffer is released (ms).
    pub idle_timeout_ms: u64,
    /// Processing time after a device's last event when it is forgotten, if nothing of it waits
    /// (ms).
    pub forget_after_ms: u64,
    /// Processing time a forgotten device's record is kept (ms).
    pub forgotten_retention_ms: u64,
}

impl Default for CleanupConfig {
    fn default() -> Self {
        Self {
            allowed_lateness_ms: 5_000,
            dedup_horizon_ms: 600_000,
            idle_timeout_ms: 5_000,
            forget_after_ms: 600_000,
            forgotten_retention_ms: 7 * 24 * 3_600_000,
        }
    }
}

/// What happened to one event on arrival.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// In the reorder buffer; it comes out of `drain_released` once the watermark passes it.
    Buffered,
    /// Same identity and coordinates as an event already seen: dropped.
    Duplicate,
    /// Same identity, other coordinates: the first one wins, this one is dropped.
    Conflict,
    /// Must not reach the sink; which rule says so.
    Late(Late),
}

/// Which rule made an event late (each is about the event's own device).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Late {
    /// More than the allowed lateness behind the newest ts of its device.
    Watermark,
    /// At or below the newest ts already released for its device (released early by an idle
    /// flush, or its identity no longer kept), and not a duplicate of a kept identity.
    Released,
    /// At or below what was released for its device before the device was forgotten (or below
    /// the partition-wide floor a changelog of an earlier version recorded).
    Forgotten,
}

impl Late {
    /// The rule, as a dead letter's detail says it.
    pub fn detail(self) -> &'static str {
        match self {
            Late::Watermark => "ts below the device's watermark (its newest ts minus the allowed lateness)",
            Late::Released => "ts at or below the newest ts already released for the device (idle flush)",
            Late::Forgotten => "ts at or below what was released for the device before it was forgotten",
        }
    }
}

/// An event leaving the reorder buffer, with the offset it was read at.
#[derive(Debug, Clone, PartialEq)]
pub struct Released {
    pub event: Event,
    pub offset: i64,
}

/// What is persisted per device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceMark {
    /// Highest ts seen (buffered or released).
    pub max_ts: i64,
    /// Highest ts released (`i64::MIN` when none).
    pub released_max: i64,
}

/// What is kept of a forgotten device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forgotten {
    /// The newest ts released for it: nothing at or below is stored again.
    pub through: i64,
    /// When it was forgotten (processing time, ms).
    pub at_ms: u64,
}

/// The floor a changelog of an earlier version recorded for the whole partition (the newest ts
/// of every device it forgot), kept for devices without a record of their own until `until_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FormerFloor {
    pub through: i64,
    pub until_ms: u64,
}

/// A released identity with its coordinates' bits (to tell duplicates from conflicts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenKey {
    pub device_id: String,
    pub ts: i64,
    pub latitude_bits: u64,
    pub longitude_bits: u64,
}

/// State changes since the last `take_changes`: what a checkpoint must persist, applied in the
/// order of the fields.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Changes {
    /// Devices whose persisted mark, identities and forgotten record are dropped: forgotten and
    /// back since (what it is now follows), or whose record expired.
    pub evicted: Vec<String>,
    /// Devices forgotten since, with their records; each replaces the device's mark and keys.
    pub forgotten: Vec<(String, Forgotten)>,
    /// Devices whose mark changed, with the new mark.
    pub devices: Vec<(String, DeviceMark)>,
    /// Identities released since the last checkpoint.
    pub new_keys: Vec<SeenKey>,
    /// Identities dropped from the horizon: for each device, every key below the given ts.
    pub pruned: Vec<(String, i64)>,
    /// The former partition floor, when its expiry was first set.
    pub former_floor: Option<FormerFloor>,
}

#[derive(Debug)]
struct Device {
    mark: DeviceMark,
    /// Waiting events by ts, with the offset each was read at.
    buffer: BTreeMap<i64, (Event, i64)>,
    /// Released identities by ts: coordinates' bits.
    seen: BTreeMap<i64, (u64, u64)>,
    last_arrival_ms: u64,
    /// What it came back from being forgotten with (`i64::MIN`: none): events at or below are
    /// late for that reason.
    floor: i64,
    dirty: bool,
    pruned_below: Option<i64>,
    /// In the cleaner's list of changed devices.
    listed: bool,
    /// Forgetting bucket of `last_arrival_ms`.
    bucket: u64,
}

impl Device {
    fn new(now_ms: u64, through: i64) -> Self {
        Device {
            mark: DeviceMark {
                max_ts: through,
                released_max: through,
            },
            buffer: BTreeMap::new(),
            seen: BTreeMap::new(),
            last_arrival_ms: now_ms,
            floor: through,
            dirty: false,
            pruned_below: None,
            listed: false,
            bucket: u64::MAX,
        }
    }

    fn watermark(&self, lateness: i64) -> i64 {
        self.mark
            .max_ts
            .saturating_sub(lateness)
            .max(self.mark.released_max)
    }
}

/// Cleanup state of one partition.
#[derive(Debug)]
pub struct Cleaner {
    config: CleanupConfig,
    devices: HashMap<String, Device>,
    /// Everything but the device map, so a device and the outputs borrow apart.
    out: Outputs,
    /// Newest event time of the partition (`i64::MIN`: none); for metrics only, it decides
    /// nothing.
    max_ts: i64,
    /// Device ids by the forgetting bucket of their last arrival; an entry whose device has
    /// moved on to a later bucket is stale and skipped.
    buckets: BTreeMap<u64, Vec<String>>,
    /// Forgotten devices.
    forgotten: HashMap<String, Forgotten>,
    /// The oldest record's `at_ms` as of the last expiry scan, or older (`u64::MAX`: none).
    oldest_record_ms: u64,
    /// Devices forgotten, back, or expired since the last `take_changes` (may repeat).
    forgotten_since: Vec<String>,
    evicted_total: u64,
    former_floor: Option<FormerFloor>,
    former_floor_changed: bool,
}

impl Cleaner {
    pub fn new(config: CleanupConfig) -> Self {
        Cleaner {
            config,
            devices: HashMap::new(),
            out: Outputs::default(),
            max_ts: i64::MIN,
            buckets: BTreeMap::new(),
            forgotten: HashMap::new(),
            oldest_record_ms: u64::MAX,
            forgotten_since: Vec::new(),
            evicted_total: 0,
            former_floor: None,
            former_floor_changed: false,
        }
    }

    /// Rebuilds the state a checkpoint persisted (marks and released identities). Restored
    /// devices count as arrived at `now_ms`.
    pub fn restore(
        config: CleanupConfig,
        marks: Vec<(String, DeviceMark)>,
        keys: Vec<SeenKey>,
        now_ms: u64,
    ) -> Self {
        let mut c = Cleaner::new(config);
        for (device, mark) in marks {
            let mut d = Device::new(now_ms, i64::MIN);
            d.mark = mark;
            c.max_ts = c.max_ts.max(mark.max_ts);
            c.devices.insert(device, d);
        }
        for k in keys {
            let d = c
                .devices
                .entry(k.device_id)
                .or_insert_with(|| Device::new(now_ms, i64::MIN));
            if d.seen.insert(k.ts, (k.latitude_bits, k.longitude_bits)).is_none() {
                c.out.seen += 1;
            }
        }
        c.rebucket();
        c
    }

    /// The forgotten devices' records a checkpoint persisted, for a restored cleaner.
    pub fn with_forgotten(mut self, forgotten: impl IntoIterator<Item = (String, Forgotten)>) -> Self {
        for (id, f) in forgotten {
            if self.devices.contains_key(&id) {
                continue; // a live mark supersedes a record
            }
            self.oldest_record_ms = self.oldest_record_ms.min(f.at_ms);
            self.forgotten.insert(id, f);
        }
        self
    }

    /// The partition-wide floor a changelog of an earlier version recorded (`until_ms` once a
    /// restore of this version set it): until then, a device without a record of its own is
    /// late at or below it, and starts there. The first restore sets its expiry to the
    /// retention of a forgotten device's record from `now_ms`.
    pub fn with_former_floor(mut self, through: Option<i64>, until_ms: Option<u64>, now_ms: u64) -> Self {
        if let Some(through) = through {
            let until_ms = until_ms.unwrap_or_else(|| {
                self.former_floor_changed = true;
                now_ms.saturating_add(self.config.forgotten_retention_ms)
            });
            self.former_floor = (until_ms > now_ms).then_some(FormerFloor { through, until_ms });
        }
        self
    }

    /// The former partition floor, while it applies.
    pub fn former_floor(&self) -> Option<FormerFloor> {
        self.former_floor
    }

    fn forget_width(&self) -> u64 {
        (self.config.forget_after_ms / 16).max(1)
    }

    /// Files every device under the forgetting bucket of its last arrival.
    fn rebucket(&mut self) {
        let width = self.forget_width();
        self.buckets.clear();
        for (id, d) in self.devices.iter_mut() {
            d.bucket = d.last_arrival_ms / width;
            self.buckets.entry(d.bucket).or_default().push(id.clone());
        }
    }

    /// Changes the settings from the next event on. With a lower lateness, what waits below its
    /// device's new watermark is released at once; otherwise what is buffered stays, and is
    /// released by the new watermarks as events arrive. Either way, waiting devices keep only
    /// the identities of the new horizon: the same as a cleaner restored with these settings
    /// does once what was waiting is back ([`Cleaner::release_below_watermarks`]).
    pub fn set_config(&mut self, config: CleanupConfig) {
        let refile = config.forget_after_ms != self.config.forget_after_ms;
        self.config = config;
        if refile {
            self.rebucket();
        }
        self.release_below_watermarks();
    }

    /// Releases what waits at or below its device's watermark (after the lateness was lowered,
    /// or once events were put back with [`Cleaner::rebuffer`]), so whatever waits is above it.
    pub fn release_below_watermarks(&mut self) {
        let horizon = self.horizon();
        let lateness = self.config.allowed_lateness_ms;
        let mut waiting: Vec<String> = self.out.waiting.iter().cloned().collect();
        // In a fixed order, so that the same state releases the same sequence.
        waiting.sort_unstable();
        for id in waiting {
            if let Some(device) = self.devices.get_mut(&id) {
                let watermark = device.watermark(lateness);
                self.out.release_through(&id, device, watermark, horizon);
            }
        }
    }

    /// Puts an event that was waiting at a checkpoint back into its device's buffer, as it was:
    /// no duplicate or lateness decision (it was accepted then, and the restored marks already
    /// count it) and no release (the device's other waiting events may not be back yet; call
    /// [`Cleaner::release_below_watermarks`] once all are). False if its identity is already
    /// buffered or released, which a consistent checkpoint never gives.
    pub fn rebuffer(&mut self, event: Event, offset: i64, now_ms: u64) -> bool {
        if !self.devices.contains_key(&event.device_id) {
            let through = self.come_back(&event.device_id);
            self.devices
                .insert(event.device_id.clone(), Device::new(now_ms, through));
        }
        let width = self.forget_width();
        let device = self.devices.get_mut(&event.device_id).expect("inserted above");
        if device.buffer.contains_key(&event.ts) || device.seen.contains_key(&event.ts) {
            return false;
        }
        arrive(device, &event.device_id, now_ms, width, &mut self.buckets);
        // A consistent checkpoint's mark already counts every waiting event, so the mark only
        // changes for one that does not.
        admit(device, event, offset, &mut self.max_ts, &mut self.out);
        true
    }

    /// A device unknown to the live map becomes live again: its forgotten record (or the former
    /// partition floor) is what it starts from.
    fn come_back(&mut self, id: &str) -> i64 {
        if let Some(f) = self.forgotten.remove(id) {
            self.forgotten_since.push(id.to_owned());
            return f.through;
        }
        self.former_floor.map_or(i64::MIN, |f| f.through)
    }

    pub fn config(&self) -> &CleanupConfig {
        &self.config
    }

    fn horizon(&self) -> i64 {
        self.config.dedup_horizon_ms.max(1)
    }

    /// Classifies one event read at `offset` and releases what its watermark lets go.
    pub fn process(&mut self, event: Event, offset: i64, now_ms: u64) -> Outcome {
        let lateness = self.config.allowed_lateness_ms;
        let horizon = self.horizon();
        let width = self.forget_width();
        // One lookup for a known device (the common case).
        let device = match self.devices.get_mut(&event.device_id) {
            Some(d) => d,
            None => {
                let floor = match self.forgotten.get(&event.device_id) {
                    Some(f) => f.through,
                    None => self.former_floor.map_or(i64::MIN, |f| f.through),
                };
                if event.ts <= floor {
                    return Outcome::Late(Late::Forgotten);
                }
                let through = self.come_back(&event.device_id);
                self.devices
                    .entry(event.device_id.clone())
                    .or_insert(Device::new(now_ms, through))
            }
        };
        arrive(device, &event.device_id, now_ms, width, &mut self.buckets);
        let pos = (event.latitude.to_bits(), event.longitude.to_bits());
        if let Some((first, _)) = device.buffer.get(&event.ts) {
            return if first.same_position(&event) {
                Outcome::Duplicate
            } else {
                Outcome::Conflict
            };
        }
        if let Some(&seen) = device.seen.get(&event.ts) {
            return if seen == pos {
                Outcome::Duplicate
            } else {
                Outcome::Conflict
            };
        }
        if event.ts <= device.floor {
            return Outcome::Late(Late::Forgotten);
        }
        if device.mark.max_ts != i64::MIN && event.ts < device.mark.max_ts.saturating_sub(lateness) {
            return Outcome::Late(Late::Watermark);
        }
        // At or below what was released, and not found above: its identity was pruned (it is the
        // released one, or older), or an idle flush released past it.
        if event.ts <= device.mark.released_max {
            return Outcome::Late(Late::Released);
        }
        let id = event.device_id.clone();
        admit(device, event, offset, &mut self.max_ts, &mut self.out);
        let watermark = device.watermark(lateness);
        self.out.release_through(&id, device, watermark, horizon);
        Outcome::Buffered
    }

    /// Releases the buffers of devices silent for the idle timeout (processing time), forgets
    /// devices silent for `forget_after_ms` with nothing buffered, and drops forgotten records
    /// older than their retention. Call it only when the partition has nothing unread (after a
    /// restore, what is read again must find the devices it knew).
    pub fn tick(&mut self, now_ms: u64) {
        let idle = self.config.idle_timeout_ms;
        let horizon = self.horizon();
        let due: Vec<String> = self
            .out
            .waiting
            .iter()
            .filter(|id| {
                self.devices
                    .get(*id)
                    .is_some_and(|d| now_ms.saturating_sub(d.last_arrival_ms) >= idle)
            })
            .cloned()
            .collect();
        for id in due {
            if let Some(device) = self.devices.get_mut(&id) {
                self.out.release_through(&id, device, i64::MAX, horizon);
            }
        }
        self.forget_silent(now_ms);
        self.expire(now_ms);
        if self.former_floor.is_some_and(|f| f.until_ms <= now_ms) {
            self.former_floor = None;
        }
    }

    /// Forgets every device of the buckets wholly past `forget_after_ms` that is silent that
    /// long and has nothing buffered; the others (waiting for an idle flush) stay in their
    /// bucket and are looked at again at the next tick.
    fn forget_silent(&mut self, now_ms: u64) {
        let after = self.config.forget_after_ms;
        let Some(cutoff) = now_ms.checked_sub(after) else {
            return;
        };
        let below = cutoff / self.forget_width();
        let before = self.devices.len();
        let mut waiting = Vec::new();
        while let Some(entry) = self.buckets.first_entry() {
            if *entry.key() >= below {
                break;
            }
            let (bucket, ids) = entry.remove_entry();
            for id in ids {
                let Some(d) = self.devices.get(&id) else { continue };
                if d.bucket != bucket {
                    continue; // moved on to a later bucket
                }
                if d.last_arrival_ms <= cutoff && d.buffer.is_empty() {
                    // The map's own key becomes the record's: no id is allocated again.
                    let (key, d) = self.devices.remove_entry(&id).expect("looked up above");
                    self.out.seen -= d.seen.len();
                    self.evicted_total += 1;
                    // Nothing waits, so everything admitted was released: `max_ts` is the newest
                    // ts released (a restored mark may not say so in `released_max`).
                    let through = d.mark.max_ts.max(d.mark.released_max);
                    self.oldest_record_ms = self.oldest_record_ms.min(now_ms);
                    self.forgotten.insert(
                        key,
                        Forgotten {
                            through,
                            at_ms: now_ms,
                        },
                    );
                    self.forgotten_since.push(id);
                } else {
                    waiting.push((bucket, id));
                }
            }
        }
        for (bucket, id) in waiting {
            self.buckets.entry(bucket).or_default().push(id);
        }
        if self.devices.len() < before && self.devices.capacity() > 4 * self.devices.len() + 1024 {
            // Give the memory of a large wave of forgotten devices back.
            self.devices.shrink_to(2 * self.devices.len());
        }
    }

    /// Drops the records of devices forgotten longer ago than the retention. The records are
    /// scanned once the oldest is due by a sixty-fourth of the retention, so a record is kept
    /// between one retention and that much longer, and a scan comes at most once per that
    /// sixty-fourth: no index of records by age, which would hold every id a second time.
    fn expire(&mut self, now_ms: u64) {
        let retention = self.config.forgotten_retention_ms;
        let Some(cutoff) = now_ms.checked_sub(retention) else {
            return;
        };
        if self.oldest_record_ms.saturating_add(retention / 64) > cutoff {
            return;
        }
        let before = self.forgotten.len();
        let mut oldest = u64::MAX;
        let expired = &mut self.forgotten_since;
        self.forgotten.retain(|id, f| {
            if f.at_ms <= cutoff {
                expired.push(id.clone());
                false
            } else {
                oldest = oldest.min(f.at_ms);
                true
            }
        });
        self.oldest_record_ms = oldest;
        if self.forgotten.len() < before && self.forgotten.capacity() > 4 * self.forgotten.len() + 1024 {
            self.forgotten.shrink_to(2 * self.forgotten.len());
        }
    }

    /// Events released since the last call, each device's in ts order.
    pub fn drain_released(&mut self) -> Vec<Released> {
        std::mem::take(&mut self.out.released)
    }

    /// True when devices were forgotten, came back or had their records expire since the last
    /// `take_changes` (a checkpoint records it).
    pub fn has_forgetting(&self) -> bool {
        !self.forgotten_since.is_empty() || self.former_floor_changed
    }

    /// True when released events wait to be drained.
    pub fn has_released(&self) -> bool {
        !self.out.released.is_empty()
    }

    /// Lowest offset of any event still in a reorder buffer.
    pub fn min_buffered_offset(&self) -> Option<i64> {
        self.out.offsets.min()
    }

    /// The offsets of buffered events from `from` on, as ranges `[start, end)` in order.
    pub fn buffered_offset_ranges(&self, from: i64) -> Vec<(i64, i64)> {
        self.out.offsets.ranges(from)
    }

    /// Whether an event read at an offset in `[start, end)` is buffered.
    pub fn any_buffered_in(&self, start: i64, end: i64) -> bool {
        self.out.offsets.any_in(start, end)
    }

    /// State changes since the last call (for a checkpoint).
    pub fn take_changes(&mut self) -> Changes {
        let mut changes = Changes {
            former_floor: std::mem::take(&mut self.former_floor_changed)
                .then_some(self.former_floor)
                .flatten(),
            ..Changes::default()
        };
        let mut ids = std::mem::take(&mut self.forgotten_since);
        ids.sort_unstable();
        ids.dedup();
        for id in ids {
            match self.forgotten.get(&id) {
                Some(f) => changes.forgotten.push((id, *f)),
                // Back (what it is now follows) or expired.
                None => changes.evicted.push(id),
            }
        }
        // Only identities still kept: not those of a device forgotten since (even if it came
        // back: its eviction is applied first, then what it is now), nor those pruned since.
        let devices = &self.devices;
        changes.new_keys = std::mem::take(&mut self.out.new_keys)
            .into_iter()
            .filter(|k| {
                devices
                    .get(&k.device_id)
                    .is_some_and(|d| d.seen.get(&k.ts) == Some(&(k.latitude_bits, k.longitude_bits)))
            })
            .collect();
        for id in std::mem::take(&mut self.out.changed) {
            let Some(d) = self.devices.get_mut(&id) else {
                continue;
            };
            d.listed = false;
            if d.dirty {
                changes.devices.push((id.clone(), d.mark));
                d.dirty = false;
            }
            if let Some(below) = d.pruned_below.take() {
                changes.pruned.push((id, below));
            }
        }
        changes
    }

    /// Everything a checkpoint persists, in full (for a snapshot): every device's mark and every
    /// identity kept for deduplication. Waiting events are not part of it (they are read again).
    pub fn snapshot(&self) -> (Vec<(String, DeviceMark)>, Vec<SeenKey>) {
        let mut marks = Vec::with_capacity(self.devices.len());
        let mut keys = Vec::with_capacity(self.out.seen);
        for (id, d) in &self.devices {
            marks.push((id.clone(), d.mark));
            keys.extend(d.seen.iter().map(|(ts, (lat, lon))| SeenKey {
                device_id: id.clone(),
                ts: *ts,
                latitude_bits: *lat,
                longitude_bits: *lon,
            }));
        }
        (marks, keys)
    }

    /// Every forgotten device's record (for a snapshot).
    pub fn forgotten_records(&self) -> Vec<(String, Forgotten)> {
        self.forgotten.iter().map(|(id, f)| (id.clone(), *f)).collect()
    }

    /// Events in reorder buffers.
    pub fn buffered_len(&self) -> usize {
        self.out.buffered
    }

    /// Released identities kept for deduplication.
    pub fn dedup_len(&self) -> usize {
        self.out.seen
    }

    /// Devices known to this partition.
    pub fn device_count(&self) -> usize {
        self.devices.len()
    }

    /// Forgotten devices whose records are kept.
    pub fn forgotten_count(&self) -> usize {
        self.forgotten.len()
    }

    /// Devices forgotten since this cleaner was made.
    pub fn evicted_total(&self) -> u64 {
        self.evicted_total
    }

    /// The partition's newest event time minus the allowed lateness: the highest watermark a
    /// device can have (event time, ms; for metrics).
    pub fn max_watermark(&self) -> Option<i64> {
        (self.max_ts != i64::MIN).then(|| self.max_ts.saturating_sub(self.config.allowed_lateness_ms))
    }
}

/// An event of the device arrived: it is not silent, and is refiled for forgetting when its
/// last arrival moved to a later bucket (`width`: the bucket width).
fn arrive(device: &mut Device, id: &str, now_ms: u64, width: u64, buckets: &mut BTreeMap<u64, Vec<String>>) {
    device.last_arrival_ms = device.last_arrival_ms.max(now_ms);
    let bucket = device.last_arrival_ms / width;
    if bucket != device.bucket {
        device.bucket = bucket;
        buckets.entry(bucket).or_default().push(id.to_owned());
    }
}

/// Takes an event into its device's buffer. When it is the device's newest, the device's and the
/// partition's newest event times rise to it, and the device is listed as changed.
fn admit(device: &mut Device, event: Event, offset: i64, partition_max: &mut i64, out: &mut Outputs) {
    if event.ts > device.mark.max_ts {
        device.mark.max_ts = event.ts;
        *partition_max = (*partition_max).max(event.ts);
        device.dirty = true;
        if !device.listed {
            device.listed = true;
            out.changed.push(event.device_id.clone());
        }
    }
    if device.buffer.is_empty() {
        out.waiting.insert(event.device_id.clone());
    }
    device.buffer.insert(event.ts, (event, offset));
    out.offsets.add(offset);
    out.buffered += 1;
}

/// The cleaner's outputs and counters, apart from its device map.
#[derive(Debug, Default)]
struct Outputs {
    released: Vec<Released>,
    new_keys: Vec<SeenKey>,
    /// Offsets of buffered events (multiset), for the resume offset.
    offsets: OffsetCounts,
    buffered: usize,
    seen: usize,
    /// Devices changed since the last `take_changes`.
    changed: Vec<String>,
    /// Devices with buffered events.
    waiting: HashSet<String>,
}

impl Outputs {
    /// Moves the device's buffered events with `ts <= through` out, in ts order, records their
    /// identities, and prunes identities that fell out of the horizon.
    fn release_through(&mut self, id: &str, device: &mut Device, through: i64, horizon: i64) {
        let mut released_any = false;
        // Most calls release one event or none: take them off the front, one at a time.
        while let Some(entry) = device.buffer.first_entry() {
            if *entry.key() > through {
                break;
            }
            let (ts, (event, offset)) = entry.remove_entry();
            released_any = true;
            self.offsets.remove(offset);
            self.buffered -= 1;
            let bits = (event.latitude.to_bits(), event.longitude.to_bits());
            if device.seen.insert(ts, bits).is_none() {
                self.seen += 1;
            }
            self.new_keys.push(SeenKey {
                device_id: id.to_owned(),
                ts,
                latitude_bits: bits.0,
                longitude_bits: bits.1,
            });
            device.mark.released_max = device.mark.released_max.max(ts);
            device.dirty = true;
            self.released.push(Released { event, offset });
        }
        if released_any && device.buffer.is_empty() {
            self.waiting.remove(id);
        }
        let floor = device.mark.max_ts.saturating_sub(horizon);
        if device.seen.first_key_value().is_some_and(|(ts, _)| *ts < floor) {
            let kept = device.seen.split_off(&floor);
            self.seen -= device.seen.len();
            device.seen = kept;
            device.pruned_below = Some(floor);
        }
        if (device.dirty || device.pruned_below.is_some()) && !device.listed {
            device.listed = true;
            self.changed.push(id.to_owned());
        }
    }
}

/// A multiset of offsets: a sparse bitset (64 offsets a word, only words with a bit set are
/// kept), plus the few offsets held more than once. Offsets arrive in increasing order and leave
/// roughly in it, so an event touches one word that usually exists already: no allocation per
/// event (a `BTreeMap` of offsets allocated now and then, per event), and memory follows the
/// events buffered, not the span of offsets between the oldest and the newest (one event held
/// for long while millions pass must not cost a bit for each of them).
#[derive(Debug, Default)]
struct OffsetCounts {
    /// Word index (`offset.div_euclid(64)`) to its bits; never a zero word.
    words: BTreeMap<i64, u64>,
    /// Offsets added again while their bit was set: how many times more.
    extra: HashMap<i64, u32>,
}

impl OffsetCounts {
    fn add(&mut self, offset: i64) {
        let word = self.words.entry(offset.div_euclid(64)).or_insert(0);
        let bit = 1u64 << offset.rem_euclid(64);
        if *word & bit != 0 {
            *self.extra.entry(offset).or_insert(0) += 1;
        } else {
            *word |= bit;
        }
    }

    fn remove(&mut self, offset: i64) {
        if let Some(n) = self.extra.get_mut(&offset) {
            *n -= 1;
            if *n == 0 {
                self.extra.remove(&offset);
            }
            return;
        }
        let index = offset.div_euclid(64);
        if let Some(word) = self.words.get_mut(&index) {
            *word &= !(1u64 << offset.rem_euclid(64));
            if *word == 0 {
                self.words.remove(&index);
            }
        }
    }

    fn min(&self) -> Option<i64> {
        let (index, bits) = self.words.first_key_value()?;
        Some(index * 64 + i64::from(bits.trailing_zeros()))
    }

    /// The offsets held, from `from` on, as maximal ranges `[start, end)`.
    fn ranges(&self, from: i64) -> Vec<(i64, i64)> {
        let mut out: Vec<(i64, i64)> = Vec::new();
        for (&index, &word) in self.words.range(from.div_euclid(64)..) {
            let mut bits = word;
            if index == from.div_euclid(64) {
                bits &= u64::MAX << from.rem_euclid(64);
            }
            while bits != 0 {
                let low = bits.trailing_zeros();
                let run = (bits >> low).trailing_ones();
                let start = index * 64 + i64::from(low);
                let end = start + i64::from(run);
                match out.last_mut() {
                    Some(last) if last.1 == start => last.1 = end,
                    _ => out.push((start, end)),
                }
                bits = if low + run >= 64 {
                    0
                } else {
                    bits & (u64::MAX << (low + run))
                };
            }
        }
        out
    }

    /// Whether any offset in `[start, end)` is held.
    fn any_in(&self, start: i64, end: i64) -> bool {
        if start >= end {
            return false;
        }
        let (first, last) = (start.div_euclid(64), (end - 1).div_euclid(64));
        self.words.range(first..=last).any(|(&index, &word)| {
            let mut bits = word;
            if index == first {
                bits &= u64::MAX << start.rem_euclid(64);
            }
            if index == last {
                bits &= u64::MAX >> (63 - (end - 1).rem_euclid(64));
            }
            bits != 0
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeSet, HashSet};

    fn ev(device: &str, ts: i64) -> Event {
        Event {
            device_id: device.to_owned(),
            ts,
            latitude: 1.0,
            longitude: 2.0,
        }
    }

    /// Forgetting after the horizon's length of silence; records kept for good.
    fn cfg(lateness: i64, horizon: i64, idle: u64) -> CleanupConfig {
        cfg_forget(lateness, horizon, idle, horizon as u64, u64::MAX / 4)
    }

    fn cfg_forget(
        lateness: i64,
        horizon: i64,
        idle: u64,
        forget_after: u64,
        retention: u64,
    ) -> CleanupConfig {
        CleanupConfig {
            allowed_lateness_ms: lateness,
            dedup_horizon_ms: horizon,
            idle_timeout_ms: idle,
            forget_after_ms: forget_after,
            forgotten_retention_ms: retention,
        }
    }

    fn released_ts(c: &mut Cleaner) -> Vec<i64> {
        c.drain_released().into_iter().map(|r| r.event.ts).collect()
    }

    #[test]
    fn out_of_order_events_within_lateness_are_released_in_ts_order() {
        let mut c = Cleaner::new(cfg(100, 10_000, 1_000));
        for (i, ts) in [1000, 950, 1020, 990].into_iter().enumerate() {
            assert_eq!(c.process(ev("d", ts), i as i64, 0), Outcome::Buffered);
        }
        assert!(
            released_ts(&mut c).is_empty(),
            "nothing is below the watermark 920 yet"
        );
        c.process(ev("d", 1100), 4, 0); // watermark 1000
        assert_eq!(released_ts(&mut c), vec![950, 990, 1000]);
        assert_eq!(c.min_buffered_offset(), Some(2)); // 1020 was read at offset 2
    }

    #[test]
    fn duplicate_and_conflict_are_told_apart_before_and_after_release() {
        let mut c = Cleaner::new(cfg(100, 10_000, 1_000));
        c.process(ev("d", 1000), 0, 0);
        assert_eq!(c.process(ev("d", 1000), 1, 0), Outcome::Duplicate);
        let mut moved = ev("d", 1000);
        moved.latitude = 3.0;
        assert_eq!(c.process(moved.clone(), 2, 0), Outcome::Conflict);
        c.process(ev("d", 2000), 3, 0);
        assert_eq!(released_ts(&mut c), vec![1000]);
        assert_eq!(c.process(ev("d", 1000), 4, 0), Outcome::Duplicate);
        assert_eq!(c.process(moved, 5, 0), Outcome::Conflict);
    }

    #[test]
    fn late_event_is_classified_late_and_never_released() {
        let mut c = Cleaner::new(cfg(100, 10_000, 1_000));
        c.process(ev("d", 1000), 0, 0);
        assert_eq!(c.process(ev("d", 899), 1, 0), Outcome::Late(Late::Watermark));
        assert_eq!(
            c.process(ev("d", 900), 2, 0),
            Outcome::Buffered,
            "exactly at the watermark is in time"
        );
        assert_eq!(
            c.process(ev("other", 5), 3, 0),
            Outcome::Buffered,
            "watermarks are per device"
        );
        c.tick(10_000);
        let mut out = released_ts(&mut c);
        out.sort();
        assert_eq!(out, vec![5, 900, 1000]);
    }

    #[test]
    fn idle_device_is_flushed_and_its_stragglers_become_late() {
        let mut c = Cleaner::new(cfg(5_000, 600_000, 2_000));
        c.process(ev("quiet", 10_000), 0, 100);
        c.process(ev("quiet", 9_000), 1, 200);
        c.tick(2_100);
        assert!(released_ts(&mut c).is_empty(), "1.9 s of silence is not idle yet");
        c.tick(2_200);
        assert_eq!(released_ts(&mut c), vec![9_000, 10_000]);
        assert_eq!(c.min_buffered_offset(), None);
        assert_eq!(
            c.process(ev("quiet", 9_500), 2, 2_300),
            Outcome::Late(Late::Released)
        );
        assert_eq!(c.process(ev("quiet", 10_001), 3, 2_300), Outcome::Buffered);
    }

    #[test]
    fn dedup_keys_are_pruned_beyond_the_horizon() {
        let mut c = Cleaner::new(cfg(10, 1_000, 1_000));
        for i in 0..100 {
            c.process(ev("d", i * 100), i, 0);
        }
        c.drain_released();
        // max_ts 9900: keys below 8900 are gone; released keys run up to the watermark 9890.
        assert_eq!(c.dedup_len(), 10, "keys 8900..=9800 remain");
        let changes = c.take_changes();
        assert_eq!(changes.pruned.last(), Some(&("d".to_owned(), 8_900)));
        assert_eq!(
            c.process(ev("d", 100), 200, 0),
            Outcome::Late(Late::Watermark),
            "a pruned identity is late, never re-emitted"
        );
    }

    #[test]
    fn take_changes_reports_marks_and_new_keys_once() {
        let mut c = Cleaner::new(cfg(10, 1_000, 1_000));
        c.process(ev("d", 100), 0, 0);
        c.process(ev("d", 200), 1, 0);
        let ch = c.take_changes();
        assert_eq!(
            ch.devices,
            vec![(
                "d".to_owned(),
                DeviceMark {
                    max_ts: 200,
                    released_max: 100
                }
            )]
        );
        assert_eq!(ch.new_keys.iter().map(|k| k.ts).collect::<Vec<_>>(), vec![100]);
        assert_eq!(c.take_changes(), Changes::default());
    }

    #[test]
    fn a_silent_device_is_forgotten_by_its_own_silence_and_judged_by_its_record_when_back() {
        let mut c = Cleaner::new(cfg_forget(10, 1_000, 100, 5_000, 1_000_000));
        c.process(ev("old", 1_000), 0, 0);
        c.tick(1_000);
        assert_eq!(released_ts(&mut c), vec![1_000], "idle flush");
        // Another device far ahead in event time forgets nobody: only silence does.
        c.process(ev("ahead", 900_000_000), 1, 4_000);
        c.tick(4_999);
        assert_eq!(c.device_count(), 2, "old is silent 4,999 ms of 5,000: kept");
        // Forgotten at the first tick once its bucket (a sixteenth of forget_after wide) is
        // wholly past forget_after: between 5,000 and 5,312 ms of silence.
        c.tick(5_400);
        assert_eq!(c.device_count(), 1, "old is forgotten, ahead stays");
        assert_eq!(c.forgotten_count(), 1);
        assert_eq!(
            c.dedup_len(),
            1,
            "old's identity went with it; ahead's (flushed) stays"
        );
        let ch = c.take_changes();
        assert_eq!(
            ch.forgotten,
            vec![(
                "old".to_owned(),
                Forgotten {
                    through: 1_000,
                    at_ms: 5_400
                }
            )]
        );
        assert!(ch.evicted.is_empty());
        assert!(ch.new_keys.iter().all(|k| k.device_id == "ahead"));
        assert_eq!(
            c.process(ev("old", 1_000), 9, 5_500),
            Outcome::Late(Late::Forgotten),
            "a resend of what it sent before it was forgotten: not new, and not a kept identity"
        );
        assert_eq!(
            c.process(ev("old", 999), 9, 5_500),
            Outcome::Late(Late::Forgotten)
        );
        assert_eq!(c.forgotten_count(), 1, "a late event does not bring it back");
        assert_eq!(
            c.process(ev("old", 1_001), 10, 5_500),
            Outcome::Buffered,
            "anything newer than its record is judged by its own watermark"
        );
        assert_eq!(c.forgotten_count(), 0);
        assert_eq!(
            c.process(ev("old", 1_000), 11, 5_500),
            Outcome::Late(Late::Forgotten),
            "its record's mark holds while it is back"
        );
        assert_eq!(
            c.process(ev("fresh", 3_000), 12, 5_500),
            Outcome::Buffered,
            "a device never seen is judged from its first event, whatever the others' clocks"
        );
        assert_eq!(c.process(ev("fresh", 2_999), 13, 5_500), Outcome::Buffered);
        let ch = c.take_changes();
        assert_eq!(ch.evicted, vec!["old".to_owned()], "its record is dropped first");
        let old = ch.devices.iter().find(|(id, _)| id == "old").map(|(_, m)| *m);
        assert_eq!(
            old,
            Some(DeviceMark {
                max_ts: 1_001,
                released_max: 1_000
            }),
            "then its live mark, starting from its record"
        );
        assert_eq!(c.evicted_total(), 1);
    }

    #[test]
    fn a_device_forgotten_and_back_before_a_checkpoint_is_persisted_as_it_is_now() {
        let mut c = Cleaner::new(cfg_forget(0, 1_000, 100, 1_000, 1_000_000));
        c.process(ev("d", 1_000), 0, 0);
        c.process(ev("e", 3_000), 1, 900);
        c.tick(1_100);
        assert_eq!(c.device_count(), 1, "d is forgotten");
        assert_eq!(c.process(ev("d", 2_500), 2, 1_100), Outcome::Buffered, "and back");
        let ch = c.take_changes();
        assert_eq!(ch.evicted, vec!["d".to_owned()], "what it had is dropped first");
        assert!(ch.forgotten.is_empty(), "no record: it is back");
        let mut keys: Vec<(&str, i64)> = ch.new_keys.iter().map(|k| (k.device_id.as_str(), k.ts)).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            vec![("d", 2_500), ("e", 3_000)],
            "then only what it keeps now: not the identity it had before it was forgotten"
        );
        let d = ch.devices.iter().find(|(id, _)| id == "d").map(|(_, m)| m.max_ts);
        assert_eq!(d, Some(2_500));
    }

    #[test]
    fn a_resend_of_exactly_the_forgotten_through_event_is_late_after_the_device_is_back() {
        let mut c = Cleaner::new(cfg_forget(200, 300, 1_000, 2_000, 1_000_000));
        assert_eq!(c.process(ev("d", 1_427), 0, 0), Outcome::Buffered);
        assert_eq!(c.process(ev("d", 1_587), 1, 0), Outcome::Buffered);
        c.tick(1_000);
        assert_eq!(released_ts(&mut c), vec![1_427, 1_587], "idle flush");
        c.tick(2_200);
        assert_eq!(c.device_count(), 0, "d is forgotten");
        assert_eq!(c.process(ev("d", 1_602), 2, 2_200), Outcome::Buffered, "back");
        assert_eq!(
            c.process(ev("d", 1_587), 3, 2_200),
            Outcome::Late(Late::Forgotten),
            "exactly its forgotten-through event"
        );
        assert_eq!(
            c.process(ev("d", 1_427), 4, 2_200),
            Outcome::Late(Late::Forgotten),
            "within its new lateness, but sent before it was forgotten"
        );
        c.tick(10_000);
        assert_eq!(released_ts(&mut c), vec![1_602]);
    }

    #[test]
    fn a_forgotten_record_expires_after_its_retention_and_the_device_is_new_again() {
        let mut c = Cleaner::new(cfg_forget(10, 1_000, 100, 1_000, 5_000));
        c.process(ev("d", 1_000), 0, 0);
        c.tick(1_100);
        released_ts(&mut c);
        assert_eq!(c.forgotten_count(), 1);
        c.take_changes();
        c.tick(6_000);
        assert_eq!(c.forgotten_count(), 1, "kept for its retention");
        c.tick(6_200);
        assert_eq!(c.forgotten_count(), 0, "then dropped");
        let ch = c.take_changes();
        assert_eq!(ch.evicted, vec!["d".to_owned()], "the persisted record goes too");
        assert_eq!(
            c.process(ev("d", 1_000), 1, 6_200),
            Outcome::Buffered,
            "the documented cost: past the retention, an old event of it is new"
        );
    }

    #[test]
    fn a_device_forgotten_and_back_again_and_again_keeps_one_expiry_entry_at_most() {
        let mut c = Cleaner::new(cfg_forget(0, 1_000, 100, 1_000, 1_000_000_000));
        for i in 0..200u64 {
            let now = i * 1_500;
            assert_eq!(
                c.process(ev("d", 1_000 + i as i64), i as i64, now),
                Outcome::Buffered
            );
            c.tick(now + 1_200);
            assert_eq!(c.forgotten_count(), 1, "forgotten after each event");
        }
        assert_eq!(
            c.forgotten.len(),
            1,
            "one record, not one per time it was forgotten"
        );
        assert!(
            c.forgotten_since.len() <= 400,
            "what a checkpoint takes: {}",
            c.forgotten_since.len()
        );
        c.take_changes();
        assert!(c.forgotten_since.is_empty());
    }

    #[test]
    fn a_device_that_keeps_sending_is_never_forgotten_whatever_the_others_do() {
        let mut c = Cleaner::new(cfg_forget(10, 1_000, 100, 1_000, 1_000_000));
        for i in 0..50u64 {
            c.process(ev("steady", 1_000 + i as i64), i as i64, i * 500);
            c.process(
                ev("jumpy", 10i64.pow(15) + i as i64 * 10i64.pow(12)),
                100 + i as i64,
                i * 500,
            );
            c.tick(i * 500 + 200);
        }
        assert_eq!(c.device_count(), 2);
        assert_eq!(c.forgotten_count(), 0);
    }

    #[test]
    fn a_device_with_waiting_events_is_not_forgotten_until_flushed() {
        let mut c = Cleaner::new(cfg_forget(10, 1_000, 5_000, 1_000, 1_000_000));
        c.process(ev("slow", 1_000), 0, 0);
        c.tick(1_500);
        assert_eq!(
            c.device_count(),
            1,
            "silent past forget_after, but its event still waits"
        );
        c.tick(5_000);
        assert_eq!(released_ts(&mut c), vec![1_000], "idle flush");
        assert_eq!(c.device_count(), 0, "flushed and silent: forgotten right after");
    }

    #[test]
    fn restored_devices_and_records_are_judged_by_the_same_rules() {
        let marks = vec![(
            "a".to_owned(),
            DeviceMark {
                max_ts: 1_000,
                released_max: 1_000,
            },
        )];
        let keys = vec![SeenKey {
            device_id: "a".into(),
            ts: 1_000,
            latitude_bits: 1.0f64.to_bits(),
            longitude_bits: 2.0f64.to_bits(),
        }];
        let records = vec![(
            "b".to_owned(),
            Forgotten {
                through: 9_000,
                at_ms: 50,
            },
        )];
        let mut c = Cleaner::restore(cfg_forget(10, 1_000, 500, 1_000, 10_000), marks, keys, 100)
            .with_forgotten(records);
        assert_eq!(c.process(ev("a", 1_000), 0, 100), Outcome::Duplicate);
        assert_eq!(c.process(ev("b", 9_000), 1, 100), Outcome::Late(Late::Forgotten));
        assert_eq!(
            c.process(ev("c", 2), 2, 100),
            Outcome::Buffered,
            "new, whatever its clock"
        );
        c.tick(1_099);
        assert_eq!(
            c.device_count(),
            2,
            "a restored device counts as arrived at the restore"
        );
        assert_eq!(released_ts(&mut c), vec![2], "c was flushed");
        c.tick(1_200);
        assert_eq!(c.device_count(), 0, "both silent past forget_after");
        let ch = c.take_changes();
        assert_eq!(
            ch.forgotten.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(),
            vec!["a", "c"]
        );
        c.tick(10_300);
        assert_eq!(
            c.forgotten_count(),
            2,
            "b's record expires by when it was made: a and c kept"
        );
        assert_eq!(c.take_changes().evicted, vec!["b".to_owned()]);
    }

    #[test]
    fn a_former_partition_floor_holds_for_unknown_devices_until_it_expires() {
        let config = cfg_forget(10, 1_000, 500, 1_000, 10_000);
        let mut c =
            Cleaner::restore(config, Vec::new(), Vec::new(), 100).with_former_floor(Some(5_000), None, 100);
        assert_eq!(
            c.former_floor(),
            Some(FormerFloor {
                through: 5_000,
                until_ms: 10_100
            })
        );
        assert_eq!(
            c.take_changes().former_floor,
            Some(FormerFloor {
                through: 5_000,
                until_ms: 10_100
            }),
            "its expiry is recorded once"
        );
        assert_eq!(c.process(ev("x", 5_000), 0, 100), Outcome::Late(Late::Forgotten));
        assert_eq!(c.process(ev("x", 5_001), 1, 100), Outcome::Buffered);
        assert_eq!(c.process(ev("x", 4_999), 2, 100), Outcome::Late(Late::Forgotten));
        c.tick(10_100);
        assert_eq!(c.former_floor(), None);
        assert_eq!(c.process(ev("y", 4_000), 3, 10_100), Outcome::Buffered, "expired");
        let expired = Cleaner::restore(config, Vec::new(), Vec::new(), 20_000).with_former_floor(
            Some(5_000),
            Some(10_100),
            20_000,
        );
        assert_eq!(
            expired.former_floor(),
            None,
            "a restore after its expiry drops it"
        );
    }

    /// A stream: distinct events per device (strictly increasing ts), delivered reordered within
    /// `lateness`, plus exact duplicates delivered after their original.
    fn stream(lateness: i64) -> impl Strategy<Value = (Vec<Event>, Vec<Event>)> {
        let devices = prop::collection::vec(
            prop::collection::vec((1i64..400, 0..=lateness, any::<bool>()), 1..60),
            1..5,
        );
        (devices, any::<u64>()).prop_map(move |(devs, seed)| {
            let mut distinct = Vec::new();
            let mut arrivals: Vec<(i64, usize, Event)> = Vec::new();
            let mut rng = seed;
            let mut next = || {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng
            };
            for (d, steps) in devs.iter().enumerate() {
                let mut ts = 1_000_000;
                for &(gap, delay, dup) in steps {
                    ts += gap;
                    let e = Event {
                        device_id: format!("dev-{d}"),
                        ts,
                        latitude: (ts % 90) as f64,
                        longitude: -((ts % 180) as f64),
                    };
                    distinct.push(e.clone());
                    let seq = arrivals.len();
                    arrivals.push((ts - delay, seq, e.clone()));
                    if dup {
                        // A resend arrives later than its original, but not beyond the horizon.
                        let later = (next() % 2_000) as i64;
                        arrivals.push((ts - delay + later, seq + 1_000_000, e));
                    }
                }
            }
            arrivals.sort_by_key(|a| (a.0, a.1));
            (distinct, arrivals.into_iter().map(|a| a.2).collect())
        })
    }

    fn check_output(distinct: &[Event], out: &[Released]) {
        let mut got: Vec<(String, i64)> = out
            .iter()
            .map(|r| (r.event.device_id.clone(), r.event.ts))
            .collect();
        let unique: HashSet<_> = got.iter().cloned().collect();
        assert_eq!(unique.len(), got.len(), "an event was released twice");
        let mut last: HashMap<String, i64> = HashMap::new();
        for (d, ts) in &got {
            let prev = last.insert(d.clone(), *ts);
            assert!(
                prev.is_none_or(|p| p < *ts),
                "{d} released out of order: {prev:?} then {ts}"
            );
        }
        got.sort();
        let mut want: Vec<(String, i64)> = distinct.iter().map(|e| (e.device_id.clone(), e.ts)).collect();
        want.sort();
        assert_eq!(got, want);
    }

    #[test]
    fn offset_counts_keep_a_word_per_buffered_region_not_per_offset_passed() {
        // One event held at offset 0 while a million later ones come and go.
        let mut counts = OffsetCounts::default();
        counts.add(0);
        for offset in 1..1_000_000 {
            counts.add(offset);
            counts.remove(offset);
        }
        assert_eq!(counts.min(), Some(0));
        assert_eq!(counts.words.len(), 1, "only the held offset's word is kept");
        counts.remove(0);
        assert_eq!(counts.min(), None);
        assert!(counts.words.is_empty() && counts.extra.is_empty());
    }

    proptest! {
        /// The offset multiset agrees with a plain counted map under any adds and removes of
        /// held offsets, repeated ones and ones below the lowest included.
        #[test]
        fn offset_counts_behave_like_a_counted_map(
            ops in proptest::collection::vec((any::<bool>(), -200i64..2_000), 1..400),
        ) {
            let mut counts = OffsetCounts::default();
            let mut model: BTreeMap<i64, u32> = BTreeMap::new();
            for (add, offset) in ops {
                if add || model.is_empty() {
                    counts.add(offset);
                    *model.entry(offset).or_insert(0) += 1;
                } else {
                    // Remove one that is held (the cleaner never removes others).
                    let held = *model.keys().nth(offset.unsigned_abs() as usize % model.len()).expect("held");
                    counts.remove(held);
                    let n = model.get_mut(&held).expect("held");
                    *n -= 1;
                    if *n == 0 {
                        model.remove(&held);
                    }
                }
                prop_assert_eq!(counts.min(), model.keys().next().copied());
            }
            // Ranges and range queries agree with the held offsets.
            for from in [-300i64, -64, -1, 0, 1, 63, 64, 65, 500, 1_999, 2_100] {
                let want: Vec<i64> = model.keys().copied().filter(|o| *o >= from).collect();
                let got: Vec<i64> = counts.ranges(from).into_iter().flat_map(|(a, b)| a..b).collect();
                prop_assert_eq!(&got, &want);
                let runs = counts.ranges(from);
                prop_assert!(runs.windows(2).all(|w| w[0].1 < w[1].0), "maximal, in order: {:?}", runs);
                for len in [0i64, 1, 2, 63, 64, 65, 130, 3_000] {
                    let any = model.range(from..from.saturating_add(len)).next().is_some();
                    prop_assert_eq!(counts.any_in(from, from + len), any, "[{}, +{})", from, len);
                }
            }
        }
    }

    proptest! {
        #[test]
        fn any_reordering_within_lateness_yields_the_distinct_events_in_ts_order(
            (distinct, arrivals) in stream(500),
        ) {
            let mut c = Cleaner::new(cfg(500, 600_000, 1_000));
            let mut dups = 0;
            for (i, e) in arrivals.iter().enumerate() {
                match c.process(e.clone(), i as i64, 0) {
                    Outcome::Buffered => {}
                    Outcome::Duplicate => dups += 1,
                    other => prop_assert!(false, "unexpected {other:?} for {e:?}"),
                }
            }
            c.tick(1_000);
            let out = c.drain_released();
            check_output(&distinct, &out);
            prop_assert_eq!(dups, arrivals.len() - distinct.len());
            prop_assert_eq!(c.buffered_len(), 0);
        }

        #[test]
        fn events_beyond_lateness_are_late_and_never_released(
            (distinct, mut arrivals) in stream(500),
            late_at in any::<prop::sample::Index>(),
            extra in 1i64..10_000,
        ) {
            // Right after some arrival, a new identity far behind that device's max.
            let pos = late_at.index(arrivals.len());
            let device = arrivals[pos].device_id.clone();
            let max_before = arrivals[..=pos].iter().filter(|e| e.device_id == device).map(|e| e.ts).max().expect("the event itself");
            let late = Event { device_id: device, ts: max_before - 500 - extra, latitude: 0.5, longitude: 0.5 };
            prop_assume!(!distinct.iter().any(|e| e.device_id == late.device_id && e.ts == late.ts));
            arrivals.insert(pos + 1, late.clone());
            let mut c = Cleaner::new(cfg(500, 600_000, 1_000));
            let mut late_seen = 0;
            for (i, e) in arrivals.iter().enumerate() {
                if matches!(c.process(e.clone(), i as i64, 0), Outcome::Late(_)) {
                    prop_assert_eq!(e, &late);
                    late_seen += 1;
                }
            }
            c.tick(1_000);
            prop_assert_eq!(late_seen, 1);
            check_output(&distinct, &c.drain_released());
        }

        #[test]
        fn dedup_state_stays_within_the_horizon((_distinct, arrivals) in stream(500)) {
            let horizon = 3_000;
            let mut c = Cleaner::new(cfg(500, horizon, 1_000));
            for (i, e) in arrivals.iter().enumerate() {
                c.process(e.clone(), i as i64, 0);
            }
            let out = c.drain_released();
            let mut max: HashMap<&str, i64> = HashMap::new();
            for e in &arrivals {
                let m = max.entry(e.device_id.as_str()).or_insert(i64::MIN);
                *m = (*m).max(e.ts);
            }
            let within: BTreeSet<(String, i64)> = out
                .iter()
                .filter(|r| r.event.ts >= max[r.event.device_id.as_str()] - horizon)
                .map(|r| (r.event.device_id.clone(), r.event.ts))
                .collect();
            prop_assert_eq!(c.dedup_len(), within.len());
        }

        /// The checkpoint protocol in pure form: persist changes at an arbitrary point, lose the
        /// in-memory state, restore, replay from the resume offset. What was released before the
        /// checkpoint plus what is released after is exactly the distinct events, in order.
        #[test]
        fn restore_and_replay_from_the_resume_offset_loses_and_repeats_nothing(
            (distinct, arrivals) in stream(500),
            cut in any::<prop::sample::Index>(),
        ) {
            let config = cfg(500, 600_000, 1_000);
            let cut = cut.index(arrivals.len() + 1);
            let mut c = Cleaner::new(config);
            for (i, e) in arrivals[..cut].iter().enumerate() {
                c.process(e.clone(), i as i64, 0);
            }
            let mut emitted = c.drain_released();
            let resume = c.min_buffered_offset().unwrap_or(cut as i64);
            let changes = c.take_changes();
            let pruned: HashMap<String, i64> = changes.pruned.into_iter().collect();
            let keys: Vec<SeenKey> = changes
                .new_keys
                .into_iter()
                .filter(|k| pruned.get(&k.device_id).is_none_or(|below| k.ts >= *below))
                .collect();
            drop(c);
            let mut c = Cleaner::restore(config, changes.devices, keys, 0);
            for (i, e) in arrivals.iter().enumerate().skip(resume as usize) {
                let outcome = c.process(e.clone(), i as i64, 0);
                prop_assert!(!matches!(outcome, Outcome::Late(_)), "replayed {e:?} became late");
            }
            c.tick(1_000);
            emitted.extend(c.drain_released());
            check_output(&distinct, &emitted);
        }

        /// Crash and restore with every rule in play: duplicates, conflicts, late events,
        /// idle flushes mid-stream (processing time moves), pruning and eviction beyond a short
        /// horizon, several checkpoints. As in the processor, timers run only once everything
        /// available was read again. Whatever the crash point: no event is emitted twice, each
        /// device's output stays in ts order, and every event is either emitted or was
        /// dead-lettered by a committed decision; nothing vanishes.
        #[test]
        fn a_crash_anywhere_emits_each_event_once_in_order_and_loses_none(
            arrivals in rich_stream(300),
            checkpoints in prop::collection::vec(any::<prop::sample::Index>(), 1..4),
            crash in any::<prop::sample::Index>(),
        ) {
            let config = cfg(300, 2_000, 120);
            let n = arrivals.len();
            let now = |i: usize| i as u64 * 9;
            let ticks_at = |i: usize| i % 7 == 6;
            let mut cuts: Vec<usize> = checkpoints.iter().map(|c| c.index(n + 1)).collect();
            cuts.sort_unstable();
            let last_cut = *cuts.last().expect("at least one checkpoint");
            let crash_at = last_cut + crash.index(n + 1 - last_cut);
            let mut b = Cleaner::new(config);
            let mut persisted = Persisted::default();
            let mut emitted: Vec<(String, i64)> = Vec::new();
            let (mut committed_emitted, mut resume, mut decided) = (0usize, 0usize, 0usize);
            let mut late: Vec<(usize, (String, i64))> = Vec::new();
            let checkpoint = |b: &mut Cleaner, persisted: &mut Persisted, emitted: &Vec<(String, i64)>, i: usize| {
                persisted.apply(b.take_changes());
                (emitted.len(), b.min_buffered_offset().map_or(i, |o| o as usize), i)
            };
            for i in 0..crash_at {
                if cuts.contains(&i) {
                    (committed_emitted, resume, decided) = checkpoint(&mut b, &mut persisted, &emitted, i);
                }
                if matches!(b.process(arrivals[i].clone(), i as i64, now(i)), Outcome::Late(_)) {
                    late.push((i, (arrivals[i].device_id.clone(), arrivals[i].ts)));
                }
                if ticks_at(i) { b.tick(now(i)); }
                emitted.extend(b.drain_released().into_iter().map(|r| (r.event.device_id, r.event.ts)));
            }
            if cuts.contains(&crash_at) {
                (committed_emitted, resume, decided) = checkpoint(&mut b, &mut persisted, &emitted, crash_at);
            }
            // Crash: what was emitted or decided after the last checkpoint is lost with the
            // process; restore and read again from the resume offset.
            emitted.truncate(committed_emitted);
            late.retain(|(i, _)| *i < decided);
            let mut r = persisted.restore(config, now(resume));
            for i in resume..n {
                let outcome = r.process(arrivals[i].clone(), i as i64, now(i));
                // A decision below `decided` was committed before: not dead-lettered twice.
                if matches!(outcome, Outcome::Late(_)) && i >= decided {
                    late.push((i, (arrivals[i].device_id.clone(), arrivals[i].ts)));
                }
                if ticks_at(i) && i >= crash_at { r.tick(now(i)); }
                emitted.extend(r.drain_released().into_iter().map(|r| (r.event.device_id, r.event.ts)));
            }
            r.tick(u64::MAX / 2);
            emitted.extend(r.drain_released().into_iter().map(|r| (r.event.device_id, r.event.ts)));

            let mut seen = HashSet::new();
            let mut last: HashMap<&str, i64> = HashMap::new();
            for (d, ts) in &emitted {
                prop_assert!(seen.insert((d.clone(), *ts)), "{} {} emitted twice", d, ts);
                let prev = last.insert(d.as_str(), *ts);
                prop_assert!(prev.is_none_or(|p| p < *ts), "{} out of order: {:?} then {}", d, prev, ts);
            }
            let dead: HashSet<(String, i64)> = late.into_iter().map(|(_, k)| k).collect();
            for e in &arrivals {
                let k = (e.device_id.clone(), e.ts);
                prop_assert!(seen.contains(&k) || dead.contains(&k), "{:?} was neither emitted nor dead-lettered", k);
            }
        }
    }

    /// What the stream generators send besides an event, by `kind`: for kinds up to
    /// `last_resend`, an exact resend up to `resend_within` later; for the next kind, a resend
    /// with other coordinates (a conflict) up to 800 later; for the one after, an event far
    /// below the lateness, right after; otherwise nothing. Returns (delay, event).
    fn another_copy(
        kind: u8,
        last_resend: u8,
        resend_within: u64,
        e: &Event,
        lateness: i64,
        next: &mut impl FnMut() -> u64,
    ) -> Option<(u64, Event)> {
        let mut extra = e.clone();
        if kind <= last_resend {
            Some((next() % resend_within, extra))
        } else if kind == last_resend + 1 {
            extra.latitude += 1.0;
            Some((next() % 800, extra))
        } else if kind == last_resend + 2 {
            extra.ts -= lateness + 1 + (next() % 3_000) as i64;
            Some((1, extra))
        } else {
            None
        }
    }

    /// A fleet whose device clocks disagree: each device's ts runs at an offset of its own
    /// (minutes to days behind or ahead, or microseconds instead of milliseconds), while their
    /// arrivals (processing time) interleave. Each device sends in-time reordering, resends,
    /// conflicting resends, events far behind, and pauses long enough to be flushed, forgotten
    /// and (rarely) to outlive its record. Returns arrivals as (processing time, event) in
    /// arrival order.
    fn fleet(lateness: i64) -> impl Strategy<Value = Vec<(u64, Event)>> {
        let offset = prop_oneof![
            Just(0i64),
            Just(-11 * 60_000),
            Just(17 * 60_000),
            Just(-3 * 86_400_000),
            Just(2 * 86_400_000),
            Just(1_700_000_000_000i64 * 999), // microseconds
        ];
        let steps = prop::collection::vec((1u64..400, 0..=lateness, 0u8..24), 1..40);
        (prop::collection::vec((offset, steps), 1..6), any::<u64>()).prop_map(move |(devs, seed)| {
            let mut rng = seed | 1;
            let mut next = move || {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng
            };
            let mut arrivals: Vec<(u64, u64, Event)> = Vec::new();
            for (d, (offset, steps)) in devs.iter().enumerate() {
                let mut t = next() % 3_000;
                let mut ts = 1_700_000_000_000 + offset;
                for &(gap, delay, kind) in steps {
                    t += gap;
                    ts += gap as i64;
                    if kind == 23 {
                        // Silent long enough to be forgotten, or even to outlive its record.
                        let pause = if next() % 4 == 0 { 40_000 } else { 4_000 };
                        t += pause;
                        ts += pause as i64;
                    }
                    let e = Event {
                        device_id: format!("dev-{d}"),
                        ts,
                        latitude: (ts % 90) as f64,
                        longitude: -((ts % 180) as f64),
                    };
                    let at = t + delay as u64;
                    arrivals.push((at, next(), e.clone()));
                    // Resends come later here: some after their device was forgotten.
                    if let Some((after, extra)) = another_copy(kind, 3, 3_000, &e, lateness, &mut next) {
                        arrivals.push((at + after, next(), extra));
                    }
                }
            }
            arrivals.sort_by_key(|a| (a.0, a.1));
            arrivals.into_iter().map(|(at, _, e)| (at, e)).collect()
        })
    }

    /// Runs arrivals through one cleaner, ticking after every fifth arrival and at the end;
    /// `only` keeps one device's arrivals (the ticks stay). Returns each kept arrival's outcome
    /// by arrival index, and each device's released events in order.
    fn run_fleet(
        config: CleanupConfig,
        arrivals: &[(u64, Event)],
        only: Option<&str>,
    ) -> (Vec<(usize, Outcome)>, HashMap<String, Vec<Released>>) {
        let mut c = Cleaner::new(config);
        let mut outcomes = Vec::new();
        let mut released: HashMap<String, Vec<Released>> = HashMap::new();
        let mut collect = |c: &mut Cleaner| {
            for r in c.drain_released() {
                released.entry(r.event.device_id.clone()).or_default().push(r);
            }
        };
        for (i, (at, e)) in arrivals.iter().enumerate() {
            if only.is_none_or(|d| d == e.device_id) {
                outcomes.push((i, c.process(e.clone(), i as i64, *at)));
            }
            if i % 5 == 4 {
                c.tick(*at);
            }
            collect(&mut c);
        }
        let end = arrivals.last().map_or(0, |a| a.0);
        c.tick(end + 100_000);
        collect(&mut c);
        (outcomes, released)
    }

    proptest! {
        /// Per-device semantics: in a partition shared with devices whose clocks are minutes to
        /// days apart, or in microseconds, every event of a device has the fate, and the device
        /// the output, it would have alone in the partition.
        #[test]
        fn each_device_gets_what_it_would_get_alone_whatever_the_others_clocks(
            arrivals in fleet(300),
            forget_after in prop_oneof![Just(1_000u64), Just(3_000), Just(600_000)],
            retention in prop_oneof![Just(20_000u64), Just(u64::MAX / 4)],
        ) {
            let config = cfg_forget(300, 2_000, 500, forget_after, retention);
            let (together, mut released) = run_fleet(config, &arrivals, None);
            let mut devices: Vec<String> = arrivals.iter().map(|(_, e)| e.device_id.clone()).collect();
            devices.sort_unstable();
            devices.dedup();
            for d in &devices {
                let (alone, mut alone_released) = run_fleet(config, &arrivals, Some(d));
                let mine: Vec<(usize, Outcome)> = together
                    .iter()
                    .filter(|(i, _)| arrivals[*i].1.device_id == *d)
                    .copied()
                    .collect();
                prop_assert_eq!(&mine, &alone, "{} judged otherwise beside the others", d);
                prop_assert_eq!(released.remove(d), alone_released.remove(d), "{} released otherwise", d);
                let stored = mine.iter().filter(|(_, o)| *o == Outcome::Buffered).count();
                let distinct: HashSet<i64> = arrivals.iter().filter(|(_, e)| e.device_id == *d).map(|(_, e)| e.ts).collect();
                prop_assert!(stored > 0 && stored <= distinct.len());
            }
        }
    }

    #[test]
    fn a_device_behind_the_others_and_a_device_new_after_a_far_future_event_store_everything() {
        let mut c = Cleaner::new(CleanupConfig::default());
        let base = 1_700_000_000_000i64;
        let mut stored: HashMap<&str, usize> = HashMap::new();
        let mut offset = 0;
        let mut send = |c: &mut Cleaner, d: &'static str, ts: i64, now: u64| {
            offset += 1;
            if c.process(ev(d, ts), offset, now) == Outcome::Buffered {
                *stored.entry(d).or_default() += 1;
            }
        };
        for i in 0..300i64 {
            let now = i as u64 * 100;
            for d in ["h1", "h2", "h3", "h4"] {
                send(&mut c, d, base + i * 100, now);
            }
            send(&mut c, "behind", base - 11 * 60_000 + i * 100, now);
            if i == 100 {
                send(&mut c, "micros", (base + i * 100) * 1_000, now);
            }
            if i >= 150 {
                send(&mut c, "newcomer", base + i * 100, now);
            }
            c.tick(now);
        }
        // A pause of 12 s, then the healthy devices go on.
        for i in 300..600i64 {
            let now = 12_000 + i as u64 * 100;
            for d in ["h1", "h2", "h3", "h4"] {
                send(&mut c, d, base + i * 100, now);
            }
            c.tick(now);
        }
        c.tick(u64::MAX / 2);
        assert_eq!(stored["behind"], 300, "11 minutes behind the others");
        assert_eq!(stored["newcomer"], 150, "new after a far-future event");
        for d in ["h1", "h2", "h3", "h4"] {
            assert_eq!(stored[d], 600, "{d}");
        }
    }

    /// What a chain of checkpoints persists, rebuilt from their changes.
    #[derive(Debug, Default)]
    struct Persisted {
        marks: HashMap<String, DeviceMark>,
        keys: BTreeMap<(String, i64), (u64, u64)>,
        forgotten: HashMap<String, Forgotten>,
    }

    impl Persisted {
        fn apply(&mut self, ch: Changes) {
            for d in ch.evicted {
                self.marks.remove(&d);
                self.keys.retain(|(dev, _), _| *dev != d);
                self.forgotten.remove(&d);
            }
            for (d, f) in ch.forgotten {
                self.marks.remove(&d);
                self.keys.retain(|(dev, _), _| *dev != d);
                self.forgotten.insert(d, f);
            }
            for (d, m) in ch.devices {
                self.forgotten.remove(&d);
                self.marks.insert(d, m);
            }
            for k in ch.new_keys {
                self.keys
                    .insert((k.device_id, k.ts), (k.latitude_bits, k.longitude_bits));
            }
            for (d, below) in ch.pruned {
                self.keys.retain(|(dev, ts), _| !(*dev == d && *ts < below));
            }
        }

        fn restore(&self, config: CleanupConfig, now: u64) -> Cleaner {
            let marks = self.marks.iter().map(|(d, m)| (d.clone(), *m)).collect();
            let keys = self
                .keys
                .iter()
                .map(|((d, ts), (lat, lon))| SeenKey {
                    device_id: d.clone(),
                    ts: *ts,
                    latitude_bits: *lat,
                    longitude_bits: *lon,
                })
                .collect();
            Cleaner::restore(config, marks, keys, now).with_forgotten(self.forgotten.clone())
        }
    }

    /// Arrivals with every kind of event: in-time reordering within `lateness`, exact resends,
    /// conflicting resends (same identity, other coordinates), events far behind (late), and
    /// devices that go quiet while others move on (idle flushes, pruning, eviction).
    fn rich_stream(lateness: i64) -> impl Strategy<Value = Vec<Event>> {
        let steps = prop::collection::vec((1i64..600, 0..=lateness, 0u8..20), 1..50);
        (prop::collection::vec(steps, 1..5), any::<u64>()).prop_map(move |(devs, seed)| {
            let mut rng = seed | 1;
            let mut next = move || {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng
            };
            let mut arrivals: Vec<(i64, u64, Event)> = Vec::new();
            for (d, steps) in devs.iter().enumerate() {
                // Devices start at different times, so some fall out of the horizon.
                let mut ts = 1_000_000 + (next() % 6_000) as i64;
                for &(gap, delay, kind) in steps {
                    ts += gap;
                    let e = Event {
                        device_id: format!("dev-{d}"),
                        ts,
                        latitude: (ts % 90) as f64,
                        longitude: -((ts % 180) as f64),
                    };
                    let at = ts - delay;
                    arrivals.push((at, next(), e.clone()));
                    if let Some((after, extra)) = another_copy(kind, 2, 800, &e, lateness, &mut next) {
                        arrivals.push((at + after as i64, next(), extra));
                    }
                }
            }
            arrivals.sort_by_key(|a| (a.0, a.1));
            arrivals.into_iter().map(|a| a.2).collect()
        })
    }
}
