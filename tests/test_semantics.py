"""The paper's semantics, pinned where a plausible wrong implementation would otherwise pass: each test here kills
mutants that survived the rest of the suite (`python -m tools.mutation`, docs/testing.md). Expected values are written
by hand or computed by an independent formula (a loop over prefixes, the equation spelled out), not by calling the
code under test a second way.

Tiers, all in-process on tiny random models, CPU, a few seconds in all:
  idm       the relaxed Gumbel sample y = softmax((z + g) / tau) and its one-hot (PAPER.md §2), the regulariser
            and codebook usage on edge cases (one counted position, a collapsed sample), the init rule;
  sampling  pi's defaults (tau 1, top-k 40) at every entry point, sampling frequencies against softmax by hand
            (temperature, top-k, Meta's top-p), inverse-CDF draws by hand;
  decoding  positions and the KV cache at the edges (a full-length window, a 2-token chunk, the cache's capacity),
            the chooser's per-row index, eos, prompts holding token 0 (model.py and cola.py);
  losses    the chunked loss over the vocabulary by hand (one chunk is masked_ce bit for bit), Stage A against
            its equation with the row's own noise, the VQ ablation and nearest code by brute force, Stage B's
            accuracy, FTA-P's gradient path, the evaluation metrics by a loop over positions;
  rl        the clipped surrogate on both sides of the clip for both signs of A, ReMax with the KL in the loss,
            pack and the teacher-forced log-probs against one forward pass per prefix.

    python -m pytest -q tests/test_semantics.py
"""
import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cola
import eval as ev
import policy
import data
import rl
import train
from cola import CoLA, CoLAArgs
from data import Batch
from idm import ActionStack, codebook_usage, entropy_regulariser, gumbel_softmax_st, new_module_std
from model import KVCache, ModelArgs, Transformer, sample
from infra import ce as infra_ce
from infra.parallel import Root

BASE = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=32, ffn_dim_multiplier=1.0,
                 max_seq_len=64)
ARGS = CoLAArgs(n_actions=8, n_idm_layers=2, n_merge_layers=2, n_policy_layers=2, merge_hidden=96)
K = ARGS.n_actions


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: one torch thread (small tensors, shared CPUs)


def tiny_cola(seed=0, dtype=torch.float32, cls=CoLA) -> CoLA:
    torch.manual_seed(seed)
    m = cls(BASE, ARGS)
    m.init_weights()
    return m.to(dtype).eval()


def tiny_llama(seed=0, max_seq_len=32) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16,
                              max_seq_len=max_seq_len))
    m.init_weights()
    with torch.no_grad():
        m.output.weight.mul_(8)          # peaked logits: greedy decoding far from ties
    return m.eval()


@pytest.fixture(scope="module")
def model():
    return tiny_cola()


def tokens(B, T, seed=0, V=BASE.vocab_size):
    return torch.randint(V, (B, T), generator=torch.Generator().manual_seed(seed))


def rmsnorm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


# ----------------------------------------------------------------------------------------------------------------
# IDM: direct action assignment and the Stage A regulariser (idm.py)


def test_gumbel_relaxed_sample_is_softmax_of_z_plus_g_over_tau():
    """y = softmax((z + g) / tau) with g = -log(-log u); k = argmax(z + g); a~ is exactly onehot(k) over all K."""
    z = torch.tensor([[3.0, 0.5, -1.0, 0.0], [0.2, 0.1, 0.0, -0.3]])                     # [2, K=4]
    u = torch.tensor([[0.3, 0.9, 0.5, 0.2], [0.6, 0.4, 0.99, 0.1]])
    g = [[-math.log(-math.log(v)) for v in row] for row in u.tolist()]
    for tau in (0.5, 2.0):
        a_st, y, k = gumbel_softmax_st(z, tau, u=u)
        for i in range(2):
            s = [(z[i, j].item() + g[i][j]) / tau for j in range(4)]
            want = [math.exp(v) / sum(math.exp(w) for w in s) for v in s]
            assert y[i].tolist() == pytest.approx(want, rel=1e-5)
            assert k[i].item() == max(range(4), key=lambda j: z[i, j].item() + g[i][j])
        assert k.tolist() == [0, 2]
        assert a_st.tolist() == [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]          # K columns even if k < K - 1
    low = torch.tensor([[5.0, 0.0, -9.0, -9.0]])                                       # every draw picks action 0
    a_st, _, k = gumbel_softmax_st(low, 2.0, u=torch.full((1, 4), 0.5))
    assert k.item() == 0 and a_st.tolist() == [[1.0, 0.0, 0.0, 0.0]]
    a_bf16, y_bf16, _ = gumbel_softmax_st(z.bfloat16(), 2.0, u=u)
    assert a_bf16.dtype == torch.bfloat16 and y_bf16.dtype == torch.float32            # a~ in the model's dtype
    for tau in (0.0, -1.0):
        with pytest.raises(ValueError, match="tau must be > 0"):
            gumbel_softmax_st(z, tau, u=u)


def test_entropy_regulariser_edge_cases():
    """A collapsed (one-hot) sample has entropy 0 and no NaN; one counted position is that position's term."""
    onehot = F.one_hot(torch.tensor([[1, 3], [0, 0]]), 4).float()                        # y with exact zeros
    assert entropy_regulariser(onehot, 1.0).item() == pytest.approx(0.0, abs=1e-7)
    y = torch.tensor([[[0.5, 0.25, 0.25, 0.0], [0.1, 0.2, 0.3, 0.4]]])                   # [1, 2, 4]
    mask = torch.tensor([[False, True]])
    want = 0.1 * math.log(0.1) + 0.2 * math.log(0.2) + 0.3 * math.log(0.3) + 0.4 * math.log(0.4)
    assert entropy_regulariser(y, 2.0, mask).item() == pytest.approx(2.0 * want, rel=1e-5)
    assert entropy_regulariser(y, 2.0, torch.zeros(1, 2, dtype=torch.bool)).item() == 0.0


def test_codebook_usage_of_a_single_label():
    assert codebook_usage(torch.tensor([3]), K) == {"alive": 1, "top_share": 1.0, "perplexity": 1.0}


def test_new_module_init_rule_by_hand():
    """N(0, 2/(5d)) for the new Linears; output projections 1/(sqrt(d) * n) for a stack of n blocks (n = 1 too)."""
    assert new_module_std(10) == pytest.approx(math.sqrt(2 / 50))
    for n in (1, 2):
        torch.manual_seed(0)
        stack = ActionStack(ModelArgs(dim=128, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=8, multiple_of=32,
                                      max_seq_len=8), n_layers=n, n_actions=K)
        stack.init_weights()
        wo = stack.layers[0].attention.wo.weight
        assert wo.std().item() == pytest.approx(1 / (math.sqrt(128) * n), rel=0.05)
        assert stack.head.weight.std().item() == pytest.approx(math.sqrt(2 / 640), rel=0.1)


@torch.no_grad()
def test_action_stack_is_blocks_then_norm_then_head():
    """ActionStack = Linear(d -> K)(RMSNorm_eps(blocks(h))), with the model's own norm eps (here 0.3)."""
    args = ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=8, multiple_of=16, norm_eps=0.3,
                     max_seq_len=16)
    torch.manual_seed(0)
    stack = ActionStack(args, n_layers=1, n_actions=K)
    stack.init_weights()
    torch.nn.init.normal_(stack.norm.weight, 1.0, 0.3)
    h = torch.randn(2, 5, 32) * 0.1                                    # small states: eps matters
    rope = Transformer(args).rope(0, 5, "cpu")
    x = stack.layers[0](h, rope)
    want = rmsnorm(x, stack.norm.weight, 0.3) @ stack.head.weight.t()
    torch.testing.assert_close(stack(h, rope), want, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Sampling: pi's defaults, frequencies against softmax by hand, inverse-CDF draws (policy.py, model.sample)


def test_paper_sampling_defaults_at_every_entry_point(model, monkeypatch):
    """Sampling pi (PAPER.md §2): logits / tau with tau 1, top-k 40, no nucleus, wherever the caller leaves the
    defaults: sample_actions, policy.sampler, cola.action_chooser and CoLA.generate."""
    calls = []

    def spy(logits, temperature=1.0, top_p=1.0, top_k=None, generator=None):
        calls.append((temperature, top_p, top_k))
        return logits.argmax(-1)
    monkeypatch.setattr(policy, "sample", spy)
    logits, n = torch.randn(3, K), torch.zeros(3, dtype=torch.long)
    policy.sample_actions(logits)
    policy.sampler()(logits, n)
    cola.action_chooser("policy", K)(logits, n)
    model.generate([[5, 17]], 2)
    assert calls == [(1.0, 1.0, 40)] * 5


def test_seeded_sampler_draws_by_hand():
    """Inverse CDF with the row's own u: p = [.1, .2, .3, .4] has CDF [.1, .3, .6, 1]."""
    logits = torch.tensor([[0.1, 0.2, 0.3, 0.4]]).log()
    zero = torch.zeros(1, dtype=torch.long)

    def draw(u, **kw):
        return policy.seeded_sampler(torch.tensor([[u]]), **kw)(logits, zero).item()
    assert [draw(u) for u in (0.05, 0.12, 0.35, 0.62, 0.99)] == [0, 1, 2, 3, 3]
    # temperature 0.5: p ~ p^2 = [1, 4, 9, 16] / 30, CDF [.033, .167, .467, 1]; 2.0: p ~ sqrt(p), CDF [.16, .39, .68, 1]
    assert draw(0.5, temperature=0.5) == 3 and draw(0.5) == 2 and draw(0.62, temperature=2.0) == 2
    # top-k 2 keeps [.3, .4] -> CDF [0, 0, 3/7, 1]
    assert draw(0.2, top_k=2) == 2 and draw(0.5, top_k=2) == 3
    # row b's n-th choice reads uniforms[b, n]; past the last column it keeps reading the last one
    u = torch.tensor([[0.05, 0.99]])
    assert [policy.seeded_sampler(u)(logits, torch.tensor([j])).item() for j in (0, 1, 5)] == [0, 3, 3]


def frequencies(draws, n):
    return (torch.bincount(draws, minlength=n).float() / len(draws)).tolist()


def test_sample_frequencies_match_softmax_by_hand():
    """model.sample (pi's and the LM's sampler): temperature, top-k, Meta's top-p, against softmax written out.
    40000 draws: 0.012 is >= 4.8 sigma for every probability."""
    z = [1.5, 0.0, -1.0, 0.7, 2.2, -0.3]
    Z = torch.tensor(z).expand(40000, -1)
    g = lambda: torch.Generator().manual_seed(3)                                      # noqa: E731

    def softmax(v):
        e = [math.exp(x) for x in v]
        return [x / sum(e) for x in e]
    assert frequencies(sample(Z, generator=g()), 6) == pytest.approx(softmax(z), abs=0.012)     # default tau 1
    assert frequencies(sample(Z, 0.5, generator=g()), 6) == pytest.approx(softmax([2 * x for x in z]), abs=0.012)
    top2 = softmax([z[4], z[0]])                                                       # the two largest logits
    assert frequencies(sample(Z, top_k=2, generator=g()), 6) == pytest.approx(
        [top2[1], 0, 0, 0, top2[0], 0], abs=0.012)
    # top-p 0.8: sorted p = [.512, .254, .114, .057, ...]: keep a token while the mass before it is <= 0.8
    p = softmax(z)
    order = sorted(range(6), key=lambda i: -p[i])
    keep, before = [], 0.0
    for i in order:
        if before > 0.8:
            break
        keep.append(i)
        before += p[i]
    want = [p[i] / sum(p[j] for j in keep) if i in keep else 0.0 for i in range(6)]
    assert len(keep) == 3
    assert frequencies(sample(Z, top_p=0.8, generator=g()), 6) == pytest.approx(want, abs=0.012)


# ----------------------------------------------------------------------------------------------------------------
# Decoding: positions, the KV cache, the chooser's index, eos, token 0 (model.py)


@torch.no_grad()
def test_kv_cache_capacity_and_two_token_chunk():
    """Writes up to the cache's last slot work, one past it is refused; a 2-token chunk after a cached prefix sees
    its own past causally (query i sees keys <= its position), like the uncached forward."""
    cache = KVCache(2, 6, 1, 4, torch.float32, "cpu")
    k = torch.randn(2, 1, 3, 4)
    cache.update(0, k, k)
    keys, _ = cache.update(3, k, k)                                   # positions 3..5: exactly full
    assert keys.shape == (2, 1, 6, 4) and torch.equal(keys[:, :, 3:], k)
    with pytest.raises(ValueError, match="KV cache holds"):
        cache.update(4, k, k)                                         # positions 4..6: one too many
    with pytest.raises(ValueError, match="KV cache holds"):
        cache.update(0, torch.randn(3, 1, 2, 4), torch.randn(3, 1, 2, 4))   # a third row
    m = tiny_llama()
    x = tokens(2, 12, seed=4, V=64)
    full = m(x)
    m.setup_cache(2, 12)
    try:
        m(x[:, :9], start_pos=0)
        chunk = m(x[:, 9:11], start_pos=9)                            # T = 2 after a cached prefix
    finally:
        m.clear_cache()
    torch.testing.assert_close(chunk, full[:, 9:11], atol=1e-5, rtol=0)


@torch.no_grad()
def test_rope_positions_fill_the_whole_context():
    """A window of exactly max_seq_len tokens fits (positions 0..L-1), one more position is refused."""
    m = tiny_llama(max_seq_len=16)
    assert m.rope(0, 16, "cpu").shape == (16, 4, 2)
    with pytest.raises(ValueError, match="longer than max_seq_len"):
        m.rope(3, 14, "cpu")
    assert m.hidden(tokens(1, 16, V=64)).shape == (1, 16, 32)


@torch.no_grad()
def test_llama_generate_chooser_index_eos_and_token_zero():
    """Transformer.generate hands the chooser the last position's logits and each row's new-token index n (0 while
    a row is still in its prompt); a prompt token 0 stays, a generated 0 is kept; eos may be an int."""
    m = tiny_llama()
    prompts = [[7], [9, 0, 0, 3]]                                     # decoding starts at position 1 for both rows
    seen = []

    def choose(logits, n):
        seen.append((logits.clone(), n.tolist()))
        return torch.tensor([0, 5])                                   # row 0 always token 0, row 1 always 5
    out = m.generate(prompts, 3, choose=choose)
    assert out == [[0, 0, 0], [5, 5, 5]]
    # positions 1..6 (row 1 ends at 4 + 3 = 7); row 1's index stays 0 while it reads its prompt
    assert [s[1] for s in seen] == [[0, 0], [1, 0], [2, 0], [3, 0], [4, 1], [5, 2]]
    seqs = torch.tensor([[7, 0, 0, 0, 0, 0, 0], [9, 0, 0, 3, 5, 5, 5]])
    for cur, (logits, _) in zip(range(1, 7), seen):                   # the logits of x_{1:cur}, position cur - 1
        torch.testing.assert_close(logits, m(seqs[:, :cur])[:, -1].float(), atol=1e-4, rtol=0)
    greedy = m.generate(prompts, 5, temperature=0.0)
    assert m.generate(prompts, 5) == greedy                           # the default is greedy
    assert m.generate(prompts, 5, temperature=1.0, top_p=1e-9,        # a nucleus of one token is greedy
                      generator=torch.Generator().manual_seed(0)) == greedy
    eos = greedy[0][1]
    cut = m.generate(prompts, 5, temperature=0.0, eos=eos)           # eos as a single int
    assert cut == [row[:row.index(eos) + 1] if eos in row else row for row in greedy]
    assert m.generate([[5]], 2, temperature=0.0) == [greedy_by_hand(m, [5], 2)]   # a one-token prompt
    assert m.generate([list(range(32))], 4) == [[]]                  # the prompt fills the context: nothing new


def greedy_by_hand(m, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(m(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


# ----------------------------------------------------------------------------------------------------------------
# CoLA: the world model's inputs, full-length windows, generation's edges (cola.py)


@torch.no_grad()
def test_world_model_accepts_float32_codes_in_a_bf16_model():
    """The straight-through a~ and the VQ ablation's z_q are float32; the world model casts them to its dtype."""
    m = tiny_cola(dtype=torch.bfloat16)
    h = m.hidden(tokens(2, 5))                                                          # [B, T, D] bf16
    a = F.one_hot(torch.tensor([[1, 2, 3, 4, 5], [0, 0, 7, 7, 6]]), K).float()          # float32
    out = m.world_logits(h, a)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, m.world_logits(h, a.argmax(-1)))
    e = (a @ m.codebook.weight.t().float())                                             # float32 codes
    torch.testing.assert_close(m.base.output(m.world_state_from_code(h, e)), out)


def test_world_state_from_code_passes_base_grad(model):
    """W_lm(world_state_from_code(h, e, "subtracted")) = W_lm(sg(Norm_f(s_2)) - h_t): the base learns only through the
    subtracted h_t, so d(sum of logits)/dh_t = -sum_v W_lm[v] at every position (by hand); "merge" detaches h_t
    there instead (its gradient reaches h only through the merge module's input)."""
    h = model.hidden(tokens(2, 3)).detach().requires_grad_()                            # [B, T, D]
    e = F.embedding(torch.tensor([[1, 2, 3], [4, 5, 6]]), model.codebook.weight.t()).detach()
    grad = lambda how: torch.autograd.grad(model.base.output(model.world_state_from_code(h, e, how)).sum(),  # noqa
                                           h)[0]
    want = -model.base.output.weight.detach().sum(0).expand_as(h)                        # [B, T, D]
    torch.testing.assert_close(grad("subtracted"), want)
    assert not torch.allclose(grad("merge"), want)


@torch.no_grad()
def test_action_indices_outside_k_are_refused(model):
    h = model.hidden(tokens(1, 3))
    with pytest.raises(ValueError, match=rf"action index {K} is outside \[0, {K}\)"):
        model.world_logits(h, torch.tensor([[1, K, 2]]))


@torch.no_grad()
def test_full_length_window(model):
    """Every module reads positions 0..max_seq_len-1 of a full window (no module shifts its positions)."""
    x = tokens(1, BASE.max_seq_len)
    h = model.hidden(x)
    assert model.idm_logits(h).shape == (1, BASE.max_seq_len, K)
    assert model.policy_logits(h).shape == (1, BASE.max_seq_len, K)


@torch.no_grad()
def test_cola_generate_edges(model):
    """Rows keep their prompt (token 0 included) while the shorter row decodes; every row stopping at eos ends the
    loop with the result; forced actions of length 1 and their checks; empty and context-filling prompts."""
    forced = torch.tensor([[3, 1, 4], [1, 5, 2]])
    batch = model.generate([[5], [6, 0, 0]], 3, mode="forced", forced_actions=forced)
    alone = model.generate([[6, 0, 0]], 3, mode="forced", forced_actions=forced[1:])
    assert batch["tokens"][1] == alone["tokens"][0] and batch["actions"][1] == [1, 5, 2]
    first = model.generate([[5]], 1, mode="forced", forced_actions=[[3]])              # N = 1
    assert first["actions"] == [[3]] and len(first["tokens"][0]) == 1
    stop = model.generate([[5], [5]], 4, mode="forced", forced_actions=[[3] * 4] * 2, eos=first["tokens"][0][0])
    assert stop["tokens"] == [first["tokens"][0]] * 2 and stop["actions"] == [[3]] * 2
    with pytest.raises(ValueError, match="forced_actions must have shape"):
        model.generate([[5], [6]], 2, mode="forced", forced_actions=[[1, 2]])           # one row for two prompts
    with pytest.raises(ValueError, match=r"generate \(forced\): action index 9"):
        model.generate([[5]], 2, mode="forced", forced_actions=[[1, 9]])
    with pytest.raises(ValueError, match="at least one token"):
        model.generate([[5], []], 2)
    full = model.generate([list(range(BASE.max_seq_len))], 3)
    assert full["tokens"] == [[]] and full["actions"] == [[]]


# ----------------------------------------------------------------------------------------------------------------
# Training losses against their equations (train.py)


def batch(x, mask=None, ids=None):
    mask = torch.ones_like(x, dtype=torch.bool) if mask is None else mask
    return Batch(x, mask, torch.arange(len(x)) if ids is None else ids)


def holey_mask(B, T):
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[:, T // 2:] = True
    mask[0, T - 2] = False
    mask[-1, 2] = True
    return mask


def test_masked_ce_of_one_counted_target():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 1.0]]])
    mask = torch.tensor([[False, True]])
    want = -math.log(math.e / (math.e + 1))
    assert infra_ce.masked_ce(logits, torch.tensor([[0, 1]]), mask).item() == pytest.approx(want, rel=1e-6)


def test_ce_chunk_rows_by_hand():
    """Positions per chunk: 2^30 bytes / (12 bytes per logit x V), at least 1."""
    assert infra_ce.CE_CHUNK_BYTES == 2**30
    assert infra_ce.ce_chunk_rows(128_256) == 697                                          # 2^30 // 1,539,072
    assert infra_ce.ce_chunk_rows(2**30 // 12) == 1 and infra_ce.ce_chunk_rows(2**30) == 1     # 1, then 0 -> 1


def test_lm_head_ce_in_one_chunk_is_masked_ce_bit_for_bit():
    """When every position fits one chunk (chunk >= B*T, and the default at a small V) lm_head_ce is
    masked_ce(head(s)) itself: the same loss and gradients bit for bit, so the tiny preset's numbers do not move.
    B*T = 6 < B*D and < T*T: the count is B*T, not a product with D or T twice."""
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 101, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(101, 16, generator=g))
    s = torch.randn(2, 3, 16, generator=g).requires_grad_()                              # [B, T, D]
    y, m = torch.randint(0, 101, (2, 3), generator=g), torch.tensor([[True, False, True], [True, True, True]])

    def run(fn):
        loss = fn()
        return (loss.detach(), *torch.autograd.grad(loss, [s, head.weight]))
    want = run(lambda: infra_ce.masked_ce(head(s), y, m))
    for chunk in (6, None):
        got = run(lambda: infra_ce.lm_head_ce(head, s, y, m, chunk=chunk))
        assert all(torch.equal(a, b) for a, b in zip(got, want)), chunk


def test_chunked_ce_of_one_counted_position_by_hand():
    """ChunkedCE on 3 positions in chunks of 2, only the middle one counted (sum m = 1: no clamp to 2).
    W = [[1, 0], [0, 1], [1, 1]], s_1 = (1, 2): z = (1, 2, 3), y_1 = 0: L = log(e + e^2 + e^3) - 1;
    dL/dz = softmax(z) - onehot(0), ds_1 = dL/dz W, dW = (dL/dz)^T s_1; the other rows get no gradient."""
    W = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], requires_grad=True)           # [V, D]
    s = torch.tensor([[5.0, -1.0], [1.0, 2.0], [0.5, 0.5]], requires_grad=True)          # [N, D]
    y, m = torch.tensor([2, 0, 1]), torch.tensor([0.0, 1.0, 0.0])
    loss = infra_ce.ChunkedCE.apply(s, W, y, m, 2)
    Z = math.e + math.e ** 2 + math.e ** 3
    assert loss.item() == pytest.approx(math.log(Z) - 1, rel=1e-6)
    loss.backward()
    dz = [math.e / Z - 1, math.e ** 2 / Z, math.e ** 3 / Z]                              # softmax(z) - onehot(0)
    ds1 = [dz[0] + dz[2], dz[1] + dz[2]]                                                 # dz @ W
    torch.testing.assert_close(s.grad, torch.tensor([[0.0, 0.0], ds1, [0.0, 0.0]]))
    torch.testing.assert_close(W.grad, torch.tensor([[d * 1.0, d * 2.0] for d in dz]))   # outer(dz, s_1)


def test_chunked_ce_backward_makes_only_the_gradients_asked_for():
    """ChunkedCE.backward builds ds [N, D] only if s needs a gradient and the float32 dW [V, D] accumulator (2 GiB
    at 8B) only if W does (Stage A: the head is frozen); the rest are None. W = I, s = (1, 2): z = (1, 2), y = 1,
    dL/dz = softmax(z) - onehot(1) = ds, dW = (dL/dz)^T s."""
    s, W = torch.tensor([[1.0, 2.0]]), torch.eye(2)
    lse = torch.tensor([math.log(math.e + math.e ** 2)])
    saved = (s, W, torch.tensor([1]), torch.tensor([1.0]), lse, torch.tensor(1.0))
    dz = torch.tensor([[math.e, -math.e]]) / (math.e + math.e ** 2)                      # (p_0, p_1 - 1)
    for needs in ((True, False), (False, True)):
        ctx = SimpleNamespace(saved_tensors=saved, needs_input_grad=(*needs, False, False, False), chunk=1)
        ds, dw, *rest = infra_ce.ChunkedCE.backward(ctx, torch.tensor(1.0))
        assert rest == [None, None, None] and (ds is None, dw is None) == (not needs[0], not needs[1])
        if needs[0]:
            torch.testing.assert_close(ds, dz)
        else:
            torch.testing.assert_close(dw, dz.t() * s)


def test_pretrain_loss_is_ce_of_hard_actions_plus_beta_sum_y_log_y(model):
    """Stage A: forward value = CE(p_WM(x_{t+1} | h_t, onehot(k_t))) + beta mean_t sum_k y log(y + 1e-8), with
    y, k from the row's own noise u = row_uniforms(seed, id) (whatever the global RNG), z read one step ahead."""
    x = tokens(2, 9, seed=5)
    b = batch(x, holey_mask(2, 9), ids=torch.tensor([3, 11]))
    tau, seed = 2.0, 7
    with torch.no_grad():
        h = model.hidden(x)
        z = model.idm_logits(h)[:, 1:].float()                                            # [B, T, K]
        u = train.row_uniforms([3, 11], z.shape[1:], seed, "cpu")
        g = -torch.log(-torch.log(u))
        k = (z + g).argmax(-1)
        y = ((z + g) / tau).softmax(-1)
        ce = infra_ce.masked_ce(model.world_logits(h[:, :-1], k), x[:, 1:], b.mask[:, 1:]).item()
        reg = (y * torch.log(y + 1e-8)).sum(-1).mean().item()                              # negative
    results = []
    for beta, rng in ((0.0, 1), (1.0, 2), (1.0, 3)):
        torch.manual_seed(rng)                                                            # must not matter
        with torch.no_grad():
            results.append(train.pretrain_loss(model, b, tau, beta, seed))
    (l0, m0), (l1, m1), (l2, _) = results
    assert l0.item() == pytest.approx(ce, rel=1e-5)
    assert l1.item() == pytest.approx(ce + reg, rel=1e-5) and l1.item() < l0.item()
    assert l2.item() == l1.item()
    usage = codebook_usage(k, K)
    assert m1 == {"ce": pytest.approx(ce, rel=1e-5), "reg": pytest.approx(reg, rel=1e-5), "alive": usage["alive"],
                  "top": usage["top_share"]}


def test_nearest_code_and_vq_loss_by_brute_force():
    """The VQ ablation: k = argmin_k ||z_e - C_k||^2 by a loop; L = CE(p_WM(. | h, e_k)) + (1 + commitment) *
    mean (z_e - e)^2; the codebook learns from mean (e - sg(z_e))^2 only (straight-through: none from the CE)."""
    g = torch.Generator().manual_seed(0)
    z_e, C = torch.randn(2, 3, 5, generator=g), torch.randn(5, 4, generator=g)
    near = [[min(range(4), key=lambda j: ((z_e[b, t] - C[:, j]) ** 2).sum().item()) for t in range(3)]
            for b in range(2)]
    assert cola.nearest_code(z_e, C).tolist() == near
    # ||z - c||^2 = ||z||^2 - 2 z.c + ||c||^2: z = (1, 0) is 0 from c_0 = (1, 0) and 0.64 from c_1 = (1.8, 0)
    assert cola.nearest_code(torch.tensor([[[1.0, 0.0]]]), torch.tensor([[1.0, 1.8], [0.0, 0.0]])).item() == 0
    m = tiny_cola(cls=cola.VQCoLA).train()
    x = tokens(2, 9, seed=6)
    b = batch(x, holey_mask(2, 9))
    with torch.no_grad():
        h = m.hidden(x)
        z = m.idm_logits(h)[:, 1:].float()                                                # [B, T, D]
        Cw = m.codebook.weight.float()
        ks = [[min(range(K), key=lambda j: ((z[i, t] - Cw[:, j]) ** 2).sum().item()) for t in range(8)]
              for i in range(2)]
        e = Cw.t()[torch.tensor(ks)]                                                       # [B, T, D]
        ce = infra_ce.masked_ce(m.base.output(m.world_state_from_code(h[:, :-1], e)), x[:, 1:], b.mask[:, 1:]).item()
        sq = (z - e).pow(2).mean().item()
    m.zero_grad(set_to_none=True)
    loss, metrics = train.vq_pretrain_loss(m, b, 0.25)
    assert loss.item() == pytest.approx(ce + 1.25 * sq, rel=1e-5)
    assert metrics["ce"] == pytest.approx(ce, rel=1e-5) and metrics["vq"] == pytest.approx(1.25 * sq, rel=1e-5)
    usage = codebook_usage(torch.tensor(ks), K)
    assert (metrics["alive"], metrics["top"]) == (usage["alive"], usage["top_share"])
    loss.backward()
    want = torch.zeros_like(Cw)                                      # d/dC_k mean (C_k - z_e)^2 over B*T*D entries
    for i in range(2):
        for t in range(8):
            want[:, ks[i][t]] += 2 * (Cw[:, ks[i][t]] - z[i, t]) / (2 * 8 * BASE.dim)
    torch.testing.assert_close(m.codebook.weight.grad, want, atol=1e-7, rtol=1e-4)
    assert m.idm.head.weight.grad.abs().sum() > 0                    # the encoder learns (CE + commitment)


@pytest.fixture(scope="module")
def agreeing():
    """The tiny CoLA with pi := f_inverse's weights: pi at t reads z_t, the IDM's label of step t is argmax z_{t+1},
    so they agree on some steps and not on others (accuracy strictly between 0 and 1)."""
    m = tiny_cola()
    m.policy.load_state_dict(m.idm.state_dict())
    return m


def test_bc_accuracy_by_hand(agreeing):
    """Stage B's metrics: ce = the loss, acc = share of counted steps where argmax pi = k* (a loop over steps,
    pi run on each prefix alone); one counted step gives that step's hit."""
    x = tokens(2, 9, seed=8)
    with torch.no_grad():
        k_star = agreeing.idm_logits(agreeing.hidden(x))[:, 1:].argmax(-1)                # [B, T]
        hit = [[int(agreeing.policy_logits(agreeing.hidden(x[i:i + 1, :t + 1]))[0, -1].argmax() == k_star[i, t])
                for t in range(8)] for i in range(2)]
    assert 0 < sum(map(sum, hit)) < 16
    one = torch.zeros(2, 9, dtype=torch.bool)
    i, t = next((i, t) for i in range(2) for t in range(8) if hit[i][t])
    one[i, t + 1] = True                                                                   # one counted step: a hit
    for mask in (torch.ones(2, 9, dtype=torch.bool), holey_mask(2, 9), one):
        with torch.no_grad():
            loss, metrics = train.bc_loss(agreeing, batch(x, mask))
        hits = [hit[i][t] for i in range(2) for t in range(8) if mask[i, t + 1]]
        assert metrics == {"ce": pytest.approx(loss.item()), "acc": pytest.approx(sum(hits) / len(hits))}


def test_fta_losses_report_their_ce_and_fta_p_passes_base_grad(model):
    """FTA-P trains the base through the side of W_lm(Norm_f(s_2) - h_t) its --base-grad names: the base's gradient
    under 'subtracted' equals that of the by-hand sg(Norm_f(s_2)) - h_t, and differs from 'merge'."""
    m = copy.deepcopy(model).train()
    x = tokens(2, 9, seed=9)
    b = batch(x, holey_mask(2, 9))
    base = list(m.base.parameters())

    def base_grads(loss):
        return torch.autograd.grad(loss, base, allow_unused=True)
    with torch.no_grad():
        a = m.policy_logits(m.hidden(x)[:, :-1]).argmax(-1)
    h = m.hidden(x)[:, :-1]
    s2 = m.merge(h, F.embedding(a, m.codebook.weight.t()))
    by_hand = infra_ce.masked_ce(m.base.output(m.base.norm(s2).detach() - h), x[:, 1:], b.mask[:, 1:])
    want = base_grads(by_hand)
    loss, metrics = train.fta_p_loss(m, b, "subtracted")
    got = base_grads(loss)
    assert metrics == {"ce": loss.item()}
    for gw, gg in zip(want, got):
        assert (gw is None) == (gg is None) and (gw is None or torch.allclose(gw, gg, atol=1e-7))
    merge = base_grads(train.fta_p_loss(m, b, "merge")[0])
    assert not all(gg is None and gm is None or torch.allclose(gg, gm) for gg, gm in zip(got, merge))
    loss, metrics = train.fta_i_loss(m, b)
    assert metrics == {"ce": loss.item()}
    loss, metrics = train.base_loss(m.base, b)
    assert metrics == {"ce": loss.item()}


@torch.no_grad()
def test_evaluation_metrics_by_a_loop_over_positions(agreeing):
    """cola_metrics / lm_metrics: for every counted target x_{t+1}: the base LM's CE, the world model's CE under
    the IDM's look-ahead label (read at t+1) and under the greedy policy's action (pi on x_{1:t} alone), and the
    policy's agreement with the IDM; over a holey mask and over a single counted target."""
    m = agreeing
    x = tokens(2, 9, seed=10)
    h = m.hidden(x)
    z = m.idm_logits(h)
    per = {}
    for i in range(2):
        for t in range(8):
            target = x[i, t + 1][None]
            k = z[i, t + 1].argmax()[None, None]                                          # look-ahead label
            a = m.policy_logits(m.hidden(x[i:i + 1, :t + 1]))[0, -1].argmax()[None, None]
            ht = h[i:i + 1, t:t + 1]
            per[i, t] = {"lm": F.cross_entropy(m.base.output(ht)[0], target).item(),
                         "wm_idm": F.cross_entropy(m.world_logits(ht, k)[0], target).item(),
                         "wm_policy": F.cross_entropy(m.world_logits(ht, a)[0], target).item(),
                         "policy_acc": float(a.item() == k.item())}
    hit = next(key for key, v in per.items() if v["policy_acc"] == 1.0)
    one = torch.zeros(2, 9, dtype=torch.bool)
    one[hit[0], hit[1] + 1] = True
    for mask in (holey_mask(2, 9), one):
        counted = [per[i, t] for i in range(2) for t in range(8) if mask[i, t + 1]]
        want = {name: pytest.approx(sum(v[name] for v in counted) / len(counted), rel=1e-4, abs=1e-6)
                for name in counted[0]}
        assert ev.cola_metrics(m, batch(x, mask)) == want
        assert ev.lm_metrics(m.base, batch(x, mask)) == {"lm": want["lm"]}


# ----------------------------------------------------------------------------------------------------------------
# RL: the clipped surrogate, ReMax with the KL in the loss, pack, teacher-forced log-probs (rl.py)


def rl_cfg(**kw):
    return SimpleNamespace(**{"clip_eps": 0.2, "kl_placement": "reward", "kl_coef": 0.0, "aggregate": "sequence",
                              **kw})


def test_grpo_surrogate_on_both_sides_of_the_clip_for_both_signs():
    """min(rho A, clip(rho, 0.8, 1.2) A) with rho = exp(logp - old_logp), old_logp != 0, |A| = 2."""
    rho = torch.tensor([[1.5, 0.5, 1.0], [1.5, 0.5, 1.0]])
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.5, -2.5]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    A = torch.tensor([2.0, -2.0])
    loss, stats = rl.grpo_loss(old + rho.log(), old, old, A, mask, rl_cfg())
    # A = 2: min(3, 2.4) = 2.4, min(1, 1.6) = 1, 2; A = -2: min(-3, -2.4) = -3, min(-1, -1.6) = -1.6
    assert loss.item() == pytest.approx((-(2.4 + 1 + 2) / 3 - (-3 - 1.6) / 2) / 2, rel=1e-5)
    assert stats == {"clip_frac": pytest.approx(4 / 5), "ratio_max": pytest.approx(1.5, rel=1e-6)}
    # token aggregation over several ranks: the sum over this rank's tokens / n_tokens (all ranks' / the ranks)
    loss, _ = rl.grpo_loss(old + rho.log(), old, old, A, mask, rl_cfg(aggregate="token"), n_tokens=8.0)
    assert loss.item() == pytest.approx(-(2.4 + 1 + 2 - 3 - 1.6) / 8, rel=1e-5)


def test_remax_loss_with_k3_in_the_loss_by_hand():
    """L = mean_i mean_t [-A_i log pi + beta k3], k3 = r - log r - 1, r = pi_ref / pi."""
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]])
    ref = torch.tensor([[-1.5, -1.0], [-0.5, 0.0]])
    mask = torch.tensor([[True, True], [True, False]])
    A = torch.tensor([0.5, -1.0])
    k3 = lambda lp, lr: math.exp(lr - lp) - (lr - lp) - 1                              # noqa: E731
    row0 = (-0.5 * -1.0 + 0.1 * k3(-1.0, -1.5) - 0.5 * -2.0 + 0.1 * k3(-2.0, -1.0)) / 2
    row1 = 1.0 * -0.5 + 0.1 * k3(-0.5, -0.5)
    loss, _ = rl.remax_loss(logp, ref, A, mask, rl_cfg(kl_placement="loss", kl_coef=0.1))
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    loss, _ = rl.remax_loss(logp, ref, A, mask, rl_cfg(kl_placement="loss", kl_coef=0.1, aggregate="token"),
                            n_tokens=6.0)
    assert loss.item() == pytest.approx((2 * row0 + row1) / 6, rel=1e-6)


def test_aggregate_of_one_token():
    per_token, mask = torch.tensor([[0.0, 3.0], [5.0, 7.0]]), torch.tensor([[False, True], [False, False]])
    assert rl.aggregate(per_token, mask, "token").item() == 3.0
    assert rl.aggregate(per_token, mask, "sequence").item() == 1.5                    # (3 + nothing = 0) / 2 rows
    assert rl.aggregate(per_token, mask, "token", n_tokens=4.0).item() == 0.75       # another normaliser (ranks)
    assert rl.aggregate(per_token, mask, "token", n_tokens=0.5).item() == 3.0        # never below one token


def test_pack_by_hand():
    """x = prompt + response, right-padded; the mask and the actions sit at the positions t whose target x_{t+1} is
    a response token."""
    prompts = [[1, 2, 3], [4]]
    rows = [{"tokens": [5, 6], "actions": [7, 0]}, {"tokens": [8, 9, 10], "actions": [1, 2, 3]}]
    b = data.pack(prompts, rows, "cpu")
    assert b["x"].tolist() == [[1, 2, 3, 5, 6], [4, 8, 9, 10, 0]]
    assert b["mask"].tolist() == [[False, False, True, True], [True, True, True, False]]
    assert b["actions"].tolist() == [[-1, -1, 7, 0], [1, 2, 3, -1]]
    token_rows = [{"tokens": r["tokens"]} for r in rows]
    assert data.pack(prompts, token_rows, "cpu")["actions"].tolist() == [[-1] * 4] * 2


def test_teacher_forced_log_probs_by_one_forward_per_prefix(model):
    """log_probs: log pi(a_t | x_{1:t}) (latent) or log p(x_{t+1} | x_{1:t}) (token) at every response position,
    0 elsewhere, and the reference's under no gradient: each checked against a forward pass on x_{1:t} alone."""
    prompts = [[3, 1, 4], [1]]
    rows = [{"tokens": [5, 9], "actions": [2, 6]}, {"tokens": [2, 6, 5], "actions": [7, 0, 1]}]
    b = data.pack(prompts, rows, "cpu")
    ref = copy.deepcopy(model.policy)
    with torch.no_grad():
        ref.head.weight.mul_(1.5)
    learner = SimpleNamespace(model=model, trained=Root(model.policy), ref=ref)          # one process (rl.build)
    logp, ref_logp = rl.log_probs(learner, SimpleNamespace(level="latent", temperature=1.0), b, with_grad=True, ref=True)
    assert logp.requires_grad and not ref_logp.requires_grad
    alone = rl.log_probs(learner, SimpleNamespace(level="latent", temperature=1.0), b, with_grad=False)     # no reference: a tensor
    assert torch.equal(alone, logp.detach())
    with torch.no_grad():
        for i in range(2):
            for t in range(b["mask"].shape[1]):
                if not b["mask"][i, t]:
                    assert logp[i, t].item() == 0.0 and ref_logp[i, t].item() == 0.0
                    continue
                h = model.hidden(b["x"][i:i + 1, :t + 1])
                a = b["actions"][i, t]
                want = F.log_softmax(model.policy_logits(h)[0, -1], -1)[a]
                want_ref = F.log_softmax(ref(h, model.base.rope(0, t + 1, "cpu"))[0, -1], -1)[a]
                assert logp[i, t].item() == pytest.approx(want.item(), abs=1e-5)
                assert ref_logp[i, t].item() == pytest.approx(want_ref.item(), abs=1e-5)
    lm = tiny_llama()
    lm_ref = copy.deepcopy(lm)
    with torch.no_grad():
        lm_ref.output.weight.mul_(0.5)
    tok = data.pack(prompts, [{"tokens": r["tokens"]} for r in rows], "cpu")
    learner = SimpleNamespace(model=lm, trained=Root(lm), ref=lm_ref)
    logp, ref_logp = rl.log_probs(learner, SimpleNamespace(level="token", temperature=1.0), tok, with_grad=False, ref=True)
    assert not logp.requires_grad
    assert torch.equal(rl.log_probs(learner, SimpleNamespace(level="token", temperature=1.0), tok, with_grad=False), logp)
    with torch.no_grad():
        for i in range(2):
            for t in range(tok["mask"].shape[1]):
                x = tok["x"][i]
                if not tok["mask"][i, t]:
                    assert logp[i, t].item() == 0.0 and ref_logp[i, t].item() == 0.0
                    continue
                for net, got in ((lm, logp), (lm_ref, ref_logp)):
                    want = F.log_softmax(net(x[None, :t + 1])[0, -1], -1)[x[t + 1]]
                    assert got[i, t].item() == pytest.approx(want.item(), abs=1e-5)


def test_log_probs_at_the_sampling_temperature_on_the_kept_states(model):
    """log_probs divides the logits by tau (0.5 and 2 by hand; at 1 the logits as they are), and the latent level
    reads the frozen base's states the batch keeps (b["h"]) rather than running the base again: planted states
    give their own log-probs."""
    prompts = [[3, 1, 4], [1]]
    rows = [{"tokens": [5, 9], "actions": [2, 6]}, {"tokens": [2, 6, 5], "actions": [7, 0, 1]}]
    b = data.pack(prompts, rows, "cpu")
    learner = SimpleNamespace(model=model, trained=Root(model.policy), ref=None)
    with torch.no_grad():
        h = model.hidden(b["x"][:, :-1])                                                 # [B, L-1, D]
        logits, other = model.policy_logits(h), model.policy_logits(h.flip(0))
    for tau in (0.5, 1.0, 2.0):
        got = rl.log_probs(learner, SimpleNamespace(level="latent", temperature=tau), dict(b), with_grad=False)
        torch.testing.assert_close(got, policy.action_log_probs(logits.float() / tau, b["actions"], b["mask"]))
    got = rl.log_probs(learner, SimpleNamespace(level="latent", temperature=1.0), dict(b, h=h.flip(0)), with_grad=False)
    torch.testing.assert_close(got, policy.action_log_probs(other, b["actions"], b["mask"]))
    lm = tiny_llama()
    tok = data.pack(prompts, [{"tokens": r["tokens"]} for r in rows], "cpu")
    learner = SimpleNamespace(model=lm, trained=Root(lm), ref=None)
    with torch.no_grad():
        lm_logits = lm(tok["x"][:, :-1])                                                 # [B, L-1, V]
    for tau in (0.5, 2.0):
        got = rl.log_probs(learner, SimpleNamespace(level="token", temperature=tau), tok, with_grad=False)
        torch.testing.assert_close(got, rl.token_log_probs(lm_logits.float() / tau, tok["x"][:, 1:], tok["mask"]))


def test_action_log_probs_without_a_mask():
    logits = torch.tensor([[[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]]])
    actions = torch.tensor([[2, 1]])
    lse = [math.log(math.e + 1 + math.exp(-1)), math.log(2 * math.exp(0.5) + math.exp(2))]
    want = [[-1.0 - lse[0], 0.5 - lse[1]]]
    assert policy.action_log_probs(logits, actions).tolist() == [pytest.approx(want[0], rel=1e-6)]


def test_fixed_chooser_bounds():
    logits, n = torch.zeros(2, K), torch.zeros(2, dtype=torch.long)
    assert policy.fixed(0, K)(logits, n).tolist() == [0, 0]
    assert policy.fixed(np.int64(K - 1), K)(logits, n).tolist() == [K - 1] * 2
    for bad in (K, -1):
        with pytest.raises(ValueError, match="outside"):
            policy.fixed(bad, K)
