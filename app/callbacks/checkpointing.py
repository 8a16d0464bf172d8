"""Resumable checkpoints (keep-last-k, sharded under FSDP2) and export checkpoints (HF layout) for evaluation."""
from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

from app.step import step_report
from app.tracking import logged_model_record, mlflow_logger
from app.tracking.store import RUN_KEY_TAG
from components.checkpoint import save_export


class ResumableCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint keyed on the step: the newest `keep_last` are kept; `last.ckpt` links the newest.

    One naming scheme: a save under an existing name (e.g. after a resume skipped a damaged newer checkpoint)
    replaces it atomically instead of adding a `-v1` file that resume would not recognise; `last` is kept by
    `AtomicCheckpointIO` (app/checkpoint_io.py), so it also follows preemption checkpoints.
    """

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        # A resumed run starts where its checkpoint was saved: that is this step's save. (Lightning starts from 0,
        # so the first micro-batch after a resume, still at the checkpoint's global step, wrote it again mid-step.)
        self._last_global_step_saved = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Only at the end of an optimizer step (never mid-accumulation), and not when this step's preemption
        # checkpoint was just written (PreemptionCheckpoint runs first: Lightning puts checkpoint callbacks last).
        if step_report(outputs) is None or pl_module.stop_reason == "preempted":
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        # Runs for every save, before the file is written: the metrics logged so far (this step's included) go to
        # the loggers' on-disk journal first, so a kill right after the checkpoint loses none of them.
        for logger in trainer.loggers:
            logger.save()
        super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def on_train_end(self, trainer, pl_module) -> None:
        """The state training ended in is resumable too (e.g. `trainer.max_steps` before the first periodic
        checkpoint: what `save_last` did); a preempted run has saved its own checkpoint already."""
        if pl_module.stop_reason != "preempted" and 0 < trainer.global_step != self._last_global_step_saved:
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))


def resumable_checkpoint(dirpath: str | Path, every_n_steps: int, keep_last: int = 3) -> ModelCheckpoint:
    """The resumable checkpoint callback (see ResumableCheckpoint).

    The checkpoint holds weights, optimizer state (consolidated under muon_ddp, sharded DCP under muon_fsdp), the
    loops, and the module's `crescent` entry: consumed samples, tokens, stage, MLflow run.
    """
    if every_n_steps < 1:
        raise ValueError(f"checkpoint every_n_steps={every_n_steps!r} must be >= 1")
    if keep_last < 1:
        raise ValueError(f"checkpoint keep_last={keep_last!r} must be >= 1")
    return ResumableCheckpoint(dirpath=str(dirpath), filename="step-{step:08d}", every_n_train_steps=every_n_steps,
                               save_top_k=keep_last, monitor="step", mode="max", save_last=False,
                               auto_insert_metric_name=False, save_on_train_epoch_end=False,
                               enable_version_counter=False)


class ExportCheckpoint(pl.Callback):
    """Writes `components.checkpoint` exports (safetensors + config + tokenizer + step + run id) every
    `every_n_steps` optimizer steps and at the end of training; the evaluation pipeline watches that folder. Each
    export is also a logged model of the MLflow run (app/tracking/lineage.py), which evaluation scores attach to."""

    def __init__(self, dirpath: str | Path = "exports", every_n_steps: int = 100, tokenizer_dir: str | None = None,
                 max_artifact_bytes: int = 200 << 20):
        if every_n_steps < 1:
            raise ValueError(f"ExportCheckpoint.every_n_steps={every_n_steps!r} must be >= 1")
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.tokenizer_dir = tokenizer_dir
        self.max_artifact_bytes = max_artifact_bytes
        self.last_export: Path | None = None
        self._last_step = -1

    def _export(self, trainer, pl_module) -> None:
        step = trainer.global_step
        if step == self._last_step:
            return
        logger = mlflow_logger(trainer.loggers)
        tokenizer_dir = self.tokenizer_dir or getattr(trainer.datamodule, "tokenizer_dir", None)
        position = {"consumed_samples": pl_module.consumed_samples,
                    "stage": pl_module.schedule.at(pl_module.tokens_seen).stage_name}
        self.last_export = save_export(
            pl_module.model, self.dirpath, step=step, tokenizer_dir=tokenizer_dir,
            run_id=getattr(logger, "run_id", None), tracking_uri=getattr(logger, "tracking_uri", None),
            # The run key names the run also before MLflow created it (run_id None: the server was unreachable).
            extra={"tokens_seen": pl_module.tokens_seen, **position,
                   **({"run_tags": {RUN_KEY_TAG: logger.run_key}} if hasattr(logger, "run_key") else {})},
            chat_template=getattr(trainer.datamodule, "chat_template", None))
        self._last_step = step
        if logger is not None and trainer.is_global_zero:
            logger.log_logged_model(logged_model_record(str(self.last_export), step, pl_module.tokens_seen, position))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        report = step_report(outputs)
        if report is not None and report.step % self.every_n_steps == 0:
            self._export(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if pl_module.stop_reason == "preempted":
            return  # a preempted run is not finished; its exports continue after the resume
        self._export(trainer, pl_module)
        logger = mlflow_logger(trainer.loggers)
        if trainer.is_global_zero and self.last_export is not None and hasattr(logger, "set_tags"):
            # The final export goes to MLflow as artifacts when small; a large model's export is named by path.
            logger.set_tags({"crescent.export": str(self.last_export.resolve())})
            files = [f for f in sorted(self.last_export.iterdir()) if f.is_file()]
            if sum(f.stat().st_size for f in files) <= self.max_artifact_bytes:
                for f in files:
                    logger.log_artifact(str(f), f"export/{self.last_export.name}")
