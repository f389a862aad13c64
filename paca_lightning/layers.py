"""PaCA: Partial Connection Adaptation (Woo et al., ICLR 2025, https://arxiv.org/abs/2503.01905).

PaCA fine-tunes a random subset ``S`` of ``r`` *input columns* of each pretrained weight, in
place. No adapter branch runs beside the layer, so a training step keeps one plain matmul per
layer, and backward needs only the ``r`` matching columns of the layer input::

    forward   x ──────────────► [ x @ W_eff^T + b ] ──► y           W_eff = W with W[:, S] = s·P
                  │ index_select(S)                                 (s = alpha / r)
                  ▼
    saved     x_S  (tokens x r, a compact copy; x itself is not kept)

    backward  dy ──► dx = dy @ W_eff                 (W is a parameter: saving it costs nothing)
              dy ──► dP = s · dy^T @ x_S             (out x r, the only trainable values)

Invariant: at every use of the layer (forward, backward, recompute under checkpointing, eval)
the weight holds ``W[:, S] == (s * P).to(W.dtype)``. `PaCALinear` keeps it by writing the ``r``
columns (out x r values, negligible beside the matmul) into ``W`` at the start of every forward:
no iteration counter, no knowledge of gradient accumulation, and nothing to detect, so eval
forwards between steps, ``load_state_dict`` and optimizers that update ``P`` behind autograd's
back (fused AdamW, 8-bit optimizers, ``.data`` writes) all see the trained weight. The write
does not bump ``W``'s autograd version: the values it writes are those every pending backward
of this layer was built with (a disabled layer computes on a copy and never writes ``W``). The
pretrained columns are kept (``paca_base_columns``) so the base model can be restored exactly.

transformers' GPT-2 ``Conv1D`` stores its weight transposed (in x out); there the columns of
the math above are rows of the stored tensor. ``paca_weight`` is (out x r) for both layouts.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .loss import autocast_dtype, autocast_off, has_no_data

try:  # transformers is a dependency, but the math here must not need it.
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = None

try:  # FSDP2 (fully_shard) shards parameters as DTensors; see paca_lightning.parallel.
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover (torch built without distributed support)
    DTensor = ()


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], transposed: bool):
    return as_function_output(F.linear(x, weight.t() if transposed else weight, bias))


def as_function_output(y: torch.Tensor) -> torch.Tensor:
    """``y`` as a tensor that is not a view, for returning from a custom autograd Function.

    With a bias and batch dimensions F.linear returns a view of its 2-D result, and autograd
    forbids in-place writes to a view a custom Function returns (Falcon adds its residual in
    place). The same storage comes back as a non-view, as torch.matmul does internally: no copy,
    and the numerics stay F.linear's (a separate bias add would round twice in bf16).
    """
    return torch.ops.aten._unsafe_view(y, y.shape) if y._is_view() else y


class PaCAFunction(torch.autograd.Function):
    """``y = x @ W^T + b`` whose backward yields ``dP = s * dL/dW[:, S]`` instead of ``dL/dW``.

    ``weight`` must already hold ``s * P`` in columns ``S`` (the layer guarantees it); ``P``
    itself is an input only so that autograd routes its gradient. Under autocast the matmuls
    run in the autocast dtype in both passes, like a dense autocast ``Linear``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, paca_weight, paca_indices, scaling, transposed):
        device_type = x.device.type
        if autocast_dtype(device_type) is not None:
            # Cast explicitly: backward runs outside autocast and must use the same dtype.
            compute_dtype = autocast_dtype(device_type)
            with autocast_off(device_type):
                y = _linear(x.to(compute_dtype), weight.to(compute_dtype),
                            None if bias is None else bias.to(compute_dtype), transposed)
        else:  # mismatched dtypes raise exactly as a dense layer would
            y = _linear(x, weight, bias, transposed)
            compute_dtype = y.dtype
        # index_select copies: a slicing view would keep all of x alive for backward.
        x_columns = x.index_select(-1, paca_indices).to(compute_dtype) if ctx.needs_input_grad[3] else None
        ctx.save_for_backward(x_columns, weight)
        ctx.scaling, ctx.transposed = scaling, transposed
        ctx.x_dtype, ctx.compute_dtype = x.dtype, compute_dtype
        ctx.paca_dtype = paca_weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad_output):
        x_columns, weight = ctx.saved_tensors
        grad_output = grad_output.to(ctx.compute_dtype)
        grad_x = grad_bias = grad_paca = None
        if ctx.needs_input_grad[0]:
            w = weight.to(ctx.compute_dtype)
            grad_x = (grad_output @ (w.t() if ctx.transposed else w)).to(ctx.x_dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0).to(ctx.bias_dtype)
        if ctx.needs_input_grad[3]:
            dy = grad_output.reshape(-1, grad_output.shape[-1])
            xs = x_columns.reshape(-1, x_columns.shape[-1])
            # scale in the columns' dtype: scaling a low-precision product first would round twice
            grad_paca = (dy.t() @ xs).to(ctx.paca_dtype).mul_(ctx.scaling)
        return grad_x, None, grad_bias, grad_paca, None, None, None


def validated_indices(paca_indices, in_features: int, device: torch.device) -> torch.Tensor:
    """``paca_indices`` as sorted int64 on ``device``; raises unless r distinct values in range.

    Real values are checked on the CPU, so a model built on the meta device still gets checked
    values; meta or fake indices (a memory plan) are checked for shape only: their values are
    unknown.
    """
    indices = torch.as_tensor(paca_indices, dtype=torch.int64)
    if indices.ndim != 1 or indices.numel() == 0:
        raise ValueError(f"paca_indices must be a non-empty 1-D tensor, got shape {tuple(indices.shape)}")
    if has_no_data(indices):  # a memory plan: the values are not known, only the count
        return indices.sort().values.to(device)
    indices = indices.cpu().sort().values
    if indices[0] < 0 or indices[-1] >= in_features or indices.unique().numel() != indices.numel():
        raise ValueError(f"paca_indices must be distinct values in [0, {in_features}), got "
                         f"{indices.tolist()[:8]}{'...' if indices.numel() > 8 else ''}")
    return indices.to(device)


def initial_columns(weight: torch.Tensor, paca_indices: torch.Tensor, transposed: bool, scaling: float,
                    paca_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A PaCA layer's starting state from its pretrained ``weight``: the pretrained columns
    (out x r, contiguous: a Conv1D's columns are a transposed view, and FSDP2 shards contiguous
    tensors only) and the trainable ``paca_weight = columns / s`` in ``paca_dtype``. The one
    formula for every path that builds it (a whole weight, or a checkpoint streamed into shards)."""
    columns = weight.index_select(0, paca_indices).t() if transposed else weight.index_select(1, paca_indices)
    columns = columns.clone(memory_format=torch.contiguous_format)
    return columns, columns.to(paca_dtype) / scaling


def is_conv1d(module: nn.Module) -> bool:
    return Conv1D is not None and isinstance(module, Conv1D)


# Subclasses of nn.Linear that override forward with the same map, x @ W^T + b.
_PLAIN_FORWARD_SUBCLASSES = {("transformers.models.falcon.modeling_falcon", "FalconLinear")}


def is_plain_linear(module: nn.Module) -> bool:
    """An ``nn.Linear``, or a subclass whose forward is still the plain ``x @ W^T + b``: inherited
    (torch's ``NonDynamicallyQuantizableLinear``) or a known equivalent (Falcon's ``FalconLinear``).

    A subclass with a forward of its own (scaling, quantization, low-rank branches) is not: PaCA
    replaces the forward, so adapting it would silently compute something else.
    """
    kind = type(module)
    return isinstance(module, nn.Linear) and (
        kind.forward is nn.Linear.forward or (kind.__module__, kind.__name__) in _PLAIN_FORWARD_SUBCLASSES)


def in_features_of(module: nn.Module) -> int:
    """Input features of a Linear (bitsandbytes' quantized Linears are ``nn.Linear`` subclasses and
    carry ``in_features``; their packed weight's shape says nothing) or a GPT-2 ``Conv1D``."""
    return module.nx if is_conv1d(module) else module.in_features


def out_features_of(module: nn.Module) -> int:
    return module.nf if is_conv1d(module) else module.out_features


class PaCALayer(nn.Module):
    """What every PaCA layer offers, whatever holds its frozen base: `PaCALinear` (a dense
    ``nn.Linear``/``Conv1D`` weight) or `paca_lightning.quantized.QuantizedPaCALinear` (a
    bitsandbytes 4-bit/8-bit weight). Adapter files, merging and `disable_paca` use only this.

    Attributes: ``paca_weight`` (out x r, trainable), ``paca_indices`` (r sorted int64 input
    features), ``paca_base_columns`` (the pretrained values of those columns, out x r),
    ``scaling`` (``alpha / r``), ``in_features``, ``out_features``, ``transposed`` (the weight is
    stored in x out, as in ``Conv1D``), ``paca_enabled``.
    """

    paca_weight: nn.Parameter
    paca_indices: torch.Tensor
    paca_base_columns: torch.Tensor
    scaling: float
    in_features: int
    out_features: int
    transposed: bool
    paca_enabled: bool

    @property
    def rank(self) -> int:
        return self.paca_indices.numel()

    def set_paca_enabled(self, enabled: bool) -> None:
        """Disabled, the layer computes with its pretrained columns and never writes its weight."""
        self.paca_enabled = enabled

    def merged_module(self) -> nn.Module:
        """A layer of the base's type holding the trained columns: no PaCA needed to run it."""
        raise NotImplementedError

    def base_module(self) -> nn.Module:
        """The base layer with its pretrained weight, bit for bit."""
        raise NotImplementedError


class PaCALinear(PaCALayer):
    """A pretrained ``nn.Linear`` or GPT-2 ``Conv1D`` whose columns ``paca_indices`` train in place.

    Args:
        base: the layer to adapt: ``nn.Linear`` (or a subclass keeping the plain forward, see
            `is_plain_linear`) or transformers ``Conv1D``. Its ``weight`` and
            ``bias`` Parameters are taken over (same objects, so state-dict keys stay
            ``<name>.weight``/``<name>.bias``).
        paca_indices: ``r`` distinct input features to train.
        scaling: ``s = alpha / r``; the layer uses ``s * paca_weight`` as the trained columns.
        paca_dtype: dtype of the trainable columns (see `PaCAConfig.paca_dtype`).

    ``auto_sync`` (default True): every forward first writes ``s * paca_weight`` into the weight's
    columns. Turn it off (`paca_lightning.set_paca_auto_sync`) where forward cannot reach the
    real storage (FSDP2 computes on transient unsharded copies) or should not mutate a
    parameter (inside a ``torch.compile`` graph); whoever updates ``paca_weight`` then calls
    `sync_columns_` after (an optimizer post-step hook, `PaCACallback`).
    """

    def __init__(self, base: nn.Module, paca_indices: torch.Tensor, scaling: float,
                 paca_dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        if is_conv1d(base):
            self.transposed = True
        elif is_plain_linear(base):
            self.transposed = False
        else:
            raise TypeError(f"PaCALinear adapts nn.Linear (or a subclass keeping its plain forward) or transformers "
                            f"Conv1D, got {type(base).__module__}.{type(base).__name__}")
        out_features, in_features = base.weight.shape[::-1] if self.transposed else base.weight.shape
        indices = validated_indices(paca_indices, in_features, base.weight.device)
        self.in_features, self.out_features = in_features, out_features
        self.scaling = float(scaling)
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        self.register_buffer("paca_indices", indices)
        base_columns, paca_weight = initial_columns(self.weight.detach(), indices, self.transposed, self.scaling,
                                                    paca_dtype or self.weight.dtype)
        self.register_buffer("paca_base_columns", base_columns)
        self.paca_weight = nn.Parameter(paca_weight)
        self.paca_enabled = True
        self.auto_sync = True
        # The original module, unregistered: `merged_module`/`base_module` hand it back, with the
        # parameters it gets back then. It holds none meanwhile: a sharding wrapper replaces this
        # layer's weight, and a reference left on the base would keep the whole old tensor alive.
        base.weight = None
        if base.bias is not None:
            base.bias = None
        self._base_module = (base,)
        self.sync_columns_()

    def _read_columns(self) -> torch.Tensor:
        """The weight's values at ``paca_indices`` as (out x r)."""
        if self.transposed:
            return self.weight.index_select(0, self.paca_indices).t()
        return self.weight.index_select(1, self.paca_indices)

    @torch.no_grad()
    def _write_columns(self, columns: torch.Tensor) -> None:
        """Write ``columns`` (out x r) into the weight: the whole tensor, or a DTensor's local shard."""
        if isinstance(self.weight, DTensor):
            _write_local_columns(self, columns)
            return
        if self.weight.dim() != 2:  # FSDP1 (use_orig_params) shows a flat 1-D slice between steps
            raise RuntimeError(f"PaCA layer ({self.extra_repr()}): the weight is a flattened shard of shape "
                               f"{tuple(self.weight.shape)}, so the trained columns cannot be written into it. "
                               "Under FSDP1 use paca_lightning.training.PaCAFSDPStrategy (or "
                               "paca_lightning.parallel.use_delta_form(model) before wrapping); under FSDP2 "
                               "paca_lightning.parallel.shard_paca_model")
        columns = columns.to(self.weight.dtype)
        # Through .data: the write leaves the weight's autograd version alone, so a graph that
        # saved the weight (this layer used twice in one step, a reference forward under
        # disable_paca between a forward and its backward) stays valid; see the module docstring.
        weight = self.weight.data
        if self.transposed:
            weight.index_copy_(0, self.paca_indices, columns.t())
        else:
            weight.index_copy_(1, self.paca_indices, columns)

    @torch.no_grad()
    def sync_columns_(self) -> None:
        """Write ``s * paca_weight`` into the weight's trained columns (out x r values)."""
        self._write_columns(self.paca_weight * self.scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.paca_enabled:
            return _linear(x, self._pretrained_weight(), self.bias, self.transposed)
        if self.auto_sync:
            self.sync_columns_()
        if not (torch.is_grad_enabled() and self.paca_weight.requires_grad):
            # the same product; only what backward would need is left out (no x_S copy)
            return _linear(x, self.weight, self.bias, self.transposed)
        return PaCAFunction.apply(x, self.weight, self.bias, self.paca_weight, self.paca_indices,
                                  self.scaling, self.transposed)

    def _pretrained_weight(self) -> torch.Tensor:
        """A transient copy of the weight with the pretrained columns: what a disabled layer uses.

        The weight itself is not written, so switching PaCA off and on never changes a tensor a
        pending backward saved (a reference forward under `disable_paca` between a forward and
        its backward, as in DPO), at the cost of one weight-sized temporary per disabled forward.
        """
        weight = self.weight.detach().clone()
        columns = self.paca_base_columns.to(weight.dtype)
        if self.transposed:
            return weight.index_copy_(0, self.paca_indices, columns.t())
        return weight.index_copy_(1, self.paca_indices, columns)

    def _release(self) -> nn.Module:
        base = self._base_module[0]
        # Parameters may have been replaced since wrapping (e.g. by a sharding wrapper).
        base.weight = self.weight
        base.bias = self.bias
        return base

    def merged_module(self) -> nn.Module:
        """The original layer type, its weight holding the trained columns: no PaCA needed."""
        self.paca_enabled = True
        self._write_columns(self.paca_weight * self.scaling)
        return self._release()

    def base_module(self) -> nn.Module:
        """The original layer type with its pretrained weight restored bit for bit."""
        self.paca_enabled = False
        self._write_columns(self.paca_base_columns)
        return self._release()

    def extra_repr(self) -> str:
        layout = "Conv1D" if self.transposed else "Linear"
        return (f"{layout}(in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}), rank={self.rank}, scaling={self.scaling:g}")


def _write_local_columns(layer: PaCALinear, columns: torch.Tensor) -> None:
    """Write ``columns`` (out x r) into the local shard of a DTensor weight, with no communication.

    ``columns`` is either a DTensor sharded like ``layer.paca_weight`` (the trained columns) or a
    full tensor (``paca_base_columns``, which FSDP2 keeps whole on every rank as a buffer). The
    write is exact only when the weight's output dimension is sharded exactly like
    ``paca_weight``'s rows; any other layout raises, naming the layer and its placements.
    """
    weight, paca = layer.weight, layer.paca_weight
    output_dim = 1 if layer.transposed else 0
    if not isinstance(paca, DTensor) or paca.device_mesh != weight.device_mesh:
        raise RuntimeError(f"PaCA layer ({layer.extra_repr()}): the weight is a DTensor but paca_weight "
                           "is not sharded on the same device mesh; shard the whole PaCALinear with one "
                           "fully_shard call (see paca_lightning.parallel.shard_paca_model)")
    expected = tuple(Shard(output_dim) if p == Shard(0) else p for p in paca.placements)
    if tuple(weight.placements) != expected or any(
            not isinstance(p, (Shard, Replicate)) or (isinstance(p, Shard) and p.dim != 0)
            for p in paca.placements):
        layout = "Conv1D (weight stored in x out)" if layer.transposed else "Linear"
        raise RuntimeError(
            f"PaCA cannot keep its trained columns exact without communication for this {layout} "
            f"layer ({layer.extra_repr()}): weight placements {tuple(weight.placements)}, paca_weight "
            f"placements {tuple(paca.placements)}. The weight's output dimension (dim {output_dim}) must "
            f"be sharded like paca_weight's rows (dim 0), i.e. weight placements {expected}. Use "
            "paca_lightning.parallel.shard_paca_model, or fully_shard(module, "
            "shard_placement_fn=paca_shard_placement(model))")
    local_columns = columns.to_local() if isinstance(columns, DTensor) else local_rows(columns, paca)
    local_weight = weight.to_local()
    local_columns = local_columns.to(device=local_weight.device, dtype=local_weight.dtype)
    if layer.transposed:
        local_weight.index_copy_(0, layer.paca_indices.to(local_weight.device), local_columns.t())
    else:
        local_weight.index_copy_(1, layer.paca_indices.to(local_weight.device), local_columns)


def local_rows(full: torch.Tensor, like: DTensor) -> torch.Tensor:
    """This rank's rows of ``full`` (a whole tensor shaped like ``like``), the rows ``like``'s
    local shard holds; e.g. the pretrained columns (a buffer, whole on every rank) that belong
    beside this rank's shard of ``paca_weight``."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset  # no public equivalent
    shape, offset = compute_local_shape_and_global_offset(like.shape, like.device_mesh, like.placements)
    return full[offset[0]:offset[0] + shape[0]]
