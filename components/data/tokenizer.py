"""Tokenizers: one small interface, two backends, no download at run time.

- `HFTokenizer`: a byte-level BPE in HF `tokenizers` format (a directory with `tokenizer.json`); `train_bpe`
  trains one locally (the offline default; the `tiny` model preset expects vocab 4096 with EOS at id 0).
- `TiktokenTokenizer`: a tiktoken-format BPE file (one `base64(token) rank` per line), the format of Moonlight's
  `tiktoken.model`: ranks 0..N-1, then 256 reserved special tokens from id N (Moonlight: N = 163584,
  [BOS]=163584, [EOS]=163585, <|im_end|>=163586; moonlight.md §2.2).

Chat templates (components/data/chat.py) need their control tokens as special tokens: `train_bpe(...,
special_tokens=...)` reserves them (the demo tokenizer does), and a bare tiktoken file gets Kimi's chat tokens at
their reserved ids; `special_token_id(name)` finds them.

Both write a small sidecar `crescent_tokenizer.json` on `save()` (backend, eos/bos tokens, pattern) so that
`load_tokenizer(directory)` gives back an identical tokenizer (same `fingerprint`).
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

SIDECAR = "crescent_tokenizer.json"
EOS_CANDIDATES = ("<|endoftext|>", "[EOS]", "</s>", "<eos>", "<|end_of_text|>", "<|eos|>")
BOS_CANDIDATES = ("[BOS]", "<s>", "<bos>", "<|begin_of_text|>", "<|bos|>")

# Kimi / Moonlight pre-tokenizer pattern (Han runs split from other letters, digits in groups of 1-3), as in
# Moonshot's tokenization_kimi.py (checked against several independent copies of the Kimi-K2 file).
KIMI_PATTERN = "|".join(
    [
        r"""[\p{Han}]+""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
# Names of the first Kimi special tokens (ids N.. N+4; Kimi-K2's tokenizer_config.json). A tokenizer_config.json
# beside the tiktoken file, as Moonlight ships, takes precedence; the rest are reserved placeholders.
KIMI_SPECIALS = ("[BOS]", "[EOS]", "<|im_end|>", "<|im_user|>", "<|im_assistant|>")
# The rest of the Kimi chat template's tokens, by offset from N (Kimi-K2's tokenizer_config.json, recalled, not
# checked offline: <|im_system|>=163594, <|im_middle|>=163601 for Moonlight's N = 163584).
KIMI_CHAT_SPECIALS = {10: "<|im_system|>", 17: "<|im_middle|>"}
NUM_RESERVED_SPECIALS = 256


class Tokenizer:
    """The interface the data path uses. Subclasses set `vocab_size`, `eos_id`, `bos_id`, `fingerprint`."""

    vocab_size: int
    eos_id: int
    bos_id: int | None
    fingerprint: str
    backend: str

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def special_token_id(self, token: str) -> int | None:
        """The id of special (control) token `token`, or None when the tokenizer has no such special token."""
        raise NotImplementedError

    def save(self, directory: str | os.PathLike) -> Path:
        raise NotImplementedError

    def describe(self) -> dict:
        """What a manifest records about the tokenizer."""
        return {
            "backend": self.backend,
            "fingerprint": self.fingerprint,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "bos_id": self.bos_id,
        }

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, eos_id={self.eos_id}, "
                f"bos_id={self.bos_id}, fingerprint={self.fingerprint[:12]})")


def _sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` (byte-level BPE in practice) with explicit EOS/BOS tokens."""

    backend = "hf"

    def __init__(self, tokenizer, eos_token: str | None = None, bos_token: str | None = None):
        self._tok = tokenizer
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        eos_token = eos_token or next((t for t in EOS_CANDIDATES if t in vocab), None)
        if eos_token is None or eos_token not in vocab:
            raise ValueError(f"tokenizer has no EOS token: eos_token={eos_token!r}; "
                             f"add one of {EOS_CANDIDATES} or name it in {SIDECAR}")
        if bos_token is not None and bos_token not in vocab:
            raise ValueError(f"bos_token={bos_token!r} is not in the vocabulary")
        self.eos_token, self.bos_token = eos_token, bos_token
        self.eos_id = vocab[eos_token]
        self.bos_id = vocab[bos_token] if bos_token is not None else None
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self._specials = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
        canonical = json.loads(tokenizer.to_str())
        self.fingerprint = _sha256_json({"hf": canonical, "eos": eos_token, "bos": bos_token})

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def special_token_id(self, token: str) -> int | None:
        return self._specials.get(token)

    def save(self, directory: str | os.PathLike) -> Path:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(out / "tokenizer.json"))
        sidecar = {"backend": "hf", "eos_token": self.eos_token, "bos_token": self.bos_token}
        (out / SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n")
        return out


class TiktokenTokenizer(Tokenizer):
    """A tiktoken-format BPE (ranks file) plus special tokens numbered from the end of the ranks."""

    backend = "tiktoken"

    def __init__(self, ranks: dict[bytes, int], special_names: Sequence[str], pattern: str = KIMI_PATTERN,
                 eos_token: str = "[EOS]", bos_token: str | None = "[BOS]"):
        import tiktoken

        n = len(ranks)
        if sorted(ranks.values()) != list(range(n)):
            raise ValueError(f"tiktoken ranks must be exactly 0..{n - 1}; got {n} ranks with gaps or repeats")
        specials = {name: n + i for i, name in enumerate(special_names)}
        for field, token in (("eos_token", eos_token), ("bos_token", bos_token)):
            if token is not None and token not in specials:
                raise ValueError(f"{field}={token!r} is not among the special tokens {list(specials)[:8]}...")
        self._ranks, self._special_names, self.pattern = ranks, list(special_names), pattern
        self._specials = specials
        self._enc = tiktoken.Encoding("crescent", pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
        self.eos_token, self.bos_token = eos_token, bos_token
        self.eos_id = specials[eos_token]
        self.bos_id = specials[bos_token] if bos_token is not None else None
        self.vocab_size = n + len(special_names)
        digest = hashlib.sha256()
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            digest.update(rank.to_bytes(4, "little") + len(token).to_bytes(2, "little") + token)
        self.fingerprint = _sha256_json({"tiktoken": digest.hexdigest(), "specials": self._special_names,
                                         "pattern": pattern, "eos": eos_token, "bos": bos_token})

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # Special-token text inside documents is encoded as ordinary bytes, never as a control token.
        return self._enc.encode_ordinary_batch(list(texts))

    def decode(self, ids: Iterable[int]) -> str:
        return self._enc.decode([int(i) for i in ids])

    def special_token_id(self, token: str) -> int | None:
        return self._specials.get(token)

    def save(self, directory: str | os.PathLike) -> Path:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        lines = [f"{base64.b64encode(tok).decode()} {rank}"
                 for tok, rank in sorted(self._ranks.items(), key=lambda kv: kv[1])]
        (out / "tiktoken.model").write_text("\n".join(lines) + "\n")
        sidecar = {"backend": "tiktoken", "eos_token": self.eos_token, "bos_token": self.bos_token,
                   "pattern": self.pattern, "special_tokens": self._special_names}
        (out / SIDECAR).write_text(json.dumps(sidecar, indent=2, ensure_ascii=False) + "\n")
        return out


def read_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """The ranks of a tiktoken-format file (`base64(token) rank` per line), read by tiktoken's own
    `load_tiktoken_bpe`. Its cache is turned off: it keys copies by path only, so a file rewritten in place
    would be read back stale."""
    from tiktoken.load import load_tiktoken_bpe

    previous = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""  # tiktoken's documented switch: "" reads the file directly
    try:
        return load_tiktoken_bpe(str(path))
    finally:
        if previous is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = previous


def _tiktoken_specials_from_config(config_path: Path, n_ranks: int) -> tuple[list[str], str | None, str | None]:
    """Special-token names from an HF `tokenizer_config.json` beside a tiktoken file (Moonlight ships one)."""
    config = json.loads(config_path.read_text())
    names = [f"<|reserved_token_{i}|>" for i in range(NUM_RESERVED_SPECIALS)]
    for key, entry in config.get("added_tokens_decoder", {}).items():
        offset = int(key) - n_ranks
        if 0 <= offset < NUM_RESERVED_SPECIALS:
            names[offset] = entry["content"] if isinstance(entry, dict) else str(entry)

    def token_name(value):
        return value.get("content") if isinstance(value, dict) else value

    return names, token_name(config.get("eos_token")), token_name(config.get("bos_token"))


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A directory with `tokenizer.json` (HF) or `tiktoken.model`, or a path to either file."""
    p = Path(path)
    if p.is_dir():
        sidecar = json.loads((p / SIDECAR).read_text()) if (p / SIDECAR).exists() else {}
        if (p / "tokenizer.json").exists() and sidecar.get("backend", "hf") == "hf":
            file = p / "tokenizer.json"
        elif (p / "tiktoken.model").exists():
            file = p / "tiktoken.model"
        else:
            raise ValueError(f"tokenizer path {str(p)!r} holds neither tokenizer.json nor tiktoken.model")
    elif p.is_file():
        file, sidecar = p, {}
        if (p.parent / SIDECAR).exists():
            sidecar = json.loads((p.parent / SIDECAR).read_text())
    else:
        raise ValueError(f"tokenizer path {str(p)!r} does not exist")

    if file.suffix == ".json":
        from tokenizers import Tokenizer as RawTokenizer

        return HFTokenizer(RawTokenizer.from_file(str(file)), sidecar.get("eos_token"), sidecar.get("bos_token"))

    ranks = read_tiktoken_ranks(file)
    if "special_tokens" in sidecar:
        names, eos, bos = sidecar["special_tokens"], sidecar.get("eos_token"), sidecar.get("bos_token")
    elif (file.parent / "tokenizer_config.json").exists():
        names, eos, bos = _tiktoken_specials_from_config(file.parent / "tokenizer_config.json", len(ranks))
    else:
        names = list(KIMI_SPECIALS) + [KIMI_CHAT_SPECIALS.get(i, f"<|reserved_token_{i}|>")
                                       for i in range(len(KIMI_SPECIALS), NUM_RESERVED_SPECIALS)]
        eos, bos = None, None
    return TiktokenTokenizer(ranks, names, sidecar.get("pattern", KIMI_PATTERN),
                             eos_token=eos or "[EOS]", bos_token=bos if bos is not None else "[BOS]")


def _iter_training_texts(paths_or_texts: Iterable[str | os.PathLike]) -> Iterable[str]:
    for item in paths_or_texts:
        if isinstance(item, os.PathLike) or (isinstance(item, str) and "\n" not in item and os.path.exists(item)):
            p = Path(item)
            files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
            for f in files:
                yield f.read_text(encoding="utf-8", errors="replace")
        else:
            yield str(item)


def train_bpe(paths_or_texts: Iterable[str | os.PathLike], vocab_size: int, out_dir: str | os.PathLike | None = None,
              eos_token: str = "<|endoftext|>", special_tokens: Sequence[str] = ()) -> HFTokenizer:
    """Train a byte-level BPE (HF `tokenizers`), EOS at id 0; save it to `out_dir` when given.

    `paths_or_texts`: file or directory paths (read as UTF-8), or the texts themselves. `special_tokens`: control
    tokens reserved after EOS (ids 1, 2, ...; e.g. a chat template's), never produced by merges.
    """
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    specials = [eos_token, *(t for t in special_tokens if t != eos_token)]
    if vocab_size < 256 + len(specials) + 1:
        raise ValueError(f"vocab_size={vocab_size} must be at least {256 + len(specials) + 1} (256 bytes + "
                         f"{len(specials)} special tokens + one merge)")
    tok = RawTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    tok.train_from_iterator(_iter_training_texts(paths_or_texts), trainer=trainer)
    result = HFTokenizer(tok, eos_token=eos_token)
    if result.eos_id != 0:
        raise AssertionError(f"EOS landed at id {result.eos_id}, expected 0")
    if out_dir is not None:
        result.save(out_dir)
    return result
