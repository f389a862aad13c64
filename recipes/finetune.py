"""Fine-tune a causal LM with PaCA on your own data.

    lightning run recipes/finetune.py --data.path my_data.jsonl           # the shipped tiny model, on a CPU
    lightning run recipes/finetune.py --data.path my_data.jsonl --model.model meta-llama/Llama-3.1-8B
    lightning run recipes/finetune.py --data.path docs/examples/alpaca.json --data.format instruction
    python recipes/finetune.py --help                                     # every option

``--data.path`` takes a .jsonl/.json/.parquet/.csv file, a directory of train*/validation* files
or a hub dataset name; the formats are those of TRL, torchtune, LitGPT and axolotl (messages,
ShareGPT, Alpaca instructions, prompt/completion, plain text), decided from the columns unless
``--data.format`` says (docs/your-own-data.md). The training path, report, checkpoints and
exports are those of recipes/oasst1.py.
"""

from recipe_cli import run_recipe

from paca_lightning.data import TINY_LLAMA_DIR
from paca_lightning.data.finetune import FineTuneDataModule

DEFAULTS = {
    "cpu_threads": 1,  # the default model's matrices are 128 wide: see recipes/oasst1.py
    "model.model": str(TINY_LLAMA_DIR),
    "model.paca": {"rank": 32, "alpha": 64, "target_modules": "all-linear", "seed": 0},
    "model.learning_rate": 3e-3,
    "model.warmup_steps": 10,
    "model.min_lr_ratio": 0.1,
    "data.max_length": 256,
    "data.packing": True,
    "data.batch_size": 4,
    "trainer.max_steps": 60,
    "trainer.log_every_n_steps": 10,
    "trainer.val_check_interval": 20,
    "checkpoint.every_n_train_steps": 20,
    "trainer.check_val_every_n_epoch": None,
    "trainer.default_root_dir": "out/finetune",
    "trainer.enable_model_summary": False,
    "report.sample_prompt": "",
}


def main(args=None) -> None:
    run_recipe(FineTuneDataModule, DEFAULTS, args)


if __name__ == "__main__":
    main()
