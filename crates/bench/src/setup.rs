//! The bench's own databases: `bench_src` (init scripts applied) on the source cluster and
//! `bench_wh` on the warehouse cluster, recreated for every run.

use anyhow::{bail, Context, Result};
use cdc_core::db::tls::TlsSettings;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio_postgres::Client;

pub const SOURCE_DB: &str = "bench_src";
pub const WAREHOUSE_DB: &str = "bench_wh";
pub const SLOT: &str = "bench_slot";
pub const PUBLICATION: &str = "bench_pub";

#[derive(Debug, Clone)]
pub struct Clusters {
    pub host: String,
    pub source_port: u16,
    pub warehouse_port: u16,
    pub user: String,
    pub password: String,
    pub init_scripts: PathBuf,
    /// `BENCH_DB_SSLMODE` / `BENCH_DB_SSLROOTCERT`: for the bench's own connections and
    /// passed on to the binaries.
    pub tls: TlsSettings,
}

impl Clusters {
    pub async fn connect(&self, port: u16, db: &str) -> Result<Client> {
        let mut config = tokio_postgres::Config::new();
        config
            .host(&self.host)
            .port(port)
            .dbname(db)
            .user(&self.user)
            .password(&self.password)
            .application_name("cdc-bench");
        self.tls.apply(&mut config);
        let (client, connection) =
            config
                .connect(self.tls.connector())
                .await
                .with_context(|| {
                    format!(
                        "connecting to {}:{port}/{db} (start the bench clusters with `make bench`)",
                        self.host
                    )
                })?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }

    pub async fn source(&self) -> Result<Client> {
        self.connect(self.source_port, SOURCE_DB).await
    }

    pub async fn warehouse(&self) -> Result<Client> {
        self.connect(self.warehouse_port, WAREHOUSE_DB).await
    }

    /// Drops and recreates both databases (and the source's slots), then applies the init
    /// scripts to the source.
    pub async fn fresh(&self) -> Result<()> {
        let admin = self.connect(self.source_port, "postgres").await?;
        let source_sql = [
            format!(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
                 WHERE database = '{SOURCE_DB}'"
            ),
            format!("DROP DATABASE IF EXISTS {SOURCE_DB} WITH (FORCE)"),
            format!("CREATE DATABASE {SOURCE_DB}"),
        ];
        for sql in &source_sql {
            admin
                .batch_execute(sql)
                .await
                .with_context(|| format!("recreating the bench source database: {sql}"))?;
        }
        let admin = self.connect(self.warehouse_port, "postgres").await?;
        for sql in [
            format!("DROP DATABASE IF EXISTS {WAREHOUSE_DB} WITH (FORCE)"),
            format!("CREATE DATABASE {WAREHOUSE_DB}"),
        ] {
            admin
                .batch_execute(&sql)
                .await
                .with_context(|| format!("recreating the bench warehouse database: {sql}"))?;
        }
        let source = self.source().await?;
        for script in init_scripts(&self.init_scripts)? {
            let sql = std::fs::read_to_string(&script)
                .with_context(|| format!("reading {}", script.display()))?;
            source
                .batch_execute(&format!("SET client_min_messages = warning; {sql}"))
                .await
                .with_context(|| format!("applying {}", script.display()))?;
        }
        Ok(())
    }

    /// The environment of the pipeline's binaries for these databases and `work`.
    pub fn env(&self, mode: &str, tables: &str, work: &Path) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = [
            ("DB_HOST", self.host.as_str()),
            ("DB_NAME", SOURCE_DB),
            ("DB_USER", self.user.as_str()),
            ("DB_PASSWORD", self.password.as_str()),
            ("WAREHOUSE_DB_HOST", self.host.as_str()),
            ("WAREHOUSE_DB_NAME", WAREHOUSE_DB),
            ("WAREHOUSE_DB_USER", self.user.as_str()),
            ("WAREHOUSE_DB_PASSWORD", self.password.as_str()),
            ("CDC_CAPTURE_MODE", mode),
            ("CDC_SLOT_NAME", SLOT),
            ("CDC_PUBLICATION", PUBLICATION),
            ("LOG_LEVEL", "info"),
            ("LOG_FORMAT", "json"),
            // No endpoints: the benchmark must not take the ports of a pipeline running beside it.
            ("EXTRACTOR_METRICS_ADDR", "off"),
            ("LOADER_METRICS_ADDR", "off"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        // The single-table workload the figures are about, or every table of the demo.
        let (capture, mutate) = match tables {
            "all" => ("public.*", "all"),
            _ => ("public.orders", "orders"),
        };
        env.push(("CDC_TABLES".into(), capture.into()));
        env.push(("MUTATION_TABLES".into(), mutate.into()));
        env.push(("DB_PORT".into(), self.source_port.to_string()));
        env.push(("WAREHOUSE_DB_PORT".into(), self.warehouse_port.to_string()));
        for prefix in ["DB", "WAREHOUSE_DB"] {
            env.push((format!("{prefix}_SSLMODE"), self.tls.mode.to_string()));
            if let Some(root) = &self.tls.root_cert {
                env.push((format!("{prefix}_SSLROOTCERT"), root.display().to_string()));
            }
        }
        env.push((
            "CDC_LOG_DIR".into(),
            work.join("cdc_logs").display().to_string(),
        ));
        env.push((
            "CDC_STATE_DIR".into(),
            work.join("state").display().to_string(),
        ));
        env
    }
}

fn init_scripts(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut scripts: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "sql"))
        .collect();
    scripts.sort();
    Ok(scripts)
}

/// Drops the slot `name` once its walsender has gone (a client that ends without closing its
/// connection leaves it to the server to notice).
pub async fn drop_slot(source: &Client, name: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let active: Option<i32> = source
            .query_opt(
                "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
                &[&name],
            )
            .await?
            .and_then(|r| r.get(0));
        match active {
            None => break,
            Some(_) if Instant::now() > deadline => {
                bail!("the slot {name} is still in use 30 s after its client ended")
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    source
        .execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
              WHERE slot_name = $1",
            &[&name],
        )
        .await
        .with_context(|| format!("dropping the slot {name}"))?;
    Ok(())
}
