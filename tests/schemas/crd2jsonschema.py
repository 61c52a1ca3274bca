"""Turn CustomResourceDefinitions into the strict JSON schemas under tests/schemas/.

Run by hand when a CRD is updated (see README.md there): ``python
tests/schemas/crd2jsonschema.py CRD.yaml...``. For each version a CRD serves it writes
``<group>/<kind>_<version>.json`` (kind lower-cased) beside this script: the version's
``openAPIV3Schema`` as JSON Schema (draft 2020-12), made strict the way kubeconform's
``openapi2jsonschema`` does (a ``type: object`` with ``properties`` and no ``additionalProperties``
or ``x-kubernetes-preserve-unknown-fields`` takes no other field, so a typo fails), with
``apiVersion`` and ``kind`` fixed to the CRD's own, ``nullable`` as a ``null`` type,
``x-kubernetes-int-or-string`` as integer-or-string, and descriptions dropped (size).
CEL rules (``x-kubernetes-validations``) have no JSON Schema form: the API server alone
checks them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent


def convert(node: Any) -> Any:
    """One openAPIV3Schema node (recursively) as strict JSON Schema."""
    if isinstance(node, list):
        return [convert(item) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "description" or key.startswith("x-kubernetes-") or key == "nullable":
            continue
        if value is None:  # `anyOf: null` (OpenShift's int-or-string fields): no constraint
            continue
        if key in ("properties", "patternProperties"):
            out[key] = {name: convert(sub) for name, sub in value.items()}
        elif key in ("enum", "required", "example", "default"):
            out[key] = value
        else:
            out[key] = convert(value)
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in node:
        out["type"] = ["integer", "string"]
    if node.get("nullable") and "type" in out:
        types = out["type"] if isinstance(out["type"], list) else [out["type"]]
        out["type"] = [*types, "null"]
    loose = node.get("x-kubernetes-preserve-unknown-fields") or "additionalProperties" in node
    # Only a typed object: an untyped one is a constraint inside allOf/anyOf/not, which
    # names some fields of an object whose others are allowed.
    if node.get("type") == "object" and "properties" in node and not loose:
        out["additionalProperties"] = False
    return out


def schemas(crd: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{relative path: schema}`` for each served version of ``crd``."""
    group = crd["spec"]["group"]
    kind = crd["spec"]["names"]["kind"]
    out = {}
    for version in crd["spec"]["versions"]:
        if not version.get("served"):
            continue
        schema = convert(version["schema"]["openAPIV3Schema"])
        schema["properties"]["apiVersion"] = {"enum": [f"{group}/{version['name']}"]}
        schema["properties"]["kind"] = {"enum": [kind]}
        schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind"})
        schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}
        out[f"{group}/{kind.lower()}_{version['name']}.json"] = schema
    return out


def main(paths: list[str]) -> None:
    for path in paths:
        for doc in yaml.safe_load_all(Path(path).read_text(encoding="utf-8")):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            for rel, schema in schemas(doc).items():
                target = HERE / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n", "utf-8")
                print(target)


if __name__ == "__main__":
    main(sys.argv[1:])
