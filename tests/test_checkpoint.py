"""The export checkpoint: HF layout + tokenizer + crescent.json, atomic, listed in step order, DTensor-safe."""
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from test_eval_fixtures import tiny_config, write_tokenizer

from components.checkpoint import list_exports, load_export, read_metadata, save_export
from components.model.transformer import build_model


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return write_tokenizer(tmp_path_factory.mktemp("tok"))


def test_save_then_load_gives_identical_logits_and_metadata(tmp_path, tokenizer_dir):
    model = build_model(tiny_config(), seed=0).eval()
    path = save_export(model, tmp_path, step=120, tokenizer_dir=tokenizer_dir, run_id="abc123",
                       tracking_uri="sqlite:///x.db", extra={"tokens_seen": 4096})
    assert path == tmp_path / "step-00000120"
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "crescent.json"} <= {
        p.name for p in path.iterdir()}
    loaded, meta = load_export(path)
    assert meta["step"] == 120 and meta["run_id"] == "abc123" and meta["tokens_seen"] == 4096
    assert meta["tracking_uri"] == "sqlite:///x.db" and meta["format_version"] == 1 and "created" in meta
    ids = torch.randint(0, 1024, (2, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert not loaded.training


def test_list_exports_orders_by_step_and_skips_incomplete(tmp_path, tokenizer_dir):
    model = build_model(tiny_config(), seed=0)
    for step in (300, 20, 1000):
        save_export(model, tmp_path, step=step)
    (tmp_path / "step-00000500").mkdir()  # no crescent.json: a half-written or foreign directory
    (tmp_path / ".tmp-step-00000600-1234").mkdir()
    (tmp_path / "notes").mkdir()
    assert [p.name for p in list_exports(tmp_path)] == ["step-00000020", "step-00000300", "step-00001000"]
    assert list_exports(tmp_path / "missing") == []


def test_failed_export_leaves_nothing_behind(tmp_path):
    bad_tok = tmp_path / "tok"
    bad_tok.mkdir()
    (bad_tok / "config.json").write_text("{}")  # would overwrite the model config
    model = build_model(tiny_config(), seed=0)
    with pytest.raises(ValueError, match="config.json"):
        save_export(model, tmp_path / "out", step=5, tokenizer_dir=bad_tok)
    assert list((tmp_path / "out").iterdir()) == []


def test_reexport_of_a_step_replaces_it(tmp_path):
    save_export(build_model(tiny_config(), seed=0), tmp_path, step=7, run_id="a")
    save_export(build_model(tiny_config(), seed=1), tmp_path, step=7, run_id="b")
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000007"]
    assert read_metadata(tmp_path / "step-00000007")["run_id"] == "b"


def test_bad_inputs_are_named(tmp_path):
    model = build_model(tiny_config(), seed=0)
    with pytest.raises(ValueError, match="step=-1"):
        save_export(model, tmp_path, step=-1)
    with pytest.raises(ValueError, match="collide"):
        save_export(model, tmp_path, step=1, extra={"step": 3})
    path = save_export(model, tmp_path, step=1)
    meta = json.loads((path / "crescent.json").read_text())
    (path / "crescent.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version=99"):
        load_export(path)
    (path / "crescent.json").unlink()
    with pytest.raises(FileNotFoundError, match="crescent.json is missing"):
        load_export(path)


def _fsdp_worker(rank, world, port, out_dir, reference_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.distributed.fsdp import fully_shard

        model = build_model(tiny_config(), seed=0)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        assert any(hasattr(p, "full_tensor") for p in model.parameters())
        save_export(model, out_dir, step=3)
    finally:
        torch.distributed.destroy_process_group()


def test_fsdp2_sharded_model_exports_full_weights(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_fsdp_worker, args=(2, port, str(tmp_path / "out"), None), nprocs=2, join=True)
    loaded, meta = load_export(tmp_path / "out" / "step-00000003")
    reference = build_model(tiny_config(), seed=0)
    for (name, a), (_, b) in zip(sorted(loaded.state_dict().items()), sorted(reference.state_dict().items())):
        assert torch.equal(a, b), name
    assert meta["step"] == 3


def test_export_tokenizer_loads_in_transformers_like_ours(tmp_path):
    transformers = pytest.importorskip("transformers")
    from test_eval_fixtures import corpus_text

    from components.data.tokenizer import load_tokenizer, train_bpe

    train_bpe([corpus_text(100_000)], vocab_size=600, out_dir=tmp_path / "tok")
    path = save_export(build_model(tiny_config(), seed=0), tmp_path / "out", step=1, tokenizer_dir=tmp_path / "tok")
    ours = load_tokenizer(path)
    theirs = transformers.AutoTokenizer.from_pretrained(str(path))
    text = "def parse(self, args=None):\n    return 'ok'  # café\n"
    assert theirs.encode(text) == ours.encode(text)
    assert theirs.eos_token_id == ours.eos_id == 0 and theirs.bos_token_id is None
