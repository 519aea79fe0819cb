//! Reading Ballast resources from YAML.
//!
//! A file holds any number of documents separated by `---`, each a `ResiliencePolicy` or a
//! `Service`. Errors name the source, the line (in the file, not the document) and the
//! field, because the person reading them has the file open in an editor.
//!
//! The documents are split here rather than by the YAML library so that each document's
//! line offset is known, and each is parsed twice: once for `kind`, then into its type
//! with unknown fields denied. Serde's internally tagged enums would lose the location.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{FieldError, ResiliencePolicy, Service};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Document {
    Policy(Box<ResiliencePolicy>),
    Service(Box<Service>),
}

impl Document {
    pub fn kind(&self) -> &'static str {
        match self {
            Document::Policy(_) => "ResiliencePolicy",
            Document::Service(_) => "Service",
        }
    }
    /// `namespace/name`.
    pub fn key(&self) -> String {
        let m = match self {
            Document::Policy(p) => &p.metadata,
            Document::Service(s) => &s.metadata,
        };
        format!("{}/{}", m.namespace_or_default(), m.name)
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {source_name}: {message}")]
    Read { source_name: String, message: String },
    #[error("{source_name}:{line}:{column}: {message}")]
    Syntax { source_name: String, line: u64, column: u64, message: String },
    #[error("{source_name}:{line}: {kind} {name:?}: {error}")]
    Invalid { source_name: String, line: u64, kind: String, name: String, error: Box<FieldError> },
    #[error("{source_name}:{line}: {kind} {key} is defined twice (first at line {first_line})")]
    Duplicate { source_name: String, line: u64, first_line: u64, kind: String, key: String },
    #[error("{source_name}:{line}: {message} (conflicts with line {first_line})")]
    Conflict { source_name: String, line: u64, first_line: u64, message: String },
}

/// Header read first to pick the document's type.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Header {
    #[serde(default)]
    kind: Option<String>,
}

/// Splits on `---` lines; yields (first line number, text) for documents with content.
fn split_documents(text: &str) -> Vec<(u64, String)> {
    let mut docs = Vec::new();
    let mut cur = String::new();
    let mut start = 1u64;
    for (i, line) in text.lines().enumerate() {
        let n = i as u64 + 1;
        let t = line.trim_end();
        if t == "---" || t.starts_with("--- ") || t == "..." {
            docs.push((start, std::mem::take(&mut cur)));
            start = n + 1;
            continue;
        }
        cur.push_str(line);
        cur.push('\n');
    }
    docs.push((start, cur));
    docs.retain(|(_, d)| d.lines().any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#')));
    docs
}

/// Parses every document in `text`, validating each. `source_name` (a path, `-`) is
/// only used in error messages.
pub fn parse_documents(text: &str, source_name: &str) -> Result<Vec<(u64, Document)>, ConfigError> {
    let mut out = Vec::new();
    for (start, doc) in split_documents(text) {
        let syntax = |e: serde_saphyr::Error| {
            let (line, column) = e.location().map(|l| (l.line(), l.column())).unwrap_or((1, 1));
            ConfigError::Syntax {
                source_name: source_name.to_owned(),
                line: start + line.saturating_sub(1),
                column,
                message: first_line(&e.to_string()),
            }
        };
        let header: Header = serde_saphyr::from_str(&doc).map_err(syntax)?;
        let invalid = |kind: &str, name: &str, error: FieldError| ConfigError::Invalid {
            source_name: source_name.to_owned(),
            line: start,
            kind: kind.to_owned(),
            name: name.to_owned(),
            error: Box::new(error),
        };
        let parsed = match header.kind.as_deref() {
            Some("ResiliencePolicy") => {
                let p: ResiliencePolicy = serde_saphyr::from_str(&doc).map_err(syntax)?;
                if let Err(mut errs) = p.validate() {
                    return Err(invalid("ResiliencePolicy", &p.metadata.name, errs.remove(0)));
                }
                Document::Policy(Box::new(p))
            }
            Some("Service") => {
                let s: Service = serde_saphyr::from_str(&doc).map_err(syntax)?;
                if let Err(mut errs) = s.validate() {
                    return Err(invalid("Service", &s.metadata.name, errs.remove(0)));
                }
                Document::Service(Box::new(s))
            }
            Some(other) => {
                return Err(invalid(
                    other,
                    "",
                    FieldError::new(
                        "kind",
                        format!("unknown kind {other:?}; expected ResiliencePolicy or Service"),
                    ),
                ));
            }
            None => return Err(invalid("document", "", FieldError::new("kind", "missing"))),
        };
        out.push((start, parsed));
    }
    Ok(out)
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or(s).trim().to_owned()
}

/// What a sidecar applies: every service and policy, keyed by `namespace/name`.
///
/// `version` is the store revision when it comes from the control plane; for a static
/// file it counts the loads, starting at 1.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub version: u64,
    pub services: BTreeMap<String, Service>,
    pub policies: BTreeMap<String, ResiliencePolicy>,
}

impl Config {
    pub fn from_documents(docs: Vec<(u64, Document)>, source_name: &str) -> Result<Self, ConfigError> {
        let mut cfg = Config { version: 1, ..Default::default() };
        let mut lines: BTreeMap<(String, String), u64> = BTreeMap::new();
        // What two documents may not both claim: one policy per target service, one service
        // per virtual address and port. Otherwise one would silently win.
        let mut claims: BTreeMap<String, u64> = BTreeMap::new();
        let conflict =
            |claims: &mut BTreeMap<String, u64>, what: String, line: u64| -> Result<(), ConfigError> {
                match claims.get(&what) {
                    Some(&first_line) => Err(ConfigError::Conflict {
                        source_name: source_name.to_owned(),
                        line,
                        first_line,
                        message: what,
                    }),
                    None => {
                        claims.insert(what, line);
                        Ok(())
                    }
                }
            };
        for (line, doc) in docs {
            let key = doc.key();
            if let Some(first) = lines.insert((doc.kind().to_owned(), key.clone()), line) {
                return Err(ConfigError::Duplicate {
                    source_name: source_name.to_owned(),
                    line,
                    first_line: first,
                    kind: doc.kind().to_owned(),
                    key,
                });
            }
            match &doc {
                Document::Policy(p) => conflict(
                    &mut claims,
                    format!(
                        "a second ResiliencePolicy targets service {}/{}",
                        p.target_namespace(),
                        p.spec.target_ref.service
                    ),
                    line,
                )?,
                Document::Service(s) => {
                    for ip in &s.spec.addresses {
                        if s.spec.ports.is_empty() {
                            conflict(
                                &mut claims,
                                format!("a second Service claims address {ip} (every port)"),
                                line,
                            )?;
                        }
                        for p in &s.spec.ports {
                            conflict(
                                &mut claims,
                                format!("a second Service claims address {ip} port {}", p.port),
                                line,
                            )?;
                        }
                    }
                }
            }
            match doc {
                Document::Policy(p) => {
                    cfg.policies.insert(key, *p);
                }
                Document::Service(s) => {
                    cfg.services.insert(key, *s);
                }
            }
        }
        Ok(cfg)
    }

    pub fn from_yaml(text: &str, source_name: &str) -> Result<Self, ConfigError> {
        Self::from_documents(parse_documents(text, source_name)?, source_name)
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::Read { source_name: name.clone(), message: e.to_string() })?;
        Self::from_yaml(&text, &name)
    }

    /// The policy whose target is `namespace/service`, if any.
    pub fn policy_for(&self, namespace: &str, service: &str) -> Option<&ResiliencePolicy> {
        self.policies
            .values()
            .find(|p| p.spec.target_ref.service == service && p.target_namespace() == namespace)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONTRACT_POLICY: &str = r#"
apiVersion: ballast.io/v1alpha1
kind: ResiliencePolicy
metadata: {name: payments, namespace: shop}
spec:
  targetRef: {service: payments}
  timeouts: {request: 2s, perTry: 500ms, connect: 1s, idle: 60s}
  retries:
    attempts: 3
    on: [gateway-error, reset, connect-failure]
    backoff: {base: 25ms, max: 250ms}
    budget: {ratio: 0.2, minPerSecond: 10}
  circuitBreaker:
    consecutiveFailures: 5
    failureRate: {threshold: 0.5, minimumRequests: 20, window: 10s}
    openFor: 5s
    maxOpenFor: 60s
    halfOpenRequests: 3
  outlierDetection: {consecutiveFailures: 5, baseEjection: 30s, maxEjectedPercent: 50}
  bulkhead: {maxConcurrent: 100, maxPending: 50, queueTimeout: 100ms}
  rateLimit: {requestsPerSecond: 500, burst: 100}
  loadBalancer: peak-ewma
  inbound:
    rateLimit: {requestsPerSecond: 1000, burst: 200, scope: global}
    maxConcurrent: 200
  routes:
    - match: {pathPrefix: /charge, methods: [POST]}
      retries: {attempts: 0}
      timeouts: {request: 5s}
  faults:
    delay: {percent: 10, duration: 100ms}
    abort: {percent: 5, status: 503}
"#;

    const CONTRACT_SERVICE: &str = r#"
apiVersion: ballast.io/v1alpha1
kind: Service
metadata: {name: httpbin, namespace: default}
spec:
  ports: [{port: 80, protocol: http}]
  addresses: [10.96.0.10]
  endpoints: [{address: "127.0.0.1:18080"}, {address: "127.0.0.1:18081", weight: 2}]
"#;

    #[test]
    fn parses_the_contract_examples() {
        let text = format!("{CONTRACT_POLICY}---{CONTRACT_SERVICE}");
        let cfg = Config::from_yaml(&text, "contract.yaml").expect("contract examples parse");
        let p = &cfg.policies["shop/payments"];
        assert_eq!(p.target_namespace(), "shop");
        let r = p.spec.retries.as_ref().unwrap();
        assert_eq!(r.attempts, Some(3));
        assert_eq!(
            r.on,
            vec![
                crate::policy::RetryOn::GatewayError,
                crate::policy::RetryOn::Reset,
                crate::policy::RetryOn::ConnectFailure
            ]
        );
        assert_eq!(r.backoff.unwrap().max, crate::Duration::from_millis(250));
        assert_eq!(
            p.spec.inbound.as_ref().unwrap().rate_limit.unwrap().scope,
            Some(crate::policy::RateLimitScope::Global)
        );
        assert_eq!(p.spec.routes[0].match_.methods, vec!["POST"]);
        let faults = p.spec.faults.as_ref().unwrap();
        assert_eq!(faults.abort.unwrap().status, 503);
        assert_eq!(faults.delay.unwrap().duration, crate::Duration::from_millis(100));
        let s = &cfg.services["default/httpbin"];
        assert_eq!(s.spec.endpoints[1].weight, 2);
        assert_eq!(s.spec.ports[0].protocol, Some(crate::service::Protocol::Http));
        assert_eq!(
            cfg.policy_for("shop", "payments").map(|p| &p.metadata.name),
            Some(&"payments".to_string())
        );
    }

    #[test]
    fn round_trips_through_json() {
        let cfg = Config::from_yaml(CONTRACT_POLICY, "p.yaml").unwrap();
        let json = serde_json::to_string(&cfg).unwrap();
        let back: Config = serde_json::from_str(&json).unwrap();
        assert_eq!(cfg, back);
    }

    #[test]
    fn empty_file_is_an_empty_config() {
        let cfg = Config::from_yaml("", "empty.yaml").unwrap();
        assert!(cfg.services.is_empty() && cfg.policies.is_empty());
        let cfg = Config::from_yaml("# nothing here\n---\n", "c.yaml").unwrap();
        assert!(cfg.services.is_empty());
    }

    #[test]
    fn unknown_field_names_file_line_and_field() {
        let text = format!(
            "{CONTRACT_SERVICE}---\napiVersion: ballast.io/v1alpha1\nkind: ResiliencePolicy\nmetadata: {{name: p}}\nspec:\n  targetRef: {{service: s}}\n  retires: {{attempts: 1}}\n"
        );
        let err = Config::from_yaml(&text, "bad.yaml").unwrap_err().to_string();
        assert!(err.starts_with("bad.yaml:15:"), "{err}");
        assert!(err.contains("retires"), "{err}");
    }

    #[test]
    fn invalid_value_names_the_field() {
        let text = CONTRACT_POLICY.replace("ratio: 0.2", "ratio: 1.5");
        let err = Config::from_yaml(&text, "p.yaml").unwrap_err().to_string();
        assert!(err.contains("spec.retries.budget.ratio"), "{err}");
        assert!(err.starts_with("p.yaml:1:"), "{err}");
        let text = CONTRACT_POLICY.replace("minPerSecond: 10", "minPerSecond: 3000000000");
        let err = Config::from_yaml(&text, "p.yaml").unwrap_err().to_string();
        assert!(err.contains("spec.retries.budget.minPerSecond"), "{err}");
        let text = CONTRACT_POLICY.replace("base: 25ms", "base: 25");
        let err = Config::from_yaml(&text, "p.yaml").unwrap_err().to_string();
        assert!(err.contains("ambiguous"), "{err}");
        let text = CONTRACT_POLICY.replace("status: 503", "status: 200");
        let err = Config::from_yaml(&text, "p.yaml").unwrap_err().to_string();
        assert!(err.contains("spec.faults.abort.status"), "{err}");
        let text = CONTRACT_POLICY.replace("connect-failure]", "connect-fail]");
        let err = Config::from_yaml(&text, "p.yaml").unwrap_err().to_string();
        assert!(err.contains("unknown retry condition"), "{err}");
        let text = CONTRACT_SERVICE.replace("127.0.0.1:18081", "not-an-address");
        let err = Config::from_yaml(&text, "s.yaml").unwrap_err().to_string();
        assert!(err.contains("spec.endpoints[1].address"), "{err}");
    }

    #[test]
    fn reports_every_problem_of_a_policy() {
        let mut cfg = Config::from_yaml(CONTRACT_POLICY, "p.yaml").unwrap();
        let p = cfg.policies.get_mut("shop/payments").unwrap();
        p.spec.timeouts.as_mut().unwrap().per_try = Some(crate::Duration::from_secs(10));
        p.spec.outlier_detection.as_mut().unwrap().max_ejected_percent = Some(150);
        let errs = p.validate().unwrap_err();
        let fields: Vec<_> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["spec.timeouts.perTry", "spec.outlierDetection.maxEjectedPercent"]);
    }

    #[test]
    fn syntax_error_has_a_line() {
        let err = Config::from_yaml("kind: Service\nspec: [unclosed\n", "x.yaml").unwrap_err();
        assert!(matches!(err, ConfigError::Syntax { .. }), "{err}");
    }

    #[test]
    fn conflicting_claims_are_rejected() {
        let two_policies = format!(
            "{CONTRACT_POLICY}---{}",
            CONTRACT_POLICY.replace("name: payments, namespace", "name: other, namespace")
        );
        let err = Config::from_yaml(&two_policies, "p.yaml").unwrap_err().to_string();
        assert!(err.contains("second ResiliencePolicy targets service shop/payments"), "{err}");
        let two_services =
            format!("{CONTRACT_SERVICE}---{}", CONTRACT_SERVICE.replace("name: httpbin", "name: other"));
        let err = Config::from_yaml(&two_services, "s.yaml").unwrap_err().to_string();
        assert!(err.contains("address 10.96.0.10 port 80"), "{err}");
        let bad_ns = CONTRACT_SERVICE.replace("namespace: default", "namespace: Default");
        let err = Config::from_yaml(&bad_ns, "s.yaml").unwrap_err().to_string();
        assert!(err.contains("metadata.namespace"), "{err}");
    }

    #[test]
    fn duplicate_documents_are_rejected() {
        let text = format!("{CONTRACT_SERVICE}---{CONTRACT_SERVICE}");
        let err = Config::from_yaml(&text, "d.yaml").unwrap_err().to_string();
        assert!(err.contains("defined twice"), "{err}");
    }
}
