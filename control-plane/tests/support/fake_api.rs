//! A fake Kubernetes API server for the sync's tests, behind kube's mock-service pattern:
//! `kube::Client::new(tower::service_fn(...))`, no network.
//!
//! It holds ResiliencePolicies, Services and EndpointSlices, starting from recorded API
//! JSON (`tests/fixtures/kubernetes/`), and answers what the sync asks as an API server
//! does: lists with a `resourceVersion`, watches as newline-delimited JSON events from a
//! resource version (replayed from its history, then held open and fed as the test
//! changes objects), and merge patches of `status`, each of which is itself a change
//! that watchers see. Every request is recorded with the name of the client that made it.
//!
//! The handler never panics: a panic would kill kube's buffer worker and hang every later
//! call. What it does not expect it answers with 404 and records in `unexpected`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Policy,
    Service,
    Slice,
}

impl Kind {
    fn list_path(self) -> &'static str {
        match self {
            Kind::Policy => "/apis/ballast.io/v1alpha1/resiliencepolicies",
            Kind::Service => "/api/v1/services",
            Kind::Slice => "/apis/discovery.k8s.io/v1/endpointslices",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Kind::Policy => "ballast.io/v1alpha1",
            Kind::Service => "v1",
            Kind::Slice => "discovery.k8s.io/v1",
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Kind::Policy => "ResiliencePolicy",
            Kind::Service => "Service",
            Kind::Slice => "EndpointSlice",
        }
    }

    fn all() -> [Kind; 3] {
        [Kind::Policy, Kind::Service, Kind::Slice]
    }
}

/// One request as the fake saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub client: String,
    pub method: Method,
    /// Path and query.
    pub uri: String,
    pub body: Value,
}

type Name = (String, String);

struct State {
    rv: u64,
    objects: BTreeMap<(Kind, Name), Value>,
    /// `(resource version, kind, event JSON line)`.
    history: Vec<(u64, Kind, Bytes)>,
    watchers: Vec<(Kind, mpsc::UnboundedSender<Bytes>)>,
    requests: Vec<Recorded>,
    unexpected: Vec<String>,
    next_uid: u64,
    /// Status patches answered 403, as without RBAC for `resiliencepolicies/status`.
    status_forbidden: bool,
}

#[derive(Clone)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
    /// Per kind: `false` holds list requests until it turns `true`.
    lists_open: Arc<BTreeMap<Kind, watch::Sender<bool>>>,
}

type Body = UnsyncBoxBody<Bytes, Infallible>;

fn full(status: StatusCode, v: &Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())).boxed_unsync());
    *r.status_mut() = status;
    r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    r
}

fn status(code: u16, reason: &str, message: &str) -> Response<Body> {
    full(
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": reason, "code": code}),
    )
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, Value::Object(p)) => {
            *t = Value::Object(Default::default());
            merge(t, &Value::Object(p.clone()));
        }
        (t, p) => *t = p.clone(),
    }
}

fn name_of(o: &Value) -> Name {
    let m = &o["metadata"];
    (
        m["namespace"].as_str().unwrap_or_default().to_owned(),
        m["name"].as_str().unwrap_or_default().to_owned(),
    )
}

fn query(uri: &http::Uri, key: &str) -> Option<String> {
    uri.query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| v.replace("%2F", "/").replace("%2f", "/"))
    })
}

/// `metadata.<field>` set on an object that is known to be one.
fn set_meta(o: &mut Value, field: &str, v: Value) {
    if let Some(m) = o.get_mut("metadata").and_then(Value::as_object_mut) {
        m.insert(field.to_owned(), v);
    }
}

impl FakeApi {
    /// A fake holding the recorded lists in `tests/fixtures/kubernetes/`.
    pub fn from_fixtures() -> Self {
        let fake = Self::empty();
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/kubernetes");
        for (kind, file) in [
            (Kind::Policy, "resiliencepolicies.json"),
            (Kind::Service, "services.json"),
            (Kind::Slice, "endpointslices.json"),
        ] {
            let text = std::fs::read_to_string(dir.join(file)).expect("a fixture");
            let list: Value = serde_json::from_str(&text).expect("fixture JSON");
            let mut s = fake.lock();
            let rv: u64 =
                list["metadata"]["resourceVersion"].as_str().and_then(|v| v.parse().ok()).expect("a list rv");
            s.rv = s.rv.max(rv);
            for item in list["items"].as_array().expect("items") {
                s.objects.insert((kind, name_of(item)), item.clone());
            }
        }
        fake
    }

    pub fn empty() -> Self {
        let lists_open = Kind::all().into_iter().map(|k| (k, watch::channel(true).0)).collect();
        Self {
            state: Arc::new(Mutex::new(State {
                rv: 1000,
                objects: BTreeMap::new(),
                history: Vec::new(),
                watchers: Vec::new(),
                requests: Vec::new(),
                unexpected: Vec::new(),
                next_uid: 1,
                status_forbidden: false,
            })),
            lists_open: Arc::new(lists_open),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A client whose requests are recorded as `client`'s.
    pub fn client(&self, client: &str) -> kube::Client {
        let fake = self.clone();
        let client = client.to_owned();
        let service = tower::service_fn(move |req: Request<kube::client::Body>| {
            let fake = fake.clone();
            let client = client.clone();
            async move { Ok::<_, Infallible>(fake.handle(&client, req).await) }
        });
        kube::Client::new(service, "default")
    }

    /// Holds (`false`) or lets through (`true`) list requests of `kind`.
    pub fn open_lists(&self, kind: Kind, open: bool) {
        if let Some(tx) = self.lists_open.get(&kind) {
            tx.send_replace(open);
        }
    }

    /// Refuses (403) or serves status patches, as with and without RBAC for them.
    pub fn forbid_status(&self, forbidden: bool) {
        self.lock().status_forbidden = forbidden;
    }

    /// Answers one request as `client` (other fakes route what they do not serve here).
    pub async fn handle(&self, client: &str, req: Request<kube::client::Body>) -> Response<Body> {
        let (parts, body) = req.into_parts();
        let body = match body.collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return status(400, "BadRequest", &format!("cannot read the body: {e}")),
        };
        let body: Value =
            if body.is_empty() { Value::Null } else { serde_json::from_slice(&body).unwrap_or(Value::Null) };
        let uri = parts.uri.to_string();
        self.lock().requests.push(Recorded {
            client: client.to_owned(),
            method: parts.method.clone(),
            uri: uri.clone(),
            body: body.clone(),
        });
        let path = parts.uri.path();
        if parts.method == Method::GET
            && let Some(kind) = Kind::all().into_iter().find(|k| k.list_path() == path)
        {
            let selector = query(&parts.uri, "labelSelector");
            if query(&parts.uri, "watch").as_deref() == Some("true") {
                let from = query(&parts.uri, "resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
                return self.watch(kind, from);
            }
            if let Some(open) = self.lists_open.get(&kind) {
                let mut rx = open.subscribe();
                let _ = rx.wait_for(|open| *open).await;
            }
            return self.list(kind, selector.as_deref());
        }
        if parts.method == Method::PATCH {
            let segments: Vec<&str> = path.split('/').collect();
            if let [
                "",
                "apis",
                "ballast.io",
                "v1alpha1",
                "namespaces",
                ns,
                "resiliencepolicies",
                name,
                "status",
            ] = segments.as_slice()
            {
                let content_type =
                    parts.headers.get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
                if content_type != Some("application/merge-patch+json") {
                    self.lock().unexpected.push(format!("status patch as {content_type:?}"));
                    return status(415, "UnsupportedMediaType", "expected a merge patch");
                }
                if self.lock().status_forbidden {
                    return status(
                        403,
                        "Forbidden",
                        &format!(
                            "resiliencepolicies.ballast.io \"{name}\" is forbidden: cannot patch resource \"resiliencepolicies/status\" in namespace \"{ns}\""
                        ),
                    );
                }
                return self.patch_status(ns, name, &body);
            }
        }
        self.lock().unexpected.push(format!("{} {uri}", parts.method));
        status(404, "NotFound", &format!("the fake API server does not serve {} {uri}", parts.method))
    }

    fn list(&self, kind: Kind, selector: Option<&str>) -> Response<Body> {
        let s = self.lock();
        let items: Vec<Value> = s
            .objects
            .iter()
            .filter(|((k, _), _)| *k == kind)
            .map(|(_, o)| o.clone())
            .filter(|o| selector.is_none_or(|key| o["metadata"]["labels"].get(key).is_some()))
            .map(|mut o| {
                // As a real API server: items of built-in lists carry no kind.
                if kind != Kind::Policy
                    && let Some(m) = o.as_object_mut()
                {
                    m.remove("kind");
                    m.remove("apiVersion");
                }
                o
            })
            .collect();
        full(
            StatusCode::OK,
            &json!({
                "apiVersion": kind.api_version(),
                "kind": format!("{}List", kind.kind()),
                "metadata": {"resourceVersion": s.rv.to_string()},
                "items": items,
            }),
        )
    }

    fn watch(&self, kind: Kind, from: u64) -> Response<Body> {
        let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
        {
            let mut s = self.lock();
            for (rv, k, line) in &s.history {
                if *k == kind && *rv > from {
                    let _ = tx.send(line.clone());
                }
            }
            s.watchers.push((kind, tx));
        }
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|line| (Ok::<_, Infallible>(Frame::data(line)), rx))
        });
        let mut r = Response::new(StreamBody::new(stream).boxed_unsync());
        r.headers_mut()
            .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
        r
    }

    fn patch_status(&self, ns: &str, name: &str, patch: &Value) -> Response<Body> {
        let key = (Kind::Policy, (ns.to_owned(), name.to_owned()));
        let mut s = self.lock();
        let Some(mut object) = s.objects.get(&key).cloned() else {
            return status(404, "NotFound", &format!("resiliencepolicies.ballast.io \"{name}\" not found"));
        };
        let Some(new_status) = patch.get("status") else {
            s.unexpected.push(format!("a status patch without status: {patch}"));
            return status(422, "Invalid", "only status may be patched here");
        };
        if let Some(m) = object.as_object_mut() {
            let mut st = m.remove("status").unwrap_or(Value::Null);
            merge(&mut st, new_status);
            m.insert("status".into(), st);
        }
        s.rv += 1;
        let rv = s.rv;
        set_meta(&mut object, "resourceVersion", json!(rv.to_string()));
        s.objects.insert(key, object.clone());
        Self::emit(&mut s, Kind::Policy, "MODIFIED", &object);
        full(StatusCode::OK, &object)
    }

    fn emit(s: &mut State, kind: Kind, type_: &str, object: &Value) {
        let mut o = object.clone();
        if let Some(m) = o.as_object_mut() {
            m.insert("apiVersion".into(), json!(kind.api_version()));
            m.insert("kind".into(), json!(kind.kind()));
        }
        let mut line = json!({"type": type_, "object": o}).to_string();
        line.push('\n');
        let line = Bytes::from(line);
        let rv = s.rv;
        s.history.push((rv, kind, line.clone()));
        s.watchers.retain(|(k, tx)| *k != kind || tx.send(line.clone()).is_ok());
    }

    /// Creates or updates an object as `kubectl apply` would: a new one gets a uid, a
    /// creation time (now, unless it has one) and generation 1; a changed spec bumps the
    /// generation; status is kept.
    pub fn apply(&self, kind: Kind, mut object: Value) {
        let key = (kind, name_of(&object));
        let mut s = self.lock();
        s.rv += 1;
        let rv = s.rv;
        let type_ = match s.objects.get(&key).cloned() {
            Some(old) => {
                let generation = old["metadata"]["generation"].as_i64().unwrap_or(1);
                let generation = if old["spec"] != object["spec"] { generation + 1 } else { generation };
                for field in ["uid", "creationTimestamp"] {
                    set_meta(&mut object, field, old["metadata"][field].clone());
                }
                set_meta(&mut object, "generation", json!(generation));
                if let (Some(m), Some(st)) = (object.as_object_mut(), old.get("status")) {
                    m.insert("status".into(), st.clone());
                }
                "MODIFIED"
            }
            None => {
                s.next_uid += 1;
                let uid = format!("00000000-0000-4000-8000-{:012}", s.next_uid);
                set_meta(&mut object, "uid", json!(uid));
                if object["metadata"]["creationTimestamp"].is_null() {
                    set_meta(&mut object, "creationTimestamp", json!(now()));
                }
                set_meta(&mut object, "generation", json!(1));
                "ADDED"
            }
        };
        set_meta(&mut object, "resourceVersion", json!(rv.to_string()));
        s.objects.insert(key, object.clone());
        Self::emit(&mut s, kind, type_, &object);
    }

    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) {
        let mut s = self.lock();
        let Some(mut object) = s.objects.remove(&(kind, (namespace.to_owned(), name.to_owned()))) else {
            return;
        };
        s.rv += 1;
        let rv = s.rv;
        set_meta(&mut object, "resourceVersion", json!(rv.to_string()));
        Self::emit(&mut s, kind, "DELETED", &object);
    }

    /// Deletes an object without telling any watcher: only a new list shows it gone.
    pub fn delete_unseen(&self, kind: Kind, namespace: &str, name: &str) {
        let mut s = self.lock();
        s.objects.remove(&(kind, (namespace.to_owned(), name.to_owned())));
        s.rv += 1;
    }

    /// Deletes an object without telling any watcher, as if it went while the watch was
    /// down, then expires every watch of `kind` (410 Gone): the watchers must list again
    /// to see it gone.
    pub fn delete_unseen_and_expire(&self, kind: Kind, namespace: &str, name: &str) {
        let mut s = self.lock();
        s.objects.remove(&(kind, (namespace.to_owned(), name.to_owned())));
        s.rv += 1;
        let mut line = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": "too old resource version: 1 (2)", "reason": "Expired", "code": 410}})
        .to_string();
        line.push('\n');
        let line = Bytes::from(line);
        s.watchers.retain(|(k, tx)| {
            if *k == kind {
                let _ = tx.send(line.clone());
                false
            } else {
                true
            }
        });
        // Replaying history across the expiry would hide the deletion: start afresh.
        s.history.retain(|(_, k, _)| *k != kind);
    }

    /// An object as the fake holds it now.
    pub fn get(&self, kind: Kind, namespace: &str, name: &str) -> Option<Value> {
        self.lock().objects.get(&(kind, (namespace.to_owned(), name.to_owned()))).cloned()
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.lock().requests.clone()
    }

    /// The status patches so far, `(client, namespace/name, status)`.
    pub fn status_patches(&self) -> Vec<(String, String, Value)> {
        self.requests()
            .into_iter()
            .filter(|r| r.method == Method::PATCH)
            .map(|r| {
                let path = r.uri.split('?').next().unwrap_or_default().to_owned();
                let parts: Vec<&str> = path.split('/').collect();
                let name = format!("{}/{}", parts.get(5).unwrap_or(&""), parts.get(7).unwrap_or(&""));
                (r.client, name, r.body["status"].clone())
            })
            .collect()
    }

    pub fn unexpected(&self) -> Vec<String> {
        self.lock().unexpected.clone()
    }
}

/// Now, RFC 3339 to the second, as the API server writes times.
pub fn now() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    k8s_openapi::jiff::Timestamp::from_second(secs as i64).map(|t| t.to_string()).unwrap_or_default()
}
