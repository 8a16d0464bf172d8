"""SFT throughput, packed against padded, on the demo chat set, in the same run.

Both variants hold the same conversations (data/demo/raw/chat-train.jsonl, built by `crescent data demo` if
missing): `packed` is the demo chat set (best-fit packing, document-masked attention: SDPA with a boolean mask on
CPU, FlexAttention on CUDA), `padded` the same conversations one per sample (`packing="none"`, plain causal
attention). Each trains the tiny MoE for the same number of micro-batches (forward, backward, AdamW step) from the
real loader; the table shows slots/s, real (non-padding) tokens/s, target tokens/s and the fraction of slots that
hold real and target tokens. Last line: `sft_packing_speedup: <packed real tokens/s / padded real tokens/s>`
(goal >= 1.5).

    python -m bench.sft_packing [--steps 12] [--micro-batch 16] [--demo data/demo]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from app.sft import packed_inputs
from components.data.chat_build import build_chat_shards
from components.data.demo import DEFAULT_DIR, build_demo
from components.data.loader import StreamLoader
from components.data.stream import MixtureStream
from components.model.config import get_preset
from components.model.transformer import build_model


def measure(location: str, steps: int, micro_batch: int, warmup: int = 2) -> dict:
    stream = MixtureStream({"sft": location}, {"sft": 1.0}, micro_batch_size=micro_batch, num_streams=micro_batch,
                           num_workers=1)
    torch.manual_seed(0)
    model = build_model(get_preset("tiny"), seed=0).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    totals = {"slots": 0, "real": 0, "targets": 0}
    start = None
    for k, batch in enumerate(StreamLoader(stream)):
        if k == warmup:
            start = time.perf_counter()
        out = model(batch["input_ids"], targets=batch["targets"], **packed_inputs(batch))
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if k >= warmup:
            totals["slots"] += batch["input_ids"].numel()
            totals["real"] += int(batch["chat_tokens"][0])
            totals["targets"] += int(batch["chat_tokens"][1])
        if k == warmup + steps - 1:
            break
    return {**totals, "seconds": time.perf_counter() - start}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12, help="timed micro-batches per variant")
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--demo", default=DEFAULT_DIR, help="the demo directory (built if missing)")
    args = parser.parse_args()
    paths = build_demo(args.demo)
    with tempfile.TemporaryDirectory(prefix="crescent-sft-bench-") as tmp:
        seq_len = 256
        padded = Path(tmp) / "padded"
        build_chat_shards([str(paths.root / "raw" / "chat-train.jsonl")], padded, paths.tokenizer, seq_len=seq_len,
                          packing="none", shard_samples=256)
        rows = {"packed": measure(str(paths.chat["train"]), args.steps, args.micro_batch),
                "padded": measure(str(padded), args.steps, args.micro_batch)}
    print(f"{'variant':8s} {'slots/s':>10s} {'real tok/s':>11s} {'target tok/s':>13s} {'real share':>11s} "
          f"{'target share':>13s} {'seconds':>8s}")
    for name, r in rows.items():
        s = r["seconds"]
        print(f"{name:8s} {r['slots'] / s:10,.0f} {r['real'] / s:11,.0f} {r['targets'] / s:13,.0f} "
              f"{r['real'] / r['slots']:11.3f} {r['targets'] / r['slots']:13.3f} {s:8.2f}")
    print(f"tiny MoE, micro-batch {args.micro_batch} x {seq_len}, {args.steps} timed micro-batches per variant, "
          f"{torch.get_num_threads()} threads")
    speedup = (rows["packed"]["real"] / rows["packed"]["seconds"]) / (rows["padded"]["real"] / rows["padded"]["seconds"])
    print(f"sft_packing_speedup: {speedup:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
