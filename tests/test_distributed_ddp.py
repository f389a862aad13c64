"""DDP with PaCA: every rank holds whole weights and the forward-time column sync is exact."""

import pytest

from tests.distributed.launch import results

TOLERANCE = 2e-5
PLAIN = "plain_torch_worker.py"


@pytest.mark.slow
def test_ddp_trained_columns_and_merged_weights_match_single_process():
    found = results(PLAIN)
    assert found["ddp_llama_error"] < TOLERANCE
    assert found["ddp_gpt2_error"] < TOLERANCE


@pytest.mark.slow
def test_ddp_trains_qpaca_like_one_process_and_merges_it_dense():
    assert results(PLAIN)["ddp_qpaca_nf4_error"] < 5 * TOLERANCE


@pytest.mark.slow
def test_ddp_with_column_sync_off_fails_the_check():
    assert results(PLAIN)["ddp_llama_control_error"] > 100 * TOLERANCE


LIGHTNING = "lightning_worker.py"


@pytest.mark.slow
def test_lightning_ddp_trained_columns_match_single_process_after_two_steps():
    # strategy='ddp'
    assert results(LIGHTNING)["ddp_step2_error"] < TOLERANCE


@pytest.mark.slow
def test_lightning_ddp_resume_from_adapter_only_checkpoint_continues_like_the_single_process_run():
    assert results(LIGHTNING)["ddp_resumed_error"] < TOLERANCE


@pytest.mark.slow
def test_lightning_ddp_fit_end_adapter_holds_every_ranks_columns_and_merged_export_computes_the_same():
    found = results(LIGHTNING)
    assert found["ddp_adapter_error"] < TOLERANCE
    assert found["ddp_merged_logits_error"] < TOLERANCE
    assert found["ddp_merged_has_no_paca_keys"]
