"""The export checkpoint: what training writes every K steps and evaluation reads.

Layout of one export, `ROOT/step-00000100/`:
    config.json, model.safetensors (or sharded + index)   the HF DeepseekV3 layout (`components.model.hf.save_hf`)
    tokenizer.json, tokenizer_config.json, ...            copied from the run's tokenizer directory, if given
    crescent.json                                         {format_version, step, run_id, tracking_uri, created, ...}
                                                          (training adds run_tags: tags that find its MLflow run)

A fine-tuned model's export also names its chat template (`chat_template` in crescent.json) and writes it as Jinja
into tokenizer_config.json, so transformers' `apply_chat_template` gives the ids training used. `resolve_export`
and `load_export_weights` are how a fine-tuning run starts from an export (`model.init_from`).

An export appears atomically: it is written into a hidden temporary directory beside its final place and renamed,
so a watcher never sees half of one. Under torch.distributed every rank calls `save_export` (the DTensor gathers are
collectives) and rank 0 writes. Weights are safetensors only (no pickle is ever loaded).
"""
from __future__ import annotations

import json
import re
import shutil
from datetime import UTC, datetime
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from components.durable import (
    InsufficientSpaceError,
    ensure_free_space,
    free_bytes,
    is_no_space,
    publish_directory,
    temporary_path,
)
from components.model.hf import config_from_hf, fill_from_hf, hf_state_items, load_hf, save_hf
from components.model.transformer import CrescentForCausalLM

FORMAT_VERSION = 1
METADATA_FILE = "crescent.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_RESERVED = {"config.json", METADATA_FILE, "model.safetensors", "model.safetensors.index.json"}


def export_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def save_export(
    model: CrescentForCausalLM,
    out_dir: str | Path,
    *,
    step: int,
    tokenizer_dir: str | Path | None = None,
    run_id: str | None = None,
    tracking_uri: str | None = None,
    extra: dict | None = None,
    chat_template: str | None = None,
) -> Path:
    """Write `out_dir/step-{step:08d}/` atomically and return its path (an existing export of that step is replaced).

    `extra` entries (e.g. tokens_seen, consumed_samples) are stored at the top level of crescent.json.
    `chat_template`: the name of the chat template the model was fine-tuned with (components/data/chat.py).
    """
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"save_export: step={step!r} must be a non-negative integer")
    root = Path(out_dir)
    final = root / export_dir_name(step)
    if not _is_writer():
        # Sharded (FSDP2/DTensor) model: every rank takes part in the gathers, rank 0 alone writes.
        for _ in hf_state_items(model):
            pass
        _barrier()
        return final
    root.mkdir(parents=True, exist_ok=True)
    needed = _export_bytes(model, tokenizer_dir)
    ensure_free_space(root, needed, f"export {final.name}")  # a full disk: say so before writing anything
    tmp = temporary_path(final)
    try:
        save_hf(model, tmp)
        if tokenizer_dir is not None:
            _copy_tokenizer(Path(tokenizer_dir), tmp)
            _write_hf_tokenizer_config(tmp, model.config.max_position_embeddings)
        if chat_template is not None:
            _write_chat_template(tmp, chat_template)
        metadata = dict(extra or {})
        if chat_template is not None:
            metadata["chat_template"] = chat_template
        clash = sorted(set(metadata) & {"format_version", "step", "run_id", "tracking_uri", "created"})
        if clash:
            raise ValueError(f"save_export: extra keys {clash} collide with reserved metadata fields")
        metadata.update({
            "format_version": FORMAT_VERSION,
            "step": step,
            "run_id": run_id,
            "tracking_uri": tracking_uri,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        })
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
        publish_directory(tmp, final)
    except Exception as err:
        if is_no_space(err) and not isinstance(err, InsufficientSpaceError):
            raise InsufficientSpaceError(root, needed, free_bytes(root), f"export {final.name}") from None
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    return final


def _export_bytes(model: CrescentForCausalLM, tokenizer_dir: str | Path | None) -> int:
    """Bytes an export takes: the weights (global shapes, also when sharded) plus the tokenizer files."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    tokenizer = sum(p.stat().st_size for p in Path(tokenizer_dir).iterdir() if p.is_file()) \
        if tokenizer_dir is not None and Path(tokenizer_dir).is_dir() else 0
    return weights + tokenizer + (1 << 20)


def _is_writer() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _barrier() -> None:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _copy_tokenizer(src: Path, dest: Path) -> None:
    if not src.is_dir():
        raise ValueError(f"save_export: tokenizer_dir={str(src)!r} is not a directory")
    files = [p for p in sorted(src.iterdir()) if p.is_file()]
    if not files:
        raise ValueError(f"save_export: tokenizer_dir={str(src)!r} holds no files")
    for p in files:
        if p.name in _RESERVED or p.suffix == ".safetensors":
            raise ValueError(f"save_export: tokenizer file {p.name!r} would overwrite a checkpoint file")
        shutil.copy2(p, dest / p.name)


def _write_hf_tokenizer_config(export: Path, max_length: int) -> None:
    """For an HF `tokenizer.json` without a tokenizer_config.json, write one naming the EOS/BOS tokens from our
    sidecar, so transformers (and lm-eval's `hf` model) load the export's tokenizer as we do."""
    sidecar = export / "crescent_tokenizer.json"
    if not (export / "tokenizer.json").exists() or (export / "tokenizer_config.json").exists() or not sidecar.exists():
        return
    names = json.loads(sidecar.read_text())
    if names.get("backend", "hf") != "hf" or not names.get("eos_token"):
        return
    (export / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": names["eos_token"],
        "bos_token": names.get("bos_token"), "pad_token": names["eos_token"], "add_bos_token": False,
        "add_eos_token": False, "model_max_length": max_length, "clean_up_tokenization_spaces": False,
    }, indent=2) + "\n")


def _write_chat_template(export: Path, name: str) -> None:
    """The template as Jinja in tokenizer_config.json (created for an HF tokenizer, updated when present)."""
    from components.data.chat import get_template

    jinja = get_template(name).jinja()
    config_file = export / "tokenizer_config.json"
    if config_file.exists():
        config = json.loads(config_file.read_text())
    elif (export / "tokenizer.json").exists():
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False}
    else:
        return
    config["chat_template"] = jinja
    config_file.write_text(json.dumps(config, indent=2) + "\n")


def read_metadata(path: str | Path) -> dict:
    """crescent.json of an export; a clear error when it is missing, unreadable or of an unknown version."""
    if not Path(path).exists():
        raise FileNotFoundError(f"export {str(path)!r} does not exist")
    file = Path(path) / METADATA_FILE
    if not file.is_file():
        raise FileNotFoundError(f"export {str(path)!r}: {METADATA_FILE} is missing (not an export checkpoint)")
    try:
        metadata = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"export {str(path)!r}: {METADATA_FILE} is not valid JSON ({err})") from err
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"export {str(path)!r}: format_version={version!r}; this build reads {FORMAT_VERSION}")
    if not isinstance(metadata.get("step"), int):
        raise ValueError(f"export {str(path)!r}: step={metadata.get('step')!r} must be an integer")
    return metadata


def load_export(path: str | Path, device: str | torch.device = "cpu",
                dtype: torch.dtype | None = None) -> tuple[CrescentForCausalLM, dict]:
    """(model in eval mode, metadata) from an export directory; weights through safetensors only."""
    metadata = read_metadata(path)
    try:
        model = load_hf(path, device=device, dtype=dtype).eval()
    except SafetensorError as err:  # safetensors' own message names no file
        bad = [f.name for f in sorted(Path(path).glob("*.safetensors")) if not _readable_safetensors(f)]
        raise ValueError(f"export {str(path)!r}: weights file {(bad or ['?'])[0]!r} cannot be read ({err}); "
                         "it is truncated or corrupt: export it again") from None
    return model, metadata


def resolve_export(path: str | Path) -> Path:
    """An export directory, or the newest complete export in a folder of them (a run's `exports/`)."""
    p = Path(path)
    if (p / METADATA_FILE).is_file():
        return p
    found = list_exports(p)
    if found:
        return found[-1]
    raise FileNotFoundError(f"{str(p)!r} is neither an export checkpoint (no {METADATA_FILE}) nor a folder of them "
                            "(no complete step-* export inside)")


def load_export_weights(model: CrescentForCausalLM, path: str | Path) -> dict:
    """Overwrite `model`'s weights (plain or sharded) with an export's, weights only; the export's architecture
    must be the model's. Returns the export's metadata."""
    metadata = read_metadata(path)
    theirs = config_from_hf(json.loads((Path(path) / "config.json").read_text())).to_dict()
    ours = model.config.to_dict()
    differ = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
    if differ:
        shown = ", ".join(f"{k}: model {ours.get(k)!r} vs export {theirs.get(k)!r}" for k in differ[:6])
        raise ValueError(f"export {str(path)!r} has another architecture than the model ({shown}); set the model "
                         "preset and model_overrides to the export's")
    fill_from_hf(model, path)
    return metadata


def _readable_safetensors(file: Path) -> bool:
    try:
        with safe_open(str(file), framework="pt"):
            return True
    except SafetensorError:
        return False


def export_step(path: str | Path) -> int | None:
    """The step encoded in an export directory's name (step-00000100 -> 100), or None."""
    m = _STEP_DIR.match(Path(path).name)
    return int(m.group(1)) if m else None


def list_exports(directory: str | Path) -> list[Path]:
    """Export directories (`step-N`, complete: they hold crescent.json) under `directory`, in step order."""
    root = Path(directory)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and export_step(p) is not None and (p / METADATA_FILE).exists()]
    return sorted(found, key=lambda p: (export_step(p), p.name))
