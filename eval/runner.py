"""Evaluate one export checkpoint on a list of tasks with lm-eval and our `crescent` LM; returns a results document.

One lm-eval call per task so each keeps its own few-shot count (MMLU 5, GSM8K 4, HumanEval 0 by default), and a
failure is per task: a task that raises is recorded in `doc["failed"]` and the others still run; a task with no
data here is never attempted (`doc["skipped"]`, with the reason). `on_result(name, doc)` is called after each task,
so a caller can publish results before the next task starts; a publishing error is recorded as that task's
failure (its results stay in the document). Generated code is executed only when the request
allows it (then in `eval/sandbox.py`); otherwise a run that includes HumanEval is refused before anything is loaded.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from components.checkpoint import read_metadata
from eval import sandbox
from eval.offline_tasks import TaskSpec, check_known, render_tasks, resolve_tasks

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
        # Run-wide settings are checked here, before any checkpoint is touched: found after a model load they
        # would count as a failed attempt of every checkpoint's tasks.
        for flag, value in (("--batch-size", self.batch_size), ("--sandbox-workers", self.sandbox_workers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{flag}={value!r} must be a positive integer")

    def specs(self) -> list[TaskSpec]:
        return resolve_tasks(self.tasks, self.data_dir, source=self.task_source, fewshot=self.fewshot)


def check_code_execution(request: EvalRequest) -> None:
    """HumanEval runs generated programs: refuse unless the user passed --allow-code-execution."""
    if any(t in CODE_TASKS for t in request.tasks) and not request.allow_code_execution:
        raise PermissionError(sandbox.REFUSAL)


def task_manager(specs: list[TaskSpec], include: str | Path):
    """lm-eval's TaskManager over the rendered offline tasks, plus its own index when a Hub task is requested;
    a task name that neither knows is a ValueError listing what exists (before any model is loaded)."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include), include_defaults=any(s.source == "hub" for s in specs))
    check_known(specs, manager.all_tasks)
    check_not_tags(specs, manager)
    return manager


def check_not_tags(specs: list[TaskSpec], manager) -> None:
    """An lm-eval tag (e.g. `ai2_arc`) names a set of tasks scored separately, with no result of its own: refused
    (a ValueError naming its tasks) rather than evaluated and then found to have no score."""
    tags = set(manager.all_tags)
    for spec in specs:
        if spec.source == "hub" and spec.lm_eval_name in tags:
            members = sorted(manager.task_index[spec.lm_eval_name].tags or ())
            raise ValueError(f"--tasks: {spec.name!r} is an lm-eval tag (a set of tasks with no score of its own), "
                             f"not a task or group: name its tasks instead ({', '.join(members)})")


def check_task_names(request: EvalRequest) -> None:
    """Fail fast on unknown task names (builds lm-eval's task index only when a non-Crescent name is asked for)."""
    specs = request.specs()
    if any(s.source == "hub" for s in specs):
        with tempfile.TemporaryDirectory(prefix="crescent-tasks-") as include:
            task_manager(specs, include)


def evaluate_checkpoint(path: str | Path, request: EvalRequest,
                        on_result: Callable[[str, dict], None] | None = None) -> dict:
    """Run the tasks on the export at `path`; raises only if the checkpoint cannot be loaded (or for bad names)."""
    from eval.lm import CrescentLM

    check_code_execution(request)
    path = Path(path).resolve()
    metadata = read_metadata(path)
    specs = request.specs()
    doc = {"checkpoint": str(path), "step": metadata["step"], "run_id": metadata.get("run_id"),
           "tokens_seen": metadata.get("tokens_seen"), "limit": request.limit, "tasks": {}, "lm_eval": {},
           "failed": {}, "skipped": {s.name: s.skip for s in specs if s.skip},
           "sandbox": sandbox.isolation() if request.allow_code_execution else "disabled",
           "created": datetime.now(UTC).isoformat(timespec="seconds")}
    runnable = [s for s in specs if not s.skip]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="crescent-tasks-") as include, _code_execution(request):
        render_tasks(runnable, request.data_dir, include)
        manager = task_manager(runnable, include) if runnable else None
        lm = CrescentLM(pretrained=str(path), device=request.device, dtype=request.dtype,
                        batch_size=request.batch_size) if runnable else None
        for spec in runnable:
            log.info("evaluating %s (%s, %s-shot) on %s", spec.name, spec.lm_eval_name, spec.num_fewshot, path)
            try:
                out = _evaluate_task(lm, manager, spec, request)
                entry = _task_entry(spec, out, request)
            except Exception as err:  # noqa: BLE001 - one task's failure must not discard the others
                log.error("%s on %s failed: %s: %s", spec.name, path, type(err).__name__, err)
                doc["failed"][spec.name] = f"{type(err).__name__}: {err}"
                continue
            doc["tasks"][spec.name] = entry
            doc["lm_eval"][spec.name] = {k: out.get(k) for k in ("results", "groups", "n-shot", "n-samples",
                                                                  "versions", "higher_is_better")}
            if on_result is None:
                continue
            try:
                on_result(spec.name, doc)
            except Exception as err:  # noqa: BLE001 - the results stay in the doc; the task is tried again later
                log.error("%s on %s: publishing its results failed: %s: %s", spec.name, path, type(err).__name__,
                          err)
                doc["failed"][spec.name] = f"publishing its results failed: {type(err).__name__}: {err}"
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
        if spec.split is None:  # a Hub task: the split lm-eval evaluates
            spec.split = task.get_config("test_split") or task.get_config("validation_split")
    return evaluate(lm=lm, task_dict=loaded, limit=request.limit, bootstrap_iters=1000, log_samples=False,
                    confirm_run_unsafe_code=request.allow_code_execution, verbosity="WARNING")


def _task_entry(spec: TaskSpec, out: dict, request: EvalRequest) -> dict:
    if spec.lm_eval_name not in out.get("results", {}):
        raise ValueError(f"task {spec.name!r}: lm-eval returned no result under that name (it has "
                         f"{', '.join(sorted(out.get('results', {}))) or 'none'}): name a task or a group")
    result = out["results"][spec.lm_eval_name]
    metrics = {}
    for key, value in result.items():
        metric, _, filter_name = key.partition(",")
        if "_stderr" in metric or metric == "sample_len" or not isinstance(value, int | float) or isinstance(value, bool):
            continue
        metrics[metric if filter_name in ("", "none") else f"{metric}/{filter_name}"] = float(value)
    samples = out.get("n-samples", {})
    n_docs = sum(v.get("effective", 0) for k, v in samples.items())
    return {"lm_eval_task": spec.lm_eval_name, "source": spec.source, "split": spec.split,
            "num_fewshot": spec.num_fewshot, "limit": request.limit, "documents": n_docs, "metrics": metrics,
            "note": spec.note}


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
    rows = [("task", "source", "split", "n-shot", "limit", "docs", "metric", "value")]
    for name, entry in doc["tasks"].items():
        for metric, value in sorted(entry["metrics"].items()):
            rows.append((name, entry["source"], str(entry["split"]), str(entry["num_fewshot"]),
                         str(entry["limit"] or "all"), str(entry["documents"]), metric, f"{value:.4f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    header = f"checkpoint {doc['checkpoint']} (step {doc['step']})"
    notes = [f"note: {name}: {e['note']}" for name, e in doc["tasks"].items() if e.get("note")]
    notes += [f"skipped: {name}: {reason}" for name, reason in doc.get("skipped", {}).items()]
    notes += [f"failed: {name}: {error}" for name, error in doc.get("failed", {}).items()]
    return "\n".join([header, *lines, *notes])
