"""Launched by tests/test_distributed_*.py as ``torchrun --nproc-per-node 2 plain_torch_worker.py OUT_DIR``.

One process group (gloo, CPU) runs every engine in turn on tiny models, each against a
single-process reference on the same global batches, and each beside a control that breaks the
invariant. Rank 0 writes the findings to OUT_DIR/results.json; the tests assert on them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from launch import finish_worker  # this folder: the script's own directory
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

from paca_lightning import PaCAConfig, apply_paca, load_adapter, paca_layers, set_paca_auto_sync, sync_paca_columns
from paca_lightning.parallel import (
    attach_column_sync,
    gather_adapter_state,
    merged_state_dict,
    replicate_trainable,
    save_sharded_adapter,
    shard_paca_model,
    use_delta_form,
)

STEPS, PER_RANK, LENGTH, VOCAB = 3, 2, 12, 128


def tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    # intermediate 99: gate/up have 99 output rows, which FSDP splits 50/49 (padded) over 2
    # ranks; W and P must still get the same rows
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=99, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                        max_position_embeddings=64))


def tiny_gpt2(n_inner: int = 128) -> nn.Module:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_inner=n_inner, n_layer=2, n_head=4, vocab_size=VOCAB,
                                      n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def tiny_mixtral() -> nn.Module:
    torch.manual_seed(0)
    # fused 3-D expert weights: FSDP2 shards their expert dimension (4 experts, 2 per rank)
    return MixtralForCausalLM(MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                            num_experts_per_tok=2, vocab_size=VOCAB, max_position_embeddings=64))


def adapted(make, quantize=None) -> nn.Module:
    return apply_paca(make(), PaCAConfig(rank=4, alpha=8, target_modules="all-linear", bias="none",
                                         quantize=quantize))


def global_batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    world = dist.get_world_size()
    return [torch.randint(0, VOCAB, (PER_RANK * world, LENGTH), generator=generator) for _ in range(STEPS)]


def local_part(batch: torch.Tensor) -> torch.Tensor:
    rank = dist.get_rank()
    return batch[rank * PER_RANK:(rank + 1) * PER_RANK]


def optimizer_for(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2, weight_decay=0.0)


def train(model: nn.Module, optimizer, batches, *, split: bool) -> None:
    for batch in batches:
        ids = local_part(batch) if split else batch
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def reference(make, quantize=None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Single process on whole global batches: trained columns and merged weights."""
    model = adapted(make, quantize)
    train(model, optimizer_for(model), global_batches(), split=False)
    columns = {name: layer.paca_weight.detach().clone() for name, layer in paca_layers(model)}
    return columns, merged_state_dict(model)


def max_error(columns, merged, ref_columns, ref_merged) -> float:
    assert set(columns) == set(ref_columns), (sorted(columns)[:3], sorted(ref_columns)[:3])
    assert set(merged) == set(ref_merged), sorted(set(merged) ^ set(ref_merged))[:5]
    errors = [(columns[k] - ref_columns[k]).abs().max().item() for k in columns]
    errors += [(merged[k].float() - ref_merged[k].float()).abs().max().item() for k in merged]
    return max(errors)


def error_against(model, ref):
    """Collective: gather trained columns and merged weights; rank 0 returns the largest
    difference from the single-process reference, other ranks None."""
    tensors, _ = gather_adapter_state(model)
    columns = {name[:-len(".paca_weight")]: t for name, t in tensors.items() if name.endswith(".paca_weight")}
    merged = merged_state_dict(model)
    return max_error(columns, merged, *ref) if dist.get_rank() == 0 else None


def bytes_of(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (local shards of DTensors): FSDP1's
    per-parameter gradients are views into one flat gradient, whose whole size counts."""
    storages = {}
    for tensor in tensors:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        storage = local.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def memory_report(model, optimizer, batch, make) -> dict[str, int]:
    """Per-rank bytes after a backward: gradients, optimizer state, parameters (local shards);
    global sizes from an unsharded copy built by ``make``."""
    ids = local_part(batch)
    model(input_ids=ids, labels=ids).loss.backward()
    grads = bytes_of(p.grad for p in model.parameters() if p.grad is not None)
    optimizer.step()
    state = bytes_of(v for s in optimizer.state.values() for v in s.values()
                     if torch.is_tensor(v) and v.ndim > 0)
    optimizer.zero_grad(set_to_none=True)
    whole = list(adapted(make).parameters())
    world = dist.get_world_size()
    # FSDP2 pads dim 0 to a multiple of the world size: a rank's share is ceil(rows / world) rows
    padded_share = sum(-(-p.shape[0] // world) * (p.numel() // p.shape[0]) * p.element_size()
                       for p in whole if p.requires_grad)
    return {"grad_bytes": grads, "optimizer_state_bytes": state, "trainable_share_bytes_padded": padded_share,
            "trainable_param_bytes_global": sum(p.numel() * p.element_size() for p in whole if p.requires_grad),
            "param_bytes_local": bytes_of(model.parameters()),
            "param_bytes_global": sum(p.numel() * p.element_size() for p in whole)}


def run_fsdp2(make, *, sync: bool, activation_checkpointing: bool = False, quantize=None):
    model = shard_paca_model(adapted(make, quantize), activation_checkpointing=activation_checkpointing)
    optimizer = optimizer_for(model)
    if sync:
        attach_column_sync(optimizer, model)
    train(model, optimizer, global_batches(), split=True)
    return model, optimizer


def run_fsdp1(make, *, delta: bool):
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    model = adapted(make)
    if delta:
        use_delta_form(model)
    else:  # the control: the weight is never told the trained columns
        set_paca_auto_sync(model, False)
    blocks = {type(m) for m in model.modules() if type(m).__name__ in set(model._no_split_modules)}
    model = FullyShardedDataParallel(model, auto_wrap_policy=ModuleWrapPolicy(blocks), use_orig_params=True,
                                     ignored_states=replicate_trainable(model), device_id=torch.device("cpu"))
    optimizer = optimizer_for(model)
    train(model, optimizer, global_batches(), split=True)
    return model, optimizer


def run_ddp(make, *, sync: bool, quantize=None):
    model = adapted(make, quantize)
    if not sync:
        set_paca_auto_sync(model, False)
    model = nn.parallel.DistributedDataParallel(model)
    optimizer = optimizer_for(model)
    train(model, optimizer, global_batches(), split=True)
    return model, optimizer


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    results: dict = {"world_size": dist.get_world_size()}
    refs = {"llama": reference(tiny_llama), "gpt2": reference(tiny_gpt2)}

    for name, make in (("llama", tiny_llama), ("gpt2", tiny_gpt2)):
        model, optimizer = run_fsdp2(make, sync=True, activation_checkpointing=name == "llama")
        results[f"fsdp2_{name}_error"] = error_against(model, refs[name])
        if name == "llama":
            # adapter save gathers every rank's rows; a fresh base loading it equals the reference
            directory = out / "fsdp2_adapter"
            save_sharded_adapter(model, directory)
            if rank == 0:
                loaded = load_adapter(tiny_llama(), directory)
                columns = {name: layer.paca_weight.detach() for name, layer in paca_layers(loaded)}
                results["fsdp2_adapter_file_error"] = max_error(columns, merged_state_dict(loaded), *refs[name])
            results["fsdp2_memory"] = memory_report(model, optimizer, global_batches()[0], tiny_llama)
        control, _ = run_fsdp2(make, sync=False)
        results[f"fsdp2_{name}_control_error"] = error_against(control, refs[name])

    model, _ = run_fsdp2(tiny_mixtral, sync=True, activation_checkpointing=True)
    results["fsdp2_mixtral_error"] = error_against(model, reference(tiny_mixtral))

    # QPaCA: the packed bytes shard like any parameter; each layer dequantizes the copy FSDP2
    # gathers for its forward and backward, with the quantization state it keeps
    for quantize in ("nf4", "int8"):
        model, _ = run_fsdp2(tiny_llama, sync=True, activation_checkpointing=True, quantize=quantize)
        results[f"fsdp2_qpaca_{quantize}_error"] = error_against(model, reference(tiny_llama, quantize))
        layer = model.model.layers[0].mlp.down_proj
        results[f"fsdp2_qpaca_{quantize}_weight_bytes"] = {
            "local": bytes_of([layer.weight]), "global": layer.weight.numel() * layer.weight.element_size(),
            "base_holds_bytes": layer.quantized_base.weight is not None}

    # fully_shard's default placement shards a Conv1D weight on its input dim: refused, not wrong
    from torch.distributed.fsdp import fully_shard
    misplaced = adapted(tiny_gpt2)
    set_paca_auto_sync(misplaced, False)
    fully_shard(misplaced)
    try:
        sync_paca_columns(misplaced)
        results["fsdp2_conv1d_default_placement_error"] = None
    except RuntimeError as error:
        results["fsdp2_conv1d_default_placement_error"] = str(error)

    # FSDP2 shards dim 1 evenly only: a Conv1D with 99 outputs over 2 ranks is refused up front
    try:
        shard_paca_model(adapted(lambda: tiny_gpt2(n_inner=99)))
        results["fsdp2_conv1d_uneven_error"] = None
    except ValueError as error:
        results["fsdp2_conv1d_uneven_error"] = str(error)

    model, _ = run_fsdp1(tiny_gpt2, delta=True)
    results["fsdp1_gpt2_error"] = error_against(model, refs["gpt2"])
    model, optimizer = run_fsdp1(tiny_llama, delta=True)
    results["fsdp1_llama_error"] = error_against(model, refs["llama"])
    results["fsdp1_memory"] = memory_report(model, optimizer, global_batches()[0], tiny_llama)
    control, _ = run_fsdp1(tiny_llama, delta=False)
    results["fsdp1_llama_control_error"] = error_against(control, refs["llama"])

    for name, make in (("llama", tiny_llama), ("gpt2", tiny_gpt2)):
        model, _ = run_ddp(make, sync=True)
        results[f"ddp_{name}_error"] = error_against(model, refs[name])
    control, _ = run_ddp(tiny_llama, sync=False)
    results["ddp_llama_control_error"] = error_against(control, refs["llama"])
    model, _ = run_ddp(tiny_llama, sync=True, quantize="nf4")
    results["ddp_qpaca_nf4_error"] = error_against(model, reference(tiny_llama, "nf4"))
    finish_worker(out, results)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
