//! `scd2-loader rebuild <schema.table>`: replays the kept change logs (`processed/`, plain or
//! compressed, in capture order) into a new history table `<history>_rebuild`, starting from
//! the description the live history started with (its `baseline` in `cdc_schema_changes`)
//! and following the same schema events, then compares it with the live history version for
//! version. With `--replace` the rebuild becomes the live history (the old one is kept as
//! `<history>_before_rebuild`): the way back after a history table was dropped or emptied.

use super::apply::{apply_files, Applying};
use super::loader::describe_tables;
use super::store::{HistorySql, PgHistory};
use crate::changelog::{self, batch_name, PROCESSED_DIR};
use crate::config::loader::LoaderConfig;
use crate::db::{self, ctx};
use crate::error::{Error, Result};
use crate::shutdown::Shutdown;
use crate::table::TableSpec;
use tokio_postgres::{Client, GenericClient};

/// What a rebuild did and found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rebuilt {
    pub history: String,
    pub rebuild: String,
    pub files: usize,
    pub events: u64,
    pub versions: i64,
    /// The live history's versions, when it exists.
    pub live_versions: Option<i64>,
    /// Versions only the live history has, and only the rebuild has (all columns but the
    /// warehouse's own `surrogate_key`, `created_at`, `updated_at`).
    pub only_live: i64,
    pub only_rebuild: i64,
    /// Files recorded as applied to the history that `processed/` no longer has.
    pub missing_files: Vec<String>,
    pub replaced: bool,
}

impl Rebuilt {
    pub fn render(&self) -> String {
        let mut out = format!(
            "{}: replayed {} file(s) from processed/ ({} events) into {}: {} versions\n",
            self.history, self.files, self.events, self.rebuild, self.versions
        );
        match self.live_versions {
            None => out.push_str("  the live history table does not exist\n"),
            Some(n) if self.only_live == 0 && self.only_rebuild == 0 => out.push_str(&format!(
                "  equal to the live history, version for version ({n} versions)\n"
            )),
            Some(n) => out.push_str(&format!(
                "  differs from the live history ({n} versions): {} version(s) only in the live one, {} only in the rebuild\n",
                self.only_live, self.only_rebuild
            )),
        }
        if !self.missing_files.is_empty() {
            out.push_str(&format!(
                "  {} file(s) recorded as applied are not in processed/ (pruned by CDC_PROCESSED_RETENTION_DAYS, or moved): \
                 their changes are not in the rebuild (after --replace, `extractor resnapshot` of the table makes \
                 its current rows the source's again); first: {}\n",
                self.missing_files.len(),
                self.missing_files[0]
            ));
        }
        if self.replaced {
            out.push_str(&format!(
                "  replaced: {} is now the rebuild (the table it replaced, if any, is {}_before_rebuild)\n",
                self.history, self.history
            ));
        }
        out
    }

    /// Whether the rebuild equals the live history (or replaced it).
    pub fn agrees(&self) -> bool {
        self.replaced
            || (self.live_versions.is_some() && self.only_live == 0 && self.only_rebuild == 0)
    }
}

pub async fn run(
    cfg: &LoaderConfig,
    table: &str,
    replace: bool,
    shutdown: &Shutdown,
) -> Result<Rebuilt> {
    let specs = describe_tables(cfg, shutdown, None).await?;
    let Some(t) = specs.iter().position(|s| s.qualified() == table) else {
        return Err(Error::setup(
            format!("table {table}"),
            format!(
                "is not one of CDC_TABLES ({})",
                specs
                    .iter()
                    .map(|s| s.qualified())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    };
    // No loader applies while the rebuild replays and swaps.
    let _lock = super::loader::own_log_dir(cfg, &specs)?;
    let mut client = db::connect(&cfg.warehouse, shutdown).await?;
    let live = specs[t].clone();
    // Migrations first (cdc_schema_changes may not exist yet).
    crate::migrate::migrations(&mut client).await?;
    let start = super::schema::baseline(&client, &live)
        .await?
        .unwrap_or_else(|| live.clone());
    let mut rebuild = start;
    rebuild.history_table = format!("{}_rebuild", live.history_table);
    let rb = rebuild.history_qualified();
    client
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS {rb};
             DELETE FROM public.cdc_schema_changes WHERE history_table = '{rb}';"
        ))
        .await
        .map_err(ctx(format!("removing an earlier {rb}")))?;
    let rebuild = crate::migrate::migrate(&mut client, &rebuild).await?;

    let files = changelog::pending_files(&cfg.log_dir.join(PROCESSED_DIR))?;
    let mut descriptions = specs.clone();
    descriptions[t] = rebuild.clone();
    let mut how = Applying::new(&descriptions, cfg.max_events_in_memory).only(t);
    let mut sqls: Vec<HistorySql> = descriptions.iter().map(HistorySql::new).collect();
    let mut out = Rebuilt {
        history: live.history_qualified(),
        rebuild: rb.clone(),
        files: files.len(),
        ..Default::default()
    };
    let run_id = crate::metadata::new_run_id("rebuild");
    for batch in files.chunks(cfg.max_files_per_batch.max(1)) {
        if shutdown.is_triggered() {
            return Err(Error::Shutdown);
        }
        let tx = client
            .transaction()
            .await
            .map_err(ctx("starting a rebuild transaction"))?;
        let mut next = how.clone();
        let mut store = PgHistory::new(&tx, sqls.clone()).replaying();
        let stats = apply_files(&mut store, &mut next, batch, &run_id).await?;
        let next_sqls = store.into_sqls();
        tx.commit()
            .await
            .map_err(ctx("committing a rebuild transaction"))?;
        (how, sqls) = (next, next_sqls);
        out.events += stats.events;
    }
    let kept: Vec<String> = files.iter().map(|f| batch_name(f)).collect();
    out.missing_files = client
        .query(
            "SELECT batch_id FROM public.cdc_applied_batches
             WHERE $1 = ANY(string_to_array(history_table, ', ')) AND NOT batch_id = ANY($2)
             ORDER BY batch_id",
            &[&live.history_qualified(), &kept],
        )
        .await
        .map_err(ctx("reading cdc_applied_batches"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    out.versions = count(&client, &rb).await?;
    if exists(&client, &live.history_qualified()).await? {
        let (only_live, only_rebuild) = compare(&client, &live, &rebuild).await?;
        out.live_versions = Some(count(&client, &live.history_qualified()).await?);
        (out.only_live, out.only_rebuild) = (only_live, only_rebuild);
    }
    if replace {
        swap(&mut client, &live, &rebuild).await?;
        out.replaced = true;
    }
    Ok(out)
}

async fn count(client: &Client, table: &str) -> Result<i64> {
    Ok(client
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .map_err(ctx(format!("counting {table}")))?
        .get(0))
}

async fn exists(client: &impl GenericClient, table: &str) -> Result<bool> {
    Ok(client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
        .await
        .map_err(ctx(format!("looking up {table}")))?
        .get(0))
}

/// The columns of a table, but the warehouse's own bookkeeping.
async fn columns(client: &Client, spec: &TableSpec) -> Result<Vec<String>> {
    Ok(client
        .query(
            "SELECT attname::text FROM pg_attribute
             WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped
               AND attname NOT IN ('surrogate_key', 'created_at', 'updated_at')
             ORDER BY attname",
            &[&spec.history_qualified()],
        )
        .await
        .map_err(ctx(format!(
            "reading the columns of {}",
            spec.history_qualified()
        )))?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Versions only in `a`, and only in `b`, over the columns both have (a column only one of
/// them has counts every version of that one).
async fn compare(client: &Client, a: &TableSpec, b: &TableSpec) -> Result<(i64, i64)> {
    let (ca, cb) = (columns(client, a).await?, columns(client, b).await?);
    if ca != cb {
        return Ok((
            count(client, &a.history_qualified()).await?,
            count(client, &b.history_qualified()).await?,
        ));
    }
    let cols = ca.join(", ");
    let (ha, hb) = (a.history_qualified(), b.history_qualified());
    let row = client
        .query_one(
            &format!(
                "SELECT (SELECT count(*) FROM (SELECT {cols} FROM {ha} EXCEPT ALL SELECT {cols} FROM {hb}) x),
                        (SELECT count(*) FROM (SELECT {cols} FROM {hb} EXCEPT ALL SELECT {cols} FROM {ha}) y)"
            ),
            &[],
        )
        .await
        .map_err(ctx(format!("comparing {ha} with {hb}")))?;
    Ok((row.get(0), row.get(1)))
}

/// In one transaction: the live history (if any) becomes `<history>_before_rebuild` (an
/// older one of that name is dropped), the rebuild becomes the live history, each with its
/// indexes and its `cdc_schema_changes` rows.
async fn swap(client: &mut Client, live: &TableSpec, rebuild: &TableSpec) -> Result<()> {
    let tx = client
        .transaction()
        .await
        .map_err(ctx("starting the swap"))?;
    let schema = &live.history_schema;
    let (l, r) = (&live.history_table, &rebuild.history_table);
    let old = format!("{l}_before_rebuild");
    let mut sql = format!("DROP TABLE IF EXISTS {schema}.{old};\n");
    sql.push_str(&format!(
        "DELETE FROM public.cdc_schema_changes WHERE history_table = '{schema}.{old}';\n"
    ));
    if exists(&tx, &live.history_qualified()).await? {
        sql.push_str(&renamed(&tx, schema, l, &old).await?);
    }
    sql.push_str(&renamed(&tx, schema, r, l).await?);
    tx.batch_execute(&sql)
        .await
        .map_err(ctx(format!("replacing {schema}.{l} by its rebuild")))?;
    tx.commit().await.map_err(ctx("committing the swap"))?;
    Ok(())
}

/// The SQL that renames table `from` to `to`, its indexes (named after the table) and its
/// `cdc_schema_changes` rows.
async fn renamed(tx: &impl GenericClient, schema: &str, from: &str, to: &str) -> Result<String> {
    let indexes: Vec<String> = tx
        .query(
            "SELECT indexname::text FROM pg_indexes WHERE schemaname = $1 AND tablename = $2",
            &[&schema, &from],
        )
        .await
        .map_err(ctx(format!("reading the indexes of {schema}.{from}")))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut sql = String::new();
    for i in indexes {
        if let Some(rest) = i.strip_prefix(from) {
            sql.push_str(&format!("ALTER INDEX {schema}.{i} RENAME TO {to}{rest};\n"));
        }
    }
    sql.push_str(&format!("ALTER TABLE {schema}.{from} RENAME TO {to};\n"));
    sql.push_str(&format!(
        "UPDATE public.cdc_schema_changes SET history_table = '{schema}.{to}' WHERE history_table = '{schema}.{from}';\n"
    ));
    Ok(sql)
}
