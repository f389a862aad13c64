"""FSDP1 (``FullyShardedDataParallel``, ``use_orig_params=True``) for PaCA models, in plain torch.

A FlatParameter's local shard is a contiguous slice of the flattened units, not rows, so no
local write can keep ``W[:, S] == (s * P).to(W.dtype)``. `use_delta_form` switches every layer
to `DeltaFormPaCALinear`, whose forward never reads the trained columns from ``W``: it adds
``x_S @ ((s*P).to(W.dtype) - W[:, S])^T``, exact under any wrapper for one thin matmul.

FSDP1 allocates a FlatParameter's gradient for the whole flat tensor as soon as one of its
parameters trains, so the trainable parameters are kept out of the flat parameters
(`replicate_trainable`, FSDP1's ``ignored_states``): whole on every rank, gradients averaged by
an all-reduce hook. Gradient and optimizer memory per rank is then the trainable size.
QPaCA cannot be sharded by FSDP1 (`refuse_quantized`): a FlatParameter holds one dtype.
The Lightning strategy is `paca_lightning.training.PaCAFSDPStrategy`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..experts import PaCAExpertWeights
from ..layers import PaCALinear, _linear
from ..model import paca_layers
from ..quantized import QuantizedPaCALinear


class DeltaFormPaCALinear(PaCALinear):
    """A `PaCALinear` whose forward is exact whatever its weight's trained columns hold.

    ``y = x @ W^T + b + x_S @ ((s*P).to(W.dtype) - W[:, S])^T``: the weight is never written
    during training, which FSDP1's flattened shards could not take. Built by `use_delta_form`.
    """

    def sync_columns_(self) -> None:
        """Nothing to write: forward adds the trained columns' difference from the weight itself."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.paca_enabled:
            return super().forward(x)
        delta = (self.paca_weight * self.scaling).to(self.weight.dtype) - self._read_columns()
        return (_linear(x, self.weight, self.bias, self.transposed)
                + F.linear(x.index_select(-1, self.paca_indices), delta))


def use_delta_form(model: nn.Module) -> nn.Module:
    """Turn every PaCA layer of ``model`` into a `DeltaFormPaCALinear` before FSDP1 wraps it.

    The weights stay as they are (whatever columns they hold, the delta form is exact) and are
    never written again during training, so FlatParameter shards need no column writes.
    """
    layers = list(paca_layers(model))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no PaCA layers; call apply_paca before wrapping")
    refuse_quantized(model)
    for _, layer in layers:
        layer.__class__ = DeltaFormPaCALinear  # same state, another forward (as fully_shard swaps classes)
    return model


def refuse_quantized(model: nn.Module) -> None:
    """FSDP1 cannot shard QPaCA layers or fused expert weights; raise naming the first one and the alternatives."""
    for name, layer in paca_layers(model):
        if isinstance(layer, PaCAExpertWeights):
            raise NotImplementedError(
                f"FSDP1 cannot shard PaCA on the fused expert weight {name!r}: its delta form is written for "
                "2-D layers. Shard it with FSDP2 (strategy=PaCAModelParallelStrategy(), or shard_paca_model), "
                "which shards fused expert weights on the expert dimension, or use strategy='ddp'")
        if isinstance(layer, QuantizedPaCALinear):
            raise NotImplementedError(
                f"FSDP1 cannot shard the quantized PaCA layer {name!r} (QPaCA): it flattens each unit's "
                "parameters into one tensor of a single dtype, and a QPaCA weight is packed integer bytes "
                "beside floating-point norms. Shard QPaCA with FSDP2 (strategy=PaCAModelParallelStrategy(), "
                "or shard_paca_model), which gathers mixed dtypes, or use strategy='ddp'")


def replicate_trainable(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters of ``model`` (``paca_weight``, trained biases), to pass to FSDP1
    as ``ignored_states``; each gets a hook averaging its gradient over all ranks.

    FSDP1 allocates a FlatParameter's gradient for the whole flattened unit as soon as one of its
    parameters trains, frozen weights included (132,960 B per rank on the tiny test Llama against
    14,528 B of trainable columns). Left out of the flat parameters, the trainable ones stay whole
    on every rank and the flat parameters, all frozen, get no gradient: gradient and optimizer
    memory per rank is the trainable size. FSDP does not reduce ignored parameters, so after
    every backward a hook all-reduces each gradient and divides by the world size, the mean
    FSDP itself would have produced. Under gradient accumulation a gradient that is already the
    mean (equal on every rank) plus this micro-batch's is averaged again, which leaves the first
    part unchanged: the result is the mean of the accumulated gradients, as without the hook.
    Like FSDP, this needs every rank to start from the same values and run the same backward.
    Call it once per model, before wrapping; the hooks use the default process group.
    """
    trainable = [param for param in model.parameters() if param.requires_grad]
    if not trainable:
        raise ValueError(f"{type(model).__name__} has no trainable parameters to replicate")
    for param in trainable:
        param.register_post_accumulate_grad_hook(_average_gradient_over_ranks)
    return trainable


def _average_gradient_over_ranks(param: nn.Parameter) -> None:
    dist.all_reduce(param.grad)  # gloo has no ReduceOp.AVG: sum, then divide
    param.grad.div_(dist.get_world_size())
