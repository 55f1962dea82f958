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
use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode, SslVersion};
use openssl::x509::store::X509StoreBuilder;
use openssl::x509::X509;
use postgres_openssl::MakeTlsConnector;
use std::path::{Path, PathBuf};

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
/// certificate must chain to (read again at every connection, so a renewed CA file is
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
        settings.connector()?;
        Ok(settings)
    }

    /// Sets how the connection negotiates TLS.
    pub fn apply(&self, config: &mut tokio_postgres::Config) {
        config.ssl_mode(self.mode.negotiation());
    }

    /// The connector for these settings. `disable` needs none, but one that is never used
    /// keeps a single connection type. Built once per process and settings: OpenSSL reads
    /// the system's CA bundle for each new connector (about 20 ms here), which made every
    /// connection and every short-lived command that much slower.
    pub fn connector(&self) -> Result<MakeTlsConnector> {
        static BUILT: std::sync::Mutex<Vec<(TlsSettings, MakeTlsConnector)>> =
            std::sync::Mutex::new(Vec::new());
        let mut built = BUILT
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((_, c)) = built.iter().find(|(s, _)| s == self) {
            return Ok(c.clone());
        }
        let c = self.build_connector()?;
        built.push((self.clone(), c.clone()));
        Ok(c)
    }

    fn build_connector(&self) -> Result<MakeTlsConnector> {
        let setup = |e: openssl::error::ErrorStack| {
            Error::setup("TLS", format!("cannot set up OpenSSL: {e}"))
        };
        let mut builder = SslConnector::builder(SslMethod::tls_client()).map_err(setup)?;
        // libpq's default ssl_min_protocol_version.
        builder
            .set_min_proto_version(Some(SslVersion::TLS1_2))
            .map_err(setup)?;
        match &self.root_cert {
            Some(path) => {
                // Only this CA is trusted, not the system's (as libpq's sslrootcert).
                let mut store = X509StoreBuilder::new().map_err(setup)?;
                for cert in self.read_root_cert(path)? {
                    store.add_cert(cert).map_err(setup)?;
                }
                builder.set_cert_store(store.build());
                builder.set_verify(SslVerifyMode::PEER);
            }
            None => builder.set_verify(SslVerifyMode::NONE),
        }
        let mut connector = MakeTlsConnector::new(builder.build());
        let check_host = self.mode == SslMode::VerifyFull;
        connector.set_callback(move |config, _host| {
            config.set_verify_hostname(check_host);
            Ok(())
        });
        Ok(connector)
    }

    fn read_root_cert(&self, path: &Path) -> Result<Vec<X509>> {
        let setting = format!("{}_SSLROOTCERT", self.prefix);
        let pem = std::fs::read(path)
            .map_err(|e| Error::config(&setting, format!("cannot read {}: {e}", path.display())))?;
        match X509::stack_from_pem(&pem) {
            Ok(certs) if !certs.is_empty() => Ok(certs),
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
