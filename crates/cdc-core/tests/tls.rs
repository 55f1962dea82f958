//! TLS to a database, each `sslmode` against a cluster of the test's own with `ssl = on` and a
//! CA made by the test (`test_utils::tls`): what connects, whether it is encrypted (as the
//! server's `pg_stat_ssl` sees it), and what is refused, at once rather than retried.

use cdc_core::db::tls::SslMode;
use cdc_core::db::{self, DbRole, DbSettings};
use cdc_core::error::{error_chain, Error};
use cdc_core::shutdown::Shutdown;
use cdc_core::test_utils::tls::TlsCluster;
use std::path::Path;
use std::time::{Duration, Instant};

/// Whether the server sees this session encrypted.
async fn ssl_in_use(client: &tokio_postgres::Client) -> bool {
    client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

fn settings(c: &TlsCluster, host: &str, mode: SslMode, root: Option<&Path>) -> DbSettings {
    c.settings(DbRole::Source, host, "postgres", mode, root)
}

/// Connects the way the binaries do (`db::connect`, with its retry).
async fn connects(c: &TlsCluster, host: &str, mode: SslMode, root: Option<&Path>) -> bool {
    let db = settings(c, host, mode, root);
    let client = db::connect(&db, &Shutdown::new())
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{mode} via {host}: {}\n--- server log\n{}",
                error_chain(&e),
                c.log()
            )
        });
    ssl_in_use(&client).await
}

/// Connects the way the binaries do and expects a refusal well before the retry bound
/// (30 s): returns the whole error chain.
async fn refused(c: &TlsCluster, host: &str, mode: SslMode, root: Option<&Path>) -> String {
    let db = settings(c, host, mode, root);
    let started = Instant::now();
    let err = match db::connect(&db, &Shutdown::new()).await {
        Ok(client) => panic!(
            "{mode} via {host} with {root:?} connected (ssl = {})",
            ssl_in_use(&client).await
        ),
        Err(e) => e,
    };
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{mode} via {host}: refused at once, not retried ({:?}): {}",
        started.elapsed(),
        error_chain(&err)
    );
    assert!(
        !err.is_retryable(),
        "a TLS refusal is not retryable: {err:?}"
    );
    assert!(
        matches!(err, Error::Db { .. }),
        "a connection failure: {err:?}"
    );
    let text = error_chain(&err);
    assert!(
        text.contains("DB_SSLMODE") && text.contains("DB_SSLROOTCERT"),
        "names the TLS settings: {text}"
    );
    text
}

#[tokio::test]
async fn each_sslmode_reaches_a_tls_server_as_libpq_would() {
    let c = TlsCluster::start(false);
    let ca = Some(c.ca.as_path());
    // Encryption without checks, whatever host the certificate names.
    assert!(connects(&c, "127.0.0.1", SslMode::Require, None).await);
    assert!(connects(&c, "localhost", SslMode::Require, None).await);
    // prefer (the default) takes TLS when the server offers it.
    assert!(connects(&c, "127.0.0.1", SslMode::Prefer, None).await);
    // disable never encrypts.
    assert!(!connects(&c, "127.0.0.1", SslMode::Disable, None).await);
    // verify-full: the CA signed the certificate and it names the host connected to.
    assert!(connects(&c, "localhost", SslMode::VerifyFull, ca).await);
    // verify-ca checks the chain only, so a host the certificate does not name passes.
    assert!(connects(&c, "127.0.0.1", SslMode::VerifyCa, ca).await);
    assert!(connects(&c, "localhost", SslMode::VerifyCa, ca).await);
    // require with a root certificate checks the chain, as libpq does.
    assert!(connects(&c, "127.0.0.1", SslMode::Require, ca).await);

    // The mutator's pool goes through the same connector.
    let pool = db::pool(&settings(&c, "localhost", SslMode::VerifyFull, ca), 2).unwrap();
    let client = pool.get().await.unwrap();
    assert!(ssl_in_use(&client).await);
}

#[tokio::test]
async fn verify_full_refuses_a_host_the_certificate_does_not_name() {
    let c = TlsCluster::start(false);
    // The certificate names localhost; 127.0.0.1 is the same server but not the same name.
    let text = refused(&c, "127.0.0.1", SslMode::VerifyFull, Some(&c.ca)).await;
    assert!(
        // OpenSSL's verify result: "IP address mismatch" (the host is an address).
        text.contains("certificate verify failed") && text.contains("address mismatch"),
        "says why: {text}"
    );
    assert!(
        text.contains("127.0.0.1"),
        "names the host it connected to: {text}"
    );
}

#[tokio::test]
async fn a_certificate_signed_by_another_ca_is_refused() {
    let c = TlsCluster::start(false);
    let other = Some(c.other_ca.as_path());
    for (host, mode) in [
        ("localhost", SslMode::VerifyCa),
        ("localhost", SslMode::VerifyFull),
        ("127.0.0.1", SslMode::VerifyCa),
        // A root certificate makes require and prefer check the chain too (libpq's rule).
        ("localhost", SslMode::Require),
        ("localhost", SslMode::Prefer),
    ] {
        let text = refused(&c, host, mode, other).await;
        assert!(
            text.contains("certificate verify failed"),
            "{mode} via {host}: {text}"
        );
    }
}

#[tokio::test]
async fn a_renewed_root_certificate_is_read_at_the_next_connection() {
    let c = TlsCluster::start(false);
    // One settings value for the whole test, as a running binary has: only the file changes.
    let root = c.dir.join("renewed-ca.crt");
    std::fs::copy(&c.other_ca, &root).unwrap();
    let text = refused(&c, "localhost", SslMode::VerifyFull, Some(&root)).await;
    assert!(text.contains("certificate verify failed"), "{text}");
    std::fs::copy(&c.ca, &root).unwrap();
    assert!(connects(&c, "localhost", SslMode::VerifyFull, Some(&root)).await);
    // Caught mid-renewal (half written, then gone): the certificates last read keep
    // connecting instead of ending the program.
    let pem = std::fs::read(&c.ca).unwrap();
    std::fs::write(&root, &pem[..pem.len() / 2]).unwrap();
    assert!(connects(&c, "localhost", SslMode::VerifyFull, Some(&root)).await);
    std::fs::remove_file(&root).unwrap();
    assert!(connects(&c, "localhost", SslMode::VerifyFull, Some(&root)).await);
    std::fs::copy(&c.other_ca, &root).unwrap();
    refused(&c, "localhost", SslMode::VerifyFull, Some(&root)).await;
}

#[tokio::test]
async fn require_refuses_a_server_without_tls_and_prefer_falls_back_to_plain() {
    let c = TlsCluster::start(false);
    let admin = db::connect(
        &settings(&c, "127.0.0.1", SslMode::Require, None),
        &Shutdown::new(),
    )
    .await
    .unwrap();
    for sql in ["ALTER SYSTEM SET ssl = off", "SELECT pg_reload_conf()"] {
        admin.batch_execute(sql).await.unwrap();
    }
    // The reload is asynchronous: wait until a new session sees it.
    let plain = settings(&c, "127.0.0.1", SslMode::Disable, None);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let client = db::connect(&plain, &Shutdown::new()).await.unwrap();
        let ssl: String = client
            .query_one("SELECT current_setting('ssl')", &[])
            .await
            .unwrap()
            .get(0);
        if ssl == "off" {
            break;
        }
        assert!(Instant::now() < deadline, "ssl = off was not reloaded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!connects(&c, "127.0.0.1", SslMode::Prefer, None).await);
    for mode in [SslMode::Require, SslMode::VerifyCa, SslMode::VerifyFull] {
        let text = refused(&c, "localhost", mode, Some(&c.ca)).await;
        assert!(text.contains("TLS"), "{mode}: {text}");
    }
}
