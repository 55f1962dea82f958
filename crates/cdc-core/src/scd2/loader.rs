//! The loader's loop: find pending change-log files, apply them in capture order (several
//! in one transaction when there is a backlog), archive them, quarantine what cannot be
//! applied, retry what failed for a transient reason.

use super::apply::{apply_files, ApplyStats, Applying, Held};
use super::store::{HistorySql, PgHistory};
use super::wake::{NewFiles, UNWATCHED_POLL, WATCHED_POLL};
use crate::catalog::stream_name;
use crate::changelog::{self, batch_name, file_name};
use crate::config::loader::LoaderConfig;
use crate::db::{self, ctx, Backoff, DbRole};
use crate::error::{error_chain, Error, Result};
use crate::metadata::{self, RunCounts, RunRecord, RunStatus};
use crate::migrate;
use crate::ownership::{check_log_dir, LogDirOwner, ProcessLock};
use crate::shutdown::Shutdown;
use crate::table::TableSpec;
use crate::waiting::Waiting;
use crate::{health, metrics};
use chrono::Utc;
use std::path::PathBuf;
use std::time::Instant;
use tokio_postgres::Client;
use tracing::Instrument;

pub const PIPELINE_NAME: &str = "scd2_loader";

/// Totals of one `run`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoaderTotals {
    pub applied: ApplyStats,
    pub skipped_already_applied: usize,
    pub quarantined: usize,
}

/// A warehouse connection ready to apply: schema migrated, and each history table's
/// advisory lock held so that two loaders never apply to the same table at once.
pub struct Applier {
    client: Client,
    sqls: Vec<HistorySql>,
    how: Applying,
    /// The history tables, comma separated (for records and logs).
    histories: String,
    /// The source's enums and domains the tables use (their warehouse copies follow the
    /// source's when a value is refused: `follow_types`).
    types: Vec<crate::table::TypeDef>,
    /// Whether `cdc_pending_deletes` may hold deletes to forget (see `forget_pending_deletes`).
    forget_due: bool,
}

impl Applier {
    /// Connects within `DB_CONNECT_RETRY_SECONDS`, or, given `waiting` (a looping loader),
    /// waits for the warehouse for as long as it takes.
    pub async fn connect(
        cfg: &LoaderConfig,
        specs: &[TableSpec],
        shutdown: &Shutdown,
        waiting: Option<&mut Waiting>,
    ) -> Result<Self> {
        let Some(waiting) = waiting else {
            let client = db::connect(&cfg.warehouse, shutdown).await?;
            return Self::prepare(client, cfg, specs).await;
        };
        let mut backoff = Backoff::default();
        loop {
            let client = db::connect_patiently(&cfg.warehouse, shutdown, waiting).await?;
            match Self::prepare(client, cfg, specs).await {
                Ok(applier) => {
                    waiting.resolved();
                    return Ok(applier);
                }
                Err(e) if e.is_retryable() => {
                    waiting.fault(&e);
                    if shutdown.sleep(backoff.next_delay()).await {
                        return Err(Error::Shutdown);
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Migrates the schema and takes the tables' locks.
    async fn prepare(mut client: Client, cfg: &LoaderConfig, specs: &[TableSpec]) -> Result<Self> {
        let source_specs = specs;
        let mut histories = Vec::with_capacity(specs.len());
        for spec in specs {
            migrate::refuse_lost_history(&client, spec).await?;
            histories.push(migrate::migrate(&mut client, spec).await?);
            let locked: bool = client
                .query_one(
                    "SELECT pg_try_advisory_lock(hashtext('cdc_loader:' || $1::text))",
                    &[&spec.history_qualified()],
                )
                .await
                .map_err(ctx("taking the loader lock"))?
                .get(0);
            if !locked {
                return Err(Error::setup(
                    format!("history table {}", spec.history_qualified()),
                    "another scd2-loader is applying to it; stop that one first",
                ));
            }
        }
        let specs = &histories;
        let held = held_tables(&client, specs).await?;
        Ok(Applier {
            client,
            sqls: specs.iter().map(HistorySql::new).collect(),
            how: Applying::new(specs, cfg.max_events_in_memory).holding(held),
            histories: specs
                .iter()
                .map(|s| s.history_qualified())
                .collect::<Vec<_>>()
                .join(", "),
            types: source_specs
                .iter()
                .flat_map(|s| s.types.iter().cloned())
                .fold(Vec::new(), |mut all, t| {
                    if !all.contains(&t) {
                        all.push(t);
                    }
                    all
                }),
            forget_due: true,
        })
    }

    /// Forgets the remembered deletes of keys the history held nothing of, once no file can
    /// bring those keys' earlier versions any more: such a file is quarantined or waiting to
    /// be applied (a delete is only remembered when the key's earlier events were not applied
    /// before it), so with `dead_letter/` and the change-log directory both empty of
    /// change-log files, nothing can end a version at them. Without this the table grows by
    /// one row for every row inserted and deleted in one transaction, and each batch that
    /// remembers one reads them all. `dead_letter/` is
    /// listed first: a file moved back between the two listings is seen in the second. A held
    /// table keeps its deletes (its later files are replayed). Returns how many were forgotten.
    async fn forget_pending_deletes(&mut self, cfg: &LoaderConfig) -> Result<u64> {
        if !self.forget_due {
            return Ok(0);
        }
        let quarantined = changelog::pending_files(&cfg.log_dir.join(changelog::DEAD_LETTER_DIR))?;
        if !quarantined.is_empty() || !changelog::pending_files(&cfg.log_dir)?.is_empty() {
            return Ok(0);
        }
        let held: Vec<usize> = self.how.held().map(|(t, _, _)| t).collect();
        let tables: Vec<String> = (0..self.sqls.len())
            .filter(|t| !held.contains(t))
            .map(|t| self.how.spec(t).history_qualified())
            .collect();
        let n = self
            .client
            .execute(
                "DELETE FROM public.cdc_pending_deletes WHERE history_table = ANY($1)",
                &[&tables],
            )
            .await
            .map_err(ctx("forgetting remembered deletes in cdc_pending_deletes"))?;
        self.forget_due = false;
        if n > 0 {
            tracing::debug!(
                forgotten = n,
                "remembered deletes no file can end a version at any more"
            );
        }
        Ok(n)
    }

    /// Which of `names` are already recorded as applied.
    async fn already_applied(&self, names: &[String]) -> Result<Vec<String>> {
        let rows = self
            .client
            .query(
                "SELECT batch_id FROM public.cdc_applied_batches WHERE batch_id = ANY($1)",
                &[&names],
            )
            .await
            .map_err(ctx("reading cdc_applied_batches"))?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Applies `files` in one transaction with its run record; commits or rolls back.
    pub async fn apply(&mut self, files: &[PathBuf], run_id: &str) -> Result<ApplyStats> {
        let started = Utc::now();
        let tx = self
            .client
            .transaction()
            .await
            .map_err(ctx("starting the apply transaction"))?;
        let span = tracing::info_span!(
            "apply_batch",
            history = %self.histories,
            files = files.len(),
            first_file = %files.first().map(|f| file_name(f)).unwrap_or_default(),
        );
        // Schema changes the batch follows change these; kept once it has committed.
        let mut how = self.how.clone();
        let mut store = PgHistory::new(&tx, self.sqls.clone());
        let stats = apply_files(&mut store, &mut how, files, run_id)
            .instrument(span)
            .await?;
        let remembered = store.deletes_remembered();
        let sqls = store.into_sqls();
        let record = RunRecord {
            pipeline_name: PIPELINE_NAME,
            run_id,
            start: started,
            end: Utc::now(),
            status: RunStatus::Success,
            counts: RunCounts {
                processed: stats.events as i64,
                inserted: stats.versions_inserted as i64,
                updated: stats.versions_closed as i64,
                deleted: stats.deletes as i64,
            },
            error: None,
            metrics: serde_json::json!({
                "files": files.iter().map(|f| file_name(f)).collect::<Vec<_>>(),
                "history_table": self.histories,
                "duration_ms": (Utc::now() - started).num_milliseconds(),
            }),
        };
        metadata::record(&tx, &record).await?;
        tx.commit()
            .await
            .map_err(ctx("committing the apply transaction"))?;
        (self.how, self.sqls) = (how, sqls);
        self.forget_due |= remembered > 0;
        metrics::batch_applied(&stats, (Utc::now() - started).to_std().unwrap_or_default());
        Ok(stats)
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The first held table's hold, as the error a loader that cannot go on with it reports.
    fn held_error(&self) -> Option<Error> {
        let n = self.how.held().count();
        self.how
            .held()
            .next()
            .map(|(_, spec, h)| Error::SchemaChange {
                table: spec.qualified(),
                message: if n > 1 {
                    format!("{} (and {} more table(s) held)", h.reason, n - 1)
                } else {
                    h.reason.clone()
                },
            })
    }

    /// The oldest change-log file a held table is to be replayed from (the archive keeps it
    /// and every later one).
    fn oldest_held(&self) -> Option<String> {
        self.how.held().map(|(_, _, h)| h.batch.clone()).min()
    }

    /// Tries to go on with each held table: replays, in one transaction, its events from
    /// the schema change it is held at through every change-log file applied since (from
    /// `processed/`). If the history can hold the change now, the table is caught up and no
    /// longer held; otherwise the transaction is undone and the hold keeps the new reason.
    async fn resume_held(&mut self, cfg: &LoaderConfig, run_id: &str) -> Result<()> {
        let held: Vec<(usize, String, Held)> = self
            .how
            .held()
            .map(|(t, s, h)| (t, s.qualified(), h.clone()))
            .collect();
        for (t, table, h) in held {
            let Some(mut replay) = self.how.replay_of(t) else {
                continue;
            };
            let files = self.applied_since(cfg, &h.batch).await?;
            if files.first().map(|f| batch_name(f)).as_deref() != Some(h.batch.as_str()) {
                let reason = format!(
                    "{}. The change-log file {} it is held in is no longer in {} (pruned or moved): \
                     put it back, or rebuild the history (scd2-loader rebuild {table} --replace)",
                    h.reason,
                    h.batch,
                    cfg.log_dir.join(changelog::PROCESSED_DIR).display()
                );
                self.note_held(t, &reason).await?;
                continue;
            }
            let tx = self
                .client
                .transaction()
                .await
                .map_err(ctx("starting a held table's replay"))?;
            let mut store = PgHistory::new(&tx, self.sqls.clone()).replaying();
            match apply_files(&mut store, &mut replay, &files, run_id).await {
                Ok(stats) => {
                    let sql = store.into_sqls().swap_remove(t);
                    tx.execute(
                        "DELETE FROM public.cdc_held_tables WHERE history_table = $1",
                        &[&self.how.spec(t).history_qualified()],
                    )
                    .await
                    .map_err(ctx("removing a held table from cdc_held_tables"))?;
                    tx.commit()
                        .await
                        .map_err(ctx("committing a held table's replay"))?;
                    self.how.resume(t, &replay);
                    self.sqls[t] = sql;
                    tracing::info!(
                        table = %table,
                        files = files.len(),
                        events = stats.events,
                        versions = stats.versions_inserted,
                        "the history can hold the schema change now: caught up from it, no longer held"
                    );
                }
                Err(Error::SchemaChange { message, .. }) => {
                    drop(store);
                    tx.rollback()
                        .await
                        .map_err(ctx("undoing a held table's replay"))?;
                    self.note_held(t, &message).await?;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The change-log files applied from `first` on, in capture order: the archive's, and
    /// any recorded as applied but not archived yet (a stop between the two).
    async fn applied_since(&self, cfg: &LoaderConfig, first: &str) -> Result<Vec<PathBuf>> {
        let since = |p: &PathBuf| batch_name(p).as_str() >= first;
        let mut files: Vec<PathBuf> =
            changelog::pending_files(&cfg.log_dir.join(changelog::PROCESSED_DIR))?
                .into_iter()
                .filter(since)
                .collect();
        let waiting: Vec<PathBuf> = changelog::pending_files(&cfg.log_dir)?
            .into_iter()
            .filter(since)
            .collect();
        if !waiting.is_empty() {
            let names: Vec<String> = waiting.iter().map(|p| batch_name(p)).collect();
            let done = self.already_applied(&names).await?;
            files.extend(
                waiting
                    .into_iter()
                    .filter(|p| done.contains(&batch_name(p))),
            );
        }
        files.sort_by_key(|p| batch_name(p));
        Ok(files)
    }

    /// A value the warehouse refused may be one the source's enum or domain has come to
    /// allow since the warehouse copied it: brings the copies up to date with the source
    /// (`migrate::sync_types`). Returns whether anything changed (then the batch is tried
    /// again rather than quarantined).
    async fn follow_types(&self, cfg: &LoaderConfig, shutdown: &Shutdown) -> Result<bool> {
        if self.types.is_empty() {
            return Ok(false);
        }
        let source = db::connect(&cfg.source, shutdown).await?;
        let changed = migrate::sync_types(&self.client, &source, &self.types).await?;
        Ok(!changed.is_empty())
    }

    /// A held table is still held, for `reason` now.
    async fn note_held(&mut self, t: usize, reason: &str) -> Result<()> {
        self.client
            .execute(
                "UPDATE public.cdc_held_tables SET reason = $2, checked_at = now() WHERE history_table = $1",
                &[&self.how.spec(t).history_qualified(), &reason],
            )
            .await
            .map_err(ctx("updating cdc_held_tables"))?;
        self.how.note_held(t, reason);
        Ok(())
    }
}

/// The holds of the tables described by `specs` (`cdc_held_tables`), in their order.
async fn held_tables(client: &Client, specs: &[TableSpec]) -> Result<Vec<Option<Held>>> {
    let names: Vec<String> = specs.iter().map(|s| s.history_qualified()).collect();
    let rows = client
        .query(
            "SELECT history_table, batch_id, line, reason FROM public.cdc_held_tables
             WHERE history_table = ANY($1)",
            &[&names],
        )
        .await
        .map_err(ctx("reading cdc_held_tables"))?;
    let mut held = vec![None; specs.len()];
    for r in rows {
        let name: String = r.get(0);
        if let Some(t) = names.iter().position(|n| *n == name) {
            held[t] = Some(Held {
                batch: r.get(1),
                line: r.get::<_, i32>(2).max(0) as usize,
                reason: r.get(3),
            });
        }
    }
    Ok(held)
}

/// The configured tables, described by the source's catalog (the loader reads the source
/// only for this, at start-up). Given `waiting` (a looping loader), waits for the source for
/// as long as it takes.
pub async fn describe_tables(
    cfg: &LoaderConfig,
    shutdown: &Shutdown,
    waiting: Option<&mut Waiting>,
) -> Result<Vec<TableSpec>> {
    let Some(waiting) = waiting else {
        let source = db::connect(&cfg.source, shutdown).await?;
        return cfg.tables.describe(&source).await;
    };
    let mut backoff = Backoff::default();
    loop {
        let source = db::connect_patiently(&cfg.source, shutdown, waiting).await?;
        match cfg.tables.describe(&source).await {
            Ok(specs) => {
                waiting.resolved();
                return Ok(specs);
            }
            Err(e) if e.is_retryable() => {
                waiting.fault(&e);
                if shutdown.sleep(backoff.next_delay()).await {
                    return Err(Error::Shutdown);
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// Checks that `CDC_LOG_DIR` is this pipeline's and takes the loader's lock on it (no other
/// loader applies while it is held).
pub fn own_log_dir(cfg: &LoaderConfig, specs: &[TableSpec]) -> Result<ProcessLock> {
    check_log_dir(
        &cfg.log_dir,
        &LogDirOwner {
            pipeline: cfg.tables.pipeline_name.clone(),
            stream: stream_name(specs, &cfg.tables.pipeline_name),
        },
    )?;
    ProcessLock::loader(&cfg.log_dir)
}

/// Runs the loader: with `once`, applies everything pending and returns; otherwise keeps
/// applying new files until shutdown.
pub async fn run(cfg: &LoaderConfig, once: bool, shutdown: Shutdown) -> Result<LoaderTotals> {
    let run_id = metadata::new_run_id("loader");
    let wait =
        |key: &str, what: String| Waiting::new(Some(&cfg.state_dir), "loader", key, what, true);
    let mut source_wait = wait(
        "source",
        format!("the source database at {}", cfg.source.display()),
    );
    let mut warehouse_wait = wait(
        "warehouse",
        format!("the warehouse database at {}", cfg.warehouse.display()),
    );
    let mut files_wait = wait(
        "files",
        format!("the change-log directory {}", cfg.log_dir.display()),
    );
    let specs = describe_tables(cfg, &shutdown, patience(once, &mut source_wait)).await?;
    drop(source_wait);
    let _lock = own_log_dir(cfg, &specs)?;
    let mut applier =
        Applier::connect(cfg, &specs, &shutdown, patience(once, &mut warehouse_wait)).await?;
    health::started();
    tracing::info!(
        history = %applier.histories,
        warehouse = %cfg.warehouse.display(),
        log_dir = %cfg.log_dir.display(),
        "loader started"
    );
    // A looping loader is woken by a new file; the poll is the safety net.
    let mut new_files = (!once).then(|| NewFiles::watch(&cfg.log_dir));
    let mut totals = LoaderTotals::default();
    let mut backoff = Backoff::default();
    let mut upkeep = ArchiveUpkeep::default();
    // When to try again to go on with the tables held at a schema change.
    let (mut held_backoff, mut held_check) = (Backoff::default(), Instant::now());
    loop {
        if shutdown.is_triggered() {
            break;
        }
        if !once {
            upkeep.poll(cfg, applier.oldest_held());
        }
        // Someone must change the history of a held table (`status` and the log say how);
        // until then its events wait, and the loader tries again now and then.
        if applier.held_error().is_some() && Instant::now() >= held_check {
            match applier.resume_held(cfg, &run_id).await {
                Ok(()) if applier.held_error().is_none() => held_backoff.reset(),
                Ok(()) => {}
                // (The hold stays, and `status` shows it.)
                Err(e) if !once && !matches!(e, Error::Shutdown) => {
                    tracing::warn!(error = %error_chain(&e), "trying a held table again failed; retrying later")
                }
                Err(e) => return Err(e),
            }
            held_check = Instant::now() + held_backoff.next_delay();
        }
        let listed = match quarantine_strays(cfg, &run_id, &applier, &mut totals).await {
            Ok(()) => changelog::pending_files(&cfg.log_dir),
            Err(e) => Err(e),
        };
        let pending = match listed {
            Ok(p) => {
                files_wait.resolved();
                metrics::change_log_seen(&cfg.log_dir, &p);
                p
            }
            // The directory briefly unreadable (a remount, a permission being fixed).
            Err(e @ Error::Io { .. }) if !once => {
                files_wait.fault(&e);
                if shutdown.sleep(backoff.next_delay()).await {
                    break;
                }
                continue;
            }
            Err(e) => return Err(e),
        };
        if pending.is_empty() {
            if applier.client.is_closed() && !once {
                // Closed while idle (a warehouse restart): reconnect now, not at the next file.
                health::lost(DbRole::Warehouse);
                drop(applier);
                applier =
                    Applier::connect(cfg, &specs, &shutdown, Some(&mut warehouse_wait)).await?;
            }
            // Caught up: deletes waiting for versions no file can bring any more go.
            if let Err(e) = applier.forget_pending_deletes(cfg).await {
                tracing::warn!(error = %error_chain(&e), "could not forget remembered deletes; trying again when caught up next");
            }
            let Some(watch) = new_files.as_mut() else {
                break;
            };
            let poll = cfg.poll_interval.unwrap_or(if watch.active() {
                WATCHED_POLL
            } else {
                UNWATCHED_POLL
            });
            if watch.wait(poll, &shutdown).await {
                break;
            }
            continue;
        }
        match apply_pending(&mut applier, cfg, &pending, &run_id, &mut totals, &shutdown).await {
            Ok(()) => {
                backoff.reset();
                warehouse_wait.resolved();
            }
            // A file that vanished or could not be moved (a full disk, a permission being
            // fixed): nothing was lost (applied files are recorded), so wait and go on.
            Err(e @ Error::Io { .. }) if !once => {
                metrics::error(&e);
                files_wait.fault(&e);
                if shutdown.sleep(backoff.next_delay()).await {
                    break;
                }
            }
            Err(e) if e.is_retryable() => {
                health::lost(DbRole::Warehouse);
                metrics::error(&e);
                let delay = backoff.next_delay();
                tracing::warn!(error = %error_chain(&e), retry_in_ms = delay.as_millis() as u64, "apply failed; retrying");
                if !once {
                    warehouse_wait.fault(&e);
                }
                if shutdown.sleep(delay).await {
                    break;
                }
                if applier.client.is_closed() {
                    // The old connection is gone, and its table locks with it.
                    drop(applier);
                    applier = Applier::connect(
                        cfg,
                        &specs,
                        &shutdown,
                        patience(once, &mut warehouse_wait),
                    )
                    .await?;
                }
            }
            Err(e) => return Err(e),
        }
    }
    upkeep.finish().await;
    if once {
        if let Some(e) = applier.held_error() {
            return Err(e);
        }
    }
    tracing::info!(
        files = totals.applied.files,
        events = totals.applied.events,
        versions = totals.applied.versions_inserted,
        quarantined = totals.quarantined,
        "loader stopped"
    );
    Ok(totals)
}

/// The looping loader's upkeep of `processed/` (compression, retention), on a thread of its
/// own so that it never delays applying: started when the last run has ended, at most once
/// a second, and at once after files were archived. `--once` leaves the archive as it is.
#[derive(Default)]
struct ArchiveUpkeep {
    running: Option<tokio::task::JoinHandle<Result<(usize, usize)>>>,
    last: Option<Instant>,
}

impl ArchiveUpkeep {
    /// `keep_from`: the oldest file a held table is to be replayed from (kept, and every
    /// later one, whatever their age).
    fn poll(&mut self, cfg: &LoaderConfig, keep_from: Option<String>) {
        if let Some(h) = self.running.take_if(|h| h.is_finished()) {
            Self::report(futures_util::FutureExt::now_or_never(h));
        }
        if self.running.is_some() || self.last.is_some_and(|t| t.elapsed().as_secs() < 1) {
            return;
        }
        self.last = Some(Instant::now());
        let (dir, keep) = (cfg.log_dir.clone(), cfg.processed_retention);
        self.running = Some(tokio::task::spawn_blocking(move || {
            changelog::maintain_archive(&dir, keep, keep_from.as_deref())
        }));
    }

    fn report(done: Option<std::result::Result<Result<(usize, usize)>, tokio::task::JoinError>>) {
        match done {
            Some(Ok(Ok((compressed, removed)))) if compressed + removed > 0 => {
                tracing::debug!(compressed, removed, "archive upkeep")
            }
            Some(Ok(Err(e))) => {
                tracing::warn!(error = %error_chain(&e), "archive upkeep failed; retrying later")
            }
            Some(Err(e)) => tracing::warn!(error = %e, "archive upkeep stopped"),
            _ => {}
        }
    }

    async fn finish(self) {
        if let Some(h) = self.running {
            Self::report(Some(h.await));
        }
    }
}

/// A looping loader waits out outages (recorded in `w`); `--once` keeps its bounded retry.
fn patience(once: bool, w: &mut Waiting) -> Option<&mut Waiting> {
    if once {
        None
    } else {
        Some(w)
    }
}

/// Applies the pending files in batches of at most `max_files_per_batch` files.
async fn apply_pending(
    applier: &mut Applier,
    cfg: &LoaderConfig,
    pending: &[PathBuf],
    run_id: &str,
    totals: &mut LoaderTotals,
    shutdown: &Shutdown,
) -> Result<()> {
    let names: Vec<String> = pending.iter().map(|p| batch_name(p)).collect();
    let done = applier.already_applied(&names).await?;
    let mut todo = Vec::with_capacity(pending.len());
    for p in pending {
        if done.contains(&batch_name(p)) {
            tracing::info!(file = %file_name(p), "already applied; archiving");
            metrics::already_applied();
            changelog::archive(p)?;
            totals.skipped_already_applied += 1;
        } else {
            todo.push(p.clone());
        }
    }
    for batch in todo.chunks(cfg.max_files_per_batch) {
        let mut batch: Vec<PathBuf> = batch.to_vec();
        let mut types_followed = false;
        while !batch.is_empty() {
            let clock = Instant::now();
            match applier.apply(&batch, run_id).await {
                Ok(stats) => {
                    for p in &batch {
                        changelog::archive(p)?;
                    }
                    for table in &stats.held {
                        if let Some(e) = applier.held_error() {
                            metrics::error(&e);
                        }
                        tracing::warn!(
                            table = %table,
                            reason = applier.how.held().find(|(_, s, _)| s.qualified() == *table).map(|(_, _, h)| h.reason.as_str()).unwrap_or_default(),
                            "held at a schema change its history cannot hold: its changes wait, the other tables go on"
                        );
                    }
                    tracing::info!(
                        files = stats.files,
                        events = stats.events,
                        versions = stats.versions_inserted,
                        closed = stats.versions_closed,
                        deletes = stats.deletes,
                        ms = clock.elapsed().as_millis() as u64,
                        phases_ms = ?stats.phases_ms,
                        "applied change-log files"
                    );
                    totals.applied.add(&stats);
                    batch.clear();
                }
                Err(e) if e.is_data_error() => {
                    // A value the source's enum or domain allows since the warehouse copied it.
                    if !types_followed && matches!(e, Error::Db { .. }) {
                        types_followed = true;
                        if applier.follow_types(cfg, shutdown).await? {
                            continue;
                        }
                    }
                    // Find the culprit: a parse error names it; otherwise apply one by one.
                    let culprit = match &e {
                        Error::Parse { path, .. } => Some(path.clone()),
                        _ if batch.len() == 1 => Some(batch[0].clone()),
                        _ => None,
                    };
                    match culprit {
                        Some(path) => {
                            quarantine(&path, &e, run_id, applier).await?;
                            totals.quarantined += 1;
                            batch.retain(|p| p != &path);
                        }
                        None => {
                            // Split: apply the first file alone; the loop continues with the rest.
                            let first = batch.remove(0);
                            match applier.apply(std::slice::from_ref(&first), run_id).await {
                                Ok(stats) => {
                                    changelog::archive(&first)?;
                                    totals.applied.add(&stats);
                                }
                                Err(e1) if e1.is_data_error() => {
                                    quarantine(&first, &e1, run_id, applier).await?;
                                    totals.quarantined += 1;
                                }
                                Err(e1) => return Err(e1),
                            }
                        }
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// Quarantines what is named like a change-log file but is not a regular file (a symbolic
/// link, a directory), so that nothing in the directory is skipped silently.
async fn quarantine_strays(
    cfg: &LoaderConfig,
    run_id: &str,
    applier: &Applier,
    totals: &mut LoaderTotals,
) -> Result<()> {
    for (path, what) in changelog::strays(&cfg.log_dir)? {
        let reason = Error::Parse {
            path: path.clone(),
            line: 0,
            message: format!("{what}, not a change-log file written by the extractor"),
        };
        quarantine(&path, &reason, run_id, applier).await?;
        totals.quarantined += 1;
    }
    Ok(())
}

async fn quarantine(
    path: &std::path::Path,
    e: &Error,
    run_id: &str,
    applier: &Applier,
) -> Result<()> {
    let target = changelog::quarantine(path, e)?;
    metrics::quarantined(e);
    tracing::error!(file = %file_name(path), moved_to = %target.display(), error = %error_chain(e), "change-log file quarantined");
    let now = Utc::now();
    let record = RunRecord {
        pipeline_name: PIPELINE_NAME,
        run_id,
        start: now,
        end: now,
        status: RunStatus::Quarantined,
        counts: RunCounts::default(),
        error: Some(error_chain(e)),
        metrics: serde_json::json!({ "file": file_name(path), "history_table": applier.histories }),
    };
    if let Err(err) = metadata::record(applier.client(), &record).await {
        tracing::warn!(error = %error_chain(&err), "could not record the quarantine in pipeline_metadata");
    }
    Ok(())
}
