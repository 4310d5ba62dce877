"""search_eval.py: every search method of PAPER.md §5 on held-out problems at matched budgets (the
paper's comparison of latent search with token search, in miniature; results in docs/rl-and-search.md).

Methods: greedy (one greedy pass), bon (best-of-N sampled rollouts: CoLA a_t ~ pi, top-k 40, tau 1), mcts, mcts-q
(mcts.py over latent actions, with qnet.py's Q-network for MCTS-Q), and their token-level twins on a plain Llama
(token-greedy, token-bon: the LM's softmax at tau 1, token-mcts, token-mcts-q). Every method counts what it runs
(infra/treecache.Cost) and is read at every budget: the answer within a budget B is the best-scored completion run
with cost <= B. Two tables read the same runs: matched forward tokens (positions through a Llama trunk: the base or
the LM, and the Q-network's), and matched FLOPs (every matrix product: CoLA's policy blocks on every position and
its merge module + W_lm on every candidate action count too, as do attention and the LM's W_lm). The runs stop at
the largest token budget, which every method reaches no later than the same budget in FLOPs.

Run it (CPU, tiny preset):
    python search_eval.py --ckpt runs/fta-i/final --llama runs/sft/final --qnet runs/q-latent/final \\
        --task countdown-2 --problems 64 --budgets 1000,2000,4000 --seeds 0,1,2
    python search_eval.py --help
It appends one row per (method, problem, seed) to <out-dir>/results.jsonl, skips rows already there when rerun (a
row records the digests of the checkpoints it ran: a replaced model reruns it), and prints the table. One process.

Deviations: eval scores --problems distinct held-out prompts, each once (tasks.held_out; countdown-2's val split
holds 270 distinct problems, so --problems 1000 gives those 270) and runs the deterministic methods (greedy, the
searches) once: the seeds only change best-of-N's samples. With --data / --val-data (math problems from a file), the
methods score completions with the checker against the gold answer, an oracle verifier: success is "some completion
within the budget was correct", not what a method would answer without the answer key.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from infra import parallel
from infra.files import atomic_write, check_out_dir, check_outside_models, read_json_or_empty
from infra.trainer import SEED, append_row, arg, check_value, one_line_errors, parse_config, writing
from infra.treecache import Cost, Engine
import cola
import data
from mcts import ANSWERS, SELECTS, Search, SearchArgs, encode_prompt
from model import clip_new_tokens
from policy import sample_uniforms, seeded_sampler
from qnet import QNetwork, check_qnet
import tasks
from tokenizer import Tokenizer

# ----------------------------------------------------------------------------------------------------------------
# The baseline without a tree: best-of-N samples


@torch.no_grad()
def best_of_n(engine: Engine, tok: Tokenizer, problem: tasks.Problem, prompt: list[int], budget: int, seed: int,
              max_new_tokens: int, top_k: int | None, temperature: float = 1.0, wave: int = 8,
              stop_at_success: bool = True, max_samples: int = 10_000) -> dict:
    """Sampled rollouts until `budget` forward tokens are spent: the prompt runs once, its K/V is copied into every
    row of a wave, finished rows leave the batch (so what is counted is what runs). Sample i draws its noise from
    policy.sample_uniforms(seed, 0, i): the samples do not depend on the wave size. -> {trace [(tokens, R, FLOPs)] in
    sample order (the prompt + the decode positions of samples 0..i, and their FLOPs), best (tokens, R), samples
    (how many), tokens (each sample's)}."""
    stops = set(tok.stop_tokens)
    dev = engine.lm.tok_embeddings.weight.device
    limit = min(len(prompt) + max_new_tokens, engine.max_len)
    engine.setup(wave)
    trace, best, i, samples = [], None, 0, []
    try:
        engine.rows = 1
        h0, logits0 = engine.run(torch.tensor([prompt], device=dev), 0)                 # [1, D], [1, A]
        prompt_kv, spent = engine.save_kv("lm", 0, len(prompt)), engine.cost.total
        spent_flops, latent = engine.cost.flops(engine.rates), engine.level == "latent"

        def sample_flops(r: int) -> int:
            """What sample r ran after the shared prompt: one decode position per fed token (at positions
            P, P+1, ..., so its queries score P+1, P+2, ... keys) and, for CoLA, one world-model row per token."""
            fed_r, keys = fed[r], sum(len(prompt) + n + 1 for n in range(fed[r]))
            return Cost(base=fed_r, base_keys=keys, policy=fed_r if latent else 0, policy_keys=keys if latent else 0,
                        head=0 if latent else fed_r, wm=len(outs[r]) if latent else 0).flops(engine.rates)
        while spent < budget and i < max_samples:
            B = wave
            engine.rows = B
            engine.load_kv("lm", prompt_kv, 0)
            u = sample_uniforms(seed, 0, i, B, max_new_tokens).to(dev)                   # [B, N]
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
                spent, spent_flops = spent + fed[r], spent_flops + sample_flops(r)
                R = tasks.score(problem, tok.decode([t for t in outs[r] if t not in stops]))
                trace.append((spent, R, spent_flops))
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
# Every method at matched budgets


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
    data: str = arg("", "math problems (.jsonl: MATH, GSM8K or prompt/answer layout) instead of --task: held out "
                        "are --val-data's, else the val split of --data (as rl.py)")
    val_data: str = arg("", "held-out math problems (.jsonl); the first --problems of them are searched")
    chat: bool = arg(False, "render prompts with the Llama-3.1 chat template (as rl.py --chat)")
    problems: int = arg(16, "distinct held-out problems (val split of the rl stream of --problem-seed: "
                            "tasks.held_out; fewer if the task has fewer; at most 10000: held_out draws 20x "
                            "as many, and countdown-2 has 270)", ">= 1, <= 10000")
    problem_seed: int = arg(0, "seed of the held-out problems", SEED)
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
    fill: bool = arg(False, "search: a round gives the selected node all its untried children (the release)")
    answer: str = arg("best-rollout", "search: best-rollout or release (mcts.py --help)")
    stop_at_eos: bool = arg(False, "search: stop at the first child that ends the response (the release)")
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
    prompt = encode_prompt(tok, problem, engine.max_len, cfg.llama if level == "token" else cfg.ckpt, cfg.chat)
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
            "base": c.base, "q": c.q, "policy": c.policy, "wm": c.wm, "flops": c.flops(engine.rates),
            "base_flops": engine.rates["base"], "wall_s": round(time.time() - t0, 3), **stats}


def success_at(trace: list, budget: float, unit: str = "tokens") -> bool:
    """Solved within the budget: some completion run with cost <= budget scored 1.0 (the answer is the best one).
    A trace entry is (forward tokens, R, FLOPs); unit picks which cost the budget counts."""
    at = 0 if unit == "tokens" else 2
    return any(e[1] >= 1.0 for e in trace if e[at] <= budget)


def table(rows: list[dict], budgets: list[int], methods: list[str], unit: str = "tokens") -> str:
    """Markdown: success per method and budget (mean over problems and seeds), and what each method spent.

    unit "tokens": budgets of forward tokens through a Llama trunk (Cost.total). unit "flops": budgets of FLOPs,
    written as base positions: b stands for b x the FLOPs of one position through the base's blocks (row
    "base_flops"), so that policy blocks, world-model rows, W_lm and attention are charged too. Every method
    spends at least one base position's FLOPs per forward token, so a run that reached the largest token budget
    reached the same FLOP budget: both tables read the same runs."""
    what = "forward tokens" if unit == "tokens" else "FLOPs, in base positions"
    head = "| method | seeds | " + " | ".join(f"success @ {b}" for b in budgets) + \
           f" | {what} spent (mean, to the largest budget) | policy pos. / WM rows / Q tokens (mean) |"
    lines = [head, "|" + "---|" * (len(budgets) + 4)]
    for m in methods:
        rs = [r for r in rows if r["method"] == m and (unit == "tokens" or "flops" in r)]
        if not rs:
            continue
        seeds = sorted({r["seed"] for r in rs})
        cells = []
        for b in budgets:
            per_seed = [sum(success_at(r["trace"], b if unit == "tokens" else b * r["base_flops"], unit)
                            for r in rs if r["seed"] == s) / sum(1 for r in rs if r["seed"] == s) for s in seeds]
            mean = sum(per_seed) / len(per_seed)
            spread = f" ({min(per_seed):.3f}-{max(per_seed):.3f})" if len(seeds) > 1 else ""
            cells.append(f"{mean:.3f}{spread}")
        mean = lambda k: sum(r[k] for r in rs) / len(rs)                                # noqa: E731
        spent = mean("spent") if unit == "tokens" else sum(r["flops"] / r["base_flops"] for r in rs) / len(rs)
        lines.append(f"| {m} | {len(seeds)} | " + " | ".join(cells) + f" | {spent:.0f} | "
                     f"{mean('policy'):.0f} / {mean('wm'):.0f} / {mean('q'):.0f} |")
    return "\n".join(lines)


def eval_main(argv: list[str]):
    """Run every method on every held-out problem (rows already in results.jsonl are kept), then print the table."""
    cfg, set_flags = parse_config(EvalArgs, argv, "search_eval.py", {})
    if cfg.task not in tasks.TASKS:
        raise SystemExit(f"--task {cfg.task!r}: expected one of {', '.join(tasks.TASKS)}")
    tasks.task_of(cfg, set_flags)                 # --task beside --data / --val-data: one line
    if cfg.select not in SELECTS:
        raise SystemExit(f"--select {cfg.select!r}: expected one of {', '.join(SELECTS)}")
    if cfg.answer not in ANSWERS:
        raise SystemExit(f"--answer {cfg.answer!r}: expected one of {', '.join(ANSWERS)}")
    try:
        budgets = sorted({int(b) for b in cfg.budgets.split(",")})
        seeds = [int(s) for s in cfg.seeds.split(",")]
    except ValueError:
        raise SystemExit(f"--budgets {cfg.budgets!r} / --seeds {cfg.seeds!r}: comma-separated integers") from None
    if not budgets or budgets[0] < 1:
        raise SystemExit(f"--budgets {cfg.budgets!r}: expected positive integers")
    for s in seeds:
        check_value("seeds", s, SEED)
    methods = [m for m in cfg.methods.split(",") if m]
    for flag, given in (("--seeds", seeds), ("--methods", methods)):     # a repeat ran nothing new, but the table
        twice = next((x for i, x in enumerate(given) if x in given[:i]), None)        # listed its method twice
        if twice is not None:
            raise SystemExit(f"{flag} {getattr(cfg, flag[2:])!r}: {twice} is listed twice; expected distinct values")
    if not methods:
        raise SystemExit(f"--methods {cfg.methods!r}: expected one or more of {', '.join(METHODS)}")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"--methods: {bad[0]!r} is not one of {', '.join(METHODS)}")
    if cfg.data or cfg.val_data:               # read and checked before any checkpoint is looked at
        cfg.task = "math"
        problems = tasks.problem_sets(cfg.data, cfg.val_data, need_train=False)[1][:cfg.problems]
    else:
        problems = tasks.held_out(cfg.task, cfg.problems, cfg.problem_seed)
    cfg.ckpt = cfg.ckpt or ("runs/fta-i/final" if any(not m.startswith("token-") for m in methods) else "")
    cfg.llama = cfg.llama or ("runs/sft/final" if any(m.startswith("token-") for m in methods) else "")
    if "mcts-q" in methods and not cfg.qnet:
        cfg.qnet = "runs/q-latent/final"
    if "token-mcts-q" in methods and not cfg.token_qnet:
        raise SystemExit("--methods token-mcts-q needs --token-qnet (`python qnet.py --level token`)")
    for flag, path in (("--ckpt", cfg.ckpt), ("--llama", cfg.llama), ("--qnet", cfg.qnet if "mcts-q" in methods
                                                                       else ""), ("--token-qnet", cfg.token_qnet)):
        if path and not Path(path).is_dir():
            raise SystemExit(f"{flag} {path}: directory not found")
    for flag, path in (("--ckpt", cfg.ckpt), ("--llama", cfg.llama)):
        if path:                                     # the smaller context of the two models
            cfg.max_new_tokens = clip_new_tokens(cfg.max_new_tokens, path, flag)
    device = parallel.device_of(cfg.device)
    out = Path(cfg.out_dir)
    check_out_dir(out, "--out-dir")            # before the models load and the methods run
    check_outside_models(out, "--out-dir")
    old = read_json_or_empty(out / "config.json")
    if old and "budgets" not in old:           # a run's or a model's: config.json would be replaced (a run then
        raise SystemExit(f"--out-dir {out} holds a config.json that is not search_eval.py's (a run or a model "  # no
                         f"directory?); use another --out-dir")                                    # longer resumed)
    # A row is reused only when everything that determines it is the same: the flags (config.json, below) and the
    # contents of the checkpoints its method runs (a new --qnet, or a model replaced at the same path, reruns it).
    # Digests are taken before the models are loaded; files' own hashes are cached in digests.json.
    uses = {m: [cfg.llama if m.startswith("token-") else cfg.ckpt] + ([cfg.qnet] if m == "mcts-q" else [])
            + ([cfg.token_qnet] if m == "token-mcts-q" else []) for m in methods}
    cache = read_json_or_empty(out / "digests.json")
    digests = {path: digest(path, cache) for path in {p for paths in uses.values() for p in paths}}
    models = {m: [digests[path] for path in paths] for m, paths in uses.items()}
    tok = Tokenizer.find(cfg.ckpt or cfg.llama, cfg.tokenizer or None)
    engines = {}
    if any(not m.startswith("token-") for m in methods):
        latent = cola.load_level(cfg.ckpt, "latent", "--ckpt", device, tok=tok).eval().requires_grad_(False)
        engines[("latent", False)] = Engine(latent, "latent")
        if "mcts-q" in methods:
            q = QNetwork.from_pretrained(cfg.qnet, device)
            check_qnet(q, cfg.qnet, "latent", latent, cfg.ckpt)
            engines[("latent", True)] = Engine(latent, "latent", q)
    if any(m.startswith("token-") for m in methods):
        lm = cola.load_level(cfg.llama, "token", "--llama", device, tok=tok).eval().requires_grad_(False)
        engines[("token", False)] = Engine(lm, "token")
        if "token-mcts-q" in methods:
            q = QNetwork.from_pretrained(cfg.token_qnet, device, "--token-qnet")
            check_qnet(q, cfg.token_qnet, "token", lm, cfg.llama, "--token-qnet", "--llama")
            engines[("token", True)] = Engine(lm, "token", q)
    # Only now, with every flag and model checked, is anything written. The key holds what every row depends on
    # but the models (each row records its models' digests), the methods, seeds and problems (rows name theirs).
    key = {k: v for k, v in asdict(cfg).items() if k not in ("methods", "seeds", "problems", "ckpt", "llama", "qnet",
                                                             "token_qnet", "out_dir", "device", "tokenizer")}
    default = {f.name: f.default for f in fields(EvalArgs)}         # a flag added since: its default then
    diff = [k for k in key if old and old.get(k, default.get(k)) != key[k]]
    if diff:
        raise SystemExit(f"{out}/config.json: written with --{diff[0].replace('_', '-')} {old.get(diff[0])!r}, "
                         f"this run has {key[diff[0]]!r}: use another --out-dir")
    with writing(f"--out-dir {out}: cannot write the results there"):
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "config.json", lambda t: t.write_text(json.dumps(key, indent=2)))
        atomic_write(out / "digests.json", lambda t: t.write_text(json.dumps(cache, indent=1)))
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
                print(f"{m} seed {s} problem {i + 1}/{len(problems)}: best "
                      f"{max((e[1] for e in row['trace']), default=0.0):.2f}, "
                      f"{row['spent']} tokens, {row['wall_s']:.1f} s", flush=True)
    kept = current(rows, methods, {p.prompt for p in problems}, seeds, models)
    text = (f"matched forward tokens (through a Llama trunk):\n{table(kept, budgets, methods)}\n\n"
            f"matched FLOPs (every matrix product, in FLOPs of one base position):\n"
            f"{table(kept, budgets, methods, 'flops')}")
    print(f"{len(problems)} held-out problems ({cfg.task}, distinct prompts)")
    print(text)
    return rows, text


def current(rows: list[dict], methods, prompts: set, seeds, models: dict) -> list[dict]:
    """The rows of this evaluation: one per (method, problem, seed), the first one written with these models
    (models[method]: the digests of the checkpoints it runs); rows of other problems, seeds or models are left out."""
    first = {}
    for r in rows:
        if r["method"] in methods and r["problem"] in prompts and r["seed"] in seeds and \
                r.get("models") == models[r["method"]]:
            first.setdefault((r["method"], r["problem"], r["seed"]), r)
    return list(first.values())


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


def main(argv=None):
    return one_line_errors(eval_main, argv)


if __name__ == "__main__":
    main()
