"""Builds the one optimizer Lightning gets: Muon (+AdamW groups) or AdamW alone, matched to the strategy.

Which Muon runs is the strategy's choice (`Strategy.muon_variant`): the single-device class, the ZeRO-1 class
for `muon_ddp`, or the DTensor class for `muon_fsdp`. `model.muon_granularity: head` orthogonalizes the attention
projections one head's block at a time (AdamW alone has no matrices to split).
"""
from __future__ import annotations

import torch

from components.optim import DTensorMuon, ZeroOneMuon, build_muon

# Strategy.muon_variant -> optimizer class; None: `Muon`, or `DTensorMuon` when the parameters are DTensors.
MUON_VARIANTS = {"single": None, "zero1": ZeroOneMuon, "dtensor": DTensorMuon}


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
                      scale_mode=h.scale_mode, update_rms=h.update_rms, ns_dtype=h.ns_dtype,
                      muon_granularity=h.muon_granularity)
    variant = getattr(strategy, "muon_variant", "single")
    if variant not in MUON_VARIANTS:
        raise ValueError(f"strategy {type(strategy).__name__}: muon_variant={variant!r} is unknown; choose one of "
                         f"{sorted(MUON_VARIANTS)}")
    return build_muon(module.model, lr=lr, weight_decay=h.weight_decay, norm_weight_decay=norm_wd,
                      overrides=overrides, optimizer_cls=MUON_VARIANTS[variant], adamw_betas=tuple(h.adamw_betas),
                      adamw_eps=h.adamw_eps, **kwargs)
