//! The replication connection of logical capture: a small client of PostgreSQL's streaming
//! replication protocol (a `replication=database` session, `START_REPLICATION … LOGICAL`, then
//! the copy-both stream of XLogData and keepalives, answered with standby status updates).
//!
//! tokio-postgres 0.7 has no copy-both, so the messages are framed here; their encoding
//! (startup, SCRAM, MD5, SSLRequest) and the TLS connector are the ones every other
//! connection uses (`postgres-protocol`, `db::tls`), so `DB_SSLMODE` and `DB_SSLROOTCERT` mean
//! exactly the same here.

use super::tls::SslMode;
use super::DbSettings;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use postgres_protocol::authentication::{md5_hash, sasl};
use postgres_protocol::message::frontend;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};

/// Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01).
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

/// Longest a graceful close may take before the connection is simply dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// What went wrong on the replication connection.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("TLS handshake failed: {0}")]
    Tls(Box<dyn std::error::Error + Send + Sync>),
    #[error("the server does not accept TLS, and the SSL mode requires it")]
    NoTls,
    #[error("{severity} {code}: {message}{}", detail.as_ref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Server {
        severity: String,
        code: String,
        message: String,
        detail: Option<String>,
    },
    /// A message this client cannot follow (a bug of ours or of the server: not retried).
    #[error("unexpected message from the server: {0}")]
    Protocol(String),
    #[error("authentication: {0}")]
    Auth(String),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

impl ReplicationError {
    /// Whether reconnecting may help: the connection was lost, or the server said "try
    /// again" (it is shutting down or starting, or the slot is still held by the walsender
    /// of a connection that just died). Decided from the kind and SQLSTATE, never the text.
    pub fn is_transient(&self) -> bool {
        match self {
            ReplicationError::Io(_) | ReplicationError::Timeout(_) => true,
            ReplicationError::Tls(e) => !super::tls::is_certificate_refusal(e.as_ref()),
            ReplicationError::Server { code, .. } => {
                code.starts_with("08")
                    || code.starts_with("53")
                    || code == "57P01"
                    || code == "57P02"
                    || code == "57P03"
                    // object_in_use: the slot is active for another (dying) walsender.
                    || code == "55006"
            }
            ReplicationError::NoTls | ReplicationError::Protocol(_) | ReplicationError::Auth(_) => {
                false
            }
        }
    }
}

type Res<T> = std::result::Result<T, ReplicationError>;

trait Io: AsyncRead + AsyncWrite + Unpin + Send + Sync {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + Sync> Io for T {}

/// One message of the replication stream.
#[derive(Debug)]
pub enum StreamMessage {
    /// WAL data: one pgoutput message, starting at `start`.
    XLogData { start: u64, data: Bytes },
    /// The server's keepalive: how far it has sent, and whether it wants a status update now.
    Keepalive { wal_end: u64, reply: bool },
}

/// A replication connection, before and after `START_REPLICATION`.
pub struct ReplicationStream {
    io: Box<dyn Io>,
    /// Bytes read and not yet framed.
    buf: BytesMut,
    out: BytesMut,
}

impl std::fmt::Debug for ReplicationStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicationStream").finish_non_exhaustive()
    }
}

impl ReplicationStream {
    /// Opens a `replication=database` session to `db`: TCP, TLS as `DB_SSLMODE` says, login,
    /// with the session settings of every other connection (UTC, ISO dates, UTF-8), which
    /// the text pgoutput sends depends on.
    pub async fn connect(db: &DbSettings) -> Res<Self> {
        let connect_timeout = Duration::from_secs(10);
        tokio::time::timeout(connect_timeout, Self::connect_inner(db))
            .await
            .map_err(|_| ReplicationError::Timeout(connect_timeout))?
    }

    async fn connect_inner(db: &DbSettings) -> Res<Self> {
        // A host that is a directory is a Unix socket's, as in libpq.
        let io = if db.host.starts_with('/') {
            let path = format!("{}/.s.PGSQL.{}", db.host, db.port);
            negotiate(db, tokio::net::UnixStream::connect(path).await?).await?
        } else {
            let tcp = TcpStream::connect((db.host.as_str(), db.port)).await?;
            tcp.set_nodelay(true)?;
            negotiate(db, tcp).await?
        };
        let mut conn = ReplicationStream {
            io,
            buf: BytesMut::with_capacity(64 * 1024),
            out: BytesMut::with_capacity(1024),
        };
        conn.login(db).await?;
        Ok(conn)
    }

    async fn login(&mut self, db: &DbSettings) -> Res<()> {
        let params = [
            ("user", db.user.as_str()),
            ("database", db.dbname.as_str()),
            ("replication", "database"),
            ("application_name", super::APPLICATION_NAME),
            ("options", super::SESSION_OPTIONS),
            ("client_encoding", "UTF8"),
        ];
        frontend::startup_message(params.iter().copied(), &mut self.out)?;
        self.flush().await?;
        let password = db.password.0.as_bytes();
        let mut scram: Option<sasl::ScramSha256> = None;
        loop {
            let (tag, mut body) = self.frame().await?;
            match tag {
                b'R' => {
                    let kind = read_i32(&mut body)?;
                    match kind {
                        0 => break,
                        3 => {
                            frontend::password_message(password, &mut self.out)?;
                        }
                        5 => {
                            let mut salt = [0u8; 4];
                            if body.remaining() < 4 {
                                return Err(ReplicationError::Protocol("short MD5 salt".into()));
                            }
                            body.copy_to_slice(&mut salt);
                            let hash = md5_hash(db.user.as_bytes(), password, salt);
                            frontend::password_message(hash.as_bytes(), &mut self.out)?;
                        }
                        10 => {
                            let mechanisms = cstrings(&body);
                            if !mechanisms.iter().any(|m| m == sasl::SCRAM_SHA_256) {
                                return Err(ReplicationError::Auth(format!(
                                    "the server offers only {}",
                                    mechanisms.join(", ")
                                )));
                            }
                            // Without channel binding ("n": the client does not bind; the
                            // TLS stream hides its certificate hash), as libpq with
                            // channel_binding=disable. The certificate checks of the SSL mode
                            // still apply.
                            let s = sasl::ScramSha256::new(
                                password,
                                sasl::ChannelBinding::unsupported(),
                            );
                            frontend::sasl_initial_response(
                                sasl::SCRAM_SHA_256,
                                s.message(),
                                &mut self.out,
                            )?;
                            scram = Some(s);
                        }
                        11 => {
                            let s = scram.as_mut().ok_or_else(|| {
                                ReplicationError::Protocol("SASL continue before start".into())
                            })?;
                            s.update(&body)
                                .map_err(|e| ReplicationError::Auth(e.to_string()))?;
                            frontend::sasl_response(s.message(), &mut self.out)?;
                        }
                        12 => {
                            let s = scram.as_mut().ok_or_else(|| {
                                ReplicationError::Protocol("SASL final before start".into())
                            })?;
                            s.finish(&body)
                                .map_err(|e| ReplicationError::Auth(e.to_string()))?;
                            continue;
                        }
                        other => {
                            return Err(ReplicationError::Auth(format!(
                                "unsupported authentication method {other}"
                            )))
                        }
                    }
                    self.flush().await?;
                }
                b'E' => return Err(server_error(&body)),
                b'N' => {}
                other => {
                    return Err(ReplicationError::Protocol(format!(
                        "message {:?} during authentication",
                        other as char
                    )))
                }
            }
        }
        // Parameter statuses, the key data, then ready.
        self.until_ready().await
    }

    /// Reads to ReadyForQuery; an error response on the way is returned (after it).
    async fn until_ready(&mut self) -> Res<()> {
        let mut failed = None;
        loop {
            let (tag, body) = self.frame().await?;
            match tag {
                b'Z' => return failed.map_or(Ok(()), Err),
                b'E' => failed = Some(server_error(&body)),
                _ => {}
            }
        }
    }

    /// `START_REPLICATION SLOT <slot> LOGICAL 0/0` with pgoutput protocol 1, the publication
    /// and WAL messages (the heartbeat): the server starts at the slot's confirmed position.
    pub async fn start(&mut self, slot: &str, publication: &str) -> Res<()> {
        let sql = format!(
            "START_REPLICATION SLOT {} LOGICAL 0/0 (proto_version '1', publication_names {}, messages 'true')",
            quote_ident(slot),
            quote_literal(publication)
        );
        frontend::query(&sql, &mut self.out)?;
        self.flush().await?;
        loop {
            let (tag, body) = self.frame().await?;
            match tag {
                // CopyBothResponse: the stream has begun.
                b'W' => return Ok(()),
                b'E' => {
                    let e = server_error(&body);
                    // The ReadyForQuery that follows is not waited for: the connection is
                    // dropped.
                    return Err(e);
                }
                b'N' => {}
                other => {
                    return Err(ReplicationError::Protocol(format!(
                        "message {:?} in answer to START_REPLICATION",
                        other as char
                    )))
                }
            }
        }
    }

    /// The next message of the stream. Cancel-safe: a message is consumed only when
    /// returned.
    pub async fn next(&mut self) -> Res<StreamMessage> {
        loop {
            let (tag, body) = self.frame().await?;
            if let Some(m) = Self::stream_message(tag, body)? {
                return Ok(m);
            }
        }
    }

    /// The next message of the stream if one is already read whole, without waiting.
    pub fn next_buffered(&mut self) -> Res<Option<StreamMessage>> {
        while let Some((tag, body)) = self.buffered_frame()? {
            if let Some(m) = Self::stream_message(tag, body)? {
                return Ok(Some(m));
            }
        }
        Ok(None)
    }

    /// A frame of the copy-both stream as a message; `None` for a notice.
    fn stream_message(tag: u8, mut body: Bytes) -> Res<Option<StreamMessage>> {
        match tag {
            b'd' => {
                if body.is_empty() {
                    return Err(ReplicationError::Protocol("empty CopyData".into()));
                }
                match body.get_u8() {
                    b'w' => {
                        let start = read_u64(&mut body)?;
                        let _end = read_u64(&mut body)?;
                        let _sent = read_u64(&mut body)?;
                        Ok(Some(StreamMessage::XLogData { start, data: body }))
                    }
                    b'k' => {
                        let wal_end = read_u64(&mut body)?;
                        let _sent = read_u64(&mut body)?;
                        let reply = body.has_remaining() && body.get_u8() == 1;
                        Ok(Some(StreamMessage::Keepalive { wal_end, reply }))
                    }
                    other => Err(ReplicationError::Protocol(format!(
                        "CopyData of kind {:?}",
                        other as char
                    ))),
                }
            }
            b'E' => Err(server_error(&body)),
            b'N' => Ok(None),
            // The server ended the stream (CopyDone, CommandComplete).
            b'c' | b'C' => Err(ReplicationError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the server ended the replication stream",
            ))),
            other => Err(ReplicationError::Protocol(format!(
                "message {:?} in the replication stream",
                other as char
            ))),
        }
    }

    /// A standby status update: received up to `received`, durable (confirmed: the slot
    /// may move there) up to `flushed`.
    pub async fn confirm(&mut self, received: u64, flushed: u64) -> Res<()> {
        let now_us = chrono::Utc::now().timestamp_micros() - PG_EPOCH_OFFSET_US;
        let mut msg = BytesMut::with_capacity(34);
        msg.put_u8(b'r');
        msg.put_u64(received.max(flushed));
        msg.put_u64(flushed);
        msg.put_u64(flushed);
        msg.put_i64(now_us);
        msg.put_u8(0);
        frontend::CopyData::new(msg.freeze())?.write(&mut self.out);
        self.flush().await
    }

    /// Ends the stream gracefully: the server releases the slot before it answers, so the
    /// next `START_REPLICATION` on it cannot find it still active. Errors are not reported:
    /// a connection that cannot close cleanly is dropped.
    pub async fn close(mut self) {
        let ended = async {
            frontend::copy_done(&mut self.out);
            self.flush().await?;
            loop {
                let (tag, _) = self.frame().await?;
                if tag == b'Z' {
                    break;
                }
            }
            frontend::terminate(&mut self.out);
            self.flush().await?;
            self.io.shutdown().await?;
            Ok::<(), ReplicationError>(())
        };
        if let Ok(Err(e)) = tokio::time::timeout(CLOSE_TIMEOUT, ended).await {
            tracing::debug!(error = %e, "replication connection did not close cleanly");
        }
    }

    async fn flush(&mut self) -> Res<()> {
        self.io.write_all(&self.out).await?;
        self.io.flush().await?;
        self.out.clear();
        Ok(())
    }

    /// The next backend message: its tag and body. Cancel-safe (`read_buf` is, and a frame
    /// leaves the buffer only whole).
    async fn frame(&mut self) -> Res<(u8, Bytes)> {
        loop {
            if let Some(f) = self.buffered_frame()? {
                return Ok(f);
            }
            if self.buf.capacity() - self.buf.len() < 8192 {
                self.buf.reserve(64 * 1024);
            }
            let n = self.io.read_buf(&mut self.buf).await?;
            if n == 0 {
                return Err(ReplicationError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the server closed the replication connection",
                )));
            }
        }
    }

    /// The next backend message if it is read whole already (room is made for the rest of
    /// a longer one).
    fn buffered_frame(&mut self) -> Res<Option<(u8, Bytes)>> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if len < 4 {
            return Err(ReplicationError::Protocol(format!("message length {len}")));
        }
        if self.buf.len() > len {
            let mut frame = self.buf.split_to(len + 1).freeze();
            let tag = frame.get_u8();
            frame.advance(4);
            return Ok(Some((tag, frame)));
        }
        self.buf.reserve(len + 1 - self.buf.len());
        Ok(None)
    }
}

/// TLS as the SSL mode says: asked for unless `disable`; a server that declines is refused
/// unless `prefer`; the handshake by the connector every other connection uses.
async fn negotiate<S>(db: &DbSettings, mut stream: S) -> Res<Box<dyn Io>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + Sync + std::fmt::Debug + 'static,
{
    let mode = db.tls.mode;
    if mode == SslMode::Disable {
        return Ok(Box::new(stream));
    }
    let mut req = BytesMut::new();
    frontend::ssl_request(&mut req);
    stream.write_all(&req).await?;
    match stream.read_u8().await? {
        b'S' => {
            let mut maker = db.tls.connector();
            let tls = MakeTlsConnect::<S>::make_tls_connect(&mut maker, &db.host)
                .map_err(|e| ReplicationError::Tls(e.into()))?;
            let stream = tls.connect(stream).await.map_err(ReplicationError::Tls)?;
            Ok(Box::new(stream))
        }
        b'N' if mode == SslMode::Prefer => Ok(Box::new(stream)),
        b'N' => Err(ReplicationError::NoTls),
        other => Err(ReplicationError::Protocol(format!(
            "answer {other:#x} to the SSL request"
        ))),
    }
}

fn read_i32(b: &mut Bytes) -> Res<i32> {
    if b.remaining() < 4 {
        return Err(ReplicationError::Protocol("short message".into()));
    }
    Ok(b.get_i32())
}

fn read_u64(b: &mut Bytes) -> Res<u64> {
    if b.remaining() < 8 {
        return Err(ReplicationError::Protocol("short message".into()));
    }
    Ok(b.get_u64())
}

/// The NUL-terminated strings of a body (up to the empty one that ends the list).
fn cstrings(body: &[u8]) -> Vec<String> {
    body.split(|b| *b == 0)
        .take_while(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

/// An ErrorResponse's fields: severity, SQLSTATE, message, detail.
fn server_error(body: &[u8]) -> ReplicationError {
    let (mut severity, mut code, mut message, mut detail) =
        (String::new(), String::new(), String::new(), None);
    let mut rest = body;
    while let Some((&kind, tail)) = rest.split_first() {
        if kind == 0 {
            break;
        }
        let end = tail.iter().position(|b| *b == 0).unwrap_or(tail.len());
        let value = String::from_utf8_lossy(&tail[..end]).into_owned();
        match kind {
            b'V' => severity = value,
            b'S' if severity.is_empty() => severity = value,
            b'C' => code = value,
            b'M' => message = value,
            b'D' => detail = Some(value),
            _ => {}
        }
        rest = tail.get(end + 1..).unwrap_or_default();
    }
    ReplicationError::Server {
        severity,
        code,
        message,
        detail,
    }
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_response_gives_its_sqlstate_and_message() {
        let body = b"SERROR\0VERROR\0C55006\0Mreplication slot \"s\" is active for PID 7\0\0";
        match server_error(body) {
            e @ ReplicationError::Server { .. } => {
                assert!(e.is_transient());
                assert_eq!(
                    e.to_string(),
                    "ERROR 55006: replication slot \"s\" is active for PID 7"
                );
            }
            other => panic!("{other:?}"),
        }
        let missing = server_error(b"SERROR\0C42704\0Mreplication slot \"s\" does not exist\0\0");
        assert!(!missing.is_transient());
    }

    #[test]
    fn sasl_mechanisms_are_listed() {
        assert_eq!(
            cstrings(b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0"),
            vec!["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]
        );
    }
}
