"""The terminal progress bar counts optimizer steps over the whole run, across epochs and resumes."""

from paca_lightning import PaCAConfig, PaCAFineTuneModule
from paca_lightning.training import StepProgressBar
from tests.helpers import make_tiny_llama
from tests.lightning_helpers import loader, quiet_trainer, token_examples


def as_terminal(monkeypatch):
    """Report standard output as a terminal, where the bar shows. Called in the test itself: pytest
    swaps in capsys's stream only when the test starts, after fixtures have run."""
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)


def fit_with_bar(root, max_steps, **options):
    bar = StepProgressBar()
    module = PaCAFineTuneModule(make_tiny_llama(), PaCAConfig(rank=2, alpha=4), learning_rate=1e-3)
    trainer = quiet_trainer(root, max_steps=max_steps, enable_progress_bar=True, callbacks=[bar], **options)
    trainer.fit(module, loader(token_examples(6), 2))  # 3 batches an epoch
    return trainer, bar


def test_one_bar_counts_steps_to_max_steps_across_epochs(tmp_path, capsys, monkeypatch):
    as_terminal(monkeypatch)
    trainer, bar = fit_with_bar(tmp_path, max_steps=7)
    assert trainer.current_epoch >= 2  # the run spans several epochs ...
    assert (bar.train_progress_bar.n, bar.train_progress_bar.total) == (7, 7)  # ... and one bar spans the run
    frames = capsys.readouterr().out.replace("\r", "\n")
    assert "Training" in frames and "Epoch" not in frames and "v_num" not in frames


def test_the_bar_counts_optimizer_steps_under_gradient_accumulation(tmp_path, monkeypatch):
    as_terminal(monkeypatch)
    _, bar = fit_with_bar(tmp_path, max_steps=3, accumulate_grad_batches=2)
    assert (bar.train_progress_bar.n, bar.train_progress_bar.total) == (3, 3)


def test_the_bar_turns_itself_off_when_output_is_not_a_terminal(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdout.isatty", lambda: False)
    _, bar = fit_with_bar(tmp_path, max_steps=2)
    assert bar.is_disabled
    assert "Training" not in capsys.readouterr().out
