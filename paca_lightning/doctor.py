"""``paca-lightning doctor``: what this installation can run, and what is in the way.

Checks the versions the project is tested with, the devices torch sees, bitsandbytes' backend for
QPaCA, and whether the ``lightning`` command on ``PATH`` is this package's launcher. The last one
matters because another package can install a ``lightning`` script of its own over ours without
a word from pip (``lightning-sdk``, which ``pip install litlogger`` pulls in, does); then
``lightning run recipes/oasst1.py`` fails with "No such command". ``paca-lightning run`` is the
same launcher under a name nothing else claims.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
from importlib import metadata
from pathlib import Path
from typing import Optional

OUR_LAUNCHER = "paca_lightning.launcher"
PACKAGES = ("torch", "lightning", "transformers", "bitsandbytes", "peft", "datasets")


def lightning_command_problem(path: Optional[str] = None) -> Optional[str]:
    """Why the ``lightning`` command on PATH (or at ``path``) is not this package's launcher, or None."""
    path = path or shutil.which("lightning")
    if path is None:
        return ("no `lightning` command on PATH; reinstall paca-lightning (pip install -e .) or use "
                "`paca-lightning run SCRIPT`")
    try:
        text = Path(path).read_text(errors="replace")[:4096]
    except OSError as error:
        return f"the `lightning` command at {path} cannot be read ({error})"
    if OUR_LAUNCHER in text:
        return None
    owners = sorted({entry.dist.name for entry in metadata.entry_points(group="console_scripts", name="lightning")
                     if entry.dist is not None and entry.value.split(":")[0] != OUR_LAUNCHER})
    by = f" (installed by {', '.join(owners)})" if owners else ""
    return (f"the `lightning` command at {path} is not paca-lightning's launcher{by}, so `lightning run "
            "recipes/...` will not work. Use `paca-lightning run recipes/oasst1.py` (same options), or get our "
            "command back with `pip install --force-reinstall --no-deps paca-lightning` (from a checkout: "
            "`pip install --no-deps -e .`)")


def report() -> tuple[list[str], list[str]]:
    """(lines describing the installation, problems found)."""
    lines, problems = [f"python        {sys.version.split()[0]} ({sys.executable})"], []
    for name in PACKAGES:
        try:
            lines.append(f"{name:<13} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            lines.append(f"{name:<13} not installed" + (" (needed for method='lora')" if name == "peft" else ""))
            if name != "peft":
                problems.append(f"{name} is not installed; pip install -e . installs it")
    import torch

    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append(f"cuda x{torch.cuda.device_count()} ({torch.cuda.get_device_name(0)})")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    if importlib.util.find_spec("habana_frameworks") is not None:
        devices.append("hpu (Intel Gaudi software found)")
    lines.append(f"devices       {', '.join(devices)}")
    lines.append(f"bitsandbytes  {_bitsandbytes_status(torch)}")
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    lines.append("hub           " + ("HF_HUB_OFFLINE is set: local paths and the cache only" if offline else
                                     "hub names are fetched from the network (HF_HUB_OFFLINE not set)"))
    problem = lightning_command_problem()
    lines.append(f"lightning cmd {shutil.which('lightning') or 'not found'}"
                 f"{' (paca-lightning launcher)' if problem is None else ''}")
    if problem:
        problems.append(problem)
    return lines, problems


def _bitsandbytes_status(torch) -> str:
    """Whether QPaCA can quantize here: a 4-bit round trip of a small tensor on the default device."""
    try:
        import bitsandbytes.functional as functional

        device = "cuda" if torch.cuda.is_available() else "cpu"
        packed, state = functional.quantize_4bit(torch.ones(64, 64, device=device), quant_type="nf4")
        functional.dequantize_4bit(packed, state)
        return f"nf4 works on {device} (QPaCA available)"
    except Exception as error:  # any failure means the same to the user: QPaCA cannot run here
        return f"cannot quantize here ({type(error).__name__}: {str(error)[:120]}); QPaCA unavailable"


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv:
        print("usage: paca-lightning doctor   (takes no arguments)", file=sys.stderr)
        return 2
    lines, problems = report()
    print("\n".join(lines))
    for problem in problems:
        print(f"problem: {problem}")
    print("no problems found" if not problems else f"{len(problems)} problem(s) found")
    return 1 if problems else 0
