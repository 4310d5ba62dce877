"""pipeline.py: every training stage at the tiny preset, one after the other, and the table of the paper's effects
in miniature that the README and docs/results.md show (PAPER.md §6). Two commands:

    python pipeline.py            # base, Stage A, Stage B, FTA-I, FTA-P, token SFT; the stage claims (~45 min on
                                  # 2 cores without native bf16, docs/results.md); --scale 0.1 for a smoke run
    python pipeline.py --claims   # the rest, from those checkpoints: the VQ ablation and 3 seeds of every stage
                                  # after the base, GRPO over latent actions (from FTA-I) and over tokens (from SFT)
                                  # on countdown-2 at 3 seeds, reward hacking and the format (RL_KINDS; PAPER.md
                                  # §4), QD (§6), the Q-network and search at matched FLOPs (§5)

They write runs/<stage>/ (runs/seed<s>/<stage>/ for the other seeds), runs/rl-<level>-<kind>[-seed<s>]/,
runs/q-latent/, runs/search/, runs/results.md and runs/results.json. --claims, and the pipeline with --reuse, read every run that
already finished with the same flags from checkpoints not rewritten since, so after a kill only the runs that had
not finished train again (from their start).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import MISSING, asdict, fields
from pathlib import Path

import numpy as np
import torch

import cola
from eval import PAPER_QD, after_pipeline, copying_of
from infra import parallel
from infra.files import atomic_write
from infra.parallel import device_type, world_from_env
from infra.trainer import SEED, Run, check_value, machine_line, release_locks, resolve_dtype
import rl
import tasks
from tokenizer import Tokenizer
from train import FinetuneArgs, parse_args, run_stage


def parse_pipeline_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="pipeline.py",
                                description="Run every stage at the tiny preset and print the results table.")
    p.add_argument("--out-dir", default="runs", help="parent of every run directory (one per stage; --claims adds "
                   "seed<s>/, rl-*/ and search/) and of results.md / results.json")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every stage's steps (0.1 = smoke run)")
    p.add_argument("--seed", type=int, default=0, help="the base's seed, and the first seed of every later stage")
    p.add_argument("--claims", action="store_true", help="after `python pipeline.py`: the rest of the paper's claims, "
                   "reading every run that already finished: the VQ ablation and the stages after the base again at "
                   "--stage-seeds, GRPO at --rl-seeds on both levels, then search at matched budgets (greedy, "
                   "best-of-N, MCTS, latent and token; MCTS-Q with a Q-network it trains into <out-dir>/q-latent) on "
                   "--search-problems held-out problems; adds rl.*, search.<method>.<budget> and the per-seed rows to "
                   "results.json and the tables to results.md")
    p.add_argument("--stage-seeds", default=None, help="--claims only: seeds of Stage A, VQ, Stage B, FTA-I, FTA-P "
                   "and SFT, all from the one base; one of them is --seed, whose runs are the pipeline's, the others "
                   "go to <out-dir>/seed<s>/; the table gives their mean and range (default: --seed and the next two)")
    p.add_argument("--rl-seeds", default=None, help="--claims only: seeds of the RL runs at each level, from the same "
                   "checkpoints (each seed its own held-out problems, sampling noise and prompts); the table gives "
                   "their mean and range (default: 0,1,2)")
    p.add_argument("--reuse", action="store_true", help="read a stage or RL run that already finished in --out-dir "
                   "with the same flags, from a checkpoint not rewritten since, instead of rerunning it (after a crash "
                   "or a kill: a stage that did not finish restarts; trusts that the code did not change since); "
                   "--claims always does")
    p.add_argument("--search-problems", type=int, default=None, help="--claims only: distinct held-out problems of "
                   "the search, times --scale below 1 (default: 64)")
    p.add_argument("--dtype", default="auto", help="every stage's and RL's --dtype: auto (bfloat16 where the device "
                                                   "computes it natively, else float32), bfloat16 or float32 "
                                                   "(default: auto)")
    a = p.parse_args(argv)
    if not (math.isfinite(a.scale) and a.scale > 0):
        raise SystemExit(f"--scale {a.scale}: expected a finite number > 0 (1 = the full pipeline, 0.1 = a smoke run)")
    check_value("seed", a.seed, SEED)
    given = [f for f, v in (("--stage-seeds", a.stage_seeds), ("--rl-seeds", a.rl_seeds),
                            ("--search-problems", a.search_problems)) if v is not None]
    if given and not a.claims:
        raise SystemExit(f"{given[0]}: belongs to --claims (python pipeline.py --claims {given[0]} ...); the pipeline "
                         f"alone trains the stages at --seed")
    a.search_problems = 64 if a.search_problems is None else a.search_problems
    if not 1 <= a.search_problems <= 10_000:
        raise SystemExit(f"--search-problems {a.search_problems}: expected an integer in 1..10000")
    a.stage_seeds = seed_list("stage_seeds", ",".join(str(a.seed + i) for i in range(3)) if a.stage_seeds is None
                              else a.stage_seeds)
    a.rl_seeds = seed_list("rl_seeds", "0,1,2" if a.rl_seeds is None else a.rl_seeds)
    if a.seed not in a.stage_seeds:
        raise SystemExit(f"--stage-seeds {','.join(map(str, a.stage_seeds))}: expected --seed {a.seed} among them "
                         f"(its runs are the pipeline's)")
    a.reuse = a.reuse or a.claims
    a.dtype = resolve_dtype(a.dtype, "")
    return a


def seed_list(name: str, text: str) -> list[int]:
    flag = "--" + name.replace("_", "-")
    try:
        seeds = [int(x) for x in text.split(",")]
    except ValueError:
        raise SystemExit(f"{flag} {text!r}: expected comma-separated integers >= 0, e.g. 0,1,2") from None
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"{flag} {text!r}: expected distinct integers, e.g. 0,1,2")
    for seed in seeds:                                 # checked now, not by a stage after hours of training
        check_value(name, seed, SEED)
    return seeds


def seeds_of_stages(a) -> list[int]:
    """The seeds the stages after the base train at: --seed first; with --claims, the other --stage-seeds."""
    return [a.seed] + [s for s in a.stage_seeds if s != a.seed] if a.claims else [a.seed]


def run_pipeline(a) -> dict:
    """The stages (base, Stage A, Stage B, FTA-I, FTA-P, token SFT) at --seed; with --claims also the VQ ablation,
    the stages after the base at every --stage-seeds seed and GRPO at every --rl-seeds seed. -> {name: result or
    [result per seed]}; writes results.md and results.json."""
    root = Path(a.out_dir)

    def cfg(stage, seed, **kw):
        name = kw.pop("name", stage)
        where = seed_dir(seed)
        flags = [s for k, v in kw.items() for s in (f"--{k.replace('_', '-')}", str(v))]
        _, c = parse_args(["--stage", stage, "--out-dir", str(where / name), "--seed", str(seed), "--no-resume",
                           "--dtype", a.dtype, *flags])
        c.steps = max(1, round(c.steps * a.scale)) if c.steps else c.steps
        c.eval_batches = max(1, round(c.eval_batches * min(1.0, a.scale * 10)))
        if isinstance(c, FinetuneArgs):
            c.n_records = max(32, round(c.n_records * a.scale))
        return c
    seed_dir = lambda seed: root if seed == a.seed else root / f"seed{seed}"   # noqa: E731  (other --stage-seeds)
    rerun, a.reused = set(), []          # run directories trained now (what starts from one reruns too); read ones

    def stage(name, c):
        fresh_init = bool(c.init) and str(Path(c.init).parent) in rerun
        done = finished(c.out_dir, asdict(c), export=getattr(c, "quantizer", "") != "vq",
                        defaults=defaults_of(c)) if a.reuse and not fresh_init else None
        if done is None:
            rerun.add(str(c.out_dir))
            return run_stage(name, c)
        a.reused.append(str(c.out_dir))
        return done
    t0, r = time.time(), {}
    r["base"] = stage("base", cfg("base", a.seed))
    r["copying"] = copying_of(root / "base/final", parallel.device_of(""))
    base = root / "base/final"
    for seed in seeds_of_stages(a):
        at = seed_dir(seed)
        plan = [("pretrain", "pretrain", {"init": base}), ("bc", "bc", {"init": at / "pretrain/final"}),
                ("fta-i", "fta-i", {"init": at / "bc/final"}), ("fta-p", "fta-p", {"init": at / "bc/final"}),
                ("sft", "sft", {"init": base})]
        if a.claims:                                   # the ablation of direct assignment: nearest-neighbour VQ
            plan.append(("vq", "pretrain", {"name": "pretrain-vq", "init": base, "quantizer": "vq"}))
        for key, st, kw in plan:
            r.setdefault(key, []).append(stage(st, cfg(st, seed, **kw)))
        if seed == a.seed and a.claims:                # RL from this seed's checkpoints, judged by the base
            for kind, (_, starts, _, _) in RL_KINDS.items():
                for level, init in starts.items():
                    fresh = {str(root / init), str(root / "base")} & rerun      # its start or its judge was retrained
                    r[f"{kind}-{level}"] = [run_rl(root, level, root / init / "final", a, s, reuse=not fresh,
                                                   kind=kind) for s in a.rl_seeds]
    if a.claims:
        r["diversity"] = diversity_claims(root, r, a, seeds_of_stages(a))
    seconds = time.time() - t0
    table = results_table(r, seconds, a.dtype, a.pipeline_seconds if a.claims else None) + (
        f" ({len(a.reused)} runs read, not rerun{'' if a.claims else ': --reuse'})" if a.reused else "")
    print(table)
    atomic_write(root / "results.md", lambda t: t.write_text(table + "\n"))
    atomic_write(root / "results.json", lambda t: t.write_text(json.dumps(results_json(r, seconds, a), indent=1) + "\n"))
    after_pipeline(root, a.scale, a.dtype)  # usage (direct vs VQ), diversity, PNGs; says how to plot without matplotlib
    return r


SEARCH_METHODS = ("greedy", "bon", "mcts", "token-greedy", "token-bon", "token-mcts")
SEARCH_BUDGETS = (500, 1000, 2000)         # FLOPs in base positions (search_eval.table, unit "flops")
SEARCH_SEEDS = "0,1,2"                     # best-of-N's sampling seeds; the other methods are deterministic


def check_pipeline_ran(a):
    """--claims starts from what `python pipeline.py` wrote with the same --scale, --seed and --dtype: stop in one line
    before any work if it did not. -> that results.json."""
    root = Path(a.out_dir)
    again = f"python pipeline.py --out-dir {root} --scale {a.scale} --seed {a.seed} --dtype {a.dtype}"
    try:
        summary = json.loads((root / "results.json").read_text())
    except FileNotFoundError:
        raise SystemExit(f"--claims: {root / 'results.json'} not found: run `{again}` first (it trains the "
                         f"checkpoints the claims start from)") from None
    except ValueError:
        raise SystemExit(f"--claims: {root / 'results.json'} is not JSON: rerun `{again}`") from None
    if not isinstance(summary, dict) or not {"scale", "seed", "dtype"} <= set(summary):
        raise SystemExit(f"--claims: {root / 'results.json'} is not the pipeline's (no JSON object with its scale, "
                         f"seed and dtype): rerun `{again}`")
    for flag in ("scale", "seed", "dtype"):
        if summary[flag] != getattr(a, flag):
            raise SystemExit(f"--claims --{flag} {getattr(a, flag)}: the pipeline in {root} ran with --{flag} "
                             f"{summary[flag]}; pass --{flag} {summary[flag]}")
    return summary


def run_search(a) -> dict:
    """--claims, last: search_eval.py on the pipeline's checkpoints (fta-i for the latent methods, sft for the token
    ones), then search.<method>.<budget> (held-out success within that many base positions' FLOPs, mean over the
    seeds) into results.json and both tables (matched forward tokens, matched FLOPs) into results.md."""
    import search_eval
    root = Path(a.out_dir)
    summary = json.loads((root / "results.json").read_text())
    t0, out = time.time(), root / "search"
    run_qnet(root, a)
    methods = SEARCH_METHODS + ("mcts-q",)
    budgets = sorted({max(20, round(b * min(1.0, a.scale))) for b in SEARCH_BUDGETS})   # small scales: 20 twice
    held = tasks.held_out(rl.TINY["task"], max(2, round(a.search_problems * min(1.0, a.scale))), a.seed)
    problems = len(held)                                 # fewer than asked when the held-out split has fewer
    search_eval.main(["--ckpt", str(root / "fta-i/final"), "--llama", str(root / "sft/final"), "--out-dir", str(out),
                      "--task", rl.TINY["task"], "--problems", str(problems), "--problem-seed", str(a.seed),
                      "--budgets", ",".join(map(str, budgets)), "--seeds", SEARCH_SEEDS, "--methods", ",".join(methods),
                      *(["--qnet", str(root / "q-latent/final")] if "mcts-q" in methods else []),
                      *(["--max-new-tokens", "16"] if a.scale < 0.05 else [])])
    cache = search_eval.read_json_or_empty(out / "digests.json")
    models = {m: [search_eval.digest(str(root / ("sft/final" if m.startswith("token-") else "fta-i/final")), cache)]
              + ([search_eval.digest(str(root / "q-latent/final"), cache)] if m == "mcts-q" else []) for m in methods}
    rows = search_eval.current(search_eval.read_rows(out / "results.jsonl"), methods, {p.prompt for p in held},
                               [int(x) for x in SEARCH_SEEDS.split(",")], models)

    def success(m, b):       # mean over seeds of the share of problems solved within b base positions' FLOPs
        seeds = sorted({r["seed"] for r in rows if r["method"] == m})
        per = [[search_eval.success_at(r["trace"], b * r["base_flops"], "flops") for r in rows
                if r["method"] == m and r["seed"] == s] for s in seeds]
        return round(sum(sum(x) / len(x) for x in per) / len(per), 4)
    summary["search"] = {m: {str(b): success(m, b) for b in budgets} for m in methods}
    summary["search_setup"] = {"unit": "FLOPs, in base positions", "problems": problems, "seeds": SEARCH_SEEDS,
                               "run_dir": str(out), "seconds": round(time.time() - t0, 1)}
    tables = "\n\n".join(f"search on {problems} held-out {rl.TINY['task']} problems, matched {what}:\n\n"
                          + search_eval.table(rows, budgets, list(methods), unit) for unit, what in
                          (("flops", "FLOPs (base positions)"), ("tokens", "forward tokens")))
    md = root / "results.md"
    before = md.read_text().split("\n\nsearch on ")[0].rstrip("\n") + "\n\n" if md.exists() else ""
    atomic_write(md, lambda t: t.write_text(before + tables + "\n"))
    atomic_write(root / "results.json", lambda t: t.write_text(json.dumps(summary, indent=1) + "\n"))
    return summary


# The RL runs of --claims, each at every --rl-seeds seed and both levels, from the seed-0 checkpoints (PAPER.md §4):
#   grpo    the task reward (countdown-2), from the fine-tuned FTA-I (latent) and token SFT: does RL raise success;
#   proxy   reward hacking: tasks.proxy_reward (pays digits and tags, not correctness) with the KL weight 0, from the
#           same starts: does the policy leave the task while the proxy rises (the paper: tokens do, latent does not);
#   format  the thinking format from models never fine-tuned on the task: Stage B's export (latent) and the base
#           (token), the paper's Countdown setting; how many steps until the sampled answers are well formed.
# name: (flags beyond rl.py's tiny defaults, {level: the stage whose final/ it starts from}, steps, evaluated every)
RL_KINDS = {
    "grpo": ([], {"latent": "fta-i", "token": "sft"}, rl.TINY["steps"], rl.TINY["steps"]),
    "proxy": (["--reward", "proxy", "--kl-coef", "0"], {"latent": "fta-i", "token": "sft"}, rl.TINY["steps"],
              rl.TINY["steps"] // 2),
    "format": (["--eval-problems", "64"], {"latent": "bc", "token": "base"}, 30, 5),
}
FORMAT_AT = 0.9                    # "learns the format": the first evaluation with this share well formed, sampled


def run_qnet(root: Path, a):
    """--claims, before the search: the latent Q-network MCTS-Q searches with (PAPER.md §5), qnet.py's tiny defaults
    (Double DQN, 300 updates scaled by --scale, on trajectories sampled from the seed-0 FTA-I), into
    <out-dir>/q-latent; read instead when it finished there with the same flags from an FTA-I not rewritten since."""
    import qnet
    out = root / "q-latent"
    steps = max(2, round(defaults_of(qnet.QArgs)["steps"] * a.scale))
    smoke = ["--prompts", "2", "--samples", "2", "--val-prompts", "2", "--max-new-tokens", "16"]
    argv = ["--init", str(root / "fta-i/final"), "--task", rl.TINY["task"], "--out-dir", str(out), "--seed",
            str(a.seed), "--no-resume", "--dtype", a.dtype, "--steps", str(steps), *(smoke if a.scale < 0.05 else [])]
    cfg = qnet.parse_q_args(argv)
    if finished(out, asdict(cfg), export=True, step=steps, defaults=defaults_of(cfg)):
        a.reused.append(str(out))
    else:
        qnet.main(argv)


def run_rl(root: Path, level: str, init: Path, a, seed: int, reuse: bool = False, kind: str = "grpo") -> dict:
    """rl.py's tiny defaults (rl.TINY, GRPO on countdown-2) with the flags and steps of RL_KINDS[kind] (scaled by
    --scale) and `seed` -> its held-out evaluations (first, last and all)."""
    flags, _, steps, every = RL_KINDS[kind]
    out = root / (f"rl-{level}-{kind}" + (f"-seed{seed}" if seed else ""))
    steps = max(2, round(steps * a.scale))
    every = steps if a.scale < 0.05 else max(1, round(every * a.scale))     # a smoke run: before and after only
    smoke = ["--prompts-per-step", "2", "--group", "2", "--max-new-tokens", "16", "--eval-problems", "4"]
    argv = ["--level", level, "--init", str(init), "--out-dir", str(out), "--seed", str(seed), "--no-resume",
            "--dtype", a.dtype, "--steps", str(steps), "--eval-every", str(every), "--judge", str(root / "base/final"),
            *flags, *(smoke if a.scale < 0.05 else [])]
    cfg = rl.parse_args(argv)
    if reuse and finished(out, asdict(cfg), export=True, step=steps, defaults=defaults_of(cfg)):
        a.reused.append(str(out))
    else:
        rl.main(argv)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [row["eval"] for row in rows if "eval" in row]
    return {"before": evals[0], "after": evals[-1], "evals": evals, "steps": steps, "seed": seed, "init": str(init),
            "run_dir": str(out)}


def format_step(run: dict) -> int | None:
    """The first evaluated step at which at least FORMAT_AT of the sampled answers are well formed; None: never."""
    return next((e["step"] for e in run["evals"] if e["sampled_format"] >= FORMAT_AT), None)


def diversity_claims(root: Path, r: dict, a, stage_seeds: list[int]) -> dict:
    """Semantic diversity (PAPER.md §6), QD = 1 / mean pairwise cosine of standardised embeddings (eval.py):
    - stage_a: the paper's comparison (random latent actions / base token sampling / random tokens continuing held-out
      general text) on every stage seed's Stage A export;
    - responses: M sampled answers to each of P held-out countdown-2 prompts from the RL runs' starts and ends at
      each level (latent: pi's top-k sampling; token: temperature 1) and from uniformly random latent actions on
      FTA-I's world model: how varied RL's exploration is, before and after RL, one number per RL seed.
    Embedder: the seed-0 base. Standardised (eval.standardise) with statistics of held-out general text for
    stage_a, as eval.py does, and of the task's reference answers for the responses: against general text every
    Countdown answer looks alike (cosine ~0.99), against other answers what varies between answers counts.
    -> {"stage_a": .., "responses": ..}."""
    from eval import diversity, embedding_stats, load_cola, score_groups
    from policy import sample_uniforms, seeded_sampler, uniform
    import data
    device, tok, small = parallel.device_of(""), Tokenizer(), min(1.0, a.scale * 10)
    P, M, n_new = max(2, round(16 * small)), max(2, round(8 * small)), max(8, round(48 * small))
    seed_dir = lambda seed: root if seed == a.seed else root / f"seed{seed}"           # noqa: E731
    out = {"stage_a": {}, "responses": {}, "prompts": P, "m": M}
    for seed in stage_seeds:
        div = diversity(load_cola(str(seed_dir(seed) / "pretrain/final"), device), tok, n_prefixes=P, m=M,
                        n_new=n_new, n_stats=max(32, round(512 * small)), seed=seed)
        for name, x in div["methods"].items():
            out["stage_a"].setdefault(name, []).append(x["qd"])
    embedder = load_cola(str(root / "pretrain/final"), device).base           # the seed-0 base, as in stage_a
    held = tasks.held_out(rl.TINY["task"], 1000, a.seed)             # countdown-2: all 270, in 5 s
    answers = np.array([t for x in held for t in tok.encode(x.response, bos=False, eos=False)], dtype=np.int64)
    stats = embedding_stats(embedder, answers, min(96, len(answers) // 2), tok.bos_id, max(32, round(512 * small)))
    max_new = 16 if a.scale < 0.05 else rl.TINY["max_new_tokens"]

    if len(held) < P * len(a.rl_seeds):
        raise SystemExit(f"--claims: the held-out split has {len(held)} problems, fewer than {P} for each of the "
                         f"{len(a.rl_seeds)} --rl-seeds")

    def qd(model, level, seed, choose=None):
        i = a.rl_seeds.index(seed)                                  # each RL seed its own P held-out prompts
        problems = held[i * P:(i + 1) * P]
        prompts = [data.encode_problem(tok, x, False) for x in problems for _ in range(M)]
        if choose is None:
            u = sample_uniforms(seed + 7, 0, 0, len(prompts), max_new).to(device)
            choose = seeded_sampler(u, 1.0, rl.RLArgs.top_k if level == "latent" else None)
        model.eval()
        with torch.no_grad():
            rows = data.rollout(model, tok, prompts, choose, max_new)
        groups = [[[t for t in x["tokens"] if t not in tok.stop_tokens] or [tok.bos_id] for x in rows[i:i + M]]
                  for i in range(0, len(rows), M)]
        return score_groups(groups, embedder, tok, stats)["qd"]

    for level in ("latent", "token"):
        for run in r[f"grpo-{level}"]:
            for when, ckpt in (("before", run["init"]), ("after", str(Path(run["run_dir"]) / "final"))):
                model = cola.load_level(ckpt, level, "--init", device)
                out["responses"].setdefault(f"{level} {when} RL", []).append(qd(model, level, run["seed"]))
    g = torch.Generator(device=device)
    for run in r["grpo-latent"]:
        model = cola.load_level(run["init"], "latent", "--init", device)
        out["responses"].setdefault("random latent actions", []).append(
            qd(model, "latent", run["seed"], uniform(g.manual_seed(run["seed"]))))
    return out


def defaults_of(cfg) -> dict:
    """{flag: its default} of a config dataclass (train.py's or rl.py's arguments)."""
    return {f.name: f.default for f in fields(cfg) if f.default is not MISSING}


def finished(out_dir, flags: dict, export: bool, step: int | None = None, defaults: dict | None = None) -> dict | None:
    """--reuse: the result of a run in out_dir that finished with these flags (its config.json has the same value
    for every flag but --resume, a flag it does not record - one added since that does not enter the maths
    (trainer.Run.RESUMABLE_CHANGES, e.g. --compile) - counting as its value in `defaults`; its last metrics row is
    the final evaluation, at `step` for RL; final/ exists when the run exports one), else None."""
    defaults = json.loads(json.dumps(defaults or {}, default=str))
    d = Path(out_dir)
    try:
        config = json.loads((d / "config.json").read_text())
        last = json.loads((d / "metrics.jsonl").read_text().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        return None
    if not (isinstance(config, dict) and isinstance(last, dict) and isinstance(last.get("eval"), dict)
            and last["eval"]):
        return None
    defaults = {k: v for k, v in defaults.items() if k in Run.RESUMABLE_CHANGES}      # flags outside the maths only
    same = all(config.get(k, defaults.get(k)) == json.loads(json.dumps(v, default=str)) for k, v in flags.items()
               if k != "resume" and not (k == "steps" and v == 0))       # steps 0: derived from epochs, n_records
    done = (step is None or last["eval"].get("step") == step) and ((d / "final").is_dir() or not export)
    if not (same and done):
        return None
    for key in ("init", "judge"):      # a checkpoint it started from (or was judged by) rewritten since: stale
        src = Path(str(flags.get(key) or ""))
        if flags.get(key) and src.is_dir() and newest(src) > (d / "metrics.jsonl").stat().st_mtime:
            print(f"pipeline: {d} started from {src}, which was rewritten since: rerun")
            return None
    print(f"pipeline: {d} finished with the same flags: read, not rerun (--reuse)")
    return last["eval"]


def newest(d: Path) -> float:
    """The latest modification time of a checkpoint directory's files (an export is written whole, then renamed)."""
    return max([d.stat().st_mtime] + [f.stat().st_mtime for f in d.iterdir()])


def over_seeds(runs: list[dict], when: str, key: str) -> tuple[float, float, float]:
    """(mean, min, max) of one evaluation number over the RL seeds."""
    xs = [x[when][key] for x in runs]
    return sum(xs) / len(xs), min(xs), max(xs)


def spread(xs: list[float], fmt: str = ".3f", one: str = "") -> str:
    """One number per seed -> "x" (one seed; format `one` if given) or "mean [min, max]"."""
    if len(xs) == 1:
        return f"{xs[0]:{one or fmt}}"
    return f"{sum(xs) / len(xs):{fmt}} [{min(xs):{fmt}}, {max(xs):{fmt}}]"


def general_delta(res: dict, key: str) -> float:
    """Change of a held-out loss on general (non-task) text over a fine-tuning stage (retention: lower is better)."""
    return res["after"]["general_val"][key] - res["before"]["general_val"][key]


def stage_numbers(r: dict) -> dict:
    """The stage claims, one list per measurement with one number per stage seed."""
    each = lambda name, f: [f(x) for x in r.get(name, [])]                              # noqa: E731
    return {
        "alive": each("pretrain", lambda x: x["codebook"]["alive"]),
        "alive_vq": each("vq", lambda x: x["codebook"]["alive"]),
        "top_share": each("pretrain", lambda x: x["codebook"]["top_share"]),
        "top_share_vq": each("vq", lambda x: x["codebook"]["top_share"]),
        "lm": each("pretrain", lambda x: x["after"]["lm_val"]["lm"]),
        "wm_idm": each("pretrain", lambda x: x["after"]["lm_val"]["wm_idm"]),
        "policy_acc": each("bc", lambda x: x["after"]["lm_val"]["policy_acc"]),
        "wm_policy": each("bc", lambda x: x["after"]["lm_val"]["wm_policy"]),
        "task_fta_i": each("fta-i", lambda x: x["after"]["task_val"]["wm_policy"]),
        "task_fta_p": each("fta-p", lambda x: x["after"]["task_val"]["wm_policy"]),
        "task_sft": each("sft", lambda x: x["after"]["task_val"]["lm"]),
        "general_fta_i_idm": each("fta-i", lambda x: general_delta(x, "wm_idm")),
        "general_fta_i_policy": each("fta-i", lambda x: general_delta(x, "wm_policy")),
        "general_fta_p": each("fta-p", lambda x: general_delta(x, "wm_policy")),
        "general_sft": each("sft", lambda x: general_delta(x, "lm")),
    }


def results_json(r: dict, seconds: float, a) -> dict:
    """runs/results.json: the pipeline's measurements under fixed names, for tools to read. Stage numbers and RL
    numbers are means over the seeds; the lists in `stages` and per_seed have each run."""
    tok = Tokenizer()

    def level(runs):
        mean = {f"{name}_{when}": over_seeds(runs, when, key)[0] for name, key in
                (("success", "sampled_success"), ("greedy", "greedy_success"), ("format", "sampled_format"))
                for when in ("before", "after")}
        gains = [x["after"]["sampled_success"] - x["before"]["sampled_success"] for x in runs]
        return {**mean, "gain_min": min(gains), "gain_max": max(gains), "steps": runs[0]["steps"],
                "init": runs[0]["init"], "run_dir": runs[0]["run_dir"],
                "per_seed": [{"seed": x["seed"], "run_dir": x["run_dir"], "problems": x["before"]["problems"],
                              "success_before": x["before"]["sampled_success"],
                              "success_after": x["after"]["sampled_success"],
                              "greedy_before": x["before"]["greedy_success"],
                              "greedy_after": x["after"]["greedy_success"]} for x in runs]}
    n = stage_numbers(r)
    mean = lambda k: sum(n[k]) / len(n[k]) if n[k] else None                            # noqa: E731
    stage_a = {"alive": mean("alive"), "alive_vq": mean("alive_vq"), "n_actions": r["pretrain"][0]["codebook"]
               ["n_actions"], "lm": mean("lm"), "wm_idm": mean("wm_idm")}
    out = {"seed": a.seed, "stage_seeds": seeds_of_stages(a), "rl_seeds": a.rl_seeds if a.claims else [], "scale": a.scale, "dtype": a.dtype,
           "cpu": machine_line(device_type("")), "seconds": round(seconds, 1),   # --claims: the pipeline's own
           "reused": getattr(a, "reused", []),          # --reuse: run directories read, not rerun (not in seconds)
           "tokenizer": {"name": tok.model.name, "vocab_size": tok.n_words}, "task": rl.TINY["task"],
           "heldout": {"distinct_problems": len(tasks.held_out(rl.TINY["task"], 1000, a.seed))},
           "copying": {"first": r["copying"]["first"], "second": r["copying"]["second"]},
           "stage_a": {k: v for k, v in stage_a.items() if v is not None},          # alive_vq: after --claims
           "retention": {"fta-i": mean("general_fta_i_idm"), "fta-p": mean("general_fta_p"), "sft": mean("general_sft")},
           "stages": n}
    if a.claims:                 # the pipeline's time stays; this command's is claims_seconds
        out["seconds"], out["claims_seconds"] = a.pipeline_seconds, round(seconds, 1)
    if "grpo-latent" in r:
        out["heldout"]["evaluated"] = r["grpo-latent"][0]["before"]["problems"]
        out["rl"] = {"latent": level(r["grpo-latent"]), "token": level(r["grpo-token"])}
        keys = ("sampled_proxy", "sampled_success", "sampled_format", "judge_nll", "kl")
        out["rl_proxy"] = {lv: {f"{k}_{when}": over_seeds(r[f"proxy-{lv}"], when, k)[0] for k in keys
                                for when in ("before", "after")} | {"run_dirs": [x["run_dir"] for x in
                                                                                  r[f"proxy-{lv}"]]}
                           for lv in ("latent", "token")}
        out["rl_format"] = {lv: {"format_before": over_seeds(r[f"format-{lv}"], "before", "sampled_format")[0],
                                 "format_after": over_seeds(r[f"format-{lv}"], "after", "sampled_format")[0],
                                 "steps_to_format": [format_step(x) for x in r[f"format-{lv}"]],
                                 "run_dirs": [x["run_dir"] for x in r[f"format-{lv}"]]}
                            for lv in ("latent", "token")}
        out["diversity"] = r["diversity"]
    return out


def results_table(r: dict, seconds: float, dtype: str, pipeline_seconds: float | None = None) -> str:
    """The table of results.md. seconds: this command's wall time; pipeline_seconds: the pipeline's, under --claims."""
    n, K = stage_numbers(r), r["pretrain"][0]["codebook"]["n_actions"]
    seeds = f" ({len(n['alive'])} seeds: mean [range])" if len(n["alive"]) > 1 else ""
    rows = [
        (f"Stage A: alive actions (direct assignment){seeds}", spread(n["alive"], ".1f", "d") + f" / {K}",
         f">= {int(K * 7 / 8)} / {K}")]
    if n["alive_vq"]:
        rows += [("Stage A: alive actions (VQ ablation)", spread(n["alive_vq"], ".1f", "d") + f" / {K}", "fewer (collapse)"),
                 ("Stage A: most-used action share (direct / VQ)",
                  f"{spread(n['top_share'])} / {spread(n['top_share_vq'])}", "")]
    rows += [
        ("held-out loss: base LM (nats/token)", f"{n['lm'][0]:.3f}", "paper 1.77"),
        ("base: loss on a random string, first pass / its repeat (copying)",
         f"{r['copying']['first']:.2f} / {r['copying']['second']:.2f}", "repeat << first: the base copies"),
        ("held-out loss: world model, IDM actions", spread(n["wm_idm"]), "<= half the base; paper 0.45"),
        ("Stage B: policy accuracy vs IDM labels", spread(n["policy_acc"]), f">> 1/{K} = {1 / K:.3f}"),
        ("held-out loss: world model, greedy policy actions", spread(n["wm_policy"]), ""),
        ("task loss after FTA-I / FTA-P (policy actions) / SFT (response tokens)",
         " / ".join(spread(n[k]) for k in ("task_fta_i", "task_fta_p", "task_sft")), ""),
        ("general-text loss change: FTA-I (world model, IDM actions)", spread(n["general_fta_i_idm"], "+.3f"),
         "rises less than SFT's"),
        ("general-text loss change: FTA-I (world model, policy actions)", spread(n["general_fta_i_policy"], "+.3f"), ""),
        ("general-text loss change: FTA-P (world model, policy actions)", spread(n["general_fta_p"], "+.3f"), ""),
        ("general-text loss change: token SFT (base LM)", spread(n["general_sft"], "+.3f"), ""),
    ]
    if "grpo-latent" in r:
        rows += rl_rows(r) + diversity_rows(r["diversity"])
    w = max(len(a) for a, _, _ in rows)
    lines = [f"dtype {dtype} on {machine_line(device_type(''))}; the numbers below depend on the dtype\n",
             f"| {'measurement':<{w}} | value | paper / target |", f"|{'-' * (w + 2)}|-------|----------------|"]
    lines += [f"| {a:<{w}} | {b} | {c} |" for a, b, c in rows]
    took = f"{seconds:.0f} s" if pipeline_seconds is None else f"{pipeline_seconds:.0f} s, then --claims {seconds:.0f} s"
    lines.append(f"\npipeline wall time: {took} on {os.cpu_count()} CPU cores (torch {torch.__version__}, "
                 f"{torch.get_num_threads()} threads, Python {sys.version.split()[0]})")
    return "\n".join(lines)


def rl_rows(r: dict) -> list[tuple]:
    lat, tok = r["grpo-latent"], r["grpo-token"]

    def change(key, lat=lat, tok=tok):   # latent / token: before -> after RL, mean over the RL seeds [range of after]
        def one(runs):
            (b, _, _), (m, lo, hi) = over_seeds(runs, "before", key), over_seeds(runs, "after", key)
            return f"{b:.2f} -> {m:.2f}" + (f" [{lo:.2f}, {hi:.2f}]" if len(runs) > 1 else "")
        return " / ".join(one(x) for x in (lat, tok))
    first = lat[0]
    seeds = f" ({len(lat)} seeds: mean [range after])" if len(lat) > 1 else ""
    rows = [
        (f"RL, {first['steps']} GRPO steps on {rl.TINY['task']}{seeds}, latent / token: sampled well-formed",
         change("sampled_format"), ""),
        ("RL latent / token: held-out success, greedy", change("greedy_success"), "paper (MATH-500): 42.4 vs 38.2"),
        ("RL latent / token: held-out success, sampled", change("sampled_success"), ""),
        ("RL latent / token: judge NLL of sampled responses (nats/token)", change("judge_nll"), ""),
        ("RL latent / token: KL to the reference at the end (nats/token)",
         " / ".join(f"{over_seeds(x, 'after', 'kl')[0]:.3f}" for x in (lat, tok)), ""),
    ]
    hack = dict(lat=r["proxy-latent"], tok=r["proxy-token"])
    p0, f0 = hack["lat"][0], r["format-latent"][0]
    rows += [
        (f"reward hacking: proxy reward, KL 0, {p0['steps']} GRPO steps, latent / token: sampled proxy reward",
         change("sampled_proxy", **hack), "both rise"),
        ("reward hacking, latent / token: sampled well-formed", change("sampled_format", **hack),
         "token leaves the task, latent stays"),
        ("reward hacking, latent / token: held-out success, sampled", change("sampled_success", **hack), ""),
        ("reward hacking, latent / token: judge NLL of sampled responses", change("judge_nll", **hack),
         "token's rises"),
        (f"format from no fine-tuning (Stage B export / base), {f0['steps']} GRPO steps, latent / token: sampled "
         f"well-formed", change("sampled_format", r["format-latent"], r["format-token"]), ""),
        (f"format: first step with >= {FORMAT_AT} well formed, per seed (latent / token)",
         " / ".join(", ".join("-" if s is None else str(s) for s in map(format_step, r[f"format-{lv}"]))
                    for lv in ("latent", "token")), "paper: ~10 latent, ~20 token"),
    ]
    return rows


def diversity_rows(d: dict) -> list[tuple]:
    """QD rows (diversity_claims): mean [range] over the seeds."""
    rows = [(f"QD, Stage A export continuing general text ({len(next(iter(d['stage_a'].values())))} seeds): "
             "random latent actions / base token sampling / random tokens",
             " / ".join(spread(d["stage_a"][m], ".2f") for m in d["stage_a"]),
             "paper " + " / ".join(f"{PAPER_QD[m]:.2f}" for m in d["stage_a"]))]
    rows += [(f"QD of {d['m']} sampled answers to each of {d['prompts']} held-out prompts: latent before / after RL",
              " / ".join(spread(d["responses"][f"latent {w} RL"], ".2f") for w in ("before", "after")),
              "latent explores more than token"),
             ("QD of the answers: token before / after RL; random latent actions",
              " / ".join(spread(d["responses"][f"token {w} RL"], ".2f") for w in ("before", "after"))
              + "; " + spread(d["responses"]["random latent actions"], ".2f"), "")]
    return rows


def main(argv=None):
    a = parse_pipeline_args(sys.argv[1:] if argv is None else argv)
    if world_from_env().launched:
        raise SystemExit("pipeline.py runs the tiny preset in one process: start it with python, not torchrun")
    if a.claims:
        a.pipeline_seconds = check_pipeline_ran(a).get("seconds", 0.0)
    try:
        run_pipeline(a)                  # --claims: what finished is read, the rest of the claims' runs train
        if a.claims:
            run_search(a)
    finally:
        release_locks()                  # the run directories' locks, however the run ended


if __name__ == "__main__":
    main()
