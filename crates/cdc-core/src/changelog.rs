//! Change-log files: JSON Lines written to a temporary dot-file, fsynced, renamed to their
//! final `*.jsonl` name and the directory fsynced, so a reader never sees half a file (the
//! extractor's `ChangeSink`). Also the reader's side: which files are pending, and moving a
//! file to `processed/` or quarantining it in `dead_letter/` with a reason beside it.

use crate::error::{Error, Result};
use crate::event::Op;
use crate::sink::{ChangeSink, Durable, EventCounts, WrittenFile};
use crate::table::TableSpec;
use chrono::{DateTime, Utc};
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const DEAD_LETTER_DIR: &str = "dead_letter";
pub const PROCESSED_DIR: &str = "processed";
const TEMP_PREFIX: &str = ".tmp-";

struct OpenFile {
    temp: PathBuf,
    final_path: PathBuf,
    out: BufWriter<File>,
    events: u64,
    bytes: u64,
}

/// A full file of the pass, written and being fsynced on a thread of its own while the pass
/// goes on writing the next; `commit` waits for it.
struct SealedFile {
    temp: PathBuf,
    final_path: PathBuf,
    events: u64,
    bytes: u64,
    sync: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

/// Writes the events of each capture pass into one or more files of at most `max_events`
/// (more only to keep a transaction together). Files become visible only in `commit`, all
/// durable, in sequence order.
pub struct ChangeLogSink {
    dir: PathBuf,
    prefix: String,
    stamp: String,
    max_events: u64,
    next_seq: u64,
    current: Option<OpenFile>,
    done: Vec<SealedFile>,
    /// The current batch's events by table and operation.
    counts: EventCounts,
}

impl ChangeLogSink {
    /// Files named `<prefix>_<capture time>_<seq>.jsonl` in `dir`; `prefix` is the table name.
    pub fn new(dir: &Path, prefix: &str, max_events: u64) -> Self {
        ChangeLogSink {
            dir: dir.to_path_buf(),
            prefix: prefix.to_owned(),
            stamp: String::new(),
            max_events: max_events.max(1),
            next_seq: 1,
            current: None,
            done: Vec::new(),
            counts: EventCounts::default(),
        }
    }

    /// Whether the current file is full.
    fn current_is_full(&self) -> bool {
        self.current
            .as_ref()
            .is_some_and(|f| f.events >= self.max_events)
    }

    fn open_next(&mut self) -> Result<()> {
        create_private_dir(&self.dir)
            .map_err(|e| Error::io("creating the change-log directory", &self.dir, e))?;
        let name = format!("{}_{}_{:010}.jsonl", self.prefix, self.stamp, self.next_seq);
        self.next_seq += 1;
        let temp = self.dir.join(format!("{TEMP_PREFIX}{name}"));
        let file =
            create_private(&temp).map_err(|e| Error::io("creating change-log file", &temp, e))?;
        self.current = Some(OpenFile {
            temp,
            final_path: self.dir.join(name),
            out: BufWriter::with_capacity(1 << 20, file),
            events: 0,
            bytes: 0,
        });
        Ok(())
    }

    /// Flushes the current file (still under its temporary name) and starts its fsync on a
    /// thread, once the previous file's fsync has finished: one runs while the next file is
    /// written, never more (a thread that cannot be made: the fsync is done here).
    fn seal_current(&mut self) -> Result<()> {
        let Some(f) = self.current.take() else {
            return Ok(());
        };
        let file = match f.out.into_inner() {
            Ok(file) => Arc::new(file),
            Err(e) => {
                let _ = fs::remove_file(&f.temp);
                self.abort();
                return Err(Error::io(
                    "flushing change-log file",
                    &f.temp,
                    e.into_error(),
                ));
            }
        };
        let mut sealed = SealedFile {
            temp: f.temp,
            final_path: f.final_path,
            events: f.events,
            bytes: f.bytes,
            sync: None,
        };
        let previous = self.done.last_mut().map(SealedFile::wait_for_sync);
        let on_thread = Arc::clone(&file);
        let spawned = std::thread::Builder::new()
            .name("change-log fsync".into())
            .spawn(move || on_thread.sync_all());
        let here = match spawned {
            Ok(handle) => {
                sealed.sync = Some(handle);
                Ok(())
            }
            Err(_) => file.sync_all(),
        };
        let temp = sealed.temp.clone();
        self.done.push(sealed);
        // A failed fsync fails the pass: none of its files is kept, none may be published.
        let result = previous
            .unwrap_or(Ok(()))
            .and_then(|()| here.map_err(|e| Error::io("fsyncing change-log file", &temp, e)));
        if result.is_err() {
            self.abort();
        }
        result
    }
}

impl SealedFile {
    /// Waits for the file's fsync, if one is still running.
    fn wait_for_sync(&mut self) -> Result<()> {
        let result = self.sync.take().map_or(Ok(()), |sync| {
            sync.join()
                .unwrap_or_else(|_| Err(std::io::Error::other("the fsync thread panicked")))
        });
        result.map_err(|e| Error::io("fsyncing change-log file", &self.temp, e))
    }
}

impl ChangeSink for ChangeLogSink {
    fn begin(&mut self, captured_at: DateTime<Utc>, first_seq: u64) {
        self.abort();
        self.stamp = captured_at.format("%Y%m%dT%H%M%S%.6fZ").to_string();
        self.next_seq = first_seq;
    }

    /// Starts a new file when the current one is full, unless `keep_together` asks to stay.
    fn write(&mut self, json: &[u8], table: &TableSpec, op: Op, keep_together: bool) -> Result<()> {
        if self.current_is_full() && !keep_together {
            self.seal_current()?;
        }
        if self.current.is_none() {
            self.open_next()?;
        }
        let f = self.current.as_mut().expect("a file was just opened");
        let io = |e| Error::io("writing change-log file", &f.temp, e);
        f.out.write_all(json).map_err(io)?;
        f.out
            .write_all(b"\n")
            .map_err(|e| Error::io("writing change-log file", &f.temp, e))?;
        f.events += 1;
        f.bytes += json.len() as u64 + 1;
        self.counts.add(table, op);
        Ok(())
    }

    fn events_written(&self) -> u64 {
        self.done.iter().map(|f| f.events).sum::<u64>()
            + self.current.as_ref().map_or(0, |f| f.events)
    }

    /// Makes every file of the pass durable under its final name, in order.
    fn commit(&mut self) -> Result<Durable> {
        self.seal_current()?;
        // Every file durable before any is renamed: a reader never sees one that is not.
        let mut failed = None;
        for f in &mut self.done {
            if let Err(e) = f.wait_for_sync() {
                failed.get_or_insert(e);
            }
        }
        if let Some(e) = failed {
            self.abort();
            return Err(e);
        }
        let mut written = Vec::with_capacity(self.done.len());
        for f in self.done.drain(..) {
            fs::rename(&f.temp, &f.final_path)
                .map_err(|e| Error::io("renaming change-log file", &f.final_path, e))?;
            written.push(WrittenFile {
                path: f.final_path,
                events: f.events,
                bytes: f.bytes,
            });
        }
        if !written.is_empty() {
            sync_dir(&self.dir)?;
        }
        Ok(Durable::new(
            written,
            self.next_seq,
            std::mem::take(&mut self.counts),
        ))
    }

    /// Removes the pass's temporary files (nothing was renamed yet).
    fn abort(&mut self) {
        self.counts = EventCounts::default();
        if let Some(f) = self.current.take() {
            let _ = fs::remove_file(&f.temp);
        }
        for f in self.done.drain(..) {
            let _ = fs::remove_file(&f.temp);
        }
    }
}

/// Creates (or truncates) a file only its owner can read: change logs, archives, dead letters
/// and progress hold business data.
fn create_private(path: &Path) -> std::io::Result<File> {
    let mut o = fs::OpenOptions::new();
    o.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
    o.open(path)
}

/// Creates a directory (and its missing parents) only its owner can enter; an existing one is
/// left as it is.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut b = fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
    b.create(dir)
}

/// fsyncs a directory so that a rename in it survives a crash.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("fsyncing directory", dir, e))
}

/// Writes `bytes` to `path` atomically and durably (temp, fsync, rename, fsync directory).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    create_private_dir(dir).map_err(|e| Error::io("creating directory", dir, e))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = dir.join(format!("{TEMP_PREFIX}{name}"));
    let mut f = create_private(&temp).map_err(|e| Error::io("creating file", &temp, e))?;
    f.write_all(bytes)
        .map_err(|e| Error::io("writing file", &temp, e))?;
    f.sync_all()
        .map_err(|e| Error::io("fsyncing file", &temp, e))?;
    fs::rename(&temp, path).map_err(|e| Error::io("renaming file", path, e))?;
    sync_dir(dir)
}

/// Removes temporary files a crash left behind in `dir`. Returns how many.
pub fn clean_leftovers(dir: &Path) -> Result<usize> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(Error::io("listing directory", dir, e)),
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        if name.to_string_lossy().starts_with(TEMP_PREFIX) {
            let path = entry.path();
            fs::remove_file(&path)
                .map_err(|e| Error::io("removing leftover temporary file", &path, e))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Whether `name` is a change-log file's: `*.jsonl`, or `*.jsonl.zst` (an archived file put
/// back), not a dot-file.
pub(crate) fn is_change_log(name: &str) -> bool {
    !name.starts_with('.') && (name.ends_with(".jsonl") || name.ends_with(".jsonl.zst"))
}

/// The name a file is applied and recorded under (`cdc_applied_batches`): its own, without
/// the `.zst` of a compressed archive, so that an archived file put back is known.
pub fn batch_name(p: &Path) -> String {
    let name = file_name(p);
    match name.strip_suffix(".zst") {
        Some(plain) => plain.to_owned(),
        None => name,
    }
}

/// Opens a change-log file for reading, decompressing a `.zst` one. An archived file the
/// archive's upkeep compressed since it was listed is read compressed.
pub fn open_reader(p: &Path) -> std::io::Result<Box<dyn std::io::Read + Send>> {
    let (f, zst) = match File::open(p) {
        Ok(f) => (f, file_name(p).ends_with(".zst")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && file_name(p).ends_with(".jsonl") => {
            let mut z = p.as_os_str().to_owned();
            z.push(".zst");
            match File::open(PathBuf::from(z)) {
                Ok(f) => (f, true),
                Err(_) => return Err(e),
            }
        }
        Err(e) => return Err(e),
    };
    if zst {
        Ok(Box::new(zstd::stream::read::Decoder::new(f)?))
    } else {
        Ok(Box::new(f))
    }
}

/// The change-log files waiting in `dir`, in capture (lexical) order: every `*.jsonl` (or
/// `*.jsonl.zst`) regular file whose name does not start with a dot.
pub fn pending_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("listing the change-log directory", dir, e)),
    };
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
        .map(|e| e.path())
        .filter(|p| is_change_log(&file_name(p)))
        .collect();
    files.sort_by_key(|p| batch_name(p));
    Ok(files)
}

/// Entries of `dir` named like change-log files that are not regular files (a symbolic link,
/// a directory): never applied, so the loader quarantines them with a reason rather than
/// skip them silently.
pub fn strays(dir: &Path) -> Result<Vec<(PathBuf, &'static str)>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("listing the change-log directory", dir, e)),
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !is_change_log(&name) {
            continue;
        }
        let what = match e.file_type() {
            Ok(t) if t.is_file() => continue,
            Ok(t) if t.is_symlink() => "is a symbolic link",
            Ok(t) if t.is_dir() => "is a directory",
            _ => "is not a regular file",
        };
        out.push((e.path(), what));
    }
    out.sort();
    Ok(out)
}

pub fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Moves an applied file to `processed/` (kept as the raw audit trail).
pub fn archive(file: &Path) -> Result<PathBuf> {
    move_into(file, PROCESSED_DIR)
}

/// Moves a file that cannot be applied to `dead_letter/`, with `<name>.reason.json` beside it.
pub fn quarantine(file: &Path, reason: &Error) -> Result<PathBuf> {
    let target = move_into(file, DEAD_LETTER_DIR)?;
    let mut chain = Vec::new();
    let mut cur: Option<&dyn std::error::Error> = Some(reason);
    while let Some(e) = cur {
        chain.push(e.to_string());
        cur = e.source();
    }
    let line = match reason {
        Error::Parse { line, .. } if *line > 0 => Some(*line),
        _ => None,
    };
    let sidecar = serde_json::json!({
        "format_version": 1,
        "file": file_name(file),
        "line": line,
        "error": chain.join(": "),
        "quarantined_at": Utc::now().to_rfc3339(),
    });
    let sidecar_path = target.with_file_name(format!("{}.reason.json", file_name(&target)));
    write_atomic(&sidecar_path, format!("{sidecar:#}\n").as_bytes())?;
    Ok(target)
}

/// Upkeep of `processed/`: compresses archived files (`<name>.jsonl` becomes
/// `<name>.jsonl.zst`, written like every file here: temporary, fsynced, renamed, the
/// original removed last) and, with `retention`, removes archived files older than that
/// (but `keep_from` and every later file: a held table is to be replayed from it).
/// Returns (files compressed, files removed).
pub fn maintain_archive(
    log_dir: &Path,
    retention: Option<std::time::Duration>,
    keep_from: Option<&str>,
) -> Result<(usize, usize)> {
    let dir = log_dir.join(PROCESSED_DIR);
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((0, 0)),
        Err(e) => return Err(Error::io("listing the archive", &dir, e)),
    };
    let (mut compressed, mut removed) = (0, 0);
    let now = std::time::SystemTime::now();
    for entry in entries.flatten() {
        let path = entry.path();
        let name = file_name(&path);
        if !is_change_log(&name) {
            continue;
        }
        // A held table is to be replayed from this one on.
        let needed = keep_from.is_some_and(|k| batch_name(&path).as_str() >= k);
        if let Some(keep) = retention.filter(|_| !needed) {
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| now.duration_since(t).ok())
                .is_some_and(|age| age > keep);
            if old {
                fs::remove_file(&path).map_err(|e| Error::io("pruning the archive", &path, e))?;
                removed += 1;
                continue;
            }
        }
        if name.ends_with(".jsonl") {
            compress(&path)?;
            compressed += 1;
        }
    }
    if compressed + removed > 0 {
        sync_dir(&dir)?;
    }
    Ok((compressed, removed))
}

/// `<name>.jsonl` to `<name>.jsonl.zst` (zstd level 3), durably, then the original removed.
fn compress(path: &Path) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let target = dir.join(format!("{}.zst", file_name(path)));
    if !target.exists() {
        let temp = dir.join(format!("{TEMP_PREFIX}{}.zst", file_name(path)));
        let mut input =
            File::open(path).map_err(|e| Error::io("opening an archived file", path, e))?;
        let out = create_private(&temp).map_err(|e| Error::io("creating file", &temp, e))?;
        let mut enc = zstd::stream::write::Encoder::new(out, 3)
            .map_err(|e| Error::io("compressing", &temp, e))?;
        std::io::copy(&mut input, &mut enc).map_err(|e| Error::io("compressing", &temp, e))?;
        let out = enc
            .finish()
            .map_err(|e| Error::io("compressing", &temp, e))?;
        out.sync_all()
            .map_err(|e| Error::io("fsyncing file", &temp, e))?;
        fs::rename(&temp, &target).map_err(|e| Error::io("renaming file", &target, e))?;
        sync_dir(dir)?;
    }
    fs::remove_file(path).map_err(|e| Error::io("removing the compressed original", path, e))
}

fn move_into(file: &Path, sub: &str) -> Result<PathBuf> {
    let dir = file.parent().unwrap_or(Path::new(".")).join(sub);
    create_private_dir(&dir).map_err(|e| Error::io("creating directory", &dir, e))?;
    let target = dir.join(file_name(file));
    fs::rename(file, &target).map_err(|e| Error::io("moving change-log file", &target, e))?;
    sync_dir(&dir)?;
    if let Some(parent) = file.parent() {
        sync_dir(parent)?;
    }
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("cdc-changelog-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).expect("create temp dir");
        d
    }

    #[test]
    fn writer_splits_files_and_publishes_only_on_finish() {
        let dir = tempdir("split");
        let mut w = ChangeLogSink::new(&dir, "orders", 2);
        w.begin(Utc::now(), 7);
        for i in 0..5 {
            w.write(
                format!("{{\"n\":{i}}}").as_bytes(),
                &TableSpec::orders(),
                Op::Create,
                false,
            )
            .expect("write");
        }
        assert!(
            pending_files(&dir).expect("list").is_empty(),
            "nothing visible before finish"
        );
        let durable = w.commit().expect("finish");
        let files = durable.files();
        assert_eq!(
            files.iter().map(|f| f.events).collect::<Vec<_>>(),
            vec![2, 2, 1]
        );
        let pending = pending_files(&dir).expect("list");
        assert_eq!(pending.len(), 3);
        assert!(file_name(&pending[0]).ends_with("_0000000007.jsonl"));
        let all: String = pending
            .iter()
            .map(|p| fs::read_to_string(p).expect("read"))
            .collect();
        assert_eq!(all.lines().count(), 5);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn keep_together_stays_in_the_current_file() {
        let dir = tempdir("together");
        let mut w = ChangeLogSink::new(&dir, "orders", 1);
        let orders = TableSpec::orders();
        w.begin(Utc::now(), 1);
        w.write(b"{}", &orders, Op::Update, false).expect("write");
        w.write(b"{}", &orders, Op::Delete, true).expect("write");
        w.write(b"{}", &orders, Op::Update, false).expect("write");
        let durable = w.commit().expect("finish");
        let files = durable.files();
        assert_eq!(
            files.iter().map(|f| f.events).collect::<Vec<_>>(),
            vec![2, 1]
        );
        assert_eq!(
            durable.counts().iter().collect::<Vec<_>>(),
            vec![
                ("public.orders".to_owned(), Op::Update, 2),
                ("public.orders".to_owned(), Op::Delete, 1)
            ],
            "the durable events are counted by table and operation"
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn leftovers_and_dot_files_are_not_pending_and_leftovers_are_cleaned() {
        let dir = tempdir("leftover");
        fs::write(dir.join(".tmp-orders_x.jsonl"), "{}").expect("write");
        fs::write(dir.join(".hidden.jsonl"), "{}").expect("write");
        fs::write(dir.join("notes.txt"), "x").expect("write");
        fs::write(dir.join("orders_a.jsonl"), "{}").expect("write");
        assert_eq!(pending_files(&dir).expect("list").len(), 1);
        assert_eq!(clean_leftovers(&dir).expect("clean"), 1);
        assert!(!dir.join(".tmp-orders_x.jsonl").exists());
        let _ = fs::remove_dir_all(&dir);
    }
}
