//! What a pipeline owns on disk, and proof that it alone runs: the change-log directory
//! records the pipeline that writes into it (`.pipeline`), and a running extractor holds an
//! exclusive lock in its change-log and state directories, so that a second extractor of the
//! same pipeline (whose start-up cleanup would delete the first one's in-flight files) or
//! another pipeline's is refused at start-up; a running loader holds one in the change-log
//! directory. `status` reads the locks' process ids to tell which programs run.

use crate::changelog::{create_private_dir, write_atomic};
use crate::error::{Error, Result};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The file in `CDC_LOG_DIR` naming the pipeline and change-log stream that write there.
pub const OWNER_FILE: &str = ".pipeline";

/// Who writes a change-log directory: the pipeline's name and its files' prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogDirOwner {
    pub pipeline: String,
    pub stream: String,
}

impl LogDirOwner {
    fn render(&self) -> String {
        format!("pipeline {}\nstream {}\n", self.pipeline, self.stream)
    }

    fn parse(text: &str) -> Option<LogDirOwner> {
        let mut pipeline = None;
        let mut stream = None;
        for line in text.lines() {
            match line.split_once(' ') {
                Some(("pipeline", v)) => pipeline = Some(v.trim().to_owned()),
                Some(("stream", v)) => stream = Some(v.trim().to_owned()),
                _ => {}
            }
        }
        Some(LogDirOwner {
            pipeline: pipeline?,
            stream: stream?,
        })
    }

    fn describe(&self) -> String {
        format!(
            "pipeline '{}' (files {}_*.jsonl)",
            self.pipeline, self.stream
        )
    }
}

/// The recorded owner of `dir`, if any.
fn recorded_owner(dir: &Path) -> Result<Option<LogDirOwner>> {
    let path = dir.join(OWNER_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => LogDirOwner::parse(&text)
            .map(Some)
            .ok_or_else(|| Error::State {
                path,
                message: "expected the lines `pipeline <name>` and `stream <prefix>`".into(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(
            "reading the change-log directory's owner",
            &path,
            e,
        )),
    }
}

fn refuse(dir: &Path, recorded: &LogDirOwner, ours: &LogDirOwner) -> Error {
    Error::config(
        "CDC_LOG_DIR",
        format!(
            "{} belongs to {}, but this is {}; give each pipeline its own CDC_LOG_DIR \
             (or set CDC_PIPELINE_NAME / CDC_TABLES as that pipeline has them)",
            dir.display(),
            recorded.describe(),
            ours.describe()
        ),
    )
}

/// The extractor's claim: creates `dir` (owner-only) and records `ours` as its owner, or
/// refuses a directory another pipeline owns.
pub fn claim_log_dir(dir: &Path, ours: &LogDirOwner) -> Result<()> {
    create_private_dir(dir).map_err(|e| Error::io("creating the change-log directory", dir, e))?;
    match recorded_owner(dir)? {
        Some(r) if &r == ours => Ok(()),
        Some(r) => Err(refuse(dir, &r, ours)),
        None => write_atomic(&dir.join(OWNER_FILE), ours.render().as_bytes()),
    }
}

/// The loader's check: `dir` must exist (a mistyped `CDC_LOG_DIR` would otherwise idle
/// silently) and, once an extractor has claimed it, belong to this pipeline.
pub fn check_log_dir(dir: &Path, ours: &LogDirOwner) -> Result<()> {
    match fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(Error::config(
                "CDC_LOG_DIR",
                format!("{} is not a directory", dir.display()),
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::config(
                "CDC_LOG_DIR",
                format!(
                    "{} does not exist; point CDC_LOG_DIR at the extractor's change-log directory \
                     (the extractor creates it when it starts)",
                    dir.display()
                ),
            ))
        }
        Err(e) => return Err(Error::io("reading the change-log directory", dir, e)),
    }
    match recorded_owner(dir)? {
        Some(r) if &r != ours => Err(refuse(dir, &r, ours)),
        _ => Ok(()),
    }
}

/// Exclusive locks held for as long as a program runs (released by the operating system
/// when the process ends, however it ends); the lock files hold its process id, which
/// `status` reads to tell whether it runs.
#[derive(Debug)]
pub struct ProcessLock {
    _files: Vec<File>,
}

/// The lock file of `program` (`extractor`, `scd2-loader`) in the change-log directory.
fn lock_name(program: &str) -> String {
    format!(".{program}.lock")
}

impl ProcessLock {
    /// The extractor's: `log_dir` and `state_dir`, or a refusal (exit 2) naming the process
    /// that holds them.
    pub fn extractor(log_dir: &Path, state_dir: &Path, pipeline: &str) -> Result<ProcessLock> {
        Ok(ProcessLock {
            _files: vec![
                lock_one(log_dir, "CDC_LOG_DIR", &lock_name("extractor"), "extractor")?,
                lock_one(
                    state_dir,
                    "CDC_STATE_DIR",
                    &format!(".extractor-{pipeline}.lock"),
                    "extractor",
                )?,
            ],
        })
    }

    /// The loader's, in `log_dir` (one loader per change-log directory).
    pub fn loader(log_dir: &Path) -> Result<ProcessLock> {
        Ok(ProcessLock {
            _files: vec![lock_one(
                log_dir,
                "CDC_LOG_DIR",
                &lock_name("scd2-loader"),
                "scd2-loader",
            )?],
        })
    }
}

/// The process id of the running `program` whose lock is in `log_dir`, if it runs.
pub fn running(log_dir: &Path, program: &str) -> Option<u32> {
    let pid: u32 = fs::read_to_string(log_dir.join(lock_name(program)))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    process_alive(pid, Some(program)).then_some(pid)
}

/// Whether process `pid` lives (and, given `name`, runs a program of that name: a process id
/// may have been reused). Where `/proc` is missing, assumed alive.
pub fn process_alive(pid: u32, name: Option<&str>) -> bool {
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    if !Path::new("/proc/self").exists() {
        return true;
    }
    if !proc_dir.exists() {
        return false;
    }
    match name {
        Some(n) => fs::read(proc_dir.join("cmdline"))
            .map(|c| String::from_utf8_lossy(&c).contains(n))
            .unwrap_or(false),
        None => true,
    }
}

fn lock_one(dir: &Path, setting: &str, name: &str, program: &str) -> Result<File> {
    create_private_dir(dir).map_err(|e| Error::io("creating directory", dir, e))?;
    let path: PathBuf = dir.join(name);
    let mut o = OpenOptions::new();
    o.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
    let mut f = o
        .open(&path)
        .map_err(|e| Error::io("opening the process lock", &path, e))?;
    match f.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = f.read_to_string(&mut holder);
            let holder = holder.trim();
            return Err(Error::config(
                setting,
                format!(
                    "another {program} is running on {} (process {}, lock {}); stop it first, \
                     or give this pipeline its own {setting}",
                    dir.display(),
                    if holder.is_empty() { "unknown" } else { holder },
                    path.display()
                ),
            ));
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(Error::io("taking the process lock", &path, e))
        }
    }
    let pid = std::process::id().to_string();
    f.set_len(0)
        .and_then(|()| f.seek(SeekFrom::Start(0)).map(|_| ()))
        .and_then(|()| f.write_all(pid.as_bytes()))
        .map_err(|e| Error::io("writing the process lock", &path, e))?;
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(p: &str, s: &str) -> LogDirOwner {
        LogDirOwner {
            pipeline: p.into(),
            stream: s.into(),
        }
    }

    #[test]
    fn a_log_dir_is_claimed_once_and_refused_to_another_pipeline() {
        let dir = std::env::temp_dir().join(format!("cdc-own-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let ours = owner("cdc", "orders");
        assert!(check_log_dir(&dir, &ours)
            .unwrap_err()
            .to_string()
            .contains("does not exist"));
        claim_log_dir(&dir, &ours).unwrap();
        claim_log_dir(&dir, &ours).unwrap();
        check_log_dir(&dir, &ours).unwrap();
        for other in [owner("billing", "orders"), owner("cdc", "pipeline-cdc")] {
            let e = claim_log_dir(&dir, &other).unwrap_err().to_string();
            assert!(
                e.contains("CDC_LOG_DIR") && e.contains("pipeline 'cdc'"),
                "{e}"
            );
            assert!(check_log_dir(&dir, &other).is_err());
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_second_extractor_lock_is_refused_naming_the_holder() {
        let base = std::env::temp_dir().join(format!("cdc-lock-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        let (logs, state) = (base.join("logs"), base.join("state"));
        let held = ProcessLock::extractor(&logs, &state, "cdc").unwrap();
        let e = ProcessLock::extractor(&logs, &state, "cdc").unwrap_err();
        assert!(matches!(e, Error::Config { .. }));
        let e = e.to_string();
        assert!(e.contains("another extractor is running"), "{e}");
        assert!(e.contains(&std::process::id().to_string()), "{e}");
        drop(held);
        ProcessLock::extractor(&logs, &state, "cdc").unwrap();
        let _loader = ProcessLock::loader(&logs).unwrap();
        assert!(ProcessLock::loader(&logs)
            .unwrap_err()
            .to_string()
            .contains("another scd2-loader is running"));
        fs::remove_dir_all(&base).unwrap();
    }
}
