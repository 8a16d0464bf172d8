"""`crescent model PRESET`: parameter counts and training FLOPs per token of a preset (built on the meta device)."""
from __future__ import annotations

import argparse

from components.model.config import PRESETS, get_preset
from components.model.counting import count_parameters, flops_per_token
from components.model.transformer import build_model


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="crescent model", description=__doc__)
    parser.add_argument("preset", choices=sorted(PRESETS))
    parser.add_argument("--seq-len", type=int, default=None, help="sequence length for FLOPs (default: max positions)")
    args = parser.parse_args(argv)
    config = get_preset(args.preset)
    counts = count_parameters(build_model(config, device="meta"))
    seq = args.seq_len or config.max_position_embeddings
    rows = [
        ("total parameters", counts.total),
        ("activated parameters", counts.activated),
        ("total without embeddings", counts.total_without_embeddings),
        ("activated without embeddings", counts.activated_without_embeddings),
        (f"training FLOPs per token (seq {seq})", flops_per_token(config, seq)),
    ]
    for name, value in rows:
        print(f"{name:40s} {value / 1e9:10.4f} B")
    return 0
