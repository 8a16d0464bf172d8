"""The run's plots, rebuilt from its metric history every `every_n_steps` optimizer steps and at the end.

The history comes from the tracking store plus what still waits in the logger's outage spool (the source of
truth, complete across resumes and preemptions), not from memory: a resumed run's plots cover the whole run.
The PNGs go to MLflow as artifacts under `plots/` (each new version replaces the last).
"""
from __future__ import annotations

import logging
import tempfile
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

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        report = step_report(outputs)
        if report is not None and report.step % self.every_n_steps == 0:
            self.log_plots(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.log_plots(trainer, pl_module, wait_s=30.0)  # preempted too: what the run has so far

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
