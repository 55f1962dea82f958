//! `extractor`: captures changes of the source table into change-log files.

use cdc_core::config::{ExtractorArgs, LogArgs};
use clap::Parser;

/// Captures every change of the source table into timestamped JSON change-log files.
#[derive(Parser, Debug)]
#[command(name = "extractor", version)]
struct Cli {
    #[command(flatten)]
    args: ExtractorArgs,
    #[command(flatten)]
    log: LogArgs,
}

fn main() {
    let _ = dotenvy::dotenv();
    let cli = Cli::parse();
    let cfg = match cli.log.validate().and_then(|()| cli.args.validate()) {
        Ok(cfg) => cfg,
        Err(e) => std::process::exit(cdc_core::cli::config_failure("extractor", &e)),
    };
    cdc_core::telemetry::init(&cli.log);
    let code = cdc_core::cli::run_main("extractor", || async move {
        let shutdown = cdc_core::shutdown::Shutdown::from_signals();
        cdc_core::capture::run(cfg, shutdown).await
    });
    std::process::exit(code);
}

#[cfg(test)]
mod tests {
    #[test]
    fn flags_are_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
