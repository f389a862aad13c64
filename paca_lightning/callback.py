"""`PaCACallback`: PaCA inside any Lightning ``Trainer`` run, in one line.

::

    trainer = Trainer(callbacks=[PaCACallback(PaCAConfig(rank=16))])
    trainer.fit(my_lightning_module)      # any LightningModule exposing its transformers model

What the callback does, hook by hook:

- ``setup``: finds the module's model and adapts it with `adapt_for_training` (the one place
  PaCA is applied: before the strategy wraps or shards anything). A model created in the
  module's ``configure_model`` is adapted right after that hook returns. Installs
  `AtomicCheckpointIO` and, for adapter-only checkpoints, relaxes strict state-dict loading
  (the callback checks the keys itself, see below).
- training: stops the run with `NonFiniteLossError` before a non-finite loss reaches backward,
  so the optimizer never steps on it and the last good checkpoint stays the last one; writes
  the trained columns into the weights after every optimizer step when forward-time syncing is
  off (``torch.compile``, sharded training); logs tokens/s, samples/s and the device's peak
  memory; seeds torch's RNG per batch from the batch's position in the run, so dropout does
  not depend on what ran before (see ``seed_each_batch``).
- checkpoints: with ``adapter_only_checkpoints`` the saved state dict holds only the trainable
  tensors (megabytes instead of the whole model) and the column indices go to a ``"paca"``
  entry that loading verifies; with the base seed, the optimizer/scheduler state Lightning
  saves and a `StatefulDataLoader`'s position, a resumed run is bit-identical to one that
  never stopped (a checkpoint from an epoch's last batch is repaired on load, see
  `_resume_finished_epoch_at_next_epoch`).
- ``on_fit_end``: writes ``<default_root_dir>/paca_adapter/`` (`save_adapter` files) and
  ``<default_root_dir>/merged/`` (``save_pretrained`` model and tokenizer, loadable without
  this package).
"""

from __future__ import annotations

import copy
import hashlib
import resource
import sys
import time
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from .accelerators.reporting import synchronize_device
from .adapter import save_adapter
from .checkpoint import AtomicCheckpointIO
from .config import PaCAConfig
from .model import apply_paca, merge_paca, paca_layers, sync_paca_columns, trainable_parameters
from .quantized import QuantizedPaCALinear
from .selection import Calibration

ADAPTER_DIRNAME = "paca_adapter"
MERGED_DIRNAME = "merged"
# Buffers that `apply_paca` derives from the base model again; checkpoints need not carry them.
_DERIVED_BUFFER_SUFFIX = ".paca_base_columns"
_INDICES_SUFFIX = ".paca_indices"


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the run stops before the optimizer uses it."""


def adapt_for_training(model: nn.Module, config: PaCAConfig, calibration: Optional[Calibration] = None) -> nn.Module:
    """Apply PaCA to ``model`` for a training run, once: the single entry point of trainers.

    Call it after the model exists and before any strategy wraps or shards it (DDP, FSDP's
    ``fully_shard``). A model already adapted is returned as is when its config equals
    ``config`` (``configure_model`` may run more than once, e.g. ``fit`` then ``validate``);
    a different config is an error rather than a silent second adaptation.
    """
    if any(_is_sharded(param) for param in model.parameters()):
        raise RuntimeError(f"{type(model).__name__} is already sharded (its parameters are DTensors); "
                           "PaCA must be applied before sharding. In configure_model, call "
                           "paca_lightning.callback.adapt_for_training(model, config) before fully_shard")
    if next(paca_layers(model), None) is not None:
        existing = getattr(model, "paca_config", None)
        if existing is not None and existing != config:
            raise ValueError(f"{type(model).__name__} already carries PaCA with {existing}, which differs "
                             f"from the requested {config}; use one PaCAConfig for the module and the callback")
        return model
    return apply_paca(model, config, calibration=calibration)


def _is_sharded(param: torch.Tensor) -> bool:
    return type(param).__name__ == "DTensor" or type(param.data).__name__ == "DTensor"


def find_transformers_model(pl_module: LightningModule, attribute: Optional[str] = None) -> nn.Module:
    """The model PaCA adapts inside ``pl_module``.

    ``attribute`` names it explicitly (dotted paths allowed); otherwise the module's single
    transformers ``PreTrainedModel`` submodule, otherwise its ``model`` attribute.
    """
    if attribute is not None:
        try:
            model = pl_module.get_submodule(attribute)
        except AttributeError:
            children = [name for name, _ in pl_module.named_children()]
            raise AttributeError(f"{type(pl_module).__name__} has no submodule {attribute!r} "
                                 f"(PaCACallback(model_attribute=...)); its children are {children}") from None
        return model
    from transformers import PreTrainedModel

    found = [(name, module) for name, module in pl_module.named_modules()
             if isinstance(module, PreTrainedModel)]
    outermost = [(name, module) for name, module in found
                 if not any(name != other and name.startswith(other + ".") for other, _ in found)]
    if len(outermost) == 1:
        return outermost[0][1]
    if len(outermost) > 1:
        raise ValueError(f"{type(pl_module).__name__} holds several transformers models "
                         f"{[name for name, _ in outermost]}; choose one with PaCACallback(model_attribute=...)")
    model = getattr(pl_module, "model", None)
    if isinstance(model, nn.Module):
        return model
    raise ValueError(f"{type(pl_module).__name__} exposes no transformers model: no PreTrainedModel "
                     "submodule and no `model` attribute. Pass PaCACallback(model_attribute='<name>') "
                     "or create the model in __init__ or configure_model")


class BatchSeeding(Callback):
    """Seeds torch's global RNG before every training batch from the run's base seed and the
    batch's position (rank, epoch, step, batch index), and checkpoints the base seed.

    Dropout masks then depend only on where a batch is in the run, not on what else drew random
    numbers before it (a validation pass, a data-loader iterator created on resume), which is
    what makes a resumed run bit-identical. The base seed is ``torch.initial_seed()`` when the
    callback is created (``seed_everything`` sets it).
    """

    def __init__(self, seed_each_batch: bool = True) -> None:
        self.seed_each_batch = seed_each_batch
        self._base_seed = torch.initial_seed()

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.seed_each_batch:
            torch.manual_seed(batch_seed(self._base_seed, trainer.global_rank, trainer.current_epoch,
                                         trainer.global_step, batch_idx))

    def state_dict(self) -> dict[str, Any]:
        return {"base_seed": self._base_seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._base_seed = int(state_dict["base_seed"])


class PaCACallback(BatchSeeding):
    """Applies PaCA to a LightningModule's model and keeps a Trainer run correct and observable.

    Args:
        config: the PaCA adapter to train.
        model_attribute: name of the submodule to adapt; by default the module's single
            transformers model (see `find_transformers_model`).
        calibration: calibration batch for ``config.selection="gradient"``.
        adapter_only_checkpoints: save only the trainable tensors in Lightning checkpoints. The
            frozen base is reloaded from its source on resume, so saving it again every few
            hundred steps only costs disk and time (the base of a 70B model is 140 GB; its
            adapter a few hundred MB). Turn off to keep self-contained full checkpoints.
        atomic_checkpoints: replace Lightning's default checkpoint IO by `AtomicCheckpointIO`.
        save_adapter_on_fit_end: write ``<default_root_dir>/paca_adapter/`` when fit ends.
        save_merged_on_fit_end: write ``<default_root_dir>/merged/``: the merged model in
            ``save_pretrained`` format, with the module's ``tokenizer`` attribute if it has one.
        log_throughput: log ``train/tokens_per_s``, ``train/samples_per_s`` and
            ``train/peak_memory_gb`` every ``trainer.log_every_n_steps`` optimizer steps.
        progress_lines: also print those figures as one plain line (step/total, loss, tokens/s,
            elapsed, ETA) on rank 0. ``None``: when standard output is not a terminal (batch jobs,
            ``nohup``, SLURM logs), where a progress bar only shows its last frame.
        seed_each_batch: seed torch's global RNG before every training batch (`BatchSeeding`),
            which is what makes a resumed run bit-identical.
    """

    def __init__(self, config: PaCAConfig, *, model_attribute: Optional[str] = None,
                 calibration: Optional[Calibration] = None, adapter_only_checkpoints: bool = True,
                 atomic_checkpoints: bool = True, save_adapter_on_fit_end: bool = True,
                 save_merged_on_fit_end: bool = True, log_throughput: bool = True,
                 progress_lines: Optional[bool] = None, seed_each_batch: bool = True) -> None:
        if not isinstance(config, PaCAConfig):
            raise TypeError(f"PaCACallback needs a PaCAConfig, got {type(config).__name__}")
        super().__init__(seed_each_batch)
        self.config = config
        self.model_attribute = model_attribute
        self.calibration = calibration
        self.adapter_only_checkpoints = adapter_only_checkpoints
        self.atomic_checkpoints = atomic_checkpoints
        self.save_adapter_on_fit_end = save_adapter_on_fit_end
        self.save_merged_on_fit_end = save_merged_on_fit_end
        self.log_throughput = log_throughput
        self.progress_lines = progress_lines
        self.model: Optional[nn.Module] = None
        self._window_start: Optional[float] = None
        self._window_tokens = self._window_samples = 0
        self._last_logged_step = -1

    @property
    def state_key(self) -> str:
        return f"PaCACallback[rank={self.config.rank},seed={self.config.seed}]"

    # ----------------------------------------------------------------------------- setup
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.atomic_checkpoints and type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if self.adapter_only_checkpoints:
            # Adapter-only checkpoints lack the frozen tensors; `on_load_checkpoint` checks the keys.
            pl_module.strict_loading = False
        if _overrides_configure_model(pl_module):
            self._adapt_after_configure_model(pl_module)
        else:
            self.adapt(pl_module)

    def adapt(self, pl_module: LightningModule) -> nn.Module:
        """Find ``pl_module``'s model and apply PaCA to it (`adapt_for_training`)."""
        model = find_transformers_model(pl_module, self.model_attribute)
        self.model = adapt_for_training(model, self.config, self.calibration)
        return self.model

    def _adapt_after_configure_model(self, pl_module: LightningModule) -> None:
        """Make ``pl_module.configure_model`` apply PaCA as soon as it has built the model.

        Lightning calls callbacks' ``setup`` before ``configure_model`` and offers no callback
        hook between ``configure_model`` and the strategy's wrapping, so the instance's hook is
        wrapped (once; the class is untouched).
        """
        original = pl_module.configure_model
        if getattr(original, "_paca_wrapped", False):
            return
        callback = self

        def configure_model(module_self) -> None:
            original()
            callback.adapt(module_self)

        configure_model._paca_wrapped = True
        pl_module.configure_model = types.MethodType(configure_model, pl_module)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        log_trainable_report(trainer, self._require_model(), "PaCA")

    def _require_model(self) -> nn.Module:
        if self.model is None:
            raise RuntimeError("PaCACallback has not adapted a model yet; it does so in Trainer setup")
        return self.model

    # -------------------------------------------------------------------------- training
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        sync_paca_columns(self._require_model())  # covers values restored by load_state_dict
        self._window_start, self._window_tokens, self._window_samples = None, 0, 0
        self._fit_started = time.perf_counter()
        self._last_logged_step = trainer.global_step  # a resumed run's first window starts here
        if trainer.checkpoint_callbacks:
            _warn_if_resume_cannot_be_exact(trainer.train_dataloader)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        sync_paca_columns(self._require_model())

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss.detach()).all():
            last = getattr(trainer.checkpoint_callback, "last_model_path", "") or \
                getattr(trainer.checkpoint_callback, "best_model_path", "")
            kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
            raise NonFiniteLossError(
                f"training loss is {loss.detach().float().item()} at global step {trainer.global_step} "
                f"(epoch {trainer.current_epoch}); the run stops before this loss is used, {kept}. "
                "Usual fixes: lower the learning rate, use bf16-mixed instead of 16-mixed, set "
                "gradient_clip_val, check the batch for empty or corrupt sequences")

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # Layers with auto_sync off (torch.compile, FSDP2) need the write after each step; for
        # the others it repeats their next forward's write (out x r values per layer).
        sync_paca_columns(self._require_model())
        if not self.log_throughput:
            return
        # CUDA and HPU return before the work is done: wait for the device at the window's ends
        # (only there, so the queue keeps running in between), or the clock times queued work.
        if self._window_start is None:  # the first batch includes warm-up; start measuring after it
            synchronize_device(pl_module.device)
            self._window_start = time.perf_counter()
            return
        tokens, samples = _count_tokens_and_samples(batch)
        self._window_tokens += tokens
        self._window_samples += samples
        step = trainer.global_step
        if step % max(trainer.log_every_n_steps, 1) == 0 and step != self._last_logged_step:
            synchronize_device(pl_module.device)
            now = time.perf_counter()
            seconds = now - self._window_start
            figures = {"train/tokens_per_s": self._window_tokens / seconds,
                       "train/samples_per_s": self._window_samples / seconds,
                       "train/peak_memory_gb": peak_memory_bytes(pl_module.device) / 2**30}
            pl_module.log_dict(figures, on_step=True, on_epoch=False, sync_dist=False)
            if trainer.is_global_zero and (not sys.stdout.isatty() if self.progress_lines is None
                                           else self.progress_lines):
                steps_per_second = (step - self._last_logged_step) / seconds
                print(_progress_line(trainer, outputs, figures, steps_per_second,
                                     now - self._fit_started), flush=True)
            self._window_start, self._window_tokens, self._window_samples = now, 0, 0
            self._last_logged_step = step

    # ----------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        model = self._require_model()
        prefix = _prefix_of(pl_module, model)
        checkpoint["paca"] = {
            "config": self.config.to_dict(),
            "indices": {prefix + name + _INDICES_SUFFIX: layer.paca_indices.detach().cpu().clone()
                        for name, layer in paca_layers(model)},
        }
        if not self.adapter_only_checkpoints:
            return
        keep = set(_trainable_keys(pl_module))
        state = checkpoint["state_dict"]
        checkpoint["state_dict"] = {key: value for key, value in state.items() if key in keep}
        checkpoint["paca"]["adapter_only"] = True

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """Check that the checkpoint belongs to this model (after Lightning has loaded it)."""
        model = self._require_model()
        saved = checkpoint.get("paca")
        if saved is None:
            raise ValueError("this checkpoint has no 'paca' entry: it was not written by a run with "
                             "PaCACallback, so it cannot restore PaCA columns")
        prefix = _prefix_of(pl_module, model)
        for name, layer in paca_layers(model):
            key = prefix + name + _INDICES_SUFFIX
            indices = saved["indices"].get(key)
            if indices is None or not torch.equal(indices.to(layer.paca_indices.device), layer.paca_indices):
                raise ValueError(f"checkpoint columns of {name!r} differ from the columns this run selected "
                                 f"({'absent' if indices is None else 'different indices'}); resume with the "
                                 f"PaCAConfig of the checkpoint: {saved['config']}")
        if saved.get("adapter_only"):
            state, module_keys = checkpoint["state_dict"], set(pl_module.state_dict())
            missing = sorted(set(_trainable_keys(pl_module)) - set(state))
            unexpected = sorted(set(state) - module_keys)
            if missing or unexpected:
                raise ValueError(f"adapter-only checkpoint does not fit {type(pl_module).__name__}: missing "
                                 f"{missing[:5]}, unexpected {unexpected[:5]}")
        sync_paca_columns(model)
        _resume_finished_epoch_at_next_epoch(trainer, checkpoint)

    # --------------------------------------------------------------------------- fit end
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not (self.save_adapter_on_fit_end or self.save_merged_on_fit_end):
            return
        model = self._require_model()
        root = Path(trainer.default_root_dir)
        if trainer.world_size > 1:  # shards or replicas on every rank: gather collectively, rank 0 writes
            from .distributed import export_merged, save_sharded_adapter
            if self.save_adapter_on_fit_end:
                save_sharded_adapter(model, root / ADAPTER_DIRNAME, root=trainer.strategy.model)
            if self.save_merged_on_fit_end:
                export_merged(model, root / MERGED_DIRNAME, root=trainer.strategy.model,
                              tokenizer=getattr(pl_module, "tokenizer", None))
            return
        if trainer.is_global_zero:
            if self.save_adapter_on_fit_end:
                save_adapter(model, root / ADAPTER_DIRNAME)
            if self.save_merged_on_fit_end:
                save_merged(model, root / MERGED_DIRNAME, getattr(pl_module, "tokenizer", None))
        trainer.strategy.barrier("paca_fit_end_export")


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


def save_merged(model: nn.Module, directory, tokenizer: Any = None) -> Path:
    """``save_pretrained`` the merged model without touching the live PaCA model.

    The weights already hold the trained columns (the PaCA invariant), so the merged state dict
    is the model's own minus PaCA's extra tensors: nothing is copied and training can continue.
    QPaCA models (quantized base) are merged on a copy into dense layers (`merge_paca`).
    """
    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"{type(model).__name__} has no save_pretrained; a merged export needs a "
                        "transformers model (disable it with save_merged_on_fit_end=False)")
    directory = Path(directory)
    if any(isinstance(layer, QuantizedPaCALinear) for _, layer in paca_layers(model)):
        # A quantized base does not hold the trained columns; merging builds dense layers (a copy,
        # so the live model keeps training). Their dtype is the model's other parameters'.
        merged = merge_paca(copy.deepcopy(model))
        merged.save_pretrained(directory)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(directory)
        return directory
    sync_paca_columns(model)
    state = {key: value for key, value in model.state_dict().items()
             if not key.endswith((".paca_weight", _INDICES_SUFFIX, _DERIVED_BUFFER_SUFFIX))}
    model.save_pretrained(directory, state_dict=state)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(directory)
    return directory


def _resume_finished_epoch_at_next_epoch(trainer: Trainer, checkpoint: dict[str, Any]) -> None:
    """Make a checkpoint taken at an epoch's last batch resume exactly at the next epoch's start.

    Lightning 2.6 counts such a checkpoint's epoch as unfinished and, on resume, runs an empty
    extra epoch: every later epoch number is one too high, and a `StatefulDataLoader` restored
    at the end of its pass spends that empty epoch on it. The callback's ``on_load_checkpoint``
    runs before Lightning restores the loops, so the loop state is rewritten to "epoch done"
    (Lightning's own epoch loop already resets the batch counters of a full epoch) and the data
    loader's iterator is marked finished, so its next pass starts from the restored sampler
    state. Proven for iteration-based runs (``max_steps``), the usual way to fine-tune; for
    ``max_epochs`` runs Lightning does not reload data-loader state from an epoch it considers
    finished, so such a resume replays the epoch's data and the callback says so.
    """
    fit_loop = checkpoint.get("loops", {}).get("fit_loop")
    if not fit_loop or not fit_loop.get("epoch_loop.batch_progress", {}).get("is_last_batch"):
        return
    if trainer.max_steps == -1:
        rank_zero_warn("PaCACallback: this checkpoint was saved at the last batch of an epoch; Lightning "
                       "resumes it inexactly in epoch-based runs (the epoch's data order is replayed). Set "
                       "Trainer(max_steps=...) for an exact resume, or resume from an earlier checkpoint")
        return
    fit_loop["epoch_loop.batch_progress"]["is_last_batch"] = False
    for scope in fit_loop["epoch_progress"].values():
        for counter in ("ready", "processed", "completed"):
            scope[counter] = scope["started"]
    for loader_state in fit_loop.get("state_dict", {}).get("combined_loader", []):
        if isinstance(loader_state, dict) and "_iterator_finished" in loader_state:
            loader_state["_iterator_finished"] = True


def batch_seed(base_seed: int, rank: int, epoch: int, step: int, batch_idx: int) -> int:
    """A well-mixed 63-bit seed for one process's training batch at (epoch, step, batch_idx)."""
    digest = hashlib.sha256(f"{base_seed}:{rank}:{epoch}:{step}:{batch_idx}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _warn_if_resume_cannot_be_exact(train_dataloaders: Any) -> None:
    """Name the data loaders whose position a checkpoint cannot restore exactly."""
    from lightning.pytorch.utilities import CombinedLoader

    for loader in CombinedLoader(train_dataloaders).flattened:
        if not callable(getattr(loader, "state_dict", None)):
            rank_zero_warn(f"PaCACallback: the training {type(loader).__name__} has no state_dict, so a "
                           "checkpoint does not record the data position and resuming mid-epoch repeats or "
                           "skips batches. Use torchdata.stateful_dataloader.StatefulDataLoader")
        elif getattr(loader, "generator", None) is not None:
            rank_zero_warn("PaCACallback: the training StatefulDataLoader was given generator=...; its "
                           "shuffling after a resume then differs from the uninterrupted run's from the next "
                           "epoch on. Leave generator unset (seed with seed_everything) for an exact resume")


def _progress_line(trainer: Trainer, outputs: Any, figures: dict[str, float], steps_per_second: float,
                   elapsed: float) -> str:
    """``step 40/120 (33%) | loss 1.234 | 10,512 tokens/s | 41.2 samples/s | peak 0.41 GB | 0:00:05, ETA 0:00:10``."""
    step, total = trainer.global_step, trainer.estimated_stepping_batches
    parts = [f"step {step}/{total:.0f} ({100 * step / total:.0f}%)" if total != float("inf") else f"step {step}"]
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
    if isinstance(loss, torch.Tensor):
        parts.append(f"loss {loss.detach().float().item():.4f}")
    parts += [f"{figures['train/tokens_per_s']:,.0f} tokens/s", f"{figures['train/samples_per_s']:,.1f} samples/s",
              f"peak {figures['train/peak_memory_gb']:.2f} GB"]
    timing = _clock(elapsed)
    if total != float("inf") and steps_per_second > 0:
        timing += f", ETA {_clock((total - step) / steps_per_second)}"
    return " | ".join(parts + [timing])


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _overrides_configure_model(pl_module: LightningModule) -> bool:
    from lightning.pytorch.utilities.model_helpers import is_overridden

    return is_overridden("configure_model", pl_module)


def _trainable_keys(pl_module: LightningModule) -> list[str]:
    from .distributed import clean_name  # FSDP1 inserts wrapper names that state dicts omit

    return [clean_name(name) for name, param in pl_module.named_parameters() if param.requires_grad]


def _prefix_of(pl_module: LightningModule, model: nn.Module) -> str:
    for name, module in pl_module.named_modules():
        if module is model:
            return name + "." if name else ""
    raise ValueError(f"the adapted {type(model).__name__} is no longer a submodule of {type(pl_module).__name__}")


def _count_tokens_and_samples(batch: Any) -> tuple[int, int]:
    if isinstance(batch, Mapping):
        mask, ids = batch.get("attention_mask"), batch.get("input_ids")
        if isinstance(mask, torch.Tensor):
            return int(mask.sum()), mask.shape[0]
        if isinstance(ids, torch.Tensor):
            return ids.numel(), ids.shape[0]
    if isinstance(batch, torch.Tensor):
        return batch.numel(), batch.shape[0]
    return 0, 0


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of ``device``: the accelerator's allocator peak, or the process's peak RSS on CPU."""
    if device.type != "cpu":
        module = getattr(torch, device.type, None)
        if module is not None and hasattr(module, "max_memory_allocated"):
            return int(module.max_memory_allocated(device))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB
