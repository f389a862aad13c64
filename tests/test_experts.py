"""PaCA on fused 3-D expert weights (transformers 5 MoE experts modules)."""

import copy

import pytest
import torch
from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

from paca_lightning import (
    PaCAConfig,
    apply_paca,
    disable_paca,
    load_adapter,
    merge_paca,
    paca_layers,
    save_adapter,
    trainable_parameters,
    unload_paca,
)
from paca_lightning.experts import PaCAExpertWeights
from paca_lightning.selection import random_columns
from tests.helpers import make_tiny_mixtral, saved_bytes, token_batch

EXPERT_WEIGHTS = {"gate_up_proj", "down_proj"}


def make_tiny_qwen2_moe(seed: int = 0) -> Qwen2MoeForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2MoeConfig(hidden_size=32, intermediate_size=48, moe_intermediate_size=24,
                            shared_expert_intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, vocab_size=128,
                            max_position_embeddings=64)
    return Qwen2MoeForCausalLM(config)


def expert_layers(model):
    return {name: layer for name, layer in paca_layers(model) if isinstance(layer, PaCAExpertWeights)}


def perturb(model, seed=3):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in paca_layers(model):
            layer.paca_weight.add_(torch.randn(layer.paca_weight.shape, generator=generator) * 0.05)


@pytest.mark.parametrize("make", [make_tiny_mixtral, make_tiny_qwen2_moe])
def test_all_linear_adapts_every_expert_and_gradients_equal_dense(make):
    model, dense = apply_paca(make(), PaCAConfig(rank=4, alpha=8)), make()
    perturb(model)
    experts = expert_layers(model)
    assert {name.split(".")[-1] for name in experts} == EXPERT_WEIGHTS
    assert len(experts) == 2 * model.config.num_hidden_layers
    assert not any(".experts." in name for name, _ in trainable_parameters(model).untrained)
    dense = merge_paca(copy.deepcopy(model))
    batch = token_batch()
    model(**batch).loss.backward()
    params = dict(dense.named_parameters())
    for name in experts:
        params[name].requires_grad_(True)
    dense(**batch).loss.backward()
    for name, layer in experts.items():
        grad = params[name].grad
        assert layer.paca_weight.grad.shape == (layer.num_experts, layer.out_features, layer.rank)
        for expert in range(layer.num_experts):
            want = layer.scaling * grad[expert][:, layer.paca_indices[expert]]
            torch.testing.assert_close(layer.paca_weight.grad[expert], want, rtol=1e-5, atol=1e-7)


def test_each_expert_has_its_own_reproducible_columns():
    model = apply_paca(make_tiny_mixtral(), PaCAConfig(rank=4, seed=7))
    for name, layer in expert_layers(model).items():
        rows = [tuple(row.tolist()) for row in layer.paca_indices]
        assert len(set(rows)) > 1  # experts do not share one column set
        for expert, row in enumerate(layer.paca_indices):
            assert torch.equal(row, random_columns(layer.in_features, 4, 7, f"{name}.{expert}"))


def test_backward_saves_only_the_routed_tokens_selected_columns():
    model = apply_paca(make_tiny_mixtral(), PaCAConfig(rank=4, target_modules=["experts"]))
    moe = model.model.layers[0].mlp
    hidden = torch.randn(40, model.config.hidden_size, requires_grad=True)
    with torch.no_grad():
        _, top_k_weights, top_k_index = moe.gate(hidden)
    params = list(moe.experts.parameters())

    def run():
        return moe.experts(hidden, top_k_index, top_k_weights)

    with_paca, _, _ = saved_bytes(run, params)
    for layer in expert_layers(model).values():
        layer.paca_weight.requires_grad_(False)
    frozen, _, _ = saved_bytes(run, params)
    routed = torch.bincount(top_k_index.flatten(), minlength=model.config.num_local_experts)
    assert routed.min() > 0
    # per expert: its routed tokens x r columns x 4 bytes, once for gate_up_proj and once for down_proj
    assert with_paca - frozen == sum(int(n) * 4 * 4 * 2 for n in routed)


def test_merge_unload_disable_and_adapter_round_trip(tmp_path):
    base = make_tiny_mixtral()
    original = {name: tensor.clone() for name, tensor in base.state_dict().items()}
    batch = token_batch()
    model = apply_paca(copy.deepcopy(base), PaCAConfig(rank=4))
    perturb(model)
    with torch.no_grad():
        trained = model(**batch).logits
        with disable_paca(model):
            torch.testing.assert_close(model(**batch).logits, base(**batch).logits, rtol=0, atol=0)
    save_adapter(model, tmp_path)
    loaded = load_adapter(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, trained)
    merged = merge_paca(copy.deepcopy(model))
    assert set(merged.state_dict()) == set(original)
    assert "forward" not in vars(merged.model.layers[0].mlp.experts)
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, trained, rtol=1e-5, atol=1e-6)
    restored = unload_paca(model).state_dict()
    assert set(restored) == set(original)
    assert all(torch.equal(restored[name], original[name]) for name in original)


def test_gradient_checkpointing_gives_the_same_column_gradients():
    batch = token_batch()
    grads = []
    for checkpointing in (False, True):
        model = apply_paca(make_tiny_mixtral(), PaCAConfig(rank=4))
        perturb(model)
        if checkpointing:
            model.activation_checkpointing_enable()
        model.train()
        model(**batch).loss.backward()
        grads.append({name: layer.paca_weight.grad.clone() for name, layer in expert_layers(model).items()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0, atol=0)


def test_config_selects_experts_and_router_by_name():
    only_up = apply_paca(make_tiny_mixtral(), PaCAConfig(rank=4, target_modules=["gate_up_proj"]))
    assert {name.split(".")[-1] for name, _ in paca_layers(only_up)} == {"gate_up_proj"}
    no_experts = apply_paca(make_tiny_mixtral(), PaCAConfig(rank=4, exclude_modules=["experts"]))
    assert not expert_layers(no_experts)
    regex = apply_paca(make_tiny_mixtral(), PaCAConfig(rank=4, target_modules=r".*layers\.1\.mlp\.experts"))
    assert set(expert_layers(regex)) == {"model.layers.1.mlp.experts.gate_up_proj",
                                         "model.layers.1.mlp.experts.down_proj"}
    with pytest.raises(TypeError, match="MixtralTopKRouter"):
        apply_paca(make_tiny_mixtral(), PaCAConfig(rank=4, target_modules=["gate"]))


def test_weight_norm_selection_ranks_columns_per_expert():
    base = make_tiny_mixtral()
    weight = base.model.layers[0].mlp.experts.down_proj.detach().clone()
    model = apply_paca(base, PaCAConfig(rank=4, selection="weight_norm", target_modules=["down_proj"]))
    layer = model.model.layers[0].mlp.experts.down_proj
    for expert in range(weight.shape[0]):
        want = weight[expert].norm(dim=0).topk(4).indices.sort().values
        assert torch.equal(layer.paca_indices[expert], want)


def test_qpaca_refuses_fused_expert_weights_by_name():
    with pytest.raises(ValueError, match=r"quantize='nf4'.*experts\.gate_up_proj.*exclude_modules"):
        apply_paca(make_tiny_mixtral(), PaCAConfig(rank=4, quantize="nf4"))


def test_gradient_selection_ranks_each_experts_columns_by_its_gradient():
    base, batch = make_tiny_mixtral(), token_batch()
    reference = copy.deepcopy(base)
    weight = reference.model.layers[0].mlp.experts.gate_up_proj
    weight.requires_grad_(True)
    reference.eval()
    reference(**batch).loss.backward()
    model = apply_paca(base, PaCAConfig(rank=4, selection="gradient", target_modules=["gate_up_proj"]),
                       calibration=batch)
    layer = model.model.layers[0].mlp.experts.gate_up_proj
    for expert in range(weight.shape[0]):
        want = weight.grad[expert].norm(dim=0).topk(4).indices.sort().values
        assert torch.equal(layer.paca_indices[expert], want)


def test_fsdp1_delta_form_refuses_fused_expert_weights_naming_fsdp2():
    from paca_lightning.parallel import use_delta_form

    with pytest.raises(NotImplementedError, match=r"experts\.gate_up_proj.*FSDP2"):
        use_delta_form(apply_paca(make_tiny_mixtral(), PaCAConfig(rank=4)))
