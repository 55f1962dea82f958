//! Test helpers (feature `test-utils`): databases of a test's own (`database`), a trigger-fed
//! ground truth of every committed state (`audit`), an independent reference model of the
//! SCD2 history that ground truth must produce (`model`), and a throw-away cluster with TLS
//! (`tls`).

pub mod audit;
pub mod database;
pub mod model;
pub mod tls;

pub use audit::{
    actual_history, actual_history_across, expected_history, expected_history_across,
    expected_history_on, install_alter_audit, install_audit, install_audit_for, Across, Basis,
    Followed,
};
pub use database::{connect, workspace_root, TestDb};
pub use model::{assert_same_history, Change, History, Version};
