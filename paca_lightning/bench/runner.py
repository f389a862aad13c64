"""One benchmark run: every method on the same model, batch and sequence length, side by side.

Timing protocol: after ``warmup`` steps per variant, ``repeats`` rounds each step every variant
once (A B C D, B C D A, C D A B, ...). A load spike on a shared machine then hits all variants of
a round instead of one method's whole series, and the per-variant median discards the rounds it
distorted. The order rotates because position matters (a step's time depends on what ran just
before it, e.g. the caches and allocator state a larger method leaves behind); rotated, every
variant takes every position. Ratios are ratios of those medians; the fastest step of each
variant is reported beside them, since under heavy shared load (more runnable jobs than cores) even a
round is long enough for the load to change within it.
"""

from __future__ import annotations

import copy
import os
import platform
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from .measure import (
    DeviceOps,
    child_peak_rss,
    fits_in_budget,
    longest_sequence,
    median,
    optimizer_state_bytes,
    parameter_bytes,
    saved_bytes,
    step_flops,
    timed_step,
)
from .methods import LOSSES, METHODS, Variant, check_chunked_loss_applies, loss_function, prepare
from .models import DTYPES, load_model, random_batch, vocab_size_of


@dataclass
class BenchOptions:
    """Everything a run depends on; written into the JSON report as is."""

    model: str = "llama-50m"
    device: str = "cpu"
    dtype: str = "float32"
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    losses: list[str] = field(default_factory=lambda: list(LOSSES))
    lora_rank: int = 8
    equal_budget: bool = True
    target_modules: list[str] | str = "all-linear"
    batch_size: int = 2
    sequence_length: int = 512
    warmup: int = 2
    repeats: int = 7
    chunk_size: int = 1024
    peak_memory: bool = True
    peak_memory_steps: int = 2
    max_sequence: bool = True
    memory_budget_gib: Optional[float] = None
    sequence_granularity: int = 64
    sequence_limit: int = 65536
    seed: int = 0

    @property
    def paca_rank(self) -> int:
        return 2 * self.lora_rank if self.equal_budget else self.lora_rank

    def check(self) -> None:
        for name in ("lora_rank", "batch_size", "sequence_length", "repeats", "chunk_size",
                     "peak_memory_steps", "sequence_granularity", "sequence_limit"):
            if getattr(self, name) < 1:
                flag = "--rank" if name == "lora_rank" else f"--{name.replace('_', '-')}"
                raise ValueError(f"{flag} ({name}) must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"--warmup must be >= 0, got {self.warmup}")
        for method in self.methods:
            if method not in METHODS:
                raise ValueError(f"unknown method {method!r} in --methods; choose from {', '.join(METHODS)}")
        for loss in self.losses:
            if loss not in LOSSES:
                raise ValueError(f"unknown loss {loss!r} in --loss; choose from {', '.join(LOSSES)}")
        if not self.methods or not self.losses:
            raise ValueError("--methods and --loss each need at least one entry")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.memory_budget_gib is not None and self.memory_budget_gib <= 0:
            raise ValueError(f"--memory-budget-gib must be > 0, got {self.memory_budget_gib}")

    def budget_bytes(self, ops: DeviceOps) -> int:
        """The budget for the longest-sequence search: the option, else a default per device."""
        if self.memory_budget_gib is not None:
            return int(self.memory_budget_gib * 2**30)
        if ops.type == "cuda":  # 90% of the accelerator: what a user could actually fill
            return int(0.9 * torch.cuda.get_device_properties(ops.device).total_memory)
        if ops.type == "hpu":
            limit = ops.backend.memory_stats().get("Limit")
            if not limit:
                raise RuntimeError("habana_frameworks' memory_stats() reports no 'Limit' for this HPU; "
                                   "give the budget with --memory-budget-gib")
            return int(0.9 * limit)
        return 2**30  # CPU: 1 GiB keeps the search's forward passes short on a small machine


def run_benchmark(options: BenchOptions, log=print) -> dict:
    """Measure every requested variant; returns the JSON-ready report (see `report.py`)."""
    options.check()
    device = torch.device(options.device)
    ops = DeviceOps(device)
    dtype = DTYPES[options.dtype]
    base = load_model(options.model, dtype, device, seed=options.seed)
    if "chunked" in options.losses:
        check_chunked_loss_applies(base)
    vocab_size = vocab_size_of(base)
    batch = random_batch(vocab_size, options.batch_size, options.sequence_length, device, seed=options.seed)
    trainees = {}
    for method in options.methods:
        trainees[method] = prepare(method, copy.deepcopy(base), lora_rank=options.lora_rank,
                                   paca_rank=options.paca_rank, target_modules=options.target_modules)
    del base
    variants = [Variant(method, loss) for method in options.methods for loss in options.losses]
    losses = {loss: loss_function(loss, options.chunk_size) for loss in options.losses}
    rows = {variant: {"method": variant.method, "loss": variant.loss, "rank": trainees[variant.method].rank,
                      "trainable_parameters": sum(p.numel() for p in trainees[variant.method].trainable())}
            for variant in variants}

    log(f"counting saved bytes and FLOPs of {len(variants)} variants ...")
    for variant in variants:
        trainee, compute_loss = trainees[variant.method], losses[variant.loss]
        rows[variant]["saved_bytes"] = saved_bytes(trainee, compute_loss, batch)
        rows[variant]["flops"] = step_flops(trainee, compute_loss, batch)
        log(f"  {variant.label}: saved for backward {rows[variant]['saved_bytes'] / 2**20:.1f} MiB, "
            f"{rows[variant]['flops'] / 1e9:.1f} GFLOPs")

    log(f"timing: {options.warmup} warm-up steps, then {options.repeats} interleaved rounds ...")
    for variant in variants:
        for _ in range(options.warmup):
            timed_step(trainees[variant.method], losses[variant.loss], batch, ops)
    times = {variant: [] for variant in variants}
    step_peaks = {variant: [] for variant in variants}
    for round_index in range(options.repeats):
        shift = round_index % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            seconds, peak = timed_step(trainees[variant.method], losses[variant.loss], batch, ops)
            times[variant].append(seconds)
            step_peaks[variant].append(peak)
        log(f"  round {round_index + 1}/{options.repeats}: "
            + ", ".join(f"{v.label} {times[v][-1]:.3f}s" for v in variants[shift:] + variants[:shift]))
    tokens = options.batch_size * options.sequence_length
    for variant in variants:
        rows[variant]["step_times_s"] = times[variant]
        rows[variant]["step_time_s"] = median(times[variant])
        # On a machine shared with other jobs the fastest round is the least disturbed one.
        rows[variant]["step_time_min_s"] = min(times[variant])
        rows[variant]["tokens_per_s"] = tokens / rows[variant]["step_time_s"]
        if ops.tracks_allocations:
            # As if alone on the device: other methods' models share it during an interleaved run.
            trainee = trainees[variant.method]
            step_memory = optimizer_state_bytes(trainee) + max(step_peaks[variant])
            rows[variant]["step_memory_bytes"] = step_memory
            rows[variant]["peak_memory_bytes"] = parameter_bytes(trainee) + step_memory

    if options.peak_memory and not ops.tracks_allocations:
        log("peak RSS: one fresh child process per variant ...")
        for variant in variants:
            report = child_peak_rss({"model": options.model, "dtype": options.dtype, "method": variant.method,
                                     "loss": variant.loss, "lora_rank": options.lora_rank,
                                     "paca_rank": options.paca_rank, "target_modules": options.target_modules,
                                     "batch_size": options.batch_size,
                                     "sequence_length": options.sequence_length,
                                     "steps": options.peak_memory_steps, "chunk_size": options.chunk_size,
                                     "seed": options.seed})
            rows[variant]["peak_memory_bytes"] = report["peak_rss"]
            rows[variant]["step_memory_bytes"] = report["peak_rss"] - report["rss_before_training"]

    budget = options.budget_bytes(ops)
    if options.max_sequence:
        log(f"longest sequence within {budget / 2**30:.2f} GiB (batch {options.batch_size}) ...")
        for variant in variants:
            trainee, compute_loss = trainees[variant.method], losses[variant.loss]

            def fits(length: int, trainee=trainee, compute_loss=compute_loss) -> bool:
                probe = random_batch(vocab_size, options.batch_size, length, device, seed=options.seed)
                return fits_in_budget(trainee, compute_loss, probe, ops, budget)

            rows[variant]["max_sequence_length"] = longest_sequence(
                fits, start=options.sequence_length, granularity=options.sequence_granularity,
                limit=options.sequence_limit)
            log(f"  {variant.label}: {rows[variant]['max_sequence_length']}")

    return {"options": {**asdict(options), "paca_rank": options.paca_rank},
            "device": describe_device(ops), "memory_budget_bytes": budget,
            "results": list(rows.values()), "ratios": ratios(list(rows.values()))}


RATIO_METRICS = ("step_time_s", "step_time_min_s", "tokens_per_s", "saved_bytes", "flops", "peak_memory_bytes",
                 "step_memory_bytes", "max_sequence_length")


def ratios(rows: list[dict]) -> dict:
    """``{loss: {"paca/<method>": {metric: value}}}`` from the measured rows (medians for time)."""
    table = {}
    for row in rows:
        if row["method"] != "paca":
            continue
        for other in rows:
            if other["loss"] != row["loss"] or other["method"] == "paca":
                continue
            table.setdefault(row["loss"], {})[f"paca/{other['method']}"] = {
                metric: row[metric] / other[metric] for metric in RATIO_METRICS
                if metric in row and metric in other and other[metric]}
    return table


def describe_device(ops: DeviceOps) -> str:
    if ops.type == "cuda":
        return torch.cuda.get_device_name(ops.device)
    if ops.type == "hpu":
        return f"Intel Gaudi ({ops.backend.get_device_name()})"
    model_name = platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model_name = line.split(":", 1)[1].strip()
                    break
    return f"CPU {model_name}, {torch.get_num_threads()} threads ({os.cpu_count()} cores visible)"
