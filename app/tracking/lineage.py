"""Lineage in MLflow's own entities: the shard sets a run reads as dataset inputs, its exports as logged models.

- Each training shard set is an ``mlflow.data`` dataset input of the run (``ShardSetDataset``: name and profile
  from ``manifest.json``, a digest of its shards' sha256, the source URI the run read it from, a tensor schema),
  with the input tag ``mlflow.data.context`` naming the stages that draw from it (``warmup,decay``), or
  ``validation`` for the held-out set; ``crescent.mixture.<stage>`` holds the stage's mixture weight.
- Each export checkpoint is an MLflow 3 ``LoggedModel`` named after its folder (``step-00000100``), produced by the
  run at the export's step (``log_outputs``), with the export's URI, step and tokens seen as params and
  ``train/tokens`` as its metric; evaluation attaches its scores to the same model (eval/tracking.py).

The training side builds JSON records here (``dataset_input_records``, ``logged_model_record``); the delivery
thread sends them (records.py), so an unreachable server delays lineage like any metric and never stops training.
Sending is idempotent: MLflow keeps one input per (dataset, run), and the model of
an export is looked up by (source run, name) before one is created (a resumed run exports a step again).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from mlflow.data.meta_dataset import MetaDataset
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
from mlflow.utils.validation import MAX_INPUT_TAG_VALUE_SIZE

from app.tracking.logger import mlflow_logger
from app.tracking.params import truncate
from components.data.shards import read_manifest

log = logging.getLogger(__name__)

VALIDATION_CONTEXT = "validation"


class ShardSetDataset(MetaDataset):
    """A shard set as an MLflow dataset: metadata only (the shards stay where they are), with a profile."""

    def __init__(self, source, name: str, digest: str, schema, profile: dict[str, Any]):
        self._profile = profile
        super().__init__(source=source, name=name, digest=digest, schema=schema)

    @property
    def profile(self) -> dict[str, Any]:
        return self._profile

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self._profile)}


def shard_set_digest(manifest: dict) -> str:
    """16 hex digits of sha256 over the shards' own sha256 (in order) and the tokenizer fingerprint: the same
    samples give the same digest wherever the set is stored."""
    lines = [f"{s['file']} {s.get('sha256') or json.dumps(s, sort_keys=True)}" for s in manifest["shards"]]
    lines.append(str(manifest.get("tokenizer", {}).get("fingerprint")))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def shard_set_dataset(location: str, manifest: dict) -> ShardSetDataset:
    """The MLflow dataset of the shard set at ``location`` (local path, s3://, gs://, https://)."""
    import numpy as np
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.types import Schema, TensorSpec

    uri = location if "://" in location else os.path.abspath(location)
    with warnings.catch_warnings():  # MLflow registers its local source twice and warns about the tie
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(uri)
    schema = Schema([TensorSpec(np.dtype(manifest["dtype"]), (-1, manifest["sample_tokens"]), "tokens")])
    profile = {key: manifest.get(key) for key in ("samples", "tokens", "documents", "seq_len", "seed", "kind")}
    profile.update(shards=len(manifest["shards"]), tokenizer=manifest.get("tokenizer", {}).get("fingerprint"))
    return ShardSetDataset(source, manifest["name"], shard_set_digest(manifest), schema, profile)


def dataset_input_records(shards: dict[str, str], schedule, val_shards: str | None) -> list[dict]:
    """One input per shard set the schedule draws from (context: its stages) and the validation set."""
    inputs = []
    for mixture in schedule.mixture_names():
        weights = {s.name: s.mixture[mixture] for s in schedule.stages if s.mixture.get(mixture, 0) > 0}
        tags = {MLFLOW_DATASET_CONTEXT: ",".join(weights), "crescent.mixture": mixture}
        tags.update({f"crescent.mixture.{stage}": str(weight) for stage, weight in weights.items()})
        inputs.append(_input(shards[mixture], tags))
    if val_shards:
        inputs.append(_input(val_shards, {MLFLOW_DATASET_CONTEXT: VALIDATION_CONTEXT}))
    return inputs


def _input(location: str, tags: dict[str, str]) -> dict:
    fields = shard_set_dataset(location, read_manifest(location)).to_dict()
    return {"dataset": fields, "tags": {k: truncate(v, MAX_INPUT_TAG_VALUE_SIZE) for k, v in tags.items()}}


def logged_model_record(export_path: str, step: int, tokens_seen: int, extra: dict[str, Any]) -> dict:
    """The logged model of one export: name, step, params (export URI, step, tokens seen, ``extra``), metrics."""
    path = os.path.abspath(export_path)
    params = {"export_uri": Path(path).as_uri(), "step": str(step), "tokens_seen": str(tokens_seen)}
    params.update({k: str(v) for k, v in extra.items()})
    return {"name": os.path.basename(path), "step": step, "params": params, "tags": {"crescent.export": path},
            "metrics": {"train/tokens": float(tokens_seen)}, "timestamp": int(time.time() * 1000)}


class DatasetLineage(pl.Callback):
    """Logs the shard sets the run reads as its dataset inputs when training starts (rank 0; after the data
    module's setup, so the demo corpus and an epoch schedule's set are known). Again on resume: MLflow keeps one."""

    def on_fit_start(self, trainer, pl_module) -> None:
        logger, data = mlflow_logger(trainer.loggers), trainer.datamodule
        if logger is None or not trainer.is_global_zero or data is None:
            return
        try:
            inputs = dataset_input_records(data.shards, data.schedule, data.val_shards)
        except (OSError, ValueError, KeyError) as error:  # lineage is worth a warning, not a stopped run
            log.warning("shard sets not logged as MLflow dataset inputs: %s: %s", type(error).__name__, error)
            return
        logger.log_dataset_inputs(inputs)
