//! Bandwidth windows applied to a task's source reads (R29, R30), and to the
//! objects a copy reads and sends (`copy`, copy tasks).
//!
//! A token bucket whose rate follows the window in force, re-evaluated on every
//! acquire and at least once a second while waiting: a task that starts in an
//! unlimited window slows down when a limited one begins. A `pause` window blocks
//! reads (the task stays alive, progress holds) until the window ends. Window times
//! come from [`Clock`] (local wall time); token refills use real time.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::clock::Clock;
use crate::error::Error;
use crate::policy::bandwidth::{limit_at, next_change, Limit, Window};

/// The longest a waiter sleeps before it looks at the windows again.
const RECHECK: Duration = Duration::from_secs(1);
/// Burst allowance: this much time's worth of tokens may accumulate.
const BURST: Duration = Duration::from_millis(250);

/// Rate limiter for one task's reads.
#[derive(Debug)]
pub struct Throttle {
    windows: Vec<Window>,
    clock: Clock,
    /// Set when the task is cancelled: waiting stops, so the engine sees the flag.
    cancel: Arc<AtomicBool>,
    bucket: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    refilled: Instant,
}

impl Throttle {
    /// A throttle for `windows` read on `clock`; waits end early once `cancel` is set.
    pub fn new(windows: Vec<Window>, clock: Clock, cancel: Arc<AtomicBool>) -> Throttle {
        Throttle {
            windows,
            clock,
            cancel,
            bucket: Mutex::new(Bucket {
                tokens: 0.0,
                refilled: Instant::now(),
            }),
        }
    }

    /// No windows: never waits.
    pub fn unlimited() -> Throttle {
        Throttle::new(Vec::new(), Clock::real(), Arc::new(AtomicBool::new(false)))
    }

    /// The limit in force now; `None` = unlimited.
    pub fn limit_now(&self) -> Option<Limit> {
        limit_at(&self.windows, self.clock.now_naive())
    }

    /// Wait until `bytes` may be read under the window in force. Fails with
    /// [`Error::Interrupted`] once the task is cancelled, so no read starts after a
    /// cancel (a wait in a `pause` window ends at once).
    pub async fn acquire(&self, bytes: u64) -> Result<(), Error> {
        while let Some(wait) = self.wait_for(bytes)? {
            tokio::time::sleep(wait).await;
        }
        Ok(())
    }

    /// [`Throttle::acquire`] for a thread outside the async runtime (a copy
    /// reads and sends objects one by one).
    pub fn acquire_blocking(&self, bytes: u64) -> Result<(), Error> {
        while let Some(wait) = self.wait_for(bytes)? {
            std::thread::sleep(wait);
        }
        Ok(())
    }

    /// Take `bytes` now (`None`), or how long to wait before asking again.
    fn wait_for(&self, bytes: u64) -> Result<Option<Duration>, Error> {
        if self.cancel.load(Ordering::Relaxed) {
            return Err(Error::Interrupted);
        }
        if self.windows.is_empty() {
            return Ok(None);
        }
        Ok(match self.limit_now() {
            None => {
                self.reset();
                None
            }
            Some(Limit::Pause) => {
                self.reset();
                let now = self.clock.now_naive();
                Some(
                    next_change(&self.windows, now)
                        .map_or(RECHECK, |at| self.clock.real_until_naive(at))
                        .min(RECHECK)
                        .max(Duration::from_millis(10)),
                )
            }
            Some(Limit::Rate(rate)) => self.take(bytes, rate).map(|wait| wait.min(RECHECK)),
        })
    }

    /// Take `bytes` tokens at `rate`, or say how long until there are enough.
    fn take(&self, bytes: u64, rate: u64) -> Option<Duration> {
        let rate = rate.max(1) as f64;
        let Ok(mut b) = self.bucket.lock() else {
            return None;
        };
        let now = Instant::now();
        let capacity = (rate * BURST.as_secs_f64()).max(bytes as f64);
        b.tokens = (b.tokens + now.duration_since(b.refilled).as_secs_f64() * rate).min(capacity);
        b.refilled = now;
        if b.tokens >= bytes as f64 {
            b.tokens -= bytes as f64;
            None
        } else {
            Some(Duration::from_secs_f64((bytes as f64 - b.tokens) / rate))
        }
    }

    /// Outside a rate window the bucket starts empty again (no saved-up burst).
    fn reset(&self) {
        if let Ok(mut b) = self.bucket.lock() {
            b.tokens = 0.0;
            b.refilled = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Local, TimeZone};

    fn windows(spec: &str) -> Vec<Window> {
        vec![spec.parse().unwrap()]
    }

    #[tokio::test]
    async fn r29_rate_window_bounds_throughput_from_below() {
        // 2026-05-04 is a Monday; the window covers the whole day at 4 MiB/s.
        let start = Local.with_ymd_and_hms(2026, 5, 4, 12, 0, 0).unwrap();
        let t = Throttle::new(
            windows("mon 00:00-24:00 4MiB/s"),
            Clock::starting_at(start, 1.0),
            Arc::new(AtomicBool::new(false)),
        );
        let began = Instant::now();
        for _ in 0..8 {
            t.acquire(256 * 1024).await.unwrap();
        }
        // 2 MiB at 4 MiB/s from an empty bucket: at least half a second.
        assert!(
            began.elapsed() >= Duration::from_millis(450),
            "{:?}",
            began.elapsed()
        );
        assert_eq!(t.limit_now(), Some(Limit::Rate(4 * 1024 * 1024)));
    }

    #[tokio::test]
    async fn r29_pause_blocks_until_the_window_ends() {
        // Two seconds before a pause window ends (clock at normal speed).
        let start = Local.with_ymd_and_hms(2026, 5, 4, 7, 59, 58).unwrap();
        let t = Throttle::new(
            windows("mon 07:00-08:00 pause"),
            Clock::starting_at(start, 1.0),
            Arc::new(AtomicBool::new(false)),
        );
        assert_eq!(t.limit_now(), Some(Limit::Pause));
        let began = Instant::now();
        t.acquire(1).await.unwrap();
        assert!(
            began.elapsed() >= Duration::from_millis(1500),
            "{:?}",
            began.elapsed()
        );
        assert_eq!(t.limit_now(), None);
    }

    #[tokio::test]
    async fn cancel_ends_a_pause() {
        let start = Local.with_ymd_and_hms(2026, 5, 4, 7, 0, 0).unwrap();
        let cancel = Arc::new(AtomicBool::new(true));
        let t = Throttle::new(
            windows("mon 07:00-08:00 pause"),
            Clock::starting_at(start, 1.0),
            cancel,
        );
        let began = Instant::now();
        assert!(matches!(t.acquire(1).await, Err(Error::Interrupted)));
        assert!(began.elapsed() < Duration::from_secs(1));
    }

    #[tokio::test]
    async fn outside_every_window_nothing_waits() {
        let start = Local.with_ymd_and_hms(2026, 5, 4, 20, 0, 0).unwrap();
        let t = Throttle::new(
            windows("mon 07:00-08:00 pause"),
            Clock::starting_at(start, 1.0),
            Arc::new(AtomicBool::new(false)),
        );
        let began = Instant::now();
        t.acquire(1 << 30).await.unwrap();
        assert!(began.elapsed() < Duration::from_secs(1));
    }
}
