"""rl.py: reinforcement learning over CoLA's latent actions (the paper's Algorithm 4; PAPER.md §4), and the same
algorithms over tokens on a plain Llama: the paper's baseline.

Latent (--level latent, the default): a CoLA checkpoint (FTA-P, FTA-I or Stage B export). Only the policy pi trains;
the base, IDM, codebook, merge module and W_lm stay frozen and bit-identical. A rollout samples a_t ~ pi (top-k 40,
tau 1) and decodes x_{t+1} = argmax p_WM(. | x_{1:t}, a_t); the RL log-probability is log pi(a_t | x_{1:t}) over
the K = 64 actions. The KL reference is a frozen copy of the starting *policy only*: the world model is shared, so
the reference costs one policy (tiny preset: 1.49M parameters of 8.02M; 8B: 1.75B of 11.24B), not a model.
Token (--level token): a plain Llama (the token-SFT export); every weight trains; tokens are sampled at temperature
1; the reference is a frozen copy of the whole starting model.

Algorithms, each written inline below with the paper's symbols:
  GRPO   G samples per prompt; A_i = (R_i - mean_G R) / (std_G R + 1e-4); PPO-clip (eps 0.2) on the ratio
         rho_t = pi_theta(a_t) / pi_old(a_t); a KL to the reference, either k1 in the reward (the release; default)
         or k3 in the loss (DeepSeekMath, TRL): see kl_placement below.
  ReMax  A_i = R(sampled rollout) - R(greedy rollout of the same prompt); REINFORCE, no ratio, no clipping.
Rewards: tasks.REWARDS: "task" (the rule-based checker: Countdown in the thinking format, boxed arithmetic) or
"proxy" (deliberately hackable, for the reward-hacking experiment with --kl-coef 0).

Several processes: `torchrun --nproc_per_node=N rl.py ...` splits each step's prompts (whole groups) over the ranks;
each sample's noise comes from (seed, step, its global index), so N processes draw the same rollouts as one. The part
RL trains is FSDP2-sharded, the frozen world model replicated on every rank (build() says why), and held-out
evaluation runs on rank 0.

Run it (CPU, tiny preset; start from the tiny pipeline's exports):
    python rl.py                                        # latent GRPO on countdown-2 from runs/fta-i/final
    python rl.py --algo remax
    python rl.py --level token                          # token GRPO from runs/sft/final
    python rl.py --reward proxy --kl-coef 0             # the reward-hacking experiment
    python rl.py --data train.jsonl --val-data test.jsonl [--chat]     # math problems from files (tasks.py)
    python rl.py --eval-only --init DIR --val-data test.jsonl --samples 8 --pass-k 1,4,8   # accuracy and pass@k
    python rl.py --help
Math problems from files (--data, MATH / GSM8K / prompt-answer JSONL: tasks.load_problems) replace --task: training
reads --data in a seeded order (tasks.pool_at: a permutation per epoch, a function of the step, so a resumed run sees
the same problems); the evaluations read --val-data, else the val split of --data (5% of the questions, by hash:
never trained on). --task beside --data is refused rather than ignored. The prompt is the question, then the paper's
instruction; --chat renders both as the Llama-3.1 dialog (data.encode_problem). --eval-only on them writes greedy
accuracy and pass@k (the unbiased estimator of Chen et al. 2021) to <--out-dir>/math-eval.json.
A run directory like train.py's: config.json, metrics.jsonl (a row per step, an {"eval": ...} row every
--eval-every steps), checkpoints/step-N/ (resumable: rerun the same command), final/ (loads with
CoLA.from_pretrained / Transformer.from_pretrained).

Choices where the paper is silent (and the release's, where it says):
  - behaviour log-probs: rollouts sample from pi truncated to its top-k 40, but every log-probability (the ratio,
    the KL) is taken under the full softmax, as the release does: RL trains the full distribution, and with K = 64
    the 24 truncated actions hold little mass. The old log-probs are a teacher-forced recomputation of the rollout
    under the same weights, so the ratio is exactly 1 at the first update of every batch;
  - loss aggregation: per-sequence mean over its response tokens, then the mean over sequences (the GRPO paper and
    the release). Longer sequences weigh each token less (the length bias Dr. GRPO removes); --aggregate token
    normalises by all response tokens instead;
  - std normalisation: the Bessel-corrected std of the group plus 1e-4 (TRL); a group with equal task rewards gets
    A = 0 before the KL term;
  - k1 in the reward (advantages): A_i <- A_i - beta * sum_t (log pi_old - log pi_ref)_t after the group
    normalisation of the task reward, as the release orders them: the sequence-level form of its per-token penalty
    (the release then also applies GAE with lambda 0.95; we do not). A group with equal task rewards gets A of
    order beta;
  - each sample's randomness is a function of (seed, step, sample index) (policy.seeded_sampler), so a rollout does
    not depend on the batch it was generated in or on where a run resumed.

Deviations from the paper / official code:
  - tasks: our Countdown and arithmetic (tasks.py) at the tiny preset; MATH-style problems from --data at 8B (the
    paper's MATH-500), no agent benchmarks;
  - no GAE / value function (the release's PPO-style advantage with V = 0 and lambda 0.95): outcome advantages;
  - no whitening of the advantages over the whole batch and no clamp of rewards to [-10, 10] (the release does
    both): the group normalisation already sets the scale, and the task rewards lie in [0, 1];
  - the latent default start is FTA-I's export (runs/fta-i/final), whose base and policy were fine-tuned on the
    same records as the token baseline's SFT; the release starts from FTA-P. --init chooses either;
  - --preset llama-3.1-8b sets the paper's lr, beta and G only; prompts per step (8) and new tokens (128) are ours
    (the release: 64 x 4 samples, 2048 tokens), sized for the memory plan of tools/bench.py --rl-memory-plan.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

import cola
import data
from eval import cola_metrics, lm_metrics
from infra import checkpoint, memory, parallel
from infra.files import atomic_write, check_out_file, read_json_or_empty
from infra.parallel import Root
from infra.trainer import (SEED, Run, arg, autocast, bf16_frozen_groups, dtype_line, enable_activation_checkpointing,
                           interrupts_are_one_line, log_metrics, parse_config, release_locks, trim_metrics,
                           writing)
from model import clip_new_tokens
from policy import action_log_probs, greedy, sample_uniforms, seeded_sampler
import tasks
from tokenizer import Tokenizer, check_vocab

LEVELS = ("latent", "token")
ALGOS = ("grpo", "remax")
KL_PLACEMENTS = ("reward", "loss")
AGGREGATES = ("sequence", "token")


@dataclass
class RLArgs:
    """RL over latent actions (Algorithm 4) or, with --level token, over tokens (the baseline)."""
    level: str = arg("latent", "latent: train CoLA's policy over K actions; token: train a plain Llama over tokens")
    algo: str = arg("grpo", "grpo (group-normalised advantage, PPO-clip) or remax (greedy-rollout baseline)")
    init: str = arg("", "checkpoint to start from (tiny default: runs/fta-i/final for latent, runs/sft/final for "
                        "token: both fine-tuned on the same task data)")
    out_dir: str = arg("", "run directory (default runs/rl-<level>-<algo>)")
    preset: str = arg("tiny", "tiny (CPU default) or llama-3.1-8b: the paper's math-RL lr, KL beta and G (GRPO: "
                              "5e-7, 1e-3, 4; ReMax: 1e-5, 1e-4), otherwise this file's 8B defaults: 8 prompts per "
                              "step and 128 new tokens, not the release's 64 prompts x 4 and 2048 tokens")
    task: str = arg("countdown", "countdown, arith, or an easier variant countdown-2 / countdown-3 (tasks.py)")
    data: str = arg("", "math problems to train on instead of --task: a .jsonl in the MATH, GSM8K or prompt/answer "
                        "layout (tasks.load_problems), read in a seeded order")
    val_data: str = arg("", "held-out math problems (.jsonl) for the evaluations (default: the val split of --data, "
                            "the 5% of questions whose hash is lowest, never trained on)")
    chat: bool = arg(False, "render prompts with the Llama-3.1 chat template (system: the math instruction, user: "
                            "the question); off: the question then the instruction, as plain text")
    reward: str = arg("task", "task (the rule-based checker) or proxy (deliberately hackable)")
    tokenizer: str = arg("", "tokenizer file (default: found in --init, else the embedded one)")
    steps: int = arg(200, "RL steps (one rollout batch and its updates each)", ">= 1")
    prompts_per_step: int = arg(8, "prompts per step; each gets --group samples", ">= 1")
    group: int = arg(4, "G, samples per prompt (paper, math: 4); ReMax uses 1 sample + 1 greedy rollout", ">= 1")
    max_new_tokens: int = arg(128, "longest response, tokens", ">= 1")
    top_k: int = arg(40, "latent: sample a_t from pi's top-k (paper: 40); token level samples the full softmax", ">= 1")
    temperature: float = arg(1.0, "sampling temperature (paper: 1)", "> 0")
    lr: float = arg(5e-7, "AdamW learning rate (paper, math GRPO: 5e-7)", "> 0")
    beta1: float = arg(0.9, "Adam beta1", ">= 0, < 1")
    beta2: float = arg(0.95, "Adam beta2", ">= 0, < 1")
    weight_decay: float = arg(0.0, "AdamW weight decay", ">= 0")
    grad_clip: float = arg(1.0, "max gradient norm", "> 0")
    clip_eps: float = arg(0.2, "PPO-clip epsilon of GRPO (paper: 0.2)", "> 0, < 1")
    micro_batch: int = arg(0, "rollouts per forward/backward in the update (gradients accumulate over them); 0: "
                              "all of a rank's rollouts at once (tiny default; at 8B see python -m tools.bench "
                              "--rl-memory-plan)",
                           ">= 0")
    updates_per_batch: int = arg(1, "optimizer steps on each rollout batch (mu); > 1 makes the clip matter", ">= 1")
    kl_coef: float = arg(1e-3, "beta, weight of the KL to the reference (paper, math: 1e-3; 0 for reward hacking)", ">= 0")
    kl_placement: str = arg("reward", "reward: k1 in the reward (release) or loss: k3 in the loss (DeepSeekMath)")
    aggregate: str = arg("sequence", "sequence: mean per response, then over responses (GRPO paper, release); "
                                     "token: mean over all response tokens of the batch")
    eval_every: int = arg(20, "steps between held-out evaluations", ">= 1")
    eval_problems: int = arg(64, "held-out problems per evaluation", ">= 1")
    ckpt_every: int = arg(50, "steps between resumable checkpoints", ">= 1")
    log_every: int = arg(1, "steps between metrics.jsonl rows", ">= 1")
    judge: str = arg("", "a frozen plain Llama that scores the fluency of sampled text (NLL per token) in every "
                         "evaluation (tiny default: runs/base/final if it exists; 'none' to skip)")
    eval_only: bool = arg(False, "evaluate --init (held-out task, general text, judge) and print it; train nothing. "
                                 "With --data / --val-data: greedy accuracy and pass@k on the held-out problems, "
                                 "written to <--out-dir>/math-eval.json")
    samples: int = arg(0, "--eval-only on math problems: n sampled responses per problem for pass@k (0: greedy "
                          "accuracy only)", ">= 0")
    pass_k: str = arg("1", "--eval-only on math problems: comma-separated k of pass@k, each <= --samples", "")
    dtype: str = arg("auto", "auto (bfloat16 where the device computes it natively, else float32), float32 or "
                             "bfloat16 (autocast)")
    device: str = arg("", "cpu or cuda (default: cuda if available)")
    seed: int = arg(0, "seed of problem order and sampling noise", SEED)
    resume: bool = arg(True, "continue from the newest checkpoint in --out-dir")
    activation_checkpointing: bool = arg(False, "recompute each trained block in backward (token level at 8B)")
    stop_at: int = arg(0, "save a checkpoint and exit after this step; rerun to continue", ">= 0")


# The tiny preset's defaults: measured on 2 CPU cores (docs/results.md, docs/rl-and-search.md). The token level
# trains every weight of the Llama and takes a tenth of the latent level's lr: at 3e-4 token GRPO undid what SFT
# taught within 30 steps (held-out greedy 0.46 -> 0.01), at 3e-5 it gained as much as latent GRPO at 3e-4.
TINY = dict(lr=3e-4, steps=60, prompts_per_step=8, group=4, max_new_tokens=160, eval_every=30, eval_problems=128,
            ckpt_every=10, task="countdown-2")
TINY_TOKEN = dict(TINY, lr=3e-5)
LARGE = {"grpo": dict(lr=5e-7, kl_coef=1e-3, group=4), "remax": dict(lr=1e-5, kl_coef=1e-4)}


def parse_args(argv: list[str], world: parallel.World = parallel.World()) -> RLArgs:
    pre = argparse.ArgumentParser(prog="rl.py", add_help=False)   # the flags that choose the defaults, in any form
    pre.add_argument("--preset", default="tiny")          # ("--preset X" or "--preset=X")
    pre.add_argument("--algo", default="grpo")
    pre.add_argument("--level", default="latent")
    known, _ = pre.parse_known_args(argv)
    tiny = TINY_TOKEN if known.level == "token" else TINY
    defaults = tiny if known.preset == "tiny" else LARGE.get(known.algo, {})
    cfg, given = parse_config(RLArgs, argv, "rl.py", defaults)
    for name, value, allowed in (("level", cfg.level, LEVELS), ("algo", cfg.algo, ALGOS),
                                 ("task", cfg.task, tasks.TASKS), ("reward", cfg.reward, tuple(tasks.REWARDS)),
                                 ("kl-placement", cfg.kl_placement, KL_PLACEMENTS),
                                 ("aggregate", cfg.aggregate, AGGREGATES),
                                 ("preset", cfg.preset, ("tiny", "llama-3.1-8b"))):
        if value not in allowed:
            raise SystemExit(f"--{name} {value!r}: expected one of {', '.join(allowed)}")
    check_math_flags(cfg, given)
    if cfg.algo == "grpo" and cfg.group < 2:
        raise SystemExit(f"--group {cfg.group}: GRPO normalises rewards within a group of at least 2 samples")
    if cfg.prompts_per_step % world.size:
        raise SystemExit(f"--prompts-per-step {cfg.prompts_per_step} is not a multiple of the {world.size} processes "
                         f"(each rank rolls out whole groups of the same number of prompts)")
    if cfg.eval_only and cfg.task == "math" and not cfg.out_dir:
        cfg.out_dir = f"runs/eval-{cfg.level}"
    cfg.out_dir = cfg.out_dir or f"runs/rl-{cfg.level}-{cfg.algo}"
    if not cfg.judge and cfg.preset == "tiny" and Path("runs/base/final").is_dir():
        cfg.judge = "runs/base/final"
    if not cfg.init:
        cfg.init = "runs/fta-i/final" if cfg.level == "latent" else "runs/sft/final"
        if cfg.preset != "tiny" or not Path(cfg.init).is_dir():
            raise SystemExit(f"--init: {cfg.init} does not exist; run `python train.py --stage "
                             f"{'fta-i' if cfg.level == 'latent' else 'sft'}` first (tiny preset), or pass --init DIR")
    context = checkpoint.context_of(Path(cfg.init))
    if cfg.task == "math" and context is not None and cfg.max_new_tokens >= context:
        raise SystemExit(f"--max-new-tokens {cfg.max_new_tokens}: the context of --init {cfg.init} is {context} "
                         f"tokens, prompt included; expected at most {context - 1}")
    cfg.max_new_tokens = clip_new_tokens(cfg.max_new_tokens, cfg.init, "--init")
    return cfg


def check_math_flags(cfg: RLArgs, given: set):
    """--data / --val-data replace --task (cfg.task becomes "math"); --samples and --pass-k belong to --eval-only on
    them. One line for each conflict, before anything is read."""
    cfg.task = tasks.task_of(cfg, given)
    if cfg.val_data and not cfg.data and not cfg.eval_only:
        raise SystemExit("--val-data: training needs --data too (the training problems); --val-data alone serves "
                         "--eval-only")
    for name in ("samples", "pass_k"):
        if name in given and not (cfg.eval_only and cfg.task == "math"):
            raise SystemExit(f"--{name.replace('_', '-')} is for --eval-only with --data or --val-data")
    ks = pass_ks(cfg.pass_k)
    if "pass_k" in given and not cfg.samples:     # else --pass-k 4 alone wrote greedy accuracy only, silently
        raise SystemExit(f"--pass-k {cfg.pass_k}: pass@k needs sampled responses; pass --samples n (n >= "
                         f"{max(ks)})")
    if cfg.samples and max(ks) > cfg.samples:
        raise SystemExit(f"--pass-k {cfg.pass_k}: pass@{max(ks)} needs at least {max(ks)} samples per problem; "
                         f"--samples is {cfg.samples}")


def pass_ks(text: str) -> list[int]:
    """--pass-k "1,4,8" -> [1, 4, 8]; one line unless distinct positive integers."""
    try:
        ks = [int(k) for k in text.split(",")]
    except ValueError:
        ks = []
    if not ks or min(ks) < 1 or len(set(ks)) < len(ks):
        raise SystemExit(f"--pass-k {text!r}: expected distinct positive integers, comma-separated (e.g. 1,4,8)")
    return ks


def load_model(cfg: RLArgs, device):
    """The starting checkpoint, checked against --level: a CoLA for latent RL, a plain Llama for token RL."""
    hint = {"latent": "--level latent needs a CoLA checkpoint (fta-p, fta-i or bc export; a plain Llama has no "
                      "policy to train); use --level token for a plain Llama",
            "token": f"--level token trains a plain Llama (e.g. the sft export, or {Path(cfg.init).parent}/"
                     f"final-llama)"}[cfg.level]
    model = cola.load_level(cfg.init, cfg.level, "--init", device, preset=cfg.preset, hint=hint)
    stage = read_json_or_empty(Path(cfg.init) / "config.json").get("train_stage")
    if cfg.level == "latent" and stage == "pretrain" and os.environ.get("RANK", "0") == "0":
        print(f"note: --init {cfg.init} is a Stage A export: its policy was never trained (bc, fta-i and fta-p "
              f"train it), so RL starts from a random policy", file=sys.stderr)
    return model


# ----------------------------------------------------------------------------------------------------------------
# Rollouts: prompts -> sampled responses (data.rollout), rewards (tasks.score), the teacher-forced batch the update
# reads (data.pack); each sample's noise policy.sample_uniforms(seed, step, index)


def micro_batches(b: dict, size: int) -> list[dict]:
    """The packed batch in chunks of `size` rows (0: one chunk); "first" is the chunk's first row in b."""
    size = size or len(b["x"])
    return [{**{k: v[i:i + size] for k, v in b.items()}, "first": i} for i in range(0, len(b["x"]), size)]


def log_probs(learner, cfg: RLArgs, b: dict, with_grad: bool, ref: bool = False):
    """log pi(a_t | x_{1:t}) [B, L-1] of the taken actions (latent) or tokens (token level), 0 off the response,
    under the trained weights (learner.trained); ref: also the frozen reference's, under no gradient. Both at
    --temperature tau (the release divides the logits by tau too); under the full softmax, not the top-k."""
    x, m, model, trained = b["x"], b["mask"], learner.model, learner.trained
    tau = cfg.temperature                          # Eq: pi = softmax(logits / tau), the distribution rollouts sample
    warm = (lambda z: z) if tau == 1.0 else (lambda z: z.float() / tau)     # in float32, as the sampler # noqa: E731
    if cfg.level == "latent":
        if "h" not in b:                           # the frozen base's states x_{1:t}, computed once per rollout batch
            with torch.no_grad():                  # and kept for every update (the base is most of the model at 8B)
                b["h"] = model.hidden(x[:, :-1])                                             # [B, L-1, D]
        h = b["h"]
        rope = model.base.rope(0, h.shape[1], h.device)                                      # [L-1, Dh/2, 2]
        with torch.set_grad_enabled(with_grad):
            logp = action_log_probs(trained(lambda pol, h, r: warm(pol(h, r)), h, rope), b["actions"], m)  # [B, L-1]
        ref_logits = (lambda: warm(learner.ref(h, rope))) if ref else None                 # ref: a Policy
    else:
        with torch.set_grad_enabled(with_grad):
            logp = token_log_probs(trained(lambda lm, x: warm(lm(x)), x[:, :-1]), x[:, 1:], m)   # [B, L-1]
        ref_logits = (lambda: warm(learner.ref(x[:, :-1]))) if ref else None
    if not with_grad:
        parallel.reshard(trained)                  # FSDP keeps the root's gathered weights after a no-grad forward
    if ref_logits is None:
        return logp
    with torch.no_grad():
        ref_logp = (action_log_probs(ref_logits(), b["actions"], m) if cfg.level == "latent"
                    else token_log_probs(ref_logits(), x[:, 1:], m))
    return logp, ref_logp


def token_log_probs(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log p(x_{t+1} | x_{1:t}): logits [B, T, V], targets [B, T], mask [B, T] -> [B, T] (0 where masked)."""
    logp = F.log_softmax(logits.float(), -1).gather(-1, targets[..., None])[..., 0]          # [B, T]
    return torch.where(mask, logp, 0.0)


# ----------------------------------------------------------------------------------------------------------------
# Advantages and the losses, written as the equations


def grpo_advantages(R: torch.Tensor, G: int) -> torch.Tensor:
    """Eq: A_i = (R_i - mean_G R) / (std_G R + 1e-4), R [N * G] grouped by prompt -> A [N * G]."""
    r = R.view(-1, G)                                                                        # [N, G]
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).view(-1)       # [N * G]


def advantages(R: torch.Tensor, kl_seq: torch.Tensor, cfg: RLArgs, G: int,
               R_greedy: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sequence advantages from task rewards R [B] and KL estimates kl_seq = sum_t k1_t [B] -> A [B].

    GRPO:  A_i = (R_i - mean_G R) / (std_G R + 1e-4) - beta sum_t k1_t
    ReMax: A_i = R_i - R(greedy rollout of the same prompt) - beta sum_t k1_t
    The task reward is normalised first and the KL penalty added after (--kl-placement reward, the release's order):
    a group whose task rewards are all equal gets A = -beta KL, of order beta. Subtracted before the normalisation,
    the KL noise alone would be scaled up to unit-size advantages. With --kl-placement loss the KL is in the loss.
    """
    A = grpo_advantages(R, G) if R_greedy is None else R - R_greedy                         # [B]
    return A - cfg.kl_coef * kl_seq if cfg.kl_placement == "reward" else A                  # Eq: k1 in the reward


def k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL estimate log pi - log pi_ref (unbiased for KL(pi || pi_ref) under samples of pi)."""
    return logp - ref_logp


def k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 = pi_ref / pi - log(pi_ref / pi) - 1 >= 0 (Schulman's estimator, DeepSeekMath's loss term)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, how: str, n_tokens: float | None = None) -> torch.Tensor:
    """Masked mean: per response then over responses ("sequence"), or over all response tokens ("token").
    n_tokens: the token normaliser when the batch is split over ranks: the response tokens of all ranks / the
    number of ranks, so that the ranks' average (FSDP averages gradients) is the mean over every token."""
    m = mask.float()
    if how == "sequence":
        return ((per_token * m).sum(1) / m.sum(1).clamp(min=1)).mean()
    return (per_token * m).sum() / (m.sum().clamp(min=1) if n_tokens is None else max(n_tokens, 1.0))


def grpo_loss(logp, old_logp, ref_logp, A, mask, cfg: RLArgs, n_tokens: float | None = None):
    """Eq: L = -mean [min(rho A, clip(rho, 1 - eps, 1 + eps) A)] (+ beta k3 with --kl-placement loss)."""
    rho = torch.exp(logp - old_logp)                                                         # [B, L-1]
    A = A[:, None]                                                                           # [B, 1]
    surrogate = torch.minimum(rho * A, rho.clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps) * A)   # [B, L-1]
    per_token = -surrogate
    if cfg.kl_placement == "loss":
        per_token = per_token + cfg.kl_coef * k3(logp, ref_logp)
    return aggregate(per_token, mask, cfg.aggregate, n_tokens), {"clip_frac": aggregate(
        ((rho - 1).abs() > cfg.clip_eps).float(), mask, "token").item(), "ratio_max": rho[mask].max().item()}


def remax_loss(logp, ref_logp, A, mask, cfg: RLArgs, n_tokens: float | None = None):
    """Eq: L = -mean [A log pi(a_t | x_{1:t})], A = R(sample) - R(greedy) (+ beta k3 with --kl-placement loss)."""
    per_token = -A[:, None] * logp
    if cfg.kl_placement == "loss":
        per_token = per_token + cfg.kl_coef * k3(logp, ref_logp)
    return aggregate(per_token, mask, cfg.aggregate, n_tokens), {}


# ----------------------------------------------------------------------------------------------------------------
# One RL step: rollouts, rewards, advantages, the update


def rl_step(learner, opt, cfg: RLArgs, tok: Tokenizer, step: int, world: parallel.World, device,
            pool: list[tasks.Problem] | None = None) -> dict:
    """Rollouts of this rank's share of the step's prompts (whole groups), rewards, advantages, the update, and the
    step's metrics over all ranks. pool: the --data problems (None: the generated --task)."""
    t0 = time.time()
    reward_fn = tasks.REWARDS[cfg.reward]
    P, G = cfg.prompts_per_step // world.size, (cfg.group if cfg.algo == "grpo" else 1)
    problems = (tasks.pool_at(pool, cfg.seed, step, cfg.prompts_per_step) if pool is not None else
                tasks.problems_at(cfg.task, cfg.seed, step, cfg.prompts_per_step))[world.rank * P:(world.rank + 1) * P]
    prompts = [data.encode_problem(tok, p, cfg.chat) for p in problems for _ in range(G)]
    u = sample_uniforms(cfg.seed, step, world.rank * P * G, len(prompts), cfg.max_new_tokens).to(device)
    top_k = cfg.top_k if cfg.level == "latent" else None
    learner.model.eval()
    rows = data.rollout(learner.model, tok, prompts, seeded_sampler(u, cfg.temperature, top_k), cfg.max_new_tokens)
    R = torch.tensor([tasks.score(p, r["text"], reward_fn) for p, r in zip([p for p in problems for _ in range(G)],
                                                                           rows)])
    greedy_rows, R_greedy = [], None
    if cfg.algo == "remax":                        # ReMax: the greedy rollout of the same prompt is the baseline
        greedy_rows = data.rollout(learner.model, tok, prompts, greedy(), cfg.max_new_tokens)
        R_greedy = torch.tensor([tasks.score(p, r["text"], reward_fn) for p, r in zip(problems, greedy_rows)])
    t_roll = time.time() - t0                      # rollout_s: every rollout (ReMax's greedy ones too) and scoring
    rolled = sum(len(r["tokens"]) for r in rows + greedy_rows)
    b = data.pack(prompts, rows, device)
    chunks = micro_batches(b, cfg.micro_batch)
    with torch.no_grad():                          # the behaviour policy's log-probs: ratio 1 at the first update
        old_logp, ref_logp = (torch.cat(t) for t in zip(*(log_probs(learner, cfg, c, with_grad=False, ref=True)
                                                          for c in chunks)))
    kl_seq = (k1(old_logp, ref_logp) * b["mask"]).sum(1).cpu()                               # [B]
    A = advantages(R, kl_seq, cfg, G, R_greedy).to(device)                                   # [B]
    t_logp = time.time() - t0 - t_roll             # logprob_s: the behaviour and reference log-probs
    n_tok = b["mask"].sum().item()
    n_tokens = parallel.mean_over_ranks(world, {"n": n_tok})["n"]      # the token normaliser per rank (aggregate)
    params = [p for p in learner.trained.parameters() if p.requires_grad]
    learner.trained.train()
    for _ in range(cfg.updates_per_batch):
        opt.zero_grad(set_to_none=True)
        loss, clipped, ratio_max = 0.0, 0.0, 1.0
        for c in chunks:                           # gradient accumulation: the sum of the chunks' parts of the loss
            these = slice(c["first"], c["first"] + len(c["x"]))
            logp = log_probs(learner, cfg, c, with_grad=True)
            args = (logp, old_logp[these], ref_logp[these], A[these], c["mask"], cfg, n_tokens)
            part, stats = grpo_loss(*args) if cfg.algo == "grpo" else remax_loss(*args[:1], *args[2:])
            if cfg.aggregate == "sequence":        # a mean over the rank's responses: weigh by the chunk's share
                part = part * len(c["x"]) / len(b["x"])
            part.backward()
            loss += part.item()
            clipped += stats.get("clip_frac", 0.0) * c["mask"].sum().item()
            ratio_max = max(ratio_max, stats.get("ratio_max", 1.0))
        gnorm = parallel.local_tensor(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)).item()
        opt.step()
    sync(learner)
    t_update = time.time() - t0 - t_roll - t_logp  # update_s: the optimizer updates alone (and the replica's sync)
    # per-rank sums, averaged over ranks: ratios of these averages are ratios of the sums over all ranks
    s = parallel.mean_over_ranks(world, {
        "reward": R.sum().item(), "success": (R == 1.0).sum().item(), "rows": len(rows), "tokens": n_tok,
        "rolled": rolled,
        "kl": kl_seq.sum().item(), "adv_abs": A.abs().sum().item(),
        "clipped": clipped, "loss": loss, "rollout_s": t_roll, "logprob_s": t_logp,
        "update_s": t_update})
    out = {"reward": s["reward"] / s["rows"], "success": s["success"] / s["rows"], "loss": s["loss"],
           "kl": s["kl"] / max(s["tokens"], 1), "grad_norm": gnorm, "adv_abs": s["adv_abs"] / s["rows"],
           "resp_len": s["tokens"] / s["rows"], "rollout_s": round(s["rollout_s"], 3),
           "logprob_s": round(s["logprob_s"], 3), "update_s": round(s["update_s"], 3),
           "rollout_tok_per_s": round(s["rolled"] * world.size / max(s["rollout_s"], 1e-9), 1)}
    if cfg.algo == "grpo":
        out["clip_frac"] = s["clipped"] / max(s["tokens"], 1)
        out["ratio_max"] = parallel.max_over_ranks(world, ratio_max)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Held-out evaluation (reused by tree search): success, format, reward, length, KL, entropy, actions in use


@torch.no_grad()
def evaluate(model, ref, cfg: RLArgs, tok: Tokenizer, device, n: int | None = None, judge=None,
             held: list[tasks.Problem] | None = None) -> dict:
    """Greedy and sampled rollouts on held-out problems (the val split of the "rl" stream, or the first n of `held`,
    the --val-data problems); with a judge (a frozen plain Llama), the judge's NLL per token of the sampled
    responses: fluency, which a hacked policy loses."""
    n = n or cfg.eval_problems
    problems = held[:n] if held is not None else tasks.make_problems(cfg.task, n, cfg.seed, split="val", stream="rl")
    n = len(problems)
    prompts = [data.encode_problem(tok, p, cfg.chat) for p in problems]
    model.eval()
    out = {"problems": len({p.prompt for p in problems})}          # distinct prompts among the n drawn
    u = sample_uniforms(cfg.seed + 1, 0, 0, n, cfg.max_new_tokens).to(device)   # fixed noise: comparable over steps
    top_k = cfg.top_k if cfg.level == "latent" else None
    for name, choose in (("greedy", greedy()), ("sampled", seeded_sampler(u, cfg.temperature, top_k))):
        rows = data.rollout(model, tok, prompts, choose, cfg.max_new_tokens)
        task_r = [tasks.reward(p, r["text"]) for p, r in zip(problems, rows)]
        out[f"{name}_success"] = sum(r == 1.0 for r in task_r) / n
        out[f"{name}_reward"] = sum(task_r) / n
        out[f"{name}_proxy"] = sum(tasks.proxy_reward(p, r["text"]) for p, r in zip(problems, rows)) / n
        out[f"{name}_format"] = sum(well_formed(p, r["text"]) for p, r in zip(problems, rows)) / n
        out[f"{name}_len"] = sum(len(r["tokens"]) for r in rows) / n
        if name == "sampled":
            b = data.pack(prompts, rows, device)
            view = SimpleNamespace(model=model, trained=Root(model.policy if cfg.level == "latent" else model), ref=ref)
            logp, ref_logp = log_probs(view, cfg, b, with_grad=False, ref=True)
            out["kl"] = (k1(logp, ref_logp) * b["mask"]).sum().item() / max(b["mask"].sum().item(), 1)
            if judge is not None:
                nll = -token_log_probs(judge(b["x"][:, :-1]), b["x"][:, 1:], b["mask"])         # [B, L-1]
                out["judge_nll"] = nll.sum().item() / max(b["mask"].sum().item(), 1)
            if cfg.level == "latent":
                h = b["h"]                         # the frozen base's states, from log_probs above   [B, L-1, D]
                p = model.policy_logits(h).float().softmax(-1)                               # [B, L-1, K]
                ent = -(p * p.clamp_min(1e-30).log()).sum(-1)                                # [B, L-1]
                out["entropy"] = ent[b["mask"]].mean().item()
                out["actions_used"] = len(set(a for r in rows for a in r["actions"]))
    return out


@torch.no_grad()
def general_text_loss(model, cfg: RLArgs, tok: Tokenizer, device, batches: int = 4) -> float:
    """Held-out general text (the val split's stdlib docstrings, no task text): the loss of what RL can change.
    Latent: the world model driven by the greedy policy (the base is frozen, so its own LM loss cannot move);
    token: the language model itself. The retention claim: latent RL should not raise it, token RL may."""
    args = model.base_args if cfg.level == "latent" else model.args
    seq = min(448, args.max_seq_len - 1)
    shards = data.general_text_shards(SimpleNamespace(data="", val_data="", seed=0), tok)
    loader = data.TokenLoader(shards, 8, seq, seed=data.VAL_SEED)
    metric = (lambda b: cola_metrics(model, b)["wm_policy"]) if cfg.level == "latent" else \
        (lambda b: lm_metrics(model, b)["lm"])
    return sum(metric(loader.next_batch().to(device)) for _ in range(batches)) / batches


EVAL_ROWS = 32                                 # responses generated at once by math_eval (the KV cache's rows)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021, Eq. 1): 1 - C(n - c, k) / C(n, k), the chance that k of n samples, c of
    them correct, hold a correct one; computed as 1 - prod_{i = n-c+1}^{n} (1 - k / i), never the huge binomials."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


@torch.no_grad()
def math_eval(model, cfg: RLArgs, tok: Tokenizer, problems: list[tasks.Problem], device) -> dict:
    """Held-out math as papers report it (the paper's MATH-500 numbers): greedy accuracy, and with --samples n,
    pass@k for each --pass-k k over n samples per problem (temperature --temperature, latent: pi's top-k), each
    sample's noise seeded by (seed, its index) as in training. Correct: the checker's full reward (tasks.score)."""
    n, ks = cfg.samples, pass_ks(cfg.pass_k) if cfg.samples else []
    top_k = cfg.top_k if cfg.level == "latent" else None
    per = max(1, EVAL_ROWS // (1 + n))         # problems per batch: their greedy and n sampled responses
    rows = []
    from tqdm import tqdm
    bar = tqdm(total=len(problems), desc="math eval", unit="problem", dynamic_ncols=True)
    for i in range(0, len(problems), per):
        chunk = problems[i:i + per]
        prompts = [data.encode_problem(tok, p, cfg.chat) for p in chunk]
        greedy_rows = data.rollout(model, tok, prompts, greedy(), cfg.max_new_tokens)
        correct = [0] * len(chunk)
        if n:
            u = sample_uniforms(cfg.seed, 0, i * n, len(chunk) * n, cfg.max_new_tokens).to(device)
            sampled = data.rollout(model, tok, [p for p in prompts for _ in range(n)],
                                   seeded_sampler(u, cfg.temperature, top_k), cfg.max_new_tokens)
            for j, r in enumerate(sampled):
                correct[j // n] += tasks.score(chunk[j // n], r["text"]) == 1.0
        for p, g, c in zip(chunk, greedy_rows, correct):
            rows.append({"source": p.meta.get("source", ""), "question": tasks.question_of(p), "answer": p.answer,
                         "greedy": g["text"], "greedy_correct": tasks.score(p, g["text"]) == 1.0, "correct": c})
        bar.update(len(chunk))
    bar.close()
    out = {"problems": len(rows), "greedy_accuracy": sum(r["greedy_correct"] for r in rows) / len(rows),
           "samples": n}
    for k in ks:                               # the mean over problems of each one's unbiased estimate
        out[f"pass@{k}"] = sum(pass_at_k(n, r["correct"], k) for r in rows) / len(rows)
    return {**out, "rows": rows}


def eval_model(cfg: RLArgs, device):
    """--eval-only's tokenizer and --init model, their vocabularies checked to agree (tokenizer.check_vocab)."""
    tok = Tokenizer.find(cfg.init, cfg.tokenizer or None)
    model = load_model(cfg, device).eval()
    check_vocab(tok, (model.base if cfg.level == "latent" else model).args.vocab_size, f"--init {cfg.init}")
    print(dtype_line(cfg))
    return tok, model


def math_eval_main(cfg: RLArgs, held: list[tasks.Problem]) -> dict:
    """--eval-only on math problems: math_eval of --init, printed and written to <--out-dir>/math-eval.json."""
    f = Path(cfg.out_dir) / "math-eval.json"
    check_out_file(f, "--out-dir")             # before the model loads
    try:                                       # and a file can be made there: not found out after the whole eval
        f.parent.mkdir(parents=True, exist_ok=True)
        probe = f.parent / f".{f.name}.{os.getpid()}.probe"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise SystemExit(f"--out-dir {cfg.out_dir}: cannot write {f.name} there ({e.strerror or e}); nothing was "
                         f"evaluated") from None
    device = parallel.device_of(cfg.device)
    tok, model = eval_model(cfg, device)
    with autocast(cfg.dtype, device):
        result = math_eval(model, cfg, tok, held, device)
    result = {"init": cfg.init, "held_out": cfg.val_data or f"the val split of {cfg.data}", "level": cfg.level,
              "chat": cfg.chat, "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
              "top_k": cfg.top_k if cfg.level == "latent" else None, "seed": cfg.seed, **result}
    with writing(f"--out-dir {cfg.out_dir}: could not write {f.name}"):
        f.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(f, lambda t: t.write_text(json.dumps(result, indent=1)))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))
    print(f"wrote {f}")
    return result


def well_formed(problem: tasks.Problem, text: str) -> bool:
    """The answer format of the task: Countdown's <think>..</think><answer>..</answer>, arith's \\boxed{}."""
    return tasks.well_formed(text) if problem.kind == "countdown" else tasks.last_boxed(text) is not None


# ----------------------------------------------------------------------------------------------------------------
# The run


def frozen_reference(model, level: str):
    """A frozen copy of what RL trains: the policy alone (latent; the world model is shared) or the whole model."""
    ref = copy.deepcopy(model.policy if level == "latent" else model)
    ref.requires_grad_(False)
    return ref.eval()


def build(cfg: RLArgs, world: parallel.World, device) -> SimpleNamespace:
    """The learner: .model, the whole starting checkpoint, which generates every rollout and gives the frozen base's
    states; .trained, a parallel.Root around the part RL trains (the policy, or the whole LM at token level), whose
    parameters the optimizer steps; .ref, the frozen reference; .replica, the part of .model that sync() refreshes.

    One process: .trained wraps the model's own policy (or the model itself), so nothing is copied.
    torchrun: every rank loads the checkpoint and holds the frozen world model whole (replicated, not sharded: a
    rollout runs one forward per token, and a sharded base would all-gather every block for each of them), while
    .trained is an FSDP2-sharded float32 copy of the trained part; after every update sync() gathers it into .model's
    replica, so each rank generates its own rollouts with no collective inside generation (ranks finish their
    rollouts at different lengths). At 8B that is 16 GB of bf16 world model per GPU instead of 2 (docs/scaling.md,
    memory plan); the gain is rollouts without 32 blocks' all-gathers per generated token."""
    model = load_model(cfg, torch.device("cpu")).requires_grad_(False)
    part = model.policy if cfg.level == "latent" else model
    bf16 = cfg.dtype == "bfloat16"
    if not world.launched:                     # frozen weights that are bf16 values already (the official base)
        ref = frozen_reference(model, cfg.level)                                      # before any update
        if cfg.activation_checkpointing:
            enable_activation_checkpointing(part.layers)
        for name in bf16_frozen_groups(model, {"policy"} if cfg.level == "latent" else {"base"}) if bf16 else []:
            getattr(model, name, model).to(torch.bfloat16)
        model, ref = model.to(device), ref.to(device)
        return SimpleNamespace(model=model, trained=Root(part.requires_grad_(True)), ref=ref, replica=None)
    from torch.distributed.device_mesh import init_device_mesh
    # Host memory: the checkpoint as loaded (float32) and nothing more. The fp32 master weights and the reference
    # are copied to the device tensor by tensor, not deep-copied on the host first (at 8B token level that was 96 GB
    # per rank: model, reference and trained copy, 770 GB on an 8-GPU node); what only generates or scores is bf16
    # (memory.rl_plan).
    trained = Root(copy_to(part, device, torch.float32).requires_grad_(True))
    if cfg.activation_checkpointing:           # before fully_shard
        enable_activation_checkpointing(trained.model.layers)
    parallel.apply_fsdp(trained, init_device_mesh(device.type, (world.size,)), torch.bfloat16 if bf16 else None)
    ref = copy_to(part, device, torch.bfloat16 if bf16 else None).requires_grad_(False).eval()   # once sharded
    model = model.to(torch.bfloat16) if bf16 else model          # in place: each fp32 tensor freed as it converts
    return SimpleNamespace(model=model.to(device), trained=trained, ref=ref, replica=part)


def copy_to(module: nn.Module, device, dtype: torch.dtype | None = None) -> nn.Module:
    """A copy of `module` whose parameters and buffers are made directly on `device` (floating ones in `dtype`, as
    Module.to converts), without a whole host copy in between: deepcopy with each tensor's copy given in advance."""
    memo = {}
    for t in [*module.parameters(), *module.buffers()]:
        v = t.detach().to(device, dtype if dtype is not None and t.is_floating_point() else t.dtype, copy=True)
        memo[id(t)] = nn.Parameter(v, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else v
    return copy.deepcopy(module, memo)


@torch.no_grad()
def sync(learner):
    """torchrun: the sharded trained weights, gathered, into the replica that generates (a collective)."""
    if learner.replica is None:
        return
    parallel.unshard(learner.trained)          # one all-gather per FSDP unit, in the gather dtype (bf16 at bf16)
    for (name, dst), (twin, src) in zip(learner.replica.named_parameters(), learner.trained.model.named_parameters(),
                                        strict=True):
        assert name == twin, (name, twin)
        dst.copy_(src)
    parallel.reshard(learner.trained)


def main(argv=None):
    """Train (or, --eval-only, evaluate); every process group is destroyed however it ends, Ctrl-C is one line."""
    try:
        with interrupts_are_one_line():
            return train(argv)
    finally:
        release_locks()                        # the run directory's lock, however the run ended (as train.py)
        parallel.shutdown()


def train(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    world = parallel.world_from_env()
    cfg = parse_args(argv, world)
    pool, held = (tasks.problem_sets(cfg.data, cfg.val_data, need_train=not cfg.eval_only) if cfg.task == "math"
                  else (None, None))               # read and checked before any model loads
    if cfg.eval_only:                          # nothing is written: a checkpoint's numbers, e.g. before and after RL
        if world.launched:
            raise SystemExit("--eval-only runs on one process: start it with python, not torchrun")
        if held is not None:                   # math problems: accuracy and pass@k, written to --out-dir
            return math_eval_main(cfg, held)
        device = parallel.device_of(cfg.device)
        tok, model = eval_model(cfg, device)
        with autocast(cfg.dtype, device):          # as a training run's evaluations (under Run.amp)
            result = {**evaluate(model, frozen_reference(model, cfg.level), cfg, tok, device,
                                 judge=load_judge(cfg, device)), "general_loss": general_text_loss(model, cfg, tok, device)}
        print(json.dumps({"init": cfg.init, **result}))
        return result
    tok = Tokenizer.find(cfg.init, cfg.tokenizer or None)
    if parallel.device_type(cfg.device) == "cuda":     # before any weight is read or file written (an 8B load that
        parallel.device_of(cfg.device)                 # ends out of memory: no more); --device cuda without one:
        memory.check_rl_fits(cfg, world, torch.device("cuda", world.local_rank),   # one line
                             longest_prompt(cfg, tok, pool))
    run = Run(f"rl-{cfg.level}-{cfg.algo}", cfg, world, init=cfg.init)
    device = run.device
    learner = build(cfg, world, device)
    check_vocab(tok, (learner.model.base if cfg.level == "latent" else learner.model).args.vocab_size,
                f"--init {cfg.init}")
    judge = parallel.on_main(world, lambda: load_judge(cfg, device))      # evaluation runs on rank 0
    opt = torch.optim.AdamW([p for p in learner.trained.parameters() if p.requires_grad], lr=cfg.lr,
                            betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    run.start(Root(learner.model))
    step = 0
    if run.latest is not None:
        saved = parallel.read_train_state(run.latest)
        parallel.load_checkpoint(run.latest, learner.trained, opt, world)
        sync(learner)
        step = saved["step"]
        if world.main:
            trim_metrics(run.dir, step, last=cfg.steps)
            print(f"resuming {run.stage} from {run.latest} at step {step}")

    def held_out(at: int) -> dict | None:      # rank 0 evaluates the replica (no collective); the others wait
        with run.amp:
            return parallel.on_main(world, lambda: {"step": at, **evaluate(learner.model, learner.ref, cfg, tok,
                                                                           device, judge=judge, held=held)})
    from tqdm import tqdm
    bar = tqdm(total=cfg.steps, initial=step, desc=run.stage, dynamic_ncols=True, disable=not world.main)
    if step == 0:
        first = held_out(0)
        if world.main:
            log_metrics(run.dir, {"eval": first})
    result, at_end = {}, step >= cfg.steps     # resumed at the last step: killed before the export, or finished
    while step < cfg.steps:
        with run.amp:
            m = rl_step(learner, opt, cfg, tok, step, world, device, pool)
        if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
            raise SystemExit(f"step {step + 1}: the loss is {m['loss']} (gradient norm {m['grad_norm']}); nothing of "
                             f"this step was saved: lower --lr, then rerun (it resumes from the newest checkpoint in "
                             f"{run.dir}/checkpoints)")
        step += 1
        bar.update(1)
        bar.set_postfix(reward=f"{m['reward']:.3f}", kl=f"{m['kl']:.2g}")
        if world.main and step % cfg.log_every == 0:
            log_metrics(run.dir, {"step": step, **m})
        if step % cfg.eval_every == 0 or step == cfg.steps:
            result = held_out(step)
            if world.main and step < cfg.steps:
                log_metrics(run.dir, {"eval": result})
        if step % cfg.ckpt_every == 0 or step == cfg.steps or step == cfg.stop_at:
            with writing(f"{run.dir}/checkpoints: could not save step {step}"):
                parallel.save_checkpoint(run.dir, learner.trained, opt, {
                    "stage": run.stage, "step": step, "phase": 0, "loader": {}, "config": asdict(cfg)}, world)
        if step == cfg.stop_at and step < cfg.steps:
            if world.main:
                print(f"stopped after step {step} (--stop-at); rerun the same command to continue")
            return
    bar.close()
    if at_end:                                 # the same final evaluation, from the same weights (decided alike on
        result = held_out(step)                # every rank: held_out waits for rank 0, whose result only it keeps)
    run.export(Root(learner.model), result or {})   # final/, and the last evaluation as the last metrics row
    parallel.barrier(world)                    # every rank done before main tears the process group down


def longest_prompt(cfg: RLArgs, tok: Tokenizer, pool: list[tasks.Problem] | None) -> int:
    """Tokens of the longest prompt RL will roll out from: of every --data problem, or of the first 256 problems
    of --task (generated problems of one task vary little in length)."""
    problems = pool if pool is not None else tasks.problems_at(cfg.task, cfg.seed, 0, 256)
    return max(len(data.encode_problem(tok, p, cfg.chat)) for p in problems)


def load_judge(cfg: RLArgs, device):
    """The frozen plain Llama that scores fluency in evaluations (--judge), or None."""
    if not cfg.judge or cfg.judge == "none":
        return None
    return cola.load(cfg.judge, "llama", "--judge", device).eval().requires_grad_(False)


if __name__ == "__main__":
    main()
