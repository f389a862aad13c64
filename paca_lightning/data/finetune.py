"""Your own data: the formats other fine-tuning tools read, tokenized for a PaCA run.

``FineTuneDataModule(path=...)`` reads a ``.jsonl``/``.json``/``.parquet``/``.csv`` file, a
directory holding ``train*`` and optionally ``validation*`` files, or a hub dataset name, in one
of these formats (``format="auto"`` decides from the columns and says which it chose):

============================  ==============================================================
``messages``                  ``{"messages": [{"role": "user", "content": ...}, ...]}``; roles
                              system/user/assistant. The ShareGPT spelling
                              ``{"conversations": [{"from": "human", "value": ...}]}`` with
                              human/gpt/system is read too.
``instruction`` (Alpaca)      ``{"instruction": ..., "input": ..., "output": ...}``; ``input``
                              optional. Becomes a user turn (instruction, blank line, input)
                              and an assistant turn.
``prompt_completion`` (TRL)   ``{"prompt": ..., "completion": ...}``: strings, or message lists.
``text``                      ``{"text": ...}``: plain text for continued pre-training; every
                              token is scored.
============================  ==============================================================

``columns`` maps other column names onto these (``{"messages": "dialog"}``). Chat formats are
rendered with the tokenizer's chat template (``chat_template`` sets or replaces it) and only
assistant tokens carry loss, in every assistant turn (``train_on_prompt=True`` scores every
token). Rows that cannot be used (an empty conversation, one without an assistant turn, one
whose assistant tokens were all cut by truncation) are skipped and counted with the first row
number; structural problems (an unknown role, a missing column, an empty file) stop with the
file, row and value named.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional, Union

import lightning as L
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torchdata.stateful_dataloader import StatefulDataLoader

from . import TINY_LLAMA_DIR
from .collation import IGNORE_INDEX, CausalLMCollator, pack_examples, tokenize_conversation
from .sources import SkipCounter, read_json_rows
from .tokenizer import load_tokenizer

FORMATS = ("messages", "instruction", "prompt_completion", "text")
ROLES = {"system": "system", "user": "user", "assistant": "assistant",
         "human": "user", "gpt": "assistant"}  # the last two: ShareGPT's spelling
FILE_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class DataFormatError(ValueError):
    """A data file or row the module cannot use; the message names the file, row and value."""


def read_table(path: Path, skipped: SkipCounter):
    """One data file as a `datasets.Dataset` (JSON parsed line by line, see `read_json_rows`)."""
    import datasets

    kind = FILE_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataFormatError(f"{path}: unsupported file type {path.suffix!r}; use one of {sorted(FILE_SUFFIXES)}")
    if path.stat().st_size == 0:
        raise DataFormatError(f"{path} is empty; it needs one row per example")
    if kind == "json":
        rows = read_json_rows(path, skipped)
        if not rows:
            raise DataFormatError(f"{path} holds no JSON object; {skipped.report(path.name)}")
        return datasets.Dataset.from_list(rows)
    with quiet_datasets():
        try:
            return datasets.load_dataset(kind, data_files=str(path), split="train")
        except Exception as error:  # datasets wraps parser errors in several types
            cause = error.__cause__ or error
            raise DataFormatError(f"{path}: cannot read it as {kind}: {type(cause).__name__}: {cause}") from None


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """No `datasets` progress bars: a bar per small file or map is noise; the summary reports."""
    import datasets

    bars_were_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if bars_were_enabled:
            datasets.enable_progress_bars()


def split_files(directory: Path, split: str) -> list[Path]:
    return sorted(p for p in directory.iterdir()
                  if p.is_file() and p.name.startswith(split) and p.suffix.lower() in FILE_SUFFIXES)


def decide_format(columns: list[str], where: str) -> str:
    """The format the columns call for; raises listing the columns and how to map them."""
    found = set(columns)
    if "messages" in found or "conversations" in found:
        return "messages"
    if {"instruction", "output"} <= found:
        return "instruction"
    if {"prompt", "completion"} <= found:
        return "prompt_completion"
    if "text" in found:
        return "text"
    raise DataFormatError(
        f"{where}: cannot tell the format from the columns {sorted(found)}. Expected 'messages' (or ShareGPT "
        "'conversations'), 'instruction' + 'output', 'prompt' + 'completion', or 'text'. Map yours with e.g. "
        "--data.columns='{messages: dialog}' or set --data.format")


def _required(format: str) -> tuple[str, ...]:
    return {"messages": ("messages",), "instruction": ("instruction", "output"),
            "prompt_completion": ("prompt", "completion"), "text": ("text",)}[format]


def _messages(value: Any, where: str) -> list[dict]:
    if not isinstance(value, list):
        raise DataFormatError(f"{where}: expected a list of messages, got {type(value).__name__} {str(value)[:60]!r}")
    turns = []
    for message in value:
        if not isinstance(message, dict):
            raise DataFormatError(f"{where}: a message is {str(message)[:60]!r}, expected an object with role and "
                                  "content (or ShareGPT's from and value)")
        # Arrow gives every message every key seen in the column, absent ones as None
        role = message.get("role") if message.get("role") is not None else message.get("from")
        content = message.get("content") if message.get("content") is not None else message.get("value")
        if role not in ROLES:
            raise DataFormatError(f"{where}: unknown role {role!r}; valid roles are system, user, assistant "
                                  "(ShareGPT: system, human, gpt)")
        if not isinstance(content, str):
            raise DataFormatError(f"{where}: the content of a {role!r} message is {str(content)[:60]!r}, "
                                  "expected a string")
        turns.append({"role": ROLES[role], "content": content})
    return turns


def row_to_turns(row: dict, format: str, where: str) -> Union[list[dict], str]:
    """A row as a conversation (list of turns), or as plain text for the ``text`` format."""
    if format == "text":
        if not isinstance(row["text"], str):
            raise DataFormatError(f"{where}: 'text' is {str(row['text'])[:60]!r}, expected a string")
        return row["text"]
    if format == "messages":
        return _messages(row["messages"], where)
    if format == "instruction":
        instruction, extra, output = row["instruction"], row.get("input"), row["output"]
        if not isinstance(instruction, str) or not isinstance(output, str):
            raise DataFormatError(f"{where}: 'instruction' and 'output' must be strings")
        prompt = instruction + (f"\n\n{extra}" if isinstance(extra, str) and extra.strip() else "")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    return _messages(prompt, where) + _messages(completion, where)


def tokenize_row(tokenizer, turns: Union[list[dict], str], max_length: int, train_on_prompt: bool) -> dict:
    """``input_ids``, ``labels``, ``truncated`` and ``problem`` (why the row is skipped, or '')."""
    if isinstance(turns, str):
        ids = tokenizer(turns, add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
        if tokenizer.bos_token_id is not None and ids[0] != tokenizer.bos_token_id:
            ids = [tokenizer.bos_token_id] + ids  # a document starts as the chat template starts a conversation
        truncated = len(ids) > max_length
        ids = ids[:max_length]
        return {"input_ids": ids, "labels": list(ids), "truncated": truncated,
                "problem": "" if len(ids) > 1 else "empty text"}
    if not turns:
        return {"input_ids": [], "labels": [], "truncated": False, "problem": "empty conversation"}
    if not any(turn["role"] == "assistant" for turn in turns):
        return {"input_ids": [], "labels": [], "truncated": False, "problem": "conversation without an assistant turn"}
    tokenized = tokenize_conversation(tokenizer, turns, max_length)
    labels = list(tokenized.input_ids) if train_on_prompt else tokenized.labels
    problem = "" if any(label != IGNORE_INDEX for label in labels[1:]) else \
        "no assistant token left after truncation"
    return {"input_ids": tokenized.input_ids, "labels": labels, "truncated": tokenized.truncated, "problem": problem}


class FineTuneDataModule(L.LightningDataModule):
    """Fine-tuning rows from your own files or a hub dataset (module docstring: the formats).

    Args:
        path: a data file, a directory with ``train*`` (and ``validation*``) files, or a hub name.
        format: ``auto`` or one of messages, instruction, prompt_completion, text.
        columns: your column names for the format's (``{"messages": "dialog"}``).
        subset, split: the hub dataset's configuration and training split.
        validation_path: a file of validation rows; else a ``validation*`` file of the directory;
            else ``validation_fraction`` of the training rows (seeded).
        chat_template: a Jinja chat template, or the path of a file holding one, to use instead of
            the tokenizer's (required when the tokenizer has none and the format is a chat).
        train_on_prompt: score every token, not only the assistant's.
        tokenizer, max_length, packing, batch_size, seed, num_workers: as in `OASST1DataModule`.
        num_proc: processes for tokenization (``datasets.map``).
    """

    def __init__(self, path: str, format: str = "auto", columns: Optional[dict[str, str]] = None,
                 subset: Optional[str] = None, split: str = "train", validation_path: Optional[str] = None,
                 validation_fraction: float = 0.0, chat_template: Optional[str] = None,
                 train_on_prompt: bool = False, tokenizer: str = str(TINY_LLAMA_DIR), max_length: int = 512,
                 packing: bool = False, batch_size: int = 8, seed: int = 0, num_workers: int = 0,
                 num_proc: Optional[int] = None):
        super().__init__()
        if format != "auto" and format not in FORMATS:
            raise ValueError(f"FineTuneDataModule.format={format!r} is not valid; choose auto or one of {FORMATS}")
        if not 0 <= validation_fraction < 1:
            raise ValueError(f"FineTuneDataModule.validation_fraction must be in [0, 1), got {validation_fraction}")
        if max_length < 2 or batch_size < 1:
            raise ValueError(f"FineTuneDataModule needs max_length >= 2 and batch_size >= 1, got {max_length}, "
                             f"{batch_size}")
        self.save_hyperparameters()
        self.path, self.format, self.columns = str(path), format, dict(columns or {})
        self.subset, self.split = subset, split
        self.validation_path, self.validation_fraction = validation_path, validation_fraction
        self.chat_template, self.train_on_prompt = chat_template, train_on_prompt
        self.tokenizer_name, self.max_length, self.packing = tokenizer, max_length, packing
        self.batch_size, self.seed, self.num_workers, self.num_proc = batch_size, seed, num_workers, num_proc
        self.tokenizer = None
        self.train_examples: list[dict] = []
        self.val_examples: list[dict] = []
        self.skipped = SkipCounter()
        self.truncated = 0
        self.rows_per_second = 0.0

    # ------------------------------------------------------------------ reading
    def _read(self) -> tuple[Any, Optional[Any], str]:
        """(training table, validation table or None, where they came from)."""
        import datasets

        source = Path(self.path).expanduser()
        validation = read_table(Path(self.validation_path).expanduser(), self.skipped) \
            if self.validation_path else None
        if source.is_file():
            return read_table(source, self.skipped), validation, str(source)
        if source.is_dir():
            train_files = split_files(source, "train")
            if not train_files:
                raise DataFormatError(f"{source} holds no train* file with a suffix in {sorted(FILE_SUFFIXES)}")
            train = datasets.concatenate_datasets([read_table(f, self.skipped) for f in train_files])
            if validation is None and split_files(source, "validation"):
                validation = datasets.concatenate_datasets(
                    [read_table(f, self.skipped) for f in split_files(source, "validation")])
            return train, validation, str(source)
        if self.path.startswith((".", "/", "~")) or source.suffix.lower() in FILE_SUFFIXES:
            raise FileNotFoundError(f"--data.path {self.path!r} does not exist (looked in {Path.cwd()}); give a "
                                    f"data file ({', '.join(sorted(FILE_SUFFIXES))}), a directory of train*/"
                                    "validation* files, or a hub dataset name")
        try:
            return datasets.load_dataset(self.path, self.subset, split=self.split), validation, self.path
        except (ConnectionError, OSError) as error:
            raise ConnectionError(f"--data.path {self.path!r} is no local file or directory and could not be loaded "
                                  f"as a hub dataset: {error}") from None

    def _normalize(self, table, where: str):
        renames = {ours: theirs for ours, theirs in self.columns.items() if theirs != ours}
        missing = [theirs for theirs in renames.values() if theirs not in table.column_names]
        if missing:
            raise DataFormatError(f"{where}: --data.columns maps to {missing}, which the data lacks; its columns "
                                  f"are {table.column_names}")
        table = table.rename_columns({theirs: ours for ours, theirs in renames.items()})
        if "conversations" in table.column_names and "messages" not in table.column_names:
            table = table.rename_column("conversations", "messages")
        return table

    # ------------------------------------------------------------------ tokenizing
    def _tokenize(self, table, format: str, where: str) -> list[dict]:
        tokenizer, max_length, train_on_prompt = self.tokenizer, self.max_length, self.train_on_prompt

        def prepare(row: dict, index: int) -> dict:
            turns = row_to_turns(row, format, f"{where}: row {index + 1}")
            return tokenize_row(tokenizer, turns, max_length, train_on_prompt)

        with quiet_datasets():
            tokenized = table.map(prepare, with_indices=True, remove_columns=table.column_names,
                                  num_proc=self.num_proc, load_from_cache_file=False)
        examples = []
        for index, row in enumerate(tokenized):
            if row["problem"]:
                key = next((k for k in self.skipped if k.startswith(row["problem"] + " (first: ")), None)
                self.skipped[key or f"{row['problem']} (first: {where} row {index + 1})"] += 1
                continue
            self.truncated += row["truncated"]
            examples.append({"input_ids": row["input_ids"], "labels": row["labels"]})
        return examples

    def _prepare_tokenizer(self) -> None:
        self.tokenizer = load_tokenizer(self.tokenizer_name)
        if self.chat_template:
            template = Path(self.chat_template).expanduser()
            self.tokenizer.chat_template = template.read_text() if template.is_file() else self.chat_template

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_examples:
            return
        self._prepare_tokenizer()
        self.skipped, self.truncated = SkipCounter(), 0
        started = time.perf_counter()
        train, validation, where = self._read()
        train = self._normalize(train, where)
        format = self.format if self.format != "auto" else decide_format(train.column_names, where)
        missing = [column for column in _required(format) if column not in train.column_names]
        if missing:
            raise DataFormatError(f"{where}: format {format!r} needs the columns {list(_required(format))}; "
                                  f"{missing} not found among {train.column_names}. Map yours with "
                                  f"--data.columns='{{{missing[0]}: <your column>}}'")
        if format != "text" and not self.tokenizer.chat_template:
            raise DataFormatError(f"format {format!r} is a chat, and tokenizer {self.tokenizer_name!r} has no chat "
                                  "template; give one with --data.chat_template (a Jinja string or a file)")
        self.chosen_format = format
        if validation is None and self.validation_fraction > 0:
            held_out = max(1, round(len(train) * self.validation_fraction))
            order = list(range(len(train)))
            random.Random(self.seed).shuffle(order)
            validation, train = train.select(sorted(order[:held_out])), train.select(sorted(order[held_out:]))
        elif validation is not None:
            validation = self._normalize(validation, self.validation_path or where)
        rows = len(train) + (len(validation) if validation is not None else 0)
        self.train_examples = self._tokenize(train, format, where)
        self.val_examples = self._tokenize(validation, format, self.validation_path or where) \
            if validation is not None else []
        self.rows_per_second = rows / max(time.perf_counter() - started, 1e-9)
        if not self.train_examples:
            raise DataFormatError(f"{where} gave no usable training row. {self.skipped.report('data')}")
        if self.packing:
            random.Random(self.seed).shuffle(self.train_examples)
            self.train_examples = pack_examples(self.train_examples, self.max_length)
            self.val_examples = pack_examples(self.val_examples, self.max_length)
        if rank_zero_only.rank == 0:  # every rank prepares the same data; one summary is enough
            print(self.summary())

    def summary(self) -> str:
        rows = "packed rows" if self.packing else "examples"
        scored = sum(sum(label != IGNORE_INDEX for label in e["labels"]) for e in self.train_examples)
        decided = " (decided from the columns)" if self.format == "auto" else ""
        return (f"data: format {self.chosen_format}{decided}; {len(self.train_examples)} training and "
                f"{len(self.val_examples)} validation {rows}, {scored:,} tokens to train on; {self.truncated} rows "
                f"truncated to {self.max_length} tokens. {self.skipped.report('data')}")

    def _loader(self, examples: list[dict], shuffle: bool) -> StatefulDataLoader:
        return StatefulDataLoader(examples, batch_size=self.batch_size, shuffle=shuffle,
                                  collate_fn=CausalLMCollator(self.tokenizer.pad_token_id),
                                  num_workers=self.num_workers)

    def train_dataloader(self) -> StatefulDataLoader:
        return self._loader(self.train_examples, shuffle=True)

    def val_dataloader(self) -> Union[StatefulDataLoader, list]:
        return self._loader(self.val_examples, shuffle=False) if self.val_examples else []
