"""Sharded loading under FSDP2 (`paca_lightning.parallel.sharded_paca_model`): 2 gloo processes.

The model is saved to disk in several safetensors files; the worker
(tests/distributed/sharded_loading_worker.py) builds it on the meta device, shards it and fills
the shards, and compares it with today's path (every rank loads the whole model) or reports
each rank's peak resident memory from the kernel (VmHWM).
"""

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from paca_lightning import PaCAConfig
from paca_lightning.parallel.loading import apply_paca_on_meta, build_on_meta
from tests.distributed.launch import run_torchrun

WORKER = "sharded_loading_worker.py"


def save_llama(folder: Path, max_shard_size: str, **sizes) -> LlamaForCausalLM:
    torch.manual_seed(0)
    sizes.setdefault("tie_word_embeddings", False)
    model = LlamaForCausalLM(LlamaConfig(max_position_embeddings=64, **sizes))
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    return model


def save_memory_test_llama(folder: Path) -> tuple[LlamaForCausalLM, int, int]:
    """The ~216 MiB fp32 Llama of the memory tests, saved in 100 MB files: (model, one decoder
    layer's bytes, the largest file's bytes)."""
    model = save_llama(folder, "100MB", hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
                       num_attention_heads=12, num_key_value_heads=4, vocab_size=4096)
    layer_bytes = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    return model, layer_bytes, max(path.stat().st_size for path in folder.glob("*.safetensors"))


def vm_hwm_growth(peaks: dict) -> tuple[int, int]:
    """MiB a rank's VmHWM grew by after setup and after the steps."""
    return (peaks["ready"] - peaks["start"]) >> 20, (peaks["trained"] - peaks["start"]) >> 20


def launch(out: Path, mode: str, checkpoint: Path) -> dict:
    run_torchrun(WORKER, out, mode, str(checkpoint), timeout=900)
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied_embeddings"])
def test_sharded_loading_trains_bit_identically_to_loading_the_whole_model(tmp_path, tied):
    # intermediate 99: rows FSDP splits 50/49; a 40KB file limit spreads the tensors over many files
    save_llama(tmp_path / "model", "40KB", hidden_size=64, intermediate_size=99, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, vocab_size=128, tie_word_embeddings=tied)
    assert len(list((tmp_path / "model").glob("*.safetensors"))) > 2
    found = launch(tmp_path, "exact", tmp_path / "model")
    for run in ("random", "weight_norm", "random_nf4", "weight_norm_nf4", "weight_norm_fp4", "weight_norm_int8"):
        result = found[run]
        assert result["indices_identical"], (run, result)
        assert result["columns_identical"], (run, result)
        assert result["merged_identical"], (run, result)
        assert result["merged_tensors"] > 0 and result["columns_tensors"] > 0
        # QPaCA: every rank's rows of the packed bytes, its quantization state and pretrained
        # columns of all 14 adapted layers (3 tensors each) equal the whole-load path's
        assert result["quantized_identical"], (run, result)
        assert result["quantized_tensors"] == (0 if run in ("random", "weight_norm") else 42), (run, result)
        # fit-end merged export under FSDP2: one file per decoder layer (2) and one for the rest
        assert found[f"{run}_export"] == {"identical": True, "files": 3}, found


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lightning", "lightning-nf4"], ids=["dense", "qpaca_nf4"])
def test_lightning_fsdp2_builds_a_named_model_on_meta_and_trains_resumes_and_exports_like_the_whole_load(
        tmp_path, mode):
    save_llama(tmp_path / "model", "40KB", hidden_size=64, intermediate_size=99, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    found = launch(tmp_path, mode, tmp_path / "model")
    assert found["step2_identical"] and found["resumed_identical"], found
    assert found["resume_changed_columns"], found
    assert found["merged_identical"] and found["adapter_columns_identical"], found


@pytest.mark.slow
def test_sharded_loading_peak_host_memory_per_rank(tmp_path, monkeypatch):
    # glibc keeps freed large blocks for reuse once its mmap threshold has risen, which makes
    # peak RSS depend on the allocation history; a fixed threshold returns them to the kernel.
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    model, layer_bytes, largest_file = save_memory_test_llama(tmp_path / "model")
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    ranks = launch(tmp_path, "memory-sharded", tmp_path / "model")["ranks"]
    today = launch(tmp_path, "memory-full", tmp_path / "model")["ranks"]  # every rank loads the whole model
    world = len(ranks)

    print(f"model {model_bytes >> 20} MiB, layer {layer_bytes >> 20} MiB, largest file {largest_file >> 20} MiB; "
          f"per-rank VmHWM growth (MiB) after setup / after 2 steps: sharded {[vm_hwm_growth(r) for r in ranks]}, "
          f"whole model per rank {[vm_hwm_growth(r) for r in today]}")
    share = model_bytes / world + 2 * layer_bytes
    for rank, (peaks, whole) in enumerate(zip(ranks, today)):
        setup = peaks["ready"] - peaks["start"]
        assert setup <= share + (largest_file if rank == 0 else 0), (rank, setup, share)
        # the steps add FSDP2's gathered layers (each with its all-gather buffer, the next one
        # prefetched) and activations to the share, and still peak below loading the whole model
        assert peaks["trained"] - peaks["start"] < whole["trained"] - whole["start"], (rank, peaks, whole)


@pytest.mark.slow
def test_qpaca_sharded_loading_peak_host_memory_per_rank(tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes")
    from paca_lightning import apply_paca
    from paca_lightning.planning import model_state_bytes

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    model, layer_bytes, largest_file = save_memory_test_llama(tmp_path / "model")
    dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    apply_paca(model, PaCAConfig(rank=8, alpha=16, target_modules="all-linear", quantize="nf4"))
    sharded_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # packed weights, P, the rest
    whole_bytes = model_state_bytes(model) - sharded_bytes  # pretrained columns, quantization states: whole
    del model
    ranks = launch(tmp_path, "memory-sharded-nf4", tmp_path / "model")["ranks"]
    today = launch(tmp_path, "memory-full-nf4", tmp_path / "model")["ranks"]
    world = len(ranks)

    print(f"16-bit model {dense_bytes >> 20} MiB, QPaCA model {sharded_bytes >> 20} MiB sharded + {whole_bytes >> 20} "
          f"MiB whole per rank, dense layer {layer_bytes >> 20} MiB, largest file {largest_file >> 20} MiB; per-rank "
          f"VmHWM growth (MiB) after setup / after 2 steps: sharded {[vm_hwm_growth(r) for r in ranks]}, "
          f"whole model per rank {[vm_hwm_growth(r) for r in today]}")
    share = sharded_bytes / world + whole_bytes + 2 * layer_bytes
    for rank, (peaks, whole) in enumerate(zip(ranks, today)):
        setup = peaks["ready"] - peaks["start"]
        assert setup <= share + (largest_file if rank == 0 else 0), (rank, setup, share)
        assert setup < whole["ready"] - whole["start"], (rank, peaks, whole)
        assert peaks["trained"] - peaks["start"] < whole["trained"] - whole["start"], (rank, peaks, whole)


def test_meta_build_applies_paca_without_allocating_weights(tmp_path):
    save_llama(tmp_path, "10MB", hidden_size=32, intermediate_size=48, num_hidden_layers=1,
               num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    model = apply_paca_on_meta(build_on_meta(tmp_path), PaCAConfig(rank=4, target_modules="all-linear"))
    assert all(p.is_meta for p in model.parameters())
    assert model.model.layers[0].mlp.down_proj.paca_weight.shape == (32, 4)


def test_meta_build_refuses_a_selection_that_needs_the_loaded_weights(tmp_path):
    save_llama(tmp_path, "10MB", hidden_size=32, intermediate_size=48, num_hidden_layers=1,
               num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    with pytest.raises(ValueError, match="sharded loading"):
        apply_paca_on_meta(build_on_meta(tmp_path), PaCAConfig(rank=4, target_modules="all-linear",
                                                               selection="gradient"))


@pytest.mark.parametrize("quantize", ["nf4", "fp4", "int8"])
def test_a_qpaca_layer_awaiting_its_weights_has_the_real_layers_shapes_and_state_keys(tmp_path, quantize):
    pytest.importorskip("bitsandbytes")
    from paca_lightning import apply_paca
    from paca_lightning.parallel.loading import _tensor_keys

    real = save_llama(tmp_path, "10MB", hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    config = PaCAConfig(rank=4, target_modules="all-linear", quantize=quantize)
    meta = apply_paca_on_meta(build_on_meta(tmp_path), config)
    real = apply_paca(real, config)
    for name in ("model.layers.0.mlp.down_proj", "model.layers.0.self_attn.k_proj"):
        skeleton, layer = meta.get_submodule(name), real.get_submodule(name)
        assert skeleton.kind == layer.kind and skeleton.merge_dtype == layer.merge_dtype
        for key, tensor in layer.state_dict().items():
            if key != "_extra_state":
                found = getattr(skeleton, key)
                assert (found.shape, found.dtype, found.is_meta) == (tensor.shape, tensor.dtype, True), key
    assert _tensor_keys(meta) | {k for k in real.state_dict() if k.endswith("_extra_state")} == set(real.state_dict())


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_a_qpaca_model_awaiting_its_weights_prints_and_refuses_to_save_a_state_it_does_not_have(tmp_path, quantize):
    pytest.importorskip("bitsandbytes")
    save_llama(tmp_path, "10MB", hidden_size=32, intermediate_size=48, num_hidden_layers=1,
               num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    meta = apply_paca_on_meta(build_on_meta(tmp_path), PaCAConfig(rank=4, target_modules="all-linear",
                                                                  quantize=quantize))
    layer = meta.model.layers[0].mlp.down_proj
    assert f"{quantize}(in_features=48, out_features=32" in repr(meta)  # printing a meta-built model works
    assert layer.quantization == quantize
    with pytest.raises(ValueError, match=f"this {quantize} QuantizedPaCALinear is awaiting its weights"):
        layer.get_extra_state()


def test_qpaca_extra_state_ignores_only_torchs_placeholder_and_refuses_a_state_of_another_format():
    pytest.importorskip("bitsandbytes")
    from torch.distributed.checkpoint.state_dict import _EXTRA_STATE

    from paca_lightning.quantized import QuantizedPaCALinear, quantize_linear

    torch.manual_seed(0)
    nf4, fp4 = (QuantizedPaCALinear(quantize_linear(torch.nn.Linear(64, 32), kind), torch.arange(4), 2.0)
                for kind in ("nf4", "fp4"))
    saved = nf4.get_extra_state()
    # what set_model_state_dict(broadcast_from_rank0=True) passes for a layer of another file
    nf4.set_extra_state(_EXTRA_STATE())
    assert torch.equal(nf4.get_extra_state(), saved)
    with pytest.raises(TypeError, match="the uint8 tensor get_extra_state returns, got builtins.dict"):
        nf4.set_extra_state({"absmax": torch.zeros(1)})
    with pytest.raises(ValueError, match="loaded into this nf4 QuantizedPaCALinear is fp4"):
        nf4.set_extra_state(fp4.get_extra_state())


def test_module_under_a_sharded_loading_strategy_builds_a_local_folder_on_meta_and_says_when_it_cannot(
        tmp_path, caplog):
    from types import SimpleNamespace

    from paca_lightning.training import PaCAFineTuneModule

    save_llama(tmp_path, "10MB", hidden_size=32, intermediate_size=48, num_hidden_layers=1,
               num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    strategy = SimpleNamespace(loads_pretrained_shards=True)
    sharded = PaCAFineTuneModule(str(tmp_path), paca=PaCAConfig(rank=4, target_modules="all-linear"))
    sharded._trainer = SimpleNamespace(strategy=strategy)
    sharded.configure_model()
    assert all(p.is_meta for p in sharded.model.parameters())
    assert sharded.model.paca_pending_checkpoint == tmp_path
    quantized = PaCAFineTuneModule(str(tmp_path), paca=PaCAConfig(rank=4, target_modules="all-linear",
                                                                  quantize="nf4"))
    quantized._trainer = SimpleNamespace(strategy=strategy)
    quantized.configure_model()  # QPaCA too: each weight is quantized as it is loaded
    assert all(p.is_meta for p in quantized.model.parameters())
    assert type(quantized.model.model.layers[0].mlp.up_proj).__name__ == "QuantizedPaCALinear"
    whole = PaCAFineTuneModule(str(tmp_path), method="lora")
    whole._trainer = SimpleNamespace(strategy=strategy)
    with caplog.at_level("INFO"):
        whole.configure_model()
    assert not any(p.is_meta for p in whole.model.parameters())
    assert not hasattr(whole.model, "paca_pending_checkpoint")
    assert "loads the whole model" in caplog.text and "method='lora'" in caplog.text


def test_a_model_type_whose_checkpoint_transformers_converts_on_load_is_refused_with_the_way_out(tmp_path):
    from transformers import MixtralConfig, MixtralForCausalLM

    from paca_lightning.parallel.loading import converted_on_load

    config = MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=64, num_local_experts=2)
    MixtralForCausalLM(config).save_pretrained(tmp_path)
    if not converted_on_load(tmp_path):
        pytest.skip("this transformers loads Mixtral checkpoints as saved")
    with pytest.raises(ValueError, match="from_pretrained"):
        build_on_meta(tmp_path)


def test_fused_expert_weights_are_refused_by_sharded_loading_rather_than_left_untrained():
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=64, num_local_experts=2)
    with torch.device("meta"):
        model = MixtralForCausalLM(config)
    with pytest.raises(NotImplementedError, match=r"does not fill fused MoE expert weights .*exclude_modules"):
        apply_paca_on_meta(model, PaCAConfig(rank=4, target_modules="all-linear"))


@pytest.mark.slow
@pytest.mark.parametrize("selection", ["random", "weight_norm"])
def test_the_loading_benchmark_fills_identical_shards_by_streaming_and_by_per_rank_slices(tmp_path, capsys,
                                                                                         selection):
    from paca_lightning.bench import sharded_loading

    save_llama(tmp_path / "model", "40KB", hidden_size=64, intermediate_size=99, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    assert sharded_loading.main([str(tmp_path / "model"), "--selection", selection, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    # weight_norm: column norms summed over the ranks' rows chose the same columns on this model
    assert result["identical_shards"] is True and result["selection"] == selection
    assert len(result["stream"]) == len(result["slices"]) == 2
    assert all(entry["seconds"] > 0 and entry["rss_anon_growth_bytes"] > 0
               for way in ("stream", "slices") for entry in result[way])
