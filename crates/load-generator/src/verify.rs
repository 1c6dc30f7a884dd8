//! `verify`: compares a manifest with what ingest-api stored: missing, duplicated, per-device
//! order violations, and stored events nobody sent.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::config::VerifySettings;

/// The comparison.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub expected: usize,
    pub stored: usize,
    pub missing: usize,
    pub duplicated: usize,
    pub out_of_order: usize,
    pub unexpected: usize,
}

impl Report {
    pub fn clean(&self) -> bool {
        self.missing == 0 && self.duplicated == 0 && self.out_of_order == 0 && self.unexpected == 0
    }
}

type Key = (String, i64);

/// Identities the manifest says were acknowledged (`expected`) and all it mentions (`allowed`).
pub fn read_manifest(text: &str) -> anyhow::Result<(HashSet<Key>, HashSet<Key>)> {
    let mut expected = HashSet::new();
    let mut allowed = HashSet::new();
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
            expected.insert(key.clone());
        }
        allowed.insert(key);
    }
    Ok((expected, allowed))
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

async fn fetch_all(client: &reqwest::Client, api: &str, prefix: Option<&str>) -> anyhow::Result<Vec<Key>> {
    let mut out = Vec::new();
    for page in 1.. {
        let url = format!("{}/events?page={page}&size=1000", api.trim_end_matches('/'));
        let body: Value = client.get(&url).send().await?.error_for_status()?.json().await?;
        let data = body["data"]
            .as_array()
            .ok_or_else(|| anyhow::anyhow!("{url}: no data array"))?;
        if data.is_empty() {
            break;
        }
        for e in data {
            let device = e["deviceId"].as_str().unwrap_or_default();
            if prefix.is_none_or(|p| device.starts_with(p)) {
                out.push((device.to_owned(), e["ts"].as_i64().unwrap_or(i64::MIN)));
            }
        }
    }
    Ok(out)
}

/// Runs the comparison, polling up to `wait_secs` for the expected events to arrive.
pub async fn verify(s: &VerifySettings) -> anyhow::Result<Report> {
    let text = std::fs::read_to_string(&s.manifest)?;
    let (expected, allowed) = read_manifest(&text)?;
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(s.wait_secs);
    loop {
        let stored = fetch_all(&client, &s.api, s.device_prefix.as_deref()).await?;
        let report = compare(&stored, &expected, &allowed);
        if report.missing == 0 || Instant::now() >= deadline {
            if report.missing == 0 && s.wait_secs > 0 {
                // Give stragglers (duplicates that should not exist) a moment to show up.
                tokio::time::sleep(Duration::from_secs(2)).await;
                let stored = fetch_all(&client, &s.api, s.device_prefix.as_deref()).await?;
                return Ok(compare(&stored, &expected, &allowed));
            }
            return Ok(report);
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
        let text = "{\"deviceId\":\"a\",\"ts\":1,\"status\":\"accepted\"}\n{\"deviceId\":\"a\",\"ts\":1,\"status\":\"accepted\"}\n{\"deviceId\":\"a\",\"ts\":2,\"status\":\"unacknowledged\"}\n";
        let (expected, allowed) = read_manifest(text).unwrap();
        assert_eq!(expected, HashSet::from([k("a", 1)]));
        assert_eq!(allowed.len(), 2);
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
