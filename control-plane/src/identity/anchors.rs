//! The trust anchors published for the injector (with `--kubernetes`): ConfigMap
//! `ballast-trust-anchors`, key `ca.crt`, in the control plane's namespace.
//!
//! Sidecars need the CA certificate before they can talk TLS to the control plane at
//! all (to verify it on their first Certify call), so it cannot come over that
//! connection. The injector mounts this ConfigMap into every proxy. A ConfigMap, not the
//! CA Secret: it is public material, and reading it needs no access to the key.
//!
//! Every replica publishes (they share one CA, so they write the same content) and only
//! when the content differs: create, or replace what is there. Failures are retried
//! with backoff in the background: the mesh works meanwhile for sidecars that already
//! have the anchors.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio_util::sync::CancellationToken;

/// The ConfigMap's name.
pub const CONFIG_MAP: &str = "ballast-trust-anchors";
/// Its key holding the PEM.
pub const CONFIG_MAP_KEY: &str = "ca.crt";

#[derive(Debug, thiserror::Error)]
#[error(
    "cannot publish ConfigMap {namespace}/{CONFIG_MAP}: {message}; the control plane needs get, create and update on configmaps in its namespace"
)]
pub struct PublishError {
    namespace: String,
    message: String,
}

/// Creates or updates the ConfigMap once; `Ok(true)` when it wrote.
pub async fn publish(client: &kube::Client, namespace: &str, pem: &str) -> Result<bool, PublishError> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let failed = |e: kube::Error| PublishError {
        namespace: namespace.to_owned(),
        message: ballast_api::errors::chain(&e),
    };
    let data: BTreeMap<String, String> = [(CONFIG_MAP_KEY.to_owned(), pem.to_owned())].into();
    match api.get_opt(CONFIG_MAP).await.map_err(failed)? {
        Some(existing) => {
            if existing.data.as_ref().and_then(|d| d.get(CONFIG_MAP_KEY)).map(String::as_str) == Some(pem) {
                return Ok(false);
            }
            let mut updated = existing;
            updated.data.get_or_insert_with(BTreeMap::new).insert(CONFIG_MAP_KEY.to_owned(), pem.to_owned());
            api.replace(CONFIG_MAP, &PostParams::default(), &updated).await.map_err(failed)?;
            Ok(true)
        }
        None => {
            let cm = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(CONFIG_MAP.to_owned()),
                    namespace: Some(namespace.to_owned()),
                    labels: Some([("app.kubernetes.io/part-of".to_owned(), "ballast".to_owned())].into()),
                    ..Default::default()
                },
                data: Some(data),
                ..Default::default()
            };
            api.create(&PostParams::default(), &cm).await.map_err(failed)?;
            Ok(true)
        }
    }
}

/// [`publish`] until it succeeds or `stopping` (another replica's concurrent create or
/// update just makes the next attempt find the right content).
pub async fn keep_publishing(
    client: kube::Client,
    namespace: String,
    pem: String,
    stopping: CancellationToken,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let attempt = tokio::select! {
            _ = stopping.cancelled() => return,
            r = publish(&client, &namespace, &pem) => r,
        };
        match attempt {
            Ok(wrote) => {
                tracing::info!(%namespace, name = CONFIG_MAP, wrote, "trust anchors published");
                return;
            }
            Err(e) => tracing::warn!(error = %e, retry_in = ?backoff, "cannot publish the trust anchors"),
        }
        tokio::select! {
            _ = stopping.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}
