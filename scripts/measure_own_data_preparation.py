"""Measure how fast OwnDataModule prepares rows: write a messages file of N generated
conversations, run the module's setup (read, check, tokenize, split, pack) and print rows/s.

    python scripts/measure_own_data_preparation.py --rows 100000 [--num-proc 2] [--packing]

Rows are built from the shipped example conversations with a row number in each turn, so no two
rows are equal; the file and the ``datasets`` cache live in a temporary directory, so each run
starts cold.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from paca_lightning.data import ASSETS_DIR  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--num-proc", type=int, default=None)
    parser.add_argument("--packing", action="store_true")
    args = parser.parse_args()
    examples = [json.loads(line) for line in (ASSETS_DIR / "examples" / "messages.jsonl").read_text().splitlines()]
    with tempfile.TemporaryDirectory() as scratch:
        os.environ["HF_DATASETS_CACHE"] = str(Path(scratch) / "cache")  # before datasets is imported: a cold cache
        from paca_lightning.data.own_data import OwnDataModule

        path = Path(scratch) / "generated.jsonl"
        with open(path, "w") as stream:
            for number in range(args.rows):
                turns = examples[number % len(examples)]["messages"]
                stream.write(json.dumps({"messages": [dict(turn, content=f"{turn['content']} ({number})")
                                                      for turn in turns]}) + "\n")
        module = OwnDataModule(str(path), packing=args.packing, num_proc=args.num_proc, max_length=256)
        start = time.perf_counter()
        module.setup()
        seconds = time.perf_counter() - start
    print(f"{args.rows} rows prepared in {seconds:.1f} s: {args.rows / seconds:,.0f} rows/s "
          f"(num_proc={args.num_proc}, packing={args.packing})")


if __name__ == "__main__":
    main()
