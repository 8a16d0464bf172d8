"""An epoch schedule: a number of passes over one shard set, expressed through the token-based stage engine.

Fine-tuning counts epochs (Moonlight's SFT: 2 epochs over tulu-3-sft-mixture, lr linear 5e-5 -> 0; §3.5), the
stage engine counts tokens. Once the set's size is known (its manifest: N samples of seq_len tokens) they are the
same thing: epoch e is global samples [e * N, (e + 1) * N) (chat sets are read in exact epochs, see
sequence.EpochLayout), so `epochs` passes are `epochs * N` samples, rounded down to whole global batches.

The YAML form (`model.schedule:`), e.g.

    schedule: {epochs: 2, shard_set: data/demo/chat/train, lr_start: 5.0e-5, lr_end: 0.0, batch_size: 16}

optional: `name` (the mixture name the data module reads the set under, default `sft`), `lr_shape` (a stage
shape, default linear) and `warmup_steps` (linear from 0 to lr_start first, default none).
"""
from __future__ import annotations

from components.schedule import Stage, StageSchedule, resolve_schedule

from .shards import read_manifest

EPOCH_FIELDS = {"epochs", "shard_set", "lr_start", "lr_end", "batch_size", "name", "lr_shape", "warmup_steps"}


class EpochSchedule(StageSchedule):
    """A StageSchedule that also knows its epochs: `samples_per_epoch`, `epochs`, the set's `name` and location."""

    def __init__(self, stages, seq_len: int, *, samples_per_epoch: int, epochs: float, name: str, shard_set: str):
        super().__init__(stages, seq_len)
        self.samples_per_epoch, self.epochs, self.name, self.shard_set = samples_per_epoch, epochs, name, shard_set

    def epoch(self, consumed_samples: int) -> float:
        """Epochs completed after `consumed_samples` global samples (fractional)."""
        return consumed_samples / self.samples_per_epoch


def is_epoch_spec(schedule) -> bool:
    return isinstance(schedule, dict) and "epochs" in schedule


def epoch_schedule(spec: dict) -> EpochSchedule:
    """The stage schedule of an epoch spec (see the module docstring); reads the shard set's manifest."""
    unknown = sorted(set(spec) - EPOCH_FIELDS)
    if unknown:
        raise ValueError(f"epoch schedule has unknown field(s) {unknown}; allowed: {sorted(EPOCH_FIELDS)}")
    missing = sorted({"epochs", "shard_set", "lr_start", "batch_size"} - set(spec))
    if missing:
        raise ValueError(f"epoch schedule needs {missing} (e.g. epochs: 2, shard_set: PATH, lr_start: 5.0e-5, "
                         "batch_size: 16)")
    epochs, batch, warmup = spec["epochs"], spec["batch_size"], spec.get("warmup_steps", 0)
    if isinstance(epochs, bool) or not isinstance(epochs, int | float) or not epochs > 0:
        raise ValueError(f"schedule.epochs={epochs!r} must be a number > 0")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"schedule.batch_size={batch!r} must be a positive integer (global batch, sequences)")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"schedule.warmup_steps={warmup!r} must be an integer >= 0")
    location = str(spec["shard_set"])
    manifest = read_manifest(location)
    seq_len, samples = int(manifest["seq_len"]), int(manifest["samples"])
    steps = int(epochs * samples) // batch
    if steps <= warmup:
        raise ValueError(f"schedule: {epochs} epoch(s) of {samples} samples at batch_size={batch} is {steps} "
                         f"optimizer step(s), not more than warmup_steps={warmup}")
    name = str(spec.get("name", "sft"))
    mixture = {name: 1.0}
    lr_start, lr_end = spec["lr_start"], spec.get("lr_end", 0.0)
    stages = []
    if warmup:
        stages.append(Stage("warmup", warmup * batch * seq_len, "linear", 0.0, lr_start, batch, mixture))
    stages.append(Stage("epochs", steps * batch * seq_len, spec.get("lr_shape", "linear"), lr_start, lr_end, batch,
                        mixture))
    return EpochSchedule(stages, seq_len, samples_per_epoch=samples, epochs=epochs, name=name, shard_set=location)


def resolve_training_schedule(schedule) -> StageSchedule:
    """`model.schedule` / `data.schedule`: an epoch spec (this module), or what `resolve_schedule` takes."""
    return epoch_schedule(dict(schedule)) if is_epoch_spec(schedule) else resolve_schedule(schedule)
