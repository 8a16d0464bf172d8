"""Document-masked attention for packed samples: causal attention that never crosses a segment boundary.

A packed sample holds several conversations back to back (components/data/chat.py); `segment_ids` [B, S] number
them (0 is padding). Token i may attend to token j iff segment[i] == segment[j] and j <= i, and positions restart
at 0 in each segment (`document_positions`), so every conversation is computed exactly as if it were alone.

Two ways to apply it, chosen once per forward pass (`DocumentMask`):
- `flex`: FlexAttention with a block mask (torch.nn.attention.flex_attention), compiled, where it runs (CUDA). The
  block mask holds one entry per 128 x 128 tile and the kernel skips the tiles that are all masked, so no dense
  [S, S] mask exists and the work falls with the conversations' lengths.
- `sdpa`: scaled_dot_product_attention with a boolean [B, 1, S, S] mask built once per forward pass and shared by
  every layer; what runs on CPU (where the memory is small at the sequence lengths used there).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "flex", "sdpa")
DENSE_LIMIT_ON_GPU = 2048  # longer packed samples on a GPU go through FlexAttention only
_compiled_flex = None


def document_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """[B, S] long: the position of each token inside its segment (0 at every segment start)."""
    b, s = segment_ids.shape
    index = torch.arange(s, device=segment_ids.device).expand(b, s)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - first


def flex_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


class DocumentMask:
    """The attention mask of one forward pass over packed samples (see the module docstring).

    `mask[..., a:b, :]` gives the dense boolean rows [B, 1, b - a, S] (True = attend) of queries a..b, which is how
    the max-logit statistic (attention_stats.py) reads a mask chunk by chunk."""

    def __init__(self, segment_ids: torch.Tensor, backend: str = "auto"):
        if backend not in BACKENDS:
            raise ValueError(f"attention backend={backend!r} must be one of {BACKENDS}")
        if segment_ids.ndim != 2:
            raise ValueError(f"segment_ids must be [batch, seq_len], got shape {tuple(segment_ids.shape)}")
        self.segment_ids = segment_ids
        if backend == "auto":
            backend = "flex" if flex_available(segment_ids.device) else "sdpa"
        self.backend = backend
        self._dense: torch.Tensor | None = None
        self._block = None

    def rows(self, start: int, end: int) -> torch.Tensor:
        """Dense boolean mask rows [B, 1, end - start, S] for queries start..end-1."""
        seg = self.segment_ids
        s = seg.shape[1]
        q = torch.arange(start, end, device=seg.device)[:, None]
        causal = torch.arange(s, device=seg.device)[None, :] <= q
        return ((seg[:, start:end, None] == seg[:, None, :]) & causal)[:, None]

    def dense(self) -> torch.Tensor:
        if self._dense is None:
            b, s = self.segment_ids.shape
            if self.segment_ids.is_cuda and s > DENSE_LIMIT_ON_GPU:
                raise RuntimeError(f"a dense [{b}, 1, {s}, {s}] attention mask on the GPU: use the flex backend for "
                                   f"packed samples longer than {DENSE_LIMIT_ON_GPU} tokens")
            self._dense = self.rows(0, s)
        return self._dense

    def __getitem__(self, key) -> torch.Tensor:
        if (isinstance(key, tuple) and len(key) == 3 and key[0] is Ellipsis and isinstance(key[1], slice)
                and key[1].step is None and key[2] == slice(None)):
            start, end, _ = key[1].indices(self.segment_ids.shape[1])
            return self.rows(start, end)
        return self.dense()[key]

    def block_mask(self):
        if self._block is None:
            from torch.nn.attention.flex_attention import create_block_mask

            seg = self.segment_ids

            def same_document(b, h, q, kv):
                return (seg[b, q] == seg[b, kv]) & (kv <= q)

            b, s = seg.shape
            self._block = create_block_mask(same_document, b, None, s, s, device=seg.device,
                                            _compile=seg.device.type == "cuda")
        return self._block

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """softmax(q kᵀ · scale, masked) v for q, k, v [B, H, S, D] (v's head dim may differ)."""
        if self.backend == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self.dense(), scale=scale)
        return _flex()(q, k, v, block_mask=self.block_mask(), scale=scale)


def _flex():
    """flex_attention, compiled on first use where a compiler backend exists (CUDA); eager elsewhere (a
    reference implementation: what the CPU parity test runs)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False) if torch.cuda.is_available() else flex_attention
    return _compiled_flex
