//! Values in PostgreSQL's COPY text format (`COPY ... FROM STDIN` without options).

use chrono::DateTime;
use std::fmt::Write as _;

/// A value, escaped.
pub fn push_text(buf: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => buf.push_str("\\\\"),
            '\t' => buf.push_str("\\t"),
            '\n' => buf.push_str("\\n"),
            '\r' => buf.push_str("\\r"),
            c => buf.push(c),
        }
    }
}

/// A time in microseconds since the epoch as a UTC timestamptz (`\N` when out of range).
pub fn push_time(buf: &mut String, us: i64) {
    match DateTime::from_timestamp_micros(us) {
        Some(t) => {
            let _ = write!(buf, "{}", t.format("%Y-%m-%d %H:%M:%S%.6f+00"));
        }
        None => buf.push_str("\\N"),
    }
}

/// A WAL position as a `pg_lsn` (`\N` for none).
pub fn push_lsn(buf: &mut String, lsn: Option<i64>) {
    match lsn {
        Some(l) => {
            let l = l as u64;
            let _ = write!(buf, "{:X}/{:X}", l >> 32, l & 0xffff_ffff);
        }
        None => buf.push_str("\\N"),
    }
}

/// 16 bytes as a `uuid`.
pub fn push_uuid(buf: &mut String, bytes: &[u8; 16]) {
    for (i, b) in bytes.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            buf.push('-');
        }
        let _ = write!(buf, "{b:02x}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_text_is_escaped_and_positions_are_lsns() {
        let mut b = String::new();
        push_text(&mut b, "a\tb\\c\nd");
        assert_eq!(b, "a\\tb\\\\c\\nd");
        let mut b = String::new();
        push_lsn(&mut b, Some(0x1_0000_00AB));
        assert_eq!(b, "1/AB");
        let mut b = String::new();
        push_time(&mut b, 1_500_000);
        assert_eq!(b, "1970-01-01 00:00:01.500000+00");
    }
}
