//! Schema changes of a captured table, followed by the history in both capture modes: ADD
//! COLUMN (with and without a default for the existing rows), RENAME COLUMN, a widening type
//! change, DROP COLUMN, each followed by changes in the new shape; then a narrowing type
//! change the history cannot hold, which stops the loader at it (nothing quarantined) until
//! the history is changed by hand.

use super::{cmd, run, start, stop, text};
use cdc_core::test_utils::{
    actual_history_across, assert_same_history, expected_history_across, install_alter_audit,
    install_audit, Across, Followed, TestDb,
};
use tokio_postgres::Client;

async fn exec(c: &Client, sql: &str) {
    c.batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
}

/// Rows as text `key|value|...` over `cols` (expressions) of `table`, ordered by key.
pub(crate) async fn rows(c: &Client, table: &str, filter: &str, cols: &[&str]) -> Vec<String> {
    let list = cols
        .iter()
        .map(|c| format!("coalesce({c}::text, 'NULL')"))
        .collect::<Vec<_>>()
        .join(" || '|' || ");
    c.query(
        &format!("SELECT id::text || '|' || {list} FROM {table} {filter} ORDER BY id"),
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// The current rows of the history.
async fn current(wh: &Client, cols: &[&str]) -> Vec<String> {
    rows(wh, "public.dim_gadgets_history", "WHERE is_current", cols).await
}

async fn source_rows(src: &Client, cols: &[&str]) -> Vec<String> {
    rows(src, "public.gadgets", "", cols).await
}

/// A test database with `public.gadgets` (made by `create`), captured in `mode`.
struct Gadgets {
    db: TestDb,
    mode: &'static str,
    src: Client,
    /// `CDC_TABLES`.
    tables: &'static str,
}

impl Gadgets {
    async fn new(test: &str, mode: &'static str, create: &str) -> Self {
        let db = TestDb::new(&format!("{test}_{mode}")).await;
        let src = db.source_client().await;
        exec(&src, create).await;
        Gadgets {
            db,
            mode,
            src,
            tables: "public.gadgets",
        }
    }

    /// Runs a binary on the pipeline of `public.gadgets`.
    fn step(&self, binary: &str, args: &[&str]) -> std::process::Output {
        run(self.command(binary, args))
    }

    fn command(&self, binary: &str, args: &[&str]) -> std::process::Command {
        let mut c = cmd(&self.db, binary);
        c.args(args)
            .env("CDC_TABLES", self.tables)
            .env("CDC_CAPTURE_MODE", self.mode);
        c
    }

    /// `step`, which must succeed.
    fn ok(&self, binary: &str, args: &[&str]) -> std::process::Output {
        let out = self.step(binary, args);
        assert!(
            out.status.success(),
            "{} {binary} {args:?}: {}",
            self.mode,
            text(&out)
        );
        out
    }

    /// `extractor setup`, the initial copy captured and applied.
    fn initial_copy_applied(&self) {
        self.ok("extractor", &["setup"]);
        self.ok("extractor", &["--once"]);
        self.ok("scd2-loader", &["--once"]);
    }

    /// Nothing is in `dead_letter/`.
    fn nothing_quarantined(&self) {
        let dead = self.db.log_dir().join("dead_letter");
        assert_eq!(
            std::fs::read_dir(&dead).map(|d| d.count()).unwrap_or(0),
            0,
            "{}: nothing quarantined",
            self.mode
        );
    }

    /// The change-log files waiting in `CDC_LOG_DIR`, in name order.
    fn pending(&self) -> Vec<std::path::PathBuf> {
        let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(self.db.log_dir())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
            .collect();
        files.sort();
        files
    }

    /// File `f` goes bad before the loader reads it (quarantined, the files after it
    /// applied), then is repaired and put back, and applied late.
    fn quarantined_then_put_back(&self, f: &std::path::Path) {
        let good = self.quarantined(f);
        self.put_back(f, &good);
    }

    /// `f` goes bad before the loader reads it: quarantined, the later files applied.
    /// Returns its good text.
    fn quarantined(&self, f: &std::path::Path) -> String {
        let good = std::fs::read_to_string(f).unwrap();
        std::fs::write(f, format!("{good}not a change event\n")).unwrap();
        self.ok("scd2-loader", &["--once"]);
        assert!(self.dead_letter(f).exists(), "{}: quarantined", self.mode);
        assert!(
            self.pending().is_empty(),
            "{}: the later files applied",
            self.mode
        );
        good
    }

    /// Quarantined `f`, repaired (`good`), put back and applied.
    fn put_back(&self, f: &std::path::Path, good: &str) {
        std::fs::write(f, good).unwrap();
        std::fs::remove_file(self.dead_letter(f)).unwrap();
        self.ok("scd2-loader", &["--once"]);
    }

    fn dead_letter(&self, f: &std::path::Path) -> std::path::PathBuf {
        self.db
            .log_dir()
            .join("dead_letter")
            .join(f.file_name().unwrap())
    }

    /// A `rebuild` (a replay of `processed/` in capture order) equals the live history.
    fn rebuild_agrees(&self) {
        let out = self.step("scd2-loader", &["rebuild", "public.gadgets"]);
        assert!(
            String::from_utf8_lossy(&out.stdout)
                .contains("equal to the live history, version for version"),
            "{}: the live history is the in-order one: {}",
            self.mode,
            text(&out)
        );
    }

    /// `verify` passes.
    fn verified(&self) {
        let out = self.ok("scd2-loader", &["verify"]);
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("all invariants hold"),
            "{}: {}",
            self.mode,
            text(&out)
        );
    }
}

#[tokio::test]
async fn the_history_follows_added_renamed_retyped_and_dropped_columns_in_both_modes() {
    for mode in ["timestamp", "logical"] {
        let g = Gadgets::new(
            "e2e_schema",
            mode,
            "CREATE TABLE public.gadgets (id integer PRIMARY KEY, name text NOT NULL,
                 price numeric(10,2) NOT NULL, qty integer,
                 last_updated timestamptz NOT NULL DEFAULT clock_timestamp());
             INSERT INTO public.gadgets SELECT g, 'g' || g, g * 1.5, g FROM generate_series(1, 20) g;",
        )
        .await;
        let (db, src) = (&g.db, &g.src);
        let step = |binary: &str, args: &[&str]| g.step(binary, args);
        let ok = |binary: &str, args: &[&str]| g.ok(binary, args);
        ok("extractor", &["setup"]);
        ok("extractor", &["--once"]);
        exec(
            src,
            "UPDATE public.gadgets SET qty = qty + 100 WHERE id <= 10",
        )
        .await;
        ok("extractor", &["--once"]);
        ok("scd2-loader", &["--once"]);

        // Added columns: one without a default, written to; one whose existing rows get a
        // value, which every live row's history must show from then on.
        exec(src, "ALTER TABLE public.gadgets ADD COLUMN note text").await;
        exec(
            src,
            "UPDATE public.gadgets SET note = 'n' || id WHERE id <= 5",
        )
        .await;
        ok("extractor", &["--once"]);
        exec(
            src,
            "ALTER TABLE public.gadgets ADD COLUMN color text NOT NULL DEFAULT 'red'",
        )
        .await;
        exec(src, "UPDATE public.gadgets SET color = 'blue' WHERE id = 2").await;
        // (Without the event trigger, logical capture learns the existing rows' value from
        // the catalog, which a table rewrite such as the type change below clears: a pass
        // sees the column first here.)
        ok("extractor", &["--once"]);
        // Several changes before the next pass: rename, widen, drop, each with a change after.
        exec(
            src,
            "ALTER TABLE public.gadgets RENAME COLUMN name TO title",
        )
        .await;
        exec(
            src,
            "UPDATE public.gadgets SET title = 'renamed' WHERE id = 6",
        )
        .await;
        exec(
            src,
            "ALTER TABLE public.gadgets ALTER COLUMN price TYPE numeric(12,4)",
        )
        .await;
        exec(src, "UPDATE public.gadgets SET price = 1.2345 WHERE id = 7").await;
        exec(src, "ALTER TABLE public.gadgets DROP COLUMN qty").await;
        exec(
            src,
            "UPDATE public.gadgets SET title = 'after drop' WHERE id = 8",
        )
        .await;
        exec(src, "DELETE FROM public.gadgets WHERE id = 20").await;
        exec(
            src,
            "INSERT INTO public.gadgets (id, title, price, note) VALUES (21, 'new', 2.5, 'x')",
        )
        .await;
        ok("extractor", &["--once"]);
        ok("extractor", &["--once"]);
        ok("scd2-loader", &["--once"]);

        let wh = db.warehouse_client().await;
        let cols = ["title", "price", "note", "color"];
        assert_eq!(
            current(&wh, &cols).await,
            source_rows(src, &cols).await,
            "{mode}: current history equals the source, new columns included"
        );
        // The dropped column is kept: its last values before the drop, NULL after.
        let qty: Vec<Option<i32>> = wh
            .query(
                "SELECT qty FROM public.dim_gadgets_history WHERE id = 8 ORDER BY valid_from",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(qty.first(), Some(&Some(8)), "{mode}: {qty:?}");
        assert_eq!(qty.last(), Some(&None), "{mode}: {qty:?}");
        // A row nobody touched after the ADD ... DEFAULT: the version before it without the
        // value, then one with it.
        let colors: Vec<(Option<String>, bool)> = wh
            .query(
                "SELECT color, is_current FROM public.dim_gadgets_history WHERE id = 15 ORDER BY valid_from",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        assert_eq!(
            colors,
            [(None, false), (Some("red".to_owned()), true)],
            "{mode}"
        );
        let price_type: String = wh
            .query_one(
                "SELECT format_type(atttypid, atttypmod) FROM pg_attribute
                 WHERE attrelid = 'public.dim_gadgets_history'::regclass AND attname = 'price'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(price_type, "numeric(12,4)", "{mode}");
        let kinds: Vec<String> = wh
            .query(
                "SELECT kind || coalesce(':' || column_name, '') FROM public.cdc_schema_changes
                 WHERE history_table = 'public.dim_gadgets_history' ORDER BY id",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        for k in [
            "baseline",
            "add_column:note",
            "add_column:color",
            "rename_column:name",
            "alter_type:price",
            "drop_column:qty",
        ] {
            assert!(kinds.iter().any(|x| x == k), "{mode}: {k} in {kinds:?}");
        }
        g.verified();

        // A type neither holds the other's values of (fewer decimals, more integer digits):
        // the source rounds 1.2345; the history cannot follow exactly.
        exec(
            src,
            "ALTER TABLE public.gadgets ALTER COLUMN price TYPE numeric(14,2);
             UPDATE public.gadgets SET price = 99999999999.99 WHERE id = 9;
             UPDATE public.gadgets SET price = price WHERE id = 7;",
        )
        .await;
        ok("extractor", &["--once"]);
        let out = step("scd2-loader", &["--once"]);
        let said = text(&out);
        assert_eq!(out.status.code(), Some(2), "{mode}: {said}");
        assert!(
            said.contains("dim_gadgets_history cannot follow") && said.contains("numeric(14,2)"),
            "{mode}: {said}"
        );
        g.nothing_quarantined();
        // The user makes the history hold both; the loader goes on from the change.
        exec(
            &wh,
            "ALTER TABLE public.dim_gadgets_history ALTER COLUMN price TYPE numeric",
        )
        .await;
        ok("scd2-loader", &["--once"]);
        // The same values; the history's unconstrained numeric keeps each version's scale.
        let cols = ["title", "trim_scale(price)", "note", "color"];
        assert_eq!(
            current(&wh, &cols).await,
            source_rows(src, &cols).await,
            "{mode}: after the history was widened by hand"
        );
        g.db.cleanup().await;
    }
}

/// A history table dropped by hand: the loader refuses to start (exit 2 naming `rebuild`)
/// instead of re-creating it empty; `rebuild` replays `processed/` (schema changes included)
/// into a table equal to the lost one version for version, and `--replace` puts it back.
#[tokio::test]
async fn a_dropped_history_is_refused_then_rebuilt_version_for_version_in_both_modes() {
    for mode in ["timestamp", "logical"] {
        let g = Gadgets::new(
            "e2e_rebuild",
            mode,
            "CREATE TABLE public.gadgets (id integer PRIMARY KEY, name text NOT NULL,
                 price numeric(10,2) NOT NULL,
                 last_updated timestamptz NOT NULL DEFAULT clock_timestamp());
             INSERT INTO public.gadgets SELECT g, 'g' || g, g * 1.5 FROM generate_series(1, 30) g;",
        )
        .await;
        let (db, src) = (&g.db, &g.src);
        let step = |binary: &str, args: &[&str]| g.step(binary, args);
        let ok = |binary: &str, args: &[&str]| g.ok(binary, args);
        g.initial_copy_applied();
        for (i, sql) in [
            "UPDATE public.gadgets SET price = price + 1 WHERE id % 3 = 0",
            "ALTER TABLE public.gadgets ADD COLUMN color text NOT NULL DEFAULT 'red';
             UPDATE public.gadgets SET color = 'blue' WHERE id <= 4",
            "DELETE FROM public.gadgets WHERE id > 25",
            "ALTER TABLE public.gadgets RENAME COLUMN name TO title;
             UPDATE public.gadgets SET title = 'x' || id WHERE id % 5 = 0",
            "INSERT INTO public.gadgets (id, title, price) VALUES (26, 'back', 1)",
        ]
        .iter()
        .enumerate()
        {
            exec(src, sql).await;
            ok("extractor", &["--once"]);
            if i % 2 == 1 {
                ok("scd2-loader", &["--once"]);
            }
        }
        ok("scd2-loader", &["--once"]);
        let out = ok("scd2-loader", &["rebuild", "public.gadgets"]);
        let said = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            said.contains("equal to the live history, version for version"),
            "{mode}: {said}"
        );

        // The history is dropped by hand; the copy is what it held.
        let wh = db.warehouse_client().await;
        let cols = "id, title, price, color, valid_from, valid_to, is_current, is_deleted, \
                    is_truncated, cdc_operation, batch_id, source_lsn, row_hash";
        exec(
            &wh,
            &format!(
                "CREATE TABLE public.lost AS SELECT {cols} FROM public.dim_gadgets_history;
                 DROP TABLE public.dim_gadgets_history;"
            ),
        )
        .await;
        exec(src, "UPDATE public.gadgets SET price = 0 WHERE id = 1").await;
        ok("extractor", &["--once"]);
        let out = step("scd2-loader", &["--once"]);
        let said = text(&out);
        assert_eq!(out.status.code(), Some(2), "{mode}: {said}");
        assert!(
            // Missing, or empty when the extractor's run records re-created it meanwhile.
            (said.contains("dim_gadgets_history: is missing")
                || said.contains("dim_gadgets_history: is empty"))
                && said.contains("scd2-loader rebuild public.gadgets --replace"),
            "{mode}: {said}"
        );
        let out = ok("scd2-loader", &["rebuild", "public.gadgets", "--replace"]);
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("replaced"),
            "{mode}: {}",
            text(&out)
        );
        let differ: i64 = wh
            .query_one(
                &format!(
                    "SELECT (SELECT count(*) FROM (SELECT * FROM public.lost EXCEPT ALL
                                                   SELECT {cols} FROM public.dim_gadgets_history) a)
                          + (SELECT count(*) FROM (SELECT {cols} FROM public.dim_gadgets_history EXCEPT ALL
                                                   SELECT * FROM public.lost) b)"
                ),
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(differ, 0, "{mode}: the rebuild is the lost history");
        ok("scd2-loader", &["--once"]);
        let cols = ["title", "price", "color"];
        assert_eq!(
            current(&wh, &cols).await,
            source_rows(src, &cols).await,
            "{mode}"
        );
        g.verified();
        g.db.cleanup().await;
    }
}

/// A file quarantined while later files are applied, then repaired and put back: its
/// changes go where they belong in each key's chain (inserts of keys later files update or
/// delete, deletes that ended them), so the history equals one built in order (a rebuild
/// from `processed/`, which replays in capture order) version for version.
#[tokio::test]
async fn a_quarantined_file_put_back_late_makes_the_history_exact_in_both_modes() {
    for mode in ["timestamp", "logical"] {
        let g = Gadgets::new(
            "e2e_late",
            mode,
            "CREATE TABLE public.gadgets (id integer PRIMARY KEY, name text NOT NULL,
                 price numeric(10,2) NOT NULL,
                 last_updated timestamptz NOT NULL DEFAULT clock_timestamp());
             INSERT INTO public.gadgets SELECT g, 'g' || g, g * 1.5 FROM generate_series(1, 20) g;",
        )
        .await;
        let (db, src) = (&g.db, &g.src);
        let ok = |binary: &str, args: &[&str]| g.ok(binary, args);
        g.initial_copy_applied();
        // File A: new keys and updates; then files that update and delete A's keys, delete a
        // key A updated, re-insert one.
        exec(
            src,
            "INSERT INTO public.gadgets SELECT g, 'new' || g, g FROM generate_series(101, 120) g;
             UPDATE public.gadgets SET price = price + 100 WHERE id <= 10;",
        )
        .await;
        ok("extractor", &["--once"]);
        let a = g.pending();
        assert_eq!(a.len(), 1, "{mode}: one file for round A");
        let a = a[0].clone();
        for sql in [
            "UPDATE public.gadgets SET name = 'b' || id WHERE id BETWEEN 101 AND 110 OR id <= 5;
             DELETE FROM public.gadgets WHERE id BETWEEN 111 AND 115;",
            "INSERT INTO public.gadgets VALUES (111, 'again', 1);
             DELETE FROM public.gadgets WHERE id IN (1, 116);",
            "UPDATE public.gadgets SET price = 7 WHERE id IN (2, 117);",
        ] {
            exec(src, sql).await;
            ok("extractor", &["--once"]);
        }
        // A goes bad before the loader reads it; the later files are applied; A is repaired
        // and put back.
        g.quarantined_then_put_back(&a);

        let wh = db.warehouse_client().await;
        let cols = ["name", "price"];
        assert_eq!(
            current(&wh, &cols).await,
            source_rows(src, &cols).await,
            "{mode}: current rows"
        );
        g.verified();
        g.rebuild_agrees();
        let pending_deletes: i64 = wh
            .query_one("SELECT count(*) FROM public.cdc_pending_deletes", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            pending_deletes, 0,
            "{mode}: every remembered delete found its version"
        );
        g.db.cleanup().await;
    }
}

/// The keys of the deletes the loader remembers (`cdc_pending_deletes`).
async fn remembered(wh: &Client) -> Vec<String> {
    wh.query(
        "SELECT key FROM public.cdc_pending_deletes ORDER BY key",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// Deletes of keys the history holds nothing of are remembered while a file could still bring
/// those keys' earlier versions (here: one waits in `dead_letter/`), and forgotten once none
/// can: `cdc_pending_deletes` does not grow with timestamp mode's rows inserted and deleted
/// between two passes.
#[tokio::test]
async fn remembered_deletes_are_kept_while_a_file_is_quarantined_and_forgotten_after_in_both_modes()
{
    for mode in ["timestamp", "logical"] {
        let g = Gadgets::new(
            "e2e_forget",
            mode,
            "CREATE TABLE public.gadgets (id integer PRIMARY KEY, name text NOT NULL,
                 last_updated timestamptz NOT NULL DEFAULT clock_timestamp());
             INSERT INTO public.gadgets SELECT g, 'g' || g FROM generate_series(1, 5) g;",
        )
        .await;
        let src = &g.src;
        let ok = |binary: &str, args: &[&str]| g.ok(binary, args);
        g.initial_copy_applied();
        // File A inserts keys 201-210; the next file deletes them; the one after that has
        // rows inserted and deleted in one transaction.
        exec(
            src,
            "INSERT INTO public.gadgets SELECT g, 'a' || g FROM generate_series(201, 210) g",
        )
        .await;
        ok("extractor", &["--once"]);
        let a = g.pending();
        assert_eq!(a.len(), 1, "{mode}: one file for A");
        let a = a[0].clone();
        exec(
            src,
            "DELETE FROM public.gadgets WHERE id BETWEEN 201 AND 210",
        )
        .await;
        ok("extractor", &["--once"]);
        exec(
            src,
            "INSERT INTO public.gadgets SELECT g, 'short' || g FROM generate_series(301, 320) g;
             DELETE FROM public.gadgets WHERE id BETWEEN 301 AND 320;",
        )
        .await;
        ok("extractor", &["--once"]);
        let good = g.quarantined(&a);
        let wh = g.db.warehouse_client().await;
        let keys = remembered(&wh).await;
        // The rows inserted and deleted in one transaction leave only a delete; so do keys
        // 201-210 in logical mode (timestamp mode's delete carries the row it deleted, which
        // gives the key its version).
        let expected = if mode == "timestamp" { 20 } else { 30 };
        assert_eq!(
            keys.len(),
            expected,
            "{mode}: kept while A is quarantined: {keys:?}"
        );
        // Still kept by a loader that finds nothing to do while A waits.
        ok("scd2-loader", &["--once"]);
        assert_eq!(remembered(&wh).await.len(), expected, "{mode}: still kept");

        // A put back: its keys end at the remembered deletes, and the rest are forgotten.
        g.put_back(&a, &good);
        assert_eq!(
            remembered(&wh).await,
            Vec::<String>::new(),
            "{mode}: forgotten"
        );
        let ends = rows(
            &wh,
            "public.dim_gadgets_history",
            "WHERE id BETWEEN 201 AND 210",
            &["is_current", "is_deleted"],
        )
        .await;
        let want: Vec<String> = (201..=210).map(|k| format!("{k}|false|true")).collect();
        assert_eq!(ends, want, "{mode}: one version each, ended by its delete");
        let cols = ["name"];
        assert_eq!(
            current(&wh, &cols).await,
            source_rows(src, &cols).await,
            "{mode}"
        );
        g.verified();
        g.db.cleanup().await;
    }
}

/// A schema change one table's history cannot hold holds that table only: the other table's
/// changes, in the same files and in later ones, go on into its history; `--once` exits 2,
/// `status` and `verify` name the held table; nothing is quarantined. Once the history can
/// hold the change, the looping loader replays the held table's changes from the archive by
/// itself: its history equals the source, each change applied once.
#[tokio::test]
async fn a_table_held_at_a_schema_change_waits_while_the_others_go_on_in_both_modes() {
    for mode in ["timestamp", "logical"] {
        let mut g = Gadgets::new(
            "e2e_held",
            mode,
            "CREATE TABLE public.gadgets (id integer PRIMARY KEY, price numeric(12,4) NOT NULL,
                 last_updated timestamptz NOT NULL DEFAULT clock_timestamp());
             CREATE TABLE public.sprockets (id integer PRIMARY KEY, name text NOT NULL,
                 last_updated timestamptz NOT NULL DEFAULT clock_timestamp());
             INSERT INTO public.gadgets SELECT g, g * 1.5 FROM generate_series(1, 20) g;
             INSERT INTO public.sprockets SELECT g, 's' || g FROM generate_series(1, 20) g;",
        )
        .await;
        g.tables = "public.gadgets,public.sprockets";
        let (db, src) = (&g.db, &g.src);
        let wh = db.warehouse_client().await;
        let step = |binary: &str, args: &[&str]| g.step(binary, args);
        let ok = |binary: &str, args: &[&str]| g.ok(binary, args);
        let sprockets = || async {
            (
                rows(
                    &wh,
                    "public.dim_sprockets_history",
                    "WHERE is_current",
                    &["name"],
                )
                .await,
                rows(src, "public.sprockets", "", &["name"]).await,
            )
        };
        let gadgets = || async {
            let cols = ["trim_scale(price)"];
            (current(&wh, &cols).await, source_rows(src, &cols).await)
        };
        g.initial_copy_applied();

        // In one file: sprockets changed before and after a narrowing change of gadgets;
        // in the next, both tables changed again.
        exec(
            src,
            "UPDATE public.sprockets SET name = name || '+' WHERE id <= 5;
             ALTER TABLE public.gadgets ALTER COLUMN price TYPE numeric(14,2);
             UPDATE public.gadgets SET price = 99999999999.99 WHERE id = 9;
             UPDATE public.sprockets SET name = 'after' WHERE id = 6;
             DELETE FROM public.sprockets WHERE id = 7;",
        )
        .await;
        ok("extractor", &["--once"]);
        exec(
            src,
            "UPDATE public.gadgets SET price = 1 WHERE id = 1;
             DELETE FROM public.gadgets WHERE id = 2;
             INSERT INTO public.gadgets (id, price) VALUES (21, 2.5);
             UPDATE public.sprockets SET name = 'later' WHERE id = 8;",
        )
        .await;
        ok("extractor", &["--once"]);
        let before: Vec<String> = (1..=20)
            .map(|i| format!("{i}|{}", crate_trim(i as f64 * 1.5)))
            .collect();
        for round in 0..2 {
            let out = step("scd2-loader", &["--once"]);
            let said = text(&out);
            assert_eq!(out.status.code(), Some(2), "{mode} round {round}: {said}");
            assert!(
                said.contains("dim_gadgets_history cannot follow")
                    && said.contains("numeric(14,2)")
                    && said.contains("the other tables go on"),
                "{mode}: {said}"
            );
            let (history, source) = sprockets().await;
            assert_eq!(history, source, "{mode} round {round}: sprockets went on");
            assert_eq!(
                gadgets().await.0,
                before,
                "{mode} round {round}: gadgets stopped at the change"
            );
            if round == 1 {
                // Both name the held table (the loader is not running, nothing is pending).
                let out = step("scd2-loader", &["status"]);
                let said = text(&out);
                assert!(!out.status.success(), "{mode}: {said}");
                assert!(
                    said.contains("held        public.gadgets since")
                        && said.contains("public.gadgets is held at a schema change"),
                    "{mode}: {said}"
                );
                let out = step("scd2-loader", &["verify"]);
                let said = text(&out);
                assert!(!out.status.success(), "{mode}: {said}");
                assert!(
                    said.contains("dim_gadgets_history") && said.contains("held since"),
                    "{mode}: {said}"
                );
            }
            // More of both while gadgets is held.
            exec(
                src,
                &format!(
                    "UPDATE public.sprockets SET name = 'held {round}' WHERE id = 9;
                     UPDATE public.gadgets SET price = price + 1 WHERE id = 3;"
                ),
            )
            .await;
            ok("extractor", &["--once"]);
        }
        g.nothing_quarantined();

        // The user, knowing no price has more than two decimals, gives the history the new
        // type; the looping loader catches gadgets up from the archive by itself, and
        // applies what is pending of both.
        exec(
            &wh,
            "ALTER TABLE public.dim_gadgets_history ALTER COLUMN price TYPE numeric(14,2)",
        )
        .await;
        let mut l = g.command("scd2-loader", &[]);
        l.env("LOADER_POLL_INTERVAL_SECONDS", "0.1")
            .env("LOADER_METRICS_ADDR", "off");
        let loader = crate::start(&mut l);
        let start = std::time::Instant::now();
        loop {
            let held: i64 = wh
                .query_one("SELECT count(*) FROM public.cdc_held_tables", &[])
                .await
                .unwrap()
                .get(0);
            let (h, s) = gadgets().await;
            let (sh, ss) = sprockets().await;
            if held == 0 && h == s && sh == ss {
                break;
            }
            assert!(
                start.elapsed() < std::time::Duration::from_secs(60),
                "{mode}: gadgets not caught up: held {held}, history {h:?}, source {s:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert_eq!(crate::stop(loader), Some(0), "{mode}");
        // Each change once: the key changed after the hold has exactly its versions.
        let v: Vec<String> = wh
            .query(
                "SELECT trim_scale(price)::text || '|' || is_current FROM public.dim_gadgets_history
                 WHERE id = 3 ORDER BY valid_from",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(v, ["4.5|false", "5.5|false", "6.5|true"], "{mode}");
        g.verified();
        g.db.cleanup().await;
    }
}

/// `x` as `trim_scale` writes it.
fn crate_trim(x: f64) -> String {
    let s = format!("{x}");
    s.strip_suffix(".0").map(str::to_owned).unwrap_or(s)
}

/// An enum that gains labels and a domain whose check is relaxed in the source: the
/// warehouse's copies follow (the labels at their place in the source's order, the old check
/// dropped) when a value they refuse arrives, and the file is applied, not quarantined.
#[tokio::test]
async fn enum_labels_and_relaxed_domains_of_the_source_are_followed_in_both_modes() {
    for mode in ["timestamp", "logical"] {
        let g = Gadgets::new(
            "e2e_types",
            mode,
            "CREATE TYPE public.gadget_state AS ENUM ('new', 'paid');
             CREATE DOMAIN public.positive AS integer CHECK (VALUE > 0);
             CREATE TABLE public.gadgets (id integer PRIMARY KEY, state public.gadget_state NOT NULL,
                 qty public.positive, last_updated timestamptz NOT NULL DEFAULT clock_timestamp());
             INSERT INTO public.gadgets SELECT g, 'new', g FROM generate_series(1, 10) g;",
        )
        .await;
        let (db, src) = (&g.db, &g.src);
        let wh = db.warehouse_client().await;
        let ok = |binary: &str, args: &[&str]| g.ok(binary, args);
        g.initial_copy_applied();

        exec(
            src,
            "ALTER TYPE public.gadget_state ADD VALUE 'refunded';
             ALTER TYPE public.gadget_state ADD VALUE 'draft' BEFORE 'new';
             ALTER DOMAIN public.positive DROP CONSTRAINT positive_check;
             ALTER DOMAIN public.positive ADD CONSTRAINT not_negative CHECK (VALUE >= 0);",
        )
        .await;
        exec(
            src,
            "UPDATE public.gadgets SET state = 'refunded' WHERE id <= 3;
             UPDATE public.gadgets SET state = 'draft', qty = 0 WHERE id = 4;
             UPDATE public.gadgets SET state = 'paid' WHERE id = 5;",
        )
        .await;
        ok("extractor", &["--once"]);
        ok("scd2-loader", &["--once"]);
        let cols = ["state", "qty"];
        assert_eq!(
            current(&wh, &cols).await,
            source_rows(src, &cols).await,
            "{mode}"
        );
        g.nothing_quarantined();
        let order = "SELECT enum_range(NULL::public.gadget_state)::text";
        let (w, s): (String, String) = (
            wh.query_one(order, &[]).await.unwrap().get(0),
            src.query_one(order, &[]).await.unwrap().get(0),
        );
        assert_eq!(w, s, "{mode}: the labels in the source's order");
        // The versions of id 4: new/4 (closed), then draft/0.
        let mut v = rows(
            &wh,
            "public.dim_gadgets_history",
            "WHERE id = 4",
            &["state", "qty", "is_current"],
        )
        .await;
        v.sort();
        assert_eq!(v, ["4|draft|0|true", "4|new|4|false"], "{mode}");
        g.verified();
        g.db.cleanup().await;
    }
}

/// A change-log file delivered again later (an extractor killed after its files were
/// durable and before it confirmed writes the same transactions into its next file) changes
/// nothing, also where a transaction changed a key twice and ended where it began, or
/// changed it twice to a new state.
#[tokio::test]
async fn a_file_delivered_again_later_changes_nothing_in_both_modes() {
    for mode in ["timestamp", "logical"] {
        let g = Gadgets::new(
            "e2e_again",
            mode,
            "CREATE TABLE public.gadgets (id integer PRIMARY KEY, qty integer NOT NULL, name text,
                 last_updated timestamptz NOT NULL DEFAULT clock_timestamp());
             INSERT INTO public.gadgets SELECT g, g, 'g' || g FROM generate_series(1, 5) g;",
        )
        .await;
        let (db, src) = (&g.db, &g.src);
        let wh = db.warehouse_client().await;
        let ok = |binary: &str, args: &[&str]| g.ok(binary, args);
        g.initial_copy_applied();
        exec(
            src,
            "BEGIN;
             UPDATE public.gadgets SET qty = 18 WHERE id = 1;
             UPDATE public.gadgets SET qty = 1 WHERE id = 1;
             UPDATE public.gadgets SET qty = 20 WHERE id = 2;
             UPDATE public.gadgets SET qty = 21 WHERE id = 2;
             COMMIT;
             UPDATE public.gadgets SET name = 'later' WHERE id IN (1, 2);
             DELETE FROM public.gadgets WHERE id = 3;",
        )
        .await;
        let processed = db.log_dir().join("processed");
        let before: std::collections::BTreeSet<_> = std::fs::read_dir(&processed)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        ok("extractor", &["--once"]);
        ok("scd2-loader", &["--once"]);
        let history = || async {
            rows(
                &wh,
                "public.dim_gadgets_history",
                "",
                &["qty", "name", "valid_from", "valid_to", "is_deleted"],
            )
            .await
        };
        let applied = history().await;
        // The pass's file, delivered again under a later name.
        let file = std::fs::read_dir(&processed)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| !before.contains(p))
            .expect("the pass's file");
        let name = file.file_name().unwrap().to_string_lossy().to_string();
        std::fs::copy(
            &file,
            db.log_dir().join(name.replace(".jsonl", "_again.jsonl")),
        )
        .unwrap();
        ok("scd2-loader", &["--once"]);
        let mut a = applied.clone();
        let mut b = history().await;
        a.sort();
        b.sort();
        assert_eq!(b, a, "{mode}: the file again changed the history");
        let cols = ["qty", "name"];
        assert_eq!(
            current(&wh, &cols).await,
            source_rows(src, &cols).await,
            "{mode}"
        );
        g.verified();
        g.db.cleanup().await;
    }
}

/// A truncate in a file applied after later ones (quarantined, repaired, put back): every
/// version that spanned it ends there, marked as truncated, also those a later re-insert
/// had closed; the history equals the in-order one (a rebuild), version for version.
#[tokio::test]
async fn a_truncate_put_back_late_ends_the_versions_it_ended_in_both_modes() {
    for mode in ["timestamp", "logical"] {
        let g = Gadgets::new(
            "e2e_late_truncate",
            mode,
            "CREATE TABLE public.gadgets (id integer PRIMARY KEY, name text NOT NULL,
                 last_updated timestamptz NOT NULL DEFAULT clock_timestamp());
             INSERT INTO public.gadgets SELECT g, 'g' || g FROM generate_series(1, 10) g;",
        )
        .await;
        let (db, src) = (&g.db, &g.src);
        let ok = |binary: &str, args: &[&str]| g.ok(binary, args);
        g.initial_copy_applied();
        // One transaction: the truncate, and key 4 written again after it.
        exec(
            src,
            "TRUNCATE public.gadgets; INSERT INTO public.gadgets (id, name) VALUES (4, 're4')",
        )
        .await;
        ok("extractor", &["--once"]);
        let t = g.pending();
        assert_eq!(t.len(), 1, "{mode}: one file for the truncate");
        let t = t[0].clone();
        for sql in [
            "INSERT INTO public.gadgets (id, name) VALUES (1, 're1'), (2, 're2'), (3, 're3')",
            "UPDATE public.gadgets SET name = 'b' || id WHERE id IN (1, 4); DELETE FROM public.gadgets WHERE id = 2;",
        ] {
            exec(src, sql).await;
            ok("extractor", &["--once"]);
        }
        // The truncate's file goes bad before the loader reads it; the later ones are applied;
        // it is repaired and put back.
        g.quarantined_then_put_back(&t);

        let wh = db.warehouse_client().await;
        assert_eq!(
            current(&wh, &["name"]).await,
            source_rows(src, &["name"]).await,
            "{mode}: current rows"
        );
        // Key 3: g3 ended by the truncate, re3 from the re-insert on.
        let mut v = rows(
            &wh,
            "public.dim_gadgets_history",
            "WHERE id = 3",
            &["name", "is_deleted", "is_truncated", "is_current"],
        )
        .await;
        v.sort();
        assert_eq!(
            v,
            ["3|g3|true|true|false", "3|re3|false|false|true"],
            "{mode}"
        );
        let mut v = rows(
            &wh,
            "public.dim_gadgets_history",
            "WHERE id = 4",
            &["name", "is_deleted", "is_truncated", "is_current"],
        )
        .await;
        v.sort();
        assert_eq!(
            v,
            [
                "4|b4|false|false|true",
                "4|g4|true|true|false",
                "4|re4|false|false|false"
            ],
            "{mode}: written again in the truncate's transaction"
        );
        g.verified();
        g.rebuild_agrees();
        g.db.cleanup().await;
    }
}

/// When the ALTER of `xid` (a transaction id) happened as the history must date it: logical
/// mode, a microsecond before the transaction's commit (the changes the same transaction
/// makes after the ALTER are at its commit time); timestamp mode, the time the event trigger
/// recorded in `cdc_alters` (the clock the change-time column uses), read before a pass
/// removes it.
async fn alter_time_us(src: &Client, mode: &str, xid: i64) -> i64 {
    if mode == "logical" {
        commit_time_us(src, xid).await - 1
    } else {
        src.query_one(
            "SELECT (extract(epoch FROM min(altered_at)) * 1000000)::int8 FROM public.cdc_alters
             WHERE table_name = 'gadgets'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
    }
}

/// The commit time of transaction `xid` in microseconds since the epoch
/// (`track_commit_timestamp`).
pub(crate) async fn commit_time_us(src: &Client, xid: i64) -> i64 {
    src.query_one(
        "SELECT (extract(epoch FROM pg_xact_commit_timestamp($1::text::xid)) * 1000000)::int8",
        &[&xid.to_string()],
    )
    .await
    .unwrap()
    .get(0)
}

/// Runs `sql` (ALTERs and changes) in one transaction; returns its id.
async fn in_one_transaction(src: &Client, sql: &str) -> i64 {
    exec(src, &format!("BEGIN; {sql}")).await;
    let xid: i64 = src
        .query_one("SELECT pg_current_xact_id()::text::int8", &[])
        .await
        .unwrap()
        .get(0);
    exec(src, "COMMIT").await;
    xid
}

/// Microseconds since the epoch of a history's timestamp expression.
async fn micros(wh: &Client, sql: &str) -> Vec<i64> {
    wh.query(
        &format!("SELECT (extract(epoch FROM t) * 1000000)::int8 FROM ({sql}) s(t)"),
        &[],
    )
    .await
    .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// `ALTER TABLE … ADD COLUMN … DEFAULT` gives every live row its value at the ALTER, not at
/// the table's next change (logical mode's relation message) or the pass that notices it
/// (timestamp mode): the event trigger `extractor setup` installs records each ALTER in its
/// transaction. Also: several ALTERs in one transaction with a change between them, a table
/// rewrite right after a column was added with a default (its value for the existing rows
/// still known), and an ALTER of a table that is not captured (ignored). In timestamp mode
/// a row changed between the last pass and the ALTER, which the pass reads in the new shape,
/// dates the change just before that row's change instead.
#[tokio::test]
async fn a_schema_change_is_dated_at_its_alter_in_both_modes() {
    for mode in ["timestamp", "logical"] {
        let g = Gadgets::new(
            "e2e_schema_dated",
            mode,
            "CREATE TABLE public.gadgets (id integer PRIMARY KEY, name text NOT NULL,
                 price numeric(10,2) NOT NULL,
                 last_updated timestamptz NOT NULL DEFAULT clock_timestamp());
             INSERT INTO public.gadgets SELECT g, 'g' || g, g * 1.5 FROM generate_series(1, 20) g;
             CREATE TABLE public.other (id integer PRIMARY KEY, x text);
             CREATE PUBLICATION other_pub FOR TABLE public.other;",
        )
        .await;
        g.initial_copy_applied();
        let ok = |binary: &str, args: &[&str]| g.ok(binary, args);

        // The ALTER alone; the table's next change comes later, in its own transaction.
        let xid = in_one_transaction(
            &g.src,
            "ALTER TABLE public.gadgets ADD COLUMN color text NOT NULL DEFAULT 'red'",
        )
        .await;
        let color_at = alter_time_us(&g.src, mode, xid).await;
        exec(
            &g.src,
            "ALTER TABLE public.other ADD COLUMN y text DEFAULT 'y'",
        )
        .await;
        exec(
            &g.src,
            "UPDATE public.gadgets SET name = 'later' WHERE id = 1",
        )
        .await;
        ok("extractor", &["--once"]);
        ok("scd2-loader", &["--once"]);

        // Several ALTERs in one transaction, a change between them, and a rewrite (a type
        // change) after a column added with a default.
        let xid = in_one_transaction(
            &g.src,
            "ALTER TABLE public.gadgets ADD COLUMN size integer NOT NULL DEFAULT 5;
             UPDATE public.gadgets SET color = 'blue' WHERE id = 2;
             ALTER TABLE public.gadgets ADD COLUMN w text DEFAULT 'x';
             ALTER TABLE public.gadgets ALTER COLUMN price TYPE numeric(12,4);",
        )
        .await;
        let size_at = alter_time_us(&g.src, mode, xid).await;
        exec(
            &g.src,
            "UPDATE public.gadgets SET w = 'changed' WHERE id = 3",
        )
        .await;
        ok("extractor", &["--once"]);
        ok("scd2-loader", &["--once"]);

        let wh = g.db.warehouse_client().await;
        let cols = ["name", "price", "color", "size", "w"];
        assert_eq!(
            current(&wh, &cols).await,
            source_rows(&g.src, &cols).await,
            "{mode}: current history equals the source"
        );
        // A key nobody changed: its version before the ALTERs, one from the first (color),
        // one from the second transaction's (size and w), each starting at its ALTER.
        let untouched: Vec<String> = wh
            .query(
                "SELECT concat_ws('|', coalesce(color, 'NULL'), coalesce(size::text, 'NULL'),
                                  coalesce(w, 'NULL'), is_current::text)
                 FROM public.dim_gadgets_history WHERE id = 15 ORDER BY valid_from",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(
            untouched,
            [
                "NULL|NULL|NULL|false",
                "red|NULL|NULL|false",
                "red|5|x|true"
            ],
            "{mode}"
        );
        let starts = micros(
            &wh,
            "SELECT valid_from FROM public.dim_gadgets_history WHERE id = 15 ORDER BY valid_from OFFSET 1",
        )
        .await;
        assert_eq!(
            starts,
            [color_at, size_at],
            "{mode}: the versions start at the ALTERs"
        );
        let recorded = micros(
            &wh,
            "SELECT changed_at FROM public.cdc_schema_changes
             WHERE history_table = 'public.dim_gadgets_history' AND kind = 'add_column' ORDER BY id",
        )
        .await;
        assert_eq!(
            recorded,
            [color_at, size_at, size_at],
            "{mode}: cdc_schema_changes dates each change at its ALTER"
        );
        let other: i64 = wh
            .query_one(
                "SELECT count(*) FROM public.cdc_schema_changes WHERE source_table = 'public.other'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(other, 0, "{mode}: a table not captured is not followed");
        if mode == "timestamp" {
            // A row changed after the last pass and before the ALTER is read in the new shape
            // (with the column's value): the change is dated just before that row's change,
            // never after a change it precedes.
            exec(
                &g.src,
                "UPDATE public.gadgets SET name = 'before' WHERE id = 4",
            )
            .await;
            exec(
                &g.src,
                "ALTER TABLE public.gadgets ADD COLUMN tag text NOT NULL DEFAULT 't'",
            )
            .await;
            let changed: i64 = g
                .src
                .query_one(
                    "SELECT (extract(epoch FROM last_updated) * 1000000)::int8 FROM public.gadgets WHERE id = 4",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            assert!(changed < alter_time_us(&g.src, mode, 0).await);
            ok("extractor", &["--once"]);
            ok("scd2-loader", &["--once"]);
            let tag_from = micros(
                &wh,
                "SELECT valid_from FROM public.dim_gadgets_history WHERE id = 15 AND tag IS NOT NULL",
            )
            .await;
            assert_eq!(tag_from, [changed - 1], "{mode}");
        }
        g.nothing_quarantined();
        g.verified();
        g.db.cleanup().await;
    }
}

/// The columns of `dim_orders_history` the truth across the schema changes below compares.
const ORDERS_FOLLOWED: &[Followed] = &[
    Followed {
        history: "customer_id",
        source_names: &["customer_id"],
        sql_type: "integer",
    },
    Followed {
        history: "product_id",
        source_names: &["product_id"],
        sql_type: "integer",
    },
    Followed {
        history: "quantity",
        source_names: &["quantity"],
        sql_type: "integer",
    },
    Followed {
        history: "unit_price",
        source_names: &["unit_price"],
        sql_type: "numeric(10,2)",
    },
    Followed {
        history: "total_amount",
        source_names: &["total_amount"],
        sql_type: "numeric(12,2)",
    },
    Followed {
        history: "order_status",
        source_names: &["order_status"],
        sql_type: "varchar(40)",
    },
    Followed {
        history: "placed_at",
        source_names: &["order_date", "placed_at"],
        sql_type: "timestamptz",
    },
    Followed {
        history: "source_created_at",
        source_names: &["created_at"],
        sql_type: "timestamptz",
    },
    Followed {
        history: "gift_note",
        source_names: &["gift_note"],
        sql_type: "text",
    },
    Followed {
        history: "discount",
        source_names: &["discount"],
        sql_type: "numeric(10,4)",
    },
    Followed {
        history: "rush",
        source_names: &["rush"],
        sql_type: "boolean",
    },
];

/// Each schema change, followed by updates, with the mutator writing orders around it (in
/// logical mode all along, the ALTERs included; in timestamp mode in bursts between passes,
/// since a pass reads the rows changed before an ALTER in the new shape): the history equals
/// the trigger-fed truth, including the added columns' values (the defaults' from each
/// ALTER on), renamed columns (older states under the old name), widened types (by value) and
/// the dropped column (kept, NULL after), and `verify` passes. The mutator names only the
/// columns it writes, so it goes on through every change here (none renames or drops one of
/// them).
#[tokio::test]
async fn history_equals_the_truth_across_schema_changes_with_the_mutator_running_in_both_modes() {
    let steps = [
        "ALTER TABLE public.orders ADD COLUMN gift_note text NOT NULL DEFAULT 'none',
                                   ADD COLUMN discount numeric(6,2) NOT NULL DEFAULT 0.50;
         UPDATE public.orders SET gift_note = 'wrap' WHERE id % 7 = 0",
        "ALTER TABLE public.orders ADD COLUMN rush boolean;
         UPDATE public.orders SET rush = true WHERE id % 5 = 0",
        "ALTER TABLE public.orders RENAME COLUMN order_date TO placed_at;
         UPDATE public.orders SET placed_at = placed_at - interval '1 day' WHERE id % 6 = 0",
        "ALTER TABLE public.orders ALTER COLUMN order_status TYPE varchar(40),
                                   ALTER COLUMN discount TYPE numeric(10,4);
         UPDATE public.orders SET order_status = 'awaiting_customer_pickup', discount = 0.1234
             WHERE id % 9 = 0",
        "ALTER TABLE public.orders DROP COLUMN rush;
         UPDATE public.orders SET gift_note = 'after drop' WHERE id % 11 = 0",
    ];
    for mode in ["timestamp", "logical"] {
        let db = TestDb::new(&format!("e2e_schema_truth_{mode}")).await;
        let src = db.source_client().await;
        let ok = |binary: &str, args: &[&str]| {
            let mut c = cmd(&db, binary);
            c.args(args).env("CDC_CAPTURE_MODE", mode);
            let out = run(c);
            assert!(
                out.status.success(),
                "{mode} {binary} {args:?}: {}",
                text(&out)
            );
            out
        };
        ok("extractor", &["setup"]);
        ok("extractor", &["--once"]);
        ok("scd2-loader", &["--once"]);
        // The truth starts after the initial copy (no transaction in between).
        install_audit(&src).await;
        install_alter_audit(&src).await;
        let mut passes: Vec<i64> = Vec::new();
        let clock = || async {
            src.query_one(
                "SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::int8",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
        };
        // The initial copy saw every row as the audit starts.
        passes.push(clock().await);
        let burst = |seed: usize| {
            let mut m = cmd(&db, "mutator");
            m.args(["--count", "60", "--seed", &seed.to_string()]);
            let out = run(m);
            assert!(out.status.success(), "{mode} mutator: {}", text(&out));
        };
        let steady = (mode == "logical").then(|| {
            let mut m = cmd(&db, "mutator");
            m.args(["--rate", "100", "--seed", "7"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped());
            start(&mut m)
        });
        for (i, sql) in steps.iter().enumerate() {
            if steady.is_none() {
                burst(2 * i);
            }
            passes.push(clock().await);
            ok("extractor", &["--once"]);
            exec(&src, sql).await;
            if steady.is_none() {
                burst(2 * i + 1);
            }
            passes.push(clock().await);
            ok("extractor", &["--once"]);
            ok("scd2-loader", &["--once"]);
        }
        if let Some(m) = steady {
            assert_eq!(
                stop(m),
                Some(0),
                "{mode}: the mutator went on through every change"
            );
        }
        passes.push(clock().await);
        ok("extractor", &["--once"]);
        ok("scd2-loader", &["--once"]);

        let basis = match mode {
            "logical" => Across::Commits,
            _ => Across::Passes(passes),
        };
        let expected =
            expected_history_across(&src, "public.orders", ORDERS_FOLLOWED, &basis).await;
        let actual = actual_history_across(
            &db.warehouse_client().await,
            "public.dim_orders_history",
            "order_key",
            ORDERS_FOLLOWED,
        )
        .await;
        assert_same_history(&expected, &actual);
        // Traffic went on around the changes: the ALTERs' own versions and the mutator's.
        let versions: usize = actual.values().map(Vec::len).sum();
        let keys = actual.len();
        assert!(
            versions > keys,
            "{mode}: {versions} versions of {keys} keys"
        );
        let out = ok("scd2-loader", &["verify"]);
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("all invariants hold"),
            "{mode}: {}",
            text(&out)
        );
        let dead = db.log_dir().join("dead_letter");
        assert_eq!(
            std::fs::read_dir(&dead).map(|d| d.count()).unwrap_or(0),
            0,
            "{mode}: nothing quarantined"
        );
        db.cleanup().await;
    }
}
