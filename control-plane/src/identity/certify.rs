//! `ballast.v1.Identity/Certify` (`api/proto/ballast/v1/identity.proto`): a token and a
//! CSR in, a certificate for exactly the identity the token proves out.
//!
//! Order of checks, each with its own gRPC code so a sidecar (and its operator) knows
//! what to fix: the names asked for are well-formed (InvalidArgument, naming the
//! field); the token proves someone (Unauthenticated); that someone is the identity
//! asked for (PermissionDenied: a token never buys a certificate for another service
//! account, even in the same namespace); the CSR is sound (InvalidArgument). The token
//! is checked before the CSR so that an unauthenticated caller learns nothing about
//! what the CA would accept. A store or API server that cannot answer is Unavailable:
//! the sidecar retries.
//!
//! Which authenticator: a bootstrap token ([`tokens`]) when the token has that form,
//! else a TokenReview ([`review`]) when the control plane runs with `--kubernetes`.

use std::sync::Arc;
use std::time::Duration;

use ballast_api::identity::{Identity, IdentityError};
use ballast_api::proto::v1::{CertifyRequest, CertifyResponse, identity_server};
use tonic::{Code, Request, Response, Status};

use crate::identity::ca::{Authority, IssueError, now_unix};
use crate::identity::review::{self, ReviewError};
use crate::identity::tokens;
use crate::keys::Keys;
use crate::metrics::Metrics;
use crate::store::Store;

/// What Certify needs.
pub struct CertifyContext {
    pub authority: Arc<Authority>,
    pub trust_domain: String,
    pub lifetime: Duration,
    pub store: Store,
    pub keys: Keys,
    /// With `--kubernetes`: TokenReviews.
    pub client: Option<kube::Client>,
    pub metrics: Metrics,
}

/// The gRPC service.
#[derive(Clone)]
pub struct Certifier {
    ctx: Arc<CertifyContext>,
}

impl Certifier {
    pub fn new(ctx: Arc<CertifyContext>) -> Self {
        // Every result at 0 from the start, so rates and alerts see the series at once.
        for result in RESULTS {
            ctx.metrics.certificates_issued.with_label_values(&[result]).inc_by(0);
        }
        Self { ctx }
    }

    pub fn into_server(self) -> identity_server::IdentityServer<Self> {
        // A CSR is well under a kilobyte; 64 KiB leaves room for RSA keys and long tokens.
        identity_server::IdentityServer::new(self).max_decoding_message_size(64 << 10)
    }
}

/// Who a token proves.
#[derive(Debug, PartialEq, Eq)]
struct Proven {
    namespace: String,
    service_account: String,
    via: &'static str,
}

async fn authenticate(ctx: &CertifyContext, token: &str) -> Result<Proven, Status> {
    if token.is_empty() {
        return Err(Status::unauthenticated(
            "token is empty: send a service-account token with audience \"ballast\" or a bootstrap token (ballastctl token create)",
        ));
    }
    if tokens::is_bootstrap_token(token) {
        let stored = tokens::lookup(&ctx.store, &ctx.keys, token)
            .await
            .map_err(|e| Status::unavailable(format!("cannot look the bootstrap token up: {e}")))?
            .ok_or_else(|| {
                Status::unauthenticated(
                    "unknown bootstrap token (expired and removed, or never created): create one with ballastctl token create",
                )
            })?;
        if stored.expires_at <= now_unix() {
            return Err(Status::unauthenticated(format!(
                "the bootstrap token expired at {} (unix seconds): create a new one with ballastctl token create",
                stored.expires_at
            )));
        }
        return Ok(Proven {
            namespace: stored.namespace,
            service_account: stored.service_account,
            via: "bootstrap token",
        });
    }
    let Some(client) = &ctx.client else {
        return Err(Status::unauthenticated(
            "not a bootstrap token, and this control plane runs without --kubernetes so it cannot review service-account tokens: pass a bootstrap token (ballastctl token create)",
        ));
    };
    match review::review(client, token).await {
        Ok(sa) => Ok(Proven { namespace: sa.namespace, service_account: sa.name, via: "TokenReview" }),
        Err(e @ (ReviewError::Forbidden(_) | ReviewError::Unavailable(_))) => {
            Err(Status::unavailable(e.to_string()))
        }
        Err(e) => Err(Status::unauthenticated(e.to_string())),
    }
}

impl Certifier {
    async fn certify_checked(&self, r: CertifyRequest) -> Result<CertifyResponse, Status> {
        let ctx = &*self.ctx;
        let identity =
            Identity::new(ctx.trust_domain.as_str(), r.namespace.as_str(), r.service_account.as_str())
                .map_err(|e| match e {
                    IdentityError::Namespace(_) => Status::invalid_argument(format!("namespace: {e}")),
                    IdentityError::ServiceAccount(_) => {
                        Status::invalid_argument(format!("service_account: {e}"))
                    }
                    other => Status::internal(other.to_string()),
                })?;
        let proven = authenticate(ctx, &r.token).await?;
        if proven.namespace != identity.namespace || proven.service_account != identity.service_account {
            return Err(Status::permission_denied(format!(
                "the {} proves service account {}/{}, not {}/{}: ask for the identity the token proves",
                proven.via,
                proven.namespace,
                proven.service_account,
                identity.namespace,
                identity.service_account
            )));
        }
        let issued = ctx.authority.issue(&r.csr, &identity, ctx.lifetime).map_err(|e| match e {
            IssueError::Csr(e) => Status::invalid_argument(e.to_string()),
            IssueError::Ca(e) => Status::internal(format!("the CA cannot sign: {e}")),
        })?;
        tracing::info!(%identity, via = proven.via, not_after = issued.not_after, "certificate issued");
        Ok(CertifyResponse {
            certificate_chain: issued.chain.iter().map(|c| c.to_vec()).collect(),
            trust_anchors: vec![ctx.authority.certificate_der().to_vec()],
            not_after: issued.not_after,
            identity: identity.to_string(),
        })
    }
}

/// The values of the metric's `result` label.
pub const RESULTS: [&str; 5] = ["issued", "unauthenticated", "denied", "invalid", "error"];

/// The metric's `result` label for an answer.
fn result_label(r: &Result<CertifyResponse, Status>) -> &'static str {
    match r {
        Ok(_) => "issued",
        Err(s) => match s.code() {
            Code::Unauthenticated => "unauthenticated",
            Code::PermissionDenied => "denied",
            Code::InvalidArgument => "invalid",
            _ => "error",
        },
    }
}

#[tonic::async_trait]
impl identity_server::Identity for Certifier {
    async fn certify(&self, request: Request<CertifyRequest>) -> Result<Response<CertifyResponse>, Status> {
        let peer = request.remote_addr();
        let r = request.into_inner();
        let (namespace, service_account) = (r.namespace.clone(), r.service_account.clone());
        let answer = self.certify_checked(r).await;
        let label = result_label(&answer);
        self.ctx.metrics.certificates_issued.with_label_values(&[label]).inc();
        if let Err(status) = &answer {
            tracing::warn!(?peer, %namespace, %service_account, result = label, error = %status.message(), "certificate refused");
        }
        answer.map(Response::new)
    }
}
