"""Checkpoint files that a crash cannot corrupt.

Lightning's default `TorchCheckpointIO` writes through an fsspec transaction, which moves a
finished temporary file into place but never ``fsync``s it: after a power loss or a kernel
panic the renamed file can be empty. `AtomicCheckpointIO` writes the temporary file in the
target's directory, flushes it to disk, renames it over the target and flushes the directory
(`paca_lightning.atomic.atomic_write`), so ``last.ckpt`` is at every moment either the previous
complete checkpoint or the new one.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from .atomic import atomic_write


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
    atomic_write(path, lambda temporary: torch.save(obj, temporary))
