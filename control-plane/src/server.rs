//! `ballast-control-plane`: the store, the mesh sync, the replica's session, the push
//! stream on `--grpc-addr` and the admin API on `--admin-addr`, wired together; with
//! `--kubernetes`, the Kubernetes sync too ([`crate::kubernetes`]).
//!
//! Stopping (SIGTERM, or [`ControlPlane::stop`]) ends every sidecar stream without
//! deregistering anything, so the sidecars move to another replica and re-register
//! there while their callers notice nothing; then the servers stop. The Kubernetes sync
//! stops first and frees its lock, so another replica takes it over at once.
//!
//! With workload identity ([`Options::identity`], see [`crate::identity`]) both ports
//! speak TLS with a certificate from the mesh CA, the gRPC port also serves
//! `Identity/Certify`, and the admin API wants the admin token. Without it, both are
//! plain text, as they always were.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminContext, AdminIdentity};
use crate::identity::certify::{Certifier, CertifyContext};
use crate::identity::{IdentityError, IdentityOptions, IdentityState};
use crate::keys::Keys;
use crate::kubernetes::{KubernetesError, KubernetesSync};
use crate::metrics::Metrics;
use crate::push::{Push, PushContext};
use crate::session::Session;
use crate::store::{Store, StoreError};
use crate::sync::MeshSync;

#[derive(Debug, Clone)]
pub struct Options {
    /// etcd endpoints; empty: the embedded store.
    pub etcd: Vec<String>,
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub prefix: String,
    pub lease_ttl: Duration,
    /// This replica's name in proxy statuses.
    pub replica: String,
    /// How often the store's history is compacted (by one replica; etcd only).
    pub compact_every: Duration,
    /// Mirror Kubernetes into the store (`--kubernetes`), with the client
    /// [`crate::kubernetes::client`] builds.
    pub kubernetes: bool,
    /// Workload identity (CA, Certify, TLS on both ports, admin token); `None`: off,
    /// plain gRPC and HTTP.
    pub identity: Option<IdentityOptions>,
}

/// How often the store's history is compacted by default.
pub const DEFAULT_COMPACT_EVERY: Duration = Duration::from_secs(300);

impl Options {
    /// One replica named `replica` on loopback, on ports the system picks, with the
    /// default prefix, lease and compaction: the demo's, the tests' and the benchmark's.
    pub fn loopback(replica: &str) -> Self {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        Self {
            etcd: Vec::new(),
            grpc_addr: any,
            admin_addr: any,
            prefix: crate::keys::DEFAULT_PREFIX.to_owned(),
            lease_ttl: crate::session::DEFAULT_TTL,
            replica: replica.to_owned(),
            compact_every: DEFAULT_COMPACT_EVERY,
            kubernetes: false,
            identity: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Kubernetes(#[from] KubernetesError),
    #[error("workload identity: {0}")]
    Identity(#[from] IdentityError),
    #[error("cannot serve gRPC with TLS: {0}")]
    GrpcTls(String),
    #[error(
        "cannot listen on {addr} ({role}): {source}; is another process using it? pass --{role}-addr to choose another"
    )]
    Bind { role: &'static str, addr: SocketAddr, source: std::io::Error },
}

/// A running control plane.
pub struct ControlPlane {
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub store: Store,
    stopping: CancellationToken,
    grpc: tokio::task::JoinHandle<()>,
    admin: tokio::task::JoinHandle<()>,
    compactor: tokio::task::AbortHandle,
    kubernetes: Option<KubernetesSync>,
    trust_anchors_pem: Option<String>,
    admin_token: Option<String>,
    _sync: Arc<MeshSync>,
    _session: Session,
}

impl ControlPlane {
    /// Connects to the store and starts serving.
    pub async fn start(opts: Options) -> Result<Self, ServeError> {
        let store = if opts.etcd.is_empty() { Store::memory() } else { Store::etcd(&opts.etcd).await? };
        Self::start_on(store, opts).await
    }

    /// Starts serving on `store` (the demo and tests share an embedded store this way).
    /// With `opts.kubernetes`, builds the Kubernetes client first: no configuration is an
    /// error here, at start-up, not a sync that never starts.
    pub async fn start_on(store: Store, opts: Options) -> Result<Self, ServeError> {
        let client = if opts.kubernetes { Some(crate::kubernetes::client().await?) } else { None };
        Self::start_with(store, opts, client).await
    }

    /// [`Self::start_on`] with the Kubernetes sync on `client` when given (the tests'
    /// mock API server), whatever `opts.kubernetes` says.
    pub async fn start_with(
        store: Store,
        opts: Options,
        client: Option<kube::Client>,
    ) -> Result<Self, ServeError> {
        let bind = |role, addr| async move {
            TcpListener::bind(addr).await.map_err(|source| ServeError::Bind { role, addr, source })
        };
        let grpc_listener = bind("grpc", opts.grpc_addr).await?;
        let admin_listener = bind("admin", opts.admin_addr).await?;
        let grpc_addr = grpc_listener.local_addr().unwrap_or(opts.grpc_addr);
        let admin_addr = admin_listener.local_addr().unwrap_or(opts.admin_addr);

        let keys = Keys::new(&opts.prefix);
        let metrics = Metrics::new();
        let identity = match opts.identity.clone() {
            Some(o) => Some(
                IdentityState::start(
                    o,
                    &store,
                    &keys,
                    client.as_ref(),
                    &[grpc_addr, admin_addr, opts.grpc_addr],
                )
                .await?,
            ),
            None => None,
        };
        let sync = Arc::new(MeshSync::start(store.clone(), keys.clone()));
        let session = Session::start(store.clone(), opts.lease_ttl, metrics.clone());
        let stopping = CancellationToken::new();
        tokio::spawn(watch_health(sync.clone(), metrics.clone(), stopping.clone()));
        let compactor = tokio::spawn(crate::compactor::run(
            store.clone(),
            opts.prefix.clone(),
            session.lease.clone(),
            opts.compact_every,
            metrics.clone(),
        ));

        let push = Push::new(Arc::new(PushContext {
            store: store.clone(),
            writer: crate::push::Writer::start(store.clone()),
            keys: keys.clone(),
            mesh: sync.mesh.clone(),
            revision: sync.revision.clone(),
            changes: sync.changes.clone(),
            lease: session.lease.clone(),
            metrics: metrics.clone(),
            replica: opts.replica.clone(),
            stopping: stopping.clone(),
            trust_domain: identity.as_ref().map(|i| i.trust_domain.clone()),
        }));
        let mut grpc_server = tonic::transport::Server::builder()
            // A sidecar whose host vanished sends no FIN: pings find it, and its
            // stream ends (and its endpoint goes) within about the lease TTL.
            .http2_keepalive_interval(Some(Duration::from_secs(5)))
            .http2_keepalive_timeout(Some(Duration::from_secs(5)));
        let mut certifier = None;
        if let Some(id) = &identity {
            grpc_server = grpc_server
                .tls_config(crate::identity::tls::grpc_config(&id.serving, id.authority.certificate_pem()))
                .map_err(|e| ServeError::GrpcTls(ballast_api::errors::chain(&e)))?;
            metrics.ca_expiry.set(id.authority.not_after());
            certifier = Some(Certifier::new(Arc::new(CertifyContext {
                authority: id.authority.clone(),
                trust_domain: id.trust_domain.clone(),
                lifetime: id.options.certificate_lifetime,
                store: store.clone(),
                keys: keys.clone(),
                client: client.clone(),
                metrics: metrics.clone(),
            })));
        }
        let admin_tls = match &identity {
            Some(id) => Some(crate::identity::tls::admin_acceptor(&id.serving).map_err(IdentityError::from)?),
            None => None,
        };
        let incoming = tonic::transport::server::TcpIncoming::from(grpc_listener).with_nodelay(Some(true));
        let grpc_stop = stopping.clone();
        let grpc = tokio::spawn(async move {
            let served = grpc_server
                .add_service(push.into_server())
                .add_optional_service(certifier.map(Certifier::into_server))
                .serve_with_incoming_shutdown(incoming, grpc_stop.cancelled_owned())
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "the push server failed");
            }
        });
        if let (Some(id), Some(client)) = (&identity, &client) {
            tokio::spawn(crate::identity::anchors::keep_publishing(
                client.clone(),
                id.options.namespace.clone(),
                id.authority.certificate_pem().to_owned(),
                stopping.clone(),
            ));
        }
        let kubernetes = client.map(|client| {
            KubernetesSync::start(client, store.clone(), keys.clone(), session.lease.clone(), metrics.clone())
        });
        let admin = tokio::spawn(admin::serve(
            admin_listener,
            Arc::new(AdminContext {
                store: store.clone(),
                keys,
                sync: sync.clone(),
                lease: session.lease.clone(),
                metrics,
                kubernetes: kubernetes.as_ref().map(KubernetesSync::state),
                identity: identity.as_ref().map(|id| AdminIdentity {
                    admin_token: id.admin_token.clone(),
                    trust_domain: id.trust_domain.clone(),
                }),
            }),
            admin_tls,
            stopping.clone(),
        ));
        tracing::info!(%grpc_addr, %admin_addr, store = %store.describe(), replica = %opts.replica, kubernetes = kubernetes.is_some(), identity = identity.is_some(), "ballast-control-plane started");
        Ok(Self {
            grpc_addr,
            admin_addr,
            store,
            stopping,
            grpc,
            admin,
            compactor: compactor.abort_handle(),
            kubernetes,
            trust_anchors_pem: identity.as_ref().map(|id| id.authority.certificate_pem().to_owned()),
            admin_token: identity.as_ref().map(|id| id.admin_token.clone()),
            _sync: sync,
            _session: session,
        })
    }

    /// The mesh's trust anchors (the CA certificate, PEM) with identity on: what a
    /// sidecar or `ballastctl --ca-file` must trust to talk to this control plane.
    pub fn trust_anchors_pem(&self) -> Option<String> {
        self.trust_anchors_pem.clone()
    }

    /// The admin API's bearer token with identity on (the configured one, or the one
    /// generated when [`IdentityOptions::admin_token`] was `None`).
    pub fn admin_token(&self) -> Option<&str> {
        self.admin_token.as_deref()
    }

    /// The URL scheme of both ports: `https` with identity on, else `http`.
    pub fn scheme(&self) -> &'static str {
        if self.trust_anchors_pem.is_some() { "https" } else { "http" }
    }

    /// The Kubernetes sync's state, with `--kubernetes`.
    pub fn kubernetes(&self) -> Option<tokio::sync::watch::Receiver<crate::kubernetes::SyncState>> {
        self.kubernetes.as_ref().map(KubernetesSync::state)
    }

    /// Ends every sidecar stream (their registrations stay for the next replica) and
    /// stops serving.
    pub async fn stop(mut self) {
        if let Some(kubernetes) = self.kubernetes.take() {
            kubernetes.stop().await;
        }
        self.stopping.cancel();
        self.compactor.abort();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.grpc).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.admin).await;
    }
}

/// Mirrors the sync's state into metrics.
async fn watch_health(sync: Arc<MeshSync>, metrics: Metrics, stopping: CancellationToken) {
    let mut connected = sync.connected.clone();
    let mut revision = sync.revision.clone();
    loop {
        metrics.store_connected.set(i64::from(*connected.borrow_and_update()));
        metrics.mesh_revision.set(*revision.borrow_and_update());
        tokio::select! {
            _ = stopping.cancelled() => return,
            r = connected.changed() => if r.is_err() { return },
            r = revision.changed() => if r.is_err() { return },
        }
    }
}

/// The default replica name: the pod's (`POD_NAME`), else `<host>-<pid>`.
pub fn default_replica_name() -> String {
    if let Ok(pod) = std::env::var("POD_NAME")
        && !pod.is_empty()
    {
        return pod;
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "control-plane".into());
    format!("{host}-{}", std::process::id())
}
