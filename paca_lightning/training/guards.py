"""`NonFiniteLossGuard`: a NaN or infinite loss stops the run before the optimizer can use it."""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the run stops before the optimizer uses it."""


class NonFiniteLossGuard(Callback):
    """Raises `NonFiniteLossError` in ``on_before_backward`` when the loss is not finite.

    The optimizer never steps on that loss, so the newest checkpoint is still a good one; the
    message names it and the usual fixes.
    """

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        if torch.isfinite(loss.detach()).all():
            return
        last = getattr(trainer.checkpoint_callback, "last_model_path", "") or \
            getattr(trainer.checkpoint_callback, "best_model_path", "")
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        raise NonFiniteLossError(
            f"training loss is {loss.detach().float().item()} at global step {trainer.global_step} "
            f"(epoch {trainer.current_epoch}); the run stops before this loss is used, {kept}. "
            "Usual fixes: lower the learning rate, use bf16-mixed instead of 16-mixed, set "
            "gradient_clip_val, check the batch for empty or corrupt sequences")
