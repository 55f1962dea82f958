//! Log files (`LOG_OUTPUT=file`): rotating files per program and format, the oldest pruned
//! beyond `LOG_MAX_FILES`, a link to the current file, and text and JSON never in one file.

use crate::{cmd, run, text};
use cdc_core::test_utils::TestDb;
use std::path::Path;

/// The names in `dir` that start with `prefix.` and end with `.log`, sorted.
fn files(dir: &Path, prefix: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!("{prefix}.")) && n.ends_with(".log"))
        .collect();
    v.sort();
    v
}

/// Old files of earlier days, created oldest first (pruning goes by creation time, or by the
/// date in the name where the file system keeps no creation time).
fn old_files(dir: &Path, prefix: &str) -> Vec<String> {
    (1..=6)
        .map(|d| {
            let name = format!("{prefix}.2026-01-0{d}.log");
            std::fs::write(dir.join(&name), format!("old {d}\n")).unwrap();
            // Distinct creation times, whatever the file system's resolution.
            std::thread::sleep(std::time::Duration::from_millis(20));
            name
        })
        .collect()
}

/// The file `link` points at, by name.
fn current(dir: &Path, link: &str) -> String {
    let target =
        std::fs::read_link(dir.join(link)).unwrap_or_else(|e| panic!("{link} is not a link: {e}"));
    target.file_name().unwrap().to_string_lossy().into_owned()
}

#[tokio::test]
async fn log_files_keep_the_newest_per_format_and_never_mix_text_and_json() {
    let db = TestDb::new("e2e_log_files").await;
    let dir = db.dir.join("logs");
    std::fs::create_dir_all(&dir).unwrap();
    let old_text = old_files(&dir, "extractor.text");
    let old_json = old_files(&dir, "extractor.json");
    std::fs::write(
        dir.join("scd2-loader.text.2026-01-01.log"),
        "another program\n",
    )
    .unwrap();

    let capture = |format: &str| {
        let mut c = cmd(&db, "extractor");
        c.arg("--once")
            .env("LOG_OUTPUT", "file")
            .env("LOG_DIR", "logs") // relative to the working directory
            .env("LOG_MAX_FILES", "3")
            .env("LOG_FORMAT", format);
        let out = run(c);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        // Everything went to the file, nothing to the terminal.
        assert!(out.stderr.is_empty(), "{}", text(&out));
    };

    // Text: the 2 newest old text files and today's remain; JSON and other programs' files
    // are not counted and not touched.
    capture("text");
    let text_files = files(&dir, "extractor.text");
    let today_text = current(&dir, "extractor.log");
    assert_eq!(
        text_files,
        {
            let mut v = vec![old_text[4].clone(), old_text[5].clone(), today_text.clone()];
            v.sort();
            v
        },
        "text files kept"
    );
    assert_eq!(
        files(&dir, "extractor.json"),
        old_json,
        "JSON files untouched"
    );
    assert_eq!(
        files(&dir, "scd2-loader.text"),
        ["scd2-loader.text.2026-01-01.log"]
    );
    let log = std::fs::read_to_string(dir.join(&today_text)).unwrap();
    assert!(log.contains("extractor started"), "{log}");
    assert!(log.lines().all(|l| !l.starts_with('{')), "{log}");

    // JSON: its own files, pruned the same way; the text files stay as they were.
    capture("json");
    let today_json = current(&dir, "extractor.json.log");
    assert_ne!(today_json, today_text);
    assert_eq!(
        files(&dir, "extractor.json"),
        {
            let mut v = vec![old_json[4].clone(), old_json[5].clone(), today_json.clone()];
            v.sort();
            v
        },
        "JSON files kept"
    );
    assert_eq!(files(&dir, "extractor.text"), text_files);
    let json = std::fs::read_to_string(dir.join(&today_json)).unwrap();
    assert!(json.contains("extractor started"), "{json}");
    for line in json.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        assert!(v.is_object(), "{line}");
    }
    assert_eq!(
        std::fs::read_to_string(dir.join(&today_text)).unwrap(),
        log,
        "the text file got nothing from the JSON run"
    );
    db.cleanup().await;
}

#[tokio::test]
async fn hourly_log_files_are_named_by_the_hour_and_an_old_plain_log_is_kept_aside() {
    let db = TestDb::new("e2e_log_hourly").await;
    let dir = db.dir.join("logs");
    std::fs::create_dir_all(&dir).unwrap();
    // What run_pipeline.sh wrote before the programs rotated their own logs.
    std::fs::write(dir.join("extractor.log"), "a line from before\n").unwrap();
    let mut c = cmd(&db, "extractor");
    c.arg("--once")
        .env("LOG_OUTPUT", "file")
        .env("LOG_DIR", &dir)
        .env("LOG_ROTATION", "hourly");
    let out = run(c);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let now = current(&dir, "extractor.log");
    let date = now
        .strip_prefix("extractor.text.")
        .and_then(|n| n.strip_suffix(".log"))
        .unwrap_or_else(|| panic!("{now}"));
    assert!(
        chrono::NaiveDateTime::parse_from_str(&format!("{date}:00"), "%Y-%m-%d-%H:%M").is_ok(),
        "{now} is not named by the hour"
    );
    assert!(std::fs::read_to_string(dir.join(&now))
        .unwrap()
        .contains("extractor started"));
    assert_eq!(
        std::fs::read_to_string(dir.join("extractor.text.before-rotation.log")).unwrap(),
        "a line from before\n"
    );
    db.cleanup().await;
}
