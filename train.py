"""train.py: every training stage of CoLA (cola-spec section 3, Algorithms 1 and 2) in one script.

Stages (each starts from the previous stage's export with --init, writes config.json, metrics.jsonl, resumable
checkpoints/step-N/ and an export final/ into its run directory):
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
    torchrun --nproc_per_node=8 train.py --stage pretrain --preset llama-3.1-8b --init /path/Llama-3.1-8B ...

Several processes (torchrun; parallel.py): data parallel with parameters, gradients and AdamW state sharded by
FSDP2; per-step losses equal one process's at the same --global-batch. Killed runs resume: rerunning the same
command with the same --out-dir picks up the newest checkpoints/step-N/ (model, optimizer, step, data position; a
torch.distributed.checkpoint directory, loadable on any number of processes) and continues the identical loss
curve. Every random draw of training (data order, Gumbel noise) is a function of --seed and the position of a
sequence in the data stream, not of a generator's state, so it does not depend on the world size or on resuming.

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
from model import PRESETS, Transformer, args_from_hf_config, atomic_write, detect_layout, read_json
from parallel import Root, World
from tokenizer import Tokenizer
import data
import tasks
import parallel

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
    global_batch: int = arg(512, "sequences per optimizer step, all processes together (paper: 512)")
    micro_batch: int = arg(4, "sequences per forward/backward and process (paper: 4); gradient accumulation = "
                              "global / (micro x processes)")
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
    cpu_offload: bool = arg(False, "under torchrun: keep parameter shards, gradients and AdamW state in host memory")
    device: str = arg("", "cpu or cuda (default: cuda if available)")
    seed: int = arg(0, "seed for init, data order and Gumbel noise")
    ckpt_every: int = arg(1000, "steps between resumable checkpoints (checkpoints/step-N)")
    log_every: int = arg(10, "steps between metrics.jsonl lines")
    eval_batches: int = arg(20, "held-out micro batches for the final evaluation")
    resume: bool = arg(True, "continue from the newest <out_dir>/checkpoints/step-N if there is one")
    stop_at: int = arg(0, "save a checkpoint and exit after this step (time-limited jobs); rerun to continue")


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

# The 8B-sized presets: stages that train the 8B base recompute each block in backward. Without it their
# activations at micro batch 4 x 2048 alone take 51-58 GiB per GPU and the total exceeds an 80 GB GPU
# (`python bench.py --memory-plan`: fta-i 84, fta-p 76, sft 72 GiB before the CUDA context; 35-41 GiB with it).
LARGE = {"fta-i": dict(activation_checkpointing=True), "fta-p": dict(activation_checkpointing=True),
         "sft": dict(activation_checkpointing=True)}


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
    defaults = {**COMMON_TINY, **TINY[known.stage]} if known.preset == "tiny" else LARGE.get(known.stage, {})
    p = argparse.ArgumentParser(prog=f"train.py --stage {known.stage}", description=cls.__doc__)
    p.add_argument("--stage", choices=STAGES)
    for f in fields(cls):
        default = defaults.get(f.name, f.default)
        flag = "--" + f.name.replace("_", "-")
        text = f.metadata["help"].replace("%", "%%")                 # argparse formats help with %
        if f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=f"{text} (default "
                           f"{default})")
        else:
            typ = {"int": int, "float": float, "str": str}[f.type]
            p.add_argument(flag, type=typ, default=default, help=f"{text} (default {default})")
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


def row_uniforms(ids, shape: tuple, seed: int, device) -> torch.Tensor:
    """U(0, 1) noise [B, *shape], row i from its own generator seeded by (seed, ids[i]), the row's position in the
    data stream: the same numbers for a sequence whatever the world size, micro batch or resume point."""
    rows = []
    for i in ids:
        mixed = int(np.random.SeedSequence([seed, int(i)]).generate_state(1)[0])   # 32 bits: all the CPU RNG reads
        g = torch.Generator(device=device).manual_seed(mixed)
        rows.append(torch.rand(shape, generator=g, device=device))
    return torch.stack(rows)


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


def pretrain_loss(model: CoLA, x, cfg: PretrainArgs, ids=None):
    """Stage A. Eq: L = mean_t CE(p_WM(x_{t+1} | h_t, a~_t)) + beta * mean_t sum_k y_{t,k} log y_{t,k}.

    ids [B]: the rows' data-stream positions, which seed their Gumbel noise (row_uniforms); None: global RNG.
    """
    with torch.no_grad():                          # base frozen: h_t = sg(Norm_f(...))
        h = model.hidden(x)                                                                  # [B, T+1, D]
    z = model.idm_logits(h)[:, 1:]                 # one-step look-ahead: a_t read at t+1       [B, T, K]
    u = None if ids is None else row_uniforms(ids, z.shape[1:], cfg.seed, z.device)         # [B, T, K]
    a_st, y, k = gumbel_softmax_st(z, cfg.gumbel_tau, u=u)   # Eq: a~ = onehot(k) - sg(y) + y    [B, T, K]
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


def eval_batch(model, x, mask, lm_only: bool):
    """Held-out losses of one batch x [B, T+1] (mask [B, T] or None) -> (metrics, IDM actions [B, T] or None)."""
    if isinstance(model, Transformer) or lm_only:
        lm = model if isinstance(model, Transformer) else model.base
        return {"lm": masked_ce(lm(x[:, :-1]), x[:, 1:], mask).item()}, None
    h = model.hidden(x)                                                                      # [B, T+1, D]
    k = model.idm_logits(h)[:, 1:].argmax(-1)                                                # [B, T]
    a = model.policy_logits(h[:, :-1]).argmax(-1)                                            # [B, T]
    hit = (a == k).float() if mask is None else (a == k).float()[mask]
    return {"lm": masked_ce(model.base.output(h[:, :-1]), x[:, 1:], mask).item(),
            "wm_idm": masked_ce(model.world_logits(h[:, :-1], k), x[:, 1:], mask).item(),
            "wm_policy": masked_ce(model.world_logits(h[:, :-1], a), x[:, 1:], mask).item(),
            "policy_acc": hit.mean().item()}, k


@torch.no_grad()
def evaluate(root: Root, batches, amp, mask_batches=None, lm_only: bool = False) -> dict:
    """Mean held-out losses over batches of windows [B, T+1] (optionally with response masks).

    For CoLA: the base LM's loss, the world model's loss with IDM argmax actions and with greedy policy actions,
    policy accuracy against the IDM labels, and the number of distinct IDM actions used. lm_only: the base LM's
    loss only. Under torchrun every rank evaluates the same batches (the sharded model needs all of them).
    """
    root.eval()
    sums, used = {}, set()
    for i, x in enumerate(batches):
        mask = None if mask_batches is None else mask_batches[i][:, 1:]
        with amp:
            out, k = root(eval_batch, x, mask, lm_only)
        if k is not None:
            used.update(k.unique().tolist())
        for key, v in out.items():
            sums[key] = sums.get(key, 0.0) + v
    result = {k: v / len(batches) for k, v in sums.items()}
    if used:
        result["idm_actions_used"] = len(used)
    parallel.reshard(root)
    root.train()
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
        vq_encoder_head(model)
        nn.init.normal_(model.idm.head.weight, std=math.sqrt(2 / (5 * model.base.args.dim)))
    return model


def vq_encoder_head(model: CoLA):
    """The VQ ablation's IDM ends in Linear(d -> d): an encoder output z_e in code space instead of K logits."""
    w = model.idm.head.weight
    d = model.base.args.dim
    model.idm.head = nn.Linear(d, d, bias=False, device=w.device, dtype=w.dtype)


# Which parameter groups (CoLA.param_groups) each stage trains, in any of its phases; the rest is frozen.
TRAINS = {"pretrain": {"idm", "codebook", "merge"}, "bc": {"policy"}, "fta-i": {"base", "policy"},
          "fta-p": {"base"}}


def set_trainable(model, stage: str):
    """requires_grad once per stage (FSDP reads it when it first runs): a plain Llama trains everything."""
    if isinstance(model, Transformer):
        model.requires_grad_(True)
        return
    for name, params in model.param_groups().items():
        for p in params:
            p.requires_grad_(name in TRAINS[stage])


def model_spec(model) -> tuple:
    """The shapes of a built model, small and picklable: rank 0 sends them to the other ranks."""
    return ("llama", model.args) if isinstance(model, Transformer) else ("cola", model.base_args, model.args)


def model_from_spec(spec: tuple, stage: str, cfg):
    """An uninitialised model of these shapes on the current default device (use under torch.device("meta"))."""
    if spec[0] == "llama":
        return Transformer(spec[1])
    model = CoLA(spec[1], spec[2])
    if stage == "pretrain" and cfg.quantizer == "vq":
        vq_encoder_head(model)
    return model


def bf16_frozen_groups(model, stage: str) -> list[str]:
    """The frozen parameter groups of a CoLA whose weights are all bf16 values already (the official 8B base is):
    stored in bf16 under FSDP, they take half the memory and lose nothing. Groups that earlier stages trained in
    float32 stay float32, so exports and later stages see exactly the weights one process would."""
    if not isinstance(model, CoLA):
        return []
    exact = lambda p: torch.equal(p, p.to(torch.bfloat16).to(p.dtype))                      # noqa: E731
    groups = model.param_groups()
    return [name for name in sorted(set(groups) - TRAINS[stage]) if all(exact(p) for p in groups[name])]


def build_root(stage: str, cfg, device, tok: Tokenizer, world: World) -> Root:
    """The model of a stage, wrapped in the Root every computation runs through (parallel.Root).

    One process: build_model on the device. Under torchrun (cola-spec section 3 at 8B; llama-ecosystem.md 4.2):
    rank 0 builds the model on CPU exactly as one process would (checkpoint read from its mmap'd files, new modules
    initialised with the same seed), the other ranks receive its shapes; every rank builds the same model on the
    meta device, shards it with FSDP2, allocates its shards (to_empty) and receives rank 0's tensors, broadcast and
    sharded one by one. So no rank but 0 ever holds the whole model, and a run starts from bit-identical weights
    whatever the world size (random init of DTensors would give other numbers per world size).
    """
    if not world.launched:
        model = build_model(stage, cfg, device, tok)
        set_trainable(model, stage)
        if cfg.activation_checkpointing:
            enable_activation_checkpointing(blocks_of(model))
        return Root(model)
    from torch.distributed.device_mesh import init_device_mesh
    full = parallel.on_main(world, lambda: build_model(stage, cfg, torch.device("cpu"), tok))
    bf16 = cfg.dtype == "bfloat16"
    spec, to_bf16 = parallel.broadcast_object(world, (model_spec(full), bf16_frozen_groups(full, stage) if bf16
                                                      else []) if world.main else None)
    with torch.device("meta"):
        model = model_from_spec(spec, stage, cfg)
    for m in (model, full):
        if m is not None:
            set_trainable(m, stage)                  # frozen modules: no gradient, no optimizer state
            for name in to_bf16:
                getattr(m, name).to(torch.bfloat16)
    if cfg.activation_checkpointing:                 # before fully_shard (llama-ecosystem.md 4.4)
        enable_activation_checkpointing(blocks_of(model))
    root = Root(model)
    parallel.apply_fsdp(root, init_device_mesh(device.type, (world.size,)), torch.bfloat16 if bf16 else None,
                        cfg.cpu_offload)
    root.to_empty(device="cpu" if cfg.cpu_offload else device)
    parallel.load_full_state(root, None if full is None else {"model." + k: v for k, v in full.state_dict().items()},
                             world)
    return root


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
    out, source = embedded_cache(cfg, tok) / "general-val", f"stdlib-docstrings:val:v{data.DATA_VERSION}"
    docs = (d for d in data.stdlib_docs() if data.split_of(d) == "val")
    return data.finished_shards(out, tok, source) or data.write_shards(docs, out, tok, source=source)


def sft_tensors(cfg: FinetuneArgs, tok: Tokenizer, split: str):
    """(tokens [N, T+1], response mask [N, T+1]) of the task data."""
    path = cfg.sft_data if split == "train" else cfg.sft_val
    if path:
        records = data.load_sft_jsonl(path)
    else:
        n = cfg.n_records if split == "train" else max(64, cfg.n_records // 10)
        records = [r for kind in ("countdown", "arith")
                   for r in tasks.task_sft_records(kind, split, n // 2, seed=cfg.seed)]
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


def log_metrics(run_dir: Path, row: dict):
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def trim_metrics(run_dir: Path, step: int):
    """On resume, keep the step rows up to the checkpoint's step; later rows and the eval row will be redone."""
    f = run_dir / "metrics.jsonl"
    if f.exists():
        rows = [r for r in f.read_text().splitlines() if r and json.loads(r).get("step", step + 1) <= step]
        atomic_write(f, lambda tmp: tmp.write_text("".join(r + "\n" for r in rows)))


def train_phases(root: Root, phases: list[Phase], cfg, run_dir: Path, device, no_decay: set, stage: str,
                 world: World) -> bool:
    """Run the phases from the newest checkpoint on; False if --stop-at ended the run before the last step.

    One optimizer step = global_batch sequences = (global_batch / (micro_batch x world size)) micro batches on each
    rank, each loss a mean over its micro batch, so the gradient (FSDP averages it over the ranks) is the mean of
    the per-micro-batch gradients: what one process computes with the same global batch.
    """
    from tqdm import tqdm
    amp = autocast(cfg, device)
    accum = cfg.global_batch // (cfg.micro_batch * world.size)
    total = sum(ph.steps for ph in phases)
    step, resumed = 0, None
    latest = parallel.latest_checkpoint(run_dir) if cfg.resume else None
    if latest is not None:                          # checked by check_flags: same stage and flags
        resumed = parallel.read_train_state(latest)
        if not resumed["has_optim"]:                # else the model comes with the optimizer, at its phase below
            parallel.load_checkpoint(latest, root, None, world)
        step = resumed["step"]
        if world.main:
            trim_metrics(run_dir, step)
            print(f"resuming {stage} from {latest} at step {step} (written by {resumed['world_size']} "
                  f"process(es), now {world.size})")
    good = step
    bar = tqdm(total=total, initial=step, desc=stage, dynamic_ncols=True, disable=None if world.main else True)
    offset = 0
    for pi, ph in enumerate(phases):
        if step >= offset + ph.steps:
            offset += ph.steps
            continue
        opt = make_optimizer(ph.params, cfg, no_decay)
        phase_cfg = _phase_schedule(cfg, ph.steps)
        if resumed is not None and resumed["phase"] == pi:
            if resumed["has_optim"]:                # False: saved at the very end of the previous phase
                parallel.load_checkpoint(latest, root, opt, world)      # model and AdamW state, one read
            ph.loader.load_state_dict(resumed["loader"])
        root.train()
        t0, tokens = time.time(), 0
        while step < offset + ph.steps:
            lr = lr_at(step - offset, phase_cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            metrics = {"loss": 0.0}
            for _ in range(accum):
                batch = ph.loader.next_batch()
                with amp:
                    loss, m = root(ph.loss_fn, batch)
                (loss / accum).backward()
                for k, v in {"loss": loss.item(), **m}.items():
                    metrics[k] = metrics.get(k, 0.0) + v / accum
                x = batch[0] if isinstance(batch, tuple) else batch
                tokens += x.shape[0] * (x.shape[1] - 1) * world.size
            metrics = parallel.mean_over_ranks(world, metrics)
            if not math.isfinite(metrics["loss"]):      # the same verdict on every rank
                bar.close()
                raise SystemExit(f"{stage}: loss is {metrics['loss']} at step {step} ({ph.name}); stopped. The last "
                                 f"good checkpoint ({latest if good else 'none'}, step {good}) is kept.")
            gnorm = parallel.local_tensor(torch.nn.utils.clip_grad_norm_(ph.params, cfg.grad_clip)).item()
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            tps = tokens / max(time.time() - t0, 1e-9)
            bar.update(1)
            bar.set_postfix({k: f"{v:.3g}" for k, v in metrics.items()} | {"lr": f"{lr:.2g}", "tok/s": f"{tps:.0f}"})
            phase_over = step == offset + ph.steps
            if world.main and (step % cfg.log_every == 0 or phase_over):
                row = {"step": step, "phase": ph.name, "lr": lr, "grad_norm": gnorm, "tok_per_s": round(tps, 1)}
                if device.type == "cuda":
                    row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                log_metrics(run_dir, {**row, **metrics})
            stopping = step == cfg.stop_at
            if step % cfg.ckpt_every == 0 or phase_over or stopping:
                state = {"stage": stage, "step": step, "phase": pi + 1 if phase_over else pi,
                         "loader": ph.loader.state_dict(), "config": asdict(cfg)}
                latest = parallel.save_checkpoint(run_dir, root, None if phase_over else opt, state, world)
                good = step
            if stopping and step < total:
                bar.close()
                return False
        offset += ph.steps
        resumed = None
    bar.close()
    return True


def _phase_schedule(cfg, steps: int):
    """The schedule fields of cfg for a phase of `steps` steps (warmup -1 means 3% of them, as the paper's FTA)."""
    warm = cfg.warmup_steps if cfg.warmup_steps >= 0 else max(1, round(0.03 * steps))
    return argparse.Namespace(lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=warm, steps=steps)


# ----------------------------------------------------------------------------------------------------------------
# One stage, end to end


def init_shape(path: Path) -> tuple[int, int] | None:
    """(dim, n_layers) from a checkpoint directory's config.json / params.json, without reading any tensor."""
    try:
        if detect_layout(path) == "hf":
            a = args_from_hf_config(read_json(path / "config.json"), str(path / "config.json"))
            return a.dim, a.n_layers
        p = read_json(path / "params.json")
        return int(p["dim"]), int(p["n_layers"])
    except (FileNotFoundError, ValueError, KeyError):
        return None                # build_model reports what is wrong with the directory


def check_flags(stage: str, cfg, world: World = World()):
    """Mistakes that need no model or data, reported before anything is loaded or written."""
    if cfg.micro_batch <= 0 or cfg.global_batch % (cfg.micro_batch * world.size):
        procs = f" x {world.size} processes" if world.size > 1 else ""
        raise SystemExit(f"--global-batch {cfg.global_batch} is not a positive multiple of --micro-batch "
                         f"{cfg.micro_batch}{procs}")
    if cfg.dtype not in ("bfloat16", "float32"):
        raise SystemExit(f"--dtype {cfg.dtype!r}: expected bfloat16 or float32")
    if stage == "pretrain" and cfg.quantizer not in ("direct", "vq"):
        raise SystemExit(f"--quantizer {cfg.quantizer!r}: expected direct or vq")
    if cfg.cpu_offload and not world.launched:
        raise SystemExit("--cpu-offload shards and offloads with FSDP: launch with torchrun (--nproc_per_node=1 "
                         "works too)")
    if cfg.init and stage != "base":
        shape, want = init_shape(Path(cfg.init)), PRESETS[cfg.preset]
        if shape is not None and shape != (want.dim, want.n_layers):
            match = [n for n, a in PRESETS.items() if (a.dim, a.n_layers) == shape]
            raise SystemExit(f"--init {cfg.init}: a model of dim {shape[0]} with {shape[1]} layers, but --preset "
                             f"{cfg.preset} has dim {want.dim} with {want.n_layers} layers"
                             + (f"; use --preset {match[0]}" if match else ""))
    latest = parallel.latest_checkpoint(Path(cfg.out_dir)) if cfg.resume else None
    if latest is not None:
        saved = parallel.read_train_state(latest)
        if saved["stage"] != stage:
            raise SystemExit(f"{latest}: checkpoint of stage {saved['stage']!r}, not {stage!r}; use another "
                             f"--out-dir")
        ignore = {"resume", "out_dir", "device", "ckpt_every", "log_every", "eval_batches", "stop_at",
                  "cpu_offload", "activation_checkpointing"}
        now = asdict(cfg)
        if now.get("steps") == 0:          # fine-tuning steps derived from --epochs: the saved value is resolved
            ignore.add("steps")
        for k, v in saved["config"].items():
            if k not in ignore and now.get(k) != v:
                raise SystemExit(f"{latest}: was written with --{k.replace('_', '-')} {v}, this run has "
                                 f"{now.get(k)}; resume with the same flags or use another --out-dir")


def run_stage(stage: str, cfg, world: World = World()) -> dict | None:
    """One stage end to end: the result (evaluations before and after), or None if --stop-at ended it early."""
    check_flags(stage, cfg, world)
    device = parallel.init_process_group(world, cfg.device)
    run_dir = Path(cfg.out_dir)
    tok = Tokenizer.find(cfg.init or None, cfg.tokenizer or None)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    root = build_root(stage, cfg, device, tok, world)
    model = root.model
    if cfg.seq_len + 1 > max_seq_len(model):
        raise SystemExit(f"--seq-len {cfg.seq_len}: windows of {cfg.seq_len + 1} tokens exceed the model's "
                         f"max_seq_len {max_seq_len(model)}")
    amp = autocast(cfg, device)

    # -- data: rank 0 tokenizes the embedded corpus once, the others then find its shards ----------------------
    finetune = isinstance(cfg, FinetuneArgs)
    parallel.on_main(world, lambda: (lm_shards(cfg, tok), finetune and general_text_shards(cfg, tok)))
    train_paths, val_paths = lm_shards(cfg, tok)
    lm_val = data.TokenLoader(val_paths, cfg.micro_batch, cfg.seq_len, seed=1234)
    lm_val_batches = [lm_val.next_batch().to(device) for _ in range(cfg.eval_batches)]
    task_val = general_val = None
    split = dict(rank=world.rank, world_size=world.size, global_batch=cfg.global_batch)
    if finetune:
        tokens, mask = sft_tensors(cfg, tok, "train")
        loader = DeviceLoader(data.SFTLoader(tokens, mask, cfg.micro_batch, seed=cfg.seed, **split), device)
        if cfg.steps <= 0:
            cfg.steps = max(1, round(cfg.epochs * len(tokens) / cfg.global_batch))
        vt, vm = sft_tensors(cfg, tok, "val")
        n = min(len(vt), cfg.eval_batches * cfg.micro_batch)
        task_val = ([vt[i:i + cfg.micro_batch].to(device) for i in range(0, n, cfg.micro_batch)],
                    [vm[i:i + cfg.micro_batch].to(device) for i in range(0, n, cfg.micro_batch)])
        general = data.TokenLoader(general_text_shards(cfg, tok), cfg.micro_batch, cfg.seq_len, seed=1234)
        general_val = [general.next_batch().to(device) for _ in range(cfg.eval_batches)]
    else:
        loader = DeviceLoader(data.TokenLoader(train_paths, cfg.micro_batch, cfg.seq_len, seed=cfg.seed, **split),
                              device)

    # -- the run directory: resolved config (steps included), leftovers of a killed run removed; a run that does
    # not resume starts from an empty checkpoints/ and metrics.jsonl -------------------------------------------
    resolved = {"stage": stage, **asdict(cfg), "n_params": sum(p.numel() for p in model.parameters()),
                "world_size": world.size}

    def prepare_run_dir():
        run_dir.mkdir(parents=True, exist_ok=True)
        for tmp in run_dir.glob(".*.tmp*"):
            tmp.unlink()
        parallel.remove_incomplete_checkpoints(run_dir)
        if not (cfg.resume and parallel.latest_checkpoint(run_dir)):
            for old in parallel.checkpoint_dirs(run_dir):
                parallel.remove_checkpoint(old)
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        atomic_write(run_dir / "config.json", lambda t: t.write_text(json.dumps(resolved, indent=2)))
        print(json.dumps(resolved))
    parallel.on_main(world, prepare_run_dir)

    # The VQ ablation's IDM emits code vectors, not action logits: evaluate its (frozen) base only.
    vq = stage == "pretrain" and cfg.quantizer == "vq"
    before = {"lm_val": evaluate(root, lm_val_batches, amp, lm_only=vq)}
    if task_val:
        before["task_val"] = evaluate(root, task_val[0], amp, task_val[1])
        before["general_val"] = evaluate(root, general_val, amp)

    # -- phases: each loss_fn(model, batch) runs as root(loss_fn, batch) ---------------------------------------
    no_decay = set()
    if stage == "base":
        phases = [Phase("lm", list(model.parameters()), lambda m, x: base_loss(m, x), loader, cfg.steps)]
    elif stage == "sft":
        phases = [Phase("sft", list(model.parameters()), lambda m, b: base_loss(m, *b), loader, cfg.steps)]
    else:
        groups = model.param_groups()
        no_decay = {id(p) for p in groups["codebook"]}
        if stage == "pretrain":
            fn = (lambda m, x: vq_pretrain_loss(m, x, cfg)) if vq else \
                (lambda m, x: pretrain_loss(m, x, cfg, loader.ids))          # ids seed the Gumbel noise
            params = groups["idm"] + groups["codebook"] + groups["merge"]
            phases = [Phase("stage-a", params, fn, loader, cfg.steps)]
        elif stage == "bc":
            phases = [Phase("stage-b", groups["policy"], lambda m, x: bc_loss(m, x), loader, cfg.steps)]
        elif stage == "fta-i":
            phases = [Phase("fta-i/base", groups["base"], lambda m, b: fta_i_loss(m, *b), loader, cfg.steps),
                      Phase("fta-i/bc", groups["policy"], lambda m, b: bc_loss(m, *b), loader, cfg.steps)]
        else:
            phases = [Phase("fta-p", groups["base"], lambda m, b: fta_p_loss(m, *b), loader, cfg.steps)]
    t0 = time.time()
    finished = train_phases(root, phases, cfg, run_dir, device, no_decay, stage, world)
    seconds = time.time() - t0
    if not finished:
        if world.main:
            print(f"{stage}: stopped after step {cfg.stop_at} (--stop-at); its checkpoint is in {run_dir}/"
                  f"checkpoints. Run the same command without --stop-at to continue.")
        return None

    # -- final evaluation and export ---------------------------------------------------------------------------
    after = {"lm_val": evaluate(root, lm_val_batches, amp, lm_only=vq)}
    if task_val:
        after["task_val"] = evaluate(root, task_val[0], amp, task_val[1])
        after["general_val"] = evaluate(root, general_val, amp)
    result = {"stage": stage, "train_seconds": round(seconds, 1), "world_size": world.size, "before": before,
              "after": after}
    if stage == "pretrain":
        result["codebook"] = final_codebook_usage(root, lm_val_batches, amp, cfg)
    export(root, run_dir, stage, cfg, world)
    if world.main:
        log_metrics(run_dir, {"eval": result})
        print(json.dumps(result, indent=2))
    return result


class DeviceLoader:
    """Moves a loader's batches (a tensor or a tuple of tensors) to the training device."""

    def __init__(self, loader, device):
        self.loader, self.device = loader, device

    def next_batch(self):
        b = self.loader.next_batch()
        return tuple(t.to(self.device) for t in b) if isinstance(b, tuple) else b.to(self.device)

    @property
    def ids(self):
        """The data-stream positions of the last batch's rows."""
        return self.loader.ids

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, s):
        self.loader.load_state_dict(s)


def blocks_of(model):
    if isinstance(model, Transformer):
        return list(model.layers)
    return list(model.base.layers) + list(model.idm.layers) + list(model.policy.layers)


@torch.no_grad()
def final_codebook_usage(root: Root, batches, amp, cfg) -> dict:
    """Alive actions and the most-used share over the held-out windows (argmax / nearest code, no noise)."""
    def assign(model, x):
        z = model.idm_logits(model.hidden(x))[:, 1:].float()                                 # [B, T, K|D]
        if cfg.quantizer == "vq":
            return nearest_code(z, model.codebook.weight.float())                            # [B, T]
        return z.argmax(-1)                                                                  # [B, T]
    ks = []
    for x in batches:
        with amp:
            ks.append(root(assign, x))
    parallel.reshard(root)
    return codebook_usage(torch.cat([k.flatten() for k in ks]), root.model.args.n_actions)


def export(root: Root, run_dir: Path, stage: str, cfg, world: World):
    """final/: the model in the HF (plain Llama) or official CoLA layout, tagged with the stage that wrote it; for
    the stages that train a CoLA's base (fta-i, fta-p) also final-llama/, that base alone in the HF Llama layout.

    Under torchrun the full tensors are gathered on rank 0 (a collective), which writes the files.
    """
    if stage == "pretrain" and cfg.quantizer == "vq":
        return      # the ablation's IDM head has another shape: nothing downstream loads it
    state = parallel.full_state_dict(root, world)

    def write():
        model = root.model
        if world.launched:                       # a plain copy of the sharded model, from the gathered tensors
            with torch.device("meta"):
                model = model_from_spec(model_spec(root.model), stage, cfg)
            model.load_state_dict(state, assign=True)
            base = model if isinstance(model, Transformer) else model.base
            if base.args.tie_embeddings:
                base.output.weight = base.tok_embeddings.weight
        model.save_pretrained(run_dir / "final")
        cfg_file = run_dir / "final" / "config.json"
        c = json.loads(cfg_file.read_text())
        c["train_stage"] = stage
        atomic_write(cfg_file, lambda t: t.write_text(json.dumps(c, indent=2)))
        if stage in ("fta-i", "fta-p"):
            model.base.save_pretrained(run_dir / "final-llama")
    parallel.on_main(world, write)


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
    world = parallel.world_from_env()
    stage, cfg = parse_args(argv)
    try:
        if stage == "pipeline":
            if world.launched:
                raise SystemExit("--stage pipeline runs the tiny preset in one process: start it with python, "
                                 "not torchrun")
            run_pipeline(cfg)
        else:
            run_stage(stage, cfg, world)
            parallel.barrier(world)             # every rank done before any tears the process group down
    except SystemExit as e:
        if world.rank != 0 and isinstance(e.code, str):
            raise SystemExit(1) from None       # rank 0 prints the message, once
        raise
    finally:
        if parallel.dist.is_initialized():
            parallel.dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
