//! The webhook's serving certificate.
//!
//! Two ways to get one, as with Linkerd's and Istio's injectors:
//! * **Files** (`--tls-cert`, `--tls-key`), e.g. a cert-manager Secret mounted as a
//!   volume. The files are read again every [`RELOAD_EVERY`] and a changed pair is
//!   swapped in for new handshakes; a pair that does not parse (a half-written rotation)
//!   is logged and the old certificate kept. Polling instead of inotify because Secret
//!   volumes change by swapping a symlink to a new directory, which inotify on the file
//!   does not see.
//! * **Generated** (`--tls-secret`, `--webhook-config`): at start the injector reads the
//!   Secret; if it is missing, unreadable or within [`RENEW_BEFORE`] of expiry, it
//!   generates a CA and a serving certificate for the Service's DNS names (rcgen) and
//!   writes them there (so every replica serves the same one), then patches the CA into
//!   the MutatingWebhookConfiguration's `caBundle`. No cert-manager needed.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use base64::Engine as _;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use rustls::pki_types::pem::{Error as PemError, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde_json::json;

/// How often certificate files are checked for a change.
pub const RELOAD_EVERY: Duration = Duration::from_secs(2);
/// A generated serving certificate lives this long...
pub const SERVING_LIFETIME: time::Duration = time::Duration::days(365);
/// ...and is replaced at start when less than this is left.
pub const RENEW_BEFORE: time::Duration = time::Duration::days(30);
/// Annotation on the Secret with the serving certificate's expiry (Unix seconds), so
/// that no X.509 parser is needed to decide about renewal.
pub const NOT_AFTER_ANNOTATION: &str = "ballast.io/not-after";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("malformed PEM in {what}: {source}")]
    Pem { what: String, source: PemError },
    #[error("no certificate in the PEM {what}")]
    NoCertificate { what: String },
    #[error("no private key in the PEM {what}")]
    NoKey { what: String },
    #[error("unusable private key in {what}: {source}")]
    Key { what: String, source: rustls::Error },
    #[error("cannot generate the webhook certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error(
        "Secret {namespace}/{name}: {source} (does the injector's ServiceAccount have create, get and update on it?)"
    )]
    Secret { namespace: String, name: String, source: kube::Error },
    #[error(
        "MutatingWebhookConfiguration {name}: {source} (does the injector's ServiceAccount have get and patch on it?)"
    )]
    Webhook { name: String, source: kube::Error },
    #[error("MutatingWebhookConfiguration {name} has no webhook calling service {namespace}/{service}")]
    NoWebhook { name: String, namespace: String, service: String },
}

/// A certificate and key in PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct Pem {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
}

impl std::fmt::Debug for Pem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pem").field("cert_bytes", &self.cert.len()).finish_non_exhaustive()
    }
}

pub fn certified_key(pem: &Pem, what: &str) -> Result<CertifiedKey, TlsError> {
    let certs = CertificateDer::pem_slice_iter(&pem.cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem { what: what.into(), source })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { what: what.into() });
    }
    let key = PrivateKeyDer::from_pem_slice(&pem.key).map_err(|e| match e {
        PemError::NoItemsFound => TlsError::NoKey { what: what.into() },
        source => TlsError::Pem { what: what.into(), source },
    })?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|source| TlsError::Key { what: what.into(), source })?;
    Ok(CertifiedKey::new(certs, signing))
}

/// The certificate handed to every handshake, swappable while serving.
#[derive(Debug)]
pub struct Certificate {
    current: ArcSwap<CertifiedKey>,
}

impl Certificate {
    pub fn new(key: CertifiedKey) -> Arc<Self> {
        Arc::new(Self { current: ArcSwap::from_pointee(key) })
    }

    pub fn replace(&self, key: CertifiedKey) {
        self.current.store(Arc::new(key));
    }

    /// The rustls server configuration: TLS 1.2 and 1.3, HTTP/2 and HTTP/1.1 by ALPN.
    pub fn server_config(self: &Arc<Self>) -> rustls::ServerConfig {
        let mut config =
            rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map(|b| b.with_no_client_auth().with_cert_resolver(self.clone()))
                // ring supports the default versions; this cannot fail.
                .unwrap_or_else(|_| unreachable!("ring supports TLS 1.2 and 1.3"));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        config
    }
}

impl ResolvesServerCert for Certificate {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn read_pair(cert: &Path, key: &Path) -> Result<Pem, TlsError> {
    let read = |p: &Path| std::fs::read(p).map_err(|source| TlsError::Read { path: p.to_owned(), source });
    Ok(Pem { cert: read(cert)?, key: read(key)? })
}

/// Loads the pair once (an error here stops the injector at start).
pub fn load_files(cert: &Path, key: &Path) -> Result<(Pem, CertifiedKey), TlsError> {
    let pem = read_pair(cert, key)?;
    let what = format!("{} / {}", cert.display(), key.display());
    let certified = certified_key(&pem, &what)?;
    Ok((pem, certified))
}

/// Re-reads the files every [`RELOAD_EVERY`] and swaps in a changed, valid pair;
/// `on_reload(ok)` counts the attempts.
pub async fn watch_files(
    cert: PathBuf,
    key: PathBuf,
    mut last: Pem,
    target: Arc<Certificate>,
    on_reload: impl Fn(bool) + Send + 'static,
) {
    let mut tick = tokio::time::interval(RELOAD_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let pem = match read_pair(&cert, &key) {
            Ok(p) if p != last => p,
            Ok(_) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the certificate files; serving the previous certificate");
                continue;
            }
        };
        match certified_key(&pem, &format!("{} / {}", cert.display(), key.display())) {
            Ok(k) => {
                target.replace(k);
                tracing::info!(cert = %cert.display(), "serving certificate reloaded");
                on_reload(true);
                last = pem;
            }
            Err(e) => {
                tracing::warn!(error = %e, "new certificate files do not parse; serving the previous certificate");
                on_reload(false);
            }
        }
    }
}

/// A generated CA and the serving certificate it signed.
#[derive(Debug, Clone)]
pub struct Generated {
    pub ca_pem: Vec<u8>,
    pub serving: Pem,
    /// Expiry of the serving certificate, Unix seconds.
    pub not_after: i64,
}

/// The DNS names the API server may use for `service` in `namespace`.
pub fn service_names(service: &str, namespace: &str) -> Vec<String> {
    vec![
        service.to_owned(),
        format!("{service}.{namespace}"),
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
    ]
}

/// A new CA (10 years) and a serving certificate for `names` signed by it.
pub fn generate(names: Vec<String>) -> Result<Generated, TlsError> {
    let now = time::OffsetDateTime::now_utc();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    ca.distinguished_name.push(rcgen::DnType::CommonName, "ballast-injector-ca");
    ca.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    ca.not_before = now - time::Duration::hours(1);
    ca.not_after = now + time::Duration::days(3650);
    let ca_key = rcgen::KeyPair::generate()?;
    let ca = rcgen::CertifiedIssuer::self_signed(ca, ca_key)?;

    let mut leaf = rcgen::CertificateParams::new(names.clone())?;
    leaf.distinguished_name.push(rcgen::DnType::CommonName, names.first().cloned().unwrap_or_default());
    leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    leaf.not_before = now - time::Duration::hours(1);
    leaf.not_after = now + SERVING_LIFETIME;
    let leaf_key = rcgen::KeyPair::generate()?;
    let cert = leaf.signed_by(&leaf_key, &ca)?;
    Ok(Generated {
        ca_pem: ca.pem().into_bytes(),
        serving: Pem { cert: cert.pem().into_bytes(), key: leaf_key.serialize_pem().into_bytes() },
        not_after: leaf.not_after.unix_timestamp(),
    })
}

/// Where the generated certificate lives and whom to tell about it.
#[derive(Debug, Clone)]
pub struct Bootstrap {
    pub namespace: String,
    pub secret: String,
    pub webhook_config: String,
    pub service: String,
}

impl Bootstrap {
    /// The serving pair from the Secret, generated (and the Secret written) when needed;
    /// then the webhook's `caBundle` set to its CA.
    pub async fn run(&self, client: kube::Client) -> Result<Generated, TlsError> {
        let generated = self.secret(client.clone()).await?;
        self.patch_webhook(client, &generated.ca_pem).await?;
        Ok(generated)
    }

    fn secret_err(&self, source: kube::Error) -> TlsError {
        TlsError::Secret { namespace: self.namespace.clone(), name: self.secret.clone(), source }
    }

    async fn secret(&self, client: kube::Client) -> Result<Generated, TlsError> {
        let api: Api<Secret> = Api::namespaced(client, &self.namespace);
        let existing = api.get_opt(&self.secret).await.map_err(|e| self.secret_err(e))?;
        if let Some(s) = &existing
            && let Some(g) = usable(s)
        {
            tracing::info!(secret = %self.secret, "serving the webhook certificate stored in the Secret");
            return Ok(g);
        }
        let generated = generate(service_names(&self.service, &self.namespace))?;
        let mut secret = to_secret(&self.secret, &generated);
        match existing {
            None => match api.create(&PostParams::default(), &secret).await {
                Ok(_) => {}
                // Another replica created it first: serve that one, so both agree.
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    let s = api.get(&self.secret).await.map_err(|e| self.secret_err(e))?;
                    return usable(&s).ok_or_else(|| {
                        self.secret_err(kube::Error::Service(
                            "the Secret another replica wrote is unusable".into(),
                        ))
                    });
                }
                Err(e) => return Err(self.secret_err(e)),
            },
            Some(old) => {
                // Replace the unusable or expiring one; resourceVersion makes a race with
                // another replica fail (409) instead of overwriting it.
                secret.metadata.resource_version = old.metadata.resource_version.clone();
                api.replace(&self.secret, &PostParams::default(), &secret)
                    .await
                    .map_err(|e| self.secret_err(e))?;
            }
        }
        tracing::info!(secret = %self.secret, "generated the webhook certificate and stored it in the Secret");
        Ok(generated)
    }

    async fn patch_webhook(&self, client: kube::Client, ca_pem: &[u8]) -> Result<(), TlsError> {
        let api: Api<MutatingWebhookConfiguration> = Api::all(client);
        let err = |source| TlsError::Webhook { name: self.webhook_config.clone(), source };
        let config = api.get(&self.webhook_config).await.map_err(err)?;
        let bundle = base64::engine::general_purpose::STANDARD.encode(ca_pem);
        let ours = |w: &&k8s_openapi::api::admissionregistration::v1::MutatingWebhook| {
            w.client_config
                .service
                .as_ref()
                .is_some_and(|s| s.name == self.service && s.namespace == self.namespace)
        };
        let webhooks: Vec<_> =
            config.webhooks.iter().flatten().enumerate().filter(|(_, w)| ours(w)).collect();
        if webhooks.is_empty() {
            return Err(TlsError::NoWebhook {
                name: self.webhook_config.clone(),
                namespace: self.namespace.clone(),
                service: self.service.clone(),
            });
        }
        let mut ops = Vec::new();
        for (i, w) in webhooks {
            if w.client_config.ca_bundle.as_ref().is_some_and(|b| b.0 == ca_pem) {
                continue;
            }
            // `test` guards the index: if the list changed since the GET, the patch fails.
            ops.push(json!({"op": "test", "path": format!("/webhooks/{i}/name"), "value": w.name}));
            ops.push(
                json!({"op": "add", "path": format!("/webhooks/{i}/clientConfig/caBundle"), "value": bundle}),
            );
        }
        if ops.is_empty() {
            return Ok(());
        }
        let patch: json_patch::Patch = serde_json::from_value(serde_json::Value::Array(ops))
            .map_err(|e| err(kube::Error::SerdeError(e)))?;
        api.patch(&self.webhook_config, &PatchParams::default(), &Patch::Json::<()>(patch))
            .await
            .map_err(err)?;
        tracing::info!(webhook = %self.webhook_config, "caBundle updated");
        Ok(())
    }
}

fn to_secret(name: &str, g: &Generated) -> Secret {
    let data = [("ca.crt", &g.ca_pem), ("tls.crt", &g.serving.cert), ("tls.key", &g.serving.key)]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), ByteString(v.clone())))
        .collect();
    Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.to_owned()),
            annotations: Some([(NOT_AFTER_ANNOTATION.to_owned(), g.not_after.to_string())].into()),
            labels: Some([("app.kubernetes.io/part-of".to_owned(), "ballast".to_owned())].into()),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(data),
        ..Default::default()
    }
}

/// The Secret's pair when it parses and is not close to expiry.
fn usable(s: &Secret) -> Option<Generated> {
    let data = s.data.as_ref()?;
    let get = |k: &str| data.get(k).map(|b| b.0.clone());
    let g = Generated {
        ca_pem: get("ca.crt")?,
        serving: Pem { cert: get("tls.crt")?, key: get("tls.key")? },
        not_after: s.metadata.annotations.as_ref()?.get(NOT_AFTER_ANNOTATION)?.parse().ok()?,
    };
    let left = g.not_after - time::OffsetDateTime::now_utc().unix_timestamp();
    (left > RENEW_BEFORE.whole_seconds() && certified_key(&g.serving, "the Secret").is_ok()).then_some(g)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_malformed_certificate_or_key_is_an_error_not_skipped() {
        let good = generate(vec!["localhost".into()]).expect("generate").serving;
        assert!(certified_key(&good, "good").is_ok());
        // A chain whose second certificate is cut off (a half-written rotation): refused,
        // not served with the first alone.
        let cut =
            Pem { cert: [&good.cert[..], b"-----BEGIN CERTIFICATE-----\nMIIB"].concat(), ..good.clone() };
        assert!(matches!(certified_key(&cut, "cut"), Err(TlsError::Pem { .. })));
        let not_base64 = b"-----BEGIN CERTIFICATE-----\n%%%%\n-----END CERTIFICATE-----\n";
        let bad_base64 = Pem { cert: [&good.cert[..], not_base64].concat(), ..good.clone() };
        assert!(matches!(certified_key(&bad_base64, "bad"), Err(TlsError::Pem { .. })));
        let no_cert = Pem { cert: b"no PEM here\n".to_vec(), ..good.clone() };
        assert!(matches!(certified_key(&no_cert, "none"), Err(TlsError::NoCertificate { .. })));
        let no_key = Pem { key: good.cert.clone(), ..good.clone() };
        assert!(matches!(certified_key(&no_key, "no key"), Err(TlsError::NoKey { .. })));
        let cut_key = Pem { key: b"-----BEGIN PRIVATE KEY-----\nMIIE".to_vec(), ..good };
        assert!(matches!(certified_key(&cut_key, "cut key"), Err(TlsError::Pem { .. })));
    }
}
