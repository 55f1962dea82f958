//! `scd2-loader verify`: checks the history invariants (README, "`verify` and `status`")
//! and reports each violation with the keys it concerns.

use crate::db::ctx;
use crate::error::Result;
use crate::table::TableSpec;
use futures_util::{pin_mut, TryStreamExt};
use std::fmt::Write as _;
use tokio_postgres::Client;

const EXAMPLES: i64 = 10;

/// One checked invariant: how many violations, and a few examples.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: &'static str,
    pub violations: u64,
    pub examples: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Report {
    pub versions: i64,
    pub keys: i64,
    pub current: i64,
    pub checks: Vec<Check>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.checks.iter().all(|c| c.violations == 0)
    }

    /// The readable report printed by `verify`.
    pub fn render(&self, history: &str) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{history}: {} versions of {} keys, {} current",
            self.versions, self.keys, self.current
        );
        for c in &self.checks {
            if c.violations == 0 {
                let _ = writeln!(s, "  ok    {}", c.name);
            } else {
                let _ = writeln!(s, "  FAIL  {}: {} violation(s)", c.name, c.violations);
                for e in &c.examples {
                    let _ = writeln!(s, "          {e}");
                }
            }
        }
        let source_only = self
            .checks
            .iter()
            .filter(|c| c.violations > 0)
            .all(|c| c.name.contains("equals the source"));
        if !self.ok() && source_only {
            let _ = writeln!(
                s,
                "note: these differences from the source persisted while the running pipeline caught up with \
                 an unchanged source row (rounds of at most --settle-seconds), or the extractor or loader was not running"
            );
        }
        let _ = writeln!(
            s,
            "{}",
            if self.ok() {
                "all invariants hold"
            } else {
                "invariants violated"
            }
        );
        s
    }
}

async fn check(
    client: &Client,
    name: &'static str,
    count_sql: &str,
    examples_sql: &str,
) -> Result<Check> {
    let violations: i64 = client
        .query_one(count_sql, &[])
        .await
        .map_err(ctx(format!("checking: {name}")))?
        .get(0);
    let examples = if violations > 0 {
        client
            .query(examples_sql, &[&EXAMPLES])
            .await
            .map_err(ctx(format!("listing examples of: {name}")))?
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect()
    } else {
        Vec::new()
    };
    Ok(Check {
        name,
        violations: violations as u64,
        examples,
    })
}

/// Checks invariants 1, 2 and 4 in the warehouse, and 3 against the source when given.
pub async fn verify(
    warehouse: &Client,
    source: Option<&Client>,
    spec: &TableSpec,
) -> Result<Report> {
    verify_settled(warehouse, source, spec, None).await
}

/// `verify`, letting a running pipeline catch up (`settle`) before a difference from the
/// source counts.
pub async fn verify_settled(
    warehouse: &Client,
    source: Option<&Client>,
    spec: &TableSpec,
    settle: Option<&Settle<'_>>,
) -> Result<Report> {
    let h = spec.history_qualified();
    let k = spec.history_key_list("");
    let (kt, kd) = key_exprs(&k, spec.key.len());
    let totals = warehouse
        .query_one(
            &format!(
                "SELECT count(*), count(DISTINCT {kd}), count(*) FILTER (WHERE is_current) FROM {h}"
            ),
            &[],
        )
        .await
        .map_err(ctx(format!("counting {h}")))?;
    let mut checks = Vec::new();

    let multi = format!("SELECT {kt} AS key, count(*) AS n FROM {h} WHERE is_current GROUP BY {k} HAVING count(*) > 1");
    checks.push(
        check(
            warehouse,
            "one current row per live key",
            &format!("SELECT count(*) FROM ({multi}) v"),
            &format!("SELECT format('key %s has %s current rows', key, n) FROM ({multi}) v ORDER BY key LIMIT $1"),
        )
        .await?,
    );

    let chain = format!(
        "SELECT {kt} AS key, valid_from, valid_to, is_current, is_deleted, next_from,
                CASE WHEN next_from IS NULL AND NOT is_current AND NOT is_deleted THEN 'closed without a successor or a delete'
                     WHEN next_from IS NULL THEN NULL
                     WHEN valid_to IS NULL OR valid_to > next_from THEN 'overlaps the next version'
                     WHEN NOT is_deleted AND valid_to < next_from THEN 'gap before the next version'
                END AS problem
         FROM (SELECT {k}, valid_from, valid_to, is_current, is_deleted,
                      lead(valid_from) OVER (PARTITION BY {k} ORDER BY valid_from, surrogate_key) AS next_from
               FROM {h}) x"
    );
    checks.push(
        check(
            warehouse,
            "versions of a key are contiguous and do not overlap",
            &format!("SELECT count(*) FROM ({chain}) v WHERE problem IS NOT NULL"),
            &format!(
                "SELECT format('key %s: version [%s, %s) %s (next starts %s)', key, valid_from, coalesce(valid_to::text, 'open'), problem, next_from)
                 FROM ({chain}) v WHERE problem IS NOT NULL ORDER BY key, valid_from LIMIT $1"
            ),
        )
        .await?,
    );

    let deleted_current = format!("SELECT {kt} AS key FROM {h} WHERE is_current AND is_deleted");
    checks.push(
        check(
            warehouse,
            "no current row for a deleted key",
            &format!("SELECT count(*) FROM ({deleted_current}) v"),
            &format!("SELECT format('key %s is current and deleted', key) FROM ({deleted_current}) v LIMIT $1"),
        )
        .await?,
    );

    let dup_pos = format!(
        "SELECT {kt} AS key, valid_from, source_lsn, count(*) AS n FROM {h} GROUP BY {k}, valid_from, source_lsn HAVING count(*) > 1"
    );
    checks.push(
        check(
            warehouse,
            "no two versions of a key share a source position",
            &format!("SELECT count(*) FROM ({dup_pos}) v"),
            &format!("SELECT format('key %s: %s rows at %s / %s', key, n, valid_from, coalesce(source_lsn::text, '-')) FROM ({dup_pos}) v LIMIT $1"),
        )
        .await?,
    );

    let held = format!(
        "SELECT format('held since %s at a schema change (change-log file %s, line %s): %s', held_since, batch_id, line, reason) AS m
         FROM public.cdc_held_tables WHERE history_table = '{}'",
        h.replace('\'', "''")
    );
    let holds: bool = warehouse
        .query_one(
            "SELECT to_regclass('public.cdc_held_tables') IS NOT NULL",
            &[],
        )
        .await
        .map_err(ctx("looking up cdc_held_tables"))?
        .get(0);
    let mut held_now = false;
    if holds {
        let c = check(
            warehouse,
            "the history follows every schema change of the source (not held at one)",
            &format!("SELECT count(*) FROM ({held}) v"),
            &format!("{held} LIMIT $1"),
        )
        .await?;
        held_now = c.violations > 0;
        checks.push(c);
    }

    // A held table's history stops at its schema change: comparing it with the source
    // would only repeat that.
    if let Some(src) = source.filter(|_| !held_now) {
        checks.push(compare_current_with_source(warehouse, src, spec, settle).await?);
    }

    Ok(Report {
        versions: totals.get(0),
        keys: totals.get(1),
        current: totals.get(2),
        checks,
    })
}

/// A key's text and its value for `count(DISTINCT …)`, from the comma-separated key columns:
/// the column itself for a single-column key, the row of them for a composite one.
fn key_exprs(cols: &str, n: usize) -> (String, String) {
    if n == 1 {
        (format!("{cols}::text"), cols.to_owned())
    } else {
        (format!("ROW({cols})::text"), format!("ROW({cols})"))
    }
}

/// One key whose current row differs from the source row.
struct Diff {
    key: String,
    /// The source row's text (`None`: not in the source).
    source: Option<String>,
    what: String,
}

/// How `verify` lets a running pipeline catch up before it calls a difference a divergence.
pub struct Settle<'a> {
    pub cfg: &'a crate::config::loader::LoaderConfig,
    pub specs: &'a [TableSpec],
    /// How long to wait for the pipeline to reach the source's position, each round.
    pub timeout: std::time::Duration,
    pub shutdown: &'a crate::shutdown::Shutdown,
}

/// Most rounds of re-checking the keys that differ, each after the pipeline has caught up
/// with the source's position at the start of the round.
const SETTLE_ROUNDS: usize = 20;

/// A key is a divergence once it differed from an unchanged source row this many rounds in a
/// row (a key that traffic keeps changing is not judged until it holds still).
const STABLE_ROUNDS: u32 = 2;

/// Invariant 3: the current rows equal the source rows, value for value (compared as the text
/// of the typed row). On a running pipeline the history trails the source, so a difference is
/// re-checked, key by key, after the pipeline has applied everything up to the moment of the
/// re-check (up to `SETTLE_ROUNDS` times); only differences that persist are reported.
async fn compare_current_with_source(
    warehouse: &Client,
    source: &Client,
    spec: &TableSpec,
    settle: Option<&Settle<'_>>,
) -> Result<Check> {
    let mut diffs = diff_current(warehouse, source, spec, None).await?;
    let mut rounds = 0;
    // Per key: its source row in the last round, and for how many rounds in a row it differed
    // from an unchanged source row.
    let mut last: std::collections::HashMap<String, (Option<String>, u32)> = diffs
        .iter()
        .map(|d| (d.key.clone(), (d.source.clone(), 0)))
        .collect();
    let judged =
        |diffs: &[Diff], last: &std::collections::HashMap<String, (Option<String>, u32)>| {
            diffs
                .iter()
                .all(|d| last.get(&d.key).is_some_and(|(_, n)| *n >= STABLE_ROUNDS))
        };
    while let Some(settle) =
        settle.filter(|_| !diffs.is_empty() && rounds < SETTLE_ROUNDS && !judged(&diffs, &last))
    {
        tracing::info!(
            table = %spec.qualified(),
            differences = diffs.len(),
            first = %diffs[0].what,
            round = rounds + 1,
            "differences from the source; letting the running pipeline catch up"
        );
        if !settle_once(source, settle).await? {
            break;
        }
        rounds += 1;
        let keys: Vec<String> = diffs.iter().map(|d| d.key.clone()).collect();
        diffs = diff_current(warehouse, source, spec, Some(&keys)).await?;
        last = diffs
            .iter()
            .map(|d| {
                let held = match last.get(&d.key) {
                    Some((prev, n)) if *prev == d.source => n + 1,
                    _ => 0,
                };
                (d.key.clone(), (d.source.clone(), held))
            })
            .collect();
    }
    Ok(Check {
        name: "every current row equals the source row",
        violations: diffs.len() as u64,
        examples: diffs
            .into_iter()
            .take(EXAMPLES as usize)
            .map(|d| d.what)
            .collect(),
    })
}

/// Waits until the running pipeline has applied every change the source had committed when
/// this is called: the extractor's progress past the source's position then (the timestamp
/// watermarks past its clock; the slot confirmed past its WAL position), and every file
/// pending at that point applied. `false` when it cannot: a program is not running, or the
/// pipeline did not get there within the timeout.
async fn settle_once(source: &Client, settle: &Settle<'_>) -> Result<bool> {
    use crate::ownership::running;
    let cfg = settle.cfg;
    if running(&cfg.log_dir, "extractor").is_none()
        || running(&cfg.log_dir, "scd2-loader").is_none()
    {
        tracing::info!("the extractor or the loader is not running: nothing to wait for");
        return Ok(false);
    }
    let deadline = std::time::Instant::now() + settle.timeout;
    let logical = crate::catalog::logical_progress_name(settle.specs, &cfg.tables.pipeline_name);
    let is_logical = crate::progress::Progress::peek(&cfg.state_dir, &logical)?
        .is_some_and(|p| p.capture_mode == crate::event::CaptureMode::Logical);
    // The insert position: with asynchronous commit, a committed transaction's end can be
    // past the write position (pg_current_wal_lsn) for a moment.
    let row = source
        .query_one(
            "SELECT clock_timestamp(), (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::int8",
            &[],
        )
        .await
        .map_err(ctx("reading the source's position"))?;
    let (clock, lsn): (chrono::DateTime<chrono::Utc>, i64) = (row.get(0), row.get(1));
    let tick = std::time::Duration::from_millis(100);
    // 1. The extractor has captured past that position.
    loop {
        let reached = if is_logical {
            source
                .query_opt(
                    "SELECT (confirmed_flush_lsn - '0/0'::pg_lsn)::int8 >= $2
                     FROM pg_replication_slots WHERE slot_name = $1",
                    &[&cfg.slot_name, &lsn],
                )
                .await
                .map_err(ctx("reading the slot's position"))?
                .is_some_and(|r| r.get::<_, bool>(0))
        } else {
            let mut all = true;
            for spec in settle.specs {
                let w = crate::progress::Progress::peek(&cfg.state_dir, &spec.qualified())?
                    .and_then(|p| p.watermark);
                all &= w.is_some_and(|w| w.ts_us >= clock.timestamp_micros());
            }
            all
        };
        if reached {
            break;
        }
        if std::time::Instant::now() > deadline || settle.shutdown.sleep(tick).await {
            tracing::info!("the extractor did not reach the source's position in time");
            return Ok(false);
        }
    }
    // 2. The loader has applied every file pending then.
    let pending = crate::changelog::pending_files(&cfg.log_dir)?;
    while pending.iter().any(|f| f.exists()) {
        if std::time::Instant::now() > deadline || settle.shutdown.sleep(tick).await {
            tracing::info!("the loader did not apply the pending files in time");
            return Ok(false);
        }
    }
    tracing::info!(
        logical = is_logical,
        files = pending.len(),
        "the pipeline caught up with the source's position"
    );
    Ok(true)
}

/// The keys whose current row differs from the source row (all keys, or only `keys`),
/// streamed from both sides in key order.
async fn diff_current(
    warehouse: &Client,
    source: &Client,
    spec: &TableSpec,
    keys: Option<&[String]>,
) -> Result<Vec<Diff>> {
    let src_cols: Vec<String> = spec.columns.iter().map(|c| c.name.clone()).collect();
    let src_table = format!("{} s", spec.qualified());
    let src_key = key_exprs(&spec.key_list("s"), spec.key.len()).0;
    let wh_key = key_exprs(&spec.history_key_list(""), spec.key.len()).0;
    let only = |key: &str| {
        if keys.is_some() {
            format!("AND {key} = ANY($1)")
        } else {
            String::new()
        }
    };
    let src_sql = format!(
        "SELECT {key}, ROW({cols})::text FROM {t} WHERE true {only} ORDER BY {key} COLLATE \"C\"",
        key = src_key,
        cols = src_cols.join(", "),
        t = src_table,
        only = only(&src_key),
    );
    let wh_sql = format!(
        "SELECT {key}, ROW({cols})::text FROM {h} WHERE is_current {only} ORDER BY {key} COLLATE \"C\"",
        key = wh_key,
        cols = spec.history_column_list(),
        h = spec.history_qualified(),
        only = only(&wh_key),
    );
    let list: Vec<String> = keys.map(<[String]>::to_vec).unwrap_or_default();
    let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = if keys.is_some() {
        vec![&list]
    } else {
        Vec::new()
    };
    let src = source
        .query_raw(src_sql.as_str(), params.iter().copied())
        .await
        .map_err(ctx("reading source rows"))?;
    let wh = warehouse
        .query_raw(wh_sql.as_str(), params.iter().copied())
        .await
        .map_err(ctx("reading current history rows"))?;
    pin_mut!(src);
    pin_mut!(wh);
    let mut a = src.try_next().await.map_err(ctx("reading source rows"))?;
    let mut b = wh
        .try_next()
        .await
        .map_err(ctx("reading current history rows"))?;
    let mut diffs = Vec::new();
    // Past this many, stop collecting (the report shows a few; the count is a lower bound).
    const MAX_DIFFS: usize = 100_000;
    let only_source = |k: String, v: String| Diff {
        what: format!("key {k} is in the source but has no current row"),
        key: k,
        source: Some(v),
    };
    let only_history = |k: String| Diff {
        what: format!("key {k} has a current row but is not in the source"),
        key: k,
        source: None,
    };
    loop {
        if diffs.len() >= MAX_DIFFS {
            break;
        }
        match (&a, &b) {
            (None, None) => break,
            (Some(s), None) => {
                diffs.push(only_source(s.get(0), s.get(1)));
                a = src.try_next().await.map_err(ctx("reading source rows"))?;
            }
            (None, Some(w)) => {
                diffs.push(only_history(w.get(0)));
                b = wh
                    .try_next()
                    .await
                    .map_err(ctx("reading current history rows"))?;
            }
            (Some(s), Some(w)) => {
                let (sk, wk): (String, String) = (s.get(0), w.get(0));
                match sk.as_bytes().cmp(wk.as_bytes()) {
                    std::cmp::Ordering::Less => {
                        diffs.push(only_source(sk, s.get(1)));
                        a = src.try_next().await.map_err(ctx("reading source rows"))?;
                    }
                    std::cmp::Ordering::Greater => {
                        diffs.push(only_history(wk));
                        b = wh
                            .try_next()
                            .await
                            .map_err(ctx("reading current history rows"))?;
                    }
                    std::cmp::Ordering::Equal => {
                        let (sv, wv): (String, String) = (s.get(1), w.get(1));
                        if sv != wv {
                            diffs.push(Diff {
                                what: format!("key {sk}: source {sv} but current row {wv}"),
                                key: sk,
                                source: Some(sv),
                            });
                        }
                        a = src.try_next().await.map_err(ctx("reading source rows"))?;
                        b = wh
                            .try_next()
                            .await
                            .map_err(ctx("reading current history rows"))?;
                    }
                }
            }
        }
    }
    Ok(diffs)
}

/// `verify` as the binary runs it: connects, checks, returns the report.
pub async fn run(
    cfg: &crate::config::loader::LoaderConfig,
    with_source: bool,
    only: Option<&str>,
    settle_timeout: std::time::Duration,
    shutdown: &crate::shutdown::Shutdown,
) -> Result<Vec<(String, Report)>> {
    let warehouse = crate::db::connect(&cfg.warehouse, shutdown).await?;
    let source = crate::db::connect(&cfg.source, shutdown).await?;
    let all = cfg.tables.describe(&source).await?;
    let mut specs = all.clone();
    if let Some(t) = only {
        specs.retain(|s| s.qualified() == t);
        if specs.is_empty() {
            return Err(crate::error::Error::config(
                "--table",
                format!("'{t}' is not one of the tables CDC_TABLES names (schema.table)"),
            ));
        }
    }
    let mut reports = Vec::with_capacity(specs.len());
    let settle = Settle {
        cfg,
        specs: &all,
        timeout: settle_timeout,
        shutdown,
    };
    for spec in &specs {
        let report = verify_settled(
            &warehouse,
            with_source.then_some(&source),
            spec,
            Some(&settle),
        )
        .await?;
        reports.push((spec.history_qualified(), report));
    }
    Ok(reports)
}
