"""Talk to a cluster with the `kubernetes` client: server-side apply, status, logs, delete.

Apply goes through one PATCH per object with `application/apply-patch+yaml` (server-side apply, field manager
`crescent`), so what reaches the API server is exactly the rendered object (`apply_requests` is that plan; a
test compares it with the render and replays it against a recording HTTP server). Errors from configuration or
the network become one sentence (`describe_error`), never a traceback.
"""
from __future__ import annotations

import json
import os
import secrets
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from app.k8s import kustomize
from app.k8s.render import CONFIG_MAP, TRAIN_JOB, RenderParams, render

FIELD_MANAGER = "crescent"
POSTGRES_SECRET = "mlflow-postgres"
PLURALS = {"Namespace": "namespaces", "ServiceAccount": "serviceaccounts", "Secret": "secrets",
           "ConfigMap": "configmaps", "PersistentVolumeClaim": "persistentvolumeclaims", "Service": "services",
           "Role": "roles", "RoleBinding": "rolebindings", "NetworkPolicy": "networkpolicies",
           "StatefulSet": "statefulsets", "Deployment": "deployments", "Job": "jobs", "CronJob": "cronjobs",
           "TrainingRuntime": "trainingruntimes", "TrainJob": "trainjobs"}
KEEP_ON_DELETE = {"Namespace", "PersistentVolumeClaim"}


class ClusterError(RuntimeError):
    """A cluster problem already phrased for the user."""


@dataclass(frozen=True)
class ApplyRequest:
    method: str
    path: str
    body: dict


def object_path(obj: dict) -> str:
    api_version, kind = obj["apiVersion"], obj["kind"]
    if kind not in PLURALS:
        raise ClusterError(f"cannot apply kind {kind!r}: known kinds are {sorted(PLURALS)}")
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    name = obj["metadata"]["name"]
    if kind in kustomize.CLUSTER_SCOPED:
        return f"{prefix}/{PLURALS[kind]}/{name}"
    namespace = obj["metadata"].get("namespace", "default")
    return f"{prefix}/namespaces/{namespace}/{PLURALS[kind]}/{name}"


def apply_requests(objects: list[dict]) -> list[ApplyRequest]:
    """The server-side apply plan: one PATCH per rendered object, body = the object itself."""
    return [ApplyRequest("PATCH", object_path(obj), obj) for obj in objects]


def select(objects: list[dict], only: str | None) -> list[dict]:
    """Objects of one component (train, data, eval, mlflow) plus what they need; all when `only` is None."""
    if not only:
        return objects
    wanted = {"mlflow": {"mlflow", "postgres"}}.get(only, {only})
    return [o for o in objects if o["metadata"].get("labels", {}).get("app.kubernetes.io/component") in wanted]


def load_client(kubeconfig: str | None, context: str | None, timeout: float):
    """An ApiClient from a kubeconfig (argument, $KUBECONFIG, ~/.kube/config) or the in-cluster account."""
    from kubernetes import client, config

    cfg = client.Configuration()
    default = Path(os.path.expanduser("~/.kube/config"))
    try:
        if kubeconfig or os.environ.get("KUBECONFIG") or default.is_file():
            if kubeconfig and not Path(kubeconfig).is_file():
                raise ClusterError(f"kubeconfig {kubeconfig} does not exist")
            config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=cfg)
        else:
            config.load_incluster_config(client_configuration=cfg)
    except config.ConfigException as err:
        raise ClusterError("no Kubernetes cluster configured: no kubeconfig (--kubeconfig, $KUBECONFIG, "
                           f"~/.kube/config) and not running inside a cluster ({err})") from None
    cfg.retries = 1
    api = client.ApiClient(cfg)
    api.crescent_timeout = timeout
    return api


def describe_error(err: BaseException) -> str | None:
    """One sentence for the errors a cluster can give, or None for anything else (a bug: keep the traceback)."""
    import urllib3
    from kubernetes.client.exceptions import ApiException
    from kubernetes.config import ConfigException

    if isinstance(err, ClusterError):
        return str(err)
    if isinstance(err, ConfigException):
        return f"no Kubernetes cluster configured: {err}"
    if isinstance(err, urllib3.exceptions.HTTPError | ConnectionError | TimeoutError | socket.gaierror):
        reason = getattr(err, "reason", None) or err
        host = getattr(getattr(err, "pool", None), "host", None)
        port = getattr(getattr(err, "pool", None), "port", None)
        where = f" at {host}:{port}" if host else ""
        return f"cannot reach the Kubernetes API server{where}: {_short(reason)}"
    if isinstance(err, ApiException):
        return f"the API server answered {err.status} {err.reason}: {_api_message(err)}"
    return None


def _short(reason) -> str:
    text = str(reason)
    for marker in ("Connection refused", "timed out", "Name or service not known", "No route to host"):
        if marker in text:
            return marker.lower()
    return text.split(": ", 1)[-1][:200]


def _api_message(err) -> str:
    try:
        return json.loads(err.body).get("message", err.body)
    except (TypeError, ValueError):
        return str(err.body)[:300]


def _call(api, method: str, path: str, body=None, query=None, content_type="application/json", stream=False):
    """One request through the kubernetes client (its auth, TLS and proxy settings); JSON back, or the raw
    response when streaming. Non-2xx answers raise ApiException."""
    from kubernetes.client.exceptions import ApiException

    method, url, headers, body, _ = api.param_serialize(
        method, path, query_params=query or [], header_params={"Content-Type": content_type,
                                                                "Accept": "application/json, */*"},
        body=body, auth_settings=["BearerToken"])
    response = api.call_api(method, url, header_params=headers, body=body,
                            _request_timeout=None if stream else api.crescent_timeout)
    if not 200 <= response.status < 300:
        response.read()
        raise ApiException(http_resp=response)
    if stream:
        return response.response
    data = response.read()
    return json.loads(data) if data else {}


def apply(api, objects: list[dict], out=None) -> None:
    from kubernetes.client.exceptions import ApiException

    for request in apply_requests(objects):
        obj = request.body
        what = f"{obj['kind']}/{obj['metadata']['name']}"
        try:
            _call(api, request.method, request.path, body=obj, content_type="application/apply-patch+yaml",
                  query=[("fieldManager", FIELD_MANAGER), ("force", "true")])
        except ApiException as err:
            if err.status == 422 and obj["kind"] == "Job" and "immutable" in str(err.body):
                raise ClusterError(f"{what} already exists with a different spec (a Job's template cannot "
                                   "change): run `crescent k8s delete` first") from None
            if err.status == 403:
                raise ClusterError(f"not allowed to apply {what}: {_api_message(err)} (the Role "
                                   "crescent-submitter grants what submit needs; namespaces and RBAC need an "
                                   "admin, or use --only train)") from None
            raise ClusterError(f"applying {what} failed: {err.status} {err.reason}: {_api_message(err)}") from None
        print(f"applied {what}", file=out)


def ensure_postgres_secret(api, namespace: str, out=None) -> None:
    """The database password lives only in the cluster: create it once, random, if it is missing. Create-only
    (409 = it exists), so the submitter never needs permission to read Secrets."""
    from kubernetes.client.exceptions import ApiException

    body = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": POSTGRES_SECRET, "namespace": namespace,
                         "labels": {"app.kubernetes.io/part-of": "crescent",
                                    "app.kubernetes.io/component": "postgres"}},
            "stringData": {"password": secrets.token_urlsafe(24)}}
    try:
        _call(api, "POST", f"/api/v1/namespaces/{namespace}/secrets", body=body)
    except ApiException as err:
        if err.status == 409:
            return
        raise
    print(f"created Secret/{POSTGRES_SECRET} with a random password", file=out)


def _uses_postgres_secret(objects: list[dict]) -> bool:
    return POSTGRES_SECRET in str(objects)


def job_status(api, namespace: str, job: str) -> tuple[str, list[str]]:
    """('Complete' | 'Failed' | 'Running', lines describing the Job and its pods)."""
    data = _call(api, "GET", f"/apis/batch/v1/namespaces/{namespace}/jobs/{job}")
    spec, status = data.get("spec", {}), data.get("status", {})
    state = "Running"
    for cond in status.get("conditions", []) or []:
        if cond.get("status") == "True" and cond.get("type") in ("Complete", "Failed"):
            state = cond["type"]
    lines = [f"Job {job}: {state}; completions {status.get('succeeded', 0)}/{spec.get('completions')}, "
             f"active {status.get('active', 0)}, failed {status.get('failed', 0)}"]
    for cond in status.get("conditions", []) or []:
        lines.append(f"  condition {cond.get('type')}={cond.get('status')} {cond.get('reason', '')} "
                     f"{cond.get('message', '')}".rstrip())
    pods = _call(api, "GET", f"/api/v1/namespaces/{namespace}/pods",
                 query=[("labelSelector", f"batch.kubernetes.io/job-name={job}")])
    for pod in pods.get("items", []):
        meta = pod["metadata"]
        index = meta.get("annotations", {}).get("batch.kubernetes.io/job-completion-index", "?")
        lines.append(f"  pod {meta['name']} index {index}: {pod.get('status', {}).get('phase')}")
    return state, lines


def follow_status(api, namespace: str, job: str, watch: bool, out=None, interval: float = 10.0) -> int:
    while True:
        state, lines = job_status(api, namespace, job)
        print("\n".join(lines), file=out, flush=True)
        if not watch or state != "Running":
            return 1 if state == "Failed" else 0
        time.sleep(interval)


def stream_logs(api, namespace: str, job: str, index: int, follow: bool, tail: int | None, out=None) -> int:
    pods = _call(api, "GET", f"/api/v1/namespaces/{namespace}/pods", query=[
        ("labelSelector", f"batch.kubernetes.io/job-name={job},batch.kubernetes.io/job-completion-index={index}")])
    items = sorted(pods.get("items", []), key=lambda p: p["metadata"].get("creationTimestamp", ""))
    if not items:
        raise ClusterError(f"no pod of Job {job} with completion index {index} in namespace {namespace}")
    name = items[-1]["metadata"]["name"]
    query = [("follow", "true" if follow else "false")] + ([("tailLines", str(tail))] if tail else [])
    response = _call(api, "GET", f"/api/v1/namespaces/{namespace}/pods/{name}/log", query=query, stream=True)
    out = out or sys.stdout
    for chunk in response.stream(4096):
        out.write(chunk.decode("utf-8", "replace"))
        out.flush()
    return 0


def delete(api, objects: list[dict], everything: bool, namespace: str, out=None) -> None:
    from kubernetes.client.exceptions import ApiException

    if everything:
        targets = [o for o in objects if o["kind"] not in KEEP_ON_DELETE]
    else:
        targets = [{"apiVersion": api_version, "kind": kind, "metadata": {"name": name, "namespace": namespace}}
                   for api_version, kind, name in (("v1", "ConfigMap", CONFIG_MAP), ("batch/v1", "Job", TRAIN_JOB))]
    for obj in reversed(targets):
        what = f"{obj['kind']}/{obj['metadata']['name']}"
        try:
            _call(api, "DELETE", object_path(obj), body={"propagationPolicy": "Background"})
            print(f"deleted {what}", file=out)
        except ApiException as err:
            if err.status != 404:
                raise
            print(f"{what} not found", file=out)


def run(args, params: RenderParams | None) -> int:
    """The cluster side of `crescent k8s` (argparse namespace from app.commands.k8s)."""
    objects = render(params) if params is not None else []
    if args.action == "submit":
        objects = select(objects, getattr(args, "only", None))
    api = load_client(args.kubeconfig, args.context, args.request_timeout)
    if args.action == "submit":
        namespaces = [o for o in objects if o["kind"] == "Namespace"]
        apply(api, namespaces)  # the Secret below lives in it
        if _uses_postgres_secret(objects):
            ensure_postgres_secret(api, args.namespace)
        apply(api, [o for o in objects if o["kind"] != "Namespace"])
        return follow_status(api, args.namespace, TRAIN_JOB, watch=True) if args.wait else 0
    if args.action == "status":
        return follow_status(api, args.namespace, args.job, args.watch)
    if args.action == "logs":
        return stream_logs(api, args.namespace, args.job, args.index, args.follow, args.tail)
    if args.action == "delete":
        delete(api, objects, args.all, args.namespace)
        return 0
    raise ValueError(f"unknown action {args.action!r}")
