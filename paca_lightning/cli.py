"""`paca-lightning` command: one subcommand per job, each implemented in its own module."""

from __future__ import annotations

import importlib
import sys
from typing import Optional

# subcommand -> ("module:function" taking the remaining arguments, one-line help)
SUBCOMMANDS = {
    "run": ("paca_lightning.launcher:run_main",
            "run a recipe or script, on one or many processes (as `lightning run`)"),
    "doctor": ("paca_lightning.doctor:main",
               "check the installation: versions, devices, QPaCA, the `lightning` command"),
    "bench": ("paca_lightning.bench:main", "measure PaCA against LoRA, DoRA, full fine-tuning and the floor"),
    "plan": ("paca_lightning.bench.plan:main",
             "plan one training step's memory per method from a model config, under fake tensors"),
}


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        lines = [f"  {name:<10} {help_text}" for name, (_, help_text) in SUBCOMMANDS.items()]
        usage = "usage: paca-lightning SUBCOMMAND [args]\n\nsubcommands:\n" + "\n".join(lines)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"paca-lightning: unknown subcommand {argv[0]!r}\n\n{usage}", file=sys.stderr)
            return 2
        print(usage)
        return 0
    module_name, _, function = SUBCOMMANDS[argv[0]][0].partition(":")
    return getattr(importlib.import_module(module_name), function)(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
