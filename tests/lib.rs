//! End-to-end tests live in `tests/main.rs`; this crate has no library code.
