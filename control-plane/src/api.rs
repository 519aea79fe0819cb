//! What `ballastctl` asks of the control plane, behind the admin listener's `/api/v1/`
//! (the HTTP side is [`crate::admin`]).
//!
//! * `apply` validates a multi-document YAML file as a whole (each document's fields, the
//!   file's own conflicts, then conflicts with what the store holds: one policy per
//!   target service, one service per virtual address and port) and writes nothing unless
//!   every document passes. It then writes each changed document; unchanged ones are not
//!   written, so re-applying a file is no change and nothing to wait for. The writes are
//!   one by one, like `kubectl apply`'s, not one transaction. The conflict check reads
//!   this replica's mesh, which trails the store by a watch event: two conflicting
//!   applies at the same instant through two replicas can both pass. Should that
//!   happen, a target's policy is the first by name in every view, and two Services on
//!   one address are refused by the sidecars (nack) and shown by `get proxies`.
//!   Documents carrying the Kubernetes sync's marker (`ballast.io/source: kubernetes`,
//!   [`crate::keys`]) are refused: the sync deletes what carries it. So is a document
//!   that would replace one the sync mirrored: it is changed in Kubernetes.
//!   [`stored_form`] and [`policy_conflict`] are shared with the sync
//!   ([`crate::kubernetes`]), so a policy from Kubernetes is stored exactly as one applied
//!   here and a conflict reads the same.
//! * `delete` refuses what the Kubernetes sync wrote: it would come back at the sync's
//!   next pass; the resource must be deleted in Kubernetes.
//! * `wait` answers when every sidecar a change reaches has acked a version at least the
//!   change's revision, reading the proxy statuses every replica writes to the store; it
//!   fails naming the sidecars that refused it, or on timeout those still behind.

use std::collections::BTreeSet;
use std::time::Duration;

use ballast_api::ResiliencePolicy;
use ballast_api::document::{Config, Document, parse_documents};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::admin::AdminContext;
use crate::keys::{Key, SOURCE_ANNOTATION, SOURCE_KUBERNETES};
use crate::mesh::{Mesh, Name, ProxyStatus};
use crate::store::Revision;

/// An answer other than 200, with a message for the operator.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    /// More to show (sidecars behind, sidecars that refused).
    pub details: Option<Value>,
}

impl ApiError {
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), details: None }
    }
    fn store(e: impl std::fmt::Display) -> Self {
        Self::new(503, format!("the store failed: {e}; nothing after this point was written"))
    }
}

fn name_of(doc: &Document) -> Name {
    let m = match doc {
        Document::Policy(p) => &p.metadata,
        Document::Service(s) => &s.metadata,
    };
    (m.namespace_or_default().to_owned(), m.name.clone())
}

fn key_of(doc: &Document) -> Key {
    let (namespace, name) = name_of(doc);
    match doc {
        Document::Policy(_) => Key::Policy { namespace, name },
        Document::Service(_) => Key::Service { namespace, name },
    }
}

/// The outcome of one applied document.
#[derive(Debug, Serialize, Deserialize)]
pub struct Applied {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    /// `created`, `configured` or `unchanged`.
    pub action: String,
}

/// A document as the store keeps it: its key, and its JSON with the namespace spelled
/// out (so what `get` shows needs no defaults). The one form for `apply` and for the
/// Kubernetes sync.
pub fn stored_form(doc: &Document) -> Result<(Key, Vec<u8>), serde_json::Error> {
    let (namespace, _) = name_of(doc);
    let value = match doc {
        Document::Policy(p) => {
            let mut p = p.clone();
            p.metadata.namespace = Some(namespace);
            serde_json::to_vec(&p)
        }
        Document::Service(s) => {
            let mut s = s.clone();
            s.metadata.namespace = Some(namespace);
            serde_json::to_vec(&s)
        }
    }?;
    Ok((key_of(doc), value))
}

/// Whether `metadata` carries the Kubernetes sync's marker.
pub fn is_synced(metadata: &ballast_api::ObjectMeta) -> bool {
    metadata.annotations.get(SOURCE_ANNOTATION).map(String::as_str) == Some(SOURCE_KUBERNETES)
}

/// Why `p` may not be stored while `other` targets the same service, or `None` when
/// they are one policy or target different services. The caller adds what to do.
pub fn policy_conflict(p: &ResiliencePolicy, other: &ResiliencePolicy) -> Option<String> {
    let name = |p: &ResiliencePolicy| (p.metadata.namespace_or_default().to_owned(), p.metadata.name.clone());
    let target = |p: &ResiliencePolicy| (p.target_namespace().to_owned(), p.spec.target_ref.service.clone());
    if name(p) == name(other) || target(p) != target(other) {
        return None;
    }
    let ((ns, n), (tns, t), (ons, on)) = (name(p), target(p), name(other));
    Some(format!(
        "ResiliencePolicy {ns}/{n}: spec.targetRef: service {tns}/{t} already has ResiliencePolicy {ons}/{on}"
    ))
}

pub async fn apply(ctx: &AdminContext, text: &str, source: &str) -> Result<Value, ApiError> {
    let docs = parse_documents(text, source).map_err(|e| ApiError::new(400, e.to_string()))?;
    if docs.is_empty() {
        return Err(ApiError::new(400, format!("{source}: no documents")));
    }
    for (line, doc) in &docs {
        let meta = match doc {
            Document::Policy(p) => &p.metadata,
            Document::Service(s) => &s.metadata,
        };
        if is_synced(meta) {
            return Err(ApiError::new(
                400,
                format!(
                    "{source}:{line}: {} {}: metadata.annotations: {SOURCE_ANNOTATION}: {SOURCE_KUBERNETES} is reserved for what the control plane mirrors from Kubernetes (it deletes such documents when their Kubernetes resource goes); remove the annotation",
                    doc.kind(),
                    doc.key()
                ),
            ));
        }
    }
    Config::from_documents(docs.clone(), source).map_err(|e| ApiError::new(400, e.to_string()))?;
    let mut services: BTreeSet<Name> = BTreeSet::new();
    {
        let mesh = ctx.sync.mesh.read().unwrap_or_else(|p| p.into_inner());
        for (line, doc) in &docs {
            check_against(&mesh, doc).map_err(|m| ApiError::new(409, format!("{source}:{line}: {m}")))?;
            affected(&mesh, doc, &mut services);
        }
    }
    let mut revision: Revision = 0;
    let mut results = Vec::new();
    for (_, doc) in docs {
        let (namespace, name) = name_of(&doc);
        let (key, value) = stored_form(&doc).map_err(|e| ApiError::new(500, e.to_string()))?;
        let key = ctx.keys.key(&key);
        let (current, at) = ctx.store.get(&key).await.map_err(ApiError::store)?;
        let action = match current {
            Some(kv) if kv.value == value => {
                revision = revision.max(at);
                "unchanged"
            }
            existing => {
                revision = ctx.store.put(&key, value, None).await.map_err(ApiError::store)?;
                if existing.is_some() { "configured" } else { "created" }
            }
        };
        results.push(Applied { kind: doc.kind().to_owned(), namespace, name, action: action.to_owned() });
    }
    let changed = results.iter().any(|r| r.action != "unchanged");
    Ok(json!({
        "revision": revision,
        "changed": changed,
        "results": results,
        "services": services.iter().map(|(ns, n)| format!("{n}.{ns}")).collect::<Vec<_>>(),
    }))
}

/// A document that the file allows but the store's content does not.
fn check_against(mesh: &Mesh, doc: &Document) -> Result<(), String> {
    let (namespace, name) = name_of(doc);
    let n = (namespace.clone(), name.clone());
    let mirrored = match doc {
        Document::Policy(_) => mesh.policy(&n).is_some_and(|p| is_synced(&p.metadata)),
        Document::Service(_) => mesh.service_documents().any(|(m, s)| *m == n && is_synced(&s.metadata)),
    };
    if mirrored {
        return Err(format!(
            "{} {namespace}/{name} is mirrored from Kubernetes; change it there (kubectl), or apply under another name",
            doc.kind()
        ));
    }
    match doc {
        Document::Policy(p) => {
            let target = (p.target_namespace().to_owned(), p.spec.target_ref.service.clone());
            if let Some(other) = mesh.policy_for(&target)
                && let Some(conflict) = policy_conflict(p, other)
            {
                let remedy = if is_synced(&other.metadata) {
                    "it comes from Kubernetes: delete that ResiliencePolicy with kubectl, or target another service"
                } else {
                    "delete that one or apply under its name"
                };
                return Err(format!("{conflict}; {remedy}"));
            }
        }
        Document::Service(s) => {
            for (other_name, other) in mesh.service_documents() {
                if *other_name == (namespace.clone(), name.clone()) {
                    continue;
                }
                for ip in &s.spec.addresses {
                    if !other.spec.addresses.contains(ip) {
                        continue;
                    }
                    let ports = |sv: &ballast_api::Service| -> Option<BTreeSet<u16>> {
                        (!sv.spec.ports.is_empty()).then(|| sv.spec.ports.iter().map(|p| p.port).collect())
                    };
                    let clash = match (ports(s), ports(other)) {
                        (Some(a), Some(b)) => a.intersection(&b).next().map(|p| format!("port {p}")),
                        _ => Some("every port".to_owned()),
                    };
                    if let Some(what) = clash {
                        return Err(format!(
                            "Service {namespace}/{name}: spec.addresses: {ip} ({what}) is already claimed by Service {}/{}",
                            other_name.0, other_name.1
                        ));
                    }
                }
            }
        }
    }
    Ok(())
}

/// The services whose views `doc` changes: its own name, or a policy's target (old and new).
fn affected(mesh: &Mesh, doc: &Document, into: &mut BTreeSet<Name>) {
    let name = name_of(doc);
    match doc {
        Document::Policy(p) => {
            into.insert((p.target_namespace().to_owned(), p.spec.target_ref.service.clone()));
            if let Some(old) = mesh.policy(&name) {
                into.insert((old.target_namespace().to_owned(), old.spec.target_ref.service.clone()));
            }
        }
        Document::Service(_) => {
            into.insert(name);
        }
    }
}

/// `kind` is `policies` or `services`.
pub async fn delete(ctx: &AdminContext, kind: &str, namespace: &str, name: &str) -> Result<Value, ApiError> {
    let n = (namespace.to_owned(), name.to_owned());
    let (key, services) = {
        let mesh = ctx.sync.mesh.read().unwrap_or_else(|p| p.into_inner());
        match kind {
            "policies" => {
                let target = mesh
                    .policy(&n)
                    .map(|p| (p.target_namespace().to_owned(), p.spec.target_ref.service.clone()));
                (
                    Key::Policy { namespace: n.0.clone(), name: n.1.clone() },
                    target.into_iter().collect::<Vec<_>>(),
                )
            }
            "services" => (Key::Service { namespace: n.0.clone(), name: n.1.clone() }, vec![n.clone()]),
            other => {
                return Err(ApiError::new(404, format!("cannot delete {other:?}: policies or services")));
            }
        }
    };
    let kind_name = if kind == "policies" { "ResiliencePolicy" } else { "Service" };
    let synced = {
        let mesh = ctx.sync.mesh.read().unwrap_or_else(|p| p.into_inner());
        match kind {
            "policies" => mesh.policy(&n).is_some_and(|p| is_synced(&p.metadata)),
            _ => mesh.service_documents().any(|(name, s)| *name == n && is_synced(&s.metadata)),
        }
    };
    if synced {
        return Err(ApiError::new(
            409,
            format!(
                "{kind_name} {namespace}/{name} is mirrored from Kubernetes and would come back: delete it there (kubectl delete {} -n {namespace} {name})",
                if kind == "policies" { "resiliencepolicy" } else { "service" }
            ),
        ));
    }
    match ctx.store.delete(&ctx.keys.key(&key)).await.map_err(ApiError::store)? {
        Some(revision) => Ok(json!({
            "revision": revision,
            "services": services.iter().map(|(ns, n)| format!("{n}.{ns}")).collect::<Vec<_>>(),
        })),
        None => Err(ApiError::new(404, format!("{kind_name} {namespace}/{name} not found"))),
    }
}

/// `name.namespace` back to a name.
fn parse_service(s: &str) -> Option<Name> {
    let (n, ns) = s.split_once('.')?;
    Some((ns.to_owned(), n.to_owned()))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WaitRequest {
    pub revision: Revision,
    /// `name.namespace`.
    pub services: Vec<String>,
    pub timeout_ms: u64,
}

pub async fn wait(ctx: &AdminContext, req: WaitRequest) -> Result<Value, ApiError> {
    let services: BTreeSet<Name> = req.services.iter().filter_map(|s| parse_service(s)).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(req.timeout_ms.min(600_000));
    let mut revision = ctx.sync.revision.clone();
    loop {
        let (acked, behind, refused) = {
            let mesh = ctx.sync.mesh.read().unwrap_or_else(|p| p.into_inner());
            let caught_up = mesh.revision >= req.revision;
            let mut acked = Vec::new();
            let mut behind = Vec::new();
            let mut refused = Vec::new();
            for (_, p) in mesh.proxies() {
                if !p.scope().reaches(&services) {
                    continue;
                }
                let who = format!("{}/{}", p.namespace, p.pod);
                match &p.nack {
                    Some(n) if n.version >= req.revision => {
                        refused.push(json!({"proxy": who, "version": n.version, "reason": n.reason}))
                    }
                    _ if caught_up && p.acked >= req.revision => acked.push(who),
                    _ => behind.push(json!({"proxy": who, "acked": p.acked, "replica": p.replica})),
                }
            }
            if !caught_up {
                behind.push(
                    json!({"proxy": "(this control plane's view of the store)", "acked": mesh.revision}),
                );
            }
            (acked, behind, refused)
        };
        if !refused.is_empty() {
            let names: Vec<&str> = refused.iter().filter_map(|r| r["proxy"].as_str()).collect();
            return Err(ApiError {
                status: 409,
                message: format!(
                    "{} sidecar(s) refused revision {}: {}",
                    names.len(),
                    req.revision,
                    names.join(", ")
                ),
                details: Some(json!({"refused": refused, "behind": behind, "acked": acked})),
            });
        }
        if behind.is_empty() {
            return Ok(json!({"revision": req.revision, "acked": acked}));
        }
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => {
                let names: Vec<&str> = behind.iter().filter_map(|r| r["proxy"].as_str()).collect();
                return Err(ApiError {
                    status: 504,
                    message: format!(
                        "timed out: {} sidecar(s) have not acked revision {}: {}",
                        names.len(), req.revision, names.join(", ")
                    ),
                    details: Some(json!({"behind": behind, "acked": acked})),
                });
            }
            r = revision.changed() => if r.is_err() {
                return Err(ApiError::new(503, "the control plane is stopping"));
            },
        }
    }
}

/// `get KIND`.
pub fn list(ctx: &AdminContext, kind: &str) -> Result<Value, ApiError> {
    let mesh = ctx.sync.mesh.read().unwrap_or_else(|p| p.into_inner());
    Ok(match kind {
        "policies" => json!(mesh.policies().map(|(_, p)| p).collect::<Vec<_>>()),
        "services" => {
            json!(mesh.services().filter_map(|n| mesh.service_with_endpoints(&n)).collect::<Vec<_>>())
        }
        "endpoints" => json!(endpoints(&mesh, None)),
        "proxies" => json!(mesh.proxies().map(|(_, p)| proxy(p)).collect::<Vec<_>>()),
        other => {
            return Err(ApiError::new(
                404,
                format!("unknown kind {other:?}: policies, services, endpoints or proxies"),
            ));
        }
    })
}

fn endpoints(mesh: &Mesh, only: Option<&Name>) -> Vec<Value> {
    let mut out = Vec::new();
    for name in mesh.services().filter(|n| only.is_none_or(|o| o == n)) {
        let registered: Vec<_> = mesh.registrations(&name).map(|(_, r)| r).collect();
        if let Some(s) = mesh.service_with_endpoints(&name) {
            for e in &s.spec.endpoints {
                let reg = registered.iter().find(|r| r.address == e.address);
                let source = match reg {
                    Some(r) if r.is_synced() => "kubernetes",
                    Some(_) => "registered",
                    None => "static",
                };
                out.push(json!({
                    "namespace": name.0, "service": name.1, "address": e.address, "weight": e.weight,
                    "source": source,
                    "pod": reg.map(|r| r.pod.clone()),
                }));
            }
        }
    }
    out
}

/// A proxy status with its sync state, as `istioctl proxy-status` shows it.
fn proxy(p: &ProxyStatus) -> Value {
    let state = match (&p.nack, p.sent, p.acked) {
        (Some(_), _, _) => "NACKED",
        (None, 0, _) => "CONNECTING",
        (None, sent, acked) if acked >= sent => "SYNCED",
        _ => "STALE",
    };
    let mut v = json!(p);
    v["state"] = json!(state);
    v
}

/// `describe service NAME`: the service, its policy, endpoints, and what its callers and
/// its own sidecars report.
pub fn describe(ctx: &AdminContext, namespace: &str, name: &str) -> Result<Value, ApiError> {
    let mesh = ctx.sync.mesh.read().unwrap_or_else(|p| p.into_inner());
    let n = (namespace.to_owned(), name.to_owned());
    let Some(service) = mesh.service_with_endpoints(&n) else {
        return Err(ApiError::new(404, format!("Service {namespace}/{name} not found")));
    };
    let one: BTreeSet<Name> = [n.clone()].into();
    let mut callers = Vec::new();
    let mut replicas = Vec::new();
    for (_, p) in mesh.proxies() {
        if p.namespace == namespace && p.service.as_deref() == Some(name) {
            replicas.push(proxy(p));
        } else if p.scope().reaches(&one) {
            callers.push(proxy(p));
        }
    }
    Ok(json!({
        "service": service,
        "policy": mesh.policy_for(&n),
        "endpoints": endpoints(&mesh, Some(&n)),
        "replicas": replicas,
        "callers": callers,
        "revision": mesh.revision,
    }))
}

/// Whether the control plane can serve (`/ready`), and if not why.
pub fn readiness(ctx: &AdminContext) -> Result<(), String> {
    if !ctx.sync.is_loaded() {
        return Err("not ready: the mesh has not been read from the store yet".into());
    }
    if !*ctx.sync.connected.borrow() {
        return Err(format!(
            "not ready: lost the store ({}); serving the last mesh meanwhile",
            ctx.store.describe()
        ));
    }
    if ctx.lease.borrow().is_none() {
        return Err("not ready: no lease from the store yet".into());
    }
    if let Some(kubernetes) = &ctx.kubernetes {
        kubernetes.borrow().readiness()?;
    }
    Ok(())
}
