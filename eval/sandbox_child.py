"""Runs inside the sandbox's fresh namespaces (started by `eval/sandbox.py`); standard library only.

As root in new mount/network/PID namespaces: hide every world-writable directory under a small private tmpfs,
create an empty working directory, drop to an unprivileged user, apply resource limits, then run the program
as a child and exit with its status (this process is PID 1 of the namespace; when it exits, everything in the
namespace dies with it). Without namespaces the same script runs with `--no-namespaces` and skips the mounts.

usage: python -I sandbox_child.py SPEC.json [--no-namespaces]
"""
import ctypes
import json
import os
import resource
import sys

MS_NOSUID, MS_NODEV = 2, 4
WRITABLE_DIRS = ("/tmp", "/var/tmp", "/run/lock", "/dev/shm", "/dev/mqueue")


def _mount_tmpfs(target: str, size: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    rc = libc.mount(b"tmpfs", target.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, f"size={size},mode=1777".encode())
    if rc != 0:
        raise OSError(ctypes.get_errno(), f"mount tmpfs on {target}")


def _limits(spec: dict) -> None:
    def cap(kind: int, value: int) -> None:
        resource.setrlimit(kind, (value, value))

    cap(resource.RLIMIT_AS, spec["memory_bytes"])
    cap(resource.RLIMIT_CPU, spec["cpu_seconds"])
    cap(resource.RLIMIT_FSIZE, spec["file_size_bytes"])
    cap(resource.RLIMIT_NOFILE, 64)
    cap(resource.RLIMIT_CORE, 0)
    if os.getuid() != 0:  # RLIMIT_NPROC counts per user; root ignores it
        cap(resource.RLIMIT_NPROC, spec["max_processes"])


def main() -> int:
    spec = json.loads(open(sys.argv[1]).read())
    namespaces = "--no-namespaces" not in sys.argv
    if namespaces:
        for target in WRITABLE_DIRS:
            if os.path.isdir(target):
                _mount_tmpfs(target, spec["tmpfs_size"])
        workdir = "/tmp/work"
        os.mkdir(workdir, 0o700)
    else:
        workdir = spec["workdir"]
    program = os.path.join(workdir, "program.py")
    with open(program, "w") as f:
        f.write(spec["source"])
    if os.getuid() == 0:
        os.chown(workdir, spec["uid"], spec["gid"])
        os.chown(program, spec["uid"], spec["gid"])
    pid = os.fork()
    if pid == 0:
        try:
            os.chdir(workdir)
            if os.getuid() == 0:
                os.setgroups([])
                os.setgid(spec["gid"])
                os.setuid(spec["uid"])
            _limits(spec)
            env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
                   "PYTHONDONTWRITEBYTECODE": "1", "TMPDIR": workdir}
            os.execve(spec["python"], [spec["python"], "-I", "program.py"], env)
        except BaseException as err:  # noqa: BLE001 - report and die without running the program
            os.write(2, f"sandbox: could not start the program: {err!r}\n".encode())
        os._exit(126)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


if __name__ == "__main__":
    sys.exit(main())
