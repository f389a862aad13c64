"""Progress of a training run: `TrainingProgress` (throughput, peak memory and plain progress
lines, measured in one place) and `StepProgressBar` (a terminal bar over the run's steps).

CUDA and Gaudi queue work and return to Python at once, so the clock is read only after waiting
for the device (`synchronize_device`), and only at the ends of a logging window so the queue
keeps running in between. Validation time inside a window is left out: the figures are training
throughput. The run's totals (`tokens_per_second`) serve end-of-run reports.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Mapping
from typing import Any, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import TQDMProgressBar

from ..accelerators.reporting import synchronize_device


class TrainingProgress(Callback):
    """Logs ``train/tokens_per_s``, ``train/samples_per_s`` and ``train/peak_memory_gb`` every
    ``trainer.log_every_n_steps`` optimizer steps and prints them as one plain line on rank 0.

    Args:
        log_throughput: log the three figures through the module's loggers.
        progress_lines: print ``step 40/120 (33%) | loss ... | tokens/s | samples/s | peak | elapsed,
            ETA`` lines. ``None``: when standard output is not a terminal (batch jobs, ``nohup``,
            SLURM logs), where a progress bar only shows its last frame.

    The first batch (warm-up: allocations, kernel selection) is not measured.
    """

    def __init__(self, log_throughput: bool = True, progress_lines: Optional[bool] = None) -> None:
        self.log_throughput = log_throughput
        self.progress_lines = progress_lines
        self.tokens = 0  # measured training tokens of this process (the first batch excluded)
        self.seconds = 0.0  # and the training time they took
        self._window_start: Optional[float] = None
        self._window_tokens = self._window_samples = 0
        self._paused = 0.0
        self._validation_started: Optional[float] = None
        self._last_logged_step = -1
        self._fit_started = 0.0

    @property
    def tokens_per_second(self) -> float:
        """Input tokens per second of this process's training, over the run so far."""
        return self.tokens / self.seconds if self.seconds else float("nan")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._window_start, self._window_tokens, self._window_samples, self._paused = None, 0, 0, 0.0
        self._fit_started = time.perf_counter()
        self._last_logged_step = trainer.global_step  # a resumed run's first window starts here

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._window_start is not None and trainer.training:
            synchronize_device(pl_module.device)
            self._validation_started = time.perf_counter()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._validation_started is not None:
            synchronize_device(pl_module.device)
            self._paused += time.perf_counter() - self._validation_started
            self._validation_started = None

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._window_start is None:  # the first batch includes warm-up; start measuring after it
            synchronize_device(pl_module.device)
            self._window_start = time.perf_counter()
            return
        tokens, samples = count_tokens_and_samples(batch)
        self._window_tokens += tokens
        self._window_samples += samples
        step = trainer.global_step
        if step % max(trainer.log_every_n_steps, 1) != 0 or step == self._last_logged_step:
            return
        now, seconds = self._close_window(pl_module)
        figures = {"train/tokens_per_s": self._window_tokens / seconds,
                   "train/samples_per_s": self._window_samples / seconds,
                   "train/peak_memory_gb": peak_memory_bytes(pl_module.device) / 2**30}
        if self.log_throughput:
            pl_module.log("train/tokens_per_s", figures["train/tokens_per_s"], prog_bar=True, on_step=True,
                          on_epoch=False, sync_dist=False)
            pl_module.log_dict({key: value for key, value in figures.items() if key != "train/tokens_per_s"},
                               on_step=True, on_epoch=False, sync_dist=False)
        if trainer.is_global_zero and (not sys.stdout.isatty() if self.progress_lines is None
                                       else self.progress_lines):
            steps_per_second = (step - self._last_logged_step) / seconds
            print(progress_line(trainer, outputs, figures, steps_per_second, now - self._fit_started), flush=True)
        self._start_window(now)
        self._last_logged_step = step

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._window_start is not None and self._window_tokens:
            now, _ = self._close_window(pl_module)
            self._start_window(now)

    def _close_window(self, pl_module: LightningModule) -> tuple[float, float]:
        """Wait for the device, add the window to the run's totals; (now, the window's seconds)."""
        synchronize_device(pl_module.device)
        now = time.perf_counter()
        seconds = max(now - self._window_start - self._paused, 1e-9)
        self.tokens += self._window_tokens
        self.seconds += seconds
        return now, seconds

    def _start_window(self, now: float) -> None:
        self._window_start, self._window_tokens, self._window_samples, self._paused = now, 0, 0, 0.0


class StepProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar counting optimizer steps over the whole run instead of the batches of
    each epoch: ``Training 40/120 [00:05<00:10, loss=1.23, train/tokens_per_s=1.05e+04]``.

    Fine-tuning runs are step-based (``max_steps``), often over many short epochs, where the
    default bar restarts every epoch and shows no overall position or ETA. A resumed run starts
    at its global step. When standard output is not a terminal the bar turns itself off: there
    `TrainingProgress` prints plain lines instead, and a bar would only fill logs with frames.
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not sys.stdout.isatty():  # before the sanity check, which draws a bar of its own
            self.disable()
        super().setup(trainer, pl_module, stage)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        total = trainer.estimated_stepping_batches
        self.train_progress_bar.reset(total=None if total == float("inf") else int(total))
        self.train_progress_bar.n = self.train_progress_bar.initial = trainer.global_step
        self.train_progress_bar.set_description("Training")

    def on_train_epoch_start(self, trainer: Trainer, *_: Any) -> None:
        """One bar for the whole run: nothing restarts at an epoch boundary."""

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        bar, step = self.train_progress_bar, trainer.global_step
        if bar.n != step and self._should_update(step, bar.total):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the logger's version number says nothing about training
        return metrics


def progress_line(trainer: Trainer, outputs: Any, figures: dict[str, float], steps_per_second: float,
                  elapsed: float) -> str:
    """``step 40/120 (33%) | loss 1.2340 | 10,512 tokens/s | 41.2 samples/s | peak 0.41 GB | 0:00:05, ETA 0:00:10``."""
    step, total = trainer.global_step, trainer.estimated_stepping_batches
    parts = [f"step {step}/{total:.0f} ({100 * step / total:.0f}%)" if total != float("inf") else f"step {step}"]
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
    if isinstance(loss, torch.Tensor):
        parts.append(f"loss {loss.detach().float().item():.4f}")
    parts += [f"{figures['train/tokens_per_s']:,.0f} tokens/s", f"{figures['train/samples_per_s']:,.1f} samples/s",
              f"peak {figures['train/peak_memory_gb']:.2f} GB"]
    timing = _clock(elapsed)
    if total != float("inf") and steps_per_second > 0:
        timing += f", ETA {_clock((total - step) / steps_per_second)}"
    return " | ".join(parts + [timing])


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def count_tokens_and_samples(batch: Any) -> tuple[int, int]:
    """Input tokens (attended positions when there is a mask) and rows of a batch."""
    if isinstance(batch, Mapping):
        mask, ids = batch.get("attention_mask"), batch.get("input_ids")
        if isinstance(mask, torch.Tensor):
            return int(mask.sum()), mask.shape[0]
        if isinstance(ids, torch.Tensor):
            return ids.numel(), ids.shape[0]
    if isinstance(batch, torch.Tensor):
        return batch.numel(), batch.shape[0]
    return 0, 0


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of ``device``: the accelerator's allocator peak, or the process's peak RSS on CPU."""
    if device.type != "cpu":
        module = getattr(torch, device.type, None)
        if module is not None and hasattr(module, "max_memory_allocated"):
            return int(module.max_memory_allocated(device))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB
