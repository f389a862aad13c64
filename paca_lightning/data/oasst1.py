"""OpenAssistant OASST1 as multi-turn conversations for instruction tuning.

OASST1 is exported as single messages linked into trees by ``parent_id``: a prompter message,
several ranked assistant replies to it, follow-up prompts to each reply, and so on. A tree holds
many conversations; we train on one per tree, the **top-ranked path**:

    prompt ─┬─ reply rank 0 ─┬─ follow-up ── reply  ← this path becomes the conversation
            ├─ reply rank 1  └─ follow-up ── reply
            └─ reply (deleted)                       ← dropped with its subtree

- Messages that are ``deleted`` or failed review (``review_result`` false) are dropped with
  their whole subtree: the messages below them answer text we will not train on.
- At each step the child with the lowest ``rank`` is taken (0 is best); unranked children
  come after ranked ones, ties go to the earlier ``created_date``, then the smaller id, so the
  choice is deterministic.
- A path that ends on a prompt loses that prompt (there is no reply to learn); a tree with no
  assistant reply left gives no conversation.
- ``languages`` keeps trees whose root message is in one of the listed languages.

The common single-text variant (one ``text`` column with ``### Human: ... ### Assistant: ...``
turns, as in openassistant-guanaco) is read too; the file's columns decide which schema applies.
Malformed rows are skipped and counted; the counts are printed when preparation ends.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from pathlib import Path
from typing import Optional, Union

import lightning as L
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torchdata.stateful_dataloader import StatefulDataLoader

from . import OASST1_SAMPLE, TINY_LLAMA_DIR
from .collation import CausalLMCollator, pack_examples, tokenize_conversation
from .sources import SkipCounter, load_split
from .tokenizer import load_tokenizer

ROLE_NAMES = {"prompter": "user", "assistant": "assistant"}
_TURN_MARKER = re.compile(r"###\s*(Human|Assistant)\s*:", re.IGNORECASE)


def _rank_key(message: dict) -> tuple:
    rank = message.get("rank")
    return (rank is None, rank if rank is not None else 0, str(message.get("created_date") or ""),
            message["message_id"])


def _row_problem(row: dict) -> Optional[str]:
    for key in ("message_id", "message_tree_id", "role", "text"):
        if not isinstance(row.get(key), str) or not row[key]:
            return f"missing or empty {key}"
    if row["role"] not in ROLE_NAMES:
        return "unknown role"
    if not row["text"].strip():
        return "empty text"
    return None


def conversations_from_trees(rows: list[dict], languages: Optional[list[str]] = None,
                             skipped: Optional[SkipCounter] = None) -> list[list[dict]]:
    """One conversation per message tree, following the top-ranked reply path (module docstring)."""
    skipped = SkipCounter() if skipped is None else skipped
    wanted = set(languages) if languages else None
    messages, children = {}, defaultdict(list)
    for row in rows:
        problem = _row_problem(row)
        if problem is None and row["message_id"] in messages:
            problem = "duplicate message_id"
        if problem:
            skipped[problem] += 1
            continue
        messages[row["message_id"]] = row
    roots = []
    for message in messages.values():
        parent_id = message.get("parent_id")
        if parent_id is None:
            roots.append(message)
        elif parent_id in messages:
            children[parent_id].append(message)
        else:
            skipped["orphan message (parent missing)"] += 1

    def usable(message: dict) -> bool:
        return not message.get("deleted") and message.get("review_result") is not False

    conversations = []
    for root in sorted(roots, key=lambda m: (m["message_tree_id"], m["message_id"])):
        if root["role"] != "prompter":
            skipped["tree root is not a prompter message"] += 1
            continue
        if wanted is not None and root.get("lang") not in wanted:
            skipped["language filtered out"] += 1
            continue
        if not usable(root):
            skipped["tree root deleted or failed review"] += 1
            continue
        path, node = [root], root
        while True:
            candidates = [c for c in children[node["message_id"]] if usable(c)]
            if not candidates:
                break
            node = min(candidates, key=_rank_key)
            if node["role"] == path[-1]["role"]:
                skipped["two consecutive messages of one role"] += 1
                break
            path.append(node)
        if path[-1]["role"] == "prompter":
            path.pop()
        if not path:
            skipped["tree without a usable assistant reply"] += 1
            continue
        conversations.append([{"role": ROLE_NAMES[m["role"]], "content": m["text"].strip()} for m in path])
    return conversations


def conversation_from_text(text: str) -> Optional[list[dict]]:
    """Turns of a ``### Human: ... ### Assistant: ...`` text, or ``None`` when it has no
    human turn followed by an assistant turn, or a turn is empty."""
    pieces = _TURN_MARKER.split(text)
    if len(pieces) < 5 or pieces[0].strip():
        return None
    turns = []
    for marker, content in zip(pieces[1::2], pieces[2::2]):
        role = "user" if marker.lower() == "human" else "assistant"
        content = content.strip()
        if not content or (turns and turns[-1]["role"] == role) or (not turns and role != "user"):
            return None
        turns.append({"role": role, "content": content})
    if turns[-1]["role"] == "user":
        turns.pop()
    return turns


def conversations_from_rows(rows: list[dict], languages: Optional[list[str]] = None,
                            skipped: Optional[SkipCounter] = None) -> list[list[dict]]:
    """Conversations from OASST1 message rows or from single-text rows, whichever ``rows`` are."""
    skipped = SkipCounter() if skipped is None else skipped
    if not rows:
        return []
    if "message_id" in rows[0]:
        return conversations_from_trees(rows, languages, skipped)
    if "text" not in rows[0]:
        raise ValueError(f"OASST1 rows need either the message schema (message_id, parent_id, role, text, "
                         f"...) or a single 'text' column; got columns {sorted(rows[0])}")
    conversations = []
    for row in rows:
        if languages and "lang" in row and row["lang"] not in languages:
            skipped["language filtered out"] += 1
            continue
        turns = conversation_from_text(row["text"]) if isinstance(row.get("text"), str) else None
        if not turns:
            skipped["text without '### Human:'/'### Assistant:' turns"] += 1
            continue
        conversations.append(turns)
    return conversations


class OASST1DataModule(L.LightningDataModule):
    """OASST1 conversations, tokenized with assistant-only labels, optionally packed.

    Args:
        tokenizer: hub name or local directory of the tokenizer; the recipes link it to the
            model's name so both always match.
        data_path: a local .json/.jsonl/.parquet file or a directory of ``train*``/``validation*``
            files in the OASST1 schema, or a hub dataset name (``OpenAssistant/oasst1``).
            Defaults to the small sample shipped with the package.
        languages: keep only trees in these languages (``["en", "es"]``, or ``"en,es"``); ``None``
            keeps all.
        max_length: tokens per example (and per packed row); longer conversations are cut
            at the end and counted.
        packing: pack several conversations into each row: far less padding, so more
            trained tokens per step when conversations are short.
        use_chat_template: format with the tokenizer's chat template when it has one; false
            (or a tokenizer without one) uses the ``### Human:/### Assistant:`` format.
        batch_size: rows per batch per device.
        val_fraction: share of conversations held out when the source has no validation split.
        seed: shuffles conversations before the held-out split and before packing.
        num_workers: DataLoader worker processes.
    """

    def __init__(self, tokenizer: str = str(TINY_LLAMA_DIR), data_path: str = str(OASST1_SAMPLE),
                 languages: Union[list[str], str, None] = None, max_length: int = 512, packing: bool = False,
                 use_chat_template: bool = True, batch_size: int = 8, val_fraction: float = 0.1,
                 seed: int = 0, num_workers: int = 0):
        super().__init__()
        if max_length < 2:
            raise ValueError(f"OASST1DataModule.max_length must be >= 2, got {max_length}")
        if batch_size < 1:
            raise ValueError(f"OASST1DataModule.batch_size must be >= 1, got {batch_size}")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"OASST1DataModule.val_fraction must be in [0, 1), got {val_fraction}")
        self.save_hyperparameters()
        self.tokenizer_name = tokenizer
        self.data_path = str(data_path)
        if isinstance(languages, str):  # --data.languages=en,de
            languages = [language.strip() for language in languages.split(",") if language.strip()]
        self.languages = languages
        self.max_length = max_length
        self.packing = packing
        self.use_chat_template = use_chat_template
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.num_workers = num_workers
        self.tokenizer = None
        self.train_examples: list[dict] = []
        self.val_examples: list[dict] = []
        self.skipped = SkipCounter()
        self.truncated = 0

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_examples:
            return
        self.tokenizer = load_tokenizer(self.tokenizer_name)
        self.skipped, self.truncated = SkipCounter(), 0
        train_rows = load_split(self.data_path, "train", what="OASST1")
        val_rows = None
        if not Path(self.data_path).is_file():
            val_rows = load_split(self.data_path, "validation", what="OASST1", required=False)
        train = conversations_from_rows(train_rows, self.languages, self.skipped)
        val = conversations_from_rows(val_rows, self.languages, self.skipped) if val_rows else []
        rng = random.Random(self.seed)
        rng.shuffle(train)
        if val_rows is None and self.val_fraction > 0 and len(train) > 1:
            held_out = max(1, round(len(train) * self.val_fraction))
            train, val = train[held_out:], train[:held_out]
        self.train_examples = self._tokenize(train)
        self.val_examples = self._tokenize(val)
        if not self.train_examples:
            raise ValueError(f"OASST1 at {self.data_path!r} gave no training conversation "
                             f"(languages={self.languages}). {self.skipped.report('OASST1')}")
        if self.packing:
            self.train_examples = pack_examples(self.train_examples, self.max_length)
            self.val_examples = pack_examples(self.val_examples, self.max_length)
        if rank_zero_only.rank == 0:  # every rank prepares the same data; one summary is enough
            print(self.summary())

    def _tokenize(self, conversations: list[list[dict]]) -> list[dict]:
        examples = []
        for turns in conversations:
            tokenized = tokenize_conversation(self.tokenizer, turns, self.max_length, self.use_chat_template)
            if all(label == -100 for label in tokenized.labels[1:]):
                self.skipped["no assistant token left after truncation"] += 1
                continue
            self.truncated += tokenized.truncated
            examples.append({"input_ids": tokenized.input_ids, "labels": tokenized.labels})
        return examples

    def summary(self) -> str:
        rows = "packed rows" if self.packing else "conversations"
        trained = sum(sum(label != -100 for label in e["labels"]) for e in self.train_examples)
        return (f"OASST1: {len(self.train_examples)} training and {len(self.val_examples)} validation {rows}, "
                f"{trained:,} assistant tokens to train on; {self.truncated} conversations truncated to "
                f"{self.max_length} tokens. {self.skipped.report('OASST1')}")

    def _loader(self, examples: list[dict], shuffle: bool) -> StatefulDataLoader:
        collate = CausalLMCollator(self.tokenizer.pad_token_id)
        return StatefulDataLoader(examples, batch_size=self.batch_size, shuffle=shuffle, collate_fn=collate,
                          num_workers=self.num_workers, drop_last=False)

    def train_dataloader(self) -> StatefulDataLoader:
        return self._loader(self.train_examples, shuffle=True)

    def val_dataloader(self) -> Union[StatefulDataLoader, list]:
        return self._loader(self.val_examples, shuffle=False) if self.val_examples else []
