"""The MLflow logger under faults: a full spool disk, a checkpoint published while metrics are still queued, a
resume after a kill that had logged steps beyond its checkpoint. A real sqlite MLflow store and a real tmpfs."""
from __future__ import annotations

import json
import logging
import socket

import pytest
from mlflow import MlflowClient
from robust_helpers import fill, tmpfs

from app.tracking import CrescentMLflowLogger


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlruns.db"
    MlflowClient(uri).search_experiments()  # create the schema once
    return uri


def _dead_uri() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def _history(uri, run_id, key):
    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


def _resumed(experiment: str, uri: str, spool, state: dict, resume_step: int, losses: dict[int, float]):
    """A logger continuing `state`'s run from `resume_step` (a new process), after logging `losses` {step: value}."""
    logger = CrescentMLflowLogger(experiment_name=experiment, tracking_uri=uri, spool_dir=str(spool),
                                  poll_interval_s=0.05)
    logger.load_state_dict(state, resume_step=resume_step)
    for step, value in losses.items():
        logger.log_metrics({"train/loss": value}, step=step)
    return logger


def test_a_full_spool_disk_loses_no_record_and_does_not_blame_the_tracking_server(store, tmp_path, caplog):
    with tmpfs(tmp_path / "spool", "64k") as spool:
        ballast = fill(spool, 0)
        logger = CrescentMLflowLogger(experiment_name="full-disk", tracking_uri=store, spool_dir=str(spool),
                                      poll_interval_s=0.05)
        with caplog.at_level(logging.WARNING, logger="app.tracking"):
            for step in range(1, 301):
                logger.log_metrics({"train/loss": 1.0 / step}, step=step)
            assert logger.flush(timeout=60)
            logger.finalize("success")
        ballast.unlink()
    assert _history(store, logger.run_id, "train/loss") == [(s, 1.0 / s) for s in range(1, 301)]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(w.startswith(f"cannot write the MLflow journal {spool}/") and "No space left on device" in w
               for w in warnings), warnings
    assert not any("unavailable" in w for w in warnings), warnings


def test_save_puts_every_queued_record_in_the_journal_at_once(tmp_path):
    # A server that never answers and a delivery thread that sleeps: only save() can write the journal now.
    logger = CrescentMLflowLogger(tracking_uri=_dead_uri(), spool_dir=str(tmp_path), poll_interval_s=3600,
                                  run_key="save-test")
    logger.log_metrics({"train/loss": 2.5}, step=7)
    journal = tmp_path / "save-test.jsonl"
    assert not journal.exists() or journal.read_text() == ""
    logger.save()
    [record] = [json.loads(line) for line in journal.read_text().splitlines()]
    assert record[:3] == ["m", "train/loss", 2.5] and record[4] == 7
    logger.finalize("killed", timeout=0)


def test_a_resume_does_not_log_again_the_steps_a_killed_process_delivered_after_its_checkpoint(store, tmp_path):
    first = CrescentMLflowLogger(experiment_name="resume-delivered", tracking_uri=store, spool_dir=str(tmp_path),
                                 poll_interval_s=0.05)
    for step in range(1, 9):  # checkpoint at 6, then steps 7 and 8 reach MLflow before the kill
        first.log_metrics({"train/loss": float(step)}, step=step)
    assert first.flush(timeout=60)
    state = first.state_dict()
    first.finalize("killed")

    second = CrescentMLflowLogger(experiment_name="resume-delivered", tracking_uri=store, spool_dir=str(tmp_path),
                                  poll_interval_s=0.05)
    second.load_state_dict(state, resume_step=6)
    for step in range(7, 11):  # the resumed process trains steps 7.. again
        second.log_metrics({"train/loss": step + 0.5}, step=step)
    second.finalize("success")
    assert second.run_id == first.run_id
    assert _history(store, first.run_id, "train/loss") == [
        (s, float(s)) for s in range(1, 9)] + [(9, 9.5), (10, 10.5)]
    assert second.stats()["superseded"] == 2


def test_a_resume_drops_the_journaled_steps_after_its_checkpoint_that_a_killed_process_never_sent(store, tmp_path):
    offline = CrescentMLflowLogger(experiment_name="resume-journaled", tracking_uri=_dead_uri(),
                                   spool_dir=str(tmp_path), poll_interval_s=0.05)
    for step in range(1, 9):
        offline.log_metrics({"train/loss": float(step)}, step=step)
    offline.save()
    state = offline.state_dict()
    offline.finalize("killed", timeout=0)  # nothing reached a server: all 8 steps wait in the journal

    resumed = _resumed("resume-journaled", store, tmp_path, state, 6, {s: s + 0.5 for s in range(7, 11)})
    resumed.finalize("success")
    assert _history(store, resumed.run_id, "train/loss") == [
        (s, float(s)) for s in range(1, 7)] + [(s, s + 0.5) for s in range(7, 11)]


def test_a_backlog_of_steps_before_the_resume_point_that_an_earlier_process_delivered_is_not_sent_again(store, tmp_path):
    # Seen on CI: process 1 delivers steps 1-4 and dies with its checkpoint at 2; process 2 resumes at 2, journals
    # steps 3-6 (checkpoint at 6) but is killed before it delivers them; process 3 resumes at 6 and delivers the
    # backlog: steps 3 and 4 are in MLflow already (process 1's), so only 5 and 6 of it may be sent.
    first = CrescentMLflowLogger(experiment_name="resume-backlog", tracking_uri=store, spool_dir=str(tmp_path),
                                 poll_interval_s=0.05)
    for step in range(1, 5):
        first.log_metrics({"train/loss": float(step)}, step=step)
    assert first.flush(timeout=60)
    state = first.state_dict()
    first.finalize("killed")

    second = _resumed("resume-backlog", _dead_uri(), tmp_path, state, 2, {s: s + 0.5 for s in range(3, 7)})
    second.save()
    second.finalize("killed", timeout=0)

    third = _resumed("resume-backlog", store, tmp_path, state, 6, {s: s + 0.25 for s in range(7, 9)})
    third.finalize("success")
    assert third.run_id == first.run_id
    assert _history(store, first.run_id, "train/loss") == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 5.5), (6, 6.5), (7, 7.25), (8, 8.25)]
    assert third.stats()["superseded"] == 2


def test_a_run_is_not_marked_finished_while_its_metrics_wait_in_the_journal(store, tmp_path):
    # Seen under load: the finalize timeout ran out with the last metrics journaled, the run was FINISHED anyway
    # and the experiment runner read a finished point without its final loss.
    # A delivery thread that sleeps between flushes: the 2000 metrics below are still queued when finalize comes.
    first = CrescentMLflowLogger(experiment_name="finish-pending", tracking_uri=store, spool_dir=str(tmp_path),
                                 poll_interval_s=3600)
    first.log_metrics({"train/loss": 0.0}, step=0)
    assert first.flush(timeout=60)
    state = first.state_dict()
    for step in range(1, 2001):
        first.log_metrics({"train/loss": float(step)}, step=step)
    first.finalize("success", timeout=0)
    client = MlflowClient(store)
    assert client.get_run(first.run_id).info.status == "RUNNING"
    assert first.stats()["status_set"] is None and first.stats()["pending"] > 0

    second = CrescentMLflowLogger(experiment_name="finish-pending", tracking_uri=store, spool_dir=str(tmp_path),
                                  poll_interval_s=0.05)
    second.load_state_dict(state, resume_step=2000)  # the run had ended: the next process only delivers
    second.start()
    second.finalize("success")
    assert client.get_run(first.run_id).info.status == "FINISHED", second.stats()
    assert _history(store, first.run_id, "train/loss") == [(s, float(s)) for s in range(0, 2001)]


def test_a_continued_run_gives_no_partial_history_before_its_run_is_found(tmp_path):
    # A run continued from a checkpoint (state_dict's run key) whose store cannot be reached yet: its earlier
    # segments are out of reach, so the history is None (the plots skip), not this process's metrics alone.
    logger = CrescentMLflowLogger(tracking_uri=_dead_uri(), spool_dir=str(tmp_path), poll_interval_s=3600)
    logger.load_state_dict({"run_id": None, "run_key": "continued"}, resume_step=4)
    logger.log_metrics({"train/loss": 2.5}, step=5)
    assert logger.metric_history(("train/",), timeout=0.2) is None
    logger.finalize("killed", timeout=0)
    # A new run has nothing in the store before its first metric: what it logged is its whole history.
    fresh = CrescentMLflowLogger(tracking_uri=_dead_uri(), spool_dir=str(tmp_path / "fresh"), poll_interval_s=3600)
    fresh.log_metrics({"train/loss": 2.5}, step=1)
    assert fresh.metric_history(("train/",)) == {"train/loss": {1: 2.5}}
    fresh.finalize("killed", timeout=0)
