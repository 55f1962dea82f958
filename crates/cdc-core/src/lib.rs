//! Core of the CDC Historical Warehouse: configuration, database access, the change-event
//! format and its files, capture, SCD Type 2 apply, run metadata, shutdown and logging.
//! The three binaries (`mutator`, `extractor`, `scd2-loader`) are thin wiring over this crate.

pub mod capture;
pub mod changelog;
pub mod cli;
pub mod config;
pub mod db;
pub mod error;
pub mod event;
pub mod metadata;
pub mod migrate;
pub mod mutator;
pub mod progress;
pub mod scd2;
pub mod shutdown;
pub mod table;
pub mod telemetry;

#[cfg(feature = "test-utils")]
pub mod test_utils;

pub use error::{Error, Result};
