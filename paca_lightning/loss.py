"""Causal language-model loss, dense and chunked.

Both functions take ``labels`` aligned with ``input_ids`` (the Hugging Face convention: the
model's ``labels=input_ids`` works) and shift them themselves: the prediction at position ``t``
is scored against ``labels[..., t + 1]``, the last position predicts nothing. Tokens whose label
is ``ignore_index`` (prompt, padding) are not scored; the loss is the mean over scored tokens.

Why a chunked variant: a causal LM's logits are (tokens x vocab). At a 128k vocabulary and 8k
tokens that is 4 GiB in fp32, saved for backward; at small hidden sizes and large vocabularies it
is a large share of all saved activations (`paca-lightning bench` reports saved bytes with the
dense and the chunked loss side by side).
`chunked_causal_lm_loss` takes the hidden states *before* the output head and computes the
logits ``chunk_size`` tokens at a time::

    forward   h (tokens x hidden) ── per chunk ──► logits_c = h_c @ W^T ──► logsumexp_c, target logit
              saved: h (already alive), per scored token: its row index, label, logsumexp (16 bytes)
    backward  per chunk: recompute logits_c ──► softmax_c - onehot ──► dh_c = g_c @ W, dW += g_c^T h_c

so at most one chunk's logits exist at any time, in either pass. The price is one extra
(chunk x hidden x vocab) matmul per chunk in backward, the recompute. Only scored tokens are
computed at all, so prompt-masked SFT batches also save the head's FLOPs on the prompt.

A sequence with no scored token gives a loss of exactly 0 with zero gradients rather than
``0/0 = nan``: such a micro-batch (a prompt truncated before its answer) has nothing to teach
and must not trip the trainer's non-finite-loss guard.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["causal_lm_loss", "chunked_causal_lm_loss", "has_no_data", "shift_labels"]


def has_no_data(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` carries shapes but no values: on the meta device or a ``FakeTensor``.

    Memory planning runs a training step on such tensors; steps that read values (which rows are
    scored, range checks) take a shape-only path there and are unchanged on real tensors.
    """
    from torch._subclasses.fake_tensor import is_fake

    return tensor.is_meta or is_fake(tensor)


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype active for ``device_type``, else None (always None on meta, which has no autocast)."""
    if device_type == "meta" or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def autocast_off(device_type: str):
    """Autocast disabled for ``device_type`` (nothing to disable on meta)."""
    return contextlib.nullcontext() if device_type == "meta" else torch.autocast(device_type, enabled=False)


def shift_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """``labels`` moved one position left along the last dim, ``ignore_index`` at the end.

    Padding instead of slicing keeps the token count unchanged, so the logits or hidden states
    need no (copying) ``[:, :-1]`` slice to line up with their targets.
    """
    shifted = torch.full_like(labels, ignore_index)
    shifted[..., :-1] = labels[..., 1:]
    return shifted


def _check_labels(labels: torch.Tensor, leading_shape: torch.Size, what: str) -> None:
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"labels must be an integer tensor of token ids, got dtype {labels.dtype}")
    if labels.ndim == 0 or labels.shape != leading_shape:
        raise ValueError(f"labels of shape {tuple(labels.shape)} do not line up with {what} of "
                         f"leading shape {tuple(leading_shape)}; labels must be aligned with "
                         "input_ids (batch x sequence), this function shifts them")


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy of ``logits`` (..., seq, vocab), computed in float32.

    ``labels`` (..., seq) are aligned with the inputs and shifted here (see the module docs).
    """
    _check_labels(labels, logits.shape[:-1], "logits")
    targets = shift_labels(labels.long(), ignore_index).reshape(-1)
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets,
                            ignore_index=ignore_index, reduction="sum")
    return total / (targets != ignore_index).sum().clamp(min=1)


class ChunkedCrossEntropyFunction(torch.autograd.Function):
    """Mean cross-entropy of ``hidden @ weight^T + bias`` at the rows ``rows``, chunk by chunk.

    Inputs are already flattened: ``hidden`` (tokens x hidden), ``rows`` the int64 row indices
    of the scored tokens and ``targets`` their labels. Under autocast the head's matmuls run in
    the autocast dtype in both passes and the softmax in float32, exactly like an autocast
    ``nn.Linear`` head followed by ``causal_lm_loss``.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, rows, targets, chunk_size):
        device_type = hidden.device.type
        compute_dtype = autocast_dtype(device_type) or torch.promote_types(hidden.dtype, weight.dtype)
        log_normalizers = torch.empty(rows.numel(), dtype=torch.float32, device=hidden.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with autocast_off(device_type):
            for start in range(0, rows.numel(), chunk_size):
                chunk = slice(start, start + chunk_size)
                logits = _chunk_logits(hidden, weight, bias, rows[chunk], compute_dtype)
                log_normalizer = torch.logsumexp(logits, dim=-1)
                log_normalizers[chunk] = log_normalizer
                target_logits = logits.gather(1, targets[chunk].unsqueeze(1)).squeeze(1)
                total += (log_normalizer - target_logits).sum()
        ctx.save_for_backward(hidden, weight, bias, rows, targets, log_normalizers)
        ctx.chunk_size, ctx.compute_dtype = chunk_size, compute_dtype
        return total / max(rows.numel(), 1)

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, bias, rows, targets, log_normalizers = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        compute_dtype = ctx.compute_dtype
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
        scale = grad_loss.float() / max(rows.numel(), 1)
        with autocast_off(hidden.device.type):
            w = weight.to(compute_dtype)
            for start in range(0, rows.numel(), ctx.chunk_size):
                chunk = slice(start, start + ctx.chunk_size)
                chunk_rows = rows[chunk]
                logits = _chunk_logits(hidden, weight, bias, chunk_rows, compute_dtype)
                # d(logsumexp - target logit)/d logits = softmax - onehot(target)
                grad_logits = logits.sub_(log_normalizers[chunk].unsqueeze(1)).exp_()
                grad_logits[torch.arange(chunk_rows.numel(), device=rows.device), targets[chunk]] -= 1
                grad_logits.mul_(scale)
                if need_bias:
                    grad_bias += grad_logits.sum(0)
                grad_logits = grad_logits.to(compute_dtype)
                if need_hidden:
                    grad_hidden.index_copy_(0, chunk_rows, (grad_logits @ w).to(hidden.dtype))
                if need_weight:
                    hidden_rows = hidden.index_select(0, chunk_rows).to(compute_dtype)
                    grad_weight += (grad_logits.t() @ hidden_rows).float()
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        if need_bias:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None


def _chunk_logits(hidden, weight, bias, rows, compute_dtype) -> torch.Tensor:
    """Float32 logits of the hidden-state rows ``rows`` (a transient, chunk x vocab)."""
    hidden_rows = hidden.index_select(0, rows).to(compute_dtype)
    logits = F.linear(hidden_rows, weight.to(compute_dtype),
                      None if bias is None else bias.to(compute_dtype))
    return logits.float()


def chunked_causal_lm_loss(hidden_states: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor,
                           *, lm_head_bias: Optional[torch.Tensor] = None, chunk_size: int = 1024,
                           ignore_index: int = -100) -> torch.Tensor:
    """`causal_lm_loss` of ``hidden_states @ lm_head_weight^T (+ lm_head_bias)`` without the logits.

    Args:
        hidden_states: (..., seq, hidden), the output head's input (after the final norm).
        lm_head_weight: (vocab, hidden), the output head's weight (tied or not). Its gradient is
            computed only when it requires grad.
        labels: (..., seq) token ids aligned with the inputs, shifted here like `causal_lm_loss`.
        lm_head_bias: optional (vocab,) bias of the head.
        chunk_size: scored tokens per chunk; peak extra memory is ``chunk_size x vocab`` float32
            values (512 MiB at 1024 x 128k). Smaller saves memory, larger amortises launches.
        ignore_index: label value that is not scored.

    Returns the same value and gradients as ``causal_lm_loss(lm_head(hidden_states), labels)``
    up to floating-point summation order.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if lm_head_weight.ndim != 2 or lm_head_weight.shape[1] != hidden_states.shape[-1]:
        raise ValueError(f"lm_head_weight of shape {tuple(lm_head_weight.shape)} does not fit hidden "
                         f"states of size {hidden_states.shape[-1]}; expected (vocab, "
                         f"{hidden_states.shape[-1]})")
    vocab_size = lm_head_weight.shape[0]
    if lm_head_bias is not None and tuple(lm_head_bias.shape) != (vocab_size,):
        raise ValueError(f"lm_head_bias of shape {tuple(lm_head_bias.shape)} does not match the "
                         f"vocabulary size {vocab_size}")
    _check_labels(labels, hidden_states.shape[:-1], "hidden_states")
    targets = shift_labels(labels.long(), ignore_index).reshape(-1)
    if has_no_data(labels):
        # Which tokens are scored is data; plan for the most, every position but each sequence's last.
        positions = torch.arange(targets.numel(), device=targets.device).reshape(labels.shape)
        # cloned: with one sequence reshape() is a view whose storage keeps the dropped last
        # position, and planned saved bytes must equal nonzero()'s own-storage result.
        rows = positions[..., :-1].reshape(-1).clone()
    else:
        rows = (targets != ignore_index).nonzero().squeeze(1)
    targets = targets.index_select(0, rows)
    if targets.numel() and not has_no_data(targets) and (targets.min() < 0 or targets.max() >= vocab_size):
        bad = targets[(targets < 0) | (targets >= vocab_size)][0].item()
        raise ValueError(f"label {bad} is outside the vocabulary [0, {vocab_size}) and is not "
                         f"ignore_index={ignore_index}")
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    return ChunkedCrossEntropyFunction.apply(hidden, lm_head_weight, lm_head_bias, rows, targets, chunk_size)
