"""Per-head max pre-softmax attention logit: the stability signal of Moonlight App. D and the input of QK-clip.

S_h = max over the batch and the allowed (query i, key j) pairs of softmax_scale · q_i·k_j, one value per head.
The logits are recomputed without gradient in query chunks, so at most `chunk_elements` of them exist at once
(never [B, H, S, S]); under plain causal attention a chunk multiplies only the keys it may see (the blocks above
the diagonal are never computed, ~half the work) and masks only its diagonal block. Measured on one CPU thread
(tiny: B·H = 64, S = 256, D = 48): ~6 ms a layer against 42 ms for SDPA's forward + backward. SDPA on CPU returns
no score maximum, so this is one extra, cheaper QKᵀ rather than a second attention.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

CHUNK_ELEMENTS = 1 << 24  # logits held at once, at most (64 MiB in fp32)
MAX_QUERY_CHUNK = 32  # smaller chunks skip more of the causal upper triangle (measured fastest on CPU)


@torch.no_grad()
def head_max_logits(q: torch.Tensor, k: torch.Tensor, scale: float, mask=None,
                    chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """[H] fp32: the max of scale · q kᵀ per head over the allowed pairs (-inf for a head that sees none).

    q [B, H, S_q, D], k [B, H, S_k, D]. mask None: causal, the queries being the last S_q of the S_k positions
    (as with a KV cache); else a boolean mask broadcastable to [B, H, S_q, S_k] (True = attend), or any object
    whose `mask[..., a:b, :]` gives those rows (a `DocumentMask`).
    """
    b, h, s_q, d = q.shape
    s_k = k.shape[2]
    if b == 0 or s_q == 0 or s_k == 0:
        return torch.full((h,), float("-inf"), dtype=torch.float32, device=q.device)
    chunk = max(1, min(MAX_QUERY_CHUNK, chunk_elements // (b * h * s_k)))
    offset = s_k - s_q  # query i sits at key position i + offset
    queries = (q * scale).reshape(b * h, s_q, d)
    keys = k.reshape(b * h, s_k, d)
    parts = []
    for start in range(0, s_q, chunk):
        end = min(start + chunk, s_q)
        if mask is not None:
            logits = torch.bmm(queries[:, start:end], keys.transpose(1, 2)).view(b, h, end - start, s_k)
            logits.masked_fill_(~mask[..., start:end, :], float("-inf"))
            parts.append(logits.amax(dim=(0, 2, 3)))
            continue
        seen = min(end + offset, s_k)  # keys [0, seen): the rest lie above the diagonal for every query here
        logits = torch.bmm(queries[:, start:end], keys[:, :seen].transpose(1, 2))
        first = start + offset + 1  # keys [first, seen) are allowed for some queries only: the diagonal block
        if seen > first:
            rows = torch.arange(start, end, device=q.device)[:, None] + offset
            cols = torch.arange(first, seen, device=q.device)[None, :]
            logits[:, :, first:seen].masked_fill_(cols > rows, float("-inf"))
        parts.append(logits.amax(dim=(1, 2)).view(b, h).amax(0))
    return torch.stack(parts).amax(0).float()


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
