"""Parity with transformers' DeepseekV3ForCausalLM: load_hf of save_pretrained, and save_hf back."""
import os
import stat

import pytest
import torch

transformers = pytest.importorskip("transformers")

from components.model.hf import load_hf, save_hf  # noqa: E402

BASE = dict(
    vocab_size=97, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
    v_head_dim=8, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, routed_scaling_factor=2.5,
    max_position_embeddings=64, rope_theta=10000.0, attn_implementation="eager",
)

CASES = {
    "q_lora_none_dense_first": dict(q_lora_rank=None, first_k_dense_replace=1, n_group=1, topk_group=1,
                                    norm_topk_prob=True),
    "q_lora_grouped_routing": dict(q_lora_rank=12, first_k_dense_replace=0, n_group=4, topk_group=2,
                                   norm_topk_prob=True),
    "no_norm_topk": dict(q_lora_rank=None, first_k_dense_replace=0, n_group=2, topk_group=1, norm_topk_prob=False),
    "q_lora_two_shared": dict(q_lora_rank=12, first_k_dense_replace=1, n_group=1, topk_group=1, norm_topk_prob=True,
                              n_shared_experts=2, num_experts_per_tok=3),
}


def _reference(case: str, seed: int):
    torch.manual_seed(seed)
    cfg = transformers.DeepseekV3Config(**{**BASE, **CASES[case]})
    ref = transformers.DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():  # random weights everywhere (HF init leaves some at zero) and a nonzero routing bias
        for p in ref.parameters():
            p.normal_(0, 0.2)
        for module in ref.modules():
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.normal_(0, 0.3)
    return ref


@pytest.mark.parametrize("case", sorted(CASES))
def test_load_hf_matches_transformers_logits(case, tmp_path):
    ref = _reference(case, seed=sorted(CASES).index(case))
    ref.save_pretrained(tmp_path / "hf")
    ids = torch.randint(0, BASE["vocab_size"], (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits
        ours = load_hf(tmp_path / "hf").eval()
        got = ours(ids).logits
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-4

    # ... and back: our export loads in transformers and gives the same logits again.
    save_hf(ours, tmp_path / "ours")
    again = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    with torch.no_grad():
        assert (again(ids).logits - expected).abs().max().item() < 1e-4


def test_save_hf_shards_with_index_and_reloads(tmp_path):
    ref = _reference("q_lora_none_dense_first", seed=5)
    ref.save_pretrained(tmp_path / "hf")
    ours = load_hf(tmp_path / "hf").eval()
    save_hf(ours, tmp_path / "sharded", max_shard_bytes=20_000)
    files = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(files) > 1 and (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    mask = os.umask(0o022)
    os.umask(mask)
    for name in files:  # readable as any file this process writes (safetensors alone would make them 0600)
        assert stat.S_IMODE((tmp_path / "sharded" / name).stat().st_mode) == 0o666 & ~mask
    reloaded = load_hf(tmp_path / "sharded").eval()
    ids = torch.arange(20).view(1, 20) % BASE["vocab_size"]
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, ours(ids).logits)


def test_load_hf_names_a_missing_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    ref = _reference("q_lora_none_dense_first", seed=2)
    ref.save_pretrained(tmp_path / "hf")
    path = next((tmp_path / "hf").glob("*.safetensors"))
    tensors = load_file(path)
    tensors.pop("model.layers.1.self_attn.o_proj.weight")
    save_file(tensors, path)
    with pytest.raises(KeyError, match="model.layers.1.self_attn.o_proj.weight"):
        load_hf(tmp_path / "hf")


def test_a_bf16_load_keeps_rotary_frequencies_and_routing_biases_in_fp32(tmp_path):
    """load_hf(dtype=bf16) (what `crescent eval --dtype bfloat16` runs) and model.to(bf16) cast the weights only: a
    bf16 rotary table would drift the RoPE phase by radians at long positions, a bf16 bias would round the learned
    routing bias (and in bf16-true training swallow each 1e-3 update)."""
    ref = _reference("q_lora_none_dense_first", seed=6)
    ref.save_pretrained(tmp_path / "hf")
    fp32 = load_hf(tmp_path / "hf")
    biases = {n: b for n, b in fp32.named_buffers() if n.endswith("e_score_correction_bias")}
    assert biases
    with torch.no_grad():  # biases with digits bf16 cannot hold, saved and loaded again
        for b in biases.values():
            b.copy_(torch.linspace(0.1, 0.1 + 1e-3, b.numel()))
    save_hf(fp32, tmp_path / "trained")
    fp32 = load_hf(tmp_path / "trained")
    for model in (load_hf(tmp_path / "trained", dtype=torch.bfloat16), load_hf(tmp_path / "trained").to(torch.bfloat16)):
        assert model.lm_head.weight.dtype == torch.bfloat16
        expected = dict(fp32.named_buffers())
        for name, buffer in model.named_buffers():
            assert buffer.dtype == torch.float32 and torch.equal(buffer, expected[name]), name
        assert len({b.dtype for b in model.buffers()}) == 1 and len(expected) == len(dict(model.named_buffers()))
