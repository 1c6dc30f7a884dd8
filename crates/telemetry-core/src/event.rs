//! The telemetry event and its validation: one parser that every HTTP surface and the
//! stream processor share, so a payload means the same thing at every hop.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Longest accepted `deviceId`, in characters.
pub const MAX_DEVICE_ID_CHARS: usize = 128;

/// A stored event, as ingest-api's `GET /events` and `POST /event` show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredEvent {
    pub id: i64,
    #[serde(flatten)]
    pub event: Event,
    /// When ingest-api stored it, epoch milliseconds.
    #[serde(rename = "receivedAt")]
    pub received_at: i64,
}

/// One location report from a device. Field names on the wire are the exercise's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Unique identifier of the device emitting the event.
    #[serde(rename = "deviceId")]
    pub device_id: String,
    /// Event time in epoch milliseconds.
    pub ts: i64,
    /// Latitude in decimal degrees, within [-90, 90].
    pub latitude: f64,
    /// Longitude in decimal degrees, within [-180, 180].
    pub longitude: f64,
}

/// Identity of an event: two events with the same identity are duplicates.
pub type EventKey = (String, i64);

impl Event {
    /// The event's identity, `(deviceId, ts)`.
    pub fn key(&self) -> EventKey {
        (self.device_id.clone(), self.ts)
    }

    /// True when both events carry the same coordinates (bit-for-bit, so a resend matches).
    pub fn same_position(&self, other: &Event) -> bool {
        self.latitude.to_bits() == other.latitude.to_bits()
            && self.longitude.to_bits() == other.longitude.to_bits()
    }

    /// Checks the rules of an already typed event (used for events built in code).
    pub fn validate(&self) -> Result<(), ValidationError> {
        check_device_id(&self.device_id)?;
        if self.ts < 0 {
            return Err(ValidationError::new("ts", "must be an integer >= 0"));
        }
        check_coordinate("latitude", self.latitude, 90.0)?;
        check_coordinate("longitude", self.longitude, 180.0)?;
        Ok(())
    }

    /// Refuses a ts more than `skew_ms` ahead of `now_ms` (the receiver's clock, epoch ms): a
    /// client that sends microseconds, or whose clock is far off, learns it at once.
    pub fn check_not_ahead(&self, now_ms: i64, skew_ms: i64) -> Result<(), ValidationError> {
        if self.ts > now_ms.saturating_add(skew_ms) {
            return Err(ValidationError::new(
                "ts",
                "must not be more than MAX_FUTURE_SKEW_MS ahead of the receiver's clock (epoch milliseconds, not microseconds)",
            ));
        }
        Ok(())
    }

    /// Parses and validates one event from JSON text.
    pub fn from_json(bytes: &[u8]) -> Result<Event, ParseError> {
        // Fast path: straight into the typed struct. Anything it refuses goes through the
        // slower value path, which names the field and the rule.
        if let Ok(event) = serde_json::from_slice::<Event>(bytes) {
            if event.validate().is_ok() {
                return Ok(event);
            }
        }
        let value: Value = serde_json::from_slice(bytes).map_err(ParseError::Json)?;
        Event::from_value(&value).map_err(ParseError::Invalid)
    }

    /// Validates one event given as a JSON value. Unknown fields are ignored.
    pub fn from_value(value: &Value) -> Result<Event, ValidationError> {
        let object = value
            .as_object()
            .ok_or_else(|| ValidationError::new("$", "must be a JSON object"))?;
        let device_id = match required(object, "deviceId")? {
            Value::String(s) => s.clone(),
            _ => return Err(ValidationError::new("deviceId", "must be a string")),
        };
        check_device_id(&device_id)?;
        let ts = match required(object, "ts")? {
            Value::Number(n) => {
                if let Some(ts) = n.as_i64() {
                    if ts < 0 {
                        return Err(ValidationError::new("ts", "must be an integer >= 0"));
                    }
                    ts
                } else if n.is_u64() {
                    return Err(ValidationError::new("ts", "must fit in a signed 64-bit integer"));
                } else {
                    // JSON has one number type: `1.7e12` and `1700000000000.0` are the integer
                    // 1700000000000, as Jackson or JavaScript after arithmetic may write it.
                    integral_ts(n.as_f64().unwrap_or(f64::NAN))?
                }
            }
            _ => {
                return Err(ValidationError::new(
                    "ts",
                    "must be a number (epoch milliseconds)",
                ))
            }
        };
        let latitude = number(object, "latitude")?;
        check_coordinate("latitude", latitude, 90.0)?;
        let longitude = number(object, "longitude")?;
        check_coordinate("longitude", longitude, 180.0)?;
        Ok(Event {
            device_id,
            ts,
            latitude,
            longitude,
        })
    }
}

/// A `ts` written as a float: taken when it is an integer >= 0 that the float holds exactly
/// (below 2^53; from there on, the text may name an integer the float cannot, so it must be
/// written as an integer).
fn integral_ts(f: f64) -> Result<i64, ValidationError> {
    const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53
    if f.fract() != 0.0 || !f.is_finite() {
        return Err(ValidationError::new(
            "ts",
            "must be an integer (epoch milliseconds)",
        ));
    }
    if f < 0.0 {
        return Err(ValidationError::new("ts", "must be an integer >= 0"));
    }
    if f >= EXACT {
        return Err(ValidationError::new(
            "ts",
            "must be written as an integer from 2^53 on (a fraction or exponent cannot hold it exactly)",
        ));
    }
    Ok(f as i64)
}

/// Parses a JSON array of events. Returns the first problem, with the item's index.
pub fn parse_batch(bytes: &[u8]) -> Result<Vec<Event>, ParseError> {
    if let Ok(events) = serde_json::from_slice::<Vec<Event>>(bytes) {
        if events.iter().all(|e| e.validate().is_ok()) {
            return Ok(events);
        }
    }
    let value: Value = serde_json::from_slice(bytes).map_err(ParseError::Json)?;
    let items = match value {
        Value::Array(items) => items,
        _ => return Err(ParseError::NotArray),
    };
    items
        .iter()
        .enumerate()
        .map(|(index, item)| Event::from_value(item).map_err(|error| ParseError::Item { index, error }))
        .collect()
}

fn required<'a>(object: &'a Map<String, Value>, field: &'static str) -> Result<&'a Value, ValidationError> {
    match object.get(field) {
        None | Some(Value::Null) => Err(ValidationError::new(field, "is required")),
        Some(v) => Ok(v),
    }
}

fn number(object: &Map<String, Value>, field: &'static str) -> Result<f64, ValidationError> {
    match required(object, field)? {
        Value::Number(n) => n
            .as_f64()
            .ok_or_else(|| ValidationError::new(field, "must be a finite number")),
        _ => Err(ValidationError::new(field, "must be a number")),
    }
}

fn check_device_id(device_id: &str) -> Result<(), ValidationError> {
    let chars = device_id.chars().count();
    if chars == 0 || chars > MAX_DEVICE_ID_CHARS {
        return Err(ValidationError::new("deviceId", "must be 1 to 128 characters"));
    }
    if device_id.chars().any(char::is_control) {
        return Err(ValidationError::new(
            "deviceId",
            "must not contain control characters",
        ));
    }
    Ok(())
}

fn check_coordinate(field: &'static str, value: f64, bound: f64) -> Result<(), ValidationError> {
    if !value.is_finite() {
        return Err(ValidationError::new(field, "must be a finite number"));
    }
    if !(-bound..=bound).contains(&value) {
        let rule = if bound == 90.0 {
            "must be within [-90, 90]"
        } else {
            "must be within [-180, 180]"
        };
        return Err(ValidationError::new(field, rule));
    }
    Ok(())
}

/// A field of an event that broke a rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} {rule}")]
pub struct ValidationError {
    /// The JSON field name (`$` for the event itself).
    pub field: &'static str,
    /// The rule it broke, phrased to follow the field name.
    pub rule: &'static str,
}

impl ValidationError {
    fn new(field: &'static str, rule: &'static str) -> Self {
        Self { field, rule }
    }
}

/// Why a request body could not be turned into events.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// Not JSON at all (includes NaN, Infinity and numbers out of f64 range).
    #[error("malformed JSON: {0}")]
    Json(serde_json::Error),
    /// A batch body that is JSON but not an array.
    #[error("body must be a JSON array of events")]
    NotArray,
    /// One event that broke a rule.
    #[error("{0}")]
    Invalid(ValidationError),
    /// One item of a batch that broke a rule.
    #[error("item {index}: {error}")]
    Item {
        /// Position of the item in the array, from 0.
        index: usize,
        /// What was wrong with it.
        error: ValidationError,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn field_of(v: Value) -> &'static str {
        Event::from_value(&v).unwrap_err().field
    }

    #[test]
    fn valid_event_round_trips_with_exercise_field_names() {
        let v = json!({"deviceId": "d-1", "ts": 1700000000000i64, "latitude": 37.7, "longitude": -122.4, "extra": 1});
        let e = Event::from_value(&v).expect("a valid event");
        assert_eq!(e.device_id, "d-1");
        let back = serde_json::to_value(&e).expect("an event serializes");
        assert_eq!(
            back,
            json!({"deviceId": "d-1", "ts": 1700000000000i64, "latitude": 37.7, "longitude": -122.4})
        );
    }

    #[test]
    fn each_broken_rule_names_its_field() {
        let ok = json!({"deviceId": "d", "ts": 1, "latitude": 0.0, "longitude": 0.0});
        let with = |k: &str, v: Value| {
            let mut o = ok.clone();
            o[k] = v;
            o
        };
        assert_eq!(field_of(json!([1])), "$");
        assert_eq!(field_of(with("deviceId", json!(""))), "deviceId");
        assert_eq!(field_of(with("deviceId", json!("a".repeat(129)))), "deviceId");
        assert_eq!(field_of(with("deviceId", json!("a\nb"))), "deviceId");
        assert_eq!(field_of(with("deviceId", json!(5))), "deviceId");
        assert_eq!(field_of(with("ts", json!(-1))), "ts");
        assert_eq!(field_of(with("ts", json!(1.5))), "ts");
        assert_eq!(field_of(with("ts", json!(u64::MAX))), "ts");
        assert_eq!(field_of(with("ts", json!("1"))), "ts");
        assert_eq!(field_of(with("latitude", json!(90.5))), "latitude");
        assert_eq!(field_of(with("longitude", json!(-180.01))), "longitude");
        assert_eq!(field_of(with("longitude", json!(null))), "longitude");
        let mut missing = ok.clone();
        missing.as_object_mut().expect("an object").remove("latitude");
        assert_eq!(field_of(missing), "latitude");
    }

    #[test]
    fn device_id_limit_counts_characters_not_bytes() {
        let v = json!({"deviceId": "é".repeat(128), "ts": 1, "latitude": 0, "longitude": 0});
        assert!(Event::from_value(&v).is_ok());
    }

    #[test]
    fn non_finite_numbers_are_malformed_json() {
        assert!(matches!(
            Event::from_json(br#"{"deviceId":"d","ts":1,"latitude":NaN,"longitude":0}"#),
            Err(ParseError::Json(_))
        ));
        assert!(matches!(
            Event::from_json(br#"{"deviceId":"d","ts":1,"latitude":1e400,"longitude":0}"#),
            Err(ParseError::Json(_))
        ));
    }

    #[test]
    fn batch_error_reports_the_item_index() {
        let body = br#"[{"deviceId":"d","ts":1,"latitude":0,"longitude":0},{"deviceId":"d","ts":2,"latitude":99,"longitude":0}]"#;
        match parse_batch(body) {
            Err(ParseError::Item { index, error }) => {
                assert_eq!(index, 1);
                assert_eq!(error.field, "latitude");
            }
            other => panic!("expected item error, got {other:?}"),
        }
        assert!(matches!(parse_batch(b"{}"), Err(ParseError::NotArray)));
    }

    #[test]
    fn an_integral_ts_is_taken_in_any_json_form_and_a_fractional_one_is_refused() {
        for text in [
            "1700000000000",
            "1.7e12",
            "1700000000000.0",
            "17000000000000e-1",
            "0.0",
        ] {
            let body = format!(r#"{{"deviceId":"d","ts":{text},"latitude":0,"longitude":0}}"#);
            let e = Event::from_json(body.as_bytes()).unwrap_or_else(|e| panic!("{text}: {e}"));
            let want = if text == "0.0" { 0 } else { 1_700_000_000_000 };
            assert_eq!(e.ts, want, "{text}");
            let batch = format!("[{body}]");
            assert_eq!(
                parse_batch(batch.as_bytes()).expect("a batch")[0].ts,
                want,
                "{text} in a batch"
            );
        }
        for text in ["1700000000000.5", "-1.0", "1e300", "9007199254740993.0"] {
            let body = format!(r#"{{"deviceId":"d","ts":{text},"latitude":0,"longitude":0}}"#);
            match Event::from_json(body.as_bytes()) {
                Err(ParseError::Invalid(e)) => assert_eq!(e.field, "ts", "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    #[test]
    fn coordinates_are_read_as_written_to_the_last_bit() {
        let body = br#"{"deviceId":"d","ts":1,"latitude":0,"longitude":3.0404516262184098e-92}"#;
        let e = Event::from_json(body).expect("valid");
        assert_eq!(e.longitude.to_bits(), 3.0404516262184098e-92f64.to_bits());
    }

    proptest::proptest! {
        /// Any finite coordinate in range survives writing and reading back bit for bit, through
        /// both parse paths (what the proxy re-encodes is what the processor and the sink read).
        #[test]
        fn any_coordinate_survives_the_round_trip_bit_for_bit(
            lat_bits in proptest::num::u64::ANY,
            lon_bits in proptest::num::u64::ANY,
        ) {
            let fit = |bits: u64, max: f64| {
                let f = f64::from_bits(bits);
                if f.is_finite() && f.abs() <= max { f } else { (f64::from_bits(bits >> 12) % max).max(-max) }
            };
            let (lat, lon) = (fit(lat_bits, 90.0), fit(lon_bits, 180.0));
            proptest::prop_assume!(lat.is_finite() && lon.is_finite());
            let e = Event { device_id: "d".into(), ts: 1, latitude: lat, longitude: lon };
            let text = serde_json::to_vec(&e).expect("serializes");
            let fast = Event::from_json(&text).expect("valid");
            let value: Value = serde_json::from_slice(&text).expect("JSON");
            let slow = Event::from_value(&value).expect("valid");
            let batch = parse_batch(format!("[{}]", String::from_utf8_lossy(&text)).as_bytes()).expect("batch");
            for got in [&fast, &slow, &batch[0]] {
                proptest::prop_assert_eq!(got.latitude.to_bits(), lat.to_bits());
                proptest::prop_assert_eq!(got.longitude.to_bits(), lon.to_bits());
            }
        }
    }

    #[test]
    fn typed_fast_path_and_value_path_agree() {
        let cases: &[&[u8]] = &[
            br#"{"deviceId":"d","ts":1,"latitude":1.5,"longitude":2,"x":[1]}"#,
            br#"{"deviceId":"d","ts":-1,"latitude":0,"longitude":0}"#,
            br#"{"deviceId":"d","ts":1.0,"latitude":0,"longitude":0}"#,
            br#"{"deviceId":"d","ts":1,"latitude":null,"longitude":0}"#,
            br#"{"deviceId":"","ts":1,"latitude":0,"longitude":0}"#,
            br#"{"deviceId":"d","ts":9223372036854775808,"latitude":0,"longitude":0}"#,
        ];
        for case in cases {
            let value: Value = serde_json::from_slice(case).expect("the case is JSON");
            let slow = Event::from_value(&value).map_err(|e| e.field);
            let fast = Event::from_json(case).map_err(|e| match e {
                ParseError::Invalid(v) => v.field,
                other => panic!("unexpected {other:?}"),
            });
            assert_eq!(fast, slow, "case {}", String::from_utf8_lossy(case));
        }
    }
}
