//! The `ballast.io/*` annotations and labels that opt a pod in and tune its sidecar
//! (DESIGN §6), and their parsing.
//!
//! A value that does not parse is an error naming the annotation and the value: the
//! webhook then refuses the pod with that message rather than injecting something else
//! than what was asked for. Whoever wrote `ballast.io/proxy-memory-limit: 64MB` wants to
//! hear that `MB` is not a Kubernetes unit, not to find a pod without limits later.

use std::collections::BTreeMap;

use crate::telemetry::{Collector, Percent};

/// `enabled` or `disabled` on a pod; the label `ballast.io/inject=enabled` on a namespace.
pub const INJECT: &str = "ballast.io/inject";
/// Written by the injector: what it injected (JSON, with the version). Its presence is how
/// a re-submitted pod is recognised as already injected.
pub const STATUS: &str = "ballast.io/status";
/// Label on every injected pod, for PodMonitors and `kubectl get pods -l`.
pub const INJECTED_LABEL: &str = "ballast.io/injected";
/// The proxy image for this pod, instead of the injector's `--proxy-image`.
pub const PROXY_IMAGE: &str = "ballast.io/proxy-image";
pub const PROXY_CPU_REQUEST: &str = "ballast.io/proxy-cpu-request";
pub const PROXY_CPU_LIMIT: &str = "ballast.io/proxy-cpu-limit";
pub const PROXY_MEMORY_REQUEST: &str = "ballast.io/proxy-memory-request";
pub const PROXY_MEMORY_LIMIT: &str = "ballast.io/proxy-memory-limit";
/// The proxy's log filter (`BALLAST_LOG`), e.g. `debug` or `info,ballast_sidecar=trace`.
pub const LOG_LEVEL: &str = "ballast.io/log-level";
/// Comma-separated ports (or ranges `9000:9100`) that interception leaves alone.
pub const SKIP_INBOUND_PORTS: &str = "ballast.io/skip-inbound-ports";
pub const SKIP_OUTBOUND_PORTS: &str = "ballast.io/skip-outbound-ports";
/// Comma-separated IPv4 CIDRs that outbound interception leaves alone.
pub const SKIP_OUTBOUND_CIDRS: &str = "ballast.io/skip-outbound-cidrs";
/// The mesh service this pod serves (the sidecar's `--service`); defaults to the pod's
/// `app.kubernetes.io/name` or `app` label.
pub const SERVICE: &str = "ballast.io/service";
/// `true` (default) injects the proxy as a native sidecar (an init container with
/// `restartPolicy: Always`, Kubernetes ≥ 1.29); `false` as an ordinary container.
pub const NATIVE_SIDECAR: &str = "ballast.io/native-sidecar";
/// `disabled` opts the pod out of workload identity: its proxy gets no token (so no
/// certificate of its own) and speaks plain text to its peers; it keeps the trust anchors,
/// to verify the control plane's TLS. `enabled` (the default) takes identity
/// whenever the injector has the mesh's trust anchors (see [`crate::identity`]).
pub const IDENTITY: &str = "ballast.io/identity";
/// The OpenTelemetry collector this pod's proxy exports spans to (`http://HOST:PORT`),
/// instead of the injector's `--trace-collector`; `none` or empty: no tracing for this
/// pod (see [`crate::telemetry`]).
pub const TRACE_COLLECTOR: &str = "ballast.io/trace-collector";
/// Percentage of new traces this pod's proxy samples (0-100, e.g. `1`, `0.5`), instead
/// of the injector's `--trace-sampling`; only with a collector.
pub const TRACE_SAMPLING: &str = "ballast.io/trace-sampling";
/// Percentage of requests this pod's proxy writes to its access log (0-100;
/// `BALLAST_ACCESS_LOG_SAMPLING`, default 100).
pub const ACCESS_LOG_SAMPLING: &str = "ballast.io/access-log-sampling";

/// Prometheus' conventional scrape annotations, set unless the pod already has its own.
pub const PROMETHEUS_SCRAPE: &str = "prometheus.io/scrape";
pub const PROMETHEUS_PORT: &str = "prometheus.io/port";
pub const PROMETHEUS_PATH: &str = "prometheus.io/path";

/// A `ballast.io/*` annotation whose value cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("annotation {annotation}: {value:?} {problem}")]
pub struct AnnotationError {
    pub annotation: &'static str,
    pub value: String,
    pub problem: String,
}

fn bad(annotation: &'static str, value: &str, problem: impl Into<String>) -> AnnotationError {
    AnnotationError { annotation, value: value.to_owned(), problem: problem.into() }
}

/// What the pod asks for with `ballast.io/inject`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opt {
    In,
    Out,
    /// Not said: the namespace's label decides.
    Unset,
}

pub fn opt(annotations: &BTreeMap<String, String>) -> Result<Opt, AnnotationError> {
    match annotations.get(INJECT).map(|v| v.trim()) {
        None => Ok(Opt::Unset),
        Some("enabled") => Ok(Opt::In),
        Some("disabled") => Ok(Opt::Out),
        Some(other) => Err(bad(INJECT, other, "is not one of: enabled, disabled")),
    }
}

/// The per-pod settings read from annotations, each checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    pub proxy_image: Option<String>,
    pub cpu_request: Option<String>,
    pub cpu_limit: Option<String>,
    pub memory_request: Option<String>,
    pub memory_limit: Option<String>,
    pub log_level: Option<String>,
    pub skip_inbound_ports: Vec<String>,
    pub skip_outbound_ports: Vec<String>,
    pub skip_outbound_cidrs: Vec<String>,
    pub service: Option<String>,
    pub native_sidecar: Option<bool>,
    /// `Some(false)`: opted out of workload identity.
    pub identity: Option<bool>,
    /// `None`: not said, the injector's `--trace-collector` applies.
    pub trace_collector: Option<Collector>,
    pub trace_sampling: Option<Percent>,
    pub access_log_sampling: Option<Percent>,
}

impl Overrides {
    pub fn parse(annotations: &BTreeMap<String, String>) -> Result<Self, AnnotationError> {
        let get = |k: &str| annotations.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
        let quantity = |k: &'static str| -> Result<Option<String>, AnnotationError> {
            get(k)
                .map(|v| {
                    if is_quantity(v) {
                        Ok(v.to_owned())
                    } else {
                        Err(bad(k, v, "is not a Kubernetes quantity (such as 100m, 0.5, 64Mi, 1Gi)"))
                    }
                })
                .transpose()
        };
        let list = |k: &'static str, check: fn(&str) -> Result<String, String>| {
            get(k).map_or(Ok(Vec::new()), |v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| check(s).map_err(|problem| bad(k, s, problem)))
                    .collect::<Result<Vec<_>, _>>()
            })
        };
        let proxy_image = get(PROXY_IMAGE)
            .map(|v| {
                if v.chars().any(char::is_whitespace) {
                    Err(bad(PROXY_IMAGE, v, "is not an image reference (it contains white space)"))
                } else {
                    Ok(v.to_owned())
                }
            })
            .transpose()?;
        let log_level = get(LOG_LEVEL)
            .map(|v| {
                if v.chars().all(|c| c.is_ascii_alphanumeric() || "_=,:.-".contains(c)) {
                    Ok(v.to_owned())
                } else {
                    Err(bad(LOG_LEVEL, v, "is not a log filter such as debug or info,ballast_sidecar=trace"))
                }
            })
            .transpose()?;
        let service = get(SERVICE)
            .map(|v| {
                if is_dns_label(v) {
                    Ok(v.to_owned())
                } else {
                    Err(bad(SERVICE, v, "is not a service name (a DNS label: a-z, 0-9, '-', at most 63)"))
                }
            })
            .transpose()?;
        let native_sidecar = get(NATIVE_SIDECAR)
            .map(|v| match v {
                "true" => Ok(true),
                "false" => Ok(false),
                _ => Err(bad(NATIVE_SIDECAR, v, "is not true or false")),
            })
            .transpose()?;
        let identity = get(IDENTITY)
            .map(|v| match v {
                "enabled" => Ok(true),
                "disabled" => Ok(false),
                _ => Err(bad(IDENTITY, v, "is not one of: enabled, disabled")),
            })
            .transpose()?;
        // Read as it is: an empty value says "no tracing", unlike an absent one.
        let trace_collector = annotations
            .get(TRACE_COLLECTOR)
            .map(|v| Collector::parse(v).map_err(|problem| bad(TRACE_COLLECTOR, v.trim(), problem)))
            .transpose()?;
        let percent = |k: &'static str| {
            get(k).map(|v| Percent::parse(v).map_err(|problem| bad(k, v, problem))).transpose()
        };
        Ok(Self {
            proxy_image,
            cpu_request: quantity(PROXY_CPU_REQUEST)?,
            cpu_limit: quantity(PROXY_CPU_LIMIT)?,
            memory_request: quantity(PROXY_MEMORY_REQUEST)?,
            memory_limit: quantity(PROXY_MEMORY_LIMIT)?,
            log_level,
            skip_inbound_ports: list(SKIP_INBOUND_PORTS, port_spec)?,
            skip_outbound_ports: list(SKIP_OUTBOUND_PORTS, port_spec)?,
            skip_outbound_cidrs: list(SKIP_OUTBOUND_CIDRS, cidr_spec)?,
            service,
            native_sidecar,
            identity,
            trace_collector,
            trace_sampling: percent(TRACE_SAMPLING)?,
            access_log_sampling: percent(ACCESS_LOG_SAMPLING)?,
        })
    }
}

/// A port or a range (`9000:9100` or `9000-9100`), as `ballast-sidecar init` takes it.
fn port_spec(s: &str) -> Result<String, String> {
    let port = |p: &str| match p.parse::<u16>() {
        Ok(0) | Err(_) => Err("is not a port (1-65535) or a range such as 9000:9100".to_owned()),
        Ok(p) => Ok(p),
    };
    match s.split_once([':', '-']) {
        None => port(s).map(|p| p.to_string()),
        Some((a, b)) => {
            let (lo, hi) = (port(a)?, port(b)?);
            if hi < lo {
                return Err("is a range that ends before it starts".into());
            }
            Ok(format!("{lo}:{hi}"))
        }
    }
}

/// An IPv4 address or CIDR (interception is IPv4 only for now).
fn cidr_spec(s: &str) -> Result<String, String> {
    let (ip, len) = s.split_once('/').map_or((s, None), |(a, b)| (a, Some(b)));
    let problem = || "is not an IPv4 CIDR such as 10.0.0.0/8".to_owned();
    ip.parse::<std::net::Ipv4Addr>().map_err(|_| problem())?;
    let len = match len {
        None => 32,
        Some(l) => l.parse::<u8>().ok().filter(|l| *l <= 32).ok_or_else(problem)?,
    };
    Ok(format!("{ip}/{len}"))
}

pub(crate) fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Kubernetes' quantity syntax (`resource.Quantity`): a decimal number and an optional
/// binary (`Ki`..`Ei`) or decimal (`n`, `u`, `m`, `k`, `M`..`E`) suffix or exponent.
pub fn is_quantity(s: &str) -> bool {
    let s = s.strip_prefix(['+', '-']).unwrap_or(s);
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    let digits = num.bytes().filter(u8::is_ascii_digit).count();
    if digits == 0 || num.matches('.').count() > 1 {
        return false;
    }
    match suffix {
        "" | "n" | "u" | "m" | "k" | "M" | "G" | "T" | "P" | "E" | "Ki" | "Mi" | "Gi" | "Ti" | "Pi"
        | "Ei" => true,
        _ => suffix
            .strip_prefix(['e', 'E'])
            .map(|exp| exp.strip_prefix(['+', '-']).unwrap_or(exp))
            .is_some_and(|exp| !exp.is_empty() && exp.bytes().all(|b| b.is_ascii_digit())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn quantities() {
        for ok in ["100m", "0.5", "1", "64Mi", "1Gi", "1e3", "2E-2", "+1k", ".5"] {
            assert!(is_quantity(ok), "{ok}");
        }
        for bad in ["", "MB", "64MB", "1.2.3", "Mi", "1e", "ten", "1 Gi"] {
            assert!(!is_quantity(bad), "{bad}");
        }
    }

    #[test]
    fn overrides_parse_and_name_the_bad_annotation() {
        let o = Overrides::parse(&ann(&[
            (PROXY_MEMORY_LIMIT, "128Mi"),
            (SKIP_INBOUND_PORTS, "9090, 9000-9100"),
            (SKIP_OUTBOUND_CIDRS, "10.0.0.0/8,169.254.169.254"),
            (NATIVE_SIDECAR, "false"),
        ]))
        .expect("valid");
        assert_eq!(o.memory_limit.as_deref(), Some("128Mi"));
        assert_eq!(o.skip_inbound_ports, ["9090", "9000:9100"]);
        assert_eq!(o.skip_outbound_cidrs, ["10.0.0.0/8", "169.254.169.254/32"]);
        assert_eq!(o.native_sidecar, Some(false));

        let e = Overrides::parse(&ann(&[(PROXY_MEMORY_LIMIT, "64MB")])).unwrap_err();
        assert_eq!(e.annotation, PROXY_MEMORY_LIMIT);
        assert!(e.to_string().contains("\"64MB\""), "{e}");
        let e = Overrides::parse(&ann(&[(SKIP_OUTBOUND_PORTS, "80,0")])).unwrap_err();
        assert_eq!((e.annotation, e.value.as_str()), (SKIP_OUTBOUND_PORTS, "0"));
        let e = Overrides::parse(&ann(&[(SKIP_OUTBOUND_CIDRS, "10.0.0.0/33")])).unwrap_err();
        assert_eq!(e.annotation, SKIP_OUTBOUND_CIDRS);
        assert!(Overrides::parse(&ann(&[(SERVICE, "Payments")])).is_err());
        assert!(Overrides::parse(&ann(&[(LOG_LEVEL, "debug; rm -rf /")])).is_err());
        assert_eq!(Overrides::parse(&ann(&[(IDENTITY, "disabled")])).map(|o| o.identity), Ok(Some(false)));
        assert_eq!(Overrides::parse(&ann(&[(IDENTITY, "enabled")])).map(|o| o.identity), Ok(Some(true)));
        let e = Overrides::parse(&ann(&[(IDENTITY, "off")])).unwrap_err();
        assert_eq!((e.annotation, e.value.as_str()), (IDENTITY, "off"));
    }

    #[test]
    fn tracing_annotations() {
        let o = Overrides::parse(&ann(&[
            (TRACE_COLLECTOR, " http://otel-agent.observability.svc:4317 "),
            (TRACE_SAMPLING, "12.5"),
            (ACCESS_LOG_SAMPLING, "5%"),
        ]))
        .expect("valid");
        assert_eq!(
            o.trace_collector,
            Some(Collector::Url("http://otel-agent.observability.svc:4317".into()))
        );
        assert_eq!(o.trace_sampling.as_ref().map(Percent::ratio).as_deref(), Some("0.125"));
        assert_eq!(o.access_log_sampling.as_ref().map(ToString::to_string).as_deref(), Some("5"));
        for off in ["none", "", "  "] {
            let o = Overrides::parse(&ann(&[(TRACE_COLLECTOR, off)])).expect("valid");
            assert_eq!(o.trace_collector, Some(Collector::Disabled), "{off:?}");
        }
        let o = Overrides::parse(&ann(&[])).expect("valid");
        assert_eq!((o.trace_collector, o.trace_sampling, o.access_log_sampling), (None, None, None));
        // An empty percentage is not said, like the other annotations.
        assert_eq!(Overrides::parse(&ann(&[(TRACE_SAMPLING, "")])).map(|o| o.trace_sampling), Ok(None));

        let e = Overrides::parse(&ann(&[(TRACE_COLLECTOR, "https://collector:4317")])).unwrap_err();
        assert_eq!((e.annotation, e.value.as_str()), (TRACE_COLLECTOR, "https://collector:4317"));
        assert!(e.to_string().contains("plain http"), "{e}");
        let e = Overrides::parse(&ann(&[(TRACE_COLLECTOR, "otel-collector:4317")])).unwrap_err();
        assert_eq!(e.annotation, TRACE_COLLECTOR);
        let e = Overrides::parse(&ann(&[(TRACE_SAMPLING, "150")])).unwrap_err();
        assert_eq!((e.annotation, e.value.as_str()), (TRACE_SAMPLING, "150"));
        assert!(e.to_string().contains("0 to 100"), "{e}");
        let e = Overrides::parse(&ann(&[(ACCESS_LOG_SAMPLING, "0.5x")])).unwrap_err();
        assert_eq!(e.annotation, ACCESS_LOG_SAMPLING);
    }

    #[test]
    fn opt_in_values() {
        assert_eq!(opt(&ann(&[])), Ok(Opt::Unset));
        assert_eq!(opt(&ann(&[(INJECT, "enabled")])), Ok(Opt::In));
        assert_eq!(opt(&ann(&[(INJECT, "disabled")])), Ok(Opt::Out));
        assert!(opt(&ann(&[(INJECT, "true")])).is_err());
    }
}
