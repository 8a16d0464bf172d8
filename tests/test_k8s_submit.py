"""The submitter: its server-side-apply plan is exactly the rendered objects; over real HTTP (a loopback server
that records what the kubernetes client sends, since no API server can run here) the bodies arrive unchanged
with the apply content type; no cluster or an unreachable one gives one clear line, never a traceback."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from app.commands.k8s import main
from app.k8s.render import RenderParams, render
from app.k8s.submit import apply_requests, object_path

CONFIG_TEXT = "trainer:\n  max_steps: 3\n"


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(CONFIG_TEXT)
    return str(path)


class RecordingApiServer(ThreadingHTTPServer):
    """Answers like an API server for the calls the submitter makes, and records each request."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[dict] = []
        self.secrets: dict[str, dict] = {}
        self.job_status = {"active": 1, "succeeded": 1, "failed": 0}
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _reply(self, status, body):
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if not isinstance(body, str) else "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _record(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        url = urlsplit(self.path)
        entry = {"method": self.command, "path": url.path, "query": parse_qs(url.query),
                 "content_type": self.headers.get("Content-Type"), "auth": self.headers.get("Authorization"),
                 "body": json.loads(raw) if raw else None}
        self.server.requests.append(entry)
        return entry

    def do_PATCH(self):
        entry = self._record()
        self._reply(200, entry["body"])

    def do_POST(self):
        entry = self._record()
        if entry["path"].endswith("/secrets"):
            name = entry["body"]["metadata"]["name"]
            if name in self.server.secrets:
                return self._reply(409, {"kind": "Status", "code": 409, "reason": "AlreadyExists",
                                         "message": f'secrets "{name}" already exists'})
            self.server.secrets[name] = entry["body"]
        self._reply(201, entry["body"])

    def do_DELETE(self):
        self._record()
        self._reply(200, {"kind": "Status", "status": "Success"})

    def do_GET(self):
        entry = self._record()
        path = entry["path"]
        if path.endswith("/jobs/crescent-train"):
            return self._reply(200, {"kind": "Job", "spec": {"completions": 2}, "status": self.server.job_status})
        if path.endswith("/pods"):
            items = [{"metadata": {"name": f"crescent-train-{i}-abc", "creationTimestamp": "2026-01-01T00:00:00Z",
                                   "annotations": {"batch.kubernetes.io/job-completion-index": str(i)}},
                      "status": {"phase": "Running"}} for i in range(2)]
            return self._reply(200, {"kind": "PodList", "items": items})
        if path.endswith("/log"):
            return self._reply(200, "step 1 loss 10.5\nstep 2 loss 9.75\n")
        self._reply(404, {"kind": "Status", "code": 404, "message": "not found"})


@pytest.fixture
def api_server():
    server = RecordingApiServer()
    yield server
    server.shutdown()
    server.server_close()


def _kubeconfig(tmp_path, server_url):
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": server_url}}],
        "users": [{"name": "test", "user": {"token": "test-token"}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}]}))
    return str(path)


def test_apply_plan_is_exactly_the_rendered_objects(config_file):
    objects = render(RenderParams(overlay="prod", nodes=2, config=config_file))
    plan = apply_requests(objects)
    assert [r.body for r in plan] == objects
    assert {r.method for r in plan} == {"PATCH"}
    paths = {(o["kind"], o["metadata"]["name"]): r.path for o, r in zip(objects, plan)}
    assert paths[("Namespace", "crescent")] == "/api/v1/namespaces/crescent"
    assert paths[("Job", "crescent-train")] == "/apis/batch/v1/namespaces/crescent/jobs/crescent-train"
    assert paths[("CronJob", "crescent-eval")] == "/apis/batch/v1/namespaces/crescent/cronjobs/crescent-eval"
    assert paths[("Role", "crescent-submitter")] == \
        "/apis/rbac.authorization.k8s.io/v1/namespaces/crescent/roles/crescent-submitter"
    assert len(set(paths.values())) == len(objects)


def test_submit_sends_the_rendered_objects_by_server_side_apply(tmp_path, config_file, api_server, capsys):
    kubeconfig = _kubeconfig(tmp_path, api_server.url)
    argv = ["--overlay", "dev", "--config", config_file, "--nodes", "2"]
    assert main(["submit", "--kubeconfig", kubeconfig, *argv]) == 0
    expected = render(RenderParams(overlay="dev", config=config_file, nodes=2))
    patches = [r for r in api_server.requests if r["method"] == "PATCH"]
    assert [r["body"] for r in patches] == expected
    assert [r["path"] for r in patches] == [object_path(o) for o in expected]
    for r in patches:
        assert r["content_type"] == "application/apply-patch+yaml"
        assert r["query"] == {"fieldManager": ["crescent"], "force": ["true"]}
        assert r["auth"] == "Bearer test-token"
    # The database password exists only in the cluster: created once, random, never in the rendered objects.
    secret = api_server.secrets["mlflow-postgres"]
    password = secret["stringData"]["password"]
    assert len(password) >= 24 and password not in json.dumps(expected)
    out = capsys.readouterr().out
    assert "created Secret/mlflow-postgres" in out and "applied Job/crescent-train" in out
    # A second submit finds the Secret (409 on create) and keeps it; the submitter never reads Secrets.
    assert main(["submit", "--kubeconfig", kubeconfig, *argv]) == 0
    assert api_server.secrets["mlflow-postgres"]["stringData"]["password"] == password
    assert not [r for r in api_server.requests if r["method"] == "GET" and "/secrets" in r["path"]]


def test_submit_only_train_applies_the_training_objects(tmp_path, config_file, api_server):
    kubeconfig = _kubeconfig(tmp_path, api_server.url)
    assert main(["submit", "--kubeconfig", kubeconfig, "--overlay", "dev", "--config", config_file,
                 "--only", "train"]) == 0
    applied = sorted((r["body"]["kind"], r["body"]["metadata"]["name"])
                     for r in api_server.requests if r["method"] == "PATCH")
    assert applied == [("ConfigMap", "crescent-train-config"), ("Job", "crescent-train"),
                       ("PersistentVolumeClaim", "crescent-checkpoints"), ("Service", "crescent-train")]
    assert not api_server.secrets


def test_status_logs_and_delete_talk_to_the_api(tmp_path, api_server, capsys):
    kubeconfig = _kubeconfig(tmp_path, api_server.url)
    assert main(["status", "--kubeconfig", kubeconfig]) == 0
    out = capsys.readouterr().out
    assert "Job crescent-train: Running; completions 1/2, active 1, failed 0" in out
    assert "pod crescent-train-1-abc index 1: Running" in out
    assert main(["logs", "--kubeconfig", kubeconfig, "--index", "1"]) == 0
    assert capsys.readouterr().out == "step 1 loss 10.5\nstep 2 loss 9.75\n"
    log_query = [r for r in api_server.requests if r["path"] == "/api/v1/namespaces/crescent/pods"][-1]["query"]
    assert log_query["labelSelector"] == [
        "batch.kubernetes.io/job-name=crescent-train,batch.kubernetes.io/job-completion-index=1"]
    assert main(["delete", "--kubeconfig", kubeconfig]) == 0
    deleted = [r["path"] for r in api_server.requests if r["method"] == "DELETE"]
    assert deleted == ["/apis/batch/v1/namespaces/crescent/jobs/crescent-train",
                       "/api/v1/namespaces/crescent/configmaps/crescent-train-config"]
    assert all(r["body"] == {"propagationPolicy": "Background"}
               for r in api_server.requests if r["method"] == "DELETE")
    api_server.job_status = {"succeeded": 2, "conditions": [{"type": "Failed", "status": "True",
                                                             "reason": "BackoffLimitExceeded"}]}
    assert main(["status", "--kubeconfig", kubeconfig]) == 1
    assert "Job crescent-train: Failed" in capsys.readouterr().out


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _crescent(args, env):
    return subprocess.run([sys.executable, "-m", "app.cli", "k8s", *args], capture_output=True, text=True,
                          env=env, timeout=120)


@pytest.mark.parametrize("action", ["submit", "status", "logs", "delete"])
def test_unreachable_api_server_fails_with_one_clear_line(tmp_path, config_file, action):
    port = _closed_port()
    kubeconfig = _kubeconfig(tmp_path, f"https://127.0.0.1:{port}")
    extra = ["--overlay", "dev", "--config", config_file] if action == "submit" else []
    proc = _crescent([action, "--kubeconfig", kubeconfig, *extra], dict(os.environ))
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (f"crescent k8s {action}: cannot reach the Kubernetes API server at "
                                   f"127.0.0.1:{port}: connection refused")


def test_no_cluster_configured_fails_with_one_clear_line(tmp_path, config_file):
    env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST")}
    env["HOME"] = str(tmp_path)  # no ~/.kube/config
    proc = _crescent(["submit", "--overlay", "dev", "--config", config_file], env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("crescent k8s submit: no Kubernetes cluster configured: no kubeconfig")
    proc = _crescent(["status", "--kubeconfig", str(tmp_path / "missing")], env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"kubeconfig {tmp_path / 'missing'} does not exist" in proc.stderr


def test_submitter_role_grants_what_submit_uses_and_no_wildcards(config_file):
    from app.k8s.submit import PLURALS, select

    objects = render(RenderParams(overlay="prod", config=config_file))
    role = next(o for o in objects if o["kind"] == "Role" and o["metadata"]["name"] == "crescent-submitter")
    granted = {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
               for resource in rule["resources"] for verb in rule["verbs"]}
    assert not [g for g in granted if "*" in g]
    for component in ("train", "data", "eval", "mlflow"):
        for obj in select(objects, component):
            group = obj["apiVersion"].rsplit("/", 1)[0] if "/" in obj["apiVersion"] else ""
            assert (group, PLURALS[obj["kind"]], "patch") in granted, (component, obj["kind"])
    assert ("", "secrets", "create") in granted
    assert not {("", "secrets", verb) for verb in ("get", "list", "watch")} & granted
    assert {("batch", "jobs", "get"), ("", "pods", "list"), ("", "pods/log", "get"),
            ("batch", "jobs", "delete"), ("", "configmaps", "delete")} <= granted
