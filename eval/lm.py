"""lm-eval's `LM` interface over a Crescent export checkpoint, registered as model `crescent`.

    crescent eval lm-eval --model crescent --model_args pretrained=runs/x/exports/step-00001000 --tasks ...

(lm-eval's own `lm_eval` command finds models only in its registry, which this module fills when imported;
`crescent eval lm-eval` imports it and then runs lm-eval's CLI with the same arguments.)

Chat: an export fine-tuned with a chat template (its crescent.json names it; `chat_template=NAME` sets one for
another export) implements lm-eval's chat-template interface (`apply_chat_template`, `chat_template`,
`tokenizer_name`), so `--apply_chat_template` renders prompts as the model was trained; the template's special
tokens in a prompt encode to their ids and its end-of-turn token also stops generation (and, like EOS, is not
part of the returned answer).

Requests follow lm-eval's conventions exactly (tokenization of context/continuation pairs through `TemplateLM`,
left truncation to the model's context, rolling windows for perplexity, stop sequences including EOS), so scores
are comparable with lm-eval's own `hf` model on the HF export of the same checkpoint. Identical model inputs
(e.g. the four answer letters of an MMLU question) are computed once. Single process; weights come from
safetensors only (`components.checkpoint.load_export`).
"""
from __future__ import annotations

import json
import logging

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from components.checkpoint import load_export
from components.data.chat import ChatEncoder
from eval.generation import SamplingConfig, generate

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": None}


@register_model("crescent")
class CrescentLM(TemplateLM):
    def __init__(self, pretrained: str | None = None, checkpoint: str | None = None, device: str = "cpu",
                 dtype: str = "float32", batch_size: int | str = 16, max_length: int | None = None,
                 max_gen_toks: int = 256, use_cache: bool = True, seed: int = 1234,
                 max_logits_bytes: int = 4 << 30, chat_template: str | None = None, **unused) -> None:
        super().__init__()
        path = checkpoint or pretrained
        if path is None:
            raise ValueError("crescent LM: pass pretrained=PATH (an export checkpoint directory)")
        if str(dtype) not in _DTYPES:
            raise ValueError(f"crescent LM: dtype={dtype!r}; choose one of {list(_DTYPES)}")
        if unused:
            log.warning("crescent LM: ignoring unsupported arguments %s", sorted(unused))
        from components.data.tokenizer import load_tokenizer

        if str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's CLI defaults to cuda:0; its own `hf` model falls back to the CPU the same way.
            log.warning("crescent LM: device=%r but CUDA is not available; using the CPU", device)
            device = "cpu"
        self._device = torch.device(device)
        self.model, self.metadata = load_export(path, device=self._device, dtype=_DTYPES[str(dtype)])
        self.tokenizer = load_tokenizer(path)
        template = chat_template or self.metadata.get("chat_template")
        self.chat = ChatEncoder(self.tokenizer, template) if template else None
        if self.tokenizer.vocab_size > self.model.config.vocab_size:
            raise ValueError(f"crescent LM: tokenizer vocab_size={self.tokenizer.vocab_size} exceeds the model's "
                             f"vocab_size={self.model.config.vocab_size}")
        self.path = str(path)
        if str(batch_size).startswith("auto"):
            raise ValueError(f"crescent LM: batch_size={batch_size!r} is not supported: pass a number of rows "
                             "(each forward is already capped by max_logits_bytes, so a large one is safe)")
        try:
            self.batch_size = int(batch_size)
        except ValueError:
            raise ValueError(f"crescent LM: batch_size={batch_size!r} must be a positive integer") from None
        if self.batch_size < 1:
            raise ValueError(f"crescent LM: batch_size={batch_size!r} must be a positive integer")
        self.max_length = int(max_length) if max_length else self.model.config.max_position_embeddings
        self.max_gen_toks = int(max_gen_toks)
        self.max_logits_bytes = int(max_logits_bytes)  # caps batch rows x positions x vocab of one forward
        self.use_cache = str(use_cache).lower() not in ("false", "0", "no")
        self.generator = torch.Generator(device=self._device).manual_seed(int(seed))

    # --- lm-eval plumbing -------------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id

    @property
    def tokenizer_name(self) -> str:
        chat = f"-{self.chat.template.name}" if self.chat is not None else ""
        return f"crescent-{self.tokenizer.fingerprint[:16]}{chat}"

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The Jinja form of the export's chat template (what lm-eval records), or None without one."""
        return self.chat.template.jinja() if self.chat is not None and chat_template is not False else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text of `chat_history` under the export's chat template; without a generation prompt a final
        assistant message is left open (lm-eval's prefill), as transformers' continue_final_message does."""
        if self.chat is None:
            raise ValueError(f"crescent LM: export {self.path!r} names no chat template (crescent.json "
                             "chat_template); pass chat_template=NAME in --model_args to use one")
        template = self.chat.template
        text = template.render(chat_history, add_generation_prompt=add_generation_prompt)
        if not add_generation_prompt and chat_history and chat_history[-1]["role"] == "assistant":
            text = text[:-len(template.end)]
        return text

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        ids = self.chat.encode_text(string) if self.chat is not None else self.tokenizer.encode(string)
        if add_special_tokens and self.tokenizer.bos_id is not None:
            ids = [self.tokenizer.bos_id] + ids
        return ids

    def tok_decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    # --- scoring ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: [(key, context_ids, continuation_ids)] -> [(sum log p(continuation), is_greedy)]."""
        limit = self.max_length
        inputs: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
        for index, (_, context, continuation) in enumerate(requests):
            if not context or not continuation:
                raise ValueError(f"loglikelihood request {index}: context and continuation need tokens")
            if len(continuation) > limit:
                raise ValueError(f"loglikelihood request {index}: continuation of {len(continuation)} tokens "
                                 f"exceeds max_length={limit}")
            whole = (context + continuation)[-(limit + 1):]  # left truncation, as lm-eval's hf model does
            inputs.setdefault(tuple(whole[:-1]), []).append((index, continuation))
        order = sorted(inputs, key=lambda k: (-len(k), k))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="crescent loglikelihood")
        for batch in self._batches(order):
            width = len(batch[0])
            ids = torch.full((len(batch), width), self.eot_token_id, dtype=torch.long)
            first_scored = width
            for row, key in enumerate(batch):
                ids[row, :len(key)] = torch.tensor(key)
                first_scored = min(first_scored, len(key) - max(len(c) for _, c in inputs[key]))
            keep = width - first_scored  # right padding + causal attention: only these positions are needed
            logits = self.model(ids.to(self._device), logits_to_keep=keep).logits
            for row, key in enumerate(batch):
                for index, continuation in inputs[key]:
                    end = len(key) - first_scored
                    # log-softmax of the scored positions only (a 160k vocabulary makes the full tensor large)
                    rows = F.log_softmax(logits[row, end - len(continuation):end].float(), dim=-1)
                    target = torch.tensor(continuation, device=rows.device)
                    score = rows.gather(-1, target[:, None]).sum().item()
                    greedy = bool((rows.argmax(-1) == target).all())
                    results[index] = (score, greedy)
                    if requests[index][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[index][0], results[index])
                    bar.update(1)
            del logits
        bar.close()
        return results

    def _batches(self, order: list[tuple[int, ...]]):
        """Up to batch_size inputs (longest first), fewer when their logits would exceed max_logits_bytes."""
        vocab, start = self.model.config.vocab_size, 0
        while start < len(order):
            per_row = len(order[start]) * vocab * 4
            rows = max(1, min(self.batch_size, self.max_logits_bytes // per_row))
            yield order[start:start + rows]
            start += rows

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-document log-likelihood in disjoint windows of max_length tokens (lm-eval's rolling scheme)."""
        windows, owners = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(index)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for owner, (score, _) in zip(owners, scores):
            totals[owner] += score
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # --- generation -------------------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = {}
        for index, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(index)
        results: list[str | None] = [None] * len(requests)
        eos_text = self.tok_decode([self.eot_token_id])
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="crescent generate_until")
        for indices in groups.values():
            kwargs = normalize_gen_kwargs(requests[indices[0]].args[1], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_new = int(kwargs.pop("max_gen_toks"))
            if max_new > self.max_length // 2:
                # lm-eval's hf model would fail here; a short-context model still gets half its window for the prompt.
                log.warning("generate_until: max_gen_toks=%d leaves no room in max_length=%d; using %d",
                            max_new, self.max_length, self.max_length // 2)
                max_new = self.max_length // 2
            sampling = SamplingConfig(do_sample=bool(kwargs.get("do_sample")),
                                      temperature=float(kwargs.get("temperature") or 1.0),
                                      top_k=int(kwargs.get("top_k") or 0), top_p=float(kwargs.get("top_p") or 1.0))
            budget = self.max_length - max_new
            encoded = {i: self.tok_encode(requests[i].args[0])[-budget:] or [self.prefix_token_id] for i in indices}
            ordered = sorted(indices, key=lambda i: -len(encoded[i]))
            for start in range(0, len(ordered), self.batch_size):
                chunk = ordered[start:start + self.batch_size]
                outputs = generate(self.model, [encoded[i] for i in chunk], max_new,
                                   stop_ids=self._stop_ids(), should_stop=self._stop_check(until),
                                   sampling=sampling, use_cache=self.use_cache, pad_id=self.eot_token_id,
                                   generator=self.generator)
                stop_ids = self._stop_ids()
                for i, tokens in zip(chunk, outputs):
                    if tokens and tokens[-1] in stop_ids:  # EOS / end of turn ends the answer, not part of it
                        tokens = tokens[:-1]  # (lm-eval's hf model decodes with skip_special_tokens=True)
                    text = postprocess_generated_text(self.tok_decode(tokens), stop=until, think_end_token=None)
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    bar.update(1)
        bar.close()
        return results

    def _stop_ids(self) -> set[int]:
        """EOS, and a chat template's end of turn."""
        ids = {self.eot_token_id}
        if self.chat is not None:
            ids.add(self.chat.special_ids[self.chat.template.end])
        return ids

    def _stop_check(self, until: list[str]):
        stops = [s for s in until if s]
        if not stops:
            return None
        tail = 4 * max(len(s) for s in stops) + 4  # a byte-level token covers at least a byte of the stop text

        def should_stop(tokens: list[int]) -> bool:
            text = self.tok_decode(tokens[-tail:])
            return any(s in text for s in stops)

        return should_stop
