"""FSDP1 (``use_orig_params=True``) with PaCA in the delta form: 2 gloo processes on CPU."""

from distributed.launch import results

TOLERANCE = 2e-5
PLAIN = "plain_torch_worker.py"


def test_fsdp1_delta_form_trained_columns_and_merged_weights_match_single_process():
    assert results(PLAIN)["fsdp1_llama_error"] < TOLERANCE


def test_fsdp1_without_delta_form_fails_the_check():
    assert results(PLAIN)["fsdp1_llama_control_error"] > 100 * TOLERANCE


def test_fsdp1_optimizer_state_per_rank_is_proportional_to_trainable_size():
    memory = results(PLAIN)["fsdp1_memory"]
    # AdamW state covers each rank's slice of paca_weight only (the flat gradient does not:
    # FSDP1 allocates it for the whole unit, frozen weights included; see README).
    assert memory["optimizer_state_bytes"] <= 2 * memory["trainable_param_bytes_global"]
    assert memory["optimizer_state_bytes"] > 0


LIGHTNING = "lightning_worker.py"


def test_lightning_fsdp1_trained_columns_match_single_process_after_two_steps():
    # PaCAFSDPStrategy (FSDP1 on CPU, sharded checkpoint)
    assert results(LIGHTNING)["fsdp1_step2_error"] < TOLERANCE


def test_lightning_fsdp1_resume_from_adapter_only_checkpoint_continues_like_the_single_process_run():
    assert results(LIGHTNING)["fsdp1_resumed_error"] < TOLERANCE


def test_lightning_fsdp1_fit_end_adapter_holds_every_ranks_columns_and_merged_export_computes_the_same():
    found = results(LIGHTNING)
    assert found["fsdp1_adapter_error"] < TOLERANCE
    assert found["fsdp1_merged_logits_error"] < TOLERANCE
    assert found["fsdp1_merged_has_no_paca_keys"]
