//! An in-process control plane with workload identity on (a CA it generates in its
//! embedded store) and workload identities certified by it through the sidecar's own
//! code (`MeshIdentity`, `certify::run`), so the certificates and rustls configurations
//! measured are the ones sidecars use. Shared by the mTLS scenarios of the harness, the
//! handshake benchmarks of `hot_paths.rs` and the end-to-end `tests/mtls.rs` (included
//! there by path).

use std::sync::Arc;
use std::time::Duration;

use ballast_control_plane::identity::{IdentityOptions as CaOptions, create_bootstrap_token};
use ballast_control_plane::keys::Keys;
use ballast_control_plane::server::{ControlPlane, Options};
use ballast_control_plane::store::Store;
use ballast_sidecar::drain::Shutdown;
use ballast_sidecar::identity::{IdentityOptions, MeshIdentity, TokenSource, certify};
use ballast_sidecar::metrics::Metrics;

/// The control plane, on a runtime of its own (one thread) that runs while the caller
/// measures.
pub struct MeshCa {
    pub rt: tokio::runtime::Runtime,
    pub cp: Option<ControlPlane>,
    pub store: Store,
    /// PEM: the CA certificate sidecars are given as `--identity-trust-anchors`.
    pub anchors: String,
    /// Ends the renewal loops of the identities made by [`MeshCa::workload`].
    renewals: Shutdown,
}

impl MeshCa {
    /// With the control plane's default certificate lifetime (24 h).
    pub fn start() -> Result<Self, String> {
        Self::with_lifetime(CaOptions::default().certificate_lifetime)
    }

    /// With certificates valid for `lifetime` (short ones make tests renew).
    pub fn with_lifetime(lifetime: Duration) -> Result<Self, String> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let store = Store::memory();
        let identity = CaOptions { certificate_lifetime: lifetime, ..CaOptions::default() };
        let opts = Options { identity: Some(identity), ..Options::loopback("bench") };
        let cp = rt
            .block_on(ControlPlane::start_on(store.clone(), opts))
            .map_err(|e| format!("control plane: {e}"))?;
        let anchors =
            cp.trust_anchors_pem().ok_or("the control plane has identity on but no trust anchors")?;
        Ok(Self { rt, cp: Some(cp), store, anchors, renewals: Shutdown::new() })
    }

    /// The gRPC URL sidecars are given as `--control-plane`.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.cp.as_ref().map_or(0, |cp| cp.grpc_addr.port()))
    }

    /// A bootstrap token for `namespace/service_account`, valid for a day.
    pub fn token(&self, namespace: &str, service_account: &str) -> Result<String, String> {
        let keys = Keys::new("/ballast");
        self.rt
            .block_on(create_bootstrap_token(
                &self.store,
                &keys,
                namespace,
                service_account,
                Duration::from_secs(24 * 3600),
            ))
            .map_err(|e| format!("bootstrap token: {e}"))
    }

    /// The flags that make a `ballast-sidecar run` join this mesh as `pod` of
    /// `namespace/service_account` (with a fresh bootstrap token); `--control-plane` is
    /// [`MeshCa::url`].
    pub fn sidecar_args(
        &self,
        namespace: &str,
        pod: &str,
        service_account: &str,
    ) -> Result<Vec<String>, String> {
        Ok(vec![
            "--namespace".to_owned(),
            namespace.to_owned(),
            "--pod".to_owned(),
            pod.to_owned(),
            "--service-account".to_owned(),
            service_account.to_owned(),
            // `=`: the PEM starts with dashes, which would read as a flag.
            format!("--identity-trust-anchors={}", self.anchors),
            "--identity-token".to_owned(),
            self.token(namespace, service_account)?,
        ])
    }

    /// A workload identity for `namespace/service_account` in this process, holding a
    /// certificate the control plane issued (within 10 s).
    pub fn workload(&self, namespace: &str, service_account: &str) -> Result<Arc<MeshIdentity>, String> {
        let options = IdentityOptions {
            trust_anchors_pem: self.anchors.clone(),
            token: Some(TokenSource::Literal(self.token(namespace, service_account)?)),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        };
        let identity = MeshIdentity::new(options).map_err(|e| e.to_string())?;
        self.rt.spawn(certify::run(
            identity.clone(),
            vec![self.url()],
            Metrics::new(),
            self.renewals.clone(),
        ));
        self.rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(10), identity.ready()).await })
            .map_err(|_| format!("no certificate for {namespace}/{service_account} within 10 s"))?;
        Ok(identity)
    }
}

impl Drop for MeshCa {
    fn drop(&mut self) {
        self.renewals.start();
        if let Some(cp) = self.cp.take() {
            self.rt.block_on(cp.stop());
        }
    }
}
