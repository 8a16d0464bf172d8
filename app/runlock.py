"""One run per run directory: an exclusive lock file held for the run's lifetime, safe on a shared volume.

`RUN_DIR/run.lock` holds JSON {host, pid, start, since, heartbeat, token}. It is taken atomically: the holder's record is
written to a unique file and hard-linked to the lock name (`link()` fails if the name exists, also on NFS, where
O_EXCL has not always been reliable). A thread rewrites the heartbeat every `heartbeat_s` (write a temp file, rename
over the lock: the lock never disappears). A lock is stale when its holder is on this host and no longer runs, or
when its heartbeat is older than `stale_after_s` (a holder on another host that died); a stale lock is taken over.
"No longer runs" compares the process, not just the pid: `start` is the holder's boot id and start time. A Job's
replacement pod has the dead pod's hostname and a fresh PID namespace, so its trainer often gets the dead trainer's
pid; without the start time the new process would find "its" pid alive and refuse its own run directory.
fcntl/flock locks are not used: they are not reliable over NFS and vanish silently when a client loses its lease.

Under torchrun only global rank 0 takes the lock (`train_from_cli` asks `trainer.is_global_zero`).
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

LOCK_NAME = "run.lock"


class RunDirInUse(RuntimeError):
    """Another live process holds the run directory's lock."""


def _now_iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _process_start(pid: int) -> str | None:
    """`<boot id>:<start time in clock ticks>` of a process: unique on a host across pid reuse; None off Linux."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        with open(f"/proc/{pid}/stat") as f:
            return f"{boot}:{f.read().rsplit(')', 1)[1].split()[19]}"  # field 22 (starttime), after comm
    except (OSError, IndexError):
        return None


def _holder_running(record: dict) -> bool:
    """Whether the process that wrote a lock record on this host still runs (not a newer one with its pid)."""
    pid = int(record.get("pid", -1))
    if not _pid_running(pid):
        return False
    start = record.get("start")
    if start is None:  # a record without a start time (an older writer): the pid is all there is,
        return pid != os.getpid()  # and this process, which holds no lock of its own, is not that holder
    now = _process_start(pid)
    return now is None or now == start


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    try:  # a zombie (killed, not yet reaped) runs no more
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class RunLock:
    """`with RunLock(run_dir): ...` or `lock = RunLock(run_dir).acquire()` ... `lock.release()`."""

    def __init__(self, run_dir: str | Path, heartbeat_s: float = 30.0, stale_after_s: float = 300.0):
        if not 0 < heartbeat_s < stale_after_s:
            raise ValueError(f"RunLock: need 0 < heartbeat_s={heartbeat_s!r} < stale_after_s={stale_after_s!r}")
        self.path = Path(run_dir) / LOCK_NAME
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.host, self.pid, self.token = socket.gethostname(), os.getpid(), uuid.uuid4().hex
        self.start = _process_start(self.pid)
        self.since: float | None = None
        self.took_over: dict | None = None  # the stale holder replaced, if any
        self.lost = False  # set when the lock file stopped naming us (someone broke it)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- the record ------------------------------------------------------------------------------------
    def _record(self) -> bytes:
        return json.dumps({"host": self.host, "pid": self.pid, "start": self.start, "since": self.since,
                           "heartbeat": time.time(), "token": self.token}).encode()

    def holder(self) -> dict | None:
        """The lock file's record, None when there is none (an unreadable one counts as stale, heartbeat 0)."""
        try:
            return json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"host": "?", "pid": -1, "since": None, "heartbeat": 0.0, "token": None}

    def is_stale(self, record: dict) -> bool:
        if time.time() - float(record.get("heartbeat") or 0) > self.stale_after_s:
            return True
        return record.get("host") == self.host and not _holder_running(record)

    def describe(self, record: dict) -> str:
        age = time.time() - float(record.get("heartbeat") or 0)
        since = _now_iso(record["since"]) if record.get("since") else "?"
        return (f"pid {record.get('pid')} on host {record.get('host')} since {since} "
                f"(heartbeat {age:.0f} s ago)")

    # ---- taking and releasing --------------------------------------------------------------------------
    def acquire(self) -> RunLock:
        """Take the lock or raise RunDirInUse naming the live holder; a stale lock is taken over."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.since = time.time()
        for _ in range(3):
            if self._link_new():
                self._start_heartbeat()
                return self
            record = self.holder()
            if record is None:
                continue  # released meanwhile: try again
            if not self.is_stale(record):
                raise RunDirInUse(f"run directory {self.path.parent} is in use by {self.describe(record)}; "
                                  f"wait for it to finish or choose another run.dir (the lock {self.path} is "
                                  f"stale after {self.stale_after_s:.0f} s without a heartbeat)")
            # Stale: move it aside under a unique name (rename is atomic; of two racers one wins), then retry.
            aside = self.path.with_name(f".{LOCK_NAME}.stale-{uuid.uuid4().hex[:8]}")
            try:
                os.rename(self.path, aside)
            except FileNotFoundError:
                continue
            try:
                moved = json.loads(aside.read_bytes())
            except (OSError, ValueError):
                moved = None  # unreadable: the record judged stale
            if moved is not None and moved != record:  # another process took it over first: give it back
                try:
                    os.link(aside, self.path)
                except FileExistsError:
                    pass
                aside.unlink(missing_ok=True)
                continue
            aside.unlink(missing_ok=True)
            self.took_over = record
        raise RunDirInUse(f"run directory {self.path.parent}: could not take {self.path} (other processes keep "
                          "taking it)")

    def _link_new(self) -> bool:
        tmp = self.path.with_name(f".{LOCK_NAME}.{self.token}")
        tmp.write_bytes(self._record())
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="crescent-run-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            record = self.holder()
            if record is None or record.get("token") != self.token:
                self.lost = True  # broken by someone who judged it stale: stop claiming it
                print(f"crescent: warning: lost the run-directory lock {self.path} "
                      f"(now: {self.describe(record) if record else 'nobody'})", file=sys.stderr)
                return
            tmp = self.path.with_name(f".{LOCK_NAME}.{self.token}")
            try:
                tmp.write_bytes(self._record())
                os.replace(tmp, self.path)
            except OSError:  # a full disk or a hiccup of the volume: try again at the next beat
                tmp.unlink(missing_ok=True)

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        record = self.holder()
        if record is not None and record.get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
