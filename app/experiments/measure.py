"""Measurements taken from a finished point's export checkpoints (what the training run does not log itself):

- matrix_rms: weight RMS of the attention query/output and MLP matrices at the end (Table 1's [H, H] and [H, 4H]
  columns; mean over layers);
- hidden_rms_over_tokens: at every export, the RMS over all hidden matrices and the RMS of every decoder layer's
  output on held-out samples (Fig. 2's "weight and layer output RMS" growth);
- svd_entropy_by_matrix: the SVD entropy of every matrix at the end (Fig. 4's "fraction of matrices higher");
- eval_tasks: `crescent eval run` on the final export (its metrics land in the point's own run).

Each is logged into the point's run (`measure/...`, at the export's step), so the report reads it from MLflow.
"""
from __future__ import annotations

import math
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from components.checkpoint import list_exports, load_export, read_metadata
from components.metrics.svd_entropy import group_of, svd_entropy

MATRICES = {
    "attn_q": re.compile(r"self_attn\.(q_proj|q_b_proj)\.weight$"),
    "attn_o": re.compile(r"self_attn\.o_proj\.weight$"),
    "mlp_up": re.compile(r"mlp\.(up_proj|fc1)\.weight$"),
    "mlp_down": re.compile(r"mlp\.(down_proj|fc2)\.weight$"),
}


def rms(t: torch.Tensor) -> float:
    return float(t.detach().float().square().mean().sqrt())


def matrix_rms(model) -> dict[str, float]:
    """Mean over layers of each named matrix's RMS."""
    sums: dict[str, list[float]] = {}
    for name, p in model.named_parameters():
        for key, pattern in MATRICES.items():
            if pattern.search(name):
                sums.setdefault(key, []).append(rms(p))
    return {f"measure/{k}_rms": sum(v) / len(v) for k, v in sums.items()}


def hidden_matrices(model) -> list[tuple[str, torch.Tensor]]:
    """2-D weights inside the decoder layers (what Muon updates; embeddings, head and norms excluded)."""
    return [(n, p) for n, p in model.named_parameters() if ".layers." in n and p.ndim >= 2]


@torch.no_grad()
def layer_output_rms(model, input_ids: torch.Tensor) -> list[float]:
    outputs: list[float] = []
    hooks = [layer.register_forward_hook(lambda _m, _i, out: outputs.append(rms(out[0] if isinstance(out, tuple)
                                                                                 else out)))
             for layer in model.model.layers]
    try:
        model(input_ids)
    finally:
        for h in hooks:
            h.remove()
    return outputs


def held_out_ids(val_shards: str, samples: int = 8) -> torch.Tensor:
    from components.data.stream import MixtureStream

    stream = MixtureStream({"val": val_shards}, {"val": 1.0}, micro_batch_size=1, num_streams=1,
                           stop_samples=samples)
    return torch.stack([row["input_ids"] for row in stream])


def hidden_rms_at(export: Path, input_ids: torch.Tensor | None) -> dict[str, float]:
    model, _ = load_export(export)
    weights = torch.cat([p.detach().float().flatten() for _, p in hidden_matrices(model)])
    out = {"measure/hidden_matrix_rms": rms(weights)}
    if input_ids is not None:
        layers = layer_output_rms(model, input_ids)
        out["measure/layer_output_rms"] = sum(layers) / len(layers)
        out["measure/layer_output_rms_max"] = max(layers)
    return out


def svd_entropy_by_matrix(model, experts_per_layer: int = 3) -> dict[str, float]:
    out = {}
    for name, p in model.named_parameters():
        if group_of(name) is None:
            continue
        mats = p.unbind(0)[:experts_per_layer] if p.ndim == 3 else [p]
        for i, m in enumerate(mats):
            key = name if p.ndim == 2 else f"{name}.{i}"
            out[f"measure/svd/{key}"] = svd_entropy(m)
    return out


def svd_matrix_group(key: str) -> str | None:
    """The paper group of a `measure/svd/...` key from svd_entropy_by_matrix (an expert's key ends in `.INDEX`)."""
    name = key.removeprefix("measure/svd/")
    head, _, tail = name.rpartition(".")
    return group_of(head) if tail.isdigit() else group_of(name)


def measure_point(client, tracking_uri: str, run_id: str, run_dir: Path, measurements: tuple[str, ...],
                  val_shards: str | None, eval_options: dict | None = None,
                  cwd: Path | None = None) -> dict[str, float]:
    """Take `measurements` from the exports in run_dir/exports and log them into run `run_id`."""
    from mlflow.entities import Metric

    exports = list_exports(run_dir / "exports")
    if not exports:
        raise FileNotFoundError(f"{run_dir / 'exports'} holds no export checkpoint to measure")
    final = exports[-1]
    step = read_metadata(final)["step"]
    rows: list[tuple[int, dict[str, float]]] = []
    if "matrix_rms" in measurements or "svd_entropy_by_matrix" in measurements:
        model, _ = load_export(final)
        values = {}
        if "matrix_rms" in measurements:
            values.update(matrix_rms(model))
        if "svd_entropy_by_matrix" in measurements:
            values.update(svd_entropy_by_matrix(model))
        rows.append((step, values))
    if "hidden_rms_over_tokens" in measurements:
        ids = held_out_ids(val_shards) if val_shards else None
        for export in exports:
            meta = read_metadata(export)
            values = hidden_rms_at(export, ids)
            values["measure/tokens"] = float(meta.get("tokens_seen", math.nan))
            rows.append((meta["step"], values))
    if "eval_tasks" in measurements:
        run_eval(final, eval_options or {}, tracking_uri, cwd)
    now = int(time.time() * 1000)
    metrics = [Metric(key, float(v), now, s) for s, values in rows for key, v in values.items()]
    for i in range(0, len(metrics), 900):
        client.log_batch(run_id, metrics=metrics[i:i + 900], synchronous=True)
    return {k: v for _, values in rows[-1:] for k, v in values.items()}


def run_eval(export: Path, options: dict, tracking_uri: str | None, cwd: Path | None) -> None:
    """`crescent eval run` on the export: lm-eval's scores go into the point's run (the export names it)."""
    tasks = options.get("tasks", "mmlu,gsm8k")
    cmd = [sys.executable, "-m", "app.cli", "eval", "run", "--checkpoint", str(export), "--tasks", tasks]
    if options.get("limit"):
        cmd += ["--limit", str(options["limit"])]
    if options.get("data_dir"):
        cmd += ["--data-dir", str(options["data_dir"])]
    if tracking_uri:
        cmd += ["--tracking-uri", tracking_uri]
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"crescent eval run exited {result.returncode}: {result.stderr.strip()[-2000:]}")
