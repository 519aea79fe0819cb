//! The `ResiliencePolicy` CustomResourceDefinition (group `ballast.io`, version `v1alpha1`),
//! derived from the [`policy`](crate::policy) types with kube's `CustomResource` derive.
//!
//! Only built with the `crd` feature: the control plane and `ballastctl` link Kubernetes code,
//! the sidecar never does.
//!
//! # Why the schema is derived
//!
//! A hand-written schema drifts from the types the control plane deserializes; a derived one
//! cannot. The types carry their rules as `schemars` attributes next to the fields, and the
//! types with their own string syntax (durations, retry conditions, load balancers, rate
//! limit scopes) have their schemas written here, with patterns that accept what their
//! parsers accept. `ballastctl crd` prints the result; `deploy/crd/` holds a copy that
//! `control-plane/tests/crd.rs` keeps identical.
//!
//! # What the schema checks, and what only the control plane checks
//!
//! Everything the parser rejects is rejected by the schema: wrong types, missing required
//! fields, integers beyond their Rust type, the syntax of durations, retry conditions and
//! load balancers, durations longer than the parser takes (a CEL rule), and unknown fields
//! (rejected under strict field validation, kubectl's default; pruned by the API server
//! otherwise, as a structural schema cannot say `additionalProperties: false`). That is what
//! keeps a typed watch from meeting an object it cannot read.
//!
//! Most rules of [`ResiliencePolicy::validate`] are in the schema too: numeric ranges
//! (ratios in [0, 1], threshold in (0, 1], percents 0-100, abort status 400-599, counts at
//! least 1, `attempts` at most 10, `minPerSecond` at most
//! [`MAX_RETRY_MIN_PER_SECOND`](crate::policy::MAX_RETRY_MIN_PER_SECOND)), positive
//! durations where zero would mean nothing (timeouts, `backoff.base`, `failureRate.window`),
//! DNS-label service and namespace names, HTTP-token methods, `pathPrefix` starting with
//! `/`; and, as `x-kubernetes-validations` CEL rules, the cross-field ones: `perTry` at
//! most `request`, `backoff.base` at most `backoff.max`, `openFor` at most `maxOpenFor`.
//!
//! Checked by the control plane only, which writes `Accepted=False` (reason `Invalid`):
//! * `metadata.name` a DNS label: Kubernetes allows any DNS subdomain (`a.b`), and the
//!   schema does not cover metadata.
//! * `apiVersion` and `kind`: the API server routes by them, so a wrong value never
//!   reaches this schema.
//! * A duration shorter than a nanosecond but written with a non-zero digit (`0.1ns`): the
//!   pattern sees a positive value, the parser rounds it to zero.
//!
//! And by the control plane's conflict check (reason `Conflict`): two policies for one
//! target service.
//!
//! Where the schema is deliberately stricter than `ballastctl`: durations are strings of at
//! most [`MAX_DURATION_LENGTH`] characters without the surrounding white space the parser
//! trims, a zero duration is the string `0` or `0s`, never the bare YAML number `0`, and a
//! policy has at most [`MAX_ROUTES`] routes. The two limits bound what the API server
//! estimates its CEL rules to cost; without them it refuses to install the CRD.
//!
//! A trap for manifests: kubectl reads YAML 1.1, where an unquoted `on` key is the boolean
//! `true`, so `retries.on` must be written `"on":` in a file given to kubectl. Unquoted, it
//! arrives as `retries.true`: an unknown field, rejected under strict field validation and
//! silently dropped under `--validate=false`. Ballast's own parser reads YAML 1.2, where `on`
//! is just a key. The generated CRD quotes such keys itself.

use std::borrow::Cow;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, CustomResourceExt};
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

use crate::policy::{LoadBalancer, MtlsMode, PolicySpec, RateLimitScope, RetryOn};
use crate::{Duration, FieldError, ObjectMeta, ResiliencePolicy};

/// The spec of a [`ResiliencePolicyResource`]: exactly a [`PolicySpec`].
///
/// The derive sits on this wrapper rather than on `PolicySpec` because `PolicySpec` is
/// shared with the sidecar, which must not link kube: the generated root type, its printer
/// columns and status would otherwise all live in `policy` behind `cfg_attr`s, and the
/// root's name would collide with [`ResiliencePolicy`]. `#[serde(transparent)]` makes the
/// wrapper the same JSON and the same schema as the spec it holds.
#[allow(clippy::duplicated_attributes, reason = "each printcolumn(...) repeats type_ = \"string\"")]
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "ballast.io",
    version = "v1alpha1",
    kind = "ResiliencePolicy",
    root = "ResiliencePolicyResource",
    plural = "resiliencepolicies",
    singular = "resiliencepolicy",
    shortname = "rp",
    category = "ballast",
    namespaced,
    status = "ResiliencePolicyStatus",
    derive = "PartialEq",
    doc = "Timeouts, retries, circuit breaking, outlier detection, bulkheads, rate limits, load \
           balancing and fault injection for the calls to one service, applied by Ballast's \
           sidecars.",
    printcolumn(name = "Service", type_ = "string", json_path = ".spec.targetRef.service"),
    printcolumn(
        name = "Accepted",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Accepted\")].status"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Accepted\")].reason",
        priority = 1
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(transparent)]
#[schemars(
    description = "How sidecars treat calls to targetRef (client-side sections) and requests arriving at its pods \
                   (inbound). A missing section turns that mechanism off."
)]
pub struct ResiliencePolicySpec(pub PolicySpec);

/// What the control plane reports about a policy: whether the generation it last read was
/// accepted, as an `Accepted` condition (`kubectl wait --for=condition=Accepted` works).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResiliencePolicyStatus {
    /// The `metadata.generation` the conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
}

/// The type of the one condition Ballast writes.
pub const ACCEPTED: &str = "Accepted";

/// Longest condition message the API server stores (metav1.Condition's `maxLength`).
const MAX_CONDITION_MESSAGE: usize = 32768;

/// Why a policy is or is not in force; the `reason` of the `Accepted` condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceptedReason {
    /// Valid and pushed to the sidecars.
    Accepted,
    /// `validate()` rejected it; the message names the fields.
    Invalid,
    /// Another policy already targets the same service.
    Conflict,
}

impl AcceptedReason {
    pub fn as_str(self) -> &'static str {
        match self {
            AcceptedReason::Accepted => "Accepted",
            AcceptedReason::Invalid => "Invalid",
            AcceptedReason::Conflict => "Conflict",
        }
    }

    /// The condition's `status`: only an accepted policy is `True`.
    pub fn status(self) -> &'static str {
        match self {
            AcceptedReason::Accepted => "True",
            AcceptedReason::Invalid | AcceptedReason::Conflict => "False",
        }
    }
}

impl ResiliencePolicyStatus {
    /// The `Accepted` condition for generation `observed_generation`, stamped `now`. The
    /// message is cut to the length the API server stores, so a policy with many errors
    /// still gets a status.
    pub fn accepted_condition(
        reason: AcceptedReason,
        message: impl Into<String>,
        observed_generation: Option<i64>,
        now: Time,
    ) -> Condition {
        Condition {
            type_: ACCEPTED.to_owned(),
            status: reason.status().to_owned(),
            reason: reason.as_str().to_owned(),
            message: truncate(message.into(), MAX_CONDITION_MESSAGE),
            observed_generation,
            last_transition_time: now,
        }
    }

    /// Records the outcome of reading generation `generation`: sets `observedGeneration` and
    /// the `Accepted` condition. Returns whether anything changed, so the caller can skip a
    /// status write that would change nothing.
    pub fn set_accepted(
        &mut self,
        reason: AcceptedReason,
        message: impl Into<String>,
        generation: Option<i64>,
        now: Time,
    ) -> bool {
        let before = self.clone();
        self.observed_generation = generation;
        self.set_condition(Self::accepted_condition(reason, message, generation, now));
        *self != before
    }

    /// Adds or replaces the condition of `c`'s type. As apimachinery's `SetStatusCondition`,
    /// `lastTransitionTime` only moves when the status does: it says since when the policy
    /// has been (not) accepted, not when the control plane last looked.
    pub fn set_condition(&mut self, mut c: Condition) {
        match self.conditions.iter_mut().find(|old| old.type_ == c.type_) {
            Some(old) => {
                if old.status == c.status {
                    c.last_transition_time = old.last_transition_time.clone();
                }
                *old = c;
            }
            None => self.conditions.push(c),
        }
    }
}

/// The message of an `Invalid` condition: every error, each naming its field.
pub fn invalid_message(errors: &[FieldError]) -> String {
    errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

/// The current time, to whole seconds as the API server stores it (so that a condition
/// read back compares equal to the one written).
pub fn now() -> Time {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    Time(k8s_openapi::jiff::Timestamp::from_second(secs).unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH))
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// The policy a custom resource stands for, so that the control plane runs the same
/// [`ResiliencePolicy::validate`] as `ballastctl`. Only a missing name is an error here;
/// everything else is for `validate()` to judge.
pub fn to_policy(r: &ResiliencePolicyResource) -> Result<ResiliencePolicy, FieldError> {
    let m = &r.metadata;
    let name = m.name.clone().ok_or_else(|| FieldError::new("metadata.name", "missing"))?;
    Ok(ResiliencePolicy {
        api_version: crate::API_VERSION.to_owned(),
        kind: "ResiliencePolicy".to_owned(),
        metadata: ObjectMeta {
            name,
            namespace: m.namespace.clone(),
            labels: m.labels.clone().unwrap_or_default(),
            annotations: m.annotations.clone().unwrap_or_default(),
        },
        spec: r.spec.0.clone(),
    })
}

/// The CustomResourceDefinition object.
pub fn crd() -> CustomResourceDefinition {
    ResiliencePolicyResource::crd()
}

/// What `ballastctl crd` prints and `deploy/crd/resiliencepolicies.ballast.io.yaml` holds.
pub fn crd_yaml() -> String {
    let body = serde_saphyr::to_string(&crd()).expect("a CustomResourceDefinition is plain data");
    format!(
        "# Generated by `ballastctl crd` from the ballast-api types (api/src/crd.rs, api/src/policy.rs).\n\
         # Do not edit by hand: change the types, then regenerate with\n\
         #   cargo run -p ballast-control-plane --bin ballastctl -- crd > deploy/crd/resiliencepolicies.ballast.io.yaml\n\
         {body}"
    )
}

// ---- Schemas of the types with their own string syntax ----

/// One number of a duration, as `f64::from_str` takes it from the digits and dots the
/// parser cuts out: `1`, `1.5`, `1.`, `.5`.
macro_rules! num {
    () => {
        r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
    };
}
/// A number with a non-zero digit, so the duration it is part of is not zero.
macro_rules! nonzero_num {
    () => {
        r"(?:[0-9]*[1-9][0-9]*(?:\.[0-9]*)?|[0-9]*\.[0-9]*[1-9][0-9]*)"
    };
}
macro_rules! unit {
    () => {
        r"(?:ns|us|µs|ms|s|m|h)"
    };
}
/// An HTTP token character (RFC 9110 `tchar`).
macro_rules! tchar {
    () => {
        r"[!#$%&'*+.^_`|~0-9A-Za-z-]"
    };
}

/// What [`Duration`]'s parser accepts (less the white space it trims): `0`, or numbers each
/// followed by a unit, `1m30s`.
pub const DURATION: &str = concat!("^(?:0|(?:", num!(), unit!(), ")+)$");
/// A duration with a non-zero number in it.
pub const POSITIVE_DURATION: &str =
    concat!("^(?:", num!(), unit!(), ")*", nonzero_num!(), unit!(), "(?:", num!(), unit!(), ")*$");
/// Longest duration string the schema takes. The parser has no limit, but CEL rules need
/// a bounded string for the API server to accept their cost, and no sane duration is longer.
pub const MAX_DURATION_LENGTH: u32 = 64;
/// Most `routes` a policy may have in the cluster. `validate()` sets no limit, but the API
/// server prices each CEL rule at the longest its lists can be, and the eight duration rules
/// of a route in an unbounded list would price the CRD out of installation. A policy with
/// more routes than this is not one anybody could read.
pub const MAX_ROUTES: u32 = 100;
/// The parser's upper bound ("too large"), in seconds.
const MAX_DURATION_SECS: &str = "1000000000s";
/// What [`RetryOn`]'s parser accepts: a `u16` status code 100-599 may have a `+` and
/// leading zeros, as `u16::from_str` takes them.
pub const RETRY_ON: &str = concat!(
    r"^(?:5xx|gateway-error|reset|connect-failure|retriable-status:\+?0*[1-5][0-9]{2}",
    r"|grpc:(?:unavailable|resource-exhausted|cancelled|deadline-exceeded))$"
);
/// What [`LoadBalancer`]'s parser accepts.
pub const LOAD_BALANCER: &str =
    concat!("^(?:peak-ewma|round-robin|random|least-request|consistent-hash:", tchar!(), "+)$");
/// An HTTP method: a non-empty token.
pub const HTTP_TOKEN: &str = concat!("^", tchar!(), "+$");
/// An RFC 1123 label, as [`crate::policy::dns_label`] checks it (with `maxLength: 63`).
pub const DNS_LABEL: &str = "^[a-z0-9](?:[-a-z0-9]*[a-z0-9])?$";

fn duration_schema(pattern: &str, description: &str) -> Schema {
    json_schema!({
        "type": "string",
        "pattern": pattern,
        "maxLength": MAX_DURATION_LENGTH,
        "description": description,
        "x-kubernetes-validations": [{
            "rule": format!("duration(self) <= duration('{MAX_DURATION_SECS}')"),
            "message": format!("must be at most {MAX_DURATION_SECS}"),
        }],
    })
}

impl JsonSchema for Duration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }
    fn inline_schema() -> bool {
        true
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        duration_schema(
            DURATION,
            "A duration such as 250ms, 2s, 1m30s (units ns, us, ms, s, m, h); 0 turns it off.",
        )
    }
}

/// The schema of a duration that must be longer than zero (`schema_with` on such fields).
pub fn positive_duration(_: &mut SchemaGenerator) -> Schema {
    duration_schema(
        POSITIVE_DURATION,
        "A duration longer than zero, such as 250ms, 2s, 1m30s (units ns, us, ms, s, m, h).",
    )
}

/// [`positive_duration`] for an optional field, nullable as schemars makes every `Option`.
pub fn optional_positive_duration(g: &mut SchemaGenerator) -> Schema {
    let mut s = positive_duration(g);
    s.insert("nullable".into(), true.into());
    s
}

impl JsonSchema for RetryOn {
    fn schema_name() -> Cow<'static, str> {
        "RetryOn".into()
    }
    fn inline_schema() -> bool {
        true
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": RETRY_ON,
            "description": "A condition under which a failed try is retried: 5xx, gateway-error, reset, \
                connect-failure, retriable-status:CODE (100-599), grpc:unavailable, \
                grpc:resource-exhausted, grpc:cancelled or grpc:deadline-exceeded.",
        })
    }
}

impl JsonSchema for LoadBalancer {
    fn schema_name() -> Cow<'static, str> {
        "LoadBalancer".into()
    }
    fn inline_schema() -> bool {
        true
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": LOAD_BALANCER,
            "description": "peak-ewma (the default), round-robin, random, least-request, or \
                consistent-hash:HEADER (requests with the same value of that header go to the same endpoint).",
        })
    }
}

/// Hand-written because schemars turns documented unit variants into a `oneOf` of
/// `const`s, which a structural schema cannot have.
impl JsonSchema for RateLimitScope {
    fn schema_name() -> Cow<'static, str> {
        "RateLimitScope".into()
    }
    fn inline_schema() -> bool {
        true
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "enum": ["local", "global"],
            "description": "local (the default): each sidecar enforces the whole limit; \
                global: the limit is split among the live replicas of the target.",
        })
    }
}

/// Hand-written for the same reason as [`RateLimitScope`]'s.
impl JsonSchema for MtlsMode {
    fn schema_name() -> Cow<'static, str> {
        "MtlsMode".into()
    }
    fn inline_schema() -> bool {
        true
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "enum": ["permissive", "strict"],
            "description": "permissive (the default): plain-text callers are served too; \
                strict: only callers with a mesh certificate (mutual TLS).",
        })
    }
}

/// metav1.Condition's schema as Kubernetes' own types declare it, a map list keyed by
/// `type` so that server-side apply merges conditions by type. Written out because
/// k8s-openapi's `schemars` feature would pull a second copy of the schema machinery into
/// the build for this one field.
fn conditions_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["type"],
        "items": {
            "type": "object",
            "required": ["lastTransitionTime", "message", "reason", "status", "type"],
            "properties": {
                "lastTransitionTime": {"type": "string", "format": "date-time"},
                "message": {"type": "string", "maxLength": MAX_CONDITION_MESSAGE},
                "observedGeneration": {"type": "integer", "format": "int64", "minimum": 0},
                "reason": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": 1024,
                    "pattern": "^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$",
                },
                "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
                "type": {
                    "type": "string",
                    "maxLength": 316,
                    "pattern": "^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$",
                },
            },
        },
    })
}

/// The cross-field rules of `validate()` as `x-kubernetes-validations` (CEL), added to the
/// schemas of the objects they span (`schemars(transform = ...)` on those types).
/// `tests/python/schema_check.py` knows each rule by its text: change one here and there.
pub mod cel {
    use schemars::Schema;

    pub const TIMEOUTS: &str =
        "!has(self.perTry) || !has(self.request) || duration(self.perTry) <= duration(self.request)";
    pub const BACKOFF: &str = "duration(self.base) <= duration(self.max)";
    pub const CIRCUIT_BREAKER: &str =
        "!has(self.openFor) || !has(self.maxOpenFor) || duration(self.openFor) <= duration(self.maxOpenFor)";

    fn add(schema: &mut Schema, rule: &str, message: &str, field_path: &str) {
        let v = serde_json::json!({"rule": rule, "message": message, "fieldPath": field_path});
        match schema.get_mut("x-kubernetes-validations").and_then(|r| r.as_array_mut()) {
            Some(rules) => rules.push(v),
            None => {
                schema.insert("x-kubernetes-validations".into(), serde_json::Value::Array(vec![v]));
            }
        }
    }

    pub fn timeouts(schema: &mut Schema) {
        add(schema, TIMEOUTS, "perTry is longer than the request timeout, so it could never fire", ".perTry");
    }

    pub fn backoff(schema: &mut Schema) {
        add(schema, BACKOFF, "must be at least base", ".max");
    }

    pub fn circuit_breaker(schema: &mut Schema) {
        add(schema, CIRCUIT_BREAKER, "must be at least openFor", ".maxOpenFor");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_crd_names_and_columns() {
        let crd = crd();
        assert_eq!(crd.metadata.name.as_deref(), Some("resiliencepolicies.ballast.io"));
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(crd.spec.names.short_names, Some(vec!["rp".to_owned()]));
        assert_eq!(crd.spec.names.categories, Some(vec!["ballast".to_owned()]));
        let v = &crd.spec.versions[0];
        assert_eq!(v.name, "v1alpha1");
        let cols: Vec<_> = v.additional_printer_columns.iter().flatten().map(|c| c.name.as_str()).collect();
        assert_eq!(cols, ["Service", "Accepted", "Reason", "Age"]);
        assert!(v.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some());
    }

    #[test]
    fn round_trips_a_policy() {
        let yaml = "apiVersion: ballast.io/v1alpha1\nkind: ResiliencePolicy\n\
                    metadata: {name: p, namespace: shop, labels: {team: pay}}\n\
                    spec:\n  targetRef: {service: payments}\n  retries: {attempts: 2, on: [reset]}\n";
        let docs = crate::document::parse_documents(yaml, "p.yaml").expect("valid policy");
        let crate::Document::Policy(p) = &docs[0].1 else { panic!("not a policy") };
        // The same policy as the API server sends the custom resource.
        let json = serde_json::json!({
            "apiVersion": "ballast.io/v1alpha1", "kind": "ResiliencePolicy",
            "metadata": {"name": "p", "namespace": "shop", "labels": {"team": "pay"}, "uid": "u1", "generation": 1},
            "spec": {"targetRef": {"service": "payments"}, "retries": {"attempts": 2, "on": ["reset"]}},
        });
        let r: ResiliencePolicyResource = serde_json::from_value(json).expect("deserializes");
        assert_eq!(r.metadata.namespace.as_deref(), Some("shop"));
        let json = serde_json::to_value(&r).expect("serializes");
        assert_eq!(json["spec"]["retries"]["on"][0], "reset");
        assert_eq!(json["kind"], "ResiliencePolicy");
        let back: ResiliencePolicyResource = serde_json::from_value(json).expect("deserializes");
        assert_eq!(to_policy(&back).expect("has a name"), **p);
        let mut nameless = back;
        nameless.metadata.name = None;
        assert_eq!(to_policy(&nameless).unwrap_err().field, "metadata.name");
    }

    /// The `Accepted` condition of `s`.
    fn accepted(s: &ResiliencePolicyStatus) -> &Condition {
        s.conditions.iter().find(|c| c.type_ == ACCEPTED).expect("written")
    }

    #[test]
    fn the_accepted_condition_moves_only_when_its_status_does() {
        let t0 = Time(k8s_openapi::jiff::Timestamp::from_second(1_000).expect("in range"));
        let t1 = Time(k8s_openapi::jiff::Timestamp::from_second(2_000).expect("in range"));
        let mut s = ResiliencePolicyStatus::default();
        assert!(s.set_accepted(AcceptedReason::Accepted, "pushed", Some(1), t0.clone()));
        assert!(!s.set_accepted(AcceptedReason::Accepted, "pushed", Some(1), t1.clone()));
        assert!(s.set_accepted(AcceptedReason::Accepted, "pushed", Some(2), t1.clone()));
        let c = accepted(&s);
        assert_eq!(
            (c.status.as_str(), &c.last_transition_time, s.observed_generation),
            ("True", &t0, Some(2))
        );
        let errs = [FieldError::new("spec.a", "bad"), FieldError::new("spec.b", "worse")];
        s.set_accepted(AcceptedReason::Invalid, invalid_message(&errs), Some(3), t1.clone());
        let c = accepted(&s);
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "Invalid"));
        assert_eq!(c.message, "spec.a: bad; spec.b: worse");
        assert_eq!((&c.last_transition_time, c.observed_generation), (&t1, Some(3)));
        assert_eq!(s.conditions.len(), 1);
        let long = ResiliencePolicyStatus::accepted_condition(
            AcceptedReason::Conflict,
            "é".repeat(20_000),
            None,
            t1,
        );
        assert!(long.message.len() <= MAX_CONDITION_MESSAGE);
        assert_eq!((long.status.as_str(), long.reason.as_str()), ("False", "Conflict"));
    }
}
