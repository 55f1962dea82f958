//! `mutator`: simulated application traffic on the source `orders` table.

mod config;
mod traffic;

use cdc_core::config::LogArgs;
use clap::Parser;
use config::MutatorArgs;

/// Simulates application traffic: inserts, updates and deletes on the source orders table.
#[derive(Parser, Debug)]
#[command(name = "mutator", version)]
struct Cli {
    #[command(flatten)]
    args: MutatorArgs,
    #[command(flatten)]
    log: LogArgs,
}

fn main() {
    // `.env` of the working directory only (dotenvy::dotenv would also search its parents).
    let _ = dotenvy::from_path(".env");
    let cli = Cli::parse();
    let (log, cfg) = match cli
        .log
        .validate()
        .and_then(|log| Ok((log, cli.args.validate()?)))
    {
        Ok(settled) => settled,
        Err(e) => std::process::exit(cdc_core::cli::config_failure("mutator", &e)),
    };
    let log_guard = cdc_core::cli::init_logging("mutator", &log);
    let code = cdc_core::cli::run_main("mutator", || async move {
        let shutdown = cdc_core::shutdown::Shutdown::from_signals();
        let stats = traffic::run(&cfg, shutdown).await?;
        println!(
            "mutator: {} operations ({} inserts, {} updates, {} deletes), seed {}",
            stats.total(),
            stats.inserts,
            stats.updates,
            stats.deletes,
            cfg.seed
        );
        Ok(())
    });
    drop(log_guard); // flushes a log file's queue; exit runs no destructors
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
