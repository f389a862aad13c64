"""The fine-tuning methods a benchmark compares, each turned into a ready-to-step `Trainee`.

- ``full``: every parameter trains (AdamW over all of them).
- ``lora`` / ``dora``: peft LoRA / DoRA adapters on every Linear except the output head, the adapters
  in the model's dtype (bf16 on a bf16 model, as in the PaCA authors' bf16 runs).
- ``lora-fp32``: peft LoRA with peft's default float32 adapters. On a half-precision model each
  adapted layer then also saves a float32 copy of its input, so ratios against it flatter PaCA;
  both are reported so that each ratio says which LoRA it divides by.
- ``paca``: this package, on the same layers.
- ``floor``: every weight frozen, only input gradients flow (the input embeddings' output requires
  grad, so backward runs through every layer). Any method must compute at least these gradients and
  keep at least these activations, so no method can be faster or store less.

Equal parameter budget (the paper's comparison, Sec. 4): a LoRA adapter of rank ``r`` on a square
``d x d`` layer trains ``2 r d`` values, PaCA of rank ``2r`` trains ``d x 2r``, the same count. The
benchmark therefore gives PaCA twice the LoRA rank unless told otherwise.

Two losses are measured: ``dense`` (the model's full logits, then cross-entropy: what a plain
transformers training loop does) and ``chunked`` (`paca_lightning.loss.chunked_causal_lm_loss` on
the hidden states: the logits, often the largest activation, are never stored).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..config import PaCAConfig
from ..loss import causal_lm_loss, chunked_causal_lm_loss
from ..model import apply_paca

METHODS = ("full", "lora", "lora-fp32", "dora", "paca", "floor")
LOSSES = ("dense", "chunked")


@dataclass(frozen=True)
class Variant:
    """One measured configuration: a method trained with one loss."""

    method: str
    loss: str

    @property
    def label(self) -> str:
        return f"{self.method}/{self.loss}"


@dataclass
class Trainee:
    """A model prepared for one method, with its optimizer (none for the floor)."""

    method: str
    rank: Optional[int]
    causal_lm: nn.Module
    optimizer: Optional[torch.optim.Optimizer]

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.causal_lm.parameters() if p.requires_grad]


def prepare(method: str, model: nn.Module, *, lora_rank: int, paca_rank: int,
            target_modules: list[str] | str, learning_rate: float = 1e-4) -> Trainee:
    """Turn ``model`` (modified in place) into a `Trainee` for ``method``."""
    if method == "full":
        model.requires_grad_(True)
        rank = None
    elif method in ("lora", "lora-fp32", "dora"):
        from peft import LoraConfig, get_peft_model

        # Dropout 0: a dropout mask would add a saved tensor per layer that the other methods lack.
        config = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                            target_modules=target_modules, use_dora=method == "dora")
        # peft's default (autocast_adapter_dtype=True) keeps adapters in float32 on a half model
        model = get_peft_model(model, config, autocast_adapter_dtype=method == "lora-fp32").get_base_model()
        rank = lora_rank
    elif method == "paca":
        model = apply_paca(model, PaCAConfig(rank=paca_rank, alpha=2 * paca_rank, target_modules=target_modules))
        rank = paca_rank
    elif method == "floor":
        model.requires_grad_(False)
        model.enable_input_require_grads()
        rank = None
    else:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate) if trainable else None
    return Trainee(method, rank, model, optimizer)


def check_chunked_loss_applies(model: nn.Module) -> None:
    """The chunked loss reproduces ``lm_head`` + cross-entropy only for a plain linear head."""
    config = getattr(model, "config", None)
    for attribute in ("final_logit_softcapping", "logit_scale"):
        if getattr(config, attribute, None) not in (None, 1.0):
            raise ValueError(f"the chunked loss computes plain linear logits, but this model's config sets "
                             f"{attribute}={getattr(config, attribute)!r}; benchmark it with --loss dense")


def loss_function(loss: str, chunk_size: int = 1024) -> Callable[[nn.Module, dict], torch.Tensor]:
    """``fn(causal_lm, batch) -> scalar loss`` for the named loss."""
    if loss == "dense":
        def dense(causal_lm, batch):
            return causal_lm_loss(causal_lm(input_ids=batch["input_ids"]).logits, batch["labels"])
        return dense
    if loss == "chunked":
        def chunked(causal_lm, batch):
            # `base_model` is transformers' name for the backbone under the head (LlamaModel here).
            hidden = causal_lm.base_model(input_ids=batch["input_ids"]).last_hidden_state
            head = causal_lm.get_output_embeddings()
            return chunked_causal_lm_loss(hidden, head.weight, batch["labels"], lm_head_bias=head.bias,
                                          chunk_size=chunk_size)
        return chunked
    raise ValueError(f"unknown loss {loss!r}; choose from {', '.join(LOSSES)}")


def train_step(trainee: Trainee, compute_loss: Callable, batch: dict,
               after_backward: Callable = lambda: None) -> torch.Tensor:
    """Forward, backward and (when anything trains) an AdamW step; returns the detached loss.

    ``after_backward`` runs between backward and the optimizer step (HPU lazy mode marks a step there).
    """
    loss = compute_loss(trainee.causal_lm, batch)
    loss.backward()
    after_backward()
    if trainee.optimizer is not None:
        trainee.optimizer.step()
        trainee.optimizer.zero_grad(set_to_none=True)
    return loss.detach()
