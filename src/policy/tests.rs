//! Policy rules, one test per rule, each named after its R-id.

use super::*;
use crate::error::{exit_code_of, ExitCode};
use chrono_tz::Europe::Berlin;

fn wall(text: &str) -> NaiveDateTime {
    NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M").expect(text)
}

fn now() -> NaiveDateTime {
    wall("2026-05-04 12:00")
}

fn periodic(specs: &[&str], retention: Option<u32>) -> anyhow::Result<Policy> {
    let specs: Vec<String> = specs.iter().map(|s| s.to_string()).collect();
    build_policy(None, &specs, retention, now())
}

/// The refusal message, after checking it is a one-line usage error (exit 2).
fn refusal(result: anyhow::Result<Policy>) -> String {
    let err = result.expect_err("refused");
    assert_eq!(exit_code_of(&err), ExitCode::Usage, "{err}");
    let msg = err.to_string();
    assert!(!msg.contains('\n'), "{msg}");
    msg
}

fn runs(policy: &Policy, after: &str, n: usize) -> Vec<String> {
    policy
        .next_runs(wall(after), n)
        .into_iter()
        .map(|(at, level)| format!("{} {level}", at.format("%Y-%m-%d %a %H:%M")))
        .collect()
}

#[test]
fn r11_once_or_schedule_exactly_one() {
    let msg = refusal(build_policy(
        Some("2026-05-05 01:00"),
        &["full daily at 01:00".to_string()],
        None,
        now(),
    ));
    assert!(
        msg.contains("--once and --schedule exclude each other"),
        "{msg}"
    );
    let msg = refusal(build_policy(None, &[], None, now()));
    assert!(
        msg.contains("needs --once") && msg.contains("--schedule"),
        "{msg}"
    );
}

#[test]
fn r11_once_is_a_local_wall_clock_time() {
    let policy = build_policy(Some("2026-05-05 01:30"), &[], None, now()).unwrap();
    assert_eq!(
        policy,
        Policy::Once {
            at: wall("2026-05-05 01:30")
        }
    );
    let with_t = build_policy(Some("2026-05-05T01:30"), &[], None, now()).unwrap();
    assert_eq!(with_t, policy);
    assert_eq!(policy.period(), None);
    assert_eq!(
        runs(&policy, "2026-05-04 12:00", 3),
        ["2026-05-05 Tue 01:30 full"]
    );
    // Europe/Berlin: the wall-clock time is kept, in summer time.
    let after = Berlin.from_local_datetime(&now()).unwrap();
    let tz_runs = policy.next_runs_tz(&after, 1);
    assert_eq!(tz_runs[0].0.to_rfc3339(), "2026-05-05T01:30:00+02:00");
}

#[test]
fn r11_once_bad_format_refused() {
    for bad in [
        "tomorrow",
        "2026-05-05",
        "2026-13-05 01:00",
        "05.05.2026 01:00",
        "2026-05-05 25:00",
    ] {
        let msg = refusal(build_policy(Some(bad), &[], None, now()));
        assert!(
            msg.starts_with(&format!("invalid --once '{bad}': ")),
            "{msg}"
        );
        assert!(msg.contains("YYYY-MM-DD HH:MM"), "{msg}");
    }
}

#[test]
fn r12_once_before_today_refused() {
    let msg = refusal(build_policy(Some("2026-05-03 23:59"), &[], None, now()));
    assert!(
        msg.contains("before today (2026-05-04)") && msg.contains("(R12)"),
        "{msg}"
    );
}

#[test]
fn r13_once_earlier_today_accepted_and_due_now() {
    let policy = build_policy(Some("2026-05-04 00:00"), &[], None, now()).unwrap();
    // next_runs returns the time itself; the runner treats at <= now as due.
    let due = policy.next_runs(now(), 1);
    assert_eq!(due, [(wall("2026-05-04 00:00"), Level::Full)]);
    assert!(due[0].0 <= now());
}

#[test]
fn r15_retention_range_is_0_to_64() {
    for ok in [0, 1, 64] {
        let policy = periodic(&["full daily at 01:00"], Some(ok)).unwrap();
        assert!(matches!(policy, Policy::Periodic { retention: Some(r), .. } if r == ok));
    }
    let msg = refusal(periodic(&["full daily at 01:00"], Some(65)));
    assert_eq!(
        msg,
        "invalid --retention '65': allowed 0..=64, in units of the period (R15)"
    );
}

#[test]
fn r15_retention_only_with_periodic() {
    let msg = refusal(build_policy(Some("2026-05-05 01:00"), &[], Some(3), now()));
    assert!(
        msg.contains("--retention 3 applies to periodic policies only"),
        "{msg}"
    );
    assert!(msg.contains("(R15)"), "{msg}");
}

#[test]
fn r15_no_retention_keeps_everything() {
    let policy = periodic(&["full weekly on sun at 01:00"], None).unwrap();
    assert!(matches!(
        policy,
        Policy::Periodic {
            retention: None,
            ..
        }
    ));
    assert_eq!(
        policy.to_string(),
        "full weekly on sun at 01:00; retention: keep all"
    );
    let kept = periodic(&["full weekly on sun at 01:00"], Some(4)).unwrap();
    assert_eq!(
        kept.to_string(),
        "full weekly on sun at 01:00; retention 4 (weekly)"
    );
}

#[test]
fn r22_at_most_two_schedules() {
    let msg = refusal(periodic(
        &[
            "full daily at 01:00",
            "inc daily at 07:00",
            "inc daily at 13:00",
        ],
        None,
    ));
    assert!(
        msg.contains("at most 2 periodic schedules") && msg.contains("(R22)"),
        "{msg}"
    );
    assert!(periodic(&["full daily at 01:00", "inc daily at 07:00,13:00"], None).is_ok());
}

#[test]
fn r23_never_incremental_and_differential_together() {
    let msg = refusal(periodic(
        &["inc daily at 01:00", "diff daily at 13:00"],
        None,
    ));
    assert!(
        msg.contains("mix incremental and differential") && msg.contains("(R23)"),
        "{msg}"
    );
    assert!(periodic(&["diff daily at 01:00", "full daily at 13:00"], None).is_ok());
}

#[test]
fn r24_weekly_partial_runs_at_the_full_times() {
    let msg = refusal(periodic(
        &[
            "full weekly on sun at 01:00",
            "inc weekly on mon-sat at 02:00",
        ],
        None,
    ));
    assert!(
        msg.contains("schedule 'inc weekly on mon-sat at 02:00' must run at the full's times")
            && msg.contains("(R24)"),
        "{msg}"
    );
    for period in ["monthly on 1", "quarterly on 1"] {
        let other = period.replace(" 1", " 15");
        let full = format!("full {period} at 01:00");
        let diff = format!("diff {other} at 01:00,02:00");
        let msg = refusal(periodic(&[&full, &diff], None));
        assert!(msg.contains("(R24)"), "{msg}");
    }
    assert!(periodic(
        &[
            "full weekly on sun at 01:00",
            "inc weekly on mon-sat at 01:00"
        ],
        None
    )
    .is_ok());
}

#[test]
fn r24_daily_is_exempt() {
    assert!(periodic(&["full daily at 01:00", "inc daily at 13:00"], None).is_ok());
}

#[test]
fn r25_schedules_share_one_period() {
    let msg = refusal(periodic(
        &["full weekly on sun at 01:00", "inc daily at 01:00"],
        None,
    ));
    assert!(
        msg.contains("different periods (weekly and daily)") && msg.contains("(R25)"),
        "{msg}"
    );
    let msg = refusal(periodic(
        &["full monthly on 1 at 01:00", "inc quarterly on 1 at 01:00"],
        None,
    ));
    assert!(msg.contains("(R25)"), "{msg}");
    let policy = periodic(
        &["full monthly on 1 at 01:00", "inc monthly on 15 at 01:00"],
        None,
    );
    assert_eq!(policy.unwrap().period(), Some(Period::Monthly));
}

#[test]
fn bad_schedule_error_passes_through() {
    let msg = refusal(periodic(&["full hourly at 01:00"], None));
    assert!(
        msg.starts_with("invalid --schedule 'full hourly at 01:00'"),
        "{msg}"
    );
}

#[test]
fn r14_same_instant_yields_one_run_full_wins() {
    // Sunday's 01:00 is both the full's and the incremental's.
    let policy = periodic(
        &[
            "inc weekly on mon-sun at 01:00",
            "full weekly on sun at 01:00",
        ],
        None,
    )
    .unwrap();
    assert_eq!(
        runs(&policy, "2026-05-08 12:00", 4),
        [
            "2026-05-09 Sat 01:00 inc",
            "2026-05-10 Sun 01:00 full",
            "2026-05-11 Mon 01:00 inc",
            "2026-05-12 Tue 01:00 inc",
        ]
    );
    let daily = periodic(&["full daily at 01:00", "diff daily at 01:00,13:00"], None).unwrap();
    assert_eq!(
        runs(&daily, "2026-05-04 12:00", 3),
        [
            "2026-05-04 Mon 13:00 diff",
            "2026-05-05 Tue 01:00 full",
            "2026-05-05 Tue 13:00 diff",
        ]
    );
}

#[test]
fn r14_monthly_full_and_incremental_interleave() {
    let policy = periodic(
        &[
            "full monthly on 1 at 02:00",
            "inc monthly on 2,15,last at 02:00",
        ],
        None,
    )
    .unwrap();
    assert_eq!(
        runs(&policy, "2028-02-01 03:00", 5),
        [
            "2028-02-02 Wed 02:00 inc",
            "2028-02-15 Tue 02:00 inc",
            "2028-02-29 Tue 02:00 inc",
            "2028-03-01 Wed 02:00 full",
            "2028-03-02 Thu 02:00 inc",
        ]
    );
}

#[test]
fn next_runs_count_is_respected() {
    let policy = periodic(&["full daily at 01:00"], None).unwrap();
    assert!(policy.next_runs(now(), 0).is_empty());
    assert_eq!(policy.next_runs(now(), 7).len(), 7);
}

#[test]
fn dst_next_runs_tz_in_berlin() {
    let policy = periodic(&["full daily at 02:30", "inc daily at 12:00"], None).unwrap();
    let after = Berlin.with_ymd_and_hms(2026, 3, 28, 13, 0, 0).unwrap();
    let got: Vec<String> = policy
        .next_runs_tz(&after, 3)
        .into_iter()
        .map(|(at, level)| format!("{} {level}", at.to_rfc3339()))
        .collect();
    assert_eq!(
        got,
        [
            "2026-03-29T03:00:00+02:00 full",
            "2026-03-29T12:00:00+02:00 inc",
            "2026-03-30T02:30:00+02:00 full",
        ]
    );
    let after = Berlin.with_ymd_and_hms(2026, 10, 24, 13, 0, 0).unwrap();
    let got: Vec<String> = policy
        .next_runs_tz(&after, 3)
        .into_iter()
        .map(|(at, level)| format!("{} {level}", at.to_rfc3339()))
        .collect();
    assert_eq!(
        got,
        [
            "2026-10-25T02:30:00+02:00 full",
            "2026-10-25T12:00:00+01:00 inc",
            "2026-10-26T02:30:00+01:00 full",
        ]
    );
}

#[test]
fn policy_serde_round_trips() {
    let periodic = periodic(
        &[
            "full weekly on sun at 01:00",
            "inc weekly on mon-sat at 01:00",
        ],
        Some(4),
    )
    .unwrap();
    let json = serde_json::to_string(&periodic).unwrap();
    assert_eq!(
        json,
        r#"{"kind":"periodic","schedules":["full weekly on sun at 01:00","inc weekly on mon-sat at 01:00"],"retention":4}"#
    );
    assert_eq!(serde_json::from_str::<Policy>(&json).unwrap(), periodic);
    let once = Policy::Once {
        at: wall("2026-05-05 01:30"),
    };
    let json = serde_json::to_string(&once).unwrap();
    assert_eq!(json, r#"{"kind":"once","at":"2026-05-05 01:30"}"#);
    assert_eq!(serde_json::from_str::<Policy>(&json).unwrap(), once);
}
