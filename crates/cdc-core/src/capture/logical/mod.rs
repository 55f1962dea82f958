//! Logical-replication capture: a `pgoutput` slot and a publication, read through the SQL
//! interface (`pg_logical_slot_peek_binary_changes`, then the slot is advanced once the
//! files are durable). Every committed change becomes an event in commit order, stamped with
//! its commit time, LSN and transaction id.
//!
//! The initial copy is consistent with the slot: the slot is created first, then the table is
//! read in a REPEATABLE READ snapshot whose transaction list is kept; transactions the
//! snapshot already shows are skipped when they come out of the slot, all others are applied.
//! So no change is missed or applied twice at the boundary, however busy the table.
//!
//! `decoder` turns pgoutput messages into events, `pgoutput` parses the messages; slot
//! administration is `crate::slot`.

mod decoder;
pub mod pgoutput;

use super::rows::{check_source_table, read_rows, snapshot_copy_sql, ImageColumns};
use super::{ChangeSource, PassOutcome};
use crate::catalog::TableSelection;
use crate::db::ctx;
use crate::error::{Error, Result};
use crate::event::encode::TEXT_OUTPUT_SETTINGS;
use crate::event::CaptureMode;
use crate::progress::{LogicalState, Progress, SnapshotFilter};
use crate::schema_change::shape_of;
use crate::sink::{commit_if_ok, ChangeSink};
use crate::slot::{self, SlotSettings};
use crate::table::TableSpec;
use chrono::Utc;
use decoder::TxDecoder;
use futures_util::{pin_mut, TryStreamExt};
use pgoutput::Message;
use std::path::PathBuf;
use tokio_postgres::Client;

/// Logical capture of the pipeline's tables: one slot and one publication for all of them,
/// one progress file (named by `progress_name`), every transaction in commit order.
pub struct LogicalCapture {
    specs: Vec<TableSpec>,
    state_dir: PathBuf,
    slot: SlotSettings,
    progress_name: String,
    progress: Progress,
    /// The source database's name (`source.db`), read once.
    db: String,
    /// Given, schema changes are followed (see `TimestampCapture::following`).
    selection: Option<TableSelection>,
    watch: super::schema::Watch,
    /// The end of the last commit the last successful pass decoded (its own heartbeat when
    /// the slot was drained): while the source's WAL ends there, there is nothing to decode.
    drained_to: Option<u64>,
}

impl LogicalCapture {
    pub fn new(
        specs: Vec<TableSpec>,
        state_dir: PathBuf,
        slot: SlotSettings,
        progress_name: String,
    ) -> Result<Self> {
        let progress = Progress::load(&state_dir, &progress_name, CaptureMode::Logical)?;
        Ok(LogicalCapture {
            specs,
            state_dir,
            slot,
            progress_name,
            progress,
            db: String::new(),
            selection: None,
            watch: Default::default(),
            drained_to: None,
        })
    }

    /// Follows the tables' schema changes: the catalog is read at the start of each pass
    /// (the descriptions the decoder compares relation messages with).
    pub fn following(mut self, selection: TableSelection) -> Self {
        self.selection = Some(selection);
        self
    }

    pub fn progress(&self) -> &Progress {
        &self.progress
    }

    fn snapshot_done(&self) -> bool {
        self.progress
            .logical
            .as_ref()
            .is_some_and(|l| l.snapshot_done)
    }

    async fn snapshot(
        &mut self,
        client: &mut Client,
        sink: &mut dyn ChangeSink,
    ) -> Result<PassOutcome> {
        let now = Utc::now();
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(ctx("starting the snapshot transaction"))?;
        // The tables are locked against a TRUNCATE (which is not MVCC-safe: a snapshot taken
        // before it sees the table empty) before the snapshot is taken, as pg_dump does.
        let tables: Vec<String> = self.specs.iter().map(|s| s.qualified()).collect();
        tx.batch_execute(&format!(
            "LOCK TABLE {} IN ACCESS SHARE MODE",
            tables.join(", ")
        ))
        .await
        .map_err(ctx("locking the tables for the initial copy"))?;
        let row = tx
            .query_one(
                "SELECT pg_snapshot_xmin(s)::text::int8, pg_snapshot_xmax(s)::text::int8,
                        coalesce((SELECT array_agg(x::text::int8) FROM pg_snapshot_xip(s) x), '{}'),
                        (pg_current_wal_lsn() - '0/0'::pg_lsn)::int8
                 FROM pg_current_snapshot() s",
                &[],
            )
            .await
            .map_err(ctx("reading the snapshot"))?;
        let filter = SnapshotFilter {
            xmin: row.get::<_, i64>(0) as u64,
            xmax: row.get::<_, i64>(1) as u64,
            xip: row
                .get::<_, Vec<i64>>(2)
                .into_iter()
                .map(|x| x as u64)
                .collect(),
            until_lsn: row.get::<_, i64>(3) as u64,
        };
        sink.begin(now, self.progress.next_file_seq);
        let result: Result<u64> = async {
            tx.batch_execute(TEXT_OUTPUT_SETTINGS)
                .await
                .map_err(ctx("setting the output format"))?;
            let mut rows = 0;
            for spec in &self.specs {
                let cols = ImageColumns::load(&tx, spec).await?;
                let stream = tx
                    .copy_out(snapshot_copy_sql(spec, &cols)?.as_str())
                    .await
                    .map_err(ctx(format!(
                        "reading the initial copy of {}",
                        spec.qualified()
                    )))?;
                rows += read_rows(
                    stream,
                    spec,
                    &cols,
                    CaptureMode::Logical,
                    true,
                    now.timestamp_millis(),
                    sink,
                    |_, _| {},
                )
                .await?;
            }
            Ok(rows)
        }
        .await;
        let (rows, durable) = commit_if_ok(sink, result)?;
        tx.commit()
            .await
            .map_err(ctx("ending the snapshot transaction"))?;
        self.progress.next_file_seq = durable.next_seq();
        if self.selection.is_some() {
            // The copy read the tables in the shape they have under its locks.
            self.progress.shapes = self
                .specs
                .iter()
                .map(|s| (s.qualified(), shape_of(s)))
                .collect();
        }
        self.progress.logical = Some(LogicalState {
            snapshot_done: true,
            filter: Some(filter),
            tables: self.specs.iter().map(|s| s.qualified()).collect(),
            captured_through_us: Some(now.timestamp_micros()),
        });
        self.progress
            .save(&self.state_dir, &self.progress_name, None, &durable)?;
        Ok(PassOutcome {
            rows,
            snapshot: true,
            through_us: Some(now.timestamp_micros()),
            ..PassOutcome::written(&durable)
        })
    }

    async fn stream(
        &mut self,
        client: &mut Client,
        sink: &mut dyn ChangeSink,
    ) -> Result<PassOutcome> {
        // Before the slot is read: one query at a time on the connection.
        if self.db.is_empty() {
            self.db = client
                .query_one("SELECT current_database()::text", &[])
                .await
                .map_err(ctx("reading the database name"))?
                .get(0);
        }
        if let Some(sel) = &self.selection {
            let changed = self.watch.changed(client, sel, &self.specs).await?;
            for (spec, now) in self.specs.iter_mut().zip(changed) {
                if let Some(mut now) = now {
                    let written = self.progress.shapes.get(&now.qualified());
                    super::schema::settle_existing(client, &mut now, written, None).await?;
                    *spec = now;
                }
            }
            // A table the change log has no shape of yet: its shape now is the baseline.
            for spec in &self.specs {
                self.progress
                    .shapes
                    .entry(spec.qualified())
                    .or_insert_with(|| shape_of(spec));
            }
        }
        let now = Utc::now();
        // Re-snapshots asked for (`extractor resnapshot`): written first in the pass's batch.
        let requested: Vec<String> = self
            .specs
            .iter()
            .map(|s| s.qualified())
            .filter(|t| super::resnapshot::requested(&self.state_dir, t))
            .collect();
        sink.begin(now, self.progress.next_file_seq);
        let mut out = PassOutcome::default();
        if !requested.is_empty() {
            let taken = self
                .resnapshot(client, sink, &requested, now.timestamp_millis())
                .await;
            match taken {
                Ok(rows) => out.rows += rows,
                Err(e) => {
                    sink.abort();
                    return Err(e);
                }
            }
        }
        let result = self.decode_slot(client, sink, now, out).await;
        let (out, durable) = commit_if_ok(sink, result)?;
        self.after_pass(client, out, durable, &requested).await
    }

    /// Reads `tables` again, each whole, in one snapshot, into `sink`. Each table is locked
    /// `IN SHARE MODE` before the snapshot: its writers finish first, and the next wait for
    /// the copy to end, so every transaction of the table the snapshot shows committed before
    /// the clock and WAL position read with it (the snapshot's position) and every other
    /// commits after. Returns the rows.
    async fn resnapshot(
        &mut self,
        client: &mut Client,
        sink: &mut dyn ChangeSink,
        tables: &[String],
        captured_ms: i64,
    ) -> Result<u64> {
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .start()
            .await
            .map_err(ctx("starting the re-snapshot transaction"))?;
        tx.batch_execute(&format!("LOCK TABLE {} IN SHARE MODE", tables.join(", ")))
            .await
            .map_err(ctx("locking the tables to read again"))?;
        let row = tx
            .query_one(
                "SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::int8,
                        (pg_current_wal_lsn() - '0/0'::pg_lsn)::int8",
                &[],
            )
            .await
            .map_err(ctx("reading the re-snapshot's position"))?;
        let (ts_us, lsn): (i64, i64) = (row.get(0), row.get(1));
        tx.batch_execute(TEXT_OUTPUT_SETTINGS)
            .await
            .map_err(ctx("setting the output format"))?;
        let mut rows = 0;
        for spec in self
            .specs
            .iter()
            .filter(|s| tables.contains(&s.qualified()))
        {
            let n = super::resnapshot::copy_table(
                &tx,
                spec,
                CaptureMode::Logical,
                ts_us,
                Some(lsn as u64),
                captured_ms,
                sink,
            )
            .await?;
            tracing::info!(table = %spec.qualified(), rows = n, lsn, "re-snapshot taken");
            rows += n;
        }
        tx.commit()
            .await
            .map_err(ctx("ending the re-snapshot transaction"))?;
        Ok(rows)
    }

    /// The slot's part of a pass: the heartbeat, then every change the slot holds (up to the
    /// pass's limit) decoded into `sink`'s open batch.
    async fn decode_slot(
        &mut self,
        client: &mut Client,
        sink: &mut dyn ChangeSink,
        now: chrono::DateTime<Utc>,
        mut out: PassOutcome,
    ) -> Result<Decoded> {
        // The slot is confirmed only at the end of a commit this pass decoded: a position
        // decoding has provably passed (an arbitrary LSN, such as the flush position, can fall
        // inside a commit record not yet decoded, and that transaction would be skipped).
        // A heartbeat transaction (a WAL message, no table write) gives an idle table a
        // commit to confirm, so the slot never holds WAL forever.
        // Its commit is synchronous, so all WAL before it is flushed and this pass decodes
        // every transaction committed before it began, whatever the source's
        // synchronous_commit.
        client
            .batch_execute(
                "BEGIN; SET LOCAL synchronous_commit = on;
                 SELECT pg_logical_emit_message(true, 'cdc_heartbeat', ''); COMMIT;",
            )
            .await
            .map_err(ctx("writing the heartbeat message"))?;
        let filter = self
            .progress
            .logical
            .as_ref()
            .and_then(|l| l.filter.clone());
        let max = self.slot.max_changes_per_pass;
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] =
            [&self.slot.slot, &max, &self.slot.publication];
        let rows = client
            .query_raw(
                "SELECT (lsn - '0/0'::pg_lsn)::int8, data
                 FROM pg_logical_slot_peek_binary_changes($1, NULL, $2,
                        'proto_version', '1', 'publication_names', $3, 'messages', 'true')",
                params.iter().copied(),
            )
            .await
            .map_err(ctx(format!("reading changes from slot {}", self.slot.slot)))?;
        pin_mut!(rows);

        let written = if self.selection.is_some() {
            self.progress.shapes.clone()
        } else {
            Default::default()
        };
        let mut dec = TxDecoder::new(&self.specs, written, &self.db, now.timestamp_millis());
        let mut last_end: Option<u64> = None;
        let mut last_commit_us: Option<i64> = None;
        let result: Result<()> = async {
            while let Some(row) = rows
                .try_next()
                .await
                .map_err(ctx("reading changes from the slot"))?
            {
                dec.change_lsn = row.get::<_, i64>(0) as u64;
                let data: &[u8] = row.get(1);
                let msg =
                    pgoutput::decode(data).map_err(|m| Error::decode("pgoutput stream", m))?;
                if let Message::Begin { xid, .. } = &msg {
                    dec.skip = filter.as_ref().is_some_and(|f| f.shows(*xid));
                }
                if let Message::Commit {
                    end_lsn,
                    commit_ts_us,
                    ..
                } = &msg
                {
                    last_end = Some(*end_lsn);
                    last_commit_us = Some(*commit_ts_us);
                }
                dec.handle(msg, sink, &mut out)?;
            }
            Ok(())
        }
        .await;
        let written = std::mem::take(&mut dec.written);
        drop(dec);
        result?;
        Ok(Decoded {
            out,
            written,
            filter,
            last_end,
            last_commit_us,
        })
    }

    /// After the pass's batch is durable: the shapes it wrote, the slot confirmed, the
    /// progress saved, then the re-snapshot requests it took removed.
    async fn after_pass(
        &mut self,
        client: &mut Client,
        decoded: Decoded,
        durable: crate::sink::Durable,
        requested: &[String],
    ) -> Result<PassOutcome> {
        let Decoded {
            out,
            written,
            filter,
            last_end,
            last_commit_us,
        } = decoded;
        // The schema events are durable: the change log describes the tables so from now on.
        if self.selection.is_some() {
            self.progress.shapes = written;
        }
        let mut out = PassOutcome {
            rows: out.rows,
            deletes: out.deletes,
            schema_changes: out.schema_changes,
            through_us: last_commit_us,
            ..PassOutcome::written(&durable)
        };

        // Test hook: die like `kill -9` between the durable files and the confirmation.
        if std::env::var_os("CDC_FAILPOINT").is_some_and(|v| v == "after-files-before-confirm")
            && !out.files.is_empty()
        {
            std::process::abort();
        }
        // Durable: confirm up to the end of the last whole transaction decoded.
        if let Some(target) = last_end {
            slot::advance(client, &self.slot, target, &durable).await?;
            if let Some(f) = &filter {
                if target >= f.until_lsn {
                    if let Some(l) = self.progress.logical.as_mut() {
                        l.filter = None;
                    }
                }
            }
        }
        // How far capture has come, for `status`: saved with every pass that confirmed a
        // newer commit (each pass does, by its heartbeat), as timestamp capture saves its
        // watermark.
        let mut through_moved = false;
        if let (Some(t), Some(l)) = (last_commit_us, self.progress.logical.as_mut()) {
            if l.captured_through_us.is_none_or(|before| t > before) {
                l.captured_through_us = Some(t);
                through_moved = true;
            }
        }
        if !out.files.is_empty()
            || through_moved
            || self
                .progress
                .logical
                .as_ref()
                .is_some_and(|l| l.filter.is_none())
                != filter.is_none()
        {
            self.progress.next_file_seq = durable.next_seq();
            self.progress
                .save(&self.state_dir, &self.progress_name, None, &durable)?;
        }
        self.drained_to = last_end;
        for t in requested {
            super::resnapshot::done(&self.state_dir, t)?;
        }
        // For the metrics only: a failure to read it does not fail the pass.
        out.slot = slot::lag(client, &self.slot.slot).await.ok().flatten();
        Ok(out)
    }
}

/// What decoding the slot gave a pass, before its batch is committed.
struct Decoded {
    out: PassOutcome,
    written: std::collections::BTreeMap<String, crate::schema_change::Shape>,
    filter: Option<SnapshotFilter>,
    last_end: Option<u64>,
    last_commit_us: Option<i64>,
}

impl LogicalCapture {
    /// The tables now configured must include those the initial copy took (a table left out
    /// would stay current in the history without its changes); a table added since takes its
    /// initial copy as a re-snapshot (requested here, taken by the next pass).
    fn check_copied_tables(&mut self) -> Result<()> {
        let Some(state) = &self.progress.logical else {
            return Ok(());
        };
        let mut copied = if state.tables.is_empty() {
            vec![self.progress.table.clone()]
        } else {
            state.tables.clone()
        };
        let mut now: Vec<String> = self.specs.iter().map(|s| s.qualified()).collect();
        copied.sort();
        now.sort();
        if copied == now {
            return Ok(());
        }
        let dropped: Vec<&String> = copied.iter().filter(|t| !now.contains(t)).collect();
        if !dropped.is_empty() {
            return Err(Error::State {
                path: Progress::path(&self.state_dir, &self.progress_name),
                message: format!(
                    "the initial copy took {}, but CDC_TABLES now names {}: the slot would stop delivering {} while \
                     its history stays current. Name them again, or run `extractor drop-slot` (which forgets this \
                     progress) to start over with a new initial copy of every table",
                    copied.join(", "),
                    now.join(", "),
                    dropped
                        .iter()
                        .map(|t| t.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        }
        // A table added since (to CDC_TABLES, or matching a `schema.*` entry) takes its
        // initial copy as a re-snapshot: the request is durable before the progress names it.
        for t in now.iter().filter(|t| !copied.contains(t)) {
            if !super::resnapshot::requested(&self.state_dir, t) {
                super::resnapshot::request(&self.state_dir, t)?;
            }
            tracing::info!(table = %t, "table added: its initial copy is taken as a re-snapshot");
        }
        if let Some(l) = self.progress.logical.as_mut() {
            l.tables = now;
        }
        Ok(())
    }
}

impl ChangeSource for LogicalCapture {
    fn mode(&self) -> CaptureMode {
        CaptureMode::Logical
    }

    fn snapshot_needed(&self) -> bool {
        !self.snapshot_done()
    }

    /// Checks the server (wal_level, privilege, table) and creates the publication and the
    /// slot if missing. Misconfiguration is a setup error naming what to change.
    async fn prepare(&mut self, client: &Client) -> Result<()> {
        for spec in &self.specs {
            check_source_table(client, spec, false).await?;
            super::setup::check_logical_table(client, spec).await?;
        }
        slot::check_server(client).await?;
        slot::ensure_publication(client, &self.slot, &self.specs).await?;
        if !slot::exists(client, &self.slot).await? {
            if self.snapshot_done() {
                let tables: Vec<String> = self.specs.iter().map(|s| s.qualified()).collect();
                if !tables
                    .iter()
                    .all(|t| super::resnapshot::requested(&self.state_dir, t))
                {
                    return Err(Error::State {
                        path: Progress::path(&self.state_dir, &self.progress_name),
                        message: format!(
                            "the replication slot {} is gone, so changes since the last pass may be lost; \
                             run `extractor resnapshot --all` to create it again and read every table again \
                             ({}): the history keeps its versions, gains one where a row differs and ends the \
                             keys deleted meanwhile",
                            self.slot.slot,
                            tables.join(", ")
                        ),
                    });
                }
                // Every table is read again after the new slot's start: what the lost slot
                // held is in the snapshots, and what commits after them comes from the slot.
                tracing::warn!(slot = %self.slot.slot, "replication slot gone: creating it again; every table is read again");
                slot::create_owned(client, &self.slot, &self.state_dir, &self.progress_name)
                    .await?;
                if let Some(l) = self.progress.logical.as_mut() {
                    l.filter = None;
                }
                self.check_copied_tables()?;
                return Ok(());
            }
            slot::create_owned(client, &self.slot, &self.state_dir, &self.progress_name).await?;
        } else if self.snapshot_done() {
            self.check_copied_tables()?;
        } else {
            // A slot this pipeline has no progress for: ours only if we created it (a crash
            // before the initial copy), else another pipeline's, whose changes we would take.
            slot::check_owner(&self.slot, &self.state_dir, &self.progress_name)?;
        }
        Ok(())
    }

    /// One pass: the initial copy if it has not been taken, otherwise the changes the slot
    /// holds. The slot is confirmed only after the files are durable.
    async fn pass(
        &mut self,
        client: &mut Client,
        sink: &mut dyn ChangeSink,
    ) -> Result<PassOutcome> {
        self.drained_to = None;
        if !self.snapshot_done() {
            return self.snapshot(client, sink).await;
        }
        self.stream(client, sink).await
    }

    /// Nothing was written to the WAL after the last commit the last pass decoded (any
    /// write, in any database of the server, or a schema change, moves it on).
    async fn unchanged(&self, client: &Client) -> Result<bool> {
        let Some(drained_to) = self.drained_to else {
            return Ok(false);
        };
        if self
            .specs
            .iter()
            .any(|s| super::resnapshot::requested(&self.state_dir, &s.qualified()))
        {
            return Ok(false);
        }
        let end: i64 = client
            .query_one(
                "SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::int8",
                &[],
            )
            .await
            .map_err(ctx("reading the source's WAL position"))?
            .get(0);
        Ok(u64::try_from(end).is_ok_and(|end| end <= drained_to))
    }
}

impl SnapshotFilter {
    /// Whether the transaction `xid` (32-bit, as pgoutput sends it) was already visible in
    /// the snapshot, i.e. its effects are in the initial copy.
    pub fn shows(&self, xid: u32) -> bool {
        // Widen to 64 bits in the epoch of xmax (transactions near the snapshot).
        let epoch = self.xmax >> 32;
        let mut full = (epoch << 32) | u64::from(xid);
        if full > self.xmax + (1 << 31) && full >= (1 << 32) {
            full -= 1 << 32;
        }
        self.shows_full(full)
    }

    /// The same for a full 64-bit transaction id.
    pub fn shows_full(&self, xid: u64) -> bool {
        xid < self.xmin || (xid < self.xmax && !self.xip.contains(&xid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_filter_knows_which_transactions_the_copy_shows() {
        let f = SnapshotFilter {
            xmin: 100,
            xmax: 110,
            xip: vec![103, 107],
            until_lsn: 0,
        };
        assert!(f.shows(99));
        assert!(f.shows(104));
        assert!(!f.shows(103), "in progress at the snapshot");
        assert!(!f.shows(110), "started after");
        assert!(!f.shows(5000));
    }
}
