"""``activation_checkpointing="auto"``: the fewest decoder layers a memory budget needs, exact gradients."""

import json

import pytest
import torch

from paca_lightning import PaCAConfig, PaCAFineTuneModule, apply_paca
from paca_lightning.planning import count_saved, total_with_checkpointing
from paca_lightning.training.lora import LoRASettings
from tests.helpers import make_tiny_llama
from tests.lightning_helpers import loader, quiet_trainer, token_examples, trained_columns

LAYERS = 6
CONFIG = PaCAConfig(rank=8, alpha=16)


def tiny_model():
    return make_tiny_llama(num_hidden_layers=LAYERS, hidden_size=128, intermediate_size=256)


def fit(tmp_path, method="paca", steps=1, **options):
    lora = dict(method="lora", lora=LoRASettings(rank=4, alpha=8)) if method == "lora" else {}
    module = PaCAFineTuneModule(tiny_model(), CONFIG, learning_rate=1e-2, **lora, **options)
    quiet_trainer(tmp_path, max_steps=steps).fit(module, loader(token_examples(8, length=48), 4))
    return module


def checkpointed(module) -> list[bool]:
    layers = module._transformers_model().model.layers
    return [layer.gradient_checkpointing for layer in layers]


def test_auto_checkpoints_the_fewest_first_layers_the_budget_needs_and_trains_exactly(tmp_path):
    roomy = fit(tmp_path / "roomy", activation_checkpointing="auto", memory_budget_gb=1000)
    assert checkpointed(roomy) == [False] * LAYERS
    plan = roomy.checkpointing_plan
    assert plan.count == 0 and (plan.batch_size, plan.sequence_length) == (4, 48)
    # a budget one byte short of what two checkpointed layers need: three are checkpointed
    budget = plan.planned_bytes(2) - 1
    assert plan.planned_bytes(3) <= budget
    tight = fit(tmp_path / "tight", steps=3, activation_checkpointing="auto", memory_budget_gb=budget / 1e9)
    assert checkpointed(tight) == [True] * 3 + [False] * (LAYERS - 3)
    plain = fit(tmp_path / "plain", steps=3)
    columns, expected = trained_columns(tight.model), trained_columns(plain.model)
    for name in expected:
        torch.testing.assert_close(columns[name], expected[name], rtol=1e-5, atol=1e-6)


def test_at_one_budget_paca_checkpoints_fewer_layers_than_lora(tmp_path):
    lora = fit(tmp_path / "lora", method="lora", activation_checkpointing="auto", memory_budget_gb=1000)
    budget = lora.checkpointing_plan.planned_bytes(2)  # LoRA needs 2 layers here
    assert lora.checkpointing_plan.planned_bytes(1) > budget
    paca = fit(tmp_path / "paca", activation_checkpointing="auto", memory_budget_gb=budget / 1e9)
    lora = fit(tmp_path / "lora2", method="lora", activation_checkpointing="auto", memory_budget_gb=budget / 1e9)
    assert sum(checkpointed(lora)) == 2
    assert sum(checkpointed(paca)) < 2
    per_layer = [plan.checkpointing_plan.plan.saved_per_layer_bytes[-1] for plan in (paca, lora)]
    assert per_layer[0] < 0.85 * per_layer[1]  # PaCA saves x_S where LoRA saves x and its r-wide A x


def test_a_budget_nothing_fits_names_the_figures(tmp_path):
    with pytest.raises(ValueError, match=r"needs .* GB on a device even with all 6 decoder layers checkpointed.*"
                                         r"over the budget of 0.0000 GB.*memory_budget_gb"):
        fit(tmp_path, activation_checkpointing="auto", memory_budget_gb=1e-6)


def test_planned_peak_models_the_recomputation_of_the_first_layers():
    from paca_lightning.planning import MethodPlan

    plan = MethodPlan("x", saved_bytes=0, saved_per_layer_bytes=[10, 10, 10], head_and_loss_bytes=5,
                      layer_input_per_layer_bytes=[1, 1, 1], layer_input_bytes=3, weight_bytes=100, gradient_bytes=0,
                      optimizer_state_bytes=0, total_bytes=0, total_checkpointed_bytes=0, trainable_parameters=0)
    assert total_with_checkpointing(plan, 0) == 100 + 5 + 30
    assert total_with_checkpointing(plan, 1) == 100 + 5 + 1 + 20  # recomputing layer 0 alone: 10
    assert total_with_checkpointing(plan, 3) == 100 + max(5 + 3, 1 + 1 + 10)  # the last recomputation tops it
    assert total_with_checkpointing(plan, 3, persistent_bytes=7) == 7 + 12


def test_qpaca_saves_what_paca_saves_so_auto_plans_it_as_paca():
    pytest.importorskip("bitsandbytes")
    ids = torch.randint(0, 128, (2, 16))
    counts = []
    for quantize in (None, "nf4"):
        model = apply_paca(make_tiny_llama(), PaCAConfig(rank=8, alpha=16, quantize=quantize))
        counts.append(count_saved(model, lambda model=model: model(input_ids=ids, labels=ids).loss))
    assert counts[0] == counts[1]


@pytest.mark.parametrize("options, message", [
    (dict(activation_checkpointing="some"), "choose True .* 'auto' .* or False"),
    (dict(activation_checkpointing=True, memory_budget_gb=40), "read only with activation_checkpointing='auto'"),
    (dict(activation_checkpointing="auto", memory_budget_gb=0), "memory_budget_gb=0"),
    (dict(activation_checkpointing="auto", gradient_checkpointing=True), "give only activation_checkpointing"),
])
def test_bad_checkpointing_settings_are_refused(options, message):
    with pytest.raises((ValueError, TypeError), match=message):
        PaCAFineTuneModule(make_tiny_llama(), CONFIG, **options)


def test_the_former_name_still_turns_every_layer_on():
    module = PaCAFineTuneModule(make_tiny_llama(), CONFIG, gradient_checkpointing=True)
    assert module.activation_checkpointing is True
    assert module.hparams["activation_checkpointing"] is True and "gradient_checkpointing" not in module.hparams
    assert all(layer.gradient_checkpointing for layer in module.model.model.layers)


def test_auto_on_a_cpu_needs_a_budget(tmp_path):
    with pytest.raises(ValueError, match="on a 'cpu' device needs memory_budget_gb"):
        fit(tmp_path, activation_checkpointing="auto")


def test_checkpointing_benchmark_reports_fewer_paca_layers_exact_gradients_and_the_plan_bytes(capsys):
    from paca_lightning.bench import checkpointing

    assert checkpointing.main(["--model", "llama-50m", "--batch-size", "1", "--sequence-length", "64",
                               "--lora-layers", "1", "--warmup", "0", "--repeats", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    paca, lora = result["methods"]["paca"], result["methods"]["lora"]
    assert lora["checkpointed_layers"] == 1 and paca["checkpointed_layers"] == 0
    assert paca["planned_activation_peak_bytes"] <= result["activation_budget_bytes"]
    for entry in (paca, lora):
        assert entry["max_gradient_difference"] == 0.0
        # the plan also counts a checkpointed layer's int64 position ids (64 x 8 bytes), which autograd does not save
        difference = entry["measured_saved_bytes"] - entry["planned_saved_bytes"]
        assert -entry["checkpointed_layers"] * 64 * 8 - 8 <= difference <= 0
    assert result["step_time_ratio_paca_over_lora"] > 0


def test_checkpointing_in_both_the_module_and_the_fsdp2_strategy_is_refused():
    from types import SimpleNamespace

    from paca_lightning.training import PaCAModelParallelStrategy

    module = PaCAFineTuneModule(make_tiny_llama(), CONFIG, activation_checkpointing="auto", memory_budget_gb=10)
    module._trainer = SimpleNamespace(strategy=PaCAModelParallelStrategy(activation_checkpointing=True))
    with pytest.raises(ValueError, match="would checkpoint each layer twice"):
        module.configure_model()
    module._trainer = SimpleNamespace(strategy=PaCAModelParallelStrategy())
    module.configure_model()


def test_auto_plans_a_qpaca_run_counting_its_packed_weights_and_quantization_states(tmp_path):
    pytest.importorskip("bitsandbytes")
    from paca_lightning.planning import model_state_bytes
    from paca_lightning.quantized import QuantizedPaCALinear
    from paca_lightning.training.activation_checkpointing import device_persistent_bytes

    module = PaCAFineTuneModule(tiny_model(), PaCAConfig(rank=8, alpha=16, quantize="nf4"), learning_rate=1e-2,
                                activation_checkpointing="auto", memory_budget_gb=1000)
    quiet_trainer(tmp_path, max_steps=1).fit(module, loader(token_examples(8, length=48), 4))
    model = module.model
    tensors = [*model.parameters(), *model.buffers()]
    storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors}
    trained = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    states = model_state_bytes(model) - sum(storages.values())
    quantized = sum(isinstance(layer, QuantizedPaCALinear) for layer in model.modules())
    assert quantized == 7 * LAYERS and states >= quantized * 256 * 4  # at least each layer's float32 code table
    assert module.checkpointing_plan.persistent_bytes == device_persistent_bytes(model) == \
        sum(storages.values()) + states + 3 * trained
    assert checkpointed(module) == [False] * LAYERS


def test_a_batch_longer_than_the_plan_is_warned_about_once(tmp_path):
    examples = token_examples(4, length=16) + token_examples(4, length=48)  # the second batch is longer
    module = PaCAFineTuneModule(tiny_model(), CONFIG, activation_checkpointing="auto", memory_budget_gb=1000)
    with pytest.warns(UserWarning, match=r"planned for batches of 4 x 16 tokens, but batch 1 has 4 x 48"):
        quiet_trainer(tmp_path, max_steps=2).fit(module, loader(examples, 4))
