"""Applies the injector's patches with an independent JSONPatch implementation and
validates the results against the Kubernetes schema (strict, offline).

Input: a JSON file, a list of {"id", "pod", "patch"}. For each case:
- the patch must apply to the original pod (RFC 6902, python-jsonpatch);
- if the original pod is valid Kubernetes 1.33 (strict), the patched one must be too;
- the app's containers and init containers are all still there, in their order;
- ballast-proxy and ballast-init appear exactly once.
Prints failures, then one summary JSON line; exits 1 on any failure.
"""
import json
import sys

import jsonpatch
import kubernetes_validate

VERSION = "1.33.0"


def valid(obj):
    try:
        kubernetes_validate.validate(obj, VERSION, strict=True)
        return None
    except Exception as e:  # ValidationError, or the schema lookup failing
        return str(e).splitlines()[0]


def names(pod, field):
    return [c.get("name") for c in ((pod.get("spec") or {}).get(field) or [])]


def main(path):
    cases = json.load(open(path))
    failures = []
    originally_invalid = 0
    valid_after = 0
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
    for f in failures:
        print(f)
    print(json.dumps({"checked": len(cases), "originally_invalid": originally_invalid,
                      "valid_after": valid_after, "failures": len(failures)}))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
