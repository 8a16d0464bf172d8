"""MLflow's own run context and system metrics through the outage-safe logger, and MLflow's own batching: a real
sqlite store, a real git checkout, MLflow's context registry and system-metrics monitor."""
from __future__ import annotations

import getpass
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH
from tracking_helpers import dead_uri, sqlite_store

from app.tracking import CrescentMLflowLogger

ROOT = Path(__file__).resolve().parents[1]
CPU = "system/cpu_utilization_percentage"
MEMORY = "system/system_memory_usage_megabytes"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return sqlite_store(tmp_path_factory.mktemp("mlflow"))


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


def _sampled(logger, samples: int, timeout: float = 60.0) -> None:
    """Wait until the monitor has queued `samples` samples (its records count as enqueued)."""
    start = logger.stats()["enqueued"]
    deadline = time.monotonic() + timeout
    while logger.stats()["enqueued"] - start < samples:
        assert time.monotonic() < deadline, logger.stats()
        time.sleep(0.05)


def _steps(uri, run_id, key):
    history = sorted(MlflowClient(uri).get_metric_history(run_id, key), key=lambda m: m.step)
    return [m.step for m in history], [m.timestamp for m in history]


def test_a_new_run_carries_mlflows_context_tags_and_a_resumed_run_keeps_them(store, tmp_path):
    repo = tmp_path / "project"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "trunk")
    script = repo / "train_entry.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from app.tracking import CrescentMLflowLogger\n"
        f"logger = CrescentMLflowLogger(experiment_name='context', tracking_uri={store!r}, "
        f"spool_dir={str(tmp_path / 'spool')!r}, tags={{'team': 'muon'}})\n"
        "logger.log_metrics({'train/loss': 1.0}, step=1)\n"
        "logger.finalize('success')\n"
        "print(logger.run_id)\n")
    _git(repo, "add", "train_entry.py")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-q", "-m", "entry")
    commit = _git(repo, "rev-parse", "HEAD")
    run_id = subprocess.run([sys.executable, str(script)], check=True, capture_output=True, text=True,
                            cwd=tmp_path).stdout.split()[-1]

    tags = MlflowClient(store).get_run(run_id).data.tags
    assert tags["mlflow.source.git.commit"] == commit and tags["mlflow.source.git.branch"] == "trunk"
    assert tags["mlflow.source.name"] == str(script) and tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.user"] == getpass.getuser() and tags["team"] == "muon"

    # Resumed from another entry point (this test process): the run keeps the context it was started with.
    resumed = CrescentMLflowLogger(experiment_name="context", tracking_uri=store, spool_dir=str(tmp_path / "spool"),
                                   run_id=run_id, tags={"team": "adamw"})
    resumed.log_metrics({"train/loss": 0.5}, step=2)
    resumed.finalize("success")
    after = MlflowClient(store).get_run(run_id).data.tags
    assert {k: after[k] for k in tags if k.startswith("mlflow.source")} == \
        {k: v for k, v in tags.items() if k.startswith("mlflow.source")}
    assert after["team"] == "adamw"  # the caller's own tags are set again on resume


def test_system_metrics_continue_at_the_next_step_after_a_resume(store, tmp_path):
    def logger(**kwargs):
        return CrescentMLflowLogger(experiment_name="system", tracking_uri=store, spool_dir=str(tmp_path),
                                    poll_interval_s=0.05, system_metrics=True, system_metrics_interval_s=0.05,
                                    **kwargs)

    first = logger()
    first.log_metrics({"train/loss": 1.0}, step=1)
    _sampled(first, 4)
    first.finalize("killed")
    steps, _ = _steps(store, first.run_id, CPU)
    assert len(steps) >= 4 and steps == list(range(len(steps)))

    second = logger(run_id=first.run_id)
    second.log_metrics({"train/loss": 0.5}, step=2)
    _sampled(second, 3)
    second.finalize("success")
    for key in (CPU, MEMORY):
        after, stamps = _steps(store, first.run_id, key)
        assert after[: len(steps)] == steps and after == list(range(len(after))) and len(after) >= len(steps) + 3
        assert stamps == sorted(stamps)
    memory = MlflowClient(store).get_metric_history(first.run_id, MEMORY)
    assert all(m.value > 0 for m in memory)


def test_system_metrics_sampled_during_an_outage_reach_the_run_when_it_is_resumed(store, tmp_path):
    offline = CrescentMLflowLogger(experiment_name="system-outage", tracking_uri=dead_uri(), spool_dir=str(tmp_path),
                                   poll_interval_s=0.05, max_backoff_s=0.2, system_metrics=True,
                                   system_metrics_interval_s=0.05)
    offline.log_metrics({"train/loss": 1.0}, step=1)  # returns at once: nothing can be delivered
    _sampled(offline, 3)
    state = offline.state_dict()
    offline.finalize("killed", timeout=0.2)
    journaled = offline.stats()
    assert journaled["delivered"] == 0 and journaled["pending"] >= 4 and journaled["failures"] > 0

    resumed = CrescentMLflowLogger(experiment_name="system-outage", tracking_uri=store, spool_dir=str(tmp_path),
                                   poll_interval_s=0.05, system_metrics=True, system_metrics_interval_s=0.05)
    resumed.load_state_dict(state, resume_step=1)
    resumed.log_metrics({"train/loss": 0.5}, step=2)
    _sampled(resumed, 2)
    resumed.finalize("success")
    steps, stamps = _steps(store, resumed.run_id, CPU)
    assert len(steps) >= journaled["pending"] - 1 + 2  # the journaled samples, then the new process's
    assert steps == list(range(len(steps))) and stamps == sorted(stamps)
    assert resumed.stats()["rejected"] == 0


def test_system_metrics_off_logs_none(store, tmp_path):
    logger = CrescentMLflowLogger(experiment_name="system-off", tracking_uri=store, spool_dir=str(tmp_path),
                                  poll_interval_s=0.05, system_metrics=False, system_metrics_interval_s=0.05)
    logger.log_metrics({"train/loss": 1.0}, step=1)
    time.sleep(0.3)
    logger.finalize("success")
    assert sorted(MlflowClient(store).get_run(logger.run_id).data.metrics) == ["train/loss"]


def test_mlflow_splits_what_exceeds_one_request_params_tags_and_metrics_arrive_whole(store, tmp_path):
    params = {f"p{i:03d}": str(i) for i in range(3 * MAX_PARAMS_TAGS_PER_BATCH + 7)}
    tags = {f"t{i:03d}": str(i) for i in range(2 * MAX_PARAMS_TAGS_PER_BATCH + 3)}
    logger = CrescentMLflowLogger(experiment_name="batching", tracking_uri=store, spool_dir=str(tmp_path),
                                  poll_interval_s=0.05, tags=tags)
    logger.log_hyperparams(params)
    keys = [f"m{i:04d}" for i in range(MAX_METRICS_PER_BATCH + 250)]
    logger.log_metrics({k: float(i) for i, k in enumerate(keys)}, step=3)
    logger.set_tags({f"late{i:03d}": "x" for i in range(MAX_PARAMS_TAGS_PER_BATCH + 1)})
    assert logger.flush(timeout=120)
    logger.finalize("success")
    run = MlflowClient(store).get_run(logger.run_id)
    assert run.data.params == params
    assert {k: run.data.tags[k] for k in tags} == tags
    assert sum(k.startswith("late") for k in run.data.tags) == MAX_PARAMS_TAGS_PER_BATCH + 1
    assert run.data.metrics == {k: float(i) for i, k in enumerate(keys)}
    assert logger.stats()["rejected"] == 0
