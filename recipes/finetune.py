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

from recipe_cli import TINY_MODEL_DEFAULTS, run_recipe

from paca_lightning.data.own_data import OwnDataModule

# The offline demo's settings (recipe_cli.TINY_MODEL_DEFAULTS), writing to its own folder.
DEFAULTS = {**TINY_MODEL_DEFAULTS, "trainer.default_root_dir": "out/finetune"}


def main(args=None) -> None:
    run_recipe(OwnDataModule, DEFAULTS, args)


if __name__ == "__main__":
    main()
