//! The admin listener (DESIGN §3, port 9990): `/metrics`, `/live`, `/ready`, and the
//! API `ballastctl` uses under `/api/v1/` ([`crate::api`]):
//!
//! ```text
//! GET    /api/v1/{policies|services|endpoints|proxies}
//! GET    /api/v1/services/NAMESPACE/NAME          describe
//! POST   /api/v1/apply                            body: YAML documents
//! DELETE /api/v1/{policies|services}/NAMESPACE/NAME
//! POST   /api/v1/wait                             {"revision", "services", "timeoutMs"}
//! POST   /api/v1/tokens                           {"namespace", "serviceAccount", "ttl"} (identity on)
//! ```
//!
//! Answers are JSON; errors are `{"error": MESSAGE, ...}` with a 4xx/5xx status. It is
//! HTTP/1.1 on the control plane's runtime: nothing here is on a sidecar's data path,
//! and the push streams are on their own listener.
//!
//! With workload identity on ([`crate::identity`]) it is HTTPS, with the control plane's
//! serving certificate, and every `/api/` request needs `Authorization: Bearer <admin
//! token>`: the API creates bootstrap tokens, which mint workload certificates, so
//! reaching the port must not be enough. `/metrics`, `/live` and `/ready` stay open:
//! kubelet probes and Prometheus carry no token, and they reveal nothing to act on. The
//! token is compared in constant time.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::api::{self, ApiError};
use crate::keys::Keys;
use crate::metrics::Metrics;
use crate::store::{LeaseId, Store};
use crate::sync::MeshSync;

/// Largest `apply` body.
const MAX_BODY: usize = 4 << 20;

pub struct AdminContext {
    pub store: Store,
    pub keys: Keys,
    pub sync: Arc<MeshSync>,
    pub lease: watch::Receiver<Option<LeaseId>>,
    pub metrics: Metrics,
    /// The Kubernetes sync's state, with `--kubernetes` (`/ready` waits for its first
    /// full sync on the leader).
    pub kubernetes: Option<watch::Receiver<crate::kubernetes::SyncState>>,
    /// With workload identity on: the admin token and the trust domain.
    pub identity: Option<AdminIdentity>,
}

/// What the admin API needs of workload identity.
pub struct AdminIdentity {
    /// The bearer token every `/api/` request must carry.
    pub admin_token: String,
    pub trust_domain: String,
}

pub async fn serve(
    listener: TcpListener,
    ctx: Arc<AdminContext>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    stopping: CancellationToken,
) {
    loop {
        let (stream, _) = tokio::select! {
            _ = stopping.cancelled() => return,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let ctx = ctx.clone();
        let stopping = stopping.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => serve_connection(stream, ctx, stopping).await,
                Some(tls) => {
                    let handshake =
                        tokio::time::timeout(crate::identity::tls::HANDSHAKE_TIMEOUT, tls.accept(stream));
                    match handshake.await {
                        Ok(Ok(stream)) => serve_connection(stream, ctx, stopping).await,
                        Ok(Err(e)) => tracing::debug!(error = %e, "admin TLS handshake failed"),
                        Err(_) => tracing::debug!("admin TLS handshake timed out"),
                    }
                }
            }
        });
    }
}

async fn serve_connection<S>(stream: S, ctx: Arc<AdminContext>, stopping: CancellationToken)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| {
        let ctx = ctx.clone();
        async move { Ok::<_, Infallible>(handle(&ctx, req).await) }
    });
    let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = stopping.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// With identity on, the 401 for an `/api/` request without the admin token; `None`
/// when it may go on.
fn unauthorized(ctx: &AdminContext, req: &Request<Incoming>) -> Option<Response<Body>> {
    let identity = ctx.identity.as_ref()?;
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim);
    let message = match presented {
        Some(t) if crate::identity::admin_token_matches(t, &identity.admin_token) => return None,
        Some(_) => {
            "the admin token is wrong: pass the control plane's --admin-token-file to ballastctl --token-file"
        }
        None => {
            "missing Authorization: Bearer <admin token>: pass ballastctl --token-file (BALLAST_TOKEN_FILE) with the control plane's admin token"
        }
    };
    let mut r = json_response(StatusCode::UNAUTHORIZED, &json!({"error": message}));
    r.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
    Some(r)
}

type Body = Full<Bytes>;

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

fn json_response(status: StatusCode, v: &Value) -> Response<Body> {
    let mut body = serde_json::to_vec_pretty(v).unwrap_or_default();
    body.push(b'\n');
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    r
}

fn error_response(e: ApiError) -> Response<Body> {
    let mut v = json!({"error": e.message});
    if let Some(Value::Object(details)) = e.details {
        for (k, d) in details {
            v[k] = d;
        }
    }
    json_response(StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), &v)
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, ApiError> {
    match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => Ok(b.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            Err(ApiError::new(413, format!("request body over {} MiB", MAX_BODY >> 20)))
        }
        Err(e) => Err(ApiError::new(400, format!("cannot read the request body: {e}"))),
    }
}

async fn handle(ctx: &AdminContext, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().trim_end_matches('/').to_owned();
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let method = req.method().clone();
    if segments.first() == Some(&"api")
        && let Some(refused) = unauthorized(ctx, &req)
    {
        return refused;
    }
    let result: Result<Value, ApiError> = match (&method, segments.as_slice()) {
        (&Method::GET, ["live"]) => return text(StatusCode::OK, "live\n"),
        (&Method::GET, ["ready"]) => {
            return match api::readiness(ctx) {
                Ok(()) => text(StatusCode::OK, "ready\n"),
                Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
            };
        }
        (&Method::GET, ["metrics"]) => {
            let mut r = text(StatusCode::OK, ctx.metrics.encode());
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            return r;
        }
        (&Method::POST, ["api", "v1", "tokens"]) => match read_body(req).await {
            Ok(body) => create_token(ctx, &body).await,
            Err(e) => Err(e),
        },
        (&Method::GET, ["api", "v1", kind]) => api::list(ctx, kind),
        (&Method::GET, ["api", "v1", "services", ns, name]) => api::describe(ctx, ns, name),
        (&Method::POST, ["api", "v1", "apply"]) => {
            let source = query(&req, "source").unwrap_or_else(|| "-".to_owned());
            match read_body(req).await {
                Ok(body) => match std::str::from_utf8(&body) {
                    Ok(text) => api::apply(ctx, text, &source).await,
                    Err(_) => Err(ApiError::new(400, format!("{source}: not UTF-8 text"))),
                },
                Err(e) => Err(e),
            }
        }
        (&Method::DELETE, ["api", "v1", kind, ns, name]) => api::delete(ctx, kind, ns, name).await,
        (&Method::POST, ["api", "v1", "wait"]) => match read_body(req).await {
            Ok(body) => match serde_json::from_slice::<api::WaitRequest>(&body) {
                Ok(w) => api::wait(ctx, w).await,
                Err(e) => Err(ApiError::new(400, format!("wait: {e}"))),
            },
            Err(e) => Err(e),
        },
        (_, ["live" | "ready" | "metrics"]) | (_, ["api", ..]) => {
            Err(ApiError::new(405, format!("{method} is not allowed on {path}")))
        }
        _ => Err(ApiError::new(404, format!("no such endpoint: {path}"))),
    };
    match result {
        Ok(v) => json_response(StatusCode::OK, &v),
        Err(e) => error_response(e),
    }
}

/// The body of `POST /api/v1/tokens`.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TokenRequest {
    namespace: String,
    service_account: String,
    #[serde(default)]
    ttl: Option<String>,
}

/// `POST /api/v1/tokens`: a bootstrap token (`ballastctl token create`).
async fn create_token(ctx: &AdminContext, body: &[u8]) -> Result<Value, ApiError> {
    let Some(identity) = &ctx.identity else {
        return Err(ApiError::new(
            404,
            "workload identity is off: start the control plane with --identity to create bootstrap tokens",
        ));
    };
    let r: TokenRequest = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(400, format!("tokens: {e}; expected {{\"namespace\", \"serviceAccount\", \"ttl\"}}"))
    })?;
    let ttl = match r.ttl.as_deref() {
        None => crate::identity::tokens::DEFAULT_TTL,
        Some(t) => {
            ballast_api::duration::parse_flag(t).map_err(|e| ApiError::new(400, format!("ttl: {e}")))?
        }
    };
    use crate::identity::tokens::TokenError;
    match crate::identity::tokens::issue(&ctx.store, &ctx.keys, &r.namespace, &r.service_account, ttl).await {
        Ok(t) => {
            let id = ballast_api::identity::Identity::new(
                &identity.trust_domain,
                &r.namespace,
                &r.service_account,
            )
            .map_err(|e| ApiError::new(400, e.to_string()))?;
            Ok(json!({"token": t.token, "expiresAt": t.expires_at, "identity": id.to_string()}))
        }
        Err(e @ TokenError::Store(_)) => Err(ApiError::new(503, e.to_string())),
        Err(e @ TokenError::Random) => Err(ApiError::new(500, e.to_string())),
        Err(e) => Err(ApiError::new(400, e.to_string())),
    }
}

/// A query parameter, percent-decoded.
fn query(req: &Request<Incoming>, name: &str) -> Option<String> {
    req.uri().query()?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == name).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                match std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decodes() {
        assert_eq!(percent_decode("shop%2Fpolicy.yaml"), "shop/policy.yaml");
        assert_eq!(percent_decode("a+b"), "a b");
        assert_eq!(percent_decode("bad%zz"), "bad%zz");
        assert_eq!(percent_decode("end%2"), "end%2");
    }
}
