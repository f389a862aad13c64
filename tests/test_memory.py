"""Activation memory on a LLaMA-shaped model (hidden 512, 4 layers, vocabulary 32000; batch 2 x 512, rank 16)."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from paca_lightning import PaCAConfig, apply_paca, paca_layers
from tests.helpers import saved_bytes

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BATCH, LENGTH, RANK = 2, 512, 16


def llama_50m():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                                        num_attention_heads=8, num_key_value_heads=8, vocab_size=32000,
                                        max_position_embeddings=LENGTH))


def step_saved_bytes(model) -> int:
    model.train()
    input_ids = torch.randint(0, 32000, (BATCH, LENGTH), generator=torch.Generator().manual_seed(0))
    nbytes, _, loss = saved_bytes(lambda: model(input_ids=input_ids, labels=input_ids).loss,
                                  parameters=list(model.parameters()))
    loss.backward()
    return nbytes


@pytest.fixture(scope="module")
def measured():
    floor = llama_50m()
    for param in floor.parameters():
        param.requires_grad_(False)
    floor.enable_input_require_grads()  # only input gradients flow: the least any method can store
    paca = apply_paca(llama_50m(), PaCAConfig(rank=RANK, alpha=2 * RANK, target_modules=TARGETS))
    lora = get_peft_model(llama_50m(), LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS,
                                                  lora_dropout=0.0))
    figures = {"floor": step_saved_bytes(floor), "paca": step_saved_bytes(paca),
               "lora": step_saved_bytes(lora)}
    figures["paca_layers"] = len(list(paca_layers(paca)))
    return figures


def test_paca_stores_no_more_than_the_frozen_floor_plus_one_percent(measured):
    assert measured["paca"] <= 1.01 * measured["floor"]
    # what PaCA adds over the floor is at most its input-column slices: tokens x rank x 4 bytes per layer
    column_bytes = measured["paca_layers"] * BATCH * LENGTH * RANK * 4
    assert measured["paca"] - measured["floor"] <= column_bytes


def test_paca_stores_at_most_0_87_of_lora_at_equal_rank(measured):
    ratio = measured["paca"] / measured["lora"]
    print(f"saved for backward, MiB: floor {measured['floor'] / 2**20:.2f}, PaCA {measured['paca'] / 2**20:.2f}, "
          f"LoRA {measured['lora'] / 2**20:.2f}; PaCA/LoRA {ratio:.3f}")
    assert ratio <= 0.87
