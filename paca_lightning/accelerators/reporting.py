"""Throughput that is right on asynchronous devices, HPU included.

CUDA and Gaudi queue work and return to Python at once, so a clock read after a step measures
when the host *queued* it. Lightning's ``ThroughputMonitor`` synchronizes CUDA before reading the
clock and nothing else; `SynchronizedThroughputMonitor` synchronizes whatever device the run
uses. Device memory on HPU is reported by ``HPUAccelerator.get_device_stats`` (the allocator's
statistics, logged by Lightning's ``DeviceStatsMonitor``).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.callbacks import ThroughputMonitor

from . import runtime


def synchronize_device(device: torch.device) -> None:
    """Block until all work queued on ``device`` has finished (no-op for the synchronous CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "hpu":
        runtime.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()
    elif device.type != "cpu":
        raise ValueError(f"synchronize_device: no synchronization known for device type {device.type!r}")


class SynchronizedThroughputMonitor(ThroughputMonitor):
    """Lightning's ``ThroughputMonitor`` (same arguments and metrics) that waits for the device
    before every clock reading, so samples/s and tokens/s are right on HPU too.

    Only rank 0 measures, as in the parent, so only rank 0 waits.
    """

    def _wait_for_device(self, trainer: Any) -> None:
        if trainer.is_global_zero:
            synchronize_device(trainer.strategy.root_device)

    def on_train_start(self, trainer: Any, *args: Any) -> None:
        self._wait_for_device(trainer)
        super().on_train_start(trainer, *args)

    def on_train_batch_end(self, trainer: Any, *args: Any, **kwargs: Any) -> None:
        self._wait_for_device(trainer)
        super().on_train_batch_end(trainer, *args, **kwargs)

    def on_validation_start(self, trainer: Any, *args: Any) -> None:
        self._wait_for_device(trainer)
        super().on_validation_start(trainer, *args)

    def on_validation_batch_end(self, trainer: Any, *args: Any, **kwargs: Any) -> None:
        self._wait_for_device(trainer)
        super().on_validation_batch_end(trainer, *args, **kwargs)

    def on_test_start(self, trainer: Any, *args: Any) -> None:
        self._wait_for_device(trainer)
        super().on_test_start(trainer, *args)

    def on_test_batch_end(self, trainer: Any, *args: Any, **kwargs: Any) -> None:
        self._wait_for_device(trainer)
        super().on_test_batch_end(trainer, *args, **kwargs)

    def on_predict_start(self, trainer: Any, *args: Any) -> None:
        self._wait_for_device(trainer)
        super().on_predict_start(trainer, *args)

    def on_predict_batch_end(self, trainer: Any, *args: Any, **kwargs: Any) -> None:
        self._wait_for_device(trainer)
        super().on_predict_batch_end(trainer, *args, **kwargs)
