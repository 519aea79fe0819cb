//! ResiliencePolicy resources → `<prefix>/policies/<ns>/<name>`, and what each one's
//! `Accepted` condition says. The plan is pure (tested here); [`super::term`] reads the
//! store, commits the plan and writes the statuses.
//!
//! The rules, those of `ballastctl apply` (DESIGN §4) plus what only the control plane can
//! check (`api/src/crd.rs`):
//!
//! * A resource is converted ([`to_policy`]) and validated by
//!   [`ResiliencePolicy::validate`], the one validation `ballastctl` runs, and stored in
//!   [`crate::api::stored_form`], the form `ballastctl apply` stores, with the sync's
//!   marker annotation added and kubectl's `last-applied-configuration` annotation left out
//!   (a copy of the whole object, which would make every `kubectl apply` a push to every
//!   caller). Valid: `Accepted=True`.
//! * Invalid (`Accepted=False`, reason `Invalid`, the message naming each field): nothing
//!   is written. A version stored before stays: a rejected policy never replaces a
//!   working one.
//! * One policy per target service. Among resources the older wins (creationTimestamp,
//!   then namespace and name); a policy applied with `ballastctl` always wins, since the
//!   sync may not touch it. The loser gets `Accepted=False`, reason `Conflict`, naming
//!   the winner, and its stored version (if any) is deleted so the store never holds two.
//!   A claim is made by what a resource would have in the store: its valid version, or
//!   the previous one kept while it is invalid.
//! * A `ballastctl`-applied policy under the very same name is a `Conflict` too: the sync
//!   leaves it alone and says so.
//! * What the sync stored for a resource that no longer exists is deleted.

use std::collections::BTreeMap;

use ballast_api::crd::{AcceptedReason, ResiliencePolicyResource, invalid_message, to_policy};
use ballast_api::{Document, ResiliencePolicy};

use super::mirror::{Op, owned_document};
use crate::api::{policy_conflict, stored_form};
use crate::keys::{Keys, SOURCE_ANNOTATION, SOURCE_KUBERNETES};
use crate::mesh::Name;
use crate::store::KeyValue;

/// kubectl's copy of the whole object, left out of the stored policy.
pub const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// A policy key as the store holds it.
#[derive(Debug, Clone)]
pub struct StoredPolicy {
    pub kv: KeyValue,
    pub owned: bool,
    /// `None` when it does not decode (then it claims no target).
    pub policy: Option<ResiliencePolicy>,
}

impl StoredPolicy {
    pub fn from_kv(kv: KeyValue) -> Self {
        let owned = owned_document(&kv);
        let policy = serde_json::from_slice(&kv.value).ok();
        Self { kv, owned, policy }
    }
}

/// What a resource's `Accepted` condition says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub reason: AcceptedReason,
    pub message: String,
}

#[derive(Debug, Default)]
pub struct Plan {
    pub ops: Vec<Op>,
    /// Per resource, by `(namespace, name)`.
    pub outcomes: BTreeMap<Name, Outcome>,
}

fn target(p: &ResiliencePolicy) -> Name {
    (p.target_namespace().to_owned(), p.spec.target_ref.service.clone())
}

/// The policy as the sync stores it: `r` with the marker, without kubectl's copy.
pub fn as_stored(r: &ResiliencePolicyResource) -> Result<ResiliencePolicy, Vec<ballast_api::FieldError>> {
    let mut p = to_policy(r).map_err(|e| vec![e])?;
    p.validate()?;
    p.metadata.annotations.remove(LAST_APPLIED);
    p.metadata.annotations.insert(SOURCE_ANNOTATION.to_owned(), SOURCE_KUBERNETES.to_owned());
    Ok(p)
}

/// Decides every resource's fate against what the store holds under `<prefix>/policies/`.
pub fn plan(
    keys: &Keys,
    resources: &[&ResiliencePolicyResource],
    stored: &BTreeMap<Name, StoredPolicy>,
) -> Plan {
    let mut plan = Plan::default();
    // Target service → the policy holding it, and whether `ballastctl` applied it.
    let mut claims: BTreeMap<Name, (ResiliencePolicy, bool)> = stored
        .values()
        .filter(|s| !s.owned)
        .filter_map(|s| s.policy.clone())
        .map(|p| (target(&p), (p, true)))
        .collect();
    let mut by_age: Vec<&ResiliencePolicyResource> = resources.to_vec();
    by_age.sort_by(|a, b| {
        let age = |r: &ResiliencePolicyResource| {
            // A resource without a creation time (never from a real API server) is the newest.
            (r.metadata.creation_timestamp.is_none(), r.metadata.creation_timestamp.clone())
        };
        (age(a), &a.metadata.namespace, &a.metadata.name).cmp(&(
            age(b),
            &b.metadata.namespace,
            &b.metadata.name,
        ))
    });
    for r in by_age {
        let name = super::cache::name_of(r);
        let current = stored.get(&name);
        if current.is_some_and(|s| !s.owned) {
            plan.outcomes.insert(
                name.clone(),
                Outcome {
                    reason: AcceptedReason::Conflict,
                    message: format!(
                        "a ResiliencePolicy {}/{} applied with ballastctl is stored under this name, and the control plane does not replace it; delete it with ballastctl (ballastctl delete policy) so that this resource takes over",
                        name.0, name.1
                    ),
                },
            );
            continue;
        }
        let ours = current.filter(|s| s.owned);
        let (candidate, mut outcome) = match as_stored(r) {
            Ok(p) => {
                let t = target(&p);
                let message = format!("in force for service {}/{}", t.0, t.1);
                (Some(p), Outcome { reason: AcceptedReason::Accepted, message })
            }
            Err(errs) => {
                let kept = ours.and_then(|s| s.policy.clone());
                let mut message = invalid_message(&errs);
                if kept.is_some() {
                    message.push_str("; the previously accepted version stays in force");
                }
                (kept, Outcome { reason: AcceptedReason::Invalid, message })
            }
        };
        let fresh = outcome.reason == AcceptedReason::Accepted;
        let mut keep = false;
        if let Some(p) = candidate {
            match claims.get(&target(&p)) {
                Some((other, by_ballastctl)) => {
                    let conflict = policy_conflict(&p, other).unwrap_or_default();
                    let remedy = if *by_ballastctl {
                        " (applied with ballastctl); delete that one with ballastctl or change spec.targetRef"
                    } else {
                        ", which is older; delete one of them or change spec.targetRef"
                    };
                    if fresh {
                        outcome = Outcome {
                            reason: AcceptedReason::Conflict,
                            message: format!("{conflict}{remedy}"),
                        };
                    } else {
                        // Invalid, and its previous version lost its target meanwhile.
                        outcome.message = format!(
                            "{}; its previous version is withdrawn: {conflict}{remedy}",
                            outcome
                                .message
                                .trim_end_matches("; the previously accepted version stays in force")
                        );
                    }
                }
                None => {
                    keep = true;
                    claims.insert(target(&p), (p.clone(), false));
                    if fresh && let Ok((key, value)) = stored_form(&Document::Policy(Box::new(p))) {
                        let key = keys.key(&key);
                        match ours {
                            Some(s) if s.kv.value == value => {}
                            Some(s) => plan.ops.push(Op::put("policy", key, value, s.kv.mod_revision)),
                            None => plan.ops.push(Op::put("policy", key, value, 0)),
                        }
                    }
                }
            }
        }
        if !keep && let Some(s) = ours {
            plan.ops.push(Op::delete("policy", &s.kv));
        }
        plan.outcomes.insert(name, outcome);
    }
    for (name, s) in stored {
        if s.owned && !plan.outcomes.contains_key(name) {
            plan.ops.push(Op::delete("policy", &s.kv));
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn resource(name: &str, created: &str, spec: serde_json::Value) -> ResiliencePolicyResource {
        serde_json::from_value(json!({
            "apiVersion": "ballast.io/v1alpha1", "kind": "ResiliencePolicy",
            "metadata": {
                "name": name, "namespace": "shop", "uid": format!("uid-{name}"), "generation": 1,
                "creationTimestamp": created, "resourceVersion": "1",
                "annotations": {LAST_APPLIED: "{...}"},
            },
            "spec": spec,
        }))
        .expect("a ResiliencePolicy")
    }

    fn stored_kv(keys: &Keys, p: &ResiliencePolicy, revision: i64) -> (Name, StoredPolicy) {
        let (key, value) = stored_form(&Document::Policy(Box::new(p.clone()))).expect("json");
        let name = (p.metadata.namespace_or_default().to_owned(), p.metadata.name.clone());
        let kv = KeyValue {
            key: keys.key(&key),
            value,
            create_revision: revision,
            mod_revision: revision,
            lease: None,
        };
        (name, StoredPolicy::from_kv(kv))
    }

    fn reason(plan: &Plan, name: &str) -> (AcceptedReason, String) {
        let o = &plan.outcomes[&("shop".to_owned(), name.to_owned())];
        (o.reason, o.message.clone())
    }

    #[test]
    fn valid_is_stored_with_the_marker_and_without_kubectls_copy() {
        let keys = Keys::default();
        let r = resource(
            "pay",
            "2024-01-01T00:00:00Z",
            json!({"targetRef": {"service": "payments"}, "timeouts": {"request": "2s"}}),
        );
        let plan = plan(&keys, &[&r], &BTreeMap::new());
        assert_eq!(reason(&plan, "pay").0, AcceptedReason::Accepted);
        assert_eq!(plan.ops.len(), 1);
        let stored: ResiliencePolicy =
            serde_json::from_slice(plan.ops[0].write.value.as_deref().expect("a put")).expect("a policy");
        assert_eq!(plan.ops[0].write.key, "/ballast/policies/shop/pay");
        assert_eq!(
            stored.metadata.annotations.get(SOURCE_ANNOTATION).map(String::as_str),
            Some(SOURCE_KUBERNETES)
        );
        assert!(!stored.metadata.annotations.contains_key(LAST_APPLIED));
        assert_eq!(stored.metadata.namespace.as_deref(), Some("shop"));
        // Stored already: nothing to write.
        let stored = BTreeMap::from([stored_kv(&keys, &stored, 5)]);
        assert!(super::plan(&keys, &[&r], &stored).ops.is_empty());
    }

    #[test]
    fn an_invalid_update_keeps_the_stored_version() {
        let keys = Keys::default();
        let good = resource("pay", "2024-01-01T00:00:00Z", json!({"targetRef": {"service": "payments"}}));
        let stored = as_stored(&good).expect("valid");
        let stored = BTreeMap::from([stored_kv(&keys, &stored, 5)]);
        let bad = resource(
            "pay",
            "2024-01-01T00:00:00Z",
            json!({"targetRef": {"service": "payments"}, "retries": {"budget": {"ratio": 7.0}}}),
        );
        let plan = plan(&keys, &[&bad], &stored);
        let (why, message) = reason(&plan, "pay");
        assert_eq!(why, AcceptedReason::Invalid);
        assert!(
            message.contains("spec.retries.budget.ratio") && message.contains("stays in force"),
            "{message}"
        );
        assert!(plan.ops.is_empty(), "{:?}", plan.ops);
        // Invalid with nothing stored: nothing written, nothing kept.
        let plan = super::plan(&keys, &[&bad], &BTreeMap::new());
        assert!(plan.ops.is_empty() && !reason(&plan, "pay").1.contains("stays"));
        // A name that is not a DNS label is for the control plane to refuse.
        let dotted = resource("pay.v2", "2024-01-01T00:00:00Z", json!({"targetRef": {"service": "other"}}));
        let plan = super::plan(&keys, &[&dotted], &BTreeMap::new());
        let (why, message) = reason(&plan, "pay.v2");
        assert_eq!(why, AcceptedReason::Invalid);
        assert!(message.starts_with("metadata.name"), "{message}");
    }

    #[test]
    fn the_older_policy_wins_a_target_and_ballastctl_always_does() {
        let keys = Keys::default();
        let spec = json!({"targetRef": {"service": "payments"}});
        let newer = resource("a-newer", "2024-02-01T00:00:00Z", spec.clone());
        let older = resource("z-older", "2024-01-01T00:00:00Z", spec.clone());
        // The newer one was stored first (the older one moved its target here since).
        let stored = BTreeMap::from([stored_kv(&keys, &as_stored(&newer).expect("valid"), 5)]);
        let plan = plan(&keys, &[&newer, &older], &stored);
        assert_eq!(reason(&plan, "z-older").0, AcceptedReason::Accepted);
        let (why, message) = reason(&plan, "a-newer");
        assert_eq!(why, AcceptedReason::Conflict);
        assert!(message.contains("shop/z-older") && message.contains("older"), "{message}");
        let ops: Vec<(&str, bool)> =
            plan.ops.iter().map(|o| (o.write.key.as_str(), o.write.value.is_some())).collect();
        assert!(ops.contains(&("/ballast/policies/shop/a-newer", false)), "the loser's copy goes: {ops:?}");
        assert!(ops.contains(&("/ballast/policies/shop/z-older", true)), "{ops:?}");

        // A policy applied with ballastctl holds its target against any resource.
        let mut applied = as_stored(&older).expect("valid");
        applied.metadata.name = "by-hand".into();
        applied.metadata.annotations.clear();
        let stored = BTreeMap::from([stored_kv(&keys, &applied, 3)]);
        let plan = super::plan(&keys, &[&older], &stored);
        let (why, message) = reason(&plan, "z-older");
        assert_eq!(why, AcceptedReason::Conflict);
        assert!(message.contains("shop/by-hand") && message.contains("ballastctl"), "{message}");
        assert!(plan.ops.is_empty(), "ballastctl's policy is not touched: {:?}", plan.ops);
        // ... and its name.
        applied.metadata.name = "z-older".into();
        let stored = BTreeMap::from([stored_kv(&keys, &applied, 3)]);
        let plan = super::plan(&keys, &[&older], &stored);
        assert_eq!(reason(&plan, "z-older").0, AcceptedReason::Conflict);
        assert!(plan.ops.is_empty());
    }

    #[test]
    fn what_is_gone_from_kubernetes_goes_from_the_store() {
        let keys = Keys::default();
        let r = resource("pay", "2024-01-01T00:00:00Z", json!({"targetRef": {"service": "payments"}}));
        let mut applied = as_stored(&r).expect("valid");
        applied.metadata.name = "by-hand".into();
        applied.metadata.annotations.clear();
        applied.spec.target_ref.service = "other".into();
        let stored = BTreeMap::from([
            stored_kv(&keys, &as_stored(&r).expect("valid"), 5),
            stored_kv(&keys, &applied, 6),
        ]);
        let plan = plan(&keys, &[], &stored);
        let ops: Vec<(&str, bool)> =
            plan.ops.iter().map(|o| (o.write.key.as_str(), o.write.value.is_some())).collect();
        assert_eq!(ops, [("/ballast/policies/shop/pay", false)]);
    }
}
