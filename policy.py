"""The CoLA policy pi(a_t | x_{1:t}) over K = 64 latent actions (PAPER.md §2-4).

pi reads the base state h (frozen) through 8 fresh causal Llama blocks, an RMSNorm and Linear(d -> K). It is the
only module RL trains (PAPER.md §4); Stage B behaviour-clones it on the IDM's argmax labels (§3). At inference it
keeps its own KV cache next to the base's. Sampling (§2): logits / tau (tau 1), top-k 40, multinomial;
greedy = argmax. The RL log-prob is log pi(a_t | x_{1:t}) under the raw logits (temperature 1, no top-k).

Position convention (see idm.py): pi's output at position t (states x_{1:t}) chooses the action of the transition
x_{1:t} -> x_{t+1}, the same step whose IDM label is read at position t+1.

Run its tests:
    python -m pytest -q tests/test_cola.py

Deviations from the paper / official code:
  - none in the maths. Sampling reuses model.sample (temperature, then top-k, then Meta's top-p); the RL
    log-prob ignores temperature and top-k: it is the distribution RL trains, log_softmax of the raw logits.
"""
from __future__ import annotations

import operator

import numpy as np
import torch
import torch.nn.functional as F

from idm import ActionStack
from model import clear_kv_cache, sample, setup_kv_cache


class Policy(ActionStack):
    """pi: h [B, T, D] -> logits [B, T, K]; causal, so position t sees x_{1:t} only."""

    def forward(self, h: torch.Tensor, rope: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        """h [B, T, D] at positions start_pos.., rope [T, Dh/2, 2] -> logits [B, T, K] (KV cache when set up)."""
        return super().forward(h, rope, start_pos)

    def setup_cache(self, batch: int, max_len: int, dtype, device):
        setup_kv_cache(self.layers, batch, max_len, dtype, device)

    def clear_cache(self):
        clear_kv_cache(self.layers)


def sample_actions(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = 40, top_p: float = 1.0,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """a_t ~ pi: logits [B, K] -> actions [B] long. temperature 0 = greedy (argmax)."""
    return sample(logits.float(), temperature, top_p, top_k, generator=generator)


# ----------------------------------------------------------------------------------------------------------------
# How generation chooses: a callable choose(logits [B, N] float, n [B] long) -> [B] long, where n is the index of
# the new token each row is producing. CoLA.generate passes pi's logits (N = K actions); Transformer.generate passes
# the LM's (N = V tokens). RL and tree search build their own choosers from these.


def sampler(temperature: float = 1.0, top_k: int | None = 40, top_p: float = 1.0, generator=None):
    """a ~ softmax(logits / temperature) restricted to the top_k (and top_p nucleus); temperature 0 = argmax."""
    return lambda logits, n: sample_actions(logits, temperature, top_k, top_p, generator)


def greedy():
    """a = argmax logits (CoLA: the greedy policy)."""
    return lambda logits, n: logits.argmax(-1)


def fixed(action, n_choices: int):
    """The same choice everywhere (CoLA: one latent action throughout)."""
    try:
        action = operator.index(action)          # ints, numpy ints, 0-d integer tensors
    except TypeError:
        raise ValueError(f"generate: mode 'fixed' needs action=<int in [0, {n_choices})>, got {action!r}") from None
    if not 0 <= action < n_choices:
        raise ValueError(f"generate (fixed): action index {action} is outside [0, {n_choices})")
    return lambda logits, n: torch.full((logits.shape[0],), action, dtype=torch.long, device=logits.device)


def uniform(generator=None):
    """A uniformly random choice among all N, whatever the logits."""
    return lambda logits, n: torch.randint(logits.shape[1], (logits.shape[0],), generator=generator,
                                           device=logits.device)


def forced(choices: torch.Tensor):
    """Row b's n-th new token uses choices[b, n] (choices [B, N]; generation stops after N new tokens)."""
    return lambda logits, n: choices.gather(1, n.clamp(max=choices.shape[1] - 1)[:, None])[:, 0]


def seeded_sampler(uniforms: torch.Tensor, temperature: float = 1.0, top_k: int | None = None):
    """Sampling by inverse CDF with each row's own noise: row b's n-th choice reads uniforms[b, n] (uniforms [B, N]
    in [0, 1)). A row draws the same choices whatever batch it is generated in, so rollouts split over processes
    equal one process's. Same distribution as `sampler` (temperature, then top-k)."""
    def choose(logits, n):
        logits = logits.float() / max(temperature, 1e-6)                                    # [B, N]
        if top_k is not None and top_k < logits.shape[-1]:
            kth = logits.topk(top_k, dim=-1).values[:, -1:]                                  # [B, 1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        cdf = logits.softmax(-1).cumsum(-1)                                                  # [B, N]
        u = uniforms.gather(1, n.clamp(max=uniforms.shape[1] - 1)[:, None]).to(cdf)          # [B, 1]
        return torch.searchsorted(cdf, u * cdf[:, -1:]).clamp(max=cdf.shape[1] - 1)[:, 0]   # [B]
    return choose


def sample_uniforms(seed: int, step: int, first: int, rows: int, length: int) -> torch.Tensor:
    """U(0, 1) noise [rows, length] for seeded_sampler, row i from a generator seeded by (seed, step, first + i): each
    sample's own, whatever batch or process draws it (RL's rollouts, the Q-network's data, best-of-N)."""
    out = []
    for i in range(first, first + rows):
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, i]).generate_state(1)[0]))
        out.append(torch.rand(length, generator=g))
    return torch.stack(out)


def action_log_probs(logits: torch.Tensor, actions: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """log pi(a_t | x_{1:t}) for RL: logits [B, T, K], actions [B, T], mask [B, T] (True = counts) -> [B, T].

    Masked positions return 0 and may hold any action value (padding such as -1 is fine).
    """
    logp = F.log_softmax(logits.float(), dim=-1)                                         # [B, T, K]
    if mask is None:
        return logp.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)                 # [B, T]
    mask = mask.bool()
    safe = torch.where(mask, actions.long(), 0)                                          # [B, T]
    out = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)                                # [B, T]
    return torch.where(mask, out, 0.0)                                                   # [B, T]
