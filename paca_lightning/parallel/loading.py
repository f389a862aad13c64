"""Build a PaCA model on the meta device, shard it with FSDP2, then fill the shards from disk.

`sharded_paca_model` is the whole path; its steps are public for callers (the Lightning module)
that run them at different moments:

1. `build_on_meta`: the transformers model from its ``config.json``, no weight allocated.
2. `apply_paca_on_meta`: PaCA layers with the right shapes; the column indices are
   placeholders when the selection reads weights (``weight_norm``).
3. `shard_paca_model` (fsdp2.py): ``fully_shard`` works on meta parameters.
4. `load_pretrained_shards`: ``to_empty`` allocates each rank's shards only; rank 0 reads the
   safetensors files one at a time and ``set_model_state_dict(full_state_dict=True,
   broadcast_from_rank0=True)`` sends each tensor in turn, every rank keeping its own rows.

Rank 0 also computes PaCA's own state from each full weight as it streams past: the columns
(``random``: from the seed; ``weight_norm``: from the loaded weight), the pretrained columns
and ``paca_weight = W[:, S] / s``, with the same formula as a whole-model `apply_paca`
(`paca_lightning.layers.initial_columns`), so they are bit for bit those of a single process.
So no rank ever holds more than its shards plus one full tensor in flight, and rank 0 one
safetensors file on top.

QPaCA (``PaCAConfig.quantize``): the meta build holds `QuantizedPaCALinear` layers awaiting their
weights (`QuantizedPaCALinear.awaiting_weights`: packed-byte shapes, no values). Rank 0 builds
each one's real layer from the full weight as it streams past, exactly as a whole-model
`apply_paca` does (columns chosen on the 16-bit weight, then bitsandbytes quantizes it on the
CPU), and sends its packed bytes (sharded like any parameter), its quantization state (the
layer's ``_extra_state``, whole on every rank), pretrained columns and ``paca_weight``. No rank
ever holds the 16-bit model: rank 0 holds one 16-bit weight at a time.

Why rank 0 streams rather than every rank reading its own rows (``safe_open().get_slice``),
measured by `paca_lightning.bench.sharded_loading` (figures in docs/multi-gpu-memory.md): for
dense Linear layers row reads work (a rank's rows of ``W`` are its rows of ``W[:, S]``; the
``weight_norm`` column norms need an all-reduce of per-column sums of squares, the whole
``paca_base_columns`` buffer an all-gather) and loaded in 0.5-0.6x the time on 2 CPU processes,
with the same anonymous memory per rank. They are not used because they cover only that case:
QPaCA's packed bytes are not row slices of the 16-bit tensor, and bitsandbytes' double
quantization offsets every block's scale by the mean of all block maxima of the whole weight, so
only the whole weight gives the bytes a single process quantizes; norms summed in another order
are not bit for bit ``torch.norm`` of the whole column, so ``weight_norm`` could choose another
column at a near tie; and a GPT-2 Conv1D shard (dim 1) is a strided read of every row. One reader
that sees each full tensor is bit-identical to a single process by construction.

Not covered: ``selection="gradient"`` (needs a calibration pass on the loaded model), models
already quantized on disk (a bitsandbytes checkpoint), and model types whose checkpoint
transformers converts on load (`converted_on_load`); all are refused here, and
`PaCAFineTuneModule` loads them whole under FSDP2, saying why. DDP needs the whole model in
every process and does not use this.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from ..config import PaCAConfig
from ..experts import ExpertParameter
from ..layers import in_features_of, initial_columns
from ..model import apply_paca, find_targets, paca_layers, sync_paca_columns
from ..quantized import QuantizedPaCALinear, quantize_linear
from ..selection import random_columns, top_columns, weight_norm_scores
from .fsdp2 import shard_paca_model

SUPPORTED_SELECTIONS = ("random", "weight_norm")


def safetensors_files(checkpoint: Union[str, Path]) -> list[Path]:
    """The safetensors files of a saved transformers model folder: ``model.safetensors``, or the
    files ``model.safetensors.index.json`` names, in that order."""
    folder = Path(checkpoint)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = dict.fromkeys(json.loads(index.read_text())["weight_map"].values())
        return [folder / name for name in names]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"{folder} holds neither model.safetensors nor model.safetensors.index.json; "
                            "sharded loading reads a model saved by save_pretrained (safe_serialization)")


def converted_on_load(checkpoint: Union[str, Path]) -> bool:
    """Whether transformers rewrites this model type's checkpoint tensors when loading them
    (e.g. Mixtral's experts fused into one tensor in transformers 5): their names and shapes in
    the files are then not the model's, and only ``from_pretrained`` can load them."""
    from transformers import AutoConfig

    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:  # transformers 4 loads checkpoint tensors as they are named
        return False
    return bool(get_checkpoint_conversion_mapping(AutoConfig.from_pretrained(checkpoint).model_type))


def build_on_meta(checkpoint: Union[str, Path], dtype: torch.dtype = torch.float32) -> nn.Module:
    """The causal LM described by ``<checkpoint>/config.json`` with every parameter and buffer on
    the meta device, in training mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(checkpoint)
    if converted_on_load(checkpoint):
        raise ValueError(f"transformers converts the checkpoint tensors of model type {config.model_type!r} when "
                         f"loading them ({checkpoint}), so they cannot be streamed into shards as saved; load "
                         "the whole model with from_pretrained instead")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.train()


def apply_paca_on_meta(model: nn.Module, config: PaCAConfig) -> nn.Module:
    """`apply_paca` on a meta-device model: the shapes are right, the values come from
    `load_pretrained_shards`. ``random`` columns are chosen now (they need no weights)."""
    if config.selection not in SUPPORTED_SELECTIONS:
        raise ValueError(f"PaCAConfig.selection={config.selection!r} needs the loaded model (a calibration "
                         f"pass), so it cannot be used with sharded loading; use one of {SUPPORTED_SELECTIONS}, "
                         "or load the whole model in each process")
    indices = {}
    for name, module in find_targets(model, config).items():
        if isinstance(module, ExpertParameter):
            raise NotImplementedError(f"sharded loading does not fill fused MoE expert weights such as {name!r} yet; "
                                      "load the whole model in each process, or exclude the experts "
                                      "(exclude_modules=['experts'])")
        rank, in_features = config.rank_for(name), in_features_of(module)
        if rank > in_features:
            raise ValueError(f"PaCA rank {rank} for module {name!r} exceeds its in_features={in_features}")
        indices[name] = (random_columns(in_features, rank, config.seed, name) if config.selection == "random"
                         else torch.arange(rank))  # placeholder: weight_norm picks from the loaded weight
    return apply_paca(model, config, indices=indices, weights_later=True)


def _restore_non_persistent_buffers(model: nn.Module, names: list[str]) -> None:
    """Buffers kept out of checkpoints (rotary ``inv_freq``) are computed, not loaded: a
    transformers model recomputes them with its own ``_init_weights``."""
    if not names:
        return
    if not hasattr(model, "_init_weights"):
        raise TypeError(f"{type(model).__name__} has buffers that are not saved in checkpoints ({names[:3]}) "
                        "and no transformers _init_weights to compute them after a meta-device build")
    owners = {name.rpartition(".")[0] for name in names}
    with torch.no_grad():
        for owner in owners:
            model._init_weights(model.get_submodule(owner))


def _chosen_columns(name: str, layer, weight: torch.Tensor, config: PaCAConfig) -> torch.Tensor:
    if config.selection == "weight_norm":
        return top_columns(weight_norm_scores(weight, layer.transposed), layer.rank)
    # the layer's own buffer was emptied by to_empty: the same seeded draw as apply_paca_on_meta
    return random_columns(layer.in_features, layer.rank, config.seed, name)


def _paca_state(name: str, layer, weight: torch.Tensor, config: PaCAConfig) -> dict[str, torch.Tensor]:
    """The state apply_paca gives layer ``name`` on a whole model whose weight is ``weight``."""
    if isinstance(layer, QuantizedPaCALinear):
        return _quantized_paca_state(name, layer, weight, config)
    weight = weight.to(layer.weight.dtype)
    indices = _chosen_columns(name, layer, weight, config)
    columns, paca_weight = initial_columns(weight, indices, layer.transposed, layer.scaling,
                                           layer.paca_weight.dtype)
    return {f"{name}.paca_indices": indices, f"{name}.paca_base_columns": columns,
            f"{name}.paca_weight": paca_weight, f"{name}.weight": weight}


def _quantized_paca_state(name: str, layer: QuantizedPaCALinear, weight: torch.Tensor,
                          config: PaCAConfig) -> dict[str, torch.Tensor]:
    """QPaCA: the layer a whole-model `apply_paca` builds from ``weight``, built here on rank 0
    (columns chosen on the full-precision weight, then quantized exactly as there), and its state:
    packed bytes, quantization state, pretrained columns and ``paca_weight``. Only this one
    weight is ever held in 16 bits."""
    weight = weight.to(layer.merge_dtype)
    indices = _chosen_columns(name, layer, weight, config)
    linear = nn.Linear(layer.in_features, layer.out_features, bias=False, dtype=weight.dtype, device=weight.device)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    real = QuantizedPaCALinear(quantize_linear(linear, config.quantize), indices, layer.scaling,
                               layer.paca_weight.dtype, layer.merge_dtype)
    return real.state_dict(prefix=f"{name}.")


def _tied_aliases(model: nn.Module) -> set[str]:
    """Names of parameters that are another name's tensor (tied embeddings): saved once."""
    seen, aliases = set(), set()
    for name, param in model.named_parameters(remove_duplicate=False):
        (aliases if id(param) in seen else seen).add(name if id(param) in seen else id(param))
    return aliases


def _tensor_keys(model: nn.Module) -> set[str]:
    """The parameter and persistent buffer keys of ``model.state_dict()``, without calling it: a
    QPaCA layer awaiting its weights has no quantization state to serialize yet."""
    keys = set()
    for owner, module in model.named_modules(remove_duplicate=False):
        prefix = f"{owner}." if owner else ""
        keys |= {prefix + name for name, param in module._parameters.items() if param is not None}
        keys |= {prefix + name for name, buffer in module._buffers.items()
                 if buffer is not None and name not in module._non_persistent_buffers_set}
    return keys


def _check_keys(model: nn.Module, files: list[Path]) -> None:
    """Every rank: each model tensor is in exactly one file, and no file has a tensor the model
    lacks (read from the file headers only)."""
    from safetensors import safe_open

    derived = (".paca_indices", ".paca_base_columns", ".paca_weight")
    expected = {k for k in _tensor_keys(model) if not k.endswith(derived)} - _tied_aliases(model)
    found: dict[str, Path] = {}
    for path in files:
        with safe_open(path, "pt") as handle:
            for key in handle.keys():
                if key in found:
                    raise ValueError(f"tensor {key!r} is in both {found[key]} and {path}")
                found[key] = path
    missing, unexpected = sorted(expected - set(found)), sorted(set(found) - expected)
    if missing or unexpected:
        raise ValueError(f"the checkpoint {files[0].parent} does not match {type(model).__name__}: missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]}; give the folder the model was saved to with "
                         "save_pretrained")


@torch.no_grad()
def load_pretrained_shards(model: nn.Module, checkpoint: Union[str, Path],
                           device: Optional[torch.device] = None) -> nn.Module:
    """Fill a model built by `build_on_meta`, `apply_paca_on_meta` and `shard_paca_model` from the
    safetensors files in ``checkpoint``; a collective (every rank calls it). See the module
    docstring for who reads what."""
    from safetensors import safe_open
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    config = getattr(model, "paca_config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no PaCA layers; call apply_paca_on_meta before loading")
    files = safetensors_files(checkpoint)
    _check_keys(model, files)
    if device is None:  # gloo computes on the CPU; other backends on this process's accelerator
        accelerator = torch.accelerator.current_accelerator()
        device = (torch.device("cpu") if dist.get_backend() == "gloo" or accelerator is None
                  else torch.device(accelerator.type, torch.accelerator.current_device_index()))
    non_persistent = [f"{owner}.{buffer}" if owner else buffer for owner, module in model.named_modules()
                      for buffer in module._non_persistent_buffers_set]
    model.to_empty(device=device)
    _restore_non_persistent_buffers(model, non_persistent)
    layers = {f"{name}.weight": (name, layer) for name, layer in paca_layers(model)}
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    for path in files:
        state: dict[str, torch.Tensor] = {}
        if dist.get_rank() == 0:
            with safe_open(path, "pt") as handle:
                for key in handle.keys():
                    tensor = handle.get_tensor(key)
                    if key in layers:
                        state.update(_paca_state(*layers[key], tensor, config))
                    else:
                        state[key] = tensor
        set_model_state_dict(model, state, options=options)
        del state
    sync_paca_columns(model)  # a whole-model apply_paca writes s * P into W as well
    return model


def sharded_paca_model(checkpoint: Union[str, Path], config: PaCAConfig, mesh=None, *,
                       dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None,
                       **shard_kwargs) -> nn.Module:
    """A PaCA model sharded with FSDP2 whose ranks never hold the whole model: build on meta,
    adapt, shard (``shard_kwargs``: see `shard_paca_model`), then load (`load_pretrained_shards`)."""
    model = apply_paca_on_meta(build_on_meta(checkpoint, dtype), config)
    shard_paca_model(model, mesh, **shard_kwargs)
    return load_pretrained_shards(model, checkpoint, device)
