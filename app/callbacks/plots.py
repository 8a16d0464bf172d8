"""The run's plots, rebuilt from its metric history every `every_n_steps` optimizer steps and at the end.

The history comes from the tracking store plus what still waits in the logger's outage spool (the source of
truth, complete across resumes and preemptions), not from memory: a resumed run's plots cover the whole run.
The PNGs go to MLflow as artifacts under `plots/` (each new version replaces the last).

The periodic plots are built in a background thread of rank 0: reading a long run's history from the store takes
longer as the run grows (and a hung server blocks until the HTTP timeout), and the other ranks would wait for rank
0 at the next collective. A turn whose predecessor is still being built is skipped; the last plots wait for it.
"""
from __future__ import annotations

import logging
import tempfile
import threading
from pathlib import Path

import lightning.pytorch as pl

from app import plots
from app.step import step_report
from app.tracking import mlflow_logger

log = logging.getLogger(__name__)

# Metric keys the figures read (app/plots.py:training_figures).
PLOTTED = ("train/tokens", "train/loss", "train/lr", "val/loss", "experts/layer_", "svd_entropy/", "optim/")


class TrainingPlots(pl.Callback):
    def __init__(self, every_n_steps: int = 100):
        if every_n_steps < 1:
            raise ValueError(f"TrainingPlots.every_n_steps={every_n_steps!r} must be >= 1")
        self.every_n_steps = every_n_steps
        self.written: list[str] = []  # names of the figures logged last time
        self._worker: threading.Thread | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        report = step_report(outputs)
        if report is None or report.step % self.every_n_steps or not trainer.is_global_zero:
            return
        if self._worker is not None and self._worker.is_alive():
            return  # the previous plots are still being built: skip this turn
        self._worker = threading.Thread(target=self._log_plots_quietly, args=(trainer, pl_module),
                                        name="crescent-plots", daemon=True)
        self._worker.start()

    def on_train_end(self, trainer, pl_module) -> None:
        if self._worker is not None:
            self._worker.join(timeout=30.0)  # a turn stuck on a hung store is left behind (a daemon thread)
            self._worker = None
        self.log_plots(trainer, pl_module, wait_s=30.0)  # preempted too: what the run has so far

    def _log_plots_quietly(self, trainer, pl_module) -> None:
        try:
            self.log_plots(trainer, pl_module)
        except Exception as error:  # plots never stop training (the thread's error would only be printed)
            log.warning("periodic plots failed: %s: %s", type(error).__name__, error)

    def log_plots(self, trainer, pl_module, wait_s: float = 0.0) -> None:
        """`wait_s`: how long to wait for a continued run to be found in the store (the last plots wait; the
        periodic ones skip a turn instead of blocking training)."""
        logger = mlflow_logger(trainer.loggers)
        if not trainer.is_global_zero or logger is None:
            return
        history = logger.metric_history(PLOTTED, timeout=wait_s)
        if history is None:  # the store is unreachable: skip rather than log a partial picture
            return
        figures = plots.training_figures(history, pl_module.schedule.boundaries())
        with tempfile.TemporaryDirectory(prefix="crescent-plots-") as tmp:
            for name, figure in figures.items():
                path = Path(tmp) / name
                plots.save_png(figure, str(path))
                logger.log_artifact(str(path), "plots")  # a snapshot copy: the folder can go now
        self.written = sorted(figures)
