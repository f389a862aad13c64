import math

import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from transformers import AutoModelForCausalLM

from paca_lightning import PaCAConfig, PaCAFineTuneModule, paca_layers
from paca_lightning.training.module import warmup_cosine_factor
from tests.helpers import make_tiny_llama
from tests.lightning_helpers import assert_columns_in_weights, loader, quiet_trainer, token_examples, trained_columns

CONFIG = PaCAConfig(rank=4, alpha=8)


def _fit(tmp_path, examples, batch_size=2, module_options=None, val_examples=None, model=None, **trainer_options):
    module = PaCAFineTuneModule(model or make_tiny_llama(), CONFIG, learning_rate=1e-2, **(module_options or {}))
    trainer = quiet_trainer(tmp_path, **{"max_steps": 4, **trainer_options})
    val = loader(val_examples, 2) if val_examples is not None else None
    trainer.fit(module, loader(examples, batch_size), val)
    return module, trainer


def _assert_same_columns(first, second, exact=True):
    assert first.keys() == second.keys()
    for name in first:
        if exact:
            assert torch.equal(first[name], second[name]), name
        else:
            torch.testing.assert_close(first[name], second[name], rtol=1e-4, atol=1e-6)


def test_fit_trains_only_the_paca_columns_and_keeps_them_in_the_weights(tmp_path):
    base = make_tiny_llama().state_dict()
    module, _ = _fit(tmp_path, token_examples(8))
    assert_columns_in_weights(module.model)
    changed = [name for name, layer in paca_layers(module.model)
               if not torch.equal(layer.paca_weight * layer.scaling, layer.paca_base_columns)]
    assert len(changed) == 14  # 7 linear layers x 2 decoder layers
    state = module.model.state_dict()
    for key, value in base.items():
        if key in state and key.endswith("weight") and "proj" not in key:
            assert torch.equal(state[key], value), key  # embeddings, norms, head: frozen


def test_training_lowers_the_loss_on_a_repeated_batch(tmp_path):
    examples = token_examples(2) * 10
    module = PaCAFineTuneModule(make_tiny_llama(), CONFIG, learning_rate=3e-2)
    module.configure_model()
    batch = loader(examples[:2], 2).__iter__().__next__()
    before = module.compute_loss(batch).item()
    quiet_trainer(tmp_path, max_steps=8).fit(module, loader(examples, 2))
    assert module.compute_loss(batch).item() < before - 0.1


def test_gradient_accumulation_of_four_equals_a_four_times_larger_batch(tmp_path):
    examples = token_examples(16)
    accumulated, _ = _fit(tmp_path / "a", examples, batch_size=1, accumulate_grad_batches=4, max_steps=3)
    large, _ = _fit(tmp_path / "b", examples, batch_size=4, max_steps=3)
    _assert_same_columns(trained_columns(accumulated.model), trained_columns(large.model), exact=False)


def test_validation_between_steps_does_not_change_training(tmp_path):
    examples = token_examples(16)
    plain, _ = _fit(tmp_path / "a", examples, max_steps=6, limit_val_batches=0,
                    model=make_tiny_llama(attention_dropout=0.3))  # dropout: the RNG must not drift either
    validated, trainer = _fit(tmp_path / "b", examples, max_steps=6, val_examples=token_examples(4, seed=5),
                              val_check_interval=2, model=make_tiny_llama(attention_dropout=0.3))
    _assert_same_columns(trained_columns(plain.model), trained_columns(validated.model))
    assert trainer.callback_metrics["val/perplexity"] == pytest.approx(
        math.exp(trainer.callback_metrics["val/loss"]), rel=1e-5)


def test_validation_loss_is_the_token_weighted_mean_over_batches(tmp_path):
    val_examples = token_examples(4, seed=3, masked_prompt=0)
    for example in val_examples[2:]:
        example["labels"][:8] = -100  # second batch scores far fewer tokens
    module = PaCAFineTuneModule(make_tiny_llama(), CONFIG)
    trainer = quiet_trainer(tmp_path)
    trainer.validate(module, loader(val_examples, 2))
    batches = list(loader(val_examples, 2))
    losses = [module.compute_loss(batch).item() for batch in batches]
    counts = [(batch["labels"][:, 1:] != -100).sum().item() for batch in batches]
    expected = sum(loss * count for loss, count in zip(losses, counts)) / sum(counts)
    assert trainer.callback_metrics["val/loss"].item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_training_runs_and_keeps_the_invariant(tmp_path, precision):
    if precision == "16-mixed":  # Lightning maps 16-mixed to bf16 on CPU; force fp16 autocast + GradScaler
        options = dict(plugins=[MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))])
    else:
        options = dict(precision=precision)
    module, trainer = _fit(tmp_path, token_examples(8), max_steps=3, **options)
    if precision == "16-mixed":
        assert trainer.precision_plugin.scaler.get_scale() > 0
    assert math.isfinite(trainer.callback_metrics["train/loss"].item())
    assert_columns_in_weights(module.model)
    assert all(layer.paca_weight.dtype == torch.float32 for _, layer in paca_layers(module.model))
    assert any(not torch.equal(layer.paca_weight * layer.scaling, layer.paca_base_columns)
               for _, layer in paca_layers(module.model))


def test_chunked_loss_trains_like_the_dense_loss(tmp_path):
    examples = token_examples(8, masked_prompt=3)
    dense, _ = _fit(tmp_path / "a", examples, max_steps=3)
    chunked, _ = _fit(tmp_path / "b", examples, max_steps=3,
                      module_options=dict(chunked_loss=True, loss_chunk_size=5))
    _assert_same_columns(trained_columns(dense.model), trained_columns(chunked.model), exact=False)


def test_activation_checkpointing_trains_like_the_plain_model(tmp_path):
    examples = token_examples(8)
    plain, _ = _fit(tmp_path / "a", examples, max_steps=3)
    recomputed, _ = _fit(tmp_path / "b", examples, max_steps=3, module_options=dict(activation_checkpointing=True))
    assert recomputed.model.is_activation_checkpointing
    _assert_same_columns(trained_columns(plain.model), trained_columns(recomputed.model), exact=False)


def test_weight_decay_pulls_columns_toward_their_pretrained_values(tmp_path):
    module = PaCAFineTuneModule(make_tiny_llama(), CONFIG, learning_rate=0.1, weight_decay=0.5)
    module.configure_model()
    offsets = {}
    with torch.no_grad():
        for name, layer in paca_layers(module.model):
            offsets[name] = torch.full_like(layer.paca_weight, 0.25)
            layer.paca_weight.add_(offsets[name])
    examples = token_examples(2)
    for example in examples:
        example["labels"][:] = -100  # zero loss, zero gradients: only the decay moves the columns
    quiet_trainer(tmp_path, max_steps=1).fit(module, loader(examples, 2))
    for name, layer in paca_layers(module.model):
        pretrained = layer.paca_base_columns / layer.scaling
        torch.testing.assert_close(layer.paca_weight - pretrained, offsets[name] * (1 - 0.1 * 0.5))


def test_learning_rate_warms_up_linearly_then_follows_a_cosine_to_the_floor():
    factors = [warmup_cosine_factor(step, 4, 14, 0.1) for step in range(15)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == 1.0 and factors[9] == pytest.approx(0.55) and factors[14] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[4:], factors[5:]))


def test_scheduler_steps_once_per_optimizer_step(tmp_path):
    module, trainer = _fit(tmp_path, token_examples(16), batch_size=1, accumulate_grad_batches=2, max_steps=4,
                           module_options=dict(warmup_steps=2))
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.last_epoch == 4
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-2 * warmup_cosine_factor(4, 2, 4, 0.0))


def test_a_named_model_is_loaded_in_configure_model_and_generates(tmp_path):
    from paca_lightning.data.tokenizer import build_byte_level_tokenizer

    tokenizer = build_byte_level_tokenizer(["hello world, the quick brown fox"] * 4, vocab_size=300)
    model = make_tiny_llama(vocab_size=len(tokenizer))
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    module = PaCAFineTuneModule(str(tmp_path / "base"), CONFIG, dtype="bfloat16")
    assert module.model is None
    module.configure_model()
    assert module.model.dtype == torch.bfloat16 and len(list(paca_layers(module.model))) == 14
    assert module.model.training  # from_pretrained's eval mode would silently switch dropout off
    text = module.generate("hello", max_new_tokens=5)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.bfloat16)
    ids = tokenizer("hello", return_tensors="pt")
    expected = reference.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert text == tokenizer.decode(expected[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_configure_model_twice_keeps_one_adaptation():
    module = PaCAFineTuneModule(make_tiny_llama(), CONFIG)
    module.configure_model()
    layers = dict(paca_layers(module.model))
    module.configure_model()
    assert dict(paca_layers(module.model)) == layers


def test_batches_without_labels_are_rejected_with_the_expected_keys():
    module = PaCAFineTuneModule(make_tiny_llama(), CONFIG)
    module.configure_model()
    with pytest.raises(ValueError, match=r"dicts with 'input_ids' and 'labels'.*\['input_ids'\]"):
        module.compute_loss({"input_ids": torch.zeros(1, 4, dtype=torch.long)})


def test_hyperparameters_round_trip_through_a_checkpoint_dict():
    module = PaCAFineTuneModule("some/model", CONFIG, learning_rate=1e-3, warmup_steps=3)
    restored = PaCAFineTuneModule(**module.hparams)
    assert restored.paca == CONFIG and restored.learning_rate == 1e-3 and restored.model_name == "some/model"


@pytest.mark.parametrize("arguments, error, match", [
    (dict(learning_rate=0.0), ValueError, r"learning_rate=0.0\) is out of range"),
    (dict(weight_decay=-1.0), ValueError, "weight_decay"),
    (dict(min_lr_ratio=1.5), ValueError, "min_lr_ratio"),
    (dict(warmup_steps=-2), ValueError, "warmup_steps"),
    (dict(loss_chunk_size=0), ValueError, "loss_chunk_size"),
    (dict(betas=(0.9, 1.0)), ValueError, "betas"),
    (dict(paca=PaCAConfig(selection="gradient")), ValueError, "calibration"),
    (dict(model=3), TypeError, "model name/path or an nn.Module"),
])
def test_invalid_arguments_are_rejected_with_the_argument_named(arguments, error, match):
    with pytest.raises(error, match=match):
        PaCAFineTuneModule(**{"model": "some/model", **arguments})


def test_chunked_loss_refuses_models_with_transformed_logits():
    module = PaCAFineTuneModule(make_tiny_llama(), CONFIG, chunked_loss=True)
    module.configure_model()
    module.model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping=30.0"):
        module.compute_loss(token_examples(1)[0] | {"input_ids": torch.zeros(1, 4, dtype=torch.long),
                                                    "labels": torch.zeros(1, 4, dtype=torch.long)})


@pytest.mark.slow
def test_compiled_model_trains_like_the_eager_one_and_syncs_columns_outside_forward(tmp_path):
    examples = token_examples(8)
    eager, _ = _fit(tmp_path / "a", examples, max_steps=3)
    compiled, _ = _fit(tmp_path / "b", examples, max_steps=3, module_options=dict(compile=True))
    assert not any(layer.auto_sync for _, layer in paca_layers(compiled.model))
    assert_columns_in_weights(compiled.model)  # written by the callback after each optimizer step
    _assert_same_columns(trained_columns(eager.model), trained_columns(compiled.model), exact=False)


def test_a_truncated_weights_file_is_named_with_its_model(tmp_path):
    make_tiny_llama().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"could not load model '{tmp_path}': a .safetensors file of it is truncated"):
        PaCAFineTuneModule(str(tmp_path)).configure_model()
