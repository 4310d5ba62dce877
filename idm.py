"""The inverse dynamics model f_inverse of CoLA and its discrete action maths (PAPER.md §2-3, Algorithm 1).

f_inverse labels every transition x_{1:t} -> x_{t+1} of unlabelled text with one of K = 64 latent actions:
  h (the frozen base's Norm_f output) -> 4 fresh causal Llama blocks -> RMSNorm -> Linear(d -> K) = z_t.
Pre-training (Algorithm 1) draws the action by *direct assignment* (no VQ nearest neighbour):
  y = GumbelSoftmax(z, tau = 2), k = argmax y, a~ = onehot(k) - sg(y) + y          (straight-through)
  L = CE(p_WM(x_{t+1} | h_t, a~_t)) + beta * mean_t sum_k y log(y + 1e-8)          (beta = 0.001)
and behaviour cloning (Stage B) reads the noiseless label k* = argmax z.

One-step look-ahead, the convention of the whole project: the base runs on T+1 tokens x_{1:T+1},
h = base.hidden(x) [B, T+1, D], z = idm(h) [B, T+1, K], and the action of transition x_{1:t} -> x_{t+1}
(t = 1..T) is read at position t+1, i.e. z[:, 1:] [B, T, K]. The world model then predicts x[:, 1:] from h[:, :-1]
and those actions. Because the blocks are causal, the label of step t sees x_{1..t+1} and nothing later.

`ActionStack` (blocks -> norm -> head) is shared with the policy (policy.py), which has the same shape.

Run its tests:
    python -m pytest -q tests/test_cola.py

Deviations from the paper / official code:
  - the official code runs the IDM on T tokens and shifts its logits left by one, so the last position keeps its
    own (look-ahead-free) logits; we run the base on T+1 tokens so every one of the T actions has its x_{t+1};
  - output projections of new blocks use std 1/(sqrt(d) * n_layers) with n_layers = this stack's own depth
    (4 for the IDM, 8 for the policy); LitGPT's rule, which the release derives from, counts the whole model.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import ModelArgs, RMSNorm, TransformerBlock

def new_module_std(d: int) -> float:
    """Init std of every Linear of CoLA's new modules: N(0, 2 / (5d)) (the release's small-init rule)."""
    return math.sqrt(2 / (5 * d))


# ----------------------------------------------------------------------------------------------------------------
# The network: n fresh Llama blocks on h, then RMSNorm and Linear(d -> K). Used by f_inverse and by pi.


class ActionStack(nn.Module):
    """h [B, T, D] -> n causal Llama blocks -> RMSNorm -> Linear(d -> K, no bias) -> logits [B, T, K]."""

    def __init__(self, args: ModelArgs, n_layers: int, n_actions: int):
        super().__init__()
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(n_layers))     # same shapes as the base
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.head = nn.Linear(args.dim, n_actions, bias=False)                           # d -> K

    def forward(self, h: torch.Tensor, rope: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        x = h                                                                            # [B, T, D]
        for layer in self.layers:
            x = layer(x, rope, start_pos)                                                # [B, T, D]
        return self.head(self.norm(x))                                                   # [B, T, K]

    def init_weights(self):
        """PAPER.md §2 "Init": Linear N(0, 2/(5d)); wo and w2 inside the new blocks N(0, (1/(sqrt(d) n_layers))^2)."""
        d = self.head.in_features
        std = new_module_std(d)
        out_std = 1 / (math.sqrt(d) * max(len(self.layers), 1))
        for block in self.layers:
            block.init_weights(std=std, out_std=out_std)
        self.norm.init_weights()
        nn.init.normal_(self.head.weight, std=std)


class IDM(ActionStack):
    """f_inverse (PAPER.md §2): z = IDM(h); the action of step t is read at position t+1 (look-ahead above).

    Training-only: it always sees a whole sequence, so it never uses a KV cache.
    """

    def forward(self, h: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        """h [B, T, D] (base states), rope [T, Dh/2, 2] -> z [B, T, K] logits."""
        return super().forward(h, rope, 0)


# ----------------------------------------------------------------------------------------------------------------
# Direct action assignment (PAPER.md §2) and the Stage A regulariser (PAPER.md §3)


def gumbel_softmax_st(z: torch.Tensor, tau: float, generator: torch.Generator | None = None,
                      u: torch.Tensor | None = None):
    """Straight-through Gumbel-softmax over the last axis of z [..., K] (u: the U(0, 1) noise, drawn if None).

    Returns (a_st [..., K] one-hot forward / soft gradient, y [..., K] relaxed sample (float32),
    k [...] long hard sample). k = argmax(z + g) is an exact draw from softmax(z) whatever tau is: tau only
    shapes y and therefore the gradient. The forward value of a_st is exactly 0/1: (1 - y) + y rounds back to 1
    under round-to-nearest for y in [0, 1] (tested).
    """
    if tau <= 0:
        raise ValueError(f"gumbel_softmax_st: tau must be > 0, got {tau}")
    zf = z.float()                                                                       # [..., K]
    if u is None:
        u = torch.rand(zf.shape, generator=generator, device=z.device)                   # [..., K] U(0, 1)
    g = -torch.log(-torch.log(u.clamp_min(torch.finfo(u.dtype).tiny)))                  # [..., K] Gumbel(0, 1)
    y = F.softmax((zf + g) / tau, dim=-1)                                                # [..., K] Eq: y = GS(z, tau)
    k = (zf + g).argmax(-1)                                                              # [...]    Eq: k = argmax y
    onehot = F.one_hot(k, zf.shape[-1]).to(y.dtype)                                      # [..., K]
    # Eq: a~ = onehot(k) - sg(y) + y: forward value onehot(k), gradient that of y
    a_st = onehot - y.detach() + y                                                       # [..., K]
    return a_st.to(z.dtype), y, k


def entropy_regulariser(y: torch.Tensor, beta: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Eq: beta * mean_t sum_k y_{t,k} log(y_{t,k} + 1e-8) = -beta * mean entropy. y [..., K], mask [...] or None."""
    neg_entropy = (y * torch.log(y + 1e-8)).sum(-1)                                      # [...]
    if mask is None:
        return beta * neg_entropy.mean()
    m = mask.to(neg_entropy.dtype)                                                       # [...]
    return beta * (neg_entropy * m).sum() / m.sum().clamp_min(1)


@torch.no_grad()
def idm_labels(z: torch.Tensor) -> torch.Tensor:
    """Behaviour-cloning targets k*_t = argmax softmax(z_t) (no Gumbel noise): z [..., K] -> [...] long."""
    return z.argmax(-1)


@torch.no_grad()
def codebook_stats(k: torch.Tensor, K: int) -> dict:
    """Codebook health (PAPER.md §3, §6), as 0-d tensors on k's device (no host sync): alive = codes used at least
    once, top_share = share of the most used code, perplexity = exp(entropy of the usage histogram) (K when
    uniform, 1 when collapsed)."""
    k = k.flatten().long()
    ones = torch.ones(k.numel(), dtype=torch.float64, device=k.device)
    counts = torch.zeros(K, dtype=torch.float64, device=k.device).index_add_(0, k, ones)     # [K] (bincount syncs)
    p = counts / counts.sum().clamp_min(1)                                               # [K]
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum()
    return {"alive": (counts > 0).sum(), "top_share": p.max(), "perplexity": entropy.exp()}


def codebook_usage(k: torch.Tensor, K: int) -> dict:
    """codebook_stats as Python numbers (alive an int)."""
    s = codebook_stats(k, K)
    return {"alive": int(s["alive"]), "top_share": float(s["top_share"]), "perplexity": float(s["perplexity"])}
