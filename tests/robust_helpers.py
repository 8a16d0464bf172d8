"""Pieces the fault tests share: a small tmpfs (a real, separate filesystem that can fill up) and process probes."""
from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path

import pytest


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    """Mount a tmpfs of `size` (e.g. "8m") at `path` for the block; skip the test, saying why, where the machine
    does not allow mounting (not root, no CAP_SYS_ADMIN in the container)."""
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or 'mount failed'}): needs root or "
                    "CAP_SYS_ADMIN")
    try:
        yield path
    finally:
        for _ in range(50):  # a child that was just killed may still hold a file open for a moment
            if subprocess.run(["umount", str(path)], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        else:  # still busy (a test failed with a file open): detach it, it goes once the last file closes
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def resize_tmpfs(path: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


def fill(directory: Path, leave_bytes: int) -> Path:
    """Fill the filesystem of `directory` until about `leave_bytes` stay free; the ballast file."""
    ballast = directory / "ballast"
    free = os.statvfs(directory).f_bavail * os.statvfs(directory).f_frsize
    with open(ballast, "wb") as f:
        f.write(b"\0" * max(free - leave_bytes, 0))
    return ballast


def children(pid: int) -> list[int]:
    """Direct child processes of `pid` (from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(entry.name))
    return out


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
