//! Late events, in PostgreSQL: an event at or before the newest position the history holds
//! of its key (a quarantined file put back, a file applied again) goes where it belongs in
//! the key's chain, one event at a time (they are rare; the in-order path never comes here):
//!
//! - the history has a change of the key at that instant already: nothing (a duplicate, or
//!   a state the same instant's later change superseded);
//! - a state inside a version: the version ends there and the state follows it up to where
//!   the version ended (unless it equals the version's state);
//! - a state in a gap (before the key's first version, after a delete): a version from there
//!   up to the next one, or to a remembered delete before that;
//! - either way, a version the new one runs up to that holds the same state (a re-snapshot's
//!   row that arrived before the change that made it) is replaced by it;
//! - a delete inside a version: the version ends there, deleted;
//! - a delete the history holds nothing of before (in a gap, or of a key it does not hold
//!   at all): remembered in `cdc_pending_deletes`, and applied when a version it ends
//!   arrives.

use super::store::{HistorySql, NewVersion};
use crate::db::ctx;
use crate::error::Result;
use crate::event::{DecodedEvent, Op, Values};
use chrono::{DateTime, Utc};
use std::collections::{HashMap, HashSet};
use tokio_postgres::types::ToSql;
use tokio_postgres::Transaction;

/// What placing late events changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Placed {
    pub inserted: u64,
    pub closed: u64,
    pub deletes: u64,
}

/// A version of a key around a position.
struct Around {
    id: i64,
    from: (i64, i64),
    to: Option<(i64, Option<i64>)>,
    current: bool,
    deleted: bool,
    truncated: bool,
    hash: [u8; 16],
}

fn time(us: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(us).unwrap_or_default()
}

fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

/// The remembered deletes of each table (by history table), loaded once per transaction.
#[derive(Default)]
pub struct Remembered {
    loaded: HashMap<String, HashSet<String>>,
    /// Deletes remembered in this transaction.
    pub added: u64,
}

impl Remembered {
    async fn keys<'a>(
        &'a mut self,
        tx: &Transaction<'_>,
        history: &str,
    ) -> Result<&'a mut HashSet<String>> {
        if !self.loaded.contains_key(history) {
            let keys: HashSet<String> = tx
                .query(
                    "SELECT DISTINCT key FROM public.cdc_pending_deletes WHERE history_table = $1",
                    &[&history],
                )
                .await
                .map_err(ctx("reading cdc_pending_deletes"))?
                .iter()
                .map(|r| r.get(0))
                .collect();
            self.loaded.insert(history.to_owned(), keys);
        }
        Ok(self.loaded.entry(history.to_owned()).or_default())
    }
}

/// Places `late` (each with its hash and file, in position order per key), remembers
/// `orphans`, and ends the versions of `touched` keys (written by the in-order path) at
/// remembered deletes inside them.
pub async fn place(
    tx: &Transaction<'_>,
    sql: &HistorySql,
    remembered: &mut Remembered,
    late: &[(&DecodedEvent, [u8; 16], &str)],
    orphans: &[(&DecodedEvent, &str)],
    touched: &[&str],
) -> Result<Placed> {
    let mut placed = Placed::default();
    let h = sql.history().to_owned();
    if !orphans.is_empty() {
        remember_all(tx, &h, orphans).await?;
        remembered.added += orphans.len() as u64;
        let keys = remembered.keys(tx, &h).await?;
        keys.extend(orphans.iter().map(|(ev, _)| ev.key.clone()));
    }
    // Those at an instant the history has a change of their key at (duplicates, mostly) in
    // one query; the rest one by one.
    let dup: HashSet<usize> = if late.is_empty() {
        HashSet::new()
    } else {
        let keys = sql.key_columns(late.iter().map(|(e, _, _)| e.key.as_str()))?;
        let times: Vec<DateTime<Utc>> = late.iter().map(|(e, _, _)| time(e.ts_us)).collect();
        let lsns: Vec<i64> = late.iter().map(|(e, _, _)| e.lsn.unwrap_or(0)).collect();
        let mut params: Vec<&(dyn ToSql + Sync)> =
            keys.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
        params.push(&times);
        params.push(&lsns);
        tx.query(sql.late_dups(), &params)
            .await
            .map_err(ctx(format!("reading the versions of late keys in {h}")))?
            .iter()
            .map(|r| r.get::<_, i64>(0) as usize - 1)
            .collect()
    };
    for (i, (ev, hash, batch)) in late.iter().enumerate() {
        if !dup.contains(&i) {
            place_one(tx, sql, remembered, ev, *hash, batch, &mut placed).await?;
        }
    }
    let pending: Vec<&str> = {
        let keys = remembered.keys(tx, &h).await?;
        touched
            .iter()
            .copied()
            .filter(|k| keys.contains(*k))
            .collect()
    };
    for key in pending {
        settle(tx, sql, remembered, key, &mut placed).await?;
    }
    Ok(placed)
}

/// `remember` for many deletes, in one statement (a batch can hold many: every row inserted
/// and deleted in one transaction is a delete of a key the history never held).
async fn remember_all(
    tx: &Transaction<'_>,
    h: &str,
    deletes: &[(&DecodedEvent, &str)],
) -> Result<()> {
    let keys: Vec<&str> = deletes.iter().map(|(e, _)| e.key.as_str()).collect();
    let at: Vec<DateTime<Utc>> = deletes.iter().map(|(e, _)| time(e.ts_us)).collect();
    let lsns: Vec<i64> = deletes.iter().map(|(e, _)| e.lsn.unwrap_or(0)).collect();
    let batches: Vec<&str> = deletes.iter().map(|(_, b)| *b).collect();
    tx.execute(
        "INSERT INTO public.cdc_pending_deletes (history_table, key, deleted_at, lsn, batch_id)
         SELECT $1, k, d, l, b FROM unnest($2::text[], $3::timestamptz[], $4::int8[], $5::text[]) AS u(k, d, l, b)
         ON CONFLICT DO NOTHING",
        &[&h, &keys, &at, &lsns, &batches],
    )
    .await
    .map_err(ctx("remembering deletes in cdc_pending_deletes"))?;
    Ok(())
}

async fn remember(tx: &Transaction<'_>, h: &str, ev: &DecodedEvent, batch: &str) -> Result<()> {
    tx.execute(
        "INSERT INTO public.cdc_pending_deletes (history_table, key, deleted_at, lsn, batch_id)
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
        &[&h, &ev.key, &time(ev.ts_us), &ev.lsn.unwrap_or(0), &batch],
    )
    .await
    .map_err(ctx("remembering a delete in cdc_pending_deletes"))?;
    Ok(())
}

/// The remembered deletes of `key` inside its versions end them (and are forgotten).
async fn settle(
    tx: &Transaction<'_>,
    sql: &HistorySql,
    remembered: &mut Remembered,
    key: &str,
    placed: &mut Placed,
) -> Result<()> {
    let h = sql.history().to_owned();
    let rows = tx
        .query(
            "SELECT deleted_at, lsn FROM public.cdc_pending_deletes
             WHERE history_table = $1 AND key = $2 ORDER BY deleted_at, lsn",
            &[&h, &key],
        )
        .await
        .map_err(ctx("reading cdc_pending_deletes"))?;
    let mut left = 0;
    for r in rows {
        let (at, lsn): (DateTime<Utc>, i64) = (r.get(0), r.get(1));
        let pos = (micros(at), lsn);
        let prev = around_prev(tx, sql, key, pos).await?;
        match prev {
            Some(p) if covers(&p, pos.0) && p.from.0 != pos.0 => {
                end_at(tx, sql, p.id, pos, (lsn != 0).then_some(lsn), true).await?;
                placed.closed += 1;
                placed.deletes += 1;
                tx.execute(
                    "DELETE FROM public.cdc_pending_deletes
                     WHERE history_table = $1 AND key = $2 AND deleted_at = $3 AND lsn = $4",
                    &[&h, &key, &at, &lsn],
                )
                .await
                .map_err(ctx("forgetting a remembered delete"))?;
            }
            _ => left += 1,
        }
    }
    if left == 0 {
        remembered.keys(tx, &h).await?.remove(key);
    }
    Ok(())
}

/// Where a version ends and by what (`None`: it is current).
fn ends_of(v: &Around) -> Option<(Op, i64, Option<i64>)> {
    let op = if v.truncated {
        Op::Truncate
    } else if v.deleted {
        Op::Delete
    } else {
        Op::Update
    };
    if v.current {
        None
    } else {
        v.to.map(|(t, l)| (op, t, l))
    }
}

fn covers(v: &Around, ts: i64) -> bool {
    v.to.is_none_or(|(to, _)| to > ts)
}

#[allow(clippy::too_many_arguments)]
async fn place_one(
    tx: &Transaction<'_>,
    sql: &HistorySql,
    remembered: &mut Remembered,
    ev: &DecodedEvent,
    hash: [u8; 16],
    batch: &str,
    placed: &mut Placed,
) -> Result<()> {
    if matches!(ev.op, Op::Truncate | Op::Schema | Op::SnapshotEnd) {
        return Ok(());
    }
    let pos = (ev.ts_us, ev.lsn.unwrap_or(0));
    let prev = around_prev(tx, sql, &ev.key, pos).await?;
    let next = around_next(tx, sql, &ev.key, pos).await?;
    // A change of the key at this instant is there already (but a truncate earlier in the
    // same transaction only ended the chain this state starts again).
    let ended_before = |p: &Around, end_lsn: Option<i64>| {
        p.truncated && end_lsn.unwrap_or(0) < ev.lsn.unwrap_or(0)
    };
    let same_instant = prev.as_ref().is_some_and(|p| {
        p.from.0 == ev.ts_us
            || p.to
                .is_some_and(|(t, l)| t == ev.ts_us && !ended_before(p, l))
    }) || next.is_some_and(|n| n.0 == ev.ts_us);
    if same_instant {
        return Ok(());
    }
    let inside = prev.as_ref().filter(|p| covers(p, ev.ts_us));
    if ev.op == Op::Delete {
        match inside {
            Some(p) => {
                end_at(tx, sql, p.id, pos, ev.lsn, true).await?;
                placed.closed += 1;
                placed.deletes += 1;
            }
            None => {
                let h = sql.history().to_owned();
                remember(tx, &h, ev, batch).await?;
                remembered.added += 1;
                remembered.keys(tx, &h).await?.insert(ev.key.clone());
            }
        }
        return Ok(());
    }
    // The end of the new version: where the version it splits ended, or (in a gap) the next
    // version's start or a remembered delete before it.
    let end: Option<(Op, i64, Option<i64>)> = match inside {
        Some(p) => {
            if p.hash == hash {
                return Ok(());
            }
            end_at(tx, sql, p.id, pos, ev.lsn, false).await?;
            placed.closed += 1;
            ends_of(p)
        }
        None => {
            let h = sql.history().to_owned();
            let delete = tx
                .query_opt(
                    "SELECT deleted_at, lsn FROM public.cdc_pending_deletes
                     WHERE history_table = $1 AND key = $2 AND (deleted_at, lsn) > ($3, $4)
                     ORDER BY deleted_at, lsn LIMIT 1",
                    &[&h, &ev.key, &time(ev.ts_us), &pos.1],
                )
                .await
                .map_err(ctx("reading cdc_pending_deletes"))?
                .map(|r| (micros(r.get(0)), r.get::<_, i64>(1)));
            match (delete, next) {
                (Some(d), n) if n.is_none_or(|n| d < n) => {
                    tx.execute(
                        "DELETE FROM public.cdc_pending_deletes
                         WHERE history_table = $1 AND key = $2 AND deleted_at = $3 AND lsn = $4",
                        &[&h, &ev.key, &time(d.0), &d.1],
                    )
                    .await
                    .map_err(ctx("forgetting a remembered delete"))?;
                    placed.deletes += 1;
                    Some((Op::Delete, d.0, (d.1 != 0).then_some(d.1)))
                }
                (_, Some(n)) => Some((Op::Update, n.0, (n.1 != 0).then_some(n.1))),
                (_, None) => None,
            }
        }
    };
    // The version the new one runs up to holding this very state (a re-snapshot's row,
    // placed before the change that made it arrived) is this state, known late: the new
    // version replaces it, as in order the later equal state would have added nothing.
    let end = match end {
        Some((Op::Update, t, l)) => {
            let at = (t, l.unwrap_or(0));
            match around_prev(tx, sql, &ev.key, at).await? {
                Some(n) if n.from == at && n.hash == hash => {
                    tx.execute(
                        &format!("DELETE FROM {} WHERE surrogate_key = $1", sql.history()),
                        &[&n.id],
                    )
                    .await
                    .map_err(ctx(format!(
                        "replacing an equal version in {}",
                        sql.history()
                    )))?;
                    placed.closed += 1;
                    ends_of(&n)
                }
                _ => end,
            }
        }
        end => end,
    };
    let next_ev = end.map(|(op, ts_us, lsn)| DecodedEvent {
        table: ev.table,
        op,
        key: ev.key.clone(),
        ts_us,
        lsn,
        tx_id: None,
        captured_ms: ev.captured_ms,
        values: Values::default(),
        schema: None,
        resnapshot: false,
    });
    let v = NewVersion {
        event: ev,
        hash: &hash,
        next: next_ev.as_ref(),
        batch,
    };
    super::store::copy_versions(tx, sql, std::slice::from_ref(&v)).await?;
    placed.inserted += 1;
    Ok(())
}

/// The key's version that starts at or before `pos`.
async fn around_prev(
    tx: &Transaction<'_>,
    sql: &HistorySql,
    key: &str,
    pos: (i64, i64),
) -> Result<Option<Around>> {
    let row = key_at(tx, sql, sql.late_prev(), key, pos).await?;
    Ok(row.map(|r| {
        let to: Option<DateTime<Utc>> = r.get(3);
        let end_lsn: Option<i64> = r.get(4);
        let b: &[u8] = r.get(8);
        let mut hash = [0; 16];
        if b.len() == 16 {
            hash.copy_from_slice(b);
        }
        Around {
            id: r.get(0),
            from: (micros(r.get(1)), r.get(2)),
            to: to.map(|t| (micros(t), end_lsn)),
            current: r.get(5),
            deleted: r.get(6),
            truncated: r.get(7),
            hash,
        }
    }))
}

/// The start of the key's first version after `pos`.
async fn around_next(
    tx: &Transaction<'_>,
    sql: &HistorySql,
    key: &str,
    pos: (i64, i64),
) -> Result<Option<(i64, i64)>> {
    let row = key_at(tx, sql, sql.late_next(), key, pos).await?;
    Ok(row.map(|r| (micros(r.get(0)), r.get(1))))
}

/// Ends version `id` at `pos` (deleted or not).
async fn end_at(
    tx: &Transaction<'_>,
    sql: &HistorySql,
    id: i64,
    pos: (i64, i64),
    lsn: Option<i64>,
    deleted: bool,
) -> Result<()> {
    tx.execute(
        &format!(
            "UPDATE {} SET valid_to = $2, end_lsn = CASE WHEN $3::int8 IS NULL THEN NULL ELSE '0/0'::pg_lsn + $3::int8::numeric END,
                 is_current = false, is_deleted = $4, is_truncated = false, updated_at = now()
             WHERE surrogate_key = $1",
            sql.history()
        ),
        &[&id, &time(pos.0), &lsn, &deleted],
    )
    .await
    .map_err(ctx(format!("ending a version in {}", sql.history())))?;
    Ok(())
}

/// Runs `query` (`late_prev` or `late_next`) for one key and position.
async fn key_at(
    tx: &Transaction<'_>,
    sql: &HistorySql,
    query: &str,
    key: &str,
    pos: (i64, i64),
) -> Result<Option<tokio_postgres::Row>> {
    let parts = sql.key_texts(key)?;
    let ts = time(pos.0);
    let mut params: Vec<&(dyn ToSql + Sync)> =
        parts.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
    params.push(&ts);
    params.push(&pos.1);
    tx.query_opt(query, &params).await.map_err(ctx(format!(
        "reading the versions of a key in {}",
        sql.history()
    )))
}
