"""A test double for a Kubernetes API server, over real HTTP on loopback.

No API server can run here (kube-apiserver needs etcd and binaries this machine cannot fetch), so this stands in
for one; it is a double, not a cluster: no controllers, no admission, no field ownership, no merging. It speaks
what the kubernetes client's DynamicClient and the pod-log call use, as the API server does:

- /version and discovery: /api, /apis and the resource lists /api/v1, /apis/GROUP/VERSION (built-in groups as
  listed below; jobset.x-k8s.io, trainer.kubeflow.org and kueue.x-k8s.io read from the CRDs in tests/data/crds/);
- server-side apply: PATCH with `application/apply-patch+yaml` and a fieldManager (415 / 400 otherwise), which
  stores the object; POST (409 when it exists), GET of an object or a collection (label and field selectors),
  DELETE (404 when missing);
- watch streams (`?watch=true`): the events queued with `queue_events`, then a 410 Expired error event;
- pod logs (`pods/NAME/log`, `tailLines`, `follow`).

Every request is recorded (method, path, query, content type, Authorization, body) for the tests to assert on.
"""
from __future__ import annotations

import itertools
import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from k8s_schemas import crds

BUILTIN = {  # groupVersion -> (plural, kind, namespaced)
    "v1": [("namespaces", "Namespace", False), ("serviceaccounts", "ServiceAccount", True),
           ("secrets", "Secret", True), ("configmaps", "ConfigMap", True), ("services", "Service", True),
           ("persistentvolumeclaims", "PersistentVolumeClaim", True), ("pods", "Pod", True),
           ("pods/log", "Pod", True)],
    "apps/v1": [("deployments", "Deployment", True), ("statefulsets", "StatefulSet", True)],
    "batch/v1": [("jobs", "Job", True), ("jobs/status", "Job", True), ("cronjobs", "CronJob", True)],
    "rbac.authorization.k8s.io/v1": [("roles", "Role", True), ("rolebindings", "RoleBinding", True),
                                     ("clusterroles", "ClusterRole", False)],
    "networking.k8s.io/v1": [("networkpolicies", "NetworkPolicy", True)],
}
VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]


def served_resources() -> dict[str, list[tuple[str, str, bool]]]:
    """groupVersion -> resources: the built-in table plus every served version of the stored CRDs."""
    served = {gv: list(rows) for gv, rows in BUILTIN.items()}
    for crd in crds():
        spec = crd["spec"]
        for version in spec["versions"]:
            if version.get("served"):
                rows = served.setdefault(f"{spec['group']}/{version['name']}", [])
                rows.append((spec["names"]["plural"], spec["names"]["kind"], spec["scope"] == "Namespaced"))
                if "status" in version.get("subresources", {}):
                    rows.append((spec["names"]["plural"] + "/status", spec["names"]["kind"], True))
    return served


def plural_of(api_version: str, kind: str) -> str:
    """The resource name discovery gives `kind` (the double's own table, for tests to build expected paths)."""
    return next(p for p, k, _ in served_resources()[api_version] if k == kind and "/" not in p)


def object_path(obj: dict) -> str:
    """Where the API server keeps `obj` (for tests' expectations; the submitter learns it from discovery)."""
    api_version, kind, name = obj["apiVersion"], obj["kind"], obj["metadata"]["name"]
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    namespaced = next(n for p, k, n in served_resources()[api_version] if k == kind and "/" not in p)
    where = f"/namespaces/{obj['metadata'].get('namespace', 'default')}" if namespaced else ""
    return f"{prefix}{where}/{plural_of(api_version, kind)}/{name}"


class ApiServerDouble(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.served = served_resources()
        self.requests: list[dict] = []
        self.objects: dict[tuple[str, str, str, str], dict] = {}  # (group, plural, namespace, name) -> object
        self.pod_logs: dict[str, str] = {}
        self.events: dict[tuple[str, str], list[tuple[str, dict]]] = {}  # (plural, name) -> watch events
        self._versions = itertools.count(1)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def close(self) -> None:
        self.shutdown()
        self.server_close()

    def store(self, obj: dict) -> dict:
        """Put an object in the store as a controller would have created it (uid, resourceVersion)."""
        api_version = obj["apiVersion"]
        group = api_version.rsplit("/", 1)[0] if "/" in api_version else ""
        meta = obj["metadata"]
        meta.setdefault("uid", str(uuid.uuid4()))
        meta["resourceVersion"] = str(next(self._versions))
        self.objects[(group, plural_of(api_version, obj["kind"]), meta.get("namespace", ""), meta["name"])] = obj
        return obj

    def queue_events(self, plural: str, name: str, *events: tuple[str, dict]) -> None:
        """Watch events (type, object) the next watch of `plural`/`name` receives, in order."""
        self.events.setdefault((plural, name), []).extend(events)

    def stored(self, kind: str, name: str) -> dict | None:
        return next((o for (_, _, _, n), o in self.objects.items() if o["kind"] == kind and n == name), None)


def _status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, "reason": reason,
            "message": message}


def _selects(obj: dict, query: dict) -> bool:
    labels = obj["metadata"].get("labels", {})
    for term in filter(None, query.get("labelSelector", [""])[0].split(",")):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    for term in filter(None, query.get("fieldSelector", [""])[0].split(",")):
        key, _, value = term.partition("=")
        if key != "metadata.name" or obj["metadata"]["name"] != value:
            return False
    return True


class _Handler(BaseHTTPRequestHandler):
    server: ApiServerDouble

    def log_message(self, *args):
        pass

    def _reply(self, status: int, body) -> None:
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain" if isinstance(body, str) else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _stream(self, lines: list[str], content_type: str) -> None:
        """A streaming answer (watch, follow): no length, each line flushed, the end is the connection's end."""
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.end_headers()
        for line in lines:
            self.wfile.write(line.encode() + b"\n")
            self.wfile.flush()

    def _route(self) -> tuple[dict, str, list[str]]:
        """(request record, groupVersion, the path after the groupVersion)."""
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        url = urlsplit(self.path)
        entry = {"method": self.command, "path": url.path, "query": parse_qs(url.query),
                 "content_type": self.headers.get("Content-Type"), "auth": self.headers.get("Authorization"),
                 "body": json.loads(raw) if raw else None}
        self.server.requests.append(entry)
        parts = url.path.strip("/").split("/")
        if parts[:2] == ["api", "v1"]:
            group_version, rest = "v1", parts[2:]
        elif parts[0] == "apis" and len(parts) >= 3:
            group_version, rest = f"{parts[1]}/{parts[2]}", parts[3:]
        else:
            return entry, "", parts
        return entry, group_version, rest

    def _target(self, group_version: str, rest: list[str]):
        """(row, namespace, name, subresource) for an object or collection path, or None."""
        namespace = ""
        if len(rest) >= 3 and rest[0] == "namespaces":
            namespace, rest = rest[1], rest[2:]
        plural, name, sub = (rest + [None, None])[:3]
        row = next((r for r in self.server.served.get(group_version, []) if r[0] == plural), None)
        if row is None or bool(namespace) != row[2] and name is not None:
            return None
        return row, namespace, name, sub

    def _key(self, group_version: str, row, namespace: str, name: str):
        group = group_version.rsplit("/", 1)[0] if "/" in group_version else ""
        return (group, row[0], namespace, name)

    def do_GET(self):
        entry, group_version, rest = self._route()
        path = entry["path"]
        if path == "/version":
            return self._reply(200, {"major": "1", "minor": "34", "gitVersion": "v1.34.0"})
        if path == "/api":
            return self._reply(200, {"kind": "APIVersions", "versions": ["v1"]})
        if path == "/apis":
            return self._reply(200, self._group_list())
        if group_version in self.server.served and not rest:
            return self._reply(200, self._resource_list(group_version))
        target = self._target(group_version, rest) if group_version else None
        if target is None:
            return self._reply(404, _status(404, "NotFound", f"the server could not find {path}"))
        row, namespace, name, sub = target
        if sub == "log":
            return self._log(namespace, name, entry["query"])
        if name is None:
            return self._list(group_version, row, namespace, entry["query"])
        obj = self.server.objects.get(self._key(group_version, row, namespace, name))
        if obj is None:
            return self._reply(404, _status(404, "NotFound", f'{row[0]} "{name}" not found'))
        self._reply(200, obj)

    def _group_list(self) -> dict:
        groups: dict[str, list[str]] = {}
        for group_version in self.server.served:
            if "/" in group_version:
                group, version = group_version.rsplit("/", 1)
                groups.setdefault(group, []).append(version)
        out = []
        for group, versions in groups.items():
            entries = [{"groupVersion": f"{group}/{v}", "version": v} for v in sorted(versions, reverse=True)]
            out.append({"name": group, "versions": entries, "preferredVersion": entries[0]})
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": out}

    def _resource_list(self, group_version: str) -> dict:
        resources = [{"name": plural, "singularName": "" if "/" in plural else kind.lower(), "namespaced": ns,
                      "kind": kind, "verbs": ["get", "patch", "update"] if "/" in plural else VERBS}
                     for plural, kind, ns in self.server.served[group_version]]
        return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version,
                "resources": resources}

    def _list(self, group_version: str, row, namespace: str, query: dict) -> None:
        group = group_version.rsplit("/", 1)[0] if "/" in group_version else ""
        items = [o for (g, p, ns, _), o in self.server.objects.items()
                 if g == group and p == row[0] and (not namespace or ns == namespace) and _selects(o, query)]
        if query.get("watch") == ["True"] or query.get("watch") == ["true"]:
            name = query.get("fieldSelector", ["metadata.name="])[0].split("=", 1)[1]
            events = self.server.events.pop((row[0], name), [])
            lines = [json.dumps({"type": kind, "object": obj}) for kind, obj in events]
            lines.append(json.dumps({"type": "ERROR", "object": _status(410, "Expired", "too old resource version")}))
            return self._stream(lines, "application/json")
        self._reply(200, {"kind": f"{row[1]}List", "apiVersion": group_version, "metadata": {"resourceVersion": "1"},
                          "items": items})

    def _log(self, namespace: str, name: str, query: dict) -> None:
        if name not in self.server.pod_logs:
            return self._reply(404, _status(404, "NotFound", f'pods "{name}" not found'))
        lines = self.server.pod_logs[name].splitlines()
        if "tailLines" in query:
            lines = lines[-int(query["tailLines"][0]):]
        if query.get("follow") in (["True"], ["true"]):
            return self._stream(lines, "text/plain")
        self._reply(200, "".join(line + "\n" for line in lines))

    def _write_target(self, collection: bool):
        """(request, groupVersion, row, namespace, name) of a write to an object (or to a collection, for
        POST); None after answering 404."""
        entry, group_version, rest = self._route()
        target = self._target(group_version, rest) if group_version else None
        if target is None or (target[2] is None) != collection:
            self._reply(404, _status(404, "NotFound", f"the server could not find {entry['path']}"))
            return None
        row, namespace, name, _ = target
        return entry, group_version, row, namespace, name

    def do_PATCH(self):
        if (target := self._write_target(collection=False)) is None:
            return
        entry, group_version, row, namespace, name = target
        if entry["content_type"] != "application/apply-patch+yaml":
            return self._reply(415, _status(415, "UnsupportedMediaType", f"{entry['content_type']} is not "
                                            "served here: only server-side apply"))
        if not entry["query"].get("fieldManager"):
            return self._reply(400, _status(400, "BadRequest", "PATCH, fieldManager is required for apply"))
        body = entry["body"]
        if body.get("apiVersion") != group_version or body.get("kind") != row[1] \
                or body.get("metadata", {}).get("name") != name:
            return self._reply(400, _status(400, "BadRequest", "the body's apiVersion, kind or name does not "
                                            f"match {entry['path']}"))
        key = self._key(group_version, row, namespace, name)
        live = dict(body, metadata=dict(body["metadata"]))
        old = self.server.objects.get(key)
        if old is not None:
            live["metadata"]["uid"] = old["metadata"]["uid"]
            if "status" in old:
                live["status"] = old["status"]
        self._reply(200, self.server.store(live))

    def do_POST(self):
        if (target := self._write_target(collection=True)) is None:
            return
        entry, group_version, row, namespace, _ = target
        name = entry["body"]["metadata"]["name"]
        key = self._key(group_version, row, namespace, name)
        if key in self.server.objects:
            return self._reply(409, _status(409, "AlreadyExists", f'{row[0]} "{name}" already exists'))
        self._reply(201, self.server.store(dict(entry["body"])))

    def do_DELETE(self):
        if (target := self._write_target(collection=False)) is None:
            return
        entry, group_version, row, namespace, name = target
        if self.server.objects.pop(self._key(group_version, row, namespace, name), None) is None:
            return self._reply(404, _status(404, "NotFound", f'{row[0]} "{name}" not found'))
        self._reply(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})
