"""The model under SFT: document-masked attention (packed == unpacked, no cross-talk; SDPA and FlexAttention), the
loss on assistant tokens only (masked positions contribute nothing; a hand computation), and the export's chat
template as transformers applies it."""
from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from test_eval_fixtures import corpus_text

from components.data.chat import IGNORE_INDEX, ChatEncoder, get_template, model_fields, pack_rows, row_dtype
from components.data.tokenizer import load_tokenizer, train_bpe
from components.model.config import get_preset
from components.model.transformer import build_model

TEMPLATE = get_template("moonlight")
VOCAB = 600


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_bpe([corpus_text(100_000)], vocab_size=VOCAB, out_dir=out, special_tokens=TEMPLATE.special_tokens)
    return out


@pytest.fixture(scope="module")
def encoder(tokenizer_dir):
    return ChatEncoder(load_tokenizer(tokenizer_dir), "moonlight")


def _model(preset: str = "tiny", seed: int = 0):
    """A tiny model with weights spread wide enough that attention and routing are far from uniform."""
    model = build_model(get_preset(preset, vocab_size=VOCAB, num_hidden_layers=2), seed=seed).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.08)
    return model


def _conversations(encoder, n: int = 4):
    text = corpus_text(20_000).split()
    convs = []
    for k in range(n):
        messages = [{"role": "user", "content": " ".join(text[10 * k:10 * k + 5 + k])},
                    {"role": "assistant", "content": " ".join(text[10 * k + 5:10 * k + 12 + 2 * k])}]
        if k % 2:
            messages.insert(0, {"role": "system", "content": "Be brief."})
        convs.append(encoder.encode(messages))
    return convs


def _packed(convs, seq_len: int) -> dict[str, torch.Tensor]:
    rows = pack_rows(convs, [list(range(len(convs)))], seq_len, 0, row_dtype(VOCAB, seq_len))
    return {k: torch.from_numpy(v).long() for k, v in model_fields(rows, seq_len).items()}


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_packed_logits_equal_each_conversation_alone(encoder, backend):
    model = _model()
    model.attention_backend = backend
    convs = _conversations(encoder)
    seq_len = sum(len(ids) for ids, _ in convs) + 5
    batch = _packed(convs, seq_len)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex on CPU runs eagerly and says so
        packed = model(batch["input_ids"], segment_ids=batch["segment_ids"],
                       position_ids=batch["position_ids"]).logits[0]
        worst, at = 0.0, 0
        for ids, _ in convs:
            alone = model(torch.from_numpy(ids)[None]).logits[0]
            worst = max(worst, (packed[at:at + len(ids)] - alone).abs().max().item())
            at += len(ids)
    assert worst < 1e-5


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_an_empty_packed_micro_batch_runs_and_gives_every_parameter_a_zero_gradient(encoder, backend):
    """A micro-batch with no rows (every sample lost, or a rank's padding at the end of the held-out set) runs the
    forward and backward like any other (FSDP2: every rank all-gathers and reduce-scatters the same parameters):
    flex's block mask refused a batch of 0. Its loss is undefined (NaN) and each parameter's gradient is zero."""
    model = _model().train()
    convs = _conversations(encoder)
    full = _packed(convs, sum(len(ids) for ids, _ in convs) + 5)
    empty = {k: v[:0] for k, v in full.items()}
    grads = []
    for batch, attention in ((full, "sdpa"), (empty, backend)):  # flex has no backward on CPU: sdpa for a full one
        model.attention_backend = attention
        model.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # flex on CPU runs eagerly and says so
            out = model(batch["input_ids"], targets=batch["targets"], segment_ids=batch["segment_ids"],
                        position_ids=batch["position_ids"])
            out.loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert torch.isnan(out.loss) and grads[1].keys() == grads[0].keys()
    assert all(torch.count_nonzero(g) == 0 for g in grads[1].values())


@pytest.mark.parametrize("preset,tolerance", [("tiny-dense", 0.0), ("tiny", 1e-6)])
def test_changing_one_conversation_never_changes_another(encoder, preset, tolerance):
    """Dense: bitwise. MoE: no information crosses either, but the experts' batched matmuls see other rows, so
    float rounding may differ in the last bits (the bound is ~50x below the packed-vs-alone tolerance)."""
    model = _model(preset)
    convs = _conversations(encoder)
    seq_len = sum(len(ids) for ids, _ in convs)
    batch = _packed(convs, seq_len)
    changed = batch["input_ids"].clone()
    first = len(convs[0][0])
    changed[0, 1:first] = torch.randint(10, VOCAB, (first - 1,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = model(batch["input_ids"], segment_ids=batch["segment_ids"]).logits[0, first:]
        b = model(changed, segment_ids=batch["segment_ids"]).logits[0, first:]
        changed_first = model(changed, segment_ids=batch["segment_ids"]).logits[0, 1:first]
        original_first = model(batch["input_ids"], segment_ids=batch["segment_ids"]).logits[0, 1:first]
    assert (a - b).abs().max().item() <= tolerance
    assert (changed_first - original_first).abs().max().item() > 1e-2  # the change itself did something


def _loss_and_grads(model, batch, targets):
    model.zero_grad(set_to_none=True)
    loss = model(batch["input_ids"], targets=targets, segment_ids=batch["segment_ids"],
                 position_ids=batch["position_ids"]).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_masked_positions_contribute_nothing_to_loss_or_gradients(encoder):
    model = _model().train()
    convs = _conversations(encoder)
    seq_len = sum(len(ids) for ids, _ in convs) + 3
    batch = _packed(convs, seq_len)
    targets = batch["targets"]
    masked = targets == IGNORE_INDEX
    assert masked.any() and (~masked).any()
    # The labels the loss would see at every non-target position, changed to other ids: through the same mask
    # they reach the loss as IGNORE_INDEX, so nothing moves, bitwise.
    labels = torch.cat([batch["input_ids"][:, 1:], batch["input_ids"][:, :1]], dim=1)
    other = torch.where(masked, (labels + 7) % VOCAB, labels)
    relabelled = torch.where(masked, torch.full_like(other, IGNORE_INDEX), torch.where(~masked, targets, other))
    loss_a, grads_a = _loss_and_grads(model, batch, targets)
    loss_b, grads_b = _loss_and_grads(model, batch, relabelled)
    assert torch.equal(loss_a, loss_b) and grads_a.keys() == grads_b.keys()
    assert all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)
    # ... whereas the same change with the mask lifted moves the loss: the mask is what keeps them out.
    loss_c, _ = _loss_and_grads(model, batch, torch.where(masked, other, targets))
    assert abs(loss_c.item() - loss_a.item()) > 1e-3


def test_loss_is_the_mean_over_assistant_tokens_by_hand(encoder):
    model = _model()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a list method."},
                {"role": "assistant", "content": "append"}]
    ids, is_target = encoder.encode(messages)
    batch = _packed([(ids, is_target)], len(ids) - 1)
    with torch.no_grad():
        out = model(batch["input_ids"], targets=batch["targets"], segment_ids=batch["segment_ids"],
                    position_ids=batch["position_ids"])
        logits = model(batch["input_ids"], segment_ids=batch["segment_ids"]).logits[0].double()
    answer = encoder.tokenizer.encode("append") + [encoder.special_ids["<|im_end|>"]]
    positions = [t for t in range(1, len(ids)) if is_target[t]]
    assert [int(ids[t]) for t in positions] == answer  # the targets are the answer and its end of turn
    by_hand = sum(-math.log(F.softmax(logits[t - 1], -1)[int(ids[t])].item()) for t in positions) / len(positions)
    assert abs(out.loss.item() - by_hand) < 1e-5


def test_export_chat_template_gives_exactly_our_ids_in_transformers(encoder, tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    from components.checkpoint import read_metadata, save_export

    export = save_export(_model(), tmp_path, step=5, tokenizer_dir=tokenizer_dir, chat_template="moonlight")
    config = json.loads((export / "tokenizer_config.json").read_text())
    assert config["chat_template"] == TEMPLATE.jinja() and read_metadata(export)["chat_template"] == "moonlight"
    hf = AutoTokenizer.from_pretrained(str(export))
    conversations = [
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What does zip do?"},
         {"role": "assistant", "content": "It pairs items of iterables."}, {"role": "user", "content": "And map?"},
         {"role": "assistant", "content": "It applies a function to each item.\n\n  Lazily."}],
        [{"role": "user", "content": "Héllo — ünïcode 中文?"}, {"role": "assistant", "content": "Yes: 中文."}],
    ]
    for messages in conversations:
        ours, _ = encoder.encode(messages)
        theirs = hf.apply_chat_template(messages, tokenize=True, return_dict=False)
        assert list(theirs) == ours.tolist()
        prompt = hf.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True, return_dict=False)
        assert list(prompt) == encoder.encode_text(TEMPLATE.render(messages[:-1], add_generation_prompt=True))


def test_init_weights_from_an_export_replace_all_and_refuse_another_architecture(tmp_path, tokenizer_dir):
    from components.checkpoint import load_export_weights, save_export

    source = _model(seed=3)
    export = save_export(source, tmp_path, step=1, tokenizer_dir=tokenizer_dir)
    target = build_model(source.config, seed=9)
    load_export_weights(target, export)
    ours, theirs = target.state_dict(), source.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    other = build_model(get_preset("tiny", vocab_size=VOCAB, num_hidden_layers=3))
    with pytest.raises(ValueError, match=r"another architecture than the model \(num_hidden_layers: model 3 vs "
                                         r"export 2\)"):
        load_export_weights(other, export)
