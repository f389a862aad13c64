"""recipes/finetune.py end to end on each shipped example file, as a user runs it, offline."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from paca_lightning.data import ASSETS_DIR

REPO = Path(__file__).resolve().parent.parent
LAUNCHER = [sys.executable, "-m", "paca_lightning.launcher"]  # the `lightning` console script's entry point
EXAMPLES = sorted((ASSETS_DIR / "examples").iterdir())


def finetune(tmp_path, *args):
    environment = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    environment.pop("PL_GLOBAL_SEED", None)
    command = LAUNCHER + ["run", str(REPO / "recipes" / "finetune.py"), f"--trainer.default_root_dir={tmp_path}",
                          "--trainer.enable_progress_bar=false", "--seed_everything=0", *args]
    return subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=600)


def test_the_examples_cover_every_format():
    assert {path.stem for path in EXAMPLES} >= {"messages", "sharegpt", "alpaca", "prompt_completion", "text"}


@pytest.mark.slow
@pytest.mark.parametrize("example", EXAMPLES, ids=lambda path: path.name)
def test_a_run_on_each_example_writes_the_adapter_and_a_merged_model_transformers_loads(example, tmp_path):
    result = finetune(tmp_path, f"--data.path={example}", "--trainer.max_steps=4", "--trainer.val_check_interval=2",
                      "--report.max_new_tokens=4")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"data: {example} read as format" in result.stdout
    assert (tmp_path / "paca_adapter").is_dir()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    ids = tokenizer("Hello", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(merged(ids).logits).all()


@pytest.mark.slow
def test_bad_input_ends_the_run_with_the_row_not_a_traceback(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Yo"}]}\n')
    (tmp_path / "run").mkdir()
    result = finetune(tmp_path / "run", f"--data.path={data}")
    assert result.returncode == 2
    assert "row 1 (messages format): unknown role" in result.stderr and "Traceback" not in result.stderr
