//! Logical-replication capture: a `pgoutput` slot and a publication, read through the
//! streaming replication protocol (`db::replication`): the server sends each transaction as
//! it commits; a pass cuts the stream at a transaction boundary, makes the files durable,
//! saves the progress, and only then confirms the position to the server. Every committed
//! change becomes an event in commit order, stamped with its commit time, LSN and
//! transaction id.
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
use crate::db::replication::{ReplicationError, ReplicationStream, StreamMessage};
use crate::db::{ctx, DbSettings};
use crate::error::{Error, Result};
use crate::event::encode::TEXT_OUTPUT_SETTINGS;
use crate::event::CaptureMode;
use crate::progress::{LogicalState, Progress, SnapshotFilter};
use crate::schema_change::shape_of;
use crate::shutdown::Shutdown;
use crate::sink::{commit_if_ok, ChangeSink};
use crate::slot::{self, SlotSettings};
use crate::table::TableSpec;
use bytes::Bytes;
use chrono::Utc;
use decoder::TxDecoder;
use pgoutput::{Message, Relation};
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio_postgres::{Client, SimpleQueryMessage};

/// Following the stream, a batch is cut when no message has come for this long after a
/// commit ...
const FLUSH_QUIET: Duration = Duration::from_millis(5);
/// ... and the previous batch was cut at least this long ago; or at the first commit after
/// the batch is this old (under steady traffic the stream is never quiet). So the cut adapts
/// to the load: a transaction after a lull is written 5 ms after its commit, while under
/// traffic a batch gathers the transactions of this window: each batch costs two file
/// creations, four fsyncs, a pass record and a loader transaction whatever its size, so
/// gathering cuts the CPU per change several times over, and this bounds how long a change
/// waits for its file.
const BATCH_WINDOW: Duration = Duration::from_millis(100);
/// The slot's lag (a metric only) is read at most this often while following.
const SLOT_LAG_EVERY: Duration = Duration::from_secs(5);
/// An idle stream: a heartbeat this often, which confirms the slot (so it holds no WAL for
/// long) and moves the capture time `status` reports.
const IDLE_HEARTBEAT_EVERY: Duration = Duration::from_secs(5);
/// A standby status update at least this often (the server drops a client silent for
/// `wal_sender_timeout`, 60 s by default).
const STATUS_EVERY: Duration = Duration::from_secs(10);
/// How long starting the stream waits for the slot to be released by the walsender of a
/// connection that just went away.
const SLOT_BUSY_WAIT: Duration = Duration::from_secs(10);

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
    /// Where the replication connection goes (the source database).
    source: DbSettings,
    /// Given (the looping extractor), passes follow the stream: the connection stays open,
    /// a pass waits for changes and ends at this shutdown signal. Without it, each pass
    /// drains what was committed before it began and closes the connection (`--once`).
    follow: Option<Shutdown>,
    /// The open replication connection, between passes when following.
    replication: Option<Replication>,
    /// When the slot's lag was last read (for the metrics).
    lag_read: Option<Instant>,
}

impl LogicalCapture {
    pub fn new(
        specs: Vec<TableSpec>,
        state_dir: PathBuf,
        slot: SlotSettings,
        progress_name: String,
        source: DbSettings,
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
            source,
            follow: None,
            replication: None,
            lag_read: None,
        })
    }

    /// Follows the stream (the looping extractor): passes wait for changes, until `shutdown`.
    pub fn streaming(mut self, shutdown: Shutdown) -> Self {
        self.follow = Some(shutdown);
        self
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
        let repl = match self.replication.take() {
            Some(r) => r,
            None => self.open().await?,
        };
        // A failed pass drops the connection (it starts again at the confirmed position).
        let (out, repl) = self.stream_into(repl, client, sink).await?;
        if self.follow.is_some() {
            self.replication = Some(repl);
        } else {
            // One pass at a time (`--once`): the slot is released before the pass returns.
            repl.stream.close().await;
        }
        Ok(out)
    }

    /// Opens the replication connection and starts streaming from the slot's confirmed
    /// position. A slot still active for a walsender whose client just went away (a
    /// restarted extractor, a previous pass) is waited for a moment.
    async fn open(&self) -> Result<Replication> {
        let started = Instant::now();
        let mut backoff = crate::db::Backoff::default();
        loop {
            let attempt = async {
                let mut stream = ReplicationStream::connect(&self.source).await?;
                stream
                    .start(&self.slot.slot, &self.slot.publication)
                    .await?;
                Ok(stream)
            }
            .await;
            match attempt {
                Ok(stream) => {
                    return Ok(Replication {
                        stream,
                        relations: HashMap::new(),
                        received: 0,
                        confirmed: 0,
                        last_status: Instant::now(),
                        last_cut: None,
                    })
                }
                Err(ReplicationError::Server { code, .. })
                    if code == "55006" && started.elapsed() < SLOT_BUSY_WAIT =>
                {
                    tokio::time::sleep(backoff.next_delay()).await;
                }
                Err(source) => {
                    let p = self.source.role.setting_prefix();
                    return Err(Error::Replication {
                        context: format!(
                            "streaming from slot {} of the source database at {} (settings {p}_HOST, {p}_PORT, {p}_NAME, {p}_USER, {p}_PASSWORD, {p}_SSLMODE, {p}_SSLROOTCERT)",
                            self.slot.slot,
                            self.source.display()
                        ),
                        source,
                    });
                }
            }
        }
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

    /// One pass over the stream: the transactions it delivers, cut at a transaction
    /// boundary, made durable, saved in the progress, then confirmed to the server.
    ///
    /// Following (the looping extractor), the pass waits for the first change and cuts at a
    /// commit: when the stream has been quiet for `FLUSH_QUIET` and the previous batch was
    /// cut `BATCH_WINDOW` ago, when the batch is `BATCH_WINDOW` old, or at the size bound.
    /// Otherwise (`--once`, or an idle stream for `IDLE_HEARTBEAT_EVERY`) it drains up to a
    /// heartbeat it writes first: every transaction committed before the pass began.
    async fn stream_into(
        &mut self,
        mut repl: Replication,
        client: &mut Client,
        sink: &mut dyn ChangeSink,
    ) -> Result<(PassOutcome, Replication)> {
        let follow = self.follow.clone();
        // Following: the first change, or an idle stream, or shutdown.
        let mut first: Option<(u64, Bytes)> = None;
        if let Some(shutdown) = &follow {
            match repl
                .recv(Some(IDLE_HEARTBEAT_EVERY), Some(shutdown))
                .await?
            {
                Recv::Data(start, data) => first = Some((start, data)),
                Recv::Quiet => {}
                Recv::Stop => return Ok((PassOutcome::default(), repl)),
            }
        }
        // Before the stream's changes are decoded: one query at a time on the connection.
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
        // The slot is confirmed only at the end of a commit this pass decoded: a position
        // decoding has provably passed (an arbitrary LSN, such as the flush position, can fall
        // inside a commit record not yet decoded, and that transaction would be skipped).
        // A heartbeat transaction (a WAL message, no table write) gives an idle table a
        // commit to confirm, so the slot never holds WAL for long, and marks how far a
        // draining pass reads. Its commit is synchronous, so all WAL before it is flushed and
        // the pass decodes every transaction committed before it began, whatever the
        // source's synchronous_commit.
        let started_by_data = first.is_some();
        let drain_to = if first.is_none() {
            Some(heartbeat(client).await?)
        } else {
            None
        };
        let max = u64::try_from(self.slot.max_changes_per_pass).unwrap_or(1);

        let filter = self
            .progress
            .logical
            .as_ref()
            .and_then(|l| l.filter.clone());
        // Re-snapshots asked for (`extractor resnapshot`): written first in the pass's batch
        // (a change the stream delivers after one but committed before it is placed before
        // it by the loader).
        let requested: Vec<String> = self
            .specs
            .iter()
            .map(|s| s.qualified())
            .filter(|t| super::resnapshot::requested(&self.state_dir, t))
            .collect();
        sink.begin(now, self.progress.next_file_seq);
        let mut out = PassOutcome::default();
        if !requested.is_empty() {
            match self
                .resnapshot(client, sink, &requested, now.timestamp_millis())
                .await
            {
                Ok(rows) => out.rows += rows,
                Err(e) => {
                    sink.abort();
                    return Err(e);
                }
            }
        }
        let written = if self.selection.is_some() {
            self.progress.shapes.clone()
        } else {
            Default::default()
        };
        let mut dec = TxDecoder::new(&self.specs, written, &self.db, now.timestamp_millis());
        dec.relations = std::mem::take(&mut repl.relations);
        let mut last_end: Option<u64> = None;
        let mut last_commit_us: Option<i64> = None;
        let batch_started = Instant::now();
        let last_cut = repl.last_cut;
        let result: Result<()> = async {
            let mut in_tx = false;
            let mut drained = drain_to.is_none();
            let mut changes: u64 = 0;
            let mut pending = first.take();
            loop {
                let (start, data) = match pending.take() {
                    Some(m) => m,
                    None => {
                        // Inside a transaction, or short of the heartbeat: read on. Between
                        // transactions, following: cut when quiet (or at shutdown).
                        let (wait, stop) = if in_tx || !drained {
                            (None, None)
                        } else if follow.is_some() {
                            // Quiet for FLUSH_QUIET, and no sooner than BATCH_WINDOW after
                            // the previous cut.
                            let window_left = last_cut.map_or(Duration::ZERO, |t| {
                                (t + BATCH_WINDOW).saturating_duration_since(Instant::now())
                            });
                            (Some(window_left.max(FLUSH_QUIET)), follow.as_ref())
                        } else {
                            break;
                        };
                        match repl.recv(wait, stop).await? {
                            Recv::Data(start, data) => (start, data),
                            Recv::Quiet | Recv::Stop => break,
                        }
                    }
                };
                dec.change_lsn = start;
                let msg =
                    pgoutput::decode(&data).map_err(|m| Error::decode("pgoutput stream", m))?;
                changes += 1;
                let mut committed = false;
                match &msg {
                    Message::Begin { xid, .. } => {
                        in_tx = true;
                        dec.skip = filter.as_ref().is_some_and(|f| f.shows(*xid));
                    }
                    Message::Commit {
                        end_lsn,
                        commit_ts_us,
                        ..
                    } => {
                        in_tx = false;
                        committed = true;
                        last_end = Some(*end_lsn);
                        last_commit_us = Some(*commit_ts_us);
                        if drain_to.is_some_and(|t| *end_lsn >= t) {
                            drained = true;
                        }
                    }
                    _ => {}
                }
                dec.handle(msg, sink, &mut out)?;
                if committed
                    && drained
                    && (changes >= max
                        || follow.is_none()
                        || batch_started.elapsed() >= BATCH_WINDOW)
                {
                    break;
                }
                if committed && changes >= max {
                    // The size bound, short of the heartbeat: the next pass reads on.
                    break;
                }
            }
            Ok(())
        }
        .await;
        if started_by_data {
            repl.last_cut = Some(Instant::now());
        }
        repl.relations = std::mem::take(&mut dec.relations);
        let written = std::mem::take(&mut dec.written);
        drop(dec);
        let ((), durable) = commit_if_ok(sink, result)?;
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
        // Durable, so the progress moves: how far capture has come (for `status`), and the
        // file sequence.
        let mut through_moved = false;
        if let (Some(t), Some(l)) = (last_commit_us, self.progress.logical.as_mut()) {
            if l.captured_through_us.is_none_or(|before| t > before) {
                l.captured_through_us = Some(t);
                through_moved = true;
            }
        }
        if !out.files.is_empty() || through_moved {
            self.progress.next_file_seq = durable.next_seq();
            self.progress
                .save(&self.state_dir, &self.progress_name, None, &durable)?;
        }
        // The re-snapshots taken are durable and the progress after them saved.
        for t in &requested {
            super::resnapshot::done(&self.state_dir, t)?;
        }
        // Then the server's confirmation: up to the end of the last whole transaction
        // decoded.
        if let Some(target) = last_end {
            repl.confirm(target).await?;
            // The initial copy's filter is needed no more once the slot is confirmed past
            // the snapshot (saved only now: a restart before the confirmation reads those
            // transactions again, and must still skip those the copy shows).
            if filter.as_ref().is_some_and(|f| target >= f.until_lsn) {
                if let Some(l) = self.progress.logical.as_mut() {
                    l.filter = None;
                }
                self.progress
                    .save(&self.state_dir, &self.progress_name, None, &durable)?;
            }
        }
        // For the metrics only (a failure to read it does not fail the pass), and not at
        // every pass of a busy stream: a query on the source each time.
        if follow.is_none() || self.lag_read.is_none_or(|t| t.elapsed() >= SLOT_LAG_EVERY) {
            self.lag_read = Some(Instant::now());
            out.slot = slot::lag(client, &self.slot.slot).await.ok().flatten();
        }
        Ok((out, repl))
    }
}

/// The open replication connection and what it has seen.
struct Replication {
    stream: ReplicationStream,
    /// The relation messages of this connection (sent once per connection).
    relations: HashMap<u32, Relation>,
    /// How far the stream has been read (reported as written).
    received: u64,
    /// How far the server has been told the changes are durable.
    confirmed: u64,
    last_status: Instant,
    /// When the last batch started by a change was cut (see `BATCH_WINDOW`).
    last_cut: Option<Instant>,
}

/// What waiting on the stream gave.
enum Recv {
    /// A pgoutput message and its LSN.
    Data(u64, Bytes),
    /// Nothing for the time waited.
    Quiet,
    /// Shutdown was requested.
    Stop,
}

fn stream_err(source: ReplicationError) -> Error {
    Error::Replication {
        context: "reading the replication stream".into(),
        source,
    }
}

impl Replication {
    /// The next pgoutput message, waiting at most `wait` (unbounded without), and not past
    /// `stop`'s shutdown. Keepalives are answered when the server asks, and a status update
    /// goes out every `STATUS_EVERY` (the server drops a silent client).
    async fn recv(&mut self, wait: Option<Duration>, stop: Option<&Shutdown>) -> Result<Recv> {
        let deadline = wait.map(|w| Instant::now() + w);
        loop {
            let status_due = self.last_status + STATUS_EVERY;
            // A message read already: no waiting (nor timer) needed.
            if let Some(m) = self.stream.next_buffered().map_err(stream_err)? {
                if let Some(r) = self.take(m).await? {
                    return Ok(r);
                }
                if Instant::now() >= status_due {
                    self.status().await?;
                }
                continue;
            }
            let until = deadline.map_or(status_due, |d| d.min(status_due));
            let got = tokio::select! {
                m = self.stream.next() => Some(m.map_err(stream_err)?),
                () = tokio::time::sleep_until(until.into()) => None,
                () = async {
                    match stop {
                        Some(s) => s.wait().await,
                        None => std::future::pending().await,
                    }
                } => return Ok(Recv::Stop),
            };
            match got {
                Some(m) => {
                    if let Some(r) = self.take(m).await? {
                        return Ok(r);
                    }
                }
                None => {
                    if Instant::now() >= status_due {
                        self.status().await?;
                    }
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return Ok(Recv::Quiet);
                    }
                }
            }
        }
    }

    /// A message of the stream: the data it carries, or a keepalive answered when the
    /// server asks.
    async fn take(&mut self, m: StreamMessage) -> Result<Option<Recv>> {
        match m {
            StreamMessage::XLogData { start, data } => {
                self.received = self.received.max(start);
                Ok(Some(Recv::Data(start, data)))
            }
            StreamMessage::Keepalive { wal_end, reply } => {
                self.received = self.received.max(wal_end);
                if reply {
                    self.status().await?;
                }
                Ok(None)
            }
        }
    }

    /// Tells the server the changes up to `target` are durable: the slot may move there.
    async fn confirm(&mut self, target: u64) -> Result<()> {
        self.confirmed = self.confirmed.max(target);
        self.status().await
    }

    async fn status(&mut self) -> Result<()> {
        self.last_status = Instant::now();
        self.stream
            .confirm(self.received, self.confirmed)
            .await
            .map_err(|source| Error::Replication {
                context: "confirming the durable position to the server".into(),
                source,
            })
    }
}

/// Writes the heartbeat transaction; returns its message's LSN (its commit ends after it).
async fn heartbeat(client: &Client) -> Result<u64> {
    let rows = client
        .simple_query(
            "BEGIN; SET LOCAL synchronous_commit = on;
             SELECT (pg_logical_emit_message(true, 'cdc_heartbeat', '') - '0/0'::pg_lsn)::int8; COMMIT;",
        )
        .await
        .map_err(ctx("writing the heartbeat message"))?;
    rows.iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).and_then(|v| v.parse::<u64>().ok()),
            _ => None,
        })
        .ok_or_else(|| Error::internal("heartbeat", "the heartbeat returned no position"))
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

    /// One pass: the initial copy if it has not been taken, otherwise the changes the
    /// stream delivers. The slot is confirmed only after the files are durable.
    async fn pass(
        &mut self,
        client: &mut Client,
        sink: &mut dyn ChangeSink,
    ) -> Result<PassOutcome> {
        if !self.snapshot_done() {
            return self.snapshot(client, sink).await;
        }
        self.stream(client, sink).await
    }

    /// Never skipped: a pass waits on the stream itself.
    async fn unchanged(&self, _client: &Client) -> Result<bool> {
        Ok(false)
    }

    fn waits_for_changes(&self) -> bool {
        self.follow.is_some() && self.snapshot_done()
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
