"""The PNG plots of eval.py's `plot` command and of the pipeline: every run's loss curve, Stage A's action usage
(direct assignment against the VQ ablation), RL's reward over latent actions against tokens, and the diversity
comparison. matplotlib is optional: `pyplot()` is None without it, and nothing here needs it otherwise."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(step rows, eval rows) of a run's metrics.jsonl; an unreadable line (a run being killed) is skipped."""
    steps, evals = [], []
    f = run_dir / "metrics.jsonl"
    for line in f.read_text().splitlines() if f.exists() else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        (steps if "step" in row else evals).append(row)
    return steps, evals


def run_dirs(runs: Path) -> list[Path]:
    """Every run directory under `runs` (one with a metrics.jsonl), at any depth."""
    return sorted(p.parent for p in runs.rglob("metrics.jsonl"))


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def loss_series(steps: list[dict]) -> dict:
    """{label: (x, y)} to draw for a run: each phase's loss, and its parts (ce, vq, reg) when they differ from it.
    An RL run (rl.py: rows with a reward) draws its reward and KL instead: GRPO's loss is ~0 by construction (the
    advantages of a group sum to 0 and the ratio starts at 1 every step), so its curve says nothing."""
    rl = any("reward" in r for r in steps)
    series = {}
    for r in steps:
        phase = r.get("phase", "")
        for key in (("reward", "kl") if rl else ("loss", "ce", "vq", "reg")):
            if key in r and (rl or key == "loss" or r[key] != r.get("loss")):
                label = f"{phase} {key}".strip() if phase else key
                xs, ys = series.setdefault(label, ([], []))
                xs.append(r["step"])
                ys.append(r[key])
    return series


def plot_losses(plt, runs: Path) -> list[Path]:
    """<run>/loss.png for every run with loss rows, and runs/losses.png: all of them on one page."""
    written, panels = [], []
    for d in run_dirs(runs):
        series = loss_series(read_metrics(d)[0])
        if not series:
            continue
        panels.append((d, series))
        fig, ax = plt.subplots(figsize=(6, 3.6))
        draw_losses(ax, d, series, runs)
        fig.tight_layout()
        written.append(save(fig, plt, d / "loss.png"))
    if panels:
        cols = min(3, len(panels))
        rows = math.ceil(len(panels) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.4 * rows), squeeze=False)
        for ax, (d, series) in zip(axes.flat, panels):
            draw_losses(ax, d, series, runs)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        fig.tight_layout()
        written.append(save(fig, plt, runs / "losses.png"))
    return written


def draw_losses(ax, d: Path, series: dict, runs: Path):
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, label=label, lw=1.4)
    rl = "reward" in series
    ax.set_title(f"{d.relative_to(runs) if d != runs else d.name}: training {'reward' if rl else 'loss'}", fontsize=10)
    ax.set_xlabel("RL step" if rl else "optimizer step")
    ax.set_ylabel("reward; KL (nats / token)" if rl else
                  "loss (nats / token)" + ("; vq: mean squared distance" if any("vq" in k for k in series) else ""))
    values = [y for _, ys in series.values() for y in ys]
    if min(values) <= 0:
        ax.axhline(0, color="grey", lw=0.5)
    elif max(values) / min(values) > 20:          # the VQ ablation: its codebook loss dwarfs the CE
        ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def plot_usage(plt, runs: Path, usage: dict) -> Path | None:
    """runs/action_usage.png: each action's share of held-out transitions after Stage A, most used first, for direct
    assignment and for the VQ ablation side by side."""
    kinds = [k for k in ("direct", "vq") if k in usage]
    if not kinds:
        return None
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 3.6), squeeze=False, sharey=True)
    for ax, kind in zip(axes[0], kinds):
        counts = np.array(usage[kind]["counts"], dtype=float)
        share = np.sort(counts / counts.sum())[::-1]
        K = len(counts)
        ax.bar(np.arange(K), share, color="tab:blue" if kind == "direct" else "tab:red")
        ax.axhline(1 / K, color="grey", ls="--", lw=0.8, label=f"uniform 1/{K}")
        name = "direct assignment (CoLA)" if kind == "direct" else "VQ codebook (ablation)"
        ax.set_title(f"{name}, {usage[kind]['run']}: {usage[kind]['alive']} / {K} actions used", fontsize=10)
        ax.set_xlabel("action, by rank of usage")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].set_ylabel("share of held-out transitions")
    fig.tight_layout()
    return save(fig, plt, runs / "action_usage.png")


def rl_runs(runs: Path) -> list[tuple[Path, dict]]:
    """rl.py's run directories under `runs` (config.json with a level and a stage rl-*), with their configs."""
    out = []
    for d in run_dirs(runs):
        try:
            cfg = json.loads((d / "config.json").read_text())
        except (OSError, ValueError):
            continue
        if str(cfg.get("stage", "")).startswith("rl-") and cfg.get("level") in ("latent", "token"):
            out.append((d, cfg))
    return out


def plot_rl(plt, runs: Path) -> Path | None:
    """runs/rl_reward.png: training reward per step (left) and the held-out sampled well-formed rate (right), RL over
    latent actions in blue, over tokens in orange, one line per run."""
    found = rl_runs(runs)
    if not found:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    for d, cfg in found:
        steps, evals = read_metrics(d)
        color = "tab:blue" if cfg["level"] == "latent" else "tab:orange"
        label = f"{cfg['level']} {cfg.get('algo', '')} ({d.relative_to(runs)})"
        if steps:
            left.plot([r["step"] for r in steps], [r["reward"] for r in steps], color=color, alpha=0.8, lw=1.2,
                      label=label)
        pts = sorted((e["eval"]["step"], e["eval"]["sampled_format"]) for e in evals
                     if isinstance(e.get("eval"), dict) and "sampled_format" in e["eval"])
        if pts:
            right.plot(*zip(*pts), marker="o", color=color, lw=1.2, label=label)
    left.set_title("training reward (mean over the step's samples)", fontsize=10)
    right.set_title("held-out: sampled responses well formed", fontsize=10)
    for ax in (left, right):
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return save(fig, plt, runs / "rl_reward.png")


def diversity_results(runs: Path) -> tuple[Path, dict] | None:
    """The newest eval/diversity.json under `runs` (the pipeline writes pretrain/eval/diversity.json)."""
    found = sorted(runs.glob("*/eval/diversity.json"), key=lambda p: p.stat().st_mtime)
    return (found[-1], json.loads(found[-1].read_text())) if found else None


def plot_diversity(plt, runs: Path, paper_qd: dict) -> Path | None:
    """runs/diversity.png: QD per method, ours (frozen-base embeddings) beside the paper's (paper_qd: BGE-M3, in the
    order to draw); distinct-1, -2."""
    res = diversity_results(runs)
    if res is None:
        return None
    f, div = res
    names = [n for n in paper_qd if n in div["methods"]]
    ours = [div["methods"][n]["qd"] for n in names]
    x = np.arange(len(names))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    finite = [v for v in ours if math.isfinite(v)]
    top = max(finite + [max(paper_qd.values())]) * 1.15
    left.bar(x - 0.2, [min(v, top) for v in ours], 0.4, label="ours: frozen-base embeddings (substitute)")
    left.bar(x + 0.2, [paper_qd[n] for n in names], 0.4, label="paper: BGE-M3")
    for xi, v in zip(x, ours):
        left.text(xi - 0.2, min(v, top), f"{v:.2f}" if math.isfinite(v) else "inf", ha="center", va="bottom",
                  fontsize=8)
    left.set_xticks(x, names, fontsize=8)
    left.set_ylabel("QD = 1 / mean pairwise cosine similarity")
    left.set_title(f"semantic diversity, {div['m']} continuations x {div['prefixes']} prefixes "
                   f"({f.parent.parent.name})", fontsize=10)
    left.set_ylim(0, top * 1.3)                       # room for the legend above the bars
    left.legend(fontsize=7, loc="upper left")
    for i, (key, color) in enumerate((("distinct_1", "tab:green"), ("distinct_2", "tab:olive"))):
        right.bar(x + (i - 0.5) * 0.4, [div["methods"][n][key] for n in names], 0.4, color=color,
                  label=key.replace("_", "-"))
    right.set_xticks(x, names, fontsize=8)
    right.set_ylabel("distinct word n-grams / all n-grams")
    right.set_title("lexical diversity (distinct-n, the same continuations)", fontsize=10)
    right.legend(fontsize=7, loc="lower right")
    for ax in (left, right):
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return save(fig, plt, runs / "diversity.png")


def save(fig, plt, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
