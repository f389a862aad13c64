"""Fine-tune a causal LM with PaCA on your own data.

    lightning run recipes/finetune.py --data.path my_data.jsonl          # tiny shipped model, a minute on a CPU
    lightning run recipes/finetune.py --data.path my_data.jsonl --model.model meta-llama/Llama-3.2-1B
    python recipes/finetune.py --data.path train_dir/ --data.format instruction
    python recipes/finetune.py --help                                    # every option

``--data.path`` takes a .jsonl, .json, .parquet or .csv file, a directory of ``train*`` (and
``validation*``) files, or a hub dataset name; ``--data.format`` is auto, messages, instruction,
prompt_completion or text (docs/your-own-data.md shows each). Training, the report, the
checkpoints and the exports (adapter and merged model) are those of recipes/oasst1.py; with no
``--model.model`` the small pretrained model shipped in the package is trained, with the same
demo settings as the OASST1 recipe.
"""

from recipe_cli import run_recipe

from paca_lightning.data import TINY_LLAMA_DIR
from paca_lightning.data.own_data import OwnDataModule

DEMO_DEFAULTS = {
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
    "trainer.default_root_dir": "out/finetune",
    "trainer.enable_model_summary": False,
}


def main(args=None) -> None:
    run_recipe(OwnDataModule, DEMO_DEFAULTS, args)


if __name__ == "__main__":
    main()
