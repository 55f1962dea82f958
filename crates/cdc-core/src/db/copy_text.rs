//! Values in PostgreSQL's COPY text format (`COPY ... TO STDOUT` / `FROM STDIN` without
//! options): writing them, and reading the rows a `COPY ... TO STDOUT` sends. Each value in
//! that format is its type's output function's text, exactly as psql shows it.

use chrono::DateTime;
use std::borrow::Cow;
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

/// Splits one row of COPY text (without its newline) into its values: `None` for `\N`,
/// escapes decoded. `Err` names what is malformed (a value that is not UTF-8, a stray
/// backslash at the end).
pub fn parse_row(line: &[u8]) -> Result<Vec<Option<Cow<'_, str>>>, String> {
    line.split(|&b| b == b'\t').map(parse_value).collect()
}

fn parse_value(v: &[u8]) -> Result<Option<Cow<'_, str>>, String> {
    if v == b"\\N" {
        return Ok(None);
    }
    let utf8 = |b| std::str::from_utf8(b).map_err(|e| format!("a COPY value is not UTF-8: {e}"));
    if !v.contains(&b'\\') {
        return Ok(Some(Cow::Borrowed(utf8(v)?)));
    }
    let mut out = Vec::with_capacity(v.len());
    let mut i = 0;
    while i < v.len() {
        let b = v[i];
        i += 1;
        if b != b'\\' {
            out.push(b);
            continue;
        }
        let Some(&e) = v.get(i) else {
            return Err("a COPY value ends with a lone backslash".into());
        };
        i += 1;
        match e {
            b'b' => out.push(8),
            b'f' => out.push(12),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'v' => out.push(11),
            b'0'..=b'7' => {
                let mut n = u32::from(e - b'0');
                for _ in 0..2 {
                    match v.get(i) {
                        Some(&d @ b'0'..=b'7') => {
                            n = n * 8 + u32::from(d - b'0');
                            i += 1;
                        }
                        _ => break,
                    }
                }
                out.push(n as u8);
            }
            b'x' => {
                let hex = |d: u8| (d as char).to_digit(16);
                let mut n = 0;
                let mut digits = 0;
                while digits < 2 {
                    match v.get(i).and_then(|&d| hex(d)) {
                        Some(d) => {
                            n = n * 16 + d;
                            i += 1;
                            digits += 1;
                        }
                        None => break,
                    }
                }
                if digits == 0 {
                    out.push(b'x');
                } else {
                    out.push(n as u8);
                }
            }
            other => out.push(other),
        }
    }
    String::from_utf8(out)
        .map(|s| Some(Cow::Owned(s)))
        .map_err(|e| format!("a COPY value is not UTF-8: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_rows_parse_back_to_their_values() {
        let row = parse_row(b"1\t\\N\ta\\tb\\\\c\\nd\t\t\\x41\\101\\v\t\xc3\xa9").unwrap();
        let got: Vec<Option<&str>> = row.iter().map(|v| v.as_deref()).collect();
        assert_eq!(
            got,
            [
                Some("1"),
                None,
                Some("a\tb\\c\nd"),
                Some(""),
                Some("AA\x0b"),
                Some("\u{e9}")
            ]
        );
        assert!(parse_row(b"a\\").is_err());
        // What push_text writes, parse_row reads.
        let mut b = String::new();
        push_text(&mut b, "x\ty\\\nz\r");
        assert_eq!(
            parse_row(b.as_bytes()).unwrap()[0].as_deref(),
            Some("x\ty\\\nz\r")
        );
    }

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
