//! The control plane client (DESIGN §3): one `ballast.v1.Discovery/Stream` that announces
//! this sidecar and receives its configuration.
//!
//! The sidecar says `Hello` (pod, namespace, service, the endpoint to register, what it
//! calls, and the version it already runs), then applies each `ToSidecar` it receives
//! and answers it: `Ack` once applied, `Nack` with the reason when it is refused. While
//! the stream lives the control plane keeps this sidecar's endpoint registered, so the
//! stream is also the sidecar's presence in the mesh.
//!
//! Decisions, and why:
//! * **One source of truth.** With `--control-plane`, a static `--config` is refused
//!   (the flags are mutually exclusive): two sources would silently overwrite each
//!   other's configuration at every change of either.
//! * **Not ready until the first snapshot.** The configuration comes only from the
//!   control plane, so `/ready` stays 503 until one is applied: a pod that does not
//!   know its routes yet gets no traffic.
//! * **A lost control plane is not an outage.** When the stream breaks, the applied
//!   configuration stays and the sidecar keeps serving with it while it reconnects;
//!   `ballast_control_plane_connected` says 0 in the meantime. The resources it was built
//!   from stay too, so an incremental update after a reconnect applies on top of them
//!   (`Hello.have_version` tells the control plane which version that is).
//! * **A refused update changes nothing.** An update is built on a copy of the resources
//!   and applied only when every resource decodes and validates and the set is
//!   consistent (one policy per service, one service per virtual address); else the
//!   copy is dropped, the previous configuration stays, and the Nack names the resource
//!   key and the field. The control plane shows it in `ballastctl get proxies`.
//! * **Reconnect with jittered exponential backoff**: 100 ms doubling to 5 s, each delay
//!   multiplied by a random factor in [0.5, 1] ("equal jitter"). The jitter spreads a
//!   fleet's reconnects after a control plane restart, so thousands of sidecars do not
//!   arrive in the same instant; the floor of half the delay keeps a sidecar from
//!   spinning on an endpoint that is down, which full jitter's delays near zero would
//!   allow. The delay returns to 100 ms once a stream delivered a snapshot: the next
//!   failure is a new outage, and the sidecar should be back as soon as the control
//!   plane is.
//! * **Several endpoints, rotated.** `--control-plane` takes a list (replicas, or one
//!   Service address). The first is picked at random so sidecars spread over replicas;
//!   each failure moves to the next, so a dead replica costs one attempt.
//! * **A dead peer is noticed.** HTTP/2 keep-alive pings every 10 s with a 5 s timeout
//!   end a stream whose control plane vanished without closing it (a crashed node, a
//!   dropped route), instead of leaving the sidecar listening to nothing. tonic's
//!   server accepts such pings; a gRPC-go server would need its keep-alive enforcement
//!   policy relaxed.
//! * **Drain deregisters at once.** When the drain starts, the client ends its side of
//!   the stream (end-of-stream, not a reset) and stops: the control plane removes this
//!   pod's endpoint immediately, so callers stop picking it while it finishes its
//!   requests, instead of waiting for the endpoint's lease to expire.
//! * **The advertised endpoint** (`--advertise-addr`, registered for `--service`)
//!   defaults to the pod IP (`BALLAST_POD_IP` or `POD_IP`, set by the injector from the
//!   downward API) with the inbound listener's port, since other pods reach the app
//!   through this sidecar's inbound listener; else to the inbound address when it is
//!   bound to a specific IP; else to 127.0.0.1 with the inbound port (one machine, no
//!   pod IP): see [`default_advertise_addr`].

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ballast_api::proto::v1::discovery_client::DiscoveryClient;
use ballast_api::proto::v1::{Ack, FromSidecar, Hello, Nack, Resource, ToSidecar, from_sidecar};
use ballast_api::{Config, ConfigError, Document, FieldError, ResiliencePolicy, Service};
use prometheus::IntGauge;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::Status;
use tonic::codec::Streaming;
use tonic::transport::Endpoint;

use crate::drain::Shutdown;
use crate::identity::MeshIdentity;
use crate::identity::certify::{TlsConnector, for_connector};
use crate::metrics::Metrics;
use crate::routes::ConfigStore;

/// Label of `ballast_config_rejected_total` for refused updates.
const SOURCE_LABEL: &str = "control-plane";

/// TCP connect (and HTTP/2 handshake) to one control plane endpoint.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the control plane may take to answer the stream request (its response
/// headers). Without it, a server that accepts the connection but never answers (the
/// wrong port, a wedged process) would hold the sidecar forever.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 keep-alive: a ping this often, and the connection is dead when a ping is not
/// answered within the timeout.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// After ending its side of the stream on drain, how long the client waits for the
/// control plane to end its side (so the stream closes with trailers, not a reset).
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Reconnect backoff: the first delay, and the cap it doubles up to.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Largest message accepted from the control plane. tonic's default (4 MiB) would be hit
/// by a full snapshot of a large namespace, and a message over the limit fails the
/// stream every time it is sent, so the sidecar would never get its configuration.
const MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// Who this sidecar is and where its control plane is, from the command line.
#[derive(Debug, Clone)]
pub struct ControlOptions {
    /// Control plane gRPC URLs, like `http://127.0.0.1:8086`.
    pub endpoints: Vec<String>,
    /// This sidecar's identity (with `namespace`); unique per sidecar in a namespace.
    pub pod: String,
    pub namespace: String,
    /// The service this sidecar fronts; `None` for a pure client.
    pub service: Option<String>,
    /// The endpoint registered for `service` (this sidecar's inbound listener as other
    /// pods reach it).
    pub address: Option<SocketAddr>,
    /// The app's ports.
    pub ports: Vec<u32>,
    /// Services this sidecar calls, `name.namespace`; empty means every service of its
    /// namespace.
    pub calls: Vec<String>,
}

/// The endpoint to register when `--advertise-addr` is not given: `pod_ip` (from
/// `BALLAST_POD_IP`/`POD_IP`) with the inbound port; else the inbound address when it is
/// bound to a specific IP; else 127.0.0.1 with the inbound port. `inbound` is the bound
/// inbound listener's address (its real port, even when 0 was asked for).
pub fn default_advertise_addr(inbound: SocketAddr, pod_ip: Option<IpAddr>) -> SocketAddr {
    match pod_ip {
        Some(ip) => SocketAddr::new(ip, inbound.port()),
        None if !inbound.ip().is_unspecified() => inbound,
        None => SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), inbound.port()),
    }
}

/// Checks a `--control-plane` URL: `http://host:port`, or `https://host:port` when the
/// mesh has identity (the control plane then serves TLS). Returns it unchanged when valid.
pub fn parse_url(url: &str) -> Result<String, String> {
    let uri: http::Uri =
        url.parse().map_err(|e| format!("{url:?} is not a URL ({e}); expected http://HOST:PORT"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => {
            return Err(format!(
                "{url:?} does not start with http:// or https://; expected http://HOST:PORT"
            ));
        }
    }
    if uri.authority().is_none_or(|a| a.host().is_empty()) {
        return Err(format!("{url:?} names no host; expected http://HOST:PORT"));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(format!(
            "{url:?} has a path; expected http://HOST:PORT (the gRPC port, 8086 by default)"
        ));
    }
    Ok(url.to_owned())
}

/// Checks `--pod`: the control plane's identity of this sidecar (with its namespace), at
/// most 253 characters with no `/`, whitespace or control characters.
pub fn check_pod(pod: &str) -> Result<(), String> {
    if pod.is_empty()
        || pod.len() > 253
        || pod.contains('/')
        || pod.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "{pod:?} is not a pod name (1-253 characters, no '/', spaces or control characters)"
        ));
    }
    Ok(())
}

/// Normalizes `--calls`: each `NAME` or `NAME.NAMESPACE` becomes `name.namespace`, a
/// short name taking `namespace` (this sidecar's), as a short host name does.
pub fn parse_calls(calls: &[String], namespace: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::with_capacity(calls.len());
    for call in calls.iter().map(|c| c.trim()).filter(|c| !c.is_empty()) {
        let (name, ns) = call.split_once('.').unwrap_or((call, namespace));
        if !ballast_api::policy::dns_label(name) || !ballast_api::policy::dns_label(ns) {
            return Err(format!(
                "{call:?} is not NAME or NAME.NAMESPACE (lowercase letters, digits and '-' in each)"
            ));
        }
        let call = format!("{name}.{ns}");
        if !out.contains(&call) {
            out.push(call);
        }
    }
    Ok(out)
}

/// Runs the control plane client until the drain starts: connects, applies what the
/// control plane sends, and reconnects when the stream breaks.
pub async fn run(
    opts: ControlOptions,
    identity: Option<Arc<MeshIdentity>>,
    store: Arc<ConfigStore>,
    metrics: Metrics,
    shutdown: Shutdown,
) {
    if opts.endpoints.is_empty() {
        tracing::error!("no control plane endpoint given; the sidecar gets no configuration");
        return;
    }
    if let Some(identity) = identity.as_ref().filter(|i| i.has_workload_identity()) {
        // The stream registers this pod as an endpoint callers reach over mesh TLS, and
        // the control plane reads the identity from the certificate the stream presents.
        tracing::info!("waiting for the workload certificate before opening the control plane stream");
        tokio::select! {
            _ = shutdown.signaled() => return,
            _ = identity.ready() => {}
        }
    }
    let mut client = Client { opts, identity, store, metrics, shutdown, applied: Applied::default() };
    let mut next = rand::random_range(0..client.opts.endpoints.len());
    let mut backoff = Backoff::default();
    loop {
        let endpoint = client.opts.endpoints[next].clone();
        let mut delivered = false;
        let error = match client.session(&endpoint, &mut delivered).await {
            Ok(()) => return,
            Err(e) => e,
        };
        if delivered {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        if client.store.is_ready() {
            tracing::warn!(
                endpoint = %endpoint, error = %error, retry_in = ?delay, version = client.applied.version,
                "control plane stream failed; serving with the last configuration, reconnecting"
            );
        } else {
            tracing::warn!(
                endpoint = %endpoint, error = %error, retry_in = ?delay,
                "control plane stream failed; not ready until it sends a configuration, reconnecting"
            );
        }
        next = (next + 1) % client.opts.endpoints.len();
        tokio::select! {
            _ = client.shutdown.signaled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Why a stream failed, with what the operator should check.
#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error("{0:?} is not a valid URL ({1}); check --control-plane")]
    Url(String, String),
    #[error(
        "cannot connect: {0}; check that the control plane runs, listens there (its gRPC port, 8086 by default) and is reachable from this pod"
    )]
    Connect(String),
    #[error(
        "no answer to the stream request within {OPEN_TIMEOUT:?}; check that the URL is the control plane's gRPC port (8086 by default), not its admin port"
    )]
    OpenTimeout,
    #[error(
        "the stream request failed: {0}; check that the URL is the control plane's gRPC port (8086 by default) and its logs"
    )]
    Open(String),
    #[error(
        "the control plane refused this sidecar: {0}; check --pod, --namespace, --service, --advertise-addr and --calls"
    )]
    Refused(String),
    #[error(
        "the stream broke: {0}; the control plane may be restarting (check its logs), or it runs a version this sidecar cannot read"
    )]
    Broken(String),
    #[error("the control plane ended the stream; it may be restarting or moving sidecars to other replicas")]
    Ended,
}

/// A status as one line: its code, message and cause (`Status`'s `Display` also prints
/// empty details and metadata).
fn describe(status: &Status) -> String {
    let head = match status.message() {
        "" => format!("{:?}", status.code()),
        message => format!("{:?}: {message}", status.code()),
    };
    ballast_api::errors::with_sources(head, std::error::Error::source(status))
}

/// The jittered exponential backoff between attempts (module docs): "equal jitter", each
/// delay in [d/2, d] for a step d doubling from `base` to `max`. Also the identity
/// client's, with its own bounds.
pub(crate) struct Backoff {
    next: Duration,
    base: Duration,
    max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(BACKOFF_BASE, BACKOFF_MAX)
    }
}

impl Backoff {
    pub(crate) fn new(base: Duration, max: Duration) -> Self {
        Self { next: base, base, max }
    }

    pub(crate) fn reset(&mut self) {
        self.next = self.base;
    }

    /// The delay before the next attempt, in [d/2, d] for the current step d.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let delay = self.next.mul_f64(rand::random_range(0.5..=1.0));
        self.next = (self.next * 2).min(self.max);
        delay
    }
}

/// The resources of the applied configuration by key (`Kind/namespace/name`), each
/// decoded and validated once, when it arrives.
type Resources = BTreeMap<String, Arc<Document>>;

/// What the control plane gave, as applied.
#[derive(Default)]
struct Applied {
    resources: Resources,
    /// The applied version; 0 while nothing from the control plane is applied.
    version: u64,
}

struct Client {
    opts: ControlOptions,
    identity: Option<Arc<MeshIdentity>>,
    store: Arc<ConfigStore>,
    metrics: Metrics,
    shutdown: Shutdown,
    applied: Applied,
}

/// Sets `ballast_control_plane_connected` to 0 when the stream ends, however it ends.
struct ConnectedGauge(IntGauge);

impl Drop for ConnectedGauge {
    fn drop(&mut self) {
        self.0.set(0);
    }
}

impl Client {
    fn hello(&self) -> Hello {
        let o = &self.opts;
        Hello {
            pod: o.pod.clone(),
            namespace: o.namespace.clone(),
            service: o.service.clone().unwrap_or_default(),
            address: o.address.map(|a| a.to_string()).unwrap_or_default(),
            ports: o.ports.clone(),
            proxy_version: env!("CARGO_PKG_VERSION").to_owned(),
            calls: o.calls.clone(),
            have_version: self.applied.version,
        }
    }

    /// One stream to `endpoint`, until it fails (`Err`) or the drain starts (`Ok`).
    /// `delivered` is set once the stream delivered a snapshot.
    async fn session(&mut self, endpoint: &str, delivered: &mut bool) -> Result<(), StreamError> {
        let uri = if self.identity.is_some() { for_connector(endpoint) } else { endpoint.to_owned() };
        let channel = Endpoint::from_shared(uri)
            .map_err(|e| StreamError::Url(endpoint.to_owned(), ballast_api::errors::chain(&e)))?
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        let connect = async {
            match &self.identity {
                // Over TLS, presenting the workload certificate.
                Some(identity) => {
                    channel
                        .connect_with_connector(TlsConnector { config: identity.tls.control_plane.clone() })
                        .await
                }
                None => channel.connect().await,
            }
        };
        let channel = tokio::select! {
            _ = self.shutdown.signaled() => return Ok(()),
            c = connect => c.map_err(|e| StreamError::Connect(ballast_api::errors::chain(&e)))?,
        };
        let mut client = DiscoveryClient::new(channel).max_decoding_message_size(MAX_MESSAGE);
        // The outbound half: Hello first, then an Ack or Nack per update. Unbounded, as
        // it holds at most one small answer per message received. Dropping the sender
        // ends the request stream (end-of-stream to the control plane).
        let (tx, rx) = mpsc::unbounded_channel();
        let hello = self.hello();
        let _ = tx.send(FromSidecar { message: Some(from_sidecar::Message::Hello(hello)) });
        let open = tokio::time::timeout(OPEN_TIMEOUT, client.stream(UnboundedReceiverStream::new(rx)));
        let mut inbound: Streaming<ToSidecar> = tokio::select! {
            _ = self.shutdown.signaled() => return Ok(()),
            r = open => match r {
                Err(_) => return Err(StreamError::OpenTimeout),
                Ok(Err(status)) if status.code() == tonic::Code::InvalidArgument => {
                    return Err(StreamError::Refused(describe(&status)));
                }
                Ok(Err(status)) => return Err(StreamError::Open(describe(&status))),
                Ok(Ok(response)) => response.into_inner(),
            },
        };
        tracing::debug!(%endpoint, "control plane stream open");
        let connected = ConnectedGauge(self.metrics.control_plane_connected.clone());
        loop {
            let received = tokio::select! {
                biased;
                _ = self.shutdown.signaled() => {
                    drop(connected);
                    close(tx, inbound).await;
                    tracing::info!(%endpoint, "drain: control plane stream closed; this pod's endpoint is deregistered");
                    return Ok(());
                }
                m = inbound.message() => m,
            };
            let msg = match received {
                Ok(Some(msg)) => msg,
                Ok(None) => return Err(StreamError::Ended),
                Err(status) => return Err(StreamError::Broken(describe(&status))),
            };
            if connected.0.get() == 0 {
                connected.0.set(1);
                tracing::info!(%endpoint, version = msg.version, full = msg.full, "connected to the control plane");
            }
            *delivered |= msg.full;
            let answer = self.update(msg);
            if tx.send(FromSidecar { message: Some(answer) }).is_err() {
                // The request stream is gone: the connection broke under it.
                return Err(StreamError::Broken("the request stream closed".into()));
            }
        }
    }

    /// Applies one update, or refuses it; returns the answer to send.
    fn update(&mut self, msg: ToSidecar) -> from_sidecar::Message {
        let version = msg.version;
        let (full, upserts, removals) = (msg.full, msg.upserts.len(), msg.removals.len());
        match next_config(&self.applied.resources, msg) {
            Ok((resources, config)) => {
                tracing::info!(
                    version,
                    full,
                    upserts,
                    removals,
                    services = config.services.len(),
                    policies = config.policies.len(),
                    "configuration from the control plane applied"
                );
                self.store.apply(config);
                self.applied = Applied { resources, version };
                from_sidecar::Message::Ack(Ack { version })
            }
            Err(reason) => {
                self.metrics.config_reload_errors.with_label_values(&[SOURCE_LABEL]).inc();
                tracing::error!(
                    version, reason = %reason, applied = self.applied.version,
                    "configuration from the control plane rejected; keeping the previous one"
                );
                from_sidecar::Message::Nack(Nack { version, reason })
            }
        }
    }
}

/// Ends the stream from this side: end-of-stream on the request, then a short wait for
/// the control plane to finish its side, so neither side sees a reset.
async fn close(tx: mpsc::UnboundedSender<FromSidecar>, mut inbound: Streaming<ToSidecar>) {
    drop(tx);
    let rest = async { while let Ok(Some(_)) = inbound.message().await {} };
    let _ = tokio::time::timeout(CLOSE_GRACE, rest).await;
}

/// The resources after `msg` and the configuration they make, or why `msg` is refused
/// (naming the resource key and the field). `current` is left as it is: the caller
/// commits the result only once it is applied.
fn next_config(current: &Resources, msg: ToSidecar) -> Result<(Resources, Config), String> {
    let mut resources = if msg.full { Resources::new() } else { current.clone() };
    for r in msg.upserts {
        let doc = decode(&r).map_err(|e| format!("{}: {e}", r.key))?;
        resources.insert(r.key, Arc::new(doc));
    }
    for key in &msg.removals {
        resources.remove(key);
    }
    // The same checks as a file's (`Config::from_yaml`): one policy per target service,
    // one service per virtual address and port. A document's "line" is its position, so
    // an error can be traced back to its key.
    let docs = resources.values().enumerate().map(|(i, d)| (i as u64 + 1, Document::clone(d))).collect();
    let config = match Config::from_documents(docs, &format!("control-plane version {}", msg.version)) {
        Ok(config) => config,
        Err(e) => {
            let keys: Vec<&str> = resources.keys().map(String::as_str).collect();
            return Err(explain(e, &keys));
        }
    };
    Ok((resources, Config { version: msg.version, ..config }))
}

/// A set-level error, naming resource keys instead of the positions it was given.
fn explain(e: ConfigError, keys: &[&str]) -> String {
    let key = |line: u64| keys.get(line.saturating_sub(1) as usize).copied().unwrap_or("?");
    match e {
        ConfigError::Conflict { line, first_line, message, .. } => {
            format!("{}: {message} (conflicts with {})", key(line), key(first_line))
        }
        ConfigError::Duplicate { line, first_line, .. } => {
            format!("{}: the same resource as {}", key(line), key(first_line))
        }
        ConfigError::Invalid { line, error, .. } => format!("{}: {error}", key(line)),
        other => other.to_string(),
    }
}

/// Decodes and validates one resource, as `parse_documents` does a file's document.
fn decode(r: &Resource) -> Result<Document, String> {
    fn fields(errs: Vec<FieldError>) -> String {
        errs.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
    }
    let json = |e: serde_json::Error| format!("invalid JSON: {e}");
    let doc = match r.kind.as_str() {
        "Service" => {
            let s: Service = serde_json::from_slice(&r.json).map_err(json)?;
            if s.kind != "Service" {
                return Err(format!("kind: must be Service, got {:?}", s.kind));
            }
            s.validate().map_err(fields)?;
            Document::Service(Box::new(s))
        }
        "ResiliencePolicy" => {
            let p: ResiliencePolicy = serde_json::from_slice(&r.json).map_err(json)?;
            p.validate().map_err(fields)?;
            Document::Policy(Box::new(p))
        }
        other => return Err(format!("unknown kind {other:?}; expected Service or ResiliencePolicy")),
    };
    // The key is how later updates name the resource (removals, replacements): one that
    // does not match the resource's own kind, namespace and name would make them act on
    // the wrong one.
    let expected = format!("{}/{}", doc.kind(), doc.key());
    if r.key != expected {
        return Err(format!("the key does not match the resource, which is {expected}"));
    }
    Ok(doc)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use ballast_api::proto::v1::discovery_server::{Discovery, DiscoveryServer};
    use serde_json::json;
    use tokio::net::TcpListener;
    use tokio::task::JoinHandle;
    use tokio::time::timeout;
    use tokio_stream::wrappers::TcpListenerStream;
    use tonic::{Request, Response};

    use super::*;
    use crate::client::Clients;
    use crate::stack::StackContext;

    const WAIT: Duration = Duration::from_secs(10);

    /// What the fake control plane sees of a stream.
    #[derive(Debug)]
    enum Event {
        Msg(from_sidecar::Message),
        End,
        Error(#[allow(dead_code, reason = "shown when a test fails")] Status),
    }

    /// One stream as the test drives it.
    struct Conn {
        events: mpsc::UnboundedReceiver<Event>,
        to: mpsc::UnboundedSender<Result<ToSidecar, Status>>,
    }

    impl Conn {
        async fn event(&mut self) -> Event {
            timeout(WAIT, self.events.recv()).await.expect("an event in time").expect("the stream task lives")
        }
        async fn msg(&mut self) -> from_sidecar::Message {
            match self.event().await {
                Event::Msg(m) => m,
                other => panic!("expected a message, got {other:?}"),
            }
        }
        fn send(&self, msg: ToSidecar) {
            self.to.send(Ok(msg)).expect("the response stream is open");
        }
    }

    /// A control plane that hands each stream to the test; refuses streams while
    /// `accepting` is false.
    struct Fake {
        conns: mpsc::UnboundedSender<Conn>,
        accepting: Arc<AtomicBool>,
    }

    #[tonic::async_trait]
    impl Discovery for Fake {
        type StreamStream = UnboundedReceiverStream<Result<ToSidecar, Status>>;

        async fn stream(
            &self,
            request: Request<Streaming<FromSidecar>>,
        ) -> Result<Response<Self::StreamStream>, Status> {
            if !self.accepting.load(Ordering::SeqCst) {
                return Err(Status::unavailable("not serving yet"));
            }
            let mut inbound = request.into_inner();
            let (events, events_rx) = mpsc::unbounded_channel();
            let (to, to_rx) = mpsc::unbounded_channel();
            tokio::spawn(async move {
                loop {
                    let ev = match inbound.message().await {
                        Ok(Some(m)) => Event::Msg(m.message.expect("a message")),
                        Ok(None) => Event::End,
                        Err(s) => Event::Error(s),
                    };
                    let last = !matches!(ev, Event::Msg(_));
                    let _ = events.send(ev);
                    if last {
                        return;
                    }
                }
            });
            let _ = self.conns.send(Conn { events: events_rx, to });
            Ok(Response::new(UnboundedReceiverStream::new(to_rx)))
        }
    }

    struct Server {
        url: String,
        conns: mpsc::UnboundedReceiver<Conn>,
        accepting: Arc<AtomicBool>,
        task: JoinHandle<()>,
    }

    impl Server {
        async fn start(accepting: bool) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            let (conns_tx, conns) = mpsc::unbounded_channel();
            let accepting = Arc::new(AtomicBool::new(accepting));
            let fake = Fake { conns: conns_tx, accepting: accepting.clone() };
            let task = tokio::spawn(async move {
                let _ = tonic::transport::Server::builder()
                    .add_service(DiscoveryServer::new(fake))
                    .serve_with_incoming(TcpListenerStream::new(listener))
                    .await;
            });
            Server { url, conns, accepting, task }
        }

        async fn conn(&mut self) -> Conn {
            timeout(WAIT, self.conns.recv()).await.expect("a stream in time").expect("the server lives")
        }
    }

    struct Sidecar {
        store: Arc<ConfigStore>,
        metrics: Metrics,
        shutdown: Shutdown,
        task: JoinHandle<()>,
    }

    fn sidecar(endpoints: Vec<String>) -> Sidecar {
        let metrics = Metrics::new();
        let ctx = StackContext::new(Clients::new(Duration::from_secs(1)), metrics.clone());
        let store = ConfigStore::new(ctx, "shop", Some("payments"));
        let shutdown = Shutdown::new();
        let opts = ControlOptions {
            endpoints,
            pod: "payments-1".into(),
            namespace: "shop".into(),
            service: Some("payments".into()),
            address: Some("10.0.0.7:4143".parse().unwrap()),
            ports: vec![8080],
            calls: vec!["catalog.shop".into()],
        };
        let task = tokio::spawn(run(opts, None, store.clone(), metrics.clone(), shutdown.clone()));
        Sidecar { store, metrics, shutdown, task }
    }

    async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let polled = async {
            while !cond() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        timeout(WAIT, polled).await.unwrap_or_else(|_| panic!("timed out waiting for {what}"));
    }

    fn service(endpoint: &str) -> Resource {
        let s = json!({
            "apiVersion": "ballast.io/v1alpha1", "kind": "Service",
            "metadata": {"name": "payments", "namespace": "shop"},
            "spec": {"ports": [{"port": 80}], "endpoints": [{"address": endpoint}]}
        });
        Resource { kind: "Service".into(), key: "Service/shop/payments".into(), json: s.to_string().into() }
    }

    fn policy(ratio: f64) -> Resource {
        let p = json!({
            "apiVersion": "ballast.io/v1alpha1", "kind": "ResiliencePolicy",
            "metadata": {"name": "payments", "namespace": "shop"},
            "spec": {"targetRef": {"service": "payments"}, "retries": {"attempts": 2, "budget": {"ratio": ratio}}}
        });
        Resource {
            kind: "ResiliencePolicy".into(),
            key: "ResiliencePolicy/shop/payments".into(),
            json: p.to_string().into(),
        }
    }

    fn full(version: u64, upserts: Vec<Resource>) -> ToSidecar {
        ToSidecar { version, full: true, upserts, removals: vec![] }
    }

    fn hello(m: from_sidecar::Message) -> Hello {
        match m {
            from_sidecar::Message::Hello(h) => h,
            other => panic!("expected Hello, got {other:?}"),
        }
    }

    /// Takes the sidecar's stream to `server`, sends it a snapshot at version 7 and waits
    /// for the Ack; returns the stream and the sidecar's Hello.
    async fn snapshot_at_7(server: &mut Server) -> (Conn, Hello) {
        let mut conn = server.conn().await;
        let hello = hello(conn.msg().await);
        conn.send(full(7, vec![service("10.0.0.8:8080"), policy(0.2)]));
        assert_eq!(conn.msg().await, from_sidecar::Message::Ack(Ack { version: 7 }));
        (conn, hello)
    }

    #[tokio::test]
    async fn applies_a_snapshot_and_acks() {
        let mut server = Server::start(true).await;
        let sc = sidecar(vec![server.url.clone()]);
        let (_conn, hello) = snapshot_at_7(&mut server).await;
        assert_eq!(hello.pod, "payments-1");
        assert_eq!(hello.namespace, "shop");
        assert_eq!(hello.service, "payments");
        assert_eq!(hello.address, "10.0.0.7:4143");
        assert_eq!(hello.ports, vec![8080]);
        assert_eq!(hello.calls, vec!["catalog.shop"]);
        assert_eq!(hello.proxy_version, env!("CARGO_PKG_VERSION"));
        assert_eq!(hello.have_version, 0);
        assert!(sc.store.is_ready());
        let snap = sc.store.snapshot();
        assert_eq!(snap.version, 7);
        assert_eq!(snap.config.services["shop/payments"].spec.endpoints[0].address, "10.0.0.8:8080");
        assert!(snap.config.policy_for("shop", "payments").is_some());
        assert!(snap.by_authority("payments").is_some());
        assert_eq!(sc.metrics.control_plane_connected.get(), 1);
        assert_eq!(sc.metrics.config_version.get(), 7);
    }

    #[tokio::test]
    async fn nacks_an_invalid_update_and_keeps_the_old_config() {
        let mut server = Server::start(true).await;
        let sc = sidecar(vec![server.url.clone()]);
        let (mut conn, _) = snapshot_at_7(&mut server).await;
        // Incremental: a new endpoint (valid) with a broken policy; neither applies.
        conn.send(ToSidecar {
            version: 8,
            full: false,
            upserts: vec![service("10.0.0.9:8080"), policy(7.0)],
            removals: vec![],
        });
        let nack = match conn.msg().await {
            from_sidecar::Message::Nack(n) => n,
            other => panic!("expected a Nack, got {other:?}"),
        };
        assert_eq!(nack.version, 8);
        assert!(nack.reason.contains("ResiliencePolicy/shop/payments"), "{}", nack.reason);
        assert!(nack.reason.contains("spec.retries.budget.ratio"), "{}", nack.reason);
        let rejected = sc.metrics.config_reload_errors.with_label_values(&[SOURCE_LABEL]).get();
        assert_eq!(rejected, 1);
        let snap = sc.store.snapshot();
        assert_eq!(snap.version, 7);
        assert_eq!(snap.config.services["shop/payments"].spec.endpoints[0].address, "10.0.0.8:8080");
        // A removal of the policy on top of the kept resources (not the refused copy).
        conn.send(ToSidecar {
            version: 9,
            full: false,
            upserts: vec![],
            removals: vec!["ResiliencePolicy/shop/payments".into()],
        });
        assert_eq!(conn.msg().await, from_sidecar::Message::Ack(Ack { version: 9 }));
        let snap = sc.store.snapshot();
        assert_eq!(snap.version, 9);
        assert!(snap.config.policies.is_empty());
        assert_eq!(snap.config.services["shop/payments"].spec.endpoints[0].address, "10.0.0.8:8080");
        // A valid full snapshot is applied.
        conn.send(full(10, vec![service("10.0.0.9:8080")]));
        assert_eq!(conn.msg().await, from_sidecar::Message::Ack(Ack { version: 10 }));
        let snap = sc.store.snapshot();
        assert_eq!(snap.version, 10);
        assert_eq!(snap.config.services["shop/payments"].spec.endpoints[0].address, "10.0.0.9:8080");
        assert_eq!(sc.metrics.control_plane_connected.get(), 1, "a Nack does not end the stream");
    }

    #[tokio::test]
    async fn reconnects_and_keeps_config_when_the_server_goes_away() {
        let mut first = Server::start(true).await;
        // The second refuses streams until the first is gone, whichever the client tries first.
        let mut second = Server::start(false).await;
        let endpoints = vec![first.url.clone(), second.url.clone()];
        let sc = sidecar(endpoints);
        let (conn, _) = snapshot_at_7(&mut first).await;
        // The first control plane goes away: it stops listening and its stream breaks.
        first.task.abort();
        conn.to.send(Err(Status::unavailable("shutting down"))).unwrap();
        drop(conn);
        wait_for("control_plane_connected 0", || sc.metrics.control_plane_connected.get() == 0).await;
        let snap = sc.store.snapshot();
        assert_eq!(snap.version, 7, "the configuration stays while the control plane is away");
        assert!(snap.by_authority("payments").is_some());
        assert!(sc.store.is_ready());

        second.accepting.store(true, Ordering::SeqCst);
        let mut conn = second.conn().await;
        let hello = hello(conn.msg().await);
        assert_eq!(hello.have_version, 7);
        assert_eq!(hello.pod, "payments-1");
        // An incremental update applies on top of what the first one sent.
        conn.send(ToSidecar {
            version: 12,
            full: false,
            upserts: vec![service("10.0.0.9:8080")],
            removals: vec![],
        });
        assert_eq!(conn.msg().await, from_sidecar::Message::Ack(Ack { version: 12 }));
        let snap = sc.store.snapshot();
        assert_eq!(snap.version, 12);
        assert!(snap.config.policy_for("shop", "payments").is_some());
        assert_eq!(sc.metrics.control_plane_connected.get(), 1);
    }

    #[tokio::test]
    async fn closes_the_stream_on_drain() {
        let mut server = Server::start(true).await;
        let sc = sidecar(vec![server.url.clone()]);
        let (mut conn, _) = snapshot_at_7(&mut server).await;
        sc.shutdown.start();
        match timeout(Duration::from_secs(1), conn.events.recv()).await {
            Ok(Some(Event::End)) => {}
            other => panic!("expected a clean end of the stream within a second, got {other:?}"),
        }
        // The control plane ends its side in turn; the client returns at once.
        drop(conn);
        timeout(WAIT, sc.task).await.expect("the client stops on drain").unwrap();
        assert_eq!(sc.metrics.control_plane_connected.get(), 0);
        assert_eq!(sc.store.snapshot().version, 7);
    }

    #[tokio::test]
    async fn stops_on_drain_while_disconnected() {
        // Nothing listens there: the client is in its backoff loop.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        drop(listener);
        let sc = sidecar(vec![url]);
        tokio::task::yield_now().await;
        sc.shutdown.start();
        timeout(WAIT, sc.task).await.expect("the client stops on drain").unwrap();
        assert!(!sc.store.is_ready(), "nothing was applied");
    }

    #[test]
    fn refuses_what_it_cannot_apply() {
        let current = Resources::new();
        let err = |r: Resource| next_config(&current, full(1, vec![r])).unwrap_err();
        let mut unknown = service("10.0.0.1:80");
        unknown.kind = "Gateway".into();
        assert!(err(unknown).contains("unknown kind \"Gateway\""));
        let mut wrong_key = service("10.0.0.1:80");
        wrong_key.key = "Service/shop/other".into();
        let e = err(wrong_key);
        assert!(e.starts_with("Service/shop/other: ") && e.contains("Service/shop/payments"), "{e}");
        let mut bad_json = service("10.0.0.1:80");
        bad_json.json = br#"{"apiVersion": "ballast.io/v1alpha1", "kind": "Service", "metadata": {"name": "payments"}, "spec": {"endpoint": []}}"#.to_vec();
        assert!(err(bad_json).contains("unknown field `endpoint`"));
        let bad_endpoint = service("nowhere");
        assert!(err(bad_endpoint).contains("spec.endpoints[0].address"));
        // Two policies for one service: the set is refused, naming both.
        let mut other = policy(0.2);
        other.key = "ResiliencePolicy/shop/other".into();
        other.json = String::from_utf8(other.json)
            .unwrap()
            .replace("\"name\":\"payments\"", "\"name\":\"other\"")
            .into();
        let e = next_config(&current, full(1, vec![policy(0.2), other])).unwrap_err();
        assert!(
            e.contains("ResiliencePolicy/shop/payments") && e.contains("ResiliencePolicy/shop/other"),
            "{e}"
        );
        assert!(e.contains("second ResiliencePolicy targets service shop/payments"), "{e}");
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let mut b = Backoff::default();
        let mut step = BACKOFF_BASE;
        for _ in 0..10 {
            let d = b.next_delay();
            assert!(d >= step / 2 && d <= step, "{d:?} not in [{:?}, {step:?}]", step / 2);
            step = (step * 2).min(BACKOFF_MAX);
        }
        b.reset();
        assert!(b.next_delay() <= BACKOFF_BASE);
    }

    #[test]
    fn checks_pod_names() {
        assert!(check_pod("payments-7d9f-x2").is_ok());
        for bad in ["", "a/b", "a b", "a\tb", &"x".repeat(254)] {
            assert!(check_pod(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn normalizes_calls() {
        let calls = |c: &[&str]| parse_calls(&c.iter().map(|s| s.to_string()).collect::<Vec<_>>(), "shop");
        assert_eq!(calls(&[]).unwrap(), Vec::<String>::new());
        assert_eq!(
            calls(&["catalog", "search.other", " catalog.shop ", ""]).unwrap(),
            ["catalog.shop", "search.other"]
        );
        for bad in ["Catalog", "a.b.c", "a.", ".b", "a_b"] {
            assert!(calls(&[bad]).unwrap_err().contains(&format!("{bad:?}")), "{bad}");
        }
    }

    #[test]
    fn checks_urls_and_defaults_the_advertised_address() {
        assert_eq!(parse_url("http://127.0.0.1:8086").unwrap(), "http://127.0.0.1:8086");
        assert!(parse_url("http://control-plane.ballast:8086/").is_ok());
        assert!(parse_url("https://ballast-control-plane.ballast-system.svc:8086").is_ok());
        for bad in ["127.0.0.1:8086", "ftp://x:1", "http://x:8086/v1", "http://", "not a url"] {
            assert!(parse_url(bad).unwrap_err().contains(&format!("{bad:?}")), "{bad}");
        }
        let inbound: SocketAddr = "0.0.0.0:4143".parse().unwrap();
        let pod_ip = Some("10.1.2.3".parse().unwrap());
        assert_eq!(default_advertise_addr(inbound, pod_ip), "10.1.2.3:4143".parse().unwrap());
        assert_eq!(default_advertise_addr(inbound, None), "127.0.0.1:4143".parse().unwrap());
        let specific: SocketAddr = "192.168.1.5:4143".parse().unwrap();
        assert_eq!(default_advertise_addr(specific, None), specific);
    }
}
