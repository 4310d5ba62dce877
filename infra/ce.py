"""The token cross-entropy every stage trains and evaluates with, and its chunked form for a large vocabulary.

masked_ce is the plain loss; lm_head_ce computes masked_ce(head(s), targets, mask), the same value and gradients,
without materialising the [B, T, V] logits at once. The training stages (train.py), the evaluation metrics
(eval.py) and the memory plan (infra/memory.py) read it from here.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def masked_ce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean CE over positions where mask is True: logits [B, T, N], targets [B, T], mask [B, T]."""
    ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")   # [B*T]
    m = mask.flatten().float()                                                               # [B*T]
    return (ce * m).sum() / m.sum().clamp(min=1)


# The loss over the vocabulary, in chunks. At 8B a micro batch of 4 x 2048 tokens has logits over V = 128,256
# classes: 2 GiB in bf16, then a float32 copy and its softmax (10 GiB together), the largest single allocation of
# Stage A. lm_head_ce computes the same loss, and the same gradients, holding the logits of at most
# ce_chunk_rows(V) positions at a time, in forward and again in backward (where they are recomputed rather than
# kept). The idea of fused linear cross-entropy kernels, written in plain PyTorch. At the tiny preset every micro
# batch fits one chunk, which is the plain computation exactly.
CE_CHUNK_BYTES = 2**30             # logits bytes per chunk: bf16 logits + float32 copy + float32 softmax/gradient


def ce_chunk_rows(vocab_size: int) -> int:
    """Positions per chunk of lm_head_ce: 12 bytes per logit (bf16 + 2 x float32) within CE_CHUNK_BYTES."""
    return max(1, CE_CHUNK_BYTES // (12 * vocab_size))


def lm_head_ce(head: nn.Linear, s: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
               chunk: int | None = None) -> torch.Tensor:
    """masked_ce(head(s), targets, mask) without the [B, T, V] logits: s [B, T, D], targets and mask [B, T].

    Eq: L = sum_t m_t (logsumexp(W s_t) - (W s_t)[y_t]) / sum_t m_t, W = head.weight [V, D]. chunk: positions
    per chunk (default ce_chunk_rows(V)); one chunk for all is masked_ce(head(s), ...) itself. Under autocast the
    matrix multiplies run in its dtype and the softmax in float32, as nn.Linear + masked_ce do.
    """
    n, w = s.shape[0] * s.shape[1], head.weight
    chunk = chunk or ce_chunk_rows(w.shape[0])
    if chunk >= n:                 # head's weight, not head(s): under FSDP this runs inside LMHead.loss's hooks
        return masked_ce(F.linear(s, w), targets, mask)
    device = s.device.type
    if torch.is_autocast_enabled(device):           # the casts nn.Linear does under autocast (differentiable)
        dtype = torch.get_autocast_dtype(device)
        s, w = s.to(dtype), w.to(dtype)
    with torch.autocast(device, enabled=False):
        return ChunkedCE.apply(s.flatten(0, 1), w, targets.flatten(), mask.flatten().float(), chunk)


class ChunkedCE(torch.autograd.Function):
    """lm_head_ce's forward and backward, chunk by chunk over the positions. Per chunk c of rows:
    forward   z = s_c W^T (float32), lse = logsumexp(z), loss += sum m (lse - z[y]);
    backward  z again, dL/dz = (softmax(z) - onehot(y)) m g / sum m, ds_c = dz W, dW += dz^T s_c (float32 sum)."""

    @staticmethod
    def forward(ctx, s, w, y, m, chunk):             # s [N, D], w [V, D], y [N] long, m [N] float
        lse = torch.empty(len(s), dtype=torch.float32, device=s.device)                     # [N]
        total = torch.zeros((), dtype=torch.float32, device=s.device)
        for i in range(0, len(s), chunk):
            z = (s[i:i + chunk] @ w.t()).float()                                            # [c, V]
            lse[i:i + chunk] = torch.logsumexp(z, -1)
            picked = z.gather(1, y[i:i + chunk, None])[:, 0]                                # [c] z[y]
            total += ((lse[i:i + chunk] - picked) * m[i:i + chunk]).sum()
        denom = m.sum().clamp(min=1)
        ctx.save_for_backward(s, w, y, m, lse, denom)
        ctx.chunk = chunk
        return total / denom

    @staticmethod
    def backward(ctx, g):
        s, w, y, m, lse, denom = ctx.saved_tensors
        scale = m * (g / denom)                                                             # [N]
        ds = torch.empty_like(s) if ctx.needs_input_grad[0] else None                       # [N, D]
        dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if ctx.needs_input_grad[1] else None
        for i in range(0, len(s), ctx.chunk):
            sc = s[i:i + ctx.chunk]                                                          # [c, D]
            dz = torch.exp((sc @ w.t()).float() - lse[i:i + ctx.chunk, None])               # [c, V] softmax
            dz.scatter_add_(1, y[i:i + ctx.chunk, None], -torch.ones_like(dz[:, :1]))       # - onehot(y)
            dz = (dz * scale[i:i + ctx.chunk, None]).to(s.dtype)
            if ds is not None:
                ds[i:i + ctx.chunk] = dz @ w                                                 # [c, D]
            if dw is not None:
                dw += dz.t() @ sc                                                            # [V, D]
        return ds, None if dw is None else dw.to(w.dtype), None, None, None
