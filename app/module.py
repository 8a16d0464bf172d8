"""The LightningModule: the model, its loss, and one optimizer step per global batch driven by the stage engine.

Optimization is manual so that the global batch can change between stages (Moonlight: 2048 → 4096 sequences at
200B tokens) without touching the Trainer: each optimizer step accumulates `batch_size / (micro_batch × ranks)`
micro-batches, runs Newton–Schulz once, then reads lr, batch size and routing-bias rate for the next step from
the stage schedule at the tokens seen so far. Everything the math needs lives in `components/`.
"""
from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.distributed as dist

from components.data.stages import StageSchedule, get_schedule
from components.model.config import ModelConfig, get_preset
from components.model.counting import flops_per_token
from components.model.transformer import build_model

OPTIMIZERS = ("muon", "adamw")


class NonFiniteLossError(RuntimeError):
    pass


class ConfigError(ValueError):
    """A configuration that cannot train; `crescent train` prints it without a traceback and exits 2."""


def resolve_schedule(schedule: str | dict) -> StageSchedule:
    if isinstance(schedule, StageSchedule):
        return schedule
    if isinstance(schedule, str):
        return get_schedule(schedule)
    return StageSchedule.from_dict(dict(schedule))


def check_layout(schedule: StageSchedule, micro_batch_size: int, world_size: int, num_workers: int,
                 num_streams: int) -> None:
    """Before any step: every stage's global batch must split into micro-batches over the ranks, and the data
    order's virtual streams must split evenly over ranks × workers × micro-batch (exact resume)."""
    per_pass = micro_batch_size * world_size
    for stage in schedule.stages:
        sizes = [b for _, b in stage.batch_size] if isinstance(stage.batch_size, list) else [stage.batch_size]
        for size in sizes:
            if size % per_pass:
                raise ConfigError(
                    f"stage {stage.name!r}: batch_size={size} is not divisible by data.micro_batch_size × ranks = "
                    f"{micro_batch_size} × {world_size}")
    period = world_size * max(1, num_workers) * micro_batch_size
    if num_streams % period:
        raise ConfigError(f"data.num_streams={num_streams} must be a multiple of ranks × max(1, data.num_workers) × "
                          f"data.micro_batch_size = {world_size} × {max(1, num_workers)} × {micro_batch_size}")


def stage_boundaries(schedule: StageSchedule) -> list[tuple[str, int]]:
    """(stage name, first token of the stage) for plots."""
    out, start = [], 0
    for stage in schedule.stages:
        out.append((stage.name, start))
        start = stage.end_tokens
    return out


def mixture_names(schedule: StageSchedule) -> list[str]:
    return sorted({name for stage in schedule.stages for name, w in stage.mixture.items() if w > 0})


class CrescentModule(pl.LightningModule):
    """Args (the YAML's `model:` section):
        preset: model preset name (tiny, tiny-dense, small, moonlight-16b-a3b); model_overrides: ModelConfig fields.
        optimizer: 'muon' (Muon for matrices + AdamW for the rest, shared lr/wd) or 'adamw' (AdamW alone).
        schedule: stage preset name or a dict of stages (lr, global batch, mixture, bias rate by tokens seen).
        lr_scale: multiplies the schedule's lr (for sweeps); weight_decay: λ for both algorithms.
        max_nonfinite_in_a_row: skipped steps in a row before training stops with an error.
    """

    def __init__(
        self,
        preset: str = "tiny",
        model_overrides: dict | None = None,
        optimizer: str = "muon",
        schedule: str | dict = "tiny",
        lr_scale: float = 1.0,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        ns_steps: int = 5,
        ns_coefficients: str = "quintic",
        ns_dtype: str = "bfloat16",
        scale_mode: str = "moonlight",
        norm_weight_decay: bool = True,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        max_nonfinite_in_a_row: int = 5,
        init_seed: int = 0,
    ):
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"model.optimizer={optimizer!r} is unknown; choose one of {OPTIMIZERS}")
        if not lr_scale > 0:
            raise ValueError(f"model.lr_scale={lr_scale!r} must be > 0")
        if weight_decay < 0:
            raise ValueError(f"model.weight_decay={weight_decay!r} must be >= 0")
        if max_nonfinite_in_a_row < 1:
            raise ValueError(f"model.max_nonfinite_in_a_row={max_nonfinite_in_a_row!r} must be >= 1")
        self.save_hyperparameters()
        self.model_config: ModelConfig = get_preset(preset, **(model_overrides or {}))
        self.schedule = resolve_schedule(schedule)
        self.automatic_optimization = False
        self.model = None  # built in configure_model (after the strategy exists, possibly on the meta device)
        # Training position (saved in checkpoints): the data position is global, one number for all ranks.
        self.consumed_samples = 0
        self.skipped_steps = 0
        self.nonfinite_in_a_row = 0
        self.preempted = False
        self.val_loss = float("nan")
        self.val_loss_start = float("nan")
        self._val = torch.zeros(2)
        # Per-window accumulators (reset at every optimizer step).
        self._micro = 0
        self._window: torch.Tensor | None = None  # [sum of finite micro-batch losses, micro-batches, non-finite]
        self._window_counts: torch.Tensor | None = None
        # Set at each optimizer step for callbacks to read.
        self.stepped = False
        self.step_expert_counts: torch.Tensor | None = None
        self.step_loss: float = float("nan")
        self.step_state = self.schedule.at(0)
        self.optimizer_stats: dict[str, float] = {}

    # -------------------------------------------------------------------------------------------- setup
    @property
    def seq_len(self) -> int:
        return self.schedule.seq_len

    @property
    def tokens_seen(self) -> int:
        return self.consumed_samples * self.seq_len

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        check_layout(self.schedule, dm.micro_batch_size, self.trainer.world_size, dm.num_workers, dm.num_streams)

    def configure_model(self) -> None:
        """Build the model; under `muon_fsdp` build it on the meta device, shard it, then materialize each rank's
        slice with the same per-parameter seeded values a single device would have."""
        if self.model is not None:
            return
        seed = self.hparams.init_seed
        parallelize = getattr(self.trainer.strategy, "parallelize", None) if self._trainer else None
        if parallelize is None:
            self.model = build_model(self.model_config, device=self.device, seed=seed)
            return
        self.model = build_model(self.model_config, device="meta", seed=seed)
        parallelize(self.model)
        self.model.to_empty(device=self.trainer.strategy.root_device)
        self.model.reset_parameters(seed)

    def configure_optimizers(self):
        from app.optimizers import make_optimizer

        return make_optimizer(self, self.trainer.strategy)

    def micro_batch_size(self) -> int:
        return self.trainer.datamodule.micro_batch_size

    def accumulation(self, batch_size: int) -> int:
        """Micro-batches per optimizer step for a global batch of `batch_size` sequences."""
        per_pass = self.micro_batch_size() * self.trainer.world_size
        if batch_size % per_pass:
            raise ValueError(
                f"schedule batch_size={batch_size} is not divisible by micro_batch_size × ranks = "
                f"{self.micro_batch_size()} × {self.trainer.world_size}")
        return batch_size // per_pass

    @property
    def flops_per_batch(self) -> float:
        """Training FLOPs of one micro-batch on one device (MoE-aware), for Lightning's ThroughputMonitor."""
        return flops_per_token(self.model_config, self.seq_len) * self.seq_len * self.micro_batch_size()

    # -------------------------------------------------------------------------------------------- training
    def forward(self, input_ids, targets=None):
        return self.model(input_ids, targets=targets)

    def training_step(self, batch, batch_idx):
        self.stepped = False
        state = self.schedule.at(self.tokens_seen)
        accum = self.accumulation(state.batch_size)
        out = self.model(batch["input_ids"], targets=batch["targets"])
        loss = out.loss
        # No host sync per micro-batch: a non-finite loss only poisons gradients that the step then throws away.
        self.manual_backward(loss / accum)
        value = loss.detach().float()
        finite = torch.isfinite(value)
        entry = torch.stack([torch.where(finite, value, 0.0), torch.ones_like(value), (~finite).float()])
        self._window = entry if self._window is None else self._window + entry
        if out.expert_counts is not None:
            counts = out.expert_counts.detach()
            self._window_counts = counts if self._window_counts is None else self._window_counts + counts
        self._micro += 1
        if self._micro == accum:
            self._optimizer_step(state)
        return loss.detach()

    def _optimizer_step(self, state) -> None:
        opt = self.optimizers()
        for group in opt.param_groups:
            group["lr"] = state.lr * self.hparams.lr_scale
        loss_sum, count, nonfinite = self._all_reduce(self._window, "sum").tolist()  # the step's one host sync
        finite = nonfinite == 0
        if finite:
            opt.step()
            self.nonfinite_in_a_row = 0
            self.optimizer_stats = dict(getattr(opt.optimizer, "last_stats", {}) or {})
        else:
            self.skipped_steps += 1
            self.nonfinite_in_a_row += 1
            if self.nonfinite_in_a_row >= self.hparams.max_nonfinite_in_a_row:
                raise NonFiniteLossError(
                    f"{self.nonfinite_in_a_row} optimizer steps in a row had a non-finite loss "
                    f"(model.max_nonfinite_in_a_row={self.hparams.max_nonfinite_in_a_row}); stopping at "
                    f"{self.tokens_seen} tokens. Lower the lr or check the data.")
        opt.zero_grad(set_to_none=True)
        counts = self._window_counts
        if counts is not None and self.trainer.world_size > 1:
            counts = self._all_reduce(counts.clone(), "sum")
        self.step_expert_counts = counts
        self.step_loss = loss_sum / (count - nonfinite) if count > nonfinite else float("nan")
        self.step_state = state
        self.consumed_samples += state.batch_size
        self.stepped = True
        self._micro = 0
        self._window = None
        self._window_counts = None
        self.emit({
            "train/loss": self.step_loss,
            "train/lr": state.lr * self.hparams.lr_scale,
            "train/tokens": float(self.tokens_seen),
            "train/batch_size": float(state.batch_size),
            "train/stage": float(state.stage_index),
            "train/skipped_steps": float(self.skipped_steps),
        })
        if self.tokens_seen >= self.schedule.total_tokens:
            self.trainer.should_stop = True

    def emit(self, metrics: dict[str, float]) -> None:
        """Send metrics to the logger at the optimizer step (rank 0; the MLflow logger never blocks)."""
        if self.trainer.is_global_zero and self.trainer.logger is not None:
            self.trainer.logger.log_metrics({k: float(v) for k, v in metrics.items()}, step=self.trainer.global_step)

    def _all_reduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        if not (dist.is_available() and dist.is_initialized()) or self.trainer.world_size == 1:
            return tensor
        device = self.trainer.strategy.root_device
        t = tensor.to(device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return t.to(tensor.device)

    # -------------------------------------------------------------------------------------------- validation
    def validation_step(self, batch, batch_idx):
        out = self.model(batch["input_ids"], targets=batch["targets"])
        self._val += torch.stack([out.loss.detach().float().cpu() * batch["input_ids"].shape[0],
                                  torch.tensor(float(batch["input_ids"].shape[0]))])
        return out.loss

    @torch.no_grad()
    def held_out_loss(self) -> float:
        """Mean loss over the validation set, outside Lightning's loop (at the start and end of training)."""
        loader = self.trainer.datamodule.val_dataloader()
        if isinstance(loader, list):  # no validation set configured
            return float("nan")
        was_training = self.model.training
        self.model.eval()
        total = torch.zeros(2)
        for batch in loader:
            out = self.model(batch["input_ids"].to(self.device), targets=batch["targets"].to(self.device))
            n = batch["input_ids"].shape[0]
            total += torch.stack([out.loss.float().cpu() * n, torch.tensor(float(n))])
        self.model.train(was_training)
        total = self._all_reduce(total, "sum")
        return (total[0] / total[1]).item() if total[1] > 0 else float("nan")

    def on_train_start(self) -> None:
        if self.trainer.global_step == 0:
            self.val_loss = self.val_loss_start = self.held_out_loss()
            self.emit({"val/loss": self.val_loss})

    def on_train_end(self) -> None:
        if not self.preempted:
            self.val_loss = self.held_out_loss()
            self.emit({"val/loss": self.val_loss})

    def on_validation_epoch_start(self) -> None:
        self._val = torch.zeros(2)

    def on_validation_epoch_end(self) -> None:
        total = self._all_reduce(self._val, "sum")
        if total[1] > 0:
            self.val_loss = (total[0] / total[1]).item()
            if not self.trainer.sanity_checking:
                self.emit({"val/loss": self.val_loss})

    # -------------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["crescent"] = {
            "consumed_samples": self.consumed_samples,
            "tokens_seen": self.tokens_seen,
            "skipped_steps": self.skipped_steps,
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
            "mlflow": self.trainer.logger.state_dict() if hasattr(self.trainer.logger, "state_dict") else {},
            "stage": self.schedule.at(self.tokens_seen).stage_name,
            "model_config": self.model_config.to_dict(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("crescent", {})
        self.consumed_samples = int(state.get("consumed_samples", 0))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.nonfinite_in_a_row = int(state.get("nonfinite_in_a_row", 0))


def total_steps_estimate(schedule: StageSchedule) -> int:
    """Optimizer steps to the end of the schedule (for the progress bar): walk it one global batch at a time."""
    steps, tokens = 0, 0
    while tokens < schedule.total_tokens:
        tokens += schedule.at(tokens).batch_size * schedule.seq_len
        steps += 1
    return steps
