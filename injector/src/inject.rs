//! The injection itself: a pure function from a pod (and whether its namespace opted in)
//! to a decision, and for an injected pod the JSONPatch that adds the sidecar.
//!
//! Nothing here does I/O, so every case is a golden-file test over real manifests
//! (`tests/golden.rs`).
//!
//! Decisions an operator of Linkerd or Istio would expect, written down:
//! * **Order of init containers.** As a native sidecar (the default), `ballast-init`
//!   goes first and `ballast-proxy` second, before the pod's own init containers: once the
//!   iptables rules exist, every later container's traffic needs the proxy, and a native
//!   sidecar is started (and its startup probe passed) before the next init container.
//!   As an ordinary container (`ballast.io/native-sidecar: "false"`), `ballast-init` goes
//!   *last*, so the pod's own init containers still reach the network directly, and the
//!   proxy is the first container.
//! * **Existing arrays are extended, never replaced**: `add` at index 0 or `-`, so an
//!   init container that another webhook added between our read and the API server's
//!   apply is kept.
//! * **Skips, not refusals**, when the pod cannot be meshed as it is: `hostNetwork` (the
//!   iptables rules would capture the node's traffic), an app port on 4140/4143/4191 or
//!   an app port named `ballast-admin` (the proxy could not bind, or the name would be
//!   duplicated). The pod is admitted unmeshed with a warning that says why; refusing it
//!   would stop a namespace-wide rollout on one odd pod.
//! * **Refusals** for a `ballast.io/*` annotation that does not parse: whoever wrote it
//!   asked for something specific and must hear that it was not understood.
//! * **Prometheus annotations** are added only when the pod has none of its own, so an
//!   app that is already scraped keeps its target; the `ballast-admin` port and the
//!   `ballast.io/injected` label let a PodMonitor scrape every sidecar regardless.
//! * **Startup**: the native sidecar's startup probe is `/live` (the proxy listens), not
//!   `/ready` (first configuration received), so pods still start while the control
//!   plane is down; the proxy passes traffic through until its configuration arrives.
//! * **Shutdown**: a `preStop` sleep of 5 s lets endpoint removal reach callers before the
//!   proxy stops accepting; then SIGTERM drains in-flight requests (`--drain-deadline`).
//! * **Workload identity** (when [`Config::trust_anchors`] is set and the pod does not say
//!   `ballast.io/identity: disabled`): the proxy gets the trust anchors and the path of a
//!   projected service-account token, mounted from the volume `ballast-identity-token`
//!   into the proxy alone (see [`crate::identity`]). An opted-out pod's proxy still gets
//!   the anchors, to verify the control plane's TLS, but no token: no certificate, plain
//!   text to its peers. A pod that already has a volume of
//!   that name is skipped like a port clash, with or without identity, so that whether
//!   a pod is meshed never depends on whether the anchors happen to be loaded.
//! * **Tracing** (see [`crate::telemetry`]): with a collector (`--trace-collector`, or the
//!   pod's `ballast.io/trace-collector`, which wins; `none` turns it off for the pod) the
//!   proxy gets `OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_PROTOCOL` and a
//!   parent-based ratio sampler (`--trace-sampling` or `ballast.io/trace-sampling`, in
//!   percent); without one, no `OTEL_*` at all. `ballast.io/access-log-sampling` becomes
//!   `BALLAST_ACCESS_LOG_SAMPLING`, with or without tracing.

use std::collections::BTreeMap;
use std::sync::Arc;

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction, Lifecycle, LifecycleHandler,
    ObjectFieldSelector, Pod, Probe, ProjectedVolumeSource, ResourceRequirements, SeccompProfile,
    SecurityContext, ServiceAccountTokenProjection, SleepAction, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{Value, json};

use crate::annotations::{self, AnnotationError, Opt, Overrides};
use crate::identity;
use crate::telemetry::{self, TraceConfig};
use ballast_api::names;

/// Name of the init container that installs the iptables rules.
pub const INIT_CONTAINER: &str = "ballast-init";
/// Name of the proxy container.
pub const PROXY_CONTAINER: &str = "ballast-proxy";
/// Name of the proxy's admin port (metrics, health).
pub const ADMIN_PORT_NAME: &str = "ballast-admin";
/// Version recorded in the status annotation.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// What the injector puts into pods, from its flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Image of both `ballast-init` and `ballast-proxy` (one binary, two subcommands).
    pub proxy_image: String,
    /// `BALLAST_CONTROL_PLANE` for the proxy; `https://` when identity is on (checked at
    /// start, [`identity::check_control_plane_url`]).
    pub control_plane_url: String,
    /// Inject as a native sidecar unless the pod says otherwise.
    pub native_sidecar: bool,
    pub cpu_request: String,
    pub memory_request: String,
    /// No CPU limit by default: throttling a proxy adds latency to every request.
    pub cpu_limit: Option<String>,
    pub memory_limit: Option<String>,
    /// The mesh's trust anchors (PEM, checked by [`identity::parse_anchors`]): set, the
    /// proxy of every pod that does not opt out gets workload identity. The server sets
    /// it per review from the current trust anchors file.
    pub trust_anchors: Option<Arc<str>>,
    /// Tracing for every proxy (`--trace-collector` and friends); pods can override the
    /// collector and the sampling.
    pub trace: TraceConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            proxy_image: "ghcr.io/ballast-mesh/proxy:0.1.0".into(),
            control_plane_url: "http://ballast-control-plane.ballast-system.svc:8086".into(),
            native_sidecar: true,
            cpu_request: "10m".into(),
            memory_request: "20Mi".into(),
            cpu_limit: None,
            memory_limit: Some("256Mi".into()),
            trust_anchors: None,
            trace: TraceConfig::default(),
        }
    }
}

/// Why a pod is admitted without a sidecar.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Skip {
    #[error(
        "not opted in (annotation ballast.io/inject: enabled, or namespace label ballast.io/inject=enabled)"
    )]
    NotOptedIn,
    #[error("opted out with ballast.io/inject: disabled")]
    OptedOut,
    #[error("already injected")]
    AlreadyInjected,
    #[error("hostNetwork pods are not injected: interception would capture the node's own traffic")]
    HostNetwork,
    #[error(
        "container {container:?} uses port {port}, which the Ballast proxy needs; \
         move the app off 4140, 4143 and 4191 or set ballast.io/inject: disabled"
    )]
    PortTaken { container: String, port: i32 },
    #[error(
        "container {container:?} has a port named {ADMIN_PORT_NAME:?}, which the Ballast proxy's admin port uses; rename it"
    )]
    PortNameTaken { container: String },
    #[error(
        "the pod already has a volume named {:?}, which the Ballast proxy's identity token uses; rename it",
        identity::TOKEN_VOLUME
    )]
    VolumeNameTaken,
}

impl Skip {
    /// A warning for the user when the pod asked for the mesh and does not get it; `None`
    /// for the ordinary cases (not opted in, opted out, already injected).
    pub fn warning(&self) -> Option<String> {
        match self {
            Skip::NotOptedIn | Skip::OptedOut | Skip::AlreadyInjected => None,
            other => Some(format!("ballast: sidecar not injected: {other}")),
        }
    }

    /// A short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Skip::NotOptedIn => "not-opted-in",
            Skip::OptedOut => "opted-out",
            Skip::AlreadyInjected => "already-injected",
            Skip::HostNetwork => "host-network",
            Skip::PortTaken { .. } | Skip::PortNameTaken { .. } => "port-conflict",
            Skip::VolumeNameTaken => "volume-conflict",
        }
    }
}

/// The injector's answer for one pod.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Inject(Patch),
    Skip(Skip),
    /// Refuse the pod, with a message naming the annotation to fix.
    Deny(AnnotationError),
}

/// Whether the namespace's label matters for this pod, i.e. the pod does not decide for
/// itself; the server reads the label (an API call, cached) only then.
pub fn needs_namespace_label(pod: &Pod) -> bool {
    matches!(annotations::opt(&annotations_of(pod)), Ok(Opt::Unset))
}

/// Whether the pod leaves workload identity on (no `ballast.io/identity: disabled`); a
/// value that does not parse counts as on (such a pod is refused anyway).
pub fn wants_identity(pod: &Pod) -> bool {
    annotations_of(pod).get(annotations::IDENTITY).is_none_or(|v| v.trim() != "disabled")
}

/// Admission warnings for an injected pod whose tracing annotations are valid but
/// probably not what was meant: its own collector on the conventional port of the other
/// OTLP protocol than the injector's `--trace-collector-protocol`, or a sampling
/// percentage without any collector (it changes nothing).
pub fn trace_warnings(pod: &Pod, config: &Config) -> Vec<String> {
    let Ok(o) = Overrides::parse(&annotations_of(pod)) else { return Vec::new() };
    let mut out = Vec::new();
    if let Some(url) = o.trace_collector.as_ref().and_then(|c| c.url())
        && let Some(w) = telemetry::port_mismatch(url, config.trace.protocol)
    {
        out.push(format!("ballast: {}: {w}", annotations::TRACE_COLLECTOR));
    }
    let collector = match &o.trace_collector {
        Some(c) => c.url().is_some(),
        None => config.trace.collector.is_some(),
    };
    if o.trace_sampling.is_some() && !collector {
        out.push(format!(
            "ballast: {} has no effect: the proxy exports no traces (no --trace-collector on the injector, or {} is none)",
            annotations::TRACE_SAMPLING,
            annotations::TRACE_COLLECTOR
        ));
    }
    out
}

fn annotations_of(pod: &Pod) -> BTreeMap<String, String> {
    pod.metadata.annotations.clone().unwrap_or_default()
}

/// The decision for `pod`; `namespace_enabled` is whether its namespace carries
/// `ballast.io/inject=enabled` (only consulted when the pod does not say).
pub fn inject(pod: &Pod, namespace_enabled: bool, config: &Config) -> Decision {
    let annotations = annotations_of(pod);
    if annotations.contains_key(annotations::STATUS) || has_proxy(pod) {
        return Decision::Skip(Skip::AlreadyInjected);
    }
    match annotations::opt(&annotations) {
        Err(e) => return Decision::Deny(e),
        Ok(Opt::Out) => return Decision::Skip(Skip::OptedOut),
        Ok(Opt::Unset) if !namespace_enabled => return Decision::Skip(Skip::NotOptedIn),
        Ok(Opt::In | Opt::Unset) => {}
    }
    let Some(spec) = pod.spec.as_ref() else {
        // A Pod without a spec is not valid; nothing to inject into.
        return Decision::Skip(Skip::NotOptedIn);
    };
    if spec.host_network == Some(true) {
        return Decision::Skip(Skip::HostNetwork);
    }
    let app = spec.containers.iter().chain(spec.init_containers.iter().flatten());
    for c in app {
        for p in c.ports.iter().flatten() {
            if crate::PROXY_PORTS.iter().any(|&ours| i32::from(ours) == p.container_port) {
                return Decision::Skip(Skip::PortTaken { container: c.name.clone(), port: p.container_port });
            }
            if p.name.as_deref() == Some(ADMIN_PORT_NAME) {
                return Decision::Skip(Skip::PortNameTaken { container: c.name.clone() });
            }
        }
    }
    if spec.volumes.iter().flatten().any(|v| v.name == identity::TOKEN_VOLUME) {
        return Decision::Skip(Skip::VolumeNameTaken);
    }
    let overrides = match Overrides::parse(&annotations) {
        Ok(o) => o,
        Err(e) => return Decision::Deny(e),
    };
    Decision::Inject(patch(pod, &overrides, config))
}

fn has_proxy(pod: &Pod) -> bool {
    pod.spec.as_ref().is_some_and(|s| {
        s.containers.iter().chain(s.init_containers.iter().flatten()).any(|c| c.name == PROXY_CONTAINER)
    })
}

fn add(path: PointerBuf, value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation { path, value })
}

fn ptr<'a>(tokens: impl IntoIterator<Item = &'a str>) -> PointerBuf {
    PointerBuf::from_tokens(tokens)
}

fn patch(pod: &Pod, o: &Overrides, config: &Config) -> Patch {
    let native = o.native_sidecar.unwrap_or(config.native_sidecar);
    let anchors = config.trust_anchors.as_deref().filter(|_| o.identity != Some(false));
    let spec = pod.spec.as_ref();
    let mut ops = Vec::new();

    let init = serde_json::to_value(init_container(o, config)).unwrap_or(Value::Null);
    let proxy = serde_json::to_value(proxy_container(pod, o, config, native, anchors)).unwrap_or(Value::Null);
    let has_inits = spec.is_some_and(|s| s.init_containers.as_ref().is_some_and(|v| !v.is_empty()));
    if native {
        // Prepend, in reverse: the result is [ballast-init, ballast-proxy, app inits...].
        if has_inits {
            ops.push(add(ptr(["spec", "initContainers", "0"]), proxy));
            ops.push(add(ptr(["spec", "initContainers", "0"]), init));
        } else {
            ops.push(add(ptr(["spec", "initContainers"]), json!([init, proxy])));
        }
    } else {
        if has_inits {
            ops.push(add(ptr(["spec", "initContainers", "-"]), init));
        } else {
            ops.push(add(ptr(["spec", "initContainers"]), json!([init])));
        }
        ops.push(add(ptr(["spec", "containers", "0"]), proxy));
    }
    if anchors.is_some() {
        let volume = serde_json::to_value(token_volume()).unwrap_or(Value::Null);
        if spec.is_some_and(|s| s.volumes.is_some()) {
            ops.push(add(ptr(["spec", "volumes", "-"]), volume));
        } else {
            ops.push(add(ptr(["spec", "volumes"]), json!([volume])));
        }
    }

    let existing = annotations_of(pod);
    let mut new_annotations = BTreeMap::new();
    let status = json!({
        "version": VERSION,
        "initContainers": if native { json!([INIT_CONTAINER, PROXY_CONTAINER]) } else { json!([INIT_CONTAINER]) },
        "containers": if native { json!([]) } else { json!([PROXY_CONTAINER]) },
        "image": o.proxy_image.as_deref().unwrap_or(&config.proxy_image),
        "identity": anchors.is_some(),
    });
    new_annotations.insert(annotations::STATUS, status.to_string());
    let has_prometheus = existing.keys().any(|k| k.starts_with("prometheus.io/"));
    if !has_prometheus {
        new_annotations.insert(annotations::PROMETHEUS_SCRAPE, "true".into());
        new_annotations.insert(annotations::PROMETHEUS_PORT, names::ADMIN_PORT.to_string());
        new_annotations.insert(annotations::PROMETHEUS_PATH, "/metrics".into());
    }
    map_adds(&mut ops, "annotations", pod.metadata.annotations.is_some(), new_annotations);
    let labels = BTreeMap::from([(annotations::INJECTED_LABEL, "true".to_owned())]);
    map_adds(&mut ops, "labels", pod.metadata.labels.is_some(), labels);
    Patch(ops)
}

/// Adds entries to `metadata.<field>`: one `add` per key when the map exists (keys are
/// escaped, `/` as `~1`), else the whole map at once.
fn map_adds(ops: &mut Vec<PatchOperation>, field: &str, exists: bool, entries: BTreeMap<&str, String>) {
    if exists {
        for (k, v) in entries {
            ops.push(add(ptr(["metadata", field, k]), Value::String(v)));
        }
    } else {
        ops.push(add(ptr(["metadata", field]), json!(entries)));
    }
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector { field_path: path.into(), ..Default::default() }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar { name: name.into(), value: Some(value.into()), ..Default::default() }
}

fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(i32::from(names::ADMIN_PORT)),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(1),
        ..Default::default()
    }
}

fn resources(pairs: [(&str, Option<&str>); 2]) -> Option<BTreeMap<String, Quantity>> {
    let map: BTreeMap<_, _> =
        pairs.into_iter().filter_map(|(k, v)| v.map(|v| (k.to_owned(), Quantity(v.to_owned())))).collect();
    (!map.is_empty()).then_some(map)
}

fn restricted(user: i64, non_root: bool, add_caps: &[&str]) -> SecurityContext {
    SecurityContext {
        run_as_user: Some(user),
        run_as_group: Some(user),
        run_as_non_root: Some(non_root),
        allow_privilege_escalation: Some(false),
        // iptables-nft needs no lock file, so the init container too can be read-only.
        read_only_root_filesystem: Some(true),
        privileged: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: (!add_caps.is_empty()).then(|| add_caps.iter().map(|c| c.to_string()).collect()),
        }),
        seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..Default::default() }),
        ..Default::default()
    }
}

fn init_container(o: &Overrides, config: &Config) -> Container {
    let mut args = vec!["init".to_owned(), "--proxy-uid".to_owned(), names::PROXY_UID.to_string()];
    for (flag, values) in [
        ("--skip-inbound-ports", &o.skip_inbound_ports),
        ("--skip-outbound-ports", &o.skip_outbound_ports),
        ("--skip-outbound-cidrs", &o.skip_outbound_cidrs),
    ] {
        if !values.is_empty() {
            args.push(flag.to_owned());
            args.push(values.join(","));
        }
    }
    Container {
        name: INIT_CONTAINER.into(),
        image: Some(o.proxy_image.clone().unwrap_or_else(|| config.proxy_image.clone())),
        args: Some(args),
        // iptables needs root in the pod's network namespace, with only these two
        // capabilities; the container exits once the rules are installed.
        security_context: Some(restricted(0, false, &["NET_ADMIN", "NET_RAW"])),
        resources: Some(ResourceRequirements {
            requests: resources([("cpu", Some("10m")), ("memory", Some("10Mi"))]),
            limits: resources([("cpu", Some("100m")), ("memory", Some("50Mi"))]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The service the pod serves: the annotation, else the usual app labels.
fn service_of(pod: &Pod, o: &Overrides) -> Option<String> {
    if let Some(s) = &o.service {
        return Some(s.clone());
    }
    let labels = pod.metadata.labels.as_ref()?;
    ["app.kubernetes.io/name", "app"]
        .iter()
        .filter_map(|k| labels.get(*k))
        .find(|v| annotations::is_dns_label(v))
        .cloned()
}

/// The projected service-account token the proxy proves its identity with: bound to the
/// pod, for Ballast's audience only, renewed by the kubelet. Independent of the pod's
/// `automountServiceAccountToken`.
fn token_volume() -> Volume {
    let (_, file) = identity::token_mount();
    Volume {
        name: identity::TOKEN_VOLUME.into(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(vec![VolumeProjection {
                service_account_token: Some(ServiceAccountTokenProjection {
                    audience: Some(identity::TOKEN_AUDIENCE.into()),
                    expiration_seconds: Some(identity::TOKEN_EXPIRATION_SECONDS),
                    path: file.into(),
                }),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The app containers' plain-HTTP probes as `PORT:PATH`, for the proxy's
/// `--inbound-probes`: the kubelet has no mesh certificate, so under `inbound.mtls:
/// strict` or an allow list its probes would be refused. Named ports are resolved from
/// the container's ports; probes with a query or a comma in the path, HTTPS probes (the
/// app's own TLS, passed through) and unresolvable ports are left out.
fn http_probes(pod: &Pod) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for c in pod.spec.iter().flat_map(|s| s.containers.iter()) {
        let probes = [&c.liveness_probe, &c.readiness_probe, &c.startup_probe];
        for get in probes.into_iter().flatten().filter_map(|p| p.http_get.as_ref()) {
            if get.scheme.as_deref().is_some_and(|s| s.eq_ignore_ascii_case("https")) {
                continue;
            }
            let port = match &get.port {
                IntOrString::Int(p) => u16::try_from(*p).ok(),
                IntOrString::String(name) => c
                    .ports
                    .iter()
                    .flatten()
                    .find(|p| p.name.as_deref() == Some(name.as_str()))
                    .and_then(|p| u16::try_from(p.container_port).ok()),
            };
            let path = get.path.as_deref().unwrap_or("/");
            let path = if path.starts_with('/') { path.to_owned() } else { format!("/{path}") };
            if let Some(port) = port.filter(|p| *p > 0)
                && !path.contains(['?', ','])
            {
                let entry = format!("{port}:{path}");
                if !out.contains(&entry) {
                    out.push(entry);
                }
            }
        }
    }
    out
}

fn proxy_container(
    pod: &Pod,
    o: &Overrides,
    config: &Config,
    native: bool,
    anchors: Option<&str>,
) -> Container {
    let mut env_vars = vec![
        env("BALLAST_CONTROL_PLANE", config.control_plane_url.clone()),
        field_env("POD_NAME", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
        field_env("BALLAST_NAMESPACE", "metadata.namespace"),
        field_env("POD_SERVICE_ACCOUNT", "spec.serviceAccountName"),
        field_env("POD_IP", "status.podIP"),
    ];
    if let Some(service) = service_of(pod, o) {
        env_vars.push(env("BALLAST_SERVICE", service));
    }
    if let Some(level) = &o.log_level {
        env_vars.push(env("BALLAST_LOG", level.clone()));
    }
    let probes = http_probes(pod);
    if !probes.is_empty() {
        env_vars.push(env("BALLAST_INBOUND_PROBES", probes.join(",")));
    }
    if let Some(percent) = &o.access_log_sampling {
        env_vars.push(env("BALLAST_ACCESS_LOG_SAMPLING", percent.to_string()));
    }
    let otel = telemetry::otel_env(&config.trace, o.trace_collector.as_ref(), o.trace_sampling.as_ref());
    env_vars.extend(otel.into_iter().map(|(name, value)| env(name, value)));
    let mut volume_mounts = None;
    // The anchors go to every proxy when the mesh has them, also to a pod that opted out
    // of identity: its control plane serves TLS, which the proxy must verify. Without a
    // token the proxy gets no certificate of its own and speaks plain text to its peers.
    if let Some(pem) = config.trust_anchors.as_deref() {
        env_vars.push(env(identity::TRUST_ANCHORS_ENV, pem));
    }
    if anchors.is_some() {
        env_vars.push(env(identity::TOKEN_FILE_ENV, identity::TOKEN_PATH));
        volume_mounts = Some(vec![VolumeMount {
            name: identity::TOKEN_VOLUME.into(),
            mount_path: identity::token_mount().0.into(),
            read_only: Some(true),
            ..Default::default()
        }]);
    }
    let cpu_limit = o.cpu_limit.as_deref().or(config.cpu_limit.as_deref());
    let memory_limit = o.memory_limit.as_deref().or(config.memory_limit.as_deref());
    Container {
        name: PROXY_CONTAINER.into(),
        image: Some(o.proxy_image.clone().unwrap_or_else(|| config.proxy_image.clone())),
        args: Some(vec!["run".into()]),
        env: Some(env_vars),
        volume_mounts,
        ports: Some(vec![ContainerPort {
            name: Some(ADMIN_PORT_NAME.into()),
            container_port: i32::from(names::ADMIN_PORT),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        security_context: Some(restricted(i64::from(names::PROXY_UID), true, &[])),
        readiness_probe: Some(http_probe("/ready", 2, 3)),
        liveness_probe: Some(http_probe("/live", 10, 3)),
        startup_probe: Some(http_probe("/live", 1, 30)),
        lifecycle: Some(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                sleep: Some(SleepAction { seconds: 5 }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        resources: Some(ResourceRequirements {
            requests: resources([
                ("cpu", Some(o.cpu_request.as_deref().unwrap_or(&config.cpu_request))),
                ("memory", Some(o.memory_request.as_deref().unwrap_or(&config.memory_request))),
            ]),
            limits: resources([("cpu", cpu_limit), ("memory", memory_limit)]),
            ..Default::default()
        }),
        restart_policy: native.then(|| "Always".into()),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(yaml: &str) -> Pod {
        serde_saphyr::from_str(yaml).expect("test pod parses")
    }

    fn apply(pod: &Pod, patch: &Patch) -> Pod {
        let mut doc = serde_json::to_value(pod).expect("pod serialises");
        json_patch::patch(&mut doc, patch).expect("patch applies");
        serde_json::from_value(doc).expect("patched pod parses")
    }

    const APP: &str = "
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, annotations: {ballast.io/inject: enabled}, labels: {app: web}}
spec:
  initContainers: [{name: migrate, image: migrate:1}]
  containers: [{name: web, image: web:1, ports: [{containerPort: 8080}]}]
";

    #[test]
    fn native_sidecar_goes_before_the_apps_init_containers_and_keeps_them() {
        let p = pod(APP);
        let Decision::Inject(patch) = inject(&p, false, &Config::default()) else { panic!("not injected") };
        let out = apply(&p, &patch);
        let spec = out.spec.as_ref().expect("spec");
        let inits: Vec<_> = spec.init_containers.iter().flatten().map(|c| c.name.as_str()).collect();
        assert_eq!(inits, [INIT_CONTAINER, PROXY_CONTAINER, "migrate"]);
        assert_eq!(spec.containers.len(), 1);
        let proxy = &spec.init_containers.as_ref().expect("inits")[1];
        assert_eq!(proxy.restart_policy.as_deref(), Some("Always"));
        let env: Vec<_> = proxy.env.iter().flatten().map(|e| e.name.as_str()).collect();
        assert!(env.contains(&"POD_IP") && env.contains(&"BALLAST_SERVICE"), "{env:?}");
        let meta = &out.metadata;
        assert!(meta.annotations.as_ref().expect("annotations").contains_key(annotations::STATUS));
        assert_eq!(
            meta.labels.as_ref().and_then(|l| l.get(annotations::INJECTED_LABEL)).map(String::as_str),
            Some("true")
        );
        // Re-submitted, the injected pod gets no second sidecar.
        assert_eq!(inject(&out, true, &Config::default()), Decision::Skip(Skip::AlreadyInjected));
    }

    #[test]
    fn ordinary_container_mode_puts_init_last_and_proxy_first() {
        let p = pod(&APP.replace(
            "ballast.io/inject: enabled",
            "ballast.io/inject: enabled, ballast.io/native-sidecar: 'false'",
        ));
        let Decision::Inject(patch) = inject(&p, false, &Config::default()) else { panic!("not injected") };
        let out = apply(&p, &patch);
        let spec = out.spec.as_ref().expect("spec");
        let inits: Vec<_> = spec.init_containers.iter().flatten().map(|c| c.name.as_str()).collect();
        assert_eq!(inits, ["migrate", INIT_CONTAINER]);
        let names: Vec<_> = spec.containers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, [PROXY_CONTAINER, "web"]);
        assert_eq!(spec.containers[0].restart_policy, None);
    }

    #[test]
    fn opt_in_rules() {
        let unset = pod(
            "{apiVersion: v1, kind: Pod, metadata: {name: a}, spec: {containers: [{name: a, image: a}]}}",
        );
        assert_eq!(inject(&unset, false, &Config::default()), Decision::Skip(Skip::NotOptedIn));
        assert!(matches!(inject(&unset, true, &Config::default()), Decision::Inject(_)));
        assert!(needs_namespace_label(&unset));
        let out = pod(
            "{apiVersion: v1, kind: Pod, metadata: {name: a, annotations: {ballast.io/inject: disabled}}, spec: {containers: [{name: a, image: a}]}}",
        );
        assert_eq!(inject(&out, true, &Config::default()), Decision::Skip(Skip::OptedOut));
        assert!(!needs_namespace_label(&out));
        let typo = pod(
            "{apiVersion: v1, kind: Pod, metadata: {name: a, annotations: {ballast.io/inject: 'yes'}}, spec: {containers: [{name: a, image: a}]}}",
        );
        let Decision::Deny(e) = inject(&typo, true, &Config::default()) else { panic!("not denied") };
        assert!(e.to_string().contains("ballast.io/inject"), "{e}");
    }

    #[test]
    fn identity_gives_the_proxy_alone_the_anchors_and_a_projected_token() {
        let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let config = Config { trust_anchors: Some(pem.into()), ..Config::default() };
        let p = pod(&APP.replace("spec:\n", "spec:\n  automountServiceAccountToken: false\n"));
        let Decision::Inject(patch) = inject(&p, false, &config) else { panic!("not injected") };
        let out = apply(&p, &patch);
        let spec = out.spec.as_ref().expect("spec");
        let proxy = spec.init_containers.iter().flatten().find(|c| c.name == PROXY_CONTAINER).expect("proxy");
        let env = |n: &str| proxy.env.iter().flatten().find(|e| e.name == n).and_then(|e| e.value.clone());
        assert_eq!(env(identity::TRUST_ANCHORS_ENV).as_deref(), Some(pem));
        assert_eq!(env(identity::TOKEN_FILE_ENV).as_deref(), Some(identity::TOKEN_PATH));
        let mount = &proxy.volume_mounts.as_ref().expect("mounts")[0];
        assert_eq!(
            (mount.name.as_str(), mount.mount_path.as_str(), mount.read_only),
            (identity::TOKEN_VOLUME, "/var/run/secrets/ballast.io/serviceaccount", Some(true))
        );
        let volume = &spec.volumes.as_ref().expect("volumes")[0];
        let token = volume.projected.as_ref().and_then(|p| p.sources.as_ref()).expect("projected")[0]
            .service_account_token
            .clone()
            .expect("token");
        assert_eq!(token.audience.as_deref(), Some(identity::TOKEN_AUDIENCE));
        assert_eq!(token.path, "token");
        // The app's containers get nothing of it.
        assert!(spec.containers[0].volume_mounts.is_none());

        // Opted out: a plain proxy, no volume.
        let out_pod = pod(&APP.replace(
            "ballast.io/inject: enabled",
            "ballast.io/inject: enabled, ballast.io/identity: disabled",
        ));
        let Decision::Inject(patch) = inject(&out_pod, false, &config) else { panic!("not injected") };
        assert!(!wants_identity(&out_pod));
        let out = apply(&out_pod, &patch);
        assert!(out.spec.as_ref().expect("spec").volumes.is_none());
        let text = serde_json::to_string(&patch).expect("json");
        assert!(!text.contains(identity::TOKEN_FILE_ENV) && !text.contains(identity::TOKEN_VOLUME), "{text}");
        // It still verifies the control plane, which serves TLS: the anchors are there.
        assert!(text.contains(identity::TRUST_ANCHORS_ENV), "{text}");
    }

    #[test]
    fn tracing_env_from_the_flags_and_the_pods_annotations() {
        let proxy_env = |p: &Pod, config: &Config| -> Vec<(String, Option<String>)> {
            let Decision::Inject(patch) = inject(p, false, config) else { panic!("not injected") };
            let out = apply(p, &patch);
            let spec = out.spec.expect("spec");
            let proxy = spec.init_containers.into_iter().flatten().find(|c| c.name == PROXY_CONTAINER);
            proxy.and_then(|c| c.env).unwrap_or_default().into_iter().map(|e| (e.name, e.value)).collect()
        };
        let get = |env: &[(String, Option<String>)], n: &str| {
            env.iter().find(|(k, _)| k == n).and_then(|(_, v)| v.clone())
        };
        let plain = pod(APP);
        let off = Config::default();
        let env = proxy_env(&plain, &off);
        assert!(
            !env.iter().any(|(k, _)| k.starts_with("OTEL_") || k == "BALLAST_ACCESS_LOG_SAMPLING"),
            "{env:?}"
        );

        let on = Config {
            trace: TraceConfig {
                collector: Some("http://otel-agent.observability.svc:4317".into()),
                ..TraceConfig::default()
            },
            ..Config::default()
        };
        let env = proxy_env(&plain, &on);
        assert_eq!(
            get(&env, "OTEL_EXPORTER_OTLP_ENDPOINT").as_deref(),
            Some("http://otel-agent.observability.svc:4317")
        );
        assert_eq!(get(&env, "OTEL_EXPORTER_OTLP_PROTOCOL").as_deref(), Some("grpc"));
        assert_eq!(get(&env, "OTEL_TRACES_SAMPLER").as_deref(), Some("parentbased_traceidratio"));
        assert_eq!(get(&env, "OTEL_TRACES_SAMPLER_ARG").as_deref(), Some("0.01"));
        assert!(trace_warnings(&plain, &on).is_empty());

        let annotated = |extra: &str| {
            pod(&APP.replace("ballast.io/inject: enabled", &format!("ballast.io/inject: enabled, {extra}")))
        };
        let tuned = annotated(
            "ballast.io/trace-collector: 'http://tempo.tracing.svc:4318', ballast.io/trace-sampling: '50', ballast.io/access-log-sampling: '10'",
        );
        let env = proxy_env(&tuned, &on);
        assert_eq!(
            get(&env, "OTEL_EXPORTER_OTLP_ENDPOINT").as_deref(),
            Some("http://tempo.tracing.svc:4318")
        );
        assert_eq!(get(&env, "OTEL_TRACES_SAMPLER_ARG").as_deref(), Some("0.5"));
        assert_eq!(get(&env, "BALLAST_ACCESS_LOG_SAMPLING").as_deref(), Some("10"));
        // 4318 is OTLP/HTTP's port, and the injector says grpc: a warning, not a refusal.
        let w = trace_warnings(&tuned, &on);
        assert!(
            w.len() == 1 && w[0].contains("4318") && w[0].contains(annotations::TRACE_COLLECTOR),
            "{w:?}"
        );

        // none: no tracing for this pod, whatever the flag says; its access log still sampled.
        let none = annotated("ballast.io/trace-collector: none, ballast.io/access-log-sampling: '0'");
        let env = proxy_env(&none, &on);
        assert!(!env.iter().any(|(k, _)| k.starts_with("OTEL_")), "{env:?}");
        assert_eq!(get(&env, "BALLAST_ACCESS_LOG_SAMPLING").as_deref(), Some("0"));
        let sampled_only = annotated("ballast.io/trace-sampling: '5'");
        assert!(!proxy_env(&sampled_only, &off).iter().any(|(k, _)| k.starts_with("OTEL_")));
        let w = trace_warnings(&sampled_only, &off);
        assert!(w.len() == 1 && w[0].contains("no effect"), "{w:?}");

        let https = annotated("ballast.io/trace-collector: 'https://collector:4317'");
        let Decision::Deny(e) = inject(&https, false, &on) else { panic!("not denied") };
        assert_eq!(e.annotation, annotations::TRACE_COLLECTOR);
    }

    #[test]
    fn conflicting_ports_and_host_network_are_skipped_with_a_warning() {
        let p = pod(&APP.replace("containerPort: 8080", "containerPort: 4191"));
        let d = inject(&p, false, &Config::default());
        let Decision::Skip(skip) = d else { panic!("{d:?}") };
        assert!(skip.warning().is_some_and(|w| w.contains("4191")), "{skip:?}");
        let p = pod(&APP.replace("containerPort: 8080", "containerPort: 8080, name: ballast-admin"));
        assert!(matches!(inject(&p, false, &Config::default()), Decision::Skip(Skip::PortNameTaken { .. })));
        let p = pod(&APP.replace("spec:\n", "spec:\n  hostNetwork: true\n"));
        assert_eq!(inject(&p, false, &Config::default()), Decision::Skip(Skip::HostNetwork));
        let p = pod(
            &APP.replace("spec:\n", "spec:\n  volumes: [{name: ballast-identity-token, emptyDir: {}}]\n")
        );
        let d = inject(&p, false, &Config::default());
        assert_eq!(d, Decision::Skip(Skip::VolumeNameTaken));
        assert!(Skip::VolumeNameTaken.warning().is_some_and(|w| w.contains(identity::TOKEN_VOLUME)));
    }
}
