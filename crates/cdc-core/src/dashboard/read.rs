//! What the dashboard reads: the change-log directory, the extractor's progress, the
//! warehouse (history tables, `cdc_applied_batches`, `pipeline_metadata`) and the source's
//! replication slot. SELECT only, in read-only transactions with a statement timeout, every
//! list bounded, every value bound as a parameter; table names come only from the configured
//! tables' descriptions.

use crate::catalog::logical_progress_name;
use crate::changelog::{self, DEAD_LETTER_DIR};
use crate::config::loader::LoaderConfig;
use crate::db::DbSettings;
use crate::error::{error_chain, Error, Result};
use crate::event::CaptureMode;
use crate::progress::Progress;
use crate::table::TableSpec;
use crate::waiting::WaitRecord;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use serde::Serialize;
use std::path::Path;
use std::time::Duration;
use tokio::sync::OnceCell;

/// Most pending or dead-lettered files listed; most runs that did something listed per
/// program.
const MAX_FILES: usize = 100;
const MAX_RUNS: i64 = 6;
/// Rows of `/api/history` and `/api/as-of`: the default and the most a request may ask for.
const DEFAULT_ROWS: i64 = 200;
const MAX_ROWS: i64 = 2000;
/// A reason file larger than this is not read (the extractor's are a few hundred bytes).
const MAX_REASON_BYTES: u64 = 64 * 1024;
/// How long one dashboard statement may run, and how long it waits for a connection.
const STATEMENT_TIMEOUT_MS: u32 = 5000;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The dashboard's connections and the configured tables (described from the source's
/// catalog once it answers, then kept).
pub(super) struct Reader {
    cfg: LoaderConfig,
    warehouse: Pool,
    source: Pool,
    specs: OnceCell<Vec<TableSpec>>,
}

/// A connection pool of the dashboard's own: its sessions are read-only by default and
/// stop a statement after `STATEMENT_TIMEOUT_MS`. It does not report to readiness (`health`):
/// that tells about the apply loop's connections.
fn pool(db: &DbSettings, size: usize) -> Result<Pool> {
    let mut config = db.pg_config();
    config
        .application_name("cdc-dashboard")
        .connect_timeout(CONNECT_TIMEOUT)
        .options(format!(
            "-c TimeZone=UTC -c DateStyle=ISO -c default_transaction_read_only=on \
             -c statement_timeout={STATEMENT_TIMEOUT_MS} -c idle_in_transaction_session_timeout=10000"
        ));
    let mgr = Manager::from_config(
        config,
        db.tls.connector(),
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(mgr)
        .max_size(size)
        .runtime(Runtime::Tokio1)
        .create_timeout(Some(CONNECT_TIMEOUT + Duration::from_secs(1)))
        .wait_timeout(Some(Duration::from_secs(10)))
        .recycle_timeout(Some(Duration::from_secs(2)))
        .build()
        .map_err(|e| Error::setup("the dashboard's connection pool", e.to_string()))
}

/// An API failure: its HTTP status and a message (an error chain: never a password).
#[derive(Debug)]
pub(super) struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn bad_request(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let status = match &e {
            // The value of a parameter the column's type refuses (a key that is not a number).
            Error::Db { source, .. }
                if source.code().is_some_and(|c| c.code().starts_with("22")) =>
            {
                StatusCode::BAD_REQUEST
            }
            Error::Pool { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Error::Db { source, .. } if source.is_closed() || source.code().is_none() => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError {
            status,
            message: error_chain(&e),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(serde_json::json!({ "error": self.message })),
        )
            .into_response()
    }
}

/// Whether a database answered the dashboard's last look.
#[derive(Debug, Serialize)]
pub(super) struct Reach {
    /// `host:port/dbname` (no user, no password).
    address: String,
    reachable: bool,
    error: Option<String>,
}

#[derive(Debug, Serialize, Default)]
pub(super) struct TableStatus {
    /// `schema.table` in the source.
    table: String,
    /// `schema.table` of its history.
    history: String,
    key_columns: Vec<String>,
    history_key_columns: Vec<String>,
    versions: Option<i64>,
    current_rows: Option<i64>,
    deletes: Option<i64>,
    /// The newest `valid_from` (a change time of the source).
    newest_change: Option<DateTime<Utc>>,
    /// When the warehouse last wrote a version of it.
    last_written: Option<DateTime<Utc>>,
    /// Timestamp mode: the age of the table's watermark.
    capture_lag_seconds: Option<f64>,
    /// The age of the oldest change-log file waiting to be applied (0 when none waits).
    apply_lag_seconds: Option<f64>,
    error: Option<String>,
}

#[derive(Debug, Serialize)]
pub(super) struct SlotStatus {
    name: String,
    /// `ok`, `missing` (no such slot: timestamp mode, or not created yet), `unknown` (the
    /// source is unreachable).
    state: &'static str,
    retained_wal_bytes: Option<i64>,
    unconfirmed_wal_bytes: Option<i64>,
    active: Option<bool>,
    error: Option<String>,
}

#[derive(Debug, Serialize)]
pub(super) struct Capture {
    /// `timestamp`, `logical`, or `unknown` (no progress yet, or the tables not described).
    mode: &'static str,
    /// The largest table capture lag (timestamp mode).
    lag_seconds: Option<f64>,
    slot: SlotStatus,
}

#[derive(Debug, Serialize)]
pub(super) struct PendingFile {
    name: String,
    bytes: u64,
    age_seconds: Option<f64>,
}

#[derive(Debug, Serialize)]
pub(super) struct DeadLetter {
    name: String,
    /// From `<name>.reason.json`.
    line: Option<u64>,
    reason: Option<String>,
    quarantined_at: Option<String>,
}

#[derive(Debug, Serialize, Default)]
pub(super) struct Apply {
    log_dir: String,
    lag_seconds: Option<f64>,
    pending_count: usize,
    /// The oldest `MAX_FILES` pending files, in apply order.
    pending: Vec<PendingFile>,
    dead_letter_count: usize,
    /// The newest `MAX_FILES` dead-lettered files, newest first.
    dead_letter: Vec<DeadLetter>,
    error: Option<String>,
}

#[derive(Debug, Serialize)]
pub(super) struct Run {
    program: String,
    status: String,
    start_time: DateTime<Utc>,
    end_time: Option<DateTime<Utc>>,
    records_processed: i64,
    records_inserted: i64,
    records_updated: i64,
    records_deleted: i64,
    error_message: Option<String>,
}

/// One minute of the last hour.
#[derive(Debug, Serialize)]
pub(super) struct Minute {
    t: DateTime<Utc>,
    /// Change-log files applied, their events, versions inserted and closed.
    files: i64,
    events: i64,
    versions_inserted: i64,
    versions_closed: i64,
    /// Events the extractor captured (its passes that ended in this minute).
    captured: i64,
    /// Bounds of the delay from source change to apply of the changes applied in this
    /// minute: per file, applied time minus its newest (min) and oldest (max) change.
    min_delay_seconds: Option<f64>,
    max_delay_seconds: Option<f64>,
}

#[derive(Debug, Serialize)]
pub(super) struct Status {
    generated_at: DateTime<Utc>,
    pipeline: String,
    /// `/readyz` of this loader.
    ready: bool,
    readiness: String,
    warehouse: Reach,
    source: Reach,
    /// Outages a program of the pipeline is waiting out.
    outages: Vec<WaitRecord>,
    tables: Vec<TableStatus>,
    tables_error: Option<String>,
    capture: Capture,
    apply: Apply,
    runs: Vec<Run>,
    /// The last hour, a point per minute with applies or captures.
    minutes: Vec<Minute>,
}

/// Versions of one key, or a table as of a time.
#[derive(Debug, Serialize)]
pub(super) struct Rows {
    table: String,
    history: String,
    key: Option<String>,
    at: Option<DateTime<Utc>>,
    /// The history's columns, in the order of each row's `values`.
    columns: Vec<String>,
    /// How many of the first columns are the key.
    key_columns: usize,
    rows: Vec<RowOut>,
    limit: i64,
    /// More rows matched than `limit`.
    truncated: bool,
}

#[derive(Debug, Serialize)]
pub(super) struct RowOut {
    /// The key as the API takes it.
    key: String,
    valid_from: DateTime<Utc>,
    valid_to: Option<DateTime<Utc>>,
    is_current: bool,
    is_deleted: bool,
    /// Ended by a TRUNCATE of the table (also `is_deleted`).
    is_truncated: bool,
    /// Each column's text as PostgreSQL prints it (`NULL`: null).
    values: Vec<Option<String>>,
}

impl Reader {
    pub(super) fn new(cfg: &LoaderConfig) -> Result<Self> {
        Ok(Reader {
            cfg: cfg.clone(),
            warehouse: pool(&cfg.warehouse, 2)?,
            source: pool(&cfg.source, 1)?,
            specs: OnceCell::new(),
        })
    }

    async fn warehouse(&self) -> Result<Object> {
        self.warehouse.get().await.map_err(|source| Error::Pool {
            context: format!(
                "reaching the warehouse database at {}",
                self.cfg.warehouse.display()
            ),
            source,
        })
    }

    async fn source(&self) -> Result<Object> {
        self.source.get().await.map_err(|source| Error::Pool {
            context: format!(
                "reaching the source database at {}",
                self.cfg.source.display()
            ),
            source,
        })
    }

    /// The configured tables, described by the source's catalog (once).
    async fn specs(&self, source: Option<&Object>) -> Result<&[TableSpec]> {
        if let Some(specs) = self.specs.get() {
            return Ok(specs);
        }
        let Some(client) = source else {
            return Err(Error::setup(
                "the configured tables",
                format!(
                    "not described yet: the source database at {} is unreachable",
                    self.cfg.source.display()
                ),
            ));
        };
        let client: &tokio_postgres::Client = client;
        let specs = self
            .specs
            .get_or_try_init(|| self.cfg.tables.describe(client))
            .await?;
        Ok(specs)
    }

    async fn spec(&self, table: &str) -> Result<TableSpec, ApiError> {
        let source = match self.specs.get() {
            Some(_) => None,
            None => Some(self.source().await?),
        };
        let specs = self.specs(source.as_ref()).await?;
        specs
            .iter()
            .find(|s| s.qualified() == table || s.history_qualified() == table)
            .cloned()
            .ok_or_else(|| ApiError {
                status: StatusCode::NOT_FOUND,
                message: format!(
                    "table {table:?} is not one of the configured tables ({})",
                    specs
                        .iter()
                        .map(|s| s.qualified())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })
    }

    /// Everything the page shows but the history browser. Never fails: what cannot be read
    /// is reported in its place.
    pub(super) async fn status(&self) -> Status {
        let now = Utc::now();
        let (warehouse, source) = tokio::join!(self.warehouse(), self.source());
        let reach = |db: &DbSettings, r: &Result<Object>| Reach {
            address: db.display(),
            reachable: r.is_ok(),
            error: r.as_ref().err().map(|e| error_chain(e)),
        };
        let warehouse_reach = reach(&self.cfg.warehouse, &warehouse);
        let source_reach = reach(&self.cfg.source, &source);
        let source = source.ok();
        let specs = self.specs(source.as_ref()).await;
        let apply = self.files(now);
        let (mode, progress_lags) = match &specs {
            Ok(specs) => self.capture_progress(specs, now),
            Err(_) => ("unknown", Vec::new()),
        };
        let slot = self.slot(source.as_ref()).await;
        let mut tables: Vec<TableStatus> = match &specs {
            Ok(specs) => specs
                .iter()
                .zip(progress_lags.iter().chain(std::iter::repeat(&None)))
                .map(|(s, lag)| TableStatus {
                    table: s.qualified(),
                    history: s.history_qualified(),
                    key_columns: s.key.iter().map(|k| k.name.clone()).collect(),
                    history_key_columns: s.history_key_columns.clone(),
                    capture_lag_seconds: *lag,
                    apply_lag_seconds: apply.lag_seconds,
                    ..TableStatus::default()
                })
                .collect(),
            Err(_) => Vec::new(),
        };
        let mut runs = Vec::new();
        let mut minutes = Vec::new();
        if let Ok(mut w) = warehouse {
            if let Err(e) = self
                .warehouse_figures(&mut w, &mut tables, &mut runs, &mut minutes)
                .await
            {
                let e = error_chain(&e);
                for t in tables.iter_mut().filter(|t| t.versions.is_none()) {
                    t.error.get_or_insert_with(|| e.clone());
                }
            }
        }
        let (ready, readiness) = match crate::health::readiness() {
            Ok(()) => (true, "ready".to_owned()),
            Err(why) => (false, format!("not ready: {why}")),
        };
        Status {
            generated_at: now,
            pipeline: self.cfg.tables.pipeline_name.clone(),
            ready,
            readiness,
            warehouse: warehouse_reach,
            source: source_reach,
            outages: crate::waiting::current(&self.cfg.state_dir),
            tables_error: specs.as_ref().err().map(|e| error_chain(e)),
            capture: Capture {
                mode,
                lag_seconds: progress_lags.iter().flatten().copied().reduce(f64::max),
                slot,
            },
            tables,
            apply,
            runs,
            minutes,
        }
    }

    /// The capture mode and, in timestamp mode, each table's watermark age (in `specs`'
    /// order).
    fn capture_progress(
        &self,
        specs: &[TableSpec],
        now: DateTime<Utc>,
    ) -> (&'static str, Vec<Option<f64>>) {
        let dir = &self.cfg.state_dir;
        let logical = logical_progress_name(specs, &self.cfg.tables.pipeline_name);
        if let Ok(Some(p)) = Progress::peek(dir, &logical) {
            if p.capture_mode == CaptureMode::Logical {
                // One slot for every table: the age of the newest commit captured.
                let lag = p
                    .logical
                    .and_then(|l| l.captured_through_us)
                    .and_then(DateTime::<Utc>::from_timestamp_micros)
                    .map(|t| secs(now - t).max(0.0));
                return ("logical", vec![lag; specs.len()]);
            }
        }
        let mut any = false;
        let lags = specs
            .iter()
            .map(|s| match Progress::peek(dir, &s.qualified()) {
                Ok(Some(p)) => {
                    any = true;
                    // A pass that ended after `now` may have a watermark past it: no lag.
                    p.watermark.and_then(|w| {
                        DateTime::<Utc>::from_timestamp_micros(w.ts_us)
                            .map(|t| secs(now - t).max(0.0))
                    })
                }
                _ => None,
            })
            .collect();
        (if any { "timestamp" } else { "unknown" }, lags)
    }

    /// The replication slot's WAL, from the source.
    async fn slot(&self, source: Option<&Object>) -> SlotStatus {
        let mut s = SlotStatus {
            name: self.cfg.slot_name.clone(),
            state: "unknown",
            retained_wal_bytes: None,
            unconfirmed_wal_bytes: None,
            active: None,
            error: None,
        };
        let Some(client) = source else {
            s.error = Some("the source database is unreachable".into());
            return s;
        };
        match crate::slot::lag(client, &self.cfg.slot_name).await {
            Ok(Some(lag)) => {
                s.state = "ok";
                s.retained_wal_bytes = Some(lag.retained_wal_bytes);
                s.unconfirmed_wal_bytes = Some(lag.confirmed_lag_bytes);
                s.active = Some(lag.active);
            }
            Ok(None) => s.state = "missing",
            Err(e) => s.error = Some(error_chain(&e)),
        }
        s
    }

    /// Pending and dead-lettered files, and the apply lag.
    fn files(&self, now: DateTime<Utc>) -> Apply {
        let dir = &self.cfg.log_dir;
        let mut out = Apply {
            log_dir: dir.display().to_string(),
            ..Apply::default()
        };
        let age = |p: &Path| {
            std::fs::metadata(p)
                .and_then(|m| m.modified())
                .ok()
                .map(|t| secs(now - DateTime::<Utc>::from(t)))
                .map(|s| s.max(0.0))
        };
        match changelog::pending_files(dir) {
            Ok(pending) => {
                out.pending_count = pending.len();
                out.lag_seconds = Some(pending.first().and_then(|p| age(p)).unwrap_or(0.0));
                out.pending = pending
                    .iter()
                    .take(MAX_FILES)
                    .map(|p| PendingFile {
                        name: changelog::file_name(p),
                        bytes: std::fs::metadata(p).map(|m| m.len()).unwrap_or(0),
                        age_seconds: age(p),
                    })
                    .collect();
            }
            Err(e) => out.error = Some(error_chain(&e)),
        }
        let dead_dir = dir.join(DEAD_LETTER_DIR);
        let mut dead: Vec<String> = std::fs::read_dir(&dead_dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.ends_with(".jsonl"))
                    .collect()
            })
            .unwrap_or_default();
        dead.sort();
        out.dead_letter_count = dead.len();
        out.dead_letter = dead
            .iter()
            .rev()
            .take(MAX_FILES)
            .map(|name| dead_letter(&dead_dir, name))
            .collect();
        out
    }

    /// Counts of each history table, the last runs, and the last hour by minute.
    async fn warehouse_figures(
        &self,
        client: &mut Object,
        tables: &mut [TableStatus],
        runs: &mut Vec<Run>,
        minutes: &mut Vec<Minute>,
    ) -> Result<()> {
        let tx = read_only(client).await?;
        for t in tables.iter_mut() {
            let exists: bool = tx
                .query_one("SELECT to_regclass($1) IS NOT NULL", &[&t.history])
                .await
                .map_err(ctx("looking for a history table"))?
                .get(0);
            if !exists {
                t.error = Some(format!(
                    "{} does not exist yet (the loader creates it at start-up)",
                    t.history
                ));
                continue;
            }
            // One scan; `history` is a configured table's history, never a request's text.
            let r = tx
                .query_one(
                    &format!(
                        "SELECT count(*), count(*) FILTER (WHERE is_current),
                                count(*) FILTER (WHERE is_deleted), max(valid_from), max(created_at)
                         FROM {}",
                        t.history
                    ),
                    &[],
                )
                .await
                .map_err(ctx(format!("counting the versions of {}", t.history)))?;
            t.versions = Some(r.get(0));
            t.current_rows = Some(r.get(1));
            t.deletes = Some(r.get(2));
            t.newest_change = r.get(3);
            t.last_written = r.get(4);
        }
        let have: (bool, bool) = {
            let r = tx
                .query_one(
                    "SELECT to_regclass('public.pipeline_metadata') IS NOT NULL,
                            to_regclass('public.cdc_applied_batches') IS NOT NULL",
                    &[],
                )
                .await
                .map_err(ctx("looking for the pipeline's tables"))?;
            (r.get(0), r.get(1))
        };
        if have.0 {
            for program in [
                crate::capture::PIPELINE_NAME,
                crate::scd2::loader::PIPELINE_NAME,
            ] {
                // The newest run, and the last that did something or failed (an idle loop
                // records a pass every few seconds).
                let rows = tx
                    .query(
                        "(SELECT id, status, start_time, end_time, records_processed, records_inserted,
                                 records_updated, records_deleted, error_message
                          FROM public.pipeline_metadata WHERE pipeline_name = $1
                          ORDER BY start_time DESC LIMIT 1)
                         UNION
                         (SELECT id, status, start_time, end_time, records_processed, records_inserted,
                                 records_updated, records_deleted, error_message
                          FROM public.pipeline_metadata
                          WHERE pipeline_name = $1 AND start_time >= now() - interval '1 day'
                            AND (records_processed > 0 OR status <> 'success')
                          ORDER BY start_time DESC LIMIT $2)
                         ORDER BY start_time DESC",
                        &[&program, &MAX_RUNS],
                    )
                    .await
                    .map_err(ctx("reading pipeline_metadata"))?;
                runs.extend(rows.iter().map(|r| Run {
                    program: program.to_owned(),
                    status: r.get(1),
                    start_time: r.get(2),
                    end_time: r.get(3),
                    records_processed: r.get(4),
                    records_inserted: r.get(5),
                    records_updated: r.get(6),
                    records_deleted: r.get(7),
                    error_message: r.get(8),
                }));
            }
        }
        if have.0 && have.1 {
            // Both tables are read by their time indexes; at most 61 minutes come back.
            let rows = tx
                .query(
                    "WITH applied AS (
                         SELECT date_trunc('minute', applied_at) AS t, count(*)::int8 AS files,
                                sum(events)::int8 AS events, sum(versions_inserted)::int8 AS inserted,
                                sum(versions_closed)::int8 AS closed,
                                min(extract(epoch FROM applied_at - last_change_at))::float8 AS min_delay,
                                max(extract(epoch FROM applied_at - first_change_at))::float8 AS max_delay
                         FROM public.cdc_applied_batches
                         WHERE applied_at >= now() - interval '1 hour'
                         GROUP BY 1),
                     captured AS (
                         SELECT date_trunc('minute', start_time) AS t, sum(records_processed)::int8 AS captured
                         FROM public.pipeline_metadata
                         WHERE pipeline_name = $1 AND start_time >= now() - interval '1 hour'
                           AND status = 'success'
                         GROUP BY 1)
                     SELECT t, coalesce(files, 0), coalesce(events, 0), coalesce(inserted, 0),
                            coalesce(closed, 0), coalesce(captured, 0), min_delay, max_delay
                     FROM applied FULL JOIN captured USING (t)
                     ORDER BY t",
                    &[&crate::capture::PIPELINE_NAME],
                )
                .await
                .map_err(ctx("summarizing the last hour"))?;
            minutes.extend(rows.iter().map(|r| Minute {
                t: r.get(0),
                files: r.get(1),
                events: r.get(2),
                versions_inserted: r.get(3),
                versions_closed: r.get(4),
                captured: r.get(5),
                min_delay_seconds: r.get(6),
                max_delay_seconds: r.get(7),
            }));
        }
        tx.rollback()
            .await
            .map_err(ctx("ending a dashboard read"))?;
        Ok(())
    }

    /// Every version of one key, oldest first.
    pub(super) async fn history(
        &self,
        table: &str,
        key: &str,
        limit: Option<i64>,
    ) -> Result<Rows, ApiError> {
        let spec = self.spec(table).await?;
        let parts = spec.key_parts(key).map_err(ApiError::bad_request)?;
        let limit = rows_limit(limit)?;
        let matched = spec
            .key
            .iter()
            .zip(&spec.history_key_columns)
            .enumerate()
            .map(|(j, (k, h))| format!("x.{h} = CAST(${}::text AS {})", j + 1, k.sql_type))
            .collect::<Vec<_>>()
            .join(" AND ");
        let (columns, select) = select_list(&spec);
        let sql = format!(
            "SELECT {select} FROM {h} x WHERE {matched}
             ORDER BY x.valid_from, x.surrogate_key LIMIT ${n}",
            h = spec.history_qualified(),
            n = parts.len() + 1,
        );
        let fetch = limit + 1;
        let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = parts
            .iter()
            .map(|p| p as &(dyn tokio_postgres::types::ToSql + Sync))
            .collect();
        params.push(&fetch);
        let mut client = self.warehouse().await?;
        let tx = read_only(&mut client).await?;
        let rows = tx.query(&sql, &params).await.map_err(ctx(format!(
            "reading the history of a key of {}",
            spec.qualified()
        )))?;
        tx.rollback()
            .await
            .map_err(ctx("ending a dashboard read"))?;
        Ok(rows_out(
            &spec,
            columns,
            Some(key.to_owned()),
            None,
            limit,
            &rows,
        ))
    }

    /// The table as it was at `at`: the versions valid then, by key.
    pub(super) async fn as_of(
        &self,
        table: &str,
        at: &str,
        limit: Option<i64>,
    ) -> Result<Rows, ApiError> {
        let spec = self.spec(table).await?;
        let at = DateTime::parse_from_rfc3339(at)
            .map_err(|e| {
                ApiError::bad_request(format!(
                    "at={at:?} is not an RFC 3339 time such as 2026-11-24T10:02:17Z: {e}"
                ))
            })?
            .with_timezone(&Utc);
        let limit = rows_limit(limit)?;
        let (columns, select) = select_list(&spec);
        let sql = format!(
            "SELECT {select} FROM {h} x
             WHERE x.valid_from <= $1 AND (x.valid_to IS NULL OR x.valid_to > $1)
             ORDER BY {k} LIMIT $2",
            h = spec.history_qualified(),
            k = spec.history_key_list("x"),
        );
        let fetch = limit + 1;
        let mut client = self.warehouse().await?;
        let tx = read_only(&mut client).await?;
        let rows = tx
            .query(&sql, &[&at, &fetch])
            .await
            .map_err(ctx(format!("reading {} as of a time", spec.qualified())))?;
        tx.rollback()
            .await
            .map_err(ctx("ending a dashboard read"))?;
        Ok(rows_out(&spec, columns, None, Some(at), limit, &rows))
    }
}

/// A read-only transaction (the sessions are read-only by default too).
async fn read_only(client: &mut Object) -> Result<deadpool_postgres::Transaction<'_>> {
    client
        .build_transaction()
        .read_only(true)
        .start()
        .await
        .map_err(ctx("starting a read-only transaction"))
}

fn ctx(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> Error {
    crate::db::ctx(context)
}

fn rows_limit(limit: Option<i64>) -> Result<i64, ApiError> {
    match limit {
        None => Ok(DEFAULT_ROWS),
        Some(n) if (1..=MAX_ROWS).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::bad_request(format!(
            "limit={n}: must be 1 to {MAX_ROWS}"
        ))),
    }
}

/// The history columns shown (the key first), and the SELECT list: each as its text, then
/// the validity columns typed.
fn select_list(spec: &TableSpec) -> (Vec<String>, String) {
    let columns: Vec<String> = spec
        .history_key_columns
        .iter()
        .cloned()
        .chain(spec.columns.iter().map(|c| spec.history_column(c)))
        // The pipeline's own columns (the one list of them, so that a new one shows up here
        // too), validity first and the surrogate key last: the page takes the columns
        // before `valid_from` as the tracked ones.
        .chain(
            crate::table::RESERVED_HISTORY_COLUMNS
                .iter()
                .filter(|c| {
                    !matches!(
                        **c,
                        "surrogate_key" | "row_hash" | "created_at" | "updated_at"
                    )
                })
                .chain(std::iter::once(&"surrogate_key"))
                .map(|c| c.to_string()),
        )
        .collect();
    let select = columns
        .iter()
        .map(|c| format!("x.{c}::text"))
        .chain(
            [
                "valid_from",
                "valid_to",
                "is_current",
                "is_deleted",
                "is_truncated",
            ]
            .iter()
            .map(|c| format!("x.{c}")),
        )
        .collect::<Vec<_>>()
        .join(", ");
    (columns, select)
}

fn rows_out(
    spec: &TableSpec,
    columns: Vec<String>,
    key: Option<String>,
    at: Option<DateTime<Utc>>,
    limit: i64,
    rows: &[tokio_postgres::Row],
) -> Rows {
    let n = columns.len();
    let k = spec.key.len();
    let truncated = rows.len() as i64 > limit;
    let rows = rows
        .iter()
        .take(limit as usize)
        .map(|r| {
            let values: Vec<Option<String>> = (0..n).map(|i| r.get(i)).collect();
            let parts: Vec<&str> = values[..k]
                .iter()
                .map(|v| v.as_deref().unwrap_or_default())
                .collect();
            RowOut {
                key: spec.encode_key(&parts),
                valid_from: r.get(n),
                valid_to: r.get(n + 1),
                is_current: r.get(n + 2),
                is_deleted: r.get(n + 3),
                is_truncated: r.get(n + 4),
                values,
            }
        })
        .collect();
    Rows {
        table: spec.qualified(),
        history: spec.history_qualified(),
        key,
        at,
        columns,
        key_columns: k,
        rows,
        limit,
        truncated,
    }
}

/// A dead-lettered file and its reason (`<name>.reason.json`), as far as it can be read.
fn dead_letter(dir: &Path, name: &str) -> DeadLetter {
    let mut d = DeadLetter {
        name: name.to_owned(),
        line: None,
        reason: None,
        quarantined_at: None,
    };
    let path = dir.join(format!("{name}.reason.json"));
    let small = std::fs::metadata(&path).is_ok_and(|m| m.len() <= MAX_REASON_BYTES);
    let parsed = small
        .then(|| std::fs::read(&path).ok())
        .flatten()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
    match parsed {
        Some(v) => {
            d.line = v.get("line").and_then(|l| l.as_u64());
            d.reason = v.get("error").and_then(|e| e.as_str()).map(String::from);
            d.quarantined_at = v
                .get("quarantined_at")
                .and_then(|e| e.as_str())
                .map(String::from);
        }
        None => d.reason = Some(format!("no readable {name}.reason.json beside it")),
    }
    d
}

fn secs(d: chrono::Duration) -> f64 {
    d.num_milliseconds() as f64 / 1000.0
}
