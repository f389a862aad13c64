"""QPaCA: PaCA on a frozen 4-bit (NF4/FP4) or 8-bit (LLM.int8) bitsandbytes base.

The base weight stays quantized and is never written. The ``r`` trained columns live apart, in
``paca_weight`` (float32 master copy by default), and are substituted into a transient
dequantized copy of the weight at every use::

    forward   Wq ──dequantize──► W (compute dtype) ──W[:, S] = s·P──► y = x @ W^T + b ──► y
              x ──index_select(S)──► x_S (saved)        W is freed as soon as y exists

    backward  Wq ──dequantize──► W, W[:, S] = s·P  ──► dx = dy @ W      (recomputed, then freed)
              dy, x_S ──────────────────────────────► dP = s · dy^T @ x_S

So one layer holds at most one dequantized copy at any time, backward stores nothing of the size
of the weight, and the backward dequantization is skipped entirely when the layer input needs
no gradient. The authors' implementation dequantizes twice per forward (once to write the
columns, once inside bitsandbytes' matmul) and, on merge, re-quantizes the trained columns,
losing their precision; here the trained columns are the source of truth and are exported
exactly (`QuantizedPaCALinear.merged_module`).

Two ways in: a model loaded with transformers ``BitsAndBytesConfig`` (its ``Linear4bit`` /
``Linear8bitLt`` layers are wrapped as they are), or a plain model with
``PaCAConfig(quantize="nf4" | "fp4" | "int8")``, which quantizes each adapted layer right after
its columns are selected (so ``weight_norm``/``gradient`` selection sees full-precision weights).
"""

from __future__ import annotations

import contextlib
import copy
import io
import sys
from collections.abc import Iterator
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Conv1D, PaCALayer, as_function_output, is_conv1d, is_plain_linear, validated_indices

SUPPORTED_LAYERS = ("bitsandbytes Linear4bit (nf4/fp4, with or without double quantization) and "
                    "Linear8bitLt (has_fp16_weights=False)")
_INT8_CHUNK_ELEMENTS = 1 << 22  # int8 dequantization temporaries stay <= 16 MiB (fp32)


def import_bitsandbytes(purpose: str):
    """``bitsandbytes``, or an ImportError that says what needed it and how to get it."""
    try:
        import bitsandbytes
    except ImportError as error:
        raise ImportError(f"{purpose} needs the bitsandbytes package (pip install 'bitsandbytes>=0.45'), "
                          f"which cannot be imported here: {error}") from error
    return bitsandbytes


def quantized_kind(module: nn.Module) -> Optional[str]:
    """``"4bit"`` for a bitsandbytes ``Linear4bit``, ``"8bit"`` for ``Linear8bitLt``, else None.

    A model can only hold bitsandbytes layers once bitsandbytes is imported, so this never
    imports it (plain models work without the package).
    """
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return None
    if isinstance(module, bnb.nn.Linear4bit):
        return "4bit"
    if isinstance(module, bnb.nn.Linear8bitLt):
        return "8bit"
    return None


def is_quantized_linear(module: nn.Module) -> bool:
    return quantized_kind(module) is not None


def quantization_of(module: nn.Module) -> str:
    """The `PaCAConfig.quantize` name of a bitsandbytes layer's format: nf4, fp4 or int8."""
    if quantized_kind(module) == "8bit":
        return "int8"
    return _quant_state(module).quant_type


@contextlib.contextmanager
def backend_errors(kind: str, device: torch.device) -> Iterator[None]:
    """Turn a failing bitsandbytes kernel into an error naming the backend that is missing.

    bitsandbytes dispatches its kernels per device type; a build without a backend for the
    device (or without its native CPU library) fails deep inside with NotImplementedError or a
    missing-library error, which says nothing about what to install.
    """
    try:
        yield
    except (NotImplementedError, RuntimeError, AttributeError, OSError) as error:
        bnb = sys.modules.get("bitsandbytes")
        version = getattr(bnb, "__version__", "?")
        raise RuntimeError(
            f"bitsandbytes {version} cannot run {kind} quantization on device '{device}': "
            f"{type(error).__name__}: {error}. QPaCA needs a bitsandbytes build with a backend for "
            "this device (CUDA, ROCm, XPU, HPU, or CPU with its native library; see "
            "https://huggingface.co/docs/bitsandbytes/main/en/installation), or put the model on a "
            "device it supports") from error


def _quant_state(module: nn.Module):
    state = getattr(module.weight, "quant_state", None) or getattr(module, "quant_state", None)
    if state is None:
        raise ValueError(f"{type(module).__name__} has no quantization state; it is not quantized yet "
                         "(bitsandbytes quantizes a Linear4bit when it is moved to its device: call .to(device))")
    return state


def _int8_row_scales(module: nn.Module) -> torch.Tensor:
    # Linear8bitLt moves the row scales from the weight to its matmul state on its first forward.
    scales = getattr(module.weight, "SCB", None)
    if scales is None:
        scales = getattr(getattr(module, "state", None), "SCB", None)
    if scales is None:
        raise ValueError("Linear8bitLt has no row scales (SCB); it is not quantized yet: call .to(device)")
    return scales


def restore_standard_layout(module: nn.Module) -> None:
    """Undo bitsandbytes' CPU repacking of a 4-bit layer's bytes, in place.

    bitsandbytes repacks 4-bit weights for its fused CPU inference kernel on a forward without
    grad, rounding the block scales to bfloat16 as it does. Dequantizing reads the standard
    layout: restore it, with the scales as bitsandbytes left them.
    """
    state = _quant_state(module)
    if getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
        module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
            module.weight.data, state)


def dequantize_weight(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The (out x in) dequantized weight of a bitsandbytes layer in ``dtype``: one new tensor."""
    if quantized_kind(module) == "4bit":
        restore_standard_layout(module)
        return dequantize_4bit(module.weight.data, _quant_state(module), dtype)
    return dequantize_int8(module.weight.data, _int8_row_scales(module), dtype)


def dequantize_4bit(packed: torch.Tensor, state, dtype: torch.dtype) -> torch.Tensor:
    """Bitsandbytes' 4-bit dequantization of ``packed`` (any storage dtype), straight into ``dtype``."""
    bnb = import_bitsandbytes("dequantizing a quantized base layer")
    state = copy.copy(state)
    state.dtype = dtype
    return bnb.functional.dequantize_4bit(packed, state)


def dequantize_int8(quantized: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bitsandbytes' int8 row-wise dequantization (its float32 formula, bit-equal), cast to
    ``dtype`` in row chunks so that no second full-size float32 temporary exists."""
    bnb = import_bitsandbytes("dequantizing a quantized base layer")
    scales = scales.to(quantized.device)
    out = torch.empty(quantized.shape, dtype=dtype, device=quantized.device)
    rows = max(1, _INT8_CHUNK_ELEMENTS // max(1, quantized.shape[1]))
    for start in range(0, quantized.shape[0], rows):
        chunk = bnb.functional.int8_vectorwise_dequant(quantized[start:start + rows], scales[start:start + rows])
        out[start:start + rows] = chunk
    return out


def quantize_linear(linear: nn.Linear, quantize: str) -> nn.Module:
    """A bitsandbytes ``Linear4bit``/``Linear8bitLt`` holding ``linear``'s weight quantized.

    4-bit uses blocksize 64 with double quantization of the block scales (QLoRA's setting) and
    computes in the layer's original dtype. The bias is kept as it is (same Parameter).
    """
    bnb = import_bitsandbytes(f"PaCAConfig.quantize={quantize!r}")
    weight, device = linear.weight.detach(), linear.weight.device
    has_bias = linear.bias is not None
    if quantize == "int8":
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias,
                                    has_fp16_weights=False, device="meta")
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias,
                                  compute_dtype=weight.dtype, compress_statistics=True,
                                  quant_type=quantize, device="meta")
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True,
                                         quant_type=quantize, module=layer)
    with backend_errors(quantize, device):
        layer.weight = layer.weight._quantize(device)
    if has_bias:
        layer.bias = linear.bias
    return layer


def dense_dtype_of(model: nn.Module) -> torch.dtype:
    """The dtype of the model's floating-point parameters outside quantized layers (float32 if none).

    Merged quantized layers take this dtype so that the exported model computes in one dtype.
    """
    for param in model.parameters():
        if param.is_floating_point() and not hasattr(param, "quant_state"):
            return param.dtype
    return torch.float32


def quantized_paca_layer(module: nn.Module, paca_indices: torch.Tensor, scaling: float,
                         quantize: Optional[str], paca_dtype: torch.dtype, model: nn.Module) -> QuantizedPaCALinear:
    """The QPaCA layer `apply_paca` builds for a quantized target or under ``PaCAConfig.quantize``.

    A plain ``nn.Linear`` is quantized first (``quantize`` set); a bitsandbytes layer is wrapped
    as it is. `check_quantized_targets` has vetted every target before any layer is replaced.
    """
    if quantized_kind(module) is None:
        merge_dtype = module.weight.dtype
        module = quantize_linear(module, quantize)
    else:
        merge_dtype = dense_dtype_of(model)
    return QuantizedPaCALinear(module, paca_indices, scaling, paca_dtype, merge_dtype)


def check_quantized_targets(selection: str, quantize: Optional[str], targets: dict) -> None:
    """Reject, before `apply_paca` changes any layer, what QPaCA cannot do with these targets."""
    quantized = sorted(name for name, module in targets.items() if is_quantized_linear(module))
    if selection == "gradient" and quantized:
        # Gradient selection needs dL/dW of each target, which a quantized weight cannot hold.
        raise ValueError(f"selection='gradient' needs full-precision weights, but {quantized[:3]} "
                         "are already quantized. Load the model unquantized and set PaCAConfig.quantize "
                         "(selection runs before quantization), or use selection='random'/'weight_norm'")
    if quantize is None:
        return
    for name, module in targets.items():
        if is_quantized_linear(module):
            found = quantization_of(module)
            if found != quantize:
                raise ValueError(f"PaCAConfig.quantize={quantize!r}, but module {name!r} is already quantized "
                                 f"as {found}; set quantize={found!r} or None for this model")
        elif not is_plain_linear(module):
            layout = "GPT-2 Conv1D (weight stored in x out)" if is_conv1d(module) else type(module).__name__
            raise TypeError(f"PaCAConfig.quantize={quantize!r}: module {name!r} is a {layout}; quantize "
                            "applies to torch.nn.Linear layers. Load the model with transformers "
                            "BitsAndBytesConfig instead, or exclude this module")


class QuantizedPaCAFunction(torch.autograd.Function):
    """``y = x @ W^T + b`` on the dequantized base with ``W[:, S] = s * P``; see the module docstring.

    ``layer`` (the `QuantizedPaCALinear`) provides the dequantization. ``paca_weight`` is saved
    for backward (no copy; autograd's version check catches an update between the passes), so
    backward rebuilds exactly the weight forward used.
    """

    @staticmethod
    def forward(ctx, x, paca_weight, bias, layer):
        compute_dtype = layer.compute_dtype_for(x)
        weight = layer.effective_weight(paca_weight, compute_dtype)
        y = F.linear(x.to(compute_dtype), weight, None if bias is None else bias.to(compute_dtype))
        del weight
        x_columns = x.index_select(-1, layer.paca_indices).to(compute_dtype) if ctx.needs_input_grad[1] else None
        ctx.save_for_backward(x_columns, paca_weight)
        ctx.layer, ctx.compute_dtype, ctx.x_dtype = layer, compute_dtype, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        # Under autocast the output stays in the autocast dtype, as for a dense autocast Linear;
        # otherwise it comes back in the input's dtype, as bitsandbytes' Linear4bit returns it.
        return as_function_output(y if torch.is_autocast_enabled(x.device.type) else y.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_output):
        x_columns, paca_weight = ctx.saved_tensors
        layer = ctx.layer
        grad_output = grad_output.to(ctx.compute_dtype)
        grad_x = grad_paca = grad_bias = None
        if ctx.needs_input_grad[0]:
            weight = layer.effective_weight(paca_weight, ctx.compute_dtype)
            grad_x = (grad_output @ weight).to(ctx.x_dtype)
            del weight
        dy = grad_output.reshape(-1, grad_output.shape[-1])
        if ctx.needs_input_grad[1]:
            xs = x_columns.reshape(-1, x_columns.shape[-1])
            grad_paca = (dy.t() @ xs).to(paca_weight.dtype).mul_(layer.scaling)  # one rounding
        if ctx.needs_input_grad[2]:
            grad_bias = dy.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_paca, grad_bias, None


class QuantizedPaCALinear(PaCALayer):
    """A bitsandbytes ``Linear4bit``/``Linear8bitLt`` whose columns ``paca_indices`` train.

    A `PaCALayer` like `PaCALinear` (``weight`` is the frozen quantized Parameter,
    ``paca_base_columns`` the dequantized pretrained columns in float32), so adapter files,
    `merge_paca`, `unload_paca` and `disable_paca` treat both alike. Unlike `PaCALinear` its
    weight never holds trained values, so there is no column write to keep in sync.

    Args:
        base: the quantized layer. Its ``weight``/``bias`` Parameters are taken over (state-dict
            keys stay ``<name>.weight``/``<name>.bias`` plus bitsandbytes' quantization state).
        paca_indices: ``r`` distinct input features to train.
        scaling: ``s = alpha / r``.
        paca_dtype: dtype of ``paca_weight`` (default float32: a master copy, since the base
            keeps no trained values of its own).
        merge_dtype: dtype of the dense weight `merged_module` exports by default; the dtype of
            the rest of the model, so the merged model computes in one dtype.
    """

    def __init__(self, base: nn.Module, paca_indices: torch.Tensor, scaling: float,
                 paca_dtype: Optional[torch.dtype] = None, merge_dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        kind = quantized_kind(base)
        if kind is None:
            raise TypeError(f"QuantizedPaCALinear adapts {SUPPORTED_LAYERS}, got "
                            f"{type(base).__module__}.{type(base).__name__}")
        if kind == "8bit" and getattr(base.weight, "has_fp16_weights", False):
            raise TypeError("Linear8bitLt with has_fp16_weights=True trains its own 16-bit weight and is "
                            "not a frozen quantized base; PaCA adapts Linear8bitLt(has_fp16_weights=False) "
                            "as transformers' BitsAndBytesConfig(load_in_8bit=True) builds it")
        if kind == "4bit":
            restore_standard_layout(base)
        self.kind = kind
        self.transposed = False
        self.in_features, self.out_features = base.in_features, base.out_features
        self.scaling = float(scaling)
        # The packed bytes become a plain uint8/int8 Parameter and the quantization state an
        # attribute of this layer. Bitsandbytes' parameter classes carry the state on the tensor,
        # which a sharding engine loses (FSDP2 replaces every Parameter by a DTensor and, in
        # forward, by a gathered plain tensor); dequantizing whatever ``self.weight`` is at the
        # time, with the state kept here, is what lets QPaCA be sharded. Bytes, not a float
        # storage dtype (``bnb_4bit_quant_storage``): ``model.to(dtype)`` and mixed-precision
        # casts leave integer tensors alone.
        if kind == "4bit":
            self.quant_state = _quant_state(base)
            self.quant_storage = base.weight.quant_storage
            self.compute_dtype = base.compute_dtype
            packed = base.weight.data.view(torch.uint8).reshape(-1, 1)
        else:
            self.int8_row_scales = _int8_row_scales(base)
            packed = base.weight.data
        self.quant_type = "int8" if kind == "8bit" else self.quant_state.quant_type
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.bias = base.bias
        device = self.weight.device
        self.register_buffer("paca_indices", validated_indices(paca_indices, self.in_features, device))
        with backend_errors(self.quantization, device):
            base_columns = self.dequantized_weight(torch.float32).index_select(1, self.paca_indices)
        self.register_buffer("paca_base_columns", base_columns)
        # Only now that nothing can fail: while wrapped, the base holds no tensor of its own (a
        # sharded run frees the full bytes); `_release` gives it back a bitsandbytes parameter.
        base.weight = None
        if kind == "8bit":
            base.state.CB = base.state.SCB = None
        self.paca_weight = nn.Parameter(base_columns.to(paca_dtype or torch.float32) / self.scaling)
        self.merge_dtype = merge_dtype or (self.quant_state.dtype if kind == "4bit" else torch.float32)
        self.paca_enabled = True
        self._base_module = (base,)

    @classmethod
    def awaiting_weights(cls, linear: nn.Linear, paca_indices: torch.Tensor, scaling: float, quantize: str,
                         paca_dtype: torch.dtype) -> QuantizedPaCALinear:
        """The layer ``quantize_linear`` + the constructor would make from ``linear``, with the
        right shapes on the meta device and no values: sharded loading
        (`paca_lightning.parallel.loading`) fills the packed bytes, the quantization state
        (``_extra_state``), the pretrained columns and ``paca_weight`` from one rank's real layer.
        The constructor needs the quantized weight itself, so this builds the same attributes
        from the shapes alone."""
        if quantize not in ("nf4", "fp4", "int8"):
            raise ValueError(f"QuantizedPaCALinear.awaiting_weights: quantize={quantize!r} is not valid; "
                             "choose 'nf4', 'fp4' or 'int8'")
        bnb = import_bitsandbytes(f"PaCAConfig.quantize={quantize!r}")
        layer = cls.__new__(cls)
        PaCALayer.__init__(layer)
        layer.quant_type = quantize  # known before any state is: printing the meta model needs it
        dtype, has_bias = linear.weight.dtype, linear.bias is not None
        elements = linear.in_features * linear.out_features
        if quantize == "int8":
            base = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias,
                                       has_fp16_weights=False, device="meta")
            layer.kind = "8bit"
            layer.int8_row_scales = torch.empty(linear.out_features, dtype=torch.float32, device="meta")
            packed = torch.empty(linear.out_features, linear.in_features, dtype=torch.int8, device="meta")
        else:
            base = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias, compute_dtype=dtype,
                                     compress_statistics=True, quant_type=quantize, device="meta")
            layer.kind, layer.quant_state, layer.quant_storage, layer.compute_dtype = "4bit", None, torch.uint8, dtype
            packed = torch.empty((elements + 1) // 2, 1, dtype=torch.uint8, device="meta")  # two codes per byte
        base.weight = None
        layer.transposed = False
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.scaling = float(scaling)
        layer.weight = nn.Parameter(packed, requires_grad=False)
        layer.bias = linear.bias
        layer.register_buffer("paca_indices", validated_indices(paca_indices, linear.in_features, torch.device("meta")))
        rank = layer.paca_indices.numel()
        layer.register_buffer("paca_base_columns", torch.empty(linear.out_features, rank, device="meta"))
        layer.paca_weight = nn.Parameter(torch.empty(linear.out_features, rank, dtype=paca_dtype, device="meta"))
        layer.merge_dtype, layer.paca_enabled, layer._base_module = dtype, True, (base,)
        return layer

    @property
    def quantized_base(self) -> nn.Module:
        """The wrapped bitsandbytes layer, without its weight while wrapped (see `_release`)."""
        return self._base_module[0]

    @property
    def quantization(self) -> str:
        """The base's format as `PaCAConfig.quantize` names it: nf4, fp4 or int8."""
        return self.quant_type

    def compute_dtype_for(self, x: torch.Tensor) -> torch.dtype:
        """Autocast's dtype when active, else the 4-bit layer's ``compute_dtype``, else x's dtype."""
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        if self.kind == "4bit" and self.compute_dtype is not None:
            return self.compute_dtype
        return x.dtype

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The pretrained (out x in) weight in ``dtype``, without the trained columns.

        Reads ``self.weight`` as it is now: the whole tensor, or under FSDP2 the copy gathered for
        this forward or backward. The state follows the bytes to their device on first use.
        """
        self._move_state_to(self.weight.device)
        return self.dequantize_packed(self.weight.data, dtype)

    def _move_state_to(self, device: torch.device) -> None:
        """The quantization state is a plain attribute (`_apply` does not see it): it follows the
        bytes when they are used on another device."""
        if self.kind == "4bit":
            if self.quant_state.absmax.device != device:
                self.quant_state.to(device)
        elif self.int8_row_scales.device != device:
            self.int8_row_scales = self.int8_row_scales.to(device)

    def dequantize_packed(self, packed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Dequantize ``packed``, this layer's whole weight bytes (e.g. gathered from shards), on
        the device of the quantization state; the result is on that device too."""
        if self.kind == "4bit":
            return dequantize_4bit(packed.to(self.quant_state.absmax.device), self.quant_state, dtype)
        return dequantize_int8(packed.to(self.int8_row_scales.device), self.int8_row_scales, dtype)

    def effective_weight(self, paca_weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized base with ``(s * paca_weight).to(dtype)`` in columns ``paca_indices``."""
        weight = self.dequantized_weight(dtype)
        weight.index_copy_(1, self.paca_indices, (paca_weight.detach() * self.scaling).to(dtype))
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.paca_enabled:
            return self._linear_without_autograd_function(x, self.dequantized_weight)
        if not torch.is_grad_enabled():  # eval/generation: nothing to save for backward
            return self._linear_without_autograd_function(
                x, lambda dtype: self.effective_weight(self.paca_weight, dtype))
        return QuantizedPaCAFunction.apply(x, self.paca_weight, self.bias, self)

    def _linear_without_autograd_function(self, x: torch.Tensor, weight_in) -> torch.Tensor:
        """Same dtypes as `QuantizedPaCAFunction`; ``weight_in(dtype)`` builds the weight."""
        dtype = self.compute_dtype_for(x)
        y = F.linear(x.to(dtype), weight_in(dtype), None if self.bias is None else self.bias.to(dtype))
        return as_function_output(y if torch.is_autocast_enabled(x.device.type) else y.to(x.dtype))

    def merged_module(self, dtype: Optional[torch.dtype] = None, requantize: bool = False) -> nn.Module:
        """A layer without PaCA holding the trained columns.

        Args:
            dtype: dtype of the exported dense weight (and bias); default ``merge_dtype``.
                The trained columns are ``(scaling * paca_weight).to(dtype)`` exactly, the other
                columns the dequantized base: no trained value is re-quantized.
            requantize: instead return a bitsandbytes layer of the base's own format (same
                quant type, blocksize, double quantization, compute dtype) quantized from that
                dense weight. Lossy: the trained columns are rounded to the quantization grid
                like every other value.
        """
        dtype = dtype or self.merge_dtype
        with torch.no_grad():
            weight = self.effective_weight(self.paca_weight, dtype)
            bias = None if self.bias is None else nn.Parameter(self.bias.detach().to(dtype),
                                                               requires_grad=self.bias.requires_grad)
        dense = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device="meta")
        dense.weight = nn.Parameter(weight, requires_grad=False)
        dense.bias = bias
        if not requantize:
            return dense  # merge_paca gives it the architecture's layer type (`dense_export_layers`)
        if self.kind == "8bit":
            return quantize_linear(dense, "int8")
        state = self.quant_state
        bnb = import_bitsandbytes("requantize=True")
        layer = bnb.nn.Linear4bit(self.in_features, self.out_features, bias=bias is not None,
                                  compute_dtype=self.compute_dtype, compress_statistics=state.nested,
                                  quant_type=state.quant_type, quant_storage=self.quant_storage, device="meta")
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, blocksize=state.blocksize,
                                         compress_statistics=state.nested, quant_type=state.quant_type,
                                         quant_storage=self.quant_storage, module=layer)
        with backend_errors(state.quant_type, weight.device):
            layer.weight = layer.weight._quantize(weight.device)
        layer.bias = bias
        return layer

    def base_module(self) -> nn.Module:
        """The quantized base layer, untouched (it never held trained values)."""
        self.paca_enabled = False
        return self._release()

    def _release(self) -> nn.Module:
        """The base layer with a bitsandbytes parameter over this layer's bytes and state again."""
        base, bnb = self.quantized_base, import_bitsandbytes("unwrapping a quantized PaCA layer")
        self._move_state_to(self.weight.device)
        if self.kind == "4bit":
            state = self.quant_state
            stored = self.weight.data.reshape(-1).view(self.quant_storage).reshape(-1, 1)
            base.weight = bnb.nn.Params4bit(stored, requires_grad=False,
                                            quant_state=state, blocksize=state.blocksize,
                                            compress_statistics=state.nested, quant_type=state.quant_type,
                                            quant_storage=self.quant_storage, module=base, bnb_quantized=True)
            base.quant_state = state
        else:
            # Linear8bitLt's forward moves CB/SCB from the parameter into its matmul state.
            base.weight = bnb.nn.Int8Params(self.weight.data, requires_grad=False, has_fp16_weights=False,
                                            CB=self.weight.data, SCB=self.int8_row_scales)
        base.bias = self.bias
        return base

    def get_extra_state(self) -> torch.Tensor:
        """The quantization state, saved in the state dict as ``<layer>._extra_state``: the slot
        PyTorch and its distributed checkpoints keep for non-parameter state, serialized into one
        uint8 tensor so that every consumer of a state dict (safetensors, ``save_pretrained``,
        distributed checkpoints) sees a plain tensor."""
        awaiting = self.quant_state is None if self.kind == "4bit" else self.int8_row_scales.is_meta
        if awaiting:
            raise ValueError(f"this {self.quant_type} QuantizedPaCALinear is awaiting its weights (built on the "
                             "meta device by QuantizedPaCALinear.awaiting_weights) and has no quantization state "
                             "to save yet; fill it first (paca_lightning.parallel.load_pretrained_shards)")
        if self.kind == "4bit":
            state = self.quant_state.as_dict(packed=True)
        else:
            state = {"SCB": self.int8_row_scales}
        buffer = io.BytesIO()
        torch.save({key: value.detach().cpu() for key, value in state.items()}, buffer)
        return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)

    def set_extra_state(self, state: torch.Tensor) -> None:
        if _is_distributed_placeholder(state):
            # torch's set_model_state_dict(broadcast_from_rank0=True) hands every module with
            # extra state this placeholder when the state dict it broadcasts (here: one safetensors
            # file's layers) does not hold that module's state; its state arrives with its file
            return
        if not isinstance(state, torch.Tensor):
            raise TypeError(f"QuantizedPaCALinear's extra state is the uint8 tensor get_extra_state returns, "
                            f"got {type(state).__module__}.{type(state).__name__}")
        tensors = torch.load(io.BytesIO(state.cpu().numpy().tobytes()), weights_only=True)
        device = self.weight.device
        if self.kind == "4bit":
            from bitsandbytes.functional import QuantState
            loaded = QuantState.from_dict(tensors, device=device)
            if loaded.quant_type != self.quant_type:
                raise ValueError(f"the quantization state loaded into this {self.quant_type} QuantizedPaCALinear is "
                                 f"{loaded.quant_type}; load a state dict saved from a {self.quant_type} model")
            self.quant_state = loaded
        else:
            self.int8_row_scales = tensors["SCB"].to(device=device, dtype=torch.float32)

    def extra_repr(self) -> str:
        return (f"{self.quantization}(in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}), rank={self.rank}, scaling={self.scaling:g}")


def _is_distributed_placeholder(state) -> bool:
    """Whether ``state`` is the object torch.distributed.checkpoint passes to ``set_extra_state``
    for a module whose extra state its state dict does not hold (a private class of torch 2.x)."""
    try:
        from torch.distributed.checkpoint.state_dict import _EXTRA_STATE
    except ImportError:  # torch without distributed support: no such loader either
        return False
    return isinstance(state, _EXTRA_STATE)


def plain_conv1d_names(model: nn.Module) -> set[str]:
    """Names of the layers that are GPT-2 ``Conv1D`` in ``model``'s architecture unquantized.

    transformers' bitsandbytes loading turns ``Conv1D`` (weight stored in x out) into ``Linear4bit``
    (out x in); a dense export must turn them back, or a checkpoint would hold the weight in the
    wrong layout (refused on load, or silently transposed for a square layer). Answered by building
    the model's class from its config on the meta device (no memory, no weights).
    """
    config = getattr(model, "config", None)
    # the user's class, not a wrapper's subclass of it (FSDP2's fully_shard makes "FSDP<Name>")
    kind = next(c for c in type(model).__mro__ if not c.__module__.startswith("torch.distributed"))
    from_config = getattr(kind, "_from_config", None)
    if config is None or from_config is None:
        return set()
    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = from_config(config)
    return {name for name, module in plain.named_modules() if is_conv1d(module)}


def dense_export_layers(model: nn.Module, dtype: torch.dtype, conv1d_names: set[str]) -> None:
    """Make ``model`` a plain dense model: every bitsandbytes layer left becomes a dense layer of
    ``dtype`` holding its dequantized weight, and every dense ``nn.Linear`` named in
    ``conv1d_names`` (a merged QPaCA layer or one dequantized here) becomes the ``Conv1D`` the
    architecture has there, its weight transposed to (in x out)."""
    def set_submodule(name: str, layer: nn.Module) -> None:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)

    for name, module in list(model.named_modules()):
        if is_quantized_linear(module):
            with torch.no_grad():
                dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                  device="meta")
                dense.weight = nn.Parameter(dequantize_weight(module, dtype), requires_grad=False)
                if module.bias is not None:
                    dense.bias = nn.Parameter(module.bias.detach().to(dtype), requires_grad=module.bias.requires_grad)
            set_submodule(name, dense)
    for name in conv1d_names:
        module = model.get_submodule(name)
        if type(module) is nn.Linear:
            conv = Conv1D(module.out_features, module.in_features)
            conv.weight = nn.Parameter(module.weight.detach().t().contiguous(), requires_grad=False)
            conv.bias = module.bias if module.bias is not None else nn.Parameter(
                torch.zeros(module.out_features, dtype=module.weight.dtype, device=module.weight.device),
                requires_grad=False)
            set_submodule(name, conv)


def drop_quantization_markers(model: nn.Module) -> None:
    """Once no bitsandbytes layer is left, remove transformers' record that the model is quantized.

    Otherwise ``save_pretrained`` would write a ``quantization_config`` and loading the merged
    dense checkpoint would quantize it again.
    """
    if any(is_quantized_linear(m) or type(m).__module__.startswith("bitsandbytes") for m in model.modules()):
        return
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    elif hasattr(getattr(model, "config", None), "quantization_config"):
        del model.config.quantization_config
        model.is_quantized = False
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if getattr(model, flag, False):
            setattr(model, flag, False)
