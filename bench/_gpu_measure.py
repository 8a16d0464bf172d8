"""The figures bench/gpu_suite.sh measures on one GPU, one measurement per process (a CUDA fault in one cannot
spoil the others). `size="full"` is the issue's shapes on CUDA; `size="toy"` runs the same code at a size of
seconds on the CPU (the suite's --dry-run). Each measurement returns {"figures": {name: value}, "details": {...}}.

- `peak`: a large bf16 matmul (the ceiling MFU is also read against, next to the datasheet's 989 TFLOP/s).
- `train`: the `small` preset trained with Muon + AdamW in plain PyTorch over components/ (no Lightning, no MLflow,
  no data loading: random tokens), at app/configs/small-gpu.yaml's sequence length, micro-batch, global batch and
  bf16 autocast: tokens/s, MFU (FLOPs from components/model/counting.py), and the optimizer step as a fraction
  of the step's forward+backward.
- `optimizer`: our Muon + AdamW step vs torch.optim.Muon + AdamW on the same model and gradients.
- `newton_schulz`: ours vs torch.optim.Muon's iteration on bench/newton_schulz.py's shapes, bf16, 5 quintic steps.
- `moe`: forward+backward of our model vs transformers' DeepseekV3ForCausalLM (its default experts implementation,
  grouped_mm) with the same weights, in bf16 weights and under bf16 autocast over fp32 weights.
Usage: python -m bench._gpu_measure NAME [NAME ...] --device cuda|cpu --size full|toy --json-dir DIR
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from torch.utils.benchmark import Timer

from components.model.config import get_preset
from components.model.counting import flops_per_token
from components.model.transformer import build_model

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "app/configs/small-gpu.yaml"
H200_BF16_PEAK = 989e12  # dense bf16, H200 SXM datasheet (the figure)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, min_run_time: float) -> float:
    """Median time of fn() by torch.utils.benchmark (synchronizes CUDA around its blocks)."""
    return Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def measure_peak(device: torch.device, size: str) -> dict:
    n, dtype = (8192, torch.bfloat16) if size == "full" else (256, torch.float32)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))  # random data: zeros run faster
    seconds = median_seconds(lambda: a @ b, 1.0 if size == "full" else 0.05)
    return {"figures": {"bf16_matmul_tflops": 2 * n**3 / seconds / 1e12},
            "details": {"n": n, "dtype": str(dtype), "seconds": seconds}}


def train_setup(size: str) -> dict:
    """Shapes of the `train` measurement: small-gpu.yaml's (full), or a tiny model's (toy)."""
    if size == "toy":
        return {"preset": "tiny", "overrides": {"num_hidden_layers": 2}, "seq_len": 64, "micro_batch": 2,
                "global_batch": 4, "autocast": True, "steps": 1, "warmup": 1}
    import yaml

    from components.schedule import resolve_schedule

    config = yaml.safe_load(CONFIG.read_text())
    schedule = resolve_schedule(config["model"]["schedule"])
    return {"preset": config["model"]["preset"], "overrides": config["model"].get("model_overrides") or {},
            "seq_len": schedule.seq_len, "micro_batch": config["data"]["micro_batch_size"],
            "global_batch": schedule.at(schedule.total_tokens // 2).batch_size,  # the batch of the main stage
            "autocast": "bf16" in str(config["trainer"]["precision"]), "steps": 2, "warmup": 1}


def measure_train(device: torch.device, size: str) -> dict:
    from components.model.balancing import update_routing_biases
    from components.optim.routing import build_muon

    s = train_setup(size)
    config = get_preset(s["preset"], **s["overrides"])
    model = build_model(config, device=device, seed=0)
    opt = build_muon(model, lr=1e-3, weight_decay=0.1)
    accum = s["global_batch"] // s["micro_batch"]
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, config.vocab_size, (s["micro_batch"], s["seq_len"] + 1), generator=gen,
                             dtype=torch.int32).to(device) for _ in range(accum)]

    def forward_backward():
        counts, loss = None, 0.0
        for ids in batches:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=s["autocast"]):
                out = model(ids[:, :-1], targets=ids[:, 1:])
            (out.loss / accum).backward()
            loss = loss + out.loss.detach() / accum
            counts = out.expert_counts if counts is None else counts + out.expert_counts
        return loss, counts

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    fwd_bwd, steps, losses = [], [], []
    for k in range(s["warmup"] + s["steps"]):
        sync(device)
        t0 = time.perf_counter()
        loss, counts = forward_backward()
        sync(device)
        t1 = time.perf_counter()
        opt.step()
        update_routing_biases(model.moe_layers(), counts, 1e-3)
        opt.zero_grad(set_to_none=True)
        sync(device)
        t2 = time.perf_counter()
        losses.append(float(loss))
        if k >= s["warmup"]:
            fwd_bwd.append(t1 - t0)
            steps.append(t2 - t1)
    step_tokens = s["global_batch"] * s["seq_len"]
    step_time = statistics.median(a + b for a, b in zip(fwd_bwd, steps))
    tokens_per_s = step_tokens / step_time
    fpt = flops_per_token(config, s["seq_len"])
    figures = {"small_train_tokens_per_s": tokens_per_s,
               "small_mfu": tokens_per_s * fpt / H200_BF16_PEAK,
               "muon_step_fraction_of_fwd_bwd": statistics.median(steps) / statistics.median(fwd_bwd)}
    details = {**s, "config_file": str(CONFIG.relative_to(ROOT)), "flops_per_token": fpt,
               "tokens_per_optimizer_step": step_tokens, "fwd_bwd_s": fwd_bwd, "optimizer_step_s": steps,
               "losses": losses, "ns_seconds_last_step": opt.last_stats.get("ns_seconds")}
    if device.type == "cuda":
        details["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return {"figures": figures, "details": details}


def measure_optimizer(device: torch.device, size: str) -> dict:
    """Our Muon + AdamW step vs torch.optim.Muon + AdamW (bench/optimizer_step.py's construction: each expert of a
    stack handed to torch as its own 2-D parameter) on the train measurement's model, same gradients."""
    from bench.optimizer_step import step_all, torch_muon_and_adamw
    from components.optim.routing import build_muon

    s = train_setup(size)
    config = get_preset(s["preset"], **s["overrides"])
    model = build_model(config, device=device, seed=0)
    ids = torch.randint(0, config.vocab_size, (s["micro_batch"], s["seq_len"] + 1),
                        generator=torch.Generator().manual_seed(0)).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=s["autocast"]):
        loss = model(ids[:, :-1], targets=ids[:, 1:]).loss
    loss.backward()  # real gradients of one micro-batch (the step's cost does not depend on their values)
    ours = build_muon(model, lr=1e-3, weight_decay=0.1)
    theirs = torch_muon_and_adamw(model)
    run_time = 1.0 if size == "full" else 0.05
    ours_s = median_seconds(ours.step, run_time)
    theirs_s = median_seconds(lambda: step_all(theirs), run_time)
    return {"figures": {"muon_step_vs_torch": theirs_s / ours_s},
            "details": {"preset": s["preset"], "our_step_s": ours_s, "torch_step_s": theirs_s,
                        "ns_seconds_last_step": ours.last_stats.get("ns_seconds")}}


def measure_newton_schulz(device: torch.device, size: str) -> dict:
    from bench.newton_schulz import CASES, torch_ns
    from components.optim.newton_schulz import QUINTIC, newton_schulz

    coeffs = QUINTIC.triples[0]
    run_time = 0.3 if size == "full" else 0.02
    rows, ratios = [], {"standard": [], "auto": []}
    for name, shape in CASES:
        if size == "toy":
            shape = tuple(max(8, d // 8) if i >= len(shape) - 2 else d for i, d in enumerate(shape))
        g = torch.randn(*shape, device=device, generator=torch.Generator(device).manual_seed(0))

        def theirs(g=g):
            return torch_ns(g, coeffs, 5, 1e-7) if g.ndim == 2 else torch.stack([torch_ns(m, coeffs, 5, 1e-7)
                                                                                   for m in g])

        t_theirs = median_seconds(theirs, run_time)
        row = {"case": name, "shape": list(shape), "torch_ms": 1e3 * t_theirs}
        for method in ratios:
            t = median_seconds(lambda g=g, m=method: newton_schulz(g, 5, "quintic", torch.bfloat16,
                                                                   out_dtype=torch.bfloat16, method=m), run_time)
            row[f"ours_{method}_ms"] = 1e3 * t
            ratios[method].append(t_theirs / t)
        rows.append(row)
    return {"figures": {"ns_speedup_vs_torch": geomean(ratios["standard"]),
                        "ns_speedup_vs_torch_auto": geomean(ratios["auto"])},
            "details": {"cases": rows, "method": "standard (figure), auto (second figure)"}}


MOE_CONFIGS = {  # name: (full config, batch, seq), (toy config, batch, seq)
    "small (16 experts, top-4)": ((get_preset("small"), 8, 2048),
                                  (get_preset("tiny", num_hidden_layers=2), 2, 64)),
    "moonlight layer (64 experts, top-6), 2 layers": (
        (get_preset("moonlight-16b-a3b", num_hidden_layers=2, vocab_size=32768), 4, 2048),
        (get_preset("tiny", num_hidden_layers=2, n_routed_experts=16, num_experts_per_tok=4), 2, 64)),
}


def _fwd_bwd(model, ids) -> torch.Tensor:
    out = model(ids, labels=ids) if hasattr(model, "generation_config") else model(ids, targets=ids)
    out.loss.backward()
    model.zero_grad(set_to_none=True)
    return out.loss.detach()


def _compare(ours, theirs, ids, autocast: bool, rounds: int, device: torch.device) -> dict:
    """Median fwd+bwd tokens/s of both models, alternating (drift hits both), after one warm-up pass each."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        losses = {"ours": float(_fwd_bwd(ours, ids)), "theirs": float(_fwd_bwd(theirs, ids))}
        times = {"ours": [], "theirs": []}
        for _ in range(rounds):
            for who, model in (("ours", ours), ("theirs", theirs)):
                sync(device)
                t = time.perf_counter()
                _fwd_bwd(model, ids)
                sync(device)
                times[who].append(time.perf_counter() - t)
    ours_tps, theirs_tps = (ids.numel() / statistics.median(times[w]) for w in ("ours", "theirs"))
    return {"ours_tokens_per_s": ours_tps, "transformers_tokens_per_s": theirs_tps, "speedup": ours_tps / theirs_tps,
            "loss_ours": losses["ours"], "loss_transformers": losses["theirs"]}


def measure_moe(device: torch.device, size: str) -> dict:
    import transformers

    from components.model.hf import config_to_hf, load_hf

    rounds = 5 if size == "full" else 2
    rows, ratios, errors = [], {"bf16": [], "autocast": []}, []
    for name, (full, toy) in MOE_CONFIGS.items():
        config, batch, seq = full if size == "full" else toy
        hf_cfg = transformers.DeepseekV3Config(**{k: v for k, v in config_to_hf(config).items()
                                                 if k not in ("architectures", "model_type")})
        torch.manual_seed(0)
        with torch.device(device):
            theirs = transformers.DeepseekV3ForCausalLM(hf_cfg).train()
        with tempfile.TemporaryDirectory() as tmp:
            theirs.save_pretrained(tmp)
            ours = load_hf(tmp, device=device).train()
        ids = torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
        row = {"config": name, "batch": batch, "seq_len": seq,
               "transformers_experts": getattr(theirs.config, "_experts_implementation", None),
               "transformers_attention": getattr(theirs.config, "_attn_implementation", None)}
        for mode in ("autocast", "bf16"):  # autocast first: it needs the fp32 weights that bf16 mode converts
            if mode == "bf16":
                ours.to(torch.bfloat16), theirs.to(torch.bfloat16)
            try:
                row[mode] = _compare(ours, theirs, ids, mode == "autocast", rounds, device)
                ratios[mode].append(row[mode]["speedup"])
            except (RuntimeError, NotImplementedError) as err:  # e.g. an fp32 grouped_mm refused in transformers
                row[mode] = {"error": f"{type(err).__name__}: {str(err)[:500]}"}
                if mode == "bf16":  # the goal's figure; autocast's (no goal) only says why it is missing
                    errors.append(f"{name}, {mode}: {row[mode]['error']}")
        rows.append(row)
        del ours, theirs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    n = len(MOE_CONFIGS)
    figures = {f"moe_speedup_vs_transformers{suffix}": geomean(ratios[mode])
               for mode, suffix in (("bf16", ""), ("autocast", "_autocast")) if len(ratios[mode]) == n}
    return {"figures": figures, "details": {"configs": rows, "transformers": transformers.__version__},
            "error": "; ".join(errors) or None}


MEASUREMENTS = {"peak": measure_peak, "train": measure_train, "optimizer": measure_optimizer,
                "newton_schulz": measure_newton_schulz, "moe": measure_moe}


def environment() -> dict:
    """What the figures were measured with (the report's header)."""
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda_available":
           torch.cuda.is_available(), "host_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    for module in ("transformers", "lightning", "triton", "pytest"):  # metadata only: importing costs seconds
        try:
            env[module] = importlib.metadata.version(module)
        except importlib.metadata.PackageNotFoundError:
            env[module] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                   memory_gib=props.total_memory / 2**30)
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip() or None
        except (OSError, subprocess.TimeoutExpired):
            env["driver"] = None
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="+", choices=sorted(MEASUREMENTS), metavar="NAME")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--size", default="full", choices=["full", "toy"])
    parser.add_argument("--json-dir", required=True, type=Path, help="NAME.json per measurement, environment.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.size == "toy":
        torch.set_num_threads(1)  # toy sizes gain nothing from threads on a shared CPU (measured: 3x slower with 2)
    args.json_dir.mkdir(parents=True, exist_ok=True)
    (args.json_dir / "environment.json").write_text(json.dumps(environment(), indent=1) + "\n")
    failed = 0
    for name in args.names:
        start = time.perf_counter()
        try:
            result = {"error": None, **MEASUREMENTS[name](device, args.size)}  # a partial result may say error
        except Exception:  # noqa: BLE001 - one measurement's failure is reported, the next one still runs
            result, failed = {"figures": {}, "details": {}, "error": traceback.format_exc()[-3000:]}, failed + 1
            print(f"measurement {name} failed:\n{result['error']}", file=sys.stderr, flush=True)
        result["wall_s"] = time.perf_counter() - start
        (args.json_dir / f"{name}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
        for figure, value in result["figures"].items():
            print(f"{name}/{figure}: {value:.4g}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
