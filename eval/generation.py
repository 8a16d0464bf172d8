"""Batched autoregressive decoding for our model: greedy or sampled, stop tokens and stop strings, KV cache.

Prompts are left-padded; the attention mask marks real tokens, and the model derives positions from it, so every
row decodes exactly as it would alone. With `use_cache` the prompt is encoded once into `model.new_cache(...)` and
each step feeds one token per row (`logits_to_keep=1`); without it each step recomputes the whole prefix (the
reference the cache is tested against). Finished rows leave the batch (`KVCache.select`).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingConfig:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"sampling: temperature={self.temperature!r} must be > 0 when do_sample is set")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling: top_p={self.top_p!r} must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"sampling: top_k={self.top_k!r} must be >= 0 (0 = off)")


def next_tokens(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]."""
    if not sampling.do_sample:
        return logits.argmax(dim=-1)
    logits = logits.float() / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(logits, min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > sampling.top_p  # keep the smallest prefix reaching top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    stop_ids: set[int] | frozenset[int] = frozenset(),
    should_stop: Callable[[list[int]], bool] | None = None,
    sampling: SamplingConfig = SamplingConfig(),
    use_cache: bool = True,
    pad_id: int = 0,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """New tokens for each prompt (a stop id is kept as the last token; callers trim stop strings)."""
    if max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens={max_new_tokens!r} must be >= 0")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    out: list[list[int]] = [[] for _ in prompts]
    if not prompts or max_new_tokens == 0:
        return out
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    total = width + max_new_tokens
    ids = torch.full((len(prompts), total), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), total), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):width] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1  # generated positions count as real tokens
    padded = any(len(p) != width for p in prompts)  # without padding the model takes its unmasked fast path
    active = torch.arange(len(prompts), device=device)
    cache = model.new_cache(total) if use_cache else None
    length = width
    step_input = ids[:, :width]
    for _ in range(max_new_tokens):
        step_mask = mask[:, :length] if padded else None
        if cache is not None:
            logits = model(step_input, attention_mask=step_mask, cache=cache, logits_to_keep=1).logits
        else:
            logits = model(ids[:, :length], attention_mask=step_mask, logits_to_keep=1).logits
        token = next_tokens(logits[:, -1], sampling, generator)
        ids[:, length] = token
        length += 1
        done: list[int] = []
        for row, (index, t) in enumerate(zip(active.tolist(), token.tolist())):
            out[index].append(t)
            if t in stop_ids or (should_stop is not None and should_stop(out[index])):
                done.append(row)
        if len(done) == len(active):
            break
        if done:
            finished = set(done)
            keep = torch.tensor([r for r in range(len(active)) if r not in finished], device=device)
            active, ids, mask = active[keep], ids[keep], mask[keep]
            if cache is not None:
                cache.select(keep)
        step_input = ids[:, length - 1:length]
    return out
