//! The ground truth: a trigger on the source records every committed row state and every
//! delete with the exact times the pipeline must use; from it, the history the reference
//! model demands, and the history the warehouse actually holds, in one shape.

use super::model::{reference_versions, History, Version};
use crate::progress::SnapshotFilter;
use crate::table::TableSpec;
use std::collections::BTreeMap;
use tokio_postgres::Client;

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
                 FOR EACH ROW WHEN (NEW.table_name = 'orders')
                 EXECUTE FUNCTION public.test_audit_delete();
             INSERT INTO public.test_audit (kind, ts, key, row_image, txid)
                 SELECT 'u', o.last_updated, o.id::text, to_jsonb(o), '0'::xid8 FROM public.orders o;",
        )
        .await
        .expect("install the test audit");
}

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
        let versions = reference_versions(
            seq.into_iter()
                .map(|(ts, _, delete, values)| (ts, delete, values))
                .collect(),
        );
        if !versions.is_empty() {
            out.insert(key, versions);
        }
    }
    out
}

/// The history the warehouse holds, in the same shape (a table with a single-column key).
pub async fn actual_history(warehouse: &Client, spec: &TableSpec) -> History {
    let sql = format!(
        "SELECT h.{k}::text, (extract(epoch FROM h.valid_from) * 1000000)::int8,
                (extract(epoch FROM h.valid_to) * 1000000)::int8, h.is_deleted, {cols}
         FROM {t} h ORDER BY h.{k}, h.valid_from",
        k = spec.history_key_columns[0],
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
