//! What to send, as pure seeded code: devices moving around the base point, distinct
//! `(deviceId, ts)` for distinct events, exact resends as duplicates, and ts moved back by up
//! to the configured bound for out-of-order events.

use std::collections::HashSet;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use telemetry_core::Event;

/// Why an event is in the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Fresh,
    OutOfOrder,
    Duplicate,
}

/// One planned request.
#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    pub device: usize,
    pub event: Event,
    pub kind: Kind,
}

#[derive(Debug)]
struct Device {
    id: String,
    lat: f64,
    lon: f64,
    heading: f64,
    max_ts: i64,
    used: HashSet<i64>,
}

/// Plans bursts.
#[derive(Debug)]
pub struct Planner {
    rng: StdRng,
    devices: Vec<Device>,
    recent: Vec<(usize, Event)>,
    duplicate_rate: f64,
    out_of_order_rate: f64,
    max_out_of_order_ms: i64,
}

const RECENT: usize = 2000;

impl Planner {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        seed: u64,
        devices: usize,
        prefix: &str,
        base_lat: f64,
        base_lon: f64,
        duplicate_rate: f64,
        out_of_order_rate: f64,
        max_out_of_order_ms: i64,
    ) -> Planner {
        let mut rng = StdRng::seed_from_u64(seed);
        let devices = (0..devices.max(1))
            .map(|i| Device {
                id: format!("{prefix}-{i}"),
                // Start within about 1 km of the base point.
                lat: (base_lat + rng.random_range(-0.01..0.01)).clamp(-90.0, 90.0),
                lon: (base_lon + rng.random_range(-0.01..0.01)).clamp(-180.0, 180.0),
                heading: rng.random_range(0.0..std::f64::consts::TAU),
                max_ts: i64::MIN,
                used: HashSet::new(),
            })
            .collect();
        Planner {
            rng,
            devices,
            recent: Vec::new(),
            duplicate_rate: duplicate_rate.clamp(0.0, 1.0),
            out_of_order_rate: out_of_order_rate.clamp(0.0, 1.0),
            max_out_of_order_ms: max_out_of_order_ms.max(0),
        }
    }

    /// `size` events planned at wall time `now_ms`.
    pub fn burst(&mut self, size: usize, now_ms: i64) -> Vec<Planned> {
        (0..size).map(|_| self.next(now_ms)).collect()
    }

    fn next(&mut self, now_ms: i64) -> Planned {
        if !self.recent.is_empty() && self.rng.random_bool(self.duplicate_rate) {
            let (device, event) = self.recent[self.rng.random_range(0..self.recent.len())].clone();
            return Planned {
                device,
                event,
                kind: Kind::Duplicate,
            };
        }
        let d = self.rng.random_range(0..self.devices.len());
        let want_late = self.max_out_of_order_ms > 0 && self.rng.random_bool(self.out_of_order_rate);
        let dev = &mut self.devices[d];
        // About 10 m per event, turning slowly: a device walking or driving around.
        dev.heading += self.rng.random_range(-0.3..0.3);
        dev.lat = (dev.lat + 1e-4 * dev.heading.cos()).clamp(-90.0, 90.0);
        dev.lon = (dev.lon + 1e-4 * dev.heading.sin()).clamp(-180.0, 180.0);
        let mut kind = Kind::Fresh;
        let mut ts = None;
        if want_late && dev.max_ts != i64::MIN {
            for _ in 0..5 {
                let back = self.rng.random_range(1..=self.max_out_of_order_ms);
                let candidate = dev.max_ts - back;
                if candidate >= 0 && !dev.used.contains(&candidate) {
                    ts = Some(candidate);
                    kind = Kind::OutOfOrder;
                    break;
                }
            }
        }
        let ts = ts.unwrap_or_else(|| {
            let t = now_ms.max(dev.max_ts.saturating_add(1 + self.rng.random_range(0..20)));
            dev.max_ts = t;
            t
        });
        dev.used.insert(ts);
        let event = Event {
            device_id: dev.id.clone(),
            ts,
            latitude: (dev.lat * 1e6).round() / 1e6,
            longitude: (dev.lon * 1e6).round() / 1e6,
        };
        if self.recent.len() >= RECENT {
            let i = self.rng.random_range(0..RECENT);
            self.recent[i] = (d, event.clone());
        } else {
            self.recent.push((d, event.clone()));
        }
        Planned {
            device: d,
            event,
            kind,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn planner(seed: u64) -> Planner {
        Planner::new(seed, 5, "device", 37.7749, -122.4194, 0.05, 0.1, 5000)
    }

    #[test]
    fn same_seed_gives_the_same_plan() {
        assert_eq!(planner(3).burst(200, 1_000_000), planner(3).burst(200, 1_000_000));
    }

    #[test]
    fn distinct_events_never_share_an_identity_and_duplicates_are_exact_resends() {
        let mut p = planner(9);
        let mut by_id: HashMap<(String, i64), Event> = HashMap::new();
        let (mut dups, mut ooo) = (0, 0);
        for b in 0..20 {
            for planned in p.burst(100, 1_000_000 + b * 1000) {
                let key = planned.event.key();
                match planned.kind {
                    Kind::Duplicate => {
                        dups += 1;
                        assert_eq!(
                            by_id.get(&key),
                            Some(&planned.event),
                            "a duplicate resends an event already planned"
                        );
                    }
                    _ => {
                        if planned.kind == Kind::OutOfOrder {
                            ooo += 1;
                        }
                        assert!(
                            by_id.insert(key, planned.event.clone()).is_none(),
                            "identity reused"
                        );
                        planned.event.validate().expect("a planned event is valid");
                    }
                }
            }
        }
        assert!((50..=160).contains(&dups), "about 5% duplicates, got {dups}");
        assert!((120..=300).contains(&ooo), "about 10% out of order, got {ooo}");
    }

    #[test]
    fn out_of_order_events_stay_within_the_bound_behind_their_device() {
        let mut p = planner(5);
        let mut max: HashMap<String, i64> = HashMap::new();
        for b in 0..20 {
            for planned in p.burst(100, 1_000_000 + b * 1000) {
                let e = &planned.event;
                let m = max.entry(e.device_id.clone()).or_insert(i64::MIN);
                if planned.kind == Kind::OutOfOrder {
                    assert!(e.ts < *m && e.ts >= *m - 5000, "moved back within 5000 ms");
                }
                *m = (*m).max(e.ts);
            }
        }
    }

    #[test]
    fn devices_stay_near_the_base_point() {
        let mut p = planner(1);
        for planned in p.burst(2000, 0) {
            assert!((planned.event.latitude - 37.7749).abs() < 0.5);
            assert!((planned.event.longitude + 122.4194).abs() < 0.5);
        }
    }
}
