"""eval.py: the measures against numbers written out by hand, their consistency with training's evaluation, the
diversity measure's sanity ranking, the plots (only where matplotlib is installed: it is optional), one-line errors.

Tiers: unit maths (pairwise cosine, distinct-n, QD, mean pooling) by hand; consistency (per-action losses add up to
the overall ones, which equal eval.cola_metrics'); sanity (held-out text: random tokens get the lowest QD, the
highest distinct-n); smoke (every command on the tiny chain's checkpoints: conftest.chain); plots (skipped without
matplotlib), and the pipeline's hook without it; bad input.

    python -m pytest -q tests/test_eval.py
"""
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import eval as ev
from tokenizer import Tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: one torch thread (small tensors, shared CPUs)


def tiny_llama(seed=0, vocab=612):
    from model import ModelArgs, Transformer
    torch.manual_seed(seed)
    m = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab, multiple_of=32,
                              max_seq_len=128))
    m.init_weights()
    return m.eval()


def tiny_cola(seed=0):
    from cola import CoLA, CoLAArgs
    from model import ModelArgs
    torch.manual_seed(seed)
    m = CoLA(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=612, multiple_of=32, max_seq_len=128),
             CoLAArgs(n_actions=8, n_idm_layers=1, n_merge_layers=2, n_policy_layers=1, merge_hidden=96))
    m.init_weights()
    return m.eval()


# ----------------------------------------------------------------------------------------------------------------
# Unit maths, by hand (these grade assignment 3's eval functions)


def test_mean_pairwise_cosine_by_hand():
    emb = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0))
    want = [sum(F.cosine_similarity(emb[p, i], emb[p, j], dim=0).item() for i in range(4) for j in range(i + 1, 4))
            / 6 for p in range(3)]
    got = ev.mean_pairwise_cosine(emb)
    assert got.shape == (3,) and torch.allclose(got, torch.tensor(want), atol=1e-6)
    same = torch.ones(1, 3, 5)
    assert ev.mean_pairwise_cosine(same).item() == pytest.approx(1.0)
    opposite = torch.stack([torch.ones(5), -torch.ones(5)])[None]                       # [1, 2, 5]
    assert ev.mean_pairwise_cosine(opposite).item() == pytest.approx(-1.0)
    with pytest.raises(ValueError):
        ev.mean_pairwise_cosine(torch.ones(2, 1, 5))


def test_distinct_n_by_hand():
    texts = ["a b c a", "a b d"]
    # unigrams a b c a a b d: 4 distinct of 7; bigrams (a b) (b c) (c a) (a b) (b d): 4 distinct of 5
    assert ev.distinct_n(texts, 1) == pytest.approx(4 / 7)
    assert ev.distinct_n(texts, 2) == pytest.approx(4 / 5)
    assert ev.distinct_n(["a  b\nc"], 3) == 1.0                                         # any whitespace splits
    assert ev.distinct_n(["a  a\tb"], 1) == pytest.approx(2 / 3)                           # words, not " "-pieces
    assert ev.distinct_n(["a", ""], 2) == 0.0                                           # no bigram at all


def test_quality_diversity_is_one_over_similarity():
    assert ev.quality_diversity(0.5) == 2.0 and ev.quality_diversity(0.0) == math.inf
    assert ev.quality_diversity(-0.1) == math.inf


def test_copying_probe_tells_a_copier_from_a_model_that_cannot_copy():
    """A perfect copier (logits on the token `length` positions back) pays ~0 on the second pass and a uniform model
    log V on both: the probe reads the two passes where they are."""
    V, L = 40, 12
    pool = torch.arange(3, 30)

    def copier(x):                                   # [B, T] -> [B, T, V]: position t predicts x[t + 1] = x[t + 1 - L]
        logits = torch.zeros(*x.shape, V)
        back = torch.cat([torch.zeros_like(x[:, :L - 1]), x[:, :1 - L]], 1)
        logits.scatter_(-1, back[..., None], 50.0)
        logits[:, :L + 1] = 0.0                                           # the first pass: nothing to copy yet
        return logits
    uniform = ev.copying(lambda x: torch.zeros(*x.shape, V), pool, bos=1, n=4, length=L)
    assert uniform["first"] == pytest.approx(math.log(V)) and uniform["second"] == pytest.approx(math.log(V))
    c = ev.copying(copier, pool, bos=1, n=4, length=L)
    assert c["first"] == pytest.approx(math.log(V)) and c["second"] < 1e-6


def test_embed_mean_pools_each_sequence_alone():
    base = tiny_llama()
    seqs = [[5, 9, 11], [7], [3, 3, 3, 3, 3, 4], [100, 2]]
    got = ev.embed(base, seqs, bos=256, chunk=3)                                         # padded batches of 3 and 1
    with torch.no_grad():
        want = torch.stack([base.hidden(torch.tensor([[256] + s]))[0, 1:].mean(0) for s in seqs])
    assert got.shape == (4, 64)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Consistency with training's held-out evaluation


def test_controllability_adds_up_and_equals_train_cola_metrics():
    from data import Batch
    from eval import cola_metrics
    model = tiny_cola()
    g = torch.Generator().manual_seed(1)
    batches = [Batch(torch.randint(0, 256, (2, 17), generator=g), torch.ones(2, 17, dtype=torch.bool),
                     torch.arange(2)) for _ in range(2)]
    c = ev.controllability(model, batches, dtype="float32")
    shares = [p["share"] for p in c["per_action"]]
    assert sum(shares) == pytest.approx(1.0) and c["transitions"] == 2 * 2 * 16
    for key in ("lm", "wm_idm"):
        mixed = sum(p["share"] * p[key] for p in c["per_action"] if p["share"])
        assert mixed == pytest.approx(c[key], rel=1e-6)                                 # per action adds up
        with torch.no_grad():
            want = sum(cola_metrics(model, b)[key] for b in batches) / len(batches)
        assert c[key] == pytest.approx(want, rel=1e-5)                                  # = training's evaluation
    assert c["alive"] == sum(s > 0 for s in shares)


def test_continuations_shapes_and_ranges():
    model, tok = tiny_cola(), Tokenizer()
    prefixes = [[256, 65, 66], [256, 67, 68]]
    groups = ev.continuations(model, prefixes, m=3, n_new=5, n_ordinary=256, seed=0)
    assert list(groups) == list(ev.METHODS)
    for name, gs in groups.items():
        assert len(gs) == 2 and all(len(g) == 3 and all(len(s) == 5 for s in g) for g in gs), name
    assert all(0 <= t < 256 for g in groups["random tokens"] for s in g for t in s)
    assert groups == ev.continuations(model, prefixes, m=3, n_new=5, n_ordinary=256, seed=0)   # seeded
    rows = ev.side_by_side(model, prefixes[0], [1, 6], 4)
    assert rows["action 1"] == model.generate([prefixes[0]], 4, mode="fixed", action=1)["tokens"][0]
    assert len(rows) == 3 and all(len(v) == 4 for v in rows.values())
    assert ev.show(tok, tok.encode("a\nb\\", bos=False, eos=False)) == "a\\nb\\\\"


def test_sanity_set_ranks_random_tokens_lowest():
    """On held-out text, with any frozen Llama as the embedder (here an untrained one, seeded): random token strings
    are the least diverse by QD, while distinct-n ranks them the most diverse."""
    s = ev.diversity_sanity(tiny_llama(seed=3), Tokenizer(), n_groups=4, m=4, length=24)
    qd = {k: v["qd"] for k, v in s["methods"].items()}
    assert min(qd, key=qd.get) == "random tokens", qd
    d2 = {k: v["distinct_1"] for k, v in s["methods"].items()}
    assert max(d2, key=d2.get) == "random tokens", d2


# ----------------------------------------------------------------------------------------------------------------
# Every command on the tiny chain's checkpoints (the session fixture of conftest.py)


def test_commands_on_the_chain(chain, tmp_path, capsys):
    ckpt = str(chain / "pretrain/final")
    small = ["--device", "cpu", "--batches", "1", "--seq-len", "64"]
    c = ev.main(["controllability", "--ckpt", ckpt, *small, "--out", str(tmp_path / "c.json")])
    assert c["n_actions"] == 64 and 1 <= c["alive"] <= 64 and c["transitions"] == 8 * 64
    assert json.loads((tmp_path / "c.json").read_text())["lm"] == pytest.approx(c["lm"])
    a = ev.main(["actions", "--ckpt", ckpt, *small, "--actions", "0,5", "--max-new-tokens", "6",
                 "--out", str(tmp_path / "a.json")])
    assert set(a["side_by_side"]) == {"action 0", "action 5", "base LM, greedy"}
    assert "prefix: 'Return the '" in capsys.readouterr().out
    d = ev.main(["diversity", "--ckpt", ckpt, "--device", "cpu", "--prefixes", "2", "--m", "2",
                 "--max-new-tokens", "8", "--out", str(tmp_path / "d.json")])
    assert set(d["methods"]) == set(ev.METHODS)
    assert all(-1 <= r["similarity"] <= 1 for r in d["methods"].values())
    usage = ev.usage_of_runs(chain, torch.device("cpu"), n_batches=1)                   # direct and the VQ ablation
    assert set(usage) == {"direct", "vq"} and all(len(u["counts"]) == 64 for u in usage.values())
    assert (chain / "vq" / "eval" / "usage.json").exists()


# ----------------------------------------------------------------------------------------------------------------
# Plots (matplotlib is optional) and the pipeline's hook


def fake_runs(root: Path) -> Path:
    """A runs directory with two stages, an RL pair, Stage A usage and a diversity result, no model."""
    def rows(d, lines):
        d.mkdir(parents=True)
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    rows(root / "base", [{"step": s, "phase": "lm", "loss": 3.0 / s, "ce": 3.0 / s} for s in range(1, 6)]
         + [{"eval": {"after": {}}}])
    rows(root / "pretrain", [{"step": s, "phase": "stage-a", "loss": 2.0 / s, "ce": 2.1 / s, "reg": -0.1}
                             for s in range(1, 6)])
    (root / "pretrain" / "config.json").write_text(json.dumps({"stage": "pretrain", "quantizer": "direct"}))
    rows(root / "pretrain-vq", [{"step": s, "phase": "stage-a", "loss": 10.0 * s, "ce": 2.0, "vq": 10.0 * s - 2}
                                for s in range(1, 6)])
    (root / "pretrain-vq" / "config.json").write_text(json.dumps({"stage": "pretrain", "quantizer": "vq"}))
    (root / "pretrain" / "final").mkdir()                                              # the models, written before
    (root / "pretrain" / "final" / "config.json").write_text("{}")                      # their cached usage
    (root / "pretrain-vq" / "checkpoints" / "step-0000005").mkdir(parents=True)
    (root / "pretrain-vq" / "checkpoints" / "step-0000005" / "train.json").write_text("{}")
    for kind, counts in (("pretrain", [5] * 60 + [0] * 4), ("pretrain-vq", [50] * 10 + [0] * 54)):
        (root / kind / "eval").mkdir()
        (root / kind / "eval" / "usage.json").write_text(json.dumps({"run": kind, "counts": counts,
                                                                     "alive": sum(c > 0 for c in counts)}))
    for level in ("latent", "token"):
        d = root / f"rl-{level}-grpo"
        rows(d, [{"step": s, "reward": 0.01 * s, "loss": 0.1} for s in range(1, 4)]
             + [{"eval": {"step": s, "sampled_format": 0.1 * s}} for s in (0, 3)])
        (d / "config.json").write_text(json.dumps({"stage": f"rl-{level}-grpo", "level": level, "algo": "grpo"}))
    div = {"m": 8, "prefixes": 16, "methods": {n: {"qd": q + 0.5, "distinct_1": 0.8, "distinct_2": 0.9}
                                             for n, q in ev.PAPER_QD.items()}}
    (root / "pretrain" / "eval" / "diversity.json").write_text(json.dumps(div))
    return root


def test_plot_writes_every_png(tmp_path):
    pytest.importorskip("matplotlib")
    runs = fake_runs(tmp_path / "runs")
    written = ev.main(["plot", "--runs", str(runs), "--device", "cpu"])
    want = {runs / n for n in ("losses.png", "action_usage.png", "rl_reward.png", "diversity.png")}
    want |= {runs / d / "loss.png" for d in ("base", "pretrain", "pretrain-vq", "rl-latent-grpo", "rl-token-grpo")}
    assert set(written) == want
    for p in want:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", p


def test_usage_cache_is_recomputed_after_the_model_changes(tmp_path):
    runs = fake_runs(tmp_path / "runs")
    cache = runs / "pretrain" / "eval" / "usage.json"
    assert ev.usage_of_runs(runs, torch.device("cpu"))["direct"]["alive"] == 60         # cached, newer than the model
    os.utime(cache, (1, 1))                                                             # now older than final/
    with pytest.raises(SystemExit, match="config.json describes no model"):             # so it reloads: a fake model
        ev.usage_of_runs(runs, torch.device("cpu"))


def test_pipeline_hook_without_matplotlib_says_how_to_get_the_plots(tmp_path, monkeypatch, capsys):
    runs = fake_runs(tmp_path / "runs")
    shutil.rmtree(runs / "pretrain" / "final")                                          # no model to score here
    monkeypatch.setattr(ev, "pyplot", lambda: None)                                     # as if not installed
    ev.after_pipeline(runs, scale=0.001)
    text = capsys.readouterr().out
    assert "matplotlib is not installed" in text and f"python eval.py plot --runs {runs}" in text
    assert not list(runs.rglob("*.png"))
    with pytest.raises(SystemExit, match="needs matplotlib"):
        ev.main(["plot", "--runs", str(runs)])


# ----------------------------------------------------------------------------------------------------------------
# Bad input: one line naming the flag


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, msg
    return msg


def test_bad_input(tmp_path):
    llama = tmp_path / "llama"
    tiny_llama().save_pretrained(llama)
    cases = [(["controllability", "--ckpt", str(tmp_path / "nope")], "--ckpt"),
             (["actions", "--ckpt", str(llama)], "is a plain Llama"),
             (["plot", "--runs", str(tmp_path / "nope")], "--runs"),
             (["plot", "--runs", str(tmp_path)], "no run directory")]
    for argv, want in cases:
        with pytest.raises(SystemExit) as e:
            ev.main(argv)
        assert want in one_line(e), argv


def test_bad_numbers_on_a_cola_checkpoint(tmp_path):
    ckpt = tmp_path / "cola"
    tiny_cola().save_pretrained(ckpt)
    cases = [(["diversity", "--m", "1"], "--m 1"), (["controllability", "--batches", "0"], "--batches 0"),
             (["actions", "--actions", "3,x", "--batches", "1", "--seq-len", "16"], "--actions"),
             (["actions", "--actions", "9", "--batches", "1", "--seq-len", "16"], "outside [0, 8)"),
             (["diversity", "--max-new-tokens", "200"], "context")]
    for argv, want in cases:
        with pytest.raises(SystemExit) as e:
            ev.main([argv[0], "--ckpt", str(ckpt), "--device", "cpu", *argv[1:]])
        assert want in one_line(e), argv
