//! The admin listener (DESIGN §2): `/metrics`, `/live`, `/ready`, `/config`, `/shutdown`.
//!
//! It runs on its own thread with its own single-threaded runtime, so a scrape or a slow
//! admin client never takes a data-path worker, and a saturated data path still answers
//! liveness probes.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http::{Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};

/// Concurrent admin connections (probes and scrapes need a handful).
const MAX_ADMIN_CONNECTIONS: usize = 64;

use crate::body::{self, Body};
use crate::drain::Shutdown;
use crate::metrics::Metrics;
use crate::rejection::text_response;
use crate::routes::ConfigStore;

#[derive(Clone)]
pub struct Admin {
    pub metrics: Metrics,
    pub store: Arc<ConfigStore>,
    pub shutdown: Shutdown,
    /// Describes where configuration comes from, shown in `/config`.
    pub source: Arc<str>,
}

/// Serves the admin API on `listener` from a dedicated thread.
pub fn spawn(listener: std::net::TcpListener, admin: Admin) -> std::io::Result<std::thread::JoinHandle<()>> {
    listener.set_nonblocking(true)?;
    std::thread::Builder::new().name("ballast-admin".into()).spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(error = %e, "cannot start the admin runtime");
                return;
            }
        };
        rt.block_on(async move {
            let listener = match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(error = %e, "cannot use the admin listener");
                    return;
                }
            };
            // Bounded: admin clients cannot take file descriptors the data path needs.
            let permits = Arc::new(tokio::sync::Semaphore::new(MAX_ADMIN_CONNECTIONS));
            loop {
                let (stream, peer) = match listener.accept().await {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "admin accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    tracing::warn!(%peer, "too many admin connections; closing this one");
                    continue;
                };
                let admin = admin.clone();
                tokio::spawn(async move {
                    // Set by `POST /shutdown`. The drain starts only once hyper has
                    // written that answer and closed the connection: with nothing in
                    // flight the process exits at once, and an earlier start would cut
                    // the caller off without its 200.
                    let shutdown_asked = Arc::new(AtomicBool::new(false));
                    let svc = service_fn({
                        let admin = admin.clone();
                        let shutdown_asked = shutdown_asked.clone();
                        move |req| {
                            let resp = admin.route(req, peer, &shutdown_asked);
                            async move { Ok::<_, Infallible>(resp) }
                        }
                    });
                    let _ = http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(Duration::from_secs(10))
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                    if shutdown_asked.load(Ordering::Acquire) {
                        admin.shutdown.start();
                    }
                    drop(permit);
                });
            }
        });
    })
}

impl Admin {
    fn route(&self, req: Request<Incoming>, peer: SocketAddr, shutdown_asked: &AtomicBool) -> Response<Body> {
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/metrics") => Response::builder()
                .header(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)
                .body(body::full(self.metrics.encode()))
                .unwrap_or_else(|_| {
                    text_response(StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics")
                }),
            (&Method::GET, "/live") => text_response(StatusCode::OK, "live"),
            (&Method::GET, "/ready") => {
                if self.shutdown.is_draining() {
                    text_response(StatusCode::SERVICE_UNAVAILABLE, "draining")
                } else if self.store.is_ready() {
                    text_response(StatusCode::OK, "ready")
                } else {
                    text_response(StatusCode::SERVICE_UNAVAILABLE, "no configuration applied yet")
                }
            }
            (&Method::GET, "/config") => {
                let snap = self.store.snapshot();
                let doc = serde_json::json!({
                    "version": snap.version,
                    "source": &*self.source,
                    "namespace": self.store.namespace(),
                    "services": snap.config.services.values().collect::<Vec<_>>(),
                    "policies": snap.config.policies.values().collect::<Vec<_>>(),
                });
                match serde_json::to_vec_pretty(&doc) {
                    Ok(json) => Response::builder()
                        .header(header::CONTENT_TYPE, "application/json")
                        .body(body::full(json))
                        .unwrap_or_else(|_| {
                            text_response(StatusCode::INTERNAL_SERVER_ERROR, "cannot encode config")
                        }),
                    Err(e) => {
                        text_response(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot encode config: {e}"))
                    }
                }
            }
            (&Method::POST, "/shutdown") => {
                if !peer.ip().is_loopback() {
                    return text_response(StatusCode::FORBIDDEN, "shutdown is only accepted from loopback");
                }
                tracing::info!("shutdown requested through the admin API");
                shutdown_asked.store(true, Ordering::Release);
                let mut resp = text_response(StatusCode::OK, "draining");
                // Makes hyper close the connection after this answer, which starts the drain.
                resp.headers_mut().insert(header::CONNECTION, header::HeaderValue::from_static("close"));
                resp
            }
            (_, "/metrics" | "/live" | "/ready" | "/config" | "/shutdown") => {
                text_response(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
            }
            _ => text_response(
                StatusCode::NOT_FOUND,
                "not found: try /metrics, /live, /ready, /config, POST /shutdown",
            ),
        }
    }
}
