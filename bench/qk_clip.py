"""QK-clip's cost: forward + backward + optimizer step of the `tiny` preset with clipping on vs off, in one run.

"On" is what `CrescentModule` does with `model.qk_clip_threshold` set: every attention layer records its per-head
max logit in the forward (the chunked extra QKᵀ of attention_stats.py), then after Muon's step the [layers, heads]
maxima give the rescale of the query/key rows (qk_clip.py; it runs whether or not a head is over τ). Two copies of
the model train side by side on the same batches, steps alternating (off, on), so the machine's noise hits both
alike; the overhead is the median of the per-pair time ratios. Micro-batch and sequence length are tiny-cpu's.
On CPU the clock is this process's CPU time (`--clock cpu`, one thread by default): on a machine shared with other
jobs wall time mostly measures them; `--clock wall` (and always on CUDA) times the wall.
Last line: `qk_clip_overhead: X` = on / off − 1.
Usage: python -m bench.qk_clip [--rounds N] [--batch 16] [--seq-len 256] [--threshold 100] [--threads 1]
       [--clock cpu|wall] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from components.model.attention_stats import head_max_logits, take_max_logits
from components.model.config import get_preset
from components.model.transformer import build_model
from components.optim.qk_clip import QKClip
from components.optim.routing import build_muon


def timed_step(model, opt, ids, clip: QKClip | None, device, clock) -> tuple[float, int]:
    """(seconds, heads clipped) of one fwd + bwd + step (+ tracking and clip when `clip`)."""
    layers = [layer.self_attn for layer in model.model.layers]
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = clock()
    for attn in layers:
        attn.track_max_logit = clip is not None
    model(ids[:, :-1], targets=ids[:, 1:]).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    clipped = 0
    if clip is not None:
        clipped = int(clip.apply(layers, take_max_logits(layers)).sum())
    if device.type == "cuda":
        torch.cuda.synchronize()
    return clock() - start, clipped


def added_work(model, clip: QKClip, batch: int, seq_len: int, device, clock) -> float:
    """Seconds of what "on" adds, timed alone: `head_max_logits` on q, k of the model's shapes for every layer,
    then the clip's rescale."""
    c = model.config
    gen = torch.Generator().manual_seed(1)
    q, k = (torch.randn(batch, c.num_attention_heads, seq_len, c.qk_head_dim, generator=gen).to(device)
            for _ in range(2))
    layers = [layer.self_attn for layer in model.model.layers]
    best = float("inf")
    for _ in range(5):
        start = clock()
        top = torch.stack([head_max_logits(q, k, c.softmax_scale) for _ in layers])
        clip.apply(layers, top)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, clock() - start)
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threshold", type=float, default=100.0, help="τ (K2: 100); the rescale runs either way")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (0: torch's default)")
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu_clock = args.clock == "cpu" and device.type == "cpu"
    clock = time.process_time if cpu_clock else time.perf_counter
    config = get_preset("tiny")
    runs = {}
    for name, clip in (("off", None), ("on", QKClip(args.threshold))):
        model = build_model(config, device=device, seed=0)
        runs[name] = (model, build_muon(model, lr=1e-3, weight_decay=0.1), clip)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, config.vocab_size, (args.batch, args.seq_len + 1), generator=gen).to(device)
               for _ in range(args.rounds + 1)]
    times = {name: [] for name in runs}
    clipped = 0
    for i, ids in enumerate(batches):  # batch 0 warms up (lazy state, allocator)
        for name, (model, opt, clip) in runs.items():
            seconds, heads = timed_step(model, opt, ids, clip, device, clock)
            if i:
                times[name].append(seconds)
                clipped += heads
    ratios = [on / off for on, off in zip(times["on"], times["off"])]
    added = added_work(runs["on"][0], runs["on"][2], args.batch, args.seq_len, device, clock)
    print(f"tiny: {config.num_hidden_layers} layers x {config.num_attention_heads} heads, micro-batch "
          f"{args.batch} x {args.seq_len} tokens, {args.rounds} rounds on {device.type} "
          f"({torch.get_num_threads()} threads, {'CPU' if cpu_clock else 'wall'} time), tau={args.threshold:g} "
          f"({clipped} head-steps clipped)")
    print(f"{'qk-clip':<8} {'median s':>10} {'min s':>10}")
    for name, values in times.items():
        print(f"{name:<8} {statistics.median(values):>10.3f} {min(values):>10.3f}")
    print(f"per-pair on/off ratio: median {statistics.median(ratios):.4f}, min {min(ratios):.4f}, "
          f"max {max(ratios):.4f}")
    print(f"the added work alone (per-head max logits of every layer + the rescale, best of 5): {added:.4f} s = "
          f"{added / statistics.median(times['off']):.4f} of a step off")
    print(f"qk_clip_overhead: {statistics.median(ratios) - 1:.4f}")


if __name__ == "__main__":
    main()
