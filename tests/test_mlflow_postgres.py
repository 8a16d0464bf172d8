"""The production backend for real: `mlflow server` with k8s/base/mlflow.yaml's own flags on a throwaway
PostgreSQL cluster (initdb in a temporary directory, pg_ctl on a free loopback port), a short `crescent train` and a
`crescent eval run` logging to it; then the server and the database restart and nothing is lost.

PostgreSQL comes from Debian (.ci/setup-system.sh installs it). It refuses to run as root: as root the cluster
belongs to the package's `postgres` user (runuser)."""
from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import train_helpers as th
import yaml
from test_tracking_server import MlflowServer

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
STEPS = 12  # the shortest run whose cooldown holds its re-warm (train_helpers.schedule)
EXPORT_EVERY = 6
TOKENS = th.SEQ_LEN * 16 * STEPS


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return found[-1].parent if found else None


def _requirements() -> str | None:
    """Why this test cannot run here, or None."""
    if _pg_bin() is None:
        return "PostgreSQL is not installed (/usr/lib/postgresql/*/bin/initdb; .ci/setup-system.sh installs it)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no `postgres` user to run PostgreSQL as"
        if shutil.which("runuser") is None:
            return "running as root without `runuser` to run PostgreSQL as `postgres`"
    try:
        import psycopg2  # noqa: F401 - the driver of the manifest's backend-store URI
    except ImportError:
        return "psycopg2 is not installed (pip install -e '.[dev]')"
    return None


class PostgresCluster:
    """A cluster in `root` with superuser `user` (password auth over TCP) and database `database`."""

    def __init__(self, root: Path, port: int, user: str, password: str, database: str):
        self.root, self.port, self.user, self.password, self.database = root, port, user, password, database
        self.bin = _pg_bin()
        self.data, self.log = root / "data", root / "postgres.log"

    def _run(self, *command: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        env = {**os.environ, "PGPASSWORD": self.password}
        result = subprocess.run([*prefix, *command], capture_output=True, text=True, env=env, timeout=120)
        if result.returncode != 0:
            log = self.log.read_text()[-3000:] if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(command)} exited {result.returncode}: {result.stderr[-3000:]}\n{log}")

    def create(self) -> None:
        password_file = self.root / "password"
        password_file.write_text(self.password + "\n")
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
            os.chown(password_file, owner.pw_uid, owner.pw_gid)
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", self.user, f"--pwfile={password_file}",
                  "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-instructions")
        self.start()
        self._run(str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user,
                  self.database)

    def start(self) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o",
                  f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root}", "start")

    def query(self, sql: str, *params) -> list[tuple]:
        import psycopg2

        with psycopg2.connect(host="127.0.0.1", port=self.port, user=self.user, password=self.password,
                              dbname=self.database) as connection, connection.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchall()

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")


def manifest_server(port: int, artifacts: Path, db_port: int, password: str) -> tuple[list[str], dict[str, str]]:
    """k8s/base/mlflow.yaml's `mlflow server` arguments and backend-store URI, for this host: its host, port,
    artifact destination and database address replaced, every other flag as the Deployment runs it."""
    docs = list(yaml.safe_load_all((ROOT / "k8s" / "base" / "mlflow.yaml").read_text()))
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["mlflow"] and container["args"][0] == "server"
    replace = {"--host": "127.0.0.1", "--port": str(port), "--artifacts-destination": str(artifacts)}
    args = []
    for arg in container["args"][1:]:
        flag, eq, _ = arg.partition("=")
        args.append(f"{flag}={replace.pop(flag)}" if eq and flag in replace else arg)
    assert not replace, f"the manifest no longer sets {sorted(replace)}"
    env = {e["name"]: e.get("value") for e in container["env"]}
    uri = env["MLFLOW_BACKEND_STORE_URI"].replace("$(POSTGRES_PASSWORD)", password)
    parts = urlsplit(uri)
    uri = parts._replace(netloc=f"{parts.username}:{password}@127.0.0.1:{db_port}").geturl()
    return args, {"MLFLOW_BACKEND_STORE_URI": uri}


@pytest.fixture
def backend(tmp_path):
    reason = _requirements()
    if reason:
        pytest.skip(reason)
    db_root = Path(tempfile.mkdtemp(prefix="crescent-pg-"))  # outside pytest's root-only tmp tree
    password = secrets.token_hex(12)
    db_port, port = _free_port(), _free_port()
    args, env = manifest_server(port, tmp_path / "mlartifacts", db_port, password)
    parts = urlsplit(env["MLFLOW_BACKEND_STORE_URI"])
    assert parts.scheme == "postgresql+psycopg2"
    cluster = PostgresCluster(db_root, db_port, parts.username, password, parts.path.lstrip("/"))
    server = MlflowServer(args, port, str(tmp_path / "server.log"), env)
    try:
        cluster.create()
        server.start(timeout=300)
        yield cluster, server
    finally:
        server.stop()
        cluster.stop()
        shutil.rmtree(db_root, ignore_errors=True)


def _snapshot(uri: str, run_dir: Path, download: Path) -> dict:
    """Everything the UI shows for the training run: run, params, tags, metric histories, artifacts (bytes),
    dataset inputs, logged models with their metrics."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    run_id = run.info.run_id
    histories = {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
                 for key in run.data.metrics}
    files = sorted(a.path for a in client.list_artifacts(run_id, f"export/step-{STEPS:08d}"))
    shutil.rmtree(download, ignore_errors=True)
    config = Path(client.download_artifacts(run_id, "config.yaml", str(download))).read_bytes()
    inputs = sorted((i.dataset.name, i.dataset.digest, i.dataset.source,
                     tuple(sorted((t.key, t.value) for t in i.tags))) for i in run.inputs.dataset_inputs)
    models = {m.name: (m.params, m.status, sorted((x.key, x.value, x.step, x.dataset_name) for x in m.metrics))
              for m in client.search_logged_models([run.info.experiment_id])}
    outputs = sorted(o.step for o in client.get_run(run_id).outputs.model_outputs)
    return {"run_id": run_id, "status": run.info.status, "params": run.data.params, "tags": run.data.tags,
            "metrics": histories, "export_files": files, "config": config, "inputs": inputs, "models": models,
            "outputs": outputs, "local_config": (run_dir / "config.yaml").read_bytes()}


def test_train_and_eval_on_the_manifests_postgres_backend_survive_a_restart(backend, tmp_path):
    from app.tracking.lineage import shard_set_digest
    from components.data.shards import read_manifest
    from eval.cli import main as eval_main

    cluster, server = backend
    corpus = th.build_corpus(tmp_path / "corpus")
    run_dir = tmp_path / "run"
    config = th.write_config(tmp_path / "config.yaml", corpus, run_dir, server.url, TOKENS,
                             run__export_every_n_steps=EXPORT_EVERY, run__system_metrics_interval_s=0.5)
    th.crescent("train", "--config", str(config), cwd=tmp_path)
    assert eval_main(["data", "--out", str(tmp_path / "evaldata")]) == 0
    export = run_dir / "exports" / f"step-{STEPS:08d}"
    assert json.loads((export / "crescent.json").read_text())["tracking_uri"] == server.url
    assert eval_main(["run", "--checkpoint", str(export), "--tasks", "mmlu_dev", "--limit", "1",
                      "--data-dir", str(tmp_path / "evaldata"), "--output", str(tmp_path / "eval.json")]) == 0

    before = _snapshot(server.url, run_dir, tmp_path / "download-1")
    assert before["status"] == "FINISHED" and before["params"]["model.preset"] == "tiny"
    assert [s for s, _ in before["metrics"]["train/loss"]] == list(range(1, STEPS + 1))
    system = [s for s, _ in before["metrics"]["system/cpu_utilization_percentage"]]
    assert system and system == list(range(len(system)))
    tags = before["tags"]
    assert tags["mlflow.source.name"] == str(ROOT / "app" / "cli.py") and tags["mlflow.source.type"] == "LOCAL"
    if (ROOT / ".git").exists():
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
        assert tags["mlflow.source.git.commit"] == head.strip()
    assert before["config"] == before["local_config"]  # uploaded through the server (--serve-artifacts)
    assert {f"export/step-{STEPS:08d}/{f}" for f in ("model.safetensors", "crescent.json")} <= set(
        before["export_files"])
    digests = {name: shard_set_digest(read_manifest(path)) for name, path in corpus["shards"].items()}
    digests["val"] = shard_set_digest(read_manifest(corpus["val"]))
    assert {(name, digest) for name, digest, _, _ in before["inputs"]} == {(n, d) for n, d in digests.items()}
    assert sorted(before["models"]) == [f"step-{EXPORT_EVERY:08d}", f"step-{STEPS:08d}"]
    assert before["outputs"] == [EXPORT_EVERY, STEPS]
    params, status, metrics = before["models"][f"step-{STEPS:08d}"]
    assert params["export_uri"] == export.as_uri() and params["tokens_seen"] == str(TOKENS)
    assert str(status) == "READY"
    [acc] = [m for m in metrics if m[0] == "eval/mmlu_dev/acc"]
    assert acc[2] == STEPS and acc[3] == "mmlu_dev" and 0.0 <= acc[1] <= 1.0
    assert before["metrics"]["eval/mmlu_dev/acc"] == [(STEPS, acc[1])]
    # The server really keeps them in this PostgreSQL database (the manifest passes the URI by environment).
    run_id = before["run_id"]
    assert cluster.query("SELECT status FROM runs WHERE run_uuid = %s", run_id) == [("FINISHED",)]
    assert cluster.query("SELECT count(*) FROM metrics WHERE run_uuid = %s AND key = 'train/loss'", run_id) == \
        [(STEPS,)]
    assert cluster.query("SELECT count(*) FROM logged_models WHERE source_run_id = %s", run_id) == [(2,)]

    server.stop()
    cluster.stop()
    cluster.start()
    server.start(timeout=300)
    assert _snapshot(server.url, run_dir, tmp_path / "download-2") == before
