//! The mesh as the store holds it, in memory: services, policies and registered
//! endpoints, kept current from one watch on the whole prefix, and the slice of it each
//! sidecar needs.
//!
//! A sidecar's view ([`Mesh::view`]) is what DESIGN §3 asks to push and no more: the
//! services it calls (with their endpoints, the static ones of the Service document
//! plus those registered by live sidecars), the policies targeting them, and the policy
//! of its own service, whose `inbound` section it enforces. A policy whose
//! `inbound.rateLimit.scope` is `global` is rewritten for the target's sidecars to
//! `limit / N`, N being the live registered endpoints of the target: the shares follow
//! replicas as they come and go because the view is recomputed when they do.
//!
//! Endpoints come from two places: sidecars register `podIP:4143` (their inbound
//! listener) under a lease, and the Kubernetes sync mirrors EndpointSlices
//! (`podIP:targetPort`, marked `source: kubernetes`). An injected pod appears in both;
//! callers must not see it twice (it would get twice the traffic), so when a registered
//! and a synced endpoint of one service share an IP, only the registered one is kept: it
//! goes through the pod's sidecar, which is what the mesh is for. Only registered
//! endpoints count as live replicas for a global rate limit: they are the sidecars that
//! enforce it.
//!
//! A resource that does not decode or validate is kept out of every view and listed in
//! [`Mesh::invalid`]: one bad write must not take the rest of the mesh with it. The API
//! refuses such writes; this guards against whatever else writes to etcd.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use ballast_api::policy::RateLimitScope;
use ballast_api::service::{Endpoint, EndpointAddr, ServiceSpec};
use ballast_api::{ObjectMeta, ResiliencePolicy, Service};
use serde::{Deserialize, Serialize};

use crate::keys::{Key, Keys, SOURCE_KUBERNETES};
use crate::store::{Event, KeyValue, Revision};

/// `namespace`, `name`.
pub type Name = (String, String);

/// An endpoint a sidecar registered for its service, as stored under its lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Registration {
    /// `ip:port` other sidecars send to (the registering sidecar's inbound listener).
    pub address: String,
    /// The pod (or host) the sidecar runs in.
    pub pod: String,
    #[serde(default = "one")]
    pub weight: u32,
    /// Who wrote it: absent for a sidecar's registration, [`SOURCE_KUBERNETES`] for an
    /// endpoint the Kubernetes sync mirrored from an EndpointSlice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// The registering sidecar's verified identity (SPIFFE ID), from the certificate it
    /// presented on its stream; callers use mutual TLS to it. Never taken from what the
    /// sidecar says about itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
}

impl Registration {
    /// Whether the Kubernetes sync wrote it (rather than a live sidecar).
    pub fn is_synced(&self) -> bool {
        self.source.as_deref() == Some(SOURCE_KUBERNETES)
    }
}

fn one() -> u32 {
    1
}

/// A connected sidecar as the replica serving it records it (`ballastctl get proxies`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyStatus {
    pub pod: String,
    pub namespace: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Its verified identity (SPIFFE ID), from the client certificate on its stream;
    /// absent: it connected without one, and its endpoint is plain text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// Services it asked for, `name.namespace`; empty: its namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub calls: Vec<String>,
    #[serde(default)]
    pub proxy_version: String,
    /// The control-plane replica serving its stream.
    #[serde(default)]
    pub replica: String,
    /// Unix seconds.
    #[serde(default)]
    pub connected_at: u64,
    /// The last version pushed to it, and the last it applied (0: none yet).
    #[serde(default)]
    pub sent: Revision,
    #[serde(default)]
    pub acked: Revision,
    /// The last version it refused, while that is the latest it was sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nack: Option<Nack>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Nack {
    pub version: Revision,
    pub reason: String,
}

impl ProxyStatus {
    /// The sidecar's view as it asked for it.
    pub fn scope(&self) -> Scope {
        Scope {
            namespace: self.namespace.clone(),
            service: self.service.clone(),
            calls: self.calls.iter().filter_map(|c| parse_call(c, &self.namespace)).collect(),
        }
    }
}

/// `name.namespace` (or a bare `name`, in `namespace`) as a service name.
pub fn parse_call(call: &str, namespace: &str) -> Option<Name> {
    let (name, ns) = call.split_once('.').unwrap_or((call, namespace));
    let ok = |s: &str| ballast_api::policy::dns_label(s);
    (ok(name) && ok(ns)).then(|| (ns.to_owned(), name.to_owned()))
}

/// What a sidecar is, for the slice of the mesh it gets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    pub namespace: String,
    /// The service it fronts, if any.
    pub service: Option<String>,
    /// The services it calls; empty: those of its own namespace.
    pub calls: Vec<Name>,
}

impl Scope {
    /// Whether a change to `services` reaches a sidecar of this scope.
    pub fn reaches(&self, services: &BTreeSet<Name>) -> bool {
        let own = self.service.as_ref().map(|s| (self.namespace.clone(), s.clone()));
        if own.is_some_and(|o| services.contains(&o)) {
            return true;
        }
        if self.calls.is_empty() {
            services.iter().any(|(ns, _)| *ns == self.namespace)
        } else {
            self.calls.iter().any(|c| services.contains(c))
        }
    }
}

/// A resource as pushed. The JSON is rendered once per change of the resource and
/// shared by every view that holds it: a thousand sidecars calling one service do not
/// serialize it a thousand times, and comparing two views is mostly pointer compares.
#[derive(Debug, Clone)]
pub struct Resource {
    pub kind: &'static str,
    pub json: Arc<[u8]>,
}

impl PartialEq for Resource {
    fn eq(&self, other: &Self) -> bool {
        self.kind == other.kind && (Arc::ptr_eq(&self.json, &other.json) || self.json == other.json)
    }
}

impl Eq for Resource {}

/// Resource key (`Kind/namespace/name`) → resource: one sidecar's whole configuration.
pub type View = BTreeMap<Arc<str>, Resource>;

/// One service's resources, rendered.
#[derive(Debug, Default)]
struct Rendered {
    service: Option<(Arc<str>, Resource)>,
    /// The policy targeting it as callers get it ...
    policy: Option<(Arc<str>, Resource)>,
    /// ... and as its own sidecars get it (a global inbound rate limit's share).
    own_policy: Option<Resource>,
}

#[derive(Debug, Default)]
pub struct Mesh {
    pub revision: Revision,
    services: BTreeMap<Name, Service>,
    policies: BTreeMap<Name, ResiliencePolicy>,
    /// Registered endpoints by service, then by id.
    endpoints: BTreeMap<Name, BTreeMap<String, Registration>>,
    proxies: BTreeMap<Name, ProxyStatus>,
    /// Store keys whose value is not a valid resource, with why.
    invalid: BTreeMap<String, String>,
    rendered: BTreeMap<Name, Rendered>,
}

impl Mesh {
    /// The mesh from a full read of the prefix at `revision`.
    pub fn load(keys: &Keys, kvs: &[KeyValue], revision: Revision) -> Self {
        let mut mesh = Mesh { revision, ..Default::default() };
        let mut touched = BTreeSet::new();
        for kv in kvs {
            touched.extend(mesh.put(keys, kv));
        }
        for name in &touched {
            mesh.render(name);
        }
        mesh
    }

    /// Applies one batch of watch events; returns the services whose views changed (a
    /// policy changes its target's). Proxy statuses change no view.
    pub fn apply(&mut self, keys: &Keys, events: &[Event]) -> BTreeSet<Name> {
        let mut changed = BTreeSet::new();
        for event in events {
            self.revision = self.revision.max(event.revision());
            let touched = match event {
                Event::Put(kv) => self.put(keys, kv),
                Event::Delete { key, .. } => self.delete(keys, key),
            };
            changed.extend(touched);
        }
        for name in &changed {
            self.render(name);
        }
        changed
    }

    /// Stores one key; returns the services it affects (two when a policy moved target).
    fn put(&mut self, keys: &Keys, kv: &KeyValue) -> Vec<Name> {
        let Some(key) = keys.parse(&kv.key) else { return Vec::new() };
        self.invalid.remove(&kv.key);
        let before = self.affected(&key);
        let result = match &key {
            Key::Service { namespace, name } => decode::<Service>(&kv.value)
                .and_then(|s| check_name(s, namespace, name, |s| &s.metadata, |s| s.validate()))
                .map(|s| {
                    self.services.insert((namespace.clone(), name.clone()), s);
                }),
            Key::Policy { namespace, name } => decode::<ResiliencePolicy>(&kv.value)
                .and_then(|p| check_name(p, namespace, name, |p| &p.metadata, |p| p.validate()))
                .map(|p| {
                    self.policies.insert((namespace.clone(), name.clone()), p);
                }),
            Key::Endpoint { namespace, service, id } => decode::<Registration>(&kv.value).map(|r| {
                self.endpoints.entry((namespace.clone(), service.clone())).or_default().insert(id.clone(), r);
            }),
            Key::Proxy { namespace, pod } => decode::<ProxyStatus>(&kv.value).map(|p| {
                self.proxies.insert((namespace.clone(), pod.clone()), p);
            }),
        };
        if let Err(why) = result {
            tracing::warn!(key = %kv.key, error = %why, "ignoring an invalid resource in the store");
            self.invalid.insert(kv.key.clone(), why);
            self.remove(&key);
        }
        let mut touched = before;
        touched.extend(self.affected(&key));
        touched
    }

    fn delete(&mut self, keys: &Keys, key: &str) -> Vec<Name> {
        self.invalid.remove(key);
        let Some(key) = keys.parse(key) else { return Vec::new() };
        let touched = self.affected(&key);
        self.remove(&key);
        touched
    }

    fn remove(&mut self, key: &Key) {
        match key {
            Key::Service { namespace, name } => {
                self.services.remove(&(namespace.clone(), name.clone()));
            }
            Key::Policy { namespace, name } => {
                self.policies.remove(&(namespace.clone(), name.clone()));
            }
            Key::Endpoint { namespace, service, id } => {
                let name = (namespace.clone(), service.clone());
                if let Some(eps) = self.endpoints.get_mut(&name) {
                    eps.remove(id);
                    if eps.is_empty() {
                        self.endpoints.remove(&name);
                    }
                }
            }
            Key::Proxy { namespace, pod } => {
                self.proxies.remove(&(namespace.clone(), pod.clone()));
            }
        }
    }

    /// The services whose views depend on `key` as the mesh is now.
    fn affected(&self, key: &Key) -> Vec<Name> {
        match key {
            Key::Service { namespace, name } => vec![(namespace.clone(), name.clone())],
            Key::Endpoint { namespace, service, .. } => vec![(namespace.clone(), service.clone())],
            Key::Policy { namespace, name } => self
                .policies
                .get(&(namespace.clone(), name.clone()))
                .map(|p| vec![(p.target_namespace().to_owned(), p.spec.target_ref.service.clone())])
                .unwrap_or_default(),
            Key::Proxy { .. } => Vec::new(),
        }
    }

    /// Renders `name`'s resources again after a change.
    fn render(&mut self, name: &Name) {
        let service = self.service_with_endpoints(name).map(|s| {
            (format!("Service/{}/{}", name.0, name.1).into(), Resource { kind: "Service", json: to_json(&s) })
        });
        let (policy, own_policy) = match self.policy_for(name) {
            Some(p) => {
                let key: Arc<str> =
                    format!("ResiliencePolicy/{}/{}", p.metadata.namespace_or_default(), p.metadata.name)
                        .into();
                let as_written = Resource { kind: "ResiliencePolicy", json: to_json(p) };
                let shared = self.with_global_shares(name, p);
                let own = match shared.as_ref() {
                    Some(shared) => Resource { kind: "ResiliencePolicy", json: to_json(shared) },
                    None => as_written.clone(),
                };
                (Some((key, as_written)), Some(own))
            }
            None => (None, None),
        };
        if service.is_none() && policy.is_none() {
            self.rendered.remove(name);
        } else {
            self.rendered.insert(name.clone(), Rendered { service, policy, own_policy });
        }
    }

    /// Services: those with a document, and those only sidecars registered for (a
    /// `--service` with no Service applied is still a destination, with its ports
    /// detected).
    pub fn services(&self) -> impl Iterator<Item = Name> + '_ {
        let documented = self.services.keys();
        let registered = self.endpoints.keys().filter(|n| !self.services.contains_key(*n));
        let mut all: Vec<&Name> = documented.chain(registered).collect();
        all.sort();
        all.into_iter().cloned()
    }

    /// The Service documents as stored (without registrations).
    pub fn service_documents(&self) -> impl Iterator<Item = (&Name, &Service)> {
        self.services.iter()
    }

    pub fn policies(&self) -> impl Iterator<Item = (&Name, &ResiliencePolicy)> {
        self.policies.iter()
    }

    pub fn policy(&self, name: &Name) -> Option<&ResiliencePolicy> {
        self.policies.get(name)
    }

    pub fn registrations(&self, service: &Name) -> impl Iterator<Item = (&String, &Registration)> {
        self.endpoints.get(service).into_iter().flatten()
    }

    pub fn all_registrations(&self) -> impl Iterator<Item = (&Name, &String, &Registration)> {
        self.endpoints.iter().flat_map(|(n, eps)| eps.iter().map(move |(id, r)| (n, id, r)))
    }

    pub fn proxies(&self) -> impl Iterator<Item = (&Name, &ProxyStatus)> {
        self.proxies.iter()
    }

    pub fn invalid(&self) -> &BTreeMap<String, String> {
        &self.invalid
    }

    /// The policy targeting `service`. Two policies for one target are refused by the API;
    /// should the store hold two anyway, the first by namespace and name wins, every time.
    pub fn policy_for(&self, service: &Name) -> Option<&ResiliencePolicy> {
        self.policies
            .values()
            .find(|p| p.spec.target_ref.service == service.1 && p.target_namespace() == service.0)
    }

    /// `service` with the registered endpoints added to its own static ones; a service
    /// known only from registrations gets a document made for it. A synced endpoint whose
    /// IP a sidecar registered too is left out: the pod is there once, through its sidecar.
    pub fn service_with_endpoints(&self, service: &Name) -> Option<Service> {
        let mut s = match self.services.get(service) {
            Some(s) => s.clone(),
            None if self.endpoints.contains_key(service) => Service {
                api_version: ballast_api::API_VERSION.to_owned(),
                kind: "Service".to_owned(),
                metadata: ObjectMeta {
                    name: service.1.clone(),
                    namespace: Some(service.0.clone()),
                    ..Default::default()
                },
                spec: ServiceSpec::default(),
            },
            None => return None,
        };
        let mut known: BTreeSet<String> = s.spec.endpoints.iter().map(|e| e.address.clone()).collect();
        let ip = |r: &Registration| EndpointAddr::parse(&r.address).map(|a| a.with_default_port(0).ip());
        let registered: BTreeSet<IpAddr> =
            self.registrations(service).map(|(_, r)| r).filter(|r| !r.is_synced()).filter_map(ip).collect();
        for r in self.registrations(service).map(|(_, r)| r) {
            if r.is_synced() && ip(r).is_some_and(|ip| registered.contains(&ip)) {
                continue;
            }
            if known.insert(r.address.clone()) {
                s.spec.endpoints.push(Endpoint {
                    address: r.address.clone(),
                    weight: r.weight,
                    identity: r.identity.clone(),
                });
            }
        }
        Some(s)
    }

    /// The services a sidecar of `scope` calls.
    pub fn called(&self, scope: &Scope) -> Vec<Name> {
        if scope.calls.is_empty() {
            self.services().filter(|(ns, _)| *ns == scope.namespace).collect()
        } else {
            scope.calls.clone()
        }
    }

    /// Everything a sidecar of `scope` is sent.
    pub fn view(&self, scope: &Scope) -> View {
        let mut view = View::new();
        for name in self.called(scope) {
            let Some(r) = self.rendered.get(&name) else { continue };
            if let Some((key, res)) = &r.service {
                view.insert(key.clone(), res.clone());
            }
            if let Some((key, res)) = &r.policy {
                view.insert(key.clone(), res.clone());
            }
        }
        if let Some(own) = &scope.service {
            let own = (scope.namespace.clone(), own.clone());
            if let Some(Rendered { policy: Some((key, _)), own_policy: Some(res), .. }) =
                self.rendered.get(&own)
            {
                view.insert(key.clone(), res.clone());
            }
        }
        view
    }

    /// `p` as the sidecars of its target enforce it, if that differs from `p`: a global
    /// inbound rate limit becomes each live replica's share (a lone or unregistered
    /// replica gets it all).
    fn with_global_shares(&self, target: &Name, p: &ResiliencePolicy) -> Option<ResiliencePolicy> {
        let global = p
            .spec
            .inbound
            .as_ref()
            .and_then(|i| i.rate_limit.as_ref())
            .is_some_and(|rl| rl.scope == Some(RateLimitScope::Global));
        let replicas = self.registrations(target).filter(|(_, r)| !r.is_synced()).count();
        if !global || replicas <= 1 {
            return None;
        }
        let mut p = p.clone();
        if let Some(rl) = p.spec.inbound.as_mut().and_then(|i| i.rate_limit.as_mut()) {
            rl.requests_per_second /= replicas as f64;
            rl.burst = rl.burst.map(|b| b.div_ceil(replicas as u32).max(1));
        }
        Some(p)
    }
}

fn decode<T: serde::de::DeserializeOwned>(value: &[u8]) -> Result<T, String> {
    serde_json::from_slice(value).map_err(|e| format!("not valid JSON for its kind: {e}"))
}

/// The resource is valid and stored under its own name.
fn check_name<T>(
    r: T,
    namespace: &str,
    name: &str,
    meta: impl Fn(&T) -> &ballast_api::ObjectMeta,
    validate: impl Fn(&T) -> Result<(), Vec<ballast_api::FieldError>>,
) -> Result<T, String> {
    let m = meta(&r);
    if m.name != name || m.namespace_or_default() != namespace {
        return Err(format!(
            "stored under {namespace}/{name} but names itself {}/{}",
            m.namespace_or_default(),
            m.name
        ));
    }
    validate(&r).map_err(|errs| errs.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))?;
    Ok(r)
}

fn to_json<T: Serialize>(v: &T) -> Arc<[u8]> {
    // Serializing our own types to JSON cannot fail: no maps with non-string keys.
    serde_json::to_vec(v).unwrap_or_default().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::store::KeyValue;

    fn kv(key: &str, json: serde_json::Value, revision: i64) -> KeyValue {
        KeyValue::json(key, json, revision)
    }

    fn service(ns: &str, name: &str, endpoints: &[&str]) -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "ballast.io/v1alpha1", "kind": "Service",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"ports": [{"port": 80}], "endpoints": endpoints.iter().map(|a| serde_json::json!({"address": a})).collect::<Vec<_>>()}
        })
    }

    fn policy(ns: &str, name: &str, target: &str, global_rps: Option<f64>) -> serde_json::Value {
        let mut p = serde_json::json!({
            "apiVersion": "ballast.io/v1alpha1", "kind": "ResiliencePolicy",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"targetRef": {"service": target}, "timeouts": {"request": "2s"}}
        });
        if let Some(rps) = global_rps {
            p["spec"]["inbound"] =
                serde_json::json!({"rateLimit": {"requestsPerSecond": rps, "burst": 10, "scope": "global"}});
        }
        p
    }

    fn registration(address: &str) -> serde_json::Value {
        serde_json::json!({"address": address, "pod": "p"})
    }

    fn mesh() -> (Keys, Mesh) {
        let keys = Keys::default();
        let kvs = vec![
            kv("/ballast/services/shop/catalog", service("shop", "catalog", &["10.0.0.1:80"]), 2),
            kv("/ballast/services/shop/payments", service("shop", "payments", &[]), 3),
            kv("/ballast/services/other/search", service("other", "search", &[]), 4),
            kv(
                "/ballast/policies/shop/payments-policy",
                policy("shop", "payments-policy", "payments", Some(90.0)),
                5,
            ),
            kv("/ballast/endpoints/shop/payments/a", registration("10.0.1.1:4143"), 6),
            kv("/ballast/endpoints/shop/payments/b", registration("10.0.1.2:4143"), 7),
            kv("/ballast/locks/sync/1", serde_json::json!({}), 8),
        ];
        let mesh = Mesh::load(&keys, &kvs, 8);
        (keys, mesh)
    }

    fn decode_view<T: serde::de::DeserializeOwned>(view: &View, key: &str) -> T {
        serde_json::from_slice(&view.get(key).unwrap_or_else(|| panic!("{key} in {:?}", view.keys())).json)
            .expect("decodes")
    }

    fn keys_of(view: &View) -> Vec<&str> {
        view.keys().map(|k| &**k).collect()
    }

    #[test]
    fn a_service_known_only_from_registrations_is_a_destination() {
        let (keys, mut mesh) = mesh();
        mesh.apply(
            &keys,
            &[Event::Put(kv(
                "/ballast/endpoints/shop/reviews/10.0.2.1:4143",
                registration("10.0.2.1:4143"),
                9,
            ))],
        );
        let view = mesh.view(&Scope { namespace: "shop".into(), ..Default::default() });
        let reviews: Service = decode_view(&view, "Service/shop/reviews");
        assert_eq!(reviews.spec.endpoints.len(), 1);
        assert!(reviews.spec.ports.is_empty(), "ports are detected");
        assert!(reviews.validate().is_ok());
        mesh.apply(
            &keys,
            &[Event::Delete { key: "/ballast/endpoints/shop/reviews/10.0.2.1:4143".into(), revision: 10 }],
        );
        let view = mesh.view(&Scope { namespace: "shop".into(), ..Default::default() });
        assert!(!view.contains_key("Service/shop/reviews"));
    }

    #[test]
    fn proxy_statuses_change_no_view_and_views_share_rendered_json() {
        let (keys, mut mesh) = mesh();
        let scope = Scope { namespace: "shop".into(), ..Default::default() };
        let before = mesh.view(&scope);
        let status = serde_json::json!({"pod": "web-1", "namespace": "shop", "acked": 8});
        let changed = mesh.apply(&keys, &[Event::Put(kv("/ballast/proxies/shop/web-1", status, 9))]);
        assert!(changed.is_empty());
        assert_eq!(mesh.proxies().count(), 1);
        let after = mesh.view(&scope);
        assert_eq!(before, after);
        let (a, b) = (&before["Service/shop/catalog"].json, &after["Service/shop/catalog"].json);
        assert!(Arc::ptr_eq(a, b), "rendered once, shared");
    }

    #[test]
    fn reaches_follows_calls_and_own_service() {
        let set = |n: &[(&str, &str)]| n.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        let ns_wide = Scope { namespace: "shop".into(), ..Default::default() };
        assert!(ns_wide.reaches(&set(&[("shop", "catalog")])));
        assert!(!ns_wide.reaches(&set(&[("other", "search")])));
        let narrow = Scope {
            namespace: "other".into(),
            service: Some("search".into()),
            calls: vec![("shop".into(), "catalog".into())],
        };
        assert!(narrow.reaches(&set(&[("shop", "catalog")])));
        assert!(narrow.reaches(&set(&[("other", "search")])));
        assert!(!narrow.reaches(&set(&[("shop", "payments")])));
        assert_eq!(parse_call("catalog.shop", "x"), Some(("shop".into(), "catalog".into())));
        assert_eq!(parse_call("catalog", "x"), Some(("x".into(), "catalog".into())));
        assert_eq!(parse_call("Bad_Name", "x"), None);
    }

    #[test]
    fn a_client_sees_its_namespace_with_registered_endpoints() {
        let (_, mesh) = mesh();
        let scope = Scope { namespace: "shop".into(), service: None, calls: vec![] };
        let view = mesh.view(&scope);
        assert_eq!(
            keys_of(&view),
            ["ResiliencePolicy/shop/payments-policy", "Service/shop/catalog", "Service/shop/payments"]
        );
        let payments: Service = decode_view(&view, "Service/shop/payments");
        let addrs: Vec<&str> = payments.spec.endpoints.iter().map(|e| e.address.as_str()).collect();
        assert_eq!(addrs, ["10.0.1.1:4143", "10.0.1.2:4143"]);
        // A caller gets the policy as written: the global limit is for the target's sidecars.
        let p: ResiliencePolicy = decode_view(&view, "ResiliencePolicy/shop/payments-policy");
        assert_eq!(p.spec.inbound.and_then(|i| i.rate_limit).map(|r| r.requests_per_second), Some(90.0));
    }

    #[test]
    fn a_pod_registered_by_its_sidecar_and_synced_from_kubernetes_is_seen_once() {
        let (keys, mut mesh) = mesh();
        let synced =
            |address: &str| serde_json::json!({"address": address, "pod": "p", "source": "kubernetes"});
        mesh.apply(
            &keys,
            &[
                // 10.0.1.1 also registered 10.0.1.1:4143 (its sidecar); 10.0.1.9 has no sidecar.
                Event::Put(kv("/ballast/endpoints/shop/payments/10.0.1.1:8080", synced("10.0.1.1:8080"), 9)),
                Event::Put(kv("/ballast/endpoints/shop/payments/10.0.1.9:8080", synced("10.0.1.9:8080"), 9)),
            ],
        );
        let addresses = |mesh: &Mesh| {
            let payments = mesh.service_with_endpoints(&("shop".into(), "payments".into())).expect("service");
            let mut a: Vec<String> = payments.spec.endpoints.into_iter().map(|e| e.address).collect();
            a.sort();
            a
        };
        assert_eq!(addresses(&mesh), ["10.0.1.1:4143", "10.0.1.2:4143", "10.0.1.9:8080"]);
        // Synced endpoints are not sidecars: the global limit is still split in two.
        let own = Scope { namespace: "shop".into(), service: Some("payments".into()), calls: vec![] };
        let p: ResiliencePolicy = decode_view(&mesh.view(&own), "ResiliencePolicy/shop/payments-policy");
        assert_eq!(p.spec.inbound.and_then(|i| i.rate_limit).map(|r| r.requests_per_second), Some(45.0));
        // The sidecar goes away: the pod is reached at its synced address again.
        mesh.apply(
            &keys,
            &[Event::Delete { key: "/ballast/endpoints/shop/payments/a".into(), revision: 10 }],
        );
        assert_eq!(addresses(&mesh), ["10.0.1.1:8080", "10.0.1.2:4143", "10.0.1.9:8080"]);
    }

    #[test]
    fn calls_narrow_the_view() {
        let (_, mesh) = mesh();
        let scope =
            Scope { namespace: "shop".into(), service: None, calls: vec![("other".into(), "search".into())] };
        assert_eq!(keys_of(&mesh.view(&scope)), ["Service/other/search"]);
    }

    #[test]
    fn global_rate_limit_is_shared_among_live_replicas() {
        let (keys, mut mesh) = mesh();
        let own = Scope {
            namespace: "shop".into(),
            service: Some("payments".into()),
            calls: vec![("other".into(), "search".into())],
        };
        let share = |mesh: &Mesh| {
            let p: ResiliencePolicy = decode_view(&mesh.view(&own), "ResiliencePolicy/shop/payments-policy");
            let rl = p.spec.inbound.and_then(|i| i.rate_limit).expect("rate limit");
            (rl.requests_per_second, rl.burst)
        };
        assert_eq!(share(&mesh), (45.0, Some(5)));
        let changed = mesh.apply(
            &keys,
            &[Event::Put(kv("/ballast/endpoints/shop/payments/c", registration("10.0.1.3:4143"), 9))],
        );
        assert_eq!(changed, BTreeSet::from([("shop".to_owned(), "payments".to_owned())]));
        assert_eq!(share(&mesh), (30.0, Some(4)));
        mesh.apply(
            &keys,
            &[
                Event::Delete { key: "/ballast/endpoints/shop/payments/a".into(), revision: 10 },
                Event::Delete { key: "/ballast/endpoints/shop/payments/b".into(), revision: 10 },
                Event::Delete { key: "/ballast/endpoints/shop/payments/c".into(), revision: 10 },
            ],
        );
        assert_eq!(share(&mesh), (90.0, Some(10)), "no live replica: the whole limit");
        assert_eq!(mesh.revision, 10);
    }

    #[test]
    fn a_policy_change_touches_its_old_and_new_targets() {
        let (keys, mut mesh) = mesh();
        let moved = kv(
            "/ballast/policies/shop/payments-policy",
            policy("shop", "payments-policy", "catalog", None),
            9,
        );
        let changed = mesh.apply(&keys, &[Event::Put(moved)]);
        assert_eq!(
            changed,
            BTreeSet::from([
                ("shop".to_owned(), "catalog".to_owned()),
                ("shop".to_owned(), "payments".to_owned())
            ])
        );
        assert!(mesh.policy_for(&("shop".into(), "payments".into())).is_none());
    }

    #[test]
    fn an_invalid_resource_is_set_aside_and_reported() {
        let (keys, mut mesh) = mesh();
        let mut bad = policy("shop", "payments-policy", "payments", None);
        bad["spec"]["retries"] = serde_json::json!({"attempts": 3, "budget": {"ratio": 7.0}});
        mesh.apply(&keys, &[Event::Put(kv("/ballast/policies/shop/payments-policy", bad, 9))]);
        assert!(mesh.policy_for(&("shop".into(), "payments".into())).is_none());
        let why = &mesh.invalid()["/ballast/policies/shop/payments-policy"];
        assert!(why.contains("spec.retries.budget.ratio"), "{why}");
        let misnamed = service("shop", "elsewhere", &[]);
        mesh.apply(&keys, &[Event::Put(kv("/ballast/services/shop/catalog", misnamed, 10))]);
        assert!(mesh.service_with_endpoints(&("shop".into(), "catalog".into())).is_none());
        assert!(mesh.invalid()["/ballast/services/shop/catalog"].contains("names itself shop/elsewhere"));
    }
}
