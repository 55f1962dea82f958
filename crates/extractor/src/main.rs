//! `extractor`: captures changes of the source table into change-log files.

use cdc_core::config::extractor::ExtractorArgs;
use cdc_core::config::LogArgs;
use clap::{Parser, Subcommand};

/// Captures every change of the source table into timestamped JSON change-log files.
#[derive(Parser, Debug)]
#[command(name = "extractor", version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    args: ExtractorArgs,
    #[command(flatten)]
    log: LogArgs,
}

#[derive(Subcommand, Debug, Clone)]
enum Command {
    /// Capture changes (the default)
    Run,
    /// Prepare the source for the configured tables and mode (triggers; or replica identity,
    /// publication and slot), idempotently, and say what was done
    Setup,
    /// Logical mode: drop the replication slot and the publication, and forget the progress
    DropSlot,
    /// Read one table again, whole, while capture of the others goes on: the loader adds a
    /// version where a row differs from the history and ends the keys the table no longer
    /// has (deletes the capture missed). The running extractor takes the request at its next
    /// pass; when none runs, this runs one pass
    Resnapshot {
        /// The tables, each `schema.table`
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        tables: Vec<String>,
        /// Every table of the pipeline (logical mode: also what re-creates a lost slot)
        #[arg(long)]
        all: bool,
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
        Err(e) => std::process::exit(cdc_core::cli::config_failure("extractor", &e)),
    };
    let log_guard = cdc_core::cli::init_logging("extractor", &log);
    let code = cdc_core::cli::run_main_single_threaded("extractor", || async move {
        let shutdown = cdc_core::shutdown::Shutdown::from_signals();
        match cli.command.unwrap_or(Command::Run) {
            Command::Run if cfg.once => cdc_core::capture::run(cfg, shutdown).await,
            Command::Run => {
                let routes = cdc_core::http::probes(cdc_core::metrics::Program::Extractor);
                let addr = cfg.metrics_addr;
                let work = cdc_core::capture::run(cfg, shutdown);
                cdc_core::http::serve_while(addr, "EXTRACTOR_METRICS_ADDR", routes, work).await
            }
            Command::Setup => {
                println!("{}", cdc_core::capture::setup(&cfg, &shutdown).await?);
                Ok(())
            }
            Command::Resnapshot { tables, all } => {
                println!(
                    "{}",
                    cdc_core::capture::resnapshot(cfg, &tables, all, shutdown).await?
                );
                Ok(())
            }
            Command::DropSlot => {
                println!("{}", cdc_core::capture::drop_slot(&cfg, &shutdown).await?);
                Ok(())
            }
        }
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
