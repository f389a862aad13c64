"""The models a benchmark runs on: built-in size presets or any transformers causal LM.

Presets are built from a config with a fixed seed, so the parent process and the child processes
that measure peak memory build bit-identical weights without downloading anything:

- ``tiny``: 2 layers, hidden 64; for tests and smoke runs.
- ``llama-50m``: the LLaMA-shaped model of the project's baseline measurements (hidden 512, intermediate 1376,
  4 layers, 8 heads, vocabulary 32000): big enough that the matmuls, not Python, dominate a CPU step.
- ``llama-1b``: the shape of LLaMA-3.2-1B (hidden 2048, intermediate 8192, 16 layers, 32 query and
  8 key/value heads, vocabulary 128256, tied embeddings), random weights: speed and memory do not
  depend on the values, so a GPU user can measure a 1B model without downloading one.

Anything else is passed to ``AutoModelForCausalLM.from_pretrained`` (a hub name or a local path).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

PRESETS = {
    "tiny": dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=1024),
    "llama-50m": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=8, vocab_size=32000),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(name_or_path: str, dtype: torch.dtype, device: torch.device, seed: int = 0) -> nn.Module:
    """A causal LM in ``dtype`` on ``device``: a preset built from its config, or a pretrained model."""
    if name_or_path in PRESETS:
        torch.manual_seed(seed)
        # Positions are rotary: no learned table limits the sequence lengths the benchmark may try.
        config = LlamaConfig(**PRESETS[name_or_path], max_position_embeddings=131072)
        model = LlamaForCausalLM(config).to(dtype)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
        except (OSError, ValueError) as error:
            raise ValueError(f"--model {name_or_path!r} is neither a preset ({', '.join(PRESETS)}) nor a "
                             f"loadable transformers causal LM (hub name or local directory): {error}") from error
    return model.to(device)


def vocab_size_of(model: nn.Module) -> int:
    return model.get_output_embeddings().weight.shape[0]


def random_batch(vocab_size: int, batch_size: int, sequence_length: int, device: torch.device,
                 seed: int = 0) -> dict[str, torch.Tensor]:
    """Uniform random token ids; every position is scored (labels = inputs, shifted by the loss)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (batch_size, sequence_length), generator=generator)
    input_ids = input_ids.to(device)
    return {"input_ids": input_ids, "labels": input_ids}
