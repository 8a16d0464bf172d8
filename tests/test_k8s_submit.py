"""The submitter, through the kubernetes client's DynamicClient, against a test double of the API server (no API
server can run here; tests/k8s_api_double.py says what it answers): every overlay's objects arrive as
server-side-apply PATCHes at the paths discovery gives (any kind it serves, a kind it does not serve is refused
by name before anything is applied); status, watch, logs and delete work for an Indexed Job, a JobSet and a
TrainJob; no cluster or an unreachable one gives one clear line, never a traceback."""
from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import tempfile

import pytest
import yaml
from k8s_api_double import ApiServerDouble, object_path, plural_of

from app.commands.k8s import main
from app.k8s.render import RenderParams, render
from app.k8s.submit import ClusterError, apply, dynamic_client, load_client, select

CONFIG_TEXT = "trainer:\n  max_steps: 3\n"
WORKLOAD = {"dev": "Job", "prod": "Job", "kubeflow": "TrainJob", "jobset": "JobSet"}


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(CONFIG_TEXT)
    return str(path)


@pytest.fixture
def api_server(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the dynamic client's discovery cache goes there
    server = ApiServerDouble()
    yield server
    server.close()


@pytest.fixture
def kubeconfig(tmp_path, api_server):
    return _kubeconfig(tmp_path, api_server.url)


def _kubeconfig(tmp_path, server_url):
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": server_url}}],
        "users": [{"name": "test", "user": {"token": "test-token"}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}]}))
    return str(path)


def _patches(server):
    return [r for r in server.requests if r["method"] == "PATCH"]


@pytest.mark.parametrize("overlay", ["dev", "prod", "kubeflow", "jobset"])
def test_submit_applies_every_object_by_server_side_apply(overlay, kubeconfig, config_file, api_server, capsys):
    assert main(["submit", "--kubeconfig", kubeconfig, "--overlay", overlay, "--config", config_file]) == 0
    expected = render(RenderParams(overlay=overlay, config=config_file))
    patches = _patches(api_server)
    assert [r["body"] for r in patches] == expected  # exactly the rendered objects, in apply order
    assert [r["path"] for r in patches] == [object_path(o) for o in expected]
    for r in patches:
        assert r["content_type"] == "application/apply-patch+yaml"
        assert r["query"] == {"fieldManager": ["crescent"], "force": ["true"]}
        assert r["auth"] == "Bearer test-token"
    paths = {r["path"] for r in patches}
    assert "/api/v1/namespaces/crescent" in paths
    workload_path = {
        "Job": "/apis/batch/v1/namespaces/crescent/jobs/crescent-train",
        "JobSet": "/apis/jobset.x-k8s.io/v1alpha2/namespaces/crescent/jobsets/crescent-train",
        "TrainJob": "/apis/trainer.kubeflow.org/v1alpha1/namespaces/crescent/trainjobs/crescent-train"}
    assert workload_path[WORKLOAD[overlay]] in paths
    assert f"applied {WORKLOAD[overlay]}/crescent-train" in capsys.readouterr().out


def test_postgres_secret_is_created_once_and_never_read(kubeconfig, config_file, api_server, capsys):
    argv = ["submit", "--kubeconfig", kubeconfig, "--overlay", "dev", "--config", config_file]
    assert main(argv) == 0
    secret = api_server.stored("Secret", "mlflow-postgres")
    password = secret["stringData"]["password"]
    expected = render(RenderParams(overlay="dev", config=config_file))
    assert len(password) >= 24 and password not in json.dumps(expected)
    assert "created Secret/mlflow-postgres" in capsys.readouterr().out
    # A second submit finds the Secret (409 on create) and keeps it; the submitter never reads Secrets.
    assert main(argv) == 0
    assert api_server.stored("Secret", "mlflow-postgres")["stringData"]["password"] == password
    assert "created Secret" not in capsys.readouterr().out
    assert [r["method"] for r in api_server.requests if "/secrets" in r["path"]] == ["POST", "POST"]


def test_submit_only_train_applies_the_training_objects(kubeconfig, config_file, api_server):
    assert main(["submit", "--kubeconfig", kubeconfig, "--overlay", "jobset", "--config", config_file,
                 "--only", "train"]) == 0
    applied = sorted((r["body"]["kind"], r["body"]["metadata"]["name"]) for r in _patches(api_server))
    assert applied == [("ConfigMap", "crescent-train-config"), ("JobSet", "crescent-train"),
                       ("PersistentVolumeClaim", "crescent-checkpoints")]
    assert api_server.stored("Secret", "mlflow-postgres") is None


def test_any_kind_the_server_serves_applies(kubeconfig, api_server):
    dyn = dynamic_client(load_client(kubeconfig, None))
    queue = {"apiVersion": "kueue.x-k8s.io/v1beta1", "kind": "LocalQueue",
             "metadata": {"name": "team-a", "namespace": "crescent"}, "spec": {"clusterQueue": "cluster-a"}}
    apply(dyn, [queue], timeout=10)
    [request] = _patches(api_server)
    assert request["path"] == "/apis/kueue.x-k8s.io/v1beta1/namespaces/crescent/localqueues/team-a"
    assert request["body"] == queue and request["content_type"] == "application/apply-patch+yaml"


@pytest.mark.parametrize("api_version, message", [
    ("example.com/v1", "kind 'Widget' (example.com/v1) is not served by this API server: it serves no API "
                       "'example.com/v1' (is the CRD that defines Widget installed?)"),
    ("jobset.x-k8s.io/v1alpha2", "kind 'Widget' (jobset.x-k8s.io/v1alpha2) is not served by this API server: "
                                 "jobset.x-k8s.io/v1alpha2 serves ['JobSet']"),
])
def test_unknown_kind_is_refused_by_name_before_anything_is_applied(kubeconfig, config_file, api_server,
                                                                    api_version, message):
    dyn = dynamic_client(load_client(kubeconfig, None))
    objects = render(RenderParams(overlay="dev", config=config_file))
    widget = {"apiVersion": api_version, "kind": "Widget", "metadata": {"name": "w", "namespace": "crescent"}}
    with pytest.raises(ClusterError) as err:
        apply(dyn, objects + [widget], timeout=10)
    assert str(err.value) == message
    assert _patches(api_server) == []


def _owned(obj: dict, owner: dict) -> dict:
    obj["metadata"]["ownerReferences"] = [{"apiVersion": owner["apiVersion"], "kind": owner["kind"],
                                           "name": owner["metadata"]["name"], "uid": owner["metadata"]["uid"],
                                           "controller": True}]
    return obj


def _meta(name: str, **extra) -> dict:
    return {"name": name, "namespace": "crescent", **extra}


def _cluster_state(server, kind: str, status: dict) -> None:
    """What the controllers would have made of a submitted workload: its Jobs and two pods per Job (node 0, 1),
    plus an unrelated Job's pod that must not be reported."""
    api = {"Job": "batch/v1", "JobSet": "jobset.x-k8s.io/v1alpha2", "TrainJob": "trainer.kubeflow.org/v1alpha1"}
    workload = server.store({"apiVersion": api[kind], "kind": kind, "metadata": _meta("crescent-train"),
                             "spec": {}, "status": status})
    job = workload
    if kind in ("JobSet", "TrainJob"):
        owner = workload
        if kind == "TrainJob":  # Trainer runs a TrainJob as a JobSet of the same name
            owner = server.store(_owned({"apiVersion": api["JobSet"], "kind": "JobSet",
                                         "metadata": _meta("crescent-train"), "spec": {}}, workload))
        job = server.store(_owned({"apiVersion": "batch/v1", "kind": "Job", "metadata": _meta("crescent-train-node-0"),
                                   "spec": {}}, owner))
    prefix = "crescent-train" if kind == "Job" else "crescent-train-node-0"
    for index in (1, 0):
        name = f"{prefix}-{index}-abc{index}"
        server.store(_owned({"apiVersion": "v1", "kind": "Pod", "metadata": _meta(
            name, labels={"batch.kubernetes.io/job-completion-index": str(index)},
            creationTimestamp="2026-01-01T00:00:00Z"), "status": {"phase": "Running"}}, job))
        server.pod_logs[name] = f"node {index} step 1 loss 10.5\nnode {index} step 2 loss 9.75\n"
    other = server.store({"apiVersion": "batch/v1", "kind": "Job", "metadata": _meta("crescent-data-build")})
    server.store(_owned({"apiVersion": "v1", "kind": "Pod", "metadata": _meta(
        "crescent-data-build-0-xyz", labels={"batch.kubernetes.io/job-completion-index": "0"}),
        "status": {"phase": "Succeeded"}}, other))


RUNNING = {
    "Job": {"active": 2, "succeeded": 0, "failed": 0},
    "JobSet": {"restarts": 1, "replicatedJobsStatus": [{"name": "node", "ready": 1, "active": 1, "succeeded": 0,
                                                        "failed": 0, "suspended": 0}]},
    "TrainJob": {"jobsStatus": [{"name": "node", "ready": 1, "active": 1, "succeeded": 0, "failed": 0,
                                 "suspended": 0}]},
}
DONE_TYPE = {"Job": "Complete", "JobSet": "Completed", "TrainJob": "Complete"}
HEADLINE = {"Job": "Job crescent-train: Running; completions 0/2; active 2, succeeded 0, failed 0",
            "JobSet": "JobSet crescent-train: Running; restarts 1",
            "TrainJob": "TrainJob crescent-train: Running"}


@pytest.mark.parametrize("kind", ["Job", "JobSet", "TrainJob"])
def test_status_reports_the_workload_and_its_pods(kind, kubeconfig, api_server, capsys):
    _cluster_state(api_server, kind, RUNNING[kind])
    if kind == "Job":
        api_server.stored("Job", "crescent-train")["spec"]["completions"] = 2
    assert main(["status", "--kubeconfig", kubeconfig, "--kind", kind]) == 0
    lines = capsys.readouterr().out.splitlines()
    prefix = "crescent-train" if kind == "Job" else "crescent-train-node-0"
    assert lines[0] == HEADLINE[kind]
    assert [ln for ln in lines if ln.startswith("  pod ")] == [
        f"  pod {prefix}-0-abc0 index 0: Running", f"  pod {prefix}-1-abc1 index 1: Running"]
    if kind != "Job":
        name = "replicatedJobs" if kind == "JobSet" else "jobs"
        assert f"  {name} node: ready 1, active 1, succeeded 0, failed 0, suspended 0" in lines


@pytest.mark.parametrize("kind", ["Job", "JobSet", "TrainJob"])
@pytest.mark.parametrize("ending, code", [("done", 0), ("Failed", 1)])
def test_status_watch_follows_until_the_workload_ends(kind, ending, code, kubeconfig, api_server, capsys):
    _cluster_state(api_server, kind, RUNNING[kind])
    workload = api_server.stored(kind, "crescent-train")
    plural = plural_of(workload["apiVersion"], kind)
    condition = DONE_TYPE[kind] if ending == "done" else "Failed"
    ended = dict(workload, status={"conditions": [{"type": condition, "status": "True", "reason": "Test"}]})
    api_server.queue_events(plural, "crescent-train", ("MODIFIED", workload), ("MODIFIED", ended))
    assert main(["status", "--kubeconfig", kubeconfig, "--kind", kind, "--watch"]) == code
    heads = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(kind)]
    assert heads[-1] == f"{kind} crescent-train: {'Complete' if ending == 'done' else 'Failed'}"
    assert len(heads) == 3  # the first GET, then one line per event
    [watch] = [r for r in api_server.requests if r["query"].get("watch")]
    assert watch["query"]["fieldSelector"] == ["metadata.name=crescent-train"]
    assert watch["query"]["resourceVersion"] == [workload["metadata"]["resourceVersion"]]


def test_submit_wait_follows_the_queued_workload_until_it_completes(kubeconfig, config_file, api_server, capsys):
    """--queue: the JobSet is created suspended (Kueue has not admitted it); --wait watches it through admission
    to completion."""
    admitted = {"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet",
                "metadata": _meta("crescent-train", uid="jobset-uid"), "spec": {"suspend": False},
                "status": {"restarts": 0}}
    api_server.store(copy.deepcopy(admitted))  # its uid, kept by the apply, is the one the events carry
    completed = dict(admitted, status={"restarts": 0, "terminalState": "Completed",
                                       "conditions": [{"type": "Completed", "status": "True"}]})
    api_server.queue_events("jobsets", "crescent-train", ("MODIFIED", admitted), ("MODIFIED", completed))
    assert main(["submit", "--kubeconfig", kubeconfig, "--overlay", "jobset", "--config", config_file,
                 "--queue", "team-a", "--wait"]) == 0
    heads = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("JobSet ")]
    assert heads == ["JobSet crescent-train: Suspended; restarts 0", "JobSet crescent-train: Running; restarts 0",
                     "JobSet crescent-train: Complete; restarts 0"]
    applied = api_server.stored("JobSet", "crescent-train")
    assert applied["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a" and applied["spec"]["suspend"]


@pytest.mark.parametrize("kind", ["Job", "JobSet", "TrainJob"])
def test_logs_stream_a_nodes_pod(kind, kubeconfig, api_server, capsys):
    _cluster_state(api_server, kind, RUNNING[kind])
    prefix = "crescent-train" if kind == "Job" else "crescent-train-node-0"
    assert main(["logs", "--kubeconfig", kubeconfig, "--kind", kind, "--index", "1", "--follow"]) == 0
    assert capsys.readouterr().out == "node 1 step 1 loss 10.5\nnode 1 step 2 loss 9.75\n"
    [log] = [r for r in api_server.requests if r["path"].endswith("/log")]
    assert log["path"] == f"/api/v1/namespaces/crescent/pods/{prefix}-1-abc1/log"
    assert log["query"]["follow"] == ["true"]
    assert main(["logs", "--kubeconfig", kubeconfig, "--kind", kind, "--index", "0", "--tail", "1"]) == 0
    assert capsys.readouterr().out == "node 0 step 2 loss 9.75\n"
    assert main(["logs", "--kubeconfig", kubeconfig, "--kind", kind, "--index", "5"]) == 1
    assert f"no pod of {kind} crescent-train with completion index 5" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["Job", "JobSet", "TrainJob"])
def test_delete_removes_the_workload_and_its_config(kind, kubeconfig, api_server, capsys):
    _cluster_state(api_server, kind, RUNNING[kind])
    assert main(["delete", "--kubeconfig", kubeconfig, "--kind", kind]) == 0
    workload_path = object_path({"apiVersion": {"Job": "batch/v1", "JobSet": "jobset.x-k8s.io/v1alpha2",
                                                "TrainJob": "trainer.kubeflow.org/v1alpha1"}[kind],
                                 "kind": kind, "metadata": _meta("crescent-train")})
    deletes = [r for r in api_server.requests if r["method"] == "DELETE"]
    assert [r["path"] for r in deletes] == [workload_path,
                                            "/api/v1/namespaces/crescent/configmaps/crescent-train-config"]
    assert all(r["body"] == {"propagationPolicy": "Background"} for r in deletes)
    assert api_server.stored(kind, "crescent-train") is None
    assert capsys.readouterr().out == (f"deleted {kind}/crescent-train\n"
                                       "ConfigMap/crescent-train-config not found\n")


def test_status_of_an_unknown_kind_names_it(kubeconfig, api_server, capsys):
    assert main(["status", "--kubeconfig", kubeconfig, "--kind", "PyTorchJob"]) == 1
    assert capsys.readouterr().err.strip() == (
        "crescent k8s status: kind 'PyTorchJob' is not served by this API server (is the CRD that defines it "
        "installed? kinds are case-sensitive: Job, JobSet, TrainJob)")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("action", ["submit", "status", "logs", "delete"])
def test_unreachable_api_server_fails_with_one_clear_line(tmp_path, config_file, action, monkeypatch, capsys):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    port = _closed_port()
    kubeconfig = _kubeconfig(tmp_path, f"https://127.0.0.1:{port}")
    extra = ["--overlay", "dev", "--config", config_file] if action == "submit" else []
    assert main([action, "--kubeconfig", kubeconfig, *extra]) == 1
    assert capsys.readouterr().err == (f"crescent k8s {action}: cannot reach the Kubernetes API server at "
                                       f"127.0.0.1:{port}: connection refused\n")


def test_the_command_line_prints_one_line_not_a_traceback(tmp_path, config_file):
    port = _closed_port()
    kubeconfig = _kubeconfig(tmp_path, f"https://127.0.0.1:{port}")
    proc = subprocess.run([sys.executable, "-m", "app.cli", "k8s", "status", "--kubeconfig", kubeconfig],
                          capture_output=True, text=True, env={**os.environ, "TMPDIR": str(tmp_path)}, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr == (f"crescent k8s status: cannot reach the Kubernetes API server at 127.0.0.1:{port}: "
                           "connection refused\n")


def test_no_cluster_configured_fails_with_one_clear_line(tmp_path, config_file, monkeypatch, capsys):
    for name in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.kube/config
    assert main(["submit", "--overlay", "dev", "--config", config_file]) == 1
    assert capsys.readouterr().err.startswith("crescent k8s submit: no Kubernetes cluster configured: no kubeconfig")
    assert main(["status", "--kubeconfig", str(tmp_path / "missing")]) == 1
    assert capsys.readouterr().err == f"crescent k8s status: kubeconfig {tmp_path / 'missing'} does not exist\n"


@pytest.mark.parametrize("overlay", ["prod", "kubeflow", "jobset"])
def test_submitter_role_grants_what_submit_uses_and_no_wildcards(overlay, config_file):
    objects = render(RenderParams(overlay=overlay, config=config_file))
    role = next(o for o in objects if o["kind"] == "Role" and o["metadata"]["name"] == "crescent-submitter")
    granted = {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
               for resource in rule["resources"] for verb in rule["verbs"]}
    assert not [g for g in granted if "*" in g]
    for component in ("train", "data", "eval", "mlflow"):
        for obj in select(objects, component):
            group = obj["apiVersion"].rsplit("/", 1)[0] if "/" in obj["apiVersion"] else ""
            assert (group, plural_of(obj["apiVersion"], obj["kind"]), "patch") in granted, (component, obj["kind"])
    assert ("", "secrets", "create") in granted
    assert not {("", "secrets", verb) for verb in ("get", "list", "watch")} & granted
    # status/logs/delete of each workload kind: get + watch it, read the Jobs and pods it owns, delete it.
    for group, plural in (("batch", "jobs"), ("jobset.x-k8s.io", "jobsets"), ("trainer.kubeflow.org", "trainjobs")):
        assert {(group, plural, verb) for verb in ("get", "list", "watch", "delete")} <= granted, plural
    assert {("", "pods", "list"), ("", "pods/log", "get"), ("", "configmaps", "delete")} <= granted
