"""Run untrusted generated programs (HumanEval completions) away from the evaluating process.

Each program runs in a separate process with a wall-clock timeout, an address-space (RLIMIT_AS), CPU-time and
file-size limit, an empty temporary working directory and a minimal environment. Where the machine allows it
(root, or CAP_SYS_ADMIN, and util-linux `unshare`), it also gets new network, mount and PID namespaces: no network
at all (only a downed loopback), world-writable directories replaced by a private tmpfs, and an unprivileged uid, so
it cannot write outside its directory; killing the namespace's first process kills every process it started.
Otherwise it runs with the limits alone, and `isolation()` says so.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

ALLOW_ENV = "CRESCENT_ALLOW_CODE_EXECUTION"
REFUSAL = (
    "refusing to execute model-generated code: HumanEval scores programs by running them. Pass "
    "--allow-code-execution to run them in the sandbox (separate process, time/memory/CPU limits, no network "
    "where the machine allows a network namespace, empty working directory)."
)
_CHILD = Path(__file__).with_name("sandbox_child.py")
_NAMESPACES = ["--net", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc"]


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 10.0
    memory_bytes: int = 1 << 30
    cpu_seconds: int | None = None  # default: the timeout rounded up
    file_size_bytes: int = 16 << 20
    max_processes: int = 64
    tmpfs_size: str = "64m"
    python: str = field(default_factory=lambda: default_python())
    uid: int = 65534  # nobody
    gid: int = 65534

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ValueError(f"sandbox: timeout_s={self.timeout_s!r} must be > 0")
        if self.memory_bytes < (64 << 20):
            raise ValueError(f"sandbox: memory_bytes={self.memory_bytes!r} must be at least 64 MiB (the interpreter)")


@dataclass
class ExecutionResult:
    passed: bool
    status: str  # passed | failed | timeout | error
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float


def _world_executable(path: str) -> bool:
    """Whether an unprivileged user can run `path` (o+x on the file and on every directory above it)."""
    p = Path(path)
    return p.is_file() and all(q.stat().st_mode & 0o001 for q in [p, *p.parents])


def default_python() -> str:
    """The interpreter for generated programs: $CRESCENT_SANDBOX_PYTHON, else ours if the unprivileged sandbox
    user can execute it, else the system's python3 (programs need only the standard library)."""
    if os.environ.get("CRESCENT_SANDBOX_PYTHON"):
        return os.environ["CRESCENT_SANDBOX_PYTHON"]
    for candidate in (os.path.realpath(sys.executable), "/usr/bin/python3", "/usr/local/bin/python3"):
        if _world_executable(os.path.realpath(candidate)):
            return os.path.realpath(candidate)
    return os.path.realpath(sys.executable)


def allowed() -> bool:
    return os.environ.get(ALLOW_ENV, "") == "1"


def require_allowed() -> None:
    if not allowed():
        raise PermissionError(REFUSAL)


@functools.cache
def isolation() -> str:
    """'namespaces' when network/mount/PID namespaces can be created here, else 'limits-only'."""
    exe = shutil.which("unshare")
    if exe is None:
        log.warning("sandbox: util-linux `unshare` not found; generated code runs with resource limits only "
                    "(no network isolation)")
        return "limits-only"
    probe = subprocess.run([exe, *_NAMESPACES, "true"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        log.warning("sandbox: cannot create namespaces (%s); generated code runs with resource limits only "
                    "(no network isolation)", probe.stderr.strip() or probe.returncode)
        return "limits-only"
    return "namespaces"


def run_program(source: str, limits: SandboxLimits | None = None) -> ExecutionResult:
    """Run `source` as a Python program; passed == exit status 0 within the limits."""
    limits = limits or SandboxLimits()
    host = Path(tempfile.mkdtemp(prefix="crescent-sandbox-"))
    try:
        workdir = host / "work"
        workdir.mkdir()
        spec = {"source": source, "memory_bytes": limits.memory_bytes, "file_size_bytes": limits.file_size_bytes,
                "cpu_seconds": limits.cpu_seconds or int(limits.timeout_s) + 1, "tmpfs_size": limits.tmpfs_size,
                "max_processes": limits.max_processes, "python": limits.python, "uid": limits.uid,
                "gid": limits.gid, "workdir": str(workdir)}
        (host / "spec.json").write_text(json.dumps(spec))
        child = [os.path.realpath(sys.executable), "-I", str(_CHILD), str(host / "spec.json")]
        if isolation() == "namespaces":
            command = [shutil.which("unshare"), *_NAMESPACES, *child]
        else:
            command = [*child, "--no-namespaces"]
            if os.getuid() == 0:
                os.chmod(host, 0o755)
        return _run(command, host, limits)
    finally:
        shutil.rmtree(host, ignore_errors=True)


def _run(command: list[str], host: Path, limits: SandboxLimits) -> ExecutionResult:
    start = time.monotonic()
    with open(host / "stdout", "wb") as out, open(host / "stderr", "wb") as err:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=host,
                                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, start_new_session=True)
        try:
            returncode = proc.wait(timeout=limits.timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            returncode, timed_out = None, True
        _kill_group(proc)  # anything the program left behind in its session
    seconds = time.monotonic() - start
    stdout, stderr = _tail(host / "stdout"), _tail(host / "stderr")
    if timed_out:
        return ExecutionResult(False, "timeout", None, stdout, stderr, seconds)
    status = "passed" if returncode == 0 else "failed"
    return ExecutionResult(returncode == 0, status, returncode, stdout, stderr, seconds)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _tail(path: Path, limit: int = 8192) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - limit))
        return f.read().decode("utf-8", errors="replace")


def run_programs(sources: list[str], limits: SandboxLimits | None = None, workers: int = 2) -> list[ExecutionResult]:
    """Run many programs, `workers` at a time (each in its own sandbox), results in input order."""
    if workers < 1:
        raise ValueError(f"sandbox: workers={workers!r} must be >= 1")
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda s: run_program(s, limits), sources))


