"""Muon vs AdamW on `tiny`: each with its best lr from a small sweep, same data, same tokens.

Reports how many tokens Muon needs to reach AdamW's final validation loss, as a fraction of the run (the paper finds
about 0.52 of the compute at scale). Last line: `muon_tokens_to_match_adamw: X`.
"""
from __future__ import annotations

from bench._train_runs import history, train

LR_SCALES = (0.3, 1.0, 3.0)
STEPS = 60  # ~0.3M tokens of the tiny schedule


def run(optimizer: str, lr_scale: float) -> list[tuple[float, float]]:
    r = train(["--model.optimizer", optimizer, "--model.lr_scale", str(lr_scale), "--trainer.max_steps", str(STEPS),
               "--trainer.val_check_interval", "20", "--run.svd_entropy_every_n_steps", "1000"],
              f"{optimizer}-{lr_scale}")
    tokens = {s: v for s, v, _ in history(r, "train/tokens")}
    return [(tokens.get(s, 0.0), v) for s, v, _ in history(r, "val/loss")]


def tokens_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """First token count at which the (linearly interpolated) validation curve reaches `target`."""
    for (t0, v0), (t1, v1) in zip(curve, curve[1:]):
        if v1 <= target:
            return t0 + (t1 - t0) * (v0 - target) / (v0 - v1) if v0 > target else t0
    return None


def main() -> None:
    results = {(opt, lr): run(opt, lr) for opt in ("adamw", "muon") for lr in LR_SCALES}
    print(f"{'optimizer':10s} {'lr scale':>8s} {'final val loss':>15s}")
    for (opt, lr), curve in results.items():
        print(f"{opt:10s} {lr:8.1f} {curve[-1][1]:15.4f}")
    best = {opt: min((c for (o, _), c in results.items() if o == opt), key=lambda c: c[-1][1])
            for opt in ("adamw", "muon")}
    target = best["adamw"][-1][1]
    total = best["adamw"][-1][0]
    reach = tokens_to_reach(best["muon"], target)
    ratio = (reach / total) if reach is not None else float("inf")
    print(f"AdamW best final val loss {target:.4f} at {total:,.0f} tokens; Muon reaches it at "
          f"{reach if reach is None else f'{reach:,.0f}'} tokens")
    print(f"muon_tokens_to_match_adamw: {ratio:.3f}")


if __name__ == "__main__":
    main()
