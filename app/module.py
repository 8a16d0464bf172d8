"""The LightningModule: the model, its loss, and one optimizer step per global batch driven by the stage schedule.

Optimization is manual so that the global batch can change between stages (Moonlight: 2048 → 4096 sequences at
200B tokens) without touching the Trainer: each optimizer step accumulates `batch_size / (micro_batch × ranks)`
micro-batches, runs Newton–Schulz once, applies the routing-bias update (App. C) and QK-clip (MuonClip) unless the
step was skipped, then reads lr, batch size and routing-bias rate for the next step from the schedule at the tokens
seen so far. The step ends in one `StepReport` (app/step.py) that the callbacks observe. Everything the math needs
lives in `components/`.
"""
from __future__ import annotations

import sys
from collections.abc import Mapping

import lightning.pytorch as pl
import torch
import torch.distributed as dist

from app.sft import ChatTokens, InitFrom, loss_weight, packed_inputs
from app.step import StepReport
from components.data.epochs import EpochSchedule, resolve_training_schedule
from components.data.stream import check_stream_layout, data_order_changes
from components.model.attention_stats import take_max_logits
from components.model.balancing import update_routing_biases
from components.model.config import ModelConfig, get_preset
from components.model.counting import flops_per_token
from components.model.transformer import build_model
from components.optim.head_blocks import GRANULARITIES
from components.optim.qk_clip import QKClip
from components.schedule import StageSchedule

OPTIMIZERS = ("muon", "adamw")
STOP_REASONS = ("schedule_complete", "preempted")


class NonFiniteLossError(RuntimeError):
    """`model.max_nonfinite_in_a_row` optimizer steps in a row were skipped (non-finite loss or gradient)."""


class ConfigError(ValueError):
    """A configuration that cannot train; `crescent train` prints it without a traceback and exits 2."""


def check_layout(schedule: StageSchedule, micro_batch_size: int, world_size: int, num_workers: int,
                 num_streams: int) -> None:
    """The one layout check, before training (`crescent train` runs it before the run directory or the MLflow run
    exist; call it yourself when driving the module with your own Trainer): every stage's global batch splits into
    micro-batches over the ranks, and the data order's virtual streams split evenly over ranks × workers ×
    micro-batch (exact resume)."""
    try:
        schedule.check_batches(micro_batch_size, world_size)
        check_stream_layout(num_streams, world_size, num_workers, micro_batch_size)
    except ValueError as err:
        raise ConfigError(str(err)) from None


class CrescentModule(pl.LightningModule):
    """Args (the YAML's `model:` section):
        preset: model preset name (tiny, tiny-dense, small, moonlight-16b-a3b); model_overrides: ModelConfig fields.
        optimizer: 'muon' (Muon for matrices + AdamW for the rest, shared lr/wd) or 'adamw' (AdamW alone).
        schedule: stage preset name or a dict of stages (lr, global batch, mixture, bias rate by tokens seen).
        lr_scale: multiplies the schedule's lr (for sweeps); weight_decay: λ for both algorithms.
        update_rms: the RMS r of Muon's update (scale_mode moonlight: r·sqrt(max(A, B)); update_norm: r/RMS(O);
            baseline: r·sqrt(H)); the paper's 0.2 matches AdamW's typical update RMS (App. A Table 8 sweeps it).
        max_nonfinite_in_a_row: skipped steps in a row (non-finite loss or gradient) before training stops.
        muon_granularity: 'matrix' or 'head' (attention projections orthogonalized per head's block, Kimi K3).
        qk_clip_threshold: τ of QK-clip (null: off; K2 uses 100): after each step, every head whose max logit over
            the step (all micro-batches and ranks) exceeded τ has its query/key rows scaled back to τ.
        qk_clip_alpha: the query's share of the no-position factor (0.5: √γ each side; components/optim/qk_clip.py).
        init_from: fine-tuning: an export checkpoint (or a run's exports/ folder: its newest) whose weights replace
            the initial ones; its tokenizer must be the data's (app/sft.py). The schedule may then be an epoch
            schedule (components/data/epochs.py).
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
        update_rms: float = 0.2,
        norm_weight_decay: bool = True,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        max_nonfinite_in_a_row: int = 5,
        init_seed: int = 0,
        muon_granularity: str = "matrix",
        qk_clip_threshold: float | None = None,
        qk_clip_alpha: float = 0.5,
        init_from: str | None = None,
    ):
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"model.optimizer={optimizer!r} is unknown; choose one of {OPTIMIZERS}")
        if not lr_scale > 0:
            raise ValueError(f"model.lr_scale={lr_scale!r} must be > 0")
        if weight_decay < 0:
            raise ValueError(f"model.weight_decay={weight_decay!r} must be >= 0")
        if not (isinstance(update_rms, (int, float)) and 0 < update_rms <= 10):
            raise ValueError(f"model.update_rms={update_rms!r} must be a number in (0, 10] (the paper's 0.2)")
        if max_nonfinite_in_a_row < 1:
            raise ValueError(f"model.max_nonfinite_in_a_row={max_nonfinite_in_a_row!r} must be >= 1")
        if muon_granularity not in GRANULARITIES:
            raise ValueError(f"model.muon_granularity={muon_granularity!r} is unknown; choose one of {GRANULARITIES}")
        self.qk_clip = None if qk_clip_threshold is None else QKClip(qk_clip_threshold, qk_clip_alpha)
        # The run's parameters reach the loggers once, from the whole config (app/run.py), not from here too.
        self.save_hyperparameters(logger=False)
        self.model_config: ModelConfig = get_preset(preset, **(model_overrides or {}))
        self.schedule = resolve_training_schedule(schedule)
        self.init_from = InitFrom(init_from) if init_from else None
        self._chat_tokens = ChatTokens()
        self.automatic_optimization = False
        self.model = None  # built in configure_model (after the strategy exists, possibly on the meta device)
        # Training position (saved in checkpoints). The data position is global, one number for all ranks, and
        # this is its only owner: the data module builds the stream from it; nothing writes it back.
        self.consumed_samples = 0
        self.skipped_steps = 0
        self.nonfinite_in_a_row = 0
        self.lost_samples = 0
        self.bad_shards = 0
        self.stop_reason: str | None = None
        self.val_loss = float("nan")
        self.val_loss_start = float("nan")
        self._final_val_step = -1
        self._val = torch.zeros(2)
        # The optimizer step being accumulated (reset at every step).
        self._micro = 0
        self._window: torch.Tensor | None = None  # [finite loss sum, micro-batches, non-finite, lost, bad shards]
        self._window_counts: torch.Tensor | None = None
        self._track_max_logit = False
        self._max_logit: torch.Tensor | None = None

    # -------------------------------------------------------------------------------------------- setup
    @property
    def seq_len(self) -> int:
        return self.schedule.seq_len

    @property
    def tokens_seen(self) -> int:
        return self.consumed_samples * self.seq_len

    def setup(self, stage: str) -> None:
        limit = self.trainer.limit_train_batches
        if stage == "fit" and not (limit is None or (isinstance(limit, float) and limit == 1.0)):  # 1 (int): 1 batch
            # An epoch that ends re-iterates the loader from where this process started (mid-step too): samples
            # would repeat while consumed_samples advances, and a resume would no longer match.
            raise ConfigError(f"trainer.limit_train_batches={limit!r} is not supported: the training stream is one "
                              "pass in global sample order with no epochs; bound the run with trainer.max_steps or "
                              "the schedule's tokens instead")
        if self.init_from is not None:
            try:
                self.init_from.check_tokenizer(self.trainer.datamodule.data_fingerprints())
            except ValueError as err:
                raise ConfigError(str(err)) from None

    def configure_model(self) -> None:
        """Build the model; under `muon_fsdp` build it on the meta device, shard it, then materialize each rank's
        slice with the same per-parameter seeded values a single device would have."""
        if self.model is not None:
            return
        seed = self.hparams.init_seed
        parallelize = getattr(self.trainer.strategy, "parallelize", None) if self._trainer else None
        if parallelize is None:
            self.model = build_model(self.model_config, device=self.device, seed=seed)
        else:
            self.model = build_model(self.model_config, device="meta", seed=seed)
            parallelize(self.model)
            self.model.to_empty(device=self.trainer.strategy.root_device)
            self.model.reset_parameters(seed)
        if self.init_from is not None:
            try:
                self.init_from.load_into(self.model)
            except ValueError as err:
                raise ConfigError(f"model.init_from: {err}") from None

    def configure_optimizers(self):
        from app.optimizers import make_optimizer

        return make_optimizer(self, self.trainer.strategy)

    def micro_batch_size(self) -> int:
        return self.trainer.datamodule.micro_batch_size

    @property
    def flops_per_batch(self) -> float:
        """Training FLOPs of one micro-batch on one device (MoE-aware), for Lightning's ThroughputMonitor."""
        return flops_per_token(self.model_config, self.seq_len) * self.seq_len * self.micro_batch_size()

    # -------------------------------------------------------------------------------------------- observers' API
    def log_step_metrics(self, metrics: Mapping[str, float], monitor: bool = True) -> None:
        """Metrics of the optimizer step just taken, at `trainer.global_step`; every value is already global.

        Monitors (`ModelCheckpoint(monitor=...)`, `EarlyStopping`, `trainer.callback_metrics`) see them through
        `self.log` (no `sync_dist`: every rank holds the same value). Every logger gets them exactly once, at this
        step, through `logger.log_metrics`, as Lightning's own LearningRateMonitor does: Lightning's flush of
        `self.log` values re-sends the held values at every later micro-batch (measured: each row twice under
        2-step accumulation, and a metric logged every N steps again at each step in between), which would put
        stale copies into the tracking store. `monitor=False` where Lightning forbids `self.log` (on_train_end).
        """
        values = {k: float(v) for k, v in metrics.items()}
        if monitor:
            self.log_dict(values, logger=False, batch_size=1)
        if self.trainer.is_global_zero:
            for logger in self.trainer.loggers:
                logger.log_metrics(values, step=self.trainer.global_step)

    def track_max_logit_next_step(self) -> None:
        """Record the max pre-softmax attention logit of every layer and head over the next optimizer step's
        micro-batches (App. D; a chunked extra QKᵀ per layer); the step's report carries it. With QK-clip on, every
        step records it anyway."""
        self._track_max_logit = True

    def stop(self, reason: str) -> None:
        """End training after this step: `reason` is 'schedule_complete' or 'preempted' (see `stop_reason`)."""
        if reason not in STOP_REASONS:
            raise ValueError(f"stop reason={reason!r} is unknown; choose one of {STOP_REASONS}")
        self.stop_reason = self.stop_reason or reason
        self.trainer.should_stop = True

    # -------------------------------------------------------------------------------------------- training
    def forward(self, input_ids, targets=None):
        return self.model(input_ids, targets=targets)

    def training_step(self, batch, batch_idx):
        state = self.schedule.at(self.tokens_seen)
        accum = self.schedule.accumulation(self.tokens_seen, self.micro_batch_size(), self.trainer.world_size)
        attention = self._attention_layers() if self._track_max_logit or self.qk_clip is not None else []
        for attn in attention:
            attn.track_max_logit = True
        out = self.model(batch["input_ids"], targets=batch["targets"], **packed_inputs(batch))
        loss = out.loss
        # No host sync per micro-batch: a non-finite loss only poisons gradients that the step then throws away.
        # A micro-batch whose samples were all lost to bad data still runs (collectives stay in step under FSDP2):
        # its gradients are zero and its (undefined) loss does not count.
        self.manual_backward(loss / accum)
        self._accumulate(batch, loss.detach().float(), out.expert_counts, attention)
        self._chat_tokens.add(batch)
        self._micro += 1
        if self._micro == accum:
            report = self._optimizer_step(state)
            self._log_chat_metrics()
            return {"loss": loss.detach(), "step": report}
        return loss.detach()

    def _log_chat_metrics(self) -> None:
        """Fine-tuning metrics of the step just taken: target fraction, packing efficiency, epochs done."""
        metrics = self._chat_tokens.take(self._all_reduce)
        if metrics and isinstance(self.schedule, EpochSchedule):
            metrics["sft/epoch"] = self.schedule.epoch(self.consumed_samples)
        if metrics:
            self.log_step_metrics(metrics)

    def _accumulate(self, batch, value: torch.Tensor, expert_counts, attention) -> None:
        rows = float(batch["input_ids"].shape[0] > 0)
        finite = torch.isfinite(value)
        entry = torch.stack([torch.where(finite, value, 0.0) * rows, torch.ones_like(value) * rows,
                             (~finite).float() * rows,
                             batch["lost_samples"].to(value).reshape(()), batch["bad_shards"].to(value).reshape(())])
        self._window = entry if self._window is None else self._window + entry
        if expert_counts is not None:
            counts = expert_counts.detach()
            self._window_counts = counts if self._window_counts is None else self._window_counts + counts
        if attention:
            top = take_max_logits(attention).to(value.device)  # [layers, heads]
            self._max_logit = top if self._max_logit is None else torch.maximum(self._max_logit, top)

    def _attention_layers(self) -> list:
        return [layer.self_attn for layer in self.model.model.layers]

    def _optimizer_step(self, state) -> StepReport:
        """The step: lr from the schedule, one host sync, the optimizer (NS once), the routing-bias update and
        QK-clip unless anything was non-finite, the data position, and the report."""
        opt = self.optimizers()
        lr = state.lr * self.hparams.lr_scale
        for group in opt.param_groups:
            group["lr"] = lr
        loss_sum, count, nonfinite, lost, bad = self._all_reduce(self._window, "sum").tolist()  # the one host sync
        skip_reason = "loss" if nonfinite else None
        stats: dict[str, float] = {}
        if skip_reason is None:
            opt.step()
            stats = dict(getattr(opt.optimizer, "last_stats", {}) or {})
            if stats.get("nonfinite"):  # the optimizer found a non-finite gradient and updated nothing
                skip_reason = "gradient"
        else:  # skipped through the optimizer, so the step is counted (global_step) as a gradient skip is
            opt.step(skip=True)
        opt.zero_grad(set_to_none=True)
        counts = self._window_counts
        if counts is not None and self.trainer.world_size > 1:
            counts = self._all_reduce(counts.clone(), "sum")
        max_logit, clipped = self._max_logit, None
        if max_logit is not None and self.trainer.world_size > 1:
            max_logit = self._all_reduce(max_logit.clone(), "max")
        if skip_reason is None:
            self.nonfinite_in_a_row = 0
            if counts is not None:
                update_routing_biases(self.model.moe_layers(), counts, state.bias_update_rate)  # App. C
            if self.qk_clip is not None:  # after the update, on the weights; Muon's momentum is not touched
                clipped = self.qk_clip.apply(self._attention_layers(), max_logit)
        else:
            self.skipped_steps += 1
            self.nonfinite_in_a_row += 1
        self.consumed_samples += state.batch_size
        self.lost_samples += int(lost)
        self.bad_shards += int(bad)
        report = StepReport(
            step=self.trainer.global_step, tokens=self.tokens_seen, consumed_samples=self.consumed_samples,
            loss=loss_sum / (count - nonfinite) if count > nonfinite else float("nan"), lr=lr,
            batch_size=state.batch_size, stage_index=state.stage_index, stage_name=state.stage_name,
            bias_update_rate=state.bias_update_rate if skip_reason is None and counts is not None else 0.0,
            skipped=skip_reason is not None, skip_reason=skip_reason, skipped_steps=self.skipped_steps,
            lost_samples=int(lost), bad_shards=int(bad), expert_counts=counts, optimizer_stats=stats,
            max_logit=max_logit, qk_clipped_heads=clipped)
        self._micro, self._window, self._window_counts = 0, None, None
        self._track_max_logit, self._max_logit = False, None
        metrics = {
            "train/loss": report.loss,
            "train/lr": lr,
            "train/tokens": float(report.tokens),
            "train/batch_size": float(state.batch_size),
            "train/stage": float(state.stage_index),
            "train/skipped_steps": float(self.skipped_steps),
        }
        if lost or bad:
            metrics.update({"data/lost_samples": float(self.lost_samples), "data/bad_shards": float(self.bad_shards)})
        self.log_step_metrics(metrics)
        if self.nonfinite_in_a_row >= self.hparams.max_nonfinite_in_a_row:
            raise NonFiniteLossError(
                f"{self.nonfinite_in_a_row} optimizer steps in a row were skipped for a non-finite loss or gradient "
                f"(model.max_nonfinite_in_a_row={self.hparams.max_nonfinite_in_a_row}); stopping at "
                f"{self.tokens_seen} tokens. Lower the lr or check the data.")
        if self.tokens_seen >= self.schedule.total_tokens:
            self.stop("schedule_complete")
            self._final_held_out_loss(monitor=True)  # before the callbacks see the last step (plots, exports)
        return report

    def _all_reduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        if not (dist.is_available() and dist.is_initialized()) or self.trainer.world_size == 1:
            return tensor
        device = self.trainer.strategy.root_device
        t = tensor.to(device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return t.to(tensor.device)

    # -------------------------------------------------------------------------------------------- validation
    def validation_step(self, batch, batch_idx):
        if self._final_val_step == self.trainer.global_step:
            return None  # the pass Lightning adds after stop(): the whole set's loss at this step is logged already
        # Every micro-batch runs the forward, an empty one too (samples lost to bad data, or this rank's padding at
        # the end of the held-out set): under FSDP2 each forward all-gathers, and every rank must take part.
        out = self.model(batch["input_ids"], targets=batch["targets"], **packed_inputs(batch))
        n = loss_weight(batch)  # rows; a chat batch's targets
        if n > 0:  # an empty batch's loss is undefined (NaN) and weighs nothing
            self._val += torch.stack([out.loss.detach().float().cpu() * n, torch.tensor(float(n))])
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
        # The validation loop's precision (bf16 autocast under bf16-mixed): Lightning applies it only inside its
        # own step calls, and this also runs from on_train_start/on_train_end — one val/loss curve, one precision.
        with self.trainer.precision_plugin.val_step_context():
            for batch in loader:  # every micro-batch runs, an empty one too (see validation_step)
                out = self.model(batch["input_ids"].to(self.device), targets=batch["targets"].to(self.device),
                                 **packed_inputs(batch, self.device))
                n = loss_weight(batch)
                if n > 0:
                    total += torch.stack([out.loss.float().cpu() * n, torch.tensor(float(n))])
        self.model.train(was_training)
        total = self._all_reduce(total, "sum")
        return (total[0] / total[1]).item() if total[1] > 0 else float("nan")

    def on_train_start(self) -> None:
        if self.trainer.global_step > 0:  # resumed: the optimizer state is the checkpoint's, its settings the config's
            optimizer = self.optimizers()
            changes = getattr(optimizer, "optimizer", optimizer).use_constructed_settings()
            if changes and self.trainer.is_global_zero:
                print("crescent train: resumed with the config's optimizer settings, not the checkpoint's: "
                      + "; ".join(changes), file=sys.stderr)
        if self.init_from is not None and self.trainer.is_global_zero:
            for logger in self.trainer.loggers:
                if hasattr(logger, "set_tags"):
                    logger.set_tags(self.init_from.tags())
        if self.trainer.global_step == 0:
            self.val_loss = self.val_loss_start = self.held_out_loss()
            self.log_step_metrics({"val/loss": self.val_loss}, monitor=False)
        elif self.tokens_seen >= self.schedule.total_tokens:
            # Resumed from the checkpoint the schedule ended at (a rerun, or a process that only delivers the
            # journal a finished run left): no step past the schedule, and its final val/loss is logged already.
            self.stop("schedule_complete")
            self._final_val_step = self.trainer.global_step

    def on_train_end(self) -> None:
        if self.stop_reason != "preempted" and self._final_val_step != self.trainer.global_step:
            self._final_held_out_loss(monitor=False)  # stopped by max_steps, EarlyStopping, ...

    def _final_held_out_loss(self, monitor: bool) -> None:
        self.val_loss = self.held_out_loss()
        self._final_val_step = self.trainer.global_step
        self.log_step_metrics({"val/loss": self.val_loss}, monitor=monitor)

    def on_validation_epoch_start(self) -> None:
        self._val = torch.zeros(2)

    def on_validation_epoch_end(self) -> None:
        if self._final_val_step == self.trainer.global_step:
            return  # (see validation_step) its limit_val_batches subset must not replace the whole set's val/loss
        total = self._all_reduce(self._val, "sum")
        if total[1] > 0:
            self.val_loss = (total[0] / total[1]).item()
            if not self.trainer.sanity_checking:
                self.log_step_metrics({"val/loss": self.val_loss})

    # -------------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        mlflow = next((lg for lg in self.trainer.loggers if hasattr(lg, "run_key")), None)
        checkpoint["crescent"] = {
            "consumed_samples": self.consumed_samples,
            "tokens_seen": self.tokens_seen,
            "skipped_steps": self.skipped_steps,
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
            "lost_samples": self.lost_samples,
            "bad_shards": self.bad_shards,
            "mlflow": mlflow.state_dict() if mlflow is not None else {},
            "stage": self.schedule.at(self.tokens_seen).stage_name,
            "model_config": self.model_config.to_dict(),
            "data_order": self._data_order(),
        }

    def _data_order(self) -> dict | None:
        """The data order of the samples consumed so far (components/data/stream.py `data_order`)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        return datamodule.data_order(self.consumed_samples) if hasattr(datamodule, "data_order") else None

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("crescent", {})
        self.consumed_samples = int(state.get("consumed_samples", 0))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.nonfinite_in_a_row = int(state.get("nonfinite_in_a_row", 0))
        self.lost_samples = int(state.get("lost_samples", 0))
        self.bad_shards = int(state.get("bad_shards", 0))
        saved, now = state.get("data_order"), self._data_order()
        changes = data_order_changes(saved, now) if saved is not None and now is not None else []
        if changes:
            raise ConfigError(
                f"the configuration orders the checkpoint's {self.consumed_samples} consumed samples differently, so "
                f"a resume would repeat some and skip others: {'; '.join(changes)}. Resume with the checkpoint's "
                "data settings (later stages may change), or start a new run (another run.dir, model.init_from "
                "an export)")
