import os
import signal
import subprocess
import sys

import pytest
import torch

from paca_lightning.training.checkpointing import AtomicCheckpointIO, atomic_torch_save


def test_a_save_that_fails_midway_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1, "weights": torch.arange(4.0)}, target)

    def crash_after_some_bytes(obj, path):
        with open(path, "wb") as handle:
            handle.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_after_some_bytes)
    with pytest.raises(OSError, match="disk full"):
        AtomicCheckpointIO().save_checkpoint({"step": 2}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=True)["step"] == 1
    assert sorted(path.name for path in tmp_path.iterdir()) == ["last.ckpt"]


@pytest.mark.slow
def test_a_process_killed_mid_save_leaves_the_previous_checkpoint_and_the_next_save_cleans_up(tmp_path):
    target = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1}, target)
    script = (
        "import os, signal, sys, torch\n"
        "from paca_lightning.training.checkpointing import atomic_torch_save\n"
        "def killed_while_writing(obj, path):\n"
        "    handle = open(path, 'wb'); handle.write(b'partial bytes'); handle.flush()\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "torch.save = killed_while_writing\n"
        "atomic_torch_save({'step': 2}, sys.argv[1])\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(target)], capture_output=True)
    assert result.returncode == -signal.SIGKILL
    assert torch.load(target, weights_only=True)["step"] == 1
    leftovers = [path for path in tmp_path.iterdir() if path.name.endswith(".partial")]
    assert len(leftovers) == 1
    atomic_torch_save({"step": 3}, target)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["last.ckpt"]
    assert torch.load(target, weights_only=True)["step"] == 3


def test_remote_storage_options_are_refused_by_name():
    with pytest.raises(TypeError, match="does not accept storage_options"):
        AtomicCheckpointIO().save_checkpoint({}, os.devnull, storage_options={"anon": True})
