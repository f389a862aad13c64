"""Checkpoints of PaCA runs: adapter-only, verified on load, atomic, exactly resumable.

`PaCACheckpointing` (a callback) keeps only the trainable tensors in Lightning checkpoints, records
the column indices and verifies them on resume, and repairs one case of Lightning's loop state
so that a resume is exact. `AtomicCheckpointIO` writes checkpoint files that a crash cannot corrupt.

Lightning's default `TorchCheckpointIO` writes through an fsspec transaction, which moves a
finished temporary file into place but never ``fsync``s it: after a power loss or a kernel
panic the renamed file can be empty. `AtomicCheckpointIO` writes the temporary file in the
target's directory, flushes it to disk, renames it over the target and flushes the directory
(`paca_lightning.atomic.atomic_write`), so ``last.ckpt`` is at every moment either the previous
complete checkpoint or the new one.
"""

from __future__ import annotations

import errno
import hashlib
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import CombinedLoader, rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn

from ..atomic import atomic_write
from ..model import paca_layers, sync_paca_columns
from ..parallel import clean_name
from .lookup import paca_model_of, prefix_of

_INDICES_SUFFIX = ".paca_indices"


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` whose saves are atomic and durable (temp file, fsync, rename).

    `PaCACheckpointing` installs it in place of Lightning's default checkpoint IO; pass it yourself
    with ``Trainer(plugins=[AtomicCheckpointIO()])`` when you do not use the callback.
    """

    def __init__(self, verify: Optional[Callable[[dict[str, Any]], None]] = None) -> None:
        super().__init__()
        # called with each loaded checkpoint before Lightning loads it into the module, so a
        # checkpoint of another run is refused with its reason instead of a size-mismatch traceback
        self.verify = verify

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint does not accept storage_options "
                            f"(got {storage_options!r}); it writes local files only")
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location: Optional[Any] = None,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
        """Lightning's loading, with tensors and plain containers only, from a file or a URL.

        Lightning loads a checkpoint given as an ``http(s)://`` URL with ``weights_only=False``
        unless told otherwise, which runs whatever a pickled payload asks for. Here both local
        files and URLs load with ``weights_only=True`` unless the caller passes ``False`` itself.
        A file that is empty, truncated or not a checkpoint is named in the error.
        """
        if weights_only is None:
            weights_only = True
        try:
            checkpoint = super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except FileNotFoundError:
            raise
        except pickle.UnpicklingError as error:
            reason = str(error).strip().splitlines()[0]
            raise ValueError(f"{path} cannot be loaded as a checkpoint: it is not a torch checkpoint, or it holds "
                             f"objects other than tensors and plain containers, which are never unpickled here "
                             f"(a pickled object can run code). torch said: {reason}") from None
        except (EOFError, RuntimeError) as error:
            detail = str(error).strip().splitlines()[0] if str(error).strip() else "no data"
            raise ValueError(f"{path} cannot be loaded as a checkpoint: the file is empty, truncated or "
                             f"corrupt ({type(error).__name__}: {detail})") from None
        if self.verify is not None:
            self.verify(checkpoint)
        return checkpoint


def atomic_torch_save(obj: Any, path) -> None:
    """``torch.save(obj, path)`` such that ``path`` is never left partially written."""
    try:
        atomic_write(path, lambda temporary: torch.save(obj, temporary))
    except RuntimeError as error:
        # torch's zip writer reports a failed write as "[enforce fail at inline_container.cc] unexpected pos"
        if "unexpected pos" not in str(error) and "failed writing" not in str(error):
            raise
        free = shutil.disk_usage(Path(path).parent).free
        raise OSError(errno.ENOSPC, f"could not write the checkpoint {path}: the write failed with "
                      f"{free:,} bytes free on its disk (no space left?); the previous checkpoint is intact. "
                      f"Free space or move --trainer.default_root_dir") from error


class PaCACheckpointing(Callback):
    """Lightning checkpoints for a PaCA run: small, checked, atomic and exactly resumable.

    - ``on_save_checkpoint``: records the config and every layer's column indices under a
      ``"paca"`` entry; with ``adapter_only`` the state dict keeps only the trainable tensors
      (megabytes instead of the whole model: the frozen base is reloaded from its source on
      resume; the base of a 70B model is 140 GB, its adapter a few hundred MB).
    - ``on_load_checkpoint``: refuses a checkpoint whose columns differ from this run's or whose
      tensors do not fit the module, writes the restored columns into the weights, and repairs
      Lightning's loop state for a checkpoint taken at an epoch's last batch (see
      `_resume_finished_epoch_at_next_epoch`).
    - ``setup``: with ``adapter_only``, sets the module's ``strict_loading`` to False (Lightning's
      switch for partial state dicts; the keys are checked here instead); with ``atomic``,
      replaces Lightning's default checkpoint IO by `AtomicCheckpointIO`.
    - ``on_train_start``: warns when the training data loader cannot record its position
      (a resume would then repeat or skip batches).

    Args:
        adapter_only: keep only the trainable tensors in checkpoints.
        atomic: write checkpoint files atomically and durably.
    """

    def __init__(self, adapter_only: bool = True, atomic: bool = True) -> None:
        self.adapter_only = adapter_only
        self.atomic = atomic

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.atomic and type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO(verify=lambda checkpoint: self._verify_run(
                pl_module, checkpoint))
        if self.adapter_only:
            pl_module.strict_loading = False

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.checkpoint_callbacks:
            _warn_if_resume_cannot_be_exact(trainer.train_dataloader)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        model = paca_model_of(pl_module)
        prefix = prefix_of(pl_module, model)
        checkpoint["paca"] = {
            "config": model.paca_config.to_dict(),
            "indices": {prefix + name + _INDICES_SUFFIX: layer.paca_indices.detach().cpu().clone()
                        for name, layer in paca_layers(model)},
            "base": {"name_or_path": _name_or_path(model), "columns_sha256": self._base_fingerprint(model)},
        }
        keep = set(_trainable_keys(pl_module))
        checkpoint["paca"]["trained_sha256"] = _trained_digest(checkpoint.get("state_dict", {}), keep)
        if not self.adapter_only:
            return
        checkpoint["state_dict"] = {key: value for key, value in checkpoint["state_dict"].items() if key in keep}
        checkpoint["paca"]["adapter_only"] = True

    def _base_fingerprint(self, model: nn.Module) -> str:
        """SHA-256 of every adapted layer's pretrained columns: which base weights the run trains on.
        Cheap (the columns are the adapter's size), computed once per model: they never change."""
        if getattr(self, "_fingerprinted", (None,))[0] is not model:
            digest = hashlib.sha256()
            for name, layer in paca_layers(model):
                columns = layer.paca_base_columns.detach().cpu().contiguous()
                digest.update(name.encode())
                digest.update(columns.view(torch.uint8).numpy().tobytes())
            self._fingerprinted = (model, digest.hexdigest())
        return self._fingerprinted[1]

    def _verify_run(self, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another PaCA config, another base model or other columns."""
        model = paca_model_of(pl_module)
        saved = checkpoint.get("paca")
        if saved is None:
            raise ValueError("this checkpoint has no 'paca' entry: it was not written by a run with "
                             "PaCACheckpointing, so it cannot restore PaCA columns")
        ours = model.paca_config.to_dict()
        changed = [f"{key}: checkpoint {saved['config'].get(key)!r}, this run {ours.get(key)!r}"
                   for key in sorted(set(ours) | set(saved["config"])) if saved["config"].get(key) != ours.get(key)]
        if changed:
            raise ValueError("the checkpoint was trained with another PaCAConfig (" + "; ".join(changed) + "). "
                             "Resuming would silently rescale or misplace the trained columns; resume with the "
                             "checkpoint's settings, or start a new run without resuming (ckpt_path)")
        base = saved.get("base")  # absent in checkpoints of earlier versions
        if base is not None and base["columns_sha256"] != self._base_fingerprint(model):
            raise ValueError(f"the checkpoint was trained on another base model: its pretrained columns differ from "
                             f"this run's (checkpoint base {base['name_or_path']!r}, this run "
                             f"{_name_or_path(model)!r}). Resume on the base model the checkpoint was trained on")
        recorded = saved.get("trained_sha256")  # None for sharded state and earlier versions
        if recorded is not None:
            # None when the strategy has already turned the loaded state into shards
            current = _trained_digest(checkpoint.get("state_dict", {}), set(_trainable_keys(pl_module)))
            if current is not None and current != recorded:
                raise ValueError("the checkpoint's trained tensors do not match the checksum recorded when it was "
                                 "saved: the file was modified or corrupted on disk. Resume from an earlier "
                                 "checkpoint")
        prefix = prefix_of(pl_module, model)
        for name, layer in paca_layers(model):
            indices = saved["indices"].get(prefix + name + _INDICES_SUFFIX)
            if indices is None or not torch.equal(indices.to(layer.paca_indices.device), layer.paca_indices):
                raise ValueError(f"checkpoint columns of {name!r} differ from the columns this run selected "
                                 f"({'absent' if indices is None else 'different indices'}); resume with the "
                                 f"PaCAConfig of the checkpoint: {saved['config']}")

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """Check that the checkpoint belongs to this run (again: sharded checkpoints are read by the
        strategy, not by `AtomicCheckpointIO`), then restore the columns into the weights."""
        model = paca_model_of(pl_module)
        self._verify_run(pl_module, checkpoint)
        saved = checkpoint["paca"]
        if saved.get("adapter_only"):
            state, module_keys = checkpoint["state_dict"], set(pl_module.state_dict())
            missing = sorted(set(_trainable_keys(pl_module)) - set(state))
            unexpected = sorted(set(state) - module_keys)
            if missing or unexpected:
                raise ValueError(f"adapter-only checkpoint does not fit {type(pl_module).__name__}: missing "
                                 f"{missing[:5]}, unexpected {unexpected[:5]}")
        sync_paca_columns(model)
        _resume_finished_epoch_at_next_epoch(trainer, checkpoint)


class StopSignalCheckpoint(Callback):
    """On SIGTERM (a batch scheduler pre-empting the job, ``kill``), saves ``last.ckpt`` where the
    run's `ModelCheckpoint` keeps it, so the run resumes from where it stopped.

    Lightning notices the signal at the end of the current batch and ends ``fit`` with
    ``SIGTERMException``, which this callback sees first (``on_exception``; every rank takes part
    in the save). A batch in the middle of a gradient-accumulation window is not a step boundary,
    where no checkpoint would resume exactly; the previous one is kept then. ``SIGTERMException``
    is a ``SystemExit`` without a status, so a script that lets it through exits with 0: the
    recipes exit with 143 (128 + SIGTERM), as a shell reports a process SIGTERM ended.
    """

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != "fit":
            return
        checkpointing = trainer.checkpoint_callback
        progress = trainer.fit_loop.epoch_loop.batch_progress
        at_step = progress.current.completed % trainer.accumulate_grad_batches == 0 or progress.is_last_batch
        if isinstance(checkpointing, ModelCheckpoint) and checkpointing.dirpath is not None and at_step:
            path = checkpointing.format_checkpoint_name({}, checkpointing.CHECKPOINT_NAME_LAST)
            trainer.save_checkpoint(path)
            checkpointing.last_model_path = path
            kept = f"saved {path} at global step {trainer.global_step}"
        else:
            last = getattr(checkpointing, "last_model_path", "")
            why = "the signal came inside a gradient-accumulation window" if at_step is False else \
                "the run has no ModelCheckpoint"
            kept = f"no checkpoint at the stop ({why}); the last one is {last or 'none'}"
        rank_zero_info(f"Stopped by SIGTERM: {kept}. Resume with ckpt_path='last' (recipes: the same command "
                       "plus --ckpt_path last)")


def _trained_digest(state: dict[str, Any], keys: set[str]) -> Optional[str]:
    """SHA-256 of the trained tensors of a state dict (the checkpoint's point), or None when they
    are shards (DTensors: each rank holds another part) or not all present."""
    tensors = [(key, state.get(key)) for key in sorted(keys)]
    if not tensors or any(type(value) is not torch.Tensor and type(value) is not nn.Parameter
                          for _, value in tensors):
        return None
    digest = hashlib.sha256()
    for key, value in tensors:
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _name_or_path(model: nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__)


def _trainable_keys(pl_module: LightningModule) -> list[str]:
    # FSDP1 inserts wrapper names that state dicts omit
    return [clean_name(name) for name, param in pl_module.named_parameters() if param.requires_grad]


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
        rank_zero_warn("PaCACheckpointing: this checkpoint was saved at the last batch of an epoch; Lightning "
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


def _warn_if_resume_cannot_be_exact(train_dataloaders: Any) -> None:
    """Name the data loaders whose position a checkpoint cannot restore exactly."""
    for loader in CombinedLoader(train_dataloaders).flattened:
        if not callable(getattr(loader, "state_dict", None)):
            rank_zero_warn(f"PaCACheckpointing: the training {type(loader).__name__} has no state_dict, so a "
                           "checkpoint does not record the data position and resuming mid-epoch repeats or "
                           "skips batches. Use torchdata.stateful_dataloader.StatefulDataLoader")
        elif getattr(loader, "generator", None) is not None:
            rank_zero_warn("PaCACheckpointing: the training StatefulDataLoader was given generator=...; its "
                           "shuffling after a resume then differs from the uninterrupted run's from the next "
                           "epoch on. Leave generator unset (seed with seed_everything) for an exact resume")
