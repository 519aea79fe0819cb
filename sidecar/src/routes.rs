//! The applied configuration as a route table, swapped atomically.
//!
//! A [`Snapshot`] is immutable: each request loads the current one (`ArcSwap::load`, no
//! lock) and keeps it for its lifetime, so a new configuration never disturbs a request
//! or a connection in flight. Building a snapshot reuses the stacks of services whose
//! definition and policy did not change, so their balancer state and pools stay warm.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use ballast_api::service::{EndpointAddr, Protocol};
use ballast_api::{Config, ResiliencePolicy, Service};

use crate::balance::{Balancer, Target};
use crate::resilience::inbound::InboundLimits;
use crate::stack::{HttpService, StackContext};

/// One configured service, ready to take requests.
pub struct ServiceEntry {
    /// Metrics label: `name.namespace`.
    pub label: Arc<str>,
    service: Service,
    policy: Option<ResiliencePolicy>,
    stacks: Stacks,
}

/// A service's stacks: one when every endpoint names its port; else one per requested
/// port, since a bare-IP endpoint listens on the port the caller asked for. Each comes
/// with its balancer, so a change of endpoints alone updates them in place.
#[derive(Clone)]
enum Stacks {
    Fixed(HttpService, Balancer),
    PerPort(Arc<PerPort>),
}

struct PerPort {
    ctx: Arc<StackContext>,
    endpoints: Mutex<Vec<Parsed>>,
    why_empty: String,
    by_port: Mutex<HashMap<u16, (HttpService, Balancer)>>,
}

/// An endpoint as configured: its address (maybe a bare IP), weight and identity.
type Parsed = (EndpointAddr, u32, Option<Arc<str>>);

/// The endpoints, bare IPs taking `port`.
fn at_port(endpoints: &[Parsed], port: u16) -> Vec<Target> {
    endpoints
        .iter()
        .map(|(a, w, id)| Target { addr: a.with_default_port(port), weight: *w, identity: id.clone() })
        .collect()
}

/// Per-port stacks kept per service; requests to further ports get an uncached stack.
const MAX_PORT_STACKS: usize = 64;

fn parse_endpoints(service: &Service) -> Vec<Parsed> {
    service
        .spec
        .endpoints
        .iter()
        .filter_map(|e| {
            EndpointAddr::parse(&e.address).map(|a| (a, e.weight, e.identity.as_deref().map(Arc::from)))
        })
        .collect()
}

fn all_fixed(endpoints: &[Parsed]) -> bool {
    endpoints.iter().all(|(a, _, _)| matches!(a, EndpointAddr::Socket(_)))
}

impl ServiceEntry {
    fn build(ctx: &Arc<StackContext>, service: &Service, policy: Option<&ResiliencePolicy>) -> Self {
        let label: Arc<str> =
            format!("{}.{}", service.metadata.name, service.metadata.namespace_or_default()).into();
        let endpoints = parse_endpoints(service);
        // DNS discovery (DESIGN §2, hickory-resolver refreshed by TTL) is not built yet:
        // say so where the operator looks rather than fail silently.
        let why_empty = match &service.spec.dns {
            Some(name) => {
                tracing::warn!(service = %label, dns = %name, "dns discovery is not supported by this sidecar yet; the service has no endpoints");
                format!(
                    " (dns discovery of {name} is not supported by this sidecar yet: list endpoints instead)"
                )
            }
            None => String::new(),
        };
        let spec = policy.map(|p| &p.spec);
        let stacks = if all_fixed(&endpoints) {
            // Every endpoint names its port: the default is never used.
            let (stack, balancer) =
                ctx.service_stack(label.clone(), &at_port(&endpoints, 0), &why_empty, spec);
            Stacks::Fixed(stack, balancer)
        } else {
            let by_port = service
                .spec
                .ports
                .iter()
                .map(|p| {
                    (p.port, ctx.service_stack(label.clone(), &at_port(&endpoints, p.port), &why_empty, spec))
                })
                .collect();
            Stacks::PerPort(Arc::new(PerPort {
                ctx: ctx.clone(),
                endpoints: Mutex::new(endpoints),
                why_empty,
                by_port: Mutex::new(by_port),
            }))
        };
        Self { label, service: service.clone(), policy: policy.cloned(), stacks }
    }

    /// This entry for `service` when only its endpoints changed: the same stacks (policy
    /// state such as an open circuit, bulkhead slots and the retry budget carries on) with
    /// the balancers updated in place. `None` when anything else changed.
    fn with_endpoints(&self, service: &Service) -> Option<Self> {
        let mut same = service.clone();
        same.spec.endpoints = self.service.spec.endpoints.clone();
        if same != self.service {
            return None;
        }
        let endpoints = parse_endpoints(service);
        match &self.stacks {
            Stacks::Fixed(_, balancer) if all_fixed(&endpoints) => balancer.update(&at_port(&endpoints, 0)),
            Stacks::Fixed(..) => return None,
            Stacks::PerPort(per_port) => {
                let by_port = per_port.by_port.lock().unwrap_or_else(|p| p.into_inner());
                for (port, (_, balancer)) in by_port.iter() {
                    balancer.update(&at_port(&endpoints, *port));
                }
                *per_port.endpoints.lock().unwrap_or_else(|p| p.into_inner()) = endpoints;
            }
        }
        Some(Self {
            label: self.label.clone(),
            service: service.clone(),
            policy: self.policy.clone(),
            stacks: self.stacks.clone(),
        })
    }

    /// The stack for a request to `port`.
    /// The sampling its policy sets (`telemetry`), if any.
    pub fn telemetry(&self) -> Option<&ballast_api::policy::Telemetry> {
        self.policy.as_ref().and_then(|p| p.spec.telemetry.as_ref())
    }

    pub fn stack(&self, port: u16) -> HttpService {
        match &self.stacks {
            Stacks::Fixed(s, _) => s.clone(),
            Stacks::PerPort(per_port) => {
                let PerPort { ctx, endpoints, why_empty, by_port } = &**per_port;
                let mut map = by_port.lock().unwrap_or_else(|p| p.into_inner());
                if let Some((s, _)) = map.get(&port) {
                    return s.clone();
                }
                let policy = self.policy.as_ref().map(|p| &p.spec);
                let endpoints = at_port(&endpoints.lock().unwrap_or_else(|p| p.into_inner()), port);
                let (stack, balancer) = ctx.service_stack(self.label.clone(), &endpoints, why_empty, policy);
                if map.len() < MAX_PORT_STACKS {
                    map.insert(port, (stack.clone(), balancer));
                }
                stack
            }
        }
    }

    /// The declared protocol of `port`, if any.
    pub fn protocol(&self, port: u16) -> Option<Protocol> {
        let ports = &self.service.spec.ports;
        ports
            .iter()
            .find(|p| p.port == port)
            .or(if ports.len() == 1 { ports.first() } else { None })?
            .protocol
    }

    /// An endpoint for an opaque TCP connection to `port`, with its identity when it is
    /// meshed; spreads connections at random.
    pub fn tcp_endpoint(&self, port: u16) -> Option<Target> {
        let eps = &self.service.spec.endpoints;
        if eps.is_empty() {
            return None;
        }
        let pick = &eps[rand::random_range(0..eps.len())];
        EndpointAddr::parse(&pick.address).map(|a| Target {
            addr: a.with_default_port(port),
            weight: pick.weight,
            identity: pick.identity.as_deref().map(Arc::from),
        })
    }
}

/// Inbound stacks within a pod's limits, per app address.
type InboundStacks = Mutex<HashMap<SocketAddr, HttpService>>;

/// The lookup maps of a [`Snapshot`], hashed with foldhash rather than SipHash: every
/// request hashes its authority twice (namespace, then name), which SipHash made 530 of a
/// request's 38,000 instructions (callgrind, session 10). SipHash's defence against
/// flooding is not needed here: the keys are the configuration's, requests only look
/// up, and foldhash is still seeded per process.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Everything a request needs to find its destination.
pub struct Snapshot {
    pub version: u64,
    pub config: Arc<Config>,
    namespace: String,
    /// namespace → name → entry: nested so a request's lookup borrows its `&str`s
    /// instead of allocating a key.
    by_name: FastMap<String, FastMap<String, Arc<ServiceEntry>>>,
    by_addr: FastMap<SocketAddr, Arc<ServiceEntry>>,
    by_ip: FastMap<IpAddr, Arc<ServiceEntry>>,
    /// The `inbound` limits of the policy targeting this pod's own service, and the
    /// inbound stacks built within them, per app address.
    inbound: Option<(Arc<InboundLimits>, InboundStacks)>,
    /// Who may call this pod's app (`inbound.mtls`, `inbound.allow`).
    pub access: Access,
    /// The sampling of this pod's own service (`telemetry`), for inbound requests.
    pub telemetry: Option<ballast_api::policy::Telemetry>,
}

/// `inbound.mtls` and `inbound.allow` of the policy targeting this pod's service.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// Only mesh TLS callers are served.
    pub strict: bool,
    /// Empty: everyone the mode admits.
    pub allow: Vec<ballast_api::identity::IdentityPattern>,
}

impl Access {
    fn from_policy(inbound: Option<&ballast_api::policy::Inbound>) -> Self {
        let Some(i) = inbound else { return Self::default() };
        Self {
            strict: i.mtls == Some(ballast_api::policy::MtlsMode::Strict),
            // Validated on arrival: a pattern that does not parse never gets here.
            allow: i.allow.iter().filter_map(|p| p.parse().ok()).collect(),
        }
    }

    /// Whether a caller with `peer` (None: plain text) may call; `trust_domain` is this
    /// sidecar's. Err: why not, for the 403's body.
    pub fn check(
        &self,
        peer: Option<&ballast_api::identity::Identity>,
        trust_domain: Option<&str>,
    ) -> Result<(), String> {
        match peer {
            None if self.strict => Err("this service accepts only mesh mutual TLS (inbound.mtls: strict), and the caller sent plain text".into()),
            None if !self.allow.is_empty() => Err("this service admits only the identities in inbound.allow, and the caller presented none (plain text)".into()),
            Some(id) if !self.allow.is_empty() && !self.allow.iter().any(|p| p.matches(id, trust_domain.unwrap_or(&id.trust_domain))) => {
                Err(format!("{id} is not in this service's inbound.allow"))
            }
            _ => Ok(()),
        }
    }
}

impl Snapshot {
    pub fn empty(namespace: &str) -> Self {
        Self {
            version: 0,
            config: Arc::new(Config::default()),
            namespace: namespace.to_owned(),
            by_name: FastMap::default(),
            by_addr: FastMap::default(),
            by_ip: FastMap::default(),
            inbound: None,
            access: Access::default(),
            telemetry: None,
        }
    }

    /// The inbound stack to the app at `addr` when a policy sets `inbound` limits for this
    /// pod's service; `None` means no limits apply.
    pub fn inbound_stack(
        &self,
        ctx: &StackContext,
        label: &Arc<str>,
        addr: SocketAddr,
    ) -> Option<HttpService> {
        let (limits, stacks) = self.inbound.as_ref()?;
        let mut stacks = stacks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = stacks.get(&addr) {
            return Some(s.clone());
        }
        let stack = ctx.inbound_stack(label, addr, limits);
        if stacks.len() < MAX_PORT_STACKS {
            stacks.insert(addr, stack.clone());
        }
        Some(stack)
    }

    /// Builds the route table for `config`, reusing unchanged entries of `previous`.
    /// `own_service` is this pod's service (`--service`), whose policy's `inbound` section
    /// applies here.
    pub fn build(
        config: Config,
        ctx: &Arc<StackContext>,
        namespace: &str,
        own_service: Option<&str>,
        previous: Option<&Snapshot>,
    ) -> Self {
        let mut snap = Snapshot { version: config.version, ..Snapshot::empty(namespace) };
        let own_policy = own_service.and_then(|s| config.policy_for(namespace, s)).map(|p| &p.spec);
        let request_timeout =
            own_policy.and_then(|p| p.timeouts.as_ref()).and_then(|t| t.request).map(|d| d.get());
        snap.access = Access::from_policy(own_policy.and_then(|p| p.inbound.as_ref()));
        snap.telemetry = own_policy.and_then(|p| p.telemetry);
        let inbound_policy = match own_policy.and_then(|p| p.inbound.clone()) {
            Some(i) => Some(i),
            None => request_timeout.map(|_| Default::default()),
        };
        snap.inbound = inbound_policy.map(|policy| {
            // Unchanged limits keep their state (bucket, slots) across snapshots.
            let key = (policy, request_timeout);
            let limits = previous
                .and_then(|p| p.inbound.as_ref())
                .filter(|(l, _)| l.policy == key)
                .map(|(l, _)| l.clone())
                .unwrap_or_else(|| InboundLimits::new(&key.0, key.1));
            (limits, Mutex::new(HashMap::new()))
        });
        for svc in config.services.values() {
            let ns = svc.metadata.namespace_or_default().to_owned();
            let name = svc.metadata.name.clone();
            let policy = config.policy_for(&ns, &name);
            let prev = previous.and_then(|p| p.entry(&ns, &name));
            let entry = match prev.filter(|e| e.policy.as_ref() == policy) {
                Some(e) if &e.service == svc => e.clone(),
                Some(e) => match e.with_endpoints(svc) {
                    Some(updated) => Arc::new(updated),
                    None => Arc::new(ServiceEntry::build(ctx, svc, policy)),
                },
                None => Arc::new(ServiceEntry::build(ctx, svc, policy)),
            };
            for ip in &svc.spec.addresses {
                if svc.spec.ports.is_empty() {
                    snap.by_ip.insert(*ip, entry.clone());
                }
                for p in &svc.spec.ports {
                    snap.by_addr.insert(SocketAddr::new(*ip, p.port), entry.clone());
                }
            }
            snap.by_name.entry(ns).or_default().insert(name, entry);
        }
        if let Some(prev) = previous {
            for (ns, name, e) in
                prev.by_name.iter().flat_map(|(ns, m)| m.iter().map(move |(n, e)| (ns, n, e)))
            {
                if snap.entry(ns, name).is_none() {
                    // Gauges of a removed service would otherwise report it forever.
                    let _ = ctx.metrics.endpoints.remove_label_values(&[&e.label, "ready"]);
                    let _ = ctx.metrics.endpoints.remove_label_values(&[&e.label, "ejected"]);
                    let _ = ctx.metrics.circuit_state.remove_label_values(&[&e.label]);
                }
            }
        }
        snap.config = Arc::new(config);
        snap
    }

    /// The service whose virtual address the connection was made to.
    pub fn by_original_dst(&self, dst: SocketAddr) -> Option<&Arc<ServiceEntry>> {
        self.by_addr.get(&dst).or_else(|| self.by_ip.get(&dst.ip()))
    }

    /// The service a `Host`/`:authority` names: `name`, `name.ns`, `name.ns.svc` or
    /// `name.ns.svc.cluster.local`, with or without a port, any case.
    pub fn by_authority(&self, authority: &str) -> Option<&Arc<ServiceEntry>> {
        let host = split_host_port(authority).0;
        let host = host.trim_end_matches('.');
        if host.parse::<IpAddr>().is_ok() {
            return None;
        }
        let lower;
        let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            lower = host.to_ascii_lowercase();
            lower.as_str()
        } else {
            host
        };
        let (name, rest) = host.split_once('.').unwrap_or((host, ""));
        let ns = match rest.split_once('.') {
            _ if rest.is_empty() => self.namespace.as_str(),
            None => rest,
            Some((ns, "svc")) => ns,
            Some((ns, tail)) if tail.strip_prefix("svc.") == Some(ballast_api::names::CLUSTER_DOMAIN) => ns,
            Some(_) => return None,
        };
        self.entry(ns, name)
    }

    fn entry(&self, ns: &str, name: &str) -> Option<&Arc<ServiceEntry>> {
        self.by_name.get(ns)?.get(name)
    }
}

/// Splits `host[:port]` / `[v6]:port`; the port is `None` when absent or invalid.
pub fn split_host_port(authority: &str) -> (&str, Option<u16>) {
    if let Some(rest) = authority.strip_prefix('[') {
        if let Some(end) = rest.find(']') {
            let port = rest[end + 1..].strip_prefix(':').and_then(|p| p.parse().ok());
            return (&rest[..end], port);
        }
        return (authority, None);
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (h, p.parse().ok()),
        _ => (authority, None),
    }
}

/// The current snapshot, and whether a first configuration was applied (readiness).
pub struct ConfigStore {
    current: ArcSwap<Snapshot>,
    ready: AtomicBool,
    namespace: String,
    own_service: Option<String>,
    ctx: Arc<StackContext>,
}

impl ConfigStore {
    pub fn new(ctx: Arc<StackContext>, namespace: &str, own_service: Option<&str>) -> Arc<Self> {
        Arc::new(Self {
            current: ArcSwap::from_pointee(Snapshot::empty(namespace)),
            ready: AtomicBool::new(false),
            namespace: namespace.to_owned(),
            own_service: own_service.map(str::to_owned),
            ctx,
        })
    }

    pub fn load(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.current.load()
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Applies a validated configuration.
    pub fn apply(&self, config: Config) {
        let prev = self.current.load_full();
        let version = config.version;
        let snap =
            Snapshot::build(config, &self.ctx, &self.namespace, self.own_service.as_deref(), Some(&prev));
        self.current.store(Arc::new(snap));
        self.ctx.metrics.config_version.set(version as i64);
        self.ready.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_authorities() {
        assert_eq!(split_host_port("a.b:80"), ("a.b", Some(80)));
        assert_eq!(split_host_port("a.b"), ("a.b", None));
        assert_eq!(split_host_port("[::1]:8080"), ("::1", Some(8080)));
        assert_eq!(split_host_port("::1"), ("::1", None));
    }

    #[tokio::test]
    async fn resolves_names_and_addresses() {
        let cfg = Config::from_yaml(
            "apiVersion: ballast.io/v1alpha1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec:\n  ports: [{port: 80}]\n  addresses: [10.96.0.10]\n  endpoints: [{address: 127.0.0.1}]\n",
            "t.yaml",
        )
        .unwrap();
        let ctx = StackContext::new(
            crate::client::Clients::new(std::time::Duration::from_secs(1)),
            Default::default(),
        );
        let snap = Snapshot::build(cfg.clone(), &ctx, "shop", None, None);
        for host in [
            "web",
            "web:80",
            "WEB.shop",
            "web.shop.svc",
            "web.shop.svc.cluster.local",
            "web.shop.svc.cluster.local.",
        ] {
            assert!(snap.by_authority(host).is_some(), "{host}");
        }
        for host in ["web.other", "web.shop.svc.example.com", "web.shop.com", "10.96.0.10", "other"] {
            assert!(snap.by_authority(host).is_none(), "{host}");
        }
        assert!(snap.by_original_dst("10.96.0.10:80".parse().unwrap()).is_some());
        assert!(snap.by_original_dst("10.96.0.10:81".parse().unwrap()).is_none());
        let e = snap.by_authority("web").unwrap();
        // A bare-IP endpoint listens on the port the caller asked for.
        assert_eq!(e.tcp_endpoint(80).map(|t| t.addr), Some("127.0.0.1:80".parse().unwrap()));
        assert_eq!(e.tcp_endpoint(8080).map(|t| t.addr), Some("127.0.0.1:8080".parse().unwrap()));
        assert_eq!(&*e.label, "web.shop");
        // An unchanged service keeps its entry (and so its stacks) across snapshots.
        let again = Snapshot::build(cfg, &ctx, "shop", None, Some(&snap));
        assert!(Arc::ptr_eq(snap.by_authority("web").unwrap(), again.by_authority("web").unwrap()));
        // Another namespace's short name does not resolve.
        let other_ns = Snapshot::build(again.config.as_ref().clone(), &ctx, "default", None, None);
        assert!(other_ns.by_authority("web").is_none());
    }
}
