"""Our own checks on rendered objects: what schema validation (kubernetes-validate) does not catch.

Enums the schemas leave as free strings, quantities, the pod security settings every pod must carry, pinned
images, secrets that never appear as literals, and the consistency of the distributed training Job (node count,
torchrun flags, the rendezvous address and its headless Service). `problems(objects)` returns one line per
violation; `crescent k8s render` refuses to print objects that have any.
"""
from __future__ import annotations

import re

from app.k8s.kustomize import pod_templates

ENUMS = {
    "imagePullPolicy": {"Always", "IfNotPresent", "Never"},
    "concurrencyPolicy": {"Allow", "Forbid", "Replace"},
    "completionMode": {"NonIndexed", "Indexed"},
    "protocol": {"TCP", "UDP", "SCTP"},
    "podFailurePolicyAction": {"FailJob", "FailIndex", "Ignore", "Count"},
    "accessModes": {"ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"},
    "emptyDirMedium": {"", "Memory"},
    "serviceType": {"ClusterIP", "NodePort", "LoadBalancer", "ExternalName"},
    "policyTypes": {"Ingress", "Egress"},
}
RESTART_POLICY = {"Job": {"Never", "OnFailure"}, "CronJob": {"Never", "OnFailure"},
                  "Deployment": {"Always"}, "StatefulSet": {"Always"}}
_QUANTITY = re.compile(r"^[+]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+|m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_SUFFIX = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
           "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|API_KEY|ACCESS_KEY|CREDENTIAL", re.I)
_URI_PASSWORD = re.compile(r"://[^/:@\s]+:([^@\s]+)@")


def quantity(text: str) -> float:
    """A Kubernetes resource quantity ('500m', '8Gi', '2') as a number; ValueError if malformed."""
    text = str(text)
    match = _QUANTITY.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a Kubernetes quantity (e.g. 500m, 2, 8Gi)")
    suffix = match.group(3) or ""
    if suffix[:1] in ("e", "E") and suffix not in _SUFFIX:
        return float(text)
    return float(text[: len(text) - len(suffix)]) * _SUFFIX[suffix]


def image_problem(ref: str) -> str | None:
    if "@sha256:" in ref:
        return None
    last = ref.rsplit("/", 1)[-1]
    if ":" not in last:
        return f"image {ref!r} has no tag"
    if last.rsplit(":", 1)[1] == "latest":
        return f"image {ref!r} uses the tag `latest`"
    return None


def problems(objects: list[dict]) -> list[str]:
    found: list[str] = []
    for obj in objects:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        found += [f"{where}: {p}" for p in _object_problems(obj, objects)]
    return found


def _object_problems(obj: dict, objects: list[dict]) -> list[str]:
    out: list[str] = []
    kind, spec = obj["kind"], obj.get("spec", {})
    if kind == "Secret" and (obj.get("data") or obj.get("stringData")):
        out.append("a Secret with literal data; reference an existing Secret instead")
    if kind == "CronJob" and spec.get("concurrencyPolicy") != "Forbid":
        out.append(f"concurrencyPolicy={spec.get('concurrencyPolicy')!r}: evaluation must not overlap (Forbid)")
    if kind == "CronJob":
        out += _enum("concurrencyPolicy", spec.get("concurrencyPolicy"))
    if kind == "Job":
        out += _enum("completionMode", spec.get("completionMode", "NonIndexed"))
        for rule in spec.get("podFailurePolicy", {}).get("rules", []):
            out += _enum("podFailurePolicyAction", rule.get("action"))
    if kind == "PersistentVolumeClaim":
        for mode in spec.get("accessModes", []):
            out += _enum("accessModes", mode)
        out += _quantities({"storage": spec.get("resources", {}).get("requests", {}).get("storage", "")})
    if kind == "Service":
        out += _enum("serviceType", spec.get("type", "ClusterIP"))
        for port in spec.get("ports", []):
            out += _enum("protocol", port.get("protocol", "TCP"))
    if kind == "NetworkPolicy":
        for policy_type in spec.get("policyTypes", []):
            out += _enum("policyTypes", policy_type)
    for template in pod_templates(obj):
        out += _pod_problems(kind, template["spec"], spec)
    if kind == "Job" and spec.get("completionMode") == "Indexed" and _is_torchrun(obj):
        out += _training_job_problems(obj, objects)
    if kind == "TrainJob":
        out += _trainjob_problems(obj)
    return out


def _trainjob_problems(trainjob: dict) -> list[str]:
    trainer = trainjob["spec"]["trainer"]
    args = trainer.get("args", [])
    out = []
    problem = image_problem(trainer.get("image", ""))
    if problem:
        out.append(problem)
    if "--trainer.num_nodes" in args and args[args.index("--trainer.num_nodes") + 1] != str(trainer["numNodes"]):
        out.append(f"--trainer.num_nodes disagrees with numNodes={trainer['numNodes']}")
    gpus = trainer.get("resourcesPerNode", {}).get("limits", {}).get("nvidia.com/gpu")
    if gpus is not None and "--trainer.devices" in args and args[args.index("--trainer.devices") + 1] != str(gpus):
        out.append(f"--trainer.devices disagrees with {gpus} GPUs per node")
    return out


def _enum(name: str, value) -> list[str]:
    return [] if value in ENUMS[name] else [f"{name}={value!r}: allowed {sorted(ENUMS[name])}"]


def _pod_problems(kind: str, pod: dict, owner_spec: dict) -> list[str]:
    out: list[str] = []
    restart = pod.get("restartPolicy", "Always")
    if restart not in RESTART_POLICY.get(kind, {"Always", "OnFailure", "Never"}):
        out.append(f"restartPolicy={restart!r}: allowed for a {kind} are {sorted(RESTART_POLICY[kind])}")
    if owner_spec.get("podFailurePolicy") and restart != "Never":
        out.append("podFailurePolicy needs restartPolicy Never")
    if pod.get("automountServiceAccountToken") is not False:
        out.append("automountServiceAccountToken must be false (workloads do not call the API server)")
    pod_sc = pod.get("securityContext", {})
    if pod_sc.get("runAsUser") == 0:
        out.append("runAsUser 0")
    for volume in pod.get("volumes", []):
        if "hostPath" in volume:
            out.append(f"volume {volume['name']!r} uses hostPath")
        if "emptyDir" in volume:
            out += _enum("emptyDirMedium", volume["emptyDir"].get("medium", ""))
    for c in pod.get("initContainers", []) + pod["containers"]:
        out += [f"container {c['name']!r}: {p}" for p in _container_problems(c, pod_sc, kind)]
    return out


def _container_problems(c: dict, pod_sc: dict, kind: str) -> list[str]:
    out: list[str] = []
    sc = c.get("securityContext", {})
    if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is not True:
        out.append("runAsNonRoot is not true")
    if sc.get("allowPrivilegeEscalation") is not False:
        out.append("allowPrivilegeEscalation is not false")
    if sc.get("privileged"):
        out.append("privileged")
    if "ALL" not in sc.get("capabilities", {}).get("drop", []) or sc.get("capabilities", {}).get("add"):
        out.append("capabilities must drop ALL and add none")
    seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {})).get("type")
    if seccomp != "RuntimeDefault":
        out.append(f"seccompProfile={seccomp!r}: RuntimeDefault required")
    problem = image_problem(c.get("image", ""))
    if problem:
        out.append(problem)
    out += _enum("imagePullPolicy", c.get("imagePullPolicy", "IfNotPresent"))
    for port in c.get("ports", []):
        out += _enum("protocol", port.get("protocol", "TCP"))
    resources = c.get("resources", {})
    requests, limits = resources.get("requests", {}), resources.get("limits", {})
    for section, values in (("requests", requests), ("limits", limits)):
        for resource in ("cpu", "memory"):
            if resource not in values:
                out.append(f"resources.{section}.{resource} missing")
    out += _quantities(requests) + _quantities(limits)
    for resource, value in requests.items():
        try:
            if resource in limits and quantity(value) > quantity(limits[resource]):
                out.append(f"{resource}: request {value} exceeds limit {limits[resource]}")
            if "/" in resource and str(limits.get(resource)) != str(value):
                out.append(f"{resource}: an extended resource needs request == limit")
        except ValueError:
            pass
    if kind in ("Deployment", "StatefulSet"):
        for probe in ("readinessProbe", "livenessProbe"):
            if probe not in c:
                out.append(f"{probe} missing")
    for env in c.get("env", []):
        value = env.get("value")
        if value is None:
            continue
        if _SECRET_NAME.search(env["name"]):
            out.append(f"env {env['name']} holds a literal value; use valueFrom.secretKeyRef")
        match = _URI_PASSWORD.search(str(value))
        if match and not re.fullmatch(r"\$\([A-Z_][A-Z0-9_]*\)", match.group(1)):
            out.append(f"env {env['name']} holds a URI with a literal password")
    return out


def _quantities(values: dict) -> list[str]:
    out = []
    for resource, value in values.items():
        try:
            quantity(value)
        except ValueError as err:
            out.append(f"{resource}: {err}")
    return out


def _is_torchrun(job: dict) -> bool:
    return any(c.get("command", [None])[0] == "torchrun" for c in job["spec"]["template"]["spec"]["containers"])


def _training_job_problems(job: dict, objects: list[dict]) -> list[str]:
    out: list[str] = []
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    name = job["metadata"]["name"]
    if spec.get("completions") != spec.get("parallelism"):
        out.append(f"completions={spec.get('completions')} != parallelism={spec.get('parallelism')}: "
                   "every node must run at once")
    c = next(c for c in pod["containers"] if c.get("command", [None])[0] == "torchrun")
    flags = dict(a.split("=", 1) for a in c.get("args", []) if a.startswith("--") and "=" in a)
    if flags.get("--nnodes") != str(spec.get("completions")):
        out.append(f"torchrun --nnodes={flags.get('--nnodes')} but completions={spec.get('completions')}")
    if flags.get("--node-rank") != "$(JOB_COMPLETION_INDEX)":
        out.append("torchrun --node-rank must be $(JOB_COMPLETION_INDEX)")
    subdomain = pod.get("subdomain")
    if flags.get("--master-addr") != f"{name}-0.{subdomain}":
        out.append(f"torchrun --master-addr={flags.get('--master-addr')}: expected {name}-0.{subdomain}")
    services = [o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == subdomain]
    if not services or services[0]["spec"].get("clusterIP") != "None":
        out.append(f"no headless Service named {subdomain!r} for the pods' DNS names")
    elif services[0]["spec"].get("selector", {}).get("batch.kubernetes.io/job-name") != name:
        out.append(f"Service {subdomain!r} does not select the pods of Job {name!r}")
    gpus = c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
    if gpus is not None and flags.get("--nproc-per-node") != str(gpus):
        out.append(f"--nproc-per-node={flags.get('--nproc-per-node')} but {gpus} GPUs per pod")
    shm = [v for v in pod.get("volumes", []) if v.get("emptyDir", {}).get("medium") == "Memory"]
    mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
    if not shm or mounts.get("/dev/shm") not in {v["name"] for v in shm}:
        out.append("/dev/shm is not a memory emptyDir")
    grace = int(pod.get("terminationGracePeriodSeconds", 30))
    if grace < 60:
        out.append("terminationGracePeriodSeconds < 60: too short for the SIGTERM checkpoint")
    shutdown = int(flags.get("--shutdown-timeout", 30))
    if not 30 <= shutdown < grace:
        out.append(f"torchrun --shutdown-timeout={shutdown} must be >= 30 and under "
                   f"terminationGracePeriodSeconds={grace} (the trainers' SIGTERM checkpoint window)")
    if pod.get("restartPolicy") != "Never" or not spec.get("podFailurePolicy"):
        out.append("needs restartPolicy Never and a podFailurePolicy")
    return out
