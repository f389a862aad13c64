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

from recipe_cli import TINY_MODEL_DEFAULTS, run_recipe

from paca_lightning.data.oasst1 import OASST1DataModule

DEMO_DEFAULTS = {**TINY_MODEL_DEFAULTS, "trainer.default_root_dir": "out/oasst1"}


def main(args=None) -> None:
    run_recipe(OASST1DataModule, DEMO_DEFAULTS, args)


if __name__ == "__main__":
    main()
