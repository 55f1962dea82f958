//! End-to-end tests: the real `mutator`, `extractor` and `scd2-loader` binaries, run as a
//! user would, against databases of each test's own. Build the binaries first
//! (`make test` does: `cargo build --workspace --bins`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cli;
mod dashboard;
mod endpoints;
mod logical;
mod logs;
mod outage;
mod pipeline;
mod resnapshot;
mod schema;
mod setup;
mod tls;

use cdc_core::test_utils::TestDb;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

/// The directory of the built binaries: next to this test executable's `deps/`.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|d| d.parent()).unwrap();
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built; run `cargo build --workspace --bins` first (make test does)",
        path.display()
    );
    path
}

/// A command for `name` with the test's databases in its environment, in the test's
/// directory (so no stray `.env` is read), with nothing else of the caller's settings.
pub fn cmd(db: &TestDb, name: &str) -> Command {
    let mut c = Command::new(bin(name));
    c.current_dir(&db.dir);
    for (k, _) in std::env::vars() {
        if k.starts_with("DB_")
            || k.starts_with("WAREHOUSE_DB_")
            || k.starts_with("CDC_")
            || k.starts_with("MUTATION_")
            || k.starts_with("LOG_")
        {
            c.env_remove(k);
        }
    }
    c.envs(db.env());
    c
}

pub fn run(mut c: Command) -> Output {
    c.output().expect("run binary")
}

pub fn text(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// An address on the loopback that nothing listens on now.
pub fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// `GET path` at `addr`: the status code and the body; `None` when nothing answers.
pub fn get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    s.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let code = head.split(' ').nth(1)?.parse().ok()?;
    Some((code, body.to_owned()))
}

/// Waits until `f` holds (for events, not for time: the bound only stops a hung test).
pub fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A program started by a test: killed when dropped, so a failing test leaves none behind.
pub struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn start(c: &mut std::process::Command) -> Running {
    Running(c.spawn().unwrap())
}

/// SIGTERM, then the exit code.
pub fn stop(mut p: Running) -> Option<i32> {
    let status = std::process::Command::new("kill")
        .args(["-TERM", &p.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    p.0.wait().unwrap().code()
}
