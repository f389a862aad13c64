"""Turn a benchmark report (the dict `run_benchmark` returns) into Markdown, JSON and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

MIB = 2**20
RATIO_LABELS = {"step_time_s": "step time", "step_time_min_s": "fastest step", "tokens_per_s": "tokens/s",
                "saved_bytes": "saved for backward", "flops": "FLOPs", "peak_memory_bytes": "peak memory",
                "step_memory_bytes": "training memory", "max_sequence_length": "max sequence length"}


def _cell(row: dict, key: str, scale: float = 1.0, digits: int = 1) -> str:
    value = row.get(key)
    return "-" if value is None else f"{value / scale:,.{digits}f}"


def markdown(report: dict) -> str:
    options = report["options"]
    budget_note = ("method = the step's real allocator peak" if not report["device"].startswith("CPU")
                   else "parameters + gradients + AdamW state + bytes saved for backward")
    peak_note = ("peak RSS of a fresh process while it trains; training memory = that peak minus the RSS "
                 "before the first step (gradients, AdamW state, activations)"
                 if report["device"].startswith("CPU") else
                 "this method's parameters + AdamW state + the allocator's peak during a step above what was "
                 "resident; training memory = the same without the parameters")
    lines = [
        f"# PaCA benchmark: {options['model']} on {report['device']}, {options['dtype']}",
        "",
        f"Batch {options['batch_size']} x {options['sequence_length']} tokens; "
        + (f"equal parameter budget: LoRA/DoRA rank {options['lora_rank']}, PaCA rank {options['paca_rank']}"
           if options["equal_budget"] else f"equal rank {options['lora_rank']} for LoRA, DoRA and PaCA")
        + f"; targets {options['target_modules']}. Step time: median of {options['repeats']} interleaved rounds "
        "(order rotated each round) "
        f"after {options['warmup']} warm-up steps (forward, backward, AdamW step). Peak memory: {peak_note}. "
        f"Max sequence length: longest multiple of {options['sequence_granularity']} within "
        f"{report['memory_budget_bytes'] / 2**30:.2f} GiB ({budget_note}).",
        "",
        "| method | loss | rank | trainable params | step time (s) | fastest step (s) | tokens/s "
        "| saved for backward (MiB) "
        "| GFLOPs | peak memory (MiB) | training memory (MiB) | max seq length |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["results"]:
        lines.append(f"| {row['method']} | {row['loss']} | {row['rank'] if row['rank'] is not None else '-'} "
                     f"| {row['trainable_parameters']:,} | {_cell(row, 'step_time_s', digits=3)} "
                     f"| {_cell(row, 'step_time_min_s', digits=3)} "
                     f"| {_cell(row, 'tokens_per_s', digits=0)} | {_cell(row, 'saved_bytes', MIB)} "
                     f"| {_cell(row, 'flops', 1e9)} | {_cell(row, 'peak_memory_bytes', MIB)} "
                     f"| {_cell(row, 'step_memory_bytes', MIB)} "
                     f"| {_sequence_cell(row.get('max_sequence_length'), options['sequence_limit'])} |")
    for loss, by_method in report["ratios"].items():
        metrics = [m for m in RATIO_LABELS if any(m in values for values in by_method.values())]
        lines += ["", f"Ratios, {loss} loss (below 1 favours PaCA, except tokens/s and max sequence length; "
                  "paca/lora divides by LoRA with adapters in the model's dtype, paca/lora-fp32 by peft's "
                  "default float32 adapters):", "",
                  "| ratio | " + " | ".join(RATIO_LABELS[m] for m in metrics) + " |",
                  "|---|" + "---|" * len(metrics)]
        for name, values in by_method.items():
            cells = [f"{values[m]:.3f}" if m in values else "-" for m in metrics]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if report.get("quantized"):
        lines += ["", report["quantized"]["markdown"]]
    return "\n".join(lines) + "\n"


def write_json(report: dict, path: Path) -> None:
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")


def _bar_chart(ax, rows: list[dict], key: str, scale: float, ylabel: str) -> None:
    shown = [row for row in rows if row.get(key) is not None]
    labels = [f"{row['method']}\n{row['loss']}" for row in shown]
    colors = ["tab:green" if row["method"] == "paca" else "tab:gray" if row["method"] == "floor" else "tab:blue"
              for row in shown]
    bars = ax.bar(labels, [row[key] / scale for row in shown], color=colors)
    ax.bar_label(bars, fmt="%.3g", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.tick_params(axis="x", labelsize=7)


def _sequence_cell(length, limit: int) -> str:
    """The longest sequence found, marked when the search stopped at its limit (the true one is longer)."""
    if length is None:
        return "-"
    return f">= {length} (the search limit)" if length >= limit else str(length)


def write_plots(report: dict, directory: Path) -> list[Path]:
    """step_time.png, memory.png and (when measured) max_sequence_length.png in ``directory``."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, none opened
    import matplotlib.pyplot as plt

    rows, title = report["results"], f"{report['options']['model']}, {report['device']}"
    written = []
    charts = [("step_time.png", [("step_time_s", 1.0, "step time (s, median)")]),
              ("memory.png", [("saved_bytes", MIB, "saved for backward (MiB)"),
                              ("peak_memory_bytes", MIB, "peak memory (MiB)"),
                              ("step_memory_bytes", MIB, "training memory (MiB)")]),
              ("max_sequence_length.png", [("max_sequence_length", 1.0, "max sequence length (tokens)")])]
    for filename, panels in charts:
        panels = [panel for panel in panels if any(row.get(panel[0]) is not None for row in rows)]
        if not panels:
            continue
        figure, axes = plt.subplots(1, len(panels), figsize=(max(6, len(rows) * 0.9) * len(panels), 4),
                                    squeeze=False)
        for ax, (key, scale, ylabel) in zip(axes[0], panels):
            _bar_chart(ax, rows, key, scale, ylabel)
        figure.suptitle(title, fontsize=9)
        figure.tight_layout()
        figure.savefig(directory / filename, dpi=110)
        plt.close(figure)
        written.append(directory / filename)
    return written
