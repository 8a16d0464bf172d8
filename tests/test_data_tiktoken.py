"""tiktoken-format tokenizer files are read by tiktoken's own `load_tiktoken_bpe`, with its path-keyed cache off."""
from __future__ import annotations

import os

import pytest
from test_data_tokenizer import _tiny_tiktoken_file as _write

from components.data.tokenizer import load_tokenizer, read_tiktoken_ranks


def test_a_malformed_line_gets_tiktokens_own_error_naming_the_file(tmp_path):
    path = tmp_path / "tiktoken.model"
    path.write_text("aGU= 0\nnot-a-rank-line\n")
    with pytest.raises(ValueError, match=rf"Error parsing line b'not-a-rank-line' in {path}"):
        read_tiktoken_ranks(path)


def test_a_file_rewritten_in_place_is_read_anew_and_the_cache_setting_is_left_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "tiktoken.model"
    first = _write(path, [b"he", b"ll"])
    assert read_tiktoken_ranks(path) == first
    second = _write(path, [b"he", b"ll", b"hell"])  # same path, new contents (tiktoken caches by path only)
    assert read_tiktoken_ranks(path) == second
    assert load_tokenizer(path).encode("hell") == [second[b"hell"]]
    assert os.environ["TIKTOKEN_CACHE_DIR"] == str(tmp_path / "cache") and not (tmp_path / "cache").exists()
