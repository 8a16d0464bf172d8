"""Shared builders for the evaluation tests: a real byte-level BPE tokenizer and a tiny random export."""
from __future__ import annotations

import json
import sysconfig
from pathlib import Path


def corpus_text(max_chars: int = 400_000) -> str:
    """Real text available on every machine: the standard library's source, some English docstrings included."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts, size = [], 0
    for name in ["argparse.py", "textwrap.py", "json/decoder.py", "statistics.py", "fractions.py", "calendar.py"]:
        text = (stdlib / name).read_text()
        parts.append(text)
        size += len(text)
        if size > max_chars:
            break
    return "\n".join(parts)[:max_chars]


def write_tokenizer(directory: Path, vocab_size: int = 1024) -> Path:
    """The project's byte-level BPE (`components.data.tokenizer.train_bpe`, EOS id 0) trained on real text."""
    from components.data.tokenizer import train_bpe

    tok = train_bpe([corpus_text()], vocab_size=vocab_size, out_dir=directory)
    assert tok.eos_id == 0 and tok.vocab_size == vocab_size
    return directory


def tiny_config(**overrides):
    from components.model.config import get_preset

    base = dict(num_hidden_layers=2, vocab_size=1024, max_position_embeddings=256, eos_token_id=0)
    base.update(overrides)
    return get_preset("tiny", **base)


def write_export(root: Path, tokenizer_dir: Path, *, step: int = 100, seed: int = 0, run_id=None,
                 tracking_uri=None, spread: float | None = None, always_eos: bool = False, run_tags=None,
                 **config_overrides) -> Path:
    """A random tiny export; `spread` widens the weights (and routing bias) so that predictions are far from
    uniform and score differences between implementations would show. `always_eos` zeroes the LM head: every
    logit is 0, so greedy decoding picks token 0 (EOS) at once (generation tasks finish in one step)."""
    import torch

    from components.checkpoint import save_export
    from components.model.transformer import build_model

    model = build_model(tiny_config(**config_overrides), seed=seed)
    if spread:
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim >= 2:
                    p.copy_(torch.randn(p.shape, generator=gen) * spread)
            for module in model.modules():
                if hasattr(module, "e_score_correction_bias"):
                    module.e_score_correction_bias.copy_(torch.randn(module.e_score_correction_bias.shape,
                                                                     generator=gen) * 0.3)
    if always_eos:
        with torch.no_grad():
            model.lm_head.weight.zero_()
    return save_export(model, root, step=step, tokenizer_dir=tokenizer_dir, run_id=run_id,
                       tracking_uri=tracking_uri,
                       extra={"tokens_seen": step * 1024, **({"run_tags": run_tags} if run_tags else {})})


GSM8K = [
    ("Tom has 3 apples and buys 4 more. How many apples does he have?", "3 + 4 = <<3+4=7>>7 apples.\n#### 7"),
    ("A box holds 12 pens. How many pens are in 2 boxes?", "2 * 12 = <<2*12=24>>24 pens.\n#### 24"),
    ("Sara had 10 dollars and spent 6. How much is left?", "10 - 6 = <<10-6=4>>4 dollars.\n#### 4"),
    ("There are 5 cats with 4 legs each. How many legs?", "5 * 4 = <<5*4=20>>20 legs.\n#### 20"),
    ("A train goes 60 miles per hour for 2 hours. How far?", "60 * 2 = <<60*2=120>>120 miles.\n#### 120"),
    ("Ann reads 15 pages a day for 3 days. How many pages?", "15 * 3 = <<15*3=45>>45 pages.\n#### 45"),
]


def write_gsm8k(path: Path, items=GSM8K) -> Path:
    path.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in items))
    return path
