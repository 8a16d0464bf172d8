"""An experiment spec (`app/experiments/NAME.yaml`): a grid of `crescent train` runs and the rules that make the
comparison fair.

A spec's top level holds the defaults; `sizes.cpu` and `sizes.gpu` replace top-level keys for that size (`cpu`:
two CPU cores within the spec's `budget_minutes`; `gpu`: one GPU with the `small` preset's shapes). Then:

    name, kind, paper, description     what it reproduces; `kind` picks the report's analysis (app/experiments/analyses)
    config                             the base training config (app/configs/NAME.yaml or a path)
    overrides                          dotted config keys for every run (`model.preset: tiny-dense`)
    schedule                           the schedule template: warmup then decay to the end of each run's own budget
    tokens | tokens_per_param          every run's token budget (`tokens_per_param`: × non-embedding parameters)
    seeds                              >= 2; the first is used for the lr sweep, all at the selected lr
    groups                             the outer axis (model sizes); each may set overrides and tokens
    arms                               what is compared: overrides, an lr `sweep` (or `lr_from` another arm),
                                       `budgets` (token multipliers), `init_from` (fine-tune another arm's export;
                                       `keep_schedule`: with the config's own epoch schedule, `epochs` of it),
                                       `requires` (config keys `crescent train` must accept, else reported as waiting)
    measure                            measurements taken from the exports after each run (app/experiments/measure)
    exports / evals                    exports (and validation passes) spread over each run, for curves over tokens
    corpus                             optional: the demo corpus rebuilt once with its own vocabulary
                                       ({root, vocab_size, seq_len}), so small models are not all LM head

The runner enforces what a spec cannot switch off: it writes every run's schedule for that run's own budget (a spec
may not set model.schedule, model.lr_scale, trainer.max_steps, ...), sweeps lr for every arm that does not reuse
another arm's lr, and runs >= 2 seeds.
"""
from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from app.shipped import shipped_names, shipped_yaml

SPEC_DIR = Path(__file__).resolve().parent
SIZES = ("cpu", "gpu")
KINDS = ("update-rms", "weight-decay", "scaling", "svd-entropy", "sft-matrix", "generic")
MEASUREMENTS = ("matrix_rms", "hidden_rms_over_tokens", "svd_entropy_by_matrix", "eval_tasks")
# Keys the runner owns: a spec that sets them could compare runs read before the end of their schedule.
RUNNER_KEYS = ("model.schedule", "model.lr_scale", "model.init_seed", "data.seed", "trainer.max_steps",
               "trainer.max_epochs", "trainer.max_time", "trainer.min_steps", "run.dir", "run.tags",
               "run.experiment", "run.tracking_uri", "run.run_name", "run.resume")
_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]*$")
_TOP_KEYS = {"name", "kind", "paper", "description", "config", "overrides", "schedule", "tokens", "tokens_per_param",
             "seeds", "groups", "arms", "measure", "exports", "evals", "paper_numbers", "analysis", "budget_minutes",
             "sizes", "corpus"}


class SpecError(ValueError):
    """A spec that cannot run: the message names the field, the value and what is allowed."""


@dataclass(frozen=True)
class Sweep:
    """lr multipliers (`model.lr_scale` over the schedule's peak) tried with the first seed; when the best is at an
    edge, the sweep goes one `factor` further that way, at most `max_extensions` times."""

    values: tuple[float, ...]
    factor: float = 2.0
    max_extensions: int = 2


@dataclass(frozen=True)
class Arm:
    name: str
    overrides: dict = field(default_factory=dict)
    sweep: Sweep | None = None
    lr_from: str | None = None
    init_from: str | None = None
    seeds: tuple[int, ...] | None = None
    budgets: tuple[float, ...] = (1.0,)
    groups: tuple[str, ...] | None = None
    requires: tuple[str, ...] = ()
    config: str | None = None
    label: str | None = None
    keep_schedule: bool = False  # fine-tuning: the config's own (epoch) schedule instead of the template
    epochs: float | None = None  # with keep_schedule: that schedule over this many epochs (still complete)
    measure: tuple[str, ...] | None = None  # this arm's measurements (default: the spec's)

    def applies_to(self, group: str) -> bool:
        return self.groups is None or group in self.groups


@dataclass(frozen=True)
class Group:
    name: str
    overrides: dict = field(default_factory=dict)
    tokens: int | None = None
    label: str | None = None


@dataclass(frozen=True)
class ScheduleTemplate:
    """Linear warmup over `warmup_fraction` of the run to `peak_lr`, then `decay` to `final_lr_fraction`·peak at the
    run's last token (Moonlight §3.3's shape, without its cooldown stage)."""

    seq_len: int
    batch_size: int
    peak_lr: float
    mixture: dict
    warmup_fraction: float = 0.1
    final_lr_fraction: float = 0.1
    decay: str = "cosine"


@dataclass(frozen=True)
class ExperimentSpec:
    name: str
    kind: str
    size: str
    config: str
    schedule: ScheduleTemplate
    seeds: tuple[int, ...]
    groups: tuple[Group, ...]
    arms: tuple[Arm, ...]
    overrides: dict = field(default_factory=dict)
    tokens: int | None = None
    tokens_per_param: float | None = None
    measure: tuple[str, ...] = ()
    exports: int = 1
    evals: int = 4
    paper: str = ""
    description: str = ""
    paper_numbers: dict = field(default_factory=dict)
    analysis: dict = field(default_factory=dict)
    budget_minutes: float | None = None
    corpus: dict | None = None
    source: str = ""  # the spec's YAML text (logged on the parent run; the k8s pods read it)

    def arm(self, name: str) -> Arm:
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise KeyError(name)

    def measurements(self, arm: str) -> tuple[str, ...]:
        """What is measured after a run of `arm` (its own list, else the spec's)."""
        own = next((a.measure for a in self.arms if a.name == arm), None)
        return self.measure if own is None else own

    def run_arm(self, name: str) -> str:
        """The arm whose runs `name` shares: the first arm with the same training config (overrides, config,
        init_from), so e.g. "Muon at AdamW's lr" reuses the Muon sweep's run at that lr instead of repeating it."""
        mine = self.arm(name)
        for arm in self.arms:
            if _signature(arm) == _signature(mine):
                return arm.name
        return name


def _signature(arm: Arm) -> str:
    import json

    return json.dumps([arm.overrides, arm.config, arm.init_from, arm.keep_schedule, arm.epochs], sort_keys=True,
                      default=str)


def spec_path(name_or_path: str) -> Path:
    """`scaling` -> app/experiments/scaling.yaml; a path is taken as it is."""
    path = shipped_yaml(name_or_path, SPEC_DIR)
    if path is None:
        raise SpecError(f"spec={name_or_path!r}: neither a YAML file nor a shipped spec; "
                        f"shipped: {shipped_names(SPEC_DIR)}")
    return path


def load_spec(name_or_path: str, size: str = "cpu") -> ExperimentSpec:
    path = spec_path(name_or_path)
    text = path.read_text()
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise SpecError(f"spec {path}: not valid YAML ({err})") from None
    return parse_spec(raw, size, source=text, where=str(path))


def deep_merge(base: dict, patch: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_spec(raw: Any, size: str, source: str = "", where: str = "spec") -> ExperimentSpec:
    if not isinstance(raw, dict):
        raise SpecError(f"{where}: a spec is a mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise SpecError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(_TOP_KEYS)}")
    sizes = raw.get("sizes") or {}
    if size not in SIZES:
        raise SpecError(f"{where}: size={size!r}; allowed: {list(SIZES)}")
    if size not in sizes:
        raise SpecError(f"{where}: sizes.{size} is missing; every spec documents {list(SIZES)}")
    merged = {**{k: v for k, v in raw.items() if k != "sizes"}, **copy.deepcopy(sizes[size] or {})}
    unknown = sorted(set(merged) - _TOP_KEYS)
    if unknown:
        raise SpecError(f"{where}: sizes.{size} has unknown key(s) {unknown}")
    name = _require_str(merged, "name", where)
    if not _NAME.match(name):
        raise SpecError(f"{where}: name={name!r} must be lowercase letters, digits, '-' and '.'")
    kind = merged.get("kind", "generic")
    if kind not in KINDS:
        raise SpecError(f"{where}: kind={kind!r}; allowed: {list(KINDS)}")
    overrides = _overrides(merged.get("overrides") or {}, f"{where}: overrides")
    seeds = tuple(_int_list(merged.get("seeds", [0, 1]), f"{where}: seeds"))
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise SpecError(f"{where}: seeds={list(seeds)} must be at least 2 distinct seeds (a difference is only "
                        "read against the spread between seeds)")
    groups = tuple(_group(g, f"{where}: groups[{i}]") for i, g in enumerate(merged.get("groups") or [{"name": "all"}]))
    _unique([g.name for g in groups], f"{where}: groups")
    arms = tuple(_arm(a, f"{where}: arms[{i}]") for i, a in enumerate(merged.get("arms") or []))
    if not arms:
        raise SpecError(f"{where}: arms=[] ; a spec compares at least one arm")
    _unique([a.name for a in arms], f"{where}: arms")
    _check_references(arms, {g.name for g in groups}, where)
    tokens = merged.get("tokens")
    tokens_per_param = merged.get("tokens_per_param")
    if tokens is not None:
        from components.schedule import parse_tokens

        tokens = parse_tokens(tokens, f"{where}: tokens")
    missing = [g.name for g in groups if g.tokens is None] if tokens is None and tokens_per_param is None else []
    if missing:
        raise SpecError(f"{where}: no token budget for group(s) {missing}: set tokens, tokens_per_param or "
                        "groups[].tokens")
    measure = tuple(merged.get("measure") or ())
    bad = [m for m in measure if m not in MEASUREMENTS]
    if bad:
        raise SpecError(f"{where}: measure={bad} unknown; allowed: {list(MEASUREMENTS)}")
    for key in ("exports", "evals"):
        value = merged.get(key, 1 if key == "exports" else 4)
        if not isinstance(value, int) or value < 1:
            raise SpecError(f"{where}: {key}={value!r} must be an integer >= 1")
    return ExperimentSpec(
        name=name, kind=kind, size=size, config=_require_str(merged, "config", where),
        schedule=_schedule(merged.get("schedule"), f"{where}: schedule"), seeds=seeds, groups=groups, arms=arms,
        overrides=overrides, tokens=tokens, tokens_per_param=tokens_per_param, measure=measure,
        exports=merged.get("exports", 1), evals=merged.get("evals", 4), paper=merged.get("paper", ""),
        description=merged.get("description", ""), paper_numbers=merged.get("paper_numbers") or {},
        analysis=merged.get("analysis") or {}, budget_minutes=merged.get("budget_minutes"),
        corpus=_corpus(merged.get("corpus"), f"{where}: corpus"), source=source)


def _corpus(raw, where: str) -> dict | None:
    if raw is None:
        return None
    keys = {"root", "vocab_size", "seq_len", "english_chars", "code_chars"}
    if not isinstance(raw, dict) or set(raw) - keys or not {"root", "vocab_size", "seq_len"} <= set(raw):
        raise SpecError(f"{where}={raw!r}: a corpus is {{root, vocab_size, seq_len}} (and optionally english_chars, "
                        "code_chars): the demo corpus built there once with that vocabulary")
    return dict(raw)


def _require_str(d: dict, key: str, where: str) -> str:
    value = d.get(key)
    if not isinstance(value, str) or not value:
        raise SpecError(f"{where}: {key}={value!r} must be a non-empty string")
    return value


def _unique(names: list[str], where: str) -> None:
    seen = set()
    for n in names:
        if n in seen:
            raise SpecError(f"{where}: name {n!r} is used twice")
        seen.add(n)


def _int_list(value, where: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise SpecError(f"{where}={value!r} must be a list of integers")
    return value


def _overrides(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise SpecError(f"{where}={value!r} must map dotted config keys to values")
    for key in value:
        if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)+", key):
            raise SpecError(f"{where}: key {key!r} must be a dotted config key like model.optimizer")
        owned = [k for k in RUNNER_KEYS if key == k or key.startswith(k + ".")]
        if owned:
            raise SpecError(f"{where}: {key!r} is set by the runner (every run gets a complete schedule for its own "
                            f"budget, its lr from the sweep, its seed); the runner owns {list(RUNNER_KEYS)}")
    return dict(value)


def _group(raw, where: str) -> Group:
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str) or not _NAME.match(raw["name"]):
        raise SpecError(f"{where}: a group is a mapping with a lowercase `name`, got {raw!r}")
    unknown = sorted(set(raw) - {"name", "overrides", "tokens", "label"})
    if unknown:
        raise SpecError(f"{where}: unknown key(s) {unknown}; allowed: name, overrides, tokens, label")
    tokens = raw.get("tokens")
    if tokens is not None:
        from components.schedule import parse_tokens

        tokens = parse_tokens(tokens, f"{where}.tokens")
    return Group(raw["name"], _overrides(raw.get("overrides") or {}, f"{where}.overrides"), tokens, raw.get("label"))


_ARM_KEYS = {"name", "overrides", "sweep", "lr_from", "init_from", "seeds", "budgets", "groups", "requires", "config",
             "label", "keep_schedule", "epochs", "measure"}


def _arm(raw, where: str) -> Arm:
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str) or not _NAME.match(raw["name"]):
        raise SpecError(f"{where}: an arm is a mapping with a lowercase `name`, got {raw!r}")
    where = f"{where} ({raw['name']!r})"
    unknown = sorted(set(raw) - _ARM_KEYS)
    if unknown:
        raise SpecError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(_ARM_KEYS)}")
    sweep = raw.get("sweep")
    if (sweep is None) == (raw.get("lr_from") is None):
        raise SpecError(f"{where}: give exactly one of sweep (its own lr sweep) and lr_from (reuse another arm's "
                        "selected lr, the paper's protocol): lr is never left untuned")
    if sweep is not None:
        sweep = _sweep(sweep, f"{where}.sweep")
    budgets = tuple(float(b) for b in raw.get("budgets", [1.0]))
    if not budgets or any(not b > 0 for b in budgets) or (sweep is not None and 1.0 not in budgets):
        raise SpecError(f"{where}: budgets={list(budgets)} must be token multipliers > 0 (and include 1.0, the "
                        "budget the lr is selected at, for an arm with its own sweep)")
    seeds = raw.get("seeds")
    if seeds is not None:
        seeds = tuple(_int_list(seeds, f"{where}.seeds"))
        if len(seeds) < 2:
            raise SpecError(f"{where}: seeds={list(seeds)} must be at least 2 seeds")
    groups = raw.get("groups")
    if groups is not None and (not isinstance(groups, list) or not all(isinstance(g, str) for g in groups)):
        raise SpecError(f"{where}: groups={groups!r} must be a list of group names")
    requires = raw.get("requires") or []
    if not isinstance(requires, list) or not all(isinstance(r, str) for r in requires):
        raise SpecError(f"{where}: requires={requires!r} must be a list of dotted config keys")
    if raw.get("keep_schedule") and not raw.get("init_from"):
        raise SpecError(f"{where}: keep_schedule is for fine-tuning arms (with init_from) only")
    epochs = raw.get("epochs")
    if epochs is not None and (not raw.get("keep_schedule") or isinstance(epochs, bool)
                               or not isinstance(epochs, int | float) or not epochs > 0):
        raise SpecError(f"{where}: epochs={epochs!r} must be a number > 0, on an arm with keep_schedule (it sets the "
                        "epochs of the config's own epoch schedule)")
    measure = raw.get("measure")
    if measure is not None:
        bad = [m for m in measure if m not in MEASUREMENTS] if isinstance(measure, list) else [measure]
        if bad:
            raise SpecError(f"{where}: measure={bad} unknown; allowed: {list(MEASUREMENTS)}")
        measure = tuple(measure)
    return Arm(name=raw["name"], overrides=_overrides(raw.get("overrides") or {}, f"{where}.overrides"), sweep=sweep,
               lr_from=raw.get("lr_from"), init_from=raw.get("init_from"), seeds=seeds, budgets=budgets,
               groups=tuple(groups) if groups is not None else None, requires=tuple(requires),
               config=raw.get("config"), label=raw.get("label"), keep_schedule=bool(raw.get("keep_schedule")),
               epochs=float(epochs) if epochs is not None else None, measure=measure)


def _sweep(raw, where: str) -> Sweep:
    if isinstance(raw, list):
        raw = {"values": raw}
    if not isinstance(raw, dict) or set(raw) - {"values", "factor", "max_extensions"}:
        raise SpecError(f"{where}={raw!r}: a sweep is {{values: [...], factor: 2.0, max_extensions: 2}}")
    values = raw.get("values")
    if not isinstance(values, list) or len(values) < 3 or not all(isinstance(v, int | float) and v > 0
                                                                 for v in values):
        raise SpecError(f"{where}.values={values!r} must be at least 3 lr multipliers > 0 (a best value needs "
                        "neighbours on both sides)")
    if len(set(values)) != len(values):
        raise SpecError(f"{where}.values={values!r} has duplicates")
    factor = raw.get("factor", 2.0)
    if not isinstance(factor, int | float) or not factor > 1:
        raise SpecError(f"{where}.factor={factor!r} must be > 1")
    extensions = raw.get("max_extensions", 2)
    if not isinstance(extensions, int) or extensions < 0:
        raise SpecError(f"{where}.max_extensions={extensions!r} must be an integer >= 0")
    return Sweep(tuple(sorted(float(v) for v in values)), float(factor), extensions)


def _check_references(arms: tuple[Arm, ...], groups: set[str], where: str) -> None:
    names = {a.name for a in arms}
    for arm in arms:
        for ref_kind in ("lr_from", "init_from"):
            ref = getattr(arm, ref_kind)
            if ref is not None and (ref not in names or ref == arm.name):
                raise SpecError(f"{where}: arm {arm.name!r}: {ref_kind}={ref!r} must name another arm; arms: "
                                f"{sorted(names)}")
        for g in arm.groups or ():
            if g not in groups:
                raise SpecError(f"{where}: arm {arm.name!r}: groups has {g!r}, not a group; groups: {sorted(groups)}")
    order = dependency_order(arms)  # raises on a cycle
    assert len(order) == len(arms)


def dependency_order(arms: tuple[Arm, ...]) -> list[Arm]:
    """Arms so that an arm comes after the arms whose lr or export it uses."""
    by_name = {a.name: a for a in arms}
    done: list[Arm] = []
    visiting: set[str] = set()

    def visit(arm: Arm) -> None:
        if arm in done:
            return
        if arm.name in visiting:
            raise SpecError(f"spec: arms {sorted(visiting)} depend on each other in a cycle (lr_from/init_from)")
        visiting.add(arm.name)
        for ref in (arm.lr_from, arm.init_from):
            if ref is not None:
                visit(by_name[ref])
        visiting.discard(arm.name)
        done.append(arm)

    for arm in arms:
        visit(arm)
    return done


def _schedule(raw, where: str) -> ScheduleTemplate:
    keys = {"seq_len", "batch_size", "peak_lr", "mixture", "warmup_fraction", "final_lr_fraction", "decay"}
    if not isinstance(raw, dict) or set(raw) - keys or not {"seq_len", "batch_size", "peak_lr", "mixture"} <= set(raw):
        raise SpecError(f"{where}={raw!r}: a schedule template has seq_len, batch_size, peak_lr, mixture "
                        "(and optionally warmup_fraction, final_lr_fraction, decay)")
    peak = float(raw["peak_lr"])
    warm = float(raw.get("warmup_fraction", 0.1))
    final = float(raw.get("final_lr_fraction", 0.1))
    decay = raw.get("decay", "cosine")
    if not peak > 0 or math.isnan(peak):
        raise SpecError(f"{where}.peak_lr={raw['peak_lr']!r} must be > 0")
    if not 0 < warm < 1:
        raise SpecError(f"{where}.warmup_fraction={warm!r} must be in (0, 1)")
    if not 0 <= final < 1:
        raise SpecError(f"{where}.final_lr_fraction={final!r} must be in [0, 1)")
    if decay not in ("cosine", "linear"):
        raise SpecError(f"{where}.decay={decay!r}; allowed: cosine, linear")
    return ScheduleTemplate(int(raw["seq_len"]), int(raw["batch_size"]), peak, dict(raw["mixture"]), warm, final, decay)
