"""Applies the injector's patches with an independent JSONPatch implementation and
validates the results against the Kubernetes schema (strict, offline).

Input: a JSON file, a list of {"id", "pod", "patch", "identity"}. For each case:
- the patch must apply to the original pod (RFC 6902, python-jsonpatch);
- if the original pod is valid Kubernetes 1.33 (strict), the patched one must be too;
- the app's containers, init containers and volumes are all still there, in their order;
- ballast-proxy and ballast-init appear exactly once;
- volume names are unique and every volume ballast-proxy mounts exists (the schema
  cannot say either);
- workload identity is there exactly when "identity" is true: the trust anchors (PEM)
  and token path in ballast-proxy's environment, and the token path inside a read-only
  mount of a projected service-account token for the audience "ballast". Trust anchors
  without a token (an opted-out pod verifying the control plane) are not identity.
Prints failures, then one summary JSON line; exits 1 on any failure.
"""
import json
import sys

import jsonpatch
import kubernetes_validate

VERSION = "1.33.0"
TOKEN_PATH = "/var/run/secrets/ballast.io/serviceaccount/token"
TOKEN_VOLUME = "ballast-identity-token"


def valid(obj):
    try:
        kubernetes_validate.validate(obj, VERSION, strict=True)
        return None
    except Exception as e:  # ValidationError, or the schema lookup failing
        return str(e).splitlines()[0]


def names(pod, field):
    return [c.get("name") for c in ((pod.get("spec") or {}).get(field) or [])]


def identity_problems(pod):
    """What is wrong with the proxy's identity wiring, and whether it has any."""
    spec = pod.get("spec") or {}
    proxy = next(c for c in (spec.get("initContainers") or []) + (spec.get("containers") or [])
                 if c.get("name") == "ballast-proxy")
    env = {e.get("name"): e for e in proxy.get("env") or []}
    anchors = env.get("BALLAST_IDENTITY_TRUST_ANCHORS")
    token = env.get("BALLAST_IDENTITY_TOKEN_FILE")
    volumes = {v.get("name"): v for v in spec.get("volumes") or []}
    mounts = proxy.get("volumeMounts") or []
    problems = []
    for m in mounts:
        if m.get("name") not in volumes:
            problems.append(f"ballast-proxy mounts volume {m.get('name')!r}, which the pod does not have")
    if anchors is not None:
        # Also without identity (an opted-out pod): the proxy verifies the control plane.
        pem = anchors.get("value") or ""
        if not pem.startswith("-----BEGIN CERTIFICATE-----\n") or not pem.endswith("-----END CERTIFICATE-----\n"):
            problems.append("BALLAST_IDENTITY_TRUST_ANCHORS is not PEM certificates")
    if token is None:
        if any(m.get("name") == TOKEN_VOLUME for m in mounts):
            problems.append("token volume mounted without identity")
        return problems, False
    if anchors is None:
        problems.append("BALLAST_IDENTITY_TOKEN_FILE without BALLAST_IDENTITY_TRUST_ANCHORS")
        return problems, True
    if token.get("value") != TOKEN_PATH:
        problems.append(f"BALLAST_IDENTITY_TOKEN_FILE is {token.get('value')!r}, want {TOKEN_PATH}")
    holding = [m for m in mounts if TOKEN_PATH.startswith(m.get("mountPath", "").rstrip("/") + "/")]
    if len(holding) != 1 or holding[0].get("readOnly") is not True:
        problems.append(f"the token path is not inside exactly one read-only mount: {mounts}")
        return problems, True
    m = holding[0]
    file = TOKEN_PATH[len(m["mountPath"].rstrip("/")) + 1:]
    sources = ((volumes.get(m["name"]) or {}).get("projected") or {}).get("sources") or []
    tokens = [s["serviceAccountToken"] for s in sources if "serviceAccountToken" in s]
    if not any(t.get("audience") == "ballast" and t.get("path") == file
               and t.get("expirationSeconds", 3600) >= 600 for t in tokens):
        problems.append(f"volume {m['name']} has no serviceAccountToken for audience ballast at {file}: {sources}")
    return problems, True


def main(path):
    cases = json.load(open(path))
    failures = []
    originally_invalid = 0
    valid_after = 0
    with_identity = 0
    for case in cases:
        cid, pod = case["id"], case["pod"]
        try:
            out = jsonpatch.apply_patch(pod, case["patch"])
        except Exception as e:
            failures.append(f"{cid}: patch does not apply: {e}")
            continue
        before = valid(pod)
        after = valid(out)
        if before is not None:
            originally_invalid += 1
        elif after is not None:
            failures.append(f"{cid}: valid before the patch, invalid after: {after}")
        if after is None:
            valid_after += 1
        ours = {"ballast-proxy", "ballast-init"}
        for field in ("containers", "initContainers"):
            kept = [n for n in names(out, field) if n not in ours]
            if kept != names(pod, field):
                failures.append(f"{cid}: {field} changed: {names(pod, field)} -> {names(out, field)}")
        every = names(out, "containers") + names(out, "initContainers")
        for n in ours:
            if every.count(n) != 1:
                failures.append(f"{cid}: {n} appears {every.count(n)} times")
        labels = (out.get("metadata") or {}).get("labels") or {}
        if labels.get("ballast.io/injected") != "true":
            failures.append(f"{cid}: label ballast.io/injected missing")
        kept = [n for n in names(out, "volumes") if n != TOKEN_VOLUME]
        if kept != names(pod, "volumes"):
            failures.append(f"{cid}: volumes changed: {names(pod, 'volumes')} -> {names(out, 'volumes')}")
        if len(set(names(out, "volumes"))) != len(names(out, "volumes")):
            failures.append(f"{cid}: duplicate volume names {names(out, 'volumes')}")
        if every.count("ballast-proxy") == 1:
            problems, identity = identity_problems(out)
            failures.extend(f"{cid}: {p}" for p in problems)
            if identity != case.get("identity", False):
                failures.append(f"{cid}: identity is {identity}, want {case.get('identity', False)}")
            with_identity += identity
    for f in failures:
        print(f)
    print(json.dumps({"checked": len(cases), "originally_invalid": originally_invalid,
                      "valid_after": valid_after, "with_identity": with_identity,
                      "failures": len(failures)}))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
