"""A real ``mlflow server`` on loopback is stopped and started again mid-run: nothing logged is lost."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from mlflow import MlflowClient

from app.tracking import CrescentMLflowLogger

pytestmark = pytest.mark.slow
KEYS = ("train/loss", "lr", "throughput/tokens_per_s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """``mlflow server ARGS`` on 127.0.0.1:``port`` as its own process group, so SIGTERM reaches uvicorn and its
    workers; ``env`` is added to the environment (e.g. ``MLFLOW_BACKEND_STORE_URI``)."""

    def __init__(self, args: list[str], port: int, log_path: str, env: dict[str, str] | None = None):
        self.args = [os.path.join(os.path.dirname(sys.executable), "mlflow"), "server", *args]
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.env = dict(env or {})
        self.process: subprocess.Popen | None = None

    @classmethod
    def sqlite(cls, backend_uri: str, artifact_root: str, port: int, log_path: str) -> MlflowServer:
        return cls(["--backend-store-uri", backend_uri, "--default-artifact-root", artifact_root,
                    "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], port, log_path)

    def start(self, timeout: float = 120.0) -> None:
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **self.env}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.process.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.25)
        raise TimeoutError(f"mlflow server not healthy after {timeout} s; see {self.log_path}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None


def _log_steps(logger, steps, expected):
    for step in steps:
        metrics = {key: float(step * (i + 1)) + 0.5 for i, key in enumerate(KEYS)}
        logger.log_metrics(metrics, step=step)
        for key, value in metrics.items():
            expected[key].append((step, value))


def test_server_outage_loses_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    backend = f"sqlite:///{tmp_path}/server.db"
    server = MlflowServer.sqlite(backend, str(tmp_path / "artifacts"), _free_port(), str(tmp_path / "server.log"))
    expected = {key: [] for key in KEYS}
    server.start()
    logger = CrescentMLflowLogger(experiment_name="outage", tracking_uri=server.url,
                                  spool_dir=str(tmp_path / "spool"), poll_interval_s=0.1, max_backoff_s=1.0)
    try:
        logger.log_hyperparams({"model": {"preset": "tiny"}, "optim": {"lr": 0.002}})
        _log_steps(logger, range(0, 50), expected)
        assert logger.flush(timeout=60)
        run_id = logger.run_id
        before = logger.stats()

        server.stop()  # SIGTERM mid-run
        _log_steps(logger, range(50, 150), expected)  # returns although nothing can be delivered
        logger.log_dict({"written": "during the outage"}, "config/outage.json")
        assert logger.flush(timeout=2) is False
        during = logger.stats()
        assert during["delivered"] == before["delivered"]
        assert during["enqueued"] == before["enqueued"] + 100 * len(KEYS) + 1
        assert during["failures"] > before["failures"]

        server.start()
        _log_steps(logger, range(150, 200), expected)
        assert logger.flush(timeout=60)
        logger.finalize("success")
        after = logger.stats()
        assert (after["pending"], after["rejected"], after["overflowed"]) == (0, 0, 0)

        client = MlflowClient(server.url)
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.data.params == {"model.preset": "tiny", "optim.lr": "0.002"}
        for key in KEYS:
            history = client.get_metric_history(run_id, key)
            assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == expected[key]
            # in order: timestamps never go backwards as steps increase
            stamps = [m.timestamp for m in sorted(history, key=lambda m: m.step)]
            assert stamps == sorted(stamps)
        assert [a.path for a in client.list_artifacts(run_id, "config")] == ["config/outage.json"]
        print(f"\ndelivered {after['delivered']} records; {during['enqueued'] - during['delivered']} were "
              f"buffered during the outage; {after['failures']} failed attempts")
    finally:
        logger.finalize_timeout_s = 1.0  # no-op when already finalized
        logger.finalize("failed")
        server.stop()


def test_a_hung_server_does_not_stall_training_steps_while_the_periodic_plots_wait_for_it(tmp_path, monkeypatch):
    # Plots every step; after step 1 the server is frozen (SIGSTOP: connections queue, nothing answers). The plots'
    # history read then waits for the HTTP timeout (5 s here); in the training thread every step did.
    import lightning.pytorch as pl
    import train_helpers as th

    from app.callbacks.plots import TrainingPlots
    from app.step import step_report

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    server = MlflowServer.sqlite(f"sqlite:///{tmp_path}/server.db", str(tmp_path / "artifacts"), _free_port(),
                                 str(tmp_path / "server.log"))
    server.start()
    logger = CrescentMLflowLogger(experiment_name="hung", tracking_uri=server.url, spool_dir=str(tmp_path / "spool"),
                                  poll_interval_s=0.1, max_backoff_s=1.0)
    logger.finalize_timeout_s = 2.0

    class Freeze(pl.Callback):
        ends: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            report = step_report(outputs)
            if report is None:
                return
            self.ends.append(time.monotonic())
            if report.step == 1:
                assert logger.flush(timeout=60)  # the run exists; its plots of step 1 can be read
                os.killpg(server.process.pid, signal.SIGSTOP)

    corpus = th.build_corpus(tmp_path / "corpus")
    try:
        th.fit_in_process(corpus, [TrainingPlots(every_n_steps=1), Freeze()], 5, trainer_args={"logger": logger})
    finally:
        os.killpg(server.process.pid, signal.SIGCONT)
        server.stop()
    steps = [b - a for a, b in zip(Freeze.ends, Freeze.ends[1:])]
    assert len(steps) == 4 and max(steps) < 3.0, steps
