//! The change event, the interface between extractor and loader: one JSON object a line in
//! the Debezium envelope (`op`, `before`, `after`, `source`, `ts_ms`) plus `format_version`.
//! Values keep their exact types: integers as JSON numbers, numeric as strings, timestamps as
//! ISO-8601 strings with zone. `encode` writes events (the extractor), `decode` reads them
//! (the loader); both sides of the format live here and nowhere else.

pub mod decode;
pub mod encode;
mod exact;

pub use decode::{decode, decode_for, decode_where, DecodeError, DecodedEvent, Values};

use serde::Deserialize;

/// The change-event format this build writes and the newest it reads.
/// Version 3 adds the truncate event (`op` `t`: no row images, no key; every current version
/// of the table ends at its time); a loader that reads only version 2 refuses version-3
/// files instead of applying later changes over rows a truncate removed.
/// Version 2 writes json and jsonb values as JSON strings of their text (as Debezium does):
/// exact (whitespace and duplicate keys of `json` kept), one line, and a JSON `null` value
/// apart from SQL NULL. Version 1 wrote them as raw JSON; the loader reads both.
/// Version 4 adds the schema event (`op` `s`: no row images, no key; a `schema_change` object
/// with the table's changes and its columns after them); a loader that reads only version 3
/// refuses version-4 files instead of applying changes of a shape it does not know.
/// Version 5 adds the re-snapshot (`extractor resnapshot`): its rows are `r` events with
/// `source.snapshot` `"incremental"` (Debezium's name for a snapshot taken while streaming),
/// all at the snapshot's position, and it ends with a snapshot-end event (`op` `e`: no row
/// images, no key) at the same position: every key the history holds at that position and
/// the snapshot did not name ends there. A loader that reads only version 4 refuses version-5
/// files instead of leaving those keys current.
pub const FORMAT_VERSION: u32 = 5;
/// The first format version with re-snapshots.
pub const RESNAPSHOT_FORMAT_VERSION: u32 = 5;
/// The first format version with schema events.
pub const SCHEMA_FORMAT_VERSION: u32 = 4;
/// The first format version with truncate events.
pub const TRUNCATE_FORMAT_VERSION: u32 = 3;
/// `source.connector` of events written by this pipeline.
pub const CONNECTOR: &str = "cdc-historical-warehouse";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Op {
    #[serde(rename = "c")]
    Create,
    #[serde(rename = "u")]
    Update,
    #[serde(rename = "d")]
    Delete,
    #[serde(rename = "r")]
    Read,
    /// A `TRUNCATE` of the whole table (Debezium's `t`).
    #[serde(rename = "t")]
    Truncate,
    /// A change of the table's columns (`schema_change` says which).
    #[serde(rename = "s")]
    Schema,
    /// The end of a re-snapshot of the table: the keys it did not name end at its position.
    #[serde(rename = "e")]
    SnapshotEnd,
}

impl Op {
    pub fn as_char(self) -> char {
        match self {
            Op::Create => 'c',
            Op::Update => 'u',
            Op::Delete => 'd',
            Op::Read => 'r',
            Op::Truncate => 't',
            Op::Schema => 's',
            Op::SnapshotEnd => 'e',
        }
    }

    /// The code as it stands in an event (`"c"`, `"u"`, `"d"`, `"r"`, `"t"`, `"s"`, `"e"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Create => "c",
            Op::Update => "u",
            Op::Delete => "d",
            Op::Read => "r",
            Op::Truncate => "t",
            Op::Schema => "s",
            Op::SnapshotEnd => "e",
        }
    }

    /// The operation of a code, `None` for anything else.
    pub fn from_code(code: &str) -> Option<Op> {
        match code {
            "c" => Some(Op::Create),
            "u" => Some(Op::Update),
            "d" => Some(Op::Delete),
            "r" => Some(Op::Read),
            "t" => Some(Op::Truncate),
            "s" => Some(Op::Schema),
            "e" => Some(Op::SnapshotEnd),
            _ => None,
        }
    }
}

/// How the extractor captures (`source.capture_mode` of an event, and of the progress file).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CaptureMode {
    /// High-watermark on the change-time column, deletes from the tombstone table
    Timestamp,
    /// Logical replication slot with pgoutput (every committed version)
    Logical,
}

impl CaptureMode {
    pub fn as_str(self) -> &'static str {
        match self {
            CaptureMode::Timestamp => "timestamp",
            CaptureMode::Logical => "logical",
        }
    }
}

impl std::fmt::Display for CaptureMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
