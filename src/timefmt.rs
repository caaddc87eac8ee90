//! The two ways vmbackup writes a time: for scripts and for people (docs/JSON.md).
//!
//! - JSON (every document, event, webhook): RFC 3339 in UTC with `Z` and exactly
//!   three fractional digits, `2026-12-03T08:30:00.123Z` ([`json_time`], and the
//!   serde helpers [`json`] and [`json_opt`] for `DateTime<Utc>` fields).
//! - People (tables, result lines, stderr): local time with its UTC offset,
//!   `2026-12-03 09:30:00 +01:00` ([`human_time`]).
//!
//! Times stored in the state database are RFC 3339 UTC text (seconds or
//! milliseconds); [`parse`] reads either.

use chrono::{DateTime, Local, SecondsFormat, Utc};

/// `2026-12-03T08:30:00.123Z`.
pub fn json_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// `2026-12-03 09:30:00 +01:00` (the host's time zone).
pub fn human_time(t: DateTime<Utc>) -> String {
    // Parsed once: listings format ten thousand times.
    static ITEMS: std::sync::LazyLock<Vec<chrono::format::Item<'static>>> =
        std::sync::LazyLock::new(|| {
            chrono::format::StrftimeItems::new("%Y-%m-%d %H:%M:%S %:z").collect()
        });
    t.with_timezone(&Local)
        .format_with_items(ITEMS.iter())
        .to_string()
}

/// A diagnostic line's time: local, with milliseconds and the offset,
/// `2026-12-03 09:30:00.123 +01:00`.
pub fn log_time(t: DateTime<Utc>) -> String {
    t.with_timezone(&Local)
        .format("%Y-%m-%d %H:%M:%S%.3f %:z")
        .to_string()
}

/// A stored or user-given RFC 3339 time, in UTC.
pub fn parse(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text.trim())
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// A stored time as JSON wants it; an unparsable one is passed on unchanged
/// (never expected: every stored time is written by [`crate::clock`]).
pub fn json_of_stored(text: &str) -> String {
    parse(text)
        .map(json_time)
        .unwrap_or_else(|| text.to_string())
}

/// A stored time for people; unparsable text is shown as it is.
pub fn human_of_stored(text: &str) -> String {
    parse(text)
        .map(human_time)
        .unwrap_or_else(|| text.to_string())
}

/// Seconds between two times, with millisecond precision (never negative).
pub fn seconds_between(from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    ((to - from).num_milliseconds().max(0) as f64) / 1000.0
}

/// `#[serde(with = "crate::timefmt::json")]` for a `DateTime<Utc>` field.
pub mod json {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::json_time(*t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let text = String::deserialize(d)?;
        super::parse(&text)
            .ok_or_else(|| serde::de::Error::custom(format!("not an RFC 3339 time: {text}")))
    }
}

/// `#[serde(with = "crate::timefmt::json_opt")]` for an `Option<DateTime<Utc>>` field.
pub mod json_opt {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.serialize_str(&super::json_time(*t)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DateTime<Utc>>, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(None),
            Some(text) => super::parse(&text)
                .map(Some)
                .ok_or_else(|| serde::de::Error::custom(format!("not an RFC 3339 time: {text}"))),
        }
    }
}

/// `#[serde(serialize_with = "crate::timefmt::stored")]` for a stored `String` time.
pub fn stored<S: serde::Serializer>(text: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&json_of_stored(text))
}

/// `#[serde(serialize_with = "crate::timefmt::stored_opt")]` for an `Option<String>` time.
pub fn stored_opt<S: serde::Serializer>(text: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match text {
        Some(t) => s.serialize_str(&json_of_stored(t)),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn json_times_have_z_and_milliseconds() {
        let t = Utc.with_ymd_and_hms(2026, 12, 3, 8, 30, 0).unwrap();
        assert_eq!(json_time(t), "2026-12-03T08:30:00.000Z");
        let t = t + chrono::Duration::nanoseconds(123_456_789);
        assert_eq!(json_time(t), "2026-12-03T08:30:00.123Z");
        // Stored times of either precision (and other offsets) come out the same way.
        assert_eq!(
            json_of_stored("2026-12-03T08:30:00Z"),
            "2026-12-03T08:30:00.000Z"
        );
        assert_eq!(
            json_of_stored("2026-12-03T09:30:00.669980091+01:00"),
            "2026-12-03T08:30:00.669Z"
        );
        assert_eq!(parse("nonsense"), None);
    }

    #[test]
    fn human_times_carry_their_offset() {
        let t = Utc.with_ymd_and_hms(2026, 12, 3, 8, 30, 0).unwrap();
        let h = human_time(t);
        let (wall, zone) = h.split_at(19);
        assert_eq!(wall.len(), "2026-12-03 09:30:00".len(), "{h}");
        let offset = t.with_timezone(&Local).offset().to_string();
        assert_eq!(zone.trim(), offset, "{h}");
        assert!(zone.starts_with(" +") || zone.starts_with(" -"), "{h}");
    }

    #[test]
    fn serde_helpers_round_trip() {
        #[derive(serde::Serialize, serde::Deserialize)]
        struct T {
            #[serde(with = "json")]
            a: DateTime<Utc>,
            #[serde(with = "json_opt")]
            b: Option<DateTime<Utc>>,
        }
        let a = Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap();
        let text = serde_json::to_string(&T { a, b: None }).unwrap();
        assert_eq!(text, r#"{"a":"2026-01-02T03:04:05.000Z","b":null}"#);
        let back: T = serde_json::from_str(&text).unwrap();
        assert_eq!((back.a, back.b), (a, None));
        assert_eq!(
            seconds_between(a, a + chrono::Duration::milliseconds(1500)),
            1.5
        );
        assert_eq!(seconds_between(a, a - chrono::Duration::seconds(1)), 0.0);
    }
}
