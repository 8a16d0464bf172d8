"""Which lm-eval task runs for a user-facing name, and the offline task YAMLs rendered for a data directory.

`mmlu`, `gsm8k`, `humaneval` map to our offline tasks (`crescent_*`, templates in `eval/tasks/`) when
`crescent eval data` has built their local copies, else to lm-eval's own tasks of those names (Hub or HF cache).
Any other name is passed to lm-eval unchanged. Few-shot counts default to the paper's (Moonlight Table 4).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import yaml

from eval.data import read_manifest

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).with_name("tasks")
PAPER_FEWSHOT = {"mmlu": 5, "gsm8k": 4, "humaneval": 0}
SOURCES = ("auto", "local", "hub")


@dataclass
class TaskSpec:
    name: str  # what the user asked for, and the MLflow metric prefix
    lm_eval_name: str
    num_fewshot: int | None
    source: str  # local | hub
    note: str = ""


def parse_fewshot(text: str | None) -> dict[str, int]:
    """'mmlu=5,gsm8k=8' -> {'mmlu': 5, 'gsm8k': 8}."""
    out: dict[str, int] = {}
    for item in filter(None, (text or "").split(",")):
        name, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit():
            raise ValueError(f"--num-fewshot: {item!r} must look like TASK=N with N >= 0 (e.g. mmlu=5,gsm8k=4)")
        out[name.strip()] = int(value)
    return out


def resolve_tasks(names: list[str], data_dir: str | Path, *, source: str = "auto",
                  fewshot: dict[str, int] | None = None) -> list[TaskSpec]:
    if source not in SOURCES:
        raise ValueError(f"--task-source={source!r}; choose one of {SOURCES}")
    fewshot = {**PAPER_FEWSHOT, **(fewshot or {})}
    available = read_manifest(data_dir)["tasks"]
    specs = []
    for name in names:
        local = name in PAPER_FEWSHOT and name in available
        # lm-eval's own humaneval scores with HF `code_eval`, outside our sandbox: only on explicit request.
        if (source == "local" or (name == "humaneval" and source == "auto")) and not local:
            hint = ("run `crescent eval data --gsm8k-test FILE`" if name == "gsm8k" else "run `crescent eval data`")
            raise ValueError(f"task {name!r} has no local data in {str(data_dir)!r}: {hint}"
                             if name in PAPER_FEWSHOT else f"task {name!r} has no offline definition "
                             f"(offline tasks: {', '.join(PAPER_FEWSHOT)})")
        if local and source != "hub":
            specs.append(TaskSpec(name, f"crescent_{name}", fewshot[name], "local"))
        else:
            note = ("lm-eval's code_eval runs the programs outside the Crescent sandbox"
                    if name == "humaneval" else "")
            if note:
                log.warning("humaneval: %s", note)
            specs.append(TaskSpec(name, name, fewshot.get(name), "hub", note))
    return specs


def render_tasks(specs: list[TaskSpec], data_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the YAMLs of the local tasks among `specs` into `out_dir` (lm-eval's include_path)."""
    data, out = Path(data_dir).resolve(), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(data)["tasks"]
    for spec in specs:
        if spec.source != "local":
            continue
        if spec.name == "mmlu":
            _render_mmlu(spec, manifest["mmlu"], data, out)
            continue
        files = {"test": str(data / spec.name / "test.jsonl")}
        config = {"include": str(TEMPLATES / f"{spec.name}.template.yaml"), "task": spec.lm_eval_name,
                  "num_fewshot": spec.num_fewshot}
        if spec.name == "gsm8k" and (data / "gsm8k" / "train.jsonl").exists():
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
    """One task per subject plus the group; a subject never gets more examples than its dev pool holds (minus the
    question itself when the test split is the dev split)."""
    subjects, requested = entry["subjects"], spec.num_fewshot
    shots = {}
    for subject in subjects:
        pool = _count_lines(data / "mmlu" / "dev" / f"{subject}.jsonl")
        shots[subject] = min(requested, max(0, pool - 1) if entry.get("test_is_dev") else pool)
    fewer = sorted(s for s in subjects if shots[s] < requested)
    if fewer:
        used = sorted(set(shots.values()), reverse=True)
        spec.num_fewshot = max(shots.values())
        spec.note = (f"{requested}-shot requested; dev pools allow {'/'.join(map(str, used))}-shot "
                     f"({len(fewer)} subjects below {requested}"
                     + ("; the test split is the dev split" if entry.get("test_is_dev") else "") + ")")
        log.warning("mmlu: %s", spec.note)
    names = []
    for subject in subjects:
        name = f"{spec.lm_eval_name}_{subject}"
        names.append(name)
        config = {
            "include": str(TEMPLATES / "mmlu.template.yaml"), "task": name, "task_alias": subject,
            "description": f"The following are multiple choice questions (with answers) about "
                           f"{subject.replace('_', ' ')}.\n\n",
            "num_fewshot": shots[subject],
            "dataset_kwargs": {"data_files": {"test": str(data / "mmlu" / "test" / f"{subject}.jsonl"),
                                              "dev": str(data / "mmlu" / "dev" / f"{subject}.jsonl")}},
        }
        if entry.get("test_is_dev"):
            # One split for both: lm-eval removes the question from its own examples only when the few-shot
            # split has the test split's name.
            config["dataset_kwargs"]["data_files"] = {"test": str(data / "mmlu" / "dev" / f"{subject}.jsonl")}
            config["fewshot_split"] = "test"
        (out / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    group = {"group": spec.lm_eval_name, "task": names,
             "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}], "metadata": {"version": 1}}
    (out / f"{spec.lm_eval_name}.yaml").write_text(yaml.safe_dump(group, sort_keys=False))


def _count_lines(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip())
