"""The ``lightning`` command: ``lightning run SCRIPT [script args]``.

Lightning 2.6 ships no ``lightning`` command (``lightning run model`` was removed in 2.5.1,
only ``fabric run`` remains), and our users start recipes with ``lightning run
recipes/oasst1.py``. This restores it:

    lightning run recipes/oasst1.py                         # one process, the script's defaults
    lightning run --devices 2 --strategy ddp recipes/oasst1.py --trainer.max_steps=100
    lightning run --accelerator cuda --devices 8 --num-nodes 2 --node-rank 0 \
        --main-address 10.0.0.1 recipes/oasst1.py --config recipes/configs/llama3_8b_oasst1_paca.yaml

One process runs the script directly. Several (``--devices`` > 1 or ``--num-nodes`` > 1) are
started by torchrun, as ``fabric run`` does. A ``Trainer`` ignores the launcher's environment
(it runs DDP only when told ``devices=N``), so the launch options also reach the script: as
``LT_*`` variables (Fabric reads them) and, for LightningCLI scripts such as the recipes, as
``--trainer.accelerator/devices/num_nodes/strategy`` arguments placed after the user's last
``--config`` (LightningCLI applies arguments in order, so a config's ``devices: 1`` would
otherwise undo ``--devices 8``) and before the rest, so an explicit ``--trainer.devices`` after
the script name still wins.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from pathlib import Path
from typing import Optional

LAUNCH_OPTIONS = ("accelerator", "devices", "num_nodes", "strategy")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightning", description="Run a Lightning script, on one or many processes.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run SCRIPT with its arguments, via torchrun when several processes "
                                          "are asked for", description=__doc__.split("\n\n")[0])
    run.add_argument("--accelerator", default=None, help="cpu, cuda, gpu, mps, hpu or auto (passed to the Trainer)")
    run.add_argument("--devices", default=None, help="processes per node (an int), or 'auto' (one)")
    run.add_argument("--num-nodes", "--num_nodes", dest="num_nodes", type=int, default=1, help="machines taking part")
    run.add_argument("--node-rank", "--node_rank", dest="node_rank", type=int, default=0, help="this machine's rank")
    run.add_argument("--main-address", "--main_address", dest="main_address", default="127.0.0.1",
                     help="address of the rank-0 machine")
    run.add_argument("--main-port", "--main_port", dest="main_port", type=int, default=29400,
                     help="port on the rank-0 machine")
    run.add_argument("--strategy", default=None, help="ddp, fsdp, deepspeed, ... (passed to the Trainer)")
    run.add_argument("--no-trainer-args", dest="trainer_args", action="store_false",
                     help="do not add --trainer.* arguments (for scripts that are not LightningCLI scripts)")
    run.add_argument("script", help="path of the Python script to run")
    run.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments for the script")
    return parser


def processes_per_node(devices: Optional[str]) -> int:
    """How many processes to start on this machine for ``--devices``."""
    if devices in (None, "auto"):
        return 1
    try:
        count = int(devices)
    except ValueError:
        if "," in str(devices):  # a device list such as "0,1,3"
            return len([d for d in str(devices).split(",") if d.strip()])
        raise ValueError(f"--devices must be an int, 'auto' or a comma-separated device list, "
                         f"got {devices!r}") from None
    if count < 1:
        raise ValueError(f"--devices must be >= 1 to launch processes, got {count}")
    return count


def trainer_arguments(args: argparse.Namespace) -> list[str]:
    """``--trainer.*`` arguments mirroring the launch options the user gave."""
    if not args.trainer_args:
        return []
    given = {"accelerator": args.accelerator, "devices": args.devices, "strategy": args.strategy,
             "num_nodes": args.num_nodes if args.num_nodes != 1 else None}
    return [f"--trainer.{name}={value}" for name, value in given.items() if value is not None]


def place_trainer_arguments(trainer_args: list[str], script_args: list[str]) -> list[str]:
    """``script_args`` with ``trainer_args`` inserted right after its last ``--config``/``-c``
    file; an option the user wrote out themselves (``--trainer.devices ...``) is not added."""
    after = 0
    for index, argument in enumerate(script_args):
        if argument in ("--config", "-c"):
            after = index + 2
        elif argument.startswith(("--config=", "-c=")):
            after = index + 1
    given = {argument.split("=", 1)[0] for argument in script_args}
    added = [argument for argument in trainer_args if argument.split("=", 1)[0] not in given]
    return script_args[:after] + added + script_args[after:]


def launch_environment(args: argparse.Namespace) -> dict[str, str]:
    """The ``LT_*`` variables Fabric reads, as ``fabric run`` sets them."""
    environment = {"LT_CLI_USED": "1", "LT_DEVICES": str(args.devices or "auto"), "LT_NUM_NODES": str(args.num_nodes)}
    if args.accelerator is not None:
        environment["LT_ACCELERATOR"] = str(args.accelerator)
    if args.strategy is not None:
        environment["LT_STRATEGY"] = str(args.strategy)
    return environment


def torchrun_arguments(args: argparse.Namespace, script_args: list[str]) -> list[str]:
    return [f"--nproc_per_node={processes_per_node(args.devices)}", f"--nnodes={args.num_nodes}",
            f"--node_rank={args.node_rank}", f"--master_addr={args.main_address}",
            f"--master_port={args.main_port}", args.script, *script_args]


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    script = Path(args.script)
    if not script.is_file():
        print(f"lightning run: no such script {args.script!r}", file=sys.stderr)
        return 2
    try:
        nprocs = processes_per_node(args.devices)
    except ValueError as error:
        print(f"lightning run: {error}", file=sys.stderr)
        return 2
    script_args = place_trainer_arguments(trainer_arguments(args), list(args.script_args))
    os.environ.update(launch_environment(args))
    if nprocs == 1 and args.num_nodes == 1:
        sys.argv = [str(script), *script_args]
        sys.path.insert(0, str(script.resolve().parent))
        try:
            runpy.run_path(str(script), run_name="__main__")
        except SystemExit as exit_:
            if exit_.code is None or isinstance(exit_.code, int):
                return exit_.code or 0
            print(exit_.code, file=sys.stderr)  # sys.exit("message"): the message, as Python prints it
            return 1
        return 0
    import torch.distributed.run as torchrun
    from lightning.fabric.utilities.distributed import _suggested_max_num_threads

    os.environ.setdefault("OMP_NUM_THREADS", str(_suggested_max_num_threads(nprocs)))
    torchrun.main(torchrun_arguments(args, script_args))
    return 0


def run_main(argv: Optional[list[str]] = None) -> int:
    """``paca-lightning run ...``: the same launcher under a name no other package installs."""
    return main(["run", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
