//! `stats RULE [--vm VM] [--period ...] [--peek] [--tasks [--failed]]` (R33, R34):
//! a rule's backups per day and month as bar charts, all-time totals, bytes,
//! points, the last successful backup and the failed tasks not yet viewed.
//!
//! Everything comes from the state store (`state::figures`, `state::vm_status`,
//! task rows), never from a repository. Every run without `--peek` marks the
//! failures it reports as viewed, whatever the output form.

use anyhow::Result;
use chrono::{Local, Utc};
use serde::Serialize;
use serde_json::{json, Value};

use super::args::{PeriodArg, StatsArgs};
use super::output::{print_json, Table};
use super::views::LastBackup;
use super::Ctx;
use crate::error::ExitCode;
use crate::state::figures::Figures;
use crate::state::tasks::TaskRow;
use crate::stats::{daily, monthly, ratio, Bucket, Counts, Period};
use crate::stats::{MONTH_DAYS, WEEK_DAYS, YEAR_MONTHS};
use crate::units::format_size;

/// All-time sums of a VM or a rule.
#[derive(Debug, Clone, Default, Serialize)]
struct Totals {
    succeeded: u64,
    failed: u64,
    skipped: u64,
    bytes_read: u64,
    bytes_written: u64,
    ratio: Option<f64>,
    /// Failed or interrupted tasks of every kind.
    failures: u64,
}

impl Totals {
    fn add(&mut self, f: &Figures) {
        self.succeeded += f.succeeded;
        self.failed += f.failed;
        self.skipped += f.skipped;
        self.bytes_read += f.bytes_read;
        self.bytes_written += f.bytes_written;
        self.failures += f.failures;
        self.ratio = ratio(self.bytes_read, self.bytes_written);
    }
}

/// The charts a period shows, for some task rows.
struct Charts {
    week: Option<Vec<Bucket>>,
    month: Option<Vec<Bucket>>,
    year: Option<Vec<Bucket>>,
}

impl Charts {
    fn of(tasks: &[TaskRow], period: Period, today: chrono::NaiveDate) -> Charts {
        Charts {
            week: period.shows_week().then(|| daily(tasks, today, WEEK_DAYS)),
            month: period
                .shows_month()
                .then(|| daily(tasks, today, MONTH_DAYS)),
            year: period
                .shows_year()
                .then(|| monthly(tasks, today, YEAR_MONTHS)),
        }
    }

    fn json(&self) -> (Value, Value, Value) {
        let buckets = |b: &Option<Vec<Bucket>>, key: &str| match b {
            None => Value::Null,
            Some(b) => Value::Array(
                b.iter()
                    .map(|x| {
                        json!({
                            key: x.label,
                            "succeeded": x.counts.succeeded,
                            "failed": x.counts.failed,
                            "skipped": x.counts.skipped,
                        })
                    })
                    .collect(),
            ),
        };
        (
            buckets(&self.week, "day"),
            buckets(&self.month, "day"),
            buckets(&self.year, "month"),
        )
    }
}

fn period_of(p: PeriodArg) -> Period {
    match p {
        PeriodArg::Week => Period::Week,
        PeriodArg::Month => Period::Month,
        PeriodArg::Year => Period::Year,
        PeriodArg::All => Period::All,
    }
}

pub fn stats(ctx: &Ctx, a: StatsArgs) -> Result<ExitCode> {
    let mut state = ctx.state()?;
    let rule = state.require_rule(&a.rule)?;
    let vms: Vec<String> = match &a.vm {
        Some(vm) => vec![rule.require_vm(vm)?.vm.clone()],
        None => rule.vms.iter().map(|v| v.vm.clone()).collect(),
    };
    let period = period_of(a.period);
    let now = crate::clock::Clock::process().now();
    let now_utc = now.with_timezone(&Utc);
    let today = now.date_naive();
    let first_day = period.first_day(today);
    let since = crate::policy::schedule::place_in_zone(
        &Local,
        first_day.and_hms_opt(0, 0, 0).expect("midnight"),
    )
    .map(|t| crate::timefmt::json_time(t.with_timezone(&Utc)));
    let rows = state.finished_tasks(&rule.name, a.vm.as_deref(), since.as_deref())?;
    let figures = state.figures(Some(&rule.name), a.vm.as_deref())?;
    // Read and (unless --peek) reset in one step: what is shown is what is marked.
    let unviewed = state.take_unviewed_failures(&rule.name, a.vm.as_deref(), a.peek)?;
    if !a.peek {
        // vmbackup_unviewed_failures changed.
        ctx.monitor()?.refresh(&state);
    }

    let mut rule_totals = Totals::default();
    let mut per_vm = Vec::new();
    for vm in &vms {
        let key = (rule.name.clone(), vm.clone());
        let fig = figures.get(&key).cloned().unwrap_or_default();
        let mut totals = Totals::default();
        totals.add(&fig);
        rule_totals.add(&fig);
        let status = state.vm_status(&rule.name, vm)?;
        let last = state
            .last_backup(&rule.name, vm)?
            .and_then(|r| LastBackup::of(&r, now_utc));
        let vm_rows: Vec<TaskRow> = rows.iter().filter(|t| &t.vm == vm).cloned().collect();
        per_vm.push(VmStats {
            vm: vm.clone(),
            unviewed: unviewed.get(vm).copied().unwrap_or(0),
            last,
            points: status.points,
            last_verify: status.last_verify,
            damaged: status.damaged_points,
            totals,
            charts: Charts::of(&vm_rows, period, today),
        });
    }
    rule_totals.ratio = ratio(rule_totals.bytes_read, rule_totals.bytes_written);
    let rule_charts = Charts::of(&rows, period, today);
    let unviewed_total: u64 = per_vm.iter().map(|v| v.unviewed).sum();
    // The charts need a year at most; a task list of the whole history more.
    let all_rows = if a.tasks && period == Period::All {
        state.finished_tasks(&rule.name, a.vm.as_deref(), None)?
    } else {
        Vec::new()
    };
    let listed: Option<Vec<&TaskRow>> = a.tasks.then(|| {
        let from = if period == Period::All {
            &all_rows
        } else {
            &rows
        };
        from.iter()
            .filter(|t| !a.failed || t.state.is_failure())
            .collect()
    });

    if ctx.json {
        let (week, month, year) = rule_charts.json();
        let vms_json: Vec<Value> = per_vm
            .iter()
            .map(|v| {
                let (week, month, year) = v.charts.json();
                json!({
                    "vm": v.vm,
                    "unviewed_failures": v.unviewed,
                    "last_backup": v.last,
                    "point_count": v.points,
                    "last_verify": v.last_verify.as_deref().map(crate::timefmt::json_of_stored),
                    "damaged_point_count": v.damaged,
                    "totals": v.totals,
                    "week": week,
                    "month": month,
                    "year": year,
                })
            })
            .collect();
        print_json(&json!({
            "rule": rule.name,
            "vm": a.vm,
            "time": crate::timefmt::json_time(now_utc),
            "period": period.as_str(),
            "unviewed_failures": unviewed_total,
            "totals": rule_totals,
            "week": week,
            "month": month,
            "year": year,
            "vms": vms_json,
            "tasks": listed.as_ref().map(serde_json::to_value).transpose()?,
        }));
        return Ok(ExitCode::Ok);
    }

    let unicode = utf8_locale();
    out!(
        "rule '{}': {} VM(s), at {}",
        rule.name,
        per_vm.len(),
        crate::timefmt::human_time(now_utc)
    );
    out!(
        "unviewed failures: {unviewed_total}{}",
        if a.peek || unviewed_total == 0 {
            ""
        } else {
            " (now marked viewed)"
        }
    );
    out!();
    let mut t = Table::new(&[
        "VM",
        "LAST BACKUP",
        "POINTS",
        "UNVIEWED",
        "SUCCEEDED",
        "FAILED",
        "SKIPPED",
        "READ",
        "STORED",
        "RATIO",
    ]);
    let row = |name: &str, last: String, points: String, unviewed: u64, tot: &Totals| {
        vec![
            name.to_string(),
            last,
            points,
            unviewed.to_string(),
            tot.succeeded.to_string(),
            tot.failed.to_string(),
            tot.skipped.to_string(),
            format_size(tot.bytes_read),
            format_size(tot.bytes_written),
            tot.ratio.map_or("-".into(), |r| format!("{r:.1}")),
        ]
    };
    for v in &per_vm {
        t.row(row(
            &v.vm,
            v.last.as_ref().map_or("never".into(), LastBackup::human),
            v.points.map_or("-".into(), |n| n.to_string()),
            v.unviewed,
            &v.totals,
        ));
    }
    if per_vm.len() > 1 {
        t.row(row(
            "(all)",
            String::new(),
            String::new(),
            unviewed_total,
            &rule_totals,
        ));
    }
    t.print();
    let whose = match &a.vm {
        Some(vm) => format!("VM '{vm}'"),
        None => format!("rule '{}'", rule.name),
    };
    for (title, buckets) in [
        ("last 7 days, per day", &rule_charts.week),
        ("last 30 days, per day", &rule_charts.month),
        ("last 12 months, per month", &rule_charts.year),
    ] {
        if let Some(b) = buckets {
            out!();
            print_chart(&format!("backups of {whose}, {title}"), b, unicode);
        }
    }
    if let Some(list) = listed {
        out!();
        print_tasks(&list);
    }
    Ok(ExitCode::Ok)
}

struct VmStats {
    vm: String,
    unviewed: u64,
    last: Option<LastBackup>,
    points: Option<u64>,
    last_verify: Option<String>,
    damaged: Option<u64>,
    totals: Totals,
    charts: Charts,
}

/// Whether the terminal's locale is UTF-8 (else the charts use ASCII).
fn utf8_locale() -> bool {
    ["LC_ALL", "LC_CTYPE", "LANG"]
        .iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
        .is_some_and(|v| {
            let v = v.to_ascii_lowercase();
            v.contains("utf-8") || v.contains("utf8")
        })
}

/// One character per bucket, its height proportional to the count; `max` is
/// the tallest bar of the chart.
fn bar(n: u64, max: u64, unicode: bool) -> char {
    const BLOCKS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    const ASCII: [char; 8] = ['.', ':', '-', '=', '+', '*', '#', '@'];
    if n == 0 {
        return if unicode { '·' } else { ' ' };
    }
    let level = ((n * 8).div_ceil(max.max(1))).clamp(1, 8) as usize - 1;
    if unicode {
        BLOCKS[level]
    } else {
        ASCII[level]
    }
}

fn print_chart(title: &str, buckets: &[Bucket], unicode: bool) {
    let first = buckets.first().map(|b| b.label.as_str()).unwrap_or("");
    let last = buckets.last().map(|b| b.label.as_str()).unwrap_or("");
    let max = buckets
        .iter()
        .map(|b| {
            b.counts
                .succeeded
                .max(b.counts.failed)
                .max(b.counts.skipped)
        })
        .max()
        .unwrap_or(0);
    out!("{title} ({first} .. {last}, tallest bar = {max})");
    type Get = fn(&Counts) -> u64;
    let rows: [(&str, Get); 3] = [
        ("succeeded", |c| c.succeeded),
        ("failed", |c| c.failed),
        ("skipped", |c| c.skipped),
    ];
    for (name, get) in rows {
        let line: String = buckets
            .iter()
            .map(|b| bar(get(&b.counts), max, unicode))
            .collect();
        let total: u64 = buckets.iter().map(|b| get(&b.counts)).sum();
        let (open, close) = if unicode { ('▕', '▏') } else { ('|', '|') };
        out!("  {name:<9} {open}{line}{close} {total}");
    }
}

fn print_tasks(list: &[&TaskRow]) {
    if list.is_empty() {
        out!("no tasks in this period");
        return;
    }
    let mut t = Table::new(&[
        "ID", "KIND", "VM", "LEVEL", "STATUS", "FINISHED", "READ", "STORED", "POINT", "ERROR",
    ]);
    for r in list {
        let failed = r.state.is_failure() || r.state == crate::task::TaskState::Skipped;
        t.row(vec![
            r.id.to_string(),
            r.kind.to_string(),
            r.vm.clone(),
            r.run_level
                .clone()
                .or_else(|| r.level.clone())
                .unwrap_or_else(|| "-".into()),
            r.state.to_string(),
            r.finished_at
                .as_deref()
                .map_or("-".into(), crate::timefmt::human_of_stored),
            r.bytes_read.map_or("-".into(), format_size),
            r.bytes_written.map_or("-".into(), format_size),
            r.point.clone().unwrap_or_else(|| "-".into()),
            if failed {
                r.message.clone().unwrap_or_default()
            } else {
                String::new()
            },
        ]);
    }
    t.print();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_scale_to_the_tallest() {
        assert_eq!(bar(0, 5, true), '·');
        assert_eq!(bar(5, 5, true), '█');
        assert_eq!(bar(1, 100, true), '▁');
        assert_eq!(bar(50, 100, true), '▄');
        assert_eq!(bar(5, 5, false), '@');
        assert_eq!(bar(0, 5, false), ' ');
    }
}
