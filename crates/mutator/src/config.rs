//! The mutator's flags and settled configuration.

use cdc_core::config::{positive_secs, RetryArgs, SourceDbArgs};
use cdc_core::db::DbSettings;
use cdc_core::error::{Error, Result};
use clap::{Args, ValueEnum};
use std::time::Duration;

/// `mutator` flags.
#[derive(Args, Clone, Debug)]
pub struct MutatorArgs {
    #[command(flatten)]
    pub source: SourceDbArgs,
    #[command(flatten)]
    pub retry: RetryArgs,
    /// Seconds between batches in steady mode
    #[arg(
        long = "interval",
        env = "MUTATION_INTERVAL_SECONDS",
        default_value = "2"
    )]
    pub interval_seconds: f64,
    /// Operations per batch in steady mode
    #[arg(long = "batch-size", env = "MUTATION_BATCH_SIZE", default_value = "5")]
    pub batch_size: u32,
    /// Burst mode: perform exactly this many operations, then exit
    #[arg(long)]
    pub count: Option<u64>,
    /// Seed for the random choices (repeatable traffic)
    #[arg(long, env = "MUTATION_SEED")]
    pub seed: Option<u64>,
    /// Concurrent writer connections
    #[arg(long, env = "MUTATION_CONCURRENCY", default_value = "1")]
    pub concurrency: usize,
    /// Operations per transaction
    #[arg(
        long = "ops-per-transaction",
        env = "MUTATION_OPS_PER_TRANSACTION",
        default_value = "1"
    )]
    pub ops_per_transaction: u32,
    /// Steady mode at a fixed rate: operations per second, started on a fixed schedule in
    /// batches of a tenth of a second (replaces --interval and --batch-size)
    #[arg(long, env = "MUTATION_RATE")]
    pub rate: Option<f64>,
    /// Which tables get traffic: `all` (orders with their lines, order_items, customers) or
    /// `orders` only
    #[arg(long, env = "MUTATION_TABLES", value_enum, default_value = "all")]
    pub tables: Traffic,
}

/// Which tables the mutator writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Traffic {
    /// orders only (the benchmark's workload)
    Orders,
    /// orders (a new order comes with its first line), order_items and customers
    All,
}

/// Settled mutator configuration.
#[derive(Clone, Debug)]
pub struct MutatorConfig {
    pub source: DbSettings,
    pub interval: Duration,
    pub batch_size: u32,
    pub count: Option<u64>,
    pub seed: u64,
    pub concurrency: usize,
    pub ops_per_transaction: u32,
    /// Fixed-rate steady mode: operations per second.
    pub rate: Option<f64>,
    pub tables: Traffic,
}

impl MutatorArgs {
    pub fn validate(&self) -> Result<MutatorConfig> {
        let retry = self.retry.validate()?;
        if self.batch_size == 0 {
            return Err(Error::config("MUTATION_BATCH_SIZE", "must be at least 1"));
        }
        if self.concurrency == 0 || self.concurrency > 64 {
            return Err(Error::config(
                "MUTATION_CONCURRENCY",
                "must be from 1 to 64",
            ));
        }
        if self.ops_per_transaction == 0 {
            return Err(Error::config(
                "MUTATION_OPS_PER_TRANSACTION",
                "must be at least 1",
            ));
        }
        if let Some(rate) = self.rate {
            if !(rate.is_finite() && (0.1..=1_000_000.0).contains(&rate)) {
                return Err(Error::config(
                    "MUTATION_RATE",
                    format!(
                        "'{rate}' must be a number of operations per second from 0.1 to 1000000"
                    ),
                ));
            }
        }
        let seed = self.seed.unwrap_or_else(rand::random);
        Ok(MutatorConfig {
            source: self.source.validate(retry)?,
            interval: positive_secs("MUTATION_INTERVAL_SECONDS", self.interval_seconds, false)?,
            batch_size: self.batch_size,
            count: self.count,
            seed,
            concurrency: self.concurrency,
            ops_per_transaction: self.ops_per_transaction,
            rate: self.rate,
            tables: self.tables,
        })
    }
}
