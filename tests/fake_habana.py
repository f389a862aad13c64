"""A STAND-IN for Intel Gaudi's PyTorch bridge (``habana_frameworks.torch``), for CPU-only tests.

This is not Intel's software and runs nothing on a Gaudi card. It imitates exactly the names
``paca_lightning/accelerators/runtime.py`` calls, so the HPU wiring (registration, accelerator
and strategy choice, precision, lazy-mode step boundaries, HCCL process-group setup) can be
tested on machines without Gaudi hardware. It records what was called so tests can assert on it.
"""

from __future__ import annotations

import sys
from types import ModuleType

import pytest


class StandInGaudiRuntime:
    """State behind the stand-in modules: device count, execution mode, and call records."""

    def __init__(self, devices: int = 8, lazy: bool = False) -> None:
        self.devices = devices
        self.lazy = lazy
        self.mark_steps = 0
        self.synchronizes = 0
        self.peak_allocated = 123_456_789

    def modules(self) -> dict[str, ModuleType]:
        """The modules to place in ``sys.modules``, keyed by their import names."""
        root = ModuleType("habana_frameworks")
        torch_module = ModuleType("habana_frameworks.torch")
        core = ModuleType("habana_frameworks.torch.core")
        hpu = ModuleType("habana_frameworks.torch.hpu")
        utils = ModuleType("habana_frameworks.torch.utils")
        internal = ModuleType("habana_frameworks.torch.utils.internal")
        distributed = ModuleType("habana_frameworks.torch.distributed")
        hccl = ModuleType("habana_frameworks.torch.distributed.hccl")

        def mark_step() -> None:
            self.mark_steps += 1

        def synchronize() -> None:
            self.synchronizes += 1

        core.mark_step = mark_step
        hpu.is_available = lambda: self.devices > 0
        hpu.device_count = lambda: self.devices
        hpu.get_device_name = lambda: "GAUDI2 (stand-in)"
        hpu.synchronize = synchronize
        hpu.memory_stats = lambda: {"InUse": 1024, "MaxInUse": self.peak_allocated, "Limit": 96 * 2**30}
        hpu.memory_allocated = lambda: 1024
        hpu.max_memory_allocated = lambda: self.peak_allocated
        hpu.reset_peak_memory_stats = lambda: None
        internal.is_lazy = lambda: self.lazy
        root.torch = torch_module
        torch_module.core, torch_module.hpu, torch_module.utils = core, hpu, utils
        torch_module.distributed = distributed
        utils.internal = internal
        distributed.hccl = hccl
        return {module.__name__: module for module in
                (root, torch_module, core, hpu, utils, internal, distributed, hccl)}


def install(monkeypatch: pytest.MonkeyPatch, devices: int = 8, lazy: bool = False) -> StandInGaudiRuntime:
    """Put a stand-in runtime into ``sys.modules`` for one test (undone by ``monkeypatch``)."""
    runtime = StandInGaudiRuntime(devices=devices, lazy=lazy)
    for name, module in runtime.modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    return runtime


def remove(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``import habana_frameworks.torch`` fail for one test, as on a machine without Gaudi software."""
    for name in [name for name in sys.modules if name.split(".")[0] == "habana_frameworks"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "habana_frameworks", None)
