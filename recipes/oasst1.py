"""Instruction-tune a causal LM with PaCA on OpenAssistant OASST1.

    lightning run recipes/oasst1.py                      # offline demo: tiny pretrained LLaMA, shipped sample
    python recipes/oasst1.py --config recipes/configs/llama3_8b_oasst1_paca.yaml    # the paper's setup
    lightning run --devices 2 recipes/oasst1.py --trainer.max_steps=20
    python recipes/oasst1.py --help                      # every option

The defaults below are the offline demo: the tiny LLaMA-architecture model in the package
assets (pretrained by ``scripts/pretrain_tiny_base.py`` on Python's own documentation), its
byte-level tokenizer, and the OASST1-schema sample written for this project. It runs on a CPU in
well under a minute (docs/recipes.md gives measured times) and ends by printing the loss,
tokens/s, a sample reply and the paths of the adapter, the merged model and the loss curve.
"""

from recipe_cli import run_recipe

from paca_lightning.data import TINY_LLAMA_DIR
from paca_lightning.data.oasst1 import OASST1DataModule

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
    "trainer.default_root_dir": "out/oasst1",
    "trainer.enable_model_summary": False,
}


def main(args=None) -> None:
    run_recipe(OASST1DataModule, DEMO_DEFAULTS, args)


if __name__ == "__main__":
    main()
