"""Next-token cross-entropy fused with the output head, a chunk of tokens at a time.

The largest tensors of a fine-tuning step are often the logits: (tokens, vocabulary) in
float32, and in backward their gradient and the log-probabilities of the same size. For
4 x 2048 tokens of Llama 3's 128,256-word vocabulary that is 4.2 GB each. Here no more than
``chunk`` tokens' logits exist at a time. The loss is the step's last operation, so each
chunk's gradients are known as soon as its logits are (the approach of Liger Kernel's fused
linear cross-entropy):

    z      = h Wᵀ                                   (c, V) logits of c tokens, in float32
    loss   = Σ_i [logsumexp(z_i) - z_i[y_i]]        over tokens whose label is not ignored
    ∂L/∂h  = (softmax(z) - onehot(y)) W             (c, D); zero for ignored tokens
    ∂L/∂W  = (softmax(z) - onehot(y))ᵀ h            (V, D); only when W trains

The forward pass computes both per chunk and keeps ∂L/∂h (the size of the hidden states);
backward only scales it by the incoming gradient. Numerically it is
``F.cross_entropy(F.linear(h, W).float(), y, reduction="sum")``, with the matmuls in the
same dtypes (autocast included); only ∂L/∂W, when W trains, sums its chunks in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loralite.data import IGNORE_INDEX

# float32 logits held at once: 2^24 elements = 64 MiB (341 tokens of a 49,152-word vocabulary)
CHUNK_ELEMENTS = 2**24


def chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk for a vocabulary of ``vocab_size``: at most ``CHUNK_ELEMENTS`` logits."""
    return max(1, CHUNK_ELEMENTS // vocab_size)


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T`` against ``labels``; gradients made in forward."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                chunk: int, grad_enabled: bool) -> torch.Tensor:
        # needs_input_grad says requires_grad, not whether autograd records (torch.no_grad evaluation)
        want_h, want_w = (grad_enabled and ctx.needs_input_grad[i] for i in (0, 1))
        grad_h = torch.empty_like(hidden) if want_h else None  # (N, D)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h, y = hidden[start:start + chunk], labels[start:start + chunk]  # (c, D), (c,)
            z = F.linear(h, weight).float()  # (c, V)
            keep = y != ignore_index  # (c,)
            y = torch.where(keep, y, 0)
            target = z.gather(1, y[:, None])[:, 0]  # (c,) logit of the right token
            top = z.amax(dim=-1, keepdim=True)  # (c, 1)
            e = z.sub_(top).exp_()  # exp(z - max), in place of the logits
            total = e.sum(dim=-1, keepdim=True)  # (c, 1)
            lse = top[:, 0] + total[:, 0].log()  # logsumexp(z)
            loss += torch.where(keep, lse - target, 0).sum()
            if not (want_h or want_w):
                continue
            dz = e.div_(total)  # softmax(z)
            dz[torch.arange(len(y), device=y.device), y] -= 1
            dz.masked_fill_(~keep[:, None], 0)  # (c, V) = ∂L/∂z (an ignored row's inf or NaN included)
            if want_h:
                grad_h[start:start + chunk] = dz.to(weight.dtype) @ weight
            if want_w:
                grad_w.addmm_(dz.T, h.float())
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad_loss if grad_h is not None else None,
                (grad_w * grad_loss).to(ctx.weight_dtype) if grad_w is not None else None, None, None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         ignore_index: int = IGNORE_INDEX, chunk: int | None = None) -> torch.Tensor:
    """``Σ_i -log softmax(hidden_i Wᵀ)[labels_i]`` over tokens whose label is not ``ignore_index``.

    Args:
        hidden: (N, D) hidden states entering the output head.
        weight: (V, D) the output head's weight (no bias).
        labels: (N,) int64 target of each token.
        chunk: tokens whose logits exist at once; by default ``chunk_tokens(V)``.

    Returns a float32 scalar, the summed (not averaged) loss.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: hidden must be (N, D) and weight (V, D), got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"linear_cross_entropy: labels must be ({hidden.shape[0]},), got {tuple(labels.shape)}")
    return _LinearCrossEntropy.apply(hidden, weight, labels, ignore_index, chunk or chunk_tokens(weight.shape[0]),
                                     torch.is_grad_enabled())
