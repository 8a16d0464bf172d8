"""Which parameters Muon orthogonalizes and which AdamW updates (Moonlight §2.3, §4 "not all parameters are Muon").

Hidden matrices, the router and stacked 3-D expert weights → Muon; token embeddings, the LM head, norms,
biases and every other < 2-D tensor → AdamW. Norm weights get weight decay too by default (App. D: crucial).
With `muon_granularity='head'` the attention projections form a group 'muon_heads' whose matrices Muon
orthogonalizes one head's block at a time (head_blocks.py).
"""
from __future__ import annotations

import fnmatch

from torch import nn
from torch.distributed.tensor import DTensor

from components.optim.dtensor import DTensorMuon
from components.optim.head_blocks import GRANULARITIES, attention_head_blocks
from components.optim.muon import Muon

ROUTES = ("muon", "adamw")


def _named(model_or_named_params) -> list[tuple[str, nn.Parameter]]:
    if isinstance(model_or_named_params, nn.Module):
        return [(n, p) for n, p in model_or_named_params.named_parameters() if p.requires_grad]
    return list(model_or_named_params)


def _embedding_names(model) -> set[str]:
    """Names of nn.Embedding weights and of the output projection (LM head) when `model` is a module."""
    if not isinstance(model, nn.Module):
        return set()
    names = set()
    for mod_name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            names.add(f"{mod_name}.weight" if mod_name else "weight")
    head = getattr(model, "lm_head", None)
    if isinstance(head, nn.Linear):
        names.add("lm_head.weight")
    return names


def is_embedding_or_head(name: str) -> bool:
    leaf = name.lower()
    return "embed" in leaf or "lm_head" in leaf


def is_norm_or_bias(name: str, ndim: int) -> bool:
    leaf = name.lower()
    return ndim < 2 and ("norm" in leaf or leaf.endswith("bias") or leaf.endswith("ln.weight"))


def route_parameters(model_or_named_params, overrides: dict[str, str] | None = None) -> dict[str, str]:
    """{name: 'muon' | 'adamw'} for every trainable parameter.

    `overrides` maps a name or glob pattern to a route; forcing a < 2-D parameter onto Muon raises ValueError.
    """
    named = _named(model_or_named_params)
    embeddings = _embedding_names(model_or_named_params)
    routes: dict[str, str] = {}
    for name, p in named:
        matrix = p.ndim >= 2  # DTensor reports the global shape, so a sharded matrix is still a matrix
        routes[name] = "muon" if matrix and name not in embeddings and not is_embedding_or_head(name) else "adamw"
    for pattern, route in (overrides or {}).items():
        if route not in ROUTES:
            raise ValueError(f"routing override {pattern!r}: route={route!r} must be one of {ROUTES}")
        matched = [n for n in routes if n == pattern or fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            raise ValueError(f"routing override {pattern!r} matches no parameter")
        for name in matched:
            routes[name] = route
    shapes = {n: p.shape for n, p in named}
    for name, route in routes.items():
        if route == "muon" and len(shapes[name]) < 2:
            raise ValueError(f"routing: parameter {name!r} has shape {tuple(shapes[name])} (< 2 dims) and cannot be "
                             "assigned to Muon; route it to 'adamw'")
    return routes


def build_param_groups(model_or_named_params, lr: float | None = None, weight_decay: float | None = None,
                       norm_weight_decay: float | None = None, overrides: dict[str, str] | None = None,
                       head_blocks: dict[str, tuple[int, int]] | None = None) -> list[dict]:
    """Param groups for `Muon`: 'muon' (matrices), 'muon_heads' (the Muon matrices named in `head_blocks`, with
    their block specs), 'adamw' (embeddings, head, other tensors), and 'adamw_norm' (norms and biases) when
    `norm_weight_decay` differs from `weight_decay`. Groups carry `param_names`.
    """
    named = _named(model_or_named_params)
    routes = route_parameters(model_or_named_params, overrides)
    head_blocks = head_blocks or {}
    buckets: dict[str, list[tuple[str, nn.Parameter]]] = {"muon": [], "muon_heads": [], "adamw": [],
                                                          "adamw_norm": []}
    for name, p in named:
        if routes[name] == "muon":
            buckets["muon_heads" if name in head_blocks else "muon"].append((name, p))
        elif norm_weight_decay is not None and is_norm_or_bias(name, p.ndim):
            buckets["adamw_norm"].append((name, p))
        else:
            buckets["adamw"].append((name, p))
    groups = []
    for key, items in buckets.items():
        if not items:
            continue
        group = {"params": [p for _, p in items], "param_names": [n for n, _ in items], "name": key,
                 "algorithm": "muon" if key.startswith("muon") else "adamw"}
        if key == "muon_heads":
            group["blocks"] = [tuple(head_blocks[n]) for n, _ in items]
        if lr is not None:
            group["lr"] = lr
        if weight_decay is not None:
            group["weight_decay"] = weight_decay
        if key == "adamw_norm":
            group["weight_decay"] = norm_weight_decay
        groups.append(group)
    return groups


def format_routing_table(model_or_named_params, routes: dict[str, str] | None = None) -> str:
    """A plain-text table: name, shape, parameters, route; then totals per route."""
    named = _named(model_or_named_params)
    routes = routes or route_parameters(model_or_named_params)
    width = max([len(n) for n, _ in named] + [9])
    lines = [f"{'parameter':<{width}}  {'shape':<20} {'numel':>12}  route", "-" * (width + 44)]
    totals = {r: 0 for r in ROUTES}
    for name, p in named:
        lines.append(f"{name:<{width}}  {str(tuple(p.shape)):<20} {p.numel():>12,}  {routes[name]}")
        totals[routes[name]] += p.numel()
    lines.append("-" * (width + 44))
    for route, count in totals.items():
        lines.append(f"{'total ' + route:<{width}}  {'':<20} {count:>12,}")
    return "\n".join(lines)


def build_muon(model: nn.Module, lr: float, weight_decay: float = 0.1, norm_weight_decay: float | None = None,
               overrides: dict[str, str] | None = None, optimizer_cls=None, print_routing: bool = False,
               muon_granularity: str = "matrix", **kwargs):
    """Route `model`'s parameters and build one optimizer: `optimizer_cls` (e.g. `ZeroOneMuon` for ZeRO-1), by
    default `DTensorMuon` when the parameters are DTensors (FSDP2), else `Muon`. `muon_granularity`: 'matrix'
    (each attention projection one matrix) or 'head' (one matrix per head's block, Kimi K3).

    scale_mode='baseline' takes H from `model.config.hidden_size` unless `scale_hidden_size` is given.
    """
    if optimizer_cls is None:
        sharded = any(isinstance(p, DTensor) for p in model.parameters())
        optimizer_cls = DTensorMuon if sharded else Muon
    if kwargs.get("scale_mode") == "baseline" and kwargs.get("scale_hidden_size") is None:
        kwargs["scale_hidden_size"] = getattr(getattr(model, "config", None), "hidden_size", None)
    if muon_granularity not in GRANULARITIES:
        raise ValueError(f"muon_granularity={muon_granularity!r} is unknown; choose one of {GRANULARITIES}")
    blocks = attention_head_blocks(model) if muon_granularity == "head" else None
    groups = build_param_groups(model, lr, weight_decay, norm_weight_decay, overrides, blocks)
    if print_routing:
        print(format_routing_table(model))
    return optimizer_cls(groups, lr=lr, weight_decay=weight_decay, **kwargs)

