"""The offline lm-eval task definitions, loaded through lm-eval's TaskManager from the rendered YAMLs."""
import pytest
import yaml
from lm_eval.tasks import TaskManager
from test_eval_fixtures import write_gsm8k

from eval import sandbox
from eval.data import build_eval_data
from eval.offline_tasks import render_tasks, resolve_tasks


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    train = write_gsm8k(root / "train.jsonl")
    build_eval_data(root / "data", gsm8k_test=write_gsm8k(root / "test.jsonl"), gsm8k_train=train)
    specs = resolve_tasks(["mmlu_dev", "gsm8k", "humaneval"], root / "data")
    render_tasks(specs, root / "data", root / "include")
    manager = TaskManager(include_path=str(root / "include"), include_defaults=False)
    group = yaml.safe_load((root / "include" / "crescent_mmlu_dev.yaml").read_text())
    assert len(group["task"]) == 57 and group["aggregate_metric_list"][0]["weight_by_size"]
    return manager, {s.name: s for s in specs}


def _leaf_tasks(manager, name):
    return manager.load([name])["tasks"]


def _first_prompt(manager, name):
    """(task, its first test document, that document's few-shot prompt with a fixed seed)."""
    (task,) = _leaf_tasks(manager, name).values()
    task.set_fewshot_seed(1234)
    doc = list(task.test_docs())[0]
    return task, doc, task.fewshot_context(doc, num_fewshot=task.config.num_fewshot)


def test_humaneval_task_scores_canonical_solutions_as_passing(tasks, monkeypatch):
    monkeypatch.setenv(sandbox.ALLOW_ENV, "1")
    manager, _ = tasks
    (task,) = _leaf_tasks(manager, "crescent_humaneval").values()
    docs = list(task.test_docs())
    assert len(docs) == 164 and task.config.num_fewshot == 0
    assert task.doc_to_text(docs[0]) == docs[0]["prompt"]
    scores = [task.process_results(d, [d["canonical_solution"]])["pass@1"] for d in docs[:5]]
    assert scores == [1.0] * 5
    assert task.process_results(docs[0], ["    return None\n"]) == {"pass@1": 0.0}


def test_mmlu_dev_subject_prompt_is_lm_eval_format_without_the_question_itself(tasks):
    manager, specs = tasks
    task, doc, prompt = _first_prompt(manager, "crescent_mmlu_dev_anatomy")
    assert prompt.startswith("The following are multiple choice questions (with answers) about anatomy.\n\n")
    assert prompt.count("\nAnswer:") == task.config.num_fewshot + 1 == 5  # 4 examples + the question
    assert prompt.endswith(f"{doc['question'].strip()}\nA. {doc['choices'][0]}\nB. {doc['choices'][1]}\n"
                           f"C. {doc['choices'][2]}\nD. {doc['choices'][3]}\nAnswer:")
    assert prompt.count(doc["question"].strip()) == 1
    assert specs["mmlu_dev"].num_fewshot == 4 and "5-shot requested" in specs["mmlu_dev"].note
    assert specs["mmlu_dev"].split == "dev"


def test_mmlu_is_the_real_test_split_with_dev_examples_when_the_user_supplies_it(tmp_path):
    """`mmlu` exists only with the original release's test files; its examples are the subject's dev questions."""
    release = tmp_path / "mmlu" / "data"
    for split, n in (("dev", 5), ("test", 3)):
        (release / split).mkdir(parents=True)
        rows = "".join(f'"{split} question {i}?",w,x,y,z,{"ABCD"[i % 4]}\n' for i in range(n))
        (release / split / f"anatomy_{split}.csv").write_text(rows)
    build_eval_data(tmp_path / "data", mmlu_dir=tmp_path / "mmlu")
    specs = resolve_tasks(["mmlu", "mmlu_dev"], tmp_path / "data")
    assert [(s.lm_eval_name, s.split, s.num_fewshot, s.skip) for s in specs] == [
        ("crescent_mmlu", "test", 5, None), ("crescent_mmlu_dev", "dev", 5, None)]
    render_tasks(specs, tmp_path / "data", tmp_path / "include")
    manager = TaskManager(include_path=str(tmp_path / "include"), include_defaults=False)
    task, doc, prompt = _first_prompt(manager, "crescent_mmlu_anatomy")
    assert len(list(task.test_docs())) == 3 and doc["question"].startswith("test question")
    assert prompt.count("dev question") == 5 and prompt.count("\nAnswer:") == 6
    assert specs[0].note == ""  # a full 5-shot pool: nothing to warn about


def test_gsm8k_uses_the_train_file_for_four_examples_and_extracts_the_number(tasks):
    manager, specs = tasks
    task, doc, prompt = _first_prompt(manager, "crescent_gsm8k")
    assert task.config.num_fewshot == 4 and prompt.count("Question:") == 5 and specs["gsm8k"].note == ""
    assert prompt.endswith(f"Question: {doc['question']}\nAnswer:")


def test_gsm8k_without_train_file_never_shows_a_question_its_own_answer(tmp_path):
    build_eval_data(tmp_path / "data", gsm8k_test=write_gsm8k(tmp_path / "test.jsonl"))
    specs = resolve_tasks(["gsm8k"], tmp_path / "data")
    render_tasks(specs, tmp_path / "data", tmp_path / "include")
    (task,) = TaskManager(include_path=str(tmp_path / "include"), include_defaults=False).load(
        ["crescent_gsm8k"])["tasks"].values()
    task.set_fewshot_seed(1234)
    for doc in task.test_docs():
        prompt = task.fewshot_context(doc, num_fewshot=4)
        assert prompt.count("Question:") == 5 and prompt.count(doc["question"]) == 1


def test_humaneval_generates_with_lm_eval_humaneval_settings(tasks):
    """Same stop sequences and token budget as lm-eval's own humaneval task (a shorter budget cut programs off)."""
    from pathlib import Path

    import lm_eval.tasks

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)  # lm-eval's `!function` tags
    theirs = yaml.load((Path(lm_eval.tasks.__file__).parent / "humaneval" / "humaneval.yaml").read_text(), Loader)
    manager, _ = tasks
    (task,) = _leaf_tasks(manager, "crescent_humaneval").values()
    assert theirs["generation_kwargs"]["max_gen_toks"] == 1024
    assert task.config.generation_kwargs == theirs["generation_kwargs"]


def test_gsm8k_ignores_a_train_file_left_by_an_earlier_build(tmp_path):
    """Rebuilt without --gsm8k-train, the manifest says there is no train split: the old file is not the pool."""
    build_eval_data(tmp_path / "data", gsm8k_test=write_gsm8k(tmp_path / "test.jsonl"),
                    gsm8k_train=write_gsm8k(tmp_path / "train.jsonl"))
    manifest = build_eval_data(tmp_path / "data", gsm8k_test=write_gsm8k(tmp_path / "test.jsonl"))
    assert "train" not in manifest["tasks"]["gsm8k"] and (tmp_path / "data" / "gsm8k" / "train.jsonl").exists()
    specs = resolve_tasks(["gsm8k"], tmp_path / "data")
    render_tasks(specs, tmp_path / "data", tmp_path / "include")
    rendered = yaml.safe_load((tmp_path / "include" / "crescent_gsm8k.yaml").read_text())
    assert rendered["fewshot_split"] == "test" and list(rendered["dataset_kwargs"]["data_files"]) == ["test"]
    assert specs[0].note == "no train file: few-shot examples are other test questions"
