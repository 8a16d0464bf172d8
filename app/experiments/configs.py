"""A grid point's training config: the base config, the spec's, group's and arm's overrides, then what the runner
owns (the schedule written for the point's own token budget, its lr multiplier and seed, where it logs and saves).
"""
from __future__ import annotations

import copy
import functools
import inspect
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from app.experiments.plan import Point
from app.experiments.spec import ExperimentSpec, ScheduleTemplate, SpecError, deep_merge

MIN_STEPS = 4  # a warmup step, then a decay over at least three


def resolve_config_path(config: str) -> Path:
    from app.k8s.render import RenderError, resolve_config  # the one owner of "config name -> file"

    try:
        return resolve_config(config)
    except RenderError as err:
        raise SpecError(str(err)) from None


def set_dotted(config: dict, key: str, value: Any, merge: bool = False) -> None:
    """config[a][b][c] = value for key 'a.b.c'; with `merge`, a mapping is merged into the mapping already there
    (a spec's `model.model_overrides: {...}` adds to the base config's, it does not drop them)."""
    node = config
    parts = key.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    if merge and isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
        node[parts[-1]] = deep_merge(node[parts[-1]], value)
    else:
        node[parts[-1]] = copy.deepcopy(value)


def get_dotted(config: dict, key: str, default=None):
    node = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def base_config(spec: ExperimentSpec, point: Point) -> dict:
    """Base config + the spec's corpus + overrides (spec, then group, then arm), before the runner's keys."""
    arm = spec.arm(point.arm)
    group = next(g for g in spec.groups if g.name == point.group)
    config = yaml.safe_load(resolve_config_path(arm.config or spec.config).read_text()) or {}
    if spec.corpus is not None:
        root = Path(spec.corpus["root"]).resolve()
        for key, value in (("data.demo", False), ("data.shards", {"english": str(root / "english"),
                                                                   "code": str(root / "code")}),
                           ("data.val_shards", str(root / "val")), ("data.tokenizer", str(root / "tokenizer")),
                           ("model.model_overrides.vocab_size", spec.corpus["vocab_size"])):
            set_dotted(config, key, value, merge=True)
    for overrides in (spec.overrides, group.overrides, arm.overrides):
        for key, value in overrides.items():
            set_dotted(config, key, value, merge=True)
    return config


def build_corpus(corpus: dict) -> Path:
    """The demo corpus (english + code from the interpreter's own files) and its held-out set, with the spec's
    vocabulary, built once into corpus.root (a second call returns at once)."""
    from app.datamodule import build_validation_set
    from components.data.demo import build_demo

    extra = {k: corpus[k] for k in ("english_chars", "code_chars") if k in corpus}
    paths = build_demo(corpus["root"], vocab_size=int(corpus["vocab_size"]), seq_len=int(corpus["seq_len"]), **extra)
    build_validation_set(paths.root / "val", paths.tokenizer, int(corpus["seq_len"]))
    return paths.root


def model_config_of(config: dict):
    from components.model.config import get_preset

    model = config.get("model", {})
    return get_preset(model.get("preset", "tiny"), **(model.get("model_overrides") or {}))


@functools.lru_cache(maxsize=256)
def _nonembedding_params(config_items: tuple) -> int:
    from components.model.config import ModelConfig
    from components.model.counting import count_parameters
    from components.model.transformer import build_model

    model = build_model(ModelConfig(**dict(config_items)), device="meta")
    return count_parameters(model).activated_without_embeddings


def nonembedding_params(model_config) -> int:
    """Activated parameters without embedding and LM head (the paper's Table 2 column)."""
    items = tuple(sorted((k, v) for k, v in model_config.to_dict().items() if not isinstance(v, dict | list)))
    return _nonembedding_params(items)


def point_tokens(spec: ExperimentSpec, point: Point, config: dict) -> int:
    """The point's token budget: the group's, the spec's, or tokens_per_param × non-embedding parameters; times
    the arm's budget multiplier; a whole number of global batches, at least MIN_STEPS of them."""
    group = next(g for g in spec.groups if g.name == point.group)
    if group.tokens is not None:
        tokens = group.tokens
    elif spec.tokens is not None:
        tokens = spec.tokens
    else:
        tokens = spec.tokens_per_param * nonembedding_params(model_config_of(config))
    step = spec.schedule.batch_size * spec.schedule.seq_len
    steps = max(MIN_STEPS, round(tokens * point.budget / step))
    return steps * step


def template_schedule(template: ScheduleTemplate, tokens: int) -> dict:
    """Warmup then decay to the end of *this* budget (the fairness rule: no run is read mid-schedule)."""
    step = template.batch_size * template.seq_len
    steps = tokens // step
    warm_steps = min(max(1, round(steps * template.warmup_fraction)), steps - 1)
    def common() -> dict:
        return {"batch_size": template.batch_size, "mixture": dict(template.mixture), "bias_update_rate": 1e-3}

    return {"seq_len": template.seq_len, "stages": [
        {"name": "warmup", "end_tokens": warm_steps * step, "lr_shape": "linear", "lr_start": 0.0,
         "lr_end": template.peak_lr, **common()},
        {"name": "decay", "end_tokens": steps * step, "lr_shape": template.decay, "lr_start": template.peak_lr,
         "lr_end": template.peak_lr * template.final_lr_fraction, **common()},
    ]}


@dataclass(frozen=True)
class PointConfig:
    config: dict
    tokens: int
    steps: int

    @property
    def fingerprint(self) -> str:
        """What the point trains with (everything but where it logs and saves): a finished run whose fingerprint
        differs was trained with another spec and cannot stand for this point."""
        import hashlib
        import json

        training = copy.deepcopy({k: v for k, v in self.config.items() if k != "run"})  # the config stays whole
        training.get("model", {}).pop("init_from", None)
        return hashlib.sha256(json.dumps(training, sort_keys=True, default=str).encode()).hexdigest()[:16]


def point_config(spec: ExperimentSpec, point: Point, run_dir: Path, tracking_uri: str, experiment: str,
                 tags: dict[str, str], init_export: str | None = None) -> PointConfig:
    config = base_config(spec, point)
    arm = spec.arm(point.arm)
    micro = int(get_dotted(config, "data.micro_batch_size", 8))
    run = {"dir": str(run_dir), "experiment": experiment, "tracking_uri": tracking_uri, "run_name": point.id,
           "tags": dict(tags), "progress_bar": False, "resume": "auto", "keep_last": 1}
    if arm.keep_schedule:  # fine-tuning: the config's own (epoch) schedule and cadences; complete = FINISHED
        tokens = steps = 0
        if arm.epochs is not None:
            schedule = get_dotted(config, "model.schedule", None)
            if not (isinstance(schedule, dict) and "epochs" in schedule):
                raise SpecError(f"arm {arm.name!r}: epochs={arm.epochs:g} needs an epoch schedule in its config "
                                f"(model.schedule with `epochs`), got model.schedule={schedule!r}")
            set_dotted(config, "model.schedule.epochs", arm.epochs)
    else:
        tokens = point_tokens(spec, point, config)
        set_dotted(config, "model.schedule", template_schedule(spec.schedule, tokens))
        steps = tokens // (spec.schedule.batch_size * spec.schedule.seq_len)
        accumulation = max(1, spec.schedule.batch_size // micro)
        set_dotted(config, "trainer.val_check_interval", max(1, steps * accumulation // spec.evals))
        run.update({"checkpoint_every_n_steps": max(1, steps // 4),
                    "export_every_n_steps": max(1, steps // spec.exports)})
    set_dotted(config, "model.lr_scale", point.lr_scale)
    set_dotted(config, "model.init_seed", point.seed)
    set_dotted(config, "data.seed", point.seed)
    if init_export is not None:
        set_dotted(config, "model.init_from", init_export)
    set_dotted(config, "trainer.enable_progress_bar", False)
    for key, value in run.items():
        set_dotted(config, f"run.{key}", value)
    return PointConfig(config, tokens, steps)


def missing_config_keys(keys: tuple[str, ...]) -> list[str]:
    """The dotted keys `crescent train` does not accept (yet): an arm that needs them waits."""
    return [k for k in keys if not _accepts(k)]


def _accepts(key: str) -> bool:
    section, _, rest = key.partition(".")
    name = rest.split(".")[0]
    if section == "model" and rest.startswith("model_overrides."):
        from components.model.config import ModelConfig

        return rest.split(".")[1] in {f.name for f in fields(ModelConfig)}
    if section == "run":
        from app.run import RunOptions

        return name in {f.name for f in fields(RunOptions)}
    owner = {"model": "app.module:CrescentModule", "data": "app.datamodule:CrescentDataModule",
             "trainer": "lightning.pytorch:Trainer"}.get(section)
    if owner is None:
        return False
    module, _, cls = owner.partition(":")
    import importlib

    return name in inspect.signature(getattr(importlib.import_module(module), cls).__init__).parameters


def blocked_arms(spec: ExperimentSpec) -> dict[str, str]:
    """Arms that cannot run with this build: a config key `crescent train` does not accept yet, or a missing
    config file (the SFT arms before the SFT stage exists)."""
    out = {}
    for arm in spec.arms:
        missing = missing_config_keys(arm.requires)
        if missing:
            out[arm.name] = f"crescent train does not accept {', '.join(missing)} yet"
            continue
        if arm.config:
            try:
                resolve_config_path(arm.config)
            except SpecError as err:
                out[arm.name] = str(err)
    for arm in spec.arms:  # an arm that builds on a blocked arm waits too
        for ref in (arm.lr_from, arm.init_from):
            if ref in out and arm.name not in out:
                out[arm.name] = f"builds on arm {ref!r}, which waits: {out[ref]}"
    return out
