"""Full optimizer step time on the `small` preset's parameters: ours (Muon + AdamW in one optimizer) vs AdamW alone
vs torch.optim.Muon + torch.optim.AdamW.

Gradients are random and fixed; the three optimizers step the same parameters in turn, ROUNDS times, and the best
time of each counts (the machine is shared and noisy). torch.optim.Muon takes 2-D parameters only, so each expert
of a stacked [E, out, in] tensor is handed to it as its own 2-D parameter (a view), as a user of torch's Muon
would have to. All Muon variants: bf16 Newton–Schulz, 5 steps, lr 1e-3, weight decay 0.1.
Last line: `muon_step_over_adamw: X` = our step time / AdamW's.
Usage: python -m bench.optimizer_step [--preset small] [--device cpu|cuda] [--rounds N] [--ns-method standard]
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from components.model.config import get_preset
from components.model.transformer import build_model
from components.optim.routing import build_muon, route_parameters

LR, WD = 1e-3, 0.1


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


def timed_step(optimizers, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for opt in optimizers:
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ns-method", default="standard", choices=["standard", "gram", "auto"])
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    model = build_model(get_preset(args.preset), device=device, seed=0)
    gen = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.grad = torch.randn(p.shape, device=device, generator=gen) * 1e-3
    n_params = sum(p.numel() for p in model.parameters())
    routes = route_parameters(model)
    n_muon = sum(p.numel() for n, p in model.named_parameters() if routes[n] == "muon")
    candidates = {
        "ours: Muon+AdamW": [build_muon(model, lr=LR, weight_decay=WD, ns_method=args.ns_method)],
        "torch AdamW alone": [torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), eps=1e-8,
                                                weight_decay=WD, foreach=True)],
        "torch Muon + AdamW": torch_muon_and_adamw(model),
    }
    times = {name: [] for name in candidates}
    for opts in candidates.values():  # warm-up (lazy state, kernels)
        timed_step(opts, device)
    for _ in range(args.rounds):
        for name, opts in candidates.items():
            times[name].append(timed_step(opts, device))
    ours = candidates["ours: Muon+AdamW"][0]
    print(f"preset={args.preset} params={n_params:,} (Muon {n_muon:,}) device={device} "
          f"threads={torch.get_num_threads()} rounds={args.rounds} ns_method={args.ns_method}")
    adamw = min(times["torch AdamW alone"])
    print(f"{'optimizer':<22} {'step s':>9} {'x AdamW':>8}")
    for name, t in times.items():
        print(f"{name:<22} {min(t):>9.3f} {min(t) / adamw:>8.2f}")
    print(f"ours: time in Newton-Schulz {ours.last_stats['ns_seconds']:.3f} s (last step), "
          f"update RMS muon {ours.last_stats.get('muon/update_rms', float('nan')):.3f}")
    print(f"muon_step_over_adamw: {min(times['ours: Muon+AdamW']) / adamw:.3f}")


if __name__ == "__main__":
    main()
