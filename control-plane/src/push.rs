//! The push stream (DESIGN §3): `ballast.v1.Discovery/Stream`, one per sidecar.
//!
//! A stream goes: Hello (who the sidecar is and what it calls) → a full snapshot of its
//! view at the mesh's revision → an incremental update each time its view changes, each
//! versioned with the revision it was built from. The sidecar acks or nacks each version.
//!
//! * **Views, not the mesh.** Each sidecar gets [`Mesh::view`](crate::mesh::Mesh::view) of its [`Scope`], and an
//!   update holds only the resources of that view that changed. A mesh change wakes
//!   every stream, but one whose scope it does not reach ([`Scope::reaches`]) goes back
//!   to sleep without building its view.
//! * **After a nack** the sidecar kept its previous configuration, so this side no longer
//!   knows what it has: the next update is a full snapshot. It is not re-sent at once,
//!   since the same content would be refused again.
//! * **No going back.** A sidecar that reconnects says which version it has; the stream
//!   waits (briefly) for this replica's mesh to reach it, so a replica that lags behind
//!   another does not push an older configuration.
//! * **Registration.** While the stream lives, the sidecar's endpoint (for its
//!   `service`) and its status (what it acked or refused, for `ballastctl get proxies`
//!   and `apply --wait`) are kept in the store under the replica's lease
//!   ([`crate::session`]). When the sidecar ends the stream or its connection dies, both
//!   are deleted at once, unless a newer stream has written them since. When this
//!   replica stops, they are left for the sidecar's next replica to take over: deleting
//!   them would make its callers drop a healthy endpoint for the time of a reconnect.
//! * **Identity.** With workload identity on ([`crate::identity`]), a stream opened with
//!   a client certificate records that certificate's SPIFFE ID in the sidecar's status
//!   and its endpoint registration, so callers know to use mutual TLS to it. Only the
//!   certificate counts: what the Hello says is never identity.
//! * **Status writes** are coalesced: one in flight per stream, the latest status next.
//!   Across streams they are batched ([`Writer`]): a thousand sidecars acking one change
//!   make a handful of etcd transactions, not a thousand writes, each waiting its turn
//!   for an fsync ahead of the next `ballastctl apply`.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ballast_api::proto::v1::{self, FromSidecar, ToSidecar, discovery_server, from_sidecar};
use futures_util::Stream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::keys::{Key, Keys};
use crate::mesh::{ProxyStatus, Registration, Scope, View, parse_call};
use crate::metrics::Metrics;
use crate::store::{LeaseId, MAX_WRITES, Revision, Store, StoreError};
use crate::sync::{Change, SharedMesh};

/// How long a stream waits for this replica's mesh to reach the version a reconnecting
/// sidecar already has, before pushing what it has anyway.
const CATCH_UP: Duration = Duration::from_secs(2);
/// How long a sidecar has to say Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// Batches the streams' registration and status writes into store transactions.
///
/// While one transaction is in flight, the writes that arrive wait and go together in
/// the next (up to [`MAX_WRITES`]); a key queued twice is written once, with its last
/// value. Nothing waits on a timer: one lone write goes at once.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::UnboundedSender<Write>,
}

struct Write {
    key: String,
    value: Vec<u8>,
    lease: LeaseId,
    done: oneshot::Sender<Result<Revision, StoreError>>,
}

impl Writer {
    /// Starts the writer's task on `store`; it ends when every `Writer` is dropped.
    pub fn start(store: Store) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<Write>();
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                while batch.len() < MAX_WRITES {
                    match rx.try_recv() {
                        Ok(w) => batch.push(w),
                        Err(_) => break,
                    }
                }
                let mut writes: Vec<(String, Vec<u8>, Option<LeaseId>)> = Vec::with_capacity(batch.len());
                let mut waiting = Vec::with_capacity(batch.len());
                for w in batch {
                    match writes.iter_mut().find(|(k, _, _)| *k == w.key) {
                        Some(slot) => *slot = (w.key, w.value, Some(w.lease)),
                        None => writes.push((w.key, w.value, Some(w.lease))),
                    }
                    waiting.push(w.done);
                }
                let result = store.put_many(writes).await;
                for done in waiting {
                    let _ = done.send(result.clone());
                }
            }
        });
        Self { tx }
    }

    /// Writes `key` under `lease`; the revision it was written at.
    pub async fn put(&self, key: &str, value: Vec<u8>, lease: LeaseId) -> Result<Revision, StoreError> {
        let (done, result) = oneshot::channel();
        let w = Write { key: key.to_owned(), value, lease, done };
        if self.tx.send(w).is_err() {
            return Err(StoreError::Backend("the control plane is stopping".into()));
        }
        result.await.unwrap_or_else(|_| Err(StoreError::Backend("the control plane is stopping".into())))
    }
}

/// What the push streams share: the mesh and the means to register.
pub struct PushContext {
    pub store: Store,
    pub writer: Writer,
    pub keys: Keys,
    pub mesh: SharedMesh,
    pub revision: watch::Receiver<Revision>,
    pub changes: watch::Receiver<Arc<Change>>,
    pub lease: watch::Receiver<Option<LeaseId>>,
    pub metrics: Metrics,
    /// This replica's name, recorded in each proxy status.
    pub replica: String,
    /// Cancelled when the replica stops: every stream ends without deregistering.
    pub stopping: CancellationToken,
    /// With workload identity on, its trust domain: a stream's client certificate (if
    /// any, verified by the TLS handshake against the mesh CA) gives the sidecar its
    /// identity ([`crate::identity::tls::peer_identity`]). `None`: no identities.
    pub trust_domain: Option<String>,
}

/// The gRPC service.
#[derive(Clone)]
pub struct Push {
    ctx: Arc<PushContext>,
}

impl Push {
    pub fn new(ctx: Arc<PushContext>) -> Self {
        Self { ctx }
    }

    pub fn into_server(self) -> discovery_server::DiscoveryServer<Self> {
        discovery_server::DiscoveryServer::new(self)
            // A full snapshot of a large namespace can exceed tonic's 4 MiB default.
            .max_decoding_message_size(1 << 20)
            .max_encoding_message_size(64 << 20)
    }
}

type ToSidecarStream = Pin<Box<dyn Stream<Item = Result<ToSidecar, Status>> + Send>>;

#[tonic::async_trait]
impl discovery_server::Discovery for Push {
    type StreamStream = ToSidecarStream;

    async fn stream(
        &self,
        request: Request<Streaming<FromSidecar>>,
    ) -> Result<Response<ToSidecarStream>, Status> {
        let peer = request.remote_addr();
        // Identity comes only from the certificate the TLS handshake verified, never
        // from the Hello, which the sidecar writes as it likes.
        let identity = self.ctx.trust_domain.as_deref().and_then(|td| {
            let certs = request.peer_certs();
            crate::identity::tls::peer_identity(certs.as_deref().map(Vec::as_slice), td)
        });
        let mut inbound = request.into_inner();
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
            Ok(Ok(Some(FromSidecar { message: Some(from_sidecar::Message::Hello(h)) }))) => h,
            Ok(Ok(Some(_))) => return Err(Status::invalid_argument("the first message must be a Hello")),
            Ok(Ok(None)) => return Err(Status::cancelled("the stream ended before a Hello")),
            Ok(Err(status)) => return Err(status),
            Err(_) => return Err(Status::deadline_exceeded("no Hello within 10s")),
        };
        let mut sidecar = Sidecar::from_hello(hello).map_err(|e| Status::invalid_argument(e.to_string()))?;
        if let Some(id) = &identity
            && id.namespace != sidecar.status.namespace
        {
            // A certificate binds a workload to its namespace: it registers and
            // configures itself there only.
            return Err(Status::permission_denied(format!(
                "hello.namespace {:?} is not the namespace of the client certificate's identity {id}",
                sidecar.status.namespace
            )));
        }
        sidecar.status.identity = identity.map(|id| id.to_string());
        tracing::info!(pod = %sidecar.status.pod, namespace = %sidecar.status.namespace, identity = ?sidecar.status.identity, ?peer, "sidecar connected");
        let (tx, rx) = mpsc::channel(4);
        let (inbound_tx, inbound_rx) = mpsc::channel(16);
        // Read by a task of its own, so that the stream's loop only ever waits on
        // channels (cancel-safe in a select).
        let reader = tokio::spawn(async move {
            loop {
                let m = inbound.message().await;
                let end = !matches!(m, Ok(Some(_)));
                if inbound_tx.send(m).await.is_err() || end {
                    return;
                }
            }
        });
        tokio::spawn(serve(self.ctx.clone(), sidecar, inbound_rx, tx, reader.abort_handle()));
        let out = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
        Ok(Response::new(Box::pin(out)))
    }
}

/// A Hello that does not describe a sidecar this replica can serve.
#[derive(Debug, thiserror::Error)]
pub enum HelloError {
    #[error("hello.namespace {0:?} is not a DNS label (lowercase letters, digits and '-')")]
    Namespace(String),
    #[error("hello.pod {0:?} must be 1-253 characters without '/' or spaces (pass --pod to the sidecar)")]
    Pod(String),
    #[error("hello.service {0:?} is not a DNS label (lowercase letters, digits and '-')")]
    Service(String),
    #[error("hello.address {0:?} is not ip:port; a sidecar with --service must advertise where it listens")]
    Address(String),
    #[error("hello.calls: {0:?} is not name or name.namespace")]
    Call(String),
}

/// The sidecar as its Hello describes it.
#[derive(Debug, Clone)]
struct Sidecar {
    scope: Scope,
    status: ProxyStatus,
    have_version: Revision,
}

impl Sidecar {
    fn from_hello(h: v1::Hello) -> Result<Self, HelloError> {
        use ballast_api::policy::dns_label;
        if !dns_label(&h.namespace) {
            return Err(HelloError::Namespace(h.namespace));
        }
        if h.pod.is_empty()
            || h.pod.len() > 253
            || h.pod.contains(['/', ' '])
            || h.pod.chars().any(char::is_control)
        {
            return Err(HelloError::Pod(h.pod));
        }
        let service = (!h.service.is_empty()).then_some(h.service);
        if let Some(s) = &service
            && !dns_label(s)
        {
            return Err(HelloError::Service(s.clone()));
        }
        let address = (!h.address.is_empty()).then_some(h.address);
        if let Some(a) = &address
            && a.parse::<SocketAddr>().is_err()
        {
            return Err(HelloError::Address(a.clone()));
        }
        if service.is_some() && address.is_none() {
            return Err(HelloError::Address(String::new()));
        }
        let mut calls = Vec::new();
        for c in &h.calls {
            calls.push(parse_call(c, &h.namespace).ok_or_else(|| HelloError::Call(c.clone()))?);
        }
        let status = ProxyStatus {
            pod: h.pod,
            namespace: h.namespace.clone(),
            service: service.clone(),
            address,
            calls: calls.iter().map(|(ns, name)| format!("{name}.{ns}")).collect(),
            proxy_version: h.proxy_version,
            connected_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            ..Default::default()
        };
        let have_version = i64::try_from(h.have_version).unwrap_or(i64::MAX);
        Ok(Self { scope: Scope { namespace: h.namespace, service, calls }, status, have_version })
    }
}

/// Why a stream ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// The sidecar closed it or its connection died: deregister.
    Sidecar,
    /// This replica is stopping: leave the keys for the next replica.
    Stopping,
}

type Inbound = mpsc::Receiver<Result<Option<FromSidecar>, Status>>;

async fn serve(
    ctx: Arc<PushContext>,
    mut sidecar: Sidecar,
    mut inbound: Inbound,
    tx: mpsc::Sender<Result<ToSidecar, Status>>,
    reader: tokio::task::AbortHandle,
) {
    ctx.metrics.proxies_connected.inc();
    sidecar.status.replica = ctx.replica.clone();
    let (status_tx, status_rx) = watch::channel(sidecar.status.clone());
    let (end_tx, end_rx) = oneshot::channel();
    let registrar = tokio::spawn(register(ctx.clone(), sidecar.clone(), status_rx, end_rx));
    let end = push(&ctx, &mut sidecar, &mut inbound, &tx, &status_tx).await;
    tracing::info!(pod = %sidecar.status.pod, namespace = %sidecar.status.namespace, ?end, "sidecar stream ended");
    reader.abort();
    let _ = end_tx.send(end);
    // Deregistration runs to its end even though the stream is gone.
    let _ = registrar.await;
    ctx.metrics.proxies_connected.dec();
}

/// The stream's loop: push on changes, record acks and nacks, until it ends.
async fn push(
    ctx: &PushContext,
    sidecar: &mut Sidecar,
    inbound: &mut Inbound,
    tx: &mpsc::Sender<Result<ToSidecar, Status>>,
    status: &watch::Sender<ProxyStatus>,
) -> End {
    let mut revision = ctx.revision.clone();
    // Never push an empty view from a mesh not yet read: the sidecar would drop a
    // configuration that works. It waits with what it has (and `/ready` says why).
    let loaded = async {
        let _ = revision.wait_for(|r| *r > 0).await;
        if sidecar.have_version > 0 {
            let have = sidecar.have_version;
            let _ = tokio::time::timeout(CATCH_UP, revision.wait_for(|r| *r >= have)).await;
        }
    };
    tokio::select! {
        _ = loaded => {}
        _ = ctx.stopping.cancelled() => return End::Stopping,
        _ = tx.closed() => return End::Sidecar,
        _ = wait_end(inbound) => return End::Sidecar,
    }
    let mut changes = ctx.changes.clone();
    let mut seen = changes.borrow_and_update().generation;
    let mut last: Option<View> = None;
    let mut pending: Option<(Revision, Instant)> = None;
    loop {
        let (view, at) = {
            let mesh = ctx.mesh.read().unwrap_or_else(|p| p.into_inner());
            (mesh.view(&sidecar.scope), mesh.revision)
        };
        if let Some(msg) = diff(last.as_ref(), &view, at) {
            let kind = if msg.full { "full" } else { "incremental" };
            if tx.send(Ok(msg)).await.is_err() {
                return End::Sidecar;
            }
            ctx.metrics.pushes.with_label_values(&[kind]).inc();
            pending = Some((at, Instant::now()));
            last = Some(view);
            status.send_modify(|s| s.sent = at);
        }
        // Wait for something that may change the view, handling acks meanwhile.
        loop {
            tokio::select! {
                biased;
                _ = ctx.stopping.cancelled() => return End::Stopping,
                m = inbound.recv() => match m {
                    Some(Ok(Some(FromSidecar { message: Some(from_sidecar::Message::Ack(ack)) }))) => {
                        let version = i64::try_from(ack.version).unwrap_or(i64::MAX);
                        if let Some((sent, at)) = pending
                            && sent == version
                        {
                            ctx.metrics.push_ack_seconds.observe(at.elapsed().as_secs_f64());
                            pending = None;
                        }
                        status.send_modify(|s| {
                            s.acked = s.acked.max(version);
                            if s.nack.as_ref().is_some_and(|n| n.version <= version) {
                                s.nack = None;
                            }
                        });
                    }
                    Some(Ok(Some(FromSidecar { message: Some(from_sidecar::Message::Nack(nack)) }))) => {
                        let version = i64::try_from(nack.version).unwrap_or(i64::MAX);
                        ctx.metrics.nacks.inc();
                        tracing::warn!(
                            pod = %sidecar.status.pod, namespace = %sidecar.status.namespace, version,
                            reason = %nack.reason, "sidecar refused a configuration; it keeps its previous one"
                        );
                        if pending.is_some_and(|(sent, _)| sent == version) {
                            pending = None;
                        }
                        // It kept what it had before: the next push must be whole.
                        last = None;
                        status.send_modify(|s| {
                            s.nack = Some(crate::mesh::Nack { version, reason: nack.reason.clone() })
                        });
                    }
                    Some(Ok(Some(other))) => {
                        tracing::warn!(pod = %sidecar.status.pod, message = ?other, "unexpected message from a sidecar; ignored");
                    }
                    // Ended by the sidecar, or its connection broke.
                    Some(Ok(None)) | Some(Err(_)) | None => return End::Sidecar,
                },
                r = changes.changed() => {
                    if r.is_err() {
                        return End::Stopping;
                    }
                    let change = changes.borrow_and_update().clone();
                    let reaches = change.since(seen).is_none_or(|services| sidecar.scope.reaches(services));
                    seen = change.generation;
                    // After a nack, any reaching change brings the full snapshot.
                    if reaches {
                        break;
                    }
                }
                _ = tx.closed() => return End::Sidecar,
            }
        }
    }
}

/// Resolves when the sidecar ends its side (before the first push, where nothing else
/// is expected from it).
async fn wait_end(inbound: &mut Inbound) {
    while let Some(Ok(Some(_))) = inbound.recv().await {}
}

/// The update from `last` (what the sidecar has) to `now`; `None` when nothing changed.
fn diff(last: Option<&View>, now: &View, version: Revision) -> Option<ToSidecar> {
    let resource = |key: &str, r: &crate::mesh::Resource| v1::Resource {
        kind: r.kind.to_owned(),
        key: key.to_owned(),
        json: r.json.to_vec(),
    };
    let version = u64::try_from(version).unwrap_or(0);
    let Some(last) = last else {
        return Some(ToSidecar {
            version,
            full: true,
            upserts: now.iter().map(|(k, r)| resource(k, r)).collect(),
            removals: Vec::new(),
        });
    };
    let upserts: Vec<v1::Resource> =
        now.iter().filter(|(k, r)| last.get(*k) != Some(*r)).map(|(k, r)| resource(k, r)).collect();
    let removals: Vec<String> =
        last.keys().filter(|k| !now.contains_key(*k)).map(|k| k.to_string()).collect();
    if upserts.is_empty() && removals.is_empty() {
        return None;
    }
    Some(ToSidecar { version, full: false, upserts, removals })
}

/// Keeps the sidecar's endpoint and status in the store while its stream lives; on
/// [`End::Sidecar`] deletes them (unless written since by a newer stream).
async fn register(
    ctx: Arc<PushContext>,
    sidecar: Sidecar,
    mut status: watch::Receiver<ProxyStatus>,
    mut end: oneshot::Receiver<End>,
) {
    let keys = &ctx.keys;
    let endpoint = match (&sidecar.scope.service, &sidecar.status.address) {
        (Some(service), Some(address)) => {
            let key = keys.key(&Key::Endpoint {
                namespace: sidecar.scope.namespace.clone(),
                service: service.clone(),
                id: address.clone(),
            });
            let value = Registration {
                address: address.clone(),
                pod: sidecar.status.pod.clone(),
                weight: 1,
                source: None,
                identity: sidecar.status.identity.clone(),
            };
            Some((key, serde_json::to_vec(&value).unwrap_or_default()))
        }
        _ => None,
    };
    let status_key =
        keys.key(&Key::Proxy { namespace: sidecar.scope.namespace.clone(), pod: sidecar.status.pod.clone() });
    // The revision of this stream's last write of each key, for the compare-and-delete.
    let mut written: Vec<(String, Revision)> = Vec::new();
    let mut lease_rx = ctx.lease.clone();
    let mut endpoint_done: Option<LeaseId> = None;
    let mut retry = RETRY_MIN;
    // `changed()` marks the value seen, so whether it is written yet is tracked here.
    let mut status_dirty = true;
    let why = loop {
        let lease = *lease_rx.borrow_and_update();
        let mut failed = false;
        if let Some(lease) = lease {
            // The endpoint once per lease; the status whenever it changed.
            if let Some((key, value)) = &endpoint
                && endpoint_done != Some(lease)
            {
                match ctx.writer.put(key, value.clone(), lease).await {
                    Ok(rev) => {
                        remember(&mut written, key, rev);
                        endpoint_done = Some(lease);
                    }
                    Err(e) => {
                        ctx.metrics.store_errors.with_label_values(&["register"]).inc();
                        tracing::warn!(%key, error = %e, "cannot register an endpoint; retrying");
                        failed = true;
                    }
                }
            }
            if !failed && status_dirty {
                let value = serde_json::to_vec(&*status.borrow_and_update()).unwrap_or_default();
                match ctx.writer.put(&status_key, value, lease).await {
                    Ok(rev) => {
                        remember(&mut written, &status_key, rev);
                        status_dirty = false;
                    }
                    Err(e) => {
                        ctx.metrics.store_errors.with_label_values(&["proxy_status"]).inc();
                        tracing::warn!(key = %status_key, error = %e, "cannot record a proxy status; retrying");
                        failed = true;
                    }
                }
            }
        }
        if failed {
            tokio::select! {
                e = &mut end => break e.unwrap_or(End::Sidecar),
                _ = tokio::time::sleep(retry) => {}
            }
            retry = (retry * 2).min(RETRY_MAX);
            continue;
        }
        retry = RETRY_MIN;
        tokio::select! {
            e = &mut end => break e.unwrap_or(End::Sidecar),
            r = status.changed() => {
                if r.is_err() {
                    break End::Sidecar;
                }
                status_dirty = true;
            }
            r = lease_rx.changed() => {
                if r.is_err() {
                    break End::Stopping;
                }
                // A new lease: everything is written again under it.
                written.clear();
                status_dirty = true;
            }
        }
    };
    if why == End::Sidecar {
        for (key, rev) in written {
            if let Err(e) = ctx.store.delete_if(&key, rev).await {
                ctx.metrics.store_errors.with_label_values(&["deregister"]).inc();
                tracing::warn!(%key, error = %e, "cannot deregister; the replica's lease will take it");
            }
        }
    }
}

fn remember(written: &mut Vec<(String, Revision)>, key: &str, rev: Revision) {
    match written.iter_mut().find(|(k, _)| k == key) {
        Some(w) => w.1 = rev,
        None => written.push((key.to_owned(), rev)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::Resource;

    fn res(json: &str) -> Resource {
        Resource { kind: "Service", json: json.as_bytes().into() }
    }

    #[test]
    fn diff_sends_only_what_changed() {
        let mut a = View::new();
        a.insert("Service/shop/a".into(), res("1"));
        a.insert("Service/shop/b".into(), res("2"));
        let full = diff(None, &a, 5).expect("first push");
        assert!(full.full);
        assert_eq!(full.upserts.len(), 2);
        assert_eq!(diff(Some(&a), &a.clone(), 6), None);
        let mut b = a.clone();
        b.insert("Service/shop/b".into(), res("3"));
        b.remove("Service/shop/a");
        b.insert("Service/shop/c".into(), res("4"));
        let up = diff(Some(&a), &b, 7).expect("changes");
        assert!(!up.full);
        assert_eq!(up.version, 7);
        let keys: Vec<&str> = up.upserts.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(keys, ["Service/shop/b", "Service/shop/c"]);
        assert_eq!(up.removals, ["Service/shop/a"]);
        // An empty view is still a first push: the sidecar learns it has nothing.
        assert!(diff(None, &View::new(), 1).is_some_and(|m| m.full && m.upserts.is_empty()));
    }

    #[test]
    fn hello_is_checked() {
        let ok = v1::Hello {
            pod: "web-1".into(),
            namespace: "shop".into(),
            service: "web".into(),
            address: "10.0.0.1:4143".into(),
            calls: vec!["catalog".into(), "search.other".into()],
            ..Default::default()
        };
        let s = Sidecar::from_hello(ok.clone()).expect("valid");
        assert_eq!(s.scope.calls, [("shop".into(), "catalog".into()), ("other".into(), "search".into())]);
        assert_eq!(s.status.calls, ["catalog.shop", "search.other"]);
        let bad = |f: fn(&mut v1::Hello)| {
            let mut h = ok.clone();
            f(&mut h);
            Sidecar::from_hello(h).expect_err("invalid").to_string()
        };
        assert!(bad(|h| h.namespace = "Shop".into()).contains("hello.namespace"));
        assert!(bad(|h| h.pod = "a/b".into()).contains("hello.pod"));
        assert!(bad(|h| h.address = "nowhere".into()).contains("hello.address"));
        assert!(bad(|h| h.address = String::new()).contains("must advertise"));
        assert!(bad(|h| h.calls = vec!["x_y".into()]).contains("hello.calls"));
    }
}
