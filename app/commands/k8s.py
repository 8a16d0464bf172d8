"""`crescent k8s render|submit|status|logs|delete`: Kubernetes jobs from the overlays in k8s/.

    crescent k8s render --overlay prod --nodes 8 --gpus-per-node 8 --image REG/crescent/train:0.1.0 > run.yaml
    crescent k8s render --overlay jobset --queue team-a      # a JobSet, queued in Kueue's LocalQueue team-a
    crescent k8s submit --overlay prod --nodes 8            # server-side apply with the kubernetes client
    crescent k8s status --watch                              # Job progress until it completes or fails
    crescent k8s status --kind JobSet                        # the jobset overlay's workload (kubeflow: TrainJob)
    crescent k8s logs --index 0 --follow                     # stream a node's log
    crescent k8s delete                                      # the training Job and its pods

Errors (bad parameters, no cluster configured, API server unreachable) print one line and exit 1 or 2.
"""
from __future__ import annotations

import argparse
import sys

from app.k8s.render import RenderError, RenderParams, render, to_yaml


def _add_render_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overlay", default="dev", help="dev, prod, or a kustomization directory (default: dev)")
    p.add_argument("--nodes", type=int, help="training nodes (Job completions = parallelism = torchrun --nnodes)")
    p.add_argument("--gpus-per-node", type=int, help="GPUs per node = processes per node; 0 trains on CPU")
    p.add_argument("--cpu-procs-per-node", type=int, default=1, help="processes per node when --gpus-per-node 0")
    p.add_argument("--image", help="training/data image, pinned (REGISTRY/crescent/train:TAG)")
    p.add_argument("--eval-image", help="evaluation image, pinned")
    p.add_argument("--config", help="training config: a name in app/configs/ (tiny-cpu, ...) or a YAML path")
    p.add_argument("--data-slices", type=int, help="data-build Job completions (slices of the sources)")
    p.add_argument("--max-restarts", type=int, default=3,
                   help="whole-group restarts (JobSet maxRestarts; an Indexed Job's backoffLimit = this x nodes)")
    p.add_argument("--queue", help="Kueue LocalQueue: label the training workload with kueue.x-k8s.io/queue-name "
                                   "and create it suspended until Kueue admits all its pods")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra training override, passed as --KEY VALUE to `crescent train` (repeatable)")


def _params(args: argparse.Namespace) -> RenderParams:
    overrides = []
    for item in args.overrides:
        if "=" not in item:
            raise RenderError(f"--set {item!r}: expected KEY=VALUE (e.g. trainer.max_steps=100)")
        key, value = item.split("=", 1)
        overrides.append((key, value))
    return RenderParams(overlay=args.overlay, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                        cpu_procs_per_node=args.cpu_procs_per_node, image=args.image, eval_image=args.eval_image,
                        config=args.config, data_slices=args.data_slices, max_restarts=args.max_restarts,
                        train_overrides=overrides, queue=args.queue)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crescent k8s", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("render", help="print the objects of an overlay with this run's parameters (YAML)")
    _add_render_args(p)
    p.add_argument("--output", "-o", help="write to this file instead of stdout")
    p.add_argument("--experiment", metavar="SPEC", help="render an experiment's grid instead (app/experiments/k8s.py): "
                   "an Indexed Job over its static points and the report Job; --config then sets its base config")
    p.add_argument("--size", default="gpu", choices=["cpu", "gpu"], help="the experiment's size (default gpu)")
    p.add_argument("--parallelism", type=int, help="experiment points running at once (default: all)")
    p.add_argument("--experiment-key", help="names the experiment's parent run (default NAME-SIZE-k8s)")
    for name, help_ in (("submit", "server-side apply the rendered objects"),
                        ("status", "the training workload's progress and its pods"),
                        ("logs", "a training pod's log"),
                        ("delete", "delete the training Job (and, with --all, everything rendered but volumes)")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, in-cluster)")
        p.add_argument("--context", help="kubeconfig context")
        p.add_argument("--namespace", default="crescent")
        p.add_argument("--request-timeout", type=float, default=10.0, help="seconds per API request")
        if name in ("submit", "delete"):
            _add_render_args(p)
        if name == "submit":
            p.add_argument("--wait", action="store_true", help="then follow the Job until it ends")
            p.add_argument("--only", choices=["train", "data", "eval", "mlflow"],
                           help="apply one component's objects only (no namespace/RBAC: for the submitter Role)")
        if name in ("status", "logs", "delete"):
            p.add_argument("--kind", default="Job",
                           help="the training workload's kind: Job (dev, prod), JobSet (jobset), TrainJob "
                                "(kubeflow), or any kind the API server serves (Kind.group if ambiguous)")
        if name == "status":
            p.add_argument("--watch", action="store_true", help="follow until it completes or fails")
            p.add_argument("--job", default="crescent-train", help="the workload's name")
        if name == "logs":
            p.add_argument("--job", default="crescent-train", help="the workload's name")
            p.add_argument("--index", type=int, default=0, help="completion index (node) whose log to show")
            p.add_argument("--follow", "-f", action="store_true")
            p.add_argument("--tail", type=int, help="only the last N lines")
        if name == "delete":
            p.add_argument("--all", action="store_true", help="every rendered object except volumes and namespace")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.action == "render":
            if args.experiment:
                from app.experiments.k8s import experiment_objects

                gpus = 1 if args.gpus_per_node is None else args.gpus_per_node
                objects = experiment_objects(args.experiment, args.size, _params(args), args.parallelism, gpus,
                                             args.experiment_key)
            else:
                objects = render(_params(args))
            text = to_yaml(objects)
            if args.output:
                with open(args.output, "w") as f:
                    f.write(text)
            else:
                sys.stdout.write(text)
            return 0
        from app.k8s import actions  # the kubernetes client is imported only when a cluster is involved

        needs_render = args.action == "submit" or (args.action == "delete" and args.all)
        return actions.run(args, _params(args) if needs_render else None)
    except RenderError as err:
        print(f"crescent k8s {args.action}: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 -- cluster errors become one clear line, not a traceback
        from app.k8s.submit import ClusterError, describe_error

        message = str(err) if isinstance(err, ClusterError) else describe_error(err)
        if message is None:
            raise
        print(f"crescent k8s {args.action}: {message}", file=sys.stderr)
        return 1
