//! Workload identity: SPIFFE IDs, their DNS form, and the `inbound.allow` patterns.
//!
//! Every meshed workload is `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`,
//! as in Istio and Linkerd: the identity is the Kubernetes service account, not the pod,
//! so every replica of a deployment shares one and a policy can name it before the pods
//! exist. The control plane's CA writes it in the certificate's URI SAN.
//!
//! The certificate also carries the identity's DNS form
//! (`<sa>.<ns>.serviceaccount.identity.ballast.<trust-domain>`, see
//! [`Identity::dns_name`]), for two reasons: a client sidecar verifies the server with
//! rustls's standard WebPKI name check (no hand-written certificate verification), and
//! the server sidecar tells mesh TLS from the app's own TLS by the SNI the client sends,
//! which must be a DNS name. The URI SAN is the identity; the DNS name is its
//! transport-friendly spelling, derived from it one to one.

use std::fmt;
use std::str::FromStr;

/// The trust domain when none is configured: Kubernetes' default cluster domain, as
/// Istio and Linkerd default to it.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// The audience a projected service-account token must carry for the control plane to
/// accept it (the injector mounts one with this audience), so a token minted for another
/// system cannot be replayed here.
pub const TOKEN_AUDIENCE: &str = "ballast";

/// Where the injector mounts the projected service-account token in the proxy container.
pub const TOKEN_PATH: &str = "/var/run/secrets/ballast.io/serviceaccount/token";

/// A workload identity: the SPIFFE ID of a Kubernetes service account.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "{0:?} is not a SPIFFE ID of a workload: expected spiffe://TRUST-DOMAIN/ns/NAMESPACE/sa/SERVICE-ACCOUNT"
    )]
    NotSpiffe(String),
    #[error("{0:?} is not a trust domain (lowercase letters, digits, '-' and '.', like cluster.local)")]
    TrustDomain(String),
    #[error("{0:?} is not a namespace (a DNS label: lowercase letters, digits and '-')")]
    Namespace(String),
    #[error("{0:?} is not a service account name (a DNS subdomain: lowercase letters, digits, '-' and '.')")]
    ServiceAccount(String),
    #[error(
        "{0:?} is not an identity pattern: expected a SPIFFE ID, NAMESPACE/SERVICE-ACCOUNT (either may be *), or *"
    )]
    Pattern(String),
}

impl Identity {
    /// Checks each part; the trust domain, namespace and service account name must be
    /// what Kubernetes allows (so the DNS form is a valid DNS name).
    pub fn new(
        trust_domain: impl Into<String>,
        namespace: impl Into<String>,
        service_account: impl Into<String>,
    ) -> Result<Self, IdentityError> {
        let (trust_domain, namespace, service_account) =
            (trust_domain.into(), namespace.into(), service_account.into());
        if !dns_subdomain(&trust_domain) {
            return Err(IdentityError::TrustDomain(trust_domain));
        }
        if !crate::policy::dns_label(&namespace) {
            return Err(IdentityError::Namespace(namespace));
        }
        if !dns_subdomain(&service_account) {
            return Err(IdentityError::ServiceAccount(service_account));
        }
        Ok(Self { trust_domain, namespace, service_account })
    }

    /// `<sa>.<ns>.serviceaccount.identity.ballast.<trust-domain>`: the DNS SAN of the
    /// identity's certificates and the SNI a client sends to reach it. A namespace has no
    /// dots, so the form reads back unambiguously even when the service account has some.
    pub fn dns_name(&self) -> String {
        format!(
            "{}.{}.serviceaccount.identity.ballast.{}",
            self.service_account, self.namespace, self.trust_domain
        )
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}/ns/{}/sa/{}", self.trust_domain, self.namespace, self.service_account)
    }
}

impl FromStr for Identity {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, IdentityError> {
        let not = || IdentityError::NotSpiffe(s.to_owned());
        let rest = s.strip_prefix("spiffe://").ok_or_else(not)?;
        let mut parts = rest.split('/');
        let (Some(td), Some("ns"), Some(ns), Some("sa"), Some(sa), None) =
            (parts.next(), parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(not());
        };
        Identity::new(td, ns, sa)
    }
}

/// One entry of `inbound.allow`: who may call.
///
/// * `spiffe://td/ns/NS/sa/SA`: exactly that identity;
/// * `NS/SA`: that service account in the local trust domain; either part may be `*`
///   (`shop/*`: every workload of namespace `shop`);
/// * `*`: any authenticated workload of the local trust domain.
///
/// Patterns never match a caller without an identity (plain text, or outside the mesh):
/// an allow list implies mutual TLS for the callers it admits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityPattern {
    Exact(Identity),
    Local { namespace: Option<String>, service_account: Option<String> },
}

impl FromStr for IdentityPattern {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, IdentityError> {
        if s.starts_with("spiffe://") {
            return s.parse().map(IdentityPattern::Exact);
        }
        let bad = || IdentityError::Pattern(s.to_owned());
        let (ns, sa) = match s.split_once('/') {
            None if s == "*" => ("*", "*"),
            None => return Err(bad()),
            Some(pair) => pair,
        };
        let namespace = match ns {
            "*" => None,
            ns if crate::policy::dns_label(ns) => Some(ns.to_owned()),
            _ => return Err(bad()),
        };
        let service_account = match sa {
            "*" => None,
            sa if dns_subdomain(sa) => Some(sa.to_owned()),
            _ => return Err(bad()),
        };
        Ok(IdentityPattern::Local { namespace, service_account })
    }
}

impl IdentityPattern {
    /// Whether `peer` matches, `trust_domain` being the local one.
    pub fn matches(&self, peer: &Identity, trust_domain: &str) -> bool {
        match self {
            IdentityPattern::Exact(id) => id == peer,
            IdentityPattern::Local { namespace, service_account } => {
                peer.trust_domain == trust_domain
                    && namespace.as_ref().is_none_or(|ns| *ns == peer.namespace)
                    && service_account.as_ref().is_none_or(|sa| *sa == peer.service_account)
            }
        }
    }
}

/// The workload identity a certificate (DER) carries: its one `spiffe://` URI SAN. None
/// when it has none, more than one (which one would be meant?), or one that is not a
/// workload's SPIFFE ID. The chain must have been verified already: this only reads.
#[cfg(feature = "x509")]
pub fn from_certificate(der: &[u8]) -> Option<Identity> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) if u.starts_with("spiffe://") => Some(*u),
        _ => None,
    });
    let uri = uris.next()?;
    if uris.next().is_some() {
        return None;
    }
    uri.parse().ok()
}

/// A DNS-1123 subdomain, as Kubernetes requires of service account names.
pub fn dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(crate::policy::dns_label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_round_trip_and_bad_ones_are_named() {
        let id: Identity = "spiffe://cluster.local/ns/shop/sa/payments".parse().unwrap();
        assert_eq!(id.namespace, "shop");
        assert_eq!(id.service_account, "payments");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/payments");
        assert_eq!(id.dns_name(), "payments.shop.serviceaccount.identity.ballast.cluster.local");
        for bad in [
            "spiffe://cluster.local/ns/shop",
            "spiffe://cluster.local/ns/shop/sa/payments/x",
            "https://cluster.local/ns/shop/sa/payments",
            "spiffe://cluster.local/sa/x/ns/y",
            "spiffe://Cluster.local/ns/shop/sa/payments",
            "spiffe://cluster.local/ns/Shop/sa/payments",
            "spiffe://cluster.local/ns/shop/sa/",
        ] {
            assert!(bad.parse::<Identity>().is_err(), "{bad} should not parse");
        }
    }

    #[test]
    fn patterns_match_as_documented() {
        let td = "cluster.local";
        let payments = Identity::new(td, "shop", "payments").unwrap();
        let other_td = Identity::new("other.mesh", "shop", "payments").unwrap();
        let web = Identity::new(td, "web", "frontend").unwrap();
        let p = |s: &str| s.parse::<IdentityPattern>().unwrap();
        assert!(p("shop/payments").matches(&payments, td));
        assert!(!p("shop/payments").matches(&other_td, td), "a local pattern is the local trust domain");
        assert!(p("spiffe://other.mesh/ns/shop/sa/payments").matches(&other_td, td));
        assert!(p("shop/*").matches(&payments, td));
        assert!(!p("shop/*").matches(&web, td));
        assert!(p("*/frontend").matches(&web, td));
        assert!(p("*").matches(&web, td));
        assert!(!p("*").matches(&other_td, td));
        for bad in ["shop", "shop/", "/payments", "Shop/x", "shop/payments/x", "spiffe://x"] {
            assert!(bad.parse::<IdentityPattern>().is_err(), "{bad} should not parse");
        }
    }
}
