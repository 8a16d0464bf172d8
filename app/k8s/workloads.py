"""Where the Job specs and pod templates sit inside each workload kind, and the DNS names their pods get.

Kubernetes puts a pod template at a different path in each workload kind; the JobSet forms (JobSet, and the
JobSet template inside a Kubeflow TrainingRuntime) hold one Job spec per replicated job. Render and the policy
checks both read pods through here, and the pod DNS names (what torchrun's --master-addr must be) are defined
once, as the Job and JobSet controllers name pods.
"""
from __future__ import annotations

JOBSET_KINDS = ("JobSet", "TrainingRuntime")


def replicated_jobs(obj: dict) -> list[dict]:
    """The replicatedJobs of a JobSet, or of the JobSet template of a Kubeflow TrainingRuntime."""
    spec = obj.get("spec", {})
    if obj["kind"] == "TrainingRuntime":
        spec = spec["template"]["spec"]
    return spec.get("replicatedJobs", []) if obj["kind"] in JOBSET_KINDS else []


def job_specs(obj: dict) -> list[dict]:
    """The Job specs (`completions`, `template`, ...) a workload creates Jobs from."""
    if obj["kind"] == "Job":
        return [obj["spec"]]
    if obj["kind"] == "CronJob":
        return [obj["spec"]["jobTemplate"]["spec"]]
    return [job["template"]["spec"] for job in replicated_jobs(obj)]


def pod_templates(obj: dict) -> list[dict]:
    """The pod templates (metadata + spec) of a workload, whatever its kind."""
    if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"):
        return [obj["spec"]["template"]]
    return [spec["template"] for spec in job_specs(obj)]


def jobset_subdomain(jobset: dict) -> str:
    """The headless Service JobSet creates and puts its pods in (network.subdomain, default the JobSet's name)."""
    return jobset["spec"].get("network", {}).get("subdomain") or jobset["metadata"]["name"]


def pod_hostname(workload: dict, index: int) -> str:
    """Hostname of the pod of completion index `index`: `<job>-<index>` for an Indexed Job (the Job controller),
    `<jobset>-<replicatedJob>-0-<index>` for a JobSet's first replicated job, job 0 (the JobSet controller)."""
    name = workload["metadata"]["name"]
    if workload["kind"] == "JobSet":
        return f"{name}-{replicated_jobs(workload)[0]['name']}-0-{index}"
    return f"{name}-{index}"


def pod_dns_name(workload: dict, index: int) -> str:
    """`hostname.subdomain`: what the pod of `index` resolves as inside the namespace."""
    if workload["kind"] == "JobSet":
        return f"{pod_hostname(workload, index)}.{jobset_subdomain(workload)}"
    return f"{pod_hostname(workload, index)}.{workload['spec']['template']['spec'].get('subdomain')}"
