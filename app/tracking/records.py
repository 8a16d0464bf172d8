"""What each journal record becomes in one MLflow run (the record kinds are listed in delivery.py).

Metrics, tags and system samples of consecutive records go out as one ``MlflowClient.log_batch`` (MLflow splits it
into its per-request limits); params, artifacts, dataset inputs and logged models one record per call. A record
that raises ``MlflowException`` with a permanent error code is dropped by the caller; anything else is retried.
"""
from __future__ import annotations

import logging
import os
import shutil
from typing import Any

from app.tracking.params import split_params
from app.tracking.resume import already_delivered, system_metrics_position

log = logging.getLogger(__name__)
_BATCHED = ("m", "t", "s")
MODEL_TYPE = "crescent-export"  # the logged models of export checkpoints (lineage.py)


class RunRecords:
    """Sends records to ``run_id``; remembers what a resumed run must not get twice (resume.py)."""

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id
        self.superseded = 0  # records skipped because an earlier process delivered them
        self._superseded_pairs: set[tuple[str, int]] = set()
        self._system_step, self._system_last_timestamp = 0, -1  # the run's next system/ step, its last sample
        self._experiment_id: str | None = None

    def continue_run(self, resume_step: int | None, backlog: set[tuple[str, int]]) -> None:
        """The run existed: system samples continue after its last one; the (key, step) metrics it already holds
        after ``resume_step`` (a checkpoint's) or among a previous process' ``backlog`` are not sent again."""
        run = self.client.get_run(self.run_id)
        self._experiment_id = run.info.experiment_id
        self._system_step, self._system_last_timestamp = system_metrics_position(run)
        self._superseded_pairs = already_delivered(self.client, run, resume_step, backlog)

    def send(self, records: list[Any]) -> int:
        """Send the first record (with the batchable ones after it); how many records were consumed."""
        from mlflow.exceptions import MlflowException

        kind, body = records[0][0], records[0][1:]
        if kind in _BATCHED:
            return self._send_batch(records)
        if kind == "p":
            self._send_params(body[0])
        elif kind == "a":
            self._send_artifact(*body)
        elif kind == "i":
            self._send_dataset_inputs(body[0])
        elif kind == "lm":
            self._send_logged_model(body[0])
        else:
            raise MlflowException(f"unknown record kind {kind!r}", error_code="BAD_REQUEST")
        return 1

    def _experiment(self) -> str:
        if self._experiment_id is None:
            self._experiment_id = self.client.get_run(self.run_id).info.experiment_id
        return self._experiment_id

    def _send_batch(self, records: list[Any]) -> int:
        from mlflow.entities import Metric, RunTag

        metrics, tags, n = [], {}, 0
        system_step, system_last = self._system_step, self._system_last_timestamp
        for record in records:
            if record is None or record[0] not in _BATCHED:
                break
            if record[0] == "m":
                _, key, value, timestamp, step = record
                if (key, step) in self._superseded_pairs:  # an earlier process delivered this step
                    self.superseded += 1
                else:
                    metrics.append(Metric(key, float(value), int(timestamp), int(step)))
            elif record[0] == "s":
                _, values, timestamp = record
                if timestamp <= system_last:  # delivered before a crash lost the commit
                    self.superseded += 1
                else:
                    metrics.extend(Metric(k, float(v), int(timestamp), system_step) for k, v in values.items())
                    system_step, system_last = system_step + 1, timestamp
            else:
                tags[record[1]] = record[2]  # a later value of the same tag wins, as it would in order
            n += 1
        run_tags = [RunTag(k, v) for k, v in tags.items()]
        if metrics or run_tags:
            self.client.log_batch(self.run_id, metrics=metrics, tags=run_tags, synchronous=True)
        self._system_step, self._system_last_timestamp = system_step, system_last
        return n

    def _send_params(self, flat: dict[str, str]) -> None:
        from mlflow.entities import Param, RunTag

        existing = self.client.get_run(self.run_id).data.params
        to_log, changed = split_params(flat, existing)
        if changed:
            log.warning("params changed on resume (kept as tags param_changed.*): %s", sorted(changed))
        self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in to_log.items()],
                              tags=[RunTag(k, v) for k, v in changed.items()], synchronous=True)

    def _send_artifact(self, path: str, artifact_path: str | None, staged: bool) -> None:
        from mlflow.exceptions import MlflowException

        if not os.path.exists(path):
            raise MlflowException(f"artifact {path} no longer exists", error_code="BAD_REQUEST")
        if os.path.isdir(path):
            self.client.log_artifacts(self.run_id, path, artifact_path)
        else:
            self.client.log_artifact(self.run_id, path, artifact_path)
        if staged:
            shutil.rmtree(os.path.dirname(path), ignore_errors=True)

    def _send_dataset_inputs(self, inputs: list[dict]) -> None:
        from mlflow.entities import Dataset, DatasetInput, InputTag

        datasets = [DatasetInput(Dataset(**i["dataset"]), [InputTag(k, v) for k, v in i["tags"].items()])
                    for i in inputs]
        self.client.log_inputs(self.run_id, datasets=datasets)

    def _send_logged_model(self, model: dict) -> None:
        """Find (by source run and name) or create the export's logged model, make it an output of the run at its
        step, log its metrics (run and model), mark it READY."""
        from mlflow.entities import LoggedModelOutput, Metric

        experiment_id = self._experiment()
        found = self.client.search_logged_models(
            [experiment_id], filter_string=f"source_run_id = '{self.run_id}' AND name = '{model['name']}'",
            max_results=1)
        if found:
            model_id = found[0].model_id
            self.client.set_logged_model_tags(model_id, model["tags"])
        else:
            model_id = self.client.create_logged_model(
                experiment_id, name=model["name"], source_run_id=self.run_id, tags=model["tags"],
                params=model["params"], model_type=MODEL_TYPE).model_id
        if model_id not in {o.model_id for o in self.client.get_run(self.run_id).outputs.model_outputs}:
            self.client.log_outputs(self.run_id, [LoggedModelOutput(model_id, model["step"])])
        metrics = [Metric(k, v, model["timestamp"], model["step"], model_id=model_id)
                   for k, v in model["metrics"].items()]
        self.client.log_batch(self.run_id, metrics=metrics, synchronous=True)
        self.client.finalize_logged_model(model_id, "READY")
