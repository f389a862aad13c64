"""paca-lightning: fine-tune Hugging Face language models with PaCA on PyTorch Lightning.

The package is layered; each layer imports only the ones above it in this list:

- core, plain torch: `config`, `layers`, `quantized`, `selection`, `model`, `adapter`, `loss`;
- `parallel`: FSDP2/FSDP1/DDP helpers, plain torch;
- Lightning: `training` (module, callbacks, strategies), `data`, `accelerators` (HPU);
- commands: `cli`, `launcher`, `bench`.

``import paca_lightning`` loads the core only. `PaCACallback` and `PaCAFineTuneModule` are
imported from `paca_lightning.training` on first use, and ``accelerator="hpu"`` is registered with
Lightning when Lightning itself is imported (`paca_lightning.accelerators`).
"""

import importlib
from typing import Any

from . import accelerators  # noqa: F401  registers accelerator="hpu" with Lightning once Lightning is imported
from ._version import __version__ as __version__
from .adapter import load_adapter, save_adapter
from .config import PaCAConfig
from .layers import PaCAFunction, PaCALayer, PaCALinear
from .model import (
    apply_paca,
    disable_paca,
    merge_paca,
    paca_layers,
    set_paca_auto_sync,
    sync_paca_columns,
    trainable_parameters,
    unload_paca,
)
from .quantized import QuantizedPaCALinear

_LIGHTNING_EXPORTS = {"PaCACallback": "paca_lightning.training", "PaCAFineTuneModule": "paca_lightning.training"}

__all__ = [
    "PaCAConfig", "PaCAFunction", "PaCALayer", "PaCALinear", "QuantizedPaCALinear", "apply_paca", "merge_paca",
    "unload_paca", "disable_paca", "paca_layers", "sync_paca_columns", "set_paca_auto_sync", "trainable_parameters",
    "save_adapter", "load_adapter", "PaCACallback", "PaCAFineTuneModule",
]


def __getattr__(name: str) -> Any:
    """`PaCACallback` and `PaCAFineTuneModule` import Lightning: load them on first use only."""
    if name in _LIGHTNING_EXPORTS:
        return getattr(importlib.import_module(_LIGHTNING_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
