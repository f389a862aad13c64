"""Launched by tests/test_distributed_*.py as ``torchrun --nproc-per-node 2 lightning_worker.py OUT_DIR``.

For each of PaCAModelParallelStrategy (FSDP2; distributed and single-file checkpoints),
PaCAFSDPStrategy (FSDP1) and DDP, on CPU/gloo: a `PaCAFineTuneModule` on a tiny Llama trains 2
steps and saves a checkpoint (distributed or one file for FSDP2, sharded for FSDP1, a file for
DDP; adapter-only, `PaCACheckpointing`'s default); a fresh Trainer resumes
from it to step 4; the callback writes the adapter and merged model at fit end. Each is compared
with a single process training on the same global batches. Rank 0 writes OUT_DIR/results.json.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from launch import finish_worker  # this folder: the script's own directory
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

from paca_lightning import PaCAConfig, load_adapter, paca_layers
from paca_lightning.parallel import gather_adapter_state
from paca_lightning.training import PaCAFineTuneModule, PaCAFSDPStrategy, PaCAModelParallelStrategy, paca_callbacks

VOCAB, LENGTH, SAMPLES, STEPS = 128, 12, 4, 4
CONFIG = PaCAConfig(rank=4, alpha=8, target_modules="all-linear")


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=99, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                        max_position_embeddings=64))


def samples() -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(0, VOCAB, (SAMPLES, LENGTH), generator=torch.Generator().manual_seed(3))
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def module(weight_decay: float = 0.0, config: PaCAConfig = CONFIG, **options) -> PaCAFineTuneModule:
    # min_lr_ratio=1: a constant learning rate, so the reference needs no schedule
    return PaCAFineTuneModule(tiny_llama(), paca=config, learning_rate=2e-2, min_lr_ratio=1.0,
                              weight_decay=weight_decay, **options)


def reference(steps: int, weight_decay: float = 0.0, config: PaCAConfig = CONFIG) -> dict[str, torch.Tensor]:
    """One process, the whole global batch (every sample) per step: the trained columns."""
    single = module(weight_decay, config)
    single.configure_model()
    optimizer = torch.optim.AdamW([p for p in single.parameters() if p.requires_grad], lr=2e-2,
                                  betas=single.betas, eps=single.eps, weight_decay=0.0)
    batch = torch.utils.data.default_collate(samples())
    for _ in range(steps):
        single.compute_loss(batch).backward()
        single.on_before_optimizer_step(optimizer)  # the module's decay toward the pretrained columns
        optimizer.step()
        optimizer.zero_grad()
    return {name: layer.paca_weight.detach().clone() for name, layer in paca_layers(single.model)}


def strategy(kind: str):
    if kind == "fsdp2":
        return PaCAModelParallelStrategy(activation_checkpointing=True)
    if kind == "fsdp2_full":  # one full checkpoint file written by rank 0
        return PaCAModelParallelStrategy(save_distributed_checkpoint=False)
    if kind == "fsdp2_plain":  # the module checkpoints, if anything
        return PaCAModelParallelStrategy()
    if kind == "fsdp1":
        return PaCAFSDPStrategy()
    return "ddp"


def fit(kind: str, root: Path, max_steps: int, ckpt_path=None, num_nodes: int = 1,
        weight_decay: float = 0.0, config: PaCAConfig = CONFIG, **module_options) -> PaCAFineTuneModule:
    trained = module(weight_decay, config, **module_options)
    trainer = Trainer(accelerator="cpu", devices=2 // num_nodes, num_nodes=num_nodes, strategy=strategy(kind),
                      max_steps=max_steps,
                      default_root_dir=str(root), logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      callbacks=paca_callbacks(config, log_throughput=False))
    # 2 samples per rank, 1 step per epoch: every step sees the same global batch as the reference
    trainer.fit(trained, DataLoader(samples(), batch_size=SAMPLES // 2), ckpt_path=ckpt_path)
    if ckpt_path is None:
        trainer.save_checkpoint(root / "step2.ckpt")
    trained.trainer_model = trainer.strategy.model
    return trained


def column_error(columns, ref) -> float:
    assert set(columns) == set(ref), sorted(set(columns) ^ set(ref))[:4]
    return max((columns[k] - ref[k]).abs().max().item() for k in columns)


def gathered_columns(trained) -> dict[str, torch.Tensor]:
    tensors, _ = gather_adapter_state(trained.model, root=trained.trainer_model)
    return {n[:-len(".paca_weight")]: t for n, t in tensors.items() if n.endswith(".paca_weight")}


def main(out: Path) -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    refs = {steps: reference(steps) for steps in (2, STEPS)}
    results: dict = {}
    for kind in ("fsdp2", "fsdp2_full", "fsdp1", "ddp"):
        root = out / kind
        first = fit(kind, root / "first", max_steps=2)
        results[f"{kind}_step2_error"] = column_error(gathered_columns(first), refs[2])
        resumed = fit(kind, root / "resumed", max_steps=STEPS, ckpt_path=root / "first" / "step2.ckpt")
        results[f"{kind}_resumed_error"] = column_error(gathered_columns(resumed), refs[STEPS])
        if dist.get_rank() == 0:
            # fit-end exports by the callback: adapter (every rank's rows) and merged model
            adapter = load_adapter(tiny_llama(), root / "resumed" / "paca_adapter")
            columns = {n: layer.paca_weight.detach() for n, layer in paca_layers(adapter)}
            results[f"{kind}_adapter_error"] = column_error(columns, refs[STEPS])
            merged = LlamaForCausalLM.from_pretrained(root / "resumed" / "merged")
            expected = adapter  # the loaded adapter computes exactly what the trained model did
            ids = samples()[0]["input_ids"][None]
            with torch.no_grad():
                results[f"{kind}_merged_logits_error"] = (merged(ids).logits - expected(ids).logits).abs().max().item()
            results[f"{kind}_merged_has_no_paca_keys"] = not any("paca" in k for k in merged.state_dict())
        dist.barrier()
    # decay toward the pretrained columns on FSDP2's row shards (the buffer is whole on each rank)
    decayed = fit("fsdp2", out / "decay", max_steps=2, weight_decay=10.0)
    results["fsdp2_weight_decay_step2_error"] = column_error(gathered_columns(decayed), reference(2, 10.0))
    results["fsdp2_weight_decay_effect"] = column_error(gathered_columns(decayed), refs[2])
    # QPaCA (nf4) through the strategy: sharded packed bytes, fit-end adapter and dense merged export
    qpaca = PaCAConfig(rank=4, alpha=8, target_modules="all-linear", quantize="nf4")
    quantized = fit("fsdp2", out / "qpaca", max_steps=2, config=qpaca)
    results["fsdp2_qpaca_step2_error"] = column_error(gathered_columns(quantized), reference(2, config=qpaca))
    if dist.get_rank() == 0:
        adapter = load_adapter(tiny_llama(), out / "qpaca" / "paca_adapter")  # quantizes the base again
        merged = LlamaForCausalLM.from_pretrained(out / "qpaca" / "merged")
        ids = samples()[0]["input_ids"][None]
        with torch.no_grad():
            results["fsdp2_qpaca_merged_logits_error"] = (merged(ids).logits - adapter(ids).logits).abs().max().item()
        results["fsdp2_qpaca_merged_is_dense"] = not any("bitsandbytes" in type(m).__module__ for m in merged.modules())
    dist.barrier()
    # activation_checkpointing="auto" on FSDP2 shards: at a budget just enough for one checkpointed
    # layer on the rank that needs most, every rank checkpoints layer 0 and trains exactly
    roomy = fit("fsdp2_plain", out / "auto_roomy", max_steps=1, activation_checkpointing="auto", memory_budget_gb=100)
    needed = torch.tensor(roomy.checkpointing_plan.planned_bytes(1))
    dist.all_reduce(needed, op=dist.ReduceOp.MAX)
    tight = fit("fsdp2_plain", out / "auto_tight", max_steps=2, activation_checkpointing="auto",
                memory_budget_gb=needed.item() / 1e9)
    results["fsdp2_auto_roomy_layers"] = [layer.gradient_checkpointing for layer in roomy.model.model.layers]
    results["fsdp2_auto_tight_layers"] = [layer.gradient_checkpointing for layer in tight.model.model.layers]
    results["fsdp2_auto_step2_error"] = column_error(gathered_columns(tight), refs[2])
    # torchrun's 2 local processes presented as 2 nodes x 1 device (what torchrun sets on each
    # of 2 nodes): the data-parallel mesh must span num_nodes x devices (Lightning's own default
    # would make it num_nodes x 1, tensor-parallel within the node)
    os.environ.update(LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", GROUP_RANK=str(dist.get_rank()))
    two_nodes = fit("fsdp2", out / "two_nodes", max_steps=2, num_nodes=2)
    results["fsdp2_two_nodes_mesh_size"] = two_nodes.trainer.strategy.device_mesh["data_parallel"].size()
    results["fsdp2_two_nodes_step2_error"] = column_error(gathered_columns(two_nodes), refs[2])
    finish_worker(out, results)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
