"""Two ways to fill FSDP2 shards from a saved model, measured side by side on 2 CPU processes.

``python -m paca_lightning.bench.sharded_loading MODEL_FOLDER``

- ``stream`` (what `paca_lightning.parallel.load_pretrained_shards` does): rank 0 reads each
  safetensors tensor whole and broadcasts it; every rank keeps its rows and PaCA's state comes
  from the full weight on rank 0.
- ``slices``: every rank reads only its own rows of each tensor (``safe_open().get_slice``);
  PaCA's pretrained columns (kept whole on every rank) are then all-gathered from the ranks'
  rows. Dense PaCA with ``random`` columns only: ``weight_norm`` would need an all-reduce of
  column norms first, QPaCA's packed bytes are not row slices of the weight, and a GPT-2 Conv1D
  shard is a strided column read; none of that is measured here.

Each way runs in its own 2-process gloo job (so each peak is its own), after a warm-up load;
the job reports each rank's wall time and growth of peak resident memory (``VmHWM``). Both ways
must produce bit-identical shards, which the run checks. Prints both and their ratios.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RANK, ALPHA = 8, 16.0


def _vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM line")


def _load_by_slices(model, checkpoint: Path, config) -> None:
    import torch.distributed as dist
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor

    from ..model import paca_layers, sync_paca_columns
    from ..parallel.loading import _restore_non_persistent_buffers, safetensors_files
    from ..selection import random_columns

    rank, world = dist.get_rank(), dist.get_world_size()
    non_persistent = [f"{owner}.{buffer}" if owner else buffer for owner, module in model.named_modules()
                      for buffer in module._non_persistent_buffers_set]
    model.to_empty(device="cpu")
    _restore_non_persistent_buffers(model, non_persistent)
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    layers = {f"{name}.weight": layer for name, layer in paca_layers(model)}
    for name, layer in paca_layers(model):  # emptied by to_empty: the seeded draw of apply_paca_on_meta
        layer.paca_indices.copy_(random_columns(layer.in_features, layer.rank, config.seed, name))
    with torch.no_grad():
        for path in safetensors_files(checkpoint):
            with safe_open(path, "pt") as handle:
                for key in handle.keys():
                    target = tensors[key]
                    if isinstance(target, DTensor):  # FSDP2: dim-0 chunks of ceil(n / world) rows
                        local = target.to_local()
                        start = min(rank * math.ceil(target.shape[0] / world), target.shape[0])
                        rows = handle.get_slice(key)[start:start + local.shape[0]]
                    else:
                        local, rows = target, handle.get_tensor(key)
                    local.copy_(rows)
                    layer = layers.get(key)
                    if layer is not None:
                        mine = rows.index_select(1, layer.paca_indices.cpu()).float()
                        gathered = [None] * world
                        dist.all_gather_object(gathered, mine)
                        layer.paca_base_columns.copy_(torch.cat(gathered))
                        layer.paca_weight.to_local().copy_(mine.to(layer.paca_weight.dtype) / layer.scaling)
    sync_paca_columns(model)  # as the streaming path does: s * P written into W


def _worker(way: str, checkpoint: Path, warm_up: Path, out: Path) -> None:
    import torch.distributed as dist

    from ..config import PaCAConfig
    from ..parallel import shard_paca_model
    from ..parallel.loading import apply_paca_on_meta, build_on_meta, load_pretrained_shards

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    config = PaCAConfig(rank=RANK, alpha=ALPHA, target_modules="all-linear")

    def load(folder: Path):
        model = shard_paca_model(apply_paca_on_meta(build_on_meta(folder), config))
        if way == "stream":
            load_pretrained_shards(model, folder, torch.device("cpu"))
        else:
            _load_by_slices(model, folder, config)
        return model

    load(warm_up)  # the code paths' own pages count before the measurement
    dist.barrier()
    start_memory, start = _vm_hwm(), time.perf_counter()
    model = load(checkpoint)
    seconds, grown = time.perf_counter() - start, _vm_hwm() - start_memory
    shards = {name: (t.to_local() if hasattr(t, "to_local") else t).clone() for name, t in model.state_dict().items()}
    torch.save(shards, out / f"{way}_rank{dist.get_rank()}.pt")
    found = [None] * dist.get_world_size()
    dist.all_gather_object(found, {"seconds": seconds, "vm_hwm_growth_bytes": grown})
    if dist.get_rank() == 0:
        (out / f"{way}.json").write_text(json.dumps(found))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # gloo teardown can abort in a destructor after the work is done


def _launch(way: str, checkpoint: Path, warm_up: Path, out: Path) -> list[dict]:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--rdzv-backend=c10d",
               "--rdzv-endpoint=localhost:0", "-m", "paca_lightning.bench.sharded_loading", "--worker", way,
               str(checkpoint), "--warm-up", str(warm_up), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"the {way} job failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
    return json.loads((out / f"{way}.json").read_text())


def _save_warm_up(checkpoint: Path, folder: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    small = AutoConfig.from_pretrained(checkpoint)
    small.update({"num_hidden_layers": 1, "vocab_size": 128})
    AutoModelForCausalLM.from_config(small).save_pretrained(folder)


def compare(checkpoint: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="paca-sharded-loading-") as scratch:
        out = Path(scratch)
        _save_warm_up(checkpoint, out / "warm_up")
        ways = {way: _launch(way, checkpoint, out / "warm_up", out) for way in ("stream", "slices")}
        identical = all(
            all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()
            for a, b in ((torch.load(out / f"stream_rank{r}.pt"), torch.load(out / f"slices_rank{r}.pt"))
                         for r in range(2)))
    ratios = [{"seconds": s["seconds"] / g["seconds"],
               "vm_hwm_growth": s["vm_hwm_growth_bytes"] / g["vm_hwm_growth_bytes"]}
              for s, g in zip(ways["slices"], ways["stream"])]
    return {"checkpoint": str(checkpoint), "identical_shards": identical, **ways, "slices_over_stream": ratios}


def format_result(result: dict) -> str:
    rows = [f"{result['checkpoint']}: shards identical between the two ways: {result['identical_shards']}",
            f"{'way':<7} {'rank':>4} {'seconds':>8} {'VmHWM growth MiB':>17}"]
    for way in ("stream", "slices"):
        for rank, entry in enumerate(result[way]):
            rows.append(f"{way:<7} {rank:>4} {entry['seconds']:>8.2f} {entry['vm_hwm_growth_bytes'] / 2**20:>17.1f}")
    for rank, ratio in enumerate(result["slices_over_stream"]):
        rows.append(f"slices / stream, rank {rank}: time {ratio['seconds']:.2f}, peak memory growth "
                    f"{ratio['vm_hwm_growth']:.2f}")
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m paca_lightning.bench.sharded_loading",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a transformers model folder saved with save_pretrained")
    parser.add_argument("--worker", choices=("stream", "slices"), help=argparse.SUPPRESS)
    parser.add_argument("--warm-up", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.worker, args.checkpoint, args.warm_up, args.out)
    result = compare(args.checkpoint)
    print(json.dumps(result, indent=1) if args.json else format_result(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
