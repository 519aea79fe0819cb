//! The `ResiliencePolicy` resource (DESIGN §4).
//!
//! Every field is optional and a missing section turns that mechanism off. Unknown fields
//! are rejected rather than ignored: a misspelt `retires:` silently doing nothing is the
//! worst failure a resilience policy can have. [`ResiliencePolicy::validate`] is the one
//! validation used by `ballastctl`, the control plane and the sidecar.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{Duration, FieldError, ObjectMeta};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResiliencePolicy {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: PolicySpec,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
pub struct PolicySpec {
    pub target_ref: TargetRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<Timeouts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<Retries>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreaker>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bulkhead: Option<Bulkhead>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inbound: Option<Inbound>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(feature = "crd", schemars(length(max = crate::crd::MAX_ROUTES)))]
    pub routes: Vec<Route>,
    /// Faults injected by the calling sidecar before a request leaves it, for chaos tests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub faults: Option<Faults>,
    /// Trace and access-log sampling for requests to this service, overriding the
    /// sidecars' flags (`OTEL_TRACES_SAMPLER_ARG`, `--access-log-sampling`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub telemetry: Option<Telemetry>,
}

/// Sampling of the service's telemetry, as Istio's `Telemetry` resource does it per
/// workload: applied by every sidecar that handles a request of this service, the
/// callers' (outbound) and the service's own (inbound).
///
/// `tracingSamplingPercent` decides only for requests that arrive without a sampling
/// decision (no `traceparent`/B3 from upstream): a caller's decision is always followed,
/// so a trace is never cut in half. It takes effect only on sidecars that export traces
/// (`OTEL_EXPORTER_OTLP_ENDPOINT` set).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
pub struct Telemetry {
    /// Share of new traces sampled, 0-100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "crd", schemars(range(min = 0.0, max = 100.0)))]
    pub tracing_sampling_percent: Option<f64>,
    /// Share of requests written to the access log, 0-100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "crd", schemars(range(min = 0.0, max = 100.0)))]
    pub access_log_sampling_percent: Option<f64>,
}

/// Fault injection (as Istio's `fault`): a share of requests is delayed, a share is
/// answered with an error status, before leaving the calling sidecar. Injected aborts are
/// marked `ballast-fault: abort` so nobody mistakes them for a real upstream failure.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
pub struct Faults {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<DelayFault>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<AbortFault>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
pub struct DelayFault {
    /// Share of requests delayed, 0-100.
    #[cfg_attr(feature = "crd", schemars(range(min = 0.0, max = 100.0)))]
    pub percent: f64,
    pub duration: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
pub struct AbortFault {
    /// Share of requests aborted, 0-100.
    #[cfg_attr(feature = "crd", schemars(range(min = 0.0, max = 100.0)))]
    pub percent: f64,
    /// HTTP status of the injected response, 400-599.
    #[cfg_attr(feature = "crd", schemars(range(min = 400, max = 599)))]
    pub status: u16,
}

/// The service a policy applies to. `namespace` defaults to the policy's own.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
pub struct TargetRef {
    #[cfg_attr(feature = "crd", schemars(length(max = 63), regex(pattern = crate::crd::DNS_LABEL)))]
    pub service: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "crd", schemars(length(max = 63), regex(pattern = crate::crd::DNS_LABEL)))]
    pub namespace: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "crd", schemars(transform = crate::crd::cel::timeouts))]
pub struct Timeouts {
    /// Covers the whole request, every try and backoff included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "crd", schemars(schema_with = "crate::crd::optional_positive_duration"))]
    pub request: Option<Duration>,
    /// Bounds each try.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "crd", schemars(schema_with = "crate::crd::optional_positive_duration"))]
    pub per_try: Option<Duration>,
    /// Bounds establishing an upstream connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "crd", schemars(schema_with = "crate::crd::optional_positive_duration"))]
    pub connect: Option<Duration>,
    /// Closes connections idle for this long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "crd", schemars(schema_with = "crate::crd::optional_positive_duration"))]
    pub idle: Option<Duration>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
pub struct Retries {
    /// Retries after the first try (Envoy's `num_retries`): `attempts: 3` is up to 4 tries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "crd", schemars(range(max = 10)))]
    pub attempts: Option<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub on: Vec<RetryOn>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Backoff>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<RetryBudget>,
    /// Also retry requests whose method is not idempotent (POST, PATCH, ...). Off by
    /// default: only GET, HEAD, OPTIONS, TRACE, PUT and DELETE are retried, and gRPC calls
    /// when a `grpc:*` condition is listed. Set it on a route for the calls that are safe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub non_idempotent: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "crd", schemars(transform = crate::crd::cel::backoff))]
pub struct Backoff {
    #[cfg_attr(feature = "crd", schemars(schema_with = "crate::crd::positive_duration"))]
    pub base: Duration,
    pub max: Duration,
}

/// Largest `retries.budget.minPerSecond` a policy may ask for.
pub const MAX_RETRY_MIN_PER_SECOND: u32 = 1_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
pub struct RetryBudget {
    /// Retries allowed per original request over the window, in [0, 1].
    #[cfg_attr(feature = "crd", schemars(range(min = 0.0, max = 1.0)))]
    pub ratio: f64,
    /// Retries per second always allowed, so low-traffic services can still retry.
    #[serde(default)]
    #[cfg_attr(feature = "crd", schemars(range(max = MAX_RETRY_MIN_PER_SECOND)))]
    pub min_per_second: u32,
}

/// A condition under which a failed try is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RetryOn {
    /// Any 5xx response.
    ServerError,
    /// 502, 503 or 504.
    GatewayError,
    /// The connection or stream was reset before a response.
    Reset,
    /// No connection could be made.
    ConnectFailure,
    /// This exact status code.
    RetriableStatus(u16),
    /// A gRPC status (in a trailers-only response).
    Grpc(GrpcCode),
}

/// gRPC status codes that may be retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GrpcCode {
    Cancelled = 1,
    DeadlineExceeded = 4,
    ResourceExhausted = 8,
    Unavailable = 14,
}

impl FromStr for RetryOn {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "5xx" => RetryOn::ServerError,
            "gateway-error" => RetryOn::GatewayError,
            "reset" => RetryOn::Reset,
            "connect-failure" => RetryOn::ConnectFailure,
            "grpc:unavailable" => RetryOn::Grpc(GrpcCode::Unavailable),
            "grpc:resource-exhausted" => RetryOn::Grpc(GrpcCode::ResourceExhausted),
            "grpc:cancelled" => RetryOn::Grpc(GrpcCode::Cancelled),
            "grpc:deadline-exceeded" => RetryOn::Grpc(GrpcCode::DeadlineExceeded),
            other => match other.strip_prefix("retriable-status:") {
                Some(code) => match code.parse::<u16>() {
                    Ok(c) if (100..=599).contains(&c) => RetryOn::RetriableStatus(c),
                    _ => {
                        return Err(format!(
                            "retriable-status needs an HTTP status code 100-599, got {code:?}"
                        ));
                    }
                },
                None => {
                    return Err(format!(
                        "unknown retry condition {other:?}; expected one of 5xx, gateway-error, reset, \
                         connect-failure, retriable-status:CODE, grpc:unavailable, grpc:resource-exhausted, \
                         grpc:cancelled, grpc:deadline-exceeded"
                    ));
                }
            },
        })
    }
}

impl fmt::Display for RetryOn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RetryOn::ServerError => f.write_str("5xx"),
            RetryOn::GatewayError => f.write_str("gateway-error"),
            RetryOn::Reset => f.write_str("reset"),
            RetryOn::ConnectFailure => f.write_str("connect-failure"),
            RetryOn::RetriableStatus(c) => write!(f, "retriable-status:{c}"),
            RetryOn::Grpc(GrpcCode::Unavailable) => f.write_str("grpc:unavailable"),
            RetryOn::Grpc(GrpcCode::ResourceExhausted) => f.write_str("grpc:resource-exhausted"),
            RetryOn::Grpc(GrpcCode::Cancelled) => f.write_str("grpc:cancelled"),
            RetryOn::Grpc(GrpcCode::DeadlineExceeded) => f.write_str("grpc:deadline-exceeded"),
        }
    }
}

/// Types that travel as one string in YAML, parsed with [`FromStr`].
macro_rules! string_serde {
    ($t:ty, $what:literal) => {
        impl Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl serde::de::Visitor<'_> for V {
                    type Value = $t;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str($what)
                    }
                    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<$t, E> {
                        v.parse().map_err(E::custom)
                    }
                    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<$t, E> {
                        self.visit_str(&v.to_string())
                    }
                }
                d.deserialize_any(V)
            }
        }
    };
}
string_serde!(RetryOn, "a retry condition such as gateway-error");
string_serde!(LoadBalancer, "a load balancer name such as peak-ewma");

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "crd", schemars(transform = crate::crd::cel::circuit_breaker))]
pub struct CircuitBreaker {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "crd", schemars(range(min = 1)))]
    pub consecutive_failures: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_rate: Option<FailureRate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_for: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_open_for: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "crd", schemars(range(min = 1)))]
    pub half_open_requests: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
pub struct FailureRate {
    /// In (0, 1].
    #[cfg_attr(feature = "crd", schemars(range(min = 0.0, max = 1.0), extend("exclusiveMinimum" = true)))]
    pub threshold: f64,
    #[serde(default)]
    pub minimum_requests: u32,
    #[cfg_attr(feature = "crd", schemars(schema_with = "crate::crd::positive_duration"))]
    pub window: Duration,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
pub struct OutlierDetection {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "crd", schemars(range(min = 1)))]
    pub consecutive_failures: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_ejection: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "crd", schemars(range(max = 100)))]
    pub max_ejected_percent: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
pub struct Bulkhead {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "crd", schemars(range(min = 1)))]
    pub max_concurrent: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_timeout: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
pub struct RateLimit {
    #[cfg_attr(feature = "crd", schemars(range(min = 0.0), extend("exclusiveMinimum" = true)))]
    pub requests_per_second: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "crd", schemars(range(min = 1)))]
    pub burst: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<RateLimitScope>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RateLimitScope {
    /// Each sidecar enforces the whole limit on its own.
    #[default]
    Local,
    /// The limit is split among the live replicas of the target.
    Global,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum LoadBalancer {
    /// Power of two choices over peak-EWMA latency (the default, as in Linkerd).
    #[default]
    PeakEwma,
    RoundRobin,
    Random,
    /// Power of two choices over in-flight requests.
    LeastRequest,
    /// Requests with the same value of this header go to the same endpoint.
    ConsistentHash(String),
}

impl FromStr for LoadBalancer {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "peak-ewma" => LoadBalancer::PeakEwma,
            "round-robin" => LoadBalancer::RoundRobin,
            "random" => LoadBalancer::Random,
            "least-request" => LoadBalancer::LeastRequest,
            other => match other.strip_prefix("consistent-hash:") {
                Some(h) if !h.is_empty() && http_token(h) => {
                    LoadBalancer::ConsistentHash(h.to_ascii_lowercase())
                }
                Some(h) => return Err(format!("consistent-hash needs a header name, got {h:?}")),
                None => {
                    return Err(format!(
                        "unknown load balancer {other:?}; expected peak-ewma, round-robin, random, \
                         least-request or consistent-hash:HEADER"
                    ));
                }
            },
        })
    }
}

fn http_token(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

impl fmt::Display for LoadBalancer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadBalancer::PeakEwma => f.write_str("peak-ewma"),
            LoadBalancer::RoundRobin => f.write_str("round-robin"),
            LoadBalancer::Random => f.write_str("random"),
            LoadBalancer::LeastRequest => f.write_str("least-request"),
            LoadBalancer::ConsistentHash(h) => write!(f, "consistent-hash:{h}"),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
pub struct Inbound {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "crd", schemars(range(min = 1)))]
    pub max_concurrent: Option<u32>,
    /// Whether plain-text callers are still served (`permissive`, the default) or only
    /// callers with a mesh certificate (`strict`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MtlsMode>,
    /// Who may call: SPIFFE IDs (spiffe://TRUST-DOMAIN/ns/NAMESPACE/sa/SERVICE-ACCOUNT),
    /// NAMESPACE/SERVICE-ACCOUNT in the mesh's trust domain (either part may be *), or *
    /// for any mesh workload. Empty: everyone the mtls mode admits. Others get 403 with
    /// ballast-rejected: forbidden; a caller without a mesh certificate never matches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(feature = "crd", schemars(length(max = 256)))]
    pub allow: Vec<String>,
}

/// `inbound.mtls`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MtlsMode {
    /// Mesh callers use mutual TLS; plain-text callers (outside the mesh, health checks)
    /// are served too. The default, so a pod joins the mesh without breaking its callers.
    #[default]
    Permissive,
    /// Only mutual TLS: plain-text connections are refused (HTTP requests get 403
    /// `ballast-rejected: forbidden`, other connections are closed).
    Strict,
}

/// An override for requests that match; unset sections inherit the policy's.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
pub struct Route {
    #[serde(rename = "match")]
    pub match_: RouteMatch,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<Retries>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<Timeouts>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
pub struct RouteMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "crd", schemars(regex(pattern = "^/")))]
    pub path_prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(feature = "crd", schemars(inner(regex(pattern = crate::crd::HTTP_TOKEN))))]
    pub methods: Vec<String>,
}

impl ResiliencePolicy {
    /// Checks every rule a policy must satisfy. All problems are reported, each naming its
    /// field, so an operator fixes a policy in one round.
    pub fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut errs = Vec::new();
        let mut e = |field: &str, msg: String| errs.push(FieldError::new(field, msg));
        if self.api_version != crate::API_VERSION {
            e("apiVersion", format!("must be {}, got {:?}", crate::API_VERSION, self.api_version));
        }
        if self.kind != "ResiliencePolicy" {
            e("kind", format!("must be ResiliencePolicy, got {:?}", self.kind));
        }
        if !dns_label(&self.metadata.name) {
            e(
                "metadata.name",
                format!("{:?} is not a DNS label (lowercase letters, digits and '-')", self.metadata.name),
            );
        }
        if let Some(ns) = &self.metadata.namespace
            && !dns_label(ns)
        {
            e("metadata.namespace", format!("{ns:?} is not a DNS label (lowercase letters, digits and '-')"));
        }
        let s = &self.spec;
        if let Some(ns) = &s.target_ref.namespace
            && !dns_label(ns)
        {
            e(
                "spec.targetRef.namespace",
                format!("{ns:?} is not a DNS label (lowercase letters, digits and '-')"),
            );
        }
        if !dns_label(&s.target_ref.service) {
            e("spec.targetRef.service", format!("{:?} is not a service name", s.target_ref.service));
        }
        if let Some(t) = &s.timeouts {
            validate_timeouts("spec.timeouts", t, &mut e);
        }
        if let Some(r) = &s.retries {
            validate_retries("spec.retries", r, &mut e);
        }
        if let Some(cb) = &s.circuit_breaker {
            if cb.consecutive_failures == Some(0) {
                e("spec.circuitBreaker.consecutiveFailures", "must be at least 1".into());
            }
            if let Some(fr) = &cb.failure_rate {
                if !(fr.threshold > 0.0 && fr.threshold <= 1.0) {
                    e(
                        "spec.circuitBreaker.failureRate.threshold",
                        format!("must be in (0, 1], got {}", fr.threshold),
                    );
                }
                if fr.window.is_zero() {
                    e("spec.circuitBreaker.failureRate.window", "must be longer than 0s".into());
                }
            }
            if let (Some(a), Some(b)) = (cb.open_for, cb.max_open_for)
                && a > b
            {
                e("spec.circuitBreaker.maxOpenFor", format!("must be at least openFor ({a}), got {b}"));
            }
            if cb.half_open_requests == Some(0) {
                e("spec.circuitBreaker.halfOpenRequests", "must be at least 1".into());
            }
        }
        if let Some(od) = &s.outlier_detection {
            if od.consecutive_failures == Some(0) {
                e("spec.outlierDetection.consecutiveFailures", "must be at least 1".into());
            }
            if let Some(p) = od.max_ejected_percent
                && p > 100
            {
                e("spec.outlierDetection.maxEjectedPercent", format!("must be at most 100, got {p}"));
            }
        }
        if let Some(b) = &s.bulkhead
            && b.max_concurrent == Some(0)
        {
            e("spec.bulkhead.maxConcurrent", "must be at least 1".into());
        }
        if let Some(rl) = &s.rate_limit {
            validate_rate_limit("spec.rateLimit", rl, &mut e);
        }
        if let Some(i) = &s.inbound {
            if let Some(rl) = &i.rate_limit {
                validate_rate_limit("spec.inbound.rateLimit", rl, &mut e);
            }
            if i.max_concurrent == Some(0) {
                e("spec.inbound.maxConcurrent", "must be at least 1".into());
            }
            for (n, pattern) in i.allow.iter().enumerate() {
                if let Err(err) = pattern.parse::<crate::identity::IdentityPattern>() {
                    e(&format!("spec.inbound.allow[{n}]"), err.to_string());
                }
            }
        }
        if let Some(f) = &s.faults {
            if let Some(d) = &f.delay
                && !(0.0..=100.0).contains(&d.percent)
            {
                e("spec.faults.delay.percent", format!("must be in [0, 100], got {}", d.percent));
            }
            if let Some(a) = &f.abort {
                if !(0.0..=100.0).contains(&a.percent) {
                    e("spec.faults.abort.percent", format!("must be in [0, 100], got {}", a.percent));
                }
                if !(400..=599).contains(&a.status) {
                    e(
                        "spec.faults.abort.status",
                        format!("must be an error status 400-599, got {}", a.status),
                    );
                }
            }
        }
        if let Some(t) = &s.telemetry {
            for (field, v) in [
                ("spec.telemetry.tracingSamplingPercent", t.tracing_sampling_percent),
                ("spec.telemetry.accessLogSamplingPercent", t.access_log_sampling_percent),
            ] {
                if let Some(v) = v
                    && !(0.0..=100.0).contains(&v)
                {
                    e(field, format!("must be in [0, 100], got {v}"));
                }
            }
        }
        for (i, r) in s.routes.iter().enumerate() {
            let at = format!("spec.routes[{i}]");
            if let Some(p) = &r.match_.path_prefix
                && !p.starts_with('/')
            {
                e(&format!("{at}.match.pathPrefix"), format!("must start with '/', got {p:?}"));
            }
            for (j, m) in r.match_.methods.iter().enumerate() {
                if m.is_empty() || !http_token(m) {
                    e(&format!("{at}.match.methods[{j}]"), format!("{m:?} is not an HTTP method"));
                }
            }
            if let Some(t) = &r.timeouts {
                validate_timeouts(&format!("{at}.timeouts"), t, &mut e);
            }
            if let Some(rt) = &r.retries {
                validate_retries(&format!("{at}.retries"), rt, &mut e);
            }
        }
        if errs.is_empty() { Ok(()) } else { Err(errs) }
    }

    /// The namespace of the target service.
    pub fn target_namespace(&self) -> &str {
        self.spec.target_ref.namespace.as_deref().unwrap_or_else(|| self.metadata.namespace_or_default())
    }
}

fn validate_timeouts(at: &str, t: &Timeouts, e: &mut impl FnMut(&str, String)) {
    for (name, v) in [("request", t.request), ("perTry", t.per_try), ("connect", t.connect), ("idle", t.idle)]
    {
        if v.is_some_and(|d| d.is_zero()) {
            e(&format!("{at}.{name}"), "must be longer than 0s (omit it to turn the timeout off)".into());
        }
    }
    if let (Some(p), Some(r)) = (t.per_try, t.request)
        && p > r
    {
        e(
            &format!("{at}.perTry"),
            format!("{p} is longer than the request timeout {r}, so it could never fire"),
        );
    }
}

fn validate_retries(at: &str, r: &Retries, e: &mut impl FnMut(&str, String)) {
    if let Some(a) = r.attempts
        && a > 10
    {
        e(&format!("{at}.attempts"), format!("at most 10 retries are allowed, got {a}"));
    }
    if let Some(b) = &r.backoff {
        if b.base.is_zero() {
            e(&format!("{at}.backoff.base"), "must be longer than 0s".into());
        }
        if b.base > b.max {
            e(&format!("{at}.backoff.max"), format!("must be at least base ({}), got {}", b.base, b.max));
        }
    }
    if let Some(b) = &r.budget {
        if !(0.0..=1.0).contains(&b.ratio) {
            e(&format!("{at}.budget.ratio"), format!("must be in [0, 1], got {}", b.ratio));
        }
        if b.min_per_second > MAX_RETRY_MIN_PER_SECOND {
            e(
                &format!("{at}.budget.minPerSecond"),
                format!("must be at most {MAX_RETRY_MIN_PER_SECOND}, got {}", b.min_per_second),
            );
        }
    }
}

fn validate_rate_limit(at: &str, rl: &RateLimit, e: &mut impl FnMut(&str, String)) {
    if !(rl.requests_per_second > 0.0 && rl.requests_per_second.is_finite()) {
        e(
            &format!("{at}.requestsPerSecond"),
            format!("must be a positive number, got {}", rl.requests_per_second),
        );
    }
    if rl.burst == Some(0) {
        e(&format!("{at}.burst"), "must be at least 1".into());
    }
}

/// RFC 1123 label, as Kubernetes requires of service and object names.
pub fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}
