"""Convergence mode: PaCA, LoRA and full fine-tuning trained on the same OASST1 batches.

Speed and memory mean little if the loss does not fall as fast. This trains each method for
``steps`` AdamW steps from the same pretrained weights on the same batches in the same order
(the OASST1 sample shipped with the package, assistant tokens scored), records the training loss
of every step and the validation loss at the end, and draws the curves on one plot. By default
the model is the packaged tiny pretrained LLaMA, so the run needs no download.
"""

from __future__ import annotations

import copy
import itertools
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from ..data import TINY_LLAMA_DIR
from ..data.oasst1 import OASST1DataModule
from ..loss import causal_lm_loss
from .measure import median
from .methods import prepare
from .models import DTYPES, load_model, vocab_size_of

CONVERGENCE_METHODS = ("paca", "lora", "full")


@dataclass
class ConvergenceOptions:
    """Settings of a convergence run; ``model=None`` means the packaged tiny pretrained LLaMA."""

    model: Optional[str] = None
    device: str = "cpu"
    dtype: str = "float32"
    lora_rank: int = 8
    equal_budget: bool = True
    target_modules: list[str] | str = "all-linear"
    batch_size: int = 2
    sequence_length: int = 512
    steps: int = 60
    learning_rate: float = 1e-3
    full_learning_rate: float = 1e-4
    seed: int = 0

    @property
    def paca_rank(self) -> int:
        return 2 * self.lora_rank if self.equal_budget else self.lora_rank


def _batch_loss(causal_lm, batch: dict) -> torch.Tensor:
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    return causal_lm_loss(causal_lm(**inputs).logits, batch["labels"])


def run_convergence(options: ConvergenceOptions, output_dir: Path) -> list[Path]:
    """Train each method; write convergence.json, convergence.md and convergence.png."""
    if options.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {options.steps}")
    model_name = options.model or str(TINY_LLAMA_DIR)
    device = torch.device(options.device)
    base = load_model(model_name, DTYPES[options.dtype], device, seed=options.seed)
    data = OASST1DataModule(tokenizer=model_name, max_length=options.sequence_length,
                            batch_size=options.batch_size, seed=options.seed)
    data.setup("fit")
    if len(data.tokenizer) > vocab_size_of(base):
        raise ValueError(f"the tokenizer of {model_name!r} has {len(data.tokenizer)} tokens but the model's "
                         f"output head only {vocab_size_of(base)}; --convergence needs a model with its own "
                         "tokenizer (a pretrained directory or hub name), not a random preset")
    torch.manual_seed(options.seed)
    batches = list(itertools.islice(itertools.cycle(data.train_dataloader()), options.steps))
    val_batches = list(data.val_dataloader())
    curves, rows = {}, []
    for method in CONVERGENCE_METHODS:
        learning_rate = options.full_learning_rate if method == "full" else options.learning_rate
        trainee = prepare(method, copy.deepcopy(base), lora_rank=options.lora_rank, paca_rank=options.paca_rank,
                          target_modules=options.target_modules, learning_rate=learning_rate)
        losses = []
        for batch in batches:
            batch = {key: value.to(device) for key, value in batch.items()}
            loss = _batch_loss(trainee.causal_lm, batch)
            loss.backward()
            trainee.optimizer.step()
            trainee.optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        trainee.causal_lm.eval()
        with torch.no_grad():
            val = [_batch_loss(trainee.causal_lm, {k: v.to(device) for k, v in b.items()}).item()
                   for b in val_batches]
        curves[method] = losses
        rows.append({"method": method, "rank": trainee.rank, "learning_rate": learning_rate,
                     "trainable_parameters": sum(p.numel() for p in trainee.trainable()),
                     "first_loss": losses[0], "final_loss": median(losses[-5:]),
                     "validation_loss": sum(val) / len(val) if val else None})
        print(f"{method}: loss {losses[0]:.3f} -> {rows[-1]['final_loss']:.3f}")
    report = {"options": {**asdict(options), "model": model_name, "paca_rank": options.paca_rank},
              "results": rows, "curves": curves}
    paths = [output_dir / "convergence.json", output_dir / "convergence.md", output_dir / "convergence.png"]
    paths[0].write_text(json.dumps(report, indent=2) + "\n")
    paths[1].write_text(_markdown(report))
    _plot(report, paths[2])
    print(paths[1].read_text())
    return paths


def _markdown(report: dict) -> str:
    options = report["options"]
    lines = [f"# Convergence on the OASST1 sample: {Path(options['model']).name}",
             "", f"{options['steps']} steps, batch {options['batch_size']} x up to {options['sequence_length']} "
             f"tokens, same batches in the same order for every method; final loss = median of the last 5 steps.",
             "", "| method | rank | learning rate | trainable params | first loss | final loss | validation loss |",
             "|---|---|---|---|---|---|---|"]
    for row in report["results"]:
        validation = "-" if row["validation_loss"] is None else f"{row['validation_loss']:.3f}"
        lines.append(f"| {row['method']} | {row['rank'] or '-'} | {row['learning_rate']:g} "
                     f"| {row['trainable_parameters']:,} | {row['first_loss']:.3f} | {row['final_loss']:.3f} "
                     f"| {validation} |")
    return "\n".join(lines) + "\n"


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(7, 4))
    for method, losses in report["curves"].items():
        ax.plot(range(1, len(losses) + 1), losses, label=method)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"OASST1 sample, {Path(report['options']['model']).name}", fontsize=9)
    ax.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
