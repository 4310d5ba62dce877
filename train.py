"""train.py: every training stage of CoLA (cola-spec section 3, Algorithms 1 and 2) in one script.

Stages (each starts from the previous stage's export with --init, writes config.json, metrics.jsonl, a resumable
ckpt.pt and an export final/ into its run directory):
    base      train the tiny base Llama from scratch on the embedded corpus (at 8B you load Meta's weights instead)
    pretrain  Stage A (Algorithm 1): base frozen; IDM + codebook + merge with world-model CE + beta * sum y log y
              (--quantizer vq: the nearest-neighbour VQ ablation that the paper reports collapsing)
    bc        Stage B: only the policy trains, CE to the frozen IDM's argmax labels
    fta-i     FTA-I: (1) base fine-tuned under the frozen IDM's actions, (2) policy BC on the same data
    fta-p     FTA-P: base fine-tuned under the frozen greedy policy's actions
    sft       token-level SFT of the plain base (the paper's "Llama SFT" baseline)
    pipeline  all of the above at the tiny preset, then a table of the paper's effects in miniature

Run it (CPU, embedded data, no download):
    python train.py --stage pipeline                       # everything, ~10 min on 2 cores, prints a table
    python train.py --stage base
    python train.py --stage pretrain --init runs/base/final
    python train.py --stage bc --init runs/pretrain/final
    python train.py --stage fta-i --init runs/bc/final
    python train.py --stage pretrain --preset llama-3.1-8b --init /path/Llama-3.1-8B --data data/shards
    python train.py --stage pretrain --help                # every flag of a stage, with its paper symbol

Killed runs resume: rerunning the same command with the same --out-dir picks up ckpt.pt (model, optimizer, step,
data position, RNG states) and continues the identical loss curve.

Deviations from the paper / official code:
  - data: stdlib docstrings + synthetic Countdown / arithmetic tasks (data.py) instead of SlimPajama etc.;
  - tiny preset hyperparameters (lr, batch, steps, one 448-token window for every stage) are ours, chosen to fit
    minutes on a laptop CPU; the llama-3.1-8b preset carries the paper's. Two differ in kind (measurements in
    TINY): beta 0.03 instead of 0.001 (byte tokens make K = 64 oversized; at 0.001 only 40 actions stay alive), and
    fine-tuning lr 1e-3 (at 3e-4 the under-trained base improves on general text under any fine-tuning);
  - retention after fine-tuning is measured on held-out stdlib docstrings only (general text), because the
    embedded pre-training corpus also holds the task text that fine-tuning improves;
  - FTA-P uses the greedy policy's hard actions without gradient through the policy (the paper does not say);
  - the VQ ablation replaces the IDM head with a d-dimensional encoder output and looks it up in the same
    codebook C (VQ-VAE losses, commitment 0.25); the paper only reports that such a codebook collapsed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from cola import COLA_PRESETS, CoLA, CoLAArgs
from idm import codebook_usage, entropy_regulariser, gumbel_softmax_st
from model import PRESETS, Transformer, atomic_write
from tokenizer import Tokenizer
import data

STAGES = ["base", "pretrain", "bc", "fta-i", "fta-p", "sft"]

# ----------------------------------------------------------------------------------------------------------------
# Configuration: one dataclass per stage. Defaults are the paper's 8B hyperparameters (spec section 3); the tiny
# preset (the CPU default) overrides a few of them in TINY below. Every field becomes a --flag.


def arg(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Common:
    preset: str = arg("tiny", "model size: tiny (CPU default) or llama-3.1-8b (the paper)")
    init: str = arg("", "checkpoint directory this stage starts from (the previous stage's final/)")
    out_dir: str = arg("", "run directory (default runs/<stage>)")
    data: str = arg("", "directory of token shards from `python data.py prepare` (default: embedded corpus)")
    val_data: str = arg("", "held-out token shards (default: the embedded corpus' val split)")
    tokenizer: str = arg("", "tokenizer.model / tokenizer.json (default: found in --init, else embedded)")
    steps: int = arg(190_735, "optimizer steps (8B: 200B tokens / (512 x 2048))")
    global_batch: int = arg(512, "sequences per optimizer step (paper: 512)")
    micro_batch: int = arg(4, "sequences per forward/backward (paper: 4); accumulation = global / micro")
    seq_len: int = arg(2048, "T, tokens per sequence (paper: 2048)")
    lr: float = arg(1e-4, "peak AdamW learning rate (paper: 1e-4)")
    min_lr: float = arg(4e-5, "cosine decay floor (official release: 4e-5)")
    warmup_steps: int = arg(100, "linear warmup steps (paper: 100)")
    weight_decay: float = arg(0.01, "AdamW weight decay (0 on the codebook C)")
    beta1: float = arg(0.9, "Adam beta1")
    beta2: float = arg(0.95, "Adam beta2")
    grad_clip: float = arg(1.0, "max gradient norm (paper: 1.0)")
    dtype: str = arg("bfloat16", "autocast dtype: bfloat16 or float32 (no autocast)")
    activation_checkpointing: bool = arg(False, "recompute each block in backward to save memory")
    device: str = arg("", "cpu or cuda (default: cuda if available)")
    seed: int = arg(0, "seed for init, data order and Gumbel noise")
    ckpt_every: int = arg(1000, "steps between resumable checkpoints (ckpt.pt)")
    log_every: int = arg(10, "steps between metrics.jsonl lines")
    eval_batches: int = arg(20, "held-out micro batches for the final evaluation")
    resume: bool = arg(True, "continue from <out_dir>/ckpt.pt if it exists")


@dataclass
class BaseArgs(Common):
    """Stage `base`: next-token CE of the plain Llama, from scratch (tiny preset only)."""


@dataclass
class PretrainArgs(Common):
    """Stage A (Algorithm 1): L = mean_t CE(p_WM(x_{t+1} | h_t, a~_t)) + beta * mean_t sum_k y log y."""
    gumbel_tau: float = arg(2.0, "tau, Gumbel-softmax temperature (paper: 2.0)")
    beta: float = arg(0.001, "beta, weight of sum y log y (negative entropy of the relaxed sample)")
    quantizer: str = arg("direct", "direct (CoLA's direct action assignment) or vq (the collapsing ablation)")
    vq_commitment: float = arg(0.25, "VQ ablation only: commitment weight on ||z_e - sg(e)||^2")


@dataclass
class BCArgs(Common):
    """Stage B: L = mean_t CE(pi(. | x_{1:t}), k*_t), k*_t = argmax softmax(z_t) of the frozen IDM."""
    steps: int = arg(95_367, "optimizer steps (8B: 100B tokens for the policy / (512 x 2048))")


@dataclass
class FinetuneArgs(Common):
    """FTA-I / FTA-P / token SFT on task data (spec section 3, FTA): loss on response tokens only."""
    sft_data: str = arg("", "jsonl with prompt/response records (default: embedded Countdown + arithmetic)")
    sft_val: str = arg("", "held-out jsonl (default: embedded held-out problems)")
    chat: bool = arg(False, "encode records with the Llama-3.1-Instruct chat format")
    epochs: float = arg(1.0, "passes over the task data (paper: 1); sets steps when steps is 0")
    steps: int = arg(0, "optimizer steps (0: derived from epochs)")
    global_batch: int = arg(256, "sequences per optimizer step (paper: 256)")
    lr: float = arg(5e-6, "peak learning rate (paper: 5e-6)")
    min_lr: float = arg(5e-7, "cosine floor (paper: 0.1 x lr)")
    warmup_steps: int = arg(-1, "warmup steps (-1: 3% of steps, the paper's)")
    n_records: int = arg(4000, "embedded task records when --sft-data is not given")


STAGE_ARGS = {"base": BaseArgs, "pretrain": PretrainArgs, "bc": BCArgs, "fta-i": FinetuneArgs,
              "fta-p": FinetuneArgs, "sft": FinetuneArgs}

# The tiny preset: minutes on a 2-core laptop CPU. Learning rates are higher than the paper's because the model is
# ~1000x smaller and trains for ~1000x fewer tokens.
TINY = {
    # One window length (448 + 1 tokens) for every stage: the task records are ~350 byte tokens, and a base that
    # never saw positions past its pre-training window would confound what fine-tuning changes.
    "base": dict(steps=400, global_batch=8, micro_batch=8, seq_len=448, lr=3e-3, min_lr=3e-4, warmup_steps=30),
    # beta 0.03 instead of the paper's 0.001: with bytes as tokens a transition carries ~1.3 nats, far below
    # log K = 4.2, so the codebook is oversized and a stronger entropy bonus keeps every action in play
    # (measured, held-out argmax: beta 0.001 -> 40/64 alive at 300 steps; 0.01 -> 57/64 and 0.03 -> 64/64 at
    # 200 steps, world-model loss 0.47 / 0.48 / 0.45 nats against the base's 1.26).
    "pretrain": dict(steps=200, global_batch=8, micro_batch=8, seq_len=448, lr=3e-3, min_lr=3e-4,
                     warmup_steps=20, beta=0.03),
    "bc": dict(steps=200, global_batch=8, micro_batch=8, seq_len=448, lr=3e-3, min_lr=3e-4, warmup_steps=20),
    # Fine-tuning lr 1e-3: at 3e-4 the under-trained tiny base still improves on general text under any fine-tuning
    # (token SFT: -0.12 nats), so nothing can be retained or forgotten; at 1e-3 token SFT forgets (+0.37) and the
    # comparison with FTA-I means something. Task losses are as good as at 3e-4 (measured).
    "fta-i": dict(global_batch=16, micro_batch=16, seq_len=448, lr=1e-3, min_lr=1e-4, n_records=800),
    "fta-p": dict(global_batch=16, micro_batch=16, seq_len=448, lr=1e-3, min_lr=1e-4, n_records=800),
    "sft": dict(global_batch=16, micro_batch=16, seq_len=448, lr=1e-3, min_lr=1e-4, n_records=800),
}
COMMON_TINY = dict(ckpt_every=100, log_every=10, eval_batches=8)


def parse_args(argv=None):
    """--stage picks the dataclass; its fields become flags; the preset fills defaults the user did not set."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--stage", choices=STAGES + ["pipeline"], required=False)
    pre.add_argument("--preset", default="tiny")
    known, _ = pre.parse_known_args(argv)
    if known.stage is None:
        argparse.ArgumentParser(prog="train.py").error(
            f"--stage is required: one of {', '.join(STAGES + ['pipeline'])}")
    if known.stage == "pipeline":
        p = argparse.ArgumentParser(prog="train.py --stage pipeline",
                                    description="Run every stage at the tiny preset and print the results table.")
        p.add_argument("--stage")
        p.add_argument("--out-dir", default="runs", help="parent of one run directory per stage")
        p.add_argument("--scale", type=float, default=1.0, help="multiply every stage's steps (0.1 = smoke run)")
        p.add_argument("--seed", type=int, default=0)
        return "pipeline", p.parse_args(argv)
    cls = STAGE_ARGS[known.stage]
    if known.preset not in PRESETS:
        pre.error(f"--preset {known.preset!r}: expected one of {', '.join(PRESETS)}")
    defaults = {**COMMON_TINY, **TINY[known.stage]} if known.preset == "tiny" else {}
    p = argparse.ArgumentParser(prog=f"train.py --stage {known.stage}", description=cls.__doc__)
    p.add_argument("--stage", choices=STAGES)
    for f in fields(cls):
        default = defaults.get(f.name, f.default)
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=f.metadata["help"])
        else:
            typ = {"int": int, "float": float, "str": str}[f.type]
            p.add_argument(flag, type=typ, default=default, help=f"{f.metadata['help']} (default {default})")
    ns = p.parse_args(argv)
    cfg = cls(**{f.name: getattr(ns, f.name) for f in fields(cls)})
    cfg.out_dir = cfg.out_dir or f"runs/{known.stage}"
    return known.stage, cfg


# ----------------------------------------------------------------------------------------------------------------
# Small utilities


def lr_at(step: int, cfg) -> float:
    """Linear warmup to lr, then cosine decay towards min_lr (reached one step after the last)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def masked_ce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean CE over positions where mask is True: logits [B, T, N], targets [B, T], mask [B, T]."""
    ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")   # [B*T]
    if mask is None:
        return ce.mean()
    m = mask.flatten().float()                                                               # [B*T]
    return (ce * m).sum() / m.sum().clamp(min=1)


def autocast(cfg, device):
    if cfg.dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def enable_activation_checkpointing(blocks):
    """Recompute each block in backward; parameter names (and so checkpoints) are unchanged."""
    from torch.utils.checkpoint import checkpoint
    for block in blocks:
        fwd = block.forward
        block.forward = lambda *a, _f=fwd, **k: checkpoint(_f, *a, use_reentrant=False, **k)


def rng_state() -> dict:
    s = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict):
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def checkpoint_stage(path: Path) -> str:
    """Which stage wrote a checkpoint directory: our exports say so; official files are 'llama' or 'cola'."""
    for name in ("config.json", "params.json"):
        f = path / name
        if f.exists():
            cfg = json.loads(f.read_text())
            if "train_stage" in cfg:
                return cfg["train_stage"]
            return "cola" if "num_code" in cfg else "llama"
    if not path.exists():
        raise SystemExit(f"--init {path}: directory not found")
    raise SystemExit(f"--init {path}: no config.json or params.json (not a checkpoint directory)")


# Which checkpoints each stage may start from ("llama": any plain Llama, ours or Meta's; "cola": the official
# CoLA release, which has been through both pre-training stages).
STARTS_FROM = {"base": set(), "pretrain": {"base", "llama"}, "bc": {"pretrain", "cola"},
               "fta-i": {"bc", "cola"}, "fta-p": {"bc", "cola"}, "sft": {"base", "llama", "sft"}}


# ----------------------------------------------------------------------------------------------------------------
# Losses, one small function per stage, each written as the paper's equation. Batches are windows x [B, T+1].


def base_loss(model: Transformer, x, mask=None):
    """Token LM: L = mean_t CE(W_lm h_t, x_{t+1}) (stage `base`, and token SFT with a response mask)."""
    logits = model(x[:, :-1])                                                                # [B, T, V]
    loss = masked_ce(logits, x[:, 1:], None if mask is None else mask[:, 1:])
    return loss, {"ce": loss.item()}


def pretrain_loss(model: CoLA, x, cfg: PretrainArgs):
    """Stage A. Eq: L = mean_t CE(p_WM(x_{t+1} | h_t, a~_t)) + beta * mean_t sum_k y_{t,k} log y_{t,k}."""
    with torch.no_grad():                          # base frozen: h_t = sg(Norm_f(...))
        h = model.hidden(x)                                                                  # [B, T+1, D]
    z = model.idm_logits(h)[:, 1:]                 # one-step look-ahead: a_t read at t+1       [B, T, K]
    a_st, y, k = gumbel_softmax_st(z, cfg.gumbel_tau)   # Eq: a~ = onehot(k) - sg(y) + y         [B, T, K]
    logits = model.world_logits_onehot(h[:, :-1], a_st)                                      # [B, T, V]
    ce = masked_ce(logits, x[:, 1:])
    reg = entropy_regulariser(y, cfg.beta)         # = -beta * mean entropy(y)
    usage = codebook_usage(k, model.args.n_actions)
    return ce + reg, {"ce": ce.item(), "reg": reg.item(), "alive": usage["alive"], "top": usage["top_share"]}


def nearest_code(z_e: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """VQ lookup: k = argmin_k ||z_e - C_k||^2 for z_e [B, T, D] and codes C [D, K] (column k is e_k) -> k [B, T]."""
    dist = z_e.pow(2).sum(-1, keepdim=True) - 2 * z_e @ C + C.pow(2).sum(0)                  # [B, T, K]
    return dist.argmin(-1)                                                                   # [B, T]


def vq_pretrain_loss(model: CoLA, x, cfg: PretrainArgs):
    """Ablation: nearest-neighbour VQ instead of direct assignment (VQ-VAE straight-through + commitment).

    z_e = encoder output (IDM blocks, norm, head d -> d); k = argmin_k ||z_e - C_k||; e = C_k;
    L = CE(p_WM(x_{t+1} | h_t, z_e + sg(e - z_e))) + ||sg(z_e) - e||^2 + commitment * ||z_e - sg(e)||^2.
    """
    with torch.no_grad():
        h = model.hidden(x)                                                                  # [B, T+1, D]
    z_e = model.idm_logits(h)[:, 1:].float()       # head replaced by d -> d in build_model     [B, T, D]
    C = model.codebook.weight.float()              # column k is code e_k                       [D, K]
    k = nearest_code(z_e, C)                                                                 # [B, T]
    e = C.t()[k]                                                                             # [B, T, D]
    z_q = z_e + (e - z_e).detach()                 # straight-through to the encoder            [B, T, D]
    logits = model.world_logits_from_code(h[:, :-1], z_q)                                    # [B, T, V]
    ce = masked_ce(logits, x[:, 1:])
    vq = F.mse_loss(e, z_e.detach()) + cfg.vq_commitment * F.mse_loss(z_e, e.detach())
    usage = codebook_usage(k, model.args.n_actions)
    return ce + vq, {"ce": ce.item(), "vq": vq.item(), "alive": usage["alive"], "top": usage["top_share"]}


def bc_loss(model: CoLA, x, mask=None):
    """Stage B. Eq: L = mean_t CE(pi(. | x_{1:t}), k*_t), k*_t = argmax softmax(f_inverse(x_{1:t+1}))."""
    with torch.no_grad():                          # base and IDM frozen
        h = model.hidden(x)                                                                  # [B, T+1, D]
        k_star = model.idm_logits(h)[:, 1:].argmax(-1)                                       # [B, T]
    pi_logits = model.policy_logits(h[:, :-1])                                               # [B, T, K]
    m = None if mask is None else mask[:, 1:]
    loss = masked_ce(pi_logits, k_star, m)
    hit = (pi_logits.argmax(-1) == k_star).float()                                           # [B, T]
    acc = hit.mean() if m is None else (hit * m).sum() / m.sum().clamp(min=1)
    return loss, {"ce": loss.item(), "acc": acc.item()}


def fta_i_loss(model: CoLA, x, mask):
    """FTA-I step 1: the base learns under the frozen IDM's actions (argmax, straight-through), response only.

    Eq: a~_t = onehot(argmax z_t) - sg(softmax z_t) + softmax z_t;  L = mean_{t in response} CE(p_WM(x_{t+1}|h_t,a~_t))
    """
    h = model.hidden(x)                            # the base trains now                        [B, T+1, D]
    z = model.idm_logits(h)[:, 1:]                 # frozen IDM weights, gradient flows to h    [B, T, K]
    soft = z.float().softmax(-1)                                                             # [B, T, K]
    a_st = F.one_hot(soft.argmax(-1), soft.shape[-1]).float() - soft.detach() + soft         # [B, T, K]
    loss = masked_ce(model.world_logits_onehot(h[:, :-1], a_st), x[:, 1:], mask[:, 1:])
    return loss, {"ce": loss.item()}


def fta_p_loss(model: CoLA, x, mask):
    """FTA-P: the base learns under the frozen greedy policy's actions a_t = argmax pi(. | x_{1:t})."""
    h = model.hidden(x)                                                                      # [B, T+1, D]
    with torch.no_grad():
        a = model.policy_logits(h[:, :-1]).argmax(-1)                                        # [B, T]
    loss = masked_ce(model.world_logits(h[:, :-1], a), x[:, 1:], mask[:, 1:])
    return loss, {"ce": loss.item()}


# ----------------------------------------------------------------------------------------------------------------
# Evaluation on held-out data


@torch.no_grad()
def evaluate(model, batches, amp, mask_batches=None) -> dict:
    """Mean held-out losses over batches of windows [B, T+1] (optionally with response masks).

    For CoLA: the base LM's loss, the world model's loss with IDM argmax actions and with greedy policy actions,
    policy accuracy against the IDM labels, and the number of distinct IDM actions used.
    """
    model.eval()
    sums, used = {}, set()
    for i, x in enumerate(batches):
        mask = None if mask_batches is None else mask_batches[i][:, 1:]
        with amp:
            if isinstance(model, Transformer):
                out = {"lm": masked_ce(model(x[:, :-1]), x[:, 1:], mask).item()}
            else:
                h = model.hidden(x)                                                          # [B, T+1, D]
                k = model.idm_logits(h)[:, 1:].argmax(-1)                                    # [B, T]
                a = model.policy_logits(h[:, :-1]).argmax(-1)                                # [B, T]
                hit = (a == k).float() if mask is None else (a == k).float()[mask]
                out = {"lm": masked_ce(model.base.output(h[:, :-1]), x[:, 1:], mask).item(),
                       "wm_idm": masked_ce(model.world_logits(h[:, :-1], k), x[:, 1:], mask).item(),
                       "wm_policy": masked_ce(model.world_logits(h[:, :-1], a), x[:, 1:], mask).item(),
                       "policy_acc": hit.mean().item()}
                used.update(k.unique().tolist())
        for key, v in out.items():
            sums[key] = sums.get(key, 0.0) + v
    result = {k: v / len(batches) for k, v in sums.items()}
    if used:
        result["idm_actions_used"] = len(used)
    model.train()
    return result


# ----------------------------------------------------------------------------------------------------------------
# Building the model and the data of a stage


def build_model(stage: str, cfg, device, tok: Tokenizer):
    if stage == "base":
        if cfg.init:
            raise SystemExit("--init: stage base trains from scratch; at 8B load Meta's weights in pretrain/sft")
        if cfg.preset != "tiny":
            raise SystemExit(f"--preset {cfg.preset}: stage base only trains the tiny model; pass the official "
                             f"weights to the next stage with --init instead")
        args = PRESETS["tiny"]
        if tok.n_words > args.vocab_size:
            raise SystemExit(f"--tokenizer has {tok.n_words} tokens; the tiny preset has vocab_size "
                             f"{args.vocab_size}")
        torch.manual_seed(cfg.seed)
        model = Transformer(args)
        model.init_weights()
        return model.to(device)
    if not cfg.init:
        raise SystemExit(f"--init is required for stage {stage}: the checkpoint it starts from "
                         f"({' or '.join(sorted(STARTS_FROM[stage]))})")
    init = Path(cfg.init)
    prev = checkpoint_stage(init)
    if prev not in STARTS_FROM[stage]:
        raise SystemExit(f"--init {init} was written by stage {prev!r}; stage {stage} starts from "
                         f"{' or '.join(sorted(STARTS_FROM[stage]))}")
    torch.manual_seed(cfg.seed)
    if stage == "sft":
        model = Transformer.from_pretrained(init, device=device)
    else:
        model = CoLA.from_pretrained(init, device=device, cola_args=COLA_PRESETS.get(cfg.preset, CoLAArgs()))
    if model_vocab(model) < tok.n_words:
        raise SystemExit(f"tokenizer has {tok.n_words} tokens but {init} has vocab_size {model_vocab(model)}")
    if stage == "pretrain" and cfg.quantizer == "vq":
        d = model.base.args.dim
        model.idm.head = nn.Linear(d, d, bias=False, device=device)   # encoder output z_e in code space
        nn.init.normal_(model.idm.head.weight, std=math.sqrt(2 / (5 * d)))
    return model


def model_vocab(model) -> int:
    return (model if isinstance(model, Transformer) else model.base).args.vocab_size


def max_seq_len(model) -> int:
    return (model if isinstance(model, Transformer) else model.base).args.max_seq_len


def embedded_cache(cfg, tok: Tokenizer) -> Path:
    return Path(__file__).resolve().parent / "data" / "cache" / f"embedded-{tok.model.name}-seed{cfg.seed}"


def lm_shards(cfg, tok: Tokenizer) -> tuple[list[Path], list[Path]]:
    """Train/val token shards: --data / --val-data directories, or the embedded corpus prepared once."""
    def shards(d: str, flag: str) -> list[Path]:
        paths = sorted(Path(d).glob("*.bin"))
        if not paths:
            raise SystemExit(f"{flag} {d}: no .bin token shards (make them with `python data.py prepare`)")
        return paths
    if cfg.data:
        train = shards(cfg.data, "--data")
        val = shards(cfg.val_data, "--val-data") if cfg.val_data else train
        return train, val
    splits = data.prepare_embedded(embedded_cache(cfg, tok), tok, seed=cfg.seed)
    return splits["train"], splits["val"]


def general_text_shards(cfg, tok: Tokenizer) -> list[Path]:
    """Held-out natural text only, to measure what fine-tuning costs in general ability (the retention claim).

    The embedded pre-training corpus also holds task text, which fine-tuning on tasks improves; this set leaves it
    out (the held-out stdlib docstrings). With --val-data, that corpus is used as it is.
    """
    if cfg.val_data or cfg.data:
        return lm_shards(cfg, tok)[1]
    docs = [d for d in data.stdlib_docs() if data.split_of(d) == "val"]
    return data.write_shards(docs, embedded_cache(cfg, tok) / "general-val", tok, source="stdlib-docstrings:val")


def sft_tensors(cfg: FinetuneArgs, tok: Tokenizer, split: str):
    """(tokens [N, T+1], response mask [N, T+1]) of the task data."""
    path = cfg.sft_data if split == "train" else cfg.sft_val
    if path:
        records = data.load_sft_jsonl(path)
    else:
        n = cfg.n_records if split == "train" else max(64, cfg.n_records // 10)
        records = [r for kind in ("countdown", "arith")
                   for r in data.task_sft_records(kind, split, n // 2, seed=cfg.seed)]
    return data.encode_sft(records, tok, cfg.seq_len, chat=cfg.chat)


# ----------------------------------------------------------------------------------------------------------------
# The training loop shared by every stage. A stage is one or more phases; each phase trains one set of parameters
# with one loss for a number of steps, with its own AdamW and schedule.


@dataclass
class Phase:
    name: str
    params: list                 # trainable parameters (everything else frozen)
    loss_fn: object              # batch -> (loss, metrics)
    loader: object               # .next_batch(), .state_dict(), .load_state_dict()
    steps: int


def make_optimizer(params, cfg, no_decay: set):
    """AdamW; weight decay 0 on the codebook C only (spec section 3), everything else cfg.weight_decay."""
    decay = [p for p in params if id(p) not in no_decay]
    plain = [p for p in params if id(p) in no_decay]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if plain:
        groups.append({"params": plain, "weight_decay": 0.0})
    fused = {"fused": True} if params and params[0].is_cuda else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **fused)


def set_trainable(model, params):
    keep = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


def save_checkpoint(run_dir: Path, state: dict):
    """Atomic: ckpt.pt is replaced only by a complete file, so a crash mid-write keeps the previous one."""
    atomic_write(run_dir / "ckpt.pt", lambda tmp: torch.save(state, tmp))


def log_metrics(run_dir: Path, row: dict):
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def trim_metrics(run_dir: Path, step: int):
    """On resume, keep the step rows up to the checkpoint's step; later rows and the eval row will be redone."""
    f = run_dir / "metrics.jsonl"
    if f.exists():
        rows = [r for r in f.read_text().splitlines() if r and json.loads(r).get("step", step + 1) <= step]
        atomic_write(f, lambda tmp: tmp.write_text("".join(r + "\n" for r in rows)))


def train_phases(model, phases: list[Phase], cfg, run_dir: Path, device, no_decay: set, stage: str):
    from tqdm import tqdm
    amp = autocast(cfg, device)
    accum = cfg.global_batch // cfg.micro_batch
    total = sum(ph.steps for ph in phases)
    step, resumed = 0, None
    ckpt = run_dir / "ckpt.pt"
    if cfg.resume and ckpt.exists():
        resumed = torch.load(ckpt, map_location=device, weights_only=False)   # checked by check_flags
        model.load_state_dict(resumed["model"])
        step = resumed["step"]
        trim_metrics(run_dir, step)
        print(f"resuming {stage} from {ckpt} at step {step}")
    good = step
    bar = tqdm(total=total, initial=step, desc=stage, dynamic_ncols=True, disable=None)
    offset = 0
    for pi, ph in enumerate(phases):
        if step >= offset + ph.steps:
            offset += ph.steps
            continue
        set_trainable(model, ph.params)
        opt = make_optimizer(ph.params, cfg, no_decay)
        phase_cfg = _phase_schedule(cfg, ph.steps)
        if resumed is not None and resumed["phase"] == pi:
            if resumed["optim"] is not None:        # None: saved at the very end of the previous phase
                opt.load_state_dict(resumed["optim"])
            ph.loader.load_state_dict(resumed["loader"])
            set_rng_state(resumed["rng"])
        model.train()
        t0, tokens = time.time(), 0
        while step < offset + ph.steps:
            lr = lr_at(step - offset, phase_cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            metrics = {}
            for _ in range(accum):
                batch = ph.loader.next_batch()
                with amp:
                    loss, m = ph.loss_fn(batch)
                if not torch.isfinite(loss):
                    bar.close()
                    raise SystemExit(f"{stage}: loss is {loss.item()} at step {step} ({ph.name}); stopped. "
                                     f"The last good checkpoint ({ckpt if good else 'none'}, step {good}) is kept.")
                (loss / accum).backward()
                for k, v in m.items():
                    metrics[k] = metrics.get(k, 0.0) + v / accum
                x = batch[0] if isinstance(batch, tuple) else batch
                tokens += x.shape[0] * (x.shape[1] - 1)
            gnorm = torch.nn.utils.clip_grad_norm_(ph.params, cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            tps = tokens / max(time.time() - t0, 1e-9)
            bar.update(1)
            bar.set_postfix({k: f"{v:.3g}" for k, v in metrics.items()} | {"lr": f"{lr:.2g}", "tok/s": f"{tps:.0f}"})
            if step % cfg.log_every == 0 or step == offset + ph.steps:
                log_metrics(run_dir, {"step": step, "phase": ph.name, "lr": lr, "grad_norm": gnorm.item(),
                                      "tok_per_s": round(tps, 1), **metrics})
            if step % cfg.ckpt_every == 0 or step == offset + ph.steps:
                phase_over = step == offset + ph.steps
                save_checkpoint(run_dir, {"stage": stage, "step": step, "phase": pi + 1 if phase_over else pi,
                                          "model": model.state_dict(), "optim": None if phase_over else
                                          opt.state_dict(), "loader": ph.loader.state_dict(), "rng": rng_state(),
                                          "config": asdict(cfg)})
                good = step
        offset += ph.steps
        resumed = None
    bar.close()


def _phase_schedule(cfg, steps: int):
    """The schedule fields of cfg for a phase of `steps` steps (warmup -1 means 3% of them, as the paper's FTA)."""
    warm = cfg.warmup_steps if cfg.warmup_steps >= 0 else max(1, round(0.03 * steps))
    return argparse.Namespace(lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=warm, steps=steps)


# ----------------------------------------------------------------------------------------------------------------
# One stage, end to end


def check_flags(stage: str, cfg):
    """Mistakes that need no model or data, reported before anything is loaded or written."""
    if cfg.micro_batch <= 0 or cfg.global_batch % cfg.micro_batch:
        raise SystemExit(f"--global-batch {cfg.global_batch} is not a positive multiple of --micro-batch "
                         f"{cfg.micro_batch}")
    if cfg.dtype not in ("bfloat16", "float32"):
        raise SystemExit(f"--dtype {cfg.dtype!r}: expected bfloat16 or float32")
    if stage == "pretrain" and cfg.quantizer not in ("direct", "vq"):
        raise SystemExit(f"--quantizer {cfg.quantizer!r}: expected direct or vq")
    ckpt = Path(cfg.out_dir) / "ckpt.pt"
    if cfg.resume and ckpt.exists():
        saved = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)
        if saved["stage"] != stage:
            raise SystemExit(f"{ckpt}: checkpoint of stage {saved['stage']!r}, not {stage!r}; use another "
                             f"--out-dir")
        ignore = {"resume", "out_dir", "device", "ckpt_every", "log_every", "eval_batches"}
        now = asdict(cfg)
        if now.get("steps") == 0:          # fine-tuning steps derived from --epochs: the saved value is resolved
            ignore.add("steps")
        for k, v in saved["config"].items():
            if k not in ignore and now.get(k) != v:
                raise SystemExit(f"{ckpt}: was written with --{k.replace('_', '-')} {v}, this run has {now.get(k)}; "
                                 f"resume with the same flags or use another --out-dir")


def run_stage(stage: str, cfg) -> dict:
    check_flags(stage, cfg)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    run_dir = Path(cfg.out_dir)
    tok = Tokenizer.find(cfg.init or None, cfg.tokenizer or None)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    model = build_model(stage, cfg, device, tok)
    if cfg.seq_len + 1 > max_seq_len(model):
        raise SystemExit(f"--seq-len {cfg.seq_len}: windows of {cfg.seq_len + 1} tokens exceed the model's "
                         f"max_seq_len {max_seq_len(model)}")
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(blocks_of(model))
    amp = autocast(cfg, device)

    # -- data ----------------------------------------------------------------------------------------------------
    train_paths, val_paths = lm_shards(cfg, tok)
    lm_val = data.TokenLoader(val_paths, cfg.micro_batch, cfg.seq_len, seed=1234)
    lm_val_batches = [lm_val.next_batch().to(device) for _ in range(cfg.eval_batches)]
    task_val = general_val = None
    if isinstance(cfg, FinetuneArgs):
        tokens, mask = sft_tensors(cfg, tok, "train")
        loader = DeviceLoader(data.SFTLoader(tokens, mask, cfg.micro_batch, seed=cfg.seed), device)
        if cfg.steps <= 0:
            cfg.steps = max(1, round(cfg.epochs * len(tokens) / cfg.global_batch))
        vt, vm = sft_tensors(cfg, tok, "val")
        n = min(len(vt), cfg.eval_batches * cfg.micro_batch)
        task_val = ([vt[i:i + cfg.micro_batch].to(device) for i in range(0, n, cfg.micro_batch)],
                    [vm[i:i + cfg.micro_batch].to(device) for i in range(0, n, cfg.micro_batch)])
        general = data.TokenLoader(general_text_shards(cfg, tok), cfg.micro_batch, cfg.seq_len, seed=1234)
        general_val = [general.next_batch().to(device) for _ in range(cfg.eval_batches)]
    else:
        loader = DeviceLoader(data.TokenLoader(train_paths, cfg.micro_batch, cfg.seq_len, seed=cfg.seed), device)

    # -- the run directory: resolved config (steps included), stale temporary files of a killed run removed ------
    run_dir.mkdir(parents=True, exist_ok=True)
    for tmp in run_dir.glob(".*.tmp*"):
        tmp.unlink()
    resolved = {"stage": stage, **asdict(cfg), "n_params": sum(p.numel() for p in model.parameters())}
    atomic_write(run_dir / "config.json", lambda t: t.write_text(json.dumps(resolved, indent=2)))
    print(json.dumps(resolved))

    # The VQ ablation's IDM emits code vectors, not action logits: evaluate its (frozen) base only.
    eval_model = model.base if stage == "pretrain" and cfg.quantizer == "vq" else model
    before = {"lm_val": evaluate(eval_model, lm_val_batches, amp)}
    if task_val:
        before["task_val"] = evaluate(model, task_val[0], amp, task_val[1])
        before["general_val"] = evaluate(model, general_val, amp)

    # -- phases --------------------------------------------------------------------------------------------------
    no_decay = set()
    if stage == "base":
        phases = [Phase("lm", list(model.parameters()), lambda x: base_loss(model, x), loader, cfg.steps)]
    elif stage == "sft":
        phases = [Phase("sft", list(model.parameters()), lambda b: base_loss(model, *b), loader, cfg.steps)]
    else:
        groups = model.param_groups()
        no_decay = {id(p) for p in groups["codebook"]}
        if stage == "pretrain":
            fn = vq_pretrain_loss if cfg.quantizer == "vq" else pretrain_loss
            params = groups["idm"] + groups["codebook"] + groups["merge"]
            phases = [Phase("stage-a", params, lambda x: fn(model, x, cfg), loader, cfg.steps)]
        elif stage == "bc":
            phases = [Phase("stage-b", groups["policy"], lambda x: bc_loss(model, x), loader, cfg.steps)]
        elif stage == "fta-i":
            phases = [Phase("fta-i/base", groups["base"], lambda b: fta_i_loss(model, *b), loader, cfg.steps),
                      Phase("fta-i/bc", groups["policy"], lambda b: bc_loss(model, *b), loader, cfg.steps)]
        else:
            phases = [Phase("fta-p", groups["base"], lambda b: fta_p_loss(model, *b), loader, cfg.steps)]
    t0 = time.time()
    train_phases(model, phases, cfg, run_dir, device, no_decay, stage)
    seconds = time.time() - t0

    # -- final evaluation and export ---------------------------------------------------------------------------
    after = {"lm_val": evaluate(eval_model, lm_val_batches, amp)}
    if task_val:
        after["task_val"] = evaluate(model, task_val[0], amp, task_val[1])
        after["general_val"] = evaluate(model, general_val, amp)
    result = {"stage": stage, "train_seconds": round(seconds, 1), "before": before, "after": after}
    if stage == "pretrain":
        result["codebook"] = final_codebook_usage(model, lm_val_batches, amp, cfg)
    log_metrics(run_dir, {"eval": result})
    export(model, run_dir / "final", stage, cfg)
    print(json.dumps(result, indent=2))
    return result


class DeviceLoader:
    """Moves a loader's batches (a tensor or a tuple of tensors) to the training device."""

    def __init__(self, loader, device):
        self.loader, self.device = loader, device

    def next_batch(self):
        b = self.loader.next_batch()
        return tuple(t.to(self.device) for t in b) if isinstance(b, tuple) else b.to(self.device)

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, s):
        self.loader.load_state_dict(s)


def blocks_of(model):
    if isinstance(model, Transformer):
        return list(model.layers)
    return list(model.base.layers) + list(model.idm.layers) + list(model.policy.layers)


@torch.no_grad()
def final_codebook_usage(model: CoLA, batches, amp, cfg) -> dict:
    """Alive actions and the most-used share over the held-out windows (argmax / nearest code, no noise)."""
    ks = []
    for x in batches:
        with amp:
            z = model.idm_logits(model.hidden(x))[:, 1:].float()                            # [B, T, K|D]
        if cfg.quantizer == "vq":
            ks.append(nearest_code(z, model.codebook.weight.float()))                        # [B, T]
        else:
            ks.append(z.argmax(-1))
    return codebook_usage(torch.cat([k.flatten() for k in ks]), model.args.n_actions)


def export(model, path: Path, stage: str, cfg):
    """final/: the model in the HF (base) or official CoLA layout, tagged with the stage that wrote it."""
    if stage == "pretrain" and cfg.quantizer == "vq":
        return      # the ablation's IDM head has another shape: nothing downstream loads it
    model.save_pretrained(path)
    cfg_file = path / "config.json"
    c = json.loads(cfg_file.read_text())
    c["train_stage"] = stage
    atomic_write(cfg_file, lambda t: t.write_text(json.dumps(c, indent=2)))


# ----------------------------------------------------------------------------------------------------------------
# The whole pipeline at the tiny preset, and the table of the paper's effects in miniature


def run_pipeline(a) -> list[dict]:
    root = Path(a.out_dir)

    def cfg(stage, **kw):
        _, c = parse_args(["--stage", stage, "--out-dir", str(root / kw.pop("name", stage)),
                           "--seed", str(a.seed), "--no-resume"] + [s for k, v in kw.items()
                                                                     for s in (f"--{k.replace('_', '-')}", str(v))])
        c.steps = max(1, round(c.steps * a.scale)) if c.steps else c.steps
        c.eval_batches = max(1, round(c.eval_batches * min(1.0, a.scale * 10)))
        if isinstance(c, FinetuneArgs):
            c.n_records = max(32, round(c.n_records * a.scale))
        return c
    t0 = time.time()
    r = {}
    r["base"] = run_stage("base", cfg("base"))
    r["pretrain"] = run_stage("pretrain", cfg("pretrain", init=root / "base/final"))
    r["vq"] = run_stage("pretrain", cfg("pretrain", name="pretrain-vq", init=root / "base/final", quantizer="vq"))
    r["bc"] = run_stage("bc", cfg("bc", init=root / "pretrain/final"))
    r["fta-i"] = run_stage("fta-i", cfg("fta-i", init=root / "bc/final"))
    r["fta-p"] = run_stage("fta-p", cfg("fta-p", init=root / "bc/final"))
    r["sft"] = run_stage("sft", cfg("sft", init=root / "base/final"))
    table = results_table(r, time.time() - t0)
    print(table)
    atomic_write(root / "results.md", lambda t: t.write_text(table + "\n"))
    return r


def results_table(r: dict, seconds: float) -> str:
    K = 64
    pre, vq, bc = r["pretrain"], r["vq"], r["bc"]
    lm = pre["after"]["lm_val"]

    def delta(res, key):     # change of a held-out loss on general (non-task) text over a fine-tuning stage
        return res["after"]["general_val"][key] - res["before"]["general_val"][key]
    rows = [
        ("Stage A: alive actions (direct assignment)", f"{pre['codebook']['alive']} / {K}", ">= 56 / 64"),
        ("Stage A: alive actions (VQ ablation)", f"{vq['codebook']['alive']} / {K}", "fewer (collapse)"),
        ("Stage A: most-used action share (direct / VQ)",
         f"{pre['codebook']['top_share']:.3f} / {vq['codebook']['top_share']:.3f}", ""),
        ("held-out loss: base LM (nats/token)", f"{lm['lm']:.3f}", "paper 1.77"),
        ("held-out loss: world model, IDM actions", f"{lm['wm_idm']:.3f}", "<= half the base; paper 0.45"),
        ("Stage B: policy accuracy vs IDM labels", f"{bc['after']['lm_val']['policy_acc']:.3f}",
         f">> 1/64 = {1 / 64:.3f}"),
        ("held-out loss: world model, greedy policy actions", f"{bc['after']['lm_val']['wm_policy']:.3f}", ""),
        ("task loss after FTA-I / FTA-P (policy actions) / SFT (response tokens)",
         " / ".join(f"{r[s]['after']['task_val'][k]:.3f}" for s, k in
                    (("fta-i", "wm_policy"), ("fta-p", "wm_policy"), ("sft", "lm"))), ""),
        ("general-text loss change: FTA-I (world model, IDM actions)", f"{delta(r['fta-i'], 'wm_idm'):+.3f}",
         "rises less than SFT's"),
        ("general-text loss change: FTA-I (world model, policy actions)",
         f"{delta(r['fta-i'], 'wm_policy'):+.3f}", ""),
        ("general-text loss change: FTA-P (world model, policy actions)",
         f"{delta(r['fta-p'], 'wm_policy'):+.3f}", ""),
        ("general-text loss change: token SFT (base LM)", f"{delta(r['sft'], 'lm'):+.3f}", ""),
    ]
    w = max(len(a) for a, _, _ in rows)
    lines = [f"| {'measurement':<{w}} | value | paper / target |", f"|{'-' * (w + 2)}|-------|----------------|"]
    lines += [f"| {a:<{w}} | {b} | {c} |" for a, b, c in rows]
    lines.append(f"\npipeline wall time: {seconds:.0f} s on {os.cpu_count()} CPU cores "
                 f"(torch {torch.__version__}, {torch.get_num_threads()} threads)")
    return "\n".join(lines)


def main(argv=None):
    stage, cfg = parse_args(argv)
    if stage == "pipeline":
        run_pipeline(cfg)
    else:
        run_stage(stage, cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
