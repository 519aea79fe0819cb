//! `ballastctl`'s commands other than `demo`: a client of the admin API
//! ([`crate::admin`]) that prints tables for people and JSON (`-o json`) for scripts.
//!
//! With workload identity on, the admin API is HTTPS and wants a bearer token: `--ca-file`
//! names the mesh's trust anchor (ballastctl trusts nothing else: the control plane's
//! certificate comes from the mesh CA, never from a public one, so the system's roots
//! would be both useless and a way around the mesh's own trust), and `--token-file` the
//! admin token. An `https://` URL without `--ca-file` is refused before connecting.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

#[derive(Debug, clap::Args)]
pub struct ApplyArgs {
    /// YAML file with ResiliencePolicy and Service documents (`-` reads standard input).
    #[arg(short = 'f', long = "filename")]
    pub file: PathBuf,
    /// Wait until every sidecar the change reaches has applied it.
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits.
    #[arg(long, default_value = "30s", value_parser = ballast_api::duration::parse_flag)]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Kind {
    #[value(alias = "policy", alias = "resiliencepolicies")]
    Policies,
    #[value(alias = "service", alias = "svc")]
    Services,
    #[value(alias = "endpoint", alias = "ep")]
    Endpoints,
    #[value(alias = "proxy")]
    Proxies,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum DeleteKind {
    #[value(alias = "policies")]
    Policy,
    #[value(alias = "services", alias = "svc")]
    Service,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error(
        "cannot reach the control plane at {url}: {message}; is it running? (--control-plane or BALLAST_CONTROL_PLANE)"
    )]
    Unreachable { url: String, message: String },
    #[error("{0}")]
    Api(String),
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error(
        "{url} is HTTPS: pass --ca-file FILE (or BALLAST_CA_FILE) with the mesh's trust anchor (the CA certificate, PEM; kubectl -n ballast-system get configmap ballast-trust-anchors -o jsonpath='{{.data.ca\\.crt}}')"
    )]
    NoCaFile { url: String },
    #[error("--ca-file {path}: {message}")]
    CaFile { path: String, message: String },
    #[error("--token-file {path} is empty; it must hold the control plane's admin token")]
    EmptyToken { path: String },
}

type HttpConnector = hyper_util::client::legacy::connect::HttpConnector;

enum Transport {
    Http(Client<HttpConnector, Full<Bytes>>),
    Https(Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>),
    /// An `https://` URL and no trust anchor: every call says to pass `--ca-file`.
    NoCaFile,
}

/// The admin API at one URL.
pub struct Api {
    base: String,
    transport: Transport,
    /// The admin token, sent as `Authorization: Bearer`.
    token: Option<String>,
}

impl Api {
    /// The API at `base` without TLS material or token: plain `http://` (an `https://`
    /// base fails each call, asking for `--ca-file`).
    pub fn new(base: &str) -> Self {
        let transport = if is_https(base) {
            Transport::NoCaFile
        } else {
            Transport::Http(Client::builder(TokioExecutor::new()).build_http())
        };
        Self { base: base.trim_end_matches('/').to_owned(), transport, token: None }
    }

    /// The API at `base`, trusting `ca_pem` (the mesh's trust anchors, PEM) for an
    /// `https://` base and sending `token` as the admin token.
    pub fn with_tls(base: &str, ca_pem: Option<&str>, token: Option<String>) -> Result<Self, CtlError> {
        Self::build(base, ca_pem.map(|pem| ("trust anchors", pem)), token)
    }

    /// [`Api::with_tls`] from ballastctl's `--ca-file` and `--token-file`.
    pub fn from_files(
        base: &str,
        ca_file: Option<&Path>,
        token_file: Option<&Path>,
    ) -> Result<Self, CtlError> {
        let read = |p: &Path| {
            std::fs::read_to_string(p)
                .map_err(|source| CtlError::Read { path: p.display().to_string(), source })
        };
        let token = match token_file {
            Some(p) => {
                let t = read(p)?.trim().to_owned();
                if t.is_empty() {
                    return Err(CtlError::EmptyToken { path: p.display().to_string() });
                }
                Some(t)
            }
            None => None,
        };
        let ca = ca_file.map(|p| read(p).map(|pem| (p.display().to_string(), pem))).transpose()?;
        Self::build(base, ca.as_ref().map(|(p, pem)| (p.as_str(), pem.as_str())), token)
    }

    fn build(base: &str, ca: Option<(&str, &str)>, token: Option<String>) -> Result<Self, CtlError> {
        let mut api = Self::new(base);
        api.token = token;
        if is_https(base)
            && let Some((path, pem)) = ca
        {
            let client =
                https_client(pem).map_err(|message| CtlError::CaFile { path: path.to_owned(), message })?;
            api.transport = Transport::Https(client);
        }
        Ok(api)
    }

    /// Sends a request; a non-2xx answer is an error carrying the server's message.
    pub async fn call(&self, method: Method, path: &str, body: Option<Bytes>) -> Result<Value, CtlError> {
        let url = format!("{}{path}", self.base);
        let unreachable = |message: String| CtlError::Unreachable { url: self.base.clone(), message };
        let mut req = Request::builder().method(method).uri(&url);
        if let Some(token) = &self.token {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let req = req
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|e| unreachable(format!("bad URL {url}: {e}")))?;
        let sent = match &self.transport {
            Transport::Http(c) => c.request(req).await,
            Transport::Https(c) => c.request(req).await,
            Transport::NoCaFile => return Err(CtlError::NoCaFile { url: self.base.clone() }),
        };
        let resp = sent.map_err(|e| unreachable(ballast_api::errors::chain(&e)))?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await.map_err(|e| unreachable(e.to_string()))?.to_bytes();
        let value: Value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| json!({"error": String::from_utf8_lossy(&bytes)}));
        if status.is_success() {
            return Ok(value);
        }
        Err(CtlError::Api(error_text(status, &value)))
    }
}

fn is_https(base: &str) -> bool {
    base.get(..8).is_some_and(|s| s.eq_ignore_ascii_case("https://"))
}

/// An HTTPS client trusting only the certificates in `pem`, on ring.
fn https_client(
    pem: &str,
) -> Result<Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let cert = cert.map_err(|e| format!("not PEM: {e}"))?;
        roots.add(cert).map_err(|e| format!("not a usable CA certificate: {e}"))?;
    }
    if roots.is_empty() {
        return Err("no CERTIFICATE in it; give the mesh's trust anchor (PEM)".into());
    }
    let config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_only()
        .enable_http1()
        .build();
    Ok(Client::builder(TokioExecutor::new()).build(connector))
}

/// `ballastctl token create`: a bootstrap token for a service account, printed alone on
/// its line (for `$(...)`); `-o json` adds its expiry and identity.
pub async fn create_token(
    api: &Api,
    namespace: &str,
    service_account: &str,
    ttl: Duration,
    output: Output,
) -> Result<String, CtlError> {
    let body = json!({
        "namespace": namespace,
        "serviceAccount": service_account,
        "ttl": format!("{}s", ttl.as_secs().max(1)),
    });
    let v = api.call(Method::POST, "/api/v1/tokens", Some(body.to_string().into())).await?;
    if output == Output::Json {
        return Ok(pretty(&v));
    }
    match v["token"].as_str() {
        Some(t) => Ok(format!("{t}\n")),
        None => Err(CtlError::Api(format!("the control plane answered without a token: {v}"))),
    }
}

/// The server's message, and the sidecars it names.
fn error_text(status: StatusCode, v: &Value) -> String {
    let mut s =
        v["error"].as_str().map_or_else(|| format!("the control plane answered {status}"), str::to_owned);
    for r in v["refused"].as_array().into_iter().flatten() {
        s.push_str(&format!(
            "\n  {} refused version {}: {}",
            r["proxy"].as_str().unwrap_or("?"),
            r["version"],
            r["reason"].as_str().unwrap_or("")
        ));
    }
    for b in v["behind"].as_array().into_iter().flatten() {
        s.push_str(&format!(
            "\n  {} is at version {}{}",
            b["proxy"].as_str().unwrap_or("?"),
            b["acked"],
            b["replica"].as_str().map(|r| format!(" (served by {r})")).unwrap_or_default()
        ));
    }
    s
}

pub async fn apply(api: &Api, args: &ApplyArgs, output: Output) -> Result<String, CtlError> {
    let path = args.file.display().to_string();
    let text = if path == "-" {
        std::io::read_to_string(std::io::stdin())
            .map_err(|source| CtlError::Read { path: path.clone(), source })?
    } else {
        std::fs::read_to_string(&args.file).map_err(|source| CtlError::Read { path: path.clone(), source })?
    };
    let query = format!("/api/v1/apply?source={}", encode(&path));
    let applied = api.call(Method::POST, &query, Some(text.into())).await?;
    let mut out = String::new();
    if output == Output::Json && !args.wait {
        return Ok(pretty(&applied));
    }
    for r in applied["results"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "{} {}/{} {}\n",
            r["kind"].as_str().unwrap_or("?"),
            r["namespace"].as_str().unwrap_or("?"),
            r["name"].as_str().unwrap_or("?"),
            r["action"].as_str().unwrap_or("?")
        ));
    }
    if args.wait {
        if applied["changed"] == json!(true) {
            let req = json!({
                "revision": applied["revision"],
                "services": applied["services"],
                "timeoutMs": args.timeout.as_millis() as u64,
            });
            let waited = api.call(Method::POST, "/api/v1/wait", Some(req.to_string().into())).await?;
            if output == Output::Json {
                return Ok(pretty(&json!({"applied": applied, "wait": waited})));
            }
            let n = waited["acked"].as_array().map_or(0, Vec::len);
            out.push_str(&format!("revision {} acked by {n} sidecar(s)\n", applied["revision"]));
        } else if output == Output::Json {
            return Ok(pretty(&json!({"applied": applied})));
        } else {
            out.push_str("nothing changed; nothing to wait for\n");
        }
    }
    Ok(out)
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn pretty(v: &Value) -> String {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_default();
    s.push('\n');
    s
}

pub async fn get(api: &Api, kind: Kind, namespace: Option<&str>, output: Output) -> Result<String, CtlError> {
    let path = match kind {
        Kind::Policies => "policies",
        Kind::Services => "services",
        Kind::Endpoints => "endpoints",
        Kind::Proxies => "proxies",
    };
    let v = api.call(Method::GET, &format!("/api/v1/{path}"), None).await?;
    let items: Vec<Value> = v
        .as_array()
        .into_iter()
        .flatten()
        .filter(|i| {
            namespace.is_none_or(|ns| {
                i["namespace"].as_str().or_else(|| i["metadata"]["namespace"].as_str()) == Some(ns)
            })
        })
        .cloned()
        .collect();
    if output == Output::Json {
        return Ok(pretty(&Value::Array(items)));
    }
    let s = cell;
    let (header, rows): (&[&str], Vec<Vec<String>>) = match kind {
        Kind::Policies => (
            &["NAMESPACE", "NAME", "TARGET"],
            items
                .iter()
                .map(|p| {
                    let target = &p["spec"]["targetRef"];
                    let ns = target["namespace"]
                        .as_str()
                        .or(p["metadata"]["namespace"].as_str())
                        .unwrap_or("default");
                    vec![
                        s(&p["metadata"]["namespace"]),
                        s(&p["metadata"]["name"]),
                        format!("{}.{ns}", s(&target["service"])),
                    ]
                })
                .collect(),
        ),
        Kind::Services => (
            &["NAMESPACE", "NAME", "PORTS", "ENDPOINTS"],
            items
                .iter()
                .map(|sv| {
                    let ports: Vec<String> =
                        sv["spec"]["ports"].as_array().into_iter().flatten().map(|p| s(&p["port"])).collect();
                    let eps = sv["spec"]["endpoints"].as_array().map_or(0, Vec::len);
                    let ports = if ports.is_empty() { "detect".to_owned() } else { ports.join(",") };
                    vec![s(&sv["metadata"]["namespace"]), s(&sv["metadata"]["name"]), ports, eps.to_string()]
                })
                .collect(),
        ),
        Kind::Endpoints => (
            &["NAMESPACE", "SERVICE", "ADDRESS", "WEIGHT", "SOURCE", "POD"],
            items
                .iter()
                .map(|e| {
                    ["namespace", "service", "address", "weight", "source", "pod"]
                        .iter()
                        .map(|k| s(&e[*k]))
                        .collect()
                })
                .collect(),
        ),
        Kind::Proxies => (
            &[
                "NAMESPACE",
                "POD",
                "SERVICE",
                "STATE",
                "SENT",
                "ACKED",
                "REPLICA",
                "VERSION",
                "IDENTITY",
                "NACK",
            ],
            items
                .iter()
                .map(|p| {
                    let mut row: Vec<String> = [
                        "namespace",
                        "pod",
                        "service",
                        "state",
                        "sent",
                        "acked",
                        "replica",
                        "proxyVersion",
                        "identity",
                    ]
                    .iter()
                    .map(|k| s(&p[*k]))
                    .collect();
                    row.push(p["nack"]["reason"].as_str().map_or_else(|| "-".to_owned(), str::to_owned));
                    row
                })
                .collect(),
        ),
    };
    Ok(table(header, &rows))
}

fn cell(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    }
}

/// Columns padded to their widest cell, as kubectl prints them.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i == last {
                out.push_str(c);
            } else {
                out.push_str(&format!("{c:<w$}   "));
            }
        }
        out.push('\n');
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
    out
}

pub async fn delete(api: &Api, kind: DeleteKind, namespace: &str, name: &str) -> Result<String, CtlError> {
    let (path, label) = match kind {
        DeleteKind::Policy => ("policies", "ResiliencePolicy"),
        DeleteKind::Service => ("services", "Service"),
    };
    let v = api.call(Method::DELETE, &format!("/api/v1/{path}/{namespace}/{name}"), None).await?;
    Ok(format!("{label} {namespace}/{name} deleted (revision {})\n", v["revision"]))
}

pub async fn describe(api: &Api, namespace: &str, name: &str, output: Output) -> Result<String, CtlError> {
    let v = api.call(Method::GET, &format!("/api/v1/services/{namespace}/{name}"), None).await?;
    if output == Output::Json {
        return Ok(pretty(&v));
    }
    let mut out = format!("Service:   {name}.{namespace}\n");
    let ports: Vec<String> = v["service"]["spec"]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            format!("{}{}", p["port"], p["protocol"].as_str().map(|x| format!("/{x}")).unwrap_or_default())
        })
        .collect();
    out.push_str(&format!(
        "Ports:     {}\n",
        if ports.is_empty() { "detected".into() } else { ports.join(", ") }
    ));
    match v["policy"]["metadata"]["name"].as_str() {
        Some(p) => out.push_str(&format!("Policy:    {p}\n{}\n", indent(&pretty(&v["policy"]["spec"])))),
        None => out.push_str("Policy:    none (no resilience policy targets it)\n"),
    }
    out.push_str("Endpoints:\n");
    let eps: Vec<Vec<String>> = v["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| ["address", "weight", "source", "pod"].iter().map(|k| cell(&e[*k])).collect())
        .collect();
    out.push_str(&indent(&table(&["ADDRESS", "WEIGHT", "SOURCE", "POD"], &eps)));
    for (title, key) in [("Its sidecars", "replicas"), ("Sidecars calling it", "callers")] {
        let rows: Vec<Vec<String>> = v[key]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                vec![
                    format!(
                        "{}/{}",
                        p["namespace"].as_str().unwrap_or("?"),
                        p["pod"].as_str().unwrap_or("?")
                    ),
                    p["state"].as_str().unwrap_or("?").to_owned(),
                    p["acked"].to_string(),
                    p["nack"]["reason"].as_str().unwrap_or("-").to_owned(),
                ]
            })
            .collect();
        out.push_str(&format!("{title}:\n"));
        out.push_str(&indent(&table(&["PROXY", "STATE", "ACKED", "NACK"], &rows)));
    }
    out.push_str(&format!("Revision:  {}\n", v["revision"]));
    Ok(out)
}

/// `ballastctl crd`: the CustomResourceDefinition, generated from the policy types so that
/// the cluster's schema is the one this build validates with. Needs no control plane.
pub fn crd() -> String {
    ballast_api::crd::crd_yaml()
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("  {l}\n")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align() {
        let t = table(&["A", "LONGER"], &[vec!["wide-cell".into(), "x".into()]]);
        assert_eq!(t, "A           LONGER\nwide-cell   x\n");
    }

    #[test]
    fn errors_name_the_sidecars() {
        let v = json!({
            "error": "timed out",
            "behind": [{"proxy": "shop/web-1", "acked": 4, "replica": "cp-a"}],
            "refused": [{"proxy": "shop/web-2", "version": 9, "reason": "spec.x: bad"}],
        });
        let s = error_text(StatusCode::GATEWAY_TIMEOUT, &v);
        assert!(s.contains("shop/web-1 is at version 4 (served by cp-a)"), "{s}");
        assert!(s.contains("shop/web-2 refused version 9: spec.x: bad"), "{s}");
    }
}
