"""`PaCACallback`: PaCA on the model of any LightningModule, and `paca_callbacks`, the full set.

::

    trainer = Trainer(callbacks=paca_callbacks(PaCAConfig(rank=16)))
    trainer.fit(my_lightning_module)      # any LightningModule exposing its transformers model

Each callback of the set does one job through Lightning's hooks:

======================  ========================================================================
`PaCACallback`          adapts the module's model at ``setup`` (or checks the adaptation done in
                        ``configure_model``), keeps the trained columns written into the weights,
                        prints the trainable-parameter report
`PaCACheckpointing`     adapter-only checkpoints, verified on load, atomic, exactly resumable
`StopSignalCheckpoint`  ``last.ckpt`` when SIGTERM stops the run (a pre-empted job resumes there)
`BatchSeeding`          seeds dropout from a batch's place in the run (what makes resume exact)
`NonFiniteLossGuard`    stops before a NaN/inf loss, gradient or weight reaches the weights or a
                        checkpoint
`TrainingProgress`      tokens/s, samples/s, peak memory; plain progress lines
`FitEndExport`          ``paca_adapter/`` and ``merged/`` when ``fit`` ends
======================  ========================================================================

`PaCAFineTuneModule` adds the same set itself (`paca_lightning.training.module`).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn

from ..config import PaCAConfig
from ..model import apply_paca, paca_layers, sync_paca_columns, trainable_parameters
from ..selection import Calibration
from .checkpointing import PaCACheckpointing, StopSignalCheckpoint
from .exports import FitEndExport
from .guards import NonFiniteLossGuard
from .lookup import find_transformers_model
from .progress import TrainingProgress
from .seeding import BatchSeeding
from .strategies import PaCAFSDPStrategy


def adapt_for_training(model: nn.Module, config: PaCAConfig, calibration: Optional[Calibration] = None) -> nn.Module:
    """Apply PaCA to ``model`` for a training run: the one function through which trainers adapt.

    Call it after the model exists and before any strategy wraps or shards it (DDP, FSDP's
    ``fully_shard``), e.g. at the end of ``LightningModule.configure_model``. A model already
    adapted with ``config`` is returned as it is (``configure_model`` may run more than once,
    e.g. ``fit`` then ``validate``); one adapted with another config is refused.
    """
    if any(_is_sharded(param) for param in model.parameters()):
        raise RuntimeError(f"{type(model).__name__} is already sharded (its parameters are DTensors); "
                           "PaCA must be applied before sharding. In configure_model, call "
                           "paca_lightning.training.adapt_for_training(model, config) before fully_shard")
    if next(paca_layers(model), None) is not None:
        check_same_config(model, config)
        return model
    return apply_paca(model, config, calibration=calibration)


def check_same_config(model: nn.Module, config: PaCAConfig) -> None:
    existing = getattr(model, "paca_config", None)
    if existing is not None and existing != config:
        raise ValueError(f"{type(model).__name__} already carries PaCA with {existing}, which differs "
                         f"from the requested {config}; use one PaCAConfig for the module and the callback")


def refuse_plain_fsdp1(strategy: Any) -> None:
    """Lightning's own FSDP1 strategy flattens weights into shards that PaCA's column writes cannot
    reach, so the trained columns would silently go stale: refuse it, naming what works."""
    if isinstance(strategy, FSDPStrategy) and not isinstance(strategy, PaCAFSDPStrategy):
        raise ValueError(f"strategy {type(strategy).__name__} (strategy='fsdp', FSDP1) cannot keep PaCA's trained "
                         "columns in its flattened weight shards. Use FSDP2: "
                         "strategy=paca_lightning.training.PaCAModelParallelStrategy(), or "
                         "FSDP1 with PaCA's delta form: paca_lightning.training.PaCAFSDPStrategy(), or 'ddp'")


def _is_sharded(param: torch.Tensor) -> bool:
    return type(param).__name__ == "DTensor" or type(param.data).__name__ == "DTensor"


class PaCACallback(Callback):
    """Applies PaCA to a LightningModule's model and keeps its trained columns in its weights.

    At ``setup`` the module's model (see ``model_attribute``) is adapted with `adapt_for_training`.
    A module that builds its model in ``configure_model`` (which Lightning runs after every
    callback's ``setup``) adapts it there itself with `adapt_for_training`; the callback then
    checks at fit start that it did, with this config. After every optimizer step, before
    validation and after a checkpoint is loaded the columns are written into the weights, which
    layers whose forward does not write them need (``torch.compile``, FSDP2).

    Args:
        config: the PaCA adapter to train.
        model_attribute: name of the submodule to adapt; by default the module's single
            transformers model, else its ``model`` attribute.
        calibration: calibration batch for ``config.selection="gradient"``.
    """

    def __init__(self, config: PaCAConfig, *, model_attribute: Optional[str] = None,
                 calibration: Optional[Calibration] = None) -> None:
        if not isinstance(config, PaCAConfig):
            raise TypeError(f"PaCACallback needs a PaCAConfig, got {type(config).__name__}")
        self.config = config
        self.model_attribute = model_attribute
        self.calibration = calibration
        self.model: Optional[nn.Module] = None

    @property
    def state_key(self) -> str:
        return f"PaCACallback[rank={self.config.rank},seed={self.config.seed}]"

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        refuse_plain_fsdp1(trainer.strategy)
        builds_later = is_overridden("configure_model", pl_module)
        model = find_transformers_model(pl_module, self.model_attribute, required=not builds_later)
        if model is not None:  # None: configure_model builds (and adapts) it
            self.model = adapt_for_training(model, self.config, self.calibration)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        log_trainable_report(trainer, self._adapted_model(pl_module), "PaCA")

    def _adapted_model(self, pl_module: LightningModule) -> nn.Module:
        if self.model is None:
            model = find_transformers_model(pl_module, self.model_attribute, required=False)
            if model is None or next(paca_layers(model), None) is None:
                raise RuntimeError(
                    f"{type(pl_module).__name__} built its model in configure_model without PaCA. The callback "
                    "runs before configure_model, so end configure_model with "
                    "`self.model = paca_lightning.training.adapt_for_training(self.model, config)` "
                    "(the callback checks the config), or build the model in __init__")
            check_same_config(model, self.config)
            self.model = model
        return self.model

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        sync_paca_columns(self._adapted_model(pl_module))  # covers values restored by load_state_dict

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        sync_paca_columns(self._adapted_model(pl_module))

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # Layers with auto_sync off (torch.compile, FSDP2) need the write after each step; for
        # the others it repeats their next forward's write (out x r values per layer).
        sync_paca_columns(self._adapted_model(pl_module))


def paca_callbacks(config: Optional[PaCAConfig] = None, *, model_attribute: Optional[str] = None,
                   calibration: Optional[Calibration] = None, adapter_only_checkpoints: bool = True,
                   atomic_checkpoints: bool = True, save_adapter_on_fit_end: bool = True,
                   save_merged_on_fit_end: bool = True, log_throughput: bool = True,
                   progress_lines: Optional[bool] = None, seed_each_batch: bool = True) -> list[Callback]:
    """The callbacks of a PaCA run (see the module docstring), configured in one call.

    ``config=None`` leaves `PaCACallback` out: for a module that adapts its model itself
    (`PaCAFineTuneModule`). The other arguments are those of the callbacks: ``adapter_only`` and
    ``atomic`` of `PaCACheckpointing`, ``adapter`` and ``merged`` of `FitEndExport`,
    ``log_throughput`` and ``progress_lines`` of `TrainingProgress`, ``seed_each_batch`` of
    `BatchSeeding`.
    """
    callbacks: list[Callback] = []
    if config is not None:
        callbacks.append(PaCACallback(config, model_attribute=model_attribute, calibration=calibration))
    return callbacks + [
        PaCACheckpointing(adapter_only=adapter_only_checkpoints, atomic=atomic_checkpoints),
        StopSignalCheckpoint(),
        BatchSeeding(seed_each_batch),
        NonFiniteLossGuard(),
        TrainingProgress(log_throughput=log_throughput, progress_lines=progress_lines),
        FitEndExport(adapter=save_adapter_on_fit_end, merged=save_merged_on_fit_end),
    ]


def log_trainable_report(trainer: Trainer, model: nn.Module, method: str) -> None:
    """Print ``"<method>: trainable params: ..."`` and log the counts as ``<method>/...`` hyperparameters.

    One report for PaCA and LoRA runs, so the two are compared on the same counts.
    """
    report = trainable_parameters(model)
    rank_zero_info(f"{method}: {report}")
    prefix = method.lower()
    for logger in trainer.loggers:
        logger.log_hyperparams({f"{prefix}/trainable_params": report.trainable,
                                f"{prefix}/total_params": report.total, f"{prefix}/trainable_percent": report.percent})
