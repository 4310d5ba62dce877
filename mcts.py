"""mcts.py: tree search over CoLA's latent actions (the paper's Algorithm 3), the Q-network behind MCTS-Q, the
token-level search baseline, and an evaluation of every method at matched compute (PAPER.md §5, results in §6).

What it implements, with the paper's symbols:
  Q-network   Q(s_t, .) = Linear_{d->A}(h_t), h_t = Norm_f(Llama(x_{1:t})) at every position t: A = K = 64 latent
              actions (--level latent) or A = V tokens (--level token: the token baseline's twin). Trained offline
              on trajectories that `train-q` samples itself from a policy checkpoint (prompt, sampled actions,
              greedy tokens, the checker's reward at the last action), with Double DQN:
                  y_t = r_t + gamma Q_target(s_{t+1}, argmax_a Q(s_{t+1}, a)),   no bootstrap after the last action,
                  L   = mean_t (Q(s_t, a_t) - sg(y_t))^2,   gamma 0.99,   Q_target <- Q every 50 updates (hard copy).
  MCTS        a node is a text prefix. Its children are the policy's top-b actions (b 5 at the root, 4 below), each
              followed by the world model's greedy token x = argmax p_WM(. | x_{1:t}, a). A new child's value is the
              reward R of a greedy CoLA rollout from it (argmax pi, argmax p_WM, to the end), scored by the checker.
              Backup: Q(n, c) = (R_c - R_n) + gamma V_c; V_n = sum_c N_c Q(n, c) / sum_c N_c; a leaf has V = R.
              Selection: PUCT score V_n + c p_n sqrt(N_parent) / (N_n + 1), c = 0.7, over all open nodes (below).
              N rounds, one new child each. Answer: the node (with its rollout) of highest reward, a terminal node
              first on ties: "the best terminal node, else the best rollout".
  MCTS-Q      when a new child's TD error (Q(s, a) - gamma max_a' Q(s', a'))^2 (s the parent's prefix, s' the
              child's; the reward inside an episode is 0) is below 0.01, the Q-function is trusted there and the
              child is extended by up to k = 64 tokens of plain (greedy) CoLA generation at once.
  token MCTS  the same search on a plain Llama: children are the LM's top-b tokens (prior = their probability),
              rollouts are greedy token decoding. With a token-level Q-network it becomes token MCTS-Q.
  best-of-N   N sampled rollouts (CoLA: a_t ~ pi, top-k 40, tau 1; tokens: the LM's softmax, tau 1), the best
              scored answer; and one greedy pass.
  Cost        every method counts the token positions it runs through each Llama trunk (the base of CoLA / the LM,
              and the Q-network's): `Cost.total`, the forward-token budget methods are matched on. CoLA also runs
              its policy blocks on every base position (`Cost.policy`) and the merge module + W_lm once per
              candidate action or generated token (`Cost.wm`): reported beside, not in the budget.
  Reuse       (on by default; --no-kv-reuse / --no-rollout-reuse measure what they save) a node keeps the K/V of
              its own tokens and its last state (h_t, pi logits; Q-values): the caches of a prefix are the
              concatenation of its path's pieces, so a new child runs one token, not its whole prefix. A greedy
              rollout depends only on the prefix, so a child whose token is the next token of its parent's
              rollout inherits the rest of that rollout, its reward and its K/V without running anything; MCTS-Q's
              greedy extension is the same rollout's next 64 tokens, also free.

Selection rule: the release's global best-first scan (every node that still has an untried candidate competes on
its own PUCT score) is the default; `--select descent` is the textbook root-to-leaf PUCT walk. Why best-first: a
descent fills every node on its path (b = 4-5 children) before it goes below it, so where pi spreads over several
tokens 64 rounds stay ~3 tokens deep; the global scan can keep extending the one deep prefix whose rollout scored
well, which is where Countdown's answer is written. It is also what the authors ran. (Measured, token MCTS on the
13 held-out countdown-2 problems at 1000 / 2000 / 4000 forward tokens: best-first 0.00 / 0.23 / 0.31, descent
0.08 / 0.15 / 0.15; docs/rl-and-search.md.)
A round is one expansion, free ones included: a child on its parent's greedy rollout costs no forward token once
rollouts are reused, so `eval` ends searches by forward-token budget, not by rounds.

Run it (CPU, tiny preset; checkpoints from `python train.py --stage fta-i` / `--stage sft`):
    python mcts.py train-q --init runs/fta-i/final --task countdown-2            # Q-network -> runs/q-latent/final
    python mcts.py train-q --level token --init runs/sft/final                   # the token twin -> runs/q-token
    python mcts.py search --ckpt runs/fta-i/final --task countdown-2 --n-rounds 64 --show-tree
    python mcts.py search --ckpt runs/fta-i/final --qnet runs/q-latent/final --task countdown-2   # MCTS-Q
    python mcts.py search --ckpt runs/sft/final --task countdown-2                # token-level MCTS
    python mcts.py eval --ckpt runs/fta-i/final --llama runs/sft/final --qnet runs/q-latent/final \\
        --task countdown-2 --problems 64 --budgets 1000,2000,4000 --seeds 0,1,2  # every method, matched budgets
    python mcts.py train-q --help                                                 # every flag (also search, eval)
    python -m pytest -q tests/test_mcts.py
train-q writes a run directory like train.py's and rl.py's (config.json, metrics.jsonl, checkpoints/step-N/ with
online and target networks and AdamW, resumable by rerunning the same command; final/, the online Q-network), plus
trajectories.pt, the sampled data. eval appends one row per (method, problem, seed) to <out-dir>/results.jsonl,
skips rows already there when rerun, and prints the table. One process (no torchrun).

Deviations from the paper / official code:
  - Tasks: Countdown (the tiny preset's countdown-2) instead of MATH-500; its checker needs no hidden answer, so the
    search may score rollouts with it, and every method stops once a completion scores 1.0 (--no-stop-at-success
    turns that off; it changes cost, not success);
  - children are deduplicated by token: two of the top-b actions whose greedy tokens coincide make one child (the
    same text prefix), whose prior is the sum of their probabilities and whose action is the more probable one;
    a node can then have fewer than b children; the prior p is pi's probability of the action(s);
  - MCTS-Q's extension is greedy CoLA generation (argmax pi), the node's own greedy rollout, so the search stays
    deterministic and the extension costs nothing when rollouts are reused; the paper says "plain generation";
  - the Q trunk starts from the policy checkpoint's base Llama and the Q head from zeros (the paper does not say);
    tiny defaults (lr 1e-4, 8 trajectories per update, 64 prompts x 8 samples) are ours; paper at 8B: lr 5e-6,
    100 epochs, 8 responses per prompt; the target copy every 50 updates follows the release (paper: 100);
  - a rollout cut by --max-new-tokens is an episode end: its last action gets the checker's reward, no bootstrap;
  - eval scores each distinct held-out prompt once (countdown-2's val split holds only 13 distinct problems; the
    first 64 draws of the stream cover them) and runs the deterministic methods (greedy, the searches) once: the
    seeds only change best-of-N's samples.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn

from infra import parallel
import rl
import tasks
from infra.checkpoint import (atomic_write, hf_config, load_base_state, load_llama_checkpoint, meta_to_hf,
                        save_hf_checkpoint)
from cola import CoLA
from model import ModelArgs, Transformer
from infra.parallel import Root
from policy import seeded_sampler
from tokenizer import Tokenizer
from infra.trainer import Run, append_row, arg, log_metrics, parse_config, trim_metrics, writing

LEVELS = ("latent", "token")
SELECTS = ("best-first", "descent")

# ----------------------------------------------------------------------------------------------------------------
# The Q-network: a Llama trunk and Linear(d -> A), Q(s_t, .) at every position (PAPER.md §5)


class QNetwork(nn.Module):
    """Q(s_t, .): tokens [B, T] -> [B, T, A]; position t holds the values of the actions that produce x_{t+1}."""

    def __init__(self, args: ModelArgs, n_actions: int, level: str):
        super().__init__()
        self.level, self.n_actions = level, n_actions
        self.init_args = (args, n_actions, level)
        self.trunk = Transformer(args)                       # its Norm_f output is the state; its W_lm is unused
        self.head = nn.Linear(args.dim, n_actions, bias=False)                           # d -> A

    def forward(self, tokens: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        return self.head(self.trunk.hidden(tokens, start_pos))                           # [B, T, D] -> [B, T, A]

    def trained_parameters(self) -> list[nn.Parameter]:
        """Everything Q(s, .) depends on: all but the trunk's unused W_lm (unless tied to the embeddings). The
        optimizer holds only these, so a checkpoint's AdamW state covers exactly its parameters."""
        unused = set() if self.trunk.args.tie_embeddings else {id(self.trunk.output.weight)}
        return [p for p in self.parameters() if id(p) not in unused]

    @classmethod
    def from_base(cls, base: Transformer, n_actions: int, level: str) -> "QNetwork":
        """The trunk copied from a Llama (the policy checkpoint's base), the head at zero: Q = 0 everywhere."""
        q = cls(base.args, n_actions, level).to(base.tok_embeddings.weight.device)
        q.trunk.load_state_dict(base.state_dict())
        nn.init.zeros_(q.head.weight)
        return q

    def save_pretrained(self, path, max_shard_bytes: int = 5 * 2**30):
        """The trunk in the HF Llama layout, plus q_head.weight; config.json says q_level and q_actions."""
        tensors = {**meta_to_hf(self.trunk.state_dict(), self.trunk.args), "q_head.weight": self.head.weight}
        save_hf_checkpoint(path, hf_config(self.trunk.args, architectures=["CoLAQNetwork"], q_level=self.level,
                                           q_actions=self.n_actions), tensors, max_shard_bytes)

    @classmethod
    def from_pretrained(cls, path, device="cpu") -> "QNetwork":
        path = Path(path)
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError):
            raise SystemExit(f"--qnet {path}: no readable config.json (a Q-network is the final/ of `python mcts.py "
                             f"train-q`)") from None
        if "q_level" not in config:
            raise SystemExit(f"--qnet {path} is not a Q-network (no q_level in its config.json); train one with "
                             f"`python mcts.py train-q`")
        args, state, rest = load_llama_checkpoint(path)
        q = cls(args, int(config["q_actions"]), config["q_level"])
        load_base_state(q.trunk, state, str(path))
        head = rest.get("q_head.weight")
        if head is None or tuple(head.shape) != (q.n_actions, args.dim):
            raise SystemExit(f"--qnet {path}: q_head.weight missing or not [{q.n_actions}, {args.dim}]")
        q.head.weight.data.copy_(head)
        return q.to(device).eval().requires_grad_(False)


class QPair(nn.Module):
    """What a train-q checkpoint holds: the online network Q and the target network Q_target (not trained)."""

    def __init__(self, online: QNetwork):
        super().__init__()
        self.online = online
        self.target = copy.deepcopy(online).requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------------
# Double DQN, written as the equations


def double_dqn_targets(q_online: torch.Tensor, q_target: torch.Tensor, rewards: torch.Tensor, valid: torch.Tensor,
                       gamma: float) -> torch.Tensor:
    """Eq: y_t = r_t + gamma Q_target(s_{t+1}, argmax_a Q(s_{t+1}, a)) [valid_{t+1}].

    q_online, q_target [B, T, A] at states s_t (position t); rewards [B, T] r_t (the checker's reward at the last
    action, else 0); valid [B, T] True where an action is taken at s_t. After the last action of a response,
    valid_{t+1} is False: a terminal step, y_t = r_t. -> y [B, T] (no gradient)."""
    q_online, q_target = q_online.detach().float(), q_target.detach().float()
    a_star = q_online[:, 1:].argmax(-1)                                                  # [B, T-1] argmax_a Q(s_{t+1})
    boot = q_target[:, 1:].gather(-1, a_star[..., None])[..., 0]                         # [B, T-1] Q_target(s_{t+1}, a*)
    boot = torch.cat([boot, boot.new_zeros(boot.shape[0], 1)], 1)                       # [B, T] nothing after T
    next_valid = torch.cat([valid[:, 1:], valid.new_zeros(valid.shape[0], 1)], 1)       # [B, T] valid_{t+1}
    return rewards.float() + gamma * boot * next_valid.float()                          # [B, T]


def td_loss(online: QNetwork, target: QNetwork, b: dict, gamma: float) -> tuple[torch.Tensor, dict]:
    """Eq: L = mean over taken actions of (Q(s_t, a_t) - y_t)^2. b: q_batch()'s x [B, L], mask, actions, rewards."""
    x, m = b["x"], b["mask"]
    q = online(x[:, :-1]).float()                                                        # [B, L-1, A]
    with torch.no_grad():
        q_tgt = target(x[:, :-1]).float()                                                # [B, L-1, A]
    y = double_dqn_targets(q, q_tgt, b["rewards"], m, gamma)                             # [B, L-1]
    q_taken = q.gather(-1, b["actions"].clamp(min=0)[..., None])[..., 0]                # [B, L-1] Q(s_t, a_t)
    loss = ((q_taken - y) ** 2)[m].mean()
    return loss, {"q_taken": q_taken[m].mean().item(), "y": y[m].mean().item()}


def copy_target(pair: QPair, updates: int, every: int) -> bool:
    """The hard copy Q_target <- Q after every `every`-th update (and at update 0, where they are equal already)."""
    if updates % every:
        return False
    pair.target.load_state_dict(pair.online.state_dict())
    return True


def q_update(pair: QPair, opt, b: dict, cfg, step: int) -> dict:
    """Update number step + 1: the TD loss on batch b, one AdamW step on Q (clipped), then Q_target <- Q if the
    schedule says so (cfg: gamma, grad_clip, target_every)."""
    pair.online.train()
    loss, stats = td_loss(pair.online, pair.target, b, cfg.gamma)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(pair.online.trained_parameters(), cfg.grad_clip).item()
    opt.step()
    copied = copy_target(pair, step + 1, cfg.target_every)
    return {"td_loss": loss.item(), **stats, "grad_norm": gnorm, "target_copied": copied}


def q_batch(rows: list[dict], device) -> dict:
    """Trajectories -> rl.pack's x [B, L], mask [B, L-1], actions [B, L-1] (latent: a_t; token: x_{t+1}), and
    rewards [B, L-1]: the trajectory's reward at its last action, 0 elsewhere."""
    b = rl.pack([r["prompt"] for r in rows], [{"tokens": r["tokens"], "actions": r["actions"]} for r in rows],
                device)
    rewards = torch.zeros(b["mask"].shape, dtype=torch.float32)                         # [B, L-1]
    for i, r in enumerate(rows):
        rewards[i, len(r["prompt"]) + len(r["tokens"]) - 2] = r["reward"]                # the last action's step
    return {**b, "rewards": rewards.to(device)}


# ----------------------------------------------------------------------------------------------------------------
# train-q: sample trajectories from a policy checkpoint, then Double DQN; a run directory like rl.py's


@dataclass
class QArgs:
    """Offline Double-DQN training of the Q-network on trajectories sampled from a policy (PAPER.md §5)."""
    level: str = arg("latent", "latent: Q over CoLA's K actions (--init a CoLA export); token: Q over the V tokens "
                               "(--init a plain Llama), the token baseline's twin")
    init: str = arg("", "policy checkpoint whose samples are the data; the Q trunk starts from its base Llama "
                        "(tiny default: runs/fta-i/final, token: runs/sft/final)")
    out_dir: str = arg("", "run directory (default runs/q-<level>)")
    task: str = arg("countdown-2", "countdown, arith, countdown-2 or countdown-3 (tasks.py)")
    tokenizer: str = arg("", "tokenizer file (default: found in --init, else the embedded byte tokenizer)")
    prompts: int = arg(64, "training prompts (train split of the rl stream)", ">= 1")
    samples: int = arg(8, "sampled responses per prompt (paper: 8)", ">= 1")
    val_prompts: int = arg(16, "held-out prompts (val split), one sample each: held-out TD loss, Q against the return",
                           ">= 1")
    max_new_tokens: int = arg(160, "longest response, tokens", ">= 1")
    top_k: int = arg(40, "latent: actions sampled from pi's top-k (paper: 40); tokens: the full softmax", ">= 1")
    temperature: float = arg(1.0, "sampling temperature (paper: 1)", "> 0")
    steps: int = arg(300, "Q updates", ">= 1")
    batch: int = arg(8, "trajectories per update", ">= 1")
    lr: float = arg(1e-4, "AdamW learning rate (paper at 8B: 5e-6)", "> 0")
    weight_decay: float = arg(0.0, "AdamW weight decay", ">= 0")
    grad_clip: float = arg(1.0, "max gradient norm", "> 0")
    gamma: float = arg(0.99, "discount gamma (paper: 0.99)", "> 0, <= 1")
    target_every: int = arg(50, "updates between hard copies Q_target <- Q (release: 50; paper: 100)", ">= 1")
    eval_every: int = arg(50, "updates between held-out evaluations", ">= 1")
    ckpt_every: int = arg(50, "updates between resumable checkpoints", ">= 1")
    log_every: int = arg(1, "updates between metrics.jsonl rows", ">= 1")
    dtype: str = arg("auto", "auto (bfloat16 where the device computes it natively, else float32), float32 or "
                             "bfloat16 (autocast)")
    device: str = arg("", "cpu or cuda (default: cuda if available)")
    seed: int = arg(0, "seed of the problems, the sampling noise and the batch order", ">= 0")
    resume: bool = arg(True, "continue from the newest checkpoint in --out-dir")
    stop_at: int = arg(0, "save a checkpoint and exit after this update; rerun to continue", ">= 0")


def parse_q_args(argv: list[str]) -> QArgs:
    cfg, _ = parse_config(QArgs, argv, "mcts.py train-q", {})
    for name, value, allowed in (("level", cfg.level, LEVELS), ("task", cfg.task, tasks.TASKS)):
        if value not in allowed:
            raise SystemExit(f"--{name} {value!r}: expected one of {', '.join(allowed)}")
    if not cfg.init:
        cfg.init = "runs/fta-i/final" if cfg.level == "latent" else "runs/sft/final"
        if not Path(cfg.init).is_dir():
            raise SystemExit(f"--init: {cfg.init} does not exist; run `python train.py --stage "
                             f"{'fta-i' if cfg.level == 'latent' else 'sft'}` first, or pass --init DIR")
    cfg.out_dir = cfg.out_dir or f"runs/q-{cfg.level}"
    return cfg


def load_policy(path: str, level: str, device):
    """The checkpoint a level runs on, checked: a CoLA export (latent) or a plain Llama (token)."""
    p = Path(path)
    try:
        is_cola = "num_code" in json.loads((p / "config.json").read_text())
    except (OSError, ValueError):
        raise SystemExit(f"{path}: no readable config.json (expected one of our exports or an HF checkpoint)") from None
    if "q_level" in json.loads((p / "config.json").read_text()):
        raise SystemExit(f"{path} is a Q-network, not a model to generate with (pass it as --qnet)")
    if level == "latent" and not is_cola:
        raise SystemExit(f"{path} is a plain Llama: latent actions need a CoLA checkpoint (fta-i, fta-p or bc "
                         f"export); use --level token for a plain Llama")
    if level == "token" and is_cola:
        raise SystemExit(f"{path} is a CoLA checkpoint: --level token needs a plain Llama (e.g. the sft export)")
    model = (CoLA if is_cola else Transformer).from_pretrained(p, device=device)
    return model.eval().requires_grad_(False)


def level_of(path: str) -> str:
    """latent for a CoLA checkpoint, token for a plain Llama (what `search --ckpt` runs)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        raise SystemExit(f"--ckpt {path}: no readable config.json (a CoLA export or a plain Llama)") from None
    return "latent" if "num_code" in config else "token"


@torch.no_grad()
def collect(model, level: str, tok: Tokenizer, problems: list[tasks.Problem], samples: int, cfg: QArgs, stream: int,
            chunk: int = 32) -> list[dict]:
    """`samples` sampled responses per problem, each with its actions and the checker's reward. Sample i's noise is
    rl.row_uniforms(seed, stream, i): the data do not depend on how rows are batched."""
    gen = SimpleNamespace(max_new_tokens=cfg.max_new_tokens, level=level)
    todo = [(p, tok.encode(p.prompt, bos=True, eos=False)) for p in problems for _ in range(samples)]
    rows = []
    device = next(model.parameters()).device
    for i in range(0, len(todo), chunk):
        part = todo[i:i + chunk]
        u = rl.row_uniforms(cfg.seed, stream, i, len(part), cfg.max_new_tokens).to(device)       # [n, N]
        choose = seeded_sampler(u, cfg.temperature, cfg.top_k if level == "latent" else None)
        for (problem, prompt), r in zip(part, rl.rollout(model, gen, tok, [p for _, p in part], choose)):
            rows.append({"prompt": prompt, "tokens": r["tokens"], "actions": r.get("actions", r["tokens"]),
                         "reward": rl.score(problem, r["text"], tasks.reward)})
    return rows


DATA_KEYS = ("level", "init", "task", "tokenizer", "prompts", "samples", "val_prompts", "max_new_tokens", "top_k",
             "temperature", "seed")


def trajectories(run: Run, cfg: QArgs, tok: Tokenizer, device) -> dict:
    """{"train": rows, "val": rows}, sampled once and kept in <run>/trajectories.pt (written atomically), so a
    resumed run trains on the very same data."""
    f = run.dir / "trajectories.pt"
    key = {k: getattr(cfg, k) for k in DATA_KEYS}
    if f.exists():
        saved = torch.load(f, weights_only=False)
        if saved.get("key") == key:
            return saved
        print(f"{f}: sampled with other flags; sampling again")
    t0 = time.time()
    model = load_policy(cfg.init, cfg.level, device)
    train = collect(model, cfg.level, tok, rl.problems_at(SimpleNamespace(task=cfg.task, seed=cfg.seed), 0,
                                                          cfg.prompts), cfg.samples, cfg, stream=0)
    val = collect(model, cfg.level, tok, tasks.make_problems(cfg.task, cfg.val_prompts, cfg.seed, split="val",
                                                             stream="rl"), 1, cfg, stream=1)
    data = {"key": key, "train": train, "val": val}
    with writing(f"{f}: could not save the trajectories"):
        atomic_write(f, lambda t: torch.save(data, t))
    R = [r["reward"] for r in train]
    print(f"sampled {len(train)} + {len(val)} trajectories in {time.time() - t0:.0f} s: mean reward "
          f"{sum(R) / len(R):.3f}, success {sum(r == 1.0 for r in R) / len(R):.3f}, mean length "
          f"{sum(len(r['tokens']) for r in train) / len(train):.0f}")
    return data


def batch_indices(n: int, batch: int, seed: int, step: int) -> list[int]:
    """The trajectories of update `step`: epoch e = step // ceil(n / batch) reads a permutation seeded by (seed, e).
    A function of the step alone, so a resumed run sees the same batches."""
    per_epoch = math.ceil(n / batch)
    epoch, i = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)[i * batch:(i + 1) * batch].tolist()


@torch.no_grad()
def q_eval(pair: QPair, rows: list[dict], cfg: QArgs, device) -> dict:
    """Held-out TD loss (against the current target network), and Q(s_0, a_0) of the first action against its
    Monte Carlo return gamma^(T-1) R: offline Q-learning overestimates what it has not seen."""
    loss_sum, n_pos, q0, mc0 = 0.0, 0, [], []
    for i in range(0, len(rows), cfg.batch):
        part = rows[i:i + cfg.batch]
        b = q_batch(part, device)
        loss, _ = td_loss(pair.online, pair.target, b, cfg.gamma)
        k = int(b["mask"].sum())
        loss_sum, n_pos = loss_sum + loss.item() * k, n_pos + k
        q = pair.online(b["x"][:, :-1]).float()                                          # [B, L-1, A]
        for j, r in enumerate(part):
            t0 = len(r["prompt"]) - 1                                                    # the first action's step
            q0.append(q[j, t0, r["actions"][0]].item())
            mc0.append(cfg.gamma ** (len(r["tokens"]) - 1) * r["reward"])
    return {"val_td_loss": loss_sum / max(n_pos, 1), "val_q0": sum(q0) / len(q0), "val_return0": sum(mc0) / len(mc0),
            "val_q0_abs_err": sum(abs(a - b) for a, b in zip(q0, mc0)) / len(q0)}


def train_q(argv: list[str]):
    cfg = parse_q_args(argv)
    world = parallel.World()
    run = Run(f"q-{cfg.level}", cfg, world)
    device = run.device
    tok = Tokenizer.find(cfg.init, cfg.tokenizer or None)
    policy_model = load_policy(cfg.init, cfg.level, torch.device("cpu"))
    base = policy_model.base if cfg.level == "latent" else policy_model
    n_actions = policy_model.args.n_actions if cfg.level == "latent" else base.args.vocab_size
    pair = QPair(QNetwork.from_base(base, n_actions, cfg.level)).to(device)
    del policy_model, base
    opt = torch.optim.AdamW(pair.online.trained_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    root = Root(pair)
    run.start(root)
    data = trajectories(run, cfg, tok, device)
    if not any(r["reward"] for r in data["train"]):
        print(f"warning: all {len(data['train'])} training trajectories score 0 on --task {cfg.task}: from the zero Q "
              f"head every TD target is 0, so Q learns nothing (TD loss 0 throughout) and MCTS-Q's TD test passes "
              f"everywhere. Start from a policy that solves or formats some problems, or an easier --task", flush=True)
    step = 0
    if run.latest is not None:
        saved = parallel.read_train_state(run.latest)
        parallel.load_checkpoint(run.latest, root, opt, world)
        step = saved["step"]
        trim_metrics(run.dir, step)
        print(f"resuming {run.stage} from {run.latest} at update {step}")
    pair.target.eval()
    if step == 0:
        log_metrics(run.dir, {"eval": {"step": 0, **q_eval(pair, data["val"], cfg, device)}})
    from tqdm import tqdm
    bar = tqdm(total=cfg.steps, initial=step, desc=run.stage, dynamic_ncols=True)
    result = {}
    while step < cfg.steps:
        rows = [data["train"][i] for i in batch_indices(len(data["train"]), cfg.batch, cfg.seed, step)]
        with run.amp:
            m = q_update(pair, opt, q_batch(rows, device), cfg, step)
        step += 1
        if not math.isfinite(m["td_loss"]):
            raise SystemExit(f"update {step}: TD loss is {m['td_loss']}; lower --lr (last intact checkpoint: "
                             f"{run.good or 'none'})")
        bar.update(1)
        bar.set_postfix(td=f"{m['td_loss']:.4f}")
        if step % cfg.log_every == 0:
            log_metrics(run.dir, {"step": step, **m})
        if step % cfg.eval_every == 0 or step == cfg.steps:
            with run.amp:
                result = {"step": step, **q_eval(pair, data["val"], cfg, device)}
            if step < cfg.steps:
                log_metrics(run.dir, {"eval": result})
        if step % cfg.ckpt_every == 0 or step == cfg.steps or step == cfg.stop_at:
            with writing(f"{run.dir}/checkpoints: could not save update {step}"):
                run.good = parallel.save_checkpoint(run.dir, root, opt, {
                    "stage": run.stage, "step": step, "phase": 0, "loader": {}, "config": asdict(cfg)}, world)
        if step == cfg.stop_at and step < cfg.steps:
            print(f"stopped after update {step} (--stop-at); rerun the same command to continue")
            return
    bar.close()
    run.export(Root(pair.online), result)


# ----------------------------------------------------------------------------------------------------------------
# Search machinery: the models a search runs, their KV caches, and the cost counter


@dataclass
class Cost:
    """What a method ran. base + q is the budgeted count of forward tokens; policy and wm are reported beside."""
    base: int = 0      # token positions through the base Llama (CoLA) or the LM (token level)
    policy: int = 0    # positions through pi's blocks (CoLA: every base position)
    wm: int = 0        # rows through the merge module + W_lm (CoLA: one per candidate action / generated token)
    q: int = 0         # positions through the Q-network's Llama trunk (MCTS-Q)

    @property
    def total(self) -> int:
        return self.base + self.q


class Engine:
    """The model a method runs (CoLA or a plain Llama, optionally a Q-network), with KV caches for `rows` rows of
    max_len positions, and the cost counter. Two stacks of caches: "lm" (the base's blocks, and pi's for CoLA) and
    "q" (the Q trunk's). Every forward goes through run() / run_q(), which count what they run."""

    def __init__(self, model, level: str, qnet: QNetwork | None = None):
        self.model, self.level, self.qnet = model, level, qnet
        self.lm = model.base if level == "latent" else model
        self.max_len = self.lm.args.max_seq_len
        self.cost, self.rows = Cost(), 0
        self.loaded = {"lm": None, "q": None}          # the node whose path the caches hold now

    # -- caches ------------------------------------------------------------------------------------------------
    def setup(self, rows: int):
        w = self.lm.tok_embeddings.weight
        self.lm.setup_cache(rows, self.max_len)
        if self.level == "latent":
            self.model.policy.setup_cache(rows, self.max_len, self.model.codebook.weight.dtype, w.device)
        if self.qnet is not None:
            self.qnet.trunk.setup_cache(rows, self.max_len)
        self.rows, self.loaded = rows, {"lm": None, "q": None}

    def clear(self):
        self.lm.clear_cache()
        if self.level == "latent":
            self.model.policy.clear_cache()
        if self.qnet is not None:
            self.qnet.trunk.clear_cache()
        self.rows = 0

    def blocks(self, stack: str) -> list:
        if stack == "q":
            return list(self.qnet.trunk.layers)
        return list(self.lm.layers) + (list(self.model.policy.layers) if self.level == "latent" else [])

    def save_kv(self, stack: str, p0: int, p1: int, row: int = 0) -> list:
        """[(k, v)] per block of the stack, positions p0..p1-1 of one row: each [1, Hkv, p1-p0, Dh] (a copy)."""
        return [(b.attention.cache.k[row:row + 1, :, p0:p1].clone(), b.attention.cache.v[row:row + 1, :, p0:p1].clone())
                for b in self.blocks(stack)]

    def load_kv(self, stack: str, kv: list, p0: int):
        """Write [(k, v)] per block ([1, Hkv, n, Dh]) at positions p0.. of every row."""
        for b, (k, v) in zip(self.blocks(stack), kv):
            b.attention.cache.k[:self.rows, :, p0:p0 + k.shape[2]] = k
            b.attention.cache.v[:self.rows, :, p0:p0 + v.shape[2]] = v

    def keep_rows(self, idx: torch.Tensor, length: int):
        """Batched sampling: keep only rows idx (in that order) of the lm caches' first `length` positions."""
        for b in self.blocks("lm"):
            c = b.attention.cache
            c.k[:len(idx), :, :length] = c.k[idx, :, :length]
            c.v[:len(idx), :, :length] = c.v[idx, :, :length]

    # -- forward passes, counted ---------------------------------------------------------------------------------
    def run(self, tokens: torch.Tensor, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, T] at positions pos.. -> (h [B, D], logits [B, A]) at the last position: pi's logits over K
        actions (CoLA) or the LM's over V tokens."""
        B, T = tokens.shape
        self.cost.base += B * T
        h = self.lm.hidden(tokens, pos)                                                  # [B, T, D]
        if self.level == "latent":
            self.cost.policy += B * T
            return h[:, -1], self.model.policy_logits(h, pos)[:, -1].float()            # [B, D], [B, K]
        return h[:, -1], self.lm.output(h[:, -1]).float()                                # [B, D], [B, V]

    def run_q(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        """tokens [B, T] at positions pos.. -> Q(s, .) [B, A] at the last position."""
        self.cost.q += tokens.numel()
        return self.qnet(tokens, pos)[:, -1].float()                                     # [B, A]

    def next_token(self, h: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
        """x_{t+1} for each row: CoLA's greedy world-model token argmax p_WM(. | h_t, a_t); a token is itself.
        h [B, D], choice [B] -> [B]."""
        if self.level != "latent":
            return choice
        self.cost.wm += choice.shape[0]
        return self.model.world_logits_last(h, choice).float().argmax(-1)               # [B]


# ----------------------------------------------------------------------------------------------------------------
# The tree


@dataclass(eq=False)
class Node:
    """A text prefix: its parent's prefix + seg (the root's seg is the prompt). Statistics of Algorithm 3 and the
    caches that let a search reuse what it has run."""
    seg: list[int]                       # tokens this node adds (1; more after an MCTS-Q extension; root: the prompt)
    parent: "Node | None" = None
    action: int = -1                     # the latent action (or token) that made it
    prior: float = 1.0                   # p: pi's (or the LM's) probability of that step
    pos0: int = 0                        # position of seg[0]
    index: int = 0                       # creation order (ties go to the older node)
    children: list = field(default_factory=list)
    cands: list | None = None            # [(token, action, prior)]: the top-b candidates, best first
    N: int = 0                           # visits: 1 + the nodes below
    V: float = 0.0                       # value (backup below)
    R: float = 0.0                       # reward of its greedy rollout (of itself when terminal)
    terminal: bool = False
    extended: int = 0                    # MCTS-Q: tokens the extension added to seg
    td: float | None = None              # MCTS-Q: (Q(s, a) - gamma max Q(s', .))^2 when tested
    tail: list[int] = field(default_factory=list)   # the greedy rollout's tokens after the prefix
    # caches: per stack ("lm", "q"), K/V of seg[:covered] and the output at the last position once covered = len(seg)
    kv: dict = field(default_factory=dict)           # stack -> [(k [1, Hkv, covered, Dh], v)] per block
    out: dict = field(default_factory=dict)          # "lm" -> (h [D], logits [A]); "q" -> Q [A]
    tail_kv: list | None = None          # K/V of tail[:-1] per block (rollout reuse)
    tail_out: tuple | None = None        # (h [L-1, D], logits [L-1, A]) after each of tail[:-1]

    @property
    def pos1(self) -> int:
        return self.pos0 + len(self.seg)

    @property
    def full(self) -> bool:
        return self.cands is not None and len(self.children) >= len(self.cands)

    def path(self) -> list["Node"]:
        n, out = self, []
        while n is not None:
            out.append(n)
            n = n.parent
        return out[::-1]

    def response(self) -> list[int]:
        """The tokens after the prompt, up to this node (the root's seg is the prompt)."""
        return [t for n in self.path()[1:] for t in n.seg]


def puct(n: Node, c: float) -> float:
    """Eq: V_n + c p_n sqrt(N_parent) / (N_n + 1) (the root: p = 1, N_parent = its own N)."""
    parent_N = n.parent.N if n.parent is not None else n.N
    return n.V + c * n.prior * math.sqrt(parent_N) / (n.N + 1)


def edge_value(n: Node, c: Node, gamma: float) -> float:
    """Eq: Q(n, c) = (R_c - R_n) + gamma V_c."""
    return (c.R - n.R) + gamma * c.V


def backup(leaf: Node, gamma: float):
    """A new leaf: N = 1, V = R. Every ancestor: N += 1 and V_n = sum_c N_c Q(n, c) / sum_c N_c."""
    leaf.N, leaf.V = 1, leaf.R
    n = leaf.parent
    while n is not None:
        n.N += 1
        n.V = sum(c.N * edge_value(n, c, gamma) for c in n.children) / sum(c.N for c in n.children)
        n = n.parent


def exhausted(n: Node) -> bool:
    """Nothing left to expand below n: every node under it is terminal or full. Iterative: a latent tree is often one
    long chain (thousands of nodes at --max-new-tokens ~1000), deeper than Python's recursion limit."""
    stack = [n]
    while stack:
        m = stack.pop()
        if m.terminal:
            continue
        if not m.full:
            return False
        stack.extend(m.children)
    return True


def select_best_first(nodes: list[Node], c: float) -> Node | None:
    """The release's rule: of all open nodes (not terminal, an untried candidate left), the best PUCT score."""
    open_ = [n for n in nodes if not n.terminal and not n.full]
    return max(open_, key=lambda n: (puct(n, c), -n.index)) if open_ else None


def select_descent(root: Node, c: float) -> Node | None:
    """Root-to-leaf PUCT: from the root, the best-scoring child with something left below, until an open node."""
    n = root
    while not exhausted(n):
        if not n.full:
            return n
        n = max((k for k in n.children if not exhausted(k)), key=lambda k: (puct(k, c), -k.index))
    return None


def td_error(q_sa: float, q_next_max: float, gamma: float) -> float:
    """Eq: delta = (Q(s, a) - gamma max_a' Q(s', a'))^2, the reward inside an episode being 0."""
    return (q_sa - gamma * q_next_max) ** 2


def td_consistent(q_sa: float, q_next_max: float, gamma: float, threshold: float = 0.01) -> bool:
    """MCTS-Q's test: trust Q here (and extend the node by k tokens) when delta < threshold."""
    return td_error(q_sa, q_next_max, gamma) < threshold


@dataclass
class SearchArgs:
    """MCTS over latent actions (Algorithm 3), MCTS-Q with --qnet, token-level MCTS on a plain Llama --ckpt."""
    ckpt: str = arg("", "CoLA checkpoint (latent search) or a plain Llama (token-level search)")
    qnet: str = arg("", "a train-q export of the same level: MCTS becomes MCTS-Q")
    task: str = arg("countdown-2", "countdown, arith, countdown-2 or countdown-3 (tasks.py)")
    problem: str = arg("", "a problem as JSON with tasks.Problem's fields (kind, prompt, answer, meta); default: "
                           "held-out problem --index")
    index: int = arg(0, "which held-out problem (val split of the rl stream of --seed)", ">= 0")
    n_rounds: int = arg(64, "N, rounds (one new child each; paper: 64)", ">= 1")
    budget: int = arg(0, "also stop once this many forward tokens are spent (0: no limit)", ">= 0")
    b_root: int = arg(5, "b at the root: children per node (release: larger at the root)", ">= 1")
    b: int = arg(4, "b below the root", ">= 1")
    c_puct: float = arg(0.7, "c of PUCT (paper: 0.7)", ">= 0")
    gamma: float = arg(0.99, "gamma of the backup and of the TD test (paper: 0.99)", "> 0, <= 1")
    td_threshold: float = arg(0.01, "MCTS-Q: extend a node when its TD error is below this (paper: 0.01)", "> 0")
    extend_tokens: int = arg(64, "k, MCTS-Q: tokens of plain generation a trusted node is extended by (paper: 64)",
                             ">= 1")
    select: str = arg("best-first", "best-first (the release: global scan of every open node) or descent "
                                    "(root-to-leaf PUCT)")
    max_new_tokens: int = arg(160, "longest response, tokens", ">= 1")
    stop_at_success: bool = arg(True, "stop once a completion scores 1.0 (the checker's full reward)")
    kv_reuse: bool = arg(True, "keep each node's K/V and last state (off: every node reruns its whole prefix)")
    rollout_reuse: bool = arg(True, "a child on its parent's greedy rollout inherits the rest of it")
    show_tree: bool = arg(False, "print the tree: actions, tokens, visits, values, rewards")
    tokenizer: str = arg("", "tokenizer file (default: found in --ckpt, else the embedded byte tokenizer)")
    device: str = arg("", "cpu or cuda (default: cuda if available)")
    seed: int = arg(0, "seed of the held-out problems", ">= 0")


@dataclass
class Answer:
    node: Node
    tokens: list[int]                    # the whole response: node.response() + node.tail
    text: str
    reward: float


class Search:
    """One tree for one problem (Algorithm 3). run() -> Answer; .nodes, .trace [(cost so far, R)] per evaluated node
    (anytime: the answer within a budget B is the best R with cost <= B), .stats."""

    def __init__(self, engine: Engine, tok: Tokenizer, problem: tasks.Problem, prompt: list[int], cfg: SearchArgs):
        self.e, self.tok, self.problem, self.cfg = engine, tok, problem, cfg
        self.stops = set(tok.stop_tokens)
        self.limit = min(len(prompt) + cfg.max_new_tokens, engine.max_len)
        self.root = Node(seg=list(prompt))
        self.nodes = [self.root]
        self.trace: list[tuple[int, float]] = []
        self.stats = {"rounds": 0, "rollouts": 0, "inherited": 0, "td_tests": 0, "td_fired": 0, "extended_tokens": 0}

    # -- the loop ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, n_rounds: int | None = None, budget: int | None = None) -> Answer:
        n_rounds = self.cfg.n_rounds if n_rounds is None else n_rounds
        budget = budget if budget is not None else (self.cfg.budget or None)
        self.e.setup(1)
        try:
            self.evaluate(self.root)
            backup(self.root, self.cfg.gamma)
            self.trace.append((self.e.cost.total, self.root.R))
            for _ in range(n_rounds):
                if self.done(budget):
                    break
                n = (select_best_first(self.nodes, self.cfg.c_puct) if self.cfg.select == "best-first"
                     else select_descent(self.root, self.cfg.c_puct))
                if n is None:
                    self.stats["stopped"] = "exhausted"      # every node is terminal or has all its children
                    break
                c = self.expand(n)
                self.evaluate(c)
                self.td_test(c)
                backup(c, self.cfg.gamma)
                self.stats["rounds"] += 1
                self.trace.append((self.e.cost.total, c.R))
            else:                                            # the rounds ran out, unless the last one ended it anyway
                if not self.done(budget):
                    self.stats["stopped"] = "rounds"
        finally:
            self.e.clear()
        return self.answer()

    def done(self, budget: int | None) -> bool:
        """Whether the budget is spent or (--stop-at-success) a completion scored 1.0; records which in stats."""
        if budget is not None and self.e.cost.total >= budget:
            self.stats["stopped"] = "budget"
        elif self.cfg.stop_at_success and max(r for _, r in self.trace) >= 1.0:
            self.stats["stopped"] = "success"
        else:
            return False
        return True

    def answer(self) -> Answer:
        """The best terminal node, else the best rollout: highest R, terminal first, then the older node."""
        best = max(self.nodes, key=lambda n: (n.R, n.terminal, -n.index))
        tokens = best.response() + best.tail
        return Answer(best, tokens, self.text(tokens), best.R)

    def text(self, tokens: list[int]) -> str:
        return self.tok.decode([t for t in tokens if t not in self.stops])

    # -- expansion -----------------------------------------------------------------------------------------------
    def candidates(self, n: Node) -> list[tuple[int, int, float]]:
        """The top-b actions of pi at n, each with the world model's greedy token; actions whose tokens coincide
        make one candidate (prior summed). Token level: the LM's top-b tokens."""
        h, logits = self.state(n)                                                        # [D], [A]
        p = logits.softmax(-1)                                                           # [A]
        b = self.cfg.b_root if n.parent is None else self.cfg.b
        top = p.topk(min(b, p.shape[0]))                                                 # [b]
        toks = self.e.next_token(h[None].expand(len(top.indices), -1), top.indices).tolist()   # [b]
        merged: dict[int, list] = {}
        for t, a, q in zip(toks, top.indices.tolist(), top.values.tolist()):
            if t in merged:
                merged[t][1] += q
            else:
                merged[t] = [a, q]
        return sorted(((t, a, q) for t, (a, q) in merged.items()), key=lambda x: -x[2])

    def expand(self, n: Node) -> Node:
        """n's next untried candidate as a new child."""
        if n.cands is None:
            n.cands = self.candidates(n)
        t, a, q = n.cands[len(n.children)]
        c = Node(seg=[t], parent=n, action=a, prior=q, pos0=n.pos1, index=len(self.nodes))
        c.terminal = t in self.stops or c.pos1 >= self.limit
        n.children.append(c)
        self.nodes.append(c)
        return c

    # -- evaluation: the greedy rollout's reward -----------------------------------------------------------------
    def reward(self, tokens: list[int]) -> float:
        return rl.score(self.problem, self.text(tokens), tasks.reward)

    def evaluate(self, c: Node):
        """R_c: the node's own text when terminal; else its greedy rollout, inherited from the parent's when the
        node lies on it (greedy decoding depends only on the prefix), else run."""
        if c.terminal:
            c.R, c.tail = self.reward(c.response()), []
            return
        p, m = c.parent, len(c.seg)
        if self.cfg.rollout_reuse and p is not None and len(p.tail) > m and p.tail[:m] == c.seg:
            self.inherit(c, p.tail, p.tail_kv, p.tail_out, m)
            c.R = p.R
            self.stats["inherited"] += 1
            return
        self.prepare(c)
        h, logits = c.out["lm"]
        tail, hs, ls = [], [], []
        while True:
            x = int(self.e.next_token(h[None], logits.argmax(-1)[None])[0])             # greedy a_t, then x_{t+1}
            tail.append(x)
            if x in self.stops or c.pos1 + len(tail) >= self.limit:
                break
            h, logits = self.e.run(torch.tensor([[x]], device=h.device), c.pos1 + len(tail) - 1)
            h, logits = h[0], logits[0]
            hs.append(h)
            ls.append(logits)
        c.tail = tail
        if self.cfg.kv_reuse and self.cfg.rollout_reuse and hs:
            c.tail_kv = self.e.save_kv("lm", c.pos1, c.pos1 + len(hs))
            c.tail_out = (torch.stack(hs), torch.stack(ls))                              # [L-1, D], [L-1, A]
        c.R = self.reward(c.response() + tail)
        self.stats["rollouts"] += 1

    def inherit(self, c: Node, tail: list[int], tail_kv, tail_out, m: int, append: bool = False):
        """c's seg (or, append: its last m added tokens) = tail[:m]: take the rest of the rollout, and when the
        rollout kept its K/V and states, c's own caches as views of them (nothing is run)."""
        c.tail = tail[m:]
        if tail_kv is None or not self.cfg.kv_reuse:
            c.tail_kv = c.tail_out = None
            if not append:
                c.kv.pop("lm", None)
            c.out.pop("lm", None)
            return
        seg_kv = [(k[:, :, :m], v[:, :, :m]) for k, v in tail_kv]
        if append:                                   # MCTS-Q's extension: the segment grows by the rollout's tokens
            have = c.kv.get("lm")
            if have is None or have[0][0].shape[2] != len(c.seg) - m:
                c.kv.pop("lm", None)
                c.out.pop("lm", None)
                seg_kv = None
            else:
                seg_kv = [(torch.cat([k0, k], 2), torch.cat([v0, v], 2)) for (k0, v0), (k, v) in zip(have, seg_kv)]
        if seg_kv is not None:
            c.kv["lm"] = seg_kv
            c.out["lm"] = (tail_out[0][m - 1], tail_out[1][m - 1])
        c.tail_kv = [(k[:, :, m:], v[:, :, m:]) for k, v in tail_kv]
        c.tail_out = (tail_out[0][m:], tail_out[1][m:])

    # -- states and caches ---------------------------------------------------------------------------------------
    def state(self, n: Node, stack: str = "lm"):
        """The output at n's last position (lm: (h [D], logits [A]); q: Q [A]), computed if not cached."""
        if stack not in n.out:
            self.ensure(n, stack)
        return n.out[stack]

    def ensure(self, n: Node, stack: str):
        """Compute n's output for the stack. kv_reuse: the parent's path from the caches, then only n's own tokens
        not run yet; else the whole prefix from position 0. Either way the caches then hold n's path."""
        run = self.e.run if stack == "lm" else self.e.run_q
        dev = self.e.lm.tok_embeddings.weight.device
        if not self.cfg.kv_reuse:
            tokens = [t for m in n.path() for t in m.seg]
            n.out[stack] = self.squeeze(run(torch.tensor([tokens], device=dev), 0))
            self.e.loaded[stack] = n
            return
        have = n.kv.get(stack)
        done = 0 if have is None else have[0][0].shape[2]
        if done >= len(n.seg):                       # K/V complete but no output kept: rerun the last token
            done = len(n.seg) - 1
            have = [(k[:, :, :done], v[:, :, :done]) for k, v in have] if done else None
        if n.parent is not None:
            self.ensure_path(n.parent, stack)
        if done:
            self.e.load_kv(stack, have, n.pos0)
        n.out[stack] = self.squeeze(run(torch.tensor([n.seg[done:]], device=dev), n.pos0 + done))
        new = self.e.save_kv(stack, n.pos0 + done, n.pos1)
        n.kv[stack] = new if have is None else [(torch.cat([k0, k], 2), torch.cat([v0, v], 2))
                                                for (k0, v0), (k, v) in zip(have, new)]
        self.e.loaded[stack] = n

    @staticmethod
    def squeeze(out):
        return (out[0][0], out[1][0]) if isinstance(out, tuple) else out[0]

    def ensure_path(self, n: Node, stack: str):
        """The caches hold n's whole path (every node on it computed first)."""
        if self.e.loaded[stack] is n:
            return
        for m in n.path():
            if stack not in m.out or m.kv.get(stack) is None or m.kv[stack][0][0].shape[2] != len(m.seg):
                self.ensure(m, stack)
        for m in n.path():
            self.e.load_kv(stack, m.kv[stack], m.pos0)
        self.e.loaded[stack] = n

    def prepare(self, c: Node):
        """The caches hold c's prefix and c's output is known: what a rollout from c starts from."""
        if self.cfg.kv_reuse:
            if "lm" not in c.out:
                self.ensure(c, "lm")
            self.ensure_path(c, "lm")
        else:
            self.ensure(c, "lm")                     # the whole prefix, from position 0

    # -- MCTS-Q --------------------------------------------------------------------------------------------------
    def td_test(self, c: Node):
        """MCTS-Q: delta = (Q(s, a) - gamma max Q(s', .))^2 for the new child; delta < threshold: extend it by up
        to k tokens of its greedy rollout (a terminal node when the rollout ends within them)."""
        if self.e.qnet is None or c.terminal:
            return
        q_s = self.state(c.parent, "q")                                                  # [A] Q(s, .)
        q_next = self.state(c, "q")                                                      # [A] Q(s', .)
        c.td = td_error(q_s[c.action].item(), q_next.max().item(), self.cfg.gamma)
        self.stats["td_tests"] += 1
        if c.td >= self.cfg.td_threshold:
            return
        self.stats["td_fired"] += 1
        k = min(self.cfg.extend_tokens, len(c.tail))
        tail, tail_kv, tail_out = c.tail, c.tail_kv, c.tail_out
        c.seg = c.seg + tail[:k]
        c.extended = k
        self.stats["extended_tokens"] += k
        c.out.pop("q", None)                         # its Q-values were for the shorter prefix
        if k == len(tail):                           # the rollout ends inside the extension: a terminal node
            c.terminal, c.tail, c.tail_kv, c.tail_out = True, [], None, None
            c.kv.pop("lm", None)
            c.out.pop("lm", None)
            return
        c.terminal = c.pos1 >= self.limit
        self.inherit(c, tail, tail_kv, tail_out, k, append=True)
        if self.e.loaded["lm"] is c:
            self.e.loaded["lm"] = None

    # -- printing ------------------------------------------------------------------------------------------------
    def show(self, max_chars: int = 60) -> str:
        """The tree as text: per node its action, its tokens, N, V, R, the prior and its rollout's start."""
        lines, stack = [], [(self.root, 0)]
        while stack:                                 # depth first, children in order (iterative, as exhausted)
            n, depth = stack.pop()
            pad = "  " * depth
            if n.parent is None:
                head = f"root ({len(n.seg)} prompt tokens)"
            else:
                what = f"a={n.action}" if self.e.level == "latent" else "token"
                head = f"{what} p={n.prior:.2f} {self.text(n.seg)!r}"
                if n.extended:
                    head += f" (MCTS-Q: +{n.extended} tokens, td {n.td:.4f})"
                elif n.td is not None:
                    head += f" (td {n.td:.4f})"
            end = "terminal" if n.terminal else f"rollout {self.text(n.tail)[:max_chars]!r}"
            lines.append(f"{pad}#{n.index} {head}  N={n.N} V={n.V:.3f} R={n.R:.2f}  {end}")
            stack.extend((k, depth + 1) for k in reversed(n.children))
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Baselines: one greedy pass, best-of-N samples


@torch.no_grad()
def best_of_n(engine: Engine, tok: Tokenizer, problem: tasks.Problem, prompt: list[int], budget: int, seed: int,
              max_new_tokens: int, top_k: int | None, temperature: float = 1.0, wave: int = 8,
              stop_at_success: bool = True, max_samples: int = 10_000) -> dict:
    """Sampled rollouts until `budget` forward tokens are spent: the prompt runs once, its K/V is copied into every
    row of a wave, finished rows leave the batch (so what is counted is what runs). Sample i draws its noise from
    rl.row_uniforms(seed, 0, i): the samples do not depend on the wave size. -> {trace [(cost, R)] in sample order
    (cost = the prompt + the decode positions of samples 0..i), best (tokens, R), samples (how many), tokens (each
    sample's)}."""
    stops = set(tok.stop_tokens)
    dev = engine.lm.tok_embeddings.weight.device
    limit = min(len(prompt) + max_new_tokens, engine.max_len)
    engine.setup(wave)
    trace, best, i, samples = [], None, 0, []
    try:
        engine.rows = 1
        h0, logits0 = engine.run(torch.tensor([prompt], device=dev), 0)                 # [1, D], [1, A]
        prompt_kv, spent = engine.save_kv("lm", 0, len(prompt)), engine.cost.total
        while spent < budget and i < max_samples:
            B = wave
            engine.rows = B
            engine.load_kv("lm", prompt_kv, 0)
            u = rl.row_uniforms(seed, 0, i, B, max_new_tokens).to(dev)                  # [B, N]
            live = torch.arange(B, device=dev)                                           # rows still generating
            h, logits = h0.expand(B, -1), logits0.expand(B, -1)                          # [B, D], [B, A]
            outs, fed = [[] for _ in range(B)], [0] * B
            for n in range(limit - len(prompt)):
                choice = seeded_sampler(u[live], temperature, top_k)(logits, torch.full_like(live, n))   # [b]
                x = engine.next_token(h, choice)                                         # [b]
                keep = []
                for j, (r, t) in enumerate(zip(live.tolist(), x.tolist())):
                    outs[r].append(t)
                    if t not in stops and len(prompt) + n + 1 < limit:
                        keep.append(j)
                if not keep:
                    break
                keep_t = torch.tensor(keep, device=dev)
                if len(keep) < len(live):
                    engine.keep_rows(keep_t, len(prompt) + n)
                    live, x = live[keep_t], x[keep_t]
                engine.rows = len(live)
                for r in live.tolist():
                    fed[r] += 1
                h, logits = engine.run(x[:, None], len(prompt) + n)                      # [b, D], [b, A]
            for r in range(B):
                spent = spent + fed[r]
                R = rl.score(problem, tok.decode([t for t in outs[r] if t not in stops]), tasks.reward)
                trace.append((spent, R))
                samples.append(outs[r])
                if best is None or R > best[1]:
                    best = (outs[r], R)
            i += B
            if stop_at_success and best[1] >= 1.0:
                break
    finally:
        engine.clear()
    return {"trace": trace, "best": best, "samples": i, "tokens": samples}


# ----------------------------------------------------------------------------------------------------------------
# search: one problem, printed


def parse_search_args(argv: list[str]) -> SearchArgs:
    cfg, _ = parse_config(SearchArgs, argv, "mcts.py search", {})
    for name, value, allowed in (("task", cfg.task, tasks.TASKS), ("select", cfg.select, SELECTS)):
        if value not in allowed:
            raise SystemExit(f"--{name} {value!r}: expected one of {', '.join(allowed)}")
    if not cfg.ckpt:
        raise SystemExit("--ckpt: required (a CoLA export for latent search, a plain Llama for token search)")
    if not Path(cfg.ckpt).is_dir():
        raise SystemExit(f"--ckpt {cfg.ckpt}: directory not found")
    return cfg


def check_qnet(q: QNetwork, qpath: str, level: str, model, ckpt: str):
    """A Q-network must score the actions the search takes: its level and action count must match the model's."""
    if q.level != level:
        what = {"token": f"token-level Q-network (Q over V = {q.n_actions} tokens)",
                "latent": f"latent Q-network (Q over K = {q.n_actions} actions)"}[q.level]
        need = {"latent": "latent search (a CoLA --ckpt) needs a latent one (`mcts.py train-q --level latent`)",
                "token": "token-level search (a plain Llama --ckpt) needs a token one (`mcts.py train-q --level "
                         "token`)"}[level]
        raise SystemExit(f"--qnet {qpath} is a {what}: {need}")
    n = model.args.n_actions if level == "latent" else model.args.vocab_size
    if q.n_actions != n:
        what = "latent actions K" if level == "latent" else "tokens V"
        raise SystemExit(f"--qnet {qpath}: Q-network over {q.n_actions} actions, but --ckpt {ckpt} has {what} = {n}")
    lm = model.base if level == "latent" else model
    if q.trunk.args.vocab_size != lm.args.vocab_size:
        raise SystemExit(f"--qnet {qpath}: its trunk reads {q.trunk.args.vocab_size} tokens, --ckpt {ckpt} "
                         f"{lm.args.vocab_size}: not the same tokenizer")


def load_problem(cfg) -> tasks.Problem:
    if not cfg.problem:
        return tasks.make_problems(cfg.task, cfg.index + 1, cfg.seed, split="val", stream="rl")[cfg.index]
    try:
        d = json.loads(cfg.problem)
        p = tasks.Problem.from_dict(d)
    except (ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"--problem: not a JSON problem with kind, prompt, answer (and meta): {e}") from None
    if p.kind not in tasks.KINDS:
        raise SystemExit(f"--problem: kind {p.kind!r} is not one of {', '.join(tasks.KINDS)}")
    return p


def encode_prompt(tok: Tokenizer, problem: tasks.Problem, context: int, ckpt: str) -> list[int]:
    prompt = tok.encode(problem.prompt, bos=True, eos=False)
    if len(prompt) >= context:
        raise SystemExit(f"prompt of {len(prompt)} tokens leaves no room in the context of {context} tokens of "
                         f"--ckpt {ckpt}; shorten it")
    return prompt


def search_main(argv: list[str]):
    cfg = parse_search_args(argv)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    level = level_of(cfg.ckpt)
    tok = Tokenizer.find(cfg.ckpt, cfg.tokenizer or None)
    problem = load_problem(cfg)
    model = load_policy(cfg.ckpt, level, device)
    qnet = None
    if cfg.qnet:
        qnet = QNetwork.from_pretrained(cfg.qnet, device)
        check_qnet(qnet, cfg.qnet, level, model, cfg.ckpt)
    engine = Engine(model, level, qnet)
    prompt = encode_prompt(tok, problem, engine.max_len, cfg.ckpt)
    t0 = time.time()
    search = Search(engine, tok, problem, prompt, cfg)
    ans = search.run()
    wall = time.time() - t0
    name = {"latent": "MCTS-Q" if qnet else "MCTS (latent actions)", "token": "token MCTS-Q" if qnet else
            "token-level MCTS"}[level]
    print(problem.prompt.rstrip())
    if cfg.show_tree:
        print(search.show())
    c = engine.cost
    print(f"{name}: {search.stats['rounds']} rounds, {len(search.nodes)} nodes, forward tokens {c.total} "
          f"(base {c.base}, Q {c.q}; policy positions {c.policy}, world-model rows {c.wm}), {wall:.1f} s; "
          f"rollouts run {search.stats['rollouts']}, inherited {search.stats['inherited']}"
          + (f"; TD tests {search.stats['td_tests']}, fired {search.stats['td_fired']}" if qnet else ""))
    print({"rounds": f"stopped after --n-rounds {cfg.n_rounds}", "budget": f"stopped at --budget {cfg.budget}",
           "success": "stopped at a completion scoring 1.0 (--stop-at-success)",
           "exhausted": f"tree exhausted after {search.stats['rounds']} of --n-rounds {cfg.n_rounds}: every node is "
                        f"terminal or has all its b children"}[search.stats["stopped"]])
    print(f"answer (node #{ans.node.index}{', terminal' if ans.node.terminal else ', with its rollout'}), reward "
          f"{ans.reward}:\n{ans.text}")
    return search, ans


# ----------------------------------------------------------------------------------------------------------------
# eval: every method on held-out problems at matched forward-token budgets


@dataclass
class EvalArgs:
    """Every method on held-out problems at matched forward-token budgets (one row per method, problem, seed)."""
    ckpt: str = arg("", "CoLA checkpoint: greedy, bon, mcts, mcts-q (tiny default: runs/fta-i/final)")
    llama: str = arg("", "plain Llama: token-greedy, token-bon, token-mcts, token-mcts-q (tiny default: "
                         "runs/sft/final)")
    qnet: str = arg("", "latent Q-network for mcts-q (tiny default: runs/q-latent/final)")
    token_qnet: str = arg("", "token-level Q-network for token-mcts-q (optional)")
    out_dir: str = arg("runs/mcts-eval", "results.jsonl (appended; rows already there are skipped) and config.json")
    task: str = arg("countdown-2", "countdown, arith, countdown-2 or countdown-3")
    problems: int = arg(16, "held-out problems drawn (val split of the rl stream of --problem-seed, as rl.py's "
                            "evaluation draws them); a prompt drawn twice is evaluated once", ">= 1")
    problem_seed: int = arg(0, "seed of the held-out problems", ">= 0")
    seeds: str = arg("0,1,2", "sampling seeds of bon / token-bon (the other methods are deterministic)")
    budgets: str = arg("1000,4000", "forward-token budgets, comma-separated; each method runs to the largest and is "
                                    "read at every one (the methods are anytime)")
    methods: str = arg("greedy,bon,mcts,mcts-q,token-greedy,token-bon,token-mcts", "comma-separated")
    n_rounds: int = arg(100_000, "cap on search rounds (the budget normally ends a search first)", ">= 1")
    b_root: int = arg(5, "search: b at the root", ">= 1")
    b: int = arg(4, "search: b below the root", ">= 1")
    c_puct: float = arg(0.7, "search: c of PUCT", ">= 0")
    gamma: float = arg(0.99, "search: gamma", "> 0, <= 1")
    td_threshold: float = arg(0.01, "MCTS-Q: TD threshold", "> 0")
    extend_tokens: int = arg(64, "MCTS-Q: k", ">= 1")
    select: str = arg("best-first", "search: best-first or descent")
    max_new_tokens: int = arg(160, "longest response, tokens", ">= 1")
    top_k: int = arg(40, "bon: CoLA samples actions from pi's top-k (tokens: the full softmax)", ">= 1")
    stop_at_success: bool = arg(True, "stop a method once a completion scores 1.0")
    kv_reuse: bool = arg(True, "search: reuse each node's K/V")
    rollout_reuse: bool = arg(True, "search: inherit rollouts")
    tokenizer: str = arg("", "tokenizer file")
    device: str = arg("", "cpu or cuda")


METHODS = ("greedy", "bon", "mcts", "mcts-q", "token-greedy", "token-bon", "token-mcts", "token-mcts-q")


def run_method(method: str, engines: dict, tok: Tokenizer, problem: tasks.Problem, cfg: EvalArgs, budget: int,
               seed: int) -> dict:
    """One method on one problem up to `budget` forward tokens -> a results row (trace, cost, stats)."""
    level = "token" if method.startswith("token-") else "latent"
    kind = method.removeprefix("token-")
    engine = engines[(level, kind == "mcts-q")]
    engine.cost = Cost()
    prompt = encode_prompt(tok, problem, engine.max_len, cfg.llama if level == "token" else cfg.ckpt)
    t0 = time.time()
    stats = {}
    if kind == "bon":
        out = best_of_n(engine, tok, problem, prompt, budget, seed, cfg.max_new_tokens,
                        cfg.top_k if level == "latent" else None, stop_at_success=cfg.stop_at_success)
        trace, stats = out["trace"], {"samples": out["samples"]}
    else:
        scfg = SearchArgs(**{f.name: getattr(cfg, f.name) for f in fields(SearchArgs) if hasattr(cfg, f.name)
                             and f.name not in ("ckpt", "qnet", "problem", "index", "budget", "seed")})
        search = Search(engine, tok, problem, prompt, scfg)
        search.run(n_rounds=0 if kind == "greedy" else cfg.n_rounds, budget=budget)
        trace, stats = search.trace, {**search.stats, "nodes": len(search.nodes)}
    c = engine.cost
    return {"method": method, "problem": problem.prompt, "seed": seed, "trace": trace, "spent": c.total,
            "base": c.base, "q": c.q, "policy": c.policy, "wm": c.wm, "wall_s": round(time.time() - t0, 3), **stats}


def success_at(trace: list, budget: int) -> bool:
    """Solved within the budget: some completion run with cost <= budget scored 1.0 (the answer is the best one)."""
    return any(r >= 1.0 for cost, r in trace if cost <= budget)


def table(rows: list[dict], budgets: list[int], methods: list[str]) -> str:
    """Markdown: success per method and budget (mean over problems and seeds), mean forward tokens spent."""
    head = "| method | seeds | " + " | ".join(f"success @ {b}" for b in budgets) + \
           " | forward tokens spent (mean, to the largest budget) | policy pos. / WM rows / Q tokens (mean) |"
    lines = [head, "|" + "---|" * (len(budgets) + 4)]
    for m in methods:
        rs = [r for r in rows if r["method"] == m]
        if not rs:
            continue
        seeds = sorted({r["seed"] for r in rs})
        cells = []
        for b in budgets:
            per_seed = [sum(success_at(r["trace"], b) for r in rs if r["seed"] == s) /
                        sum(1 for r in rs if r["seed"] == s) for s in seeds]
            mean = sum(per_seed) / len(per_seed)
            spread = f" ({min(per_seed):.3f}-{max(per_seed):.3f})" if len(seeds) > 1 else ""
            cells.append(f"{mean:.3f}{spread}")
        mean = lambda k: sum(r[k] for r in rs) / len(rs)                                # noqa: E731
        lines.append(f"| {m} | {len(seeds)} | " + " | ".join(cells) + f" | {mean('spent'):.0f} | "
                     f"{mean('policy'):.0f} / {mean('wm'):.0f} / {mean('q'):.0f} |")
    return "\n".join(lines)


def eval_main(argv: list[str]):
    cfg, _ = parse_config(EvalArgs, argv, "mcts.py eval", {})
    if cfg.task not in tasks.TASKS:
        raise SystemExit(f"--task {cfg.task!r}: expected one of {', '.join(tasks.TASKS)}")
    if cfg.select not in SELECTS:
        raise SystemExit(f"--select {cfg.select!r}: expected one of {', '.join(SELECTS)}")
    try:
        budgets = sorted({int(b) for b in cfg.budgets.split(",")})
        seeds = [int(s) for s in cfg.seeds.split(",")]
    except ValueError:
        raise SystemExit(f"--budgets {cfg.budgets!r} / --seeds {cfg.seeds!r}: comma-separated integers") from None
    if not budgets or budgets[0] < 1:
        raise SystemExit(f"--budgets {cfg.budgets!r}: expected positive integers")
    methods = [m for m in cfg.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"--methods: {bad[0]!r} is not one of {', '.join(METHODS)}")
    cfg.ckpt = cfg.ckpt or ("runs/fta-i/final" if any(not m.startswith("token-") for m in methods) else "")
    cfg.llama = cfg.llama or ("runs/sft/final" if any(m.startswith("token-") for m in methods) else "")
    if "mcts-q" in methods and not cfg.qnet:
        cfg.qnet = "runs/q-latent/final"
    if "token-mcts-q" in methods and not cfg.token_qnet:
        raise SystemExit("--methods token-mcts-q needs --token-qnet (`python mcts.py train-q --level token`)")
    for flag, path in (("--ckpt", cfg.ckpt), ("--llama", cfg.llama), ("--qnet", cfg.qnet if "mcts-q" in methods
                                                                       else ""), ("--token-qnet", cfg.token_qnet)):
        if path and not Path(path).is_dir():
            raise SystemExit(f"{flag} {path}: directory not found")
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # what the rows of every method depend on (a row of mcts-q also records its --qnet)
    key = {k: v for k, v in asdict(cfg).items() if k not in ("methods", "seeds", "problems", "qnet", "token_qnet",
                                                             "out_dir", "device")}
    if (out / "config.json").exists():
        old = json.loads((out / "config.json").read_text())
        diff = [k for k in key if old.get(k) != key[k]]
        if diff:
            raise SystemExit(f"{out}/config.json: written with --{diff[0].replace('_', '-')} {old.get(diff[0])!r}, "
                             f"this run has {key[diff[0]]!r}: use another --out-dir")
    atomic_write(out / "config.json", lambda t: t.write_text(json.dumps(key, indent=2)))
    # A row is reused only when everything that determines it is the same: the flags (config.json above) and the
    # contents of the checkpoints its method runs (a new --qnet, or a model replaced at the same path, reruns it).
    # Digests are taken before the models are loaded; files' own hashes are cached in digests.json.
    uses = {m: [cfg.llama if m.startswith("token-") else cfg.ckpt] + ([cfg.qnet] if m == "mcts-q" else [])
            + ([cfg.token_qnet] if m == "token-mcts-q" else []) for m in methods}
    cache = read_json_or_empty(out / "digests.json")
    digests = {path: digest(path, cache) for path in {p for paths in uses.values() for p in paths}}
    atomic_write(out / "digests.json", lambda t: t.write_text(json.dumps(cache, indent=1)))
    models = {m: [digests[path] for path in paths] for m, paths in uses.items()}
    tok = Tokenizer.find(cfg.ckpt or cfg.llama, cfg.tokenizer or None)
    engines = {}
    if any(not m.startswith("token-") for m in methods):
        cola = load_policy(cfg.ckpt, "latent", device)
        engines[("latent", False)] = Engine(cola, "latent")
        if "mcts-q" in methods:
            q = QNetwork.from_pretrained(cfg.qnet, device)
            check_qnet(q, cfg.qnet, "latent", cola, cfg.ckpt)
            engines[("latent", True)] = Engine(cola, "latent", q)
    if any(m.startswith("token-") for m in methods):
        lm = load_policy(cfg.llama, "token", device)
        engines[("token", False)] = Engine(lm, "token")
        if "token-mcts-q" in methods:
            q = QNetwork.from_pretrained(cfg.token_qnet, device)
            check_qnet(q, cfg.token_qnet, "token", lm, cfg.llama)
            engines[("token", True)] = Engine(lm, "token", q)
    problems = held_out(cfg.task, cfg.problems, cfg.problem_seed)
    f = out / "results.jsonl"
    rows = read_rows(f)
    row_key = lambda r: (r["method"], r["problem"], r["seed"], tuple(r.get("models", ())))      # noqa: E731
    done = {row_key(r) for r in rows}
    for m in methods:
        for s in (seeds if m.endswith("bon") else seeds[:1]):
            for i, p in enumerate(problems):
                if (m, p.prompt, s, tuple(models[m])) in done:
                    continue
                row = {**run_method(m, engines, tok, p, cfg, budgets[-1], s), "models": models[m]}
                if m.endswith("mcts-q"):
                    row["qnet"] = cfg.qnet if m == "mcts-q" else cfg.token_qnet
                append_row(f, row)
                rows.append(row)
                done.add(row_key(row))
                print(f"{m} seed {s} problem {i + 1}/{len(problems)}: best {max(r for _, r in row['trace']):.2f}, "
                      f"{row['spent']} tokens, {row['wall_s']:.1f} s", flush=True)
    prompts = {p.prompt for p in problems}
    first = {}
    for r in rows:                                   # one row per (method, problem, seed): the first one written
        if r["method"] in methods and r["problem"] in prompts and r["seed"] in seeds and \
                r.get("models") == models[r["method"]]:
            first.setdefault((r["method"], r["problem"], r["seed"]), r)
    text = table(list(first.values()), budgets, methods)
    print(f"{len(problems)} held-out problems ({cfg.task}, distinct prompts)")
    print(text)
    return rows, text


def held_out(task: str, n: int, seed: int) -> list[tasks.Problem]:
    """The first n held-out problems (rl.py's evaluation draws the same ones), each distinct prompt once. The
    val split is 5% of the prompts: countdown-2 has about 250 distinct problems, 13 of them held out."""
    out, seen = [], set()
    for p in tasks.make_problems(task, n, seed, split="val", stream="rl"):
        if p.prompt not in seen:
            seen.add(p.prompt)
            out.append(p)
    return out


def digest(path: str, cache: dict) -> str:
    """sha256 over a checkpoint directory's file names and contents (symlinked folders followed once): which model
    a row ran. Each file's own sha256 is kept in `cache` under (real path, size, mtime, inode), so a checkpoint that
    did not change is not read again (at 8B a model is ~16 GB)."""
    root, files, seen = Path(path), [], set()
    for d, dirs, names in os.walk(root, followlinks=True):
        real = os.path.realpath(d)
        if real in seen:                         # a link back up the tree: each folder once
            dirs[:] = []
            continue
        seen.add(real)
        files += [Path(d) / n for n in names]
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.relative_to(root).as_posix()):
        st = f.stat()
        key = f"{os.path.realpath(f)}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
        if key not in cache:
            fh = hashlib.sha256()
            with open(f, "rb") as r:
                for chunk in iter(lambda: r.read(1 << 24), b""):
                    fh.update(chunk)
            cache[key] = fh.hexdigest()
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + cache[key].encode())
    return h.hexdigest()[:16]


def read_json_or_empty(f: Path) -> dict:
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError):
        return {}                                # absent or half-written: recomputed


def read_rows(f: Path) -> list[dict]:
    """results.jsonl's rows; a half-written last line (a killed run) is dropped."""
    if not f.exists():
        return []
    rows = []
    for line in f.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Command line


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = {"train-q": train_q, "search": search_main, "eval": eval_main}
    if not argv or argv[0] not in commands:
        raise SystemExit(f"usage: python mcts.py {{{','.join(commands)}}} [flags]; `python mcts.py COMMAND --help` "
                         f"lists the flags")
    try:
        return commands[argv[0]](argv[1:])
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


if __name__ == "__main__":
    main()
