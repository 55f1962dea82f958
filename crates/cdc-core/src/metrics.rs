//! Prometheus metrics of the long-running programs (the README lists every family and what
//! it means). One process-wide registry; the capture loop and the loader record into it with
//! one call per unit of work (`capture_pass`, `batch_applied`, ...), and `/metrics` encodes
//! it (`encode`). A program's families are registered when its endpoint starts
//! (`register`), so that a scrape lists them before the first pass.
//!
//! Names follow the Prometheus conventions: a `cdc_` prefix, base units (seconds, bytes) in
//! the name, counters end in `_total` (the encoder appends it to the registered name).

use crate::capture::PassOutcome;
use crate::error::{Error, Result};
use crate::event::Op;
use crate::health;
use crate::scd2::apply::ApplyStats;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::path::Path;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex, OnceLock, PoisonError};
use std::time::{Duration, SystemTime};

/// Which program's families to register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Program {
    /// The extractor: capture.
    Extractor,
    /// The loader: apply.
    Loader,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TableLabel {
    table: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TableOpLabels {
    table: String,
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

/// A float gauge (seconds).
type Seconds = Gauge<f64, AtomicU64>;

/// Durations of passes and batches: 5 ms to about 80 s.
fn duration_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.005, 2.0, 15)
}

/// Delay from the source commit to the history commit: 50 ms to an hour.
const DELAY_BUCKETS: [f64; 14] = [
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0,
];

/// "Not known yet" for the position atomics.
const UNKNOWN: i64 = i64::MIN;

static REGISTRY: LazyLock<Mutex<Registry>> = LazyLock::new(|| Mutex::new(Registry::default()));

fn register(name: &str, help: &str, metric: impl prometheus_client::registry::Metric) {
    REGISTRY
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .register(name, help, metric);
}

/// What both programs report.
struct Common {
    errors: Family<KindLabel, Counter>,
    ready: Gauge,
}

static COMMON: LazyLock<Common> = LazyLock::new(|| {
    let m = Common {
        errors: Family::default(),
        ready: Gauge::default(),
    };
    register(
        "cdc_errors",
        "Failures by kind: connection (retried), database, data (a quarantined file), io, setup, internal",
        m.errors.clone(),
    );
    register(
        "cdc_ready",
        "1 when the program is ready (what /readyz answers 200 for), else 0",
        m.ready.clone(),
    );
    m
});

/// The extractor's families.
struct Capture {
    events: Family<TableOpLabels, Counter>,
    passes: Family<ResultLabel, Counter>,
    pass_duration: Histogram,
    files: Counter,
    bytes: Counter,
    lag: Seconds,
    slot_retained: Gauge,
    slot_unconfirmed: Gauge,
    last_success: Seconds,
    /// Every change committed before this (µs since the epoch) is captured.
    through_us: AtomicI64,
}

static CAPTURE: OnceLock<Capture> = OnceLock::new();

fn capture() -> &'static Capture {
    CAPTURE.get_or_init(|| {
        let m = Capture {
            events: Family::default(),
            passes: Family::default(),
            pass_duration: Histogram::new(duration_buckets()),
            files: Counter::default(),
            bytes: Counter::default(),
            lag: Seconds::default(),
            slot_retained: Gauge::default(),
            slot_unconfirmed: Gauge::default(),
            last_success: Seconds::default(),
            through_us: AtomicI64::new(UNKNOWN),
        };
        m.lag.set(f64::NAN);
        register(
            "cdc_capture_events",
            "Change events captured and made durable, by table and operation (c, u, d, r)",
            m.events.clone(),
        );
        register(
            "cdc_capture_passes",
            "Capture passes, by result (success, failure)",
            m.passes.clone(),
        );
        register(
            "cdc_capture_pass_duration_seconds",
            "Duration of capture passes",
            m.pass_duration.clone(),
        );
        register(
            "cdc_changelog_files_written",
            "Change-log files written (durable)",
            m.files.clone(),
        );
        register(
            "cdc_changelog_bytes_written",
            "Bytes of change-log files written (durable)",
            m.bytes.clone(),
        );
        register(
            "cdc_capture_lag_seconds",
            "Age of the capture position: every change committed before now minus this is captured (NaN before the first pass)",
            m.lag.clone(),
        );
        register(
            "cdc_slot_retained_wal_bytes",
            "Logical mode: WAL the replication slot keeps on the source (from its restart position)",
            m.slot_retained.clone(),
        );
        register(
            "cdc_slot_unconfirmed_wal_bytes",
            "Logical mode: WAL written after the slot's confirmed position",
            m.slot_unconfirmed.clone(),
        );
        register(
            "cdc_capture_last_success_timestamp_seconds",
            "Unix time of the end of the last successful capture pass (0 before the first)",
            m.last_success.clone(),
        );
        m
    })
}

/// The loader's families.
struct Apply {
    batches: Counter,
    batch_duration: Histogram,
    events: Family<TableLabel, Counter>,
    inserted: Family<TableLabel, Counter>,
    closed: Family<TableLabel, Counter>,
    deletes: Family<TableLabel, Counter>,
    files: Family<ResultLabel, Counter>,
    delay: Histogram,
    pending: Gauge,
    dead_letter: Gauge,
    lag: Seconds,
    last_success: Seconds,
    /// When the oldest pending file was written (µs since the epoch), 0 when none was
    /// pending at the last look.
    oldest_pending_us: AtomicI64,
}

static APPLY: OnceLock<Apply> = OnceLock::new();

fn apply() -> &'static Apply {
    APPLY.get_or_init(|| {
        let m = Apply {
            batches: Counter::default(),
            batch_duration: Histogram::new(duration_buckets()),
            events: Family::default(),
            inserted: Family::default(),
            closed: Family::default(),
            deletes: Family::default(),
            files: Family::default(),
            delay: Histogram::new(DELAY_BUCKETS),
            pending: Gauge::default(),
            dead_letter: Gauge::default(),
            lag: Seconds::default(),
            last_success: Seconds::default(),
            oldest_pending_us: AtomicI64::new(UNKNOWN),
        };
        m.lag.set(f64::NAN);
        register(
            "cdc_apply_batches",
            "Batches applied (committed), each one warehouse transaction of one or more files",
            m.batches.clone(),
        );
        register(
            "cdc_apply_batch_duration_seconds",
            "Duration of applied batches, from the start of the transaction to its commit",
            m.batch_duration.clone(),
        );
        register(
            "cdc_apply_events",
            "Change events read from applied files, by table",
            m.events.clone(),
        );
        register(
            "cdc_history_versions_inserted",
            "History versions inserted, by table",
            m.inserted.clone(),
        );
        register(
            "cdc_history_versions_closed",
            "History versions closed (valid_to set), by table; deletes included",
            m.closed.clone(),
        );
        register(
            "cdc_history_deletes",
            "Deletes recorded (a chain closed by a delete), by table",
            m.deletes.clone(),
        );
        register(
            "cdc_apply_files",
            "Change-log files handled, by result (applied, already_applied, quarantined)",
            m.files.clone(),
        );
        register(
            "cdc_commit_to_history_delay_seconds",
            "Per applied change: its history transaction's commit time minus its source change time (valid_from, or the delete time)",
            m.delay.clone(),
        );
        register(
            "cdc_changelog_pending_files",
            "Change-log files waiting to be applied, at the last look",
            m.pending.clone(),
        );
        register(
            "cdc_changelog_dead_letter_files",
            "Change-log files in dead_letter/, at the last look",
            m.dead_letter.clone(),
        );
        register(
            "cdc_apply_lag_seconds",
            "Age of the oldest change-log file waiting to be applied (0 when none; NaN before the first look)",
            m.lag.clone(),
        );
        register(
            "cdc_apply_last_success_timestamp_seconds",
            "Unix time of the last committed batch (0 before the first)",
            m.last_success.clone(),
        );
        m
    })
}

/// Registers the families of `program` (and those both have), so that they are listed
/// before anything is recorded.
pub fn register_program(program: Program) {
    LazyLock::force(&COMMON);
    match program {
        Program::Extractor => {
            capture();
        }
        Program::Loader => {
            apply();
        }
    }
}

/// The registry in the Prometheus text format, with the lag gauges brought up to now.
pub fn encode() -> String {
    let now = now_us();
    if let Some(c) = CAPTURE.get() {
        c.lag.set(age_s(c.through_us.load(Ordering::Relaxed), now));
    }
    if let Some(a) = APPLY.get() {
        let since = a.oldest_pending_us.load(Ordering::Relaxed);
        a.lag.set(if since == 0 { 0.0 } else { age_s(since, now) });
    }
    COMMON.ready.set(i64::from(health::readiness().is_ok()));
    let mut out = String::new();
    let registry = REGISTRY.lock().unwrap_or_else(PoisonError::into_inner);
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry);
    out
}

/// The `Content-Type` of what `encode` returns.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// Seconds from `us` to `now` (µs), NaN when `us` is unknown.
fn age_s(us: i64, now: i64) -> f64 {
    if us == UNKNOWN {
        f64::NAN
    } else {
        (now - us) as f64 / 1e6
    }
}

/// The `kind` label of an error.
fn kind(e: &Error) -> &'static str {
    if e.is_retryable() {
        return "connection";
    }
    if e.is_data_error() {
        return "data";
    }
    match e {
        Error::Db { .. } | Error::Pool { .. } | Error::Replication { .. } => "database",
        Error::Io { .. } => "io",
        Error::Config { .. } | Error::Setup { .. } | Error::State { .. } => "setup",
        Error::Parse { .. } | Error::Decode { .. } => "data",
        Error::SchemaChange { .. } => "schema",
        Error::Internal { .. } | Error::Shutdown => "internal",
    }
}

/// Counts a failure (a pass, a batch, a record that could not be written).
pub fn error(e: &Error) {
    if !matches!(e, Error::Shutdown) {
        COMMON
            .errors
            .get_or_create(&KindLabel { kind: kind(e) })
            .inc();
    }
}

/// One capture pass and how long it took.
pub fn capture_pass(result: &Result<PassOutcome>, elapsed: Duration) {
    let m = capture();
    m.pass_duration.observe(elapsed.as_secs_f64());
    let out = match result {
        Ok(out) => out,
        Err(e) => {
            m.passes
                .get_or_create(&ResultLabel { result: "failure" })
                .inc();
            error(e);
            return;
        }
    };
    m.passes
        .get_or_create(&ResultLabel { result: "success" })
        .inc();
    for (table, op, n) in out.counts.iter() {
        m.events
            .get_or_create(&TableOpLabels {
                table,
                op: op_label(op),
            })
            .inc_by(n);
    }
    m.files.inc_by(out.files.len() as u64);
    m.bytes.inc_by(out.bytes);
    let through = out
        .through_us
        .or_else(|| out.watermark.as_ref().map(|w| w.ts_us));
    if let Some(t) = through {
        m.through_us.store(t, Ordering::Relaxed);
    }
    if let Some(slot) = &out.slot {
        m.slot_retained.set(slot.retained_wal_bytes);
        m.slot_unconfirmed.set(slot.confirmed_lag_bytes);
    }
    m.last_success.set(now_us() as f64 / 1e6);
}

fn op_label(op: Op) -> &'static str {
    op.as_str()
}

/// A committed batch: its counts per table, its duration, and each applied change's delay
/// from its source change to now (the commit).
pub fn batch_applied(stats: &ApplyStats, elapsed: Duration) {
    let m = apply();
    let now = now_us();
    m.batches.inc();
    m.batch_duration.observe(elapsed.as_secs_f64());
    m.files
        .get_or_create(&ResultLabel { result: "applied" })
        .inc_by(stats.files as u64);
    for t in &stats.tables {
        let label = TableLabel {
            table: t.table.clone(),
        };
        m.events.get_or_create(&label).inc_by(t.events);
        m.inserted.get_or_create(&label).inc_by(t.inserted);
        m.closed.get_or_create(&label).inc_by(t.closed);
        m.deletes.get_or_create(&label).inc_by(t.deletes);
    }
    stats.ages.observe_delays(&m.delay, now);
    m.last_success.set(now as f64 / 1e6);
}

/// A file skipped because it was applied before.
pub fn already_applied() {
    apply()
        .files
        .get_or_create(&ResultLabel {
            result: "already_applied",
        })
        .inc();
}

/// A file quarantined for `e`.
pub fn quarantined(e: &Error) {
    apply()
        .files
        .get_or_create(&ResultLabel {
            result: "quarantined",
        })
        .inc();
    error(e);
}

/// What the loader found at its last look into the change-log directory: `pending` files
/// (in order, oldest first) and the dead letters.
pub fn change_log_seen(log_dir: &Path, pending: &[std::path::PathBuf]) {
    let m = apply();
    m.pending.set(pending.len() as i64);
    let written_us = |p: &Path| {
        std::fs::metadata(p)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map_or_else(now_us, |d| d.as_micros() as i64)
    };
    let oldest = pending.first().map_or(0, |p| written_us(p));
    m.oldest_pending_us.store(oldest, Ordering::Relaxed);
    let dead = std::fs::read_dir(log_dir.join(crate::changelog::DEAD_LETTER_DIR))
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".jsonl"))
                .count()
        })
        .unwrap_or(0);
    m.dead_letter.set(dead as i64);
}

/// The source change times of a batch's applied changes, kept as their ages when the batch
/// began, in fixed log-spaced bins 2 % wide, so memory does not grow with the batch. At the
/// commit each becomes one delay observation: its age plus the batch's duration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChangeAges {
    /// When the batch began (µs since the epoch).
    since_us: i64,
    /// Bin 0: younger than 1 ms; bin i ≥ 1: [1.02^(i-1), 1.02^i) ms.
    bins: Vec<u64>,
}

/// Bins 1.. reach 1.02^1200 ms, about 230 days; older ages share the last bin.
const AGE_BINS: usize = 1201;
const AGE_STEP: f64 = 1.02;

impl ChangeAges {
    /// Ages relative to now.
    pub fn starting_now() -> Self {
        ChangeAges {
            since_us: now_us(),
            bins: Vec::new(),
        }
    }

    /// One applied change whose source change time is `ts_us` (µs since the epoch).
    pub fn record(&mut self, ts_us: i64) {
        if self.bins.is_empty() {
            self.bins = vec![0; AGE_BINS];
        }
        let age_ms = (self.since_us - ts_us) as f64 / 1000.0;
        let bin = if age_ms < 1.0 {
            0
        } else {
            (1 + (age_ms.ln() / AGE_STEP.ln()) as usize).min(AGE_BINS - 1)
        };
        self.bins[bin] += 1;
    }

    /// Observes each recorded change's delay to `commit_us` into `h`.
    fn observe_delays(&self, h: &Histogram, commit_us: i64) {
        let elapsed_s = ((commit_us - self.since_us) as f64 / 1e6).max(0.0);
        for (bin, &n) in self.bins.iter().enumerate() {
            if n == 0 {
                continue;
            }
            // The bin's geometric middle.
            let age_s = if bin == 0 {
                0.0
            } else {
                AGE_STEP.powf(bin as f64 - 0.5) / 1000.0
            };
            for _ in 0..n {
                h.observe(age_s + elapsed_s);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn change_ages_become_delays_within_two_percent() {
        let mut ages = ChangeAges {
            since_us: 1_000_000_000_000,
            bins: Vec::new(),
        };
        // Changes 0.2 s, 3 s and 40 s before the batch began; the batch takes 0.5 s.
        for age_us in [200_000, 3_000_000, 40_000_000] {
            ages.record(ages.since_us - age_us);
        }
        let h = Histogram::new([0.69, 0.71, 3.4, 3.6, 40.0, 41.0]);
        ages.observe_delays(&h, ages.since_us + 500_000);
        let mut registry = Registry::default();
        registry.register("delay", "delay", h);
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &registry).expect("encode");
        let value = |name: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or_else(|| panic!("{name} in {text}"))
        };
        assert_eq!(value("delay_count "), 3.0);
        let sum = 0.7 + 3.5 + 40.5;
        assert!((value("delay_sum ") - sum).abs() < 0.02 * sum, "{text}");
        for (le, n) in [
            ("0.69", 0.0),
            ("0.71", 1.0),
            ("3.4", 1.0),
            ("3.6", 2.0),
            ("40", 2.0),
            ("41", 3.0),
        ] {
            assert_eq!(value(&format!("delay_bucket{{le=\"{le}\"}} ")), n, "{text}");
        }
    }

    #[test]
    fn errors_are_counted_by_kind() {
        assert_eq!(
            kind(&Error::Parse {
                path: "f".into(),
                line: 1,
                message: "x".into()
            }),
            "data"
        );
        assert_eq!(kind(&Error::config("X", "y")), "setup");
        assert_eq!(kind(&Error::internal("reader", "panicked")), "internal");
    }
}
