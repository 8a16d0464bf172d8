"""HF DeepSeek-V3 / Moonlight interop: `load_hf(path)` and `save_hf(model, path)`.

The HF layout stores experts per index (`model.layers.L.mlp.experts.E.gate_proj.weight`, the layout Moonlight
ships and transformers' `save_pretrained` writes); ours stacks them into 3-D parameters
(`model.layers.L.mlp.experts.gate_proj` [E, out, in]). Everything else maps by name. Loading streams tensor by
tensor from memory-mapped safetensors into a model allocated once, so a 16B checkpoint never needs two copies.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from components.model.config import ModelConfig
from components.model.transformer import CrescentForCausalLM

_EXPERT_KEY = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_FUSED_EXPERT_KEY = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")


def config_from_hf(hf: dict) -> ModelConfig:
    """Map an HF DeepseekV3 config.json (transformers 4.x or 5.x) to ModelConfig."""
    data = dict(hf)
    rope = data.pop("rope_parameters", None) or {}
    if "rope_theta" not in data and "rope_theta" in rope:
        data["rope_theta"] = rope["rope_theta"]
    scaling = data.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    if scaling:
        raise ValueError(f"config.json: rope_scaling={scaling!r} is not supported (Moonlight uses none)")
    if isinstance(data.get("eos_token_id"), list):
        data["eos_token_id"] = data["eos_token_id"][0]
    if data.get("n_routed_experts") is None:
        data["n_routed_experts"] = 0
    if data.get("n_shared_experts") is None:
        data["n_shared_experts"] = 0
    return ModelConfig.from_dict(data)


def config_to_hf(config: ModelConfig) -> dict:
    """config.json readable by transformers 4.x (`rope_theta`) and 5.x (`rope_parameters`)."""
    out = {k: v for k, v in config.extra.items() if k not in ("rope_scaling", "rope_parameters")}
    out.update(config.to_dict())
    out.update({
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "num_key_value_heads": config.num_attention_heads,
        "hidden_act": "silu",
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "moe_layer_freq": 1,
        "num_nextn_predict_layers": 0,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "torch_dtype": "float32",
    })
    if not config.is_moe:
        out.update({"n_routed_experts": None, "n_shared_experts": None, "first_k_dense_replace": config.num_hidden_layers})
    return out


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"load_hf: no *.safetensors files in {path}")
    return files


def load_hf(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> CrescentForCausalLM:
    """Read an HF DeepSeek-V3 directory into our model. Unknown keys and missing tensors raise with their names."""
    path = Path(path)
    config = config_from_hf(json.loads((path / "config.json").read_text()))
    with torch.device("meta"):
        model = CrescentForCausalLM(config)
    model.to_empty(device=device)
    if dtype is not None:
        model.to(dtype)
    model.init_buffers()  # rotary tables and zero biases; every weight is overwritten below
    fill_from_hf(model, path)
    return model


@torch.no_grad()
def fill_from_hf(model: CrescentForCausalLM, path: str | Path) -> None:
    """Overwrite every weight and routing bias of an existing model (plain, or sharded with DTensor parameters:
    each rank copies its own slice) from an HF directory, one tensor at a time. Unknown keys, shape mismatches and
    missing tensors raise with their names."""
    path, config = Path(path), model.config
    targets = dict(model.named_parameters())
    targets.update(dict(model.named_buffers()))
    unfilled = {k for k in targets if not k.endswith("inv_freq")}
    if config.tie_word_embeddings:
        unfilled.discard("lm_head.weight")
    for key, tensor in _iter_tensors(path):
        if _IGNORED.search(key):
            continue
        layer = _LAYER_KEY.match(key)
        if layer and int(layer.group(1)) >= config.num_hidden_layers:
            continue  # multi-token-prediction layers (DeepSeek-V3 ships them after the last layer)
        for name, index, value in _map_key(key, tensor, config):
            if name not in targets:
                raise KeyError(f"load_hf: checkpoint tensor {key!r} has no place in the model")
            shape = tuple(targets[name].shape) if index is None else tuple(targets[name].shape[1:])
            if shape != tuple(value.shape):
                raise ValueError(f"load_hf: {key!r} has shape {tuple(value.shape)}, model expects {shape}")
            _copy_into(targets[name], index, value)
            if index is None or index == targets[name].shape[0] - 1:
                unfilled.discard(name)
    if unfilled:
        raise KeyError(f"load_hf: tensors missing from {path}: {sorted(unfilled)[:8]}")


def _copy_into(dest: torch.Tensor, index: int | None, value: torch.Tensor) -> None:
    """dest[index] (or dest) <- value; for a DTensor, the part of `value` that this rank holds."""
    if not (hasattr(dest, "device_mesh") and hasattr(dest, "to_local")):
        (dest if index is None else dest[index]).copy_(value)
        return
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(dest.shape, dest.device_mesh, dest.placements)
    local = dest.to_local()
    if index is not None:  # one expert of a stack [E, out, in]: only if this rank holds it
        if not offset[0] <= index < offset[0] + shape[0]:
            return
        local, shape, offset = local[index - offset[0]], shape[1:], offset[1:]
    local.copy_(value[tuple(slice(o, o + n) for o, n in zip(offset, shape))])


def _iter_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for file in _safetensors_files(path):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


def _map_key(key: str, tensor: torch.Tensor, config: ModelConfig):
    """HF key -> [(our name, expert index or None, tensor)]."""
    m = _EXPERT_KEY.match(key)
    if m:
        return [(f"{m.group(1)}.{m.group(3)}", int(m.group(2)), tensor)]
    m = _FUSED_EXPERT_KEY.match(key)
    if m:  # transformers' in-memory fused layout, in case a checkpoint was written that way
        if m.group(2) == "down_proj":
            return [(f"{m.group(1)}.down_proj", None, tensor)]
        gate, up = tensor.split(config.moe_intermediate_size, dim=1)
        return [(f"{m.group(1)}.gate_proj", None, gate), (f"{m.group(1)}.up_proj", None, up)]
    return [(key, None, tensor)]


def hf_state_items(model: CrescentForCausalLM) -> Iterator[tuple[str, torch.Tensor]]:
    """Our weights under HF names, one tensor at a time (experts split per index)."""
    for name, tensor in model.state_dict().items():
        if name.endswith("inv_freq"):
            continue
        if model.config.tie_word_embeddings and name == "lm_head.weight":
            continue
        tensor = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
        if ".mlp.experts." in name and tensor.ndim == 3:
            prefix, proj = name.rsplit(".", 1)
            for e in range(tensor.shape[0]):
                yield f"{prefix}.{e}.{proj}.weight", tensor[e]
        else:
            yield name, tensor


def _umask_mode(file: Path) -> None:
    """safetensors writes 0600 files; give them the mode any other file gets (0666 less the umask), so that an
    evaluation job running as another user can read an export."""
    mask = os.umask(0o022)
    os.umask(mask)
    os.chmod(file, 0o666 & ~mask)


def save_hf(model: CrescentForCausalLM, path: str | Path, max_shard_bytes: int = 4 << 30,
            dtype: torch.dtype | None = None) -> Path:
    """Write config.json + safetensors (sharded with an index above max_shard_bytes) in the HF layout."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config_to_hf(model.config), indent=2) + "\n")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    weight_map: dict[str, int] = {}
    written: list[str] = []

    def flush() -> None:
        nonlocal size
        if not shards[-1]:
            return
        n = len(written) + 1
        name = f"model-{n:05d}.safetensors"
        save_file(shards[-1], str(path / name), metadata={"format": "pt"})
        _umask_mode(path / name)
        written.append(name)
        for k in shards[-1]:
            weight_map[k] = n
        shards[-1] = {}
        size = 0

    for key, tensor in hf_state_items(model):
        t = tensor.detach().to(dtype or tensor.dtype).to("cpu").contiguous().clone()
        if size and size + t.numel() * t.element_size() > max_shard_bytes:
            flush()
        shards[-1][key] = t
        size += t.numel() * t.element_size()
    flush()
    for old in path.glob("model*.safetensors*"):
        if old.name not in written:
            old.unlink()
    if len(written) == 1:
        (path / written[0]).rename(path / "model.safetensors")
    else:
        total = sum((path / w).stat().st_size for w in written)
        index = {"metadata": {"total_size": total},
                 "weight_map": {k: f"model-{n:05d}-of-{len(written):05d}.safetensors" for k, n in weight_map.items()}}
        for n, w in enumerate(written, 1):
            (path / w).rename(path / f"model-{n:05d}-of-{len(written):05d}.safetensors")
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return path
