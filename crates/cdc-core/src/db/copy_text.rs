//! Values in PostgreSQL's COPY text format (`COPY ... TO STDOUT` / `FROM STDIN` without
//! options): writing them, and reading the rows a `COPY ... TO STDOUT` sends. Each value in
//! that format is its type's output function's text, exactly as psql shows it.

use chrono::DateTime;
use std::borrow::Cow;
use std::fmt::Write as _;

/// A value, escaped.
pub fn push_text(buf: &mut String, v: &str) {
    let mut rest = v;
    // Runs without a character to escape are copied whole.
    while let Some(at) = rest.find(['\\', '\t', '\n', '\r']) {
        buf.push_str(&rest[..at]);
        buf.push_str(match rest.as_bytes()[at] {
            b'\\' => "\\\\",
            b'\t' => "\\t",
            b'\n' => "\\n",
            _ => "\\r",
        });
        rest = &rest[at + 1..];
    }
    buf.push_str(rest);
}

/// A time in microseconds since the epoch as a UTC timestamptz (`\N` when out of range).
pub fn push_time(buf: &mut String, us: i64) {
    use chrono::{Datelike, Timelike};
    let Some(t) = DateTime::from_timestamp_micros(us) else {
        buf.push_str("\\N");
        return;
    };
    let year = t.year();
    if !(1000..=9999).contains(&year) {
        let _ = write!(buf, "{}", t.format("%Y-%m-%d %H:%M:%S%.6f+00"));
        return;
    }
    // The common case by hand: `YYYY-MM-DD HH:MM:SS.ffffff+00` (chrono's formatter parses
    // its pattern for every value).
    let mut out = *b"0000-00-00 00:00:00.000000+00";
    let mut put = |at: usize, width: usize, mut n: u32| {
        for i in (at..at + width).rev() {
            out[i] = b'0' + (n % 10) as u8;
            n /= 10;
        }
    };
    put(0, 4, year as u32);
    put(5, 2, t.month());
    put(8, 2, t.day());
    put(11, 2, t.hour());
    put(14, 2, t.minute());
    put(17, 2, t.second());
    put(20, 6, t.timestamp_subsec_micros());
    buf.push_str(std::str::from_utf8(&out).expect("ASCII digits"));
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
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 36];
    let mut at = 0;
    for (i, b) in bytes.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out[at] = b'-';
            at += 1;
        }
        out[at] = HEX[(b >> 4) as usize];
        out[at + 1] = HEX[(b & 0xf) as usize];
        at += 2;
    }
    buf.push_str(std::str::from_utf8(&out).expect("ASCII hex digits"));
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
    fn times_and_uuids_are_written_as_chrono_and_postgresql_spell_them() {
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut cases: Vec<i64> = vec![0, -1, 1, 253_402_300_799_999_999, -62_135_596_800_000_000];
        cases.extend(
            (0..2000).map(|_| (next() % 600_000_000_000_000_000) as i64 - 300_000_000_000_000_000),
        );
        for us in cases {
            let mut got = String::new();
            push_time(&mut got, us);
            let want = DateTime::from_timestamp_micros(us)
                .map(|t| t.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string())
                .unwrap_or_else(|| "\\N".into());
            assert_eq!(got, want, "{us}");
        }
        let mut got = String::new();
        push_uuid(
            &mut got,
            &[
                0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0xf0, 0x0f, 0, 0xff, 0x10, 0x20,
                0x30, 0x40,
            ],
        );
        assert_eq!(got, "01234567-89ab-cdef-f00f-00ff10203040");
        let mut got = String::new();
        push_text(&mut got, "\\a\tb\nc\rd\u{e9}\\");
        assert_eq!(got, "\\\\a\\tb\\nc\\rd\u{e9}\\\\");
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
