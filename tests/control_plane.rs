//! Sidecars configured by the control plane, all real processes: `ballast-control-plane`
//! (on its embedded store, or replicas on a real etcd), `ballast-sidecar`s with
//! `--control-plane`, `ballastctl`, and HTTP traffic through them.

mod support;

#[path = "../control-plane/tests/support/etcd.rs"]
#[allow(dead_code)]
mod etcd;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use support::*;

/// A `ballast-control-plane` process, killed when dropped.
struct ControlPlane {
    child: Option<Child>,
    grpc: SocketAddr,
    admin: SocketAddr,
    etcd: Option<String>,
    name: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl ControlPlane {
    fn start(name: &str, etcd: Option<&str>) -> ControlPlane {
        let dir = tempfile::tempdir().expect("tmp");
        let grpc = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let admin = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let mut cp = ControlPlane {
            child: None,
            grpc,
            admin,
            etcd: etcd.map(str::to_owned),
            name: name.to_owned(),
            log: dir.path().join("cp.log"),
            _dir: dir,
        };
        cp.spawn();
        cp
    }

    /// (Re)starts the process on the same ports and waits for `/ready`.
    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("log");
        let mut cmd = Command::new(binary("ballast-control-plane"));
        cmd.args(["--grpc-addr", &self.grpc.to_string(), "--admin-addr", &self.admin.to_string()])
            .args(["--replica", &self.name])
            .env("BALLAST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(etcd) = &self.etcd {
            cmd.args(["--etcd", etcd]);
        }
        self.child = Some(cmd.spawn().expect("spawn ballast-control-plane"));
        let deadline = Instant::now() + Duration::from_secs(15);
        while !matches!(http_get(self.admin, "/ready"), Ok((200, _))) {
            assert!(Instant::now() < deadline, "control plane not ready; log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&mut self, sig: i32) {
        let Some(mut child) = self.child.take() else { return };
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(child.id() as i32, sig);
        }
        let _ = child.wait();
    }

    /// `ballastctl ARGS` against this replica: (success, stdout + stderr).
    fn ctl(&self, args: &[&str]) -> (bool, String) {
        let out = run(Command::new(binary("ballastctl"))
            .args(["--control-plane", &format!("http://{}", self.admin)])
            .args(args)
            .stdin(Stdio::null()));
        (out.status.success(), format!("{}{}", stdout(&out), String::from_utf8_lossy(&out.stderr)))
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let (ok, out) = self.ctl(args);
        assert!(ok, "ballastctl {args:?}: {out}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.signal(libc::SIGKILL);
    }
}

fn apply_file(yaml: &str) -> tempfile::NamedTempFile {
    let f = tempfile::Builder::new().suffix(".yaml").tempfile().expect("tmp");
    std::fs::write(f.path(), yaml).expect("write");
    f
}

/// GET through a sidecar's outbound listener, to `host`: (status, `ballast-rejected`).
fn call(client: &Sidecar, host: &str) -> (u16, String) {
    let raw = format!("GET /name HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    match http_request(client.outbound, &raw) {
        Ok((status, body)) => (status, body),
        Err(e) => (0, e.to_string()),
    }
}

fn pods(proxies: &serde_json::Value, state: &str) -> Vec<String> {
    let mut v: Vec<String> = proxies
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["state"] == state)
        .filter_map(|p| p["pod"].as_str().map(str::to_owned))
        .collect();
    v.sort();
    v
}

/// The sidecar of `payments-1` in `shop`, registered at its inbound listener, which
/// forwards to `app`.
fn payments_sidecar(control_plane: &str, app: &Upstream) -> Sidecar {
    let app_addr = app.addr.to_string();
    Sidecar::start_meshed(
        control_plane,
        &[
            "--namespace",
            "shop",
            "--service",
            "payments",
            "--pod",
            "payments-1",
            "--advertise-addr",
            "{inbound}",
            "--app-addr",
            &app_addr,
        ],
    )
}

const RATE_LIMITED: &str = "apiVersion: ballast.io/v1alpha1
kind: ResiliencePolicy
metadata: {name: payments, namespace: shop}
spec:
  targetRef: {service: payments}
  rateLimit: {requestsPerSecond: 0.1, burst: 2}
";

#[test]
fn sidecars_get_their_configuration_and_endpoints_from_the_control_plane() {
    let cp = ControlPlane::start("cp-a", None);
    let app = Upstream::start("payments-app");
    let server = payments_sidecar(&cp.url(), &app);
    let client = Sidecar::start_meshed(&cp.url(), &["--namespace", "shop", "--pod", "web-1"]);

    // The registered endpoint reached the client's sidecar: requests by name get through.
    wait_until("payments answers through the mesh", || call(&client, "payments").0 == 200);
    let (status, body) = call(&client, "payments.shop.svc.cluster.local");
    assert_eq!(status, 200, "{body}");
    wait_until("both sidecars acked the latest version", || {
        pods(&cp.json(&["get", "proxies", "-o", "json"]), "SYNCED").len() == 2
    });
    let proxies = cp.json(&["get", "proxies", "-o", "json"]);
    assert_eq!(pods(&proxies, "SYNCED"), ["payments-1", "web-1"], "{proxies}");
    assert_eq!(client.metric("ballast_control_plane_connected"), 1.0);
    let endpoints = cp.json(&["get", "endpoints", "-o", "json"]);
    assert_eq!(endpoints[0]["address"], server.inbound.to_string());
    assert_eq!(endpoints[0]["source"], "registered");

    // A policy applied with --wait is enforced when the command returns.
    let policy = apply_file(RATE_LIMITED);
    let (ok, out) = cp.ctl(&["apply", "-f", &policy.path().display().to_string(), "--wait"]);
    assert!(ok, "{out}");
    assert!(out.contains("acked by 2 sidecar(s)"), "both shop sidecars are reached: {out}");
    let statuses: Vec<u16> = (0..5).map(|_| call(&client, "payments").0).collect();
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 3, "burst 2 then limited: {statuses:?}");

    // A bad policy is refused naming the field, and the working one stays.
    let bad = apply_file(&format!("{RATE_LIMITED}  retries: {{attempts: 3, budget: {{ratio: 4}}}}\n"));
    let (ok, out) = cp.ctl(&["apply", "-f", &bad.path().display().to_string()]);
    assert!(!ok && out.contains("spec.retries.budget.ratio"), "{out}");
    assert_eq!(call(&client, "payments").0, 429, "the old policy is still enforced");
    let (ok, out) = cp.ctl(&["describe", "service", "payments", "-n", "shop"]);
    assert!(ok && out.contains("rateLimit") && out.contains("payments-1") && out.contains("web-1"), "{out}");

    let (status, metrics) = http_get(cp.admin, "/metrics").expect("scrape");
    assert_eq!(status, 200);
    assert_eq!(metric_value(&metrics, "ballast_control_plane_proxies_connected"), 2.0, "{metrics}");
    assert!(metric_value(&metrics, r#"ballast_control_plane_pushes_total{kind="full"}"#) >= 2.0, "{metrics}");
    assert!(metric_value(&metrics, "ballast_control_plane_push_ack_seconds_count") >= 2.0, "{metrics}");
    promtool_check(&metrics);

    // A sidecar that stops deregisters at once.
    server.signal(libc::SIGTERM);
    wait_until("the endpoint is gone", || {
        cp.json(&["get", "endpoints", "-o", "json"]).as_array().is_some_and(Vec::is_empty)
    });
    let proxies = cp.json(&["get", "proxies", "-o", "json"]);
    assert_eq!(pods(&proxies, "SYNCED"), ["web-1"]);
}

/// Replicas on one etcd: one stopped, one crashed, etcd itself down for a while; the
/// sidecars keep serving every request on their last configuration, move between
/// replicas, and resync.
#[test]
fn no_request_fails_while_replicas_restart_and_etcd_is_down() {
    let mut etcd = etcd::EtcdServer::start();
    let endpoint = etcd.endpoint();
    let mut a = ControlPlane::start("cp-a", Some(&endpoint));
    let mut b = ControlPlane::start("cp-b", Some(&endpoint));
    let both = format!("{},{}", a.url(), b.url());
    let app = Upstream::start("payments-app");
    let _server = payments_sidecar(&both, &app);
    let client = Arc::new(Sidecar::start_meshed(&both, &["--namespace", "shop", "--pod", "web-1"]));
    wait_until("payments answers through the mesh", || call(&client, "payments").0 == 200);

    // Bounded traffic: at most 20,000 requests or 60 s, stopped by the test.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let traffic = {
        let (client, stop, sent) = (client.clone(), stop.clone(), sent.clone());
        std::thread::spawn(move || {
            let started = Instant::now();
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed)
                && sent.load(Ordering::Relaxed) < 20_000
                && started.elapsed() < Duration::from_secs(60)
            {
                let (status, body) = call(&client, "payments");
                sent.fetch_add(1, Ordering::Relaxed);
                if status != 200 {
                    failures.push(format!("{status} {body}"));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            failures
        })
    };
    let connected_to = |cp: &ControlPlane| -> Vec<String> {
        let v = cp.json(&["get", "proxies", "-o", "json"]);
        let mut on: Vec<String> = v
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| format!("{}@{}", p["pod"].as_str().unwrap_or("?"), p["replica"].as_str().unwrap_or("?")))
            .collect();
        on.sort();
        on
    };

    // a stops cleanly: whatever it served moves to b.
    a.signal(libc::SIGTERM);
    wait_until("both sidecars are on cp-b", || connected_to(&b) == ["payments-1@cp-b", "web-1@cp-b"]);
    a.spawn();
    // b crashes: they move back to a; b's lease still holds their old keys meanwhile.
    b.signal(libc::SIGKILL);
    wait_until("both sidecars are on cp-a", || connected_to(&a) == ["payments-1@cp-a", "web-1@cp-a"]);
    // etcd goes away for two seconds.
    etcd.stop();
    std::thread::sleep(Duration::from_secs(2));
    etcd.restart();
    wait_until("cp-a is ready again", || matches!(http_get(a.admin, "/ready"), Ok((200, _))));

    // Resynced without a gap: a change made now reaches both sidecars.
    let policy = apply_file(RATE_LIMITED);
    let (ok, out) =
        a.ctl(&["apply", "-f", &policy.path().display().to_string(), "--wait", "--timeout", "10s"]);
    stop.store(true, Ordering::Relaxed);
    let failures = traffic.join().expect("traffic thread");
    assert!(ok, "{out}\n{}", a.log());
    assert!(out.contains("acked by 2 sidecar(s)"), "{out}");
    let sent = sent.load(Ordering::Relaxed);
    assert!(sent > 100, "traffic ran: {sent}");
    // Requests sent after the rate limit was applied may be refused by it (429); no
    // other failure is allowed.
    let other: Vec<&String> = failures.iter().filter(|f| !f.starts_with("429")).collect();
    assert!(other.is_empty(), "{} of {sent} requests failed: {other:?}", other.len());
    let (kv_ok, endpoints) = a.ctl(&["get", "endpoints"]);
    assert!(kv_ok && endpoints.contains("payments-1"), "{endpoints}");
}

/// What the API would refuse can still reach the store (another writer, an older
/// control plane); the sidecar then refuses it, says why, and keeps what works.
#[test]
fn a_sidecar_nacks_what_it_cannot_apply_and_keeps_its_configuration() {
    use ballast_control_plane::server::{ControlPlane as InProcess, Options};
    use ballast_control_plane::store::Store;
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let store = Store::memory();
    let opts = Options::loopback("in-process");
    let cp = rt.block_on(InProcess::start_on(store.clone(), opts)).expect("starts");
    let app = Upstream::start("web-app");
    let service = |name: &str| {
        serde_json::json!({
            "apiVersion": "ballast.io/v1alpha1", "kind": "Service",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {"ports": [{"port": 80}], "addresses": ["10.96.0.10"], "endpoints": [{"address": app.addr.to_string()}]}
        })
    };
    let put = |name: &str| {
        let value = serde_json::to_vec(&service(name)).expect("json");
        rt.block_on(store.put(&format!("/ballast/services/shop/{name}"), value, None)).expect("put")
    };
    put("web");
    let client = Sidecar::start_meshed(
        &format!("http://{}", cp.grpc_addr),
        &["--namespace", "shop", "--pod", "web-1"],
    );
    assert_eq!(call(&client, "web").0, 200);

    // A second Service claiming the same virtual address and port: refused as a whole.
    let bad = put("web-copy");
    let admin = cp.admin_addr;
    wait_until("the sidecar's refusal is reported", || {
        let (_, body) = http_get(admin, "/api/v1/proxies").unwrap_or_default();
        body.contains("NACKED")
    });
    let (_, body) = http_get(admin, "/api/v1/proxies").expect("proxies");
    let proxies: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(proxies[0]["nack"]["version"], bad, "{proxies}");
    assert!(proxies[0]["nack"]["reason"].as_str().unwrap_or("").contains("10.96.0.10"), "{proxies}");
    assert_eq!(client.metric(r#"ballast_config_rejected_total{source="control-plane"}"#), 1.0);
    assert_eq!(call(&client, "web").0, 200, "the previous configuration still serves");
    assert!(client.metric("ballast_config_version") < bad as f64);

    // Fixed in the store: the next (full) push is applied and the refusal clears.
    let fixed =
        rt.block_on(store.delete("/ballast/services/shop/web-copy")).expect("delete").expect("deleted");
    wait_until("the sidecar applies the fix", || client.metric("ballast_config_version") >= fixed as f64);
    wait_until("the refusal clears", || {
        let (_, body) = http_get(admin, "/api/v1/proxies").unwrap_or_default();
        body.contains("SYNCED")
    });
    rt.block_on(cp.stop());
}

/// The contract between the injector and the sidecar: the containers the injector puts
/// into a pod, run as Kubernetes would run them (arguments as given, the downward-API
/// environment resolved), work. `ballast-init`'s arguments parse and plan the rules the
/// annotations asked for; `ballast-proxy` connects to the control plane and registers
/// as the pod, in its namespace, for its service, at the pod IP.
#[test]
fn injected_containers_run_with_what_the_injector_gives_them() {
    use ballast_injector::inject::{self, Config, Decision};
    use k8s_openapi::api::core::v1::{Container, Pod};

    let cp = ControlPlane::start("cp-0", None);
    let pod_json = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web-7f9c4-x2x8q", "namespace": "shop", "labels": {"app": "web"},
                     "annotations": {"ballast.io/inject": "enabled", "ballast.io/skip-outbound-ports": "5432,6379-6380",
                                     "ballast.io/skip-outbound-cidrs": "169.254.169.254", "ballast.io/log-level": "debug"}},
        "spec": {"serviceAccountName": "web", "containers": [{"name": "web", "image": "web:1"}]}
    });
    let pod: Pod = serde_json::from_value(pod_json.clone()).expect("pod");
    let config = Config { control_plane_url: cp.url(), ..Config::default() };
    let Decision::Inject(patch) = inject::inject(&pod, false, &config) else { panic!("not injected") };
    let mut doc = pod_json;
    json_patch::patch(&mut doc, &patch).expect("patch applies");
    let pod: Pod = serde_json::from_value(doc).expect("injected pod");
    let spec = pod.spec.expect("spec");
    let find = |name: &str| -> Container {
        spec.init_containers.iter().flatten().find(|c| c.name == name).cloned().expect(name)
    };

    // ballast-init: the planned rules carry the proxy UID and the skipped ports and CIDRs.
    let init = find(inject::INIT_CONTAINER);
    let out = run(Command::new(binary("ballast-sidecar")).args(init.args.iter().flatten()).arg("--dry-run"));
    let plan = stdout(&out);
    assert!(
        out.status.success(),
        "ballast-sidecar {:?} --dry-run: {plan}{}",
        init.args,
        String::from_utf8_lossy(&out.stderr)
    );
    for expected in ["2102", "5432", "6379:6380", "169.254.169.254/32"] {
        assert!(plan.contains(expected), "{expected} missing from the plan:\n{plan}");
    }

    // ballast-proxy: its environment as the kubelet resolves the downward API.
    let proxy = find(inject::PROXY_CONTAINER);
    let field = |path: &str| match path {
        "metadata.name" => "web-7f9c4-x2x8q",
        "metadata.namespace" => "shop",
        "spec.serviceAccountName" => "web",
        "status.podIP" => "127.0.0.1",
        other => panic!("unexpected downward-API field {other}"),
    };
    let mut cmd = Command::new(binary("ballast-sidecar"));
    cmd.args(proxy.args.iter().flatten()).env_clear().env("PATH", std::env::var("PATH").unwrap_or_default());
    for e in proxy.env.iter().flatten() {
        let value = match (&e.value, &e.value_from) {
            (Some(v), _) => v.clone(),
            (None, Some(from)) => {
                field(&from.field_ref.as_ref().expect("only fieldRefs").field_path).to_owned()
            }
            (None, None) => String::new(),
        };
        cmd.env(&e.name, value);
    }
    // Loopback ports instead of the pod's fixed ones (tests run side by side).
    let (outbound, inbound, admin) = (free_port(), free_port(), free_port());
    let log = tempfile::NamedTempFile::new().expect("log");
    let child = cmd
        .args([
            "--outbound-addr",
            &format!("127.0.0.1:{outbound}"),
            "--inbound-addr",
            &format!("127.0.0.1:{inbound}"),
        ])
        .args(["--admin-addr", &format!("127.0.0.1:{admin}"), "--egress-dns=false"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log.reopen().expect("log"))
        .spawn()
        .expect("spawn the injected proxy");
    let _guard = ChildGuard(child);
    let admin: SocketAddr = format!("127.0.0.1:{admin}").parse().expect("addr");
    let deadline = Instant::now() + Duration::from_secs(15);
    while !matches!(http_get(admin, "/ready"), Ok((200, _))) {
        assert!(
            Instant::now() < deadline,
            "injected proxy not ready; log:\n{}",
            std::fs::read_to_string(log.path()).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Its own registration makes a new version that it acks a moment after /ready.
    let listed = || {
        let proxies = cp.json(&["get", "proxies", "-n", "shop", "-o", "json"]);
        proxies.as_array().into_iter().flatten().find(|p| p["pod"] == "web-7f9c4-x2x8q").cloned()
    };
    wait_until("the injected proxy is listed and synced", || {
        listed().is_some_and(|p| p["state"] == "SYNCED")
    });
    let me = listed().expect("the injected proxy is listed");
    assert_eq!(me["namespace"], "shop", "{me}");
    assert_eq!(me["service"], "web", "{me}");
    assert_eq!(me["address"], format!("127.0.0.1:{inbound}"), "{me}");
    assert_eq!(me["state"], "SYNCED", "{me}");
    // The log level came from the annotation.
    assert!(
        std::fs::read_to_string(log.path()).unwrap_or_default().contains("DEBUG"),
        "BALLAST_LOG not applied"
    );
}
