"""QPaCA on bitsandbytes 4-bit (nf4/fp4, double quantization on/off) and 8-bit bases, on CPU."""

import json
import sys

import bitsandbytes
import bitsandbytes.functional as bnb_functional
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from paca_lightning import (
    PaCAConfig,
    apply_paca,
    disable_paca,
    load_adapter,
    merge_paca,
    paca_layers,
    save_adapter,
    unload_paca,
)
from paca_lightning.quantized import QuantizedPaCALinear
from tests.helpers import make_tiny_falcon, make_tiny_gpt2, make_tiny_llama, saved_bytes, token_batch

FOUR_BIT = [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Llama saved once, so dense and bitsandbytes-quantized copies share every weight."""
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_llama(seed=3).save_pretrained(path)
    return path


def load(path, **quantization):
    config = BitsAndBytesConfig(**quantization) if quantization else None
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu")


def load_4bit(path, quant_type, double_quant):
    return load(path, load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=torch.float32)


def bnb_dequantized(layer: QuantizedPaCALinear) -> torch.Tensor:
    """The base weight as bitsandbytes itself dequantizes the layer's bytes and state."""
    if layer.kind == "4bit":
        return bnb_functional.dequantize_4bit(layer.weight.data, layer.quant_state).float()
    return bnb_functional.int8_vectorwise_dequant(layer.weight.data, layer.int8_row_scales).float()


def perturb_columns(model, seed=7):
    """Move every paca_weight away from its initial value, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in paca_layers(model):
            layer.paca_weight.add_(torch.randn(layer.paca_weight.shape, generator=generator) * 0.05)


def dense_reference(qpaca_model, dense_model):
    """``dense_model`` with each adapted weight set to the dequantized base, trained columns in."""
    for name, layer in paca_layers(qpaca_model):
        weight = bnb_dequantized(layer)
        weight[:, layer.paca_indices] = layer.scaling * layer.paca_weight.detach()
        dense = dense_model.get_submodule(name)
        dense.weight = nn.Parameter(weight)
    return dense_model


def assert_grads_match_dense(qpaca_model, dense_model, batch):
    qpaca_loss = qpaca_model(**batch).loss
    qpaca_loss.backward()
    dense_loss = dense_reference(qpaca_model, dense_model)(**batch).loss
    dense_loss.backward()
    torch.testing.assert_close(qpaca_loss, dense_loss, rtol=1e-6, atol=1e-6)
    for name, layer in paca_layers(qpaca_model):
        expected = layer.scaling * dense_model.get_submodule(name).weight.grad[:, layer.paca_indices]
        torch.testing.assert_close(layer.paca_weight.grad, expected, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("quant_type,double_quant", FOUR_BIT)
def test_paca_weight_grad_equals_dense_grad_on_dequantized_4bit_weight(checkpoint, quant_type, double_quant):
    model = load_4bit(checkpoint, quant_type, double_quant)
    apply_paca(model, PaCAConfig(rank=8, alpha=16))
    layers = dict(paca_layers(model))
    assert len(layers) == 14 and all(isinstance(layer, QuantizedPaCALinear) for layer in layers.values())
    state = layers["model.layers.0.mlp.up_proj"].quant_state
    assert (state.quant_type, state.nested) == (quant_type, double_quant)
    perturb_columns(model)
    assert_grads_match_dense(model, load(checkpoint), token_batch())


def test_paca_weight_grad_equals_dense_grad_on_dequantized_8bit_weight(checkpoint):
    model = load(checkpoint, load_in_8bit=True)
    apply_paca(model, PaCAConfig(rank=8, alpha=16))
    assert {layer.kind for _, layer in paca_layers(model)} == {"8bit"}
    perturb_columns(model)
    assert_grads_match_dense(model, load(checkpoint), token_batch())


@pytest.mark.parametrize("quantize", ["nf4", "fp4", "int8"])
def test_quantize_option_trains_exactly_on_its_own_quantized_base(quantize):
    model = apply_paca(make_tiny_llama(seed=4), PaCAConfig(rank=4, alpha=8, quantize=quantize))
    assert {layer.kind for _, layer in paca_layers(model)} == {"8bit" if quantize == "int8" else "4bit"}
    perturb_columns(model)
    assert_grads_match_dense(model, make_tiny_llama(seed=4), token_batch())


def test_quantize_option_adapts_linear_subclasses_with_the_plain_forward():
    """Falcon's FalconLinear layers, whose outputs the model then modifies in place."""
    model = apply_paca(make_tiny_falcon(seed=4), PaCAConfig(rank=4, alpha=8, quantize="nf4", bias="all"))
    assert len(list(paca_layers(model))) == 8
    perturb_columns(model)
    assert_grads_match_dense(model, make_tiny_falcon(seed=4), token_batch())


def test_quantize_option_selects_columns_on_full_precision_weights():
    config = dict(rank=4, alpha=8, selection="weight_norm")
    dense = apply_paca(make_tiny_llama(seed=5), PaCAConfig(**config))
    quantized = apply_paca(make_tiny_llama(seed=5), PaCAConfig(**config, quantize="nf4"))
    for (name, dense_layer), (_, layer) in zip(paca_layers(dense), paca_layers(quantized)):
        assert torch.equal(dense_layer.paca_indices, layer.paca_indices), name


def test_bf16_compute_matches_dense_bf16_linear_and_returns_input_dtype():
    torch.manual_seed(0)
    base = nn.Linear(64, 32, bias=True)
    model = nn.Sequential(base)
    apply_paca(model, PaCAConfig(rank=8, alpha=8, target_modules=["0"], quantize="nf4", bias="all"))
    layer = model[0]
    layer.compute_dtype = torch.bfloat16
    x = torch.randn(3, 5, 64, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.float32
    weight = bnb_dequantized(layer).to(torch.bfloat16)
    weight[:, layer.paca_indices] = (layer.scaling * layer.paca_weight.detach()).to(torch.bfloat16)
    reference_x = x.detach().clone().requires_grad_(True)
    reference = nn.functional.linear(reference_x.to(torch.bfloat16), weight.requires_grad_(True),
                                     layer.bias.to(torch.bfloat16))
    torch.testing.assert_close(y, reference.float())
    y.square().sum().backward()
    reference.float().square().sum().backward()
    torch.testing.assert_close(x.grad, reference_x.grad)
    torch.testing.assert_close(layer.paca_weight.grad, layer.scaling * weight.grad[:, layer.paca_indices].float(),
                               rtol=2e-2, atol=1e-2)
    assert layer.bias.grad is not None


def test_backward_saves_only_input_columns_and_dequantizes_once_per_pass(monkeypatch):
    model = apply_paca(nn.Sequential(nn.Linear(64, 48)), PaCAConfig(rank=4, alpha=8, target_modules=["0"],
                                                                    quantize="nf4"))
    layer = model[0]
    calls = []
    original = bnb_functional.dequantize_4bit
    monkeypatch.setattr(bnb_functional, "dequantize_4bit", lambda *a, **k: calls.append(1) or original(*a, **k))
    x = torch.randn(2, 10, 64, requires_grad=True)
    nbytes, saved, y = saved_bytes(lambda: layer(x), parameters=[layer.paca_weight])
    assert nbytes == 2 * 10 * 4 * 4  # x[..., S] in float32: nothing of the weight's size is kept
    assert len(calls) == 1
    y.sum().backward()
    assert len(calls) == 2  # backward rebuilt the weight for dx
    layer(x.detach()).sum().backward()
    assert len(calls) == 3  # the input needs no gradient: backward never dequantizes


def test_merged_16bit_export_holds_trained_columns_exactly_and_dequantized_base_elsewhere(checkpoint, tmp_path):
    model = apply_paca(load_4bit(checkpoint, "nf4", True), PaCAConfig(rank=8, alpha=16))
    perturb_columns(model)
    batch = token_batch()
    with torch.no_grad():
        logits = model(**batch).logits
    expected = {}
    for name, layer in paca_layers(model):
        expected[name] = (layer.paca_indices.clone(), layer.scaling * layer.paca_weight.detach(),
                          bnb_dequantized(layer))
    merge_paca(model)
    for name, (indices, trained, base) in expected.items():
        merged = model.get_submodule(name)
        assert type(merged) is nn.Linear and merged.weight.dtype == torch.float32
        assert torch.equal(merged.weight[:, indices], trained), name
        others = torch.ones(merged.in_features, dtype=torch.bool)
        others[indices] = False
        assert torch.equal(merged.weight[:, others], base[:, others]), name
    model.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert getattr(reloaded.config, "quantization_config", None) is None
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, logits, rtol=1e-5, atol=1e-5)


def test_merge_dtype_choice_casts_exact_trained_columns():
    model = apply_paca(make_tiny_llama(seed=6), PaCAConfig(rank=4, alpha=8, quantize="int8"))
    perturb_columns(model)
    layer = model.model.layers[1].mlp.down_proj
    trained = (layer.scaling * layer.paca_weight.detach()).to(torch.bfloat16)
    indices = layer.paca_indices.clone()
    merge_paca(model, dtype=torch.bfloat16)
    merged = model.model.layers[1].mlp.down_proj
    assert merged.weight.dtype == torch.bfloat16
    assert torch.equal(merged.weight[:, indices], trained)


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_requantized_export_keeps_the_base_format_and_is_close_not_exact(quantize):
    model = apply_paca(make_tiny_llama(seed=6), PaCAConfig(rank=4, alpha=8, quantize=quantize))
    perturb_columns(model)
    layer = model.model.layers[0].self_attn.o_proj
    base = layer.quantized_base
    dense = layer.effective_weight(layer.paca_weight, torch.float32)
    merge_paca(model, requantize=True)
    exported = model.model.layers[0].self_attn.o_proj
    assert type(exported) is type(base)
    if quantize == "nf4":
        assert exported.weight.quant_state.quant_type == "nf4" and exported.weight.quant_state.nested
        roundtrip = bnb_functional.dequantize_4bit(exported.weight.data, exported.weight.quant_state)
    else:
        roundtrip = bnb_functional.int8_vectorwise_dequant(exported.weight.data, exported.weight.SCB)
    assert not torch.equal(roundtrip, dense)
    torch.testing.assert_close(roundtrip, dense, rtol=0.2, atol=0.05 * dense.abs().max().item())


def test_unload_returns_the_untouched_quantized_base_and_disable_computes_with_it(checkpoint):
    model = load_4bit(checkpoint, "fp4", False)
    q_proj = model.model.layers[0].self_attn.q_proj
    packed = q_proj.weight.data.clone()
    batch = token_batch()
    # bitsandbytes' own forward in train mode (in eval it repacks 4-bit weights for a CPU kernel
    # that rejects this tiny model's 96-wide down_proj).
    model.train()
    with torch.no_grad():
        base_logits = model(**batch).logits
    apply_paca(model, PaCAConfig(rank=8, alpha=16))
    perturb_columns(model)
    with torch.no_grad():
        trained_logits = model(**batch).logits
        with disable_paca(model):
            torch.testing.assert_close(model(**batch).logits, base_logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(trained_logits, base_logits)
    unload_paca(model)
    assert model.model.layers[0].self_attn.q_proj is q_proj
    assert torch.equal(q_proj.weight.data, packed)


def test_adapter_files_are_the_same_for_quantized_and_dense_bases_and_load_back_exactly(checkpoint, tmp_path):
    config = PaCAConfig(rank=8, alpha=16)
    quantized = apply_paca(load(checkpoint, load_in_8bit=True), config)
    perturb_columns(quantized)
    save_adapter(quantized, tmp_path / "quantized")
    save_adapter(apply_paca(load(checkpoint), config), tmp_path / "dense")
    quantized_tensors = load_file(tmp_path / "quantized" / "adapter_model.safetensors")
    dense_tensors = load_file(tmp_path / "dense" / "adapter_model.safetensors")
    assert {k: (v.shape, v.dtype) for k, v in quantized_tensors.items()} == \
        {k: (v.shape, v.dtype) for k, v in dense_tensors.items()}
    descriptions = [json.loads((tmp_path / kind / "adapter_config.json").read_text())
                    for kind in ("quantized", "dense")]
    for description in descriptions:
        description.pop("weights_sha256")  # of different trained values
    assert descriptions[0] == descriptions[1]

    fresh = load_adapter(load(checkpoint, load_in_8bit=True), tmp_path / "quantized")
    batch = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, quantized(**batch).logits, rtol=0, atol=0)


def test_adapter_trained_with_quantize_option_requantizes_a_plain_base_on_load(tmp_path):
    model = apply_paca(make_tiny_llama(seed=8), PaCAConfig(rank=4, alpha=8, quantize="fp4"))
    perturb_columns(model)
    save_adapter(model, tmp_path)
    fresh = load_adapter(make_tiny_llama(seed=8), tmp_path)
    assert all(isinstance(layer, QuantizedPaCALinear) for _, layer in paca_layers(fresh))
    batch = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, model(**batch).logits, rtol=0, atol=0)


def test_missing_bitsandbytes_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ImportError, match=r"quantize='nf4' needs the bitsandbytes package"):
        apply_paca(make_tiny_llama(), PaCAConfig(rank=4, quantize="nf4"))


def test_backend_that_cannot_quantize_on_the_device_names_the_backend(monkeypatch):
    def no_kernel(*args, **kwargs):
        raise NotImplementedError("Could not run 'bitsandbytes::quantize_4bit' with arguments from the 'CPU' backend")

    monkeypatch.setattr(bnb_functional, "quantize_4bit", no_kernel)
    with pytest.raises(RuntimeError, match=r"cannot run nf4 quantization on device 'cpu'.*backend for this device"):
        apply_paca(make_tiny_llama(), PaCAConfig(rank=4, quantize="nf4"))


def test_backend_that_cannot_dequantize_a_loaded_base_names_the_backend(checkpoint, monkeypatch):
    model = load(checkpoint, load_in_8bit=True)

    def no_kernel(*args, **kwargs):
        raise NotImplementedError("no kernel for int8_vectorwise_dequant on this device")

    monkeypatch.setattr(bnb_functional, "int8_vectorwise_dequant", no_kernel)
    with pytest.raises(RuntimeError, match=r"bitsandbytes .* cannot run int8 quantization on device 'cpu'"):
        apply_paca(model, PaCAConfig(rank=4))


def test_unsupported_quantized_layer_types_are_named():
    model = nn.Sequential(bitsandbytes.nn.OutlierAwareLinear(64, 32))
    with pytest.raises(TypeError, match=r"bitsandbytes.nn.modules.OutlierAwareLinear.*Linear4bit/Linear8bitLt"):
        apply_paca(model, PaCAConfig(rank=4, target_modules=["0"]))
    trainable_int8 = nn.Sequential(bitsandbytes.nn.Linear8bitLt(64, 32, has_fp16_weights=True))
    with pytest.raises(TypeError, match=r"has_fp16_weights=True"):
        apply_paca(trainable_int8, PaCAConfig(rank=4, target_modules=["0"]))


def test_quantize_rejects_conv1d_mismatched_formats_gradient_selection_and_bad_names(checkpoint):
    gpt2 = make_tiny_gpt2()
    with pytest.raises(TypeError, match=r"'transformer.h.0.attn.c_attn' is a GPT-2 Conv1D"):
        apply_paca(gpt2, PaCAConfig(rank=4, quantize="int8"))
    assert not list(paca_layers(gpt2))  # rejected before any layer was replaced
    with pytest.raises(ValueError, match=r"quantize='int8', but module .* is already quantized as nf4"):
        apply_paca(load_4bit(checkpoint, "nf4", False), PaCAConfig(rank=4, quantize="int8"))
    with pytest.raises(ValueError, match=r"selection='gradient' needs full-precision weights"):
        apply_paca(load(checkpoint, load_in_8bit=True), PaCAConfig(rank=4, selection="gradient"),
                   calibration=token_batch())
    with pytest.raises(ValueError, match=r"quantize='int4' is not valid; choose one of \['nf4', 'fp4', 'int8'\]"):
        PaCAConfig(quantize="int4")
    with pytest.raises(ValueError, match=r"applies to PaCA layers on a bitsandbytes base"):
        merge_paca(apply_paca(make_tiny_llama(), PaCAConfig(rank=4)), dtype=torch.float16)


def test_gradient_checkpointing_under_autocast_recomputes_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = apply_paca(make_tiny_llama(seed=2), PaCAConfig(rank=4, alpha=8, quantize="nf4"))
        if checkpointing:
            model.activation_checkpointing_enable()
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**token_batch()).loss
        loss.backward()
        grads.append({name: layer.paca_weight.grad for name, layer in paca_layers(model)})
    assert all(grad.dtype == torch.float32 and grad.abs().sum() > 0 for grad in grads[0].values())
    for name, grad in grads[0].items():
        assert torch.equal(grad, grads[1][name]), name


@pytest.mark.skipif(not bnb_functional.has_avx512bf16(),
                    reason="bitsandbytes repacks 4-bit weights only on AVX512-BF16 CPUs")
def test_a_base_repacked_by_a_cpu_eval_forward_is_restored_to_the_standard_layout():
    base = nn.Linear(64, 64)
    model = apply_paca(nn.Sequential(base), PaCAConfig(rank=4, target_modules=["0"], quantize="nf4"))
    before = model[0].dequantized_weight(torch.float32)
    quantized = unload_paca(model)[0]
    quantized.eval()
    with torch.no_grad():
        quantized(torch.randn(4, 64))
    assert quantized.weight.quant_state.packing_format_for_cpu
    apply_paca(model, PaCAConfig(rank=4, target_modules=["0"]))
    restored = model[0].dequantized_weight(torch.float32)
    assert not getattr(model[0].quant_state, "packing_format_for_cpu", False)
    # Same values up to the block scales bitsandbytes rounded to bfloat16 while repacking.
    torch.testing.assert_close(restored, before, rtol=1e-2, atol=1e-2 * before.abs().max().item())


def test_weight_norm_selection_on_a_loaded_base_ranks_dequantized_columns(checkpoint):
    model = apply_paca(load(checkpoint, load_in_8bit=True), PaCAConfig(rank=4, selection="weight_norm"))
    for name, layer in paca_layers(model):
        expected = torch.topk(bnb_dequantized(layer).norm(dim=0), 4).indices.sort().values
        assert torch.equal(layer.paca_indices, expected), name


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_a_qpaca_state_dict_loads_strictly_with_its_quantization_state(quantize):
    source = apply_paca(make_tiny_llama(seed=9), PaCAConfig(rank=4, alpha=8, quantize=quantize))
    perturb_columns(source)
    # Another base: its bytes and block scales (or row scales) all differ until the load.
    target = apply_paca(make_tiny_llama(seed=10), PaCAConfig(rank=4, alpha=8, quantize=quantize))
    result = target.load_state_dict(source.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    batch = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(target(**batch).logits, source(**batch).logits, rtol=0, atol=0)


def test_the_wrapped_base_holds_no_bytes_and_dtype_casts_leave_the_packed_weight_alone(checkpoint):
    model = load(checkpoint, load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                 bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.bfloat16)
    q_proj = model.model.layers[0].self_attn.q_proj
    stored = q_proj.weight.data.clone()
    apply_paca(model, PaCAConfig(rank=8, alpha=16))
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.quantized_base.weight is None  # one copy of the bytes: the layer's
    assert layer.weight.dtype == torch.uint8
    before = layer.dequantized_weight(torch.float32)
    model.model.layers[0].to(torch.bfloat16)  # casts floating tensors only: bytes stay bytes
    assert torch.equal(layer.dequantized_weight(torch.float32), before)
    unload_paca(model)
    assert model.model.layers[0].self_attn.q_proj is q_proj
    assert q_proj.weight.dtype == torch.bfloat16  # packed bytes as bf16 (some read as NaN): compare bytes
    assert torch.equal(q_proj.weight.data.view(torch.uint8), stored.view(torch.uint8))


def test_an_unloaded_8bit_base_computes_as_before_wrapping(checkpoint):
    model = load(checkpoint, load_in_8bit=True)
    batch = token_batch()
    with torch.no_grad():
        before = model(**batch).logits  # bitsandbytes' forward moves the row scales into its state
    apply_paca(model, PaCAConfig(rank=4, alpha=8))
    perturb_columns(model)
    unload_paca(model)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, before, rtol=0, atol=0)


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj"]], ids=["all", "some"])
def test_the_gathering_export_of_a_loaded_4bit_model_writes_a_plain_dense_checkpoint(checkpoint, tmp_path, targets):
    # export_merged is what a multi-process run writes at fit end; here in one process. Layers
    # PaCA did not adapt ("some") are dequantized too.
    from paca_lightning.parallel import export_merged

    model = apply_paca(load_4bit(checkpoint, "nf4", True), PaCAConfig(rank=8, alpha=16, target_modules=targets))
    perturb_columns(model)
    batch = token_batch()
    model.train()  # bitsandbytes' own eval path repacks 4-bit weights for a CPU kernel
    with torch.no_grad():
        expected = model(**batch).logits
    export_merged(model, tmp_path / "merged")
    assert "quantization_config" not in (tmp_path / "merged" / "config.json").read_text()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").train()
    assert not any(type(m).__module__.startswith("bitsandbytes") for m in plain.modules())
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, expected, rtol=1e-5, atol=1e-5)


def test_a_wrap_that_fails_leaves_the_bitsandbytes_layer_as_it_was(checkpoint, monkeypatch):
    import paca_lightning.quantized as quantized

    model = load_4bit(checkpoint, "nf4", False)
    q_proj = model.model.layers[0].self_attn.q_proj
    packed = q_proj.weight

    def failing(*args, **kwargs):
        raise NotImplementedError("no kernel for this device")

    monkeypatch.setattr(quantized, "dequantize_4bit", failing)
    with pytest.raises(RuntimeError, match="cannot run nf4 quantization"):
        apply_paca(model, PaCAConfig(rank=4, target_modules=["q_proj"]))
    assert model.model.layers[0].self_attn.q_proj is q_proj and q_proj.weight is packed


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_an_unmerged_qpaca_model_saves_with_save_pretrained(quantize, tmp_path):
    model = apply_paca(make_tiny_llama(seed=2), PaCAConfig(rank=4, alpha=8, quantize=quantize))
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert "model.layers.0.self_attn.q_proj._extra_state" in saved


_LOAD_PLAIN = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
with torch.no_grad():
    logits = model(input_ids=torch.tensor([[1, 5, 9, 3, 7, 2]])).logits
torch.save(logits, sys.argv[2])
assert "paca_lightning" not in sys.modules and "bitsandbytes" not in sys.modules
"""


def _plain_logits(directory, tmp_path):
    """The saved model's logits, computed by plain transformers in a process without paca_lightning."""
    import subprocess

    out = tmp_path / "logits.pt"
    result = subprocess.run([sys.executable, "-c", _LOAD_PLAIN, str(directory), str(out)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return torch.load(out, weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("family, targets", [("gpt2", "all-linear"), ("gpt2", ["c_attn"]),
                                             ("llama", ["q_proj", "v_proj"])],
                         ids=["gpt2-conv1d-all", "gpt2-conv1d-some", "llama-some"])
def test_a_merged_4bit_model_keeps_the_base_layout_and_loads_with_plain_transformers(tmp_path, family, targets):
    """GPT-2's Conv1D layers come back as Conv1D (in x out), and bitsandbytes layers PaCA did not
    adapt go dense too: the export is a dense model of the original architecture."""
    base = tmp_path / "base"
    (make_tiny_gpt2(seed=2) if family == "gpt2" else make_tiny_llama(seed=2)).save_pretrained(base)
    model = apply_paca(load_4bit(base, "nf4", True), PaCAConfig(rank=4, alpha=8, target_modules=targets))
    perturb_columns(model)
    ids = torch.tensor([[1, 5, 9, 3, 7, 2]])
    # with gradients on (train mode; no dropout in these models): bitsandbytes' CPU inference path
    # repacks the layers PaCA left alone, and fails on these tiny shapes
    trained = model(input_ids=ids).logits.detach()
    merge_paca(model).save_pretrained(tmp_path / "merged")
    if family == "gpt2":
        assert type(model.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    torch.testing.assert_close(_plain_logits(tmp_path / "merged", tmp_path), trained, rtol=1e-4, atol=1e-4)


def save_tiny(make, path):
    make().save_pretrained(path)
    return path


@pytest.mark.parametrize("make,targets", [(make_tiny_gpt2, "all-linear"), (make_tiny_gpt2, ["c_attn"]),
                                          (make_tiny_llama, ["q_proj", "v_proj"])],
                         ids=["gpt2-all", "gpt2-some", "llama-some"])
@pytest.mark.parametrize("exporter", ["merge_paca", "export_merged"])
def test_merged_export_of_a_4bit_model_keeps_the_base_layout_and_loads_with_transformers(
        make, targets, exporter, tmp_path):
    from paca_lightning.parallel import export_merged

    base = save_tiny(make, tmp_path / "base")
    model = apply_paca(load_4bit(base, "nf4", True), PaCAConfig(rank=4, alpha=8, target_modules=targets))
    perturb_columns(model)
    batch = token_batch()
    model.train()  # bitsandbytes' own eval path repacks 4-bit weights for a CPU kernel
    with torch.no_grad():
        expected = model(**batch).logits
    if exporter == "merge_paca":
        merge_paca(model).save_pretrained(tmp_path / "merged")
    else:
        export_merged(model, tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").train()
    reference = AutoModelForCausalLM.from_pretrained(base)
    assert getattr(plain.config, "quantization_config", None) is None
    assert [type(m) for m in plain.modules()] == [type(m) for m in reference.modules()]
    for name, module in reference.named_modules():  # every weight in the layout of the base
        if hasattr(module, "weight") and isinstance(module.weight, torch.Tensor):
            assert plain.get_submodule(name).weight.shape == module.weight.shape, name
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, expected, rtol=1e-5, atol=1e-5)


def test_requantized_export_of_a_partly_adapted_4bit_model_reloads_quantized(checkpoint, tmp_path):
    model = apply_paca(load_4bit(checkpoint, "nf4", True),
                       PaCAConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    perturb_columns(model)
    merge_paca(model, requantize=True).save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", device_map="cpu").train()
    assert reloaded.config.quantization_config.load_in_4bit
    kinds = {type(reloaded.get_submodule(f"model.layers.0.{name}")).__name__
             for name in ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj")}
    assert kinds == {"Linear4bit"}
    model.train()
    batch = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits, rtol=1e-5, atol=1e-5)
