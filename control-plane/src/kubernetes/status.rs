//! The `Accepted` condition written back to each ResiliencePolicy, only when it changes.
//!
//! The watcher sees every status write as a change of the resource, and the sync looks at
//! every change: writing on every look would loop forever. A status is written when what
//! it would say differs from the status the resource holds (the generation, the reason,
//! the message; [`ResiliencePolicyStatus::set_accepted`] keeps `lastTransitionTime`
//! unless the status flips) and from what this writer last wrote to that very object
//! (its uid) — the resource in the cache may not show that write yet.
//!
//! The write is a JSON merge patch of `status` on the status subresource (RBAC:
//! `patch` on `resiliencepolicies/status`). The conditions list is replaced as a whole:
//! Ballast owns the `Accepted` condition and keeps any other it finds.

use std::collections::HashMap;

use ballast_api::crd::{ResiliencePolicyResource, ResiliencePolicyStatus, now};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};

use super::KubernetesError;
use super::policies::Outcome;
use crate::metrics::Metrics;

/// The field manager named in the API server's managed fields.
pub const FIELD_MANAGER: &str = "ballast-control-plane";

/// `(namespace, name, uid)`.
type ObjectId = (String, String, String);

pub struct StatusWriter {
    client: Client,
    written: HashMap<ObjectId, ResiliencePolicyStatus>,
}

/// `s` with every `lastTransitionTime` the same, to compare what two statuses say.
fn said(s: &ResiliencePolicyStatus) -> ResiliencePolicyStatus {
    let mut s = s.clone();
    for c in &mut s.conditions {
        c.last_transition_time = Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
    }
    s
}

impl StatusWriter {
    pub fn new(client: Client) -> Self {
        Self { client, written: HashMap::new() }
    }

    /// Writes `r`'s status for `outcome` if that changes it; whether it wrote.
    pub async fn write(
        &mut self,
        r: &ResiliencePolicyResource,
        outcome: &Outcome,
        metrics: &Metrics,
    ) -> Result<bool, KubernetesError> {
        let namespace = r.metadata.namespace.clone().unwrap_or_default();
        let name = r.metadata.name.clone().unwrap_or_default();
        let id = (namespace.clone(), name.clone(), r.metadata.uid.clone().unwrap_or_default());
        let mut status = r.status.clone().unwrap_or_default();
        if !status.set_accepted(outcome.reason, outcome.message.clone(), r.metadata.generation, now()) {
            return Ok(false);
        }
        if self.written.get(&id).is_some_and(|w| said(w) == said(&status)) {
            return Ok(false);
        }
        let api: Api<ResiliencePolicyResource> = Api::namespaced(self.client.clone(), &namespace);
        let params = PatchParams { field_manager: Some(FIELD_MANAGER.to_owned()), ..Default::default() };
        let patch = Patch::Merge(serde_json::json!({ "status": status }));
        match api.patch_status(&name, &params, &patch).await {
            Ok(_) => {}
            // Deleted meanwhile: its deletion event follows.
            Err(kube::Error::Api(s)) if s.code == 404 => return Ok(false),
            Err(e) => {
                return Err(KubernetesError::Status {
                    namespace,
                    name,
                    message: ballast_api::errors::chain(&e),
                });
            }
        }
        metrics.kubernetes_status_writes.with_label_values(&[outcome.reason.as_str()]).inc();
        tracing::info!(
            policy = %format!("{namespace}/{name}"),
            accepted = outcome.reason.status(),
            reason = outcome.reason.as_str(),
            message = %outcome.message,
            "ResiliencePolicy status written"
        );
        self.written.insert(id, status);
        Ok(true)
    }

    /// Forgets what was written to resources no longer in `alive` (deleted ones).
    pub fn retain(&mut self, alive: impl Fn(&str, &str, &str) -> bool) {
        self.written.retain(|(ns, name, uid), _| alive(ns, name, uid));
    }
}
