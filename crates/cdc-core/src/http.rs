//! The HTTP endpoints of the long-running programs: `/metrics` (Prometheus text format),
//! `/healthz` (200 while the process runs) and `/readyz` (200 when ready, 503 with the reason
//! otherwise). `probes` makes those routes; a program merges routes of its own into them
//! (`axum::Router::merge`) and serves them with `serve_while` for as long as its work runs.

use crate::error::{Error, Result};
use crate::{health, metrics};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use std::future::Future;
use std::net::SocketAddr;

/// `/metrics`, `/healthz` and `/readyz` of `program` (whose metric families it registers).
pub fn probes(program: metrics::Program) -> Router {
    metrics::register_program(program);
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
}

async fn metrics_text() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        metrics::encode(),
    )
}

async fn ready() -> impl IntoResponse {
    match health::readiness() {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

/// Runs `work` while serving `routes` at `addr` (`None`: runs `work` alone). The address is
/// bound before `work` starts: one that cannot be bound (in use, not local) is a setting
/// error naming `setting`. The server stops when `work` returns; a server failure is logged
/// and `work` goes on.
pub async fn serve_while<F>(
    addr: Option<SocketAddr>,
    setting: &str,
    routes: Router,
    work: F,
) -> Result<()>
where
    F: Future<Output = Result<()>>,
{
    let Some(addr) = addr else {
        return work.await;
    };
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        Error::config(
            setting,
            format!(
                "cannot listen on {addr} ({e}): is another program (another copy?) using it? \
                 Choose another host:port, or off"
            ),
        )
    })?;
    tracing::info!(addr = %addr, "serving /metrics, /healthz and /readyz");
    let server = std::future::IntoFuture::into_future(axum::serve(listener, routes));
    tokio::pin!(work);
    tokio::pin!(server);
    tokio::select! {
        done = &mut work => done,
        stopped = &mut server => {
            match stopped {
                Ok(()) => tracing::warn!(addr = %addr, "the HTTP endpoint stopped"),
                Err(e) => tracing::warn!(addr = %addr, error = %e, "the HTTP endpoint failed"),
            }
            work.await
        }
    }
}
