//! The mesh's certificate authority: one root key that signs every workload certificate
//! and the control plane's own serving certificate.
//!
//! * **The CSR proves possession, nothing else.** Its signature is verified (a CSR
//!   whose signature does not check out against its own public key is refused), then
//!   only its public key is used. Every name, extension and attribute it asks for is
//!   ignored: the leaf gets exactly the identity its token proved, so a workload cannot
//!   talk the CA into naming another service account or `evil.example`. For the same
//!   reason the CSR is read with x509-parser rather than turned into rcgen parameters:
//!   an extension rcgen cannot represent is then ignored like any other, not an error.
//! * **Leaf contents.** URI SAN = the SPIFFE ID, DNS SAN = its DNS form
//!   ([`Identity::dns_name`]: rustls checks servers by DNS name), EKU serverAuth and
//!   clientAuth (a sidecar is both), key usage digitalSignature, not a CA, a random
//!   128-bit serial. Valid from a minute ago (clocks across nodes disagree a little)
//!   for the configured lifetime, but never past the CA's own expiry: a chain that
//!   outlives its root would fail anyway, later and more confusingly.
//! * **Generated roots** are ECDSA P-256 (what every TLS stack verifies quickly), valid
//!   10 years, path length 0: they sign leaves, never intermediates.

use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ballast_api::identity::Identity;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber, SubjectPublicKeyInfo,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;
use x509_parser::prelude::FromDer;

/// How long a generated root is valid.
pub const GENERATED_CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How far back a certificate's validity starts, for clocks that run a little behind.
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// What is wrong with a CA. The messages do not name flags: the CA may come from files,
/// a Secret or the store, and [`crate::identity::source`] says which and how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("the CA certificate is not a PEM certificate: {0}")]
    Certificate(String),
    #[error(
        "the CA key is not a PEM private key rcgen can sign with ({0}); it must be an ECDSA P-256/P-384, Ed25519 or RSA key in PKCS#8 PEM (openssl pkcs8 -topk8 -nocrypt converts one)"
    )]
    Key(String),
    #[error("the CA key does not belong to the CA certificate; pass the key that signed it")]
    KeyMismatch,
    #[error(
        "the CA certificate is not a CA (no basicConstraints CA:TRUE); use a root or intermediate CA certificate"
    )]
    NotCa,
    #[error("the CA certificate expired at {0} (unix seconds); rotate the CA")]
    Expired(i64),
    #[error("cannot generate a key: {0}")]
    Generate(String),
    #[error("cannot sign: {0}")]
    Sign(String),
}

/// What a CSR can be wrong with: each is the caller's mistake (gRPC InvalidArgument).
#[derive(Debug, thiserror::Error)]
pub enum CsrError {
    #[error("csr: empty; send a PKCS#10 certificate signing request in DER")]
    Empty,
    #[error("csr: not a PKCS#10 certificate signing request in DER ({0})")]
    Malformed(String),
    #[error(
        "csr: its signature does not verify with the public key it carries; sign the CSR with the key it names"
    )]
    Signature,
    #[error("csr: unsupported public key ({0}); use ECDSA P-256 or P-384, Ed25519 or RSA")]
    PublicKey(String),
}

#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("{0}")]
    Csr(#[from] CsrError),
    #[error("{0}")]
    Ca(#[from] CaError),
}

/// A certificate this CA issued.
#[derive(Debug, Clone)]
pub struct Issued {
    /// Leaf first, then the CA certificate.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's expiry, unix seconds.
    pub not_after: i64,
}

/// The control plane's serving certificate and its key.
pub struct Serving {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivatePkcs8KeyDer<'static>,
    pub chain_pem: String,
    pub key_pem: String,
}

impl Serving {
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }
}

/// The CA: its certificate and the key that signs with it.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    key_pem: String,
    /// The CA certificate's expiry, unix seconds.
    not_after: i64,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority").field("not_after", &self.not_after).finish_non_exhaustive()
    }
}

fn unix(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

fn datetime(unix_secs: i64) -> Result<OffsetDateTime, CaError> {
    OffsetDateTime::from_unix_timestamp(unix_secs)
        .map_err(|e| CaError::Sign(format!("date out of range: {e}")))
}

fn random_serial() -> Result<SerialNumber, CaError> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| CaError::Generate("the system's random source failed".into()))?;
    // A positive INTEGER that keeps its 16 bytes.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

/// PEM of a DER certificate, as rcgen writes its own (`rcgen::Certificate::pem`, which
/// only certificates it signed have).
pub fn certificate_pem(der: &[u8]) -> String {
    let lf = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    pem::encode_config(&pem::Pem::new("CERTIFICATE", der), lf)
}

impl Authority {
    /// A new self-signed root, for `CaSource::Generated` and `CaSource::Secret`.
    pub fn generate(trust_domain: &str) -> Result<Self, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| CaError::Generate(e.to_string()))?;
        let now = unix(SystemTime::now());
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Ballast");
        dn.push(DnType::CommonName, format!("Ballast mesh CA {trust_domain}"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        params.serial_number = Some(random_serial()?);
        params.not_before = datetime(now - CLOCK_SKEW.as_secs() as i64)?;
        params.not_after = datetime(now + GENERATED_CA_VALIDITY.as_secs() as i64)?;
        let cert = params.self_signed(&key).map_err(|e| CaError::Sign(e.to_string()))?;
        let cert_pem = cert.pem();
        let key_pem = key.serialize_pem();
        Self::from_pem(&cert_pem, &key_pem)
    }

    /// The CA from its certificate and key (PEM), checked: a CA certificate, not
    /// expired, and the key its own.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        use rustls::pki_types::pem::PemObject;
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| CaError::Certificate(e.to_string()))?;
        let key = KeyPair::from_pem(key_pem).map_err(|e| CaError::Key(e.to_string()))?;
        let (_, x509) = x509_parser::parse_x509_certificate(&cert_der)
            .map_err(|e| CaError::Certificate(e.to_string()))?;
        if x509.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(CaError::KeyMismatch);
        }
        match x509.basic_constraints() {
            Ok(Some(bc)) if bc.value.ca => {}
            _ => return Err(CaError::NotCa),
        }
        let not_after = x509.validity().not_after.timestamp();
        if not_after <= unix(SystemTime::now()) {
            return Err(CaError::Expired(not_after));
        }
        let issuer =
            Issuer::from_ca_cert_der(&cert_der, key).map_err(|e| CaError::Certificate(e.to_string()))?;
        Ok(Self {
            issuer,
            cert_pem: certificate_pem(&cert_der),
            cert_der,
            key_pem: key_pem.to_owned(),
            not_after,
        })
    }

    /// The CA certificate, DER: the mesh's trust anchor.
    pub fn certificate_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The CA certificate, PEM.
    pub fn certificate_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA key, PEM (to store a generated CA).
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// The CA certificate's expiry, unix seconds.
    pub fn not_after(&self) -> i64 {
        self.not_after
    }

    /// Validity from a minute ago for `lifetime`, cut at the CA's expiry.
    fn validity(&self, params: &mut CertificateParams, lifetime: Duration) -> Result<i64, CaError> {
        let now = unix(SystemTime::now());
        if self.not_after <= now {
            return Err(CaError::Expired(self.not_after));
        }
        let not_after =
            now.saturating_add(i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX)).min(self.not_after);
        params.not_before = datetime(now - CLOCK_SKEW.as_secs() as i64)?;
        params.not_after = datetime(not_after)?;
        params.serial_number = Some(random_serial()?);
        params.use_authority_key_identifier_extension = true;
        Ok(not_after)
    }

    /// A workload certificate for `identity`, on the public key of `csr` (DER), valid for
    /// `lifetime`. Nothing else of the CSR is used (see the module docs).
    pub fn issue(&self, csr: &[u8], identity: &Identity, lifetime: Duration) -> Result<Issued, IssueError> {
        let public_key = verified_public_key(csr)?;
        let uri = rcgen::string::Ia5String::try_from(identity.to_string())
            .map_err(|e| CaError::Sign(format!("identity {identity}: {e}")))?;
        let dns = rcgen::string::Ia5String::try_from(identity.dns_name())
            .map_err(|e| CaError::Sign(format!("identity {identity}: {e}")))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(uri), SanType::DnsName(dns)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let not_after = self.validity(&mut params, lifetime)?;
        let leaf = params.signed_by(&public_key, &self.issuer).map_err(|e| CaError::Sign(e.to_string()))?;
        Ok(Issued { chain: vec![leaf.der().clone(), self.cert_der.clone()], not_after })
    }

    /// The control plane's own certificate: a fresh key, serverAuth only (it can never
    /// pass as a workload's client certificate), for `names` and `ips`.
    pub fn serving(&self, names: &[String], ips: &[IpAddr], lifetime: Duration) -> Result<Serving, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| CaError::Generate(e.to_string()))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "ballast-control-plane");
        params.distinguished_name = dn;
        let mut sans = Vec::new();
        for n in names {
            let n = rcgen::string::Ia5String::try_from(n.as_str())
                .map_err(|e| CaError::Sign(format!("serving name {n:?}: {e}")))?;
            if !sans.contains(&SanType::DnsName(n.clone())) {
                sans.push(SanType::DnsName(n));
            }
        }
        for ip in ips {
            if !sans.contains(&SanType::IpAddress(*ip)) {
                sans.push(SanType::IpAddress(*ip));
            }
        }
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.validity(&mut params, lifetime)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(|e| CaError::Sign(e.to_string()))?;
        let chain = vec![cert.der().clone(), self.cert_der.clone()];
        let chain_pem = cert.pem() + &self.cert_pem;
        Ok(Serving {
            chain,
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
            chain_pem,
            key_pem: key.serialize_pem(),
        })
    }
}

/// The public key of a CSR whose signature verifies with it.
fn verified_public_key(csr: &[u8]) -> Result<SubjectPublicKeyInfo, CsrError> {
    use x509_parser::certification_request::X509CertificationRequest;
    if csr.is_empty() {
        return Err(CsrError::Empty);
    }
    let (rest, request) =
        X509CertificationRequest::from_der(csr).map_err(|e| CsrError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CsrError::Malformed(format!("{} bytes after the request", rest.len())));
    }
    request.verify_signature().map_err(|_| CsrError::Signature)?;
    SubjectPublicKeyInfo::from_der(request.certification_request_info.subject_pki.raw)
        .map_err(|e| CsrError::PublicKey(e.to_string()))
}

/// Now, in unix seconds.
pub fn now_unix() -> i64 {
    unix(SystemTime::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr(key: &KeyPair, names: &[&str]) -> Vec<u8> {
        let mut p = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        p.subject_alt_names
            .push(SanType::URI("spiffe://cluster.local/ns/kube-system/sa/admin".try_into().unwrap()));
        p.serialize_request(key).unwrap().der().to_vec()
    }

    #[test]
    fn leaf_carries_only_the_identity() {
        let ca = Authority::generate("cluster.local").unwrap();
        let key = KeyPair::generate().unwrap();
        let id = Identity::new("cluster.local", "shop", "payments").unwrap();
        let issued = ca.issue(&csr(&key, &["evil.example"]), &id, Duration::from_secs(3600)).unwrap();
        let (_, leaf) = x509_parser::parse_x509_certificate(&issued.chain[0]).unwrap();
        let names: Vec<String> = leaf
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(names.iter().any(|n| n.contains("spiffe://cluster.local/ns/shop/sa/payments")), "{names:?}");
        assert!(!names.iter().any(|n| n.contains("evil") || n.contains("admin")), "{names:?}");
        assert_eq!(ballast_api::identity::from_certificate(&issued.chain[0]), Some(id));
        assert_eq!(leaf.public_key().raw, key.subject_public_key_info().as_slice());
        let (_, root) = x509_parser::parse_x509_certificate(&issued.chain[1]).unwrap();
        assert!(leaf.verify_signature(Some(root.public_key())).is_ok());
    }

    #[test]
    fn lifetime_stops_at_the_ca() {
        let ca = Authority::generate("cluster.local").unwrap();
        let key = KeyPair::generate().unwrap();
        let id = Identity::new("cluster.local", "a", "b").unwrap();
        let issued = ca.issue(&csr(&key, &[]), &id, Duration::from_secs(u64::MAX / 4)).unwrap();
        assert_eq!(issued.not_after, ca.not_after());
    }

    #[test]
    fn a_bad_csr_is_named() {
        let ca = Authority::generate("cluster.local").unwrap();
        let id = Identity::new("cluster.local", "a", "b").unwrap();
        assert!(matches!(ca.issue(&[], &id, Duration::from_secs(60)), Err(IssueError::Csr(CsrError::Empty))));
        assert!(matches!(
            ca.issue(b"nonsense", &id, Duration::from_secs(60)),
            Err(IssueError::Csr(CsrError::Malformed(_)))
        ));
        let mut der = csr(&KeyPair::generate().unwrap(), &[]);
        let last = der.len() - 2;
        der[last] ^= 0x01;
        assert!(matches!(
            ca.issue(&der, &id, Duration::from_secs(60)),
            Err(IssueError::Csr(CsrError::Signature))
        ));
    }

    #[test]
    fn pem_round_trips() {
        let ca = Authority::generate("cluster.local").unwrap();
        let again = Authority::from_pem(ca.certificate_pem(), ca.key_pem()).unwrap();
        assert_eq!(again.certificate_der(), ca.certificate_der());
        let other = Authority::generate("cluster.local").unwrap();
        assert!(matches!(
            Authority::from_pem(ca.certificate_pem(), other.key_pem()),
            Err(CaError::KeyMismatch)
        ));
    }
}
