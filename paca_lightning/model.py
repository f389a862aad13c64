"""Where PaCA goes in a model: `apply_paca`, `merge_paca`, `unload_paca`, `disable_paca`."""

from __future__ import annotations

import contextlib
import difflib
import re
from collections.abc import Iterator, Mapping
from typing import NamedTuple, Optional

import torch
from torch import nn

from .config import PaCAConfig, selects
from .experts import (
    ExpertParameter,
    PaCAExpertWeights,
    expert_parameters,
    install_paca_forward,
    is_fused_experts,
    release_paca_forward,
)
from .layers import PaCALayer, PaCALinear, in_features_of, is_conv1d, is_plain_linear
from .quantized import (
    QuantizedPaCALinear,
    check_quantized_targets,
    dense_dtype_of,
    dense_export_layers,
    dequantize_weight,
    drop_quantization_markers,
    import_bitsandbytes,
    is_quantized_linear,
    plain_conv1d_names,
    quantized_paca_layer,
)
from .selection import Calibration, gradient_scores, random_columns, top_columns, weight_norm_scores

_HALF_DTYPES = (torch.float16, torch.bfloat16)


def paca_layers(model: nn.Module) -> Iterator[tuple[str, PaCALayer]]:
    """Every PaCA layer of ``model`` (`PaCALinear` or `QuantizedPaCALinear`) with its module name."""
    for name, module in model.named_modules():
        if isinstance(module, PaCALayer):
            yield name, module


def _dense_paca_layers(model: nn.Module) -> Iterator[PaCALayer]:
    """The layers whose weight holds the trained columns (not QPaCA's, which never does)."""
    return (layer for _, layer in paca_layers(model) if not isinstance(layer, QuantizedPaCALinear))


def is_adaptable(module: nn.Module) -> bool:
    """Layers PaCA can adapt: ``nn.Linear`` and subclasses keeping its plain forward
    (`is_plain_linear`), transformers ``Conv1D``, bitsandbytes ``Linear4bit``/``Linear8bitLt`` (QPaCA)."""
    return is_plain_linear(module) or is_conv1d(module) or is_quantized_linear(module)


def _output_head_names(model: nn.Module) -> set[str]:
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    names = {name for name, module in model.named_modules() if head is not None and module is head}
    if not names:  # models without the transformers accessor: the conventional name
        names = {name for name, _ in model.named_modules() if name.split(".")[-1] == "lm_head"}
    return names


def _selects_unit(selector, name: str, unit, all_linear: set[str]) -> bool:
    """A fused expert weight is also selected through its experts module's name (``"experts"``)."""
    if selects(selector, name, all_linear):
        return True
    return isinstance(unit, ExpertParameter) and selects(selector, name.rpartition(".")[0], set())


def find_targets(model: nn.Module, config) -> dict[str, nn.Module]:
    """``{name: module}`` that ``config.target_modules`` minus ``config.exclude_modules`` selects
    (`PaCAConfig`, or any object with those two fields); raises naming what is wrong.

    Besides layers, the units are the fused 3-D weights of transformers' experts modules, named
    ``<experts module>.<weight>`` (e.g. ``mlp.experts.gate_up_proj``, an `ExpertParameter`);
    naming the experts module selects (or excludes) both of its weights.
    """
    modules = dict(model.named_modules(remove_duplicate=False))  # every alias: `_refuse_shared` checks them
    experts = expert_parameters(model)
    heads = _output_head_names(model)
    all_linear = {name for name, m in modules.items() if is_adaptable(m) and name not in heads} | set(experts)
    units = {**modules, **experts}
    chosen = {name: m for name, m in units.items() if name and not is_fused_experts(m)
              and _selects_unit(config.target_modules, name, m, all_linear)}
    if config.exclude_modules is not None:
        chosen = {name: m for name, m in chosen.items()
                  if not _selects_unit(config.exclude_modules, name, m, all_linear)}

    if isinstance(config.target_modules, list):
        leaf_names = sorted({name.split(".")[-1] for name in modules if name})
        for key in config.target_modules:
            if not any(name == key or name.endswith("." + key) for name in units if name):
                close = difflib.get_close_matches(key.split(".")[-1], leaf_names + sorted(
                    {name.split(".")[-1] for name in experts}), n=5, cutoff=0.5)
                raise ValueError(f"{type(config).__name__}.target_modules entry {key!r} matches no module of "
                                 f"{type(model).__name__}; close matches: {close or 'none'}; "
                                 f"linear layers here are named e.g. {_examples(all_linear)}")
    if not chosen:
        raise ValueError(f"{type(config).__name__}.target_modules={config.target_modules!r} (excluding "
                         f"{config.exclude_modules!r}) selects no module of {type(model).__name__}; "
                         f"linear layers here are named e.g. {_examples(all_linear)}")
    for name, module in chosen.items():
        if not isinstance(module, ExpertParameter) and not is_adaptable(module):
            raise TypeError(f"module {name!r} is a {_not_adaptable_reason(module)}. PaCA adapts torch.nn.Linear "
                            "(and subclasses keeping its forward), transformers Conv1D, bitsandbytes "
                            "Linear4bit/Linear8bitLt layers and the fused weights of transformers experts "
                            f"modules only. Narrow target_modules to those, e.g. {_examples(all_linear)}")
    return chosen


def _refuse_shared(model: nn.Module, targets: Mapping[str, nn.Module]) -> None:
    """Refuse targets that are not one layer with one weight of its own.

    PaCA writes trained columns into the weight in place and computes their gradient from this
    layer's use alone. A weight tied to another module (an output head tied to the input
    embedding) would change that module too and miss its share of the gradient; a module
    registered under two names would be replaced under one and keep training under the other.
    """
    module_names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        module_names.setdefault(id(module), []).append(name)
    param_names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        param_names.setdefault(id(param), []).append(name)
    for name, module in targets.items():
        aliases = [other for other in module_names.get(id(module), []) if other != name]
        if aliases:
            raise ValueError(f"module {name!r} is also registered as {aliases[:3]}; PaCA replaces a layer "
                             "under one name, so the other would keep the unadapted layer. Adapt a model in "
                             f"which each layer has one name, or leave {name!r} out of target_modules")
        own_name = name if isinstance(module, ExpertParameter) else f"{name}.weight"
        weight_owners = [other for other in param_names.get(id(module.weight), []) if other != own_name]
        if weight_owners:
            raise ValueError(f"module {name!r} shares its weight with {weight_owners[:3]} (tied weights, e.g. "
                             "an output head tied to the input embedding). PaCA trains columns of the weight "
                             "in place, so the tied module would change too and the column gradient would "
                             f"miss its part. Leave {name!r} out of target_modules (or add it to "
                             "exclude_modules), or untie the weights first (transformers: "
                             "config.tie_word_embeddings=False before loading)")


def _not_adaptable_reason(module: nn.Module) -> str:
    kind = f"{type(module).__module__}.{type(module).__name__}"
    if isinstance(module, nn.Linear):
        return (f"{kind}, a subclass of nn.Linear with a forward of its own; PaCA replaces the forward by the "
                "plain x @ W^T + b, which would silently change what this layer computes")
    fused = [name for name, param in module.named_parameters(recurse=False) if param.ndim == 3]
    if fused:
        return (f"{kind} holding 3-D weights {fused} without transformers' use_experts_implementation flags "
                "(has_gate, has_bias, is_transposed), so PaCA cannot know how it computes with them")
    return kind


def _examples(names: set[str], n: int = 4) -> list[str]:
    return sorted({name.split(".")[-1] for name in names})[:n]


def _resolve_paca_dtype(config: PaCAConfig, weight_dtype: torch.dtype) -> torch.dtype:
    if config.paca_dtype == "auto":
        return torch.float32 if weight_dtype in _HALF_DTYPES else weight_dtype
    return getattr(torch, config.paca_dtype)


def apply_paca(model: nn.Module, config: PaCAConfig, *, calibration: Optional[Calibration] = None,
               indices: Optional[Mapping[str, torch.Tensor]] = None, weights_later: bool = False) -> nn.Module:
    """Adapt ``model`` in place with PaCA and return it.

    Every targeted layer becomes a `PaCALinear`; every other parameter is frozen (biases train
    when ``config.bias == "all"``).

    Args:
        model: any ``nn.Module``, typically a transformers ``PreTrainedModel``.
        config: what to adapt and how.
        calibration: for ``selection="gradient"``: a batch for ``model(**batch).loss`` or a
            callable ``model -> loss``.
        indices: explicit ``{module name: column indices}`` overriding the selection (used by
            `load_adapter`); its keys are exactly the adapted modules.
        weights_later: the model is on the meta device and whoever calls this fills every weight,
            ``paca_indices``, ``paca_base_columns`` and ``paca_weight`` from a checkpoint
            afterwards (`paca_lightning.parallel.load_pretrained_shards`); needs ``indices``
            (for a selection that reads weights, any r distinct columns: they are replaced).
    """
    already = next(paca_layers(model), None)
    if already is not None:
        raise RuntimeError(f"PaCA is already applied to this model (module {already[0]!r} is a "
                           "PaCALinear); call merge_paca(model) or unload_paca(model) first")
    if indices is not None:
        modules = {**dict(model.named_modules()), **expert_parameters(model)}
        missing = sorted(name for name in indices if name not in modules)
        if missing:
            raise ValueError(f"modules {missing[:5]} do not exist in {type(model).__name__}; close "
                             f"matches: {difflib.get_close_matches(missing[0], list(modules), n=3)}")
        targets = {name: modules[name] for name in indices}
        for name, module in targets.items():
            if not isinstance(module, ExpertParameter) and not is_adaptable(module):
                raise TypeError(f"module {name!r} is a {_not_adaptable_reason(module)}; PaCA adapts nn.Linear, "
                                "Conv1D, bitsandbytes Linear4bit/Linear8bitLt layers and fused expert weights")
    else:
        targets = find_targets(model, config)

    _refuse_shared(model, targets)
    fused = sorted(name for name, module in targets.items() if isinstance(module, ExpertParameter))
    if config.quantize is not None and fused:
        raise ValueError(f"PaCAConfig.quantize={config.quantize!r}: the fused expert weights {fused[:3]} are 3-D "
                         "tensors, which bitsandbytes' Linear4bit/Linear8bitLt cannot hold, so QPaCA cannot "
                         "quantize them. Train them dense (quantize=None), or leave them out with "
                         "exclude_modules=['experts']")
    if config.quantize is not None:
        import_bitsandbytes(f"PaCAConfig.quantize={config.quantize!r}")
    check_quantized_targets(config.selection, config.quantize, targets)
    if weights_later and indices is None:
        raise ValueError("apply_paca(weights_later=True) needs indices= (the columns are chosen where the "
                         "weights are loaded)")
    for name, module in targets.items():
        if module.weight.is_meta and not weights_later:
            raise ValueError(f"module {name!r} has its weight on the meta device (built under torch.device('meta') "
                             "or an empty-init context, or offloaded by accelerate's device_map); PaCA starts "
                             "paca_weight from the pretrained columns, so load the weights onto a real device "
                             "(no disk/CPU offload of adapted layers) before apply_paca")
        rank, in_features = config.rank_for(name), _in_features(module)
        if indices is None and rank > in_features:
            raise ValueError(f"PaCA rank {rank} for module {name!r} exceeds its in_features="
                             f"{in_features}; use rank <= {in_features} (rank_pattern can set "
                             "it per module)")

    for param in model.parameters():
        param.requires_grad_(False)

    if indices is not None:
        chosen = {name: torch.as_tensor(value) for name, value in indices.items()}
    elif config.selection == "gradient":
        if calibration is None:
            raise ValueError("PaCAConfig.selection='gradient' needs apply_paca(..., calibration=batch) "
                             "with a batch holding labels, or a callable model -> loss")
        scores = gradient_scores(model, targets, calibration)
        chosen = {name: top_columns(scores[name], config.rank_for(name)) for name in targets}
    elif config.selection == "weight_norm":
        chosen = {name: top_columns(weight_norm_scores(_dense_weight(m), _transposed(m)), config.rank_for(name))
                  for name, m in targets.items()}
    else:
        chosen = {name: _random_columns(m, config.rank_for(name), config.seed, name) for name, m in targets.items()}

    if config.bias == "all":  # after the selection, so a calibration pass leaves no bias gradients
        for name, param in model.named_parameters():
            if name == "bias" or name.endswith(".bias"):
                param.requires_grad_(True)

    for name, module in targets.items():
        rank = chosen[name].shape[-1]
        scaling = config.alpha_for(name) / rank
        if isinstance(module, ExpertParameter):
            layer = PaCAExpertWeights(module, chosen[name], scaling, _resolve_paca_dtype(config, module.weight.dtype))
            set_submodule(model, name, layer)
            install_paca_forward(module.owner)
            continue
        if weights_later and config.quantize is not None:  # quantized as its weight is loaded
            layer = QuantizedPaCALinear.awaiting_weights(module, chosen[name], scaling, config.quantize,
                                                         _resolve_paca_dtype(config, torch.float32))
        elif config.quantize is not None or is_quantized_linear(module):
            # A quantized base dequantizes to float32 exactly, so "auto" keeps float32 columns.
            layer = quantized_paca_layer(module, chosen[name], scaling, config.quantize,
                                         _resolve_paca_dtype(config, torch.float32), model)
        else:
            layer = PaCALinear(module, chosen[name], scaling,
                               _resolve_paca_dtype(config, module.weight.dtype))
        set_submodule(model, name, layer)
    model.paca_config = config
    return model


def _in_features(unit) -> int:
    return unit.in_features if isinstance(unit, ExpertParameter) else in_features_of(unit)


def _transposed(unit) -> bool:
    return unit.transposed if isinstance(unit, ExpertParameter) else is_conv1d(unit)


def _random_columns(unit, rank: int, seed: int, name: str) -> torch.Tensor:
    """Seeded by (seed, name), and for a fused expert weight by (seed, ``<name>.<expert index>``)."""
    if isinstance(unit, ExpertParameter):
        return torch.stack([random_columns(unit.in_features, rank, seed, f"{name}.{expert}")
                            for expert in range(unit.num_experts)])
    return random_columns(in_features_of(unit), rank, seed, name)


def _dense_weight(module: nn.Module) -> torch.Tensor:
    """The weight as stored, or dequantized to float32 for a bitsandbytes base."""
    return dequantize_weight(module, torch.float32) if is_quantized_linear(module) else module.weight


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule ``name`` of ``model`` by ``module`` (a fused expert weight, a Parameter,
    and its `PaCAExpertWeights` take each other's place the same way)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(module, nn.Module) and child in parent._parameters:
        delattr(parent, child)  # nn.Module refuses to assign a module over a parameter
    setattr(parent, child, module)


def merge_paca(model: nn.Module, *, dtype: Optional[torch.dtype] = None,
               requantize: bool = False) -> nn.Module:
    """Replace every `PaCALinear` by its original layer type holding the trained columns.

    The result is a plain model (``save_pretrained`` works; loading it needs no paca_lightning)
    with zero inference overhead. Works in place and returns ``model``.

    On a bitsandbytes base (QPaCA) the export is dense by default: adapted layers become dense
    layers in ``dtype`` (default: the dtype of the model's other parameters) whose trained
    columns are exactly ``scaling * paca_weight``, layers PaCA did not adapt are dequantized to
    the same dtype, each layer takes the type the architecture has unquantized (a GPT-2
    ``Conv1D`` stays a ``Conv1D``) and the quantization record is dropped, so the checkpoint
    loads with plain transformers. With ``requantize=True`` the adapted layers are quantized again
    in the base's format instead (lossy: trained values are rounded) and the model stays a
    consistent bitsandbytes model. Both options apply to models with QPaCA layers only.
    """
    quantized = [name for name, layer in paca_layers(model) if isinstance(layer, QuantizedPaCALinear)]
    if (dtype is not None or requantize) and not quantized:
        raise ValueError("merge_paca(dtype=..., requantize=...) applies to PaCA layers on a bitsandbytes "
                         "base, and this model has none; call merge_paca(model)")
    export_dtype = dtype or dense_dtype_of(model)
    dense_export = bool(quantized) and not requantize
    conv1d_names = plain_conv1d_names(model) if dense_export else set()
    _release_all(model, merged=True, quantized_export={"dtype": dtype, "requantize": requantize})
    if dense_export:
        dense_export_layers(model, export_dtype, conv1d_names)
        drop_quantization_markers(model)
    return model


def unload_paca(model: nn.Module) -> nn.Module:
    """Remove PaCA and restore the pretrained weights bit for bit; in place, returns ``model``."""
    return _release_all(model, merged=False)


def _release_all(model: nn.Module, merged: bool, quantized_export: Optional[dict] = None) -> nn.Module:
    layers = list(paca_layers(model))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no PaCA layers; apply_paca or load_adapter first")
    for name, layer in layers:
        if not merged:
            set_submodule(model, name, layer.base_module())
        elif isinstance(layer, QuantizedPaCALinear):
            set_submodule(model, name, layer.merged_module(**(quantized_export or {})))
        else:
            set_submodule(model, name, layer.merged_module())
    release_paca_forward(model)
    if "paca_config" in vars(model):
        del model.paca_config
    return model


@contextlib.contextmanager
def disable_paca(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every PaCA layer computes with its pretrained columns.

    Each layer uses a transient copy of its weight with the pretrained columns (one weight-sized
    temporary per layer call); the weight is not written, so graphs built before or inside the
    block backpropagate exactly, e.g. a DPO reference forward between the policy's forward and
    backward.
    """
    layers = [layer for _, layer in paca_layers(model)]
    for layer in layers:
        layer.set_paca_enabled(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.set_paca_enabled(True)


def sync_paca_columns(model: nn.Module) -> None:
    """Write every layer's trained columns into its weight now (see `PaCALinear.auto_sync`)."""
    for layer in _dense_paca_layers(model):
        if layer.paca_enabled:
            layer.sync_columns_()


def set_paca_auto_sync(model: nn.Module, enabled: bool) -> None:
    """Switch forward-time column syncing on or off for every PaCA layer of ``model``.

    Off, the caller must call `sync_paca_columns` after each optimizer step and after loading
    trained values; `PaCACallback` does so. Needed for ``torch.compile`` and FSDP2.
    """
    for layer in _dense_paca_layers(model):
        layer.auto_sync = enabled


class TrainableReport(NamedTuple):
    trainable: int
    total: int
    # weight matrices left entirely frozen outside the embeddings and the output head, as
    # ((name pattern, parameter count), ...): what target_modules did not reach
    untrained: tuple[tuple[str, int], ...] = ()

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        line = (f"trainable params: {self.trainable:,d} || all params: {self.total:,d} || "
                f"trainable%: {self.percent:.4f}")
        if not self.untrained:
            return line
        frozen = sum(count for _, count in self.untrained)
        names = ", ".join(f"{name} ({100 * count / max(self.total, 1):.1f}%)" for name, count in self.untrained[:6])
        more = f" and {len(self.untrained) - 6} more" if len(self.untrained) > 6 else ""
        return (f"{line}\nnot trained: {100 * frozen / max(self.total, 1):.1f}% of all params are weight matrices "
                f"that target_modules leaves frozen: {names}{more}")


def trainable_parameters(model: nn.Module) -> TrainableReport:
    """Counts like peft's ``print_trainable_parameters``; ``str()`` gives its one-line report.

    ``all params`` is the model's own parameter count, as before PaCA: the trained columns
    (``paca_weight``) are values of a weight that is counted already, so they count as trainable
    and not a second time in the total. Quantized weights count their values, not their bytes.
    """
    paca_weights = set()
    weight_values = {}
    for _, layer in paca_layers(model):
        paca_weights.add(id(layer.paca_weight))
        # packed bytes or dense
        weight_values[id(layer.weight)] = getattr(layer, "num_experts", 1) * layer.in_features * layer.out_features
    trainable = total = 0
    untrained: dict[str, int] = {}
    skipped = _embedding_and_head_parameters(model) | set(weight_values)
    for name, param in model.named_parameters():
        if id(param) not in skipped and not param.requires_grad and param.ndim >= 2:
            pattern = re.sub(r"\.\d+\.", ".*.", name)
            untrained[pattern] = untrained.get(pattern, 0) + param.numel()
    for param in model.parameters():
        if id(param) in paca_weights:
            trainable += param.numel() if param.requires_grad else 0
            continue
        count = weight_values.get(id(param), param.numel())
        if id(param) not in weight_values and (hasattr(param, "quant_state") or type(param).__name__ == "Params4bit"):
            count *= 2  # bitsandbytes packs two 4-bit values per stored byte
        total += count
        trainable += count if param.requires_grad else 0
    if not paca_weights:  # a model without PaCA: nothing to say about what PaCA left out
        untrained = {}
    return TrainableReport(trainable, total, tuple(sorted(untrained.items(), key=lambda item: -item[1])))


def _embedding_and_head_parameters(model: nn.Module) -> set[int]:
    """Parameters of embeddings and of the output head: frozen on purpose, never a PaCA target."""
    found = {id(param) for module in model.modules() if isinstance(module, nn.Embedding)
             for param in module.parameters(recurse=False)}
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if isinstance(head, nn.Module):
        found |= {id(param) for param in head.parameters()}
    return found
