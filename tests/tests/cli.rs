//! Bad settings and unreachable databases: clear messages, the right exit codes.

use crate::{cmd, run, text};
use cdc_core::test_utils::TestDb;

#[tokio::test]
async fn a_bad_setting_stops_start_up_with_exit_2_naming_it() {
    let db = TestDb::new("e2e_bad_settings").await;
    let cases = [
        (
            "extractor",
            "CDC_EXTRACTION_INTERVAL_SECONDS",
            "-1",
            "CDC_EXTRACTION_INTERVAL_SECONDS",
        ),
        (
            "extractor",
            "CDC_MAX_ROWS_PER_FILE",
            "0",
            "CDC_MAX_ROWS_PER_FILE",
        ),
        ("extractor", "CDC_CAPTURE_MODE", "sometimes", "capture-mode"),
        ("scd2-loader", "LOG_LEVEL", "loud", "LOG_LEVEL"),
        (
            "scd2-loader",
            "WAREHOUSE_DB_PORT",
            "lots",
            "WAREHOUSE_DB_PORT",
        ),
        ("extractor", "DB_PORT", "abc", "DB_PORT"),
        (
            "scd2-loader",
            "CDC_PROCESSED_RETENTION_DAYS",
            "-1",
            "CDC_PROCESSED_RETENTION_DAYS",
        ),
        (
            "scd2-loader",
            "CDC_MAX_SLOT_WAL_MB",
            "0",
            "CDC_MAX_SLOT_WAL_MB",
        ),
        (
            "extractor",
            "EXTRACTOR_METRICS_ADDR",
            "9187",
            "EXTRACTOR_METRICS_ADDR",
        ),
        (
            "scd2-loader",
            "LOADER_METRICS_ADDR",
            "127.0.0.1:http",
            "LOADER_METRICS_ADDR",
        ),
        (
            "mutator",
            "MUTATION_INTERVAL_SECONDS",
            "0",
            "MUTATION_INTERVAL_SECONDS",
        ),
        (
            "mutator",
            "MUTATION_CONCURRENCY",
            "0",
            "MUTATION_CONCURRENCY",
        ),
        ("extractor", "LOG_OUTPUT", "syslog", "LOG_OUTPUT"),
        ("scd2-loader", "LOG_ROTATION", "weekly", "LOG_ROTATION"),
        ("mutator", "LOG_MAX_FILES", "0", "LOG_MAX_FILES"),
    ];
    for (binary, var, value, named) in cases {
        let mut c = cmd(&db, binary);
        c.env(var, value);
        let out = run(c);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{binary} {var}={value}: {}",
            text(&out)
        );
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(named),
            "{binary} {var}={value}: {}",
            text(&out)
        );
    }
    // Log files in a directory that does not exist, or in a file: refused, not created.
    std::fs::write(db.dir.join("a_file"), "").unwrap();
    for (dir, said) in [
        ("no_such_logs", "no_such_logs"),
        ("a_file", "not a directory"),
    ] {
        let mut c = cmd(&db, "extractor");
        c.env("LOG_OUTPUT", "file").env("LOG_DIR", dir);
        let out = run(c);
        assert_eq!(out.status.code(), Some(2), "LOG_DIR={dir}: {}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("LOG_DIR") && err.contains(said),
            "LOG_DIR={dir}: {}",
            text(&out)
        );
    }
    assert!(!db.dir.join("no_such_logs").exists());
    // The tables: a list entry that is not schema.table, and a table that has no primary key.
    let mut c = cmd(&db, "extractor");
    c.env("CDC_TABLES", "orders");
    let out = run(c);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("CDC_TABLES"),
        "{}",
        text(&out)
    );
    db.source_client()
        .await
        .batch_execute("CREATE TABLE public.no_key (x int)")
        .await
        .unwrap();
    for binary in ["extractor", "scd2-loader"] {
        let mut c = cmd(&db, binary);
        c.args(["--once"]).env("CDC_TABLES", "public.no_key");
        let out = run(c);
        assert_eq!(out.status.code(), Some(2), "{binary}: {}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("public.no_key") && err.contains("primary key"),
            "{binary}: {}",
            text(&out)
        );
    }
    db.cleanup().await;
}

#[tokio::test]
async fn an_unreachable_database_is_retried_with_backoff_then_reported_without_the_password() {
    let db = TestDb::new("e2e_unreachable").await;
    let mut c = cmd(&db, "extractor");
    c.args(["--once"])
        .env("DB_PORT", "1")
        .env("DB_PASSWORD", "s3cret-Pa55")
        .env("DB_CONNECT_RETRY_SECONDS", "1.5");
    let out = run(c);
    let all = text(&out);
    assert_eq!(out.status.code(), Some(1), "{all}");
    assert!(
        all.matches("retrying").count() >= 2,
        "retried with backoff: {all}"
    );
    assert!(all.contains("source database at 127.0.0.1:1/"), "{all}");
    assert!(
        all.contains("DB_PORT"),
        "names the settings to check: {all}"
    );
    assert!(
        !all.contains("s3cret-Pa55"),
        "never prints the password: {all}"
    );

    // A source without the schema is a setup problem: exit 2 and what to do.
    let admin = db.source_client().await;
    admin
        .batch_execute("DROP TABLE orders CASCADE")
        .await
        .unwrap();
    let mut c = cmd(&db, "extractor");
    c.arg("--once");
    let out = run(c);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("init-scripts"),
        "{}",
        text(&out)
    );
    db.cleanup().await;
}

/// `.env.example`, which `make quick-start` copies to `.env`, sets every setting the README's
/// table documents to its documented default (a stale copy would run the pipeline with old
/// defaults), but for the demo's own choices.
#[test]
fn the_example_settings_are_the_documented_defaults() {
    let root = cdc_core::test_utils::workspace_root();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let example = std::fs::read_to_string(root.join(".env.example")).unwrap();
    // | `NAME` | `--flag` | `default` | ...
    let documented: std::collections::HashMap<&str, &str> = readme
        .lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.split(" | ").collect();
            let name = cells.first()?.strip_prefix("| `")?.strip_suffix('`')?;
            let default = cells.get(2)?.strip_prefix('`')?.split('`').next()?;
            cells.get(1)?.starts_with("`--").then_some((name, default))
        })
        .collect();
    assert!(
        documented.len() > 30,
        "the README's settings table: {documented:?}"
    );
    // The demo captures all of its tables.
    let demo = ["CDC_TABLES"];
    let mut checked = 0;
    for line in example
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains('='))
    {
        let (name, value) = line.split_once('=').unwrap();
        let Some(default) = documented.get(name) else {
            continue;
        };
        checked += 1;
        if !demo.contains(&name) {
            assert_eq!(value, *default, ".env.example sets {name}");
        }
    }
    assert!(checked > 20, "{checked} settings checked");
}
