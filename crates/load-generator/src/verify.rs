//! `verify`: compares a manifest with what ingest-api stored: missing, duplicated, per-device
//! order violations, and stored events nobody sent; and the end-to-end latency, from each
//! event's first acknowledgement (the manifest's `ackedAt`) to the row's `receivedAt` (both
//! clocks are the same when everything runs on one machine). With the brokers given, it also
//! reads the dead-letter topic, so every acknowledged event is accounted for: stored, dropped as
//! a duplicate, or dead-lettered with its reason; `missing` is what is none of these.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::config::VerifySettings;
use crate::dlq::{DeadLetter, DlqReader};
use crate::events::EventsClient;

/// The comparison.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub expected: usize,
    pub stored: usize,
    pub missing: usize,
    pub duplicated: usize,
    pub out_of_order: usize,
    pub unexpected: usize,
    /// Milliseconds from acknowledgement to storage: p50, p99, max (None when nothing to measure).
    pub latency_ms: Option<(i64, i64, i64)>,
    /// Acknowledged sends (an identity sent twice and acknowledged twice counts twice).
    pub acknowledged: usize,
    /// Acknowledged sends of a stored identity beyond its stored row that were not
    /// dead-lettered: dropped by the processor as duplicates.
    pub dropped_duplicates: usize,
    /// Acknowledged identities not stored but dead-lettered (by `reason: detail`).
    pub dead_lettered: BTreeMap<String, usize>,
    /// Dead letters of identities that were also stored (resends judged late), by reason.
    pub resends_dead_lettered: BTreeMap<String, usize>,
    /// Whether the dead-letter topic was read.
    pub dlq_read: bool,
}

impl Report {
    pub fn clean(&self) -> bool {
        self.missing == 0 && self.duplicated == 0 && self.out_of_order == 0 && self.unexpected == 0
    }
}

type Key = (String, i64);

/// What a manifest says.
#[derive(Debug, Default)]
pub struct Manifest {
    /// Identities acknowledged by the pipeline.
    pub expected: HashSet<Key>,
    /// Every identity it mentions (acknowledged or maybe stored).
    pub allowed: HashSet<Key>,
    /// The first acknowledgement of each identity, unix ms (lines that carry one).
    pub acked_at: HashMap<Key, i64>,
    /// Acknowledged sends of each identity.
    pub sends: HashMap<Key, usize>,
}

/// Reads a manifest written by a load run.
pub fn read_manifest(text: &str) -> anyhow::Result<Manifest> {
    let mut m = Manifest::default();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let v: Value =
            serde_json::from_str(line).map_err(|e| anyhow::anyhow!("manifest line {}: {e}", n + 1))?;
        let key = (
            v["deviceId"]
                .as_str()
                .ok_or_else(|| anyhow::anyhow!("manifest line {}: no deviceId", n + 1))?
                .to_owned(),
            v["ts"]
                .as_i64()
                .ok_or_else(|| anyhow::anyhow!("manifest line {}: no ts", n + 1))?,
        );
        if v["status"] == "accepted" {
            if let Some(at) = v["ackedAt"].as_i64() {
                let first = m.acked_at.entry(key.clone()).or_insert(at);
                *first = (*first).min(at);
            }
            *m.sends.entry(key.clone()).or_insert(0) += 1;
            m.expected.insert(key.clone());
        }
        m.allowed.insert(key);
    }
    Ok(m)
}

/// A stored row: identity and `receivedAt`.
pub type Row = (Key, i64);

/// p50, p99 and max of acknowledgement-to-storage times of the stored rows (first storage of
/// each identity the manifest has an acknowledgement time for).
pub fn latency(stored: &[Row], acked_at: &HashMap<Key, i64>) -> Option<(i64, i64, i64)> {
    let mut seen = HashSet::new();
    let mut ms: Vec<i64> = stored
        .iter()
        .filter(|(k, _)| seen.insert(k))
        .filter_map(|(k, received)| acked_at.get(k).map(|a| received - a))
        .collect();
    if ms.is_empty() {
        return None;
    }
    ms.sort_unstable();
    let at = |q: f64| ms[((ms.len() as f64 * q).ceil() as usize).clamp(1, ms.len()) - 1];
    Some((at(0.50), at(0.99), ms[ms.len() - 1]))
}

/// Compares stored events (in insertion order) with the manifest's sets.
pub fn compare(stored: &[Key], expected: &HashSet<Key>, allowed: &HashSet<Key>) -> Report {
    let mut seen = HashSet::new();
    let mut last: HashMap<&str, i64> = HashMap::new();
    let mut r = Report {
        expected: expected.len(),
        stored: stored.len(),
        ..Report::default()
    };
    for key in stored {
        if !seen.insert(key.clone()) {
            r.duplicated += 1;
        }
        if let Some(prev) = last.insert(key.0.as_str(), key.1) {
            if key.1 <= prev {
                r.out_of_order += 1;
            }
        }
        if !allowed.contains(key) {
            r.unexpected += 1;
        }
    }
    r.missing = expected.iter().filter(|k| !seen.contains(*k)).count();
    r
}

/// Every stored row of devices starting with `prefix` (all without one), in insertion order.
async fn fetch_all(client: &EventsClient, prefix: Option<&str>) -> anyhow::Result<Vec<Row>> {
    Ok(client
        .all()
        .await?
        .into_iter()
        .filter(|e| prefix.is_none_or(|p| e.event.device_id.starts_with(p)))
        .map(|e| ((e.event.device_id, e.event.ts), e.received_at))
        .collect())
}

/// Accounts for every acknowledged send: an identity stored once takes one send, and each of
/// its other sends was dead-lettered (as many as its dead letters) or dropped as a duplicate; an
/// identity not stored but dead-lettered is counted by its first dead letter's reason, and is
/// no longer missing.
pub fn account(r: &mut Report, stored: &[Key], m: &Manifest, dead: &[DeadLetter]) {
    let stored: HashSet<&Key> = stored.iter().collect();
    let mut letters: HashMap<Key, Vec<&str>> = HashMap::new();
    for d in dead {
        letters
            .entry((d.device_id.clone(), d.ts))
            .or_default()
            .push(&d.why);
    }
    r.dlq_read = true;
    for (key, sends) in &m.sends {
        r.acknowledged += sends;
        let why = letters.get(key).map(Vec::as_slice).unwrap_or_default();
        if stored.contains(key) {
            for w in why.iter().take(sends.saturating_sub(1)) {
                *r.resends_dead_lettered.entry((*w).to_owned()).or_insert(0) += 1;
            }
            r.dropped_duplicates += sends.saturating_sub(1 + why.len());
        } else if let Some(first) = why.first() {
            *r.dead_lettered.entry((*first).to_owned()).or_insert(0) += 1;
            r.dropped_duplicates += sends.saturating_sub(why.len());
            r.missing -= 1;
        }
    }
}

fn report(stored: &[Row], m: &Manifest, dead: Option<&[DeadLetter]>) -> Report {
    let keys: Vec<Key> = stored.iter().map(|(k, _)| k.clone()).collect();
    let mut r = Report {
        latency_ms: latency(stored, &m.acked_at),
        ..compare(&keys, &m.expected, &m.allowed)
    };
    if let Some(dead) = dead {
        account(&mut r, &keys, m, dead);
    }
    r
}

/// The dead letters of devices starting with `prefix`, read so far, and a reader to read more.
struct Letters {
    reader: Option<DlqReader>,
    read: Vec<DeadLetter>,
    prefix: Option<String>,
}

impl Letters {
    async fn open(s: &VerifySettings) -> anyhow::Result<Letters> {
        let reader = match &s.brokers {
            Some(brokers) => {
                let (brokers, topic) = (brokers.clone(), s.dlq_topic.clone());
                Some(tokio::task::spawn_blocking(move || DlqReader::open(&brokers, &topic)).await??)
            }
            None => None,
        };
        Ok(Letters {
            reader,
            read: Vec::new(),
            prefix: s.device_prefix.clone(),
        })
    }

    async fn catch_up(&mut self) -> anyhow::Result<Option<&[DeadLetter]>> {
        let Some(mut reader) = self.reader.take() else {
            return Ok(None);
        };
        let (reader, more) = tokio::task::spawn_blocking(move || {
            let more = reader.catch_up();
            (reader, more)
        })
        .await?;
        self.reader = Some(reader);
        let prefix = self.prefix.as_deref();
        self.read.extend(
            more?
                .into_iter()
                .filter(|d| prefix.is_none_or(|p| d.device_id.starts_with(p))),
        );
        Ok(Some(&self.read))
    }
}

/// Runs the comparison, polling up to `wait_secs` for the expected events to arrive.
pub async fn verify(s: &VerifySettings) -> anyhow::Result<Report> {
    let text = std::fs::read_to_string(&s.manifest)?;
    let m = read_manifest(&text)?;
    let client = EventsClient::new(&s.api);
    let mut letters = Letters::open(s).await?;
    let deadline = Instant::now() + Duration::from_secs(s.wait_secs);
    loop {
        let stored = fetch_all(&client, s.device_prefix.as_deref()).await?;
        let r = report(&stored, &m, letters.catch_up().await?);
        if r.missing == 0 || Instant::now() >= deadline {
            if r.missing == 0 && s.wait_secs > 0 {
                // Give stragglers (duplicates that should not exist) a moment to show up.
                tokio::time::sleep(Duration::from_secs(2)).await;
                let stored = fetch_all(&client, s.device_prefix.as_deref()).await?;
                return Ok(report(&stored, &m, letters.catch_up().await?));
            }
            return Ok(r);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(d: &str, ts: i64) -> Key {
        (d.to_owned(), ts)
    }

    #[test]
    fn manifest_counts_acknowledged_events_once() {
        let text = "{\"deviceId\":\"a\",\"ts\":1,\"status\":\"accepted\",\"ackedAt\":500}\n{\"deviceId\":\"a\",\"ts\":1,\"status\":\"accepted\",\"ackedAt\":400}\n{\"deviceId\":\"a\",\"ts\":2,\"status\":\"unacknowledged\"}\n";
        let m = read_manifest(text).expect("manifest parses");
        assert_eq!(m.expected, HashSet::from([k("a", 1)]));
        assert_eq!(m.allowed.len(), 2);
        assert_eq!(
            m.acked_at,
            HashMap::from([(k("a", 1), 400)]),
            "the first acknowledgement"
        );
    }

    #[test]
    fn latency_is_measured_from_the_first_acknowledgement_to_the_first_storage() {
        let acked: HashMap<Key, i64> = (0..100).map(|i| (k("a", i), 1_000)).collect();
        // a@i stored at 1000 + 10·i (a@0 twice: the second storage does not count).
        let mut stored: Vec<Row> = (0..100).map(|i| (k("a", i), 1_000 + 10 * i)).collect();
        stored.push((k("a", 0), 9_999));
        stored.push((k("z", 1), 5_000)); // no acknowledgement time: not measured
        assert_eq!(latency(&stored, &acked), Some((490, 980, 990)));
        assert_eq!(latency(&[], &acked), None);
    }

    fn letter(d: &str, ts: i64, why: &str) -> DeadLetter {
        DeadLetter {
            device_id: d.to_owned(),
            ts,
            why: why.to_owned(),
        }
    }

    #[test]
    fn every_acknowledged_send_is_stored_dropped_as_a_duplicate_or_dead_lettered() {
        let lines = [
            ("a", 1),
            ("a", 1),
            ("a", 2),
            ("b", 1),
            ("b", 1),
            ("b", 2),
            ("c", 1),
            ("c", 1),
            ("c", 1),
        ];
        let text: String = lines
            .iter()
            .map(|(d, ts)| format!("{{\"deviceId\":\"{d}\",\"ts\":{ts},\"status\":\"accepted\"}}\n"))
            .collect();
        let m = read_manifest(&text).expect("manifest parses");
        let stored = vec![k("a", 1), k("a", 2), k("c", 1)];
        let dead = vec![
            letter("b", 1, "late: below the watermark"),
            letter("b", 1, "late: below the watermark"),
            letter("c", 1, "late: forgotten"),
            letter("z", 9, "late: below the watermark"),
        ];
        let mut r = compare(&stored, &m.expected, &m.allowed);
        assert_eq!(r.missing, 2, "b@1 and b@2, before the dead letters are read");
        account(&mut r, &stored, &m, &dead);
        assert_eq!(r.acknowledged, 9);
        assert_eq!(r.missing, 1, "b@2: neither stored nor dead-lettered");
        assert_eq!(
            r.dead_lettered,
            BTreeMap::from([("late: below the watermark".to_owned(), 1)])
        );
        assert_eq!(
            r.resends_dead_lettered,
            BTreeMap::from([("late: forgotten".to_owned(), 1)])
        );
        assert_eq!(r.dropped_duplicates, 2, "a@1's second send and c@1's third");
        assert!(!r.clean(), "b@2 is missing");
    }

    #[test]
    fn compare_finds_each_kind_of_discrepancy() {
        let expected: HashSet<Key> = [k("a", 1), k("a", 2), k("b", 1), k("b", 2)].into();
        let mut allowed = expected.clone();
        allowed.insert(k("b", 3));
        let stored = vec![k("a", 2), k("a", 1), k("b", 1), k("b", 1), k("b", 3), k("x", 9)];
        let r = compare(&stored, &expected, &allowed);
        assert_eq!(r.missing, 1, "b@2");
        assert_eq!(r.duplicated, 1, "b@1 twice");
        assert_eq!(r.out_of_order, 2, "a@1 after a@2, and b@1 after b@1");
        assert_eq!(r.unexpected, 1, "x@9");
        assert!(!r.clean());
        let ok = compare(&[k("a", 1), k("a", 2), k("b", 1), k("b", 2)], &expected, &allowed);
        assert!(ok.clean());
    }
}
