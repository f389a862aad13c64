"""A zoo of transformers architectures built from tiny configs: PaCA's column gradients equal dense
autograd, the adapter round trip is exact, and the merged model reloads with plain transformers."""

import copy
import json
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors.torch import save_file

from paca_lightning import PaCAConfig, apply_paca, load_adapter, merge_paca, paca_layers, save_adapter, unload_paca
from paca_lightning.experts import PaCAExpertWeights

COMMON = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=2)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24)
SMALL_GPT = dict(n_embd=32, n_layer=2, n_head=4, n_positions=64)
SEQ2SEQ = dict(decoder_start_token_id=0)
# name: (config class, model class, overrides); MoE entries hold fused 3-D expert weights
ZOO = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 8}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),  # fused qkv_proj and gate_up_proj Linears
    "olmo": ("OlmoConfig", "OlmoForCausalLM", {}),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", {}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {**MOE, "shared_expert_intermediate_size": 40}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {**MOE, "head_dim": 8}),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", {"num_experts": 4, "num_experts_per_tok": 2}),
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    # experts stored transposed (experts x in x out), with biases and a gate of its own
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2,
                                                      "head_dim": 8, "layer_types": ["full_attention"] * 2}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", SMALL_GPT),  # Conv1D, fused c_attn
    "gptj": ("GPTJConfig", "GPTJForCausalLM", {**SMALL_GPT, "rotary_dim": 4}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {}),  # fused query_key_value
    "opt": ("OPTConfig", "OPTForCausalLM", {"ffn_dim": 48, "word_embed_proj_dim": 32}),
    "bloom": ("BloomConfig", "BloomForCausalLM", {"n_layer": 2, "n_head": 4}),
    "falcon": ("FalconConfig", "FalconForCausalLM", {"new_decoder_architecture": False, "multi_query": True,
                                                    "bias": True}),  # FalconLinear
    "bart": ("BartConfig", "BartForConditionalGeneration", {
        **SEQ2SEQ, "d_model": 32, "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 4,
        "decoder_attention_heads": 4, "encoder_ffn_dim": 48, "decoder_ffn_dim": 48}),
    "t5": ("T5Config", "T5ForConditionalGeneration", {**SEQ2SEQ, "d_model": 32, "d_kv": 8, "d_ff": 48,
                                                     "num_layers": 1, "num_heads": 4}),
}
MOE_NAMES = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe", "gpt_oss"}


def build(name: str, seed: int = 0):
    config_class, model_class, overrides = ZOO[name]
    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(**{**COMMON, **overrides})
    return getattr(transformers, model_class)(config).eval()


def batch_for(name: str):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (2, 8), generator=generator)
    batch = {"input_ids": ids, "labels": ids.clone()}
    if ZOO[name][1].endswith("ConditionalGeneration"):
        batch["decoder_input_ids"] = ids.clone()
    return batch


def adapted(name: str):
    model = apply_paca(build(name), PaCAConfig(rank=4, alpha=8))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # trained-looking columns, so merged and base weights differ
        for _, layer in paca_layers(model):
            layer.paca_weight.add_(torch.randn(layer.paca_weight.shape, generator=generator) * 0.05)
    return model


def dense_columns(layer, grad: torch.Tensor) -> torch.Tensor:
    """The dense gradient at the layer's trained columns, shaped like ``paca_weight``."""
    if isinstance(layer, PaCAExpertWeights):
        return torch.stack([dense_columns_2d(grad[e], layer.paca_indices[e], layer.transposed)
                            for e in range(layer.num_experts)])
    return dense_columns_2d(grad, layer.paca_indices, layer.transposed)


def dense_columns_2d(grad, indices, transposed):
    return grad.index_select(0, indices).t() if transposed else grad.index_select(1, indices)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_column_gradients_equal_dense_autograd(name):
    model, batch = adapted(name), batch_for(name)
    layers = dict(paca_layers(model))
    assert len(layers) >= 4
    if name in MOE_NAMES:
        assert any(isinstance(layer, PaCAExpertWeights) for layer in layers.values())
    dense = merge_paca(copy.deepcopy(model))
    params = dict(dense.named_parameters())
    keys = {layer_name: layer_name if isinstance(layer, PaCAExpertWeights) else f"{layer_name}.weight"
            for layer_name, layer in layers.items()}
    for key in keys.values():
        params[key].requires_grad_(True)
    model(**batch).loss.backward()
    dense(**batch).loss.backward()
    for layer_name, layer in layers.items():
        want = layer.scaling * dense_columns(layer, params[keys[layer_name]].grad)
        torch.testing.assert_close(layer.paca_weight.grad, want, rtol=1e-4, atol=1e-6,
                                   msg=lambda m, n=layer_name: f"{n}: {m}")


@pytest.mark.parametrize("name", sorted(ZOO))
def test_adapter_merge_and_unload_round_trips(name, tmp_path):
    base, model, batch = build(name), adapted(name), batch_for(name)
    original = {key: tensor.clone() for key, tensor in base.state_dict().items()}
    with torch.no_grad():
        trained = model(**batch).logits
    save_adapter(model, tmp_path)
    loaded = load_adapter(copy.deepcopy(base), tmp_path)
    merged = merge_paca(copy.deepcopy(model))
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, trained)
        torch.testing.assert_close(merged(**batch).logits, trained, rtol=1e-5, atol=1e-5)
    assert set(merged.state_dict()) == set(original)
    assert {type(m) for m in merged.modules()} == {type(m) for m in base.modules()}
    restored = unload_paca(model).state_dict()
    assert all(torch.equal(restored[key], original[key]) for key in original)


LOADER = r"""
import json, sys
import torch, transformers
from safetensors.torch import load_file
cases = json.loads(sys.argv[1])
failures = []
for name, (directory, model_class, expected_path) in cases.items():
    model = getattr(transformers, model_class).from_pretrained(directory).eval()
    expected = load_file(expected_path)
    batch = {key: value for key, value in expected.items() if key != "logits"}
    with torch.no_grad():
        logits = model(**batch).logits
    if not torch.allclose(logits, expected["logits"], rtol=1e-5, atol=1e-5):
        failures.append(f"{name}: max diff {(logits - expected['logits']).abs().max().item()}")
assert not any(m.startswith("paca_lightning") for m in sys.modules), "paca_lightning was imported"
print("FAILURES:" + json.dumps(failures))
"""


@pytest.mark.slow
def test_merged_models_reload_with_plain_transformers(tmp_path):
    """All architectures in one subprocess that never imports paca_lightning."""
    cases = {}
    for name in sorted(ZOO):
        model, batch = adapted(name), batch_for(name)
        merged = merge_paca(model)
        with torch.no_grad():
            logits = merged(**batch).logits
        directory = tmp_path / name
        merged.save_pretrained(directory)
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        save_file({**inputs, "logits": logits.contiguous()}, str(tmp_path / f"{name}.safetensors"))
        cases[name] = (str(directory), ZOO[name][1], str(tmp_path / f"{name}.safetensors"))
    result = subprocess.run([sys.executable, "-c", LOADER, json.dumps(cases)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    failures = json.loads(result.stdout.rsplit("FAILURES:", 1)[1])
    assert failures == []
