//! SCD Type 2 apply of a batch of change-log files in one transaction.
//!
//! The events are read in chunks of at most `CHUNK_EVENTS` (memory does not grow with the
//! batch). For each chunk the loader asks the warehouse for the newest version of each key
//! in it (one indexed query), computes the versions to keep in memory, closes the
//! superseded current rows with one `UPDATE … FROM unnest(…)`, and writes the new versions
//! with one `COPY` straight into the history table. The files are recorded as applied in the
//! same transaction. A later chunk sees the earlier chunks' rows, exactly as a later batch
//! sees an earlier one.
//!
//! Rules (see DESIGN.md): one version per distinct committed state of a key, `valid_from` =
//! change time; events at or before the newest position the warehouse holds for a key are
//! duplicates and dropped; of several events of one key at one instant the last (by LSN,
//! then file order) wins; an event equal to the state before it adds nothing; a delete
//! closes the chain. Generated columns are generated columns of the history table too.

use crate::changelog::file_name;
use crate::db::ctx;
use crate::error::{Error, Result};
use crate::event::{decode, DecodedEvent, Op};
use crate::table::TableSpec;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures_util::{pin_mut, SinkExt};
use md5::{Digest, Md5};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::BufRead;
use std::path::PathBuf;
use tokio_postgres::Transaction;

/// Default of the most events held in memory at once (and handled by one set of
/// statements): `LOADER_MAX_EVENTS_IN_MEMORY`.
pub const CHUNK_EVENTS: usize = 16_384;

/// Bytes of COPY data sent at a time.
const COPY_FLUSH_BYTES: usize = 1 << 20;

/// What applying a batch changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub files: usize,
    pub events: u64,
    pub versions_inserted: u64,
    pub versions_closed: u64,
    pub deletes: u64,
    /// Where the time went, in milliseconds: waiting for decoded events (reading runs
    /// ahead on its own thread), reading the newest versions and computing the new ones,
    /// closing current rows, copying versions in.
    pub phases_ms: [u64; 4],
}

/// The SQL of the apply, rendered once for a table description.
#[derive(Debug, Clone)]
pub struct ApplySql {
    latest: String,
    close: String,
    copy_in: String,
    record_batches: String,
    /// Indexes of the tracked columns the loader writes (the others are generated).
    written: Vec<usize>,
    /// Whether each tracked column is a timestamp (compared as an instant for the row hash).
    is_time: Vec<bool>,
    /// Most events held in memory at once.
    chunk_events: usize,
}

impl ApplySql {
    pub fn new(spec: &TableSpec, chunk_events: usize) -> Self {
        let h = spec.history_qualified();
        let hk = &spec.history_key_column;
        let kt = &spec.key.sql_type;
        let written: Vec<usize> = (0..spec.columns.len())
            .filter(|&i| spec.columns[i].generated.is_none())
            .collect();
        let is_time = spec
            .columns
            .iter()
            .map(|c| c.sql_type.to_ascii_lowercase().starts_with("timestamp"))
            .collect();
        let latest = format!(
            "SELECT DISTINCT ON (x.{hk}) x.{hk}::text, x.is_current, decode(replace(x.row_hash::text, '-', ''), 'hex'),
                    CASE WHEN x.is_current THEN x.valid_from ELSE x.valid_to END,
                    (coalesce(CASE WHEN x.is_current THEN x.source_lsn ELSE x.end_lsn END, '0/0') - '0/0'::pg_lsn)::int8
             FROM {h} x
             WHERE x.{hk} = ANY($1::text[]::{kt}[])
             ORDER BY x.{hk}, x.valid_from DESC, x.source_lsn DESC NULLS LAST"
        );
        let close = format!(
            "UPDATE {h} x SET valid_to = f.ts, end_lsn = CASE WHEN f.lsn IS NULL THEN NULL ELSE '0/0'::pg_lsn + f.lsn::numeric END,
                              is_current = false, is_deleted = f.del, updated_at = now()
             FROM unnest($1::text[], $2::timestamptz[], $3::int8[], $4::bool[]) AS f(k, ts, lsn, del)
             WHERE x.{hk} = f.k::{kt} AND x.is_current"
        );
        let cols: String = written
            .iter()
            .map(|&i| format!("{}, ", spec.history_column(&spec.columns[i])))
            .collect();
        let copy_in = format!(
            "COPY {h} ({hk}, {cols}valid_from, valid_to, is_current, is_deleted, cdc_operation,
                       cdc_timestamp, batch_id, source_lsn, source_txid, end_lsn, row_hash) FROM STDIN"
        );
        let record_batches = "INSERT INTO public.cdc_applied_batches
                 (batch_id, history_table, events, versions_inserted, versions_closed, first_change_at, last_change_at, run_id)
             SELECT b.batch_id, $2, b.events, b.ins, b.del, b.first_at, b.last_at, $3
             FROM unnest($1::text[], $4::int8[], $5::int8[], $6::int8[], $7::timestamptz[], $8::timestamptz[])
                  AS b(batch_id, events, ins, del, first_at, last_at)"
            .to_owned();
        ApplySql {
            latest,
            close,
            copy_in,
            record_batches,
            written,
            is_time,
            chunk_events: chunk_events.max(1),
        }
    }
}

/// Per-file facts recorded in `cdc_applied_batches`.
#[derive(Default)]
struct FileFacts {
    name: String,
    events: i64,
    inserted: i64,
    deletes: i64,
    first: Option<DateTime<Utc>>,
    last: Option<DateTime<Utc>>,
}

/// One event of a chunk.
struct Ev {
    ord: usize,
    file: usize,
    ev: DecodedEvent,
    hash: [u8; 16],
}

/// What the reading thread hands to the applier.
enum Read {
    /// The next chunk of decoded events.
    Chunk(Vec<Ev>),
    /// All read: per file, its events and first and last change times.
    Done(Vec<FileRead>),
}

/// What the reader learned of one file: its events and first and last change times.
type FileRead = (i64, Option<DateTime<Utc>>, Option<DateTime<Utc>>);

/// Applies `files` (in order) in the transaction `tx`; the caller commits. A line that does
/// not decode fails the batch with `Error::Parse` naming the file and line.
///
/// Reading, decoding and hashing run on a thread of their own, one chunk ahead of the
/// database work on the previous chunk.
pub async fn apply_files(
    tx: &Transaction<'_>,
    sql: &ApplySql,
    spec: &TableSpec,
    files: &[PathBuf],
    run_id: &str,
) -> Result<ApplyStats> {
    let mut stats = ApplyStats {
        files: files.len(),
        ..Default::default()
    };
    let mut facts: Vec<FileFacts> = files
        .iter()
        .map(|p| FileFacts {
            name: file_name(p),
            ..Default::default()
        })
        .collect();
    let (send, mut recv) = tokio::sync::mpsc::channel::<Result<Read>>(1);
    {
        let (sql, spec, files) = (sql.clone(), spec.clone(), files.to_vec());
        // If the applier fails first, it drops `recv` and the reader stops at its next send.
        tokio::task::spawn_blocking(move || read_chunks(&sql, &spec, &files, &send));
    }
    let mut clock = std::time::Instant::now();
    loop {
        let msg = recv.recv().await.ok_or_else(|| {
            Error::setup(
                "change-log reader",
                "stopped without finishing (it panicked)",
            )
        })??;
        stats.phases_ms[0] += lap(&mut clock);
        match msg {
            Read::Chunk(mut chunk) => {
                stats.events += chunk.len() as u64;
                apply_chunk(
                    tx, sql, spec, &mut chunk, &mut facts, &mut stats, &mut clock,
                )
                .await?;
            }
            Read::Done(read) => {
                for (f, (events, first, last)) in facts.iter_mut().zip(read) {
                    (f.events, f.first, f.last) = (events, first, last);
                }
                break;
            }
        }
    }

    let names: Vec<&str> = facts.iter().map(|f| f.name.as_str()).collect();
    let col = |g: fn(&FileFacts) -> i64| facts.iter().map(g).collect::<Vec<i64>>();
    let firsts: Vec<Option<DateTime<Utc>>> = facts.iter().map(|f| f.first).collect();
    let lasts: Vec<Option<DateTime<Utc>>> = facts.iter().map(|f| f.last).collect();
    tx.execute(
        sql.record_batches.as_str(),
        &[
            &names,
            &spec.history_qualified(),
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
    Ok(stats)
}

/// The reading thread: decodes and hashes the events of `files` and sends them in chunks of
/// at most `sql.chunk_events` (never splitting one change time: events at one instant, a
/// transaction in logical mode, stay together, so a key never gets two versions at one
/// instant), then the per-file facts. Stops when the applier has gone.
fn read_chunks(
    sql: &ApplySql,
    spec: &TableSpec,
    files: &[PathBuf],
    send: &tokio::sync::mpsc::Sender<Result<Read>>,
) {
    // A chunk is started only once the channel has room for it, that is once the applier has
    // taken the previous one: at most two chunks live (one applied, one being read).
    let rt = tokio::runtime::Handle::current();
    let mut permit: Option<tokio::sync::mpsc::Permit<'_, Result<Read>>> = None;
    let mut chunk: Vec<Ev> = Vec::new();
    let mut read = Vec::with_capacity(files.len());
    let mut ord = 0;
    let mut result = Ok(());
    'files: for (fi, path) in files.iter().enumerate() {
        let (mut events, mut first, mut last) = (0, None, None);
        let reader = match std::fs::File::open(path) {
            Ok(f) => std::io::BufReader::with_capacity(1 << 20, f),
            Err(e) => {
                result = Err(Error::io("opening change-log file", path, e));
                break;
            }
        };
        for (i, line) in reader.lines().enumerate() {
            let decoded = line
                .map_err(|e| Error::io("reading change-log file", path, e))
                .and_then(|line| {
                    if line.trim().is_empty() {
                        return Ok(None);
                    }
                    let bad = |message: String| Error::Parse {
                        path: path.clone(),
                        line: i as u64 + 1,
                        message,
                    };
                    let ev = decode(&line, spec).map_err(bad)?;
                    let ts = timestamp(ev.ts_us).map_err(bad)?;
                    timestamp(ev.captured_ms.saturating_mul(1000)).map_err(bad)?;
                    Ok(Some((ev, ts)))
                });
            let (ev, ts) = match decoded {
                Ok(Some(x)) => x,
                Ok(None) => continue,
                Err(e) => {
                    result = Err(e);
                    break 'files;
                }
            };
            first = Some(first.map_or(ts, |x: DateTime<Utc>| x.min(ts)));
            last = Some(last.map_or(ts, |x: DateTime<Utc>| x.max(ts)));
            events += 1;
            ord += 1;
            if chunk.len() >= sql.chunk_events
                && chunk.last().is_some_and(|l| l.ev.ts_us != ev.ts_us)
            {
                if let Some(p) = permit.take() {
                    p.send(Ok(Read::Chunk(std::mem::take(&mut chunk))));
                }
            }
            if permit.is_none() {
                match rt.block_on(send.reserve()) {
                    Ok(p) => permit = Some(p),
                    // The applier has gone (it failed): stop.
                    Err(_) => return,
                }
                chunk.reserve(sql.chunk_events.min(1 << 16));
            }
            let hash = row_hash(&ev, sql);
            chunk.push(Ev {
                ord,
                file: fi,
                ev,
                hash,
            });
        }
        read.push((events, first, last));
    }
    let last_msg = match result {
        Ok(()) => Ok(Read::Done(read)),
        Err(e) => Err(e),
    };
    match permit {
        Some(p) => {
            if last_msg.is_ok() {
                p.send(Ok(Read::Chunk(chunk)));
                let _ = send.blocking_send(last_msg);
            } else {
                p.send(last_msg);
            }
        }
        None => {
            let _ = send.blocking_send(last_msg);
        }
    }
}

fn lap(clock: &mut std::time::Instant) -> u64 {
    let ms = clock.elapsed().as_millis() as u64;
    *clock = std::time::Instant::now();
    ms
}

/// The newest version the warehouse holds for a key: its state and position.
struct Latest {
    current: bool,
    hash: [u8; 16],
    ts_us: i64,
    pos: i64,
}

fn hash16(b: &[u8]) -> [u8; 16] {
    let mut h = [0; 16];
    if b.len() == 16 {
        h.copy_from_slice(b);
    }
    h
}

/// A version to write, or a delete that ends a chain.
struct Kept {
    idx: usize,
    next: Option<usize>,
}

async fn apply_chunk(
    tx: &Transaction<'_>,
    sql: &ApplySql,
    spec: &TableSpec,
    chunk: &mut Vec<Ev>,
    facts: &mut [FileFacts],
    stats: &mut ApplyStats,
    clock: &mut std::time::Instant,
) -> Result<()> {
    let hist = spec.history_qualified();
    // Group by key, in change order; of one key's events at one instant the last wins.
    chunk.sort_by(|a, b| {
        (a.ev.key.as_str(), a.ev.ts_us, a.ev.lsn.unwrap_or(0), a.ord).cmp(&(
            b.ev.key.as_str(),
            b.ev.ts_us,
            b.ev.lsn.unwrap_or(0),
            b.ord,
        ))
    });
    let mut keys: Vec<&str> = chunk.iter().map(|e| e.ev.key.as_str()).collect();
    keys.dedup();
    let rows = tx
        .query(sql.latest.as_str(), &[&keys])
        .await
        .map_err(ctx(format!("reading the newest versions in {hist}")))?;
    let mut latest: HashMap<String, Latest> = HashMap::with_capacity(rows.len());
    for r in rows {
        let ts: DateTime<Utc> = r.get(3);
        latest.insert(
            r.get(0),
            Latest {
                current: r.get(1),
                hash: hash16(r.get(2)),
                ts_us: ts.timestamp_micros(),
                pos: r.get(4),
            },
        );
    }

    // Decide, key by key, which events become versions (see the module's rules).
    let mut kept: Vec<Kept> = Vec::new();
    let mut closes: Vec<usize> = Vec::new();
    let mut start = 0;
    while start < chunk.len() {
        let key = chunk[start].ev.key.as_str();
        let mut end = start;
        while end < chunk.len() && chunk[end].ev.key == key {
            end += 1;
        }
        let lat = latest.get(key);
        // (op is a delete, hash) of the state before the next event.
        let mut prev: Option<(bool, [u8; 16])> = lat.map(|l| (!l.current, l.hash));
        let first_kept = kept.len();
        for i in start..end {
            let e = &chunk[i];
            let last_at_instant = i + 1 == end || chunk[i + 1].ev.ts_us != e.ev.ts_us;
            let fresh = lat.is_none_or(|l| (e.ev.ts_us, e.ev.lsn.unwrap_or(0)) > (l.ts_us, l.pos));
            if !last_at_instant || !fresh {
                continue;
            }
            let delete = e.ev.op == Op::Delete;
            let keep = match prev {
                None => !delete,
                Some((prev_deleted, prev_hash)) => {
                    if delete {
                        !prev_deleted
                    } else {
                        prev_deleted || prev_hash != e.hash
                    }
                }
            };
            prev = Some((delete, e.hash));
            if keep {
                if kept.len() > first_kept {
                    let last = kept.len() - 1;
                    kept[last].next = Some(i);
                }
                kept.push(Kept { idx: i, next: None });
            }
        }
        if kept.len() > first_kept && lat.is_some_and(|l| l.current) {
            closes.push(kept[first_kept].idx);
        }
        start = end;
    }
    stats.phases_ms[1] += lap(clock);

    // Close the current rows the first new event of their key supersedes.
    if !closes.is_empty() {
        let ks: Vec<&str> = closes.iter().map(|&i| chunk[i].ev.key.as_str()).collect();
        let ts: Vec<DateTime<Utc>> = closes
            .iter()
            .map(|&i| timestamp(chunk[i].ev.ts_us).unwrap_or_default())
            .collect();
        let lsn: Vec<Option<i64>> = closes.iter().map(|&i| chunk[i].ev.lsn).collect();
        let del: Vec<bool> = closes
            .iter()
            .map(|&i| chunk[i].ev.op == Op::Delete)
            .collect();
        stats.versions_closed += tx
            .execute(sql.close.as_str(), &[&ks, &ts, &lsn, &del])
            .await
            .map_err(ctx(format!("closing current versions in {hist}")))?;
    }
    stats.phases_ms[2] += lap(clock);

    // Write the new versions.
    let sink = tx
        .copy_in(sql.copy_in.as_str())
        .await
        .map_err(ctx(format!("starting the COPY into {hist}")))?;
    pin_mut!(sink);
    let mut buf = String::with_capacity(COPY_FLUSH_BYTES + 4096);
    for k in &kept {
        let e = &chunk[k.idx];
        if e.ev.op == Op::Delete {
            stats.deletes += 1;
            facts[e.file].deletes += 1;
            continue;
        }
        let next = k.next.map(|n| &chunk[n].ev);
        copy_row(&mut buf, sql, e, next, &facts[e.file].name);
        stats.versions_inserted += 1;
        facts[e.file].inserted += 1;
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
        .map_err(ctx(format!("copying versions into {hist}")))?;
    stats.phases_ms[3] += lap(clock);
    chunk.clear();
    Ok(())
}

/// One line of COPY text for the version `e`, closed by `next` if any.
fn copy_row(buf: &mut String, sql: &ApplySql, e: &Ev, next: Option<&DecodedEvent>, batch: &str) {
    let ev = &e.ev;
    push_text(buf, &ev.key);
    for &i in &sql.written {
        buf.push('\t');
        match ev.values.get(i) {
            Some(v) => push_text(buf, v),
            None => buf.push_str("\\N"),
        }
    }
    buf.push('\t');
    push_time(buf, ev.ts_us);
    buf.push('\t');
    match next {
        Some(n) => push_time(buf, n.ts_us),
        None => buf.push_str("\\N"),
    }
    let is_deleted = next.is_some_and(|n| n.op == Op::Delete);
    let _ = write!(
        buf,
        "\t{}\t{}\t{}\t",
        if next.is_none() { 't' } else { 'f' },
        if is_deleted { 't' } else { 'f' },
        ev.op.as_char()
    );
    push_time(buf, ev.captured_ms.saturating_mul(1000));
    buf.push('\t');
    push_text(buf, batch);
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
    push_lsn(buf, next.and_then(|n| n.lsn));
    buf.push('\t');
    for (i, b) in e.hash.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            buf.push('-');
        }
        let _ = write!(buf, "{b:02x}");
    }
    buf.push('\n');
}

/// A value in COPY text format.
pub fn push_text(buf: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => buf.push_str("\\\\"),
            '\t' => buf.push_str("\\t"),
            '\n' => buf.push_str("\\n"),
            '\r' => buf.push_str("\\r"),
            c => buf.push(c),
        }
    }
}

/// A time in microseconds since the epoch, in COPY text format (`\N` when out of range).
pub fn push_time(buf: &mut String, us: i64) {
    match timestamp(us) {
        Ok(t) => {
            let _ = write!(buf, "{}", t.format("%Y-%m-%d %H:%M:%S%.6f+00"));
        }
        Err(_) => buf.push_str("\\N"),
    }
}

fn push_lsn(buf: &mut String, lsn: Option<i64>) {
    match lsn {
        Some(l) => {
            let l = l as u64;
            let _ = write!(buf, "{:X}/{:X}", l >> 32, l & 0xffff_ffff);
        }
        None => buf.push_str("\\N"),
    }
}

fn timestamp(us: i64) -> std::result::Result<DateTime<Utc>, String> {
    DateTime::<Utc>::from_timestamp_micros(us)
        .ok_or_else(|| format!("time {us} µs is out of range"))
}

/// The row hash of an event's state, stored as a UUID: MD5 over the written columns'
/// values, timestamps as instants (so that the same state hashes the same whichever capture
/// mode wrote it). Deletes carry no state.
fn row_hash(ev: &DecodedEvent, sql: &ApplySql) -> [u8; 16] {
    let mut md5 = Md5::new();
    if ev.op != Op::Delete {
        for &i in &sql.written {
            // Each value is tagged and length-prefixed, so no two value lists share bytes.
            match ev.values.get(i) {
                None => md5.update(b"N"),
                Some(v) => match sql.is_time[i]
                    .then(|| DateTime::parse_from_rfc3339(v).ok())
                    .flatten()
                {
                    Some(t) => {
                        md5.update(b"T");
                        md5.update(t.timestamp_micros().to_le_bytes());
                    }
                    None => {
                        md5.update(b"V");
                        md5.update((v.len() as u64).to_le_bytes());
                        md5.update(v.as_bytes());
                    }
                },
            }
        }
    }
    md5.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(values: &[Option<&str>]) -> DecodedEvent {
        DecodedEvent {
            op: Op::Update,
            key: "1".into(),
            ts_us: 0,
            lsn: None,
            tx_id: None,
            captured_ms: 0,
            values: values.iter().copied().collect(),
        }
    }

    #[test]
    fn the_row_hash_sees_instants_and_nulls_not_spelling() {
        let sql = ApplySql::new(&TableSpec::orders(), CHUNK_EVENTS);
        let base = [
            Some("1"),
            Some("2"),
            Some("3"),
            Some("4.50"),
            None,
            Some("pending"),
            Some("2026-01-01T00:00:00+00:00"),
            Some("2026-01-01T00:00:00.5+00:00"),
        ];
        let h = row_hash(&ev(&base), &sql);
        // The same instant in another zone, and a generated column's value, change nothing.
        let mut same = base;
        same[6] = Some("2026-01-01T01:00:00+01:00");
        same[4] = Some("13.50");
        assert_eq!(row_hash(&ev(&same), &sql), h);
        let mut other = base;
        other[5] = Some("shipped");
        assert_ne!(row_hash(&ev(&other), &sql), h);
        let mut null = base;
        null[3] = None;
        assert_ne!(row_hash(&ev(&null), &sql), h);
        // Values cannot run into each other.
        let mut a = base;
        (a[0], a[1]) = (Some("1\x1f"), Some("2"));
        let mut b = base;
        (b[0], b[1]) = (Some("1"), Some("\x1f2"));
        assert_ne!(row_hash(&ev(&a), &sql), row_hash(&ev(&b), &sql));
    }

    #[test]
    fn copy_text_is_escaped_and_positions_are_lsns() {
        let mut b = String::new();
        push_text(&mut b, "a\tb\\c\nd");
        assert_eq!(b, "a\\tb\\\\c\\nd");
        let mut b = String::new();
        push_lsn(&mut b, Some(0x1_0000_00AB));
        assert_eq!(b, "1/AB");
        let mut b = String::new();
        push_time(&mut b, 1_500_000);
        assert_eq!(b, "1970-01-01 00:00:01.500000+00");
    }
}
