"""Our own checks on rendered objects: what schema validation (kubernetes-validate) does not catch.

Enums the schemas leave as free strings, quantities, the pod security settings every pod must carry, pinned
images, secrets that never appear as literals, and the consistency of the distributed training workload, as an
Indexed Job or a JobSet (node count, torchrun flags, the rendezvous address and the headless Service its DNS name
needs, whole-group restarts). `problems(objects)` returns one line per violation; `crescent k8s render` refuses
to print objects that have any.
"""
from __future__ import annotations

import re

from app.k8s.workloads import job_specs, jobset_subdomain, pod_dns_name, pod_templates, replicated_jobs

ENUMS = {
    "imagePullPolicy": {"Always", "IfNotPresent", "Never"},
    "concurrencyPolicy": {"Allow", "Forbid", "Replace"},
    "completionMode": {"NonIndexed", "Indexed"},
    "protocol": {"TCP", "UDP", "SCTP"},
    "podFailurePolicyAction": {"FailJob", "FailIndex", "Ignore", "Count"},
    "jobSetFailurePolicyAction": {"FailJobSet", "RestartJobSet", "RestartJobSetAndIgnoreMaxRestarts", "RestartJob",
                                  "RestartJobAndIgnoreMaxRestarts"},
    "accessModes": {"ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"},
    "emptyDirMedium": {"", "Memory"},
    "serviceType": {"ClusterIP", "NodePort", "LoadBalancer", "ExternalName"},
    "policyTypes": {"Ingress", "Egress"},
}
_JOB_RESTART = {"Never", "OnFailure"}
RESTART_POLICY = {"Job": _JOB_RESTART, "CronJob": _JOB_RESTART, "JobSet": _JOB_RESTART,
                  "TrainingRuntime": _JOB_RESTART, "Deployment": {"Always"}, "StatefulSet": {"Always"}}
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
    for job_spec in job_specs(obj):
        out += _enum("completionMode", job_spec.get("completionMode", "NonIndexed"))
        for rule in job_spec.get("podFailurePolicy", {}).get("rules", []):
            out += _enum("podFailurePolicyAction", rule.get("action"))
    if kind == "JobSet":
        for rule in spec.get("failurePolicy", {}).get("rules", []):
            out += _enum("jobSetFailurePolicyAction", rule.get("action"))
    owner_specs = job_specs(obj) or [spec] * len(pod_templates(obj))
    for template, owner_spec in zip(pod_templates(obj), owner_specs):
        out += _pod_problems(kind, template["spec"], owner_spec)
    if kind in ("Job", "JobSet") and _torchrun_container(obj) is not None:
        out += _training_problems(obj, objects)
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


def _torchrun_container(workload: dict) -> dict | None:
    for template in pod_templates(workload):
        for c in template["spec"]["containers"]:
            if c.get("command", [None])[0] == "torchrun":
                return c
    return None


def _training_problems(workload: dict, objects: list[dict]) -> list[str]:
    """A distributed training workload: every node runs at once, torchrun agrees with the node count and meets
    pod 0 at its DNS name, which a headless Service must provide; a failure restarts the whole group."""
    out: list[str] = []
    if workload["kind"] == "JobSet":
        out += _jobset_problems(workload, objects)
    else:
        out += _job_service_problems(workload, objects)
    spec = job_specs(workload)[0]
    pod, c = spec["template"]["spec"], _torchrun_container(workload)
    if spec.get("completionMode") != "Indexed":
        out.append(f"completionMode={spec.get('completionMode')!r}: a training Job must be Indexed (node rank = "
                   "completion index)")
    if spec.get("completions") != spec.get("parallelism"):
        out.append(f"completions={spec.get('completions')} != parallelism={spec.get('parallelism')}: "
                   "every node must run at once")
    flags = dict(a.split("=", 1) for a in c.get("args", []) if a.startswith("--") and "=" in a)
    if flags.get("--nnodes") != str(spec.get("completions")):
        out.append(f"torchrun --nnodes={flags.get('--nnodes')} but completions={spec.get('completions')}")
    if flags.get("--node-rank") != "$(JOB_COMPLETION_INDEX)":
        out.append("torchrun --node-rank must be $(JOB_COMPLETION_INDEX)")
    master = pod_dns_name(workload, 0)
    if flags.get("--master-addr") != master:
        out.append(f"torchrun --master-addr={flags.get('--master-addr')}: expected {master} (pod 0's DNS name)")
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


def _job_service_problems(job: dict, objects: list[dict]) -> list[str]:
    """An Indexed Job's pods get DNS names only through a headless Service named as their subdomain."""
    name, subdomain = job["metadata"]["name"], job["spec"]["template"]["spec"].get("subdomain")
    services = [o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == subdomain]
    if not services or services[0]["spec"].get("clusterIP") != "None":
        return [f"no headless Service named {subdomain!r} for the pods' DNS names"]
    if services[0]["spec"].get("selector", {}).get("batch.kubernetes.io/job-name") != name:
        return [f"Service {subdomain!r} does not select the pods of Job {name!r}"]
    return []


def _jobset_problems(jobset: dict, objects: list[dict]) -> list[str]:
    """JobSet makes the headless Service and the pod DNS names itself (network.enableDNSHostnames) unless a
    Service of that name exists already; node rank is the completion index only inside one Job; a failed pod
    must fail its Job (backoffLimit 0) so that the failurePolicy restarts every node."""
    out: list[str] = []
    name, spec = jobset["metadata"]["name"], jobset["spec"]
    if spec.get("network", {}).get("enableDNSHostnames") is not True:
        out.append("network.enableDNSHostnames must be true: the nodes meet pod 0 by its DNS name")
    subdomain = jobset_subdomain(jobset)
    for service in (o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == subdomain):
        if service["spec"].get("selector") != {"jobset.sigs.k8s.io/jobset-name": name}:
            out.append(f"Service {subdomain!r} takes the place of the headless Service JobSet creates but does "
                       f"not select the pods of JobSet {name!r} (selector {service['spec'].get('selector')})")
    jobs = replicated_jobs(jobset)
    if len(jobs) != 1 or jobs[0].get("replicas", 1) != 1:
        out.append(f"replicatedJobs={[(j['name'], j.get('replicas', 1)) for j in jobs]}: training needs one "
                   "replicated job with replicas 1 (node rank = completion index)")
    backoff = job_specs(jobset)[0].get("backoffLimit", 6)
    if backoff != 0:
        out.append(f"backoffLimit={backoff}: must be 0, so that one failed pod fails the Job and the JobSet "
                   "restarts every node")
    policy = spec.get("failurePolicy", {})
    if not policy.get("maxRestarts"):
        out.append(f"failurePolicy.maxRestarts={policy.get('maxRestarts')!r}: the group is never restarted")
    return out
