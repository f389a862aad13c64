import copy

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from paca_lightning import (
    PaCAConfig,
    PaCALinear,
    apply_paca,
    disable_paca,
    merge_paca,
    paca_layers,
    set_paca_auto_sync,
    sync_paca_columns,
    trainable_parameters,
    unload_paca,
)
from paca_lightning.selection import random_columns
from tests.helpers import make_tiny_falcon, make_tiny_gpt2, make_tiny_llama, make_tiny_mixtral, token_batch

LLAMA_LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def dense_column_gradients(paca_model, batch, checkpointing: bool):
    """Gradients of the merged (dense) twin w.r.t. each adapted weight, restricted to its columns."""
    dense = merge_paca(copy.deepcopy(paca_model))
    names = [name for name, _ in paca_layers(paca_model)]
    for name in names:
        dense.get_submodule(name).weight.requires_grad_(True)
    if checkpointing:
        dense.activation_checkpointing_enable()
    dense.train()
    dense(**batch).loss.backward()
    grads = {}
    for name, layer in paca_layers(paca_model):
        weight_grad = dense.get_submodule(name).weight.grad
        grads[name] = (weight_grad.index_select(0, layer.paca_indices).t() if layer.transposed
                       else weight_grad.index_select(1, layer.paca_indices))
    return grads


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "falcon"])
def test_every_layer_gradient_equals_dense_gradient_on_its_columns(family, checkpointing):
    model = {"llama": make_tiny_llama, "gpt2": make_tiny_gpt2, "falcon": make_tiny_falcon}[family]()
    bias = "none" if family == "llama" else "all"
    apply_paca(model, PaCAConfig(rank=4, alpha=12, bias=bias))
    with torch.no_grad():  # move away from the pretrained columns so the check is not trivial
        for _, layer in paca_layers(model):
            layer.paca_weight.add_(0.01 * torch.randn_like(layer.paca_weight))
    batch = token_batch()
    expected = dense_column_gradients(model, batch, checkpointing)
    layers = dict(paca_layers(model))
    forward_calls = []
    next(iter(layers.values())).register_forward_hook(lambda *args: forward_calls.append(1))
    if checkpointing:
        model.activation_checkpointing_enable()
    model.train()
    model(**batch).loss.backward()
    assert len(forward_calls) == (2 if checkpointing else 1)  # recompute really happened
    assert len(layers) == {"llama": 14, "gpt2": 8, "falcon": 8}[family]
    for name, layer in layers.items():
        torch.testing.assert_close(layer.paca_weight.grad, layer.scaling * expected[name],
                                   rtol=1e-5, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")


def adamw_steps(model, batches, lr=1e-2):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    for batch in batches:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def test_training_changes_only_the_selected_columns():
    model = apply_paca(make_tiny_llama(), PaCAConfig(rank=4))
    before = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    adamw_steps(model, [token_batch(seed=s) for s in range(3)])
    model.eval()
    with torch.no_grad():
        model(**token_batch())  # a forward brings the weights up to date
    layer_of_weight = {f"{name}.weight": layer for name, layer in paca_layers(model)}
    for name, param in model.named_parameters():
        if name not in before:
            continue
        if name in layer_of_weight:
            layer = layer_of_weight[name]
            mask = torch.ones(layer.in_features, dtype=torch.bool)
            mask[layer.paca_indices] = False
            assert torch.equal(param[:, mask], before[name][:, mask]), name
            assert not torch.equal(param[:, ~mask], before[name][:, ~mask]), name
        else:
            assert torch.equal(param, before[name]), name


def test_merged_model_logits_equal_paca_eval_logits(tmp_path):
    model = adamw_steps(apply_paca(make_tiny_llama(), PaCAConfig(rank=4)), [token_batch(seed=s) for s in range(2)])
    model.eval()
    batch = token_batch(seed=9)
    with torch.no_grad():
        paca_logits = model(input_ids=batch["input_ids"]).logits
    merged = merge_paca(model)
    assert not any(isinstance(m, PaCALinear) for m in merged.modules())
    assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=batch["input_ids"]).logits, paca_logits, rtol=0, atol=0)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=batch["input_ids"]).logits, paca_logits, rtol=0, atol=0)


def test_gradient_accumulation_over_three_micro_batches_equals_one_large_batch():
    full = token_batch(batch_size=6, seed=4)
    micro = [{k: v[i * 2:(i + 1) * 2] for k, v in full.items()} for i in range(3)]
    large = apply_paca(make_tiny_llama(), PaCAConfig(rank=4))
    accumulated = copy.deepcopy(large)
    # SGD keeps float-rounding differences at rounding size (Adam's normalisation would blow up
    # the sign of near-zero gradients), so gradients and weights can be compared tightly.
    opt_large = torch.optim.SGD([p for p in large.parameters() if p.requires_grad], lr=0.5)
    opt_acc = torch.optim.SGD([p for p in accumulated.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        large(**full).loss.backward()
        for batch in micro:  # equal-size micro batches: mean of means is the large-batch mean
            (accumulated(**batch).loss / 3).backward()
        for (name, a), (_, b) in zip(paca_layers(large), paca_layers(accumulated)):
            torch.testing.assert_close(b.paca_weight.grad, a.paca_weight.grad, rtol=1e-4, atol=1e-7,
                                       msg=lambda m, name=name: f"{name}: {m}")
        opt_large.step()
        opt_large.zero_grad()
        opt_acc.step()
        opt_acc.zero_grad()
    for (name, a), (_, b) in zip(paca_layers(large), paca_layers(accumulated)):
        torch.testing.assert_close(b.paca_weight, a.paca_weight, rtol=1e-5, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_eval_forward_between_steps_changes_nothing():
    plain = apply_paca(make_tiny_llama(), PaCAConfig(rank=4))
    with_eval = copy.deepcopy(plain)
    batches = [token_batch(seed=s) for s in range(3)]
    adamw_steps(plain, batches)
    params = [p for p in with_eval.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    for batch in batches:
        with_eval(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        with_eval.eval()
        with torch.no_grad():
            with_eval(**token_batch(seed=99))
        with_eval.train()
    for (_, a), (_, b) in zip(paca_layers(plain), paca_layers(with_eval)):
        assert torch.equal(a.paca_weight, b.paca_weight)


def test_all_linear_targets_every_linear_except_output_head():
    model = apply_paca(make_tiny_llama(), PaCAConfig(rank=4))
    names = {name for name, _ in paca_layers(model)}
    assert {name.split(".")[-1] for name in names} == LLAMA_LINEARS
    assert type(model.lm_head) is nn.Linear and not model.lm_head.weight.requires_grad
    gpt2 = apply_paca(make_tiny_gpt2(), PaCAConfig(rank=4))
    assert {n.split(".")[-1] for n, _ in paca_layers(gpt2)} == {"c_attn", "c_proj", "c_fc"}


def test_target_list_regex_exclude_and_patterns():
    config = PaCAConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                        exclude_modules=r".*layers\.1\.mlp\..*", rank_pattern={"v_proj": 2},
                        alpha_pattern={r"layers\.0\.self_attn\.q_proj": 16})
    model = apply_paca(make_tiny_llama(), config)
    layers = dict(paca_layers(model))
    assert set(layers) == {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                           "model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj",
                           "model.layers.1.self_attn.v_proj"}
    assert layers["model.layers.0.self_attn.v_proj"].rank == 2
    assert layers["model.layers.0.self_attn.q_proj"].scaling == 4.0
    assert layers["model.layers.1.self_attn.q_proj"].scaling == 2.0
    regex = apply_paca(make_tiny_llama(), PaCAConfig(rank=4, target_modules=r".*\.(k|o)_proj"))
    assert {n.split(".")[-1] for n, _ in paca_layers(regex)} == {"k_proj", "o_proj"}


def test_only_paca_columns_train_unless_bias_all():
    model = apply_paca(make_tiny_llama(), PaCAConfig(rank=4))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(name.endswith(".paca_weight") for name in trainable)
    gpt2 = apply_paca(make_tiny_gpt2(), PaCAConfig(rank=4, bias="all"))
    trainable = {name for name, p in gpt2.named_parameters() if p.requires_grad}
    assert "transformer.h.0.attn.c_attn.bias" in trainable and "transformer.h.0.ln_1.bias" in trainable
    assert "transformer.h.0.ln_1.weight" not in trainable


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_trainable_report_counts_like_peft_with_the_models_own_parameter_count(quantize):
    own_count = sum(p.numel() for p in make_tiny_llama().parameters())
    model = apply_paca(make_tiny_llama(), PaCAConfig(rank=4, quantize=quantize))
    report = trainable_parameters(model)
    expected_trainable = sum(layer.out_features * 4 for _, layer in paca_layers(model))
    assert report.trainable == expected_trainable
    assert report.total == own_count  # the trained columns live in weights counted already
    assert str(report) == (f"trainable params: {expected_trainable:,d} || all params: {report.total:,d} "
                           f"|| trainable%: {100 * expected_trainable / report.total:.4f}")


def test_report_names_the_weight_matrices_left_untrained_with_their_share():
    model = apply_paca(make_tiny_mixtral(), PaCAConfig(rank=4, exclude_modules=["experts"]))
    report = trainable_parameters(model)
    experts = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    untrained = dict(report.untrained)
    assert set(untrained) == {"model.layers.*.mlp.experts.gate_up_proj", "model.layers.*.mlp.experts.down_proj",
                              "model.layers.*.mlp.gate.weight"}
    assert untrained["model.layers.*.mlp.experts.gate_up_proj"] + untrained[
        "model.layers.*.mlp.experts.down_proj"] == experts
    share = 100 * sum(untrained.values()) / report.total
    assert f"not trained: {share:.1f}% of all params" in str(report)
    assert "model.layers.*.mlp.experts.gate_up_proj (" in str(report)
    # a dense model with every linear layer adapted leaves nothing to report
    assert trainable_parameters(apply_paca(make_tiny_llama(), PaCAConfig(rank=4))).untrained == ()


class ScaledLinear(nn.Linear):
    """A Linear subclass with a forward of its own: adapting it would silently drop the scale."""

    def forward(self, x):
        return 2.0 * super().forward(x)


class MixedLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.plain = nn.Linear(8, 8)
        self.scaled = ScaledLinear(8, 8)
        self.attention = nn.MultiheadAttention(8, 2)  # out_proj is torch's NonDynamicallyQuantizableLinear

    def forward(self, x):
        return self.attention(self.scaled(self.plain(x)), x, x)[0]


def test_linear_subclasses_with_the_plain_forward_are_adapted_and_others_refused_by_name():
    model = apply_paca(MixedLinears(), PaCAConfig(rank=2))
    assert sorted(name for name, _ in paca_layers(model)) == ["attention.out_proj", "plain"]
    with pytest.raises(TypeError) as refused:
        apply_paca(MixedLinears(), PaCAConfig(rank=2, target_modules=["plain", "scaled"]))
    message = str(refused.value)
    assert f"'scaled' is a {ScaledLinear.__module__}.ScaledLinear" in message
    assert "forward of its own" in message
    assert message.endswith("e.g. ['out_proj', 'plain']")  # never suggests the module it refused


def test_unload_restores_the_pretrained_model_bit_for_bit():
    reference = make_tiny_llama()
    model = adamw_steps(apply_paca(copy.deepcopy(reference), PaCAConfig(rank=4, alpha=24)),
                        [token_batch(seed=s) for s in range(2)])
    with disable_paca(model):
        model.eval()
        with torch.no_grad():
            disabled = model(**token_batch(seed=5)).logits
            base = reference.eval()(**token_batch(seed=5)).logits
        torch.testing.assert_close(disabled, base, rtol=0, atol=0)
    unload_paca(model)
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name


def test_random_selection_depends_only_on_seed_and_module_name():
    config = PaCAConfig(rank=4, seed=7)
    torch.manual_seed(123)
    all_layers = dict(paca_layers(apply_paca(make_tiny_llama(), config)))
    torch.manual_seed(456)
    subset = dict(paca_layers(apply_paca(make_tiny_llama(), PaCAConfig(rank=4, seed=7,
                                                                        target_modules=["v_proj"]))))
    for name, layer in subset.items():
        assert torch.equal(layer.paca_indices, all_layers[name].paca_indices)
    assert torch.equal(random_columns(64, 4, 7, "x"), random_columns(64, 4, 7, "x"))
    assert not torch.equal(random_columns(64, 4, 7, "x"), random_columns(64, 4, 8, "x"))
    q0, q1 = (all_layers[f"model.layers.{i}.self_attn.q_proj"].paca_indices for i in (0, 1))
    assert not torch.equal(q0, q1)


def test_weight_norm_selection_picks_largest_columns():
    model = make_tiny_llama()
    q_proj = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        q_proj.weight[:, [3, 17, 40]] *= 100
    apply_paca(model, PaCAConfig(rank=3, selection="weight_norm", target_modules=["layers.0.self_attn.q_proj"]))
    assert model.model.layers[0].self_attn.q_proj.paca_indices.tolist() == [3, 17, 40]


def test_gradient_selection_picks_largest_gradient_columns():
    model = make_tiny_llama()
    batch = token_batch(seed=2)
    dense = copy.deepcopy(model)
    dense(**batch).loss.backward()
    column_norms = dense.model.layers[1].mlp.down_proj.weight.grad.norm(dim=0)
    expected = torch.topk(column_norms, 5).indices.sort().values
    apply_paca(model, PaCAConfig(rank=5, selection="gradient", target_modules=["down_proj"]), calibration=batch)
    assert torch.equal(model.model.layers[1].mlp.down_proj.paca_indices, expected)
    assert all(p.grad is None for p in model.parameters())
    gpt2 = apply_paca(make_tiny_gpt2(), PaCAConfig(rank=4, selection="gradient", bias="all"),
                      calibration=token_batch(seed=2))
    assert all(p.grad is None for p in gpt2.parameters())  # calibration leaves nothing to accumulate on
    with pytest.raises(ValueError, match="needs apply_paca"):
        apply_paca(make_tiny_llama(), PaCAConfig(rank=5, selection="gradient"))
    with pytest.raises(ValueError, match="no 'labels' key"):
        apply_paca(make_tiny_llama(), PaCAConfig(rank=5, selection="gradient"),
                   calibration={"input_ids": batch["input_ids"]})


def test_unknown_target_name_lists_close_matches():
    with pytest.raises(ValueError, match=r"'q_prj' matches no module.*close matches: \['q_proj'"):
        apply_paca(make_tiny_llama(), PaCAConfig(target_modules=["q_prj"]))
    with pytest.raises(ValueError, match="selects no module"):
        apply_paca(make_tiny_llama(), PaCAConfig(target_modules=r"nothing\..*"))


def test_non_linear_target_is_rejected_by_name_and_type():
    with pytest.raises(TypeError, match=r"'model.layers.0.mlp' is a .*LlamaMLP.*nn.Linear"):
        apply_paca(make_tiny_llama(), PaCAConfig(target_modules=["layers.0.mlp"]))


def test_applying_twice_is_rejected():
    model = apply_paca(make_tiny_llama(), PaCAConfig(rank=4))
    with pytest.raises(RuntimeError, match="already applied.*merge_paca"):
        apply_paca(model, PaCAConfig(rank=4))


def test_rank_above_in_features_names_the_module():
    with pytest.raises(ValueError, match=r"rank 65 for module 'model.layers.0.self_attn.q_proj' exceeds "
                                         r"its in_features=64"):
        apply_paca(make_tiny_llama(), PaCAConfig(rank=65))


def test_without_auto_sync_columns_move_only_on_explicit_sync():
    model = apply_paca(make_tiny_llama(), PaCAConfig(rank=4))
    set_paca_auto_sync(model, False)
    layer = model.model.layers[0].self_attn.q_proj
    before = layer.weight.detach().clone()
    with torch.no_grad():
        layer.paca_weight.add_(1.0)
        model(**token_batch())
    assert torch.equal(layer.weight, before)  # forward trusted the (stale) columns
    sync_paca_columns(model)
    assert torch.equal(layer.weight.index_select(1, layer.paca_indices), layer.scaling * layer.paca_weight)


def _columns_in_weights(model) -> bool:
    return all(torch.equal(layer._read_columns(), (layer.paca_weight * layer.scaling).to(layer.weight.dtype))
               for _, layer in paca_layers(model))


@pytest.mark.parametrize("update", ["fused_adamw", "data_write"])
def test_updates_that_autograd_does_not_see_still_reach_the_weight(update):
    # Fused optimizers (and 8-bit ones, and .data writes) change paca_weight without bumping its
    # autograd version: every forward must still compute with the updated columns.
    reference = apply_paca(make_tiny_llama(seed=2), PaCAConfig(rank=4, alpha=8))
    model = apply_paca(make_tiny_llama(seed=2), PaCAConfig(rank=4, alpha=8))
    batch = token_batch()
    if update == "fused_adamw":
        optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, **options)
                      for m, options in ((reference, {"foreach": False}), (model, {"fused": True}))]
        for _ in range(3):
            for trained, optimizer in zip((reference, model), optimizers):
                trained(**batch).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
        with torch.no_grad():
            torch.testing.assert_close(model(**batch).logits, reference(**batch).logits, rtol=1e-4, atol=1e-5)
    else:
        layer = model.model.layers[0].self_attn.q_proj
        versions = layer.paca_weight._version
        layer.paca_weight.data.mul_(3.0)
        assert layer.paca_weight._version == versions  # invisible to version counters
        with torch.no_grad():
            model(**batch)
    assert _columns_in_weights(model)


def test_a_reference_forward_under_disable_paca_between_forward_and_backward_changes_no_gradient():
    # The DPO / KL-to-reference pattern: policy forward, reference forward with PaCA disabled,
    # then the policy's backward.
    model = apply_paca(make_tiny_llama(seed=4), PaCAConfig(rank=4, alpha=8))
    perturb = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in paca_layers(model):
            layer.paca_weight.add_(torch.randn(layer.paca_weight.shape, generator=perturb) * 0.05)
    batch = token_batch()
    model(**batch).loss.backward()
    expected = {name: layer.paca_weight.grad.clone() for name, layer in paca_layers(model)}
    model.zero_grad()

    loss = model(**batch).loss
    with disable_paca(model), torch.no_grad():
        base_logits = model(**batch).logits
    loss.backward()
    for name, layer in paca_layers(model):
        torch.testing.assert_close(layer.paca_weight.grad, expected[name], rtol=0, atol=0, msg=name)
    with torch.no_grad():
        assert not torch.equal(model(**batch).logits, base_logits)


def test_a_target_whose_weight_is_tied_to_another_module_is_refused():
    model = make_tiny_llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with pytest.raises(ValueError, match=r"'lm_head' shares its weight with \['model.embed_tokens.weight'\].*"
                                         r"tie_word_embeddings=False"):
        apply_paca(model, PaCAConfig(rank=4, target_modules=["lm_head"]))
    apply_paca(model, PaCAConfig(rank=4))  # "all-linear" leaves the output head out
    assert not isinstance(model.lm_head, PaCALinear)


@pytest.mark.parametrize("target", ["first", "second"])
def test_a_module_registered_under_two_names_is_refused_under_either(target):
    model = nn.Module()
    model.first = model.second = nn.Linear(8, 8)
    other = "second" if target == "first" else "first"
    with pytest.raises(ValueError, match=f"module '{target}' is also registered as \\['{other}'\\]"):
        apply_paca(model, PaCAConfig(rank=2, target_modules=[target]))


def test_gradient_selection_does_not_depend_on_dropout_or_the_global_random_state():
    from transformers import GPT2Config, GPT2LMHeadModel

    def selected(global_seed):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64,
                                           resid_pdrop=0.3, embd_pdrop=0.3, attn_pdrop=0.3)).train()
        torch.manual_seed(global_seed)
        apply_paca(model, PaCAConfig(rank=4, selection="gradient"), calibration=token_batch(seed=2))
        assert model.training and all(m.training for m in model.modules())  # modes restored
        return {name: layer.paca_indices for name, layer in paca_layers(model)}

    first, second = selected(1), selected(2)
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_a_model_whose_weights_are_not_materialized_is_refused():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(ValueError, match="module '0' has its weight on the meta device.*before apply_paca"):
        apply_paca(model, PaCAConfig(rank=2, target_modules=["0"]))
