"""The measuring half of bench/gpu_suite.sh: runs each measurement of bench/_gpu_measure.py in its own process
under a time budget, reads the gpu tests' JUnit XML, and writes report.json and report.md into the output
directory, then prints one `name: value` line per figure with the issue's goal next to it (last line:
`gpu_goals_met: K/N`). `--check DIR` validates a report directory against the format (what --dry-run checks).

Usage: python -m bench._gpu_suite --out DIR [--dry-run] [--only NAME ...] [--tests-xml F --tests-log F
       --tests-rc N --tests-wall S] | --check DIR [--log FILE]
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORMAT = "crescent-gpu-suite/1"
# Seconds each measurement may take (killed after); with the tests' 190 s + 10 s (gpu_suite.sh's TESTS_BUDGET_S) and the
# start-up the suite stays under 8 minutes.
BUDGET_S = {"peak": 20, "train": 80, "optimizer": 30, "newton_schulz": 30, "moe": 90}
# figure: (unit, what it is, goal as (op, bound) or None, where the goal comes from)
FIGURES = {
    "small_train_tokens_per_s": ("tokens/s", "small preset, Muon+AdamW, bf16 autocast, small-gpu.yaml batch", None, ""),
    "small_mfu": ("fraction", "model FLOPs (counting.py) x tokens/s / 989 TFLOP/s", (">=", 0.35), "issue 18"),
    "small_mfu_of_measured_peak": ("fraction", "the same over the measured bf16 matmul rate", None, ""),
    "muon_step_fraction_of_fwd_bwd": ("fraction", "optimizer step / forward+backward at the global batch",
                                      ("<=", 0.03), "issue 18"),
    "muon_step_vs_torch": ("x", "torch.optim.Muon+AdamW step time / ours, small, same gradients", (">=", 1.2),
                           "issue 18 (set for the CPU)"),
    "ns_speedup_vs_torch": ("x", "torch.optim.Muon's NS time / ours, bench shapes, geometric mean", (">=", 1.3),
                            "issue 18"),
    "ns_speedup_vs_torch_auto": ("x", "the same with ns_method auto (Gram NS on rectangular)", None, ""),
    "moe_speedup_vs_transformers": ("x", "fwd+bwd tokens/s ours / transformers DeepseekV3, bf16 weights",
                                    (">=", 1.5), "issue 18"),
    "moe_speedup_vs_transformers_autocast": ("x", "the same, bf16 autocast over fp32 weights", None, ""),
    "bf16_matmul_tflops": ("TFLOP/s", "8192^3 bf16 matmul, median", None, ""),
}
SOURCE = {"small_train_tokens_per_s": "train", "small_mfu": "train", "small_mfu_of_measured_peak": "train",
          "muon_step_fraction_of_fwd_bwd": "train", "muon_step_vs_torch": "optimizer", "ns_speedup_vs_torch":
          "newton_schulz", "ns_speedup_vs_torch_auto": "newton_schulz", "moe_speedup_vs_transformers": "moe",
          "moe_speedup_vs_transformers_autocast": "moe", "bf16_matmul_tflops": "peak"}
LINE = re.compile(r"^(\w+): (\S+)(?:  goal ([<>]=) (\S+) (met|missed|not judged))?$")


def run_measurements(names: list[str], dry_run: bool, work: Path) -> tuple[dict, dict]:
    """Each measurement in a child process of its own on the GPU (a CUDA fault cannot spoil the next), all in
    one child in a dry run (one torch and transformers import instead of four). Returns ({name: {"ok",
    "wall_s", "figures", "details", "error"}}, the children's environment)."""
    groups = [names] if dry_run else [[n] for n in names]
    results, env = {}, {}
    for group in groups:
        budget = sum(BUDGET_S[n] for n in group)
        cmd = [sys.executable, "-m", "bench._gpu_measure", *group, "--json-dir", str(work),
               "--device", "cpu" if dry_run else "cuda", "--size", "toy" if dry_run else "full"]
        print(f"== measure {' '.join(group)} (budget {budget} s)", flush=True)
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True, timeout=budget)
            sys.stdout.write(proc.stderr[-6000:])
            crash = None if proc.returncode in (0, 1) else f"exit {proc.returncode}: {proc.stderr.strip()[-1500:]}"
        except subprocess.TimeoutExpired:
            crash = f"killed after its budget of {budget} s"
        wall = time.perf_counter() - start
        if not env and (work / "environment.json").is_file():
            env = json.loads((work / "environment.json").read_text())
        for name in group:
            path = work / f"{name}.json"
            if path.is_file():
                r = json.loads(path.read_text())
                results[name] = {"ok": r["error"] is None, "wall_s": r["wall_s"], "figures": r["figures"],
                                 "details": r["details"], "error": r["error"]}
            else:
                results[name] = {"ok": False, "wall_s": wall, "figures": {}, "details": {},
                                 "error": crash or "no result written"}
            if not results[name]["ok"]:
                print(f"measurement {name} failed: {results[name]['error'][-600:]}", flush=True)
    return results, env


def read_tests(xml_path: str | None, log_path: str | None, rc: int | None, wall: float | None) -> dict:
    """The gpu tests' counts from pytest's JUnit XML; from its -v log when pytest was killed before writing it."""
    tests = {"collected": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": [],
             "skip_reasons": [], "exit_code": rc, "wall_s": wall, "source": None}
    if xml_path and Path(xml_path).is_file():
        tests["source"] = "junit"
        for case in ET.parse(xml_path).getroot().iter("testcase"):
            tests["collected"] += 1
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            outcome = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
            if outcome is None:
                tests["passed"] += 1
            elif outcome.tag == "skipped":
                tests["skipped"] += 1
                tests["skip_reasons"].append(f"{name}: {outcome.get('message', '')}"[:300])
            else:
                tests["failed" if outcome.tag == "failure" else "errors"] += 1
                tests["failures"].append(f"{name}: {(outcome.get('message') or '').splitlines()[:1]}"[:500])
    elif log_path and Path(log_path).is_file():
        tests["source"] = "log (no JUnit XML: pytest did not finish)"
        for m in re.finditer(r"^(tests/\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED)", Path(log_path).read_text(), re.M):
            tests["collected"] += 1
            key = {"PASSED": "passed", "FAILED": "failed", "ERROR": "errors", "SKIPPED": "skipped"}[m.group(2)]
            tests[key] += 1
            if key in ("failed", "errors"):
                tests["failures"].append(m.group(1))
    return tests


def judge(name: str, value: float | None, dry_run: bool) -> str | None:
    goal = FIGURES[name][2]
    if goal is None or value is None:
        return None
    if dry_run:
        return "not judged"
    op, bound = goal
    return "met" if (value >= bound if op == ">=" else value <= bound) else "missed"


def build_report(measurements: dict, tests: dict, env: dict, dry_run: bool, wall: float) -> dict:
    values = {name: measurements.get(SOURCE[name], {}).get("figures", {}).get(name) for name in FIGURES}
    if values["small_mfu"] is not None and values["bf16_matmul_tflops"]:
        values["small_mfu_of_measured_peak"] = values["small_mfu"] * 989 / values["bf16_matmul_tflops"]
    figures = []
    for name, (unit, what, goal, origin) in FIGURES.items():
        value = values[name]
        figures.append({"name": name, "value": value, "unit": unit, "what": what,
                        "goal": None if goal is None else f"{goal[0]} {goal[1]:g}", "goal_from": origin or None,
                        "status": judge(name, value, dry_run), "measurement": SOURCE[name]})
    return {"format": FORMAT, "dry_run": dry_run, "finished": datetime.now(UTC).isoformat(timespec="seconds"),
            "wall_s": wall, "environment": env, "tests": tests, "figures": figures, "measurements": measurements}


def figure_lines(report: dict) -> list[str]:
    lines = [f"gpu_tests_{k}: {report['tests'][k]}" for k in ("collected", "passed", "failed", "errors", "skipped")]
    for f in report["figures"]:
        value = "none" if f["value"] is None else f"{f['value']:.4g}"
        goal = f"  goal {f['goal']} {f['status']}" if f["goal"] and f["status"] else ""
        lines.append(f"{f['name']}: {value}{goal}")
    judged = [f for f in report["figures"] if f["status"] in ("met", "missed")]
    met = sum(f["status"] == "met" for f in judged)
    goals = sum(f["goal"] is not None for f in report["figures"])
    lines.append(f"gpu_goals_met: {'dry-run' if report['dry_run'] else f'{met}/{goals}'}")
    return lines


def markdown(report: dict) -> str:
    env, tests = report["environment"], report["tests"]
    env = {"torch": None, "transformers": None, "driver": None, **env}
    title = "GPU suite (dry run on the CPU: toy sizes, no figure is a measurement)" if report["dry_run"] else \
        f"GPU suite on {env.get('gpu', '?')}"
    out = [f"# {title}", "",
           f"torch {env['torch']}, transformers {env.get('transformers')}, python {env['python']}, driver "
           f"{env.get('driver')}; finished {report['finished']} in {report['wall_s']:.0f} s.", "",
           f"Tests marked `gpu`: {tests['collected']} collected, {tests['passed']} passed, {tests['failed']} failed, "
           f"{tests['errors']} errors, {tests['skipped']} skipped.", ""]
    out += [f"- failed: {f}" for f in tests["failures"]] + [f"- skipped: {s}" for s in tests["skip_reasons"][:20]]
    out += ["", "| figure | value | unit | goal | status | what |", "| --- | --- | --- | --- | --- | --- |"]
    for f in report["figures"]:
        value = "—" if f["value"] is None else f"{f['value']:.4g}"
        out.append(f"| {f['name']} | {value} | {f['unit']} | {f['goal'] or ''} | {f['status'] or ''} | {f['what']} |")
    failed = [f"- {n}: {m['error']}" for n, m in report["measurements"].items() if not m["ok"]]
    if failed:
        out += ["", "Measurements that failed:", *failed]
    return "\n".join(out) + "\n"


def _number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def check(out_dir: Path, log: Path | None = None) -> list[str]:
    """What is wrong with a report directory (empty: nothing): report.json's schema, report.md's table, and the
    printed `name: value` lines of the log against the JSON."""
    problems = []
    try:
        report = json.loads((out_dir / "report.json").read_text())
    except (OSError, ValueError) as err:
        return [f"report.json: {err}"]
    for key in ("format", "dry_run", "finished", "wall_s", "environment", "tests", "figures", "measurements"):
        if key not in report:
            problems.append(f"report.json: missing key {key!r}")
    if problems:
        return problems
    if report["format"] != FORMAT:
        problems.append(f"report.json: format={report['format']!r}, expected {FORMAT!r}")
    names = [f.get("name") for f in report["figures"]]
    if names != list(FIGURES):
        problems.append(f"report.json: figures {names} are not {list(FIGURES)}")
    for f in report["figures"]:
        v = f.get("value")
        if v is not None and not _number(v):
            problems.append(f"report.json: figure {f.get('name')} value={v!r} is not a finite number")
        if f.get("status") not in (None, "met", "missed", "not judged"):
            problems.append(f"report.json: figure {f.get('name')} status={f.get('status')!r}")
    for name, m in report["measurements"].items():
        if set(m) != {"ok", "wall_s", "figures", "details", "error"}:
            problems.append(f"report.json: measurement {name} keys {sorted(m)}")
    md = (out_dir / "report.md").read_text() if (out_dir / "report.md").is_file() else ""
    for name in names:
        if not re.search(rf"^\| {name} \| ", md, re.M):
            problems.append(f"report.md: no table row for {name}")
    if log is not None:
        printed = {}
        for line in log.read_text().splitlines():
            m = LINE.match(line)
            if m:
                printed[m.group(1)] = m
        for f in report["figures"]:
            m = printed.get(f["name"])
            if m is None:
                problems.append(f"log: no `{f['name']}: value` line")
            elif _number(f["value"]) and not (_number(_float(m.group(2))) and
                                              math.isclose(_float(m.group(2)), f["value"], rel_tol=1e-3)):
                problems.append(f"log: {f['name']} printed {m.group(2)}, report.json has {f['value']}")
            elif f["goal"] and (m.group(3) is None or f"{m.group(3)} {m.group(4)}" != f["goal"]):
                problems.append(f"log: {f['name']} line lacks its goal {f['goal']}")
        if "gpu_goals_met" not in printed:
            problems.append("log: no last line `gpu_goals_met: ...`")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="the output directory (report.json, report.md)")
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU: checks the suite, not the GPU")
    parser.add_argument("--only", action="append", choices=sorted(BUDGET_S), help="measure only these (repeatable)")
    parser.add_argument("--tests-xml"), parser.add_argument("--tests-log")
    parser.add_argument("--tests-rc", type=int), parser.add_argument("--tests-wall", type=float)
    parser.add_argument("--check", type=Path, metavar="DIR", help="validate a report directory and exit")
    parser.add_argument("--log", type=Path, help="with --check: the suite's log, for the printed lines")
    args = parser.parse_args(argv)
    if args.check is not None:
        problems = check(args.check, args.log)
        for p in problems:
            print(f"gpu_suite check: {p}")
        print(f"gpu_suite_format_ok: {int(not problems)}")
        return 1 if problems else 0
    if args.out is None:
        parser.error("--out DIR is required (or --check DIR)")
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="crescent-gpu-suite-") as work:
        measurements, env = run_measurements(args.only or list(BUDGET_S), args.dry_run, Path(work))
    env = {"python": platform.python_version(), **env, "dry_run": args.dry_run}
    tests = read_tests(args.tests_xml, args.tests_log, args.tests_rc, args.tests_wall)
    report = build_report(measurements, tests, env, args.dry_run,
                          time.perf_counter() - start + (args.tests_wall or 0.0))
    (args.out / "report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (args.out / "report.md").write_text(markdown(report))
    print(markdown(report))
    print("\n".join(figure_lines(report)), flush=True)
    return 0 if tests_ok(tests) and all(m["ok"] for m in measurements.values()) else 1


def tests_ok(tests: dict) -> bool:
    """Tests not run (--skip-tests: no exit code, no file) are no failure; tests that ran must have exited 0 (a
    pytest killed at its budget exits 124, and its log counts only the tests that finished)."""
    if tests["exit_code"] is None and tests["source"] is None:
        return True
    return tests["exit_code"] == 0 and tests["failed"] == 0 and tests["errors"] == 0 and tests["collected"] > 0


if __name__ == "__main__":
    sys.exit(main())
