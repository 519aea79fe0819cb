//! Workload identity for injected proxies (issue 7): the mesh's trust anchors, read from
//! a file the control plane publishes, and what the injection adds with them.
//!
//! With `--identity-trust-anchors-file FILE`, every injected `ballast-proxy` gets:
//! * `BALLAST_IDENTITY_TRUST_ANCHORS`: the mesh's root certificates (PEM text). Their
//!   presence turns identity and mutual TLS on in the sidecar;
//! * `BALLAST_IDENTITY_TOKEN_FILE` = [`TOKEN_PATH`]: a projected service-account token
//!   (volume [`TOKEN_VOLUME`], audience [`TOKEN_AUDIENCE`], 24 h, rotated by the kubelet)
//!   with which the sidecar proves its service account to the control plane's CA.
//!
//! Decisions, and why:
//! * **The anchors come from a file, not a flag value**: in Kubernetes the control plane
//!   publishes its CA in the ConfigMap `ballast-trust-anchors` (key `ca.crt`), which the
//!   injector's Deployment mounts (optional, so the injector starts before the control
//!   plane has published it). The control plane may generate its CA at its first start,
//!   after the injector, and may rotate it; a file tracks both.
//! * **Re-read when it changes, checked at every review**: one `stat` per review, and a
//!   read only when the file's identity (device, inode), size or times changed. A
//!   ConfigMap volume changes by swapping a symlink to a new directory, which gives the
//!   file a new inode: the next review after the kubelet's swap sees the new anchors,
//!   with no poll interval in between and no inotify that would miss the swap.
//! * **No anchors, no identity, never no sidecar**: a missing, empty or invalid file
//!   injects the proxy *without* identity (plain text, as before issue 7), logs a warning
//!   saying what to check, sets `ballast_injector_identity_trust_anchors_loaded` to 0,
//!   counts each such injection (`ballast_injector_reviews_total{outcome="injected",
//!   reason="no-trust-anchors"}`) and warns in the admission response. Refusing pods
//!   would stop every rollout in the cluster on one missing ConfigMap.
//! * **Only certificates travel**: the file's certificates are checked (each must parse
//!   as a trust anchor) and re-encoded, so comments or stray text never reach pods; a
//!   file that also holds a private key is refused as a whole, since the anchors are
//!   copied into every meshed pod's environment, where a CA key must never go.
//! * **The token is a projected volume**, independent of the pod's
//!   `automountServiceAccountToken` (a pod with `false` still gets it, and only in the
//!   proxy container), bound to the pod (it stops being valid when the pod is deleted)
//!   and with an audience that only Ballast's control plane accepts.
//! * **The control plane URL is not rewritten**: with identity, the control plane serves
//!   TLS on its gRPC port, so `--control-plane-url` must be given as `https://` (the
//!   injector refuses to start otherwise, [`check_control_plane_url`]). The scheme the
//!   operator wrote is the scheme the sidecars use.
//! * **A pod opts out** with `ballast.io/identity: disabled`: its proxy gets no token, so
//!   no certificate of its own, and speaks plain text to its peers; it still gets the
//!   anchors, to verify the control plane's TLS.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use prometheus::IntGauge;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::{PemObject, SectionKind};

pub use ballast_api::identity::{TOKEN_AUDIENCE, TOKEN_PATH};

/// Name of the projected token volume added to injected pods.
pub const TOKEN_VOLUME: &str = "ballast-identity-token";
/// Lifetime asked for the projected token: the kubelet renews it at 80% of this.
pub const TOKEN_EXPIRATION_SECONDS: i64 = 86_400;
/// The proxy's environment variable with the trust anchors (PEM text).
pub const TRUST_ANCHORS_ENV: &str = "BALLAST_IDENTITY_TRUST_ANCHORS";
/// The proxy's environment variable with the token's path.
pub const TOKEN_FILE_ENV: &str = "BALLAST_IDENTITY_TOKEN_FILE";

/// The directory the token volume is mounted at, and the file name in it, from
/// [`TOKEN_PATH`].
pub fn token_mount() -> (&'static str, &'static str) {
    TOKEN_PATH.rsplit_once('/').unwrap_or(("/var/run/secrets/ballast.io/serviceaccount", "token"))
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("{path} does not exist")]
    Missing { path: PathBuf },
    #[error("cannot read {path}: {problem}")]
    Read { path: PathBuf, problem: String },
    #[error("{path} is empty")]
    Empty { path: PathBuf },
    #[error("{path} is not PEM: {problem}")]
    NotPem { path: PathBuf, problem: String },
    #[error("{path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")]
    NoCertificate { path: PathBuf },
    #[error(
        "{path} holds a private key; the trust anchors are copied into every meshed pod, so only the CA certificate may be in it"
    )]
    PrivateKey { path: PathBuf },
    #[error("certificate {index} of {path} is not a usable trust anchor: {problem}")]
    BadCertificate { path: PathBuf, index: usize, problem: String },
    #[error("--control-plane-url {url:?}: {problem}")]
    ControlPlaneUrl { url: String, problem: String },
}

/// Checks the control plane URL the proxies get: `http://` or `https://` with a host,
/// and `https://` when identity is on (the control plane then serves TLS on its gRPC
/// port; a plain-text URL would never connect).
pub fn check_control_plane_url(url: &str, identity: bool) -> Result<(), IdentityError> {
    let bad = |problem: &str| IdentityError::ControlPlaneUrl { url: url.to_owned(), problem: problem.into() };
    let uri: http::Uri = url.parse().map_err(|_| bad("is not a URL"))?;
    if uri.host().is_none_or(str::is_empty) {
        return Err(bad("names no host"));
    }
    match uri.scheme_str() {
        Some("https") => Ok(()),
        Some("http") if identity => Err(bad(
            "must be https:// with --identity-trust-anchors-file: the control plane serves TLS on its gRPC port when identity is on",
        )),
        Some("http") => Ok(()),
        _ => Err(bad("must start with http:// or https://")),
    }
}

/// PEM as the sidecars and the goldens expect it: `\n` line endings (the `pem` crate's
/// default is `\r\n`), 64 columns.
const PEM_LF: pem::EncodeConfig = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);

/// The certificates of a PEM text, checked and re-encoded as PEM (the sidecar's
/// `BALLAST_IDENTITY_TRUST_ANCHORS`).
pub fn parse_anchors(path: &Path, text: &[u8]) -> Result<String, IdentityError> {
    if text.iter().all(u8::is_ascii_whitespace) {
        return Err(IdentityError::Empty { path: path.to_owned() });
    }
    let mut certs = Vec::new();
    for item in <(SectionKind, Vec<u8>)>::pem_slice_iter(text) {
        match item {
            Ok((SectionKind::Certificate, der)) => certs.push(CertificateDer::from(der)),
            Ok((SectionKind::RsaPrivateKey | SectionKind::PrivateKey | SectionKind::EcPrivateKey, _)) => {
                return Err(IdentityError::PrivateKey { path: path.to_owned() });
            }
            // CRLs, CSRs and the like: not anchors, not secret; left out.
            Ok(_) => {}
            Err(e) => return Err(IdentityError::NotPem { path: path.to_owned(), problem: e.to_string() }),
        }
    }
    if certs.is_empty() {
        return Err(IdentityError::NoCertificate { path: path.to_owned() });
    }
    let mut pem = String::new();
    for (i, cert) in certs.into_iter().enumerate() {
        // The same check the sidecar makes when it builds its root store.
        let mut store = rustls::RootCertStore::empty();
        store.add(cert.clone()).map_err(|e| IdentityError::BadCertificate {
            path: path.to_owned(),
            index: i + 1,
            problem: e.to_string(),
        })?;
        pem += &pem::encode_config(&pem::Pem::new("CERTIFICATE", cert.to_vec()), PEM_LF);
    }
    Ok(pem)
}

/// What identifies one version of the file: a ConfigMap update swaps a symlink (a new
/// inode); an edit in place changes the size or the times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Fingerprint {
    fn of(m: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        Self {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }
}

/// The last read of the file.
#[derive(Debug)]
struct State {
    /// `None`: not read yet, or the file could not be stat'ed (then every review retries).
    seen: Option<Fingerprint>,
    result: Result<Arc<str>, IdentityError>,
}

/// The trust anchors file, re-read when it changes.
#[derive(Debug)]
pub struct TrustAnchors {
    path: PathBuf,
    state: Mutex<State>,
    loaded: IntGauge,
}

impl TrustAnchors {
    /// Reads the file once (logging what it found); `loaded` is set to 1 or 0 with
    /// every change.
    pub fn new(path: PathBuf, loaded: IntGauge) -> Self {
        let anchors = Self {
            state: Mutex::new(State {
                seen: None,
                result: Err(IdentityError::Missing { path: path.clone() }),
            }),
            path,
            loaded,
        };
        let _ = anchors.refresh(true);
        anchors
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The current anchors (PEM), or why there are none. Costs one `stat`; the file is
    /// read again only when it changed.
    pub fn current(&self) -> Result<Arc<str>, IdentityError> {
        self.refresh(false)
    }

    fn refresh(&self, first: bool) -> Result<Arc<str>, IdentityError> {
        let meta = std::fs::metadata(&self.path);
        let fingerprint = meta.as_ref().ok().map(Fingerprint::of);
        if !first
            && fingerprint.is_some()
            && let Ok(state) = self.state.lock()
            && state.seen == fingerprint
        {
            return state.result.clone();
        }
        let result = match meta {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(IdentityError::Missing { path: self.path.clone() })
            }
            Err(e) => Err(IdentityError::Read { path: self.path.clone(), problem: e.to_string() }),
            Ok(_) => match std::fs::read(&self.path) {
                Ok(text) => parse_anchors(&self.path, &text).map(Arc::from),
                Err(e) => Err(IdentityError::Read { path: self.path.clone(), problem: e.to_string() }),
            },
        };
        let Ok(mut state) = self.state.lock() else { return result };
        let changed = first || state.result != result;
        state.seen = fingerprint;
        state.result = result.clone();
        drop(state);
        if changed {
            self.report(&result);
        }
        result
    }

    fn report(&self, result: &Result<Arc<str>, IdentityError>) {
        match result {
            Ok(pem) => {
                self.loaded.set(1);
                let count = pem.matches("-----BEGIN CERTIFICATE-----").count();
                tracing::info!(path = %self.path.display(), certificates = count, "identity trust anchors loaded: injected proxies get workload identity (mutual TLS)");
            }
            Err(e) => {
                self.loaded.set(0);
                tracing::warn!(
                    error = %e,
                    "no identity trust anchors: pods are injected WITHOUT workload identity (no mutual TLS) until {} holds the mesh's CA certificate. \
                     Check that the control plane runs with --identity and has published the ConfigMap ballast-trust-anchors (key ca.crt) in its namespace, \
                     and that the injector mounts that ConfigMap at {}",
                    self.path.display(),
                    self.path.parent().unwrap_or(Path::new("/")).display(),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca_pem() -> String {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, "test mesh CA");
        let key = rcgen::KeyPair::generate().expect("key");
        params.self_signed(&key).expect("self-signed").pem()
    }

    fn gauge() -> IntGauge {
        IntGauge::new("test_loaded", "test").expect("gauge")
    }

    #[test]
    fn urls() {
        let ok = ["https://cp.ballast-system.svc:8086", "http://cp:8086"];
        assert!(check_control_plane_url(ok[0], true).is_ok());
        assert!(check_control_plane_url(ok[1], false).is_ok());
        let e = check_control_plane_url(ok[1], true).unwrap_err();
        assert!(e.to_string().contains("https"), "{e}");
        for bad in ["cp:8086", "ftp://cp", "https://", "not a url"] {
            assert!(check_control_plane_url(bad, false).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_certificates_are_kept_and_keys_refuse_the_file() {
        let p = Path::new("/anchors/ca.crt");
        let one = ca_pem();
        let two = ca_pem();
        let text = format!("# the mesh CA\n{one}\nsome trailing words\n{two}");
        let pem = parse_anchors(p, text.as_bytes()).expect("two certificates");
        assert_eq!(pem.matches("BEGIN CERTIFICATE").count(), 2);
        assert!(!pem.contains("words") && !pem.contains('#'));
        // Canonical already: parsing its own output gives it back.
        assert_eq!(parse_anchors(p, pem.as_bytes()).as_deref(), Ok(pem.as_str()));

        let key = rcgen::KeyPair::generate().expect("key").serialize_pem();
        let e = parse_anchors(p, format!("{one}{key}").as_bytes()).unwrap_err();
        assert!(matches!(e, IdentityError::PrivateKey { .. }), "{e}");
        assert!(matches!(parse_anchors(p, b" \n"), Err(IdentityError::Empty { .. })));
        assert!(matches!(parse_anchors(p, b"hello"), Err(IdentityError::NoCertificate { .. })));
        let garbage = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert!(matches!(
            parse_anchors(p, garbage.as_bytes()),
            Err(IdentityError::BadCertificate { index: 1, .. })
        ));
    }

    #[test]
    fn the_file_is_followed_through_symlink_swaps_and_removals() {
        let dir = tempfile::tempdir().expect("tmp");
        // The layout of a ConfigMap volume: ca.crt -> ..data/ca.crt, ..data -> ..<timestamp>.
        let version = |n: u32, text: &str| {
            let d = dir.path().join(format!("..v{n}"));
            std::fs::create_dir(&d).expect("mkdir");
            std::fs::write(d.join("ca.crt"), text).expect("write");
            let tmp = dir.path().join("..data_tmp");
            std::os::unix::fs::symlink(format!("..v{n}"), &tmp).expect("symlink");
            std::fs::rename(&tmp, dir.path().join("..data")).expect("swap");
        };
        let path = dir.path().join("ca.crt");
        let g = gauge();
        let anchors = TrustAnchors::new(path.clone(), g.clone());
        assert!(matches!(anchors.current(), Err(IdentityError::Missing { .. })));
        assert_eq!(g.get(), 0);

        let (a, b) = (ca_pem(), ca_pem());
        version(1, &a);
        std::os::unix::fs::symlink("..data/ca.crt", &path).expect("symlink");
        let first = anchors.current().expect("loaded");
        assert_eq!(g.get(), 1);
        version(2, &b);
        let second = anchors.current().expect("loaded");
        assert_ne!(first, second);
        assert_eq!(&*second, parse_anchors(&path, b.as_bytes()).expect("b").as_str());
        version(3, "");
        assert!(matches!(anchors.current(), Err(IdentityError::Empty { .. })));
        assert_eq!(g.get(), 0);
        version(4, &a);
        assert_eq!(anchors.current().expect("back"), first);
        assert_eq!(g.get(), 1);
    }
}
