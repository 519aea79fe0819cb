//! The `Service` resource: a destination and how to find its endpoints (DESIGN §4).

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::{FieldError, ObjectMeta};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Service {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: ServiceSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<ServicePort>,
    /// Virtual IPs (ClusterIP) matched against a connection's original destination.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<IpAddr>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<Endpoint>,
    /// Endpoints resolved from this DNS name instead of listed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    pub port: u16,
    /// Omitted: the sidecar detects the protocol of each connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Http,
    Http2,
    Grpc,
    Tcp,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Endpoint {
    /// `ip:port`, or a bare `ip` that takes the port the caller asked for.
    pub address: String,
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub weight: u32,
    /// The endpoint's workload identity (SPIFFE ID) when a meshed sidecar fronts it:
    /// callers then use mutual TLS and require exactly this identity. The control plane
    /// sets it from the certificate the endpoint's sidecar presented; absent: plain text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
}

fn one() -> u32 {
    1
}
fn is_one(w: &u32) -> bool {
    *w == 1
}

/// Where an endpoint listens: a full socket address, or an IP that takes the port the
/// caller connected to (how a Kubernetes Service maps port to targetPort by default).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EndpointAddr {
    Socket(SocketAddr),
    Ip(IpAddr),
}

impl EndpointAddr {
    pub fn parse(s: &str) -> Option<Self> {
        if let Ok(sa) = s.parse::<SocketAddr>() {
            return Some(EndpointAddr::Socket(sa));
        }
        s.trim_matches(|c| c == '[' || c == ']').parse::<IpAddr>().ok().map(EndpointAddr::Ip)
    }

    /// The socket address to dial for a caller that asked for `port`.
    pub fn with_default_port(self, port: u16) -> SocketAddr {
        match self {
            EndpointAddr::Socket(sa) => sa,
            EndpointAddr::Ip(ip) => SocketAddr::new(ip, port),
        }
    }
}

impl Service {
    pub fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut errs = Vec::new();
        if self.api_version != crate::API_VERSION {
            errs.push(FieldError::new(
                "apiVersion",
                format!("must be {}, got {:?}", crate::API_VERSION, self.api_version),
            ));
        }
        if !crate::policy::dns_label(&self.metadata.name) {
            errs.push(FieldError::new(
                "metadata.name",
                format!("{:?} is not a DNS label (lowercase letters, digits and '-')", self.metadata.name),
            ));
        }
        if let Some(ns) = &self.metadata.namespace
            && !crate::policy::dns_label(ns)
        {
            errs.push(FieldError::new(
                "metadata.namespace",
                format!("{ns:?} is not a DNS label (lowercase letters, digits and '-')"),
            ));
        }
        for (i, p) in self.spec.ports.iter().enumerate() {
            if p.port == 0 {
                errs.push(FieldError::new(format!("spec.ports[{i}].port"), "must be 1-65535"));
            }
        }
        for (i, ep) in self.spec.endpoints.iter().enumerate() {
            if EndpointAddr::parse(&ep.address).is_none() {
                errs.push(FieldError::new(
                    format!("spec.endpoints[{i}].address"),
                    format!("{:?} is not an IP or IP:port", ep.address),
                ));
            }
            if let Some(id) = &ep.identity
                && let Err(err) = id.parse::<crate::identity::Identity>()
            {
                errs.push(FieldError::new(format!("spec.endpoints[{i}].identity"), err.to_string()));
            }
            if ep.weight == 0 {
                errs.push(FieldError::new(format!("spec.endpoints[{i}].weight"), "must be at least 1"));
            }
        }
        if self.spec.dns.is_some() && !self.spec.endpoints.is_empty() {
            errs.push(FieldError::new("spec.dns", "give either dns or endpoints, not both"));
        }
        if errs.is_empty() { Ok(()) } else { Err(errs) }
    }
}
