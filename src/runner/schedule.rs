//! Which scheduled run of a rule's VM is due, from the last recorded slot (R11-R14).
//!
//! Each VM of a rule has a watermark: the newest schedule slot recorded for it in
//! `schedule_runs` (or, before its first run, the time it was added to the rule).
//! The slots in `(watermark, now]` are due. Several of them (the host was off, or
//! the clock jumped forward) run once, at the strongest level among them, and the
//! others are reported as missed so the caller can log them: nothing is skipped
//! silently. Slots are instants, so a daylight-saving change cannot produce one
//! twice; a clock that jumps back before the watermark finds nothing due until it
//! passes it again. A one-time policy has one slot, due once it is reached (R13).

use chrono::{DateTime, TimeZone, Utc};

use crate::level::Level;
use crate::policy::schedule::place_in_zone;
use crate::policy::Policy;

/// Stop enumerating missed slots after this many (about ten years of hourly runs
/// would still be reported as "at least this many").
const MAX_SLOTS: usize = 100_000;

/// A due run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    /// The newest due slot: the one that runs and becomes the watermark.
    pub slot: DateTime<Utc>,
    /// The strongest level among the due slots.
    pub level: Level,
    /// Older due slots folded into this run (logged, never run separately).
    pub missed: Vec<DateTime<Utc>>,
}

/// The run due at `now` for a VM whose newest recorded slot is `watermark`.
pub fn due_run<Tz: TimeZone>(
    policy: &Policy,
    watermark: DateTime<Utc>,
    now: &DateTime<Tz>,
) -> Option<Due> {
    let zone = now.timezone();
    match policy {
        Policy::Once { at } => {
            let slot = place_in_zone(&zone, *at)?.with_timezone(&Utc);
            (slot <= now.with_timezone(&Utc)).then_some(Due {
                slot,
                level: Level::Full,
                missed: Vec::new(),
            })
        }
        Policy::Periodic { .. } => {
            let mut cursor = watermark.with_timezone(&zone);
            let mut slots: Vec<(DateTime<Utc>, Level)> = Vec::new();
            while slots.len() < MAX_SLOTS {
                let Some((at, level)) = policy.next_runs_tz(&cursor, 1).into_iter().next() else {
                    break;
                };
                if at > *now {
                    break;
                }
                slots.push((at.with_timezone(&Utc), level));
                cursor = at;
            }
            let (slot, _) = *slots.last()?;
            let level = slots
                .iter()
                .map(|s| s.1)
                .max_by_key(|l| match l {
                    Level::Full => 2,
                    Level::Diff => 1,
                    Level::Inc => 0,
                })
                .unwrap_or(Level::Full);
            let missed = slots[..slots.len() - 1].iter().map(|s| s.0).collect();
            Some(Due {
                slot,
                level,
                missed,
            })
        }
    }
}

/// The next slot after both `watermark` and `now` (when the daemon should wake).
pub fn next_slot<Tz: TimeZone>(
    policy: &Policy,
    watermark: DateTime<Utc>,
    now: &DateTime<Tz>,
) -> Option<DateTime<Utc>> {
    let zone = now.timezone();
    match policy {
        Policy::Once { at } => {
            let slot = place_in_zone(&zone, *at)?.with_timezone(&Utc);
            (slot > now.with_timezone(&Utc)).then_some(slot)
        }
        Policy::Periodic { .. } => {
            let from = watermark.max(now.with_timezone(&Utc)).with_timezone(&zone);
            policy
                .next_runs_tz(&from, 1)
                .into_iter()
                .next()
                .map(|(at, _)| at.with_timezone(&Utc))
        }
    }
}

/// The watermark text as stored (RFC 3339 UTC, seconds).
pub fn slot_text(slot: DateTime<Utc>) -> String {
    slot.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// True when `slot` is the last run of `policy` on its (local) day: no run of
/// the policy falls later on the same date (R17: prune after the day's last).
pub fn last_slot_of_day<Tz: TimeZone>(policy: &Policy, slot: &DateTime<Tz>) -> bool {
    match policy.next_runs_tz(slot, 1).first() {
        Some((next, _)) => next.date_naive() != slot.date_naive(),
        None => true,
    }
}

/// Parse a stored watermark or `added_at`.
pub fn parse_slot(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn r17_the_last_slot_of_a_day_is_the_one_with_no_run_after_it_that_day() {
        let policy = crate::policy::build_policy(
            None,
            &[
                "full daily at 01:00".to_string(),
                "inc daily at 07:00,13:00".to_string(),
            ],
            Some(0),
            chrono::NaiveDate::from_ymd_opt(2026, 1, 1)
                .unwrap()
                .and_hms_opt(0, 0, 0)
                .unwrap(),
        )
        .unwrap();
        let at = |h| Utc.with_ymd_and_hms(2026, 11, 30, h, 0, 0).unwrap();
        assert!(!last_slot_of_day(&policy, &at(1)));
        assert!(!last_slot_of_day(&policy, &at(7)));
        assert!(last_slot_of_day(&policy, &at(13)));
    }
    use chrono::NaiveDateTime;
    use chrono_tz::Europe::Berlin;

    fn periodic(specs: &[&str]) -> Policy {
        let specs: Vec<String> = specs.iter().map(|s| s.to_string()).collect();
        crate::policy::build_policy(None, &specs, Some(4), wall("2026-01-01 00:00")).unwrap()
    }

    fn wall(text: &str) -> NaiveDateTime {
        NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M").unwrap()
    }

    fn berlin(text: &str) -> DateTime<chrono_tz::Tz> {
        place_in_zone(&Berlin, wall(text)).unwrap()
    }

    fn utc(text: &str) -> DateTime<Utc> {
        Utc.from_utc_datetime(&wall(text))
    }

    fn due(p: &Policy, mark: &str, now: &str) -> Option<Due> {
        due_run(p, berlin(mark).with_timezone(&Utc), &berlin(now))
    }

    #[test]
    fn r14_daily_several_times_runs_the_newest_slot_once() {
        let p = periodic(&["full daily at 01:00,13:00"]);
        assert_eq!(due(&p, "2026-03-02 01:00", "2026-03-02 12:59"), None);
        let d = due(&p, "2026-03-02 01:00", "2026-03-02 13:00").unwrap();
        assert_eq!(d.slot, berlin("2026-03-02 13:00").with_timezone(&Utc));
        assert!(d.missed.is_empty());
        // With that slot recorded, the same moment has nothing due: no slot twice.
        assert_eq!(due(&p, "2026-03-02 13:00", "2026-03-02 13:05"), None);
    }

    #[test]
    fn missed_slots_fold_into_one_run_at_the_strongest_level_and_are_reported() {
        let p = periodic(&[
            "full weekly on sun at 01:00",
            "inc weekly on mon-sat at 01:00",
        ]);
        // 2026-03-07 is a Saturday. Down from Saturday 02:00 to Tuesday 09:00:
        // Sun full, Mon inc, Tue inc were missed; one run, a full, at Tuesday's slot.
        let d = due(&p, "2026-03-07 01:00", "2026-03-10 09:00").unwrap();
        assert_eq!(d.slot, berlin("2026-03-10 01:00").with_timezone(&Utc));
        assert_eq!(d.level, Level::Full);
        assert_eq!(d.missed.len(), 2);
        let d = due(&p, "2026-03-08 01:00", "2026-03-10 09:00").unwrap();
        assert_eq!(d.level, Level::Inc);
    }

    #[test]
    fn monthly_last_day_and_leap_years() {
        let p = periodic(&["full monthly on last at 23:00"]);
        let d = due(&p, "2028-02-01 00:00", "2028-02-29 23:30").unwrap();
        assert_eq!(d.slot, berlin("2028-02-29 23:00").with_timezone(&Utc));
        assert_eq!(due(&p, "2027-02-01 00:00", "2027-02-28 22:59"), None);
        assert!(due(&p, "2027-02-01 00:00", "2027-02-28 23:00").is_some());
        // The 31st does not exist in April: skipped as in cron, and nothing is due.
        let p31 = periodic(&["full monthly on 31 at 01:00"]);
        assert_eq!(due(&p31, "2026-04-01 00:00", "2026-04-30 23:59"), None);
    }

    #[test]
    fn quarterly_runs_in_the_quarters_first_month() {
        let p = periodic(&["full quarterly on 1 at 02:00"]);
        assert_eq!(due(&p, "2026-01-01 03:00", "2026-03-31 23:59"), None);
        let d = due(&p, "2026-01-01 03:00", "2026-04-01 02:00").unwrap();
        assert_eq!(d.slot, berlin("2026-04-01 02:00").with_timezone(&Utc));
        assert_eq!(
            next_slot(&p, d.slot, &berlin("2026-04-01 02:00")),
            Some(berlin("2026-07-01 02:00").with_timezone(&Utc))
        );
    }

    #[test]
    fn dst_spring_forward_runs_once_after_the_gap() {
        // 2026-03-29 02:00-03:00 does not exist in Berlin.
        let p = periodic(&["full daily at 02:30"]);
        let d = due(&p, "2026-03-28 03:00", "2026-03-29 03:10").unwrap();
        assert_eq!(d.slot, utc("2026-03-29 01:00"), "03:00 CEST = 01:00 UTC");
        assert!(d.missed.is_empty());
        assert_eq!(due_run(&p, d.slot, &berlin("2026-03-29 23:00")), None);
    }

    #[test]
    fn dst_fall_back_runs_once_in_the_repeated_hour() {
        // 2026-10-25 02:00-03:00 happens twice in Berlin.
        let p = periodic(&["full daily at 02:30"]);
        let first = Berlin
            .with_ymd_and_hms(2026, 10, 25, 2, 30, 0)
            .earliest()
            .unwrap();
        let second = Berlin
            .with_ymd_and_hms(2026, 10, 25, 2, 30, 0)
            .latest()
            .unwrap();
        let d = due_run(&p, berlin("2026-10-24 03:00").with_timezone(&Utc), &first).unwrap();
        assert_eq!(d.slot, first.with_timezone(&Utc));
        // At the second 02:30 (an hour later), the recorded slot means nothing is due.
        assert_eq!(due_run(&p, d.slot, &second), None);
        assert_eq!(
            due_run(&p, d.slot, &(second + chrono::Duration::minutes(40))),
            None
        );
    }

    #[test]
    fn clock_jumping_back_runs_nothing_twice() {
        let p = periodic(&["full daily at 01:00"]);
        let mark = berlin("2026-03-05 01:00").with_timezone(&Utc);
        // The clock is set back two days: the slots before the watermark never rerun.
        assert_eq!(due_run(&p, mark, &berlin("2026-03-03 09:00")), None);
        assert_eq!(due_run(&p, mark, &berlin("2026-03-05 23:00")), None);
        assert!(due_run(&p, mark, &berlin("2026-03-06 01:00")).is_some());
        // The daemon wakes at the next slot after the watermark, not before it.
        assert_eq!(
            next_slot(&p, mark, &berlin("2026-03-03 09:00")),
            Some(berlin("2026-03-06 01:00").with_timezone(&Utc))
        );
    }

    #[test]
    fn r11_r13_once_is_due_when_reached_even_earlier_today() {
        let p = Policy::Once {
            at: wall("2026-03-05 08:00"),
        };
        let mark = utc("2026-03-05 09:00");
        assert_eq!(due_run(&p, mark, &berlin("2026-03-05 07:59")), None);
        let d = due_run(&p, mark, &berlin("2026-03-05 10:00")).unwrap();
        assert_eq!(d.slot, berlin("2026-03-05 08:00").with_timezone(&Utc));
        assert_eq!(d.level, Level::Full);
        assert_eq!(
            next_slot(&p, mark, &berlin("2026-03-05 07:00")),
            Some(d.slot)
        );
    }
}
