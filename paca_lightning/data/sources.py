"""Where recipe data comes from: a hub dataset name, or local json/jsonl/parquet files.

Both the OASST1 and the MMLU data modules read rows through `load_split`, so a user points
either recipe at local files in the real schema the same way they would name the hub dataset.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Optional

LOCAL_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def _builder_for(files: list[Path]) -> str:
    builders = {LOCAL_SUFFIXES.get(f.suffix.lower()) for f in files}
    if None in builders or len(builders) != 1:
        raise ValueError(f"local data files must all be .json/.jsonl or all .parquet, got "
                         f"{[f.name for f in files]}")
    return builders.pop()


def local_split_files(source: Path, split: str) -> list[Path]:
    """Files of ``split`` under ``source``: ``source`` itself when it is a file, otherwise the
    files in the directory whose name starts with the split name (``train.jsonl``,
    ``validation-00000.parquet``, ``test/*.json``)."""
    if source.is_file():
        return [source]
    candidates = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in LOCAL_SUFFIXES)
    return [p for p in candidates
            if p.name.startswith(split) or any(part == split for part in p.relative_to(source).parts[:-1])]


def load_split(source: str, split: str, *, what: str, hub_config: Optional[str] = None,
               required: bool = True) -> Optional[list[dict]]:
    """Rows of ``split`` from ``source`` (a local file or directory, or a hub dataset name).

    Returns ``None`` for a missing split when ``required`` is false. Raises with the fix in the
    message when the source cannot be read: offline with a hub name, or a path that holds no
    json/jsonl/parquet files for the split.
    """
    import datasets

    path = Path(os.path.expanduser(source))
    if path.exists():
        files = local_split_files(path, split)
        if not files:
            if required:
                raise FileNotFoundError(
                    f"{what}: no .json/.jsonl/.parquet file for split {split!r} under {path}. Name files "
                    f"after the split (e.g. {split}.jsonl) or pass the file itself.")
            return None
        empty = [str(f) for f in files if f.stat().st_size == 0]
        if empty:
            raise ValueError(f"{what}: {empty[:3]} {'is' if len(empty) == 1 else 'are'} empty; split {split!r} "
                             "needs rows in the dataset's schema")
        for file in files:
            check_json_rows(file)
        bars_were_enabled = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()  # a bar per small local file is noise, not progress
        try:
            dataset = datasets.load_dataset(_builder_for(files), data_files=[str(f) for f in files], split="train")
        except (datasets.exceptions.DatasetGenerationError, StopIteration, ValueError) as error:
            cause = error.__cause__ or error
            raise ValueError(f"{what}: cannot read split {split!r} from {[str(f) for f in files][:3]}: "
                             f"{type(cause).__name__}: {cause}. Expected JSON (one object per line for "
                             ".jsonl, or a list of objects) or Parquet rows in the dataset's schema") from error
        finally:
            if bars_were_enabled:
                datasets.enable_progress_bars()
        return dataset.to_list()
    looks_like_path = source.startswith((".", "/", "~")) or Path(source).suffix.lower() in LOCAL_SUFFIXES
    if looks_like_path:
        raise FileNotFoundError(f"{what}: {source!r} does not exist. Give an existing .json/.jsonl/.parquet "
                                "file or a directory of them, or a hub dataset name.")
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    try:
        return datasets.load_dataset(source, hub_config, split=split).to_list()
    except ValueError as error:
        if "split" in str(error).lower() and not required:
            return None
        raise
    except (ConnectionError, OSError, FileNotFoundError) as error:
        hint = " (HF_HUB_OFFLINE is set)" if offline else ""
        raise ConnectionError(
            f"{what}: {source!r} is no local file or directory (looked in {os.getcwd()}) and could not be "
            f"loaded as a hub dataset{hint}: {error}\nOffline, point at local files "
            f"in the same schema instead, e.g. --data.data_path=/path/to/{split}.jsonl or a directory "
            "holding train/validation .jsonl or .parquet files.") from None


def check_json_rows(path: Path) -> None:
    """Raise, naming the file and the line (or list item), unless a .json/.jsonl file holds only
    JSON objects: one per line, or one JSON list of them. Other files are left alone.

    pyarrow's JSON reader, which ``datasets`` uses, ends the whole process on a line holding
    ``null`` and reports other bad lines without their number, so the rows are checked here,
    one line at a time, before Arrow sees them.
    """
    if path.suffix.lower() not in (".json", ".jsonl"):
        return
    with open(path, "rb") as stream:
        head = stream.read(4096).lstrip()
    if not head:
        raise ValueError(f"{path} is empty: it needs JSON objects, one per line (or a JSON list of them)")
    if head.startswith(b"["):
        try:
            items = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path}: not valid JSON ({error}); expected a list of objects, or one object "
                             "per line") from None
        if items == []:
            raise ValueError(f"{path} holds an empty list: it needs JSON objects, one per row")
        for number, item in enumerate(items if isinstance(items, list) else [items], start=1):
            if not isinstance(item, dict):
                raise ValueError(f"{path}: item {number} of the list is {_shown(item)}, not a JSON object "
                                 "({\"column\": value, ...})")
        return
    with open(path, encoding="utf-8", errors="replace") as stream:
        for number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {number}: not JSON ({error.msg}): {_shown(line.strip())}. Each line "
                                 "must hold one JSON object") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}, line {number}: {_shown(row)} is not a JSON object; each line must hold "
                                 "one object ({\"column\": value, ...})")


def _shown(value: object, limit: int = 80) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return repr(text if len(text) <= limit else text[:limit] + "...")


class SkipCounter(Counter):
    """Counts skipped rows by reason, for the report printed when data preparation ends."""

    def report(self, what: str) -> str:
        if not self:
            return f"{what}: no rows skipped"
        reasons = ", ".join(f"{count} {reason}" for reason, count in self.most_common())
        return f"{what}: skipped {sum(self.values())} rows ({reasons})"
