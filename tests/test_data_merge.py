"""A corpus built in slices (one per Indexed Job index) and merged reads as one shard set."""
import json
import sysconfig
from pathlib import Path

import pytest

from components.data.merge import merge_manifests
from components.data.shards import build_shards
from components.data.stream import MixtureStream
from components.data.tokenizer import train_bpe


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    lines = []
    for name in ["heapq.py", "bisect.py", "colorsys.py", "fnmatch.py", "shlex.py"]:
        lines.append(json.dumps({"text": (stdlib / name).read_text()}))
    for i in range(40):
        lines.append(json.dumps({"text": f"document {i}: " + " ".join(f"w{i * j % 97}" for j in range(80))}))
    (root / "docs.jsonl").write_text("\n".join(lines) + "\n")
    train_bpe([str(root / "docs.jsonl")], 320, root / "tok")
    return root


def test_slices_are_disjoint_cover_everything_and_merge_into_one_set(source, tmp_path):
    full = build_shards([str(source / "docs.jsonl")], tmp_path / "full", source / "tok", seq_len=32, shard_samples=16)
    parts = [build_shards([str(source / "docs.jsonl")], tmp_path / "merged" / f"part-{i}", source / "tok", seq_len=32,
                          shard_samples=16, num_slices=3, slice_index=i) for i in range(3)]
    assert sum(p["documents"] for p in parts) == full["documents"] == 45
    assert [p["documents"] for p in parts] == [15, 15, 15]
    merged = merge_manifests(tmp_path / "merged", 3)
    assert merged["samples"] == sum(p["samples"] for p in parts)
    assert all(s["file"].startswith(f"part-{s['file'][5]}/") for s in merged["shards"])
    def contents(location: str, n: int) -> list[tuple]:
        stream = MixtureStream({"s": location}, {"s": 1.0}, stop_samples=n, num_streams=1)
        return sorted(tuple(item["input_ids"].tolist()) for item in stream)

    from_parts = sorted(sum((contents(str(tmp_path / "merged" / f"part-{i}"), p["samples"])
                             for i, p in enumerate(parts)), []))
    assert contents(str(tmp_path / "merged"), merged["samples"]) == from_parts  # every sample of every part, once


def test_merge_refuses_parts_that_do_not_agree(source, tmp_path):
    build_shards([str(source / "docs.jsonl")], tmp_path / "part-0", source / "tok", seq_len=32, shard_samples=16,
                 num_slices=2, slice_index=0)
    build_shards([str(source / "docs.jsonl")], tmp_path / "part-1", source / "tok", seq_len=16, shard_samples=16,
                 num_slices=2, slice_index=1)
    with pytest.raises(ValueError, match="part-1 has seq_len=16"):
        merge_manifests(tmp_path, 2)


def test_merge_without_wait_names_the_missing_part(tmp_path):
    with pytest.raises(FileNotFoundError, match="part-0"):
        merge_manifests(tmp_path, 2)


def test_bad_slice_index_is_rejected(source, tmp_path):
    with pytest.raises(ValueError, match=r"slice_index=3 must be in \[0, num_slices=3\)"):
        build_shards([str(source / "docs.jsonl")], tmp_path / "x", source / "tok", num_slices=3, slice_index=3)
