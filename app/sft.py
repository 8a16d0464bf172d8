"""Supervised fine-tuning in the training module: the start from an export, its lineage, the chat batches' metrics.

SFT is the pretraining loop over chat shard sets (components/data/chat.py): the same module, optimizers,
strategies and checkpoints. What differs is gathered here so the module only calls it:
- `InitFrom`: `model.init_from` names an export checkpoint (or a run's `exports/` folder: its newest). Its weights
  replace the freshly initialised ones (weights only: optimizer, data position and schedule start afresh), its
  architecture must be the configured one, and its tokenizer must be the one the training data was built with.
  A resumed run loads the export too, then Lightning restores the checkpoint over it.
- Its lineage on the run: tags naming the export and the pretraining run and step it came from (crescent.json).
- `ChatTokens`: per optimizer step, the share of token slots that are targets and that are not padding
  (packing efficiency), from the `chat_tokens` counts the loader attaches to every chat micro-batch.
- `packed_inputs` / `loss_weight`: a packed batch's positions and segments for the model; held-out losses of chat
  batches averaged over their targets (assistant tokens), not their rows.
"""
from __future__ import annotations

from pathlib import Path

import torch

from components.checkpoint import load_export_weights, read_metadata, resolve_export


class InitFrom:
    """The export a fine-tuning run starts from."""

    def __init__(self, path: str):
        try:
            self.path = resolve_export(path)
            self.metadata = read_metadata(self.path)
        except (FileNotFoundError, ValueError) as err:
            raise ValueError(f"model.init_from={path!r}: {err}") from None

    def load_into(self, model) -> None:
        load_export_weights(model, self.path)

    def check_tokenizer(self, data_fingerprints: dict[str, str | None]) -> None:
        """The export's tokenizer must be the data's (a ValueError naming the set otherwise)."""
        from components.data.tokenizer import load_tokenizer

        ours = load_tokenizer(self.path).fingerprint
        for name, theirs in data_fingerprints.items():
            if theirs != ours:
                raise ValueError(f"model.init_from={str(self.path)!r} has tokenizer fingerprint {ours[:16]}..., but "
                                 f"shard set {name!r} was built with {str(theirs)[:16]}...; build the chat data with "
                                 "the export's tokenizer (its directory holds it)")

    def tags(self) -> dict[str, str]:
        """MLflow tags linking the fine-tuning run to the checkpoint and the pretraining run it came from."""
        tags = {"crescent.init_from": str(Path(self.path).resolve()), "crescent.pretrain_step": str(self.metadata["step"])}
        if self.metadata.get("run_id"):
            tags["crescent.pretrain_run_id"] = str(self.metadata["run_id"])
        if self.metadata.get("tracking_uri"):
            tags["crescent.pretrain_tracking_uri"] = str(self.metadata["tracking_uri"])
        return tags


class ChatTokens:
    """Counts of the micro-batches of one optimizer step on this rank: non-padding inputs, targets, slots. They stay
    on the batches' device (no host sync per micro-batch); `take` reads them once per step."""

    def __init__(self):
        self.counts: torch.Tensor | None = None

    def add(self, batch: dict) -> None:
        if "chat_tokens" in batch:
            rows, seq_len = batch["input_ids"].shape
            slots = torch.full((1,), rows * seq_len, dtype=torch.long, device=batch["chat_tokens"].device)
            counts = torch.cat([batch["chat_tokens"].long(), slots])
            self.counts = counts if self.counts is None else self.counts + counts

    def take(self, all_reduce) -> dict[str, float]:
        """The step's metrics (global: `all_reduce` sums over ranks), and a reset; {} when no chat batch came."""
        if self.counts is None:
            return {}
        real, targets, slots = all_reduce(self.counts, "sum").tolist()
        self.counts = None
        if not slots:
            return {}
        return {"sft/target_fraction": targets / slots, "sft/packing_efficiency": real / slots}


def packed_inputs(batch: dict, device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """The model's extra inputs for a packed chat batch (positions, segments); {} for other batches."""
    return {k: batch[k] if device is None else batch[k].to(device) for k in ("position_ids", "segment_ids")
            if k in batch}


def loss_weight(batch: dict) -> float:
    """How much a batch's mean loss weighs in a held-out average: its targets for chat batches, else its rows."""
    if "chat_tokens" in batch:
        return float(batch["chat_tokens"][1])
    return float(batch["input_ids"].shape[0])
