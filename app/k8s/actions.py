"""`crescent k8s submit|status|logs|delete` against a cluster: apply (submit.py), then follow (status.py)."""
from __future__ import annotations

from app.k8s import status
from app.k8s.render import TRAIN_JOB, RenderParams, render, training_workload
from app.k8s.submit import (
    POSTGRES_SECRET,
    apply,
    delete,
    dynamic_client,
    ensure_postgres_secret,
    load_client,
    select,
)


def run(args, params: RenderParams | None) -> int:
    """The cluster side of `crescent k8s` (argparse namespace from app.commands.k8s)."""
    objects = render(params) if params is not None else []
    if args.action == "submit":
        objects = select(objects, getattr(args, "only", None))
    dyn = dynamic_client(load_client(args.kubeconfig, args.context))
    timeout = args.request_timeout
    if args.action == "submit":
        namespaces = [o for o in objects if o["kind"] == "Namespace"]
        apply(dyn, namespaces, timeout)  # the Secret below lives in it
        if POSTGRES_SECRET in str(objects):
            ensure_postgres_secret(dyn, args.namespace, timeout)
        apply(dyn, [o for o in objects if o["kind"] != "Namespace"], timeout)
        if not args.wait:
            return 0
        return status.follow(dyn, args.namespace, training_workload(objects)["kind"], TRAIN_JOB, True, timeout)
    if args.action == "status":
        return status.follow(dyn, args.namespace, args.kind, args.job, args.watch, timeout)
    if args.action == "logs":
        return status.stream_logs(dyn, args.namespace, args.kind, args.job, args.index, args.follow, args.tail,
                                  timeout)
    if args.action == "delete":
        delete(dyn, objects, args.all, args.namespace, args.kind, timeout)
        return 0
    raise ValueError(f"unknown action {args.action!r}")
