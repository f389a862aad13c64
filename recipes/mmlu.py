"""Fine-tune a causal LM with PaCA on MMLU questions and report 5-shot accuracy before and after.

    lightning run recipes/mmlu.py                         # offline demo: tiny LLaMA, shipped MMLU-schema sample
    python recipes/mmlu.py --config recipes/configs/llama2_7b_mmlu_paca.yaml        # the paper's setup
    python recipes/mmlu.py --data.data_path=/data/mmlu    # local files: auxiliary_train/dev/test .jsonl/.parquet

The evaluation (``--mmlu.*``) scores the answer letters by log-likelihood after five exemplars
from the subject's dev split and prints accuracy per subject and overall, before fine-tuning
(``--mmlu.before_fit=false`` skips that) and after it.
"""

from recipe_cli import run_recipe

from paca_lightning.data import TINY_LLAMA_DIR
from paca_lightning.data.mmlu import MMLUDataModule, MMLUEvaluation

DEMO_DEFAULTS = {
    "cpu_threads": 1,  # tiny matrices: see recipes/oasst1.py
    "model.model": str(TINY_LLAMA_DIR),
    "model.paca": {"rank": 16, "alpha": 64, "target_modules": "all-linear", "seed": 0},
    "model.learning_rate": 1e-3,
    "model.warmup_steps": 5,
    "data.max_length": 1024,
    "data.batch_size": 8,
    "trainer.max_steps": 30,
    "trainer.log_every_n_steps": 5,
    "trainer.default_root_dir": "out/mmlu",
    "trainer.enable_model_summary": False,
    "report.sample_prompt": "",
}


def main(args=None) -> None:
    run_recipe(MMLUDataModule, DEMO_DEFAULTS, args, extra_callbacks={"mmlu": MMLUEvaluation})


if __name__ == "__main__":
    main()
