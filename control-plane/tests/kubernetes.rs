//! The Kubernetes sync (`--kubernetes`) against a fake API server (`support::fake_api`,
//! kube's mock-service pattern, recorded API JSON in `tests/fixtures/kubernetes/`) and
//! a real store: the embedded one and a real etcd, as in production.
//!
//! What is checked: policies written with `Accepted=True`; an invalid update keeps the
//! stored version and says which field; conflicts (older wins, `ballastctl` always wins);
//! deletions; Services and EndpointSlices mirrored (not-ready pods left out, scale-down,
//! deletion, a deletion only a re-list reveals); what `ballastctl` applied and what
//! sidecars registered never touched; a pod seen once when both its sidecar and its
//! EndpointSlice name it; one writer among two replicas, and the other taking over;
//! `/ready`, `/metrics` (promtool) and the admin API with `--kubernetes`.

#[macro_use]
mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use ballast_control_plane::keys::Keys;
use ballast_control_plane::kubernetes::{KubernetesSync, Role, SyncState};
use ballast_control_plane::metrics::Metrics;
use ballast_control_plane::server::{ControlPlane, Options};
use ballast_control_plane::session::Session;
use ballast_control_plane::store::{LeaseId, Store};
use ballast_control_plane::sync::MeshSync;
use serde_json::{Value, json};
use support::etcd::EtcdServer;
use support::fake_api::{FakeApi, Kind};
use support::{Backend, WAIT, metric, output_within, until};
use tokio::sync::watch;

on_both_stores!(policies_follow_their_resources, services_and_endpoint_slices_are_mirrored);

/// Every key under `/ballast/` with its JSON (locks, which hold nothing, as null), and
/// its mod revision.
async fn snapshot(store: &Store) -> BTreeMap<String, (Value, i64)> {
    let (kvs, _) = store.list("/ballast/").await.expect("list");
    kvs.into_iter()
        .map(|kv| (kv.key, (serde_json::from_slice(&kv.value).unwrap_or(Value::Null), kv.mod_revision)))
        .collect()
}

/// Waits until the store satisfies `f`; returns that snapshot.
async fn until_store(
    store: &Store,
    what: &str,
    f: impl Fn(&BTreeMap<String, (Value, i64)>) -> bool,
) -> BTreeMap<String, (Value, i64)> {
    until(what, || async {
        let s = snapshot(store).await;
        f(&s).then_some(s)
    })
    .await
}

async fn until_state(state: &watch::Receiver<SyncState>, what: &str, f: impl Fn(&SyncState) -> bool) {
    let mut rx = state.clone();
    tokio::time::timeout(WAIT, rx.wait_for(|s| f(s)))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}; state {:?}", *state.borrow()))
        .expect("the sync is running");
}

/// The `Accepted` condition of a policy as the fake holds it.
fn accepted(fake: &FakeApi, name: &str) -> Option<(String, String, String, i64)> {
    let p = fake.get(Kind::Policy, "shop", name)?;
    let c = p["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == "Accepted")?.clone();
    Some((
        c["status"].as_str()?.to_owned(),
        c["reason"].as_str()?.to_owned(),
        c["message"].as_str()?.to_owned(),
        p["status"]["observedGeneration"].as_i64()?,
    ))
}

async fn until_accepted(fake: &FakeApi, name: &str, reason: &str, generation: i64) -> String {
    until(&format!("{name}: Accepted reason {reason} for generation {generation}"), || async {
        accepted(fake, name).filter(|a| a.1 == reason && a.3 == generation).map(|a| a.2)
    })
    .await
}

/// A sync on `store` with its own session (lease), as one replica runs it.
fn start(fake: &FakeApi, client: &str, store: &Store) -> (KubernetesSync, Session) {
    start_metered(fake, client, store, Metrics::new())
}

/// [`start`], counting into `metrics`.
fn start_metered(fake: &FakeApi, client: &str, store: &Store, metrics: Metrics) -> (KubernetesSync, Session) {
    let session = Session::start(store.clone(), Duration::from_secs(2), Metrics::new());
    let sync = KubernetesSync::start(
        fake.client(client),
        store.clone(),
        Keys::default(),
        session.lease.clone(),
        metrics,
    );
    (sync, session)
}

fn policy(name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "ballast.io/v1alpha1", "kind": "ResiliencePolicy",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": spec,
    })
}

fn payments_spec(request: &str) -> Value {
    json!({
        "targetRef": {"service": "payments"},
        "timeouts": {"request": request, "perTry": "500ms"},
        "retries": {"attempts": 3, "on": ["gateway-error", "reset", "connect-failure"],
                    "backoff": {"base": "25ms", "max": "250ms"}, "budget": {"ratio": 0.2, "minPerSecond": 10}},
    })
}

async fn put_json(store: &Store, key: &str, v: Value, lease: Option<LeaseId>) -> i64 {
    store.put(key, serde_json::to_vec(&v).expect("json"), lease).await.expect("put")
}

async fn policies_follow_their_resources(store: Store) {
    let by_hand = "/ballast/policies/shop/catalog-by-hand";
    let applied = put_json(
        &store,
        by_hand,
        json!({"apiVersion": "ballast.io/v1alpha1", "kind": "ResiliencePolicy",
               "metadata": {"name": "catalog-by-hand", "namespace": "shop"},
               "spec": {"targetRef": {"service": "catalog"}}}),
        None,
    )
    .await;
    let fake = FakeApi::from_fixtures();
    let (sync, _session) = start(&fake, "cp", &store);
    until_state(&sync.state(), "the first full sync", |s| s.synced).await;

    // The recorded policy: stored as ballastctl stores it, plus the marker, minus kubectl's copy.
    let key = "/ballast/policies/shop/payments";
    let s = until_store(&store, "the payments policy", |s| s.contains_key(key)).await;
    let stored = &s[key].0;
    assert_eq!(stored["metadata"]["annotations"], json!({"ballast.io/source": "kubernetes"}));
    assert_eq!(stored["metadata"]["labels"], json!({"team": "payments"}));
    assert_eq!(stored["metadata"]["namespace"], "shop");
    assert_eq!(stored["spec"]["timeouts"], json!({"request": "2s", "perTry": "500ms"}));
    assert_eq!(stored["spec"]["retries"]["budget"]["ratio"], 0.2);
    let message = until_accepted(&fake, "payments", "Accepted", 1).await;
    assert_eq!(accepted(&fake, "payments").expect("written").0, "True");
    assert!(message.contains("shop/payments"), "{message}");

    // An invalid update (the schema lets `0.1ns` through; the parser rounds it to 0s):
    // the stored version stays, the status names the field.
    fake.apply(Kind::Policy, policy("payments", payments_spec("0.1ns")));
    let message = until_accepted(&fake, "payments", "Invalid", 2).await;
    assert!(message.contains("spec.timeouts.request"), "{message}");
    assert!(message.contains("stays in force"), "{message}");
    assert_eq!(accepted(&fake, "payments").expect("written").0, "False");
    assert_eq!(
        snapshot(&store).await[key].0["spec"]["timeouts"]["request"],
        "2s",
        "the working version stays"
    );

    // A newer policy for the same service loses to the older one.
    fake.apply(
        Kind::Policy,
        policy("payments-v2", json!({"targetRef": {"service": "payments"}, "timeouts": {"request": "9s"}})),
    );
    let message = until_accepted(&fake, "payments-v2", "Conflict", 1).await;
    assert!(message.contains("ResiliencePolicy shop/payments") && message.contains("older"), "{message}");
    // A policy applied with ballastctl holds its service against any resource.
    fake.apply(Kind::Policy, policy("catalog", json!({"targetRef": {"service": "catalog"}})));
    let message = until_accepted(&fake, "catalog", "Conflict", 1).await;
    assert!(message.contains("shop/catalog-by-hand") && message.contains("ballastctl"), "{message}");
    // A name Kubernetes allows and Ballast does not: the control plane's check.
    fake.apply(Kind::Policy, policy("search.v2", json!({"targetRef": {"service": "search"}})));
    let message = until_accepted(&fake, "search.v2", "Invalid", 1).await;
    assert!(message.starts_with("metadata.name"), "{message}");
    let s = snapshot(&store).await;
    assert!(!s.contains_key("/ballast/policies/shop/payments-v2"));
    assert!(!s.contains_key("/ballast/policies/shop/catalog"));
    assert!(!s.contains_key("/ballast/policies/shop/search.v2"));

    // Each status write comes back as a change of the resource: none may cause another.
    let patches = fake.status_patches().len();
    assert_eq!(patches, 5, "one per outcome: {:?}", fake.status_patches());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(fake.status_patches().len(), patches, "no status written again: {:?}", fake.status_patches());

    // Fixed: in force again.
    fake.apply(Kind::Policy, policy("payments", payments_spec("3s")));
    until_accepted(&fake, "payments", "Accepted", 3).await;
    until_store(&store, "the fixed payments policy", |s| s[key].0["spec"]["timeouts"]["request"] == "3s")
        .await;

    // Deleted: its key goes, and the newer policy gets the service.
    fake.delete(Kind::Policy, "shop", "payments");
    until_store(&store, "payments-v2 in place of payments", |s| {
        !s.contains_key(key) && s.contains_key("/ballast/policies/shop/payments-v2")
    })
    .await;
    until_accepted(&fake, "payments-v2", "Accepted", 1).await;

    let s = snapshot(&store).await;
    assert_eq!(s[by_hand].1, applied, "ballastctl's policy is never touched");
    assert!(fake.unexpected().is_empty(), "{:?}", fake.unexpected());
    sync.stop().await;
}

fn endpoint_keys(s: &BTreeMap<String, (Value, i64)>, service: &str) -> Vec<String> {
    let prefix = format!("/ballast/endpoints/{service}/");
    s.keys().filter_map(|k| k.strip_prefix(&prefix)).map(str::to_owned).collect()
}

fn web_slice(pods: &[(&str, bool)]) -> Value {
    let mut slice =
        FakeApi::from_fixtures().get(Kind::Slice, "shop", "web-bq5rv").expect("the recorded slice");
    slice["apiVersion"] = json!("discovery.k8s.io/v1");
    slice["kind"] = json!("EndpointSlice");
    slice["endpoints"] = pods
        .iter()
        .map(|(ip, ready)| {
            json!({"addresses": [ip], "conditions": {"ready": ready, "serving": ready, "terminating": false},
                   "nodeName": "ballast-worker", "targetRef": {"kind": "Pod", "name": format!("web-{ip}"), "namespace": "shop"}})
        })
        .collect();
    slice
}

async fn services_and_endpoint_slices_are_mirrored(store: Store) {
    // Before the sync starts: a Service applied with ballastctl, a sidecar's registration
    // (web's first pod is injected), and what a previous leader mirrored for a Service
    // deleted while nobody watched.
    let legacy = "/ballast/services/shop/legacy";
    let legacy_at = put_json(
        &store,
        legacy,
        json!({"apiVersion": "ballast.io/v1alpha1", "kind": "Service", "metadata": {"name": "legacy", "namespace": "shop"},
               "spec": {"ports": [{"port": 80}], "endpoints": [{"address": "192.168.1.10:80"}]}}),
        None,
    )
    .await;
    let lease = store.grant(Duration::from_secs(60)).await.expect("lease");
    let registered = "/ballast/endpoints/shop/web/10.244.1.7:4143";
    let registered_at = put_json(
        &store,
        registered,
        json!({"address": "10.244.1.7:4143", "pod": "web-7c9d8f6b5-2lq9x"}),
        Some(lease),
    )
    .await;
    put_json(
        &store,
        "/ballast/services/shop/ghost",
        json!({"apiVersion": "ballast.io/v1alpha1", "kind": "Service",
               "metadata": {"name": "ghost", "namespace": "shop", "annotations": {"ballast.io/source": "kubernetes"}},
               "spec": {"ports": [{"port": 80}]}}),
        None,
    )
    .await;
    put_json(
        &store,
        "/ballast/endpoints/shop/ghost/10.244.9.9:80",
        json!({"address": "10.244.9.9:80", "pod": "ghost-1", "source": "kubernetes"}),
        None,
    )
    .await;

    let fake = FakeApi::from_fixtures();
    let (sync, _session) = start(&fake, "cp", &store);
    until_state(&sync.state(), "the first full sync", |s| s.synced).await;
    let s = snapshot(&store).await;

    let web = &s["/ballast/services/shop/web"].0;
    assert_eq!(
        web,
        &json!({"apiVersion": "ballast.io/v1alpha1", "kind": "Service",
                "metadata": {"name": "web", "namespace": "shop", "annotations": {"ballast.io/source": "kubernetes"}},
                "spec": {"ports": [{"port": 80, "protocol": "http", "name": "http"}], "addresses": ["10.96.112.40"]}})
    );
    // The not-ready pod (10.244.2.5) is left out; the sidecar's registration is kept.
    assert_eq!(endpoint_keys(&s, "shop/web"), ["10.244.1.7:4143", "10.244.1.7:8080", "10.244.2.4:8080"]);
    assert_eq!(
        s["/ballast/endpoints/shop/web/10.244.2.4:8080"].0,
        json!({"address": "10.244.2.4:8080", "pod": "web-7c9d8f6b5-9hf4n", "weight": 1, "source": "kubernetes"})
    );
    assert_eq!(s[registered].1, registered_at, "a sidecar's registration is never touched");
    // Several ports, none remapped: bare IPs; the UDP port is not the mesh's.
    let dns = &s["/ballast/services/kube-system/kube-dns"].0;
    assert_eq!(
        dns["spec"]["ports"],
        json!([{"port": 53, "name": "dns-tcp"}, {"port": 9153, "name": "metrics"}])
    );
    assert_eq!(endpoint_keys(&s, "kube-system/kube-dns"), ["10.244.0.2", "10.244.0.3"]);
    assert_eq!(endpoint_keys(&s, "default/kubernetes"), ["172.18.0.2:6443"]);
    assert!(!s.contains_key("/ballast/services/shop/billing-api"), "ExternalName is not mirrored");
    // What a previous leader wrote for a Service gone from Kubernetes is gone.
    assert!(!s.contains_key("/ballast/services/shop/ghost"));
    assert!(endpoint_keys(&s, "shop/ghost").is_empty());
    assert_eq!(s[legacy].1, legacy_at);

    // Callers see web's injected pod once, through its sidecar.
    let mesh = MeshSync::start(store.clone(), Keys::default());
    let (_, now) = store.get("/ballast/").await.expect("revision");
    assert!(mesh.caught_up(now, WAIT).await);
    let mut addresses: Vec<String> = {
        let m = mesh.mesh.read().expect("mesh");
        let web = m.service_with_endpoints(&("shop".into(), "web".into())).expect("web");
        web.spec.endpoints.into_iter().map(|e| e.address).collect()
    };
    addresses.sort();
    assert_eq!(addresses, ["10.244.1.7:4143", "10.244.2.4:8080"]);

    // Scale down, and a pod becoming ready.
    fake.apply(Kind::Slice, web_slice(&[("10.244.1.7", true), ("10.244.2.5", true)]));
    until_store(&store, "web scaled", |s| {
        endpoint_keys(s, "shop/web") == ["10.244.1.7:4143", "10.244.1.7:8080", "10.244.2.5:8080"]
    })
    .await;

    // A Kubernetes Service with the name of one applied with ballastctl: ballastctl's wins.
    let mut legacy_svc = fake.get(Kind::Service, "shop", "web").expect("web");
    legacy_svc["metadata"] = json!({"name": "legacy", "namespace": "shop"});
    legacy_svc["apiVersion"] = json!("v1");
    legacy_svc["kind"] = json!("Service");
    legacy_svc["spec"]["clusterIP"] = json!("10.96.7.7");
    legacy_svc["spec"]["clusterIPs"] = json!(["10.96.7.7"]);
    fake.apply(Kind::Service, legacy_svc.clone());
    let mut legacy_slice = web_slice(&[("10.244.3.3", true)]);
    legacy_slice["metadata"]["name"] = json!("legacy-abcde");
    legacy_slice["metadata"]["labels"]["kubernetes.io/service-name"] = json!("legacy");
    fake.apply(Kind::Slice, legacy_slice);
    // Events are handled in order: once a later Service is mirrored, these were seen.
    let mut later = legacy_svc;
    later["metadata"]["name"] = json!("later");
    later["spec"]["clusterIP"] = json!("10.96.8.8");
    later["spec"]["clusterIPs"] = json!(["10.96.8.8"]);
    fake.apply(Kind::Service, later);
    let s =
        until_store(&store, "the later service", |s| s.contains_key("/ballast/services/shop/later")).await;
    assert_eq!(s[legacy].1, legacy_at, "ballastctl's Service is never touched");
    assert!(endpoint_keys(&s, "shop/legacy").is_empty(), "nor given endpoints");

    // A Service deleted while the watch was down: the re-list shows it gone.
    fake.delete_unseen_and_expire(Kind::Service, "kube-system", "kube-dns");
    until_store(&store, "kube-dns gone after the re-list", |s| {
        !s.contains_key("/ballast/services/kube-system/kube-dns")
            && endpoint_keys(s, "kube-system/kube-dns").is_empty()
    })
    .await;

    // A Service deleted: everything the sync wrote for it goes, nothing else.
    fake.delete(Kind::Service, "shop", "web");
    let s = until_store(&store, "web gone", |s| {
        !s.contains_key("/ballast/services/shop/web") && endpoint_keys(s, "shop/web").len() == 1
    })
    .await;
    assert_eq!(endpoint_keys(&s, "shop/web"), ["10.244.1.7:4143"]);
    assert_eq!(s[registered].1, registered_at);
    assert_eq!(s[legacy].1, legacy_at);
    assert!(s.contains_key("/ballast/services/default/kubernetes"));
    assert!(fake.unexpected().is_empty(), "{:?}", fake.unexpected());
    sync.stop().await;
}

#[tokio::test]
async fn one_replica_syncs_and_another_takes_over_when_it_stops() {
    let etcd = EtcdServer::start();
    let store_a = Store::etcd(&[etcd.endpoint()]).await.expect("etcd");
    let store_b = Store::etcd(&[etcd.endpoint()]).await.expect("etcd");
    let fake = FakeApi::from_fixtures();
    let (a, _session_a) = start(&fake, "a", &store_a);
    until_state(&a.state(), "a leading and synced", |s| s.role == Role::Leader && s.synced).await;
    let (b, _session_b) = start(&fake, "b", &store_b);
    until_state(&b.state(), "b standing by", |s| s.role == Role::Standby).await;
    assert!(b.state().borrow().readiness().is_ok(), "a replica standing by is ready");

    let payments = "/ballast/policies/shop/payments";
    let before = snapshot(&store_a).await;
    assert!(before.contains_key(payments));
    fake.apply(Kind::Policy, policy("orders", json!({"targetRef": {"service": "orders"}})));
    until_store(&store_a, "orders", |s| s.contains_key("/ballast/policies/shop/orders")).await;
    until_accepted(&fake, "orders", "Accepted", 1).await;
    assert!(fake.requests().iter().all(|r| r.client == "a"), "only the lock holder talks to Kubernetes");
    assert!(fake.status_patches().iter().all(|(client, _, _)| client == "a"));

    a.stop().await;
    let stopped_at = fake.requests().iter().filter(|r| r.client == "a").count();
    until_state(&b.state(), "b leading and synced", |s| s.role == Role::Leader && s.synced).await;
    // b found the store as a left it: nothing to rewrite.
    assert_eq!(snapshot(&store_b).await[payments].1, before[payments].1);
    fake.apply(Kind::Policy, policy("search", json!({"targetRef": {"service": "search"}})));
    until_store(&store_b, "search", |s| s.contains_key("/ballast/policies/shop/search")).await;
    until_accepted(&fake, "search", "Accepted", 1).await;
    let patches = fake.status_patches();
    assert!(patches.iter().any(|(client, name, _)| client == "b" && name == "shop/search"), "{patches:?}");
    assert_eq!(fake.requests().iter().filter(|r| r.client == "a").count(), stopped_at, "a stopped talking");
    assert!(fake.unexpected().is_empty(), "{:?}", fake.unexpected());
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_resyncs_after_losing_its_lease_and_after_etcd_comes_back() {
    let mut etcd = EtcdServer::start();
    let store = Store::etcd(&[etcd.endpoint()]).await.expect("etcd");
    let fake = FakeApi::from_fixtures();
    let metrics = Metrics::new();
    let (sync, session) = start_metered(&fake, "cp", &store, metrics.clone());
    until_state(&sync.state(), "synced", |s| s.synced).await;
    let payments = "/ballast/policies/shop/payments";
    assert!(snapshot(&store).await.contains_key(payments));

    // The lease goes (as when etcd expired it): the lock with it. The sync takes the lock
    // again under the session's next lease and starts over with a full list, which alone
    // shows what no watch event said.
    let old = session.lease.borrow().expect("a lease");
    fake.delete_unseen(Kind::Policy, "shop", "payments");
    store.revoke(old).await.expect("revoke");
    until_store(&store, "payments gone after the new term's list", |s| !s.contains_key(payments)).await;
    assert_ne!(*session.lease.borrow(), Some(old));
    assert_eq!(sync.state().borrow().role, Role::Leader);

    // etcd down while Kubernetes changes: written once etcd is back.
    let store_errors = || metrics.kubernetes_errors.with_label_values(&["store"]).get();
    let failed_before = store_errors();
    tokio::task::block_in_place(|| etcd.stop());
    fake.apply(Kind::Policy, policy("orders", json!({"targetRef": {"service": "orders"}})));
    // The sync saw the change and failed to write it: only then does etcd come back.
    until("the sync to fail against the stopped etcd", || async {
        (store_errors() > failed_before).then_some(())
    })
    .await;
    tokio::task::block_in_place(|| etcd.restart());
    until_store(&store, "orders written after etcd came back", |s| {
        s.contains_key("/ballast/policies/shop/orders")
    })
    .await;
    until_accepted(&fake, "orders", "Accepted", 1).await;
    assert!(fake.unexpected().is_empty(), "{:?}", fake.unexpected());
    sync.stop().await;
}

#[tokio::test]
async fn refused_status_writes_do_not_hold_back_the_first_sync() {
    let store = Store::memory();
    let fake = FakeApi::from_fixtures();
    // No RBAC for resiliencepolicies/status: the store can still be brought in line.
    fake.forbid_status(true);
    let metrics = Metrics::new();
    let (sync, _session) = start_metered(&fake, "cp", &store, metrics.clone());
    until_state(&sync.state(), "the first full sync, statuses refused", |s| s.synced && s.ready).await;
    assert!(snapshot(&store).await.contains_key("/ballast/policies/shop/payments"));
    let status_errors = || metrics.kubernetes_errors.with_label_values(&["status"]).get();
    until("a refused status write counted", || async { (status_errors() > 0).then_some(()) }).await;
    assert_eq!(metrics.kubernetes_synced.get(), 1);
    assert!(accepted(&fake, "payments").is_none(), "no status got through");
    assert_eq!(metrics.kubernetes_errors.with_label_values(&["store"]).get(), 0);

    // RBAC fixed: the statuses are written again on their own, with nothing else changing.
    fake.forbid_status(false);
    until_accepted(&fake, "payments", "Accepted", 1).await;
    assert!(fake.unexpected().is_empty(), "{:?}", fake.unexpected());
    sync.stop().await;
}

async fn http(addr: std::net::SocketAddr, method: http::Method, path: &str, body: &str) -> (u16, String) {
    use http_body_util::{BodyExt, Full};
    let client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let req = http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .body(Full::new(bytes::Bytes::from(body.to_owned())))
        .expect("request");
    let resp = client.request(req).await.expect("the admin API answers");
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn the_control_plane_with_kubernetes_is_ready_after_the_first_sync() {
    let fake = FakeApi::from_fixtures();
    fake.open_lists(Kind::Slice, false);
    let opts = Options { kubernetes: true, ..Options::loopback("cp-k8s") };
    let cp = ControlPlane::start_with(Store::memory(), opts, Some(fake.client("cp"))).await.expect("starts");
    let admin = cp.admin_addr;
    let state = cp.kubernetes().expect("the sync runs");
    until_state(&state, "leading", |s| s.role == Role::Leader).await;
    // Unready, for the sync's reason once the store's are out of the way.
    until("/ready to wait for the first sync", || async {
        let (code, body) = http(admin, http::Method::GET, "/ready", "").await;
        assert_eq!(code, 503, "{body}");
        body.contains("first full sync").then_some(())
    })
    .await;

    fake.open_lists(Kind::Slice, true);
    until("/ready", || async { (http(admin, http::Method::GET, "/ready", "").await.0 == 200).then_some(()) })
        .await;

    let (_, metrics) = http(admin, http::Method::GET, "/metrics", "").await;
    assert_eq!(metric(&metrics, "ballast_control_plane_kubernetes_leader"), 1.0);
    assert_eq!(metric(&metrics, "ballast_control_plane_kubernetes_synced"), 1.0);
    // Becoming leader is one full resync, once all three kinds are listed.
    assert_eq!(metric(&metrics, "ballast_control_plane_kubernetes_full_syncs_total"), 1.0);
    assert_eq!(metric(&metrics, r#"ballast_control_plane_kubernetes_objects{kind="Service"}"#), 4.0);
    assert_eq!(metric(&metrics, r#"ballast_control_plane_kubernetes_policies{reason="Accepted"}"#), 1.0);
    assert_eq!(
        metric(&metrics, r#"ballast_control_plane_kubernetes_status_writes_total{reason="Accepted"}"#),
        1.0
    );
    assert!(
        metric(
            &metrics,
            r#"ballast_control_plane_kubernetes_store_writes_total{kind="endpoint",operation="put"}"#
        ) >= 5.0
    );
    support::promtool::check(&metrics);

    // The admin API knows what came from Kubernetes.
    let (_, endpoints) = http(admin, http::Method::GET, "/api/v1/endpoints", "").await;
    let endpoints: Value = serde_json::from_str(&endpoints).expect("json");
    let web: Vec<&Value> =
        endpoints.as_array().expect("a list").iter().filter(|e| e["service"] == "web").collect();
    assert_eq!(web.len(), 2, "{endpoints}");
    assert!(web.iter().all(|e| e["source"] == "kubernetes"), "{endpoints}");
    let (code, body) = http(admin, http::Method::DELETE, "/api/v1/policies/shop/payments", "").await;
    assert_eq!(code, 409, "{body}");
    assert!(
        body.contains("mirrored from Kubernetes") && body.contains("kubectl delete resiliencepolicy"),
        "{body}"
    );
    let marked = "apiVersion: ballast.io/v1alpha1\nkind: ResiliencePolicy\nmetadata: {name: x, namespace: shop, annotations: {ballast.io/source: kubernetes}}\nspec: {targetRef: {service: x}}\n";
    let (code, body) = http(admin, http::Method::POST, "/api/v1/apply", marked).await;
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("reserved"), "{body}");
    let over = "apiVersion: ballast.io/v1alpha1\nkind: ResiliencePolicy\nmetadata: {name: payments, namespace: shop}\nspec: {targetRef: {service: payments}}\n";
    let (code, body) = http(admin, http::Method::POST, "/api/v1/apply", over).await;
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("mirrored from Kubernetes"), "{body}");
    let rival = "apiVersion: ballast.io/v1alpha1\nkind: ResiliencePolicy\nmetadata: {name: rival, namespace: shop}\nspec: {targetRef: {service: payments}}\n";
    let (code, body) = http(admin, http::Method::POST, "/api/v1/apply", rival).await;
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("shop/payments") && body.contains("kubectl"), "{body}");

    cp.stop().await;
    assert!(fake.unexpected().is_empty(), "{:?}", fake.unexpected());
}

#[tokio::test]
async fn without_a_kubernetes_configuration_the_binary_says_so() {
    let home = tempfile::tempdir().expect("tempdir");
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_ballast-control-plane"));
    command
        .args(["--kubernetes", "--grpc-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"])
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .env("KUBECONFIG", home.path().join("missing"))
        .env("HOME", home.path());
    let out = output_within(command, Duration::from_secs(30)).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("no Kubernetes configuration") && stderr.contains("KUBECONFIG"), "{stderr}");
}
