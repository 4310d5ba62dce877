"""eval.py: what the latent actions do, measured (PAPER.md §6), and the plots of every run.

    controllability  world-model loss given the IDM's actions against the base LM's loss on the same held-out text,
                     overall and per action (paper: 0.45 against 1.77 nats)
    actions          what the K actions mean: each one's usage share, the tokens of the transitions it labels, the
                     tokens the world model writes under it, and one prefix continued under several fixed actions
                     side by side
    diversity        semantic diversity as in the paper: M continuations per prefix, QD = 1 / mean pairwise cosine
                     similarity of their embeddings, for random latent actions, base token sampling and random tokens
                     (paper: 1.92 / 1.54 / 1.30); distinct-n beside it. --sanity: the measure on held-out text itself
    plot             PNG files: the loss curve of each stage (<run>/loss.png) and, in the runs directory, losses.png,
                     action_usage.png (Stage A: direct assignment against the VQ ablation), rl_reward.png (RL over
                     latent actions against tokens, from rl.py's run directories) and diversity.png

Run it (CPU, on the tiny pipeline's exports; each command prints its table and writes <run>/eval/<command>.json when
--ckpt is a run's final/):
    python eval.py controllability --ckpt runs/pretrain/final
    python eval.py actions --ckpt runs/pretrain/final --prompt "Return the "
    python eval.py diversity --ckpt runs/pretrain/final
    python eval.py diversity --ckpt runs/pretrain/final --sanity
    python eval.py plot --runs runs                 # needs matplotlib, an optional dependency: pip install matplotlib
    python -m pytest -q tests/test_eval.py

Deviations from the paper / official code:
  - **embeddings**: the paper embeds continuations with BGE-M3, which cannot be downloaded here. Our substitute is
    the frozen base LM itself: its final normed hidden states h of [BOS] + continuation, mean-pooled over the
    continuation, then standardised per dimension with the mean and std of the same embedding over held-out general
    text. Raw hidden states are anisotropic: on runs/pretrain/final, 8 unrelated held-out docstrings have a mean
    pairwise cosine of 0.965 raw, and 8 random token strings 0.927 (0.932 on the byte-level preset), so raw states
    would rank random tokens the more diverse. On standardised embeddings unrelated texts have cosine similarity near 0, so QD grows without bound as
    the similarity of a group approaches 0; BGE-M3's similarities have a positive floor. Compare rankings with the
    paper, not values;
  - distinct-n (distinct word n-grams / all word n-grams of a group) is reported beside QD as the lexical measure;
  - "base token sampling" samples the base at temperature 1 over the full vocabulary; "random tokens" draws uniformly
    from the tokenizer's ordinary (non-special) tokens; "random latent actions" draws a_t uniformly from the K actions
    and decodes the world model greedily (PAPER.md §2, "Generation"). Generation does not stop at eos, so every
    continuation has the same length;
  - held-out text: the embedded corpus's val split (what the training stages evaluate on) for controllability and
    actions; its stdlib docstrings alone (no task text) for prefixes and the embedding statistics.
"""
from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

import cola
from cola import COLA_PRESETS, CoLA, VQCoLA, nearest_code
import data
from data import Batch
from infra import parallel
from infra.files import atomic_write, check_out_file
from infra.plots import plot_diversity, plot_losses, plot_rl, plot_usage, pyplot, run_dirs
from infra.trainer import (SEED, autocast, check_value, dtype_line, interrupts_are_one_line, resolve_dtype,
                           set_trainable, writing)
from model import PRESETS, Transformer
from tokenizer import Tokenizer

# The paper's quality-diversity numbers (BGE-M3 embeddings; PAPER.md §6).
PAPER_QD = {"random latent actions": 1.92, "base token sampling": 1.54, "random tokens": 1.30}
METHODS = tuple(PAPER_QD)
PLOT_HINT = "pip install matplotlib, then: python eval.py plot --runs {runs}"

# ----------------------------------------------------------------------------------------------------------------
# The held-out metrics every training stage logs (lm_val, task_val, general_val) and RL's evaluation reads


def lm_metrics(model: Transformer, b: Batch) -> dict:
    """The plain Llama's held-out CE (the value of train.base_loss)."""
    x = b.tokens
    return {"lm": model.output.loss(model.hidden(x[:, :-1]), x[:, 1:], b.mask[:, 1:]).item()}


def cola_metrics(model: CoLA, b: Batch) -> dict:
    """The base LM's CE, the world model's CE under the IDM's argmax actions and under the greedy policy's, and the
    policy's accuracy against the IDM labels."""
    x, m = b.tokens, b.mask[:, 1:]
    h = model.hidden(x)                                                                      # [B, T+1, D]
    k = model.idm_labels(h)                                                                  # [B, T]
    a = model.policy_logits(h[:, :-1]).argmax(-1)                                            # [B, T]
    W = model.base.output
    return {"lm": W.loss(h[:, :-1], x[:, 1:], m).item(),
            "wm_idm": W.loss(model.world_state(h[:, :-1], k), x[:, 1:], m).item(),
            "wm_policy": W.loss(model.world_state(h[:, :-1], a), x[:, 1:], m).item(),
            "policy_acc": ((a == k).float() * m).sum().item() / max(m.sum().item(), 1)}


# ----------------------------------------------------------------------------------------------------------------
# Loading: checkpoints, the held-out text


def load_cola(ckpt: str, device, what: str = "--ckpt"):
    """A CoLA export past Stage A (cola.load checks it), frozen."""
    return cola.load(ckpt, "cola", what, device, hint="pass a CoLA checkpoint after Stage A (a plain Llama has no "
                     "IDM, codebook or merge module), e.g. runs/pretrain/final").eval().requires_grad_(False)


def load_llama(ckpt: str, device, what: str):
    """A plain Llama (cola.load checks it), frozen."""
    return cola.load(ckpt, "llama", what, device).eval().requires_grad_(False)


def held_out_batches(tok, n_batches: int, batch: int, seq_len: int, device) -> list:
    """The held-out windows the training stages evaluate on (data.VAL_SEED order, val split of the embedded corpus):
    n_batches Batch(tokens [batch, seq_len + 1], ...). With the pipeline's sizes (8 x 8 x 448) these are lm_val."""
    cfg = SimpleNamespace(data="", val_data="", seed=0, seq_len=seq_len)
    loader = data.TokenLoader(data.lm_shards(cfg, tok)[1], batch, seq_len, seed=data.VAL_SEED)
    return [loader.next_batch().to(device) for _ in range(n_batches)]


def general_text(tok) -> np.ndarray:
    """The held-out general-text stream (stdlib docstrings only, each [BOS] doc [EOS]) as one uint32 array."""
    cfg = SimpleNamespace(data="", val_data="", seed=0)
    return np.concatenate([np.fromfile(p, dtype=np.uint32) for p in data.general_text_shards(cfg, tok)])


def documents(stream: np.ndarray, bos: int) -> list[np.ndarray]:
    """Split a [BOS] doc [EOS] stream into its documents (each starting with its BOS)."""
    starts = np.flatnonzero(stream == bos)
    return [stream[a:b] for a, b in zip(starts, list(starts[1:]) + [len(stream)])]


def amp(dtype: str, device):
    """The training stages' autocast (trainer.autocast): bfloat16, or nothing for float32; auto picks bfloat16 where
    the device computes it natively."""
    return autocast(dtype, device)


@torch.no_grad()
def copying(logits_fn, pool: torch.Tensor, bos: int, n: int = 16, length: int = 32, seed: int = 0) -> dict:
    """Can the model copy from its context? n strings s of `length` tokens, each token drawn from a random position
    of `pool` (held-out text: every token familiar, their order random), each fed as [BOS] s s; the mean loss
    (nats/token) on the first pass and on the second (its first token left out: nothing announces it). A model that
    copies (an induction head, Olsson et al. 2022) predicts the second pass almost for free; one that does not pays
    about the same on both. A Countdown answer copies the prompt's numbers, so a base that cannot copy in general
    has to learn that one copy from the task texts alone. logits_fn: tokens [B, T] -> logits [B, T, V] (a
    Transformer). Uniform random ids would, at bytes, be mostly bytes the model never saw, and their loss would
    measure that instead."""
    g = torch.Generator().manual_seed(seed)
    s = pool[torch.randint(len(pool), (n, length), generator=g).to(pool.device)]           # [n, L]
    x = torch.cat([torch.full((n, 1), bos, device=pool.device), s, s], 1)                 # [n, 1 + 2L]
    logp = logits_fn(x[:, :-1]).float().log_softmax(-1).gather(-1, x[:, 1:, None])[..., 0].cpu()   # [n, 2L]
    return {"first": -logp[:, :length].mean().item(), "second": -logp[:, length + 1:].mean().item(),
            "strings": n, "length": length}


def copying_of(ckpt, device) -> dict:
    """`copying` of the plain Llama at ckpt, its strings drawn from the held-out general text (what the pipeline's
    table reports for its base)."""
    tok = Tokenizer.find(str(ckpt), None)
    stream = general_text(tok)
    pool = torch.from_numpy(stream[(stream != tok.bos_id) & (stream != tok.eos_id)].astype(np.int64))
    return copying(load_llama(str(ckpt), device, "--ckpt"), pool.to(device), tok.bos_id)


# ----------------------------------------------------------------------------------------------------------------
# Controllability and what each action means (PAPER.md §6: world model given IDM actions vs the base LM)


@torch.no_grad()
def transitions(model, x: torch.Tensor) -> dict:
    """Per transition x_{1:t} -> x_{t+1} of windows x [B, T+1]: the IDM's action k [B, T] (argmax, look-ahead), the
    target x_{t+1} [B, T], the base LM's CE [B, T] and the world model's CE given k [B, T]."""
    h = model.hidden(x)                                                                      # [B, T+1, D]
    k = model.idm_labels(h)                                                                  # [B, T]
    y = x[:, 1:]                                                                             # [B, T]
    lm = F.cross_entropy(model.base.output(h[:, :-1]).float().transpose(1, 2), y, reduction="none")      # [B, T]
    wm = F.cross_entropy(model.world_logits(h[:, :-1], k).float().transpose(1, 2), y, reduction="none")  # [B, T]
    return {"k": k, "y": y, "lm": lm, "wm": wm}


@torch.no_grad()
def controllability(model, batches, dtype: str = "auto") -> dict:
    """Mean CE (nats/token) of the base LM and of the world model given the IDM's actions, overall and per action:
    for each action k, the transitions the IDM labels k, their share, and both losses on them."""
    K = model.args.n_actions
    n, lm, wm = (torch.zeros(K, dtype=torch.float64) for _ in range(3))                     # [K]
    for b in batches:
        with amp(dtype, b.tokens.device):
            t = transitions(model, b.tokens)
        m = b.mask[:, 1:]                                                                    # [B, T]
        k = t["k"][m].cpu()
        n += torch.bincount(k, minlength=K).double()
        lm += torch.bincount(k, t["lm"][m].double().cpu(), minlength=K)
        wm += torch.bincount(k, t["wm"][m].double().cpu(), minlength=K)
    total = n.sum().item()
    per = [{"action": a, "share": n[a].item() / total, "lm": lm[a].item() / n[a].item() if n[a] else None,
            "wm_idm": wm[a].item() / n[a].item() if n[a] else None} for a in range(K)]
    return {"transitions": int(total), "lm": lm.sum().item() / total, "wm_idm": wm.sum().item() / total,
            "alive": int((n > 0).sum()), "n_actions": K, "per_action": per}


@torch.no_grad()
def action_tokens(model, batches, top: int = 5, positions: int = 2048, dtype: str = "auto") -> dict:
    """For each action k: the tokens x_{t+1} of the held-out transitions the IDM labels k ("labels"), and the tokens
    the world model writes greedily when a_t = k is imposed on the states of the first `positions` held-out
    transitions ("writes"). Each a list of (token id, share), most frequent first."""
    K, V = model.args.n_actions, model.base_args.vocab_size
    labelled = torch.zeros(K * V, dtype=torch.float64)                                      # [K*V]
    states = []
    for b in batches:
        with amp(dtype, b.tokens.device):
            h = model.hidden(b.tokens)                                                       # [B, T+1, D]
            k = model.idm_labels(h)                                                          # [B, T]
        m = b.mask[:, 1:]                                                                    # [B, T]
        labelled += torch.bincount((k * V + b.tokens[:, 1:])[m].cpu(), minlength=K * V).double()
        if sum(len(s) for s in states) < positions:
            states.append(h[:, :-1][m])                                                      # [n, D]
    s = torch.cat(states)[:positions][None]                                                  # [1, N, D]
    written = torch.zeros(K, V, dtype=torch.float64)                                        # [K, V]
    for a in range(K):
        with amp(dtype, s.device):
            out = model.world_logits(s, torch.full(s.shape[:2], a, dtype=torch.long, device=s.device)).argmax(-1)
        written[a] = torch.bincount(out.flatten().cpu(), minlength=V).double()              # out [1, N]

    def tops(counts):                                                                        # [V] -> [(id, share)]
        total = counts.sum().item()
        vals, ids = counts.topk(min(top, V))
        return [(int(i), v / total) for i, v in zip(ids.tolist(), vals.tolist()) if v > 0] if total else []
    labelled = labelled.view(K, V)
    return {"labels": [tops(labelled[a]) for a in range(K)], "writes": [tops(written[a]) for a in range(K)]}


@torch.no_grad()
def side_by_side(model, prompt: list[int], actions: list[int], n_new: int) -> dict:
    """One prefix continued under each fixed action a_t = a (CoLA.generate, mode "fixed"; tokens decoded greedily),
    and by the base LM alone (greedy), for comparison: {label: new token ids}."""
    rows = {f"action {a}": model.generate([prompt], n_new, mode="fixed", action=a)["tokens"][0] for a in actions}
    rows["base LM, greedy"] = model.base.generate([prompt], n_new, temperature=0.0)[0]
    return rows


def show(tok, ids) -> str:
    """Token ids as one printable line (newlines and tabs escaped)."""
    return tok.decode(list(ids)).replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")


# ----------------------------------------------------------------------------------------------------------------
# Semantic diversity (PAPER.md §6): QD = 1 / mean pairwise cosine similarity within each group of M continuations


@torch.no_grad()
def embed(base, seqs: list[list[int]], bos: int, chunk: int = 64) -> torch.Tensor:
    """Our substitute for BGE-M3: the frozen base's h of [BOS] + sequence, mean-pooled over the sequence's positions.
    seqs: N token lists (any lengths >= 1) -> [N, D] float32."""
    device = base.tok_embeddings.weight.device
    out = []
    for i in range(0, len(seqs), chunk):
        part = seqs[i:i + chunk]
        L = max(len(s) for s in part)
        x = torch.full((len(part), L + 1), bos, dtype=torch.long, device=device)            # [n, L+1]
        keep = torch.zeros(len(part), L + 1, dtype=torch.bool, device=device)               # [n, L+1]
        for j, s in enumerate(part):
            x[j, 1:1 + len(s)] = torch.tensor(s, dtype=torch.long)
            keep[j, 1:1 + len(s)] = True            # right padding: causal, so it never reaches a kept position
        h = base.hidden(x).float()                                                           # [n, L+1, D]
        w = keep.float()[..., None]                                                          # [n, L+1, 1]
        out.append((h * w).sum(1) / w.sum(1).clamp_min(1))                                   # [n, D]
    return torch.cat(out)                                                                    # [N, D]


def embedding_stats(base, stream: np.ndarray, length: int, bos: int, n: int = 512) -> tuple:
    """Per-dimension mean and std [D] of `embed` over up to n non-overlapping chunks of `length` tokens of held-out
    general text: what standardisation subtracts and divides by."""
    n = min(n, len(stream) // length)
    if n < 2:
        raise ValueError(f"eval: the held-out text has {len(stream)} tokens, fewer than two chunks of {length}")
    chunks = [stream[i * length:(i + 1) * length].tolist() for i in range(n)]
    e = embed(base, chunks, bos)                                                             # [n, D]
    return e.mean(0), e.std(0)


def standardise(e: torch.Tensor, stats: tuple) -> torch.Tensor:
    """(e - mean) / std per dimension: e [..., D]."""
    mean, std = stats
    return (e - mean) / (std + 1e-6)


def mean_pairwise_cosine(emb: torch.Tensor) -> torch.Tensor:
    """emb [P, M, D] (P groups of M embeddings, M >= 2) -> [P]: the mean cosine similarity over the M (M - 1) / 2
    pairs i < j of each group."""
    P, M, _ = emb.shape
    if M < 2:
        raise ValueError(f"mean_pairwise_cosine: groups need M >= 2 members, got M = {M}")
    u = F.normalize(emb.double(), dim=-1)                                                    # [P, M, D]
    sim = u @ u.transpose(1, 2)                                                              # [P, M, M]
    off = ~torch.eye(M, dtype=torch.bool, device=emb.device)                                 # [M, M]
    return (sim[:, off].sum(-1) / (M * (M - 1))).to(emb.dtype)                               # [P]


def quality_diversity(similarity: float) -> float:
    """Eq (PAPER.md §6): QD = 1 / mean similarity; inf when the mean similarity is <= 0 (groups no more alike than
    unrelated texts, which standardised embeddings allow)."""
    return 1.0 / similarity if similarity > 0 else math.inf


def distinct_n(texts: list[str], n: int) -> float:
    """Lexical diversity of a group: distinct word n-grams / all word n-grams over its texts (whitespace words);
    0.0 when the texts hold no n-gram."""
    grams = [tuple(ws[i:i + n]) for t in texts for ws in [t.split()] for i in range(len(ws) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def score_groups(groups: list[list[list[int]]], embedder, tok, stats) -> dict:
    """groups: P groups of M token lists -> mean similarity, QD, distinct-1 and distinct-2 (means over groups)."""
    P, M = len(groups), len(groups[0])
    e = standardise(embed(embedder, [s for g in groups for s in g], tok.bos_id), stats)     # [P*M, D]
    sim = mean_pairwise_cosine(e.view(P, M, -1)).mean().item()
    texts = [[tok.decode(s) for s in g] for g in groups]
    return {"similarity": sim, "qd": quality_diversity(sim),
            "distinct_1": sum(distinct_n(t, 1) for t in texts) / P,
            "distinct_2": sum(distinct_n(t, 2) for t in texts) / P}


@torch.no_grad()
def continuations(model, prefixes: list[list[int]], m: int, n_new: int, n_ordinary: int, seed: int) -> dict:
    """M continuations of n_new tokens per prefix for each method: {method: P groups of M token lists}."""
    device = model.base.tok_embeddings.weight.device
    rows = [p for p in prefixes for _ in range(m)]
    g = torch.Generator(device=device).manual_seed(seed)
    out = {"random latent actions": model.generate(rows, n_new, mode="random", generator=g)["tokens"],
           "base token sampling": model.base.generate(rows, n_new, temperature=1.0, top_p=1.0, generator=g),
           "random tokens": torch.randint(n_ordinary, (len(rows), n_new), generator=g, device=device).tolist()}
    return {k: [v[i * m:(i + 1) * m] for i in range(len(prefixes))] for k, v in out.items()}


def diversity_prefixes(tok, n: int, length: int, seed: int) -> list[list[int]]:
    """n prefixes of `length` tokens: the openings ([BOS] + first tokens) of held-out docstrings, chosen by seed."""
    docs = [d for d in documents(general_text(tok), tok.bos_id) if len(d) > length]
    if len(docs) < n:
        raise ValueError(f"eval: only {len(docs)} held-out documents are longer than {length} tokens; ask for fewer "
                         f"prefixes or shorter ones")
    pick = np.random.default_rng(seed).choice(len(docs), n, replace=False)
    return [docs[i][:length].tolist() for i in sorted(pick)]


@torch.no_grad()
def diversity(model, tok, embedder=None, n_prefixes: int = 16, m: int = 8, prefix_len: int = 32, n_new: int = 48,
              seed: int = 0, n_stats: int = 512) -> dict:
    """The paper's semantic-diversity comparison on held-out prefixes, with our embedding (module docstring)."""
    embedder = embedder or model.base
    prefixes = diversity_prefixes(tok, n_prefixes, prefix_len, seed)
    n_ordinary = min(tok.special_tokens.values())          # ordinary tokens are the ids below the first special one
    groups = continuations(model, prefixes, m, n_new, n_ordinary, seed)
    stats = embedding_stats(embedder, general_text(tok), n_new, tok.bos_id, n_stats)
    out = {"prefixes": n_prefixes, "m": m, "prefix_len": prefix_len, "n_new": n_new, "seed": seed,
           "embedding": "frozen base LM hidden states, mean-pooled, standardised per dimension (substitute for "
                        "BGE-M3)", "methods": {}}
    for name, gs in groups.items():
        out["methods"][name] = {**score_groups(gs, embedder, tok, stats), "paper_qd": PAPER_QD[name],
                                "example": show(tok, gs[0][0])}
    out["example_prefix"] = show(tok, prefixes[0][1:])
    return out


@torch.no_grad()
def diversity_sanity(embedder, tok, n_groups: int = 16, m: int = 8, length: int = 48, seed: int = 0) -> dict:
    """The measure on texts whose diversity is known, no generation involved. Groups of M chunks of `length` tokens:
    "one document" (M chunks of the same held-out docstring: one topic), "different documents" (M docstrings) and
    "random tokens". A semantic measure should rank random tokens lowest; distinct-n ranks them highest."""
    rng = np.random.default_rng(seed)
    stream = general_text(tok)
    docs = [d[1:] for d in documents(stream, tok.bos_id)]
    long = [d for d in docs if len(d) >= m * length]
    if len(long) < n_groups or len(docs) < m:
        raise ValueError(f"eval: {len(long)} held-out documents hold {m} chunks of {length} tokens; ask for fewer "
                         f"groups or shorter chunks")
    n_ordinary = min(tok.special_tokens.values())

    def chunk(d):                                                                           # a random chunk of d
        i = int(rng.integers(0, len(d) - length + 1))
        return d[i:i + length].tolist()
    one = [[long[i][j * length:(j + 1) * length].tolist() for j in range(m)]
           for i in rng.choice(len(long), n_groups, replace=False)]
    different = [[chunk(docs[i]) for i in rng.choice(len(docs), m, replace=False)] for _ in range(n_groups)]
    rand = [[rng.integers(0, n_ordinary, length).tolist() for _ in range(m)] for _ in range(n_groups)]
    stats = embedding_stats(embedder, stream, length, tok.bos_id)
    return {"groups": n_groups, "m": m, "length": length, "seed": seed, "methods": {
        name: score_groups(g, embedder, tok, stats) for name, g in
        (("one document", one), ("different documents", different), ("random tokens", rand))}}


# ----------------------------------------------------------------------------------------------------------------
# Action usage after Stage A: direct assignment (a CoLA export) and the VQ ablation (its last checkpoint)


@torch.no_grad()
def usage_counts(model, batches, assign, dtype: str = "auto") -> list[int]:
    """How often each of the K actions is chosen on held-out windows; assign(model, tokens) -> [B, T] actions."""
    K = model.args.n_actions
    n = torch.zeros(K, dtype=torch.long)
    for b in batches:
        with amp(dtype, b.tokens.device):
            n += torch.bincount(assign(model, b.tokens)[b.mask[:, 1:]].cpu(), minlength=K)
    return n.tolist()


def direct_assign(model, x):
    return model.idm_labels(model.hidden(x))                                                  # [B, T]


def vq_assign(model, x):
    return nearest_code(model.idm_logits(model.hidden(x))[:, 1:].float(), model.codebook.weight.float())


def load_vq(run_dir: Path, device):
    """The VQ ablation exports nothing (its IDM head is d -> d): rebuild cola.VQCoLA from the run's --init (the
    frozen base it started from) and load its newest checkpoint, which holds what Stage A trains (IDM, codebook,
    merge module; parallel.state_options). A checkpoint written whole (before checkpoints left frozen modules out)
    loads without the --init."""
    cfg = json.loads((run_dir / "config.json").read_text())
    ckpt = parallel.latest_checkpoint(run_dir)
    if ckpt is None:                           # the VQ run is still at its first step
        raise SystemExit(f"{run_dir}: no complete checkpoint of the VQ ablation to read")
    init = Path(cfg.get("init") or "")
    whole = not (cfg.get("init") and (init / "config.json").exists())
    if not whole:
        model = VQCoLA.from_pretrained(init)
        set_trainable(model, {"idm", "codebook", "merge"})     # Stage A's; the rest came from --init, not the checkpoint
    else:
        model = VQCoLA(PRESETS[cfg["preset"]], COLA_PRESETS[cfg["preset"]])
    try:
        parallel.load_checkpoint(ckpt, parallel.Root(model), frozen=whole)
    except SystemExit:
        if whole:                              # the base was expected in the checkpoint
            raise SystemExit(f"{run_dir}: its checkpoint holds the trained modules only; the frozen base comes from "
                             f"its --init {cfg.get('init')!r}, which is not there") from None
        raise
    return model.to(device).eval().requires_grad_(False)


def stage_a_runs(runs: Path) -> dict:
    """{"direct": run dir, "vq": run dir} of the Stage A runs under `runs` (names pretrain / pretrain-vq preferred)."""
    found = {}
    for d in sorted(p.parent for p in runs.glob("*/config.json")):
        try:
            cfg = json.loads((d / "config.json").read_text())
        except ValueError:
            continue
        if cfg.get("stage") != "pretrain":
            continue
        kind = "vq" if cfg.get("quantizer") == "vq" else "direct"
        if kind not in found or d.name in ("pretrain", "pretrain-vq"):
            found[kind] = d
    return found


def usage_of_runs(runs: Path, device, n_batches: int = 8, dtype: str = "auto") -> dict:
    """Action usage of Stage A's direct and VQ runs under `runs`, cached in <run>/eval/usage.json."""
    out = {}
    for kind, d in stage_a_runs(runs).items():
        cache = d / "eval" / "usage.json"
        ckpt = parallel.latest_checkpoint(d) if kind == "vq" else d / "final"
        if ckpt is None or not (ckpt / ("train.json" if kind == "vq" else "config.json")).exists():
            continue                           # nothing trained there (yet)
        made = (ckpt / ("train.json" if kind == "vq" else "config.json")).stat().st_mtime
        if cache.exists() and cache.stat().st_mtime >= made:                 # computed after the model was written
            out[kind] = json.loads(cache.read_text())
            continue
        model = load_cola(str(d / "final"), device) if kind == "direct" else load_vq(d, device)
        cfg = json.loads((d / "config.json").read_text())
        batches = held_out_batches(Tokenizer(), n_batches, cfg["micro_batch"], cfg["seq_len"], device)
        counts = usage_counts(model, batches, direct_assign if kind == "direct" else vq_assign, dtype)
        out[kind] = {"run": d.name, "counts": counts, "alive": sum(c > 0 for c in counts)}
        write_json(cache, out[kind])
    return out


# ----------------------------------------------------------------------------------------------------------------
# Plots (infra/plots.py draws them; matplotlib is optional)


def plot_all(runs: Path, device, n_batches: int = 8) -> list[Path] | None:
    """Every plot this module draws, from what `runs` holds; None when matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return None
    usage = usage_of_runs(runs, device, n_batches)
    written = plot_losses(plt, runs)
    written += [p for p in (plot_usage(plt, runs, usage), plot_rl(plt, runs), plot_diversity(plt, runs, PAPER_QD)) if p]
    return written


def after_pipeline(root: Path, scale: float = 1.0, dtype: str = "auto"):
    """What the pipeline calls last: action usage (direct vs VQ) and the diversity comparison on its Stage A export,
    saved as JSON in the run directories, then the plots. Without matplotlib the numbers are still written and the
    way to get the plots is printed. Sizes shrink with --scale like the pipeline's evaluations."""
    device = parallel.device_of("")
    root = Path(root)
    small = min(1.0, scale * 10)
    usage_of_runs(root, device, n_batches=max(1, round(8 * small)), dtype=dtype)
    pre = root / "pretrain"
    if (pre / "final").is_dir():
        model = load_cola(str(pre / "final"), device)
        div = diversity(model, Tokenizer(), n_prefixes=max(2, round(16 * small)), m=max(2, round(8 * small)),
                        n_new=max(8, round(48 * small)), n_stats=max(32, round(512 * small)))
        write_json(pre / "eval" / "diversity.json", div)
        print(diversity_table(div))
    written = plot_all(root, device)
    if written is None:
        print("plots skipped: matplotlib is not installed (optional). To draw them: " + PLOT_HINT.format(runs=root))
    else:
        print("plots: " + ", ".join(str(p) for p in written))


# ----------------------------------------------------------------------------------------------------------------
# Tables


def controllability_table(c: dict, top: int) -> str:
    lines = [f"held-out transitions: {c['transitions']}; actions used by the IDM: {c['alive']} / {c['n_actions']}",
             f"base LM loss {c['lm']:.3f} nats/token; world model given the IDM's actions {c['wm_idm']:.3f} "
             f"({c['wm_idm'] / c['lm']:.2f}x the base's; paper: 0.45 vs 1.77)", "",
             "| action | share | base LM loss | world model loss | gain |", "|---|---|---|---|---|"]
    per = sorted((p for p in c["per_action"] if p["share"] > 0), key=lambda p: -p["share"])
    for p in per[:top]:
        lines.append(f"| {p['action']} | {p['share']:.3f} | {p['lm']:.3f} | {p['wm_idm']:.3f} | "
                     f"{p['lm'] - p['wm_idm']:+.3f} |")
    if len(per) > top:
        lines.append(f"({len(per) - top} more used actions: --top {len(per)} lists them)")
    return "\n".join(lines)


def actions_table(tok, c: dict, toks: dict, rows: dict, prompt: list[int], top: int) -> str:
    def fmt(pairs):
        return ", ".join(f"{show(tok, [i])!r} {s:.2f}" for i, s in pairs[:3])
    per = sorted((p for p in c["per_action"] if p["share"] > 0), key=lambda p: -p["share"])
    lines = ["| action | share | tokens of the transitions it labels | tokens the world model writes under it |",
             "|---|---|---|---|"]
    for p in per[:top]:
        a = p["action"]
        lines.append(f"| {a} | {p['share']:.3f} | {fmt(toks['labels'][a])} | {fmt(toks['writes'][a])} |")
    lines += ["", f"prefix: {show(tok, [t for t in prompt if t != tok.bos_id])!r}"]
    w = max(len(k) for k in rows)
    lines += [f"  {k:<{w}}  {show(tok, v)!r}" for k, v in rows.items()]
    return "\n".join(lines)


def diversity_table(div: dict) -> str:
    lines = [f"{div['m']} continuations of {div['n_new']} tokens for each of {div['prefixes']} held-out prefixes; "
             f"embeddings: {div['embedding']}", "",
             "| method | mean pairwise cosine | QD (ours) | QD (paper, BGE-M3) | distinct-1 | distinct-2 |",
             "|---|---|---|---|---|---|"]
    for name, r in div["methods"].items():
        lines.append(f"| {name} | {r['similarity']:.3f} | {r['qd']:.2f} | {r['paper_qd']:.2f} | "
                     f"{r['distinct_1']:.3f} | {r['distinct_2']:.3f} |")
    return "\n".join(lines)


def sanity_table(s: dict) -> str:
    lines = [f"sanity set: {s['groups']} groups of {s['m']} held-out chunks of {s['length']} tokens (no generation)",
             "", "| group | mean pairwise cosine | QD | distinct-1 | distinct-2 |", "|---|---|---|---|---|"]
    for name, r in s["methods"].items():
        lines.append(f"| {name} | {r['similarity']:.3f} | {r['qd']:.2f} | {r['distinct_1']:.3f} | "
                     f"{r['distinct_2']:.3f} |")
    return "\n".join(lines)


def write_json(path: Path, obj):
    """Atomically: a full disk leaves the previous file as it was, and stops in one line, not a traceback."""
    with writing(f"{path}: could not write it"):
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda t: t.write_text(json.dumps(obj, indent=1) + "\n"))


# ----------------------------------------------------------------------------------------------------------------
# Command line


def out_path(a, name: str) -> Path | None:
    """--out, else <run>/eval/<name>.json when --ckpt is a run's final/ export, else nothing is written."""
    if a.out:
        return Path(a.out)
    ckpt = Path(a.ckpt)
    return ckpt.parent / "eval" / f"{name}.json" if ckpt.name == "final" else None


def positive(flag: str, value: int, least: int = 1):
    if value < least:
        raise SystemExit(f"{flag} {value}: expected an integer >= {least}")


def check_flags(a):
    """Numbers that need no model, each mistake one line naming its flag."""
    if a.cmd in ("controllability", "actions"):
        positive("--batches", a.batches)
        positive("--top", a.top)
        positive("--seq-len", a.seq_len)
        if a.cmd == "actions":
            positive("--max-new-tokens", a.max_new_tokens)
            if a.actions and not re.fullmatch(r"\d+(,\d+)*", a.actions):
                raise SystemExit(f"--actions {a.actions!r}: expected comma-separated action indices, e.g. 0,5,9")
    else:
        positive("--prefixes", a.prefixes)
        positive("--m", a.m, 2)
        positive("--max-new-tokens", a.max_new_tokens)
        positive("--prefix-len", a.prefix_len, 2)
        check_value("seed", a.seed, SEED)


def main(argv=None):
    with interrupts_are_one_line():            # Ctrl-C: one line, not a traceback
        return run_command(argv)


def run_command(argv):
    ap = argparse.ArgumentParser(description="Evaluate CoLA's latent actions (PAPER.md §6) and plot the runs.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    def common(p):
        p.add_argument("--ckpt", required=True, help="CoLA checkpoint past Stage A (e.g. runs/pretrain/final)")
        p.add_argument("--device", default="", help="cpu or cuda (default: cuda if available)")
        p.add_argument("--out", default="", help="JSON file for the numbers (default: <run>/eval/<command>.json "
                                                 "when --ckpt is a run's final/)")
        return p

    for name in ("controllability", "actions"):
        p = common(sub.add_parser(name, help=f"{name} (see the module docstring)"))
        p.add_argument("--batches", type=int, default=8, help="held-out batches of 8 windows (the pipeline's: 8)")
        p.add_argument("--seq-len", type=int, default=448, help="window length (the pipeline's: 448)")
        p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                       help="autocast as in training's evaluations: auto (bfloat16 where the device computes it "
                            "natively, else float32), bfloat16, or none (float32)")
        p.add_argument("--top", type=int, default=16 if name == "controllability" else 12,
                       help="actions listed, most used first")
        if name == "actions":
            p.add_argument("--prompt", default="Return the ", help="the prefix continued under fixed actions")
            p.add_argument("--actions", default="", help="comma-separated actions to show (default: the 8 most used)")
            p.add_argument("--max-new-tokens", type=int, default=48)
    p = common(sub.add_parser("diversity", help="semantic diversity, QD (see the module docstring)"))
    p.add_argument("--embedder", default="", help="plain Llama whose hidden states embed the texts (default: the "
                                                  "checkpoint's own frozen base, e.g. runs/base/final's weights)")
    p.add_argument("--prefixes", type=int, default=16, help="held-out prefixes (sanity: groups)")
    p.add_argument("--m", type=int, default=8, help="M, continuations per prefix (sanity: chunks per group)")
    p.add_argument("--prefix-len", type=int, default=32, help="tokens per prefix, [BOS] included")
    p.add_argument("--max-new-tokens", type=int, default=48, help="tokens per continuation (sanity: per chunk)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sanity", action="store_true", help="score held-out text itself: one document, different "
                                                         "documents, random tokens (no generation)")
    p = sub.add_parser("plot", help="PNG files of every run under --runs (needs matplotlib)")
    p.add_argument("--runs", default="runs", help="the pipeline's --out-dir (run directories inside)")
    p.add_argument("--device", default="", help="cpu or cuda (default: cuda if available)")
    a = ap.parse_args(argv)

    if a.cmd == "plot":
        runs = Path(a.runs)
        if not runs.is_dir():
            raise SystemExit(f"--runs {a.runs}: directory not found (run `python pipeline.py` first)")
        if not run_dirs(runs):
            raise SystemExit(f"--runs {a.runs}: no run directory (metrics.jsonl) inside")
        written = plot_all(runs, parallel.device_of(a.device))
        if written is None:
            raise SystemExit("eval.py plot needs matplotlib, an optional dependency: " + PLOT_HINT.format(runs=a.runs))
        print("\n".join(f"wrote {p}" for p in written))
        return written
    check_flags(a)
    out = out_path(a, "diversity-sanity" if getattr(a, "sanity", False) else a.cmd)
    if out is not None:                        # before the work, not after it
        check_out_file(out, "--out")
    device = parallel.device_of(a.device)
    if a.cmd in ("controllability", "actions"):
        a.dtype = resolve_dtype(a.dtype, device.type)
        print(dtype_line(a))
    model = load_cola(a.ckpt, device)
    tok = Tokenizer.find(a.ckpt, None)
    ctx, K = model.base_args.max_seq_len, model.args.n_actions
    if a.cmd in ("controllability", "actions"):
        if a.seq_len >= ctx:
            raise SystemExit(f"--seq-len {a.seq_len}: windows of {a.seq_len + 1} tokens exceed the model's context "
                             f"of {ctx}")
        acts = [int(s) for s in a.actions.split(",")] if getattr(a, "actions", "") else []
        if any(not 0 <= x < K for x in acts):
            raise SystemExit(f"--actions: {next(x for x in acts if not 0 <= x < K)} is outside [0, {K}) (K = the "
                             f"checkpoint's number of actions)")
        prompt = tok.encode(a.prompt, bos=True, eos=False) if a.cmd == "actions" else []
        if a.cmd == "actions" and len(prompt) + a.max_new_tokens > ctx:
            raise SystemExit(f"--prompt and --max-new-tokens: {len(prompt)} + {a.max_new_tokens} tokens exceed the "
                             f"model's context of {ctx}")
        batches = held_out_batches(tok, a.batches, 8, a.seq_len, device)
        c = controllability(model, batches, a.dtype)
        result = c
        if a.cmd == "controllability":
            print(controllability_table(c, a.top))
        else:
            acts = acts or [p["action"] for p in sorted(c["per_action"], key=lambda p: -p["share"])[:8]]
            toks = action_tokens(model, batches, dtype=a.dtype)
            rows = side_by_side(model, prompt, acts, a.max_new_tokens)
            print(actions_table(tok, c, toks, rows, prompt, a.top))
            result = {"controllability": c, "tokens": toks, "prompt": a.prompt,
                      "side_by_side": {k: tok.decode(v) for k, v in rows.items()}}
    else:
        if a.prefix_len + a.max_new_tokens > ctx:
            raise SystemExit(f"--prefix-len {a.prefix_len} + --max-new-tokens {a.max_new_tokens} exceed the model's "
                             f"context of {ctx}")
        embedder = load_llama(a.embedder, device, "--embedder") if a.embedder else None
        try:
            if a.sanity:
                result = diversity_sanity(embedder or model.base, tok, a.prefixes, a.m, a.max_new_tokens, a.seed)
                print(sanity_table(result))
            else:
                result = diversity(model, tok, embedder, a.prefixes, a.m, a.prefix_len, a.max_new_tokens, a.seed)
                print(diversity_table(result))
        except ValueError as e:
            raise SystemExit(str(e).removeprefix("eval: ")) from None
    if out is not None:
        write_json(out, result)
        print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
