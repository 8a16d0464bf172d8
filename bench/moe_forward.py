"""Forward+backward tokens/s: our model vs transformers.DeepseekV3ForCausalLM, same config and weights, CPU fp32.

The two implementations alternate within one run (this machine is noisy); the speedup is a geometric mean over
configurations. Last line: `moe_speedup_vs_transformers: X`.
"""
from __future__ import annotations

import math
import tempfile
import time

import torch

from components.model.config import get_preset
from components.model.hf import config_to_hf, load_hf

CONFIGS = {
    "tiny (8 experts, top-2)": (get_preset("tiny"), 8, 256),
    "cpu-16x4 (16 experts, top-4)": (get_preset("tiny").replace(hidden_size=256, moe_intermediate_size=256,
                                                                 n_routed_experts=16, num_experts_per_tok=4,
                                                                 num_attention_heads=8, kv_lora_rank=128), 4, 256),
}
ROUNDS = 11


def step_time(model, ids) -> float:
    start = time.perf_counter()
    out = model(ids, labels=ids) if hasattr(model, "generation_config") else model(ids, targets=ids)
    out.loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    import transformers

    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows, ratios = [], []
    for name, (config, batch, seq) in CONFIGS.items():
        hf_cfg = transformers.DeepseekV3Config(**{k: v for k, v in config_to_hf(config).items()
                                                 if k not in ("architectures", "model_type")})
        torch.manual_seed(0)
        theirs = transformers.DeepseekV3ForCausalLM(hf_cfg).train()
        with tempfile.TemporaryDirectory() as tmp:
            theirs.save_pretrained(tmp)
            ours = load_hf(tmp).train()
        ids = torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
        step_time(ours, ids), step_time(theirs, ids)  # warm-up
        t_ours, t_theirs = [], []
        for _ in range(ROUNDS):  # alternate so drift hits both equally
            t_ours.append(step_time(ours, ids))
            t_theirs.append(step_time(theirs, ids))
        tokens = batch * seq
        ours_tps, theirs_tps = tokens / min(t_ours), tokens / min(t_theirs)
        rows.append((name, ours_tps, theirs_tps, ours_tps / theirs_tps))
        ratios.append(ours_tps / theirs_tps)
    print(f"{'config':32s} {'ours tok/s':>12s} {'transformers tok/s':>20s} {'speedup':>8s}")
    for name, a, b, r in rows:
        print(f"{name:32s} {a:12.0f} {b:20.0f} {r:8.2f}")
    print(f"moe_speedup_vs_transformers: {math.exp(sum(map(math.log, ratios)) / len(ratios)):.3f}")


if __name__ == "__main__":
    main()
