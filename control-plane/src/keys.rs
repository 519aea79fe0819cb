//! The store's key layout (DESIGN §3), under a configurable prefix (default `/ballast`):
//!
//! ```text
//! <prefix>/policies/<namespace>/<name>                  a ResiliencePolicy as JSON
//! <prefix>/services/<namespace>/<name>                  a Service as JSON
//! <prefix>/endpoints/<namespace>/<service>/<id>         one endpoint, under a lease
//! <prefix>/proxies/<namespace>/<pod>                    a connected sidecar's status
//! <prefix>/identity/ca                                  the generated CA (--identity without --ca-*)
//! <prefix>/identity/tokens/<sha256-hex>                 a bootstrap token, under a lease of its TTL
//! ```
//!
//! The `proxies` keys are Ballast's addition to DESIGN §3: what each connected sidecar
//! acked or refused, written by the replica serving its stream under that replica's
//! lease. They live in the store, not in the replica, so that `ballastctl get proxies`
//! and `apply --wait` see every sidecar whichever replica they ask.
//!
//! What the Kubernetes sync ([`crate::kubernetes`]) writes is marked, so that it deletes
//! only its own keys and never a document applied with `ballastctl` or a sidecar's
//! registration (a contract addition to DESIGN §3):
//!
//! * a policy or service document carries the annotation [`SOURCE_ANNOTATION`]
//!   (`ballast.io/source`) with the value [`SOURCE_KUBERNETES`] (`kubernetes`) in its
//!   `metadata.annotations`; `ballastctl apply` refuses documents that carry it;
//! * an endpoint carries `"source": "kubernetes"` in its JSON ([`crate::mesh::Registration`]),
//!   and no lease: it lives as long as the EndpointSlice lists it, not as long as a stream;
//! * the sync's leader lock is `<prefix>/locks/kubernetes-sync` (beside the compactor's
//!   `<prefix>/locks/compactor`).
//!
//! Namespaces, names, pods and endpoint ids never contain `/` (names are DNS labels,
//! pods are checked, ids are the endpoint's `ip:port`), so a key splits back into its
//! parts unambiguously.

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "/ballast";

/// The annotation (policies, services) and the field (endpoints) that say who wrote a key.
pub const SOURCE_ANNOTATION: &str = "ballast.io/source";
/// Its value on what the Kubernetes sync wrote.
pub const SOURCE_KUBERNETES: &str = "kubernetes";

/// What a key names.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Key {
    Policy { namespace: String, name: String },
    Service { namespace: String, name: String },
    Endpoint { namespace: String, service: String, id: String },
    Proxy { namespace: String, pod: String },
}

/// Builds and parses the keys under one prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Default for Keys {
    fn default() -> Self {
        Self::new(DEFAULT_PREFIX)
    }
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Self { prefix: prefix.trim_end_matches('/').to_owned() }
    }

    /// Everything Ballast keeps, for one list and one watch.
    pub fn root(&self) -> String {
        format!("{}/", self.prefix)
    }

    /// Every key of one kind (`policies`, `services`, `endpoints`), for one list.
    pub fn kind_root(&self, kind: &str) -> String {
        format!("{}/{kind}/", self.prefix)
    }

    /// The endpoint keys of one service.
    pub fn endpoints_of(&self, namespace: &str, service: &str) -> String {
        format!("{}/endpoints/{namespace}/{service}/", self.prefix)
    }

    /// The key of the lock `name` (`compactor`, `kubernetes-sync`).
    pub fn lock(&self, name: &str) -> String {
        format!("{}/locks/{name}", self.prefix)
    }

    /// The generated CA of workload identity ([`crate::identity`], `CaSource::Generated`):
    /// `<prefix>/identity/ca`, JSON `{"certificate": PEM, "key": PEM}`, written once by
    /// whichever replica comes first so that every replica on one store shares it.
    pub fn identity_ca(&self) -> String {
        format!("{}/identity/ca", self.prefix)
    }

    /// A bootstrap token, by the hex SHA-256 of its text: `<prefix>/identity/tokens/<hex>`
    /// (the token itself is never stored).
    pub fn identity_token(&self, hash_hex: &str) -> String {
        format!("{}/identity/tokens/{hash_hex}", self.prefix)
    }

    pub fn key(&self, key: &Key) -> String {
        match key {
            Key::Policy { namespace, name } => format!("{}/policies/{namespace}/{name}", self.prefix),
            Key::Service { namespace, name } => format!("{}/services/{namespace}/{name}", self.prefix),
            Key::Endpoint { namespace, service, id } => {
                format!("{}/endpoints/{namespace}/{service}/{id}", self.prefix)
            }
            Key::Proxy { namespace, pod } => format!("{}/proxies/{namespace}/{pod}", self.prefix),
        }
    }

    /// What `key` names, or `None` for keys that are not Ballast resources (locks,
    /// anything else under the prefix).
    pub fn parse(&self, key: &str) -> Option<Key> {
        let rest = key.strip_prefix(&self.prefix)?.strip_prefix('/')?;
        let parts: Vec<&str> = rest.split('/').collect();
        if parts.iter().any(|p| p.is_empty()) {
            return None;
        }
        let s = |i: usize| parts[i].to_owned();
        match parts.as_slice() {
            ["policies", _, _] => Some(Key::Policy { namespace: s(1), name: s(2) }),
            ["services", _, _] => Some(Key::Service { namespace: s(1), name: s(2) }),
            ["endpoints", _, _, _] => Some(Key::Endpoint { namespace: s(1), service: s(2), id: s(3) }),
            ["proxies", _, _] => Some(Key::Proxy { namespace: s(1), pod: s(2) }),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        let keys = Keys::new("/ballast/");
        for k in [
            Key::Policy { namespace: "default".into(), name: "payments".into() },
            Key::Service { namespace: "shop".into(), name: "catalog".into() },
            Key::Endpoint { namespace: "shop".into(), service: "catalog".into(), id: "10.0.0.1:4143".into() },
            Key::Proxy { namespace: "shop".into(), pod: "catalog-7d9f".into() },
        ] {
            let s = keys.key(&k);
            assert!(s.starts_with("/ballast/"), "{s}");
            assert_eq!(keys.parse(&s), Some(k));
        }
        assert_eq!(
            keys.key(&Key::Policy { namespace: "a".into(), name: "b".into() }),
            "/ballast/policies/a/b"
        );
    }

    #[test]
    fn foreign_keys_are_not_resources() {
        let keys = Keys::default();
        for k in [
            "/ballast/locks/sync/1",
            "/ballast/policies/a",
            "/ballast/policies/a/b/c",
            "/other/policies/a/b",
            "/ballast/services//x",
            "/ballastx/services/a/b",
            "/ballast/identity/ca",
            "/ballast/identity/tokens/00ff",
        ] {
            assert_eq!(keys.parse(k), None, "{k}");
        }
    }
}
