//! The injection over a corpus of real manifests, with golden files.
//!
//! Every document of `../shared/corpus/kubernetes-manifests/` (Istio's injection test
//! inputs and the Kubernetes examples) and of `tests/cases/` (our own edge cases) goes
//! through [`inject::inject`]; workloads as the pod their template makes, which is what
//! the webhook sees. They run with workload identity on (the trust anchors of
//! `tests/trust-anchors.pem`), as a deployed injector does; `tests/cases-without-identity/`
//! runs with it off (no trust anchors), and `tests/cases-with-tracing/` with identity and
//! a trace collector (`--trace-collector http://otel-collector.observability.svc:4317
//! --trace-sampling 5`; every other set runs without one). The decision and patch are
//! compared with `tests/golden/` (`BLESS=1 cargo test -p ballast-injector --test golden`
//! rewrites them; review the diff). Then every patch is applied, by an independent JSONPatch implementation
//! (Python `jsonpatch`), to the original JSON, and the result validated against the
//! Kubernetes 1.33 schema in strict mode (`kubernetes-validate`), with checks that the
//! app's containers are all still there, in order, and the proxy is there once.
//! Re-submitting an injected pod must give no patch.

#[path = "../../control-plane/tests/support/venv.rs"]
mod venv;

use std::path::{Path, PathBuf};

use ballast_injector::inject::{self, Config, Decision, INIT_CONTAINER, PROXY_CONTAINER};
use ballast_injector::telemetry::{Percent, TraceConfig};
use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// How the injector runs for a corpus directory.
#[derive(Clone, Copy)]
struct Setup {
    /// Workload identity on (the test trust anchors).
    identity: bool,
    /// With `--trace-collector` (see [`config`]).
    tracing: bool,
}

const DEPLOYED: Setup = Setup { identity: true, tracing: false };

/// The corpus directories, each with how the injector runs for it.
fn corpus_dirs() -> Vec<(PathBuf, Setup)> {
    let shared = workspace().join("../shared/corpus/kubernetes-manifests");
    let own = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let dirs = vec![
        (shared.join("istio-inject-inputs"), DEPLOYED),
        (shared.join("kubernetes-examples"), DEPLOYED),
        (own.join("cases"), DEPLOYED),
        (own.join("cases-without-identity"), Setup { identity: false, tracing: false }),
        (own.join("cases-with-tracing"), Setup { identity: true, tracing: true }),
    ];
    for (d, _) in &dirs {
        assert!(
            d.is_dir(),
            "test corpus {} is missing (../shared/ must sit beside the checkout)",
            d.display()
        );
    }
    dirs
}

/// The pods a document stands for: itself, a workload's template (with the workload's
/// namespace), or a List's items'.
fn pods_of(doc: &Value, out: &mut Vec<(String, Value)>) {
    let kind = doc.get("kind").and_then(Value::as_str).unwrap_or("");
    let name = doc.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("");
    let template = match kind {
        "Pod" => {
            out.push((format!("Pod/{name}"), doc.clone()));
            return;
        }
        "List" => {
            for item in doc.get("items").and_then(Value::as_array).into_iter().flatten() {
                pods_of(item, out);
            }
            return;
        }
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" | "ReplicationController" => {
            doc.pointer("/spec/template")
        }
        "CronJob" => doc.pointer("/spec/jobTemplate/spec/template"),
        _ => None,
    };
    if let Some(t) = template {
        let mut pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": t.get("metadata").cloned().unwrap_or(json!({})), "spec": t.get("spec").cloned().unwrap_or(Value::Null)});
        if let Some(ns) = doc.pointer("/metadata/namespace") {
            pod["metadata"]["namespace"] = ns.clone();
        }
        // A template has no name: the controller sets generateName.
        if pod.pointer("/metadata/name").is_none() {
            pod["metadata"]["generateName"] = json!(format!("{name}-"));
        }
        out.push((format!("{kind}/{name}"), pod));
    }
}

struct Case {
    id: String,
    original: Value,
    patch: Value,
    config: Config,
}

fn decide(pod_json: &Value, config: &Config) -> (Value, Option<Value>) {
    let pod: Pod = match serde_json::from_value(pod_json.clone()) {
        Ok(p) => p,
        Err(e) => return (json!({"outcome": "unreadable", "error": e.to_string()}), None),
    };
    match inject::inject(&pod, true, config) {
        Decision::Inject(patch) => {
            let patch = serde_json::to_value(&patch).expect("patch serialises");
            (json!({"outcome": "injected", "patch": patch}), Some(patch))
        }
        Decision::Skip(s) => {
            (json!({"outcome": "skipped", "reason": s.to_string(), "warning": s.warning()}), None)
        }
        Decision::Deny(e) => (json!({"outcome": "denied", "message": e.to_string()}), None),
    }
}

/// The injector's configuration with the test trust anchors (identity on), or without,
/// and with a trace collector (`--trace-collector
/// http://otel-collector.observability.svc:4317 --trace-sampling 5`, the protocol left at
/// its default, grpc), or without.
fn config(setup: Setup) -> Config {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/trust-anchors.pem");
    let pem = std::fs::read(&path).expect("read tests/trust-anchors.pem");
    let anchors = ballast_injector::identity::parse_anchors(&path, &pem).expect("test trust anchors parse");
    let trace = if setup.tracing {
        TraceConfig {
            collector: Some("http://otel-collector.observability.svc:4317".into()),
            sampling: Percent::parse("5").expect("a percentage"),
            ..TraceConfig::default()
        }
    } else {
        TraceConfig::default()
    };
    Config { trust_anchors: setup.identity.then(|| anchors.into()), trace, ..Config::default() }
}

/// Whether the case's proxy must have workload identity: anchors given, not opted out.
fn with_identity(c: &Case) -> bool {
    c.config.trust_anchors.is_some()
        && serde_json::from_value::<Pod>(c.original.clone()).is_ok_and(|p| inject::wants_identity(&p))
}

#[test]
fn corpus_matches_golden_files_and_patches_validate() {
    let bless = std::env::var_os("BLESS").is_some();
    let mut cases = Vec::new();
    let mut mismatches = Vec::new();
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for (dir, setup) in corpus_dirs() {
        let config = config(setup);
        let set = dir.file_name().and_then(|n| n.to_str()).unwrap_or("cases").to_owned();
        let mut files: Vec<_> =
            std::fs::read_dir(&dir).expect("read corpus dir").flatten().map(|e| e.path()).collect();
        files.retain(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"));
        files.sort();
        for file in files {
            let text = std::fs::read_to_string(&file).expect("read manifest");
            let stem = file.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
            let mut results = Vec::new();
            match serde_saphyr::from_multiple::<Value>(&text) {
                Err(e) => results.push(json!({"outcome": "not yaml", "error": e.to_string().lines().next()})),
                Ok(docs) => {
                    for doc in docs.iter().filter(|d| !d.is_null()) {
                        let mut pods = Vec::new();
                        pods_of(doc, &mut pods);
                        for (what, pod) in pods {
                            let (result, patch) = decide(&pod, &config);
                            let outcome = result["outcome"].as_str().unwrap_or_default().to_owned();
                            *counts.entry(outcome).or_default() += 1;
                            if let Some(patch) = patch {
                                cases.push(Case {
                                    id: format!("{set}/{stem} {what}"),
                                    original: pod.clone(),
                                    patch,
                                    config: config.clone(),
                                });
                            }
                            results.push(json!({"object": what, "result": result}));
                        }
                    }
                }
            }
            let golden = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/golden")
                .join(&set)
                .join(format!("{stem}.json"));
            let rendered = serde_json::to_string_pretty(&results).expect("json") + "\n";
            if bless {
                std::fs::create_dir_all(golden.parent().expect("parent")).expect("mkdir golden");
                std::fs::write(&golden, &rendered).expect("write golden");
            } else if std::fs::read_to_string(&golden).ok().as_deref() != Some(rendered.as_str()) {
                mismatches.push(golden.display().to_string());
            }
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} golden files differ (or are missing); if the change is intended, run \
         BLESS=1 cargo test -p ballast-injector --test golden and review the diff:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
    // Enough of the corpus is actually injected for the validation below to mean something.
    assert!(counts.get("injected").copied().unwrap_or(0) >= 100, "{counts:?}");

    // Re-submission: the patched pod gets no second sidecar.
    for c in &cases {
        let mut doc = c.original.clone();
        let patch: json_patch::Patch = serde_json::from_value(c.patch.clone()).expect("patch parses");
        json_patch::patch(&mut doc, &patch).unwrap_or_else(|e| panic!("{}: patch does not apply: {e}", c.id));
        let pod: Pod = serde_json::from_value(doc).expect("patched pod parses");
        assert_eq!(
            inject::inject(&pod, true, &c.config),
            Decision::Skip(inject::Skip::AlreadyInjected),
            "{}",
            c.id
        );
        let spec = pod.spec.expect("spec");
        let all: Vec<_> =
            spec.init_containers.iter().flatten().chain(&spec.containers).map(|c| c.name.as_str()).collect();
        assert_eq!(all.iter().filter(|n| **n == PROXY_CONTAINER).count(), 1, "{}: {all:?}", c.id);
        assert_eq!(all.iter().filter(|n| **n == INIT_CONTAINER).count(), 1, "{}: {all:?}", c.id);
    }

    // The independent check: Python's jsonpatch and the Kubernetes schema, strict.
    let input = tempfile::NamedTempFile::new().expect("temp file");
    let list: Vec<_> = cases
        .iter()
        .map(|c| json!({"id": c.id, "pod": c.original, "patch": c.patch, "identity": with_identity(c)}))
        .collect();
    std::fs::write(input.path(), serde_json::to_vec(&list).expect("json")).expect("write cases");
    let out = std::process::Command::new(venv::python())
        .arg(workspace().join("tests/python/check_injection.py"))
        .arg(input.path())
        .output()
        .expect("run check_injection.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "check_injection.py failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: Value = serde_json::from_str(stdout.lines().last().unwrap_or("{}")).expect("summary line");
    assert_eq!(summary["checked"].as_u64(), Some(cases.len() as u64), "{summary}");
    // Every pod that was valid before is valid after; only a handful of the corpus are
    // invalid to begin with (typos in old examples).
    assert!(summary["valid_after"].as_u64() >= Some(cases.len() as u64 - 10), "{summary}");
    // Identity was really on for the corpus (checked in depth by check_injection.py),
    // and off where it should be.
    let expected = cases.iter().filter(|c| with_identity(c)).count();
    assert!(expected >= 100, "only {expected} cases with identity");
    assert_eq!(summary["with_identity"].as_u64(), Some(expected as u64), "{summary}");
}
