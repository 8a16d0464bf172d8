"""Tokenizers: the HF byte-level BPE (trained here) and the tiktoken-format backend (Moonlight's file format)."""
import base64

import pytest

from components.data.tokenizer import (
    KIMI_SPECIALS,
    NUM_RESERVED_SPECIALS,
    TiktokenTokenizer,
    load_tokenizer,
    train_bpe,
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 20,
    "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n" * 20,
    "Numbers 12345 and unicode: héllo wörld, 中文, emoji \u2603.\n" * 10,
]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    out = tmp_path_factory.mktemp("bpe")
    return train_bpe(CORPUS, vocab_size=300, out_dir=out), out


def test_trained_bpe_has_eos_at_zero_and_requested_vocab(bpe):
    tok, _ = bpe
    assert tok.eos_id == 0
    assert tok.bos_id is None
    assert tok.vocab_size == 300


def test_bpe_round_trips_any_text_byte_level(bpe):
    tok, _ = bpe
    text = "Unseen: Zürich 東京 \t tabs\n\n  and \u00e9 \U0001F600 <|endoftext|> literal"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode_batch([text, "ab"]) == [ids, tok.encode("ab")]


def test_bpe_save_load_gives_identical_tokenizer(bpe, tmp_path):
    tok, out = bpe
    loaded = load_tokenizer(out)
    assert loaded.fingerprint == tok.fingerprint
    loaded.save(tmp_path / "again")
    again = load_tokenizer(tmp_path / "again")
    assert again.fingerprint == tok.fingerprint
    assert again.encode(CORPUS[1]) == tok.encode(CORPUS[1])


def test_bpe_training_is_deterministic_and_fingerprint_sees_the_vocab():
    a = train_bpe(CORPUS, vocab_size=300)
    b = train_bpe(CORPUS, vocab_size=300)
    c = train_bpe(CORPUS, vocab_size=290)
    assert a.fingerprint == b.fingerprint
    assert a.fingerprint != c.fingerprint


def _tiny_tiktoken_file(path, merges=(b"he", b"ll", b"hell", b" w", b"or")):
    ranks = {bytes([i]): i for i in range(256)}
    for m in merges:
        ranks[m] = len(ranks)
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    return ranks


def test_tiktoken_file_specials_follow_the_ranks_like_moonlight(tmp_path):
    ranks = _tiny_tiktoken_file(tmp_path / "tiktoken.model")
    tok = load_tokenizer(tmp_path / "tiktoken.model")
    n = len(ranks)  # Moonlight: 163584 ranks, so [BOS]=163584, [EOS]=163585, <|im_end|>=163586
    assert (tok.bos_id, tok.eos_id) == (n, n + 1)
    assert tok.vocab_size == n + NUM_RESERVED_SPECIALS
    assert KIMI_SPECIALS[:3] == ("[BOS]", "[EOS]", "<|im_end|>")
    assert tok.encode("hello") == [ranks[b"hell"], ranks[b"o"]]
    text = "hello world, 中文English混合 [EOS]"
    assert tok.decode(tok.encode(text)) == text
    assert n + 1 not in tok.encode("[EOS]")  # special-token text in a document stays ordinary bytes


def test_tiktoken_save_load_and_config_names(tmp_path):
    _tiny_tiktoken_file(tmp_path / "tiktoken.model")
    (tmp_path / "tokenizer_config.json").write_text(
        '{"added_tokens_decoder": {"261": {"content": "[BOS]"}, "262": {"content": "[EOS]"},'
        ' "263": {"content": "<|im_end|>"}}, "bos_token": "[BOS]", "eos_token": "<|im_end|>"}')
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id) == (261, 263)
    tok.save(tmp_path / "saved")
    assert load_tokenizer(tmp_path / "saved").fingerprint == tok.fingerprint


def test_tiktoken_rejects_gapped_ranks():
    with pytest.raises(ValueError, match="ranks must be exactly 0..2"):
        TiktokenTokenizer({b"a": 0, b"b": 2, b"c": 3}, ["[BOS]", "[EOS]"])


def test_load_tokenizer_names_a_bad_path(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(ValueError, match="neither tokenizer.json nor tiktoken.model"):
        load_tokenizer(tmp_path)
