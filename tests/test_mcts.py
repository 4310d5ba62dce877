"""mcts.py: the Q-network's Double DQN, MCTS over latent actions, MCTS-Q, token-level MCTS, the cost counter.

Tiers: unit maths against by-hand numbers (Double-DQN targets with terminal steps, the target network's copy
schedule, PUCT selection, backup and the TD test on a hand-built tree); parity (a search's rollouts against
CoLA.generate / Transformer.generate, best-of-N against data.rollout with the same noise, the TD errors against a
full forward of the Q-network); properties of real searches on the tiny chain (deterministic, the answer is a path
of the tree, prefix reuse changes the cost but not the tree, the cost counter equals what the blocks ran); resume of
train-q after SIGKILL; bad input. Everything starts from the shared tiny chain (conftest.chain).

    python -m pytest -q tests/test_mcts.py
"""
import json
import math
import shutil
import subprocess
import sys
import time

import pytest
import torch

import data
from infra import treecache
import mcts
import policy
import qnet
import search_eval
import tasks
from cola import CoLA
from conftest import ENV, REPO, read_rows, run_ok, step_rows
from model import Transformer
from policy import seeded_sampler
from tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
QNET = REPO / "qnet.py"
NEW = 12                                                   # max new tokens of the searches here


@pytest.fixture(scope="module")
def models(chain):
    cola = CoLA.from_pretrained(chain / "fta-i/final").eval().requires_grad_(False)
    llama = Transformer.from_pretrained(chain / "sft/final").eval().requires_grad_(False)
    tok = Tokenizer.find(chain / "fta-i/final")
    problem = tasks.make_problems("countdown-2", 1, 0, split="val", stream="rl")[0]
    return cola, llama, tok, problem, tok.encode(problem.prompt, bos=True, eos=False)


def qnet_of(base, n_actions, level, std=0.0, seed=0):
    """A Q-network on the chain's base with a head of N(0, std^2) (0: the zero head of a fresh train-q)."""
    q = qnet.QNetwork.from_base(base, n_actions, level)
    if std:
        torch.nn.init.normal_(q.head.weight, std=std, generator=torch.Generator().manual_seed(seed))
    return q.eval().requires_grad_(False)


def search(model, level, tok, problem, prompt, qnet=None, **kw):
    cfg = mcts.SearchArgs(**{"max_new_tokens": NEW, "n_rounds": 10, "stop_at_success": False, **kw})
    s = mcts.Search(treecache.Engine(model, level, qnet), tok, problem, prompt, cfg)
    return s, s.run()


def snapshot(s):
    return [(n.index, n.parent.index if n.parent else -1, n.seg, n.tail, n.N, round(n.V, 6), n.R, n.terminal)
            for n in s.nodes]


# ----------------------------------------------------------------------------------------------------------------
# Double DQN


def test_double_dqn_targets_by_hand():
    """gamma 0.9. Row 0: actions at t = 1, 2, 3, reward 1 at t = 3 (terminal). Row 1: actions at t = 1, 2,
    reward 0.1 at t = 2 (terminal), t = 3 padding."""
    qo = torch.tensor([[[0, 0, 0], [.1, .5, .2], [.3, .1, 0], [.9, .8, .7]],
                       [[0, 0, 0], [0, 0, 0], [0, .2, .1], [5, 5, 5]]])                  # [2, 4, 3]
    qt = torch.tensor([[[0, 0, 0], [1, 2, 3], [4, 5, 6], [7, 8, 9]],
                       [[0, 0, 0], [0, 0, 0], [1, -1, 2], [10, 10, 10]]], dtype=torch.float)
    valid = torch.tensor([[False, True, True, True], [False, True, True, False]])
    r = torch.tensor([[0, 0, 0, 1.0], [0, 0, .1, 0]])
    y = qnet.double_dqn_targets(qo, qt, r, valid, 0.9)
    # row 0, t=1: a* = argmax Q(s_2) = 0, Q_target(s_2, 0) = 4 -> 3.6 (vanilla DQN's max Q_target would give 5.4);
    # t=2: a* = argmax Q(s_3) = 0 -> 0.9 * 7 = 6.3; t=3: terminal -> r = 1.
    # row 1, t=1: a* = 1, Q_target(s_2, 1) = -1 -> -0.9; t=2: terminal (t=3 is padding) -> 0.1, not 0.1 + 9.
    assert torch.allclose(y[valid], torch.tensor([3.6, 6.3, 1.0, -0.9, 0.1]))


def test_q_batch_puts_the_reward_on_the_last_action():
    rows = [{"prompt": [1, 2, 3], "tokens": [4, 5], "actions": [7, 8], "reward": 0.5},
            {"prompt": [1, 2], "tokens": [4, 5, 6], "actions": [9, 10, 11], "reward": 1.0}]
    b = qnet.q_batch(rows, "cpu")
    # x[0] = 1 2 3 4 5: actions at t = 2 (-> 4) and t = 3 (-> 5); x[1] = 1 2 4 5 6: t = 1, 2, 3
    assert b["mask"].tolist() == [[False, False, True, True], [False, True, True, True]]
    assert b["actions"][b["mask"]].tolist() == [7, 8, 9, 10, 11]
    assert b["rewards"].tolist() == [[0, 0, 0, 0.5], [0, 0, 0, 1.0]]


def test_target_network_changes_only_on_its_copy_schedule(models):
    cola, _, tok, problem, prompt = models
    pair = qnet.QPair(qnet_of(cola.base, 64, "latent").requires_grad_(True))
    opt = torch.optim.AdamW(pair.online.trained_parameters(), lr=1e-2)
    rows = [{"prompt": prompt[:20], "tokens": [65, 66, 67], "actions": [1, 2, 3], "reward": 1.0},
            {"prompt": prompt[:18], "tokens": [68, 69], "actions": [4, 5], "reward": 0.1}]
    b = qnet.q_batch(rows, "cpu")
    cfg = qnet.QArgs(target_every=3, gamma=0.99, grad_clip=1.0)
    flat = lambda m: torch.cat([p.detach().flatten() for p in m.parameters()]).clone()   # noqa: E731
    target_before, online_before = flat(pair.target), flat(pair.online)
    for step in range(7):
        m = qnet.q_update(pair, opt, b, cfg, step)
        online, target = flat(pair.online), flat(pair.target)
        assert not torch.equal(online, online_before), f"update {step + 1} did not train Q"
        if (step + 1) % 3 == 0:
            assert m["target_copied"] and torch.equal(target, online)
        else:
            assert not m["target_copied"] and torch.equal(target, target_before)
        online_before, target_before = online, target


# ----------------------------------------------------------------------------------------------------------------
# PUCT, backup and the TD test on a hand-built tree (gamma 0.9, c 0.7)


def test_backup_puct_and_td_test_by_hand():
    g, c = 0.9, 0.7
    root = mcts.Node(seg=[0], R=0.1)
    mcts.backup(root, g)
    assert (root.N, root.V) == (1, 0.1)
    a = mcts.Node(seg=[1], parent=root, prior=0.6, index=1, R=0.2)
    b = mcts.Node(seg=[2], parent=root, prior=0.3, index=2, R=0.5)
    root.children = [a, b]
    mcts.backup(a, g)            # Q(root, a) = (0.2 - 0.1) + 0.9 * 0.2 = 0.28
    assert (root.N, a.N) == (2, 1) and root.V == pytest.approx(0.28)
    mcts.backup(b, g)            # Q(root, b) = 0.4 + 0.45 = 0.85; V = (0.28 + 0.85) / 2
    assert root.N == 3 and root.V == pytest.approx(0.565)
    d = mcts.Node(seg=[3], parent=a, prior=0.9, index=3, R=1.0)
    a.children = [d]
    mcts.backup(d, g)            # V_a = Q(a, d) = 0.8 + 0.9 = 1.7; Q(root, a) = 0.1 + 1.53 = 1.63
    assert (root.N, a.N, d.N) == (4, 2, 1) and a.V == pytest.approx(1.7)
    assert root.V == pytest.approx((2 * 1.63 + 1 * 0.85) / 3)
    # PUCT = V + c p sqrt(N_parent) / (N + 1)
    assert mcts.puct(a, c) == pytest.approx(1.7 + 0.7 * 0.6 * 2 / 3)                  # 1.98
    assert mcts.puct(b, c) == pytest.approx(0.5 + 0.7 * 0.3 * 2 / 2)                  # 0.71
    assert mcts.puct(d, c) == pytest.approx(1.0 + 0.7 * 0.9 * math.sqrt(2) / 2)       # 1.445
    assert mcts.puct(root, c) == pytest.approx(root.V + 0.7 * 2 / 5)                  # 1.65
    nodes = [root, a, b, d]
    root.cands, a.cands = [None] * 3, [None] * 2                                       # one untried each
    assert mcts.select_best_first(nodes, c) is a
    a.cands = [None]                                                                   # a is full
    assert mcts.select_best_first(nodes, c) is root                                    # 1.65 > d's 1.445
    root.cands = [None] * 2                                                            # root full too
    assert mcts.select_best_first(nodes, c) is d
    assert mcts.select_descent(root, c) is d                                           # root -> a (1.98) -> d
    d.terminal = True                                                                  # a is exhausted now
    assert mcts.select_descent(root, c) is b and mcts.select_best_first(nodes, c) is b
    # TD test: (Q(s, a) - gamma max Q(s', .))^2 < 0.01
    assert mcts.td_error(0.5, 0.4, g) == pytest.approx(0.0196)
    assert mcts.td_error(0.4, 0.4, g) == pytest.approx(0.0016)                         # < 0.01: Q trusted there


# ----------------------------------------------------------------------------------------------------------------
# Real searches on the tiny chain


def check_tree(s, ans, model, level, tok, problem, prompt):
    """The answer is a path of the tree plus that node's rollout; every node's rollout is greedy decoding from its
    prefix and its R the checker's reward of it."""
    path, n = [], ans.node
    while n.parent is not None:
        assert n in n.parent.children
        path.append(n)
        n = n.parent
    assert n is s.root and ans.node in s.nodes
    assert ans.tokens == [t for m in reversed(path) for t in m.seg] + ans.node.tail
    assert ans.reward == tasks.reward(problem, ans.text) == max(m.R for m in s.nodes)
    stops = set(tok.stop_tokens)
    for m in s.nodes:
        prefix = prompt + m.response()
        text = tok.decode([t for t in m.response() + m.tail if t not in stops])
        assert m.R == tasks.reward(problem, text)
        if m.terminal:
            assert m.tail == []
            continue
        left = NEW - len(m.response())
        if level == "latent":
            want = model.generate([prefix], left, mode="greedy", eos=tok.stop_tokens)["tokens"][0]
        else:
            want = model.generate([prefix], left, eos=tok.stop_tokens)[0]
        assert m.tail == want, f"node #{m.index}"


@pytest.mark.parametrize("level", ["latent", "token"])
def test_search_is_deterministic_and_its_answer_is_a_path_of_the_tree(models, level):
    cola, llama, tok, problem, prompt = models
    model = cola if level == "latent" else llama
    s1, a1 = search(model, level, tok, problem, prompt)
    s2, a2 = search(model, level, tok, problem, prompt)
    assert snapshot(s1) == snapshot(s2) and a1.tokens == a2.tokens and a1.node.index == a2.node.index
    assert len(s1.nodes) == 11
    root_greedy = (cola.generate([prompt], NEW, mode="greedy", eos=tok.stop_tokens)["tokens"][0] if level == "latent"
                   else llama.generate([prompt], NEW, eos=tok.stop_tokens)[0])
    assert s1.root.tail == root_greedy                                                  # MCTS includes one greedy pass
    check_tree(s1, a1, model, level, tok, problem, prompt)


def test_descent_selection_and_show_tree(models):
    cola, _, tok, problem, prompt = models
    s, ans = search(cola, "latent", tok, problem, prompt, select="descent", n_rounds=6)
    check_tree(s, ans, cola, "latent", tok, problem, prompt)
    text = s.show()
    assert text.count("\n") == len(s.nodes) - 1 and "#0 root" in text and "a=" in text


def test_deep_chains_need_no_recursion(models):
    """exhausted, select_descent and show on a chain of 3,000 nodes, deeper than Python's recursion limit (a latent
    tree is often one chain: pi's top actions write one token)."""
    cola, _, tok, problem, prompt = models
    s, _ = search(cola, "latent", tok, problem, prompt, n_rounds=1)
    n, s.root.children, s.root.cands = s.root, [], [None]
    for i in range(1, 3001):
        child = mcts.Node(seg=[tok.encode("7", bos=False, eos=False)[0]], parent=n, index=i, cands=[None])
        n.children, n = [child], child
    n.terminal = True
    assert mcts.exhausted(s.root) and mcts.select_descent(s.root, 0.7) is None
    n.terminal, n.cands = False, [None, None]                    # the deepest node has an untried candidate
    assert not mcts.exhausted(s.root) and mcts.select_descent(s.root, 0.7) is n
    text = s.show()
    assert text.count("\n") == 3000 and text.splitlines()[-1].startswith("  " * 3000 + "#3000 ")


def test_prefix_reuse_changes_the_cost_not_the_tree(models):
    cola, _, tok, problem, prompt = models
    cost = {}
    trees = {}
    for kv in (True, False):
        for ro in (True, False):
            s, _ = search(cola, "latent", tok, problem, prompt, kv_reuse=kv, rollout_reuse=ro)
            trees[kv, ro], cost[kv, ro] = snapshot(s), s.e.cost.total
    assert all(t == trees[True, True] for t in trees.values())
    assert cost[True, True] < cost[True, False] < cost[False, False]
    assert cost[True, True] < cost[False, True] < cost[False, False]


def count_positions(modules):
    """Forward pre-hooks adding the positions each module's input holds ([B, T, D]) -> (counts, handles)."""
    counts, handles = [0] * len(modules), []
    for i, m in enumerate(modules):
        def hook(mod, args, i=i):
            counts[i] += args[0].shape[0] * args[0].shape[1]
        handles.append(m.register_forward_pre_hook(hook))
    return counts, handles


@pytest.mark.parametrize("reuse", [True, False])
def test_cost_counter_equals_the_forward_tokens_run(models, reuse):
    """MCTS-Q on CoLA (a Q head that sometimes fires), then best-of-N: the counters against hooks on the first block
    of the base, of pi and of the Q trunk, and on the merge module (one row per world-model call)."""
    cola, _, tok, problem, prompt = models
    q = qnet_of(cola.base, 64, "latent", std=0.02)
    counts, handles = count_positions([cola.base.layers[0], cola.policy.layers[0], q.trunk.layers[0], cola.merge])
    try:
        s, _ = search(cola, "latent", tok, problem, prompt, q, kv_reuse=reuse, rollout_reuse=reuse, n_rounds=8,
                      extend_tokens=4)
        c = s.e.cost
        assert counts == [c.base, c.policy, c.q, c.wm] and c.q > 0 and s.stats["td_tests"] > 0
        counts[:] = [0] * 4
        engine = treecache.Engine(cola, "latent")
        out = search_eval.best_of_n(engine, tok, problem, prompt, budget=len(prompt) + 30, seed=0, max_new_tokens=NEW,
                             top_k=40, wave=4, stop_at_success=False)
        c = engine.cost
        assert counts == [c.base, c.policy, 0, c.wm] and out["trace"][-1][0] == c.total
        assert out["trace"][-1][2] == c.flops(engine.rates)           # the samples' FLOPs add up to the engine's
    finally:
        for h in handles:
            h.remove()


def counted_flops(fn, sdpa: bool = True) -> int:
    """FLOPs of fn() counted independently of Cost: torch's FlopCounterMode for the matrix products (it has no
    formula for the CPU attention kernel) plus every scaled_dot_product_attention call, 4 x B x H x T_q x T_k x Dh
    (QK^T and the weights times V, over the whole score matrix)."""
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode
    real, attn = F.scaled_dot_product_attention, [0]

    def counted(q, k, v, *args, **kwargs):
        attn[0] += 4 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * q.shape[3] if sdpa else 0
        return real(q, k, v, *args, **kwargs)
    F.scaled_dot_product_attention = counted
    try:
        with FlopCounterMode(display=False) as mode:
            fn()
    finally:
        F.scaled_dot_product_attention = real
    return mode.get_total_flops() + attn[0]


@pytest.mark.parametrize("level", ["latent", "token"])
def test_flop_counter_equals_every_matrix_product_run(models, level):
    """Cost.flops of MCTS-Q (with and without prefix reuse) and of best-of-N equals the FLOPs torch counts for the
    same calls, to the FLOP: what the search runs is charged in full (policy blocks, world-model rows, W_lm,
    attention), so a FLOP-matched comparison cannot favour either level."""
    cola, llama, tok, problem, prompt = models
    model = cola if level == "latent" else llama
    q = qnet_of(cola.base if level == "latent" else llama, 64 if level == "latent" else llama.args.vocab_size,
                level, std=0.02)
    for reuse in (True, False):
        box = {}
        got = counted_flops(lambda: box.update(s=search(model, level, tok, problem, prompt, q, kv_reuse=reuse,
                                                         rollout_reuse=reuse, n_rounds=6, extend_tokens=4)[0]))
        s = box["s"]
        assert got == s.e.cost.flops(s.e.rates) == s.trace[-1][2] > 0 and s.stats["td_tests"] > 0
    engine = treecache.Engine(model, level)
    got = counted_flops(lambda: search_eval.best_of_n(engine, tok, problem, prompt, budget=len(prompt) + 30, seed=0,
                                                      max_new_tokens=NEW, top_k=40 if level == "latent" else None,
                                                      wave=4, stop_at_success=False))
    assert got == engine.cost.flops(engine.rates)


def test_mcts_q_td_errors_and_extension(models):
    """The TD error of every tested child equals (Q(s, a) - gamma max Q(s', .))^2 from a full forward of the
    Q-network over each prefix; with a zero Q head every test fires and each child is extended by the next k tokens
    of its greedy rollout, the tree staying consistent."""
    cola, _, tok, problem, prompt = models
    q = qnet_of(cola.base, 64, "latent", std=0.02)
    s, ans = search(cola, "latent", tok, problem, prompt, q, n_rounds=8)
    tested = [n for n in s.nodes if n.td is not None]
    assert tested and s.stats["td_tests"] == len(tested)
    for n in tested:
        short = prompt + n.response()[:len(n.response()) - n.extended]                  # the prefix when tested
        q_s = q(torch.tensor([short[:-1]]))[0, -1]
        q_next = q(torch.tensor([short]))[0, -1]
        assert n.td == pytest.approx(((q_s[n.action] - 0.99 * q_next.max()) ** 2).item(), rel=1e-4, abs=1e-7)
        assert (n.extended > 0) == (n.td < 0.01)
    zero = qnet_of(cola.base, 64, "latent")
    s, ans = search(cola, "latent", tok, problem, prompt, zero, n_rounds=4, extend_tokens=3)
    assert s.stats["td_fired"] == s.stats["td_tests"] > 0
    assert all(n.extended == 3 or (n.terminal and 0 < n.extended < 3) for n in s.nodes if n.td is not None)
    check_tree(s, ans, cola, "latent", tok, problem, prompt)


def test_best_of_n_matches_rl_rollouts_with_the_same_noise(models):
    """Samples i = 0..3 of best_of_n (prompt run once, rows leaving the batch when done) are data.rollout's rows with
    policy.sample_uniforms(seed, 0, i): the same tokens, whatever the wave size; another seed draws other noise, and its
    samples are the rollouts of that noise (whether they differ in text depends on how peaked the tiny model is)."""
    cola, llama, tok, problem, prompt = models
    assert not torch.equal(policy.sample_uniforms(3, 0, 0, 4, NEW), policy.sample_uniforms(4, 0, 0, 4, NEW))
    for model, level, top_k in ((cola, "latent", 40), (llama, "token", None)):
        for seed, waves in ((3, (4, 2)), (4, (4,))):
            u = policy.sample_uniforms(seed, 0, 0, 4, NEW)
            rows = data.rollout(model, tok, [prompt] * 4, seeded_sampler(u, 1.0, top_k), NEW)
            want = [tasks.score(problem, r["text"]) for r in rows]
            for wave in waves:
                out = search_eval.best_of_n(treecache.Engine(model, level), tok, problem, prompt, budget=10**6,
                                            seed=seed, max_new_tokens=NEW, top_k=top_k, wave=wave,
                                            stop_at_success=False, max_samples=4)
                assert out["tokens"] == [r["tokens"] for r in rows] and [e[1] for e in out["trace"]] == want
        costs = [e[0] for e in out["trace"]]
        assert costs == sorted(costs) and costs[0] == len(prompt) + len(rows[0]["tokens"]) - 1


# ----------------------------------------------------------------------------------------------------------------
# Entry points: train-q resumes after SIGKILL; search and eval; bad input


def q_cmd(out, *args):
    return [sys.executable, str(QNET), "--out-dir", str(out), *map(str, args)]


def test_train_q_resume_after_kill_same_curve(chain, models, tmp_path):
    args = ["--init", chain / "fta-i/final", "--task", "countdown-2", "--prompts", 2, "--samples", 2,
            "--val-prompts", 1, "--max-new-tokens", 6, "--batch", 2, "--steps", 10, "--ckpt-every", 5,
            "--eval-every", 5, "--target-every", 2, "--lr", "1e-3"]
    # the data train-q samples itself (same flags, same noise), with rewards set so that the curve moves: the
    # tiny chain's 6-token responses all score 0
    cfg = qnet.parse_q_args(list(map(str, args)) + ["--out-dir", str(tmp_path / "x")])
    cola, _, tok, problem, _ = models
    train = qnet.collect(cola, "latent", tok, tasks.problems_at(cfg.task, cfg.seed, 0, 2), 2, cfg, stream=0)
    val = qnet.collect(cola, "latent", tok, tasks.make_problems("countdown-2", 1, 0, split="val"), 1, cfg, stream=1)
    for i, r in enumerate(train + val):
        r["reward"] = [1.0, 0.1][i % 2]
    ref, run = tmp_path / "ref", tmp_path / "killed"
    for d in (ref, run):
        d.mkdir()
        torch.save({"key": {k: getattr(cfg, k) for k in qnet.DATA_KEYS}, "train": train, "val": val},
                   d / "trajectories.pt")
    run_ok(q_cmd(ref, *args))
    proc = subprocess.Popen(q_cmd(run, *args), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not any(r.get("step", 0) >= 6 for r in step_rows(run)):     # past the checkpoint of update 5
        assert proc.poll() is None and time.monotonic() < deadline, "run ended before update 6"
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    assert "resuming q-latent from" in run_ok(q_cmd(run, *args)).stdout
    rows_ref, rows_run = step_rows(ref), step_rows(run)
    assert [r["step"] for r in rows_run] == list(range(1, 11)) and rows_run == rows_ref
    assert len({r["td_loss"] for r in rows_ref}) > 1                                   # the curve moves
    assert [r["target_copied"] for r in rows_ref] == [False, True] * 5
    assert [r["eval"] for r in read_rows(run) if "eval" in r] == [r["eval"] for r in read_rows(ref) if "eval" in r]
    a, b = qnet.QNetwork.from_pretrained(ref / "final"), qnet.QNetwork.from_pretrained(run / "final")
    assert (a.level, a.n_actions) == ("latent", 64)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    hist = json.loads((run / "final/config.json").read_text())["train_history"]
    assert hist[-1]["stage"] == "q-latent" and hist[-2]["stage"] == "fta-i"


def test_train_q_says_when_every_reward_is_zero(chain, models, tmp_path, capsys):
    """All-zero training rewards give TD 0 from the zero head for ever: train-q says so in one line."""
    args = ["--init", chain / "fta-i/final", "--task", "countdown-2", "--prompts", 2, "--samples", 1,
            "--val-prompts", 1, "--max-new-tokens", 4, "--batch", 2, "--steps", 2, "--eval-every", 2]
    argv = [*map(str, args), "--out-dir", str(tmp_path / "q")]
    cfg = qnet.parse_q_args(argv)
    cola, _, tok, _, _ = models
    rows = qnet.collect(cola, "latent", tok, tasks.problems_at(cfg.task, cfg.seed, 0, 2), 1, cfg, stream=0)
    for r in rows:
        r["reward"] = 0.0
    (tmp_path / "q").mkdir()
    torch.save({"key": {k: getattr(cfg, k) for k in qnet.DATA_KEYS}, "train": rows, "val": rows[:1]},
               tmp_path / "q/trajectories.pt")
    qnet.main(argv)
    out = capsys.readouterr().out
    assert "warning: all 2 training trajectories score 0 on --task countdown-2" in out
    assert {r["td_loss"] for r in step_rows(tmp_path / "q")} == {0.0}


def test_search_and_eval_commands(chain, models, tmp_path, capsys):
    mcts.main(["--ckpt", str(chain / "fta-i/final"), "--n-rounds", "3", "--max-new-tokens", "8",
               "--show-tree", "--no-stop-at-success"])
    out = capsys.readouterr().out
    assert "#0 root" in out and "MCTS (latent actions): 3 rounds, 4 nodes" in out and "answer (node #" in out
    assert "stopped after --n-rounds 3" in out
    mcts.main(["--ckpt", str(chain / "fta-i/final"), "--n-rounds", "500", "--max-new-tokens", "2",
               "--no-stop-at-success"])                           # 2 tokens deep: 5 + 5 x 4 nodes at most
    out = capsys.readouterr().out
    assert "tree exhausted after" in out and "of --n-rounds 500" in out
    rows, text = search_eval.main(["--ckpt", str(chain / "fta-i/final"), "--llama", str(chain / "sft/final"),
                                   "--methods", "greedy,bon,token-mcts", "--problems", "2", "--seeds", "0,1",
                                   "--budgets", "200,260", "--max-new-tokens", "8", "--out-dir", str(tmp_path / "ev")])
    assert len(rows) == 2 + 4 + 2 and "| bon | 2 |" in text and "| token-mcts | 1 |" in text
    again, _ = search_eval.main(["--ckpt", str(chain / "fta-i/final"), "--llama", str(chain / "sft/final"),
                                 "--methods", "greedy,bon,token-mcts", "--problems", "2", "--seeds", "0,1",
                                 "--budgets", "200,260", "--max-new-tokens", "8", "--out-dir", str(tmp_path / "ev")])
    assert again == json.loads(json.dumps(rows))                                        # nothing rerun
    assert all(r["trace"][-1][0] == r["spent"] for r in rows)


def test_digest_sees_contents_names_and_linked_folders(tmp_path):
    """The eval key's checkpoint digest changes with a file's bytes (same size), its name, or a file in a symlinked
    folder; a link back up the tree is read once; the per-file cache is keyed so that a rewrite is seen."""
    ck, shared = tmp_path / "ck", tmp_path / "shared"
    ck.mkdir()
    shared.mkdir()
    (ck / "model.safetensors").write_bytes(b"abcd")
    (shared / "tokenizer.json").write_text("{}")
    (ck / "tok").symlink_to(shared)
    (ck / "loop").symlink_to(ck)                                     # a cycle: each folder once
    cache = {}
    first = search_eval.digest(str(ck), cache)
    assert search_eval.digest(str(ck), cache) == first and len(cache) == 2
    (shared / "tokenizer.json").write_text("[]")                     # same size, inside the linked folder
    second = search_eval.digest(str(ck), cache)
    (ck / "model.safetensors").write_bytes(b"abce")
    third = search_eval.digest(str(ck), cache)
    (ck / "model.safetensors").rename(ck / "other.safetensors")
    assert len({first, second, third, search_eval.digest(str(ck), cache)}) == 4


def test_eval_reruns_rows_of_a_replaced_checkpoint(chain, tmp_path, capsys):
    """A model replaced at the same path (or another --qnet) is not the model a stored row ran: its rows are
    computed again and the table reads only the new ones; rows of unchanged models are reused."""
    import shutil
    llama = tmp_path / "llama"
    shutil.copytree(chain / "sft/final", llama)
    argv = ["--ckpt", str(chain / "fta-i/final"), "--llama", str(llama), "--methods", "greedy,token-greedy",
            "--problems", "2", "--seeds", "0", "--budgets", "300", "--max-new-tokens", "8", "--out-dir",
            str(tmp_path / "ev")]
    first, _ = search_eval.main(argv)
    other = Transformer.from_pretrained(chain / "base/final")        # another Llama, written over the same path
    other.save_pretrained(llama)
    capsys.readouterr()
    rows, _ = search_eval.main(argv)
    printed = capsys.readouterr().out
    assert len(rows) == len(first) + 2                                 # token-greedy's 2 problems, again
    assert "token-greedy seed 0 problem 1/2" in printed and "greedy seed 0" not in printed.replace("token-greedy", "")
    new = [r for r in rows[len(first):]]
    assert {r["method"] for r in new} == {"token-greedy"} and all(r["models"] != first[-1]["models"] for r in new)


@pytest.fixture(scope="module")
def bad_qnets(models, tmp_path_factory):
    cola, llama, *_ = models
    d = tmp_path_factory.mktemp("qnets")
    qnet_of(cola.base, 32, "latent").save_pretrained(d / "k32")
    qnet_of(llama, llama.args.vocab_size, "token").save_pretrained(d / "token")
    return d


@pytest.mark.parametrize("case", ["action count", "token Q-net to latent search", "zero rounds", "unknown task",
                                  "prompt longer than the context", "not a Q-net", "Q-net run directory",
                                  "Q-net config without q_actions", "problem without meta", "bad device",
                                  "huge index"])
def test_bad_input_one_line(case, chain, bad_qnets, tmp_path):
    no_actions = tmp_path / "q"                                    # a Q-net whose config.json lost q_actions
    shutil.copytree(bad_qnets / "k32", no_actions)
    config = json.loads((no_actions / "config.json").read_text())
    del config["q_actions"]
    (no_actions / "config.json").write_text(json.dumps(config))
    long = json.dumps({"kind": "countdown", "prompt": "Using the numbers " + "1, " * 300, "answer": "1",
                       "meta": {"numbers": [1], "target": 1}})
    argv, expected = {
        "action count": (["--qnet", bad_qnets / "k32"], "Q-network over 32 actions, but --ckpt"),
        "token Q-net to latent search": (["--qnet", bad_qnets / "token"], "is a token-level Q-network (Q over V = "),
        "zero rounds": (["--n-rounds", "0"], "--n-rounds 0: expected an integer >= 1"),
        "unknown task": (["--task", "chess"], "--task 'chess': expected one of countdown, arith"),
        "prompt longer than the context": (["--problem", long], "leaves no room in the context of 512 tokens"),
        "not a Q-net": (["--qnet", chain / "sft/final"], "is a plain Llama, not a Q-network"),
        "Q-net run directory": (["--qnet", chain / "bc"], "describes no model (no hidden_size) (a run directory? its "
                                                           "model is in final/)"),
        "Q-net config without q_actions": (["--qnet", no_actions], "expected q_actions (an integer >= 1) and q_level"),
        "problem without meta": (["--problem", json.dumps({"kind": "countdown", "prompt": "x", "answer": "1"})],
                                 "--problem: the countdown checker cannot read it"),
        "bad device": (["--device", "foo"], "--device 'foo': expected cpu, cuda or cuda:N"),
        "huge index": (["--index", "1000000000"], "--index 1000000000: expected an integer >= 0 and < 10000"),
    }[case]
    with pytest.raises(SystemExit) as e:
        mcts.main(["--ckpt", str(chain / "fta-i/final"), *map(str, argv)])
    msg = str(e.value.code)
    assert expected in msg and "\n" not in msg, msg


def test_bench_rl_step_flops_equal_the_products_run():
    """tools/bench.py's FLOPs of an RL step (generation, the log-prob pass, the update) against torch's count of the
    same computations at the tiny preset, random weights, every response exactly `new` tokens: generation and the
    log-prob pass to the FLOP; the update's matrix products (forward and backward) to the FLOP, its attention by
    the same rule as the forward (the CPU kernel's backward has no torch formula)."""
    from cola import COLA_PRESETS
    from model import PRESETS
    from tools import bench
    torch.manual_seed(0)
    cola, llama = CoLA(PRESETS["tiny"], COLA_PRESETS["tiny"]), Transformer(PRESETS["tiny"])
    cola.init_weights()
    llama.init_weights()
    P, N = 9, 5
    want = bench.rl_step_flops("tiny", P, N)
    prompts = torch.randint(0, 256, (2, P)).tolist()
    x = torch.randint(0, 256, (2, P + N))
    with torch.no_grad():
        assert counted_flops(lambda: cola.generate(prompts, N, mode="greedy")) == 2 * want["latent"]["rollout"]
        assert counted_flops(lambda: llama.generate(prompts, N)) == 2 * want["token"]["rollout"]
        box = {}

        def latent_log_probs():                      # the base once (its h kept), pi and the reference pi over it
            box["h"] = cola.hidden(x)
            return [cola.policy_logits(box["h"]) for _ in range(2)]
        assert counted_flops(latent_log_probs) == 2 * want["latent"]["log-probs"]
        assert counted_flops(lambda: [llama(x) for _ in range(2)]) == 2 * want["token"]["log-probs"]
    cola.requires_grad_(False).policy.requires_grad_(True)
    for logits, level in ((lambda: cola.policy_logits(box["h"]), "latent"), (lambda: llama(x), "token")):
        forward = counted_flops(lambda: logits())
        attn = forward - counted_flops(lambda: logits(), sdpa=False)
        total = counted_flops(lambda: logits().float().logsumexp(-1).sum().backward(), sdpa=False) + 3 * attn
        assert total == 2 * want[level]["update"], level



def test_answer_rules_on_a_hand_built_tree(models):
    """--answer best-rollout: highest R, a terminal node first on ties, then the older node. --answer release: the
    terminal node of highest V when its R is at least the best R, else the best rollout."""
    cola, _, tok, problem, prompt = models

    def answer(rule, nodes):
        s = mcts.Search(treecache.Engine(cola, "latent"), tok, problem, prompt, mcts.SearchArgs(answer=rule))
        s.root.R, s.nodes = 0.0, [s.root, *nodes]
        return s.answer().node
    a = mcts.Node(seg=[5], index=1, R=0.1, V=0.2, terminal=True)
    c = mcts.Node(seg=[7], index=3, R=0.1, V=0.6, terminal=True)
    assert answer("best-rollout", [a, c]) is a and answer("release", [a, c]) is c          # equal R: V decides
    b = mcts.Node(seg=[6], index=2, R=1.0, V=0.2)                                            # a better rollout
    assert answer("best-rollout", [a, b, c]) is b and answer("release", [a, b, c]) is b
    assert answer("release", [b]) is b                                                      # no terminal node


def test_fill_expands_every_child_in_one_round_and_stop_at_eos(models):
    """--fill: one round gives the selected node (the root) all its candidates, each evaluated, backed up and in the
    trace; --stop-at-eos ends the search at the first child whose token ends the response."""
    _, llama, tok, problem, prompt = models                  # over tokens: the top-b are b distinct children
    one, _ = search(llama, "token", tok, problem, prompt, n_rounds=1)
    full, _ = search(llama, "token", tok, problem, prompt, n_rounds=1, fill=True)
    assert len(one.root.children) == 1 and len(full.root.children) == len(full.root.cands) > 1
    assert full.stats["rounds"] == 1 and len(full.trace) == 1 + len(full.root.cands)
    assert full.root.N == 1 + len(full.root.cands)
    first = one.root.children[0].seg[0]                     # make the first child's token a stop token
    cfg = mcts.SearchArgs(max_new_tokens=NEW, n_rounds=5, stop_at_success=False, stop_at_eos=True)
    s = mcts.Search(treecache.Engine(llama, "token"), tok, problem, prompt, cfg)
    s.stops.add(first)
    s.run()
    assert s.stats["stopped"] == "eos" and s.stats["rounds"] == 1 and s.root.children[0].terminal


def test_search_eval_writes_nothing_until_its_models_load_and_survives_a_tiny_budget(chain, tmp_path):
    """A run refused for its flags or models leaves no config.json behind to refuse the corrected rerun; a budget
    below what best-of-N's prompt costs gives rows with no completion (success 0), the same on a rerun."""
    out = tmp_path / "ev"
    with pytest.raises(SystemExit, match="--methods ',': expected one or more of greedy"):
        search_eval.main(["--methods", ",", "--out-dir", str(out)])
    with pytest.raises(SystemExit, match="is a plain Llama, expected a CoLA checkpoint"):
        search_eval.main(["--ckpt", str(chain / "sft/final"), "--methods", "greedy", "--out-dir", str(out)])
    assert not out.exists()
    argv = ["--ckpt", str(chain / "fta-i/final"), "--methods", "bon", "--problems", "1", "--seeds", "0",
            "--budgets", "30", "--max-new-tokens", "8", "--out-dir", str(out)]
    rows, text = search_eval.main(argv)
    assert [r["trace"] for r in rows] == [[]] and "| bon | 1 | 0.000 |" in text
    assert search_eval.main(argv) == (json.loads(json.dumps(rows)), text)

