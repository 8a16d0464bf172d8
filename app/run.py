"""A training run on disk: its directory, its callbacks and logger, automatic resume, and the exit status.

Layout of `run.dir`: checkpoints/ (resumable, keep-last-k, `preempt-step=N.ckpt` after a SIGTERM, `last.ckpt` a link
to the newest; see app/checkpoint_io.py), exports/ (HF layout for evaluation), mlflow-spool/ (metrics waiting for an
unreachable tracking server), config.yaml, run.lock (held by the one process training here; app/runlock.py).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from app.callbacks import (
    ExpertLoadMonitor,
    ExportCheckpoint,
    MoEThroughputMonitor,
    OptimizerTelemetry,
    PreemptionCheckpoint,
    SVDEntropyMonitor,
    TokenProgressBar,
    TrainingPlots,
    resumable_checkpoint,
)
from app.callbacks.preemption import PREEMPTED_EXIT_CODE
from app.checkpoint_io import AtomicCheckpointIO, list_checkpoints, load_meta, verify_checkpoint
from app.module import ConfigError, NonFiniteLossError, check_layout
from app.runlock import RunDirInUse, RunLock
from app.tracking import CrescentMLflowLogger, DatasetLineage, flatten_params, mlflow_logger
from components.durable import InsufficientSpaceError, is_no_space, remove_temporary


@dataclass
class RunOptions:
    """The YAML's `run:` section.

    Args:
        dir: run directory (checkpoints, exports, spool); resuming is automatic when it holds a checkpoint.
        resume: 'auto' (latest checkpoint in dir, if any), 'never', or a checkpoint path.
        checkpoint_every_n_steps / keep_last: resumable checkpoint cadence and how many to keep.
        export_every_n_steps: export checkpoint cadence (and one at the end).
        experiment / tracking_uri: MLflow experiment; URI default MLFLOW_TRACKING_URI or sqlite:///mlruns.db.
        tags: MLflow tags set on the run (e.g. `mlflow.parentRunId` for a child of an experiment's parent run).
        system_metrics / system_metrics_interval_s: MLflow's system metrics (CPU, memory, disk, network, GPU with
            pynvml) into the run, one sample per interval (app/tracking/system_metrics.py).
        log_every_n_steps: expert-load metrics cadence; svd_entropy_every_n_steps; max_logit_every_n_steps.
        plot_every_n_steps: plots rebuilt from the run's metric history this often (and at the end).
        peak_flops_per_device: for MFU where Lightning knows no peak (CPUs).
        progress_bar: show the token progress bar (also off when `trainer.enable_progress_bar` is false).
    """

    dir: str = "runs/default"
    resume: str = "auto"
    checkpoint_every_n_steps: int = 50
    keep_last: int = 3
    export_every_n_steps: int = 200
    experiment: str = "crescent"
    tracking_uri: str | None = None
    run_name: str | None = None
    tags: dict[str, str] | None = None
    system_metrics: bool = True
    system_metrics_interval_s: float = 10.0
    log_every_n_steps: int = 10
    svd_entropy_every_n_steps: int = 50
    max_logit_every_n_steps: int = 10
    plot_every_n_steps: int = 100
    peak_flops_per_device: float | None = None
    progress_bar: bool = True

    def __post_init__(self) -> None:
        if self.resume not in ("auto", "never") and not Path(self.resume).exists():
            raise ValueError(f"run.resume={self.resume!r} must be 'auto', 'never' or an existing checkpoint path")
        for name in ("checkpoint_every_n_steps", "keep_last", "export_every_n_steps", "log_every_n_steps",
                     "svd_entropy_every_n_steps", "plot_every_n_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"run.{name}={getattr(self, name)!r} must be >= 1")
        if not self.system_metrics_interval_s > 0:
            raise ValueError(f"run.system_metrics_interval_s={self.system_metrics_interval_s!r} must be > 0 seconds")

    @property
    def path(self) -> Path:
        return Path(self.dir)

    def build(self, progress_bar: bool = True) -> tuple[list, CrescentMLflowLogger]:
        """The run's callbacks and its outage-safe MLflow logger (beside any logger the YAML configures)."""
        root = self.path
        logger = CrescentMLflowLogger(experiment_name=self.experiment, tracking_uri=self.tracking_uri,
                                      run_name=self.run_name or root.name, tags=self.tags,
                                      spool_dir=str(root / "mlflow-spool"), system_metrics=self.system_metrics,
                                      system_metrics_interval_s=self.system_metrics_interval_s)
        callbacks = [
            DatasetLineage(),
            TrainingPlots(self.plot_every_n_steps),
            ExpertLoadMonitor(self.log_every_n_steps),
            OptimizerTelemetry(self.max_logit_every_n_steps),
            SVDEntropyMonitor(self.svd_entropy_every_n_steps),
            MoEThroughputMonitor(self.peak_flops_per_device),
            resumable_checkpoint(root / "checkpoints", self.checkpoint_every_n_steps, self.keep_last),
            ExportCheckpoint(root / "exports", self.export_every_n_steps),
            PreemptionCheckpoint(root / "checkpoints"),
        ]
        if self.progress_bar and progress_bar:
            callbacks.append(TokenProgressBar())
        return callbacks, logger


def latest_checkpoint(directory: Path, skipped: list[tuple[Path, str]] | None = None) -> Path | None:
    """The newest intact checkpoint in `directory` (file or DCP folder; a preemption one wins a tie); the damaged
    newer ones it passed over are appended to `skipped` as (path, why)."""
    for path in list_checkpoints(directory):
        reason = verify_checkpoint(path)
        if reason is None:
            return path
        if skipped is not None:
            skipped.append((path, reason))
    return None


def read_checkpoint_meta(path: Path) -> dict:
    """The `crescent` entry of a checkpoint (a file, or the metadata file of a sharded folder), with Lightning's
    `global_step`; read without its tensors (mmap)."""
    state = load_meta(path)
    return {**state.get("crescent", {}), "global_step": state.get("global_step")}


class ResumeError(ValueError):
    """`run.resume` names a checkpoint that cannot be read."""


def resume_checkpoint(run: RunOptions, announce: bool) -> Path | None:
    """The checkpoint this run starts from (None: from scratch). With `announce`, says which damaged newer
    checkpoints `auto` skipped and why."""
    if run.resume == "never":
        return None
    if run.resume != "auto":
        reason = verify_checkpoint(Path(run.resume))
        if reason is not None:
            raise ResumeError(f"run.resume={run.resume!r} cannot be resumed from: {reason}")
        return Path(run.resume)
    skipped: list[tuple[Path, str]] = []
    ckpt = latest_checkpoint(run.path / "checkpoints", skipped)
    if announce:
        for path, reason in skipped:
            print(f"crescent train: skipping checkpoint {path}: {reason}", file=sys.stderr)
    return ckpt


def train_from_cli(cli, cwd: Path) -> int:
    """`crescent train` after the CLI parsed the config: hold the run directory (global rank 0), train, and turn
    the failures a user can act on into one line each (exit 2: bad input; 1: a full disk, a busy run directory)."""
    run = RunOptions(**cli.config["run"])
    trainer = cli.trainer
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # Lightning's default; ours writes atomically
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
    created = not run.path.exists()
    lock = None
    try:
        if trainer.is_global_zero:
            lock = _hold_run_dir(run)
        return _train(cli, run)
    except (RunDirInUse, ResumeError) as err:
        print(f"crescent train: error: {err}", file=sys.stderr)
        return 2 if isinstance(err, ResumeError) else 1
    except Exception as err:
        if not is_no_space(err):
            raise
        what = err if isinstance(err, InsufficientSpaceError) else f"no space left on device ({err})"
        print(f"crescent train: error: {what}; the earlier checkpoints are intact: free space and run the same "
              "command again to resume", file=sys.stderr)
        return 1
    finally:
        if lock is not None:
            lock.release()
        if created and run.path.is_dir() and not any(run.path.iterdir()):
            run.path.rmdir()  # nothing was written: no empty run directory left behind


def _hold_run_dir(run: RunOptions) -> RunLock:
    """Take the run directory's lock; nobody else writes there then, so what interrupted saves left is removed."""
    lock = RunLock(run.path).acquire()
    if lock.took_over:
        print(f"crescent train: took over the stale lock of {lock.describe(lock.took_over)}", file=sys.stderr)
    for sub in ("checkpoints", "exports"):
        for path in remove_temporary(run.path / sub):
            print(f"crescent train: removed {path} (left by an interrupted save)", file=sys.stderr)
    return lock


def _train(cli, run: RunOptions) -> int:
    trainer, module, datamodule = cli.trainer, cli.model, cli.datamodule
    logger = mlflow_logger(trainer.loggers)
    ckpt = resume_checkpoint(run, announce=trainer.is_global_zero)
    branch_tags = {}
    if ckpt is not None:
        meta = read_checkpoint_meta(ckpt)
        if meta.get("mlflow") and Path(ckpt).resolve().is_relative_to(run.path.resolve()):
            logger.load_state_dict(meta["mlflow"], resume_step=meta["global_step"])
        elif meta.get("mlflow"):
            # Another run's checkpoint (run.resume naming it from a new run.dir): a branch. Continuing that run
            # would splice this one's steps into its history; it gets a run of its own, which says where it began.
            # (Its run id may be unknown: a checkpoint written before the run was created names it by run key.)
            source = meta["mlflow"]
            branch_tags = {"crescent.resumed_from_run_key": source.get("run_key"),
                           "crescent.resumed_from_step": meta["global_step"],
                           "crescent.resumed_from_checkpoint": str(Path(ckpt).resolve()),
                           **({"crescent.resumed_from_run_id": source["run_id"]} if source.get("run_id") else {})}
        if trainer.is_global_zero:
            print(f"crescent train: resuming from {ckpt} ({meta.get('tokens_seen', 0):,} tokens seen)", file=sys.stderr)
    try:
        check_layout(module.schedule, datamodule.micro_batch_size, trainer.world_size, datamodule.num_workers,
                     datamodule.num_streams)
    except ConfigError as err:
        print(f"crescent train: error: {err}", file=sys.stderr)
        return 2
    if trainer.is_global_zero:
        run.path.mkdir(parents=True, exist_ok=True)
        config_yaml = cli.parser.dump(cli.config, skip_none=False)
        (run.path / "config.yaml").write_text(config_yaml)
        params = flatten_params(cli.config.as_dict())  # the run's parameters, once, as `section.key`
        for each in trainer.loggers:
            each.log_hyperparams(params)
        logger.log_artifact(str(run.path / "config.yaml"))
        if branch_tags and logger is not None:
            logger.set_tags(branch_tags)
    status = "success"
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None)
    except ConfigError as err:
        status = "failed"
        print(f"crescent train: error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:  # the last resumable checkpoint is intact; say why training stopped
        status = "failed"
        print(f"crescent train: error: {err}", file=sys.stderr)
        return 1
    except BaseException:
        status = "failed"
        raise
    finally:
        preempted = module.stop_reason == "preempted"
        logger.finalize("killed" if preempted else status)
    if trainer.is_global_zero:
        _print_summary(run, logger, module, preempted)
    return PREEMPTED_EXIT_CODE if preempted else 0


def _print_summary(run: RunOptions, logger, module, preempted: bool) -> None:
    exports = sorted((run.path / "exports").glob("step-*"))
    lines = [
        "",
        f"crescent train: {'preempted; checkpoint saved, run again to resume' if preempted else 'done'}",
        f"  tokens seen     {module.tokens_seen:,}",
        f"  val loss        {module.val_loss_start:.3f} -> {module.val_loss:.3f}",
        f"  checkpoints     {run.path / 'checkpoints'}",
        f"  exports         {exports[-1] if exports else run.path / 'exports'}",
        f"  MLflow          {logger.tracking_uri}  (experiment {logger.name!r}, run {logger.run_id})",
        "  browse          make mlflow-ui",
    ]
    print("\n".join(lines), file=sys.stderr)
