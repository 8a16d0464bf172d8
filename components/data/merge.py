"""Merge the manifests of shard sets built in parts (one per Indexed Job index) into one shard set.

`ROOT/part-0/manifest.json ... ROOT/part-{N-1}/manifest.json` -> `ROOT/manifest.json` whose shards are listed with
paths relative to ROOT (`part-i/shard-....tar`), so the stream reads the parts as one set. The parts must agree on
everything that makes samples compatible: seq_len, dtype, tokenizer fingerprint.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from .shards import MANIFEST

MUST_AGREE = ("seq_len", "dtype", "sample_tokens")


def part_dir(root: str | Path, index: int) -> Path:
    return Path(root) / f"part-{index}"


def merge_manifests(root: str | Path, parts: int, wait: bool = False, timeout_s: float = 86_400.0,
                    poll_s: float = 10.0) -> dict:
    """Write ROOT/manifest.json from the parts' manifests; with `wait`, poll until every part has one."""
    if not isinstance(parts, int) or parts < 1:
        raise ValueError(f"parts={parts!r} must be an integer >= 1")
    root = Path(root)
    paths = [part_dir(root, i) / MANIFEST for i in range(parts)]
    deadline = time.monotonic() + timeout_s
    while True:
        missing = [p for p in paths if not p.exists()]
        if not missing:
            break
        if not wait or time.monotonic() > deadline:
            raise FileNotFoundError(f"merge-manifests: {len(missing)} of {parts} parts have no manifest yet, e.g. "
                                    f"{missing[0]}")
        time.sleep(poll_s)
    manifests = [json.loads(p.read_text()) for p in paths]
    first = manifests[0]
    for i, m in enumerate(manifests[1:], 1):
        for key in MUST_AGREE:
            if m.get(key) != first.get(key):
                raise ValueError(f"merge-manifests: part-{i} has {key}={m.get(key)!r}, part-0 has {first.get(key)!r}")
        if m["tokenizer"].get("fingerprint") != first["tokenizer"].get("fingerprint"):
            raise ValueError(f"merge-manifests: part-{i} was built with another tokenizer than part-0")
    merged = {k: v for k, v in first.items() if k not in ("shards", "samples", "tokens", "documents",
                                                           "dropped_tokens", "slice", "sources", "name")}
    merged["name"] = root.resolve().name
    merged["parts"] = parts
    merged["sources"] = sorted({s for m in manifests for s in m.get("sources", [])})
    merged["shards"] = [{**shard, "file": f"part-{i}/{shard['file']}"}
                        for i, m in enumerate(manifests) for shard in m["shards"]]
    for key in ("samples", "tokens", "documents", "dropped_tokens"):
        merged[key] = sum(int(m.get(key, 0)) for m in manifests)
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(merged, indent=2) + "\n")
    tmp.replace(root / MANIFEST)
    return merged
