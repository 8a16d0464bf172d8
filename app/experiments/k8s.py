"""`crescent k8s render --experiment SPEC`: an experiment's grid as Kubernetes Jobs.

- ConfigMap crescent-exp-NAME: the spec (and, with --config, the base training config) the pods read.
- Indexed Job crescent-exp-NAME: completion index i runs static point i (`static_points`: every sweep value of
  every arm that needs no other result, first seed), one GPU each by default, all logging to the cluster's MLflow
  (MLFLOW_TRACKING_URI of the overlay's training pod) under one parent run found by the same key. A failed index
  is retried (backoffLimitPerIndex) and never fails the others (maxFailedIndexes = all).
- Job crescent-exp-NAME-report: waits until every static point has finished or failed, then runs what depends on
  their results (edge extensions, the other seeds, lr_from / init_from arms) and writes the report.

The pods are built from the overlay's training pod (image, security context, volumes, MLflow address), so they
follow the same deployment rules (app/k8s/policy.py) and validate as strictly as the other manifests.
"""
from __future__ import annotations

import copy
import re

from app.experiments.configs import blocked_arms
from app.experiments.plan import static_points
from app.experiments.spec import load_spec, spec_path
from app.k8s import policy
from app.k8s.render import (
    TRAIN_CONTAINER,
    TRAIN_JOB,
    RenderError,
    RenderParams,
    container,
    find,
    render,
    set_gpus,
)

SPEC_MOUNT = "/etc/crescent-experiment"
WORK_ROOT = "/checkpoints/experiments"


def experiment_objects(spec_name: str, size: str, params: RenderParams, parallelism: int | None = None,
                       gpus_per_point: int = 1, key: str | None = None, wait_timeout_s: int = 7 * 86400) -> list[dict]:
    spec = load_spec(spec_name, size)
    points = static_points(spec, blocked_arms(spec))
    if not points:
        raise RenderError(f"experiment {spec.name!r} ({size}) has no point to run with this build")
    if parallelism is not None and parallelism < 1:
        raise RenderError(f"parallelism={parallelism!r}: must be >= 1")
    if gpus_per_point < 0:
        raise RenderError(f"gpus_per_point={gpus_per_point!r}: must be >= 0 (0 = CPU)")
    base = render(params)
    try:
        train = find(base, "Job", TRAIN_JOB)
    except RenderError:
        raise RenderError(f"overlay={params.overlay!r} has no Indexed Job {TRAIN_JOB}; render experiments with the "
                          "dev or prod overlay") from None
    name = _job_name(spec.name)
    key = key or f"{spec.name}-{size}-k8s"
    work_dir = f"{WORK_ROOT}/{spec.name}-{size}"
    namespace = train["metadata"].get("namespace")
    labels = {**train["metadata"].get("labels", {}), "app.kubernetes.io/component": "experiment",
              "crescent/experiment": spec.name}
    data = {"spec.yaml": spec_path(spec_name).read_text()}
    args = ["experiment", "run", f"{SPEC_MOUNT}/spec.yaml", "--size", size, "--key", key, "--work-dir", work_dir]
    if params.config:
        from app.experiments.configs import resolve_config_path

        data["config.yaml"] = resolve_config_path(params.config).read_text()
        args += ["--base-config", f"{SPEC_MOUNT}/config.yaml"]
    config_map = {"apiVersion": "v1", "kind": "ConfigMap",
                  "metadata": _meta(name, namespace, labels), "data": data}
    points_job = _job(train, f"{name}", namespace, labels, args + ["--point-index", "$(JOB_COMPLETION_INDEX)"],
                      gpus_per_point, name)
    spec_ = points_job["spec"]
    spec_.update({"completionMode": "Indexed", "completions": len(points),
                  "parallelism": min(parallelism or len(points), len(points)), "backoffLimitPerIndex": 2,
                  "maxFailedIndexes": len(points)})
    spec_.pop("backoffLimit", None)
    report_job = _job(train, f"{name}-report", namespace, labels,
                      args + ["--wait-static", "--wait-timeout", str(wait_timeout_s)], gpus_per_point, name)
    report_job["spec"]["backoffLimit"] = 2
    report_job["metadata"]["annotations"] = {"crescent/points": str(len(points))}
    objects = [config_map, points_job, report_job]
    issues = policy.problems(objects)
    if issues:
        raise RenderError("the experiment's objects break the deployment rules:\n  " + "\n  ".join(issues))
    return objects


def _job_name(spec_name: str) -> str:
    """crescent-exp-NAME, a DNS label short enough for the Indexed Job's pod hostnames (NAME-INDEX-xxxxx)."""
    name = re.sub(r"[^a-z0-9-]", "-", f"crescent-exp-{spec_name}").strip("-")[:45].rstrip("-")
    return name


def _meta(name: str, namespace: str | None, labels: dict) -> dict:
    meta = {"name": name, "labels": dict(labels)}
    if namespace:
        meta["namespace"] = namespace
    return meta


def _job(train: dict, name: str, namespace: str | None, labels: dict, args: list[str], gpus: int,
         config_map: str) -> dict:
    """A Job whose pod is the training pod running `crescent ARGS` on one node (no torchrun, no rendezvous)."""
    template = copy.deepcopy(train["spec"]["template"])
    template["metadata"]["labels"] = {**template["metadata"].get("labels", {}), **labels}
    pod = template["spec"]
    pod.pop("subdomain", None)
    pod["terminationGracePeriodSeconds"] = min(int(pod.get("terminationGracePeriodSeconds", 600)), 600)
    trainer = container(pod, TRAIN_CONTAINER)
    point = {k: v for k, v in trainer.items() if k not in ("ports", "command", "args", "name")}
    point.update({"name": "experiment", "command": ["crescent"], "args": list(args), "workingDir": "/checkpoints"})
    set_gpus(point.setdefault("resources", {}), gpus)
    point["volumeMounts"] = [m for m in point.get("volumeMounts", []) if m["name"] != "config"] + [
        {"name": "experiment", "mountPath": SPEC_MOUNT, "readOnly": True}]
    pod["containers"] = [point]
    pod["volumes"] = [v for v in pod.get("volumes", []) if v["name"] != "config"] + [
        {"name": "experiment", "configMap": {"name": config_map}}]
    spec = {"template": template, "podFailurePolicy": copy.deepcopy(train["spec"].get("podFailurePolicy", {}))}
    if not spec["podFailurePolicy"]:
        spec.pop("podFailurePolicy")
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": _meta(name, namespace, labels), "spec": spec}
