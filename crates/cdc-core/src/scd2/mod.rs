//! SCD Type 2 history: the set-based apply, the loader loop, `verify` and `status`.

pub mod apply;
pub mod loader;
pub mod status;
pub mod verify;
