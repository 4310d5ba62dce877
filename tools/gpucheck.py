"""The first thing to run on a GPU: what kernels run, how fast Stage A trains, whether the memory plan holds, and
whether torchrun, FSDP2 and the asynchronous checkpoints work there. One command, nothing installed, at most ~8
minutes on one H100 / H200 (each torchrun stage is cut at 300 s); one JSON written, one line printed.

    python -m tools.gpucheck                      # on the GPU: writes runs/gpucheck.json
    python -m tools.gpucheck --dry-run            # on a CPU, tiny shapes: every step of the check in ~30 s (CI)

The shape: the 8B width and vocabulary (D 4096, V 128,256, the 8B CoLA's IDM and merge module) with --layers
base blocks (default 4, of 32) and 2 policy blocks, random weights (the frozen base stored in bf16, as the official
one), micro batch 4 x 2048 (PAPER.md §3); --dry-run uses the tiny preset at 2 x 64. What is measured:

  device       the GPU (or CPU), torch and CUDA versions, the measured matmul peak of bf16 and fp32 (TF32 off),
               the data-sheet bf16 dense peak where the GPU is known
  attention    the attention kernel torch's SDPA picks for the reduced Llama's forward in bf16 and in fp32 (the
               aten op below autocast)
  logits       the reduced Llama's logits under bf16 autocast against fp32: max and mean |difference| and the share
               of positions whose argmax agrees
  loss         the chunked vocabulary loss (infra/ce.lm_head_ce) against the plain one (logits then masked_ce),
               both under bf16 autocast: loss and gradient differences, seconds and peak memory of each
  stage_a      Stage A's training step (train.pretrain_loss, AdamW on IDM + codebook + merge): tokens/s, MFU
               against the data sheet and against the measured peak, peak memory (torch's allocator) against
               infra/memory.plan for the same shape (the plan without CONTEXT_BYTES, which the allocator does not
               see)
  rl           one latent and one token rollout (--rl-rows rows of --rl-new tokens) and update (forward and
               backward over prompt + new positions): seconds of each, as tools.bench --rl-step-cost at tiny
  torchrun     `torchrun --nproc_per_node=1 train.py --stage base` then `--stage pretrain`, both --async-save, at
               the tiny preset (NCCL and DCP on the GPU): exit codes, seconds, final/ written

FLOPs per Stage A token (Kaplan et al. 2020's 2 per weight forward, x3 with backward): the frozen base forward
(2 N_base + 4 L T D of attention), the IDM and merge forward and backward (6 N + 12 L T D for the IDM's blocks),
and W_lm forward and backward to its input only (4 D V: it is frozen). Norms, RoPE, softmax left out; attention
over the full T x T square, as is the convention (causal attention computes half of it, so MFU reads high).

Deviations: none from the paper (this is tooling).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cola import COLA_PRESETS, CoLA
from data import Batch
from infra import memory
from infra.ce import lm_head_ce, masked_ce
from infra.files import atomic_write, check_out_file
from infra.trainer import machine, set_trainable
from model import PRESETS, Transformer
from tools.bench import interleaved_seconds, matmul_peak, rl_step_seconds, sync
import train

REPO = Path(__file__).resolve().parents[1]
GiB = 2**30
# bf16 dense tensor-core FLOP/s from the vendors' data sheets (no sparsity), by a substring of the device name
DATASHEET = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12),
             ("L40S", 362e12), ("L40", 181e12), ("A10G", 70e12), ("L4", 121e12)]


def parse(argv=None):
    p = argparse.ArgumentParser(description="One-command check of a GPU: kernels, Stage A speed and memory, RL "
                                "steps, torchrun with async checkpoints. Writes one JSON, prints one line.")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on whatever device: checks the check itself")
    p.add_argument("--device", default="", help="default: cuda if available, else cpu")
    p.add_argument("--layers", type=int, default=4, help="base blocks of the reduced 8B shape (1..32)")
    p.add_argument("--steps", type=int, default=6, help="timed Stage A steps (after 2 warm-up)")
    p.add_argument("--rl-rows", type=int, default=16, help="rollouts of the RL timing")
    p.add_argument("--rl-new", type=int, default=256, help="new tokens per rollout of the RL timing")
    p.add_argument("--out", default="runs/gpucheck.json", help="the JSON written (atomically)")
    p.add_argument("--skip-torchrun", action="store_true", help="leave out the torchrun part")
    a = p.parse_args(argv)
    if not 1 <= a.layers <= 32:
        raise SystemExit(f"--layers {a.layers}: expected 1..32 base blocks")
    for flag in ("steps", "rl_rows", "rl_new"):
        if getattr(a, flag) < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} {getattr(a, flag)}: expected at least 1")
    check_out_file(a.out, "--out")             # before minutes of work, not after
    a.device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if a.device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {a.device}: no CUDA device is visible to torch {torch.__version__}")
    if a.device.type == "cuda":
        torch.cuda.set_device(a.device)        # cuda:N: timings synchronise, and the report names, that GPU
    if a.dry_run:
        a.steps, a.rl_rows, a.rl_new = min(a.steps, 2), min(a.rl_rows, 2), min(a.rl_new, 8)
    return a


def shape(a) -> tuple[str, int, int]:
    """Register the reduced preset (model.PRESETS / cola.COLA_PRESETS, so memory.plan reads it by name) and return
    (name, micro batch, sequence length)."""
    if a.dry_run:
        base, cola_args, name, (B, T) = PRESETS["tiny"], COLA_PRESETS["tiny"], "gpucheck-tiny", (2, 64)
    else:
        base, cola_args, name, (B, T) = PRESETS["llama-3.1-8b"], COLA_PRESETS["llama-3.1-8b"], "gpucheck-8b", (4, 2048)
    PRESETS[name] = replace(base, n_layers=min(a.layers, base.n_layers))
    COLA_PRESETS[name] = replace(cola_args, n_policy_layers=2)
    return name, B, T


def peak_memory(device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def reset_memory(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def device_info(a) -> dict:
    n = 256 if a.dry_run else 8192
    torch.backends.cuda.matmul.allow_tf32 = False
    info = {**machine(a.device.type), "torch": torch.__version__, "cuda": torch.version.cuda,
            "peak_bf16": matmul_peak(torch.bfloat16, n, a.device), "peak_fp32": matmul_peak(torch.float32, n, a.device)}
    name = info.get("gpu", "")
    info["datasheet_bf16"] = next((f for k, f in DATASHEET if k in name), None)
    if a.device.type == "cuda":
        info["memory_gib"] = round(torch.cuda.get_device_properties(a.device).total_memory / GiB, 1)
    return info


class OpNames(TorchDispatchMode):
    """The aten ops that run below autograd and autocast: after SDPA picked its kernel."""

    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def attention_kernels(llama: Transformer, T: int, device) -> dict:
    """The SDPA kernel each dtype runs in a forward of the reduced Llama (aten._scaled_dot_product_*)."""
    x = torch.randint(0, llama.args.vocab_size, (1, T), device=device)
    out = {}
    for dtype in ("bfloat16", "float32"):
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=dtype == "bfloat16"), \
                OpNames() as ops:
            llama(x)
        out[dtype] = sorted(n.removeprefix("aten.") for n in ops.names if "attention" in n)
    return out


def logits_check(llama: Transformer, B: int, T: int, device) -> dict:
    x = torch.randint(0, llama.args.vocab_size, (B, T), device=device)
    with torch.no_grad():
        ref = llama(x).float()
        with torch.autocast(device.type, torch.bfloat16):
            low = llama(x).float()
    d = (low - ref).abs()
    return {"max_abs": d.max().item(), "mean_abs": d.mean().item(), "ref_std": ref.std().item(),
            "argmax_agree": (low.argmax(-1) == ref.argmax(-1)).float().mean().item()}


def loss_check(llama: Transformer, B: int, T: int, device) -> dict:
    """Chunked against plain vocabulary loss on the same states, under bf16 autocast."""
    V = llama.args.vocab_size
    x = torch.randint(0, V, (B, T + 1), device=device)
    with torch.no_grad():
        h = llama.hidden(x[:, :-1]).float()                                             # [B, T, D]
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    out, grads = {}, {}
    for name in ("chunked", "plain", "chunked", "plain"):   # the first two warm up; the last two are reported
        s = h.clone().requires_grad_(True)
        reset_memory(device)
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, torch.bfloat16):
            loss = (lm_head_ce(llama.output, s, x[:, 1:], mask) if name == "chunked"
                    else masked_ce(llama.output(s), x[:, 1:], mask))
        loss.backward()
        sync(device)
        out[name] = {"loss": loss.item(), "seconds": time.perf_counter() - t0, "peak_bytes": peak_memory(device)}
        grads[name] = s.grad
    out["loss_diff"] = abs(out["chunked"]["loss"] - out["plain"]["loss"])
    out["grad_rel_diff"] = ((grads["chunked"] - grads["plain"]).norm() / grads["plain"].norm()).item()
    return out


def stage_a_flops_per_token(m: CoLA, T: int) -> float:
    n = lambda mod: sum(p.numel() for p in mod.parameters())               # noqa: E731
    a, c = m.base_args, m.args
    blocks = sum(n(b) for b in m.base.layers)
    attn = lambda L: 4 * L * T * a.dim                                      # noqa: E731  (forward, per token)
    return (2 * blocks + attn(a.n_layers) + 3 * (2 * n(m.idm) + attn(c.n_idm_layers)) + 6 * n(m.merge)
            + 4 * a.dim * a.vocab_size)


def stage_a_check(name: str, B: int, T: int, steps: int, device, info: dict) -> dict:
    cfg = train.stage_config("pretrain", name, micro_batch=B, seq_len=T, dtype="bfloat16")
    with torch.device(device):
        m = CoLA(PRESETS[name], COLA_PRESETS[name])
    m.init_weights()
    m.base.to(torch.bfloat16)                                  # the official base's weights are bf16 values
    set_trainable(m, train.TRAINS["pretrain"][0])              # IDM, codebook, merge module
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    x = torch.randint(0, m.base_args.vocab_size, (B, T + 1), device=device)
    b = Batch(x, torch.ones_like(x, dtype=torch.bool), torch.arange(B))
    loss_fn = train.stage_losses("pretrain", cfg)[0]

    def step():
        with torch.autocast(device.type, torch.bfloat16):
            loss, _ = loss_fn(m, b)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    reset_memory(device)
    seconds = interleaved_seconds({"step": step}, steps, device, warmup=2)["step"]
    s = sorted(seconds)[len(seconds) // 2]
    tps = B * T / s
    flops = stage_a_flops_per_token(m, T) * tps
    planned = memory.plan("pretrain", cfg, train.TRAINS["pretrain"], 1).total
    peak = peak_memory(device)
    out = {"tokens_per_s": tps, "step_seconds": seconds, "flops_per_s": flops,
           "mfu_measured_peak": flops / info["peak_bf16"],
           "mfu_datasheet": flops / info["datasheet_bf16"] if info["datasheet_bf16"] else None,
           "peak_bytes": peak, "planned_bytes": planned, "plan_over_measured": planned / peak if peak else None}
    del m, opt
    return out


def rl_check(name: str, rows: int, new: int, device) -> dict:
    """Seconds of a latent and a token rollout and update at the reduced shape, the prompt 64 tokens, as rl.py under
    torchrun in bf16 (tools.bench.rl_step_seconds)."""
    out = rl_step_seconds(rows, 64, new, 2, preset=name, device=device, bf16=True)
    return {**{k.replace(" ", "_"): v for k, v in out.items()}, "rows": rows, "prompt": 64, "new": new}


def torchrun_check(a) -> dict:
    """base then pretrain at the tiny preset under torchrun with one process and --async-save, in a temporary
    directory: exit code, seconds and whether final/ was written, per stage."""
    steps, extra = (4, ["--seq-len", "32", "--micro-batch", "2", "--global-batch", "2"]) if a.dry_run else (40, [])
    out, run = {}, [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                    str(REPO / "train.py")]
    with tempfile.TemporaryDirectory() as tmp:
        for stage, init in (("base", None), ("pretrain", Path(tmp) / "base/final")):
            argv = run + ["--stage", stage, "--out-dir", str(Path(tmp) / stage), "--steps", str(steps),
                          "--ckpt-every", str(steps // 2), "--async-save", "--eval-batches", "1",
                          "--device", str(a.device.type), *extra] + (["--init", str(init)] if init else [])
            t0 = time.time()
            p = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 start_new_session=True)   # its own process group: a timeout kills the workers too
            try:
                text, rc = p.communicate(timeout=300)[0], p.returncode
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                text, rc = p.communicate()[0] + "\nkilled after 300 s", "timeout"
            tail = text.strip().splitlines()[-30:]             # the worker's error, above torchrun's banner
            out[stage] = {"rc": rc, "seconds": round(time.time() - t0, 1),
                          "final": (Path(tmp) / stage / "final/config.json").exists()}
            if rc != 0:
                out[stage]["error"] = tail
                break
    return out


def summary(r: dict) -> str:
    d, s, lo = r["device"], r["stage_a"], r["loss"]
    where = d.get("gpu") or d["cpu"]
    mfu = (f"MFU {s['mfu_datasheet']:.0%} of data sheet, " if s["mfu_datasheet"] else "") + \
        f"{s['mfu_measured_peak']:.0%} of measured peak"
    mem = (f"peak {s['peak_bytes'] / GiB:.1f} GiB vs plan {s['planned_bytes'] / GiB:.1f}" if s["peak_bytes"]
           else "peak memory: not on CPU")
    tr = r.get("torchrun")
    runs = "torchrun skipped" if tr is None else "torchrun base->pretrain " + (
        "ok" if all(v["rc"] == 0 and v["final"] for v in tr.values()) and len(tr) == 2 else "FAILED")
    att = "/".join(",".join(k.removeprefix("_scaled_dot_product_") for k in v) or "?"
                   for v in r["attention"].values())
    return (f"gpucheck on {where}: attention bf16/fp32 {att}; Stage A {s['tokens_per_s']:.0f} tok/s, {mfu}; {mem}; "
            f"chunked loss |d| {lo['loss_diff']:.1e}; {runs} -> {r['out']}")


def main(argv=None) -> dict:
    a = parse(argv)
    t0 = time.time()
    name, B, T = shape(a)
    try:
        r = check(a, name, B, T)
    finally:                                   # the reduced preset leaves the tables as it found them
        PRESETS.pop(name, None)
        COLA_PRESETS.pop(name, None)
    r["seconds"], r["out"] = round(time.time() - t0, 1), a.out
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(Path(a.out), lambda t: t.write_text(json.dumps(r, indent=1) + "\n"))
    print(summary(r))
    return r


def check(a, name: str, B: int, T: int) -> dict:
    r = {"dry_run": a.dry_run, "shape": {"preset": name, "layers": PRESETS[name].n_layers, "micro_batch": B,
                                          "seq_len": T, "dim": PRESETS[name].dim, "vocab": PRESETS[name].vocab_size}}
    r["device"] = device_info(a)
    torch.manual_seed(0)
    with torch.device(a.device):
        llama = Transformer(PRESETS[name])
    llama.init_weights()
    llama.eval().requires_grad_(False)
    r["attention"] = attention_kernels(llama, T, a.device)
    r["logits"] = logits_check(llama, 1, T, a.device)
    r["loss"] = loss_check(llama, B, T, a.device)
    del llama
    r["stage_a"] = stage_a_check(name, B, T, a.steps, a.device, r["device"])
    r["rl"] = rl_check(name, a.rl_rows, a.rl_new, a.device)
    if not a.skip_torchrun:
        r["torchrun"] = torchrun_check(a)
    return r


if __name__ == "__main__":
    main()
