"""parallel.py: data parallelism with sharded parameters (PyTorch FSDP2) and sharded checkpoints for train.py.

One process (`python train.py ...`) and N processes (`torchrun --nproc_per_node=N train.py ...`) run the same
training code. What differs lives here:

    World / world_from_env   who am I: torchrun's RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
    init_process_group       NCCL on GPUs (plus gloo for CPU tensors), gloo on CPU
    Root                     the FSDP root: every computation on the model runs as root(fn, *args)
    apply_fsdp               fully_shard each Llama block (base, IDM, policy), the merge module, then the root
    load_full_state          rank 0's full state dict broadcast into the sharded model, tensor by tensor
    save_checkpoint / load_checkpoint / resume_checkpoint
                             torch.distributed.checkpoint (DCP) directories, resumable on any world size; train.json
                             records every file's size and CRC-32, checked before a run resumes from it
    full_state_dict          the whole model gathered on rank 0 (for the safetensors export)
    mean_over_ranks, barrier

Sharding (the 8B stages of PAPER.md §3, on 8 x 80 GB GPUs): parameters, gradients and AdamW state are
split over the ranks (ZeRO-3). Each FSDP unit is all-gathered just before its forward and freed after it, and
gathered again for backward; gradients are reduce-scattered. Frozen modules hold no gradient and no optimizer
state and, when training in bfloat16, are stored in bfloat16 (half the bytes).

Model files (model.py, idm.py, policy.py, cola.py) know nothing of torch.distributed.

Built on torch 2.13's FSDP2 (`fully_shard`) and torch.distributed.checkpoint (DCP), which run on CPU with gloo
too. Deviations from torchtitan's apply_fsdp: the root is a thin wrapper whose forward takes the computation to run
(CoLA's training calls several model methods, not one forward); no separate embedding unit; gradients are averaged
by FSDP (divide by world size) and losses are per-micro-batch means, which is how one process computes them too.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import warnings
import zlib
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

RENDEZVOUS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

# ----------------------------------------------------------------------------------------------------------------
# Who am I


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    launched: bool = False          # started by torchrun (a process group exists, even with one process)

    @property
    def main(self) -> bool:
        return self.rank == 0


def world_from_env() -> World:
    """torchrun's variables -> World; none of them set -> one process. Reads only, so it runs before any work."""
    present = [v for v in RENDEZVOUS if v in os.environ]
    if not present:
        return World()
    missing = [v for v in RENDEZVOUS if v not in os.environ]
    if missing:
        raise SystemExit(f"environment variable {missing[0]} is not set but {present[0]} is: launch with torchrun "
                         f"(it sets {', '.join(RENDEZVOUS)}), or unset them all to run one process")
    try:
        rank, size, local = (int(os.environ[v]) for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except ValueError:
        raise SystemExit("environment variables RANK, WORLD_SIZE and LOCAL_RANK must be integers, got "
                         + ", ".join(f"{v}={os.environ[v]!r}" for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK")))
    if not (size >= 1 and 0 <= rank < size and local >= 0):
        raise SystemExit(f"environment variable RANK={rank} is not in [0, WORLD_SIZE={size})")
    return World(rank, size, local, launched=True)


def init_process_group(world: World, device_flag: str) -> torch.device:
    """The training device; under torchrun also the process group (NCCL + gloo on GPUs, gloo on CPU)."""
    use_cuda = device_flag.startswith("cuda") or (not device_flag and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise SystemExit(f"--device {device_flag}: CUDA is not available on this machine")
    if not world.launched:
        return torch.device(device_flag or ("cuda" if use_cuda else "cpu"))
    # A long timeout: ranks wait in a collective while rank 0 alone writes an export (~70 GB at 8B after fta-i).
    timeout = timedelta(hours=2)
    if use_cuda:
        device = torch.device("cuda", world.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        dist.init_process_group("cpu:gloo,cuda:nccl", device_id=device, timeout=timeout)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timeout)
    return device


def barrier(world: World):
    if world.launched:
        dist.barrier()


def mean_over_ranks(world: World, values: dict[str, float]) -> dict[str, float]:
    """Each metric averaged over the ranks (every rank saw the same number of micro batches)."""
    if not world.launched or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)      # a CPU tensor: gloo reduces it
    dist.all_reduce(t)
    return {k: float(v) / world.size for k, v in zip(keys, t.tolist())}


def max_over_ranks(world: World, x: float) -> float:
    """The largest of the ranks' values."""
    if not world.launched:
        return x
    t = torch.tensor([float(x)], dtype=torch.float64)                            # a CPU tensor: gloo reduces it
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def broadcast_object(world: World, obj):
    """Rank 0's picklable object on every rank."""
    if not world.launched:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(world: World, fn):
    """fn() on rank 0 only, the others waiting; an error there stops every rank (instead of leaving them waiting
    in the next collective): rank 0 re-raises it, the others exit with its message."""
    error = None
    if world.main:
        try:
            result = fn()
        except BaseException as e:          # noqa: B036 -- SystemExit and KeyboardInterrupt must reach the others
            error = e
    message = broadcast_object(world, None if error is None else (str(error.code) if isinstance(error, SystemExit)
                                                                  else f"{type(error).__name__}: {error}"))
    if error is not None:
        raise error
    if message is not None:
        raise SystemExit(f"rank 0 failed: {message}")
    return result if world.main else None


# ----------------------------------------------------------------------------------------------------------------
# Sharding


class Root(nn.Module):
    """root(fn, *args) = fn(model, *args).

    FSDP2 gathers a unit's parameters in the forward hooks of that unit's module. The training losses call several
    methods of CoLA (hidden, idm_logits, world_logits, policy_logits), which bypass those hooks, so everything runs
    through this module's forward instead: its hooks gather the root-level parameters (embeddings, Norm_f, W_lm,
    the codebook C, the IDM and policy norms and heads), and the blocks gather their own as they are called.
    One process uses the same wrapper, so parameter names (and checkpoints) do not depend on the world size.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn, *args):
        return fn(self.model, *args)


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The modules sharded one by one: each Llama block of the base, the IDM and the policy, and the merge module."""
    if hasattr(model, "base"):                                  # CoLA
        units = list(model.base.layers) + list(model.idm.layers) + [model.merge] + list(model.policy.layers)
    else:                                                       # a plain Transformer
        units = list(model.layers)
    return [m for m in units if any(True for _ in m.parameters())]


def apply_fsdp(root: Root, mesh, param_dtype: torch.dtype | None, cpu_offload: bool = False):
    """fully_shard every unit, then the root (bottom-up; each call is one all-gather / reduce-scatter group).

    param_dtype bfloat16: parameters are gathered and computed in bf16, gradients reduced in fp32, the sharded
    master weights stay in the dtype they have (fp32 for trained modules). Requires_grad must be final before
    this call (FSDP reads it when it first runs). cpu_offload keeps the shards, gradients and AdamW state in host
    memory; the optimizer step then runs on the CPU.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
    # cast_forward_inputs=False: a block's inputs include the float32 RoPE table, which must stay float32 (bf16
    # would round cos/sin and view_as_complex refuses it); activations are bf16 already since the weights are.
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None,
                              cast_forward_inputs=False)
    offload = CPUOffloadPolicy(pin_memory=mesh.device_type == "cuda") if cpu_offload else OffloadPolicy()
    for unit in fsdp_units(root.model):
        fully_shard(unit, mesh=mesh, mp_policy=mp, offload_policy=offload)
    fully_shard(root, mesh=mesh, mp_policy=mp, offload_policy=offload)


def reshard(root: Root):
    """Free the root's gathered parameters (FSDP keeps the root's gathered after a forward without backward, and
    the module then holds the gathered tensors, not the sharded parameters the optimizer steps)."""
    if hasattr(root, "reshard"):
        root.reshard()


def load_full_state(root: Root, full: dict | None, world: World):
    """Fill a sharded model from rank 0's full state dict ({} elsewhere): broadcast and sharded tensor by tensor,
    so no other rank ever holds the whole model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    set_model_state_dict(root, full if world.main else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def full_state_dict(root: Root, world: World) -> dict:
    """The model's full tensors (names without the "model." prefix) on rank 0, on CPU; {} on the other ranks.
    A collective under torchrun: every rank must call it."""
    if not world.launched:
        return root.model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    sd = get_model_state_dict(root, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix("model."): v for k, v in sd.items()}


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor of a DTensor's full value (e.g. a gradient norm), or t itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: <run_dir>/checkpoints/step-NNNNNNN/ = DCP files (model, AdamW) + train.json, written last
#
# train.json records the size and CRC-32 of every other file of its directory: a checkpoint is complete when it has
# a train.json, and intact when its files still match it. The newest KEEP complete checkpoints are kept, so when the
# newest is found damaged a run falls back to the one before it (training is deterministic: it redoes the same
# steps). CRC-32 catches accidental damage (a truncated, zeroed or overwritten file), not deliberate tampering.

KEEP = 2


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    return sorted((Path(run_dir) / "checkpoints").glob("step-*"))


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Oldest first, those whose train.json exists (it is written after every rank's shards)."""
    return [d for d in checkpoint_dirs(run_dir) if (d / "train.json").exists()]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint (not checked against its train.json: resume_checkpoint does that)."""
    done = complete_checkpoints(run_dir)
    return done[-1] if done else None


def read_train_state(ckpt: Path) -> dict:
    return json.loads((ckpt / "train.json").read_text())


def remove_incomplete_checkpoints(run_dir: Path) -> list[Path]:
    """Directories of a save that a crash interrupted (no train.json). Rank 0, before training starts."""
    gone = [d for d in checkpoint_dirs(run_dir) if not (d / "train.json").exists()]
    for d in gone:
        remove_checkpoint(d)
    return gone


def file_digest(f: Path) -> list[int]:
    """[bytes, CRC-32] of a file, read in 16 MiB blocks (~4 GB/s on one core)."""
    crc = 0
    with open(f, "rb") as fh:
        while block := fh.read(1 << 24):
            crc = zlib.crc32(block, crc)
    return [f.stat().st_size, crc]


def file_digests(ckpt: Path, names: list[str], world: World) -> dict[str, list[int]]:
    """{name: [bytes, CRC-32]} of ckpt's files `names` (the same list on every rank); under torchrun each rank reads
    every world.size-th file and all ranks get the whole dict (a collective)."""
    mine = {n: file_digest(ckpt / n) for i, n in enumerate(names) if i % world.size == world.rank}
    if not world.launched:
        return mine
    parts = [None] * world.size
    dist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}


def check_checkpoint(ckpt: Path, world: World = World()) -> str | None:
    """What is wrong with a complete checkpoint (train.json unreadable, a file missing, of another size or with
    another CRC-32 than train.json recorded), or None. Checkpoints from before train.json recorded its files pass
    unchecked. A collective under torchrun."""
    try:
        recorded = read_train_state(ckpt).get("files")
    except (OSError, ValueError) as e:
        return f"train.json unreadable: {e}"
    if recorded is None:
        return None
    for name, (size, _) in sorted(recorded.items()):          # the cheap checks first
        f = ckpt / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, train.json recorded {size}"
    found = file_digests(ckpt, sorted(recorded), world)
    changed = [n for n in sorted(recorded) if found[n] != recorded[n]]
    return f"{changed[0]} does not match the CRC-32 train.json recorded" if changed else None


def resume_checkpoint(run_dir: Path, world: World = World()) -> Path | None:
    """The newest complete checkpoint that check_checkpoint finds intact. A damaged newer one is reported (rank 0
    prints a line) and skipped: Run.start removes it, the steps after the older one are redone. SystemExit when
    complete checkpoints exist but none is intact: starting over would silently throw them away."""
    damaged = []
    for ckpt in reversed(complete_checkpoints(run_dir)):
        problem = check_checkpoint(ckpt, world)
        if problem is None:
            for bad, why in damaged:
                if world.main:
                    print(f"{bad}: damaged checkpoint ({why}); resuming from the previous one, {ckpt.name}, instead")
            return ckpt
        damaged.append((ckpt, problem))
    if damaged:
        bad, why = damaged[0]
        raise SystemExit(f"{bad}: damaged checkpoint ({why}) and no intact earlier one to fall back to: restore it, "
                         f"or delete {Path(run_dir) / 'checkpoints'} to start this run over from step 0")
    return None


def save_checkpoint(run_dir: Path, root: Root, optimizer, train_state: dict, world: World) -> Path:
    """Every rank writes its shards; then rank 0 writes train.json (atomically, last) with the size and CRC-32 of
    every file, and removes all checkpoints but this one and the KEEP - 1 complete ones before it.

    A crash at any moment leaves the previous checkpoints complete: they are deleted only after the new one is. A
    failed write raises OSError naming the checkpoint (DCP wraps the cause in a CheckpointException, which is a
    BaseException; it is unwrapped here).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict
    from checkpoint import atomic_write
    path = Path(run_dir) / "checkpoints" / f"step-{train_state['step']:07d}"
    if world.main and path.exists():            # a leftover of an earlier run: never mix its files with ours
        remove_checkpoint(path)
    barrier(world)
    if optimizer is None:
        state = {"model": get_model_state_dict(root)}
    else:
        msd, osd = get_state_dict(root, optimizer)
        state = {"model": msd, "optim": osd}
    try:
        with warnings.catch_warnings():         # one process: DCP warns that it assumes one process
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(state, checkpoint_id=path, no_dist=not world.launched)
    except CheckpointException as e:
        raise write_error(e, path) from None
    barrier(world)
    names = broadcast_object(world, sorted(p.name for p in path.iterdir()) if world.main else None)
    files = file_digests(path, names, world)

    def finish():
        atomic_write(path / "train.json", lambda t: t.write_text(json.dumps(
            {**train_state, "has_optim": optimizer is not None, "world_size": world.size, "files": files}, indent=1)))
        older = [d for d in complete_checkpoints(run_dir) if d < path]
        keep = {path, *older[max(0, len(older) - (KEEP - 1)):]}
        for old in checkpoint_dirs(run_dir):
            if old not in keep:
                remove_checkpoint(old)
    on_main(world, finish)                      # a failure on rank 0 stops every rank
    return path


def write_error(e: BaseException, path: Path) -> OSError:
    """The OSError behind a failed DCP save, naming the checkpoint directory. torch.save reports a full disk as a
    RuntimeError ("unexpected pos") with the OSError only in its context, which other ranks do not receive: a disk
    with less than 16 MiB free then counts as full."""
    todo, seen = [exc for exc, _ in getattr(e, "failures", {}).values()] or [e], set()
    while todo:
        x = todo.pop()
        if isinstance(x, OSError):
            return OSError(x.errno, x.strerror or str(x), str(path))
        seen.add(id(x))
        todo += [c for c in (x.__cause__, x.__context__) if c is not None and id(c) not in seen]
    where = next((p for p in [path, *path.parents] if p.exists()), Path("."))
    if shutil.disk_usage(where).free < 16 * 2**20:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    first = next(iter(getattr(e, "failures", {0: (e, None)}).values()))[0]
    return OSError(errno.EIO, f"{type(first).__name__}: {str(first).splitlines()[0] if str(first) else ''}",
                   str(path))


def remove_checkpoint(path: Path):
    """train.json first, so that a crash midway leaves an incomplete directory, never a damaged complete one."""
    (path / "train.json").unlink(missing_ok=True)
    shutil.rmtree(path)


def load_checkpoint(ckpt: Path, root: Root, optimizer=None, world: World = World()):
    """Model (and, if given, optimizer) state from a DCP checkpoint, resharded to this world size in place. A
    checkpoint DCP cannot read stops the run with one line (CheckpointException is a BaseException)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict, set_model_state_dict,
                                                         set_state_dict)
    if optimizer is None:
        state = {"model": get_model_state_dict(root)}
    else:
        msd, osd = get_state_dict(root, optimizer)
        state = {"model": msd, "optim": osd}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=ckpt, no_dist=not world.launched)
    except (CheckpointException, OSError) as e:
        cause = next(iter(e.failures.values()))[0] if isinstance(e, CheckpointException) else e
        raise SystemExit(f"{ckpt}: cannot read this checkpoint ({type(cause).__name__}: "
                         f"{(str(cause).splitlines() or [''])[0]}); delete it to resume from an earlier one") from None
    if optimizer is None:
        set_model_state_dict(root, state["model"])
    else:
        set_state_dict(root, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
