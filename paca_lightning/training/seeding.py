"""`BatchSeeding`: dropout that depends on a batch's place in the run, not on what ran before it."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer


class BatchSeeding(Callback):
    """Seeds torch's global RNG before every training batch from the run's base seed and the
    batch's position (rank, epoch, step, batch index), and checkpoints the base seed.

    Dropout masks then depend only on where a batch is in the run, not on what else drew random
    numbers before it (a validation pass, a data-loader iterator created on resume), which is
    what makes a resumed run bit-identical. The base seed is ``torch.initial_seed()`` when the
    callback is created (``seed_everything`` sets it).

    Args:
        seed_each_batch: ``False`` leaves the RNG alone (the callback then only records the seed).
    """

    def __init__(self, seed_each_batch: bool = True) -> None:
        self.seed_each_batch = seed_each_batch
        self._base_seed = torch.initial_seed()

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.seed_each_batch:
            torch.manual_seed(batch_seed(self._base_seed, trainer.global_rank, trainer.current_epoch,
                                         trainer.global_step, batch_idx))

    def state_dict(self) -> dict[str, Any]:
        return {"base_seed": self._base_seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._base_seed = int(state_dict["base_seed"])


def batch_seed(base_seed: int, rank: int, epoch: int, step: int, batch_idx: int) -> int:
    """A well-mixed 63-bit seed for one process's training batch at (epoch, step, batch_idx)."""
    digest = hashlib.sha256(f"{base_seed}:{rank}:{epoch}:{step}:{batch_idx}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)
