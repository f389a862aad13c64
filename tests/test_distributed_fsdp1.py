"""FSDP1 (``use_orig_params=True``) with PaCA in the delta form: 2 gloo processes on CPU."""

import pytest
import torch

from paca_lightning import PaCAConfig, apply_paca, paca_layers
from paca_lightning.parallel import use_delta_form
from paca_lightning.training import PaCAFSDPStrategy
from tests.distributed.launch import results
from tests.helpers import make_tiny_gpt2, make_tiny_llama, token_batch

TOLERANCE = 2e-5
PLAIN = "plain_torch_worker.py"


@pytest.mark.slow
def test_fsdp1_delta_form_trained_columns_and_merged_weights_match_single_process():
    assert results(PLAIN)["fsdp1_llama_error"] < TOLERANCE
    assert results(PLAIN)["fsdp1_gpt2_error"] < TOLERANCE  # Conv1D layout


@pytest.mark.slow
def test_fsdp1_without_delta_form_fails_the_check():
    assert results(PLAIN)["fsdp1_llama_control_error"] > 100 * TOLERANCE


@pytest.mark.slow
def test_fsdp1_gradient_and_optimizer_memory_per_rank_is_the_trainable_size():
    memory = results(PLAIN)["fsdp1_memory"]
    trainable = memory["trainable_param_bytes_global"]
    frozen = memory["param_bytes_global"] - trainable
    # replicate_trainable keeps paca_weight out of the flat parameters: whole on every rank, and
    # the frozen flat parameters get no gradient (sharing one, they made FSDP1 allocate 132,960 B
    # of flat gradient per rank here, the decoder layers' flattened size / 2)
    assert memory["grad_bytes"] == trainable
    assert memory["optimizer_state_bytes"] == 2 * trainable  # AdamW: exp_avg and exp_avg_sq
    assert memory["param_bytes_local"] < 0.51 * frozen + trainable


LIGHTNING = "lightning_worker.py"


@pytest.mark.slow
def test_lightning_fsdp1_trained_columns_match_single_process_after_two_steps():
    # PaCAFSDPStrategy (FSDP1 on CPU, sharded checkpoint)
    assert results(LIGHTNING)["fsdp1_step2_error"] < TOLERANCE


@pytest.mark.slow
def test_lightning_fsdp1_resume_from_adapter_only_checkpoint_continues_like_the_single_process_run():
    assert results(LIGHTNING)["fsdp1_resumed_error"] < TOLERANCE


@pytest.mark.slow
def test_lightning_fsdp1_fit_end_adapter_holds_every_ranks_columns_and_merged_export_computes_the_same():
    found = results(LIGHTNING)
    assert found["fsdp1_adapter_error"] < TOLERANCE
    assert found["fsdp1_merged_logits_error"] < TOLERANCE
    assert found["fsdp1_merged_has_no_paca_keys"]


# Single-process properties of the delta form (no launch).



def _loss_and_grads(model):
    batch = token_batch()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {name: layer.paca_weight.grad.clone() for name, layer in paca_layers(model)}


@pytest.mark.parametrize("make", [make_tiny_llama, make_tiny_gpt2], ids=["linear", "conv1d"])
def test_delta_form_equals_in_place_columns_whatever_the_weight_holds(make):
    config = PaCAConfig(rank=4, alpha=8)
    reference, delta = apply_paca(make(), config), apply_paca(make(), config)
    with torch.no_grad():  # trained columns differ from the pretrained ones
        for model in (reference, delta):
            for _, layer in paca_layers(model):
                layer.paca_weight.add_(0.05)
    use_delta_form(delta)
    for _, layer in paca_layers(delta):  # the delta form must not rely on written columns
        layer._write_columns(layer.paca_base_columns)
    loss, grads = _loss_and_grads(reference)
    delta_loss, delta_grads = _loss_and_grads(delta)
    torch.testing.assert_close(delta_loss, loss, rtol=1e-5, atol=1e-6)
    for name in grads:
        torch.testing.assert_close(delta_grads[name], grads[name], rtol=1e-4, atol=1e-6)


def test_delta_form_control_without_it_the_stale_weight_changes_the_loss():
    config = PaCAConfig(rank=4, alpha=8)
    model = apply_paca(make_tiny_llama(), config)
    with torch.no_grad():
        for _, layer in paca_layers(model):
            layer.paca_weight.add_(0.05)
    trained_loss = model(**token_batch()).loss.item()
    for _, layer in paca_layers(model):
        layer.auto_sync = False
        layer._write_columns(layer.paca_base_columns)
    assert abs(model(**token_batch()).loss.item() - trained_loss) > 1e-3


def test_fsdp1_strategy_refuses_use_orig_params_false():
    with pytest.raises(ValueError, match="use_orig_params=True"):
        PaCAFSDPStrategy(use_orig_params=False)


def test_column_write_into_a_flattened_fsdp1_shard_is_refused_with_the_fix_named():
    model = apply_paca(make_tiny_llama(), PaCAConfig(rank=4, alpha=8))
    layer = next(layer for _, layer in paca_layers(model))
    layer.weight = torch.nn.Parameter(layer.weight.detach().flatten()[:100], requires_grad=False)
    with pytest.raises(RuntimeError, match="PaCAFSDPStrategy"):
        layer.sync_columns_()


def test_fsdp1_strategy_refuses_qpaca_and_names_fsdp2():
    model = apply_paca(make_tiny_llama(), PaCAConfig(rank=4, alpha=8, quantize="nf4"))
    with pytest.raises(NotImplementedError, match="single dtype.*PaCAModelParallelStrategy"):
        PaCAFSDPStrategy()._setup_model(model)
