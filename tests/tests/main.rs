//! End-to-end tests: the real `mutator`, `extractor` and `scd2-loader` binaries, run as a
//! user would, against databases of each test's own. Build the binaries first
//! (`make test` does: `cargo build --workspace --bins`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cli;
mod endpoints;
mod logical;
mod outage;
mod pipeline;
mod setup;
mod tls;

use cdc_core::test_utils::TestDb;
use std::path::PathBuf;
use std::process::{Command, Output};

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
