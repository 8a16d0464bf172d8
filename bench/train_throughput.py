"""Training throughput of `tiny` on this CPU (and `small` on a GPU where one is lent): tokens/s and MFU.

MFU uses the model's MoE-aware FLOPs per token (activated experts + attention). On a CPU there is no datasheet peak,
so the peak is measured in the same run: the best fp32 matmul rate of this machine (a large GEMM).
Last line: `train_tokens_per_s: X`.
"""
from __future__ import annotations

import time

import torch

from bench._train_runs import history, train
from components.model.config import get_preset
from components.model.counting import flops_per_token
from components.schedule import get_schedule

STEPS = 40


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def main() -> None:
    peak = matmul_peak()
    run = train(["--trainer.max_steps", str(STEPS), "--run.svd_entropy_every_n_steps", "1000",
                 "--run.max_logit_every_n_steps", "0", "--trainer.val_check_interval", "100000"], "throughput")
    tokens = history(run, "train/tokens")
    # Skip the first steps (warm-up, dataloader start); rate over the rest from MLflow timestamps.
    (_, t0, ts0), (_, t1, ts1) = tokens[4], tokens[-1]
    rate = (t1 - t0) / ((ts1 - ts0) / 1000.0)
    seq_len = get_schedule("tiny").seq_len
    fpt = flops_per_token(get_preset("tiny"), seq_len)
    mfu = rate * fpt / peak
    print(f"{'model':8s} {'device':6s} {'tokens/s':>10s} {'FLOPs/token':>12s} {'matmul peak GFLOP/s':>20s} {'MFU':>6s}")
    print(f"{'tiny':8s} {'cpu':6s} {rate:10.0f} {fpt:12.3e} {peak / 1e9:20.1f} {mfu:6.1%}")
    print(f"train_tokens_per_s: {rate:.0f}")


if __name__ == "__main__":
    main()
