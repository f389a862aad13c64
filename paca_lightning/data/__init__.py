"""Data for the recipes: OASST1 conversations, MMLU questions, tokenizers, batching."""

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
TINY_LLAMA_DIR = ASSETS_DIR / "tiny-llama"
OASST1_SAMPLE = ASSETS_DIR / "oasst1_sample.jsonl"
MMLU_SAMPLE_DIR = ASSETS_DIR / "mmlu_sample"
