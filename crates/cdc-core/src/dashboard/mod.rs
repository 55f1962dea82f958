//! The loader's dashboard: one page (HTML, CSS and JavaScript embedded in the binary, no build
//! step, charts drawn by its own script) and the read-only JSON API behind it: `/api/status`,
//! `/api/history` (the versions of one key) and `/api/as-of` (a table as it was at a time).
//! The binary merges `routes` into its endpoints (`http::probes`). Reads go through
//! connections of the dashboard's own, in read-only transactions with a statement timeout, so
//! the apply loop never waits for it; with a database away the page still loads and says so.

mod read;

use crate::config::loader::LoaderConfig;
use crate::error::Result;
use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use read::{ApiError, Reader};
use serde::Deserialize;
use std::sync::Arc;

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const STYLE_CSS: &str = include_str!("assets/style.css");

/// Scripts, styles and data from this origin only; nothing may frame the page.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

/// The dashboard's routes: `/` (the page), `/assets/*`, `/api/*`. No connection is made until
/// a request needs one.
pub fn routes(cfg: &LoaderConfig) -> Result<Router> {
    let reader = Arc::new(Reader::new(cfg)?);
    // Bound to the loopback (the default), the dashboard answers only requests addressed to
    // the loopback, so that a web page elsewhere cannot reach it through a DNS name of its own
    // that resolves to 127.0.0.1 (DNS rebinding).
    let loopback_only = cfg.metrics_addr.is_none_or(|a| a.ip().is_loopback());
    Ok(Router::new()
        .route(
            "/",
            get(|| async { asset(INDEX_HTML, "text/html; charset=utf-8") }),
        )
        .route(
            "/assets/app.js",
            get(|| async { asset(APP_JS, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/assets/style.css",
            get(|| async { asset(STYLE_CSS, "text/css; charset=utf-8") }),
        )
        .route("/api/status", get(status))
        .route("/api/history", get(history))
        .route("/api/as-of", get(as_of))
        .with_state(reader)
        .route_layer(middleware::from_fn(move |req: Request, next: Next| {
            check_host(loopback_only, req, next)
        })))
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// Refuses a request whose `Host` is a name other than `localhost` while the dashboard
/// listens on the loopback only.
async fn check_host(loopback_only: bool, req: Request, next: Next) -> Response {
    if loopback_only && !host_is_local(req.headers()) {
        return (
            StatusCode::FORBIDDEN,
            "the dashboard answers requests for localhost or an IP address only\n",
        )
            .into_response();
    }
    let mut response = next.run(req).await;
    response.headers_mut().insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

/// Whether the `Host` header names `localhost` or an IP address (any port).
fn host_is_local(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        // HTTP/1.0 without Host: not a browser following a DNS name.
        return true;
    };
    let name = if let Some(rest) = host.strip_prefix('[') {
        // [::1]:9188
        rest.split(']').next().unwrap_or_default()
    } else {
        host.rsplit_once(':').map_or(host, |(n, _)| n)
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok()
}

async fn status(State(reader): State<Arc<Reader>>) -> Response {
    Json(reader.status().await).into_response()
}

#[derive(Debug, Deserialize)]
struct HistoryQuery {
    /// `schema.table` of a configured table (or its history table's name).
    table: String,
    /// The key as the change events spell it: a single column's text, or the JSON array of
    /// the texts of a composite key's columns.
    key: String,
    limit: Option<i64>,
}

async fn history(
    State(reader): State<Arc<Reader>>,
    Query(q): Query<HistoryQuery>,
) -> Result<Response, ApiError> {
    Ok(Json(reader.history(&q.table, &q.key, q.limit).await?).into_response())
}

#[derive(Debug, Deserialize)]
struct AsOfQuery {
    table: String,
    /// An RFC 3339 time (`2026-11-24T10:02:17Z`, `2026-11-24T11:02:17+01:00`).
    at: String,
    limit: Option<i64>,
}

async fn as_of(
    State(reader): State<Arc<Reader>>,
    Query(q): Query<AsOfQuery>,
) -> Result<Response, ApiError> {
    Ok(Json(reader.as_of(&q.table, &q.at, q.limit).await?).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(h: &str) -> HeaderMap {
        let mut m = HeaderMap::new();
        m.insert(
            header::HOST,
            HeaderValue::from_str(h).unwrap_or(HeaderValue::from_static("")),
        );
        m
    }

    #[test]
    fn only_local_host_names_pass() {
        for ok in [
            "127.0.0.1:9188",
            "localhost:9188",
            "LOCALHOST",
            "[::1]:9188",
            "10.1.2.3",
        ] {
            assert!(host_is_local(&host(ok)), "{ok}");
        }
        for bad in ["evil.example:9188", "localhost.evil.example", "example.com"] {
            assert!(!host_is_local(&host(bad)), "{bad}");
        }
        assert!(host_is_local(&HeaderMap::new()));
    }

    #[test]
    fn the_page_refers_to_its_embedded_assets_only() {
        assert!(INDEX_HTML.contains("/assets/app.js") && INDEX_HTML.contains("/assets/style.css"));
        for text in [INDEX_HTML, APP_JS, STYLE_CSS] {
            // The SVG namespace is a name, not a resource.
            let text = text.replace("http://www.w3.org/2000/svg", "");
            assert!(
                !text.contains("http://") && !text.contains("https://") && !text.contains("//cdn"),
                "no remote resources"
            );
        }
    }
}
