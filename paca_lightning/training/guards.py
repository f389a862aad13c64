"""`NonFiniteLossGuard`: NaN or infinite values stop the run before they reach the weights or a
checkpoint.

Three places can go non-finite, and each is checked before its value is used:

- the loss, before backward;
- the gradients, before the optimizer step (a huge learning rate can give a finite loss whose
  gradients overflow);
- the trained parameters, after the step and before any checkpoint of that step is written.

So the newest checkpoint always holds finite weights, and the error names it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

USUAL_FIXES = ("Usual fixes: lower the learning rate, use bf16-mixed instead of 16-mixed, set "
               "gradient_clip_val, check the batch for empty or corrupt sequences")


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss, gradient or trained parameter; the run stopped
    before it reached the weights or a checkpoint."""


class NonFiniteLossGuard(Callback):
    """Raises `NonFiniteLossError` when the loss (before backward), a gradient (before the
    optimizer step) or a trained parameter (after the step) is not finite.

    Under a ``GradScaler`` (``precision="16-mixed"``) infinite gradients are expected: the scaler
    skips that step and lowers its scale, so gradients are not checked there.
    """

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        if torch.isfinite(loss.detach()).all():
            return
        raise NonFiniteLossError(
            f"training loss is {loss.detach().float().item()} at global step {trainer.global_step} "
            f"(epoch {trainer.current_epoch}); the run stops before this loss is used, {_last_good(trainer)}. "
            + USUAL_FIXES)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            return
        gradients = ((name, param.grad) for name, param in pl_module.named_parameters() if param.grad is not None)
        bad = _first_non_finite(trainer, gradients)
        if bad is not None:
            raise NonFiniteLossError(
                f"the gradient of {bad} is not finite at global step {trainer.global_step} (the loss was finite); "
                f"the run stops before the optimizer steps, {_last_good(trainer)}. " + USUAL_FIXES)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *_) -> None:
        # Lightning runs checkpoint callbacks after every other callback, so this comes first.
        trained = ((name, param) for name, param in pl_module.named_parameters() if param.requires_grad)
        bad = _first_non_finite(trainer, trained)
        if bad is not None:
            raise NonFiniteLossError(
                f"the optimizer step left {bad} with non-finite values at global step {trainer.global_step}; "
                f"the run stops before checkpointing them, {_last_good(trainer)}. " + USUAL_FIXES)


def _first_non_finite(trainer: Trainer, named: Iterable[tuple[str, torch.Tensor]]) -> Optional[str]:
    """The name of the first tensor holding NaN/inf, on any rank ('a tensor on another rank' when
    only another rank's shard has one); every rank takes part, so all of them stop together."""
    found = None
    for name, tensor in named:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor  # an FSDP2 shard
        if local.numel() and not torch.isfinite(local.detach()).all():
            found = name
            break
    if trainer.world_size > 1 and trainer.strategy.reduce_boolean_decision(found is not None, all=False):
        return found or "a tensor on another rank"
    return found


def _last_good(trainer: Trainer) -> str:
    last = getattr(trainer.checkpoint_callback, "last_model_path", "") or \
        getattr(trainer.checkpoint_callback, "best_model_path", "")
    return f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
