//! Integration tests of cdc-core against real PostgreSQL (the test clusters `make test`
//! starts): each test has databases of its own.

#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
mod files;
mod keys;
mod logical;
mod multi;
mod randomized;
mod scenarios;
mod tls;
mod transactions;
mod truncate;
mod types;
mod verify_checks;
