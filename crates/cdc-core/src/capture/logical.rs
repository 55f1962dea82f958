//! Logical-replication capture: a `pgoutput` slot and a publication, read through the SQL
//! interface (`pg_logical_slot_peek_binary_changes`, then `pg_replication_slot_advance`
//! once the files are durable). Every committed change becomes an event in commit order,
//! stamped with its commit time, LSN and transaction id.
//!
//! The initial copy is consistent with the slot: the slot is created first, then the table is
//! read in a REPEATABLE READ snapshot whose transaction list is kept; transactions the
//! snapshot already shows are skipped when they come out of the slot, all others are applied.
//! So no change is missed or applied twice at the boundary, however busy the table.

use super::json::{write_event, write_object, Header, ImageColumns, TEXT_OUTPUT_SETTINGS};
use super::pgoutput::{self, Message, Relation, Value};
use super::timestamp::{check_source_table, read_rows, snapshot_copy_sql, PassOutcome};
use crate::changelog::ChangeLogWriter;
use crate::db::ctx;
use crate::error::{Error, Result};
use crate::progress::{LogicalState, Progress, SnapshotFilter};
use crate::table::TableSpec;
use chrono::Utc;
use futures_util::{pin_mut, TryStreamExt};
use std::collections::HashMap;
use std::path::PathBuf;
use tokio_postgres::Client;

/// Slot settings.
#[derive(Debug, Clone)]
pub struct SlotSettings {
    pub slot: String,
    pub publication: String,
    /// Most changes decoded in one pass (whole transactions are never split).
    pub max_changes_per_pass: i32,
}

/// The slot's health: WAL it retains and how far its confirmed position trails.
#[derive(Debug, Clone, Default)]
pub struct SlotLag {
    pub retained_wal_bytes: i64,
    pub confirmed_lag_bytes: i64,
    pub active: bool,
}

pub struct LogicalCapture {
    spec: TableSpec,
    log_dir: PathBuf,
    state_dir: PathBuf,
    max_rows_per_file: u64,
    slot: SlotSettings,
    progress: Progress,
}

impl LogicalCapture {
    pub fn new(
        spec: TableSpec,
        log_dir: PathBuf,
        state_dir: PathBuf,
        max_rows_per_file: u64,
        slot: SlotSettings,
    ) -> Result<Self> {
        let progress = Progress::load(&state_dir, &spec, "logical")?;
        Ok(LogicalCapture {
            spec,
            log_dir,
            state_dir,
            max_rows_per_file,
            slot,
            progress,
        })
    }

    pub fn progress(&self) -> &Progress {
        &self.progress
    }

    /// Checks the server (wal_level, privilege, table) and creates the publication and the
    /// slot if missing. Misconfiguration is a setup error naming what to change.
    pub async fn prepare(&mut self, client: &Client) -> Result<()> {
        check_source_table(client, &self.spec).await?;
        let wal_level: String = client
            .query_one("SHOW wal_level", &[])
            .await
            .map_err(ctx("reading wal_level"))?
            .get(0);
        if wal_level != "logical" {
            return Err(Error::config(
                "wal_level",
                format!("the source server runs with wal_level={wal_level}; logical capture needs wal_level=logical in its postgresql.conf (then restart it), or use CDC_CAPTURE_MODE=timestamp"),
            ));
        }
        let can: bool = client
            .query_one(
                "SELECT rolsuper OR rolreplication FROM pg_roles WHERE rolname = current_user",
                &[],
            )
            .await
            .map_err(ctx("checking the replication privilege"))?
            .get(0);
        if !can {
            return Err(Error::setup(
                "source role",
                "logical capture needs the REPLICATION privilege: ALTER ROLE <DB_USER> REPLICATION (and ownership of the table to create the publication)",
            ));
        }
        self.ensure_publication(client).await?;
        let exists = self.slot_exists(client).await?;
        let snapshot_done = self
            .progress
            .logical
            .as_ref()
            .is_some_and(|l| l.snapshot_done);
        if !exists {
            if snapshot_done {
                return Err(Error::State {
                    path: Progress::path(&self.state_dir, &self.spec),
                    message: format!(
                        "the replication slot {} is gone, so changes since the last pass may be lost; remove this file to take a new snapshot",
                        self.slot.slot
                    ),
                });
            }
            client
                .execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", &[&self.slot.slot])
                .await
                .map_err(|e| {
                    if e.code().is_some_and(|c| c.code() == "53400") {
                        Error::config(
                            "max_replication_slots",
                            format!("the source server has no free replication slot for {}; raise max_replication_slots or drop an unused slot", self.slot.slot),
                        )
                    } else {
                        Error::Db {
                            context: format!("creating replication slot {} (CDC_SLOT_NAME)", self.slot.slot),
                            source: e,
                        }
                    }
                })?;
            tracing::info!(slot = %self.slot.slot, "created logical replication slot");
        }
        Ok(())
    }

    async fn slot_exists(&self, client: &Client) -> Result<bool> {
        let row = client
            .query_opt(
                "SELECT plugin::text, database::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.slot.slot],
            )
            .await
            .map_err(ctx("looking up the replication slot"))?;
        let Some(row) = row else { return Ok(false) };
        let plugin: Option<String> = row.get(0);
        let db: Option<String> = row.get(1);
        let current: String = client
            .query_one("SELECT current_database()::text", &[])
            .await
            .map_err(ctx("reading the database name"))?
            .get(0);
        if plugin.as_deref() != Some("pgoutput") || db.as_deref() != Some(current.as_str()) {
            return Err(Error::config(
                "CDC_SLOT_NAME",
                format!(
                    "slot {} exists but is not a pgoutput slot of database {current} (plugin {:?}, database {:?}); choose another name",
                    self.slot.slot, plugin, db
                ),
            ));
        }
        Ok(true)
    }

    async fn ensure_publication(&self, client: &Client) -> Result<()> {
        let pubname = &self.slot.publication;
        let exists = client
            .query_opt(
                "SELECT 1 FROM pg_publication WHERE pubname = $1",
                &[pubname],
            )
            .await
            .map_err(ctx("looking up the publication"))?
            .is_some();
        if !exists {
            client
                .batch_execute(&format!(
                    "CREATE PUBLICATION {} FOR TABLE {}",
                    quote_ident(pubname),
                    self.spec.qualified()
                ))
                .await
                .map_err(ctx(format!(
                    "creating publication {pubname} (CDC_PUBLICATION)"
                )))?;
            tracing::info!(publication = %pubname, "created publication");
            return Ok(());
        }
        let has_table = client
            .query_opt(
                "SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
                &[pubname, &self.spec.schema, &self.spec.name],
            )
            .await
            .map_err(ctx("reading the publication's tables"))?
            .is_some();
        if !has_table {
            client
                .batch_execute(&format!(
                    "ALTER PUBLICATION {} ADD TABLE {}",
                    quote_ident(pubname),
                    self.spec.qualified()
                ))
                .await
                .map_err(ctx(format!(
                    "adding {} to publication {pubname}",
                    self.spec.qualified()
                )))?;
        }
        Ok(())
    }

    /// One pass: the initial copy if it has not been taken, otherwise the changes the slot
    /// holds. The slot is confirmed only after the files are durable.
    pub async fn pass(&mut self, client: &mut Client) -> Result<PassOutcome> {
        if !self
            .progress
            .logical
            .as_ref()
            .is_some_and(|l| l.snapshot_done)
        {
            return self.snapshot(client).await;
        }
        self.stream(client).await
    }

    async fn snapshot(&mut self, client: &mut Client) -> Result<PassOutcome> {
        let now = Utc::now();
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(ctx("starting the snapshot transaction"))?;
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
        let mut writer = ChangeLogWriter::new(
            &self.log_dir,
            &self.spec.name,
            now,
            self.progress.next_file_seq,
            self.max_rows_per_file,
        );
        let result: Result<u64> = async {
            tx.batch_execute(TEXT_OUTPUT_SETTINGS)
                .await
                .map_err(ctx("setting the output format"))?;
            let cols = ImageColumns::load(&tx, &self.spec).await?;
            let stream = tx
                .copy_out(snapshot_copy_sql(&self.spec, &cols).as_str())
                .await
                .map_err(ctx("reading the initial copy"))?;
            read_rows(
                stream,
                &self.spec,
                &cols,
                "logical",
                true,
                now.timestamp_millis(),
                &mut writer,
                |_, _| {},
            )
            .await
        }
        .await;
        let rows = match result {
            Ok(n) => n,
            Err(e) => {
                writer.abandon();
                return Err(e);
            }
        };
        let next_seq = writer.next_seq();
        let written = writer.finish()?;
        tx.commit()
            .await
            .map_err(ctx("ending the snapshot transaction"))?;
        self.progress.next_file_seq = next_seq;
        self.progress.logical = Some(LogicalState {
            snapshot_done: true,
            filter: Some(filter),
        });
        self.progress.save(&self.state_dir, &self.spec, None)?;
        Ok(PassOutcome {
            events: rows,
            rows,
            deletes: 0,
            bytes: written.iter().map(|f| f.bytes).sum(),
            files: written.into_iter().map(|f| f.path).collect(),
            snapshot: true,
            watermark: None,
        })
    }

    async fn stream(&mut self, client: &mut Client) -> Result<PassOutcome> {
        let now = Utc::now();
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

        let filter = self
            .progress
            .logical
            .as_ref()
            .and_then(|l| l.filter.clone());
        let mut writer = ChangeLogWriter::new(
            &self.log_dir,
            &self.spec.name,
            now,
            self.progress.next_file_seq,
            self.max_rows_per_file,
        );
        let mut dec = TxDecoder::new(&self.spec, now.timestamp_millis());
        let mut out = PassOutcome::default();
        let mut last_end: Option<u64> = None;
        let result: Result<()> = async {
            while let Some(row) = rows
                .try_next()
                .await
                .map_err(ctx("reading changes from the slot"))?
            {
                dec.change_lsn = row.get::<_, i64>(0) as u64;
                let data: &[u8] = row.get(1);
                let msg = pgoutput::decode(data).map_err(|m| Error::setup("pgoutput stream", m))?;
                if let Message::Begin { xid, .. } = &msg {
                    dec.skip = filter.as_ref().is_some_and(|f| f.shows(*xid));
                }
                if let Message::Commit { end_lsn, .. } = &msg {
                    last_end = Some(*end_lsn);
                }
                dec.handle(msg, &mut writer, &mut out)?;
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            writer.abandon();
            return Err(e);
        }
        out.events = writer.events_written();
        let next_seq = writer.next_seq();
        let written = writer.finish()?;
        out.bytes = written.iter().map(|f| f.bytes).sum();
        out.files = written.into_iter().map(|f| f.path).collect();

        // Test hook: die like `kill -9` between the durable files and the confirmation.
        if std::env::var_os("CDC_FAILPOINT").is_some_and(|v| v == "after-files-before-confirm")
            && !out.files.is_empty()
        {
            std::process::abort();
        }
        // Durable: confirm up to the end of the last whole transaction decoded.
        let target = last_end;
        if let Some(target) = target {
            self.advance(client, target).await?;
            if let Some(f) = &filter {
                if target >= f.until_lsn {
                    if let Some(l) = self.progress.logical.as_mut() {
                        l.filter = None;
                    }
                }
            }
        }
        if !out.files.is_empty()
            || self
                .progress
                .logical
                .as_ref()
                .is_some_and(|l| l.filter.is_none())
                != filter.is_none()
        {
            self.progress.next_file_seq = next_seq;
            self.progress.save(&self.state_dir, &self.spec, None)?;
        }
        Ok(out)
    }

    async fn advance(&self, client: &Client, target: u64) -> Result<()> {
        let target = target as i64;
        client
            .execute(
                "SELECT pg_replication_slot_advance($1, '0/0'::pg_lsn + $2::int8::numeric)
                 FROM pg_replication_slots
                 WHERE slot_name = $1 AND confirmed_flush_lsn < '0/0'::pg_lsn + $2::int8::numeric",
                &[&self.slot.slot, &target],
            )
            .await
            .map_err(ctx(format!("confirming slot {}", self.slot.slot)))?;
        Ok(())
    }
}

/// The slot's retained WAL and confirmed lag, if it exists.
pub async fn slot_lag(client: &Client, slot: &str) -> Result<Option<SlotLag>> {
    let row = client
        .query_opt(
            "SELECT coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn), 0)::int8,
                    coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn), 0)::int8, active
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(ctx("reading the replication slot's lag"))?;
    Ok(row.map(|r| SlotLag {
        retained_wal_bytes: r.get(0),
        confirmed_lag_bytes: r.get(1),
        active: r.get(2),
    }))
}

/// Drops the slot and the publication (`extractor drop-slot`).
pub async fn drop_slot(client: &Client, slot: &SlotSettings) -> Result<(bool, bool)> {
    let dropped_slot = client
        .execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot.slot],
        )
        .await
        .map_err(ctx(format!("dropping replication slot {}", slot.slot)))?
        > 0;
    let had_pub = client
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&slot.publication],
        )
        .await
        .map_err(ctx("looking up the publication"))?
        .is_some();
    if had_pub {
        client
            .batch_execute(&format!(
                "DROP PUBLICATION {}",
                quote_ident(&slot.publication)
            ))
            .await
            .map_err(ctx(format!("dropping publication {}", slot.publication)))?;
    }
    Ok((dropped_slot, had_pub))
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
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

/// Turns pgoutput messages of our table into change events, transaction by transaction.
struct TxDecoder<'a> {
    spec: &'a TableSpec,
    captured_ms: i64,
    relations: HashMap<u32, Relation>,
    commit_ts_us: i64,
    xid: u32,
    /// LSN of the change being decoded (from the slot's output).
    change_lsn: u64,
    skip: bool,
    /// No event of the current transaction written yet: the writer may start a new file
    /// before it (never inside a transaction).
    tx_first: bool,
    buf: Vec<u8>,
}

impl<'a> TxDecoder<'a> {
    fn new(spec: &'a TableSpec, captured_ms: i64) -> Self {
        TxDecoder {
            spec,
            captured_ms,
            relations: HashMap::new(),
            commit_ts_us: 0,
            xid: 0,
            change_lsn: 0,
            skip: false,
            tx_first: true,
            buf: Vec::with_capacity(1024),
        }
    }

    fn handle(
        &mut self,
        msg: Message,
        writer: &mut ChangeLogWriter,
        out: &mut PassOutcome,
    ) -> Result<()> {
        match msg {
            Message::Begin {
                commit_ts_us, xid, ..
            } => {
                self.commit_ts_us = commit_ts_us;
                self.xid = xid;
                self.tx_first = true;
            }
            Message::Relation(r) => {
                self.relations.insert(r.oid, r);
            }
            Message::Insert { rel, new } if !self.skip => {
                self.emit(writer, rel, 'c', None, Some(&new))?;
                out.rows += 1;
            }
            Message::Update {
                rel,
                old,
                old_is_full,
                mut new,
            } if !self.skip => {
                // pgoutput does not resend an unchanged TOASTed value; under REPLICA IDENTITY
                // FULL the old image (`O`) carries it detoasted, so the new image is
                // completed from it. A key image (`K`) has NULL in the other columns: then
                // the column stays missing and the loader quarantines the file rather than
                // write a wrong value.
                if let Some(o) = old.as_ref().filter(|_| old_is_full) {
                    for (n, v) in new.iter_mut().zip(o) {
                        if matches!(n, Value::Unchanged) && !matches!(v, Value::Unchanged) {
                            *n = v.clone();
                        }
                    }
                }
                let rel_info = self.relation(rel)?;
                let key_idx = rel_info
                    .columns
                    .iter()
                    .position(|c| c.name == self.spec.key.name);
                let key_changed = match (&old, key_idx) {
                    (Some(o), Some(i)) => {
                        matches!((o.get(i), new.get(i)), (Some(Value::Text(a)), Some(Value::Text(b))) if a != b)
                    }
                    _ => false,
                };
                if key_changed {
                    // A primary-key change: the old key is deleted, the new one inserted.
                    self.emit(writer, rel, 'd', old.as_deref(), None)?;
                    self.emit(writer, rel, 'c', None, Some(&new))?;
                    out.deletes += 1;
                } else {
                    self.emit(writer, rel, 'u', old.as_deref(), Some(&new))?;
                }
                out.rows += 1;
            }
            Message::Delete { rel, old } if !self.skip => {
                self.emit(writer, rel, 'd', Some(&old), None)?;
                out.deletes += 1;
            }
            Message::Truncate { .. } if !self.skip => {
                tracing::warn!(table = %self.spec.qualified(), "TRUNCATE is not captured; the history keeps the truncated rows as current");
            }
            _ => {}
        }
        Ok(())
    }

    fn relation(&self, rel: u32) -> Result<&Relation> {
        self.relations.get(&rel).ok_or_else(|| {
            Error::setup(
                "pgoutput stream",
                format!("change for relation {rel} before its Relation message"),
            )
        })
    }

    fn emit(
        &mut self,
        writer: &mut ChangeLogWriter,
        rel: u32,
        op: char,
        before: Option<&[Value]>,
        after: Option<&[Value]>,
    ) -> Result<()> {
        let mut b = std::mem::take(&mut self.buf);
        b.clear();
        let ours = self.build_event(&mut b, rel, op, before, after);
        let result = match ours {
            Ok(true) => {
                let keep_together = !std::mem::replace(&mut self.tx_first, false);
                writer.write_event(&b, keep_together)
            }
            Ok(false) => Ok(()),
            Err(e) => Err(e),
        };
        self.buf = b;
        result
    }

    /// Writes the event's JSON into `b`; false when the change is not of our table.
    fn build_event(
        &self,
        b: &mut Vec<u8>,
        rel: u32,
        op: char,
        before: Option<&[Value]>,
        after: Option<&[Value]>,
    ) -> Result<bool> {
        let r = self.relation(rel)?;
        if r.schema != self.spec.schema || r.name != self.spec.name {
            return Ok(false);
        }
        let key_idx = r
            .columns
            .iter()
            .position(|c| c.name == self.spec.key.name)
            .ok_or_else(|| {
                Error::setup(
                    format!("source table {}", self.spec.qualified()),
                    format!("the stream has no key column {}", self.spec.key.name),
                )
            })?;
        let key = match after.or(before).and_then(|t| t.get(key_idx)) {
            Some(Value::Text(k)) => k.as_str(),
            _ => {
                return Err(Error::setup(
                    "pgoutput stream",
                    "a change without its key value",
                ))
            }
        };
        let op = op.to_string();
        let h = Header {
            op: &op,
            mode: "logical",
            snapshot: false,
            db: None,
            ts_us: self.commit_ts_us,
            key,
            lsn: Some(self.change_lsn),
            tx_id: Some(self.xid),
            captured_ms: self.captured_ms,
        };
        write_event(
            b,
            self.spec,
            &h,
            |b| write_image(b, r, before),
            |b| write_image(b, r, after),
        );
        Ok(true)
    }
}

/// A row image as a JSON object, each value typed by its column's type.
fn write_image(b: &mut Vec<u8>, r: &Relation, tuple: Option<&[Value]>) {
    let Some(t) = tuple else {
        b.extend_from_slice(b"null");
        return;
    };
    // An unchanged TOASTed value that could not be filled is left out (the loader then
    // quarantines the file rather than store a wrong value).
    let fields = r.columns.iter().zip(t).filter_map(|(c, v)| match v {
        Value::Unchanged => None,
        Value::Null => Some((c.name.as_str(), c.type_oid, None)),
        Value::Text(s) => Some((c.name.as_str(), c.type_oid, Some(s.as_str()))),
    });
    write_object(b, fields);
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
