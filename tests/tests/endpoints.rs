//! The HTTP endpoints of the running extractor and loader: `/metrics` moves with the work,
//! `/readyz` tells whether the program can work, `/healthz` that it runs; a port in use stops
//! start-up naming the setting.

use crate::{cmd, free_addr, get, run, start, stop, text, wait_until};
use cdc_core::test_utils::TestDb;
use std::process::Stdio;

fn metrics(addr: &str) -> String {
    match get(addr, "/metrics") {
        Some((200, body)) => body,
        other => panic!("/metrics at {addr}: {other:?}"),
    }
}

/// The sum of the samples of the series whose name and labels start with `series`.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(s, _)| s.starts_with(series))
        .map(|(_, v)| v.parse::<f64>().unwrap())
        .sum()
}

fn has_family(text: &str, name: &str, kind: &str) -> bool {
    text.lines().any(|l| l == format!("# TYPE {name} {kind}"))
}

#[tokio::test]
async fn metrics_of_the_running_extractor_and_loader_move_with_each_pass_and_batch() {
    let db = TestDb::new("e2e_metrics").await;
    let (ex_addr, ld_addr) = (free_addr(), free_addr());
    let mut e = cmd(&db, "extractor");
    e.env("EXTRACTOR_METRICS_ADDR", &ex_addr)
        .env("CDC_EXTRACTION_INTERVAL_SECONDS", "0.2")
        .stderr(Stdio::null());
    let extractor = start(&mut e);
    let mut l = cmd(&db, "scd2-loader");
    l.env("LOADER_METRICS_ADDR", &ld_addr)
        .env("LOADER_POLL_INTERVAL_SECONDS", "0.1")
        .stderr(Stdio::null());
    let loader = start(&mut l);

    for addr in [&ex_addr, &ld_addr] {
        wait_until("ready", || {
            get(addr, "/readyz").is_some_and(|(code, _)| code == 200)
        });
        assert_eq!(get(addr, "/healthz").map(|r| r.0), Some(200));
        assert_eq!(sample(&metrics(addr), "cdc_ready"), 1.0);
    }
    // The initial copy (10 sample rows) captured and applied.
    wait_until("the initial copy in the history", || {
        sample(&metrics(&ld_addr), "cdc_history_versions_inserted_total") >= 10.0
    });
    let ex_before = metrics(&ex_addr);
    let ld_before = metrics(&ld_addr);
    for (name, kind) in [
        ("cdc_capture_pass_duration_seconds", "histogram"),
        ("cdc_capture_passes_total", "counter"),
        ("cdc_capture_events_total", "counter"),
        ("cdc_capture_lag_seconds", "gauge"),
        ("cdc_slot_retained_wal_bytes", "gauge"),
        ("cdc_changelog_files_written_total", "counter"),
        ("cdc_capture_last_success_timestamp_seconds", "gauge"),
    ] {
        assert!(has_family(&ex_before, name, kind), "{name}: {ex_before}");
    }
    for (name, kind) in [
        ("cdc_apply_batch_duration_seconds", "histogram"),
        ("cdc_commit_to_history_delay_seconds", "histogram"),
        ("cdc_apply_batches_total", "counter"),
        ("cdc_history_versions_inserted_total", "counter"),
        ("cdc_history_versions_closed_total", "counter"),
        ("cdc_changelog_pending_files", "gauge"),
        ("cdc_changelog_dead_letter_files", "gauge"),
        ("cdc_apply_lag_seconds", "gauge"),
        ("cdc_apply_last_success_timestamp_seconds", "gauge"),
    ] {
        assert!(has_family(&ld_before, name, kind), "{name}: {ld_before}");
    }
    assert!(
        !has_family(&ld_before, "cdc_capture_passes_total", "counter"),
        "each program lists its own families"
    );
    assert_eq!(
        sample(
            &ex_before,
            "cdc_capture_events_total{table=\"public.orders\",op=\"r\"}"
        ),
        10.0,
        "{ex_before}"
    );

    // Traffic: the counters move.
    let mut m = cmd(&db, "mutator");
    m.args(["--count", "60", "--seed", "7"]);
    let out = run(m);
    assert!(out.status.success(), "{}", text(&out));
    let events = |t: &str| sample(t, "cdc_capture_events_total{table=\"public.orders\"");
    wait_until("the burst captured", || {
        events(&metrics(&ex_addr)) > events(&ex_before)
    });
    let inserted = |t: &str| {
        sample(
            t,
            "cdc_history_versions_inserted_total{table=\"public.orders\"}",
        )
    };
    let ex_after = metrics(&ex_addr);
    wait_until("the burst applied", || {
        let now = metrics(&ld_addr);
        inserted(&now) > inserted(&ld_before)
            && sample(&now, "cdc_changelog_pending_files") == 0.0
            && sample(&now, "cdc_apply_events_total") >= events(&ex_after)
    });
    let ld_after = metrics(&ld_addr);
    for series in [
        "cdc_capture_passes_total{result=\"success\"}",
        "cdc_capture_pass_duration_seconds_count",
        "cdc_changelog_files_written_total",
        "cdc_changelog_bytes_written_total",
    ] {
        assert!(
            sample(&ex_after, series) > sample(&ex_before, series),
            "{series} moved: {ex_after}"
        );
    }
    for series in [
        "cdc_apply_batches_total",
        "cdc_apply_batch_duration_seconds_count",
        "cdc_commit_to_history_delay_seconds_count",
        "cdc_history_versions_closed_total{table=\"public.orders\"}",
        "cdc_apply_files_total{result=\"applied\"}",
    ] {
        assert!(
            sample(&ld_after, series) > sample(&ld_before, series),
            "{series} moved: {ld_after}"
        );
    }
    assert!(sample(&ex_after, "cdc_capture_last_success_timestamp_seconds") > 0.0);
    assert!(sample(&ex_after, "cdc_capture_lag_seconds") >= 0.0);
    assert_eq!(
        sample(&ld_after, "cdc_apply_lag_seconds"),
        0.0,
        "nothing pending"
    );
    assert_eq!(sample(&ld_after, "cdc_errors_total"), 0.0, "{ld_after}");

    // The history holds what the loader counted (once the extractor's later passes, which
    // may still carry the burst's last changes, are applied too).
    let wh = db.warehouse_client().await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let versions: i64 = wh
            .query_one("SELECT count(*) FROM dim_orders_history", &[])
            .await
            .unwrap()
            .get(0);
        let counted = inserted(&metrics(&ld_addr));
        if versions as f64 == counted {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "every inserted version counted once: {versions} versions, {counted} counted"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    assert_eq!(stop(extractor), Some(0));
    assert_eq!(stop(loader), Some(0));
    assert!(
        get(&ld_addr, "/healthz").is_none(),
        "the endpoint stops with the program"
    );
    db.cleanup().await;
}

#[tokio::test]
async fn logical_capture_reports_the_slots_retained_wal_and_its_lag() {
    let db = TestDb::new("e2e_metrics_logical").await;
    let addr = free_addr();
    let mut e = cmd(&db, "extractor");
    e.env("EXTRACTOR_METRICS_ADDR", &addr)
        .env("CDC_CAPTURE_MODE", "logical")
        .env("CDC_EXTRACTION_INTERVAL_SECONDS", "0.2")
        .stderr(Stdio::null());
    let extractor = start(&mut e);
    // The initial copy, then passes reading the slot.
    wait_until("passes reading the slot", || {
        get(&addr, "/metrics")
            .is_some_and(|(_, t)| sample(&t, "cdc_capture_passes_total{result=\"success\"}") >= 3.0)
    });
    let t = metrics(&addr);
    assert_eq!(
        sample(
            &t,
            "cdc_capture_events_total{table=\"public.orders\",op=\"r\"}"
        ),
        10.0,
        "{t}"
    );
    assert!(sample(&t, "cdc_slot_retained_wal_bytes") > 0.0, "{t}");
    let lag = sample(&t, "cdc_capture_lag_seconds");
    assert!(lag.is_finite() && lag >= 0.0, "{t}");
    assert_eq!(stop(extractor), Some(0));
    db.cleanup().await;
}

/// Forwards connections from `listener` to `target` until aborted (then every connection
/// it holds is dropped too).
async fn forward(listener: tokio::net::TcpListener, target: String) {
    let mut conns = tokio::task::JoinSet::new();
    while let Ok((mut inbound, _)) = listener.accept().await {
        let target = target.clone();
        conns.spawn(async move {
            if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_fails_while_the_warehouse_is_unreachable_and_passes_once_it_answers() {
    let db = TestDb::new("e2e_readyz").await;
    let addr = free_addr();
    // The warehouse "moves" to a port where nothing listens yet.
    let wh_addr = free_addr();
    let wh_port = wh_addr.rsplit_once(':').unwrap().1.to_owned();
    let mut l = cmd(&db, "scd2-loader");
    l.env("LOADER_METRICS_ADDR", &addr)
        .env("WAREHOUSE_DB_PORT", &wh_port)
        .env("DB_CONNECT_RETRY_SECONDS", "300")
        .stderr(Stdio::null());
    let loader = start(&mut l);

    wait_until("the endpoint", || get(&addr, "/healthz").is_some());
    let (code, body) = get(&addr, "/readyz").unwrap();
    assert_eq!(code, 503, "{body}");
    wait_until("the warehouse named as the reason", || {
        get(&addr, "/readyz").is_some_and(|(code, body)| {
            code == 503
                && body.contains(&format!(
                    "waiting for the warehouse database at 127.0.0.1:{wh_port}"
                ))
        })
    });
    assert_eq!(sample(&metrics(&addr), "cdc_ready"), 0.0);
    assert_eq!(
        get(&addr, "/healthz").map(|r| r.0),
        Some(200),
        "alive all the same"
    );

    // The warehouse answers on that port: the loader connects, migrates and is ready.
    let listener = tokio::net::TcpListener::bind(&wh_addr).await.unwrap();
    let proxy = tokio::spawn(forward(
        listener,
        format!("{}:{}", db.warehouse.host, db.warehouse.port),
    ));
    wait_until("ready", || {
        get(&addr, "/readyz").is_some_and(|(code, _)| code == 200)
    });
    assert_eq!(sample(&metrics(&addr), "cdc_ready"), 1.0);

    // The warehouse goes away again (every connection dropped): not ready.
    proxy.abort();
    let _ = proxy.await;
    wait_until("not ready after the connection is lost", || {
        get(&addr, "/readyz").is_some_and(|(code, body)| {
            // Lost, then waited for while the loader reconnects.
            code == 503
                && (body.contains("lost the warehouse database connection")
                    || body.contains("waiting for the warehouse database"))
        })
    });

    assert_eq!(stop(loader), Some(0));
    db.cleanup().await;
}

#[tokio::test]
async fn an_endpoint_address_in_use_stops_start_up_with_exit_2_naming_the_setting() {
    let db = TestDb::new("e2e_addr_in_use").await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    for (binary, setting) in [
        ("extractor", "EXTRACTOR_METRICS_ADDR"),
        ("scd2-loader", "LOADER_METRICS_ADDR"),
    ] {
        let mut c = cmd(&db, binary);
        c.env(setting, &addr);
        let out = run(c);
        assert_eq!(out.status.code(), Some(2), "{binary}: {}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(setting) && err.contains(&addr),
            "{binary}: {}",
            text(&out)
        );
    }
    db.cleanup().await;
}
