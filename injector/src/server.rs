//! HTTPS on 8443: `POST /inject` (the webhook), `/live`, `/ready`, `/metrics`.
//!
//! Every request gets an answer and none can take the process down: a wrong content type
//! is a 415, an oversized body a 413, a body that is not an AdmissionReview a 400, and
//! anything the injector cannot make sense of inside a review is allowed without a patch
//! (see [`crate::review`]). On SIGTERM the listener closes and open connections finish
//! their requests, so a rolling update of the injector drops no review.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use prometheus::{Encoder, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::identity::TrustAnchors;
use crate::inject::{self, Config, Decision};
use crate::namespaces::Namespaces;
use crate::review::{self, Response as Review};

/// Largest review body read. The API server caps objects at 3 MiB; a review carries at
/// most two of them.
pub const MAX_BODY: usize = 8 << 20;
/// A client that has not finished its TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The injector's counters (`ballast_injector_*`).
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// `outcome`: injected, skipped, denied, unreadable, not-a-pod; `reason`: why a pod
    /// was skipped, or why it was injected without workload identity.
    reviews: IntCounterVec,
    /// `result`: ok or error.
    pub certificate_reloads: IntCounterVec,
    /// 1 while the trust anchors file holds usable anchors; exported only with
    /// `--identity-trust-anchors-file` (see [`Metrics::trust_anchors_loaded`]).
    trust_anchors_loaded: IntGauge,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let reviews = IntCounterVec::new(
            Opts::new(
                "ballast_injector_reviews_total",
                "Admission reviews answered, by outcome and reason (why a pod was skipped, or injected without workload identity).",
            ),
            &["outcome", "reason"],
        )
        .unwrap_or_else(|_| unreachable!("static metric definition"));
        let certificate_reloads = IntCounterVec::new(
            Opts::new(
                "ballast_injector_certificate_reloads_total",
                "Serving certificate reloads from files.",
            ),
            &["result"],
        )
        .unwrap_or_else(|_| unreachable!("static metric definition"));
        for c in [&reviews, &certificate_reloads] {
            // Fresh registry, distinct names: registration cannot fail.
            let _ = registry.register(Box::new(c.clone()));
        }
        let trust_anchors_loaded = IntGauge::new(
            "ballast_injector_identity_trust_anchors_loaded",
            "1 when the identity trust anchors file holds the mesh's CA certificates (injected proxies get workload identity), 0 when it is missing or invalid.",
        )
        .unwrap_or_else(|_| unreachable!("static metric definition"));
        Self { registry, reviews, certificate_reloads, trust_anchors_loaded }
    }

    /// The trust anchors gauge, registered on first use: an injector without
    /// `--identity-trust-anchors-file` does not export it, so an alert on 0 means a
    /// configured file that is missing or invalid, never identity deliberately off.
    pub fn trust_anchors_loaded(&self) -> IntGauge {
        // A second registration is refused (AlreadyReg) and changes nothing.
        let _ = self.registry.register(Box::new(self.trust_anchors_loaded.clone()));
        self.trust_anchors_loaded.clone()
    }

    fn count(&self, outcome: &str, reason: &str) {
        self.reviews.with_label_values(&[outcome, reason]).inc();
    }

    fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Writing to a Vec cannot fail.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The webhook: configuration, the namespace label source, counters, and the trust
/// anchors file when identity is configured.
pub struct Injector {
    pub config: Config,
    pub namespaces: Namespaces,
    pub metrics: Metrics,
    /// `--identity-trust-anchors-file`: read at every review, so a rotated file reaches the
    /// next pod (see [`crate::identity`]).
    pub trust_anchors: Option<TrustAnchors>,
}

impl Injector {
    /// The answer to one review body; `Err` is a body that is not a review at all.
    pub async fn review(&self, body: &[u8]) -> Result<Review, review::BadReview> {
        let req = review::parse(body)?;
        let pod = match req.pod() {
            None => {
                self.metrics.count("not-a-pod", "");
                return Ok(Review::allow(&req.uid));
            }
            Some(Err(e)) => {
                self.metrics.count("unreadable", "");
                tracing::warn!(uid = %req.uid, error = %e, "cannot read the pod in the review; admitted without a sidecar");
                let mut r = Review::allow(&req.uid);
                r.warnings.push(format!("ballast: sidecar not injected: the pod could not be read: {e}"));
                return Ok(r);
            }
            Some(Ok(pod)) => pod,
        };
        let namespace = Some(req.namespace.as_str())
            .filter(|n| !n.is_empty())
            .or(pod.metadata.namespace.as_deref())
            .unwrap_or(ballast_api::names::DEFAULT_NAMESPACE)
            .to_owned();
        let mut warnings = Vec::new();
        let namespace_enabled = if inject::needs_namespace_label(&pod) {
            self.namespaces.enabled(&namespace).await.unwrap_or_else(|e| {
                tracing::warn!(error = %e, "namespace label unknown; pods that do not opt in by annotation are not injected");
                warnings.push(format!("ballast: namespace label unknown ({e}); sidecar not injected"));
                false
            })
        } else {
            false
        };
        let name = pod.metadata.name.clone().or(pod.metadata.generate_name.clone()).unwrap_or_default();
        let anchors = self.trust_anchors.as_ref().map(TrustAnchors::current);
        let with_anchors;
        let config = match &anchors {
            Some(Ok(pem)) => {
                with_anchors = Config { trust_anchors: Some(pem.clone()), ..self.config.clone() };
                &with_anchors
            }
            _ => &self.config,
        };
        let mut response = match inject::inject(&pod, namespace_enabled, config) {
            Decision::Inject(patch) => {
                let mut r = Review { patch: Some(patch), ..Review::allow(&req.uid) };
                r.warnings.extend(inject::trace_warnings(&pod, config));
                let reason = match &anchors {
                    None => "",
                    Some(_) if !inject::wants_identity(&pod) => "identity-disabled",
                    Some(Err(e)) => {
                        r.warnings.push(format!(
                            "ballast: sidecar injected without workload identity (no mutual TLS): the injector has no trust anchors: {e}"
                        ));
                        "no-trust-anchors"
                    }
                    Some(Ok(_)) => "",
                };
                let identity = config.trust_anchors.is_some() && inject::wants_identity(&pod);
                self.metrics.count("injected", reason);
                tracing::info!(%namespace, pod = %name, identity, "injected");
                r
            }
            Decision::Skip(skip) => {
                self.metrics.count("skipped", skip.reason());
                tracing::debug!(%namespace, pod = %name, reason = %skip, "not injected");
                let mut r = Review::allow(&req.uid);
                r.warnings.extend(skip.warning());
                r
            }
            Decision::Deny(e) => {
                self.metrics.count("denied", "");
                tracing::info!(%namespace, pod = %name, error = %e, "refused");
                Review::deny(&req.uid, format!("ballast: {e}"))
            }
        };
        response.warnings.extend(warnings);
        Ok(response)
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

async fn handle(
    injector: Arc<Injector>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path();
    Ok(match (req.method(), path) {
        (&Method::GET, "/live" | "/ready") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/metrics") => {
            // Brings the trust anchors gauge up to date between reviews.
            if let Some(t) = &injector.trust_anchors {
                let _ = t.current();
            }
            let mut r = text(StatusCode::OK, injector.metrics.render());
            r.headers_mut()
                .insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; version=0.0.4"));
            r
        }
        (&Method::POST, "/inject") => inject(injector, req).await,
        (_, "/inject") => text(StatusCode::METHOD_NOT_ALLOWED, "POST an AdmissionReview to /inject\n"),
        _ => text(StatusCode::NOT_FOUND, "not found: the webhook is POST /inject\n"),
    })
}

async fn inject(injector: Arc<Injector>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"));
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return text(StatusCode::PAYLOAD_TOO_LARGE, format!("body over {MAX_BODY} bytes\n"));
        }
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("cannot read the body: {e}\n")),
    };
    // Checked after reading the body: answering an HTTP/2 request before its body is in
    // resets the stream, and the client sees a framing error instead of the 415.
    if !json {
        return text(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "an AdmissionReview must be sent as application/json\n",
        );
    }
    match injector.review(&body).await {
        Ok(r) => {
            let mut resp = Response::new(Full::new(Bytes::from(r.to_json())));
            resp.headers_mut()
                .insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
            resp
        }
        Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
    }
}

/// Serves until `shutdown` completes, then lets open connections finish (up to `drain`).
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    injector: Arc<Injector>,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) {
    let acceptor = TlsAcceptor::from(tls);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let injector = injector.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let service = hyper::service::service_fn(move |req| handle(injector.clone(), req));
            let builder = auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown()).await.is_err() {
        tracing::warn!("connections still open after the drain deadline; closing them");
    }
}
