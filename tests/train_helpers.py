"""Shared pieces of the training tests: a small real corpus, shards, configs, and running `crescent train`."""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SEQ_LEN = 64
VOCAB = 512
# Held-out sequences: not a multiple of ranks x micro-batch (4), so ranks' shares differ (rank 0 reads one more).
VAL_SAMPLES = 17


def build_corpus(root: Path) -> dict:
    """Two mixtures (prose-like docstrings and code) from the interpreter's standard library, a held-out set,
    and a 512-token BPE. Everything real: tar shards with manifests, a trained tokenizer."""
    from components.data.shards import build_shards
    from components.data.tokenizer import train_bpe

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    prose = root / "src" / "prose"
    code = root / "src" / "code"
    held = root / "src" / "held"
    for d in (prose, code, held):
        d.mkdir(parents=True, exist_ok=True)
    import ast

    docs = []
    for name in ["textwrap.py", "argparse.py", "dataclasses.py", "functools.py", "typing.py", "pathlib.py"]:
        tree = ast.parse((stdlib / name).read_text())
        docs += [ast.get_docstring(n) for n in ast.walk(tree)
                 if isinstance(n, ast.FunctionDef | ast.ClassDef | ast.Module) and ast.get_docstring(n)]
    (prose / "docs.txt").write_text("\n\n".join(docs))
    for name in ["heapq.py", "bisect.py", "colorsys.py", "fnmatch.py"]:
        (code / name).write_text((stdlib / name).read_text())
    (held / "held.txt").write_text((stdlib / "shlex.py").read_text())
    tok_dir = root / "tokenizer"
    train_bpe([prose, code], VOCAB, tok_dir)
    sets = {}
    for name, src in (("prose", prose), ("code", code), ("val", held)):
        build_shards([str(src)], root / name, tok_dir, seq_len=SEQ_LEN, shard_samples=64, seed=0)
        sets[name] = str(root / name)
    return {"shards": {"prose": sets["prose"], "code": sets["code"]}, "val": sets["val"], "tokenizer": str(tok_dir)}


def schedule(total_tokens: int, batch_size: int = 16) -> dict:
    """Three Moonlight-shaped stages over `total_tokens` (warmup, cosine, re-warm cooldown on the code mix)."""
    warm, decay = total_tokens // 8, total_tokens * 3 // 4
    return {
        "seq_len": SEQ_LEN,
        "stages": [
            {"name": "warmup", "end_tokens": warm, "lr_shape": "linear", "lr_start": 0.0, "lr_end": 3e-3,
             "batch_size": batch_size, "mixture": {"prose": 1.0}, "bias_update_rate": 1e-3},
            {"name": "decay", "end_tokens": decay, "lr_shape": "cosine", "lr_start": 3e-3, "lr_end": 3e-4,
             "batch_size": batch_size, "mixture": {"prose": 0.7, "code": 0.3}, "bias_update_rate": 1e-3},
            {"name": "cooldown", "end_tokens": total_tokens, "lr_shape": "rewarm_linear", "lr_start": 3e-4,
             "rewarm_peak": 1e-3, "rewarm_steps": 2, "lr_end": 0.0, "batch_size": batch_size,
             "mixture": {"prose": 0.2, "code": 0.8}, "bias_update_rate": 0.0},
        ],
    }


def write_config(path: Path, corpus: dict, run_dir: Path, tracking_uri: str, total_tokens: int,
                 **overrides) -> Path:
    config = {
        "run": {"dir": str(run_dir), "checkpoint_every_n_steps": 2, "keep_last": 2, "export_every_n_steps": 1000,
                "experiment": "test", "tracking_uri": tracking_uri, "log_every_n_steps": 1,
                "svd_entropy_every_n_steps": 3, "max_logit_every_n_steps": 2, "progress_bar": False},
        "model": {"preset": "tiny", "model_overrides": {"vocab_size": VOCAB, "num_hidden_layers": 2,
                                                        "max_position_embeddings": 128},
                  "optimizer": "muon", "schedule": schedule(total_tokens), "ns_dtype": "float32"},
        "data": {"shards": corpus["shards"], "val_shards": corpus["val"], "tokenizer": corpus["tokenizer"],
                 "micro_batch_size": 4, "num_workers": 0, "val_samples": VAL_SAMPLES, "num_streams": 96},
        "trainer": {"accelerator": "cpu", "devices": 1, "precision": "32-true", "val_check_interval": 8,
                    "limit_val_batches": 2, "log_every_n_steps": 1, "enable_model_summary": False,
                    "enable_progress_bar": False},
    }
    for dotted, value in overrides.items():
        section, key = dotted.split("__", 1)
        config[section][key] = value
    path.write_text(yaml.safe_dump(config))
    return path


def train_once(root: Path, corpus: dict, total_tokens: int, **overrides) -> tuple[str, subprocess.CompletedProcess]:
    """One uninterrupted `crescent train` of `write_config`'s config in `root` (run directory root/run, MLflow in
    root/mlruns.db): the tracking URI and the finished process."""
    uri = f"sqlite:///{root}/mlruns.db"
    config = write_config(root / "config.yaml", corpus, root / "run", uri, total_tokens, **overrides)
    return uri, crescent("train", "--config", str(config), cwd=root)


def poison_forward(module, poisoned, poison=lambda loss: loss * float("nan")) -> None:
    """From now on, the loss of each micro-batch n (counted from 0) for which `poisoned(n)` holds goes through
    `poison` (default: times NaN, as a diverged forward pass would): wraps `module.model.forward` (call it from a
    callback's `on_train_start`)."""
    forward, micro = module.model.forward, itertools.count()

    def poisoned_forward(*args, **kwargs):
        out = forward(*args, **kwargs)
        if poisoned(next(micro)):
            out.loss = poison(out.loss)
        return out

    module.model.forward = poisoned_forward


def fit_in_process(corpus: dict, callback, max_steps: int, trainer_args: dict | None = None,
                   data_args: dict | None = None, ckpt_path: str | Path | None = None, total_tokens: int = 200_000,
                   **module_args):
    """A real Lightning fit in this process on the CPU: the tiny model (2 layers) over `corpus`, two micro-batches
    of 4 a step, `callback` (one or a list) watching (`trainer_args`, `data_args`: more pl.Trainer and
    CrescentDataModule arguments; `ckpt_path`: resume from it; `total_tokens`: the schedule's); returns the module."""
    import lightning.pytorch as pl

    from app.datamodule import CrescentDataModule
    from app.module import CrescentModule

    steps = schedule(total_tokens, batch_size=8)
    module = CrescentModule(preset="tiny", model_overrides={"vocab_size": VOCAB, "num_hidden_layers": 2,
                                                            "max_position_embeddings": 128},
                            schedule=steps, ns_dtype="float32", **module_args)
    data = CrescentDataModule(**{"shards": corpus["shards"], "tokenizer": corpus["tokenizer"], "micro_batch_size": 4,
                                 "num_workers": 0, "num_streams": 96, "schedule": steps, **(data_args or {})})
    callbacks = callback if isinstance(callback, list) else [callback]
    checkpointing = any(isinstance(c, pl.callbacks.ModelCheckpoint) for c in callbacks)
    trainer = pl.Trainer(**{"accelerator": "cpu", "devices": 1, "max_steps": max_steps, "logger": False,
                            "callbacks": callbacks, "enable_checkpointing": checkpointing,
                            "enable_progress_bar": False, "enable_model_summary": False, "limit_val_batches": 0,
                            "num_sanity_val_steps": 0, **(trainer_args or {})})
    trainer.fit(module, datamodule=data, ckpt_path=None if ckpt_path is None else str(ckpt_path))
    return module


def env() -> dict:
    e = dict(os.environ)
    e.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
              "HF_HUB_OFFLINE": "1"})
    return e


def crescent(*args: str, cwd: Path, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "app.cli", *args]
    result = subprocess.run(cmd, cwd=cwd, env={**env(), "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def preempt_after(config: Path, checkpoint: Path, cwd: Path, extra_env: dict | None = None,
                  timeout: float = 300) -> tuple[int, str]:
    """Start `crescent train --config CONFIG`, send it SIGTERM (what Kubernetes sends) once `checkpoint` exists, and
    return (exit status, output) when it has stopped."""
    import signal
    import time

    cmd = [sys.executable, "-m", "app.cli", "train", "--config", str(config)]
    proc = subprocess.Popen(cmd, cwd=cwd, env={**env(), "PYTHONPATH": str(ROOT), **(extra_env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + timeout
    while not checkpoint.exists():
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def metric_history(tracking_uri: str, experiment: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, f"expected one run, found {len(runs)}"
    return [(m.step, m.value) for m in client.get_metric_history(runs[0].info.run_id, key)]


def dump(obj) -> str:
    return json.dumps(obj, indent=1, default=str)
