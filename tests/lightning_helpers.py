"""Shared pieces of the Lightning tests: token data, a quiet Trainer, reading trained columns."""

from __future__ import annotations

import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

from paca_lightning import paca_layers

VOCAB = 128


def token_examples(count: int = 16, length: int = 12, seed: int = 0, masked_prompt: int = 0) -> list[dict]:
    """``count`` random sequences of equal length; the first ``masked_prompt`` labels are -100."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(count):
        input_ids = torch.randint(0, VOCAB, (length,), generator=generator)
        labels = input_ids.clone()
        labels[:masked_prompt] = -100
        examples.append({"input_ids": input_ids, "attention_mask": torch.ones(length, dtype=torch.long),
                         "labels": labels})
    return examples


def loader(examples: list[dict], batch_size: int) -> DataLoader:
    return DataLoader(examples, batch_size=batch_size)


def quiet_trainer(root, **overrides) -> Trainer:
    settings = dict(accelerator="cpu", devices=1, default_root_dir=str(root), enable_progress_bar=False,
                    enable_model_summary=False, logger=False, enable_checkpointing=False, log_every_n_steps=1)
    return Trainer(**{**settings, **overrides})


def trained_columns(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every layer's ``paca_weight``, detached copies keyed by module name."""
    return {name: layer.paca_weight.detach().clone() for name, layer in paca_layers(model)}


def assert_columns_in_weights(model: torch.nn.Module) -> None:
    """The PaCA invariant: each weight holds ``scaling * paca_weight`` in its trained columns."""
    for name, layer in paca_layers(model):
        expected = (layer.paca_weight * layer.scaling).to(layer.weight.dtype)
        actual = layer.weight.index_select(1, layer.paca_indices)
        assert torch.equal(actual, expected), name
