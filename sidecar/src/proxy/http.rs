//! The HTTP proxy: where a request goes, and how it is kept faithful on the way.
//!
//! Choosing the destination of an outbound request (DESIGN §2):
//! 1. the service whose virtual address the app dialled (original destination);
//! 2. else the service its `Host`/`:authority` names;
//! 3. else, when iptables redirected it, the original destination itself (passthrough);
//!    when the client used the sidecar as an HTTP proxy, the host of the absolute-form URI,
//!    resolved by DNS unless `--egress-dns=false`; an unknown host gets a 502 naming it.
//!
//! Faithfulness: hop-by-hop headers (RFC 9110 §7.6.1, and those `Connection` names) are
//! removed in both directions, except that an `Upgrade` handshake keeps its pair. `Expect:
//! 100-continue` is answered here (hyper sends the 100 when the body is first read) and
//! not sent upstream, as Envoy does. The request's authority travels unchanged: the
//! upstream sees the `Host` the app sent. HTTP/1.0 clients are spoken to in HTTP/1.0 and
//! upstream requests use HTTP/1.1 so connections can be pooled. Bodies are streamed, never
//! buffered, so memory stays bounded whatever their size.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ballast_api::names::{HEADER_ORIG_PROTO, HEADER_PEER_IDENTITY};
use ballast_api::service::Protocol as DeclaredProtocol;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use super::{ConnInfo, Shared, tcp};
use crate::body::{self, Body, BoxError};
use crate::metrics::{OpenConnection, PASSTHROUGH};
use crate::outcome::UpstreamFailure;
use crate::rejection::{Reason, text_response};
use crate::routes::{ServiceEntry, split_host_port};
use crate::stack::{Direction, HttpRequest, HttpService};
use crate::telemetry::RequestScope;

/// Handles one request received on a connection, within its telemetry scope: the
/// request id and trace context are settled on arrival, and its span and access-log line
/// are written when the response ends (see [`crate::telemetry`]).
pub async fn handle(
    shared: Arc<Shared>,
    conn: Arc<ConnInfo>,
    req: Request<Incoming>,
) -> Result<Response<Body>, BoxError> {
    let mut req = req.map(body::boxed);
    let mut scope = RequestScope::start(&shared.telemetry, &conn, &mut req);
    let result = match conn.direction {
        Direction::Outbound => outbound(shared, conn, req, &mut scope).await,
        Direction::Inbound => inbound(shared, conn, req, &mut scope).await,
    };
    scope.finish(result)
}

/// Where an outbound request goes.
enum Destination {
    Service(Arc<ServiceEntry>, u16),
    Endpoint(SocketAddr),
    /// Proxy mode, not a mesh service: resolve this authority.
    Resolve(String),
}

async fn outbound(
    shared: Arc<Shared>,
    conn: Arc<ConnInfo>,
    req: HttpRequest,
    scope: &mut RequestScope,
) -> Result<Response<Body>, BoxError> {
    // The rare paths (a CONNECT tunnel, a name to resolve) are boxed: inline, their
    // futures made every request's future several KiB, which hyper copies into its box.
    if req.method() == Method::CONNECT {
        return Box::pin(connect_tunnel(shared, conn, req)).await;
    }
    let authority = request_authority(&req);
    let authority_port = authority.as_deref().and_then(|a| split_host_port(a).1);
    let destination = {
        let snap = shared.store.load();
        let named = authority.as_deref().and_then(|a| snap.by_authority(a)).cloned();
        match conn.orig_dst {
            Some(dst) => match snap.by_original_dst(dst).cloned().or(named) {
                Some(svc) => Destination::Service(svc, dst.port()),
                None => Destination::Endpoint(dst),
            },
            None => match (named, &authority) {
                (Some(svc), _) => Destination::Service(svc, authority_port.unwrap_or(80)),
                (None, Some(a)) => Destination::Resolve(a.clone()),
                (None, None) => {
                    return Ok(text_response(
                        StatusCode::BAD_REQUEST,
                        "ballast: the request names no destination: send a Host header or an absolute-form URI",
                    ));
                }
            },
        }
    };
    let (stack, declared, fallback) = match destination {
        Destination::Service(svc, port) => {
            scope.route(&svc.label, svc.telemetry());
            (svc.stack(port), svc.protocol(port), SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port))
        }
        Destination::Endpoint(dst) => {
            scope.route(&passthrough_label(), None);
            (shared.ctx.endpoint_stack(Direction::Outbound, &passthrough_label(), dst), None, dst)
        }
        Destination::Resolve(a) => match Box::pin(resolve(shared.settings.egress_dns, a.clone(), 80)).await {
            Ok(addr) if shared.is_own_listener(addr, &conn) => {
                return Ok(text_response(
                    StatusCode::LOOP_DETECTED,
                    format!("ballast: {a} is this sidecar itself; the request would loop"),
                ));
            }
            Ok(addr) => {
                scope.route(&passthrough_label(), None);
                (shared.ctx.endpoint_stack(Direction::Outbound, &passthrough_label(), addr), None, addr)
            }
            Err(msg) => return Ok(text_response(StatusCode::BAD_GATEWAY, msg)),
        },
    };
    forward(shared, conn.direction, stack, req, authority, fallback, declared, scope).await
}

async fn inbound(
    shared: Arc<Shared>,
    conn: Arc<ConnInfo>,
    mut req: HttpRequest,
    scope: &mut RequestScope,
) -> Result<Response<Body>, BoxError> {
    // The mesh's own request headers are never taken from a caller: removed from every
    // request, and set again only from what this connection's handshake proved.
    let headers = req.headers_mut();
    headers.remove(HEADER_PEER_IDENTITY);
    let orig_proto = headers.remove(HEADER_ORIG_PROTO);
    let label = &shared.settings.inbound_label;
    scope.route(label, shared.store.load().telemetry.as_ref());
    let peer = conn.mesh_peer.as_deref();
    if let Some(peer) = peer {
        req.headers_mut().insert(HEADER_PEER_IDENTITY, peer.header.clone());
        // A client sidecar carried an HTTP/1 request over HTTP/2: the app hears HTTP/1.1.
        if orig_proto.is_some_and(|v| v.as_bytes() == b"HTTP/1.1") && req.version() == Version::HTTP_2 {
            *req.version_mut() = Version::HTTP_11;
        }
    }
    if let Some(counter) = &conn.peer_requests {
        counter.inc();
    }
    // Only a mesh caller is matched against local patterns, which need our trust domain.
    let current = peer.and(shared.identity.as_ref()).and_then(|m| m.current());
    let trust_domain = current.as_ref().map(|c| c.identity.trust_domain.as_str());
    let denied = if is_probe(&shared, &conn, &req) {
        Ok(())
    } else {
        shared.store.load().access.check(peer.map(|p| &p.identity), trust_domain)
    };
    if let Err(why) = denied {
        tracing::info!(peer = %conn.peer, identity = ?peer.map(|p| p.identity.to_string()), reason = %why, "inbound request forbidden");
        let stack = shared.ctx.rejecting_stack(Direction::Inbound, label, Reason::Forbidden, why);
        return Ok(stack
            .call(req)
            .await
            .unwrap_or_else(|_| text_response(StatusCode::FORBIDDEN, "ballast: forbidden")));
    }
    if req.method() == Method::CONNECT {
        return Ok(text_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "ballast: CONNECT is not accepted on the inbound side",
        ));
    }
    let target = shared.app_target(&conn);
    if shared.is_own_listener(target, &conn) {
        return Ok(text_response(
            StatusCode::LOOP_DETECTED,
            format!(
                "ballast: {target} is this sidecar's own listener; inbound traffic is only forwarded to the app"
            ),
        ));
    }
    let limited = { shared.store.load().inbound_stack(&shared.ctx, label, target) };
    let stack = limited.unwrap_or_else(|| shared.ctx.endpoint_stack(Direction::Inbound, label, target));
    let authority = request_authority(&req);
    forward(shared, conn.direction, stack, req, authority, target, None, scope).await
}

/// A plain-text GET or HEAD of one of the app's HTTP probes (`--inbound-probes`): the
/// kubelet's, which has no mesh certificate. Only the exact path (no query) on the
/// probe's port, so the exemption opens nothing else of the app.
fn is_probe(shared: &Shared, conn: &ConnInfo, req: &HttpRequest) -> bool {
    let probes = &shared.settings.inbound_probes;
    if probes.is_empty() || conn.mesh_peer.is_some() || !matches!(*req.method(), Method::GET | Method::HEAD) {
        return false;
    }
    let port = shared.app_target(conn).port();
    let path = req.uri().path();
    req.uri().query().is_none() && probes.iter().any(|(p, probe)| *p == port && probe == path)
}

fn passthrough_label() -> Arc<str> {
    static LABEL: std::sync::OnceLock<Arc<str>> = std::sync::OnceLock::new();
    LABEL.get_or_init(|| Arc::from(PASSTHROUGH)).clone()
}

/// Prepares the request for the upstream, calls the stack, and prepares the response for
/// the client.
#[allow(clippy::too_many_arguments)]
async fn forward(
    shared: Arc<Shared>,
    direction: Direction,
    stack: HttpService,
    mut req: HttpRequest,
    authority: Option<String>,
    fallback: SocketAddr,
    declared: Option<DeclaredProtocol>,
    scope: &mut RequestScope,
) -> Result<Response<Body>, BoxError> {
    let downstream_version = req.version();
    let upgrade = is_upgrade(&req);
    let upstream_version = match (upgrade, declared) {
        (true, _) => Version::HTTP_11,
        (_, Some(DeclaredProtocol::Http)) => Version::HTTP_11,
        (_, Some(DeclaredProtocol::Http2 | DeclaredProtocol::Grpc)) => Version::HTTP_2,
        _ if downstream_version == Version::HTTP_2 => Version::HTTP_2,
        _ => Version::HTTP_11,
    };
    strip_hop_by_hop(req.headers_mut(), upgrade);
    req.headers_mut().remove(header::EXPECT);

    let authority = authority.unwrap_or_else(|| fallback.to_string());
    // Absolute-form URIs win over Host (RFC 9112 §3.2.2): keep them consistent. Most
    // requests already carry the very Host, and are left alone (no copy per request).
    let host = match upstream_version {
        Version::HTTP_2 => None,
        _ if req.headers().get(header::HOST).is_some_and(|h| h.as_bytes() == authority.as_bytes()) => None,
        _ => Some(HeaderValue::from_str(&authority)),
    };
    // Takes the string's buffer rather than copying it.
    let Ok(parsed) = Authority::from_maybe_shared(bytes::Bytes::from(authority.into_bytes())) else {
        // Only the request's own authority can be invalid, never the fallback address.
        let named = request_authority(&req).unwrap_or_default();
        return Ok(text_response(StatusCode::BAD_REQUEST, format!("ballast: invalid host {named:?}")));
    };
    if req.uri().scheme().is_some_and(|s| *s != Scheme::HTTP) {
        return Ok(text_response(
            StatusCode::BAD_REQUEST,
            "ballast: only http:// URLs can be proxied as requests; use CONNECT for https",
        ));
    }
    let path = req.uri().path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = Some(parsed);
    parts.path_and_query = Some(path);
    *req.uri_mut() = Uri::from_parts(parts)?;
    if upstream_version == Version::HTTP_2 {
        // :authority carries it; a Host header alongside would be redundant.
        req.headers_mut().remove(header::HOST);
    } else if let Some(host) = host {
        req.headers_mut().insert(header::HOST, host?);
    }
    *req.version_mut() = upstream_version;

    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    scope.prepare(&mut req);
    let mut rsp = match stack.call(req).await {
        Ok(rsp) => rsp,
        // The stack turns upstream failures into responses; what is left is the stack
        // itself failing (its balancer gone), which the client still hears about.
        Err(e) => {
            let msg =
                format!("ballast: the service stack failed: {}", ballast_api::errors::chain(e.as_ref()));
            tracing::warn!(error = %msg);
            return Ok(text_response(StatusCode::BAD_GATEWAY, msg));
        }
    };
    if rsp.extensions().get::<UpstreamFailure>() == Some(&UpstreamFailure::Reset)
        && downstream_version == Version::HTTP_2
    {
        // Surface the reset as a reset: hyper resets the client's stream on an error.
        return Err("upstream reset the connection".into());
    }
    if rsp.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(downstream_upgrade) = downstream_upgrade
    {
        let upstream_upgrade = hyper::upgrade::on(&mut rsp);
        // The upgraded stream outlives this request: it is tracked by the drain and the
        // open-connection gauge in its own right.
        let tracked = (shared.shutdown.track(), OpenConnection::new(&shared.metrics, direction.as_str()));
        tokio::spawn(async move {
            match tokio::try_join!(downstream_upgrade, upstream_upgrade) {
                Ok((down, up)) => {
                    tcp::splice(&shared.metrics, direction, TokioIo::new(down), TokioIo::new(up)).await
                }
                Err(e) => tracing::info!(error = %e, "protocol upgrade failed"),
            }
            drop(tracked);
        });
        return Ok(rsp);
    }
    strip_hop_by_hop(rsp.headers_mut(), false);
    *rsp.version_mut() = downstream_version;
    Ok(rsp)
}

/// CONNECT host:port: a TCP tunnel (proxy mode), to a mesh service or a resolved host.
async fn connect_tunnel(
    shared: Arc<Shared>,
    conn: Arc<ConnInfo>,
    mut req: HttpRequest,
) -> Result<Response<Body>, BoxError> {
    let Some(authority) = req.uri().authority().map(|a| a.as_str().to_owned()) else {
        return Ok(text_response(StatusCode::BAD_REQUEST, "ballast: CONNECT needs host:port"));
    };
    let port = split_host_port(&authority).1.unwrap_or(443);
    let service_ep = { shared.store.load().by_authority(&authority).and_then(|s| s.tcp_endpoint(port)) };
    let target = match service_ep {
        Some(t) => t,
        None => match resolve(shared.settings.egress_dns, authority.clone(), 443).await {
            Ok(t) => crate::balance::Target::plain(t, 1),
            Err(msg) => return Ok(text_response(StatusCode::BAD_GATEWAY, msg)),
        },
    };
    if shared.is_own_listener(target.addr, &conn) {
        return Ok(text_response(
            StatusCode::LOOP_DETECTED,
            "ballast: CONNECT to this sidecar itself would loop",
        ));
    }
    let upstream = match tcp::connect_target(&shared, &target).await {
        Ok(s) => s,
        Err(e) => {
            return Ok(text_response(
                StatusCode::BAD_GATEWAY,
                format!("ballast: cannot connect to {authority} ({}): {e}", target.addr),
            ));
        }
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let direction = conn.direction;
    let tracked = (shared.shutdown.track(), OpenConnection::new(&shared.metrics, direction.as_str()));
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(down) => tcp::splice(&shared.metrics, direction, TokioIo::new(down), upstream).await,
            Err(e) => tracing::info!(error = %e, "CONNECT upgrade failed"),
        }
        drop(tracked);
    });
    Ok(Response::new(body::empty()))
}

/// Resolves `authority` (host[:port]) that is not a mesh service.
async fn resolve(egress_dns: bool, authority: String, default_port: u16) -> Result<SocketAddr, String> {
    let (host, port) = split_host_port(&authority);
    let port = port.unwrap_or(default_port);
    let host = host.to_owned();
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    if host.eq_ignore_ascii_case("localhost") {
        return Ok(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port));
    }
    if !egress_dns {
        return Err(format!(
            "ballast: unknown host {host:?}: it is not a mesh service, and resolving other hosts is off (--egress-dns=false)"
        ));
    }
    let lookup =
        tokio::time::timeout(Duration::from_secs(5), tokio::net::lookup_host(format!("{host}:{port}"))).await;
    match lookup {
        Ok(Ok(mut addrs)) => {
            addrs.next().ok_or_else(|| format!("ballast: unknown host {host:?}: no addresses"))
        }
        Ok(Err(e)) => Err(format!("ballast: unknown host {host:?}: {e}")),
        Err(_) => Err(format!("ballast: unknown host {host:?}: DNS lookup timed out")),
    }
}

/// The authority the request names: the URI's (absolute-form, HTTP/2) or `Host`.
fn request_authority<B>(req: &Request<B>) -> Option<String> {
    if let Some(a) = req.uri().authority() {
        // Never the user information of `http://user:password@host/`: it is not part of
        // `Host` (RFC 9110 §7.2), names no service, and is a secret the upstream must not
        // get in a header it logs.
        let a = a.as_str();
        return Some(a.rsplit_once('@').map_or(a, |(_, host)| host).to_owned());
    }
    req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).filter(|h| !h.is_empty()).map(str::to_owned)
}

/// An HTTP/1.1 `Upgrade` handshake to splice after its 101. `h2c` is not one: the
/// sidecar speaks HTTP/2 upstream by itself when the port says so, and the request goes on
/// as plain HTTP/1.1 (its `Upgrade` and `HTTP2-Settings` dropped), as Envoy does.
fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req
            .headers()
            .get(header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| !v.trim().eq_ignore_ascii_case("h2c"))
        && connection_tokens(req.headers()).any(|t| t.eq_ignore_ascii_case("upgrade"))
}

fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// The headers [`strip_hop_by_hop`] acts on (besides those `Connection` names, which
/// need a `Connection` header to be named).
fn is_hop_by_hop(name: &HeaderName) -> bool {
    static HOP_BY_HOP: [HeaderName; 9] = [
        header::CONNECTION,
        header::TE,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::TRAILER,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        KEEP_ALIVE,
        PROXY_CONNECTION,
    ];
    HOP_BY_HOP.contains(name)
}

/// Removes hop-by-hop headers. With `keep_upgrade`, `Upgrade` stays and `Connection`
/// becomes exactly `upgrade`.
fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Most messages carry none of them: one pass over the names is far cheaper than a
    // dozen removals that each hash a name (8% of a proxied request's instructions).
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let named: Vec<HeaderName> = connection_tokens(headers)
        .filter(|t| {
            !t.eq_ignore_ascii_case("upgrade")
                && !t.eq_ignore_ascii_case("close")
                && !t.eq_ignore_ascii_case("keep-alive")
        })
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    headers.remove(header::CONNECTION);
    headers.remove(KEEP_ALIVE);
    headers.remove(PROXY_CONNECTION);
    headers.remove(header::PROXY_AUTHENTICATE);
    headers.remove(header::PROXY_AUTHORIZATION);
    headers.remove(header::TRAILER);
    headers.remove(header::TRANSFER_ENCODING);
    // `te: trailers` is the one TE value HTTP/2 allows, and gRPC requires it.
    let te_trailers = headers
        .get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("trailers")));
    headers.remove(header::TE);
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_authority_never_carries_user_information() {
        let req = |uri: &str| Request::get(uri).body(()).expect("request");
        assert_eq!(
            request_authority(&req("http://user:pw@web.example:8080/")).as_deref(),
            Some("web.example:8080")
        );
        assert_eq!(request_authority(&req("http://web.example/")).as_deref(), Some("web.example"));
        let with_host = Request::get("/").header(header::HOST, "api.example").body(()).expect("request");
        assert_eq!(request_authority(&with_host).as_deref(), Some("api.example"));
    }

    #[test]
    fn strips_hop_by_hop_and_connection_named_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, X-Custom"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-custom", HeaderValue::from_static("1"));
        h.insert(header::TE, HeaderValue::from_static("trailers, deflate"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-keep", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut h, false);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["te", "x-keep"]);
        assert_eq!(h[header::TE], "trailers");
    }

    #[test]
    fn headers_without_hop_by_hop_ones_are_left_alone() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("svc"));
        h.insert("x-custom", HeaderValue::from_static("1"));
        let before = h.clone();
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h, before);
        // Any single one of them is enough to take the full path.
        for name in ["keep-alive", "proxy-connection", "te", "trailer", "upgrade", "proxy-authorization"] {
            let mut h = before.clone();
            h.insert(HeaderName::from_static(name), HeaderValue::from_static("x"));
            strip_hop_by_hop(&mut h, false);
            assert_eq!(h, before, "{name} removed");
        }
    }

    #[test]
    fn upgrade_keeps_its_pair() {
        let req = Request::builder()
            .header(header::CONNECTION, "Upgrade")
            .header(header::UPGRADE, "websocket")
            .body(())
            .unwrap();
        assert!(is_upgrade(&req));
        let mut h = req.headers().clone();
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h[header::CONNECTION], "upgrade");
        assert_eq!(h[header::UPGRADE], "websocket");
    }
}
