"""Which input columns each layer trains: "random", "weight_norm" or "gradient".

Every strategy returns ``rank`` distinct, sorted int64 indices into the layer's input features.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from typing import Any, Union

import torch
from torch import nn

from .layers import is_conv1d

Calibration = Union[Mapping[str, Any], Callable[[nn.Module], torch.Tensor]]


def random_columns(in_features: int, rank: int, seed: int, module_name: str) -> torch.Tensor:
    """Uniform without replacement, seeded by (seed, module name) only.

    The same config picks the same columns for a module whatever the module order, the other
    modules targeted, or the state of the global RNG.
    """
    digest = hashlib.sha256(f"{seed}:{module_name}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return torch.randperm(in_features, generator=generator)[:rank].sort().values


def top_columns(scores: torch.Tensor, rank: int) -> torch.Tensor:
    """The ``rank`` highest-scoring columns, sorted; per row for a fused expert weight's (experts x in)."""
    return torch.topk(scores.float().cpu(), rank, dim=-1).indices.sort(dim=-1).values


def weight_norm_scores(weight: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """L2 norm of each input column of a dense weight (out x in, or in x out when ``transposed``),
    per expert for a fused expert weight (experts x out x in, or experts x in x out)."""
    return column_norms(weight.detach().float(), transposed)


def column_norms(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    return weight.norm(dim=-1) if transposed else weight.norm(dim=-2)


@torch.enable_grad()
def gradient_scores(model: nn.Module, modules: Mapping[str, nn.Module],
                    calibration: Calibration) -> dict[str, torch.Tensor]:
    """L2 norm of each input column of dL/dW on one calibration batch, for each module.

    ``calibration`` is a batch for ``model(**batch).loss`` (so it must hold ``labels``) or a
    callable ``loss = calibration(model)``. Each layer's full weight gradient exists only until
    its column norms are taken, so peak memory is one layer's gradient, not the model's. The
    pass runs in eval mode (dropout off, each module's mode restored after), so the columns
    depend on the weights and the batch only, not on the random state.
    """
    scores: dict[str, torch.Tensor] = {}
    handles, previously_trainable = [], {}
    for name, module in modules.items():
        weight = module.weight
        previously_trainable[name] = weight.requires_grad
        weight.requires_grad_(True)

        def take_scores(param, name=name, module=module):
            # a fused expert weight (ExpertParameter) says its layout; a layer is Linear or Conv1D
            transposed = getattr(module, "transposed", None)
            norms = column_norms(param.grad.detach().float(), is_conv1d(module) if transposed is None else transposed)
            scores[name] = scores.get(name, 0) + norms.cpu()
            param.grad = None

        handles.append(weight.register_post_accumulate_grad_hook(take_scores))
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        if callable(calibration):
            loss = calibration(model)
        elif isinstance(calibration, Mapping):
            if "labels" not in calibration:
                raise ValueError("selection='gradient': the calibration batch has no 'labels' key "
                                 f"(keys: {sorted(calibration)}); add labels or pass a callable "
                                 "calibration(model) -> loss")
            loss = model(**calibration).loss
        else:
            raise TypeError("selection='gradient' needs calibration= a batch dict for model(**batch) "
                            f"or a callable model -> loss, got {type(calibration).__name__}")
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
            raise ValueError(f"the calibration loss must be a scalar tensor, got {loss!r}")
        loss.backward()
    finally:
        for module, training in modes.items():
            module.train(training)
        for handle in handles:
            handle.remove()
        for name, module in modules.items():
            module.weight.requires_grad_(previously_trainable[name])
            module.weight.grad = None
    missing = sorted(set(modules) - set(scores))
    if missing:
        raise RuntimeError(f"selection='gradient': the calibration loss does not depend on {missing[:5]}"
                           f"{' ...' if len(missing) > 5 else ''}; their columns cannot be ranked")
    return scores
