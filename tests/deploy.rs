//! The Kubernetes manifests under `deploy/`: the install (`deploy/`), each overlay and the
//! examples render offline with `kubectl kustomize`; every object passes schema validation
//! (`tests/python/validate_manifests.py`: Kubernetes 1.33's schemas for built-in kinds,
//! the rendered CRD's schema for the example ResiliencePolicy, essential fields for the
//! Prometheus Operator's and cert-manager's kinds); the properties an operator relies on
//! hold (webhook, security contexts, least-privilege RBAC, replicas and disruption
//! budgets, images set in one place, flags the binaries really have, workload identity
//! wired from the control plane's CA through the injector to the scrape); and the alerts
//! pass `promtool check rules` and their unit tests, naming only metrics that exist.
//! The Dockerfile, which cannot be built here (no Docker engine), is checked for what its
//! builder stage puts where the images copy from.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// The Kubernetes version whose schemas the built-in objects must satisfy.
const KUBE_VERSION: &str = "1.33.0";
/// The namespace of everything Ballast runs.
const NS: &str = "ballast-system";
/// The ConfigMap the control plane publishes its CA certificate in, and its key.
const TRUST_ANCHORS: (&str, &str) = ("ballast-trust-anchors", "ca.crt");
/// The Secret with the control plane's admin API token, and its key.
const ADMIN_TOKEN: (&str, &str) = ("ballast-admin-token", "token");
/// The Secret the control plane keeps its generated identity CA in (`--ca-secret`).
const CA_SECRET: &str = "ballast-identity-ca";
/// The control plane's URL for the sidecars: TLS with identity.
const CONTROL_PLANE_URL: &str = "https://ballast-control-plane.ballast-system.svc:8086";

/// Every rendering: its name in messages, and its directory under the repository root.
const VARIANTS: &[(&str, &str)] = &[
    ("deploy", "deploy"),
    ("external-etcd", "deploy/overlays/external-etcd"),
    ("cert-manager", "deploy/overlays/cert-manager"),
    ("no-prometheus-operator", "deploy/overlays/no-prometheus-operator"),
    ("examples", "deploy/examples"),
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn output_text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// `kubectl kustomize DIR`, failing loudly when kubectl is missing or the build fails.
fn kustomize(dir: &str) -> String {
    let out = support::venv::kubectl([OsStr::new("kustomize"), root().join(dir).as_os_str()]);
    String::from_utf8(out).expect("kustomize prints UTF-8")
}

/// Runs the validator on `NAME=FILE` arguments; returns the parsed documents by name.
fn run_validator(dir: &Path, inputs: &[(String, PathBuf)], parse_only: bool) -> BTreeMap<String, Vec<Value>> {
    let json = dir.join(if parse_only { "parsed.json" } else { "validated.json" });
    let python = support::venv::python();
    let mut cmd = Command::new(&python);
    cmd.arg(root().join("tests/python/validate_manifests.py"))
        .args(["--kube-version", KUBE_VERSION, "--out"])
        .arg(&json);
    if parse_only {
        cmd.arg("--parse-only");
    }
    for (name, path) in inputs {
        cmd.arg(format!("{name}={}", path.display()));
    }
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    assert!(out.status.success(), "validate_manifests.py found problems:\n{}", output_text(&out));
    serde_json::from_slice(&std::fs::read(&json).expect("the validator wrote its JSON"))
        .expect("the validator's JSON parses")
}

/// Every variant rendered into `dir`: (name, file).
fn render_all(dir: &Path) -> Vec<(String, PathBuf)> {
    VARIANTS
        .iter()
        .map(|(name, path)| {
            let file = dir.join(format!("{name}.yaml"));
            std::fs::write(&file, kustomize(path)).expect("write the rendering");
            (name.to_string(), file)
        })
        .collect()
}

/// Every variant rendered and parsed (not validated), plus the base kustomization itself
/// under the name `kustomization`.
fn rendered() -> BTreeMap<String, Vec<Value>> {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut inputs = render_all(dir.path());
    inputs.push(("kustomization".into(), root().join("deploy/base/kustomization.yaml")));
    run_validator(dir.path(), &inputs, true)
}

// ---- JSON helpers -----------------------------------------------------------------------

fn s<'a>(v: &'a Value, ptr: &str) -> Option<&'a str> {
    v.pointer(ptr).and_then(Value::as_str)
}

fn arr<'a>(v: &'a Value, ptr: &str) -> &'a [Value] {
    v.pointer(ptr).and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[])
}

fn strs(v: &Value, ptr: &str) -> Vec<String> {
    arr(v, ptr).iter().filter_map(Value::as_str).map(str::to_owned).collect()
}

fn kind(o: &Value) -> &str {
    s(o, "/kind").unwrap_or("")
}

fn name(o: &Value) -> &str {
    s(o, "/metadata/name").unwrap_or("")
}

fn describe(o: &Value) -> String {
    match s(o, "/metadata/namespace") {
        Some(ns) => format!("{} {ns}/{}", kind(o), name(o)),
        None => format!("{} {}", kind(o), name(o)),
    }
}

fn find<'a>(objs: &'a [Value], k: &str, n: &str) -> Option<&'a Value> {
    objs.iter().find(|o| kind(o) == k && name(o) == n)
}

fn of_kind<'a>(objs: &'a [Value], k: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    objs.iter().filter(move |o| kind(o) == k)
}

/// The pod spec of a workload.
fn pod_spec(o: &Value) -> Option<&Value> {
    match kind(o) {
        "Pod" => o.pointer("/spec"),
        "CronJob" => o.pointer("/spec/jobTemplate/spec/template/spec"),
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => o.pointer("/spec/template/spec"),
        _ => None,
    }
}

fn containers(pod: &Value) -> impl Iterator<Item = &Value> {
    arr(pod, "/initContainers").iter().chain(arr(pod, "/containers"))
}

fn container<'a>(o: &'a Value, n: &str) -> Option<&'a Value> {
    pod_spec(o).and_then(|p| containers(p).find(|c| s(c, "/name") == Some(n)))
}

fn env_var<'a>(c: &'a Value, n: &str) -> Option<&'a Value> {
    arr(c, "/env").iter().find(|e| s(e, "/name") == Some(n))
}

/// Collected violations: every problem is reported, not just the first.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn check(&mut self, ok: bool, msg: impl FnOnce() -> String) {
        if !ok {
            self.0.push(msg());
        }
    }

    fn assert_none(self, what: &str) {
        assert!(self.0.is_empty(), "{what}: {} problems:\n  {}", self.0.len(), self.0.join("\n  "));
    }
}

// ---- 1. rendering and schemas -----------------------------------------------------------

#[test]
fn every_variant_renders_and_passes_schema_validation() {
    let dir = tempfile::tempdir().expect("temp dir");
    let inputs = render_all(dir.path());
    let docs = run_validator(dir.path(), &inputs, false);
    let deploy = &docs["deploy"];
    let crd = find(deploy, "CustomResourceDefinition", "resiliencepolicies.ballast.io")
        .expect("deploy/ renders the ResiliencePolicy CRD (deploy/crd/)");
    assert_eq!(s(crd, "/spec/names/kind"), Some("ResiliencePolicy"));
    // The example policy was validated against that CRD's schema, not skipped.
    assert!(
        of_kind(&docs["examples"], "ResiliencePolicy").count() == 1,
        "the examples hold one ResiliencePolicy, validated against the CRD"
    );
    for (variant, objs) in &docs {
        assert!(objs.len() > 3, "{variant} renders almost nothing: {}", objs.len());
        // Every install variant carries the CRD (through deploy/crd/kustomization.yaml).
        if variant != "examples" {
            assert!(
                find(objs, "CustomResourceDefinition", "resiliencepolicies.ballast.io").is_some(),
                "{variant} does not install the ResiliencePolicy CRD"
            );
        }
    }
}

// ---- 2. properties ----------------------------------------------------------------------

/// `image:` references after kustomize's `images:` transformer, from the base kustomization.
fn image_refs(kustomization: &Value) -> BTreeMap<String, String> {
    arr(kustomization, "/images")
        .iter()
        .map(|i| {
            let name = s(i, "/name").expect("images[].name").to_owned();
            let repo = s(i, "/newName").unwrap_or(&name).to_owned();
            let full = match (s(i, "/digest"), i.pointer("/newTag")) {
                (Some(d), _) => format!("{repo}@{d}"),
                (None, Some(t)) => {
                    format!("{repo}:{}", t.as_str().map_or_else(|| t.to_string(), str::to_owned))
                }
                (None, None) => panic!("images entry {name} sets no newTag or digest"),
            };
            (name, full)
        })
        .collect()
}

fn check_containers(variant: &str, objs: &[Value], images: Option<&BTreeSet<String>>, p: &mut Problems) {
    for o in objs {
        let Some(pod) = pod_spec(o) else { continue };
        let w = format!("{variant}: {}", describe(o));
        for flag in ["/hostNetwork", "/hostPID", "/hostIPC"] {
            p.check(pod.pointer(flag) != Some(&Value::Bool(true)), || format!("{w}: {flag} is set"));
        }
        for c in containers(pod) {
            let cw = format!("{w} container {}", s(c, "/name").unwrap_or("?"));
            let eff = |field: &str| {
                c.pointer(&format!("/securityContext/{field}"))
                    .or_else(|| pod.pointer(&format!("/securityContext/{field}")))
            };
            p.check(eff("runAsNonRoot") == Some(&Value::Bool(true)), || format!("{cw}: not runAsNonRoot"));
            p.check(eff("runAsUser").and_then(Value::as_u64) != Some(0), || format!("{cw}: runs as UID 0"));
            p.check(
                s(c, "/securityContext/seccompProfile/type")
                    .or(s(pod, "/securityContext/seccompProfile/type"))
                    == Some("RuntimeDefault"),
                || format!("{cw}: seccompProfile is not RuntimeDefault"),
            );
            p.check(c.pointer("/securityContext/readOnlyRootFilesystem") == Some(&Value::Bool(true)), || {
                format!("{cw}: root filesystem not read-only")
            });
            p.check(
                c.pointer("/securityContext/allowPrivilegeEscalation") == Some(&Value::Bool(false)),
                || format!("{cw}: allowPrivilegeEscalation is not false"),
            );
            p.check(c.pointer("/securityContext/privileged") != Some(&Value::Bool(true)), || {
                format!("{cw}: privileged")
            });
            p.check(strs(c, "/securityContext/capabilities/drop").contains(&"ALL".to_owned()), || {
                format!("{cw}: does not drop ALL capabilities")
            });
            p.check(arr(c, "/securityContext/capabilities/add").is_empty(), || {
                format!("{cw}: adds capabilities")
            });
            for r in ["cpu", "memory"] {
                p.check(c.pointer(&format!("/resources/requests/{r}")).is_some(), || {
                    format!("{cw}: no {r} request")
                });
            }
            p.check(c.pointer("/resources/limits/memory").is_some(), || format!("{cw}: no memory limit"));
            let image = s(c, "/image").unwrap_or("");
            if let Some(images) = images {
                p.check(images.contains(image), || {
                    format!(
                        "{cw}: image {image:?} is not one set by base/kustomization.yaml's images: {images:?}"
                    )
                });
            } else {
                p.check(image.contains(':') || image.contains('@'), || {
                    format!("{cw}: image {image:?} has no tag")
                });
            }
            if kind(o) != "Job"
                && kind(o) != "CronJob"
                && arr(pod, "/containers").contains(c)
                && images.is_some()
            {
                p.check(c.pointer("/readinessProbe").is_some(), || format!("{cw}: no readiness probe"));
                p.check(c.pointer("/livenessProbe").is_some(), || format!("{cw}: no liveness probe"));
            }
        }
    }
}

/// For one (apiGroup, resource): the allowed (verbs, resource names it must be limited
/// to; empty: no limit required) combinations.
type Allowed =
    BTreeMap<(&'static str, &'static str), Vec<(&'static [&'static str], &'static [&'static str])>>;

/// The RBAC grants Ballast may have.
fn allowed_grants() -> Allowed {
    const READ: &[&str] = &["get", "list", "watch"];
    BTreeMap::from([
        (("ballast.io", "resiliencepolicies"), vec![(READ, &[][..])]),
        (("ballast.io", "resiliencepolicies/status"), vec![(&["patch", "update"][..], &[][..])]),
        (("", "services"), vec![(READ, &[][..])]),
        (("discovery.k8s.io", "endpointslices"), vec![(READ, &[][..])]),
        (("", "namespaces"), vec![(READ, &[][..])]),
        (
            ("admissionregistration.k8s.io", "mutatingwebhookconfigurations"),
            vec![(&["get", "patch"][..], &["ballast-injector"][..])],
        ),
        // Secrets and ConfigMaps: in Roles only (checked below); create cannot be limited
        // by name.
        (
            ("", "secrets"),
            vec![
                (&["create"][..], &[][..]),
                (&["get", "update"][..], &["ballast-injector-tls"][..]),
                (&["get", "update"][..], &[CA_SECRET][..]),
            ],
        ),
        (
            ("", "configmaps"),
            vec![(&["create"][..], &[][..]), (&["get", "update"][..], &[TRUST_ANCHORS.0][..])],
        ),
        (("authentication.k8s.io", "tokenreviews"), vec![(&["create"][..], &[][..])]),
    ])
}

/// (apiGroup, resource, verb, resourceNames) granted to a ServiceAccount in `NS`.
type Grant = (String, String, String, Vec<String>);

fn grants_of(objs: &[Value], sa: &str) -> BTreeSet<Grant> {
    let mut out = BTreeSet::new();
    for b in objs.iter().filter(|o| kind(o) == "ClusterRoleBinding" || kind(o) == "RoleBinding") {
        let bound = arr(b, "/subjects").iter().any(|sub| {
            s(sub, "/kind") == Some("ServiceAccount")
                && s(sub, "/name") == Some(sa)
                && s(sub, "/namespace").or(s(b, "/metadata/namespace")) == Some(NS)
        });
        if !bound {
            continue;
        }
        let role_kind = s(b, "/roleRef/kind").unwrap_or("");
        let Some(role) = find(objs, role_kind, s(b, "/roleRef/name").unwrap_or("")) else { continue };
        for rule in arr(role, "/rules") {
            for g in strs(rule, "/apiGroups") {
                for r in strs(rule, "/resources") {
                    for v in strs(rule, "/verbs") {
                        out.insert((g.clone(), r.clone(), v, strs(rule, "/resourceNames")));
                    }
                }
            }
        }
    }
    out
}

fn grant(g: &str, r: &str, v: &str, names: &[&str]) -> Grant {
    (g.into(), r.into(), v.into(), names.iter().map(|n| n.to_string()).collect())
}

fn check_rbac(variant: &str, objs: &[Value], p: &mut Problems) {
    let allowed = allowed_grants();
    for role in objs.iter().filter(|o| kind(o) == "ClusterRole" || kind(o) == "Role") {
        let w = format!("{variant}: {}", describe(role));
        p.check(role.pointer("/aggregationRule").is_none(), || format!("{w}: aggregates other roles"));
        for rule in arr(role, "/rules") {
            p.check(rule.pointer("/nonResourceURLs").is_none(), || format!("{w}: grants nonResourceURLs"));
            let all: Vec<String> = ["/apiGroups", "/resources", "/verbs", "/resourceNames"]
                .iter()
                .flat_map(|f| strs(rule, f))
                .collect();
            p.check(!all.iter().any(|x| x.contains('*')), || format!("{w}: wildcard in {rule}"));
            let names = strs(rule, "/resourceNames");
            for g in strs(rule, "/apiGroups") {
                for r in strs(rule, "/resources") {
                    let Some(options) = allowed.get(&(g.as_str(), r.as_str())) else {
                        p.0.push(format!(
                            "{w}: grants {r:?} in API group {g:?}, which Ballast does not need"
                        ));
                        continue;
                    };
                    let verbs = strs(rule, "/verbs");
                    let fits = options.iter().any(|(ok_verbs, ok_names)| {
                        verbs.iter().all(|v| ok_verbs.contains(&v.as_str()))
                            && (ok_names.is_empty()
                                || (!names.is_empty()
                                    && names.iter().all(|n| ok_names.contains(&n.as_str()))))
                    });
                    p.check(fits, || {
                        format!(
                            "{w}: {verbs:?} on {r:?} (resourceNames {names:?}) is more than Ballast needs"
                        )
                    });
                    if r == "secrets" || r == "configmaps" {
                        p.check(kind(role) == "Role" && s(role, "/metadata/namespace") == Some(NS), || {
                            format!("{w}: {r} may only be granted by a Role in {NS}")
                        });
                    }
                }
            }
        }
    }
    for b in objs.iter().filter(|o| kind(o) == "ClusterRoleBinding" || kind(o) == "RoleBinding") {
        let w = format!("{variant}: {}", describe(b));
        let role_kind = s(b, "/roleRef/kind").unwrap_or("");
        p.check(find(objs, role_kind, s(b, "/roleRef/name").unwrap_or("")).is_some(), || {
            format!("{w}: binds a {role_kind} that is not in the rendering")
        });
        for sub in arr(b, "/subjects") {
            p.check(
                s(sub, "/kind") == Some("ServiceAccount")
                    && s(sub, "/namespace").or(s(b, "/metadata/namespace")) == Some(NS)
                    && matches!(s(sub, "/name"), Some("ballast-control-plane" | "ballast-injector")),
                || format!("{w}: binds {sub}, not one of Ballast's ServiceAccounts"),
            );
        }
    }

    // What each ServiceAccount ends up with: exactly what it needs.
    const READ: [&str; 3] = ["get", "list", "watch"];
    let mut control_plane = BTreeSet::new();
    for v in READ {
        control_plane.insert(grant("ballast.io", "resiliencepolicies", v, &[]));
        control_plane.insert(grant("", "services", v, &[]));
        control_plane.insert(grant("discovery.k8s.io", "endpointslices", v, &[]));
    }
    control_plane.insert(grant("ballast.io", "resiliencepolicies/status", "patch", &[]));
    control_plane.insert(grant("ballast.io", "resiliencepolicies/status", "update", &[]));
    // Workload identity: TokenReviews of the sidecars' tokens, the trust anchors'
    // ConfigMap, and (unless cert-manager supplies the CA as files) the CA's Secret.
    control_plane.insert(grant("authentication.k8s.io", "tokenreviews", "create", &[]));
    control_plane.insert(grant("", "configmaps", "create", &[]));
    control_plane.insert(grant("", "configmaps", "get", &[TRUST_ANCHORS.0]));
    control_plane.insert(grant("", "configmaps", "update", &[TRUST_ANCHORS.0]));
    if variant != "cert-manager" {
        control_plane.insert(grant("", "secrets", "create", &[]));
        control_plane.insert(grant("", "secrets", "get", &[CA_SECRET]));
        control_plane.insert(grant("", "secrets", "update", &[CA_SECRET]));
    }
    let got = grants_of(objs, "ballast-control-plane");
    p.check(got == control_plane, || {
        format!("{variant}: the control plane's grants differ from what it needs:\n    got  {got:?}\n    want {control_plane:?}")
    });

    let mut injector: BTreeSet<Grant> = READ.iter().map(|v| grant("", "namespaces", v, &[])).collect();
    if variant != "cert-manager" {
        let webhook = ["ballast-injector"];
        injector.insert(grant(
            "admissionregistration.k8s.io",
            "mutatingwebhookconfigurations",
            "get",
            &webhook,
        ));
        injector.insert(grant(
            "admissionregistration.k8s.io",
            "mutatingwebhookconfigurations",
            "patch",
            &webhook,
        ));
        injector.insert(grant("", "secrets", "create", &[]));
        injector.insert(grant("", "secrets", "get", &["ballast-injector-tls"]));
        injector.insert(grant("", "secrets", "update", &["ballast-injector-tls"]));
    }
    let got = grants_of(objs, "ballast-injector");
    p.check(got == injector, || {
        format!("{variant}: the injector's grants differ from what it needs:\n    got  {got:?}\n    want {injector:?}")
    });
}

fn check_webhook(variant: &str, objs: &[Value], p: &mut Problems) {
    let hooks: Vec<&Value> = of_kind(objs, "MutatingWebhookConfiguration").collect();
    p.check(hooks.len() == 1, || format!("{variant}: {} MutatingWebhookConfigurations, want 1", hooks.len()));
    let Some(cfg) = find(objs, "MutatingWebhookConfiguration", "ballast-injector") else {
        p.0.push(format!("{variant}: no MutatingWebhookConfiguration ballast-injector"));
        return;
    };
    let webhooks = arr(cfg, "/webhooks");
    p.check(webhooks.len() == 1, || {
        format!("{variant}: {} webhooks in ballast-injector, want 1", webhooks.len())
    });
    let Some(h) = webhooks.first() else { return };
    let w = format!("{variant}: webhook {}", s(h, "/name").unwrap_or("?"));
    let expect = [
        ("/name", "inject.ballast.io"),
        ("/failurePolicy", "Ignore"),
        ("/sideEffects", "None"),
        ("/reinvocationPolicy", "Never"),
        ("/matchPolicy", "Equivalent"),
        ("/clientConfig/service/name", "ballast-injector"),
        ("/clientConfig/service/namespace", NS),
        ("/clientConfig/service/path", "/inject"),
    ];
    for (ptr, want) in expect {
        p.check(s(h, ptr) == Some(want), || format!("{w}: {ptr} is {:?}, want {want:?}", s(h, ptr)));
    }
    p.check(h.pointer("/clientConfig/service/port").and_then(Value::as_u64) == Some(443), || {
        format!("{w}: clientConfig.service.port is not 443")
    });
    p.check(h.pointer("/clientConfig/url").is_none(), || format!("{w}: calls a URL, not the Service"));
    // The injector (or cert-manager) fills caBundle; a value here would be re-applied over it.
    p.check(s(h, "/clientConfig/caBundle").is_none_or(str::is_empty), || {
        format!("{w}: caBundle set in the manifest would overwrite the injected one on every apply")
    });
    let timeout = h.pointer("/timeoutSeconds").and_then(Value::as_u64);
    p.check(matches!(timeout, Some(1..=10)), || format!("{w}: timeoutSeconds {timeout:?}, want 1-10, set"));
    p.check(strs(h, "/admissionReviewVersions") == ["v1"], || {
        format!("{w}: admissionReviewVersions must be [v1]")
    });
    let rules = arr(h, "/rules");
    p.check(rules.len() == 1, || format!("{w}: {} rules, want 1", rules.len()));
    for r in rules {
        p.check(
            strs(r, "/operations") == ["CREATE"]
                && strs(r, "/apiGroups") == [""]
                && strs(r, "/apiVersions") == ["v1"]
                && strs(r, "/resources") == ["pods"],
            || format!("{w}: rule {r} is not pods CREATE (core v1)"),
        );
    }
    let sel = h.pointer("/namespaceSelector").cloned().unwrap_or(Value::Null);
    let excluded: BTreeSet<String> = arr(&sel, "/matchExpressions")
        .iter()
        .filter(|e| s(e, "/key") == Some("kubernetes.io/metadata.name") && s(e, "/operator") == Some("NotIn"))
        .flat_map(|e| strs(e, "/values"))
        .collect();
    for ns in ["kube-system", NS] {
        p.check(excluded.contains(ns), || format!("{w}: namespaceSelector does not exclude {ns}"));
    }
    // Opt-in is the injector's decision (pod annotation or namespace label), so the
    // selector must not require the label.
    p.check(sel.pointer("/matchLabels").is_none(), || format!("{w}: namespaceSelector requires labels"));
    for e in arr(&sel, "/matchExpressions") {
        p.check(
            s(e, "/key") == Some("kubernetes.io/metadata.name") && s(e, "/operator") == Some("NotIn"),
            || format!("{w}: namespaceSelector expression {e} would keep opted-in pods from the injector"),
        );
    }
    p.check(h.pointer("/objectSelector").is_none(), || {
        format!("{w}: an objectSelector would hide pods from the injector")
    });

    // The Service it calls exists and leads to the injector's HTTPS port.
    let svc = find(objs, "Service", "ballast-injector");
    let port = svc.and_then(|svc| {
        arr(svc, "/spec/ports").iter().find(|pt| pt.pointer("/port").and_then(Value::as_u64) == Some(443))
    });
    p.check(port.is_some(), || format!("{variant}: Service ballast-injector has no port 443"));
    let injector = find(objs, "Deployment", "ballast-injector").and_then(|d| container(d, "injector"));
    if let (Some(port), Some(c)) = (port, injector) {
        let target = port.pointer("/targetPort").cloned().unwrap_or(Value::Null);
        let hit = arr(c, "/ports").iter().any(|cp| {
            (target.as_str().is_some() && cp.pointer("/name") == Some(&target))
                || (target.as_u64().is_some() && cp.pointer("/containerPort") == Some(&target))
        });
        p.check(hit, || {
            format!("{variant}: Service ballast-injector's targetPort {target} is no port of the injector")
        });
        p.check(
            arr(c, "/ports")
                .iter()
                .any(|cp| cp.pointer("/containerPort").and_then(Value::as_u64) == Some(8443)),
            || format!("{variant}: the injector does not listen on 8443"),
        );
    }
}

/// The long flags `binary --help` lists (the built binary, `target/<profile>/`), each with
/// whether it takes a value (`--flag <VALUE>`) or is a switch.
fn help_flags(binary: &str) -> BTreeMap<String, bool> {
    let path = support::binary(binary);
    let out = Command::new(&path)
        .arg("--help")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", path.display()));
    assert!(out.status.success(), "{} --help failed:\n{}", path.display(), output_text(&out));
    let help = String::from_utf8(out.stdout).expect("--help prints UTF-8");
    // clap lists each option on a line of its own ("  -h, --help", "      --addr <ADDR>");
    // the descriptions under it are indented further and may name other flags.
    let flags: BTreeMap<String, bool> = help
        .lines()
        .filter(|l| l.len() - l.trim_start().len() <= 6 && l.trim_start().starts_with('-'))
        .filter_map(|l| {
            let mut words = l.split_whitespace().skip_while(|w| !w.starts_with("--"));
            let flag = words.next()?.trim_end_matches(',').to_owned();
            Some((flag, words.next().is_some_and(|w| w.starts_with('<'))))
        })
        .collect();
    assert!(flags.contains_key("--help"), "no flags found in {} --help:\n{help}", path.display());
    flags
}

/// The `--flag`s in `args` are flags the built binary lists in its `--help`, given a value
/// (`--flag=VALUE`, or the next argument) when it takes one and none when it is a switch,
/// so a renamed flag fails here rather than in a crash-looping pod.
fn check_flags(w: &str, args: &[String], binary: &str, p: &mut Problems) {
    let known = help_flags(binary);
    for (i, a) in args.iter().enumerate().filter(|(_, a)| a.starts_with("--")) {
        let (flag, value) = match a.split_once('=') {
            Some((flag, _)) => (flag, true),
            None => (a.as_str(), args.get(i + 1).is_some_and(|next| !next.starts_with('-'))),
        };
        match known.get(flag) {
            None => p.0.push(format!("{w}: {binary} has no flag {flag} (see {binary} --help)")),
            Some(&takes) => p.check(takes == value, || {
                let want = if takes { "takes a value" } else { "is a switch, given no value" };
                format!("{w}: {flag} {want} ({a:?})")
            }),
        }
    }
}

/// The pod volume a container mounts at the directory holding `file`, when `file` is
/// that directory plus one name: (volume, the file's name in it).
fn volume_of_file<'a>(pod: &'a Value, c: &Value, file: &str) -> Option<(&'a Value, String)> {
    let (dir, name) = file.rsplit_once('/')?;
    let mount = arr(c, "/volumeMounts")
        .iter()
        .find(|m| s(m, "/mountPath").map(|p| p.trim_end_matches('/')) == Some(dir))?;
    let volume = arr(pod, "/volumes").iter().find(|v| v.pointer("/name") == mount.pointer("/name"))?;
    (mount.pointer("/readOnly") == Some(&Value::Bool(true))).then(|| (volume, name.to_owned()))
}

/// Whether `name` in a Secret or ConfigMap volume is its key `key` (directly, or through
/// `items`).
fn volume_file_is_key(source: &Value, name: &str, key: &str) -> bool {
    let items = arr(source, "/items");
    if items.is_empty() {
        name == key
    } else {
        items.iter().any(|i| s(i, "/path") == Some(name) && s(i, "/key") == Some(key))
    }
}

/// The value of `--flag=VALUE` in `args`.
fn flag_value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter().find_map(|a| a.strip_prefix(flag).and_then(|v| v.strip_prefix('=')))
}

fn has_pdb(objs: &[Value], app: &str, min_available: u64) -> bool {
    of_kind(objs, "PodDisruptionBudget").any(|pdb| {
        s(pdb, "/spec/selector/matchLabels/app.kubernetes.io~1name") == Some(app)
            && pdb.pointer("/spec/minAvailable").and_then(Value::as_u64) == Some(min_available)
    })
}

fn prefers_spreading_by_host(pod: &Value) -> bool {
    arr(pod, "/affinity/podAntiAffinity/preferredDuringSchedulingIgnoredDuringExecution")
        .iter()
        .any(|t| s(t, "/podAffinityTerm/topologyKey") == Some("kubernetes.io/hostname"))
}

fn check_control_plane(variant: &str, objs: &[Value], p: &mut Problems) {
    let Some(d) = find(objs, "Deployment", "ballast-control-plane") else {
        p.0.push(format!("{variant}: no Deployment ballast-control-plane"));
        return;
    };
    let w = format!("{variant}: Deployment ballast-control-plane");
    p.check(d.pointer("/spec/replicas").and_then(Value::as_u64) == Some(2), || {
        format!("{w}: replicas is not 2")
    });
    p.check(has_pdb(objs, "ballast-control-plane", 1), || {
        format!("{variant}: no PodDisruptionBudget with minAvailable 1 for the control plane")
    });
    let pod = pod_spec(d).expect("pod spec");
    p.check(prefers_spreading_by_host(pod), || format!("{w}: no preferred anti-affinity by hostname"));
    p.check(s(pod, "/serviceAccountName") == Some("ballast-control-plane"), || {
        format!("{w}: wrong ServiceAccount")
    });
    let Some(c) = container(d, "control-plane") else {
        p.0.push(format!("{w}: no container control-plane"));
        return;
    };
    let args = strs(c, "/args");
    for want in [
        "--grpc-addr=0.0.0.0:8086",
        "--admin-addr=0.0.0.0:9990",
        "--kubernetes",
        "--replica=$(POD_NAME)",
        "--etcd=$(BALLAST_ETCD)",
    ] {
        p.check(args.iter().any(|a| a == want), || format!("{w}: args {args:?} lack {want}"));
    }
    check_flags(&w, &args, "ballast-control-plane", p);
    p.check(
        env_var(c, "POD_NAME").and_then(|e| s(e, "/valueFrom/fieldRef/fieldPath")) == Some("metadata.name"),
        || format!("{w}: POD_NAME does not come from the downward API"),
    );
    // The CA's Secret and the published anchors live in the control plane's namespace,
    // which it reads from POD_NAMESPACE.
    p.check(
        env_var(c, "POD_NAMESPACE").and_then(|e| s(e, "/valueFrom/fieldRef/fieldPath"))
            == Some("metadata.namespace"),
        || format!("{w}: POD_NAMESPACE does not come from the downward API"),
    );
    // With workload identity both ports speak TLS: the probes too.
    for (probe, path) in [("livenessProbe", "/live"), ("readinessProbe", "/ready")] {
        let port = c.pointer(&format!("/{probe}/httpGet/port")).cloned().unwrap_or(Value::Null);
        p.check(
            s(c, &format!("/{probe}/httpGet/path")) == Some(path)
                && s(c, &format!("/{probe}/httpGet/scheme")) == Some("HTTPS")
                && (port == "admin" || port == 9990),
            || format!("{w}: {probe} is not HTTPS {path} on the admin port"),
        );
    }
    check_control_plane_identity(variant, objs, pod, c, &args, p);
    // etcd's URLs come from the ballast-etcd-endpoints ConfigMap (one place to change).
    let etcd = env_var(c, "BALLAST_ETCD").and_then(|e| e.pointer("/valueFrom/configMapKeyRef"));
    let endpoints = etcd.and_then(|r| {
        let cm = find(objs, "ConfigMap", s(r, "/name").unwrap_or(""))?;
        s(cm, &format!("/data/{}", s(r, "/key").unwrap_or("")))
    });
    match (variant, find(objs, "StatefulSet", "ballast-etcd")) {
        ("external-etcd", sts) => {
            p.check(sts.is_none(), || format!("{variant}: still runs the bundled etcd"));
            p.check(endpoints.is_some_and(|e| !e.contains("ballast-etcd")), || {
                format!("{variant}: the control plane still points at the bundled etcd: {endpoints:?}")
            });
        }
        (_, Some(sts)) => {
            let n = sts.pointer("/spec/replicas").and_then(Value::as_u64).unwrap_or(0);
            let want: Vec<String> =
                (0..n).map(|i| format!("http://ballast-etcd-{i}.ballast-etcd.{NS}.svc:2379")).collect();
            p.check(endpoints == Some(want.join(",").as_str()), || {
                format!("{variant}: the control plane's etcd endpoints {endpoints:?} are not the {n} members {want:?}")
            });
        }
        (_, None) => p.0.push(format!("{variant}: no StatefulSet ballast-etcd")),
    }
    let svc = find(objs, "Service", "ballast-control-plane");
    let ports = svc.map(|svc| arr(svc, "/spec/ports")).unwrap_or(&[]);
    let port = |n: u64| ports.iter().find(|pt| pt.pointer("/port").and_then(Value::as_u64) == Some(n));
    p.check(port(8086).is_some_and(|pt| s(pt, "/appProtocol") == Some("grpc")), || {
        format!("{variant}: Service ballast-control-plane lacks port 8086 with appProtocol grpc")
    });
    p.check(port(9990).is_some_and(|pt| s(pt, "/appProtocol") == Some("https")), || {
        format!("{variant}: Service ballast-control-plane lacks the admin port 9990 with appProtocol https")
    });
}

/// The control plane runs with workload identity: its CA from the Secret it manages, or
/// (cert-manager) from a cert-manager CA Certificate mounted as files; the admin token
/// from the Secret ballast-admin-token.
fn check_control_plane_identity(
    variant: &str,
    objs: &[Value],
    pod: &Value,
    c: &Value,
    args: &[String],
    p: &mut Problems,
) {
    let w = format!("{variant}: Deployment ballast-control-plane");
    p.check(args.iter().any(|a| a == "--identity"), || format!("{w}: args {args:?} lack --identity"));
    if variant == "cert-manager" {
        p.check(flag_value(args, "--ca-secret").is_none(), || format!("{w}: still keeps its CA in a Secret"));
        let cert = find(objs, "Certificate", "ballast-identity-ca");
        p.check(
            cert.is_some_and(|c| {
                c.pointer("/spec/isCA") == Some(&Value::Bool(true))
                    && s(c, "/spec/privateKey/encoding") == Some("PKCS8")
                    && s(c, "/spec/privateKey/rotationPolicy") == Some("Never")
            }),
            || {
                format!(
                    "{variant}: no CA Certificate ballast-identity-ca with a PKCS#8 key that is never rotated"
                )
            },
        );
        let secret = cert.and_then(|c| s(c, "/spec/secretName"));
        for (flag, key) in [("--ca-cert", "tls.crt"), ("--ca-key", "tls.key")] {
            let file = flag_value(args, flag);
            let ok = file.and_then(|f| volume_of_file(pod, c, f)).is_some_and(|(v, name)| {
                secret.is_some()
                    && s(v, "/secret/secretName") == secret
                    && volume_file_is_key(&v["secret"], &name, key)
            });
            p.check(ok, || {
                format!("{w}: {flag} {file:?} is not the key {key} of the Certificate's Secret {secret:?}, mounted read-only")
            });
        }
    } else {
        p.check(flag_value(args, "--ca-secret") == Some(CA_SECRET), || {
            format!("{w}: args {args:?} lack --ca-secret={CA_SECRET}")
        });
    }
    let file = flag_value(args, "--admin-token-file");
    let mounted = file.and_then(|f| volume_of_file(pod, c, f)).is_some_and(|(v, name)| {
        s(v, "/secret/secretName") == Some(ADMIN_TOKEN.0)
            && v.pointer("/secret/optional") != Some(&Value::Bool(true))
            && volume_file_is_key(&v["secret"], &name, ADMIN_TOKEN.1)
    });
    p.check(mounted, || {
        format!(
            "{w}: --admin-token-file {file:?} is not the key {} of the Secret {} (required), mounted read-only",
            ADMIN_TOKEN.1, ADMIN_TOKEN.0
        )
    });
    // The Secret files are mode 0440: readable through the pod's fsGroup only.
    p.check(pod.pointer("/securityContext/fsGroup").and_then(Value::as_u64) == Some(65532), || {
        format!("{w}: no fsGroup 65532, so the control plane (UID 65532) cannot read its Secret files")
    });
}

fn check_etcd(variant: &str, objs: &[Value], p: &mut Problems) {
    let Some(sts) = find(objs, "StatefulSet", "ballast-etcd") else {
        return; // external-etcd: checked with the control plane
    };
    let w = format!("{variant}: StatefulSet ballast-etcd");
    let n = sts.pointer("/spec/replicas").and_then(Value::as_u64).unwrap_or(0);
    p.check(n == 3, || format!("{w}: {n} members, want 3"));
    p.check(s(sts, "/spec/podManagementPolicy") == Some("Parallel"), || {
        format!("{w}: members must start in parallel (none is ready without a quorum)")
    });
    p.check(!arr(sts, "/spec/volumeClaimTemplates").is_empty(), || format!("{w}: no volumeClaimTemplates"));
    p.check(has_pdb(objs, "ballast-etcd", 2), || {
        format!("{variant}: no PodDisruptionBudget keeping 2 etcd members")
    });
    let headless = find(objs, "Service", s(sts, "/spec/serviceName").unwrap_or(""));
    p.check(
        headless.is_some_and(|svc| {
            s(svc, "/spec/clusterIP") == Some("None")
                && svc.pointer("/spec/publishNotReadyAddresses") == Some(&Value::Bool(true))
                && [2379, 2380].iter().all(|port| {
                    arr(svc, "/spec/ports").iter().any(|pt| pt.pointer("/port").and_then(Value::as_u64) == Some(*port))
                })
        }),
        || format!("{w}: its serviceName is not a headless Service with ports 2379 and 2380 publishing not-ready addresses"),
    );
    let args = container(sts, "etcd").map(|c| strs(c, "/args")).unwrap_or_default();
    let members: Vec<String> = (0..n)
        .map(|i| format!("ballast-etcd-{i}=http://ballast-etcd-{i}.ballast-etcd.$(POD_NAMESPACE).svc:2380"))
        .collect();
    let initial = format!("--initial-cluster={}", members.join(","));
    p.check(args.contains(&initial), || format!("{w}: args lack {initial}"));
    for want in ["--name=$(POD_NAME)", "--initial-cluster-state=new", "--data-dir=/var/lib/etcd/data"] {
        p.check(args.iter().any(|a| a == want), || format!("{w}: args lack {want}"));
    }
}

fn check_injector(variant: &str, objs: &[Value], proxy_image: &str, p: &mut Problems) {
    let Some(d) = find(objs, "Deployment", "ballast-injector") else {
        p.0.push(format!("{variant}: no Deployment ballast-injector"));
        return;
    };
    let w = format!("{variant}: Deployment ballast-injector");
    p.check(d.pointer("/spec/replicas").and_then(Value::as_u64) == Some(2), || {
        format!("{w}: replicas is not 2")
    });
    p.check(has_pdb(objs, "ballast-injector", 1), || {
        format!("{variant}: no PodDisruptionBudget with minAvailable 1 for the injector")
    });
    let pod = pod_spec(d).expect("pod spec");
    p.check(prefers_spreading_by_host(pod), || format!("{w}: no preferred anti-affinity by hostname"));
    let Some(c) = container(d, "injector") else {
        p.0.push(format!("{w}: no container injector"));
        return;
    };
    let args = strs(c, "/args");
    check_flags(&w, &args, "ballast-injector", p);
    let mut want = vec![
        "--addr=0.0.0.0:8443".to_owned(),
        "--proxy-image=$(PROXY_IMAGE)".to_owned(),
        format!("--control-plane-url={CONTROL_PLANE_URL}"),
    ];
    // The trust anchors: the control plane's ConfigMap, mounted (optional, so the injector
    // starts before it exists), read from the file its key becomes.
    let anchors = flag_value(&args, "--identity-trust-anchors-file");
    let mounted = anchors.and_then(|f| volume_of_file(pod, c, f)).is_some_and(|(v, name)| {
        s(v, "/configMap/name") == Some(TRUST_ANCHORS.0)
            && v.pointer("/configMap/optional") == Some(&Value::Bool(true))
            && volume_file_is_key(&v["configMap"], &name, TRUST_ANCHORS.1)
    });
    p.check(mounted, || {
        format!(
            "{w}: --identity-trust-anchors-file {anchors:?} is not the key {} of the ConfigMap {} (optional), mounted read-only",
            TRUST_ANCHORS.1, TRUST_ANCHORS.0
        )
    });
    if variant == "cert-manager" {
        want.extend([
            "--tls-cert=/etc/ballast/tls/tls.crt".into(),
            "--tls-key=/etc/ballast/tls/tls.key".into(),
        ]);
        p.check(
            !args.iter().any(|a| a.starts_with("--tls-secret") || a.starts_with("--webhook-config")),
            || format!("{w}: still generates its certificate: {args:?}"),
        );
        let cert = find(objs, "Certificate", "ballast-injector");
        let secret = cert.and_then(|c| s(c, "/spec/secretName"));
        p.check(
            cert.is_some_and(|c| strs(c, "/spec/dnsNames").contains(&format!("ballast-injector.{NS}.svc"))),
            || format!("{variant}: no Certificate ballast-injector for ballast-injector.{NS}.svc"),
        );
        let volume =
            arr(pod, "/volumes").iter().find(|v| secret.is_some() && s(v, "/secret/secretName") == secret);
        let mounted = volume.is_some_and(|v| {
            arr(c, "/volumeMounts").iter().any(|m| {
                m.pointer("/name") == v.pointer("/name") && s(m, "/mountPath") == Some("/etc/ballast/tls")
            })
        });
        p.check(mounted, || {
            format!("{w}: the certificate's Secret {secret:?} is not mounted at /etc/ballast/tls")
        });
        let annotation = find(objs, "MutatingWebhookConfiguration", "ballast-injector")
            .and_then(|h| s(h, "/metadata/annotations/cert-manager.io~1inject-ca-from"));
        p.check(annotation == Some("ballast-system/ballast-injector"), || {
            format!("{variant}: webhook annotation cert-manager.io/inject-ca-from is {annotation:?}")
        });
    } else {
        want.extend([
            "--webhook-config=ballast-injector".into(),
            "--tls-secret=ballast-injector-tls".into(),
            "--service-name=ballast-injector".into(),
        ]);
    }
    for a in &want {
        p.check(args.contains(a), || format!("{w}: args {args:?} lack {a}"));
    }
    p.check(env_var(c, "PROXY_IMAGE").and_then(|e| s(e, "/value")) == Some(proxy_image), || {
        format!("{w}: PROXY_IMAGE is not {proxy_image} (the proxy image of base/kustomization.yaml)")
    });
    p.check(
        env_var(c, "POD_NAMESPACE").and_then(|e| s(e, "/valueFrom/fieldRef/fieldPath"))
            == Some("metadata.namespace"),
        || format!("{w}: POD_NAMESPACE does not come from the downward API"),
    );
    for (probe, path) in [("livenessProbe", "/live"), ("readinessProbe", "/ready")] {
        p.check(
            s(c, &format!("/{probe}/httpGet/path")) == Some(path)
                && s(c, &format!("/{probe}/httpGet/scheme")) == Some("HTTPS"),
            || format!("{w}: {probe} is not HTTPS {path}"),
        );
    }
}

fn check_monitoring(variant: &str, objs: &[Value], p: &mut Problems) {
    let monitoring: Vec<&Value> = objs
        .iter()
        .filter(|o| s(o, "/apiVersion").is_some_and(|a| a.starts_with("monitoring.coreos.com/")))
        .collect();
    if variant == "no-prometheus-operator" {
        p.check(monitoring.is_empty(), || format!("{variant}: still has Prometheus Operator objects"));
    } else {
        let proxies = of_kind(objs, "PodMonitor").find(|m| {
            s(m, "/spec/selector/matchLabels/ballast.io~1injected") == Some("true")
                && m.pointer("/spec/namespaceSelector/any") == Some(&Value::Bool(true))
                && arr(m, "/spec/podMetricsEndpoints").iter().any(|e| {
                    s(e, "/port") == Some("ballast-admin")
                        && s(e, "/path").unwrap_or("/metrics") == "/metrics"
                })
        });
        p.check(proxies.is_some(), || {
            format!("{variant}: no PodMonitor scraping ballast-admin /metrics of pods labelled ballast.io/injected=true in every namespace")
        });
        let cp = of_kind(objs, "PodMonitor").find(|m| {
            s(m, "/spec/selector/matchLabels/app.kubernetes.io~1name") == Some("ballast-control-plane")
                && arr(m, "/spec/podMetricsEndpoints").iter().any(|e| s(e, "/port") == Some("admin"))
        });
        p.check(cp.is_some(), || format!("{variant}: no PodMonitor for the control plane's admin port"));
        // The control plane's admin port speaks TLS with a certificate from the mesh's CA.
        let verified = cp.is_some_and(|m| {
            arr(m, "/spec/podMetricsEndpoints").iter().all(|e| {
                s(e, "/scheme") == Some("https")
                    && s(e, "/tlsConfig/serverName") == Some(&format!("ballast-control-plane.{NS}.svc"))
                    && s(e, "/tlsConfig/ca/configMap/name") == Some(TRUST_ANCHORS.0)
                    && s(e, "/tlsConfig/ca/configMap/key") == Some(TRUST_ANCHORS.1)
                    && e.pointer("/tlsConfig/insecureSkipVerify") != Some(&Value::Bool(true))
            })
        });
        p.check(verified, || {
            format!("{variant}: the control plane PodMonitor does not scrape https verified against the ConfigMap {}", TRUST_ANCHORS.0)
        });
        // The sidecars' admin port stays plain HTTP.
        p.check(
            proxies.is_some_and(|m| {
                arr(m, "/spec/podMetricsEndpoints")
                    .iter()
                    .all(|e| s(e, "/scheme").unwrap_or("http") == "http")
            }),
            || format!("{variant}: the sidecar PodMonitor does not scrape plain http"),
        );
        p.check(find(objs, "PrometheusRule", "ballast-alerts").is_some(), || {
            format!("{variant}: no PrometheusRule ballast-alerts")
        });
    }
    let dashboard = find(objs, "ConfigMap", "ballast-grafana-dashboard");
    p.check(dashboard.is_some_and(|d| s(d, "/metadata/labels/grafana_dashboard") == Some("1")), || {
        format!("{variant}: no ConfigMap ballast-grafana-dashboard labelled grafana_dashboard=1")
    });
    let file: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("deploy/dashboards/ballast.json")).unwrap(),
    )
    .expect("deploy/dashboards/ballast.json is JSON");
    let in_cm = dashboard
        .and_then(|d| s(d, "/data/ballast.json"))
        .and_then(|j| serde_json::from_str::<Value>(j).ok());
    p.check(in_cm.as_ref() == Some(&file), || {
        format!("{variant}: the dashboard ConfigMap is not deploy/dashboards/ballast.json")
    });
}

#[test]
fn manifests_keep_the_properties_that_matter() {
    let docs = rendered();
    let kustomization = &docs["kustomization"][0];
    let refs = image_refs(kustomization);
    let images: BTreeSet<String> = refs.values().cloned().collect();
    for name in [
        "ghcr.io/ballast-mesh/proxy",
        "ghcr.io/ballast-mesh/control-plane",
        "ghcr.io/ballast-mesh/injector",
        "quay.io/coreos/etcd",
    ] {
        assert!(refs.contains_key(name), "base/kustomization.yaml's images: has no entry for {name}");
    }
    let proxy_image = &refs["ghcr.io/ballast-mesh/proxy"];

    let mut p = Problems::default();
    for (variant, objs) in docs.iter().filter(|(v, _)| v.as_str() != "kustomization") {
        if variant == "examples" {
            check_containers(variant, objs, None, &mut p);
            let ns = find(objs, "Namespace", "shop");
            p.check(
                ns.is_some_and(|n| s(n, "/metadata/labels/ballast.io~1inject") == Some("enabled")),
                || format!("{variant}: no Namespace shop labelled ballast.io/inject=enabled"),
            );
            let policy = of_kind(objs, "ResiliencePolicy").next();
            let target = policy.and_then(|pol| s(pol, "/spec/targetRef/service")).unwrap_or("");
            p.check(find(objs, "Service", target).is_some(), || {
                format!("{variant}: the policy targets no Service of the example")
            });
            // Workload identity: strict mTLS, allowing the storefront's service account,
            // which storefront really runs as.
            let inbound = policy.and_then(|pol| pol.pointer("/spec/inbound"));
            p.check(
                inbound.is_some_and(|i| {
                    s(i, "/mtls") == Some("strict") && strs(i, "/allow") == ["shop/storefront"]
                }),
                || format!("{variant}: the policy's inbound is not mtls: strict, allow: [shop/storefront]"),
            );
            let storefront = find(objs, "Deployment", "storefront").and_then(pod_spec);
            p.check(
                storefront.is_some_and(|pod| s(pod, "/serviceAccountName") == Some("storefront"))
                    && find(objs, "ServiceAccount", "storefront").is_some(),
                || format!("{variant}: storefront does not run as its own ServiceAccount storefront"),
            );
            // The kubelet's HTTP probes are plain text, which strict mTLS refuses.
            let payments = find(objs, "Deployment", target).and_then(pod_spec);
            p.check(
                payments.is_some_and(|pod| containers(pod).all(|c| c.pointer("/readinessProbe/httpGet").is_none())),
                || format!("{variant}: {target} has an HTTP readiness probe, which its strict mTLS policy refuses"),
            );
            for o in objs.iter().filter(|o| kind(o) != "Namespace") {
                p.check(s(o, "/metadata/namespace") == Some("shop"), || {
                    format!("{variant}: {} is not in shop", describe(o))
                });
            }
            continue;
        }
        check_containers(variant, objs, Some(&images), &mut p);
        check_rbac(variant, objs, &mut p);
        check_webhook(variant, objs, &mut p);
        check_control_plane(variant, objs, &mut p);
        check_etcd(variant, objs, &mut p);
        check_injector(variant, objs, proxy_image, &mut p);
        check_monitoring(variant, objs, &mut p);
        let ns = find(objs, "Namespace", NS);
        p.check(
            ns.is_some_and(|n| {
                s(n, "/metadata/labels/pod-security.kubernetes.io~1enforce") == Some("restricted")
            }),
            || format!("{variant}: Namespace {NS} does not enforce the restricted Pod Security Standard"),
        );
        for o in objs {
            let cluster_scoped = matches!(
                kind(o),
                "Namespace"
                    | "ClusterRole"
                    | "ClusterRoleBinding"
                    | "CustomResourceDefinition"
                    | "MutatingWebhookConfiguration"
            );
            p.check(cluster_scoped || s(o, "/metadata/namespace") == Some(NS), || {
                format!("{variant}: {} is not in {NS}", describe(o))
            });
        }
        // Every image of base/kustomization.yaml is used (the proxy through PROXY_IMAGE).
        let used: BTreeSet<String> = objs
            .iter()
            .filter_map(pod_spec)
            .flat_map(|pod| {
                containers(pod).map(|c| s(c, "/image").unwrap_or("").to_owned()).collect::<Vec<_>>()
            })
            .chain(std::iter::once(proxy_image.clone()))
            .collect();
        for (name, full) in &refs {
            if variant == "external-etcd" && name == "quay.io/coreos/etcd" {
                continue;
            }
            p.check(used.contains(full), || {
                format!("{variant}: images entry {name} ({full}) is used by no container")
            });
        }
    }
    p.check(
        find(&docs["deploy"], "CustomResourceDefinition", "resiliencepolicies.ballast.io").is_some(),
        || "deploy: no ResiliencePolicy CRD".into(),
    );

    // The sources name images without a tag: the tag comes from `images:` only.
    for dir in ["deploy/etcd", "deploy/control-plane", "deploy/injector", "deploy/base"] {
        for entry in std::fs::read_dir(root().join(dir)).expect("read deploy dir") {
            let path = entry.expect("dir entry").path();
            if path.extension().is_none_or(|e| e != "yaml") || path.ends_with("kustomization.yaml") {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("read manifest");
            for (i, line) in text.lines().enumerate() {
                let t = line.trim_start().trim_start_matches("- ");
                let value = t.strip_prefix("image:").or_else(|| t.strip_prefix("value:")).map(str::trim);
                if let Some(v) = value.filter(|v| refs.keys().any(|n| v.starts_with(n.as_str()))) {
                    p.check(!v.contains('@') && !v[v.rfind('/').unwrap_or(0)..].contains(':'), || {
                        format!(
                            "{}:{}: {v} carries a tag; set it in base/kustomization.yaml's images:",
                            path.display(),
                            i + 1
                        )
                    });
                }
            }
        }
    }

    // The injector really labels and names what the PodMonitor selects.
    let injector_src: String = ["injector/src/annotations.rs", "injector/src/inject.rs"]
        .iter()
        .map(|f| std::fs::read_to_string(root().join(f)).unwrap_or_default())
        .collect();
    for needle in ["\"ballast.io/injected\"", "\"ballast-admin\""] {
        p.check(injector_src.contains(needle), || {
            format!("the injector's source never says {needle}, which the PodMonitor selects")
        });
    }
    // The control plane publishes the ConfigMap the injector and the scrape read.
    let control_plane_src = rust_sources(&root().join("control-plane/src"));
    for needle in [TRUST_ANCHORS.0, TRUST_ANCHORS.1] {
        p.check(control_plane_src.contains(&format!("\"{needle}\"")), || {
            format!("the control plane's source never says {needle:?}, which the injector mounts and the PodMonitor trusts")
        });
    }
    p.assert_none("deploy/ manifests");
}

/// Every `.rs` file under `dir`, concatenated.
fn rust_sources(dir: &Path) -> String {
    let mut out = String::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.push_str(&rust_sources(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push_str(&std::fs::read_to_string(&path).unwrap_or_default());
        }
    }
    out
}

// ---- 3. alerts and dashboard ------------------------------------------------------------

/// The source files that define metrics: the names in them are the only real ones.
const METRICS_SOURCES: &[&str] =
    &["sidecar/src/metrics.rs", "control-plane/src/metrics.rs", "injector/src/server.rs"];

/// Metric and label names Prometheus itself adds to every scrape.
const PROMETHEUS_METRICS: &[&str] = &["up"];
const TARGET_LABELS: &[&str] = &["job", "namespace", "pod", "container", "instance", "endpoint", "le"];

/// PromQL keywords and functions that look like identifiers.
const PROMQL_WORDS: &[&str] = &[
    "sum",
    "max",
    "min",
    "avg",
    "count",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "rate",
    "irate",
    "increase",
    "absent",
    "histogram_quantile",
    "min_over_time",
    "max_over_time",
    "vector",
    "label_values",
    "bool",
    "offset",
];

/// Identifiers of a PromQL expression outside string literals, each with whether it
/// stands inside a selector's braces (where identifiers are label names).
fn promql_identifiers(expr: &str) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    let mut chars = expr.chars();
    let mut cur = String::new();
    let mut in_braces = false;
    while let Some(c) = chars.next() {
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' || c == '$' {
            cur.push(c);
            continue;
        }
        if !cur.is_empty() {
            out.push((std::mem::take(&mut cur), in_braces));
        }
        match c {
            '"' | '\'' => {
                while let Some(d) = chars.next() {
                    if d == '\\' {
                        chars.next();
                    } else if d == c {
                        break;
                    }
                }
            }
            '{' => in_braces = true,
            '}' => in_braces = false,
            _ => {}
        }
    }
    if !cur.is_empty() {
        out.push((cur, in_braces));
    }
    out
}

/// Label names an expression uses: in selectors, and in the parentheses after
/// by/without/on/ignoring/group_left/group_right.
fn promql_labels(expr: &str) -> BTreeSet<String> {
    let mut labels: BTreeSet<String> =
        promql_identifiers(expr).into_iter().filter(|(_, in_braces)| *in_braces).map(|(id, _)| id).collect();
    for kw in ["by", "without", "on", "ignoring", "group_left", "group_right"] {
        let mut rest = expr;
        while let Some(i) = find_word(rest, kw) {
            let after = rest[i + kw.len()..].trim_start();
            if let Some(list) = after.strip_prefix('(') {
                let end = list.find(')').unwrap_or(list.len());
                labels.extend(
                    list[..end].split(',').map(str::trim).filter(|l| !l.is_empty()).map(str::to_owned),
                );
            }
            rest = &rest[i + kw.len()..];
        }
    }
    labels
}

/// Position of `word` as a whole word in `text`.
fn find_word(text: &str, word: &str) -> Option<usize> {
    let is_id = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut from = 0;
    while let Some(i) = text[from..].find(word).map(|i| i + from) {
        let before = text[..i].chars().next_back();
        let after = text[i + word.len()..].chars().next();
        if !before.is_some_and(is_id) && !after.is_some_and(is_id) {
            return Some(i);
        }
        from = i + word.len();
    }
    None
}

/// Metric names (string literals "ballast_...") and label names (string literals in
/// `&[...]` label lists) defined by the metrics sources.
fn defined_metrics() -> (BTreeSet<String>, BTreeSet<String>) {
    let mut metrics = BTreeSet::new();
    let mut labels = BTreeSet::new();
    for f in METRICS_SOURCES {
        let src = std::fs::read_to_string(root().join(f)).unwrap_or_else(|e| panic!("read {f}: {e}"));
        for lit in src.split('"').skip(1).step_by(2) {
            if lit.starts_with("ballast_")
                && lit.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            {
                metrics.insert(lit.to_owned());
            }
        }
        let mut rest = src.as_str();
        while let Some(i) = rest.find("&[\"") {
            let list = &rest[i + 2..];
            let end = list.find(']').unwrap_or(list.len());
            labels.extend(list[..end].split('"').skip(1).step_by(2).map(str::to_owned));
            rest = &list[end..];
        }
    }
    (metrics, labels)
}

/// Every `expr` (and templating `query`) string in a Grafana dashboard.
fn dashboard_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("expr", Value::String(e)) => out.push(e.clone()),
                    ("query", Value::String(q)) if q.contains('(') => out.push(q.clone()),
                    ("definition", Value::String(_)) => {}
                    _ => dashboard_exprs(x, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| dashboard_exprs(x, out)),
        _ => {}
    }
}

fn check_names(
    what: &str,
    expr: &str,
    metrics: &BTreeSet<String>,
    labels: &BTreeSet<String>,
    p: &mut Problems,
) {
    for (id, in_braces) in promql_identifiers(expr) {
        if in_braces || id.starts_with('$') || id.chars().next().is_some_and(|c| c.is_ascii_digit()) {
            continue;
        }
        if id.starts_with("ballast_") {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suf| id.strip_suffix(suf))
                .filter(|b| metrics.contains(*b));
            p.check(metrics.contains(&id) || base.is_some(), || {
                format!("{what}: metric {id} is defined in none of {METRICS_SOURCES:?}")
            });
        } else if !PROMQL_WORDS.contains(&id.as_str())
            && !PROMETHEUS_METRICS.contains(&id.as_str())
            && !labels.contains(&id)
            && !TARGET_LABELS.contains(&id.as_str())
        {
            p.0.push(format!("{what}: {id:?} is neither a known metric, label nor PromQL word in {expr:?}"));
        }
    }
    for l in promql_labels(expr) {
        p.check(labels.contains(&l) || TARGET_LABELS.contains(&l.as_str()), || {
            format!("{what}: label {l} is neither a label of Ballast's metrics nor a target label")
        });
    }
}

fn run(cmd: &mut Command, what: &str) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("cannot run {what} ({e}); promtool comes with Debian's prometheus package (scripts/test.sh installs it)"))
}

#[test]
fn alerts_pass_promtool_and_alerts_and_dashboard_name_real_metrics() {
    let docs = rendered();
    let rule = find(&docs["deploy"], "PrometheusRule", "ballast-alerts")
        .expect("deploy/ renders PrometheusRule ballast-alerts");
    let spec = rule.pointer("/spec").expect("spec");
    let dir = tempfile::tempdir().expect("temp dir");

    // The rules as Prometheus loads them (JSON is YAML).
    let rules = dir.path().join("ballast-alerts.yaml");
    std::fs::write(&rules, serde_json::to_vec_pretty(spec).unwrap()).unwrap();
    let out = run(Command::new("promtool").args(["check", "rules"]).arg(&rules), "promtool");
    assert!(out.status.success(), "promtool check rules:\n{}", output_text(&out));

    // Their unit tests, on the rules without annotations (see the test file's header).
    let mut bare = spec.clone();
    for g in bare["groups"].as_array_mut().unwrap() {
        for r in g["rules"].as_array_mut().unwrap() {
            r.as_object_mut().unwrap().remove("annotations");
        }
    }
    std::fs::write(dir.path().join("rules.yaml"), serde_json::to_vec_pretty(&bare).unwrap()).unwrap();
    let tests = dir.path().join("prometheusrule-tests.yaml");
    std::fs::copy(root().join("deploy/monitoring/prometheusrule-tests.yaml"), &tests).unwrap();
    let out =
        run(Command::new("promtool").args(["test", "rules"]).arg(&tests).current_dir(dir.path()), "promtool");
    assert!(
        out.status.success(),
        "promtool test rules deploy/monitoring/prometheusrule-tests.yaml:\n{}",
        output_text(&out)
    );

    let (metrics, labels) = defined_metrics();
    assert!(
        metrics.contains("ballast_requests_total") && labels.contains("outcome"),
        "metrics sources moved? {metrics:?}"
    );
    let mut p = Problems::default();
    let mut alerts = BTreeSet::new();
    for g in arr(spec, "/groups") {
        for r in arr(g, "/rules") {
            let name = s(r, "/alert").unwrap_or("?");
            alerts.insert(name.to_owned());
            for key in ["summary", "description", "runbook"] {
                p.check(s(r, &format!("/annotations/{key}")).is_some_and(|t| !t.trim().is_empty()), || {
                    format!("alert {name}: no {key} annotation")
                });
            }
            p.check(matches!(s(r, "/labels/severity"), Some("warning" | "critical")), || {
                format!("alert {name}: no severity")
            });
            check_names(&format!("alert {name}"), s(r, "/expr").unwrap_or(""), &metrics, &labels, &mut p);
        }
    }
    for want in [
        "BallastHighErrorRate",
        "BallastCircuitOpen",
        "BallastRetryBudgetExhausted",
        "BallastRejectionsSurge",
        "BallastSidecarsDisconnected",
        "BallastControlPlaneDown",
        "BallastInjectorWithoutTrustAnchors",
    ] {
        p.check(alerts.contains(want), || format!("no alert {want}"));
    }

    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("deploy/dashboards/ballast.json")).unwrap(),
    )
    .expect("deploy/dashboards/ballast.json is JSON");
    let mut exprs = Vec::new();
    dashboard_exprs(&dashboard, &mut exprs);
    assert!(exprs.len() > 10, "the dashboard has only {} queries", exprs.len());
    for e in &exprs {
        check_names("dashboard", e, &metrics, &labels, &mut p);
    }
    // The golden signals and the rest the dashboard is for.
    let all = exprs.join("\n");
    for m in [
        "ballast_requests_total",
        "ballast_request_duration_seconds_bucket",
        "ballast_rejections_total",
        "ballast_circuit_state",
        "ballast_retries_total",
        "ballast_retry_budget_exhausted_total",
        "ballast_endpoints",
        "ballast_control_plane_proxies_connected",
    ] {
        p.check(all.contains(m), || format!("the dashboard never queries {m}"));
    }
    let mut ids = BTreeSet::new();
    for panel in arr(&dashboard, "/panels") {
        let id = panel.pointer("/id").and_then(Value::as_u64);
        p.check(id.is_some_and(|id| ids.insert(id)), || {
            format!("dashboard panel {:?}: missing or duplicate id", s(panel, "/title"))
        });
        let (x, w) = (
            panel.pointer("/gridPos/x").and_then(Value::as_u64),
            panel.pointer("/gridPos/w").and_then(Value::as_u64),
        );
        p.check(matches!((x, w), (Some(x), Some(w)) if x + w <= 24), || {
            format!("dashboard panel {:?}: outside the 24-column grid", s(panel, "/title"))
        });
    }
    p.assert_none("alerts and dashboard");
}

// ---- the Dockerfile ----------------------------------------------------------------------

/// No Docker engine runs here, so the images are never built in CI; this checks what can
/// be checked without one: every binary an image copies out of the builder is a binary of
/// the workspace and is put in `/out/` by the builder on both of its paths (the
/// profile-guided sidecar and, with `--build-arg PGO=0`, the plain one); the script the
/// PGO path runs exists, is executable and writes where the builder copies from; and the
/// build context keeps what that script needs (the harness under `benches/`, `scripts/`).
#[test]
fn the_dockerfile_copies_what_its_builder_builds() {
    let dockerfile = std::fs::read_to_string(root().join("deploy/Dockerfile")).expect("deploy/Dockerfile");
    let dockerignore = std::fs::read_to_string(root().join(".dockerignore")).expect(".dockerignore");
    let mut p = Problems(Vec::new());

    // The workspace's binaries, from Cargo itself.
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["metadata", "--no-deps", "--format-version", "1", "--offline"])
        .current_dir(root())
        .output()
        .expect("cargo metadata runs");
    assert!(out.status.success(), "cargo metadata: {}", output_text(&out));
    let meta: Value = serde_json::from_slice(&out.stdout).expect("cargo metadata prints JSON");
    let bins: BTreeSet<String> = arr(&meta, "/packages")
        .iter()
        .flat_map(|pkg| arr(pkg, "/targets"))
        .filter(|t| strs(t, "/kind").iter().any(|k| k == "bin"))
        .filter_map(|t| s(t, "/name").map(str::to_owned))
        .collect();

    // Joined continuation lines, so that one RUN is one line.
    let text = dockerfile.replace("\\\n", " ");
    let (builder, images) = text.split_once("\nFROM debian").expect("a builder stage, then the images");
    let copied: BTreeSet<String> = images
        .lines()
        .filter(|l| l.trim_start().starts_with("COPY --from=builder"))
        .flat_map(|l| l.split_whitespace().filter_map(|w| w.strip_prefix("/out/")).map(str::to_owned))
        .filter(|b| !b.is_empty())
        .collect();
    p.check(copied.contains("ballast-sidecar"), || "no image copies ballast-sidecar".into());
    // Where the builder puts each file in /out/: `cp SRC... /out/` commands.
    let mut sources: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for cmd in builder.split(['&', ';']) {
        let words: Vec<&str> = cmd.split_whitespace().collect();
        if let Some(i) = words.iter().position(|w| *w == "cp")
            && words.last() == Some(&"/out/")
        {
            for src in &words[i + 1..words.len() - 1] {
                let name = src.rsplit('/').next().unwrap_or(src);
                sources.entry(name.to_owned()).or_default().push((*src).to_owned());
            }
        }
    }
    for b in &copied {
        p.check(bins.contains(b), || format!("the Dockerfile copies {b}, which no workspace package builds"));
        p.check(sources.contains_key(b), || format!("the builder never copies {b} into /out/"));
    }
    let sidecar: BTreeSet<&str> =
        sources.get("ballast-sidecar").into_iter().flatten().map(String::as_str).collect();
    p.check(sidecar.contains("target/pgo/ballast-sidecar"), || {
        format!("the builder's PGO path must copy target/pgo/ballast-sidecar, copies {sidecar:?}")
    });
    p.check(sidecar.contains("target/release/ballast-sidecar"), || {
        format!("the builder's PGO=0 path must copy target/release/ballast-sidecar, copies {sidecar:?}")
    });

    // The PGO script: there, executable, writing target/pgo/ballast-sidecar.
    p.check(builder.contains("scripts/build-pgo.sh"), || {
        "the builder does not run scripts/build-pgo.sh".into()
    });
    let script = root().join("scripts/build-pgo.sh");
    let mode = std::fs::metadata(&script).map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()));
    p.check(mode.as_ref().is_ok_and(|m| m & 0o111 != 0), || {
        format!("scripts/build-pgo.sh: {mode:?}, not executable")
    });
    let script = std::fs::read_to_string(&script).unwrap_or_default();
    p.check(script.contains("OUT=$PWD/target/pgo") && script.contains("\"$OUT/ballast-sidecar\""), || {
        "scripts/build-pgo.sh no longer writes target/pgo/ballast-sidecar, which the builder copies".into()
    });
    p.check(script.contains("--bench mesh"), || {
        "scripts/build-pgo.sh no longer trains on the mesh harness".into()
    });

    // The build context keeps what the builder and the training need.
    let ignored: Vec<&str> =
        dockerignore.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
    for needed in ["scripts", "benches", "tests", ".cargo", "Cargo.lock", "Cargo.toml", "sidecar"] {
        p.check(!ignored.iter().any(|l| l.trim_end_matches('/') == needed), || {
            format!(".dockerignore leaves out {needed}, which the builder needs")
        });
    }
    p.assert_none("deploy/Dockerfile");
}
