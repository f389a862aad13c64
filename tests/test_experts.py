"""PaCA on the fused 3-D expert weights of transformers 5 MoE models (tiny Mixtral from a config)."""

import copy

import pytest
import torch

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
from paca_lightning.bench.measure import SavedTensors
from paca_lightning.experts import PaCAExpertWeights
from tests.helpers import make_tiny_mixtral, token_batch

EXPERT_LAYERS = {f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("gate_up_proj", "down_proj")}


def adapted(**config):
    model = apply_paca(make_tiny_mixtral(), PaCAConfig(**{"rank": 4, "alpha": 12, **config}))
    with torch.no_grad():  # away from the pretrained columns, as training would move them
        generator = torch.Generator().manual_seed(7)
        for _, layer in paca_layers(model):
            layer.paca_weight.add_(0.02 * torch.randn(layer.paca_weight.shape, generator=generator))
    return model


def test_all_linear_adapts_every_experts_weight_and_leaves_only_the_router_frozen():
    model = adapted()
    experts = {name for name, layer in paca_layers(model) if isinstance(layer, PaCAExpertWeights)}
    assert experts == EXPERT_LAYERS
    layer = model.model.layers[0].mlp.experts.gate_up_proj
    assert tuple(layer.paca_weight.shape) == (4, 128, 4) and tuple(layer.paca_indices.shape) == (4, 4)
    assert len({tuple(row.tolist()) for row in layer.paca_indices}) > 1  # each expert its own columns
    assert [name for name, _ in trainable_parameters(model).untrained] == ["model.layers.*.mlp.gate.weight"]
    excluded = apply_paca(make_tiny_mixtral(), PaCAConfig(rank=4, exclude_modules=["gate_up_proj", "down_proj"]))
    assert not any(isinstance(layer, PaCAExpertWeights) for _, layer in paca_layers(excluded))


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_every_experts_column_gradient_equals_the_dense_gradient_on_its_columns(checkpointing):
    model = adapted()
    dense = merge_paca(copy.deepcopy(model))
    for name in EXPERT_LAYERS:
        dense.get_parameter(name).requires_grad_(True)
    if checkpointing:
        model.gradient_checkpointing_enable()
        dense.gradient_checkpointing_enable()
    batch = token_batch()
    dense.train()(**batch).loss.backward()
    model.train()(**batch).loss.backward()
    for name in EXPERT_LAYERS:
        layer = model.get_submodule(name)
        expected = dense.get_parameter(name).grad.gather(2, layer.paca_indices.unsqueeze(1).expand(-1, 128 if
                                                         "gate_up" in name else 32, -1))
        torch.testing.assert_close(layer.paca_weight.grad, layer.scaling * expected, rtol=1e-5, atol=1e-7,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_backward_keeps_only_the_selected_columns_of_the_tokens_routed_to_each_expert():
    model = adapted()
    experts = model.model.layers[0].mlp.experts
    frozen = make_tiny_mixtral().model.layers[0].mlp.experts  # the floor: same routing, nothing trained
    frozen.requires_grad_(False).config._experts_implementation = "eager"
    tokens, top_k = 24, 2
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(tokens, 32, generator=generator, requires_grad=True)
    top_k_index = torch.stack([torch.randperm(4, generator=generator)[:top_k] for _ in range(tokens)])
    top_k_weights = torch.rand(tokens, top_k, generator=generator)
    weights = [experts.gate_up_proj.weight, experts.down_proj.weight, *frozen.parameters()]
    with SavedTensors(weights) as paca:
        experts(hidden, top_k_index, top_k_weights)
    with SavedTensors(weights) as floor:
        frozen(hidden, top_k_index, top_k_weights)
    routed = torch.bincount(top_k_index.flatten(), minlength=4)
    assert (routed > 0).all()
    # two projections per expert, each keeping routed tokens x r float32 values
    assert paca.nbytes - floor.nbytes == int(routed.sum()) * 2 * experts.gate_up_proj.rank * 4


def test_merge_unload_disable_and_the_adapter_round_trip_for_experts(tmp_path):
    model = adapted()
    batch = token_batch()
    model.eval()
    with torch.no_grad():
        trained = model(**batch).logits
        with disable_paca(model):
            pretrained = model(**batch).logits
        base = make_tiny_mixtral().eval()
        base.set_experts_implementation("eager")
        torch.testing.assert_close(pretrained, base(**batch).logits, rtol=0, atol=0)
    save_adapter(model, tmp_path / "adapter")
    fresh = load_adapter(make_tiny_mixtral(), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, trained, rtol=0, atol=0)
    merged = merge_paca(copy.deepcopy(model)).eval()
    assert isinstance(merged.model.layers[0].mlp.experts.gate_up_proj, torch.nn.Parameter)
    merged.save_pretrained(tmp_path / "merged")
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, trained, rtol=1e-5, atol=1e-5)
    unload_paca(model)
    for (name, value), expected in zip(model.state_dict().items(), make_tiny_mixtral().state_dict().values()):
        assert torch.equal(value, expected), name


def test_what_experts_cannot_do_is_refused_by_name():
    with pytest.raises(ValueError, match="bitsandbytes quantizes 2-D Linear layers, not fused 3-D expert weights"):
        apply_paca(make_tiny_mixtral(), PaCAConfig(rank=4, quantize="nf4"))
    with pytest.raises(ValueError, match="selection='gradient' is not supported for fused expert weights"):
        apply_paca(make_tiny_mixtral(), PaCAConfig(rank=4, selection="gradient"), calibration=token_batch())
    model = adapted()
    with pytest.raises(RuntimeError, match="used by .*PaCA supports the experts' eager forward"):
        model.model.layers[0].mlp.experts.gate_up_proj[0] * 2


def test_sharding_engines_refuse_adapted_experts_naming_the_way_out():
    from paca_lightning.parallel import shard_paca_model, use_delta_form

    for shard in (shard_paca_model, use_delta_form):
        with pytest.raises(NotImplementedError, match=r"does not shard fused MoE expert weights .*exclude_modules"):
            shard(adapted())


def test_a_lightning_run_trains_the_experts_and_exports_a_merged_model_plain_transformers_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    from paca_lightning import PaCAFineTuneModule
    from tests.lightning_helpers import loader, quiet_trainer, token_examples

    module = PaCAFineTuneModule(make_tiny_mixtral(), PaCAConfig(rank=4, alpha=8), learning_rate=1e-2)
    before = module.model.model.layers[0].mlp.experts.gate_up_proj.paca_weight.detach().clone()
    quiet_trainer(tmp_path, max_steps=3).fit(module, loader(token_examples(8), 2))
    layer = module.model.model.layers[0].mlp.experts.gate_up_proj
    assert not torch.equal(layer.paca_weight, before)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    trained = module.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**token_batch()).logits, trained(**token_batch()).logits,
                                   rtol=1e-5, atol=1e-5)
