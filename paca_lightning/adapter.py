"""Adapter files: ``adapter_config.json`` + ``adapter_model.safetensors`` (no pickle).

The safetensors file holds, for each adapted module ``m``, ``m.paca_weight`` (out x r, in its
training dtype) and ``m.paca_indices`` (int32), plus every other trainable parameter under its
own name (biases with ``bias="all"``). The JSON file holds the `PaCAConfig`, the format version
and, per module, the shapes and scaling that loading checks against the base model.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ._version import __version__
from .atomic import atomic_write
from .config import PaCAConfig
from .experts import PaCAExpertWeights, expert_parameters
from .layers import in_features_of, is_conv1d, out_features_of
from .model import apply_paca, paca_layers, sync_paca_columns

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "paca-lightning-adapter"
FORMAT_VERSION = 1

PathLike = Union[str, os.PathLike]


def adapter_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The adapter's tensors and JSON description, without touching the disk."""
    layers = dict(paca_layers(model))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no PaCA layers to save; call apply_paca first")
    config = getattr(model, "paca_config", None)
    if not isinstance(config, PaCAConfig):
        raise ValueError("the model has PaCA layers but no paca_config; was it adapted with apply_paca?")
    tensors: dict[str, torch.Tensor] = {}
    modules = {}
    for name, layer in layers.items():
        tensors[f"{name}.paca_weight"] = layer.paca_weight.detach()
        tensors[f"{name}.paca_indices"] = layer.paca_indices.to(torch.int32)
        modules[name] = {"rank": layer.rank, "scaling": layer.scaling, "in_features": layer.in_features,
                         "out_features": layer.out_features, "layout": _layout(layer)}
        if isinstance(layer, PaCAExpertWeights):
            modules[name]["num_experts"] = layer.num_experts
    extra = [name for name, param in model.named_parameters()
             if param.requires_grad and not name.endswith(".paca_weight")]
    params = dict(model.named_parameters())
    for name in extra:
        tensors[name] = params[name].detach()
    description = {"format": FORMAT, "format_version": FORMAT_VERSION,
                   "paca_lightning_version": __version__, "config": config.to_dict(),
                   "modules": modules, "extra_parameters": extra}
    return {k: v.contiguous().cpu() for k, v in tensors.items()}, description


def _layout(layer) -> str:
    if isinstance(layer, PaCAExpertWeights):  # fused expert weight: experts x out x in (or x in x out)
        return "experts_transposed" if layer.transposed else "experts"
    return "conv1d" if layer.transposed else "linear"


def save_adapter(model: nn.Module, directory: PathLike) -> Path:
    """Write the adapter of ``model`` to ``directory``; each file appears atomically."""
    tensors, description = adapter_state(model)
    return write_adapter(tensors, description, directory)


def write_adapter(tensors: dict[str, torch.Tensor], description: dict[str, Any], directory: PathLike) -> Path:
    """Write tensors and description from `adapter_state` (or a sharded run's gathered copy)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / WEIGHTS_NAME, lambda path: save_file(tensors, path, metadata={"format": FORMAT}))
    # safetensors checks its header, not the tensor bytes: the checksum catches flipped bits
    description = {**description, "weights_sha256": _sha256(directory / WEIGHTS_NAME)}
    atomic_write(directory / CONFIG_NAME, lambda path: Path(path).write_text(json.dumps(description, indent=2) + "\n"))
    return directory


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_adapter(directory: PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and validate both adapter files; errors name the file and what is wrong."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; an adapter directory written by "
                                    f"save_adapter holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        description = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_path} is not valid JSON: {error}") from None
    if not isinstance(description, dict) or description.get("format") != FORMAT:
        raise ValueError(f"{config_path} is not a paca-lightning adapter config "
                         f"(expected \"format\": \"{FORMAT}\")")
    version = description.get("format_version")
    if type(version) is not int or not 1 <= version <= FORMAT_VERSION:
        raise ValueError(f"{config_path} has format_version {version!r}; this paca-lightning "
                         f"{__version__} reads format_version 1 to {FORMAT_VERSION}. Upgrade paca-lightning to load a "
                         "newer one")
    for key, kind in (("config", dict), ("modules", dict), ("extra_parameters", list)):
        if not isinstance(description.get(key), kind):
            found = f"a {type(description[key]).__name__}" if key in description else "missing"
            raise ValueError(f"{config_path}: the {key!r} entry is {found}, expected a JSON "
                             f"{'object' if kind is dict else 'list'}")
    for name, meta in description["modules"].items():
        _check_module_entry(config_path, name, meta)
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{weights_path} is truncated or corrupt ({error}); re-save the adapter") from None
    recorded = description.get("weights_sha256")  # absent in files of earlier versions
    if recorded is not None and recorded != _sha256(weights_path):
        raise ValueError(f"{weights_path} does not match the checksum {config_path} records for it: the file was "
                         "modified or corrupted after it was saved (re-save or re-copy the adapter)")
    expected = {f"{m}.{part}" for m in description["modules"] for part in ("paca_weight", "paca_indices")}
    expected |= set(description["extra_parameters"])
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise ValueError(f"{weights_path} does not match {config_path}: missing tensors {missing[:5]}, "
                         f"unexpected tensors {unexpected[:5]}")
    layouts = {f"{name}.paca_indices": meta["layout"] for name, meta in description["modules"].items()}
    for key, tensor in tensors.items():
        if key.endswith(".paca_indices"):
            ndim = 2 if layouts.get(key, "").startswith("experts") else 1  # experts: a row of columns per expert
            if tensor.dtype not in (torch.int32, torch.int64) or tensor.ndim != ndim:
                raise ValueError(f"{weights_path}: {key} is a {tensor.dtype} tensor of shape {tuple(tensor.shape)}; "
                                 f"column indices are a {ndim}-D int32 or int64 tensor")
        elif not tensor.is_floating_point():
            raise ValueError(f"{weights_path}: {key} is a {tensor.dtype} tensor; trained values are floating point")
        elif not torch.isfinite(tensor).all():
            raise ValueError(f"{weights_path}: {key} holds NaN or infinite values; this adapter cannot be used")
    return description, tensors


LAYOUTS = ("linear", "conv1d", "experts", "experts_transposed")
_MODULE_FIELDS = {"rank": int, "scaling": (int, float), "in_features": int, "out_features": int, "layout": str}


def _check_module_entry(config_path: Path, name: str, meta: Any) -> None:
    if not isinstance(meta, dict):
        raise ValueError(f"{config_path}: modules[{name!r}] is {meta!r}, expected a JSON object "
                         f"with {sorted(_MODULE_FIELDS)}")
    for field, kinds in _MODULE_FIELDS.items():
        value = meta.get(field)
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise ValueError(f"{config_path}: modules[{name!r}][{field!r}] is {value!r}, expected "
                             f"{'a string' if kinds is str else 'a number'}")
    if meta["layout"] not in LAYOUTS:
        raise ValueError(f"{config_path}: modules[{name!r}]['layout'] is {meta['layout']!r}, expected one of "
                         f"{list(LAYOUTS)}")


def _check_expert_shapes(name: str, meta: dict, target, paca: torch.Tensor, weights_path: Path) -> None:
    found = (meta.get("num_experts"), meta["in_features"], meta["out_features"])
    expected = (target.num_experts, target.in_features, target.out_features)
    if found != expected:
        raise ValueError(f"adapter module {name!r} was trained on (experts, in_features, out_features)={found}, "
                         f"but the model's fused expert weight has {expected}; load the adapter onto the base "
                         "model it was trained on")
    if tuple(paca.shape) != (expected[0], expected[2], meta["rank"]):
        raise ValueError(f"{weights_path}: {name}.paca_weight has shape {tuple(paca.shape)}, "
                         f"expected {(expected[0], expected[2], meta['rank'])}")


def load_adapter(model: nn.Module, directory: PathLike, *, trainable: bool = True) -> nn.Module:
    """Apply the adapter saved in ``directory`` to a fresh base ``model``; in place, returns it.

    The result computes exactly what the saved model computed (the same columns, the same
    trainable values, bit for bit). With ``trainable=False`` nothing requires grad.
    """
    description, tensors = read_adapter(directory)
    config = PaCAConfig.from_dict(description["config"])
    modules = dict(model.named_modules())
    experts = expert_parameters(model)
    weights_path = Path(directory) / WEIGHTS_NAME
    for name, meta in description["modules"].items():
        if name in experts:
            _check_expert_shapes(name, meta, experts[name], tensors[f"{name}.paca_weight"], weights_path)
            continue
        if name not in modules:
            continue  # apply_paca reports every missing name with close matches
        module = modules[name]
        if not (is_conv1d(module) or isinstance(module, nn.Linear)):
            raise TypeError(f"adapter module {name!r} is a {type(module).__name__}, not a Linear or Conv1D layer")
        out_features = out_features_of(module)
        if (in_features_of(module), out_features) != (meta["in_features"], meta["out_features"]):
            raise ValueError(f"adapter module {name!r} was trained on in_features={meta['in_features']}, "
                             f"out_features={meta['out_features']}, but the model's layer has "
                             f"in_features={in_features_of(module)}, out_features={out_features}; "
                             "load the adapter onto the base model it was trained on")
        paca = tensors[f"{name}.paca_weight"]
        if tuple(paca.shape) != (meta["out_features"], meta["rank"]):
            raise ValueError(f"{weights_path}: {name}.paca_weight has shape {tuple(paca.shape)}, "
                             f"expected {(meta['out_features'], meta['rank'])}")
    # apply_paca keeps indices sorted; a file listing them in another order keeps its columns in
    # that order, so both are put in sorted order together
    # (per expert for fused expert weights: the last dimension holds the columns)
    order = {name: tensors[f"{name}.paca_indices"].to(torch.int64).argsort(-1) for name in description["modules"]}
    indices = {name: tensors[f"{name}.paca_indices"].to(torch.int64).gather(-1, order[name])
               for name in description["modules"]}
    apply_paca(model, config, indices=indices)

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, layer in paca_layers(model):
            expected_scaling = description["modules"][name]["scaling"]
            if layer.scaling != expected_scaling:
                raise ValueError(f"adapter module {name!r}: config gives scaling {layer.scaling}, "
                                 f"the file records {expected_scaling}")
            columns = tensors[f"{name}.paca_weight"]
            layer.paca_weight.copy_(columns.gather(-1, order[name].unsqueeze(-2).expand_as(columns)))
        for name in description["extra_parameters"]:
            if name not in params:
                raise ValueError(f"{weights_path} holds parameter {name!r}, which the model lacks")
            if params[name].shape != tensors[name].shape:
                raise ValueError(f"{weights_path}: {name} has shape {tuple(tensors[name].shape)}, "
                                 f"the model's is {tuple(params[name].shape)}")
            params[name].copy_(tensors[name])
    sync_paca_columns(model)
    if not trainable:
        for param in model.parameters():
            param.requires_grad_(False)
    return model
