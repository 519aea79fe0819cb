"""Validates documents against a CRD's openAPIV3Schema the way the API server would.

Usage: schema_check.py CRD_FILE < documents.json

CRD_FILE is the CustomResourceDefinition (JSON or YAML); standard input is a JSON list of
documents (as kubectl sends them: YAML already turned into JSON). Prints a JSON list with,
for each document, {"accepted": bool, "errors": ["path: message", ...]}.

jsonschema does the OpenAPI part (Draft 4, whose boolean exclusiveMinimum is OpenAPI 3.0's).
What it does not know of the API server is emulated here, and only that:
* strict field validation (kubectl's default): an unknown field is an error, as if every
  object schema said additionalProperties: false (a structural schema may not say it);
* apiVersion, kind and metadata at the root, which the API server adds to every schema;
* nullable: true, as a "null" type;
* x-kubernetes-list-type: map (keys unique) and x-kubernetes-validations, whose CEL rules
  are known by their text in RULES below. An unknown rule or x-kubernetes-* extension is an
  error of this script, so that a new rule cannot pass unchecked: teach it here.
"""

import json
import re
import sys
from fractions import Fraction

import jsonschema
import yaml

# Go's time.ParseDuration, which CEL's duration() uses: exact, in integer nanoseconds.
_UNITS = {
    "ns": 1,
    "us": 1_000,
    "\u00b5s": 1_000,
    "\u03bcs": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}
_GO_MAX = (1 << 63) - 1
_COMPONENT = re.compile(r"([0-9]*(?:\.[0-9]*)?)([^0-9.]+)")


class CelError(Exception):
    """A CEL evaluation error; the API server reports the rule as failed."""


def go_duration(s):
    if not isinstance(s, str):
        raise CelError(f"duration() of {s!r}")
    text = s
    sign = 1
    if text and text[0] in "+-":
        sign = -1 if text[0] == "-" else 1
        text = text[1:]
    if text == "0":
        return 0
    if not text:
        raise CelError(f"invalid duration {s!r}")
    total = Fraction(0)
    pos = 0
    while pos < len(text):
        m = _COMPONENT.match(text, pos)
        if not m or m.group(1) in ("", ".") or m.group(2) not in _UNITS:
            raise CelError(f"invalid duration {s!r}")
        total += Fraction(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    ns = int(total)  # Go truncates the fraction of a nanosecond
    if ns > _GO_MAX:
        raise CelError(f"invalid duration {s!r}: overflow")
    return sign * ns


def _le(a, b):
    return go_duration(a) <= go_duration(b)


# Each CEL rule api/src/crd.rs writes, by its exact text, as a function of `self`.
RULES = {
    "duration(self) <= duration('1000000000s')": lambda v: go_duration(v) <= 1_000_000_000 * 10**9,
    "!has(self.perTry) || !has(self.request) || duration(self.perTry) <= duration(self.request)": (
        lambda v: "perTry" not in v or "request" not in v or _le(v["perTry"], v["request"])
    ),
    "duration(self.base) <= duration(self.max)": lambda v: _le(v["base"], v["max"]),
    "!has(self.openFor) || !has(self.maxOpenFor) || duration(self.openFor) <= duration(self.maxOpenFor)": (
        lambda v: "openFor" not in v or "maxOpenFor" not in v or _le(v["openFor"], v["maxOpenFor"])
    ),
}

# Extensions handled below, or with no effect on whether a document is accepted.
KNOWN_EXTENSIONS = {"x-kubernetes-validations", "x-kubernetes-list-type", "x-kubernetes-list-map-keys"}


def fail(message):
    print(f"schema_check.py: {message}", file=sys.stderr)
    sys.exit(2)


def emulate(schema, path="<root>"):
    """The schema as Draft 4 sees the API server's behaviour (see the module doc)."""
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key.startswith("x-kubernetes-") and key not in KNOWN_EXTENSIONS:
            fail(f"{path}: {key} is not emulated")
        if key == "properties":
            out[key] = {k: emulate(v, f"{path}.{k}") for k, v in value.items()}
        elif key == "items":
            out[key] = emulate(value, f"{path}[]")
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [emulate(v, path) for v in value]
        elif key == "not":
            out[key] = emulate(value, path)
        elif key == "additionalProperties" and isinstance(value, dict):
            out[key] = emulate(value, f"{path}.*")
        else:
            out[key] = value
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def show(path):
    s = ""
    for p in path:
        s += f"[{p}]" if isinstance(p, int) else (f".{p}" if s else str(p))
    return s or "<root>"


def extension_errors(schema, value, path, errors):
    """x-kubernetes-validations and list-type map, walked along the document."""
    if not isinstance(schema, dict) or value is None:
        return
    for rule in schema.get("x-kubernetes-validations", []):
        text = rule.get("rule")
        if text not in RULES:
            fail(f"{show(path)}: unknown CEL rule {text!r}: add it to RULES")
        try:
            ok = RULES[text](value)
        except CelError as e:
            ok, note = False, f" ({e})"
        else:
            note = ""
        if not ok:
            at = path + [p for p in rule.get("fieldPath", "").split(".") if p]
            errors.append(f"{show(at)}: {rule.get('message', text)}{note}")
    if schema.get("x-kubernetes-list-type") == "map" and isinstance(value, list):
        keys = schema.get("x-kubernetes-list-map-keys", [])
        seen = set()
        for i, item in enumerate(value):
            k = tuple(json.dumps(item.get(key)) for key in keys) if isinstance(item, dict) else None
            if k in seen:
                errors.append(f"{show(path + [i])}: duplicate entry for key {keys}")
            seen.add(k)
    if isinstance(value, dict):
        for k, sub in schema.get("properties", {}).items():
            if k in value:
                extension_errors(sub, value[k], path + [k], errors)
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            extension_errors(schema["items"], item, path + [i], errors)


def main():
    if len(sys.argv) != 2:
        fail("usage: schema_check.py CRD_FILE < documents.json")
    with open(sys.argv[1], encoding="utf-8") as f:
        crd = yaml.safe_load(f)
    versions = crd["spec"]["versions"]
    if len(versions) != 1:
        fail(f"expected one version, the CRD has {len(versions)}")
    schema = versions[0]["schema"]["openAPIV3Schema"]
    root = emulate(schema)
    root.setdefault("properties", {}).update(
        {"apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": {"type": "object"}}
    )
    jsonschema.Draft4Validator.check_schema(root)
    validator = jsonschema.Draft4Validator(root)

    results = []
    for doc in json.load(sys.stdin):
        errors = [f"{show(e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc)]
        extension_errors(schema, doc, [], errors)
        results.append({"accepted": not errors, "errors": sorted(errors)})
    json.dump(results, sys.stdout, indent=1, ensure_ascii=False)
    print()


if __name__ == "__main__":
    main()
