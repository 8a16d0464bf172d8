"""Evaluate one export checkpoint on a list of tasks with lm-eval and our `crescent` LM; returns a results document.

One lm-eval call per task so each keeps its own few-shot count (MMLU 5, GSM8K 4, HumanEval 0 by default).
Generated code is executed only when the request allows it (then in `eval/sandbox.py`); otherwise a run that
includes HumanEval is refused before anything is loaded.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from components.checkpoint import read_metadata
from eval import sandbox
from eval.offline_tasks import TaskSpec, render_tasks, resolve_tasks

log = logging.getLogger(__name__)
CODE_TASKS = {"humaneval", "crescent_humaneval"}


@dataclass
class EvalRequest:
    tasks: list[str]
    data_dir: str = "data/eval"
    limit: int | None = None
    allow_code_execution: bool = False
    task_source: str = "auto"
    fewshot: dict[str, int] = field(default_factory=dict)
    batch_size: int = 16
    device: str = "cpu"
    dtype: str = "float32"
    sandbox_workers: int = 2

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("--tasks: name at least one task (e.g. mmlu,gsm8k,humaneval)")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit={self.limit!r} must be a positive number of documents per task")


def check_code_execution(request: EvalRequest) -> None:
    """HumanEval runs generated programs: refuse unless the user passed --allow-code-execution."""
    if any(t in CODE_TASKS for t in request.tasks) and not request.allow_code_execution:
        raise PermissionError(sandbox.REFUSAL)


def evaluate_checkpoint(path: str | Path, request: EvalRequest) -> dict:
    """Run the tasks on the export at `path`; raises if it cannot be loaded."""
    from lm_eval.tasks import TaskManager

    from eval.lm import CrescentLM

    check_code_execution(request)
    path = Path(path).resolve()
    metadata = read_metadata(path)
    specs = resolve_tasks(request.tasks, request.data_dir, source=request.task_source, fewshot=request.fewshot)
    started = time.monotonic()
    lm = CrescentLM(pretrained=str(path), device=request.device, dtype=request.dtype, batch_size=request.batch_size)
    doc = {"checkpoint": str(path), "step": metadata["step"], "run_id": metadata.get("run_id"),
           "tokens_seen": metadata.get("tokens_seen"), "limit": request.limit, "tasks": {}, "lm_eval": {},
           "sandbox": sandbox.isolation() if request.allow_code_execution else "disabled",
           "created": datetime.now(UTC).isoformat(timespec="seconds")}
    with tempfile.TemporaryDirectory(prefix="crescent-tasks-") as include, _code_execution(request):
        render_tasks(specs, request.data_dir, include)
        manager = TaskManager(include_path=include, include_defaults=any(s.source == "hub" for s in specs))
        for spec in specs:
            log.info("evaluating %s (%s, %s-shot) on %s", spec.name, spec.lm_eval_name, spec.num_fewshot, path)
            out = _evaluate_task(lm, manager, spec, request)
            doc["tasks"][spec.name] = _task_entry(spec, out, request)
            doc["lm_eval"][spec.name] = {k: out.get(k) for k in ("results", "groups", "n-shot", "n-samples",
                                                                  "versions", "higher_is_better")}
    doc["seconds"] = round(time.monotonic() - started, 2)
    return doc


def _evaluate_task(lm, manager, spec: TaskSpec, request: EvalRequest, seed: int = 1234) -> dict:
    """lm-eval's `evaluate` on one task (or group), seeded like `simple_evaluate` but without its environment
    probe (pip/GPU listing subprocesses on every call)."""
    import random

    import numpy as np
    import torch
    from lm_eval.evaluator import evaluate

    random.seed(0)
    np.random.seed(seed)
    torch.manual_seed(seed)
    try:
        loaded = manager.load([spec.lm_eval_name])
    except Exception as err:
        if spec.source != "hub":
            raise
        raise RuntimeError(f"task {spec.name!r}: lm-eval's task {spec.lm_eval_name!r} could not be loaded ({err}); "
                           f"without Hub access build local copies with `crescent eval data`") from err
    for task in loaded["tasks"].values():
        if spec.source == "hub" and spec.num_fewshot is not None:
            task.set_config(key="num_fewshot", value=spec.num_fewshot)
        elif task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=seed)
    return evaluate(lm=lm, task_dict=loaded, limit=request.limit, bootstrap_iters=1000, log_samples=False,
                    confirm_run_unsafe_code=request.allow_code_execution, verbosity="WARNING")


def _task_entry(spec: TaskSpec, out: dict, request: EvalRequest) -> dict:
    result = out["results"][spec.lm_eval_name]
    metrics = {}
    for key, value in result.items():
        metric, _, filter_name = key.partition(",")
        if "_stderr" in metric or metric == "sample_len" or not isinstance(value, int | float) or isinstance(value, bool):
            continue
        metrics[metric if filter_name in ("", "none") else f"{metric}/{filter_name}"] = float(value)
    samples = out.get("n-samples", {})
    n_docs = sum(v.get("effective", 0) for k, v in samples.items())
    return {"lm_eval_task": spec.lm_eval_name, "source": spec.source, "num_fewshot": spec.num_fewshot,
            "limit": request.limit, "documents": n_docs, "metrics": metrics, "note": spec.note}


class _code_execution:
    """Sets the sandbox permission (and lm-eval/HF `code_eval`'s own switch) for the duration of a run only."""

    def __init__(self, request: EvalRequest):
        self.values = {}
        if request.allow_code_execution:
            self.values = {sandbox.ALLOW_ENV: "1", "HF_ALLOW_CODE_EVAL": "1",
                           "CRESCENT_SANDBOX_WORKERS": str(request.sandbox_workers)}

    def __enter__(self):
        self.saved = {k: os.environ.get(k) for k in self.values}
        os.environ.update(self.values)

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def format_table(doc: dict) -> str:
    rows = [("task", "source", "n-shot", "limit", "docs", "metric", "value")]
    for name, entry in doc["tasks"].items():
        for metric, value in sorted(entry["metrics"].items()):
            rows.append((name, entry["source"], str(entry["num_fewshot"]), str(entry["limit"] or "all"),
                         str(entry["documents"]), metric, f"{value:.4f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    header = f"checkpoint {doc['checkpoint']} (step {doc['step']})"
    notes = [f"note: {name}: {e['note']}" for name, e in doc["tasks"].items() if e.get("note")]
    return "\n".join([header, *lines, *notes])
