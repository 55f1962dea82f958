//! The binaries over TLS: a cluster of the test's own that refuses unencrypted connections
//! (`test_utils::tls`), the pipeline run against it with `verify-full`, and what the TLS
//! settings refuse, with exit codes and messages.

use crate::{cmd, run, text};
use cdc_core::db::tls::SslMode;
use cdc_core::db::DbRole;
use cdc_core::test_utils::tls::TlsCluster;
use cdc_core::test_utils::TestDb;
use std::time::{Duration, Instant};

/// Environment variables set for one run of a binary.
type Vars<'a> = &'a [(&'a str, &'a str)];

#[tokio::test]
async fn the_binaries_run_the_pipeline_over_verified_tls_and_refuse_what_does_not_verify() {
    // Two clusters, each with a CA of its own, whose pg_hba.conf rejects every connection
    // without TLS: whatever connects is encrypted.
    let source = TlsCluster::start(true);
    let warehouse = TlsCluster::start(true);
    let full = |cluster: &TlsCluster, role| {
        cluster.settings(
            role,
            "localhost",
            "postgres",
            SslMode::VerifyFull,
            Some(&cluster.ca),
        )
    };
    let db = TestDb::on(
        "e2e_tls",
        full(&source, DbRole::Source),
        full(&warehouse, DbRole::Warehouse),
    )
    .await;
    let env = db.env();
    for (var, want) in [
        ("DB_SSLMODE", "verify-full"),
        ("WAREHOUSE_DB_SSLMODE", "verify-full"),
        ("DB_HOST", "localhost"),
        ("DB_SSLROOTCERT", source.ca.to_str().unwrap()),
        ("WAREHOUSE_DB_SSLROOTCERT", warehouse.ca.to_str().unwrap()),
    ] {
        assert!(env.iter().any(|(k, v)| k == var && v == want), "{env:?}");
    }

    // The whole pipeline with verify-full on both databases.
    for args in [
        &["mutator", "--count", "40", "--seed", "7"][..],
        &["extractor", "setup"],
        &["extractor", "--once"],
        &["scd2-loader", "--once"],
        &["scd2-loader", "verify"],
    ] {
        let mut c = cmd(&db, args[0]);
        c.args(&args[1..]);
        let out = run(c);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", text(&out));
    }
    let mut c = cmd(&db, "scd2-loader");
    c.arg("status");
    let out = run(c);
    // Both databases reached over TLS; unhealthy only because no program runs.
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(
        said.contains("pending files      0")
            && said.contains("extractor is not running")
            && !said.contains("unreachable"),
        "{}",
        text(&out)
    );
    let versions: i64 = db
        .warehouse_client()
        .await
        .query_one("SELECT count(*) FROM dim_orders_history", &[])
        .await
        .unwrap()
        .get(0);
    assert!(versions > 0, "history was written over TLS");

    // Logical capture too: its replication stream is a connection of its own, held to the
    // same settings (verify-full, SCRAM, a server that refuses anything unencrypted).
    let logical = TestDb::on(
        "e2e_tls_logical",
        full(&source, DbRole::Source),
        full(&warehouse, DbRole::Warehouse),
    )
    .await;
    let versions = async || -> i64 {
        logical
            .warehouse_client()
            .await
            .query_one("SELECT count(*) FROM dim_orders_history", &[])
            .await
            .unwrap()
            .get(0)
    };
    let mut copied = 0;
    for args in [
        &["extractor", "setup"][..],
        &["extractor", "--once"],
        &["scd2-loader", "--once"],
        &["mutator", "--count", "40", "--seed", "7"],
        &["extractor", "--once"],
        &["scd2-loader", "--once"],
        &["scd2-loader", "verify"],
    ] {
        if args[0] == "mutator" {
            copied = versions().await;
        }
        let mut c = cmd(&logical, args[0]);
        c.args(&args[1..]).env("CDC_CAPTURE_MODE", "logical");
        let out = run(c);
        assert_eq!(
            out.status.code(),
            Some(0),
            "logical {args:?}: {}",
            text(&out)
        );
    }
    assert!(
        versions().await > copied,
        "changes after the initial copy were streamed over TLS"
    );
    logical.cleanup().await;

    // verify-ca does not check the host name: 127.0.0.1, which the certificate does not name,
    // passes.
    let mut c = cmd(&db, "scd2-loader");
    c.arg("--once")
        .env("WAREHOUSE_DB_HOST", "127.0.0.1")
        .env("WAREHOUSE_DB_SSLMODE", "verify-ca");
    let out = run(c);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    // Refusals are reported at once (the retry bound is 60 s), naming the settings.
    let refusals: [(&str, Vars, &[&str]); 3] = [
        // verify-full and a host the certificate does not name.
        (
            "scd2-loader",
            &[("WAREHOUSE_DB_HOST", "127.0.0.1")],
            &[
                "WAREHOUSE_DB_SSLMODE",
                "certificate verify failed",
                "mismatch",
            ],
        ),
        // A certificate from a CA we do not trust.
        (
            "extractor",
            &[("DB_SSLROOTCERT", source.other_ca.to_str().unwrap())],
            &["DB_SSLROOTCERT", "certificate verify failed"],
        ),
        // No TLS at all: the server refuses (its pg_hba.conf says so).
        (
            "mutator",
            &[("DB_SSLMODE", "disable")],
            &["DB_SSLMODE", "no encryption"],
        ),
    ];
    for (binary, vars, says) in refusals {
        let mut c = cmd(&db, binary);
        c.args(if binary == "mutator" {
            &["--count", "1"][..]
        } else {
            &["--once"]
        })
        .envs(vars.iter().copied());
        let started = Instant::now();
        let out = run(c);
        let all = text(&out);
        assert_eq!(out.status.code(), Some(1), "{binary} {vars:?}: {all}");
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{binary} {vars:?}: refused at once, not retried: {all}"
        );
        for s in says {
            assert!(all.contains(s), "{binary} {vars:?} says {s:?}: {all}");
        }
        assert!(
            !all.contains(cdc_core::test_utils::tls::PASSWORD),
            "never prints the password: {all}"
        );
    }
    db.cleanup().await;
}

#[tokio::test]
async fn a_bad_tls_setting_stops_start_up_with_exit_2_naming_it() {
    let db = TestDb::new("e2e_tls_settings").await;
    let missing = db.dir.join("no-such-ca.crt");
    let not_pem = db.dir.join("not-a-ca.crt");
    std::fs::write(&not_pem, "not a certificate\n").unwrap();
    let cases: [(&str, Vars, &str); 6] = [
        ("extractor", &[("DB_SSLMODE", "sometimes")], "DB_SSLMODE"),
        (
            "scd2-loader",
            &[("WAREHOUSE_DB_SSLMODE", "allow")],
            "WAREHOUSE_DB_SSLMODE",
        ),
        ("mutator", &[("DB_SSLMODE", "verify-ca")], "DB_SSLROOTCERT"),
        (
            "scd2-loader",
            &[("WAREHOUSE_DB_SSLMODE", "verify-full")],
            "WAREHOUSE_DB_SSLROOTCERT",
        ),
        (
            "extractor",
            &[
                ("DB_SSLMODE", "verify-full"),
                ("DB_SSLROOTCERT", missing.to_str().unwrap()),
            ],
            "DB_SSLROOTCERT",
        ),
        (
            "scd2-loader",
            &[("WAREHOUSE_DB_SSLROOTCERT", not_pem.to_str().unwrap())],
            "WAREHOUSE_DB_SSLROOTCERT",
        ),
    ];
    for (binary, vars, named) in cases {
        let mut c = cmd(&db, binary);
        c.envs(vars.iter().copied());
        let out = run(c);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{binary} {vars:?}: {}",
            text(&out)
        );
        assert!(
            err.contains(&format!("invalid setting {named}")),
            "{binary} {vars:?} names {named}: {}",
            text(&out)
        );
    }
    db.cleanup().await;
}
