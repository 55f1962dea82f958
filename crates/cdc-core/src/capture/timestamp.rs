//! Timestamp capture: a high-watermark on the change-time column, made correct.
//!
//! Each pass reads, in one REPEATABLE READ snapshot, the truncations, the delete tombstones
//! and every row whose `(change_time, key)` is past the watermark, and streams them (a binary
//! COPY of the columns' text; the extractor writes each event's JSON) into the sink. The new
//! watermark is bounded by the oldest transaction that was writing when the pass began, so a
//! transaction that started before a poll and commits after it is still found by the next
//! one; the rows re-read because of that bound are duplicates the loader drops. A prepared
//! transaction (`PREPARE TRANSACTION`) has no session any more but holds the watermark the
//! same way until it commits or rolls back (see `WriterBounds`). Tombstones
//! and truncations are removed, in the same snapshot, only after the sink made the events
//! holding them durable; the progress file is written last.

use super::rows::{
    change_time_expr, check_source_table, copy_rows, image_values, micros, null, op_expr,
    read_rows, required, required_i64, required_op, row_header, rows_copy_sql, ImageColumns,
};
use super::{ChangeSource, PassOutcome};
use crate::catalog::TableSelection;
use crate::db::ctx;
use crate::error::{Error, Result};
use crate::event::encode::{write_event, write_schema, write_truncate, TEXT_OUTPUT_SETTINGS};
use crate::event::{CaptureMode, Op};
use crate::progress::{Progress, Watermark};
use crate::schema_change::{shape_of, Shape};
use crate::sink::{commit_if_ok, ChangeSink, Durable};
use crate::table::{sql_literal, TableSpec};
use chrono::{DateTime, Utc};
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio_postgres::Client;

/// Timestamp capture of the pipeline's tables, each with its own watermark (its own progress
/// file); their events go into one batch of the sink per pass.
pub struct TimestampCapture {
    tables: Vec<(TableSpec, Progress)>,
    state_dir: PathBuf,
    /// Given, schema changes are followed: the tables are described again from the catalog
    /// when it changes, and a schema event is written before the rows in the new shape.
    selection: Option<TableSelection>,
    watch: super::schema::Watch,
    writers: WriterBounds,
    /// The snapshot of the last successful pass (`pg_current_snapshot()`): while the source
    /// shows the same one, no transaction has ended since, so there is nothing new to read.
    last_snapshot: Option<String>,
}

/// How often the log repeats that a prepared transaction still holds the watermark.
const PREPARED_LOG_EVERY: Duration = Duration::from_secs(300);

/// What bounds the watermark: the transactions that write. A writer's rows carry change times
/// no earlier than the moment it took its transaction id (the change-time trigger takes it
/// first), so the watermark may not pass a time before that moment while the writer has not
/// finished. A writer with a session shows in `pg_stat_activity` (`backend_xid`, from its
/// `xact_start`); a prepared transaction has left its session and shows only in
/// `pg_prepared_xacts`, whose `prepared` time is later than its rows' change times (they are
/// stamped when written). So each pass remembers, by transaction id, the bound of every writer
/// it saw; a prepared transaction keeps the bound it had when it was still running. One not
/// seen before took its id after the previous pass read the writers, so that pass's clock
/// bounds it; in a process's first pass, the tables' saved watermarks do (each was bounded
/// the same way when it was saved). With none of these (the initial copy of every table while
/// a transaction is prepared), there is no safe bound: the pass waits.
#[derive(Debug, Default)]
struct WriterBounds {
    /// Transaction id → the time its rows' change times cannot precede (`None`: unknown).
    since: HashMap<String, Option<DateTime<Utc>>>,
    /// The clock of the previous pass, read before its writers were.
    last_clock: Option<DateTime<Utc>>,
    /// When the log last said that a prepared transaction (by gid) holds the watermark.
    logged: HashMap<String, Instant>,
}

/// A prepared transaction of the source database, as `pg_prepared_xacts` shows it.
#[derive(Debug, Clone)]
pub struct PreparedXact {
    pub xid: String,
    pub gid: String,
    pub prepared: DateTime<Utc>,
    pub owner: String,
}

/// The prepared transactions of the connected database, oldest first.
pub async fn prepared_xacts(client: &Client) -> Result<Vec<PreparedXact>> {
    Ok(client
        .query(
            "SELECT transaction::text, gid, prepared, owner::text FROM pg_prepared_xacts
             WHERE database = current_database() ORDER BY prepared",
            &[],
        )
        .await
        .map_err(ctx("reading prepared transactions from pg_prepared_xacts"))?
        .iter()
        .map(|r| PreparedXact {
            xid: r.get(0),
            gid: r.get(1),
            prepared: r.get(2),
            owner: r.get(3),
        })
        .collect())
}

/// The bound of one pass: the earliest change time a transaction that has not finished may
/// still commit (`None`: unknown, the pass must wait), and the prepared transactions.
struct PassBound {
    bound: Option<DateTime<Utc>>,
    prepared: Vec<(PreparedXact, Option<DateTime<Utc>>)>,
}

impl WriterBounds {
    /// Reads the writers (sessions first, then prepared transactions: a transaction being
    /// prepared is listed as prepared before it leaves its session) and returns the bound.
    /// `now` is the clock read before; `saved` the earliest saved watermark of the tables.
    async fn read(
        &mut self,
        client: &Client,
        now: DateTime<Utc>,
        saved: Option<DateTime<Utc>>,
    ) -> Result<PassBound> {
        let active: Vec<(String, Option<DateTime<Utc>>)> = client
            .query(
                "SELECT backend_xid::text, xact_start FROM pg_stat_activity
                 WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid() AND datname = current_database()",
                &[],
            )
            .await
            .map_err(ctx("reading open transactions from pg_stat_activity"))?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let prepared = prepared_xacts(client).await?;
        // A writer's bound: what an earlier pass knew of it, else the previous pass's clock,
        // else the saved watermarks.
        let earlier = |xid: &str| match self.since.get(xid) {
            Some(known) => *known,
            None => self.last_clock.or(saved),
        };
        let mut since: HashMap<String, Option<DateTime<Utc>>> = HashMap::new();
        let mut bound = Some(now);
        let hold = |bound: &mut Option<DateTime<Utc>>, s: Option<DateTime<Utc>>| {
            *bound = match (*bound, s) {
                (Some(b), Some(s)) => Some(b.min(s)),
                _ => None,
            };
        };
        for (xid, start) in active {
            let s = start.or_else(|| earlier(&xid));
            hold(&mut bound, s);
            since.insert(xid, s);
        }
        let mut held = Vec::with_capacity(prepared.len());
        for p in prepared {
            // (Listed as running too if it was prepared between the two reads.)
            let s = match since.get(&p.xid) {
                Some(running) => *running,
                None => earlier(&p.xid),
            };
            hold(&mut bound, s);
            since.insert(p.xid.clone(), s);
            held.push((p, s));
        }
        self.since = since;
        self.last_clock = Some(now);
        Ok(PassBound {
            bound,
            prepared: held,
        })
    }

    /// Says in the log which prepared transactions hold the watermark (when first seen, then
    /// every `PREPARED_LOG_EVERY`), and when one no longer does.
    fn log(&mut self, prepared: &[(PreparedXact, Option<DateTime<Utc>>)], now: DateTime<Utc>) {
        let gone: Vec<String> = self
            .logged
            .keys()
            .filter(|g| !prepared.iter().any(|(p, _)| &p.gid == *g))
            .cloned()
            .collect();
        for gid in gone {
            self.logged.remove(&gid);
            tracing::info!(gid = %gid, "prepared transaction finished; it no longer holds the watermark");
        }
        for (p, s) in prepared {
            if self
                .logged
                .get(&p.gid)
                .is_some_and(|t| t.elapsed() < PREPARED_LOG_EVERY)
            {
                continue;
            }
            self.logged.insert(p.gid.clone(), Instant::now());
            let age_s = (now - p.prepared).num_seconds();
            match s {
                Some(s) => tracing::warn!(
                    gid = %p.gid,
                    xid = %p.xid,
                    owner = %p.owner,
                    prepared_at = %p.prepared.to_rfc3339(),
                    age_s,
                    holds_at = %s.to_rfc3339(),
                    "a prepared transaction holds the watermark until COMMIT PREPARED or ROLLBACK PREPARED"
                ),
                None => tracing::warn!(
                    gid = %p.gid,
                    xid = %p.xid,
                    owner = %p.owner,
                    prepared_at = %p.prepared.to_rfc3339(),
                    age_s,
                    "the initial copy waits for a prepared transaction to COMMIT PREPARED or ROLLBACK PREPARED"
                ),
            }
        }
    }
}

impl TimestampCapture {
    pub fn new(specs: Vec<TableSpec>, state_dir: PathBuf) -> Result<Self> {
        let mut tables = Vec::with_capacity(specs.len());
        for spec in specs {
            let progress = Progress::load(&state_dir, &spec.qualified(), CaptureMode::Timestamp)?;
            tables.push((spec, progress));
        }
        Ok(TimestampCapture {
            tables,
            state_dir,
            selection: None,
            watch: Default::default(),
            writers: WriterBounds::default(),
            last_snapshot: None,
        })
    }

    /// Follows the tables' schema changes (`selection` describes them again).
    pub fn following(mut self, selection: TableSelection) -> Self {
        self.selection = Some(selection);
        self
    }

    /// The sink's next sequence number: past every table's.
    fn next_seq(&self) -> u64 {
        self.tables
            .iter()
            .map(|(_, p)| p.next_file_seq)
            .max()
            .unwrap_or(1)
    }
}

impl ChangeSource for TimestampCapture {
    fn mode(&self) -> CaptureMode {
        CaptureMode::Timestamp
    }

    fn snapshot_needed(&self) -> bool {
        self.tables.iter().any(|(_, p)| p.watermark.is_none())
    }

    /// Checks that the source has the table, its columns, the tombstone table, and that this
    /// role can see other sessions' transactions (needed to bound the watermark).
    async fn prepare(&mut self, client: &Client) -> Result<()> {
        for (spec, _) in &self.tables {
            check_source_table(client, spec, true).await?;
            super::setup::check_timestamp_table(client, spec).await?;
        }
        let row = client
            .query_one(
                "SELECT rolsuper OR pg_has_role(current_user, 'pg_read_all_stats', 'MEMBER')
                 FROM pg_roles WHERE rolname = current_user",
                &[],
            )
            .await
            .map_err(ctx("checking the capture role's privileges"))?;
        if !row.get::<_, bool>(0) {
            return Err(Error::setup(
                "source role",
                "timestamp capture must see other sessions' open transactions: make DB_USER a superuser or \
                 GRANT pg_read_all_stats TO it",
            ));
        }
        for table in ["public.cdc_tombstones", "public.cdc_truncations"] {
            let found = client
                .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
                .await
                .map_err(ctx(format!("looking for {table}")))?;
            if !found.get::<_, bool>(0) {
                return Err(Error::setup(
                    "source schema",
                    format!("{table} is missing: run `extractor setup`"),
                ));
            }
        }
        // A watermark ahead of the source's clock would skip every change stamped before it.
        let now: DateTime<Utc> = client
            .query_one("SELECT clock_timestamp()", &[])
            .await
            .map_err(ctx("reading the source clock"))?
            .get(0);
        for (spec, progress) in &self.tables {
            let Some(w) = &progress.watermark else {
                continue;
            };
            if w.ts_us > now.timestamp_micros() {
                let at = DateTime::<Utc>::from_timestamp_micros(w.ts_us)
                    .map(|t| t.to_rfc3339())
                    .unwrap_or_else(|| w.ts_us.to_string());
                return Err(Error::State {
                    path: Progress::path(&self.state_dir, &spec.qualified()),
                    message: format!(
                        "its watermark ({at}) is later than the source's clock ({}), so changes stamped \
                         in between would be skipped: the file is from another database, was edited, or the \
                         source's clock went back. Remove the file to take a new snapshot of {}, or wait \
                         until the source's clock passes the watermark",
                        now.to_rfc3339(),
                        spec.qualified()
                    ),
                });
            }
        }
        Ok(())
    }

    /// One capture pass over every table, in one snapshot. Events are durable before
    /// tombstones are removed and progress moves.
    async fn unchanged(&self, client: &Client) -> Result<bool> {
        let Some(last) = &self.last_snapshot else {
            return Ok(false);
        };
        if self
            .tables
            .iter()
            .any(|(s, _)| super::resnapshot::requested(&self.state_dir, &s.qualified()))
        {
            return Ok(false);
        }
        let now: String = client
            .query_one("SELECT pg_current_snapshot()::text", &[])
            .await
            .map_err(ctx("reading the source's snapshot"))?
            .get(0);
        Ok(&now == last)
    }

    async fn pass(
        &mut self,
        client: &mut Client,
        sink: &mut dyn ChangeSink,
    ) -> Result<PassOutcome> {
        self.last_snapshot = None;
        // The bound: now, and the start of the oldest transaction that holds an xid (a writer),
        // a prepared one included. Taken before the snapshot, so every writer not in our
        // snapshot is either listed here or stamps its rows after `now`.
        let now: DateTime<Utc> = client
            .query_one("SELECT clock_timestamp()", &[])
            .await
            .map_err(ctx("reading the source clock"))?
            .get(0);
        let saved = self
            .tables
            .iter()
            .filter_map(|(_, p)| p.watermark.as_ref().map(|w| w.ts_us))
            .min()
            .and_then(DateTime::<Utc>::from_timestamp_micros);
        let PassBound { bound, prepared } = self.writers.read(client, now, saved).await?;
        self.writers.log(&prepared, now);
        let Some(bound) = bound else {
            // Every table takes its initial copy and a prepared transaction's rows may carry
            // any earlier change time: no watermark would be safe yet (logged above).
            return Ok(PassOutcome {
                snapshot: true,
                ..PassOutcome::default()
            });
        };
        let captured_ms = now.timestamp_millis();
        // Re-snapshots asked for (`extractor resnapshot`); a table still to take its initial
        // copy takes that instead.
        let requested: Vec<bool> = self
            .tables
            .iter()
            .map(|(s, _)| super::resnapshot::requested(&self.state_dir, &s.qualified()))
            .collect();
        let resnap: Vec<bool> = self
            .tables
            .iter()
            .zip(&requested)
            .map(|((_, p), &r)| r && p.watermark.is_some())
            .collect();

        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .start()
            .await
            .map_err(ctx("starting the capture snapshot"))?;

        if self.selection.is_some() {
            // Before the snapshot: no schema change commits between the catalog read below
            // and the rows read in its shape.
            let names: Vec<String> = self.tables.iter().map(|(s, _)| s.qualified()).collect();
            tx.batch_execute(&format!(
                "LOCK TABLE {} IN ACCESS SHARE MODE",
                names.join(", ")
            ))
            .await
            .map_err(ctx("locking the tables for the pass"))?;
        }
        let resnap_names: Vec<String> = self
            .tables
            .iter()
            .zip(&resnap)
            .filter(|(_, &r)| r)
            .map(|((s, _), _)| s.qualified())
            .collect();
        if !resnap_names.is_empty() {
            // A table read again: its writers finish first and the next wait for this pass
            // to end, so every change of it our snapshot shows is stamped before the clock
            // read with the snapshot, and every change it does not show after.
            tx.batch_execute(&format!(
                "LOCK TABLE {} IN SHARE MODE",
                resnap_names.join(", ")
            ))
            .await
            .map_err(ctx("locking the tables to read again"))?;
        }
        // The pass's snapshot, taken here (the first statement that needs one), and the
        // clock after it (a re-snapshot's time).
        let row = tx
            .query_one(
                "SELECT pg_current_snapshot()::text, (extract(epoch FROM clock_timestamp()) * 1000000)::int8,
                        to_regclass('public.cdc_alters') IS NOT NULL",
                &[],
            )
            .await
            .map_err(ctx("reading the capture snapshot"))?;
        let pass_snapshot: String = row.get(0);
        let snapshot_us: i64 = row.get(1);
        let alters_recorded: bool = row.get(2);
        sink.begin(now, self.next_seq());
        let snapshot = self.snapshot_needed();
        let mut out = PassOutcome {
            snapshot,
            ..PassOutcome::default()
        };
        let (tables, selection, watch) = (&mut self.tables, &self.selection, &mut self.watch);
        let result: Result<(Vec<Found>, Followed)> = async {
            tx.batch_execute(TEXT_OUTPUT_SETTINGS)
                .await
                .map_err(ctx("setting the output format"))?;
            let shapes = match selection {
                Some(sel) => {
                    follow_schema(
                        &tx,
                        alters_recorded,
                        sel,
                        watch,
                        tables,
                        captured_ms,
                        sink,
                        &mut out,
                    )
                    .await?
                }
                None => Followed {
                    shapes: vec![None; tables.len()],
                    max_alter: vec![None; tables.len()],
                },
            };
            let mut found = Vec::with_capacity(tables.len());
            for (spec, progress) in tables.iter() {
                let prev = progress.watermark.as_ref();
                found.push(capture_table(&tx, spec, prev, captured_ms, sink, &mut out).await?);
            }
            // After the table's changes (all stamped before it): its rows as they are now.
            for ((spec, _), _) in tables.iter().zip(&resnap).filter(|(_, &r)| r) {
                let rows = super::resnapshot::copy_table(
                    &tx,
                    spec,
                    CaptureMode::Timestamp,
                    snapshot_us,
                    None,
                    captured_ms,
                    sink,
                )
                .await?;
                out.rows += rows;
                tracing::info!(table = %spec.qualified(), rows, "re-snapshot taken");
            }
            Ok((found, shapes))
        }
        .await;
        if result.is_err() {
            // What it saw is not written: look again next pass.
            self.watch.forget();
        }
        let ((found, Followed { shapes, max_alter }), durable) = commit_if_ok(sink, result)?;
        let next_seq = durable.next_seq();
        out = PassOutcome {
            rows: out.rows,
            deletes: out.deletes,
            schema_changes: out.schema_changes,
            snapshot,
            ..PassOutcome::written(&durable)
        };

        // The files are durable: the tombstones and truncations they hold may go (only those
        // in our snapshot).
        for ((spec, _), f) in self.tables.iter().zip(&found) {
            remove_captured(&tx, spec, f, &durable).await?;
        }
        for ((spec, _), max) in self.tables.iter().zip(&max_alter) {
            if let Some(max) = max {
                tx.execute(
                    "DELETE FROM public.cdc_alters WHERE table_schema = $1 AND table_name = $2 AND alter_id <= $3",
                    &[&spec.schema, &spec.name, max],
                )
                .await
                .map_err(ctx("removing the ALTERs followed"))?;
            }
        }
        tx.commit()
            .await
            .map_err(ctx("committing the capture pass"))?;

        // Progress last, table by table.
        let bound_us = bound.timestamp_micros();
        for (((spec, progress), Found { last, .. }), shape) in
            self.tables.iter_mut().zip(found).zip(shapes)
        {
            let prev = progress.watermark.clone();
            let candidate = match last {
                Some(w) if w.ts_us < bound_us => w,
                _ => Watermark {
                    ts_us: bound_us,
                    key: None,
                },
            };
            let new = match &prev {
                Some(p) if candidate.cmp_pos(p) == std::cmp::Ordering::Less => p.clone(),
                _ => candidate,
            };
            let reshaped = shape.is_some();
            if let Some(shape) = shape {
                progress.shapes.insert(spec.qualified(), shape);
            }
            if prev.as_ref() != Some(&new) || next_seq != progress.next_file_seq || reshaped {
                progress.watermark = Some(new);
                progress.next_file_seq = next_seq;
                progress.save(&self.state_dir, &spec.qualified(), prev.as_ref(), &durable)?;
            }
        }
        // The snapshots asked for are durable, and the progress after them.
        for ((spec, _), _) in self.tables.iter().zip(&requested).filter(|(_, &r)| r) {
            super::resnapshot::done(&self.state_dir, &spec.qualified())?;
        }
        out.watermark = self
            .tables
            .iter()
            .filter_map(|(_, p)| p.watermark.clone())
            .min_by(|a, b| a.cmp_pos(b));
        self.last_snapshot = Some(pass_snapshot);
        Ok(out)
    }
}

/// What `follow_schema` found: per table, the shape to record once the events are durable,
/// and the newest ALTER recorded in `cdc_alters` (removed then).
struct Followed {
    shapes: Vec<Option<Shape>>,
    max_alter: Vec<Option<i64>>,
}

/// An ALTER the event trigger recorded in `cdc_alters`: the table (`schema.table`), the
/// record's id, its time (µs) and the columns after it (JSON).
struct Alter {
    table: String,
    id: i64,
    at_us: i64,
    columns: String,
}

/// Describes again each table whose catalog changed and, when its shape differs from the one
/// the change log last described, writes a schema event dated at the ALTER the event trigger
/// recorded, or earlier when this pass reads a change older than it (which it reads in the
/// new shape), never before the watermark less 1 µs (after every row an earlier pass read);
/// see `alter_time`. Returns the shapes to record once the events are durable.
#[allow(clippy::too_many_arguments)]
async fn follow_schema(
    tx: &tokio_postgres::Transaction<'_>,
    alters_recorded: bool,
    selection: &TableSelection,
    watch: &mut super::schema::Watch,
    tables: &mut [(TableSpec, Progress)],
    captured_ms: i64,
    sink: &mut dyn ChangeSink,
    out: &mut PassOutcome,
) -> Result<Followed> {
    let specs: Vec<TableSpec> = tables.iter().map(|(s, _)| s.clone()).collect();
    let changed = watch.changed(tx, selection, &specs).await?;
    let mut shapes = vec![None; tables.len()];
    // The ALTERs the event trigger recorded (committed before this pass's locks), in time order.
    let mut alters: Vec<Alter> = Vec::new();
    if alters_recorded {
        for r in tx
            .query(
                "SELECT table_schema || '.' || table_name, alter_id,
                        (extract(epoch FROM altered_at) * 1000000)::int8, columns::text
                 FROM public.cdc_alters WHERE table_schema || '.' || table_name = ANY($1)
                 ORDER BY altered_at, alter_id",
                &[&specs.iter().map(|s| s.qualified()).collect::<Vec<_>>()],
            )
            .await
            .map_err(ctx("reading the ALTERs recorded in cdc_alters"))?
        {
            alters.push(Alter {
                table: r.get(0),
                id: r.get(1),
                at_us: r.get(2),
                columns: r.get(3),
            });
        }
    }
    let max_alter: Vec<Option<i64>> = tables
        .iter()
        .map(|(s, _)| {
            let q = s.qualified();
            alters.iter().filter(|a| a.table == q).map(|a| a.id).max()
        })
        .collect();
    for (i, ((spec, progress), now)) in tables.iter_mut().zip(changed).enumerate() {
        let Some(mut now) = now else {
            continue;
        };
        if let Some(w) = &progress.watermark {
            let written = progress.shapes.get(&now.qualified());
            super::schema::settle_existing(tx, &mut now, written, Some(w.ts_us)).await?;
        }
        let shape = shape_of(&now);
        let written = progress.shapes.get(&now.qualified());
        match (written, &progress.watermark) {
            (Some(written), Some(w)) => {
                if let Some(ev) = super::schema::event(written, &now) {
                    let cols = ImageColumns::load(tx, &now).await?;
                    let at = alter_time(tx, &now, written, w, &alters).await?;
                    let h = row_header(
                        &cols,
                        Op::Schema,
                        CaptureMode::Timestamp,
                        false,
                        at,
                        "",
                        captured_ms,
                    );
                    let mut b = Vec::with_capacity(1024);
                    write_schema(&mut b, &now, &h, &ev);
                    sink.write(&b, &now, Op::Schema, false)?;
                    out.schema_changes += ev.changes.len() as u64;
                    tracing::info!(table = %now.qualified(), changes = %ev.changes.iter().map(|c| c.to_string()).collect::<Vec<_>>().join("; "), "schema change captured");
                }
                if *written != shape {
                    shapes[i] = Some(shape);
                }
            }
            // The first pass (the snapshot reads the rows in the shape they have), or a
            // progress file from before shapes were recorded: the source's shape is the
            // baseline.
            (written, _) => {
                if written != Some(&shape) {
                    shapes[i] = Some(shape);
                }
            }
        }
        *spec = now;
    }
    Ok(Followed { shapes, max_alter })
}

/// When a schema change the pass found (from `written` to `now`'s shape) is dated: at the
/// first ALTER the event trigger recorded that changed the shape, on the clock the change-time
/// column uses, unless a row, tombstone or truncation this pass reads (in the new shape) is
/// older than that ALTER: then just before the oldest of them, so that no event the pass
/// writes in the new shape precedes the change. Never before the watermark (less 1 µs), which
/// is where it is dated without a record (no event trigger).
async fn alter_time(
    tx: &tokio_postgres::Transaction<'_>,
    now: &TableSpec,
    written: &Shape,
    w: &Watermark,
    alters: &[Alter],
) -> Result<i64> {
    let q = now.qualified();
    let first_alter = alters
        .iter()
        .filter(|a| a.table == q)
        .find(|a| {
            serde_json::from_str::<Vec<super::schema::AlterColumn>>(&a.columns)
                .is_ok_and(|cols| super::schema::event_from_record(written, now, &cols).is_some())
        })
        .map(|a| a.at_us);
    let Some(t_alter) = first_alter else {
        return Ok(w.ts_us - 1);
    };
    let Some(ct) = &now.change_time_column else {
        return Ok(w.ts_us - 1);
    };
    let past = super::rows::past_watermark(now, "t", Some(w))?;
    let oldest: Option<i64> = tx
        .query_one(
            &format!(
                "SELECT (extract(epoch FROM least(
                     (SELECT min(t.{ct}) FROM {q} t WHERE {past}),
                     (SELECT min(deleted_at) FROM public.cdc_tombstones
                      WHERE table_schema = $1 AND table_name = $2 AND deleted_at >= $3),
                     (SELECT min((old_row ->> '{ct}')::timestamptz) FROM public.cdc_tombstones
                      WHERE table_schema = $1 AND table_name = $2 AND (old_row ->> '{ct}')::timestamptz >= $3),
                     (SELECT min(truncated_at) FROM public.cdc_truncations
                      WHERE table_schema = $1 AND table_name = $2 AND truncated_at >= $3)
                 )) * 1000000)::int8"
            ),
            &[
                &now.schema,
                &now.name,
                &DateTime::<Utc>::from_timestamp_micros(w.ts_us).unwrap_or_default(),
            ],
        )
        .await
        .map_err(ctx(format!(
            "reading the oldest change of {q} past the watermark"
        )))?
        .get(0);
    let at = oldest.map_or(t_alter, |o| t_alter.min(o - 1));
    Ok(at.max(w.ts_us - 1))
}

/// What a pass read of one table: the newest tombstone and truncation (what their removal may
/// go up to) and the position of the last row.
struct Found {
    max_tomb: Option<i64>,
    max_truncation: Option<i64>,
    last: Option<Watermark>,
}

/// One table's part of a pass, in the pass's snapshot: its truncations and tombstones (each
/// the deleted row's last state and the delete) in time order, then its rows past the
/// watermark.
async fn capture_table(
    tx: &tokio_postgres::Transaction<'_>,
    spec: &TableSpec,
    prev: Option<&Watermark>,
    captured_ms: i64,
    sink: &mut dyn ChangeSink,
    out: &mut PassOutcome,
) -> Result<Found> {
    let cols = ImageColumns::load(tx, spec).await?;
    let mut buf = Vec::with_capacity(1024);
    // 0. Truncations (a handful at most), each written in time order among the deletes: a
    //    truncate ends every version before it, and a row deleted after it was inserted after
    //    it (the TRUNCATE held the table's lock in between).
    let truncations: Vec<(i64, i64)> = tx
        .query(
            "SELECT truncation_id, (extract(epoch FROM truncated_at) * 1000000)::int8
             FROM public.cdc_truncations WHERE table_schema = $1 AND table_name = $2
             ORDER BY truncated_at, truncation_id",
            &[&spec.schema, &spec.name],
        )
        .await
        .map_err(ctx(format!("reading truncations of {}", spec.qualified())))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let max_truncation = truncations.iter().map(|t| t.0).max();
    let mut truncations = truncations.into_iter().peekable();
    let mut write_truncations_until = |until_us: Option<i64>, sink: &mut dyn ChangeSink| {
        while let Some(&(_, ts_us)) = truncations.peek() {
            if until_us.is_some_and(|u| ts_us > u) {
                break;
            }
            truncations.next();
            let mut b = Vec::with_capacity(256);
            let h = row_header(
                &cols,
                Op::Truncate,
                CaptureMode::Timestamp,
                false,
                ts_us,
                "",
                captured_ms,
            );
            write_truncate(&mut b, spec, &h);
            sink.write(&b, spec, Op::Truncate, false)?;
        }
        Ok::<(), Error>(())
    };
    // 1. Deletes, first: for one key a tombstone is always older than a row that exists.
    let sql = tombstone_copy_sql(spec, &cols, prev);
    let stream = tx
        .copy_out(sql.as_str())
        .await
        .map_err(ctx("reading tombstones"))?;
    let mut max_tomb = None;
    let what = format!("tombstones of {}", spec.qualified());
    let deletes = &mut out.deletes;
    copy_rows(stream, &what, |row| {
        // Read in delete-time order: the highest id is what the removal may go up to.
        let id = required_i64(row, 0, &what)?;
        max_tomb = Some(max_tomb.map_or(id, |m: i64| m.max(id)));
        let op = required_op(row, 3, &what)?;
        let written_by_deleter = required(row, 4, &what)? == "t";
        let values = image_values(row, 5);
        let key = cols.key(spec, &values, &what)?;
        let ts_us = required_i64(row, 1, &what)?;
        let deleted_us = required_i64(row, 2, &what)?;
        write_truncations_until(Some(deleted_us), sink)?;
        let mut h = row_header(
            &cols,
            op,
            CaptureMode::Timestamp,
            false,
            ts_us,
            &key,
            captured_ms,
        );
        // The deleted row's last state (a version this pass may not have seen), then the
        // delete. A state the deleting transaction wrote itself never committed: the delete
        // alone (it closes the key's committed version, if there is one).
        if !written_by_deleter {
            buf.clear();
            write_event(&mut buf, spec, &h, null, |b| {
                cols.write_image(b, Some(&values))
            });
            sink.write(&buf, spec, op, false)?;
        }
        (h.op, h.ts_us) = (Op::Delete, deleted_us);
        buf.clear();
        write_event(
            &mut buf,
            spec,
            &h,
            |b| cols.write_image(b, Some(&values)),
            null,
        );
        sink.write(&buf, spec, Op::Delete, true)?;
        *deletes += 1;
        Ok(())
    })
    .await?;
    write_truncations_until(None, sink)?;
    // 2. Rows changed since the watermark, in (change time, key) order: every row there is
    //    was written after the last truncation.
    let sql = rows_copy_sql(spec, &cols, prev)?;
    let stream = tx
        .copy_out(sql.as_str())
        .await
        .map_err(ctx(format!("reading changed rows of {}", spec.qualified())))?;
    let mut last: Option<Watermark> = None;
    let rows = read_rows(
        stream,
        spec,
        &cols,
        CaptureMode::Timestamp,
        prev.is_none(),
        captured_ms,
        sink,
        |ts_us, key| {
            last = Some(Watermark {
                ts_us,
                key: Some(key.to_owned()),
            });
        },
    )
    .await?;
    out.rows += rows;
    Ok(Found {
        max_tomb,
        max_truncation,
        last,
    })
}

/// Removes the captured tombstones and truncations (up to the newest read, those the pass's
/// snapshot shows), once the sink holds them durably.
async fn remove_captured(
    tx: &tokio_postgres::Transaction<'_>,
    spec: &TableSpec,
    found: &Found,
    _durable: &Durable,
) -> Result<()> {
    if let Some(max) = found.max_tomb {
        tx.execute(
            "DELETE FROM public.cdc_tombstones WHERE table_schema = $1 AND table_name = $2 AND tombstone_id <= $3",
            &[&spec.schema, &spec.name, &max],
        )
        .await
        .map_err(ctx("removing captured tombstones"))?;
    }
    if let Some(max) = found.max_truncation {
        tx.execute(
            "DELETE FROM public.cdc_truncations WHERE table_schema = $1 AND table_name = $2 AND truncation_id <= $3",
            &[&spec.schema, &spec.name, &max],
        )
        .await
        .map_err(ctx("removing captured truncations"))?;
    }
    Ok(())
}

/// Each tombstone gives two events: the deleted row's last state (a version the pass may not
/// have seen, at its change time) and the delete itself, at the delete time; a tombstone whose
/// state the deleting transaction wrote itself gives the delete alone. Columns: id, change
/// time (µs), delete time (µs), op of the last state, whether the deleter wrote that state,
/// the image columns. The
/// deleted row is read back from its text form (`old_text`, each value exact); a tombstone
/// left by an older trigger without it, or one of a row whose table has gained or lost columns
/// since, from its JSON copy (by name). (`OFFSET 0` keeps the row read
/// once: `(expr).*` alone would evaluate `expr` once for every column.)
fn tombstone_copy_sql(spec: &TableSpec, cols: &ImageColumns, prev: Option<&Watermark>) -> String {
    let r = "r";
    format!(
        "COPY (SELECT tb.tombstone_id, {ts}, {deleted}, {op}, tb.written_by_deleter, {list}
               FROM public.cdc_tombstones tb
               CROSS JOIN LATERAL (SELECT (s.v).* FROM (SELECT CASE
                                           WHEN tb.old_text IS NOT NULL AND
                                                (SELECT count(*) FROM jsonb_object_keys(tb.old_row)) = {width}
                                           THEN tb.old_text::{table}
                                           ELSE jsonb_populate_record(NULL::{table}, tb.old_row) END AS v
                                   OFFSET 0) s) {r}
               WHERE tb.table_schema = {schema} AND tb.table_name = {name}
               ORDER BY tb.deleted_at, tb.tombstone_id) TO STDOUT",
        ts = change_time_expr(spec, r),
        deleted = micros("tb.deleted_at"),
        op = op_expr(spec, r, prev),
        list = cols.select_list(r),
        table = spec.qualified(),
        schema = sql_literal(&spec.schema),
        name = sql_literal(&spec.name),
        width = format_args!(
            "(SELECT count(*) FROM pg_attribute WHERE attrelid = '{}'::regclass AND attnum > 0 AND NOT attisdropped)",
            spec.qualified()
        ),
    )
}
