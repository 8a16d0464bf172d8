"""Data path: tokenizers, webdataset shard sets, the resumable mixture stream, demo corpus (stages: components.schedule)."""
from .demo import DemoPaths, build_demo
from .loader import StreamLoader
from .shards import build_shards, inspect_shard_set, read_manifest
from .stream import MixtureStream
from .tokenizer import Tokenizer, load_tokenizer, train_bpe

__all__ = [
    "DemoPaths", "MixtureStream", "StreamLoader", "Tokenizer", "build_demo", "build_shards", "inspect_shard_set",
    "load_tokenizer", "read_manifest", "train_bpe",
]
