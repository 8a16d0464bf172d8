"""What the report reads from MLflow, arranged for the analyses: every point's row (status, tokens, FLOPs, final
losses, latest metrics), statistics over seeds at each arm's selected lr (mean ± spread, the spread being half the
range), curves over tokens, and the comparison wording ("inside the spread").

Every value is read at the end of each run's own schedule: the final held-out loss (`val/loss` at the last step)
and the train loss averaged over the last tenth of the steps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from app.experiments import tracking
from app.experiments.configs import base_config, model_config_of, nonembedding_params, point_tokens
from app.experiments.plan import Outcome, Plan, Point, plan
from app.experiments.spec import ExperimentSpec


@dataclass
class Stats:
    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return sum(self.values) / len(self.values) if self.values else math.nan

    @property
    def spread(self) -> float:
        return (max(self.values) - min(self.values)) / 2 if len(self.values) > 1 else math.nan

    def fmt(self, digits: int = 4, scientific: bool = False) -> str:
        if not self.values:
            return "–"
        f = (lambda v: f"{v:.{digits - 1}e}") if scientific else (lambda v: f"{v:.{digits}f}")
        if self.n == 1:
            return f"{f(self.mean)} (1 seed)"
        return f"{f(self.mean)} ± {f(self.spread)}"


def compare_text(name_a: str, a: Stats, name_b: str, b: Stats, what: str = "final val loss") -> str:
    """'a is lower than b by d (outside the spread)' or '... inside the spread'."""
    if not a.values or not b.values:
        return f"{name_a} vs {name_b}: not comparable yet (missing results)"
    diff = a.mean - b.mean
    inside = abs(diff) <= (0 if math.isnan(a.spread) else a.spread) + (0 if math.isnan(b.spread) else b.spread)
    lower = name_a if diff < 0 else name_b
    verdict = ("inside the spread between seeds: not resolved at this scale" if inside
               else "outside the spread between seeds")
    return f"{what}: {lower} lower by {abs(diff):.4f} ({name_a} {a.fmt()}, {name_b} {b.fmt()}); {verdict}"


@dataclass
class PointRow:
    point: Point
    status: str
    run_id: str | None = None
    tokens: float = math.nan
    flops: float = math.nan
    params: int = 0
    val_loss: float = math.nan
    train_loss: float = math.nan
    metrics: dict = field(default_factory=dict)
    cpu_seconds: float = 0.0  # over every launch of the point (the runner's cost metrics)
    wall_seconds: float = 0.0


@dataclass
class Analysis:
    """What a kind's analysis adds: named tables (header, rows), figures, metrics for the parent, notes."""

    tables: dict[str, tuple[list[str], list[list]]] = field(default_factory=dict)
    figures: dict = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class ReportData:
    def __init__(self, spec: ExperimentSpec, exp: tracking.Experiment, blocked: dict[str, str] | None = None):
        self.spec, self.exp = spec, exp
        self.kids = tracking.children(exp)
        self.failures = tracking.failures(exp)
        outcomes = {pid: Outcome(True, k.val_loss) for pid, k in self.kids.items() if _done(spec, k)}
        outcomes.update({pid: Outcome(False) for pid in self.failures if pid not in outcomes})
        self.plan: Plan = plan(spec, outcomes, blocked)
        self.rows: dict[str, PointRow] = {p.id: self._row(p) for p in self.plan.points}

    def _row(self, point: Point) -> PointRow:
        kid = self.kids.get(point.id)
        config = base_config(self.spec, point)
        model = model_config_of(config)
        from components.model.counting import flops_per_token

        row = PointRow(point, "not started", params=nonembedding_params(model))
        planned = point_tokens(self.spec, point, config) if not self.spec.arm(point.arm).keep_schedule else math.nan
        row.flops = flops_per_token(model, self.spec.schedule.seq_len) * planned
        row.tokens = planned
        if point.id in self.failures and (kid is None or not _done(self.spec, kid)):
            row.status = "failed"
        if kid is None:
            return row
        row.run_id = kid.run_id
        if _done(self.spec, kid):
            row.status = "finished"
        elif row.status != "failed":
            row.status = kid.status.lower()
        row.val_loss = kid.val_loss
        row.metrics = kid.metrics
        row.cpu_seconds = sum(v for _, v in tracking.history(self.exp, kid.run_id, "experiment/cpu_seconds"))
        row.wall_seconds = sum(v for _, v in tracking.history(self.exp, kid.run_id, "experiment/wall_seconds"))
        losses = [v for _, v in tracking.history(self.exp, kid.run_id, "train/loss") if math.isfinite(v)]
        if losses:
            tail = losses[-max(1, len(losses) // 10):]
            row.train_loss = sum(tail) / len(tail)
        return row

    # -- selection-aware access -------------------------------------------------------------------------
    def selected_rows(self, group: str, arm: str, budget: float = 1.0) -> list[PointRow]:
        sel = self.plan.selections.get((group, arm))
        if sel is None or sel.lr_scale is None:
            return []
        run_arm = self.spec.run_arm(arm)
        return [r for r in self.rows.values() if r.point.group == group and r.point.arm == run_arm
                and r.point.lr_scale == sel.lr_scale and r.point.budget == budget and r.status == "finished"]

    def rows_at(self, group: str, arm: str, lr_scale: float, budget: float = 1.0) -> list[PointRow]:
        """The finished points of `arm` at one lr_scale (every seed run there), whatever the arm selected."""
        run_arm = self.spec.run_arm(arm)
        return [r for r in self.rows.values() if r.point.group == group and r.point.arm == run_arm
                and r.point.lr_scale == lr_scale and r.point.budget == budget and r.status == "finished"]

    def stat(self, group: str, arm: str, key: str = "val_loss", budget: float = 1.0,
             lr_scale: float | None = None) -> Stats:
        """`key` over the seeds at the arm's selected lr (or at `lr_scale`)."""
        values = []
        rows = self.selected_rows(group, arm, budget) if lr_scale is None else self.rows_at(group, arm, lr_scale,
                                                                                             budget)
        for r in rows:
            v = getattr(r, key) if key in ("val_loss", "train_loss") else r.metrics.get(key, math.nan)
            if v is not None and math.isfinite(v):
                values.append(float(v))
        return Stats(values)

    def curves(self, group: str, arm: str, key: str, budget: float = 1.0) -> list[list[tuple[float, float]]]:
        """One (tokens, value) curve per seed at the selected lr."""
        out = []
        for r in self.selected_rows(group, arm, budget):
            if key.startswith("measure/"):
                tokens = dict(tracking.history(self.exp, r.run_id, "measure/tokens"))
                values = tracking.history(self.exp, r.run_id, key)
                out.append([(tokens.get(s, math.nan), v) for s, v in values])
            else:
                out.append(tracking.over_tokens(self.exp, r.run_id, key))
        return out

    def label(self, arm: str) -> str:
        a = self.spec.arm(arm)
        return a.label or a.name


def _done(spec: ExperimentSpec, kid: tracking.ChildRun) -> bool:
    return kid.done(bool(spec.measurements(kid.tags.get("crescent.arm", ""))))
