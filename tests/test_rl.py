"""rl.py: GRPO / ReMax over latent actions and over tokens (Algorithm 4).

Tiers: unit maths against by-hand numbers (advantages, the clipped loss, both KL estimators, aggregation), the
rollout's log-probs against a teacher-forced recomputation (ratio exactly 1 before the first update), what a step
changes (latent: the policy only, bit for bit; token: the base), ReMax's baseline, resume after SIGKILL, bad input.
Runs start from the shared tiny chain (conftest.chain), a few steps of a few short rollouts each.

    python -m pytest -q tests/test_rl.py
"""
import json
import math
import shutil
import subprocess
import sys
import time

import pytest
import torch

import cola
import data
import rl
import tasks
from cola import CoLA
from conftest import ENV, REPO, read_rows, run_ok, step_rows
from infra.parallel import World
from policy import action_log_probs, greedy, seeded_sampler
from tokenizer import Tokenizer

RL = REPO / "rl.py"
FAST = ["--prompts-per-step", "2", "--group", "2", "--max-new-tokens", "6", "--eval-problems", "2",
        "--eval-every", "2", "--ckpt-every", "2", "--lr", "1e-3"]


def rl_cmd(out, *args):
    return [sys.executable, str(RL), "--out-dir", str(out), *map(str, args)]


def cfg_of(*argv):
    """float32 whatever the host (--dtype auto would pick bf16 on a CPU with it): these tests compare sums whose
    rounding must stay far below their bounds."""
    return rl.parse_args(["--init", "x", "--dtype", "float32", *map(str, argv)])


CPU, ONE = torch.device("cpu"), World()


def learner_of(cfg):
    """rl.build on one process, with its optimizer over what RL trains."""
    learner = rl.build(cfg, ONE, CPU)
    return learner, torch.optim.AdamW([p for p in learner.trained.parameters() if p.requires_grad], lr=cfg.lr)


# ----------------------------------------------------------------------------------------------------------------
# Unit maths


def test_grpo_advantages_by_hand():
    R = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5])          # two groups of 4
    A = rl.grpo_advantages(R, 4)
    std = math.sqrt((0.75 ** 2 + 3 * 0.25 ** 2) / 3)                    # Bessel-corrected, mean 0.25
    want = [0.75 / (std + 1e-4)] + [-0.25 / (std + 1e-4)] * 3 + [0.0] * 4   # equal rewards: no signal
    assert torch.allclose(A, torch.tensor(want), atol=1e-6)
    small = rl.grpo_advantages(torch.tensor([0.1, 0.0, 0.0, 0.0]), 4)     # std 0.05: where the 1e-4 goes shows
    assert small[0].item() == pytest.approx(0.075 / (0.05 + 1e-4), rel=1e-5)   # not 0.075 / sqrt(0.05^2 + 1e-4)


def test_kl_penalty_comes_after_the_group_normalisation():
    """A group with equal task rewards gets advantages of size beta * KL, not unit size from KL noise; a group with
    different rewards gets its normalised task rewards minus beta * KL (the release's order). ReMax: the same
    penalty on R - R_greedy. With the KL in the loss, the advantages are the task's alone."""
    from types import SimpleNamespace
    beta = 1e-3
    cfg = SimpleNamespace(kl_coef=beta, kl_placement="reward")
    R = torch.tensor([0.1, 0.1, 0.1, 0.1, 1.0, 0.0, 0.0, 0.0])          # all equal; one success in four
    kl = torch.tensor([3.0, -1.0, 0.5, 2.0, 1.0, 1.0, 4.0, 0.0])         # k1 summed over each response
    A = rl.advantages(R, kl, cfg, 4)
    assert torch.allclose(A[:4], -beta * kl[:4]) and A[:4].abs().max() <= beta * kl.abs().max()
    assert torch.allclose(A[4:], rl.grpo_advantages(R, 4)[4:] - beta * kl[4:])
    assert A[4:].abs().mean() > 0.5
    greedy = torch.tensor([0.1, 0.0, 1.0, 0.1, 0.0, 0.0, 0.0, 0.0])
    assert torch.allclose(rl.advantages(R, kl, cfg, 1, greedy), R - greedy - beta * kl)
    cfg.kl_placement = "loss"
    assert torch.equal(rl.advantages(R, kl, cfg, 4), rl.grpo_advantages(R, 4))


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    assert torch.allclose(rl.k1(logp, ref), torch.tensor([0.5, -1.0]))
    want = [math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1]           # r - log r - 1, r = pi_ref / pi
    assert torch.allclose(rl.k3(logp, ref), torch.tensor(want), atol=1e-6)
    assert (rl.k3(torch.randn(100), torch.randn(100)) >= 0).all()


def test_grpo_clipped_loss_by_hand():
    """Two responses, three tokens, one masked; eps 0.2. rho = exp(logp - old)."""
    cfg = cfg_of("--kl-placement", "loss", "--kl-coef", "0.5")
    logp = torch.tensor([[math.log(1.5), math.log(0.5), 0.0], [math.log(1.1), 0.0, 0.0]])
    old = torch.zeros(2, 3)
    ref = torch.zeros(2, 3)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    A = torch.tensor([1.0, -2.0])
    loss, stats = rl.grpo_loss(logp, old, ref, A, mask, cfg)
    # row 0 (A = 1): min(1.5, 1.2) = 1.2; min(0.5, 0.8) = 0.5 -> surrogate mean 0.85
    # row 1 (A = -2): min(-2.2, -2.2) = -2.2; min(-2, -2) = -2 twice -> mean -6.2 / 3
    k3 = lambda lp: math.exp(-lp) + lp - 1                                              # noqa: E731
    row0 = -(1.2 + 0.5) / 2 + 0.5 * (k3(math.log(1.5)) + k3(math.log(0.5))) / 2
    row1 = -(-2.2 - 2 - 2) / 3 + 0.5 * (k3(math.log(1.1)) + 0 + 0) / 3
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    assert stats["clip_frac"] == pytest.approx(2 / 5)                     # 1.5 and 0.5 are outside [0.8, 1.2]
    tok = cfg_of("--aggregate", "token", "--kl-coef", "0")
    loss, _ = rl.grpo_loss(logp, old, ref, A, mask, tok)
    assert loss.item() == pytest.approx(-(1.2 + 0.5 - 2.2 - 2 - 2) / 5, rel=1e-6)


def test_remax_loss_is_reinforce():
    cfg = cfg_of("--algo", "remax", "--kl-coef", "0")
    logp = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]], requires_grad=True)
    mask = torch.tensor([[True, True], [True, False]])
    loss, _ = rl.remax_loss(logp, logp.detach(), torch.tensor([0.5, -1.0]), mask, cfg)
    # row 0: -0.5 * (-1 - 2) / 2 = 0.75; row 1: -(-1) * (-0.5) / 1 = -0.5; mean over rows 0.125
    assert loss.item() == pytest.approx(0.125)
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[-0.125, -0.125], [0.5, 0.0]]))   # -A / |o_i| / B


def test_seeded_sampler_is_per_row():
    """A row draws the same choices in any batch; the draws follow softmax restricted to the top-k."""
    torch.manual_seed(0)
    logits = torch.randn(3, 64)
    u = torch.rand(3, 5)
    n = torch.tensor([2, 0, 4])
    full = seeded_sampler(u, 1.0, 40)(logits, n)
    for i in range(3):
        assert seeded_sampler(u[i:i + 1], 1.0, 40)(logits[i:i + 1], n[i:i + 1]).item() == full[i].item()
    many = seeded_sampler(torch.rand(20000, 1), 1.0, 3)(logits[:1].expand(20000, -1), torch.zeros(20000, dtype=torch.long))
    top = logits[0].topk(3).indices
    assert set(many.unique().tolist()) <= set(top.tolist())
    freq = torch.bincount(many, minlength=64)[top].float() / 20000
    assert torch.allclose(freq, logits[0, top].softmax(-1), atol=0.02)


# ----------------------------------------------------------------------------------------------------------------
# On the tiny chain's checkpoints


@pytest.fixture(scope="module")
def latent(chain):
    cfg = cfg_of("--init", chain / "bc/final", *FAST)
    cfg.init = str(chain / "bc/final")
    return cfg, rl.load_model(cfg, torch.device("cpu")), Tokenizer.find(cfg.init, None)


def test_rollout_logprobs_equal_teacher_forced(latent):
    """The log pi the rollout records (KV cache, step by step) equals the update's teacher-forced recomputation, so
    the importance ratio is 1 before the first update (up to float rounding, 1e-5)."""
    cfg, model, tok = latent
    problems = tasks.problems_at(cfg.task, cfg.seed, 0, 2)
    prompts = [tok.encode(p.prompt, bos=True, eos=False) for p in problems]
    out = model.generate(prompts, 6, eos=tok.stop_tokens, choose=seeded_sampler(torch.rand(2, 6), 1.0, 40))
    rows = [{"tokens": t, "actions": a} for t, a in zip(out["tokens"], out["actions"])]
    b = data.pack(prompts, rows, "cpu")
    view = rl.SimpleNamespace(model=model, trained=rl.Root(model.policy), ref=None)
    logp = rl.log_probs(view, cfg, b, with_grad=False)
    recorded = torch.zeros_like(logp)
    for i, (p, lp) in enumerate(zip(prompts, out["logprobs"])):
        recorded[i, len(p) - 1:len(p) - 1 + len(lp)] = torch.tensor(lp)
    assert torch.allclose(logp, recorded, atol=1e-5)
    assert b["mask"].sum() == sum(len(t) for t in out["tokens"])
    assert (b["actions"][b["mask"]] >= 0).all() and (b["actions"][~b["mask"]] == -1).all()


@pytest.mark.parametrize("level", ["latent", "token"])
def test_log_probs_follow_the_sampling_temperature(latent, chain, level):
    """The ratio's and the KL's log-probs are those of the distribution rollouts sample, softmax(logits / tau)."""
    import copy
    import dataclasses
    cfg, model, tok = latent
    if level == "token":
        cfg = dataclasses.replace(cfg, level="token", init=str(chain / "sft/final"))
        model = rl.load_model(cfg, torch.device("cpu"))
    x = torch.tensor([tok.encode("Using the numbers [3, 4]", bos=True, eos=False)])
    L = x.shape[1]
    b = {"x": x, "mask": torch.ones(1, L - 1, dtype=torch.bool), "actions": torch.randint(0, 64, (1, L - 1))}
    part = model.policy if level == "latent" else model
    view = rl.SimpleNamespace(model=model, trained=rl.Root(part), ref=copy.deepcopy(part))
    with torch.no_grad():
        if level == "latent":
            h = model.hidden(x[:, :-1])
            logits = model.policy(h, model.base.rope(0, L - 1, "cpu"))
            want = lambda tau: action_log_probs(logits / tau, b["actions"], b["mask"])      # noqa: E731
        else:
            logits = model(x[:, :-1])
            want = lambda tau: rl.token_log_probs(logits / tau, x[:, 1:], b["mask"])       # noqa: E731
    for tau in (1.0, 2.0, 0.5):
        logp, ref_logp = rl.log_probs(view, dataclasses.replace(cfg, temperature=tau), b, with_grad=False, ref=True)
        assert torch.allclose(logp, want(tau), atol=1e-5) and torch.allclose(ref_logp, want(tau), atol=1e-5), tau
    assert not torch.allclose(want(2.0), want(1.0))


def test_latent_step_changes_the_policy_only(latent):
    cfg, _, tok = latent
    learner, opt = learner_of(cfg)
    model = learner.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for step in range(3):                                 # until some group has unequal rewards
        m = rl.rl_step(learner, opt, cfg, tok, step, ONE, CPU)
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(k.startswith("policy.") for k in changed), sorted(changed)[:5]
    assert all(math.isfinite(v) for v in m.values())


def test_frozen_base_runs_once_per_rollout_batch(latent):
    """The world model's states h are computed once for the behaviour / reference log-probs and reused by every
    update: more updates per batch run the frozen base no more often."""
    import dataclasses
    cfg, _, tok = latent
    calls = {}
    for mu in (1, 3):
        learner, opt = learner_of(dataclasses.replace(cfg, updates_per_batch=mu))
        real, n = learner.model.hidden, []
        learner.model.hidden = lambda *a, **k: n.append(1) or real(*a, **k)
        rl.rl_step(learner, opt, dataclasses.replace(cfg, updates_per_batch=mu), tok, 0, ONE, CPU)
        calls[mu] = len(n)
    assert calls[1] == calls[3] > 0, calls


def test_token_step_changes_the_base(chain):
    cfg = cfg_of("--level", "token", "--init", chain / "sft/final", *FAST)
    tok = Tokenizer.find(cfg.init, None)
    learner, opt = learner_of(cfg)
    model, ref = learner.model, learner.ref
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for step in range(3):
        rl.rl_step(learner, opt, cfg, tok, step, ONE, CPU)
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, before[k]) for k, v in ref.state_dict().items())


# The chain's world model (3 steps of Stage A) writes the same token under every action, so every sample of a group
# is the same text and no reward can vary within a group. A codebook of 3 x N(0, 1) entries (the same on every load
# and rank) makes the written tokens follow the actions: the RL machinery below then sees rewards that vary.
VARY = """
def vary(model):
    if hasattr(model, "codebook"):
        with torch.no_grad():
            g = torch.Generator().manual_seed(0)
            model.codebook.weight.copy_(3 * torch.randn(model.codebook.weight.shape, generator=g))
    return model
"""
SCRIPT_VARY = f"import cola, torch\n{VARY}\n_load = cola.load_level\ncola.load_level = lambda *a, **k: vary(_load(*a, **k))\n"


def varied_loads(monkeypatch):
    ns = {"torch": torch}
    exec(VARY, ns)
    real = cola.load_level
    monkeypatch.setattr(cola, "load_level", lambda *a, **k: ns["vary"](real(*a, **k)))


@pytest.mark.parametrize("aggregate", ["sequence", "token"])
def test_micro_batches_accumulate_to_the_whole_batch(chain, monkeypatch, aggregate):
    """--micro-batch 1 (gradients accumulated row by row) gives the loss and the weights of one forward over all
    rows, for both aggregations (their weighting of the chunks differs)."""
    monkeypatch.setitem(tasks.REWARDS, "task", lambda p, c: sum(map(ord, c)) % 7 / 6)   # varies with the text
    varied_loads(monkeypatch)
    results = []
    for micro in (0, 1):
        cfg = cfg_of("--init", chain / "fta-p/final", *FAST, "--group", 4, "--max-new-tokens", 12,
                     "--micro-batch", micro, "--aggregate", aggregate, "--updates-per-batch", 2)
        cfg.init = str(chain / "fta-p/final")
        learner, opt = learner_of(cfg)
        m = rl.rl_step(learner, opt, cfg, Tokenizer.find(cfg.init, None), 0, ONE, CPU)
        results.append((m, learner.model.policy.state_dict()))
    (a, wa), (b, wb) = results
    assert a["grad_norm"] > 0 and a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
    # two Adam steps of lr 1e-3 move a weight by up to 2e-3; the summation order's rounding moves it 2e-5 (measured),
    # and the second update's ratios, computed from those weights, by ~1e-6 relative (4.244514 against 4.244518)
    assert a["clip_frac"] == pytest.approx(b["clip_frac"])
    assert a["ratio_max"] == pytest.approx(b["ratio_max"], rel=1e-4)
    assert all(torch.allclose(wa[k], wb[k], rtol=0, atol=1e-4) for k in wa)


def test_remax_baseline_is_the_greedy_rollout_of_the_same_prompt(latent, monkeypatch):
    cfg, model, tok = latent
    cfg = cfg_of("--algo", "remax", "--init", cfg.init, *FAST, "--kl-coef", "0")
    calls = []
    real = data.rollout

    def spy(model, tok, prompts, choose, max_new_tokens):
        rows = real(model, tok, prompts, choose, max_new_tokens)
        calls.append((prompts, rows))
        return rows
    monkeypatch.setattr(data, "rollout", spy)
    seen = {}

    def record(logp, ref_logp, A, mask, cfg, n_tokens=None):
        seen["A"] = A
        return (logp * 0).sum(), {}
    monkeypatch.setattr(rl, "remax_loss", record)
    learner, opt = learner_of(cfg)
    model = learner.model
    rl.rl_step(learner, opt, cfg, tok, 0, ONE, CPU)
    (p1, sampled), (p2, greedy_rows) = calls
    assert p1 == p2                                             # the same prompts, one greedy rollout each
    direct = model.generate(p1, cfg.max_new_tokens, eos=tok.stop_tokens, choose=greedy())["tokens"]
    assert [r["tokens"] for r in greedy_rows] == direct
    problems = tasks.problems_at(cfg.task, cfg.seed, 0, cfg.prompts_per_step)
    want = [tasks.reward(p, s["text"]) - tasks.reward(p, g["text"]) for p, s, g in zip(problems, sampled, greedy_rows)]
    assert seen["A"].tolist() == pytest.approx(want)


# ----------------------------------------------------------------------------------------------------------------
# Runs: resume after SIGKILL, bad input


def test_run_resume_after_kill_same_curve(chain, tmp_path):
    args = ["--init", chain / "bc/final", *FAST, "--steps", 6, "--ckpt-every", 2, "--eval-every", 3]
    ref = tmp_path / "ref"
    run_ok(rl_cmd(ref, *args), timeout=600)
    run = tmp_path / "killed"
    run.mkdir()
    proc = subprocess.Popen(rl_cmd(run, *args), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not any(r.get("step", 0) >= 3 for r in step_rows(run)):
        assert proc.poll() is None and time.monotonic() < deadline, "run ended before step 3"
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    run_ok(rl_cmd(run, *args), timeout=600)
    drop = ("rollout_s", "logprob_s", "update_s", "rollout_tok_per_s")
    clean = lambda rows: [{k: v for k, v in r.items() if k not in drop} for r in rows]    # noqa: E731
    assert clean(step_rows(run)) == clean(step_rows(ref))
    assert [r["eval"] for r in read_rows(run) if "eval" in r] == [r["eval"] for r in read_rows(ref) if "eval" in r]
    a, b = CoLA.from_pretrained(ref / "final"), CoLA.from_pretrained(run / "final")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    cfgs = json.loads((run / "final/config.json").read_text())["train_history"]
    assert cfgs[-1]["stage"] == "rl-latent-grpo" and cfgs[-2]["stage"] == "bc"
    # killed after the last checkpoint, before the export (no final/, no final row): the rerun evaluates the last
    # checkpoint's weights and exports them, its final row equal to the uninterrupted run's; a rerun of the
    # finished run the same again (never an empty evaluation)
    final_eval = [r["eval"] for r in read_rows(ref) if "eval" in r][-1]
    shutil.rmtree(run / "final")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    for _ in range(2):
        run_ok(rl_cmd(run, *args), timeout=600)
        assert [r["eval"] for r in read_rows(run) if "eval" in r][-1] == final_eval
        assert (run / "final/config.json").exists()


def test_a_non_finite_step_stops_before_it_is_saved(chain, tmp_path, monkeypatch, capsys):
    """A step whose loss or gradient norm is not finite ends the run with one line before anything of it is saved:
    the checkpoints hold only finite steps, and no final/ is written."""
    real = rl.rl_step
    calls = []

    def step(*args, **kwargs):
        m = real(*args, **kwargs)
        calls.append(1)
        return {**m, "loss": float("nan")} if len(calls) == 2 else m
    monkeypatch.setattr(rl, "rl_step", step)
    out = tmp_path / "nan"
    with pytest.raises(SystemExit, match="step 2: the loss is nan"):
        rl.main(["--init", str(chain / "bc/final"), *FAST, "--steps", "4", "--ckpt-every", "1", "--dtype", "float32",
                 "--out-dir", str(out)])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000001"] and not (out / "final").exists()


def bad_cases(chain, tmp_path):
    return {
        "latent on a plain Llama": (["--init", chain / "sft/final"], "--level latent needs a CoLA checkpoint"),
        "token on a CoLA export": (["--level", "token", "--init", chain / "bc/final"], "--level token trains a plain"),
        "unknown task": (["--task", "chess"], "--task 'chess': expected one of countdown, arith"),
        "unknown algorithm": (["--algo", "ppo"], "--algo 'ppo': expected one of grpo, remax"),
        "group of one": (["--group", "1"], "--group 1: GRPO normalises rewards within a group of at least 2"),
        "another preset": (["--init", chain / "bc/final", "--preset", "llama-3.1-8b"],
                           "--preset llama-3.1-8b has dim 4096"),
        "no init": (["--init", tmp_path / "nowhere"], "nowhere: directory not found"),
        "init not a checkpoint": (["--init", chain / "bc"],
                                  "describes no model (no hidden_size) (a run directory? its model is in final/)"),
        "negative lr": (["--lr", "-1"], "--lr -1"),
    }


@pytest.mark.parametrize("case", ["latent on a plain Llama", "token on a CoLA export", "unknown task",
                                  "unknown algorithm", "group of one", "another preset", "no init",
                                  "init not a checkpoint", "negative lr"])
def test_bad_input_one_line_before_work(case, chain, tmp_path, monkeypatch, capsys):
    cases = bad_cases(chain, tmp_path)
    argv, expected = cases[case]
    if "--init" not in argv:
        argv = argv + ["--init", chain / "bc/final"]
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        rl.main([*map(str, argv), "--out-dir", str(out)])
    msg = str(e.value.code)
    assert expected in msg and "\n" not in msg, msg
    assert not out.exists() or not (out / "metrics.jsonl").exists()


def test_prompts_that_do_not_split_over_the_ranks_stop_with_one_line():
    with pytest.raises(SystemExit) as e:
        rl.parse_args(["--init", "x", "--prompts-per-step", "3"], World(rank=0, size=2, launched=True))
    msg = str(e.value.code)
    assert "--prompts-per-step 3 is not a multiple of the 2 processes" in msg and "\n" not in msg


@pytest.mark.parametrize("form", ["space", "equals"])
def test_preset_and_algo_pick_the_defaults_in_either_flag_form(form):
    """--algo=remax --preset=llama-3.1-8b gets ReMax's 8B values, as --algo remax --preset llama-3.1-8b does."""
    flags = {"--algo": "remax", "--preset": "llama-3.1-8b", "--init": "x"}
    argv = [s for k, v in flags.items() for s in ((k, v) if form == "space" else (f"{k}={v}",))]
    cfg = rl.parse_args(argv)
    assert (cfg.algo, cfg.preset, cfg.lr, cfg.kl_coef) == ("remax", "llama-3.1-8b", 1e-5, 1e-4)
    assert cfg.steps == rl.RLArgs.steps and cfg.task == rl.RLArgs.task          # not the tiny preset's
    assert rl.parse_args(["--init=x"]).lr == rl.TINY["lr"]
    level = ["--level", "token"] if form == "space" else ["--level=token"]          # the tiny token level's own lr
    assert rl.parse_args([*level, "--init=x"]).lr == rl.TINY_TOKEN["lr"] == 3e-5
    assert rl.parse_args([*level, "--init=x", "--lr", "1e-4"]).lr == 1e-4


def test_reward_that_returns_nan_stops_with_one_line(latent, monkeypatch):
    cfg, model, tok = latent
    monkeypatch.setitem(tasks.REWARDS, "task", lambda p, c: float("nan"))
    learner, opt = learner_of(cfg)
    with pytest.raises(SystemExit, match="returned nan .* must be finite numbers in \\[0, 1\\]"):
        rl.rl_step(learner, opt, cfg, tok, 0, ONE, CPU)


# ----------------------------------------------------------------------------------------------------------------
# Two processes (torchrun, gloo, float32) against one


def test_two_processes_equal_one(chain, tmp_path):
    """Rollouts split over 2 ranks (each sample's noise from its global index), the policy FSDP2-sharded, the world
    model replicated: the same rollouts and rewards, losses within 1e-5 relative, the same evaluations and export.
    The proxy reward varies within every group, so every step has a gradient; two updates per batch use the clip."""
    script = tmp_path / "rl_varied.py"                   # the tiny chain's samples score 0 on the task and proxy
    script.write_text(                                  # rewards; this one varies with the text (of fta-p's model)
        f"import sys\nsys.path.insert(0, {str(REPO)!r})\nimport rl, tasks\n{SCRIPT_VARY}"
        f"tasks.REWARDS['task'] = lambda p, c: sum(map(ord, c)) % 7 / 6\nrl.main()\n")
    args = ["--init", chain / "fta-p/final", *FAST, "--prompts-per-step", 4, "--group", 4, "--max-new-tokens", 12,
            "--steps", 3, "--kl-coef", 0.1,
            "--updates-per-batch", 2, "--eval-every", 3, "--dtype", "float32", "--judge", "none"]
    one, two = tmp_path / "one", tmp_path / "two"
    run_ok([sys.executable, str(script), "--out-dir", str(one), *map(str, args)], timeout=600)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    run_ok(torchrun + [str(script), "--out-dir", str(two), *map(str, args)], timeout=600)
    a, b = step_rows(one), step_rows(two)
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert x["reward"] == pytest.approx(y["reward"], rel=1e-6) and x["resp_len"] == y["resp_len"]   # rollouts
        assert x["grad_norm"] > 0, (x, y)
        for k in ("loss", "kl", "adv_abs", "grad_norm", "clip_frac"):
            # the loss is a mean of A * ratio whose advantages cancel to ~0: its rounding scales with |A|, not itself
            scale = max(abs(x[k]), abs(y[k]), x["adv_abs"] if k == "loss" else 1e-6)
            assert abs(x[k] - y[k]) <= 1e-5 * scale, (x["step"], k, x[k], y[k])
    evals = [[r["eval"] for r in read_rows(d) if "eval" in r] for d in (one, two)]
    assert len(evals[0]) == len(evals[1]) == 2                                   # step 0, and step 3: the result
    for x, y in zip(*evals):
        assert x.keys() == y.keys() and all(x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-6) for k in x), (x, y)
    p, q = CoLA.from_pretrained(one / "final"), CoLA.from_pretrained(two / "final")
    for (k, x), y in zip(p.state_dict().items(), q.state_dict().values()):
        # Adam's normalised step turns the rounding of a near-zero gradient into up to lr per step: a handful of
        # elements may move by that much (measured: 1 of 32768 by 6.5e-5); all others agree within 2e-5
        d = (x - y).abs()
        assert int((d > 2e-5).sum()) <= max(1, x.numel() // 10_000) and d.max() <= 6 * 1e-3, (k, d.max().item())
    assert json.loads((two / "final/config.json").read_text())["train_history"][-1]["stage"] == "rl-latent-grpo"
