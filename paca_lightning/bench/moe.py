"""One benchmark row for mixture-of-experts weights: PaCA against peft LoRA on the same experts.

A Mixtral built from a config (no download) trains only its fused expert weights
(``experts.gate_up_proj`` and ``experts.down_proj`` of every layer): PaCA at rank ``2r`` (the
paper's equal-parameter comparison) against peft LoRA at rank ``r`` through
``LoraConfig(target_parameters=...)``. Saved bytes (deterministic) come from one step each;
step times from rounds that alternate the two methods, so drift on a shared machine affects
both alike, and the ratios are of the medians of that one interleaved run.

Run: ``python -m paca_lightning.bench.moe --device cuda`` (``--help`` for the shape).
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
from transformers import MixtralConfig, MixtralForCausalLM

from ..config import PaCAConfig
from ..model import apply_paca
from .measure import DeviceOps, median, saved_bytes, timed_step
from .methods import Trainee
from .models import random_batch

EXPERT_PARAMETERS = ["gate_up_proj", "down_proj"]


def tiny_moe(hidden: int, intermediate: int, experts: int, top_k: int, layers: int, dtype: torch.dtype,
             device: torch.device) -> MixtralForCausalLM:
    torch.manual_seed(0)
    config = MixtralConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                           num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
                           num_local_experts=experts, num_experts_per_tok=top_k, vocab_size=1024,
                           max_position_embeddings=4096)
    return MixtralForCausalLM(config).to(device=device, dtype=dtype)


def paca_trainee(model, rank: int) -> Trainee:
    apply_paca(model, PaCAConfig(rank=rank, alpha=2 * rank, target_modules=["experts"]))
    trainable = [p for p in model.parameters() if p.requires_grad]
    return Trainee("paca", rank, model, torch.optim.AdamW(trainable, lr=1e-4))


def lora_trainee(model, rank: int) -> Trainee:
    import peft

    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=[],
                             target_parameters=[f"experts.{name}" for name in EXPERT_PARAMETERS])
    model = peft.get_peft_model(model, config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return Trainee("lora", rank, model, torch.optim.AdamW(trainable, lr=1e-4))


def _loss(causal_lm, batch):
    return causal_lm(**batch).loss


def run_moe_benchmark(*, hidden: int = 512, intermediate: int = 1024, experts: int = 8, top_k: int = 2,
                      layers: int = 2, batch_size: int = 4, sequence_length: int = 512, lora_rank: int = 8,
                      rounds: int = 10, warmup: int = 2, device: str = "cpu", dtype: str = "float32") -> dict:
    """The row: per method trainable values, saved bytes and median step seconds, and PaCA/LoRA ratios."""
    ops = DeviceOps(torch.device(device))
    base = tiny_moe(hidden, intermediate, experts, top_k, layers, getattr(torch, dtype), ops.device)
    trainees = {"paca": paca_trainee(copy.deepcopy(base), 2 * lora_rank),
                "lora": lora_trainee(copy.deepcopy(base), lora_rank)}
    batch = random_batch(1024, batch_size, sequence_length, ops.device)
    rows = {name: {"rank": trainee.rank, "trainable": sum(p.numel() for p in trainee.trainable()),
                   "saved_bytes": saved_bytes(trainee, _loss, batch), "step_seconds": []}
            for name, trainee in trainees.items()}
    for round_index in range(warmup + rounds):
        for name, trainee in trainees.items():  # interleaved: both methods see the same drift
            seconds, _ = timed_step(trainee, _loss, batch, ops)
            if round_index >= warmup:
                rows[name]["step_seconds"].append(seconds)
    for row in rows.values():
        row["median_step_seconds"] = median(row.pop("step_seconds"))
    shape = dict(hidden=hidden, intermediate=intermediate, experts=experts, top_k=top_k, layers=layers,
                 batch_size=batch_size, sequence_length=sequence_length, dtype=dtype, device=device, rounds=rounds)
    return {"shape": shape, "methods": rows,
            "paca_over_lora": {"saved_bytes": rows["paca"]["saved_bytes"] / rows["lora"]["saved_bytes"],
                               "step_seconds": rows["paca"]["median_step_seconds"]
                               / rows["lora"]["median_step_seconds"]}}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m paca_lightning.bench.moe", description=__doc__.split("\n")[0])
    for name, default in (("hidden", 512), ("intermediate", 1024), ("experts", 8), ("top-k", 2), ("layers", 2),
                          ("batch-size", 4), ("sequence-length", 512), ("lora-rank", 8), ("rounds", 10)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "hpu"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    print(json.dumps(run_moe_benchmark(**{k.replace("-", "_"): v for k, v in vars(args).items()}), indent=2))


if __name__ == "__main__":
    main()
