"""`crescent train` fine-tuning from an export on a chat set: 2 epochs, SIGTERM mid-epoch and resume bitwise equal to
an uninterrupted run, the MLflow lineage and SFT metrics, the chat template in the final export, a tokenizer that
does not match the data. Real subprocesses, real shards, a real sqlite MLflow store."""
from __future__ import annotations

import json

import pytest
import torch
import train_helpers as th
from safetensors.torch import load_file
from test_sft_data import _records, _write_jsonl

from components.data.chat import get_template

SEQ_LEN = 64
EPOCHS = 2
BATCH = 16
PRETRAIN_RUN = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tokenizer with the template's tokens, an export of a tiny model, train and val chat sets."""
    from test_eval_fixtures import corpus_text

    from components.checkpoint import save_export
    from components.data.chat_build import build_chat_shards
    from components.data.tokenizer import train_bpe
    from components.model.config import get_preset
    from components.model.transformer import build_model

    root = tmp_path_factory.mktemp("sft")
    tok = root / "tokenizer"
    train_bpe([corpus_text(100_000)], th.VOCAB, tok, special_tokens=get_template("moonlight").special_tokens)
    config = get_preset("tiny", vocab_size=th.VOCAB, num_hidden_layers=2, max_position_embeddings=128)
    export = save_export(build_model(config, seed=5), root / "pretrain" / "exports", step=40, tokenizer_dir=tok,
                         run_id=PRETRAIN_RUN, tracking_uri="sqlite:///pretrain.db")
    records = _records(150, seed=1)
    sets = {}
    for split, part in (("train", records[:130]), ("val", records[130:])):
        src = _write_jsonl(root / f"{split}.jsonl", part)
        sets[split] = build_chat_shards([str(src)], root / split, tok, seq_len=SEQ_LEN, shard_samples=16)
    return {"root": root, "tokenizer": tok, "export": export, "samples": sets["train"]["samples"]}


def _config(setup, run_dir, uri, **overrides):
    """train_helpers' test config turned into fine-tuning: init_from the export, 2 epochs over the chat set."""
    data = {"shards": {}, "val": str(setup["root"] / "val"), "tokenizer": str(setup["tokenizer"])}
    schedule = {"epochs": EPOCHS, "shard_set": str(setup["root"] / "train"), "lr_start": 2e-3, "lr_end": 0.0,
                "batch_size": BATCH}
    overrides = {"model__init_from": str(setup["export"].parent), "model__schedule": schedule,
                 "data__num_workers": 1, "trainer__val_check_interval": 6, "run__svd_entropy_every_n_steps": 50,
                 "trainer__limit_val_batches": 4, **overrides}
    return th.write_config(run_dir.parent / "config.yaml", data, run_dir, uri, 0, **overrides)


def _steps(setup) -> int:
    return EPOCHS * setup["samples"] // BATCH


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    uri = f"sqlite:///{root}/mlruns.db"
    result = th.crescent("train", "--config", str(_config(setup, root / "run", uri)), cwd=root)
    return {"root": root, "uri": uri, "run": root / "run", "stderr": result.stderr}


def _final_export(run_dir):
    return sorted((run_dir / "exports").glob("step-*"))[-1]


def test_sft_run_trains_two_epochs_and_links_to_its_pretraining_run(setup, reference):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(reference["uri"])
    run = client.search_runs([client.get_experiment_by_name("test").experiment_id])[0]
    tags = run.data.tags
    assert tags["crescent.pretrain_run_id"] == PRETRAIN_RUN and tags["crescent.pretrain_step"] == "40"
    assert tags["crescent.init_from"] == str(setup["export"].resolve())
    steps = _steps(setup)
    history = {key: [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]
               for key in ("train/lr", "sft/epoch", "sft/target_fraction", "sft/packing_efficiency", "val/loss")}
    assert len(history["train/lr"]) == steps
    assert history["train/lr"][0] == 2e-3 and history["train/lr"][-1] == pytest.approx(2e-3 / steps, rel=1e-6)
    assert history["sft/epoch"][-1] == pytest.approx(steps * BATCH / setup["samples"]) and history["sft/epoch"][-1] <= 2
    assert all(0.2 < f < 0.9 for f in history["sft/target_fraction"])
    assert all(0.85 < f <= 1.0 for f in history["sft/packing_efficiency"])
    assert history["val/loss"][-1] < history["val/loss"][0]  # held-out assistant tokens
    export = _final_export(reference["run"])
    assert export.name == f"step-{steps:08d}"
    assert json.loads((export / "tokenizer_config.json").read_text())["chat_template"] == \
        get_template("moonlight").jinja()


@pytest.mark.slow
def test_sigterm_mid_epoch_then_resume_matches_uninterrupted_run_bitwise(setup, reference, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    config = _config(setup, tmp_path / "run", uri)
    checkpoints = tmp_path / "run" / "checkpoints"
    returncode, out = th.preempt_after(config, checkpoints / "step-00000004.ckpt", cwd=tmp_path)
    assert returncode == 143, out
    (preempt,) = checkpoints.glob("preempt-step=*.ckpt")
    stopped = int(preempt.stem.split("=")[1])
    assert 4 <= stopped < setup["samples"] // BATCH  # inside the first epoch
    resumed = th.crescent("train", "--config", str(config), cwd=tmp_path)
    assert "resuming from" in resumed.stderr
    ours = load_file(_final_export(tmp_path / "run") / "model.safetensors")
    theirs = load_file(_final_export(reference["run"]) / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    steps = [s for s, _ in th.metric_history(uri, "test", "train/loss")]
    assert sorted(steps) == list(range(1, _steps(setup) + 1))


def test_an_export_whose_tokenizer_is_not_the_datas_is_refused(setup, tmp_path):
    from test_eval_fixtures import corpus_text

    from components.checkpoint import save_export
    from components.data.tokenizer import train_bpe
    from components.model.transformer import build_model

    other_tok = tmp_path / "tok"
    train_bpe([corpus_text(30_000)], th.VOCAB, other_tok, special_tokens=get_template("moonlight").special_tokens)
    from components.model.config import get_preset

    config = get_preset("tiny", vocab_size=th.VOCAB, num_hidden_layers=2, max_position_embeddings=128)
    export = save_export(build_model(config), tmp_path / "exports", step=1, tokenizer_dir=other_tok)
    path = _config(setup, tmp_path / "run", f"sqlite:///{tmp_path}/m.db", model__init_from=str(export))
    result = th.crescent("train", "--config", str(path), cwd=tmp_path, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"model.init_from='{export}' has tokenizer fingerprint" in result.stderr
    assert "shard set 'sft' was built with" in result.stderr
