"""Multi-node for real on one machine: the rendered training workload's pods (Indexed Job, or JobSet) as two hosts.

Each "node" is a network namespace joined to the other by a veth pair, with its own hostname (a UTS namespace,
as a pod has) and its own /etc/hosts (ip netns exec bind-mounts /etc/netns/NAME/hosts) resolving the headless
Service's pod names as the Job / JobSet controllers name pods (app/k8s/workloads.py), the names the torchrun
flags must use. Each pod's command, arguments and
environment come from the rendered manifest: the Job controller's JOB_COMPLETION_INDEX is added, $(VAR)
references are expanded as the kubelet does, and volume mount paths map to local directories (the ConfigMap's
files are written out). Needs root (network namespaces); CI runs as root.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from app.k8s.render import RenderParams, find, render, training_workload
from app.k8s.workloads import jobset_subdomain, pod_hostname, pod_templates

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
SUBNET = "10.231.{}.{}"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("unshare") is None,
    reason="needs root with iproute2 and util-linux (network namespaces); run .ci/setup-system.sh")


def expand_k8s_vars(text: str, env: dict[str, str]) -> str:
    """The kubelet's $(VAR) expansion: defined names are replaced, $$ escapes, unknown references stay."""
    def sub(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, text)


def pod_process(objects: list[dict], index: int, mounts: dict[str, Path]) -> tuple[list[str], dict[str, str]]:
    """argv and environment of the training container of pod `index`, as the kubelet would start it."""
    workload = training_workload(objects)
    pod = pod_templates(workload)[0]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == "trainer")
    env: dict[str, str] = {"JOB_COMPLETION_INDEX": str(index), "HOSTNAME": pod_hostname(workload, index)}
    for item in container.get("env", []):
        assert "value" in item, f"env {item['name']} comes from {item.get('valueFrom')}: not emulated here"
        env[item["name"]] = expand_k8s_vars(item["value"], env)
    argv = [expand_k8s_vars(a, env) for a in container.get("command", []) + container.get("args", [])]
    for mount in container.get("volumeMounts", []):
        if mount["mountPath"] in mounts:
            local = str(mounts[mount["mountPath"]])
            argv = [local + a[len(mount["mountPath"]):] if a.startswith(mount["mountPath"]) else a for a in argv]
    return argv, env


def config_map_files(objects: list[dict], directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in find(objects, "ConfigMap", "crescent-train-config")["data"].items():
        (directory / name).write_text(text)
    return directory


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@contextlib.contextmanager
def two_hosts(hostnames: list[str], service: str):
    """Two network namespaces on a veth pair; each resolves `<hostname>.<service>` of both through its hosts file."""
    tag = uuid.uuid4().hex[:6]
    names = [f"crescent-{tag}-{i}" for i in range(2)]
    veths = [f"cv{tag}{i}" for i in range(2)]
    addresses = [SUBNET.format(int(tag[:2], 16) % 250, i + 1) for i in range(2)]
    hosts = "127.0.0.1 localhost\n" + "".join(f"{addr} {h}.{service} {h}\n" for addr, h in zip(addresses, hostnames))
    try:
        for name in names:
            _ip("netns", "add", name)
            Path(f"/etc/netns/{name}").mkdir(parents=True, exist_ok=True)
            Path(f"/etc/netns/{name}/hosts").write_text(hosts)
        _ip("link", "add", veths[0], "type", "veth", "peer", "name", veths[1])
        for name, veth, addr in zip(names, veths, addresses):
            _ip("link", "set", veth, "netns", name)
            _ip("-n", name, "addr", "add", f"{addr}/24", "dev", veth)
            _ip("-n", name, "link", "set", veth, "up")
            _ip("-n", name, "link", "set", "lo", "up")
        yield names
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "delete", name], capture_output=True)
            shutil.rmtree(f"/etc/netns/{name}", ignore_errors=True)


def start_pods(namespaces: list[str], processes: list[tuple[list[str], dict[str, str]]], cwd: Path,
               logs: Path) -> list[subprocess.Popen]:
    """Start every pod's process in its namespace and UTS hostname (the Popen's pid is the pod's command, as
    PID 1 of a container is: `ip netns exec`, `unshare` and `sh` all exec). Output goes to logs/pod-<i>.*."""
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for index, (ns, (argv, env)) in enumerate(zip(namespaces, processes)):
        full_env = {"PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin", "HOME": str(cwd), "LANG": "C.UTF-8",
                    **env}
        cmd = ["ip", "netns", "exec", ns, "unshare", "--uts", "sh", "-c", 'hostname "$HOSTNAME" && exec "$@"',
               "pod", *argv]
        with open(logs / f"pod-{index}.out", "w") as out, open(logs / f"pod-{index}.err", "w") as err:
            procs.append(subprocess.Popen(cmd, env=full_env, cwd=cwd, stdout=out, stderr=err, text=True))
    return procs


def wait_pods(procs: list[subprocess.Popen], logs: Path, timeout: float = 300) -> list[subprocess.CompletedProcess]:
    results = []
    for index, proc in enumerate(procs):
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise AssertionError(f"pod {index} timed out:\n{(logs / f'pod-{index}.err').read_text()[-3000:]}") from None
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, (logs / f"pod-{index}.out").read_text(),
                                                   (logs / f"pod-{index}.err").read_text()))
    return results


def run_pods(namespaces, processes, cwd: Path, timeout: float = 300) -> list[subprocess.CompletedProcess]:
    logs = cwd / f"logs-{uuid.uuid4().hex[:6]}"
    return wait_pods(start_pods(namespaces, processes, cwd, logs), logs, timeout)


ALL_REDUCE = textwrap.dedent("""
    import os, socket, torch, torch.distributed as dist
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    x = torch.tensor([float(rank + 1)])
    dist.all_reduce(x)
    print(f"RESULT host={socket.gethostname()} rank={rank} world={world} node={os.environ['GROUP_RANK']} "
          f"master={os.environ['MASTER_ADDR']} sum={x.item()}", flush=True)
    dist.destroy_process_group()
""")


def test_kubelet_variable_expansion():
    env = {"JOB_COMPLETION_INDEX": "1"}
    assert expand_k8s_vars("--node-rank=$(JOB_COMPLETION_INDEX)", env) == "--node-rank=1"
    assert expand_k8s_vars("$$(JOB_COMPLETION_INDEX) $(UNKNOWN)", env) == "$(JOB_COMPLETION_INDEX) $(UNKNOWN)"


def _service(workload: dict) -> str:
    if workload["kind"] == "JobSet":
        return jobset_subdomain(workload)
    return workload["spec"]["template"]["spec"]["subdomain"]


@pytest.mark.slow
@pytest.mark.parametrize("overlay, master", [("dev", "crescent-train-0.crescent-train"),
                                             ("jobset", "crescent-train-node-0-0.crescent-train")])
def test_rendered_workload_rendezvous_across_two_network_namespaces(tmp_path, overlay, master):
    """torchrun from the manifest, with a gloo all_reduce program in place of training: both nodes meet at pod 0's
    DNS name (the Indexed Job's or the JobSet's) and agree on the result."""
    config = tmp_path / "run.yaml"
    config.write_text("trainer:\n  max_steps: 1\n")
    objects = render(RenderParams(overlay=overlay, nodes=2, gpus_per_node=0, cpu_procs_per_node=1,
                                  config=str(config)))
    workload = training_workload(objects)
    mounts = {"/etc/crescent": config_map_files(objects, tmp_path / "configmap")}
    script = tmp_path / "all_reduce.py"
    script.write_text(ALL_REDUCE)
    processes = []
    for index in range(2):
        argv, env = pod_process(objects, index, mounts)
        assert argv[:4] == ["torchrun", "--nnodes=2", "--nproc-per-node=1", f"--node-rank={index}"]
        assert f"--master-addr={master}" in argv
        program = argv.index("-m")  # keep the manifest's torchrun flags, swap the program
        processes.append((argv[:program] + [str(script)], env))
    hostnames = [pod_hostname(workload, index) for index in range(2)]
    with two_hosts(hostnames, _service(workload)) as namespaces:
        results = run_pods(namespaces, processes, tmp_path, timeout=180)
    lines = []
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
        lines += [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT")]
    assert sorted(lines) == [
        f"RESULT host={hostnames[0]} rank=0 world=2 node=0 master={master} sum=3.0",
        f"RESULT host={hostnames[1]} rank=1 world=2 node=1 master={master} sum=3.0",
    ]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(tracking_uri: str, experiment: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, f"expected one MLflow run, found {len(runs)}"
    return sorted((m.step, m.value) for m in client.get_metric_history(runs[0].info.run_id, "train/loss"))


@pytest.mark.slow
def test_rendered_job_trains_tiny_fsdp_muon_across_two_hosts(tmp_path):
    """The real thing: the manifest's torchrun + `crescent train` on two hosts (FSDP2 + Muon over gloo/TCP),
    checkpoints on one shared "volume", losses equal to the same run on one host with two processes."""
    if not (ROOT / "app/configs/tiny-cpu.yaml").is_file():
        pytest.skip("`crescent train` and app/configs/ are not there yet (training issue)")
    import train_helpers

    steps = 3
    corpus = train_helpers.build_corpus(tmp_path / "corpus")  # on the data volume in a cluster

    def config(name: str) -> Path:
        return train_helpers.write_config(
            tmp_path / f"{name}.yaml", corpus, tmp_path / name / "run", f"sqlite:///{tmp_path / name}/mlruns.db",
            total_tokens=64 * 16 * 32, trainer__strategy="muon_fsdp")

    # Two hosts from the manifest; the run directory comes from the Job's --run.dir on the shared volume.
    (tmp_path / "cluster").mkdir()
    objects = render(RenderParams(overlay="dev", nodes=2, gpus_per_node=0, cpu_procs_per_node=1,
                                  config=str(config("cluster")), train_overrides=[("trainer.max_steps", str(steps))]))
    mounts = {"/etc/crescent": config_map_files(objects, tmp_path / "configmap"),
              "/checkpoints": tmp_path / "cluster" / "volume"}
    processes = [pod_process(objects, index, mounts) for index in range(2)]
    assert all("--trainer.num_nodes" in argv and argv[argv.index("--trainer.num_nodes") + 1] == "2"
               for argv, _ in processes)
    with two_hosts(["crescent-train-0", "crescent-train-1"], "crescent-train") as namespaces:
        results = run_pods(namespaces, processes, tmp_path, timeout=600)
    for index, r in enumerate(results):
        assert r.returncode == 0, f"node {index}:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    run_dir = tmp_path / "cluster" / "volume" / "crescent"
    assert any((run_dir / "checkpoints").iterdir()), "no checkpoint on the shared volume"

    # The same config on one host, two processes: the global batch and the ranks are the same.
    (tmp_path / "single").mkdir()
    single = subprocess.run(
        [str(VENV_BIN / "torchrun"), "--nnodes=1", "--nproc-per-node=2", f"--master-port={_free_port()}", "-m", "app.cli",
         "train", "--config", str(config("single")), "--trainer.num_nodes", "1", "--trainer.devices", "2",
         "--trainer.max_steps", str(steps)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert single.returncode == 0, single.stderr[-4000:]

    two_hosts_losses = _losses(f"sqlite:///{tmp_path / 'cluster'}/mlruns.db", "test")
    one_host_losses = _losses(f"sqlite:///{tmp_path / 'single'}/mlruns.db", "test")
    assert [s for s, _ in two_hosts_losses] == [s for s, _ in one_host_losses] and len(one_host_losses) == steps
    for (_, a), (_, b) in zip(two_hosts_losses, one_host_losses):
        assert a == pytest.approx(b, abs=1e-5)


@pytest.mark.slow
def test_sigterm_checkpoints_on_both_hosts_and_the_restarted_pods_resume(tmp_path):
    """What a preemption does to the Job: the kubelet SIGTERMs every pod's torchrun; within the manifest's
    --shutdown-timeout the trainers agree on a step, save a preemption checkpoint on the shared volume and
    exit; the Job's replacement pods (same commands) resume from it and the MLflow run continues."""
    if not (ROOT / "app/configs/tiny-cpu.yaml").is_file():
        pytest.skip("`crescent train` and app/configs/ are not there yet (training issue)")
    import signal
    import time

    import train_helpers

    corpus = train_helpers.build_corpus(tmp_path / "corpus")
    tracking = f"sqlite:///{tmp_path}/mlruns.db"
    config = train_helpers.write_config(tmp_path / "run.yaml", corpus, tmp_path / "unused", tracking,
                                        total_tokens=64 * 16 * 400, trainer__strategy="muon_fsdp")
    volume = tmp_path / "volume"
    checkpoints = volume / "crescent" / "checkpoints"

    def pods(max_steps: int):
        objects = render(RenderParams(overlay="dev", nodes=2, gpus_per_node=0, config=str(config),
                                      train_overrides=[("trainer.max_steps", str(max_steps))]))
        mounts = {"/etc/crescent": config_map_files(objects, tmp_path / "configmap"), "/checkpoints": volume}
        return [pod_process(objects, index, mounts) for index in range(2)]

    with two_hosts(["crescent-train-0", "crescent-train-1"], "crescent-train") as namespaces:
        procs = start_pods(namespaces, pods(max_steps=500), tmp_path, tmp_path / "first")
        deadline = time.monotonic() + 420
        while not (checkpoints.is_dir() and any(p.name.startswith("step") for p in checkpoints.iterdir())):
            assert all(p.poll() is None for p in procs), "a pod ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 420 s"
            time.sleep(1)
        for p in procs:
            p.send_signal(signal.SIGTERM)  # the kubelet's signal to each container's PID 1
        first = wait_pods(procs, tmp_path / "first", timeout=120)
        preempt = sorted(p.name for p in checkpoints.iterdir() if p.name.startswith("preempt-step="))
        assert preempt, f"no preemption checkpoint; node 0:\n{first[0].stderr[-3000:]}"
        assert all(r.returncode not in (-9, 137) for r in first), "a pod was SIGKILLed before it finished"
        step = int(preempt[-1].split("=")[1].split(".")[0])

        second = wait_pods(start_pods(namespaces, pods(max_steps=step + 2), tmp_path, tmp_path / "second"),
                           tmp_path / "second", timeout=600)
    for index, r in enumerate(second):
        assert r.returncode == 0, f"node {index} after restart:\n{r.stderr[-4000:]}"
    assert f"resuming from {checkpoints / preempt[-1]}" in second[0].stderr
    steps = [s for s, _ in _losses(tracking, "test")]  # one MLflow run, continued
    assert steps == list(range(1, step + 3)), (steps, [r.returncode for r in first])
