"""`paca-lightning plan`: bytes counted on fake tensors equal those of a real CPU step."""

import json

import pytest
import torch
from transformers import LlamaConfig

from paca_lightning import planning as planner
from paca_lightning.bench import plan as plan_cli
from paca_lightning.config import PaCAConfig
from paca_lightning.loss import chunked_causal_lm_loss
from paca_lightning.model import apply_paca
from tests.helpers import saved_bytes


def small_config():
    return LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)


def real_saved_bytes(config, method, dtype, batch_size, sequence_length, rank):
    # Real tensors; qpaca and qlora quantize with bitsandbytes itself (`quantize_linear`).
    model, _ = planner._build(config, method, dtype, rank, rank // 2, planner.DEFAULT_TARGETS, is_fake_mode=False)
    model.train()
    ids = torch.randint(0, config.vocab_size, (batch_size, sequence_length))

    def step():
        hidden = model.base_model(input_ids=ids).last_hidden_state
        return chunked_causal_lm_loss(hidden, model.lm_head.weight, ids, chunk_size=8)

    total, _, loss = saved_bytes(step, parameters=list(model.parameters()))
    loss.backward()
    return total


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", planner.PLAN_METHODS)
def test_planned_saved_bytes_equal_a_real_step(method, dtype):
    config = small_config()
    planned = planner.plan_method(config, method, batch_size=2, sequence_length=16, dtype=dtype, rank=8,
                                  chunk_size=8)
    assert planned.saved_bytes == real_saved_bytes(config, method, dtype, 2, 16, 8)
    assert len(planned.saved_per_layer_bytes) == 2 and min(planned.saved_per_layer_bytes) > 0
    assert planned.saved_bytes == sum(planned.saved_per_layer_bytes) + planned.head_and_loss_bytes


def test_fake_paca_model_trains_and_eager_checks_stay():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import LlamaForCausalLM

    from paca_lightning.layers import validated_indices

    with pytest.raises(ValueError, match="distinct values"):
        validated_indices([0, 0], 4, torch.device("cpu"))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        chunked_causal_lm_loss(torch.zeros(1, 3, 4), torch.zeros(5, 4), torch.tensor([[0, 9, 1]]))
    with FakeTensorMode():
        model = apply_paca(LlamaForCausalLM(small_config()), PaCAConfig(rank=4))
        ids = torch.randint(0, 128, (2, 8))
        hidden = model.model(input_ids=ids).last_hidden_state
        chunked_causal_lm_loss(hidden, model.lm_head.weight, ids, chunk_size=4).backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.shape[-1] == 4 for g in grads)


def test_plan_cli_json(tmp_path, capsys):
    from paca_lightning.cli import main

    small_config().save_pretrained(tmp_path)
    assert main(["plan", "--model", str(tmp_path), "--batch-size", "1", "--sequence-length", "8",
                 "--methods", "paca,lora", "--rank", "8", "--json"]) == 0
    methods = json.loads(capsys.readouterr().out)["methods"]
    assert set(methods) == {"paca", "lora"}
    for entry in methods.values():
        assert entry["total_bytes"] == (entry["saved_bytes"] + entry["weight_bytes"] + entry["gradient_bytes"]
                                        + entry["optimizer_state_bytes"])


def test_budget_picks_the_fewest_checkpointed_layers():
    planned = planner.plan_method(small_config(), "lora", batch_size=2, sequence_length=16, dtype=torch.float32,
                                  rank=8, chunk_size=8)
    totals = [planner.total_with_checkpointing(planned, k) for k in range(3)]
    assert totals[0] == planned.total_bytes and totals[2] == planned.total_checkpointed_bytes
    assert planner.checkpointed_layers_needed(planned, totals[0]) == 0
    assert planner.checkpointed_layers_needed(planned, totals[1]) == (0 if totals[0] <= totals[1] else 1)
    assert planner.checkpointed_layers_needed(planned, min(totals) - 1) is None


def test_longest_sequence_fits_and_the_next_step_does_not():
    config = small_config()
    settings = dict(batch_size=1, dtype=torch.float32, rank=8, chunk_size=8)
    budget = planner.plan_method(config, "paca", sequence_length=48, **settings).total_bytes
    longest = plan_cli.longest_sequence(config, "paca", budget, checkpoint_all=False, granularity=16,
                                       limit=64, **settings)
    assert longest >= 48
    assert planner.plan_method(config, "paca", sequence_length=longest, **settings).total_bytes <= budget
    if longest + 16 <= 64:
        assert planner.plan_method(config, "paca", sequence_length=longest + 16, **settings).total_bytes > budget
