"""PaCA on PyTorch Lightning: the module, the callbacks and the strategies.

Everything here imports Lightning; the PaCA core (`paca_lightning.layers`, `model`, `adapter`, ...)
and the plain-torch sharding helpers (`paca_lightning.parallel`) do not.
"""

from .callback import PaCACallback, adapt_for_training, log_trainable_report, paca_callbacks
from .checkpointing import AtomicCheckpointIO, PaCACheckpointing, StopSignalCheckpoint
from .exports import ADAPTER_DIRNAME, MERGED_DIRNAME, FitEndExport, save_merged
from .guards import NonFiniteLossError, NonFiniteLossGuard
from .lora import LORA_ADAPTER_DIRNAME, LoRACallback, LoRASettings
from .module import PaCAFineTuneModule
from .progress import StepProgressBar, TrainingProgress
from .seeding import BatchSeeding
from .strategies import PaCAFSDPStrategy, PaCAHPUFSDPStrategy, PaCAModelParallelStrategy

__all__ = ["PaCAFineTuneModule", "PaCACallback", "paca_callbacks", "adapt_for_training", "log_trainable_report",
           "PaCACheckpointing", "AtomicCheckpointIO", "StopSignalCheckpoint", "BatchSeeding", "NonFiniteLossGuard",
           "NonFiniteLossError", "TrainingProgress", "StepProgressBar", "FitEndExport", "save_merged",
           "ADAPTER_DIRNAME", "MERGED_DIRNAME", "LoRASettings", "LoRACallback", "LORA_ADAPTER_DIRNAME",
           "PaCAModelParallelStrategy", "PaCAHPUFSDPStrategy", "PaCAFSDPStrategy"]
