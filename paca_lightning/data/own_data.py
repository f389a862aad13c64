"""Fine-tune on your own rows: the data module of ``recipes/finetune.py``.

Rows come from a .jsonl/.json/.parquet/.csv file, a directory of ``train*``/``validation*``
files, or a hub dataset, read with ``datasets`` (memory-mapped Arrow) and turned into training
examples with ``Dataset.map``, so a large file never sits in Python lists. JSON files are checked
line by line first (:func:`paca_lightning.data.sources.check_json_rows`). The formats and what
each scores are in :mod:`paca_lightning.data.formats`.

Rows are tokenized and checked before any split, so a problem is reported with the row number of
the file. A row that does not fit its format stops preparation unless ``skip_invalid_rows`` is
set; skipped and truncated rows are counted in the summary printed (on rank zero) before training.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, Optional, Union

import lightning as L
from torchdata.stateful_dataloader import StatefulDataLoader

from . import TINY_LLAMA_DIR
from .collation import CausalLMCollator, pack_examples
from .formats import FORMATS, RowEncoder, resolve_format
from .sources import check_json_rows
from .tokenizer import load_tokenizer

SUFFIX_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


# ----------------------------------------------------------------------------- reading


def split_files(directory: Path, split: str) -> list[Path]:
    """Data files under ``directory`` whose name starts with ``split`` (``train.jsonl``,
    ``validation-00000.parquet``), in name order."""
    return sorted(p for p in directory.rglob("*")
                  if p.is_file() and p.suffix.lower() in SUFFIX_BUILDERS and p.name.startswith(split))


def load_files(files: list[Path]):
    """One ``datasets.Dataset`` of the rows of ``files`` (all of one kind), JSON checked line by line."""
    import datasets

    builders = {SUFFIX_BUILDERS.get(f.suffix.lower()) for f in files}
    if None in builders or len(builders) != 1:
        raise ValueError(f"data files must all be .json/.jsonl, all .parquet or all .csv, got "
                         f"{[str(f) for f in files]}")
    for file in files:
        if file.stat().st_size == 0:
            raise ValueError(f"{file} is empty: it needs rows (see docs/your-own-data.md for each format)")
        check_json_rows(file)
    bars_were_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        dataset = datasets.load_dataset(builders.pop(), data_files=[str(f) for f in files], split="train")
    except (datasets.exceptions.DatasetGenerationError, StopIteration, ValueError) as error:
        cause = error.__cause__ or error
        if "corresponds to no data" in str(cause):  # a CSV with only its header row
            raise ValueError(f"{[str(f) for f in files][:3]} holds no rows") from None
        raise ValueError(f"cannot read {[str(f) for f in files][:3]}: {type(cause).__name__}: {cause}. "
                         "Every row needs the same columns with values of one kind (text, list, ...)") from None
    finally:
        if bars_were_enabled:
            datasets.enable_progress_bars()
    if len(dataset) == 0:
        raise ValueError(f"{[str(f) for f in files][:3]} holds no rows")
    return dataset


def load_source(path: str, split: str = "train", subset: Optional[str] = None) -> tuple[Any, Any, str]:
    """``(train rows, validation rows or None, description)`` from a file, a directory of
    ``train*``/``validation*`` files, or a hub dataset name (its ``validation`` split if any)."""
    import datasets

    local = Path(os.path.expanduser(path))
    if local.is_file():
        return load_files([local]), None, str(local)
    if local.is_dir():
        train = split_files(local, split)
        if not train:
            raise FileNotFoundError(f"{local} holds no {split}* file (.jsonl, .json, .parquet or .csv); name the "
                                    f"training file {split}.jsonl (and validation.jsonl), or pass the file itself")
        validation = split_files(local, "validation")
        return (load_files(train), load_files(validation) if validation else None,
                ", ".join(str(f) for f in train))
    if path.startswith((".", "/", "~")) or local.suffix.lower() in SUFFIX_BUILDERS:
        raise FileNotFoundError(f"{path!r} does not exist (looked in {os.getcwd()}); give a .jsonl, .json, .parquet "
                                "or .csv file, a directory of train*/validation* files, or a hub dataset name")
    try:
        splits = datasets.load_dataset(path, subset)
    except (ConnectionError, OSError, FileNotFoundError) as error:
        raise ConnectionError(f"{path!r} is no local file or directory (looked in {os.getcwd()}) and could not be "
                              f"loaded as a hub dataset: {error}\nOffline, give a local file instead") from None
    if split not in splits:
        raise ValueError(f"hub dataset {path!r} has no split {split!r}; it has {sorted(splits)} (--data.split)")
    validation = splits["validation"] if split != "validation" and "validation" in splits else None
    return splits[split], validation, f"{path} ({split})"


SHOW_PROGRESS_FROM_ROWS = 10_000  # below this, datasets' bars for each step are noise, not progress


@contextmanager
def _progress_bars(show: bool) -> Iterator[None]:
    import datasets

    were_enabled = datasets.is_progress_bar_enabled()
    if not show:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if were_enabled:
            datasets.enable_progress_bars()


def _pack_batch(batch: dict, max_length: int) -> dict:
    rows = pack_examples([{"input_ids": ids, "labels": labels}
                          for ids, labels in zip(batch["input_ids"], batch["labels"])], max_length)
    return {key: [row[key] for row in rows] for key in ("input_ids", "labels", "position_ids")}


# ----------------------------------------------------------------------------- the data module


class OwnDataModule(L.LightningDataModule):
    """Fine-tune on your own rows: see the module docstring for formats and columns.

    Args:
        path: a .jsonl, .json, .parquet or .csv file; a directory holding ``train*`` and
            optionally ``validation*`` files; or a hub dataset name.
        format: ``auto``, ``messages``, ``instruction``, ``prompt_completion`` or ``text``.
        columns: ``{field: your column}`` for columns named otherwise, e.g.
            ``{messages: conversations}`` or ``{instruction: question, output: answer}``.
        subset: the hub dataset's configuration name.
        split: the split to train on (hub datasets, and ``<split>*`` files in a directory).
        validation_path: a file or directory of validation rows in the training rows' format.
        validation_fraction: share of the training rows held out (seeded) when there are no
            validation rows; 0 validates nothing.
        tokenizer: hub name or local directory; the recipe links it to ``--model.model``.
        chat_template: a Jinja chat template, or the path of a file holding one, to use instead
            of the tokenizer's own.
        train_on_prompt: score every token, not only the assistant's.
        skip_invalid_rows: skip rows that do not fit the format (counted and reported) instead
            of stopping at the first.
        max_length: tokens per example and per packed row; longer rows are cut and counted.
        packing: pack several examples into each row, each with its own ``position_ids``.
        batch_size: rows per batch per device.
        seed: the validation split and the order rows are packed in.
        num_proc: processes for tokenizing (``Dataset.map``); ``None`` tokenizes in this one.
        num_workers: DataLoader worker processes.
    """

    def __init__(self, path: str,
                 format: Literal["auto", "messages", "instruction", "prompt_completion", "text"] = "auto",
                 columns: Optional[dict[str, str]] = None,
                 subset: Optional[str] = None, split: str = "train", validation_path: Optional[str] = None,
                 validation_fraction: float = 0.1, tokenizer: str = str(TINY_LLAMA_DIR),
                 chat_template: Optional[str] = None, train_on_prompt: bool = False,
                 skip_invalid_rows: bool = False, max_length: int = 512, packing: bool = False,
                 batch_size: int = 8, seed: int = 0, num_proc: Optional[int] = None, num_workers: int = 0):
        super().__init__()
        if format not in FORMATS:
            raise ValueError(f"--data.format={format!r} is not one of {', '.join(FORMATS)}")
        if max_length < 2:
            raise ValueError(f"--data.max_length must be >= 2, got {max_length}")
        if batch_size < 1:
            raise ValueError(f"--data.batch_size must be >= 1, got {batch_size}")
        if not 0 <= validation_fraction < 1:
            raise ValueError(f"--data.validation_fraction must be in [0, 1), got {validation_fraction}")
        self.save_hyperparameters()
        self.path, self.format, self.columns = str(path), format, dict(columns or {})
        self.subset, self.split = subset, split
        self.validation_path, self.validation_fraction = validation_path, validation_fraction
        self.tokenizer_name, self.chat_template = tokenizer, chat_template
        self.train_on_prompt, self.skip_invalid_rows = train_on_prompt, skip_invalid_rows
        self.max_length, self.packing, self.batch_size = max_length, packing, batch_size
        self.seed, self.num_proc, self.num_workers = seed, num_proc, num_workers
        self.tokenizer = None
        self.train_dataset = self.val_dataset = None
        self.resolved_format = None
        self.skipped: Counter = Counter()
        self.first_skipped: dict[str, str] = {}
        self.truncated = self.trained_tokens = 0

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_dataset is not None:
            return
        self.tokenizer = load_tokenizer(self.tokenizer_name)
        if self.chat_template:
            template = Path(os.path.expanduser(self.chat_template))
            self.tokenizer.chat_template = template.read_text() if template.is_file() else self.chat_template
        train, validation, source = load_source(self.path, self.split, self.subset)
        validation_source = source
        if self.validation_path:
            validation, _, validation_source = load_source(self.validation_path, "validation")
        self.resolved_format, fields = resolve_format(train.column_names, self.format, self.columns, source)
        self._check_template(train, fields, source)
        encoder = RowEncoder(self.tokenizer, self.resolved_format, fields, self.max_length, self.train_on_prompt)
        with _progress_bars(len(train) >= SHOW_PROGRESS_FROM_ROWS):
            self._prepare(train, validation, encoder, source, validation_source)
        if len(self.train_dataset) == 0:
            raise ValueError(f"{source} gave no training example. {self.skipped_report()}")
        if self.trainer is None or self.trainer.is_global_zero:
            print(self.summary(source), flush=True)

    def _prepare(self, train, validation, encoder: RowEncoder, source: str, validation_source: str) -> None:
        # rows are numbered as in the file, so they are encoded (and checked) before any split
        train = self._encode(train, encoder, source)
        validation = self._encode(validation, encoder, validation_source) if validation is not None else None
        if validation is None and self.validation_fraction > 0 and len(train) > 1:
            parts = train.train_test_split(test_size=max(1, round(len(train) * self.validation_fraction)),
                                           seed=self.seed)
            train, validation = parts["train"], parts["test"]
        self.truncated = sum(train["truncated"]) + (sum(validation["truncated"]) if validation is not None else 0)
        self.trained_tokens = sum(train["scored"])
        self.train_dataset = self._finish(train)
        self.val_dataset = self._finish(validation) if validation is not None else None

    def _check_template(self, rows, fields: dict[str, str], source: str) -> None:
        chat = self.resolved_format in ("messages", "instruction") or (
            self.resolved_format == "prompt_completion" and isinstance(rows[0][fields["prompt"]], list))
        if chat and not self.tokenizer.chat_template:
            raise ValueError(f"{source}: format {self.resolved_format!r} is rendered with a chat template, and the "
                             f"tokenizer {self.tokenizer_name!r} has none. Give one with --data.chat_template=<Jinja "
                             "text or file>, or use a chat model's tokenizer")

    def _encode(self, rows, encoder: RowEncoder, source: str):
        """Token ids and labels of ``rows``; invalid rows stop preparation or are skipped and counted."""
        encoded = rows.map(encoder, with_indices=True, remove_columns=rows.column_names, num_proc=self.num_proc,
                           desc=f"tokenizing {len(rows)} rows")
        bad = encoded.filter(bool, input_columns="problem", num_proc=self.num_proc)
        if len(bad) == 0:
            return encoded
        invalid = bad.filter(lambda problem: problem != "no scored token left after truncation",
                             input_columns="problem")
        if len(invalid) and not self.skip_invalid_rows:
            first = invalid[0]
            more = f" ({len(invalid) - 1} more rows are invalid)" if len(invalid) > 1 else ""
            raise ValueError(f"{source}, row {first['row']} ({self.resolved_format} format): {first['problem']}: "
                             f"{first['detail']}{more}. Fix the rows, map your columns with --data.columns, or "
                             "skip such rows with --data.skip_invalid_rows=true")
        for row, problem, detail in zip(bad["row"], bad["problem"], bad["detail"]):
            self.skipped[problem] += 1
            self.first_skipped.setdefault(problem, f"{source} row {row}: {detail}")
        return encoded.filter(lambda problem: not problem, input_columns="problem", num_proc=self.num_proc)

    def _finish(self, encoded):
        """Drop the bookkeeping columns and, when packing, pack (in a seeded order)."""
        encoded = encoded.remove_columns(["row", "problem", "detail", "truncated", "scored"])
        if self.packing:
            encoded = encoded.shuffle(seed=self.seed).map(
                _pack_batch, batched=True, batch_size=1000, fn_kwargs={"max_length": self.max_length},
                remove_columns=encoded.column_names, num_proc=self.num_proc, desc="packing")
        return encoded

    def skipped_report(self) -> str:
        if not self.skipped:
            return "no rows skipped"
        return "skipped " + "; ".join(f"{count} {reason} (first: {self.first_skipped[reason]})"
                                      for reason, count in self.skipped.most_common())

    def summary(self, source: str) -> str:
        rows = "packed rows" if self.packing else "examples"
        validation = len(self.val_dataset) if self.val_dataset is not None else 0
        return (f"data: {source} read as format {self.resolved_format!r}"
                f"{' (auto)' if self.format == 'auto' else ''}: {len(self.train_dataset)} training and {validation} "
                f"validation {rows}, {self.trained_tokens:,} training tokens scored; {self.truncated} rows "
                f"truncated to {self.max_length} tokens; {self.skipped_report()}")

    def _loader(self, dataset, shuffle: bool) -> StatefulDataLoader:
        return StatefulDataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle,
                                  collate_fn=CausalLMCollator(self.tokenizer.pad_token_id),
                                  num_workers=self.num_workers)

    def train_dataloader(self) -> StatefulDataLoader:
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> Union[StatefulDataLoader, list]:
        return self._loader(self.val_dataset, shuffle=False) if self.val_dataset is not None else []
