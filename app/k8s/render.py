"""`crescent k8s render`: an overlay of k8s/ plus one run's parameters -> the objects to apply.

The overlay (built by the real kustomize, `kubectl kustomize`) holds the defaults: node count, GPUs, the config
name in the training workload's `crescent/config` annotation. The training workload is the Indexed Job, the
JobSet or the Kubeflow TrainJob named crescent-train. The parameters given here rewrite the defaults consistently
everywhere they appear (completions and parallelism, the torchrun flags, Lightning's num_nodes/devices, GPU
resources, the restart budget) and can queue the workload in Kueue. The training config is read from
app/configs/NAME.yaml (or a path) at render time into the ConfigMap the pods mount at /etc/crescent/config.yaml,
so it is never copied by hand.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from app.k8s import kubectl, policy
from app.k8s.workloads import job_specs, pod_templates
from app.shipped import shipped_names, shipped_yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = REPO_ROOT / "k8s"
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

TRAIN_JOB = "crescent-train"
TRAIN_CONTAINER = "trainer"
CONFIG_MAP = "crescent-train-config"
CONFIG_ANNOTATION = "crescent/config"
DATA_BUILD_JOB = "crescent-data-build"
DATA_MERGE_JOB = "crescent-data-merge"
GPU_RESOURCE = "nvidia.com/gpu"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"  # Kueue queues a Job, JobSet or TrainJob that carries it
_LABEL_VALUE = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,61}[a-z0-9])?$")  # a LocalQueue name that fits in a label
SHUTDOWN_MARGIN_S = 30  # torchrun's --shutdown-timeout ends this long before the kubelet's SIGKILL

# Apply order: what others refer to comes first.
KIND_ORDER = ["Namespace", "ServiceAccount", "Role", "RoleBinding", "Secret", "ConfigMap",
              "PersistentVolumeClaim", "Service", "NetworkPolicy", "StatefulSet", "Deployment", "Job", "CronJob",
              "JobSet", "TrainingRuntime", "TrainJob"]


class RenderError(ValueError):
    """Bad render parameters or an overlay that does not have what the parameters rewrite."""


@dataclass
class RenderParams:
    """One run's parameters; None keeps the overlay's value."""

    overlay: str = "dev"
    nodes: int | None = None
    gpus_per_node: int | None = None
    cpu_procs_per_node: int = 1  # processes per node when gpus_per_node == 0 (CPU training with gloo)
    image: str | None = None
    eval_image: str | None = None
    config: str | None = None
    data_slices: int | None = None
    max_restarts: int = 3  # restarts of the whole group: JobSet maxRestarts, or Job backoffLimit = this * nodes
    train_overrides: list[tuple[str, str]] = field(default_factory=list)
    queue: str | None = None  # a Kueue LocalQueue: the workload is created suspended and admitted as a whole

    def __post_init__(self) -> None:
        for name in ("nodes", "data_slices"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise RenderError(f"{name}={value!r}: must be an integer >= 1")
        if self.gpus_per_node is not None and (not isinstance(self.gpus_per_node, int) or self.gpus_per_node < 0):
            raise RenderError(f"gpus_per_node={self.gpus_per_node!r}: must be an integer >= 0 (0 = CPU)")
        if self.cpu_procs_per_node < 1:
            raise RenderError(f"cpu_procs_per_node={self.cpu_procs_per_node!r}: must be >= 1")
        if self.max_restarts < 0:
            raise RenderError(f"max_restarts={self.max_restarts!r}: must be >= 0")
        for name in ("image", "eval_image"):
            value = getattr(self, name)
            if value is not None:
                check_image_ref(value, name)
        if self.queue is not None and not _LABEL_VALUE.match(self.queue):
            raise RenderError(f"queue={self.queue!r}: a LocalQueue name is lowercase letters, digits, '-' and '.', "
                              "starting and ending with a letter or digit, at most 63 characters")
        for key, _ in self.train_overrides:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", key):
                raise RenderError(f"train override key {key!r}: expected dotted names like trainer.max_steps")


def check_image_ref(ref: str, what: str = "image") -> None:
    """An image must be pinned: an explicit tag other than `latest`, or a digest."""
    problem = policy.image_problem(ref)
    if problem:
        raise RenderError(f"{what}={ref!r}: {problem}; pin a version (e.g. {ref.split(':')[0]}:0.1.0)")


def overlay_dir(overlay: str) -> Path:
    path = Path(overlay)
    if (path / "kustomization.yaml").is_file():
        return path
    candidate = K8S_DIR / "overlays" / overlay
    if (candidate / "kustomization.yaml").is_file():
        return candidate
    available = sorted(p.name for p in (K8S_DIR / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
    raise RenderError(f"overlay={overlay!r}: not a kustomization directory; available overlays: {available}")


def resolve_config(config: str) -> Path:
    """`tiny-cpu` -> app/configs/tiny-cpu.yaml; a path is taken as it is."""
    path = shipped_yaml(config, CONFIG_DIR)
    if path is None:
        candidate = CONFIG_DIR / f"{config}.yaml"
        raise RenderError(f"config={config!r}: {candidate} does not exist (nor a file of that name); "
                          f"available configs: {shipped_names(CONFIG_DIR) or 'none yet'}")
    return path


def render(params: RenderParams) -> list[dict]:
    """The overlay's objects with the parameters applied and the config ConfigMap added, in apply order."""
    try:
        objects = kubectl.build(overlay_dir(params.overlay), reads=(K8S_DIR,))  # a fresh copy
    except kubectl.KustomizeError as err:
        raise RenderError(str(err)) from err
    workload = training_workload(objects)
    config = params.config or workload["metadata"].get("annotations", {}).get(CONFIG_ANNOTATION)
    if not config:
        raise RenderError(f"no config: pass --config or set the {CONFIG_ANNOTATION} annotation on "
                          f"{workload['kind']}/{TRAIN_JOB}")
    config_path = resolve_config(config)
    workload["metadata"].setdefault("annotations", {})[CONFIG_ANNOTATION] = config
    objects.append(config_map(config_path, workload["metadata"].get("namespace"),
                              workload["metadata"].get("labels", {})))
    if workload["kind"] == "TrainJob":
        _apply_trainjob(workload, params)
    else:
        _apply_training(workload, params)
    if params.queue:
        _apply_queue(workload, params.queue)
    _apply_images(objects, params)
    if params.data_slices is not None:
        _apply_data_slices(objects, params.data_slices)
    issues = policy.problems(objects)
    if issues:
        raise RenderError("the rendered objects break the deployment rules:\n  " + "\n  ".join(issues))
    return sorted(objects, key=_order)


def training_workload(objects: list[dict]) -> dict:
    """The object that runs pretraining: a TrainJob, a JobSet or an Indexed Job named crescent-train."""
    for kind in ("TrainJob", "JobSet", "Job"):
        for obj in objects:
            if obj["kind"] == kind and obj["metadata"]["name"] == TRAIN_JOB:
                return obj
    raise RenderError(f"the overlay has no training workload: a Job, JobSet or TrainJob named {TRAIN_JOB}")


def config_map(path: Path, namespace: str | None, labels: dict) -> dict:
    text = path.read_text()
    try:
        yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise RenderError(f"config file {path} is not valid YAML: {err}") from err
    meta = {"name": CONFIG_MAP, "labels": {**labels, "app.kubernetes.io/component": "train"}}
    if namespace:
        meta["namespace"] = namespace
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {"config.yaml": text}}


def find(objects: list[dict], kind: str, name: str) -> dict:
    for obj in objects:
        if obj["kind"] == kind and obj["metadata"]["name"] == name:
            return obj
    raise RenderError(f"the overlay has no {kind}/{name}")


def container(pod_spec: dict, name: str) -> dict:
    for c in pod_spec["containers"]:
        if c["name"] == name:
            return c
    raise RenderError(f"no container {name!r} in the pod template")


def _apply_training(workload: dict, params: RenderParams) -> None:
    """Node count, processes and GPUs per node, restart budget and overrides of an Indexed Job or a JobSet."""
    spec = job_specs(workload)[0]
    trainer = container(spec["template"]["spec"], TRAIN_CONTAINER)
    args = trainer["args"]
    nodes = params.nodes if params.nodes is not None else int(spec["completions"])
    spec["completions"] = spec["parallelism"] = nodes
    if workload["kind"] == "JobSet":  # one failed pod fails the Job (backoffLimit 0); the JobSet restarts all
        workload["spec"].setdefault("failurePolicy", {})["maxRestarts"] = params.max_restarts
    else:  # each whole-job restart costs up to `nodes` pod failures
        spec["backoffLimit"] = params.max_restarts * nodes
    grace = int(spec["template"]["spec"].get("terminationGracePeriodSeconds", 30))
    _set_flag(args, "--shutdown-timeout", str(max(grace - SHUTDOWN_MARGIN_S, 1)))
    _set_flag(args, "--nnodes", str(nodes))
    _set_option(args, "--trainer.num_nodes", str(nodes))
    if params.gpus_per_node is not None:
        gpus = params.gpus_per_node
        procs = gpus if gpus > 0 else params.cpu_procs_per_node
        _set_flag(args, "--nproc-per-node", str(procs))
        _set_option(args, "--trainer.devices", str(procs))
        set_gpus(trainer.setdefault("resources", {}), gpus)
    for key, value in params.train_overrides:
        _set_option(args, f"--{key}", value)


def set_gpus(resources: dict, gpus: int) -> None:
    """`gpus` GPUs in a resources block's requests and limits (a container's, a TrainJob's per node); 0: none."""
    for section in ("requests", "limits"):
        values = resources.setdefault(section, {})
        if gpus > 0:
            values[GPU_RESOURCE] = str(gpus)
        else:
            values.pop(GPU_RESOURCE, None)


def _apply_queue(workload: dict, queue: str) -> None:
    """Kueue: the queue label on the Job / JobSet / TrainJob itself, and created suspended. Kueue unsuspends it
    once the queue's quota admits every pod at once (one Workload for the whole group: gang admission)."""
    workload["metadata"].setdefault("labels", {})[QUEUE_LABEL] = queue
    workload["spec"]["suspend"] = True


def _apply_trainjob(trainjob: dict, params: RenderParams) -> None:
    """The Kubeflow TrainJob form: node count, processes and resources per node are TrainJob fields (the
    runtime's torch plugin turns them into torchrun's PET_* variables), so only Lightning's num_nodes/devices
    are in the args."""
    trainer = trainjob["spec"]["trainer"]
    args = trainer["args"]
    nodes = params.nodes if params.nodes is not None else int(trainer["numNodes"])
    trainer["numNodes"] = nodes
    _set_option(args, "--trainer.num_nodes", str(nodes))
    if params.gpus_per_node is not None:
        gpus = params.gpus_per_node
        procs = gpus if gpus > 0 else params.cpu_procs_per_node
        trainer["numProcPerNode"] = procs
        _set_option(args, "--trainer.devices", str(procs))
        set_gpus(trainer.setdefault("resourcesPerNode", {}), gpus)
    if params.image:
        trainer["image"] = params.image
    for key, value in params.train_overrides:
        _set_option(args, f"--{key}", value)


def _apply_images(objects: list[dict], params: RenderParams) -> None:
    for obj in objects:
        for template in pod_templates(obj):
            for c in template["spec"]["containers"] + template["spec"].get("initContainers", []):
                component = template.get("metadata", {}).get("labels", {}).get("app.kubernetes.io/component")
                if params.image and component in ("train", "data"):
                    c["image"] = params.image
                if params.eval_image and component == "eval":
                    c["image"] = params.eval_image


def _apply_data_slices(objects: list[dict], slices: int) -> None:
    build = find(objects, "Job", DATA_BUILD_JOB)
    build["spec"]["completions"] = slices
    build["spec"]["parallelism"] = min(int(build["spec"].get("parallelism", slices)), slices)
    _set_option(container(build["spec"]["template"]["spec"], "build")["args"], "--num-slices", str(slices))
    merge = find(objects, "Job", DATA_MERGE_JOB)
    _set_option(container(merge["spec"]["template"]["spec"], "merge")["args"], "--parts", str(slices))


def _set_flag(args: list[str], flag: str, value: str) -> None:
    """`--flag=value` in place."""
    for i, arg in enumerate(args):
        if arg.startswith(flag + "="):
            args[i] = f"{flag}={value}"
            return
    raise RenderError(f"the training command has no {flag}=...: {args}")


def _set_option(args: list[str], option: str, value: str) -> None:
    """`--option value` in place (before the command's positional end), or appended."""
    for i, arg in enumerate(args[:-1]):
        if arg == option:
            args[i + 1] = value
            return
    args += [option, value]


def _order(obj: dict) -> tuple[int, str]:
    kind = obj["kind"]
    return (KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER), obj["metadata"]["name"])


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (the config file in the ConfigMap) as readable `|` blocks."""


def _str(dumper: yaml.SafeDumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str)


def to_yaml(objects: list[dict]) -> str:
    return yaml.dump_all(objects, Dumper=_BlockDumper, sort_keys=False, default_flow_style=False, width=120)
