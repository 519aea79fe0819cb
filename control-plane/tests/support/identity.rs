//! Helpers for the workload-identity tests: a control plane with identity on, TLS
//! channels to it (with or without a client certificate), CSRs, and a fake Kubernetes
//! API that answers TokenReviews and keeps ConfigMaps and Secrets, passing everything
//! else (the sync's lists and watches) to [`FakeApi`].
//!
//! The fake never panics in its handler (kube's buffer worker would die with it): what
//! it cannot answer gets a 500 with a message.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ballast_api::proto::v1::{CertifyRequest, CertifyResponse, identity_client::IdentityClient};
use ballast_control_plane::identity::ca::certificate_pem;
use ballast_control_plane::identity::{CaSource, IdentityOptions};
use ballast_control_plane::server::{ControlPlane, Options};
use ballast_control_plane::store::Store;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity as TlsIdentity};

use super::fake_api::FakeApi;

/// The admin token the tests configure.
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

pub fn options(ca: CaSource) -> IdentityOptions {
    IdentityOptions {
        ca,
        admin_token: Some(ADMIN_TOKEN.to_owned()),
        namespace: "ballast-system".to_owned(),
        certificate_lifetime: Duration::from_secs(3600),
        ..IdentityOptions::default()
    }
}

/// A control plane with identity on (generated CA in the store) on `store`.
pub async fn start(store: Store, replica: &str) -> ControlPlane {
    let opts = Options { identity: Some(options(CaSource::Generated)), ..Options::loopback(replica) };
    ControlPlane::start_on(store, opts).await.expect("starts with identity")
}

pub fn anchors(cp: &ControlPlane) -> String {
    cp.trust_anchors_pem().expect("identity is on")
}

/// A TLS channel to the gRPC port, presenting `client` (chain PEM, key PEM) if given.
pub async fn channel(cp: &ControlPlane, client: Option<(&str, &str)>) -> Channel {
    let mut tls =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(anchors(cp))).domain_name("localhost");
    if let Some((chain, key)) = client {
        tls = tls.identity(TlsIdentity::from_pem(chain, key));
    }
    Channel::from_shared(format!("https://{}", cp.grpc_addr))
        .expect("url")
        .tls_config(tls)
        .expect("tls config")
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("TLS connect to the gRPC port")
}

/// A CSR for `key` asking for `dns` names and `uris` (which the CA must ignore).
pub fn csr(key: &rcgen::KeyPair, dns: &[&str], uris: &[&str]) -> Vec<u8> {
    let mut p =
        rcgen::CertificateParams::new(dns.iter().map(|s| s.to_string()).collect::<Vec<_>>()).expect("params");
    for u in uris {
        p.subject_alt_names.push(rcgen::SanType::URI((*u).try_into().expect("ia5")));
    }
    p.serialize_request(key).expect("csr").der().to_vec()
}

pub async fn certify(
    channel: &Channel,
    namespace: &str,
    service_account: &str,
    token: &str,
    csr: Vec<u8>,
) -> Result<CertifyResponse, tonic::Status> {
    IdentityClient::new(channel.clone())
        .certify(CertifyRequest {
            namespace: namespace.into(),
            service_account: service_account.into(),
            token: token.into(),
            csr,
        })
        .await
        .map(tonic::Response::into_inner)
}

/// A certificate for `namespace/sa` via a bootstrap token: (chain PEM, key PEM, response).
pub async fn certificate(cp: &ControlPlane, namespace: &str, sa: &str) -> (String, String, CertifyResponse) {
    let token = ballast_control_plane::identity::create_bootstrap_token(
        &cp.store,
        &ballast_control_plane::keys::Keys::default(),
        namespace,
        sa,
        Duration::from_secs(600),
    )
    .await
    .expect("token");
    let key = rcgen::KeyPair::generate().expect("key");
    let ch = channel(cp, None).await;
    let r = certify(&ch, namespace, sa, &token, csr(&key, &[], &[])).await.expect("certified");
    let chain: String = r.certificate_chain.iter().map(|c| certificate_pem(c)).collect();
    (chain, key.serialize_pem(), r)
}

type Body = UnsyncBoxBody<Bytes, Infallible>;

fn respond(code: u16, v: &Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())).boxed_unsync());
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    r
}

fn status(code: u16, reason: &str, message: &str) -> Response<Body> {
    respond(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": reason, "code": code}),
    )
}

#[derive(Default)]
struct State {
    /// Token → TokenReview status.
    reviews: BTreeMap<String, Value>,
    /// (kind, namespace, name) → object; kind is `configmaps` or `secrets`.
    objects: BTreeMap<(String, String, String), Value>,
    /// Every request this fake answered itself: (method, path, body).
    requests: Vec<(Method, String, Value)>,
    /// Answer the next Secret create with 409 after storing this Secret (another replica won).
    secret_race: Option<Value>,
    rv: u64,
}

/// The fake Kubernetes API for identity (see the module docs).
#[derive(Clone)]
pub struct IdentityApi {
    fake: FakeApi,
    state: Arc<Mutex<State>>,
}

impl IdentityApi {
    pub fn new() -> Self {
        Self { fake: FakeApi::empty(), state: Arc::new(Mutex::new(State { rv: 1, ..Default::default() })) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `token` reviews as `status` (a TokenReviewStatus JSON). An authenticated status
    /// without `audiences` is answered with the review's own audiences, as the API server
    /// does; `"audiences": null` answers without any.
    pub fn review(&self, token: &str, status: Value) {
        self.lock().reviews.insert(token.to_owned(), status);
    }

    /// Stores an object (`configmaps` or `secrets`).
    pub fn put(&self, kind: &str, namespace: &str, name: &str, object: Value) {
        self.lock().objects.insert((kind.into(), namespace.into(), name.into()), object);
    }

    pub fn get(&self, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        self.lock().objects.get(&(kind.into(), namespace.into(), name.into())).cloned()
    }

    /// The next Secret create loses a race to `winner`: it is stored and the create gets 409.
    pub fn race_secret_create(&self, winner: Value) {
        self.lock().secret_race = Some(winner);
    }

    pub fn requests(&self) -> Vec<(Method, String, Value)> {
        self.lock().requests.clone()
    }

    pub fn client(&self) -> kube::Client {
        let me = self.clone();
        let service = tower::service_fn(move |req: Request<kube::client::Body>| {
            let me = me.clone();
            async move { Ok::<_, Infallible>(me.handle(req).await) }
        });
        kube::Client::new(service, "default")
    }

    async fn handle(&self, req: Request<kube::client::Body>) -> Response<Body> {
        let path = req.uri().path().to_owned();
        let segments: Vec<String> = path.split('/').filter(|s| !s.is_empty()).map(str::to_owned).collect();
        let segs: Vec<&str> = segments.iter().map(String::as_str).collect();
        let ours = matches!(
            segs.as_slice(),
            ["apis", "authentication.k8s.io", "v1", "tokenreviews"]
                | ["api", "v1", "namespaces", _, "configmaps" | "secrets", ..]
        );
        if !ours {
            return self.fake.handle("cp", req).await;
        }
        let method = req.method().clone();
        let body = match req.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return status(500, "InternalError", &format!("cannot read the body: {e}")),
        };
        let body: Value =
            if body.is_empty() { Value::Null } else { serde_json::from_slice(&body).unwrap_or(Value::Null) };
        let mut s = self.lock();
        s.requests.push((method.clone(), path.clone(), body.clone()));
        match (method, segs.as_slice()) {
            (Method::POST, ["apis", "authentication.k8s.io", "v1", "tokenreviews"]) => {
                let token = body["spec"]["token"].as_str().unwrap_or_default();
                let mut review_status = s
                    .reviews
                    .get(token)
                    .cloned()
                    .unwrap_or_else(|| json!({"authenticated": false, "error": "invalid bearer token"}));
                // As a real API server: an authenticated token's audiences are those the
                // review asked for, unless the test set them (`null`: answer without any).
                if review_status["authenticated"] == json!(true) {
                    match review_status.get("audiences") {
                        None => review_status["audiences"] = body["spec"]["audiences"].clone(),
                        Some(Value::Null) => {
                            if let Some(o) = review_status.as_object_mut() {
                                o.remove("audiences");
                            }
                        }
                        Some(_) => {}
                    }
                }
                respond(
                    201,
                    &json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                            "metadata": {}, "spec": body["spec"], "status": review_status}),
                )
            }
            (Method::GET, ["api", "v1", "namespaces", ns, kind, name]) => {
                match s.objects.get(&(kind.to_string(), ns.to_string(), name.to_string())) {
                    Some(o) => respond(200, o),
                    None => status(404, "NotFound", &format!("{kind} \"{name}\" not found")),
                }
            }
            (Method::POST, ["api", "v1", "namespaces", ns, kind]) => {
                let name = body["metadata"]["name"].as_str().unwrap_or_default().to_owned();
                let key = (kind.to_string(), ns.to_string(), name.clone());
                if *kind == "secrets"
                    && let Some(winner) = s.secret_race.take()
                {
                    s.objects.insert(key, winner);
                    return status(409, "AlreadyExists", &format!("secrets \"{name}\" already exists"));
                }
                if s.objects.contains_key(&key) {
                    return status(409, "AlreadyExists", &format!("{kind} \"{name}\" already exists"));
                }
                s.rv += 1;
                let mut o = body.clone();
                o["metadata"]["resourceVersion"] = json!(s.rv.to_string());
                s.objects.insert(key, o.clone());
                respond(201, &o)
            }
            (Method::PUT, ["api", "v1", "namespaces", ns, kind, name]) => {
                let key = (kind.to_string(), ns.to_string(), name.to_string());
                if !s.objects.contains_key(&key) {
                    return status(404, "NotFound", &format!("{kind} \"{name}\" not found"));
                }
                s.rv += 1;
                let mut o = body.clone();
                o["metadata"]["resourceVersion"] = json!(s.rv.to_string());
                s.objects.insert(key, o.clone());
                respond(200, &o)
            }
            (m, _) => status(500, "InternalError", &format!("the identity fake does not serve {m} {path}")),
        }
    }
}
