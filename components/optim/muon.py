"""Muon with AdamW groups in one optimizer (Moonlight §2, Eqs. 1–4; AdamW shares η and λ as in the paper).

Groups carry `algorithm: 'muon' | 'adamw'`. Muon groups hold matrices and stacks of matrices ([E, A, B]: one matrix
per expert); NS runs once per `step()` whatever the gradient accumulation. A parameter whose gradient is None is
skipped; so is a Muon matrix (one expert of a stack) whose gradient is exactly zero — an expert that got no tokens —
so neither its momentum nor its weights move. Non-finite gradients either skip the whole step (counted in
`skipped_steps`) or raise. After each step `last_stats` holds update/weight RMS per group and NS time.

A Muon group may carry `blocks` (one spec or None per parameter, head_blocks.py): such a 2-D parameter steps
as a stack of per-head blocks (Kimi K3), through the same matrix step.

`muon_matrix_step` is the one Muon matrix step (momentum + Nesterov, NS, update scale, decoupled weight decay,
per-matrix telemetry). The distributed paths are subclasses that call it or its pieces and differ only in
communication: `ZeroOneMuon` (zero1.py, ZeRO-1 over DDP) and `DTensorMuon` (dtensor.py, FSDP2 parameters).
"""
from __future__ import annotations

import contextlib

import torch
from torch.distributed.tensor import DTensor

from components.optim.head_blocks import block_view, check_block_spec
from components.optim.newton_schulz import NS_METHODS, newton_schulz, resolve_coefficients, resolve_dtype
from components.optim.telemetry import StepStats
from components.optim.update import (
    SCALE_MODES,
    adamw_step,
    apply_orthogonal,
    momentum_step,
    update_scale,
)
from components.optim.zero1_layout import sent_bytes

ALGORITHMS = ("muon", "adamw")
NONFINITE_POLICIES = ("skip", "raise")
# Codes of the per-matrix gradient summary: no gradient (None, or an all-zero Muon matrix), finite, non-finite.
NO_GRAD, FINITE, NONFINITE = 0.0, 1.0, 2.0


def local(t: torch.Tensor) -> torch.Tensor:
    """The rank-local tensor of a DTensor (shares storage), the tensor itself otherwise."""
    return t._local_tensor if isinstance(t, DTensor) else t


def num_matrices(p: torch.Tensor) -> int:
    n = 1
    for d in p.shape[:-2]:
        n *= d
    return n


class Muon(torch.optim.Optimizer):
    """Moonlight's Muon for matrices plus AdamW for the rest, sharing lr and weight decay.

    Args mirror the paper: momentum μ=0.95 (sum form) with Nesterov, 5 NS steps with the fixed quintic in bf16,
    scale_mode 'moonlight' (update_rms·sqrt(max(A, B)), update_rms 0.2: the update's RMS), AdamW betas (0.9, 0.95), eps 1e-8. ns_method 'gram'/'auto'
    switches rectangular matrices to Gram Newton–Schulz (same polynomial, fewer FLOPs; see newton_schulz.py).
    """

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5, ns_coefficients="quintic",
                 ns_dtype: torch.dtype | str = torch.bfloat16, ns_eps: float = 1e-7, ns_method: str = "standard",
                 scale_mode: str = "moonlight", update_rms: float = 0.2,
                 scale_hidden_size: int | None = None, adamw_betas: tuple[float, float] = (0.9, 0.95),
                 adamw_eps: float = 1e-8, nonfinite: str = "skip", telemetry: bool = True):
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite={nonfinite!r} is unknown; choose one of {NONFINITE_POLICIES}")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        ns_coefficients=ns_coefficients, ns_dtype=ns_dtype, ns_eps=ns_eps, ns_method=ns_method,
                        scale_mode=scale_mode, update_rms=update_rms,
                        scale_hidden_size=scale_hidden_size, adamw_betas=tuple(adamw_betas), adamw_eps=adamw_eps,
                        algorithm="muon", skipped_steps=0)
        self._constructed: list[dict] = []  # each group's settings as built (add_param_group appends)
        super().__init__(params, defaults)
        self.nonfinite = nonfinite
        self.telemetry = telemetry
        self.last_stats: dict[str, float] = {}
        self.comm = None  # a CountingComm on the distributed paths (set by their _init_state): bytes in `comm.last`
        self._init_state()
        self.register_load_state_dict_post_hook(_fill_group_defaults)

    # ----------------------------------------------------------------------------------------- construction
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        validate_group(self.param_groups[-1])
        self._check_placement(self.param_groups[-1])
        self._constructed.append(_settings(self.param_groups[-1]))

    def use_constructed_settings(self) -> list[str]:
        """Every group's hyperparameters back to what this optimizer was built with, keeping the run's state
        (`GROUP_STATE_KEYS`). `load_state_dict` takes the saved groups' settings, as torch's optimizers do; a
        trainer that resumes with a changed config calls this after loading, so the config's weight decay,
        momentum, NS steps, ... take effect. Returns one 'group NAME key: saved -> now' per change."""
        changes = []
        for i, (group, settings) in enumerate(zip(self.param_groups, self._constructed)):
            for key, value in settings.items():
                if key not in group or group[key] != value:
                    changes.append(f"group {settings.get('name', i)} {key}: {group.get(key, '(none)')!r} -> "
                                   f"{value!r}")
            group.update(settings)
        return changes

    def _check_placement(self, group: dict) -> None:
        """Plain tensors only: a DTensor's local shard is not a whole matrix, so NS on it would be wrong."""
        for p, name in zip(group["params"], param_names(group)):
            if isinstance(p, DTensor):
                raise ValueError(f"Muon: parameter {name!r} is a DTensor (FSDP2); use DTensorMuon from "
                                 "components.optim.dtensor (build_muon picks it for DTensor parameters)")

    def _init_state(self) -> None:
        """Eager, rank-symmetric state (same keys for every parameter from the start) so DCP can save it."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if state:
                    continue
                if group["algorithm"] == "muon":
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                else:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    @property
    def comm_bytes(self) -> dict[str, int]:
        """Bytes this rank sent per collective in the last step (empty on a single device)."""
        return dict(self.comm.last) if self.comm is not None else {}

    # ----------------------------------------------------------------------------------------- the step
    @torch.no_grad()
    def step(self, closure=None, skip: bool = False):
        """The gradient summary (a non-finite gradient skips the step or raises), the update, the telemetry.
        `skip=True`: the caller has found the step must not update (a non-finite loss, agreed by every rank):
        nothing is read or updated, no collective runs, and the step counts as skipped as one with a non-finite
        gradient does (so a trainer's step counter advances the same way for both)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if skip:
            self._count_skipped()
            return loss
        if self.comm is not None:
            self.comm.new_step()
        codes = self._grad_codes()
        if not self._handle_nonfinite(codes):
            stats = StepStats()
            self._update(codes, stats)
            self._finish_stats(stats)
        return loss

    def _update(self, codes: dict, stats: StepStats) -> None:
        """Every group's update; what a distributed subclass does differently (ZeRO-1's flat shards) goes here."""
        for group in self.param_groups:
            stats.ensure(group_key(group), local(group["params"][0]).device if group["params"] else "cpu")
            if group["algorithm"] == "muon":
                self._muon_group_step(group, codes, stats)
            else:
                self._adamw_group_step(group, codes, stats)

    def _muon_group_step(self, group: dict, codes: dict, stats: StepStats) -> None:
        for p, spec in zip(group["params"], group_blocks(group)):
            active = codes[p] == FINITE
            if p.grad is None or not bool(active.any()):
                continue
            buf = self.state[p]["momentum_buffer"]
            muon_matrix_step(block_view(p, spec), block_view(p.grad, spec), block_view(buf, spec), active, group,
                             stats, self.telemetry)

    def _adamw_group_step(self, group: dict, codes: dict, stats: StepStats) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None or float(codes[p][0]) == NO_GRAD:
                continue
            state = self.state[p]
            state["step"] += 1
            params.append(local(p))
            grads.append(local(p.grad))
            exp_avgs.append(local(state["exp_avg"]))
            exp_avg_sqs.append(local(state["exp_avg_sq"]))
            steps.append(float(state["step"]))
        squares = adamw_step(params, grads, exp_avgs, exp_avg_sqs, steps, group["lr"], group["weight_decay"],
                             group["adamw_betas"], group["adamw_eps"], want_update=self.telemetry)
        if self.telemetry:
            n = sum(p.numel() for p in params)
            stats.add_squares(group_key(group), squares[0].sum(), n, squares[1].sum(), n)

    # ----------------------------------------------------------------------------------------- gradient summary
    def _grad_codes(self) -> dict[torch.Tensor, torch.Tensor]:
        """Per parameter, one code per matrix (Muon) or one per tensor (AdamW): NO_GRAD / FINITE / NONFINITE.

        One host sync for the whole model; distributed subclasses all-reduce (MAX) the same vector.
        """
        order, pieces = [], []
        for group in self.param_groups:
            for p in group["params"]:
                n = num_matrices(p) if group["algorithm"] == "muon" else 1
                order.append((p, n))
                pieces.append(self._local_codes(p, group["algorithm"], n))
        flat = self._reduce_codes(torch.cat(pieces).cpu() if pieces else torch.zeros(0))
        out, offset = {}, 0
        for p, n in order:
            out[p] = flat[offset:offset + n]
            offset += n
        return out

    def _local_codes(self, p: torch.Tensor, algorithm: str, n: int) -> torch.Tensor:
        """This rank's n codes of p. A rank holding only some of p's matrices (`_matrix_range`) leaves the others
        NO_GRAD; the distributed paths MAX-reduce, so a matrix is NONFINITE if any rank saw it so."""
        device = local(p).device
        if p.grad is None:
            return torch.full((n,), NO_GRAD, device=device)
        g = local(p.grad)
        first, last = self._matrix_range(p, algorithm, n)
        if algorithm == "muon":
            amax = max_abs(g, per_matrix=True) if g.numel() else g.new_zeros(last - first)
            code = torch.where(amax > 0, FINITE, NO_GRAD)
        else:
            amax = max_abs(g) if g.numel() else g.new_zeros(1)
            code = torch.full_like(amax, FINITE)
        mine = torch.where(torch.isfinite(amax), code, NONFINITE).float()
        if (first, last) == (0, n):
            return mine
        codes = torch.full((n,), NO_GRAD, device=device)
        codes[first:last] = mine
        return codes

    def _matrix_range(self, p: torch.Tensor, algorithm: str, n: int) -> tuple[int, int]:
        """[first, last) of p's n codes this rank computes: all of them on one device."""
        return 0, n

    def _reduce_codes(self, codes: torch.Tensor) -> torch.Tensor:
        if self.comm is None:
            return codes
        codes = codes.to(local(self.param_groups[0]["params"][0]).device)
        self.comm.all_reduce("all_reduce_grad_codes", codes, op=torch.distributed.ReduceOp.MAX)
        return codes.cpu()

    def _handle_nonfinite(self, codes: dict) -> bool:
        bad = [p for p, c in codes.items() if bool((c == NONFINITE).any())]
        if not bad:
            return False
        names = self._param_names()
        where = ", ".join(names.get(p, f"param #{i}") for i, p in enumerate(bad[:3]))
        if self.nonfinite == "raise":
            raise FloatingPointError(f"Muon: non-finite gradient in {len(bad)} parameter(s), e.g. {where}; "
                                     "nothing was updated (set nonfinite='skip' to skip such steps)")
        self._count_skipped()
        return True

    def _count_skipped(self) -> None:
        for group in self.param_groups:
            group["skipped_steps"] += 1
        self.last_stats = {"skipped_steps": float(self.param_groups[0]["skipped_steps"]), "nonfinite": 1.0,
                           "ns_seconds": 0.0}

    def _param_names(self) -> dict:
        out = {}
        for group in self.param_groups:
            for p, name in zip(group["params"], group.get("param_names", [])):
                out[p] = name
        return out

    def _finish_stats(self, stats: StepStats) -> None:
        """`last_stats` of a step that ran; summed over ranks (one small all-reduce, counted) when distributed."""
        extra = {"skipped_steps": float(self.param_groups[0]["skipped_steps"]), "nonfinite": 0.0}
        if not self.telemetry:
            self.last_stats = {"ns_seconds": stats.ns_seconds, **extra}
            return
        if self.comm is None:
            self.last_stats = stats.finish(extra=extra)
            return
        self.last_stats = stats.finish(self.comm.group, True, extra)
        if stats.reduced_bytes:
            self.comm.count("all_reduce_telemetry", sent_bytes("all_reduce", stats.reduced_bytes,
                                                               self.comm.world_size))


# Group entries that are the run's state, not its settings: what a checkpoint restores and a config does not set.
GROUP_STATE_KEYS = ("params", "param_names", "lr", "skipped_steps")


def _settings(group: dict) -> dict:
    return {k: v for k, v in group.items() if k not in GROUP_STATE_KEYS}


# Group settings added after checkpoints were first written, with the value every step used before they existed.
SETTINGS_BEFORE_THEY_EXISTED = {"update_rms": 0.2}


def _fill_group_defaults(optimizer: Muon) -> None:
    """A state dict saved before a group setting existed loads with the value that was in effect then (saved
    groups replace the constructor's, as torch's load_state_dict does for every hyperparameter)."""
    for group in optimizer.param_groups:
        for key, value in SETTINGS_BEFORE_THEY_EXISTED.items():
            group.setdefault(key, value)


def max_abs(g: torch.Tensor, per_matrix: bool = False) -> torch.Tensor:
    """max |g| as a 1-D tensor (one value per matrix [..., A, B] when `per_matrix`), NaN where g holds a NaN: the
    inf norm, exactly, from min and max (vectorized passes; linalg.vector_norm(ord=inf) is ~10x slower on CPU)."""
    if per_matrix and g.ndim > 2:
        return torch.maximum(g.amax(dim=(-2, -1)), g.amin(dim=(-2, -1)).neg()).reshape(-1)
    lo, hi = torch.aminmax(g)
    return torch.maximum(hi, lo.neg()).reshape(1)


# --------------------------------------------------------------------------------------------- the matrix step
def muon_matrix_step(weight: torch.Tensor, grad: torch.Tensor, momentum_buffer: torch.Tensor, active: torch.Tensor,
                     group: dict, stats: StepStats, telemetry: bool = True) -> None:
    """One Muon step (Eqs. 1–4) of a matrix [A, B] or a stack [..., A, B] held whole by this rank (local tensors).

    `active` (bool, one per matrix) marks the matrices that got a gradient; the others (experts without tokens)
    keep their momentum and weights. Telemetry counts the active matrices' updates and the whole weight.
    """
    keep = None if bool(active.all()) else (~active).to(weight.device).view(*weight.shape[:-2], 1, 1)
    x = momentum_step(momentum_buffer, grad, group["momentum"], group["nesterov"], keep,
                      out=ns_input_buffer(weight, group))
    if not x.numel():  # a rank that holds no matrix of this stack
        return
    o, scale = orthogonal_update(x, group, stats, overwrite_input=True)
    squares = apply_orthogonal(weight, o, scale, group["lr"], group["weight_decay"], keep,
                               squares=telemetry and keep is None)
    if not telemetry:
        return
    if squares is not None:
        stats.add_squares(group_key(group), squares[0], o.numel(), squares[1], weight.numel())
    else:
        rows = active.to(weight.device).view(weight.shape[:-2])
        stats.add(group_key(group), o[rows], weight, scale[rows] if isinstance(scale, torch.Tensor) else scale)


def orthogonal_update(x: torch.Tensor, group: dict, stats: StepStats | None = None, overwrite_input: bool = False
                      ) -> tuple[torch.Tensor, float | torch.Tensor]:
    """(O, s): O = NS(x) of whole matrices and the update scale s (a tensor, one per matrix, for update_norm)."""
    o = orthogonalize(x, group, stats, overwrite_input)
    return o, update_scale(group["scale_mode"], x.shape, o, group["scale_hidden_size"], group["update_rms"])


def ns_input_buffer(weight: torch.Tensor, group: dict) -> torch.Tensor:
    """An empty NS input shaped like `weight`, in the group's NS dtype, stored in NS's wide orientation (a tall
    matrix gets the transpose of a row-major wide buffer), so NS can start on it without converting or copying."""
    dtype = resolve_dtype(group["ns_dtype"])
    if weight.shape[-2] > weight.shape[-1]:
        return torch.empty((*weight.shape[:-2], weight.shape[-1], weight.shape[-2]), dtype=dtype,
                           device=weight.device).mT
    return torch.empty(weight.shape, dtype=dtype, device=weight.device)


def orthogonalize(x: torch.Tensor, group: dict, stats: StepStats | None = None,
                  overwrite_input: bool = False) -> torch.Tensor:
    """O = NS(x) in the group's NS dtype (steps, coefficients, eps), timed into `stats`; `overwrite_input` lets NS
    start in x's memory (a private NS input from `ns_input_buffer`)."""
    ns_dtype = resolve_dtype(group["ns_dtype"])
    with stats.timing_ns(x.device) if stats is not None else contextlib.nullcontext():
        return newton_schulz(x, steps=group["ns_steps"], coefficients=group["ns_coefficients"], dtype=ns_dtype,
                             eps=group["ns_eps"], out_dtype=ns_dtype, method=group["ns_method"],
                             overwrite_input=overwrite_input)


def group_key(group: dict) -> str:
    return group.get("name") or group["algorithm"]


def group_blocks(group: dict) -> list:
    """The group's per-parameter head-block specs (None: the parameter is one matrix or a stack as it is)."""
    return group.get("blocks") or [None] * len(group["params"])


def param_names(group: dict) -> list[str]:
    """The group's parameter names, or 'param #i of the group' when it carries none."""
    return group.get("param_names") or [f"param #{i} of the group" for i in range(len(group["params"]))]


def validate_group(group: dict) -> None:
    """ValueError naming the field, its value and what is allowed; Muon parameters must have >= 2 dims."""
    def check(ok: bool, field: str, rule: str) -> None:
        if not ok:
            raise ValueError(f"Muon: {field}={group[field]!r} {rule}")

    check(group["algorithm"] in ALGORITHMS, "algorithm", f"must be one of {ALGORITHMS}")
    check(isinstance(group["lr"], (int, float)) and group["lr"] >= 0, "lr", "must be a number >= 0")
    check(group["weight_decay"] >= 0, "weight_decay", "must be >= 0")
    check(0 <= group["momentum"] < 1, "momentum", "must be in [0, 1)")
    check(isinstance(group["ns_steps"], int) and 0 <= group["ns_steps"] < 100, "ns_steps", "must be an int in [0, 100)")
    check(group["ns_eps"] > 0, "ns_eps", "must be > 0")
    check(group["ns_method"] in NS_METHODS, "ns_method", f"must be one of {NS_METHODS}")
    check(group["scale_mode"] in SCALE_MODES, "scale_mode", f"must be one of {SCALE_MODES}")
    check(isinstance(group["update_rms"], (int, float)) and 0 < group["update_rms"] <= 10, "update_rms",
          "must be a number in (0, 10] (the paper's 0.2)")
    if group["scale_mode"] == "baseline":
        check(isinstance(group["scale_hidden_size"], int) and group["scale_hidden_size"] > 0, "scale_hidden_size",
              "must be the model's hidden size H (a positive int) for scale_mode='baseline'")
    betas = group["adamw_betas"]
    check(len(betas) == 2 and all(0 <= b < 1 for b in betas), "adamw_betas", "must be two numbers in [0, 1)")
    check(group["adamw_eps"] > 0, "adamw_eps", "must be > 0")
    resolve_coefficients(group["ns_coefficients"])
    group["ns_dtype"] = str(resolve_dtype(group["ns_dtype"])).removeprefix("torch.")
    group["adamw_betas"] = tuple(betas)
    if group["algorithm"] == "muon":
        for p, name in zip(group["params"], param_names(group)):
            if p.ndim < 2:
                raise ValueError(f"Muon: parameter {name!r} has shape {tuple(p.shape)} (< 2 dims) and cannot use "
                                 "algorithm='muon'; route it to 'adamw'")
    if group.get("blocks") is not None:
        check(group["algorithm"] == "muon", "algorithm", "must be 'muon' for a group with head blocks")
        check(len(group["blocks"]) == len(group["params"]), "blocks", "must hold one spec (or None) per parameter")
        for p, name, spec in zip(group["params"], param_names(group), group["blocks"]):
            if spec is not None:
                check_block_spec(name, p.shape, spec)
