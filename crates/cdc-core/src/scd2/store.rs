//! The history store seam: what the apply needs from the warehouse (the newest version of
//! keys, close current versions, insert versions, close every version a truncate ended,
//! record the applied batches), all inside one transaction, and its PostgreSQL
//! implementation: one indexed query, one `UPDATE … FROM unnest(…)`, one text `COPY` straight
//! into the history table per chunk (and one `UPDATE` per truncate).

use super::plan::Newest;
use crate::db::copy_text::{push_lsn, push_text, push_time, push_uuid};
use crate::db::ctx;
use crate::error::{Error, Result};
use crate::event::{DecodedEvent, Op};
use crate::table::{split_key, TableSpec};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures_util::{pin_mut, SinkExt};
use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::future::Future;
use tokio_postgres::types::ToSql;
use tokio_postgres::Transaction;

/// Bytes of COPY data sent at a time.
const COPY_FLUSH_BYTES: usize = 1 << 20;

/// A current version to close: its key's chain moves on at `ts_us` (`lsn`), by a new
/// version, a delete or a truncate (`truncated`, then also `deleted`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Close<'a> {
    pub key: &'a str,
    pub ts_us: i64,
    pub lsn: Option<i64>,
    pub deleted: bool,
    pub truncated: bool,
}

/// A version to insert: the event's state from its change time, closed by `next` if any
/// (a delete or truncate when `next` is one).
#[derive(Debug, Clone, Copy)]
pub struct NewVersion<'a> {
    pub event: &'a DecodedEvent,
    pub hash: &'a [u8; 16],
    pub next: Option<&'a DecodedEvent>,
    /// The change-log file it came from.
    pub batch: &'a str,
}

/// One applied change-log file, recorded with the rows it produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppliedBatch {
    pub name: String,
    /// The history tables it changed, comma separated.
    pub history_tables: String,
    pub events: i64,
    pub inserted: i64,
    pub deletes: i64,
    pub first: Option<DateTime<Utc>>,
    pub last: Option<DateTime<Utc>>,
}

/// Where history is kept, for the pipeline's tables (addressed by their index). Every call of
/// one apply runs in the same transaction, so the versions of every table and the record of
/// their batches commit together or not at all.
pub trait HistoryStore {
    /// The newest version held for each of `keys` of `table` that has one.
    fn newest(
        &mut self,
        table: usize,
        keys: &[&str],
    ) -> impl Future<Output = Result<HashMap<String, Newest>>> + Send;

    /// Closes the current version of each key of `table`. Returns how many were closed.
    fn close(
        &mut self,
        table: usize,
        closes: &[Close<'_>],
    ) -> impl Future<Output = Result<u64>> + Send;

    /// Closes every current version of `table` that started before `(ts_us, lsn)` there,
    /// as ended by a truncate. Returns how many were closed.
    fn truncate(
        &mut self,
        table: usize,
        ts_us: i64,
        lsn: Option<i64>,
    ) -> impl Future<Output = Result<u64>> + Send;

    /// Inserts versions of `table`. Returns how many.
    fn insert(
        &mut self,
        table: usize,
        versions: &[NewVersion<'_>],
    ) -> impl Future<Output = Result<u64>> + Send;

    /// Remembers the keys of a re-snapshot's rows of `table` (each event's key, at its
    /// position) until the snapshot's end.
    fn resnapshot_keys(
        &mut self,
        table: usize,
        rows: &[&DecodedEvent],
    ) -> impl Future<Output = Result<()>> + Send;

    /// A re-snapshot of `table` ends at `(ts_us, lsn)`: every version there that holds a key
    /// the snapshot did not name ends there, deleted (a current one is closed; a later one
    /// is split, as a late delete would); the snapshot's keys are forgotten. Returns how many
    /// versions ended.
    fn snapshot_end(
        &mut self,
        table: usize,
        ts_us: i64,
        lsn: Option<i64>,
    ) -> impl Future<Output = Result<u64>> + Send;

    /// Places late events of `table` in their keys' chains, remembers the deletes of keys it
    /// holds nothing of, and ends the versions of `touched` keys at remembered deletes (see
    /// `scd2::late`).
    fn late(
        &mut self,
        table: usize,
        late: &[(&DecodedEvent, [u8; 16], &str)],
        orphans: &[(&DecodedEvent, &str)],
        touched: &[&str],
    ) -> impl Future<Output = Result<super::late::Placed>> + Send;

    /// Follows a schema event of `table` (see `scd2::schema::apply`): its description was
    /// `old` and is `new` from now on. Returns the versions it added.
    fn schema_change(
        &mut self,
        table: usize,
        old: &TableSpec,
        new: &TableSpec,
        ev: &DecodedEvent,
        batch: &str,
    ) -> impl Future<Output = Result<u64>> + Send;

    /// Records that `table` (described by `spec`) is held at a schema change its history
    /// cannot hold (made at `ts_us`): its events from there on wait (`cdc_held_tables`).
    fn hold(
        &mut self,
        table: usize,
        spec: &TableSpec,
        held: &super::apply::Held,
        ts_us: i64,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Records the batches as applied (re-applying one is then skipped).
    fn record_batches(
        &mut self,
        batches: &[AppliedBatch],
        run_id: &str,
    ) -> impl Future<Output = Result<()>> + Send;
}

/// The SQL of a table's history, rendered once for its description.
#[derive(Debug, Clone)]
pub struct HistorySql {
    history: String,
    /// The newest version of keys (current, or where the chain ended), with where it is
    /// stored (`ctid`).
    newest: String,
    close: String,
    /// Closes current versions by where `newest` found them (and their key).
    close_at: String,
    truncate: String,
    /// A late truncate (a file put back after later ones): the versions that spanned it,
    /// closed since by a later change, end at it.
    truncate_late: String,
    copy_in: String,
    /// Indexes of the tracked columns the loader writes (the others are generated).
    written: Vec<usize>,
    /// Columns of the key.
    key_len: usize,
    /// Whether `newest` returns keys as their text (else as their position in the query).
    key_by_text: bool,
    /// A key's version that starts at or before a position, and the start of its first
    /// version after one (late events).
    late_prev: String,
    late_next: String,
    /// Which of a list of (key, time) the history has a change at already.
    late_dups: String,
    /// Remember a re-snapshot's keys; end the versions of the keys it did not name.
    resnapshot_keys: String,
    snapshot_end: String,
}

impl HistorySql {
    pub fn history(&self) -> &str {
        &self.history
    }

    pub fn late_prev(&self) -> &str {
        &self.late_prev
    }

    pub fn late_next(&self) -> &str {
        &self.late_next
    }

    pub fn late_dups(&self) -> &str {
        &self.late_dups
    }

    /// `key_arrays` of owned texts (for parameters).
    pub fn key_columns<'k>(&self, keys: impl Iterator<Item = &'k str>) -> Result<Vec<Vec<String>>> {
        Ok(self
            .key_arrays(keys)?
            .into_iter()
            .map(|a| a.into_iter().map(|p| p.into_owned()).collect())
            .collect())
    }

    /// The texts of one key's columns.
    pub fn key_texts(&self, key: &str) -> Result<Vec<String>> {
        Ok(split_key(key, self.key_len)
            .map_err(|m| Error::internal(format!("applying to {}", self.history), m))?
            .into_iter()
            .map(|p| p.into_owned())
            .collect())
    }

    /// The key texts of `keys`, one array per key column.
    fn key_arrays<'k>(
        &self,
        keys: impl Iterator<Item = &'k str>,
    ) -> Result<Vec<Vec<Cow<'k, str>>>> {
        let mut arrays: Vec<Vec<Cow<'k, str>>> = vec![Vec::new(); self.key_len];
        for key in keys {
            let parts = split_key(key, self.key_len)
                .map_err(|m| Error::internal(format!("applying to {}", self.history), m))?;
            for (a, p) in arrays.iter_mut().zip(parts) {
                a.push(p);
            }
        }
        Ok(arrays)
    }
}

impl HistorySql {
    pub fn new(spec: &TableSpec) -> Self {
        let h = spec.history_qualified();
        let written = spec.written_columns();
        let n = spec.key.len();
        // Key column j of the history matched with the j-th key text of `f`.
        let key_match = |f: &str| {
            spec.key
                .iter()
                .zip(&spec.history_key_columns)
                .enumerate()
                .map(|(j, (k, hk))| format!("x.{hk} = {f}.k{j}::{}", k.sql_type))
                .collect::<Vec<_>>()
                .join(" AND ")
        };
        let key_arrays = |first: usize| {
            (0..n)
                .map(|j| format!("${}::text[]", first + j))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let key_names: String = (0..n).map(|j| format!("k{j}, ")).collect();
        // Keys come back as their position in the key arrays, so that the event's spelling of
        // a key (a JSON number, padded char(n), ...) never has to match the warehouse's output;
        // except for a single key of a type whose text is the event's spelling, which comes back
        // as its text.
        let key_by_text = match (&spec.key[..], &spec.history_key_columns[..]) {
            ([k], [_]) => {
                let t = k.sql_type.to_ascii_lowercase();
                ["integer", "bigint", "smallint", "text", "uuid"].contains(&t.as_str())
                    || t.starts_with("character varying")
            }
            _ => false,
        };
        // Each key's newest version, one backward probe of the key-position index a key
        // (however long its history): its current version if it has one (a key's current
        // version is its newest: versions of a key do not overlap and none is empty), else
        // where its chain ended; with where it is stored (`ctid`), for the close.
        let newest_cols = "x.is_current, decode(replace(x.row_hash::text, '-', ''), 'hex'),
                    CASE WHEN x.is_current THEN x.valid_from ELSE x.valid_to END,
                    (coalesce(CASE WHEN x.is_current THEN x.source_lsn ELSE x.end_lsn END, '0/0') - '0/0'::pg_lsn)::int8,
                    x.tid::text";
        let newest_of = |matched: String| {
            format!(
                "LATERAL (SELECT x.*, x.ctid AS tid FROM {h} x WHERE {matched}
                          ORDER BY x.valid_from DESC, x.source_lsn DESC LIMIT 1) x"
            )
        };
        let newest = match (&spec.key[..], &spec.history_key_columns[..]) {
            ([k], [hk1]) if key_by_text => format!(
                "SELECT x.{hk1}::text, {newest_cols}
                 FROM unnest($1::text[]::{t}[]) AS f(k0), {lateral}",
                t = k.sql_type,
                lateral = newest_of(format!("x.{hk1} = f.k0")),
            ),
            _ => format!(
                "SELECT f.i::int8, {newest_cols}
                 FROM unnest({arrays}) WITH ORDINALITY AS f({key_names}i), {lateral}",
                arrays = key_arrays(1),
                lateral = newest_of(key_match("f")),
            ),
        };
        let close_at = format!(
            "UPDATE {h} x SET valid_to = f.ts, end_lsn = CASE WHEN f.lsn IS NULL THEN NULL ELSE '0/0'::pg_lsn + f.lsn::numeric END,
                              is_current = false, is_deleted = f.del, is_truncated = f.trunc, updated_at = now()
             FROM unnest(${tid}::text[]::tid[], {arrays}, ${ts}::timestamptz[], ${lsn}::int8[], ${del}::bool[], ${trunc}::bool[])
                  AS f(tid, {key_names}ts, lsn, del, trunc)
             WHERE x.ctid = f.tid AND {matched} AND x.is_current",
            tid = 1,
            arrays = key_arrays(2),
            ts = n + 2,
            lsn = n + 3,
            del = n + 4,
            trunc = n + 5,
            matched = key_match("f"),
        );
        let close = format!(
            "UPDATE {h} x SET valid_to = f.ts, end_lsn = CASE WHEN f.lsn IS NULL THEN NULL ELSE '0/0'::pg_lsn + f.lsn::numeric END,
                              is_current = false, is_deleted = f.del, is_truncated = f.trunc, updated_at = now()
             FROM unnest({arrays}, ${ts}::timestamptz[], ${lsn}::int8[], ${del}::bool[], ${trunc}::bool[])
                  AS f({key_names}ts, lsn, del, trunc)
             WHERE {matched} AND x.is_current",
            arrays = key_arrays(1),
            ts = n + 1,
            lsn = n + 2,
            del = n + 3,
            trunc = n + 4,
            matched = key_match("f"),
        );
        // In timestamp mode (no LSNs) a version started before the truncate's time.
        let truncate = format!(
            "UPDATE {h} x SET valid_to = $1, end_lsn = CASE WHEN $2::int8 IS NULL THEN NULL ELSE '0/0'::pg_lsn + $2::int8::numeric END,
                              is_current = false, is_deleted = true, is_truncated = true, updated_at = now()
             WHERE x.is_current
               AND (x.valid_from, coalesce(x.source_lsn, '0/0')) < ($1::timestamptz, '0/0'::pg_lsn + coalesce($2::int8, 0)::numeric)"
        );
        let truncate_late = format!(
            "UPDATE {h} x SET valid_to = $1, end_lsn = CASE WHEN $2::int8 IS NULL THEN NULL ELSE '0/0'::pg_lsn + $2::int8::numeric END,
                              is_deleted = true, is_truncated = true, updated_at = now()
             WHERE NOT x.is_current AND x.valid_to > $1
               AND (x.valid_from, coalesce(x.source_lsn, '0/0')) < ($1::timestamptz, '0/0'::pg_lsn + coalesce($2::int8, 0)::numeric)"
        );
        let cols: String = written
            .iter()
            .map(|&i| format!("{}, ", spec.history_column(&spec.columns[i])))
            .collect();
        let hk = spec.history_key_list("");
        let copy_in = format!(
            "COPY {h} ({hk}, {cols}valid_from, valid_to, is_current, is_deleted, is_truncated, cdc_operation,
                       cdc_timestamp, batch_id, source_lsn, source_txid, end_lsn, row_hash) FROM STDIN"
        );
        // Key column j of the history matched with parameter j + 1; then the position.
        let key_params = spec
            .key
            .iter()
            .zip(&spec.history_key_columns)
            .enumerate()
            .map(|(j, (k, hk))| format!("x.{hk} = ${}::text::{}", j + 1, k.sql_type))
            .collect::<Vec<_>>()
            .join(" AND ");
        let at = format!(
            "(${}::timestamptz, '0/0'::pg_lsn + ${}::int8::numeric)",
            n + 1,
            n + 2
        );
        let late_prev = format!(
            "SELECT x.surrogate_key, x.valid_from, (coalesce(x.source_lsn, '0/0') - '0/0'::pg_lsn)::int8,
                    x.valid_to, CASE WHEN x.end_lsn IS NULL THEN NULL ELSE (x.end_lsn - '0/0'::pg_lsn)::int8 END,
                    x.is_current, x.is_deleted, x.is_truncated, decode(replace(x.row_hash::text, '-', ''), 'hex')
             FROM {h} x WHERE {key_params} AND (x.valid_from, coalesce(x.source_lsn, '0/0')) <= {at}
             ORDER BY x.valid_from DESC, x.source_lsn DESC NULLS LAST LIMIT 1"
        );
        let late_next = format!(
            "SELECT x.valid_from, (coalesce(x.source_lsn, '0/0') - '0/0'::pg_lsn)::int8
             FROM {h} x WHERE {key_params} AND (x.valid_from, coalesce(x.source_lsn, '0/0')) > {at}
             ORDER BY x.valid_from, x.source_lsn NULLS FIRST LIMIT 1"
        );
        // (A version a truncate ended at that instant before the event, in the same
        // transaction, is not the event's change: the event starts the chain again.)
        let late_dups = format!(
            "SELECT f.i::int8 FROM unnest({arrays}, ${ts}::timestamptz[], ${lsn}::int8[]) WITH ORDINALITY AS f({key_names}ts, lsn, i)
             WHERE EXISTS (SELECT 1 FROM {h} x WHERE {matched}
                             AND (x.valid_from = f.ts
                                  OR (x.valid_to = f.ts AND NOT (x.is_truncated
                                      AND coalesce(x.end_lsn, '0/0') < '0/0'::pg_lsn + f.lsn::numeric))))",
            arrays = key_arrays(1),
            ts = n + 1,
            lsn = n + 2,
            matched = key_match("f"),
        );
        let resnapshot_keys =
            format!(
            "INSERT INTO public.cdc_resnapshot_keys (history_table, snapshot_at, snapshot_lsn, key)
             SELECT $1, f.at, f.lsn, ARRAY[{parts}]
             FROM unnest($2::timestamptz[], $3::int8[], {arrays}) AS f(at, lsn, {names})
             ON CONFLICT DO NOTHING",
            parts = (0..n).map(|j| format!("f.k{j}")).collect::<Vec<_>>().join(", "),
            arrays = key_arrays(4),
            names = (0..n).map(|j| format!("k{j}")).collect::<Vec<_>>().join(", "),
        );
        // The version of each key at the snapshot's position (started before it, ended after
        // it), unless the snapshot named the key.
        let named = spec
            .key
            .iter()
            .zip(&spec.history_key_columns)
            .enumerate()
            .map(|(j, (k, hk))| format!("x.{hk} = s.key[{}]::{}", j + 1, k.sql_type))
            .collect::<Vec<_>>()
            .join(" AND ");
        let snapshot_end = format!(
            "UPDATE {h} x SET valid_to = $1, end_lsn = CASE WHEN $2::int8 = 0 THEN NULL ELSE '0/0'::pg_lsn + $2::int8::numeric END,
                              is_current = false, is_deleted = true, is_truncated = false, updated_at = now()
             WHERE (x.valid_from, coalesce(x.source_lsn, '0/0')) < ($1::timestamptz, '0/0'::pg_lsn + $2::int8::numeric)
               AND (x.valid_to IS NULL
                    OR (x.valid_to, coalesce(x.end_lsn, '0/0')) > ($1::timestamptz, '0/0'::pg_lsn + $2::int8::numeric))
               AND NOT EXISTS (SELECT 1 FROM public.cdc_resnapshot_keys s
                               WHERE s.history_table = $3 AND s.snapshot_at = $1 AND s.snapshot_lsn = $2 AND {named})"
        );
        HistorySql {
            resnapshot_keys,
            snapshot_end,
            history: h,
            newest,
            close,
            close_at,
            truncate,
            truncate_late,
            copy_in,
            written,
            key_len: n,
            key_by_text,
            late_prev,
            late_next,
            late_dups,
        }
    }
}

const RECORD_BATCHES: &str = "INSERT INTO public.cdc_applied_batches
         (batch_id, history_table, events, versions_inserted, versions_closed, first_change_at, last_change_at, run_id)
     SELECT b.batch_id, b.history_tables, b.events, b.ins, b.del, b.first_at, b.last_at, $3
     FROM unnest($1::text[], $2::text[], $4::int8[], $5::int8[], $6::int8[], $7::timestamptz[], $8::timestamptz[])
          AS b(batch_id, history_tables, events, ins, del, first_at, last_at)";

/// The history of the pipeline's tables in a PostgreSQL warehouse, inside the apply
/// transaction.
pub struct PgHistory<'t> {
    tx: &'t Transaction<'t>,
    sqls: Vec<HistorySql>,
    remembered: super::late::Remembered,
    /// Whether applied batches are recorded (not by a rebuild, which replays them).
    record: bool,
    /// Where the last `newest` found the current versions of its keys, for the `close`
    /// that follows it: `(table, key → ctid)`.
    found: Option<(usize, HashMap<String, Tid>)>,
}

/// Where a row is stored (`ctid`): block and line, as PostgreSQL prints it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Tid {
    at: (u32, u16),
    text: String,
}

impl Tid {
    fn parse(text: String) -> Option<Tid> {
        let (b, l) = text.strip_prefix('(')?.strip_suffix(')')?.split_once(',')?;
        Some(Tid {
            at: (b.parse().ok()?, l.parse().ok()?),
            text,
        })
    }
}

impl<'t> PgHistory<'t> {
    pub fn new(tx: &'t Transaction<'t>, sqls: Vec<HistorySql>) -> Self {
        PgHistory {
            tx,
            sqls,
            remembered: Default::default(),
            record: true,
            found: None,
        }
    }

    /// Replays batches already recorded as applied (a rebuild): records none.
    pub fn replaying(mut self) -> Self {
        self.record = false;
        self
    }

    /// How many deletes of keys the history held nothing of this transaction remembered.
    pub fn deletes_remembered(&self) -> u64 {
        self.remembered.added
    }

    /// The SQL of each table, as schema changes this transaction followed left it.
    pub fn into_sqls(self) -> Vec<HistorySql> {
        self.sqls
    }

    fn sql(&self, table: usize) -> Result<&HistorySql> {
        self.sqls
            .get(table)
            .ok_or_else(|| Error::internal("the history store", format!("no table {table}")))
    }
}

impl HistoryStore for PgHistory<'_> {
    /// The newest version of each of `keys` (its current one if it has one), one index probe
    /// a key.
    async fn newest(&mut self, table: usize, keys: &[&str]) -> Result<HashMap<String, Newest>> {
        self.found = None;
        let sql = self.sql(table)?;
        let rows = query_keys(self.tx, sql, &sql.newest, keys).await?;
        let mut newest = HashMap::with_capacity(keys.len());
        let mut found = HashMap::with_capacity(keys.len());
        for (key, r) in rows {
            let current: bool = r.get(1);
            let ts: DateTime<Utc> = r.get(3);
            if current {
                if let Some(tid) = Tid::parse(r.get(5)) {
                    found.insert(key.clone(), tid);
                }
            }
            newest.insert(
                key,
                Newest {
                    current,
                    hash: hash16(r.get(2)),
                    ts_us: ts.timestamp_micros(),
                    pos: r.get(4),
                },
            );
        }
        self.found = Some((table, found));
        Ok(newest)
    }

    /// Closes by where `newest` found the current versions (in storage order, so each page is
    /// visited once, with no index lookup), checking each row is still its key's current
    /// version; whatever that did not close (a key it did not find) is closed by key.
    async fn close(&mut self, table: usize, closes: &[Close<'_>]) -> Result<u64> {
        let found = self.found.take();
        if closes.is_empty() {
            return Ok(0);
        }
        let sql = self.sql(table)?;
        let mut at: Vec<(&Tid, &Close<'_>)> = match &found {
            Some((t, found)) if *t == table => closes
                .iter()
                .filter_map(|c| found.get(c.key).map(|tid| (tid, c)))
                .collect(),
            _ => Vec::new(),
        };
        let mut closed = 0;
        if !at.is_empty() {
            at.sort_by(|a, b| a.0.cmp(b.0));
            let tids: Vec<&str> = at.iter().map(|(t, _)| t.text.as_str()).collect();
            let by_at: Vec<&Close<'_>> = at.iter().map(|(_, c)| *c).collect();
            closed = close_rows(self.tx, sql, &sql.close_at, Some(&tids), &by_at).await?;
        }
        if closed < closes.len() as u64 {
            // Rows that moved or keys not found: the key-based close finds what is still
            // current (the rows closed above are not any more).
            let all: Vec<&Close<'_>> = closes.iter().collect();
            closed += close_rows(self.tx, sql, &sql.close, None, &all).await?;
        }
        Ok(closed)
    }

    async fn truncate(&mut self, table: usize, ts_us: i64, lsn: Option<i64>) -> Result<u64> {
        let sql = self.sql(table)?;
        let ts = DateTime::from_timestamp_micros(ts_us).unwrap_or_default();
        let mut closed = 0;
        // (In order, no closed version spans the truncate: the second finds nothing. It
        // reads the table's closed versions; truncates are rare.)
        for q in [&sql.truncate, &sql.truncate_late] {
            closed += self
                .tx
                .execute(q.as_str(), &[&ts, &lsn])
                .await
                .map_err(ctx(format!(
                    "closing the versions a truncate ended in {}",
                    sql.history
                )))?;
        }
        Ok(closed)
    }

    async fn insert(&mut self, table: usize, versions: &[NewVersion<'_>]) -> Result<u64> {
        let sql = self.sql(table)?;
        copy_versions(self.tx, sql, versions).await
    }

    async fn resnapshot_keys(&mut self, table: usize, rows: &[&DecodedEvent]) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let sql = self.sql(table)?;
        // Each row at its snapshot's position (a chunk may hold the rows of two snapshots of
        // a table when the end of the first is in a file not applied yet).
        let at: Vec<DateTime<Utc>> = rows
            .iter()
            .map(|e| DateTime::from_timestamp_micros(e.ts_us).unwrap_or_default())
            .collect();
        let lsn: Vec<i64> = rows.iter().map(|e| e.lsn.unwrap_or(0)).collect();
        let arrays = sql.key_arrays(rows.iter().map(|e| e.key.as_str()))?;
        let arrays: Vec<Vec<&str>> = arrays
            .iter()
            .map(|a| a.iter().map(|p| p.as_ref()).collect())
            .collect();
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![&sql.history, &at, &lsn];
        params.extend(arrays.iter().map(|a| a as &(dyn ToSql + Sync)));
        self.tx
            .execute(sql.resnapshot_keys.as_str(), &params)
            .await
            .map_err(ctx(format!(
                "remembering the keys of a re-snapshot of {}",
                sql.history
            )))?;
        Ok(())
    }

    async fn snapshot_end(&mut self, table: usize, ts_us: i64, lsn: Option<i64>) -> Result<u64> {
        let sql = self.sql(table)?;
        let at = DateTime::from_timestamp_micros(ts_us).unwrap_or_default();
        let lsn = lsn.unwrap_or(0);
        let ended = self
            .tx
            .execute(sql.snapshot_end.as_str(), &[&at, &lsn, &sql.history])
            .await
            .map_err(ctx(format!(
                "ending the keys a re-snapshot of {} did not name",
                sql.history
            )))?;
        self.tx
            .execute(
                "DELETE FROM public.cdc_resnapshot_keys
                 WHERE history_table = $1 AND snapshot_at = $2 AND snapshot_lsn = $3",
                &[&sql.history, &at, &lsn],
            )
            .await
            .map_err(ctx("forgetting a re-snapshot's keys"))?;
        Ok(ended)
    }

    async fn late(
        &mut self,
        table: usize,
        late: &[(&DecodedEvent, [u8; 16], &str)],
        orphans: &[(&DecodedEvent, &str)],
        touched: &[&str],
    ) -> Result<super::late::Placed> {
        let sql = self
            .sqls
            .get(table)
            .ok_or_else(|| Error::internal("the history store", format!("no table {table}")))?;
        super::late::place(self.tx, sql, &mut self.remembered, late, orphans, touched).await
    }

    async fn schema_change(
        &mut self,
        table: usize,
        old: &TableSpec,
        new: &TableSpec,
        ev: &DecodedEvent,
        batch: &str,
    ) -> Result<u64> {
        // A change it cannot hold leaves the history as it was (the DDL of the event's
        // earlier changes undone): the table may be held there while the batch goes on.
        self.tx
            .batch_execute("SAVEPOINT cdc_schema_change")
            .await
            .map_err(ctx("starting a schema change"))?;
        let added = match super::schema::apply(self.tx, old, new, ev, batch).await {
            Ok(added) => added,
            Err(e) => {
                if matches!(e, Error::SchemaChange { .. }) {
                    self.tx
                        .batch_execute("ROLLBACK TO SAVEPOINT cdc_schema_change")
                        .await
                        .map_err(ctx("undoing a schema change"))?;
                }
                return Err(e);
            }
        };
        self.tx
            .batch_execute("RELEASE SAVEPOINT cdc_schema_change")
            .await
            .map_err(ctx("ending a schema change"))?;
        if let Some(sql) = self.sqls.get_mut(table) {
            *sql = HistorySql::new(new);
        }
        Ok(added)
    }

    async fn hold(
        &mut self,
        _table: usize,
        spec: &TableSpec,
        held: &super::apply::Held,
        ts_us: i64,
    ) -> Result<()> {
        let at = DateTime::<Utc>::from_timestamp_micros(ts_us);
        self.tx
            .execute(
                "INSERT INTO public.cdc_held_tables (history_table, source_table, batch_id, line, changed_at, reason)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (history_table) DO NOTHING",
                &[
                    &spec.history_qualified(),
                    &spec.qualified(),
                    &held.batch,
                    &(held.line as i32),
                    &at,
                    &held.reason,
                ],
            )
            .await
            .map_err(ctx("recording a held table in cdc_held_tables"))?;
        Ok(())
    }

    async fn record_batches(&mut self, batches: &[AppliedBatch], run_id: &str) -> Result<()> {
        if !self.record {
            return Ok(());
        }
        let names: Vec<&str> = batches.iter().map(|f| f.name.as_str()).collect();
        let tables: Vec<&str> = batches.iter().map(|f| f.history_tables.as_str()).collect();
        let col = |g: fn(&AppliedBatch) -> i64| batches.iter().map(g).collect::<Vec<i64>>();
        let firsts: Vec<Option<DateTime<Utc>>> = batches.iter().map(|f| f.first).collect();
        let lasts: Vec<Option<DateTime<Utc>>> = batches.iter().map(|f| f.last).collect();
        self.tx
            .execute(
                RECORD_BATCHES,
                &[
                    &names,
                    &tables,
                    &run_id,
                    &col(|f| f.events),
                    &col(|f| f.inserted),
                    &col(|f| f.deletes),
                    &firsts,
                    &lasts,
                ],
            )
            .await
            .map_err(ctx("recording applied batches"))?;
        Ok(())
    }
}

/// Runs a query over `keys` (as key-column arrays, `$1…`) whose first column is the key
/// (its text, or its position in `keys`); returns each row with its key.
async fn query_keys(
    tx: &Transaction<'_>,
    sql: &HistorySql,
    query: &str,
    keys: &[&str],
) -> Result<Vec<(String, tokio_postgres::Row)>> {
    let arrays = sql.key_arrays(keys.iter().copied())?;
    let arrays: Vec<Vec<&str>> = arrays
        .iter()
        .map(|a| a.iter().map(|p| p.as_ref()).collect())
        .collect();
    let params: Vec<&(dyn ToSql + Sync)> =
        arrays.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
    let rows = tx.query(query, &params).await.map_err(ctx(format!(
        "reading the newest versions in {}",
        sql.history
    )))?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let key = if sql.key_by_text {
            r.get::<_, String>(0)
        } else {
            let i: i64 = r.get(0);
            let Some(key) = usize::try_from(i - 1).ok().and_then(|i| keys.get(i)) else {
                continue;
            };
            (*key).to_owned()
        };
        out.push((key, r));
    }
    Ok(out)
}

/// Runs a close (`close`, or `close_at` given the rows' `tids`) of `closes`.
async fn close_rows(
    tx: &Transaction<'_>,
    sql: &HistorySql,
    query: &str,
    tids: Option<&[&str]>,
    closes: &[&Close<'_>],
) -> Result<u64> {
    let arrays = sql.key_arrays(closes.iter().map(|c| c.key))?;
    let arrays: Vec<Vec<&str>> = arrays
        .iter()
        .map(|a| a.iter().map(|p| p.as_ref()).collect())
        .collect();
    let ts: Vec<DateTime<Utc>> = closes
        .iter()
        .map(|c| DateTime::from_timestamp_micros(c.ts_us).unwrap_or_default())
        .collect();
    let lsn: Vec<Option<i64>> = closes.iter().map(|c| c.lsn).collect();
    let del: Vec<bool> = closes.iter().map(|c| c.deleted).collect();
    let trunc: Vec<bool> = closes.iter().map(|c| c.truncated).collect();
    let mut params: Vec<&(dyn ToSql + Sync)> = Vec::with_capacity(arrays.len() + 5);
    if let Some(t) = &tids {
        params.push(t);
    }
    params.extend(arrays.iter().map(|a| a as &(dyn ToSql + Sync)));
    params.extend([&ts as &(dyn ToSql + Sync), &lsn, &del, &trunc]);
    tx.execute(query, &params)
        .await
        .map_err(ctx(format!("closing current versions in {}", sql.history)))
}

/// Writes versions with one text `COPY` straight into the history table.
pub(super) async fn copy_versions(
    tx: &Transaction<'_>,
    sql: &HistorySql,
    versions: &[NewVersion<'_>],
) -> Result<u64> {
    let hist = &sql.history;
    let sink = tx
        .copy_in(sql.copy_in.as_str())
        .await
        .map_err(ctx(format!("starting the COPY into {hist}")))?;
    pin_mut!(sink);
    let mut buf = String::with_capacity(COPY_FLUSH_BYTES + 4096);
    for v in versions {
        let key = split_key(&v.event.key, sql.key_len)
            .map_err(|m| Error::internal(format!("applying to {hist}"), m))?;
        copy_row(&mut buf, &key, &sql.written, v);
        if buf.len() >= COPY_FLUSH_BYTES {
            sink.send(Bytes::from(std::mem::take(&mut buf)))
                .await
                .map_err(ctx(format!("copying versions into {hist}")))?;
        }
    }
    if !buf.is_empty() {
        sink.send(Bytes::from(buf))
            .await
            .map_err(ctx(format!("copying versions into {hist}")))?;
    }
    sink.finish()
        .await
        .map_err(ctx(format!("copying versions into {hist}")))
}

fn hash16(b: &[u8]) -> [u8; 16] {
    let mut h = [0; 16];
    if b.len() == 16 {
        h.copy_from_slice(b);
    }
    h
}

/// One line of COPY text for a new version.
fn copy_row(buf: &mut String, key: &[Cow<'_, str>], written: &[usize], v: &NewVersion<'_>) {
    let ev = v.event;
    for (j, k) in key.iter().enumerate() {
        if j > 0 {
            buf.push('\t');
        }
        push_text(buf, k);
    }
    for &i in written {
        buf.push('\t');
        match ev.values.get(i) {
            Some(x) => push_text(buf, x),
            None => buf.push_str("\\N"),
        }
    }
    buf.push('\t');
    push_time(buf, ev.ts_us);
    buf.push('\t');
    match v.next {
        Some(n) => push_time(buf, n.ts_us),
        None => buf.push_str("\\N"),
    }
    let is_truncated = v.next.is_some_and(|n| n.op == Op::Truncate);
    let is_deleted = is_truncated || v.next.is_some_and(|n| n.op == Op::Delete);
    let flag = |b: bool| if b { 't' } else { 'f' };
    let _ = write!(
        buf,
        "\t{}\t{}\t{}\t{}\t",
        flag(v.next.is_none()),
        flag(is_deleted),
        flag(is_truncated),
        ev.op.as_char()
    );
    push_time(buf, ev.captured_ms.saturating_mul(1000));
    buf.push('\t');
    push_text(buf, v.batch);
    buf.push('\t');
    push_lsn(buf, ev.lsn);
    buf.push('\t');
    match ev.tx_id {
        Some(t) => {
            let _ = write!(buf, "{t}");
        }
        None => buf.push_str("\\N"),
    }
    buf.push('\t');
    push_lsn(buf, v.next.and_then(|n| n.lsn));
    buf.push('\t');
    push_uuid(buf, v.hash);
    buf.push('\n');
}
