//! Workload identity end to end, in process: a real control plane with identity on, real
//! gRPC over real TLS (tonic, rustls), the generated Identity client, and the admin API
//! over HTTPS, through `ctl::Api` and the `ballastctl` binary.
//!
//! What is checked: a bootstrap token buys a certificate with exactly its identity
//! (URI and DNS SANs, EKUs, lifetime, a chain that verifies against the trust anchor),
//! on the embedded store and on a real etcd; names the CSR asks for are not in it; a
//! token for another service account is denied; tampered CSRs are invalid; unknown and
//! expired tokens are unauthenticated; TokenReviews against a fake API server (audience
//! `ballast`, the service account must match) and the trust anchors published in a
//! ConfigMap; the CA in a Secret, created or taken from the replica that won; a stream
//! with a client certificate carries its identity into `get proxies` and the pushed
//! endpoint, one without carries none; plain text cannot reach the TLS port; the admin
//! API wants the token except on `/metrics`; replicas on one store share the generated CA.

#[macro_use]
mod support;

use std::sync::Arc;
use std::time::Duration;

use ballast_control_plane::ctl::{self, Api, Kind, Output};
use ballast_control_plane::identity::{CaSource, create_bootstrap_token};
use ballast_control_plane::keys::Keys;
use ballast_control_plane::server::{ControlPlane, Options};
use ballast_control_plane::sim::{SimSidecar, hello};
use ballast_control_plane::store::Store;
use http::Method;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use serde_json::{Value, json};
use support::identity::{
    ADMIN_TOKEN, IdentityApi, anchors, certificate, certify, channel, csr, options, start,
};
use support::{Backend, WAIT, metric, output_within, until};
use tonic::Code;
use x509_parser::prelude::*;

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

async fn token(cp: &ControlPlane, ns: &str, sa: &str) -> String {
    create_bootstrap_token(&cp.store, &Keys::default(), ns, sa, Duration::from_secs(600))
        .await
        .expect("token")
}

fn admin(cp: &ControlPlane, token: Option<&str>) -> Api {
    Api::with_tls(&format!("https://{}", cp.admin_addr), Some(&anchors(cp)), token.map(str::to_owned))
        .expect("api")
}

/// Every SAN of a certificate, as x509-parser prints them.
fn sans(cert: &X509Certificate<'_>) -> Vec<String> {
    cert.subject_alternative_name()
        .expect("parses")
        .map(|s| s.value.general_names.iter().map(|n| n.to_string()).collect())
        .unwrap_or_default()
}

/// Verifies `chain` against the trust anchor as rustls would, as a server certificate for
/// `dns_name` and as a client certificate.
fn verify(chain: &[Vec<u8>], anchor: &[u8], dns_name: &str) {
    use rustls::client::danger::ServerCertVerifier;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(anchor.to_vec())).expect("anchor");
    let roots = Arc::new(roots);
    let leaf = CertificateDer::from(chain[0].clone());
    let rest: Vec<CertificateDer<'static>> =
        chain[1..].iter().map(|c| CertificateDer::from(c.clone())).collect();
    let server = rustls::client::WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .expect("verifier");
    server
        .verify_server_cert(
            &leaf,
            &rest,
            &ServerName::try_from(dns_name.to_owned()).expect("name"),
            &[],
            UnixTime::now(),
        )
        .expect("verifies as a server certificate for its DNS name");
    let client = rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider)
        .build()
        .expect("verifier");
    client.verify_client_cert(&leaf, &rest, UnixTime::now()).expect("verifies as a client certificate");
}

on_both_stores!(a_bootstrap_token_buys_a_certificate_for_exactly_its_identity);

async fn a_bootstrap_token_buys_a_certificate_for_exactly_its_identity(store: Store) {
    let cp = start(store, "cp-a").await;
    let t = token(&cp, "shop", "payments").await;
    let key = rcgen::KeyPair::generate().expect("key");
    let ch = channel(&cp, None).await;
    let asked = csr(&key, &["evil.example"], &["spiffe://cluster.local/ns/kube-system/sa/admin"]);
    let before = now();
    let r = certify(&ch, "shop", "payments", &t, asked).await.expect("a certificate");
    let after = now();
    assert_eq!(r.identity, "spiffe://cluster.local/ns/shop/sa/payments");
    let anchor = pem_der(&anchors(&cp));
    assert_eq!(r.trust_anchors, vec![anchor.clone()]);
    assert_eq!(r.certificate_chain.len(), 2, "leaf, then the CA");
    let (_, leaf) = X509Certificate::from_der(&r.certificate_chain[0]).expect("leaf parses");
    let mut names = sans(&leaf);
    names.sort();
    assert_eq!(
        names,
        [
            "DNSName(payments.shop.serviceaccount.identity.ballast.cluster.local)",
            "URI(spiffe://cluster.local/ns/shop/sa/payments)",
        ],
        "only the identity's names, none the CSR asked for"
    );
    let eku = leaf.extended_key_usage().expect("eku").expect("has an EKU").value;
    assert!(eku.server_auth && eku.client_auth && !eku.any, "{eku:?}");
    let ku = leaf.key_usage().expect("ku").expect("has a key usage").value;
    assert!(ku.digital_signature() && !ku.key_cert_sign(), "{ku:?}");
    assert!(!leaf.is_ca());
    assert_eq!(leaf.public_key().raw, rcgen::PublicKeyData::subject_public_key_info(&key).as_slice());
    let (not_before, not_after) =
        (leaf.validity().not_before.timestamp(), leaf.validity().not_after.timestamp());
    assert_eq!(not_after, r.not_after);
    assert!(
        (before + 3600 - 1..=after + 3600 + 1).contains(&not_after),
        "not_after {not_after}, asked between {before} and {after}"
    );
    // Issued between `before` and `after`, valid from a minute earlier.
    assert!(
        (before - 61..=after - 59).contains(&not_before),
        "not_before {not_before} allows a minute of skew (asked between {before} and {after})"
    );
    verify(&r.certificate_chain, &anchor, "payments.shop.serviceaccount.identity.ballast.cluster.local");
    let metrics = metrics(&cp).await;
    assert_eq!(metric(&metrics, &issued("issued")), 1.0, "{metrics}");
    cp.stop().await;
}

/// The series of `ballast_control_plane_certificates_issued_total` for `result`.
fn issued(result: &str) -> String {
    format!("ballast_control_plane_certificates_issued_total{{result=\"{result}\"}}")
}

fn pem_der(pem: &str) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes()).expect("PEM").to_vec()
}

/// `/metrics` over HTTPS without a token, promtool-clean.
async fn metrics(cp: &ControlPlane) -> String {
    let client = reqwest_like(cp);
    let text = client.await;
    support::promtool::check(&text);
    text
}

/// A GET of `/metrics` with rustls, trusting only the mesh's anchor, with no token.
async fn reqwest_like(cp: &ControlPlane) -> String {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(anchors(cp).as_bytes()).expect("pem")).expect("root");
    let config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_only()
        .enable_http1()
        .build();
    let client: Client<_, Empty<bytes::Bytes>> = Client::builder(TokioExecutor::new()).build(https);
    let url = format!("https://{}/metrics", cp.admin_addr);
    let resp = client.get(url.parse().expect("uri")).await.expect("GET /metrics over https");
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    String::from_utf8(body.to_vec()).expect("utf-8")
}

#[tokio::test]
async fn a_token_for_another_service_account_buys_nothing() {
    let cp = start(Store::memory(), "cp").await;
    let t = token(&cp, "shop", "web").await;
    let ch = channel(&cp, None).await;
    let key = rcgen::KeyPair::generate().expect("key");
    for (ns, sa) in [("shop", "payments"), ("other", "web")] {
        let e = certify(&ch, ns, sa, &t, csr(&key, &[], &[])).await.expect_err("denied");
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        assert!(e.message().contains("shop/web"), "{}", e.message());
    }
    let e = certify(&ch, "Shop", "web", &t, csr(&key, &[], &[])).await.expect_err("bad name");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("namespace:"), "{}", e.message());
    let e = certify(&ch, "shop", "we_b", &t, csr(&key, &[], &[])).await.expect_err("bad name");
    assert!(e.message().starts_with("service_account:"), "{}", e.message());
    let m = metrics(&cp).await;
    assert_eq!(metric(&m, &issued("denied")), 2.0, "{m}");
    assert_eq!(metric(&m, &issued("invalid")), 2.0, "{m}");
    cp.stop().await;
}

#[tokio::test]
async fn tampered_csrs_are_invalid() {
    let cp = start(Store::memory(), "cp").await;
    let t = token(&cp, "shop", "web").await;
    let ch = channel(&cp, None).await;
    let key = rcgen::KeyPair::generate().expect("key");
    let good = csr(&key, &[], &[]);

    // A byte of the signature (the DER's last bytes) flipped.
    let mut flipped = good.clone();
    let last = flipped.len() - 3;
    flipped[last] ^= 0x20;
    // Another key's public key swapped in: the signature no longer matches it.
    let other = rcgen::KeyPair::generate().expect("key");
    let (mine, theirs) = (
        rcgen::PublicKeyData::subject_public_key_info(&key),
        rcgen::PublicKeyData::subject_public_key_info(&other),
    );
    let at = good.windows(mine.len()).position(|w| w == mine.as_slice()).expect("the SPKI is in the CSR");
    let mut swapped = good.clone();
    swapped[at..at + mine.len()].copy_from_slice(&theirs);

    for (what, der) in [
        ("flipped signature", flipped),
        ("swapped key", swapped),
        ("garbage", b"nope".to_vec()),
        ("empty", vec![]),
    ] {
        let e = certify(&ch, "shop", "web", &t, der).await.expect_err(what);
        assert_eq!(e.code(), Code::InvalidArgument, "{what}: {e:?}");
        assert!(e.message().starts_with("csr:"), "{what}: {}", e.message());
    }
    certify(&ch, "shop", "web", &t, good).await.expect("the untampered CSR is fine");
    cp.stop().await;
}

#[tokio::test]
async fn unknown_and_expired_tokens_are_unauthenticated() {
    let cp = start(Store::memory(), "cp").await;
    let ch = channel(&cp, None).await;
    let key = rcgen::KeyPair::generate().expect("key");
    // An expired token whose key is still in the store (its lease not yet over).
    let expired = "ab".repeat(32);
    let hash: String = ring::digest::digest(&ring::digest::SHA256, expired.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let record = json!({"namespace": "shop", "serviceAccount": "web", "expiresAt": now() - 5, "createdAt": now() - 65});
    cp.store
        .put(&Keys::default().identity_token(&hash), record.to_string().into_bytes(), None)
        .await
        .expect("put");
    for (what, token, says) in [
        ("unknown", "cd".repeat(32), "unknown bootstrap token"),
        ("expired", expired, "expired"),
        (
            "not a bootstrap token, no --kubernetes",
            "eyJhbGciOiJSUzI1NiJ9.e30.sig".into(),
            "without --kubernetes",
        ),
        ("empty", String::new(), "token is empty"),
    ] {
        let e = certify(&ch, "shop", "web", &token, csr(&key, &[], &[])).await.expect_err(what);
        assert_eq!(e.code(), Code::Unauthenticated, "{what}: {e:?}");
        assert!(e.message().contains(says), "{what}: {}", e.message());
    }
    let m = metrics(&cp).await;
    assert_eq!(metric(&m, &issued("unauthenticated")), 4.0, "{m}");
    cp.stop().await;
}

/// A control plane with `--kubernetes` on the identity fake.
async fn start_kubernetes(api: &IdentityApi, ca: CaSource) -> ControlPlane {
    let opts = Options { kubernetes: true, identity: Some(options(ca)), ..Options::loopback("cp-k8s") };
    ControlPlane::start_with(Store::memory(), opts, Some(api.client())).await.expect("starts")
}

#[tokio::test]
async fn service_account_tokens_are_reviewed_by_kubernetes() {
    let api = IdentityApi::new();
    // Without audiences of its own, the fake answers with those the review asked for.
    let sa = |ns: &str, name: &str| {
        json!({"authenticated": true,
               "user": {"username": format!("system:serviceaccount:{ns}:{name}"), "uid": "u1"}})
    };
    api.review("payments-token", sa("shop", "payments"));
    api.review("web-token", sa("shop", "web"));
    api.review("expired-token", json!({"authenticated": false, "error": "token has expired"}));
    api.review(
        "api-audience-token",
        json!({"authenticated": true, "audiences": ["https://kubernetes.default.svc"],
               "user": {"username": "system:serviceaccount:shop:payments"}}),
    );
    // Authenticated, but with no audiences in the answer: valid for the API server's own
    // audience, not for Ballast's.
    api.review(
        "no-audience-token",
        json!({"authenticated": true, "audiences": null,
               "user": {"username": "system:serviceaccount:shop:payments"}}),
    );
    api.review("user-token", json!({"authenticated": true, "user": {"username": "alice"}}));
    // A stale ConfigMap from an earlier CA: replaced.
    api.put(
        "configmaps",
        "ballast-system",
        "ballast-trust-anchors",
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": "ballast-trust-anchors", "namespace": "ballast-system", "resourceVersion": "1"},
               "data": {"ca.crt": "old"}}),
    );
    let cp = start_kubernetes(&api, CaSource::Generated).await;
    let ch = channel(&cp, None).await;
    let key = rcgen::KeyPair::generate().expect("key");

    let r = certify(&ch, "shop", "payments", "payments-token", csr(&key, &[], &[])).await.expect("certified");
    assert_eq!(r.identity, "spiffe://cluster.local/ns/shop/sa/payments");
    let e = certify(&ch, "shop", "payments", "web-token", csr(&key, &[], &[])).await.expect_err("another SA");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    for (token, says) in [
        ("expired-token", "token has expired"),
        ("unknown-token", "invalid bearer token"),
        ("api-audience-token", "audiences"),
        ("no-audience-token", "audiences"),
        ("user-token", "not a service account"),
    ] {
        let e = certify(&ch, "shop", "payments", token, csr(&key, &[], &[])).await.expect_err(token);
        assert_eq!(e.code(), Code::Unauthenticated, "{token}: {e:?}");
        assert!(e.message().contains(says), "{token}: {}", e.message());
    }
    let reviews: Vec<Value> = api
        .requests()
        .into_iter()
        .filter(|(m, p, _)| m == Method::POST && p.ends_with("/tokenreviews"))
        .map(|(_, _, b)| b)
        .collect();
    assert_eq!(reviews.len(), 7);
    for r in &reviews {
        assert_eq!(r["spec"]["audiences"], json!(["ballast"]), "{r}");
        assert_eq!(r["kind"], "TokenReview");
    }
    // Bootstrap tokens still work beside TokenReviews.
    let t = token(&cp, "shop", "web").await;
    certify(&ch, "shop", "web", &t, csr(&key, &[], &[])).await.expect("bootstrap token");

    let pem = anchors(&cp);
    until("the trust anchors in the ConfigMap", || async {
        api.get("configmaps", "ballast-system", "ballast-trust-anchors")
            .filter(|cm| cm["data"]["ca.crt"].as_str() == Some(pem.as_str()))
    })
    .await;
    cp.stop().await;
}

#[tokio::test]
async fn the_ca_secret_is_created_when_missing_or_taken_from_the_winner() {
    let ca = CaSource::Secret { namespace: "ballast-system".into(), name: "ballast-ca".into() };
    // Missing: generated and created.
    let api = IdentityApi::new();
    let cp = start_kubernetes(&api, ca.clone()).await;
    let secret = api.get("secrets", "ballast-system", "ballast-ca").expect("created");
    let crt = secret["data"]["ca.crt"].as_str().expect("base64 ca.crt");
    assert!(secret["data"]["ca.key"].is_string());
    assert_eq!(base64(crt), anchors(&cp).trim(), "the Secret's certificate is the trust anchor");
    cp.stop().await;

    // Another replica creates it between our read and our create: we use theirs.
    let api2 = IdentityApi::new();
    api2.race_secret_create(secret.clone());
    let cp2 = start_kubernetes(&api2, ca).await;
    assert_eq!(anchors(&cp2).trim(), base64(crt), "the winner's CA");
    cp2.stop().await;
}

/// Decodes standard base64 (the Secret's data) to text.
fn base64(s: &str) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes().filter(|c| *c != b'=') {
        let v = A.iter().position(|a| *a == c).expect("base64") as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    String::from_utf8(out).expect("utf-8").trim().to_owned()
}

#[tokio::test]
async fn a_streams_client_certificate_is_its_identity() {
    let cp = start(Store::memory(), "cp").await;
    let (chain, key, _) = certificate(&cp, "shop", "web").await;

    // A caller (no certificate) that wants both services.
    let mut caller_hello = hello("caller-1", "shop", None);
    caller_hello.calls = vec!["web".into(), "api".into()];
    let mut caller = SimSidecar::on(channel(&cp, None).await, caller_hello).await.expect("caller");
    caller.next_acked(WAIT).await.expect("first push");

    let with_cert = channel(&cp, Some((&chain, &key))).await;
    let mut web = SimSidecar::on(with_cert.clone(), hello("web-1", "shop", Some(("web", "10.0.0.5:4143"))))
        .await
        .expect("web stream");
    web.next_acked(WAIT).await.expect("web's push");
    let mut api_sidecar =
        SimSidecar::on(channel(&cp, None).await, hello("api-1", "shop", Some(("api", "10.0.0.6:4143"))))
            .await
            .expect("api stream");
    api_sidecar.next_acked(WAIT).await.expect("api's push");

    // The pushed Services: web's endpoint has the identity, api's has none.
    let mut seen: std::collections::BTreeMap<String, Value> = Default::default();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !(seen.contains_key("web") && seen.contains_key("api")) {
        assert!(tokio::time::Instant::now() < deadline, "both endpoints pushed; saw {seen:?}");
        let m = caller.next_acked(WAIT).await.expect("an update");
        for r in &m.upserts {
            let v: Value = serde_json::from_slice(&r.json).expect("json");
            if let Some(name) = v["metadata"]["name"].as_str()
                && v["spec"]["endpoints"].as_array().is_some_and(|e| !e.is_empty())
            {
                seen.insert(name.to_owned(), v["spec"]["endpoints"][0].clone());
            }
        }
    }
    assert_eq!(seen["web"]["identity"], "spiffe://cluster.local/ns/shop/sa/web", "{:?}", seen["web"]);
    assert!(seen["api"].get("identity").is_none(), "{:?}", seen["api"]);

    // `ballastctl get proxies` shows who is who.
    let proxies =
        ctl::get(&admin(&cp, Some(ADMIN_TOKEN)), Kind::Proxies, None, Output::Json).await.expect("proxies");
    let proxies: Vec<Value> = serde_json::from_str(&proxies).expect("json");
    let identity_of = |pod: &str| proxies.iter().find(|p| p["pod"] == pod).map(|p| p["identity"].clone());
    assert_eq!(identity_of("web-1"), Some(json!("spiffe://cluster.local/ns/shop/sa/web")));
    assert_eq!(identity_of("api-1"), Some(Value::Null));
    let table =
        ctl::get(&admin(&cp, Some(ADMIN_TOKEN)), Kind::Proxies, None, Output::Table).await.expect("table");
    assert!(table.contains("IDENTITY") && table.contains("spiffe://cluster.local/ns/shop/sa/web"), "{table}");

    // A certificate binds its sidecar to its namespace: no Hello for another one.
    let e = match SimSidecar::on(with_cert, hello("web-2", "other", Some(("web", "10.0.0.7:4143")))).await {
        Ok(mut s) => s.next(WAIT).await.expect_err("refused"),
        Err(e) => e,
    };
    assert!(e.to_string().contains("namespace"), "{e}");
    cp.stop().await;
}

#[tokio::test]
async fn plain_text_cannot_reach_the_tls_ports() {
    let cp = start(Store::memory(), "cp").await;
    let plain = tonic::transport::Endpoint::from_shared(format!("http://{}", cp.grpc_addr))
        .expect("url")
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5));
    let failed = match plain.connect().await {
        Err(_) => true,
        Ok(ch) => {
            let key = rcgen::KeyPair::generate().expect("key");
            certify(&ch, "shop", "web", &"ab".repeat(32), csr(&key, &[], &[])).await.is_err()
        }
    };
    assert!(failed, "a plain-text gRPC client was served on the TLS port");
    let e = Api::new(&format!("http://{}", cp.admin_addr))
        .call(Method::GET, "/api/v1/proxies", None)
        .await
        .expect_err("plain HTTP on the HTTPS admin port");
    assert!(matches!(e, ctl::CtlError::Unreachable { .. }), "{e}");
    cp.stop().await;
}

#[tokio::test]
async fn identity_off_is_plain_text_without_certify() {
    let cp = ControlPlane::start_on(Store::memory(), Options::loopback("cp")).await.expect("starts");
    assert_eq!(cp.trust_anchors_pem(), None);
    assert_eq!(cp.admin_token(), None);
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", cp.grpc_addr))
        .expect("url")
        .connect()
        .await
        .expect("plain gRPC");
    let key = rcgen::KeyPair::generate().expect("key");
    let e = certify(&ch, "shop", "web", &"ab".repeat(32), csr(&key, &[], &[]))
        .await
        .expect_err("no Identity service");
    assert_eq!(e.code(), Code::Unimplemented);
    let api = Api::new(&format!("http://{}", cp.admin_addr));
    api.call(Method::GET, "/api/v1/proxies", None).await.expect("no token needed");
    let e = api
        .call(Method::POST, "/api/v1/tokens", Some(r#"{"namespace":"a","serviceAccount":"b"}"#.into()))
        .await
        .expect_err("no tokens without identity");
    assert!(e.to_string().contains("--identity"), "{e}");
    cp.stop().await;
}

#[tokio::test]
async fn the_admin_api_wants_the_token_but_metrics_do_not() {
    let cp = start(Store::memory(), "cp").await;
    for token in [None, Some("wrong")] {
        let e = admin(&cp, token).call(Method::GET, "/api/v1/proxies", None).await.expect_err("401");
        assert!(e.to_string().contains("--token-file"), "{e}");
    }
    let api = admin(&cp, Some(ADMIN_TOKEN));
    api.call(Method::GET, "/api/v1/proxies", None).await.expect("with the token");
    // Tokens through the API work for Certify.
    let made = api
        .call(
            Method::POST,
            "/api/v1/tokens",
            Some(r#"{"namespace":"shop","serviceAccount":"web","ttl":"1h"}"#.into()),
        )
        .await
        .expect("token created");
    assert_eq!(made["identity"], "spiffe://cluster.local/ns/shop/sa/web");
    assert!(made["expiresAt"].as_i64().is_some_and(|e| (now() + 3590..=now() + 3610).contains(&e)), "{made}");
    let key = rcgen::KeyPair::generate().expect("key");
    let t = made["token"].as_str().expect("token");
    certify(&channel(&cp, None).await, "shop", "web", t, csr(&key, &[], &[])).await.expect("certified");
    let e = api
        .call(
            Method::POST,
            "/api/v1/tokens",
            Some(r#"{"namespace":"shop","serviceAccount":"web","ttl":"forever"}"#.into()),
        )
        .await
        .expect_err("bad ttl");
    assert!(e.to_string().starts_with("ttl:"), "{e}");
    metrics(&cp).await;
    cp.stop().await;
}

#[tokio::test]
async fn ballastctl_talks_https_with_its_ca_and_token_files() {
    let cp = start(Store::memory(), "cp").await;
    let dir = tempfile::tempdir().expect("dir");
    let (ca, tok) = (dir.path().join("ca.crt"), dir.path().join("token"));
    std::fs::write(&ca, anchors(&cp)).expect("write");
    std::fs::write(&tok, format!("{ADMIN_TOKEN}\n")).expect("write");
    let url = format!("https://{}", cp.admin_addr);
    let run = |args: Vec<String>| async move {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_ballastctl"))
            .args(&args)
            .env_remove("BALLAST_CA_FILE")
            .env_remove("BALLAST_TOKEN_FILE")
            .env_remove("BALLAST_CONTROL_PLANE")
            .output()
            .await
            .expect("ballastctl runs");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let (ca, tok) = (ca.display().to_string(), tok.display().to_string());

    let (ok, out, err) =
        run(s(&["--control-plane", &url, "--ca-file", &ca, "--token-file", &tok, "get", "proxies"])).await;
    assert!(ok && out.starts_with("NAMESPACE"), "{out}{err}");
    let (ok, out, err) = run(s(&[
        "--control-plane",
        &url,
        "--ca-file",
        &ca,
        "--token-file",
        &tok,
        "token",
        "create",
        "--namespace",
        "shop",
        "--service-account",
        "web",
        "--ttl",
        "2h",
    ]))
    .await;
    let printed = out.trim();
    assert!(ok && printed.len() == 64 && printed.bytes().all(|b| b.is_ascii_hexdigit()), "{out}{err}");
    let key = rcgen::KeyPair::generate().expect("key");
    certify(&channel(&cp, None).await, "shop", "web", printed, csr(&key, &[], &[]))
        .await
        .expect("its token works");

    let (ok, _, err) = run(s(&["--control-plane", &url, "--token-file", &tok, "get", "proxies"])).await;
    assert!(!ok && err.contains("--ca-file"), "{err}");
    let (ok, _, err) = run(s(&["--control-plane", &url, "--ca-file", &ca, "get", "proxies"])).await;
    assert!(!ok && err.contains("--token-file"), "{err}");
    cp.stop().await;
}

#[tokio::test]
async fn replicas_on_one_store_share_the_generated_ca() {
    let store = Store::memory();
    let (a, b) = tokio::join!(start(store.clone(), "cp-a"), start(store.clone(), "cp-b"));
    assert_eq!(anchors(&a), anchors(&b));
    // A certificate from one replica opens a stream with identity on the other.
    let (chain, key, _) = certificate(&a, "shop", "web").await;
    let mut s = SimSidecar::on(
        channel(&b, Some((&chain, &key))).await,
        hello("web-1", "shop", Some(("web", "10.0.0.5:4143"))),
    )
    .await
    .expect("stream on b");
    s.next_acked(WAIT).await.expect("push");
    let api = admin(&b, Some(ADMIN_TOKEN));
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let v = api.call(Method::GET, "/api/v1/proxies", None).await.expect("proxies");
        if v.as_array()
            .into_iter()
            .flatten()
            .any(|p| p["identity"] == "spiffe://cluster.local/ns/shop/sa/web")
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "identity not recorded: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.stop().await;
    b.stop().await;
}

/// The control plane binary with `args` on loopback ports, in an environment of its own
/// (only `PATH` kept), killed if it has not ended in time.
async fn control_plane_binary(args: &[&str]) -> std::process::Output {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_ballast-control-plane"));
    command.env_clear().args(args).args(["--grpc-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"]);
    if let Some(path) = std::env::var_os("PATH") {
        command.env("PATH", path);
    }
    output_within(command, Duration::from_secs(30)).await
}

#[tokio::test]
async fn the_binary_wants_an_admin_token_file_with_identity() {
    let out = control_plane_binary(&["--identity"]).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--admin-token-file"), "{err}");
    let out = control_plane_binary(&["--ca-secret", "ballast-ca"]).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--kubernetes"), "{err}");
}
