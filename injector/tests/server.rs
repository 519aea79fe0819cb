//! The webhook over real HTTPS, with curl as the client (the API server's side), and the
//! Kubernetes API through kube's mock-service pattern (a `tower::service_fn` standing in
//! for the API server, answering recorded JSON and recording what it was asked).

#[path = "../../control-plane/tests/support/promtool.rs"]
mod promtool;

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ballast_injector::identity::{self, TrustAnchors};
use ballast_injector::inject::Config;
use ballast_injector::namespaces::Namespaces;
use ballast_injector::server::{self, Injector, Metrics};
use ballast_injector::telemetry::TraceConfig;
use ballast_injector::tls::{self, Bootstrap, Certificate, Pem};
use base64::Engine as _;
use http_body_util::BodyExt;
use serde_json::{Value, json};

fn provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// One request the mock API server answered: (method, path?query, body).
type Call = (String, String, Value);

/// A lock that a panic elsewhere does not poison for the assertions after it.
fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A kube client whose API server is `handler(method, path?query, body)`, answering
/// `Some((status, json))`; every call is recorded. The handler must not panic: kube runs
/// the service behind a buffer task, so a panic only fails the request, and the webhook
/// turns a failed lookup into "allowed, no patch", which some cases expect (they would
/// pass vacuously). A call it does not expect (`None`) is answered 500 with a Status
/// naming it, and [`MockApi::assert_expected`] fails the test afterwards.
struct MockApi {
    client: kube::Client,
    calls: Arc<Mutex<Vec<Call>>>,
    unexpected: Arc<Mutex<Vec<String>>>,
}

impl MockApi {
    fn new(handler: impl Fn(&str, &str, &Value) -> Option<(u16, Value)> + Send + Sync + 'static) -> Self {
        let handler = Arc::new(handler);
        let calls: Arc<Mutex<Vec<Call>>> = Arc::default();
        let unexpected: Arc<Mutex<Vec<String>>> = Arc::default();
        let (log, odd) = (calls.clone(), unexpected.clone());
        let service = tower::service_fn(move |req: http::Request<kube::client::Body>| {
            let (handler, log, odd) = (handler.clone(), log.clone(), odd.clone());
            async move {
                let method = req.method().to_string();
                let uri = req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default();
                let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let (status, out) = handler(&method, &uri, &body).unwrap_or_else(|| {
                    let message = format!("unexpected API call {method} {uri}");
                    locked(&odd).push(message.clone());
                    status(500, "InternalError", &message)
                });
                locked(&log).push((method, uri, body));
                let resp = http::Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(kube::client::Body::from(serde_json::to_vec(&out).unwrap_or_default()))
                    // A status code of this file's and one header: the builder cannot fail.
                    .expect("response");
                Ok::<_, std::convert::Infallible>(resp)
            }
        });
        Self { client: kube::Client::new(service, "default"), calls, unexpected }
    }

    fn calls(&self) -> Vec<Call> {
        locked(&self.calls).clone()
    }

    /// Fails the test if the handler was asked anything it did not expect.
    fn assert_expected(&self) {
        let unexpected = locked(&self.unexpected);
        assert!(unexpected.is_empty(), "the mock API server was asked: {unexpected:?}");
    }
}

/// A Kubernetes `Status` answer.
fn status(code: u16, reason: &str, message: &str) -> (u16, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code, "message": message}),
    )
}

fn not_found(what: &str) -> (u16, Value) {
    status(404, "NotFound", &format!("{what} not found"))
}

/// Whether a Prometheus exposition has exactly the sample line `line` (so that `… 1`
/// does not match `… 10`).
fn has_sample(text: &str, line: &str) -> bool {
    text.lines().any(|l| l == line)
}

struct Running {
    addr: std::net::SocketAddr,
    ca: tempfile::NamedTempFile,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

async fn start(namespaces: Namespaces) -> Running {
    start_injector(Injector {
        config: Config::default(),
        namespaces,
        metrics: Metrics::new(),
        trust_anchors: None,
    })
    .await
}

async fn start_injector(injector: Injector) -> Running {
    provider();
    let generated = tls::generate(vec!["localhost".into()]).expect("generate");
    let ca = tempfile::NamedTempFile::new().expect("tmp");
    std::fs::write(ca.path(), &generated.ca_pem).expect("write ca");
    let cert = Certificate::new(tls::certified_key(&generated.serving, "test").expect("key"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let injector = Arc::new(injector);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let tls = Arc::new(cert.server_config());
    let task = tokio::spawn(async move {
        server::serve(listener, tls, injector, async { drop(rx.await) }, Duration::from_secs(5)).await;
    });
    Running { addr, ca, stop: Some(tx), task }
}

/// curl, as the API server would call: HTTPS, verified against the CA. Returns
/// (status, body).
async fn curl(ca: &Path, url: &str, content_type: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let (ca, url, content_type, body) =
        (ca.to_owned(), url.to_owned(), content_type.to_owned(), body.to_vec());
    tokio::task::spawn_blocking(move || {
        let mut child = Command::new("curl")
            .args(["-sS", "--max-time", "10", "--cacert"])
            .arg(&ca)
            .args([
                "-H",
                &format!("content-type: {content_type}"),
                "--data-binary",
                "@-",
                "-w",
                "\n%{http_code}",
                &url,
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("curl must be installed (scripts/test.sh installs it)");
        use std::io::Write;
        child.stdin.take().expect("stdin").write_all(&body).expect("write body");
        let out = child.wait_with_output().expect("curl");
        if !out.status.success() {
            eprintln!("curl {url}: {}", String::from_utf8_lossy(&out.stderr));
        }
        let text = out.stdout;
        let split = text.iter().rposition(|b| *b == b'\n').unwrap_or(0);
        let status = String::from_utf8_lossy(&text[split..]).trim().parse().unwrap_or(0);
        (status, text[..split].to_vec())
    })
    .await
    .expect("join")
}

/// A GET with curl off the runtime's thread (the server under test runs on it).
async fn curl_get(args: &[String]) -> (bool, String) {
    let args = args.to_vec();
    tokio::task::spawn_blocking(move || {
        let out = Command::new("curl").args(["-sS", "--max-time", "10"]).args(&args).output().expect("curl");
        let text = String::from_utf8_lossy(if out.status.success() { &out.stdout } else { &out.stderr })
            .into_owned();
        (out.status.success(), text)
    })
    .await
    .expect("join")
}

fn review(uid: &str, namespace: &str, pod: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": uid, "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": namespace, "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod, "dryRun": false
        }
    }))
    .expect("json")
}

fn app_pod() -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"generateName": "web-5c9d-", "labels": {"app": "web"}},
           "spec": {"containers": [{"name": "web", "image": "web:1", "ports": [{"containerPort": 8080}]}]}})
}

#[tokio::test]
async fn injects_in_a_labelled_namespace_with_a_base64_patch_and_caches_the_label() {
    let api = MockApi::new(|method, uri, _| match (method, uri) {
        ("GET", "/api/v1/namespaces/shop") => Some((
            200,
            json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": "shop", "labels": {"ballast.io/inject": "enabled", "kubernetes.io/metadata.name": "shop"}}}),
        )),
        ("GET", "/api/v1/namespaces/plain") => {
            Some((200, json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "plain"}})))
        }
        ("GET", "/api/v1/namespaces/gone") => Some(not_found("namespaces \"gone\"")),
        _ => None,
    });
    let s = start(Namespaces::new(api.client.clone(), Duration::from_secs(60))).await;
    let url = format!("https://localhost:{}/inject", s.addr.port());

    let (status, body) =
        curl(s.ca.path(), &url, "application/json", &review("uid-1", "shop", app_pod())).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let v: Value = serde_json::from_slice(&body).expect("json answer");
    assert_eq!(v["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(v["kind"], "AdmissionReview");
    assert_eq!(v["response"]["uid"], "uid-1");
    assert_eq!(v["response"]["allowed"], true);
    assert_eq!(v["response"]["patchType"], "JSONPatch");
    // On the wire the patch is a base64 string (not kube-rs' array of numbers).
    let encoded = v["response"]["patch"].as_str().expect("patch is a string on the wire");
    let ops: Value =
        serde_json::from_slice(&base64::engine::general_purpose::STANDARD.decode(encoded).expect("base64"))
            .expect("patch is JSON");
    let mut pod = app_pod();
    let patch: json_patch::Patch = serde_json::from_value(ops).expect("a JSONPatch");
    json_patch::patch(&mut pod, &patch).expect("applies");
    let inits: Vec<_> =
        pod["spec"]["initContainers"].as_array().expect("inits").iter().map(|c| c["name"].clone()).collect();
    assert_eq!(inits, [json!("ballast-init"), json!("ballast-proxy")]);

    // A burst in the same namespace: the label was read once.
    for i in 0..5 {
        let (status, body) =
            curl(s.ca.path(), &url, "application/json", &review(&format!("b{i}"), "shop", app_pod())).await;
        assert_eq!(status, 200);
        assert!(serde_json::from_slice::<Value>(&body).expect("json")["response"]["patch"].is_string());
    }
    assert_eq!(api.calls().len(), 1, "{:?}", api.calls());

    // An unlabelled namespace: allowed, no patch, no warning.
    let (_, body) = curl(s.ca.path(), &url, "application/json", &review("uid-2", "plain", app_pod())).await;
    let v: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!((v["response"]["allowed"].clone(), v["response"].get("patch")), (json!(true), None));
    // A namespace the API does not know (404): allowed, no patch.
    let (_, body) = curl(s.ca.path(), &url, "application/json", &review("uid-3", "gone", app_pod())).await;
    assert_eq!(serde_json::from_slice::<Value>(&body).expect("json")["response"]["allowed"], true);

    let (ok, metrics) = curl_get(&[
        "--cacert".into(),
        s.ca.path().display().to_string(),
        format!("https://localhost:{}/metrics", s.addr.port()),
    ])
    .await;
    assert!(ok);
    assert!(
        has_sample(&metrics, "ballast_injector_reviews_total{outcome=\"injected\",reason=\"\"} 6"),
        "{metrics}"
    );
    assert!(
        has_sample(&metrics, "ballast_injector_reviews_total{outcome=\"skipped\",reason=\"not-opted-in\"} 2"),
        "{metrics}"
    );
    // The format Prometheus reads: promtool finds nothing to complain about.
    promtool::check(&metrics);
    stop(s).await;
    // Each namespace was looked up once, and nothing else was asked.
    let paths: Vec<_> = api.calls().into_iter().map(|(_, uri, _)| uri).collect();
    assert_eq!(paths, ["/api/v1/namespaces/shop", "/api/v1/namespaces/plain", "/api/v1/namespaces/gone"]);
    api.assert_expected();
}

async fn stop(mut s: Running) {
    if let Some(tx) = s.stop.take() {
        let _ = tx.send(());
    }
    tokio::time::timeout(Duration::from_secs(10), &mut s.task)
        .await
        .expect("server stops")
        .expect("server task");
}

#[tokio::test]
async fn every_body_gets_a_valid_answer() {
    let s = start(Namespaces::without_api()).await;
    let url = format!("https://localhost:{}/inject", s.addr.port());
    let ca = s.ca.path().to_owned();

    // Wrong content type: 415.
    let (status, _) = curl(&ca, &url, "text/plain", &review("u", "shop", app_pod())).await;
    assert_eq!(status, 415);
    // Not JSON, or JSON that is not a review: 400 naming the problem.
    let (status, body) = curl(&ca, &url, "application/json", b"{\"apiVersion\":").await;
    assert_eq!(status, 400);
    assert!(String::from_utf8_lossy(&body).contains("not JSON"));
    let (status, body) = curl(&ca, &url, "application/json", b"{\"kind\":\"Pod\"}").await;
    assert_eq!(status, 400);
    assert!(String::from_utf8_lossy(&body).contains("AdmissionReview"));
    // A review whose pod cannot be read: allowed, no patch, a warning, the uid echoed.
    let odd = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "odd", "annotations": {"ballast.io/inject": "enabled"}},
                     "spec": {"containers": "not a list"}});
    let (status, body) =
        curl(&ca, &url, "application/json; charset=utf-8", &review("u-odd", "shop", odd)).await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(v["response"]["uid"], "u-odd");
    assert_eq!(v["response"]["allowed"], true);
    assert!(v["response"].get("patch").is_none());
    assert!(v["response"]["warnings"][0].as_str().is_some_and(|w| w.contains("could not be read")), "{v}");
    // Not a pod (a List, as a confused client might send): allowed, no patch.
    let mut list =
        serde_json::from_slice::<Value>(&review("u-list", "shop", json!({"kind": "List", "items": []})))
            .expect("json");
    list["request"]["kind"]["kind"] = json!("List");
    let (status, body) = curl(&ca, &url, "application/json", &serde_json::to_vec(&list).expect("json")).await;
    assert_eq!(status, 200);
    assert_eq!(serde_json::from_slice::<Value>(&body).expect("json")["response"]["allowed"], true);
    // A bad annotation: refused, with the annotation named.
    let mut bad = app_pod();
    bad["metadata"]["annotations"] =
        json!({"ballast.io/inject": "enabled", "ballast.io/proxy-cpu-limit": "lots"});
    let (_, body) = curl(&ca, &url, "application/json", &review("u-bad", "shop", bad)).await;
    let v: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(v["response"]["allowed"], false);
    assert!(
        v["response"]["status"]["message"].as_str().is_some_and(|m| m.contains("ballast.io/proxy-cpu-limit")),
        "{v}"
    );
    // Without an API client, a pod that does not opt in by annotation: allowed, warned.
    let (_, body) = curl(&ca, &url, "application/json", &review("u-ns", "shop", app_pod())).await;
    let v: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(v["response"]["allowed"], true);
    assert!(v["response"]["warnings"][0].as_str().is_some_and(|w| w.contains("namespace")), "{v}");
    // Opted in by annotation: injected without any API.
    let mut opted = app_pod();
    opted["metadata"]["annotations"] = json!({"ballast.io/inject": "enabled"});
    let (_, body) = curl(&ca, &url, "application/json", &review("u-in", "shop", opted)).await;
    assert!(serde_json::from_slice::<Value>(&body).expect("json")["response"]["patch"].is_string());
    stop(s).await;
}

#[tokio::test]
async fn bootstrap_generates_the_secret_once_and_patches_the_ca_bundle() {
    provider();
    let secret: Arc<Mutex<Option<Value>>> = Arc::default();
    let store = secret.clone();
    let api = MockApi::new(move |method, uri, body| {
        let secret_path = "/api/v1/namespaces/ballast-system/secrets";
        let webhook_path =
            "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/ballast-injector";
        match (method, uri.split('?').next().unwrap_or_default()) {
            ("GET", p) if p == format!("{secret_path}/ballast-injector-tls") => {
                Some(match locked(&store).clone() {
                    Some(s) => (200, s),
                    None => not_found("secret"),
                })
            }
            ("POST", p) if p == secret_path => {
                *locked(&store) = Some(body.clone());
                Some((201, body.clone()))
            }
            ("GET", p) if p == webhook_path => Some((
                200,
                json!({
                "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
                "metadata": {"name": "ballast-injector"},
                "webhooks": [
                    {"name": "other.example.com", "clientConfig": {"url": "https://example.com/hook"},
                     "sideEffects": "None", "admissionReviewVersions": ["v1"]},
                    {"name": "inject.ballast.io", "clientConfig": {"service": {"name": "ballast-injector", "namespace": "ballast-system", "path": "/inject"}},
                     "sideEffects": "None", "admissionReviewVersions": ["v1"]}
                ]}),
            )),
            ("PATCH", p) if p == webhook_path => Some((
                200,
                json!({"apiVersion": "admissionregistration.k8s.io/v1",
                "kind": "MutatingWebhookConfiguration", "metadata": {"name": "ballast-injector"}}),
            )),
            _ => None,
        }
    });
    let bootstrap = Bootstrap {
        namespace: "ballast-system".into(),
        secret: "ballast-injector-tls".into(),
        webhook_config: "ballast-injector".into(),
        service: "ballast-injector".into(),
    };
    let first = bootstrap.run(api.client.clone()).await.expect("bootstrap");
    // A second replica starting later serves the same certificate and writes nothing.
    let second = bootstrap.run(api.client.clone()).await.expect("second bootstrap");
    assert_eq!(first.serving, second.serving);
    assert_eq!(first.ca_pem, second.ca_pem);

    api.assert_expected();
    let calls = api.calls();
    let posts: Vec<_> = calls.iter().filter(|(m, _, _)| m == "POST").collect();
    assert_eq!(posts.len(), 1, "{calls:?}");
    let stored = &posts[0].2;
    assert_eq!(stored["type"], "kubernetes.io/tls");
    for key in ["ca.crt", "tls.crt", "tls.key"] {
        assert!(stored["data"][key].is_string(), "{key} missing from the Secret");
    }
    let patches: Vec<_> = calls.iter().filter(|(m, _, _)| m == "PATCH").collect();
    assert!(!patches.is_empty());
    let ops = &patches[0].2;
    // Only our webhook (index 1) is touched, guarded by a test of its name.
    assert_eq!(ops[0], json!({"op": "test", "path": "/webhooks/1/name", "value": "inject.ballast.io"}));
    assert_eq!(ops[1]["path"], "/webhooks/1/clientConfig/caBundle");
    let bundle = base64::engine::general_purpose::STANDARD
        .decode(ops[1]["value"].as_str().expect("bundle"))
        .expect("b64");
    assert_eq!(bundle, first.ca_pem);
    // The served certificate verifies against that CA for the Service's DNS name.
    let s = serve_pem(&first.serving).await;
    let ca = tempfile::NamedTempFile::new().expect("tmp");
    std::fs::write(ca.path(), &first.ca_pem).expect("ca");
    let (ok, body) = curl_get(&[
        "--cacert".into(),
        ca.path().display().to_string(),
        "--resolve".into(),
        format!("ballast-injector.ballast-system.svc:{}:127.0.0.1", s.0.port()),
        format!("https://ballast-injector.ballast-system.svc:{}/live", s.0.port()),
    ])
    .await;
    assert!(ok, "{body}");
    assert_eq!(body, "ok\n");
}

async fn serve_pem(pem: &Pem) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let cert = Certificate::new(tls::certified_key(pem, "test").expect("key"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let injector = Arc::new(Injector {
        config: Config::default(),
        namespaces: Namespaces::without_api(),
        metrics: Metrics::new(),
        trust_anchors: None,
    });
    let tls = Arc::new(cert.server_config());
    let task =
        tokio::spawn(server::serve(listener, tls, injector, std::future::pending(), Duration::from_secs(1)));
    (addr, task)
}

/// A spawned `ballast-injector`, killed and reaped when dropped, so a failed assert leaves
/// no process behind; its stderr goes to a file, printed when the test fails.
struct Spawned {
    child: Child,
    stderr: tempfile::NamedTempFile,
}

impl Spawned {
    fn start(cmd: &mut Command) -> Self {
        let stderr = tempfile::NamedTempFile::new().expect("a file for stderr");
        let child = cmd
            .stderr(stderr.reopen().expect("reopen the stderr file"))
            .spawn()
            .expect("start ballast-injector");
        Self { child, stderr }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.stderr.path()).unwrap_or_default()
    }

    /// Its exit status once it exits; fails the test if it runs longer than `limit`.
    fn wait_at_most(&mut self, limit: Duration, what: &str) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "ballast-injector {what} within {limit:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("ballast-injector's stderr:\n{}", self.stderr());
        }
    }
}

/// The real binary: certificate files reloaded when they change, SIGTERM ends it cleanly.
#[tokio::test]
async fn binary_reloads_its_certificate_files_and_stops_on_sigterm() {
    provider();
    let dir = tempfile::tempdir().expect("tmp");
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    let first = tls::generate(vec!["localhost".into()]).expect("generate");
    std::fs::write(&cert, &first.serving.cert).expect("cert");
    std::fs::write(&key, &first.serving.key).expect("key");
    let ca1 = dir.path().join("ca1.pem");
    std::fs::write(&ca1, &first.ca_pem).expect("ca");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let mut injector = Spawned::start(
        Command::new(env!("CARGO_BIN_EXE_ballast-injector"))
            .args(["--addr", &format!("127.0.0.1:{port}"), "--tls-cert"])
            .arg(&cert)
            .arg("--tls-key")
            .arg(&key)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env("KUBECONFIG", dir.path().join("no-kubeconfig"))
            .env("HOME", dir.path()),
    );
    let live = |ca: &Path| {
        Command::new("curl")
            .args(["-sS", "--max-time", "2", "--cacert"])
            .arg(ca)
            .arg(format!("https://localhost:{port}/live"))
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !live(&ca1) {
        assert!(Instant::now() < deadline, "injector did not come up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Rotate: a certificate from another CA. A half-written pair is ignored meanwhile.
    std::fs::write(&cert, b"-----BEGIN CERTIFICATE-----\ntruncated").expect("write");
    tokio::time::sleep(tls::RELOAD_EVERY * 2).await;
    assert!(live(&ca1), "a broken pair must not replace the serving certificate");
    let second = tls::generate(vec!["localhost".into()]).expect("generate");
    let ca2 = dir.path().join("ca2.pem");
    std::fs::write(&ca2, &second.ca_pem).expect("ca");
    std::fs::write(&key, &second.serving.key).expect("key");
    std::fs::write(&cert, &second.serving.cert).expect("cert");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !live(&ca2) {
        assert!(Instant::now() < deadline, "new certificate not served within 20 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!live(&ca1), "the old certificate is still served");

    // SAFETY: kill(2) on our own child's pid, not yet reaped.
    unsafe { libc::kill(injector.child.id() as i32, libc::SIGTERM) };
    let status = injector.wait_at_most(Duration::from_secs(15), "did not stop on SIGTERM");
    assert!(status.success(), "exit status {status}");
}

/// A ConfigMap volume's layout: `ca.crt -> ..data/ca.crt`, `..data -> ..<version>`; an
/// update writes a new version directory and swaps `..data` atomically, as the kubelet
/// does. `None` is the ConfigMap without the key (or deleted, the volume optional).
fn configmap_version(dir: &Path, n: u32, ca: Option<&[u8]>) {
    let version = dir.join(format!("..v{n}"));
    std::fs::create_dir(&version).expect("mkdir");
    if let Some(ca) = ca {
        std::fs::write(version.join("ca.crt"), ca).expect("write ca.crt");
    }
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(format!("..v{n}"), &tmp).expect("symlink");
    std::fs::rename(&tmp, dir.join("..data")).expect("swap ..data");
    if std::fs::symlink_metadata(dir.join("ca.crt")).is_err() {
        std::os::unix::fs::symlink("..data/ca.crt", dir.join("ca.crt")).expect("symlink ca.crt");
    }
}

/// The proxy's environment in the patch of a review answer, by name.
fn proxy_env(answer: &[u8]) -> (std::collections::BTreeMap<String, String>, Value) {
    let v: Value = serde_json::from_slice(answer).expect("json");
    let encoded = v["response"]["patch"].as_str().expect("a patch");
    let ops: Value =
        serde_json::from_slice(&base64::engine::general_purpose::STANDARD.decode(encoded).expect("b64"))
            .expect("json patch");
    let proxy = ops
        .as_array()
        .expect("ops")
        .iter()
        .flat_map(|op| match &op["value"] {
            Value::Array(a) => a.clone(),
            other => vec![other.clone()],
        })
        .find(|c| c["name"] == "ballast-proxy")
        .expect("the proxy container in the patch");
    let env = proxy["env"]
        .as_array()
        .expect("env")
        .iter()
        .filter_map(|e| Some((e["name"].as_str()?.to_owned(), e["value"].as_str()?.to_owned())))
        .collect();
    (env, v)
}

/// The trust anchors file (a ConfigMap volume) changes while the injector runs: the next
/// patch carries the new anchors; without them pods are injected without identity, with
/// a warning, a count and the gauge at 0; back, identity is back.
#[tokio::test]
async fn rotated_trust_anchors_reach_the_next_patch() {
    let dir = tempfile::tempdir().expect("tmp");
    let (ca1, ca2) = (
        tls::generate(vec!["a".into()]).expect("ca").ca_pem,
        tls::generate(vec!["b".into()]).expect("ca").ca_pem,
    );
    let path = dir.path().join("ca.crt");
    configmap_version(dir.path(), 1, Some(&ca1));
    let metrics = Metrics::new();
    let anchors = TrustAnchors::new(path.clone(), metrics.trust_anchors_loaded());
    let config = Config {
        control_plane_url: "https://ballast-control-plane.ballast-system.svc:8086".into(),
        ..Config::default()
    };
    let s = start_injector(Injector {
        config,
        namespaces: Namespaces::without_api(),
        metrics,
        trust_anchors: Some(anchors),
    })
    .await;
    let url = format!("https://localhost:{}/inject", s.addr.port());
    let mut pod = app_pod();
    pod["metadata"]["annotations"] = json!({"ballast.io/inject": "enabled"});
    let pem = |ca: &[u8]| identity::parse_anchors(&path, ca).expect("anchors");

    let (_, body) = curl(s.ca.path(), &url, "application/json", &review("r1", "shop", pod.clone())).await;
    let (env, _) = proxy_env(&body);
    assert_eq!(env.get(identity::TRUST_ANCHORS_ENV), Some(&pem(&ca1)));
    assert_eq!(env.get(identity::TOKEN_FILE_ENV).map(String::as_str), Some(identity::TOKEN_PATH));
    assert_eq!(
        env.get("BALLAST_CONTROL_PLANE").map(String::as_str),
        Some("https://ballast-control-plane.ballast-system.svc:8086")
    );

    // The control plane rotates its CA (old and new published together, then the new).
    let both = [ca1.clone(), ca2.clone()].concat();
    configmap_version(dir.path(), 2, Some(&both));
    let (_, body) = curl(s.ca.path(), &url, "application/json", &review("r2", "shop", pod.clone())).await;
    assert_eq!(proxy_env(&body).0.get(identity::TRUST_ANCHORS_ENV), Some(&pem(&both)));
    configmap_version(dir.path(), 3, Some(&ca2));
    let (_, body) = curl(s.ca.path(), &url, "application/json", &review("r3", "shop", pod.clone())).await;
    assert_eq!(proxy_env(&body).0.get(identity::TRUST_ANCHORS_ENV), Some(&pem(&ca2)));

    // The key disappears: injected all the same, without identity, and told so.
    configmap_version(dir.path(), 4, None);
    let (_, body) = curl(s.ca.path(), &url, "application/json", &review("r4", "shop", pod.clone())).await;
    let (env, v) = proxy_env(&body);
    assert!(!env.contains_key(identity::TRUST_ANCHORS_ENV) && !env.contains_key(identity::TOKEN_FILE_ENV));
    assert!(
        v["response"]["warnings"][0].as_str().is_some_and(|w| w.contains("without workload identity")),
        "{v}"
    );
    let metrics_url = format!("https://localhost:{}/metrics", s.addr.port());
    let scrape_args: Vec<String> = vec!["--cacert".into(), s.ca.path().display().to_string(), metrics_url];
    let scrape = || curl_get(&scrape_args);
    let (_, text) = scrape().await;
    assert!(has_sample(&text, "ballast_injector_identity_trust_anchors_loaded 0"), "{text}");
    assert!(
        has_sample(
            &text,
            "ballast_injector_reviews_total{outcome=\"injected\",reason=\"no-trust-anchors\"} 1"
        ),
        "{text}"
    );

    // Back: seen by a scrape before any review, then in the next patch.
    configmap_version(dir.path(), 5, Some(&ca1));
    let (_, text) = scrape().await;
    assert!(has_sample(&text, "ballast_injector_identity_trust_anchors_loaded 1"), "{text}");
    let (_, body) = curl(s.ca.path(), &url, "application/json", &review("r5", "shop", pod.clone())).await;
    assert_eq!(proxy_env(&body).0.get(identity::TRUST_ANCHORS_ENV), Some(&pem(&ca1)));

    // A pod that opts out: no identity (no token), counted as such, no warning; the
    // anchors stay, to verify the control plane's TLS.
    pod["metadata"]["annotations"]["ballast.io/identity"] = json!("disabled");
    let (_, body) = curl(s.ca.path(), &url, "application/json", &review("r6", "shop", pod.clone())).await;
    let (env, v) = proxy_env(&body);
    assert!(!env.contains_key(identity::TOKEN_FILE_ENV));
    assert_eq!(env.get(identity::TRUST_ANCHORS_ENV), Some(&pem(&ca1)));
    assert!(v["response"].get("warnings").is_none(), "{v}");
    let (_, text) = scrape().await;
    assert!(
        has_sample(
            &text,
            "ballast_injector_reviews_total{outcome=\"injected\",reason=\"identity-disabled\"} 1"
        ),
        "{text}"
    );
    assert!(
        has_sample(&text, "ballast_injector_reviews_total{outcome=\"injected\",reason=\"\"} 4"),
        "{text}"
    );
    promtool::check(&text);
    stop(s).await;
}

/// The binary refuses a plain-text control plane URL with identity, before anything else.
#[test]
fn binary_refuses_identity_with_a_plain_text_control_plane_url() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut injector = Spawned::start(
        Command::new(env!("CARGO_BIN_EXE_ballast-injector"))
            .args(["--addr", "127.0.0.1:0", "--control-plane-url", "http://cp.ballast-system.svc:8086"])
            .arg("--identity-trust-anchors-file")
            .arg(dir.path().join("ca.crt"))
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env("KUBECONFIG", dir.path().join("no-kubeconfig"))
            .env("HOME", dir.path()),
    );
    // Refusing is immediate; one that started serving instead would run until killed.
    let status = injector.wait_at_most(Duration::from_secs(20), "did not refuse to start");
    assert!(!status.success());
    let stderr = injector.stderr();
    assert!(
        stderr.contains("--control-plane-url")
            && stderr.contains("https://")
            && stderr.contains("--identity-trust-anchors-file"),
        "{stderr}"
    );
}

/// Tracing over the wire: the flag's collector in every patch, a pod's annotations over
/// it, admission warnings for a collector on the other protocol's port and for sampling
/// without a collector, and an https collector refused naming the annotation.
#[tokio::test]
async fn tracing_flags_and_annotations_reach_the_proxy_with_warnings() {
    let config = Config {
        trace: TraceConfig {
            collector: Some("http://otel-collector.observability.svc:4317".into()),
            ..TraceConfig::default()
        },
        ..Config::default()
    };
    let s = start_injector(Injector {
        config,
        namespaces: Namespaces::without_api(),
        metrics: Metrics::new(),
        trust_anchors: None,
    })
    .await;
    let url = format!("https://localhost:{}/inject", s.addr.port());
    let with = |annotations: Value| {
        let mut pod = app_pod();
        pod["metadata"]["annotations"] = annotations;
        pod
    };
    let ask = |uid: &'static str, pod: Value| {
        let (ca, url) = (s.ca.path().to_owned(), url.clone());
        async move { curl(&ca, &url, "application/json", &review(uid, "shop", pod)).await }
    };

    let (code, body) = ask("t1", with(json!({"ballast.io/inject": "enabled"}))).await;
    assert_eq!(code, 200);
    let (env, v) = proxy_env(&body);
    assert_eq!(
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT").map(String::as_str),
        Some("http://otel-collector.observability.svc:4317")
    );
    assert_eq!(env.get("OTEL_EXPORTER_OTLP_PROTOCOL").map(String::as_str), Some("grpc"));
    assert_eq!(env.get("OTEL_TRACES_SAMPLER").map(String::as_str), Some("parentbased_traceidratio"));
    assert_eq!(env.get("OTEL_TRACES_SAMPLER_ARG").map(String::as_str), Some("0.01"));
    assert!(v["response"].get("warnings").is_none(), "{v}");

    let (_, body) = ask(
        "t2",
        with(json!({
            "ballast.io/inject": "enabled",
            "ballast.io/trace-collector": "http://otel-collector.observability.svc:4318",
            "ballast.io/trace-sampling": "25",
            "ballast.io/access-log-sampling": "50",
        })),
    )
    .await;
    let (env, v) = proxy_env(&body);
    assert_eq!(
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT").map(String::as_str),
        Some("http://otel-collector.observability.svc:4318")
    );
    assert_eq!(env.get("OTEL_TRACES_SAMPLER_ARG").map(String::as_str), Some("0.25"));
    assert_eq!(env.get("BALLAST_ACCESS_LOG_SAMPLING").map(String::as_str), Some("50"));
    let warning = v["response"]["warnings"][0].as_str().unwrap_or_default();
    assert!(warning.contains("ballast.io/trace-collector") && warning.contains("4318"), "{v}");

    let (_, body) = ask(
        "t3",
        with(json!({
            "ballast.io/inject": "enabled",
            "ballast.io/trace-collector": "none",
            "ballast.io/trace-sampling": "5",
        })),
    )
    .await;
    let (env, v) = proxy_env(&body);
    assert!(!env.keys().any(|k| k.starts_with("OTEL_")), "{env:?}");
    let warning = v["response"]["warnings"][0].as_str().unwrap_or_default();
    assert!(warning.contains("ballast.io/trace-sampling") && warning.contains("no effect"), "{v}");

    let (code, body) = ask(
        "t4",
        with(json!({"ballast.io/inject": "enabled", "ballast.io/trace-collector": "https://collector:4317"})),
    )
    .await;
    assert_eq!(code, 200);
    let v: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(v["response"]["allowed"], false, "{v}");
    let message = v["response"]["status"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("ballast.io/trace-collector") && message.contains("https"), "{v}");
    stop(s).await;
}

/// The binary refuses an https trace collector at start, naming the flag (its env twin
/// too).
#[test]
fn binary_refuses_an_https_trace_collector() {
    let dir = tempfile::tempdir().expect("tmp");
    for (args, env) in [
        (&["--trace-collector", "https://otel-collector.observability.svc:4317"][..], None),
        (&[][..], Some("https://otel-collector.observability.svc:4317")),
    ] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ballast-injector"));
        cmd.args(["--addr", "127.0.0.1:0"])
            .args(args)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env("KUBECONFIG", dir.path().join("no-kubeconfig"))
            .env("HOME", dir.path());
        match env {
            Some(v) => cmd.env("BALLAST_TRACE_COLLECTOR", v),
            None => cmd.env_remove("BALLAST_TRACE_COLLECTOR"),
        };
        let mut injector = Spawned::start(&mut cmd);
        let status = injector.wait_at_most(Duration::from_secs(20), "did not refuse to start");
        assert!(!status.success());
        let stderr = injector.stderr();
        assert!(stderr.contains("--trace-collector") && stderr.contains("plain http"), "{stderr}");
    }
}
