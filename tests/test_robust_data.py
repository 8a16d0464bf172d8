"""Data builds on messy sources: binary files, non-UTF-8 text, malformed JSONL, records without text, empty files
are skipped or decoded, counted with their reasons in the manifest, and a failed build leaves no --out behind.
Real files (the interpreter's own binary as the "executable"), a real BPE, real shard sets."""
from __future__ import annotations

import json
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import train_helpers as th

from components.data.shards import build_shards
from components.data.tarshard import decode_shard
from components.data.tokenizer import train_bpe

TEXT = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()
ACCENTED = "Le café du coin sert une crème brûlée – naïve et déjà célèbre, à 5 €.\n" * 40


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_bpe([TEXT, ACCENTED], 300, out)
    return str(out)


def _tokens(out: Path) -> np.ndarray:
    """Every sample of a shard set in sample-id order (independent of the shuffle)."""
    manifest = json.loads((out / "manifest.json").read_text())
    rows = {}
    for entry in manifest["shards"]:
        shard = decode_shard((out / entry["file"]).read_bytes(), entry["samples"], manifest["sample_tokens"],
                             manifest["dtype"])
        rows.update(zip(shard.sample_ids[:shard.valid].tolist(), shard.tokens[:shard.valid].tolist(), strict=True))
    return np.array([rows[k] for k in sorted(rows)])


def _build(sources, out, tokenizer, **kwargs) -> dict:
    return build_shards([str(s) for s in sources], out, tokenizer, seq_len=32, shard_samples=16, **kwargs)


def test_binary_files_in_a_text_source_are_skipped_and_counted(tmp_path, tokenizer):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text(TEXT)
    (src / "python.bin").write_bytes(Path(sys.executable).read_bytes()[:65536])  # an ELF executable
    (src / "noise.dat").write_bytes(bytes(range(1, 32)) * 200)  # control bytes, no NUL
    manifest = _build([src], tmp_path / "out", tokenizer)
    assert manifest["documents"] == 1
    assert manifest["input"]["skipped"] == {"binary_files": {"count": 2, "first": [
        f"{src}/noise.dat: binary (77% control bytes)", f"{src}/python.bin: binary (NUL bytes)"]}}
    clean = _build([src / "a.txt"], tmp_path / "clean", tokenizer)
    assert manifest["samples"] == clean["samples"]
    assert np.array_equal(_tokens(tmp_path / "out"), _tokens(tmp_path / "clean"))


def test_non_utf8_text_is_decoded_with_the_declared_fallback_and_counted(tmp_path, tokenizer):
    (tmp_path / "latin.txt").write_bytes(ACCENTED.encode("cp1252"))
    (tmp_path / "utf8.txt").write_text(ACCENTED, encoding="utf-8")
    manifest = _build([tmp_path / "latin.txt"], tmp_path / "out", tokenizer)
    assert manifest["input"]["decoded_with"] == {"cp1252": {"count": 1, "first": [str(tmp_path / "latin.txt")]}}
    _build([tmp_path / "utf8.txt"], tmp_path / "ref", tokenizer)
    assert np.array_equal(_tokens(tmp_path / "out"), _tokens(tmp_path / "ref"))  # no replacement characters
    with pytest.raises(ValueError, match=r"sources hold 0 tokens.*skipped: 1 undecodable files"):
        _build([tmp_path / "latin.txt"], tmp_path / "strict", tokenizer, encodings=("utf-8",))
    assert not (tmp_path / "strict").exists()


def test_malformed_jsonl_lines_and_records_without_text_are_skipped_naming_file_and_line(tmp_path, tokenizer):
    lines = [json.dumps({"text": TEXT[:3000]}), json.dumps({"text": TEXT[3000:6000]}), '{"text": "cut off',
             json.dumps({"text": TEXT[6000:9000]}), json.dumps({"body": "no text field"}), json.dumps({"text": None}),
             json.dumps(["a", "list"]), json.dumps({"text": TEXT[9000:]})]
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(lines) + "\n")
    manifest = _build([data], tmp_path / "out", tokenizer)
    assert manifest["documents"] == 4
    bad = manifest["input"]["skipped"]["bad_records"]
    assert bad["count"] == 4
    assert bad["first"][0].startswith(f"{data}:3: not JSON (Unterminated string")
    assert bad["first"][1:] == [f"{data}:5: no field 'text' (fields: ['body'])",
                                f"{data}:6: field 'text' is null, not a string",
                                f"{data}:7: a JSON list, not an object"]
    with pytest.raises(ValueError, match=f"^{data}:3: not JSON .*use --on-bad-record skip"):
        _build([data], tmp_path / "strict", tokenizer, on_bad_record="fail")


def test_empty_source_files_are_reported(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text(TEXT)
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    manifest = _build([tmp_path / "a.txt", tmp_path / "empty.txt", tmp_path / "blank.jsonl"], tmp_path / "out",
                      tokenizer)
    assert manifest["input"]["files"] == 3 and manifest["documents"] == 1
    assert manifest["input"]["skipped"] == {"empty_files": {"count": 2, "first": [
        f"{tmp_path}/empty.txt: no text", f"{tmp_path}/blank.jsonl: no text"]}}


def test_the_build_command_prints_the_first_reasons_and_a_failed_build_leaves_no_out(tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join([json.dumps({"text": TEXT})] * 3 + ["not json"]) + "\n")
    (tmp_path / "python.bin").write_bytes(Path(sys.executable).read_bytes()[:65536])
    ok = th.crescent("data", "build", "--source", str(data), "--source", str(tmp_path / "python.bin"), "--out",
                     str(tmp_path / "out"), "--vocab-size", "300", "--seq-len", "32", "--quiet", cwd=tmp_path)
    assert f"crescent data build: skipped binary files: 1\ncrescent data build:   {tmp_path}/python.bin: binary " \
           f"(NUL bytes)\ncrescent data build: skipped bad records: 1\ncrescent data build:   {data}:4: not JSON " \
           in ok.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["input"]["skipped"]["bad_records"]["count"] == 1

    failed = th.crescent("data", "build", "--source", str(data), "--out", str(tmp_path / "new"), "--vocab-size",
                         "300", "--on-bad-record", "fail", cwd=tmp_path, check=False)
    assert failed.returncode == 2
    assert failed.stderr.strip().splitlines()[-1].startswith(f"crescent data build: {data}:4: not JSON (")
    assert "Traceback" not in failed.stderr
    assert not (tmp_path / "new").exists()
