//! Online re-snapshot (`extractor resnapshot <schema.table>`): rows the capture never saw go
//! (deleted, or changed, with the capture triggers bypassed; tombstones lost), the table is
//! read again while a looping extractor captures traffic on it and on another table, and the
//! history's current rows equal the source again: a version only where a row differs, the
//! lost keys ended at the snapshot's time, the other table untouched by it.

use super::{cmd, run, start, stop, text};
use cdc_core::test_utils::TestDb;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_postgres::Client;

async fn exec(c: &Client, sql: &str) {
    c.batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
}

/// `id|name|qty` of `table`'s rows (`filter` picks), ordered by id.
async fn rows(c: &Client, table: &str, filter: &str) -> Vec<String> {
    super::schema::rows(c, table, filter, &["name", "qty"]).await
}

async fn count(c: &Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).await.unwrap().get(0)
}

const TABLES: &str = "public.gadgets, public.widgets";

fn step(db: &TestDb, mode: &str, binary: &str, args: &[&str]) -> std::process::Output {
    let mut c = cmd(db, binary);
    c.args(args)
        .env("CDC_TABLES", TABLES)
        .env("CDC_CAPTURE_MODE", mode);
    run(c)
}

fn ok(db: &TestDb, mode: &str, binary: &str, args: &[&str]) -> String {
    let out = step(db, mode, binary, args);
    assert!(
        out.status.success(),
        "{mode} {binary} {args:?}: {}",
        text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits (for the event, the bound only stops a hung test) until `f` holds.
async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resnapshot_under_traffic_ends_lost_keys_and_versions_only_changed_rows_in_both_modes() {
    for mode in ["timestamp", "logical"] {
        resnapshot_under_traffic(mode).await;
    }
}

async fn resnapshot_under_traffic(mode: &'static str) {
    let db = TestDb::new(&format!("e2e_resnapshot_{mode}")).await;
    let src = db.source_client().await;
    exec(
        &src,
        "CREATE TABLE public.gadgets (id integer PRIMARY KEY, name text NOT NULL, qty integer,
             last_updated timestamptz NOT NULL DEFAULT clock_timestamp());
         CREATE TABLE public.widgets (id integer PRIMARY KEY, name text NOT NULL, qty integer,
             last_updated timestamptz NOT NULL DEFAULT clock_timestamp());
         INSERT INTO public.gadgets SELECT g, 'g' || g, g FROM generate_series(1, 60) g;
         INSERT INTO public.widgets SELECT g, 'w' || g, g FROM generate_series(1, 60) g;",
    )
    .await;
    ok(&db, mode, "extractor", &["setup"]);
    ok(&db, mode, "extractor", &["--once"]);
    ok(&db, mode, "scd2-loader", &["--once"]);
    let wh = db.warehouse_client().await;
    let loaded = wh
        .query_one(
            "SELECT max(valid_from) FROM public.dim_gadgets_history",
            &[],
        )
        .await
        .unwrap()
        .get::<_, chrono::DateTime<chrono::Utc>>(0);

    // Lost from the capture's view. Timestamp mode: deletes and an update with the triggers
    // bypassed (no tombstone, no new change time), and deletes whose tombstones are gone
    // before a pass. Logical mode: the slot dropped while the same changes are made.
    if mode == "logical" {
        exec(
            &src,
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
             WHERE database = current_database()",
        )
        .await;
    }
    exec(
        &src,
        "SET session_replication_role = replica;
         DELETE FROM public.gadgets WHERE id BETWEEN 41 AND 45;
         UPDATE public.gadgets SET name = 'silent' || id WHERE id BETWEEN 46 AND 48;
         RESET session_replication_role;
         DELETE FROM public.gadgets WHERE id IN (49, 50);",
    )
    .await;
    if mode == "timestamp" {
        exec(&src, "DELETE FROM public.cdc_tombstones").await;
    } else {
        // The lost slot points to the re-snapshot, which creates it again and reads every
        // table.
        let out = step(&db, mode, "extractor", &["--once"]);
        assert!(!out.status.success(), "{mode}: {}", text(&out));
        assert!(
            text(&out).contains("extractor resnapshot --all"),
            "{mode}: {}",
            text(&out)
        );
        let said = ok(&db, mode, "extractor", &["resnapshot", "--all"]);
        assert!(
            said.contains("re-snapshot of public.gadgets, public.widgets taken"),
            "{mode}: {said}"
        );
    }

    // Traffic on both tables (ids 1-30, and new widgets) while a looping extractor runs.
    let mut extractor = cmd(&db, "extractor");
    extractor
        .env("CDC_TABLES", TABLES)
        .env("CDC_CAPTURE_MODE", mode)
        .env("CDC_EXTRACTION_INTERVAL_SECONDS", "0.2")
        .env("EXTRACTOR_METRICS_ADDR", "off");
    let running = start(&mut extractor);
    let stop_traffic = Arc::new(AtomicBool::new(false));
    let traffic = {
        let stop_traffic = stop_traffic.clone();
        let c = db.source_client().await;
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop_traffic.load(Ordering::Relaxed) {
                i += 1;
                let id = 1 + (i % 30);
                c.batch_execute(&format!(
                    "UPDATE public.gadgets SET qty = qty + 1 WHERE id = {id};
                     UPDATE public.widgets SET qty = qty + 1 WHERE id = {id};
                     INSERT INTO public.widgets VALUES ({}, 'new', 0);",
                    1000 + i
                ))
                .await
                .unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            i
        })
    };
    // Some traffic captured before the request.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let said = ok(&db, mode, "extractor", &["resnapshot", "public.gadgets"]);
    assert!(
        said.contains("the running extractor") && said.contains("takes it at its next pass"),
        "{mode}: {said}"
    );
    let request = db.state_dir().join("resnapshot-public.gadgets.request");
    until("the running extractor to take the re-snapshot", || {
        !request.exists()
    })
    .await;
    // More traffic after it, then quiet.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop_traffic.store(true, Ordering::Relaxed);
    let rounds = traffic.await.unwrap();
    assert!(rounds > 0);
    assert_eq!(
        stop(running),
        Some(0),
        "{mode}: the extractor stops cleanly"
    );
    ok(&db, mode, "extractor", &["--once"]);
    ok(&db, mode, "scd2-loader", &["--once"]);

    for (table, history) in [
        ("public.gadgets", "public.dim_gadgets_history"),
        ("public.widgets", "public.dim_widgets_history"),
    ] {
        assert_eq!(
            rows(&wh, history, "WHERE is_current").await,
            rows(&src, table, "").await,
            "{mode}: current history of {table} equals the source"
        );
    }
    // The lost keys ended at one instant (the snapshot's), deleted; the silent updates are
    // versions from it.
    let snapshot_at = count(
        &wh,
        "SELECT count(DISTINCT valid_to) FROM public.dim_gadgets_history
         WHERE id BETWEEN 41 AND 50 AND id NOT IN (46, 47, 48) AND is_deleted",
    )
    .await;
    assert_eq!(
        snapshot_at, 1,
        "{mode}: lost keys end at the snapshot's time"
    );
    assert_eq!(
        count(
            &wh,
            "SELECT count(*) FROM public.dim_gadgets_history WHERE id BETWEEN 41 AND 50 AND is_deleted
               AND valid_to = (SELECT valid_from FROM public.dim_gadgets_history WHERE id = 46 AND is_current)"
        )
        .await,
        7,
        "{mode}: the silent update's version starts where the lost keys end"
    );
    // Untouched rows (31-40, 51-60 of gadgets, 31-60 of widgets): their one version only.
    for (history, filter, n) in [
        (
            "public.dim_gadgets_history",
            "(id BETWEEN 31 AND 40 OR id BETWEEN 51 AND 60)",
            20,
        ),
        ("public.dim_widgets_history", "id BETWEEN 31 AND 60", 30),
    ] {
        assert_eq!(
            count(
                &wh,
                &format!("SELECT count(*) FROM {history} WHERE {filter}")
            )
            .await,
            n,
            "{mode}: an untouched row of {history} gets no new version"
        );
    }
    // The re-snapshots' rows became versions only where the history differed: the silent
    // updates (the traffic's rows were captured, in either order, as the history has them).
    let from_snapshots: Vec<i32> = wh
        .query(
            "SELECT DISTINCT id FROM public.dim_gadgets_history
             WHERE cdc_operation = 'r' AND valid_from > $1 ORDER BY id",
            &[&loaded],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        from_snapshots,
        vec![46, 47, 48],
        "{mode}: versions only where a row differed"
    );
    let out = ok(&db, mode, "scd2-loader", &["verify"]);
    assert!(out.contains("all invariants hold"), "{mode}: {out}");
    let out = ok(&db, mode, "scd2-loader", &["rebuild", "public.gadgets"]);
    assert!(
        out.contains("equal to the live history, version for version"),
        "{mode}: a rebuild replays the re-snapshot: {out}"
    );

    // With no extractor running the command takes the snapshot itself; a second one over a
    // history that equals the source adds nothing.
    let versions = count(&wh, "SELECT count(*) FROM public.dim_gadgets_history").await;
    let said = ok(&db, mode, "extractor", &["resnapshot", "public.gadgets"]);
    assert!(
        said.contains("re-snapshot of public.gadgets taken"),
        "{mode}: {said}"
    );
    assert!(!request.exists(), "{mode}: the request is done");
    ok(&db, mode, "scd2-loader", &["--once"]);
    assert_eq!(
        count(&wh, "SELECT count(*) FROM public.dim_gadgets_history").await,
        versions,
        "{mode}: a re-snapshot of an exact history adds nothing"
    );
    assert_eq!(
        count(&wh, "SELECT count(*) FROM public.cdc_resnapshot_keys").await,
        0,
        "{mode}: the snapshots' keys are forgotten at their ends"
    );

    // A table the pipeline does not capture is refused, naming the setting.
    let out = step(&db, mode, "extractor", &["resnapshot", "public.nothing"]);
    assert_eq!(out.status.code(), Some(2), "{mode}: {}", text(&out));
    assert!(text(&out).contains("CDC_TABLES"), "{mode}: {}", text(&out));

    // A table added to CDC_TABLES takes its initial copy (logical mode: as a re-snapshot),
    // and its changes after.
    exec(
        &src,
        "CREATE TABLE public.things (id integer PRIMARY KEY, name text NOT NULL, qty integer,
             last_updated timestamptz NOT NULL DEFAULT clock_timestamp());
         INSERT INTO public.things SELECT g, 't' || g, g FROM generate_series(1, 10) g;",
    )
    .await;
    let three = format!("{TABLES}, public.things");
    let more = |binary: &str, args: &[&str]| {
        let mut c = cmd(&db, binary);
        c.args(args)
            .env("CDC_TABLES", &three)
            .env("CDC_CAPTURE_MODE", mode);
        let out = run(c);
        assert!(
            out.status.success(),
            "{mode} {binary} {args:?}: {}",
            text(&out)
        );
    };
    more("extractor", &["setup"]);
    more("extractor", &["--once"]);
    exec(
        &src,
        "UPDATE public.things SET qty = 0 WHERE id <= 3; DELETE FROM public.things WHERE id = 10;
         UPDATE public.gadgets SET qty = 0 WHERE id = 1;",
    )
    .await;
    more("extractor", &["--once"]);
    more("scd2-loader", &["--once"]);
    for (table, history) in [
        ("public.gadgets", "public.dim_gadgets_history"),
        ("public.things", "public.dim_things_history"),
    ] {
        assert_eq!(
            rows(&wh, history, "WHERE is_current").await,
            rows(&src, table, "").await,
            "{mode}: current history of {table} equals the source"
        );
    }
    db.cleanup().await;
}

/// Logical mode: changes the snapshot shows that the slot delivers after it (committed before
/// the re-snapshot, decoded in the same pass after its rows), applied a file per batch so that
/// they arrive after the snapshot's versions: the history is the one in order (the changed
/// row's version is its change's, no second version at the snapshot; the deleted key ends at
/// its delete, the new key starts at its insert).
#[tokio::test]
async fn changes_a_resnapshot_shows_that_arrive_after_it_leave_the_history_as_in_order() {
    let mode = "logical";
    let db = TestDb::new("e2e_resnapshot_late").await;
    let src = db.source_client().await;
    exec(
        &src,
        "CREATE TABLE public.gadgets (id integer PRIMARY KEY, name text NOT NULL, qty integer,
             last_updated timestamptz NOT NULL DEFAULT clock_timestamp());
         CREATE TABLE public.widgets (id integer PRIMARY KEY, name text NOT NULL, qty integer,
             last_updated timestamptz NOT NULL DEFAULT clock_timestamp());
         INSERT INTO public.gadgets SELECT g, 'g' || g, g FROM generate_series(1, 20) g;",
    )
    .await;
    ok(&db, mode, "extractor", &["setup"]);
    ok(&db, mode, "extractor", &["--once"]);
    ok(&db, mode, "scd2-loader", &["--once"]);
    // Committed, still in the slot.
    exec(
        &src,
        "UPDATE public.gadgets SET qty = 100 WHERE id = 1;
         DELETE FROM public.gadgets WHERE id = 2;
         INSERT INTO public.gadgets VALUES (21, 'g21', 21);",
    )
    .await;
    let mut c = cmd(&db, "extractor");
    c.args(["resnapshot", "public.gadgets"])
        .env("CDC_TABLES", TABLES)
        .env("CDC_CAPTURE_MODE", mode)
        .env("CDC_MAX_ROWS_PER_FILE", "4");
    let out = run(c);
    assert!(out.status.success(), "{}", text(&out));
    let mut c = cmd(&db, "scd2-loader");
    c.args(["--once"])
        .env("CDC_TABLES", TABLES)
        .env("CDC_CAPTURE_MODE", mode)
        .env("LOADER_MAX_FILES_PER_BATCH", "1");
    let out = run(c);
    assert!(out.status.success(), "{}", text(&out));

    let wh = db.warehouse_client().await;
    assert_eq!(
        rows(&wh, "public.dim_gadgets_history", "WHERE is_current").await,
        rows(&src, "public.gadgets", "").await,
    );
    let versions =
        |id: i32| {
            let wh = &wh;
            async move {
                wh.query(
                "SELECT cdc_operation::text, is_current, is_deleted FROM public.dim_gadgets_history
                 WHERE id = $1 ORDER BY valid_from",
                &[&id],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, bool>(1), r.get::<_, bool>(2)))
            .collect::<Vec<_>>()
            }
        };
    let v = |op: &str, current: bool, deleted: bool| (op.to_owned(), current, deleted);
    assert_eq!(
        versions(1).await,
        vec![v("r", false, false), v("u", true, false)],
        "the update's version, none at the snapshot"
    );
    assert_eq!(
        versions(2).await,
        vec![v("r", false, true)],
        "ended by its delete"
    );
    assert_eq!(
        versions(21).await,
        vec![v("c", true, false)],
        "from its insert"
    );
    assert_eq!(versions(3).await, vec![v("r", true, false)], "untouched");
    let out = ok(&db, mode, "scd2-loader", &["verify"]);
    assert!(out.contains("all invariants hold"), "{out}");
    db.cleanup().await;
}
