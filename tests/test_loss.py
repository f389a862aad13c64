import pytest
import torch
import torch.nn.functional as F

from paca_lightning.loss import causal_lm_loss, chunked_causal_lm_loss, shift_labels
from tests.helpers import make_tiny_llama, saved_bytes, token_batch


def _inputs(vocab=97, hidden=24, batch=3, length=11, seed=0, ignored=True):
    generator = torch.Generator().manual_seed(seed)
    hidden_states = torch.randn(batch, length, hidden, generator=generator, requires_grad=True)
    weight = torch.randn(vocab, hidden, generator=generator, requires_grad=True)
    bias = torch.randn(vocab, generator=generator, requires_grad=True)
    labels = torch.randint(0, vocab, (batch, length), generator=generator)
    if ignored:
        labels[0, :4] = -100  # a masked prompt
        labels[2, -3:] = -100  # padding
    return hidden_states, weight, bias, labels


def _dense_and_chunked(hidden_states, weight, bias, labels, chunk_size):
    dense = causal_lm_loss(F.linear(hidden_states, weight, bias), labels)
    dense_grads = torch.autograd.grad(dense, (hidden_states, weight, bias))
    chunked = chunked_causal_lm_loss(hidden_states, weight, labels, lm_head_bias=bias, chunk_size=chunk_size)
    chunked_grads = torch.autograd.grad(chunked, (hidden_states, weight, bias))
    return dense, dense_grads, chunked, chunked_grads


def test_shift_labels_moves_targets_left_and_ignores_the_last_position():
    labels = torch.tensor([[5, 6, 7], [1, -100, 3]])
    assert shift_labels(labels).tolist() == [[6, 7, -100], [-100, 3, -100]]


def test_causal_lm_loss_equals_the_transformers_model_loss():
    model = make_tiny_llama()
    batch = token_batch()
    batch["labels"][0, :5] = -100
    output = model(**batch)
    torch.testing.assert_close(causal_lm_loss(output.logits, batch["labels"]), output.loss)


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 1024])
def test_chunked_loss_and_gradients_equal_the_dense_loss_with_ignored_tokens(chunk_size):
    dense, dense_grads, chunked, chunked_grads = _dense_and_chunked(*_inputs(), chunk_size)
    torch.testing.assert_close(chunked, dense)
    for dense_grad, chunked_grad in zip(dense_grads, chunked_grads):
        torch.testing.assert_close(chunked_grad, dense_grad)


def test_chunked_loss_matches_dense_under_bf16_autocast():
    hidden_states, weight, bias, labels = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dense, dense_grads, chunked, chunked_grads = _dense_and_chunked(hidden_states, weight, bias, labels, 5)
    assert chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, dense, rtol=1e-3, atol=1e-3)
    for dense_grad, chunked_grad in zip(dense_grads, chunked_grads):
        assert chunked_grad.dtype == dense_grad.dtype
        torch.testing.assert_close(chunked_grad, dense_grad, rtol=2e-2, atol=2e-3)


def test_chunked_loss_matches_dense_for_bf16_tensors_without_autocast():
    hidden_states, weight, bias, labels = _inputs()
    hidden_states = hidden_states.detach().bfloat16().requires_grad_()
    weight, bias = weight.detach().bfloat16().requires_grad_(), bias.detach().bfloat16().requires_grad_()
    dense, dense_grads, chunked, chunked_grads = _dense_and_chunked(hidden_states, weight, bias, labels, 8)
    torch.testing.assert_close(chunked, dense, rtol=1e-3, atol=1e-3)
    for dense_grad, chunked_grad in zip(dense_grads, chunked_grads):
        assert chunked_grad.dtype == torch.bfloat16
        torch.testing.assert_close(chunked_grad, dense_grad, rtol=2e-2, atol=2e-2)


def test_chunked_loss_skips_the_head_gradient_when_the_head_is_frozen():
    hidden_states, weight, _, labels = _inputs()
    weight.requires_grad_(False)
    chunked = chunked_causal_lm_loss(hidden_states, weight, labels, chunk_size=4)
    chunked.backward()
    dense_grad, = torch.autograd.grad(causal_lm_loss(F.linear(hidden_states, weight), labels), hidden_states)
    assert weight.grad is None
    torch.testing.assert_close(hidden_states.grad, dense_grad)


def test_chunked_loss_saves_no_logits_for_backward():
    # vocab much larger than hidden, as in real LMs: the dense path saves (tokens x vocab) logits.
    hidden_states, weight, _, labels = _inputs(vocab=2048, hidden=16, batch=2, length=64, ignored=False)
    weight.requires_grad_(False)
    tokens, logits_bytes = labels.numel(), labels.numel() * 2048 * 4
    dense_bytes, _, _ = saved_bytes(lambda: causal_lm_loss(F.linear(hidden_states, weight), labels), [weight])
    chunked_bytes, _, _ = saved_bytes(
        lambda: chunked_causal_lm_loss(hidden_states, weight, labels, chunk_size=16), [weight])
    hidden_bytes = hidden_states.numel() * 4
    assert dense_bytes >= logits_bytes
    # the hidden states (saved by a dense head too) plus 8 + 8 + 4 bytes per scored token
    assert chunked_bytes <= hidden_bytes + tokens * 20
    assert chunked_bytes * 50 < dense_bytes


def test_fully_ignored_labels_give_zero_loss_and_zero_gradients():
    hidden_states, weight, bias, labels = _inputs()
    labels = torch.full_like(labels, -100)
    dense, dense_grads, chunked, chunked_grads = _dense_and_chunked(hidden_states, weight, bias, labels, 4)
    assert dense.item() == 0.0 and chunked.item() == 0.0
    assert all(not grad.any() for grad in (*dense_grads, *chunked_grads))


def test_custom_ignore_index_is_honoured():
    hidden_states, weight, bias, labels = _inputs(ignored=False)
    labels[1, 2:6] = 0  # token 0 plays the padding id
    dense = causal_lm_loss(F.linear(hidden_states, weight, bias), labels, ignore_index=0)
    chunked = chunked_causal_lm_loss(hidden_states, weight, labels, lm_head_bias=bias, ignore_index=0)
    masked = labels.masked_fill(labels == 0, -100)
    torch.testing.assert_close(chunked, dense)
    torch.testing.assert_close(dense, causal_lm_loss(F.linear(hidden_states, weight, bias), masked))


def test_chunked_loss_rejects_labels_outside_the_vocabulary():
    hidden_states, weight, _, labels = _inputs()
    labels[1, 5] = 97
    with pytest.raises(ValueError, match=r"label 97 is outside the vocabulary \[0, 97\)"):
        chunked_causal_lm_loss(hidden_states, weight, labels)


@pytest.mark.parametrize("bad", [
    dict(chunk_size=0), dict(labels_shape=(3, 10)), dict(weight_shape=(97, 23)), dict(bias_shape=(96,)),
    dict(float_labels=True)])
def test_chunked_loss_rejects_malformed_arguments_with_the_reason(bad):
    hidden_states, weight, bias, labels = _inputs()
    if "labels_shape" in bad:
        labels = labels[:, :10]
    if "weight_shape" in bad:
        weight = weight[:, :23]
    if "float_labels" in bad:
        labels = labels.float()
    bias = bias[:96] if "bias_shape" in bad else None
    error = TypeError if "float_labels" in bad else ValueError
    match = {"chunk_size": "chunk_size must be a positive int", "labels_shape": "do not line up",
             "weight_shape": "does not fit hidden", "bias_shape": "does not match the vocabulary",
             "float_labels": "integer tensor"}[next(iter(bad))]
    with pytest.raises(error, match=match):
        chunked_causal_lm_loss(hidden_states, weight, labels, lm_head_bias=bias,
                               chunk_size=bad.get("chunk_size", 4))
