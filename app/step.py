"""`StepReport`: what one optimizer step did, produced once by `CrescentModule` and read by every observer.

The module's `training_step` returns `{"loss": ..., "step": StepReport}` on the micro-batch that completes an
optimizer step (Lightning hands that dict to every callback's `on_train_batch_end` as `outputs`) and only the loss
on the micro-batches that accumulate. Callbacks read the report with `step_report(outputs)`; they never poll the
module's attributes. Every number in it is already global (summed or averaged over micro-batches and ranks), so
all ranks hold the same report.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class StepReport:
    step: int                 # optimizer steps taken or skipped, this one included (the trainer's global step)
    tokens: int               # tokens seen after this step (the schedule's clock)
    consumed_samples: int     # the data position after this step (global samples)
    loss: float               # mean training loss of the step's finite micro-batches (nan when none was)
    lr: float                 # lr the step used (schedule × lr_scale)
    batch_size: int           # global batch of the step (sequences)
    stage_index: int
    stage_name: str
    bias_update_rate: float   # routing-bias rate the step used (0 when skipped or dense)
    skipped: bool             # nothing was updated: a non-finite loss or gradient
    skip_reason: str | None   # 'loss' | 'gradient' | None
    skipped_steps: int        # skipped steps so far in the whole run
    lost_samples: int         # samples of this step's batches lost to bad data (all ranks)
    bad_shards: int           # shard reads that failed behind this step's batches (all ranks)
    expert_counts: torch.Tensor | None = None  # [MoE layers, routed experts] tokens, summed over the step and ranks
    optimizer_stats: dict[str, float] = field(default_factory=dict)  # update/weight RMS per group, NS time, ...
    max_logit: torch.Tensor | None = None  # [layers, heads] max pre-softmax attention logit over the step (tracked)
    qk_clipped_heads: torch.Tensor | None = None  # [layers] heads QK-clip rescaled after this step (clip on)


def step_report(outputs) -> StepReport | None:
    """The report in a training batch's `outputs`, or None when that micro-batch only accumulated."""
    if isinstance(outputs, dict):
        report = outputs.get("step")
        return report if isinstance(report, StepReport) else None
    return None
