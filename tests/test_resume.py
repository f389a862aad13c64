"""Crash safety: a run killed with SIGKILL and resumed ends exactly where an uninterrupted run ends.

The training runs in subprocesses (this file is also the training script) so that the kill is
real: no exception handler, no ``finally``, no teardown runs. The run uses dropout (per-batch seeds),
a shuffling `StatefulDataLoader` (data position), gradient accumulation, a warm-up + cosine
schedule (scheduler state), AdamW (optimizer state) and crosses an epoch boundary; the kill lands
two steps after an end-of-epoch checkpoint, a case that is inexact with a plain ``DataLoader``.
"""

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from paca_lightning import PaCAConfig, apply_paca, paca_layers
from tests.helpers import make_tiny_llama

MAX_STEPS = 10          # 6 optimizer steps per epoch: the run crosses into epoch 2
CHECKPOINT_EVERY = 3    # checkpoints at steps 3, 6 (the end of epoch 1), 9
KILL_AT_STEP = 8        # killed at the start of step 8: the resume replays steps 7-8 from step 6
TERM_AT_STEP = 7        # SIGTERM after step 7, a step that no periodic checkpoint saves


def train(root: Path, kill_at: int, resume: bool, term_at: int = 0) -> None:
    torch.set_num_threads(1)  # the same kernels, hence the same bits, in every process
    from lightning.pytorch import Callback, Trainer, seed_everything
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.utilities.exceptions import SIGTERMException
    from torchdata.stateful_dataloader import StatefulDataLoader

    from paca_lightning import PaCAConfig, PaCAFineTuneModule
    from tests.helpers import make_tiny_llama
    from tests.lightning_helpers import token_examples

    class KillAtStep(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if kill_at and trainer.global_step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if term_at and trainer.global_step == term_at and (batch_idx + 1) % 2 == 0:
                os.kill(os.getpid(), signal.SIGTERM)  # a scheduler pre-empting the job

    seed_everything(0)
    config = PaCAConfig(rank=4, alpha=8)
    module = PaCAFineTuneModule(make_tiny_llama(attention_dropout=0.2), config, learning_rate=1e-2,
                                warmup_steps=2)
    # No private generator=: the sampler then seeds itself from the global RNG (seed_everything)
    # and keeps its generator in the loader state, which continues correctly across epochs.
    data = StatefulDataLoader(token_examples(24), batch_size=2, shuffle=True)
    checkpoint = ModelCheckpoint(dirpath=root / "checkpoints", every_n_train_steps=CHECKPOINT_EVERY,
                                 save_last=True, save_top_k=-1)
    trainer = Trainer(accelerator="cpu", devices=1, default_root_dir=str(root), max_steps=MAX_STEPS,
                      accumulate_grad_batches=2, logger=False, enable_progress_bar=False,
                      enable_model_summary=False,
                      callbacks=[checkpoint] + ([KillAtStep()] if kill_at or term_at else []))
    try:
        trainer.fit(module, data, ckpt_path=root / "checkpoints" / "last.ckpt" if resume else None)
    except SIGTERMException:
        sys.exit(143)  # as the recipes do


def _start(root: Path, *arguments: str) -> subprocess.Popen:
    repository = Path(__file__).resolve().parents[1]
    environment = {**os.environ, "PYTHONPATH": str(repository)}
    return subprocess.Popen([sys.executable, __file__, str(root), *arguments], cwd=repository, env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(process: subprocess.Popen) -> tuple[int, str]:
    output, _ = process.communicate(timeout=300)
    return process.returncode, output


def _adapter(root: Path) -> dict[str, torch.Tensor]:
    return load_file(root / "paca_adapter" / "adapter_model.safetensors")


@pytest.mark.slow
def test_a_run_killed_with_sigkill_and_resumed_ends_bit_identical_to_an_uninterrupted_run(tmp_path):
    reference_root, crashed_root = tmp_path / "reference", tmp_path / "crashed"
    reference, crashed = _start(reference_root), _start(crashed_root, "--kill-at", str(KILL_AT_STEP))
    reference_code, reference_output = _finish(reference)
    crashed_code, crashed_output = _finish(crashed)
    assert reference_code == 0, reference_output[-3000:]
    assert crashed_code == -signal.SIGKILL, crashed_output[-3000:]
    saved = sorted(path.name for path in (crashed_root / "checkpoints").glob("*.ckpt"))
    assert saved == ["epoch=0-step=3.ckpt", "epoch=0-step=6.ckpt", "last.ckpt"]
    assert not (crashed_root / "paca_adapter").exists()

    resumed_code, resumed_output = _finish(_start(crashed_root, "--resume"))
    assert resumed_code == 0, resumed_output[-3000:]
    expected, actual = _adapter(reference_root), _adapter(crashed_root)
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    # Same epoch numbering as the uninterrupted run (Lightning alone would name it epoch=2-step=9)
    reference_names = {path.name for path in (reference_root / "checkpoints").glob("*.ckpt")}
    assert "epoch=1-step=9.ckpt" in reference_names
    assert reference_names <= {path.name for path in (crashed_root / "checkpoints").glob("*.ckpt")}
    last = torch.load(crashed_root / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 9  # the resumed run went on past the kill and saved again
    untrained = apply_paca(make_tiny_llama(attention_dropout=0.2), PaCAConfig(rank=4, alpha=8))
    assert not all(torch.equal(layer.paca_weight, expected[f"{name}.paca_weight"])
                   for name, layer in paca_layers(untrained))


@pytest.mark.slow
def test_a_run_stopped_by_sigterm_saves_where_it_stopped_and_resumes_bit_identical(tmp_path):
    reference_root, stopped_root = tmp_path / "reference", tmp_path / "stopped"
    reference, stopped = _start(reference_root), _start(stopped_root, "--term-at", str(TERM_AT_STEP))
    reference_code, reference_output = _finish(reference)
    stopped_code, stopped_output = _finish(stopped)
    assert reference_code == 0, reference_output[-3000:]
    assert stopped_code == 143, stopped_output[-3000:]
    last_path = stopped_root / "checkpoints" / "last.ckpt"
    assert f"Stopped by SIGTERM: saved {last_path} at global step {TERM_AT_STEP}" in stopped_output
    assert torch.load(last_path, weights_only=True)["global_step"] == TERM_AT_STEP
    assert not (stopped_root / "paca_adapter").exists()

    resumed_code, resumed_output = _finish(_start(stopped_root, "--resume"))
    assert resumed_code == 0, resumed_output[-3000:]
    expected, actual = _adapter(reference_root), _adapter(stopped_root)
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="training run of the SIGKILL resume test")
    parser.add_argument("root", type=Path)
    parser.add_argument("--kill-at", type=int, default=0)
    parser.add_argument("--term-at", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    arguments = parser.parse_args()
    train(arguments.root, arguments.kill_at, arguments.resume, arguments.term_at)
