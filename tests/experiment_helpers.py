"""Shared by the experiment tests: a spec over the training tests' small real corpus, tiny budgets, and running
`crescent experiment` as a subprocess."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import train_helpers as th
import yaml

MODEL = {"vocab_size": th.VOCAB, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 1,
         "qk_nope_head_dim": 16, "qk_rope_head_dim": 16, "v_head_dim": 32, "kv_lora_rank": 32,
         "intermediate_size": 64, "max_position_embeddings": 128}
STEP_TOKENS = 8 * th.SEQ_LEN


def write_spec(root: Path, corpus: dict, arms: list[dict], steps: int = 4, **top) -> Path:
    base = th.write_config(root / "base.yaml", corpus, root / "unused-run", "sqlite:///unused.db", STEP_TOKENS * steps)
    spec = {"name": "test-exp", "kind": "generic", "config": str(base), "tokens": STEP_TOKENS * steps,
            "seeds": [0, 1], "exports": 1, "evals": 1,
            "schedule": {"seq_len": th.SEQ_LEN, "batch_size": 8, "peak_lr": 3e-3, "mixture": {"prose": 1.0}},
            "overrides": {"model.preset": "tiny-dense", "model.model_overrides": MODEL,
                          "data.micro_batch_size": 4, "data.val_samples": 8, "trainer.limit_val_batches": 1,
                          "run.svd_entropy_every_n_steps": 1000, "run.max_logit_every_n_steps": 0,
                          "run.plot_every_n_steps": 1000},
            "arms": arms, "sizes": {"cpu": {}, "gpu": {}}, **top}
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def experiment_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "app.cli", "experiment", *args]


def run_experiment(*args: str, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(experiment_cmd(*args), cwd=cwd, env={**th.env(), "PYTHONPATH": str(th.ROOT)},
                          capture_output=True, text=True, timeout=timeout)


def children(uri: str) -> dict[str, object]:
    """point id -> runs of it (MLflow's own view: every child of every parent in the store)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("crescent-experiments")
    out: dict[str, list] = {}
    if exp is None:
        return out
    for r in client.search_runs([exp.experiment_id]):
        if "crescent.point" in r.data.tags:
            out.setdefault(r.data.tags["crescent.point"], []).append(r)
    return out


def launches(work_dir: Path, point: str) -> int:
    """How often the runner started `crescent train` for a point (one `=== <time> <command>` header per start in its
    log; the `=== exit` footer a finished launch adds is not a start)."""
    log = work_dir / "logs" / f"{point}.log"
    lines = log.read_text().splitlines() if log.exists() else []
    return sum(line.startswith("=== ") and not line.startswith("=== exit") for line in lines)
