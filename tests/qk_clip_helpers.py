"""Shared by the QK-clip tests: a small MLA model whose head counts cut across shard boundaries, with some heads'
queries scaled up so their logits are far above τ, and one optimizer step with tracking and the clip."""
from __future__ import annotations

import torch
import torch.distributed as dist

from components.model.attention_stats import take_max_logits
from components.model.config import ModelConfig
from components.model.transformer import build_model
from components.optim.qk_clip import QKClip

VOCAB, BATCH, SEQ = 32, 4, 12
HOT_HEADS = (0, 2)  # heads whose query rows are scaled up (logits ~50-100); head 1 stays near 3-5
TAU = 10.0


def config(q_lora_rank: int | None = None, **overrides) -> ModelConfig:
    """3 heads: q rows 3·6 = 18 and kv_b rows 3·8 = 24, so 4 ranks' Shard(0) blocks cut through heads."""
    fields = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                  num_attention_heads=3, q_lora_rank=q_lora_rank, kv_lora_rank=6, qk_nope_head_dim=4,
                  qk_rope_head_dim=2, v_head_dim=4, n_routed_experts=0, n_shared_experts=0,
                  first_k_dense_replace=0, max_position_embeddings=64, initializer_range=0.3,
                  bos_token_id=None, eos_token_id=None)
    return ModelConfig(**{**fields, **overrides})


def query_weight(attn) -> torch.Tensor:
    return attn.q_proj.weight if attn.config.q_lora_rank is None else attn.q_b_proj.weight


def hot_model(q_lora_rank: int | None = None, factor: float = 20.0, seed: int = 0, dtype=torch.float32):
    """The model with HOT_HEADS' query rows (no-position and rotary) multiplied by `factor` in every layer."""
    model = build_model(config(q_lora_rank), device="cpu", seed=seed).to(dtype)
    with torch.no_grad():
        for attn in attention_layers(model):
            d = attn.config.qk_head_dim
            for h in HOT_HEADS:
                query_weight(attn)[h * d:(h + 1) * d] *= factor
    return model


def attention_layers(model) -> list:
    return [layer.self_attn for layer in model.model.layers]


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(500 + step)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen)
    return ids[:, :-1], ids[:, 1:]


def local_batch(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids, targets = batch(step)
    return ids.chunk(world)[rank], targets.chunk(world)[rank]


def forward_backward(model, ids, targets, track: bool) -> torch.Tensor | None:
    """One forward/backward; returns the [layers, heads] max logits when `track` (MAX over ranks if distributed)."""
    layers = attention_layers(model)
    for attn in layers:
        attn.track_max_logit = track
    model(ids, targets=targets).loss.backward()
    if not track:
        return None
    s = take_max_logits(layers)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(s, op=dist.ReduceOp.MAX)
    return s


def clipped_step(model, opt, clip: QKClip | None, ids, targets) -> torch.Tensor | None:
    """Forward/backward (tracking when clipping), the optimizer step, then the clip; the heads clipped per layer."""
    s = forward_backward(model, ids, targets, track=clip is not None)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return clip.apply(attention_layers(model), s) if clip is not None else None


@torch.no_grad()
def attention_inputs(model, ids) -> list[tuple]:
    """The positional inputs (x, rope, mask, cache) each attention layer gets in a forward on `ids`."""
    captured, hooks = [], []
    for attn in attention_layers(model):
        hooks.append(attn.register_forward_pre_hook(lambda module, args: captured.append(args)))
    model(ids)
    for hook in hooks:
        hook.remove()
    return captured


@torch.no_grad()
def max_logits_on(model, inputs: list[tuple]) -> torch.Tensor:
    """[layers, heads] max logits of each attention layer run on the given inputs (a clip of an earlier layer
    changes a later layer's inputs in a full forward; the clip's bound is per layer, on the inputs measured)."""
    layers = attention_layers(model)
    for attn, args in zip(layers, inputs):
        attn.track_max_logit = True
        attn(*args)
    return take_max_logits(layers)
