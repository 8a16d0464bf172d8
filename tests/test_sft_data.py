"""Chat data for SFT: template and loss mask, bad records, packing into segments, the shard format, the stream's
epochs and resume, and `crescent data build --format chat`. Real tokenizers, real tar shards, real parquet."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import train_helpers as th
from test_eval_fixtures import corpus_text
from test_s3 import BUCKET, aws, s3  # noqa: F401  (the S3 server fixtures)

from components.data.chat import IGNORE_INDEX, ChatEncoder, get_template, model_fields, pack_lengths
from components.data.chat_build import ChatReport, build_chat_shards, iter_conversations
from components.data.loader import StreamLoader
from components.data.stream import MixtureStream
from components.data.tokenizer import load_tokenizer, train_bpe

TEMPLATE = get_template("moonlight")
CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What does len do?"},
    {"role": "assistant", "content": "It returns the number of items."},
    {"role": "user", "content": "And sorted?"},
    {"role": "assistant", "content": "It returns a new sorted list."},
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_bpe([corpus_text(100_000)], vocab_size=600, out_dir=out, special_tokens=TEMPLATE.special_tokens)
    return out


@pytest.fixture(scope="module")
def encoder(tokenizer_dir):
    return ChatEncoder(load_tokenizer(tokenizer_dir), "moonlight")


def _records(n: int, seed: int = 0) -> list[dict]:
    """Conversations of varied length (1-3 exchanges, optional system prompt) from real text."""
    text = corpus_text(200_000).split()
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        messages = [{"role": "system", "content": "Be brief."}] if k % 3 == 0 else []
        for _ in range(1 + k % 3):
            a = int(rng.integers(0, len(text) - 80))
            messages.append({"role": "user", "content": " ".join(text[a:a + int(rng.integers(3, 12))])})
            messages.append({"role": "assistant", "content": " ".join(text[a + 12:a + 12 + int(rng.integers(4, 30))])})
        out.append({"messages": messages, "id": f"c{k}"})
    return out


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_template_renders_moonlight_turns_and_its_jinja_is_the_same_text():
    from jinja2 import Environment

    text = TEMPLATE.render(CONVERSATION[:3], add_generation_prompt=True)
    assert text == ("<|im_system|>system<|im_middle|>You answer briefly.<|im_end|>"
                    "<|im_user|>user<|im_middle|>What does len do?<|im_end|>"
                    "<|im_assistant|>assistant<|im_middle|>It returns the number of items.<|im_end|>"
                    "<|im_assistant|>assistant<|im_middle|>")
    jinja = Environment().from_string(TEMPLATE.jinja())
    for prompt in (True, False):
        assert jinja.render(messages=CONVERSATION, add_generation_prompt=prompt) == TEMPLATE.render(CONVERSATION, prompt)


def test_only_assistant_content_and_its_end_token_are_targets(encoder):
    ids, target = encoder.encode(CONVERSATION)
    tok, end = encoder.tokenizer, encoder.special_ids["<|im_end|>"]
    assert tok.decode(ids.tolist()) == TEMPLATE.render(CONVERSATION)
    # The targets are exactly the two answers, each followed by its end-of-turn token.
    pieces, run = [], []
    for token, is_target in zip(ids.tolist(), target.tolist()):
        if is_target:
            run.append(token)
        elif run:
            pieces.append(run)
            run = []
    pieces.append(run) if run else None
    assert [p[-1] for p in pieces] == [end, end]
    assert [tok.decode(p[:-1]) for p in pieces] == [CONVERSATION[2]["content"], CONVERSATION[4]["content"]]
    # Headers, system and user turns are not targets.
    assert target.sum() == sum(len(tok.encode(m["content"])) + 1 for m in CONVERSATION if m["role"] == "assistant")


def test_tokenizer_without_the_template_tokens_is_refused(tmp_path):
    plain = train_bpe([corpus_text(50_000)], vocab_size=300, out_dir=tmp_path)
    with pytest.raises(ValueError, match=r"no special token\(s\) \['<\|im_system\|>'.*chat template 'moonlight'"):
        ChatEncoder(plain, "moonlight")
    with pytest.raises(ValueError, match="chat template 'chatml' is unknown; choose one of \\['moonlight'\\]"):
        get_template("chatml")


def test_tiktoken_tokenizer_maps_the_template_tokens_to_reserved_ids(tmp_path):
    import base64

    ranks = {bytes([i]): i for i in range(256)}
    (tmp_path / "tiktoken.model").write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    enc = ChatEncoder(load_tokenizer(tmp_path / "tiktoken.model"), "moonlight")
    # Kimi's ids relative to the ranks (Moonlight: 163584 + offset)
    assert {t: i - 256 for t, i in enc.special_ids.items()} == {
        "<|im_system|>": 10, "<|im_user|>": 3, "<|im_assistant|>": 4, "<|im_middle|>": 17, "<|im_end|>": 2}
    ids, _ = enc.encode(CONVERSATION)
    assert enc.encode_text(TEMPLATE.render(CONVERSATION)) == ids.tolist()


def test_bad_records_are_skipped_and_counted_by_reason(tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad = {
        "missing_role": {"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]},
        "unknown_role": {"messages": [{"role": "tool", "content": "hi"}, {"role": "assistant", "content": "x"}]},
        "no_assistant_turn": {"messages": [{"role": "user", "content": "hi"}]},
        "empty_content": {"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}]},
        "non_string_content": {"messages": [{"role": "user", "content": ["hi"]}, {"role": "assistant",
                                                                              "content": "x"}]},
        "no_messages": {"text": "a pretraining record"},
        "not_an_object": [1, 2],
        "not_json": "{not json",
    }
    path = _write_jsonl(tmp_path / "mixed.jsonl", [good, *bad.values(), good])
    report = ChatReport()
    assert len(list(iter_conversations([str(path)], report))) == 2
    assert report.skipped == {reason: 1 for reason in bad}
    assert report.records == len(bad) + 2
    assert report.examples["unknown_role"] == [f"{path}:3: messages[0].role='tool', allowed: "
                                               "('system', 'user', 'assistant')"]


def test_a_file_without_one_valid_record_is_a_clear_error(tmp_path, tokenizer_dir):
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "hi"}]},
                                                 {"messages": [{"role": "bot", "content": "x"}]}])
    with pytest.raises(ValueError) as err:
        build_chat_shards([str(path)], tmp_path / "out", tokenizer_dir)
    assert str(err.value).startswith(f"{path}: no valid chat record (1 no_assistant_turn, 1 unknown_role)")
    assert not (tmp_path / "out").exists()  # nothing written


def test_best_fit_packing_places_every_conversation_once_within_capacity():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 120, size=500)
    groups = pack_lengths(lengths, 129)
    assert sorted(i for g in groups for i in g) == list(range(500))
    assert all(sum(lengths[g]) <= 129 for g in groups)
    # A lower bound for any packing: the slots needed, and one sample per conversation longer than half of one.
    bound = max(-(-lengths.sum() // 129), (lengths > 64).sum())
    assert bound == 263 and len(groups) == 264
    assert pack_lengths(lengths, 129, "none") == [[i] for i in range(500)]


def test_rows_restart_positions_and_never_target_across_a_boundary(encoder):
    convs = encoder.encode_many([CONVERSATION[1:3], CONVERSATION])
    from components.data.chat import pack_rows, row_dtype

    seq_len = sum(len(ids) for ids, _ in convs) + 3  # two conversations, then 4 padding slots
    rows = pack_rows(convs, [[0, 1]], seq_len, 0, row_dtype(600, seq_len))
    f = model_fields(rows, seq_len)
    a, b = len(convs[0][0]), len(convs[1][0])
    assert f["position_ids"][0].tolist() == [*range(a), *range(b), *range(seq_len - a - b)]
    assert f["segment_ids"][0].tolist() == [1] * a + [2] * b + [0] * (seq_len - a - b)
    targets = f["targets"][0]
    expected = np.full(seq_len, IGNORE_INDEX)
    for start, (ids, target) in zip((0, a), convs):
        for t in range(1, len(ids)):
            if target[t]:
                expected[start + t - 1] = ids[t]
    assert targets.tolist() == expected.tolist()
    assert targets[a - 1] == IGNORE_INDEX  # the last token of conversation 1 does not predict conversation 2
    assert f["chat_tokens"][0].tolist() == [a + b, int(convs[0][1][1:].sum() + convs[1][1][1:].sum())]


def test_too_long_conversations_are_truncated_or_dropped_and_counted(tmp_path, tokenizer_dir):
    long_answer = " ".join(["word"] * 200)
    records = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": long_answer}]},
               {"messages": [{"role": "user", "content": " ".join(["long question"] * 100)},
                             {"role": "assistant", "content": "a"}]},
               {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "short"}]}]
    path = _write_jsonl(tmp_path / "c.jsonl", records)
    report = ChatReport()
    m = build_chat_shards([str(path)], tmp_path / "t", tokenizer_dir, seq_len=63, report=report)
    assert (report.truncated, report.dropped_no_target, m["chat"]["conversations"]) == (1, 1, 2)
    report = ChatReport()
    m = build_chat_shards([str(path)], tmp_path / "d", tokenizer_dir, seq_len=63, too_long="drop", report=report)
    assert (report.dropped_too_long, m["chat"]["conversations"]) == (2, 1)
    assert m["input"]["dropped_too_long"] == 2


def _stream(location, **kw) -> MixtureStream:
    return MixtureStream({"sft": str(location)}, {"sft": 1.0}, **{"micro_batch_size": 4, "num_streams": 8, **kw})


@pytest.fixture(scope="module")
def chat_set(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("chat")
    path = _write_jsonl(root / "train.jsonl", _records(240))
    manifest = build_chat_shards([str(path)], root / "set", tokenizer_dir, seq_len=127, shard_samples=16, seed=3)
    return {"root": root, "set": root / "set", "manifest": manifest, "source": path}


def test_the_shard_format_records_segments_and_mask_and_the_loader_yields_them(chat_set):
    m = chat_set["manifest"]
    assert (m["kind"], m["sample_ext"], m["seq_len"], m["sample_tokens"], m["dtype"]) == ("chat", "chat", 127, 256,
                                                                                           "uint16")
    assert m["chat"]["conversations"] == 240 and m["chat"]["packing_efficiency"] > 0.9
    n = m["samples"]
    per_sample = {int(s["sample_id"]): s for s in _stream(chat_set["set"], stop_samples=n)}
    assert sorted(per_sample) == list(range(n))
    batches = list(StreamLoader(_stream(chat_set["set"], stop_samples=n, num_workers=2), group=3))
    targets = 0
    for batch in batches:
        for r, sid in enumerate(batch["sample_id"].tolist()):
            for key in ("input_ids", "targets", "position_ids", "segment_ids"):
                assert torch.equal(batch[key][r].long(), per_sample[sid][key]), key
        assert batch["chat_tokens"].tolist() == [int((batch["segment_ids"] > 0).sum()),
                                                 int((batch["targets"] != IGNORE_INDEX).sum())]
        targets += int(batch["chat_tokens"][1])
    assert targets == m["chat"]["target_tokens"]  # every sample once, every target counted once


def test_a_ranks_shorter_chat_share_ends_with_empty_micro_batches_of_the_same_fields(chat_set):
    """9 held-out samples on 2 ranks of micro-batches of 4: rank 0 reads 5 (2 micro-batches), rank 1 reads 4 and
    ends with an empty one, with every chat field and no targets, so both run 2 forwards (FSDP2)."""
    ranks = [list(StreamLoader(_stream(chat_set["set"], stop_samples=9, rank=r, world_size=2))) for r in range(2)]
    assert [[len(b["index"]) for b in rank] for rank in ranks] == [[4, 1], [4, 0]]
    empty, full = ranks[1][1], ranks[1][0]
    assert empty.keys() == full.keys()
    for key in ("input_ids", "targets", "position_ids", "segment_ids"):
        assert empty[key].shape == (0, 127) and empty[key].dtype == full[key].dtype, key
    assert empty["chat_tokens"].tolist() == [0, 0]


def test_epochs_are_exact_reshuffled_as_a_pure_function_of_seed_and_epoch(chat_set):
    n = chat_set["manifest"]["samples"]
    ids = [int(s["sample_id"]) for s in _stream(chat_set["set"], stop_samples=3 * n)]
    epochs = [ids[e * n:(e + 1) * n] for e in range(3)]
    assert all(sorted(e) == list(range(n)) for e in epochs)  # each epoch reads every sample exactly once
    assert epochs[0] != epochs[1] != epochs[2]  # a fresh order each epoch
    again = [int(s["sample_id"]) for s in _stream(chat_set["set"], stop_samples=3 * n, num_streams=16)]
    assert again == ids  # the order does not depend on the stream layout, only on (seed, epoch)
    other = [int(s["sample_id"]) for s in _stream(chat_set["set"], stop_samples=n, seed=1)]
    assert other != epochs[0] and sorted(other) == list(range(n))


def test_resume_mid_epoch_continues_with_the_same_samples(chat_set):
    n = chat_set["manifest"]["samples"]
    whole = [int(i) for b in StreamLoader(_stream(chat_set["set"], stop_samples=2 * n)) for i in b["sample_id"]]
    cut = n // 2 + 4  # mid-epoch, a micro-batch boundary
    resumed = [int(i) for b in StreamLoader(_stream(chat_set["set"], stop_samples=2 * n, consumed_samples=cut))
               for i in b["sample_id"]]
    assert resumed == whole[cut:]


def test_chat_and_token_sets_do_not_share_a_stream(chat_set, tmp_path, tokenizer_dir):
    from components.data.shards import build_shards

    (tmp_path / "doc.txt").write_text(corpus_text(20_000))
    build_shards([str(tmp_path / "doc.txt")], tmp_path / "text", tokenizer_dir, seq_len=127, shard_samples=16)
    with pytest.raises(ValueError, match="chat sets and token sets cannot share a stream"):
        MixtureStream({"sft": str(chat_set["set"]), "text": str(tmp_path / "text")}, {"sft": 1.0})


def test_parquet_records_as_datasets_exports_them(tmp_path, tokenizer_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = _records(30, seed=2)
    pq.write_table(pa.table({"id": [r["id"] for r in records], "messages": [r["messages"] for r in records],
                             "source": ["test"] * 30}), tmp_path / "train.parquet")
    _write_jsonl(tmp_path / "train.jsonl", records)
    a = build_chat_shards([str(tmp_path / "train.parquet")], tmp_path / "a", tokenizer_dir, seq_len=127)
    b = build_chat_shards([str(tmp_path / "train.jsonl")], tmp_path / "b", tokenizer_dir, seq_len=127)
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]


def test_padding_only_batches_hold_one_conversation_each(chat_set, tokenizer_dir, tmp_path):
    m = build_chat_shards([str(chat_set["source"])], tmp_path / "padded", tokenizer_dir, seq_len=127,
                          packing="none")
    assert m["samples"] == 240 and m["chat"]["packing_efficiency"] < chat_set["manifest"]["chat"]["packing_efficiency"]
    batch = next(iter(StreamLoader(_stream(tmp_path / "padded", stop_samples=8))))
    assert "segment_ids" not in batch and "position_ids" not in batch  # plain causal attention is exact here
    assert int((batch["targets"] != IGNORE_INDEX).sum()) == int(batch["chat_tokens"][1])


def test_cli_builds_a_chat_set_and_reports_what_it_skipped(tmp_path, tokenizer_dir):
    path = _write_jsonl(tmp_path / "c.jsonl", [*_records(20), {"messages": [{"role": "user", "content": "x"}]}])
    result = th.crescent("data", "build", "--format", "chat", "--source", str(path), "--out", str(tmp_path / "set"),
                         "--tokenizer", str(tokenizer_dir), "--seq-len", "127", "--quiet", cwd=tmp_path)
    assert "20 conversations" in result.stdout and "skipped no assistant turn: 1" in result.stderr
    assert json.loads((tmp_path / "set" / "manifest.json").read_text())["kind"] == "chat"
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "x"}]}])
    result = th.crescent("data", "build", "--format", "chat", "--source", str(bad), "--out", str(tmp_path / "b"),
                         "--tokenizer", str(tokenizer_dir), cwd=tmp_path, check=False)
    assert result.returncode == 2 and f"{bad}: no valid chat record (1 no_assistant_turn)" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.usefixtures("aws")
def test_chat_records_and_sets_in_object_storage(tmp_path, tokenizer_dir):
    """tulu-style JSONL read from a real S3-protocol server (moto, tests/test_s3.py), the chat set written back
    into the bucket: the same shard bytes as a local build, streamed back to the same batches."""
    from components.data import remote

    local = _write_jsonl(tmp_path / "chat.jsonl", _records(40, seed=4))
    url = f"s3://{BUCKET}/raw/chat.jsonl"
    remote.write_bytes(url, local.read_bytes())
    on_s3 = build_chat_shards([url], f"s3://{BUCKET}/sets/chat", tokenizer_dir, seq_len=127, shard_samples=8)
    here = build_chat_shards([str(local)], tmp_path / "chat", tokenizer_dir, seq_len=127, shard_samples=8)
    assert [s["sha256"] for s in on_s3["shards"]] == [s["sha256"] for s in here["shards"]]
    n = here["samples"]
    a = [b["input_ids"] for b in StreamLoader(_stream(f"s3://{BUCKET}/sets/chat", stop_samples=n))]
    b = [b["input_ids"] for b in StreamLoader(_stream(tmp_path / "chat", stop_samples=n))]
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
