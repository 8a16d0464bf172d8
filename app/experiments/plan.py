"""Which grid points run next, from what has finished: the lr sweep with its edge extension, the seeds at the
selected lr, arms that reuse another arm's lr (`lr_from`) or fine-tune its export (`init_from`).

The planner is a pure function of the spec and the results so far, so an interrupted experiment plans the same
points again and runs only those not finished; a Kubernetes Indexed Job can run the points known before any result
(`static_points`) in parallel. Selection is by the final held-out loss (read at the end of each run's own
schedule); a failed point counts as worse than any finished one and is reported.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from app.experiments.spec import Arm, ExperimentSpec, dependency_order


def format_number(value: float) -> str:
    return f"{value:.4g}"


@dataclass(frozen=True)
class Point:
    """One `crescent train` run."""

    group: str
    arm: str
    lr_scale: float
    seed: int
    budget: float = 1.0
    init_from: str | None = None  # point id whose final export this run starts from

    @property
    def id(self) -> str:
        parts = [self.group, self.arm, f"lr{format_number(self.lr_scale)}", f"s{self.seed}"]
        if self.budget != 1.0:
            parts.append(f"t{format_number(self.budget)}")
        return "__".join(parts)


@dataclass
class Outcome:
    """What the planner needs to know of a point: finished (with its final val loss) or failed."""

    finished: bool
    val_loss: float = math.nan


@dataclass
class Selection:
    """The lr chosen for (group, arm) and how: the values tried, and which extensions the edge rule added."""

    lr_scale: float | None
    tried: list[tuple[float, float]] = field(default_factory=list)  # (lr_scale, final val loss; inf = failed)
    extensions: list[str] = field(default_factory=list)
    at_edge: str | None = None  # the best is still at this edge after max_extensions: "low" or "high"
    source: str = "sweep"  # "sweep" or "lr_from <arm>"


@dataclass
class Plan:
    todo: list[Point]
    selections: dict[tuple[str, str], Selection]
    waiting: list[tuple[str, str, str]]  # (group, arm, why it cannot run yet)
    points: list[Point]  # every point known so far (done or to do), in plan order


def plan(spec: ExperimentSpec, outcomes: dict[str, Outcome], blocked: dict[str, str] | None = None) -> Plan:
    """Next points. `outcomes`: point id -> Outcome for finished points and points that failed in this invocation
    (not retried now); `blocked`: arm name -> why it cannot run (a key `crescent train` does not accept yet)."""
    blocked = blocked or {}
    todo: list[Point] = []
    points: list[Point] = []
    selections: dict[tuple[str, str], Selection] = {}
    waiting: list[tuple[str, str, str]] = []
    arms = dependency_order(spec.arms)

    def need(p: Point) -> Outcome | None:
        points.append(p)
        outcome = outcomes.get(p.id)
        if outcome is None and p not in todo:
            todo.append(p)
        return outcome

    for group in spec.groups:
        for arm in arms:
            if not arm.applies_to(group.name):
                continue
            key = (group.name, arm.name)
            if arm.name in blocked:
                waiting.append((group.name, arm.name, blocked[arm.name]))
                continue
            if arm.init_from is not None:  # fine-tuning: the pretrained arm's lr must be known first
                src = selections.get((group.name, arm.init_from))
                if src is None or src.lr_scale is None:
                    waiting.append((group.name, arm.name, f"waits for arm {arm.init_from!r}"))
                    continue
            if arm.sweep is not None:
                first = (arm.seeds or spec.seeds)[0]
                init, why = _init_point(spec, group.name, arm, selections, outcomes, first)
                if why is not None:
                    waiting.append((group.name, arm.name, why))
                    continue
                selection = _sweep(spec, group.name, arm, need, init)
            else:
                ref = selections.get((group.name, arm.lr_from))
                if ref is None or ref.lr_scale is None:
                    waiting.append((group.name, arm.name, f"waits for the lr selected for arm {arm.lr_from!r}"))
                    continue
                selection = Selection(ref.lr_scale, source=f"lr_from {arm.lr_from}")
            selections[key] = selection
            if selection.lr_scale is None:
                continue
            for seed in arm.seeds or spec.seeds:
                init, why = _init_point(spec, group.name, arm, selections, outcomes, seed)
                if why is not None:
                    waiting.append((group.name, arm.name, why))
                    continue
                for budget in arm.budgets:
                    need(Point(group.name, spec.run_arm(arm.name), selection.lr_scale, seed, budget, init))
    # sweep points first (they decide the rest), in the order found
    return Plan(todo=todo, selections=selections, waiting=waiting, points=_unique(points))


def _unique(points: list[Point]) -> list[Point]:
    seen, out = set(), []
    for p in points:
        if p.id not in seen:
            seen.add(p.id)
            out.append(p)
    return out


def _init_point(spec: ExperimentSpec, group: str, arm: Arm, selections: dict, outcomes: dict,
                seed: int) -> tuple[str | None, str | None]:
    """(the point whose export a fine-tuning run of `seed` starts from, or why it cannot start yet)."""
    if arm.init_from is None:
        return None, None
    src = selections[(group, arm.init_from)]
    point = Point(group, spec.run_arm(arm.init_from), src.lr_scale, seed)
    done = outcomes.get(point.id)
    if done is None or not done.finished:
        return None, f"{point.id} {'failed' if done is not None else 'has not finished'}"
    return point.id, None


def _sweep(spec: ExperimentSpec, group: str, arm: Arm, need, init: str | None = None) -> Selection:
    """Run the sweep values with the first seed; while the best is at an edge, add one more value beyond it."""
    seed = (arm.seeds or spec.seeds)[0]
    sweep = arm.sweep
    run_arm = spec.run_arm(arm.name)
    values = list(sweep.values)
    selection = Selection(None)
    pending = False
    for v in values:
        if need(Point(group, run_arm, v, seed, 1.0, init)) is None:
            pending = True
    if pending:
        return selection
    tried = {v: _loss(need, Point(group, run_arm, v, seed, 1.0, init)) for v in values}
    extensions = 0
    while True:
        best = min(tried, key=lambda v: (tried[v], v))
        if math.isinf(tried[best]):  # every value failed: nothing to select
            selection.tried = sorted(tried.items())
            return selection
        lo, hi = min(tried), max(tried)
        edge = "high" if best == hi else "low" if best == lo else None
        if edge is None:
            break
        if extensions >= sweep.max_extensions:
            selection.at_edge = edge
            break
        nxt = best * sweep.factor if edge == "high" else best / sweep.factor
        point = Point(group, run_arm, nxt, seed, 1.0, init)
        outcome = need(point)
        selection.extensions.append(f"best lr_scale {format_number(best)} was at the {edge} edge of "
                                    f"{[format_number(v) for v in sorted(tried)]}: extended to {format_number(nxt)}")
        if outcome is None:
            selection.tried = sorted(tried.items())
            return selection
        tried[nxt] = _loss(need, point)
        extensions += 1
    selection.lr_scale = best
    selection.tried = sorted(tried.items())
    return selection


def _loss(need, point: Point) -> float:
    outcome = need(point)
    if outcome is None or not outcome.finished or not math.isfinite(outcome.val_loss):
        return math.inf
    return outcome.val_loss


def static_points(spec: ExperimentSpec, blocked: dict[str, str] | None = None) -> list[Point]:
    """The points known before any result (the first seed's sweep values of every arm that needs nothing else):
    what an Indexed Job runs in parallel, completion index = position in this list."""
    return plan(spec, {}, blocked).todo
