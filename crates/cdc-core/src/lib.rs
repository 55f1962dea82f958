//! Core of the CDC Historical Warehouse: configuration, database access, the change-event
//! format, capture (change sources), the change-log sink, SCD Type 2 apply (the history
//! store), run metadata, shutdown and logging, and the programs' HTTP endpoints (metrics,
//! health). The binaries (`extractor`, `scd2-loader`, and the `mutator`'s traffic generator)
//! are thin wiring over this crate.

pub mod capture;
pub mod catalog;
pub mod changelog;
pub mod cli;
pub mod config;
pub mod dashboard;
pub mod db;
pub mod error;
pub mod event;
pub mod health;
pub mod http;
pub mod metadata;
pub mod metrics;
pub mod migrate;
pub mod ownership;
pub mod progress;
pub mod scd2;
pub mod schema_change;
pub mod shutdown;
pub mod sink;
pub mod slot;
pub mod table;
pub mod telemetry;
pub mod waiting;

#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;

pub use error::{Error, Result};
