"""Conversations to training tensors: assistant-only labels, truncation, packing, padding.

A conversation is a list of ``{"role": "system" | "user" | "assistant", "content": str}``.
Only assistant tokens carry a loss (labels elsewhere are ``-100``): the model should learn to
answer, not to imitate the questions.

Formatting: the tokenizer's chat template when it has one; otherwise a documented fallback,
the format of the "### Human: ... ### Assistant: ..." variant of OASST1::

    ### Human: How do I boil an egg?
    ### Assistant: Put it in boiling water for ...</s>

Which characters belong to the assistant is found by rendering the conversation prefix by
prefix: the reply of turn ``i`` spans from the end of ``render(turns[:i], generation prompt)``
to the end of ``render(turns[:i+1])``, so the end-of-turn token is trained too (the model learns
to stop). Tokens are mapped to those character spans through the fast tokenizer's offsets; a
token straddling a span's edge (byte-level BPE merges the space before a reply into its first
word) counts as the reply's.

Packing puts several conversations into one row. Each keeps its own ``position_ids`` starting at
0; transformers reads the restarts as document boundaries and masks attention across them
(block-diagonal causal mask for eager/SDPA, ``cu_seqlens`` for flash attention), so a packed
row computes exactly what the conversations would alone. transformers does this only when the
forward builds no KV cache: the model must run with ``use_cache=False`` (the training module
sets it), otherwise the documents of a row would attend to each other.

    row:       [ conv A ........ | conv B ..... | conv C .. | pad ]
    positions:   0 1 2 ... 9       0 1 ... 6      0 1 2 3     0 1
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
FALLBACK_ROLE_PREFIX = {"system": "### System: ", "user": "### Human: ", "assistant": "### Assistant: "}


@dataclass
class TokenizedConversation:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


def _template_spans(tokenizer: PreTrainedTokenizerBase, turns: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    text = tokenizer.apply_chat_template(turns, tokenize=False)
    spans = []
    for index, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(turns[:index], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(turns[:index + 1], tokenize=False)
        if not (text.startswith(through) and through.startswith(before)):
            raise ValueError(
                f"the chat template of {tokenizer.name_or_path!r} does not render conversations prefix by "
                "prefix (an earlier turn changes when a later one is added), so assistant tokens cannot be "
                "located; set --data.use_chat_template=false to use the '### Human/### Assistant' format")
        spans.append((len(before), len(through)))
    return text, spans


def _fallback_spans(tokenizer: PreTrainedTokenizerBase, turns: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    text, spans = "", []
    eos = tokenizer.eos_token or ""
    for turn in turns:
        prefix = FALLBACK_ROLE_PREFIX[turn["role"]]
        if turn["role"] == "assistant":
            start = len(text) + len(prefix)
            text += prefix + turn["content"] + eos
            spans.append((start, len(text)))
            text += "\n"
        else:
            text += prefix + turn["content"] + "\n"
    if tokenizer.bos_token:
        text = tokenizer.bos_token + text
        spans = [(start + len(tokenizer.bos_token), end + len(tokenizer.bos_token)) for start, end in spans]
    return text, spans


def tokenize_conversation(tokenizer: PreTrainedTokenizerBase, turns: list[dict], max_length: int,
                          use_chat_template: bool = True) -> TokenizedConversation:
    """Token ids and assistant-only labels of one conversation, cut to ``max_length`` tokens."""
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"tokenizer {tokenizer.name_or_path!r} is not a fast tokenizer; assistant-only labels "
                        "need character offsets (load it with use_fast=True)")
    if use_chat_template and tokenizer.chat_template:
        text, spans = _template_spans(tokenizer, turns)
    else:
        text, spans = _fallback_spans(tokenizer, turns)
    # The rendered text already holds the BOS token when the template writes it; adding it again
    # would give the model a doubled BOS it never saw in pretraining.
    add_special = not (tokenizer.bos_token and text.startswith(tokenizer.bos_token))
    encoding = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
    input_ids = encoding["input_ids"]
    labels = []
    for token_id, (start, end) in zip(input_ids, encoding["offset_mapping"]):
        inside = end > start and any(start < span_end and end > span_start for span_start, span_end in spans)
        labels.append(token_id if inside else IGNORE_INDEX)
    truncated = len(input_ids) > max_length
    return TokenizedConversation(input_ids[:max_length], labels[:max_length], truncated)


def pack_examples(examples: list[dict], max_length: int) -> list[dict]:
    """Greedily pack tokenized examples (in the given order) into rows of at most ``max_length``.

    Each example keeps its own positions from 0, and the first label of every example is
    ignored, so no token is ever trained to predict the start of the next conversation.
    """
    rows, current = [], {"input_ids": [], "labels": [], "position_ids": []}
    for example in examples:
        length = len(example["input_ids"])
        if length > max_length:
            raise ValueError(f"an example of {length} tokens exceeds max_length={max_length}; truncate first")
        if current["input_ids"] and len(current["input_ids"]) + length > max_length:
            rows.append(current)
            current = {"input_ids": [], "labels": [], "position_ids": []}
        current["input_ids"].extend(example["input_ids"])
        current["labels"].extend([IGNORE_INDEX] + list(example["labels"][1:]))
        current["position_ids"].extend(range(length))
    if current["input_ids"]:
        rows.append(current)
    return rows


class CausalLMCollator:
    """Pads a list of examples into a batch for ``model(**batch)``.

    Unpacked examples get an ``attention_mask``. Packed rows (those with ``position_ids``) get
    none: transformers derives the per-document mask from the position restarts, and the padding
    at the end becomes one more "document" of its own that no real token can see (causal).

    Args:
        pad_token_id: id written into padded positions (they carry no loss).
        pad_to_multiple_of: round the padded length up, which helps tensor-core kernels on GPUs.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: Optional[int] = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(e["input_ids"]) for e in examples)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        packed = "position_ids" in examples[0]
        input_ids = torch.full((len(examples), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
        extra = torch.zeros((len(examples), length), dtype=torch.long)
        for row, example in enumerate(examples):
            n = len(example["input_ids"])
            input_ids[row, :n] = torch.as_tensor(example["input_ids"])
            labels[row, :n] = torch.as_tensor(example["labels"])
            if packed:
                extra[row, :n] = torch.as_tensor(example["position_ids"])
                extra[row, n:] = torch.arange(length - n)
            else:
                extra[row, :n] = 1
        batch = {"input_ids": input_ids, "labels": labels}
        batch["position_ids" if packed else "attention_mask"] = extra
        return batch
