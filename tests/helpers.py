"""What tests share: tiny models built from configs (nothing is downloaded), token batches, and the
saved-tensor counter. Plain functions; the pytest fixtures are in conftest.py."""

import torch
from transformers import (
    FalconConfig,
    FalconForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
)

from paca_lightning.bench.measure import SavedTensors


def make_tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    settings = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    config = LlamaConfig(**{**settings, **overrides})
    return LlamaForCausalLM(config).to(dtype)


def make_tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def make_tiny_falcon(seed: int = 0) -> FalconForCausalLM:
    """Falcon's linear layers are ``FalconLinear``, an ``nn.Linear`` subclass with the plain forward."""
    torch.manual_seed(seed)
    config = FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
                          new_decoder_architecture=False, multi_query=True, bias=True,
                          hidden_dropout=0.0, attention_dropout=0.0)
    return FalconForCausalLM(config)


def make_tiny_mixtral(seed: int = 0) -> MixtralForCausalLM:
    """Routed experts are fused 3-D parameters in transformers 5, not ``nn.Linear`` layers."""
    torch.manual_seed(seed)
    config = MixtralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=128,
                           max_position_embeddings=64)
    return MixtralForCausalLM(config)


def token_batch(batch_size: int = 2, length: int = 12, vocab: int = 128, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch_size, length), generator=generator)
    return {"input_ids": input_ids, "labels": input_ids.clone()}


def saved_bytes(fn, parameters=()):
    """Run ``fn`` and return (bytes autograd saved for backward, the saved tensors, fn's result),
    counted as the benchmark counts them (`paca_lightning.bench.measure.SavedTensors`)."""
    with SavedTensors(parameters) as saved:
        result = fn()
    return saved.nbytes, saved.tensors, result
