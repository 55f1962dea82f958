//! Online re-snapshot (`extractor resnapshot <schema.table>`): one table read again, whole and
//! consistently, while capture of the others goes on; the loader then adds a version wherever
//! a row differs from the history and ends, at the snapshot's position, every key the snapshot
//! no longer has (a delete the capture never saw: a lost slot, triggers bypassed).
//!
//! The command records a durable request in `CDC_STATE_DIR` (`resnapshot-<schema.table>.request`);
//! the running extractor takes it at its next pass, or, when none runs, the command runs one
//! pass itself. A request is removed only after the pass that took it made its events durable
//! and saved its progress: a crash in between takes the snapshot again, which adds nothing.
//!
//! The snapshot's events: each row an `r` event marked `source.snapshot` `"incremental"`, all
//! at the snapshot's position, then a snapshot-end event (`op` `e`) at the same position
//! (change-log format 5).

use super::rows::{copy_rows, image_values, null, row_header, ImageColumns};
use crate::changelog::{sync_dir, write_atomic};
use crate::db::ctx;
use crate::error::{Error, Result};
use crate::event::encode::{write_event, write_snapshot_end, Header};
use crate::event::{CaptureMode, Op};
use crate::sink::ChangeSink;
use crate::table::TableSpec;
use std::path::{Path, PathBuf};

/// The request file of `table` (`schema.table`).
pub fn request_path(state_dir: &Path, table: &str) -> PathBuf {
    state_dir.join(format!("resnapshot-{table}.request"))
}

/// Records, durably, that `table` is to be read again.
pub fn request(state_dir: &Path, table: &str) -> Result<PathBuf> {
    let path = request_path(state_dir, table);
    let body = serde_json::json!({
        "format_version": 1,
        "table": table,
        "requested_at": chrono::Utc::now().to_rfc3339(),
    });
    write_atomic(&path, body.to_string().as_bytes())?;
    Ok(path)
}

/// Whether a re-snapshot of `table` is requested.
pub fn requested(state_dir: &Path, table: &str) -> bool {
    request_path(state_dir, table).exists()
}

/// Removes the request of `table` (the snapshot it asked for is durable, and so is the
/// progress after it).
pub fn done(state_dir: &Path, table: &str) -> Result<()> {
    let path = request_path(state_dir, table);
    match std::fs::remove_file(&path) {
        Ok(()) => sync_dir(state_dir),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("removing the re-snapshot request", &path, e)),
    }
}

/// Writes the re-snapshot of `spec` into `sink`: every row the transaction's snapshot shows,
/// as an `r` event at `(ts_us, lsn)`, then the snapshot's end there. Returns the rows.
pub async fn copy_table(
    tx: &tokio_postgres::Transaction<'_>,
    spec: &TableSpec,
    mode: CaptureMode,
    ts_us: i64,
    lsn: Option<u64>,
    captured_ms: i64,
    sink: &mut dyn ChangeSink,
) -> Result<u64> {
    let cols = ImageColumns::load(tx, spec).await?;
    let t = "t";
    let sql = format!(
        "COPY (SELECT {list} FROM {table} {t} ORDER BY {key}) TO STDOUT",
        list = cols.select_list(t),
        table = spec.qualified(),
        key = spec.key_list(t),
    );
    let stream = tx.copy_out(sql.as_str()).await.map_err(ctx(format!(
        "reading the rows of {} for its re-snapshot",
        spec.qualified()
    )))?;
    let what = format!("re-snapshot of {}", spec.qualified());
    let mut buf = Vec::with_capacity(1024);
    let mut rows = 0u64;
    copy_rows(stream, &what, |row| {
        let image = image_values(row, 0);
        let key = cols.key(spec, &image, &what)?;
        let h = Header {
            incremental: true,
            lsn,
            ..row_header(&cols, Op::Read, mode, true, ts_us, &key, captured_ms)
        };
        buf.clear();
        write_event(&mut buf, spec, &h, null, |b| {
            cols.write_image(b, Some(&image))
        });
        sink.write(&buf, spec, Op::Read, false)?;
        rows += 1;
        Ok(())
    })
    .await?;
    let h = Header {
        lsn,
        ..row_header(&cols, Op::SnapshotEnd, mode, true, ts_us, "", captured_ms)
    };
    buf.clear();
    write_snapshot_end(&mut buf, spec, &h);
    sink.write(&buf, spec, Op::SnapshotEnd, false)?;
    Ok(rows)
}
