"""PaCA against LoRA at one activation budget, with budget-driven checkpointing.

``python -m paca_lightning.bench.checkpointing --model llama-50m --lora-layers 2``

The budget is what LoRA's step saves for backward with its first ``--lora-layers`` decoder layers
checkpointed (the plan `activation_checkpointing="auto"` makes, `paca_lightning.planning`, with
no persistent bytes: activations only). At that budget PaCA, which saves less per layer, needs
fewer checkpointed layers. Then, on real tensors:

- the bytes each step saves for backward, against the plan's: head and loss, each checkpointed
  layer's tensor arguments, and the saved tensors of the layers left unchecked (the plan also
  counts a checkpointed layer's position ids, which it keeps alive but autograd does not save,
  so the two differ by those few bytes);
- gradients with those layers checkpointed equal the gradients without checkpointing;
- step times of both methods, interleaved (PaCA, LoRA, PaCA, ...; medians), and their ratio.

PaCA gets rank 2r and LoRA rank r (equal trainable parameters), LoRA's adapters are in the
model's dtype (the ``lora`` method of `paca-lightning bench`), both use the chunked loss.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Optional

import torch

from ..planning import checkpointed_layers_needed, plan_method, total_with_checkpointing
from ..training.activation_checkpointing import checkpoint_only, enable_activation_checkpointing
from .measure import median
from .measure import saved_bytes as measured_saved_bytes
from .methods import Trainee, loss_function, prepare, train_step
from .models import DTYPES, load_model, random_batch

METHODS = ("paca", "lora")


def _trainee(method: str, args, checkpointed: int) -> Trainee:
    model = load_model(args.model, DTYPES[args.dtype], torch.device("cpu"))
    trainee = prepare(method, model, lora_rank=args.rank, paca_rank=2 * args.rank, target_modules="all-linear")
    enable_activation_checkpointing(trainee.causal_lm)
    checkpoint_only(trainee.causal_lm, checkpointed)
    return trainee


def _gradients(trainee: Trainee, compute_loss, batch: dict) -> list[torch.Tensor]:
    compute_loss(trainee.causal_lm, batch).backward()
    gradients = [p.grad.clone() for p in trainee.trainable()]
    trainee.causal_lm.zero_grad(set_to_none=True)
    return gradients


def _gradient_difference(trainee: Trainee, compute_loss, batch: dict, checkpointed: int) -> float:
    """Largest |difference| between the trainable gradients with ``checkpointed`` layers and with none."""
    with_checkpointing = _gradients(trainee, compute_loss, batch)
    checkpoint_only(trainee.causal_lm, 0)
    without = _gradients(trainee, compute_loss, batch)
    checkpoint_only(trainee.causal_lm, checkpointed)
    return max((a - b).abs().max().item() for a, b in zip(with_checkpointing, without))


def run(args) -> dict:
    dtype = DTYPES[args.dtype]
    config = load_model(args.model, dtype, torch.device("meta")).config
    plans = {method: plan_method(config, method, batch_size=args.batch_size, sequence_length=args.sequence_length,
                                 dtype=dtype, rank=2 * args.rank, lora_rank=args.rank, chunk_size=args.chunk_size)
             for method in METHODS}
    layers = len(plans["lora"].saved_per_layer_bytes)
    if not 0 < args.lora_layers <= layers:
        raise ValueError(f"--lora-layers {args.lora_layers}: choose 1 to {layers} (the model's decoder layers)")
    budget = total_with_checkpointing(plans["lora"], args.lora_layers, persistent_bytes=0)
    counts = {"lora": args.lora_layers, "paca": checkpointed_layers_needed(plans["paca"], budget, persistent_bytes=0)}
    compute_loss = loss_function("chunked", args.chunk_size)
    batch = random_batch(config.vocab_size, args.batch_size, args.sequence_length, torch.device("cpu"))
    trainees = {method: _trainee(method, args, counts[method]) for method in METHODS}
    result = {"model": args.model, "dtype": args.dtype, "batch_size": args.batch_size,
              "sequence_length": args.sequence_length, "lora_rank": args.rank, "paca_rank": 2 * args.rank,
              "activation_budget_bytes": budget, "decoder_layers": layers, "methods": {}}
    for method, trainee in trainees.items():
        plan, count = plans[method], counts[method]
        kept = (plan.head_and_loss_bytes + sum(plan.layer_input_per_layer_bytes[:count])
                + sum(plan.saved_per_layer_bytes[count:]))
        measured = measured_saved_bytes(trainee, compute_loss, batch)
        result["methods"][method] = {
            "checkpointed_layers": count,
            "planned_activation_peak_bytes": total_with_checkpointing(plan, count, persistent_bytes=0),
            "planned_saved_bytes": kept, "measured_saved_bytes": measured,
            "max_gradient_difference": _gradient_difference(trainee, compute_loss, batch, count),
        }
    for _ in range(args.warmup):
        for trainee in trainees.values():
            train_step(trainee, compute_loss, batch)
    times: dict[str, list[float]] = {method: [] for method in METHODS}
    for _ in range(args.repeats):
        for method, trainee in trainees.items():
            start = time.perf_counter()
            train_step(trainee, compute_loss, batch)
            times[method].append(time.perf_counter() - start)
    for method in METHODS:
        result["methods"][method]["median_step_seconds"] = median(times[method])
    result["step_time_ratio_paca_over_lora"] = median([p / q for p, q in zip(times["paca"], times["lora"])])
    return result


def format_result(result: dict) -> str:
    mib = 2 ** 20
    rows = [f"{result['model']}, {result['dtype']}, batch {result['batch_size']} x {result['sequence_length']}, "
            f"PaCA rank {result['paca_rank']} / LoRA rank {result['lora_rank']}, {result['decoder_layers']} decoder "
            f"layers; activation budget {result['activation_budget_bytes'] / mib:.1f} MiB (LoRA's plan with "
            f"{result['methods']['lora']['checkpointed_layers']} layers checkpointed)",
            f"{'method':<6} {'checkpointed':>12} {'planned peak MiB':>16} {'saved MiB (plan)':>16} "
            f"{'real - plan bytes':>17} {'max |dgrad|':>11} {'median step s':>13}"]
    for method, entry in result["methods"].items():
        difference = entry["measured_saved_bytes"] - entry["planned_saved_bytes"]
        peak, saved = entry["planned_activation_peak_bytes"] / mib, entry["planned_saved_bytes"] / mib
        rows.append(f"{method:<6} {entry['checkpointed_layers']:>12} {peak:>16.2f} {saved:>16.2f} {difference:>17} "
                    f"{entry['max_gradient_difference']:>11.3g} {entry['median_step_seconds']:>13.4f}")
    rows.append(f"step time PaCA / LoRA (median of interleaved pairs): {result['step_time_ratio_paca_over_lora']:.3f}")
    return "\n".join(rows)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m paca_lightning.bench.checkpointing",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-50m", help="a bench preset or a transformers causal LM")
    parser.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--sequence-length", type=int, default=512)
    parser.add_argument("--rank", type=int, default=8, help="LoRA's rank r; PaCA gets 2r")
    parser.add_argument("--lora-layers", type=int, default=1,
                        help="decoder layers LoRA checkpoints at the budget (sets the budget)")
    parser.add_argument("--chunk-size", type=int, default=1024, help="tokens per chunk of the chunked loss")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = run(args)
    print(json.dumps(result, indent=1) if args.json else format_result(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
