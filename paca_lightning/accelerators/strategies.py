"""Lightning strategies for Intel Gaudi: one card, DDP over HCCL, and FSDP2 over HCCL.

::

    Trainer(accelerator="hpu", devices=1)                        -> SingleHPUStrategy  "hpu_single"
    Trainer(accelerator="hpu", devices=8)  (or num_nodes > 1)    -> HPUDDPStrategy     "hpu_ddp"
    Trainer(accelerator="hpu", devices=8, strategy="hpu_fsdp")   -> HPUFSDPStrategy    "hpu_fsdp"

The first two are picked by ``strategy="auto"`` (see ``registration.py``); FSDP2 is asked for by
name, as ``ModelParallelStrategy`` is on GPUs: the model is sharded in
``LightningModule.configure_model`` (e.g. ``paca_lightning.parallel.shard_paca_model`` with
``self.device_mesh["data_parallel"]``). For `PaCAFineTuneModule` and `paca_callbacks`,
``paca_lightning.training.PaCAHPUFSDPStrategy`` shards PaCA models itself and loads a local
model folder shard by shard, as ``PaCAModelParallelStrategy`` does on GPUs.

Execution modes. Intel's bridge runs eagerly by default (``PT_HPU_LAZY_MODE=0``) and then
supports ``trainer.fit(torch.compile(module, backend="hpu_backend"))`` with the single-card and
DDP strategies. With ``PT_HPU_LAZY_MODE=1`` ops are collected into a graph that only runs at a
``mark_step``; every strategy here places one after each backward, after each optimizer step and
after each validation/test/predict step, the boundaries Intel recommends, so a graph never spans
two of them.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any, Literal, Optional, Union

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.distributed import _init_dist_connection
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from . import runtime


class HPUExecutionMode:
    """Lazy-mode graph boundaries and the eager-only ``torch.compile`` check, for every HPU strategy."""

    _lazy_mode = False

    def setup_environment(self) -> None:
        super().setup_environment()
        self._lazy_mode = runtime.is_lazy_mode()

    def setup(self, trainer: Any) -> None:
        if self._lazy_mode and self.lightning_module._compiler_ctx is not None:
            raise MisconfigurationException(
                "trainer.fit() got a torch.compile'd module, but Intel Gaudi's bridge runs in lazy mode "
                "(PT_HPU_LAZY_MODE=1), where torch.compile is not supported. Set PT_HPU_LAZY_MODE=0 "
                f"before starting Python (eager mode, compile with backend='{runtime.HPU_COMPILE_BACKEND}'), "
                "or pass the module uncompiled."
            )
        super().setup(trainer)

    def post_backward(self, closure_loss: torch.Tensor) -> None:
        super().post_backward(closure_loss)
        self._end_lazy_graph()

    def optimizer_step(self, optimizer: Any, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        self._end_lazy_graph()
        return output

    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        output = super().validation_step(*args, **kwargs)
        self._end_lazy_graph()
        return output

    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        output = super().test_step(*args, **kwargs)
        self._end_lazy_graph()
        return output

    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        output = super().predict_step(*args, **kwargs)
        self._end_lazy_graph()
        return output

    def _end_lazy_graph(self) -> None:
        if self._lazy_mode:
            runtime.mark_step()


def init_hccl_process_group(strategy: Union[DDPStrategy, ModelParallelStrategy]) -> None:
    """Join the job's process group over HCCL.

    Lightning's own setup passes ``device_id=root_device`` to ``init_process_group``, which torch
    accepts only with a device index; on Gaudi every process's device is plain ``hpu`` (the card
    it opened), and HCCL binds that card itself, so the group is created without ``device_id``.
    """
    runtime.load_hccl_backend()
    reset_seed()
    strategy.set_world_ranks()
    strategy._process_group_backend = strategy._get_process_group_backend()
    _init_dist_connection(strategy.cluster_environment, strategy._process_group_backend, timeout=strategy._timeout)


class SingleHPUStrategy(HPUExecutionMode, SingleDeviceStrategy):
    """Training on one Gaudi card (``Trainer(accelerator="hpu", devices=1)``)."""

    strategy_name = "hpu_single"

    def __init__(self, device: Union[str, torch.device] = "hpu", **kwargs: Any) -> None:
        super().__init__(device=device, **kwargs)


class HPUDDPStrategy(HPUExecutionMode, DDPStrategy):
    """Data-parallel training, one process per Gaudi card, gradients all-reduced over HCCL.

    Launch is Lightning's: ``devices=N`` starts N-1 more processes of the same script on this node
    (or each process is started by ``torchrun``/SLURM/MPI, detected from the environment), and
    ``num_nodes`` spans hosts. Args are ``DDPStrategy``'s; ``process_group_backend`` is HCCL.
    """

    strategy_name = "hpu_ddp"

    def __init__(self, *, process_group_backend: str = "hccl", **kwargs: Any) -> None:
        super().__init__(process_group_backend=process_group_backend, **kwargs)

    def determine_ddp_device_ids(self) -> None:
        """``None``: DDP then uses the module's device; Lightning only opens a CUDA stream otherwise."""
        return None

    def setup_distributed(self) -> None:
        init_hccl_process_group(self)


class HPUFSDPStrategy(HPUExecutionMode, ModelParallelStrategy):
    """FSDP2 (``fully_shard``) across Gaudi cards over HCCL: Lightning's ``ModelParallelStrategy`` on HPU.

    Args:
        data_parallel_size: ranks that shard the model; ``"auto"`` = every rank of the job. Unlike
            ``ModelParallelStrategy`` (whose ``"auto"`` puts tensor parallelism inside a node), the
            default here is pure FSDP2: ``self.device_mesh["data_parallel"]`` spans the whole job.
        tensor_parallel_size: ranks per tensor-parallel group (``1``: none).
        save_distributed_checkpoint: one shard file per rank (``True``) or a full checkpoint
            gathered on rank 0.
        process_group_backend: HCCL, Gaudi's collective library.
        timeout: collective timeout.
    """

    strategy_name = "hpu_fsdp"

    def __init__(
        self,
        data_parallel_size: Union[Literal["auto"], int] = "auto",
        tensor_parallel_size: int = 1,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str = "hccl",
        timeout: Optional[timedelta] = default_pg_timeout,
    ) -> None:
        if not isinstance(tensor_parallel_size, int) or isinstance(tensor_parallel_size, bool) \
                or tensor_parallel_size < 1:
            raise MisconfigurationException(
                f"HPUFSDPStrategy: tensor_parallel_size must be a positive int, got {tensor_parallel_size!r}."
            )
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=tensor_parallel_size,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, timeout=timeout)

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            if self.world_size % self._tensor_parallel_size:
                raise MisconfigurationException(
                    f"HPUFSDPStrategy: the job has {self.world_size} ranks, not a multiple of "
                    f"tensor_parallel_size={self._tensor_parallel_size}."
                )
            self._data_parallel_size = self.world_size // self._tensor_parallel_size
        super().setup_environment()

    def _setup_distributed(self) -> None:
        init_hccl_process_group(self)
