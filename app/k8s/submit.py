"""Talk to a cluster with the `kubernetes` client's DynamicClient: server-side apply, status, logs, delete.

Every object goes through the dynamic client: discovery (/api, /apis, /apis/GROUP/VERSION) says where a kind
lives and whether it is namespaced, so any kind the API server serves applies (Job, JobSet, TrainJob, a Kueue
LocalQueue, ...) and a kind it does not serve is refused by name before anything is applied. Apply is
server-side apply (`application/apply-patch+yaml`, field manager `crescent`, forced: this tool owns the fields it
renders). Errors from configuration or the network become one sentence (`describe_error`), never a traceback.
"""
from __future__ import annotations

import json
import os
import secrets
import socket
from pathlib import Path

from app.k8s.render import CONFIG_MAP, TRAIN_JOB

FIELD_MANAGER = "crescent"
POSTGRES_SECRET = "mlflow-postgres"
KEEP_ON_DELETE = {"Namespace", "PersistentVolumeClaim"}


class ClusterError(RuntimeError):
    """A cluster problem already phrased for the user."""


def select(objects: list[dict], only: str | None) -> list[dict]:
    """Objects of one component (train, data, eval, mlflow) plus what they need; all when `only` is None."""
    if not only:
        return objects
    wanted = {"mlflow": {"mlflow", "postgres"}}.get(only, {only})
    return [o for o in objects if o["metadata"].get("labels", {}).get("app.kubernetes.io/component") in wanted]


def load_client(kubeconfig: str | None, context: str | None):
    """An ApiClient from a kubeconfig (argument, $KUBECONFIG, ~/.kube/config) or the in-cluster account.
    Nothing is sent yet."""
    try:
        from kubernetes import client, config
    except ImportError:
        raise ClusterError("talking to a cluster needs the kubernetes client: pip install 'crescent[k8s]'") from None

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
    return client.ApiClient(cfg)


def dynamic_client(api):
    """The DynamicClient over `api` (its first call reads the server's discovery documents)."""
    from kubernetes.dynamic import DynamicClient

    return DynamicClient(api)


def resource_for(dyn, api_version: str, kind: str):
    """The API resource serving `kind` in `api_version`, found through discovery; a clear error if none."""
    from kubernetes.dynamic.exceptions import ResourceNotFoundError
    from kubernetes.dynamic.resource import ResourceList

    try:
        return dyn.resources.get(api_version=api_version, kind=kind)
    except ResourceNotFoundError:
        group, _, version = api_version.rpartition("/")
        served = sorted({r.kind for r in dyn.resources.search(prefix="apis" if group else "api", group=group,
                                                               api_version=version)
                         if not isinstance(r, ResourceList)})
        where = (f"{api_version} serves {served}" if served else
                 f"it serves no API {api_version!r} (is the CRD that defines {kind} installed?)")
        raise ClusterError(f"kind {kind!r} ({api_version}) is not served by this API server: {where}") from None


def resource_named(dyn, kind: str):
    """The preferred API resource for a kind given by name (`JobSet`), or `Kind.group` when two groups serve it."""
    from kubernetes.dynamic.resource import ResourceList

    name, _, group = kind.partition(".")
    found = [r for r in dyn.resources.search(kind=name, group=group or None) if not isinstance(r, ResourceList)]
    preferred = [r for r in found if r.preferred] or found
    if not preferred:
        raise ClusterError(f"kind {kind!r} is not served by this API server (is the CRD that defines it "
                           "installed? kinds are case-sensitive: Job, JobSet, TrainJob)")
    groups = sorted({r.group_version for r in preferred})
    if len(groups) > 1:
        raise ClusterError(f"kind {kind!r} is served by {groups}: name one as {name}.GROUP")
    return preferred[0]


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
        return f"the API server answered {err.status} {err.reason}: {api_message(err)}"
    return None


def _short(reason) -> str:
    text = str(reason)
    for marker in ("Connection refused", "timed out", "Name or service not known", "No route to host"):
        if marker in text:
            return marker.lower()
    return text.split(": ", 1)[-1][:200]


def api_message(err) -> str:
    try:
        return json.loads(err.body).get("message", err.body)
    except (TypeError, ValueError):
        return str(err.body)[:300]


def apply(dyn, objects: list[dict], timeout: float, out=None) -> None:
    """Server-side apply each object. Every kind is looked up first, so an unserved kind applies nothing."""
    from kubernetes.client.exceptions import ApiException

    resources = [resource_for(dyn, obj["apiVersion"], obj["kind"]) for obj in objects]
    for obj, resource in zip(objects, resources):
        what = f"{obj['kind']}/{obj['metadata']['name']}"
        try:
            dyn.server_side_apply(resource, body=obj, field_manager=FIELD_MANAGER, force_conflicts=True,
                                  _request_timeout=timeout)
        except ApiException as err:
            if err.status == 422 and obj["kind"] in ("Job", "JobSet") and "immutable" in str(err.body):
                raise ClusterError(f"{what} already exists with a different spec (its template cannot "
                                   "change): run `crescent k8s delete` first") from None
            if err.status == 403:
                raise ClusterError(f"not allowed to apply {what}: {api_message(err)} (the Role "
                                   "crescent-submitter grants what submit needs; namespaces and RBAC need an "
                                   "admin, or use --only train)") from None
            raise ClusterError(f"applying {what} failed: {err.status} {err.reason}: {api_message(err)}") from None
        print(f"applied {what}", file=out)


def ensure_postgres_secret(dyn, namespace: str, timeout: float, out=None) -> None:
    """The database password lives only in the cluster: create it once, random, if it is missing. Create-only
    (409 = it exists), so the submitter never needs permission to read Secrets."""
    from kubernetes.dynamic.exceptions import ConflictError

    body = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": POSTGRES_SECRET, "namespace": namespace,
                         "labels": {"app.kubernetes.io/part-of": "crescent",
                                    "app.kubernetes.io/component": "postgres"}},
            "stringData": {"password": secrets.token_urlsafe(24)}}
    try:
        dyn.create(resource_for(dyn, "v1", "Secret"), body=body, namespace=namespace, _request_timeout=timeout)
    except ConflictError:
        return
    print(f"created Secret/{POSTGRES_SECRET} with a random password", file=out)


def delete(dyn, objects: list[dict], everything: bool, namespace: str, kind: str, timeout: float,
           out=None) -> None:
    """Delete the training workload (of `kind`) and its ConfigMap, or with `everything` all rendered objects
    but volumes and the namespace; the workload's Jobs and pods go with it (background propagation)."""
    from kubernetes.dynamic.exceptions import NotFoundError

    if everything:
        targets = [(resource_for(dyn, o["apiVersion"], o["kind"]), o["metadata"]["name"])
                   for o in objects if o["kind"] not in KEEP_ON_DELETE]
    else:
        targets = [(resource_for(dyn, "v1", "ConfigMap"), CONFIG_MAP), (resource_named(dyn, kind), TRAIN_JOB)]
    for resource, name in reversed(targets):
        what = f"{resource.kind}/{name}"
        try:
            dyn.delete(resource, name=name, namespace=namespace if resource.namespaced else None,
                       body={"propagationPolicy": "Background"}, _request_timeout=timeout)
            print(f"deleted {what}", file=out)
        except NotFoundError:
            print(f"{what} not found", file=out)
