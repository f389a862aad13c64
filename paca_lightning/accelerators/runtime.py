"""Intel Gaudi's PyTorch runtime (``habana_frameworks.torch``), imported only when needed.

Everything that touches Intel's software goes through this module, for two reasons:

* ``import paca_lightning`` must work, and stay fast, on machines without Gaudi software; the
  runtime is imported the first time an HPU is actually asked for.
* The tests replace the runtime by a stand-in module placed in ``sys.modules``; keeping every
  call to Intel's API in one file keeps that stand-in small and honest about what it imitates.

Names used from Intel's runtime (Intel Gaudi software 1.2x):
``habana_frameworks.torch.hpu`` (``is_available``, ``device_count``, ``get_device_name``,
``synchronize``, ``memory_stats``, ``memory_allocated``, ``max_memory_allocated``,
``reset_peak_memory_stats``), ``habana_frameworks.torch.core.mark_step``,
``habana_frameworks.torch.utils.internal.is_lazy`` and the module
``habana_frameworks.torch.distributed.hccl``, whose import registers the ``"hccl"`` backend with
``torch.distributed``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

RUNTIME_MODULE = "habana_frameworks.torch"
HCCL_MODULE = "habana_frameworks.torch.distributed.hccl"
#: ``torch.compile`` backend that Intel's bridge registers for HPU graphs.
HPU_COMPILE_BACKEND = "hpu_backend"

INSTALL_INSTRUCTIONS = (
    "Install the Intel Gaudi software stack on the host (driver + PyTorch bridge, e.g. "
    "`./habanalabs-installer.sh install --type pytorch`, see https://docs.habana.ai), or run inside "
    "Intel's Gaudi PyTorch container; this project's image is built by docker/hpu/Dockerfile. "
    "The bridge (`habana-torch-plugin`) ships only with that stack, not on PyPI."
)


class GaudiSoftwareNotFoundError(ModuleNotFoundError):
    """Raised when an HPU is requested but Intel's PyTorch bridge cannot be imported."""


def load_runtime() -> ModuleType:
    """Import and return ``habana_frameworks.torch`` with its ``hpu`` and ``core`` submodules.

    Raises:
        GaudiSoftwareNotFoundError: the bridge is not installed; the message says what to install.
    """
    try:
        runtime = importlib.import_module(RUNTIME_MODULE)
        importlib.import_module(f"{RUNTIME_MODULE}.core")
        importlib.import_module(f"{RUNTIME_MODULE}.hpu")
    except ImportError as error:
        raise GaudiSoftwareNotFoundError(
            f"An HPU was requested, but Intel Gaudi's PyTorch bridge is not importable "
            f"(`import {RUNTIME_MODULE}` failed: {error}). {INSTALL_INSTRUCTIONS}"
        ) from error
    return runtime


def runtime_available() -> bool:
    """True when the bridge imports and reports at least one usable Gaudi device.

    Only a missing bridge counts as "not available"; any other failure while importing it (a
    broken installation) propagates, so it is seen instead of silently training on the CPU.
    """
    try:
        runtime = load_runtime()
    except GaudiSoftwareNotFoundError:
        return False
    return bool(runtime.hpu.is_available())


def device_count() -> int:
    return int(load_runtime().hpu.device_count())


def device_name() -> str:
    return str(load_runtime().hpu.get_device_name())


def is_lazy_mode() -> bool:
    """Whether the bridge runs in lazy mode (``PT_HPU_LAZY_MODE=1``).

    The mode is fixed when the bridge is first imported. Eager mode (``PT_HPU_LAZY_MODE=0``,
    the default in Intel's current documentation) runs ops as they come and supports
    ``torch.compile(backend="hpu_backend")``; lazy mode accumulates ops into a graph that runs
    at each ``mark_step``.
    """
    load_runtime()
    internal = importlib.import_module(f"{RUNTIME_MODULE}.utils.internal")
    return bool(internal.is_lazy())


def mark_step() -> None:
    """Cut the lazy-mode graph here and launch it on the device."""
    load_runtime().core.mark_step()


def synchronize() -> None:
    """Wait until all work queued on the current HPU has finished."""
    load_runtime().hpu.synchronize()


def memory_stats() -> dict:
    """The bridge's allocator statistics for the process's HPU (bytes and counts by name)."""
    return dict(load_runtime().hpu.memory_stats())


def memory_allocated() -> int:
    return int(load_runtime().hpu.memory_allocated())


def max_memory_allocated() -> int:
    return int(load_runtime().hpu.max_memory_allocated())


def reset_peak_memory_stats() -> None:
    load_runtime().hpu.reset_peak_memory_stats()


def load_hccl_backend() -> None:
    """Register HCCL, Gaudi's collective library, as the ``"hccl"`` backend of ``torch.distributed``."""
    load_runtime()
    try:
        importlib.import_module(HCCL_MODULE)
    except ImportError as error:
        raise GaudiSoftwareNotFoundError(
            f"Multi-HPU training needs HCCL, but `import {HCCL_MODULE}` failed: {error}. "
            f"{INSTALL_INSTRUCTIONS}"
        ) from error
