"""Resumable checkpoints on disk: written whole or not at all, verified before a resume.

Lightning's `TorchCheckpointIO` saves through an fsspec transaction: a temporary file in `$TMPDIR` that is then moved
into place, which across filesystems (a PVC run dir, the container's /tmp) is a copy into the final name, so a kill
or a full disk mid-copy leaves a partial checkpoint under its real name. `AtomicCheckpointIO` writes the temporary
file beside its final name (`components.durable`): a name in `checkpoints/` is always a complete checkpoint. Sharded
(DCP) checkpoints are directories; `save_sharded` gives them the same treatment (see app/strategies.py).

Names: `step-00000040.ckpt` (every K steps), `preempt-step=00000043.ckpt` (after a SIGTERM), `last.ckpt` a symlink
to the newest of them. Resume takes the newest that `verify_checkpoint` accepts and says which it skipped and why.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem

from components.durable import TEMP_PREFIX, publish_directory, temporary_path, write_file

STEP_NAME = re.compile(r"^(preempt-)?step[=-](\d+)(?:\.ckpt)?$")
LAST = "last.ckpt"
DCP_META = "meta.pt"  # Lightning's metadata file inside a sharded checkpoint folder
_OVERHEAD = 1 << 20  # zip headers and the pickled non-tensor state, generously


def checkpoint_step(path: str | Path) -> tuple[int, bool] | None:
    """(step, is preemption checkpoint) from a checkpoint's name, or None for any other name."""
    m = STEP_NAME.match(Path(path).name)
    return (int(m.group(2)), m.group(1) is not None) if m else None


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Checkpoints (files or DCP folders) in `directory`, newest first; at one step a preemption one comes first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(key, p) for p in directory.iterdir() if (key := checkpoint_step(p)) is not None and not p.is_symlink()]
    return [p for _, p in sorted(found, key=lambda kp: kp[0], reverse=True)]


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a (nested) checkpoint dict, each storage counted once: what torch.save writes."""
    seen: set[tuple[int, int]] = set()
    total = 0
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            if hasattr(item, "to_local"):  # DTensor: this rank writes its own shard
                item = item.to_local()
            storage = item.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            if key not in seen and item.device.type != "meta":
                seen.add(key)
                total += storage.nbytes()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return total


def write_checkpoint(checkpoint: dict, path: str | Path) -> Path:
    """torch.save `checkpoint` to `path` durably (temp file beside it, fsync, rename); then point `last` at it and drop
    preemption checkpoints it supersedes. InsufficientSpaceError before anything is written when it cannot fit."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(path, lambda f: torch.save(checkpoint, f), needed=tensor_bytes(checkpoint) + _OVERHEAD)
    after_publish(path)
    return path


def after_publish(path: Path) -> None:
    """`last.ckpt` -> the checkpoint just published; older preemption checkpoints are superseded by it."""
    key = checkpoint_step(path)
    if key is None:
        return
    for older in list_checkpoints(path.parent):
        older_key = checkpoint_step(older)
        if older_key[1] and older_key[0] < key[0]:
            shutil.rmtree(older) if older.is_dir() else older.unlink(missing_ok=True)
    last = path.parent / LAST
    link = temporary_path(last)
    try:
        os.symlink(path.name, link)
        os.replace(link, last)  # atomic: `last` always names a complete checkpoint
    except OSError:  # a filesystem without symlinks: no `last` rather than a stale one
        link.unlink(missing_ok=True)
        last.unlink(missing_ok=True)


def save_sharded(save, final: Path, *, is_writer: bool, barrier) -> None:
    """A sharded (DCP) checkpoint folder: every rank writes into a temporary folder (same name on every rank, chosen
    by the caller), then the writer renames it into place. `save(tmp)` writes the folder."""
    tmp = final.with_name(f"{TEMP_PREFIX}{final.name}")
    if is_writer and tmp.exists():
        shutil.rmtree(tmp)
    barrier()
    save(tmp)
    barrier()
    if is_writer:
        publish_directory(tmp, final)
        after_publish(final)
    barrier()


def verify_checkpoint(path: str | Path) -> str | None:
    """Why `path` cannot be resumed from (missing, empty, truncated, not a checkpoint), or None when it loads.

    A file is opened with `torch.load(mmap=True)`: the pickled state is read and every tensor mapped, not copied, so
    the check costs little even for a large checkpoint; a truncated zip has lost its central directory and fails. A
    sharded folder: its metadata loads and every byte range that DCP's index names exists in its file.
    """
    path = Path(path)
    if not path.exists():
        return "does not exist"
    if path.is_dir():
        return _verify_sharded(path)
    size = path.stat().st_size
    if size == 0:
        return "empty file (0 bytes)"
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=False)  # our own file
    except Exception as err:
        return f"unreadable ({size:,} bytes; {_first_line(err)}): truncated or not a checkpoint"
    if not isinstance(state, dict) or "state_dict" not in state and "global_step" not in state:
        return "not a Lightning checkpoint (no state_dict)"
    return None


def _verify_sharded(path: Path) -> str | None:
    reason = verify_checkpoint(path / DCP_META) if (path / DCP_META).exists() else f"{DCP_META} is missing"
    if reason:
        return f"{DCP_META}: {reason}" if not reason.startswith(DCP_META) else reason
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as err:
        return f"sharded index unreadable ({_first_line(err)})"
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(needed.items()):
        file = path / name
        have = file.stat().st_size if file.exists() else -1
        if have < end:
            return f"shard {name} is {'missing' if have < 0 else f'truncated ({have:,} of {end:,} bytes)'}"
    return None


def _first_line(err: BaseException) -> str:
    """The error's first sentence: torch's zip errors go on with advice that does not apply here."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0].split('. ')[0][:200]}" if text else type(err).__name__


def load_meta(path: str | Path) -> dict:
    """The checkpoint's top-level entries without its tensors (mmap), e.g. `global_step` and `crescent`."""
    path = Path(path)
    file = path / DCP_META if path.is_dir() else path
    state = torch.load(file, map_location="cpu", mmap=True, weights_only=False)  # our own file
    return {k: v for k, v in state.items() if k not in ("state_dict", "optimizer_states")}


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's CheckpointIO for whole-file checkpoints, written by `write_checkpoint` on local paths (remote
    object stores keep Lightning's way: an object appears whole on upload)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        write_checkpoint(checkpoint, path)
