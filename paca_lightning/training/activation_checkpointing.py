"""Activation checkpointing of decoder layers: all of them, or only as many as a memory budget needs.

With every layer checkpointed, each method keeps only the layers' inputs, so PaCA's smaller
activations buy nothing. ``activation_checkpointing="auto"`` instead checkpoints the fewest
decoder layers for one training step to fit a per-device budget:

1. `paca_lightning.planning.plan_step` runs one step of the same model, adapter and loss under
   ``FakeTensorMode`` at the run's batch shape (the plan `paca-lightning plan` prints): bytes
   saved for backward per decoder layer, each layer's input, head and loss.
2. This device's persistent memory is counted from the real model (`device_persistent_bytes`):
   its parameters (an FSDP rank's shards), gradients and AdamW's two states of the trained ones,
   and under FSDP2 two gathered decoder layers (the one computing and the one prefetched).
3. `checkpointed_layers_needed` gives the fewest layers whose recomputation makes the step fit;
   `checkpoint_only` leaves transformers' checkpointing on for just those, the first ones: backward
   recomputes them last, when the later layers' activations are already freed, so their
   recomputation adds least to the peak (checkpointing every k-th layer instead would recompute
   late layers while most activations are still held).

PaCA saves about what an all-frozen model saves per layer, LoRA a fourth more, so at one budget
PaCA checkpoints fewer layers and recomputes less. Not modelled: single ops' workspace, the
allocator's fragmentation and the accelerator runtime's own memory; on CUDA the default budget
leaves 10% of the card for them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Optional

import torch
from torch import nn

from ..layers import DTensor  # () where torch lacks distributed support
from ..planning import (
    MethodPlan,
    checkpointed_layers_needed,
    decoder_layer_list,
    model_state_bytes,
    plan_step,
    total_with_checkpointing,
)

DEFAULT_CUDA_BUDGET_FRACTION = 0.9


def enable_activation_checkpointing(model: nn.Module) -> None:
    """transformers' non-reentrant checkpointing on every decoder layer (reentrant checkpointing
    would need inputs that require grad)."""
    kwargs = {"use_reentrant": False}
    had_input_grads = getattr(model, "_require_grads_hook", None) is not None
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise TypeError(f"activation checkpointing needs a transformers model; {type(model).__name__} has "
                        "neither activation_checkpointing_enable nor gradient_checkpointing_enable")
    if not had_input_grads and getattr(model, "_require_grads_hook", None) is not None:
        # transformers also makes the embeddings' output require grad, which only reentrant
        # checkpointing needs; left on, the first layer would save and compute an input gradient
        # nobody uses (with every weight of it frozen but PaCA's columns or LoRA's matrices)
        model.disable_input_require_grads()


def checkpointable_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers, in depth order, each with its own checkpointing switch."""
    layers = list(decoder_layer_list(model))
    if not all(hasattr(layer, "gradient_checkpointing") for layer in layers):
        raise TypeError(f"the decoder layers of {type(model).__name__} cannot be checkpointed one by one (they "
                        "have no gradient_checkpointing switch: transformers >= 4.52 gives them one); use "
                        "activation_checkpointing=True or False")
    return layers


def checkpoint_only(model: nn.Module, count: int) -> list[int]:
    """Leave checkpointing on for the first ``count`` decoder layers of ``model`` (already enabled
    on all of them) and off for the rest; returns their indices. The first layers, because backward
    recomputes them last, when every later layer has freed its activations
    (`paca_lightning.planning.total_with_checkpointing`)."""
    layers = checkpointable_layers(model)
    if not 0 <= count <= len(layers):
        raise ValueError(f"cannot checkpoint {count} of {len(layers)} decoder layers")
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = index < count
    return list(range(count))


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def device_persistent_bytes(model: nn.Module, optimizer_states: int = 2) -> int:
    """What this process holds for the whole step: its parameters and buffers (FSDP: its
    shards), QPaCA's quantization states, a gradient and ``optimizer_states`` states (AdamW: 2)
    per trained element, and under
    FSDP2 two decoder layers gathered whole (the one computing and the one prefetched)."""
    trained = sum(_local(p).numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    gathered = 0
    if any(isinstance(p, DTensor) for p in model.parameters()):
        layers = checkpointable_layers(model)
        gathered = 2 * max(sum(p.numel() * p.element_size() for p in layer.parameters()) for layer in layers)
    return model_state_bytes(model) + trained * (1 + optimizer_states) + gathered


def _gb(size: int) -> str:
    """Bytes as GB (10^9, the unit of memory_budget_gb), with enough digits for small budgets."""
    return f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e9:.4f} GB"


@dataclasses.dataclass
class CheckpointingPlan:
    """What ``activation_checkpointing="auto"`` plans for one device: the fewest decoder layers to
    checkpoint (``count``; None when even all of them do not fit) and the figures behind it."""

    plan: MethodPlan
    batch_size: int
    sequence_length: int
    budget_bytes: int
    persistent_bytes: int
    count: Optional[int]

    @property
    def total_layers(self) -> int:
        return len(self.plan.saved_per_layer_bytes)

    def planned_bytes(self, count: int) -> int:
        return total_with_checkpointing(self.plan, count, self.persistent_bytes)

    def apply(self, model: nn.Module, count: int) -> list[int]:
        """Checkpoint ``count`` layers of ``model`` (the count every rank agreed on, at least this
        plan's); raises ValueError, with the figures, when no count fits."""
        if count > self.total_layers:
            needed = self.planned_bytes(self.total_layers)
            raise ValueError(f"activation_checkpointing='auto': one step of {self.batch_size} x "
                             f"{self.sequence_length} tokens needs {_gb(needed)} on a device even with all "
                             f"{self.total_layers} decoder layers checkpointed (weights, gradients and optimizer "
                             f"states {_gb(self.persistent_bytes)} here), over the budget of "
                             f"{_gb(self.budget_bytes)}. Lower the batch size or max_length, shard over more "
                             "devices (FSDP2), quantize the base (PaCAConfig.quantize), or raise memory_budget_gb")
        return checkpoint_only(model, count)

    def describe(self, layers: list[int]) -> str:
        if not layers:
            checkpointed = "no decoder layer"
        else:
            checkpointed = f"the first {len(layers)} of {self.total_layers} decoder layers"
        return (f"activation checkpointing 'auto': {checkpointed} for batches of {self.batch_size} x "
                f"{self.sequence_length} tokens; planned step {_gb(self.planned_bytes(len(layers)))} of the "
                f"{_gb(self.budget_bytes)} budget (weights, gradients and optimizer states "
                f"{_gb(self.persistent_bytes)}; saved activations planned by paca_lightning.planning)")


def plan_checkpointing(model: nn.Module, prepare: Callable[[nn.Module], nn.Module],
                       loss: Callable[[nn.Module, torch.Tensor], torch.Tensor], *, batch_size: int,
                       sequence_length: int, budget_bytes: int, dtype: torch.dtype,
                       autocast_dtype: Optional[torch.dtype] = None, build_on_meta: bool = False) -> CheckpointingPlan:
    """Plan one step of a fresh copy of ``model`` (built from its config, adapted by ``prepare``,
    loss ``loss``) on fake tensors, with this device's real persistent bytes, for ``budget_bytes``."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "vocab_size"):
        raise TypeError(f"activation_checkpointing='auto' plans from the model's transformers config; "
                        f"{type(model).__name__} has none. Use activation_checkpointing=True or False")
    plan = plan_step(config, prepare, batch_size=batch_size, sequence_length=sequence_length, dtype=dtype,
                     loss=loss, build_on_meta=build_on_meta, autocast_dtype=autocast_dtype)
    persistent = device_persistent_bytes(model)
    return CheckpointingPlan(plan, batch_size, sequence_length, budget_bytes, persistent,
                             checkpointed_layers_needed(plan, budget_bytes, persistent))


def default_budget_bytes(device: torch.device) -> int:
    """On CUDA, 90% of the card (the rest for the runtime, workspace and fragmentation, which the
    plan does not model); elsewhere there is no reliable figure, so a budget must be given."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory * DEFAULT_CUDA_BUDGET_FRACTION)
    raise ValueError(f"activation_checkpointing='auto' on a {device.type!r} device needs memory_budget_gb= "
                     "(the memory one training step may use on each device, in GB of 10^9 bytes); only CUDA "
                     "cards report a size to default to")
