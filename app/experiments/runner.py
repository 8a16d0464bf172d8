"""`crescent experiment run`: the grid of an experiment spec as ordinary `crescent train` runs, one at a time, each
a child MLflow run of one parent run; then the report.

Work directory layout (default runs/experiments/NAME-SIZE): points/POINT/ (each point's run directory:
checkpoints, exports), configs/POINT.yaml (the config it trained with), logs/POINT.log, report/ (table, figures).

Resumable. A point counts as done when its run is FINISHED in MLflow, saw its whole token budget, and has its
measurements; the planner (plan.py) then decides what is left. An interrupted point runs again with the same run
directory, so `crescent train` resumes it from its last checkpoint into the same MLflow run. When the runner is
stopped (SIGTERM, Ctrl-C) it passes SIGTERM to the training process (which saves a checkpoint and exits); when it
is killed outright, the kernel sends the training process SIGTERM (PR_SET_PDEATHSIG). A point that fails is
recorded on the parent run (tag crescent.failed.POINT) and the rest go on; the next `run` tries it again.
"""
from __future__ import annotations

import ctypes
import os
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from app.experiments import tracking
from app.experiments.configs import blocked_arms, get_dotted, point_config
from app.experiments.plan import Outcome, Plan, Point, plan, static_points
from app.experiments.spec import ExperimentSpec, SpecError

DEFAULT_MLFLOW_EXPERIMENT = "crescent-experiments"
COST_CPU, COST_WALL = "experiment/cpu_seconds", "experiment/wall_seconds"
FINGERPRINT = "crescent.config_fingerprint"
PREEMPTED = 143


@dataclass
class RunnerOptions:
    work_dir: Path
    tracking_uri: str | None = None
    mlflow_experiment: str = DEFAULT_MLFLOW_EXPERIMENT
    key: str | None = None  # which parent run: default the absolute work directory
    new: bool = False  # a new parent run even if one with this key exists
    python: str = sys.executable
    report: bool = True

    @property
    def parent_key(self) -> str:
        return self.key or str(self.work_dir.resolve())


@dataclass
class RunSummary:
    parent_id: str
    launched: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    waiting: list[tuple[str, str, str]] = field(default_factory=list)
    interrupted: bool = False
    report_dir: Path | None = None


def default_work_dir(spec: ExperimentSpec) -> Path:
    return Path("runs") / "experiments" / f"{spec.name}-{spec.size}"


class ExperimentRunner:
    def __init__(self, spec: ExperimentSpec, options: RunnerOptions):
        self.spec = spec
        self.options = options
        self.work_dir = options.work_dir
        self.blocked = blocked_arms(spec)
        self._child: subprocess.Popen | None = None
        self._stop = False
        self.exp: tracking.Experiment | None = None

    # ------------------------------------------------------------------------------------------ parent
    def open(self) -> tracking.Experiment:
        if self.exp is None:
            spec = self.spec
            self.exp = tracking.find_or_create_parent(
                self.options.tracking_uri, self.options.mlflow_experiment, spec.name, spec.size,
                self.options.parent_key, new=self.options.new,
                params={"spec": spec.name, "size": spec.size, "kind": spec.kind, "config": spec.config,
                        "seeds": ",".join(map(str, spec.seeds))})
            self.work_dir.mkdir(parents=True, exist_ok=True)
            spec_file = self.work_dir / "spec.yaml"
            # The parent's own artifacts decide (not the work directory: another store's parent may have left
            # the file there): `crescent experiment report` reads the spec from this artifact.
            if spec.source and not tracking.has_artifact(self.exp, spec_file.name):
                spec_file.write_text(spec.source)
                tracking.log_artifact_files(self.exp, [str(spec_file)])
        return self.exp

    # ------------------------------------------------------------------------------------------ state
    def outcomes(self, kids: dict[str, tracking.ChildRun], failed_now: dict[str, str]) -> dict[str, Outcome]:
        out = {pid: Outcome(False) for pid in failed_now}
        for pid, kid in kids.items():
            if self.is_done(kid):
                out[pid] = Outcome(True, kid.val_loss)
        return out

    def is_done(self, kid: tracking.ChildRun) -> bool:
        return kid.done(bool(self.spec.measurements(kid.tags.get("crescent.arm", ""))))

    def current_plan(self, failed_now: dict[str, str] | None = None) -> tuple[Plan, dict[str, tracking.ChildRun]]:
        kids = tracking.children(self.open())
        return plan(self.spec, self.outcomes(kids, failed_now or {}), self.blocked), kids

    # ------------------------------------------------------------------------------------------ run
    def prepare(self) -> None:
        """What the points read and nobody else builds: the spec's corpus, the offline evaluation sets."""
        if self.spec.corpus is not None:
            from app.experiments.configs import build_corpus

            build_corpus(self.spec.corpus)
        if any("eval_tasks" in self.spec.measurements(a.name) for a in self.spec.arms):
            data_dir = Path(self.spec.analysis.get("eval", {}).get("data_dir", "data/eval"))
            if not (data_dir / "manifest.json").exists():
                subprocess.run([self.options.python, "-m", "app.cli", "eval", "data", "--out", str(data_dir)],
                               check=True)

    def run(self) -> RunSummary:
        """Every point the plan needs, then the report."""
        if self.options.new and (self.work_dir / "points").is_dir() and any((self.work_dir / "points").iterdir()):
            raise SpecError(f"--new needs a fresh work directory: {self.work_dir / 'points'} holds the runs of the "
                            "earlier parent (their checkpoints would resume into it); pass another --work-dir")
        exp = self.open()
        self._check_fingerprints(tracking.children(exp))
        self.prepare()
        exp.client.update_run(exp.parent_id, status="RUNNING")
        summary = RunSummary(exp.parent_id)
        failed_now: dict[str, str] = {}
        with self._forward_signals():
            while not self._stop:
                current, kids = self.current_plan(failed_now)
                summary.waiting = current.waiting
                if not current.todo:
                    break
                point = current.todo[0]
                rc, why = self.run_point(point, kids.get(point.id))
                if rc == 0:
                    summary.finished.append(point.id)
                elif self._stop or rc == PREEMPTED:
                    summary.interrupted = True
                    break
                else:
                    failed_now[point.id] = why
                    summary.failed[point.id] = why
                    print(f"crescent experiment: point {point.id} failed: {why.splitlines()[-1] if why else rc}",
                          file=sys.stderr)
                summary.launched.append(point.id)
        if summary.interrupted:
            print("crescent experiment: interrupted; run the same command again to continue", file=sys.stderr)
            return summary
        if self.options.report:
            from app.experiments.report import build_report

            summary.report_dir = build_report(exp, self.spec, self.work_dir / "report", self.blocked)
        waiting = sorted({f"{group}/{arm}" for group, arm, _ in summary.waiting})
        exp.client.set_tag(exp.parent_id, "crescent.waiting_arms", ", ".join(waiting) or "none")
        exp.client.set_terminated(exp.parent_id, status="FAILED" if summary.failed else "FINISHED")
        return summary

    def _check_fingerprints(self, kids: dict[str, tracking.ChildRun]) -> None:
        """Refuse to go on when finished runs were trained with another config than the spec now gives (a spec
        edited between two `run`s): their results would silently stand for points they are not."""
        from app.experiments.plan import Point

        stale = []
        for pid, kid in kids.items():
            t = kid.tags
            if FINGERPRINT not in t or "crescent.group" not in t:
                continue
            point = Point(t["crescent.group"], t["crescent.arm"], float(t["crescent.lr_scale"]), int(t["crescent.seed"]),
                          float(t.get("crescent.budget", "1.0")))
            try:
                current = point_config(self.spec, point, self.point_dir(pid), "", "", {}).fingerprint
            except (KeyError, StopIteration):  # its arm or group is no longer in the spec: never read
                continue
            if current != t[FINGERPRINT]:
                stale.append(pid)
        if stale:
            raise SpecError(f"{len(stale)} finished point(s) of this parent run were trained with another config "
                            f"than the spec now gives (e.g. {stale[:3]}); run the changed spec with --new and "
                            "another --work-dir")

    def run_static_point(self, index: int) -> int:
        """The Indexed Job's pod: point `index` of `static_points` (sweep values known before any result)."""
        points = static_points(self.spec, self.blocked)
        if not 0 <= index < len(points):
            raise SpecError(f"--point-index {index}: the {self.spec.name} spec has {len(points)} static points "
                            f"(0..{len(points) - 1})")
        kids = tracking.children(self.open())
        point = points[index]
        self.prepare()
        with self._forward_signals():
            rc, why = self.run_point(point, kids.get(point.id))
        if rc not in (0, PREEMPTED):
            print(f"crescent experiment: point {point.id} failed: {why}", file=sys.stderr)
        return rc

    def wait_for_static(self, poll_s: float = 30.0, timeout_s: float | None = None) -> None:
        """Block until every static point has finished or failed (the report step of the Indexed Job)."""
        ids = [p.id for p in static_points(self.spec, self.blocked)]
        start = time.monotonic()
        while True:
            kids = tracking.children(self.open())
            failed = tracking.failures(self.exp)
            left = [i for i in ids if not (i in kids and self.is_done(kids[i])) and i not in failed]
            if not left:
                return
            if timeout_s is not None and time.monotonic() - start > timeout_s:
                raise TimeoutError(f"{len(left)} static point(s) still running after {timeout_s:.0f} s: {left[:5]}")
            time.sleep(poll_s)

    # ------------------------------------------------------------------------------------------ one point
    def point_dir(self, point_id: str) -> Path:
        return self.work_dir / "points" / point_id

    def run_point(self, point: Point, kid: tracking.ChildRun | None) -> tuple[int, str]:
        """Train (or resume) the point, then measure it. Returns (exit code, why it failed)."""
        exp = self.open()
        run_dir = self.point_dir(point.id)
        init = None
        if point.init_from is not None:
            from components.checkpoint import list_exports

            exports = list_exports(self.point_dir(point.init_from) / "exports")
            if not exports:
                return 1, f"{point.init_from} has no export to start from in {self.point_dir(point.init_from)}"
            init = str(exports[-1].resolve())
        tags = {tracking.PARENT_TAG: exp.parent_id, tracking.POINT: point.id, tracking.EXPERIMENT: self.spec.name,
                tracking.SIZE: self.spec.size, "crescent.group": point.group, "crescent.arm": point.arm,
                "crescent.lr_scale": repr(point.lr_scale), "crescent.seed": str(point.seed),
                "crescent.budget": repr(point.budget)}
        try:
            pc = point_config(self.spec, point, run_dir.resolve(), exp.tracking_uri,
                              self.options.mlflow_experiment, tags, init)
        except (SpecError, ValueError) as err:
            tracking.record_failure(exp, point.id, str(err))
            return 2, str(err)
        pc.config["run"]["tags"]["crescent.tokens"] = str(pc.tokens)
        pc.config["run"]["tags"][FINGERPRINT] = pc.fingerprint
        if kid is not None and kid.tags.get(FINGERPRINT, pc.fingerprint) != pc.fingerprint:
            raise SpecError(f"point {point.id}: its run {kid.run_id} was trained with another config than the spec "
                            f"now gives (fingerprint {kid.tags[FINGERPRINT]} != {pc.fingerprint}); run the changed "
                            "spec with --new and another --work-dir")
        if kid is None or not kid.complete:
            rc, why = self._train(point, pc.config)
            if rc != 0:
                return self._train_failed(exp, point, rc, why)
            kid = tracking.children(exp).get(point.id)
            if kid is None or not kid.complete:
                # Its metrics may still wait in the run's journal (the finalize timeout ran out under load, so the
                # run stayed RUNNING): the same command again resumes at the schedule's end and delivers them.
                rc, why = self._train(point, pc.config)
                if rc != 0:
                    return self._train_failed(exp, point, rc, why)
                kid = tracking.children(exp).get(point.id)
            if kid is None or not kid.complete:
                why = f"crescent train exited 0 but MLflow has no complete run for {point.id} (expected {pc.tokens} tokens)"
                tracking.record_failure(exp, point.id, why)
                return 1, why
        if self.spec.measurements(point.arm) and not kid.measured:
            try:
                self._measure(kid, run_dir, pc.config)
            except Exception as err:  # noqa: BLE001 -- a failed measurement is the point's failure, reported
                why = f"measuring {point.id}: {type(err).__name__}: {err}"
                tracking.record_failure(exp, point.id, why)
                return 1, why
        tracking.clear_failure(exp, point.id)
        return 0, ""

    def _measure(self, kid: tracking.ChildRun, run_dir: Path, config: dict) -> None:
        from app.experiments.measure import measure_point

        exp = self.open()
        val = get_dotted(config, "data.val_shards")
        if val is None and get_dotted(config, "data.demo"):
            val = str(Path(get_dotted(config, "data.demo_root", "data/demo")) / "val")
        measurements = self.spec.measurements(kid.tags.get("crescent.arm", ""))
        measure_point(exp.client, exp.tracking_uri, kid.run_id, run_dir, measurements, val,
                      self.spec.analysis.get("eval"), Path.cwd())
        exp.client.set_tag(kid.run_id, tracking.MEASURED, "done")

    def _train_failed(self, exp, point: Point, rc: int, why: str) -> tuple[int, str]:
        """A launch that did not end well: recorded on the parent unless it was interrupted (retried then)."""
        if rc != PREEMPTED and not self._stop:
            tracking.record_failure(exp, point.id, why)
        return rc, why

    def _train(self, point: Point, config: dict) -> tuple[int, str]:
        cfg_path = self.work_dir / "configs" / f"{point.id}.yaml"
        log_path = self.work_dir / "logs" / f"{point.id}.log"
        cfg_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
        cmd = [self.options.python, "-m", "app.cli", "train", "--config", str(cfg_path)]
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
        print(f"crescent experiment: {point.id}: {' '.join(cmd)}", file=sys.stderr, flush=True)
        with open(log_path, "ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
            log.flush()
            before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic()
            self._child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                           start_new_session=True, preexec_fn=_die_with_parent)
            try:
                rc = self._child.wait()
            finally:
                self._child = None
            after, wall = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic() - start
            cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            log.write(f"=== exit {rc}: {wall:.0f} s wall, {cpu:.0f} CPU-s\n".encode())
        self._log_cost(point, cpu, wall)
        if rc == 0:
            return 0, ""
        return rc, f"crescent train exited {rc}; last lines of {log_path}:\n{_tail(log_path)}"

    def _log_cost(self, point: Point, cpu: float, wall: float) -> None:
        """What this launch cost, on the point's run (one value per launch; the report sums them): CPU seconds
        say what a run needs whatever else shares the machine, wall seconds what it took here."""
        kid = tracking.children(self.open()).get(point.id)
        if kid is None:
            return
        launch = len(tracking.history(self.exp, kid.run_id, COST_WALL))
        self.exp.client.log_metric(kid.run_id, COST_CPU, cpu, step=launch)
        self.exp.client.log_metric(kid.run_id, COST_WALL, wall, step=launch)

    # ------------------------------------------------------------------------------------------ signals
    def _forward_signals(self):
        runner = self

        class _Forward:
            def __enter__(self):
                self.previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
                if _main_thread():
                    for s in self.previous:
                        signal.signal(s, self.handle)
                return self

            def handle(self, signum, frame):
                runner._stop = True
                child = runner._child
                if child is not None and child.poll() is None:
                    child.send_signal(signal.SIGTERM)  # the trainer saves a checkpoint and exits 143

            def __exit__(self, *exc):
                if _main_thread():
                    for s, h in self.previous.items():
                        signal.signal(s, h)
                return False

        return _Forward()


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the runner dies (Linux prctl PR_SET_PDEATHSIG), so a killed runner
    leaves no orphan training on its run directory; the trainer checkpoints on SIGTERM."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except (AttributeError, OSError):
        pass


def _tail(path: Path, lines: int = 15) -> str:
    """The last lines the training process wrote (not the runner's own === header/footer lines)."""
    try:
        text = [line for line in path.read_text(errors="replace").splitlines() if not line.startswith("=== ")]
    except OSError:
        return ""
    return "\n".join(text[-lines:])
