//! The sync's side of the store: telling its own keys from everyone else's, and writing
//! so that it never touches anyone else's.
//!
//! Ownership is the marker of [`crate::keys`]: the `ballast.io/source: kubernetes`
//! annotation on documents, `"source": "kubernetes"` on endpoints. Every write is a
//! [`Store::write_if`] conditioned on the key being as the sync read it: a document that
//! `ballastctl apply` wrote, or an endpoint a sidecar registered, between the sync's read
//! and its write fails the write, and the sync reads again instead of overwriting it.

use std::collections::BTreeMap;

use ballast_api::Document;

use super::KubernetesError;
use super::services::Mirrored;
use crate::keys::{Key, Keys, SOURCE_ANNOTATION, SOURCE_KUBERNETES};
use crate::mesh::{Name, Registration};
use crate::metrics::Metrics;
use crate::store::{Guarded, KeyValue, MAX_WRITES, Store};

/// How often a write that lost a race with another writer is planned again from a
/// fresh read before giving up until the next resync.
pub const ATTEMPTS: usize = 3;

/// One guarded write, with its kind for the metrics (`policy`, `service`, `endpoint`).
#[derive(Debug, Clone, PartialEq)]
pub struct Op {
    pub kind: &'static str,
    pub write: Guarded,
}

impl Op {
    pub fn put(kind: &'static str, key: String, value: Vec<u8>, expect: i64) -> Self {
        Self { kind, write: Guarded { key, value: Some(value), expect } }
    }

    pub fn delete(kind: &'static str, kv: &KeyValue) -> Self {
        Self { kind, write: Guarded { key: kv.key.clone(), value: None, expect: kv.mod_revision } }
    }
}

/// Applies `ops` in transactions of at most [`MAX_WRITES`]; `false` when one of them
/// found a key changed since it was read (the rest is not written: read and plan again).
pub async fn commit(store: &Store, metrics: &Metrics, ops: Vec<Op>) -> Result<bool, KubernetesError> {
    for chunk in ops.chunks(MAX_WRITES) {
        let writes = chunk.iter().map(|op| op.write.clone()).collect();
        if store.write_if(writes).await?.is_none() {
            return Ok(false);
        }
        for op in chunk {
            let operation = if op.write.value.is_some() { "put" } else { "delete" };
            metrics.kubernetes_store_writes.with_label_values(&[op.kind, operation]).inc();
        }
    }
    Ok(true)
}

/// Whether a stored document (policy or service) carries the sync's marker. Read as
/// plain JSON: ownership must not depend on the document being valid.
pub fn owned_document(kv: &KeyValue) -> bool {
    serde_json::from_slice::<serde_json::Value>(&kv.value)
        .ok()
        .and_then(|v| v.pointer("/metadata/annotations").and_then(|a| a.get(SOURCE_ANNOTATION)).cloned())
        .is_some_and(|s| s == SOURCE_KUBERNETES)
}

/// Whether a stored endpoint is one the sync mirrored.
pub fn owned_endpoint(kv: &KeyValue) -> bool {
    serde_json::from_slice::<Registration>(&kv.value).is_ok_and(|r| r.is_synced())
}

/// One service's keys as the store holds them.
#[derive(Debug, Default, Clone)]
pub struct ServiceKeys {
    pub document: Option<KeyValue>,
    pub endpoints: Vec<KeyValue>,
}

impl ServiceKeys {
    /// Whether anything here is the sync's, so a Service gone from Kubernetes is still
    /// looked at.
    pub fn owns_any(&self) -> bool {
        self.document.as_ref().is_some_and(owned_document) || self.endpoints.iter().any(owned_endpoint)
    }
}

/// One service's keys, read now.
pub async fn read_service(store: &Store, keys: &Keys, name: &Name) -> Result<ServiceKeys, KubernetesError> {
    let (document, _) =
        store.get(&keys.key(&Key::Service { namespace: name.0.clone(), name: name.1.clone() })).await?;
    let (endpoints, _) = store.list(&keys.endpoints_of(&name.0, &name.1)).await?;
    Ok(ServiceKeys { document, endpoints })
}

/// Every service's keys, in two lists.
pub async fn read_services(
    store: &Store,
    keys: &Keys,
) -> Result<BTreeMap<Name, ServiceKeys>, KubernetesError> {
    let mut out: BTreeMap<Name, ServiceKeys> = BTreeMap::new();
    let (documents, _) = store.list(&keys.kind_root("services")).await?;
    for kv in documents {
        if let Some(Key::Service { namespace, name }) = keys.parse(&kv.key) {
            out.entry((namespace, name)).or_default().document = Some(kv);
        }
    }
    let (endpoints, _) = store.list(&keys.kind_root("endpoints")).await?;
    for kv in endpoints {
        if let Some(Key::Endpoint { namespace, service, .. }) = keys.parse(&kv.key) {
            out.entry((namespace, service)).or_default().endpoints.push(kv);
        }
    }
    Ok(out)
}

/// The writes that bring one service's keys from `current` to `desired` (`None`: the
/// Service is gone from Kubernetes, or not mirrored), touching only the sync's own keys.
/// A Service document someone else wrote (`ballastctl apply`) wins: the sync then keeps
/// neither a document nor endpoints for that name.
pub fn plan_service(keys: &Keys, name: &Name, desired: Option<&Mirrored>, current: &ServiceKeys) -> Vec<Op> {
    let foreign_document = current.document.as_ref().is_some_and(|kv| !owned_document(kv));
    let desired = desired.filter(|_| !foreign_document);
    let mut puts = Vec::new();
    let mut deletes = Vec::new();
    let mut wanted: BTreeMap<String, &Registration> = BTreeMap::new();
    if let Some(m) = desired {
        let doc = Document::Service(Box::new(m.document.clone()));
        if let Ok((key, value)) = crate::api::stored_form(&doc) {
            let key = keys.key(&key);
            match &current.document {
                Some(kv) if kv.value == value => {}
                Some(kv) => puts.push(Op::put("service", key, value, kv.mod_revision)),
                None => puts.push(Op::put("service", key, value, 0)),
            }
        }
        for (id, r) in &m.endpoints {
            let key = keys.key(&Key::Endpoint {
                namespace: name.0.clone(),
                service: name.1.clone(),
                id: id.clone(),
            });
            wanted.insert(key, r);
        }
    }
    let json = |r: &Registration| serde_json::to_vec(r).unwrap_or_default();
    for kv in &current.endpoints {
        let stored = serde_json::from_slice::<Registration>(&kv.value).ok();
        let owned = stored.as_ref().is_some_and(Registration::is_synced);
        match wanted.remove(&kv.key) {
            // A sidecar's registration at the same address: it stands for the pod already.
            Some(_) if !owned => {}
            Some(r) if stored.as_ref() == Some(r) => {}
            Some(r) => puts.push(Op::put("endpoint", kv.key.clone(), json(r), kv.mod_revision)),
            None if owned => deletes.push(Op::delete("endpoint", kv)),
            None => {}
        }
    }
    for (key, r) in wanted {
        puts.push(Op::put("endpoint", key, json(r), 0));
    }
    if desired.is_none()
        && let Some(kv) = current.document.as_ref().filter(|kv| owned_document(kv))
    {
        deletes.push(Op::delete("service", kv));
    }
    // Documents before their endpoints, endpoints before their document's deletion: a
    // transaction split in chunks never leaves endpoints without their ports.
    puts.extend(deletes);
    puts
}

#[cfg(test)]
mod tests {
    use super::*;
    use ballast_api::service::ServiceSpec;
    use ballast_api::{ObjectMeta, Service};

    use crate::store::KeyValue;

    fn kv(key: &str, json: serde_json::Value, revision: i64) -> KeyValue {
        KeyValue::json(key, json, revision)
    }

    fn mirrored(endpoints: &[&str]) -> Mirrored {
        Mirrored {
            document: Service {
                api_version: ballast_api::API_VERSION.into(),
                kind: "Service".into(),
                metadata: ObjectMeta {
                    name: "web".into(),
                    namespace: Some("shop".into()),
                    annotations: [(SOURCE_ANNOTATION.to_owned(), SOURCE_KUBERNETES.to_owned())].into(),
                    ..Default::default()
                },
                spec: ServiceSpec::default(),
            },
            endpoints: endpoints
                .iter()
                .map(|a| {
                    let r = Registration {
                        address: (*a).to_owned(),
                        pod: String::new(),
                        weight: 1,
                        source: Some(SOURCE_KUBERNETES.into()),
                        identity: None,
                    };
                    ((*a).to_owned(), r)
                })
                .collect(),
        }
    }

    fn summary(ops: &[Op]) -> Vec<(String, bool, i64)> {
        ops.iter().map(|o| (o.write.key.clone(), o.write.value.is_some(), o.write.expect)).collect()
    }

    #[test]
    fn writes_what_changed_and_deletes_only_its_own() {
        let keys = Keys::default();
        let name = ("shop".to_owned(), "web".to_owned());
        let synced = |a: &str| serde_json::to_value(&mirrored(&[a]).endpoints[a]).expect("json");
        let current = ServiceKeys {
            document: None,
            endpoints: vec![
                kv("/ballast/endpoints/shop/web/10.0.0.1:8080", synced("10.0.0.1:8080"), 5),
                kv("/ballast/endpoints/shop/web/10.0.0.2:8080", synced("10.0.0.2:8080"), 6),
                kv(
                    "/ballast/endpoints/shop/web/10.0.0.9:4143",
                    serde_json::json!({"address": "10.0.0.9:4143", "pod": "x"}),
                    7,
                ),
            ],
        };
        let ops = plan_service(&keys, &name, Some(&mirrored(&["10.0.0.1:8080", "10.0.0.3:8080"])), &current);
        assert_eq!(
            summary(&ops),
            [
                ("/ballast/services/shop/web".to_owned(), true, 0),
                ("/ballast/endpoints/shop/web/10.0.0.3:8080".to_owned(), true, 0),
                ("/ballast/endpoints/shop/web/10.0.0.2:8080".to_owned(), false, 6),
            ]
        );
        // Gone from Kubernetes: its keys go, the registration stays.
        let mut current = current;
        current.document = Some(kv(
            "/ballast/services/shop/web",
            serde_json::to_value(&mirrored(&[]).document).expect("json"),
            4,
        ));
        let ops = plan_service(&keys, &name, None, &current);
        assert_eq!(
            summary(&ops),
            [
                ("/ballast/endpoints/shop/web/10.0.0.1:8080".to_owned(), false, 5),
                ("/ballast/endpoints/shop/web/10.0.0.2:8080".to_owned(), false, 6),
                ("/ballast/services/shop/web".to_owned(), false, 4),
            ]
        );
    }

    #[test]
    fn a_document_applied_with_ballastctl_wins() {
        let keys = Keys::default();
        let name = ("shop".to_owned(), "web".to_owned());
        let applied = serde_json::json!({"apiVersion": "ballast.io/v1alpha1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop"}, "spec": {}});
        let current = ServiceKeys {
            document: Some(kv("/ballast/services/shop/web", applied, 3)),
            endpoints: vec![kv(
                "/ballast/endpoints/shop/web/10.0.0.1:8080",
                serde_json::json!({"address": "10.0.0.1:8080", "pod": "", "source": "kubernetes"}),
                5,
            )],
        };
        let ops = plan_service(&keys, &name, Some(&mirrored(&["10.0.0.1:8080"])), &current);
        assert_eq!(summary(&ops), [("/ballast/endpoints/shop/web/10.0.0.1:8080".to_owned(), false, 5)]);
    }
}
