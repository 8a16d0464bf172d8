"""Evaluation results into MLflow, next to the training curves.

A checkpoint whose crescent.json names a training run gets its metrics on that run, at the checkpoint's step
(`eval/mmlu/acc`, `eval/gsm8k/exact_match/strict-match`, `eval/humaneval/pass_at_1`), tags for each task's few-shot count, limit and
source, and the results JSON as an artifact under `eval/step-XXXXXXXX/`. A checkpoint without a run id (or whose
run this tracking store does not know) gets its own run in the `eval` experiment. Either way a tag
`crescent.eval.step-XXXXXXXX` records `done` or `failed: ...`, which is how `watch` knows what is left to do.
"""
from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
from pathlib import Path

from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from components.checkpoint import export_dir_name

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlruns.db"
EVAL_EXPERIMENT = "eval"
STATUS_TAG = "crescent.eval.{name}"
CHECKPOINT_TAG = "crescent.checkpoint"


def resolve_tracking_uri(cli_uri: str | None = None, metadata: dict | None = None) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else the URI the training run recorded, else sqlite:///mlruns.db."""
    return (cli_uri or os.environ.get("MLFLOW_TRACKING_URI") or (metadata or {}).get("tracking_uri")
            or DEFAULT_TRACKING_URI)


def metric_key(task: str, metric: str) -> str:
    """MLflow-safe name: eval/humaneval/pass@1 -> eval/humaneval/pass_at_1 (MLflow rejects '@' and ',')."""
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", f"eval/{task}/{metric}".replace("@", "_at_"))


class EvalTracker:
    def __init__(self, tracking_uri: str):
        self.uri = tracking_uri
        self.client = MlflowClient(tracking_uri)

    def target_run(self, metadata: dict, checkpoint: str | Path) -> str:
        """The run that receives this checkpoint's results (created in `eval` when there is none)."""
        run_id = metadata.get("run_id")
        if run_id:
            try:
                self.client.get_run(run_id)
                return run_id
            except MlflowException:
                log.warning("run %s (from %s) is not in tracking store %s; logging into experiment %r instead",
                            run_id, checkpoint, self.uri, EVAL_EXPERIMENT)
        path = str(Path(checkpoint).resolve())
        experiment = self.client.get_experiment_by_name(EVAL_EXPERIMENT)
        experiment_id = experiment.experiment_id if experiment else self._create_experiment()
        found = self.client.search_runs([experiment_id], filter_string=f"tags.`{CHECKPOINT_TAG}` = '{path}'",
                                        max_results=1)
        if found:
            return found[0].info.run_id
        tags = {CHECKPOINT_TAG: path, "mlflow.runName": f"eval {Path(path).parent.name}/{Path(path).name}"}
        if run_id:
            tags["crescent.training_run_id"] = run_id
        run = self.client.create_run(experiment_id, tags=tags)
        self.client.set_terminated(run.info.run_id)
        return run.info.run_id

    def _create_experiment(self) -> str:
        try:
            return self.client.create_experiment(EVAL_EXPERIMENT)
        except MlflowException:  # another watcher created it a moment ago
            return self.client.get_experiment_by_name(EVAL_EXPERIMENT).experiment_id

    def status(self, run_id: str, step: int) -> str | None:
        return self.client.get_run(run_id).data.tags.get(STATUS_TAG.format(name=export_dir_name(step)))

    def mark(self, run_id: str, step: int, status: str) -> None:
        self.client.set_tag(run_id, STATUS_TAG.format(name=export_dir_name(step)), status[:5000])

    def log_results(self, run_id: str, doc: dict) -> None:
        """Metrics at the checkpoint's step, per-task tags, and the results JSON as an artifact."""
        step, now = doc["step"], int(time.time() * 1000)
        metrics = [Metric(metric_key(task, name), value, now, step)
                   for task, entry in doc["tasks"].items() for name, value in entry["metrics"].items()]
        if metrics:
            self.client.log_batch(run_id, metrics=metrics)
        for task, entry in doc["tasks"].items():
            for field in ("num_fewshot", "limit", "source"):
                self.client.set_tag(run_id, f"eval.{task}.{field}", str(entry[field]))
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "results.json"
            path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
            self.client.log_artifact(run_id, str(path), artifact_path=f"eval/{export_dir_name(step)}")
