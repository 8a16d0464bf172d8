"""Which rank runs Newton–Schulz on which matrix: longest-processing-time first (Graham's LPT), the one planner
behind ZeRO-1's 'owner' partition (`zero1_layout.plan_layout`) and FSDP2's 2-D matrix owners (`dtensor.py`).

The cost of a job is its NS FLOPs up to a constant, n·max(A, B)·min(A, B)² for n matrices [A, B] (every NS step
is two products with the long side and one with the short one).
"""
from __future__ import annotations

from collections.abc import Sequence


def ns_cost(shape: Sequence[int]) -> int:
    """NS cost of a matrix [A, B] or a stack [..., A, B] (one matrix per leading index)."""
    a, b = shape[-2], shape[-1]
    n = 1
    for d in shape[:-2]:
        n *= d
    return n * max(a, b) * min(a, b) ** 2


def assign_owners(jobs: Sequence[tuple[int, int, int]], world_size: int, start: Sequence[int] | None = None,
                  capacity: int | None = None) -> dict[int, int]:
    """{job: rank} for jobs (job, cost, size), longest first (ties: lower job first).

    Each job goes to the rank with the least cost so far (`start`: cost a rank already has; ties: lower rank)
    among the ranks where it still fits under `capacity` (a size per rank); when it fits nowhere, to the rank
    holding the least size.
    """
    cost = list(start) if start is not None else [0] * world_size
    size = [0] * world_size
    owners = {}
    for job, job_cost, job_size in sorted(jobs, key=lambda j: (-j[1], j[0])):
        fits = [r for r in range(world_size) if capacity is None or size[r] + job_size <= capacity]
        if fits:
            rank = min(fits, key=lambda r: (cost[r], r))
        else:
            rank = min(range(world_size), key=lambda r: (size[r], r))
        owners[job] = rank
        cost[rank] += job_cost
        size[rank] += job_size
    return owners
