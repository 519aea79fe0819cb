//! Mutual TLS between sidecars (issue 7), all real: an in-process control plane with a
//! generated CA issuing certificates over TLS, `ballast-sidecar` processes that get
//! theirs with bootstrap tokens, real rustls handshakes between them, and raw TLS
//! clients holding wrong certificates.

mod support;

#[path = "../benches/mesh/identity.rs"]
#[allow(dead_code)]
mod identity;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use identity::MeshCa;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use support::*;

/// An in-process control plane with identity on (the benchmarks' [`MeshCa`]), and what
/// the tests do with its store.
struct Mesh {
    ca: MeshCa,
    anchors: String,
}

impl Mesh {
    fn start(lifetime: Duration) -> Mesh {
        let ca = MeshCa::with_lifetime(lifetime).expect("control plane with identity starts");
        Mesh { anchors: ca.anchors.clone(), ca }
    }

    fn url(&self) -> String {
        self.ca.url()
    }

    /// A sidecar of `service_account` in `shop`, with identity.
    fn sidecar(&self, pod: &str, service_account: &str, extra: &[&str]) -> Sidecar {
        let mut args = self.ca.sidecar_args("shop", pod, service_account).expect("bootstrap token");
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Sidecar::start_meshed(&self.url(), &args)
    }

    fn put(&self, key: &str, value: serde_json::Value) {
        let bytes = serde_json::to_vec(&value).expect("json");
        self.ca.rt.block_on(self.ca.store.put(key, bytes, None)).expect("put");
    }

    fn policy(&self, inbound: serde_json::Value) {
        self.put(
            "/ballast/policies/shop/payments",
            serde_json::json!({
                "apiVersion": "ballast.io/v1alpha1", "kind": "ResiliencePolicy",
                "metadata": {"name": "payments", "namespace": "shop"},
                "spec": {"targetRef": {"service": "payments"}, "inbound": inbound}
            }),
        );
    }

    /// `ballastctl get proxies` as JSON, for failure messages.
    fn proxies(&self) -> String {
        let cp = self.ca.cp.as_ref().expect("running");
        let out = run(curl().args([
            "-sk",
            "-H",
            &format!("Authorization: Bearer {}", cp.admin_token().unwrap_or("")),
            &format!("https://127.0.0.1:{}/api/v1/proxies", cp.admin_addr.port()),
        ]));
        stdout(&out)
    }

    /// The generated CA's certificate and key, from the store.
    fn ca(&self) -> (String, String) {
        let (kv, _) = self.ca.rt.block_on(self.ca.store.get("/ballast/identity/ca")).expect("get");
        let v: serde_json::Value =
            serde_json::from_slice(&kv.expect("the generated CA is in the store").value).expect("json");
        (v["certificate"].as_str().expect("cert").to_owned(), v["key"].as_str().expect("key").to_owned())
    }
}

/// `payments` (service account `payments`) fronting `app`.
fn payments(mesh: &Mesh, app: &Upstream) -> Sidecar {
    let app_addr = app.addr.to_string();
    // The app's readiness probe, as the injector passes it: plain text is admitted there.
    let probes = format!("--inbound-probes={}:/status/204", app.addr.port());
    mesh.sidecar(
        "payments-1",
        "payments",
        &["--service", "payments", "--advertise-addr", "{inbound}", "--app-addr", &app_addr, &probes],
    )
}

/// GET `path` from `payments` through `client`'s outbound listener, with extra header
/// lines: (status, head and body).
fn get(client: &Sidecar, path: &str, headers: &str) -> (u16, String) {
    let raw = format!("GET {path} HTTP/1.1\r\nHost: payments\r\n{headers}Connection: close\r\n\r\n");
    http_request(client.outbound, &raw).unwrap_or_else(|e| (0, e.to_string()))
}

fn json_body(response: &str) -> serde_json::Value {
    let body = &response[response.find('{').unwrap_or(0)..];
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {response}"))
}

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

#[test]
fn sidecars_use_mutual_tls_and_the_app_learns_the_verified_caller() {
    let mesh = Mesh::start(Duration::from_secs(24 * 3600));
    let app = Upstream::start("payments-app");
    let server = payments(&mesh, &app);
    let client = mesh.sidecar("web-1", "web", &[]);

    wait_until("payments answers through the mesh", || get(&client, "/name", "").0 == 200);
    // The caller's identity reaches the app, whatever the caller claimed; the app hears
    // the HTTP/1.1 it was sent although the sidecars spoke HTTP/2 in TLS.
    let forged = "ballast-peer-identity: spiffe://cluster.local/ns/shop/sa/admin\r\n";
    let (status, rsp) = get(&client, "/headers", forged);
    assert_eq!(status, 200, "{rsp}");
    let seen = json_body(&rsp);
    assert_eq!(seen["ballast-peer-identity"], WEB, "{seen}\n{}", mesh.proxies());
    assert_eq!(seen[":version"], "HTTP/1.1", "{seen}");
    assert!(seen.get("ballast-orig-proto").is_none(), "{seen}");
    assert_eq!(seen["host"], "payments", "{seen}");

    // The handshake really happened, on both sides, and the caller is in the metrics.
    assert!(server.metric(r#"ballast_mesh_tls_handshakes_total{direction="inbound",result="ok"}"#) >= 1.0);
    let metrics = server.metrics();
    assert!(
        metrics.lines().any(|l| l.starts_with("ballast_inbound_requests_by_peer_total")
            && l.contains(&format!(r#"peer_identity="{WEB}""#))
            && l.contains(r#"tls="true""#)),
        "{metrics}"
    );
    promtool_check(&metrics);
    // And in the server sidecar's per-request log line.
    let logged = server.log();
    assert!(
        logged.lines().any(|l| l.contains("ballast_sidecar::access")
            && l.contains("direction=\"inbound\"")
            && l.contains(&format!("peer_identity=\"{WEB}\""))),
        "{logged}"
    );
    assert!(client.metric(r#"ballast_identity_certify_total{result="issued"}"#) >= 1.0);
    assert!(client.metric("ballast_identity_certificate_expiry_timestamp_seconds") > 0.0);

    // A client outside the mesh reaches the server sidecar in plain text (permissive,
    // the default), and cannot forge the header either.
    let raw = format!("GET /headers HTTP/1.1\r\nHost: payments\r\n{forged}Connection: close\r\n\r\n");
    let (status, rsp) = http_request(server.inbound, &raw).expect("plain request");
    assert_eq!(status, 200, "{rsp}");
    assert!(json_body(&rsp).get("ballast-peer-identity").is_none(), "{rsp}");

    // A pod opted out of identity (trust anchors, no token): it verifies the control
    // plane's TLS and gets its configuration, and calls in plain text.
    let opted_out = Sidecar::start_meshed(
        &mesh.url(),
        &["--namespace", "shop", "--pod", "legacy-1", &format!("--identity-trust-anchors={}", mesh.anchors)],
    );
    let (status, rsp) = get(&opted_out, "/headers", "");
    assert_eq!(status, 200, "{rsp}\n{}\n---\n{}", opted_out.log(), server.log());
    assert!(json_body(&rsp).get("ballast-peer-identity").is_none(), "{rsp}");
    // No certificate (the gauge is always exported: a missing series fails here).
    let metrics = opted_out.metrics();
    assert!(
        metrics.lines().any(|l| l == "ballast_identity_certificate_expiry_timestamp_seconds 0"),
        "{metrics}"
    );

    // Unmeshed endpoints stay plain and work: a Service whose endpoint is the app itself.
    mesh.put(
        "/ballast/services/shop/ledger",
        serde_json::json!({
            "apiVersion": "ballast.io/v1alpha1", "kind": "Service",
            "metadata": {"name": "ledger", "namespace": "shop"},
            "spec": {"ports": [{"port": 80}], "endpoints": [{"address": app.addr.to_string()}]}
        }),
    );
    let ledger = || {
        let raw = "GET /name HTTP/1.1\r\nHost: ledger\r\nConnection: close\r\n\r\n";
        http_request(client.outbound, raw).map(|r| r.0).unwrap_or(0)
    };
    wait_until("the plain ledger answers", || ledger() == 200);
}

#[test]
fn strict_mode_and_allow_lists_refuse_who_they_must() {
    let mesh = Mesh::start(Duration::from_secs(24 * 3600));
    let app = Upstream::start("payments-app");
    let server = payments(&mesh, &app);
    let web = mesh.sidecar("web-1", "web", &[]);
    let batch = mesh.sidecar("batch-1", "batch", &[]);
    wait_until("payments answers web", || get(&web, "/name", "").0 == 200);

    mesh.policy(serde_json::json!({"mtls": "strict"}));
    let plain = || {
        let out = run(curl().args(["-sS", "-i", &format!("http://{}/name", server.inbound)]));
        stdout(&out)
    };
    wait_until("strict mode refuses a plain curl", || plain().starts_with("HTTP/1.1 403"));
    let out = plain();
    assert!(out.to_ascii_lowercase().contains("ballast-rejected: forbidden"), "{out}");
    assert!(out.contains("inbound.mtls: strict"), "the body says why: {out}");
    // The kubelet's probe (plain GET of the exact path) still gets through; nothing else.
    let probe = |args: &[&str], path: &str| {
        let url = format!("http://{}{path}", server.inbound);
        stdout(&run(curl().args(["-sS", "-o", "/dev/null", "-w", "%{http_code}"]).args(args).arg(url)))
    };
    assert_eq!(probe(&[], "/status/204"), "204");
    assert_eq!(probe(&[], "/status/204?x=1"), "403");
    assert_eq!(probe(&["-X", "POST"], "/status/204"), "403");
    assert_eq!(probe(&[], "/status/200"), "403");
    assert_eq!(get(&web, "/name", "").0, 200, "mesh callers still get through");
    // Opaque TCP (a CONNECT tunnel through the client sidecar) to a meshed endpoint goes
    // in mesh TLS too (ALPN ballast.io/opaque), so strict mode admits it.
    let tunnel =
        run(curl().args(["-sS", "-p", "-x", &format!("http://{}", web.outbound), "http://payments/name"]));
    assert_eq!(stdout(&tunnel), "payments-app", "{tunnel:?}");
    assert!(web.metric(r#"ballast_mesh_tls_handshakes_total{direction="outbound",result="ok"}"#) >= 1.0);
    // Raw TCP that is not HTTP is closed, counted as a rejection.
    let before = server
        .metric(r#"ballast_rejections_total{direction="inbound",reason="forbidden",service="payments"}"#);
    {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(server.inbound).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).ok();
        let _ = s.write_all(b"\x00\x01binary protocol\r\n");
        let mut buf = [0u8; 16];
        // Closed (EOF or reset), not answered and not left open (a timeout fails).
        match s.read(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("the refused connection was not closed: {other:?}"),
        }
    }
    wait_until("the refused connection is counted", || {
        server
            .metric(r#"ballast_rejections_total{direction="inbound",reason="forbidden",service="payments"}"#)
            > before
    });

    // Allow lists: only the named identities, 403 for other mesh callers.
    mesh.policy(serde_json::json!({"mtls": "strict", "allow": ["shop/batch"]}));
    wait_until("web is refused", || get(&web, "/name", "").0 == 403);
    let out = stdout(&run(curl().args([
        "-sS",
        "-i",
        "-H",
        "Host: payments",
        &format!("http://{}/name", web.outbound),
    ])));
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    assert!(out.to_ascii_lowercase().contains("ballast-rejected: forbidden"), "{out}");
    assert!(out.contains(WEB), "the body names the refused identity: {out}");
    let batch_get = |path: &str| {
        let raw = format!("GET {path} HTTP/1.1\r\nHost: payments\r\nConnection: close\r\n\r\n");
        http_request(batch.outbound, &raw).map(|r| r.0).unwrap_or(0)
    };
    assert_eq!(batch_get("/name"), 200);
    mesh.policy(serde_json::json!({"allow": ["spiffe://cluster.local/ns/shop/sa/web", "*/batch"]}));
    wait_until("web is allowed again", || get(&web, "/name", "").0 == 200);
    assert_eq!(batch_get("/name"), 200);
    // An allow list admits no plain-text caller, even in permissive mode.
    assert!(plain().starts_with("HTTP/1.1 403"), "{}", plain());
}

/// A raw TLS client to the server sidecar's inbound listener, asking for `sni`, with an
/// optional client certificate; Ok when the handshake completes and a request is
/// answered.
fn tls_request(
    addr: SocketAddr,
    anchors: &str,
    sni: &str,
    client_cert: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<String, String> {
    use std::io::{Read, Write};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(anchors.as_bytes()) {
        roots.add(c.map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let mut config = match client_cert {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key).map_err(|e| e.to_string())?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let name = ServerName::try_from(sni.to_owned()).map_err(|e| e.to_string())?;
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| e.to_string())?;
    let mut sock = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_secs(5))).ok();
    let mut tls = rustls::Stream::new(&mut conn, &mut sock);
    tls.write_all(b"GET /name HTTP/1.1\r\nHost: payments\r\nConnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut out = String::new();
    tls.read_to_string(&mut out).map_err(|e| e.to_string())?;
    if out.is_empty() { Err("closed without an answer".into()) } else { Ok(out) }
}

/// The server ended the handshake with a TLS alert: refused for the certificate, not a
/// connection that failed for another reason (refused, timed out).
fn refused_by_tls(result: Result<String, String>) {
    match result {
        Err(e) => assert!(e.contains("alert"), "not a TLS refusal: {e}"),
        Ok(answer) => panic!("the handshake was accepted: {answer}"),
    }
}

/// A certificate for `spiffe://cluster.local/ns/shop/sa/{sa}` signed by `issuer`, valid
/// from `not_before` to `not_after`.
fn workload_cert(
    issuer: &rcgen::Issuer<'_, rcgen::KeyPair>,
    sa: &str,
    not_before: SystemTime,
    not_after: SystemTime,
) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(vec![format!(
        "{sa}.shop.serviceaccount.identity.ballast.cluster.local"
    )])
    .expect("params");
    params.subject_alt_names.push(rcgen::SanType::URI(
        format!("spiffe://cluster.local/ns/shop/sa/{sa}").try_into().expect("uri"),
    ));
    params.extended_key_usages =
        vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth, rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    let cert = params.signed_by(&key, issuer).expect("sign");
    (vec![cert.der().clone()], PrivateKeyDer::Pkcs8(key.serialize_der().into()))
}

#[test]
fn wrong_expired_or_missing_certificates_are_refused() {
    let mesh = Mesh::start(Duration::from_secs(24 * 3600));
    let app = Upstream::start("payments-app");
    let server = payments(&mesh, &app);
    let sni = "payments.shop.serviceaccount.identity.ballast.cluster.local";
    wait_until("the server sidecar has its certificate", || {
        server.metric(r#"ballast_identity_certify_total{result="issued"}"#) >= 1.0
    });
    let now = SystemTime::now();
    let day = Duration::from_secs(86400);

    // A certificate from the mesh's CA is accepted (the control: the raw client works).
    let (ca_pem, ca_key_pem) = mesh.ca();
    let ca_key = rcgen::KeyPair::from_pem(&ca_key_pem).expect("CA key");
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).expect("issuer");
    let good = workload_cert(&issuer, "web", now - day, now + day);
    let answer =
        tls_request(server.inbound, &mesh.anchors, sni, Some(good)).expect("a valid certificate works");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // Expired, although from the right CA.
    let expired = workload_cert(&issuer, "web", now - 2 * day, now - day);
    refused_by_tls(tls_request(server.inbound, &mesh.anchors, sni, Some(expired)));
    // Another CA's certificate for the same identity.
    let other_key = rcgen::KeyPair::generate().expect("key");
    let mut other = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    other.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let other_issuer = rcgen::Issuer::new(other, other_key);
    let forged = workload_cert(&other_issuer, "web", now - day, now + day);
    refused_by_tls(tls_request(server.inbound, &mesh.anchors, sni, Some(forged)));
    // No client certificate at all.
    refused_by_tls(tls_request(server.inbound, &mesh.anchors, sni, None));
    assert!(
        server.metric(r#"ballast_mesh_tls_handshakes_total{direction="inbound",result="failed"}"#) >= 3.0
    );

    // The client side: an endpoint announced with another identity than the one its
    // sidecar proves is refused by the calling sidecar (the handshake fails: 502).
    let client = mesh.sidecar("web-1", "web", &[]);
    mesh.put(
        "/ballast/services/shop/impostor",
        serde_json::json!({
            "apiVersion": "ballast.io/v1alpha1", "kind": "Service",
            "metadata": {"name": "impostor", "namespace": "shop"},
            "spec": {"ports": [{"port": 80}], "endpoints": [{
                "address": server.inbound.to_string(),
                "identity": "spiffe://cluster.local/ns/shop/sa/billing"
            }]}
        }),
    );
    let impostor = || {
        let raw = "GET /name HTTP/1.1\r\nHost: impostor\r\nConnection: close\r\n\r\n";
        http_request(client.outbound, raw).unwrap_or_else(|e| (0, e.to_string()))
    };
    // Until the Service arrives the host is unknown (also a 502): wait for the mesh's own.
    wait_until("the impostor is known", || !impostor().1.contains("unknown host"));
    let (status, rsp) = impostor();
    assert_eq!(status, 502, "{rsp}");
    assert!(rsp.contains("billing"), "the error names the identity expected: {rsp}");
    assert_eq!(app.requests(), 1, "only the valid raw client reached the app");
}

#[test]
fn certificates_rotate_under_load_without_a_failed_request() {
    // Six-second certificates (the CA counts whole seconds, so 5-6 s are left on
    // arrival): renewed every 3.3-4 s, each expiring while connections made with it are
    // still pooled. Short enough for several renewals under load, long enough that a
    // stalled debug build still renews before expiry.
    let mesh = Mesh::start(Duration::from_secs(6));
    let app = Upstream::start("payments-app");
    let server = payments(&mesh, &app);
    let client = mesh.sidecar("web-1", "web", &[]);
    wait_until("payments answers through the mesh", || get(&client, "/name", "").0 == 200);
    let issued = |s: &Sidecar| s.metric(r#"ballast_identity_certify_total{result="issued"}"#);
    let (server_before, client_before) = (issued(&server), issued(&client));

    let deadline = Instant::now() + Duration::from_secs(20);
    let mut statuses = Vec::new();
    // Bounded in count and time (the time bound is the one expected to end it);
    // `Connection: close` to the client sidecar, which keeps its own pooled mesh
    // connections and opens new ones as they are closed.
    while Instant::now() < deadline && statuses.len() < 100_000 {
        statuses.push(get(&client, "/name", "").0);
    }
    let failed: Vec<_> = statuses.iter().filter(|s| **s != 200).collect();
    assert!(failed.is_empty(), "{} of {} failed: {failed:?}", failed.len(), statuses.len());
    assert!(statuses.len() >= 100, "load was sent: {}", statuses.len());
    assert!(issued(&server) >= server_before + 3.0, "the server renewed: {}", server.log());
    assert!(issued(&client) >= client_before + 3.0, "the client renewed: {}", client.log());
}
