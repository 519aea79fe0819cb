//! Where the CA comes from ([`CaSource`]), and how replicas end up sharing one.
//!
//! * **Files** (`--ca-cert`, `--ca-key`): the operator's own CA (cert-manager, an
//!   offline root's intermediate, ...). Every replica mounts the same files.
//! * **A Kubernetes Secret** (`--ca-secret`, with `--kubernetes`): keys `ca.crt` and
//!   `ca.key`. When it does not exist, the first replica generates a CA and creates it;
//!   a replica that loses that race (409 Conflict) reads the winner's. The key then lives
//!   where Kubernetes keeps secrets, readable only through RBAC.
//! * **Generated** (neither): a root generated on first start and kept in the store
//!   under `<prefix>/identity/ca`, created only if absent (a guarded write), so every
//!   replica on one etcd signs with the same root. The CA key is then in etcd, readable
//!   by anyone who can read etcd or its backups: convenient for a laptop, the demo and
//!   tests, but production should give files or a Secret.

use std::path::{Path, PathBuf};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};
use serde::{Deserialize, Serialize};

use crate::identity::CaSource;
use crate::identity::ca::{Authority, CaError};
use crate::keys::Keys;
use crate::store::{Guarded, Store, StoreError};

/// The Secret's keys.
pub const SECRET_CERT: &str = "ca.crt";
pub const SECRET_KEY: &str = "ca.key";

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {}: {source}; check --ca-cert/--ca-key", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    /// The CA given as files: the message says which flag to fix.
    #[error("the CA from {} and {} (--ca-cert, --ca-key): {source}{}", cert.display(), key.display(), files_hint(source))]
    Files { cert: PathBuf, key: PathBuf, source: CaError },
    /// The CA from a Secret, the store, or a new root.
    #[error("the CA from {from}: {source}")]
    Ca { from: String, source: CaError },
    #[error(
        "the CA stored under {key} cannot be read ({message}); restore it from a backup, or delete the key so that a new CA is generated (every workload then needs a new certificate)"
    )]
    Stored { key: String, message: String },
    #[error("cannot read or store the generated CA: {0}")]
    Store(#[from] StoreError),
    #[error("--ca-secret needs --kubernetes (the CA Secret is read with the Kubernetes client)")]
    NoClient,
    #[error(
        "Secret {namespace}/{name} has no {key:?}; it must hold ca.crt and ca.key (PEM), or be deleted so that a CA is generated into it"
    )]
    SecretIncomplete { namespace: String, name: String, key: &'static str },
    #[error(
        "cannot read or create Secret {namespace}/{name}: {message}; the control plane needs get and create on secrets in its namespace"
    )]
    Kubernetes { namespace: String, name: String, message: String },
}

/// What to change on the command line when the CA files are wrong.
fn files_hint(e: &CaError) -> &'static str {
    match e {
        CaError::Certificate(_) => "; give --ca-cert a PEM file with one CERTIFICATE",
        CaError::Key(_) => "; give --ca-key the CA's private key in PKCS#8 PEM",
        CaError::KeyMismatch => "; give --ca-key the private key of --ca-cert's certificate",
        CaError::NotCa => "; give --ca-cert a root or intermediate CA certificate",
        CaError::Expired(_) => "; give --ca-cert and --ca-key a CA that is still valid",
        CaError::Generate(_) | CaError::Sign(_) => "",
    }
}

/// The generated CA as the store keeps it.
#[derive(Serialize, Deserialize)]
struct StoredCa {
    certificate: String,
    key: String,
}

/// Loads (or creates, for a Secret or the store) the CA.
pub async fn load(
    source: &CaSource,
    trust_domain: &str,
    store: &Store,
    keys: &Keys,
    client: Option<&kube::Client>,
) -> Result<Authority, LoadError> {
    match source {
        CaSource::Files { cert, key } => {
            let read = |p: &Path| {
                std::fs::read_to_string(p).map_err(|source| LoadError::Read { path: p.to_owned(), source })
            };
            let (c, k) = (read(cert)?, read(key)?);
            Authority::from_pem(&c, &k).map_err(|source| LoadError::Files {
                cert: cert.clone(),
                key: key.clone(),
                source,
            })
        }
        CaSource::Generated => from_store(trust_domain, store, keys).await,
        CaSource::Secret { namespace, name } => {
            let client = client.ok_or(LoadError::NoClient)?;
            from_secret(trust_domain, client, namespace, name).await
        }
    }
}

async fn from_store(trust_domain: &str, store: &Store, keys: &Keys) -> Result<Authority, LoadError> {
    let key = keys.identity_ca();
    let parse = |value: &[u8]| {
        let stored: StoredCa = serde_json::from_slice(value)
            .map_err(|e| LoadError::Stored { key: key.clone(), message: e.to_string() })?;
        Authority::from_pem(&stored.certificate, &stored.key)
            .map_err(|source| LoadError::Ca { from: format!("the store ({key})"), source })
    };
    if let (Some(kv), _) = store.get(&key).await? {
        return parse(&kv.value);
    }
    let ca = Authority::generate(trust_domain)
        .map_err(|source| LoadError::Ca { from: "a new root".into(), source })?;
    let value = serde_json::to_vec(&StoredCa {
        certificate: ca.certificate_pem().to_owned(),
        key: ca.key_pem().to_owned(),
    })
    .unwrap_or_default();
    match store.write_if(vec![Guarded { key: key.clone(), value: Some(value), expect: 0 }]).await? {
        Some(_) => {
            tracing::info!(%key, "generated the mesh CA and stored it; production should pass --ca-cert/--ca-key or --ca-secret");
            Ok(ca)
        }
        // Another replica stored one first: use it.
        None => match store.get(&key).await? {
            (Some(kv), _) => parse(&kv.value),
            (None, _) => Err(LoadError::Store(StoreError::Backend(format!(
                "{key} vanished while it was being created"
            )))),
        },
    }
}

async fn from_secret(
    trust_domain: &str,
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> Result<Authority, LoadError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let failed = |e: kube::Error| LoadError::Kubernetes {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        message: ballast_api::errors::chain(&e),
    };
    if let Some(secret) = api.get_opt(name).await.map_err(failed)? {
        return parse_secret(&secret, namespace, name);
    }
    let ca = Authority::generate(trust_domain)
        .map_err(|source| LoadError::Ca { from: "a new root".into(), source })?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some([("app.kubernetes.io/part-of".to_owned(), "ballast".to_owned())].into()),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(
            [
                (SECRET_CERT.to_owned(), ByteString(ca.certificate_pem().as_bytes().to_vec())),
                (SECRET_KEY.to_owned(), ByteString(ca.key_pem().as_bytes().to_vec())),
            ]
            .into(),
        ),
        ..Default::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            tracing::info!(%namespace, %name, "generated the mesh CA into a new Secret");
            Ok(ca)
        }
        // Another replica created it first: use theirs.
        Err(kube::Error::Api(status)) if status.code == 409 => {
            let secret = api.get(name).await.map_err(failed)?;
            parse_secret(&secret, namespace, name)
        }
        Err(e) => Err(failed(e)),
    }
}

fn parse_secret(secret: &Secret, namespace: &str, name: &str) -> Result<Authority, LoadError> {
    let get = |key: &'static str| {
        let bytes = secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .map(|b| b.0.clone())
            .or_else(|| secret.string_data.as_ref().and_then(|d| d.get(key)).map(|s| s.clone().into_bytes()))
            .ok_or_else(|| LoadError::SecretIncomplete {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                key,
            })?;
        Ok::<_, LoadError>(String::from_utf8_lossy(&bytes).into_owned())
    };
    let (cert, key) = (get(SECRET_CERT)?, get(SECRET_KEY)?);
    Authority::from_pem(&cert, &key)
        .map_err(|source| LoadError::Ca { from: format!("Secret {namespace}/{name}"), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn replicas_on_one_store_share_the_generated_ca() {
        let store = Store::memory();
        let keys = Keys::default();
        let (a, b) = tokio::join!(
            load(&CaSource::Generated, "cluster.local", &store, &keys, None),
            load(&CaSource::Generated, "cluster.local", &store, &keys, None)
        );
        assert_eq!(a.unwrap().certificate_der(), b.unwrap().certificate_der());
    }

    #[tokio::test]
    async fn files_are_read_and_named_when_missing() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Authority::generate("cluster.local").unwrap();
        let (cert, key) = (dir.path().join("ca.crt"), dir.path().join("ca.key"));
        std::fs::write(&cert, ca.certificate_pem()).unwrap();
        std::fs::write(&key, ca.key_pem()).unwrap();
        let store = Store::memory();
        let loaded = load(
            &CaSource::Files { cert: cert.clone(), key },
            "cluster.local",
            &store,
            &Keys::default(),
            None,
        )
        .await
        .unwrap();
        assert_eq!(loaded.certificate_der(), ca.certificate_der());
        let missing = dir.path().join("nope.key");
        let e = load(
            &CaSource::Files { cert: cert.clone(), key: missing },
            "cluster.local",
            &store,
            &Keys::default(),
            None,
        )
        .await
        .unwrap_err();
        assert!(e.to_string().contains("nope.key"), "{e}");
        // Files that are not a CA: the message names the flag to fix.
        std::fs::write(&cert, "not a certificate").unwrap();
        let e = load(
            &CaSource::Files { cert: cert.clone(), key: dir.path().join("ca.key") },
            "cluster.local",
            &store,
            &Keys::default(),
            None,
        )
        .await
        .unwrap_err();
        assert!(e.to_string().contains("give --ca-cert a PEM file"), "{e}");
    }

    #[tokio::test]
    async fn a_broken_stored_ca_names_its_key_not_the_flags() {
        let store = Store::memory();
        let keys = Keys::default();
        store.put(&keys.identity_ca(), b"{not json".to_vec(), None).await.unwrap();
        let e = load(&CaSource::Generated, "cluster.local", &store, &keys, None).await.unwrap_err();
        let message = e.to_string();
        assert!(message.contains(&keys.identity_ca()), "{message}");
        assert!(!message.contains("--ca-"), "{message}");
    }
}
