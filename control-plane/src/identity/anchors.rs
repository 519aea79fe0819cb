//! The trust anchors published for the injector (with `--kubernetes`): ConfigMap
//! `ballast-trust-anchors`, key `ca.crt`, in the control plane's namespace.
//!
//! Sidecars need the CA certificate before they can talk TLS to the control plane at
//! all (to verify it on their first Certify call), so it cannot come over that
//! connection. The injector mounts this ConfigMap into every proxy. A ConfigMap, not the
//! CA Secret: it is public material, and reading it needs no access to the key.
//!
//! Every replica publishes (they share one CA, so they write the same content) and only
//! when the content differs: create, or replace what is there. It keeps publishing
//! every [`REPUBLISH`] while it runs, so a ConfigMap deleted or edited by hand is
//! restored (a look that finds the right content writes nothing). Failures are retried
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
/// How often the ConfigMap is checked (and restored if need be) after a success.
pub const REPUBLISH: Duration = Duration::from_secs(300);
/// The first retry's delay after a failure; it doubles up to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(30);

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

/// [`publish`] until `stopping`: every [`REPUBLISH`] after a success, with backoff after
/// a failure (another replica's concurrent create or update just makes the next
/// attempt find the right content).
pub async fn keep_publishing(
    client: kube::Client,
    namespace: String,
    pem: String,
    stopping: CancellationToken,
) {
    publish_every(client, namespace, pem, REPUBLISH, stopping).await;
}

/// [`keep_publishing`], looking every `every` after a success.
async fn publish_every(
    client: kube::Client,
    namespace: String,
    pem: String,
    every: Duration,
    stopping: CancellationToken,
) {
    let mut backoff = RETRY_MIN;
    let mut published = false;
    loop {
        let attempt = tokio::select! {
            _ = stopping.cancelled() => return,
            r = publish(&client, &namespace, &pem) => r,
        };
        let next = match attempt {
            Ok(wrote) => {
                // The first success, and every later one that had to restore it.
                if wrote || !published {
                    tracing::info!(%namespace, name = CONFIG_MAP, wrote, "trust anchors published");
                }
                published = true;
                backoff = RETRY_MIN;
                every
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "cannot publish the trust anchors");
                let delay = backoff;
                backoff = (backoff * 2).min(RETRY_MAX);
                delay
            }
        };
        tokio::select! {
            _ = stopping.cancelled() => return,
            _ = tokio::time::sleep(next) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::{Arc, Mutex};

    use bytes::Bytes;
    use http::{Method, Request, Response};
    use http_body_util::{BodyExt, Full};
    use serde_json::{Value, json};

    use super::*;

    /// A kube client whose API server holds one ConfigMap (or none) in `held`.
    fn client(held: Arc<Mutex<Option<Value>>>) -> kube::Client {
        let service = tower::service_fn(move |req: Request<kube::client::Body>| {
            let held = held.clone();
            async move {
                let method = req.method().clone();
                let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                let mut held = held.lock().unwrap_or_else(|p| p.into_inner());
                let (code, answer) = match (method, held.clone()) {
                    (Method::GET, Some(cm)) => (200, cm),
                    (Method::GET, None) => (
                        404,
                        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                               "reason": "NotFound", "code": 404, "message": "configmaps not found"}),
                    ),
                    (_, _) => {
                        let cm: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                        *held = Some(cm.clone());
                        (200, cm)
                    }
                };
                let mut r = Response::new(Full::new(Bytes::from(answer.to_string())));
                *r.status_mut() = http::StatusCode::from_u16(code).unwrap_or(http::StatusCode::OK);
                Ok::<_, Infallible>(r)
            }
        });
        kube::Client::new(service, "default")
    }

    fn pem_in(held: &Mutex<Option<Value>>) -> Option<String> {
        let held = held.lock().unwrap_or_else(|p| p.into_inner());
        held.as_ref()?["data"][CONFIG_MAP_KEY].as_str().map(str::to_owned)
    }

    /// Waits (at most 10 s) until the ConfigMap holds `pem`.
    async fn until_published(held: &Mutex<Option<Value>>, pem: &str, what: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while pem_in(held).as_deref() != Some(pem) {
            assert!(tokio::time::Instant::now() < deadline, "{what}: {:?}", pem_in(held));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn a_deleted_or_edited_config_map_is_published_again() {
        let held = Arc::new(Mutex::new(None));
        let stopping = CancellationToken::new();
        let task = tokio::spawn(publish_every(
            client(held.clone()),
            "ballast-system".into(),
            "PEM".into(),
            Duration::from_millis(50),
            stopping.clone(),
        ));
        until_published(&held, "PEM", "published at start").await;

        *held.lock().unwrap() = None;
        until_published(&held, "PEM", "a deleted ConfigMap is restored").await;

        if let Some(cm) = held.lock().unwrap().as_mut() {
            cm["data"][CONFIG_MAP_KEY] = json!("edited");
        }
        until_published(&held, "PEM", "an edited ConfigMap is restored").await;

        stopping.cancel();
        tokio::time::timeout(Duration::from_secs(1), task).await.expect("stops").expect("no panic");
    }
}
