"""Evaluation results into MLflow, next to the training curves.

A checkpoint whose crescent.json names a training run gets its metrics on that run, at the checkpoint's step
(`eval/mmlu/acc` for MMLU's test split, `eval/mmlu_dev/acc` for lm-eval's dev questions,
`eval/gsm8k/exact_match/strict-match`, `eval/humaneval/pass_at_1`), tags for each task's split, few-shot count,
limit and source, and each task's results JSON as an artifact `eval/step-XXXXXXXX/TASK.json`. A checkpoint without a
run id (or whose run this tracking store does not know) gets its own run in the `eval` experiment.

The metrics are also the scores of the checkpoint's MLflow logged model (the one training logged for the export,
named `step-XXXXXXXX`, produced by the run; created here when training could not log it): each metric carries the
model id and the evaluation set as its dataset (the task's name, a digest of what was evaluated), so the model's
page in the UI shows how it scored and its source run which data trained it. Evaluation is a short-lived process,
so it talks to MLflow directly (blocking calls), not through training's outage spool.

Status tags say what is left to do, per task: `crescent.eval.step-XXXXXXXX.TASK` is `done`, `failed:N: ...` (N
attempts so far) or `skipped: REASON` (no data here: the warning a user sees on the run). The checkpoint's own tag
`crescent.eval.step-XXXXXXXX` holds `running:HOST:PID:UNIXTIME` while a watcher works on it, then a summary.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import time
from pathlib import Path

from mlflow.entities import LoggedModelOutput, Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

from components.checkpoint import export_dir_name

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlruns.db"
EVAL_EXPERIMENT = "eval"
STATUS_TAG = "crescent.eval.{name}"
TASK_STATUS_TAG = "crescent.eval.{name}.{task}"
CHECKPOINT_TAG = "crescent.checkpoint"
MODEL_TYPE = "crescent-export"  # what training gives an export's logged model (app/tracking/lineage.py)


def resolve_tracking_uri(cli_uri: str | None = None, metadata: dict | None = None) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else the URI the training run recorded, else sqlite:///mlruns.db."""
    return (cli_uri or os.environ.get("MLFLOW_TRACKING_URI") or (metadata or {}).get("tracking_uri")
            or DEFAULT_TRACKING_URI)


def metric_key(task: str, metric: str) -> str:
    """MLflow-safe name: eval/humaneval/pass@1 -> eval/humaneval/pass_at_1 (MLflow rejects '@' and ',')."""
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", f"eval/{task}/{metric}".replace("@", "_at_"))


class TrackingFailed(RuntimeError):
    """The MLflow store failed; the message names it and says what was (not) evaluated and published."""


def describe_error(err: MlflowException, limit: int = 400) -> str:
    """An MLflow error's message on one line (a REST failure's message carries the whole response)."""
    text = " ".join(str(err.message if hasattr(err, "message") else err).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


class EvalTracker:
    def __init__(self, tracking_uri: str):
        self.uri = tracking_uri
        self.client = MlflowClient(tracking_uri)
        self._models: dict[tuple[str, int], str] = {}

    def target_run(self, metadata: dict, checkpoint: str | Path) -> str:
        """The run that receives this checkpoint's results (created in `eval` when there is none): the export's
        `run_id`, or the run its `run_tags` identify (an export written before training's run was created, e.g.
        while the tracking server was unreachable, names the run by its run key)."""
        run_id = metadata.get("run_id") or self._run_with_tags(metadata.get("run_tags"))
        if run_id:
            try:
                self.client.get_run(run_id)
                return run_id
            except MlflowException as err:
                if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise  # the store failed (503, timeout, server down): the run may well be there
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

    def _run_with_tags(self, tags: dict | None) -> str | None:
        if not tags:
            return None
        experiments = [e.experiment_id for e in self.client.search_experiments()]
        query = " and ".join(f"tags.`{key}` = '{value}'" for key, value in sorted(tags.items()))
        found = self.client.search_runs(experiments, filter_string=query, max_results=1) if experiments else []
        return found[0].info.run_id if found else None

    def _create_experiment(self) -> str:
        try:
            return self.client.create_experiment(EVAL_EXPERIMENT)
        except MlflowException:  # another watcher created it a moment ago
            return self.client.get_experiment_by_name(EVAL_EXPERIMENT).experiment_id

    def status(self, run_id: str, step: int) -> str | None:
        """The checkpoint's own tag: the running marker or the summary of its last evaluation."""
        return self.client.get_run(run_id).data.tags.get(STATUS_TAG.format(name=export_dir_name(step)))

    def mark(self, run_id: str, step: int, status: str) -> None:
        self.client.set_tag(run_id, STATUS_TAG.format(name=export_dir_name(step)), status[:MAX_TAG_VAL_LENGTH])

    def task_statuses(self, run_id: str, step: int) -> dict[str, str]:
        """task -> its status tag for this checkpoint (tasks never attempted are absent)."""
        prefix = STATUS_TAG.format(name=export_dir_name(step)) + "."
        tags = self.client.get_run(run_id).data.tags
        return {key[len(prefix):]: value for key, value in tags.items() if key.startswith(prefix)}

    def mark_task(self, run_id: str, step: int, task: str, status: str) -> None:
        self.client.set_tag(run_id, TASK_STATUS_TAG.format(name=export_dir_name(step), task=task), status[:MAX_TAG_VAL_LENGTH])

    def record_failures(self, run_id: str, step: int, failed: dict[str, str], statuses: dict[str, str]) -> None:
        """`failed:N: error` for each failed task, N counting this attempt (`statuses`: the tags before it)."""
        for task, error in failed.items():
            self.mark_task(run_id, step, task, f"failed:{failed_attempts(statuses.get(task)) + 1}: {error}")

    def log_results(self, run_id: str, doc: dict, tasks: list[str] | None = None) -> None:
        """Per-task tags, each task's results JSON as an artifact, then the metrics at the checkpoint's step, for
        `tasks` (default: every task in `doc`)."""
        step, now = doc["step"], int(time.time() * 1000)
        chosen = {t: doc["tasks"][t] for t in (tasks if tasks is not None else doc["tasks"])}
        model_id = self.logged_model(run_id, doc)
        metrics = [Metric(metric_key(task, name), value, now, step, model_id=model_id, dataset_name=task,
                          dataset_digest=eval_set_digest(entry, doc["lm_eval"].get(task)))
                   for task, entry in chosen.items() for name, value in entry["metrics"].items()]
        for task, entry in chosen.items():
            for key in ("split", "num_fewshot", "limit", "source"):
                self.client.set_tag(run_id, f"eval.{task}.{key}", str(entry[key]))
        with tempfile.TemporaryDirectory() as tmp:
            for task, entry in chosen.items():
                path = Path(tmp) / f"{task}.json"
                record = {k: v for k, v in doc.items() if k not in ("tasks", "lm_eval", "failed", "skipped")}
                record.update(task=task, result=entry, lm_eval=doc["lm_eval"].get(task))
                path.write_text(json.dumps(record, indent=2, default=str) + "\n")
                self.client.log_artifact(run_id, str(path), artifact_path=f"eval/{export_dir_name(step)}")
        if metrics:  # last: a task whose tags or artifact failed is evaluated again without a duplicate metric
            self.client.log_batch(run_id, metrics=metrics)


    def logged_model(self, run_id: str, doc: dict) -> str:
        """The id of the checkpoint's logged model: the run's model named after the export folder, created (an
        output of the run at the checkpoint's step) when training has not logged it."""
        step = doc["step"]
        if (run_id, step) in self._models:
            return self._models[(run_id, step)]
        experiment_id, name = self.client.get_run(run_id).info.experiment_id, export_dir_name(step)
        found = self.client.search_logged_models(
            [experiment_id], filter_string=f"source_run_id = '{run_id}' AND name = '{name}'", max_results=1)
        if found:
            model_id = found[0].model_id
        else:
            params = {"export_uri": Path(doc["checkpoint"]).resolve().as_uri(), "step": str(step),
                      "tokens_seen": str(doc.get("tokens_seen"))}
            model_id = self.client.create_logged_model(experiment_id, name=name, source_run_id=run_id, params=params,
                                                       tags={"crescent.export": doc["checkpoint"]},
                                                       model_type=MODEL_TYPE).model_id
            self.client.log_outputs(run_id, [LoggedModelOutput(model_id, step)])
            self.client.finalize_logged_model(model_id, "READY")
        self._models[(run_id, step)] = model_id
        return model_id


def eval_set_digest(entry: dict, lm_eval: dict | None) -> str:
    """16 hex digits naming what a task evaluated: lm-eval task and version, split, few-shot, limit, documents."""
    versions = (lm_eval or {}).get("versions") or {}
    what = {k: entry.get(k) for k in ("lm_eval_task", "source", "split", "num_fewshot", "limit", "documents")}
    what["version"] = versions.get(entry.get("lm_eval_task"))
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def failed_attempts(status: str | None) -> int:
    """Failed attempts recorded in a task's status tag (`failed:N: ...`); 0 for any other status."""
    if not status or not status.startswith("failed:"):
        return 0
    count = status.split(":", 2)[1]
    return int(count) if count.isdigit() else 1
