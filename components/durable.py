"""Durable file writes: a file under its final name is complete, and a full disk is said in one line.

A write goes to a temporary name in the same directory (so the final rename never crosses filesystems and is
atomic), is flushed to the device (`fsync` of the file, then of the directory after the rename) and only then
takes its final name. A failed write removes its temporary file. Before a large write, `ensure_free_space`
compares the bytes it needs with the free space and raises `InsufficientSpaceError` (naming the directory, the
space needed and the space free) without writing anything, so earlier files stay intact and other writers (the
tracking journal) still find room.
"""
from __future__ import annotations

import errno
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

TEMP_PREFIX = ".tmp-"
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


class InsufficientSpaceError(OSError):
    """Not enough free space in `directory` for `what` (`needed` bytes, `free` bytes free)."""

    def __init__(self, directory: str | Path, needed: int, free: int, what: str):
        self.directory, self.needed, self.free, self.what = str(directory), int(needed), int(free), what
        super().__init__(errno.ENOSPC, f"not enough space in {self.directory} to write {what}: needs "
                                       f"{format_bytes(self.needed)}, {format_bytes(self.free)} free")

    def __str__(self) -> str:
        return self.strerror


def format_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def free_bytes(directory: str | Path) -> int:
    return shutil.disk_usage(directory).free


def ensure_free_space(directory: str | Path, needed: int, what: str) -> None:
    free = free_bytes(directory)
    if free < needed:
        raise InsufficientSpaceError(directory, needed, free, what)


def is_no_space(error: BaseException | None) -> bool:
    """True for ENOSPC/EDQUOT, also when wrapped (torch.save raises RuntimeError from the OSError)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _NO_SPACE:
            return True
        if "No space left on device" in str(error) or "StorageFull" in str(error):
            return True  # safetensors (Rust) reports io errors in its message only
        error = error.__cause__ or error.__context__
    return False


def temporary_path(final: str | Path) -> Path:
    """A hidden, unique name beside `final` (same directory, so same filesystem)."""
    final = Path(final)
    return final.with_name(f"{TEMP_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}")


def fsync_dir(directory: str | Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str | Path) -> None:
    """fsync every file under `path` and every directory, deepest first."""
    path = Path(path)
    for root, _, files in os.walk(path, topdown=False):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(root)


def write_file(final: str | Path, write: Callable, *, needed: int = 0) -> Path:
    """Write `final` durably: `write(file_object)` fills a temporary file beside it, which is fsynced and renamed.

    `needed`: bytes the write will take (checked first; 0 skips the check). Raises InsufficientSpaceError on a
    full disk (before writing, or when the device fills up during the write); the temporary file is removed.
    """
    final = Path(final)
    if needed:
        ensure_free_space(final.parent, needed, final.name)
    tmp = temporary_path(final)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if is_no_space(err) and not isinstance(err, InsufficientSpaceError):
            raise InsufficientSpaceError(final.parent, needed, free_bytes(final.parent), final.name) from err
        raise
    return final


def write_bytes(final: str | Path, data: bytes) -> Path:
    return write_file(final, lambda f: f.write(data), needed=len(data))


def publish_directory(tmp: str | Path, final: str | Path) -> Path:
    """Move a fully written directory `tmp` to `final` (same parent), replacing an existing one, durably."""
    tmp, final = Path(tmp), Path(final)
    fsync_tree(tmp)
    if final.exists() or final.is_symlink():
        old = temporary_path(final)
        final.rename(old)
        tmp.rename(final)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    else:
        tmp.rename(final)
    fsync_dir(final.parent)
    return final


def remove_temporary(directory: str | Path) -> list[Path]:
    """Remove what interrupted writes left in `directory` (hidden `.tmp-*` files or folders); the removed paths.
    Call it only while no other process writes there (under the run lock)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for path in sorted(directory.iterdir()):
        if not path.name.startswith(TEMP_PREFIX):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed
