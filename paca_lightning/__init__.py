"""paca-lightning: fine-tune Hugging Face language models with PaCA on PyTorch Lightning."""

__version__ = "0.1.0"

from .config import PaCAConfig  # noqa: E402
from .layers import PaCAFunction, PaCALinear  # noqa: E402
from .model import (apply_paca, disable_paca, merge_paca, paca_layers,  # noqa: E402
                    set_paca_auto_sync, sync_paca_columns, trainable_parameters, unload_paca)
from .adapter import load_adapter, save_adapter  # noqa: E402
from . import accelerators  # noqa: E402,F401  registers accelerator="hpu" with Lightning, lazily
from .callback import PaCACallback  # noqa: E402
from .module import PaCAFineTuneModule  # noqa: E402

__all__ = [
    "PaCAConfig", "PaCAFunction", "PaCALinear", "apply_paca", "merge_paca", "unload_paca",
    "disable_paca", "paca_layers", "sync_paca_columns", "set_paca_auto_sync", "trainable_parameters",
    "save_adapter", "load_adapter", "PaCACallback", "PaCAFineTuneModule",
]
