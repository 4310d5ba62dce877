"""Speed and memory of model.py on this machine, next to transformers' LlamaForCausalLM with the identical config.

What it measures (one run, one machine, so every ratio compares like with like):
  peak      the best FLOP/s of large square matrix multiplies, float32 and bfloat16: the roof MFU is measured
            against (measured here rather than read from a data sheet, so it is honest about this CPU/GPU);
  train     tokens/s of forward + backward + AdamW step on random tokens, float32 and bfloat16 autocast, and the
            achieved FLOP/s as a fraction of the matching peak (MFU);
  generate  new tokens/s of greedy decoding with the KV cache, batch 1 and batch 8;
  load-rss  (--load-rss) peak resident memory of Transformer.from_pretrained in a fresh process, for an HF
            safetensors and a Meta consolidated.00.pth checkpoint with the llama-3.2-1b shapes (random bf16
            weights written to a temporary directory and deleted afterwards), against the checkpoint's size.

Run:
    python -m tools.bench                                  # tiny preset: ~30 s on a quiet 2-core CPU
    python -m tools.bench --preset tiny --steps 20 --batch 8 --seq 256
    python -m tools.bench --no-hf                          # ours only (transformers is optional)
    python -m tools.bench --threads 1                      # steadier on a CPU shared with other jobs
    python -m tools.bench --load-rss                       # writes ~2 x 2.5 GB to --tmp, ~1-2 minutes
    python -m tools.bench --memory-plan                    # bytes of each stage at 8B: one process, per GPU on 8
    python -m tools.bench --rl-memory-plan                 # the same for rl.py, latent and token level
    python -m tools.bench --rl-step-cost --threads 1       # FLOPs of one RL step per level (tiny, 8B), tiny timed
On a GPU the same commands run there (--device cuda); timings synchronise the device.

FLOP counting (Kaplan et al. 2020, PaLM appendix B), per trained token:
    6 * N + 12 * L * T * D
N counts the weights of every matrix multiply (all parameters except the embedding table, whose lookup does no
arithmetic; the output projection counts even when it is tied to the embeddings). 6 = 2 (multiply-add) x 3
(forward, backward to activations, backward to weights). 12 * L * T * D is attention's Q K^T and A V (2 * 2 * T * D
per token and layer forward, x3 with backward), counted over the full T x T square as is the convention although
causal attention needs only half. Generation (forward only): 2 * N + 4 * L * S * D per new token, S = the
context length it attends to.

Deviations: none from the paper (this is tooling); transformers is imported only here and in tests.
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from infra.checkpoint import hf_config, meta_to_hf, save_hf_checkpoint
from model import PRESETS, ModelArgs, Transformer

p = argparse.ArgumentParser(description="Training/generation throughput and load memory of model.py vs "
                            "transformers' LlamaForCausalLM.")
p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model size (ModelArgs preset)")
p.add_argument("--steps", type=int, default=10,
               help="timed training steps per model and dtype (interleaved, after 2 warm-up)")
p.add_argument("--batch", type=int, default=8, help="training batch B")
p.add_argument("--seq", type=int, default=256, help="training sequence length T")
p.add_argument("--prompt-len", type=int, default=16, help="generation prompt length")
p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per row")
p.add_argument("--peak-n", type=int, default=2048, help="the peak is the best of square matmuls of this side "
               "and half of it")
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads (torch.set_num_threads)")
p.add_argument("--no-hf", action="store_true", help="skip the transformers comparison")
p.add_argument("--load-rss", action="store_true", help="only measure peak RSS of from_pretrained (see docstring)")
p.add_argument("--rss-preset", default="llama-3.2-1b", choices=sorted(PRESETS), help="shapes for --load-rss")
p.add_argument("--tmp", default=tempfile.gettempdir(), help="where --load-rss writes its checkpoints")
p.add_argument("--memory-plan", action="store_true", help="only print the memory plan of every training stage, "
               "one process and per GPU on --gpus GPUs (memory.plan)")
p.add_argument("--rl-memory-plan", action="store_true", help="only print the per-GPU memory plan of rl.py at 8B, "
               "latent and token level (arithmetic, see rl_memory_plan)")
p.add_argument("--rl-step-cost", action="store_true", help="only print the FLOPs of one RL step per rollout, latent "
               "and token level, at the tiny preset and at 8B (--rl-prompt, --rl-new), and time its two costly phases "
               "at the tiny preset (--batch rollouts, --steps rounds)")
p.add_argument("--rollouts", type=int, default=16, help="--rl-memory-plan: rollouts per GPU per step")
p.add_argument("--rl-prompt", type=int, default=512, help="--rl-memory-plan, --rl-step-cost (8B): prompt tokens")
p.add_argument("--rl-new", type=int, default=1024, help="--rl-memory-plan, --rl-step-cost (8B): generated tokens")
p.add_argument("--gpus", type=int, default=8, help="--memory-plan: GPUs the state is sharded over")
p.add_argument("--micro-batch", type=int, default=4, help="--memory-plan, --rl-memory-plan: sequences per GPU "
               "per forward")


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleaved_seconds(fns: dict, rounds: int, device, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of each call of each fn, calling them in turn round after round.

    Shared machines (this 2-core VM included) change speed by up to 10x over seconds when a neighbour runs.
    Interleaving gives ours and transformers the same conditions; the best round filters the bursts (timeit's
    rule), the median shows how noisy the run was.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    return times


def best_and_median(work: float, seconds: list[float]) -> tuple[float, float]:
    """work / s for the best and the median call."""
    s = sorted(seconds)
    return work / s[0], work / s[len(s) // 2]


# ----------------------------------------------------------------------------------------------------------------
# Peak: large square matmuls


def matmul_peak(dtype, n: int, device, seconds: float = 1.0) -> float:
    """Best FLOP/s of C = A B with A, B [n, n] (2 n^3 FLOPs) over calls repeated for about `seconds`."""
    a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
    mm = {"mm": lambda: a @ b}
    once = interleaved_seconds(mm, 1, device)["mm"][0]
    return best_and_median(2 * n ** 3, interleaved_seconds(mm, max(3, int(seconds / once)), device, 0)["mm"])[0]


def measure_peaks(ns, device) -> dict[str, float]:
    """Best over sizes ns of each dtype's matmul FLOP/s."""
    return {dt: max(matmul_peak(getattr(torch, dt), n, device) for n in ns) for dt in ("float32", "bfloat16")}


# ----------------------------------------------------------------------------------------------------------------
# FLOPs


def matmul_params(model: torch.nn.Module, args: ModelArgs) -> int:
    """N: every parameter except the embedding table; the output projection counts (also when tied)."""
    n = sum(p.numel() for p in model.parameters())
    return n if args.tie_embeddings else n - args.vocab_size * args.dim


def train_flops_per_token(n: int, args: ModelArgs, T: int) -> float:
    return 6 * n + 12 * args.n_layers * T * args.dim                 # Eq: 6N + 12 L T D


def generate_flops(n: int, args: ModelArgs, batch: int, prompt: int, new: int) -> float:
    """Forward only: the prefill of the prompt, then one token at a time attending to S = prompt + i keys."""
    prefill = batch * prompt * (2 * n + 4 * args.n_layers * prompt * args.dim)
    decode = batch * sum(2 * n + 4 * args.n_layers * (prompt + i) * args.dim for i in range(1, new))
    return prefill + decode


# ----------------------------------------------------------------------------------------------------------------
# Training and generation steps, ours and transformers'


def train_step(model, logits_fn, tokens, autocast: bool, device):
    """One forward + backward + AdamW step on next-token cross-entropy; tokens [B, T+1]."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    inp, tgt = tokens[:, :-1], tokens[:, 1:]                                              # [B, T]
    dev_type = torch.device(device).type

    def step():
        with torch.autocast(dev_type, dtype=torch.bfloat16, enabled=autocast):
            logits = logits_fn(inp)                                                       # [B, T, V]
        loss = F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten())   # Eq: L = CE(p(x_{t+1} | x_<=t))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def ours_generate(model, prompts, new: int):
    def run():
        out = model.generate(prompts, new, temperature=0.0)
        assert all(len(o) == new for o in out)

    return run


def hf_generate(hf, prompts, new: int, device):
    ids = torch.tensor(prompts, device=device)                                            # [B, T]
    mask = torch.ones_like(ids)

    @torch.no_grad()
    def run():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                          pad_token_id=0, use_cache=True)
        assert out.shape[1] == ids.shape[1] + new

    return run


def load_transformers():
    try:
        import transformers
        from transformers import LlamaForCausalLM
    except ImportError:
        return None
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return LlamaForCausalLM


def throughput(a):
    args, device = PRESETS[a.preset], a.device
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, preset {a.preset}: "
          f"{args}")

    # ---- peak, measured before and after the workloads (a shared machine's speed drifts): the best is the roof
    ns = (a.peak_n // 2, a.peak_n)
    peak = measure_peaks(ns, device)

    # ---- models: ours, and transformers' with the same weights (written by save_pretrained, read by HF)
    ours = Transformer(args).to(device)
    ours.init_weights()
    ours.eval()
    n = matmul_params(ours, args)
    flops_tok = train_flops_per_token(n, args, a.seq)
    print(f"N (matmul parameters) {n:,}; training FLOPs/token 6N + 12LTD = {flops_tok / 1e6:.1f} M; "
          f"batch {a.batch} x {a.seq} tokens, {a.steps} interleaved rounds")
    models = {"ours": (ours, lambda x: ours(x))}
    LlamaForCausalLM = None if a.no_hf else load_transformers()
    if LlamaForCausalLM is None and not a.no_hf:
        print("transformers not installed: comparison skipped")
    if LlamaForCausalLM is not None:
        with tempfile.TemporaryDirectory() as d:
            ours.save_pretrained(d)
            hf = LlamaForCausalLM.from_pretrained(d, dtype=torch.float32).to(device).eval()
        models["transformers"] = (hf, lambda x: hf(input_ids=x, use_cache=False).logits)

    # ---- measure: each configuration interleaves ours and transformers
    tokens = torch.randint(0, args.vocab_size, (a.batch, a.seq + 1), device=device)       # [B, T+1]
    results = {name: {} for name in models}       # name -> mode -> (best, median) tokens/s
    for mode, autocast in (("train fp32", False), ("train bf16-autocast", True)):
        for m, _ in models.values():
            m.train()
        steps = {name: train_step(m, fn, tokens, autocast, device) for name, (m, fn) in models.items()}
        for name, sec in interleaved_seconds(steps, a.steps, device, warmup=2).items():
            results[name][mode] = best_and_median(a.batch * a.seq, sec)
    for m, _ in models.values():
        m.eval()
    for b in (1, 8):
        prompts = torch.randint(0, args.vocab_size, (b, a.prompt_len)).tolist()
        runs = {"ours": ours_generate(ours, prompts, a.new_tokens)}
        if "transformers" in models:
            runs["transformers"] = hf_generate(models["transformers"][0], prompts, a.new_tokens, device)
        for name, sec in interleaved_seconds(runs, 3, device).items():
            results[name][f"generate B={b} fp32"] = best_and_median(b * a.new_tokens, sec)

    # ---- report
    for dt, flops in measure_peaks(ns, device).items():
        peak[dt] = max(peak[dt], flops)
    print(f"\nmatmul peak (square {' and '.join(map(str, ns))}, best call, before and after): float32 "
          f"{peak['float32'] / 1e9:.1f} GFLOP/s, bfloat16 {peak['bfloat16'] / 1e9:.1f} GFLOP/s")
    gen_flops_tok = {b: generate_flops(n, args, b, a.prompt_len, a.new_tokens) / (b * a.new_tokens) for b in (1, 8)}
    names = list(results)
    print(f"{'tokens/s: best (median)':26s}" + "".join(f"{k:>22s}" for k in names)
          + ("   ours/HF best" if len(names) > 1 else ""))
    for mode in results["ours"]:
        row = f"{mode:26s}" + "".join(f"{r[mode][0]:12.0f} ({r[mode][1]:6.0f})" for r in results.values())
        if len(names) > 1:
            row += f"{results['ours'][mode][0] / results['transformers'][mode][0]:14.2f}x"
        print(row)
    print(f"\n{'achieved FLOP/s, MFU':26s}" + "".join(f"{k:>22s}" for k in names))
    for mode in results["ours"]:
        fl = flops_tok if mode.startswith("train") else gen_flops_tok[1 if "B=1" in mode else 8]
        roof = peak["bfloat16" if "bf16" in mode else "float32"]
        print(f"{mode:26s}" + "".join(f"{r[mode][0] * fl / 1e9:10.1f} GF/s {r[mode][0] * fl / roof:6.1%}"
                                      for r in results.values()))
    print("MFU = best achieved FLOP/s / matmul peak of the same dtype (bf16-autocast against the bf16 peak)")
    from infra.trainer import machine_line, resolve_dtype
    kind = torch.device(device).type
    print(f"{machine_line(kind)}: --dtype auto trains in {resolve_dtype('auto', kind)} here")


# ----------------------------------------------------------------------------------------------------------------
# Peak RSS of from_pretrained in a fresh process


RSS_CHILD = r"""
import resource, sys, time, torch
sys.path.insert(0, {repo!r})
from model import Transformer
import safetensors.torch

def peak():   # (ru_maxrss in bytes: KiB on Linux, VmHWM of this process' own address space in bytes)
    hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, int(hwm) * 1024

if {path!r}:
    t0 = time.perf_counter()
    model = Transformer.from_pretrained({path!r}, dtype=torch.bfloat16)
    sec = time.perf_counter() - t0
    after_load = peak()
    for q in model.parameters():      # touch every weight: pages a loader maps lazily become resident now
        q.max()
    print(*after_load, *peak(), sec, sum(q.numel() * q.element_size() for q in model.parameters()))
else:
    print(*peak(), *peak(), 0.0, 0)
"""

RSS_WRITER = r"""
import sys
sys.path.insert(0, {repo!r})
from pathlib import Path
from tools import bench
bench.write_random_checkpoints(bench.PRESETS[{preset!r}], Path({root!r}))
"""


def child_rss(path: str) -> list[float]:
    """[ru_maxrss, VmHWM] after from_pretrained, the same after touching every weight (bytes), seconds, model
    bytes: of a new process. The parent stays small: Linux carries its peak RSS into a child's ru_maxrss."""
    code = RSS_CHILD.format(repo=str(Path(__file__).resolve().parents[1]), path=path)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"load-rss child failed for {path or 'baseline'}: {out.stderr.strip().splitlines()[-1]}")
    return [float(x) for x in out.stdout.split()]


def write_random_checkpoints(args: ModelArgs, root: Path) -> tuple[Path, Path]:
    """The preset's tensors, random bf16, as an HF directory and as a Meta directory."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(args).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    state = {k: torch.empty(s, dtype=torch.bfloat16).normal_(0, 0.02, generator=g) for k, s in shapes.items()
             if not (args.tie_embeddings and k == "output.weight")}
    hf_dir, meta_dir = root / "hf", root / "meta"
    save_hf_checkpoint(hf_dir, hf_config(args), meta_to_hf(state, args))
    if args.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]    # Meta's 3.2 files carry it; stored once here
    meta_dir.mkdir()
    torch.save(state, meta_dir / "consolidated.00.pth")
    params = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads,
              "vocab_size": args.vocab_size, "multiple_of": args.multiple_of,
              "ffn_dim_multiplier": args.ffn_dim_multiplier, "norm_eps": args.norm_eps,
              "rope_theta": args.rope_theta, "use_scaled_rope": args.use_scaled_rope,
              "rope_scale_factor": args.rope_scale_factor}
    (meta_dir / "params.json").write_text(json.dumps(params))
    return hf_dir, meta_dir


def load_rss(a):
    root = Path(tempfile.mkdtemp(prefix="bench-load-rss-", dir=a.tmp))
    try:
        t0 = time.perf_counter()
        code = RSS_WRITER.format(repo=str(Path(__file__).resolve().parents[1]), preset=a.rss_preset, root=str(root))
        subprocess.run([sys.executable, "-c", code], check=True)        # in a child: see child_rss
        hf_dir, meta_dir = root / "hf", root / "meta"
        print(f"wrote random bf16 {a.rss_preset} checkpoints to {root} in {time.perf_counter() - t0:.0f} s")
        base = child_rss("")
        print(f"baseline (python + import torch, model, safetensors): ru_maxrss {base[0] / 2**30:.2f} GiB, "
              f"VmHWM {base[1] / 2**30:.2f} GiB")
        print(f"{'GiB':26s}{'checkpoint':>11s}{'model':>7s}{'ru_maxrss':>10s}{'-base':>7s}{'ratio':>7s}"
              f"{'VmHWM':>7s}{'-base':>7s}{'ratio':>7s}{'touched':>9s}{'ratio':>7s}{'load s':>8s}")
        for name, d, pattern in (("HF model.safetensors", hf_dir, "*.safetensors"),
                                 ("Meta consolidated.00.pth", meta_dir, "consolidated.*.pth")):
            size = sum(f.stat().st_size for f in d.glob(pattern))
            rss, hwm, rss_touched, _, sec, nbytes = child_rss(str(d))
            gib = [x / 2**30 for x in (size, nbytes, rss, rss - base[0])]
            print(f"{name:26s}{gib[0]:11.2f}{gib[1]:7.2f}{gib[2]:10.2f}{gib[3]:7.2f}{(rss - base[0]) / size:7.2f}"
                  f"{hwm / 2**30:7.2f}{(hwm - base[1]) / 2**30:7.2f}{(hwm - base[1]) / size:7.2f}"
                  f"{rss_touched / 2**30:9.2f}{(rss_touched - base[0]) / size:7.2f}{sec:8.1f}")
        print("ratio = (peak - baseline) / checkpoint bytes; 'touched' = ru_maxrss after reading every weight once")
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# Memory plan of each training stage (bytes per GPU; memory.plan, arithmetic checked against fake-tensor runs)


def memory_plan(preset: str, gpus: int, micro: int, seq: int) -> str:
    """Two tables of memory.plan for every stage at its default flags (activation checkpointing at 8B for the
    stages that train the base, train.LARGE): one process, and per GPU under torchrun on `gpus` GPUs. GiB; "fits"
    compares total + memory.CONTEXT_BYTES with an 80 GiB GPU, as memory.check_fits does."""
    from infra import memory
    import train
    G = 2**30
    stages = ["pretrain", "bc", "fta-i", "fta-p", "sft"]
    head = ("| stage | AC | trained | state | frozen | FSDP buffers | bf16 copies | activations | loss | total | "
            "fits 80 GiB | peak at |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    out = []
    for n in (1, gpus):
        rows = []
        for stage in stages:
            cfg = train.stage_config(stage, preset, micro_batch=micro, seq_len=seq)
            p = memory.plan(stage, cfg, train.TRAINS[stage], n)
            at = (f"phase {p.phase + 1}, " if len(p.phases) > 1 else "") + p.moment
            fits = "yes" if p.total + memory.CONTEXT_BYTES <= 80 * G else "no"
            rows.append(f"| {stage} | {'yes' if cfg.activation_checkpointing else 'no'} | {p.trained / 1e9:.2f} B | "
                        + " | ".join(f"{v / G:.1f}" for v in (p.state, p.frozen, p.buffers, p.copies,
                                                             p.activations, p.loss, p.total))
                        + f" | {fits} | {at} |")
        where = "one process" if n == 1 else f"{n} GPUs, trained state sharded over {min(n, 8)}"
        out += ["", f"GiB per GPU, {where}: preset {preset}, micro batch {micro} x {seq} tokens", "", head, *rows]
    return "\n".join(out[1:])


def rl_memory_plan(preset: str, gpus: int, rollouts: int, prompt: int, new: int, micro: int) -> str:
    """memory.rl_plan per GPU under torchrun at bf16 (rl.build), latent and token level, GRPO, as a table; the
    categories and what they count are in rl_plan's docstring. rl.py runs the same plan before it loads anything
    (memory.check_rl_fits)."""
    from infra import memory
    G = 2**30
    plans = [memory.rl_plan(preset, level, gpus, rollouts, prompt, new, micro) for level in ("latent", "token")]
    head = ("| level | trained | replica (bf16) | reference | state | FSDP buffers | KV cache | update | gather | "
            "total |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [f"| {p.level} | {p.trained / 1e9:.2f} B | " + " | ".join(
        f"{v / G:.1f}" for v in (p.replica, p.reference, p.state, p.buffers, p.kv, p.update, p.gather, p.total))
        + " |" for p in plans]
    note = (f"GiB per GPU: rl.py, preset {preset}, {gpus} GPUs, {rollouts} rollouts per GPU of {prompt} prompt + "
            f"{new} new tokens, update micro batch {micro} with activation checkpointing; total counts the largest "
            f"of KV cache (generation), update and gather (the replica's refresh), which never coexist")
    return "\n".join([note, head, *lines])


# ----------------------------------------------------------------------------------------------------------------
# The cost of one RL step per level (rl.py): FLOPs by arithmetic at any preset, seconds measured at the tiny one


def rl_step_flops(preset: str, prompt: int, new: int) -> dict:
    """FLOPs of one GRPO step of rl.py per rollout of `prompt` + `new` tokens, by phase, latent and token level.

    rollout    generation: the prompt's prefill, then one position per new token through the base (decoding
               attends to every earlier key); latent adds pi's blocks and head on every position and the merge
               module + W_lm once per new token; token adds W_lm once per new token;
    log-probs  the teacher-forced pass over all prompt + new positions for the behaviour and reference log-probs
               (rl.log_probs): latent runs the frozen base once (its states h are kept for the update) and pi and
               the reference pi over them; token runs the LM and the reference LM, W_lm included, on every position;
    update     forward and backward of what trains (x3 the forward): pi over every position (latent, on the kept h),
               the whole LM with W_lm (token).
    Linear layers at 2 FLOPs per weight per row; attention 4 x D per (query, key) per layer over the score matrix
    the kernels compute (the full square when teacher-forced). Norms, RoPE and softmax are left out."""
    from cola import COLA_PRESETS, CoLA
    from infra.treecache import matmul_params as W         # the Linear weights: a multiply-add each per row
    with torch.device("meta"):
        m = CoLA(PRESETS[preset], COLA_PRESETS[preset])
    a, c = m.base_args, m.args
    L, fed = prompt + new, prompt + new - 1                  # the last new token is generated, never fed back
    decode_keys = prompt * prompt + sum(prompt + i for i in range(1, new))       # prefill square, then one by one
    stack = lambda n_w, layers, keys, rows: 2 * n_w * rows + 4 * a.dim * layers * keys   # noqa: E731
    base = lambda keys, rows: stack(W(*m.base.layers), a.n_layers, keys, rows)          # noqa: E731
    pi = lambda keys, rows: stack(W(*m.policy.layers, m.policy.head), c.n_policy_layers, keys, rows)  # noqa: E731
    head = 2 * a.dim * a.vocab_size
    wm = 2 * (W(m.merge) + a.dim * a.vocab_size)
    latent = {"rollout": base(decode_keys, fed) + pi(decode_keys, fed) + wm * new,
              "log-probs": base(L * L, L) + 2 * pi(L * L, L), "update": 3 * pi(L * L, L)}
    token = {"rollout": base(decode_keys, fed) + head * new,
             "log-probs": 2 * (base(L * L, L) + head * L), "update": 3 * (base(L * L, L) + head * L)}
    return {"latent": latent, "token": token}


def rl_step_seconds(rows: int, prompt: int, new: int, rounds: int, preset: str = "tiny", device="cpu",
                    bf16: bool = False) -> dict:
    """Seconds of the two costly phases, random weights, every response exactly `new` tokens: generation (CoLA
    sampling pi, the world model greedy; the Llama sampling tokens) and the update's forward and backward (pi on the
    frozen base's kept states; the whole Llama). The best of `rounds` interleaved rounds. bf16: as rl.py under
    torchrun, rollouts from bf16 weights (the latent policy's 2 blocks excepted: float32, as trained) and updates of
    float32 master weights, all under bf16 autocast (tools/gpucheck.py)."""
    from cola import COLA_PRESETS, CoLA
    torch.manual_seed(0)
    with torch.device(device):
        cola, llama = CoLA(PRESETS[preset], COLA_PRESETS[preset]), Transformer(PRESETS[preset])
    cola.init_weights()
    llama.init_weights()
    V = PRESETS[preset].vocab_size
    prompts = torch.randint(0, V, (rows, prompt)).tolist()
    x = torch.randint(0, V, (rows, prompt + new), device=device)
    kind = torch.device(device).type
    amp = lambda: torch.autocast(kind, torch.bfloat16, enabled=bf16)                 # noqa: E731
    replica = copy.deepcopy(llama).to(torch.bfloat16) if bf16 else llama      # what generates tokens
    if bf16:
        cola.to(torch.bfloat16)
        cola.policy.float()                                                     # the trained part: float32
    with torch.no_grad(), amp():
        h = cola.hidden(x)                                                      # kept, as rl.log_probs does

    def update(logits_fn):
        def run():
            with amp():
                loss = logits_fn().float().logsumexp(-1).mean()
            loss.backward()
        return run

    def generate(fn):
        def run():
            with torch.no_grad(), amp():
                fn()
        return run
    fns = {"latent rollout": generate(lambda: cola.generate(prompts, new, mode="policy")),
           "token rollout": generate(lambda: replica.generate(prompts, new, temperature=1.0)),
           "latent update": update(lambda: cola.policy_logits(h)),
           "token update": update(lambda: llama(x))}
    return {k: min(v) for k, v in interleaved_seconds(fns, rounds, device).items()}


def rl_step_cost(a) -> str:
    out = ["GFLOPs of one GRPO step per rollout (rl_step_flops; the phases of rl.py):",
           "| preset | tokens (prompt + new) | level | rollout | log-probs | update | total | latent / token |",
           "|---|---|---|---|---|---|---|---|"]
    for preset, prompt, new in (("tiny", 220, 160), ("llama-3.1-8b", a.rl_prompt, a.rl_new)):
        f = rl_step_flops(preset, prompt, new)
        total = {lvl: sum(ph.values()) for lvl, ph in f.items()}
        for lvl, ph in f.items():
            ratio = f"{total['latent'] / total['token']:.2f}" if lvl == "latent" else ""
            out.append(f"| {preset} | {prompt} + {new} | {lvl} | " + " | ".join(f"{v / 1e9:.3g}" for v in ph.values())
                       + f" | {total[lvl] / 1e9:.3g} | {ratio} |")
    t = rl_step_seconds(a.batch, 64, 64, a.steps)
    out += ["", f"seconds at the tiny preset, {a.batch} rollouts of 64 + 64 tokens, random weights, "
                f"{torch.get_num_threads()} thread(s), best of {a.steps} interleaved rounds:",
            f"  rollout: latent {t['latent rollout']:.3f} s, token {t['token rollout']:.3f} s "
            f"(latent / token {t['latent rollout'] / t['token rollout']:.2f})",
            f"  update (forward + backward): latent {t['latent update']:.3f} s, token {t['token update']:.3f} s "
            f"(latent / token {t['latent update'] / t['token update']:.2f})"]
    return "\n".join(out)


if __name__ == "__main__":
    a = p.parse_args()
    for flag in ("steps", "batch", "seq", "prompt_len", "new_tokens", "threads", "gpus", "micro_batch", "rollouts",
                 "rl_prompt", "rl_new"):
        if getattr(a, flag) < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} {getattr(a, flag)}: expected an integer >= 1")
    torch.set_num_threads(a.threads)
    if a.rl_step_cost:
        print(rl_step_cost(a))
    elif a.rl_memory_plan:
        print(rl_memory_plan(a.preset if a.preset != "tiny" else "llama-3.1-8b", a.gpus, a.rollouts, a.rl_prompt,
                             a.rl_new, a.micro_batch))
    elif a.memory_plan:
        print(memory_plan(a.preset if a.preset != "tiny" else "llama-3.1-8b", a.gpus, a.micro_batch,
                          a.seq if a.seq != 256 else 2048))
    elif a.load_rss:
        load_rss(a)
    else:
        throughput(a)
