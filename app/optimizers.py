"""Builds the one optimizer Lightning gets: Muon (+AdamW groups) or AdamW alone, matched to the strategy.

Which Muon runs is the strategy's choice (`Strategy.muon_variant`): the single-device class, the ZeRO-1 class
for `muon_ddp`, or the same class over DTensor parameters for `muon_fsdp`.
"""
from __future__ import annotations

import torch

from components.optim.routing import build_muon


def make_optimizer(module, strategy) -> torch.optim.Optimizer:
    h = module.hparams
    lr = module.schedule.at(module.tokens_seen).lr * h.lr_scale
    norm_wd = None if h.norm_weight_decay else 0.0
    if h.optimizer == "adamw":
        # AdamW alone (the paper's baseline): the same class with every parameter routed to its AdamW path,
        # so telemetry, non-finite handling and checkpoint format are the same as Muon's.
        overrides = {"*": "adamw"}
        kwargs = {}
    else:
        overrides = None
        kwargs = dict(momentum=h.momentum, ns_steps=h.ns_steps, ns_coefficients=h.ns_coefficients,
                      scale_mode=h.scale_mode, ns_dtype=h.ns_dtype)
    variant = getattr(strategy, "muon_variant", "single")
    optimizer_cls = None
    if variant == "zero1":
        from components.optim.zero1 import ZeroOneMuon

        optimizer_cls = ZeroOneMuon
    return build_muon(module.model, lr=lr, weight_decay=h.weight_decay, norm_weight_decay=norm_wd,
                      overrides=overrides, optimizer_cls=optimizer_cls, adamw_betas=tuple(h.adamw_betas),
                      adamw_eps=h.adamw_eps, **kwargs)
