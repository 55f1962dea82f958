//! `extractor setup` prepares any table for either capture mode, idempotently; a start on an
//! unprepared table stops with exit 2 naming the table and `extractor setup`.

use crate::{cmd, run, text};
use cdc_core::test_utils::TestDb;

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test]
async fn setup_prepares_a_new_table_for_timestamp_capture_and_a_start_without_it_is_refused() {
    let db = TestDb::new("e2e_setup_ts").await;
    let source = db.source_client().await;
    source
        .batch_execute(
            "CREATE TABLE public.items (sku text, shop int, name text,
                 last_updated timestamptz NOT NULL DEFAULT clock_timestamp(), PRIMARY KEY (sku, shop));
             INSERT INTO public.items VALUES ('a', 1, 'first'), ('b', 1, 'second');
             CREATE TABLE public.no_time (id int PRIMARY KEY)",
        )
        .await
        .unwrap();
    let extractor = |args: &[&str], tables: &str| {
        let mut c = cmd(&db, "extractor");
        c.args(args).env("CDC_TABLES", tables);
        run(c)
    };

    let out = extractor(&["--once"], "public.items");
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        stderr(&out).contains("public.items") && stderr(&out).contains("extractor setup"),
        "{}",
        text(&out)
    );

    for _ in 0..2 {
        let out = extractor(&["setup"], "public.items");
        assert!(out.status.success(), "{}", text(&out));
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(said.contains("trg_items_tombstone"), "{}", text(&out));
    }
    let out = extractor(&["setup"], "public.no_time");
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        stderr(&out).contains("public.no_time") && stderr(&out).contains("last_updated"),
        "{}",
        text(&out)
    );

    // Prepared: captured, applied, and a delete and a key change are followed.
    let out = extractor(&["--once"], "public.items");
    assert!(out.status.success(), "{}", text(&out));
    source
        .batch_execute(
            "DELETE FROM public.items WHERE sku = 'a'; UPDATE public.items SET shop = 2 WHERE sku = 'b'",
        )
        .await
        .unwrap();
    let out = extractor(&["--once"], "public.items");
    assert!(out.status.success(), "{}", text(&out));
    let mut c = cmd(&db, "scd2-loader");
    c.args(["--once"]).env("CDC_TABLES", "public.items");
    let out = run(c);
    assert!(out.status.success(), "{}", text(&out));
    let wh = db.warehouse_client().await;
    let rows = wh
        .query(
            "SELECT sku, shop, is_current, is_deleted FROM public.dim_items_history ORDER BY sku, shop, valid_from",
            &[],
        )
        .await
        .unwrap();
    let got: Vec<(String, i32, bool, bool)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(
        got,
        [
            ("a".into(), 1, false, true),
            ("b".into(), 1, false, true),
            ("b".into(), 2, true, false)
        ]
    );
    let mut c = cmd(&db, "scd2-loader");
    c.args(["verify"]).env("CDC_TABLES", "public.items");
    let out = run(c);
    assert!(out.status.success(), "{}", text(&out));
    db.cleanup().await;
}

#[tokio::test]
async fn a_timestamp_start_on_a_table_without_the_truncate_trigger_is_refused_until_setup() {
    // A table prepared by an older `extractor setup` (change-time and delete triggers only).
    let db = TestDb::new("e2e_setup_truncate").await;
    let source = db.source_client().await;
    source
        .batch_execute("DROP TRIGGER trg_orders_truncate ON public.orders")
        .await
        .unwrap();
    let out = run({
        let mut c = cmd(&db, "extractor");
        c.args(["--once"]);
        c
    });
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = stderr(&out);
    assert!(
        err.contains("public.orders")
            && err.contains("truncate trigger")
            && err.contains("extractor setup"),
        "{}",
        text(&out)
    );
    let out = run({
        let mut c = cmd(&db, "extractor");
        c.args(["setup"]);
        c
    });
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("trg_orders_truncate"),
        "{}",
        text(&out)
    );
    let out = run({
        let mut c = cmd(&db, "extractor");
        c.args(["--once"]);
        c
    });
    assert!(out.status.success(), "{}", text(&out));
    db.cleanup().await;
}

#[tokio::test]
async fn a_timestamp_start_on_a_table_with_the_earlier_single_delete_trigger_is_refused_until_setup(
) {
    // A table prepared by an older `extractor setup`: one delete trigger, without the WHEN
    // that tells the deleting transaction's own rows (they would become versions).
    let db = TestDb::new("e2e_setup_delete_pair").await;
    let source = db.source_client().await;
    source
        .batch_execute(
            "DROP TRIGGER trg_orders_tombstone_own ON public.orders;
             CREATE OR REPLACE TRIGGER trg_orders_tombstone AFTER DELETE ON public.orders
                 FOR EACH ROW EXECUTE FUNCTION public.cdc_record_delete();",
        )
        .await
        .unwrap();
    let extractor = |arg: &str| {
        let mut c = cmd(&db, "extractor");
        c.arg(arg);
        run(c)
    };
    let out = extractor("--once");
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = stderr(&out);
    assert!(
        err.contains("public.orders")
            && err.contains("pair of delete triggers")
            && err.contains("extractor setup"),
        "{}",
        text(&out)
    );
    let out = extractor("setup");
    assert!(out.status.success(), "{}", text(&out));
    let out = extractor("--once");
    assert!(out.status.success(), "{}", text(&out));
    // Now a row inserted and deleted in one transaction leaves nothing.
    source
        .batch_execute(
            "BEGIN;
             INSERT INTO orders (id, customer_id, product_id, quantity, unit_price) VALUES (990, 1, 1, 1, 1.00);
             DELETE FROM orders WHERE id = 990;
             COMMIT;",
        )
        .await
        .unwrap();
    assert!(extractor("--once").status.success());
    let out = run({
        let mut c = cmd(&db, "scd2-loader");
        c.arg("--once");
        c
    });
    assert!(out.status.success(), "{}", text(&out));
    let versions: i64 = db
        .warehouse_client()
        .await
        .query_one(
            "SELECT count(*) FROM dim_orders_history WHERE order_key = 990",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(versions, 0);
    db.cleanup().await;
}

#[tokio::test]
async fn setup_prepares_a_table_for_logical_capture() {
    let db = TestDb::new("e2e_setup_lg").await;
    let source = db.source_client().await;
    source
        .batch_execute("CREATE TABLE public.notes (id bigint PRIMARY KEY, body text)")
        .await
        .unwrap();
    let extractor = |args: &[&str]| {
        let mut c = cmd(&db, "extractor");
        c.args(args)
            .env("CDC_TABLES", "public.notes")
            .env("CDC_CAPTURE_MODE", "logical");
        run(c)
    };
    let out = extractor(&["--once"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        stderr(&out).contains("public.notes") && stderr(&out).contains("extractor setup"),
        "{}",
        text(&out)
    );
    for _ in 0..2 {
        let out = extractor(&["setup"]);
        assert!(out.status.success(), "{}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("REPLICA IDENTITY FULL"),
            "{}",
            text(&out)
        );
    }
    let out = extractor(&["--once"]);
    assert!(out.status.success(), "{}", text(&out));
    db.cleanup().await;
}

#[tokio::test]
async fn a_slot_this_pipeline_did_not_create_is_refused() {
    let db = TestDb::new("e2e_foreign_slot").await;
    // Another pipeline's slot under the name this one is configured with.
    db.source_client()
        .await
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&db.name],
        )
        .await
        .unwrap();
    let mut c = cmd(&db, "extractor");
    c.args(["--once"]).env("CDC_CAPTURE_MODE", "logical");
    let out = run(c);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(stderr(&out).contains("CDC_SLOT_NAME"), "{}", text(&out));
    // The other pipeline's slot was left as it was: nothing confirmed, no initial copy taken.
    assert!(
        !db.state_dir()
            .join(format!("extractor-{}.json", "public.orders"))
            .exists(),
        "{}",
        text(&out)
    );
    // Once dropped, this pipeline creates its own and captures.
    let mut c = cmd(&db, "extractor");
    c.args(["drop-slot"]).env("CDC_CAPTURE_MODE", "logical");
    assert!(run(c).status.success());
    let mut c = cmd(&db, "extractor");
    c.args(["--once"]).env("CDC_CAPTURE_MODE", "logical");
    let out = run(c);
    assert!(out.status.success(), "{}", text(&out));
    db.cleanup().await;
}

#[tokio::test]
async fn a_loader_given_fewer_tables_than_the_extractor_stops_without_quarantining() {
    let db = TestDb::new("e2e_fewer_tables").await;
    let mut c = cmd(&db, "extractor");
    c.args(["--once"]).env("CDC_TABLES", "public.*");
    let out = run(c);
    assert!(out.status.success(), "{}", text(&out));
    let mut c = cmd(&db, "scd2-loader");
    c.args(["--once"]).env("CDC_TABLES", "public.orders");
    let out = run(c);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(stderr(&out).contains("CDC_TABLES"), "{}", text(&out));
    let dead = db.log_dir().join("dead_letter");
    assert_eq!(std::fs::read_dir(&dead).map(|d| d.count()).unwrap_or(0), 0);
    // With the extractor's tables the same files apply.
    let mut c = cmd(&db, "scd2-loader");
    c.args(["--once"]).env("CDC_TABLES", "public.*");
    let out = run(c);
    assert!(out.status.success(), "{}", text(&out));
    db.cleanup().await;
}

#[tokio::test]
async fn a_table_added_after_the_logical_initial_copy_takes_its_copy_and_one_left_out_is_refused() {
    let db = TestDb::new("e2e_added_table").await;
    let extractor = |tables: &str, args: &[&str]| {
        let mut c = cmd(&db, "extractor");
        c.args(args)
            .env("CDC_TABLES", tables)
            .env("CDC_CAPTURE_MODE", "logical");
        run(c)
    };
    let out = extractor("public.orders,public.customers", &["--once"]);
    assert!(out.status.success(), "{}", text(&out));
    // A new table matching `public.*`: its initial copy, as a re-snapshot.
    let out = extractor("public.*", &["--once"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        stderr(&out).contains("re-snapshot taken table=public.order_items"),
        "{}",
        text(&out)
    );
    // A table left out would stay current in the history without its changes.
    let out = extractor("public.orders,public.order_items", &["--once"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        stderr(&out).contains("would stop delivering public.customers")
            && stderr(&out).contains("drop-slot"),
        "{}",
        text(&out)
    );
    db.cleanup().await;
}

/// Change logs, archives and progress hold business data: owner-only files and directories.
#[cfg(unix)]
#[tokio::test]
async fn files_holding_data_are_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let db = TestDb::new("e2e_file_modes").await;
    for binary in ["extractor", "scd2-loader"] {
        let mut c = cmd(&db, binary);
        c.arg("--once");
        let out = run(c);
        assert!(out.status.success(), "{binary}: {}", text(&out));
    }
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let processed = db.log_dir().join("processed");
    let archived: Vec<_> = std::fs::read_dir(&processed)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(!archived.is_empty());
    for p in archived {
        assert_eq!(mode(&p), 0o600, "{}", p.display());
    }
    let progress = db.state_dir().join("extractor-public.orders.json");
    assert_eq!(mode(&progress), 0o600);
    for d in [db.log_dir(), processed, db.state_dir()] {
        assert_eq!(mode(&d), 0o700, "{}", d.display());
    }
    db.cleanup().await;
}

/// A pipeline owns its publication and change-log directory: another pipeline (another
/// `CDC_PIPELINE_NAME`) is refused them with exit 2, and `drop-slot` leaves them alone.
#[tokio::test]
async fn another_pipelines_publication_and_change_log_directory_are_refused() {
    let db = TestDb::new("e2e_ownership").await;
    let first = {
        let mut c = cmd(&db, "extractor");
        c.args(["--once"]).env("CDC_CAPTURE_MODE", "logical");
        run(c)
    };
    assert!(first.status.success(), "{}", text(&first));
    let other_slot = format!("{}_b", db.name);
    let other = |args: &[&str], own_dirs: bool| {
        let mut c = cmd(&db, "extractor");
        c.args(args)
            .env("CDC_CAPTURE_MODE", "logical")
            .env("CDC_PIPELINE_NAME", "billing")
            .env("CDC_SLOT_NAME", &other_slot);
        if own_dirs {
            c.env("CDC_LOG_DIR", db.dir.join("billing_logs"))
                .env("CDC_STATE_DIR", db.dir.join("billing_state"));
        }
        run(c)
    };
    // Same change-log directory: refused before anything is captured.
    let out = other(&["--once"], false);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        stderr(&out).contains("CDC_LOG_DIR") && stderr(&out).contains("pipeline 'cdc'"),
        "{}",
        text(&out)
    );
    // Its own directories but the first pipeline's publication: refused, no slot created.
    let out = other(&["--once"], true);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        stderr(&out).contains("CDC_PUBLICATION") && stderr(&out).contains("pipeline cdc"),
        "{}",
        text(&out)
    );
    let out = other(&["drop-slot"], true);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let source = db.source_client().await;
    let pubs: i64 = source
        .query_one(
            "SELECT count(*) FROM pg_publication WHERE pubname = 'cdc_test_pub'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        pubs, 1,
        "drop-slot of another pipeline left the publication"
    );
    let slots: i64 = source
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
            &[&other_slot],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 0);
    // The loader of another pipeline is refused the directory; a missing one is refused too.
    let mut c = cmd(&db, "scd2-loader");
    c.args(["--once"]).env("CDC_PIPELINE_NAME", "billing");
    let out = run(c);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(stderr(&out).contains("CDC_LOG_DIR"), "{}", text(&out));
    let mut c = cmd(&db, "scd2-loader");
    c.args(["--once"])
        .env("CDC_LOG_DIR", db.dir.join("cdc_lgos"));
    let out = run(c);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        stderr(&out).contains("CDC_LOG_DIR") && stderr(&out).contains("does not exist"),
        "{}",
        text(&out)
    );
    // The first pipeline is unaffected.
    let mut c = cmd(&db, "scd2-loader");
    c.args(["--once"]);
    let out = run(c);
    assert!(out.status.success(), "{}", text(&out));
    db.cleanup().await;
}

/// A second extractor of a running pipeline exits 2 naming the running one, and the running
/// one's files are untouched.
#[tokio::test]
async fn a_second_extractor_is_refused_while_one_runs() {
    let db = TestDb::new("e2e_second_extractor").await;
    let mut c = cmd(&db, "extractor");
    c.env("CDC_EXTRACTION_INTERVAL_SECONDS", "0.2")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut first = c.spawn().expect("start extractor");
    let lock = db.log_dir().join(".extractor.lock");
    let pid = first.id().to_string();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    // Started and past its own start-up cleanup: it holds the lock and has written its
    // first (snapshot) file.
    let captured = || {
        std::fs::read_dir(db.log_dir()).is_ok_and(|d| {
            d.flatten().any(|e| {
                e.file_name().to_string_lossy().ends_with(".jsonl")
                    && !e.file_name().to_string_lossy().starts_with('.')
            })
        })
    };
    while std::fs::read_to_string(&lock).unwrap_or_default() != pid || !captured() {
        assert!(
            std::time::Instant::now() < deadline,
            "extractor never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // A leftover-looking temporary file must survive the second one's start.
    let temp = db.log_dir().join(".tmp-in-flight.jsonl");
    std::fs::write(&temp, "{}\n").unwrap();
    let mut c = cmd(&db, "extractor");
    c.args(["--once"]);
    let out = run(c);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        stderr(&out).contains("another extractor is running") && stderr(&out).contains(&pid),
        "{}",
        text(&out)
    );
    assert!(
        temp.exists(),
        "the second extractor removed the first one's file"
    );
    assert!(
        first.try_wait().unwrap().is_none(),
        "the first extractor died"
    );
    first.kill().unwrap();
    first.wait().unwrap();
    std::fs::remove_file(&temp).unwrap();
    db.cleanup().await;
}

/// A progress file whose watermark is ahead of the source's clock would skip changes: exit 2
/// naming the file.
#[tokio::test]
async fn a_progress_file_from_the_future_is_refused() {
    let db = TestDb::new("e2e_future_progress").await;
    let once = || {
        let mut c = cmd(&db, "extractor");
        c.arg("--once");
        run(c)
    };
    let out = once();
    assert!(out.status.success(), "{}", text(&out));
    let file = db.state_dir().join("extractor-public.orders.json");
    let mut p: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let ts = p["watermark"]["ts_us"].as_i64().unwrap();
    p["watermark"]["ts_us"] = (ts + 86_400_000_000).into();
    std::fs::write(&file, p.to_string()).unwrap();
    let out = once();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        stderr(&out).contains("later than the source's clock")
            && stderr(&out).contains("extractor-public.orders.json"),
        "{}",
        text(&out)
    );
    db.cleanup().await;
}

/// A role that may not create event triggers (not a superuser) still prepares a table for
/// logical capture: setup says the event trigger is not installed and what that means, and
/// a schema change is then dated as before it, by the table's next change.
#[tokio::test]
async fn setup_without_a_superuser_says_the_event_trigger_is_not_installed() {
    let db = TestDb::new("e2e_setup_no_super").await;
    let source = db.source_client().await;
    let role = format!("{}_r", db.name);
    source
        .batch_execute(&format!(
            "DROP EVENT TRIGGER cdc_schema_change;
             CREATE ROLE {role} LOGIN REPLICATION PASSWORD 'not-a-superuser';
             GRANT CREATE ON DATABASE {db} TO {role};
             CREATE TABLE public.notes (id bigint PRIMARY KEY, body text);
             INSERT INTO public.notes VALUES (1, 'a'), (2, 'b');
             ALTER TABLE public.notes OWNER TO {role};",
            db = db.name
        ))
        .await
        .unwrap();
    let as_role = |binary: &str, args: &[&str]| {
        let mut c = cmd(&db, binary);
        c.args(args)
            .env("CDC_TABLES", "public.notes")
            .env("CDC_CAPTURE_MODE", "logical")
            .env("DB_USER", &role)
            .env("DB_PASSWORD", "not-a-superuser");
        let out = run(c);
        assert!(out.status.success(), "{binary} {args:?}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let said = as_role("extractor", &["setup"]);
    assert!(
        said.contains("REPLICA IDENTITY FULL")
            && said.contains("event trigger cdc_schema_change NOT installed")
            && said.contains("superuser"),
        "{said}"
    );
    as_role("extractor", &["--once"]);
    as_role("scd2-loader", &["--once"]);
    // Without the trigger, the column's versions start at the table's next change.
    source
        .batch_execute("ALTER TABLE public.notes ADD COLUMN color text NOT NULL DEFAULT 'red'")
        .await
        .unwrap();
    let xid: i64 = {
        source
            .batch_execute("BEGIN; UPDATE public.notes SET body = 'c' WHERE id = 1")
            .await
            .unwrap();
        let x = source
            .query_one("SELECT pg_current_xact_id()::text::int8", &[])
            .await
            .unwrap()
            .get(0);
        source.batch_execute("COMMIT").await.unwrap();
        x
    };
    as_role("extractor", &["--once"]);
    as_role("scd2-loader", &["--once"]);
    let next_change = crate::schema::commit_time_us(&source, xid).await;
    let wh = db.warehouse_client().await;
    let red_from: i64 = wh
        .query_one(
            "SELECT (extract(epoch FROM valid_from) * 1000000)::int8 FROM public.dim_notes_history
             WHERE id = 2 AND is_current AND color = 'red'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(red_from, next_change - 1);
    let mut admin = db.extractor_config().source;
    admin.dbname = "postgres".into();
    db.cleanup().await;
    cdc_core::test_utils::connect(&admin)
        .await
        .batch_execute(&format!("DROP ROLE {role}"))
        .await
        .unwrap();
}
