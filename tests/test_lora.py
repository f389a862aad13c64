"""`PaCAFineTuneModule(method="lora")`: peft LoRA on the PaCA training path, for comparisons."""

import re
import sys

import pytest
import torch
from lightning.pytorch import Callback, seed_everything
from torchdata.stateful_dataloader import StatefulDataLoader
from transformers import AutoModelForCausalLM

from paca_lightning import PaCACallback, PaCAConfig, PaCAFineTuneModule, paca_layers
from paca_lightning.training.lora import LORA_ADAPTER_DIRNAME, LoRASettings
from tests.helpers import make_tiny_llama
from tests.lightning_helpers import loader, quiet_trainer, token_examples
from tests.test_recipes import RECIPES, printed_path, run_recipe

pytest.importorskip("peft")
SETTINGS = LoRASettings(rank=4, alpha=8)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matrices gain nothing from a second thread, and spin-waiting OpenMP threads make each
    step many times slower on a loaded machine (measured here: this file 52 s -> 8 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _lora_module(settings=SETTINGS, **options):
    return PaCAFineTuneModule(make_tiny_llama(), method="lora", lora=settings, learning_rate=3e-2, **options)


def test_lora_trains_only_the_lora_matrices_and_lowers_the_loss_on_a_repeated_batch(tmp_path):
    base = make_tiny_llama().state_dict()
    module = _lora_module()
    module.configure_model()
    batch = next(iter(loader(token_examples(2), 2)))
    before = module.compute_loss(batch).item()
    trainable = [name for name, param in module.model.named_parameters() if param.requires_grad]
    assert len(trainable) == 28 and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    assert next(paca_layers(module.model), None) is None
    quiet_trainer(tmp_path, max_steps=8).fit(module, loader(token_examples(2) * 10, 2))
    assert module.compute_loss(batch).item() < before - 0.1
    for key, value in module.model.get_base_model().state_dict().items():  # the base is frozen
        if ".lora_" not in key:
            assert torch.equal(value, base[key.replace(".base_layer", "")]), key


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_fit_end_exports_a_peft_adapter_and_a_merged_model_plain_transformers_loads(tmp_path, quantize):
    from peft import PeftModel

    module = _lora_module(LoRASettings(rank=4, alpha=8, quantize=quantize))
    quiet_trainer(tmp_path, max_steps=3).fit(module, loader(token_examples(8), 2))
    input_ids = token_examples(2, seed=7)[0]["input_ids"][None]
    # Train mode (no dropout in this model): bitsandbytes' CPU repacking of 4-bit weights on eval
    # no-grad forwards fails for layers this small.
    with torch.no_grad():
        expected = module.model.train()(input_ids=input_ids).logits
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
        torch.testing.assert_close(merged(input_ids=input_ids).logits, expected, rtol=1e-4, atol=1e-5)
        if quantize is None:  # the adapter on a fresh copy of the base is the trained model
            base = make_tiny_llama()
            adapted = PeftModel.from_pretrained(base, tmp_path / LORA_ADAPTER_DIRNAME)
            torch.testing.assert_close(adapted(input_ids=input_ids).logits, expected)


class _RecordBatches(Callback):
    def __init__(self):
        self.batches = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(batch["input_ids"].clone())


def test_lora_and_paca_runs_train_on_the_same_batches_in_the_same_order(tmp_path):
    """Shuffled over two epochs, with the per-batch seeding both methods' callbacks apply."""
    recorded = []
    for name, module in (("paca", PaCAFineTuneModule(make_tiny_llama(), PaCAConfig(rank=4, alpha=8))),
                         ("lora", _lora_module())):
        seed_everything(0)
        recorder = _RecordBatches()
        trainer = quiet_trainer(tmp_path / name, max_steps=6, callbacks=[recorder])
        trainer.fit(module, StatefulDataLoader(token_examples(6), batch_size=2, shuffle=True))
        recorded.append(recorder.batches)
    assert len(recorded[0]) == 6 and all(torch.equal(a, b) for a, b in zip(*recorded))


def test_lora_initialisation_depends_on_its_seed_only_and_leaves_the_global_rng_alone():
    def lora_a_after(global_seed, settings):
        module = PaCAFineTuneModule(make_tiny_llama(), method="lora", lora=settings)
        torch.manual_seed(global_seed)
        expected_next = torch.random.get_rng_state()
        module.configure_model()
        assert torch.equal(torch.random.get_rng_state(), expected_next)
        return torch.cat([param.detach().flatten() for name, param in module.model.named_parameters()
                          if ".lora_A." in name])

    assert torch.equal(lora_a_after(1, SETTINGS), lora_a_after(2, SETTINGS))
    assert not torch.equal(lora_a_after(1, SETTINGS), lora_a_after(1, LoRASettings(rank=4, alpha=8, seed=1)))


def test_chunked_loss_reaches_the_hidden_states_inside_the_peft_wrapper():
    module = _lora_module(chunked_loss=True, loss_chunk_size=5)
    module.configure_model()
    batch = next(iter(loader(token_examples(2, masked_prompt=3), 2)))
    dense = module.compute_loss(batch)
    module.chunked_loss = False
    torch.testing.assert_close(dense, module.compute_loss(batch))


def test_lora_settings_round_trip_through_the_hyperparameters():
    module = PaCAFineTuneModule("some/model", method="lora", lora=LoRASettings(rank=2, quantize="nf4"))
    restored = PaCAFineTuneModule(**module.hparams)
    assert restored.method == "lora" and restored.lora == module.lora


@pytest.mark.parametrize("arguments, error, match", [
    (dict(method="ia3"), ValueError, r"method='ia3'.*'paca' or 'lora'"),
    (dict(lora=LoRASettings()), ValueError, "method='lora'"),
    (dict(method="lora", lora=PaCAConfig()), TypeError, "LoRASettings, got PaCAConfig"),
])
def test_invalid_method_arguments_are_rejected(arguments, error, match):
    with pytest.raises(error, match=match):
        PaCAFineTuneModule("some/model", **arguments)


@pytest.mark.parametrize("field, value", [("rank", 0), ("alpha", -1.0), ("dropout", 1.0), ("quantize", "int4"),
                                          ("seed", "0")])
def test_invalid_lora_settings_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"LoRASettings\.{field}"):
        LoRASettings(**{field: value})


def test_a_target_that_matches_nothing_is_named_with_the_lora_settings():
    with pytest.raises(ValueError, match=r"LoRASettings.target_modules entry 'q_prj'.*close matches: \['q_proj'"):
        _lora_module(LoRASettings(target_modules=["q_prj"]))  # a model given as a module is adapted at once


def test_lora_without_peft_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # makes `import peft` raise ImportError
    with pytest.raises(ImportError, match=r"pip install peft"):
        PaCAFineTuneModule("some/model", method="lora")


def test_lora_refuses_a_paca_callback_in_the_trainer(tmp_path):
    trainer = quiet_trainer(tmp_path, max_steps=1, callbacks=[PaCACallback(PaCAConfig(rank=2))])
    with pytest.raises(ValueError, match="Remove the PaCACallback"):
        trainer.fit(_lora_module(), loader(token_examples(2), 2))


@pytest.mark.slow
def test_demo_lora_config_runs_through_the_recipe_and_reports_like_paca(tmp_path):
    output = run_recipe("oasst1.py", "--config", str(RECIPES / "configs" / "demo_oasst1_lora.yaml"),
                        "--trainer.max_steps=3", "--trainer.val_check_interval=3", "--report.max_new_tokens=4",
                        tmp_path=tmp_path)
    assert "LoRA: trainable params:" in output and "tokens/s" in output
    assert printed_path(output, "adapter").name == LORA_ADAPTER_DIRNAME
    assert (printed_path(output, "adapter") / "adapter_config.json").exists()
    assert AutoModelForCausalLM.from_pretrained(printed_path(output, "merged model")) is not None


@pytest.mark.parametrize("config", sorted((RECIPES / "configs").glob("*.yaml")), ids=lambda path: path.name)
def test_every_recipe_config_parses(config, capsys, monkeypatch):
    recipe = "mmlu" if "mmlu" in config.name else "oasst1"
    monkeypatch.syspath_prepend(str(RECIPES))
    monkeypatch.setattr(sys, "argv", [f"{recipe}.py"])
    module = __import__(recipe)
    with pytest.raises(SystemExit) as exit_:
        module.main(["--config", str(config), "--print_config"])
    assert exit_.value.code in (0, None)
    printed = capsys.readouterr().out
    method = re.search(r"^  method: (\w+)$", printed, re.MULTILINE).group(1)
    assert method == ("lora" if "lora" in config.name else "paca")


def test_lora_baseline_refuses_fused_expert_weights_and_names_the_fix():
    from paca_lightning.training.lora import apply_lora
    from tests.helpers import make_tiny_mixtral

    with pytest.raises(ValueError, match=r"experts\.gate_up_proj.*exclude_modules=\['experts'\]"):
        apply_lora(make_tiny_mixtral(), LoRASettings(rank=4))
    wrapped = apply_lora(make_tiny_mixtral(), LoRASettings(rank=4, exclude_modules=["experts"]))
    assert any("lora_A" in name for name, _ in wrapped.named_parameters())
