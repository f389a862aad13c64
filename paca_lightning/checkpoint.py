"""Checkpoint files that a crash cannot corrupt.

Lightning's default `TorchCheckpointIO` writes through an fsspec transaction, which moves a
finished temporary file into place but never ``fsync``s it: after a power loss or a kernel
panic the renamed file can be empty. `AtomicCheckpointIO` writes the temporary file in the
target's directory, flushes it to disk, renames it over the target and flushes the directory,
so ``last.ckpt`` is at every moment either the previous complete checkpoint or the new one.
A temporary file left by a process killed mid-save is removed by the next save of that file.
"""

from __future__ import annotations

import glob
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` whose saves are atomic and durable (temp file, fsync, rename).

    `PaCACallback` installs it in place of Lightning's default checkpoint IO; pass it yourself
    with ``Trainer(plugins=[AtomicCheckpointIO()])`` when you do not use the callback.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint does not accept storage_options "
                            f"(got {storage_options!r}); it writes local files only")
        atomic_torch_save(checkpoint, path)


def atomic_torch_save(obj: Any, path) -> None:
    """``torch.save(obj, path)`` such that ``path`` is never left partially written."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    # A process killed mid-save leaves its temporary file behind; the next good save removes it.
    for leftover in target.parent.glob(f".{glob.escape(target.name)}.*.partial"):
        leftover.unlink(missing_ok=True)
