"""The recipes end to end, as a user runs them: `lightning run recipes/<name>.py`, offline."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from paca_lightning import load_adapter
from paca_lightning.data import TINY_LLAMA_DIR

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "recipes"
LAUNCHER = [sys.executable, "-m", "paca_lightning.launcher"]  # the `lightning` console script's entry point


def run_recipe(name, *args, tmp_path):
    environment = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    # A fixed seed: the recipes' seed_everything=True draws one (or inherits PL_GLOBAL_SEED from
    # whatever test seeded before), and a short run's first and last batches must not vary with it.
    environment.pop("PL_GLOBAL_SEED", None)
    command = LAUNCHER + ["run", str(RECIPES / name), f"--trainer.default_root_dir={tmp_path}",
                          "--trainer.enable_progress_bar=false", "--seed_everything=0", *args]
    result = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr  # Lightning's messages (the trainable report) go to stderr


def printed_path(output, label):
    match = re.search(rf"^{label}:\s+(\S.*)$", output, re.MULTILINE)
    assert match, f"no '{label}:' line in\n{output[-2000:]}"
    return Path(match.group(1))


@pytest.mark.slow
def test_oasst1_recipe_trains_reports_and_writes_a_merged_model_plain_transformers_loads(tmp_path):
    output = run_recipe("oasst1.py", "--trainer.max_steps=8", "--trainer.val_check_interval=4",
                        "--report.max_new_tokens=8", tmp_path=tmp_path)
    assert "PaCA: trainable params:" in output and "tokens/s" in output
    assert "sample after fine-tuning" in output
    first, last = map(float, re.search(r"training loss: ([\d.]+) .* -> ([\d.]+)", output).groups())
    assert last < first
    assert printed_path(output, "loss curve").stat().st_size > 0
    merged_dir, adapter_dir = printed_path(output, "merged model"), printed_path(output, "adapter")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    generated = merged.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] > ids.shape[1]
    # the adapter on a fresh base is the merged model
    adapted = load_adapter(AutoModelForCausalLM.from_pretrained(TINY_LLAMA_DIR), adapter_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(adapted(ids).logits, merged.eval()(ids).logits)


@pytest.mark.slow
def test_a_recipe_run_checkpoints_every_n_steps_and_resumes_from_the_last(tmp_path):
    first = run_recipe("oasst1.py", "--trainer.max_steps=4", "--checkpoint.every_n_train_steps=2",
                       "--report.sample_prompt=", tmp_path=tmp_path)
    last = printed_path(first, "checkpoint")
    assert last.name == "last.ckpt" and torch.load(last, weights_only=False)["global_step"] == 4
    resumed = run_recipe("oasst1.py", "--trainer.max_steps=6", "--checkpoint.every_n_train_steps=2",
                         "--report.sample_prompt=", "--ckpt_path=last", tmp_path=tmp_path)
    assert "Restoring states from the checkpoint" in resumed
    assert torch.load(printed_path(resumed, "checkpoint"), weights_only=False)["global_step"] == 6


@pytest.mark.slow
def test_a_recipe_run_without_checkpointing_writes_none(tmp_path):
    output = run_recipe("oasst1.py", "--trainer.max_steps=2", "--trainer.enable_checkpointing=false",
                        "--report.sample_prompt=", tmp_path=tmp_path)
    assert "checkpoint:   none written (--trainer.enable_checkpointing=false)" in output
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_mmlu_recipe_reports_accuracy_per_subject_before_and_after(tmp_path):
    output = run_recipe("mmlu.py", "--trainer.max_steps=2", tmp_path=tmp_path)
    for when in ("before", "after"):
        table = output.split(f"accuracy {when} fine-tuning")[1]
        for subject in ("astronomy", "elementary_mathematics", "high_school_geography", "overall"):
            assert re.search(rf"{subject}\s+\d+\.\d%", table)


@pytest.mark.parametrize("recipe, config", [
    ("oasst1", "llama3_8b_oasst1_paca.yaml"), ("oasst1", "llama31_70b_oasst1_qpaca.yaml"),
    ("mmlu", "llama2_7b_mmlu_paca.yaml")])
def test_paper_configs_parse_into_the_recipe_options(recipe, config, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(RECIPES))
    monkeypatch.setattr(sys, "argv", [f"{recipe}.py"])
    module = __import__(recipe)
    with pytest.raises(SystemExit) as exit_:
        module.main(["--config", str(RECIPES / "configs" / config), "--print_config"])
    assert exit_.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "meta-llama/" in printed and "rank:" in printed


@pytest.mark.slow
def test_bad_input_ends_the_run_with_its_message_not_a_traceback(tmp_path):
    environment = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    environment.pop("PACA_LIGHTNING_TRACEBACK", None)
    command = LAUNCHER + ["run", str(RECIPES / "oasst1.py"), f"--trainer.default_root_dir={tmp_path}",
                          "--model.paca.rank=0"]
    result = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2  # every kind of bad input ends with argparse's usage-error status
    assert "oasst1.py: error: PaCAConfig.rank must be a positive int (>= 1), got 0" in result.stderr
    assert "Traceback" not in result.stderr and "--help lists every option" in result.stderr
