"""Shard sets in object storage, for real: moto's standalone S3 server on 127.0.0.1 (an ephemeral port, IAM
credentials enforced), reached through s3fs with the standard `AWS_ENDPOINT_URL` and AWS credential variables.

`crescent data build --out s3://...` writes the same bytes a local build writes; the stream reads them back; a
`crescent train` streaming from S3 is killed (SIGTERM) and resumed, ending bitwise equal to an uninterrupted run on
local copies; a missing object is counted as bad data; wrong credentials stop `crescent train` before any step with
one clear line."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import train_helpers as th
from safetensors.torch import load_file

BUCKET = "crescent"
STEPS = 12
TOKENS = th.SEQ_LEN * 16 * STEPS
# The moto server in its own process; the first three requests (creating the IAM user, its policy and its key)
# are the only ones it accepts without valid credentials.
_SERVER = """
import sys, time
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()  # until the test closes our stdin
server.stop()
"""


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """{env: the variables a process needs to reach the bucket, endpoint: URL}, credentials of a real IAM user."""
    home = tmp_path_factory.mktemp("aws-home")
    base = {"AWS_CONFIG_FILE": str(home / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(home / "none"),
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    proc = subprocess.Popen([sys.executable, "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL,
                            text=True, env={**os.environ, **base, "INITIAL_NO_AUTH_ACTION_COUNT": "3"})
    try:
        port = int(proc.stdout.readline())
        endpoint = f"http://127.0.0.1:{port}"
        env = {**base, "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bootstrap",
               "AWS_SECRET_ACCESS_KEY": "bootstrap"}
        key = subprocess.run([sys.executable, "-c", _CREATE_USER], env={**os.environ, **env}, capture_output=True,
                             text=True, timeout=120, check=True).stdout.split()
        env.update(AWS_ACCESS_KEY_ID=key[0], AWS_SECRET_ACCESS_KEY=key[1])
        yield {"env": env, "endpoint": endpoint}
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


_CREATE_USER = """
import json, boto3
iam = boto3.client("iam")
iam.create_user(UserName="trainer")
iam.put_user_policy(UserName="trainer", PolicyName="s3", PolicyDocument=json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
key = iam.create_access_key(UserName="trainer")["AccessKey"]
s3 = boto3.client("s3", aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"])
s3.create_bucket(Bucket="crescent")
print(key["AccessKeyId"], key["SecretAccessKey"])
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return th.build_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture
def aws(s3, monkeypatch):
    """This process talks to the bucket too (fresh s3fs instances: they cache credentials)."""
    import fsspec

    for name, value in s3["env"].items():
        monkeypatch.setenv(name, value)
    fsspec.filesystem("s3").clear_instance_cache()
    return s3


def _crescent(*args: str, cwd: Path, env: dict, check: bool = True, timeout: float = 600):
    result = subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=cwd, capture_output=True, text=True,
                            env={**th.env(), "PYTHONPATH": str(th.ROOT), **env}, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"crescent {' '.join(args)} exited {result.returncode}\n{result.stderr[-4000:]}")
    return result


@pytest.fixture(scope="module")
def s3_sets(s3, corpus, tmp_path_factory):
    """The corpus's training sets built again, into the bucket, by `crescent data build --out s3://...`."""
    cwd = tmp_path_factory.mktemp("build")
    src = Path(corpus["tokenizer"]).parent / "src"
    urls = {}
    for name in ("prose", "code"):
        urls[name] = f"s3://{BUCKET}/sets/{name}"
        _crescent("data", "build", "--source", str(src / name), "--out", urls[name], "--tokenizer",
                  corpus["tokenizer"], "--seq-len", str(th.SEQ_LEN), "--shard-samples", "64", "--seed", "0",
                  "--quiet", cwd=cwd, env=s3["env"])
    return urls


def test_build_to_s3_writes_the_local_build_and_streams_the_same_samples(aws, corpus, s3_sets, tmp_path):
    from components.data.loader import StreamLoader
    from components.data.shards import inspect_shard_set
    from components.data.stream import MixtureStream

    local = json.loads((Path(corpus["shards"]["prose"]) / "manifest.json").read_text())
    remote = inspect_shard_set(s3_sets["prose"], verify=True)
    assert remote["verified_shards"] == len(local["shards"]) and remote["corrupt_shards"] == []
    manifest = json.loads(__import__("fsspec").open(f"{s3_sets['prose']}/manifest.json").open().read())
    assert [s["sha256"] for s in manifest["shards"]] == [s["sha256"] for s in local["shards"]]  # same bytes
    total = local["samples"]

    def batches(location):
        stream = MixtureStream({"prose": location}, {"prose": 1.0}, micro_batch_size=4, num_streams=96,
                               stop_samples=total)
        loaded = list(StreamLoader(stream))
        return [b["input_ids"] for b in loaded], sum(int(b["bad_shards"].sum()) for b in loaded)

    got, bad_shards = batches(s3_sets["prose"])
    expected, _ = batches(corpus["shards"]["prose"])
    assert sum(len(b) for b in got) == total and bad_shards == 0
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    no_tokenizer = _crescent("data", "build", "--source", str(tmp_path), "--out", f"s3://{BUCKET}/x",
                             cwd=tmp_path, env=aws["env"], check=False)
    assert no_tokenizer.returncode == 2 and "is a URL: pass --tokenizer DIR" in no_tokenizer.stderr


def test_a_missing_object_is_counted_as_bad_data(aws, corpus, s3_sets):
    import fsspec

    from components.data.loader import StreamLoader
    from components.data.stream import MixtureStream

    fs = fsspec.filesystem("s3")
    location = f"s3://{BUCKET}/sets/holed"
    fs.copy(f"{BUCKET}/sets/code/", f"{BUCKET}/sets/holed/", recursive=True)
    manifest = json.loads(fs.cat(f"{BUCKET}/sets/holed/manifest.json"))
    gone = manifest["shards"][1]
    fs.rm_file(f"{BUCKET}/sets/holed/{gone['file']}")
    stream = MixtureStream({"code": location}, {"code": 1.0}, micro_batch_size=4, num_streams=96,
                           stop_samples=manifest["samples"])
    loaded = list(StreamLoader(stream))
    assert sum(int(b["bad_shards"].sum()) for b in loaded) == 1
    assert sum(int(b["lost_samples"].sum()) for b in loaded) == gone["samples"]
    assert sum(len(b["input_ids"]) for b in loaded) == manifest["samples"] - gone["samples"]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    export = sorted((run_dir / "exports").glob("step-*"))[-1]
    return load_file(export / "model.safetensors")


@pytest.mark.slow
def test_train_from_s3_killed_and_resumed_equals_an_uninterrupted_local_run(s3, corpus, s3_sets, tmp_path):
    reference = tmp_path / "reference"
    config = th.write_config(tmp_path / "local.yaml", corpus, reference, f"sqlite:///{tmp_path}/ref.db", TOKENS)
    _crescent("train", "--config", str(config), cwd=tmp_path, env={})

    on_s3 = {**corpus, "shards": s3_sets}
    uri = f"sqlite:///{tmp_path}/s3.db"
    config = th.write_config(tmp_path / "s3.yaml", on_s3, tmp_path / "run", uri, TOKENS)
    cmd = [sys.executable, "-m", "app.cli", "train", "--config", str(config)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env={**th.env(), "PYTHONPATH": str(th.ROOT), **s3["env"]},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    checkpoints = tmp_path / "run" / "checkpoints"
    deadline = time.time() + 300
    while not (checkpoints / "step-00000004.ckpt").exists():
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 143, out
    preempt = sorted(checkpoints.glob("preempt-step=*.ckpt"))
    assert len(preempt) == 1 and 4 <= int(preempt[0].stem.split("=")[1]) < STEPS

    resumed = _crescent("train", "--config", str(config), cwd=tmp_path, env=s3["env"])
    assert "resuming from" in resumed.stderr
    ours, expected = _weights(tmp_path / "run"), _weights(reference)
    assert ours.keys() == expected.keys()
    assert all(torch.equal(ours[k], expected[k]) for k in ours)  # the exact data position after the resume
    steps = [s for s, _ in th.metric_history(uri, "test", "train/loss")]
    assert sorted(set(steps)) == list(range(1, STEPS + 1))


def test_wrong_credentials_stop_training_before_the_first_step(s3, corpus, s3_sets, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    config = th.write_config(tmp_path / "s3.yaml", {**corpus, "shards": s3_sets}, tmp_path / "run", uri, TOKENS)
    wrong = {**s3["env"], "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    result = _crescent("train", "--config", str(config), cwd=tmp_path, env=wrong, check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    (line,) = [ln for ln in result.stderr.splitlines() if ln.startswith("crescent train: error:")]
    assert re.search(rf"{BUCKET}/sets/(prose|code)/manifest.json: access denied \(Forbidden\)", line), line
    assert line.endswith("check the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, and "
                         "AWS_ENDPOINT_URL for an S3-compatible store)")
    assert not list((tmp_path / "run").glob("checkpoints/*.ckpt"))


def test_s3_without_s3fs_names_the_extra(tmp_path):
    hide = ("import importlib.abc, sys\n"
            "class Hide(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 's3fs':\n"
            "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
            "sys.meta_path.insert(0, Hide())\n"
            "from app.cli import main\n"
            "sys.exit(main(['data', 'inspect', 's3://bucket/set']))\n")
    proc = subprocess.run([sys.executable, "-c", hide], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(th.ROOT), "HOME": str(tmp_path)})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == ("crescent data: needs the Python package 's3fs', which is not "
                                                    "installed: pip install 'crescent[s3]'")
