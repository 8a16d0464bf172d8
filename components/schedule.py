"""The token-based stage schedule (Moonlight §3.3) and everything derived from it: LR, global batch, data mixture
and routing-bias rate at any token count, stage starts, mixture names, the optimizer-step estimate and the rule
that a stage's global batch splits into micro-batches over the ranks.

Every quantity is a pure function of *tokens seen*, so a resume at any token count (on any world size or batch
size) reproduces the same state. Stage k covers tokens [end_tokens of stage k-1, end_tokens of stage k); past the
last boundary the last stage's end state holds (lr_end).

LR shapes over a stage's token fraction f in [0, 1]:
- linear:        lr_start + (lr_end - lr_start) * f
- cosine:        lr_end + (lr_start - lr_end) * (1 + cos(pi f)) / 2
- constant:      lr_start
- rewarm_linear: lr_start -> rewarm_peak linearly over the re-warm (rewarm_tokens, or rewarm_steps global
                 batches at the stage's first batch size), then linearly to lr_end at the stage end
                 (Moonlight's cooldown: 4.2e-5 -> 1e-4 in 100 steps, then -> 0 at 5.7T).
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

LR_SHAPES = ("linear", "cosine", "constant", "rewarm_linear")
_SUFFIX = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}


def parse_tokens(value, field_name: str = "tokens") -> int:
    """An integer token count from an int, a float (5.7e12) or a string with a suffix ("33B", "5.2T", "1.5M")."""
    if isinstance(value, bool):
        raise ValueError(f"{field_name}={value!r} must be a token count (int, float or '33B'-style string)")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(round(value))
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([KMBGT]?)\s*", value.upper())
        if m:
            return int(round(float(m.group(1)) * _SUFFIX.get(m.group(2), 1)))
    raise ValueError(f"{field_name}={value!r} must be a token count (int, float or '33B'-style string)")


@dataclass
class Stage:
    """One training stage. `batch_size` is the global batch in sequences: an int, or a list of
    [from_tokens, batch] steps in absolute tokens (the first step must start at or before the stage start)."""

    name: str
    end_tokens: int
    lr_shape: str
    lr_start: float
    lr_end: float
    batch_size: int | list
    mixture: dict[str, float]
    bias_update_rate: float = 0.0
    rewarm_peak: float | None = None
    rewarm_tokens: int | None = None
    rewarm_steps: int | None = None

    def __post_init__(self):
        self.end_tokens = parse_tokens(self.end_tokens, f"stage {self.name!r}: end_tokens")
        if self.rewarm_tokens is not None:
            self.rewarm_tokens = parse_tokens(self.rewarm_tokens, f"stage {self.name!r}: rewarm_tokens")
        if isinstance(self.batch_size, list | tuple):
            self.batch_size = [[parse_tokens(t, f"stage {self.name!r}: batch_size step tokens"), b]
                               for t, b in self.batch_size]
        self.mixture = {str(k): float(v) for k, v in dict(self.mixture).items()}
        for name in ("lr_start", "lr_end", "bias_update_rate", "rewarm_peak"):
            value = getattr(self, name)
            if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
                try:
                    setattr(self, name, float(value))
                except ValueError:
                    raise ValueError(f"stage {self.name!r}: {name}={value!r} must be a number") from None


@dataclass(frozen=True)
class StageState:
    stage_index: int
    stage_name: str
    lr: float
    batch_size: int
    mixture: dict
    bias_update_rate: float


class StageSchedule:
    """The stages of a run plus the sequence length that converts sequences to tokens."""

    def __init__(self, stages: list[Stage], seq_len: int):
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len={seq_len!r} must be a positive integer")
        if not stages:
            raise ValueError("stages=[] : a schedule needs at least one stage")
        self.stages = [s if isinstance(s, Stage) else Stage(**s) for s in stages]
        self.seq_len = seq_len
        self.starts = []
        self._rewarm = []
        start, names = 0, set()
        for k, s in enumerate(self.stages):
            where = f"stages[{k}] ({s.name!r})"
            if s.name in names:
                raise ValueError(f"{where}.name={s.name!r} is used twice; stage names must be unique")
            names.add(s.name)
            if s.end_tokens <= start:
                raise ValueError(f"{where}.end_tokens={s.end_tokens} must be greater than the stage start {start} "
                                 "(boundaries must increase)")
            if s.lr_shape not in LR_SHAPES:
                raise ValueError(f"{where}.lr_shape={s.lr_shape!r}; allowed: {', '.join(LR_SHAPES)}")
            for name in ("lr_start", "lr_end", "bias_update_rate"):
                value = getattr(s, name)
                if not isinstance(value, int | float) or value < 0 or math.isnan(value):
                    raise ValueError(f"{where}.{name}={value!r} must be a number >= 0")
            self._check_batch(where, s, start)
            if not s.mixture or any(w < 0 for w in s.mixture.values()) or sum(s.mixture.values()) <= 0:
                raise ValueError(f"{where}.mixture={s.mixture!r} must map shard sets to weights >= 0 with a positive sum")
            self._rewarm.append(self._check_rewarm(where, s, start))
            self.starts.append(start)
            start = s.end_tokens

    @staticmethod
    def _check_batch(where: str, s: Stage, start: int) -> None:
        steps = s.batch_size if isinstance(s.batch_size, list) else [[start, s.batch_size]]
        previous = None
        for tokens, batch in steps:
            if not isinstance(batch, int) or batch < 1:
                raise ValueError(f"{where}.batch_size has batch={batch!r}; batches must be positive integers")
            if previous is None and tokens > start:
                raise ValueError(f"{where}.batch_size first step starts at {tokens} tokens, after the stage start "
                                 f"{start}; the first step must start at or before it")
            if previous is not None and not (previous < tokens < s.end_tokens):
                raise ValueError(f"{where}.batch_size step at {tokens} tokens must come after {previous} and "
                                 f"before end_tokens={s.end_tokens}")
            previous = tokens

    def _check_rewarm(self, where: str, s: Stage, start: int) -> int:
        fields = (s.rewarm_peak, s.rewarm_tokens, s.rewarm_steps)
        if s.lr_shape != "rewarm_linear":
            if any(f is not None for f in fields):
                raise ValueError(f"{where}: rewarm_peak/rewarm_tokens/rewarm_steps apply only to lr_shape "
                                 f"'rewarm_linear', not {s.lr_shape!r}")
            return 0
        if s.rewarm_peak is None or s.rewarm_peak < 0:
            raise ValueError(f"{where}.rewarm_peak={s.rewarm_peak!r} must be a number >= 0 for 'rewarm_linear'")
        if (s.rewarm_tokens is None) == (s.rewarm_steps is None):
            raise ValueError(f"{where}: give exactly one of rewarm_tokens={s.rewarm_tokens!r} and "
                             f"rewarm_steps={s.rewarm_steps!r}")
        if s.rewarm_steps is not None:
            if not isinstance(s.rewarm_steps, int) or s.rewarm_steps < 1:
                raise ValueError(f"{where}.rewarm_steps={s.rewarm_steps!r} must be a positive integer")
            length = s.rewarm_steps * self._batch_at(s, start, start) * self.seq_len
        else:
            length = s.rewarm_tokens
        if not 0 < length < s.end_tokens - start:
            raise ValueError(f"{where}: the re-warm lasts {length} tokens, which must be > 0 and shorter than the "
                             f"stage ({s.end_tokens - start} tokens)")
        return length

    @staticmethod
    def _batch_at(s: Stage, start: int, tokens: int) -> int:
        if not isinstance(s.batch_size, list):
            return s.batch_size
        batch = s.batch_size[0][1]
        for step_tokens, step_batch in s.batch_size:
            if tokens >= step_tokens:
                batch = step_batch
        return batch

    @property
    def total_tokens(self) -> int:
        return self.stages[-1].end_tokens

    def boundaries(self) -> list[tuple[str, int]]:
        """(stage name, first token of the stage) for each stage, in order."""
        return [(s.name, start) for s, start in zip(self.stages, self.starts)]

    def mixture_names(self) -> list[str]:
        """The shard-set names some stage draws from (weight > 0), sorted."""
        return sorted({name for s in self.stages for name, w in s.mixture.items() if w > 0})

    def batch_sizes(self) -> list[tuple[str, int]]:
        """(stage name, global batch) for every batch size any stage uses."""
        return [(s.name, b) for s in self.stages
                for b in ([b for _, b in s.batch_size] if isinstance(s.batch_size, list) else [s.batch_size])]

    def check_batches(self, micro_batch_size: int, world_size: int) -> None:
        """Every global batch must split into whole micro-batches over the ranks (gradient accumulation)."""
        per_pass = micro_batch_size * world_size
        for name, size in self.batch_sizes():
            if size % per_pass:
                raise ValueError(f"stage {name!r}: batch_size={size} is not divisible by data.micro_batch_size × "
                                 f"ranks = {micro_batch_size} × {world_size}")

    def accumulation(self, tokens_seen: int, micro_batch_size: int, world_size: int) -> int:
        """Micro-batches per rank in the optimizer step that starts at `tokens_seen` (see `check_batches`)."""
        return self.at(tokens_seen).batch_size // (micro_batch_size * world_size)

    def total_steps(self) -> int:
        """Optimizer steps to the end of the schedule: walk it one global batch at a time."""
        steps, tokens = 0, 0
        while tokens < self.total_tokens:
            tokens += self.at(tokens).batch_size * self.seq_len
            steps += 1
        return steps

    def stage_index(self, tokens_seen: int) -> int:
        for k, s in enumerate(self.stages):
            if tokens_seen < s.end_tokens:
                return k
        return len(self.stages) - 1

    def at(self, tokens_seen: int | float) -> StageState:
        """lr, global batch (sequences), mixture and bias rate after `tokens_seen` tokens. Pure."""
        if tokens_seen < 0:
            raise ValueError(f"tokens_seen={tokens_seen} must be >= 0")
        k = self.stage_index(tokens_seen)
        s, start = self.stages[k], self.starts[k]
        t = min(float(tokens_seen), float(s.end_tokens))
        f = (t - start) / (s.end_tokens - start)
        if s.lr_shape == "linear":
            lr = s.lr_start + (s.lr_end - s.lr_start) * f
        elif s.lr_shape == "cosine":
            lr = s.lr_end + (s.lr_start - s.lr_end) * 0.5 * (1.0 + math.cos(math.pi * f))
        elif s.lr_shape == "constant":
            lr = s.lr_start
        else:
            rewarm = self._rewarm[k]
            if t - start < rewarm:
                lr = s.lr_start + (s.rewarm_peak - s.lr_start) * (t - start) / rewarm
            else:
                lr = s.rewarm_peak + (s.lr_end - s.rewarm_peak) * (t - start - rewarm) / (s.end_tokens - start - rewarm)
        return StageState(k, s.name, lr, self._batch_at(s, start, tokens_seen), dict(s.mixture), s.bias_update_rate)

    # -- YAML-friendly form ---------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        stages = []
        for s in self.stages:
            d = asdict(s)
            stages.append({k: v for k, v in d.items() if v is not None})
        return {"seq_len": self.seq_len, "stages": stages}

    @classmethod
    def from_dict(cls, data: dict) -> StageSchedule:
        if not isinstance(data, dict) or "stages" not in data or "seq_len" not in data:
            raise ValueError("a stage schedule is a mapping with keys 'seq_len' and 'stages'")
        allowed = set(Stage.__dataclass_fields__)
        stages = []
        for k, raw in enumerate(data["stages"]):
            unknown = sorted(set(raw) - allowed)
            if unknown:
                raise ValueError(f"stages[{k}] has unknown field(s) {unknown}; allowed: {sorted(allowed)}")
            stages.append(Stage(**raw))
        return cls(stages, int(data["seq_len"]))

    def __eq__(self, other) -> bool:
        return isinstance(other, StageSchedule) and self.to_dict() == other.to_dict()


def moonlight_schedule() -> StageSchedule:
    """Moonlight's 5.7T-token recipe (moonlight.md §3; PDF §3.3), seq_len 8192.

    Warm-up to 4.2e-4 over 33B tokens; cosine to 4.2e-5 by 5.2T with batch 2048 then 4096 from 200B; cooldown
    5.2T -> 5.7T re-warms to 1e-4 in 100 steps then decays linearly to 0; bias update rate 1e-3, 1e-3, 0.
    The paper's cooldown data ("math, code, reasoning") is not public: the mixture names are placeholders.
    """
    return StageSchedule([
        Stage("warmup", "33B", "linear", 0.0, 4.2e-4, 2048, {"pretrain": 1.0}, 1e-3),
        Stage("stable_cosine", "5.2T", "cosine", 4.2e-4, 4.2e-5, [["33B", 2048], ["200B", 4096]],
              {"pretrain": 1.0}, 1e-3),
        Stage("cooldown", "5.7T", "rewarm_linear", 4.2e-5, 0.0, 4096, {"math": 1.0, "code": 1.0, "reasoning": 1.0},
              0.0, rewarm_peak=1e-4, rewarm_steps=100),
    ], seq_len=8192)


def tiny_schedule() -> StageSchedule:
    """Moonlight's three stages scaled to 1M tokens at seq_len 256, for the `tiny` model on two CPU cores
    (`make train` must finish in minutes there).

    Peak LR 3e-3 (small models take larger steps); batch 16 then 32 sequences (4096 -> 8192 tokens) from 0.3M,
    the paper's doubling; the cooldown (0.85M -> 1M tokens) re-warms in 5 steps and shifts the demo mix from
    mostly English to mostly code.
    """
    return StageSchedule([
        Stage("warmup", 80_000, "linear", 0.0, 3e-3, 16, {"english": 0.7, "code": 0.3}, 1e-3),
        Stage("stable_cosine", 850_000, "cosine", 3e-3, 3e-4, [[80_000, 16], [300_000, 32]],
              {"english": 0.7, "code": 0.3}, 1e-3),
        Stage("cooldown", 1_000_000, "rewarm_linear", 3e-4, 0.0, 32, {"english": 0.3, "code": 0.7}, 0.0,
              rewarm_peak=1e-3, rewarm_steps=5),
    ], seq_len=256)


PRESETS = {"moonlight": moonlight_schedule, "tiny": tiny_schedule}


def get_schedule(name: str) -> StageSchedule:
    if name not in PRESETS:
        raise ValueError(f"schedule preset {name!r} is unknown; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()


def resolve_schedule(schedule: str | dict | StageSchedule) -> StageSchedule:
    """A schedule from a preset name, a YAML mapping (`StageSchedule.from_dict`) or a schedule."""
    if isinstance(schedule, StageSchedule):
        return schedule
    if isinstance(schedule, str):
        return get_schedule(schedule)
    return StageSchedule.from_dict(dict(schedule))
