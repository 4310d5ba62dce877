"""trainer.py: the machinery every training script shares, kept out of the way of the paper's maths.

train.py (each CoLA training stage is one short function there) builds on this, and so will the RL script. A reader
who wants the paper can skip this file: it holds no equation, only the loop and what makes a run safe to kill.

    arg, parse_config     a @dataclass config -> argparse flags; the preset fills the defaults a user did not set
    Phase                 one loss, the parameter groups it trains, and how many optimizer steps
    Run                   one run directory: model built (one process or FSDP2), config.json, metrics.jsonl,
                          resumable checkpoints/step-N/, --stop-at, evaluation, the final/ export
    Run.train             the loop: micro batches accumulated to the global batch, clip, AdamW, log, checkpoint
    lr_at, make_optimizer, autocast, enable_activation_checkpointing

A run directory (--out-dir):
    config.json      the resolved flags (every default filled in), the stage, the world size
    metrics.jsonl    one JSON row per logged step; the last row is {"eval": {...}} with evaluations before/after
    checkpoints/step-NNNNNNN/   model + AdamW state + train.json (step, phase, data position, flags), written last
    final/           the exported model; its config.json carries train_stage and train_history
A rerun of the same command continues from the newest complete checkpoint and logs the identical curve: every
random draw of training is a function of --seed and of a sequence's position in the data stream (data.py), not of
a generator's state, so it does not depend on the world size or on where the run was resumed.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import parallel
from checkpoint import atomic_write
from parallel import Root, World

# ----------------------------------------------------------------------------------------------------------------
# Configuration: one @dataclass per script or stage, each field a --flag with a one-line help


def arg(default, help):
    """A config field: its default and the help text of its --flag."""
    return field(default=default, metadata={"help": help})


def parse_config(cls, argv: list[str], prog: str, defaults: dict, extra=None):
    """--flags of the dataclass `cls` (defaults: `defaults`, else the field's) -> (cls instance, flags given).

    extra(parser) may add arguments that are not config fields (e.g. --stage). The returned set names the fields
    the user set on the command line, so a default can still be adapted (e.g. the micro batch to the world size).
    """
    p = argparse.ArgumentParser(prog=prog, description=cls.__doc__)
    if extra:
        extra(p)
    for f in fields(cls):
        default = defaults.get(f.name, f.default)
        flag = "--" + f.name.replace("_", "-")
        text = f.metadata["help"].replace("%", "%%") + " (default: %(default)s)"    # argparse formats help with %
        if f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
        else:
            p.add_argument(flag, type={"int": int, "float": float, "str": str}[f.type], default=default, help=text)
    ns = p.parse_args(argv)
    given = {f.name for f in fields(cls) for a in argv
             if a.split("=")[0] in ("--" + f.name.replace("_", "-"), "--no-" + f.name.replace("_", "-"))}
    return cls(**{f.name: getattr(ns, f.name) for f in fields(cls)}), given


# ----------------------------------------------------------------------------------------------------------------
# Small pieces of the loop


def lr_at(step: int, lr: float, min_lr: float, warmup: int, steps: int) -> float:
    """Linear warmup to lr, then cosine decay towards min_lr (reached one step after the last)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def warmup_steps(cfg, steps: int) -> int:
    """--warmup-steps, where -1 means 3% of the phase's steps (the paper's fine-tuning schedule)."""
    return cfg.warmup_steps if cfg.warmup_steps >= 0 else max(1, round(0.03 * steps))


def make_optimizer(groups: dict[str, list], names, cfg) -> torch.optim.AdamW:
    """AdamW over the named parameter groups; weight decay 0 on the codebook C, cfg.weight_decay elsewhere."""
    decay = [p for n in names if n != "codebook" for p in groups[n]]
    plain = [p for n in names if n == "codebook" for p in groups[n]]
    param_groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if plain:
        param_groups.append({"params": plain, "weight_decay": 0.0})
    fused = {"fused": True} if (decay or plain)[0].is_cuda else {}
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **fused)


def autocast(dtype: str, device: torch.device):
    """bf16 autocast, or nothing for float32."""
    return nullcontext() if dtype == "float32" else torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def enable_activation_checkpointing(blocks):
    """Recompute each block in backward; parameter names (and so checkpoints) are unchanged."""
    from torch.utils.checkpoint import checkpoint
    for block in blocks:
        fwd = block.forward
        block.forward = lambda *a, _f=fwd, **k: checkpoint(_f, *a, use_reentrant=False, **k)


def set_trainable(model, names):
    """requires_grad on the named parameter groups only (FSDP reads it once, when it first runs)."""
    for name, params in model.param_groups().items():
        for p in params:
            p.requires_grad_(name in names)


def log_metrics(run_dir: Path, row: dict):
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


@dataclass
class Phase:
    """One loss trained for `steps` optimizer steps on the parameter groups `groups` (model.param_groups())."""
    name: str
    groups: list[str]
    loss_fn: Callable             # (model, Batch) -> (loss, {metric: float})
    steps: int


# ----------------------------------------------------------------------------------------------------------------
# A run


class Run:
    """One training run in one directory, on one process or under torchrun.

    Use: run = Run(stage, cfg, world); root = run.build(make_model, phases); run.start(root);
    before = run.evaluate(root, evals); finished = run.train(root, phases, loader); ...; run.export(root, result).
    """
    # Flags that may differ when a run is resumed (they do not enter the maths).
    RESUMABLE_CHANGES = {"resume", "out_dir", "device", "ckpt_every", "log_every", "eval_batches", "stop_at",
                         "cpu_offload", "activation_checkpointing", "micro_batch"}

    def __init__(self, stage: str, cfg, world: World):
        self.stage, self.cfg, self.world = stage, cfg, world
        self.dir = Path(cfg.out_dir)
        self.latest = parallel.latest_checkpoint(self.dir) if cfg.resume else None
        self.check_resumable()
        self.device = parallel.init_process_group(world, cfg.device)
        self.amp = autocast(cfg.dtype, self.device)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)

    def check_resumable(self):
        """A checkpoint in --out-dir must be this stage's, written with the same flags (else: another --out-dir)."""
        if self.latest is None:
            return
        saved = parallel.read_train_state(self.latest)
        if saved["stage"] != self.stage:
            raise SystemExit(f"{self.latest}: checkpoint of stage {saved['stage']!r}, not {self.stage!r}; use another "
                             f"--out-dir")
        now = asdict(self.cfg)
        for k, v in saved["config"].items():
            if k not in self.RESUMABLE_CHANGES and now.get(k) != v:
                raise SystemExit(f"{self.latest}: was written with --{k.replace('_', '-')} {v!r}, this run has "
                                 f"{now.get(k)!r}; resume with the same flags or use another --out-dir")

    # -- the model --------------------------------------------------------------------------------------------------
    def build(self, make_model: Callable, phases: list[Phase]) -> Root:
        """The model make_model(device) returns, with requires_grad on the groups the phases train, wrapped in the
        Root every computation runs through (parallel.Root).

        Under torchrun rank 0 builds the model on CPU exactly as one process would; the other ranks build the same
        modules on the meta device (from the constructor's arguments rank 0 sends them), every rank shards with
        FSDP2, allocates its shards and receives rank 0's tensors, broadcast and sharded one by one. No rank but 0
        ever holds the whole model, and a run starts from bit-identical weights at any world size.
        """
        cfg, world = self.cfg, self.world
        trains = {g for ph in phases for g in ph.groups}
        if not world.launched:
            model = make_model(self.device)
            set_trainable(model, trains)
            if cfg.activation_checkpointing:
                enable_activation_checkpointing(model.blocks())
            return Root(model)
        from torch.distributed.device_mesh import init_device_mesh
        full = parallel.on_main(world, lambda: make_model(torch.device("cpu")))
        bf16 = cfg.dtype == "bfloat16"
        spec = (type(full), full.init_args, bf16_frozen_groups(full, trains) if bf16 else []) if world.main else None
        cls, init_args, to_bf16 = parallel.broadcast_object(world, spec)
        with torch.device("meta"):
            model = cls(*init_args)
        for m in (model, full):
            if m is not None:
                set_trainable(m, trains)            # frozen modules: no gradient, no optimizer state
                for name in to_bf16:
                    getattr(m, name).to(torch.bfloat16)
        if cfg.activation_checkpointing:            # before fully_shard
            enable_activation_checkpointing(model.blocks())
        root = Root(model)
        parallel.apply_fsdp(root, init_device_mesh(self.device.type, (world.size,)),
                            torch.bfloat16 if bf16 else None, cfg.cpu_offload)
        root.to_empty(device="cpu" if cfg.cpu_offload else self.device)
        state = None if full is None else {"model." + k: v for k, v in full.state_dict().items()}
        parallel.load_full_state(root, state, world)
        return root

    # -- the run directory ------------------------------------------------------------------------------------------
    def start(self, root: Root):
        """config.json with the resolved flags; leftovers of a killed run removed; a run that does not resume starts
        from an empty checkpoints/ and metrics.jsonl. Call after the data is built (it may resolve --steps)."""
        resolved = {"stage": self.stage, **asdict(self.cfg), "world_size": self.world.size,
                    "n_params": sum(p.numel() for p in root.model.parameters())}

        def prepare():
            self.dir.mkdir(parents=True, exist_ok=True)
            for tmp in self.dir.glob(".*.tmp*"):
                tmp.unlink()
            parallel.remove_incomplete_checkpoints(self.dir)
            if self.latest is None:
                for old in parallel.checkpoint_dirs(self.dir):
                    parallel.remove_checkpoint(old)
                (self.dir / "metrics.jsonl").unlink(missing_ok=True)
            atomic_write(self.dir / "config.json", lambda t: t.write_text(json.dumps(resolved, indent=2)))
            print(json.dumps(resolved))
        parallel.on_main(self.world, prepare)

    @torch.no_grad()
    def evaluate(self, root: Root, evals: dict) -> dict:
        """{name: (batches, metric_fn)} -> {name: mean over the batches of metric_fn(model, batch)}.
        Under torchrun every rank evaluates the same batches (the sharded model needs all of them)."""
        root.eval()
        out = {}
        for name, (batches, metric_fn) in evals.items():
            sums = {}
            for b in batches:
                with self.amp:
                    for k, v in root(metric_fn, b).items():
                        sums[k] = sums.get(k, 0.0) + v
            out[name] = {k: v / len(batches) for k, v in sums.items()}
        parallel.reshard(root)
        root.train()
        return out

    def export(self, root: Root, result: dict, llama_base: bool = False):
        """final/: the model (HF Llama or official CoLA layout), its config.json tagged with the stage and the
        flags of every training stage behind it (train_history); llama_base: also final-llama/, the base alone in
        the HF Llama layout. Then finish(result). Under torchrun the full tensors are gathered on rank 0 (a
        collective), which writes the files."""
        state = parallel.full_state_dict(root, self.world)

        def write():
            model = root.model
            if self.world.launched:                  # a plain copy of the sharded model, from the gathered tensors
                with torch.device("meta"):
                    model = type(model)(*model.init_args)
                model.load_state_dict(state, assign=True)
                base = getattr(model, "base", model)
                if base.args.tie_embeddings:
                    base.output.weight = base.tok_embeddings.weight
            final = self.dir / "final"
            model.save_pretrained(final)
            c = json.loads((final / "config.json").read_text())
            c["train_stage"] = self.stage
            c["train_history"] = self.history() + [{"stage": self.stage, **asdict(self.cfg)}]
            atomic_write(final / "config.json", lambda t: t.write_text(json.dumps(c, indent=2)))
            if llama_base:
                model.base.save_pretrained(self.dir / "final-llama")
        parallel.on_main(self.world, write)
        self.finish(result)

    def finish(self, result: dict):
        """The result (evaluations before and after) as the last metrics.jsonl row, and on the screen."""
        if self.world.main:
            log_metrics(self.dir, {"eval": result})
            print(json.dumps(result, indent=2))

    def history(self) -> list[dict]:
        """train_history of the --init checkpoint (empty for official weights)."""
        f = Path(self.cfg.init) / "config.json" if getattr(self.cfg, "init", "") else None
        return json.loads(f.read_text()).get("train_history", []) if f and f.exists() else []

    # -- the loop ---------------------------------------------------------------------------------------------------
    def train(self, root: Root, phases: list[Phase], loader) -> bool:
        """Run the phases from the newest checkpoint on; False if --stop-at ended the run before the last step.

        One optimizer step = global_batch sequences = global_batch / (micro_batch x world size) micro batches on
        each rank, each loss a mean over its micro batch, so the gradient (FSDP averages it over the ranks) is the
        mean of the per-micro-batch gradients: what one process computes with the same global batch.
        """
        from tqdm import tqdm
        cfg, world = self.cfg, self.world
        accum = cfg.global_batch // (cfg.micro_batch * world.size)
        groups = root.model.param_groups()
        step, resumed = self.resume_point(root)
        bar = tqdm(total=sum(ph.steps for ph in phases), initial=step, desc=self.stage, dynamic_ncols=True,
                   disable=None if world.main else True)
        offset = 0                                   # steps of the phases before this one
        for pi, ph in enumerate(phases):
            if step >= offset + ph.steps:
                offset += ph.steps
                continue
            params = [p for n in ph.groups for p in groups[n]]
            opt = make_optimizer(groups, ph.groups, cfg)
            if resumed is not None:                  # the checkpoint is inside (or at the start of) this phase
                if resumed["has_optim"]:
                    parallel.load_checkpoint(self.latest, root, opt, world)     # model and AdamW state, one read
                loader.load_state_dict(resumed["loader"])
                resumed = None
            warm = warmup_steps(cfg, ph.steps)
            t0, tokens = time.time(), 0
            while step < offset + ph.steps:
                lr = lr_at(step - offset, cfg.lr, cfg.min_lr, warm, ph.steps)
                for g in opt.param_groups:
                    g["lr"] = lr
                metrics = {}
                for _ in range(accum):
                    batch = loader.next_batch().to(self.device)
                    with self.amp:
                        loss, m = root(ph.loss_fn, batch)
                    (loss / accum).backward()
                    for k, v in {"loss": loss.item(), **m}.items():
                        metrics[k] = metrics.get(k, 0.0) + v / accum
                    tokens += batch.tokens[:, 1:].numel() * world.size
                metrics = parallel.mean_over_ranks(world, metrics)
                if not math.isfinite(metrics["loss"]):    # the same verdict on every rank
                    bar.close()
                    good = parallel.latest_checkpoint(self.dir)
                    raise SystemExit(f"{self.stage}: loss is {metrics['loss']} at step {step} ({ph.name}); stopped. "
                                     f"The last good checkpoint ({good or 'none'}, step "
                                     f"{parallel.read_train_state(good)['step'] if good else 0}) is kept.")
                gnorm = parallel.local_tensor(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)).item()
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                tps = tokens / max(time.time() - t0, 1e-9)
                bar.update(1)
                bar.set_postfix({k: f"{v:.3g}" for k, v in metrics.items()} | {"lr": f"{lr:.2g}", "tok/s": f"{tps:.0f}"})
                phase_over = step == offset + ph.steps
                if world.main and (step % cfg.log_every == 0 or phase_over):
                    row = {"step": step, "phase": ph.name, "lr": lr, "grad_norm": gnorm, "tok_per_s": round(tps, 1)}
                    if self.device.type == "cuda":
                        row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)
                    log_metrics(self.dir, {**row, **metrics})
                stopping = step == cfg.stop_at
                if step % cfg.ckpt_every == 0 or phase_over or stopping:
                    # at a phase's end the next phase starts a fresh AdamW: save the model alone
                    state = {"stage": self.stage, "step": step, "phase": pi + 1 if phase_over else pi,
                             "loader": loader.state_dict(), "config": asdict(cfg)}
                    parallel.save_checkpoint(self.dir, root, None if phase_over else opt, state, world)
                if stopping and step < bar.total:
                    bar.close()
                    if world.main:
                        print(f"{self.stage}: stopped after step {step} (--stop-at); its checkpoint is in "
                              f"{self.dir}/checkpoints. Run the same command without --stop-at to continue.")
                    return False
            offset += ph.steps
        bar.close()
        return True

    def resume_point(self, root: Root) -> tuple[int, dict | None]:
        """(first step to run, the checkpoint's train state or None). A checkpoint saved at a phase boundary holds
        the model alone: it is loaded here; one inside a phase holds AdamW too and is loaded with it in train()."""
        if self.latest is None:
            return 0, None
        saved = parallel.read_train_state(self.latest)
        if not saved["has_optim"]:
            parallel.load_checkpoint(self.latest, root, None, self.world)
        if self.world.main:
            trim_metrics(self.dir, saved["step"])
            print(f"resuming {self.stage} from {self.latest} at step {saved['step']} (written by "
                  f"{saved['world_size']} process(es), now {self.world.size})")
        return saved["step"], saved


def trim_metrics(run_dir: Path, step: int):
    """On resume, keep the step rows up to the checkpoint's step; later rows and the eval row will be redone."""
    f = run_dir / "metrics.jsonl"
    if f.exists():
        rows = [r for r in f.read_text().splitlines() if r and json.loads(r).get("step", step + 1) <= step]
        atomic_write(f, lambda tmp: tmp.write_text("".join(r + "\n" for r in rows)))


def bf16_frozen_groups(model, trains: set) -> list[str]:
    """The frozen parameter groups whose weights are all bf16 values already (the official 8B base is): stored in
    bf16 under FSDP, they take half the memory and lose nothing. Groups that earlier stages trained in float32 stay
    float32, so exports and later stages see exactly the weights one process would."""
    exact = lambda p: torch.equal(p, p.to(torch.bfloat16).to(p.dtype))                      # noqa: E731
    groups = model.param_groups()
    return [n for n in sorted(set(groups) - trains) if all(exact(p) for p in groups[n])]
