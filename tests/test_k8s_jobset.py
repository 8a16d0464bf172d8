"""The jobset overlay and Kueue: the JobSet runs the Indexed Job's pods (one pod template, copied by kustomize),
restarts the whole group on failure, meets pod 0 at the DNS name JobSet gives it; `--queue` labels the training
workload for Kueue and creates it suspended; JobSet / TrainJob objects are checked against their CRDs' schemas."""
from __future__ import annotations

import copy

import pytest
from k8s_schemas import crd_errors
from policy_helpers import assert_rule_catches

from app.k8s.render import RenderError, RenderParams, find, render
from app.k8s.workloads import job_specs, pod_dns_name, pod_templates

CONFIG_TEXT = "trainer:\n  max_steps: 3\n"


@pytest.fixture
def config_file(write_run_config):
    return write_run_config(CONFIG_TEXT)


def _jobset(objects):
    return find(objects, "JobSet", "crescent-train")


def test_jobset_runs_the_training_jobs_pods(config_file):
    jobset_objects = render(RenderParams(overlay="jobset", config=config_file))
    prod_objects = render(RenderParams(overlay="prod", config=config_file))
    jobset, job = _jobset(jobset_objects), find(prod_objects, "Job", "crescent-train")
    pod, job_pod = pod_templates(jobset)[0]["spec"], copy.deepcopy(job["spec"]["template"]["spec"])
    # The same pod as prod's Indexed Job, but for the two things JobSet names itself: pod 0 and the subdomain.
    assert job_pod.pop("subdomain") == "crescent-train"
    args, job_args = pod["containers"][0]["args"], job_pod["containers"][0]["args"]
    assert [a for a in args if a.startswith("--master-addr")] == ["--master-addr=crescent-train-node-0-0.crescent-train"]
    job_args[job_args.index("--master-addr=crescent-train-0.crescent-train")] = args[4]
    assert pod == job_pod
    assert pod_templates(jobset)[0]["metadata"] == job["spec"]["template"]["metadata"]
    assert jobset["metadata"]["annotations"]["crescent/config"] == job["metadata"]["annotations"]["crescent/config"]
    # JobSet creates the headless Service; the Indexed Job and its Service are gone.
    assert not [o for o in jobset_objects if o["kind"] in ("Job", "Service") and o["metadata"]["name"] == "crescent-train"]
    assert jobset["spec"]["network"] == {"enableDNSHostnames": True, "subdomain": "crescent-train",
                                         "publishNotReadyAddresses": True}


def test_jobset_restarts_the_whole_group(config_file):
    jobset = _jobset(render(RenderParams(overlay="jobset", config=config_file, nodes=3, gpus_per_node=2,
                                         max_restarts=5)))
    spec = job_specs(jobset)[0]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 3
    assert spec["backoffLimit"] == 0  # one failed pod fails the Job ...
    policy_ = jobset["spec"]["failurePolicy"]  # ... and the JobSet recreates every Job
    assert policy_["maxRestarts"] == 5 and policy_["restartStrategy"] == "BlockingRecreate"
    assert [(r["name"], r["action"], r["onJobFailureReasons"]) for r in policy_["rules"]] == [
        ("preempted", "RestartJobSetAndIgnoreMaxRestarts", ["PodFailurePolicy"]),
        ("failed", "RestartJobSet", ["BackoffLimitExceeded"])]
    # The pod failures that count as preemption fail the Job with reason PodFailurePolicy: SIGTERM's exit 143
    # and the DisruptionTarget condition (eviction, preemption, drain).
    rules = spec["podFailurePolicy"]["rules"]
    assert {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [143]}} in rules
    assert {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in rules
    args = spec["template"]["spec"]["containers"][0]["args"]
    assert "--nnodes=3" in args and "--nproc-per-node=2" in args and "--node-rank=$(JOB_COMPLETION_INDEX)" in args
    assert pod_dns_name(jobset, 2) == "crescent-train-node-0-2.crescent-train"
    assert crd_errors(jobset) == []


def _jobset_mutations():
    def spec(o):
        return job_specs(_jobset(o))[0]

    return {
        "master addr": (lambda o: spec(o)["template"]["spec"]["containers"][0]["args"].__setitem__(
            4, "--master-addr=crescent-train-0.crescent-train"),
            "--master-addr=crescent-train-0.crescent-train: expected crescent-train-node-0-0.crescent-train"),
        "subdomain": (lambda o: _jobset(o)["spec"]["network"].update(subdomain="nodes"),
                      "expected crescent-train-node-0-0.nodes"),
        "dns": (lambda o: _jobset(o)["spec"]["network"].update(enableDNSHostnames=False),
                "network.enableDNSHostnames must be true"),
        "stray service": (lambda o: o.append({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "crescent-train"},
                                              "spec": {"clusterIP": "None",
                                                       "selector": {"batch.kubernetes.io/job-name": "crescent-train"}}}),
                          "takes the place of the headless Service JobSet creates"),
        "replicas": (lambda o: _jobset(o)["spec"]["replicatedJobs"][0].update(replicas=2),
                     "[('node', 2)]: training needs one replicated job with replicas 1"),
        "backoff": (lambda o: spec(o).update(backoffLimit=3), "backoffLimit=3: must be 0"),
        "no restarts": (lambda o: _jobset(o)["spec"]["failurePolicy"].update(maxRestarts=0),
                        "failurePolicy.maxRestarts=0"),
        "action": (lambda o: _jobset(o)["spec"]["failurePolicy"]["rules"][0].update(action="Restart"),
                   "jobSetFailurePolicyAction='Restart'"),
        "nnodes": (lambda o: spec(o).update(completions=5, parallelism=5), "--nnodes=8 but completions=5"),
        "pod hardening": (lambda o: spec(o)["template"]["spec"]["containers"][0]["securityContext"].update(
            allowPrivilegeEscalation=True), "container 'trainer': allowPrivilegeEscalation is not false"),
    }


@pytest.mark.parametrize("name", sorted(_jobset_mutations()))
def test_each_jobset_rule_catches_its_violation(name, config_file):
    assert_rule_catches("jobset", config_file, *_jobset_mutations()[name])


@pytest.mark.parametrize("overlay, kind", [("dev", "Job"), ("jobset", "JobSet"), ("kubeflow", "TrainJob")])
def test_queue_labels_the_workload_and_creates_it_suspended(overlay, kind, config_file):
    objects = render(RenderParams(overlay=overlay, config=config_file, queue="team-a"))
    workload = find(objects, kind, "crescent-train")
    assert workload["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert workload["spec"]["suspend"] is True
    queued = [o["kind"] for o in objects if "kueue.x-k8s.io/queue-name" in o["metadata"].get("labels", {})]
    assert queued == [kind]  # the data and eval Jobs are not training: not queued
    if kind != "Job":
        assert crd_errors(workload) == []
    plain = find(render(RenderParams(overlay=overlay, config=config_file)), kind, "crescent-train")
    assert "kueue.x-k8s.io/queue-name" not in plain["metadata"].get("labels", {})
    assert "suspend" not in plain["spec"]


@pytest.mark.parametrize("queue", ["Team-A", "-a", "a" * 64, "team a"])
def test_bad_queue_name_is_refused(queue):
    with pytest.raises(RenderError, match=f"queue={queue!r}: a LocalQueue name is lowercase letters"):
        RenderParams(queue=queue)


def test_render_cli_queue_flag(config_file, capsys):
    import yaml

    from app.commands.k8s import main

    assert main(["render", "--overlay", "jobset", "--config", config_file, "--queue", "team-a"]) == 0
    jobset = _jobset(list(yaml.safe_load_all(capsys.readouterr().out)))
    assert jobset["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a" and jobset["spec"]["suspend"]


def test_crd_schema_rejects_what_the_controller_would(config_file):
    objects = render(RenderParams(overlay="kubeflow", config=config_file))
    runtime = copy.deepcopy(find(objects, "TrainingRuntime", "crescent-torch"))
    runtime["spec"]["mlPolicy"]["torch"]["numProcPerNode"] = 8  # removed in Trainer v2.2
    assert crd_errors(runtime) == [
        "spec.mlPolicy.torch: Additional properties are not allowed ('numProcPerNode' was unexpected)"]
    jobset = copy.deepcopy(_jobset(render(RenderParams(overlay="jobset", config=config_file))))
    jobset["spec"]["failurePolicy"]["restartStrategy"] = "Sometimes"
    job_specs(jobset)[0]["template"]["spec"]["containers"][0]["gpus"] = 1
    errors = crd_errors(jobset)
    assert "spec.failurePolicy.restartStrategy: 'Sometimes' is not one of ['Recreate', 'BlockingRecreate', " \
           "'InPlaceRestart']" in errors
    assert any(e.startswith("spec.replicatedJobs.0.template.spec.template.spec.containers.0: Additional "
                            "properties are not allowed ('gpus'") for e in errors), errors
