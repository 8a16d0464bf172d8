"""Full optimizer step time: ours (Muon + AdamW in one optimizer) vs torch.optim.Muon + torch.optim.AdamW (and
AdamW alone) on the `small` preset's parameters, and our step as a fraction of the `tiny-cpu` run's
forward+backward per optimizer step (the paper's measure, 1–3% at scale).

Part 1 (`--preset`, default small): gradients are random and fixed; the optimizers step the same parameters in
turn, ROUNDS times, and the best time of each counts (the machine is shared and noisy: compare within one run).
torch.optim.Muon takes 2-D parameters only, so each expert of a stacked [E, out, in] tensor is handed to it as its
own 2-D parameter (a view), as a user of torch's Muon would have to. All Muon variants: bf16 Newton–Schulz,
5 steps, lr 1e-3, weight decay 0.1.
Part 2: the tiny preset at the tiny schedule's sequence length and the global batch that covers most of its
tokens, accumulated over micro-batches of 16 (app/configs/tiny-cpu.yaml): forward+backward of all micro-batches
of one optimizer step, then our step, alternating, best of ROUNDS each.
Last line: `muon_step_vs_torch: X` = torch's step time / ours (> 1: ours is faster).
Usage: python -m bench.optimizer_step [--preset small] [--device cpu|cuda] [--rounds N] [--ns-method standard]
"""
from __future__ import annotations

import argparse
import platform
import time
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from components.model.config import get_preset
from components.model.transformer import build_model
from components.optim.routing import build_muon, route_parameters
from components.schedule import get_schedule

LR, WD = 1e-3, 0.1
MICRO_BATCH = 16  # app/configs/tiny-cpu.yaml data.micro_batch_size


def torch_muon_and_adamw(model: nn.Module) -> list[torch.optim.Optimizer]:
    routes = route_parameters(model)
    matrices, others = [], []
    for name, p in model.named_parameters():
        if routes[name] != "muon":
            others.append(p)
        elif p.ndim == 2:
            matrices.append(p)
        else:  # one 2-D parameter per expert, sharing storage (and gradient) with the stack
            for e in range(p.shape[0]):
                view = nn.Parameter(p.data[e])
                view.grad = p.grad[e]
                matrices.append(view)
    return [torch.optim.Muon(matrices, lr=LR, weight_decay=WD, adjust_lr_fn="match_rms_adamw"),
            torch.optim.AdamW(others, lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=WD, foreach=True)]


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def matmul_rates(device: torch.device, n: int = 1024) -> str:
    """fp32 and bf16 GEMM rates of this machine (n x n, best of 3): NS is bf16 products, so the step's ratio
    depends on them (with a fast bf16 GEMM both NS implementations run near its peak and the step ratio is near
    the elementwise part's)."""
    rates = []
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(n, n, device=device).to(dtype)
        best = min(timed(lambda a=a: a @ a, device) for _ in range(4))
        rates.append(f"{dtype}".removeprefix("torch.") + f" {2 * n**3 / best / 1e9:.0f} GFLOP/s")
    return ", ".join(rates)


def cpu_model() -> str:
    """The CPU's model name and its bf16 instruction sets (what makes a bf16 GEMM fast on CPU)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                "unknown CPU")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    bf16 = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return f"{name} ({', '.join(bf16) if bf16 else 'no bf16 instructions'})"


def step_all(optimizers) -> None:
    for opt in optimizers:
        opt.step()


def compare_steps(preset: str, device: torch.device, rounds: int, ns_method: str) -> dict[str, float]:
    """Best step time of each optimizer on `preset`'s parameters with fixed random gradients."""
    model = build_model(get_preset(preset), device=device, seed=0)
    gen = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.grad = torch.randn(p.shape, device=device, generator=gen) * 1e-3
    routes = route_parameters(model)
    n_params = sum(p.numel() for p in model.parameters())
    n_muon = sum(p.numel() for n, p in model.named_parameters() if routes[n] == "muon")
    candidates = {
        "ours: Muon+AdamW": [build_muon(model, lr=LR, weight_decay=WD, ns_method=ns_method)],
        "torch AdamW alone": [torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), eps=1e-8,
                                                weight_decay=WD, foreach=True)],
        "torch Muon + AdamW": torch_muon_and_adamw(model),
    }
    times = {name: [] for name in candidates}
    for opts in candidates.values():  # warm-up (lazy state, kernels)
        step_all(opts)
    for _ in range(rounds):
        for name, opts in candidates.items():
            times[name].append(timed(lambda opts=opts: step_all(opts), device))
    ours = candidates["ours: Muon+AdamW"][0]
    print(f"preset={preset} params={n_params:,} (Muon {n_muon:,}) device={device} "
          f"threads={torch.get_num_threads()} rounds={rounds} ns_method={ns_method}")
    best = {name: min(t) for name, t in times.items()}
    adamw = best["torch AdamW alone"]
    print(f"{'optimizer':<22} {'step s':>9} {'x AdamW':>8}  all rounds")
    for name, t in times.items():
        print(f"{name:<22} {best[name]:>9.3f} {best[name] / adamw:>8.2f}  {' '.join(f'{x:.2f}' for x in t)}")
    ns = ours.last_stats["ns_seconds"]
    print(f"ours: time in Newton-Schulz {ns:.3f} s of the last step's {times['ours: Muon+AdamW'][-1]:.3f} s, "
          f"update RMS muon {ours.last_stats.get('muon/update_rms', float('nan')):.3f}")
    machine = cpu_model() if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"machine: {machine}; {matmul_rates(device)}")
    return best


def main_global_batch(schedule) -> int:
    """The global batch (sequences) in effect for most of the schedule's tokens."""
    end = schedule.stages[-1].end_tokens
    counts = Counter(schedule.at(end * (k + 0.5) / 1000).batch_size for k in range(1000))
    return counts.most_common(1)[0][0]


def fraction_of_fwd_bwd(device: torch.device, rounds: int) -> float:
    """Our optimizer step / forward+backward of one optimizer step's micro-batches, tiny-cpu's shapes."""
    schedule = get_schedule("tiny")
    batch = main_global_batch(schedule)
    micro = batch // MICRO_BATCH
    model = build_model(get_preset("tiny"), device=device, seed=0)
    opt = build_muon(model, lr=LR, weight_decay=WD)
    gen = torch.Generator(device).manual_seed(1)
    vocab = model.config.vocab_size
    batches = [torch.randint(0, vocab, (MICRO_BATCH, schedule.seq_len + 1), device=device, generator=gen)
               for _ in range(micro)]

    def forward_backward() -> None:
        for ids in batches:
            (model(ids[:, :-1], targets=ids[:, 1:]).loss / micro).backward()

    fwd_bwd, step = [], []
    for r in range(rounds + 1):  # round 0 warms up
        opt.zero_grad(set_to_none=False)
        f = timed(forward_backward, device)
        s = timed(opt.step, device)
        if r:
            fwd_bwd.append(f)
            step.append(s)
    frac = min(step) / min(fwd_bwd)
    print(f"tiny-cpu shapes: global batch {batch} = {micro} x {MICRO_BATCH} sequences of {schedule.seq_len} tokens; "
          f"fwd+bwd {min(fwd_bwd):.3f} s, our step {min(step):.3f} s ({frac:.1%})")
    return frac


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ns-method", default="standard", choices=["standard", "gram", "auto"])
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    best = compare_steps(args.preset, device, args.rounds, args.ns_method)
    frac = fraction_of_fwd_bwd(device, args.rounds)
    print(f"muon_step_over_adamw: {best['ours: Muon+AdamW'] / best['torch AdamW alone']:.3f}")
    print(f"muon_step_fraction_of_fwd_bwd: {frac:.4f}")
    print(f"muon_step_vs_torch: {best['torch Muon + AdamW'] / best['ours: Muon+AdamW']:.3f}")


if __name__ == "__main__":
    main()
