"""PaCA on the fused expert weights of transformers 5 mixture-of-experts blocks.

Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE and others keep their routed experts as 3-D parameters of
one experts module (``gate_up_proj``: experts x 2I x H, ``down_proj``: experts x H x I), not as
``nn.Linear`` layers. `PaCAExpertWeights` takes the place of one such parameter: every expert
``e`` trains its own ``r`` input columns ``S_e`` in place, and backward keeps only those columns
of the tokens routed to ``e``.

It works with the experts module's own eager forward, which computes expert by expert as
``F.linear(tokens_e, weight[e])``: indexing the layer gives that expert's weight as a tensor on
which ``F.linear`` runs `PaCAFunction` with the expert's trained columns. The grouped and
batched implementations transformers picks by default compute on the whole 3-D tensor, which
would bypass the trained columns, so adapting switches the model to the eager one
(``config._experts_implementation = "eager"``); any other use of an expert's weight raises.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .layers import PaCAFunction, PaCALayer, validated_indices

# Parameter names of the experts modules transformers' `use_experts_implementation` decorates.
EXPERT_PROJECTIONS = ("gate_up_proj", "up_proj", "down_proj")


def fused_expert_weights(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """``{"<experts module>.<projection>": (experts module, projection)}`` for every fused 3-D
    expert weight in ``model`` (modules carrying transformers' experts-implementation flags)."""
    found = {}
    for name, module in model.named_modules():
        if not (hasattr(module, "is_transposed") and hasattr(module, "has_gate")):
            continue
        for projection in EXPERT_PROJECTIONS:
            param = module._parameters.get(projection)
            if isinstance(param, nn.Parameter) and param.ndim == 3:
                found[f"{name}.{projection}" if name else projection] = (module, projection)
    return found


def check_expert_targets(targets: dict[str, tuple[nn.Module, str]], quantize: Optional[str], selection: str) -> None:
    """Refuse, naming the module and the reason, what PaCA cannot do with these experts."""
    for name, (module, _) in targets.items():
        kind = f"{type(module).__module__}.{type(module).__name__}"
        if module.is_transposed or module.has_bias:
            raise TypeError(f"{name!r} belongs to {kind}, whose expert weights are stored transposed or with "
                            "biases; PaCA adapts untransposed experts without bias (Mixtral, Qwen-MoE, OLMoE). "
                            "Exclude them with exclude_modules")
    if targets and quantize is not None:
        raise ValueError(f"PaCAConfig.quantize={quantize!r}: bitsandbytes quantizes 2-D Linear layers, not fused "
                         f"3-D expert weights such as {sorted(targets)[0]!r}; exclude the experts "
                         "(exclude_modules=['gate_up_proj', 'down_proj']) or set quantize=None")
    if targets and selection == "gradient":
        raise ValueError("PaCAConfig.selection='gradient' is not supported for fused expert weights "
                         f"({sorted(targets)[0]!r}); use 'random' or 'weight_norm', or exclude the experts")


def refuse_fused_experts(model: nn.Module, engine: str) -> None:
    """Fused expert weights adapted by PaCA train in one process or under DDP; a sharding engine
    would split the 3-D weight the expert-by-expert column writes rely on."""
    adapted = [name for name, module in model.named_modules() if isinstance(module, PaCAExpertWeights)]
    if adapted:
        raise NotImplementedError(f"{engine} does not shard fused MoE expert weights adapted by PaCA (e.g. "
                                  f"{adapted[0]!r}); train them in one process or with DDP, or exclude them "
                                  "(PaCAConfig(exclude_modules=['gate_up_proj', 'down_proj']))")


def use_eager_experts(model: nn.Module, targets: dict[str, tuple[nn.Module, str]]) -> None:
    """Switch the experts modules to transformers' eager (expert by expert) implementation."""
    if not targets:
        return
    if callable(getattr(model, "set_experts_implementation", None)):
        model.set_experts_implementation("eager")
    for module, _ in targets.values():
        module.config._experts_implementation = "eager"


class _ExpertWeight(torch.Tensor):
    """One expert's weight as the eager forward takes it (``layer[e]``): ``F.linear`` with it runs
    with the expert's trained columns; any other computation with it raises, as it would
    silently leave the expert untrained."""

    _paca_layer: PaCAExpertWeights
    _paca_expert: int

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            return weight._paca_layer.expert_linear(args[0], weight._paca_expert, bias)
        if getattr(func, "__name__", None) == "__get__":  # .shape, .dtype, .device
            return super().__torch_function__(func, types, args, kwargs)
        # RuntimeError, not TypeError: torch turns a TypeError from an operator into NotImplemented
        raise RuntimeError(f"an expert weight adapted by PaCA was used by {getattr(func, '__name__', func)}; PaCA "
                        "supports the experts' eager forward, which applies each expert with F.linear")


class PaCAExpertWeights(PaCALayer):
    """A fused expert weight (experts x out x in) whose columns ``paca_indices[e]`` train per expert.

    Args:
        weight: the 3-D parameter, taken over (the same object; `merge_paca` and `unload_paca`
            put it back in its module under its own name).
        paca_indices: ``experts x r`` input features to train, ``r`` distinct ones per expert.
        scaling: ``s = alpha / r``.
        paca_dtype: dtype of the trainable columns.

    Attributes as `PaCALayer`, with one more leading dimension: ``paca_weight`` (experts x out x
    r), ``paca_indices`` (experts x r), ``paca_base_columns`` (experts x out x r).
    """

    def __init__(self, weight: nn.Parameter, paca_indices: torch.Tensor, scaling: float,
                 paca_dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        if weight.ndim != 3:
            raise ValueError(f"PaCAExpertWeights adapts a 3-D (experts x out x in) weight, got shape "
                             f"{tuple(weight.shape)}")
        experts, out_features, in_features = weight.shape
        paca_indices = torch.as_tensor(paca_indices)
        if paca_indices.ndim != 2 or paca_indices.shape[0] != experts:
            raise ValueError(f"paca_indices of {experts} experts must have shape ({experts}, r), got "
                             f"{tuple(paca_indices.shape)}")
        indices = torch.stack([validated_indices(row, in_features, weight.device) for row in paca_indices])
        self.num_experts, self.out_features, self.in_features = experts, out_features, in_features
        self.transposed = False
        self.scaling = float(scaling)
        self.weight = weight
        self.weight.requires_grad_(False)
        self.register_buffer("paca_indices", indices)
        self.register_buffer("paca_base_columns", weight.detach().gather(2, self._column_index()).clone())
        self.paca_weight = nn.Parameter(self.paca_base_columns.to(paca_dtype or weight.dtype) / self.scaling)
        self.paca_enabled = True
        self.auto_sync = True
        self.sync_columns_()

    @property
    def rank(self) -> int:
        return self.paca_indices.shape[-1]

    def _column_index(self) -> torch.Tensor:
        return self.paca_indices.unsqueeze(1).expand(-1, self.out_features, -1)

    def _write_columns(self, columns: torch.Tensor) -> None:
        with torch.no_grad():  # through .data: the weight's autograd version stays, as in PaCALinear
            self.weight.data.scatter_(2, self._column_index(), columns.to(self.weight.dtype))

    def sync_columns_(self) -> None:
        """Write ``s * paca_weight`` into every expert's columns of the weight."""
        self._write_columns(self.scaling * self.paca_weight.detach())

    def __getitem__(self, expert) -> torch.Tensor:
        e = int(expert)
        view = self.weight[e].as_subclass(_ExpertWeight)
        view._paca_layer, view._paca_expert = self, e
        return view

    def __len__(self) -> int:
        return self.num_experts

    def expert_linear(self, x: torch.Tensor, e: int, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """``x @ W_e^T (+ bias)`` with expert ``e``'s trained columns; backward keeps ``x[:, S_e]``."""
        indices = self.paca_indices[e]
        weight = self.weight[e]
        if not self.paca_enabled:  # a transient copy holding the pretrained columns
            pretrained = weight.detach().clone()
            pretrained[:, indices] = self.paca_base_columns[e].to(pretrained.dtype)
            return F.linear(x, pretrained, bias)
        if self.auto_sync:
            with torch.no_grad():
                self.weight.data[e].index_copy_(1, indices, (self.scaling * self.paca_weight[e].detach())
                                                .to(self.weight.dtype))
        return PaCAFunction.apply(x, weight, bias, self.paca_weight[e], indices, self.scaling, False)

    def merged_module(self) -> nn.Parameter:
        """The 3-D parameter holding the trained columns (`merge_paca` puts it back in its module)."""
        self.sync_columns_()
        return self.weight

    def base_module(self) -> nn.Parameter:
        """The 3-D parameter with its pretrained columns, bit for bit."""
        self._write_columns(self.paca_base_columns)
        return self.weight

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, scaling={self.scaling:g}")
