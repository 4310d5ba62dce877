"""qnet.py: the Q-network behind MCTS-Q and its offline training with Double DQN (PAPER.md §5); mcts.py searches
with it.

    Q(s_t, .) = Linear_{d->A}(h_t), h_t = Norm_f(Llama(x_{1:t})) at every position t: A = K = 64 latent actions
    (--level latent) or A = V tokens (--level token: the token baseline's twin). Trained offline on trajectories it
    samples itself from a policy checkpoint (prompt, sampled actions, greedy tokens, the checker's reward at the last
    action), with Double DQN:
        y_t = r_t + gamma Q_target(s_{t+1}, argmax_a Q(s_{t+1}, a)),   no bootstrap after the last action,
        L   = mean_t (Q(s_t, a_t) - sg(y_t))^2,   gamma 0.99,   Q_target <- Q every 50 updates (hard copy).

Run it (CPU, tiny preset; checkpoints from `python train.py --stage fta-i` / `--stage sft`):
    python qnet.py --init runs/fta-i/final --task countdown-2             # Q over latent actions -> runs/q-latent/final
    python qnet.py --level token --init runs/sft/final                    # the token twin -> runs/q-token/final
    python qnet.py --init DIR --data train.jsonl [--val-data test.jsonl]  # math problems from files, as rl.py
    python qnet.py --help                                                 # every flag
It writes a run directory like train.py's and rl.py's (config.json, metrics.jsonl, checkpoints/step-N/ with online
and target networks and AdamW, resumable by rerunning the same command; final/, the online Q-network), plus
trajectories.pt, the sampled data. One process (no torchrun).

Deviations from the paper / official code:
  - the Q trunk starts from the policy checkpoint's base Llama and the Q head from zeros (the paper does not say);
    tiny defaults (lr 1e-4, 8 trajectories per update, 64 prompts x 8 samples) are ours; paper at 8B: lr 5e-6,
    100 epochs, 8 responses per prompt; the target copy every 50 updates follows the release (paper: 100);
  - a rollout cut by --max-new-tokens is an episode end: its last action gets the checker's reward, no bootstrap;
  - tasks: Countdown (the tiny preset's countdown-2), or math problems from --data (MATH-style files, as rl.py reads
    them: the first --prompts of its step-0 order, held out --val-data or the val split of --data).
"""
from __future__ import annotations

import copy
import math
import pickle
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

import cola
import data
from infra import checkpoint, parallel
from infra.files import atomic_write
from infra.parallel import Root
from infra.trainer import (SEED, Run, arg, log_metrics, one_line_errors, parse_config, release_locks, trim_metrics,
                           writing)
from model import ModelArgs, Transformer, clip_new_tokens
from policy import sample_uniforms, seeded_sampler
import tasks
from tokenizer import Tokenizer

LEVELS = ("latent", "token")

# ----------------------------------------------------------------------------------------------------------------
# The Q-network: a Llama trunk and Linear(d -> A), Q(s_t, .) at every position


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
        tensors = {**checkpoint.meta_to_hf(self.trunk.state_dict(), self.trunk.args), "q_head.weight": self.head.weight}
        checkpoint.save_hf_checkpoint(path, checkpoint.hf_config(self.trunk.args, architectures=["CoLAQNetwork"],
                                                                 q_level=self.level, q_actions=self.n_actions),
                                      tensors, max_shard_bytes)

    @classmethod
    def from_pretrained(cls, path, device="cpu", flag: str = "--qnet") -> "QNetwork":
        """A qnet.py export (its final/), checked: every failure is one line naming `flag` and the path."""
        path = Path(path)
        kind = checkpoint.kind_of(path, flag)
        if kind != "qnet":
            raise SystemExit(f"{flag} {path} is {checkpoint.WHAT[kind]}, not a Q-network; train one with "
                             f"`python qnet.py` and pass its final/")
        config = checkpoint.read_json(path / "config.json")
        try:
            n_actions, level = int(config["q_actions"]), config["q_level"]
            if n_actions < 1 or level not in LEVELS:
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise SystemExit(f"{flag} {path / 'config.json'}: expected q_actions (an integer >= 1) and q_level "
                             f"({' or '.join(LEVELS)})") from None
        try:
            args, state, rest = checkpoint.load_llama_checkpoint(path, ModelArgs)
            q = cls(args, n_actions, level)
            checkpoint.load_base_state(q.trunk, state, str(path))
        except (ValueError, FileNotFoundError, KeyError) as e:
            msg = str(e).splitlines()[0]
            raise SystemExit(f"{flag} {msg}" if msg.startswith(str(path)) else f"{flag} {path}: {msg}") from None
        head = rest.get("q_head.weight")
        if head is None or tuple(head.shape) != (q.n_actions, args.dim):
            raise SystemExit(f"{flag} {path}: q_head.weight missing or not [{q.n_actions}, {args.dim}]")
        q.head.weight.data.copy_(head)
        return q.to(device).eval().requires_grad_(False)


class QPair(nn.Module):
    """What a qnet.py checkpoint holds: the online network Q and the target network Q_target (not trained)."""

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
    """Trajectories -> data.pack's x [B, L], mask [B, L-1], actions [B, L-1] (latent: a_t; token: x_{t+1}), and
    rewards [B, L-1]: the trajectory's reward at its last action, 0 elsewhere."""
    b = data.pack([r["prompt"] for r in rows], [{"tokens": r["tokens"], "actions": r["actions"]} for r in rows],
                  device)
    rewards = torch.zeros(b["mask"].shape, dtype=torch.float32)                         # [B, L-1]
    for i, r in enumerate(rows):
        rewards[i, len(r["prompt"]) + len(r["tokens"]) - 2] = r["reward"]                # the last action's step
    return {**b, "rewards": rewards.to(device)}


# ----------------------------------------------------------------------------------------------------------------
# Training: sample trajectories from a policy checkpoint, then Double DQN; a run directory like rl.py's


@dataclass
class QArgs:
    """Offline Double-DQN training of the Q-network on trajectories sampled from a policy (PAPER.md §5)."""
    level: str = arg("latent", "latent: Q over CoLA's K actions (--init a CoLA export); token: Q over the V tokens "
                               "(--init a plain Llama), the token baseline's twin")
    init: str = arg("", "policy checkpoint whose samples are the data; the Q trunk starts from its base Llama "
                        "(tiny default: runs/fta-i/final, token: runs/sft/final)")
    out_dir: str = arg("", "run directory (default runs/q-<level>)")
    task: str = arg("countdown-2", "countdown, arith, countdown-2 or countdown-3 (tasks.py)")
    data: str = arg("", "math problems (.jsonl: MATH, GSM8K or prompt/answer layout) instead of --task: training "
                        "prompts in rl.py's seeded order")
    val_data: str = arg("", "held-out math problems (.jsonl) (default: the val split of --data)")
    chat: bool = arg(False, "render prompts with the Llama-3.1 chat template (as rl.py --chat)")
    tokenizer: str = arg("", "tokenizer file (default: found in --init, else the embedded one)")
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
    seed: int = arg(0, "seed of the problems, the sampling noise and the batch order", SEED)
    resume: bool = arg(True, "continue from the newest checkpoint in --out-dir")
    stop_at: int = arg(0, "save a checkpoint and exit after this update; rerun to continue", ">= 0")


def parse_q_args(argv: list[str]) -> QArgs:
    cfg, given = parse_config(QArgs, argv, "qnet.py", {})
    for name, value, allowed in (("level", cfg.level, LEVELS), ("task", cfg.task, tasks.TASKS)):
        if value not in allowed:
            raise SystemExit(f"--{name} {value!r}: expected one of {', '.join(allowed)}")
    cfg.task = tasks.task_of(cfg, given)
    if cfg.val_data and not cfg.data:
        raise SystemExit("--val-data: the Q-network trains on --data's problems; pass --data too")
    if not cfg.init:
        cfg.init = "runs/fta-i/final" if cfg.level == "latent" else "runs/sft/final"
        if not Path(cfg.init).is_dir():
            raise SystemExit(f"--init: {cfg.init} does not exist; run `python train.py --stage "
                             f"{'fta-i' if cfg.level == 'latent' else 'sft'}` first, or pass --init DIR")
    cfg.out_dir = cfg.out_dir or f"runs/q-{cfg.level}"
    cfg.max_new_tokens = clip_new_tokens(cfg.max_new_tokens, cfg.init, "--init")
    return cfg


@torch.no_grad()
def collect(model, level: str, tok: Tokenizer, problems: list[tasks.Problem], samples: int, cfg: QArgs, stream: int,
            chunk: int = 32) -> list[dict]:
    """`samples` sampled responses per problem, each with its actions and the checker's reward. Sample i's noise is
    policy.sample_uniforms(seed, stream, i): the data do not depend on how rows are batched."""
    todo = [(p, data.encode_problem(tok, p, cfg.chat)) for p in problems for _ in range(samples)]
    rows = []
    device = next(model.parameters()).device
    for i in range(0, len(todo), chunk):
        part = todo[i:i + chunk]
        u = sample_uniforms(cfg.seed, stream, i, len(part), cfg.max_new_tokens).to(device)        # [n, N]
        choose = seeded_sampler(u, cfg.temperature, cfg.top_k if level == "latent" else None)
        for (problem, prompt), r in zip(part, data.rollout(model, tok, [p for _, p in part], choose,
                                                            cfg.max_new_tokens)):
            rows.append({"prompt": prompt, "tokens": r["tokens"], "actions": r.get("actions", r["tokens"]),
                         "reward": tasks.score(problem, r["text"])})
    return rows


DATA_KEYS = ("level", "init", "task", "data", "val_data", "chat", "tokenizer", "prompts", "samples", "val_prompts",
             "max_new_tokens", "top_k", "temperature", "seed")


def read_trajectories(f: Path) -> dict | None:
    """A saved trajectories.pt, or None, said in one line, when it is damaged (truncated, overwritten): the caller
    samples it again, and gets the same rows (each sample's noise is seeded), so a resumed run still trains on the
    data its checkpoints saw."""
    try:
        saved = torch.load(f, weights_only=False)
        if isinstance(saved, dict) and {"key", "train", "val"} <= saved.keys():
            return saved
        why = "not the trajectories qnet.py writes"
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
    print(f"{f}: damaged ({why}); sampling the same trajectories again")
    return None


def trajectories(run: Run, cfg: QArgs, tok: Tokenizer, device, sets=None) -> dict:
    """{"train": rows, "val": rows}, sampled once and kept in <run>/trajectories.pt (written atomically), so a
    resumed run trains on the very same data. sets: (training, held-out) problems of --data (None: --task)."""
    f = run.dir / "trajectories.pt"
    key = {k: getattr(cfg, k) for k in DATA_KEYS}
    if f.exists() and not f.is_file():         # not ours to delete; it would fail the write after the sampling
        raise SystemExit(f"{f}: not a file (a directory?), where qnet.py keeps its sampled trajectories; move it "
                         f"away, then rerun the same command")
    saved = read_trajectories(f) if f.exists() else None
    if saved is not None:
        if saved.get("key") == key:
            return saved
        print(f"{f}: sampled with other flags; sampling again")
    t0 = time.time()
    model = cola.load_level(cfg.init, cfg.level, "--init", device, tok=tok).eval().requires_grad_(False)
    if sets is None:
        train_p = tasks.problems_at(cfg.task, cfg.seed, 0, cfg.prompts)
        val_p = tasks.make_problems(cfg.task, cfg.val_prompts, cfg.seed, split="val", stream="rl")
    else:                                      # rl.py's order of --data (its step 0), the first held-out problems
        train_p, val_p = tasks.pool_at(sets[0], cfg.seed, 0, cfg.prompts), sets[1][:cfg.val_prompts]
    train = collect(model, cfg.level, tok, train_p, cfg.samples, cfg, stream=0)
    val = collect(model, cfg.level, tok, val_p, 1, cfg, stream=1)
    saved = {"key": key, "train": train, "val": val}
    with writing(f"{f}: could not save the trajectories"):
        atomic_write(f, lambda t: torch.save(saved, t))
    R = [r["reward"] for r in train]
    print(f"sampled {len(train)} + {len(val)} trajectories in {time.time() - t0:.0f} s: mean reward "
          f"{sum(R) / len(R):.3f}, success {sum(r == 1.0 for r in R) / len(R):.3f}, mean length "
          f"{sum(len(r['tokens']) for r in train) / len(train):.0f}")
    return saved


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
    sets = tasks.problem_sets(cfg.data, cfg.val_data) if cfg.task == "math" else None    # before any model loads
    world = parallel.World()
    tok = Tokenizer.find(cfg.init, cfg.tokenizer or None)
    policy_model = cola.load_level(cfg.init, cfg.level, "--init", "cpu", tok=tok).requires_grad_(False)
    run = Run(f"q-{cfg.level}", cfg, world, init=cfg.init)      # checked first: a refused run writes nothing
    device = run.device
    base = policy_model.base if cfg.level == "latent" else policy_model
    n_actions = policy_model.args.n_actions if cfg.level == "latent" else base.args.vocab_size
    pair = QPair(QNetwork.from_base(base, n_actions, cfg.level)).to(device)
    del policy_model, base
    opt = torch.optim.AdamW(pair.online.trained_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    root = Root(pair)
    run.start(root)
    trajs = trajectories(run, cfg, tok, device, sets)
    if not any(r["reward"] for r in trajs["train"]):
        print(f"warning: all {len(trajs['train'])} training trajectories score 0 on --task {cfg.task}: from the zero Q "
              f"head every TD target is 0, so Q learns nothing (TD loss 0 throughout) and MCTS-Q's TD test passes "
              f"everywhere. Start from a policy that solves or formats some problems, or an easier --task", flush=True)
    step = 0
    if run.latest is not None:
        saved = parallel.read_train_state(run.latest)
        parallel.load_checkpoint(run.latest, root, opt, world)
        step = saved["step"]
        trim_metrics(run.dir, step, last=cfg.steps)
        print(f"resuming {run.stage} from {run.latest} at update {step}")
    pair.target.eval()
    if step == 0:
        log_metrics(run.dir, {"eval": {"step": 0, **q_eval(pair, trajs["val"], cfg, device)}})
    bar = tqdm(total=cfg.steps, initial=step, desc=run.stage, dynamic_ncols=True)
    result = {}
    while step < cfg.steps:
        rows = [trajs["train"][i] for i in batch_indices(len(trajs["train"]), cfg.batch, cfg.seed, step)]
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
                result = {"step": step, **q_eval(pair, trajs["val"], cfg, device)}
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
    if not result:                                   # a rerun of a finished run: its final evaluation again
        with run.amp:
            result = {"step": step, **q_eval(pair, trajs["val"], cfg, device)}
    run.export(Root(pair.online), result)


def check_qnet(q: QNetwork, qpath: str, level: str, model, ckpt: str, flag: str = "--qnet",
               ckpt_flag: str = "--ckpt"):
    """A Q-network must score the actions the search takes: its level and action count must match the model's."""
    if q.level != level:
        what = {"token": f"token-level Q-network (Q over V = {q.n_actions} tokens)",
                "latent": f"latent Q-network (Q over K = {q.n_actions} actions)"}[q.level]
        need = {"latent": f"latent search (a CoLA {ckpt_flag}) needs a latent one (`python qnet.py --level latent`)",
                "token": f"token-level search (a plain Llama {ckpt_flag}) needs a token one "
                         "(`python qnet.py --level token`)"}[level]
        raise SystemExit(f"{flag} {qpath} is a {what}: {need}")
    n = model.args.n_actions if level == "latent" else model.args.vocab_size
    if q.n_actions != n:
        what = "latent actions K" if level == "latent" else "tokens V"
        raise SystemExit(f"{flag} {qpath}: Q-network over {q.n_actions} actions, but {ckpt_flag} {ckpt} has {what} = "
                         f"{n}")
    lm = model.base if level == "latent" else model
    if q.trunk.args.vocab_size != lm.args.vocab_size:
        raise SystemExit(f"{flag} {qpath}: its trunk reads {q.trunk.args.vocab_size} tokens, {ckpt_flag} {ckpt} "
                         f"{lm.args.vocab_size}: not the same tokenizer")


def main(argv=None):
    try:
        return one_line_errors(train_q, argv)
    finally:
        release_locks()                        # the run directory's lock, however the run ended (as train.py)


if __name__ == "__main__":
    main()
