//! TLS to the databases: the `sslmode` and `sslrootcert` settings with libpq's meaning, and
//! the OpenSSL connector that carries them out (the library libpq itself uses, so a CA file
//! and a certificate that work with `psql` work here, checked the same way).
//!
//! | mode          | encrypted            | certificate checked                             |
//! | ------------- | -------------------- | ----------------------------------------------- |
//! | `disable`     | never                | —                                               |
//! | `prefer`      | when the server can  | chain, only when a root certificate is given    |
//! | `require`     | always               | chain, only when a root certificate is given    |
//! | `verify-ca`   | always               | chain against the root certificate              |
//! | `verify-full` | always               | chain, and the host name (or address) connected to |

use crate::error::{Error, Result};
use openssl::ssl::{ConnectConfiguration, SslConnector, SslMethod, SslVerifyMode, SslVersion};
use openssl::x509::store::X509StoreBuilder;
use openssl::x509::X509;
use postgres_openssl::{TlsConnector, TlsStream};
use std::collections::HashMap;
use std::fmt::Debug;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};

/// How a connection uses TLS, as libpq's `sslmode` (`allow` is left out: it only ever
/// encrypts when the server insists, which `prefer` covers).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    /// libpq's default: TLS when the server offers it, plain otherwise.
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub const VALUES: &'static str = "disable, prefer, require, verify-ca or verify-full";

    pub fn parse(s: &str) -> Option<SslMode> {
        match s.trim().to_ascii_lowercase().as_str() {
            "disable" => Some(SslMode::Disable),
            "prefer" => Some(SslMode::Prefer),
            "require" => Some(SslMode::Require),
            "verify-ca" => Some(SslMode::VerifyCa),
            "verify-full" => Some(SslMode::VerifyFull),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// Whether the server's certificate must chain to the root certificate.
    fn verifies(self) -> bool {
        matches!(self, SslMode::VerifyCa | SslMode::VerifyFull)
    }

    /// What tokio-postgres does before the handshake: whether it asks for TLS and whether a
    /// server that does not offer it is refused. The checks of the certificate are the
    /// connector's.
    fn negotiation(self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as Pg;
        match self {
            SslMode::Disable => Pg::Disable,
            SslMode::Prefer => Pg::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => Pg::Require,
        }
    }
}

impl std::fmt::Display for SslMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One database's TLS settings, validated: the mode, and the CA file the server's
/// certificate must chain to (read again at every TLS handshake, so a renewed CA file is
/// picked up without a restart).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsSettings {
    pub mode: SslMode,
    pub root_cert: Option<PathBuf>,
    /// The settings' prefix in messages: `DB` for `DB_SSLMODE`, `WAREHOUSE_DB`, ...
    pub prefix: &'static str,
}

impl TlsSettings {
    /// Validates `<prefix>_SSLMODE` and `<prefix>_SSLROOTCERT`: a mode libpq knows, a root
    /// certificate for the verifying modes, and a root certificate file that can be read and
    /// holds at least one PEM certificate.
    pub fn validate(prefix: &'static str, mode: &str, root_cert: Option<&Path>) -> Result<Self> {
        let mode = SslMode::parse(mode).ok_or_else(|| {
            Error::config(
                format!("{prefix}_SSLMODE"),
                format!(
                    "'{}' is not an SSL mode; use {}",
                    mode.trim(),
                    SslMode::VALUES
                ),
            )
        })?;
        let root_cert = root_cert
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf);
        if mode.verifies() && root_cert.is_none() {
            return Err(Error::config(
                format!("{prefix}_SSLROOTCERT"),
                format!(
                    "{prefix}_SSLMODE={mode} checks the server's certificate against a CA: set \
                     {prefix}_SSLROOTCERT to the CA's certificate file (PEM), or use \
                     {prefix}_SSLMODE=require to encrypt without checking"
                ),
            ));
        }
        let settings = TlsSettings {
            mode,
            root_cert,
            prefix,
        };
        if let Some(path) = &settings.root_cert {
            settings.read_root_cert(path)?;
        }
        Ok(settings)
    }

    /// Sets how the connection negotiates TLS.
    pub fn apply(&self, config: &mut tokio_postgres::Config) {
        config.ssl_mode(self.mode.negotiation());
    }

    /// The connector for these settings. Nothing is built until a server agrees to TLS:
    /// OpenSSL reads the system's CA bundle whenever a connector is made (about 37 ms here,
    /// which every short-lived command and `--once` run paid twice, once per database, even
    /// with `sslmode=disable` or a server without TLS). At the first handshake one connector
    /// is made for the process; each handshake then reads the root certificate file (a
    /// renewed CA needs no restart) and sets what is checked, as the mode says.
    pub fn connector(&self) -> PgTls {
        PgTls {
            settings: self.clone(),
        }
    }

    /// One handshake's OpenSSL configuration: only the root certificate's CA trusted, and
    /// the host name checked in `verify-full`.
    fn configure(&self) -> Result<ConnectConfiguration> {
        static CONNECTOR: OnceLock<std::result::Result<SslConnector, String>> = OnceLock::new();
        let setup = |e: String| Error::setup("TLS", format!("cannot set up OpenSSL: {e}"));
        let connector = CONNECTOR
            .get_or_init(|| {
                let mut builder =
                    SslConnector::builder(SslMethod::tls_client()).map_err(|e| e.to_string())?;
                // libpq's default ssl_min_protocol_version.
                builder
                    .set_min_proto_version(Some(SslVersion::TLS1_2))
                    .map_err(|e| e.to_string())?;
                Ok(builder.build())
            })
            .as_ref()
            .map_err(|e| setup(e.clone()))?;
        let mut config = connector.configure().map_err(|e| setup(e.to_string()))?;
        config.set_verify_hostname(self.mode == SslMode::VerifyFull);
        match &self.root_cert {
            Some(path) => {
                let mut store = X509StoreBuilder::new().map_err(|e| setup(e.to_string()))?;
                for cert in self.current_root_cert(path)? {
                    store.add_cert(cert).map_err(|e| setup(e.to_string()))?;
                }
                config
                    .set_verify_cert_store(store.build())
                    .map_err(|e| setup(e.to_string()))?;
                config.set_verify(SslVerifyMode::PEER);
            }
            None => config.set_verify(SslVerifyMode::NONE),
        }
        Ok(config)
    }

    /// The root certificate file as it is now; while it cannot be read or holds no
    /// certificate (removed, or caught half-written during a renewal), the certificates last
    /// read from it, with a warning: a connection that worked keeps working rather than a
    /// running program ending over a file being replaced. Validation reads it first, so there
    /// is always a last good read in the programs.
    fn current_root_cert(&self, path: &Path) -> Result<Vec<X509>> {
        match self.read_root_cert(path) {
            Ok(certs) => Ok(certs),
            Err(e) => match last_good_root_cert().get_mut(path) {
                Some(last) => {
                    // Once until the file reads again, not at every connection of a pool.
                    if !last.warned {
                        last.warned = true;
                        tracing::warn!(error = %e, "the root certificate file cannot be used now; the certificates last read from it are used until it can");
                    }
                    Ok(last.certs.clone())
                }
                None => Err(e),
            },
        }
    }

    /// Reads and parses the root certificate file, and remembers what it held.
    fn read_root_cert(&self, path: &Path) -> Result<Vec<X509>> {
        let setting = format!("{}_SSLROOTCERT", self.prefix);
        let pem = std::fs::read(path)
            .map_err(|e| Error::config(&setting, format!("cannot read {}: {e}", path.display())))?;
        match X509::stack_from_pem(&pem) {
            Ok(certs) if !certs.is_empty() => {
                let last = LastGood {
                    certs: certs.clone(),
                    warned: false,
                };
                last_good_root_cert().insert(path.to_path_buf(), last);
                Ok(certs)
            }
            Ok(_) => Err(Error::config(
                &setting,
                format!("{} holds no PEM certificate", path.display()),
            )),
            Err(e) => Err(Error::config(
                &setting,
                format!("{} is not a PEM certificate file: {e}", path.display()),
            )),
        }
    }
}

/// What a root certificate file held when it last parsed, and whether its being unusable
/// since has been logged.
struct LastGood {
    certs: Vec<X509>,
    warned: bool,
}

/// The last good read of each root certificate file.
fn last_good_root_cert() -> MutexGuard<'static, HashMap<PathBuf, LastGood>> {
    static LAST_GOOD: OnceLock<Mutex<HashMap<PathBuf, LastGood>>> = OnceLock::new();
    LAST_GOOD
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
}

/// What connects carry out the settings' TLS (see [`TlsSettings::connector`]).
#[derive(Clone, Debug)]
pub struct PgTls {
    settings: TlsSettings,
}

/// One connection's handshake, configured when the server has agreed to TLS.
pub struct PgTlsConnect {
    settings: TlsSettings,
    domain: String,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<S> MakeTlsConnect<S> for PgTls
where
    S: AsyncRead + AsyncWrite + Unpin + Debug + Send + 'static,
{
    type Stream = TlsStream<S>;
    type TlsConnect = PgTlsConnect;
    type Error = std::convert::Infallible;

    fn make_tls_connect(&mut self, domain: &str) -> std::result::Result<PgTlsConnect, Self::Error> {
        Ok(PgTlsConnect {
            settings: self.settings.clone(),
            domain: domain.to_owned(),
        })
    }
}

impl<S> TlsConnect<S> for PgTlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Debug + Send + 'static,
{
    type Stream = TlsStream<S>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = std::result::Result<TlsStream<S>, BoxError>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        match self.settings.configure() {
            Ok(config) => TlsConnector::new(config, &self.domain).connect(stream),
            Err(e) => Box::pin(std::future::ready(Err(Box::new(e) as BoxError))),
        }
    }
}

/// Whether a connection failed because the server's certificate did not verify (unknown CA,
/// wrong host name, expired): retrying cannot fix that. Decided from OpenSSL's reason code,
/// not the message text.
pub fn is_refusal(e: &tokio_postgres::Error) -> bool {
    std::error::Error::source(e).is_some_and(is_certificate_refusal)
}

/// The same for any error: whether it, or an error beneath it, is OpenSSL refusing the
/// server's certificate.
pub fn is_certificate_refusal(e: &(dyn std::error::Error + 'static)) -> bool {
    // ERR_LIB_SSL and SSL_R_CERTIFICATE_VERIFY_FAILED of OpenSSL's ssl/sslerr.h.
    const LIB_SSL: i32 = 20;
    const CERTIFICATE_VERIFY_FAILED: i32 = 134;
    let mut cur = Some(e);
    while let Some(s) = cur {
        if let Some(ssl) = s.downcast_ref::<openssl::ssl::Error>() {
            return ssl.ssl_error().is_some_and(|stack| {
                stack.errors().iter().any(|x| {
                    x.library_code() == LIB_SSL && x.reason_code() == CERTIFICATE_VERIFY_FAILED
                })
            });
        }
        cur = s.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_libpq_mode_parses_and_prints_back() {
        for m in ["disable", "prefer", "require", "verify-ca", "verify-full"] {
            assert_eq!(SslMode::parse(m).map(SslMode::as_str), Some(m));
        }
        assert_eq!(SslMode::parse(" Verify-Full "), Some(SslMode::VerifyFull));
        assert_eq!(SslMode::parse("allow"), None);
        assert_eq!(SslMode::parse("true"), None);
        assert_eq!(SslMode::default(), SslMode::Prefer);
    }

    fn config_error(r: Result<TlsSettings>) -> (String, String) {
        match r {
            Err(Error::Config { setting, message }) => (setting, message),
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn a_bad_mode_names_the_setting_and_the_values() {
        let (setting, message) = config_error(TlsSettings::validate("WAREHOUSE_DB", "on", None));
        assert_eq!(setting, "WAREHOUSE_DB_SSLMODE");
        assert!(message.contains("verify-full"), "{message}");
    }

    #[test]
    fn verifying_without_a_root_certificate_is_refused() {
        for mode in ["verify-ca", "verify-full"] {
            let (setting, message) = config_error(TlsSettings::validate("DB", mode, None));
            assert_eq!(setting, "DB_SSLROOTCERT");
            assert!(message.contains(mode), "{message}");
        }
        let (setting, _) = config_error(TlsSettings::validate(
            "DB",
            "verify-ca",
            Some(Path::new("")),
        ));
        assert_eq!(setting, "DB_SSLROOTCERT");
    }

    #[test]
    fn an_unreadable_or_empty_root_certificate_is_refused() {
        let missing = Path::new("/nonexistent/cdc-root.crt");
        let (setting, message) =
            config_error(TlsSettings::validate("DB", "require", Some(missing)));
        assert_eq!(setting, "DB_SSLROOTCERT");
        assert!(message.contains("/nonexistent/cdc-root.crt"), "{message}");

        let dir = std::env::temp_dir().join(format!("cdc-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let not_pem = dir.join("not-a-cert.pem");
        std::fs::write(&not_pem, "hello\n").expect("write");
        let (setting, message) =
            config_error(TlsSettings::validate("DB", "verify-full", Some(&not_pem)));
        std::fs::remove_dir_all(&dir).expect("remove temp dir");
        assert_eq!(setting, "DB_SSLROOTCERT");
        assert!(message.contains("PEM"), "{message}");
    }

    #[test]
    fn the_modes_without_verification_need_no_file() {
        for mode in ["disable", "prefer", "require"] {
            let s = TlsSettings::validate("DB", mode, None).expect("valid");
            assert_eq!(s.mode.as_str(), mode);
            assert_eq!(s.root_cert, None);
        }
    }
}
