"""CrescentMLflowLogger against a real MLflow sqlite store: params once, metric history, artifacts, resume."""

import dataclasses
import json
import math
import os
import socket
import subprocess
import sys
from argparse import Namespace

import matplotlib.figure
import pytest
import torch
import yaml
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from mlflow import MlflowClient
from torch.utils.data import DataLoader, TensorDataset

from app import plots
from app.tracking import CrescentMLflowLogger


@dataclasses.dataclass
class _Optim:
    lr: float = 2e-3
    weight_decay: float = 0.1


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite store for the module (creating its schema takes seconds)."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlruns.db"
    MlflowClient(uri).search_experiments()  # create the schema once
    return uri


def _logger(store, tmp_path, **kwargs):
    kwargs.setdefault("experiment_name", "test-tracking")
    return CrescentMLflowLogger(tracking_uri=store, spool_dir=str(tmp_path / "spool"), poll_interval_s=0.05,
                                **kwargs)


def _history(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_params_metrics_and_artifacts_read_back(store, tmp_path):
    logger = _logger(store, tmp_path, run_name="first", tags={"preset": "tiny"})
    config = {"model": {"preset": "tiny", "n_layers": 2}, "optim": _Optim(),
              "data": Namespace(seq_len=64, shards=["a", "b"]), "stages": [{"name": "warmup", "tokens": 100}]}
    logger.log_hyperparams(config)
    logger.log_hyperparams(config)  # logged once: the second call changes nothing and does not raise
    logged = {}
    for step in range(30):
        metrics = {"train/loss": 5.0 - 0.1 * step, "lr": 1e-3 * step, "expert_load/cv": 0.5 / (step + 1)}
        logger.log_metrics(metrics, step=step)
        for key, value in metrics.items():
            logged.setdefault(key, []).append((step, value))
    png = plots.loss_lr_figure([1, 2, 3], [3, 2, 1], [1, 1, 1], [("stable", 2)], path=str(tmp_path / "l.png"))
    assert isinstance(png, matplotlib.figure.Figure)
    logger.log_artifact(str(tmp_path / "l.png"), "plots")
    logger.log_figure(plots.update_rms_figure([1, 2], {"Experts": [0.2, 0.3]}), "plots/update_rms.png")
    logger.log_dict({"model": {"preset": "tiny"}, "lr": 2e-3}, "config/resolved.yaml")
    assert logger.flush(timeout=120)
    logger.finalize("success")

    client = MlflowClient(store)
    run = client.get_run(logger.run_id)
    assert run.data.params == {
        "model.preset": "tiny", "model.n_layers": "2", "optim.lr": "0.002", "optim.weight_decay": "0.1",
        "data.seq_len": "64", "data.shards": "['a', 'b']", "stages.0.name": "warmup", "stages.0.tokens": "100",
    }
    assert not any(k.startswith("param_changed.") for k in run.data.tags)
    assert run.data.tags["preset"] == "tiny" and run.data.tags["crescent.run_key"] == logger.run_key
    assert run.info.run_name == "first" and run.info.status == "FINISHED"
    for key, expected in logged.items():
        assert _history(client, logger.run_id, key) == expected
    assert {a.path for a in client.list_artifacts(logger.run_id, "plots")} == {"plots/l.png",
                                                                              "plots/update_rms.png"}
    local = client.download_artifacts(logger.run_id, "config/resolved.yaml", str(tmp_path / "dl"))
    assert yaml.safe_load(open(local)) == {"model": {"preset": "tiny"}, "lr": 2e-3}
    assert store.endswith("/mlruns.db") and "/mlartifacts/" in run.info.artifact_uri  # next to the db
    assert logger.stats()["rejected"] == 0 and logger.stats()["overflowed"] == 0


def test_resume_continues_the_run_and_records_a_changed_param(store, tmp_path):
    first = _logger(store, tmp_path)
    first.log_hyperparams({"optim": {"lr": 0.002, "wd": 0.1}})
    for step in range(5):
        first.log_metrics({"loss": float(step)}, step=step)
    first.finalize("killed")  # preempted
    client = MlflowClient(store)
    assert client.get_run(first.run_id).info.status == "KILLED"
    checkpoint = first.state_dict()

    second = _logger(store, tmp_path)
    second.load_state_dict(checkpoint)
    second.log_hyperparams({"optim": {"lr": 0.004, "wd": 0.1}, "resumed": True})  # lr changed: no exception
    for step in range(5, 10):
        second.log_metrics({"loss": float(step)}, step=step)
    assert second.flush(timeout=60)
    assert second.run_id == first.run_id
    run = client.get_run(first.run_id)
    assert run.info.status == "RUNNING"
    assert run.data.params == {"optim.lr": "0.002", "optim.wd": "0.1", "resumed": "True"}
    assert run.data.tags["param_changed.optim.lr"] == "0.004"
    assert "param_changed.optim.wd" not in run.data.tags
    assert _history(client, first.run_id, "loss") == [(s, float(s)) for s in range(10)]
    second.finalize("success")
    assert client.get_run(first.run_id).info.status == "FINISHED"
    experiment = client.get_experiment_by_name("test-tracking")
    runs = client.search_runs([experiment.experiment_id], f"tags.`crescent.run_key` = '{first.run_key}'")
    assert [r.info.run_id for r in runs] == [first.run_id]


def _dead_http_uri():
    with socket.socket() as s:  # a port nothing listens on: connections are refused at once
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_run_that_never_reached_the_server_is_created_on_resume_with_its_backlog(store, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    offline = _logger(_dead_http_uri(), tmp_path, max_backoff_s=0.1, finalize_timeout_s=0.5)
    offline.log_hyperparams({"lr": 0.01})
    for step in range(200):  # every call returns although nothing can be delivered
        offline.log_metrics({"loss": 1.0 / (step + 1), "tokens": 64.0 * step}, step=step)
    assert offline.flush(timeout=0.5) is False
    offline.finalize("killed")
    stats = offline.stats()
    assert (stats["enqueued"], stats["delivered"], stats["run_id"]) == (401, 0, None)
    assert stats["failures"] >= 1 and "failed" in stats["last_error"]
    checkpoint = offline.state_dict()
    assert checkpoint == {"run_id": None, "run_key": offline.run_key}

    # The next process (here: the store is reachable) continues by run key and delivers the journal first.
    resumed = _logger(store, tmp_path)
    resumed.load_state_dict(checkpoint)
    resumed.log_metrics({"loss": 0.001, "tokens": 64.0 * 200}, step=200)
    assert resumed.flush(timeout=60)
    client = MlflowClient(store)
    run = client.get_run(resumed.run_id)
    assert run.data.tags["crescent.run_key"] == offline.run_key
    assert run.data.params == {"lr": "0.01"}
    assert _history(client, resumed.run_id, "loss") == [(s, 1.0 / (s + 1)) for s in range(200)] + [(200, 0.001)]
    assert [s for s, _ in _history(client, resumed.run_id, "tokens")] == list(range(201))
    resumed.finalize("success")
    assert not (tmp_path / "spool" / f"{offline.run_key}.jsonl").exists()  # delivered journal is removed


def test_run_key_finds_a_run_created_after_the_checkpoint(store, tmp_path):
    first = _logger(store, tmp_path)
    checkpoint = first.state_dict()  # written before the run existed: run_id is None
    first.log_metrics({"loss": 1.0}, step=0)
    assert checkpoint["run_id"] is None and first.flush(timeout=60)
    first.finalize("failed")
    second = _logger(store, tmp_path, run_key=checkpoint["run_key"])
    second.log_metrics({"loss": 0.5}, step=1)
    assert second.flush(timeout=60)
    assert second.run_id == first.run_id
    assert _history(MlflowClient(store), first.run_id, "loss") == [(0, 1.0), (1, 0.5)]
    second.finalize("success")


def test_deleted_run_does_not_stall_delivery(store, tmp_path):
    logger = _logger(store, tmp_path)
    logger.log_metrics({"loss": 1.0}, step=0)
    assert logger.flush(timeout=60)
    MlflowClient(store).delete_run(logger.run_id)  # someone deletes the run in the UI mid-training
    for step in range(1, 4):
        logger.log_metrics({"loss": 1.0, "lr": 0.1}, step=step)
    assert logger.flush(timeout=60)  # rejected records are dropped and counted, not retried forever
    assert logger.stats()["rejected"] == 6
    logger.finalize("success")


def test_other_ranks_do_not_log(store, tmp_path, monkeypatch):
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    logger = _logger(store, tmp_path)
    logger.log_hyperparams({"lr": 1})
    logger.log_metrics({"loss": 1.0}, step=0)
    logger.finalize("success")
    assert logger.stats()["enqueued"] == 0 and logger.run_id is None
    assert not (tmp_path / "spool").exists()


def test_bad_arguments_name_the_field(tmp_path):
    with pytest.raises(ValueError, match=r"experiment_name must be a non-empty string .* got ''"):
        CrescentMLflowLogger(experiment_name="")
    with pytest.raises(ValueError, match="http_timeout_s must be >= 1, got 0"):
        CrescentMLflowLogger(http_timeout_s=0)
    logger = CrescentMLflowLogger(spool_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"finalize status must be one of .* got 'done'"):
        logger.finalize("done")


def test_tracking_uri_resolution(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    default = CrescentMLflowLogger()
    assert default.tracking_uri == f"sqlite:///{tmp_path}/mlruns.db"
    assert default.artifact_location == f"{tmp_path}/mlartifacts"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    from_env = CrescentMLflowLogger()
    assert (from_env.tracking_uri, from_env.artifact_location) == ("http://mlflow:5000", None)
    assert CrescentMLflowLogger(tracking_uri="sqlite:////x/y.db").tracking_uri == "sqlite:////x/y.db"


class _TinyRegression(LightningModule):
    def __init__(self, lr: float = 0.05, hidden: int = 4):
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(hidden, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def test_lightning_trainer_logs_through_the_logger(store, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(32, 4)
    data = DataLoader(TensorDataset(x, x.sum(-1, keepdim=True)), batch_size=4)
    logger = _logger(store, tmp_path, save_dir=str(tmp_path / "logs"))
    trainer = Trainer(max_steps=8, logger=logger, log_every_n_steps=1, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                      default_root_dir=str(tmp_path))
    trainer.fit(_TinyRegression(), data)  # Lightning calls finalize("success") at the end
    client = MlflowClient(store)
    run = client.get_run(logger.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"lr": "0.05", "hidden": "4"}
    assert [m.step for m in client.get_metric_history(logger.run_id, "train/loss")] == list(range(8))
    assert trainer.log_dir == str(tmp_path / "logs")


def test_resume_state_loaded_after_params_like_lightning_does_under_fsdp(store, tmp_path):
    first = _logger(store, tmp_path)
    first.log_hyperparams({"lr": 0.1, "seed": 1})
    first.log_metrics({"loss": 2.0}, step=0)
    first.finalize("killed")

    second = _logger(store, tmp_path)  # a fresh process: its own run key until the checkpoint is restored
    second.log_hyperparams({"lr": 0.2, "seed": 1})  # ModelParallelStrategy logs params before restoring
    second.load_state_dict(first.state_dict())
    second.log_metrics({"loss": 1.0}, step=1)
    assert second.flush(timeout=60)
    assert (second.run_id, second.run_key) == (first.run_id, first.run_key)
    run = MlflowClient(store).get_run(first.run_id)
    assert run.data.params == {"lr": "0.1", "seed": "1"} and run.data.tags["param_changed.lr"] == "0.2"
    assert _history(MlflowClient(store), first.run_id, "loss") == [(0, 2.0), (1, 1.0)]
    with pytest.raises(RuntimeError, match="before the first metric is logged"):
        second.load_state_dict({"run_id": None, "run_key": "another"})
    second.finalize("success")


def test_logging_calls_never_raise_and_non_finite_values_arrive(store, tmp_path):
    logger = _logger(store, tmp_path)
    logger.log_metrics(["not", "a", "mapping"], step=0)  # a warning, not an exception
    logger.log_metrics({"loss": float("nan"), "grad_norm": float("inf"), "note": "abc", "vec": torch.ones(3)},
                       step=1)
    logger.log_metrics({"loss": torch.tensor(2.5)}, step=2)
    logger.log_artifact(str(tmp_path / "missing.txt"))
    assert logger.flush(timeout=60)
    assert logger.stats()["enqueued"] == 3  # the non-numeric values were skipped
    client = MlflowClient(store)
    loss = _history(client, logger.run_id, "loss")
    assert loss[0][0] == 1 and math.isnan(loss[0][1]) and loss[1] == (2, 2.5)
    # MLflow's SQL store keeps +inf as the largest float
    assert _history(client, logger.run_id, "grad_norm") == [(1, sys.float_info.max)]
    assert set(client.get_run(logger.run_id).data.metrics) == {"loss", "grad_norm"}
    logger.finalize("success")


@pytest.mark.slow  # a fresh interpreter importing lightning + mlflow
def test_process_exit_without_finalize_keeps_every_record_on_disk(tmp_path):
    script = f"""
import os, sys
sys.path.insert(0, {os.getcwd()!r})
os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
from app.tracking import CrescentMLflowLogger
logger = CrescentMLflowLogger(tracking_uri={_dead_http_uri()!r}, spool_dir={str(tmp_path / "spool")!r},
                              run_key="exit-test")
logger.log_hyperparams({{"lr": 0.1}})
for step in range(500):
    logger.log_metrics({{"loss": float(step)}}, step=step)
"""  # exits right away: the records are still queued in memory
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120, env={**os.environ, "PYTHONPATH": ""})
    lines = (tmp_path / "spool" / "exit-test.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines[1:]] == [
        ["m", "loss", float(s), json.loads(lines[s + 1])[3], s] for s in range(500)]
    assert json.loads(lines[0]) == ["p", {"lr": "0.1"}]
