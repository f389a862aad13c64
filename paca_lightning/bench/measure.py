"""What a benchmark measures, one function per figure.

Timed figures (step time) vary run to run; the counters (bytes saved for backward, FLOPs) are
deterministic properties of the computation graph, so they decide memory and work claims.

- bytes saved for backward: every tensor autograd keeps between forward and backward, seen
  through `torch.autograd.graph.saved_tensors_hooks`. Counted per *storage*: a tensor saved by
  several ops (LoRA's q/k/v projections all save the same normed input) or a view of another
  saved tensor is paid for once, and a slicing view is charged the whole storage it keeps alive.
  Storages of parameters are excluded: they exist whether or not anything is saved.
- FLOPs: `torch.utils.flop_counter` over one forward and backward. Its formulas cover the
  matmuls; CPU's fused attention kernel has none in torch, so one is registered here (the same
  formula torch uses for the GPU kernels, which counts the causal mask's skipped half too).
- peak memory: on CUDA/HPU the allocator's peak during a step above what was allocated before it;
  on CPU the peak resident set (RSS) of a fresh child process that builds the model and trains a
  few steps, so no other method's tensors or allocator history share the figure.
- longest sequence under a memory budget: binary search over the sequence length. On CUDA/HPU a
  length fits when a real step's peak stays within the budget. On CPU, where no allocator tracks
  tensors, a length fits when parameters + gradients + AdamW state + bytes saved for backward do:
  the part of a step's memory that grows with the sequence is the saved activations.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from .methods import Trainee, train_step


class DeviceOps:
    """Synchronisation and allocator statistics for one device type (cpu, cuda or hpu)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.type = device.type
        if self.type == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError("--device cuda: torch.cuda.is_available() is false on this machine")
            self.backend = torch.cuda
        elif self.type == "hpu":
            try:
                import habana_frameworks.torch.core as htcore
                import habana_frameworks.torch.hpu as hthpu
            except ImportError as error:
                raise RuntimeError("--device hpu needs Intel Gaudi's habana_frameworks.torch "
                                   f"(the Gaudi PyTorch container provides it): {error}") from error
            self.backend, self._htcore = hthpu, htcore
        elif self.type != "cpu":
            raise ValueError(f"--device must be cpu, cuda or hpu, got {self.type!r}")

    @property
    def tracks_allocations(self) -> bool:
        return self.type != "cpu"

    def synchronize(self) -> None:
        if self.type != "cpu":
            self.backend.synchronize()

    def mark_step(self) -> None:
        """HPU lazy mode runs the accumulated graph here; elsewhere nothing to do."""
        if self.type == "hpu":
            self._htcore.mark_step()

    def allocated(self) -> int:
        return self.backend.memory_allocated() if self.tracks_allocations else 0

    def reset_peak(self) -> None:
        if self.tracks_allocations:
            self.backend.reset_peak_memory_stats()

    def peak(self) -> int:
        return self.backend.max_memory_allocated() if self.tracks_allocations else 0


def _storage_key(tensor: torch.Tensor) -> tuple:
    storage = tensor.untyped_storage()
    return (tensor.device, storage.data_ptr(), storage.nbytes())


class SavedTensors:
    """What autograd saves for backward inside a ``with`` block.

    ``nbytes`` counts each storage once; ``tensors`` lists the saved tensors that were counted.
    Parameters cost nothing extra to save, so ``nn.Parameter`` instances and tensors living in the
    storage of one of ``parameters`` (a frozen Linear saves ``W.t()``) are left out.
    """

    def __init__(self, parameters=()) -> None:
        self._parameter_storages = {_storage_key(p) for p in parameters}
        self._storages: dict[tuple, int] = {}
        self.tensors: list[torch.Tensor] = []
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.layout == torch.strided and not tensor.is_meta and not isinstance(tensor, torch.nn.Parameter):
            key = _storage_key(tensor)
            if key not in self._parameter_storages:
                self._storages[key] = key[2]
                self.tensors.append(tensor)
        return tensor

    @property
    def nbytes(self) -> int:
        return sum(self._storages.values())

    def __enter__(self) -> SavedTensors:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        self._hooks.__exit__(*exc_info)


def saved_bytes(trainee: Trainee, compute_loss: Callable, batch: dict) -> int:
    """Bytes of distinct non-parameter storages saved for backward by one forward (then backward)."""
    with SavedTensors(trainee.causal_lm.parameters()) as saved:
        loss = compute_loss(trainee.causal_lm, batch)
    loss.backward()
    if trainee.optimizer is not None:
        trainee.optimizer.zero_grad(set_to_none=True)
    return saved.nbytes


def _cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def step_flops(trainee: Trainee, compute_loss: Callable, batch: dict) -> int:
    """FLOPs of one forward and backward (the optimizer's elementwise work is not counted)."""
    aten = torch.ops.aten
    mapping = {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
               aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        loss = compute_loss(trainee.causal_lm, batch)
        loss.backward()
    if trainee.optimizer is not None:
        trainee.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def timed_step(trainee: Trainee, compute_loss: Callable, batch: dict, ops: DeviceOps) -> tuple[float, int]:
    """Seconds of one full training step, and its peak allocation above what was resident before."""
    ops.synchronize()
    ops.reset_peak()
    resident = ops.allocated()
    start = time.perf_counter()
    train_step(trainee, compute_loss, batch, after_backward=ops.mark_step)
    ops.mark_step()
    ops.synchronize()
    return time.perf_counter() - start, ops.peak() - resident


def parameter_bytes(trainee: Trainee) -> int:
    """Bytes of the model's distinct parameter storages (tied weights once)."""
    return sum({_storage_key(p): p.untyped_storage().nbytes() for p in trainee.causal_lm.parameters()}.values())


def optimizer_state_bytes(trainee: Trainee) -> int:
    """AdamW's two moment buffers, each the size of the trainable parameters."""
    return 2 * sum(p.numel() * p.element_size() for p in trainee.trainable())


def persistent_bytes(trainee: Trainee) -> int:
    """Parameters, gradients of the trainable ones, and AdamW state."""
    return parameter_bytes(trainee) + optimizer_state_bytes(trainee) + optimizer_state_bytes(trainee) // 2


def fits_in_budget(trainee: Trainee, compute_loss: Callable, batch: dict, ops: DeviceOps, budget: int) -> bool:
    """Whether one training step on ``batch`` stays within ``budget`` bytes (see the module docs)."""
    if not ops.tracks_allocations:
        return persistent_bytes(trainee) + saved_bytes(trainee, compute_loss, batch) <= budget
    try:
        _, step_peak = timed_step(trainee, compute_loss, batch, ops)
    except torch.OutOfMemoryError:
        if trainee.optimizer is not None:
            trainee.optimizer.zero_grad(set_to_none=True)
        return False
    # Other methods' models share the device during an interleaved run: count only this one's
    # parameters and optimizer state (resident before the step) plus what the step allocated.
    return parameter_bytes(trainee) + optimizer_state_bytes(trainee) + step_peak <= budget


def longest_sequence(fits: Callable[[int], bool], start: int, granularity: int, limit: int) -> int:
    """Largest multiple of ``granularity`` in [granularity, limit] for which ``fits`` holds (0 if none).

    ``fits`` must be monotone (a longer sequence never needs less memory). Starts at ``start``,
    doubles or halves until the answer is bracketed, then bisects: ~2 log2(answer/start) + log2
    of the bracket width probes.
    """
    def snap(length: int) -> int:
        return max(granularity, min(limit, length // granularity * granularity))

    length = snap(start)
    if fits(length):
        good, bad = length, None
        while bad is None and good < limit:
            candidate = snap(good * 2)
            if fits(candidate):
                good = candidate
            else:
                bad = candidate
        if bad is None:
            return good
    else:
        good, bad = 0, length
        while good == 0 and bad > granularity:
            candidate = snap(bad // 2)
            if fits(candidate):
                good = candidate
            else:
                bad = candidate
        if good == 0:
            return 0
    while bad - good > granularity:
        middle = snap((good + bad) // 2)
        if fits(middle):
            good = middle
        else:
            bad = middle
    return good


def median(values: list[float]) -> float:
    return statistics.median(values)


def child_peak_rss(spec: dict, timeout_s: float = 1800) -> dict:
    """Run `paca_lightning.bench.peak_rss` in a fresh Python process; returns its JSON report."""
    command = [sys.executable, "-m", "paca_lightning.bench.peak_rss", json.dumps(spec)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if result.returncode != 0:
        raise RuntimeError(f"the peak-memory child process for {spec['method']}/{spec['loss']} failed "
                           f"(exit {result.returncode}):\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def status_bytes(field_name: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"/proc/self/status has no {field_name} line; peak RSS needs Linux")


def current_rss() -> int:
    return status_bytes("VmRSS")


def reset_peak_rss() -> None:
    """Make the peak RSS start again from the current RSS (Linux >= 4.0, ``clear_refs`` 5).

    Importing torch, transformers and peft briefly holds more memory than a small model's
    training does; without the reset that import spike would be every method's "peak".
    """
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError as error:
        raise RuntimeError(f"cannot reset the peak RSS through /proc/self/clear_refs ({error}); the peak-memory "
                           "figures need Linux >= 4.0") from error


def peak_rss() -> int:
    return status_bytes("VmHWM")


