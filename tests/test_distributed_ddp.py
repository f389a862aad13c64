"""DDP with PaCA: every rank holds whole weights and the forward-time column sync is exact."""

from distributed.launch import results

TOLERANCE = 2e-5
PLAIN = "plain_torch_worker.py"


def test_ddp_trained_columns_and_merged_weights_match_single_process():
    found = results(PLAIN)
    assert found["ddp_llama_error"] < TOLERANCE
    assert found["ddp_gpt2_error"] < TOLERANCE


def test_ddp_with_column_sync_off_fails_the_check():
    assert results(PLAIN)["ddp_llama_control_error"] > 100 * TOLERANCE
