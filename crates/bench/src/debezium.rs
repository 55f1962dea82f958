//! The Debezium reference (`--debezium DIR`, `make bench-debezium`): in each logical
//! throughput run, a copy of the extractor's slot is made before the extractor drains the
//! backlog; after it, Debezium's embedded engine (PostgreSQL connector, pgoutput, the same
//! publication) drains the copy into a file, fsynced, through `DrainSlot`
//! (`crates/bench/debezium/`, built by `scripts/debezium.sh build` into DIR). Both are timed
//! from process start to exit with their CPU time and peak RSS, and their change events must
//! be the same, event by event: operation, transaction, position and key.

use crate::procs::{Background, Measured, Runner};
use crate::setup::{Clusters, PUBLICATION, SLOT, SOURCE_DB};
use anyhow::{bail, Context, Result};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio_postgres::Client;

/// The copy of the extractor's slot that Debezium drains.
pub const SLOT_COPY: &str = "bench_debezium";

/// Debezium's drain of one backlog.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Drain {
    pub events: u64,
    pub secs: f64,
    pub cpu_secs: f64,
    pub max_rss_kb: u64,
}

/// The Debezium build: `DrainSlot` compiled into `classes/`, Debezium's jars in `libs/`.
pub fn check_dir(dir: &Path) -> Result<PathBuf> {
    let dir = std::path::absolute(dir)?;
    for need in ["classes/DrainSlot.class", "libs"] {
        if !dir.join(need).exists() {
            bail!(
                "--debezium {}: no {need} there; run `scripts/debezium.sh build` (or `make bench-debezium`)",
                dir.display()
            );
        }
    }
    Ok(dir)
}

/// Copies the extractor's slot (same position, same plugin) for Debezium, before the
/// extractor consumes anything of the backlog.
pub async fn copy_slot(source: &Client) -> Result<()> {
    new_slot(
        source,
        &format!("pg_copy_logical_replication_slot('{SLOT}', '{SLOT_COPY}')"),
    )
    .await
    .context("copying the extractor's slot for Debezium")
}

/// Makes Debezium's slot with `make` (a function call), dropping one a failed run left.
async fn new_slot(source: &Client, make: &str) -> Result<()> {
    source
        .batch_execute(&format!(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
              WHERE slot_name = '{SLOT_COPY}';
             SELECT {make}"
        ))
        .await?;
    Ok(())
}

/// What identifies a change event in both formats (the Debezium envelope): operation,
/// transaction id, LSN, and the key column's value in the row image.
type Identity = (char, u64, u64, i64);

/// A change event's identity; `None` when it is not an insert, update or delete. Every part
/// must be there: a part missing on both sides must not compare equal.
fn identity(v: &Value, key: &str) -> Result<Option<Identity>> {
    let op = match v["op"].as_str() {
        Some("c") => 'c',
        Some("u") => 'u',
        Some("d") => 'd',
        _ => return Ok(None),
    };
    let image = if v["after"].is_object() {
        &v["after"]
    } else {
        &v["before"]
    };
    let part = |x: &Value, what: &str| {
        x.as_i64()
            .with_context(|| format!("a change event without {what}"))
    };
    Ok(Some((
        op,
        part(&v["source"]["txId"], "source.txId")? as u64,
        part(&v["source"]["lsn"], "source.lsn")? as u64,
        part(&image[key], key)?,
    )))
}

/// The change events (inserts, updates, deletes) of JSON-lines files, in order.
fn identities(files: &[PathBuf], key: &str) -> Result<Vec<Identity>> {
    let mut out = Vec::new();
    for f in files {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        for (i, line) in text.lines().enumerate() {
            let at = || format!("{}:{}", f.display(), i + 1);
            let v: Value =
                serde_json::from_str(line).with_context(|| format!("{}: not JSON", at()))?;
            out.extend(identity(&v, key).with_context(at)?);
        }
    }
    Ok(out)
}

/// Drains the slot's copy with Debezium and checks its events against the extractor's
/// change logs (`ours`; `key` the table's key column); drops the copy.
pub async fn drain(
    dir: &Path,
    runner: &Runner,
    clusters: &Clusters,
    source: &Client,
    ours: &[PathBuf],
    key: &str,
) -> Result<Drain> {
    let expected = identities(ours, key)?;
    if expected.is_empty() {
        bail!("the extractor wrote no change events to compare Debezium's with");
    }
    let props = properties(runner, clusters)?;
    let out = runner.cwd.join("debezium-events.jsonl");
    let java = which("java")?;
    let classpath = classpath(dir);
    let (props_s, out_s, n) = (
        props.display().to_string(),
        out.display().to_string(),
        expected.len().to_string(),
    );
    let m: Measured = runner
        .measured_program(
            "debezium",
            &java,
            &["-cp", &classpath, "DrainSlot", &props_s, &out_s, &n],
        )
        .await?;
    let theirs = identities(std::slice::from_ref(&out), key)?;
    if let Some(i) =
        (0..expected.len().max(theirs.len())).find(|&i| expected.get(i) != theirs.get(i))
    {
        bail!(
            "Debezium's events differ from the extractor's at event {} of {}: extractor {:?}, Debezium {:?} (op, txId, LSN, {key}); see {}",
            i + 1,
            expected.len(),
            expected.get(i),
            theirs.get(i),
            out.display()
        );
    }
    std::fs::remove_file(&out)?;
    crate::setup::drop_slot(source, SLOT_COPY).await?;
    Ok(Drain {
        events: theirs.len() as u64,
        secs: m.secs,
        cpu_secs: m.cpu_secs,
        max_rss_kb: m.max_rss_kb,
    })
}

/// The engine's settings for the bench's source and the slot's copy, written to the run's
/// directory (offsets start afresh: the engine reads from the slot's position).
fn properties(runner: &Runner, clusters: &Clusters) -> Result<PathBuf> {
    let props = runner.cwd.join("debezium.properties");
    let offsets = runner.cwd.join("debezium-offsets.dat");
    let mut settings = vec![
        ("name", "bench-debezium".to_owned()),
        (
            "connector.class",
            "io.debezium.connector.postgresql.PostgresConnector".to_owned(),
        ),
        (
            "offset.storage",
            "org.apache.kafka.connect.storage.FileOffsetBackingStore".to_owned(),
        ),
        (
            "offset.storage.file.filename",
            offsets.display().to_string(),
        ),
        ("database.hostname", clusters.host.clone()),
        ("database.port", clusters.source_port.to_string()),
        ("database.user", clusters.user.clone()),
        ("database.password", clusters.password.clone()),
        ("database.dbname", SOURCE_DB.to_owned()),
        ("database.sslmode", clusters.tls.mode.to_string()),
        ("topic.prefix", "bench".to_owned()),
        ("plugin.name", "pgoutput".to_owned()),
        ("slot.name", SLOT_COPY.to_owned()),
        ("publication.name", PUBLICATION.to_owned()),
        ("publication.autocreate.mode", "disabled".to_owned()),
        ("snapshot.mode", "no_data".to_owned()),
        ("table.include.list", "public.orders".to_owned()),
        ("tombstones.on.delete", "false".to_owned()),
        ("decimal.handling.mode", "string".to_owned()),
        ("converter.schemas.enable", "false".to_owned()),
        // How often the engine hands what the connector queued over (default 500 ms): as
        // often as the extractor's streaming batch window, 100 ms.
        ("poll.interval.ms", "100".to_owned()),
    ];
    if let Some(root) = &clusters.tls.root_cert {
        settings.push(("database.sslrootcert", root.display().to_string()));
    }
    let text: String = settings
        .iter()
        .map(|(k, v)| format!("{k}={}\n", v.replace('\\', "\\\\")))
        .collect();
    std::fs::write(&props, text)?;
    let _ = std::fs::remove_file(&offsets);
    Ok(props)
}

fn classpath(dir: &Path) -> String {
    format!(
        "{}:{}/*",
        dir.join("classes").display(),
        dir.join("libs").display()
    )
}

/// The prefix of the logical decoding message that ends a steady phase's follower.
const END_PREFIX: &str = "cdc-bench-end";

/// Debezium's engine following a slot of its own through a steady phase.
pub struct Follower {
    child: Background,
    out: PathBuf,
    /// The engine's JVM and the walsender serving it.
    pub pids: Vec<i32>,
}

/// What Debezium did in a steady phase of its own: its delays (the time the engine handed
/// each change over minus the source's commit time), its CPU (JVM and walsender) with and
/// without traffic.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Steady {
    /// The phase (`SteadyRate::label`).
    pub rate: String,
    /// The mutator's operations and the traffic's seconds.
    pub ops: u64,
    pub seconds: f64,
    pub events: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Median delay in the last third of the phase minus that of the first third.
    pub trend_ms: f64,
    pub idle_cpu: Option<f64>,
    pub cpu: f64,
}

impl Follower {
    /// Makes a slot of Debezium's own at the source's current position (after the initial
    /// copy) and starts the engine on it; returns once the slot is being streamed.
    pub async fn start(
        dir: &Path,
        runner: &Runner,
        clusters: &Clusters,
        source: &Client,
    ) -> Result<Follower> {
        new_slot(
            source,
            &format!("pg_create_logical_replication_slot('{SLOT_COPY}', 'pgoutput')"),
        )
        .await
        .context("making Debezium's slot")?;
        let props = properties(runner, clusters)?;
        let out = runner.cwd.join("debezium-followed.tsv");
        let java = which("java")?;
        let (cp, props_s, out_s, until) = (
            classpath(dir),
            props.display().to_string(),
            out.display().to_string(),
            format!("until:{END_PREFIX}"),
        );
        let mut child = runner.spawn_program(
            "debezium",
            &java,
            &["-cp", &cp, "DrainSlot", &props_s, &out_s, &until],
        )?;
        let deadline = Instant::now() + Duration::from_secs(120);
        let walsender = loop {
            child.check_alive()?;
            let pid: Option<i32> = source
                .query_one(
                    "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
                    &[&SLOT_COPY],
                )
                .await?
                .get(0);
            if let Some(pid) = pid {
                break pid;
            }
            if Instant::now() > deadline {
                bail!(
                    "Debezium did not start streaming within 120 s; see {}",
                    child.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        Ok(Follower {
            pids: vec![child.pid()? as i32, walsender],
            child,
            out,
        })
    }

    /// Ends the engine with a message after everything the phase wrote, waits for it to get
    /// there, and reads the delays of the changes committed from `since` on.
    /// Each delay (ms) with its change's commit time, in seconds after `since`.
    pub async fn finish(self, source: &Client, since: DateTime<Utc>) -> Result<Vec<(f64, f64)>> {
        source
            .execute(
                "SELECT pg_logical_emit_message(true, $1, '')",
                &[&END_PREFIX],
            )
            .await?;
        self.child.wait(Duration::from_secs(300)).await?;
        let since_us = since.timestamp_micros();
        let text = std::fs::read_to_string(&self.out)?;
        let mut delays = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let at = || format!("{}:{}", self.out.display(), i + 1);
            let (received, event) = line
                .split_once('\t')
                .with_context(|| format!("{}: no receipt time", at()))?;
            let received: i64 = received.parse().with_context(at)?;
            let v: Value = serde_json::from_str(event).with_context(at)?;
            if !matches!(v["op"].as_str(), Some("c" | "u" | "d" | "t")) {
                continue;
            }
            let committed = v["source"]["ts_us"]
                .as_i64()
                .with_context(|| format!("{}: no source.ts_us", at()))?;
            if committed >= since_us {
                delays.push((
                    (received - committed) as f64 / 1000.0,
                    (committed - since_us) as f64 / 1e6,
                ));
            }
        }
        std::fs::remove_file(&self.out)?;
        crate::setup::drop_slot(source, SLOT_COPY).await?;
        Ok(delays)
    }
}

/// `program` found on PATH.
fn which(program: &str) -> Result<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .with_context(|| format!("{program} not found on PATH (Debezium needs Java 17 or newer)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_envelopes_give_the_same_identity() {
        // An update as the extractor writes it and as Debezium's engine writes it.
        let ours = r#"{"format_version":1,"op":"u","before":{"id":7,"quantity":1},"after":{"id":7,"quantity":2},"source":{"version":"0.1.0","connector":"cdc-historical-warehouse","db":"bench_src","schema":"public","table":"orders","capture_mode":"logical","snapshot":false,"key":"7","ts_us":1,"lsn":10994783312,"txId":467978},"ts_ms":2}"#;
        let theirs = r#"{"before":null,"after":{"id":7,"quantity":2},"source":{"version":"3.6.3.Final","connector":"postgresql","txId":467978,"lsn":10994783312},"transaction":null,"op":"u","ts_ms":3}"#;
        let id = |s: &str| identity(&serde_json::from_str(s).unwrap(), "id").unwrap();
        assert_eq!(id(ours), Some(('u', 467978, 10994783312, 7)));
        assert_eq!(id(ours), id(theirs));
        // A delete's key is in `before`; a schema event is not compared.
        let delete = r#"{"op":"d","before":{"id":9},"after":null,"source":{"txId":1,"lsn":2}}"#;
        assert_eq!(id(delete), Some(('d', 1, 2, 9)));
        assert_eq!(id(r#"{"op":"s","before":null,"after":null}"#), None);
        // A part missing is an error, not a match.
        let bare = serde_json::from_str(r#"{"op":"c","after":{"id":1},"source":{}}"#).unwrap();
        assert!(identity(&bare, "id").is_err());
    }
}
