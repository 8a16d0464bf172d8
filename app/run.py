"""A training run on disk: its directory, its callbacks and logger, automatic resume, and the exit status.

Layout of `run.dir`: checkpoints/ (resumable, keep-last-k, `preempt-step=N.ckpt` after a SIGTERM), exports/ (HF
layout for evaluation), mlflow-spool/ (metrics waiting for an unreachable tracking server), config.yaml.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from app.callbacks import (
    ExportCheckpoint,
    MoEThroughputMonitor,
    OptimizerTelemetry,
    PreemptionCheckpoint,
    RoutingBiasBalancer,
    RunHistory,
    SVDEntropyMonitor,
    TokenProgressBar,
    resumable_checkpoint,
)
from app.callbacks.preemption import PREEMPTED_EXIT_CODE
from app.module import ConfigError, NonFiniteLossError, check_layout
from app.tracking import CrescentMLflowLogger, flatten_params

_STEP = re.compile(r"(?:preempt-)?step[=-](\d+)(?:\.ckpt)?$")


@dataclass
class RunOptions:
    """The YAML's `run:` section.

    Args:
        dir: run directory (checkpoints, exports, spool); resuming is automatic when it holds a checkpoint.
        resume: 'auto' (latest checkpoint in dir, if any), 'never', or a checkpoint path.
        checkpoint_every_n_steps / keep_last: resumable checkpoint cadence and how many to keep.
        export_every_n_steps: export checkpoint cadence (and one at the end).
        experiment / tracking_uri: MLflow experiment; URI default MLFLOW_TRACKING_URI or sqlite:///mlruns.db.
        log_every_n_steps: expert-load metrics cadence; svd_entropy_every_n_steps; max_logit_every_n_steps.
        peak_flops_per_device: for MFU where Lightning knows no peak (CPUs).
        progress_bar: show the token progress bar.
    """

    dir: str = "runs/default"
    resume: str = "auto"
    checkpoint_every_n_steps: int = 50
    keep_last: int = 3
    export_every_n_steps: int = 200
    experiment: str = "crescent"
    tracking_uri: str | None = None
    run_name: str | None = None
    log_every_n_steps: int = 10
    svd_entropy_every_n_steps: int = 50
    max_logit_every_n_steps: int = 10
    peak_flops_per_device: float | None = None
    progress_bar: bool = True

    def __post_init__(self) -> None:
        if self.resume not in ("auto", "never") and not Path(self.resume).exists():
            raise ValueError(f"run.resume={self.resume!r} must be 'auto', 'never' or an existing checkpoint path")
        for name in ("checkpoint_every_n_steps", "keep_last", "export_every_n_steps", "log_every_n_steps",
                     "svd_entropy_every_n_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"run.{name}={getattr(self, name)!r} must be >= 1")

    @property
    def path(self) -> Path:
        return Path(self.dir)

    def build(self, module, datamodule) -> tuple[list, CrescentMLflowLogger]:
        root = self.path
        logger = CrescentMLflowLogger(experiment_name=self.experiment, tracking_uri=self.tracking_uri,
                                      run_name=self.run_name or root.name, spool_dir=str(root / "mlflow-spool"))
        callbacks = [
            RunHistory(),
            RoutingBiasBalancer(self.log_every_n_steps),
            OptimizerTelemetry(self.max_logit_every_n_steps),
            SVDEntropyMonitor(self.svd_entropy_every_n_steps),
            MoEThroughputMonitor(self.peak_flops_per_device),
            resumable_checkpoint(root / "checkpoints", self.checkpoint_every_n_steps, self.keep_last),
            ExportCheckpoint(root / "exports", self.export_every_n_steps),
            PreemptionCheckpoint(root / "checkpoints"),
        ]
        if self.progress_bar:
            callbacks.append(TokenProgressBar())
        return callbacks, logger


def latest_checkpoint(directory: Path) -> Path | None:
    """The checkpoint with the highest step in `directory` (file or DCP folder); a preemption one wins a tie."""
    if not directory.is_dir():
        return None
    best, best_key = None, None
    for path in directory.iterdir():
        m = _STEP.search(path.name)
        if not m:
            continue
        key = (int(m.group(1)), path.name.startswith("preempt"))
        if best_key is None or key > best_key:
            best, best_key = path, key
    return best


def read_checkpoint_meta(path: Path) -> dict:
    """The `crescent` entry of a checkpoint (a file, or the metadata file of a sharded folder)."""
    file = path / "meta.pt" if path.is_dir() else path
    state = torch.load(file, map_location="cpu", weights_only=False)  # our own file, written by this program
    return state.get("crescent", {})


def train_from_cli(cli, cwd: Path) -> int:
    run = RunOptions(**cli.config["run"])
    trainer, module, datamodule = cli.trainer, cli.model, cli.datamodule
    logger = trainer.logger
    ckpt = None
    if run.resume == "auto":
        ckpt = latest_checkpoint(run.path / "checkpoints")
    elif run.resume != "never":
        ckpt = Path(run.resume)
    if ckpt is not None:
        meta = read_checkpoint_meta(ckpt)
        if meta.get("mlflow"):
            logger.load_state_dict(meta["mlflow"])
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
        logger.log_hyperparams(flatten_params(cli.config.as_dict()))
        logger.log_artifact(str(run.path / "config.yaml"))
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
        preempted = getattr(module, "preempted", False)
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
