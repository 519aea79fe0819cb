//! Getting and renewing the workload certificate from the control plane
//! (`ballast.v1.Identity/Certify`), and the TLS connector of the control plane channel.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ballast_api::identity::Identity;
use ballast_api::proto::v1::CertifyRequest;
use ballast_api::proto::v1::identity_client::IdentityClient;
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::sign::CertifiedKey;
use tokio::net::TcpStream;

use super::{Current, MeshIdentity};
use crate::control::Backoff;
use crate::drain::Shutdown;
use crate::metrics::Metrics;

/// How long one Certify call may take, connection included.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Retry delays while no certificate can be had.
const RETRY_BASE: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum CertifyError {
    #[error("{0}")]
    Identity(#[from] super::IdentityError),
    #[error("{url:?} is not a control plane URL: {why}")]
    Url { url: String, why: String },
    #[error(
        "cannot connect to the control plane at {url}: {why}; check --control-plane and that it runs with --identity"
    )]
    Connect { url: String, why: String },
    #[error("the control plane refused a certificate: {0}")]
    Refused(String),
    #[error("no answer from the control plane within {CALL_TIMEOUT:?}")]
    Timeout,
    #[error("the control plane's answer is unusable: {0}")]
    BadResponse(String),
}

/// Runs until the drain starts: gets the first certificate, then renews each at two
/// thirds of its lifetime.
pub async fn run(identity: Arc<MeshIdentity>, endpoints: Vec<String>, metrics: Metrics, shutdown: Shutdown) {
    if endpoints.is_empty() {
        tracing::error!("identity needs a control plane (--control-plane); no certificate will be requested");
        return;
    }
    let mut next = rand::random_range(0..endpoints.len());
    let mut backoff = Backoff::new(RETRY_BASE, RETRY_MAX);
    loop {
        let url = &endpoints[next];
        let wait = match certify(&identity, url).await {
            Ok((current, issued)) => {
                let not_after = current.not_after;
                let secs = not_after.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
                metrics.identity_certificate_expiry.set(secs as i64);
                metrics.identity_certify_total.with_label_values(&["issued"]).inc();
                let due = super::renew_at(issued, not_after);
                tracing::info!(identity = %current.identity, expires_in = ?not_after.duration_since(SystemTime::now()).unwrap_or_default(), renew_in = ?due, "workload certificate installed");
                identity.install(current);
                backoff.reset();
                due
            }
            Err(e) => {
                metrics.identity_certify_total.with_label_values(&["failed"]).inc();
                let delay = backoff.next_delay();
                match identity.current() {
                    Some(c) => {
                        tracing::warn!(control_plane = %url, error = %e, retry_in = ?delay, expires_in = ?c.not_after.duration_since(SystemTime::now()).unwrap_or_default(), "certificate renewal failed; the current certificate stays in use")
                    }
                    None => {
                        tracing::warn!(control_plane = %url, error = %e, retry_in = ?delay, "no workload certificate yet; not ready until one is issued")
                    }
                }
                next = (next + 1) % endpoints.len();
                delay
            }
        };
        tokio::select! {
            _ = shutdown.signaled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// One Certify call: a CSR for this sidecar's key, the token, the identity asked for.
/// Returns the installed certificate and when it was received.
pub async fn certify(identity: &MeshIdentity, url: &str) -> Result<(Current, SystemTime), CertifyError> {
    let opts = &identity.options;
    let token = opts.token.as_ref().ok_or(super::IdentityError::NoToken)?.read()?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&identity.key)
        .map_err(|e| super::IdentityError::Key(e.to_string()))?;
    let request = CertifyRequest {
        namespace: opts.namespace.clone(),
        service_account: opts.service_account.clone(),
        token,
        csr: csr.der().to_vec(),
    };
    let call = async {
        let channel = channel(url, identity.tls.control_plane.clone()).await?;
        IdentityClient::new(channel)
            .certify(request)
            .await
            .map_err(|s| CertifyError::Refused(format!("{:?}: {}", s.code(), s.message())))
    };
    let response = tokio::time::timeout(CALL_TIMEOUT, call).await.map_err(|_| CertifyError::Timeout)??;
    let issued = SystemTime::now();
    let r = response.into_inner();
    let bad = |why: String| CertifyError::BadResponse(why);
    let named: Identity = r.identity.parse().map_err(|e| bad(format!("identity: {e}")))?;
    if named.namespace != opts.namespace || named.service_account != opts.service_account {
        return Err(bad(format!("it certifies {named}, not {}/{}", opts.namespace, opts.service_account)));
    }
    let chain: Vec<CertificateDer<'static>> =
        r.certificate_chain.into_iter().map(CertificateDer::from).collect();
    let leaf = chain.first().ok_or_else(|| bad("no certificate".into()))?;
    if super::peer_identity(leaf).as_ref() != Some(&named) {
        return Err(bad(format!("the certificate does not carry {named} in its URI SAN")));
    }
    let key_der = PrivateKeyDer::Pkcs8(identity.key.serialize_der().into());
    let signer = rustls::crypto::ring::sign::any_ecdsa_type(&key_der).map_err(|e| bad(e.to_string()))?;
    let key = CertifiedKey::new(chain, signer);
    key.keys_match().map_err(|e| bad(format!("the certificate is not for this sidecar's key: {e}")))?;
    let not_after = UNIX_EPOCH + Duration::from_secs(u64::try_from(r.not_after).unwrap_or(0));
    if not_after <= issued {
        return Err(bad("the certificate has already expired (is this machine's clock right?)".into()));
    }
    let dns_name = named.dns_name();
    Ok((Current { key: Arc::new(key), identity: named, dns_name, not_after }, issued))
}

/// A gRPC channel to `url` (`https://host:port`) over TLS with `config`.
pub async fn channel(
    url: &str,
    config: Arc<ClientConfig>,
) -> Result<tonic::transport::Channel, CertifyError> {
    endpoint(url)?
        .connect_with_connector(TlsConnector { config })
        .await
        .map_err(|e| CertifyError::Connect { url: url.to_owned(), why: ballast_api::errors::chain(&e) })
}

/// The tonic endpoint for `url`, with the connect timeout every control plane call uses.
pub fn endpoint(url: &str) -> Result<tonic::transport::Endpoint, CertifyError> {
    tonic::transport::Endpoint::from_shared(for_connector(url))
        .map(|e| e.connect_timeout(Duration::from_secs(2)))
        .map_err(|e| CertifyError::Url { url: url.to_owned(), why: ballast_api::errors::chain(&e) })
}

/// `url` as tonic must see it when [`TlsConnector`] does the TLS: `http://`. A build in
/// which tonic has its own TLS feature (cargo unifies features across the workspace)
/// refuses an `https://` URI without tonic's TLS configured, although the connector
/// handles it.
pub fn for_connector(url: &str) -> String {
    match url.strip_prefix("https://") {
        Some(rest) => format!("http://{rest}"),
        None => url.to_owned(),
    }
}

/// Dials the control plane and speaks TLS, verifying its certificate for the URL's host
/// against the mesh's trust anchors. Ours rather than tonic's TLS so the channel presents
/// the current workload certificate (the same slot the data path uses) and links no
/// second TLS stack.
#[derive(Clone)]
pub struct TlsConnector {
    pub config: Arc<ClientConfig>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower::Service<http::Uri> for TlsConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let config = self.config.clone();
        Box::pin(async move {
            let host =
                uri.host().ok_or("the URL names no host")?.trim_matches(|c| c == '[' || c == ']').to_owned();
            let port = uri.port_u16().unwrap_or(443);
            let name = ServerName::try_from(host.clone()).map_err(|e| format!("{host:?}: {e}"))?;
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            let _ = tcp.set_nodelay(true);
            let tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await?;
            Ok(TokioIo::new(tls))
        })
    }
}
