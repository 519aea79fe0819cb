//! TLS on the control plane's own ports, and the identity a sidecar's stream carries.
//!
//! * **One serving certificate** for the gRPC port and the admin port, signed by the
//!   mesh CA at start with a fresh key (never written anywhere), so sidecars and
//!   `ballastctl` verify the control plane with the one trust anchor they already have.
//!   Its names are those a client may dial: `localhost`, the Service's short and full
//!   names in the control plane's namespace, loopback addresses, the bind addresses
//!   when they are specific, and `--tls-name`s.
//! * **Client certificates are optional** on the gRPC port: a new sidecar has none
//!   until its first Certify call, made on this same port. Once it has one, it presents
//!   it on the push stream, and that stream's identity is the certificate's SPIFFE ID,
//!   verified by rustls against the CA during the handshake. A stream without one
//!   registers no identity (its endpoint is reached in plain text). The Hello's claims
//!   are never used for identity: anyone can write a Hello.
//! * **Never for the admin port**: `ballastctl` authenticates with a bearer token there
//!   (see [`crate::admin`]); operators do not hold workload certificates.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use tonic::transport::{Certificate, Identity as TlsIdentity, ServerTlsConfig};

use ballast_api::identity::{Identity, from_certificate};

use crate::identity::ca::Serving;

/// How long a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The names and addresses the serving certificate carries.
pub fn serving_names(extra: &[String], namespace: &str, binds: &[SocketAddr]) -> (Vec<String>, Vec<IpAddr>) {
    let mut names = vec![
        "localhost".to_owned(),
        "ballast-control-plane".to_owned(),
        format!("ballast-control-plane.{namespace}"),
        format!("ballast-control-plane.{namespace}.svc"),
        format!("ballast-control-plane.{namespace}.svc.cluster.local"),
    ];
    for n in extra {
        if !names.contains(n) {
            names.push(n.clone());
        }
    }
    let mut ips: Vec<IpAddr> = vec![Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()];
    for b in binds {
        if !b.ip().is_unspecified() && !ips.contains(&b.ip()) {
            ips.push(b.ip());
        }
    }
    (names, ips)
}

/// The gRPC port's TLS: the serving certificate; client certificates optional, verified
/// against the CA when presented.
pub fn grpc_config(serving: &Serving, ca_pem: &str) -> ServerTlsConfig {
    ServerTlsConfig::new()
        .identity(TlsIdentity::from_pem(&serving.chain_pem, &serving.key_pem))
        .client_ca_root(Certificate::from_pem(ca_pem))
        .client_auth_optional(true)
        .timeout(HANDSHAKE_TIMEOUT)
}

/// The admin port's TLS (HTTP/1.1, no client certificates).
pub fn admin_acceptor(serving: &Serving) -> Result<tokio_rustls::TlsAcceptor, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(serving.chain.clone(), serving.private_key())?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// The verified SPIFFE ID of a stream's client certificate, in `trust_domain`; `None`
/// without a certificate (or, defensively, when its leaf carries no single SPIFFE ID of
/// this trust domain: the CA never signs such a client certificate).
pub fn peer_identity(certs: Option<&[CertificateDer<'static>]>, trust_domain: &str) -> Option<Identity> {
    let leaf = certs?.first()?;
    from_certificate(leaf).filter(|id| id.trust_domain == trust_domain)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cover_the_service_and_specific_binds() {
        let binds = ["0.0.0.0:8086".parse().unwrap(), "10.1.2.3:9990".parse().unwrap()];
        let (names, ips) = serving_names(&["cp.example".into()], "ballast-system", &binds);
        assert!(names.contains(&"ballast-control-plane.ballast-system.svc.cluster.local".to_owned()));
        assert!(names.contains(&"cp.example".to_owned()));
        assert_eq!(ips.len(), 3, "{ips:?}");
        assert!(ips.contains(&"10.1.2.3".parse().unwrap()));
    }
}
