//! A Kubernetes Service and its EndpointSlices as what the store keeps: a Ballast
//! `Service` document and one endpoint per ready pod. Pure: no I/O, tested here.
//!
//! How the sidecar reads a Service (`sidecar/src/routes.rs`) decides the mapping. A
//! connection is matched by its original destination (`ClusterIP:port`, against
//! `addresses` × `ports`) or by `Host`; the endpoint it goes to is either a full
//! `ip:port`, dialled as is, or a bare `ip`, which takes the port the caller asked for.
//! Kubernetes maps each Service `port` to a `targetPort`, which the EndpointSlice has
//! already resolved per pod (a named targetPort can differ between pods; each slice
//! holds pods that agree), and names after the Service port it serves. So:
//!
//! * **One port** (the common case): endpoints are `podIP:targetPort`.
//! * **Several ports, each with `targetPort` = `port`** in every slice: endpoints are
//!   bare pod IPs, right for every port.
//! * **Several ports, some remapped**: one endpoint list cannot be right for every port,
//!   and a wrong port is worse than no mesh. The document then claims only the first
//!   port (Kubernetes' and kubectl's primary port), with `podIP:targetPort` of that port;
//!   connections to the ClusterIP on the other ports match no Ballast service and pass
//!   through to the original destination, where kube-proxy maps them correctly. (An HTTP
//!   request to another port naming the service in `Host` still finds it by name and
//!   goes to the first port's target: give such ports their own Service to avoid that.)
//! * Only TCP ports are mirrored: the sidecar intercepts TCP only. A Service whose ports
//!   are all UDP/SCTP is not mirrored at all (a document without ports would claim
//!   every port of its ClusterIP).
//!
//! Other decisions:
//! * **Protocol**: `appProtocol` when it is one Ballast knows (`http`; `h2c`, `http2`,
//!   `kubernetes.io/h2c`; `grpc`; `tcp`), else the port name's prefix up to the first
//!   `-` by Istio's convention (`http`, `http2`, `grpc`, `tcp`; `grpc-web` is not gRPC
//!   on the wire). An `appProtocol` Ballast does not know (`https`, `kubernetes.io/ws`)
//!   is not overridden by the name. Anything else is omitted: the sidecar detects it.
//! * **Addresses**: the `clusterIPs` (`clusterIP` on old objects), without the headless
//!   `None`. A headless Service is still mirrored: callers find it by name.
//! * **ExternalName** Services are not mirrored. Their `dns:` form is what they mean, but
//!   the sidecar does not resolve `dns:` services yet and would answer 503 (no endpoints)
//!   where today the application's own DNS lookup of the CNAME reaches the external host
//!   through the sidecar's pass-through.
//! * **Endpoints**: those whose `conditions.ready` is not `false` (unset means ready, as
//!   Kubernetes says), their first address (Kubernetes: the addresses are fungible and
//!   consumers may use the first only), from `IPv4`/`IPv6` slices (`FQDN` slices are
//!   skipped). The endpoint's id in its key is its address.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use ballast_api::service::{Protocol, ServicePort, ServiceSpec};
use ballast_api::{ObjectMeta, Service};
use k8s_openapi::api::core::v1::{Service as KubeService, ServicePort as KubePort};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::keys::{SOURCE_ANNOTATION, SOURCE_KUBERNETES};
use crate::mesh::Registration;

/// The label an EndpointSlice names its Service with.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// What the store should hold for one Kubernetes Service.
#[derive(Debug, Clone, PartialEq)]
pub struct Mirrored {
    pub document: Service,
    /// Endpoint id (its address) → the endpoint.
    pub endpoints: BTreeMap<String, Registration>,
}

/// The Service an EndpointSlice belongs to: `(namespace, name)`.
pub fn slice_service(slice: &EndpointSlice) -> Option<(String, String)> {
    let name = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    Some((slice.metadata.namespace.clone().unwrap_or_default(), name.clone()))
}

/// `service` and its `slices` as the store should hold them; `None` when the Service is
/// not mirrored (ExternalName, only non-TCP ports, or not a valid Ballast name).
pub fn mirror(service: &KubeService, slices: &[&EndpointSlice]) -> Option<Mirrored> {
    let name = service.metadata.name.clone()?;
    let namespace = service.metadata.namespace.clone()?;
    let spec = service.spec.clone().unwrap_or_default();
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    let declared = spec.ports.as_deref().unwrap_or_default();
    let tcp: Vec<(&KubePort, u16)> = declared
        .iter()
        .filter(|p| p.protocol.as_deref().is_none_or(|proto| proto == "TCP"))
        .filter_map(|p| Some((p, u16::try_from(p.port).ok().filter(|port| *port > 0)?)))
        .collect();
    if !declared.is_empty() && tcp.is_empty() {
        return None;
    }

    let identity = tcp.len() > 1
        && slices.iter().all(|s| tcp.iter().all(|(p, port)| target_port(s, p).is_none_or(|t| t == *port)));
    // The ports the document claims, and how an endpoint's address is made in a slice.
    let (claimed, addressing): (Vec<(&KubePort, u16)>, Addressing) = match tcp.as_slice() {
        [] => (Vec::new(), Addressing::BareIp),
        _ if identity => (tcp.clone(), Addressing::BareIp),
        [first, ..] => (vec![*first], Addressing::TargetOf(first.0, first.1)),
    };

    let addresses: Vec<IpAddr> = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ips.clone(),
        (_, Some(ip)) => vec![ip.clone()],
        _ => Vec::new(),
    }
    .iter()
    .filter(|ip| !ip.is_empty() && *ip != "None")
    .filter_map(|ip| ip.parse().ok())
    .collect();

    let document = Service {
        api_version: ballast_api::API_VERSION.to_owned(),
        kind: "Service".to_owned(),
        metadata: ObjectMeta {
            name,
            namespace: Some(namespace),
            labels: BTreeMap::new(),
            annotations: BTreeMap::from([(SOURCE_ANNOTATION.to_owned(), SOURCE_KUBERNETES.to_owned())]),
        },
        spec: ServiceSpec {
            ports: claimed
                .iter()
                .map(|(p, port)| ServicePort {
                    port: *port,
                    protocol: protocol(p),
                    name: p.name.clone().filter(|n| !n.is_empty()),
                })
                .collect(),
            addresses,
            endpoints: Vec::new(),
            dns: None,
        },
    };
    if let Err(errs) = document.validate() {
        tracing::warn!(
            service = %format!("{}/{}", document.metadata.namespace_or_default(), document.metadata.name),
            error = %ballast_api::crd::invalid_message(&errs),
            "not mirroring a Kubernetes Service that is not a valid Ballast Service"
        );
        return None;
    }

    let mut endpoints = BTreeMap::new();
    for slice in slices {
        if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
            continue;
        }
        let port = match addressing {
            Addressing::BareIp => None,
            Addressing::TargetOf(p, port) => match target_port(slice, p) {
                Some(t) => Some(t),
                // Listed without a number: the Service's own port.
                None if slice_port(slice, p).is_some() => Some(port),
                // The slice's pods do not serve that port.
                None => continue,
            },
        };
        for ep in &slice.endpoints {
            if ep.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                continue;
            }
            let Some(ip) = ep.addresses.first().and_then(|a| a.parse::<IpAddr>().ok()) else { continue };
            let address = match port {
                Some(port) => SocketAddr::new(ip, port).to_string(),
                None => ip.to_string(),
            };
            let pod = ep
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .and_then(|r| r.name.clone())
                .unwrap_or_default();
            endpoints.insert(
                address.clone(),
                Registration {
                    address,
                    pod,
                    weight: 1,
                    source: Some(SOURCE_KUBERNETES.to_owned()),
                    identity: None,
                },
            );
        }
    }
    Some(Mirrored { document, endpoints })
}

#[derive(Clone, Copy)]
enum Addressing<'a> {
    /// A bare pod IP: the caller's port.
    BareIp,
    /// `podIP:targetPort` of this Service port (and its number).
    TargetOf(&'a KubePort, u16),
}

/// The slice's entry for Service port `p`: the one with the same name (both unnamed for
/// a single unnamed port).
fn slice_port<'s>(
    slice: &'s EndpointSlice,
    p: &KubePort,
) -> Option<&'s k8s_openapi::api::discovery::v1::EndpointPort> {
    let name = p.name.as_deref().unwrap_or_default();
    slice
        .ports
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|sp| sp.name.as_deref().unwrap_or_default() == name)
}

/// The target port the slice resolved for Service port `p`; `None` when the slice does
/// not list it or leaves its number unset (the Service's own port, then).
fn target_port(slice: &EndpointSlice, p: &KubePort) -> Option<u16> {
    slice_port(slice, p).and_then(|sp| sp.port).and_then(|t| u16::try_from(t).ok()).filter(|t| *t > 0)
}

/// The protocol of a Service port: see the module docs.
pub fn protocol(p: &KubePort) -> Option<Protocol> {
    if let Some(app) = p.app_protocol.as_deref().filter(|a| !a.is_empty()) {
        return match app.to_ascii_lowercase().as_str() {
            "http" => Some(Protocol::Http),
            "h2c" | "http2" | "kubernetes.io/h2c" => Some(Protocol::Http2),
            "grpc" => Some(Protocol::Grpc),
            "tcp" => Some(Protocol::Tcp),
            _ => None,
        };
    }
    let name = p.name.as_deref()?.to_ascii_lowercase();
    if name.starts_with("grpc-web") {
        return None;
    }
    match name.split('-').next()? {
        "http" => Some(Protocol::Http),
        "http2" => Some(Protocol::Http2),
        "grpc" => Some(Protocol::Grpc),
        "tcp" => Some(Protocol::Tcp),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn service(spec: serde_json::Value) -> KubeService {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "payments", "namespace": "shop", "resourceVersion": "7"},
            "spec": spec,
        }))
        .expect("a Service")
    }

    fn slice(name: &str, ports: serde_json::Value, endpoints: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": "shop", "labels": {SERVICE_NAME_LABEL: "payments"}},
            "addressType": "IPv4",
            "ports": ports,
            "endpoints": endpoints,
        }))
        .expect("an EndpointSlice")
    }

    fn pod(ip: &str, ready: Option<bool>) -> serde_json::Value {
        let mut e = json!({"addresses": [ip], "targetRef": {"kind": "Pod", "name": format!("payments-{ip}"), "namespace": "shop"}});
        if let Some(ready) = ready {
            e["conditions"] = json!({"ready": ready});
        }
        e
    }

    fn addresses(m: &Mirrored) -> Vec<&str> {
        m.endpoints.keys().map(String::as_str).collect()
    }

    #[test]
    fn one_port_maps_to_the_target_port_of_ready_pods() {
        let svc = service(json!({
            "type": "ClusterIP", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
        }));
        let s = slice(
            "payments-abc",
            json!([{"name": "http", "port": 8080, "protocol": "TCP"}]),
            json!([pod("10.1.0.1", Some(true)), pod("10.1.0.2", None), pod("10.1.0.3", Some(false))]),
        );
        let m = mirror(&svc, &[&s]).expect("mirrored");
        assert_eq!(addresses(&m), ["10.1.0.1:8080", "10.1.0.2:8080"], "not-ready excluded, unset is ready");
        assert_eq!(m.document.spec.ports.len(), 1);
        assert_eq!(m.document.spec.ports[0].port, 80);
        assert_eq!(m.document.spec.ports[0].protocol, Some(Protocol::Http));
        assert_eq!(m.document.spec.addresses, ["10.96.0.10".parse::<IpAddr>().expect("ip")]);
        assert_eq!(m.document.metadata.annotations[SOURCE_ANNOTATION], SOURCE_KUBERNETES);
        let r = &m.endpoints["10.1.0.1:8080"];
        assert_eq!((r.pod.as_str(), r.is_synced()), ("payments-10.1.0.1", true));
        assert!(m.document.validate().is_ok());
    }

    #[test]
    fn several_ports_without_remapping_use_bare_ips() {
        let svc = service(json!({
            "clusterIP": "10.96.0.11",
            "ports": [{"name": "grpc", "port": 9000, "targetPort": 9000}, {"name": "metrics", "port": 9090, "targetPort": 9090}],
        }));
        let s = slice(
            "a",
            json!([{"name": "metrics", "port": 9090}, {"name": "grpc", "port": 9000}]),
            json!([pod("10.1.0.1", None)]),
        );
        let m = mirror(&svc, &[&s]).expect("mirrored");
        assert_eq!(addresses(&m), ["10.1.0.1"]);
        let ports: Vec<(u16, Option<Protocol>)> =
            m.document.spec.ports.iter().map(|p| (p.port, p.protocol)).collect();
        assert_eq!(ports, [(9000, Some(Protocol::Grpc)), (9090, None)]);
    }

    #[test]
    fn several_remapped_ports_claim_only_the_first() {
        let svc = service(json!({
            "clusterIP": "10.96.0.12",
            "ports": [{"name": "web", "port": 80, "targetPort": "web"}, {"name": "admin", "port": 9901, "targetPort": 9901}],
        }));
        // Two slices: the named targetPort resolves differently in each.
        let a = slice(
            "a",
            json!([{"name": "web", "port": 8080}, {"name": "admin", "port": 9901}]),
            json!([pod("10.1.0.1", None)]),
        );
        let b = slice(
            "b",
            json!([{"name": "web", "port": 8081}, {"name": "admin", "port": 9901}]),
            json!([pod("10.1.0.2", None)]),
        );
        let m = mirror(&svc, &[&a, &b]).expect("mirrored");
        assert_eq!(addresses(&m), ["10.1.0.1:8080", "10.1.0.2:8081"]);
        assert_eq!(m.document.spec.ports.iter().map(|p| p.port).collect::<Vec<_>>(), [80]);
    }

    #[test]
    fn headless_external_name_and_udp() {
        let headless = service(json!({"clusterIP": "None", "ports": [{"port": 5432, "targetPort": 5432}]}));
        let s = slice("a", json!([{"port": 5432}]), json!([pod("10.1.0.1", None)]));
        let m = mirror(&headless, &[&s]).expect("headless is mirrored");
        assert!(m.document.spec.addresses.is_empty());
        assert_eq!(addresses(&m), ["10.1.0.1:5432"]);
        let external = service(json!({"type": "ExternalName", "externalName": "db.example.com"}));
        assert_eq!(mirror(&external, &[]), None);
        let udp = service(json!({"clusterIP": "10.96.0.53", "ports": [{"port": 53, "protocol": "UDP"}]}));
        assert_eq!(mirror(&udp, &[]), None);
        let mixed = service(
            json!({"clusterIP": "10.96.0.54", "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}, {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]}),
        );
        let m = mirror(&mixed, &[]).expect("the TCP port");
        assert_eq!(
            m.document.spec.ports.iter().map(|p| p.name.as_deref()).collect::<Vec<_>>(),
            [Some("dns-tcp")]
        );
    }

    #[test]
    fn protocols_from_app_protocol_then_the_port_name() {
        let p = |name: Option<&str>, app: Option<&str>| {
            protocol(&KubePort {
                name: name.map(str::to_owned),
                app_protocol: app.map(str::to_owned),
                port: 80,
                ..Default::default()
            })
        };
        assert_eq!(p(None, Some("kubernetes.io/h2c")), Some(Protocol::Http2));
        assert_eq!(p(None, Some("h2c")), Some(Protocol::Http2));
        assert_eq!(p(Some("tcp-x"), Some("grpc")), Some(Protocol::Grpc), "appProtocol first");
        assert_eq!(p(Some("http"), Some("https")), None, "an unknown appProtocol is not overridden");
        assert_eq!(p(Some("http-api"), None), Some(Protocol::Http));
        assert_eq!(p(Some("http2"), None), Some(Protocol::Http2));
        assert_eq!(p(Some("grpc-internal"), None), Some(Protocol::Grpc));
        assert_eq!(p(Some("grpc-web"), None), None);
        assert_eq!(p(Some("tcp"), None), Some(Protocol::Tcp));
        assert_eq!(p(Some("https"), None), None);
        assert_eq!(p(Some("web"), None), None);
        assert_eq!(p(None, None), None);
    }
}
