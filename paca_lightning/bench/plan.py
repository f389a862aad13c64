"""`paca-lightning plan`: the memory plan of one training step per method, as a table or JSON.

The plans come from `paca_lightning.planning` (one step under ``FakeTensorMode``, from the
model's config alone); this module adds the budget search (layers to checkpoint, longest
sequence) and the command line.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Optional

import torch

from ..planning import PLAN_METHODS, checkpointed_layers_needed, load_config, plan_method, total_with_checkpointing


def longest_sequence(config, method: str, budget: int, *, checkpoint_all: bool, granularity: int = 256,
                     limit: int = 1 << 20, **kwargs) -> int:
    """The longest sequence (a multiple of ``granularity``, 0 if none) whose planned step fits
    ``budget``, without checkpointing or with every layer checkpointed; one plan per probe."""
    def fits(length: int) -> bool:
        planned = plan_method(config, method, sequence_length=length, **kwargs)
        layers = len(planned.saved_per_layer_bytes) if checkpoint_all else 0
        return total_with_checkpointing(planned, layers) <= budget

    low, high = 0, granularity
    while high <= limit and fits(high):
        low, high = high, high * 2
    high = min(high, limit + granularity)
    while high - low > granularity:
        middle = (low + high) // 2 // granularity * granularity
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def plan(model: str, methods, memory_budget: Optional[int] = None, config=None, **kwargs) -> dict:
    """Plans of ``methods`` for ``model`` (its config, read unless ``config`` is given)."""
    config = load_config(model) if config is None else config
    result = {"model": model, "settings": {k: str(v) for k, v in kwargs.items()}, "methods": {}}
    for method in methods:
        planned = plan_method(config, method, **kwargs)
        entry = asdict(planned)
        if memory_budget is not None:
            rest = {k: v for k, v in kwargs.items() if k != "sequence_length"}
            entry["memory_budget_bytes"] = memory_budget
            # what activation_checkpointing="auto" checkpoints on one device with this budget
            needed = checkpointed_layers_needed(planned, memory_budget)
            entry["checkpointed_layers_needed"] = needed
            entry["total_auto_checkpointed_bytes"] = (None if needed is None
                                                      else total_with_checkpointing(planned, needed))
            entry["longest_sequence_no_checkpointing"] = longest_sequence(
                config, method, memory_budget, checkpoint_all=False, **rest)
            entry["longest_sequence_all_checkpointed"] = longest_sequence(
                config, method, memory_budget, checkpoint_all=True, **rest)
        result["methods"][method] = entry
    return result


def format_table(result: dict) -> str:
    mib = 2 ** 20
    rows = [f"{'method':<10} {'saved/layer MiB':>15} {'head+loss MiB':>13} {'saved MiB':>10} "
            f"{'weights MiB':>11} {'grads MiB':>9} {'optim MiB':>9} {'total MiB':>10} {'peak MiB':>10} "
            f"{'ckpt total MiB':>14}"]
    for name, p in result["methods"].items():
        layer = max(p["saved_per_layer_bytes"], default=0)
        rows.append(f"{name:<10} {layer / mib:>15.1f} {p['head_and_loss_bytes'] / mib:>13.1f} "
                    f"{p['saved_bytes'] / mib:>10.1f} {p['weight_bytes'] / mib:>11.1f} "
                    f"{p['gradient_bytes'] / mib:>9.1f} {p['optimizer_state_bytes'] / mib:>9.1f} "
                    f"{p['total_bytes'] / mib:>10.1f} {p['peak_bytes'] / mib:>10.1f} "
                    f"{p['total_checkpointed_bytes'] / mib:>14.1f}")
    budgeted = [(n, p) for n, p in result["methods"].items() if "memory_budget_bytes" in p]
    if budgeted:
        rows += ["", f"at a budget of {budgeted[0][1]['memory_budget_bytes'] / 2**30:.1f} GiB "
                 "(whole step; longest sequences in steps of 256 tokens):",
                 f"{'method':<10} {'auto: layers to checkpoint':>26} {'auto: total MiB':>15} {'longest, none':>14} "
                 f"{'longest, all':>13}"]
        for name, p in budgeted:
            needed, total = p["checkpointed_layers_needed"], p["total_auto_checkpointed_bytes"]
            rows.append(f"{name:<10} {'does not fit' if needed is None else needed:>26} "
                        f"{'-' if total is None else f'{total / 2**20:.1f}':>15} "
                        f"{p['longest_sequence_no_checkpointing']:>14} {p['longest_sequence_all_checkpointed']:>13}")
    return "\n".join(rows)


MARKDOWN_COLUMNS = (("saved per layer (largest)", lambda p: max(p["saved_per_layer_bytes"], default=0)),
                    ("head + loss", lambda p: p["head_and_loss_bytes"]), ("saved, all", lambda p: p["saved_bytes"]),
                    ("weights", lambda p: p["weight_bytes"]), ("grads", lambda p: p["gradient_bytes"]),
                    ("AdamW states", lambda p: p["optimizer_state_bytes"]),
                    ("total, no checkpointing", lambda p: p["total_bytes"]),
                    ("peak, no checkpointing", lambda p: p["peak_bytes"]),
                    ("total, all layers checkpointed", lambda p: p["total_checkpointed_bytes"]))


def format_markdown(result: dict) -> str:
    """The table as a markdown table (MiB), with what ``activation_checkpointing="auto"`` checkpoints
    and the longest sequences when a budget was given."""
    budgeted = all("memory_budget_bytes" in p for p in result["methods"].values())
    header = [name for name, _ in MARKDOWN_COLUMNS] + (["auto: layers checkpointed", "auto: total",
                                                        "longest sequence, none", "longest sequence, all"]
                                                       if budgeted else [])
    rows = ["| method | " + " | ".join(header) + " |", "|---|" + "---:|" * len(header)]
    for name, p in result["methods"].items():
        cells = [f"{value(p) / 2**20:.1f}" for _, value in MARKDOWN_COLUMNS]
        if budgeted:
            needed, total = p["checkpointed_layers_needed"], p["total_auto_checkpointed_bytes"]
            cells += ["does not fit" if needed is None else f"{needed} of {len(p['saved_per_layer_bytes'])}",
                      "-" if total is None else f"{total / 2**20:.1f}",
                      str(p["longest_sequence_no_checkpointing"]), str(p["longest_sequence_all_checkpointed"])]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: Optional[list[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="paca-lightning plan", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a config.json, a directory holding one, or a hub name")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--sequence-length", type=int, default=512)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--methods", default=",".join(PLAN_METHODS),
                        help=f"comma-separated, from {', '.join(PLAN_METHODS)}")
    parser.add_argument("--rank", type=int, default=64, help="PaCA's rank; LoRA gets half unless --equal-rank")
    parser.add_argument("--equal-rank", action="store_true")
    parser.add_argument("--memory-budget", type=float, default=None, metavar="GB",
                        help="per-device budget in GB (10^9 bytes): layers to checkpoint and longest sequences")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true")
    output.add_argument("--markdown", action="store_true", help="a markdown table in MiB (as docs/memory.md holds)")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in PLAN_METHODS]
    if unknown:
        parser.error(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(PLAN_METHODS)}")
    if args.memory_budget is not None and args.memory_budget <= 0:
        parser.error(f"--memory-budget must be > 0 GB, got {args.memory_budget}")
    budget = None if args.memory_budget is None else int(args.memory_budget * 1e9)
    try:
        config = load_config(args.model)
    except (OSError, ValueError) as error:
        parser.error(str(error))
    result = plan(args.model, methods, memory_budget=budget, config=config, batch_size=args.batch_size,
                  sequence_length=args.sequence_length, dtype=getattr(torch, args.dtype), rank=args.rank,
                  lora_rank=args.rank if args.equal_rank else None)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(format_markdown(result) if args.markdown else format_table(result))
    return 0
