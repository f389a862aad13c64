"""FSDP2 (``fully_shard``) for PaCA models, in plain torch: `shard_paca_model`.

PaCA trains columns that live *inside* a frozen weight, so sharding has to keep the invariant
``W[:, S] == (s * P).to(W.dtype)`` on every rank. ``fully_shard`` turns ``W`` and ``P`` into
DTensors. A Linear's ``W`` (out x in) and its ``P`` (out x r) are both sharded on dim 0, the
output rows, and dim 0 has the same length in both, so rank ``k`` holds the same rows of each::

    rank 0:  W[0:o/2, :]   P[0:o/2, :]      W_local[:, S] = s * P_local   (no communication)
    rank 1:  W[o/2:, :]    P[o/2:, :]

Forward runs on transient unsharded copies (a write there is lost on reshard), so forward-time
syncing is switched off and the columns are written into the *local shards* right after each
optimizer step (`attach_column_sync`; the write itself is `PaCALinear`'s). GPT-2 ``Conv1D``
stores ``W`` transposed (in x out); its dim 0 is the input, which would not line up with ``P``'s
rows, so the policy shards those weights on dim 1 (``shard_placement_fn``) and the rows line up
again. Gradients and optimizer state exist only for ``P`` (FSDP2 reduces and stores per
parameter), so their memory per rank is ``trainable / world_size``, whatever the unit's frozen size.

QPaCA: a quantized layer's weight is a plain Parameter of packed bytes with the quantization
state kept on the layer (`paca_lightning.quantized`), so ``fully_shard`` shards the bytes like
any parameter (FSDP2 gathers mixed dtypes as bytes; mixed precision leaves integer tensors
alone), and the layer dequantizes the copy FSDP2 gathers for its forward and backward. The
base is never written, so there is nothing to keep in sync.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import Shard

from ..experts import PaCAExpertWeights
from ..model import paca_layers, set_paca_auto_sync, sync_paca_columns
from ..quantized import is_quantized_linear


def paca_shard_placement(model: nn.Module) -> Callable[[nn.Parameter], Optional[Shard]]:
    """A ``fully_shard(shard_placement_fn=...)`` that shards each Conv1D PaCA weight on dim 1.

    Every other parameter keeps FSDP2's default (dim 0), which is already the output dimension of
    Linear weights and of every ``paca_weight``. It also switches forward-time column syncing off
    for ``model``: under FSDP2 a forward sees a gathered copy, so a write there is lost and backward
    would gather the stale shards again. The columns are written into the shards after each
    optimizer step instead (`attach_column_sync`).
    """
    set_paca_auto_sync(model, False)
    # fused expert weights shard their expert dimension (dim 0), like their paca_weight
    transposed_weights = {id(layer.weight) for _, layer in paca_layers(model)
                          if layer.transposed and not isinstance(layer, PaCAExpertWeights)}

    def placement(param: nn.Parameter) -> Optional[Shard]:
        return Shard(1) if id(param) in transposed_weights else None

    return placement


def _refuse_uneven_conv1d(model: nn.Module, mesh) -> None:
    """FSDP2 shards dim 1 only evenly; a Conv1D whose output size the shard count does not divide
    cannot be sharded like its ``paca_weight`` rows, so it is refused before anything is sharded."""
    shards = dist.get_world_size() if mesh is None else mesh.size(mesh.ndim - 1)
    for name, layer in paca_layers(model):
        if layer.transposed and not isinstance(layer, PaCAExpertWeights) and layer.out_features % shards:
            raise ValueError(f"PaCA Conv1D layer {name!r} has {layer.out_features} outputs, which {shards} FSDP2 "
                             "shards cannot split evenly; FSDP2 shards a Conv1D weight's output dim (dim 1) "
                             "evenly only. Use a shard count dividing it, DDP, or leave the layer out of "
                             "PaCAConfig.target_modules (a frozen Conv1D shards on dim 0 as usual)")


def _refuse_unadapted_quantized(model: nn.Module) -> None:
    """bitsandbytes layers that PaCA did not wrap keep their state on their parameter, which
    ``fully_shard`` replaces: they could neither compute nor be exported afterwards."""
    left = [name for name, module in model.named_modules() if is_quantized_linear(module)]
    if left:
        raise ValueError(f"FSDP2 cannot shard the bitsandbytes layers {left[:3]}{' ...' if len(left) > 3 else ''}: "
                         "PaCA does not adapt them, and bitsandbytes keeps their quantization state on the "
                         "parameter that fully_shard replaces. Add them to PaCAConfig.target_modules (QPaCA "
                         "layers shard), or quantize only the adapted layers (PaCAConfig.quantize on an "
                         "unquantized model)")


def decoder_layers(model: nn.Module, layer_classes: Optional[Iterable[Union[type, str]]] = None) -> list[nn.Module]:
    """The repeated blocks to shard one by one: ``layer_classes``, or the classes a transformers
    model names in ``_no_split_modules`` (its decoder layer, e.g. ``LlamaDecoderLayer``)."""
    if layer_classes is None:
        names = set(getattr(model, "_no_split_modules", None) or ())
        if not names:
            raise ValueError(f"{type(model).__name__} does not name its decoder layer class "
                             "(_no_split_modules is empty); pass layer_classes=[YourBlockClass]")
    else:
        names = {c if isinstance(c, str) else c.__name__ for c in layer_classes}
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"no module of {type(model).__name__} is of class {sorted(names)}; "
                         "pass layer_classes naming its repeated block")
    return blocks


def shard_paca_model(model: nn.Module, mesh=None, *, layer_classes=None, reshard_after_forward: bool = True,
                     mp_policy=None, cpu_offload: bool = False, activation_checkpointing: bool = False) -> nn.Module:
    """FSDP2 for a PaCA model: ``fully_shard`` each decoder layer, then the root.

    Call it from ``LightningModule.configure_model`` under ``ModelParallelStrategy`` (with
    ``self.device_mesh["data_parallel"]``) or in a plain ``torch.distributed`` script, then call
    `attach_column_sync` on the optimizer. Frozen and trainable parameters may share a unit:
    FSDP2 reduces and stores gradients per parameter, so only ``paca_weight`` gets them.

    Args:
        mesh: a 1-D device mesh (or a 2-D one for HSDP); ``None`` = all ranks.
        layer_classes: the blocks to shard individually; default: the model's decoder layer.
        reshard_after_forward: free gathered weights after forward (ZeRO-3) or keep them until
            backward (ZeRO-2: more memory, fewer all-gathers).
        mp_policy: a ``MixedPrecisionPolicy``, e.g. bf16 compute with fp32 gradient reduction.
        cpu_offload: keep sharded parameters, gradients and optimizer state in CPU memory.
        activation_checkpointing: recompute each decoder layer in backward; parameter names
            are unchanged (composable ``checkpoint``), so checkpoints and adapters stay portable.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if next(paca_layers(model), None) is None:
        raise ValueError(f"{type(model).__name__} has no PaCA layers; call apply_paca before sharding")
    _refuse_unadapted_quantized(model)
    _refuse_uneven_conv1d(model, mesh)
    blocks = decoder_layers(model, layer_classes)
    kwargs: dict[str, Any] = dict(mesh=mesh, reshard_after_forward=reshard_after_forward,
                                  shard_placement_fn=paca_shard_placement(model),
                                  mp_policy=mp_policy or MixedPrecisionPolicy(),
                                  offload_policy=CPUOffloadPolicy() if cpu_offload else OffloadPolicy())
    if activation_checkpointing:
        from torch.distributed._composable import checkpoint
        for block in blocks:
            checkpoint(block)
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    sync_paca_columns(model)
    return model


def attach_column_sync(optimizer: torch.optim.Optimizer, model: nn.Module):
    """Write the trained columns into the (local shards of the) weights after every step of
    ``optimizer``; returns the hook handle. Needed wherever forward-time syncing is off (FSDP2)."""
    return optimizer.register_step_post_hook(lambda *_: sync_paca_columns(model))
