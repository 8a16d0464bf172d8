"""`crescent eval data|run|watch` end to end: real lm-eval, real sandbox, a real MLflow sqlite store."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from test_eval_fixtures import write_export, write_gsm8k, write_tokenizer

from eval.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalws")
    tok = write_tokenizer(root / "tok")
    assert main(["data", "--out", str(root / "data"), "--gsm8k-test", str(write_gsm8k(root / "gsm8k.jsonl"))]) == 0
    return root, tok


@pytest.fixture(scope="module")
def mlflow_db(tmp_path_factory):
    """One real sqlite MLflow store for the module (creating its schema takes seconds)."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()
    return root, uri


@pytest.fixture
def store(mlflow_db, request, monkeypatch):
    """A fresh training run, with its loss curve, in the module's store."""
    root, uri = mlflow_db
    monkeypatch.chdir(root)  # artifacts land in ./mlruns beside the store
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment(f"train-{request.node.name}"))
    for step in (50, 100, 150, 200):
        client.log_metric(run.info.run_id, "train/loss", 5.0 - step / 100, step=step)
    return uri, client, run.info.run_id


def _export_steps(exports: Path, tok, store, steps) -> Path:
    """Exports of the store's training run at `steps` (tiny models, tagged with the run) in `exports`."""
    uri, _, run_id = store
    for step in steps:
        write_export(exports, tok, step=step, run_id=run_id, tracking_uri=uri)
    return exports


def _watch_args(exports: Path, tasks: str, data: Path, limit: int, *extra: str) -> list[str]:
    """`crescent eval watch` over `exports`: `tasks` on `limit` examples each, task data from `data`."""
    return ["watch", "--checkpoints", str(exports), "--tasks", tasks, "--limit", str(limit), "--data-dir", str(data),
            *extra]


def test_data_builds_all_three_sets(workspace):
    root, _ = workspace
    manifest = json.loads((root / "data" / "manifest.json").read_text())["tasks"]
    assert manifest["humaneval"]["test"] == 164
    assert len(manifest["mmlu_dev"]["subjects"]) == 57 and manifest["mmlu_dev"]["dev"] >= 280
    assert "mmlu" not in manifest  # no test split offline: lm-eval ships dev questions only
    assert manifest["gsm8k"]["test"] == 6
    first = json.loads((root / "data" / "mmlu" / "dev" / "anatomy.jsonl").read_text().splitlines()[0])
    assert len(first["choices"]) == 4 and first["answer"] in range(4)


def test_data_rejects_bad_gsm8k_and_reads_original_mmlu(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "no final number"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: answer must end with '#### <number>'"):
        from eval.data import build_eval_data
        build_eval_data(tmp_path / "out", gsm8k_test=bad)
    mmlu = tmp_path / "mmlu" / "data"
    for split, n in (("dev", 5), ("test", 7)):
        (mmlu / split).mkdir(parents=True)
        rows = "".join(f'"Q{i} of {split}?",w,x,y,z,{"ABCD"[i % 4]}\n' for i in range(n))
        (mmlu / split / f"anatomy_{split}.csv").write_text(rows)
    from eval.data import build_eval_data
    manifest = build_eval_data(tmp_path / "out2", mmlu_dir=tmp_path / "mmlu")["tasks"]
    assert manifest["mmlu"]["subjects"] == ["anatomy"] and manifest["mmlu"]["test"] == 7
    assert manifest["mmlu"]["dev"] == 5 and len(manifest["mmlu_dev"]["subjects"]) == 57


def test_run_puts_metrics_on_the_training_run_at_the_checkpoint_step(workspace, store, tmp_path, capsys):
    root, tok = workspace
    uri, client, run_id = store
    export = write_export(tmp_path / "exports", tok, step=100, run_id=run_id, tracking_uri=uri)
    rc = main(["run", "--checkpoint", str(export), "--tasks", "mmlu_dev,gsm8k,humaneval", "--limit", "2",
               "--allow-code-execution", "--data-dir", str(root / "data"), "--output", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert re.search(r"mmlu_dev\s+local\s+dev\s+4\s+2\s+114\s+acc", out)  # 2 per subject, 4-shot at most
    for key in ("eval/mmlu_dev/acc", "eval/gsm8k/exact_match/strict-match", "eval/humaneval/pass_at_1"):
        history = client.get_metric_history(run_id, key)
        assert [(m.step, 0.0 <= m.value <= 1.0) for m in history] == [(100, True)], key
    assert client.get_metric_history(run_id, "eval/mmlu/acc") == []  # kept for MMLU's real test split
    tags = client.get_run(run_id).data.tags
    assert tags["eval.mmlu_dev.split"] == "dev" and tags["eval.mmlu_dev.num_fewshot"] == "4"
    assert tags["eval.gsm8k.split"] == "test" and tags["eval.gsm8k.num_fewshot"] == "4"
    assert tags["eval.humaneval.num_fewshot"] == "0" and tags["eval.mmlu_dev.limit"] == "2"
    assert {t: tags[f"crescent.eval.step-00000100.{t}"] for t in ("mmlu_dev", "gsm8k", "humaneval")} == \
        {"mmlu_dev": "done", "gsm8k": "done", "humaneval": "done"}
    artifacts = sorted(a.path for a in client.list_artifacts(run_id, "eval/step-00000100"))
    assert artifacts == [f"eval/step-00000100/{t}.json" for t in ("gsm8k", "humaneval", "mmlu_dev")]
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["step"] == 100 and saved["tasks"]["humaneval"]["documents"] == 2
    assert saved["sandbox"] in ("namespaces", "limits-only")


def test_run_without_run_id_goes_to_the_eval_experiment(workspace, store, tmp_path):
    root, tok = workspace
    uri, client, _ = store
    export = write_export(tmp_path / "exports", tok, step=30)
    assert main(["run", "--checkpoint", str(export), "--tasks", "gsm8k", "--limit", "2", "--tracking-uri", uri,
                 "--data-dir", str(root / "data"), "--output", str(tmp_path / "r.json")]) == 0
    runs = client.search_runs([client.get_experiment_by_name("eval").experiment_id],
                              filter_string=f"tags.`crescent.checkpoint` = '{export.resolve()}'")
    assert len(runs) == 1
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "eval/gsm8k/exact_match/strict-match")] == [30]


def test_an_export_without_run_id_finds_the_training_run_by_its_run_tags(workspace, store, tmp_path):
    # Training exports before MLflow created its run (the server unreachable) carry no run id, only the run key.
    root, tok = workspace
    uri, client, run_id = store
    client.set_tag(run_id, "crescent.run_key", "key-of-the-training-run")
    export = write_export(tmp_path / "exports", tok, step=150, run_tags={"crescent.run_key": "key-of-the-training-run"})
    assert main(["run", "--checkpoint", str(export), "--tasks", "gsm8k", "--limit", "2", "--tracking-uri", uri,
                 "--data-dir", str(root / "data"), "--output", str(tmp_path / "r.json")]) == 0
    assert [m.step for m in client.get_metric_history(run_id, "eval/gsm8k/exact_match/strict-match")] == [150]


def test_humaneval_is_refused_without_allow_code_execution(workspace, tmp_path, capsys):
    root, tok = workspace
    export = write_export(tmp_path / "exports", tok, step=1)
    rc = main(["run", "--checkpoint", str(export), "--tasks", "humaneval", "--data-dir", str(root / "data"),
               "--no-mlflow"])
    assert rc == 2 and "--allow-code-execution" in capsys.readouterr().err


def test_watch_evaluates_each_checkpoint_once_and_retries_a_broken_one_up_to_the_limit(workspace, store, tmp_path,
                                                                                        capsys):
    root, tok = workspace
    _, client, run_id = store
    exports = _export_steps(tmp_path / "exports", tok, store, (200, 100, 150))
    (exports / "step-00000150" / "model.safetensors").write_bytes(b"not a safetensors file")
    args = _watch_args(exports, "gsm8k", root / "data", 2, "--max-attempts", "2")
    assert main(args) == 1  # a failure was recorded
    assert "evaluated [100, 200], failed [150], skipped []" in capsys.readouterr().out
    history = client.get_metric_history(run_id, "eval/gsm8k/exact_match/strict-match")
    assert sorted(m.step for m in history) == [100, 200]
    status = client.get_run(run_id).data.tags["crescent.eval.step-00000150.gsm8k"]
    assert status.startswith("failed:1: ValueError: export ") and "weights file 'model.safetensors'" in status
    assert main(args) == 1  # a later watch tries the failed task again, and only that one
    assert "evaluated [], failed [150], skipped [100, 200]" in capsys.readouterr().out
    assert client.get_run(run_id).data.tags["crescent.eval.step-00000150.gsm8k"].startswith("failed:2: ")
    assert main(args) == 0  # the limit is reached: left alone
    assert "evaluated [], failed [], skipped [100, 150, 200]" in capsys.readouterr().out
    assert len(client.get_metric_history(run_id, "eval/gsm8k/exact_match/strict-match")) == 2


def test_a_failed_task_keeps_the_others_results_and_is_retried_alone_later(workspace, store, tmp_path, capsys):
    """One task's data is corrupt: the other task is evaluated and logged, the failure is recorded per task, and
    the next watch (data fixed) evaluates only the failed task."""
    root, tok = workspace
    _, client, run_id = store
    data = tmp_path / "data"
    shutil.copytree(root / "data", data)
    good = (data / "gsm8k" / "test.jsonl").read_text()
    (data / "gsm8k" / "test.jsonl").write_text('{"question": "broken\n')
    args = _watch_args(_export_steps(tmp_path / "exports", tok, store, [100]), "gsm8k,mmlu_dev", data, 1)
    assert main(args) == 1
    assert "evaluated [100], failed [100], skipped []" in capsys.readouterr().out
    tags = client.get_run(run_id).data.tags
    assert tags["crescent.eval.step-00000100.mmlu_dev"] == "done"
    assert tags["crescent.eval.step-00000100.gsm8k"].startswith("failed:1: ")
    assert tags["crescent.eval.step-00000100"] == "done mmlu_dev; failed gsm8k"
    assert [m.step for m in client.get_metric_history(run_id, "eval/mmlu_dev/acc")] == [100]
    (data / "gsm8k" / "test.jsonl").write_text(good)
    assert main(args) == 0
    assert "evaluated [100], failed [], skipped []" in capsys.readouterr().out
    assert client.get_run(run_id).data.tags["crescent.eval.step-00000100.gsm8k"] == "done"
    assert [m.step for m in client.get_metric_history(run_id, "eval/gsm8k/exact_match/strict-match")] == [100]
    assert len(client.get_metric_history(run_id, "eval/mmlu_dev/acc")) == 1  # not evaluated twice


def test_a_task_without_data_is_skipped_with_a_warning_on_the_run(workspace, store, tmp_path, capsys,
                                                                  monkeypatch):
    root, tok = workspace
    _, client, run_id = store
    data = tmp_path / "data"
    assert main(["data", "--out", str(data)]) == 0  # no GSM8K files
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as in the evaluation pod: no Hub fallback
    args = _watch_args(_export_steps(tmp_path / "exports", tok, store, [100]), "mmlu_dev,gsm8k", data, 1)
    assert main(args) == 0
    assert "evaluated [100], failed [], skipped []" in capsys.readouterr().out
    tags = client.get_run(run_id).data.tags
    assert tags["crescent.eval.step-00000100.gsm8k"] == (
        f"skipped: no local GSM8K: run `crescent eval data --gsm8k-test FILE` (in {str(data)!r}), and the Hub is "
        "off (HF_HUB_OFFLINE=1)")
    assert tags["crescent.eval.step-00000100.mmlu_dev"] == "done"
    assert [m.step for m in client.get_metric_history(run_id, "eval/mmlu_dev/acc")] == [100]
    assert main(args) == 0  # nothing new to do: the model is not loaded again
    assert "evaluated [], failed [], skipped [100]" in capsys.readouterr().out


def test_bad_checkpoint_paths_and_task_names_are_named(workspace, tmp_path, capsys):
    root, tok = workspace
    base = ["--data-dir", str(root / "data"), "--no-mlflow", "--output", str(tmp_path / "r.json")]
    assert main(["run", "--checkpoint", str(tmp_path / "nope"), "--tasks", "gsm8k", *base]) == 2
    assert capsys.readouterr().err.strip() == f"crescent eval run: export {str(tmp_path / 'nope')!r} does not exist"
    export = write_export(tmp_path / "exports", tok, step=7)
    weights = export / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a copy cut short
    assert main(["run", "--checkpoint", str(export), "--tasks", "gsm8k", *base]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"crescent eval run: export {str(export.resolve())!r}: weights file 'model.safetensors' "
                          "cannot be read (") and err.endswith("it is truncated or corrupt: export it again")
    assert "\n" not in err  # one line, no traceback
    assert main(["run", "--checkpoint", str(export), "--tasks", "mmlu_dev,gsm8kk", *base]) == 2
    err = capsys.readouterr().err
    assert err.startswith("crescent eval run: unknown task(s) 'gsm8kk': Crescent's offline tasks are mmlu, "
                          "mmlu_dev, gsm8k, humaneval; lm-eval has ")
    assert "`lm-eval ls tasks`" in err and "closest: gsm8k" in err


def test_watch_skips_a_checkpoint_running_elsewhere_until_its_marker_is_stale(workspace, store, tmp_path, capsys):
    import time

    root, tok = workspace
    _, client, run_id = store
    exports = _export_steps(tmp_path / "exports", tok, store, (100, 200))
    client.set_tag(run_id, "crescent.eval.step-00000100", f"running:other-pod:7:{int(time.time())}")
    client.set_tag(run_id, "crescent.eval.step-00000200", f"running:other-pod:7:{int(time.time()) - 7200}")
    args = _watch_args(exports, "gsm8k", root / "data", 1, "--stale-after-hours", "1")
    assert main(args) == 0
    assert "evaluated [200], failed [], skipped [100]" in capsys.readouterr().out
    assert client.get_run(run_id).data.tags["crescent.eval.step-00000200.gsm8k"] == "done"


def test_two_concurrent_watchers_evaluate_each_checkpoint_once(workspace, store, tmp_path):
    root, tok = workspace
    _, client, run_id = store
    steps = [100, 200, 300]
    exports = _export_steps(tmp_path / "exports", tok, store, steps)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "app.cli", "eval", *_watch_args(exports, "gsm8k", root / "data", 2)]
    procs = [subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    evaluated = []
    for out, _ in outputs:
        evaluated += json.loads(re.search(r"watch: evaluated (\[[^\]]*\])", out).group(1))
    assert sorted(evaluated) == steps
    history = client.get_metric_history(run_id, "eval/gsm8k/exact_match/strict-match")
    assert sorted(m.step for m in history) == steps


def test_task_names_resolve_to_local_or_lm_eval_tasks(workspace, tmp_path, monkeypatch):
    from eval.offline_tasks import parse_fewshot, resolve_tasks

    root, _ = workspace
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    local = resolve_tasks(["mmlu_dev", "gsm8k", "humaneval"], root / "data", fewshot=parse_fewshot("gsm8k=8"))
    assert [(s.lm_eval_name, s.num_fewshot, s.source, s.split) for s in local] == [
        ("crescent_mmlu_dev", 5, "local", "dev"), ("crescent_gsm8k", 8, "local", "test"),
        ("crescent_humaneval", 0, "local", "test")]
    hub = resolve_tasks(["mmlu", "gsm8k", "arc_easy"], tmp_path / "empty")
    assert [(s.lm_eval_name, s.num_fewshot, s.source, s.skip) for s in hub] == [
        ("mmlu", 5, "hub", None), ("gsm8k", 4, "hub", None), ("arc_easy", None, "hub", None)]
    # The dev-only copy is never MMLU itself: with no test split here `mmlu` goes to lm-eval's (Hub) task.
    assert resolve_tasks(["mmlu"], root / "data")[0].source == "hub"
    (skipped,) = resolve_tasks(["gsm8k"], tmp_path / "empty", source="local")
    assert skipped.source == "none" and "run `crescent eval data --gsm8k-test FILE`" in skipped.skip
    (humaneval,) = resolve_tasks(["humaneval"], tmp_path / "empty")  # never silently code_eval
    assert "outside the Crescent sandbox: pass --task-source hub" in humaneval.skip
    assert resolve_tasks(["humaneval"], tmp_path / "empty", source="hub")[0].note.startswith("lm-eval's code_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    offline = resolve_tasks(["mmlu", "arc_easy"], root / "data")
    assert offline[0].skip.endswith("and the Hub is off (HF_DATASETS_OFFLINE=1)") and offline[1].skip is None
    with pytest.raises(ValueError, match="'mmlu=five' must look like TASK=N"):
        parse_fewshot("mmlu=five")


def _cronjob(overlay: str) -> tuple[list[str], dict[str, str]]:
    """The evaluation CronJob's command line and environment, from `crescent k8s render --overlay OVERLAY`."""
    rendered = subprocess.run([sys.executable, "-m", "app.cli", "k8s", "render", "--overlay", overlay],
                              capture_output=True, text=True, timeout=300, check=True, cwd=ROOT).stdout
    (cron,) = [d for d in yaml.safe_load_all(rendered) if d and d["kind"] == "CronJob"]
    (container,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    return container["command"] + container["args"], {e["name"]: e["value"] for e in container["env"] if "value" in e}


@pytest.fixture(scope="module")
def image_data(tmp_path_factory):
    """The evaluation image's data: `crescent eval data --out DIR` with no user files, as containers/Dockerfile runs
    it."""
    assert "crescent eval data --out /opt/crescent-eval-data" in (ROOT / "containers" / "Dockerfile").read_text()
    out = tmp_path_factory.mktemp("image") / "opt-crescent-eval-data"
    assert main(["data", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_the_cronjobs_tasks_are_those_the_eval_image_has_data_for(overlay, image_data, monkeypatch):
    from eval.offline_tasks import resolve_tasks

    command, env = _cronjob(overlay)
    assert env["HF_HUB_OFFLINE"] == "1" and command[command.index("--data-dir") + 1] == "/opt/crescent-eval-data"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    specs = resolve_tasks(command[command.index("--tasks") + 1].split(","), image_data)
    assert [(s.name, s.source, s.skip) for s in specs] == [("mmlu_dev", "local", None), ("humaneval", "local", None)]


@pytest.mark.slow
def test_the_cronjobs_exact_command_evaluates_a_checkpoint_directory(workspace, store, image_data, tmp_path):
    """The rendered CronJob's command line, run as it is, with only its two volumes pointing at local directories and
    MLflow at the test's store: every task it lists is evaluated in full and logged on the training run."""
    _, tok = workspace
    uri, client, run_id = store
    command, env = _cronjob("dev")
    exports = tmp_path / "exports"
    write_export(exports, tok, step=100, run_id=run_id, tracking_uri=uri, always_eos=True)  # no long generations
    locks = tmp_path / "scratch" / "eval-locks"  # the pod's /tmp (an emptyDir); the checkpoints are read-only
    mounts = {"/checkpoints/crescent/exports": str(exports), "/opt/crescent-eval-data": str(image_data),
              "/tmp/eval-locks": str(locks)}
    argv = [mounts.get(arg, arg) for arg in command]
    assert argv[0] == "crescent" and sum(arg in mounts.values() for arg in argv) == 3
    env = {**os.environ, **env, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-m", "app.cli", *argv[1:]], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "watch: evaluated [100], failed [], skipped []" in proc.stdout
    tasks = argv[argv.index("--tasks") + 1].split(",")
    tags = client.get_run(run_id).data.tags
    assert {t: tags[f"crescent.eval.step-00000100.{t}"] for t in tasks} == {t: "done" for t in tasks}
    assert tags["eval.humaneval.limit"] == "None"  # the whole task, as the CronJob runs it
    assert [p.name for p in exports.iterdir()] == ["step-00000100"]  # nothing written beside the exports
    assert [p.name for p in locks.iterdir()] == ["step-00000100.lock"]
    for key in ("eval/mmlu_dev/acc", "eval/humaneval/pass_at_1"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == [100], key


def test_a_transient_mlflow_error_does_not_move_the_results_to_the_eval_experiment(workspace, store, tmp_path,
                                                                                   capsys, monkeypatch):
    """Only "no such run" sends results to the `eval` experiment: a 503 from a restarting server stops the watch
    (one line, nothing evaluated) and the next watch puts the results on the training run."""
    from mlflow.exceptions import MlflowException

    root, tok = workspace
    uri, client, run_id = store
    exports = _export_steps(tmp_path / "exports", tok, store, [100])
    real_get_run, failures = MlflowClient.get_run, [1]

    def get_run_failing_once(self, run_id):  # what the REST client raises for a 503 from the server
        if failures:
            failures.pop()
            raise MlflowException("API request to endpoint /api/2.0/mlflow/runs/get failed with error code 503 != 200",
                                  error_code="TEMPORARILY_UNAVAILABLE")
        return real_get_run(self, run_id)

    monkeypatch.setattr(MlflowClient, "get_run", get_run_failing_once)
    args = _watch_args(exports, "gsm8k", root / "data", 1)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err == (f"crescent eval watch: MLflow tracking store {uri} failed at step-00000100: API request to endpoint "
                   "/api/2.0/mlflow/runs/get failed with error code 503 != 200; stopped (nothing was evaluated or "
                   "published): the next watch continues from there\n")
    experiment = client.get_experiment_by_name("eval")
    if experiment is not None:
        assert client.search_runs([experiment.experiment_id], filter_string="tags.`crescent.checkpoint` = "
                                  f"'{(exports / 'step-00000100').resolve()}'") == []
    assert main(args) == 0
    assert [m.step for m in client.get_metric_history(run_id, "eval/gsm8k/exact_match/strict-match")] == [100]


def test_a_tracking_server_that_is_down_is_named_in_one_line_and_run_keeps_its_results(workspace, tmp_path, capsys,
                                                                                       monkeypatch):
    import socket

    root, tok = workspace
    with socket.socket() as s:  # a port nothing listens on: the tracking server is down
        s.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    exports = tmp_path / "exports"
    for step in (100, 200):
        write_export(exports, tok, step=step, run_id="0" * 32, tracking_uri=uri)
    assert main(_watch_args(exports, "gsm8k", root / "data", 1, "--results-dir", str(tmp_path / "results"))) == 2
    out, err = capsys.readouterr()
    assert err.startswith(f"crescent eval watch: MLflow tracking store {uri} failed at step-00000100: API request to ")
    assert err.endswith("; stopped (nothing was evaluated or published): the next watch continues from there\n")
    assert err.count("\n") == 1 and "Traceback" not in err and "watch:" not in out
    assert not (tmp_path / "results").exists()
    output = tmp_path / "r.json"
    assert main(["run", "--checkpoint", str(exports / "step-00000100"), "--tasks", "gsm8k", "--limit", "1",
                 "--data-dir", str(root / "data"), "--output", str(output)]) == 2
    err = capsys.readouterr().err  # lm-eval's progress bars, then the one line
    line = err.splitlines()[-1]
    assert line.startswith(f"crescent eval run: MLflow tracking store {uri} failed: API request to ")
    assert line.endswith(f"; the checkpoint was evaluated (results in {output}) but nothing was published: run it "
                         "again when the store is back")
    assert "Traceback" not in err and err.count("crescent eval run:") == 1
    assert json.loads(output.read_text())["tasks"]["gsm8k"]["documents"] == 1


def test_a_publishing_error_fails_only_its_task_and_keeps_the_results(workspace, store, tmp_path, capsys):
    """gsm8k's results JSON cannot be stored (a directory is in its place): mmlu_dev, published before, stays
    `done` and is not evaluated again, gsm8k is retried alone without a duplicate metric, and --results-dir gets
    both tasks' results."""
    from urllib.parse import urlparse

    root, tok = workspace
    _, client, run_id = store
    exports = _export_steps(tmp_path / "exports", tok, store, [100])
    artifacts = Path(urlparse(client.get_run(run_id).info.artifact_uri).path)
    blocker = artifacts / "eval" / "step-00000100" / "gsm8k.json"
    blocker.mkdir(parents=True)
    args = _watch_args(exports, "mmlu_dev,gsm8k", root / "data", 1, "--results-dir", str(tmp_path / "results"))
    assert main(args) == 1
    assert "evaluated [100], failed [100], skipped []" in capsys.readouterr().out
    tags = client.get_run(run_id).data.tags
    assert tags["crescent.eval.step-00000100.mmlu_dev"] == "done"
    assert tags["crescent.eval.step-00000100.gsm8k"].startswith(
        "failed:1: publishing its results failed: IsADirectoryError: ")
    assert tags["crescent.eval.step-00000100"] == "done mmlu_dev; failed gsm8k"
    saved = json.loads((tmp_path / "results" / "step-00000100.json").read_text())
    assert sorted(saved["tasks"]) == ["gsm8k", "mmlu_dev"] and list(saved["failed"]) == ["gsm8k"]
    assert client.get_metric_history(run_id, "eval/gsm8k/exact_match/strict-match") == []
    blocker.rmdir()
    assert main(args) == 0
    assert "evaluated [100], failed [], skipped []" in capsys.readouterr().out
    assert client.get_run(run_id).data.tags["crescent.eval.step-00000100.gsm8k"] == "done"
    assert [m.step for m in client.get_metric_history(run_id, "eval/mmlu_dev/acc")] == [100]
    assert [m.step for m in client.get_metric_history(run_id, "eval/gsm8k/exact_match/strict-match")] == [100]


def test_an_lm_eval_tag_is_refused_naming_its_tasks(workspace, tmp_path, capsys, monkeypatch):
    """`ai2_arc` is a tag (arc_easy + arc_challenge, no score of its own): refused before the model is loaded."""
    root, tok = workspace
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    export = write_export(tmp_path / "exports", tok, step=7)
    assert main(["run", "--checkpoint", str(export), "--tasks", "gsm8k,ai2_arc", "--limit", "1", "--no-mlflow",
                 "--data-dir", str(root / "data"), "--output", str(tmp_path / "r.json")]) == 2
    assert capsys.readouterr().err == ("crescent eval run: --tasks: 'ai2_arc' is an lm-eval tag (a set of tasks with no "
                                       "score of its own), not a task or group: name its tasks instead (arc_challenge, "
                                       "arc_easy)\n")
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("flag", ["--batch-size", "--sandbox-workers"])
def test_a_bad_run_wide_argument_is_refused_before_any_checkpoint_is_touched(workspace, store, tmp_path, capsys,
                                                                              flag):
    """Found only after a model load, it counted as a failed attempt on every checkpoint (given up after three)."""
    root, tok = workspace
    _, client, run_id = store
    exports = _export_steps(tmp_path / "exports", tok, store, (100, 200))
    assert main(_watch_args(exports, "gsm8k", root / "data", 1, flag, "0")) == 2
    assert capsys.readouterr().err == f"crescent eval watch: {flag}=0 must be a positive integer\n"
    assert [k for k in client.get_run(run_id).data.tags if k.startswith("crescent.eval")] == []
    assert main(["run", "--checkpoint", str(exports / "step-00000100"), "--tasks", "gsm8k", flag, "-1", "--no-mlflow",
                 "--data-dir", str(root / "data"), "--output", str(tmp_path / "r.json")]) == 2
    assert capsys.readouterr().err == f"crescent eval run: {flag}=-1 must be a positive integer\n"


def test_watch_before_the_first_export_has_nothing_to_do(workspace, tmp_path, capsys):
    """Training creates its exports folder at its first export: until then a CronJob's watch succeeds quietly."""
    root, _ = workspace
    exports = tmp_path / "run" / "exports"
    assert main(_watch_args(exports, "gsm8k", root / "data", 1)) == 0
    assert capsys.readouterr().out == f"watch: {str(exports)!r} does not exist yet: no exports to evaluate\n"
    assert not exports.exists()
    (tmp_path / "file").write_text("")
    assert main(_watch_args(tmp_path / "file", "gsm8k", root / "data", 1)) == 2
    assert capsys.readouterr().err == f"crescent eval watch: --checkpoints={str(tmp_path / 'file')!r} is not a directory\n"


def test_a_watcher_stopped_by_sigterm_resets_its_marker_and_a_restart_evaluates_at_once(workspace, store, tmp_path,
                                                                                        capsys):
    """A pod being stopped gets SIGTERM mid-evaluation: its `running:` marker must not hold the checkpoint back
    for --stale-after-hours (6 h) with nothing said."""
    import signal
    import time

    root, tok = workspace
    _, client, run_id = store
    exports = _export_steps(tmp_path / "exports", tok, store, [100])
    args = _watch_args(exports, "mmlu_dev,gsm8k", root / "data", 2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "eval", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not client.get_run(run_id).data.tags.get("crescent.eval.step-00000100", "").startswith("running:"):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    marker = client.get_run(run_id).data.tags["crescent.eval.step-00000100"]
    assert marker == "interrupted (exit 143)" or marker.startswith("interrupted (exit 143); done "), marker
    assert main(args) == 0
    assert "evaluated [100], failed [], skipped []" in capsys.readouterr().out
    tags = client.get_run(run_id).data.tags
    assert [tags[f"crescent.eval.step-00000100.{t}"] for t in ("mmlu_dev", "gsm8k")] == ["done", "done"]
    assert [m.step for m in client.get_metric_history(run_id, "eval/mmlu_dev/acc")] == [100]


def test_a_marker_left_by_a_dead_watcher_on_this_host_is_taken_over(workspace, store, tmp_path, capsys, caplog):
    import time

    root, tok = workspace
    _, client, run_id = store
    exports = _export_steps(tmp_path / "exports", tok, store, (100, 200))
    gone = subprocess.Popen(["true"])
    gone.wait()
    now = int(time.time())
    client.set_tag(run_id, "crescent.eval.step-00000100", f"running:{os.uname().nodename}:{gone.pid}:{now}")
    client.set_tag(run_id, "crescent.eval.step-00000200", f"running:other-pod:7:{now - 600}")
    assert main(_watch_args(exports, "gsm8k", root / "data", 1)) == 0
    assert "evaluated [100], failed [], skipped [200]" in capsys.readouterr().out
    assert client.get_run(run_id).data.tags["crescent.eval.step-00000100.gsm8k"] == "done"
    assert ("step-00000200: skipped: marked running by other-pod pid 7 10 min ago; taken over when that marker is "
            "6 h old (--stale-after-hours)") in caplog.messages
    assert (f"taking over a checkpoint marked 'running:{os.uname().nodename}:{gone.pid}:{now}': that process on "
            "this host is gone") in caplog.messages
