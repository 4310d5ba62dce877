"""infra/trainer.py: the machinery every training script shares, kept out of the way of the paper's maths.

train.py (each CoLA training stage is one short function there) builds on this, and so does rl.py. A reader who
wants the paper can skip this file: it holds no equation, only the loop and what makes a run safe to kill.

    arg, parse_config     a @dataclass config -> argparse flags; the preset fills the defaults a user did not set;
                          each field declares the values it accepts ("> 0", ">= 1"), checked for every script
    Phase                 one loss, the parameter groups it trains, and how many optimizer steps
    Run                   one run directory: model built (one process or FSDP2), config.json, metrics.jsonl,
                          resumable checkpoints/step-N/, --stop-at, evaluation, the final/ export
    Run.train             the loop: micro batches accumulated to the global batch, clip, AdamW, log, checkpoint
    lr_at, make_optimizer, autocast, enable_activation_checkpointing

A run directory (--out-dir) belongs to one stage and its flags, and a run writes nothing else:
    .lock            pid and host of the run using the directory now (a second run on it stops at once)
    config.json      the resolved flags (every default filled in), the stage, the world size
    metrics.jsonl    one JSON row per logged step; the last row is {"eval": {...}} with evaluations before/after
    checkpoints/step-NNNNNNN/   trained weights + AdamW state + train.json (step, phase, data position, flags, and the size
                     and CRC-32 of every file), written last; the newest two are kept (infra/parallel.py)
    final/           the exported model, swapped in whole; its config.json carries train_stage and train_history
A run refuses an --out-dir that overlaps its --init, that holds a model or another stage's run, or (resuming) a
run with other flags. A rerun of the same command continues from the newest intact checkpoint and logs the
identical curve: every random draw of training is a function of --seed and of a sequence's position in the data
stream (data.py), not of a generator's state, so it does not depend on the world size or on where the run was
resumed. A predictable mistake or fault (a bad flag, a damaged checkpoint, a full disk) stops the run with one line
that names the file or flag and what to do.
"""
from __future__ import annotations

import argparse
import atexit
import json
import math
import operator
import os
import random
import shutil
import socket
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from infra import parallel
from infra.files import atomic_write, check_out_dir as check_dir_path, replace_dir
from infra.parallel import Root, World, device_type
from tokenizer import export_tokenizer

# ----------------------------------------------------------------------------------------------------------------
# Configuration: one @dataclass per script or stage, each field a --flag with a one-line help


def arg(default, help, valid: str = ""):
    """A config field: its default, the help text of its --flag, and the values it accepts, e.g. "> 0", ">= 1" or
    ">= 0, < 1" (parse_config checks them; a float flag must also be finite)."""
    return field(default=default, metadata={"help": help, "valid": valid})


BOUNDS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}
# Every --seed: Run seeds numpy's global generator, whose legacy seeding takes [0, 2**32) (torch's overflows past
# 2**64); a larger or negative seed was a traceback from inside the run.
SEED = f">= 0, < {2**32}"


def check_value(name: str, value, valid: str):
    """One-line SystemExit unless a flag's value is finite (floats) and within its field's bounds."""
    ok = not (isinstance(value, float) and not math.isfinite(value))
    for bound in filter(None, valid.split(",")):
        op, limit = bound.split()
        ok = ok and BOUNDS[op](value, float(limit))
    if not ok:
        kind = "an integer" if isinstance(value, int) else "a finite number"
        raise SystemExit(f"--{name.replace('_', '-')} {value}: expected {kind} {valid.replace(',', ' and')}".rstrip())


def parse_config(cls, argv: list[str], prog: str, defaults: dict, extra=None):
    """--flags of the dataclass `cls` (defaults: `defaults`, else the field's) -> (cls instance, flags given).

    extra(parser) may add arguments that are not config fields (e.g. --stage). The returned set names the fields
    the user set on the command line, so a default can still be adapted (e.g. the micro batch to the world size).
    Every value is checked against its field's bounds (arg's `valid`) before anything runs.
    """
    p = argparse.ArgumentParser(prog=prog, description=cls.__doc__)
    if extra:
        extra(p)
    for f in fields(cls):
        default = defaults.get(f.name, f.default)
        flag = "--" + f.name.replace("_", "-")
        text = f.metadata["help"].replace("%", "%%")                        # argparse formats help with %
        if default not in ("", None) and "default" not in text:             # a help that says its default already
            text += " (default: %(default)s)"
        if f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
        else:
            p.add_argument(flag, type={"int": int, "float": float, "str": str}[f.type], default=default, help=text)
    ns = p.parse_args(joined_numbers(argv, {"--" + f.name.replace("_", "-") for f in fields(cls) if f.type != "bool"}))
    for f in fields(cls):
        if f.type in ("int", "float"):
            check_value(f.name, getattr(ns, f.name), f.metadata.get("valid", ""))
    given = {f.name for f in fields(cls) for a in argv
             if a.split("=")[0] in ("--" + f.name.replace("_", "-"), "--no-" + f.name.replace("_", "-"))}
    cfg = cls(**{f.name: getattr(ns, f.name) for f in fields(cls)})
    names = {f.name for f in fields(cls)}
    if "dtype" in names:                        # --dtype auto -> what this machine runs (config.json records it)
        cfg.dtype = resolve_dtype(cfg.dtype, cfg.device if "device" in names else "",
                                  main=os.environ.get("RANK", "0") == "0")
    return cfg, given


def one_line_errors(fn: Callable, argv: list[str] | None):
    """fn(argv) (argv: the command line's arguments by default); a ValueError or FileNotFoundError that escapes it
    ends the program with its first line, not a traceback (the scripts' checks raise them with the file named), and
    so does Ctrl-C (interrupts_are_one_line)."""
    try:
        with interrupts_are_one_line():
            return fn(sys.argv[1:] if argv is None else list(argv))
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


@contextmanager
def interrupts_are_one_line():
    """Ctrl-C (KeyboardInterrupt) -> one line on stderr and exit status 130 (128 + SIGINT), not a traceback. Nothing
    is left half-written (files are written aside and renamed, rows appended one per write, a checkpoint counts only
    once its train.json is in), so the line only says where the same command goes on from."""
    try:
        yield
    except KeyboardInterrupt:
        from tqdm import tqdm
        for bar in list(getattr(tqdm, "_instances", ())):     # ended now, not redrawn below the line later
            bar.close()
        if os.environ.get("RANK", "0") == "0":  # once under torchrun, which passes Ctrl-C to every rank
            print(interrupted_line(), file=sys.stderr, flush=True)
        raise SystemExit(130) from None


def interrupted_line() -> str:
    """Where a rerun resumes: the newest complete checkpoint of each run directory this process holds the lock of."""
    where = []
    for run in [f.parent for f in _held]:
        ckpt = parallel.latest_checkpoint(run)
        where.append(f"resume {run} from {ckpt} (step {int(ckpt.name.removeprefix('step-'))})" if ckpt else
                     f"start {run} over (no checkpoint yet)")
    return (f"interrupted (Ctrl-C); nothing is half-written: rerun the same command to "
            f"{'; '.join(where) or 'go on (what was written is kept)'}")


def joined_numbers(argv: list[str], flags: set[str]) -> list[str]:
    """["--lr", "-1e-3"] -> ["--lr=-1e-3"]: argparse takes a negative number in scientific notation for a flag and
    would answer "expected one argument" instead of checking the value."""
    out = []
    for a in argv:
        if out and out[-1] in flags and a.startswith("-"):
            try:
                float(a)
                out[-1] += "=" + a
                continue
            except ValueError:
                pass
        out.append(a)
    return out


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
    """bf16 autocast, or nothing for float32 (auto: what resolve_dtype picks for the device)."""
    dtype = resolve_dtype(dtype, device.type, main=False) if dtype == "auto" else dtype
    return nullcontext() if dtype == "float32" else torch.autocast(device_type=device.type, dtype=torch.bfloat16)


# ----------------------------------------------------------------------------------------------------------------
# --dtype auto: bf16 where the hardware computes it, float32 elsewhere. On a CPU without bf16 instructions (AVX2
# only, as many laptops) bf16 autocast is emulated: one tiny training step costs ~15x its float32 time, and a model
# of a few million parameters gains nothing from it.

DTYPES = ("auto", "bfloat16", "float32")


def native_bf16(kind: str) -> bool:
    """Whether the device computes bf16 in hardware: a CUDA GPU that supports it (Ampere on), or a CPU whose oneDNN
    reports bf16 support (AVX-512-BF16 or AMX; torch.ops.mkldnn._is_mkldnn_bf16_supported)."""
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: no fast bf16 either
        return False


def cpu_name() -> str:
    """The CPU's model name as the OS reports it (Linux /proc/cpuinfo, else platform), for a run's record."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def machine(kind: str) -> dict:
    """What decided --dtype auto, recorded in config.json and the pipeline's table: the CPU, torch's CPU kernel
    level (AVX2, AVX512, ...), whether bf16 is native on the device, and the GPU if one is used."""
    info = {"cpu": cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": native_bf16(kind), "device": kind}
    if kind == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def resolve_dtype(flag: str, device_flag: str, main: bool = True) -> str:
    """--dtype auto|bfloat16|float32 -> bfloat16 or float32 for the device of --device. auto: bfloat16 where the
    device computes it natively, float32 otherwise. An explicit bfloat16 on a CPU without it still runs, after one
    line of warning (on the main process only)."""
    if flag not in DTYPES:
        raise SystemExit(f"--dtype {flag!r}: expected one of {', '.join(DTYPES)}")
    kind = device_type(device_flag)
    if flag == "auto":
        return "bfloat16" if native_bf16(kind) else "float32"
    if flag == "bfloat16" and kind == "cpu" and not native_bf16("cpu") and main and not _warned:
        _warned.append(flag)                     # once per process (the pipeline parses a config per stage)
        print(f"warning: --dtype bfloat16 on a CPU without native bf16 ({torch.backends.cpu.get_cpu_capability()}): "
              f"emulated, about 15x slower than --dtype float32 (or auto) for the same run", flush=True)
    return flag


_warned: list = []


def machine_line(kind: str) -> str:
    """The device that decides --dtype auto, in words: "Intel(R) Xeon(R) ... (AVX2), native bf16: no"."""
    m = machine(kind)
    what = f"{m['cpu']} ({m['cpu_capability']})" if kind == "cpu" else m.get("gpu", "CUDA")
    return f"{what}, native bf16: {'yes' if m['native_bf16'] else 'no'}"


def dtype_line(cfg) -> str:
    """One line for the start of a run: the dtype it computes in and why."""
    return f"dtype {cfg.dtype} on {machine_line(device_type(cfg.device))}"


def enable_activation_checkpointing(blocks):
    """Recompute each block in backward; parameter names (and so checkpoints) are unchanged."""
    from torch.utils.checkpoint import checkpoint
    for block in blocks:
        block.forward = lambda *a, _f=block.forward, **k: checkpoint(_f, *a, use_reentrant=False, **k)


def prepare_blocks(model, cfg):
    """--activation-checkpointing, then --compile (each block in place, names unchanged); before fully_shard."""
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model.blocks())
    for block in model.blocks() if getattr(cfg, "compile", False) else []:
        block.compile()


def set_trainable(model, names):
    """requires_grad on the named parameter groups only (FSDP reads it once, when it first runs)."""
    for name, params in model.param_groups().items():
        for p in params:
            p.requires_grad_(name in names)


def log_metrics(run_dir: Path, row: dict):
    """Append one row to metrics.jsonl (append_row): trim_metrics drops a half-written last line on resume."""
    append_row(Path(run_dir) / "metrics.jsonl", row)


def append_row(f: Path, row: dict):
    """One JSON row in a single os.write on an O_APPEND file: a kill leaves at most a half-written last line, and
    writers sharing the file never interleave within a row. A half-written last line left by a kill is ended first,
    so the new row stands on a line of its own (readers skip the broken one)."""
    with writing(f"{f}: could not append a row"):
        fd = os.open(f, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            broken = size > 0 and os.pread(fd, 1, size - 1) != b"\n"
            os.write(fd, (("\n" if broken else "") + json.dumps(row) + "\n").encode())
        finally:
            os.close(fd)


@contextmanager
def writing(what: str):
    """An OSError (disk full, read-only, no permission) inside -> one line: what failed, why, and that nothing
    written before is lost."""
    try:
        yield
    except OSError as e:
        why = f"{e.strerror or e}" + (f" ({e.filename})" if e.filename and str(e.filename) not in what else "")
        raise SystemExit(f"{what}: {why}. Nothing written before is lost: free space or fix the directory's "
                         f"permissions, then rerun the same command to continue") from None


@dataclass
class Phase:
    """One loss trained for `steps` optimizer steps on the parameter groups `groups` (model.param_groups())."""
    name: str
    groups: list[str]
    loss_fn: Callable             # (model, Batch) -> (loss, {metric: float})
    steps: int


# ----------------------------------------------------------------------------------------------------------------
# The run directory's lock: one run at a time in a directory

LOCK = ".lock"
_held: dict[Path, bool] = {}            # lock files this process holds -> whether it created their run directory


def acquire_lock(run_dir: Path):
    """Create run_dir/.lock holding this process's pid and host, or stop: another live run holds it. The file is
    created with O_EXCL, so of two runs starting together exactly one gets it. A lock is stale, and taken over with
    a note, when its process is gone (same host, pid not running) or is this very process (an earlier Run in it)."""
    run_dir = Path(run_dir)
    f, created = run_dir / LOCK, not run_dir.exists()
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    with writing(f"--out-dir {run_dir}: cannot create the run's lock file"):
        run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = read_lock(f)
                if not lock_is_stale(f, holder):
                    raise SystemExit(f"--out-dir {run_dir} is in use by another run (pid {holder.get('pid')} on "
                                     f"{holder.get('host')}, since {holder.get('since')}): wait for it or use another "
                                     f"--out-dir. If that run is dead, delete {f}") from None
                if holder.get("pid") != me["pid"]:
                    print(f"{f}: stale lock of pid {holder.get('pid')} (no longer running) taken over")
                f.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(me))
            if not _held:
                atexit.register(release_locks)
            _held[f] = created
            return
    raise SystemExit(f"{f}: could not take the lock (other runs keep creating it)")


def read_lock(f: Path) -> dict:
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError):
        return {}                           # being written this instant, or left empty by a kill


def lock_is_stale(f: Path, holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
        if holder:
            return False                    # another machine's run: only a person can tell it is gone
        return time.time() - f.stat().st_mtime > 10 if f.exists() else True
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)                     # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:
        pass                                # alive, another user's
    return False


def release_locks(run_dir: Path | None = None):
    """Remove this process's lock of run_dir (else all of them), and a run directory it created that stayed empty
    (a run stopped by a bad input before writing anything)."""
    for f in [f for f in _held if run_dir is None or f.parent == Path(run_dir)]:
        created = _held.pop(f)
        if read_lock(f).get("pid") == os.getpid():
            f.unlink(missing_ok=True)
        if created and f.parent.is_dir() and not any(f.parent.iterdir()):
            f.parent.rmdir()


# ----------------------------------------------------------------------------------------------------------------
# A run


class Run:
    """One training run in one directory, on one process or under torchrun.

    Use: run = Run(stage, cfg, world); root = run.build(make_model, phases); run.start(root);
    before = run.evaluate(root, evals); finished = run.train(root, phases, loader); ...; run.export(root, result).

    cfg is the script's own flags; Run reads out_dir, resume, device, dtype, seed and activation_checkpointing from
    it (every training script has them), and, for train(), the optimisation flags of train.py. What only some
    scripts have is passed by name: init (the checkpoint a run starts from, which it must not write into), and
    train.py's launch flags collective_timeout, cpu_offload, shard_group, async_save (else one process's defaults).
    """
    # Flags that may differ when a run is resumed (they do not enter the maths).
    RESUMABLE_CHANGES = {"resume", "out_dir", "device", "ckpt_every", "log_every", "eval_batches", "stop_at",
                         "cpu_offload", "activation_checkpointing", "micro_batch", "shard_group", "collective_timeout",
                         "async_save", "compile"}
    RESOLVED_LATER = {"steps"}    # known once the data is read (--steps 0 from --epochs): compared in start()

    def __init__(self, stage: str, cfg, world: World, init: str = "", collective_timeout: float = parallel.TIMEOUT,
                 cpu_offload: bool = False, shard_group: int = 0, async_save: bool = False):
        self.stage, self.cfg, self.world, self.init = stage, cfg, world, init
        self.cpu_offload, self.shard_group, self.async_save = cpu_offload, shard_group, async_save
        if cfg.dtype == "auto":                 # a config built without parse_config (which resolves it)
            cfg.dtype = resolve_dtype("auto", cfg.device, main=False)
        self.dir = Path(cfg.out_dir)
        self.check_out_dir()                    # reads only: before any process group, lock or file
        self.latest = parallel.latest_checkpoint(self.dir) if cfg.resume else None
        self.check_resumable(exclude=self.RESOLVED_LATER)
        self.device = parallel.init_process_group(world, cfg.device, collective_timeout)
        if cpu_offload:                         # AdamW steps on the host: its cores shared by this node's ranks
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world.node_size))
        parallel.on_main(world, lambda: acquire_lock(self.dir))
        if cfg.resume:                          # verified now (a collective): maybe an older checkpoint
            self.latest = parallel.resume_checkpoint(self.dir, world)
            self.check_resumable(exclude=self.RESOLVED_LATER)
        self.good, self.pending = self.latest, None     # newest checkpoint known intact; one being written
        self.stager = async_save and parallel.checkpoint_stager(torch.device("cpu") if cpu_offload else self.device)
        self.amp = autocast(cfg.dtype, self.device)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)

    def check_out_dir(self):
        """What a run refuses to write into: its --init checkpoint (or a directory around or inside it), a model
        directory, a run directory of another stage. Reads only; nothing is written before these checks."""
        check_dir_path(self.dir, "--out-dir")  # a file, or under one: said as such, not as a lock that failed
        for ckpt in parallel.complete_checkpoints(self.dir):
            try:
                stage = parallel.read_train_state(ckpt).get("stage")
            except (OSError, ValueError):
                continue                        # a damaged train.json: resume_checkpoint reports it
            if stage != self.stage:
                raise SystemExit(f"{ckpt}: checkpoint of stage {stage!r}, not {self.stage!r}; use another --out-dir")
        init = self.init
        if init:
            out, start = self.dir.resolve(), Path(init).resolve()
            if out == start or out in start.parents or start in out.parents:
                raise SystemExit(f"--out-dir {self.dir} overlaps --init {init}: a run never writes into the checkpoint "
                                 f"it starts from; choose another --out-dir")
        config = self.dir / "config.json"
        if config.exists():
            try:
                saved = json.loads(config.read_text())
            except (OSError, ValueError) as e:
                raise SystemExit(f"--out-dir {self.dir}: its config.json is unreadable ({e}); use another "
                                 f"--out-dir") from None
            if "stage" not in saved:
                raise SystemExit(f"--out-dir {self.dir} holds a config.json that is not a run's (a model "
                                 f"checkpoint?); choose another --out-dir")
            if saved["stage"] != self.stage:
                raise SystemExit(f"--out-dir {self.dir} holds a run of stage {saved['stage']!r}, not {self.stage!r}; "
                                 f"use another --out-dir")
        elif (self.dir / "params.json").exists() or any(self.dir.glob("*.safetensors")):
            raise SystemExit(f"--out-dir {self.dir} holds a model checkpoint; choose another --out-dir")

    def check_resumable(self, exclude=(), only=None):
        """A resumed run has the flags of the checkpoint it resumes (or, before the first checkpoint, of the run's
        config.json), except those that do not enter the maths; otherwise: another --out-dir, or --no-resume."""
        if not self.cfg.resume:
            return
        if self.latest is not None:
            try:
                source, saved = self.latest, parallel.read_train_state(self.latest)["config"]
            except (OSError, ValueError, KeyError):
                return                          # a damaged train.json: resume_checkpoint reports it
        elif (self.dir / "config.json").exists():
            source, saved = self.dir / "config.json", json.loads((self.dir / "config.json").read_text())
        else:
            return
        now = asdict(self.cfg)
        for k, v in saved.items():
            if k not in now or k in self.RESUMABLE_CHANGES or k in exclude or (only is not None and k not in only):
                continue
            if now[k] != v:
                why = (f" (--dtype auto records what it resolved to on the machine that started the run: pass "
                       f"--dtype {v} to continue it)") if k == "dtype" else ""
                raise SystemExit(f"{source}: was written with --{k.replace('_', '-')} {v!r}, this run has {now[k]!r}"
                                 f"{why}; resume with the same flags, use another --out-dir, or pass --no-resume to "
                                 f"start over in it")

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
            if cfg.dtype == "bfloat16":             # as under torchrun: a frozen bf16 base stored in bf16
                for name in bf16_frozen_groups(model, trains):
                    getattr(model, name).to(torch.bfloat16)
            prepare_blocks(model, cfg)
            return Root(model)
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
        prepare_blocks(model, cfg)                  # before fully_shard
        root = Root(model)
        parallel.apply_fsdp(root, parallel.device_mesh(world, self.device, self.shard_group),
                            torch.bfloat16 if bf16 else None, self.cpu_offload)
        root.to_empty(device="cpu" if self.cpu_offload else self.device)
        state = None if full is None else {"model." + k: v for k, v in full.state_dict().items()}
        parallel.load_full_state(root, state, world)
        return root

    # -- the run directory ------------------------------------------------------------------------------------------
    def start(self, root: Root):
        """config.json with the resolved flags; leftovers of a killed run removed (each said); a run that does not
        resume starts from an empty checkpoints/ and metrics.jsonl. Call after the data is built (it may resolve
        --steps): nothing in the run directory changes before this."""
        self.check_resumable(only=self.RESOLVED_LATER)
        resolved = {"stage": self.stage, **asdict(self.cfg), "world_size": self.world.size,
                    "n_params": sum(p.numel() for p in root.model.parameters()), "machine": machine(self.device.type)}

        def prepare():
            for tmp in [*self.dir.glob(".*.tmp[0-9]*"), *self.dir.glob(".final*.old[0-9]*")]:    # ours only
                shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
            for d in parallel.remove_incomplete_checkpoints(self.dir):
                print(f"{d}: incomplete checkpoint (no train.json: its save was interrupted) removed")
            metrics = self.dir / "metrics.jsonl"
            if self.latest is None:
                for old in parallel.checkpoint_dirs(self.dir):
                    parallel.remove_checkpoint(old)
                if self.cfg.resume and metrics.exists() and metrics.stat().st_size:
                    print(f"{metrics}: no checkpoint to resume from; the run starts over from step 0")
                metrics.unlink(missing_ok=True)
            for newer in [d for d in parallel.checkpoint_dirs(self.dir) if self.latest and d > self.latest]:
                parallel.remove_checkpoint(newer)           # damaged (resume_checkpoint said so): redone identically
                print(f"{newer}: removed; its steps are redone from {self.latest.name}")
            atomic_write(self.dir / "config.json", lambda t: t.write_text(json.dumps(resolved, indent=2)))
            print(json.dumps(resolved))
            print(dtype_line(self.cfg))
        with writing(f"--out-dir {self.dir}"):
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

            def final(tmp: Path):                    # written aside, swapped in whole: never half an export
                model.save_pretrained(tmp)
                c = json.loads((tmp / "config.json").read_text())
                c["train_stage"] = self.stage
                c["train_history"] = self.history() + [{"stage": self.stage, **asdict(self.cfg)}]
                atomic_write(tmp / "config.json", lambda t: t.write_text(json.dumps(c, indent=2)))
                self.copy_tokenizer(tmp)
            replace_dir(self.dir / "final", final)
            if llama_base:                           # the base alone, with the same tokenizer
                replace_dir(self.dir / "final-llama", lambda tmp: (model.base.save_pretrained(tmp),
                                                                   self.copy_tokenizer(tmp)))
        with writing(f"{self.dir / 'final'}: could not export the model"):
            parallel.on_main(self.world, write)
        self.finish(result)

    def copy_tokenizer(self, out: Path):
        """The run's tokenizer file into an export directory (tokenizer.export_tokenizer)."""
        export_tokenizer(getattr(self.cfg, "tokenizer", ""), self.init or None, out)

    def finish(self, result: dict):
        """The result (evaluations before and after) as the last metrics.jsonl row, and on the screen. The run is
        over: its directory's lock is released."""
        if self.world.main:
            log_metrics(self.dir, {"eval": result})
            print(json.dumps(result, indent=2))
            release_locks(self.dir)

    def history(self) -> list[dict]:
        """train_history of the --init checkpoint (empty for official weights)."""
        f = Path(self.init) / "config.json" if self.init else None
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
            parallel.start_phase(root, ph.groups)
            opt = make_optimizer(groups, ph.groups, cfg)
            if resumed is not None:                  # the checkpoint is inside (or at the start of) this phase
                if resumed["has_optim"]:
                    parallel.load_checkpoint(self.latest, root, opt, world, frozen=False)   # and AdamW
                loader.load_state_dict(resumed["loader"])
                resumed = None
            warm = warmup_steps(cfg, ph.steps)
            t0, tokens = time.time(), 0
            while step < offset + ph.steps:
                lr = lr_at(step - offset, cfg.lr, cfg.min_lr, warm, ph.steps)
                for g in opt.param_groups:
                    g["lr"] = lr
                metrics = {}
                for i in range(accum):
                    batch = loader.next_batch().to(self.device)
                    parallel.sync_replicas(root, last=i == accum - 1)
                    with self.amp:
                        loss, m = root(ph.loss_fn, batch)
                    (loss / accum).backward()
                    for k, v in {"loss": loss, **m}.items():     # summed on the device: no host sync per batch
                        metrics[k] = metrics.get(k, 0.0) + torch.as_tensor(v).detach().double() / accum
                    tokens += batch.tokens[:, 1:].numel() * world.size
                metrics = parallel.mean_over_ranks(world, metrics, self.device)   # one all-reduce, one sync
                if not math.isfinite(metrics["loss"]):    # the same verdict on every rank
                    self.finish_save()                   # a checkpoint of an earlier, finite step
                    bar.close()
                    good = self.good                 # verified when resumed from, or written by this run
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
                if self.pending is not None and parallel.all_ranks(world, self.pending.written(), self.device):
                    self.finish_save()                   # written in the background: complete it now
                stopping = step == cfg.stop_at
                if step % cfg.ckpt_every == 0 or phase_over or stopping:
                    # at a phase's end the next phase starts a fresh AdamW: save the model alone
                    state = {"stage": self.stage, "step": step, "phase": pi + 1 if phase_over else pi,
                             "loader": loader.state_dict(), "config": asdict(cfg)}
                    self.finish_save()                       # the previous one, if still being written
                    with writing(f"{self.dir}/checkpoints: could not write the checkpoint of step {step}"):
                        self.pending = parallel.start_save(self.dir, root, None if phase_over else opt, state, world,
                                                           self.async_save, frozen=False, stager=self.stager)
                    if not self.async_save:
                        self.finish_save()
                if stopping and step < bar.total:
                    self.finish_save(last=True)
                    bar.close()
                    if world.main:
                        print(f"{self.stage}: stopped after step {step} (--stop-at); its checkpoint is in "
                              f"{self.dir}/checkpoints. Run the same command without --stop-at to continue.")
                        release_locks(self.dir)
                    return False
            offset += ph.steps
        self.finish_save(last=True)
        bar.close()
        return True

    def finish_save(self, last: bool = False):
        """Complete a checkpoint written in the background (--async-save), if any: train.json goes last. last:
        the run's last save, after which the staging buffers are freed."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            step = pending.train_state["step"]
            with writing(f"{self.dir}/checkpoints: could not write the checkpoint of step {step}"):
                self.good = pending.wait()
        if last and self.stager:
            self.stager = self.stager.close()                # None

    def resume_point(self, root: Root) -> tuple[int, dict | None]:
        """(first step to run, the checkpoint's train state or None). A checkpoint saved at a phase boundary holds
        the model alone: it is loaded here; one inside a phase holds AdamW too and is loaded with it in train()."""
        if self.latest is None:
            return 0, None
        saved = parallel.read_train_state(self.latest)
        if not saved["has_optim"]:
            parallel.load_checkpoint(self.latest, root, None, self.world, frozen=False)
        if self.world.main:
            trim_metrics(self.dir, saved["step"])
            print(f"resuming {self.stage} from {self.latest} at step {saved['step']} (written by "
                  f"{saved['world_size']} process(es), now {self.world.size})")
        return saved["step"], saved


def trim_metrics(run_dir: Path, step: int, last: int | None = None):
    """On resume, keep the rows up to the checkpoint's step (step rows, and eval rows that say their step); later
    rows and a final eval row will be redone. `last`: the run's final step, for runs whose final eval row says its
    step (rl.py, qnet.py): that row is the export's, logged again when a finished run is rerun, so it goes too (it
    was kept, and a rerun left two final rows). A half-written last line (a kill while appending it) is dropped
    with a note; a damaged line before it stops the run with its line number."""
    f = Path(run_dir) / "metrics.jsonl"
    if not f.exists():
        return
    *lines, tail = f.read_bytes().decode("utf-8", errors="replace").split("\n")    # tail: after the last newline
    rows = []
    for i, line in enumerate(lines + [tail], 1):
        if not line:
            continue
        try:
            rows.append((line, json.loads(line)))
        except ValueError:
            if i <= len(lines):
                raise SystemExit(f"{f}:{i}: not a JSON row (the file was damaged): repair or delete that line, then "
                                 f"rerun") from None
            print(f"{f}: dropped a half-written last line (the run was killed while logging it)")
    at = lambda row: row.get("step", row.get("eval", {}).get("step", step + 1))                # noqa: E731
    final = lambda row: last is not None and "step" not in row and at(row) >= last              # noqa: E731
    keep = "".join(line + "\n" for line, row in rows if at(row) <= step and not final(row))
    with writing(f"{f}: could not rewrite it"):
        atomic_write(f, lambda tmp: tmp.write_text(keep))


def bf16_frozen_groups(model, trains: set) -> list[str]:
    """The frozen parameter groups whose weights are all bf16 values already (the official 8B base is): stored in
    bf16 under FSDP, they take half the memory and lose nothing. Groups that earlier stages trained in float32 stay
    float32, so exports and later stages see exactly the weights one process would."""
    exact = lambda p: torch.equal(p, p.to(torch.bfloat16).to(p.dtype))                      # noqa: E731
    groups = model.param_groups()
    return [n for n in sorted(set(groups) - trains) if all(exact(p) for p in groups[n])]
