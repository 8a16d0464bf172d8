"""Per-head max pre-softmax attention logit: the stability signal of Moonlight App. D and the input of QK-clip.

S_h = max over the batch and the allowed (query i, key j) pairs of softmax_scale · q_i·k_j, one value per head.
The logits are recomputed without gradient in query chunks, so at most `chunk_elements` of them exist at once
(never [B, H, S, S]); under plain causal attention a chunk multiplies only the keys it may see (the blocks above
the diagonal are never computed, ~half the work) and masks only its diagonal block. SDPA on CPU returns no score
maximum, so this is one extra, cheaper QKᵀ rather than a second attention.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

CHUNK_ELEMENTS = 1 << 21  # logits held at once (8 MiB in fp32)
MAX_QUERY_CHUNK = 64  # smaller chunks skip more of the causal upper triangle


@torch.no_grad()
def head_max_logits(q: torch.Tensor, k: torch.Tensor, scale: float, mask: torch.Tensor | None = None,
                    chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """[H] fp32: the max of scale · q kᵀ per head over the allowed pairs (-inf for a head that sees none).

    q [B, H, S_q, D], k [B, H, S_k, D]. mask None: causal, the queries being the last S_q of the S_k positions
    (as with a KV cache); else a boolean mask broadcastable to [B, H, S_q, S_k] (True = attend).
    """
    b, h, s_q, _ = q.shape
    s_k = k.shape[2]
    best = torch.full((h,), float("-inf"), dtype=torch.float32, device=q.device)
    if b == 0 or s_q == 0 or s_k == 0:
        return best
    chunk = max(1, min(MAX_QUERY_CHUNK, chunk_elements // (b * h * s_k)))
    offset = s_k - s_q  # query i sits at key position i + offset
    kt = k.transpose(-1, -2) * scale
    for start in range(0, s_q, chunk):
        end = min(start + chunk, s_q)
        qc = q[:, :, start:end]
        if mask is not None:
            logits = (qc @ kt).masked_fill(~mask[..., start:end, :], float("-inf"))
            best = torch.maximum(best, _amax_per_head(logits))
            continue
        seen = start + offset + 1  # keys [0, seen) are allowed for every query of the chunk
        if seen > 0:
            best = torch.maximum(best, _amax_per_head(qc @ kt[..., :seen]))
        last = min(end + offset, s_k)  # keys [seen, last) are allowed for some queries: the diagonal block
        if last > seen:
            rows = torch.arange(start, end, device=q.device)[:, None] + offset
            cols = torch.arange(seen, last, device=q.device)[None, :]
            diagonal = (qc @ kt[..., seen:last]).masked_fill(cols > rows, float("-inf"))
            best = torch.maximum(best, _amax_per_head(diagonal))
    return best


def _amax_per_head(logits: torch.Tensor) -> torch.Tensor:
    return logits.amax(dim=(0, 2, 3)).float()


def take_max_logits(attention_layers: Sequence) -> torch.Tensor:
    """[layers, heads]: what each layer's attention recorded in its last forward (-inf where it recorded nothing);
    switches tracking off again."""
    rows = []
    for attn in attention_layers:
        value = attn.max_logit
        rows.append(value.float() if value is not None else
                    torch.full((attn.num_heads,), float("-inf"), device=attn.o_proj.weight.device))
        attn.track_max_logit, attn.max_logit = False, None
    return torch.stack(rows)
