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

try:  # transformers is a dependency, but the math here must not need it.
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = None

try:  # FSDP2 (fully_shard) shards parameters as DTensors; see paca_lightning.distributed.
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover (torch built without distributed support)
    DTensor = ()


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], transposed: bool):
    return F.linear(x, weight.t() if transposed else weight, bias)


class PaCAFunction(torch.autograd.Function):
    """``y = x @ W^T + b`` whose backward yields ``dP = s * dL/dW[:, S]`` instead of ``dL/dW``.

    ``weight`` must already hold ``s * P`` in columns ``S`` (the layer guarantees it); ``P``
    itself is an input only so that autograd routes its gradient. Under autocast the matmuls
    run in the autocast dtype in both passes, like a dense autocast ``Linear``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, paca_weight, paca_indices, scaling, transposed):
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            # Cast explicitly: backward runs outside autocast and must use the same dtype.
            compute_dtype = torch.get_autocast_dtype(device_type)
            with torch.autocast(device_type, enabled=False):
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
    """``paca_indices`` as sorted int64 on ``device``; raises unless r distinct values in range."""
    indices = torch.as_tensor(paca_indices, dtype=torch.int64, device=device)
    if indices.ndim != 1 or indices.numel() == 0:
        raise ValueError(f"paca_indices must be a non-empty 1-D tensor, got shape {tuple(indices.shape)}")
    indices = indices.sort().values
    if indices[0] < 0 or indices[-1] >= in_features or indices.unique().numel() != indices.numel():
        raise ValueError(f"paca_indices must be distinct values in [0, {in_features}), got "
                         f"{indices.tolist()[:8]}{'...' if indices.numel() > 8 else ''}")
    return indices


def is_conv1d(module: nn.Module) -> bool:
    return Conv1D is not None and isinstance(module, Conv1D)


class PaCALinear(nn.Module):
    """A pretrained ``nn.Linear`` or GPT-2 ``Conv1D`` whose columns ``paca_indices`` train in place.

    Args:
        base: the layer to adapt. Its ``weight`` and ``bias`` Parameters are taken over (same
            objects, so state-dict keys stay ``<name>.weight``/``<name>.bias``).
        paca_indices: ``r`` distinct input features to train.
        scaling: ``s = alpha / r``; the layer uses ``s * paca_weight`` as the trained columns.
        paca_dtype: dtype of the trainable columns (see `PaCAConfig.paca_dtype`).

    Public attributes: ``weight`` (frozen base, holding the trained columns), ``bias``,
    ``paca_weight`` (out x r, trainable), ``paca_indices`` (int64, sorted), ``scaling``,
    ``paca_base_columns`` (the pretrained values of the trained columns, out x r).
    """

    def __init__(self, base: nn.Module, paca_indices: torch.Tensor, scaling: float,
                 paca_dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        if is_conv1d(base):
            self.transposed = True
            in_features, out_features = base.weight.shape
        elif type(base) is nn.Linear:
            self.transposed = False
            out_features, in_features = base.weight.shape
        else:
            raise TypeError(f"PaCALinear adapts nn.Linear or transformers Conv1D, got {type(base).__name__}")
        indices = validated_indices(paca_indices, in_features, base.weight.device)
        self.in_features, self.out_features = in_features, out_features
        self.scaling = float(scaling)
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        self.register_buffer("paca_indices", indices)
        # contiguous: a Conv1D's columns are a transposed view, and FSDP2 shards contiguous tensors only
        self.register_buffer("paca_base_columns", self._read_columns().clone(memory_format=torch.contiguous_format))
        dtype = paca_dtype or self.weight.dtype
        self.paca_weight = nn.Parameter(self.paca_base_columns.to(dtype) / self.scaling)
        self.paca_enabled = True
        # With auto_sync, every forward first writes s * P into the weight's columns. Turn it off
        # where forward cannot reach the real storage (FSDP2 computes on transient unsharded
        # copies) or should not mutate a parameter (inside a torch.compile graph); then whoever
        # updates paca_weight (optimizer step, load) calls sync_columns_() after.
        self.auto_sync = True
        # With delta_form, forward never relies on the weight's columns: it computes
        # x @ W^T + x_S @ ((s*P).to(W.dtype) - W[:, S])^T, exact whatever W holds. For wrappers
        # whose shards cannot take a column write (FSDP1 flat parameters), at the cost of one
        # thin matmul; set by paca_lightning.distributed.use_delta_form.
        self.delta_form = False
        # The original module, unregistered: `merged_module`/`base_module` hand it back.
        self._base_module = (base,)
        self.sync_columns_()

    @property
    def rank(self) -> int:
        return self.paca_indices.numel()

    def _read_columns(self) -> torch.Tensor:
        """The weight's values at ``paca_indices`` as (out x r)."""
        if self.transposed:
            return self.weight.index_select(0, self.paca_indices).t()
        return self.weight.index_select(1, self.paca_indices)

    @torch.no_grad()
    def _write_columns(self, columns: torch.Tensor) -> None:
        if isinstance(self.weight, DTensor):
            from .distributed import write_local_columns
            write_local_columns(self, columns)
            return
        if self.weight.dim() != 2:  # FSDP1 (use_orig_params) shows a flat 1-D slice between steps
            raise RuntimeError(f"PaCA layer ({self.extra_repr()}): the weight is a flattened shard of shape "
                               f"{tuple(self.weight.shape)}, so the trained columns cannot be written into it. "
                               "Under FSDP1 use paca_lightning.distributed.PaCAFSDPStrategy (or "
                               "use_delta_form(model) before wrapping); under FSDP2 shard_paca_model")
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
        if self.auto_sync and not self.delta_form:
            self.sync_columns_()
        if self.delta_form:
            delta = (self.paca_weight * self.scaling).to(self.weight.dtype) - self._read_columns()
            return (_linear(x, self.weight, self.bias, self.transposed)
                    + F.linear(x.index_select(-1, self.paca_indices), delta))
        if torch.is_grad_enabled() and self.paca_weight.requires_grad:
            return PaCAFunction.apply(x, self.weight, self.bias, self.paca_weight, self.paca_indices,
                                      self.scaling, self.transposed)
        return _linear(x, self.weight, self.bias, self.transposed)

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

    @torch.no_grad()
    def set_paca_enabled(self, enabled: bool) -> None:
        """Disabled, the layer computes with the pretrained columns (`_pretrained_weight`)."""
        self.paca_enabled = enabled

    def _release(self) -> nn.Module:
        base = self._base_module[0]
        # Parameters may have been replaced since wrapping (e.g. by a sharding wrapper).
        base.weight = self.weight
        base.bias = self.bias
        return base

    def merged_module(self) -> nn.Module:
        """The original layer type, its weight holding the trained columns: no PaCA needed."""
        self.paca_enabled = True
        self.sync_columns_()
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
