//! This sidecar's workload identity: its key, its certificate from the control plane's
//! CA, and the TLS configurations built on them (issue 7).
//!
//! Decisions, and why:
//! * **The key never leaves the pod.** It is generated here (ECDSA P-256, ring) once per
//!   process and only a certificate signing request travels; renewals reuse it, as
//!   linkerd2-proxy does, since a key that never left memory gains nothing from rotation
//!   that a new certificate does not give.
//! * **Proof of identity** is a token read at each request ([`TokenSource`]): in
//!   Kubernetes the projected service-account token (rotated by the kubelet, so re-read
//!   every time), elsewhere a bootstrap token from `ballastctl token create`.
//! * **Renewal at two thirds of the lifetime**, with jittered backoff (1 s doubling to
//!   30 s) while the control plane cannot be reached; the current certificate stays in
//!   use meanwhile. A new certificate is swapped in atomically ([`CertSlot`]): new
//!   handshakes use it, established connections keep theirs, so rotation drops nothing.
//! * **Not ready before the first certificate.** The control plane stream waits for it:
//!   without it the sidecar could neither prove who it is nor accept mesh TLS, and a pod
//!   that cannot be called over mTLS must not be advertised as an endpoint.
//! * **The trust domain comes from the control plane**: the certificate names the
//!   identity, and the sidecar learns its own SPIFFE ID (and so its SNI name) from it.
//!
//! [`tls`] holds the rustls configurations, the mesh upstream connector and the inbound
//! acceptor; [`certify`] the control plane call.

pub mod certify;
pub mod tls;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use ballast_api::identity::Identity;
use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls::sign::CertifiedKey;
use tokio::sync::watch;

/// How this sidecar proves who it is.
#[derive(Debug, Clone)]
pub enum TokenSource {
    /// A file read at every request (the kubelet rotates projected tokens).
    File(PathBuf),
    /// A token given at start (`--identity-token`, a bootstrap token).
    Literal(String),
}

impl TokenSource {
    pub fn read(&self) -> Result<String, IdentityError> {
        match self {
            TokenSource::Literal(t) => Ok(t.trim().to_owned()),
            TokenSource::File(path) => std::fs::read_to_string(path)
                .map(|t| t.trim().to_owned())
                .map_err(|source| IdentityError::Token { path: path.clone(), source }),
        }
    }
}

/// Identity settings from the command line.
#[derive(Debug, Clone)]
pub struct IdentityOptions {
    /// PEM: the mesh's root certificates.
    pub trust_anchors_pem: String,
    /// `None`: no workload identity, only TLS to the control plane (a pod opted out of
    /// identity in a mesh whose control plane serves TLS).
    pub token: Option<TokenSource>,
    pub namespace: String,
    pub service_account: String,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "the trust anchors hold no PEM certificate; give the mesh's CA certificate (PEM) to --identity-trust-anchors"
    )]
    NoTrustAnchors,
    #[error("a trust anchor is not a usable CA certificate: {0}; check --identity-trust-anchors")]
    BadTrustAnchor(String),
    #[error(
        "cannot read the identity token {path}: {source}; check --identity-token-file (in Kubernetes, the injector's projected token volume)"
    )]
    Token { path: PathBuf, source: std::io::Error },
    #[error("cannot generate the workload key or its signing request: {0}")]
    Key(String),
    #[error("cannot build the TLS configuration: {0}")]
    Tls(String),
    #[error("no identity token: give --identity-token-file or --identity-token")]
    NoToken,
}

/// The certificate in use, with what it says.
pub struct Current {
    pub key: Arc<CertifiedKey>,
    pub identity: Identity,
    /// `identity.dns_name()`: the SNI a mesh client sends to reach this sidecar.
    pub dns_name: String,
    pub not_after: SystemTime,
}

/// The current certificate, swapped atomically on renewal; rustls reads it at every
/// handshake through the resolvers in [`tls`].
#[derive(Default)]
pub struct CertSlot {
    current: ArcSwapOption<Current>,
}

impl std::fmt::Debug for CertSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let current = self.current.load();
        f.debug_struct("CertSlot")
            .field("identity", &current.as_ref().map(|c| c.identity.to_string()))
            .finish()
    }
}

impl CertSlot {
    pub fn load(&self) -> Option<Arc<Current>> {
        self.current.load_full()
    }
}

/// This sidecar's identity and the TLS configurations that use it.
pub struct MeshIdentity {
    pub options: IdentityOptions,
    pub slot: Arc<CertSlot>,
    pub tls: tls::Configs,
    key: rcgen::KeyPair,
    ready: watch::Sender<bool>,
}

impl MeshIdentity {
    pub fn new(options: IdentityOptions) -> Result<Arc<Self>, IdentityError> {
        let roots = Arc::new(parse_trust_anchors(&options.trust_anchors_pem)?);
        let key = rcgen::KeyPair::generate().map_err(|e| IdentityError::Key(e.to_string()))?;
        let slot = Arc::new(CertSlot::default());
        let tls = tls::Configs::new(roots, slot.clone())?;
        Ok(Arc::new(Self { options, slot, tls, key, ready: watch::channel(false).0 }))
    }

    /// The identity in use, once the first certificate arrived.
    pub fn current(&self) -> Option<Arc<Current>> {
        self.slot.load()
    }

    /// Whether this sidecar gets a workload certificate (it has a token), rather than
    /// only verifying the control plane.
    pub fn has_workload_identity(&self) -> bool {
        self.options.token.is_some()
    }

    /// Resolves once a certificate is in place.
    pub async fn ready(&self) {
        let mut rx = self.ready.subscribe();
        let _ = rx.wait_for(|r| *r).await;
    }

    fn install(&self, current: Current) {
        self.slot.current.store(Some(Arc::new(current)));
        self.ready.send_replace(true);
    }
}

/// Parses the PEM trust anchors into a root store; every certificate must be usable.
pub fn parse_trust_anchors(pem: &str) -> Result<RootCertStore, IdentityError> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let cert = cert.map_err(|e| IdentityError::BadTrustAnchor(e.to_string()))?;
        roots.add(cert).map_err(|e| IdentityError::BadTrustAnchor(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(IdentityError::NoTrustAnchors);
    }
    Ok(roots)
}

/// When to renew a certificate valid from `issued` to `not_after`: at two thirds of its
/// lifetime, measured from now when the clock says it was issued in the future.
pub fn renew_at(issued: SystemTime, not_after: SystemTime) -> Duration {
    let now = SystemTime::now();
    let lifetime = not_after.duration_since(issued).unwrap_or_default();
    let due = issued + lifetime * 2 / 3;
    due.duration_since(now).unwrap_or_default()
}

/// The SPIFFE ID in a certificate's URI SAN, when it has exactly one workload identity.
pub fn peer_identity(cert: &CertificateDer<'_>) -> Option<Identity> {
    ballast_api::identity::from_certificate(cert.as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renews_at_two_thirds_of_the_lifetime() {
        let now = SystemTime::now();
        let due = renew_at(now, now + Duration::from_secs(3 * 3600));
        assert!(due <= Duration::from_secs(2 * 3600) && due > Duration::from_secs(2 * 3600 - 5), "{due:?}");
        // Already past two thirds: renew at once.
        assert_eq!(renew_at(now - Duration::from_secs(100), now + Duration::from_secs(10)), Duration::ZERO);
    }

    #[test]
    fn trust_anchors_must_hold_a_certificate() {
        assert!(matches!(parse_trust_anchors("not pem"), Err(IdentityError::NoTrustAnchors)));
        let ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut ca = ca;
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = ca.self_signed(&key).unwrap();
        assert_eq!(parse_trust_anchors(&cert.pem()).unwrap().len(), 1);
    }

    #[test]
    fn reads_the_spiffe_id_from_the_uri_san() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["a.example".to_owned()]).unwrap();
        params
            .subject_alt_names
            .push(rcgen::SanType::URI("spiffe://cluster.local/ns/shop/sa/web".try_into().unwrap()));
        let cert = params.self_signed(&key).unwrap();
        let id = peer_identity(cert.der()).unwrap();
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/web");
        // Two workload identities in one certificate: none is trusted.
        params
            .subject_alt_names
            .push(rcgen::SanType::URI("spiffe://cluster.local/ns/shop/sa/admin".try_into().unwrap()));
        assert!(peer_identity(params.self_signed(&key).unwrap().der()).is_none());
    }
}
