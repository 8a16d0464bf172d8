"""`crescent data ...` and the demo corpus, through the functions the CLI and the training app call."""
import ast
import json
import pydoc_data.topics

from app.commands.data import main
from components.data.demo import build_demo
from components.data.shards import read_manifest
from components.data.tokenizer import load_tokenizer


def test_demo_builds_two_mixtures_once(tmp_path):
    out = tmp_path / "demo"
    paths = build_demo(out, vocab_size=512, seq_len=64, english_chars=40_000, code_chars=40_000)
    tok = load_tokenizer(paths.tokenizer)
    assert tok.eos_id == 0 and tok.vocab_size == 512
    manifests = {name: read_manifest(str(p)) for name, p in paths.sets.items()}
    assert set(manifests) == {"english", "code"}
    assert all(m["tokenizer"]["fingerprint"] == tok.fingerprint and m["samples"] > 50 for m in manifests.values())

    raw = {name: [json.loads(line)["text"] for line in (out / "raw" / f"{name}.jsonl").open()]
           for name in ("english", "code")}
    assert raw["english"][0] == pydoc_data.topics.topics[sorted(pydoc_data.topics.topics)[0]]  # documentation prose
    assert all(ast.parse(doc) for doc in raw["code"]) and len(raw["code"]) >= 3              # real Python source
    assert manifests["english"]["sources"] == [str(out / "raw" / "english.jsonl")]
    shard = out / "english" / "shard-000000.tar"
    before = (shard.stat().st_mtime_ns, (out / "demo.json").read_text())
    again = build_demo(out, vocab_size=512, seq_len=64, english_chars=40_000, code_chars=40_000)
    assert again == paths and (shard.stat().st_mtime_ns, (out / "demo.json").read_text()) == before


def test_cli_tokenizer_build_inspect_and_schedule(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(30):
        (src / f"{i}.md").write_text(f"Note {i}: the cat sat on mat number {i * 13}.\n" * (3 + i % 4))
    assert main(["tokenizer", "--source", str(src), "--vocab-size", "300", "--out", str(tmp_path / "tok")]) == 0
    assert main(["build", "--source", f"{src}/*.md", "--out", str(tmp_path / "set"), "--tokenizer",
                 str(tmp_path / "tok"), "--seq-len", "32", "--shard-samples", "8", "--seed", "2", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "set"), "--verify", "--tokenizer", str(tmp_path / "tok")]) == 0
    text = capsys.readouterr().out
    info = json.loads(text[: text.index("--- first sample")])
    assert info["verified_shards"] == info["shards"] > 1 and info["corrupt_shards"] == []
    assert info["tokenizer_matches"] is True and info["seq_len"] == 32
    shard = tmp_path / "set" / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:-600])
    assert main(["inspect", str(tmp_path / "set"), "--verify"]) == 1
    bad = json.loads(capsys.readouterr().out)["corrupt_shards"]
    assert [b["file"] for b in bad] == ["shard-000001.tar"] and bad[0]["sha256_ok"] is False
    assert main(["build", "--source", str(tmp_path / "missing"), "--out", str(tmp_path / "x"),
                 "--tokenizer", str(tmp_path / "tok")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["schedule", "moonlight", "--at", "33e9", "--plot", str(tmp_path / "s.png")]) == 0
    assert "lr=0.00042" in capsys.readouterr().out and (tmp_path / "s.png").exists()
