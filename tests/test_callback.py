import csv
import math
import re

import pytest
import torch
import yaml
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from transformers import AutoModelForCausalLM

from paca_lightning import PaCACallback, PaCAConfig, PaCAFineTuneModule, load_adapter, paca_layers
from paca_lightning.training import AtomicCheckpointIO, NonFiniteLossError, adapt_for_training, paca_callbacks
from paca_lightning.training.lookup import find_transformers_model
from tests.helpers import make_tiny_llama
from tests.lightning_helpers import assert_columns_in_weights, loader, quiet_trainer, token_examples, trained_columns

CONFIG = PaCAConfig(rank=4, alpha=8)


class ThirdPartyModule(LightningModule):
    """A user's own module: knows nothing about PaCA, builds its model in __init__."""

    def __init__(self):
        super().__init__()
        self.net = make_tiny_llama()

    def training_step(self, batch, batch_idx):
        loss = self.net(**batch).loss
        self.log("loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.net(**batch).loss)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


class BuildsInConfigureModel(ThirdPartyModule):
    """A user's module that creates its model in configure_model (the FSDP-friendly pattern) and,
    since that runs after every callback's setup, adapts it there."""

    def __init__(self, adapt=True):
        LightningModule.__init__(self)
        self.net = None
        self.adapt = adapt

    def configure_model(self):
        if self.net is None:
            self.net = make_tiny_llama()
            if self.adapt:
                adapt_for_training(self.net, CONFIG)


@pytest.mark.parametrize("module_class", [ThirdPartyModule, BuildsInConfigureModel])
def test_a_third_party_module_gets_paca_from_the_callback_alone(tmp_path, module_class):
    module = module_class()
    trainer = quiet_trainer(tmp_path, max_steps=3, callbacks=paca_callbacks(CONFIG))
    trainer.fit(module, loader(token_examples(8), 2))

    layers = dict(paca_layers(module.net))
    assert len(layers) == 14
    assert all(not param.requires_grad for name, param in module.net.named_parameters()
               if not name.endswith("paca_weight"))
    assert any(not torch.equal(layer.paca_weight * layer.scaling, layer.paca_base_columns)
               for layer in layers.values())
    assert_columns_in_weights(module.net)

    module.net.eval()
    batch = token_examples(2, seed=9)[0]
    expected = module.net(input_ids=batch["input_ids"][None]).logits
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")  # plain transformers, no PaCA
    assert not any(True for _ in paca_layers(merged))
    torch.testing.assert_close(merged(input_ids=batch["input_ids"][None]).logits, expected)
    reloaded = load_adapter(make_tiny_llama(), tmp_path / "paca_adapter").eval()
    assert torch.equal(reloaded(input_ids=batch["input_ids"][None]).logits, expected)


def test_a_model_built_in_configure_model_without_paca_is_refused_with_the_fix(tmp_path):
    trainer = quiet_trainer(tmp_path, max_steps=1, callbacks=paca_callbacks(CONFIG))
    with pytest.raises(RuntimeError, match=r"built its model in configure_model without PaCA.*adapt_for_training"):
        trainer.fit(BuildsInConfigureModel(adapt=False), loader(token_examples(4), 2))


def test_no_method_of_the_users_module_is_replaced(tmp_path):
    module = BuildsInConfigureModel()
    before = dict(vars(module))
    quiet_trainer(tmp_path, max_steps=1, callbacks=paca_callbacks(CONFIG, save_merged_on_fit_end=False,
                                                                   save_adapter_on_fit_end=False)).fit(
        module, loader(token_examples(4), 2))
    assert not [name for name, value in vars(module).items() if callable(value) and before.get(name) is not value]


def test_trainer_features_work_together_with_paca(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "checkpoints", monitor="val/loss", save_last=True)
    trainer = quiet_trainer(
        tmp_path, max_steps=12, logger=[CSVLogger(tmp_path, name="csv"), TensorBoardLogger(tmp_path, name="tb")],
        enable_checkpointing=True, enable_progress_bar=True, gradient_clip_val=0.5, val_check_interval=2,
        callbacks=[checkpoint, EarlyStopping(monitor="val/loss", patience=2, mode="min"), *paca_callbacks(CONFIG)])
    module = PaCAFineTuneModule(make_tiny_llama(), CONFIG, learning_rate=1e-2)
    trainer.fit(module, loader(token_examples(32), 2), loader(token_examples(4, seed=7), 2))

    rows = list(csv.DictReader(open(tmp_path / "csv" / "version_0" / "metrics.csv")))
    logged = {key for row in rows for key, value in row.items() if value}
    assert {"train/loss", "train/tokens_per_s", "train/samples_per_s", "train/peak_memory_gb",
            "val/loss", "val/perplexity"} <= logged
    tokens_per_s = [float(row["train/tokens_per_s"]) for row in rows if row["train/tokens_per_s"]]
    trained_steps = {row["step"] for row in rows if row["train/loss"]}
    assert len(tokens_per_s) == len(trained_steps) - 1  # every logged step but the unmeasured first one
    hparams = yaml.safe_load(open(tmp_path / "csv" / "version_0" / "hparams.yaml"))
    assert hparams["paca/trainable_params"] == sum(
        layer.paca_weight.numel() for _, layer in paca_layers(module.model))
    assert list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    assert checkpoint.best_model_path and (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert not list((tmp_path / "checkpoints").glob(".*.partial"))


def _checkpoint_size(tmp_path, adapter_only):
    trainer = quiet_trainer(tmp_path, max_steps=2, enable_checkpointing=True,
                            callbacks=paca_callbacks(CONFIG, adapter_only_checkpoints=adapter_only,
                                                     save_merged_on_fit_end=False))
    trainer.fit(PaCAFineTuneModule(make_tiny_llama(), CONFIG), loader(token_examples(4), 2))
    path, = (tmp_path / "checkpoints").parent.rglob("*.ckpt")
    return path.stat().st_size, torch.load(path, weights_only=True)


def test_adapter_only_checkpoints_hold_only_trainable_tensors_and_are_much_smaller(tmp_path):
    adapter_bytes, adapter_checkpoint = _checkpoint_size(tmp_path / "adapter", adapter_only=True)
    full_bytes, full_checkpoint = _checkpoint_size(tmp_path / "full", adapter_only=False)
    assert all(key.endswith(".paca_weight") for key in adapter_checkpoint["state_dict"])
    assert len(adapter_checkpoint["state_dict"]) == 14
    assert "model.lm_head.weight" in full_checkpoint["state_dict"]
    print(f"adapter-only checkpoint {adapter_bytes} B, full {full_bytes} B, ratio {adapter_bytes / full_bytes:.3f}")
    assert adapter_bytes * 3 < full_bytes


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    class DivergesAtStepThree(PaCAFineTuneModule):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * math.inf if self.global_step == 3 else loss

    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_last=True)
    module = DivergesAtStepThree(make_tiny_llama(), CONFIG, learning_rate=1e-2)
    trainer = quiet_trainer(tmp_path, max_steps=6, enable_checkpointing=True, callbacks=[checkpoint])
    with pytest.raises(NonFiniteLossError, match=r"loss is inf at global step 3.*last good checkpoint is .*last"):
        trainer.fit(module, loader(token_examples(16), 2))
    last = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert last["global_step"] == 3
    for name, columns in trained_columns(module.model).items():
        assert torch.isfinite(columns).all()
        assert torch.equal(last["state_dict"][f"model.{name}.paca_weight"], columns)  # no step on the inf loss


@pytest.mark.parametrize("what", ["gradient", "parameter"])
def test_non_finite_gradients_or_weights_stop_the_run_before_the_step_is_checkpointed(tmp_path, what):
    """A finite loss whose gradients overflow (e.g. a huge learning rate) must not reach the weights,
    and a step that makes a weight non-finite must not reach a checkpoint."""

    class BreaksAtStepThree(PaCAFineTuneModule):
        def on_after_backward(self):
            if self.global_step == 3 and what == "gradient":
                next(p for p in self.parameters() if p.requires_grad).grad[0, 0] = math.nan

        def optimizer_step(self, *args, **kwargs):
            super().optimizer_step(*args, **kwargs)
            if self.global_step == 3 and what == "parameter":  # the step that becomes global step 4
                with torch.no_grad():
                    next(p for p in self.parameters() if p.requires_grad)[0, 0] = math.inf

    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_last=True)
    module = BreaksAtStepThree(make_tiny_llama(), CONFIG, learning_rate=1e-2)
    trainer = quiet_trainer(tmp_path, max_steps=6, enable_checkpointing=True, callbacks=[checkpoint])
    expected = "the gradient of model.* is not finite at global step 3" if what == "gradient" else \
        "the optimizer step left model.* with non-finite values at global step 4"
    with pytest.raises(NonFiniteLossError, match=expected + r".*last good checkpoint is .*last"):
        trainer.fit(module, loader(token_examples(16), 2))
    last = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert last["global_step"] == 3
    assert all(torch.isfinite(value).all() for value in last["state_dict"].values())


@pytest.mark.parametrize("change, message", [
    (dict(config=PaCAConfig(rank=4, alpha=8, seed=1)), r"another PaCAConfig \(seed: checkpoint 0, this run 1\)"),
    (dict(config=PaCAConfig(rank=4, alpha=16)), r"another PaCAConfig \(alpha: checkpoint 8, this run 16\)"),
    (dict(config=PaCAConfig(rank=2, alpha=8)), r"another PaCAConfig \(rank: checkpoint 4, this run 2\)"),
    (dict(base_seed=5), r"trained on another base model: its pretrained columns differ"),
], ids=["seed", "alpha", "rank", "base"])
def test_resuming_another_runs_checkpoint_is_refused_naming_what_differs(tmp_path, change, message):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = quiet_trainer(tmp_path, max_steps=2, enable_checkpointing=True, callbacks=[checkpoint])
    trainer.fit(PaCAFineTuneModule(make_tiny_llama(), CONFIG), loader(token_examples(4), 2))
    resumed = quiet_trainer(tmp_path, max_steps=4)
    module = PaCAFineTuneModule(make_tiny_llama(seed=change.get("base_seed", 0)), change.get("config", CONFIG))
    with pytest.raises(ValueError, match=message):
        resumed.fit(module, loader(token_examples(4), 2), ckpt_path=tmp_path / "last.ckpt")


def test_callback_and_module_with_different_configs_are_refused(tmp_path):
    trainer = quiet_trainer(tmp_path, max_steps=1, callbacks=[PaCACallback(PaCAConfig(rank=2))])
    with pytest.raises(ValueError, match="use one PaCAConfig for the module and the callback"):
        trainer.fit(PaCAFineTuneModule(make_tiny_llama(), CONFIG), loader(token_examples(4), 2))


def test_adapt_for_training_leaves_an_adapted_model_alone():
    model = adapt_for_training(make_tiny_llama(), CONFIG)
    layers = dict(paca_layers(model))
    assert adapt_for_training(model, CONFIG) is model and dict(paca_layers(model)) == layers


def test_the_model_is_found_by_type_or_by_the_attribute_named():
    class TwoModels(LightningModule):
        def __init__(self):
            super().__init__()
            self.student, self.teacher = make_tiny_llama(), make_tiny_llama(seed=1)

    module = TwoModels()
    with pytest.raises(ValueError, match=r"several transformers models \['student', 'teacher'\]"):
        find_transformers_model(module)
    assert find_transformers_model(module, "teacher") is module.teacher
    with pytest.raises(AttributeError, match=r"no submodule 'pupil'.*\['student', 'teacher'\]"):
        find_transformers_model(module, "pupil")
    with pytest.raises(ValueError, match="exposes no transformers model"):
        find_transformers_model(LightningModule())


def test_callback_requires_a_paca_config():
    with pytest.raises(TypeError, match="needs a PaCAConfig, got dict"):
        PaCACallback({"rank": 4})


def test_a_qpaca_run_exports_a_dense_merged_model_equal_to_the_trained_one(tmp_path):
    module = PaCAFineTuneModule(make_tiny_llama(), PaCAConfig(rank=4, alpha=8, quantize="nf4"), learning_rate=1e-2)
    quiet_trainer(tmp_path, max_steps=2).fit(module, loader(token_examples(4), 2))
    module.model.eval()
    input_ids = token_examples(1, seed=3)[0]["input_ids"][None]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert all(type(layer).__name__ == "Linear" for layer in merged.model.layers[0].mlp.children()
               if hasattr(layer, "weight"))
    torch.testing.assert_close(merged(input_ids=input_ids).logits, module.model(input_ids=input_ids).logits)


def test_checkpointed_runs_are_warned_about_data_loaders_that_cannot_resume_exactly(tmp_path):
    from torchdata.stateful_dataloader import StatefulDataLoader

    def fit_with(data):
        trainer = quiet_trainer(tmp_path, max_steps=1, enable_checkpointing=True,
                                callbacks=paca_callbacks(CONFIG, save_merged_on_fit_end=False))
        trainer.fit(ThirdPartyModule(), data)

    with pytest.warns(UserWarning, match="has no state_dict.*StatefulDataLoader"):
        fit_with(loader(token_examples(4), 2))
    with pytest.warns(UserWarning, match="was given generator="):
        fit_with(StatefulDataLoader(token_examples(4), batch_size=2, shuffle=True,
                                    generator=torch.Generator().manual_seed(0)))
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit_with(StatefulDataLoader(token_examples(4), batch_size=2, shuffle=True))
    assert not [w for w in caught if "PaCACheckpointing" in str(w.message)]


@pytest.mark.parametrize("progress_lines", [True, False])
def test_plain_progress_lines_show_step_loss_throughput_and_eta(tmp_path, capsys, progress_lines):
    module = PaCAFineTuneModule(make_tiny_llama(), CONFIG, learning_rate=1e-3)
    callbacks = paca_callbacks(CONFIG, progress_lines=progress_lines, save_adapter_on_fit_end=False,
                               save_merged_on_fit_end=False)
    quiet_trainer(tmp_path, max_steps=6, log_every_n_steps=2, callbacks=callbacks).fit(
        module, loader(token_examples(12), 2))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    if not progress_lines:
        assert lines == []
        return
    # the first batch is warm-up, so the first window closes at step 2
    assert [line.split(" |")[0] for line in lines] == ["step 2/6 (33%)", "step 4/6 (67%)", "step 6/6 (100%)"]
    pattern = r"step \d/6 \(\d+%\) \| loss \d+\.\d{4} \| [\d,]+ tokens/s \| [\d.,]+ samples/s \| peak [\d.]+ GB \| " \
              r"\d:\d\d:\d\d, ETA \d:\d\d:\d\d$"
    assert all(re.match(pattern, line) for line in lines), lines


def test_a_merged_export_interrupted_by_a_full_disk_leaves_no_merged_folder(tmp_path, monkeypatch):
    from paca_lightning.training import save_merged

    model = adapt_for_training(make_tiny_llama(), CONFIG)
    original = type(model).save_pretrained

    def full_disk_after_the_config(self, folder, **kwargs):
        self.config.save_pretrained(folder)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(model), "save_pretrained", full_disk_after_the_config)
    with pytest.raises(OSError, match="No space left"):
        save_merged(model, tmp_path / "merged")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(type(model), "save_pretrained", original)
    save_merged(model, tmp_path / "merged")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged") is not None


def test_a_checkpoint_whose_trained_tensors_changed_on_disk_is_refused(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = quiet_trainer(tmp_path, max_steps=2, enable_checkpointing=True, callbacks=[checkpoint])
    trainer.fit(PaCAFineTuneModule(make_tiny_llama(), CONFIG), loader(token_examples(4), 2))
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert saved["paca"]["trained_sha256"] is not None
    tensor = next(iter(saved["state_dict"].values()))
    tensor.view(-1)[0] = tensor.view(-1)[0] + 1e-3  # a few flipped bits inside the data
    torch.save(saved, tmp_path / "last.ckpt")
    resumed = quiet_trainer(tmp_path, max_steps=4)
    with pytest.raises(ValueError, match="do not match the checksum recorded when it was saved"):
        resumed.fit(PaCAFineTuneModule(make_tiny_llama(), CONFIG), loader(token_examples(4), 2),
                    ckpt_path=tmp_path / "last.ckpt")
