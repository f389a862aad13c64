"""Lightning accelerator and precision choice for Intel Gaudi HPUs.

Lightning 2.6 removed its own HPU support, and the archived ``lightning-habana`` package does not
import against it. This module is the small replacement: an ``Accelerator`` built directly on
Intel's runtime (see ``runtime.py``), registered under the name ``"hpu"`` by ``registration.py``.

Device model. Gaudi cards are not addressed by index from Python: each process opens one card,
and which cards a host exposes is chosen outside Python with ``HABANA_VISIBLE_MODULES``. So
``devices`` is a count (``"auto"`` or ``-1`` for every visible card), every process's device is
plain ``hpu``, and a multi-card run is one process per card (``strategies.HPUDDPStrategy``).
"""

from __future__ import annotations

from typing import Any, Union

import torch
from lightning.fabric.utilities.types import _DEVICE
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.plugins.precision import HalfPrecision, MixedPrecision, Precision
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from . import runtime

#: Precision settings this integration builds a plugin for on HPU. bf16 is Gaudi's native
#: low-precision format and needs no loss scaling; fp16 would need ``GradScaler`` on HPU, which
#: this project has not run, so it is refused rather than offered untested.
SUPPORTED_PRECISION = ("32-true", "bf16-mixed", "bf16-true")


class HPUAccelerator(Accelerator):
    """Intel Gaudi (HPU) accelerator: ``Trainer(accelerator="hpu", devices=N)``.

    Constructing it imports Intel's bridge, so a machine without Gaudi software fails here, when
    the ``Trainer`` is built, with a message naming what to install (``GaudiSoftwareNotFoundError``),
    and a machine whose bridge sees no card fails with the container flags that expose one.
    """

    def __init__(self) -> None:
        super().__init__()
        runtime.load_runtime()
        if not runtime.runtime_available():
            raise MisconfigurationException(
                "Intel Gaudi's PyTorch bridge is installed but sees no Gaudi device "
                "(habana_frameworks.torch.hpu.is_available() is False). Check `hl-smi` on the host; "
                "in Docker run with `--runtime=habana -e HABANA_VISIBLE_DEVICES=all`."
            )

    def setup_device(self, device: torch.device) -> None:
        if device.type != "hpu":
            raise MisconfigurationException(f"HPUAccelerator runs on device type 'hpu', got device {device}.")

    def setup(self, trainer: Any) -> None:
        mode = "lazy (PT_HPU_LAZY_MODE=1)" if runtime.is_lazy_mode() else "eager (PT_HPU_LAZY_MODE=0)"
        rank_zero_info(f"HPU: {runtime.device_name()} x {trainer.num_devices} per node, {mode} mode")

    def get_device_stats(self, device: _DEVICE) -> dict[str, Any]:
        """The bridge's allocator statistics of this process's card (what ``DeviceStatsMonitor`` logs)."""
        return runtime.memory_stats()

    def teardown(self) -> None:
        """Nothing to release: the bridge frees the card when the process exits."""

    @staticmethod
    def parse_devices(devices: Union[int, str, list[int]]) -> int:
        """Turn the ``Trainer``'s ``devices`` into a number of cards, checked against what is visible."""
        visible = runtime.device_count()
        requested = devices
        if isinstance(requested, str):
            text = requested.strip()
            if text == "auto":
                return visible
            if not text.lstrip("-").isdigit():
                raise MisconfigurationException(
                    f"`devices={devices!r}` is not valid for accelerator='hpu': pass a number of cards, "
                    f"-1 or 'auto' (all {visible} visible)."
                )
            requested = int(text)
        if isinstance(requested, bool) or not isinstance(requested, int):
            raise MisconfigurationException(
                f"`devices={devices!r}` is not valid for accelerator='hpu': pass a number of cards, -1 or "
                "'auto'. Gaudi cards cannot be picked by index from Python; choose which ones a host "
                "exposes with the HABANA_VISIBLE_MODULES environment variable (e.g. '0,1')."
            )
        if requested == -1:
            return visible
        if requested < 1 or requested > visible:
            raise MisconfigurationException(
                f"`devices={requested}` is not valid for accelerator='hpu': this host exposes {visible} "
                f"Gaudi card(s), so use 1..{visible}, -1 or 'auto'."
            )
        return requested

    @staticmethod
    def get_parallel_devices(devices: int) -> list[torch.device]:
        return [torch.device("hpu")] * devices

    @staticmethod
    def auto_device_count() -> int:
        return runtime.device_count()

    @staticmethod
    def is_available() -> bool:
        return runtime.runtime_available()

    @staticmethod
    def name() -> str:
        return "hpu"


def hpu_precision_plugin(precision: str) -> Precision:
    """The precision plugin for ``Trainer(precision=...)`` on HPU.

    Lightning 2.6's connector would hand ``bf16-mixed`` a CUDA autocast context on any device that
    is not CPU or MPS; on HPU autocast must target device type ``"hpu"``.
    """
    if precision == "32-true":
        return Precision()
    if precision == "bf16-mixed":
        return MixedPrecision("bf16-mixed", device="hpu")
    if precision == "bf16-true":
        return HalfPrecision("bf16-true")
    raise MisconfigurationException(
        f"`precision={precision!r}` is not supported on accelerator='hpu' by paca_lightning; "
        f"use one of {', '.join(SUPPORTED_PRECISION)} (bf16 needs no loss scaling on Gaudi)."
    )
