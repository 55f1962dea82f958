//! The ground truth: a trigger on the source records every committed row state, every
//! delete and every truncate with the exact times the pipeline must use; from it, the history the reference
//! model demands, and the history the warehouse actually holds, in one shape.

use super::model::{reference_versions, Change, History, Version};
use crate::progress::SnapshotFilter;
use crate::table::TableSpec;
use std::collections::BTreeMap;
use tokio_postgres::Client;

/// Installs the ground truth on the source for `orders`: every committed row state (after
/// insert or update) and every delete, with the exact times the pipeline must use, in
/// `public.test_audit`. Rows that exist already are recorded as their current state.
pub async fn install_audit(source: &Client) {
    install_audit_for(source, &[TableSpec::orders()]).await
}

/// The ground truth for several tables (each with its change-time column and the tombstone
/// trigger): keys are recorded as the pipeline spells them (a composite key as the JSON
/// array of its columns' texts).
pub async fn install_audit_for(source: &Client, specs: &[TableSpec]) {
    let mut sql = String::from(
        "CREATE TABLE public.test_audit (
             seq BIGSERIAL PRIMARY KEY, tbl TEXT NOT NULL, kind TEXT NOT NULL, ts TIMESTAMPTZ NOT NULL,
             key TEXT NOT NULL, txid XID8 NOT NULL DEFAULT pg_current_xact_id(), row_image JSONB NOT NULL);
         CREATE TABLE public.test_audit_tables (tbl TEXT PRIMARY KEY, change_time TEXT NOT NULL, keys TEXT[] NOT NULL);
         CREATE FUNCTION public.test_audit_key(j jsonb, keys text[]) RETURNS text LANGUAGE sql IMMUTABLE AS $$
             SELECT CASE WHEN cardinality(keys) = 1 THEN j->>keys[1]
                         ELSE (SELECT jsonb_agg(j->>k ORDER BY n) FROM unnest(keys) WITH ORDINALITY u(k, n))::text END
         $$;
         CREATE FUNCTION public.test_audit_row() RETURNS trigger LANGUAGE plpgsql AS $$
         DECLARE j jsonb := to_jsonb(NEW); t public.test_audit_tables;
         BEGIN
             SELECT * INTO t FROM public.test_audit_tables WHERE tbl = TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME;
             INSERT INTO public.test_audit (tbl, kind, ts, key, row_image)
                 VALUES (t.tbl, 'u', (j->>t.change_time)::timestamptz, public.test_audit_key(j, t.keys), j);
             RETURN NULL;
         END $$;
         CREATE FUNCTION public.test_audit_delete() RETURNS trigger LANGUAGE plpgsql AS $$
         DECLARE t public.test_audit_tables;
         BEGIN
             SELECT * INTO t FROM public.test_audit_tables WHERE tbl = NEW.table_schema || '.' || NEW.table_name;
             IF FOUND THEN
                 INSERT INTO public.test_audit (tbl, kind, ts, key, row_image)
                     VALUES (t.tbl, 'd', NEW.deleted_at, public.test_audit_key(NEW.old_row, t.keys), NEW.old_row);
             END IF;
             RETURN NULL;
         END $$;
         CREATE TRIGGER zz_test_audit AFTER INSERT ON public.cdc_tombstones
             FOR EACH ROW EXECUTE FUNCTION public.test_audit_delete();
         CREATE FUNCTION public.test_audit_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF EXISTS (SELECT 1 FROM public.test_audit_tables
                        WHERE tbl = NEW.table_schema || '.' || NEW.table_name) THEN
                 INSERT INTO public.test_audit (tbl, kind, ts, key, row_image)
                     VALUES (NEW.table_schema || '.' || NEW.table_name, 't', NEW.truncated_at, '', '{}');
             END IF;
             RETURN NULL;
         END $$;
         CREATE TRIGGER zz_test_audit AFTER INSERT ON public.cdc_truncations
             FOR EACH ROW EXECUTE FUNCTION public.test_audit_truncate();",
    );
    for spec in specs {
        let t = spec.qualified();
        let ct = spec
            .change_time_column
            .clone()
            .unwrap_or_else(|| "last_updated".into());
        let keys: Vec<String> = spec.key.iter().map(|k| format!("'{}'", k.name)).collect();
        sql.push_str(&format!(
            "INSERT INTO public.test_audit_tables VALUES ('{t}', '{ct}', ARRAY[{keys}]);
             CREATE TRIGGER zz_test_audit AFTER INSERT OR UPDATE ON {t}
                 FOR EACH ROW EXECUTE FUNCTION public.test_audit_row();
             INSERT INTO public.test_audit (tbl, kind, ts, key, row_image, txid)
                 SELECT '{t}', 'u', (to_jsonb(o)->>'{ct}')::timestamptz,
                        public.test_audit_key(to_jsonb(o), ARRAY[{keys}]), to_jsonb(o), '0'::xid8
                 FROM {t} o;",
            keys = keys.join(", ")
        ));
    }
    source
        .batch_execute(&sql)
        .await
        .expect("install the test audit");
}

/// A key as the pipeline spells it (`TableSpec::encode_key`), from the audit's spelling.
fn canonical_key(spec: &TableSpec, key: String) -> String {
    if spec.key.len() == 1 {
        return key;
    }
    let parts: Vec<String> = serde_json::from_str(&key).expect("an audit key is a JSON array");
    let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
    spec.encode_key(&parts)
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

#[derive(Clone)]
struct AuditEvent {
    change_us: i64,
    commit_us: Option<i64>,
    txid: u64,
    seq: i64,
    change: Change,
}

/// The history the ground truth demands, by the reference model: per key, the committed
/// states in time order (the last state of a transaction); a state equal to the one before
/// it is no new version; a delete closes the open version, and so does a truncate of the
/// table (recorded by the capture's truncate trigger) for every key.
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
         WHERE a.tbl = '{t}' AND a.kind <> 't'
         ORDER BY a.key, a.txid, CASE WHEN a.txid = '0'::xid8 THEN a.seq END, a.seq DESC",
        cols = col_text(spec, "r", false),
        t = spec.qualified()
    );
    let rows = source.query(&sql, &[]).await.expect("read test_audit");
    let truncates: Vec<AuditEvent> = source
        .query(
            &format!(
                "SELECT (extract(epoch FROM a.ts) * 1000000)::int8, a.seq, a.txid::text::int8, {commit}
                 FROM public.test_audit a WHERE a.tbl = '{t}' AND a.kind = 't'",
                t = spec.qualified()
            ),
            &[],
        )
        .await
        .expect("read test_audit truncates")
        .iter()
        .map(|r| AuditEvent {
            change_us: r.get(0),
            seq: r.get(1),
            txid: r.get::<_, i64>(2) as u64,
            commit_us: r.get(3),
            change: Change::Truncate,
        })
        .collect();
    let mut events: BTreeMap<String, Vec<AuditEvent>> = BTreeMap::new();
    for r in rows {
        let key: String = canonical_key(spec, r.get(0));
        let kind: String = r.get(1);
        events.entry(key).or_default().push(AuditEvent {
            change_us: r.get(2),
            seq: r.get(3),
            txid: r.get::<_, i64>(4) as u64,
            commit_us: r.get(5),
            change: if kind == "d" {
                Change::Delete
            } else {
                Change::State(
                    (0..spec.columns.len())
                        .map(|i| r.get::<_, Option<String>>(6 + i))
                        .collect(),
                )
            },
        });
    }
    for evs in events.values_mut() {
        evs.extend(truncates.iter().cloned());
    }
    let mut out = History::new();
    for (key, evs) in events {
        // (time, seq, change) in the order the history must follow.
        let mut seq: Vec<(i64, i64, Change)> = Vec::new();
        match basis {
            Basis::ChangeTime => {
                seq = evs
                    .into_iter()
                    .map(|e| (e.change_us, e.seq, e.change))
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
                if let Some(s) = start.filter(|s| matches!(s.change, Change::State(_))) {
                    seq.push((s.change_us, s.seq, s.change.clone()));
                }
                for e in evs.iter().filter(|e| !shown(e)) {
                    let ts = e
                        .commit_us
                        .expect("track_commit_timestamp must be on for logical tests");
                    seq.push((ts, e.seq, e.change.clone()));
                }
            }
        }
        seq.sort_by_key(|e| (e.0, e.1));
        let versions = reference_versions(
            seq.into_iter()
                .map(|(ts, _, change)| (ts, change))
                .collect(),
        );
        if !versions.is_empty() {
            out.insert(key, versions);
        }
    }
    out
}

/// The history the warehouse holds, in the same shape.
pub async fn actual_history(warehouse: &Client, spec: &TableSpec) -> History {
    let sql = format!(
        "SELECT {k}, (extract(epoch FROM h.valid_from) * 1000000)::int8,
                (extract(epoch FROM h.valid_to) * 1000000)::int8, h.is_deleted, h.is_truncated, {cols}
         FROM {t} h ORDER BY {order}, h.valid_from",
        k = if spec.key.len() == 1 {
            format!("h.{}::text", spec.history_key_columns[0])
        } else {
            let parts: Vec<String> = spec
                .history_key_columns
                .iter()
                .map(|c| format!("h.{c}::text"))
                .collect();
            format!("to_jsonb(ARRAY[{}])::text", parts.join(", "))
        },
        order = spec.history_key_list("h"),
        cols = col_text(spec, "h", true),
        t = spec.history_qualified()
    );
    let rows = warehouse.query(&sql, &[]).await.expect("read history");
    let mut out = History::new();
    for r in rows {
        let values = (0..spec.columns.len())
            .map(|i| r.get::<_, Option<String>>(5 + i))
            .collect();
        out.entry(canonical_key(spec, r.get(0)))
            .or_default()
            .push(Version {
                valid_from_us: r.get(1),
                valid_to_us: r.get(2),
                is_deleted: r.get(3),
                is_truncated: r.get(4),
                values,
            });
    }
    out
}

/// Adds to the ground truth (`install_audit_for`, first) each `ALTER TABLE` of an audited
/// table, as the event trigger of `extractor setup` records it in `cdc_alters` (kind `a`:
/// its time on the change-time clock, its transaction, the columns after it), and the
/// columns the tables have now (kind `b`), so that a column added later is told from one
/// that was there.
pub async fn install_alter_audit(source: &Client) {
    source
        .batch_execute(
            "CREATE FUNCTION public.test_audit_alter() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 IF EXISTS (SELECT 1 FROM public.test_audit_tables
                            WHERE tbl = NEW.table_schema || '.' || NEW.table_name) THEN
                     INSERT INTO public.test_audit (tbl, kind, ts, key, row_image)
                         VALUES (NEW.table_schema || '.' || NEW.table_name, 'a', NEW.altered_at, '', NEW.columns);
                 END IF;
                 RETURN NULL;
             END $$;
             CREATE TRIGGER zz_test_audit AFTER INSERT ON public.cdc_alters
                 FOR EACH ROW EXECUTE FUNCTION public.test_audit_alter();
             INSERT INTO public.test_audit (tbl, kind, ts, key, row_image, txid)
                 SELECT t.tbl, 'b', clock_timestamp(), '',
                        (SELECT jsonb_agg(jsonb_build_object('name', a.attname::text, 'attnum', a.attnum))
                         FROM pg_attribute a WHERE a.attrelid = t.tbl::regclass AND a.attnum > 0),
                        '0'::xid8
                 FROM public.test_audit_tables t;",
        )
        .await
        .expect("install the ALTER audit");
}

/// A column of a history followed across schema changes: its name in the history, its names
/// in the source over time (older first: images before a rename carry the old name), and
/// its type in the history at the end (every value is compared as that type's text, so a
/// widened `numeric` compares by value).
#[derive(Debug, Clone)]
pub struct Followed {
    pub history: &'static str,
    pub source_names: &'static [&'static str],
    pub sql_type: &'static str,
}

/// Which times a history followed across schema changes must carry.
#[derive(Debug, Clone)]
pub enum Across {
    /// Timestamp capture, each pass started (source clock, µs) at these times with no writer
    /// in flight: of a key's states between two passes it sees the last (and the last before
    /// each delete); an ALTER at the time the event trigger recorded.
    Passes(Vec<i64>),
    /// Logical capture: every committed state at its commit time; an ALTER a microsecond
    /// before its commit (changes after it in its transaction are at the commit time). The
    /// audit must start after the initial copy.
    Commits,
}

enum AcrossEvent {
    State(Vec<Option<String>>),
    Delete,
    /// A column added with a value for the rows that existed: (its index, the value).
    Fill(usize, String),
}

/// The history the ground truth demands of table `table` (single key column `key`) across
/// its schema changes, over the columns `cols`: each committed state (a column absent from an
/// image, added later or dropped since, is NULL); at each ALTER that added a column with a
/// value for the existing rows, every live key's state with that value; then the reference
/// model.
pub async fn expected_history_across(
    source: &Client,
    table: &str,
    cols: &[Followed],
    basis: &Across,
) -> History {
    let commit = "CASE WHEN a.txid <> '0'::xid8 THEN (extract(epoch FROM pg_xact_commit_timestamp(a.txid::text::xid)) * 1000000)::int8 END";
    let values: Vec<String> = cols
        .iter()
        .map(|c| {
            let names: Vec<String> = c
                .source_names
                .iter()
                .rev()
                .map(|n| format!("a.row_image ->> '{n}'"))
                .collect();
            format!("(coalesce({}))::{}::text", names.join(", "), c.sql_type)
        })
        .collect();
    let rows = source
        .query(
            &format!(
                "SELECT DISTINCT ON (a.key, a.txid, CASE WHEN a.txid = '0'::xid8 THEN a.seq END)
                        a.key, a.kind, (extract(epoch FROM a.ts) * 1000000)::int8, a.seq, {commit}, {v}
                 FROM public.test_audit a
                 WHERE a.tbl = '{table}' AND a.kind IN ('u', 'd')
                 ORDER BY a.key, a.txid, CASE WHEN a.txid = '0'::xid8 THEN a.seq END, a.seq DESC",
                v = values.join(", ")
            ),
            &[],
        )
        .await
        .expect("read test_audit");
    // Per key: (time, seq, event).
    let mut events: BTreeMap<String, Vec<(i64, i64, AcrossEvent)>> = BTreeMap::new();
    for r in rows {
        let kind: String = r.get(1);
        let ts = match basis {
            Across::Commits => r.get::<_, Option<i64>>(4).unwrap_or(r.get(2)),
            Across::Passes(_) => r.get(2),
        };
        let ev = if kind == "d" {
            AcrossEvent::Delete
        } else {
            AcrossEvent::State((0..cols.len()).map(|i| r.get(5 + i)).collect())
        };
        events.entry(r.get(0)).or_default().push((ts, r.get(3), ev));
    }
    // Timestamp capture: of the states between two passes, those a pass sees.
    if let Across::Passes(passes) = basis {
        for evs in events.values_mut() {
            evs.sort_by_key(|e| (e.0, e.1));
            let window = |ts: i64| passes.partition_point(|p| *p < ts);
            let seen: Vec<bool> = (0..evs.len())
                .map(|i| match &evs[i].2 {
                    AcrossEvent::Delete => true,
                    _ => evs.get(i + 1).is_none_or(|next| {
                        window(next.0) != window(evs[i].0) || matches!(next.2, AcrossEvent::Delete)
                    }),
                })
                .collect();
            let mut i = 0;
            evs.retain(|_| {
                i += 1;
                seen[i - 1]
            });
        }
    }
    // The ALTERs: the columns each added with a value for the existing rows.
    let alters = source
        .query(
            &format!(
                "SELECT a.kind, (extract(epoch FROM a.ts) * 1000000)::int8, a.seq, {commit},
                        (SELECT max((c ->> 'attnum')::int) FROM jsonb_array_elements(a.row_image) c),
                        c ->> 'name', (c ->> 'attnum')::int, c ->> 'existing', c ->> 'value'
                 FROM public.test_audit a LEFT JOIN LATERAL jsonb_array_elements(a.row_image) c ON true
                 WHERE a.tbl = '{table}' AND a.kind IN ('a', 'b')
                 ORDER BY a.seq, (c ->> 'attnum')::int"
            ),
            &[],
        )
        .await
        .expect("read the ALTERs of test_audit");
    let mut fills: Vec<(i64, i64, usize, String)> = Vec::new();
    let (mut seen_max, mut seq_max) = (i32::MAX, None::<i64>);
    let mut record_max = 0;
    for r in alters {
        let seq: i64 = r.get(2);
        if seq_max != Some(seq) {
            // A new record: the columns the one before had.
            if seq_max.is_some() {
                seen_max = record_max;
            }
            seq_max = Some(seq);
            record_max = r.get::<_, Option<i32>>(4).unwrap_or(0);
        }
        let kind: String = r.get(0);
        let (Some(name), Some(attnum)) =
            (r.get::<_, Option<String>>(5), r.get::<_, Option<i32>>(6))
        else {
            continue;
        };
        let added = kind == "a" && attnum > seen_max;
        if !added || r.get::<_, Option<String>>(7).as_deref() != Some("v") {
            continue;
        }
        let Some(i) = cols
            .iter()
            .position(|c| c.source_names.contains(&name.as_str()))
        else {
            continue;
        };
        let value: String = r.get::<_, Option<String>>(8).expect("a missing value");
        let value: String = source
            .query_one(
                &format!("SELECT $1::text::{}::text", cols[i].sql_type),
                &[&value],
            )
            .await
            .expect("cast the filled value")
            .get(0);
        let ts = match basis {
            Across::Commits => r.get::<_, Option<i64>>(3).expect("track_commit_timestamp") - 1,
            Across::Passes(_) => r.get(1),
        };
        fills.push((ts, seq, i, value));
    }
    let mut out = History::new();
    for (key, mut evs) in events {
        for (ts, seq, i, v) in &fills {
            evs.push((*ts, *seq, AcrossEvent::Fill(*i, v.clone())));
        }
        evs.sort_by_key(|e| (e.0, e.1));
        let mut cur: Option<Vec<Option<String>>> = None;
        let mut seq: Vec<(i64, Change)> = Vec::new();
        for (ts, _, e) in evs {
            match e {
                AcrossEvent::State(v) => {
                    cur = Some(v.clone());
                    seq.push((ts, Change::State(v)));
                }
                AcrossEvent::Delete => {
                    cur = None;
                    seq.push((ts, Change::Delete));
                }
                AcrossEvent::Fill(i, v) => {
                    if let Some(c) = cur.as_mut() {
                        c[i] = Some(v);
                        seq.push((ts, Change::State(c.clone())));
                    }
                }
            }
        }
        let versions = reference_versions(seq);
        if !versions.is_empty() {
            out.insert(key, versions);
        }
    }
    out
}

/// The history the warehouse holds of `history` (single key column `key`) over `cols`, in
/// the shape `expected_history_across` gives.
pub async fn actual_history_across(
    warehouse: &Client,
    history: &str,
    key: &str,
    cols: &[Followed],
) -> History {
    let list: Vec<String> = cols
        .iter()
        .map(|c| format!("h.{}::text", c.history))
        .collect();
    let rows = warehouse
        .query(
            &format!(
                "SELECT h.{key}::text, (extract(epoch FROM h.valid_from) * 1000000)::int8,
                        (extract(epoch FROM h.valid_to) * 1000000)::int8, h.is_deleted, h.is_truncated, {}
                 FROM {history} h ORDER BY h.{key}, h.valid_from",
                list.join(", ")
            ),
            &[],
        )
        .await
        .expect("read history");
    let mut out = History::new();
    for r in rows {
        out.entry(r.get(0)).or_default().push(Version {
            valid_from_us: r.get(1),
            valid_to_us: r.get(2),
            is_deleted: r.get(3),
            is_truncated: r.get(4),
            values: (0..cols.len()).map(|i| r.get(5 + i)).collect(),
        });
    }
    out
}
