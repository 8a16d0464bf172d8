"""The demo corpus: exists on every machine with Python, needs no download, clean licence (PSF).

Two mixtures for the stages:
- `english`: the Python documentation's prose that ships inside the interpreter (`pydoc_data.topics`, the
  language reference topics) plus the docstrings of the standard library's modules, one document per module;
- `code`: the standard library's own source files (tests excluded), a deterministic spread of them chosen by a
  hash of their path until a byte budget is reached.
`build_demo()` writes the raw JSONL, trains the demo tokenizer (byte-level BPE, vocab 4096, EOS id 0, as the
`tiny` model preset expects; the `moonlight` chat template's control tokens reserved at ids 1-5) and builds one
shard set per mixture, plus the demo chat set for fine-tuning (`chat/train`, `chat/val`; see demo_chat.py). A
second call with the same arguments returns at once.
"""
from __future__ import annotations

import ast
import json
import os
import sysconfig
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from .chat import get_template
from .chat_build import build_chat_shards
from .demo_chat import chat_records
from .shards import MANIFEST, build_shards
from .sources import iter_documents
from .tokenizer import load_tokenizer, train_bpe

DEFAULT_DIR = "data/demo"
CHAT_TEMPLATE = "moonlight"
STAMP = "demo.json"
_TEST_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


@dataclass
class DemoPaths:
    root: Path
    tokenizer: Path
    sets: dict[str, Path] = field(default_factory=dict)
    chat: dict[str, Path] = field(default_factory=dict)  # the chat set for fine-tuning: train, val


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not _TEST_DIRS & set(p.relative_to(root).parts)]
    # A spread over the whole library, not its alphabetical head: order by a hash of the relative path.
    return sorted(files, key=lambda p: (zlib.crc32(p.relative_to(root).as_posix().encode()), p.as_posix()))


def english_documents(budget: int) -> list[str]:
    """Documentation prose: pydoc topics first, then module docstrings, up to `budget` characters."""
    import pydoc_data.topics as topics

    docs = [topics.topics[key] for key in sorted(topics.topics)]
    size = sum(map(len, docs))
    for path in _stdlib_files():
        if size >= budget:
            break
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue
        nodes = [n for n in ast.walk(tree)
                 if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)]
        parts = [d for n in nodes if (d := ast.get_docstring(n)) and len(d) > 40]
        if parts:
            docs.append("\n\n".join(parts))
            size += len(docs[-1])
    return docs


def code_documents(budget: int) -> list[str]:
    docs, size = [], 0
    for path in _stdlib_files():
        if size >= budget:
            break
        text = path.read_bytes().decode("utf-8", errors="replace")
        docs.append(text)
        size += len(text)
    return docs


def _write_jsonl(path: Path, docs: list[str]) -> None:
    _write_records(path, [{"text": doc} for doc in docs])


def _write_records(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def build_demo(out_dir: str | os.PathLike = DEFAULT_DIR, *, vocab_size: int = 4096, seq_len: int = 256,
               shard_samples: int = 256, seed: int = 0, workers: int = 1, english_chars: int = 1_500_000,
               code_chars: int = 2_000_000, chat_conversations: int = 4400, force: bool = False,
               progress: bool = False) -> DemoPaths:
    """Build (or find already built) the demo tokenizer, the `english` and `code` shard sets and the chat set."""
    root = Path(out_dir)
    paths = DemoPaths(root, root / "tokenizer", {"english": root / "english", "code": root / "code"},
                      {"train": root / "chat" / "train", "val": root / "chat" / "val"})
    params = {"vocab_size": vocab_size, "seq_len": seq_len, "shard_samples": shard_samples, "seed": seed,
              "english_chars": english_chars, "code_chars": code_chars, "chat_template": CHAT_TEMPLATE,
              "chat_conversations": chat_conversations}
    stamp = root / STAMP
    built = [*paths.sets.values(), *paths.chat.values()]
    if not force and stamp.exists() and json.loads(stamp.read_text()).get("params") == params and all(
            (p / MANIFEST).exists() for p in built) and (paths.tokenizer / "tokenizer.json").exists():
        return paths

    (root / "raw").mkdir(parents=True, exist_ok=True)
    raw = {"english": root / "raw" / "english.jsonl", "code": root / "raw" / "code.jsonl"}
    _write_jsonl(raw["english"], english_documents(english_chars))
    _write_jsonl(raw["code"], code_documents(code_chars))
    texts = [doc for source in raw.values() for doc in iter_documents([str(source)])]
    tok = train_bpe(texts, vocab_size=vocab_size, out_dir=paths.tokenizer,
                    special_tokens=get_template(CHAT_TEMPLATE).special_tokens)
    assert load_tokenizer(paths.tokenizer).fingerprint == tok.fingerprint
    manifests = {}
    for name, source in raw.items():
        manifests[name] = build_shards([str(source)], paths.sets[name], paths.tokenizer, seq_len=seq_len,
                                       shard_samples=shard_samples, seed=seed, workers=workers, name=name,
                                       progress=progress)
    for split, records in chat_records(_stdlib_files(), chat_conversations).items():
        source = root / "raw" / f"chat-{split}.jsonl"
        _write_records(source, records)
        manifests[f"chat/{split}"] = build_chat_shards([str(source)], paths.chat[split], paths.tokenizer,
                                                       template=CHAT_TEMPLATE, seq_len=seq_len, shard_samples=64,
                                                       seed=seed, name=f"chat-{split}")
    summary = {name: {"samples": m["samples"], "tokens": m["tokens"], "shards": len(m["shards"])}
               for name, m in manifests.items()}
    stamp.write_text(json.dumps({"params": params, "tokenizer": tok.fingerprint, "sets": summary}, indent=2) + "\n")
    return paths
