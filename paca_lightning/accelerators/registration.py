"""Make ``Trainer(accelerator="hpu", devices=N)`` work on Lightning 2.6, with no extra argument.

Two things are needed; `register_hpu` does both, once per process:

1. **Names.** ``"hpu"`` goes into Lightning's ``AcceleratorRegistry`` (so the ``Trainer`` accepts
   the string) and ``"hpu_single"``, ``"hpu_ddp"``, ``"hpu_fsdp"`` into its ``StrategyRegistry``.
2. **Choices.** Lightning's ``_AcceleratorConnector`` turns the ``Trainer``'s accelerator,
   strategy and precision flags into objects. In 2.6 it still raises "HPU is currently not
   supported" whenever the accelerator is ``"hpu"`` and the strategy ``"auto"``, and it gives
   ``bf16-mixed`` a CUDA autocast on every accelerator but CPU and MPS. Lightning has no hook
   for these choices, so four connector methods are wrapped. Each wrapper decides only the HPU
   case and hands every other case to Lightning's original, unchanged:

   - ``_choose_auto_accelerator``: ``"auto"`` picks ``"hpu"`` when Lightning found no TPU, MPS or
     CUDA device but a Gaudi card is visible;
   - ``_choose_strategy``: 1 card and 1 node gives `SingleHPUStrategy`, anything more ``"hpu_ddp"``;
   - ``_check_strategy_and_fallback``: refuses a non-HPU strategy on HPU (Lightning's DDP setup
     assumes CUDA device indices and streams, ``"fsdp"`` demands CUDA) and an HPU strategy on
     another accelerator, naming the valid choices;
   - ``_check_and_init_precision``: `hpu_precision_plugin`, unless a precision plugin was given.

These are private Lightning methods, so they are wrapped only on the Lightning versions whose
connector was read and tested (`CONNECTOR_VERSIONS`; ``pyproject.toml`` pins ``lightning<2.7``
and the HPU tests exercise every wrapper through a real ``Trainer``). On any other version the
names are still registered, nothing is wrapped, and a warning says to pass the HPU strategy and
precision plugin explicitly. The wrappers act only when the accelerator is an HPU or an HPU
strategy is named; every other ``Trainer`` goes through Lightning's own code unchanged.
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning
from lightning.pytorch.accelerators import AcceleratorRegistry
from lightning.pytorch.strategies import Strategy, StrategyRegistry
from lightning.pytorch.trainer.connectors.accelerator_connector import _AcceleratorConnector
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from .hpu import HPUAccelerator, hpu_precision_plugin
from .strategies import HPUDDPStrategy, HPUExecutionMode, HPUFSDPStrategy, SingleHPUStrategy

# Lightning versions whose private _AcceleratorConnector methods the wrappers below were written for.
CONNECTOR_VERSIONS = ("2.6.",)
_WRAPPED_METHODS = ("_choose_auto_accelerator", "_choose_strategy", "_check_strategy_and_fallback",
                    "_check_and_init_precision")

HPU_STRATEGIES = (SingleHPUStrategy, HPUDDPStrategy, HPUFSDPStrategy)
HPU_STRATEGY_NAMES = tuple(strategy.strategy_name for strategy in HPU_STRATEGIES)

_DESCRIPTIONS = {
    "hpu": "Intel Gaudi HPU (paca_lightning)",
    "hpu_single": "one Intel Gaudi card (paca_lightning)",
    "hpu_ddp": "DDP over HCCL on Intel Gaudi cards (paca_lightning)",
    "hpu_fsdp": "FSDP2 over HCCL on Intel Gaudi cards (paca_lightning)",
}


def register_hpu() -> None:
    """Register the HPU accelerator and strategies with Lightning and teach its connector to pick them.

    Idempotent. Raises if another package already registered one of these names with its own
    class: two HPU integrations in one process would otherwise silently shadow each other.
    """
    _register(AcceleratorRegistry, "hpu", HPUAccelerator, "accelerator")
    for strategy in HPU_STRATEGIES:
        _register(StrategyRegistry, strategy.strategy_name, strategy, "strategy")
    _extend_connector()


def _register(registry: dict, name: str, cls: type, kind: str) -> None:
    if name in registry:
        registered = registry[name][kind]
        if registered is cls:
            return
        raise RuntimeError(
            f"Lightning's {kind} name {name!r} is already registered to {registered.__module__}."
            f"{registered.__qualname__}; paca_lightning would register {cls.__module__}.{cls.__qualname__}. "
            "Uninstall one of the two HPU integrations."
        )
    registry.register(name, cls, description=_DESCRIPTIONS[name])


def _is_hpu_strategy(strategy: Any) -> bool:
    # every strategy built on the HPU execution mode, e.g. paca_lightning.training.PaCAHPUFSDPStrategy
    return isinstance(strategy, HPUExecutionMode) or strategy in HPU_STRATEGY_NAMES


def _describe(strategy: Any) -> str:
    return repr(strategy) if isinstance(strategy, str) else type(strategy).__name__


def _extend_connector() -> None:
    connector = _AcceleratorConnector
    if getattr(connector, "_paca_hpu_support", False):
        return
    if not lightning.__version__.startswith(CONNECTOR_VERSIONS) or \
            not all(hasattr(connector, name) for name in _WRAPPED_METHODS):
        warnings.warn(f"paca_lightning supports accelerator='hpu' with strategy='auto' and HPU precision "
                      f"plugins on lightning {' / '.join(v + 'x' for v in CONNECTOR_VERSIONS)}, not on the "
                      f"installed lightning {lightning.__version__}. Pass the strategy (SingleHPUStrategy(), "
                      "'hpu_ddp' or 'hpu_fsdp') and plugins=[hpu_precision_plugin(...)] to the Trainer yourself, "
                      "or install lightning 2.6", stacklevel=2)
        return
    choose_auto_accelerator = connector._choose_auto_accelerator
    choose_strategy = connector._choose_strategy
    check_strategy_and_fallback = connector._check_strategy_and_fallback
    check_and_init_precision = connector._check_and_init_precision

    def _choose_auto_accelerator_with_hpu() -> str:
        chosen = choose_auto_accelerator()
        if chosen == "cpu" and HPUAccelerator.is_available():
            return "hpu"
        return chosen

    def _choose_strategy_with_hpu(self: _AcceleratorConnector) -> Strategy | str:
        if not isinstance(self.accelerator, HPUAccelerator):
            return choose_strategy(self)
        if self._num_nodes_flag > 1 or len(self._parallel_devices) > 1:
            return HPUDDPStrategy.strategy_name
        return SingleHPUStrategy(device=self._parallel_devices[0])

    def _check_strategy_and_fallback_with_hpu(self: _AcceleratorConnector) -> None:
        on_hpu = isinstance(self.accelerator, HPUAccelerator)
        if on_hpu and not _is_hpu_strategy(self._strategy_flag):
            raise MisconfigurationException(
                f"strategy={_describe(self._strategy_flag)} does not run on accelerator='hpu'. Use "
                "'auto' (one card: 'hpu_single', several: 'hpu_ddp'), 'hpu_ddp' (DDP over HCCL) or "
                "'hpu_fsdp' (FSDP2 over HCCL), or an instance of SingleHPUStrategy, HPUDDPStrategy or "
                "HPUFSDPStrategy from paca_lightning.accelerators, or PaCAHPUFSDPStrategy from "
                "paca_lightning.training (FSDP2 for PaCA models, with sharded loading)."
            )
        if not on_hpu and _is_hpu_strategy(self._strategy_flag):
            raise MisconfigurationException(
                f"strategy={_describe(self._strategy_flag)} runs only on Intel Gaudi: pass "
                f"accelerator='hpu' (got accelerator={type(self.accelerator).__name__})."
            )
        check_strategy_and_fallback(self)

    def _check_and_init_precision_with_hpu(self: _AcceleratorConnector) -> Any:
        if isinstance(self.accelerator, HPUAccelerator) and self._precision_plugin_flag is None:
            self._validate_precision_choice()
            return hpu_precision_plugin(self._precision_flag)
        return check_and_init_precision(self)

    connector._choose_auto_accelerator = staticmethod(_choose_auto_accelerator_with_hpu)
    connector._choose_strategy = _choose_strategy_with_hpu
    connector._check_strategy_and_fallback = _check_strategy_and_fallback_with_hpu
    connector._check_and_init_precision = _check_and_init_precision_with_hpu
    connector._paca_hpu_support = True
