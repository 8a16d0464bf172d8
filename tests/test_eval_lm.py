"""Our lm-eval `LM` against lm-eval's own `hf` model (transformers DeepseekV3) on the same export."""
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance
from test_eval_fixtures import corpus_text, tiny_config, write_export, write_gsm8k, write_tokenizer

from eval.generation import SamplingConfig, generate
from eval.lm import CrescentLM


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    tok = write_tokenizer(tmp_path_factory.mktemp("tok"))
    return write_export(tmp_path_factory.mktemp("exports"), tok, spread=0.1)


@pytest.fixture(scope="module")
def ours(export):
    return CrescentLM(pretrained=str(export), batch_size=8)


@pytest.fixture(scope="module")
def hf(export):
    pytest.importorskip("accelerate")
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(export), tokenizer=str(export), device="cpu", dtype="float32", batch_size=8)


def _loglikelihood_requests(n: int, seed: int = 0) -> list[Instance]:
    """Contexts of 1 to ~1500 characters (some beyond max_length=256 tokens), word-boundary continuations,
    empty contexts, and multiple-choice groups sharing one context."""
    text = corpus_text(80_000)
    rnd = random.Random(seed)
    reqs = []
    while len(reqs) < n:
        a = rnd.randrange(0, len(text) - 3000)
        a = text.index(" ", a) + 1
        cut = text.index(" ", a + rnd.choice([3, 40, 300, 1500]))
        context = text[a:cut]
        if not context.strip():
            continue
        if len(reqs) % 10 == 0:
            for letter in (" A", " B", " C", " D"):
                reqs.append(Instance("loglikelihood", {}, (context + "\nAnswer:", letter), len(reqs)))
        elif len(reqs) % 17 == 0:
            reqs.append(Instance("loglikelihood", {}, ("", text[a:cut]), len(reqs)))
        else:
            end = text.index(" ", cut + rnd.choice([1, 8, 60]))
            reqs.append(Instance("loglikelihood", {}, (context, text[cut:end]), len(reqs)))
    return reqs


def test_loglikelihood_matches_lm_eval_hf_within_1e3(ours, hf):
    reqs = _loglikelihood_requests(300)
    got = ours.loglikelihood(reqs, disable_tqdm=True)
    expected = hf.loglikelihood(reqs, disable_tqdm=True)
    diffs = [abs(a[0] - b[0]) for a, b in zip(got, expected)]
    assert max(diffs) < 1e-3
    assert min(s for s, _ in got) < -20  # far from uniform: the comparison has something to compare
    same_greedy = sum(a[1] == b[1] for a, b in zip(got, expected))
    assert same_greedy >= len(reqs) - 2


def test_loglikelihood_rolling_matches_lm_eval_hf(ours, hf):
    text = corpus_text(40_000)
    reqs = [Instance("loglikelihood_rolling", {}, (text[i * 5000:i * 5000 + n],), i)
            for i, n in enumerate([40, 900, 3000])]  # 1 window and several windows of 256 tokens
    got = ours.loglikelihood_rolling(reqs, disable_tqdm=True)
    expected = hf.loglikelihood_rolling(reqs, disable_tqdm=True)
    for a, b in zip(got, expected):
        assert abs(a - b) < 1e-3 + 1e-6 * abs(b)


def test_left_truncation_keeps_the_last_max_length_tokens(ours):
    context = corpus_text(20_000)[:6000]
    cut = context.rindex(" ")
    full = ours.loglikelihood([Instance("loglikelihood", {}, (context[:cut], context[cut:]), 0)],
                              disable_tqdm=True)[0][0]
    ctx, cont = ours._encode_pair(context[:cut], context[cut:])
    assert len(ctx) > 256
    kept = (ctx + cont)[-257:]
    direct = ours._loglikelihood_tokens([(None, kept[:-len(cont)], cont)], disable_tqdm=True)[0][0]
    assert full == pytest.approx(direct, abs=1e-5)


def test_generation_with_kv_cache_equals_without_token_for_token(ours):
    tokens = ours.tok_encode(corpus_text(10_000))
    prompts = [tokens[:5], tokens[100:160], tokens[300:301], tokens[500:530]]
    with_cache = generate(ours.model, prompts, 40, use_cache=True)
    without = generate(ours.model, prompts, 40, use_cache=False)
    assert with_cache == without
    assert all(len(o) == 40 for o in with_cache) and len({tuple(o) for o in with_cache}) == 4
    alone = [generate(ours.model, [p], 40)[0] for p in prompts]  # left padding changes nothing
    assert alone == with_cache
    sampling = SamplingConfig(do_sample=True, temperature=0.8, top_k=50, top_p=0.9)
    a = generate(ours.model, prompts, 20, sampling=sampling, generator=torch.Generator().manual_seed(3))
    b = generate(ours.model, prompts, 20, sampling=sampling, use_cache=False,
                 generator=torch.Generator().manual_seed(3))
    assert a == b and a != [o[:20] for o in with_cache]


def test_generate_until_matches_lm_eval_hf_and_honours_stops(ours, hf):
    text = corpus_text(30_000)
    contexts = [text[i * 700:i * 700 + 200] for i in range(6)]
    gen_kwargs = {"until": ["\n\n"], "max_gen_toks": 24, "do_sample": False}
    reqs = [Instance("generate_until", {}, (c, gen_kwargs), i) for i, c in enumerate(contexts)]
    got = ours.generate_until(reqs, disable_tqdm=True)
    expected = hf.generate_until(reqs, disable_tqdm=True)
    assert got == expected
    assert all("\n\n" not in g for g in got)
    limited = ours.generate_until([Instance("generate_until", {}, (contexts[0], {"until": [], "max_gen_toks": 5}),
                                            0)], disable_tqdm=True)[0]
    longer = generate(ours.model, [ours.tok_encode(contexts[0])], 24)[0]
    assert limited == ours.tok_decode(longer[:5])


def test_registered_and_bad_arguments_are_named(export):
    from lm_eval.api.registry import get_model

    assert get_model("crescent") is CrescentLM
    with pytest.raises(ValueError, match="dtype='float8'"):
        CrescentLM(pretrained=str(export), dtype="float8")
    with pytest.raises(ValueError, match="pretrained=PATH"):
        CrescentLM()
    with pytest.raises(ValueError, match="max_new_tokens=-1"):
        generate(None, [[1]], -1)


def test_batch_size_auto_is_refused_not_silently_replaced(export):
    with pytest.raises(ValueError, match=r"batch_size='auto:4' is not supported: pass a number of rows"):
        CrescentLM(pretrained=str(export), batch_size="auto:4")
    with pytest.raises(ValueError, match=r"batch_size='many' must be a positive integer"):
        CrescentLM(pretrained=str(export), batch_size="many")
    assert CrescentLM(pretrained=str(export), batch_size="3").batch_size == 3


@pytest.mark.slow
def test_lm_eval_cli_evaluates_the_crescent_model(export, tmp_path):
    """`crescent eval lm-eval ...` is lm-eval's own CLI (its argument names, its results file) with our model
    registered; the task is our offline GSM8K definition passed through lm-eval's --include_path."""
    from eval.data import build_eval_data
    from eval.offline_tasks import render_tasks, resolve_tasks

    build_eval_data(tmp_path / "data", gsm8k_test=write_gsm8k(tmp_path / "gsm8k.jsonl"))
    render_tasks(resolve_tasks(["gsm8k"], tmp_path / "data"), tmp_path / "data", tmp_path / "tasks")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", "eval", "lm-eval", "--model", "crescent", "--model_args",
         f"pretrained={export},max_gen_toks=16", "--tasks", "crescent_gsm8k", "--include_path",
         str(tmp_path / "tasks"), "--limit", "3", "--batch_size", "2", "--output_path", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root), "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1",
             "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "crescent ({'pretrained': " in proc.stdout and "|crescent_gsm8k|" in proc.stdout.replace(" ", "")
    (results,) = (tmp_path / "out").rglob("results_*.json")
    doc = json.loads(results.read_text())
    assert doc["config"]["model"] == "crescent" and doc["n-samples"]["crescent_gsm8k"]["effective"] == 3
    assert 0.0 <= doc["results"]["crescent_gsm8k"]["exact_match,strict-match"] <= 1.0


def test_logits_budget_shrinks_batches_without_changing_scores(export, ours):
    reqs = _loglikelihood_requests(40, seed=0)
    small = CrescentLM(pretrained=str(export), batch_size=8, max_logits_bytes=1)  # one row per forward
    rows = [len(b) for b in small._batches([(1,) * 100, (1,) * 50, (1,) * 10])]
    assert rows == [1, 1, 1]
    a = ours.loglikelihood(reqs, disable_tqdm=True)
    b = small.loglikelihood(reqs, disable_tqdm=True)
    assert max(abs(x[0] - y[0]) for x, y in zip(a, b)) < 1e-4


def test_a_chat_answer_ending_at_the_end_of_turn_token_is_returned_without_it(tmp_path):
    """The end-of-turn token stops generation but is not part of the answer (lm-eval's hf model decodes with
    skip_special_tokens=True): a HumanEval completion must not end in `<|im_end|>` when `until` lacks it."""
    from components.checkpoint import save_export
    from components.data.chat import get_template
    from components.data.tokenizer import train_bpe
    from components.model.transformer import build_model

    template = get_template("moonlight")
    tok_dir = tmp_path / "tok"
    tok = train_bpe([corpus_text()], vocab_size=1024, out_dir=tok_dir, special_tokens=template.special_tokens)
    prompt, answer = "def f():\n", "    return 1"
    end = tok.special_token_id("<|im_end|>")
    chain = tok.encode(prompt)[-1:] + tok.encode(answer) + [end]
    assert len(set(chain)) == len(chain)
    # A model that continues the prompt with the answer, then the end of turn: every block's output is zeroed, so
    # the last hidden state is the current token's embedding, a one-hot that the LM head maps to the next token.
    model = build_model(tiny_config(), seed=0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.zero_()
        for k, (current, following) in enumerate(zip(chain, chain[1:])):
            model.model.embed_tokens.weight[current, k] = 1.0
            model.lm_head.weight[following, k] = 10.0
    export = save_export(model, tmp_path / "sft", step=1, tokenizer_dir=tok_dir, chat_template="moonlight")
    lm = CrescentLM(pretrained=str(export), max_gen_toks=16)
    assert generate(lm.model, [lm.tok_encode(prompt)], 16, stop_ids=lm._stop_ids())[0] == chain[1:]  # ends <|im_end|>
    humaneval = {"until": ["\nclass", "\ndef", "\n#", "\nif", "\nprint"], "max_gen_toks": 16, "do_sample": False}
    got = lm.generate_until([Instance("generate_until", {}, (prompt, humaneval), 0)], disable_tqdm=True)
    assert got == [answer]
