"""What a user types and gets back from a recipe: option errors, the run folder, the report."""

import sys
from pathlib import Path

import pytest
import torch

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
sys.path.insert(0, str(RECIPES))

import oasst1  # noqa: E402  (a recipe script, importable from its folder as `lightning run` does)
from recipe_cli import RUN_OUTPUTS, describe_argument_error  # noqa: E402

FAST = ["--trainer.max_steps=2", "--trainer.enable_progress_bar=false", "--report.sample_prompt=",
        "--trainer.val_check_interval=null", "--trainer.limit_val_batches=0", "--report.loss_curve=false"]


def run_demo(tmp_path, capsys, *args):
    """The OASST1 recipe in this process; (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) if any(a.startswith("--help") for a in args) else _no_exit():
        oasst1.main([f"--trainer.default_root_dir={tmp_path}", *args])
    captured = capsys.readouterr()
    return captured.out, captured.err


class _no_exit:
    """A context that turns sys.exit(status) into a recorded status instead of ending the test."""

    status = 0

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if kind is SystemExit:
            _no_exit.status = error.code
            return True
        _no_exit.status = 0
        return False


@pytest.mark.parametrize("typo, suggestion", [("--trainer.max_step=3", "--trainer.max_steps"),
                                              ("--model.paca.rnk=3", "--model.paca.rank"),
                                              ("--model.learning_rte=1e-3", "--model.learning_rate")])
def test_a_typo_gives_one_short_error_with_a_suggestion_and_exit_status_2(tmp_path, capsys, typo, suggestion):
    out, err = run_demo(tmp_path, capsys, typo)
    assert _no_exit.status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 2, err  # the error and where to find every option: no usage dump
    assert f"unknown option {typo.split('=')[0]}; did you mean {suggestion}" in lines[0]
    assert not list(tmp_path.iterdir())  # nothing ran


def test_a_bad_value_inside_the_paca_config_is_named_by_its_full_option(tmp_path, capsys):
    _, err = run_demo(tmp_path, capsys, "--model.paca.rank=abc")
    assert _no_exit.status == 2
    assert "error: --model.paca.rank: Expected a <class 'int'>. Got value: abc\n" in err
    _, err = run_demo(tmp_path, capsys, "--model.paca.rank=0")
    assert _no_exit.status == 2 and "PaCAConfig.rank must be a positive int (>= 1), got 0" in err
    assert "Union" not in err


def test_the_union_message_is_reduced_to_its_innermost_reason():
    message = ('Parser key "model.paca":\n  Does not validate against any of the Union subtypes\n  Errors:\n'
               '    - Problem with given class_path \'paca_lightning.PaCAConfig\':\n        Parser key "rank":\n'
               "          Expected a <class 'int'>. Got value: abc\n    - Expected a <class 'NoneType'>\n")
    assert describe_argument_error(message, []) == "--model.paca.rank: Expected a <class 'int'>. Got value: abc"


def test_help_offers_no_optimizer_options_that_the_module_would_ignore(tmp_path, capsys):
    out, _ = run_demo(tmp_path, capsys, "--help")
    assert "--model.learning_rate" in out
    assert "--optimizer" not in out and "--lr_scheduler" not in out


def test_a_second_run_into_a_used_folder_is_refused_with_the_ways_forward(tmp_path, capsys):
    (tmp_path / "paca_adapter").mkdir()
    (tmp_path / "loss_curve.png").write_bytes(b"previous run")
    _, err = run_demo(tmp_path, capsys, *FAST)
    assert _no_exit.status == 2
    assert "holds the outputs of a previous run (paca_adapter, loss_curve.png)" in err
    assert "--ckpt_path last" in err and "--overwrite=true" in err
    assert (tmp_path / "loss_curve.png").read_bytes() == b"previous run"  # nothing touched


@pytest.mark.slow
def test_overwrite_replaces_the_previous_outputs_and_a_resumed_run_reports_the_whole_run(tmp_path, capsys):
    (tmp_path / "paca_adapter").mkdir()
    (tmp_path / "paca_adapter" / "stale.txt").write_text("previous run")
    run_demo(tmp_path, capsys, *FAST, "--overwrite=true", "--checkpoint.every_n_train_steps=2")
    assert _no_exit.status == 0
    assert not (tmp_path / "paca_adapter" / "stale.txt").exists()
    assert set(RUN_OUTPUTS) & {p.name for p in tmp_path.iterdir()} >= {"paca_adapter", "merged", "checkpoints"}

    run_demo(tmp_path, capsys, *FAST[1:], "--trainer.max_steps=4", "--ckpt_path=last",
             "--checkpoint.every_n_train_steps=2")
    assert _no_exit.status == 0
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    report = next(value for key, value in last["callbacks"].items() if key.startswith("RecipeReport"))
    assert [step for step, _ in report["losses"]] == [1, 2, 3, 4]  # both parts of the run, in order


@pytest.mark.parametrize("terminal", [True, False])
def test_lightnings_stop_line_is_dropped_only_where_the_progress_bar_already_says_it(terminal, monkeypatch):
    import logging

    import recipe_cli

    monkeypatch.setattr(recipe_cli.sys.stdout, "isatty", lambda: terminal)
    keep = recipe_cli._DropNoise().filter

    def record(message):
        return logging.LogRecord("lightning.pytorch.utilities.rank_zero", logging.INFO, "", 0, message, (), None)

    assert keep(record("`Trainer.fit` stopped: `max_steps=120` reached.")) is not terminal
    assert not keep(record("\N{ELECTRIC LIGHT BULB} Tip: try the cloud"))
    assert keep(record("Seed set to 0"))


def test_a_run_stopped_by_sigterm_exits_143_not_0(monkeypatch):
    import recipe_cli
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    class StoppedBySigterm:
        def __init__(self, *args, **kwargs):
            pass

        def fit(self):
            raise SIGTERMException()  # what Lightning raises; a SystemExit without a status (exit 0)

    monkeypatch.setattr(recipe_cli, "RecipeCLI", StoppedBySigterm)
    with pytest.raises(SystemExit) as stopped:
        recipe_cli.run_recipe(object, {})
    assert stopped.value.code == 143
