//! The namespace opt-in label (`ballast.io/inject=enabled`), read through the API server
//! and cached.
//!
//! A short TTL cache of single GETs rather than a watch of every namespace: the webhook
//! only asks about namespaces in which pods are being created, a burst of pods (a
//! Deployment scaled to 50) costs one API call, and a label change is seen within the
//! TTL. When the API cannot be reached the last known answer is used; with none, the pod
//! is admitted without a sidecar and the review carries a warning saying why.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use kube::Api;

use crate::annotations;

#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("cannot read namespace {namespace:?} from the Kubernetes API: {source}")]
    Api { namespace: String, source: kube::Error },
    #[error(
        "no Kubernetes API client (the injector could not load a kubeconfig or in-cluster config at start)"
    )]
    NoClient,
}

pub struct Namespaces {
    api: Option<Api<Namespace>>,
    ttl: Duration,
    cache: Mutex<HashMap<String, (Instant, bool)>>,
}

impl Namespaces {
    pub fn new(client: kube::Client, ttl: Duration) -> Self {
        Self { api: Some(Api::all(client)), ttl, cache: Mutex::default() }
    }

    /// No API: only pods that opt in by annotation are injected.
    pub fn without_api() -> Self {
        Self { api: None, ttl: Duration::ZERO, cache: Mutex::default() }
    }

    /// Whether `namespace` carries `ballast.io/inject=enabled`.
    pub async fn enabled(&self, namespace: &str) -> Result<bool, LookupError> {
        let cached = self.cache.lock().ok().and_then(|c| c.get(namespace).copied());
        if let Some((at, enabled)) = cached
            && at.elapsed() < self.ttl
        {
            return Ok(enabled);
        }
        let Some(api) = &self.api else { return Err(LookupError::NoClient) };
        match api.get_opt(namespace).await {
            Ok(ns) => {
                let enabled = ns
                    .and_then(|ns| ns.metadata.labels)
                    .is_some_and(|l| l.get(annotations::INJECT).is_some_and(|v| v == "enabled"));
                if let Ok(mut c) = self.cache.lock() {
                    if c.len() > 10_000 {
                        c.clear();
                    }
                    c.insert(namespace.to_owned(), (Instant::now(), enabled));
                }
                Ok(enabled)
            }
            Err(source) => match cached {
                Some((_, enabled)) => {
                    tracing::warn!(namespace, error = %source, "namespace lookup failed; using the last known label");
                    Ok(enabled)
                }
                None => Err(LookupError::Api { namespace: namespace.to_owned(), source }),
            },
        }
    }
}
