//! The pipeline through its binaries: burst traffic, capture, apply, verify, status, signals.

use crate::{cmd, run, text};
use cdc_core::test_utils::{install_audit, TestDb};
use std::time::{Duration, Instant};

#[tokio::test]
async fn the_three_binaries_build_a_history_that_verify_accepts() {
    let db = TestDb::new("e2e_pipeline").await;
    let source = db.source_client().await;
    install_audit(&source).await;
    for round in 0..3 {
        let mut m = cmd(&db, "mutator");
        m.args([
            "--count",
            "150",
            "--seed",
            &round.to_string(),
            "--concurrency",
            "2",
        ]);
        let out = run(m);
        assert!(out.status.success(), "{}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("mutator: 150 operations"),
            "{}",
            text(&out)
        );
        let mut e = cmd(&db, "extractor");
        e.arg("--once");
        let out = run(e);
        assert!(out.status.success(), "{}", text(&out));
        let mut l = cmd(&db, "scd2-loader");
        l.arg("--once");
        let out = run(l);
        assert!(out.status.success(), "{}", text(&out));
    }
    let ops: i64 = source
        .query_one(
            "SELECT count(*) FROM test_audit WHERE txid <> '0'::xid8",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(ops, 450, "a burst performs exactly --count operations");

    let mut v = cmd(&db, "scd2-loader");
    v.arg("verify");
    let out = run(v);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("all invariants hold"));

    let wh = db.warehouse_client().await;
    let (versions, runs): (i64, i64) = {
        let r = wh
            .query_one(
                "SELECT (SELECT count(*) FROM dim_orders_history), (SELECT count(*) FROM pipeline_metadata WHERE status = 'success')",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert!(versions > 150, "history has versions ({versions})");
    assert!(
        runs >= 6,
        "every extractor pass and loader batch is recorded ({runs})"
    );

    let mut s = cmd(&db, "scd2-loader");
    s.arg("status");
    let out = run(s);
    let stdout = String::from_utf8_lossy(&out.stdout);
    // Everything applied, but nothing runs: unhealthy, and it says why.
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(
        stdout.contains("pending files      0")
            && stdout.contains("capture lag")
            && stdout.contains("extractor is not running"),
        "{stdout}"
    );

    // A broken history makes verify fail with a readable report.
    wh.batch_execute("UPDATE dim_orders_history SET valid_to = valid_to + interval '1 hour' WHERE NOT is_current AND NOT is_deleted")
        .await
        .unwrap();
    let mut v = cmd(&db, "scd2-loader");
    v.args(["verify", "--no-source"]);
    let out = run(v);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("FAIL  versions of a key are contiguous"),
        "{}",
        text(&out)
    );
    db.cleanup().await;
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn sigterm_stops_extractor_and_loader_cleanly_with_exit_0() {
    let db = TestDb::new("e2e_sigterm").await;
    let mut e = cmd(&db, "extractor");
    e.env("CDC_EXTRACTION_INTERVAL_SECONDS", "0.2");
    let mut extractor = e.stderr(std::process::Stdio::null()).spawn().unwrap();
    let mut l = cmd(&db, "scd2-loader");
    l.env("LOADER_POLL_INTERVAL_SECONDS", "0.1");
    let mut loader = l.stderr(std::process::Stdio::null()).spawn().unwrap();
    let processed = db.log_dir().join("processed");
    wait_for("the snapshot file to be applied", || {
        std::fs::read_dir(&processed)
            .map(|d| d.count() > 0)
            .unwrap_or(false)
    });
    for child in [&mut extractor, &mut loader] {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
    for child in [&mut extractor, &mut loader] {
        let mut code = None;
        wait_for("exit after SIGTERM", || {
            code = child.try_wait().unwrap().map(|s| s.code());
            code.is_some()
        });
        assert_eq!(code.unwrap(), Some(0));
    }
    let wh = db.warehouse_client().await;
    let n: i64 = wh
        .query_one("SELECT count(*) FROM dim_orders_history", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 10, "the sample rows were applied before the stop");
    db.cleanup().await;
}

/// A looping loader is woken by the file-system notification of a new change-log file: with
/// the poll an hour long, a file the extractor writes while the loader waits is still applied.
#[tokio::test]
async fn a_looping_loader_applies_a_new_file_without_waiting_for_its_poll() {
    let db = TestDb::new("e2e_wake").await;
    let mut e = cmd(&db, "extractor");
    e.arg("--once");
    let out = run(e);
    assert!(out.status.success(), "{}", text(&out));
    let mut l = cmd(&db, "scd2-loader");
    l.env("LOADER_POLL_INTERVAL_SECONDS", "3600")
        .stderr(std::process::Stdio::null());
    let loader = crate::start(&mut l);
    let processed = db.log_dir().join("processed");
    let archived = || {
        std::fs::read_dir(&processed)
            .map(|d| {
                d.flatten()
                    .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                    .count()
            })
            .unwrap_or(0)
    };
    // The initial copy, found by the loader's first look; then it waits.
    wait_for("the initial copy to be applied", || archived() == 1);

    let mut m = cmd(&db, "mutator");
    m.args(["--count", "40", "--seed", "7"]);
    let out = run(m);
    assert!(out.status.success(), "{}", text(&out));
    let mut e = cmd(&db, "extractor");
    e.arg("--once");
    let out = run(e);
    assert!(out.status.success(), "{}", text(&out));
    wait_for("the new file to be applied", || archived() == 2);

    let mut v = cmd(&db, "scd2-loader");
    v.arg("verify");
    let out = run(v);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(crate::stop(loader), Some(0));
    db.cleanup().await;
}

/// The demo's three tables with `CDC_TABLES=public.*`, the mutator writing all of them, in both
/// capture modes: `extractor setup`, then bursts captured and applied; verify holds for every
/// table and nothing is quarantined.
#[tokio::test]
async fn every_table_of_the_demo_is_captured_by_one_pipeline_in_both_modes() {
    for mode in ["timestamp", "logical"] {
        let db = TestDb::new(&format!("e2e_all_tables_{mode}")).await;
        let with = |binary: &str, args: &[&str]| {
            let mut c = cmd(&db, binary);
            c.args(args)
                .env("CDC_TABLES", "public.*")
                .env("CDC_CAPTURE_MODE", mode)
                .env("MUTATION_TABLES", "all");
            let out = run(c);
            assert!(
                out.status.success(),
                "{mode} {binary} {args:?}: {}",
                text(&out)
            );
            out
        };
        with("extractor", &["setup"]);
        with("extractor", &["--once"]);
        for round in 0..3 {
            let seed = (round + 1).to_string();
            with(
                "mutator",
                &["--count", "200", "--seed", &seed, "--concurrency", "2"],
            );
            with("extractor", &["--once"]);
            with("extractor", &["--once"]);
            with("scd2-loader", &["--once"]);
        }
        let out = with("scd2-loader", &["verify"]);
        let said = String::from_utf8_lossy(&out.stdout).into_owned();
        for history in [
            "dim_orders_history",
            "dim_order_items_history",
            "dim_customers_history",
        ] {
            assert!(said.contains(history), "{mode}: {said}");
        }
        assert_eq!(
            said.matches("all invariants hold").count(),
            3,
            "{mode}: {said}"
        );
        let dead = db.log_dir().join("dead_letter");
        let quarantined = std::fs::read_dir(&dead).map(|d| d.count()).unwrap_or(0);
        assert_eq!(quarantined, 0, "{mode}: nothing quarantined");
        let wh = db.warehouse_client().await;
        for history in ["dim_order_items_history", "dim_customers_history"] {
            let n: i64 = wh
                .query_one(&format!("SELECT count(*) FROM public.{history}"), &[])
                .await
                .unwrap()
                .get(0);
            assert!(n > 10, "{mode}: {history} has {n} versions");
        }
        db.cleanup().await;
    }
}

/// `status` exits 0 only when the pipeline is healthy, and 3 naming each problem: a program
/// not running, a dead-lettered file, capture lag beyond `CDC_MAX_LAG_SECONDS`, a slot
/// retaining more WAL than `CDC_MAX_SLOT_WAL_MB`.
#[tokio::test]
async fn status_is_healthy_only_when_everything_is_and_names_each_problem() {
    let db = TestDb::new("e2e_status_health").await;
    let status = |env: &[(&str, &str)]| {
        let mut s = cmd(&db, "scd2-loader");
        s.arg("status").env("CDC_CAPTURE_MODE", "logical");
        for (k, v) in env {
            s.env(k, v);
        }
        let out = run(s);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let spawn = |name: &str| {
        let mut c = cmd(&db, name);
        c.env("CDC_CAPTURE_MODE", "logical")
            .env("CDC_EXTRACTION_INTERVAL_SECONDS", "0.2")
            .env("LOADER_POLL_INTERVAL_SECONDS", "0.1")
            .stderr(std::process::Stdio::null());
        c.spawn().unwrap()
    };
    let mut extractor = spawn("extractor");
    let mut loader = spawn("scd2-loader");
    let processed = db.log_dir().join("processed");
    wait_for("the initial copy to be applied", || {
        std::fs::read_dir(&processed)
            .map(|d| d.count() > 0)
            .unwrap_or(false)
    });
    let mut said = String::new();
    wait_for("a healthy status", || {
        let (code, out) = status(&[]);
        said = out;
        code == Some(0)
    });
    assert!(said.starts_with("health: OK"), "{said}");

    // A dead-lettered file.
    let dead = db.log_dir().join("dead_letter");
    std::fs::create_dir_all(&dead).unwrap();
    std::fs::write(dead.join("orders_x.jsonl"), "{}\n").unwrap();
    let (code, said) = status(&[]);
    assert_eq!(code, Some(3), "{said}");
    assert!(
        said.contains("1 change-log file(s) in") && said.contains("dead_letter"),
        "{said}"
    );
    std::fs::remove_file(dead.join("orders_x.jsonl")).unwrap();

    // The programs stop; while the extractor is down, the slot retains WAL.
    for child in [&mut extractor, &mut loader] {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    let source = db.source_client().await;
    source
        .batch_execute(
            "INSERT INTO orders (customer_id, product_id, quantity, unit_price)
             SELECT 1, 1, 1, 1.00 FROM generate_series(1, 30000)",
        )
        .await
        .unwrap();
    let (code, said) = status(&[("CDC_MAX_SLOT_WAL_MB", "1")]);
    assert_eq!(code, Some(3), "{said}");
    for reason in [
        "extractor is not running",
        "scd2-loader is not running",
        "MiB of WAL (CDC_MAX_SLOT_WAL_MB 1)",
    ] {
        assert!(said.contains(reason), "{reason}: {said}");
    }
    db.cleanup().await;
}

/// In timestamp mode a watermark older than `CDC_MAX_LAG_SECONDS` is capture lag.
#[tokio::test]
async fn status_reports_capture_lag_beyond_the_bound() {
    let db = TestDb::new("e2e_status_lag").await;
    let mut e = cmd(&db, "extractor");
    e.arg("--once");
    assert!(run(e).status.success());
    std::thread::sleep(Duration::from_millis(1100));
    let mut s = cmd(&db, "scd2-loader");
    s.arg("status").env("CDC_MAX_LAG_SECONDS", "1");
    let out = run(s);
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(
        said.contains("capture lag of public.orders") && said.contains("CDC_MAX_LAG_SECONDS 1"),
        "{said}"
    );
    db.cleanup().await;
}

/// In logical mode capture lag is in seconds too: the age of the newest commit up to which
/// everything is captured. A pass moves it past a change committed before the pass; older than
/// `CDC_MAX_LAG_SECONDS` it is unhealthy.
#[tokio::test]
async fn logical_status_reports_capture_lag_in_seconds_beyond_the_bound() {
    let db = TestDb::new("e2e_status_lag_logical").await;
    let with = |binary: &str, args: &[&str], max_lag: &str| {
        let mut c = cmd(&db, binary);
        c.args(args)
            .env("CDC_CAPTURE_MODE", "logical")
            .env("CDC_MAX_LAG_SECONDS", max_lag);
        run(c)
    };
    let out = with("extractor", &["--once"], "300");
    assert!(out.status.success(), "{}", text(&out));
    let source = db.source_client().await;
    source
        .batch_execute(
            "UPDATE orders SET quantity = quantity + 1 WHERE id = (SELECT min(id) FROM orders)",
        )
        .await
        .unwrap();
    let changed: chrono::DateTime<chrono::Utc> = source
        .query_one("SELECT clock_timestamp()", &[])
        .await
        .unwrap()
        .get(0);
    let out = with("extractor", &["--once"], "300");
    assert!(out.status.success(), "{}", text(&out));

    let out = with("scd2-loader", &["status"], "3600");
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    let through = said
        .lines()
        .find_map(|l| l.trim().strip_prefix("captured through"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .unwrap_or_else(|| panic!("no captured-through time: {said}"));
    assert!(
        through >= changed,
        "captured through {through}, but a change of {changed} was captured: {said}"
    );
    assert!(!said.contains("capture lag:"), "{said}");

    std::thread::sleep(Duration::from_millis(1100));
    let out = with("scd2-loader", &["status"], "1");
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(
        said.contains("capture lag: changes committed since")
            && said.contains("CDC_MAX_LAG_SECONDS 1"),
        "{said}"
    );
    db.cleanup().await;
}

/// `verify` on a running pipeline under traffic: exact every time (it lets the pipeline catch
/// up before a difference from the source counts), and still fails on a real divergence.
async fn verify_under_traffic(mode: &str) {
    let db = TestDb::new(&format!("e2e_verify_traffic_{mode}")).await;
    let with = |name: &str| {
        let mut c = cmd(&db, name);
        c.env("CDC_TABLES", "public.*")
            .env("CDC_CAPTURE_MODE", mode)
            .env("CDC_EXTRACTION_INTERVAL_SECONDS", "0.2")
            .env("LOADER_POLL_INTERVAL_SECONDS", "0.1");
        c
    };
    let spawn = |name: &str, args: &[&str]| {
        let mut c = with(name);
        c.args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        c.spawn().unwrap()
    };
    let mut procs = vec![spawn("extractor", &[]), spawn("scd2-loader", &[])];
    let processed = db.log_dir().join("processed");
    wait_for("the initial copy to be applied", || {
        std::fs::read_dir(&processed)
            .map(|d| d.count() > 0)
            .unwrap_or(false)
    });
    // Traffic on orders (and, by cascade, order_items) all along.
    procs.push(spawn("mutator", &["--rate", "100", "--seed", "7"]));
    for i in 0..20 {
        let mut v = with("scd2-loader");
        v.arg("verify");
        let out = run(v);
        assert_eq!(
            out.status.code(),
            Some(0),
            "verify {i} under traffic: {}",
            text(&out)
        );
    }
    // A real divergence: one current history row of a table without traffic.
    let id: String = db
        .source_client()
        .await
        .query_one("SELECT id::text FROM customers ORDER BY id LIMIT 1", &[])
        .await
        .unwrap()
        .get(0);
    db.warehouse_client()
        .await
        .execute(
            "UPDATE dim_customers_history SET tier = 'corrupted' WHERE is_current AND id::text = $1",
            &[&id],
        )
        .await
        .unwrap();
    let mut v = with("scd2-loader");
    v.args(["verify", "--settle-seconds", "5"]);
    let out = run(v);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains(&format!("key {id}: source")) && said.contains("corrupted"),
        "{said}"
    );
    for p in &mut procs {
        p.kill().unwrap();
        p.wait().unwrap();
    }
    db.cleanup().await;
}

#[tokio::test]
async fn timestamp_verify_under_traffic_is_exact_every_time() {
    verify_under_traffic("timestamp").await;
}

#[tokio::test]
async fn logical_verify_under_traffic_is_exact_every_time() {
    verify_under_traffic("logical").await;
}

/// The looping loader compresses archived change logs (zstd), a compressed archive put back
/// is known as applied, and `CDC_PROCESSED_RETENTION_DAYS` prunes old archives.
#[tokio::test]
async fn archived_change_logs_are_compressed_readable_and_pruned() {
    use std::io::Read;
    let db = TestDb::new("e2e_archive").await;
    let mut e = cmd(&db, "extractor");
    e.arg("--once");
    assert!(run(e).status.success());
    let pending: Vec<_> = std::fs::read_dir(db.log_dir())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    assert_eq!(pending.len(), 1);
    let original = std::fs::read_to_string(&pending[0]).unwrap();
    let name = pending[0]
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let processed = db.log_dir().join("processed");
    // An archive older than the retention, and one just made.
    std::fs::create_dir_all(&processed).unwrap();
    let old = processed.join("orders_20000101T000000.000000Z_0000000001.jsonl");
    std::fs::write(&old, "").unwrap();
    let touched = std::process::Command::new("touch")
        .args(["-d", "3 days ago"])
        .arg(&old)
        .status()
        .unwrap();
    assert!(touched.success());

    let spawn = || {
        let mut l = cmd(&db, "scd2-loader");
        l.env("LOADER_POLL_INTERVAL_SECONDS", "0.1")
            .env("CDC_PROCESSED_RETENTION_DAYS", "1")
            .stderr(std::process::Stdio::null());
        l.spawn().unwrap()
    };
    let mut loader = spawn();
    let zst = processed.join(format!("{name}.zst"));
    wait_for("the archive to be compressed and pruned", || {
        zst.exists() && !processed.join(&name).exists() && !old.exists()
    });
    let mut text = String::new();
    cdc_core::changelog::open_reader(&zst)
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    assert_eq!(
        text, original,
        "the compressed archive holds the file as written"
    );

    // Put back, it is known as applied: archived again, nothing added.
    let wh = db.warehouse_client().await;
    let count = || async {
        wh.query_one("SELECT count(*) FROM dim_orders_history", &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    let before = count().await;
    std::fs::copy(&zst, db.log_dir().join(format!("{name}.zst"))).unwrap();
    wait_for("the put-back archive to be archived again", || {
        !db.log_dir().join(format!("{name}.zst")).exists()
    });
    assert_eq!(count().await, before);
    assert!(std::fs::read_dir(db.log_dir().join("dead_letter")).is_err());
    loader.kill().unwrap();
    loader.wait().unwrap();
    db.cleanup().await;
}

/// A prepared transaction holds timestamp capture: the extractor's log and `status` name it
/// (unhealthy once it is older than `CDC_MAX_LAG_SECONDS`), and once it commits its changes
/// are captured and `verify` passes.
#[tokio::test]
async fn a_prepared_transaction_is_named_by_the_log_and_status_and_captured_when_committed() {
    let db = TestDb::new("e2e_prepared").await;
    let source = db.source_client().await;
    install_audit(&source).await;
    let once = |name: &str| {
        let mut c = cmd(&db, name);
        c.arg("--once");
        let out = run(c);
        assert!(out.status.success(), "{}", text(&out));
        out
    };
    once("extractor");
    once("scd2-loader");
    let gid = format!("gid_{}", db.name);
    db.source_client()
        .await
        .batch_execute(&format!(
            "BEGIN; UPDATE orders SET order_status = 'prepared' WHERE id = 3; PREPARE TRANSACTION '{gid}'"
        ))
        .await
        .unwrap();
    source
        .batch_execute("UPDATE orders SET order_status = 'later' WHERE id = 4")
        .await
        .unwrap();
    let out = once("extractor");
    let log =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(
        log.contains("a prepared transaction holds the watermark") && log.contains(&gid),
        "{}",
        text(&out)
    );
    std::thread::sleep(Duration::from_millis(1100));
    let mut s = cmd(&db, "scd2-loader");
    s.arg("status").env("CDC_MAX_LAG_SECONDS", "1");
    let out = run(s);
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(
        said.contains(&format!(
            "prepared transaction '{gid}' has held the capture watermark"
        )),
        "{said}"
    );

    source
        .batch_execute(&format!("COMMIT PREPARED '{gid}'"))
        .await
        .unwrap();
    once("extractor");
    once("scd2-loader");
    let mut v = cmd(&db, "scd2-loader");
    v.arg("verify");
    let out = run(v);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let status: String = db
        .warehouse_client()
        .await
        .query_one(
            "SELECT order_status FROM dim_orders_history WHERE order_key = 3 AND is_current",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "prepared");
    db.cleanup().await;
}
