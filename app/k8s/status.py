"""The training workload's progress, its pods and their logs, for any workload kind the API server serves.

The state comes from the workload's own conditions (Job: Complete/Failed, JobSet: Completed/Failed, TrainJob:
Complete/Failed; Suspended while Kueue has not admitted it); `--watch` follows it with a watch stream
(`kubernetes.watch.Watch`) until it ends. Its pods are found by their controller owner references (pod -> Job
-> JobSet -> TrainJob), so no kind needs its own label rules; a node's pod is the one whose completion index is
the node rank. Logs stream with `follow`.
"""
from __future__ import annotations

import sys

from app.k8s.submit import ClusterError, resource_for, resource_named

DONE = {"Complete": "Complete", "Completed": "Complete", "Failed": "Failed"}
INDEX = "batch.kubernetes.io/job-completion-index"


def state_of(obj: dict) -> str:
    """Complete, Failed, Suspended or Running, from the conditions every workload kind reports."""
    conditions = [c for c in obj.get("status", {}).get("conditions", []) or [] if c.get("status") == "True"]
    for cond in conditions:
        if cond.get("type") in DONE:
            return DONE[cond["type"]]
    if obj.get("spec", {}).get("suspend") or any(c.get("type") == "Suspended" for c in conditions):
        return "Suspended"
    return "Running"


def describe(obj: dict) -> list[str]:
    """Lines for the workload: its state, the counters in its status, one line per replicated job, conditions."""
    status = obj.get("status", {}) or {}
    counters = ", ".join(f"{k} {v}" for k, v in status.items() if isinstance(v, int) and not isinstance(v, bool))
    head = f"{obj['kind']} {obj['metadata']['name']}: {state_of(obj)}"
    if "completions" in obj.get("spec", {}):
        head += f"; completions {status.get('succeeded', 0)}/{obj['spec']['completions']}"
    lines = [head + (f"; {counters}" if counters else "")]
    for key, items in status.items():  # JobSet replicatedJobsStatus, TrainJob jobsStatus
        if isinstance(items, list) and items and all(isinstance(i, dict) and "name" in i for i in items):
            for item in items:
                numbers = ", ".join(f"{k} {v}" for k, v in item.items() if isinstance(v, int))
                lines.append(f"  {key.removesuffix('Status')} {item['name']}: {numbers}")
    for cond in status.get("conditions", []) or []:
        lines.append(f"  condition {cond.get('type')}={cond.get('status')} {cond.get('reason', '')} "
                     f"{cond.get('message', '')}".rstrip())
    return lines


def pods_of(dyn, namespace: str, workload: dict, timeout: float) -> list[dict]:
    """The workload's pods: those whose chain of controller owners reaches it."""
    pods = dyn.get(resource_for(dyn, "v1", "Pod"), namespace=namespace, _request_timeout=timeout).to_dict()
    owners: dict[str, dict] = {workload["metadata"]["uid"]: workload}
    mine = []
    for pod in pods.get("items", []):
        obj = pod
        for _ in range(4):  # pod -> Job -> JobSet -> TrainJob at most
            ref = next((r for r in obj["metadata"].get("ownerReferences", []) if r.get("controller")), None)
            if ref is None:
                break
            if ref["uid"] == workload["metadata"]["uid"]:
                mine.append(pod)
                break
            if ref["uid"] not in owners:
                owners[ref["uid"]] = _get(dyn, ref["apiVersion"], ref["kind"], ref["name"], namespace, timeout)
            obj = owners[ref["uid"]]
            if obj is None:
                break
    return sorted(mine, key=lambda p: (int(_index(p) or -1), p["metadata"].get("creationTimestamp", "")))


def _get(dyn, api_version: str, kind: str, name: str, namespace: str, timeout: float) -> dict | None:
    from kubernetes.dynamic.exceptions import NotFoundError

    try:
        return dyn.get(resource_for(dyn, api_version, kind), name=name, namespace=namespace,
                       _request_timeout=timeout).to_dict()
    except NotFoundError:
        return None


def _index(pod: dict) -> str | None:
    meta = pod["metadata"]
    return meta.get("labels", {}).get(INDEX) or meta.get("annotations", {}).get(INDEX)


def _report(dyn, namespace: str, workload: dict, timeout: float, out) -> str:
    lines = describe(workload)
    for pod in pods_of(dyn, namespace, workload, timeout):
        lines.append(f"  pod {pod['metadata']['name']} index {_index(pod) or '?'}: "
                     f"{pod.get('status', {}).get('phase')}")
    print("\n".join(lines), file=out, flush=True)
    return state_of(workload)


def follow(dyn, namespace: str, kind: str, name: str, watch: bool, timeout: float, out=None) -> int:
    """Print the workload's state and pods; with `watch`, again at each change until it completes or fails.
    0 unless it failed."""
    from kubernetes import watch as k8s_watch
    from kubernetes.dynamic.exceptions import NotFoundError

    resource = resource_named(dyn, kind)
    try:
        workload = dyn.get(resource, name=name, namespace=namespace, _request_timeout=timeout).to_dict()
    except NotFoundError:
        raise ClusterError(f"no {resource.kind} {name!r} in namespace {namespace!r}") from None
    state = _report(dyn, namespace, workload, timeout, out)
    if watch and state not in ("Complete", "Failed"):
        watcher = k8s_watch.Watch()
        version = workload["metadata"].get("resourceVersion")
        for event in dyn.watch(resource, namespace=namespace, name=name, resource_version=version,
                               watcher=watcher):
            if event["type"] == "DELETED":
                raise ClusterError(f"{resource.kind} {name!r} was deleted while being watched")
            state = _report(dyn, namespace, event["raw_object"], timeout, out)
            if state in ("Complete", "Failed"):
                watcher.stop()
                break
    return 1 if state == "Failed" else 0


def stream_logs(dyn, namespace: str, kind: str, name: str, index: int, follow_log: bool, tail: int | None,
                timeout: float, out=None) -> int:
    """The log of node `index` (the newest pod of that completion index); with `follow_log`, streamed until the
    container exits."""
    from kubernetes import client
    from kubernetes import watch as k8s_watch
    from kubernetes.dynamic.exceptions import NotFoundError

    resource = resource_named(dyn, kind)
    try:
        workload = dyn.get(resource, name=name, namespace=namespace, _request_timeout=timeout).to_dict()
    except NotFoundError:
        raise ClusterError(f"no {resource.kind} {name!r} in namespace {namespace!r}") from None
    pods = [p for p in pods_of(dyn, namespace, workload, timeout) if _index(p) == str(index)]
    if not pods:
        raise ClusterError(f"no pod of {resource.kind} {name} with completion index {index} in namespace "
                           f"{namespace}")
    pod = max(pods, key=lambda p: p["metadata"].get("creationTimestamp", ""))["metadata"]["name"]
    core = client.CoreV1Api(dyn.client)
    out = out or sys.stdout
    options = {"tail_lines": tail} if tail else {}
    if follow_log:
        for line in k8s_watch.Watch().stream(core.read_namespaced_pod_log, name=pod, namespace=namespace,
                                             **options):
            out.write(line + "\n")
            out.flush()
    else:
        out.write(core.read_namespaced_pod_log(pod, namespace, _request_timeout=timeout, **options))
    return 0
