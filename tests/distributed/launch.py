"""Run a worker script in 2 gloo processes with torchrun, once per pytest session.

Each launch costs seconds of interpreter and import start-up on 2 cores, so one worker checks
many properties and its JSON findings are shared by every test that needs them.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROCESSES = 2


def finish_worker(out_dir: Path, results: dict) -> None:
    """End a worker: rank 0 writes ``results.json``, every rank leaves the process group, and the
    process exits without running static destructors.

    Interpreter shutdown after gloo groups, device meshes and FSDP states sometimes aborts in a
    C++ destructor ("terminate called without an active exception", seen in about 6% of
    launches), which would fail a run whose work is done.
    """
    import torch.distributed as dist

    if dist.get_rank() == 0:
        (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_torchrun(script: str, out_dir: Path, *args: str, timeout: float = 300) -> None:
    """Run ``tests/distributed/<script>`` under torchrun; raise with its output when it fails."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={PROCESSES}",
               "--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0", str(HERE / script), str(out_dir), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, cwd=out_dir, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"{script} failed (exit {result.returncode}):\n{result.stdout[-4000:]}\n"
                             f"{result.stderr[-8000:]}")


def results(script: str) -> dict:
    """The findings ``script`` writes to ``<out_dir>/results.json`` (rank 0), run once; a failed
    run fails every test that asks, without being launched again."""
    outcome = _launch(script)
    if isinstance(outcome, AssertionError):
        raise outcome
    return outcome


@functools.cache
def _launch(script: str):
    out_dir = Path(tempfile.mkdtemp(prefix=f"paca_{Path(script).stem}_"))
    atexit.register(shutil.rmtree, out_dir, ignore_errors=True)  # checkpoints of every run: tens of MB
    try:
        run_torchrun(script, out_dir)
    except (AssertionError, subprocess.TimeoutExpired) as error:
        return AssertionError(str(error))
    return json.loads((out_dir / "results.json").read_text())
