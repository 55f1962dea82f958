//! SCD Type 2 history: the apply (`apply`, reading on its own thread in `read`, the rules
//! in the pure planner `plan`, the row hash, and the history store seam with its PostgreSQL
//! implementation in `store`), the loader loop (woken by `wake`), `verify` and `status`.

pub mod apply;
pub mod late;
pub mod loader;
pub mod plan;
mod read;
pub mod rebuild;
pub mod row_hash;
pub mod schema;
pub mod status;
pub mod store;
pub mod verify;
mod wake;
