"""PaCA on fused mixture-of-experts weights (transformers 5 ``experts.gate_up_proj``/``down_proj``).

In transformers 5 the routed experts of Mixtral, Qwen2/Qwen3-MoE, OLMoE, GraniteMoE, DeepSeek-V3
and others are one module holding 3-D parameters, e.g. ``gate_up_proj`` of shape
(experts x 2I x H) and ``down_proj`` (experts x H x I), and a forward that routes each token
to its top-k experts. Each such parameter is adapted as one unit named after it
(``model.layers.0.mlp.experts.gate_up_proj``): every expert ``e`` trains its own ``r`` input
columns ``S_e`` in place, exactly as a 2-D layer does::

    for each expert e hit by the batch, with x_e = the rows of the tokens routed to it:
        y_e = x_e @ W_e^T                    W_e[:, S_e] = s · P_e  (written in place)
        saved: x_e[:, S_e]                   (routed tokens x r, a compact copy)
        dP_e = s · dy_e^T @ x_e[:, S_e]      dx_e = dy_e @ W_e

The experts module keeps its class; while one of its weights is adapted it computes with
`paca_experts_forward` (a per-expert loop, transformers' "eager" experts implementation,
read through the flags transformers' ``use_experts_implementation`` sets: ``has_gate``,
``has_bias``, ``is_transposed``, ``_apply_gate``, ``has_post_expert_norm``). Experts classes
without those flags are refused by name.
"""

from __future__ import annotations

import types
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .layers import PaCAFunction, PaCALayer, as_function_output, local_rows, validated_indices

try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover
    DTensor = ()

_FLAGS = ("has_gate", "has_bias", "is_transposed")


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers experts module with fused 3-D weights and the ``use_experts_implementation`` flags."""
    if not all(hasattr(module, flag) for flag in _FLAGS) or not hasattr(module, "num_experts"):
        return False
    return all(_weight_of(module, name) is not None for name in expert_weight_names(module))


def expert_weight_names(module: nn.Module) -> tuple[str, str]:
    """The fused weights an experts module computes with: the up (or gate-up) and the down projection."""
    return ("gate_up_proj" if module.has_gate else "up_proj"), "down_proj"


def _weight_of(module: nn.Module, name: str):
    value = getattr(module, name, None)
    if isinstance(value, PaCAExpertWeights):
        return value
    return value if isinstance(value, nn.Parameter) and value.ndim == 3 else None


class ExpertParameter:
    """One fused 3-D expert weight as a PaCA target: ``owner`` (the experts module) and ``attr``."""

    def __init__(self, owner: nn.Module, attr: str) -> None:
        self.owner, self.attr = owner, attr

    @property
    def weight(self) -> nn.Parameter:
        return getattr(self.owner, self.attr)

    @property
    def transposed(self) -> bool:
        return bool(self.owner.is_transposed)

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1 if self.transposed else 2]

    @property
    def out_features(self) -> int:
        return self.weight.shape[2 if self.transposed else 1]

    def __repr__(self) -> str:
        return f"{type(self.owner).__name__}.{self.attr} {tuple(self.weight.shape)}"


def expert_parameters(model: nn.Module) -> dict[str, ExpertParameter]:
    """``{"<experts module>.<weight name>": ExpertParameter}`` for every fused experts module."""
    found = {}
    for name, module in model.named_modules():
        if is_fused_experts(module):
            for attr in expert_weight_names(module):
                found[f"{name}.{attr}" if name else attr] = ExpertParameter(module, attr)
    return found


class PaCAExpertWeights(PaCALayer):
    """A fused expert weight (experts x out x in, or experts x in x out when ``transposed``) whose
    expert ``e`` trains columns ``paca_indices[e]`` in place.

    The `PaCALayer` attributes gain a leading expert dimension: ``paca_weight`` and
    ``paca_base_columns`` are (experts x out x r), ``paca_indices`` (experts x r); ``rank`` is r.
    ``merged_module``/``base_module`` return the weight Parameter itself, which the caller puts
    back on the experts module under its own name.
    """

    def __init__(self, target: ExpertParameter, paca_indices: torch.Tensor, scaling: float,
                 paca_dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        weight = target.weight
        self.transposed = target.transposed
        self.num_experts, self.in_features, self.out_features = (
            target.num_experts, target.in_features, target.out_features)
        indices = torch.as_tensor(paca_indices, dtype=torch.int64)
        if indices.ndim != 2 or indices.shape[0] != self.num_experts:
            raise ValueError(f"paca_indices for fused expert weight {target!r} must be (experts x r) = "
                             f"({self.num_experts} x r), got shape {tuple(indices.shape)}")
        indices = torch.stack([validated_indices(row, self.in_features, weight.device) for row in indices])
        self.scaling = float(scaling)
        self.weight = weight
        self.weight.requires_grad_(False)
        self.register_buffer("paca_indices", indices)
        self.register_buffer("paca_base_columns", self._read_columns().contiguous())
        self.paca_weight = nn.Parameter(self.paca_base_columns.to(paca_dtype or weight.dtype) / self.scaling)
        self.paca_enabled = True
        self.auto_sync = True
        self.sync_columns_()

    @property
    def rank(self) -> int:
        return self.paca_indices.shape[-1]

    def column_index(self, indices: torch.Tensor, experts: int) -> tuple[int, torch.Tensor]:
        """The dim and index that gather/scatter the columns (``indices``, experts x r) of a fused weight."""
        if self.transposed:  # experts x in x out: the columns are rows of each expert's matrix
            return 1, indices[:, :, None].expand(experts, indices.shape[1], self.out_features)
        return 2, indices[:, None, :].expand(experts, self.out_features, indices.shape[1])

    def _read_columns(self) -> torch.Tensor:
        dim, index = self.column_index(self.paca_indices, self.num_experts)
        columns = self.weight.detach().gather(dim, index)
        return columns.transpose(1, 2) if self.transposed else columns

    @torch.no_grad()
    def _write_columns(self, columns: torch.Tensor) -> None:
        """Write ``columns`` (experts x out x r) into the weight: whole, or a DTensor's local experts."""
        weight, indices = self.weight, self.paca_indices
        if isinstance(weight, DTensor):
            weight, indices, columns = self._local_shards(columns)
        else:
            weight = weight.data  # leaves the autograd version alone, as PaCALinear's write does
        columns = columns.to(device=weight.device, dtype=weight.dtype)
        dim, index = self.column_index(indices.to(weight.device), weight.shape[0])
        weight.scatter_(dim, index, columns.transpose(1, 2) if self.transposed else columns)

    def _local_shards(self, columns: torch.Tensor):
        """This rank's experts of the weight, the indices and ``columns``; FSDP2 shards the fused
        weight and ``paca_weight`` on the expert dimension (dim 0) alike, so no communication."""
        weight, paca = self.weight, self.paca_weight
        if not (isinstance(paca, DTensor) and tuple(weight.placements) == tuple(paca.placements)
                and all(p == Shard(0) or not isinstance(p, Shard) for p in paca.placements)):
            raise RuntimeError(f"PaCA fused expert weight ({self.extra_repr()}): weight placements "
                               f"{getattr(weight, 'placements', None)} and paca_weight placements "
                               f"{getattr(paca, 'placements', None)} must both shard the expert dimension "
                               "(Shard(0)); use paca_lightning.parallel.shard_paca_model")
        local_columns = columns.to_local() if isinstance(columns, DTensor) else local_rows(columns, paca)
        return weight.to_local(), local_rows(self.paca_indices, paca), local_columns

    @torch.no_grad()
    def sync_columns_(self) -> None:
        self._write_columns(self.paca_weight * self.scaling)

    def expert_linear(self, x: torch.Tensor, expert: int, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """``x @ W_e^T + b`` for the tokens routed to ``expert``; backward keeps ``x[:, S_e]`` only."""
        weight = self.weight[expert]
        if not self.paca_enabled:
            weight = weight.detach().clone()
            columns = self.paca_base_columns[expert].to(weight.dtype)
            if self.transposed:
                weight.index_copy_(0, self.paca_indices[expert], columns.t())
            else:
                weight.index_copy_(1, self.paca_indices[expert], columns)
        if not self.paca_enabled or not (torch.is_grad_enabled() and self.paca_weight.requires_grad):
            return as_function_output(F.linear(x, weight.t() if self.transposed else weight, bias))
        return PaCAFunction.apply(x, weight, bias, self.paca_weight[expert], self.paca_indices[expert],
                                  self.scaling, self.transposed)

    def merged_module(self) -> nn.Parameter:
        """The fused weight Parameter holding every expert's trained columns."""
        self.paca_enabled = True
        self.sync_columns_()
        return self.weight

    def base_module(self) -> nn.Parameter:
        """The fused weight Parameter with its pretrained values, bit for bit."""
        self.paca_enabled = False
        self._write_columns(self.paca_base_columns)
        return self.weight

    def extra_repr(self) -> str:
        layout = "experts x in x out" if self.transposed else "experts x out x in"
        return (f"experts={self.num_experts}, in_features={self.in_features}, out_features={self.out_features} "
                f"({layout}), rank={self.rank}, scaling={self.scaling:g}")


def install_paca_forward(experts: nn.Module) -> None:
    """Make ``experts`` compute with `paca_experts_forward` (an instance attribute, removed by
    `release_paca_forward` once no weight of it is adapted)."""
    experts.forward = types.MethodType(paca_experts_forward, experts)


def release_paca_forward(model: nn.Module) -> None:
    """Give back the class's own forward to every experts module none of whose weights is adapted."""
    for module in model.modules():
        if "forward" in vars(module) and getattr(module.forward, "__func__", None) is paca_experts_forward:
            if not any(isinstance(getattr(module, name, None), PaCAExpertWeights)
                       for name in expert_weight_names(module)):
                del module.forward


def _project(experts: nn.Module, name: str, x: torch.Tensor, expert: int) -> torch.Tensor:
    weight = getattr(experts, name)
    bias = getattr(experts, f"{name}_bias")[expert] if experts.has_bias else None
    if isinstance(weight, PaCAExpertWeights):
        return weight.expert_linear(x, expert, bias)
    weight = weight[expert]
    return F.linear(x, weight.t() if experts.is_transposed else weight, bias)


def paca_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                         top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' eager experts loop, each projection through `PaCAExpertWeights` when adapted."""
    up_name, down_name = expert_weight_names(self)
    for name in (up_name, down_name):
        layer = getattr(self, name)
        if isinstance(layer, PaCAExpertWeights) and layer.paca_enabled and layer.auto_sync:
            layer.sync_columns_()
    final_hidden_states = torch.zeros_like(hidden_states)
    with torch.no_grad():
        # one extra class catches expert-parallel sentinels (ids >= num_experts), skipped below
        expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
    for expert in expert_hit[:, 0].tolist():
        if expert >= self.num_experts:
            continue
        top_k_pos, token_idx = torch.where(expert_mask[expert])
        state = _project(self, up_name, hidden_states[token_idx], expert)
        state = self._apply_gate(state) if self.has_gate else self.act_fn(state)
        state = _project(self, down_name, state, expert)
        if getattr(self, "has_post_expert_norm", False):
            state = self.post_expert_norm(state)
        state = state * top_k_weights[token_idx, top_k_pos, None]
        final_hidden_states.index_add_(0, token_idx, state.to(final_hidden_states.dtype))
    return final_hidden_states
