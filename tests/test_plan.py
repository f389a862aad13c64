"""`paca-lightning plan`: bytes counted on fake tensors equal those of a real CPU step."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from transformers import LlamaConfig

from paca_lightning import planning as planner
from paca_lightning.bench import plan as plan_cli
from paca_lightning.config import PaCAConfig
from paca_lightning.loss import chunked_causal_lm_loss
from paca_lightning.model import apply_paca
from tests.helpers import saved_bytes


def small_config():
    return LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)


def real_model(config, method, dtype, rank):
    """The planned model on real tensors; qpaca and qlora quantize with bitsandbytes itself (`quantize_linear`)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model, _ = planner._prepare_method(method, model, rank, rank // 2, planner.DEFAULT_TARGETS, fake=False)
    return model.train()


def real_step(config, method, dtype, batch_size, sequence_length, rank, chunk_size=8):
    """(bytes saved for backward, model bytes, peak bytes) of one real CPU step, the peak counted
    by the planner's `LiveBytes` on real tensors."""
    model = real_model(config, method, dtype, rank)
    ids = torch.randint(0, config.vocab_size, (batch_size, sequence_length))

    def step():
        hidden = model.base_model(input_ids=ids).last_hidden_state
        return chunked_causal_lm_loss(hidden, model.lm_head.weight, ids, chunk_size=chunk_size)

    total, _, loss = saved_bytes(step, parameters=list(model.parameters()))
    loss.backward()
    # Again for the peak, without the saved tensors the counter above keeps alive through backward.
    for parameter in model.parameters():
        parameter.grad = None
    with planner.LiveBytes([*planner._model_tensors(model), ids]) as live:
        planner.count_saved(model, step)
    weights = planner.model_state_bytes(model)
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return total, weights, weights + 2 * grads + max(live.peak, live.current + grads)


def assert_plan_equals_real_step(config, method, dtype, batch_size, sequence_length, rank, chunk_size):
    planned = planner.plan_method(config, method, batch_size=batch_size, sequence_length=sequence_length,
                                  dtype=dtype, rank=rank, chunk_size=chunk_size)
    real = real_step(config, method, dtype, batch_size, sequence_length, rank, chunk_size)
    assert (planned.saved_bytes, planned.weight_bytes, planned.peak_bytes) == real
    return planned


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", planner.PLAN_METHODS)
def test_planned_saved_bytes_equal_a_real_step(method, dtype):
    config = small_config()
    planned = assert_plan_equals_real_step(config, method, dtype, 2, 16, 8, chunk_size=8)
    assert len(planned.saved_per_layer_bytes) == 2 and min(planned.saved_per_layer_bytes) > 0
    assert planned.saved_bytes == sum(planned.saved_per_layer_bytes) + planned.head_and_loss_bytes


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", ["llama-50m", "llama3-8b-layer"])
def test_planned_bytes_equal_a_real_step_at_real_widths(shape, dtype):
    """The bench preset llama-50m, and one decoder layer of LLaMA3-8B's full width (GQA 32/8
    heads, intermediate 14336; a 128-token vocabulary keeps the embedding cheap): every method."""
    from paca_lightning.bench.models import PRESETS

    if shape == "llama-50m":
        config = LlamaConfig(**PRESETS["llama-50m"])
    else:
        config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=1, num_attention_heads=32,
                             num_key_value_heads=8, vocab_size=128, rope_theta=500000.0)
    for method in planner.PLAN_METHODS:
        assert_plan_equals_real_step(config, method, dtype, 1, 64, 16, chunk_size=32)


PEAK_SETTINGS = dict(batch_size=2, sequence_length=256, rank=16, chunk_size=64)


def peak_rss_child(method: str, dtype_name: str) -> None:
    """In a fresh process: build llama-50m for ``method``, run two training steps (forward with the
    chunked loss, backward, AdamW) and print how far the kernel's peak RSS (VmHWM) rose above the
    RSS after the model was built. A first forward and backward, its gradients dropped, loads the
    kernels' code pages before the baseline so that the step's figure holds tensors only."""
    import gc

    from paca_lightning.bench.measure import current_rss, peak_rss, reset_peak_rss
    from paca_lightning.bench.models import PRESETS

    torch.set_num_threads(1)
    settings = PEAK_SETTINGS
    config = LlamaConfig(**PRESETS["llama-50m"])
    model = real_model(config, method, getattr(torch, dtype_name), settings["rank"])
    ids = torch.randint(0, config.vocab_size, (settings["batch_size"], settings["sequence_length"]))
    trainable = [p for p in model.parameters() if p.requires_grad]
    # foreach=True: the update the planner models (torch's default on CUDA; CPU defaults to a
    # per-tensor loop whose temporaries are two copies of the largest tensor instead)
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, foreach=True) if trainable else None

    def step():
        hidden = model.base_model(input_ids=ids).last_hidden_state
        chunked_causal_lm_loss(hidden, model.lm_head.weight, ids, chunk_size=settings["chunk_size"]).backward()

    step()
    for parameter in trainable:
        parameter.grad = None
    gc.collect()
    reset_peak_rss()
    before = current_rss()
    for _ in range(2):  # the first step creates AdamW's moments; the second runs with them alive
        step()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    print(json.dumps({"peak_growth": peak_rss() - before}))


@pytest.mark.slow
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", planner.PLAN_METHODS)
def test_planned_peak_is_within_5_percent_of_a_real_steps_peak_rss(method, dtype_name):
    """What the step adds to the process's peak resident memory, measured by the kernel, against
    the planned peak less the model bytes the baseline already holds. glibc returns freed blocks
    of 128 KiB and more to the kernel at once (MALLOC_MMAP_THRESHOLD_), as a caching allocator
    would reuse them, so freed activations do not linger in the RSS."""
    from paca_lightning.bench.models import PRESETS

    planned = planner.plan_method(LlamaConfig(**PRESETS["llama-50m"]), method, dtype=getattr(torch, dtype_name),
                                  **PEAK_SETTINGS)
    root = Path(__file__).resolve().parent.parent
    code = f"from tests.test_plan import peak_rss_child; peak_rss_child({method!r}, {dtype_name!r})"
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])["peak_growth"]
    predicted = planned.peak_bytes - planned.weight_bytes
    # -s shows the figures docs/memory.md quotes
    print(f"\n{method} {dtype_name}: planned {predicted / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB, "
          f"measured/planned {measured / predicted:.3f}")
    assert predicted > 20 * 2**20  # tens of MiB: 5% is a meaningful bound
    assert abs(measured - predicted) <= 0.05 * measured, (measured / 2**20, predicted / 2**20)


def test_nf4_bytes_are_bitsandbytes_bytes():
    """nf4 with blocksize 64 and double quantization, per layer of n weights: ceil(n/2) packed bytes,
    one uint8 scale per 64 weights, one float32 scale per 256 of those, a 16-entry and a 256-entry
    float32 code table and a float32 offset; the planner's fake layer holds exactly these."""
    from math import ceil

    from torch import nn

    from paca_lightning.quantized import quantize_linear

    planner._warm_bitsandbytes_tables()
    for out_features, in_features in [(70, 100), (64, 64), (1376, 512)]:
        linear = nn.Linear(in_features, out_features, bias=False)
        real = quantize_linear(linear, "nf4")
        n = in_features * out_features
        blocks = ceil(n / 64)
        expected = ceil(n / 2) + blocks + 4 * ceil(blocks / 256) + 4 * 16 + 4 * 256 + 4
        layer_bytes = [sum(t.untyped_storage().nbytes() for t in [layer.weight] + planner._quant_state_tensors(
            layer.weight.quant_state)) for layer in (real,)]
        with FakeTensorMode(allow_non_fake_inputs=True):
            fake = planner._fake_nf4_linear(nn.Linear(in_features, out_features, bias=False))
            layer_bytes.append(sum(t.untyped_storage().nbytes() for t in [fake.weight] + planner._quant_state_tensors(
                fake.quant_state)))
        assert layer_bytes == [expected, expected]


def test_fake_paca_model_trains_and_eager_checks_stay():
    from transformers import LlamaForCausalLM

    from paca_lightning.layers import validated_indices

    with pytest.raises(ValueError, match="distinct values"):
        validated_indices([0, 0], 4, torch.device("cpu"))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        chunked_causal_lm_loss(torch.zeros(1, 3, 4), torch.zeros(5, 4), torch.tensor([[0, 9, 1]]))
    with FakeTensorMode():
        model = apply_paca(LlamaForCausalLM(small_config()), PaCAConfig(rank=4))
        ids = torch.randint(0, 128, (2, 8))
        hidden = model.model(input_ids=ids).last_hidden_state
        chunked_causal_lm_loss(hidden, model.lm_head.weight, ids, chunk_size=4).backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.shape[-1] == 4 for g in grads)


def test_plan_cli_json(tmp_path, capsys):
    from paca_lightning.cli import main

    small_config().save_pretrained(tmp_path)
    assert main(["plan", "--model", str(tmp_path), "--batch-size", "1", "--sequence-length", "8",
                 "--methods", "paca,lora", "--rank", "8", "--json"]) == 0
    methods = json.loads(capsys.readouterr().out)["methods"]
    assert set(methods) == {"paca", "lora"}
    for entry in methods.values():
        assert entry["total_bytes"] == (entry["saved_bytes"] + entry["weight_bytes"] + entry["gradient_bytes"]
                                        + entry["optimizer_state_bytes"])


def test_plan_cli_markdown_and_unknown_methods(tmp_path, capsys):
    from paca_lightning.cli import main

    small_config().save_pretrained(tmp_path)
    common = ["plan", "--model", str(tmp_path), "--sequence-length", "8", "--rank", "8"]
    assert main([*common, "--methods", "qpaca,qlora", "--markdown"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert [row.split(" | ")[0] for row in rows[2:]] == ["| qpaca", "| qlora"]
    assert all(row.count("|") == rows[0].count("|") for row in rows)
    with pytest.raises(SystemExit):
        main([*common, "--methods", "qpaca,qlora4"])
    assert "unknown qlora4; choose from floor, paca, lora, lora-fp32, qpaca, qlora, full" in capsys.readouterr().err


def test_budget_picks_the_fewest_checkpointed_layers():
    planned = planner.plan_method(small_config(), "lora", batch_size=2, sequence_length=16, dtype=torch.float32,
                                  rank=8, chunk_size=8)
    totals = [planner.total_with_checkpointing(planned, k) for k in range(3)]
    assert totals[0] == planned.total_bytes and totals[2] == planned.total_checkpointed_bytes
    assert planner.checkpointed_layers_needed(planned, totals[0]) == 0
    assert planner.checkpointed_layers_needed(planned, totals[1]) == (0 if totals[0] <= totals[1] else 1)
    assert planner.checkpointed_layers_needed(planned, min(totals) - 1) is None


def test_longest_sequence_fits_and_the_next_step_does_not():
    config = small_config()
    settings = dict(batch_size=1, dtype=torch.float32, rank=8, chunk_size=8)
    budget = planner.plan_method(config, "paca", sequence_length=48, **settings).total_bytes
    longest = plan_cli.longest_sequence(config, "paca", budget, checkpoint_all=False, granularity=16,
                                       limit=64, **settings)
    assert longest >= 48
    assert planner.plan_method(config, "paca", sequence_length=longest, **settings).total_bytes <= budget
    if longest + 16 <= 64:
        assert planner.plan_method(config, "paca", sequence_length=longest + 16, **settings).total_bytes > budget


def test_a_budget_reports_what_auto_checkpointing_would_choose(tmp_path):
    small_config().save_pretrained(tmp_path)
    settings = dict(batch_size=2, sequence_length=16, dtype=torch.float32, rank=8, chunk_size=8)
    planned = planner.plan_method(small_config(), "paca", **settings)
    budget = planner.total_with_checkpointing(planned, 1)
    assert budget < planned.total_bytes
    entry = plan_cli.plan(str(tmp_path), ["paca"], memory_budget=budget, **settings)["methods"]["paca"]
    assert entry["checkpointed_layers_needed"] == 1
    assert entry["total_auto_checkpointed_bytes"] == budget
    markdown = plan_cli.format_markdown({"methods": {"paca": entry}})
    assert "| auto: layers checkpointed | auto: total |" in markdown and "| 1 of 2 |" in markdown


def test_plan_names_an_unreadable_config_and_what_was_tried(tmp_path, capsys):
    from paca_lightning.cli import main

    (tmp_path / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--model", str(tmp_path)])
    assert exit_info.value.code == 2
    assert f"cannot read a transformers config from {tmp_path / 'config.json'}" in capsys.readouterr().err
