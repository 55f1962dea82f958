//! Waking the loader when a change-log file arrives: a file-system watch on `CDC_LOG_DIR`
//! (inotify on Linux, through `notify`), with `LOADER_POLL_INTERVAL_SECONDS` as the safety
//! net for a missed notification or a file system that sends none.

use crate::changelog::is_change_log;
use crate::shutdown::Shutdown;
use notify::event::{AccessKind, AccessMode, ModifyKind, RenameMode};
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// The safety-net look for new files when the directory is watched.
pub const WATCHED_POLL: Duration = Duration::from_secs(5);
/// The look for new files when it cannot be watched.
pub const UNWATCHED_POLL: Duration = Duration::from_millis(500);

/// A watch on the change-log directory that wakes the loader when a complete change-log
/// file appears in it: renamed in (how the extractor publishes a file, and how a
/// quarantined file is put back), or closed after writing (a copy). A file's creation does
/// not wake it (a copy is still empty then). An event that arrives while the loader is
/// applying is kept, so the next wait returns at once.
pub struct NewFiles {
    dir: PathBuf,
    state: Arc<State>,
    watcher: Option<RecommendedWatcher>,
}

struct State {
    wake: Notify,
    /// The watch stopped working (the directory was removed or moved, the event queue
    /// overflowed into an error): set up again at the next wait.
    lost: AtomicBool,
}

impl NewFiles {
    /// Watches `dir`; if it cannot (no inotify instance left, a file system without it),
    /// says so and the loader polls.
    pub fn watch(dir: &Path) -> Self {
        let mut w = NewFiles {
            // Absolute, as the events name their paths.
            dir: std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf()),
            state: Arc::new(State {
                wake: Notify::new(),
                lost: AtomicBool::new(false),
            }),
            watcher: None,
        };
        if let Err(e) = w.start() {
            tracing::warn!(
                dir = %dir.display(),
                error = %e,
                poll_ms = UNWATCHED_POLL.as_millis() as u64,
                "cannot watch the change-log directory; looking for new files by polling"
            );
        }
        w
    }

    fn start(&mut self) -> notify::Result<()> {
        self.watcher = None;
        self.state.lost.store(false, Ordering::SeqCst);
        let state = self.state.clone();
        let dir = self.dir.clone();
        let mut watcher =
            notify::recommended_watcher(move |res: notify::Result<Event>| match res {
                Ok(event) => {
                    if watch_ended(&event, &dir) {
                        state.lost.store(true, Ordering::SeqCst);
                        state.wake.notify_one();
                    } else if completes_a_change_log(&event) {
                        state.wake.notify_one();
                    }
                }
                // An overflowed queue or a failing backend: look now, set up again later.
                Err(_) => {
                    state.lost.store(true, Ordering::SeqCst);
                    state.wake.notify_one();
                }
            })?;
        watcher.watch(&self.dir, RecursiveMode::NonRecursive)?;
        self.watcher = Some(watcher);
        Ok(())
    }

    /// Whether the directory is watched.
    pub fn active(&self) -> bool {
        self.watcher.is_some() && !self.state.lost.load(Ordering::SeqCst)
    }

    /// Waits until a change-log file arrives, `timeout` passes, or shutdown is requested
    /// (then returns `true`). A lost watch is set up again first, if the directory is there.
    pub async fn wait(&mut self, timeout: Duration, shutdown: &Shutdown) -> bool {
        if self.watcher.is_some() && self.state.lost.load(Ordering::SeqCst) && self.dir.is_dir() {
            match self.start() {
                Ok(()) => {
                    tracing::info!(dir = %self.dir.display(), "watching the change-log directory again")
                }
                Err(e) => {
                    tracing::warn!(dir = %self.dir.display(), error = %e, "cannot watch the change-log directory again; polling")
                }
            }
        }
        tokio::select! {
            _ = self.state.wake.notified() => shutdown.is_triggered(),
            _ = tokio::time::sleep(timeout) => shutdown.is_triggered(),
            _ = shutdown.wait() => true,
        }
    }
}

/// A change-log file renamed into the directory, or closed after being written there.
fn completes_a_change_log(event: &Event) -> bool {
    let arrived = matches!(
        event.kind,
        EventKind::Modify(ModifyKind::Name(
            RenameMode::To | RenameMode::Both | RenameMode::Any
        )) | EventKind::Access(AccessKind::Close(AccessMode::Write))
    );
    arrived
        && event
            .paths
            .last()
            .and_then(|p| p.file_name())
            .is_some_and(|n| is_change_log(&n.to_string_lossy()))
}

/// The watched directory itself removed or moved away, or the backend asking for a rescan.
fn watch_ended(event: &Event, dir: &Path) -> bool {
    event.need_rescan()
        || (matches!(
            event.kind,
            EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(RenameMode::From))
        ) && event.paths.iter().any(|p| p == dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::CreateKind;

    fn event(kind: EventKind, path: &str) -> Event {
        Event::new(kind).add_path(PathBuf::from(path))
    }

    #[test]
    fn a_renamed_or_written_change_log_wakes_the_loader() {
        let renamed = EventKind::Modify(ModifyKind::Name(RenameMode::To));
        let closed = EventKind::Access(AccessKind::Close(AccessMode::Write));
        assert!(completes_a_change_log(&event(renamed, "/l/orders_1.jsonl")));
        assert!(completes_a_change_log(&event(closed, "/l/orders_1.jsonl")));
        assert!(completes_a_change_log(&event(
            renamed,
            "/l/orders_1.jsonl.zst"
        )));
    }

    #[test]
    fn temporary_files_creations_and_departures_do_not() {
        let renamed = EventKind::Modify(ModifyKind::Name(RenameMode::To));
        let closed = EventKind::Access(AccessKind::Close(AccessMode::Write));
        let created = EventKind::Create(CreateKind::File);
        let left = EventKind::Modify(ModifyKind::Name(RenameMode::From));
        assert!(!completes_a_change_log(&event(
            closed,
            "/l/.tmp-orders_1.jsonl"
        )));
        assert!(!completes_a_change_log(&event(
            renamed,
            "/l/orders_1.reason.json"
        )));
        assert!(!completes_a_change_log(&event(
            created,
            "/l/orders_1.jsonl"
        )));
        assert!(!completes_a_change_log(&event(left, "/l/orders_1.jsonl")));
    }

    #[test]
    fn the_directory_going_away_ends_the_watch() {
        let dir = Path::new("/l");
        let removed = EventKind::Remove(notify::event::RemoveKind::Folder);
        let moved = EventKind::Modify(ModifyKind::Name(RenameMode::From));
        assert!(watch_ended(&event(removed, "/l"), dir));
        assert!(watch_ended(&event(moved, "/l"), dir));
        assert!(!watch_ended(&event(moved, "/l/orders_1.jsonl"), dir));
    }
}
