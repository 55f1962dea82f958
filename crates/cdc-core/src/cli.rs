//! What every binary's `main` shares: the runtime, and turning a result into an exit code
//! with the whole error chain printed.

use crate::config::LogSettings;
use crate::error::{error_chain, exit_code, Error};
use crate::telemetry::LogGuard;
use std::future::Future;

/// Prints a configuration error the way clap would and returns exit code 2.
pub fn config_failure(binary: &str, e: &Error) -> i32 {
    eprintln!("{binary}: {}", error_chain(e));
    exit_code(e)
}

/// Starts logging as configured; a log file that cannot be made ends the program here
/// (exit 2, naming `LOG_DIR`). Keep the guard until just before exiting.
pub fn init_logging(binary: &str, settings: &LogSettings) -> LogGuard {
    match crate::telemetry::init(settings, binary) {
        Ok(guard) => guard,
        Err(e) => std::process::exit(config_failure(binary, &e)),
    }
}

/// Builds the runtime, runs `f`, and maps its result to an exit code.
pub fn run_main<F, Fut>(binary: &str, f: F) -> i32
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<(), Error>>,
{
    run_on(binary, tokio::runtime::Builder::new_multi_thread(), f)
}

/// `run_main` on a runtime of one thread, which polls the sockets itself: for a program
/// whose work is one sequence of steps (the extractor's passes), where a runtime of several
/// threads costs a wake-up of another thread for every message that arrives (the
/// replication stream delivers one per change).
pub fn run_main_single_threaded<F, Fut>(binary: &str, f: F) -> i32
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<(), Error>>,
{
    run_on(binary, tokio::runtime::Builder::new_current_thread(), f)
}

fn run_on<F, Fut>(binary: &str, mut builder: tokio::runtime::Builder, f: F) -> i32
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<(), Error>>,
{
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{binary}: cannot start the async runtime: {e}");
            return 1;
        }
    };
    match rt.block_on(f()) {
        Ok(()) => 0,
        Err(Error::Shutdown) => 0,
        Err(e) => {
            tracing::error!(error = %error_chain(&e), "{binary} failed");
            eprintln!("{binary}: error: {}", error_chain(&e));
            exit_code(&e)
        }
    }
}
