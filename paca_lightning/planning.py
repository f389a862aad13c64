"""Memory plan of one training step, from a model config alone (no weights, no hardware).

The model is built and trained for one step under torch's ``FakeTensorMode``: every tensor has
its real shape, dtype and storage but no values, so a 70B config plans in seconds on a CPU.
Bytes saved for backward are counted exactly as `paca_lightning.bench.measure.saved_bytes`
counts them on real tensors: distinct non-parameter storages packed by autograd. A decoder
layer's share is what is packed while that layer's forward runs; the rest (embeddings, final
norm, head and loss) is reported as ``head_and_loss``.

Totals: ``persistent`` = the model's bytes (parameters, buffers, quantization states) + gradients
of trainable parameters + AdamW's two moments; ``total_bytes`` = persistent + saved;
``total_checkpointed_bytes`` = the peak with every decoder layer checkpointed
(`total_with_checkpointing`: persistent + the layers' inputs + head and loss, or a layer's
recomputation on top of the inputs before it, whichever is larger). Neither models transient
workspace of single ops (the loss's chunk logits, the gradients flowing through a layer in
backward), and ``total_bytes`` counts saved bytes and AdamW's moments as if both were whole at once.

``peak_bytes`` is the peak of a steady-state step without checkpointing: the model's bytes + AdamW's
moments (alive from the first step on) + the larger of (a) the most tensor bytes alive at any
moment of forward and backward, counted op by op on the planned step (`LiveBytes`: saved
tensors, transients, gradients as they accumulate while saved tensors are freed) and (b) what
backward leaves alive (the gradients) + one temporary per trainable tensor in AdamW's foreach
update. Allocator rounding, fragmentation and kernel workspace outside tensors are not modelled.

Methods: ``floor`` (every weight frozen), ``paca``, ``lora`` (adapters in the model's dtype, the
authors' bf16 runs), ``lora-fp32`` (peft's default float32 adapters), ``qpaca`` and ``qlora`` (the
same on a frozen nf4 base: every linear layer but the head in bitsandbytes nf4, blocksize 64,
double quantization, computing in the model's dtype; embeddings, norms and head stay in the model's
dtype; QPaCA's trained columns in float32, its ``paca_dtype="auto"``, and QLoRA's adapters in the
model's dtype) and ``full``.

`paca-lightning plan` (`paca_lightning.bench.plan`) prints these plans; training's
``activation_checkpointing="auto"`` uses them to choose the layers to checkpoint.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .config import PaCAConfig
from .layers import DTensor  # () where torch lacks distributed support
from .loss import chunked_causal_lm_loss
from .model import apply_paca

PLAN_METHODS = ("floor", "paca", "lora", "lora-fp32", "qpaca", "qlora", "full")
QUANTIZED_METHODS = ("qpaca", "qlora")
DEFAULT_TARGETS = "all-linear"


@dataclass
class MethodPlan:
    method: str
    saved_bytes: int
    saved_per_layer_bytes: list[int]
    head_and_loss_bytes: int
    layer_input_bytes: int
    layer_input_per_layer_bytes: list[int]
    weight_bytes: int
    gradient_bytes: int
    optimizer_state_bytes: int
    total_bytes: int
    total_checkpointed_bytes: int
    trainable_parameters: int
    notes: list[str] = field(default_factory=list)
    peak_bytes: int = 0


def load_config(name_or_path: str):
    """A transformers config from a ``config.json``, a directory holding one, or a hub name."""
    from transformers import AutoConfig

    path = Path(name_or_path)
    if path.is_file():
        if path.name != "config.json":
            raise ValueError(f"--model {name_or_path}: expected a config.json file or a directory holding one")
        path = path.parent
    if path.is_dir() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"--model {name_or_path}: directory has no config.json")
    try:
        return AutoConfig.from_pretrained(str(path) if path.is_dir() else name_or_path)
    except (OSError, ValueError) as error:  # malformed JSON, unknown model_type, no such hub name or no network
        where = (str(path / "config.json") if path.is_dir()
                 else f"{name_or_path!r} (not a local path; read as a hub name)")
        reason = str(error).strip().splitlines()[0]
        raise ValueError(f"--model: cannot read a transformers config from {where}: {reason}") from None


def _storage_key(tensor: torch.Tensor) -> int:
    # A fake tensor's storage has no address; the storage object's identity is unique for both kinds.
    return tensor.untyped_storage()._cdata


def decoder_layer_list(causal_lm: nn.Module) -> nn.ModuleList:
    for module in causal_lm.modules():
        if isinstance(module, nn.ModuleList) and len(module) == causal_lm.config.num_hidden_layers:
            return module
    raise ValueError(f"{type(causal_lm).__name__}: no ModuleList of num_hidden_layers decoder layers found")


def count_saved(causal_lm: nn.Module, compute_loss: Callable[[], torch.Tensor]) -> tuple[int, list[int], list[int]]:
    """(saved bytes, per decoder layer, layer inputs) of one forward; runs backward after.

    A layer's inputs are the storages of its tensor arguments not already counted for an
    earlier layer: what checkpointing that layer keeps."""
    parameters = {_storage_key(p) for p in causal_lm.parameters()}
    layers = decoder_layer_list(causal_lm)
    owner: dict[int, int] = {}
    sizes: dict[int, int] = {}
    current = [-1]
    inputs: dict[int, int] = {}
    seen_inputs: set[int] = set()

    def pack(tensor):
        if tensor.layout == torch.strided:
            key = _storage_key(tensor)
            if key not in parameters and key not in sizes:
                sizes[key] = tensor.untyped_storage().nbytes()
                owner[key] = current[0]
        return tensor

    handles = []
    for index, layer in enumerate(layers):
        def enter(module, args, kwargs, index=index):
            # A checkpointed layer keeps its tensor arguments: the hidden states and what the
            # layers share (rotary cos/sin, a mask), the shared ones counted at the first layer.
            current[0] = index
            inputs[index] = 0
            for tensor in tree_leaves((args, kwargs)):
                if isinstance(tensor, torch.Tensor) and tensor.layout == torch.strided:
                    key = _storage_key(tensor)
                    if key not in parameters and key not in seen_inputs:
                        seen_inputs.add(key)
                        inputs[index] += tensor.untyped_storage().nbytes()
        handles.append(layer.register_forward_pre_hook(enter, with_kwargs=True))
        handles.append(layer.register_forward_hook(lambda *a: current.__setitem__(0, -1)))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = compute_loss()
        loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    per_layer = [sum(n for k, n in sizes.items() if owner[k] == i) for i in range(len(layers))]
    return sum(sizes.values()), per_layer, [inputs.get(i, 0) for i in range(len(layers))]


def _prepare(method: str, model: nn.Module, rank: int, lora_rank: int, targets) -> tuple[nn.Module, list[str]]:
    """``model`` set up to train with ``method``; a qpaca/qlora model must be quantized already
    (`_quantize_linears`)."""
    if method == "full":
        model.requires_grad_(True)
        return model, []
    if method == "floor":
        model.requires_grad_(False)
        model.enable_input_require_grads()
        return model, ["all weights frozen: the least any adapter method can save"]
    if method in ("paca", "qpaca"):
        model = apply_paca(model, PaCAConfig(rank=rank, alpha=2 * rank, target_modules=targets))
        kind = "float32 (paca_dtype='auto' on a quantized base)" if method == "qpaca" else "paca_dtype='auto'"
        return model, [f"rank {rank}, trained columns {kind}"]
    if method in ("lora", "lora-fp32", "qlora"):
        return _prepare_lora(model, lora_rank, targets, fp32=method == "lora-fp32")
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(PLAN_METHODS)}")


def _prepare_lora(model: nn.Module, lora_rank: int, targets, fp32: bool) -> tuple[nn.Module, list[str]]:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0, target_modules=targets)
    model = get_peft_model(model, config, autocast_adapter_dtype=fp32).get_base_model()
    if not fp32:
        # peft skips casting adapters built on the meta device (a plan), so cast them here;
        # on a real model peft already did.
        for name, module in model.named_modules():
            if name.rpartition(".")[0].endswith(("lora_A", "lora_B")):
                for key, parameter in list(module._parameters.items()):
                    if parameter is not None and parameter.dtype != model.dtype:
                        # replaced, not Module.to(): fake parameters cannot be swapped
                        module._parameters[key] = nn.Parameter(parameter.detach().to(model.dtype),
                                                               requires_grad=parameter.requires_grad)
    kind = "float32 (peft's default)" if fp32 else "the model's dtype"
    return model, [f"rank {lora_rank}, adapters in {kind}"]


def _quantize_linears(model: nn.Module, fake: bool) -> None:
    """Make every plain ``nn.Linear`` but the output head a bitsandbytes nf4 ``Linear4bit``
    (blocksize 64, double quantization, computing in the weight's dtype), as transformers'
    ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)``
    loads a model; on fake tensors through `_fake_nf4_linear`."""
    from .quantized import quantize_linear

    head = model.get_output_embeddings()
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and module is not head:
            parent, _, child = name.rpartition(".")
            quantized = _fake_nf4_linear(module) if fake else quantize_linear(module, "nf4")
            setattr(model.get_submodule(parent), child, quantized)
    # peft chooses its bitsandbytes LoRA layer only for a model flagged as loaded in 4 bits
    model.is_loaded_in_4bit = True


def _fake_nf4_linear(linear: nn.Linear) -> nn.Module:
    """A ``Linear4bit`` over fake nf4 bytes. bitsandbytes' ``Params4bit`` cannot wrap a fake tensor,
    but its quantization and matmul ops have fake kernels: the bytes and the quantization state
    come from bitsandbytes' own ``quantize_4bit`` (so their sizes are its sizes), held by a plain
    Parameter carrying the attributes ``Linear4bit``, peft and QPaCA read from a ``Params4bit``."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from .quantized import import_bitsandbytes

    bnb = import_bitsandbytes("planning qpaca or qlora")
    weight = linear.weight.detach()
    packed, state = bnb.functional.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    with unset_fake_temporarily():  # the module's own (meta) Params4bit, replaced below
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False, compute_dtype=weight.dtype,
                                  compress_statistics=True, quant_type="nf4", device="meta")
    packed = nn.Parameter(packed, requires_grad=False)
    for key, value in dict(quant_state=state, quant_type="nf4", compress_statistics=True, blocksize=64,
                           quant_storage=torch.uint8, bnb_quantized=True).items():
        setattr(packed, key, value)
    layer._parameters["weight"] = packed
    layer.quant_state = state
    layer.bias = linear.bias
    return layer


def _warm_bitsandbytes_tables() -> None:
    """bitsandbytes builds the double quantization's code table (256 float32 values) from Python
    floats on first use and caches it; that read fails on fake tensors, so quantize one real block
    first (each layer's state then holds its own copy of the table, fake or real)."""
    from .quantized import import_bitsandbytes

    bnb = import_bitsandbytes("planning qpaca or qlora")
    bnb.functional.quantize_4bit(torch.ones(64), blocksize=64, compress_statistics=True, quant_type="nf4")


def _fake_from_meta(model: nn.Module) -> nn.Module:
    """Replace every meta parameter and buffer of ``model`` by a fake CPU tensor of the same shape,
    dtype and trainability (tied parameters stay tied); must run inside ``FakeTensorMode``."""
    replaced: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for store, is_parameter in ((module._parameters, True), (module._buffers, False)):
            for name, tensor in list(store.items()):
                if tensor is None or not tensor.is_meta:
                    continue
                if id(tensor) not in replaced:
                    new = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu")
                    keep = tensor.requires_grad
                    replaced[id(tensor)] = nn.Parameter(new, requires_grad=keep) if is_parameter else new
                store[name] = replaced[id(tensor)]
    return model


def plan_method(config, method: str, *, batch_size: int, sequence_length: int, dtype: torch.dtype,
                rank: int = 64, lora_rank: Optional[int] = None, targets=DEFAULT_TARGETS,
                chunk_size: int = 1024, fake: bool = True) -> MethodPlan:
    """One training step of ``method`` on a model built from ``config`` (fake tensors unless ``fake=False``)."""
    if method not in PLAN_METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(PLAN_METHODS)}")
    lora_rank = lora_rank or max(rank // 2, 1)
    notes: list[str] = []

    def prepare(model: nn.Module) -> nn.Module:
        model, method_notes = _prepare_method(method, model, rank, lora_rank, targets, fake)
        notes.extend(method_notes)
        return model

    if method in QUANTIZED_METHODS and fake:
        _warm_bitsandbytes_tables()
    # peft moves each new adapter with Module.to(), which cannot swap fake parameters
    planned = plan_step(config, prepare, batch_size=batch_size, sequence_length=sequence_length, dtype=dtype,
                        chunk_size=chunk_size, fake=fake, build_on_meta=method in ("lora", "lora-fp32"))
    planned.method, planned.notes = method, notes
    return planned


def _prepare_method(method: str, model: nn.Module, rank: int, lora_rank: int, targets,
                    fake: bool) -> tuple[nn.Module, list[str]]:
    """`_prepare`, after quantizing the base for qpaca and qlora."""
    if method not in QUANTIZED_METHODS:
        return _prepare(method, model, rank, lora_rank, targets)
    _quantize_linears(model, fake=fake)
    if method == "qlora" and fake:
        # The fake nf4 bytes cannot live on the meta device; only the adapters are built there
        # (peft leaves meta adapters where they are), then made fake CPU tensors.
        with torch.device("meta"):
            model, notes = _prepare(method, model, rank, lora_rank, targets)
        model = _fake_from_meta(model)
    else:
        model, notes = _prepare(method, model, rank, lora_rank, targets)
    notes.append("frozen base nf4 (blocksize 64, double quantization), computing in the model's dtype; "
                 "embeddings, norms and head in the model's dtype")
    return model, notes


@contextlib.contextmanager
def _planning_mode(fake: bool):
    """``FakeTensorMode`` (or nothing), with module conversions that replace parameters: Module.to()
    cannot assign a fake tensor into a real parameter's .data, and replacing the parameter (torch's
    documented future behaviour) works for both kinds."""
    if fake:
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = FakeTensorMode(allow_non_fake_inputs=True)
    else:
        mode = contextlib.nullcontext()
    overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        with mode:
            yield
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(overwrite)


def chunked_loss_step(chunk_size: int) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    """The loss of a step as `PaCAFineTuneModule(chunked_loss=True)` computes it."""
    def loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        hidden = model.base_model(input_ids=ids).last_hidden_state
        head = model.get_output_embeddings()
        return chunked_causal_lm_loss(hidden, head.weight, ids, lm_head_bias=head.bias, chunk_size=chunk_size)
    return loss


def plan_step(config, prepare: Callable[[nn.Module], nn.Module], *, batch_size: int, sequence_length: int,
              dtype: torch.dtype, chunk_size: Optional[int] = 1024,
              loss: Optional[Callable[[nn.Module, torch.Tensor], torch.Tensor]] = None,
              fake: bool = True, build_on_meta: bool = False, autocast_dtype: Optional[torch.dtype] = None,
              method: str = "custom") -> MethodPlan:
    """One training step of the model built from ``config`` in ``dtype`` and adapted by ``prepare``.

    ``loss(model, ids)`` computes the step's loss (default: the chunked loss with ``chunk_size``,
    or the model's own loss from full logits when ``chunk_size`` is None). ``build_on_meta``
    builds and prepares on the meta device, then gives every tensor a fake CPU twin, for
    preparations that move parameters (peft); CPU kernels choose which tensors attention saves, so
    the meta device itself would count differently. ``autocast_dtype`` runs the step under CPU
    autocast, as mixed-precision training does.
    """
    from transformers import AutoModelForCausalLM

    if loss is None:
        loss = (chunked_loss_step(chunk_size) if chunk_size is not None
                else lambda model, ids: model(input_ids=ids, labels=ids, use_cache=False).loss)
    with _planning_mode(fake):
        torch.manual_seed(0)
        if build_on_meta and fake:
            with torch.device("meta"):
                model = prepare(AutoModelForCausalLM.from_config(config, dtype=dtype))
            model = _fake_from_meta(model)
        else:
            model = prepare(AutoModelForCausalLM.from_config(config, dtype=dtype))
        model.train()
        ids = torch.randint(0, config.vocab_size, (batch_size, sequence_length))
        autocast = (torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype is not None
                    else contextlib.nullcontext())

        def compute_loss():
            with autocast:
                return loss(model, ids)

        with LiveBytes([*_model_tensors(model), ids]) as live:
            saved, per_layer, inputs_per_layer = count_saved(model, compute_loss)
        return _totals(method, model, saved, per_layer, inputs_per_layer, live)


def _totals(method: str, model: nn.Module, saved: int, per_layer: list[int], inputs_per_layer: list[int],
            live: LiveBytes) -> MethodPlan:
    layer_inputs = sum(inputs_per_layer)
    trainable = [p for p in model.parameters() if p.requires_grad]
    weights = model_state_bytes(model)
    grads = sum(p.numel() * p.element_size() for p in trainable)
    optimizer_states = 2 * grads
    persistent = weights + grads + optimizer_states
    head = saved - sum(per_layer)
    plan = MethodPlan(method, saved, per_layer, head, layer_inputs, inputs_per_layer, weights, grads, optimizer_states,
                      persistent + saved, 0, sum(p.numel() for p in trainable))
    plan.total_checkpointed_bytes = total_with_checkpointing(plan, len(per_layer))
    # In every step after the first, AdamW's two moments are alive throughout; its update (foreach,
    # torch's default on CUDA) adds one temporary per trainable tensor (the second moment's square
    # root) to every gradient and whatever else backward left alive.
    plan.peak_bytes = weights + optimizer_states + max(live.peak, live.current + grads)
    return plan


class LiveBytes(TorchDispatchMode):
    """The bytes of tensor storages alive while it is active, and their peak: every storage an op
    returns counts from its first appearance until the last tensor viewing it is freed (fake or
    real tensors alike). Storages of ``existing`` tensors (the model's) are not counted.

    This is what an allocator must hold for the step: saved tensors, each op's outputs and
    temporaries (the loss's chunk logits, backward's intermediate gradients) and the gradients.
    It leaves out the allocator's rounding and fragmentation and any workspace a kernel allocates
    outside torch's tensors.
    """

    def __init__(self, existing=()):
        super().__init__()
        self.existing = {_storage_key(t) for t in existing}
        self.references: dict[int, int] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.layout == torch.strided:
                self._track(tensor)
        return out

    def _track(self, tensor: torch.Tensor) -> None:
        key, size = _storage_key(tensor), tensor.untyped_storage().nbytes()
        if key in self.existing:
            return
        if key not in self.references:
            self.references[key] = 0
            self.current += size
            self.peak = max(self.peak, self.current)
        self.references[key] += 1
        # A tensor's Python object lives as long as its TensorImpl does, also when only autograd holds it.
        weakref.finalize(tensor, self._release, key, size).atexit = False  # nothing to count at exit

    def _release(self, key: int, size: int) -> None:
        self.references[key] -= 1
        if not self.references[key]:
            del self.references[key]
            self.current -= size


def _model_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Parameters, buffers and bitsandbytes' quantization-state tensors of ``model``."""
    tensors = [*model.parameters(), *model.buffers()]
    for module in model.modules():
        state = getattr(module, "quant_state", None) or getattr(getattr(module, "weight", None), "quant_state", None)
        tensors += _quant_state_tensors(state)
        if torch.is_tensor(getattr(module, "int8_row_scales", None)):  # QPaCA's int8 layers
            tensors.append(module.int8_row_scales)
    return tensors


def model_state_bytes(model: nn.Module) -> int:
    """Bytes the model holds before training: parameters, buffers (PaCA's pretrained columns and
    indices among them) and bitsandbytes' quantization states, each storage once (tied weights
    count once, as in memory); of a model sharded by FSDP2, this process's shards."""
    tensors = [t.to_local() if isinstance(t, DTensor) else t for t in _model_tensors(model)]
    return sum({_storage_key(t): t.untyped_storage().nbytes() for t in tensors}.values())


def _quant_state_tensors(state) -> list[torch.Tensor]:
    """The tensors of a bitsandbytes ``QuantState`` (block scales, code table, offset; nested too)."""
    if state is None:
        return []
    found = [getattr(state, key, None) for key in ("absmax", "code", "offset")]
    return [t for t in found if torch.is_tensor(t)] + _quant_state_tensors(getattr(state, "state2", None))


def total_with_checkpointing(plan: MethodPlan, layers: int, persistent_bytes: Optional[int] = None) -> int:
    """Planned peak of the step with the first ``layers`` decoder layers checkpointed.

    A checkpointed layer keeps only its input. The peak is the larger of the start of backward
    (persistent + head and loss + what every layer keeps) and each recomputation: backward
    reaches checkpointed layer ``j`` after every later layer has freed its saved tensors, so then
    only the layers before ``j`` hold anything besides ``j``'s recomputed activations. That is
    why the first layers are the ones to checkpoint: recomputed last, they add least.
    ``persistent_bytes`` replaces the plan's weights + gradients + optimizer states (e.g. one FSDP
    rank's real share).
    """
    if persistent_bytes is None:
        persistent_bytes = plan.weight_bytes + plan.gradient_bytes + plan.optimizer_state_bytes
    saved, inputs = plan.saved_per_layer_bytes, plan.layer_input_per_layer_bytes
    kept = [inputs[index] if index < layers else size for index, size in enumerate(saved)]
    peak = plan.head_and_loss_bytes + sum(kept)
    for index in range(min(layers, len(saved))):
        peak = max(peak, sum(kept[:index]) + saved[index])
    return persistent_bytes + peak


def checkpointed_layers_needed(plan: MethodPlan, budget: int, persistent_bytes: Optional[int] = None) -> Optional[int]:
    """The fewest decoder layers to checkpoint for the step to fit ``budget`` bytes (None: never fits)."""
    for layers in range(len(plan.saved_per_layer_bytes) + 1):
        if total_with_checkpointing(plan, layers, persistent_bytes) <= budget:
            return layers
    return None
