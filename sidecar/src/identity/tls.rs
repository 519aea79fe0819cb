//! Mesh TLS: the rustls configurations, and telling mesh TLS from the app's own on an
//! inbound connection.
//!
//! * TLS 1.3 only, ring only. Both ends are Ballast sidecars, so there is no older peer
//!   to accommodate, and 1.3 has one round trip and no renegotiation.
//! * **Server**: requires a client certificate chaining to the trust anchors (rustls's
//!   WebPKI client verifier); the caller's identity is the SPIFFE ID in its URI SAN
//!   ([`super::peer_identity`]). ALPN says what the tunnel carries: `h2` (HTTP, the
//!   normal case), `http/1.1` (upgrades such as WebSocket, which HTTP/2 cannot carry as
//!   is) or [`ALPN_OPAQUE`] (a TCP stream).
//! * **Client**: verifies the server with rustls's standard WebPKI check against the
//!   identity's DNS name ([`ballast_api::identity::Identity::dns_name`], also in every
//!   mesh certificate), so a server holding another identity's certificate, or one from
//!   another CA, fails the handshake. Resumption: rustls's default client session cache
//!   (TLS 1.3 tickets) and server session storage, so reconnects to a peer skip the
//!   certificate exchange.
//! * **Inbound**: a TLS ClientHello whose SNI is this sidecar's identity name is mesh
//!   TLS, terminated here; any other TLS (the app's own HTTPS) passes through untouched,
//!   as linkerd2-proxy tells them apart.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use prometheus::IntCounter;
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::ServerName;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::TcpStream;

use super::{CertSlot, IdentityError};
use crate::detect::PrefixedIo;
use crate::metrics::Metrics;

/// ALPN of a TCP stream carried in mesh TLS.
pub const ALPN_OPAQUE: &[u8] = b"ballast.io/opaque";
pub const ALPN_H2: &[u8] = b"h2";
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// The largest ClientHello read to find its SNI (a TLS record is at most 16 KiB).
const MAX_CLIENT_HELLO: usize = 16 * 1024 + 5;

/// Every rustls configuration the sidecar uses, sharing one certificate slot.
pub struct Configs {
    /// Inbound mesh TLS.
    pub server: Arc<ServerConfig>,
    /// Outbound to a meshed endpoint, one per ALPN.
    pub client_h2: Arc<ClientConfig>,
    pub client_http1: Arc<ClientConfig>,
    pub client_opaque: Arc<ClientConfig>,
    /// To the control plane (verified by the host name in its URL; the certificate is
    /// presented once there is one).
    pub control_plane: Arc<ClientConfig>,
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Configs {
    pub fn new(roots: Arc<RootCertStore>, slot: Arc<CertSlot>) -> Result<Self, IdentityError> {
        let err = |e: rustls::Error| IdentityError::Tls(e.to_string());
        let provider = provider();
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| IdentityError::Tls(e.to_string()))?;
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(err)?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(Resolver(slot.clone())));
        server.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec(), ALPN_OPAQUE.to_vec()];
        let client = |alpn: &[u8]| -> Result<Arc<ClientConfig>, IdentityError> {
            let mut c = ClientConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .map_err(err)?
                .with_root_certificates(roots.clone())
                .with_client_cert_resolver(Arc::new(Resolver(slot.clone())));
            c.alpn_protocols = vec![alpn.to_vec()];
            Ok(Arc::new(c))
        };
        // No resumption to the control plane: the first connection (Certify) has no
        // certificate to present, and a TLS 1.3 resumption of it would carry that
        // anonymity into the stream, which must present the new certificate.
        let mut control_plane = (*client(ALPN_H2)?).clone();
        control_plane.resumption = rustls::client::Resumption::disabled();
        Ok(Self {
            server: Arc::new(server),
            client_h2: client(ALPN_H2)?,
            client_http1: client(ALPN_HTTP1)?,
            client_opaque: client(ALPN_OPAQUE)?,
            control_plane: Arc::new(control_plane),
        })
    }
}

/// How to open mesh TLS to one endpoint: the configuration (its ALPN says what the tunnel
/// carries), the name the server must prove, and the outbound handshake counters. Shared
/// by the HTTP pool's connector and opaque TCP, so both verify and count alike.
#[derive(Clone)]
pub struct Dial {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
    ok: IntCounter,
    failed: IntCounter,
}

impl Dial {
    /// For the endpoint whose identity is `peer` (a SPIFFE ID). Err: `peer` is not one
    /// (validated on arrival, so not expected).
    pub fn new(config: Arc<ClientConfig>, peer: &str, metrics: &Metrics) -> Result<Self, String> {
        let id: ballast_api::identity::Identity = peer.parse().map_err(|e| format!("{e}"))?;
        let name = ServerName::try_from(id.dns_name()).map_err(|e| format!("{peer}: {e}"))?;
        let counter = |result| metrics.mesh_tls_handshakes.with_label_values(&["outbound", result]);
        Ok(Self { config, name, ok: counter("ok"), failed: counter("failed") })
    }

    /// The name the server must prove (its identity's DNS form).
    pub fn name(&self) -> &ServerName<'static> {
        &self.name
    }

    /// The handshake on `tcp`, within `timeout` (a peer that accepts and then says nothing
    /// must not hold the caller).
    pub async fn connect(
        &self,
        tcp: TcpStream,
        timeout: Duration,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let handshake = tokio_rustls::TlsConnector::from(self.config.clone()).connect(self.name.clone(), tcp);
        let result = tokio::time::timeout(timeout, handshake).await.unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("mesh TLS handshake timed out after {timeout:?}"),
            ))
        });
        if result.is_ok() { &self.ok } else { &self.failed }.inc();
        result
    }
}

/// Hands rustls the current certificate at each handshake, on both sides.
struct Resolver(Arc<CertSlot>);

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.load().map(|c| c.key.clone())
    }
}

impl ResolvesClientCert for Resolver {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.0.load().map(|c| c.key.clone())
    }
    fn has_certs(&self) -> bool {
        self.0.load().is_some()
    }
}

/// Reads on from a connection detected as TLS until its ClientHello is whole, and
/// returns the SNI it names (if any) with every byte read put back in front. `None` SNI
/// also for a hello that does not parse: that connection is not mesh TLS, and passes
/// through as the app's.
pub async fn read_sni<T: AsyncRead + Unpin>(
    io: PrefixedIo<T>,
    timeout: Duration,
) -> std::io::Result<(Option<String>, PrefixedIo<T>)> {
    let (prefix, mut inner) = io.into_parts();
    let mut buf = bytes::BytesMut::from(&prefix[..]);
    let deadline = tokio::time::Instant::now() + timeout;
    let sni = loop {
        match parse_sni(&buf) {
            Parsed::Sni(sni) => break sni,
            Parsed::NotHello => break None,
            Parsed::Partial if buf.len() >= MAX_CLIENT_HELLO => break None,
            Parsed::Partial => {}
        }
        match tokio::time::timeout_at(deadline, inner.read_buf(&mut buf)).await {
            Ok(Ok(0)) | Err(_) => break None,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    };
    Ok((sni, PrefixedIo::new(buf.freeze(), inner)))
}

enum Parsed {
    Sni(Option<String>),
    Partial,
    NotHello,
}

/// rustls's own ClientHello parser on a copy of the bytes.
fn parse_sni(buf: &[u8]) -> Parsed {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut rd = buf;
    while !rd.is_empty() {
        match acceptor.read_tls(&mut rd) {
            Ok(0) => break,
            Ok(_) => {}
            Err(_) => return Parsed::NotHello,
        }
    }
    match acceptor.accept() {
        Ok(Some(accepted)) => Parsed::Sni(accepted.client_hello().server_name().map(str::to_owned)),
        Ok(None) => Parsed::Partial,
        Err(_) => Parsed::NotHello,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Current;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    /// A CA, and a slot holding a certificate it signed for `sa`.
    fn ca_and_slot(sa: &str) -> (rcgen::Certificate, Arc<RootCertStore>, Arc<CertSlot>) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let id: ballast_api::identity::Identity =
            format!("spiffe://cluster.local/ns/shop/sa/{sa}").parse().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut leaf = rcgen::CertificateParams::new(vec![id.dns_name()]).unwrap();
        leaf.subject_alt_names.push(rcgen::SanType::URI(id.to_string().try_into().unwrap()));
        let cert = leaf.signed_by(&key, &issuer).unwrap();
        let der = PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let signer = rustls::crypto::ring::sign::any_ecdsa_type(&der).unwrap();
        let certified = CertifiedKey::new(vec![cert.der().clone(), ca_cert.der().clone()], signer);
        let slot = Arc::new(CertSlot::default());
        slot.current.store(Some(Arc::new(Current {
            key: Arc::new(certified),
            dns_name: id.dns_name(),
            identity: id,
            not_after: std::time::SystemTime::now() + Duration::from_secs(3600),
        })));
        let mut roots = RootCertStore::empty();
        roots.add(ca_cert.der().clone()).unwrap();
        (ca_cert, Arc::new(roots), slot)
    }

    /// Runs a handshake in memory; the server's view of the client's certificates.
    fn handshake(
        client: Arc<ClientConfig>,
        server: Arc<ServerConfig>,
        name: &str,
    ) -> Result<Option<Vec<CertificateDer<'static>>>, rustls::Error> {
        let mut c = rustls::ClientConnection::new(client, name.to_owned().try_into().unwrap())?;
        let mut s = rustls::ServerConnection::new(server)?;
        for _ in 0..10 {
            let mut buf = Vec::new();
            c.write_tls(&mut buf).unwrap();
            s.read_tls(&mut buf.as_slice()).unwrap();
            s.process_new_packets()?;
            let mut buf = Vec::new();
            s.write_tls(&mut buf).unwrap();
            c.read_tls(&mut buf.as_slice()).unwrap();
            c.process_new_packets()?;
            if !c.is_handshaking() && !s.is_handshaking() {
                return Ok(s.peer_certificates().map(|p| p.to_vec()));
            }
        }
        panic!("the handshake did not finish");
    }

    #[test]
    fn two_sidecars_authenticate_each_other_and_others_are_refused() {
        let (_, roots, web) = ca_and_slot("web");
        let payments = {
            // The same CA: a second leaf in another slot.
            let (_, _, slot) = ca_and_slot("payments");
            slot
        };
        let client = Configs::new(roots.clone(), web.clone()).unwrap();
        let server = Configs::new(roots.clone(), web).unwrap();
        let name = "web.shop.serviceaccount.identity.ballast.cluster.local";
        let seen = handshake(client.client_h2.clone(), server.server.clone(), name).unwrap().unwrap();
        assert_eq!(
            crate::identity::peer_identity(&seen[0]).unwrap().to_string(),
            "spiffe://cluster.local/ns/shop/sa/web"
        );
        // The control plane configuration presents the certificate too.
        assert!(handshake(client.control_plane.clone(), server.server.clone(), name).unwrap().is_some());
        // The server is not the identity the client expects: refused by the client.
        let wrong = "payments.shop.serviceaccount.identity.ballast.cluster.local";
        assert!(handshake(client.client_h2.clone(), server.server.clone(), wrong).is_err());
        // A certificate from another CA: refused by the server.
        let stranger = Configs::new(roots, payments).unwrap();
        assert!(handshake(stranger.client_h2.clone(), server.server.clone(), name).is_err());
    }

    #[test]
    fn finds_the_sni_of_a_real_client_hello_and_waits_for_the_rest() {
        let mut roots = RootCertStore::empty();
        let key = rcgen::KeyPair::generate().unwrap();
        let ca =
            rcgen::CertificateParams::new(vec!["x.example".to_owned()]).unwrap().self_signed(&key).unwrap();
        roots.add(ca.der().clone()).unwrap();
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = "web.shop.serviceaccount.identity.ballast.cluster.local".try_into().unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut hello = Vec::new();
        conn.write_tls(&mut hello).unwrap();
        assert!(matches!(parse_sni(&hello[..hello.len() / 2]), Parsed::Partial));
        match parse_sni(&hello) {
            Parsed::Sni(Some(sni)) => {
                assert_eq!(sni, "web.shop.serviceaccount.identity.ballast.cluster.local")
            }
            _ => panic!("no SNI found"),
        }
        assert!(matches!(parse_sni(b"\x16\x03\x01\x00\x05hello"), Parsed::NotHello));
    }
}
