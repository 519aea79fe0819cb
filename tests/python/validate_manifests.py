#!/usr/bin/env python3
"""Validate rendered Kubernetes manifests offline (tests/deploy.rs runs it).

    validate_manifests.py [--kube-version 1.33.0] [--out OUT.json] [--parse-only] NAME=FILE...

Each FILE is one rendering (`kubectl kustomize DIR`, multi-document YAML), called NAME
in messages. Every object is checked:

* built-in kinds: strictly against the Kubernetes OpenAPI schemas of --kube-version
  (kubernetes-validate; unknown fields are errors, as with kubectl's default
  server-side field validation);
* custom resources whose CRD is in any of the renderings (e.g. the ResiliencePolicy
  example against deploy/'s CRD): against the CRD's openAPIV3Schema (jsonschema), with
  unknown fields refused where the schema does not preserve them, as the API server's
  strict field validation does;
* Prometheus Operator and cert-manager resources, whose CRDs are not available offline:
  their essential fields, and no unknown keys at the levels this project writes.

With --out, the parsed documents are written as JSON, {NAME: [document, ...]}, for the
Rust test's own assertions (--parse-only: only that, no validation; any YAML file).
Exits 1 after printing every problem, 0 when there is none.
"""

import argparse
import copy
import json
import sys

import jsonschema
import kubernetes_validate
import yaml

# Kinds of the operators this project writes resources for, and the keys allowed at the
# levels we check (from their CRDs: monitoring.coreos.com/v1, cert-manager.io/v1).
EXTERNAL_GROUPS = {"monitoring.coreos.com", "cert-manager.io"}

PODMONITOR_SPEC = {
    "jobLabel", "podTargetLabels", "podMetricsEndpoints", "selector", "selectorMechanism",
    "namespaceSelector", "sampleLimit", "targetLimit", "labelLimit", "labelNameLengthLimit",
    "labelValueLengthLimit", "keepDroppedTargets", "attachMetadata", "scrapeProtocols",
    "fallbackScrapeProtocol", "scrapeClass", "bodySizeLimit", "nativeHistogramBucketLimit",
    "nativeHistogramMinBucketFactor", "scrapeClassicHistograms", "convertClassicHistogramsToNHCB",
}
PODMONITOR_ENDPOINT = {
    "port", "portNumber", "targetPort", "path", "scheme", "params", "interval", "scrapeTimeout",
    "tlsConfig", "bearerTokenSecret", "honorLabels", "honorTimestamps", "trackTimestampsStaleness",
    "metricRelabelings", "relabelings", "proxyUrl", "noProxy", "proxyFromEnvironment",
    "proxyConnectHeader", "followRedirects", "enableHttp2", "filterRunning", "basicAuth", "oauth2",
    "authorization",
}
TLS_CONFIG = {"ca", "cert", "keySecret", "serverName", "insecureSkipVerify", "minVersion", "maxVersion"}
SECRET_OR_CONFIGMAP = {"secret", "configMap"}
KEY_SELECTOR = {"name", "key", "optional"}
RELABEL = {"sourceLabels", "separator", "targetLabel", "regex", "modulus", "replacement", "action"}
NAMESPACE_SELECTOR = {"any", "matchNames"}
RULE_GROUP = {"name", "interval", "rules", "partial_response_strategy", "limit", "query_offset", "labels"}
RULE = {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}
CERTIFICATE_SPEC = {
    "secretName", "issuerRef", "commonName", "dnsNames", "ipAddresses", "uris", "emailAddresses",
    "otherNames", "duration", "renewBefore", "renewBeforePercentage", "usages", "privateKey", "isCA",
    "subject", "literalSubject", "secretTemplate", "keystores", "revisionHistoryLimit",
    "encodeUsagesInRequest", "additionalOutputFormats", "nameConstraints", "signatureAlgorithm",
}
ISSUER_REF = {"name", "kind", "group"}
PRIVATE_KEY = {"algorithm", "size", "encoding", "rotationPolicy"}
ISSUER_TYPES = {"selfSigned", "ca", "acme", "vault", "venafi"}
KEY_USAGES = {
    "signing", "digital signature", "content commitment", "key encipherment", "key agreement",
    "data encipherment", "cert sign", "crl sign", "encipher only", "decipher only", "any",
    "server auth", "client auth", "code signing", "email protection", "s/mime", "ipsec end system",
    "ipsec tunnel", "ipsec user", "timestamping", "ocsp signing", "microsoft sgc", "netscape sgc",
}


class Problems:
    def __init__(self):
        self.items = []

    def add(self, where, msg):
        self.items.append(f"{where}: {msg}")


def group_of(api_version):
    return api_version.split("/", 1)[0] if "/" in api_version else ""


def describe(name, obj):
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace")
    return f"{name}: {obj.get('kind')} {ns + '/' if ns else ''}{meta.get('name')}"


def keys_within(problems, where, value, allowed, what):
    if not isinstance(value, dict):
        problems.add(where, f"{what} must be a mapping, got {type(value).__name__}")
        return {}
    for key in sorted(set(value) - allowed):
        problems.add(where, f"unknown field {what}.{key}")
    return value


def require(problems, where, value, key, what, kind=None):
    if not isinstance(value, dict) or key not in value:
        problems.add(where, f"missing {what}.{key}")
        return None
    v = value[key]
    if kind is not None and not isinstance(v, kind):
        problems.add(where, f"{what}.{key} must be a {kind.__name__}")
        return None
    if v in ("", [], {}):
        problems.add(where, f"{what}.{key} is empty")
    return v


def check_key_selector(problems, where, sel, what):
    keys_within(problems, where, sel, SECRET_OR_CONFIGMAP, what)
    if isinstance(sel, dict):
        if len(sel) != 1:
            problems.add(where, f"{what} needs exactly one of secret, configMap")
        for k, v in sel.items():
            keys_within(problems, where, v, KEY_SELECTOR, f"{what}.{k}")
            require(problems, where, v, "name", f"{what}.{k}", str)
            require(problems, where, v, "key", f"{what}.{k}", str)


def check_podmonitor(problems, where, spec):
    keys_within(problems, where, spec, PODMONITOR_SPEC, "spec")
    require(problems, where, spec, "selector", "spec", dict)
    if "namespaceSelector" in spec:
        keys_within(problems, where, spec["namespaceSelector"], NAMESPACE_SELECTOR, "spec.namespaceSelector")
    endpoints = require(problems, where, spec, "podMetricsEndpoints", "spec", list) or []
    for i, ep in enumerate(endpoints):
        what = f"spec.podMetricsEndpoints[{i}]"
        keys_within(problems, where, ep, PODMONITOR_ENDPOINT, what)
        if not isinstance(ep, dict):
            continue
        if "port" not in ep and "portNumber" not in ep and "targetPort" not in ep:
            problems.add(where, f"{what} names no port")
        if ep.get("scheme", "http") not in ("http", "https"):
            problems.add(where, f"{what}.scheme must be http or https")
        tls = ep.get("tlsConfig")
        if tls is not None:
            keys_within(problems, where, tls, TLS_CONFIG, f"{what}.tlsConfig")
            if isinstance(tls, dict) and "ca" in tls:
                check_key_selector(problems, where, tls["ca"], f"{what}.tlsConfig.ca")
        for j, r in enumerate(ep.get("relabelings") or []):
            keys_within(problems, where, r, RELABEL, f"{what}.relabelings[{j}]")


def check_prometheusrule(problems, where, spec):
    keys_within(problems, where, spec, {"groups"}, "spec")
    groups = require(problems, where, spec, "groups", "spec", list) or []
    names = set()
    for i, g in enumerate(groups):
        what = f"spec.groups[{i}]"
        keys_within(problems, where, g, RULE_GROUP, what)
        name = require(problems, where, g, "name", what, str)
        if name in names:
            problems.add(where, f"{what}: duplicate group name {name}")
        names.add(name)
        for j, rule in enumerate(require(problems, where, g, "rules", what, list) or []):
            rwhat = f"{what}.rules[{j}]"
            keys_within(problems, where, rule, RULE, rwhat)
            if not isinstance(rule, dict):
                continue
            if ("alert" in rule) == ("record" in rule):
                problems.add(where, f"{rwhat} needs exactly one of alert, record")
            require(problems, where, rule, "expr", rwhat, str)


def check_certificate(problems, where, spec):
    keys_within(problems, where, spec, CERTIFICATE_SPEC, "spec")
    require(problems, where, spec, "secretName", "spec", str)
    ref = require(problems, where, spec, "issuerRef", "spec", dict)
    if ref is not None:
        keys_within(problems, where, ref, ISSUER_REF, "spec.issuerRef")
        require(problems, where, ref, "name", "spec.issuerRef", str)
    if isinstance(spec, dict):
        if not spec.get("dnsNames") and not spec.get("commonName"):
            problems.add(where, "spec needs dnsNames or commonName")
        if "privateKey" in spec:
            keys_within(problems, where, spec["privateKey"], PRIVATE_KEY, "spec.privateKey")
        for u in spec.get("usages") or []:
            if u not in KEY_USAGES:
                problems.add(where, f"spec.usages: unknown usage {u!r}")


def check_issuer(problems, where, spec):
    keys_within(problems, where, spec, ISSUER_TYPES, "spec")
    if isinstance(spec, dict) and len(set(spec) & ISSUER_TYPES) != 1:
        problems.add(where, "spec needs exactly one issuer type (selfSigned, ca, acme, vault, venafi)")
    if isinstance(spec, dict) and "ca" in spec:
        require(problems, where, spec["ca"], "secretName", "spec.ca", str)


EXTERNAL_CHECKS = {
    ("monitoring.coreos.com/v1", "PodMonitor"): check_podmonitor,
    ("monitoring.coreos.com/v1", "PrometheusRule"): check_prometheusrule,
    ("cert-manager.io/v1", "Certificate"): check_certificate,
    ("cert-manager.io/v1", "Issuer"): check_issuer,
}


def strict_schema(schema):
    """The CRD's structural schema (OpenAPI v3.0) as a JSON Schema draft 7, with unknown
    fields refused, as the API server's strict field validation (kubectl's default)
    refuses them instead of pruning them. apiVersion, kind and metadata are always
    allowed at the top, as the API server allows them."""
    schema = copy.deepcopy(schema)
    props = schema.setdefault("properties", {})
    props.setdefault("apiVersion", {"type": "string"})
    props.setdefault("kind", {"type": "string"})
    props.setdefault("metadata", {"type": "object"})

    def walk(s):
        if not isinstance(s, dict):
            return
        # OpenAPI 3.0's boolean exclusive bounds are draft 7's numeric ones.
        for bound, excl in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
            if isinstance(s.get(excl), bool):
                if s.pop(excl) and bound in s:
                    s[excl] = s.pop(bound)
        if s.get("nullable") is True and isinstance(s.get("type"), str):
            s["type"] = [s["type"], "null"]
        if s.get("x-kubernetes-int-or-string") and "type" not in s:
            s["type"] = ["integer", "string"]
        types = s.get("type")
        if (
            (types == "object" or (isinstance(types, list) and "object" in types))
            and "properties" in s
            and "additionalProperties" not in s
            and not s.get("x-kubernetes-preserve-unknown-fields")
        ):
            s["additionalProperties"] = False
        for key in ("properties", "patternProperties", "definitions", "$defs"):
            for sub in (s.get(key) or {}).values():
                walk(sub)
        for key in ("items", "additionalProperties", "not"):
            walk(s.get(key))
        for key in ("allOf", "anyOf", "oneOf"):
            for sub in s.get(key) or []:
                walk(sub)

    walk(schema)
    return schema


def crd_schemas(renderings):
    """{(apiVersion, kind): (crd name, schema)} of every served CRD version."""
    out = {}
    for objs in renderings.values():
        for o in objs:
            if o.get("apiVersion") != "apiextensions.k8s.io/v1" or o.get("kind") != "CustomResourceDefinition":
                continue
            spec = o.get("spec") or {}
            group, kind = spec.get("group"), (spec.get("names") or {}).get("kind")
            for v in spec.get("versions") or []:
                schema = ((v.get("schema") or {}).get("openAPIV3Schema"))
                if v.get("served") and schema:
                    out[(f"{group}/{v['name']}", kind)] = (o["metadata"]["name"], schema)
    return out


def check_metadata(problems, where, obj):
    meta = obj.get("metadata")
    if not isinstance(meta, dict) or not meta.get("name"):
        problems.add(where, "missing metadata.name")


def validate(renderings, kube_version):
    problems = Problems()
    crds = crd_schemas(renderings)
    counts = {}
    for name, objs in renderings.items():
        seen = set()
        for obj in objs:
            where = describe(name, obj)
            if not isinstance(obj, dict) or "apiVersion" not in obj or "kind" not in obj:
                problems.add(where, "not a Kubernetes object (no apiVersion/kind)")
                continue
            key = (obj["apiVersion"], obj["kind"], (obj.get("metadata") or {}).get("namespace"),
                   (obj.get("metadata") or {}).get("name"))
            if key in seen:
                problems.add(where, "defined twice")
            seen.add(key)
            check_metadata(problems, where, obj)
            api_kind = (obj["apiVersion"], obj["kind"])
            if api_kind in crds:
                crd_name, schema = crds[api_kind]
                validator = jsonschema.Draft7Validator(strict_schema(schema))
                for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.path))):
                    path = ".".join(str(p) for p in e.path) or "(top level)"
                    problems.add(where, f"{path}: {e.message} (schema of CRD {crd_name})")
            elif api_kind in EXTERNAL_CHECKS:
                spec = obj.get("spec")
                if not isinstance(spec, dict) or not spec:
                    problems.add(where, "missing spec")
                else:
                    EXTERNAL_CHECKS[api_kind](problems, where, spec)
            elif group_of(obj["apiVersion"]) in EXTERNAL_GROUPS:
                problems.add(where, f"no check for {obj['apiVersion']} {obj['kind']}: add one to {sys.argv[0]}")
            else:
                try:
                    kubernetes_validate.validate(obj, kube_version, strict=True)
                except kubernetes_validate.SchemaNotFoundError:
                    problems.add(where, f"no Kubernetes {kube_version} schema for {obj['apiVersion']} {obj['kind']} and no CRD among the renderings")
                except kubernetes_validate.ValidationError as e:
                    path = ".".join(str(p) for p in e.path) or "(top level)"
                    problems.add(where, f"{path}: {e.message}")
                except kubernetes_validate.InvalidSchemaError as e:
                    problems.add(where, f"invalid schema: {e}")
            counts[name] = counts.get(name, 0) + 1
    return problems, counts


def load(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kube-version", default="1.33.0")
    ap.add_argument("--out", help="write the parsed documents here as JSON")
    ap.add_argument("--parse-only", action="store_true", help="only convert to JSON (with --out)")
    ap.add_argument("renderings", nargs="+", metavar="NAME=FILE")
    args = ap.parse_args()
    renderings = {}
    for arg in args.renderings:
        name, sep, path = arg.partition("=")
        if not sep:
            ap.error(f"expected NAME=FILE, got {arg!r}")
        try:
            renderings[name] = load(path)
        except (OSError, yaml.YAMLError) as e:
            print(f"{name}: cannot read {path}: {e}", file=sys.stderr)
            return 1
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(renderings, f)
    if args.parse_only:
        return 0
    problems, counts = validate(renderings, args.kube_version)
    for name in renderings:
        print(f"{name}: {counts.get(name, 0)} objects checked")
    if problems.items:
        for p in problems.items:
            print(p, file=sys.stderr)
        print(f"{len(problems.items)} problems", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
