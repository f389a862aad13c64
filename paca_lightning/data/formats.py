"""The row formats of your own data, and how one row becomes token ids and labels.

Each row becomes a conversation (a list of ``{"role", "content"}`` turns) or a plain text, then
token ids and labels:

=====================  ====================================================  =======================
format                 columns (rename others with ``columns``)               scored tokens
=====================  ====================================================  =======================
``messages``           ``messages``: ``[{role, content}, ...]`` (roles        every assistant turn
                       system/user/assistant), or ShareGPT ``[{from,
                       value}, ...]`` (system/human/gpt), also found as
                       ``conversations``
``instruction``        ``instruction``, optional ``input``, ``output``        the output
                       (Alpaca): one user turn (instruction, blank line,
                       input) and one assistant turn
``prompt_completion``  ``prompt``, ``completion``: two strings (plain text,   the completion
                       no template), or two message lists (as TRL reads)
``text``               ``text``: plain text for continued pre-training        every token
=====================  ====================================================  =======================

``auto`` picks the first format of the table whose columns the rows have and says which.
Conversations are rendered with the tokenizer's chat template (``chat_template`` sets or
replaces it); a turn's scored characters are found by rendering the conversation prefix by
prefix, as in :mod:`paca_lightning.data.collation`, and the end-of-turn token is scored with
its reply (whitespace the template writes after it is not). ``train_on_prompt`` scores every
token instead.

A row that does not fit its format (an unknown role, an empty conversation, no assistant turn,
a missing value) raises :class:`BadRow` naming the value; :class:`RowEncoder` returns it as the
row's ``problem`` so that ``Dataset.map`` goes on, and the data module
(:mod:`paca_lightning.data.own_data`) stops or skips and counts.
"""

from __future__ import annotations

from typing import Any, Optional

from .collation import IGNORE_INDEX

FORMATS = ("auto", "messages", "instruction", "prompt_completion", "text")
# The columns each format reads, required first; auto tries the formats in this order.
FORMAT_COLUMNS = {
    "messages": (("messages",), ()),
    "instruction": (("instruction", "output"), ("input",)),
    "prompt_completion": (("prompt", "completion"), ()),
    "text": (("text",), ()),
}
# Column names other tools use for a field, looked up when the field's own name is absent.
COLUMN_ALIASES = {"messages": ("conversations",)}
ROLES = {"system": "system", "user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant"}
VALID_ROLES = "system, user, assistant (ShareGPT: system, human, gpt)"


class BadRow(ValueError):
    """A row that does not fit its format: ``reason`` groups the count, ``detail`` names the value."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def _shown(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def resolve_format(columns: list[str], format: str, mapping: dict[str, str], source: str) -> tuple[str, dict[str, str]]:
    """The format of rows with ``columns`` and ``{field: column}`` for it; raises naming the
    columns found and how to map them when the rows do not fit."""
    if format not in FORMATS:
        raise ValueError(f"--data.format={format!r} is not one of {', '.join(FORMATS)}")
    unknown = sorted(set(mapping) - {field for required, optional in FORMAT_COLUMNS.values()
                                     for field in required + optional})
    if unknown:
        raise ValueError(f"--data.columns names unknown fields {unknown}; fields are the keys (messages, instruction, "
                         "input, output, prompt, completion, text), columns of the file the values: "
                         "'{messages: conversations}'")

    def column(field: str) -> Optional[str]:
        for name in (mapping.get(field), field, *COLUMN_ALIASES.get(field, ())):
            if name is not None and name in columns:
                return name
        return None

    candidates = [format] if format != "auto" else list(FORMAT_COLUMNS)
    for candidate in candidates:
        required, optional = FORMAT_COLUMNS[candidate]
        found = {field: column(field) for field in required + optional}
        missing = [field for field in required if found[field] is None]
        if not missing:
            return candidate, {field: name for field, name in found.items() if name is not None}
        if format != "auto":
            wanted = ", ".join(mapping.get(field, field) for field in missing)
            example = ", ".join(f"{field}: <column>" for field in missing)
            raise ValueError(f"{source}: format {format!r} needs column(s) {wanted}; the rows have {sorted(columns)}. "
                             f"Map yours with --data.columns='{{{example}}}'")
    raise ValueError(f"{source}: cannot tell the format from the columns {sorted(columns)}. Expected one of: messages "
                     "(or conversations); instruction + output (+ input); prompt + completion; text. Set --data.format "
                     "and map your columns, e.g. --data.format=instruction --data.columns='{instruction: question, "
                     "output: answer}'")


def _turns(value: Any, what: str) -> list[dict]:
    if not isinstance(value, list):
        raise BadRow(f"{what} is not a list of turns", f"{what} = {_shown(value)}")
    turns = []
    for number, turn in enumerate(value, start=1):
        if not isinstance(turn, dict):
            raise BadRow("turn is not an object", f"{what} turn {number} = {_shown(turn)}")
        role_key, content_key = ("role", "content") if turn.get("role") is not None else ("from", "value")
        role = turn.get(role_key)
        if role is None:
            raise BadRow("turn without a role", f"{what} turn {number} = {_shown(turn)} has neither 'role' nor 'from'")
        if not isinstance(role, str) or role.lower() not in ROLES:
            raise BadRow("unknown role", f"{what} turn {number} has {role_key} {_shown(role)}; valid: {VALID_ROLES}")
        content = turn.get(content_key)
        if not isinstance(content, str):
            raise BadRow("turn content is not text", f"{what} turn {number} has {content_key} = {_shown(content)}")
        turns.append({"role": ROLES[role.lower()], "content": content})
    return turns


def _text(row: dict, field: str, column: str, required: bool = True) -> str:
    value = row.get(column)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise BadRow(f"empty or missing {field}", f"column {column!r} = {_shown(value)}")
    return value


class RowEncoder:
    """Turns one row into ``input_ids``/``labels`` (picklable, for ``Dataset.map`` with ``num_proc``)."""

    def __init__(self, tokenizer, format: str, columns: dict[str, str], max_length: int, train_on_prompt: bool):
        self.tokenizer, self.format, self.columns = tokenizer, format, columns
        self.max_length, self.train_on_prompt = max_length, train_on_prompt

    def __call__(self, row: dict, index: int) -> dict:
        try:
            input_ids, labels = self.encode(row)
        except BadRow as bad:
            return {"input_ids": [], "labels": [], "row": index + 1, "problem": bad.reason, "detail": bad.detail,
                    "truncated": False, "scored": 0}
        truncated = len(input_ids) > self.max_length
        input_ids, labels = input_ids[:self.max_length], labels[:self.max_length]
        scored = sum(label != IGNORE_INDEX for label in labels[1:])
        problem = "" if scored else "no scored token left after truncation"
        return {"input_ids": input_ids, "labels": labels, "row": index + 1, "problem": problem,
                "detail": f"{len(input_ids)} tokens kept of a longer row" if problem else "",
                "truncated": truncated, "scored": scored}

    def encode(self, row: dict) -> tuple[list[int], list[int]]:
        """Token ids and labels of ``row``, uncut; raises :class:`BadRow`."""
        columns = self.columns
        if self.format == "text":
            ids = self._ids(_text(row, "text", columns["text"]), True) + self._eos()
            return ids, list(ids)
        if self.format == "prompt_completion":
            prompt, completion = row.get(columns["prompt"]), row.get(columns["completion"])
            if isinstance(prompt, str) and isinstance(completion, str):
                _text(row, "completion", columns["completion"])
                prompt_ids = self._ids(prompt, True)
                completion_ids = self._ids(completion, False) + self._eos()
                prompt_labels = list(prompt_ids) if self.train_on_prompt else [IGNORE_INDEX] * len(prompt_ids)
                return prompt_ids + completion_ids, prompt_labels + completion_ids
            if isinstance(prompt, list) and isinstance(completion, list):
                head, tail = _turns(prompt, "prompt"), _turns(completion, "completion")
                scored = [len(head) + i for i, turn in enumerate(tail) if turn["role"] == "assistant"]
                if not scored:
                    raise BadRow("no assistant turn", f"completion = {_shown(completion)} has no assistant turn")
                return self._conversation(head + tail, scored)
            raise BadRow("prompt and completion are not both text or both message lists",
                         f"prompt = {_shown(prompt)}, completion = {_shown(completion)}")
        if self.format == "instruction":
            instruction = _text(row, "instruction", columns["instruction"])
            extra = _text(row, "input", columns["input"], required=False) if "input" in columns else ""
            output = _text(row, "output", columns["output"])
            user = instruction + ("\n\n" + extra if extra.strip() else "")
            turns = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
            return self._conversation(turns, [1])
        turns = _turns(row.get(columns["messages"]), columns["messages"])
        if not turns:
            raise BadRow("empty conversation", f"column {columns['messages']!r} = []")
        scored = [i for i, turn in enumerate(turns) if turn["role"] == "assistant"]
        if not scored:
            raise BadRow("no assistant turn", f"roles {[turn['role'] for turn in turns]}: nothing to learn to answer")
        return self._conversation(turns, scored)

    def _ids(self, text: str, first: bool) -> list[int]:
        return self.tokenizer(text, add_special_tokens=first)["input_ids"]

    def _eos(self) -> list[int]:
        return [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []

    def _conversation(self, turns: list[dict], scored: list[int]) -> tuple[list[int], list[int]]:
        tokenizer = self.tokenizer
        text = tokenizer.apply_chat_template(turns, tokenize=False)
        spans = []
        for index in scored:
            before = tokenizer.apply_chat_template(turns[:index], tokenize=False, add_generation_prompt=True)
            through = tokenizer.apply_chat_template(turns[:index + 1], tokenize=False)
            if not (text.startswith(through) and through.startswith(before)):
                raise ValueError(f"the chat template of {tokenizer.name_or_path!r} does not render conversations "
                                 "prefix by prefix (an earlier turn changes when a later one is added), so assistant "
                                 "tokens cannot be located; give another with --data.chat_template")
            # whitespace the template writes after the end-of-turn token is layout, never generated
            spans.append((len(before), len(through.rstrip())))
        # the template writes BOS itself when it wants one; the tokenizer must not add a second
        add_special = not (tokenizer.bos_token and text.startswith(tokenizer.bos_token))
        encoding = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
        input_ids = encoding["input_ids"]
        if self.train_on_prompt:
            return input_ids, list(input_ids)
        labels = []
        for token_id, (start, end) in zip(input_ids, encoding["offset_mapping"]):
            inside = end > start and any(start < span_end and end > span_start for span_start, span_end in spans)
            labels.append(token_id if inside else IGNORE_INDEX)
        return input_ids, labels
