//! `scd2-loader`: applies change-log files as SCD Type 2 history (and serves the dashboard
//! while it does); `verify` and `status`.

use cdc_core::config::loader::LoaderArgs;
use cdc_core::config::LogArgs;
use clap::{Parser, Subcommand};

/// Applies change-log files to the warehouse as SCD Type 2 history.
#[derive(Parser, Debug)]
#[command(name = "scd2-loader", version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    args: LoaderArgs,
    #[command(flatten)]
    log: LogArgs,
    /// Apply every pending file, then exit
    #[arg(long, global = true)]
    once: bool,
}

#[derive(Subcommand, Debug, Clone)]
enum Command {
    /// Apply change-log files (the default)
    Run,
    /// Check the history invariants; exit 0 when they hold, 3 when one is violated
    Verify {
        /// Skip comparing current rows with the source table
        #[arg(long)]
        no_source: bool,
        /// Check only this table (schema.table) of the configured ones
        #[arg(long)]
        table: Option<String>,
        /// On a running pipeline, how long each of up to 5 rounds waits for it to catch up
        /// with the source before a difference from the source counts as a divergence
        #[arg(long, default_value = "30")]
        settle_seconds: u64,
    },
    /// Show what has been captured and applied, what is pending, and the lag
    Status,
    /// Replay the kept change logs (processed/) of one table into <history>_rebuild and
    /// compare it with the live history; exit 0 when equal, 3 when not
    Rebuild {
        /// The table (schema.table) of the configured ones
        table: String,
        /// Make the rebuild the live history (the old one is kept as <history>_before_rebuild)
        #[arg(long)]
        replace: bool,
    },
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
        Err(e) => std::process::exit(cdc_core::cli::config_failure("scd2-loader", &e)),
    };
    let log_guard = cdc_core::cli::init_logging("scd2-loader", &log);
    let command = cli.command.clone().unwrap_or(Command::Run);
    let mut violated = false;
    let code = cdc_core::cli::run_main("scd2-loader", || async {
        let shutdown = cdc_core::shutdown::Shutdown::from_signals();
        match command {
            Command::Run if cli.once => {
                Box::pin(cdc_core::scd2::loader::run(&cfg, true, shutdown)).await?;
            }
            Command::Run => {
                // The endpoints and, beside them, the dashboard and its API.
                let routes = cdc_core::http::probes(cdc_core::metrics::Program::Loader)
                    .merge(cdc_core::dashboard::routes(&cfg)?);
                let work = async {
                    Box::pin(cdc_core::scd2::loader::run(&cfg, false, shutdown)).await?;
                    Ok(())
                };
                cdc_core::http::serve_while(cfg.metrics_addr, "LOADER_METRICS_ADDR", routes, work)
                    .await?;
            }
            Command::Verify {
                no_source,
                ref table,
                settle_seconds,
            } => {
                let reports = cdc_core::scd2::verify::run(
                    &cfg,
                    !no_source,
                    table.as_deref(),
                    std::time::Duration::from_secs(settle_seconds),
                    &shutdown,
                )
                .await?;
                for (history, report) in &reports {
                    print!("{}", report.render(history));
                    violated |= !report.ok();
                }
            }
            Command::Status => {
                let report = cdc_core::scd2::status::run(&cfg, &shutdown).await?;
                print!("{}", report.render());
                violated = !report.problems.is_empty();
            }
            Command::Rebuild { ref table, replace } => {
                let out = cdc_core::scd2::rebuild::run(&cfg, table, replace, &shutdown).await?;
                print!("{}", out.render());
                violated = !out.agrees();
            }
        }
        Ok(())
    });
    drop(log_guard); // flushes a log file's queue; exit runs no destructors
    std::process::exit(if code == 0 && violated { 3 } else { code });
}

#[cfg(test)]
mod tests {
    #[test]
    fn flags_are_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
