"""Launched by tests/test_distributed_sharded_loading.py as
``torchrun --nproc-per-node 2 sharded_loading_worker.py OUT_DIR MODE CHECKPOINT``.

MODE ``exact``: for ``random`` and ``weight_norm`` selection, dense and nf4 (QPaCA; fp4 and int8
with ``weight_norm``), today's path (every rank loads the whole model, then FSDP2 shards it) and
the sharded path (`sharded_paca_model`: meta build, shard, fill from the safetensors files) train
3 AdamW steps on the same batches; rank 0 reports whether trained columns, merged weights, chosen
columns and (QPaCA) every rank's packed bytes, quantization state and pretrained columns are
bit-identical.

MODE ``memory-full`` / ``memory-sharded`` (``-nf4`` appended: QPaCA): each rank's peak resident
memory (the kernel's VmHWM) after start-up, after the model is ready, and after 2 training
steps, for the one path.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from launch import finish_worker  # this folder: the script's own directory
from transformers import AutoModelForCausalLM

from paca_lightning import PaCAConfig, apply_paca, paca_layers
from paca_lightning.parallel import (
    attach_column_sync,
    export_merged,
    gather_adapter_state,
    merged_state_dict,
    shard_paca_model,
)
from paca_lightning.parallel.loading import sharded_paca_model
from paca_lightning.quantized import QuantizedPaCALinear

STEPS, PER_RANK, LENGTH = 3, 2, 16


def vm_hwm_bytes() -> int:
    """Peak resident set size of this process so far, from the kernel (``VmHWM`` in kB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM line")


def full_load(checkpoint: str, config: PaCAConfig):
    """Today's FSDP2 path: the whole model in every process, adapted, then sharded."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).train()
    return shard_paca_model(apply_paca(model, config))


def train(model, steps: int, vocab: int) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2, weight_decay=0.0)
    attach_column_sync(optimizer, model)
    generator = torch.Generator().manual_seed(7)
    rank, world = dist.get_rank(), dist.get_world_size()
    for _ in range(steps):
        batch = torch.randint(0, vocab, (PER_RANK * world, LENGTH), generator=generator)
        ids = batch[rank * PER_RANK:(rank + 1) * PER_RANK]
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def outcome(model) -> tuple:
    """Collective: (columns, merged weights, chosen columns) on rank 0, None elsewhere, and on
    every rank its own QPaCA state: its rows of the packed bytes, the quantization state and the
    pretrained columns of each QPaCA layer."""
    tensors, _ = gather_adapter_state(model)
    merged = merged_state_dict(model)
    indices = {name: layer.paca_indices.clone() for name, layer in paca_layers(model)}
    quantized = {}
    for name, layer in paca_layers(model):
        if isinstance(layer, QuantizedPaCALinear):
            quantized[f"{name}.weight"] = layer.weight.to_local().clone()
            quantized[f"{name}._extra_state"] = layer.get_extra_state()
            quantized[f"{name}.paca_base_columns"] = layer.paca_base_columns.clone()
    return ((tensors, merged, indices) if dist.get_rank() == 0 else None), quantized


def identical(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def on_every_rank(flag: bool) -> bool:
    """Collective: whether ``flag`` holds on every rank."""
    flags = [None] * dist.get_world_size()
    dist.all_gather_object(flags, flag)
    return all(flags)


def exact(checkpoint: str) -> dict:
    found = {}
    runs_to_compare = (("random", None), ("weight_norm", None), ("random", "nf4"), ("weight_norm", "nf4"),
                       ("weight_norm", "fp4"), ("weight_norm", "int8"))
    for selection, quantize in runs_to_compare:
        config = PaCAConfig(rank=4, alpha=8, target_modules="all-linear", bias="none", selection=selection,
                            quantize=quantize)
        run = selection if quantize is None else f"{selection}_{quantize}"
        runs = []
        for build in (full_load, sharded_paca_model):
            model = build(checkpoint, config)
            vocab = model.config.vocab_size
            train(model, STEPS, vocab)
            runs.append(outcome(model))
        (rank0_a, quantized_a), (rank0_b, quantized_b) = runs
        quantized_identical = on_every_rank(identical(quantized_a, quantized_b))
        # the merged export, written one decoder layer at a time, loads as the merged weights
        export = Path(checkpoint).parent / f"export_{run}"
        export_merged(model, export)
        if dist.get_rank() == 0:
            files = len(list(export.glob("*.safetensors")))
            exported = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).state_dict()
            found[f"{run}_export"] = {"identical": identical(exported, rank0_b[1]), "files": files}
        if dist.get_rank() == 0:
            (cols_a, merged_a, idx_a), (cols_b, merged_b, idx_b) = rank0_a, rank0_b
            found[run] = {"columns_identical": identical(cols_a, cols_b),
                                "merged_identical": identical(merged_a, merged_b),
                                "indices_identical": identical(idx_a, idx_b),
                                "quantized_identical": quantized_identical, "quantized_tensors": len(quantized_a),
                                "merged_tensors": len(merged_a), "columns_tensors": len(cols_a),
                                "columns_changed": any(not torch.equal(idx_a[k], torch.arange(len(idx_a[k])))
                                                       for k in idx_a)}
    return found


def warm_up(out: Path, config: PaCAConfig) -> None:
    """Run both paths once on a tiny copy of the architecture, so the code pages of torch and
    transformers that the first load and step touch (resident memory too) count before ``start``."""
    from transformers import AutoConfig, LlamaForCausalLM

    tiny = out / "warm_up_model"
    if dist.get_rank() == 0:
        small = AutoConfig.from_pretrained(out / "model_config")
        small.update({"hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 2, "vocab_size": 128,
                      "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16})
        LlamaForCausalLM(small).save_pretrained(tiny)
    dist.barrier()
    for build in (full_load, sharded_paca_model):
        model = build(str(tiny), config)
        train(model, 1, model.config.vocab_size)
        del model


def memory(out: Path, checkpoint: str, sharded: bool, quantize=None) -> dict:
    config = PaCAConfig(rank=8, alpha=16, target_modules="all-linear", bias="none", selection="weight_norm",
                        quantize=quantize)
    if dist.get_rank() == 0:
        from transformers import AutoConfig
        AutoConfig.from_pretrained(checkpoint).save_pretrained(out / "model_config")
    dist.barrier()
    warm_up(out, config)
    start = vm_hwm_bytes()
    model = sharded_paca_model(checkpoint, config) if sharded else full_load(checkpoint, config)
    ready = vm_hwm_bytes()
    train(model, 2, model.config.vocab_size)
    trained = vm_hwm_bytes()
    mine = {"start": start, "ready": ready, "trained": trained}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return {"ranks": everyone}


def lightning(out: Path, checkpoint: str, quantize=None) -> dict:
    """PaCAFineTuneModule under PaCAModelParallelStrategy: named by its folder (built on meta,
    shards filled from disk) or given as the loaded model (today's path); 2 steps, a checkpoint,
    a resume to step 4, the fit-end adapter and merged exports."""
    import warnings

    from lightning.pytorch import Trainer
    from torch.utils.data import DataLoader

    import paca_lightning
    from paca_lightning import load_adapter
    from paca_lightning.training import PaCAFineTuneModule, PaCAModelParallelStrategy, paca_callbacks

    warnings.filterwarnings("ignore")
    config = PaCAConfig(rank=4, alpha=8, target_modules="all-linear", selection="weight_norm", quantize=quantize)
    ids = torch.randint(0, 128, (4, LENGTH), generator=torch.Generator().manual_seed(3))
    samples = [{"input_ids": row, "labels": row.clone()} for row in ids]

    def fit(model, root: Path, steps: int, ckpt_path=None):
        tokenizer = str(Path(paca_lightning.__file__).parent / "assets" / "tiny-llama")  # for the exports
        module = PaCAFineTuneModule(model, paca=config, learning_rate=2e-2, min_lr_ratio=1.0, tokenizer=tokenizer)
        trainer = Trainer(accelerator="cpu", devices=2, strategy=PaCAModelParallelStrategy(), max_steps=steps,
                          default_root_dir=str(root), logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False,
                          callbacks=paca_callbacks(config, log_throughput=False))
        trainer.fit(module, DataLoader(samples, batch_size=2), ckpt_path=ckpt_path)
        if ckpt_path is None:
            trainer.save_checkpoint(root / "step2.ckpt")
        tensors, _ = gather_adapter_state(module.model, root=trainer.strategy.model)
        meta_built = not isinstance(model, torch.nn.Module)
        return tensors, meta_built

    found = {}
    runs = {}
    for name, model in (("sharded", checkpoint), ("whole", None)):
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).train()
        first, _ = fit(model, out / name / "first", 2)
        if name == "whole":
            model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).train()
        resumed, _ = fit(model, out / name / "resumed", 4, ckpt_path=out / name / "first" / "step2.ckpt")
        runs[name] = (first, resumed)
    if dist.get_rank() == 0:
        found["step2_identical"] = identical(runs["sharded"][0], runs["whole"][0])
        found["resumed_identical"] = identical(runs["sharded"][1], runs["whole"][1])
        found["resume_changed_columns"] = not identical(runs["sharded"][0], runs["sharded"][1])
        merged = {name: AutoModelForCausalLM.from_pretrained(out / name / "resumed" / "merged").state_dict()
                  for name in runs}
        found["merged_identical"] = identical(merged["sharded"], merged["whole"])
        adapter = load_adapter(AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32),
                               out / "sharded" / "resumed" / "paca_adapter")
        found["adapter_columns_identical"] = all(
            torch.equal(layer.paca_weight, runs["whole"][1][f"{name}.paca_weight"])
            for name, layer in paca_layers(adapter))
    return found


def main(out: Path, mode: str, checkpoint: str) -> None:
    if mode.startswith("lightning"):  # lightning[-nf4]; Lightning sets up the process group itself
        torch.set_num_threads(1)
        found = lightning(out, checkpoint, quantize=mode.partition("-")[2] or None)
        finish_worker(out, {"world_size": dist.get_world_size(), **found})
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    results = {"world_size": dist.get_world_size()}
    if mode == "exact":
        results.update(exact(checkpoint))
    else:
        path, _, quantize = mode.removeprefix("memory-").partition("-")  # memory-sharded[-nf4]
        results.update(memory(out, checkpoint, sharded=path == "sharded", quantize=quantize or None))
    finish_worker(out, results)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
