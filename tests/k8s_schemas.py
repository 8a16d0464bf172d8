"""Schemas for the rendered objects: kubernetes-validate's for built-in kinds, the CRDs' own OpenAPI v3 schemas
(tests/data/crds/, see its README) for JobSet, TrainJob, TrainingRuntime and LocalQueue.

A CRD schema is made strict as kubernetes-validate's `-strict` schemas are (an object with listed properties
takes no others unless it says `x-kubernetes-preserve-unknown-fields`), so an unknown field fails here as it does
under `kubectl apply --validate=strict`. CEL rules (`x-kubernetes-validations`) run only in an API server and
are not checked. OpenAPI v3.0 schemas follow JSON Schema draft 4 (boolean exclusiveMinimum), hence Draft4Validator.
"""
from __future__ import annotations

import functools
import gzip
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

CRD_DIR = Path(__file__).parent / "data" / "crds"


@functools.cache
def crds() -> tuple[dict, ...]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: 2 MB of CRDs in well under a second
    return tuple(yaml.load(gzip.open(path), Loader=loader) for path in sorted(CRD_DIR.glob("*.yaml.gz")))


def strict(schema):
    """The schema with `additionalProperties: false` on every closed object."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value) for key, value in schema.items()}
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_validators() -> dict[tuple[str, str], jsonschema.Draft4Validator]:
    """(apiVersion, kind) -> validator, for every served version of every stored CRD."""
    validators = {}
    for crd in crds():
        spec = crd["spec"]
        for version in spec["versions"]:
            if version.get("served"):
                schema = strict(version["schema"]["openAPIV3Schema"])
                validators[(f"{spec['group']}/{version['name']}", spec["names"]["kind"])] = \
                    jsonschema.Draft4Validator(schema)
    return validators


def crd_errors(obj: dict) -> list[str]:
    """Where and why `obj` breaks its CRD's schema; KeyError when no stored CRD defines its kind."""
    validator = crd_validators()[(obj["apiVersion"], obj["kind"])]
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]


def validate(obj: dict, version: str) -> None:
    """Strict validation on Kubernetes `version`; raises with the object's name and every problem."""
    if (obj["apiVersion"], obj["kind"]) in crd_validators():
        errors = crd_errors(obj)
        if errors:
            raise AssertionError(f"{obj['kind']}/{obj['metadata']['name']}: {errors}")
        return
    kubernetes_validate.validate(obj, version, strict=True)
