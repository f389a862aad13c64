"""Gathering a sharded or replicated PaCA model: adapter files and merged exports.

Every function here is a collective (every rank calls it) and works for FSDP2, FSDP1
(``use_orig_params=True``), DDP and plain models. Names are the model's own, without the parts
wrappers insert. Adapter saves gather every rank's shard of the trainable columns
(`save_sharded_adapter`); merged exports gather the full state dict and write it from rank 0
(`export_merged`).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from ..adapter import adapter_state, write_adapter
from ..atomic import atomic_directory_write, publish_directory, temporary_directory_for
from ..experts import PaCAExpertWeights
from ..model import paca_layers
from ..quantized import (
    QuantizedPaCALinear,
    dense_dtype_of,
    dequantize_weight,
    is_quantized_linear,
    plain_conv1d_names,
)

# Names wrappers insert into module paths; adapters and exports use the model's own names.
_WRAPPER_NAME_PARTS = re.compile(r"(?:^|(?<=\.))(?:_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)\.")


def clean_name(name: str) -> str:
    """A parameter or module name without the parts wrappers insert (FSDP1, checkpoint wrappers,
    ``torch.compile``), i.e. the name a state dict uses."""
    return _WRAPPER_NAME_PARTS.sub("", name)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _inner_model(model: nn.Module) -> nn.Module:
    """The user's model under DDP/FSDP1 root wrappers (FSDP2 wraps in place: same object)."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    while isinstance(model, (FullyShardedDataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    return model


def _fsdp1_root(model: nn.Module, root: Optional[nn.Module]) -> Optional[nn.Module]:
    """``root`` if given, else ``model`` itself when it is an FSDP1 wrapper."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    return root if root is not None or not isinstance(model, FullyShardedDataParallel) else model


def _full_tensors(model: nn.Module, root: Optional[nn.Module], keep: Callable[[str], bool],
                  rank0_only: bool) -> dict[str, torch.Tensor]:
    """Whole CPU copies of ``model``'s parameters and buffers whose cleaned name passes ``keep``.

    A collective. FSDP2 DTensors are all-gathered one at a time; FSDP1 units are unsharded with
    ``summon_full_params`` on ``root`` (the outermost FSDP1 wrapper, which owns the parameters
    outside the wrapped blocks). With ``rank0_only`` only rank 0 keeps the copies.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    def named():  # what a state dict holds: parameters and persistent buffers
        buffers = [(f"{prefix}.{name}" if prefix else name, tensor)
                   for prefix, module in model.named_modules(remove_duplicate=False)
                   for name, tensor in module._buffers.items()
                   if tensor is not None and name not in module._non_persistent_buffers_set]
        return [(clean_name(n), t) for n, t in (*model.named_parameters(remove_duplicate=False), *buffers)]

    fsdp1_root = root if root is not None else model
    keeper = not rank0_only or _rank() == 0
    if any(isinstance(m, FullyShardedDataParallel) for m in fsdp1_root.modules()):
        on_accelerator = any(p.device.type != "cpu" for p in fsdp1_root.parameters())
        # offload_to_cpu only off-CPU: on CPU it is useless, and under gloo it crashes.
        with FullyShardedDataParallel.summon_full_params(fsdp1_root, writeback=False, rank0_only=rank0_only,
                                                         offload_to_cpu=on_accelerator and rank0_only):
            return {n: t.detach().cpu().clone() for n, t in named() if keep(n)} if keeper else {}
    tensors = {}
    for name, tensor in named():
        if keep(name):
            full = _full(tensor).detach()
            if keeper:
                tensors[name] = full.cpu().clone()
    return tensors


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def gather_adapter_state(model: nn.Module, root: Optional[nn.Module] = None
                         ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The adapter (as `paca_lightning.adapter.adapter_state`) with every rank's shard gathered.

    A collective: every rank must call it, and every rank gets the full tensors (small: the
    trainable columns only). Works for FSDP2, FSDP1 (``use_orig_params=True``), DDP and plain
    models; names are the model's own, without wrapper prefixes.

    Args:
        model: the PaCA model (or a DDP/FSDP1 wrapper of it).
        root: the outermost FSDP1 wrapper when ``model`` sits inside it (under Lightning's FSDP
            strategy: ``trainer.strategy.model``); ignored otherwise.
    """
    inner, root = _inner_model(model), _fsdp1_root(model, root)
    _, description = adapter_state(inner)
    description["modules"] = {clean_name(name): meta for name, meta in description["modules"].items()}
    description["extra_parameters"] = [clean_name(name) for name in description["extra_parameters"]]
    wanted = {f"{m}.{part}" for m in description["modules"] for part in ("paca_weight", "paca_indices")}
    wanted |= set(description["extra_parameters"])
    tensors = _full_tensors(inner, root, lambda name: name in wanted, rank0_only=False)
    for name in tensors:
        if name.endswith(".paca_indices"):
            tensors[name] = tensors[name].to(torch.int32)
    return tensors, description


def save_sharded_adapter(model: nn.Module, directory: Union[str, Path], root: Optional[nn.Module] = None) -> Path:
    """`save_adapter` for a sharded or replicated model: gathers every rank's shard, rank 0 writes.

    A collective: every rank must call it (a rank-0-only call would hang, or, with a plain
    ``state_dict()``, save rank 0's rows only). ``root`` as in `gather_adapter_state`.
    """
    tensors, description = gather_adapter_state(model, root)
    if _rank() == 0:
        write_adapter(tensors, description, directory)
    _barrier()
    return Path(directory)


def merged_state_dict(model: nn.Module, root: Optional[nn.Module] = None) -> dict[str, torch.Tensor]:
    """The merged model's full state dict on rank 0 (an empty dict elsewhere): the trained
    columns written into the weights from ``paca_weight``, PaCA's tensors dropped, wrapper
    prefixes removed; bitsandbytes weights dequantized, so the result is a dense model. A
    collective; ``root`` as in `gather_adapter_state`."""
    inner, root = _inner_model(model), _fsdp1_root(model, root)
    state = _full_tensors(inner, root, lambda name: True, rank0_only=True)
    if _rank() != 0:
        return {}
    layers = {clean_name(name): layer for name, layer in paca_layers(inner)}
    _merge_columns(state, layers)
    dequantized = {name for name, layer in layers.items() if isinstance(layer, QuantizedPaCALinear)}
    for name, module in inner.named_modules():
        if is_quantized_linear(module):  # a bitsandbytes layer PaCA did not adapt (DDP, one process)
            state[f"{clean_name(name)}.weight"] = dequantize_weight(module, dense_dtype_of(inner)).cpu()
            dequantized.add(clean_name(name))
    _conv1d_layout(state, dequantized, inner)
    return state


def _conv1d_layout(state: dict[str, torch.Tensor], dequantized: set[str], inner: nn.Module) -> None:
    """Dequantized weights are out x in; a layer the architecture has as a GPT-2 ``Conv1D``
    stores its weight in x out, as the model's config expects when the export is loaded."""
    if dequantized:
        for name in dequantized & plain_conv1d_names(inner):
            if f"{name}.weight" in state:
                state[f"{name}.weight"] = state[f"{name}.weight"].t().contiguous()


def _merge_columns(state: dict[str, torch.Tensor], layers: dict) -> None:
    """Write each PaCA layer's trained columns into its whole weight in ``state`` and drop
    PaCA's tensors (QPaCA weights are dequantized first): the merged model's tensors."""
    for name, layer in layers.items():
        prefix = f"{name}." if name else ""
        weight = state[prefix + "weight"]
        if isinstance(layer, QuantizedPaCALinear):  # QPaCA: the dense weight, as merge_paca exports it
            weight = state[prefix + "weight"] = layer.dequantize_packed(weight, layer.merge_dtype).cpu()
            if prefix + "bias" in state:
                state[prefix + "bias"] = state[prefix + "bias"].to(layer.merge_dtype)
        indices = state.pop(prefix + "paca_indices")
        columns = (state.pop(prefix + "paca_weight") * layer.scaling).to(weight.dtype)
        state.pop(prefix + "paca_base_columns")
        if isinstance(layer, PaCAExpertWeights):  # merged, the fused weight is the parameter `name` itself
            state[name] = state.pop(prefix + "weight")
            dim, index = layer.column_index(indices, weight.shape[0])
            weight.scatter_(dim, index, columns.transpose(1, 2) if layer.transposed else columns)
        elif layer.transposed:
            weight.index_copy_(0, indices, columns.t())
        else:
            weight.index_copy_(1, indices, columns)


def export_merged(model: nn.Module, directory: Union[str, Path], *, root: Optional[nn.Module] = None,
                  tokenizer: Any = None) -> Path:
    """Write the merged model of a sharded run from rank 0 with ``save_pretrained``.

    A collective: every rank calls it. Rank 0 builds an empty (meta) model of the original
    transformers class from the model's ``config``, assigns the merged weights to it (no copy)
    and saves it with ``tokenizer``: loading the result needs no paca_lightning.

    An FSDP2 model is gathered and written one decoder layer at a time (one safetensors file
    each, plus the index ``save_pretrained`` writes), so rank 0 never holds the whole merged
    model; model types whose checkpoint transformers converts on save take the path above.
    """
    inner = _inner_model(model)
    config = getattr(inner, "config", None)
    if config is None or not hasattr(inner, "save_pretrained"):
        raise TypeError(f"{type(inner).__name__} is not a transformers model; export_merged writes "
                        "save_pretrained folders. Use merged_state_dict(model) and save it yourself")
    if any(isinstance(p, DTensor) for p in inner.parameters()) and _saved_as_named(inner):
        _export_merged_by_layer(inner, Path(directory), config, tokenizer)
        _barrier()
        return Path(directory)
    state = merged_state_dict(model, root)
    if _rank() == 0:
        # fully_shard swaps the class for an "FSDP<Name>" subclass; build the user's class.
        from torch.distributed.fsdp import FSDPModule
        model_class = next(c for c in type(inner).__mro__ if not issubclass(c, FSDPModule))
        if hasattr(config, "quantization_config"):
            # the merged weights are dense: a saved quantization_config would quantize them again
            config = copy.deepcopy(config)
            del config.quantization_config
        with torch.device("meta"):
            plain = model_class._from_config(config)
        plain.load_state_dict(state, strict=True, assign=True)

        def write(folder: Path) -> None:
            plain.save_pretrained(str(folder))
            if tokenizer is not None:
                tokenizer.save_pretrained(str(folder))

        atomic_directory_write(directory, write)
    _barrier()
    return Path(directory)


def _saved_as_named(model: nn.Module) -> bool:
    """Whether ``save_pretrained`` writes this model's tensors under their own names and shapes
    (no conversion mapping in transformers, e.g. Mixtral's fused experts in transformers 5)."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:
        return True
    return not get_checkpoint_conversion_mapping(getattr(model.config, "model_type", None))


def _export_merged_by_layer(inner: nn.Module, directory: Path, config, tokenizer: Any) -> None:
    """Gather, merge and write one FSDP2 unit (decoder layer) at a time, then the rest
    (embeddings, norm, head), into ``model-0000k-of-0000n.safetensors`` files and their index;
    a tied name is written once."""
    from safetensors.torch import save_file
    from torch.distributed.fsdp import FSDPModule

    # the units fully_shard made below the root: the decoder layers `shard_paca_model` shards
    prefixes = [clean_name(name) + "." for name, module in inner.named_modules()
                if name and isinstance(module, FSDPModule)]
    seen, aliases = set(), set()
    for name, param in inner.named_parameters(remove_duplicate=False):
        (aliases.add(clean_name(name)) if id(param) in seen else seen.add(id(param)))
    groups = [lambda n, p=p: n.startswith(p) for p in prefixes]
    groups.append(lambda n: not any(n.startswith(p) for p in prefixes))
    layers = {clean_name(name): layer for name, layer in paca_layers(inner)}
    weight_map, total = {}, 0
    # rank 0 writes into a private folder, published once complete: no finished-looking half export
    final, directory = directory, (temporary_directory_for(directory) if _rank() == 0 else directory)
    for number, in_group in enumerate(groups, start=1):
        state = _full_tensors(inner, None, lambda n, g=in_group: g(n) and n not in aliases, rank0_only=True)
        if _rank() != 0:
            continue
        in_this_group = {n: layer for n, layer in layers.items() if in_group(f"{n}.weight")}
        _merge_columns(state, in_this_group)
        _conv1d_layout(state, {n for n, layer in in_this_group.items() if isinstance(layer, QuantizedPaCALinear)},
                       inner)
        filename = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: t.contiguous() for n, t in state.items()}, directory / filename, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(state, filename))
        total += sum(t.numel() * t.element_size() for t in state.values())
        del state
    if _rank() == 0:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        if hasattr(config, "quantization_config"):
            config = copy.deepcopy(config)
            del config.quantization_config
        config.save_pretrained(str(directory))
        generation = getattr(inner, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(str(directory))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(directory))
        publish_directory(directory, final)
