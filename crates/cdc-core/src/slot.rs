//! Replication slot administration for logical capture: check the server, create the
//! publication and the `pgoutput` slot, report its lag, drop it (the stream itself, and the
//! confirmation of durable positions, are `db::replication` and `capture::logical`). Used
//! by logical capture, `extractor drop-slot` and `status`.

use crate::db::ctx;
use crate::error::{Error, Result};
use crate::table::TableSpec;
use tokio_postgres::Client;

/// Slot settings.
#[derive(Debug, Clone)]
pub struct SlotSettings {
    pub slot: String,
    pub publication: String,
    /// The pipeline that owns the publication (`CDC_PIPELINE_NAME`).
    pub pipeline: String,
    /// Most changes decoded in one pass (whole transactions are never split).
    pub max_changes_per_pass: i32,
}

/// The slot's health: WAL it retains and how far its confirmed position trails.
#[derive(Debug, Clone, Default)]
pub struct SlotLag {
    pub retained_wal_bytes: i64,
    pub confirmed_lag_bytes: i64,
    pub active: bool,
}

/// Checks that the server can decode logically (wal_level) and that this role may
/// (REPLICATION). Misconfiguration is an error naming what to change.
pub async fn check_server(client: &Client) -> Result<()> {
    let wal_level: String = client
        .query_one("SHOW wal_level", &[])
        .await
        .map_err(ctx("reading wal_level"))?
        .get(0);
    if wal_level != "logical" {
        return Err(Error::config(
            "wal_level",
            format!("the source server runs with wal_level={wal_level}; logical capture needs wal_level=logical in its postgresql.conf (then restart it), or use CDC_CAPTURE_MODE=timestamp"),
        ));
    }
    let can: bool = client
        .query_one(
            "SELECT rolsuper OR rolreplication FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .map_err(ctx("checking the replication privilege"))?
        .get(0);
    if !can {
        return Err(Error::setup(
            "source role",
            "logical capture needs the REPLICATION privilege: ALTER ROLE <DB_USER> REPLICATION (and ownership of the table to create the publication)",
        ));
    }
    Ok(())
}

/// Whether the slot exists; an existing slot that is not a `pgoutput` slot of this database
/// is refused.
pub async fn exists(client: &Client, slot: &SlotSettings) -> Result<bool> {
    let row = client
        .query_opt(
            "SELECT plugin::text, database::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot.slot],
        )
        .await
        .map_err(ctx("looking up the replication slot"))?;
    let Some(row) = row else { return Ok(false) };
    let plugin: Option<String> = row.get(0);
    let db: Option<String> = row.get(1);
    let current: String = client
        .query_one("SELECT current_database()::text", &[])
        .await
        .map_err(ctx("reading the database name"))?
        .get(0);
    if plugin.as_deref() != Some("pgoutput") || db.as_deref() != Some(current.as_str()) {
        return Err(Error::config(
            "CDC_SLOT_NAME",
            format!(
                "slot {} exists but is not a pgoutput slot of database {current} (plugin {:?}, database {:?}); choose another name",
                slot.slot, plugin, db
            ),
        ));
    }
    Ok(true)
}

/// Creates the `pgoutput` slot.
pub async fn create(client: &Client, slot: &SlotSettings) -> Result<()> {
    client
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot.slot],
        )
        .await
        .map_err(|e| {
            if e.code().is_some_and(|c| c.code() == "53400") {
                Error::config(
                    "max_replication_slots",
                    format!("the source server has no free replication slot for {}; raise max_replication_slots or drop an unused slot", slot.slot),
                )
            } else {
                Error::Db {
                    context: format!("creating replication slot {} (CDC_SLOT_NAME)", slot.slot),
                    source: e,
                }
            }
        })?;
    tracing::info!(slot = %slot.slot, "created logical replication slot");
    Ok(())
}

/// Records in the state directory that this pipeline (its logical progress `owner`) creates
/// the slot, then creates it: until the initial copy is saved, that record is what tells this
/// pipeline's slot from another's (written first, so that no crash leaves our slot without it).
pub async fn create_owned(
    client: &Client,
    slot: &SlotSettings,
    state_dir: &std::path::Path,
    owner: &str,
) -> Result<()> {
    crate::changelog::write_atomic(
        &owner_path(slot, state_dir),
        format!("{owner}\n").as_bytes(),
    )?;
    create(client, slot).await
}

/// Forgets that this pipeline created the slot (`extractor drop-slot`).
pub fn forget_owner(slot: &SlotSettings, state_dir: &std::path::Path) {
    let _ = std::fs::remove_file(owner_path(slot, state_dir));
}

/// An existing slot that this pipeline has no progress for is refused unless this pipeline
/// created it: taking another pipeline's slot would confirm away that pipeline's changes.
pub fn check_owner(slot: &SlotSettings, state_dir: &std::path::Path, owner: &str) -> Result<()> {
    let recorded = std::fs::read_to_string(owner_path(slot, state_dir)).unwrap_or_default();
    if recorded.trim() == owner {
        return Ok(());
    }
    Err(Error::config(
        "CDC_SLOT_NAME",
        format!(
            "slot {} already exists and this pipeline has no progress for it (CDC_STATE_DIR): it may be another pipeline's, \
             whose changes this one would consume; choose another CDC_SLOT_NAME, or, if it is a leftover of this pipeline, \
             remove it with `extractor drop-slot`",
            slot.slot
        ),
    ))
}

fn owner_path(slot: &SlotSettings, state_dir: &std::path::Path) -> std::path::PathBuf {
    state_dir.join(format!("slot-{}.owner", slot.slot))
}

/// The comment that marks a publication as a pipeline's.
const OWNER_COMMENT: &str = "cdc-historical-warehouse pipeline ";

fn owner_comment(pipeline: &str) -> String {
    format!("{OWNER_COMMENT}{pipeline}")
}

/// Creates the publication of `specs`' tables for `pipeline`, or adds missing tables to it.
/// The publication records its pipeline in its comment; one owned by another pipeline, or an
/// unmarked one that publishes tables outside `specs` (whose changes this pipeline would
/// receive), is refused. An unmarked one publishing only our tables (made by hand, or by an
/// earlier version) is claimed.
pub async fn ensure_publication(
    client: &Client,
    slot: &SlotSettings,
    specs: &[TableSpec],
) -> Result<()> {
    let pipeline = slot.pipeline.as_str();
    let pubname = &slot.publication;
    let ident = quote_ident(pubname);
    let ours = owner_comment(pipeline);
    let row = client
        .query_opt(
            "SELECT obj_description(oid, 'pg_publication'), puballtables,
                    pubinsert AND pubupdate AND pubdelete AND pubtruncate
             FROM pg_publication WHERE pubname = $1",
            &[pubname],
        )
        .await
        .map_err(ctx("looking up the publication"))?;
    let Some(row) = row else {
        let tables: Vec<String> = specs.iter().map(|s| s.qualified()).collect();
        client
            .batch_execute(&format!(
                "CREATE PUBLICATION {ident} FOR TABLE {}; COMMENT ON PUBLICATION {ident} IS {}",
                tables.join(", "),
                quote_literal(&ours)
            ))
            .await
            .map_err(ctx(format!(
                "creating publication {pubname} (CDC_PUBLICATION)"
            )))?;
        tracing::info!(publication = %pubname, "created publication");
        return Ok(());
    };
    let comment: Option<String> = row.get(0);
    let all_tables: bool = row.get(1);
    let every_change: bool = row.get(2);
    let published: Vec<(String, String)> = client
        .query(
            "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1",
            &[pubname],
        )
        .await
        .map_err(ctx("reading the publication's tables"))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let foreign: Vec<String> = published
        .iter()
        .filter(|(sc, t)| !specs.iter().any(|s| &s.schema == sc && &s.name == t))
        .map(|(sc, t)| format!("{sc}.{t}"))
        .collect();
    match comment.as_deref() {
        Some(c) if c == ours => {}
        Some(c) if c.starts_with(OWNER_COMMENT) => {
            return Err(Error::config(
                "CDC_PUBLICATION",
                format!(
                    "publication {pubname} belongs to {}; this is pipeline '{pipeline}':                      choose another CDC_PUBLICATION or CDC_PIPELINE_NAME",
                    c.trim_start_matches("cdc-historical-warehouse ")
                ),
            ))
        }
        _ if all_tables || !foreign.is_empty() => {
            return Err(Error::config(
                "CDC_PUBLICATION",
                format!(
                    "publication {pubname} already exists and publishes {} outside CDC_TABLES;                      it may be another application's: choose another CDC_PUBLICATION",
                    if all_tables {
                        "every table".to_owned()
                    } else {
                        foreign.join(", ")
                    }
                ),
            ))
        }
        _ => {
            client
                .batch_execute(&format!(
                    "COMMENT ON PUBLICATION {ident} IS {}",
                    quote_literal(&ours)
                ))
                .await
                .map_err(ctx(format!("marking publication {pubname} as this pipeline's")))?;
            tracing::info!(publication = %pubname, "claimed existing publication");
        }
    }
    if !every_change {
        // A publication made by hand with fewer operations: a TRUNCATE (or a delete) it does
        // not send would leave rows current in the history that the source no longer has.
        return Err(Error::config(
            "CDC_PUBLICATION",
            format!(
                "publication {pubname} does not publish every change (inserts, updates, deletes and truncates): \
                 ALTER PUBLICATION {ident} SET (publish = 'insert, update, delete, truncate')"
            ),
        ));
    }
    for spec in specs {
        if published
            .iter()
            .any(|(sc, t)| sc == &spec.schema && t == &spec.name)
        {
            continue;
        }
        client
            .batch_execute(&format!(
                "ALTER PUBLICATION {ident} ADD TABLE {}",
                spec.qualified()
            ))
            .await
            .map_err(ctx(format!(
                "adding {} to publication {pubname}",
                spec.qualified()
            )))?;
    }
    Ok(())
}

fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The slot's retained WAL and confirmed lag, if it exists.
pub async fn lag(client: &Client, slot: &str) -> Result<Option<SlotLag>> {
    let row = client
        .query_opt(
            "SELECT coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn), 0)::int8,
                    coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn), 0)::int8, active
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(ctx("reading the replication slot's lag"))?;
    Ok(row.map(|r| SlotLag {
        retained_wal_bytes: r.get(0),
        confirmed_lag_bytes: r.get(1),
        active: r.get(2),
    }))
}

/// Drops the slot and the publication (`extractor drop-slot`). Returns whether each existed.
pub async fn drop(client: &Client, slot: &SlotSettings) -> Result<(bool, bool)> {
    let comment: Option<String> = client
        .query_opt(
            "SELECT obj_description(oid, 'pg_publication') FROM pg_publication WHERE pubname = $1",
            &[&slot.publication],
        )
        .await
        .map_err(ctx("looking up the publication"))?
        .and_then(|r| r.get(0));
    if let Some(c) =
        comment.filter(|c| c.starts_with(OWNER_COMMENT) && *c != owner_comment(&slot.pipeline))
    {
        return Err(Error::config(
            "CDC_PUBLICATION",
            format!(
                "publication {} belongs to {}, not to pipeline '{}'; nothing was dropped",
                slot.publication,
                c.trim_start_matches("cdc-historical-warehouse "),
                slot.pipeline
            ),
        ));
    }
    let dropped_slot = client
        .execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot.slot],
        )
        .await
        .map_err(ctx(format!("dropping replication slot {}", slot.slot)))?
        > 0;
    let had_pub = client
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&slot.publication],
        )
        .await
        .map_err(ctx("looking up the publication"))?
        .is_some();
    if had_pub {
        client
            .batch_execute(&format!(
                "DROP PUBLICATION {}",
                quote_ident(&slot.publication)
            ))
            .await
            .map_err(ctx(format!("dropping publication {}", slot.publication)))?;
    }
    Ok((dropped_slot, had_pub))
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}
