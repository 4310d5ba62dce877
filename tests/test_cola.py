"""CoLA tests (idm.py, policy.py, cola.py), all on a tiny random model, CPU, a few seconds each.

Tiers: look-ahead/causality, unit maths (Gumbel straight-through, regulariser), parity (world model against the
formula written out here; the official checkpoint layout against transformers' Llama blocks), generation
(cache vs recompute, every mode), sizes at 8B, checkpoint I/O, one-line errors.

    python -m pytest -q tests/test_cola.py
"""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from cola import COLA_PRESETS, CoLA, CoLAArgs, default_cola_args
from idm import codebook_usage, entropy_regulariser, gumbel_softmax_st
from infra.checkpoint import hf_config, unpermute_qk
from model import PRESETS, ModelArgs, Transformer
from policy import action_log_probs, sample_actions

BASE = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=32, ffn_dim_multiplier=1.0,
                 max_seq_len=64)
ARGS = CoLAArgs(n_actions=8, n_idm_layers=2, n_merge_layers=2, n_policy_layers=2, merge_hidden=96)
K = ARGS.n_actions


def tiny(seed=0, dtype=torch.float32) -> CoLA:
    torch.manual_seed(seed)
    model = CoLA(BASE, ARGS)
    model.init_weights()
    return model.to(dtype).eval()


@pytest.fixture(scope="module")
def model():
    return tiny()


@pytest.fixture(scope="module")
def model64():
    # float64: cached and recomputed attention differ only in summation order (~1e-16), so no near-tie can flip
    return tiny(seed=1, dtype=torch.float64)


def tokens(B, T, seed=0):
    return torch.randint(BASE.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------------------
# Look-ahead and causality


@torch.no_grad()
def test_idm_reads_exactly_one_token_ahead(model):
    x = tokens(2, 10)                                                       # x_{1:T+1}, T = 9
    z = model.idm_logits(model.hidden(x))                                   # [B, T+1, K]; step t at z[:, t+1]
    assert torch.equal(model.idm_labels(model.hidden(x)), z[:, 1:].argmax(-1))
    t = 4                                                                   # 0-based step: x[:, :t+1] -> x[:, t+1]
    x_next = x.clone()
    x_next[:, t + 1] = (x[:, t + 1] + 1) % BASE.vocab_size                  # change x_{t+1}
    z_next = model.idm_logits(model.hidden(x_next))
    assert not torch.allclose(z_next[:, t + 1], z[:, t + 1])                # the label of step t sees x_{t+1}
    x_later = x.clone()
    x_later[:, t + 2:] = (x[:, t + 2:] + 1) % BASE.vocab_size               # change x_{t+2} and later
    z_later = model.idm_logits(model.hidden(x_later))
    assert torch.equal(z_later[:, :t + 2], z[:, :t + 2])                    # ... and nothing later
    assert not torch.equal(z_later[:, t + 2], z[:, t + 2])


@torch.no_grad()
def test_policy_is_causal(model):
    x = tokens(2, 10, seed=1)
    pi = model.policy_logits(model.hidden(x))                               # [B, T, K]
    t = 5
    x2 = x.clone()
    x2[:, t + 1:] = (x[:, t + 1:] + 3) % BASE.vocab_size
    pi2 = model.policy_logits(model.hidden(x2))
    assert torch.equal(pi2[:, :t + 1], pi[:, :t + 1])
    x3 = x.clone()
    x3[:, t] = (x[:, t] + 3) % BASE.vocab_size
    assert not torch.allclose(model.policy_logits(model.hidden(x3))[:, t], pi[:, t])


# ----------------------------------------------------------------------------------------------------------------
# Straight-through Gumbel, regulariser, small helpers


def test_straight_through_trains_the_idm():
    model = tiny(seed=2).train()
    model.base.requires_grad_(False)                                        # Stage A: base frozen (Norm_f, W_lm too)
    model.policy.requires_grad_(False)
    x = tokens(2, 9, seed=2)
    with torch.no_grad():
        h = model.hidden(x)                                                 # frozen base, [B, T+1, D]
    z = model.idm_logits(h)[:, 1:]                                          # [B, T, K]
    a_st, y, k = gumbel_softmax_st(z, 2.0, torch.Generator().manual_seed(0))
    assert ((a_st == 0) | (a_st == 1)).all() and torch.equal(a_st.sum(-1), torch.ones_like(a_st[..., 0]))
    assert torch.equal(a_st.argmax(-1), k) and torch.equal(y.argmax(-1), k)
    logits = model.world_logits(h[:, :-1], a_st)                            # [B, T, V]
    assert torch.allclose(logits, model.world_logits(h[:, :-1], k), atol=1e-6, rtol=0)
    ce = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())      # world-model CE alone ...
    (g_head,) = torch.autograd.grad(ce, model.idm.head.weight, retain_graph=True)
    assert g_head.abs().sum() > 0                                           # ... reaches f_inverse through a~
    (ce + entropy_regulariser(y, 0.001)).backward()
    assert model.idm.head.weight.grad.abs().sum() > 0                       # gradient reaches f_inverse
    assert model.idm.layers[0].attention.wq.weight.grad.abs().sum() > 0
    assert model.codebook.weight.grad.abs().sum() > 0
    assert model.merge.layers[0].gate_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in [*model.base.parameters(), *model.policy.parameters()])


def test_gumbel_hard_sample_is_exact_softmax_draw():
    z = torch.tensor([1.5, 0.0, -1.0, 0.7, 2.2, -0.3])
    Z = z.expand(40000, -1)
    ks = [gumbel_softmax_st(Z, tau, torch.Generator().manual_seed(7))[2] for tau in (0.3, 2.0, 10.0)]
    assert torch.equal(ks[0], ks[1]) and torch.equal(ks[1], ks[2])          # tau never changes the hard sample
    freq = torch.bincount(ks[1], minlength=6).float() / Z.shape[0]
    assert (freq - z.softmax(-1)).abs().max() < 0.012                       # 4.8 sigma at p = 0.5, n = 40000


def test_entropy_regulariser_is_minus_beta_entropy():
    y = torch.randn(3, 5, K).softmax(-1)
    entropy = -(y * torch.log(y + 1e-8)).sum(-1)                            # [3, 5]
    assert torch.allclose(entropy_regulariser(y, 0.001), -0.001 * entropy.mean())
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[0, :2] = True
    assert torch.allclose(entropy_regulariser(y, 0.5, mask), -0.5 * entropy[0, :2].mean())
    # A one-hot row (a relaxed sample at a low temperature) has exact zeros: 0 log(0 + 1e-8) = 0, and the gradient
    # stays finite (y log y without the 1e-8 gives nan there).
    hot = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]], requires_grad=True)
    r = entropy_regulariser(hot, 2.0)
    assert r.item() == pytest.approx(2.0 * (1.0 * math.log(1 + 1e-8) + math.log(0.5 + 1e-8)) / 2)
    r.backward()
    assert torch.isfinite(hot.grad).all()


def test_codebook_usage_and_policy_helpers():
    u = codebook_usage(torch.tensor([[0, 0, 0, 3], [3, 0, 5, 0]]), K)
    assert u["alive"] == 3 and u["top_share"] == 5 / 8
    assert math.isclose(u["perplexity"], math.exp(-(5 / 8 * math.log(5 / 8) + 2 / 8 * math.log(2 / 8)
                                                    + 1 / 8 * math.log(1 / 8))))
    logits = torch.randn(2, 4, K)
    acts = torch.randint(K, (2, 4))
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    acts[0, 2:] = -1                                                        # padding under the mask is fine
    lp = action_log_probs(logits, acts, mask)
    ref = F.log_softmax(logits, -1).gather(-1, acts.clamp_min(0)[..., None])[..., 0]
    assert torch.equal(lp[~mask], torch.zeros(2)) and torch.allclose(lp[mask], ref[mask])
    assert torch.equal(sample_actions(logits[:, 0], temperature=0), logits[:, 0].argmax(-1))


# ----------------------------------------------------------------------------------------------------------------
# World model parity with the formula


def rmsnorm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def world_reference(h, actions, C, merge, norm_w, W_lm, eps):
    """Eq: e = C[:, a]; s_i = s_{i-1} + W_down(silu(W_gate [s; e]) * W_up [s; e]); W_lm(Norm_f(s_2) - h)."""
    e = C.t()[actions]                                                      # [B, T, D]
    s = h
    for W_gate, W_up, W_down in merge:
        x = torch.cat([s, e], -1)                                           # [B, T, 2D]
        s = s + (F.silu(x @ W_gate.t()) * (x @ W_up.t())) @ W_down.t()
    return (rmsnorm(s, norm_w, eps) - h) @ W_lm.t()                         # [B, T, V]


@torch.no_grad()
def test_world_logits_match_formula(model):
    x = tokens(2, 7, seed=3)
    h = model.hidden(x)                                                     # [B, T, D]
    a = torch.randint(K, (2, 7))
    merge = [(m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight) for m in model.merge.layers]
    ref = world_reference(h, a, model.codebook.weight, merge, model.base.norm.weight, model.base.output.weight,
                          BASE.norm_eps)
    out = model.world_logits(h, a)
    assert out.shape == (2, 7, BASE.vocab_size)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.allclose(model.world_logits(h[:, -1:], a[:, -1:])[:, 0], out[:, -1], atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# Generation

PROMPTS = [[5, 17, 3, 9], [42], [7, 7, 1, 2, 60, 8]]
NEW = 6


@pytest.mark.parametrize("mode", ["policy", "greedy", "fixed", "random", "forced"])
def test_generate_cache_matches_recompute(model64, mode):
    forced = torch.randint(K, (3, NEW), generator=torch.Generator().manual_seed(3))
    kw = dict(mode=mode, action=5 if mode == "fixed" else None, forced_actions=forced if mode == "forced" else None,
              top_k=4)
    a = model64.generate(PROMPTS, NEW, use_cache=True, generator=torch.Generator().manual_seed(11), **kw)
    b = model64.generate(PROMPTS, NEW, use_cache=False, generator=torch.Generator().manual_seed(11), **kw)
    assert a["tokens"] == b["tokens"] and a["actions"] == b["actions"]
    assert torch.allclose(torch.tensor(a["logprobs"]), torch.tensor(b["logprobs"]), atol=1e-9)
    for p, toks, acts, lps in zip(PROMPTS, a["tokens"], a["actions"], a["logprobs"]):
        assert len(toks) == len(acts) == len(lps) == NEW and all(0 <= t < K for t in acts)
        # independent replay: log pi from a fresh forward pass, tokens = argmax p_WM(. | h_t, a_t)
        seq = torch.tensor([p + toks])
        with torch.no_grad():
            h = model64.hidden(seq)                                         # [1, L, D]
            pos = torch.arange(len(p) - 1, len(p) - 1 + NEW)                # states x_{1:t} behind each new token
            lp = F.log_softmax(model64.policy_logits(h)[0, pos].float(), -1)  # [NEW, K]
            assert torch.allclose(lp[torch.arange(NEW), torch.tensor(acts)], torch.tensor(lps, dtype=lp.dtype),
                                  atol=1e-9)
            wl = model64.world_logits(h[:, pos], torch.tensor([acts]))      # [1, NEW, V]
            assert wl[0].argmax(-1).tolist() == toks
            if mode == "policy":                                            # sampled from pi's top-k (k = 4 of 8)
                kth = lp.topk(4, dim=-1).values[:, -1]                      # [NEW]
                assert (lp[torch.arange(NEW), torch.tensor(acts)] >= kth).all(), "an action outside the top-k"
    if mode == "fixed":
        assert all(acts == [5] * NEW for acts in a["actions"])
    if mode == "forced":
        assert a["actions"] == forced.tolist()
    if mode == "random":
        assert len({x for acts in a["actions"] for x in acts}) > 1


def test_samplers_keep_to_the_top_k():
    """pi is sampled from its top-k only (paper: k = 40 of 64), by default and through the choosers."""
    from policy import sample_actions, sampler, seeded_sampler
    logits = (-torch.arange(64) * 1e-3).float().expand(4000, -1)           # nearly flat: ranks 40-63 hold 37%
    n = torch.zeros(4000, dtype=torch.long)
    for draw in (sample_actions(logits, generator=torch.Generator().manual_seed(0)),      # default top_k = 40
                 sampler(1.0, 40, 1.0, torch.Generator().manual_seed(1))(logits, n),
                 seeded_sampler(torch.rand(4000, 1, generator=torch.Generator().manual_seed(2)), 1.0, 40)(logits, n)):
        assert draw.max() < 40 and len(draw.unique()) == 40


def test_generate_stops_at_eos(model64):
    gen = lambda: torch.Generator().manual_seed(5)                         # noqa: E731
    full = model64.generate(PROMPTS, NEW, mode="random", generator=gen())
    eos = full["tokens"][0][2]
    cut = model64.generate(PROMPTS, NEW, mode="random", generator=gen(), eos=eos)
    for f, c, fa, ca in zip(full["tokens"], cut["tokens"], full["actions"], cut["actions"]):
        n = f.index(eos) + 1 if eos in f else len(f)
        assert c == f[:n] and ca == fa[:n]
    assert len(cut["tokens"][0]) <= 3


# ----------------------------------------------------------------------------------------------------------------
# Sizes at 8B (built on the meta device: no memory)


def test_param_counts_8b():
    with torch.device("meta"):
        m = CoLA(PRESETS["llama-3.1-8b"], COLA_PRESETS["llama-3.1-8b"])
    n = m.num_params()
    print(n)
    # exact: idm 872714240, merge 587202560, policy 1745162240, codebook 262144, total 11235602432
    assert (round(n["idm"] / 1e9, 3), round(n["merge"] / 1e9, 3), round(n["policy"] / 1e9, 3)) == \
        (0.873, 0.587, 1.745)
    assert round(n["total"] / 1e9, 2) == 11.24 and n["codebook"] == 64 * 4096
    assert round(sum(p.numel() for p in m.idm.layers[0].parameters()) / 1e6, 1) == 218.1


def test_param_groups_disjoint_and_complete(model):
    groups = model.param_groups()
    assert set(groups) == {"base", "idm", "codebook", "merge", "policy"}
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in model.parameters()}


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: the official layout written here by hand, round trips, starting from a plain Llama


def official_tensors(seed=0, n_idm=2, n_merge=2, n_policy=2, K_=K, F_merge=96) -> dict:
    """Random tensors under the release's names (HF Llama + IntentionModel_v1), q/k in HF row order."""
    g = torch.Generator().manual_seed(seed)
    d, Fb, V = BASE.dim, BASE.ffn_hidden, BASE.vocab_size
    kv = BASE.n_kv_heads * BASE.head_dim
    r = lambda *s: torch.randn(*s, generator=g) * 0.2                      # noqa: E731
    norm = lambda: 1 + 0.1 * torch.randn(d, generator=g)                   # noqa: E731

    def block(p):
        return {f"{p}.self_attn.q_proj.weight": r(d, d), f"{p}.self_attn.k_proj.weight": r(kv, d),
                f"{p}.self_attn.v_proj.weight": r(kv, d), f"{p}.self_attn.o_proj.weight": r(d, d),
                f"{p}.mlp.gate_proj.weight": r(Fb, d), f"{p}.mlp.up_proj.weight": r(Fb, d),
                f"{p}.mlp.down_proj.weight": r(d, Fb), f"{p}.input_layernorm.weight": norm(),
                f"{p}.post_attention_layernorm.weight": norm()}
    t = {"model.embed_tokens.weight": r(V, d), "model.norm.weight": norm(), "lm_head.weight": r(V, d),
         "model.action_norm.weight": norm(), "model.action_head.weight": r(K_, d),
         "model.action_code_book.weight": r(d, K_), "model.policy_norm.weight": norm(),
         "model.policy_head.weight": r(K_, d)}
    for i in range(BASE.n_layers):
        t.update(block(f"model.layers.{i}"))
    for i in range(n_idm):
        t.update(block(f"model.action_layers.{i}"))
    for i in range(n_policy):
        t.update(block(f"model.policy_layers.{i}"))
    for i in range(n_merge):
        t.update({f"model.action_merge_layers.{i}.gate_proj.weight": r(F_merge, 2 * d),
                  f"model.action_merge_layers.{i}.up_proj.weight": r(F_merge, 2 * d),
                  f"model.action_merge_layers.{i}.down_proj.weight": r(d, F_merge) * 0.5})
    return t


def official_config(num_code=K, F_merge=96) -> dict:
    return {"architectures": ["IntentionForCausalLM"], "model_type": "llama", "hidden_size": BASE.dim,
            "intermediate_size": BASE.ffn_hidden, "num_attention_heads": BASE.n_heads,
            "num_key_value_heads": BASE.n_kv_heads, "num_hidden_layers": BASE.n_layers,
            "vocab_size": BASE.vocab_size, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"},
            "max_position_embeddings": 64, "tie_word_embeddings": False, "hidden_act": "silu",
            "num_code": num_code, "num_action_layer": 2, "num_dyna_layer": 2, "num_policy_layer": 2, "v": 1,
            "cola_merge_hidden": F_merge}


def write_official(path, tensors, cfg):
    from safetensors.torch import save_file
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(cfg))
    return path


@torch.no_grad()
def test_official_layout_loads_and_matches_reference(tmp_path):
    """Our loader vs transformers' LlamaModel / LlamaDecoderLayer on the same official tensors."""
    tf = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
    t, cfg = official_tensors(), official_config()
    ours = CoLA.from_pretrained(write_official(tmp_path / "cola", t, cfg)).eval()
    assert not ours.initialised_from_llama and ours.args.merge_hidden == 96
    assert torch.equal(ours.idm.layers[1].attention.wq.weight,
                       unpermute_qk(t["model.action_layers.1.self_attn.q_proj.weight"], BASE.n_heads))
    assert torch.equal(ours.policy.layers[0].attention.wk.weight,
                       unpermute_qk(t["model.policy_layers.0.self_attn.k_proj.weight"], BASE.n_kv_heads))
    assert torch.equal(ours.codebook.weight, t["model.action_code_book.weight"])

    hf_cfg = tf.LlamaConfig(**{k: v for k, v in cfg.items() if k != "architectures"})
    hf_cfg._attn_implementation = "eager"
    ref = tf.LlamaForCausalLM(hf_cfg).eval()
    ref.load_state_dict({k: v for k, v in t.items() if k.startswith(("model.layers.", "model.embed", "model.norm",
                                                                      "lm_head"))}, strict=True)
    x = tokens(2, 9, seed=4)
    h_ref = ref.model(input_ids=x).last_hidden_state                        # Norm_f(last block), [B, T, D]
    h = ours.hidden(x)
    assert torch.allclose(h, h_ref, atol=1e-4, rtol=1e-4)

    T = x.shape[1]
    pos = torch.arange(T)[None]
    cos_sin = LlamaRotaryEmbedding(hf_cfg)(h_ref, pos)
    mask = torch.full((T, T), float("-inf")).triu(1)[None, None]           # additive causal mask

    def stack(prefix, n, norm, head):
        s = h_ref
        for i in range(n):
            layer = LlamaDecoderLayer(hf_cfg, i).eval()
            layer.load_state_dict({k[len(f"{prefix}.{i}."):]: v for k, v in t.items()
                                   if k.startswith(f"{prefix}.{i}.")}, strict=True)
            out = layer(s, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin)
            s = out[0] if isinstance(out, tuple) else out
        return rmsnorm(s, t[norm], 1e-5) @ t[head].t()                      # [B, T, K]

    assert torch.allclose(ours.idm_logits(h), stack("model.action_layers", 2, "model.action_norm.weight",
                                                    "model.action_head.weight"), atol=1e-4, rtol=1e-4)
    assert torch.allclose(ours.policy_logits(h), stack("model.policy_layers", 2, "model.policy_norm.weight",
                                                       "model.policy_head.weight"), atol=1e-4, rtol=1e-4)
    a = torch.randint(K, (2, T))
    merge = [tuple(t[f"model.action_merge_layers.{i}.{n}.weight"] for n in ("gate_proj", "up_proj", "down_proj"))
             for i in range(2)]
    w_ref = world_reference(h_ref, a, t["model.action_code_book.weight"], merge, t["model.norm.weight"],
                            t["lm_head.weight"], 1e-5)
    assert torch.allclose(ours.world_logits(h, a), w_ref, atol=1e-4, rtol=1e-4)


def test_save_load_round_trip_is_bit_exact(model, tmp_path):
    model.save_pretrained(tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert (cfg["num_code"], cfg["num_action_layer"], cfg["num_dyna_layer"], cfg["num_policy_layer"], cfg["v"]) == \
        (K, 2, 2, 2, 1)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "ck" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert set(official_tensors()) == names                                 # exactly the official names
    back = CoLA.from_pretrained(tmp_path / "ck")
    assert back.args == model.args and hf_config(back.base_args) == hf_config(model.base_args)
    sa, sb = model.state_dict(), back.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_start_from_plain_llama(tmp_path):
    torch.manual_seed(0)
    base = Transformer(BASE)
    base.init_weights()
    base.save_pretrained(tmp_path / "llama")
    torch.manual_seed(1)
    m = CoLA.from_pretrained(tmp_path / "llama", cola_args=ARGS)
    assert m.initialised_from_llama and m.args == ARGS
    sb, sm = base.state_dict(), m.base.state_dict()
    assert all(torch.equal(sb[k], sm[k]) for k in sb)
    assert not any(p.is_meta for p in m.parameters()) and all(p.isfinite().all() for p in m.parameters())
    d = BASE.dim
    assert abs(m.idm.head.weight.std().item() / math.sqrt(2 / (5 * d)) - 1) < 0.25
    assert abs(m.merge.layers[0].down_proj.weight.std().item() / math.sqrt(2 / (5 * d)) - 1) < 0.1
    assert abs(m.policy.layers[0].attention.wo.weight.std().item() * math.sqrt(d) * ARGS.n_policy_layers - 1) < 0.1
    assert torch.equal(m.policy.norm.weight, torch.ones(d))
    out = m.generate([[1, 2, 3]], 4, mode="fixed", action=2)               # usable straight away
    assert len(out["tokens"][0]) == 4
    assert default_cola_args(PRESETS["tiny"]) == COLA_PRESETS["tiny"]      # default sizes picked by base shape
    assert default_cola_args(BASE) == CoLAArgs()


# ----------------------------------------------------------------------------------------------------------------
# One-line errors


def one_line(excinfo):
    return "\n" not in str(excinfo.value)


def test_bad_action_indices(model):
    with pytest.raises(ValueError, match=r"action index 8 is outside \[0, 8\)") as e:
        model.generate(PROMPTS, 3, mode="fixed", action=K)
    assert one_line(e)
    forced = torch.zeros(3, 3, dtype=torch.long)
    forced[1, 2] = -1
    with pytest.raises(ValueError, match=r"action index -1 is outside \[0, 8\)") as e:
        model.generate(PROMPTS, 3, mode="forced", forced_actions=forced)
    assert one_line(e)
    with pytest.raises(ValueError, match=r"world_logits: action index 9"):
        model.world_logits(torch.zeros(1, 2, BASE.dim), torch.tensor([[0, 9]]))
    with pytest.raises(ValueError, match="mode 'sampled' is not one of"):
        model.generate(PROMPTS, 3, mode="sampled")


def test_checkpoint_missing_module(tmp_path):
    t = {k: v for k, v in official_tensors().items() if not k.startswith("model.policy_layers.")}
    with pytest.raises(ValueError, match=r"config.json says num_policy_layer 2 but the checkpoint holds 0 "
                                         r"model.policy_layers.N blocks") as e:
        CoLA.from_pretrained(write_official(tmp_path / "a", t, official_config()))
    assert one_line(e)
    t = {k: v for k, v in official_tensors().items() if k != "model.action_norm.weight"}
    with pytest.raises(ValueError, match="missing tensor 'model.action_norm.weight'") as e:
        CoLA.from_pretrained(write_official(tmp_path / "b", t, official_config()))
    assert one_line(e)


def test_checkpoint_num_code_mismatch(tmp_path):
    with pytest.raises(ValueError, match=r"'model.action_head.weight' of shape \(8, 64\) holds 8 actions but "
                                         r"config.json num_code is 16") as e:
        CoLA.from_pretrained(write_official(tmp_path / "a", official_tensors(), official_config(num_code=16)))
    assert one_line(e)
    with pytest.raises(ValueError, match="cola_args.n_actions 16 disagrees with config.json num_code 8"):
        CoLA.from_pretrained(write_official(tmp_path / "b", official_tensors(), official_config()),
                             cola_args=CoLAArgs(n_actions=16, n_idm_layers=2, n_merge_layers=2, n_policy_layers=2))
