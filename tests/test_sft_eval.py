"""Evaluating an SFT export with its chat template: the `crescent` lm-eval model implements lm-eval's chat-template
interface, and `apply_chat_template=True` runs a generation task (our offline GSM8K) with prompts in the
template, encoded to the template's token ids."""
from __future__ import annotations

import pytest
from test_eval_fixtures import corpus_text, write_export, write_gsm8k

from components.data.chat import ChatEncoder, get_template
from components.data.tokenizer import load_tokenizer, train_bpe
from eval.lm import CrescentLM

TEMPLATE = get_template("moonlight")


@pytest.fixture(scope="module")
def chat_export(tmp_path_factory):
    tok = tmp_path_factory.mktemp("tok")
    train_bpe([corpus_text()], vocab_size=1024, out_dir=tok, special_tokens=TEMPLATE.special_tokens)
    export = write_export(tmp_path_factory.mktemp("exports"), tok, spread=0.1)
    from components.checkpoint import save_export
    from components.model.hf import load_hf

    # the same weights, exported again as a fine-tuned model names its template
    return save_export(load_hf(export), export.parent / "sft", step=1, tokenizer_dir=tok, chat_template="moonlight")


def test_chat_template_interface(chat_export):
    lm = CrescentLM(pretrained=str(chat_export), max_gen_toks=8)
    history = [{"role": "system", "content": "Answer with a number."}, {"role": "user", "content": "2 + 2?"}]
    prompt = lm.apply_chat_template(history)
    assert prompt == TEMPLATE.render(history, add_generation_prompt=True)
    encoder = ChatEncoder(load_tokenizer(chat_export), TEMPLATE)
    assert lm.tok_encode(prompt) == encoder.encode_text(prompt)
    assert lm.tok_encode(prompt)[0] == encoder.special_ids["<|im_system|>"]
    # Prefill: an open final assistant turn is continued, not closed.
    prefilled = lm.apply_chat_template([*history, {"role": "assistant", "content": "The answer is"}], False)
    assert prefilled.endswith("<|im_assistant|>assistant<|im_middle|>The answer is")
    assert lm.chat_template(True) == TEMPLATE.jinja() and lm.tokenizer_name.endswith("-moonlight")
    assert encoder.special_ids["<|im_end|>"] in lm._stop_ids()


def test_an_export_without_a_template_says_how_to_name_one(tmp_path):
    tok = tmp_path / "tok"
    train_bpe([corpus_text(50_000)], vocab_size=512, out_dir=tok, special_tokens=TEMPLATE.special_tokens)
    export = write_export(tmp_path / "exports", tok, vocab_size=512)
    lm = CrescentLM(pretrained=str(export))
    with pytest.raises(ValueError, match="names no chat template .* pass chat_template=NAME in --model_args"):
        lm.apply_chat_template([{"role": "user", "content": "hi"}])
    assert CrescentLM(pretrained=str(export), chat_template="moonlight").apply_chat_template(
        [{"role": "user", "content": "hi"}]) == "<|im_user|>user<|im_middle|>hi<|im_end|>" + TEMPLATE.generation_prompt()


def test_lm_eval_generation_task_with_apply_chat_template(chat_export, tmp_path):
    from lm_eval.evaluator import evaluate
    from lm_eval.tasks import TaskManager

    from eval.data import build_eval_data
    from eval.offline_tasks import render_tasks, resolve_tasks

    build_eval_data(tmp_path / "data", gsm8k_test=write_gsm8k(tmp_path / "gsm8k.jsonl"))
    render_tasks(resolve_tasks(["gsm8k"], tmp_path / "data"), tmp_path / "data", tmp_path / "tasks")
    manager = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    tasks = manager.load(["crescent_gsm8k"])
    for task in tasks["tasks"].values():
        task.set_config(key="num_fewshot", value=1)
    lm = CrescentLM(pretrained=str(chat_export), max_gen_toks=8, batch_size=2)
    out = evaluate(lm=lm, task_dict=tasks, limit=2, apply_chat_template=True, log_samples=True,
                   verbosity="WARNING")
    samples = out["samples"]["crescent_gsm8k"]  # one entry per document and filter
    assert sorted({s["doc_id"] for s in samples}) == [0, 1]
    for sample in samples:
        prompt = sample["arguments"][0][0] if isinstance(sample["arguments"][0], list | tuple) else \
            sample["arguments"]["gen_args_0"]["arg_0"]
        assert prompt.startswith("<|im_user|>user<|im_middle|>") and prompt.endswith(TEMPLATE.generation_prompt())
        # One user turn holding the one-shot example and the question, then the generation prompt.
        assert prompt.count("<|im_user|>") == 1 and prompt.count("<|im_assistant|>") == 1
        assert prompt.count("Question:") == 2 and sample["doc"]["question"] in prompt
    assert 0.0 <= out["results"]["crescent_gsm8k"]["exact_match,strict-match"] <= 1.0
