"""Intel Gaudi (HPU) support for Lightning 2.6: ``Trainer(accelerator="hpu", devices=N)``.

Importing ``paca_lightning`` registers ``"hpu"`` with Lightning (see ``registration.py``) without
importing Lightning itself, which would add seconds to every ``import paca_lightning``. If
``lightning.pytorch`` is already imported, registration happens now; otherwise a one-shot import
hook runs it right after ``lightning.pytorch`` finishes importing, before any user code can build
a ``Trainer``. Neither path imports Intel's software: that happens when an HPU is requested.

Files:
    runtime.py       every call into Intel's ``habana_frameworks.torch`` (imported on demand)
    hpu.py           ``HPUAccelerator`` and the precision plugins offered on HPU
    strategies.py    ``SingleHPUStrategy``, ``HPUDDPStrategy`` (HCCL), ``HPUFSDPStrategy`` (FSDP2)
    registration.py  registry names and the Trainer's choice of accelerator/strategy/precision
    reporting.py     device synchronization and a throughput monitor that times HPUs correctly
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
from collections.abc import Callable
from typing import Any

_LIGHTNING_MODULE = "lightning.pytorch"

_EXPORTS = {
    "HPUAccelerator": "hpu",
    "hpu_precision_plugin": "hpu",
    "SUPPORTED_PRECISION": "hpu",
    "SingleHPUStrategy": "strategies",
    "HPUDDPStrategy": "strategies",
    "HPUFSDPStrategy": "strategies",
    "register_hpu": "registration",
    "GaudiSoftwareNotFoundError": "runtime",
    "HPU_COMPILE_BACKEND": "runtime",
    "SynchronizedThroughputMonitor": "reporting",
    "synchronize_device": "reporting",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import the submodule that defines ``name`` on first use (they import Lightning)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


class RunAfterImport(importlib.abc.MetaPathFinder):
    """Run ``callback`` once, right after the module ``module_name`` has been imported.

    The finder sits first on ``sys.meta_path``. When Python looks for ``module_name``, it asks
    the other finders for the real spec and wraps the spec's loader so that ``callback`` runs
    after the module's code; the finder then removes itself. A failed import leaves the finder
    in place, so the next attempt is hooked too.
    """

    def __init__(self, module_name: str, callback: Callable[[], None]) -> None:
        self.module_name = module_name
        self.callback = callback

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != self.module_name:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _LoaderThenCallback(spec.loader, self)
                return spec
        return None

    def _imported(self) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        self.callback()


class _LoaderThenCallback(importlib.abc.Loader):
    """Delegates to the real loader; calls the hook once the module has executed."""

    def __init__(self, loader: Any, hook: RunAfterImport) -> None:
        self._loader = loader
        self._hook = hook

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        self._hook._imported()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


def _register_with_lightning() -> None:
    from .registration import register_hpu

    register_hpu()


if _LIGHTNING_MODULE in sys.modules:
    _register_with_lightning()
else:
    sys.meta_path.insert(0, RunAfterImport(_LIGHTNING_MODULE, _register_with_lightning))
