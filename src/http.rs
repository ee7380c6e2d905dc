//! The observability HTTP server: `GET /metrics` (Prometheus text exposition of a
//! [`Metrics`]), `GET /healthz` (200 `ok` while the process runs) and `GET /readyz` (200 when
//! the runtime says it is ready, 503 with a short reason otherwise).
//!
//! Readiness is a [`Health`] value shared with the runtime, which flips it with
//! [`Health::set_ready`] (e.g. not ready while partitions restore their state, or while
//! shutting down) and [`Health::set_failing`] (not ready while state transactions fail,
//! whatever else holds). [`bind`] then [`serve_on`] lets a caller bind port 0 and learn the port;
//! [`serve`] does both. The server stops gracefully when the `shutdown` future completes:
//! it stops accepting, finishes in-flight requests, then returns.

use crate::metrics::Metrics;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use tokio::net::TcpListener;

/// Content type of the Prometheus text exposition format.
pub const METRICS_CONTENT_TYPE: &str = prometheus::TEXT_FORMAT;

/// Failure of the HTTP server.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the listening address: {0}")]
    LocalAddr(#[source] io::Error),
    #[error("HTTP server failed: {0}")]
    Serve(#[source] io::Error),
}

#[derive(Debug)]
struct Readiness {
    ready: bool,
    reason: String,
    /// Set while state transactions fail (see [`Health::set_failing`]).
    failing: Option<String>,
}

/// Liveness and readiness, shared between the runtime (which sets it) and the HTTP server
/// (which reports it). Clones share the same state. Starts not ready, reason `starting`.
#[derive(Clone, Debug)]
pub struct Health {
    inner: Arc<Mutex<Readiness>>,
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

impl Health {
    /// Not ready, reason `starting`.
    pub fn new() -> Self {
        Health {
            inner: Arc::new(Mutex::new(Readiness {
                ready: false,
                reason: "starting".to_owned(),
                failing: None,
            })),
        }
    }

    /// Sets readiness; `reason` says why (shown by `/readyz` when not ready, e.g.
    /// `restoring 3 partitions`, `shutting down`).
    pub fn set_ready(&self, ready: bool, reason: impl Into<String>) {
        let mut r = self.lock();
        r.ready = ready;
        r.reason = reason.into();
    }

    /// Marks the state transactions as failing: not ready, with `reason`, whatever
    /// [`Self::set_ready`] says, until this is called again with `None`.
    pub fn set_failing(&self, reason: Option<String>) {
        self.lock().failing = reason;
    }

    /// `Ok(())` when ready, otherwise the reason.
    pub fn readiness(&self) -> Result<(), String> {
        let r = self.lock();
        match &r.failing {
            Some(f) => Err(f.clone()),
            None if r.ready => Ok(()),
            None => Err(r.reason.clone()),
        }
    }

    /// True when ready.
    pub fn is_ready(&self) -> bool {
        self.readiness().is_ok()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Readiness> {
        // The state is two plain fields, always consistent: a panic elsewhere can't break it.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    health: Health,
}

/// The routes, for embedding in another server or testing without a socket.
pub fn router(metrics: Arc<Metrics>, health: Health) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(AppState { metrics, health })
}

async fn metrics_handler(State(s): State<AppState>) -> Response {
    match s.metrics.try_render() {
        Ok(text) => ([(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)], text).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "cannot render metrics");
            (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response()
        }
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): State<AppState>) -> Response {
    match s.health.readiness() {
        Ok(()) => "ready\n".into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        )
            .into_response(),
    }
}

/// Binds `addr` and returns the listener with the address actually bound (its port is the
/// one chosen by the system when `addr` has port 0).
pub async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), HttpError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Bind { addr, source })?;
    let local = listener.local_addr().map_err(HttpError::LocalAddr)?;
    Ok((listener, local))
}

/// Serves on an already bound listener until `shutdown` completes, then finishes in-flight
/// requests and returns.
pub async fn serve_on(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    health: Health,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), HttpError> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    }
    axum::serve(listener, router(metrics, health))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(HttpError::Serve)
}

/// Binds `addr` and serves until `shutdown` completes (see [`serve_on`]).
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    health: Health,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), HttpError> {
    let (listener, _) = bind(addr).await?;
    serve_on(listener, metrics, health, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::to_bytes;

    fn state() -> AppState {
        AppState {
            metrics: Arc::new(Metrics::new().unwrap()),
            health: Health::new(),
        }
    }

    async fn body(r: Response) -> String {
        let bytes = to_bytes(r.into_body(), 1 << 20).await.unwrap();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[test]
    fn health_starts_not_ready_and_clones_share_state() {
        let h = Health::new();
        assert_eq!(h.readiness(), Err("starting".to_owned()));
        let h2 = h.clone();
        h2.set_ready(true, "running");
        assert!(h.is_ready());
        h.set_ready(false, "shutting down");
        assert_eq!(h2.readiness(), Err("shutting down".to_owned()));
    }

    #[test]
    fn failing_transactions_make_it_unready_until_they_work_again() {
        let h = Health::new();
        h.set_ready(true, "");
        h.set_failing(Some("state transactions failing".into()));
        assert_eq!(h.readiness(), Err("state transactions failing".to_owned()));
        h.set_ready(true, ""); // a restore ends meanwhile: still failing
        assert!(!h.is_ready());
        h.set_failing(None);
        assert!(h.is_ready());
        h.set_ready(false, "restoring");
        assert_eq!(h.readiness(), Err("restoring".to_owned()));
    }

    #[tokio::test]
    async fn readyz_reports_the_reason() {
        let s = state();
        let r = readyz(State(s.clone())).await;
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body(r).await, "not ready: starting\n");
        s.health.set_ready(true, "");
        let r = readyz(State(s)).await;
        assert_eq!(r.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn metrics_handler_sets_the_content_type() {
        let r = metrics_handler(State(state())).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            "text/plain; version=0.0.4"
        );
        assert!(body(r).await.contains("sessionizer_build_info"));
    }

    #[tokio::test]
    async fn bind_reports_the_chosen_port() {
        let (_l, addr) = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        assert_ne!(addr.port(), 0);
        // The port is taken: binding it again fails with a typed error naming it.
        match bind(addr).await {
            Err(HttpError::Bind { addr: a, .. }) => assert_eq!(a, addr),
            other => panic!("expected a bind error, got {other:?}"),
        }
    }
}
