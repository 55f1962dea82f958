//! Values the warehouse would change on the way in are refused, never coerced: PostgreSQL
//! rounds a numeric to its column's scale and reads `now`, `today`, `yesterday`, `tomorrow`,
//! `epoch` and `allballs` as times relative to the load. The extractor never writes such
//! values (each type's output function does not produce them); a hand-edited or foreign
//! change-log file may, and its file is quarantined instead.

/// Checks `text` for a column of `sql_type` (as the source names it).
pub fn check(sql_type: &str, text: &str) -> Result<(), String> {
    match kind(sql_type) {
        Kind::Numeric { scale } => numeric(text, scale, sql_type),
        Kind::DateTime => date_time(text, sql_type),
        Kind::Other => Ok(()),
    }
}

enum Kind {
    Numeric { scale: u32 },
    DateTime,
    Other,
}

fn kind(t: &str) -> Kind {
    if let Some(args) = t.strip_prefix("numeric(").and_then(|r| r.strip_suffix(')')) {
        let scale = args
            .split_once(',')
            .and_then(|(_, s)| s.trim().parse().ok())
            .unwrap_or(0);
        return Kind::Numeric { scale };
    }
    let base = t.split('(').next().unwrap_or(t);
    match base.trim() {
        "date"
        | "timestamp without time zone"
        | "timestamp with time zone"
        | "time without time zone"
        | "time with time zone"
        | "timestamp"
        | "timestamptz" => Kind::DateTime,
        _ => {
            // `timestamp(3) without time zone` and the like.
            if (t.starts_with("timestamp(") || t.starts_with("time(")) && !t.ends_with("[]") {
                Kind::DateTime
            } else {
                Kind::Other
            }
        }
    }
}

/// Decimal places that survive: trailing zeros do not count, an exponent shifts them.
fn numeric(text: &str, scale: u32, sql_type: &str) -> Result<(), String> {
    let t = text.trim();
    let lower = t.to_ascii_lowercase();
    if matches!(
        lower.trim_start_matches(['+', '-']),
        "nan" | "infinity" | "inf"
    ) {
        return Ok(());
    }
    let (mantissa, exp) = match lower.split_once('e') {
        Some((m, e)) => (m, e.parse::<i64>().unwrap_or(0)),
        None => (lower.as_str(), 0),
    };
    let frac = mantissa.split_once('.').map_or("", |(_, f)| f);
    let places = frac.trim_end_matches('0').len() as i64 - exp;
    if places > i64::from(scale) {
        return Err(format!(
            "'{text}' has {places} decimal places and {sql_type} holds {scale}: it would be rounded"
        ));
    }
    Ok(())
}

/// A date or time is written with digits, or is `infinity` / `-infinity`; a word such as
/// `now` or `yesterday` would be read relative to the load.
fn date_time(text: &str, sql_type: &str) -> Result<(), String> {
    let t = text.trim();
    if t.bytes().any(|b| b.is_ascii_digit())
        || t.eq_ignore_ascii_case("infinity")
        || t.eq_ignore_ascii_case("-infinity")
        || t.eq_ignore_ascii_case("+infinity")
    {
        return Ok(());
    }
    Err(format!(
        "'{text}' is not a {sql_type} value but a word PostgreSQL would read relative to the load time"
    ))
}

#[cfg(test)]
mod tests {
    use super::check;

    #[test]
    fn values_the_warehouse_would_change_are_refused() {
        for (t, v) in [
            ("numeric(10,2)", "12.345"),
            ("numeric(10,2)", "0.0001e1"),
            ("numeric(10,0)", "1.5"),
            ("numeric(12,4)", "1.23456"),
            ("timestamp with time zone", "yesterday"),
            ("timestamp without time zone", " now "),
            ("timestamp(3) with time zone", "today"),
            ("date", "tomorrow"),
            ("date", "epoch"),
            ("time without time zone", "allballs"),
        ] {
            assert!(check(t, v).is_err(), "{t} {v}");
        }
        for (t, v) in [
            ("numeric(10,2)", "12.34"),
            ("numeric(10,2)", "12.340"),
            ("numeric(10,2)", "-0.10"),
            ("numeric(10,2)", "1.5e1"),
            ("numeric(10,2)", "NaN"),
            ("numeric(10,2)", "-Infinity"),
            ("numeric", "1.23456789"),
            ("numeric(10,2)[]", "{1.234}"),
            ("timestamp with time zone", "2024-02-29 12:00:00.123456+00"),
            ("timestamp without time zone", "infinity"),
            ("date", "-infinity"),
            ("date", "4713-01-01 BC"),
            ("text", "yesterday"),
        ] {
            assert!(check(t, v).is_ok(), "{t} {v}");
        }
    }
}
