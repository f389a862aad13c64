"""LoRA on `PaCAFineTuneModule`'s training path, for comparing PaCA against the method it replaces.

``PaCAFineTuneModule(model, method="lora", lora=LoRASettings(rank=8))`` trains a peft LoRA
adapter with the same loss, optimizer, schedule, logging and data as a PaCA run, so the two
differ only in the adapter. The paper (Woo et al., Sec. 4) compares LoRA rank ``r`` with PaCA
rank ``2r``: a LoRA layer trains ``r * (in + out)`` values, a PaCA layer ``2r * out``, equal
for square weights, so the comparison holds the trainable-parameter budget fixed.

peft is optional (``pip install peft`` or ``pip install 'paca-lightning[lora]'``) and imported
only when LoRA is requested. Layers are chosen by the same rules as `PaCAConfig.target_modules`
(``"all-linear"`` = every Linear/Conv1D except the output head) and handed to peft as full
module names, so both methods adapt exactly the same layers. QLoRA (``quantize="nf4"``) quantizes
each targeted Linear with the same bitsandbytes settings as QPaCA (`quantize_linear`: blocksize
64, double-quantized scales) before peft wraps it, so a QLoRA and a QPaCA run load and quantize
the base identically.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import nn

from ..experts import ExpertParameter
from ..model import find_targets, paca_layers, set_submodule
from ..quantized import dense_dtype_of, dequantize_weight, is_quantized_linear, quantize_linear
from .callback import log_trainable_report
from .exports import MERGED_DIRNAME

LORA_ADAPTER_DIRNAME = "lora_adapter"
_ADAPTER_NAME = "default"  # peft's name of the single adapter get_peft_model creates


@dataclass
class LoRASettings:
    """A peft LoRA adapter for `PaCAFineTuneModule(method="lora")`.

    Args:
        rank: LoRA rank ``r``. For an equal trainable-parameter budget, compare LoRA rank ``r``
            with PaCA rank ``2r`` (the paper's setup).
        alpha: LoRA ``lora_alpha``; the update ``B @ A`` is scaled by ``alpha / rank``.
        dropout: dropout on the LoRA branch's input (``lora_dropout``). PaCA has none, so 0.0
            keeps the comparison about the adapter alone.
        target_modules: layers to adapt, in `PaCAConfig.target_modules`' forms: a list of names,
            a regex matching the full module name, or ``"all-linear"`` (every Linear/Conv1D
            except the output head).
        exclude_modules: layers never adapted, in the same forms.
        quantize: QLoRA: ``"nf4"``/``"fp4"`` (bitsandbytes 4-bit) or ``"int8"`` quantizes the
            frozen base of every targeted layer before LoRA is added, exactly as
            `PaCAConfig.quantize` does for QPaCA. ``None`` keeps the base as loaded.
        seed: seed of the random initialisation of LoRA's ``A`` matrices. It is drawn from a
            forked RNG, as PaCA draws its columns from its own generator, so the global RNG
            (data shuffling, dropout) runs exactly as in the PaCA run being compared.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: Union[list[str], str] = "all-linear"
    exclude_modules: Optional[Union[list[str], str]] = None
    quantize: Optional[Literal["nf4", "fp4", "int8"]] = None
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"LoRASettings.rank must be a positive int, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"LoRASettings.alpha must be a number > 0, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRASettings.dropout must be a number in [0, 1), got {self.dropout!r}")
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if isinstance(self.exclude_modules, tuple):
            self.exclude_modules = list(self.exclude_modules)
        if self.quantize not in (None, "nf4", "fp4", "int8"):
            raise ValueError(f"LoRASettings.quantize={self.quantize!r} is not valid; choose 'nf4', 'fp4', "
                             "'int8' or None (keep the base as loaded)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"LoRASettings.seed must be an int, got {self.seed!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def import_peft():
    """``peft``, or an ImportError saying that LoRA needs it and how to install it."""
    try:
        import peft
    except ImportError as error:
        raise ImportError("PaCAFineTuneModule(method='lora') trains a peft LoRA adapter and needs the peft "
                          "package: pip install peft (or pip install 'paca-lightning[lora]'); "
                          f"it cannot be imported here: {error}") from error
    return peft


def is_lora_model(model: nn.Module) -> bool:
    """True for a peft ``PeftModel`` (a model `apply_lora` has already adapted)."""
    peft = import_peft()
    return isinstance(model, peft.PeftModel)


def apply_lora(model: nn.Module, settings: LoRASettings) -> nn.Module:
    """``model`` wrapped by peft with a trainable LoRA adapter on the selected layers.

    Returns the ``PeftModel`` (``get_base_model()`` is the transformers model, adapted in
    place); only the LoRA matrices require grad.
    """
    peft = import_peft()
    if next(paca_layers(model), None) is not None:
        raise ValueError(f"{type(model).__name__} already carries PaCA layers; method='lora' needs a "
                         "plain (or bitsandbytes-quantized) model")
    targets = find_targets(model, settings)
    fused = sorted(name for name, module in targets.items() if isinstance(module, ExpertParameter))
    if fused:
        # peft trains them through LoraConfig(target_parameters=...), but this baseline's merged
        # export (save_lora_merged) handles adapted layers only, so it would drop their updates
        raise ValueError(f"method='lora' adapts layers only, and target_modules selects the fused expert weights "
                         f"{fused[:3]}{' ...' if len(fused) > 3 else ''}; set exclude_modules=['experts'] "
                         "(for the PaCA run too, so both methods train the same weights)")
    if settings.quantize is not None:
        for name, module in targets.items():
            if type(module) is nn.Linear:
                set_submodule(model, name, quantize_linear(module, settings.quantize))
    config = peft.LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                             target_modules=sorted(targets), bias="none", task_type="CAUSAL_LM")
    cuda_devices = sorted({param.device.index or 0 for param in model.parameters() if param.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(settings.seed)
        return peft.get_peft_model(model, config)


def save_lora_merged(peft_model: nn.Module, directory: Union[str, Path], tokenizer: Any = None) -> Path:
    """``save_pretrained`` the model with the LoRA update merged into each adapted weight.

    The live model is left as it is (training can continue): the merged weights are new
    tensors written into the saved state dict, ``W + (alpha / rank) * B @ A`` per adapted layer,
    which costs one extra copy of the adapted weights rather than of the whole model
    (``merge_and_unload`` would modify the model, and on a deep copy double all of it).
    A quantized base is dequantized first, so the export is a dense model in the dtype of the
    model's other parameters, loadable without bitsandbytes and free of re-quantization error.
    """
    from peft.tuners.lora import LoraLayer

    model = peft_model.get_base_model()
    dtype = dense_dtype_of(model)
    state = {}
    lora_layers = {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}
    for key, value in model.state_dict().items():
        layer_name = next((name for name in lora_layers if key.startswith(name + ".")), None)
        if layer_name is None:
            state[key] = value
        elif key.startswith(layer_name + ".base_layer.") and not key.startswith(layer_name + ".base_layer.weight"):
            state[layer_name + key[len(layer_name + ".base_layer"):]] = value  # the bias
    with torch.no_grad():
        for name, layer in lora_layers.items():
            base = layer.get_base_layer()
            weight = dequantize_weight(base, dtype) if is_quantized_linear(base) else base.weight
            delta = layer.get_delta_weight(_ADAPTER_NAME)
            state[name + ".weight"] = (weight + delta.to(weight.dtype)).to(dtype)
    directory = Path(directory)
    model.save_pretrained(directory, state_dict=state)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(directory)
    return directory


class LoRACallback(Callback):
    """A LoRA run's trainable-parameter report and fit-end exports (`PaCACallback` and
    `FitEndExport` do these for PaCA).

    Added by `PaCAFineTuneModule.configure_callbacks` when ``method="lora"``, beside the
    `BatchSeeding`, `NonFiniteLossGuard` and `TrainingProgress` a PaCA run has, so a LoRA run
    sees the same data order and dropout seeds as the PaCA run it is compared with and reports
    the same figures. At fit end it writes ``<default_root_dir>/lora_adapter/`` (peft
    ``save_pretrained``, loaded with ``PeftModel.from_pretrained``) and
    ``<default_root_dir>/merged/`` (`save_lora_merged`, with the tokenizer). Sharded strategies
    are refused at setup: gathering a sharded peft model for export is not implemented, and
    failing then costs no training time.
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy)):
            raise ValueError(f"PaCAFineTuneModule(method='lora') runs on one device or with DDP; strategy "
                             f"{type(trainer.strategy).__name__} shards the model, which the LoRA export "
                             "does not gather. Use strategy='ddp' (or 'auto'), or method='paca'")

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        log_trainable_report(trainer, pl_module.model, "LoRA")

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero:  # DDP replicas are identical: rank 0 writes
            root = Path(trainer.default_root_dir)
            pl_module.model.save_pretrained(root / LORA_ADAPTER_DIRNAME)
            save_lora_merged(pl_module.model, root / MERGED_DIRNAME, pl_module.tokenizer)
        trainer.strategy.barrier("lora_fit_end_export")
