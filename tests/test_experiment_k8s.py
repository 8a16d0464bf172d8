"""`crescent k8s render --experiment SPEC`: an Indexed Job over the spec's static points (completion index = grid
point) and the report Job after it, strict-validated like the other manifests, passing our deployment rules, with
pod commands that the real `crescent experiment` parser accepts."""
from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from k8s_schemas import validate

from app.commands.experiment import _parser
from app.experiments.configs import blocked_arms
from app.experiments.k8s import experiment_objects
from app.experiments.plan import static_points
from app.experiments.spec import SPEC_DIR, load_spec, parse_spec
from app.k8s import policy
from app.k8s.render import RenderError, RenderParams, find

SPECS = sorted(p.stem for p in SPEC_DIR.glob("*.yaml"))


@pytest.fixture(scope="module")
def rendered():
    """Each shipped spec's gpu size, rendered once with the dev overlay (kustomize runs once per spec)."""
    return {name: experiment_objects(name, "gpu", RenderParams(overlay="dev"), parallelism=4, key="k1")
            for name in SPECS}


def _args(job: dict) -> list[str]:
    """The arguments after `crescent experiment` (the container runs `crescent ARGS`)."""
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] == ["crescent"] and c["args"][0] == "experiment"
    return c["args"][1:]


@pytest.mark.parametrize("version", ["1.30", "1.34"])
@pytest.mark.parametrize("name", SPECS)
def test_experiment_jobs_validate_strictly(rendered, name, version):
    objects = rendered[name]
    assert [o["kind"] for o in objects] == ["ConfigMap", "Job", "Job"]
    for obj in objects:
        validate(obj, version)
    assert policy.problems(objects) == []


@pytest.mark.parametrize("name", SPECS)
def test_completion_index_is_the_static_point(rendered, name):
    spec = load_spec(name, "gpu")
    points = static_points(spec, blocked_arms(spec))
    objects = rendered[name]
    job = find(objects, "Job", f"crescent-exp-{name}")
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == len(points) and job["spec"]["parallelism"] == min(4, len(points))
    assert job["spec"]["maxFailedIndexes"] == len(points)  # a failed point never fails the others
    assert _args(job)[_args(job).index("--point-index") + 1] == "$(JOB_COMPLETION_INDEX)"
    report = find(objects, "Job", f"crescent-exp-{name}-report")
    parsed = _parser().parse_args(_args(report))
    assert parsed.wait_static and parsed.point_index is None
    for each in (job, report):  # one parent run: the same key, work directory and MLflow server for every pod
        p = _parser().parse_args([a if a != "$(JOB_COMPLETION_INDEX)" else "0" for a in _args(each)])
        assert (p.key, p.work_dir, p.size) == ("k1", f"/checkpoints/experiments/{name}-gpu", "gpu")
        env = {e["name"]: e.get("value") for e in each["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        gpus = each["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
        assert gpus == "1"
    spec_text = find(objects, "ConfigMap", f"crescent-exp-{name}")["data"]["spec.yaml"]
    assert parse_spec(yaml.safe_load(spec_text), "gpu").arms == spec.arms


def test_render_command_prints_the_experiment(tmp_path):
    out = tmp_path / "exp.yaml"
    result = subprocess.run([sys.executable, "-m", "app.cli", "k8s", "render", "--experiment", "weight-decay",
                             "--parallelism", "3", "--gpus-per-node", "2", "-o", str(out)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    objects = list(yaml.safe_load_all(out.read_text()))
    job = find(objects, "Job", "crescent-exp-weight-decay")
    assert job["spec"]["completions"] == 9 and job["spec"]["parallelism"] == 3  # 3 arms × 3 lr values, seed 0
    assert job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"


def test_experiment_needs_an_indexed_job_overlay():
    with pytest.raises(RenderError, match="has no Indexed Job crescent-train; render experiments with the dev or prod"):
        experiment_objects("scaling", "gpu", RenderParams(overlay="jobset"))
