//! Summaries (median with min–max over the runs), the printed table and the JSON report.

use crate::cpu::CpuShare;
use crate::{BenchArgs, Machine, ModeResults, SteadyRun, ThroughputRun};
use serde::Serialize;
use std::fmt::Write as _;

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Summary {
    pub fn of(values: &[f64]) -> Option<Summary> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Summary {
            median,
            min: v[0],
            max: v[n - 1],
        })
    }
}

/// The `q` quantile (nearest rank) of sorted values.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// p50/p99/max delay and the trend (last third's median minus first third's) from
/// `(delay_ms, offset_s)` pairs of one steady run of `seconds`.
pub fn delay_figures(delays: &[(f64, f64)], seconds: f64) -> SteadyRun {
    let mut all: Vec<f64> = delays.iter().map(|d| d.0).collect();
    all.sort_by(f64::total_cmp);
    let third = |lo: f64, hi: f64| {
        let mut v: Vec<f64> = delays
            .iter()
            .filter(|d| d.1 >= lo * seconds && d.1 < hi * seconds)
            .map(|d| d.0)
            .collect();
        v.sort_by(f64::total_cmp);
        quantile(&v, 0.5)
    };
    SteadyRun {
        p50_ms: quantile(&all, 0.5),
        p99_ms: quantile(&all, 0.99),
        max_ms: all.last().copied().unwrap_or(f64::NAN),
        trend_ms: third(2.0 / 3.0, 1.0) - third(0.0, 1.0 / 3.0),
        ..Default::default()
    }
}

/// One line of the table: a figure over the runs, and optionally its ceiling and the ratio.
#[derive(Debug, Clone, Serialize)]
pub struct Line {
    pub mode: String,
    pub figure: String,
    pub unit: String,
    pub value: Summary,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ceiling: Option<Summary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio: Option<Summary>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub machine: Machine,
    pub params: BenchArgs,
    pub lines: Vec<Line>,
    pub runs: Vec<ModeResults>,
}

impl Report {
    pub fn new(machine: Machine, params: BenchArgs, runs: Vec<ModeResults>) -> Report {
        let mut lines = Vec::new();
        for r in &runs {
            lines.extend(mode_lines(r));
        }
        Report {
            machine,
            params,
            lines,
            runs,
        }
    }

    pub fn table(&self) -> String {
        let p = &self.params;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "\nCDC pipeline benchmark: {} cores, PostgreSQL {}, {}; workload {} operations on {} (seed {}), median of {} run(s) [min–max]\n",
            self.machine.cores,
            self.machine.postgres,
            self.machine.os,
            p.ops,
            if p.tables == "all" { "orders, customers and order_items" } else { "orders" },
            p.seed,
            p.runs
        );
        // The figure column as wide as its longest entry.
        let width = self
            .lines
            .iter()
            .map(|l| l.figure.chars().count() + l.unit.chars().count() + 3)
            .max()
            .unwrap_or(0)
            .max(50);
        let _ = writeln!(
            s,
            "{:<10} {:<w$} {:>12} {:>23}   {:>12}   {:>17}",
            "mode",
            "figure",
            "median",
            "[min–max]",
            "ceiling",
            "ratio [min–max]",
            w = width
        );
        for l in &self.lines {
            let ceiling = l.ceiling.map_or(String::new(), |c| num(c.median));
            let ratio = l.ratio.map_or(String::new(), |r| {
                format!("{:.2} [{:.2}–{:.2}]", r.median, r.min, r.max)
            });
            let _ = writeln!(
                s,
                "{:<10} {:<w$} {:>12} {:>23}   {:>12}   {:>17}",
                l.mode,
                format!("{} ({})", l.figure, l.unit),
                num(l.value.median),
                format!("[{}–{}]", num(l.value.min), num(l.value.max)),
                ceiling,
                ratio,
                w = width
            );
        }
        s
    }
}

fn num(x: f64) -> String {
    if !x.is_finite() {
        "-".into()
    } else if x.abs() >= 100.0 {
        let n = x.round() as i64;
        let digits = n.abs().to_string();
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i).is_multiple_of(3) {
                out.push(',');
            }
            out.push(c);
        }
        if n < 0 {
            format!("-{out}")
        } else {
            out
        }
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

fn line(
    mode: &str,
    figure: &str,
    unit: &str,
    values: &[f64],
    ceilings: Option<&[f64]>,
    ratios: Option<&[f64]>,
) -> Option<Line> {
    Some(Line {
        mode: mode.into(),
        figure: figure.into(),
        unit: unit.into(),
        value: Summary::of(values)?,
        ceiling: ceilings.and_then(Summary::of),
        ratio: ratios.and_then(Summary::of),
    })
}

fn per_run(runs: &[ThroughputRun], f: impl Fn(&ThroughputRun) -> Option<f64>) -> Vec<f64> {
    runs.iter().filter_map(f).collect()
}

/// Each phase once, in the order the runs came.
fn in_order_once<'a>(rates: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut phases: Vec<&str> = Vec::new();
    for rate in rates {
        if !phases.contains(&rate) {
            phases.push(rate);
        }
    }
    phases
}

fn mode_lines(r: &ModeResults) -> Vec<Line> {
    let m = r.mode.as_str();
    let t = &r.throughput;
    let mut out = Vec::new();
    let rate = |n: u64, secs: f64| n as f64 / secs;
    let mb = |b: u64, secs: f64| b as f64 / 1e6 / secs;
    out.push(line(
        m,
        "workload: mutator",
        "ops/s",
        &per_run(t, |x| Some(rate(x.ops, x.workload_secs))),
        None,
        None,
    ));
    out.push(line(
        m,
        "capture: extractor vs COPY out",
        "events/s",
        &per_run(t, |x| Some(rate(x.capture_events, x.capture_secs))),
        Some(&per_run(t, |x| {
            x.capture_ceiling.map(|c| rate(c.rows, c.secs))
        })),
        Some(&per_run(t, |x| {
            x.capture_ceiling.map(|c| c.secs / x.capture_secs)
        })),
    ));
    // Logical mode: the walsender's own floor, the least a streaming client can take.
    out.push(line(
        m,
        "capture: pg_recvlogical to /dev/null vs COPY out",
        "events/s",
        &per_run(t, |x| x.recvlogical_secs.map(|s| rate(x.capture_events, s))),
        Some(&per_run(t, |x| {
            x.recvlogical_secs
                .and(x.capture_ceiling)
                .map(|c| rate(c.rows, c.secs))
        })),
        Some(&per_run(t, |x| {
            Some(x.capture_ceiling?.secs / x.recvlogical_secs?)
        })),
    ));
    out.push(line(
        m,
        "capture: extractor vs pg_recvlogical to /dev/null",
        "events/s",
        &per_run(t, |x| {
            x.recvlogical_secs
                .map(|_| rate(x.capture_events, x.capture_secs))
        }),
        Some(&per_run(t, |x| {
            x.recvlogical_secs.map(|s| rate(x.capture_events, s))
        })),
        Some(&per_run(t, |x| {
            x.recvlogical_secs.map(|s| s / x.capture_secs)
        })),
    ));
    out.push(line(
        m,
        "capture: extractor vs COPY out",
        "MB/s",
        &per_run(t, |x| Some(mb(x.capture_bytes, x.capture_secs))),
        Some(&per_run(t, |x| {
            x.capture_ceiling.map(|c| mb(c.bytes, c.secs))
        })),
        None,
    ));
    out.push(line(
        m,
        "apply: loader vs COPY of final rows",
        "changes/s",
        &per_run(t, |x| Some(rate(x.capture_events, x.apply_secs))),
        Some(&per_run(t, |x| {
            x.apply_ceiling.map(|c| rate(c.rows, c.secs))
        })),
        Some(&per_run(t, |x| {
            x.apply_ceiling.map(|c| c.secs / x.apply_secs)
        })),
    ));
    out.push(line(
        m,
        "apply: SQL-only merge (same changes)",
        "changes/s",
        &per_run(t, |x| x.sql_merge.map(|c| rate(x.capture_events, c.secs))),
        None,
        Some(&per_run(t, |x| x.sql_merge.map(|c| c.secs / x.apply_secs))),
    ));
    // Debezium's embedded engine draining a copy of the same slot (--debezium).
    let dbz = |f: fn(&ThroughputRun, &crate::debezium::Drain) -> (f64, f64)| {
        let pairs: Vec<(f64, f64)> = t
            .iter()
            .filter_map(|x| x.debezium.as_ref().map(|d| f(x, d)))
            .collect();
        let ours: Vec<f64> = pairs.iter().map(|p| p.0).collect();
        let theirs: Vec<f64> = pairs.iter().map(|p| p.1).collect();
        let ratio: Vec<f64> = pairs.iter().map(|p| p.1 / p.0).collect();
        (ours, theirs, ratio)
    };
    for (figure, unit, f) in [
        (
            "capture: extractor vs Debezium, drain time",
            "s",
            (|x, d| (x.capture_secs, d.secs))
                as fn(&ThroughputRun, &crate::debezium::Drain) -> (f64, f64),
        ),
        (
            "capture: extractor vs Debezium, CPU per event",
            "µs",
            |x, d| {
                // The same events: Debezium's are the extractor's, compared one by one.
                (
                    x.capture_cpu_secs * 1e6 / d.events as f64,
                    d.cpu_secs * 1e6 / d.events as f64,
                )
            },
        ),
        ("capture: extractor vs Debezium, peak RSS", "MiB", |x, d| {
            (
                x.extractor_rss_kb as f64 / 1024.0,
                d.max_rss_kb as f64 / 1024.0,
            )
        }),
    ] {
        let (ours, theirs, ratio) = dbz(f);
        out.push(line(m, figure, unit, &ours, Some(&theirs), Some(&ratio)));
    }
    out.push(line(
        m,
        "versions kept per operation",
        "ratio",
        &per_run(t, |x| Some(x.versions as f64 / x.ops as f64)),
        None,
        None,
    ));
    // The idle pipeline (measured before the first phase's traffic), then each phase.
    type Part = fn(&CpuShare) -> f64;
    let parts: [(&str, Part); 5] = [
        ("pipeline total", CpuShare::total),
        ("extractor", |c| c.extractor),
        ("its source backend", |c| c.source_backends),
        ("loader", |c| c.loader),
        ("warehouse backends", |c| c.warehouse_backends),
    ];
    for (name, part) in parts {
        let values: Vec<f64> = r
            .steady
            .iter()
            .filter_map(|x| x.idle_cpu)
            .map(|c| part(&c))
            .collect();
        out.push(line(
            m,
            &format!("idle: CPU, {name}"),
            "% of a core",
            &values,
            None,
            None,
        ));
    }
    for phase in in_order_once(r.steady.iter().map(|x| x.rate.as_str())) {
        let s: Vec<&SteadyRun> = r.steady.iter().filter(|x| x.rate == phase).collect();
        let sv = |f: fn(&SteadyRun) -> f64| s.iter().map(|x| f(x)).collect::<Vec<f64>>();
        let figure = |what: &str| format!("steady at {phase}: {what}");
        for (what, unit, values) in [
            (
                "mutator rate achieved",
                "ops/s",
                sv(|x| x.ops as f64 / x.seconds),
            ),
            ("delay p50", "ms", sv(|x| x.p50_ms)),
            ("delay p99", "ms", sv(|x| x.p99_ms)),
            ("delay max", "ms", sv(|x| x.max_ms)),
            ("delay trend (last - first third)", "ms", sv(|x| x.trend_ms)),
            ("drain after the mutator stops", "s", sv(|x| x.drain_secs)),
        ] {
            out.push(line(m, &figure(what), unit, &values, None, None));
        }
        let lag: Vec<f64> = s
            .iter()
            .filter_map(|x| x.slot_lag_max_bytes)
            .map(|b| b / 1024.0)
            .collect();
        out.push(line(
            m,
            &figure("slot lag (unconfirmed WAL), max"),
            "KiB",
            &lag,
            None,
            None,
        ));
        for (name, part) in parts {
            let values: Vec<f64> = s
                .iter()
                .filter_map(|x| x.steady_cpu)
                .map(|c| part(&c))
                .collect();
            out.push(line(
                m,
                &figure(&format!("CPU, {name}")),
                "% of a core",
                &values,
                None,
                None,
            ));
        }
    }
    // The same phases with Debezium's engine in the pipeline's place (--debezium).
    type Pick = fn(&crate::debezium::Steady) -> f64;
    let picks: [(&str, &str, Pick); 6] = [
        ("mutator rate achieved", "ops/s", |d| {
            d.ops as f64 / d.seconds
        }),
        ("delay to its engine p50", "ms", |d| d.p50_ms),
        ("delay to its engine p99", "ms", |d| d.p99_ms),
        ("delay to its engine max", "ms", |d| d.max_ms),
        ("delay trend (last - first third)", "ms", |d| d.trend_ms),
        ("CPU, JVM + walsender", "% of a core", |d| d.cpu),
    ];
    for phase in in_order_once(r.debezium_steady.iter().map(|x| x.rate.as_str())) {
        let d: Vec<&crate::debezium::Steady> = r
            .debezium_steady
            .iter()
            .filter(|x| x.rate == phase)
            .collect();
        for (what, unit, pick) in picks {
            out.push(line(
                m,
                &format!("Debezium steady at {phase}: {what}"),
                unit,
                &d.iter().map(|x| pick(x)).collect::<Vec<f64>>(),
                None,
                None,
            ));
        }
    }
    let idle_dbz: Vec<f64> = r
        .debezium_steady
        .iter()
        .filter_map(|x| x.idle_cpu)
        .collect();
    out.push(line(
        m,
        "Debezium idle: CPU, JVM + walsender",
        "% of a core",
        &idle_dbz,
        None,
        None,
    ));
    let kib = |k: u64| k as f64 / 1024.0;
    out.push(line(
        m,
        &format!(
            "peak RSS extractor at {} ops",
            r.throughput.first().map_or(0, |x| x.ops)
        ),
        "MiB",
        &per_run(t, |x| Some(kib(x.extractor_rss_kb))),
        None,
        None,
    ));
    out.push(line(
        m,
        &format!(
            "peak RSS loader at {} ops",
            r.throughput.first().map_or(0, |x| x.ops)
        ),
        "MiB",
        &per_run(t, |x| Some(kib(x.loader_rss_kb))),
        None,
        None,
    ));
    if let Some(l) = &r.large {
        out.push(line(
            m,
            &format!("peak RSS extractor at {} ops", l.ops),
            "MiB",
            &[kib(l.extractor_rss_kb)],
            None,
            None,
        ));
        out.push(line(
            m,
            &format!("peak RSS loader at {} ops", l.ops),
            "MiB",
            &[kib(l.loader_rss_kb)],
            None,
            None,
        ));
        out.push(line(
            m,
            &format!("capture at {} ops", l.ops),
            "events/s",
            &[rate(l.capture_events, l.capture_secs)],
            None,
            None,
        ));
        out.push(line(
            m,
            &format!("apply at {} ops", l.ops),
            "changes/s",
            &[rate(l.capture_events, l.apply_secs)],
            None,
            None,
        ));
    }
    out.extend(round_lines(m, &r.rounds));
    out.into_iter().flatten().collect()
}

/// Each update-every-row round (the loader's rate beside the least SQL's, ratio = least SQL
/// time / loader time), and the last round's rate against the first's for both.
fn round_lines(m: &str, rounds: &[crate::rounds::Round]) -> Vec<Option<Line>> {
    let mut out = Vec::new();
    let (grown, rounds): (Vec<_>, Vec<_>) = rounds.iter().partition(|r| r.grown);
    for (i, r) in rounds.iter().enumerate() {
        out.push(line(
            m,
            &format!("round {}: loader vs least SQL", i + 1),
            "changes/s",
            &[r.changes as f64 / r.loader_secs],
            Some(&[r.changes as f64 / r.least_secs]),
            Some(&[r.least_secs / r.loader_secs]),
        ));
    }
    let rate = |n: u64, secs: f64| n as f64 / secs;
    if let (Some(first), Some(last)) = (rounds.first(), rounds.last()) {
        out.push(line(
            m,
            &format!("round {} / round 1: loader vs least SQL", rounds.len()),
            "rate ratio",
            &[rate(last.changes, last.loader_secs) / rate(first.changes, first.loader_secs)],
            Some(&[rate(last.changes, last.least_secs) / rate(first.changes, first.least_secs)]),
            None,
        ));
    }
    if let (Some(first), Some(g)) = (rounds.first(), grown.first()) {
        out.push(line(
            m,
            &format!(
                "round at {} history rows: loader vs least SQL",
                g.history_rows
            ),
            "changes/s",
            &[rate(g.changes, g.loader_secs)],
            Some(&[rate(g.changes, g.least_secs)]),
            Some(&[g.least_secs / g.loader_secs]),
        ));
        out.push(line(
            m,
            &format!("round at {} history rows / round 1", g.history_rows),
            "rate ratio",
            &[rate(g.changes, g.loader_secs) / rate(first.changes, first.loader_secs)],
            Some(&[rate(g.changes, g.least_secs) / rate(first.changes, first.least_secs)]),
            None,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_take_the_median_and_the_range() {
        let s = Summary::of(&[3.0, 1.0, 2.0]).expect("summary");
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        let s = Summary::of(&[4.0, 1.0, f64::NAN, 2.0, 3.0]).expect("summary");
        assert_eq!((s.median, s.min, s.max), (2.5, 1.0, 4.0));
        assert!(Summary::of(&[]).is_none());
    }

    #[test]
    fn delays_give_nearest_rank_quantiles_and_the_trend() {
        // 100 versions over 30 s: delay grows by 10 ms a version.
        let delays: Vec<(f64, f64)> = (0..100)
            .map(|i| (f64::from(i) * 10.0, f64::from(i) * 0.3))
            .collect();
        let f = delay_figures(&delays, 30.0);
        assert_eq!((f.p50_ms, f.p99_ms, f.max_ms), (490.0, 980.0, 990.0));
        assert!(f.trend_ms > 600.0, "{}", f.trend_ms);
    }

    #[test]
    fn numbers_are_grouped() {
        assert_eq!(num(1234567.4), "1,234,567");
        assert_eq!(num(-1234.0), "-1,234");
        assert_eq!(num(12.34), "12.3");
        assert_eq!(num(0.456), "0.46");
        assert_eq!(num(f64::NAN), "-");
    }
}
