//! Logical capture through the real binaries, with the extractor killed at the worst
//! moments: the history must still hold every committed version exactly once.

use crate::{cmd, run, text};
use cdc_core::event::CaptureMode;
use cdc_core::progress::Progress;
use cdc_core::test_utils::{
    actual_history, assert_same_history, expected_history_on, install_audit, Basis, TestDb,
};
use std::time::Duration;

fn logical(db: &TestDb, name: &str) -> std::process::Command {
    let mut c = cmd(db, name);
    c.env("CDC_CAPTURE_MODE", "logical");
    c
}

#[tokio::test]
async fn logical_kill_9_restarts_of_the_extractor_lose_and_double_nothing() {
    let db = TestDb::new("e2e_logical_kill").await;
    let source = db.source_client().await;
    install_audit(&source).await;
    let mut first = logical(&db, "extractor");
    first.arg("--once");
    let out = run(first);
    assert!(out.status.success(), "{}", text(&out));
    let basis = Basis::Commit {
        snapshot: Progress::load(&db.state_dir(), &db.spec.qualified(), CaptureMode::Logical)
            .unwrap()
            .logical
            .and_then(|l| l.filter),
    };

    for round in 0..4_u64 {
        // The files are durable, then the process dies before confirming the slot.
        let mut m = cmd(&db, "mutator");
        m.args([
            "--count",
            "120",
            "--seed",
            &round.to_string(),
            "--concurrency",
            "2",
            "--ops-per-transaction",
            "3",
        ]);
        assert!(run(m).status.success());
        let mut e = logical(&db, "extractor");
        e.arg("--once")
            .env("CDC_FAILPOINT", "after-files-before-confirm");
        let out = run(e);
        assert!(
            !out.status.success(),
            "the failpoint kills the process: {}",
            text(&out)
        );

        // kill -9 at an arbitrary moment while the mutator writes.
        let mut m = cmd(&db, "mutator");
        m.args([
            "--count",
            "300",
            "--seed",
            &(round + 100).to_string(),
            "--concurrency",
            "2",
        ]);
        let mut mutator = m.stdout(std::process::Stdio::null()).spawn().unwrap();
        let mut e = logical(&db, "extractor");
        e.env("CDC_EXTRACTION_INTERVAL_SECONDS", "0.05");
        let mut extractor = e.stderr(std::process::Stdio::null()).spawn().unwrap();
        tokio::time::sleep(Duration::from_millis(150 + 70 * round)).await;
        extractor.kill().unwrap(); // SIGKILL
        extractor.wait().unwrap();
        assert!(mutator.wait().unwrap().success());

        if round % 2 == 1 {
            let mut l = cmd(&db, "scd2-loader");
            l.arg("--once");
            let out = run(l);
            assert!(out.status.success(), "{}", text(&out));
        }
    }
    let mut e = logical(&db, "extractor");
    e.arg("--once");
    let out = run(e);
    assert!(out.status.success(), "{}", text(&out));
    let mut l = cmd(&db, "scd2-loader");
    l.arg("--once");
    let out = run(l);
    assert!(out.status.success(), "{}", text(&out));

    let expected = expected_history_on(&source, &db.spec, &basis).await;
    let actual = actual_history(&db.warehouse_client().await, &db.spec).await;
    assert_same_history(&expected, &actual);
    let versions: usize = actual.values().map(Vec::len).sum();
    assert!(versions > 1000, "{versions} versions");

    let mut v = cmd(&db, "scd2-loader");
    v.arg("verify");
    let out = run(v);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    let mut s = logical(&db, "scd2-loader");
    s.arg("status");
    let out = run(s);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("logical mode") && stdout.contains("slot retained WAL"),
        "{stdout}"
    );

    let mut d = logical(&db, "extractor");
    d.arg("drop-slot");
    let out = run(d);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("dropped"),
        "{}",
        text(&out)
    );
    db.cleanup().await;
}

#[tokio::test]
async fn logical_a_slot_name_taken_by_another_plugin_exits_2_naming_the_setting() {
    let db = TestDb::new("e2e_logical_slot_taken").await;
    let source = db.source_client().await;
    source
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'test_decoding')",
            &[&db.name],
        )
        .await
        .unwrap();
    let mut e = logical(&db, "extractor");
    e.arg("--once");
    let out = run(e);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("CDC_SLOT_NAME"),
        "{}",
        text(&out)
    );
    db.cleanup().await;
}
