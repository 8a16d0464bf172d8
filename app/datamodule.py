"""The LightningDataModule: the resumable shard stream for training, held-out shards for validation.

The data position is one global number, `consumed_samples`, owned by the LightningModule and saved in its
checkpoint; the train dataloader is built from it (and never writes it back), so after a restart every rank
continues where the whole job left off, whatever the number of ranks or workers. Lightning's own dataloader state
is not used: the loader has none.
"""
from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from app.module import ConfigError
from components.data.epochs import EpochSchedule, resolve_training_schedule
from components.data.loader import StreamLoader
from components.data.shards import read_manifest
from components.data.stream import MixtureStream, data_order
from components.schedule import StageSchedule


class CrescentDataModule(pl.LightningDataModule):
    """Args (the YAML's `data:` section):
        shards: {mixture name: shard-set location} (local path, shared volume, s3://, gs://, https://); the
            stage schedule's mixtures refer to these names.
        val_shards: a held-out shard-set location (default: none -> no validation).
        tokenizer: tokenizer directory (checked against each manifest's fingerprint before training).
        demo: build the offline demo corpus into `demo_root` when it is missing (what `make train` uses).
        micro_batch_size: sequences per rank per forward pass; num_workers: dataloader worker processes.
        seed: data order seed. val_samples: how many held-out sequences each validation pass reads.
        num_streams: virtual streams of the data order (fixed for a job; a multiple of ranks × workers × micro).
        schedule: linked from `model.schedule` (the mixture of each stage). An epoch schedule (fine-tuning,
            components/data/epochs.py) names its shard set itself, so `shards` may then be left out.

    Chat shard sets (fine-tuning) stream like any other; their batches also carry positions, segments and masked
    targets, and `chat_template` names the set's template (the export writes it into tokenizer_config.json).
    """

    def __init__(
        self,
        shards: dict[str, str] | None = None,
        val_shards: str | None = None,
        tokenizer: str | None = None,
        demo: bool = False,
        demo_root: str = "data/demo",
        micro_batch_size: int = 8,
        num_workers: int = 2,
        seed: int = 0,
        val_samples: int = 64,
        num_streams: int = 1536,
        schedule: str | dict = "tiny",
    ):
        super().__init__()
        if micro_batch_size < 1:
            raise ValueError(f"data.micro_batch_size={micro_batch_size!r} must be >= 1")
        if num_workers < 0:
            raise ValueError(f"data.num_workers={num_workers!r} must be >= 0")
        self.schedule: StageSchedule = resolve_training_schedule(schedule)
        if isinstance(self.schedule, EpochSchedule):
            shards = {self.schedule.name: self.schedule.shard_set, **(shards or {})}
        if not demo and not shards:
            raise ValueError("data.shards must name at least one shard set (or set data.demo: true)")
        self.shards = dict(shards or {})
        self.val_shards = val_shards
        self.tokenizer_dir = tokenizer
        self.demo = demo
        self.demo_root = demo_root
        self.micro_batch_size = micro_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.val_samples = val_samples
        self.num_streams = num_streams

    def prepare_data(self) -> None:
        """Rank 0 of each node: build the demo corpus if asked and missing (idempotent)."""
        if self.demo:
            self._use_demo(build=True)

    def _use_demo(self, build: bool) -> None:
        """The offline demo corpus (english + code mixtures, its tokenizer) and a held-out validation set."""
        from components.data.demo import build_demo

        paths = build_demo(self.demo_root, seq_len=self.schedule.seq_len)
        val = paths.root / "val"
        if build:
            build_validation_set(val, paths.tokenizer, self.schedule.seq_len)
        self.shards = {**{name: str(p) for name, p in paths.sets.items()}, **self.shards}
        self.val_shards = self.val_shards or str(val)
        self.tokenizer_dir = self.tokenizer_dir or str(paths.tokenizer)

    def setup(self, stage: str) -> None:
        if self.demo:
            self._use_demo(build=False)  # prepare_data built it; every rank reads the same layout
        missing = [f"data.shards.{name}" for name in self.schedule.mixture_names() if name not in self.shards]
        if missing:
            raise ValueError(f"the stage schedule uses mixtures that have no shard set: {', '.join(missing)}")

    def data_fingerprints(self) -> dict[str, str | None]:
        """{set name: tokenizer fingerprint} of the training shard sets the schedule reads (from the manifests)."""
        return {name: read_manifest(self.shards[name]).get("tokenizer", {}).get("fingerprint")
                for name in self.schedule.mixture_names()}

    @property
    def chat_template(self) -> str | None:
        """The chat template of the training sets (None for pretraining sets)."""
        names = {read_manifest(self.shards[n]).get("chat", {}).get("template") for n in self.schedule.mixture_names()}
        if len(names) > 1:
            raise ValueError(f"the training chat sets use different chat templates: {sorted(map(str, names))}")
        return names.pop() if names else None

    def data_order(self, consumed_samples: int) -> dict:
        """What places each of the first `consumed_samples` training samples (saved in checkpoints, compared on
        resume; components/data/stream.py `data_order`)."""
        return data_order(self.shards, self.schedule, seq_len=self.schedule.seq_len, num_streams=self.num_streams,
                          seed=self.seed, consumed_samples=consumed_samples)

    def _fingerprint(self) -> str | None:
        if not self.tokenizer_dir:
            return None
        from components.data.tokenizer import load_tokenizer

        return load_tokenizer(self.tokenizer_dir).fingerprint

    def train_dataloader(self) -> DataLoader:
        try:
            stream = self._train_stream(self.trainer.lightning_module.consumed_samples)
        except (ValueError, FileNotFoundError) as err:
            raise ConfigError(f"data: {err}") from err
        return StreamLoader(stream, pin_memory=torch.cuda.is_available())

    def _train_stream(self, consumed_samples: int) -> MixtureStream:
        return MixtureStream(self.shards, self.schedule, rank=self.trainer.global_rank,
                               world_size=self.trainer.world_size, num_workers=self.num_workers,
                               micro_batch_size=self.micro_batch_size, num_streams=self.num_streams, seed=self.seed,
                               consumed_samples=consumed_samples, tokenizer_fingerprint=self._fingerprint())

    def val_dataloader(self) -> DataLoader:
        if not self.val_shards:
            return []
        stream = MixtureStream({"val": self.val_shards}, {"val": 1.0}, rank=self.trainer.global_rank,
                               world_size=self.trainer.world_size, num_workers=0,
                               micro_batch_size=self.micro_batch_size, num_streams=self.num_streams,
                               seed=self.seed, stop_samples=self.val_samples,
                               tokenizer_fingerprint=self._fingerprint())
        return StreamLoader(stream)  # every pass starts at the stream's first held-out sample


def build_validation_set(out: Path, tokenizer: Path, seq_len: int, files: int = 24) -> Path:
    """Held-out code for the demo's validation loss: the standard library's own tests, which the demo's code
    mixture excludes. Deterministic; built once per tokenizer (a rebuilt demo tokenizer rebuilds it)."""
    import sysconfig

    from components.data.shards import MANIFEST, build_shards
    from components.data.tokenizer import load_tokenizer

    if (out / MANIFEST).exists() and read_manifest(str(out)).get("tokenizer", {}).get("fingerprint") == \
            load_tokenizer(tokenizer).fingerprint:
        return out
    tests = sorted((Path(sysconfig.get_paths()["stdlib"]) / "test").glob("test_*.py"))[:files]
    if not tests:
        raise FileNotFoundError("the interpreter ships no Lib/test files for the demo validation set")
    build_shards([str(t) for t in tests], out, tokenizer, seq_len=seq_len, shard_samples=256, seed=0, name="val")
    return out
