"""Lightning strategies for PaCA: FSDP2 (`PaCAModelParallelStrategy`) and FSDP1 (`PaCAFSDPStrategy`).

Both apply the plain-torch policies of `paca_lightning.parallel` to every PaCA model inside the
LightningModule after ``configure_model`` has built and adapted it. Their checkpoint loaders
extend Lightning's to adapter-only checkpoints (`paca_lightning.training.checkpointing`), which
hold the trainable tensors and no frozen base; that needs two private Lightning helpers
(``_is_sharded_checkpoint``, ``_get_sharded_state_dict_context``) and a private constant
(``_METADATA_FILENAME``) of lightning 2.6, which ``pyproject.toml`` pins (``lightning<2.7``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import nn
from torch.distributed.tensor import DTensor

from ..parallel import (
    attach_column_sync,
    decoder_layers,
    load_pretrained_shards,
    replicate_trainable,
    shard_paca_model,
    use_delta_form,
)
from .lookup import paca_models


class PaCAModelParallelStrategy(ModelParallelStrategy):
    """Lightning's FSDP2 strategy with PaCA's sharding policy applied for you.

    After ``configure_model`` has built and adapted the model (`PaCAFineTuneModule`, or any
    module with `PaCACallback`), every adapted model not yet sharded goes through
    `shard_paca_model` on the data-parallel mesh, and each optimizer gets `attach_column_sync`.
    A `PaCAFineTuneModule` naming a local model folder builds it on the meta device; after
    sharding, `load_pretrained_shards` fills each rank's shards from its safetensors files, so no
    process holds the whole model (see `paca_lightning.parallel.loading`).
    Unlike the parent class (whose default mesh is tensor-parallel within a node), all
    ``num_nodes x devices`` processes form one data-parallel (FSDP) dimension.

    Args:
        activation_checkpointing, cpu_offload, mp_policy, reshard_after_forward, layer_classes:
            see `shard_paca_model`.
        save_distributed_checkpoint: each rank writes its shard (a folder) rather than rank 0
            writing one file; see ``ModelParallelStrategy``.
    """

    strategy_name = "paca_fsdp2"
    # PaCAFineTuneModule builds a local model on the meta device; setup fills the shards from disk
    loads_pretrained_shards = True

    def __init__(self, *, activation_checkpointing: bool = False, cpu_offload: bool = False, mp_policy=None,
                 reshard_after_forward: bool = True, layer_classes=None, save_distributed_checkpoint: bool = True,
                 process_group_backend: Optional[str] = None, **kwargs: Any) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, **kwargs)
        self._shard_kwargs = dict(activation_checkpointing=activation_checkpointing, cpu_offload=cpu_offload,
                                  mp_policy=mp_policy, reshard_after_forward=reshard_after_forward,
                                  layer_classes=layer_classes)

    @property
    def activation_checkpointing(self) -> bool:
        """Whether `shard_paca_model` wraps each decoder layer in a checkpoint."""
        return bool(self._shard_kwargs["activation_checkpointing"])

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def setup(self, trainer) -> None:
        models = paca_models(self.model)
        if not models:
            raise RuntimeError(f"{type(self).__name__} found no PaCA model in {type(self.model).__name__}; adapt "
                               "it in configure_model (PaCAFineTuneModule and PaCACallback do)")
        for model in models:
            if not any(isinstance(p, DTensor) for p in model.parameters()):
                shard_paca_model(model, self.device_mesh["data_parallel"], **self._shard_kwargs)
            checkpoint = getattr(model, "paca_pending_checkpoint", None)
            if checkpoint is not None:  # built on the meta device (PaCAFineTuneModule.configure_model)
                load_pretrained_shards(model, checkpoint, self.root_device)
                del model.paca_pending_checkpoint
        super().setup(trainer)

    def setup_optimizers(self, trainer) -> None:
        super().setup_optimizers(trainer)
        for optimizer in self.optimizers:
            for model in paca_models(self.model):
                attach_column_sync(optimizer, model)

    def load_checkpoint(self, checkpoint_path, weights_only: Optional[bool] = None) -> dict[str, Any]:
        """Lightning's loader, except that a distributed checkpoint may hold only some of the
        model's tensors when the module loads non-strictly (`PaCACallback`'s adapter-only
        checkpoints: trainable columns and optimizer state, no frozen base)."""
        from lightning.fabric.strategies.fsdp import _is_sharded_checkpoint
        from lightning.fabric.strategies.model_parallel import _METADATA_FILENAME
        from torch.distributed.checkpoint import FileSystemReader, load
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        path = Path(self.broadcast(checkpoint_path))
        if self.lightning_module.strict_loading:
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        if not _is_sharded_checkpoint(path):  # one full file: Lightning's loader drops the keys it loaded
            saved_keys = list(torch.load(path, mmap=True, map_location="cpu", weights_only=weights_only)["state_dict"])
            checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
            checkpoint["state_dict"] = dict.fromkeys(saved_keys)  # for on_load_checkpoint hooks to check
            return checkpoint
        saved = FileSystemReader(path).read_metadata().state_dict_metadata
        model_state = {key: value for key, value in get_model_state_dict(self.model).items()
                       if f"state_dict.{key}" in saved}
        load({"state_dict": model_state}, checkpoint_id=path)
        set_model_state_dict(self.model, model_state, options=StateDictOptions(strict=False))
        for index, optimizer in enumerate(self.optimizers):
            optimizer_state = {f"optimizer_{index}": get_optimizer_state_dict(self.model, optimizer)}
            load(optimizer_state, checkpoint_id=path)
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=optimizer_state[f"optimizer_{index}"],
                                     options=StateDictOptions(cpu_offload=True))
        checkpoint = torch.load(path / _METADATA_FILENAME, weights_only=weights_only)
        checkpoint["state_dict"] = model_state  # what was loaded, for on_load_checkpoint hooks to check
        return checkpoint


class PaCAFSDPStrategy(FSDPStrategy):
    """Lightning's FSDP1 strategy for PaCA: ``use_orig_params=True``, delta form, CPU capable.

    Before wrapping, every adapted model switches to the delta form (`use_delta_form`); unless
    an ``auto_wrap_policy`` is given, each decoder layer becomes its own FSDP unit. Lightning's
    ``FSDPStrategy`` refuses CPU; this subclass passes ``device_id=cpu`` to FSDP so 2-process
    gloo runs work for testing. Checkpoints default to ``state_dict_type="sharded"``.

    The trainable parameters are kept out of FSDP1's flat parameters (`replicate_trainable`,
    added to any ``ignored_states`` given): whole on every rank, gradients all-reduced, so
    gradient and AdamW memory per rank is the trainable size rather than the flattened units'.
    `PaCAModelParallelStrategy` (FSDP2) shards them too (trainable / world size per rank).
    """

    strategy_name = "paca_fsdp"

    def __init__(self, *, auto_wrap_policy=None, state_dict_type: str = "sharded", **kwargs: Any) -> None:
        if kwargs.pop("use_orig_params", True) is not True:
            raise ValueError("PaCAFSDPStrategy needs use_orig_params=True: PaCA's paca_weight must stay a "
                             "parameter of its own for the optimizer and the adapter files")
        # kept apart: each setup adds the replicated trainable parameters of the model it wraps
        self._given_ignored_states = list(kwargs.pop("ignored_states", None) or ())
        super().__init__(auto_wrap_policy=auto_wrap_policy, state_dict_type=state_dict_type,
                         use_orig_params=True, **kwargs)

    def setup(self, trainer) -> None:
        if self.root_device.type == "cpu" and self._state_dict_type == "full":
            raise ValueError("PaCAFSDPStrategy(state_dict_type='full') on CPU: FSDP1's full state dict "
                             "offloads to CPU, which crashes under gloo; use state_dict_type='sharded' on CPU")
        super().setup(trainer)

    def load_checkpoint(self, checkpoint_path, weights_only: Optional[bool] = None) -> dict[str, Any]:
        """Lightning's loader, except for sharded checkpoints: they may hold only some of the
        model's tensors when the module loads non-strictly (`PaCACallback`'s adapter-only
        checkpoints), and the replicated trainable parameters' optimizer state is loaded whole."""
        from lightning.fabric.strategies.fsdp import (
            _METADATA_FILENAME,
            _get_sharded_state_dict_context,
            _is_sharded_checkpoint,
        )
        from torch.distributed._shard.sharded_tensor import ShardedTensor
        from torch.distributed.checkpoint import FileSystemReader, load
        from torch.distributed.checkpoint.optimizer import load_sharded_optimizer_state_dict
        from torch.distributed.fsdp import FullyShardedDataParallel

        path = Path(self.broadcast(checkpoint_path))
        if not _is_sharded_checkpoint(path):
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        saved = FileSystemReader(path).read_metadata().state_dict_metadata
        with _get_sharded_state_dict_context(self.model):
            model_state = {key: value for key, value in self.model.state_dict().items() if f"model.{key}" in saved}
            load({"model": model_state}, checkpoint_id=path)
            self.model.load_state_dict(model_state, strict=self.lightning_module.strict_loading)
            # FSDP1's sharded state dict holds its own parameters as ShardedTensors and the
            # ignored (replicated) ones as plain tensors
            replicated = {key for key, value in model_state.items() if not isinstance(value, ShardedTensor)}
            for index, optimizer in enumerate(self.optimizers):
                key = f"optimizer_{index}"
                optimizer_state = load_sharded_optimizer_state_dict(model_state_dict=model_state, optimizer_key=key,
                                                                    storage_reader=FileSystemReader(path))
                # that loader splits every optimizer tensor over the ranks, as for flat parameters;
                # a replicated parameter's state is read again whole, as it was saved
                for name, values in optimizer_state[key]["state"].items():
                    if name in replicated:
                        for field, value in values.items():
                            if isinstance(value, ShardedTensor):
                                values[field] = torch.empty(value.size(), dtype=value.dtype)
                load(optimizer_state, checkpoint_id=path)
                optimizer.load_state_dict(FullyShardedDataParallel.optim_state_dict_to_load(
                    optim_state_dict=optimizer_state[key], model=self.model, optim=optimizer))
        checkpoint = torch.load(path / _METADATA_FILENAME, weights_only=weights_only)
        checkpoint["state_dict"] = {key: None for key in model_state}  # the loaded keys, for hooks to check
        return checkpoint

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        models = paca_models(model)
        if not models:
            raise RuntimeError(f"{type(self).__name__} found no PaCA model in {type(model).__name__}; adapt it "
                               "in __init__ or configure_model (PaCAFineTuneModule and PaCACallback do)")
        for paca_model in models:
            use_delta_form(paca_model)  # refuses QPaCA layers, which FSDP1 cannot flatten
        replicated = [param for paca_model in models for param in replicate_trainable(paca_model)]
        self.kwargs["ignored_states"] = [*self._given_ignored_states, *replicated]
        if "auto_wrap_policy" not in self.kwargs:
            blocks = {type(block) for paca_model in models for block in decoder_layers(paca_model)}
            self.kwargs["auto_wrap_policy"] = ModuleWrapPolicy(blocks)
        if self.root_device.type != "cpu":
            return super()._setup_model(model)
        wrapped = FullyShardedDataParallel(module=model, cpu_offload=self.cpu_offload,
                                           mixed_precision=self.mixed_precision_config,
                                           sharding_strategy=self.sharding_strategy,
                                           device_id=self.root_device, **self.kwargs)
        from lightning.pytorch.strategies.fsdp import _setup_activation_checkpointing
        _setup_activation_checkpointing(wrapped, self._activation_checkpointing_kwargs)
        return wrapped
