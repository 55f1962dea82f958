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
                "note: current rows equal the source only once the pipeline has caught up; while the source \
                 keeps changing, stop the writers and run one extractor and loader pass, or use --no-source"
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

    if let Some(src) = source {
        checks.push(compare_current_with_source(warehouse, src, spec).await?);
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

/// Invariant 3: the current rows equal the source rows, value for value (compared as the text
/// of the typed row, in key order, streamed from both sides).
async fn compare_current_with_source(
    warehouse: &Client,
    source: &Client,
    spec: &TableSpec,
) -> Result<Check> {
    let src_cols: Vec<String> = spec.columns.iter().map(|c| c.name.clone()).collect();
    let src_table = format!("{} s", spec.qualified());
    let src_key = key_exprs(&spec.key_list("s"), spec.key.len()).0;
    let src_sql = format!(
        "SELECT {key}, ROW({cols})::text FROM {t} ORDER BY {key} COLLATE \"C\"",
        key = src_key,
        cols = src_cols.join(", "),
        t = src_table
    );
    let wh_key = key_exprs(&spec.history_key_list(""), spec.key.len()).0;
    let wh_sql = format!(
        "SELECT {key}, ROW({cols})::text FROM {h} WHERE is_current ORDER BY {key} COLLATE \"C\"",
        key = wh_key,
        cols = spec.history_column_list(),
        h = spec.history_qualified()
    );
    let none: [&str; 0] = [];
    let src = source
        .query_raw(src_sql.as_str(), none)
        .await
        .map_err(ctx("reading source rows"))?;
    let wh = warehouse
        .query_raw(wh_sql.as_str(), none)
        .await
        .map_err(ctx("reading current history rows"))?;
    pin_mut!(src);
    pin_mut!(wh);
    let mut a = src.try_next().await.map_err(ctx("reading source rows"))?;
    let mut b = wh
        .try_next()
        .await
        .map_err(ctx("reading current history rows"))?;
    let mut violations = 0u64;
    let mut examples = Vec::new();
    let mut note = |msg: String, examples: &mut Vec<String>| {
        violations += 1;
        if examples.len() < EXAMPLES as usize {
            examples.push(msg);
        }
    };
    loop {
        match (&a, &b) {
            (None, None) => break,
            (Some(s), None) => {
                note(
                    format!(
                        "key {} is in the source but has no current row",
                        s.get::<_, String>(0)
                    ),
                    &mut examples,
                );
                a = src.try_next().await.map_err(ctx("reading source rows"))?;
            }
            (None, Some(w)) => {
                note(
                    format!(
                        "key {} has a current row but is not in the source",
                        w.get::<_, String>(0)
                    ),
                    &mut examples,
                );
                b = wh
                    .try_next()
                    .await
                    .map_err(ctx("reading current history rows"))?;
            }
            (Some(s), Some(w)) => {
                let (sk, wk): (String, String) = (s.get(0), w.get(0));
                match sk.as_bytes().cmp(wk.as_bytes()) {
                    std::cmp::Ordering::Less => {
                        note(
                            format!("key {sk} is in the source but has no current row"),
                            &mut examples,
                        );
                        a = src.try_next().await.map_err(ctx("reading source rows"))?;
                    }
                    std::cmp::Ordering::Greater => {
                        note(
                            format!("key {wk} has a current row but is not in the source"),
                            &mut examples,
                        );
                        b = wh
                            .try_next()
                            .await
                            .map_err(ctx("reading current history rows"))?;
                    }
                    std::cmp::Ordering::Equal => {
                        let (sv, wv): (String, String) = (s.get(1), w.get(1));
                        if sv != wv {
                            note(
                                format!("key {sk}: source {sv} but current row {wv}"),
                                &mut examples,
                            );
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
    Ok(Check {
        name: "every current row equals the source row",
        violations,
        examples,
    })
}

/// `verify` as the binary runs it: connects, checks, returns the report.
pub async fn run(
    cfg: &crate::config::loader::LoaderConfig,
    with_source: bool,
    only: Option<&str>,
    shutdown: &crate::shutdown::Shutdown,
) -> Result<Vec<(String, Report)>> {
    let warehouse = crate::db::connect(&cfg.warehouse, shutdown).await?;
    let source = crate::db::connect(&cfg.source, shutdown).await?;
    let mut specs = cfg.tables.describe(&source).await?;
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
    for spec in &specs {
        let report = verify(&warehouse, with_source.then_some(&source), spec).await?;
        reports.push((spec.history_qualified(), report));
    }
    Ok(reports)
}
