"""QPaCA vs peft QLoRA on the same 4-bit base: ``python -m paca_lightning.bench.quantized``.

Both methods load one checkpoint with the same ``BitsAndBytesConfig`` (nf4 by default, double
quantization, as QLoRA) and train on the same batch at equal trainable parameters: LoRA of rank
``r`` trains ``r * (in + out)`` values per layer, so each PaCA layer gets rank
``round(r * (in + out) / out)`` (``2r`` on a square layer, the paper's setting; the totals are
printed and differ by well under 1%).

Figures, each measured the same way for both methods:

- bytes saved for backward by one forward (storages of parameters, quantized weights included,
  are excluded; each storage counts once), see `paca_lightning.bench.measure.saved_bytes`;
- peak resident memory (RSS) of a fresh child process while it trains ``--rss-steps`` steps, the
  kernel's peak counter reset after loading (the loader peaks higher than training); on CUDA/HPU
  this is host memory, the process figure beside the allocator's;
- step time (forward, backward, AdamW), the two methods interleaved step by step in one process
  (QPaCA, QLoRA, then QLoRA, QPaCA, ...) so that drifting machine load hits both alike; the
  reported ratio is the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..config import PaCAConfig
from ..model import apply_paca
from .measure import DeviceOps, current_rss, median, peak_rss, reset_peak_rss, saved_bytes, timed_step
from .methods import Trainee, loss_function, train_step
from .models import DTYPES, PRESETS, random_batch

METHODS = ("qpaca", "qlora")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MiB = 1 << 20


def save_checkpoint(model_name: str, directory: Path, seed: int) -> Path:
    """A preset's weights written once, so every process quantizes bit-identical weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**PRESETS[model_name], max_position_embeddings=4096)).save_pretrained(directory)
    return directory


def load_quantized(checkpoint: str, quant_type: str, compute_dtype: torch.dtype, device: torch.device) -> nn.Module:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=compute_dtype)
    return AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=config, dtype=compute_dtype,
                                                device_map={"": device})


def equal_budget_ranks(model: nn.Module, lora_rank: int) -> dict[str, int]:
    """Per target name, the PaCA rank whose ``out * rank`` matches LoRA's ``r * (in + out)``."""
    ranks = {}
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in TARGETS and leaf not in ranks:
            ranks[leaf] = max(1, round(lora_rank * (module.in_features + module.out_features) / module.out_features))
    return ranks


def prepare(method: str, model: nn.Module, lora_rank: int, learning_rate: float = 1e-4) -> Trainee:
    if method == "qpaca":
        ranks = equal_budget_ranks(model, lora_rank)
        config = PaCAConfig(rank=2 * lora_rank, alpha=4 * lora_rank, target_modules=TARGETS,
                            rank_pattern=ranks, alpha_pattern={name: 2.0 * rank for name, rank in ranks.items()})
        model = apply_paca(model, config)
    elif method == "qlora":
        from peft import LoraConfig, get_peft_model

        # Not peft's prepare_model_for_kbit_training: it upcasts norms and embeddings to float32,
        # and the comparison needs the same model under both methods. Dropout 0, so that LoRA
        # saves no dropout mask the other method lacks.
        config = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0, target_modules=TARGETS)
        model = get_peft_model(model, config).get_base_model()
    else:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    return Trainee(method, lora_rank, model, torch.optim.AdamW(trainable, lr=learning_rate))


def _child_main(spec: dict) -> int:
    """Peak-memory child: load, prepare one method, train a few steps, print one JSON line."""
    device = torch.device(spec["device"])
    model = load_quantized(spec["checkpoint"], spec["quant_type"], DTYPES[spec["compute_dtype"]], device)
    trainee = prepare(spec["method"], model, spec["lora_rank"])
    batch = random_batch(model.config.vocab_size, spec["batch_size"], spec["sequence_length"], device, seed=1)
    compute_loss = loss_function("dense")
    # Loading peaks far above training (the file's full-precision tensors exist while they are
    # quantized): restart the kernel's peak counter, then read the starting figure.
    reset_peak_rss()
    before = current_rss()
    for _ in range(spec["steps"]):
        train_step(trainee, compute_loss, batch)
    DeviceOps(device).synchronize()
    print(json.dumps({"rss_before_training": before, "peak_rss": peak_rss()}))
    return 0


def _child_peak(spec: dict) -> dict:
    command = [sys.executable, "-m", "paca_lightning.bench.quantized", "--child", json.dumps(spec)]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if result.returncode != 0:
        raise RuntimeError(f"the peak-memory child for {spec['method']} failed (exit {result.returncode}):\n"
                           f"{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_quantized_benchmark(model: str = "llama-50m", *, quant_type: str = "nf4", lora_rank: int = 8,
                            batch_size: int = 2, sequence_length: int = 512, compute_dtype: str = "float32",
                            device: str = "cpu", rounds: int = 7, warmup: int = 2, rss_steps: int = 2,
                            seed: int = 0, workdir: Optional[str] = None, log=print) -> list[dict]:
    """Measure QPaCA and peft QLoRA; one row of figures per method (see the module docstring).

    ``model`` is a preset of `paca_lightning.bench.models` (saved once to ``workdir``, a temporary
    directory by default) or a local transformers checkpoint. Ratios are QPaCA / QLoRA.
    """
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type must be 'nf4' or 'fp4' (QLoRA's 4-bit formats), got {quant_type!r}")
    if compute_dtype not in DTYPES:
        raise ValueError(f"compute_dtype must be one of {list(DTYPES)}, got {compute_dtype!r}")
    with tempfile.TemporaryDirectory(dir=workdir) as scratch:
        checkpoint = str(save_checkpoint(model, Path(scratch), seed) if model in PRESETS else model)
        ops = DeviceOps(torch.device(device))
        dtype = DTYPES[compute_dtype]
        trainees = {m: prepare(m, load_quantized(checkpoint, quant_type, dtype, ops.device), lora_rank)
                    for m in METHODS}
        vocab_size = trainees["qpaca"].causal_lm.config.vocab_size
        batch = random_batch(vocab_size, batch_size, sequence_length, ops.device, seed=1)
        compute_loss = loss_function("dense")
        rows = {m: {"method": m, "quant_type": quant_type, "trainable_params": sum(p.numel() for p in t.trainable()),
                    "saved_for_backward_bytes": saved_bytes(t, compute_loss, batch)} for m, t in trainees.items()}

        times: dict[str, list[float]] = {m: [] for m in METHODS}
        for _ in range(warmup):
            for trainee in trainees.values():
                train_step(trainee, compute_loss, batch)
        log("  saved for backward: " + ", ".join(f"{m} {rows[m]['saved_for_backward_bytes'] / 2**20:.1f} MiB"
                                                   for m in METHODS))
        for round_index in range(rounds):
            order = METHODS if round_index % 2 == 0 else METHODS[::-1]
            for method in order:
                times[method].append(timed_step(trainees[method], compute_loss, batch, ops)[0])
            log(f"  round {round_index + 1}/{rounds}: " + ", ".join(f"{m} {times[m][-1]:.3f} s" for m in METHODS))
        del trainees

        for method in METHODS:
            log(f"  peak memory: training {method} in a fresh process ...")
            spec = {"method": method, "checkpoint": checkpoint, "quant_type": quant_type, "lora_rank": lora_rank,
                    "batch_size": batch_size, "sequence_length": sequence_length, "compute_dtype": compute_dtype,
                    "device": device, "steps": rss_steps}
            rows[method].update(_child_peak(spec))
            rows[method]["step_times_s"] = times[method]
            rows[method]["step_time_s"] = median(times[method])
    ratios = [a / b for a, b in zip(times["qpaca"], times["qlora"])]
    rows["qpaca"]["step_time_ratio_vs_qlora"] = median(ratios)
    rows["qlora"]["step_time_ratio_vs_qlora"] = 1.0
    return [rows[m] for m in METHODS]


def format_table(rows: list[dict]) -> str:
    lines = ["| method | trainable params | saved for backward, MiB | peak RSS training, MiB (RSS before) | "
             "step time, s (median) | step time / QLoRA (median of interleaved rounds) |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        label = f"QPaCA ({row['quant_type']})" if row["method"] == "qpaca" else f"peft QLoRA ({row['quant_type']})"
        lines.append(f"| {label} | {row['trainable_params']:,d} | {row['saved_for_backward_bytes'] / MiB:.1f} | "
                     f"{row['peak_rss'] / MiB:.0f} ({row['rss_before_training'] / MiB:.0f}) | "
                     f"{row['step_time_s']:.3f} | {row['step_time_ratio_vs_qlora']:.3f} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return _child_main(json.loads(argv[1]))
    parser = argparse.ArgumentParser(prog="python -m paca_lightning.bench.quantized",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llama-50m", help=f"a preset ({', '.join(PRESETS)}) or a local checkpoint")
    parser.add_argument("--quant-type", default="nf4", choices=["nf4", "fp4"])
    parser.add_argument("--lora-rank", type=int, default=8, help="QLoRA rank; PaCA ranks match its parameter count")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--sequence-length", type=int, default=512)
    parser.add_argument("--compute-dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--device", default="cpu", help="cpu, cuda or hpu")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (one step per method each)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rss-steps", type=int, default=2, help="training steps in each peak-memory child")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = parser.parse_args(argv)
    rows = run_quantized_benchmark(args.model, quant_type=args.quant_type, lora_rank=args.lora_rank,
                                   batch_size=args.batch_size, sequence_length=args.sequence_length,
                                   compute_dtype=args.compute_dtype, device=args.device, rounds=args.rounds,
                                   warmup=args.warmup, rss_steps=args.rss_steps)
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
