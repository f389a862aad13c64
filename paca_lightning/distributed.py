"""PaCA under data parallelism and sharding: FSDP2 (``fully_shard``), FSDP1, DDP, several nodes.

PaCA trains columns that live *inside* a frozen weight, so every engine that shards or copies
weights has to be told how the invariant ``W[:, S] == (s * P).to(W.dtype)`` survives it:

- **FSDP2** (`shard_paca_model`; in Lightning `PaCAModelParallelStrategy`). ``fully_shard`` turns
  ``W`` and ``P`` into DTensors. A Linear's ``W`` (out x in) and its ``P`` (out x r) are both
  sharded on dim 0, the output rows, and dim 0 has the same length in both, so rank ``k`` holds
  the same rows of each::

        rank 0:  W[0:o/2, :]   P[0:o/2, :]      W_local[:, S] = s * P_local   (no communication)
        rank 1:  W[o/2:, :]    P[o/2:, :]

  Forward runs on transient unsharded copies (a write there is lost on reshard), so forward-time
  syncing is switched off and the columns are written into the *local shards* right after each
  optimizer step (`attach_column_sync`). GPT-2 ``Conv1D`` stores ``W`` transposed (in x out); its
  dim 0 is the input, which would not line up with ``P``'s rows, so the policy shards those
  weights on dim 1 (``shard_placement_fn``) and the rows line up again.
  Gradients and optimizer state exist only for ``P`` (FSDP2 reduces and stores per parameter), so
  their memory per rank is ``trainable / world_size``, whatever the unit's frozen size.
- **FSDP1** (`PaCAFSDPStrategy`, ``use_orig_params=True``). A FlatParameter's local shard is a
  contiguous slice of the flattened units, not rows, so no local write can keep the invariant.
  Layers switch to the delta form (`use_delta_form`): ``W`` is never written and forward adds
  ``x_S @ ((s*P).to(W.dtype) - W[:, S])^T``, exact under any wrapper for one thin matmul.
  FSDP1 allocates a FlatParameter's gradient for the whole flat tensor as soon as one of its
  parameters trains, so the trainable parameters are kept out of the flat parameters
  (`replicate_trainable`, FSDP1's ``ignored_states``): whole on every rank, gradients averaged
  by an all-reduce hook. Gradient and optimizer memory per rank is then the trainable size.
- **DDP**: every rank holds whole weights; the default forward-time sync is already exact.
- **QPaCA under FSDP2**: a quantized layer's weight is a plain Parameter of packed bytes with the
  quantization state kept on the layer (`paca_lightning.quantized`), so ``fully_shard`` shards
  the bytes like any parameter (FSDP2 gathers mixed dtypes as bytes; mixed precision leaves
  integer tensors alone), and the layer dequantizes the copy FSDP2 gathers for its forward and
  backward. The base is never written, so there is nothing to keep in sync. FSDP1 is refused: a
  FlatParameter holds one dtype.

Adapter saves gather every rank's shard (`save_sharded_adapter`); merged exports gather the full
state dict and write it from rank 0 (`export_merged`).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from .adapter import adapter_state, write_adapter
from .layers import PaCALinear
from .model import paca_layers, set_paca_auto_sync, sync_paca_columns
from .quantized import QuantizedPaCALinear, dense_dtype_of, dequantize_weight, is_quantized_linear

# Names wrappers insert into module paths; adapters and exports use the model's own names.
_WRAPPER_NAME_PARTS = re.compile(r"(?:^|(?<=\.))(?:_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)\.")


def write_local_columns(layer: PaCALinear, columns: torch.Tensor) -> None:
    """Write ``columns`` (out x r) into the local shard of a DTensor weight, with no communication.

    ``columns`` is either a DTensor sharded like ``layer.paca_weight`` (the trained columns) or a
    full tensor (``paca_base_columns``, which FSDP2 keeps whole on every rank as a buffer). The
    write is exact only when the weight's output dimension is sharded exactly like
    ``paca_weight``'s rows; any other layout raises, naming the layer and its placements.
    """
    weight, paca = layer.weight, layer.paca_weight
    output_dim = 1 if layer.transposed else 0
    if not isinstance(paca, DTensor) or paca.device_mesh != weight.device_mesh:
        raise RuntimeError(f"PaCA layer ({layer.extra_repr()}): the weight is a DTensor but paca_weight "
                           "is not sharded on the same device mesh; shard the whole PaCALinear with one "
                           "fully_shard call (see paca_lightning.distributed.shard_paca_model)")
    expected = tuple(Shard(output_dim) if p == Shard(0) else p for p in paca.placements)
    if tuple(weight.placements) != expected or any(
            not isinstance(p, (Shard, Replicate)) or (isinstance(p, Shard) and p.dim != 0)
            for p in paca.placements):
        layout = "Conv1D (weight stored in x out)" if layer.transposed else "Linear"
        raise RuntimeError(
            f"PaCA cannot keep its trained columns exact without communication for this {layout} "
            f"layer ({layer.extra_repr()}): weight placements {tuple(weight.placements)}, paca_weight "
            f"placements {tuple(paca.placements)}. The weight's output dimension (dim {output_dim}) must "
            f"be sharded like paca_weight's rows (dim 0), i.e. weight placements {expected}. Use "
            "paca_lightning.distributed.shard_paca_model, or fully_shard(module, "
            "shard_placement_fn=paca_shard_placement(model))")
    local_columns = columns.to_local() if isinstance(columns, DTensor) else local_rows(columns, paca)
    local_weight = weight.to_local()
    local_columns = local_columns.to(device=local_weight.device, dtype=local_weight.dtype)
    if layer.transposed:
        local_weight.index_copy_(0, layer.paca_indices.to(local_weight.device), local_columns.t())
    else:
        local_weight.index_copy_(1, layer.paca_indices.to(local_weight.device), local_columns)


def local_rows(full: torch.Tensor, like: DTensor) -> torch.Tensor:
    """This rank's rows of ``full`` (a whole tensor shaped like ``like``), the rows ``like``'s
    local shard holds; e.g. the pretrained columns (a buffer, whole on every rank) that belong
    beside this rank's shard of ``paca_weight``."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    shape, offset = compute_local_shape_and_global_offset(like.shape, like.device_mesh, like.placements)
    return full[offset[0]:offset[0] + shape[0]]


def paca_shard_placement(model: nn.Module) -> Callable[[nn.Parameter], Optional[Shard]]:
    """A ``fully_shard(shard_placement_fn=...)`` that shards each Conv1D PaCA weight on dim 1.

    Every other parameter keeps FSDP2's default (dim 0), which is already the output dimension of
    Linear weights and of every ``paca_weight``. It also switches forward-time column syncing off
    for ``model``: under FSDP2 a forward sees a gathered copy, so a write there is lost and backward
    would gather the stale shards again. The columns are written into the shards after each
    optimizer step instead (`attach_column_sync`).
    """
    set_paca_auto_sync(model, False)
    transposed_weights = {id(layer.weight) for _, layer in paca_layers(model) if layer.transposed}

    def placement(param: nn.Parameter) -> Optional[Shard]:
        return Shard(1) if id(param) in transposed_weights else None

    return placement


def _refuse_uneven_conv1d(model: nn.Module, mesh) -> None:
    """FSDP2 shards dim 1 only evenly; a Conv1D whose output size the shard count does not divide
    cannot be sharded like its ``paca_weight`` rows, so it is refused before anything is sharded."""
    shards = dist.get_world_size() if mesh is None else mesh.size(mesh.ndim - 1)
    for name, layer in paca_layers(model):
        if layer.transposed and layer.out_features % shards:
            raise ValueError(f"PaCA Conv1D layer {name!r} has {layer.out_features} outputs, which {shards} FSDP2 "
                             "shards cannot split evenly; FSDP2 shards a Conv1D weight's output dim (dim 1) "
                             "evenly only. Use a shard count dividing it, DDP, or leave the layer out of "
                             "PaCAConfig.target_modules (a frozen Conv1D shards on dim 0 as usual)")


def _refuse_unadapted_quantized(model: nn.Module) -> None:
    """bitsandbytes layers that PaCA did not wrap keep their state on their parameter, which
    ``fully_shard`` replaces: they could neither compute nor be exported afterwards."""
    left = [name for name, module in model.named_modules() if is_quantized_linear(module)]
    if left:
        raise ValueError(f"FSDP2 cannot shard the bitsandbytes layers {left[:3]}{' ...' if len(left) > 3 else ''}: "
                         "PaCA does not adapt them, and bitsandbytes keeps their quantization state on the "
                         "parameter that fully_shard replaces. Add them to PaCAConfig.target_modules (QPaCA "
                         "layers shard), or quantize only the adapted layers (PaCAConfig.quantize on an "
                         "unquantized model)")


def decoder_layers(model: nn.Module, layer_classes: Optional[Iterable[Union[type, str]]] = None) -> list[nn.Module]:
    """The repeated blocks to shard one by one: ``layer_classes``, or the classes a transformers
    model names in ``_no_split_modules`` (its decoder layer, e.g. ``LlamaDecoderLayer``)."""
    if layer_classes is None:
        names = set(getattr(model, "_no_split_modules", None) or ())
        if not names:
            raise ValueError(f"{type(model).__name__} does not name its decoder layer class "
                             "(_no_split_modules is empty); pass layer_classes=[YourBlockClass]")
    else:
        names = {c if isinstance(c, str) else c.__name__ for c in layer_classes}
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"no module of {type(model).__name__} is of class {sorted(names)}; "
                         "pass layer_classes naming its repeated block")
    return blocks


def shard_paca_model(model: nn.Module, mesh=None, *, layer_classes=None, reshard_after_forward: bool = True,
                     mp_policy=None, cpu_offload: bool = False, activation_checkpointing: bool = False) -> nn.Module:
    """FSDP2 for a PaCA model: ``fully_shard`` each decoder layer, then the root.

    Call it from ``LightningModule.configure_model`` under ``ModelParallelStrategy`` (with
    ``self.device_mesh["data_parallel"]``) or in a plain ``torch.distributed`` script, then call
    `attach_column_sync` on the optimizer. Frozen and trainable parameters may share a unit:
    FSDP2 reduces and stores gradients per parameter, so only ``paca_weight`` gets them.

    Args:
        mesh: a 1-D device mesh (or a 2-D one for HSDP); ``None`` = all ranks.
        layer_classes: the blocks to shard individually; default: the model's decoder layer.
        reshard_after_forward: free gathered weights after forward (ZeRO-3) or keep them until
            backward (ZeRO-2: more memory, fewer all-gathers).
        mp_policy: a ``MixedPrecisionPolicy``, e.g. bf16 compute with fp32 gradient reduction.
        cpu_offload: keep sharded parameters, gradients and optimizer state in CPU memory.
        activation_checkpointing: recompute each decoder layer in backward; parameter names
            are unchanged (composable ``checkpoint``), so checkpoints and adapters stay portable.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if next(paca_layers(model), None) is None:
        raise ValueError(f"{type(model).__name__} has no PaCA layers; call apply_paca before sharding")
    _refuse_unadapted_quantized(model)
    _refuse_uneven_conv1d(model, mesh)
    blocks = decoder_layers(model, layer_classes)
    kwargs: dict[str, Any] = dict(mesh=mesh, reshard_after_forward=reshard_after_forward,
                                  shard_placement_fn=paca_shard_placement(model),
                                  mp_policy=mp_policy or MixedPrecisionPolicy(),
                                  offload_policy=CPUOffloadPolicy() if cpu_offload else OffloadPolicy())
    if activation_checkpointing:
        from torch.distributed._composable import checkpoint
        for block in blocks:
            checkpoint(block)
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    sync_paca_columns(model)
    return model


def attach_column_sync(optimizer: torch.optim.Optimizer, model: nn.Module):
    """Write the trained columns into the (local shards of the) weights after every step of
    ``optimizer``; returns the hook handle. Needed wherever forward-time syncing is off (FSDP2)."""
    return optimizer.register_step_post_hook(lambda *_: sync_paca_columns(model))


def use_delta_form(model: nn.Module) -> nn.Module:
    """Switch every PaCA layer to the delta form before FSDP1 wraps the model (see module doc).

    The weights stay as they are (whatever columns they hold, the delta form is exact) and are
    never written again during training, so FlatParameter shards need no column writes.
    """
    layers = list(paca_layers(model))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no PaCA layers; call apply_paca before wrapping")
    for _, layer in layers:
        layer.auto_sync = False
        layer.delta_form = True
    return model


def replicate_trainable(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters of ``model`` (``paca_weight``, trained biases), to pass to FSDP1
    as ``ignored_states``; each gets a hook averaging its gradient over all ranks.

    FSDP1 allocates a FlatParameter's gradient for the whole flattened unit as soon as one of its
    parameters trains, frozen weights included (132,960 B per rank on the tiny test Llama against
    14,528 B of trainable columns). Left out of the flat parameters, the trainable ones stay whole
    on every rank and the flat parameters, all frozen, get no gradient: gradient and optimizer
    memory per rank is the trainable size. FSDP does not reduce ignored parameters, so after
    every backward a hook all-reduces each gradient and divides by the world size, the mean
    FSDP itself would have produced. Under gradient accumulation a gradient that is already the
    mean (equal on every rank) plus this micro-batch's is averaged again, which leaves the first
    part unchanged: the result is the mean of the accumulated gradients, as without the hook.
    Like FSDP, this needs every rank to start from the same values and run the same backward.
    Call it once per model, before wrapping; the hooks use the default process group.
    """
    trainable = [param for param in model.parameters() if param.requires_grad]
    if not trainable:
        raise ValueError(f"{type(model).__name__} has no trainable parameters to replicate")
    for param in trainable:
        param.register_post_accumulate_grad_hook(_average_gradient_over_ranks)
    return trainable


def _average_gradient_over_ranks(param: nn.Parameter) -> None:
    dist.all_reduce(param.grad)  # gloo has no ReduceOp.AVG: sum, then divide
    param.grad.div_(dist.get_world_size())


def clean_name(name: str) -> str:
    """A parameter or module name without the parts wrappers insert (FSDP1, checkpoint wrappers,
    ``torch.compile``), i.e. the name a state dict uses."""
    return _WRAPPER_NAME_PARTS.sub("", name)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _inner_model(model: nn.Module) -> nn.Module:
    """The user's model under DDP/FSDP1 root wrappers (FSDP2 wraps in place: same object)."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    while isinstance(model, (FullyShardedDataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    return model


def _fsdp1_root(model: nn.Module, root: Optional[nn.Module]) -> Optional[nn.Module]:
    """``root`` if given, else ``model`` itself when it is an FSDP1 wrapper."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    return root if root is not None or not isinstance(model, FullyShardedDataParallel) else model


def _full_tensors(model: nn.Module, root: Optional[nn.Module], keep: Callable[[str], bool],
                  rank0_only: bool) -> dict[str, torch.Tensor]:
    """Whole CPU copies of ``model``'s parameters and buffers whose cleaned name passes ``keep``.

    A collective. FSDP2 DTensors are all-gathered one at a time; FSDP1 units are unsharded with
    ``summon_full_params`` on ``root`` (the outermost FSDP1 wrapper, which owns the parameters
    outside the wrapped blocks). With ``rank0_only`` only rank 0 keeps the copies.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    def named():  # what a state dict holds: parameters and persistent buffers
        buffers = [(f"{prefix}.{name}" if prefix else name, tensor)
                   for prefix, module in model.named_modules(remove_duplicate=False)
                   for name, tensor in module._buffers.items()
                   if tensor is not None and name not in module._non_persistent_buffers_set]
        return [(clean_name(n), t) for n, t in (*model.named_parameters(remove_duplicate=False), *buffers)]

    fsdp1_root = root if root is not None else model
    keeper = not rank0_only or _rank() == 0
    if any(isinstance(m, FullyShardedDataParallel) for m in fsdp1_root.modules()):
        on_accelerator = any(p.device.type != "cpu" for p in fsdp1_root.parameters())
        # offload_to_cpu only off-CPU: on CPU it is useless, and under gloo it crashes.
        with FullyShardedDataParallel.summon_full_params(fsdp1_root, writeback=False, rank0_only=rank0_only,
                                                         offload_to_cpu=on_accelerator and rank0_only):
            return {n: t.detach().cpu().clone() for n, t in named() if keep(n)} if keeper else {}
    tensors = {}
    for name, tensor in named():
        if keep(name):
            full = _full(tensor).detach()
            if keeper:
                tensors[name] = full.cpu().clone()
    return tensors


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def gather_adapter_state(model: nn.Module, root: Optional[nn.Module] = None
                         ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The adapter (as `paca_lightning.adapter.adapter_state`) with every rank's shard gathered.

    A collective: every rank must call it, and every rank gets the full tensors (small: the
    trainable columns only). Works for FSDP2, FSDP1 (``use_orig_params=True``), DDP and plain
    models; names are the model's own, without wrapper prefixes.

    Args:
        model: the PaCA model (or a DDP/FSDP1 wrapper of it).
        root: the outermost FSDP1 wrapper when ``model`` sits inside it (under Lightning's FSDP
            strategy: ``trainer.strategy.model``); ignored otherwise.
    """
    inner, root = _inner_model(model), _fsdp1_root(model, root)
    _, description = adapter_state(inner)
    description["modules"] = {clean_name(name): meta for name, meta in description["modules"].items()}
    description["extra_parameters"] = [clean_name(name) for name in description["extra_parameters"]]
    wanted = {f"{m}.{part}" for m in description["modules"] for part in ("paca_weight", "paca_indices")}
    wanted |= set(description["extra_parameters"])
    tensors = _full_tensors(inner, root, lambda name: name in wanted, rank0_only=False)
    for name in tensors:
        if name.endswith(".paca_indices"):
            tensors[name] = tensors[name].to(torch.int32)
    return tensors, description


def save_sharded_adapter(model: nn.Module, directory: Union[str, Path], root: Optional[nn.Module] = None) -> Path:
    """`save_adapter` for a sharded or replicated model: gathers every rank's shard, rank 0 writes.

    A collective: every rank must call it (a rank-0-only call would hang, or, with a plain
    ``state_dict()``, save rank 0's rows only). ``root`` as in `gather_adapter_state`.
    """
    tensors, description = gather_adapter_state(model, root)
    if _rank() == 0:
        write_adapter(tensors, description, directory)
    _barrier()
    return Path(directory)


def merged_state_dict(model: nn.Module, root: Optional[nn.Module] = None) -> dict[str, torch.Tensor]:
    """The merged model's full state dict on rank 0 (an empty dict elsewhere): the trained
    columns written into the weights from ``paca_weight``, PaCA's tensors dropped, wrapper
    prefixes removed; bitsandbytes weights dequantized, so the result is a dense model. A
    collective; ``root`` as in `gather_adapter_state`."""
    inner, root = _inner_model(model), _fsdp1_root(model, root)
    layers = {clean_name(name): layer for name, layer in paca_layers(inner)}
    state = _full_tensors(inner, root, lambda name: True, rank0_only=True)
    if _rank() != 0:
        return {}
    for name, layer in layers.items():
        prefix = f"{name}." if name else ""
        weight = state[prefix + "weight"]
        if isinstance(layer, QuantizedPaCALinear):  # QPaCA: the dense weight, as merge_paca exports it
            weight = state[prefix + "weight"] = layer.dequantize_packed(weight, layer.merge_dtype).cpu()
            if prefix + "bias" in state:
                state[prefix + "bias"] = state[prefix + "bias"].to(layer.merge_dtype)
        indices = state.pop(prefix + "paca_indices")
        columns = (state.pop(prefix + "paca_weight") * layer.scaling).to(weight.dtype)
        state.pop(prefix + "paca_base_columns")
        if layer.transposed:
            weight.index_copy_(0, indices, columns.t())
        else:
            weight.index_copy_(1, indices, columns)
    for name, module in inner.named_modules():
        if is_quantized_linear(module):  # a bitsandbytes layer PaCA did not adapt (DDP, one process)
            state[f"{clean_name(name)}.weight"] = dequantize_weight(module, dense_dtype_of(inner)).cpu()
    return state


def export_merged(model: nn.Module, directory: Union[str, Path], *, root: Optional[nn.Module] = None,
                  tokenizer: Any = None) -> Path:
    """Write the merged model of a sharded run from rank 0 with ``save_pretrained``.

    A collective: every rank calls it. Rank 0 builds an empty (meta) model of the original
    transformers class from the model's ``config``, assigns the merged weights to it (no copy)
    and saves it with ``tokenizer``: loading the result needs no paca_lightning.
    """
    inner = _inner_model(model)
    config = getattr(inner, "config", None)
    if config is None or not hasattr(inner, "save_pretrained"):
        raise TypeError(f"{type(inner).__name__} is not a transformers model; export_merged writes "
                        "save_pretrained folders. Use merged_state_dict(model) and save it yourself")
    state = merged_state_dict(model, root)
    if _rank() == 0:
        # fully_shard swaps the class for an "FSDP<Name>" subclass; build the user's class.
        from torch.distributed.fsdp import FSDPModule
        model_class = next(c for c in type(inner).__mro__ if not issubclass(c, FSDPModule))
        if hasattr(config, "quantization_config"):
            # the merged weights are dense: a saved quantization_config would quantize them again
            config = copy.deepcopy(config)
            del config.quantization_config
        with torch.device("meta"):
            plain = model_class._from_config(config)
        plain.load_state_dict(state, strict=True, assign=True)
        plain.save_pretrained(str(directory))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(directory))
    _barrier()
    return Path(directory)



# ---------------------------------------------------------------------- Lightning strategies
def _paca_models(module: nn.Module) -> list[nn.Module]:
    """The outermost submodules of ``module`` that `apply_paca` adapted (they carry paca_config)."""
    found = [(name, m) for name, m in module.named_modules() if "paca_config" in vars(m)]
    return [m for name, m in found if not any(other and name.startswith(other + ".") for other, _ in found)]


def _refuse_quantized_under_fsdp1(models: list[nn.Module]) -> None:
    for model in models:
        for name, layer in paca_layers(model):
            if isinstance(layer, QuantizedPaCALinear):
                raise NotImplementedError(
                    f"FSDP1 cannot shard the quantized PaCA layer {name!r} (QPaCA): it flattens each unit's "
                    "parameters into one tensor of a single dtype, and a QPaCA weight is packed integer bytes "
                    "beside floating-point norms. Shard QPaCA with FSDP2 (strategy=PaCAModelParallelStrategy(), "
                    "or shard_paca_model), which gathers mixed dtypes, or use strategy='ddp'")


class PaCAModelParallelStrategy(ModelParallelStrategy):
    """Lightning's FSDP2 strategy with PaCA's sharding policy applied for you.

    After ``configure_model`` has built and adapted the model (`PaCAFineTuneModule`, or any
    module with `PaCACallback`), every adapted model not yet sharded goes through
    `shard_paca_model` on the data-parallel mesh, and each optimizer gets `attach_column_sync`.
    Unlike the parent class (whose default mesh is tensor-parallel within a node), all
    ``num_nodes x devices`` processes form one data-parallel (FSDP) dimension.

    Args:
        activation_checkpointing, cpu_offload, mp_policy, reshard_after_forward, layer_classes:
            see `shard_paca_model`.
        save_distributed_checkpoint: each rank writes its shard (a folder) rather than rank 0
            writing one file; see ``ModelParallelStrategy``.
    """

    strategy_name = "paca_fsdp2"

    def __init__(self, *, activation_checkpointing: bool = False, cpu_offload: bool = False, mp_policy=None,
                 reshard_after_forward: bool = True, layer_classes=None, save_distributed_checkpoint: bool = True,
                 process_group_backend: Optional[str] = None, **kwargs: Any) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, **kwargs)
        self._shard_kwargs = dict(activation_checkpointing=activation_checkpointing, cpu_offload=cpu_offload,
                                  mp_policy=mp_policy, reshard_after_forward=reshard_after_forward,
                                  layer_classes=layer_classes)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def setup(self, trainer) -> None:
        models = _paca_models(self.model)
        if not models:
            raise RuntimeError(f"{type(self).__name__} found no PaCA model in {type(self.model).__name__}; adapt "
                               "it in configure_model (PaCAFineTuneModule and PaCACallback do)")
        for model in models:
            if not any(isinstance(p, DTensor) for p in model.parameters()):
                shard_paca_model(model, self.device_mesh["data_parallel"], **self._shard_kwargs)
        super().setup(trainer)

    def setup_optimizers(self, trainer) -> None:
        super().setup_optimizers(trainer)
        for optimizer in self.optimizers:
            for model in _paca_models(self.model):
                attach_column_sync(optimizer, model)

    def load_checkpoint(self, checkpoint_path, weights_only: Optional[bool] = None) -> dict[str, Any]:
        """Lightning's loader, except that a distributed checkpoint may hold only some of the
        model's tensors when the module loads non-strictly (`PaCACallback`'s adapter-only
        checkpoints: trainable columns and optimizer state, no frozen base)."""
        from lightning.fabric.strategies.fsdp import _is_sharded_checkpoint
        from lightning.fabric.strategies.model_parallel import _METADATA_FILENAME
        from torch.distributed.checkpoint import FileSystemReader, load
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict, set_model_state_dict,
                                                             set_optimizer_state_dict)

        path = Path(self.broadcast(checkpoint_path))
        if self.lightning_module.strict_loading:
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        if not _is_sharded_checkpoint(path):  # one full file: Lightning's loader drops the keys it loaded
            saved_keys = list(torch.load(path, mmap=True, map_location="cpu", weights_only=weights_only)["state_dict"])
            checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
            checkpoint["state_dict"] = dict.fromkeys(saved_keys)  # for on_load_checkpoint hooks to check
            return checkpoint
        saved = FileSystemReader(path).read_metadata().state_dict_metadata
        model_state = {key: value for key, value in get_model_state_dict(self.model).items()
                       if f"state_dict.{key}" in saved}
        load({"state_dict": model_state}, checkpoint_id=path)
        set_model_state_dict(self.model, model_state, options=StateDictOptions(strict=False))
        for index, optimizer in enumerate(self.optimizers):
            optimizer_state = {f"optimizer_{index}": get_optimizer_state_dict(self.model, optimizer)}
            load(optimizer_state, checkpoint_id=path)
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=optimizer_state[f"optimizer_{index}"],
                                     options=StateDictOptions(cpu_offload=True))
        checkpoint = torch.load(path / _METADATA_FILENAME, weights_only=weights_only)
        checkpoint["state_dict"] = model_state  # what was loaded, for on_load_checkpoint hooks to check
        return checkpoint


class PaCAFSDPStrategy(FSDPStrategy):
    """Lightning's FSDP1 strategy for PaCA: ``use_orig_params=True``, delta form, CPU capable.

    Before wrapping, every adapted model switches to the delta form (`use_delta_form`); unless
    an ``auto_wrap_policy`` is given, each decoder layer becomes its own FSDP unit. Lightning's
    ``FSDPStrategy`` refuses CPU; this subclass passes ``device_id=cpu`` to FSDP so 2-process
    gloo runs work for testing. Checkpoints default to ``state_dict_type="sharded"``.

    The trainable parameters are kept out of FSDP1's flat parameters (`replicate_trainable`,
    added to any ``ignored_states`` given): whole on every rank, gradients all-reduced, so
    gradient and AdamW memory per rank is the trainable size rather than the flattened units'.
    `PaCAModelParallelStrategy` (FSDP2) shards them too (trainable / world size per rank).
    """

    strategy_name = "paca_fsdp"

    def __init__(self, *, auto_wrap_policy=None, state_dict_type: str = "sharded", **kwargs: Any) -> None:
        if kwargs.pop("use_orig_params", True) is not True:
            raise ValueError("PaCAFSDPStrategy needs use_orig_params=True: PaCA's paca_weight must stay a "
                             "parameter of its own for the optimizer and the adapter files")
        # kept apart: each setup adds the replicated trainable parameters of the model it wraps
        self._given_ignored_states = list(kwargs.pop("ignored_states", None) or ())
        super().__init__(auto_wrap_policy=auto_wrap_policy, state_dict_type=state_dict_type,
                         use_orig_params=True, **kwargs)

    def setup(self, trainer) -> None:
        if self.root_device.type == "cpu" and self._state_dict_type == "full":
            raise ValueError("PaCAFSDPStrategy(state_dict_type='full') on CPU: FSDP1's full state dict "
                             "offloads to CPU, which crashes under gloo; use state_dict_type='sharded' on CPU")
        super().setup(trainer)

    def load_checkpoint(self, checkpoint_path, weights_only: Optional[bool] = None) -> dict[str, Any]:
        """Lightning's loader, except for sharded checkpoints: they may hold only some of the
        model's tensors when the module loads non-strictly (`PaCACallback`'s adapter-only
        checkpoints), and the replicated trainable parameters' optimizer state is loaded whole."""
        from lightning.fabric.strategies.fsdp import _METADATA_FILENAME, _get_sharded_state_dict_context
        from lightning.fabric.strategies.fsdp import _is_sharded_checkpoint
        from torch.distributed._shard.sharded_tensor import ShardedTensor
        from torch.distributed.checkpoint import FileSystemReader, load
        from torch.distributed.checkpoint.optimizer import load_sharded_optimizer_state_dict
        from torch.distributed.fsdp import FullyShardedDataParallel

        path = Path(self.broadcast(checkpoint_path))
        if not _is_sharded_checkpoint(path):
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        saved = FileSystemReader(path).read_metadata().state_dict_metadata
        with _get_sharded_state_dict_context(self.model):
            model_state = {key: value for key, value in self.model.state_dict().items() if f"model.{key}" in saved}
            load({"model": model_state}, checkpoint_id=path)
            self.model.load_state_dict(model_state, strict=self.lightning_module.strict_loading)
            # FSDP1's sharded state dict holds its own parameters as ShardedTensors and the
            # ignored (replicated) ones as plain tensors
            replicated = {key for key, value in model_state.items() if not isinstance(value, ShardedTensor)}
            for index, optimizer in enumerate(self.optimizers):
                key = f"optimizer_{index}"
                optimizer_state = load_sharded_optimizer_state_dict(model_state_dict=model_state, optimizer_key=key,
                                                                    storage_reader=FileSystemReader(path))
                # that loader splits every optimizer tensor over the ranks, as for flat parameters;
                # a replicated parameter's state is read again whole, as it was saved
                for name, values in optimizer_state[key]["state"].items():
                    if name in replicated:
                        for field, value in values.items():
                            if isinstance(value, ShardedTensor):
                                values[field] = torch.empty(value.size(), dtype=value.dtype)
                load(optimizer_state, checkpoint_id=path)
                optimizer.load_state_dict(FullyShardedDataParallel.optim_state_dict_to_load(
                    optim_state_dict=optimizer_state[key], model=self.model, optim=optimizer))
        checkpoint = torch.load(path / _METADATA_FILENAME, weights_only=weights_only)
        checkpoint["state_dict"] = {key: None for key in model_state}  # the loaded keys, for hooks to check
        return checkpoint

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        models = _paca_models(model)
        if not models:
            raise RuntimeError(f"{type(self).__name__} found no PaCA model in {type(model).__name__}; adapt it "
                               "in __init__ or configure_model (PaCAFineTuneModule and PaCACallback do)")
        _refuse_quantized_under_fsdp1(models)
        for paca_model in models:
            use_delta_form(paca_model)
        replicated = [param for paca_model in models for param in replicate_trainable(paca_model)]
        self.kwargs["ignored_states"] = [*self._given_ignored_states, *replicated]
        if "auto_wrap_policy" not in self.kwargs:
            blocks = {type(block) for paca_model in models for block in decoder_layers(paca_model)}
            self.kwargs["auto_wrap_policy"] = ModuleWrapPolicy(blocks)
        if self.root_device.type != "cpu":
            return super()._setup_model(model)
        wrapped = FullyShardedDataParallel(module=model, cpu_offload=self.cpu_offload,
                                           mixed_precision=self.mixed_precision_config,
                                           sharding_strategy=self.sharding_strategy,
                                           device_id=self.root_device, **self.kwargs)
        from lightning.pytorch.strategies.fsdp import _setup_activation_checkpointing
        _setup_activation_checkpointing(wrapped, self._activation_checkpointing_kwargs)
        return wrapped


__all__ = ["shard_paca_model", "attach_column_sync", "use_delta_form", "replicate_trainable", "write_local_columns",
           "paca_shard_placement", "decoder_layers", "gather_adapter_state", "save_sharded_adapter",
           "merged_state_dict", "export_merged", "clean_name", "PaCAModelParallelStrategy", "PaCAFSDPStrategy"]
