"""`FitEndExport`: the adapter and the merged model written when ``fit`` ends."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

from ..adapter import save_adapter
from ..atomic import atomic_directory_write
from ..model import merge_paca, paca_layers, sync_paca_columns
from ..parallel import export_merged, save_sharded_adapter
from ..quantized import QuantizedPaCALinear
from .lookup import paca_model_of

ADAPTER_DIRNAME = "paca_adapter"
MERGED_DIRNAME = "merged"
# PaCA's own tensors; a merged model has none of them.
_PACA_TENSOR_SUFFIXES = (".paca_weight", ".paca_indices", ".paca_base_columns")


class FitEndExport(Callback):
    """Writes ``<default_root_dir>/paca_adapter/`` (`save_adapter` files) and
    ``<default_root_dir>/merged/`` (``save_pretrained`` model plus the module's ``tokenizer``
    attribute, loadable without this package) when ``fit`` ends.

    In a distributed run (DDP, FSDP1, FSDP2) every rank gathers its shards collectively and
    rank 0 writes (`paca_lightning.parallel.save_sharded_adapter`, `export_merged`).

    Args:
        adapter: write the adapter.
        merged: write the merged model.
    """

    def __init__(self, adapter: bool = True, merged: bool = True) -> None:
        self.adapter = adapter
        self.merged = merged

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not (self.adapter or self.merged):
            return
        model = paca_model_of(pl_module)
        root = Path(trainer.default_root_dir)
        tokenizer = getattr(pl_module, "tokenizer", None)
        if trainer.world_size > 1:  # shards or replicas on every rank: gather collectively, rank 0 writes
            if self.adapter:
                save_sharded_adapter(model, root / ADAPTER_DIRNAME, root=trainer.strategy.model)
            if self.merged:
                export_merged(model, root / MERGED_DIRNAME, root=trainer.strategy.model, tokenizer=tokenizer)
            return
        if self.adapter:
            save_adapter(model, root / ADAPTER_DIRNAME)
        if self.merged:
            save_merged(model, root / MERGED_DIRNAME, tokenizer)


def save_merged(model: nn.Module, directory, tokenizer: Any = None) -> Path:
    """``save_pretrained`` the merged model without touching the live PaCA model; the folder's
    files appear only once all of them are written (`paca_lightning.atomic.atomic_directory_write`).

    The weights already hold the trained columns (the PaCA invariant), so the merged state dict
    is the model's own minus PaCA's extra tensors: nothing is copied and training can continue.
    QPaCA models (quantized base) are merged on a copy into dense layers (`merge_paca`).
    """
    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"{type(model).__name__} has no save_pretrained; a merged export needs a "
                        "transformers model (disable it with FitEndExport(merged=False))")
    if any(isinstance(layer, QuantizedPaCALinear) for _, layer in paca_layers(model)):
        # A quantized base does not hold the trained columns; merging builds dense layers (a copy,
        # so the live model keeps training). Their dtype is the model's other parameters'.
        model, state = merge_paca(copy.deepcopy(model)), None
    else:
        sync_paca_columns(model)
        state = {key: value for key, value in model.state_dict().items()
                 if not key.endswith(_PACA_TENSOR_SUFFIXES)}

    def write(folder: Path) -> None:
        model.save_pretrained(folder, state_dict=state)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(folder)

    # a crash or a full disk mid-export must not leave a folder that looks finished
    return atomic_directory_write(directory, write)
