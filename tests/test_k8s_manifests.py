"""The kustomize overlays, built by the real kustomize (`kubectl kustomize`): they render, validate strictly against
Kubernetes 1.30 and 1.34 (kubernetes-validate ships schemas for both) and, for JobSet / TrainJob / TrainingRuntime,
against their CRDs' schemas; they pass our own deployment rules; every rule catches the violation it is for;
render parameters rewrite the Job consistently."""
from __future__ import annotations

import copy

import kubernetes_validate
import pytest
import yaml
from k8s_schemas import validate
from policy_helpers import assert_rule_catches

from app.k8s import policy
from app.k8s.render import CONFIG_DIR, RenderError, RenderParams, find, render, to_yaml
from app.k8s.workloads import pod_templates

OVERLAYS = ["dev", "prod"]
ALL_OVERLAYS = ["dev", "prod", "kubeflow", "jobset"]
CONFIG_TEXT = "trainer:\n  max_steps: 3\nmodel:\n  preset: tiny\n"


@pytest.fixture
def config_file(write_run_config):
    return write_run_config(CONFIG_TEXT)


def _train_args(objects):
    job = find(objects, "Job", "crescent-train")
    return job, job["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("version", ["1.30", "1.34"])
@pytest.mark.parametrize("overlay", ALL_OVERLAYS)
def test_overlay_validates_strictly(overlay, version, config_file):
    objects = render(RenderParams(overlay=overlay, config=config_file))
    kinds = {o["kind"] for o in objects}
    assert {"Namespace", "ServiceAccount", "Role", "RoleBinding", "PersistentVolumeClaim", "ConfigMap", "Service",
            "Job", "CronJob", "NetworkPolicy", "Deployment", "StatefulSet"} <= kinds
    workload = {"dev": "Job", "prod": "Job", "kubeflow": "TrainJob", "jobset": "JobSet"}[overlay]
    assert [o["kind"] for o in objects if o["metadata"]["name"] == "crescent-train"
            and o["kind"] in ("Job", "JobSet", "TrainJob")] == [workload]
    for obj in objects:
        validate(obj, version)  # raises on unknown fields, wrong types; CRD kinds against their CRD's schema


def test_strict_validation_rejects_an_unknown_field(config_file):
    job = copy.deepcopy(find(render(RenderParams(overlay="dev", config=config_file)), "Job", "crescent-train"))
    job["spec"]["template"]["spec"]["containers"][0]["gpus"] = 1
    with pytest.raises(kubernetes_validate.ValidationError, match="gpus"):
        kubernetes_validate.validate(job, "1.34", strict=True)


@pytest.mark.parametrize("overlay", ALL_OVERLAYS)
def test_rendered_objects_follow_our_rules(overlay, config_file):
    objects = render(RenderParams(overlay=overlay, config=config_file))
    assert policy.problems(objects) == []
    assert not [o for o in objects if o["kind"] == "Secret"]
    text = to_yaml(objects)
    assert ":latest" not in text and "password:" not in text.lower()


def _mutations():
    def pod(objs, kind="Job", name="crescent-train"):
        return pod_templates(find(objs, kind, name))[0]["spec"]

    def ctr(objs, kind="Job", name="crescent-train"):
        return pod(objs, kind, name)["containers"][0]

    return {
        "restartPolicy": (lambda o: pod(o).update(restartPolicy="Always"), "restartPolicy='Always'"),
        "cronjob restartPolicy": (lambda o: pod(o, "CronJob", "crescent-eval").update(restartPolicy="Sometimes"),
                                  "restartPolicy='Sometimes'"),
        "quantity": (lambda o: ctr(o)["resources"]["limits"].update(memory="8GB"), "not a Kubernetes quantity"),
        "request > limit": (lambda o: ctr(o)["resources"]["requests"].update(cpu="64"), "exceeds limit"),
        "missing limits": (lambda o: ctr(o)["resources"].pop("limits"), "resources.limits.cpu missing"),
        "latest tag": (lambda o: ctr(o).update(image="crescent/train:latest"), "uses the tag `latest`"),
        "untagged": (lambda o: ctr(o, "Deployment", "mlflow").update(image="crescent/mlflow"), "has no tag"),
        "root": (lambda o: (ctr(o)["securityContext"].pop("runAsNonRoot"),
                            pod(o)["securityContext"].pop("runAsNonRoot")), "runAsNonRoot is not true"),
        "escalation": (lambda o: ctr(o)["securityContext"].update(allowPrivilegeEscalation=True),
                       "allowPrivilegeEscalation"),
        "capabilities": (lambda o: ctr(o)["securityContext"]["capabilities"].update(add=["NET_ADMIN"]),
                         "capabilities must drop ALL"),
        "seccomp": (lambda o: (ctr(o)["securityContext"].pop("seccompProfile"),
                               pod(o)["securityContext"].pop("seccompProfile")), "seccompProfile=None"),
        "literal password": (lambda o: ctr(o, "Deployment", "mlflow")["env"].insert(
            0, {"name": "POSTGRES_PASSWORD", "value": "hunter2"}), "holds a literal value"),
        "password in URI": (lambda o: ctr(o, "Deployment", "mlflow")["env"].append(
            {"name": "DB_URI", "value": "postgresql://mlflow:hunter2@db/mlflow"}), "URI with a literal password"),
        "secret data": (lambda o: o.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"},
                                            "stringData": {"password": "x"}}), "Secret with literal data"),
        "concurrency": (lambda o: find(o, "CronJob", "crescent-eval")["spec"].update(concurrencyPolicy="Allow"),
                        "concurrencyPolicy='Allow'"),
        "pull policy": (lambda o: ctr(o).update(imagePullPolicy="Sometimes"), "imagePullPolicy='Sometimes'"),
        "nnodes": (lambda o: find(o, "Job", "crescent-train")["spec"].update(completions=3, parallelism=3),
                   "--nnodes=1 but completions=3"),
        "master addr": (lambda o: pod(o).update(subdomain="elsewhere"),
                        "expected crescent-train-0.elsewhere (pod 0's DNS name)"),
        "shm": (lambda o: pod(o)["volumes"].__setitem__(
            slice(None), [v for v in pod(o)["volumes"] if v["name"] != "dshm"]), "/dev/shm"),
        "probes": (lambda o: ctr(o, "Deployment", "mlflow").pop("readinessProbe"), "readinessProbe missing"),
        "shutdown": (lambda o: pod(o).update(terminationGracePeriodSeconds=90), "--shutdown-timeout=90 must be"),
        "token": (lambda o: pod(o).pop("automountServiceAccountToken"), "automountServiceAccountToken"),
    }


@pytest.mark.parametrize("name", sorted(_mutations()))
def test_each_rule_catches_its_violation(name, config_file):
    assert_rule_catches("dev", config_file, *_mutations()[name])


def test_quantities_parse_to_numbers():
    assert policy.quantity("500m") == 0.5
    assert policy.quantity("8Gi") == 8 * 2**30
    assert policy.quantity("2") == 2 and policy.quantity("1e3") == 1000.0
    with pytest.raises(ValueError, match="'8GB' is not a Kubernetes quantity"):
        policy.quantity("8GB")


def test_parameters_rewrite_the_training_job_consistently(config_file):
    objects = render(RenderParams(overlay="prod", nodes=3, gpus_per_node=4, config=config_file,
                                  image="reg.example/crescent/train:1.2.3", max_restarts=2,
                                  train_overrides=[("trainer.max_steps", "50")]))
    job, trainer = _train_args(objects)
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 3
    assert job["spec"]["backoffLimit"] == 6
    args = trainer["args"]
    assert "--nnodes=3" in args and "--nproc-per-node=4" in args
    assert "--shutdown-timeout=870" in args  # 30 s under prod's terminationGracePeriodSeconds 900
    assert args[args.index("--trainer.num_nodes") + 1] == "3" and args[args.index("--trainer.devices") + 1] == "4"
    assert args[args.index("--trainer.max_steps") + 1] == "50"
    assert trainer["resources"]["limits"]["nvidia.com/gpu"] == trainer["resources"]["requests"]["nvidia.com/gpu"] == "4"
    assert trainer["image"] == "reg.example/crescent/train:1.2.3"
    assert find(objects, "Job", "crescent-data-build")["spec"]["template"]["spec"]["containers"][0]["image"] == \
        "reg.example/crescent/train:1.2.3"
    eval_image = find(objects, "CronJob", "crescent-eval")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert eval_image["containers"][0]["image"] == "crescent/eval:0.1.0"
    assert find(objects, "ConfigMap", "crescent-train-config")["data"] == {"config.yaml": CONFIG_TEXT}


def test_zero_gpus_trains_on_cpu_processes(config_file):
    objects = render(RenderParams(overlay="prod", nodes=2, gpus_per_node=0, cpu_procs_per_node=2,
                                  config=config_file))
    _, trainer = _train_args(objects)
    assert "--nproc-per-node=2" in trainer["args"]
    assert "nvidia.com/gpu" not in trainer["resources"]["limits"]
    assert "nvidia.com/gpu" not in trainer["resources"]["requests"]


def test_data_slices_set_the_build_and_the_merge(config_file):
    objects = render(RenderParams(overlay="prod", config=config_file, data_slices=5))
    build = find(objects, "Job", "crescent-data-build")
    assert build["spec"]["completions"] == 5 and build["spec"]["parallelism"] == 5
    assert build["spec"]["completionMode"] == "Indexed"
    args = build["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--num-slices") + 1] == "5"
    assert args[args.index("--slice-index") + 1] == "$(JOB_COMPLETION_INDEX)"
    assert args[args.index("--out") + 1] == "/data/shards/part-$(JOB_COMPLETION_INDEX)"
    merge = find(objects, "Job", "crescent-data-merge")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert merge[:2] == ["data", "merge-manifests"] and merge[merge.index("--parts") + 1] == "5"


@pytest.mark.parametrize("params, message", [
    (dict(nodes=0), "nodes=0: must be an integer >= 1"),
    (dict(gpus_per_node=-1), "gpus_per_node=-1"),
    (dict(image="crescent/train:latest"), "image='crescent/train:latest': image 'crescent/train:latest' uses the tag `latest`"),
    (dict(image="crescent/train"), "no tag"),
    (dict(overlay="staging"), "overlay='staging': not a kustomization directory; available overlays"),
    (dict(config="no-such-config"), "config='no-such-config':"),
    (dict(train_overrides=[("bad key", "1")]), "train override key 'bad key'"),
])
def test_bad_parameters_name_the_field(params, message):
    with pytest.raises(RenderError) as err:
        render(RenderParams(**params))
    assert message in str(err.value)


@pytest.mark.parametrize("overlay, name", [("dev", "tiny-cpu"), ("prod", "moonlight-16b-a3b")])
def test_overlay_default_config_comes_from_app_configs(overlay, name):
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():  # until the training issue lands its configs, render must say so clearly
        with pytest.raises(RenderError, match=f"config='{name}': .*{name}.yaml does not exist"):
            render(RenderParams(overlay=overlay))
        return
    objects = render(RenderParams(overlay=overlay))
    assert find(objects, "ConfigMap", "crescent-train-config")["data"]["config.yaml"] == path.read_text()
    job, _ = _train_args(objects)
    assert job["metadata"]["annotations"]["crescent/config"] == name


def test_eval_pods_may_reach_only_mlflow_and_dns(config_file):
    objects = render(RenderParams(overlay="dev", config=config_file))
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"
                and o["spec"]["podSelector"]["matchLabels"].get("app.kubernetes.io/component") == "eval"]
    assert len(policies) == 1
    spec = policies[0]["spec"]
    assert sorted(spec["policyTypes"]) == ["Egress", "Ingress"] and spec["ingress"] == []
    destinations = [(peer.get("podSelector", {}).get("matchLabels"), [p["port"] for p in rule["ports"]])
                    for rule in spec["egress"] for peer in rule["to"]]
    assert destinations == [({"app.kubernetes.io/component": "mlflow"}, [5000]),
                            ({"k8s-app": "kube-dns"}, [53, 53])]
    cron = find(objects, "CronJob", "crescent-eval")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert cron["spec"]["jobTemplate"]["spec"]["backoffLimit"] == 0  # the next scheduled run retries a failed task
    # Generated programs cannot touch the checkpoints: mounted read-only, the watcher's locks in the pod's scratch.
    (container,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["checkpoints"]["readOnly"] is True and mounts["scratch"]["mountPath"] == "/tmp"
    assert container["args"][container["args"].index("--lock-dir") + 1].startswith("/tmp/")
    eval_labels = cron["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
    assert eval_labels["app.kubernetes.io/component"] == "eval"
    mlflow = find(objects, "Deployment", "mlflow")["spec"]["template"]["metadata"]["labels"]
    assert mlflow["app.kubernetes.io/component"] == "mlflow"


def test_mlflow_reads_its_database_password_from_a_secret(config_file):
    objects = render(RenderParams(overlay="prod", config=config_file))
    for kind, name in (("Deployment", "mlflow"), ("StatefulSet", "mlflow-postgres")):
        env = {e["name"]: e for e in pod_templates(find(objects, kind, name))[0]["spec"]["containers"][0]["env"]}
        assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-postgres", "key": "password"}
    uri = {e["name"]: e for e in find(objects, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert uri["MLFLOW_BACKEND_STORE_URI"]["value"].startswith("postgresql+psycopg2://mlflow:$(POSTGRES_PASSWORD)@")


def test_render_cli_prints_yaml_and_fails_cleanly(config_file, capsys):
    from app.commands.k8s import main

    assert main(["render", "--overlay", "dev", "--config", config_file, "--nodes", "2"]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert find(docs, "Job", "crescent-train")["spec"]["completions"] == 2
    assert main(["render", "--overlay", "dev", "--config", config_file, "--image", "x:latest"]) == 2
    assert "image='x:latest': image 'x:latest' uses the tag `latest`; pin a version" in capsys.readouterr().err


def test_kubeflow_overlay_runs_training_as_a_trainjob(config_file):
    objects = render(RenderParams(overlay="kubeflow", config=config_file, nodes=3, gpus_per_node=2,
                                  image="reg.example/crescent/train:1.2.3"))
    assert not [o for o in objects if o["kind"] in ("Job", "Service") and o["metadata"]["name"] == "crescent-train"]
    assert policy.problems(objects) == []
    trainer = find(objects, "TrainJob", "crescent-train")["spec"]["trainer"]
    runtime = find(objects, "TrainingRuntime", "crescent-torch")
    # Node count and processes per node are TrainJob fields (Trainer v2.2+ has no numProcPerNode in the runtime).
    assert trainer["numNodes"] == 3 and trainer["numProcPerNode"] == 2
    assert runtime["spec"]["mlPolicy"]["torch"] == {}
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "2"
    args = trainer["args"]
    assert args[args.index("--trainer.num_nodes") + 1] == "3" and args[args.index("--trainer.devices") + 1] == "2"
    assert trainer["image"] == "reg.example/crescent/train:1.2.3"
    pod = pod_templates(runtime)[0]["spec"]
    assert pod["containers"][0]["image"] == "reg.example/crescent/train:1.2.3"
    assert {v["name"] for v in pod["volumes"]} == {"config", "data", "checkpoints", "dshm"}


@pytest.mark.parametrize("overlay", ALL_OVERLAYS)
def test_nccl_async_error_handling_uses_the_current_name(overlay, config_file):
    text = to_yaml(render(RenderParams(overlay=overlay, config=config_file)))
    assert "NCCL_ASYNC_ERROR_HANDLING" not in text.replace("TORCH_NCCL_ASYNC_ERROR_HANDLING", "")
    if overlay != "dev":  # the GPU overlays set it on the trainer
        assert text.count("- name: TORCH_NCCL_ASYNC_ERROR_HANDLING\n") == 1
