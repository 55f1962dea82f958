//! Turns pgoutput messages of the captured tables into change events (a TRUNCATE into a
//! truncate event per captured table), transaction by transaction, written into the sink (a
//! transaction is never split across files).

use super::pgoutput::{Message, RelColumn, Relation, Value};
use crate::capture::schema::{event_from_record, AlterRecord};
use crate::capture::PassOutcome;
use crate::error::{Error, Result};
use crate::event::encode::{write_event, write_object, write_schema, write_truncate, Header};
use crate::event::{CaptureMode, Op};
use crate::schema_change::{diff, shape_of, SchemaEvent, Shape, ShapeColumn};
use crate::sink::ChangeSink;
use crate::table::TableSpec;
use std::collections::{BTreeMap, HashMap};

/// Turns pgoutput messages of our table into change events, transaction by transaction.
pub(super) struct TxDecoder<'a> {
    /// The tables' descriptions: the source's catalog now (a schema change the stream has
    /// not reached yet included).
    specs: &'a [TableSpec],
    /// The shape the change log describes each table in (`schema.table`): a relation message
    /// in another shape is a schema change, written before the changes that follow it.
    pub(super) written: BTreeMap<String, Shape>,
    /// The source database's name (`source.db`).
    db: &'a str,
    captured_ms: i64,
    /// The relation messages seen, by OID: the stream sends each once per connection (and
    /// again after a change), so they outlive a pass (`LogicalCapture` keeps them).
    pub(super) relations: HashMap<u32, Relation>,
    commit_ts_us: i64,
    xid: u32,
    /// LSN of the change being decoded (its XLogData message's start).
    pub(super) change_lsn: u64,
    /// The current transaction is shown by the initial copy: its changes are skipped.
    pub(super) skip: bool,
    /// No event of the current transaction written yet: the writer may start a new file
    /// before it (never inside a transaction).
    tx_first: bool,
    buf: Vec<u8>,
}

impl<'a> TxDecoder<'a> {
    pub(super) fn new(
        specs: &'a [TableSpec],
        written: BTreeMap<String, Shape>,
        db: &'a str,
        captured_ms: i64,
    ) -> Self {
        TxDecoder {
            specs,
            written,
            db,
            captured_ms,
            relations: HashMap::new(),
            commit_ts_us: 0,
            xid: 0,
            change_lsn: 0,
            skip: false,
            tx_first: true,
            buf: Vec::with_capacity(1024),
        }
    }

    pub(super) fn handle(
        &mut self,
        msg: Message,
        sink: &mut dyn ChangeSink,
        out: &mut PassOutcome,
    ) -> Result<()> {
        match msg {
            Message::Begin {
                commit_ts_us, xid, ..
            } => {
                self.commit_ts_us = commit_ts_us;
                self.xid = xid;
                self.tx_first = true;
            }
            Message::Relation(r) => {
                // Also in a transaction the initial copy shows: the relation is not sent
                // again before the changes after it.
                out.schema_changes += self.schema_change(&r, sink)?;
                self.relations.insert(r.oid, r);
            }
            Message::Logical {
                transactional: true,
                prefix,
                content,
            } if prefix == crate::capture::schema::ALTER_MESSAGE_PREFIX && !self.skip => {
                out.schema_changes += self.alter_message(&content, sink)?;
            }
            Message::Insert { rel, new } if !self.skip => {
                let written = self.emit(sink, rel, Op::Create, None, Some(&new))?;
                out.rows += u64::from(written);
            }
            Message::Update {
                rel,
                old,
                old_is_full,
                mut new,
            } if !self.skip => {
                // pgoutput does not resend an unchanged TOASTed value; under REPLICA IDENTITY
                // FULL the old image (`O`) carries it detoasted, so the new image is
                // completed from it. A key image (`K`) has NULL in the other columns: then
                // the column stays missing and the loader quarantines the file rather than
                // write a wrong value.
                if let Some(o) = old.as_ref().filter(|_| old_is_full) {
                    for (n, v) in new.iter_mut().zip(o) {
                        if matches!(n, Value::Unchanged) && !matches!(v, Value::Unchanged) {
                            *n = v.clone();
                        }
                    }
                }
                let rel_info = self.relation(rel)?;
                let Some(spec) = self.spec_of(rel_info) else {
                    return Ok(());
                };
                let key_changed = match &old {
                    Some(o) => spec.key.iter().any(|k| {
                        rel_info
                            .columns
                            .iter()
                            .position(|c| c.name == k.name)
                            .is_some_and(|i| {
                                matches!((o.get(i), new.get(i)), (Some(Value::Text(a)), Some(Value::Text(b))) if a != b)
                            })
                    }),
                    None => false,
                };
                if key_changed {
                    // A primary-key change: the old key is deleted, the new one inserted.
                    self.emit(sink, rel, Op::Delete, old.as_deref(), None)?;
                    self.emit(sink, rel, Op::Create, None, Some(&new))?;
                    out.deletes += 1;
                } else {
                    self.emit(sink, rel, Op::Update, old.as_deref(), Some(&new))?;
                }
                out.rows += 1;
            }
            Message::Delete { rel, old } if !self.skip => {
                let written = self.emit(sink, rel, Op::Delete, Some(&old), None)?;
                out.deletes += u64::from(written);
            }
            Message::Truncate { rels } if !self.skip => {
                // One message for every table of one TRUNCATE statement (a CASCADE included):
                // a truncate event for each of ours, at the statement's position.
                for rel in rels {
                    let Some(spec) = self.spec_of(self.relation(rel)?) else {
                        continue;
                    };
                    let mut b = std::mem::take(&mut self.buf);
                    b.clear();
                    let h = self.header(Op::Truncate, "");
                    write_truncate(&mut b, spec, &h);
                    let keep_together = !std::mem::replace(&mut self.tx_first, false);
                    let written = sink.write(&b, spec, Op::Truncate, keep_together);
                    self.buf = b;
                    written?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Writes a schema event when relation `r` (one of ours) has another shape than the one
    /// the change log describes. Returns the changes written.
    fn schema_change(&mut self, r: &Relation, sink: &mut dyn ChangeSink) -> Result<u64> {
        let Some(spec) = self.spec_of(r) else {
            return Ok(0);
        };
        let q = spec.qualified();
        let Some(written) = self.written.get(&q) else {
            return Ok(0);
        };
        let cols: Vec<&RelColumn> = r
            .columns
            .iter()
            .filter(|c| !spec.ignored.contains(&c.name))
            .collect();
        if sends_shape(written, &cols) {
            return Ok(0);
        }
        let now = shape_of(spec);
        let ev = if sends_shape(&now, &cols) {
            crate::capture::schema::event(written, spec)
        } else {
            // A shape between the one written and the catalog's (several changes since):
            // types as either names them, else by OID; positions as the catalog or the
            // written shape has the column's name (matched by name when one is unknown).
            // Key columns as the catalog or the written shape has them (pgoutput flags the
            // replica identity's, every column under REPLICA IDENTITY FULL).
            let named = |name: &str| now.iter().chain(written).find(|k| k.name == name);
            let position = |name: &str| named(name).map_or(0, |k| k.attnum);
            let is_key = |name: &str| named(name).is_some_and(|k| k.key);
            let known = |c: &RelColumn| {
                now.iter()
                    .chain(written)
                    .find(|k| k.type_oid == c.type_oid && k.type_mod == c.type_mod)
                    .map(|k| k.sql_type.clone())
                    .unwrap_or_else(|| {
                        format!("unknown type (OID {}, modifier {})", c.type_oid, c.type_mod)
                    })
            };
            let mut between: Shape = cols
                .iter()
                .map(|c| ShapeColumn {
                    name: c.name.clone(),
                    sql_type: known(c),
                    generated: None,
                    key: is_key(&c.name),
                    attnum: position(&c.name),
                    type_oid: c.type_oid,
                    type_mod: c.type_mod,
                })
                .collect();
            // Generated columns are not sent: as written.
            between.extend(written.iter().filter(|c| c.generated.is_some()).cloned());
            let changes = diff(written, &between, |name| {
                spec.columns
                    .iter()
                    .find(|c| c.name == name)
                    .map(|c| c.existing.clone())
                    .unwrap_or_default()
            });
            (!changes.is_empty()).then(|| SchemaEvent {
                changes,
                columns: between,
                types: spec.types.clone(),
            })
        };
        let Some(ev) = ev else {
            return Ok(0);
        };
        // Without the event trigger's message (not installed, or a change it does not see):
        // dated just before the change it precedes (its transaction's commit time and LSN):
        // the versions a filled column adds come before that change's.
        let h = Header {
            ts_us: self.commit_ts_us - 1,
            lsn: Some(self.change_lsn.saturating_sub(1)),
            ..self.header(Op::Schema, "")
        };
        self.write_schema_event(spec, &h, ev, sink)
    }

    /// Writes a schema event for the event trigger's message (an `ALTER TABLE` of this
    /// transaction, decoded in its place among the transaction's changes) when it leaves one
    /// of our tables in another shape than the change log describes. The relation message
    /// pgoutput sends before the table's next change then describes the shape written, and
    /// adds nothing. Returns the changes written.
    fn alter_message(&mut self, content: &[u8], sink: &mut dyn ChangeSink) -> Result<u64> {
        let record: AlterRecord = serde_json::from_slice(content).map_err(|e| {
            Error::decode(
                "pgoutput stream",
                format!("a schema-change message that is not what the event trigger writes: {e}"),
            )
        })?;
        let Some(spec) = self
            .specs
            .iter()
            .find(|s| s.schema == record.schema && s.name == record.table)
        else {
            return Ok(0);
        };
        let q = spec.qualified();
        let Some(written) = self.written.get(&q) else {
            return Ok(0);
        };
        let Some(ev) = event_from_record(written, spec, &record.columns) else {
            return Ok(0);
        };
        // Dated a microsecond before the ALTER's commit: the versions a filled column adds
        // come before the changes the same transaction makes after the ALTER (at its commit
        // time), and after every change committed before it.
        let h = Header {
            ts_us: self.commit_ts_us - 1,
            ..self.header(Op::Schema, "")
        };
        self.write_schema_event(spec, &h, ev, sink)
    }

    fn write_schema_event(
        &mut self,
        spec: &'a TableSpec,
        h: &Header<'_>,
        ev: SchemaEvent,
        sink: &mut dyn ChangeSink,
    ) -> Result<u64> {
        let mut b = std::mem::take(&mut self.buf);
        b.clear();
        write_schema(&mut b, spec, h, &ev);
        let keep_together = !std::mem::replace(&mut self.tx_first, false);
        let written = sink.write(&b, spec, Op::Schema, keep_together);
        self.buf = b;
        written?;
        let q = spec.qualified();
        tracing::info!(table = %q, changes = %ev.changes.iter().map(|c| c.to_string()).collect::<Vec<_>>().join("; "), "schema change captured");
        let n = ev.changes.len() as u64;
        self.written.insert(q, ev.columns);
        Ok(n)
    }

    /// The description of a relation's table, if it is one of ours.
    fn spec_of(&self, r: &Relation) -> Option<&'a TableSpec> {
        self.specs
            .iter()
            .find(|s| s.schema == r.schema && s.name == r.name)
    }

    fn relation(&self, rel: u32) -> Result<&Relation> {
        self.relations.get(&rel).ok_or_else(|| {
            Error::decode(
                "pgoutput stream",
                format!("change for relation {rel} before its Relation message"),
            )
        })
    }

    fn emit(
        &mut self,
        sink: &mut dyn ChangeSink,
        rel: u32,
        op: Op,
        before: Option<&[Value]>,
        after: Option<&[Value]>,
    ) -> Result<bool> {
        let mut b = std::mem::take(&mut self.buf);
        b.clear();
        let ours = self.build_event(&mut b, rel, op, before, after);
        let result = match ours {
            Ok(Some(spec)) => {
                let keep_together = !std::mem::replace(&mut self.tx_first, false);
                sink.write(&b, spec, op, keep_together).map(|()| true)
            }
            Ok(None) => Ok(false),
            Err(e) => Err(e),
        };
        self.buf = b;
        result
    }

    /// The header of an event of the current change: its transaction's commit time and id,
    /// its LSN.
    fn header<'k>(&self, op: Op, key: &'k str) -> Header<'k>
    where
        'a: 'k,
    {
        Header {
            op,
            mode: CaptureMode::Logical,
            snapshot: false,
            incremental: false,
            db: Some(self.db),
            ts_us: self.commit_ts_us,
            key,
            lsn: Some(self.change_lsn),
            tx_id: Some(self.xid),
            captured_ms: self.captured_ms,
        }
    }

    /// Writes the event's JSON into `b` and returns its table; `None` when the change is not
    /// of one of our tables.
    fn build_event(
        &self,
        b: &mut Vec<u8>,
        rel: u32,
        op: Op,
        before: Option<&[Value]>,
        after: Option<&[Value]>,
    ) -> Result<Option<&'a TableSpec>> {
        let r = self.relation(rel)?;
        let Some(spec) = self.spec_of(r) else {
            return Ok(None);
        };
        let image = after.or(before);
        let mut parts = Vec::with_capacity(spec.key.len());
        for k in &spec.key {
            let i = r
                .columns
                .iter()
                .position(|c| c.name == k.name)
                .ok_or_else(|| {
                    Error::setup(
                        format!("source table {}", spec.qualified()),
                        format!("the stream has no key column {}", k.name),
                    )
                })?;
            match image.and_then(|t| t.get(i)) {
                Some(Value::Text(v)) => parts.push(v.as_str()),
                _ => {
                    return Err(Error::decode(
                        "pgoutput stream",
                        format!(
                            "a change of {} without its key value {}",
                            spec.qualified(),
                            k.name
                        ),
                    ))
                }
            }
        }
        let key = spec.encode_key(&parts);
        let h = self.header(op, &key);
        write_event(
            b,
            spec,
            &h,
            |b| write_image(b, r, before),
            |b| write_image(b, r, after),
        );
        Ok(Some(spec))
    }
}

/// Whether a relation message's columns (the tracked ones, in order) are those of `shape`
/// (generated columns are not sent), with the same types.
fn sends_shape(shape: &Shape, cols: &[&RelColumn]) -> bool {
    let sent: Vec<&ShapeColumn> = shape.iter().filter(|c| c.generated.is_none()).collect();
    sent.len() == cols.len()
        && sent.iter().zip(cols).all(|(s, c)| {
            s.name == c.name
                && (s.type_oid == 0 || (s.type_oid == c.type_oid && s.type_mod == c.type_mod))
        })
}

/// A row image as a JSON object, each value typed by its column's type.
fn write_image(b: &mut Vec<u8>, r: &Relation, tuple: Option<&[Value]>) {
    let Some(t) = tuple else {
        b.extend_from_slice(b"null");
        return;
    };
    // An unchanged TOASTed value that could not be filled is left out (the loader then
    // quarantines the file rather than store a wrong value).
    let fields = r.columns.iter().zip(t).filter_map(|(c, v)| match v {
        Value::Unchanged => None,
        Value::Null => Some((c.name.as_str(), c.type_oid, None)),
        Value::Text(s) => Some((c.name.as_str(), c.type_oid, Some(s.as_str()))),
    });
    write_object(b, fields);
}
