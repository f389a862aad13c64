"""What the recipes share: a LightningCLI around `PaCAFineTuneModule` and the end-of-run report.

A recipe is ``RecipeCLI(<its data module>, <its defaults>).fit()``; every knob is a command-line or
YAML option (``--config``, ``--trainer.*``, ``--model.*``, ``--data.*``, ``--report.*``). The
data module's tokenizer follows ``--model.model``, so the two cannot disagree.

After ``fit`` the recipe prints what a user checks first: the loss at the start and the end,
tokens per second, a sample reply before and after fine-tuning, and where the adapter, the
merged model, the loss curve and the checkpoints were written.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
import transformers
from jsonargparse import ArgumentError
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from paca_lightning import PaCAConfig
from paca_lightning.atomic import folder_lock
from paca_lightning.data import TINY_LLAMA_DIR
from paca_lightning.training import (
    ADAPTER_DIRNAME,
    LORA_ADAPTER_DIRNAME,
    MERGED_DIRNAME,
    PaCAFineTuneModule,
    StepProgressBar,
    TrainingProgress,
)

# torchdata's StatefulDataLoader calls an API torch 2.13 deprecated; the warning is not the user's to act on
warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
# Lightning compares log_every_n_steps with the batches of one epoch; recipes run max_steps over
# many short epochs and log by global step, so every interval is logged anyway.
warnings.filterwarnings("ignore", message=r"The number of training batches \(\d+\) is smaller than the logging")
# Lightning 2.6 calls its own deprecated pytree API on every run, peft a deprecated transformers one
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated")
# bitsandbytes tries to fetch an optional fused CPU kernel from the hub when imported and warns when
# it cannot; QPaCA does not use that kernel
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


class _DropNoise(logging.Filter):
    """Lightning prints a tip recommending a cloud product on every run; it is not about the run.
    In a terminal it also prints "`Trainer.fit` stopped: `max_steps=N` reached" while the progress
    bar, already showing N/N, is still open: the line lands inside the bar, which then draws itself
    a second time. The plain progress lines of a non-terminal run keep it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if message.startswith("\N{ELECTRIC LIGHT BULB} Tip:"):
            return False
        return not (message.startswith("`Trainer.fit` stopped: `max_steps=") and sys.stdout.isatty())


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropNoise())
# transformers draws a bar for every load and save of a tiny model; the run's own progress is what matters
transformers.utils.logging.disable_progress_bar()


# What bad input raises (options, files, offline hub names, missing packages): the message already
# names the value and the fix, so the user sees it without the traceback around it.
INPUT_ERRORS = (ValueError, OSError, ConnectionError, ImportError)
TRACEBACK_VARIABLE = "PACA_LIGHTNING_TRACEBACK"
# The offline demo of the OASST1 and own-data recipes: the tiny model shipped in the package on a CPU.
TINY_MODEL_DEFAULTS = {
    # The demo's matrices are 128 wide: a second thread gains nothing, and OpenMP threads that
    # spin-wait for a busy core slow a run on a shared machine many times over.
    "cpu_threads": 1,
    "model.model": str(TINY_LLAMA_DIR),
    "model.paca": {"rank": 32, "alpha": 64, "target_modules": "all-linear", "seed": 0},
    "model.learning_rate": 3e-3,
    "model.warmup_steps": 10,
    "model.min_lr_ratio": 0.1,
    "data.max_length": 256,
    "data.packing": True,
    "data.batch_size": 4,
    "trainer.max_steps": 120,
    "trainer.log_every_n_steps": 10,
    "trainer.val_check_interval": 40,
    "checkpoint.every_n_train_steps": 40,
    "trainer.check_val_every_n_epoch": None,
    "trainer.enable_model_summary": False,
}
BAD_INPUT_EXIT_STATUS = 2  # as argparse uses for usage errors: every kind of bad input ends alike
# 128 + SIGTERM, as a shell reports a process the signal ended: a scheduler must not record a
# pre-empted run as a success (Lightning's SIGTERMException alone exits with 0)
STOPPED_BY_SIGTERM_EXIT_STATUS = 143
# What a recipe run writes into its folder; a second run there would mix its outputs with these.
RUN_OUTPUTS = (ADAPTER_DIRNAME, LORA_ADAPTER_DIRNAME, MERGED_DIRNAME, "loss_curve.png", "checkpoints")


def run_recipe(datamodule_class: type, defaults: dict[str, Any], args: Optional[list[str]] = None,
               extra_callbacks: Optional[dict[str, type]] = None) -> None:
    """Parse, train and report; bad input ends the process with its message and exit status 2, not
    a traceback (set ``PACA_LIGHTNING_TRACEBACK=1`` for the traceback)."""
    recipe = Path(sys.argv[0]).name
    try:
        RecipeCLI(datamodule_class, defaults, extra_callbacks, args=args).fit()
    except RecipeArgumentError as error:
        if os.environ.get(TRACEBACK_VARIABLE, "") not in ("", "0"):
            raise
        print(f"{recipe}: error: {error}\n(python recipes/{recipe} --help lists every option)", file=sys.stderr)
        sys.exit(BAD_INPUT_EXIT_STATUS)
    except SIGTERMException:  # StopSignalCheckpoint has saved the run and said how to resume
        sys.exit(STOPPED_BY_SIGTERM_EXIT_STATUS)
    except INPUT_ERRORS as error:
        if os.environ.get(TRACEBACK_VARIABLE, "") not in ("", "0"):
            raise
        print(f"{recipe}: error: {type(error).__name__}: {error}\n({TRACEBACK_VARIABLE}=1 shows the traceback)",
              file=sys.stderr)
        sys.exit(BAD_INPUT_EXIT_STATUS)


def describe_argument_error(message: str, options: list[str]) -> str:
    """jsonargparse's message cut to the part that matters, with the closest option names.

    An unknown option gets "did you mean"; a bad value inside a nested option (``--model.paca.rank``)
    is reported under its full name with the innermost reason, not the union of every type tried.
    """
    unknown = re.match(r"unrecognized arguments: (.*)", message.strip(), flags=re.S)
    if unknown:
        parts = []
        for given in unknown.group(1).split():
            name = given.split("=", 1)[0]
            close = difflib.get_close_matches(name, options, n=3, cutoff=0.75) if name.startswith("--") else []
            parts.append(f"unknown option {name}" + (f"; did you mean {' or '.join(close)}?" if close else "")
                         if name.startswith("--") else f"unexpected argument {given!r}")
        return "\n".join(parts)
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    nested = re.search(r"Option '([^']+)' is not accepted", message)
    parent = re.match(r'Parser key "([^"]+)"', lines[0]) if lines else None
    if nested and parent:  # --model.paca.rnk: a field the config class does not have
        name = f"--{parent.group(1)}.{nested.group(1)}"
        close = difflib.get_close_matches(name, options, n=3, cutoff=0.75)
        return f"unknown option {name}" + (f"; did you mean {' or '.join(close)}?" if close else "")
    keys = []
    for line in lines:
        key = re.match(r'Parser key "([^"]+)"', line)
        if key and key.group(1) not in keys and not any(k.endswith("." + key.group(1)) for k in keys):
            keys.append(key.group(1))
    reasons = [line for line in lines if "PaCAConfig." in line or "LoRASettings." in line]
    reasons = reasons or [line for line in lines if line.startswith(("Expected", "- Expected")) or "Got value" in line]
    reasons = reasons or [line for line in lines if not line.startswith(("Parser key", "Does not validate"))]
    reason = (reasons or lines or [message])[0].lstrip("- ")
    return f"--{'.'.join(keys)}: {reason}" if keys else reason


class RecipeArgumentError(ValueError):
    """A command-line or config option the recipe cannot take; the message names it and why."""


def _option_names(parser) -> list[str]:
    """Every option a recipe's parser accepts, for "did you mean"."""
    names = [option for action in parser._actions for option in action.option_strings]
    names += [f"--model.paca.{field}" for field in PaCAConfig.__dataclass_fields__]
    return [name for name in names if name.startswith("--")]


class RecipeReport(L.Callback):
    """Records the training loss and generates a sample reply; the throughput it prints is the
    run's `TrainingProgress` measurement.

    Args:
        sample_prompt: user message answered with the chat template before and after training.
            Empty: no sample.
        max_new_tokens: length limit of the sample reply.
        loss_curve: write ``<default_root_dir>/loss_curve.png``.
    """

    def __init__(self, sample_prompt: str = "How can I sleep better?", max_new_tokens: int = 48,
                 loss_curve: bool = True):
        self.sample_prompt = sample_prompt
        self.max_new_tokens = max_new_tokens
        self.loss_curve = loss_curve
        self.losses: list[tuple[int, float]] = []
        self.samples: dict[str, str] = {}
        self.progress: Optional[TrainingProgress] = None

    def state_dict(self) -> dict[str, Any]:
        """Checkpointed, so a resumed run reports and plots the whole run, not only its tail."""
        return {"losses": self.losses, "samples": self.samples}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.losses = [(int(step), float(loss)) for step, loss in state_dict["losses"]]
        self.samples = dict(state_dict["samples"])

    def _sample(self, pl_module: L.LightningModule, when: str) -> None:
        if self.sample_prompt and hasattr(pl_module, "generate") and pl_module.trainer.is_global_zero:
            self.samples[when] = pl_module.generate(self.sample_prompt, self.max_new_tokens, chat=True)

    def on_train_start(self, trainer, pl_module) -> None:
        self.progress = next((c for c in trainer.callbacks if isinstance(c, TrainingProgress)), None)
        if "before" not in self.samples:  # a resumed run keeps the reply of the model before any training
            self._sample(pl_module, "before")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append((trainer.global_step, float(loss.detach())))

    def on_train_end(self, trainer, pl_module) -> None:
        self._sample(pl_module, "after")

    def write_loss_curve(self, path: Path) -> Path:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed on servers
        import matplotlib.pyplot as plt

        steps = [step for step, _ in self.losses]
        values = [value for _, value in self.losses]
        window = max(1, len(values) // 20)
        smoothed = [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
                    for i in range(len(values))]
        figure, axes = plt.subplots(figsize=(6, 3.5))
        axes.plot(steps, values, alpha=0.35, label="training loss (per batch)")
        axes.plot(steps, smoothed, label=f"moving mean of {window}")
        axes.set_xlabel("optimizer step")
        axes.set_ylabel("loss (assistant tokens)")
        axes.legend()
        figure.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=120)
        plt.close(figure)
        return path

    def summary(self) -> list[str]:
        if not self.losses:
            return ["no training step ran"]
        head = [v for _, v in self.losses[:max(1, len(self.losses) // 10)]]
        tail = [v for _, v in self.losses[-max(1, len(self.losses) // 10):]]
        lines = [f"training loss: {sum(head) / len(head):.3f} (first {len(head)} steps) -> "
                 f"{sum(tail) / len(tail):.3f} (last {len(tail)} steps)"]
        if self.progress is not None and self.progress.seconds:
            lines.append(f"throughput: {self.progress.tokens_per_second:,.0f} tokens/s per process "
                         f"({self.progress.tokens:,} tokens in {self.progress.seconds:.1f} s of training, "
                         "first step excluded)")
        for when, text in self.samples.items():
            lines.append(f"sample {when} fine-tuning, user: {self.sample_prompt!r}\n  assistant: {text.strip()!r}")
        return lines


class RecipeCLI(LightningCLI):
    """LightningCLI for `PaCAFineTuneModule` with a recipe's data module and defaults.

    Args:
        datamodule_class: the recipe's LightningDataModule.
        defaults: ``{"model.model": ..., "trainer.max_steps": ...}`` applied before configs and
            command-line options, so a bare ``python recipes/<name>.py`` runs the recipe's demo.
        extra_callbacks: ``{group name: callback class}`` added to every run and configurable as
            ``--<group>.<option>`` (the MMLU evaluator).
        args: command-line arguments (``None``: ``sys.argv``).
    """

    def __init__(self, datamodule_class: type, defaults: dict[str, Any],
                 extra_callbacks: Optional[dict[str, type]] = None, args: Optional[list[str]] = None):
        self.recipe_defaults = defaults
        self.extra_callbacks = extra_callbacks or {}
        # The module configures its own optimizer and schedule (--model.learning_rate, ...), so
        # LightningCLI's --optimizer/--lr_scheduler would be options that do nothing.
        super().__init__(PaCAFineTuneModule, datamodule_class, args=args, save_config_kwargs={"overwrite": True},
                         run=False, auto_configure_optimizers=False,
                         parser_kwargs={"allow_abbrev": False, "exit_on_error": False})

    def parse_arguments(self, parser, args) -> None:
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as error:
            raise RecipeArgumentError(describe_argument_error(str(error), _option_names(parser))) from error

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as error:  # a config class refused a value (PaCAConfig.rank=0, ...)
            if "Does not validate against any of the Union subtypes" not in str(error):
                raise
            raise RecipeArgumentError(describe_argument_error(str(error), [])) from error

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> L.Trainer:
        if config.get("enable_progress_bar") is not False:
            callbacks = [*callbacks, StepProgressBar()]  # one bar over the run's steps, not per epoch
        if config.get("enable_checkpointing") is False:
            # --trainer.enable_checkpointing=false: drop the recipe's --checkpoint.* callback, which
            # Lightning would otherwise refuse beside that setting.
            callbacks = [callback for callback in callbacks if not isinstance(callback, ModelCheckpoint)]
        return super()._instantiate_trainer(config, callbacks)

    def before_instantiate_classes(self) -> None:
        if self.config.get("cpu_threads"):
            torch.set_num_threads(self.config.cpu_threads)

    def fit(self) -> L.Trainer:
        """Train with the parsed configuration (resuming from ``--ckpt_path``), then print the report.

        Rank 0 holds the run folder's lock meanwhile: a second run started into the same folder
        is refused instead of writing checkpoints and exports over this one's."""
        root = Path(self.trainer.default_root_dir)
        with folder_lock(root) if self.trainer.is_global_zero else contextlib.nullcontext():
            return self._fit()

    def _fit(self) -> L.Trainer:
        self._claim_run_folder()
        checkpoint = self.trainer.checkpoint_callback
        if checkpoint is not None and checkpoint.dirpath is None:
            # One folder per run directory, not per logger version: --ckpt_path last finds the
            # previous run's last.ckpt (Lightning's default would look in a fresh version_N/).
            checkpoint.dirpath = str(Path(self.trainer.default_root_dir) / "checkpoints")
        self.trainer.fit(self.model, datamodule=self.datamodule, ckpt_path=self.config.ckpt_path)
        self.after_fit()
        return self.trainer

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--cpu_threads", type=Optional[int], default=None,
                            help="torch intra-op threads (torch.set_num_threads); default: torch's choice")
        parser.add_argument("--ckpt_path", type=Optional[str], default=None,
                            help="resume from this checkpoint; 'last' = the newest last.ckpt of this run's "
                                 "checkpoint folder (written every --checkpoint.every_n_train_steps)")
        parser.add_argument("--overwrite", type=bool, default=False,
                            help="start afresh in a --trainer.default_root_dir that holds a previous run's "
                                 f"outputs ({', '.join(RUN_OUTPUTS)}), deleting them first")
        parser.link_arguments("model.model", "data.tokenizer")
        # One checkpoint callback, configurable as --checkpoint.*: a last.ckpt every N optimizer
        # steps, so a killed run resumes with --ckpt_path last (Lightning's default saves per epoch).
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.every_n_train_steps": 50,
                             "seed_everything": 0})  # reproducible runs unless a seed is given
        parser.add_lightning_class_args(RecipeReport, "report")
        for name, callback_class in self.extra_callbacks.items():
            parser.add_lightning_class_args(callback_class, name)
        parser.set_defaults(self.recipe_defaults)

    def after_fit(self) -> None:
        trainer, report = self.trainer, self._report_callback()
        log_dir = trainer.log_dir  # a collective in distributed runs: every rank must ask
        if not trainer.is_global_zero:
            return
        root = Path(trainer.default_root_dir).resolve()
        lines = ["", "=" * 72, *report.summary()]
        outputs = []
        if report.loss_curve and report.losses:
            outputs.append(("loss curve", report.write_loss_curve(root / "loss_curve.png")))
        adapter = LORA_ADAPTER_DIRNAME if self.model.method == "lora" else ADAPTER_DIRNAME
        for label, directory in (("adapter", root / adapter), ("merged model", root / MERGED_DIRNAME)):
            if directory.exists():
                outputs.append((label, directory))
        # last.ckpt first: what --ckpt_path last resumes from
        checkpoint = getattr(trainer.checkpoint_callback, "last_model_path", "") or \
            getattr(trainer.checkpoint_callback, "best_model_path", "")
        if checkpoint:
            outputs.append(("checkpoint", Path(checkpoint).resolve()))
        elif trainer.checkpoint_callback is None:
            outputs.append(("checkpoint", "none written (--trainer.enable_checkpointing=false)"))
        else:
            outputs.append(("checkpoint", "none written (the run ended before --checkpoint.every_n_train_steps steps)"))
        outputs.append(("config", Path(log_dir or root).resolve() / "config.yaml"))
        lines += [f"{label + ':':<14}{path}" for label, path in outputs]
        lines.append("=" * 72)
        print("\n".join(lines), flush=True)

    def _claim_run_folder(self) -> None:
        """Refuse to mix a new run's outputs with a previous run's in one folder, unless told.

        ``--ckpt_path`` continues the previous run (its outputs are replaced by the continued
        run's at the end); ``--overwrite=true`` deletes them now. Only rank 0 deletes.
        """
        root = Path(self.trainer.default_root_dir)
        found = [name for name in RUN_OUTPUTS if (root / name).exists()]
        if not found or self.config.ckpt_path:
            return
        if not self.config.overwrite:
            raise ValueError(f"{root} holds the outputs of a previous run ({', '.join(found)}). Continue that run "
                             "with --ckpt_path last, write this one elsewhere with "
                             f"--trainer.default_root_dir={root}-2, or replace it with --overwrite=true")
        if self.trainer.is_global_zero:
            for name in found:
                path = root / name
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        self.trainer.strategy.barrier("paca_recipe_overwrite")

    def _report_callback(self) -> RecipeReport:
        return next(c for c in self.trainer.callbacks if isinstance(c, RecipeReport))

