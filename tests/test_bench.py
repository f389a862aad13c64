"""The benchmark machinery on the tiny preset: outputs, ratios, counters. No timing assertions."""

import json
import math
import statistics

import pytest
import torch
from torch import nn

from paca_lightning.bench import main
from paca_lightning.bench.measure import longest_sequence, saved_bytes
from paca_lightning.bench.methods import METHODS, Trainee, check_chunked_loss_applies
from paca_lightning.bench.runner import BenchOptions, ratios, run_benchmark

TINY_ARGS = ["--model", "tiny", "--sequence-length", "32", "--repeats", "2", "--warmup", "0", "--no-peak-memory",
             "--memory-budget-gib", "0.008", "--sequence-limit", "512", "--sequence-granularity", "32",
             "--quantized", "off"]


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("bench")
    assert main([*TINY_ARGS, "--output-dir", str(output_dir)]) == 0
    return output_dir, json.loads((output_dir / "results.json").read_text())


def test_every_method_and_loss_gets_a_row_with_every_figure(bench_run):
    _, report = bench_run
    rows = {(row["method"], row["loss"]): row for row in report["results"]}
    assert set(rows) == {(method, loss) for method in METHODS for loss in ("dense", "chunked")}
    for row in rows.values():
        assert len(row["step_times_s"]) == 2 and row["step_time_s"] > 0
        assert row["tokens_per_s"] == pytest.approx(2 * 32 / row["step_time_s"])
        assert row["saved_bytes"] > 0 and row["flops"] > 0
        assert 32 <= row["max_sequence_length"] <= 512 and row["max_sequence_length"] % 32 == 0


def test_equal_budget_gives_paca_twice_the_lora_rank_and_says_so(bench_run):
    output_dir, report = bench_run
    ranks = {row["method"]: row["rank"] for row in report["results"]}
    assert ranks["lora"] == ranks["dora"] == 8 and ranks["paca"] == 16
    assert ranks["full"] is None and ranks["floor"] is None
    assert "equal parameter budget: LoRA/DoRA rank 8, PaCA rank 16" in (output_dir / "results.md").read_text()


def test_ratios_are_computed_from_the_measured_values(bench_run):
    _, report = bench_run
    rows = {(row["method"], row["loss"]): row for row in report["results"]}
    for loss in ("dense", "chunked"):
        paca = rows["paca", loss]
        for other in ("full", "lora", "dora", "floor"):
            measured = report["ratios"][loss][f"paca/{other}"]
            for metric in ("step_time_s", "saved_bytes", "flops", "max_sequence_length"):
                assert measured[metric] == pytest.approx(paca[metric] / rows[other, loss][metric])
    assert ratios(report["results"]) == report["ratios"]


def test_the_floor_stores_no_more_than_paca_and_paca_less_than_lora(bench_run):
    _, report = bench_run
    rows = {(row["method"], row["loss"]): row for row in report["results"]}
    for loss in ("dense", "chunked"):
        assert rows["floor", loss]["saved_bytes"] <= rows["paca", loss]["saved_bytes"]
        assert rows["paca", loss]["saved_bytes"] < rows["lora", loss]["saved_bytes"]
        assert rows["floor", loss]["trainable_parameters"] == 0
    # the chunked loss never stores the logits
    assert rows["paca", "chunked"]["saved_bytes"] < rows["paca", "dense"]["saved_bytes"]


def test_markdown_table_and_png_plots_are_written(bench_run):
    output_dir, report = bench_run
    table = (output_dir / "results.md").read_text()
    for row in report["results"]:
        assert f"| {row['method']} | {row['loss']} |" in table
    assert "| paca/lora |" in table and "| paca/floor |" in table
    for name in ("step_time.png", "memory.png", "max_sequence_length.png"):
        assert (output_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_saved_bytes_counts_a_storage_saved_by_several_ops_once_and_skips_parameters():
    torch.manual_seed(0)
    projections = nn.ModuleList(nn.Linear(16, 16) for _ in range(3))  # like q/k/v on one input
    trainee = Trainee("lora", 1, projections, None)
    x = torch.randn(4, 16)
    nbytes = saved_bytes(trainee, lambda module, batch: sum(layer(batch).sum() for layer in module), x)
    assert nbytes == x.numel() * x.element_size()
    assert all(p.grad is not None for p in projections.parameters())  # backward ran through the graph


@pytest.mark.parametrize("threshold", [0, 31, 32, 100, 512, 999, 1024, 5000])
def test_longest_sequence_finds_the_largest_fitting_multiple(threshold):
    probes = []

    def fits(length):
        probes.append(length)
        return length <= threshold

    expected = 0 if threshold < 32 else min(threshold, 1024) // 32 * 32
    assert longest_sequence(fits, start=256, granularity=32, limit=1024) == expected
    assert all(length % 32 == 0 and 32 <= length <= 1024 for length in probes)
    assert len(probes) <= 12


def test_peak_rss_child_reports_the_training_peak(capsys):
    from paca_lightning.bench.peak_rss import main as child_main

    spec = {"model": "tiny", "dtype": "float32", "method": "paca", "loss": "chunked", "lora_rank": 2,
            "paca_rank": 4, "target_modules": "all-linear", "batch_size": 1, "sequence_length": 16, "steps": 1,
            "chunk_size": 8, "seed": 0}
    assert child_main([json.dumps(spec)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # The kernel's RSS counters are per-CPU approximations (a few pages either way), so the peak
    # may read a hair below the starting figure read just after the reset.
    assert report["peak_rss"] >= report["rss_before_training"] - 2**20 and report["rss_before_training"] > 0


def test_bad_options_are_rejected_with_the_valid_choices():
    with pytest.raises(ValueError, match="unknown method 'qlora'.*full, lora, lora-fp32, dora, paca, floor"):
        run_benchmark(BenchOptions(model="tiny", methods=["paca", "qlora"]))
    with pytest.raises(ValueError, match="--sequence-length .sequence_length. must be >= 1"):
        run_benchmark(BenchOptions(model="tiny", sequence_length=0))
    with pytest.raises(ValueError, match="neither a preset"):
        run_benchmark(BenchOptions(model="/nonexistent/model-dir", methods=["paca"]))


def test_chunked_loss_refuses_models_whose_logits_are_not_a_plain_linear_head():
    model = nn.Module()
    model.config = type("Config", (), {"final_logit_softcapping": 30.0})()
    with pytest.raises(ValueError, match="final_logit_softcapping=30.0.*--loss dense"):
        check_chunked_loss_applies(model)


def test_convergence_mode_trains_paca_lora_and_full_on_the_same_batches(tmp_path):
    assert main(["--convergence", "--steps", "3", "--sequence-length", "64", "--rank", "2",
                 "--output-dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "convergence.json").read_text())
    assert set(report["curves"]) == {"paca", "lora", "full"}
    for losses in report["curves"].values():
        assert len(losses) == 3 and all(math.isfinite(value) for value in losses)
    # same starting weights and first batch: the first losses agree before any update
    first = [losses[0] for losses in report["curves"].values()]
    assert max(first) - min(first) < 1e-4
    assert (tmp_path / "convergence.png").read_bytes()[:4] == b"\x89PNG"


def test_the_command_rejects_bad_options_with_usage_and_writes_nothing(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--model", "tiny", "--methods", "paca,qlora", "--output-dir", str(tmp_path / "out")])
    assert exit_.value.code == 2
    assert "unknown method 'qlora'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_qpaca_vs_qlora_measures_both_at_equal_budget_and_logs_each_round():
    from paca_lightning.bench.quantized import format_table, run_quantized_benchmark

    lines = []
    rows = run_quantized_benchmark("tiny", lora_rank=2, batch_size=1, sequence_length=16, rounds=2, warmup=1,
                                   rss_steps=1, log=lines.append)
    by_method = {row["method"]: row for row in rows}
    assert set(by_method) == {"qpaca", "qlora"}
    qpaca, qlora = by_method["qpaca"], by_method["qlora"]
    assert abs(qpaca["trainable_params"] / qlora["trainable_params"] - 1) < 0.1
    assert 0 < qpaca["saved_for_backward_bytes"] < qlora["saved_for_backward_bytes"]
    assert all(row["peak_rss"] > 0 and row["step_time_s"] > 0 for row in rows)
    assert len(qpaca["step_times_s"]) == len(qlora["step_times_s"]) == 2
    round_ratios = [a / b for a, b in zip(qpaca["step_times_s"], qlora["step_times_s"])]
    assert qpaca["step_time_ratio_vs_qlora"] == pytest.approx(statistics.median(round_ratios))
    assert [line.split(":")[0] for line in lines if "round" in line] == ["  round 1/2", "  round 2/2"]
    assert "qpaca" in format_table(rows).lower()


def test_results_are_on_disk_before_the_long_qlora_phase_starts(tmp_path, monkeypatch):
    import paca_lightning.bench as bench

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "quantized_comparison", interrupted)
    args = [argument for argument in TINY_ARGS if argument not in ("--quantized", "off")]
    with pytest.raises(KeyboardInterrupt):
        main([*args, "--output-dir", str(tmp_path)])
    assert {row["method"] for row in json.loads((tmp_path / "results.json").read_text())["results"]} == set(METHODS)


def test_moe_row_compares_paca_and_peft_lora_on_the_same_fused_experts():
    from paca_lightning.bench.moe import run_moe_benchmark

    row = run_moe_benchmark(hidden=32, intermediate=48, experts=4, layers=1, batch_size=2, sequence_length=16,
                            lora_rank=2, rounds=2, warmup=1)
    paca, lora = row["methods"]["paca"], row["methods"]["lora"]
    # PaCA at rank 2r trains 2r columns of every expert's two weights, nothing else
    assert paca["trainable"] == 4 * (2 * 48 + 32) * 4
    # LoRA at rank r: per expert, A (r x in) and B (out x r) for each weight
    assert lora["trainable"] == 4 * 2 * ((32 + 2 * 48) + (48 + 32))
    assert row["paca_over_lora"]["saved_bytes"] == paca["saved_bytes"] / lora["saved_bytes"]


@pytest.mark.parametrize("method, adapter_dtype", [("lora", torch.bfloat16), ("lora-fp32", torch.float32)])
def test_lora_baselines_differ_only_in_adapter_dtype(method, adapter_dtype):
    from paca_lightning.bench.methods import prepare
    from tests.helpers import make_tiny_llama

    trainee = prepare(method, make_tiny_llama(dtype=torch.bfloat16), lora_rank=4, paca_rank=8,
                      target_modules="all-linear")
    assert {p.dtype for p in trainee.trainable()} == {adapter_dtype}
    assert {p.dtype for p in trainee.causal_lm.parameters() if not p.requires_grad} == {torch.bfloat16}
