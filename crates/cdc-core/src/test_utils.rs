//! Test helpers (feature `test-utils`): a pair of fresh databases per test on the test
//! clusters that `make test` starts, the init scripts applied, configurations pointing at
//! them, a trigger-fed ground truth of every committed state, and an independent reference
//! model of the SCD2 history that ground truth must produce.

use crate::capture::logical::SlotSettings;
use crate::config::{CaptureMode, DbSettings, ExtractorConfig, LoaderConfig, Secret};
use crate::progress::SnapshotFilter;
use crate::table::TableSpec;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio_postgres::{Client, NoTls};

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

fn settings(label: &'static str, port: u16, dbname: &str) -> DbSettings {
    DbSettings {
        label,
        host: "127.0.0.1".into(),
        port,
        dbname: dbname.into(),
        user: std::env::var("CDC_TEST_PG_USER").unwrap_or_else(|_| "postgres".into()),
        password: Secret(
            std::env::var("CDC_TEST_PG_PASSWORD").unwrap_or_else(|_| "postgres".into()),
        ),
        connect_retry: Duration::from_secs(5),
    }
}

/// Connects without retry, panicking with a hint when the test clusters are not running.
pub async fn connect(db: &DbSettings) -> Client {
    let (client, conn) = db.pg_config().connect(NoTls).await.unwrap_or_else(|e| {
        panic!(
            "cannot reach the test cluster at {} ({e}); run the tests with `make test`, which starts them",
            db.display()
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
        let source_port = env_port("CDC_TEST_SOURCE_PORT", 55434);
        let warehouse_port = env_port("CDC_TEST_WAREHOUSE_PORT", 55433);
        for (label, port) in [("DB", source_port), ("WAREHOUSE_DB", warehouse_port)] {
            let admin = connect(&settings(label, port, "postgres")).await;
            admin
                .batch_execute(&format!("CREATE DATABASE {name}"))
                .await
                .expect("create test database");
        }
        let source = settings("DB", source_port, &name);
        let warehouse = settings("WAREHOUSE_DB", warehouse_port, &name);
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
        std::fs::create_dir_all(&dir).expect("test directory");
        TestDb {
            name,
            source,
            warehouse,
            dir,
            spec: TableSpec::orders(),
        }
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
            table: self.spec.clone(),
            log_dir: self.log_dir(),
            state_dir: self.state_dir(),
            capture_mode: CaptureMode::Timestamp,
            interval: Duration::from_millis(200),
            max_rows_per_file: 50_000,
            slot: self.slot_settings(),
            once: true,
        }
    }

    /// A slot and publication of this test's own (slot names are cluster-wide).
    pub fn slot_settings(&self) -> SlotSettings {
        SlotSettings {
            slot: self.name.clone(),
            publication: "cdc_test_pub".into(),
            max_changes_per_pass: 200_000,
        }
    }

    pub fn loader_config(&self) -> LoaderConfig {
        LoaderConfig {
            warehouse: self.warehouse.clone(),
            source: self.source.clone(),
            table: self.spec.clone(),
            log_dir: self.log_dir(),
            state_dir: self.state_dir(),
            poll_interval: Duration::from_millis(100),
            max_files_per_batch: 16,
            max_events_in_memory: crate::scd2::apply::CHUNK_EVENTS,
            slot_name: self.name.clone(),
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
        vec![
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
            ("CDC_LOG_DIR".into(), self.log_dir().display().to_string()),
            (
                "CDC_STATE_DIR".into(),
                self.state_dir().display().to_string(),
            ),
            ("LOG_LEVEL".into(), "info".into()),
            ("CDC_SLOT_NAME".into(), self.name.clone()),
            ("CDC_PUBLICATION".into(), "cdc_test_pub".into()),
        ]
    }

    /// Drops both databases and the directory. Call at the end of a passing test; a failing
    /// test leaves them for inspection.
    pub async fn cleanup(self) {
        for db in [&self.source, &self.warehouse] {
            let admin = connect(&settings(db.label, db.port, "postgres")).await;
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

/// Installs the ground truth on the source: every committed row state (after insert or
/// update) and every delete, with the exact times the pipeline must use, in
/// `public.test_audit`. Rows that exist already are recorded as their current state.
pub async fn install_audit(source: &Client) {
    source
        .batch_execute(
            "CREATE TABLE public.test_audit (
                 seq BIGSERIAL PRIMARY KEY, kind TEXT NOT NULL, ts TIMESTAMPTZ NOT NULL,
                 key TEXT NOT NULL, txid XID8 NOT NULL DEFAULT pg_current_xact_id(), row_image JSONB NOT NULL);
             CREATE FUNCTION public.test_audit_row() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 INSERT INTO public.test_audit (kind, ts, key, row_image) VALUES ('u', NEW.last_updated, NEW.id::text, to_jsonb(NEW));
                 RETURN NULL;
             END $$;
             CREATE TRIGGER zz_test_audit AFTER INSERT OR UPDATE ON public.orders
                 FOR EACH ROW EXECUTE FUNCTION public.test_audit_row();
             CREATE FUNCTION public.test_audit_delete() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 INSERT INTO public.test_audit (kind, ts, key, row_image) VALUES ('d', NEW.deleted_at, NEW.old_row->>'id', NEW.old_row);
                 RETURN NULL;
             END $$;
             CREATE TRIGGER zz_test_audit AFTER INSERT ON public.cdc_tombstones
                 FOR EACH ROW EXECUTE FUNCTION public.test_audit_delete();
             INSERT INTO public.test_audit (kind, ts, key, row_image, txid)
                 SELECT 'u', o.last_updated, o.id::text, to_jsonb(o), '0'::xid8 FROM public.orders o;",
        )
        .await
        .expect("install the test audit");
}

/// One expected or actual history row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    pub valid_from_us: i64,
    pub valid_to_us: Option<i64>,
    pub is_deleted: bool,
    pub values: Vec<Option<String>>,
}

pub type History = BTreeMap<String, Vec<Version>>;

fn col_text(spec: &TableSpec, alias: &str, history: bool) -> String {
    spec.columns
        .iter()
        .map(|c| {
            let name = if history {
                spec.history_column(c)
            } else {
                c.name.clone()
            };
            format!("{alias}.{name}::text")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Which times the history must carry.
#[derive(Debug, Clone)]
pub enum Basis {
    /// Timestamp capture: the change-time column (and the delete time).
    ChangeTime,
    /// Logical capture: commit times (needs `track_commit_timestamp`); transactions the
    /// initial copy showed are folded into the copied row, stamped with its change time.
    Commit { snapshot: Option<SnapshotFilter> },
}

struct AuditEvent {
    change_us: i64,
    commit_us: Option<i64>,
    txid: u64,
    seq: i64,
    delete: bool,
    values: Vec<Option<String>>,
}

/// The history the ground truth demands, by the reference model: per key, the committed
/// states in time order (the last state of a transaction); a state equal to the one before
/// it is no new version; a delete closes the open version.
pub async fn expected_history(source: &Client, spec: &TableSpec) -> History {
    expected_history_on(source, spec, &Basis::ChangeTime).await
}

pub async fn expected_history_on(source: &Client, spec: &TableSpec, basis: &Basis) -> History {
    let commit = if matches!(basis, Basis::Commit { .. }) {
        "CASE WHEN a.txid <> '0'::xid8 THEN (extract(epoch FROM pg_xact_commit_timestamp(a.txid::text::xid)) * 1000000)::int8 END"
    } else {
        "NULL::int8"
    };
    let sql = format!(
        "SELECT DISTINCT ON (a.key, a.txid, CASE WHEN a.txid = '0'::xid8 THEN a.seq END)
                a.key, a.kind, (extract(epoch FROM a.ts) * 1000000)::int8, a.seq, a.txid::text::int8, {commit}, {cols}
         FROM public.test_audit a, jsonb_populate_record(NULL::{t}, a.row_image) r
         ORDER BY a.key, a.txid, CASE WHEN a.txid = '0'::xid8 THEN a.seq END, a.seq DESC",
        cols = col_text(spec, "r", false),
        t = spec.qualified()
    );
    let rows = source.query(&sql, &[]).await.expect("read test_audit");
    let mut events: BTreeMap<String, Vec<AuditEvent>> = BTreeMap::new();
    for r in rows {
        let key: String = r.get(0);
        let kind: String = r.get(1);
        events.entry(key).or_default().push(AuditEvent {
            change_us: r.get(2),
            seq: r.get(3),
            txid: r.get::<_, i64>(4) as u64,
            commit_us: r.get(5),
            delete: kind == "d",
            values: (0..spec.columns.len())
                .map(|i| r.get::<_, Option<String>>(6 + i))
                .collect(),
        });
    }
    let mut out = History::new();
    for (key, evs) in events {
        // (time, seq, delete, values) in the order the history must follow.
        let mut seq: Vec<(i64, i64, bool, Vec<Option<String>>)> = Vec::new();
        match basis {
            Basis::ChangeTime => {
                seq = evs
                    .into_iter()
                    .map(|e| (e.change_us, e.seq, e.delete, e.values))
                    .collect();
            }
            Basis::Commit { snapshot } => {
                let shown = |e: &AuditEvent| {
                    e.txid == 0 || snapshot.as_ref().is_some_and(|f| f.shows_full(e.txid))
                };
                // The state the initial copy saw: the newest shown event, at its change time.
                let start = evs
                    .iter()
                    .filter(|e| shown(e))
                    .max_by_key(|e| (e.commit_us.unwrap_or(e.change_us), e.seq));
                if let Some(s) = start.filter(|s| !s.delete) {
                    seq.push((s.change_us, s.seq, false, s.values.clone()));
                }
                for e in evs.iter().filter(|e| !shown(e)) {
                    let ts = e
                        .commit_us
                        .expect("track_commit_timestamp must be on for logical tests");
                    seq.push((ts, e.seq, e.delete, e.values.clone()));
                }
            }
        }
        seq.sort_by_key(|e| (e.0, e.1));
        let versions = reference_versions(seq);
        if !versions.is_empty() {
            out.insert(key, versions);
        }
    }
    out
}

/// The SCD2 reference model over one key's events in order.
fn reference_versions(events: Vec<(i64, i64, bool, Vec<Option<String>>)>) -> Vec<Version> {
    let mut versions: Vec<Version> = Vec::new();
    let mut cur: Option<(Vec<Option<String>>, i64)> = None;
    for (ts, _, is_delete, values) in events {
        if is_delete {
            if let Some((v, from)) = cur.take() {
                versions.push(Version {
                    valid_from_us: from,
                    valid_to_us: Some(ts),
                    is_deleted: true,
                    values: v,
                });
            }
        } else {
            match &cur {
                Some((v, _)) if *v == values => {}
                Some((v, from)) => {
                    versions.push(Version {
                        valid_from_us: *from,
                        valid_to_us: Some(ts),
                        is_deleted: false,
                        values: v.clone(),
                    });
                    cur = Some((values, ts));
                }
                None => cur = Some((values, ts)),
            }
        }
    }
    if let Some((v, from)) = cur {
        versions.push(Version {
            valid_from_us: from,
            valid_to_us: None,
            is_deleted: false,
            values: v,
        });
    }
    versions
}

/// The history the warehouse holds, in the same shape.
pub async fn actual_history(warehouse: &Client, spec: &TableSpec) -> History {
    let sql = format!(
        "SELECT h.{k}::text, (extract(epoch FROM h.valid_from) * 1000000)::int8,
                (extract(epoch FROM h.valid_to) * 1000000)::int8, h.is_deleted, {cols}
         FROM {t} h ORDER BY h.{k}, h.valid_from",
        k = spec.history_key_column,
        cols = col_text(spec, "h", true),
        t = spec.history_qualified()
    );
    let rows = warehouse.query(&sql, &[]).await.expect("read history");
    let mut out = History::new();
    for r in rows {
        let values = (0..spec.columns.len())
            .map(|i| r.get::<_, Option<String>>(4 + i))
            .collect();
        out.entry(r.get(0)).or_default().push(Version {
            valid_from_us: r.get(1),
            valid_to_us: r.get(2),
            is_deleted: r.get(3),
            values,
        });
    }
    out
}

/// Panics with the first differing keys when two histories differ.
pub fn assert_same_history(expected: &History, actual: &History) {
    if expected == actual {
        return;
    }
    let mut report = String::new();
    let keys: std::collections::BTreeSet<&String> = expected.keys().chain(actual.keys()).collect();
    let mut shown = 0;
    for k in keys {
        if expected.get(k) != actual.get(k) {
            report.push_str(&format!(
                "key {k}:\n  expected {:?}\n  actual   {:?}\n",
                expected.get(k),
                actual.get(k)
            ));
            shown += 1;
            if shown == 5 {
                break;
            }
        }
    }
    panic!(
        "history differs from the ground truth ({} expected keys, {} actual):\n{report}",
        expected.len(),
        actual.len()
    );
}
