"""`crescent eval data | run | watch | lm-eval`.

`crescent eval lm-eval ARGS...` is lm-eval's own command line (`lm_eval ARGS...`) with the `crescent` model
registered: lm-eval 0.4 finds models only in its registry and never imports an installed project (no entry points),
so a plain `lm_eval --model crescent` cannot know the name.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

DEFAULT_DATA_DIR = "data/eval"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crescent eval", description="evaluate export checkpoints with lm-eval")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="build the local (offline) copies of the evaluation sets")
    data.add_argument("--out", default=DEFAULT_DATA_DIR, help=f"output directory (default {DEFAULT_DATA_DIR})")
    data.add_argument("--mmlu-dir", help="the original MMLU release (data/dev/*_dev.csv, data/test/*_test.csv)")
    data.add_argument("--gsm8k-test", help="GSM8K test questions, JSON lines {question, answer ending '#### N'}")
    data.add_argument("--gsm8k-train", help="GSM8K train questions (the few-shot pool), same format")

    for name, help_ in (("run", "evaluate one checkpoint"), ("watch", "evaluate every new checkpoint once, then exit")):
        p = sub.add_parser(name, help=help_)
        if name == "run":
            p.add_argument("--checkpoint", required=True, help="an export checkpoint directory (step-N)")
            p.add_argument("--output", help="results JSON path (default eval-results/<checkpoint>.json)")
            p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
        else:
            p.add_argument("--checkpoints", required=True, help="the directory training writes exports into")
            p.add_argument("--results-dir", help="also write each checkpoint's results JSON here")
            p.add_argument("--retry-failed", action="store_true",
                           help="evaluate failed tasks again even after --max-attempts failures")
            p.add_argument("--max-attempts", type=int, default=3,
                           help="a failed task is tried again on later runs until it failed this often (default 3)")
            p.add_argument("--lock-dir", help="where the checkpoints' locks go (default CHECKPOINTS/.eval-locks); "
                                              "another folder lets the checkpoints be mounted read-only")
            p.add_argument("--stale-after-hours", type=float, default=6.0,
                           help="take over a checkpoint marked running longer ago than this (default 6)")
        p.add_argument("--tasks", default="mmlu,gsm8k,humaneval",
                       help="comma-separated: mmlu (test split), mmlu_dev (lm-eval's dev questions), gsm8k, "
                            "humaneval, or any lm-eval task (default mmlu,gsm8k,humaneval)")
        p.add_argument("--limit", type=int, help="evaluate only the first N documents of each task")
        p.add_argument("--allow-code-execution", action="store_true",
                       help="run generated programs (HumanEval) in the sandbox; without it such tasks are refused")
        p.add_argument("--tracking-uri", help="MLflow URI (default $MLFLOW_TRACKING_URI, the checkpoint's, "
                                              "or sqlite:///mlruns.db)")
        p.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="where `crescent eval data` wrote the sets")
        p.add_argument("--task-source", default="auto", choices=["auto", "local", "hub"],
                       help="local copies, lm-eval's Hub tasks, or local when present (default)")
        p.add_argument("--num-fewshot", help="per-task few-shot counts, e.g. mmlu=5,gsm8k=4 (paper defaults)")
        p.add_argument("--batch-size", type=int, default=16)
        p.add_argument("--device", default="cpu")
        p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
        p.add_argument("--sandbox-workers", type=int, default=2, help="programs run in parallel (default 2)")
    sub.add_parser("lm-eval", add_help=False, help="lm-eval's own CLI with the `crescent` model registered "
                                                    "(crescent eval lm-eval --model crescent --model_args "
                                                    "pretrained=EXPORT --tasks ...)")
    return parser


def _request(args):
    from eval.offline_tasks import parse_fewshot
    from eval.runner import EvalRequest

    return EvalRequest(tasks=[t.strip() for t in args.tasks.split(",") if t.strip()], data_dir=args.data_dir,
                       limit=args.limit, allow_code_execution=args.allow_code_execution,
                       task_source=args.task_source, fewshot=parse_fewshot(args.num_fewshot),
                       batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                       sandbox_workers=args.sandbox_workers)


def _run(args) -> int:
    from components.checkpoint import read_metadata
    from eval.runner import check_code_execution, evaluate_checkpoint, format_table
    from eval.tracking import EvalTracker, resolve_tracking_uri

    request = _request(args)
    check_code_execution(request)
    checkpoint = Path(args.checkpoint)
    metadata = read_metadata(checkpoint)
    doc = evaluate_checkpoint(checkpoint, request)
    print(format_table(doc))
    output = Path(args.output or Path("eval-results") / f"{checkpoint.resolve().name}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(f"results: {output}")
    if not args.no_mlflow:
        from mlflow.exceptions import MlflowException

        from eval.tracking import TrackingFailed, describe_error

        uri = resolve_tracking_uri(args.tracking_uri, metadata)
        started = False
        try:
            tracker = EvalTracker(uri)
            run_id = tracker.target_run(metadata, checkpoint)
            statuses = tracker.task_statuses(run_id, doc["step"])
            started = True
            tracker.log_results(run_id, doc)
            for task in doc["tasks"]:
                tracker.mark_task(run_id, doc["step"], task, "done")
            for task, reason in doc["skipped"].items():
                tracker.mark_task(run_id, doc["step"], task, f"skipped: {reason}")
            tracker.record_failures(run_id, doc["step"], doc["failed"], statuses)
        except MlflowException as err:
            what = "publishing stopped part way" if started else "nothing was published"
            raise TrackingFailed(f"MLflow tracking store {uri} failed: {describe_error(err)}; the checkpoint was "
                                 f"evaluated (results in {output}) but {what}: run it again when the store is "
                                 "back") from err
        print(f"mlflow: {uri} run {run_id} step {doc['step']}")
    return 1 if doc["failed"] or not doc["tasks"] else 0


def _watch(args) -> int:
    from eval.watch import watch

    report = watch(args.checkpoints, _request(args), tracking_uri=args.tracking_uri,
                   results_dir=args.results_dir, retry_failed=args.retry_failed,
                   stale_after_s=args.stale_after_hours * 3600, max_attempts=args.max_attempts,
                   lock_dir=args.lock_dir)
    print(report.note or f"watch: evaluated {report.evaluated}, failed {report.failed}, skipped {report.skipped}")
    return 1 if report.failed else 0


def _data(args) -> int:
    from eval.data import build_eval_data

    manifest = build_eval_data(args.out, mmlu_dir=args.mmlu_dir, gsm8k_test=args.gsm8k_test,
                               gsm8k_train=args.gsm8k_train)
    for name, entry in manifest["tasks"].items():
        sizes = ", ".join(f"{k} {v}" for k, v in entry.items() if isinstance(v, int) and not isinstance(v, bool))
        print(f"{name}: {sizes}")
    if "mmlu" not in manifest["tasks"]:
        print("mmlu: no test split (pass --mmlu-dir DIR); the dev questions are evaluated as `mmlu_dev`")
    if "gsm8k" not in manifest["tasks"]:
        print("gsm8k: no local copy (pass --gsm8k-test FILE); `run` falls back to lm-eval's Hub task")
    print(f"wrote {args.out}")
    return 0


def _lm_eval(argv: list[str]) -> int:
    """lm-eval's CLI, in this process, after registering our model; its exit status."""
    from lm_eval.__main__ import cli_evaluate

    import eval.lm  # noqa: F401 - registers the `crescent` model with lm-eval's registry

    saved, sys.argv = sys.argv, ["lm-eval", *argv]  # lm-eval's parser reads sys.argv itself
    try:
        cli_evaluate()
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        sys.argv = saved
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    import lm_eval  # noqa: F401 - every eval command needs the `eval` extra; say so before any work

    if argv[:1] == ["lm-eval"]:
        return _lm_eval(argv[1:])
    args = _parser().parse_args(argv)
    logging.basicConfig(level=os.environ.get("CRESCENT_LOG_LEVEL", "WARNING"),
                        format="%(levelname)s %(name)s: %(message)s")
    from mlflow.exceptions import MlflowException

    from eval.tracking import describe_error

    try:
        return {"data": _data, "run": _run, "watch": _watch}[args.command](args)
    except (PermissionError, ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"crescent eval {args.command}: {err}", file=sys.stderr)
        return 2
    except MlflowException as err:  # one the commands do not describe themselves
        print(f"crescent eval {args.command}: MLflow failed: {describe_error(err)}", file=sys.stderr)
        return 2
