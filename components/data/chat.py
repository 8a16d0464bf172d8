"""Chat data for supervised fine-tuning: the chat template, the loss mask, and packing conversations into samples.

Template. A conversation is rendered turn by turn as `START(role) role MIDDLE content END`, where START, MIDDLE and
END are special tokens of the tokenizer. Moonlight-Instruct's (`moonlight`):
`<|im_system|>system<|im_middle|>…<|im_end|><|im_user|>user<|im_middle|>…<|im_end|>`
`<|im_assistant|>assistant<|im_middle|>…<|im_end|>`, and a generation prompt is the assistant's header. (Moonlight
ships no default system prompt in this template as written here; a conversation without a system turn has none.)
`ChatTemplate.jinja()` is the same template for transformers' `apply_chat_template` (written into an export's
tokenizer_config.json), and gives exactly `ChatEncoder`'s ids.

Loss mask. Only assistant content and its END token are targets; system and user turns and every role header are
not. A conversation encodes to (ids, is_target), one flag per token: token t is a target when predicting it from
tokens < t counts in the loss.

Packing. Conversations are packed into fixed-length samples of seq_len + 1 token slots (best fit, longest first;
or one conversation per sample with padding, `packing="none"`). A sample is stored as one row
`[tokens (seq_len + 1) | flags (seq_len + 1)]`, flags = segment << 1 | is_target, with segments 1, 2, ... for the
conversations and 0 for padding, so the shard format itself records the boundaries and the mask. `model_fields`
turns rows into what the model takes: input ids, targets (IGNORE_INDEX where not a target or across a boundary),
positions restarting at 0 in each conversation, and segment ids (attention stays inside a segment).
"""
from __future__ import annotations

import bisect
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100
PACKING = ("best_fit", "none")
TOO_LONG = ("truncate", "drop")
ROW_EXT = "chat"  # tar member extension of a chat row (pretraining samples are `.tokens`)


@dataclass(frozen=True)
class ChatTemplate:
    """A turn is `starts[role] + role + middle + content + end`; the generation prompt is the assistant's header."""

    name: str
    starts: dict[str, str]
    middle: str
    end: str

    @property
    def special_tokens(self) -> tuple[str, ...]:
        return (*(self.starts[r] for r in ROLES), self.middle, self.end)

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        text = "".join(f"{self.starts[m['role']]}{m['role']}{self.middle}{m['content']}{self.end}" for m in messages)
        return text + (self.generation_prompt() if add_generation_prompt else "")

    def generation_prompt(self) -> str:
        return f"{self.starts['assistant']}assistant{self.middle}"

    def jinja(self) -> str:
        """The same template in Jinja, as transformers' `apply_chat_template` reads it from tokenizer_config.json."""
        starts = "{" + ", ".join(f"{json.dumps(r)}: {json.dumps(self.starts[r])}" for r in ROLES) + "}"
        return ("{%- set starts = " + starts + " -%}"
                "{%- for message in messages -%}"
                "{{- starts[message['role']] + message['role'] + " + json.dumps(self.middle)
                + " + message['content'] + " + json.dumps(self.end) + " -}}"
                "{%- endfor -%}"
                "{%- if add_generation_prompt -%}{{- " + json.dumps(self.generation_prompt()) + " -}}{%- endif -%}")


TEMPLATES = {
    "moonlight": ChatTemplate("moonlight", {"system": "<|im_system|>", "user": "<|im_user|>",
                                            "assistant": "<|im_assistant|>"}, "<|im_middle|>", "<|im_end|>"),
}


def get_template(name: str) -> ChatTemplate:
    if name not in TEMPLATES:
        raise ValueError(f"chat template {name!r} is unknown; choose one of {sorted(TEMPLATES)}")
    return TEMPLATES[name]


class ChatEncoder:
    """Token ids and loss mask of conversations under `template` for `tokenizer` (which must have the template's
    control tokens as special tokens)."""

    def __init__(self, tokenizer: Tokenizer, template: ChatTemplate | str):
        self.tokenizer = tokenizer
        self.template = get_template(template) if isinstance(template, str) else template
        ids = {t: tokenizer.special_token_id(t) for t in self.template.special_tokens}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"the tokenizer has no special token(s) {missing} that chat template "
                             f"{self.template.name!r} needs: train it with them (train_bpe(special_tokens=...), as the "
                             "demo tokenizer is) or use a tiktoken tokenizer, which reserves them")
        self.special_ids = ids
        self._special_split = re.compile("(" + "|".join(map(re.escape, sorted(ids, key=len, reverse=True))) + ")")
        self._role_ids = {r: tokenizer.encode(r) for r in ROLES}

    def encode(self, messages: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
        return self.encode_many([messages])[0]

    def encode_many(self, conversations: Sequence[Sequence[dict]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """[(ids int64, is_target bool)] per conversation; all contents go through one `encode_batch`."""
        t, ids = self.template, self.special_ids
        contents = self.tokenizer.encode_batch([m["content"] for conv in conversations for m in conv])
        out, k = [], 0
        for conv in conversations:
            tokens: list[int] = []
            target: list[bool] = []
            for m in conv:
                head = [ids[t.starts[m["role"]]], *self._role_ids[m["role"]], ids[t.middle]]
                body = [*contents[k], ids[t.end]]
                k += 1
                tokens += head + body
                target += [False] * len(head) + [m["role"] == "assistant"] * len(body)
            out.append((np.asarray(tokens, dtype=np.int64), np.asarray(target, dtype=bool)))
        return out

    def encode_text(self, text: str) -> list[int]:
        """Ids of rendered chat text (e.g. an evaluation prompt): the template's special-token strings become their
        ids, the text between them is encoded as ordinary text."""
        out: list[int] = []
        for k, piece in enumerate(self._special_split.split(text)):
            if k % 2:
                out.append(self.special_ids[piece])
            elif piece:
                out += self.tokenizer.encode(piece)
        return out


# ---------------------------------------------------------------------------------------------- packing
def pack_lengths(lengths: Sequence[int], capacity: int, packing: str = "best_fit") -> list[list[int]]:
    """Groups of conversation indices, each fitting in `capacity` token slots. `best_fit`: longest first, each into
    the fullest sample it still fits (best-fit decreasing); `none`: one conversation per sample. Deterministic."""
    if packing not in PACKING:
        raise ValueError(f"packing={packing!r} must be one of {PACKING}")
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and (lengths.max() > capacity or lengths.min() < 1):
        raise ValueError(f"every conversation must hold 1..{capacity} tokens to be packed")
    if packing == "none":
        return [[int(i)] for i in range(len(lengths))]
    bins: list[list[int]] = []
    room: dict[int, list[int]] = {}  # free slots -> samples with exactly that many
    free: list[int] = []  # the free-slot counts present, sorted
    for i in np.argsort(-lengths, kind="stable").tolist():
        need = int(lengths[i])
        j = bisect.bisect_left(free, need)
        if j < len(free):
            left = free[j]
            b = room[left].pop()
            if not room[left]:
                del room[left]
                free.pop(j)
        else:
            b, left = len(bins), capacity
            bins.append([])
        bins[b].append(i)
        left -= need
        if left > 0:
            if left not in room:
                room[left] = []
                bisect.insort(free, left)
            room[left].append(b)
    return bins


def row_dtype(vocab_size: int, seq_len: int) -> np.dtype:
    """The integer type of a chat row: uint16 when both the token ids and the flags fit."""
    return np.dtype("uint16" if max(vocab_size, 2 * (seq_len + 2)) <= 2**16 else "uint32")


def pack_rows(conversations: Sequence[tuple[np.ndarray, np.ndarray]], groups: list[list[int]], seq_len: int,
              pad_id: int, dtype: np.dtype) -> np.ndarray:
    """Rows [len(groups), 2 * (seq_len + 1)]: the group's conversations back to back, then padding (segment 0)."""
    width = seq_len + 1
    rows = np.zeros((len(groups), 2 * width), dtype=dtype)
    rows[:, :width] = pad_id
    for r, group in enumerate(groups):
        at = 0
        for segment, c in enumerate(group, 1):
            ids, target = conversations[c]
            rows[r, at:at + len(ids)] = ids
            rows[r, width + at:width + at + len(ids)] = (segment << 1) | target
            at += len(ids)
    return rows


def model_fields(rows: np.ndarray, seq_len: int, packed: bool = True) -> dict[str, np.ndarray]:
    """From chat rows [..., 2 * (seq_len + 1)] (any integer type): `input_ids`, `targets` (next token where it is
    a target of the same conversation, else IGNORE_INDEX), and when `packed` `position_ids` (restarting at each
    conversation) and `segment_ids`, all int32 [..., seq_len]; plus `chat_tokens` [..., 2]: (non-padding inputs,
    targets) per row. Without `packed` (one conversation per row, padding after it) plain causal attention and
    positions 0, 1, ... are already right, so neither is returned."""
    width = seq_len + 1
    tokens = rows[..., :width].astype(np.int32)
    flags = rows[..., width:].astype(np.int32)
    segment = flags >> 1
    same = segment[..., 1:] == segment[..., :-1]
    is_target = ((flags[..., 1:] & 1) == 1) & same
    fields = {"input_ids": tokens[..., :-1], "targets": np.where(is_target, tokens[..., 1:], IGNORE_INDEX)
              .astype(np.int32)}
    inputs = segment[..., :-1]
    fields["chat_tokens"] = np.stack([(inputs > 0).sum(-1), is_target.sum(-1)], axis=-1).astype(np.int64)
    if packed:
        index = np.arange(seq_len, dtype=np.int32)
        starts = np.ones(inputs.shape, dtype=bool)
        starts[..., 1:] = ~same[..., :-1]
        first = np.maximum.accumulate(np.where(starts, index, 0), axis=-1)
        fields["position_ids"] = (index - first).astype(np.int32)
        fields["segment_ids"] = inputs
    return fields
