//! A pair of fresh databases per test on the test clusters that `make test` starts, the init
//! scripts applied, and configurations pointing at them.

use crate::catalog::TableSelection;
use crate::config::extractor::ExtractorConfig;
use crate::config::loader::LoaderConfig;
use crate::db::tls::TlsSettings;
use crate::db::{DbRole, DbSettings, Secret};
use crate::event::CaptureMode;
use crate::slot::SlotSettings;
use crate::table::TableSpec;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio_postgres::Client;

/// Root of the workspace (for init-scripts and the built binaries).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("crates/cdc-core is two levels below the workspace root")
        .to_path_buf()
}

fn env_port(var: &str, default: u16) -> u16 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn settings(role: DbRole, port: u16, dbname: &str) -> DbSettings {
    DbSettings {
        role,
        host: "127.0.0.1".into(),
        port,
        dbname: dbname.into(),
        user: std::env::var("CDC_TEST_PG_USER").unwrap_or_else(|_| "postgres".into()),
        password: Secret(
            std::env::var("CDC_TEST_PG_PASSWORD").unwrap_or_else(|_| "postgres".into()),
        ),
        connect_retry: Duration::from_secs(5),
        tls: test_tls(role),
    }
}

/// TLS to the test clusters: `CDC_TEST_PG_SSLMODE` (default `prefer`) and
/// `CDC_TEST_PG_SSLROOTCERT`, as `DB_SSLMODE` and `DB_SSLROOTCERT`.
fn test_tls(role: DbRole) -> TlsSettings {
    let mode = std::env::var("CDC_TEST_PG_SSLMODE").unwrap_or_else(|_| "prefer".into());
    let root = std::env::var_os("CDC_TEST_PG_SSLROOTCERT").map(PathBuf::from);
    TlsSettings::validate(role.setting_prefix(), &mode, root.as_deref())
        .unwrap_or_else(|e| panic!("CDC_TEST_PG_SSLMODE / CDC_TEST_PG_SSLROOTCERT: {e}"))
}

/// Connects without retry, panicking with a hint when the test clusters are not running.
pub async fn connect(db: &DbSettings) -> Client {
    let tls = db.tls.connector();
    let (client, conn) = db.pg_config().connect(tls).await.unwrap_or_else(|e| {
        panic!(
            "cannot reach the test cluster at {} ({}); run the tests with `make test`, which starts them",
            db.display(),
            crate::error::error_chain(&e)
        )
    });
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// A source and a warehouse database of the test's own, and a directory for its files.
pub struct TestDb {
    pub name: String,
    pub source: DbSettings,
    pub warehouse: DbSettings,
    pub dir: PathBuf,
    pub spec: TableSpec,
}

impl TestDb {
    /// Creates `t_<test>_<random>` in both test clusters and applies `init-scripts/*.sql`
    /// to the source one.
    pub async fn new(test: &str) -> TestDb {
        let source_port = env_port("CDC_TEST_SOURCE_PORT", 55434);
        let warehouse_port = env_port("CDC_TEST_WAREHOUSE_PORT", 55433);
        TestDb::on(
            test,
            settings(DbRole::Source, source_port, "postgres"),
            settings(DbRole::Warehouse, warehouse_port, "postgres"),
        )
        .await
    }

    /// As `new`, on other clusters: `source_admin` and `warehouse_admin` reach each one's
    /// `postgres` database (host, port, login, TLS), and the test's databases are reached the
    /// same way.
    pub async fn on(test: &str, source_admin: DbSettings, warehouse_admin: DbSettings) -> TestDb {
        let clean: String = test
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .collect();
        let mut name = format!("t_{}", &clean[..clean.len().min(40)]);
        name.push_str(&format!("_{:08x}", rand::random::<u32>()));
        for admin in [&source_admin, &warehouse_admin] {
            let admin = connect(admin).await;
            admin
                .batch_execute(&format!("CREATE DATABASE {name}"))
                .await
                .expect("create test database");
        }
        let source = DbSettings {
            dbname: name.clone(),
            ..source_admin
        };
        let warehouse = DbSettings {
            dbname: name.clone(),
            ..warehouse_admin
        };
        let client = connect(&source).await;
        let mut scripts: Vec<PathBuf> = std::fs::read_dir(workspace_root().join("init-scripts"))
            .expect("init-scripts directory")
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "sql"))
            .collect();
        scripts.sort();
        for s in scripts {
            let sql = std::fs::read_to_string(&s).expect("read init script");
            client
                .batch_execute(&format!("SET client_min_messages = warning; {sql}"))
                .await
                .unwrap_or_else(|e| panic!("applying {}: {e:?}", s.display()));
        }
        let dir = workspace_root()
            .join("target")
            .join("test-runs")
            .join(&name);
        let _ = std::fs::remove_dir_all(&dir);
        // The change-log directory exists before any program starts, as the project's
        // `data/cdc_logs` does (the loader refuses a missing one). Its parents first, with the
        // process's umask: `create_private_dir` would make `target/test-runs` owner-only, and
        // clusters some tests start as the `postgres` user must be able to pass.
        std::fs::create_dir_all(&dir).expect("test directory");
        crate::changelog::create_private_dir(&dir.join("cdc_logs")).expect("test directory");
        TestDb {
            name,
            source,
            warehouse,
            dir,
            spec: TableSpec::orders(),
        }
    }

    /// The selection (`CDC_TABLES`) of this test's table, `spec`.
    pub fn selection(&self) -> TableSelection {
        TableSelection {
            patterns: vec![(self.spec.schema.clone(), Some(self.spec.name.clone()))],
            exclude: Vec::new(),
            change_time_column: self
                .spec
                .change_time_column
                .clone()
                .unwrap_or_else(|| "last_updated".into()),
            pipeline_name: "cdc".into(),
        }
    }

    /// This test's table as the source's catalog describes it (what the binaries capture).
    pub async fn described(&self) -> TableSpec {
        let client = connect(&self.source).await;
        let mut specs = self
            .selection()
            .describe(&client)
            .await
            .expect("describe the test's table");
        assert_eq!(specs.len(), 1, "one table");
        specs.remove(0)
    }

    pub fn log_dir(&self) -> PathBuf {
        self.dir.join("cdc_logs")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    pub fn extractor_config(&self) -> ExtractorConfig {
        ExtractorConfig {
            source: self.source.clone(),
            warehouse: self.warehouse.clone(),
            tables: self.selection(),
            log_dir: self.log_dir(),
            state_dir: self.state_dir(),
            capture_mode: CaptureMode::Timestamp,
            interval: Duration::from_millis(200),
            max_rows_per_file: 50_000,
            slot: self.slot_settings(),
            metrics_addr: None,
            once: true,
        }
    }

    /// A slot and publication of this test's own (slot names are cluster-wide).
    pub fn slot_settings(&self) -> SlotSettings {
        SlotSettings {
            slot: self.name.clone(),
            publication: "cdc_test_pub".into(),
            pipeline: self.selection().pipeline_name,
            max_changes_per_pass: 200_000,
        }
    }

    pub fn loader_config(&self) -> LoaderConfig {
        LoaderConfig {
            warehouse: self.warehouse.clone(),
            source: self.source.clone(),
            tables: self.selection(),
            log_dir: self.log_dir(),
            state_dir: self.state_dir(),
            poll_interval: Some(Duration::from_millis(100)),
            max_files_per_batch: 16,
            max_events_in_memory: crate::scd2::apply::CHUNK_EVENTS,
            slot_name: self.name.clone(),
            metrics_addr: None,
            max_lag: Duration::from_secs(300),
            processed_retention: None,
            max_slot_wal_bytes: 1 << 30,
        }
    }

    pub async fn source_client(&self) -> Client {
        connect(&self.source).await
    }

    pub async fn warehouse_client(&self) -> Client {
        connect(&self.warehouse).await
    }

    /// Environment for running a binary against this test's databases and directories.
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env = vec![
            ("DB_HOST".into(), self.source.host.clone()),
            ("DB_PORT".into(), self.source.port.to_string()),
            ("DB_NAME".into(), self.source.dbname.clone()),
            ("DB_USER".into(), self.source.user.clone()),
            ("DB_PASSWORD".into(), self.source.password.0.clone()),
            ("WAREHOUSE_DB_HOST".into(), self.warehouse.host.clone()),
            ("WAREHOUSE_DB_PORT".into(), self.warehouse.port.to_string()),
            ("WAREHOUSE_DB_NAME".into(), self.warehouse.dbname.clone()),
            ("WAREHOUSE_DB_USER".into(), self.warehouse.user.clone()),
            (
                "WAREHOUSE_DB_PASSWORD".into(),
                self.warehouse.password.0.clone(),
            ),
            ("DB_SSLMODE".into(), self.source.tls.mode.to_string()),
            (
                "WAREHOUSE_DB_SSLMODE".into(),
                self.warehouse.tls.mode.to_string(),
            ),
            ("CDC_LOG_DIR".into(), self.log_dir().display().to_string()),
            (
                "CDC_STATE_DIR".into(),
                self.state_dir().display().to_string(),
            ),
            ("LOG_LEVEL".into(), "info".into()),
            ("CDC_SLOT_NAME".into(), self.name.clone()),
            ("CDC_PUBLICATION".into(), "cdc_test_pub".into()),
            ("CDC_TABLES".into(), self.spec.qualified()),
            ("MUTATION_TABLES".into(), "orders".into()),
            // Tests that scrape the endpoints choose a free port.
            ("EXTRACTOR_METRICS_ADDR".into(), "off".into()),
            ("LOADER_METRICS_ADDR".into(), "off".into()),
        ];
        for (var, db) in [
            ("DB_SSLROOTCERT", &self.source),
            ("WAREHOUSE_DB_SSLROOTCERT", &self.warehouse),
        ] {
            if let Some(root) = &db.tls.root_cert {
                env.push((var.into(), root.display().to_string()));
            }
        }
        env
    }

    /// Drops both databases and the directory. Call at the end of a passing test; a failing
    /// test leaves them for inspection.
    pub async fn cleanup(self) {
        for db in [&self.source, &self.warehouse] {
            let admin = connect(&DbSettings {
                dbname: "postgres".into(),
                ..db.clone()
            })
            .await;
            let _ = admin
                .execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = $1",
                    &[&self.name],
                )
                .await;
            let _ = admin
                .batch_execute(&format!(
                    "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                    self.name
                ))
                .await;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
