//! A throw-away PostgreSQL cluster with `ssl = on`, for the TLS tests: a CA and a server
//! certificate made with the `openssl` command in a temporary directory (the certificate names
//! `localhost` only, not `127.0.0.1`), the cluster on a free port of its own, stopped and
//! removed when dropped, a failing test included (and, should the test process be killed,
//! by the next test that starts one).
//!
//! `scripts/local-db.sh` always starts the two pipeline clusters on fixed ports without TLS;
//! this starts one cluster the same way (server binaries under `PG_BIN` or
//! `/usr/lib/postgresql/*/bin`, run as the `postgres` OS user when root, since initdb refuses
//! root) with what these tests need.

use crate::db::tls::{SslMode, TlsSettings};
use crate::db::{DbRole, DbSettings, Secret};
use std::net::TcpListener;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

/// The cluster's superuser and password.
pub const USER: &str = "postgres";
pub const PASSWORD: &str = "tls-test-password";

/// A running TLS cluster of one test. Dropping it stops the server and removes its directory.
pub struct TlsCluster {
    /// The temporary directory holding everything (certificates, data directory, log).
    pub dir: PathBuf,
    pub port: u16,
    /// The CA that signed the server's certificate.
    pub ca: PathBuf,
    /// A CA of its own that signed nothing the server has.
    pub other_ca: PathBuf,
    data: PathBuf,
    bin: PathBuf,
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// `cmd` as the cluster's OS owner: `postgres` when we are root.
fn as_owner(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn run(what: &str, c: &mut Command) -> Output {
    let out = c
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {c:?}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({:?}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn pg_bin() -> PathBuf {
    if let Some(b) = std::env::var_os("PG_BIN") {
        return PathBuf::from(b);
    }
    let mut candidates = vec![PathBuf::from("/usr/lib/postgresql/15/bin")];
    if let Ok(dirs) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut others: Vec<PathBuf> = dirs.flatten().map(|d| d.path().join("bin")).collect();
        others.sort();
        others.reverse();
        candidates.extend(others);
    }
    candidates
        .into_iter()
        .find(|d| d.join("initdb").exists() && d.join("pg_ctl").exists())
        .expect("PostgreSQL server binaries (initdb, pg_ctl) not found; set PG_BIN")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Makes `<name>.key` and a self-signed CA certificate `<name>.crt` in `dir`.
fn make_ca(dir: &Path, name: &str) -> PathBuf {
    let crt = dir.join(format!("{name}.crt"));
    run(
        "openssl: CA",
        Command::new("openssl")
            .current_dir(dir)
            .args(["req", "-x509", "-new", "-nodes", "-days", "2"])
            .args(["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"])
            .args([
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.crt"),
            ])
            .args(["-subj", &format!("/CN=cdc test {name}")])
            .args(["-addext", "basicConstraints=critical,CA:TRUE"])
            .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"]),
    );
    crt
}

/// Makes `server.key` and `server.crt` signed by `ca`, naming `localhost` only.
fn make_server_cert(dir: &Path, ca: &str) {
    run(
        "openssl: server key and request",
        Command::new("openssl")
            .current_dir(dir)
            .args(["req", "-new", "-nodes"])
            .args(["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"])
            .args(["-keyout", "server.key", "-out", "server.csr"])
            .args(["-subj", "/CN=localhost"]),
    );
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName = DNS:localhost\nbasicConstraints = CA:FALSE\n\
         keyUsage = digitalSignature, keyEncipherment\nextendedKeyUsage = serverAuth\n",
    )
    .expect("write server.ext");
    run(
        "openssl: sign the server certificate",
        Command::new("openssl")
            .current_dir(dir)
            .args(["x509", "-req", "-in", "server.csr", "-days", "2"])
            .args(["-CA", &format!("{ca}.crt"), "-CAkey", &format!("{ca}.key")])
            .args([
                "-CAcreateserial",
                "-extfile",
                "server.ext",
                "-out",
                "server.crt",
            ]),
    );
}

const ORPHAN_PREFIX: &str = "cdc-tls-test-";

/// Stops and removes the clusters of test processes that were killed before they could drop
/// theirs (a test runner's timeout): `cdc-tls-test-<pid>-*` whose process is gone.
fn remove_orphans() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(ORPHAN_PREFIX)
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if pid.parse::<u32>().is_err() || Path::new("/proc").join(pid).exists() {
            continue;
        }
        let _ = as_owner(&pg_bin().join("pg_ctl"))
            .arg("-D")
            .arg(entry.path().join("data"))
            .args(["-m", "immediate", "-w", "-t", "30", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(entry.path());
    }
}

impl TlsCluster {
    /// Starts the cluster. With `tls_only`, `pg_hba.conf` rejects every connection that is
    /// not encrypted, so that any connection that succeeds is known to be TLS.
    pub fn start(tls_only: bool) -> TlsCluster {
        remove_orphans();
        let dir = std::env::temp_dir().join(format!(
            "{ORPHAN_PREFIX}{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).expect("create the cluster's directory");
        // From here on, a panic drops the cluster, which removes the directory.
        let mut cluster = TlsCluster {
            data: dir.join("data"),
            ca: dir.join("certs").join("ca.crt"),
            other_ca: dir.join("certs").join("other-ca.crt"),
            bin: pg_bin(),
            port: 0,
            dir,
        };
        let certs = cluster.dir.join("certs");
        std::fs::create_dir_all(&certs).expect("create the certificates' directory");
        make_ca(&certs, "ca");
        make_ca(&certs, "other-ca");
        make_server_cert(&certs, "ca");
        cluster.init(&certs, tls_only);
        cluster.start_server();
        cluster
    }

    fn init(&self, certs: &Path, tls_only: bool) {
        let pwfile = self.dir.join("pwfile");
        std::fs::write(&pwfile, format!("{PASSWORD}\n")).expect("write pwfile");
        std::fs::set_permissions(&pwfile, std::fs::Permissions::from_mode(0o600))
            .expect("chmod pwfile");
        if is_root() {
            run(
                "chown",
                Command::new("chown")
                    .arg("postgres:")
                    .arg(&self.dir)
                    .arg(&pwfile),
            );
        }
        run(
            "initdb",
            as_owner(&self.bin.join("initdb"))
                .arg("-D")
                .arg(&self.data)
                .args(["-U", USER, "-A", "scram-sha-256", "-E", "UTF8"])
                .args(["--locale=C.UTF-8", "--no-sync"])
                .arg(format!("--pwfile={}", pwfile.display())),
        );
        // The server's key must belong to the server's user and be readable by it alone.
        for f in ["server.crt", "server.key"] {
            let to = self.data.join(f);
            std::fs::copy(certs.join(f), &to).expect("copy the server's certificate");
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600)).expect("chmod");
            if is_root() {
                run("chown", Command::new("chown").arg("postgres:").arg(&to));
            }
        }
        let conf = format!(
            "\n# --- cdc TLS test ---\nlisten_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{}'\nssl = on\nssl_cert_file = 'server.crt'\n\
             ssl_key_file = 'server.key'\nfsync = off\nsynchronous_commit = off\n\
             full_page_writes = off\nmax_connections = 40\nshared_buffers = 16MB\n\
             timezone = 'UTC'\nlog_timezone = 'UTC'\nwal_level = logical\n",
            self.data.display()
        );
        self.append(&self.data.join("postgresql.conf"), &conf);
        let mut hba = String::from("local all all scram-sha-256\n");
        if tls_only {
            hba.push_str("hostnossl all all all reject\n");
        }
        hba.push_str(
            "host all all 127.0.0.1/32 scram-sha-256\nhost all all ::1/128 scram-sha-256\n",
        );
        std::fs::write(self.data.join("pg_hba.conf"), hba).expect("write pg_hba.conf");
    }

    fn append(&self, file: &Path, text: &str) {
        let mut current = std::fs::read_to_string(file).expect("read postgresql.conf");
        current.push_str(text);
        std::fs::write(file, current).expect("write postgresql.conf");
    }

    /// Starts the server on a free port, trying another if the port was taken meanwhile.
    fn start_server(&mut self) {
        let log = self.dir.join("server.log");
        for _ in 0..3 {
            self.port = free_port();
            let started = as_owner(&self.bin.join("pg_ctl"))
                .arg("-D")
                .arg(&self.data)
                .arg("-l")
                .arg(&log)
                .args(["-w", "-t", "60", "-o"])
                .arg(format!("-p {}", self.port))
                .arg("start")
                .output()
                .expect("run pg_ctl");
            if started.status.success() {
                return;
            }
        }
        panic!(
            "the TLS test cluster did not start:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    /// Settings that reach database `dbname` of this cluster through `host` (`localhost`,
    /// which the certificate names, or `127.0.0.1`, which it does not), with `mode` and
    /// `root_cert` taken as they are (not validated: tests of refusals need that).
    pub fn settings(
        &self,
        role: DbRole,
        host: &str,
        dbname: &str,
        mode: SslMode,
        root_cert: Option<&Path>,
    ) -> DbSettings {
        DbSettings {
            role,
            host: host.into(),
            port: self.port,
            dbname: dbname.into(),
            user: USER.into(),
            password: Secret(PASSWORD.into()),
            connect_retry: Duration::from_secs(30),
            tls: TlsSettings {
                mode,
                root_cert: root_cert.map(Path::to_path_buf),
                prefix: role.setting_prefix(),
            },
        }
    }

    /// The server's log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }
}

impl Drop for TlsCluster {
    fn drop(&mut self) {
        if self.data.join("postmaster.pid").exists() {
            let _ = as_owner(&self.bin.join("pg_ctl"))
                .arg("-D")
                .arg(&self.data)
                .args(["-m", "immediate", "-w", "-t", "30", "stop"])
                .output();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
