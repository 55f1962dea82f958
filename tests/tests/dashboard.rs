//! The loader's dashboard: its JSON API against a real warehouse (the history of a key is the
//! key's history rows, a table as of a time is the SQL answer), the page while the warehouse
//! is away, and the page in a real browser — headless Chromium driven through WebDriver —
//! on a running pipeline of the demo's three tables.

use crate::{cmd, free_addr, get, run, start, stop, text, wait_until, Running};
use cdc_core::test_utils::{workspace_root, TestDb};
use chrono::{DateTime, Duration as Span, Utc};
use serde_json::Value;
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `GET path` with a `Host` header of the caller's choice.
fn get_as(addr: &str, host: &str, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    (
        head.split(' ').nth(1).unwrap().parse().unwrap(),
        body.to_owned(),
    )
}

/// `GET path` answered with JSON and `code`.
fn api(addr: &str, path: &str, code: u16) -> Value {
    let (got, body) = get(addr, path).unwrap_or_else(|| panic!("{path}: no answer"));
    assert_eq!(got, code, "{path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
}

/// Percent-encodes a query value.
fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn loader_with_dashboard(db: &TestDb, addr: &str) -> Running {
    let mut l = cmd(db, "scd2-loader");
    l.env("LOADER_METRICS_ADDR", addr)
        .env("LOADER_POLL_INTERVAL_SECONDS", "0.1")
        .env("CDC_TABLES", "public.*")
        .stderr(Stdio::null());
    start(&mut l)
}

/// The status once every table has history and nothing is pending.
fn caught_up(addr: &str) -> Value {
    let mut last = Value::Null;
    wait_until("every table's history, nothing pending", || {
        let Some((200, body)) = get(addr, "/api/status") else {
            return false;
        };
        last = serde_json::from_str(&body).unwrap();
        let tables = last["tables"].as_array().unwrap();
        tables.len() == 3
            && tables.iter().all(|t| t["versions"].as_i64() > Some(0))
            && last["apply"]["pending_count"] == 0
    });
    last
}

/// The history tables of the demo, with their key columns.
const HISTORIES: [(&str, &str, &[&str]); 3] = [
    ("public.orders", "dim_orders_history", &["order_key"]),
    ("public.customers", "dim_customers_history", &["id"]),
    (
        "public.order_items",
        "dim_order_items_history",
        &["order_id", "line_no"],
    ),
];

/// The key (as the API takes it) of the key of `history` with the most versions, preferring
/// one whose newest version ended in a delete when `deleted` (else one that did not).
async fn busiest_key(
    wh: &tokio_postgres::Client,
    history: &str,
    keys: &[&str],
    deleted: bool,
) -> String {
    let cols = keys.join(", ");
    let text_cols = keys
        .iter()
        .map(|k| format!("{k}::text"))
        .collect::<Vec<_>>()
        .join(", ");
    let row = wh
        .query_one(
            &format!(
                "SELECT {text_cols} FROM {history} GROUP BY {cols}
                 ORDER BY (array_agg(is_deleted ORDER BY valid_from DESC))[1] = $1 DESC,
                          count(*) DESC, {cols} LIMIT 1"
            ),
            &[&deleted],
        )
        .await
        .unwrap();
    let parts: Vec<String> = (0..keys.len()).map(|i| row.get(i)).collect();
    if parts.len() == 1 {
        parts[0].clone()
    } else {
        serde_json::to_string(&parts).unwrap()
    }
}

fn column<'a>(rows: &'a Value, name: &str) -> Vec<&'a Value> {
    let i = rows["columns"]
        .as_array()
        .unwrap()
        .iter()
        .position(|c| c == name)
        .unwrap_or_else(|| panic!("no column {name}: {rows}"));
    rows["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| &r["values"][i])
        .collect()
}

fn surrogate_keys(rows: &Value) -> Vec<i64> {
    column(rows, "surrogate_key")
        .iter()
        .map(|v| v.as_str().unwrap().parse().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_gives_each_keys_history_rows_and_each_table_as_sql_has_it_at_a_time() {
    let db = TestDb::new("e2e_dashboard_api").await;
    // Two bursts, each captured: keys get several versions, some end in a delete.
    for seed in ["5", "6"] {
        let mut m = cmd(&db, "mutator");
        m.args(["--count", "150", "--seed", seed])
            .env("MUTATION_TABLES", "all");
        let out = run(m);
        assert!(out.status.success(), "{}", text(&out));
        let mut e = cmd(&db, "extractor");
        e.arg("--once").env("CDC_TABLES", "public.*");
        let out = run(e);
        assert!(out.status.success(), "{}", text(&out));
    }
    let addr = free_addr();
    let loader = loader_with_dashboard(&db, &addr);
    let status = caught_up(&addr);
    assert_eq!(status["warehouse"]["reachable"], true, "{status}");
    assert_eq!(status["capture"]["mode"], "timestamp", "{status}");
    assert_eq!(status["capture"]["slot"]["state"], "missing", "{status}");
    assert!(
        status["runs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["program"] == "scd2_loader"),
        "{status}"
    );

    let wh = db.warehouse_client().await;
    for (table, history, keys) in HISTORIES {
        // Every column of the history but the loader's bookkeeping.
        let expected: BTreeSet<String> = wh
            .query(
                "SELECT column_name::text FROM information_schema.columns
                 WHERE table_schema = 'public' AND table_name = $1
                   AND column_name NOT IN ('row_hash', 'created_at', 'updated_at')",
                &[&history],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let matched = keys
            .iter()
            .enumerate()
            .map(|(i, k)| format!("{k}::text = ${}", i + 1))
            .collect::<Vec<_>>()
            .join(" AND ");
        for deleted in [false, true] {
            let key = busiest_key(&wh, history, keys, deleted).await;
            let h = api(
                &addr,
                &format!("/api/history?table={table}&key={}", enc(&key)),
                200,
            );
            let columns: BTreeSet<String> = h["columns"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c.as_str().unwrap().to_owned())
                .collect();
            assert_eq!(columns, expected, "{table}");
            let parts: Vec<String> = if keys.len() == 1 {
                vec![key.clone()]
            } else {
                serde_json::from_str(&key).unwrap()
            };
            let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = parts
                .iter()
                .map(|p| p as &(dyn tokio_postgres::types::ToSql + Sync))
                .collect();
            let rows = wh
                .query(
                    &format!(
                        "SELECT surrogate_key, valid_from, valid_to, is_current, is_deleted
                         FROM {history} WHERE {matched} ORDER BY valid_from"
                    ),
                    &params,
                )
                .await
                .unwrap();
            assert!(!rows.is_empty());
            assert_eq!(
                surrogate_keys(&h),
                rows.iter().map(|r| r.get::<_, i64>(0)).collect::<Vec<_>>(),
                "{table} key {key}: the key's history rows, oldest first"
            );
            for (api_row, row) in h["rows"].as_array().unwrap().iter().zip(&rows) {
                let from: DateTime<Utc> = row.get(1);
                let to: Option<DateTime<Utc>> = row.get(2);
                assert_eq!(api_row["key"], key.as_str());
                assert_eq!(
                    api_row["valid_from"]
                        .as_str()
                        .unwrap()
                        .parse::<DateTime<Utc>>()
                        .unwrap(),
                    from
                );
                assert_eq!(
                    api_row["valid_to"]
                        .as_str()
                        .map(|t| t.parse::<DateTime<Utc>>().unwrap()),
                    to
                );
                assert_eq!(api_row["is_current"], row.get::<_, bool>(3));
                assert_eq!(api_row["is_deleted"], row.get::<_, bool>(4));
            }
            assert_eq!(
                rows.last().unwrap().get::<_, bool>(4),
                deleted,
                "{table}: a key whose chain ended in a delete, and one that did not"
            );
        }

        // As of: before anything, at each change time and just before it, and now.
        let times: Vec<DateTime<Utc>> = wh
            .query(
                &format!("SELECT DISTINCT valid_from FROM {history} ORDER BY 1"),
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let mut instants = vec![times[0] - Span::seconds(1), Utc::now()];
        for t in times.iter().step_by((times.len() / 6).max(1)) {
            instants.push(*t);
            instants.push(*t - Span::microseconds(1));
        }
        let deleted_at: Option<DateTime<Utc>> = wh
            .query_one(
                &format!("SELECT max(valid_to) FROM {history} WHERE is_deleted"),
                &[],
            )
            .await
            .unwrap()
            .get(0);
        // A key is gone as of its delete time.
        instants.extend(deleted_at);
        for at in instants {
            let mut expected: Vec<i64> = wh
                .query(
                    &format!(
                        "SELECT surrogate_key FROM {history}
                         WHERE valid_from <= $1 AND (valid_to IS NULL OR valid_to > $1)"
                    ),
                    &[&at],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
            expected.sort();
            let r = api(
                &addr,
                &format!(
                    "/api/as-of?table={table}&at={}&limit=2000",
                    enc(&at.to_rfc3339())
                ),
                200,
            );
            assert_eq!(r["truncated"], false);
            let mut got = surrogate_keys(&r);
            got.sort();
            assert_eq!(got, expected, "{table} as of {at}");
        }
        // A limit bounds the answer and says so.
        let r = api(
            &addr,
            &format!(
                "/api/as-of?table={table}&at={}&limit=1",
                enc(&Utc::now().to_rfc3339())
            ),
            200,
        );
        assert_eq!(r["rows"].as_array().unwrap().len(), 1);
        assert_eq!(r["truncated"], true);
    }

    // Refusals: a table that is not configured, a key its type refuses, a composite key of
    // the wrong arity, a time that is not RFC 3339, a DNS name other than localhost.
    for (path, code) in [
        ("/api/history?table=pg_catalog.pg_authid&key=1", 404),
        ("/api/history?table=public.orders&key=1%27%20OR%201=1", 400),
        ("/api/history?table=public.order_items&key=1", 400),
        ("/api/as-of?table=public.orders&at=yesterday", 400),
        (
            "/api/as-of?table=public.orders&at=2026-01-01T00:00:00Z&limit=0",
            400,
        ),
    ] {
        let body = api(&addr, path, code);
        assert!(
            body["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{body}"
        );
    }
    assert_eq!(get_as(&addr, "rebound.example:80", "/api/status").0, 403);
    assert_eq!(get_as(&addr, "localhost", "/api/status").0, 200);

    assert_eq!(stop(loader), Some(0));
    db.cleanup().await;
}

#[tokio::test]
async fn the_page_loads_and_says_so_while_the_warehouse_is_unreachable() {
    let db = TestDb::new("e2e_dashboard_down").await;
    let addr = free_addr();
    let nowhere = free_addr();
    let mut l = cmd(&db, "scd2-loader");
    l.env("LOADER_METRICS_ADDR", &addr)
        .env("WAREHOUSE_DB_PORT", nowhere.rsplit_once(':').unwrap().1)
        .env("WAREHOUSE_DB_PASSWORD", "s3cret-Pa55")
        .env("DB_CONNECT_RETRY_SECONDS", "300")
        .stderr(Stdio::null());
    let loader = start(&mut l);
    wait_until("the endpoint", || get(&addr, "/healthz").is_some());
    let (code, page) = get(&addr, "/").unwrap();
    assert_eq!(code, 200);
    assert!(page.contains("CDC Historical Warehouse") && page.contains("/assets/app.js"));
    for asset in ["/assets/app.js", "/assets/style.css"] {
        assert_eq!(get(&addr, asset).map(|r| r.0), Some(200), "{asset}");
    }
    let status = api(&addr, "/api/status", 200);
    assert_eq!(status["warehouse"]["reachable"], false, "{status}");
    assert!(
        status["warehouse"]["address"]
            .as_str()
            .unwrap()
            .ends_with(&format!(
                "{}/{}",
                nowhere.rsplit_once(':').unwrap().1,
                db.name
            )),
        "{status}"
    );
    assert_eq!(status["ready"], false, "{status}");
    // The source answers: the tables are described, their counts unknown.
    assert_eq!(status["tables"][0]["table"], "public.orders", "{status}");
    assert!(status["tables"][0]["versions"].is_null(), "{status}");
    assert!(!status.to_string().contains("s3cret-Pa55"), "{status}");
    let body = api(&addr, "/api/history?table=public.orders&key=1", 503);
    assert!(!body.to_string().contains("s3cret-Pa55"), "{body}");
    assert_eq!(stop(loader), Some(0));
    db.cleanup().await;
}

// ---- the page in a real browser -------------------------------------------------------

/// Debian's Chromium and its WebDriver (`apt-get install chromium chromium-driver`; `.ci/run`
/// installs them); `CHROMIUM` / `CHROMEDRIVER` name others.
fn browser_binaries() -> (PathBuf, PathBuf) {
    let find = |var: &str, path: &str| {
        let p = std::env::var_os(var).map_or_else(|| PathBuf::from(path), PathBuf::from);
        assert!(
            p.exists(),
            "{} is missing: the dashboard test needs headless Chromium and its WebDriver \
             (Debian: apt-get install -y chromium chromium-driver; .ci/run installs them), \
             or {var} naming it",
            p.display()
        );
        p
    };
    (
        find("CHROMIUM", "/usr/bin/chromium"),
        find("CHROMEDRIVER", "/usr/bin/chromedriver"),
    )
}

/// chromedriver and the Chromium it starts, with a profile directory of their own: dropping
/// it (also when the test fails) kills the driver and every process started with that
/// profile, and removes the profile.
struct Browser {
    driver: Running,
    profile: PathBuf,
}

impl Browser {
    fn start(dir: &Path) -> (Browser, String) {
        let (_, chromedriver) = browser_binaries();
        let profile = dir.join("chromium-profile");
        let _ = std::fs::remove_dir_all(&profile);
        std::fs::create_dir_all(&profile).unwrap();
        let addr = free_addr();
        let port = addr.rsplit_once(':').unwrap().1.to_owned();
        let mut c = Command::new(chromedriver);
        c.arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let browser = Browser {
            driver: start(&mut c),
            profile,
        };
        // It listens once it is ready for sessions (it keeps connections open, so its
        // answers are not read here).
        wait_until("chromedriver", || {
            std::net::TcpStream::connect(&addr).is_ok()
        });
        (browser, format!("http://{addr}"))
    }

    /// Processes whose command line names this browser's profile (Chromium and its helpers).
    fn processes(&self) -> Vec<u32> {
        let needle = self.profile.to_string_lossy().into_owned();
        std::fs::read_dir("/proc")
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                    .filter(|pid| {
                        std::fs::read(format!("/proc/{pid}/cmdline"))
                            .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.0.kill();
        let _ = self.driver.0.wait();
        for _ in 0..50 {
            let left = self.processes();
            if left.is_empty() {
                break;
            }
            for pid in left {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// Polls `f` (a look at the page) until it gives a value; the bound only stops a hung test.
async fn eventually<T, F>(what: &str, mut f: impl FnMut() -> F) -> T
where
    F: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How many versions the history holds of order `key`.
async fn order_versions(wh: &tokio_postgres::Client, key: &str) -> i64 {
    wh.query_one(
        "SELECT count(*) FROM dim_orders_history WHERE order_key = $1::text::int",
        &[&key],
    )
    .await
    .unwrap()
    .get(0)
}

async fn texts(page: &fantoccini::Client, css: &str) -> Vec<String> {
    let mut out = Vec::new();
    for e in page
        .find_all(fantoccini::Locator::Css(css))
        .await
        .unwrap_or_default()
    {
        out.push(e.text().await.unwrap_or_default());
    }
    out
}

/// A figure the page shows in seconds: "0.42 s", "12.3 s", "4 m 5 s".
fn is_duration(s: &str) -> bool {
    let s = s.trim();
    s.ends_with(" s") && s.chars().next().is_some_and(|c| c.is_ascii_digit())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_of_a_running_pipeline_shows_every_table_its_lag_and_a_keys_timeline() {
    use fantoccini::Locator::Css;
    let _ = browser_binaries();
    let db = TestDb::new("e2e_dashboard_browser").await;
    let addr = free_addr();
    let mut e = cmd(&db, "extractor");
    e.env("CDC_TABLES", "public.*")
        .env("CDC_EXTRACTION_INTERVAL_SECONDS", "0.2")
        .stderr(Stdio::null());
    let extractor = start(&mut e);
    let loader = loader_with_dashboard(&db, &addr);
    // The initial copy first: traffic it would take in (a busy machine can start it after
    // the mutator is done) would leave every order a single version.
    caught_up(&addr);
    let mut m = cmd(&db, "mutator");
    m.args(["--count", "200", "--seed", "12"])
        .env("MUTATION_TABLES", "all");
    let out = run(m);
    assert!(out.status.success(), "{}", text(&out));
    caught_up(&addr);
    let wh = db.warehouse_client().await;
    // An order with several versions: its timeline has a bar for each. (Nothing pending
    // does not mean the extractor has passed the mutator's last changes yet: wait for them.)
    let started = std::time::Instant::now();
    let (key, versions) = loop {
        let key = busiest_key(&wh, "dim_orders_history", &["order_key"], false).await;
        let versions = order_versions(&wh, &key).await;
        if versions >= 2 {
            break (key, versions);
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "order {key} has {versions} versions"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // The key's versions once the pipeline has caught up with the mutator's last change:
    // the mutator has stopped, so once the history holds as many versions over 2 s (ten
    // capture intervals), nothing is on its way.
    let total = || async {
        wh.query_one("SELECT count(*) FROM public.dim_orders_history", &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    let mut seen = total().await;
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        caught_up(&addr);
        let now = total().await;
        if now == seen {
            break;
        }
        seen = now;
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the history keeps growing"
        );
    }
    let versions = order_versions(&wh, &key).await.max(versions);

    let (browser, webdriver) = Browser::start(&db.dir);
    let (chromium, _) = browser_binaries();
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": chromium,
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--window-size=1400,2100",
                format!("--user-data-dir={}", browser.profile.display()),
            ],
        }),
    );
    let page =
        fantoccini::ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&webdriver)
            .await
            .expect("a WebDriver session of headless Chromium");
    page.goto(&format!("http://{addr}/")).await.unwrap();

    // Every table, with its versions counted.
    for (table, _, _) in HISTORIES {
        let css = format!("#tables tr[data-table=\"{table}\"] td.versions");
        let shown = eventually(&format!("{table} in the tables"), || async {
            let t = texts(&page, &css).await.pop()?;
            (t.replace(',', "").parse::<i64>().ok()? > 0).then_some(t)
        })
        .await;
        assert!(!shown.is_empty());
    }
    // Lag figures: the apply lag card, and each table's capture lag (timestamp mode).
    let lag = eventually("the apply lag", || async {
        texts(&page, "#apply-lag")
            .await
            .pop()
            .filter(|t| is_duration(t))
    })
    .await;
    assert!(is_duration(&lag), "{lag}");
    for t in texts(&page, "#tables td.capture-lag").await {
        assert!(is_duration(&t), "capture lag {t:?}");
    }
    assert_eq!(texts(&page, "#ready").await, ["ready"]);

    // The history browser: the order's versions as a timeline, a bar per version.
    page.find(Css("#hb-table"))
        .await
        .unwrap()
        .select_by_value("public.orders")
        .await
        .unwrap();
    page.find(Css("#hb-keys .key-part"))
        .await
        .unwrap()
        .send_keys(&key)
        .await
        .unwrap();
    page.find(Css("#history-form button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let bars = eventually("the key's timeline", || async {
        let bars = page.find_all(Css("#timeline rect.version")).await.ok()?;
        (!bars.is_empty()).then_some(bars)
    })
    .await;
    assert_eq!(
        bars.len() as i64,
        versions,
        "a bar per version of order {key}"
    );
    assert_eq!(
        texts(&page, "#versions tbody tr").await.len() as i64,
        versions,
        "a row per version"
    );
    bars[0].click().await.unwrap();
    let shot = page.screenshot().await.unwrap();
    let dir = workspace_root().join("target").join("dashboard");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("dashboard.png"), &shot).unwrap();
    assert!(shot.starts_with(b"\x89PNG"), "a PNG screenshot");

    // The table as it was when the order's first version began: the SQL answer's rows.
    let at: String = page
        .find(Css("#asof-at"))
        .await
        .unwrap()
        .prop("value")
        .await
        .unwrap()
        .unwrap();
    let at_time: DateTime<Utc> = at.parse().unwrap();
    let expected: i64 = wh
        .query_one(
            "SELECT count(*) FROM dim_orders_history
             WHERE valid_from <= $1 AND (valid_to IS NULL OR valid_to > $1)",
            &[&at_time],
        )
        .await
        .unwrap()
        .get(0);
    page.find(Css("#asof-form button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let rows = eventually("the table as of a time", || async {
        let msg = texts(&page, "#asof-msg").await.pop()?;
        msg.contains("as of")
            .then_some(texts(&page, "#asof tbody tr").await.len())
    })
    .await;
    assert_eq!(rows as i64, expected.min(200), "orders as of {at}");
    assert!(
        texts(&page, "#asof tbody tr")
            .await
            .iter()
            .any(|r| r.split_whitespace().next() == Some(key.as_str())),
        "order {key} was there when its first version began"
    );
    std::fs::write(
        dir.join("dashboard-as-of.png"),
        page.screenshot().await.unwrap(),
    )
    .unwrap();

    page.close().await.unwrap();
    drop(browser);
    assert_eq!(stop(extractor), Some(0));
    assert_eq!(stop(loader), Some(0));
    db.cleanup().await;
}
