"""Two ways to fill FSDP2 shards from a saved model, measured side by side on 2 CPU processes.

``python -m paca_lightning.bench.sharded_loading MODEL_FOLDER``

- ``stream`` (what `paca_lightning.parallel.load_pretrained_shards` does): rank 0 reads each
  safetensors tensor whole and broadcasts it; every rank keeps its rows and PaCA's state comes
  from the full weight on rank 0.
- ``slices``: every rank reads only its own rows of each tensor (``safe_open().get_slice``);
  PaCA's pretrained columns (kept whole on every rank) are then all-gathered from the ranks'
  rows; with ``--selection weight_norm`` the column norms come first from an all-reduce of each
  rank's per-column sums of squares. Dense PaCA only: QPaCA's packed bytes are not row slices of
  the weight, and a GPT-2 Conv1D shard is a strided column read; neither is measured here.

Each way runs in its own 2-process gloo job (so each peak is its own), after a warm-up load;
the job reports each rank's wall time, growth of peak resident memory (``VmHWM``) and growth of
the highest anonymous resident memory (``RssAnon``) a thread sampled every millisecond: VmHWM also
counts the pages of the mmap'ed safetensors files a rank touched (page cache, shared and
reclaimable), which the two ways touch differently, and the kernel keeps no peak of the anonymous
part alone. The run checks whether both ways produce bit-identical shards. Prints both and their
ratios.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from .measure import peak_rss, status_bytes

RANK, ALPHA = 8, 16.0


class _AnonymousPeak:
    """The highest ``RssAnon`` seen while the block runs, sampled every millisecond (a lower bound)."""

    def __enter__(self):
        self.peak, self._stop = status_bytes("RssAnon"), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, status_bytes("RssAnon"))

    def __exit__(self, *_):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, status_bytes("RssAnon"))


def _chosen_columns(name, layer, rows, config) -> torch.Tensor:
    """The columns, from this rank's rows: ``weight_norm`` needs every rank's part of each norm."""
    import torch.distributed as dist

    from ..selection import random_columns, top_columns

    if config.selection != "weight_norm":
        return random_columns(layer.in_features, layer.rank, config.seed, name)
    squares = rows.float().square().sum(0)
    dist.all_reduce(squares)
    return top_columns(squares.sqrt(), layer.rank)


def _load_by_slices(model, checkpoint: Path, config) -> None:
    import torch.distributed as dist
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor

    from ..model import paca_layers, sync_paca_columns
    from ..parallel.loading import _restore_non_persistent_buffers, safetensors_files

    rank, world = dist.get_rank(), dist.get_world_size()
    non_persistent = [f"{owner}.{buffer}" if owner else buffer for owner, module in model.named_modules()
                      for buffer in module._non_persistent_buffers_set]
    model.to_empty(device="cpu")
    _restore_non_persistent_buffers(model, non_persistent)
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    layers = {f"{name}.weight": (name, layer) for name, layer in paca_layers(model)}
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
                    if key in layers:
                        name, layer = layers[key]  # its indices were emptied by to_empty
                        layer.paca_indices.copy_(_chosen_columns(name, layer, rows, config))
                        mine = rows.index_select(1, layer.paca_indices.cpu()).float()
                        gathered = [None] * world
                        dist.all_gather_object(gathered, mine)
                        layer.paca_base_columns.copy_(torch.cat(gathered))
                        layer.paca_weight.to_local().copy_(mine.to(layer.paca_weight.dtype) / layer.scaling)
    sync_paca_columns(model)  # as the streaming path does: s * P written into W


def _worker(way: str, checkpoint: Path, warm_up: Path, out: Path, selection: str) -> None:
    import torch.distributed as dist

    from ..config import PaCAConfig
    from ..parallel import shard_paca_model
    from ..parallel.loading import apply_paca_on_meta, build_on_meta, load_pretrained_shards

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    config = PaCAConfig(rank=RANK, alpha=ALPHA, target_modules="all-linear", selection=selection)

    def load(folder: Path):
        model = shard_paca_model(apply_paca_on_meta(build_on_meta(folder), config))
        if way == "stream":
            load_pretrained_shards(model, folder, torch.device("cpu"))
        else:
            _load_by_slices(model, folder, config)
        return model

    load(warm_up)  # the code paths' own pages count before the measurement
    dist.barrier()
    start_memory, start_anonymous = peak_rss(), status_bytes("RssAnon")
    with _AnonymousPeak() as anonymous:
        start = time.perf_counter()
        model = load(checkpoint)
        seconds = time.perf_counter() - start
    grown = peak_rss() - start_memory
    shards = {name: (t.to_local() if hasattr(t, "to_local") else t).clone() for name, t in model.state_dict().items()}
    torch.save(shards, out / f"{way}_rank{dist.get_rank()}.pt")
    found = [None] * dist.get_world_size()
    dist.all_gather_object(found, {"seconds": seconds, "vm_hwm_growth_bytes": grown,
                                   "rss_anon_growth_bytes": anonymous.peak - start_anonymous})
    if dist.get_rank() == 0:
        (out / f"{way}.json").write_text(json.dumps(found))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # gloo teardown can abort in a destructor after the work is done


def _launch(way: str, checkpoint: Path, warm_up: Path, out: Path, selection: str) -> list[dict]:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--rdzv-backend=c10d",
               "--rdzv-endpoint=localhost:0", "-m", "paca_lightning.bench.sharded_loading", "--worker", way,
               str(checkpoint), "--warm-up", str(warm_up), "--out", str(out), "--selection", selection]
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


def compare(checkpoint: Path, selection: str = "random") -> dict:
    with tempfile.TemporaryDirectory(prefix="paca-sharded-loading-") as scratch:
        out = Path(scratch)
        _save_warm_up(checkpoint, out / "warm_up")
        ways = {way: _launch(way, checkpoint, out / "warm_up", out, selection) for way in ("stream", "slices")}
        identical = all(
            all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()
            for a, b in ((torch.load(out / f"stream_rank{r}.pt"), torch.load(out / f"slices_rank{r}.pt"))
                         for r in range(2)))
    ratios = [{"seconds": s["seconds"] / g["seconds"],
               "vm_hwm_growth": s["vm_hwm_growth_bytes"] / g["vm_hwm_growth_bytes"],
               "rss_anon_growth": s["rss_anon_growth_bytes"] / max(g["rss_anon_growth_bytes"], 1)}
              for s, g in zip(ways["slices"], ways["stream"])]
    return {"checkpoint": str(checkpoint), "selection": selection, "identical_shards": identical, **ways,
            "slices_over_stream": ratios}


def format_result(result: dict) -> str:
    rows = [f"{result['checkpoint']} (selection={result['selection']}): shards identical between the two ways: "
            f"{result['identical_shards']}",
            f"{'way':<7} {'rank':>4} {'seconds':>8} {'VmHWM growth MiB':>17} {'RssAnon growth MiB':>19}"]
    for way in ("stream", "slices"):
        for rank, entry in enumerate(result[way]):
            rows.append(f"{way:<7} {rank:>4} {entry['seconds']:>8.2f} {entry['vm_hwm_growth_bytes'] / 2**20:>17.1f} "
                        f"{entry['rss_anon_growth_bytes'] / 2**20:>19.1f}")
    for rank, ratio in enumerate(result["slices_over_stream"]):
        rows.append(f"slices / stream, rank {rank}: time {ratio['seconds']:.2f}, peak memory growth "
                    f"{ratio['vm_hwm_growth']:.2f}, sampled anonymous peak growth {ratio['rss_anon_growth']:.2f}")
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m paca_lightning.bench.sharded_loading",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a transformers model folder saved with save_pretrained")
    parser.add_argument("--worker", choices=("stream", "slices"), help=argparse.SUPPRESS)
    parser.add_argument("--warm-up", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--selection", choices=("random", "weight_norm"), default="random",
                        help="how PaCA chooses its columns (weight_norm: the slices way all-reduces column norms)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.worker, args.checkpoint, args.warm_up, args.out, args.selection)
    result = compare(args.checkpoint, args.selection)
    print(json.dumps(result, indent=1) if args.json else format_result(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
