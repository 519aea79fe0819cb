//! The push stream end to end, in process: a control plane (on the embedded store, or
//! on a real etcd where replicas share it), simulated sidecars that see exactly what is
//! pushed, and the admin API as `ballastctl` calls it.

mod support;

use std::time::{Duration, Instant};

use ballast_api::proto::v1::ToSidecar;
use ballast_control_plane::ctl::{self, Api, ApplyArgs, Kind, Output};
use ballast_control_plane::server::{ControlPlane, Options};
use ballast_control_plane::sim::{SimSidecar, hello};
use ballast_control_plane::store::Store;
use http::Method;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(5);

async fn start(store: Store, replica: &str) -> ControlPlane {
    ControlPlane::start_on(store, Options::loopback(replica)).await.expect("starts")
}

fn grpc(cp: &ControlPlane) -> String {
    format!("http://{}", cp.grpc_addr)
}

fn api(cp: &ControlPlane) -> Api {
    Api::new(&format!("http://{}", cp.admin_addr))
}

async fn apply(cp: &ControlPlane, yaml: &str) -> Value {
    api(cp).call(Method::POST, "/api/v1/apply", Some(yaml.to_owned().into())).await.expect("applied")
}

const CATALOG: &str = "apiVersion: ballast.io/v1alpha1\nkind: Service\nmetadata: {name: catalog, namespace: shop}\nspec:\n  ports: [{port: 80}]\n  endpoints: [{address: \"10.0.0.1:80\"}]\n";

fn policy(target: &str, extra: &str) -> String {
    format!(
        "apiVersion: ballast.io/v1alpha1\nkind: ResiliencePolicy\nmetadata: {{name: {target}, namespace: shop}}\nspec:\n  targetRef: {{service: {target}}}\n  timeouts: {{request: 2s}}\n{extra}"
    )
}

fn keys(m: &ToSidecar) -> Vec<&str> {
    m.upserts.iter().map(|r| r.key.as_str()).collect()
}

fn resource(m: &ToSidecar, key: &str) -> Value {
    let r = m.upserts.iter().find(|r| r.key == key).unwrap_or_else(|| panic!("{key} not in {:?}", keys(m)));
    serde_json::from_slice(&r.json).expect("json")
}

fn endpoints_of(service: &Value) -> Vec<String> {
    service["spec"]["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["address"].as_str().map(str::to_owned))
        .collect()
}

/// Reads updates (acking each) until `f` holds for one; returns it.
async fn until(s: &mut SimSidecar, what: &str, f: impl Fn(&ToSidecar) -> bool) -> ToSidecar {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let m = s.next_acked(left).await.unwrap_or_else(|e| panic!("waiting for {what}: {e}"));
        if f(&m) {
            return m;
        }
    }
}

#[tokio::test]
async fn snapshot_then_only_what_changed_each_versioned() {
    let cp = start(Store::memory(), "cp-a").await;
    apply(&cp, CATALOG).await;
    let mut client = SimSidecar::connect(&grpc(&cp), hello("web-1", "shop", None)).await.expect("connects");
    let first = client.next_acked(WAIT).await.expect("snapshot");
    assert!(first.full);
    assert_eq!(keys(&first), ["Service/shop/catalog"]);

    let applied = apply(&cp, &policy("catalog", "")).await;
    let update = client.next_acked(WAIT).await.expect("update");
    assert!(!update.full);
    assert_eq!(keys(&update), ["ResiliencePolicy/shop/catalog"], "only the policy changed");
    assert_eq!(update.version as i64, applied["revision"].as_i64().expect("revision"));
    assert!(update.version > first.version);

    // Another namespace's change reaches nobody here.
    apply(&cp, &CATALOG.replace("namespace: shop", "namespace: other")).await;
    let r = api(&cp).call(Method::DELETE, "/api/v1/policies/shop/catalog", None).await.expect("deleted");
    let update = client.next_acked(WAIT).await.expect("update");
    assert_eq!(update.removals, ["ResiliencePolicy/shop/catalog"]);
    assert_eq!(update.version as i64, r["revision"].as_i64().expect("revision"), "nothing pushed in between");
    cp.stop().await;
}

#[tokio::test]
async fn a_registered_endpoint_reaches_callers_and_goes_when_its_sidecar_closes() {
    let cp = start(Store::memory(), "cp-a").await;
    let mut caller = SimSidecar::connect(&grpc(&cp), hello("web-1", "shop", None)).await.expect("connects");
    let first = caller.next_acked(WAIT).await.expect("snapshot");
    assert!(first.upserts.is_empty());

    let started = Instant::now();
    let mut server =
        SimSidecar::connect(&grpc(&cp), hello("payments-1", "shop", Some(("payments", "127.0.0.1:4143"))))
            .await
            .expect("connects");
    server.next_acked(WAIT).await.expect("its own snapshot");
    let seen = until(&mut caller, "the new endpoint", |m| {
        m.upserts.iter().any(|r| r.key == "Service/shop/payments")
    })
    .await;
    let took = started.elapsed();
    assert_eq!(endpoints_of(&resource(&seen, "Service/shop/payments")), ["127.0.0.1:4143"]);
    assert!(took < Duration::from_secs(2), "registration took {took:?}");

    let proxies = ctl::get(&api(&cp), Kind::Proxies, None, Output::Json).await.expect("proxies");
    let proxies: Value = serde_json::from_str(&proxies).expect("json");
    let pods: Vec<&str> =
        proxies.as_array().expect("array").iter().filter_map(|p| p["pod"].as_str()).collect();
    assert_eq!(pods, ["payments-1", "web-1"]);

    drop(server);
    let gone = until(&mut caller, "the endpoint's removal", |m| !m.removals.is_empty()).await;
    assert_eq!(
        gone.removals,
        ["Service/shop/payments"],
        "a service known only from registrations goes with them"
    );
    let (kvs, _) = cp.store.list("/ballast/endpoints/").await.expect("list");
    assert!(kvs.is_empty(), "deregistered: {kvs:?}");
    cp.stop().await;
}

#[tokio::test]
async fn a_nack_is_reported_and_the_next_push_is_full() {
    let cp = start(Store::memory(), "cp-a").await;
    apply(&cp, CATALOG).await;
    let mut s = SimSidecar::connect(&grpc(&cp), hello("web-1", "shop", None)).await.expect("connects");
    s.next_acked(WAIT).await.expect("snapshot");
    apply(&cp, &policy("catalog", "")).await;
    let update = s.next(WAIT).await.expect("update");
    s.nack(update.version, "ResiliencePolicy/shop/catalog: spec.timeouts.request: unsupported here")
        .await
        .expect("nack");

    let deadline = Instant::now() + WAIT;
    let status = loop {
        let v = api(&cp).call(Method::GET, "/api/v1/proxies", None).await.expect("proxies");
        let p = v[0].clone();
        if p["state"] == "NACKED" || Instant::now() > deadline {
            break p;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status["state"], "NACKED", "{status}");
    assert!(status["nack"]["reason"].as_str().expect("reason").contains("spec.timeouts.request"));
    let table = ctl::get(&api(&cp), Kind::Proxies, Some("shop"), Output::Table).await.expect("table");
    assert!(table.contains("NACKED") && table.contains("unsupported here"), "{table}");

    // The sidecar kept its old configuration, so the next change brings everything.
    apply(&cp, &CATALOG.replace("10.0.0.1:80", "10.0.0.2:80")).await;
    let next = s.next_acked(WAIT).await.expect("next");
    assert!(next.full);
    assert_eq!(keys(&next), ["ResiliencePolicy/shop/catalog", "Service/shop/catalog"]);
    cp.stop().await;
}

#[tokio::test]
async fn wait_returns_on_acks_and_names_the_laggards_on_timeout() {
    let cp = start(Store::memory(), "cp-a").await;
    apply(&cp, CATALOG).await;
    let mut good = SimSidecar::connect(&grpc(&cp), hello("web-1", "shop", None)).await.expect("connects");
    good.next_acked(WAIT).await.expect("snapshot");
    let mut slow = SimSidecar::connect(&grpc(&cp), hello("web-2", "shop", None)).await.expect("connects");
    slow.next_acked(WAIT).await.expect("snapshot");
    // In another namespace: not reached by the change, so not waited for.
    let mut other =
        SimSidecar::connect(&grpc(&cp), hello("search-1", "other", None)).await.expect("connects");
    other.next(WAIT).await.expect("snapshot (never acked)");

    let file = tempfile::NamedTempFile::new().expect("tmp");
    std::fs::write(file.path(), policy("catalog", "")).expect("write");
    let args = ApplyArgs { file: file.path().to_owned(), wait: true, timeout: Duration::from_secs(5) };
    let api = api(&cp);
    let (applied, _) = tokio::join!(ctl::apply(&api, &args, Output::Table), async {
        good.next_acked(WAIT).await.expect("update");
        slow.next_acked(WAIT).await.expect("update");
    });
    let applied = applied.expect("wait succeeds");
    assert!(applied.contains("acked by 2 sidecar(s)"), "{applied}");

    // web-2 now stops acking: the wait fails after its timeout, naming it.
    std::fs::write(file.path(), policy("catalog", "  retries: {attempts: 2}\n")).expect("write");
    let args = ApplyArgs { timeout: Duration::from_millis(800), ..args };
    let started = Instant::now();
    let (result, _) = tokio::join!(ctl::apply(&api, &args, Output::Table), async {
        good.next_acked(WAIT).await.expect("update");
        slow.next(WAIT).await.expect("update, not acked");
    });
    let err = result.expect_err("times out").to_string();
    assert!(err.contains("shop/web-2") && !err.contains("shop/web-1") && !err.contains("search-1"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(4));
    cp.stop().await;
}

#[tokio::test]
async fn global_inbound_rate_limit_is_split_among_live_replicas() {
    let cp = start(Store::memory(), "cp-a").await;
    apply(
        &cp,
        &policy("payments", "  inbound:\n    rateLimit: {requestsPerSecond: 90, burst: 9, scope: global}\n"),
    )
    .await;
    let share = |m: &ToSidecar| {
        resource(m, "ResiliencePolicy/shop/payments")["spec"]["inbound"]["rateLimit"]["requestsPerSecond"]
            .as_f64()
    };
    let has_policy = |m: &ToSidecar| m.upserts.iter().any(|r| r.key == "ResiliencePolicy/shop/payments");
    let mut replicas = Vec::new();
    for i in 0..3 {
        let h =
            hello(&format!("payments-{i}"), "shop", Some(("payments", &format!("127.0.0.1:{}", 4000 + i))));
        let mut s =
            SimSidecar::connect(&grpc(&cp), SimHello::calls(h, &["search.other"])).await.expect("connects");
        s.next_acked(WAIT).await.expect("snapshot");
        replicas.push(s);
    }
    // Every replica converges on a third.
    for s in &mut replicas {
        let m = until(s, "a third", |m| has_policy(m) && share(m) == Some(30.0)).await;
        assert_eq!(share(&m), Some(30.0));
    }
    drop(replicas.pop());
    for s in &mut replicas {
        until(s, "a half", |m| has_policy(m) && share(m) == Some(45.0)).await;
    }
    cp.stop().await;
}

/// Hello with `calls` set.
struct SimHello;
impl SimHello {
    fn calls(mut h: ballast_api::proto::v1::Hello, calls: &[&str]) -> ballast_api::proto::v1::Hello {
        h.calls = calls.iter().map(|c| (*c).to_owned()).collect();
        h
    }
}

#[tokio::test]
async fn apply_refuses_a_second_policy_for_a_target_and_names_the_field() {
    let cp = start(Store::memory(), "cp-a").await;
    apply(&cp, &policy("catalog", "")).await;
    let other = policy("catalog", "").replace("metadata: {name: catalog", "metadata: {name: catalog-2");
    let err = api(&cp).call(Method::POST, "/api/v1/apply", Some(other.into())).await.expect_err("refused");
    let err = err.to_string();
    assert!(err.contains("spec.targetRef") && err.contains("shop/catalog"), "{err}");
    let bad = policy("catalog", "  retries: {attempts: 3, budget: {ratio: 7}}\n");
    let err = api(&cp)
        .call(Method::POST, "/api/v1/apply?source=bad.yaml", Some(bad.into()))
        .await
        .expect_err("refused");
    assert!(
        err.to_string().contains("bad.yaml:1") && err.to_string().contains("spec.retries.budget.ratio"),
        "{err}"
    );
    // Nothing of the refused file was written; the working policy stays.
    let v = api(&cp).call(Method::GET, "/api/v1/policies", None).await.expect("policies");
    assert_eq!(v.as_array().map(Vec::len), Some(1));
    assert!(v[0]["spec"]["retries"].is_null());
    cp.stop().await;
}

/// Two replicas on one etcd: stopping one moves its sidecars to the other without their
/// endpoint leaving any caller's view.
#[tokio::test]
async fn a_replica_restart_moves_sidecars_without_dropping_their_endpoints() {
    let etcd = support::etcd::EtcdServer::start();
    let store_a = Store::etcd(&[etcd.endpoint()]).await.expect("etcd");
    let store_b = Store::etcd(&[etcd.endpoint()]).await.expect("etcd");
    let a = start(store_a, "cp-a").await;
    let b = start(store_b, "cp-b").await;
    let mut caller = SimSidecar::connect(&grpc(&b), hello("web-1", "shop", None)).await.expect("connects");
    caller.next_acked(WAIT).await.expect("snapshot");
    let server_hello = hello("payments-1", "shop", Some(("payments", "127.0.0.1:4143")));
    let mut server = SimSidecar::connect(&grpc(&a), server_hello.clone()).await.expect("connects");
    let snap = server.next_acked(WAIT).await.expect("snapshot");
    until(&mut caller, "the endpoint", |m| m.upserts.iter().any(|r| r.key == "Service/shop/payments")).await;

    // Replica a stops: the stream ends, the registration stays.
    a.stop().await;
    let deadline = Instant::now() + WAIT;
    while server.next_acked(WAIT).await.is_ok() {
        assert!(Instant::now() < deadline, "the stream did not end");
    }
    let mut server = SimSidecar::connect(
        &grpc(&b),
        ballast_api::proto::v1::Hello { have_version: snap.version, ..server_hello },
    )
    .await
    .expect("reconnects to b");
    server.next_acked(WAIT).await.expect("snapshot from b");
    // The caller saw no removal; the key now lives under b's lease.
    let quiet = caller.next(Duration::from_millis(500)).await;
    if let Ok(m) = &quiet {
        assert!(m.removals.is_empty(), "{m:?}");
        assert!(
            m.upserts
                .iter()
                .all(|r| endpoints_of(&serde_json::from_slice(&r.json).expect("json")) == ["127.0.0.1:4143"])
        );
    }
    let (kv, _) = b.store.get("/ballast/endpoints/shop/payments/127.0.0.1:4143").await.expect("get");
    let kv = kv.expect("still registered");
    let proxies = api(&b).call(Method::GET, "/api/v1/proxies", None).await.expect("proxies");
    let p = proxies
        .as_array()
        .expect("array")
        .iter()
        .find(|p| p["pod"] == "payments-1")
        .cloned()
        .expect("listed");
    assert_eq!(p["replica"], "cp-b", "{p}");
    assert!(kv.lease.is_some());

    // A clean close from the sidecar deregisters at once.
    drop(server);
    let gone = until(&mut caller, "the removal", |m| !m.removals.is_empty()).await;
    assert_eq!(gone.removals, ["Service/shop/payments"]);
    b.stop().await;
    let _ = json!(null);
}

/// Compaction is work for one replica: the lock has one holder, the other waits, and
/// etcd's history is compacted.
#[tokio::test]
async fn one_replica_compacts_the_history_under_a_lock() {
    let etcd = support::etcd::EtcdServer::start();
    let every = Duration::from_millis(200);
    let mut replicas = Vec::new();
    for name in ["cp-a", "cp-b"] {
        let store = Store::etcd(&[etcd.endpoint()]).await.expect("etcd");
        let opts = Options { compact_every: every, ..Options::loopback(name) };
        replicas.push(ControlPlane::start_on(store, opts).await.expect("starts"));
    }
    let store = Store::etcd(&[etcd.endpoint()]).await.expect("etcd");
    // History to compact.
    for i in 0..20 {
        store.put("/ballast/x", vec![i], None).await.expect("put");
    }
    let deadline = Instant::now() + WAIT;
    loop {
        let contenders = store.list("/ballast/locks/compactor/").await.expect("list").0;
        let compacted = matches!(
            store.watch("/ballast/", 1).await.expect("watch").next().await,
            Some(Err(ballast_control_plane::store::StoreError::Compacted { .. }))
        );
        if contenders.len() == 2 && compacted {
            break;
        }
        assert!(Instant::now() < deadline, "contenders {contenders:?}, compacted {compacted}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for cp in replicas {
        cp.stop().await;
    }
}
