"""The course (COURSE.md, tools/course.py): its grader fails every blank starter and passes the reference, and the grading
tests the rest of the suite lacked.

Two parts:
  grading tests  test_aN_*: unit maths of assignment N's functions against a formula written out here (each calls
                 its function directly, so a blank one is named in the verdict); tools/course.py's registry lists them next
                 to the tests of test_model.py, test_cola.py, test_train.py, test_rl.py and test_eval.py;
  the tool       in a temporary copy of the repository (its .py files, tests and .gitignore, committed to a fresh git
                 repository; never this checkout): for EVERY assignment, `tools/course.py start N` -> `check` fails with
                 NOT IMPLEMENTED for each of its functions -> `solution N` restores every file byte for byte and
                 `git status` is clean; `check` on the untouched copy passes every function of every assignment.
                 Plus the refusals (uncommitted changes, your own code), git-less checkouts, and COURSE.md agreeing
                 with the registry.

The grading runs are subprocesses (`python -m tools.course check ...`, each a pytest), two at a time; assignments whose
blanks cannot touch each other's tests are graded in pairs (PAIRS). About 50 s of CPU in all.

    python -m pytest -q tests/test_course.py
"""
import json
import math
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tools import course

REPO = Path(__file__).resolve().parents[1]
torch_rng = lambda seed: torch.Generator().manual_seed(seed)          # noqa: E731


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: one torch thread (small tensors, shared CPUs)


def tiny_cola(seed: int = 0, vq: bool = False):
    """A small CoLA (GQA 4/2 heads, 8 actions), every weight initialised, float32."""
    from cola import CoLA, CoLAArgs
    from model import ModelArgs
    from cola import VQCoLA
    base = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=32,
                     ffn_dim_multiplier=1.0, max_seq_len=64)
    args = CoLAArgs(n_actions=8, n_idm_layers=2, n_merge_layers=2, n_policy_layers=2, merge_hidden=96)
    torch.manual_seed(seed)
    model = (VQCoLA if vq else CoLA)(base, args)
    model.init_weights()
    return model.train()


def batch(B=2, T=12, seed=0, holes=True):
    """Batch(tokens [B, T+1], mask [B, T+1] with holes, ids [B])."""
    from data import Batch
    x = torch.randint(0, 97, (B, T + 1), generator=torch_rng(seed))
    mask = torch.ones_like(x, dtype=torch.bool)
    if holes:
        mask[0, 3] = mask[1, 7:9] = False
    return Batch(x, mask, torch.arange(B) + 5)


def rmsnorm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def masked_mean_ce(logits, targets, mask):
    ce = F.cross_entropy(logits.flatten(0, 1).double(), targets.flatten(), reduction="none")
    m = mask.flatten().double()
    return (ce * m).sum() / m.sum()


# ----------------------------------------------------------------------------------------------------------------
# Assignment 1: the Llama-3.1 base


def test_a1_rmsnorm_by_formula():
    from model import RMSNorm
    norm = RMSNorm(48, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(48, generator=torch_rng(0)))
    for scale in (3.0, 1e-3):                     # at 1e-3 the mean square is ~eps: eps belongs inside the sqrt
        x = scale * torch.randn(2, 5, 48, generator=torch_rng(1))
        torch.testing.assert_close(norm(x), rmsnorm(x, norm.weight, 1e-5), atol=1e-6, rtol=1e-5)
    # bf16 in: normalised in float32, rounded to bf16, then times the (bf16) weight, as Meta's
    nb, xb = norm.to(torch.bfloat16), x.bfloat16()
    want = (xb.float() * torch.rsqrt(xb.float().pow(2).mean(-1, keepdim=True) + 1e-5)).bfloat16() * nb.weight
    got = nb(xb)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


def test_a1_kv_cache_update():
    from model import KVCache
    cache = KVCache(batch=3, max_len=10, n_kv_heads=2, head_dim=4, dtype=torch.float32, device="cpu")
    k1, v1 = torch.randn(3, 2, 6, 4), torch.randn(3, 2, 6, 4)                         # [B, Hkv, T, Dh]
    k, v = cache.update(0, k1, v1)
    assert k.shape == (3, 2, 6, 4) and torch.equal(k, k1) and torch.equal(v, v1)
    k2, v2 = torch.randn(3, 2, 1, 4), torch.randn(3, 2, 1, 4)
    k, v = cache.update(6, k2, v2)                                                      # every key so far
    assert torch.equal(k, torch.cat([k1, k2], 2)) and torch.equal(v, torch.cat([v1, v2], 2))
    k, v = cache.update(7, k2[:2], v2[:2])                                              # a smaller batch: first rows
    assert k.shape == (2, 2, 8, 4) and torch.equal(k[:, :, :6], k1[:2]) and torch.equal(v[:, :, 7], v2[:2, :, 0])
    with pytest.raises(ValueError):
        cache.update(8, torch.randn(3, 2, 3, 4), torch.randn(3, 2, 3, 4))               # past max_len


def test_a1_apply_rope_by_formula():
    """Adjacent channel pairs (2j, 2j+1) rotated by angle_{t,j}: (x0 cos - x1 sin, x0 sin + x1 cos), in float32."""
    from model import apply_rope
    x = torch.randn(2, 7, 3, 8, generator=torch_rng(0))                                 # [B, T, H, Dh]
    angles = torch.rand(7, 4, generator=torch_rng(1)) * 6.0                             # [T, Dh/2]
    rope = torch.stack([angles.cos(), angles.sin()], -1)                                # [T, Dh/2, 2]
    x0, x1 = x[..., 0::2], x[..., 1::2]                                                 # [B, T, H, Dh/2]
    c, s = angles.cos()[None, :, None], angles.sin()[None, :, None]
    want = torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], -1).flatten(-2)              # [B, T, H, Dh]
    torch.testing.assert_close(apply_rope(x, rope), want, atol=1e-6, rtol=1e-5)
    xb = x.bfloat16()                                                                   # rotated in float32, then
    got = apply_rope(xb, rope)                                                          # rounded once
    assert got.dtype == torch.bfloat16 and torch.equal(got, apply_rope(xb.float(), rope).bfloat16())


def attention_reference(attn, x, angles):
    """Meta's attention written out: complex RoPE, repeat_kv, explicit causal softmax, in float64."""
    B, T, _ = x.shape
    H, Hkv, Dh = attn.n_heads, attn.n_kv_heads, attn.head_dim
    x = x.double()
    q = (x @ attn.wq.weight.double().t()).view(B, T, H, Dh)
    k = (x @ attn.wk.weight.double().t()).view(B, T, Hkv, Dh)
    v = (x @ attn.wv.weight.double().t()).view(B, T, Hkv, Dh)
    cis = torch.polar(torch.ones_like(angles), angles).to(torch.complex128)[None, :, None]   # [1, T, 1, Dh/2]
    rot = lambda t: torch.view_as_real(torch.view_as_complex(t.reshape(*t.shape[:3], -1, 2).contiguous()) * cis
                                       ).flatten(3)                                          # noqa: E731
    q, k = rot(q), rot(k)
    k, v = k.repeat_interleave(H // Hkv, dim=2), v.repeat_interleave(H // Hkv, dim=2)   # query head i -> kv i // G
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(Dh)                      # [B, H, T, S]
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v).reshape(B, T, H * Dh)
    return y @ attn.wo.weight.double().t()                                               # [B, T, D]


def test_a1_attention_by_formula():
    from model import Attention, KVCache, ModelArgs
    args = ModelArgs(dim=64, n_layers=1, n_heads=8, n_kv_heads=2, vocab_size=32, max_seq_len=32)
    attn = Attention(args)
    with torch.no_grad():
        for lin in (attn.wq, attn.wk, attn.wv, attn.wo):
            lin.weight.copy_(0.2 * torch.randn(lin.weight.shape, generator=torch_rng(2)))
    T = 10
    freqs = 1.0 / (100.0 ** (torch.arange(0, args.head_dim, 2).float() / args.head_dim))    # [Dh/2]
    angles = torch.outer(torch.arange(T).float(), freqs)                                     # [T, Dh/2]
    rope = torch.stack([angles.cos(), angles.sin()], -1)                                    # [T, Dh/2, 2]
    x = torch.randn(2, T, 64, generator=torch_rng(3))
    want = attention_reference(attn, x, angles).float()
    with torch.no_grad():
        torch.testing.assert_close(attn(x, rope), want, atol=2e-5, rtol=1e-4)
        # with a KV cache: a prefill of 5, a chunk of 4 after it, then one token: the same outputs
        attn.cache = KVCache(2, 16, args.n_kv_heads, args.head_dim, torch.float32, "cpu")
        try:
            parts = [attn(x[:, :5], rope[:5], 0), attn(x[:, 5:9], rope[5:9], 5), attn(x[:, 9:], rope[9:], 9)]
        finally:
            attn.cache = None
    torch.testing.assert_close(torch.cat(parts, 1), want, atol=2e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# Assignment 2: straight-through Gumbel-softmax


def test_a2_straight_through_gradient():
    from idm import gumbel_softmax_st
    z = (2 * torch.randn(4, 6, 8, generator=torch_rng(0))).requires_grad_(True)
    u = torch.rand(4, 6, 8, generator=torch_rng(1))
    a, y, k = gumbel_softmax_st(z, 2.0, u=u)
    g = -torch.log(-torch.log(u))                                                       # Gumbel(0, 1) from u
    y_want = ((z + g) / 2.0).softmax(-1)
    assert torch.equal(k, (z + g).argmax(-1))
    torch.testing.assert_close(y, y_want)
    assert torch.equal(a, F.one_hot(k, 8).float())                                      # forward: exactly one-hot
    w = torch.randn(4, 6, 8, generator=torch_rng(2))
    (g_a,) = torch.autograd.grad((a * w).sum(), z)
    (g_y,) = torch.autograd.grad((y_want * w).sum(), z)
    torch.testing.assert_close(g_a, g_y)                                                # backward: the soft sample's
    with pytest.raises(ValueError):
        gumbel_softmax_st(z, 0.0, u=u)


# ----------------------------------------------------------------------------------------------------------------
# Assignment 3: merge module and world-model logits


def merge_reference(layers, h, e):
    """s_0 = h; s_i = s_{i-1} + W_down(silu(W_gate [s; e]) * W_up [s; e]), from the weights."""
    s = h
    for m in layers:
        x = torch.cat([s, e], -1)                                                       # [B, T, 2D]
        s = s + (F.silu(x @ m.gate_proj.weight.t()) * (x @ m.up_proj.weight.t())) @ m.down_proj.weight.t()
    return s


def test_a3_merge_mlp_by_formula():
    from cola import MergeMLP
    torch.manual_seed(0)
    mlp = MergeMLP(16, 24)
    s, e = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    want = merge_reference([mlp], s, e) - s
    torch.testing.assert_close(mlp(s, e), want, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(mlp(s, e), merge_reference([mlp], e, s) - e)              # [s; e], in that order


def test_a3_merge_module_is_a_residual_stack():
    from cola import MergeModule
    torch.manual_seed(1)
    merge = MergeModule(16, 24, 3)
    merge.init_weights(0.15)       # the stack changes h by ~55%; at 0.3 s grew to ~4000 and float32 rounding of a
                                   # correct silu (x * sigmoid(x)) exceeded the tolerance
    h, e = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    torch.testing.assert_close(merge(h, e), merge_reference(merge.layers, h, e), atol=1e-5, rtol=1e-5)


def test_a3_world_state_from_code_by_formula():
    model = tiny_cola(seed=3)
    x = batch(seed=3).tokens
    with torch.no_grad():
        h = model.hidden(x)[:, :-1]                                                     # [B, T, D]
    e = torch.randn(h.shape, generator=torch_rng(4))                                    # codes [B, T, D]
    W, w, eps = model.base.output.weight, model.base.norm.weight, model.base_args.norm_eps
    for side in ("merge", "subtracted"):
        hh = h.clone().requires_grad_(True)
        out = model.base.output(model.world_state_from_code(hh, e, side))
        s2 = merge_reference(model.merge.layers, hh, e)
        want = (rmsnorm(s2, w, eps) - hh) @ W.t()                                       # Eq: W_lm(Norm_f(s_2) - h_t)
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
        # the gradient to the base's state goes through one side only
        path = (rmsnorm(s2, w, eps) - hh.detach()) if side == "merge" else (rmsnorm(s2, w, eps).detach() - hh)
        r = torch.randn(out.shape, generator=torch_rng(5))
        (got,) = torch.autograd.grad((out * r).sum(), hh)
        (ref,) = torch.autograd.grad(((path @ W.t()) * r).sum(), hh)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError):
        model.world_state_from_code(h, e, "both")


# ----------------------------------------------------------------------------------------------------------------
# Assignment 4: Stage A's loss and the VQ ablation


def test_a4_pretrain_loss_by_formula():
    import train
    from idm import gumbel_softmax_st
    model, b = tiny_cola(seed=4), batch(seed=4)
    loss, stats = train.pretrain_loss(model, b, 2.0, 0.5, 7)
    x, m = b.tokens, b.mask[:, 1:]
    with torch.no_grad():
        h = model.hidden(x)
        z = model.idm_logits(h)[:, 1:]                                                  # look-ahead: read at t+1
        u = train.row_uniforms(b.ids, z.shape[1:], 7, "cpu")                            # the rows' own noise
        a, y, k = gumbel_softmax_st(z, 2.0, u=u)
        ce = masked_mean_ce(model.world_logits(h[:, :-1], k), x[:, 1:], m)              # forward value: onehot(k)
        reg = 0.5 * (y * torch.log(y + 1e-8)).sum(-1).mean()                            # beta mean_t sum_k y log y
    assert loss.item() == pytest.approx((ce + reg).item(), rel=1e-5)
    assert stats["ce"] == pytest.approx(ce.item(), rel=1e-5) and stats["alive"] == len(k.unique())


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_a4_pretrain_loss_gradient_by_formula(beta):
    """Stage A is about its gradient: the IDM learns through the straight-through action a~ inside the world model
    (with beta = 0 that is its only gradient), the codebook and merge module through the CE, the base's blocks not
    at all (h_t is frozen; W_lm and Norm_f, which the world model reuses, are frozen by the stage, not by the loss).
    Every parameter's gradient must equal the formula's."""
    import train
    from idm import gumbel_softmax_st
    model, b = tiny_cola(seed=4), batch(seed=4)
    loss, _ = train.pretrain_loss(model, b, 2.0, beta, 7)
    loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None and p.grad.any()}
    model.zero_grad(set_to_none=True)
    x, m = b.tokens, b.mask[:, 1:]
    h = model.hidden(x).detach()                                                        # the base is frozen
    z = model.idm_logits(h)[:, 1:]
    a, y, k = gumbel_softmax_st(z, 2.0, u=train.row_uniforms(b.ids, z.shape[1:], 7, "cpu"))
    ce = masked_mean_ce(model.world_logits(h[:, :-1], a), x[:, 1:], m)                # a~ carries the gradient
    (ce + beta * (y * torch.log(y + 1e-8)).sum(-1).mean()).backward()
    ref = {n: p.grad for n, p in model.named_parameters() if p.grad is not None and p.grad.any()}
    assert sorted(ours) == sorted(ref), f"parameters with a gradient: {sorted(ours)} != {sorted(ref)}"
    assert any(n.startswith("idm.") for n in ref)                                      # through a~ (and y)
    assert not any(n.startswith(("base.layers", "base.tok_embeddings")) for n in ref)   # h_t is a constant
    for n in ref:
        torch.testing.assert_close(ours[n], ref[n], rtol=1e-4, atol=1e-7, msg=lambda s: f"gradient of {n}: {s}")


def test_a4_nearest_code_brute_force():
    from cola import nearest_code
    z_e = torch.randn(2, 5, 8, generator=torch_rng(0))                                  # [B, T, D]
    C = torch.randn(8, 6, generator=torch_rng(1))                                       # [D, K], column k = e_k
    want = torch.tensor([[min(range(6), key=lambda j: ((z_e[b, t] - C[:, j]) ** 2).sum().item())
                          for t in range(5)] for b in range(2)])
    assert torch.equal(nearest_code(z_e, C), want)


def test_a4_vq_pretrain_loss_by_formula():
    import train
    model, b = tiny_cola(seed=5, vq=True), batch(seed=5)
    x, m = b.tokens, b.mask[:, 1:]

    def reference():
        with torch.no_grad():
            h = model.hidden(x)
        z_e = model.idm_logits(h)[:, 1:].float()                                        # [B, T, D]
        C = model.codebook.weight                                                       # [D, K]
        k = ((z_e[..., None, :] - C.t()) ** 2).sum(-1).argmin(-1)                       # [B, T] by brute force
        e = C.t()[k]                                                                    # [B, T, D]
        z_q = z_e + (e - z_e).detach()                                                  # straight-through
        ce = masked_mean_ce(model.base.output(model.world_state_from_code(h[:, :-1], z_q)), x[:, 1:], m)
        vq = ((e - z_e.detach()) ** 2).mean() + 0.25 * ((z_e - e.detach()) ** 2).mean()
        return (ce + vq).float(), k
    params = {"codebook": model.codebook.weight, "encoder head": model.idm.head.weight,
              "merge": model.merge.layers[0].up_proj.weight}
    loss, stats = train.vq_pretrain_loss(model, b, 0.25)
    got = torch.autograd.grad(loss, list(params.values()))
    want_loss, k = reference()
    want = torch.autograd.grad(want_loss, list(params.values()))
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-5)
    assert stats["alive"] == len(k.unique())
    for name, g, w in zip(params, got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-4, msg=f"gradient of the {name}")


# ----------------------------------------------------------------------------------------------------------------
# Assignment 5: Stage B's validation


def test_a5_cola_metrics_by_hand():
    import eval as ev
    model, b = tiny_cola(seed=6).eval(), batch(seed=6)
    x, m = b.tokens, b.mask[:, 1:]
    with torch.no_grad():
        got = ev.cola_metrics(model, b)
        h = model.hidden(x)
        k = model.idm(h, model.base.rope(0, h.shape[1], "cpu"))[:, 1:].argmax(-1)           # IDM label, look-ahead
        a = model.policy(h[:, :-1], model.base.rope(0, h.shape[1] - 1, "cpu")).argmax(-1)   # greedy policy
        want = {"lm": masked_mean_ce(model.base.output(h[:, :-1]), x[:, 1:], m),
                "wm_idm": masked_mean_ce(model.world_logits(h[:, :-1], k), x[:, 1:], m),
                "wm_policy": masked_mean_ce(model.world_logits(h[:, :-1], a), x[:, 1:], m),
                "policy_acc": ((a == k) & m).sum() / m.sum()}
    assert set(got) == set(want)
    for name, v in want.items():
        assert got[name] == pytest.approx(v.item(), rel=1e-5), name


# ----------------------------------------------------------------------------------------------------------------
# Assignment 6: FTA-P


def test_a6_fta_p_loss_by_formula():
    import train
    model, b = tiny_cola(seed=7), batch(seed=7)
    b.mask[:, :6] = False                                                               # a prompt: no loss there
    x, m = b.tokens, b.mask[:, 1:]
    base = list(model.base.parameters())
    for side in ("subtracted", "merge"):
        loss, _ = train.fta_p_loss(model, b, side)
        got = torch.autograd.grad(loss, base, allow_unused=True)
        h = model.hidden(x)
        with torch.no_grad():
            a = model.policy(h[:, :-1], model.base.rope(0, h.shape[1] - 1, "cpu")).argmax(-1)   # frozen, greedy
        want_loss = masked_mean_ce(model.world_logits(h[:, :-1], a, side), x[:, 1:], m).float()
        want = torch.autograd.grad(want_loss, base, allow_unused=True)
        assert loss.item() == pytest.approx(want_loss.item(), rel=1e-5), side
        for p, g, w in zip(model.base.parameters(), got, want):
            assert (g is None) == (w is None), side
            if g is not None:
                torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# Assignment 7: RL


def test_a7_k3_by_formula():
    import rl
    logp, ref = torch.randn(50, generator=torch_rng(0)), torch.randn(50, generator=torch_rng(1))
    r = torch.exp(ref - logp)                                                           # pi_ref / pi
    torch.testing.assert_close(rl.k3(logp, ref), r - torch.log(r) - 1)
    assert (rl.k3(logp, ref) >= 0).all() and torch.equal(rl.k3(logp, logp), torch.zeros(50))


def test_a7_aggregate_by_hand():
    import rl
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    mask = torch.tensor([[True, True, False], [True, False, False], [False, False, False]])
    # per response, then over responses (an empty response counts 0): ((1 + 2) / 2 + 4 / 1 + 0) / 3
    assert rl.aggregate(per_token, mask, "sequence").item() == pytest.approx((1.5 + 4.0 + 0.0) / 3)
    assert rl.aggregate(per_token, mask, "token").item() == pytest.approx(7.0 / 3)     # over the 3 counted tokens
    assert rl.aggregate(per_token, mask, "token", n_tokens=10.0).item() == pytest.approx(0.7)    # a count passed in
    assert rl.aggregate(per_token, mask, "token", n_tokens=0.5).item() == pytest.approx(7.0)     # at least 1


@pytest.mark.parametrize("algo,placement,aggregate,n_tokens", [
    ("grpo", "reward", "sequence", None), ("grpo", "loss", "sequence", None), ("grpo", "loss", "token", None),
    ("grpo", "loss", "token", 12.0), ("remax", "reward", "sequence", None), ("remax", "loss", "token", 12.0)])
def test_a7_policy_loss_gradient_by_formula(algo, placement, aggregate, n_tokens):
    """Policy gradients are about the gradient: d loss / d log pi of every response token must be the formula's
    (GRPO: the clipped surrogate, zero where the clip binds; ReMax: -A), plus beta k3's with --kl-placement loss,
    aggregated as --aggregate says, over n_tokens tokens when the caller passes the count (a batch split over
    ranks)."""
    import rl
    cfg = rl.parse_args(["--init", "x", "--dtype", "float32", "--algo", algo, "--kl-placement", placement,
                         "--kl-coef", "0.3", "--aggregate", aggregate])
    g = torch.Generator().manual_seed(5)
    old = -torch.rand(3, 4, generator=g) * 2
    ref_logp = -torch.rand(3, 4, generator=g) * 2
    logp0 = old + (torch.rand(3, 4, generator=g) - 0.5)                              # ratios on both sides of the clip
    mask = torch.tensor([[True, True, True, False], [True, False, False, False], [True, True, True, True]])
    A = torch.tensor([1.0, -0.5, 2.0])
    logp = logp0.clone().requires_grad_(True)
    if algo == "grpo":
        loss, _ = rl.grpo_loss(logp, old, ref_logp, A, mask, cfg, n_tokens)
    else:
        loss, _ = rl.remax_loss(logp, ref_logp, A, mask, cfg, n_tokens)
    loss.backward()
    lp = logp0.clone().requires_grad_(True)
    rho = torch.exp(lp - old)
    per = -torch.minimum(rho * A[:, None], rho.clamp(0.8, 1.2) * A[:, None]) if algo == "grpo" else -A[:, None] * lp
    if placement == "loss":
        per = per + 0.3 * (torch.exp(ref_logp - lp) - (ref_logp - lp) - 1)           # k3
    mf = mask.float()
    if aggregate == "sequence":
        total = ((per * mf).sum(1) / mf.sum(1)).mean()
    else:
        total = (per * mf).sum() / (mf.sum() if n_tokens is None else n_tokens)
    total.backward()
    assert loss.item() == pytest.approx(total.item(), rel=1e-6)
    torch.testing.assert_close(logp.grad, lp.grad, rtol=1e-5, atol=1e-8)
    assert logp.grad[~mask].eq(0).all() and logp.grad[mask].ne(0).any()


def test_a8_puct_by_formula():
    import mcts
    root = mcts.Node(seg=[0], N=4, V=0.5)
    child = mcts.Node(seg=[1], parent=root, prior=0.25, N=1, V=0.2)
    assert mcts.puct(child, 0.7) == pytest.approx(0.2 + 0.7 * 0.25 * math.sqrt(4) / 2)
    assert mcts.puct(root, 0.7) == pytest.approx(0.5 + 0.7 * 1.0 * math.sqrt(4) / 5)     # the root: its own N


def test_a8_edge_value_by_formula():
    import mcts
    n, c = mcts.Node(seg=[0], R=0.1), mcts.Node(seg=[1], R=0.6, V=0.3)
    assert mcts.edge_value(n, c, 0.9) == pytest.approx((0.6 - 0.1) + 0.9 * 0.3)


def test_a8_td_error_by_formula():
    import mcts
    assert mcts.td_error(0.5, 0.4, 0.99) == pytest.approx((0.5 - 0.99 * 0.4) ** 2)


# ----------------------------------------------------------------------------------------------------------------
# The tool, in a temporary copy of the repository


GIT_ENV = {**os.environ, "GIT_AUTHOR_NAME": "course", "GIT_AUTHOR_EMAIL": "course@localhost",
           "GIT_COMMITTER_NAME": "course", "GIT_COMMITTER_EMAIL": "course@localhost"}
needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def git(repo: Path, *args) -> subprocess.CompletedProcess:
    p = subprocess.run(["git", "-c", "commit.gpgsign=false", *args], cwd=repo, capture_output=True, text=True,
                       env=GIT_ENV)
    assert p.returncode == 0, p.stderr
    return p


def source_files(repo: Path) -> list[str]:
    """The checkout's .py files (tracked, or new and not ignored by git) and .gitignore, relative to it."""
    p = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=repo,
                       capture_output=True, text=True)
    names = p.stdout.split("\n") if p.returncode == 0 else \
        [str(f.relative_to(repo)) for f in [*repo.glob("*.py"), *repo.glob("infra/*.py"), *repo.glob("tools/*.py"), *repo.glob("tests/*.py")]]
    return sorted({n for n in names if n.endswith(".py") and (repo / n).is_file()} | {".gitignore"})


def snapshot(repo: Path) -> dict:
    return {n: (repo / n).read_bytes() for n in source_files(REPO)}


def course_cli(repo: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tools.course", *map(str, args)], cwd=repo, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A copy of this repository's sources, committed to a fresh git repository."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path_factory.mktemp("course") / "repo"
    for name in source_files(REPO):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, repo / name)
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "course copy")
    return repo


def clone(pristine: Path, where: Path) -> Path:
    shutil.copytree(pristine, where, ignore=shutil.ignore_patterns("__pycache__"))
    return where


GRADED = [a.n for a in course.ASSIGNMENTS if not a.pending]
# Assignments whose blanks do not touch each other's grading tests share one copy and one grading run (one pytest
# start-up saved per pair). Each is still started and restored on its own, and each of its functions must come out
# NOT IMPLEMENTED: were the pair to interfere, a function would come out BLOCKED and its test below would fail.
PAIRS = [(2, 5), (4, 8), (6, 7)]                  # disjoint files, and no test of one calls the other first
GROUPS = [p for p in PAIRS if all(n in GRADED for n in p)]
GROUPS += [(n,) for n in GRADED if not any(n in g for g in GROUPS)]


@pytest.fixture(scope="module")
def graded(pristine, tmp_path_factory) -> dict:
    """Each group of assignments started, checked and restored in its own copy; the untouched copy checked for all
    of them. Two grading runs at a time. {"reference": ..., N: ...}."""
    root = tmp_path_factory.mktemp("graded")
    before = snapshot(pristine)
    copies = {g: clone(pristine, root / f"blank-{'-'.join(map(str, g))}") for g in GROUPS}
    ref_copy = clone(pristine, root / "reference")

    def blank(group):
        repo, name = copies[group], "-".join(map(str, group))
        started = {n: course_cli(repo, "start", n) for n in group}
        edited = sorted(f for f, data in snapshot(repo).items() if data != before[f])
        checked = course_cli(repo, "check", *group, "--json", root / f"verdicts-{name}.json")
        verdicts = json.loads((root / f"verdicts-{name}.json").read_text()) if checked.returncode in (0, 1) else {}
        restored = {n: course_cli(repo, "solution", n) for n in group}
        same, status = snapshot(repo) == before, git(repo, "status", "--porcelain").stdout
        return [(n, {"start": started[n], "edited": edited, "check": checked, "verdicts": verdicts.get(str(n), {}),
                     "solution": restored[n], "same": same, "status": status, "group": group}) for n in group]

    def reference():
        checked = course_cli(ref_copy, "check", *GRADED, "--json", root / "verdicts-ref.json")
        verdicts = json.loads((root / "verdicts-ref.json").read_text()) if checked.returncode in (0, 1) else {}
        return [("reference", {"check": checked, "verdicts": verdicts})]

    with ThreadPoolExecutor(max_workers=2) as pool:
        jobs = [pool.submit(reference)] + [pool.submit(blank, g) for g in GROUPS]
        return dict(item for j in jobs for item in j.result())


def out(p: subprocess.CompletedProcess) -> str:
    return f"exit {p.returncode}\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"


@needs_git
@pytest.mark.parametrize("n", GRADED)
def test_reference_passes_its_grader(graded, n):
    ref = graded["reference"]
    assert ref["check"].returncode == 0, out(ref["check"])
    verdicts = ref["verdicts"][str(n)]
    assert set(verdicts) == {f.target for f in course.BY_N[n].functions}
    assert all(v["verdict"] == "PASS" for v in verdicts.values()), verdicts


@needs_git
@pytest.mark.parametrize("n", GRADED)
def test_blank_starter_fails_its_grader_function_by_function(graded, n):
    r, a = graded[n], course.BY_N[n]
    assert r["start"].returncode == 0, out(r["start"])
    assert r["edited"] == sorted({f.file for m in r["group"] for f in course.BY_N[m].functions}), \
        "start edited other files than the assignment's"
    assert r["check"].returncode == 1, out(r["check"])
    # every function is named by its own NotImplementedError: each one's tests reach it directly
    assert {t: v["verdict"] for t, v in r["verdicts"].items()} == {f.target: "NOT IMPLEMENTED" for f in a.functions}
    assert re.search(rf"assignment {n}: .*\n(  NOT IMPLEMENTED .*\n){{{len(a.functions)}}}", r["check"].stdout)
    assert "0 of" in r["check"].stdout.splitlines()[-1]


@needs_git
@pytest.mark.parametrize("n", GRADED)
def test_solution_restores_the_reference_byte_for_byte(graded, n):
    r = graded[n]
    assert r["solution"].returncode == 0, out(r["solution"])
    assert r["same"], "solution did not restore every file byte for byte"
    assert r["status"] == "", f"git status after solution:\n{r['status']}"


def test_blanked_function_keeps_signature_docstring_and_raises(pristine, tmp_path):
    repo = clone(pristine, tmp_path / "repo")
    assert course_cli(repo, "start", 2).returncode == 0
    text = (repo / "idm.py").read_text()
    before = (pristine / "idm.py").read_text()
    for name in ("gumbel_softmax_st", "entropy_regulariser"):
        sig = re.search(rf"def {name}\(.*?\"\"\".*?\"\"\"", before, re.S).group(0)          # signature + docstring
        assert sig in text
    ns = {}
    exec(compile(text, "idm.py", "exec"), ns)                                            # still imports and runs
    with pytest.raises(NotImplementedError, match="assignment 2: idm.py:entropy_regulariser is yours to write"):
        ns["entropy_regulariser"](torch.ones(2, 3), 0.1)
    listed = course_cli(repo, "list").stdout
    assert re.search(r"blank +idm.py:entropy_regulariser", listed) and re.search(r"written +model.py:apply_rope",
                                                                                  listed)


@needs_git
def test_start_refuses_uncommitted_changes_unless_forced(pristine, tmp_path):
    repo = clone(pristine, tmp_path / "repo")
    dirty = (repo / "train.py").read_text() + "\n# my notes\n"
    (repo / "train.py").write_text(dirty)
    p = course_cli(repo, "start", 6)
    assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1
    assert "train.py" in p.stderr and "--force" in p.stderr
    assert (repo / "train.py").read_text() == dirty                                     # nothing touched
    assert course_cli(repo, "start", 6, "--force").returncode == 0
    assert "NotImplementedError" in (repo / "train.py").read_text()
    assert course_cli(repo, "solution", 6).returncode == 0
    assert (repo / "train.py").read_text() == dirty                                     # the forced bodies, notes kept


@needs_git
def test_solution_reads_git_head_when_the_stored_copy_is_gone(pristine, tmp_path):
    repo = clone(pristine, tmp_path / "repo")
    assert course_cli(repo, "start", 5).returncode == 0
    shutil.rmtree(repo / ".git" / "course")
    p = course_cli(repo, "solution", 5)
    assert p.returncode == 0, out(p)
    assert snapshot(repo) == snapshot(pristine)


@needs_git
def test_solution_keeps_your_own_code_unless_forced(pristine, tmp_path):
    repo = clone(pristine, tmp_path / "repo")
    assert course_cli(repo, "start", 2).returncode == 0
    mine = "return -beta * 0.0  # my attempt"
    text = (repo / "idm.py").read_text()
    attempt = re.sub(r'raise NotImplementedError\("assignment 2: idm.py:entropy_regulariser[^\n]*', mine, text)
    (repo / "idm.py").write_text(attempt)
    for command in ("solution", "start"):                                               # neither overwrites it
        p = course_cli(repo, command, 2)
        assert p.returncode != 0 and "your own code" in p.stderr and "--force" in p.stderr, out(p)
        assert (repo / "idm.py").read_text() == attempt
    assert course_cli(repo, "solution", 2, "--force").returncode == 0
    assert snapshot(repo) == snapshot(pristine)
    kept = json.loads((repo / ".git" / "course" / "assignment-2.yours.1.json").read_text())
    assert mine in kept["idm.py:entropy_regulariser"]


def attempt(repo: Path, mine: str):
    """Assignment 2 started, and `mine` written as entropy_regulariser's body."""
    assert course_cli(repo, "start", 2).returncode == 0
    text = (repo / "idm.py").read_text()
    (repo / "idm.py").write_text(re.sub(r'raise NotImplementedError\("assignment 2: idm.py:entropy_regulariser[^\n]*',
                                        mine, text))


@needs_git
def test_every_forced_solution_keeps_its_own_copy_of_your_version(pristine, tmp_path):
    """A second `solution --force` wrote over the version the first one kept (one assignment-N.yours.json): each
    now goes to a new file, assignment-N.yours.K.json."""
    repo = clone(pristine, tmp_path / "repo")
    for mine in ("return -beta * 0.0  # attempt A", "return -beta * 1.0  # attempt B"):
        attempt(repo, mine)
        assert course_cli(repo, "solution", 2, "--force").returncode == 0
    kept = [json.loads((repo / ".git/course" / f"assignment-2.yours.{k}.json").read_text())["idm.py:entropy_regulariser"]
            for k in (1, 2)]
    assert "attempt A" in kept[0] and "attempt B" in kept[1]
    assert snapshot(repo) == snapshot(pristine)


@needs_git
def test_a_failed_write_leaves_your_file_whole(pristine, tmp_path):
    """The disk fills while `solution` writes idm.py: written aside and renamed, the file keeps your attempt (a plain
    write_text truncated it), and the error is one line."""
    repo = clone(pristine, tmp_path / "repo")
    attempt(repo, "return -beta * 0.0  # my attempt")
    before = (repo / "idm.py").read_bytes()
    full = ("import errno, os, pathlib, sys\n"
            "from tools import course\n"
            "real = pathlib.Path.write_text\n"
            "def write_text(self, text, *a, **k):\n"
            "    if self.name.startswith('.idm.py.tmp'):\n"
            "        real(self, text[:len(text) // 2], *a, **k)\n"
            "        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
            "    return real(self, text, *a, **k)\n"
            "pathlib.Path.write_text = write_text\n"
            "sys.exit(course.main(['solution', '2', '--force']))\n")
    p = subprocess.run([sys.executable, "-c", full], cwd=repo, capture_output=True, text=True)
    assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1, out(p)
    assert "idm.py: No space left on device" in p.stderr, out(p)
    assert (repo / "idm.py").read_bytes() == before
    assert not list(repo.glob(".*.tmp*"))
    assert course_cli(repo, "solution", 2, "--force").returncode == 0          # space again: it finishes
    assert snapshot(repo) == snapshot(pristine)


@needs_git
def test_solution_refuses_committed_stubs_as_the_reference(pristine, tmp_path):
    """A fresh clone of a student's repository whose stubs were committed has no .git/course: git HEAD holds the
    stubs, which `solution` took as the reference ("restored 0", the functions still blank; with --force it blanked
    your own code). It refuses in one line saying where the reference is."""
    repo = clone(pristine, tmp_path / "repo")
    attempt(repo, "return -beta * 0.0  # my attempt")
    git(repo, "commit", "-qam", "my work, stubs and all")
    fresh = tmp_path / "fresh"
    git(tmp_path, "clone", "-q", str(repo), str(fresh))
    before = snapshot(fresh)
    for force in ([], ["--force"]):
        p = course_cli(fresh, "solution", 2, *force)
        assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1, out(p)
        assert "the reference is missing" in p.stderr and "git show COMMIT:idm.py" in p.stderr, out(p)
        assert snapshot(fresh) == before


@needs_git
def test_check_json_that_cannot_be_written_is_refused_before_grading(pristine, tmp_path):
    """--json naming a directory failed after the whole grading run (IsADirectoryError); it is refused first."""
    (tmp_path / "verdicts").mkdir()
    p = course_cli(pristine, "check", 2, "--json", tmp_path / "verdicts")
    assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1, out(p)
    assert f"--json {tmp_path / 'verdicts'}: a directory" in p.stderr, out(p)


def test_syntax_errors_are_one_line_naming_the_file(pristine, tmp_path):
    repo = clone(pristine, tmp_path / "repo")
    assert course_cli(repo, "start", 2).returncode == 0
    text = (repo / "idm.py").read_text()
    (repo / "idm.py").write_text(text.replace('raise NotImplementedError("assignment 2: idm.py:entropy_regulariser',
                                              'return (y *  # ("assignment 2: idm.py:entropy_regulariser', 1))
    for args in (("check", 2), ("solution", 2)):
        p = course_cli(repo, *args)
        assert p.returncode != 0 and "idm.py" in p.stderr and "line " in p.stderr, out(p)
        assert len(p.stderr.strip().splitlines()) == 1, out(p)


def test_an_endless_loop_fails_its_function_within_the_time_limit(pristine, tmp_path):
    """A student's endless loop is a FAIL naming the time limit, and the other verdicts still come."""
    repo = clone(pristine, tmp_path / "repo")
    assert course_cli(repo, "start", 8).returncode == 0
    text = (repo / "mcts.py").read_text()
    blank = 'raise NotImplementedError("assignment 8: mcts.py:puct'
    assert blank in text
    (repo / "mcts.py").write_text(text.replace(blank, 'while True:\n        pass\n    raise NotImplementedError("', 1))
    p = course_cli(repo, "check", 8, "--time-limit", "2")
    assert p.returncode == 1, out(p)
    line = next(l for l in p.stdout.splitlines() if "mcts.py:puct" in l)
    assert line.split()[0] == "FAIL" and "still running after 2 s" in line, out(p)
    assert "NOT IMPLEMENTED" in next(l for l in p.stdout.splitlines() if "mcts.py:backup" in l), out(p)
    for bad in ("0", "-1", "nan", "1e9"):
        q = course_cli(repo, "check", 8, "--time-limit", bad)
        assert q.returncode != 0 and "--time-limit" in q.stderr and len(q.stderr.strip().splitlines()) == 1, out(q)


def test_start_all_blanks_every_assignment_and_solution_all_restores(pristine, tmp_path):
    """Graded use: every assignment's functions blank at once (no later assignment's reference to read), then back
    byte for byte; uncommitted work is refused first, as for one assignment."""
    repo = clone(pristine, tmp_path / "repo")
    (repo / "rl.py").write_text((repo / "rl.py").read_text() + "\n# my notes\n")
    p = course_cli(repo, "start", "all")
    assert p.returncode != 0 and "rl.py" in p.stderr and "uncommitted" in p.stderr, out(p)
    git(repo, "checkout", "rl.py")
    assert course_cli(repo, "start", "all").returncode == 0
    listing = course_cli(repo, "list").stdout
    states = [line.split()[0] for line in listing.splitlines() if line.startswith("     ")]
    assert states and set(states) == {"blank"}, listing
    p = course_cli(repo, "start", "seven")
    assert p.returncode != 0 and "expected an assignment number or all" in p.stderr, out(p)
    assert course_cli(repo, "solution", "all").returncode == 0
    assert snapshot(repo) == snapshot(pristine)


def test_outside_git_the_store_is_dot_course(pristine, tmp_path):
    repo = clone(pristine, tmp_path / "repo")
    shutil.rmtree(repo / ".git")
    assert course_cli(repo, "start", 7).returncode == 0
    assert (repo / ".course" / "assignment-7.json").exists()
    assert course_cli(repo, "solution", 7).returncode == 0
    assert snapshot(repo) == snapshot(pristine) and not (repo / ".course").exists()


def test_unknown_and_pending_assignments_are_one_line(pristine):
    for args, want in ((("check", 99), "no such assignment"), (("solution", 0), "no such assignment")):
        p = course_cli(pristine, *args)
        assert p.returncode != 0 and want in p.stderr and len(p.stderr.strip().splitlines()) == 1, out(p)


def test_course_md_lists_exactly_the_registry():
    """COURSE.md's "Functions to write" of each assignment name the registry's functions, and nothing else."""
    text = (REPO / "COURSE.md").read_text()
    sections = re.split(r"^## Assignment (\d+)", text, flags=re.M)[1:]
    found = {int(n): body for n, body in zip(sections[::2], sections[1::2])}
    assert sorted(found) == [a.n for a in course.ASSIGNMENTS]
    for a in course.ASSIGNMENTS:
        listed = set(re.findall(r"`([\w/]+\.py:[\w.]+)`", found[a.n].split("### Functions to write")[-1]
                                .split("### ")[0])) if "### Functions to write" in found[a.n] else set()
        assert listed == {f.target for f in a.functions}, a.n
        if a.pending:
            assert "lands with mcts.py" in found[a.n]


def test_every_grading_test_is_fast_and_exists():
    """Each node id of the registry names a test function that exists (without running it) and none needs the
    slow session fixture `chain` (the grader must stay fast)."""
    import ast
    for a in course.ASSIGNMENTS:
        for f in a.functions:
            for t in f.tests:
                path, name = t.split("::")
                tree = ast.parse((REPO / path).read_text())
                fn = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name.split("[")[0]),
                          None)
                assert fn is not None, t
                assert "chain" not in [arg.arg for arg in fn.args.args], t


@needs_git
def test_check_json_naming_a_source_file_is_refused(pristine):
    """`check 1 --json model.py` replaced the student's model.py by the verdicts; a file git tracks or a .py name is
    refused in one line before the grading run."""
    before = (pristine / "model.py").read_bytes()
    for name, what in (("model.py", "a file git tracks"), (".gitignore", "a file git tracks"),
                       ("new.py", "a Python source name")):
        p = course_cli(pristine, "check", 1, "--json", name)
        assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1, out(p)
        assert f"--json {name}: {what}, which the verdicts would replace" in p.stderr, out(p)
    assert (pristine / "model.py").read_bytes() == before and not (pristine / "new.py").exists()
