//! AdmissionReview `admission.k8s.io/v1`, read and answered.
//!
//! Why not kube's `AdmissionReview<T>` and `AdmissionResponse`: its response serialises
//! `patch` (a `Vec<u8>`) as an array of numbers, which the API server rejects (it wants
//! base64), and its request parse is all-or-nothing, so a review whose object does not
//! parse loses the `uid` we must echo. The wire format here is small and tested byte for
//! byte (`tests/server.rs`).
//!
//! Every body gets an answer: a review whose object cannot be read is allowed without a
//! patch and with a warning (the webhook must never be the reason a pod cannot be
//! created); only a body that is not an AdmissionReview at all gets a 400.

use base64::Engine as _;
use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};

/// The API version answered (the only one the webhook configuration asks for).
pub const API_VERSION: &str = "admission.k8s.io/v1";

/// A body that is not an AdmissionReview: answered with a 400 and this message.
#[derive(Debug, thiserror::Error)]
pub enum BadReview {
    #[error("the body is not JSON: {0}")]
    NotJson(#[source] serde_json::Error),
    #[error("not an AdmissionReview: {0}")]
    NotReview(&'static str),
}

/// The parts of an AdmissionRequest the injector uses.
#[derive(Debug, Clone)]
pub struct Request {
    pub uid: String,
    pub operation: String,
    /// `kind.kind` with `kind.group`, e.g. `("", "Pod")`.
    pub group: String,
    pub kind: String,
    /// The request's namespace (a pod being created may not carry one in its metadata).
    pub namespace: String,
    pub object: Value,
}

impl Request {
    /// The pod, when this is the creation of a pod; `Err` says why it could not be read.
    pub fn pod(&self) -> Option<Result<Pod, serde_json::Error>> {
        (self.operation == "CREATE" && self.group.is_empty() && self.kind == "Pod")
            .then(|| serde_json::from_value(self.object.clone()))
    }
}

pub fn parse(body: &[u8]) -> Result<Request, BadReview> {
    let v: Value = serde_json::from_slice(body).map_err(BadReview::NotJson)?;
    if v.get("kind").and_then(Value::as_str) != Some("AdmissionReview") {
        return Err(BadReview::NotReview("kind is not AdmissionReview"));
    }
    let req = v.get("request").ok_or(BadReview::NotReview("no request"))?;
    let uid = req.get("uid").and_then(Value::as_str).ok_or(BadReview::NotReview("request.uid missing"))?;
    let text = |p: &str| req.pointer(p).and_then(Value::as_str).unwrap_or_default().to_owned();
    Ok(Request {
        uid: uid.to_owned(),
        operation: text("/operation"),
        group: text("/kind/group"),
        kind: text("/kind/kind"),
        namespace: text("/namespace"),
        object: req.get("object").cloned().unwrap_or(Value::Null),
    })
}

/// An AdmissionReview response.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    pub uid: String,
    pub allowed: bool,
    /// The JSONPatch, sent base64-encoded with `patchType: JSONPatch`.
    pub patch: Option<json_patch::Patch>,
    pub warnings: Vec<String>,
    /// Why a request is refused (only with `allowed: false`).
    pub message: Option<String>,
}

impl Response {
    pub fn allow(uid: &str) -> Self {
        Self { uid: uid.to_owned(), allowed: true, patch: None, warnings: Vec::new(), message: None }
    }

    pub fn deny(uid: &str, message: String) -> Self {
        Self { allowed: false, message: Some(message), ..Self::allow(uid) }
    }

    pub fn to_json(&self) -> Vec<u8> {
        let mut response = json!({ "uid": self.uid, "allowed": self.allowed });
        if let Some(patch) = &self.patch {
            // A patch is a list of plain operations: serialising it cannot fail.
            let bytes = serde_json::to_vec(patch).unwrap_or_default();
            response["patchType"] = json!("JSONPatch");
            response["patch"] = json!(base64::engine::general_purpose::STANDARD.encode(bytes));
        }
        if !self.warnings.is_empty() {
            response["warnings"] = json!(self.warnings);
        }
        if let Some(message) = &self.message {
            response["status"] = json!({ "code": 400, "reason": "BadRequest", "message": message });
        }
        let review = json!({ "apiVersion": API_VERSION, "kind": "AdmissionReview", "response": response });
        serde_json::to_vec(&review).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patch_travels_as_base64_not_as_numbers() {
        let patch: json_patch::Patch =
            serde_json::from_value(json!([{"op": "add", "path": "/metadata/labels", "value": {"a": "b"}}]))
                .expect("patch");
        let r = Response { patch: Some(patch), ..Response::allow("u-1") };
        let v: Value = serde_json::from_slice(&r.to_json()).expect("json");
        let encoded = v["response"]["patch"].as_str().expect("patch is a string");
        let decoded = base64::engine::general_purpose::STANDARD.decode(encoded).expect("base64");
        let ops: Value = serde_json::from_slice(&decoded).expect("patch json");
        assert_eq!(ops[0]["path"], "/metadata/labels");
        assert_eq!(v["response"]["patchType"], "JSONPatch");
        assert_eq!(v["response"]["uid"], "u-1");
        assert_eq!(v["apiVersion"], API_VERSION);
    }

    #[test]
    fn what_is_not_a_review_is_named() {
        assert!(matches!(parse(b"{"), Err(BadReview::NotJson(_))));
        assert!(matches!(parse(br#"{"kind":"Pod"}"#), Err(BadReview::NotReview(_))));
        let no_uid = br#"{"kind":"AdmissionReview","request":{}}"#;
        assert!(parse(no_uid).unwrap_err().to_string().contains("uid"));
        let odd = br#"{"kind":"AdmissionReview","request":{"uid":"x","operation":"CREATE","kind":{"group":"","kind":"Pod"},"object":{"spec":7}}}"#;
        let req = parse(odd).expect("a review");
        assert!(matches!(req.pod(), Some(Err(_))));
    }
}
