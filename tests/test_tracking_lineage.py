"""Lineage in MLflow's own entities: shard sets as dataset inputs of the run, exports as its logged models, and
evaluation scores on those models. Real shard sets (tar shards + manifest), a real sqlite MLflow store."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from mlflow import MlflowClient
from tracking_helpers import dead_uri, sqlite_store

from app.tracking import CrescentMLflowLogger, logged_model_record
from app.tracking.lineage import dataset_input_records, shard_set_digest
from components.data.shards import read_manifest, write_shards
from components.schedule import StageSchedule
from eval.tracking import EvalTracker, eval_set_digest

SEQ_LEN = 16
STAGES = [  # prose in every stage, code from the second on
    {"name": "warmup", "end_tokens": 1000, "lr_shape": "linear", "lr_start": 0.0, "lr_end": 1e-3, "batch_size": 4,
     "mixture": {"prose": 1.0}},
    {"name": "decay", "end_tokens": 3000, "lr_shape": "cosine", "lr_start": 1e-3, "lr_end": 1e-4, "batch_size": 4,
     "mixture": {"prose": 0.7, "code": 0.3}},
    {"name": "cooldown", "end_tokens": 4000, "lr_shape": "linear", "lr_start": 1e-4, "lr_end": 0.0, "batch_size": 4,
     "mixture": {"prose": 0.2, "code": 0.8}},
]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return sqlite_store(tmp_path_factory.mktemp("mlflow"))


def _shard_set(path, name: str, seed: int, samples: int = 40) -> str:
    rows = np.random.default_rng(seed).integers(0, 500, size=(samples, SEQ_LEN + 1), dtype=np.uint16)
    write_shards(rows, path, seed=seed, shard_samples=16, name=name,
                 info={"tokenizer": {"fingerprint": "bpe-512-test"}, "documents": samples})
    return str(path)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
    return {name: _shard_set(root / name, name, seed) for seed, name in enumerate(("prose", "code", "val"))}


def _logger(uri, tmp_path, **kwargs):
    return CrescentMLflowLogger(experiment_name="lineage", tracking_uri=uri, spool_dir=str(tmp_path / "spool"),
                                poll_interval_s=0.05, max_backoff_s=0.2, **kwargs)


def _inputs(sets):
    schedule = StageSchedule(STAGES, seq_len=SEQ_LEN)
    return dataset_input_records({"prose": sets["prose"], "code": sets["code"]}, schedule, sets["val"])


def _models(uri, run_id):
    client = MlflowClient(uri)
    found = client.search_logged_models([client.get_run(run_id).info.experiment_id],
                                        filter_string=f"source_run_id = '{run_id}'")
    return {m.name: m for m in found}


def test_shard_sets_are_dataset_inputs_with_their_stages_as_context(store, sets, tmp_path):
    logger = _logger(store, tmp_path)
    logger.log_dataset_inputs(_inputs(sets))
    logger.log_dataset_inputs(_inputs(sets))  # a resumed run logs them again: MLflow keeps one input each
    assert logger.flush(timeout=60)
    logger.finalize("success")

    inputs = {i.dataset.name: i for i in MlflowClient(store).get_run(logger.run_id).inputs.dataset_inputs}
    assert sorted(inputs) == ["code", "prose", "val"]
    context = {name: {t.key: t.value for t in i.tags} for name, i in inputs.items()}
    assert context["prose"]["mlflow.data.context"] == "warmup,decay,cooldown"
    assert context["code"]["mlflow.data.context"] == "decay,cooldown"
    assert context["val"] == {"mlflow.data.context": "validation"}
    assert {k: v for k, v in context["code"].items() if k.startswith("crescent.mixture.")} == \
        {"crescent.mixture.decay": "0.3", "crescent.mixture.cooldown": "0.8"}
    for name, path in sets.items():
        dataset, manifest = inputs[name].dataset, read_manifest(path)
        assert dataset.digest == shard_set_digest(manifest) and len(dataset.digest) == 16
        assert dataset.source_type == "local" and json.loads(dataset.source) == {"uri": path}
        profile = json.loads(dataset.profile)
        assert (profile["samples"], profile["tokens"], profile["shards"]) == (40, 40 * (SEQ_LEN + 1), 3)
        assert profile["tokenizer"] == "bpe-512-test"
        assert json.loads(dataset.schema) == {"mlflow_colspec": [
            {"name": "tokens", "type": "tensor", "tensor-spec": {"dtype": "uint16", "shape": [-1, SEQ_LEN + 1]}}]}


def test_the_digest_follows_the_samples_not_where_the_set_is_stored(sets, tmp_path):
    copy = shutil.copytree(sets["prose"], tmp_path / "elsewhere")
    assert shard_set_digest(read_manifest(str(copy))) == shard_set_digest(read_manifest(sets["prose"]))
    other = _shard_set(tmp_path / "reshuffled", "prose", seed=7)
    assert shard_set_digest(read_manifest(other)) != shard_set_digest(read_manifest(sets["prose"]))


def _eval_doc(export: str, step: int, acc: float) -> dict:
    """What `eval.runner.evaluate_checkpoint` returns for one task (the real run is tests/test_mlflow_postgres.py)."""
    entry = {"lm_eval_task": "crescent_mmlu_dev", "source": "local", "split": "dev", "num_fewshot": 4, "limit": 2,
             "documents": 114, "metrics": {"acc": acc}, "note": ""}
    return {"checkpoint": export, "step": step, "tokens_seen": step * 64, "tasks": {"mmlu_dev": entry},
            "lm_eval": {"mmlu_dev": {"versions": {"crescent_mmlu_dev": 1.0}}}, "failed": {}, "skipped": {}}


def test_an_export_is_a_logged_model_of_the_run_and_evaluation_scores_attach_to_it(store, tmp_path):
    logger = _logger(store, tmp_path)
    exports = tmp_path / "exports"
    for step in (4, 8, 8):  # step 8 exported again after a resume: still one model
        logger.log_logged_model(logged_model_record(str(exports / f"step-{step:08d}"), step, step * 64,
                                                    {"consumed_samples": step * 4, "stage": "decay"}))
    assert logger.flush(timeout=60)
    logger.finalize("success")

    models = _models(store, logger.run_id)
    assert sorted(models) == ["step-00000004", "step-00000008"]
    four = models["step-00000004"]
    assert four.params == {"export_uri": (exports / "step-00000004").as_uri(), "step": "4", "tokens_seen": "256",
                           "consumed_samples": "16", "stage": "decay"}
    assert str(four.status) == "READY" and four.model_type == "crescent-export"
    assert [(m.key, m.value, m.step) for m in four.metrics] == [("train/tokens", 256.0, 4)]
    outputs = MlflowClient(store).get_run(logger.run_id).outputs.model_outputs
    assert sorted((o.step, o.model_id) for o in outputs) == sorted((int(m.params["step"]), m.model_id)
                                                                    for m in models.values())

    tracker = EvalTracker(store)
    doc = _eval_doc(str(exports / "step-00000004"), 4, 0.375)
    tracker.log_results(logger.run_id, doc)
    scored = _models(store, logger.run_id)["step-00000004"]
    [acc] = [m for m in scored.metrics if m.key == "eval/mmlu_dev/acc"]
    assert (acc.value, acc.step, acc.model_id, acc.dataset_name) == (0.375, 4, four.model_id, "mmlu_dev")
    assert acc.dataset_digest == eval_set_digest(doc["tasks"]["mmlu_dev"], doc["lm_eval"]["mmlu_dev"])
    history = MlflowClient(store).get_metric_history(logger.run_id, "eval/mmlu_dev/acc")
    assert [(m.step, m.value) for m in history] == [(4, 0.375)]  # the run's curve as before
    assert not any(m.key.startswith("eval/") for m in _models(store, logger.run_id)["step-00000008"].metrics)


def test_evaluation_that_comes_first_creates_the_model_and_training_reuses_it(store, tmp_path):
    logger = _logger(store, tmp_path)
    logger.log_metrics({"train/loss": 2.0}, step=12)
    run_id = logger.wait_for_run_id(timeout=60)
    export = tmp_path / "exports" / "step-00000012"
    EvalTracker(store).log_results(run_id, _eval_doc(str(export), 12, 0.5))
    logger.log_logged_model(logged_model_record(str(export), 12, 768, {"stage": "cooldown"}))
    assert logger.flush(timeout=60)
    logger.finalize("success")
    [model] = _models(store, run_id).values()
    assert model.name == "step-00000012" and {m.key for m in model.metrics} == {"eval/mmlu_dev/acc", "train/tokens"}
    assert [o.step for o in MlflowClient(store).get_run(run_id).outputs.model_outputs] == [12]


def test_lineage_logged_while_the_server_is_down_reaches_the_run_on_resume(store, sets, tmp_path):
    offline = _logger(dead_uri(), tmp_path)
    offline.log_dataset_inputs(_inputs(sets))
    offline.log_logged_model(logged_model_record(str(tmp_path / "exports" / "step-00000002"), 2, 128, {}))
    state = offline.state_dict()
    offline.finalize("killed", timeout=0.2)
    assert offline.stats()["delivered"] == 0 and offline.stats()["pending"] == 2

    resumed = _logger(store, tmp_path)
    resumed.load_state_dict(state, resume_step=2)
    resumed.log_metrics({"train/loss": 1.5}, step=3)
    assert resumed.flush(timeout=60)
    resumed.finalize("success")
    run = MlflowClient(store).get_run(resumed.run_id)
    assert sorted(i.dataset.name for i in run.inputs.dataset_inputs) == ["code", "prose", "val"]
    assert sorted(_models(store, resumed.run_id)) == ["step-00000002"]
    assert resumed.stats()["rejected"] == 0
