"""The run-directory lock: one holder at a time across processes (and hosts, through the heartbeat), a clear message
naming the holder, stale locks taken over. Real processes; `crescent train` against a held lock is in
test_robust_train.py."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from robust_helpers import alive

from app.runlock import LOCK_NAME, RunDirInUse, RunLock

ROOT = Path(__file__).resolve().parents[1]
HOLD = """
import sys, time
sys.path.insert(0, {root!r})
from app.runlock import RunLock, RunDirInUse
try:
    lock = RunLock({run_dir!r}, heartbeat_s=0.2, stale_after_s=60).acquire()
except RunDirInUse:
    print("busy", flush=True)
    sys.exit(3)
print("locked", flush=True)
time.sleep({hold_s})
lock.release()
"""


def _holder(run_dir: Path, hold_s: float = 60) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD.format(root=str(ROOT), run_dir=str(run_dir), hold_s=hold_s)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_process_is_refused_with_the_holders_host_pid_and_start(tmp_path):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(RunDirInUse) as err:
            RunLock(tmp_path).acquire()
        message = str(err.value)
        assert message.startswith(f"run directory {tmp_path} is in use by pid {proc.pid} on host "
                                  f"{socket.gethostname()} since 20")
        assert "wait for it to finish or choose another run.dir" in message
    finally:
        proc.kill()
        proc.wait()


def test_the_lock_of_a_killed_process_on_this_host_is_taken_over_at_once(tmp_path):
    proc = _holder(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    lock = RunLock(tmp_path).acquire()
    try:
        assert lock.took_over["pid"] == proc.pid
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    finally:
        lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_lock_whose_pid_now_runs_another_process_is_taken_over_at_once(tmp_path):
    # A Job's replacement pod: the dead pod's hostname, a fresh PID namespace, so the new trainer often has the old
    # trainer's pid. The record's start (boot id and start time) tells the dead holder from the live newcomer.
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        live = {"host": socket.gethostname(), "since": time.time() - 5, "heartbeat": time.time(), "token": "x"}
        cases = [({**live, "pid": os.getpid(), "start": "another-boot:12345"}, True),  # this pid, older process
                 ({**live, "pid": sleeper.pid, "start": "another-boot:12345"}, True),
                 ({**live, "pid": os.getpid()}, True),  # an older record without a start naming this process
                 ({**live, "pid": sleeper.pid}, False)]  # without a start: a live pid still holds
        for record, stale in cases:
            (tmp_path / LOCK_NAME).write_text(json.dumps(record))
            if stale:
                lock = RunLock(tmp_path).acquire()
                assert lock.took_over == record
                lock.release()
            else:
                with pytest.raises(RunDirInUse, match=f"in use by pid {sleeper.pid} on host"):
                    RunLock(tmp_path).acquire()
        # The sleeper's own start: the holder it names is that very process, alive.
        with open(f"/proc/{sleeper.pid}/stat") as f:
            ticks = f.read().rsplit(")", 1)[1].split()[19]
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        (tmp_path / LOCK_NAME).write_text(json.dumps({**live, "pid": sleeper.pid, "start": f"{boot}:{ticks}"}))
        with pytest.raises(RunDirInUse, match=f"in use by pid {sleeper.pid} on host"):
            RunLock(tmp_path).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    lock = RunLock(tmp_path).acquire()  # the holder is gone now
    assert lock.took_over["pid"] == sleeper.pid and lock.holder()["start"] == lock.start is not None
    lock.release()


def test_a_lock_from_another_host_holds_until_its_heartbeat_is_stale(tmp_path):
    record = {"host": "other-node-7", "pid": 1, "since": time.time() - 600, "heartbeat": time.time(), "token": "x"}
    (tmp_path / LOCK_NAME).write_text(json.dumps(record))
    with pytest.raises(RunDirInUse, match="in use by pid 1 on host other-node-7 since .* \\(heartbeat 0 s ago\\)"):
        RunLock(tmp_path, stale_after_s=120).acquire()
    record["heartbeat"] = time.time() - 121  # that node died two minutes ago
    (tmp_path / LOCK_NAME).write_text(json.dumps(record))
    lock = RunLock(tmp_path, stale_after_s=120).acquire()
    assert lock.took_over["host"] == "other-node-7"
    lock.release()


def test_the_heartbeat_advances_while_held_and_release_removes_the_lock(tmp_path):
    lock = RunLock(tmp_path, heartbeat_s=0.1, stale_after_s=5).acquire()
    first = lock.holder()["heartbeat"]
    time.sleep(0.5)
    assert lock.holder()["heartbeat"] > first and lock.holder()["since"] == pytest.approx(lock.since)
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no temporary record files left either


def test_of_processes_racing_for_the_lock_exactly_one_wins(tmp_path):
    script = HOLD.format(root=str(ROOT), run_dir=str(tmp_path), hold_s=60)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(6)]
    outcomes = [p.stdout.readline().strip() for p in procs]
    for p in procs:
        p.kill()
        p.wait(timeout=30)
        assert not alive(p.pid)
    assert sorted(outcomes) == ["busy"] * 5 + ["locked"]
