"""Intel Gaudi wiring, tested on CPU with a stand-in runtime (tests/fake_habana.py).

Nothing here runs on Gaudi hardware. The stand-in imitates the names of Intel's bridge that
paca_lightning calls; these tests prove what Lightning builds from them: registration, the
accelerator/strategy/precision a ``Trainer`` picks for 1 and N cards, the HCCL process-group
setup, lazy-mode step boundaries through a real ``fit``, and the error without Gaudi software.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap

import fake_habana
import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.accelerators import AcceleratorRegistry, CPUAccelerator
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.plugins import HalfPrecision, MixedPrecision, Precision
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader

import paca_lightning
from paca_lightning import PaCAConfig, apply_paca, paca_layers
from paca_lightning.accelerators import (
    GaudiSoftwareNotFoundError,
    HPUAccelerator,
    HPUDDPStrategy,
    HPUFSDPStrategy,
    RunAfterImport,
    SingleHPUStrategy,
    SynchronizedThroughputMonitor,
    reporting,
    strategies,
    synchronize_device,
)
from tests.helpers import make_tiny_llama

QUIET = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


@pytest.fixture
def gaudi(monkeypatch):
    return fake_habana.install(monkeypatch, devices=8)


@pytest.fixture
def no_gaudi_software(monkeypatch):
    fake_habana.remove(monkeypatch)


# ---------------------------------------------------------------- registration


def test_hpu_accelerator_and_strategies_are_registered_with_lightning_after_import():
    assert paca_lightning.accelerators is not None
    assert AcceleratorRegistry["hpu"]["accelerator"] is HPUAccelerator
    assert StrategyRegistry["hpu_single"]["strategy"] is SingleHPUStrategy
    assert StrategyRegistry["hpu_ddp"]["strategy"] is HPUDDPStrategy
    assert StrategyRegistry["hpu_fsdp"]["strategy"] is HPUFSDPStrategy


@pytest.mark.slow
def test_importing_paca_lightning_first_registers_hpu_once_lightning_is_imported():
    script = textwrap.dedent("""
        import sys
        import paca_lightning
        import lightning.pytorch
        from lightning.pytorch.accelerators import AcceleratorRegistry
        from lightning.pytorch.strategies import StrategyRegistry
        print(AcceleratorRegistry["hpu"]["accelerator"].__module__,
              sorted(name for name in StrategyRegistry if name.startswith("hpu")))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["paca_lightning.accelerators.hpu", "['hpu_ddp',", "'hpu_fsdp',", "'hpu_single']"]


def test_importing_the_accelerators_after_lightning_registers_hpu_at_once():
    assert "lightning.pytorch" in sys.modules  # imported at the top of this file
    # The registries' own get() instantiates entries, so entries are moved with dict.pop.
    saved_accelerator = AcceleratorRegistry.pop("hpu")
    saved_strategies = {name: StrategyRegistry.pop(name) for name in ("hpu_single", "hpu_ddp", "hpu_fsdp")}
    hooks_before = list(sys.meta_path)
    try:
        importlib.reload(paca_lightning.accelerators)
        assert AcceleratorRegistry["hpu"]["accelerator"] is HPUAccelerator
        assert {name: StrategyRegistry[name]["strategy"] for name in saved_strategies} == {
            "hpu_single": SingleHPUStrategy, "hpu_ddp": HPUDDPStrategy, "hpu_fsdp": HPUFSDPStrategy}
        assert sys.meta_path == hooks_before  # nothing left waiting for an import
    finally:
        AcceleratorRegistry["hpu"] = saved_accelerator
        StrategyRegistry.update(saved_strategies)


def test_import_hook_runs_after_the_module_body_and_removes_itself(tmp_path, monkeypatch):
    (tmp_path / "paca_hook_target.py").write_text("VALUE = 41 + 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    hook = RunAfterImport("paca_hook_target", lambda: seen.append(sys.modules["paca_hook_target"].VALUE))
    monkeypatch.setattr(sys, "meta_path", [hook, *sys.meta_path])
    monkeypatch.delitem(sys.modules, "paca_hook_target", raising=False)
    import paca_hook_target  # noqa: F401

    assert seen == [42]
    assert hook not in sys.meta_path


def test_import_hook_stays_armed_when_the_import_fails(tmp_path, monkeypatch):
    target = tmp_path / "paca_hook_broken.py"
    target.write_text("raise ImportError('broken on purpose')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    hook = RunAfterImport("paca_hook_broken", lambda: seen.append("ran"))
    monkeypatch.setattr(sys, "meta_path", [hook, *sys.meta_path])
    with pytest.raises(ImportError, match="broken on purpose"):
        import paca_hook_broken  # noqa: F401
    assert seen == [] and hook in sys.meta_path

    target.write_text("OK = True\n")
    monkeypatch.delitem(sys.modules, "paca_hook_broken", raising=False)
    import paca_hook_broken  # noqa: F401,F811

    assert seen == ["ran"] and hook not in sys.meta_path


# ---------------------------------------------------------------- without Gaudi software


def test_trainer_on_hpu_without_gaudi_software_names_what_to_install(no_gaudi_software):
    with pytest.raises(GaudiSoftwareNotFoundError) as raised:
        Trainer(accelerator="hpu", **QUIET)
    message = str(raised.value)
    assert "habana_frameworks.torch" in message
    assert "Intel Gaudi software" in message and "docker/hpu/Dockerfile" in message
    assert isinstance(raised.value, ModuleNotFoundError)


def test_without_gaudi_software_auto_still_picks_the_cpu(no_gaudi_software):
    assert not HPUAccelerator.is_available()
    assert isinstance(Trainer(**QUIET).accelerator, CPUAccelerator)


def test_gaudi_software_without_a_visible_card_says_how_to_expose_one(monkeypatch):
    fake_habana.install(monkeypatch, devices=0)
    with pytest.raises(MisconfigurationException, match="--runtime=habana -e HABANA_VISIBLE_DEVICES=all"):
        Trainer(accelerator="hpu", **QUIET)


# ---------------------------------------------------------------- accelerator and strategy choice


def test_one_card_builds_the_hpu_accelerator_and_the_single_hpu_strategy(gaudi):
    trainer = Trainer(accelerator="hpu", devices=1, **QUIET)
    assert isinstance(trainer.accelerator, HPUAccelerator)
    assert type(trainer.strategy) is SingleHPUStrategy
    assert trainer.strategy.root_device == torch.device("hpu")
    assert type(trainer.precision_plugin) is Precision
    assert trainer.num_devices == 1


def test_n_cards_build_ddp_over_hccl_with_one_process_per_card(gaudi):
    trainer = Trainer(accelerator="hpu", devices=4, **QUIET)
    strategy = trainer.strategy
    assert type(strategy) is HPUDDPStrategy
    assert strategy.parallel_devices == [torch.device("hpu")] * 4
    assert strategy.process_group_backend == "hccl"
    assert strategy.determine_ddp_device_ids() is None
    assert isinstance(strategy.launcher, _SubprocessScriptLauncher)
    assert strategy.launcher.num_processes == 4 and strategy.world_size == 4


def test_devices_auto_uses_every_visible_card(gaudi):
    trainer = Trainer(accelerator="hpu", devices="auto", **QUIET)
    assert type(trainer.strategy) is HPUDDPStrategy and trainer.num_devices == 8


def test_one_card_on_each_of_several_nodes_is_ddp(gaudi):
    trainer = Trainer(accelerator="hpu", devices=1, num_nodes=2, **QUIET)
    assert type(trainer.strategy) is HPUDDPStrategy and trainer.strategy.world_size == 2


def test_auto_accelerator_picks_hpu_when_a_gaudi_card_is_visible(gaudi):
    trainer = Trainer(devices=1, **QUIET)
    assert isinstance(trainer.accelerator, HPUAccelerator)
    assert type(trainer.strategy) is SingleHPUStrategy


def test_fsdp2_and_explicit_instances_are_selectable_by_name_or_object(gaudi):
    fsdp = Trainer(accelerator="hpu", devices=4, strategy="hpu_fsdp", **QUIET).strategy
    assert type(fsdp) is HPUFSDPStrategy and fsdp.process_group_backend == "hccl"
    assert fsdp.parallel_devices == [torch.device("hpu")] * 4
    chosen = HPUDDPStrategy(find_unused_parameters=True)
    assert Trainer(accelerator="hpu", devices=2, strategy=chosen, **QUIET).strategy is chosen


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "deepspeed", "ddp_spawn", DDPStrategy()],
                         ids=["ddp", "fsdp", "deepspeed", "ddp_spawn", "DDPStrategy"])
def test_a_non_hpu_strategy_on_hpu_is_refused_naming_the_hpu_choices(gaudi, strategy):
    with pytest.raises(MisconfigurationException, match="'hpu_ddp'.*'hpu_fsdp'"):
        Trainer(accelerator="hpu", devices=2, strategy=strategy, **QUIET)


def test_an_hpu_strategy_on_another_accelerator_is_refused(gaudi):
    with pytest.raises(MisconfigurationException, match="accelerator='hpu'"):
        Trainer(accelerator="cpu", devices=2, strategy="hpu_ddp", **QUIET)


@pytest.mark.parametrize("devices, message", [
    (9, "exposes 8 Gaudi card"),
    ([0, 1], "HABANA_VISIBLE_MODULES"),
    ("two", "number of cards"),
])
def test_devices_must_be_a_count_of_visible_cards(gaudi, devices, message):
    with pytest.raises(MisconfigurationException, match=message):
        Trainer(accelerator="hpu", devices=devices, **QUIET)


def test_devices_given_as_text_are_a_count(gaudi):
    assert Trainer(accelerator="hpu", devices="2", **QUIET).num_devices == 2


# ---------------------------------------------------------------- precision


def test_bf16_mixed_on_hpu_autocasts_for_device_type_hpu(gaudi):
    plugin = Trainer(accelerator="hpu", devices=1, precision="bf16-mixed", **QUIET).precision_plugin
    assert type(plugin) is MixedPrecision and plugin.device == "hpu" and plugin.scaler is None


def test_bf16_true_on_hpu_converts_the_module_to_bf16(gaudi):
    plugin = Trainer(accelerator="hpu", devices=1, precision="bf16-true", **QUIET).precision_plugin
    assert type(plugin) is HalfPrecision and plugin._desired_input_dtype == torch.bfloat16


@pytest.mark.parametrize("precision", ["16-mixed", "64-true"])
def test_other_precisions_on_hpu_are_refused_naming_the_supported_ones(gaudi, precision):
    with pytest.raises(MisconfigurationException, match="32-true, bf16-mixed, bf16-true"):
        Trainer(accelerator="hpu", devices=1, precision=precision, **QUIET)


# ---------------------------------------------------------------- launch environment


def _recorded_process_group(monkeypatch, trainer):
    calls = []
    monkeypatch.setattr(strategies, "_init_dist_connection",
                        lambda environment, backend, **kwargs: calls.append((environment, backend, kwargs)))
    return calls


def test_ddp_joins_the_process_group_over_hccl_without_a_device_index(gaudi, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("NODE_RANK", "1")
    trainer = Trainer(accelerator="hpu", devices=4, num_nodes=2, **QUIET)
    calls = _recorded_process_group(monkeypatch, trainer)
    trainer.strategy.setup_distributed()
    [(environment, backend, kwargs)] = calls
    assert backend == "hccl" and "device_id" not in kwargs
    assert (environment.global_rank(), environment.world_size()) == (5, 8)
    assert trainer.strategy.global_rank == 5


def test_multi_card_training_without_hccl_names_what_to_install(gaudi, monkeypatch):
    monkeypatch.setitem(sys.modules, "habana_frameworks.torch.distributed.hccl", None)
    trainer = Trainer(accelerator="hpu", devices=2, **QUIET)
    _recorded_process_group(monkeypatch, trainer)
    with pytest.raises(GaudiSoftwareNotFoundError, match="HCCL"):
        trainer.strategy.setup_distributed()


def test_fsdp2_on_hpu_shards_over_every_rank_of_the_job_by_default(gaudi, monkeypatch):
    trainer = Trainer(accelerator="hpu", devices=4, num_nodes=2, strategy="hpu_fsdp", **QUIET)
    calls = _recorded_process_group(monkeypatch, trainer)
    meshes = []
    monkeypatch.setattr("lightning.pytorch.strategies.model_parallel._setup_device_mesh",
                        lambda *args: meshes.append(args) or "mesh")
    trainer.strategy.connect(BoringModel())
    trainer.strategy.setup_environment()
    [(_, backend, kwargs)] = calls
    assert backend == "hccl" and "device_id" not in kwargs
    data_parallel, tensor_parallel, world_size, device = meshes[0]
    assert (data_parallel, tensor_parallel, world_size, device.type) == (8, 1, 8, "hpu")


@pytest.mark.parametrize("tensor_parallel_size", [0, 1.5, True])
def test_fsdp2_refuses_a_tensor_parallel_size_that_is_not_a_positive_int(tensor_parallel_size):
    with pytest.raises(MisconfigurationException, match="tensor_parallel_size must be a positive int"):
        HPUFSDPStrategy(tensor_parallel_size=tensor_parallel_size)


def test_fsdp2_refuses_a_job_size_that_tensor_parallel_groups_do_not_divide(gaudi, monkeypatch):
    trainer = Trainer(accelerator="hpu", devices=3, strategy=HPUFSDPStrategy(tensor_parallel_size=2), **QUIET)
    _recorded_process_group(monkeypatch, trainer)
    trainer.strategy.connect(BoringModel())
    with pytest.raises(MisconfigurationException, match="3 ranks, not a multiple of tensor_parallel_size=2"):
        trainer.strategy.setup_environment()


# ---------------------------------------------------------------- execution modes, through fit


class _AccumulatingBoringModel(BoringModel):
    def train_dataloader(self):
        return DataLoader(torch.randn(8, 32), batch_size=2)  # 4 batches

    def val_dataloader(self):
        return DataLoader(torch.randn(4, 32), batch_size=2)  # 2 batches


def _fit_on_cpu_through_hpu_wiring(monkeypatch, module, tmp_path, **trainer_options):
    """Run the HPU strategy's code paths on CPU tensors: the stand-in has no device to move to."""
    monkeypatch.setattr(HPUAccelerator, "setup_device", lambda self, device: None)
    trainer = Trainer(accelerator="hpu", strategy=SingleHPUStrategy(device="cpu"), max_epochs=1,
                      default_root_dir=str(tmp_path), num_sanity_val_steps=0, **{**QUIET, **trainer_options})
    trainer.fit(module)
    return trainer


@pytest.mark.parametrize("lazy, expected_mark_steps", [(True, 4 + 2 + 2), (False, 0)],
                         ids=["lazy", "eager"])
def test_lazy_mode_marks_a_step_after_each_backward_optimizer_step_and_eval_step(
        monkeypatch, tmp_path, lazy, expected_mark_steps):
    gaudi = fake_habana.install(monkeypatch, lazy=lazy)
    _fit_on_cpu_through_hpu_wiring(monkeypatch, _AccumulatingBoringModel(), tmp_path, accumulate_grad_batches=2)
    assert gaudi.mark_steps == expected_mark_steps  # 4 backwards + 2 optimizer steps + 2 validation steps


def test_a_compiled_module_in_lazy_mode_is_refused_with_the_eager_setting(monkeypatch, tmp_path):
    fake_habana.install(monkeypatch, lazy=True)
    with pytest.raises(MisconfigurationException, match="PT_HPU_LAZY_MODE=0"):
        _fit_on_cpu_through_hpu_wiring(monkeypatch, torch.compile(BoringModel()), tmp_path)


class _PaCAModule(LightningModule):
    def __init__(self):
        super().__init__()
        self.model = apply_paca(make_tiny_llama(), PaCAConfig(rank=4, alpha=8, seed=0))

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)

    def train_dataloader(self):
        return DataLoader(torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(0)), batch_size=2)


def test_paca_trains_identically_through_the_lazy_hpu_strategy_and_on_cpu(monkeypatch, tmp_path):
    torch.manual_seed(0)
    reference = _PaCAModule()
    Trainer(accelerator="cpu", devices=1, max_epochs=1, default_root_dir=str(tmp_path), **QUIET).fit(reference)
    gaudi = fake_habana.install(monkeypatch, lazy=True)
    torch.manual_seed(0)
    through_hpu = _PaCAModule()
    _fit_on_cpu_through_hpu_wiring(monkeypatch, through_hpu, tmp_path)
    assert gaudi.mark_steps == 2 + 2  # 2 batches: a backward and an optimizer step each
    for (name, expected), (_, actual) in zip(paca_layers(reference.model), paca_layers(through_hpu.model)):
        assert torch.equal(expected.paca_weight, actual.paca_weight), name
        assert torch.equal(expected.weight, actual.weight), name


# ---------------------------------------------------------------- reporting


def test_device_stats_are_the_gaudi_allocator_statistics(gaudi):
    stats = HPUAccelerator().get_device_stats(torch.device("hpu"))
    assert stats["MaxInUse"] == gaudi.peak_allocated and "Limit" in stats


def test_synchronize_device_waits_for_the_hpu_and_refuses_unknown_devices(gaudi):
    synchronize_device(torch.device("hpu"))
    synchronize_device(torch.device("cpu"))
    assert gaudi.synchronizes == 1
    with pytest.raises(ValueError, match="'meta'"):
        synchronize_device(torch.device("meta"))


def test_throughput_monitor_waits_for_the_run_device_before_each_clock_reading(gaudi, monkeypatch, tmp_path):
    waited = []
    monkeypatch.setattr(reporting, "synchronize_device", waited.append)
    monitor = SynchronizedThroughputMonitor(batch_size_fn=lambda batch: batch.shape[0], window_size=2)
    trainer = _fit_on_cpu_through_hpu_wiring(monkeypatch, _AccumulatingBoringModel(), tmp_path,
                                             callbacks=[monitor], log_every_n_steps=1)
    assert waited and all(device == trainer.strategy.root_device for device in waited)
    assert len(waited) >= 1 + 4 + 1 + 2  # train start, 4 train batches, validation start, 2 val batches


def test_paca_fsdp2_on_gaudi_is_accepted_and_takes_the_sharded_loading_path(gaudi, tmp_path):
    from paca_lightning import PaCAConfig
    from paca_lightning.training import PaCAFineTuneModule, PaCAHPUFSDPStrategy, PaCAModelParallelStrategy

    chosen = PaCAHPUFSDPStrategy(activation_checkpointing=True)
    trainer = Trainer(accelerator="hpu", devices=4, strategy=chosen, **QUIET)
    assert trainer.strategy is chosen and chosen.process_group_backend == "hccl"
    assert isinstance(chosen, PaCAModelParallelStrategy) and chosen.loads_pretrained_shards
    assert chosen.parallel_devices == [torch.device("hpu")] * 4
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4).save_pretrained(tmp_path)  # a local folder
    module = PaCAFineTuneModule(str(tmp_path), paca=PaCAConfig(rank=4, quantize="nf4"))
    module._trainer = trainer
    assert module._sharded_loading_source() == tmp_path
