"""Newton–Schulz: ours vs torch.optim.Muon's, bf16, the paper's 5 quintic steps, same inputs.

Shapes (512,512), (1024,1024), (1024,4096), (2048,2048), and a stack of 16×(256,512): ours batched over the stack
vs torch looping over it (torch's NS is 2-D only). Both return the bf16 orthogonalized matrix. The two run
alternately, ROUNDS times, and the best time of each counts (this machine is shared and noisy).
Last line: `ns_speedup_vs_torch: X`, the geometric mean of torch_time / our_time over the five cases.
Usage: python -m bench.newton_schulz [--device cuda] [--rounds N] [--method standard|gram|auto]
"""
from __future__ import annotations

import argparse
import math
import time

import torch
from torch.optim._muon import _zeropower_via_newtonschulz as torch_ns

from components.optim.newton_schulz import QUINTIC, newton_schulz

CASES = [("512x512", (512, 512)), ("1024x1024", (1024, 1024)), ("1024x4096", (1024, 4096)),
         ("2048x2048", (2048, 2048)), ("16x(256x512) stack", (16, 256, 512))]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, arg, device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn(arg)
    _sync(device)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--method", default="standard", choices=["standard", "gram", "auto"])
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    coeffs = QUINTIC.triples[0]

    def theirs(g):
        if g.ndim == 2:
            return torch_ns(g, coeffs, 5, 1e-7)
        return torch.stack([torch_ns(m, coeffs, 5, 1e-7) for m in g])

    def ours(g):
        return newton_schulz(g, 5, "quintic", torch.bfloat16, out_dtype=torch.bfloat16, method=args.method)

    print(f"device={device} threads={torch.get_num_threads()} rounds={args.rounds} method={args.method}")
    print(f"{'case':<22} {'torch ms':>10} {'ours ms':>10} {'speedup':>8} {'max|diff|':>10}")
    ratios = []
    for name, shape in CASES:
        g = torch.randn(*shape, device=device, generator=torch.Generator(device).manual_seed(0))
        diff = float((ours(g).float() - theirs(g).float()).abs().max())  # also the warm-up
        t_theirs, t_ours = [], []
        for r in range(args.rounds):  # alternate who goes first: no order bias
            if r % 2:
                t_ours.append(timed(ours, g, device))
                t_theirs.append(timed(theirs, g, device))
            else:
                t_theirs.append(timed(theirs, g, device))
                t_ours.append(timed(ours, g, device))
        ratio = min(t_theirs) / min(t_ours)
        ratios.append(ratio)
        print(f"{name:<22} {1e3 * min(t_theirs):>10.2f} {1e3 * min(t_ours):>10.2f} {ratio:>8.2f} {diff:>10.3g}")
    print(f"ns_speedup_vs_torch: {math.exp(sum(map(math.log, ratios)) / len(ratios)):.3f}")


if __name__ == "__main__":
    main()
