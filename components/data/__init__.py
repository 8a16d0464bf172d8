"""Data path: tokenizers, webdataset shard sets, the resumable mixture stream, token-based stages, demo corpus."""
from .demo import DemoPaths, build_demo
from .loader import StreamLoader
from .shards import build_shards, inspect_shard_set, read_manifest
from .stages import Stage, StageSchedule, StageState, get_schedule, plot_schedule
from .stream import MixtureStream
from .tokenizer import Tokenizer, load_tokenizer, train_bpe

__all__ = [
    "DemoPaths", "MixtureStream", "Stage", "StageSchedule", "StageState", "StreamLoader", "Tokenizer",
    "build_demo", "build_shards", "get_schedule", "inspect_shard_set", "load_tokenizer", "plot_schedule",
    "read_manifest", "train_bpe",
]
