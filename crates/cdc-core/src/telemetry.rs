//! Logging: human-readable lines to the terminal (or the orchestrator's log file), JSON on request.

use crate::config::{LogArgs, LogFormat};

/// Installs the global subscriber. Call once, after configuration has been validated.
pub fn init(args: &LogArgs) {
    let filter = tracing_subscriber::EnvFilter::try_new(args.filter_directive())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr);
    let _ = match args.log_format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.with_ansi(args.ansi()).try_init(),
    };
}
