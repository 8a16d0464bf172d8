"""The MLflow Deployment's command, run for real: `mlflow server` with the manifest's flags answers clients that
use the in-cluster Service name (MLflow rejects unknown Host headers) and refuses others; the probes' /health
path answers. The backend store is sqlite here (Postgres cannot run offline); the flags are the manifest's."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from app.k8s.render import RenderParams, find, render


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port: int, path: str, host: str) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Host": host})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.mark.slow
def test_mlflow_server_from_the_manifest_accepts_the_service_name(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("trainer: {}\n")
    objects = render(RenderParams(overlay="dev", config=str(config)))
    container = find(objects, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    probe_path = container["readinessProbe"]["httpGet"]["path"]
    port = _free_port()
    local = {"--host=0.0.0.0": "--host=127.0.0.1", "--port=5000": f"--port={port}", "--workers=2": "--workers=1",
             "--artifacts-destination=/mlartifacts": f"--artifacts-destination={tmp_path / 'artifacts'}"}
    args = [local.get(a, a) for a in container["args"]]
    assert args != container["args"] and any(a.startswith("--allowed-hosts=") for a in args)
    mlflow = Path(sys.executable).parent / container["command"][0]
    env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    server = subprocess.Popen([str(mlflow), *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if _get(port, probe_path, "10.0.0.7:5000") == 200:
                    break
            except OSError:
                pass
            assert server.poll() is None, server.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "mlflow server did not answer /health in 120 s"
            time.sleep(1)
        api = "/api/2.0/mlflow/experiments/search?max_results=1"
        for host in ("mlflow:5000", "mlflow.crescent.svc.cluster.local:5000", "mlflow.crescent.svc:5000",
                     f"localhost:{port}"):
            assert _get(port, api, host) == 200, host
        assert _get(port, api, "attacker.example:5000") == 403
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
