"""``paca-lightning bench``: PaCA against LoRA, DoRA, full fine-tuning and the physical floor.

One command measures, on the same model, batch and sequence length, interleaving the methods:
training step time and tokens/s (medians), bytes saved for backward, FLOPs, peak memory and the
longest sequence that fits a memory budget; it writes ``results.md``, ``results.json`` and PNG
plots. ``--convergence`` instead trains PaCA, LoRA and full fine-tuning on the OASST1 sample
shipped with the package and plots their loss curves. QLoRA vs QPaCA is measured by
`paca_lightning.bench.quantized` when bitsandbytes imports.

Modules: `models` (presets and loading), `methods` (preparing each method, the losses),
`measure` (one function per figure), `runner` (the interleaved run), `report` (Markdown, JSON,
plots), `convergence` (loss curves), `peak_rss` (the CPU peak-memory child process),
`quantized` (QLoRA vs QPaCA). Run apart: `plan` (``paca-lightning plan``), `checkpointing`
(budget-driven checkpointing, PaCA vs LoRA) and `sharded_loading` (filling FSDP2 shards).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from .methods import LOSSES, METHODS
from .models import DTYPES, PRESETS

__all__ = ["main", "build_parser"]


def _list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="paca-lightning bench",
        description="Measure PaCA against full fine-tuning, peft LoRA and DoRA, and the frozen floor "
                    "(all weights frozen, only input gradients) on one model, interleaved.")
    parser.add_argument("--model", default="llama-50m",
                        help=f"preset ({', '.join(PRESETS)}) or any transformers causal LM name or path "
                             "(default: llama-50m; --convergence defaults to the packaged tiny-llama)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "hpu"))
    parser.add_argument("--dtype", choices=tuple(DTYPES),
                        help="default: float32 on cpu, bfloat16 on cuda and hpu")
    parser.add_argument("--methods", type=_list, default=list(METHODS),
                        help=f"comma-separated subset of {','.join(METHODS)} (default: all)")
    parser.add_argument("--loss", choices=(*LOSSES, "both"), default="both",
                        help="dense: full logits then cross-entropy; chunked: paca_lightning.loss."
                             "chunked_causal_lm_loss, no logits stored (default: both)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA/DoRA rank r (default 8)")
    parser.add_argument("--equal-rank", action="store_true",
                        help="give PaCA rank r too; by default PaCA gets 2r, the equal-parameter-budget "
                             "comparison of the paper")
    parser.add_argument("--target-modules", default="all-linear",
                        help="comma-separated module names, or all-linear (every Linear but the head)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--sequence-length", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per method first")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved timed rounds")
    parser.add_argument("--chunk-size", type=int, default=1024, help="tokens per chunk of the chunked loss")
    parser.add_argument("--no-peak-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--no-max-sequence", action="store_true", help="skip the longest-sequence search")
    parser.add_argument("--memory-budget-gib", type=float,
                        help="budget of the longest-sequence search (default: 90%% of the accelerator, "
                             "1 GiB on cpu)")
    parser.add_argument("--sequence-granularity", type=int, default=64,
                        help="the search reports multiples of this (default 64)")
    parser.add_argument("--sequence-limit", type=int, default=None,
                        help="longest sequence tried (default: 8 x --sequence-length; every probe near the limit "
                             "is a full training step at that length)")
    parser.add_argument("--quantized", choices=("auto", "on", "off"), default="auto",
                        help="QLoRA vs QPaCA (needs bitsandbytes; auto: when it imports)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", type=Path, default=Path("bench-results"))
    convergence = parser.add_argument_group("convergence mode")
    convergence.add_argument("--convergence", action="store_true",
                             help="train PaCA, LoRA and full fine-tuning on the packaged OASST1 sample and "
                                  "plot the loss curves instead of measuring speed and memory")
    convergence.add_argument("--steps", type=int, default=60, help="optimizer steps per method")
    convergence.add_argument("--learning-rate", type=float, default=1e-3, help="PaCA and LoRA learning rate")
    convergence.add_argument("--full-learning-rate", type=float, default=1e-4,
                             help="full fine-tuning learning rate (all weights move, so smaller)")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    target_modules = args.target_modules if args.target_modules == "all-linear" else _list(args.target_modules)
    if args.convergence:
        from .convergence import ConvergenceOptions, run_convergence

        options = ConvergenceOptions(
            model=None if args.model == build_parser().get_default("model") else args.model,
            device=args.device, dtype=dtype, lora_rank=args.rank, equal_budget=not args.equal_rank,
            target_modules=target_modules, batch_size=args.batch_size, sequence_length=args.sequence_length,
            steps=args.steps, learning_rate=args.learning_rate, full_learning_rate=args.full_learning_rate,
            seed=args.seed)
        args.output_dir.mkdir(parents=True, exist_ok=True)
        for path in run_convergence(options, args.output_dir):
            print(f"wrote {path}")
        return 0

    from .report import markdown, write_json, write_plots
    from .runner import BenchOptions, run_benchmark

    options = BenchOptions(
        model=args.model, device=args.device, dtype=dtype, methods=args.methods,
        losses=list(LOSSES) if args.loss == "both" else [args.loss], lora_rank=args.rank,
        equal_budget=not args.equal_rank, target_modules=target_modules, batch_size=args.batch_size,
        sequence_length=args.sequence_length, warmup=args.warmup, repeats=args.repeats,
        chunk_size=args.chunk_size, peak_memory=not args.no_peak_memory, max_sequence=not args.no_max_sequence,
        memory_budget_gib=args.memory_budget_gib, sequence_granularity=args.sequence_granularity,
        sequence_limit=args.sequence_limit or 8 * args.sequence_length, seed=args.seed)
    try:
        options.check()
    except ValueError as error:
        parser.error(str(error))  # usage and the message, exit status 2, before anything is written
    args.output_dir.mkdir(parents=True, exist_ok=True)
    report = run_benchmark(options)

    def write_results() -> str:
        table = markdown(report)
        (args.output_dir / "results.md").write_text(table)
        write_json(report, args.output_dir / "results.json")
        return table

    if args.quantized != "off":  # the QLoRA phase is long: keep what is measured if it is interrupted
        write_results()
        print(f"wrote {args.output_dir / 'results.json'} (before the QLoRA vs QPaCA phase)")
    report["quantized"] = quantized_comparison(args, dtype)
    table = write_results()
    plots = write_plots(report, args.output_dir)
    print(table)
    for path in [args.output_dir / "results.md", args.output_dir / "results.json", *plots]:
        print(f"wrote {path}")
    return 0


def quantized_comparison(args: argparse.Namespace, dtype: str) -> Optional[dict]:
    """QLoRA vs QPaCA rows and their Markdown, or a note saying why they were not measured."""
    if args.quantized == "off":
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        if args.quantized == "on":
            raise ImportError(f"--quantized on needs bitsandbytes, which does not import: {error}") from error
        return {"rows": None, "markdown": f"QLoRA vs QPaCA: not measured, bitsandbytes does not import here ({error})."}
    from .quantized import format_table, run_quantized_benchmark

    print("QLoRA vs QPaCA (nf4) ...")
    rows = run_quantized_benchmark(args.model, lora_rank=args.rank, batch_size=args.batch_size,
                                   sequence_length=args.sequence_length, compute_dtype=dtype, device=args.device,
                                   rounds=args.repeats, warmup=args.warmup, seed=args.seed)
    return {"rows": rows, "markdown": "QLoRA vs QPaCA, nf4 base, equal trainable parameters "
                                      "(paca_lightning.bench.quantized):\n\n" + format_table(rows)}
