//! A decoder for the `pgoutput` logical replication messages (protocol version 1) as the
//! replication stream carries them (one per XLogData message): Begin, Commit,
//! Relation, Insert, Update, Delete, Truncate, Message (`pg_logical_emit_message`); the rest
//! (Origin, Type) is skipped.
//! Column values arrive in their text form.

/// Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01).
pub const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelColumn {
    pub is_key: bool,
    pub name: String,
    pub type_oid: u32,
    pub type_mod: i32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub oid: u32,
    pub schema: String,
    pub name: String,
    pub columns: Vec<RelColumn>,
}

/// One column value of a tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    /// A TOASTed value that did not change (not sent).
    Unchanged,
    Text(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Begin {
        final_lsn: u64,
        /// Commit time, microseconds since the Unix epoch.
        commit_ts_us: i64,
        xid: u32,
    },
    Commit {
        commit_lsn: u64,
        end_lsn: u64,
        commit_ts_us: i64,
    },
    Relation(Relation),
    Insert {
        rel: u32,
        new: Vec<Value>,
    },
    Update {
        rel: u32,
        /// The old key (`K`) or old row (`O`, replica identity full), when sent.
        old: Option<Vec<Value>>,
        /// Whether `old` is the whole old row (`O`); a key image (`K`) has NULL elsewhere.
        old_is_full: bool,
        new: Vec<Value>,
    },
    Delete {
        rel: u32,
        old: Vec<Value>,
    },
    Truncate {
        rels: Vec<u32>,
    },
    /// A WAL message (`pg_logical_emit_message`).
    Logical {
        transactional: bool,
        prefix: String,
        content: Vec<u8>,
    },
    Other(u8),
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.buf.len())
            .ok_or_else(|| format!("message truncated at byte {} (needs {n} more)", self.pos))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn i16(&mut self) -> Result<i16, String> {
        let b = self.take(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn i32(&mut self) -> Result<i32, String> {
        Ok(self.u32()? as i32)
    }
    fn u64(&mut self) -> Result<u64, String> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    fn i64(&mut self) -> Result<i64, String> {
        Ok(self.u64()? as i64)
    }
    fn cstr(&mut self) -> Result<String, String> {
        let rest = &self.buf[self.pos..];
        let n = rest
            .iter()
            .position(|b| *b == 0)
            .ok_or("unterminated string")?;
        let s = String::from_utf8(rest[..n].to_vec()).map_err(|e| e.to_string())?;
        self.pos += n + 1;
        Ok(s)
    }
    fn tuple(&mut self) -> Result<Vec<Value>, String> {
        let n = self.i16()?;
        let mut out = Vec::with_capacity(n.max(0) as usize);
        for _ in 0..n {
            out.push(match self.u8()? {
                b'n' => Value::Null,
                b'u' => Value::Unchanged,
                b't' => {
                    let len = self.i32()?;
                    let len =
                        usize::try_from(len).map_err(|_| format!("negative value length {len}"))?;
                    Value::Text(
                        String::from_utf8(self.take(len)?.to_vec()).map_err(|e| e.to_string())?,
                    )
                }
                other => return Err(format!("unknown tuple value kind {:?}", other as char)),
            });
        }
        Ok(out)
    }
}

/// Decodes one message.
pub fn decode(buf: &[u8]) -> Result<Message, String> {
    let mut r = Reader { buf, pos: 0 };
    let tag = r.u8()?;
    Ok(match tag {
        b'B' => Message::Begin {
            final_lsn: r.u64()?,
            commit_ts_us: r.i64()? + PG_EPOCH_OFFSET_US,
            xid: r.u32()?,
        },
        b'C' => {
            let _flags = r.u8()?;
            Message::Commit {
                commit_lsn: r.u64()?,
                end_lsn: r.u64()?,
                commit_ts_us: r.i64()? + PG_EPOCH_OFFSET_US,
            }
        }
        b'R' => {
            let oid = r.u32()?;
            let schema = r.cstr()?;
            let name = r.cstr()?;
            let _identity = r.u8()?;
            let n = r.i16()?;
            let mut columns = Vec::with_capacity(n.max(0) as usize);
            for _ in 0..n {
                let flags = r.u8()?;
                let name = r.cstr()?;
                let type_oid = r.u32()?;
                let type_mod = r.i32()?;
                columns.push(RelColumn {
                    is_key: flags & 1 == 1,
                    name,
                    type_oid,
                    type_mod,
                });
            }
            Message::Relation(Relation {
                oid,
                schema,
                name,
                columns,
            })
        }
        b'I' => {
            let rel = r.u32()?;
            match r.u8()? {
                b'N' => Message::Insert {
                    rel,
                    new: r.tuple()?,
                },
                other => return Err(format!("insert: expected N, got {:?}", other as char)),
            }
        }
        b'U' => {
            let rel = r.u32()?;
            let mut old = None;
            let mut kind = r.u8()?;
            let old_is_full = kind == b'O';
            if kind == b'K' || kind == b'O' {
                old = Some(r.tuple()?);
                kind = r.u8()?;
            }
            if kind != b'N' {
                return Err(format!("update: expected N, got {:?}", kind as char));
            }
            Message::Update {
                rel,
                old,
                old_is_full,
                new: r.tuple()?,
            }
        }
        b'D' => {
            let rel = r.u32()?;
            match r.u8()? {
                b'K' | b'O' => Message::Delete {
                    rel,
                    old: r.tuple()?,
                },
                other => return Err(format!("delete: expected K or O, got {:?}", other as char)),
            }
        }
        b'T' => {
            let n = r.u32()?;
            let _options = r.u8()?;
            let mut rels = Vec::with_capacity(n as usize);
            for _ in 0..n {
                rels.push(r.u32()?);
            }
            Message::Truncate { rels }
        }
        b'M' => {
            let flags = r.u8()?;
            let _lsn = r.u64()?;
            let prefix = r.cstr()?;
            let len = r.i32()?;
            let len = usize::try_from(len).map_err(|_| format!("negative message length {len}"))?;
            Message::Logical {
                transactional: flags & 1 == 1,
                prefix,
                content: r.take(len)?.to_vec(),
            }
        }
        other => Message::Other(other),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuple(vals: &[Option<&str>]) -> Vec<u8> {
        let mut b = (vals.len() as i16).to_be_bytes().to_vec();
        for v in vals {
            match v {
                None => b.push(b'n'),
                Some(s) => {
                    b.push(b't');
                    b.extend_from_slice(&(s.len() as i32).to_be_bytes());
                    b.extend_from_slice(s.as_bytes());
                }
            }
        }
        b
    }

    #[test]
    fn decodes_begin_relation_update_commit() {
        let mut begin = vec![b'B'];
        begin.extend_from_slice(&0x16B_3748u64.to_be_bytes());
        begin.extend_from_slice(&1_000_000i64.to_be_bytes());
        begin.extend_from_slice(&77u32.to_be_bytes());
        assert_eq!(
            decode(&begin).unwrap(),
            Message::Begin {
                final_lsn: 0x16B_3748,
                commit_ts_us: PG_EPOCH_OFFSET_US + 1_000_000,
                xid: 77
            }
        );

        let mut rel = vec![b'R'];
        rel.extend_from_slice(&16384u32.to_be_bytes());
        rel.extend_from_slice(b"public\0orders\0f");
        rel.extend_from_slice(&2i16.to_be_bytes());
        rel.push(1);
        rel.extend_from_slice(b"id\0");
        rel.extend_from_slice(&23u32.to_be_bytes());
        rel.extend_from_slice(&(-1i32).to_be_bytes());
        rel.push(0);
        rel.extend_from_slice(b"unit_price\0");
        rel.extend_from_slice(&1700u32.to_be_bytes());
        rel.extend_from_slice(&655_366i32.to_be_bytes());
        match decode(&rel).unwrap() {
            Message::Relation(r) => {
                assert_eq!((r.schema.as_str(), r.name.as_str()), ("public", "orders"));
                assert!(r.columns[0].is_key && !r.columns[1].is_key);
                assert_eq!(r.columns[1].type_oid, 1700);
            }
            m => panic!("{m:?}"),
        }

        let mut upd = vec![b'U'];
        upd.extend_from_slice(&16384u32.to_be_bytes());
        upd.push(b'O');
        upd.extend(tuple(&[Some("1"), Some("2.50")]));
        upd.push(b'N');
        upd.extend(tuple(&[Some("1"), None]));
        assert_eq!(
            decode(&upd).unwrap(),
            Message::Update {
                rel: 16384,
                old: Some(vec![Value::Text("1".into()), Value::Text("2.50".into())]),
                old_is_full: true,
                new: vec![Value::Text("1".into()), Value::Null],
            }
        );

        let mut commit = vec![b'C', 0];
        commit.extend_from_slice(&10u64.to_be_bytes());
        commit.extend_from_slice(&20u64.to_be_bytes());
        commit.extend_from_slice(&5i64.to_be_bytes());
        assert_eq!(
            decode(&commit).unwrap(),
            Message::Commit {
                commit_lsn: 10,
                end_lsn: 20,
                commit_ts_us: PG_EPOCH_OFFSET_US + 5
            }
        );
    }

    #[test]
    fn decodes_a_wal_message() {
        let mut m = vec![b'M', 1];
        m.extend_from_slice(&42u64.to_be_bytes());
        m.extend_from_slice(b"cdc_schema_change\0");
        m.extend_from_slice(&2i32.to_be_bytes());
        m.extend_from_slice(b"{}");
        assert_eq!(
            decode(&m).unwrap(),
            Message::Logical {
                transactional: true,
                prefix: "cdc_schema_change".into(),
                content: b"{}".to_vec()
            }
        );
        assert!(decode(&m[..m.len() - 1]).is_err());
    }

    #[test]
    fn truncated_messages_are_errors_not_panics() {
        for bad in [
            &b"B\0\0"[..],
            b"U\0\0\0\x01N\0\x01t\0\0\0\x09ab",
            b"R\0\0\0\x01public",
        ] {
            assert!(decode(bad).is_err(), "{bad:?}");
        }
    }
}
