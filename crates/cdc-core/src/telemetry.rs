//! Logging: human-readable lines or JSON, to stderr or to rotating files of the program's own
//! (one set of files per program and format, so that one file never mixes formats).

use crate::config::{LogFormat, LogOutput, LogRotation, LogSettings};
use crate::error::{Error, Result};
use std::path::Path;
use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_appender::rolling::{RollingFileAppender, Rotation};

/// Keeps the file writer's worker running; dropping it flushes what is queued. Drop it
/// before `std::process::exit`, which runs no destructors.
#[must_use = "dropping the guard stops the log writer"]
pub struct LogGuard {
    _worker: Option<WorkerGuard>,
}

/// Installs the global subscriber for `program` (the files' name). Call once, after the
/// configuration has been validated. A log file that cannot be created is a setting error
/// naming `LOG_DIR`.
pub fn init(settings: &LogSettings, program: &str) -> Result<LogGuard> {
    let filter = tracing_subscriber::EnvFilter::try_new(&settings.filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    match &settings.output {
        LogOutput::Stderr => {
            let builder = builder.with_writer(std::io::stderr);
            let _ = match settings.format {
                LogFormat::Json => builder.json().flatten_event(true).try_init(),
                LogFormat::Text => builder.with_ansi(stderr_is_terminal()).try_init(),
            };
            Ok(LogGuard { _worker: None })
        }
        LogOutput::File {
            dir,
            rotation,
            max_files,
        } => {
            let appender = rolling_file(dir, program, settings.format, *rotation, *max_files)?;
            // Never drops a line: a full queue makes the program wait for the disk instead.
            let (writer, guard) = NonBlockingBuilder::default()
                .lossy(false)
                .thread_name("log-writer")
                .finish(appender);
            let builder = builder.with_writer(writer).with_ansi(false);
            let _ = match settings.format {
                LogFormat::Json => builder.json().flatten_event(true).try_init(),
                LogFormat::Text => builder.try_init(),
            };
            Ok(LogGuard {
                _worker: Some(guard),
            })
        }
    }
}

/// The file names of `program`'s log in `format`: dated files `<prefix>.<date>.log` and the
/// link to the current one. Text and JSON differ in the prefix, so that neither pruning
/// counts (or deletes) the other's files.
pub fn file_names(program: &str, format: LogFormat) -> (String, String) {
    match format {
        LogFormat::Text => (format!("{program}.text"), format!("{program}.log")),
        LogFormat::Json => (format!("{program}.json"), format!("{program}.json.log")),
    }
}

fn rolling_file(
    dir: &Path,
    program: &str,
    format: LogFormat,
    rotation: LogRotation,
    max_files: usize,
) -> Result<RollingFileAppender> {
    let (prefix, link) = file_names(program, format);
    keep_plain_file(dir, &link, &prefix)?;
    let build = || {
        RollingFileAppender::builder()
            .rotation(match rotation {
                LogRotation::Daily => Rotation::DAILY,
                LogRotation::Hourly => Rotation::HOURLY,
            })
            .filename_prefix(&prefix)
            .filename_suffix("log")
            .latest_symlink(&link)
            .max_log_files(max_files)
            .build(dir)
    };
    // Once more on failure: another copy of the program (`status` beside the loop) may have
    // been re-making the link at that instant.
    build().or_else(|_| build()).map_err(|e| {
        Error::config(
            "LOG_DIR",
            format!(
                "cannot write {prefix}.<date>.log in '{}': {e}",
                dir.display()
            ),
        )
    })
}

/// A plain file where the current-file link goes (`<program>.log` from before rotation was
/// built in) would be replaced by the link: it is renamed to `<prefix>.before-rotation.log`
/// first, and counts as the oldest of the kept files.
fn keep_plain_file(dir: &Path, link: &str, prefix: &str) -> Result<()> {
    let path = dir.join(link);
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.file_type().is_file() => {
            let mut to = dir.join(format!("{prefix}.before-rotation.log"));
            let mut n = 1;
            while to.exists() {
                n += 1;
                to = dir.join(format!("{prefix}.before-rotation-{n}.log"));
            }
            std::fs::rename(&path, &to).map_err(|e| {
                Error::config(
                    "LOG_DIR",
                    format!(
                        "cannot move the old log {} aside to {}: {e}",
                        path.display(),
                        to.display()
                    ),
                )
            })
        }
        _ => Ok(()),
    }
}

fn stderr_is_terminal() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal()
}
