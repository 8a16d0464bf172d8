"""Per-head Muon granularity (Kimi K3): an attention projection orthogonalized one head's block at a time.

A block spec (axis, heads) splits a matrix [R, C] into `heads` equal blocks: axis 0 by rows (q_proj / q_b_proj
[H·D, in] → [H, D, in]; kv_b_proj [H·(qk_nope + v), r] → [H, qk_nope + v, r]), axis 1 by columns (o_proj
[hidden, H·v] → [H, hidden, v]). `block_view` is a view of the same storage (strided for columns), so the
elementwise parts of the step (momentum, weight decay, the update) write through it, while Newton–Schulz and the
update scale see one matrix per head, as they see one matrix per expert of a stack. The gradient code (skip a
parameter without gradient) stays one per parameter: every block of a stepped parameter steps.

`to_block_order` / `from_block_order` lay a parameter out flat in block order (ZeRO-1's flat buffer keeps each
block contiguous so its matrices can straddle shard boundaries like experts do).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from components.model.attention import MultiHeadLatentAttention

BlockSpec = tuple[int, int]  # (axis, heads)
GRANULARITIES = ("matrix", "head")


def block_shape(shape: Sequence[int], spec: BlockSpec | None) -> tuple[int, ...]:
    """The stack shape [heads, a, b] of a [R, C] matrix under `spec` (the shape itself when spec is None)."""
    if spec is None:
        return tuple(shape)
    axis, heads = spec
    rows, cols = shape
    return (heads, rows // heads, cols) if axis == 0 else (heads, rows, cols // heads)


def block_view(t: torch.Tensor, spec: BlockSpec | None) -> torch.Tensor:
    """t [R, C] as [heads, a, b] sharing storage (t itself when spec is None)."""
    if spec is None:
        return t
    axis, heads = spec
    return t.unflatten(0, (heads, -1)) if axis == 0 else t.unflatten(1, (heads, -1)).transpose(0, 1)


def unblock(blocks: torch.Tensor, spec: BlockSpec | None) -> torch.Tensor:
    """The inverse of `block_view`: [heads, a, b] back to the matrix [R, C]."""
    if spec is None:
        return blocks
    axis, _ = spec
    return blocks.flatten(0, 1) if axis == 0 else blocks.transpose(0, 1).flatten(1, 2)


def to_block_order(t: torch.Tensor, spec: BlockSpec | None) -> torch.Tensor:
    """t flattened with each block contiguous (a view unless the blocks are columns)."""
    return block_view(t, spec).reshape(-1)


def from_block_order(flat: torch.Tensor, shape: Sequence[int], spec: BlockSpec | None) -> torch.Tensor:
    """A block-order flat tensor back in the matrix's own shape."""
    return unblock(flat.view(block_shape(shape, spec)), spec)


def check_block_spec(name: str, shape: Sequence[int], spec) -> None:
    """ValueError naming the parameter when `spec` is not (0 | 1, heads) splitting a 2-D shape evenly."""
    ok = (isinstance(spec, (tuple, list)) and len(spec) == 2 and spec[0] in (0, 1) and isinstance(spec[1], int)
          and spec[1] >= 1 and len(shape) == 2 and shape[spec[0]] % spec[1] == 0)
    if not ok:
        raise ValueError(f"Muon: parameter {name!r} of shape {tuple(shape)} has head blocks={spec!r}; allowed: "
                         "(axis 0 or 1, heads) for a 2-D matrix whose rows (0) or columns (1) split evenly into heads")


def attention_head_blocks(model: nn.Module) -> dict[str, BlockSpec]:
    """{parameter name: spec} for every attention's q_proj / q_b_proj, kv_b_proj (rows) and o_proj (columns)."""
    out = {}
    for prefix, module in model.named_modules():
        if not isinstance(module, MultiHeadLatentAttention):
            continue
        heads = module.num_heads
        for child, axis in (("q_proj", 0), ("q_b_proj", 0), ("kv_b_proj", 0), ("o_proj", 1)):
            if hasattr(module, child):
                out[f"{prefix}.{child}.weight" if prefix else f"{child}.weight"] = (axis, heads)
    return out
