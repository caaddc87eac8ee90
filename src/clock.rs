//! The one wall clock the scheduler and the bandwidth windows read.
//!
//! In production this is `chrono::Local::now()`. Tests (and only tests) may move it:
//!
//! - `VMBACKUP_TEST_NOW="YYYY-MM-DD HH:MM:SS"` (local time) starts the clock at that
//!   wall time when the process first reads it;
//! - `VMBACKUP_TEST_CLOCK_SPEED=N` makes it run N times faster than real time.
//!
//! Nothing else in vmbackup reads these variables. Durations that are about
//! processes (lease heartbeats, token-bucket refills) use real time, not this clock.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use chrono::{DateTime, Local, NaiveDateTime, TimeZone};

/// The environment variable that sets the test clock's start.
pub const TEST_NOW_ENV: &str = "VMBACKUP_TEST_NOW";
/// The environment variable that sets the test clock's speed.
pub const TEST_SPEED_ENV: &str = "VMBACKUP_TEST_CLOCK_SPEED";

/// A wall clock: real, or a test clock started at a set time.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    /// `(wall time at start, real instant at start, speed)` for a test clock.
    test: Option<(DateTime<Local>, Instant, f64)>,
}

impl Clock {
    /// The real clock.
    pub fn real() -> Clock {
        Clock { test: None }
    }

    /// A clock that reads `start` now and runs `speed` times real time.
    pub fn starting_at(start: DateTime<Local>, speed: f64) -> Clock {
        Clock {
            test: Some((start, Instant::now(), speed.max(0.001))),
        }
    }

    /// The process clock: the test clock when the environment sets one, else real.
    /// Read once per process, so every caller sees one consistent timeline.
    pub fn process() -> Clock {
        static CLOCK: OnceLock<Clock> = OnceLock::new();
        *CLOCK.get_or_init(|| Clock::from_env().unwrap_or_else(Clock::real))
    }

    fn from_env() -> Option<Clock> {
        let text = std::env::var(TEST_NOW_ENV).ok()?;
        let wall = NaiveDateTime::parse_from_str(text.trim(), "%Y-%m-%d %H:%M:%S")
            .or_else(|_| NaiveDateTime::parse_from_str(text.trim(), "%Y-%m-%dT%H:%M:%S"))
            .ok()?;
        let start = crate::policy::schedule::place_in_zone(&Local, wall)?;
        let speed = std::env::var(TEST_SPEED_ENV)
            .ok()
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(1.0);
        Some(Clock::starting_at(start, speed))
    }

    /// Now, in the host's time zone.
    pub fn now(&self) -> DateTime<Local> {
        match self.test {
            None => Local::now(),
            Some((start, since, speed)) => {
                let elapsed = since.elapsed().as_secs_f64() * speed;
                start + chrono::Duration::milliseconds((elapsed * 1000.0) as i64)
            }
        }
    }

    /// Now as a local wall-clock time (what bandwidth windows are written in).
    pub fn now_naive(&self) -> NaiveDateTime {
        self.now().naive_local()
    }

    /// The real time until this clock reads `at` (zero when it already does).
    pub fn real_until<Tz: TimeZone>(&self, at: &DateTime<Tz>) -> Duration {
        let ahead = at.clone().signed_duration_since(self.now());
        let secs = ahead.num_milliseconds() as f64 / 1000.0;
        let speed = self.test.map_or(1.0, |t| t.2);
        if secs <= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(secs / speed)
        }
    }

    /// The real time until the local wall clock reads `wall`.
    pub fn real_until_naive(&self, wall: NaiveDateTime) -> Duration {
        match crate::policy::schedule::place_in_zone(&Local, wall) {
            Some(at) => self.real_until(&at),
            None => Duration::from_secs(1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_clock_starts_at_the_set_time_and_runs_at_its_speed() {
        let start = Local.with_ymd_and_hms(2026, 5, 4, 7, 59, 0).unwrap();
        let clock = Clock::starting_at(start, 60.0);
        let now = clock.now();
        assert!(now >= start && now < start + chrono::Duration::seconds(30));
        // One minute of clock time is one second of real time at speed 60.
        let wait = clock.real_until(&(start + chrono::Duration::minutes(1)));
        assert!(wait <= Duration::from_secs(1) && wait > Duration::from_millis(500));
        assert_eq!(
            clock.real_until(&(start - chrono::Duration::minutes(1))),
            Duration::ZERO
        );
    }
}
