//! Outages longer than the connect-retry bound, with traffic: the looping extractor and loader
//! wait them out (status says so), nothing is lost, and they catch up by themselves. Each
//! test starts clusters of its own (through `scripts/local-db.sh`, on free ports) so that it
//! can stop and start them.

use crate::{bin, text};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Two clusters of the test's own, removed when dropped.
struct Clusters {
    dir: PathBuf,
    source_port: u16,
    warehouse_port: u16,
}

/// A port nothing listens on, below the kernel's range for outgoing connections: a stopped
/// cluster's port in that range (what binding port 0 gives) can be taken by a client socket
/// before the cluster starts again, and the restart then fails with "address in use".
fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let low: u32 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .filter(|l| *l > 20_100 && *l <= 65_535)
        .unwrap_or(32_768);
    let seed = std::process::id().wrapping_mul(7919)
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
    loop {
        let n = seed.wrapping_add(NEXT.fetch_add(7, Ordering::Relaxed).wrapping_mul(104_729));
        let port = u16::try_from(20_000 + n % (low - 20_000)).unwrap();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

impl Clusters {
    fn start(name: &str) -> Clusters {
        // Under the temporary directory: the clusters run as the `postgres` user when the
        // tests run as root, and it must be able to reach them.
        let dir = std::env::temp_dir().join(format!("cdc-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let c = Clusters {
            dir,
            source_port: free_port(),
            warehouse_port: free_port(),
        };
        c.local_db(&["start"]);
        c
    }

    fn local_db(&self, args: &[&str]) {
        let out = Command::new(workspace_root().join("scripts/local-db.sh"))
            .args(args)
            .env("LOCAL_DB_DIR", self.dir.join("pg"))
            .env("DB_PORT", self.source_port.to_string())
            .env("WAREHOUSE_DB_PORT", self.warehouse_port.to_string())
            .env("DB_USER", "postgres")
            .env("DB_PASSWORD", "postgres")
            .env("LOCAL_DB_FAST", "1")
            .output()
            .unwrap();
        assert!(out.status.success(), "local-db.sh {args:?}: {}", text(&out));
    }

    /// A command for a binary against these clusters, with nothing of the caller's settings.
    fn cmd(&self, name: &str, mode: &str) -> Command {
        let mut c = Command::new(bin(name));
        c.current_dir(&self.dir);
        for (k, _) in std::env::vars() {
            if [
                "DB_",
                "WAREHOUSE_DB_",
                "CDC_",
                "MUTATION_",
                "LOG_",
                "LOADER_",
            ]
            .iter()
            .any(|p| k.starts_with(p))
            {
                c.env_remove(k);
            }
        }
        c.envs([
            ("DB_HOST", "127.0.0.1".to_string()),
            ("DB_PORT", self.source_port.to_string()),
            ("WAREHOUSE_DB_HOST", "127.0.0.1".to_string()),
            ("WAREHOUSE_DB_PORT", self.warehouse_port.to_string()),
            ("DB_USER", "postgres".into()),
            ("DB_PASSWORD", "postgres".into()),
            ("WAREHOUSE_DB_USER", "postgres".into()),
            ("WAREHOUSE_DB_PASSWORD", "postgres".into()),
            (
                "CDC_LOG_DIR",
                self.dir.join("cdc_logs").display().to_string(),
            ),
            (
                "CDC_STATE_DIR",
                self.dir.join("state").display().to_string(),
            ),
            ("CDC_TABLES", "public.*".into()),
            ("MUTATION_TABLES", "all".into()),
            ("CDC_CAPTURE_MODE", mode.into()),
            ("DB_CONNECT_RETRY_SECONDS", "2".into()),
            ("CDC_EXTRACTION_INTERVAL_SECONDS", "0.3".into()),
            ("LOADER_POLL_INTERVAL_SECONDS", "0.2".into()),
            ("LOG_LEVEL", "info".into()),
            ("EXTRACTOR_METRICS_ADDR", "off".into()),
            ("LOADER_METRICS_ADDR", "off".into()),
        ]);
        c
    }

    fn spawn(&self, name: &str, mode: &str) -> Child {
        let log = std::fs::File::create(self.dir.join(format!("{name}.log"))).unwrap();
        self.cmd(name, mode)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    fn run(&self, name: &str, mode: &str, args: &[&str]) -> Output {
        self.cmd(name, mode).args(args).output().unwrap()
    }

    fn logs(&self) -> String {
        ["extractor", "scd2-loader"]
            .iter()
            .map(|n| {
                let log =
                    std::fs::read_to_string(self.dir.join(format!("{n}.log"))).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                format!(
                    "--- {n} (last lines)\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Clusters {
    fn drop(&mut self) {
        self.local_db(&["reset"]);
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Kills the children if the test fails half-way.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn pending_files(dir: &Path) -> usize {
    std::fs::read_dir(dir.join("cdc_logs"))
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".jsonl"))
                .count()
        })
        .unwrap_or(0)
}

fn outages_are_waited_out(mode: &str) {
    let c = Clusters::start(&format!("e2e_outage_{mode}"));
    // The loader refuses a change-log directory that does not exist (a mistyped path); the
    // extractor, started at the same moment, may not have made it yet.
    std::fs::create_dir_all(c.dir.join("cdc_logs")).unwrap();
    let mut procs = Procs(vec![
        c.spawn("extractor", mode),
        c.spawn("scd2-loader", mode),
    ]);
    let alive = |procs: &mut Procs, when: &str, c: &Clusters| {
        for p in &mut procs.0 {
            assert!(
                p.try_wait().unwrap().is_none(),
                "a program exited {when}\n{}",
                c.logs()
            );
        }
    };
    let burst = |seed: &str| {
        let out = c.run("mutator", mode, &["--count", "150", "--seed", seed]);
        assert!(out.status.success(), "{}", text(&out));
    };
    let status =
        || String::from_utf8_lossy(&c.run("scd2-loader", mode, &["status"]).stdout).into_owned();
    burst("1");
    wait_until(
        "the first changes to be applied",
        Duration::from_secs(60),
        || c.dir.join("cdc_logs/processed").exists() && pending_files(&c.dir) == 0,
    );

    // The warehouse goes away for longer than the retry bound (2 s); traffic goes on.
    c.local_db(&["stop", "warehouse"]);
    let outage_began = chrono::Utc::now();
    burst("2");
    std::thread::sleep(Duration::from_secs(8));
    alive(&mut procs, "during the warehouse outage", &c);
    let said = status();
    assert!(
        said.contains("loader waiting for the warehouse database")
            && said.contains("extractor waiting for the warehouse database"),
        "{said}\n{}",
        c.logs()
    );
    assert!(
        pending_files(&c.dir) > 0,
        "capture went on without the warehouse\n{}",
        c.logs()
    );
    let outage_ended = chrono::Utc::now();
    c.local_db(&["start"]);
    wait_until("the backlog to be applied", Duration::from_secs(60), || {
        pending_files(&c.dir) == 0
    });

    // The source goes away for longer than the bound.
    c.local_db(&["stop", "source"]);
    std::thread::sleep(Duration::from_secs(8));
    alive(&mut procs, "during the source outage", &c);
    let said = status();
    assert!(
        said.contains("extractor waiting for the source database"),
        "{said}\n{}",
        c.logs()
    );
    c.local_db(&["start"]);
    burst("3");

    // Caught up: history equals the source, for every table.
    let start = Instant::now();
    loop {
        let out = c.run("scd2-loader", mode, &["verify"]);
        if out.status.success() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "history never caught up with the source: {}\n{}",
            text(&out),
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    alive(&mut procs, "after the outages", &c);
    assert!(!status().contains("waiting for"), "{}", status());

    // The extractor's passes during the warehouse outage reached pipeline_metadata later.
    let out = Command::new("psql")
        .args([
            "-X",
            "-tA",
            "-h",
            "127.0.0.1",
            "-p",
            &c.warehouse_port.to_string(),
            "-U",
            "postgres",
            "-d",
            "warehouse_db",
            "-c",
            &format!(
                "SELECT count(*) FROM pipeline_metadata WHERE pipeline_name = 'cdc_extractor' \
                 AND end_time BETWEEN '{}' AND '{}'",
                outage_began.to_rfc3339(),
                outage_ended.to_rfc3339()
            ),
        ])
        .env("PGPASSWORD", "postgres")
        .output()
        .unwrap();
    let n: i64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(-1);
    assert!(
        n > 0,
        "no extractor run recorded from the outage: {}",
        text(&out)
    );

    for p in &mut procs.0 {
        let ok = Command::new("kill")
            .args(["-TERM", &p.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }
    for p in &mut procs.0 {
        let status = p.wait().unwrap();
        assert_eq!(status.code(), Some(0), "{}", c.logs());
    }
}

#[test]
fn timestamp_outages_of_either_database_are_waited_out_with_nothing_lost() {
    outages_are_waited_out("timestamp");
}

#[test]
fn logical_outages_of_either_database_are_waited_out_with_nothing_lost() {
    outages_are_waited_out("logical");
}
