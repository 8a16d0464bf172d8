"""The experiment in MLflow: one parent run, one child run per grid point (tag `mlflow.parentRunId`), and what is
read back from them. MLflow is the one owner of "which points have finished": nothing is kept beside it.

Tags on the parent: crescent.role=parent, crescent.experiment, crescent.size, crescent.key (the work directory or
a name given on the command line: the same key finds the same parent again). On each child: crescent.point, its
group, arm, lr_scale, seed and budget, and crescent.measured once the runner took its measurements.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from app.tracking.store import default_artifact_location, experiment_id, resolve_tracking_uri

PARENT_TAG = "mlflow.parentRunId"
ROLE, EXPERIMENT, SIZE, KEY, POINT = "crescent.role", "crescent.experiment", "crescent.size", "crescent.key", \
    "crescent.point"
MEASURED = "crescent.measured"
FAILED_PREFIX = "crescent.failed."  # parent tag per failed point: the failure's last line


@dataclass
class ChildRun:
    """A point's run as MLflow has it."""

    point: str
    run_id: str
    status: str  # FINISHED, FAILED, KILLED, RUNNING, SCHEDULED
    tags: dict
    metrics: dict  # latest value of each metric
    start_time: int
    tokens: float = math.nan
    val_loss: float = math.nan

    @property
    def measured(self) -> bool:
        return self.tags.get(MEASURED) == "done"

    @property
    def complete(self) -> bool:
        """FINISHED after its whole token budget (the tag crescent.tokens the runner set)."""
        planned = self.tags.get("crescent.tokens")
        return (self.status == "FINISHED" and planned is not None and math.isfinite(self.tokens)
                and self.tokens >= float(planned))

    def done(self, needs_measurements: bool) -> bool:
        return self.complete and (self.measured or not needs_measurements)


@dataclass
class Experiment:
    """A handle on the parent run and its client."""

    client: object
    tracking_uri: str
    experiment_id: str
    parent_id: str
    tags: dict = field(default_factory=dict)


def client_for(tracking_uri: str | None):
    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(tracking_uri)
    return MlflowClient(uri), uri


def find_or_create_parent(tracking_uri: str | None, mlflow_experiment: str, name: str, size: str, key: str,
                          new: bool = False, params: dict | None = None) -> Experiment:
    """The parent run tagged with `key` (the oldest, if processes raced to create it), created when there is none.

    Two processes that start at once (pods of an Indexed Job) may both create one; both then pick the oldest
    and the other deletes its own, so every child ends under the same parent.
    """
    client, uri = client_for(tracking_uri)
    exp_id = experiment_id(client, mlflow_experiment, default_artifact_location(uri))
    existing = _parents(client, exp_id, key)
    if new:  # the earlier parents stay in MLflow but are no longer found by this key
        for run in existing:
            client.set_tag(run.info.run_id, KEY, f"{key}#superseded-by-a-new-run")
        existing = []
    if existing:
        return Experiment(client, uri, exp_id, existing[0].info.run_id, dict(existing[0].data.tags))
    tags = {ROLE: "parent", EXPERIMENT: name, SIZE: size, KEY: key}
    created = client.create_run(exp_id, run_name=f"{name}-{size}", tags=tags)
    for k, v in (params or {}).items():
        client.log_param(created.info.run_id, k, v)
    winner = created if new else _parents(client, exp_id, key)[0]
    if winner.info.run_id != created.info.run_id:
        client.delete_run(created.info.run_id)
    return Experiment(client, uri, exp_id, winner.info.run_id, dict(winner.data.tags))


def _parents(client, exp_id: str, key: str) -> list:
    escaped = key.replace("'", "\\'")
    runs = client.search_runs([exp_id], filter_string=f"tags.`{ROLE}` = 'parent' and tags.`{KEY}` = '{escaped}'",
                              max_results=1000)
    return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))


def open_parent(tracking_uri: str | None, parent_id: str) -> Experiment:
    client, uri = client_for(tracking_uri)
    run = client.get_run(parent_id)
    if run.data.tags.get(ROLE) != "parent":
        raise ValueError(f"run {parent_id} is not an experiment's parent run (no tag {ROLE}=parent)")
    return Experiment(client, uri, run.info.experiment_id, parent_id, dict(run.data.tags))


def children(exp: Experiment) -> dict[str, ChildRun]:
    """Point id -> its run: the finished one if any, else the newest."""
    runs = exp.client.search_runs([exp.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{exp.parent_id}'",
                                  max_results=5000)
    out: dict[str, ChildRun] = {}
    for r in sorted(runs, key=lambda r: r.info.start_time):
        point = r.data.tags.get(POINT)
        if point is None:
            continue
        child = ChildRun(point, r.info.run_id, r.info.status, dict(r.data.tags), dict(r.data.metrics),
                         r.info.start_time, r.data.metrics.get("train/tokens", math.nan))
        previous = out.get(point)
        if previous is None or previous.status != "FINISHED" or child.status == "FINISHED":
            out[point] = child
    for child in out.values():
        child.val_loss = final_value(exp, child.run_id, "val/loss")
    return out


def history(exp: Experiment, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of a metric, in step order (the last value of a step wins)."""
    by_step = {}
    for m in sorted(exp.client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp)):
        by_step[m.step] = m.value
    return sorted(by_step.items())


def final_value(exp: Experiment, run_id: str, key: str) -> float:
    values = history(exp, run_id, key)
    return values[-1][1] if values else math.nan


def over_tokens(exp: Experiment, run_id: str, key: str) -> list[tuple[float, float]]:
    """(tokens seen, value) of a metric, via train/tokens at the same step (0 before the first step)."""
    tokens = dict(history(exp, run_id, "train/tokens"))
    return [(tokens.get(step, 0.0), value) for step, value in history(exp, run_id, key)]


def record_failure(exp: Experiment, point: str, why: str) -> None:
    exp.client.set_tag(exp.parent_id, FAILED_PREFIX + point, why[-4000:] or "failed")


def clear_failure(exp: Experiment, point: str) -> None:
    tags = exp.client.get_run(exp.parent_id).data.tags
    if FAILED_PREFIX + point in tags:
        exp.client.delete_tag(exp.parent_id, FAILED_PREFIX + point)


def failures(exp: Experiment) -> dict[str, str]:
    tags = exp.client.get_run(exp.parent_id).data.tags
    return {k[len(FAILED_PREFIX):]: v for k, v in tags.items() if k.startswith(FAILED_PREFIX)}


def has_artifact(exp: Experiment, path: str) -> bool:
    return any(a.path == path for a in exp.client.list_artifacts(exp.parent_id))


def log_artifact_files(exp: Experiment, paths: list[str], artifact_path: str | None = None) -> None:
    for path in paths:
        if os.path.exists(path):
            exp.client.log_artifact(exp.parent_id, path, artifact_path)
