//! Workload identity (issue 7): the mesh's CA, the `Identity/Certify` gRPC service that
//! gives each sidecar a short-lived certificate for its service account, and TLS on the
//! control plane's own ports.
//!
//! Off by default ([`crate::server::Options::identity`] is `None`): the control plane
//! then serves plain gRPC and plain HTTP exactly as before, and no sidecar gets an
//! identity. On (`--identity`, or any `--ca-*` flag):
//!
//! 1. the CA is loaded or created ([`source`]: files, a Kubernetes Secret, or generated
//!    into the store so replicas share it);
//! 2. a serving certificate for the control plane is signed ([`tls`]); the gRPC port
//!    and the admin port speak TLS with it;
//! 3. `Identity/Certify` ([`certify`]) serves next to `Discovery` on the gRPC port,
//!    authenticating sidecars with bootstrap tokens ([`tokens`]) or, with
//!    `--kubernetes`, service-account tokens checked by a TokenReview ([`review`]);
//! 4. a push stream opened with a client certificate records that certificate's SPIFFE
//!    ID as the sidecar's identity, and so its endpoint's ([`crate::push`]);
//! 5. with `--kubernetes`, the CA certificate is published in ConfigMap
//!    `ballast-trust-anchors` for the injector to mount ([`anchors`]);
//! 6. the admin API (not `/metrics`, `/live`, `/ready`) requires the admin token.
//!
//! Read [`ca`] for what a certificate contains and why the CSR's names are ignored.

pub mod anchors;
pub mod ca;
pub mod certify;
pub mod review;
pub mod source;
pub mod tls;
pub mod tokens;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use tokens::create_bootstrap_token;

use crate::identity::ca::{Authority, CaError, Serving};
use crate::identity::source::LoadError;
use crate::keys::Keys;
use crate::store::Store;

/// A workload certificate's lifetime when none is configured.
pub const DEFAULT_CERTIFICATE_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// The serving certificate's lifetime (cut at the CA's expiry).
pub const SERVING_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// The control plane's namespace when `POD_NAMESPACE` is not set.
pub const DEFAULT_NAMESPACE: &str = "ballast-system";

/// Where the CA comes from (see [`source`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaSource {
    /// PEM files: the certificate and its private key (PKCS#8).
    Files { cert: PathBuf, key: PathBuf },
    /// A Kubernetes Secret with `ca.crt` and `ca.key`, created with a generated CA when
    /// missing. Needs the Kubernetes client (`--kubernetes`).
    Secret { namespace: String, name: String },
    /// Generated once and kept in the store (`<prefix>/identity/ca`), shared by every
    /// replica on that store. The key is then readable by whoever reads the store:
    /// for laptops, the demo and tests; production should use files or a Secret.
    Generated,
}

/// Workload identity's configuration.
#[derive(Debug, Clone)]
pub struct IdentityOptions {
    /// The SPIFFE trust domain (`--trust-domain`, default `cluster.local`).
    pub trust_domain: String,
    pub ca: CaSource,
    /// How long a workload certificate is valid (`--certificate-lifetime`).
    pub certificate_lifetime: Duration,
    /// More names for the serving certificate (`--tls-name`).
    pub server_names: Vec<String>,
    /// The bearer token of the admin API (`--admin-token-file`); `None`: a random one,
    /// which [`crate::server::ControlPlane::admin_token`] tells the embedding caller.
    pub admin_token: Option<String>,
    /// The control plane's namespace: its Service's DNS names in the serving
    /// certificate and where the trust-anchor ConfigMap goes (`POD_NAMESPACE`, default
    /// `ballast-system`).
    pub namespace: String,
}

impl Default for IdentityOptions {
    /// A generated CA in the store, the default trust domain and lifetime, a random admin
    /// token: what the demo and the tests use.
    fn default() -> Self {
        Self {
            trust_domain: ballast_api::identity::DEFAULT_TRUST_DOMAIN.to_owned(),
            ca: CaSource::Generated,
            certificate_lifetime: DEFAULT_CERTIFICATE_LIFETIME,
            server_names: Vec::new(),
            admin_token: None,
            namespace: default_namespace(),
        }
    }
}

/// `POD_NAMESPACE`, else [`DEFAULT_NAMESPACE`].
pub fn default_namespace() -> String {
    std::env::var("POD_NAMESPACE")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned())
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "--trust-domain {0:?} is not a trust domain (lowercase letters, digits, '-' and '.', like cluster.local)"
    )]
    TrustDomain(String),
    #[error("--certificate-lifetime must be at least 1s")]
    Lifetime,
    #[error("--admin-token-file: the admin token is empty; write a long random string into the file")]
    EmptyAdminToken,
    #[error("{0}")]
    Load(#[from] LoadError),
    #[error("cannot sign the control plane's serving certificate: {0}")]
    Serving(#[from] CaError),
    #[error("cannot set up TLS on the admin port: {0}")]
    Tls(#[from] rustls::Error),
    #[error("the system's random source failed; cannot make an admin token")]
    Random,
}

/// Identity as a running control plane holds it.
pub struct IdentityState {
    pub authority: Arc<Authority>,
    pub serving: Serving,
    pub trust_domain: String,
    pub admin_token: String,
    pub options: IdentityOptions,
}

impl IdentityState {
    /// Loads the CA and signs the serving certificate for `binds` and the configured names.
    pub async fn start(
        options: IdentityOptions,
        store: &Store,
        keys: &Keys,
        client: Option<&kube::Client>,
        binds: &[SocketAddr],
    ) -> Result<Self, IdentityError> {
        if !ballast_api::identity::dns_subdomain(&options.trust_domain) {
            return Err(IdentityError::TrustDomain(options.trust_domain.clone()));
        }
        if options.certificate_lifetime < Duration::from_secs(1) {
            return Err(IdentityError::Lifetime);
        }
        if options.certificate_lifetime < Duration::from_secs(3600) {
            tracing::warn!(lifetime = ?options.certificate_lifetime, "workload certificates live under an hour: sidecars will renew very often");
        }
        let admin_token = match &options.admin_token {
            Some(t) if t.trim().is_empty() => return Err(IdentityError::EmptyAdminToken),
            Some(t) => t.trim().to_owned(),
            None => tokens::random_secret().ok_or(IdentityError::Random)?,
        };
        // The process's rustls provider, for tonic's TLS (ring is the only one built).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let authority = source::load(&options.ca, &options.trust_domain, store, keys, client).await?;
        let (names, ips) = tls::serving_names(&options.server_names, &options.namespace, binds);
        let serving = authority.serving(&names, &ips, SERVING_LIFETIME)?;
        Ok(Self {
            authority: Arc::new(authority),
            serving,
            trust_domain: options.trust_domain.clone(),
            admin_token,
            options,
        })
    }
}

/// Compares a presented admin token with the expected one in constant time (their
/// SHA-256 digests, so neither the content nor the length leaks through timing).
pub fn admin_token_matches(presented: &str, expected: &str) -> bool {
    let digest = |s: &str| ring::digest::digest(&ring::digest::SHA256, s.as_bytes());
    let (a, b) = (digest(presented), digest(expected));
    #[allow(deprecated)]
    ring::constant_time::verify_slices_are_equal(a.as_ref(), b.as_ref()).is_ok()
}
