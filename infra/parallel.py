"""infra/parallel.py: data parallelism with sharded parameters (PyTorch FSDP2) and sharded checkpoints for train.py.

One process (`python train.py ...`) and N processes (`torchrun --nproc_per_node=N train.py ...`) run the same
training code. What differs lives here:

    World / world_from_env   who am I: torchrun's RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT
    init_process_group       NCCL on GPUs (plus gloo for CPU tensors), gloo on CPU, a short timeout; a gloo group
                             with a long one for waits on slow work (rank 0's reads and exports, checkpoint writes)
    Root                     the FSDP root: every computation on the model runs as root(fn, *args)
    apply_fsdp               fully_shard each trained Llama block (base, IDM, policy) and the merge module if it
                             trains, then the root; frozen modules stay whole on every rank; backward prefetches
                             only what backward uses; device_mesh: 1-D, or 2-D (shard in a node, replicate across);
                             sync_replicas: on 2-D, the cross-group all-reduce on a step's last micro batch only
    load_full_state          rank 0's full state dict broadcast into the sharded model, tensor by tensor
    save_checkpoint / start_save / load_checkpoint / resume_checkpoint
                             torch.distributed.checkpoint (DCP) directories, resumable on any world size, written in
                             the foreground or a background thread; train.json records every file's size and CRC-32,
                             checked before a run resumes from it
    full_state_dict          the whole model gathered on rank 0 (for the safetensors export)
    mean_over_ranks, all_ranks, max_over_ranks, barrier

Sharding (the 8B stages of PAPER.md §3, on 8 x 80 GB GPUs): the trained parameters, their gradients and AdamW state
are split over the ranks (ZeRO-3). Each FSDP unit is all-gathered just before its forward and freed after it, and
gathered again for backward; gradients are reduce-scattered. Frozen modules hold no gradient and no optimizer state,
are stored in bfloat16 when their values are bf16 already (the official base), and are not sharded: a frozen module
costs memory on every rank (infra/memory.py plans it) but no communication at all.

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
# One process saves and loads DCP checkpoints without a process group (no_dist), on purpose; DCP warns each time,
# from the background thread too under --async-save, where a `catch_warnings` around the call cannot reach it.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

# ----------------------------------------------------------------------------------------------------------------
# Who am I


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    launched: bool = False          # started by torchrun (a process group exists, even with one process)
    local_size: int = 0             # processes on this node (torchrun's LOCAL_WORLD_SIZE); 0: all (one node)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def node_size(self) -> int:
        """Processes on this node: the default group that shards the trained state (device_mesh)."""
        return self.local_size or self.size


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
    local_size = os.environ.get("LOCAL_WORLD_SIZE", "")
    return World(rank, size, local, launched=True, local_size=int(local_size) if local_size.isdigit() else size)


# Collectives time out after `timeout` seconds (10 minutes by default: a rank that died or hangs surfaces as an error
# on the others within minutes, not hours). Waiting for rank 0's own slow work (reading the 8B checkpoint, an export
# of 16-40 GB) or for every rank's writes (a checkpoint, 40-110 GB at 8B) goes through SLOW, a gloo group with a
# 2-hour timeout, so the training collectives (NCCL on GPUs) can keep the short one.
TIMEOUT = 600                       # seconds: train.py's --collective-timeout default
SLOW_TIMEOUT = timedelta(hours=2)
_slow = None                        # the gloo process group of on_main, barrier, broadcast_object and checkpoints


def device_type(device_flag: str) -> str:
    """The device a --device flag ("", "cpu", "cuda", "cuda:1") runs on: "" means cuda if available."""
    return "cuda" if device_flag.startswith("cuda") or (not device_flag and torch.cuda.is_available()) else "cpu"


def device_of(flag: str) -> torch.device:
    """--device: "" (cuda if available, else cpu), cpu, cuda or cuda:N; anything else, or CUDA where there is none,
    ends the run with one line."""
    try:
        device = torch.device(flag or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise SystemExit(f"--device {flag!r}: expected cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device {flag!r}: expected cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {flag}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise SystemExit(f"--device {flag}: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def init_process_group(world: World, device_flag: str, timeout: float = TIMEOUT) -> torch.device:
    """The training device; under torchrun also the process groups: NCCL (CUDA tensors) + gloo (CPU tensors) on
    GPUs, gloo on CPU, each timing out after `timeout` seconds, and the long-waiting gloo group SLOW."""
    global _slow
    use_cuda = device_type(device_flag) == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise SystemExit(f"--device {device_flag}: CUDA is not available on this machine")
    if not world.launched:
        return device_of(device_flag)
    if use_cuda:
        if world.local_rank >= torch.cuda.device_count():
            raise SystemExit(f"LOCAL_RANK {world.local_rank}: this node has {torch.cuda.device_count()} visible "
                             f"GPU(s): start at most that many processes per node (--nproc_per_node), one per GPU")
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("cpu:gloo,cuda:nccl", device_id=device, timeout=timedelta(seconds=timeout))
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timedelta(seconds=timeout))
    _slow = dist.new_group(backend="gloo", timeout=SLOW_TIMEOUT)
    return device


def shutdown():
    """Destroy every process group, SLOW included, and drop this module's reference to it. Left to the interpreter's
    exit, a group's gloo threads can abort the process after its work is done ("terminate called without an active
    exception")."""
    global _slow
    if dist.is_initialized():
        dist.destroy_process_group()
    _slow = None


def barrier(world: World):
    if world.launched:
        dist.barrier(group=_slow)


def mean_over_ranks(world: World, values: dict, device: torch.device | None = None) -> dict[str, float]:
    """Each metric averaged over the ranks (every rank saw the same number of micro batches). Values may be floats
    or 0-d tensors on `device` (the training device: NCCL reduces CUDA tensors): one all-reduce, then one copy to
    the host for all of them."""
    if not values:
        return {}
    keys = sorted(values)
    t = torch.stack([torch.as_tensor(values[k], dtype=torch.float64, device=device) for k in keys])     # [n]
    if world.launched:
        dist.all_reduce(t)
        t /= world.size
    return dict(zip(keys, t.tolist()))


def all_ranks(world: World, flag: bool, device: torch.device | None = None) -> bool:
    """True when `flag` is true on every rank (one all-reduce on the training device)."""
    if not world.launched:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


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
    dist.broadcast_object_list(box, src=0, group=_slow)
    return box[0]


def all_gather_objects(world: World, obj) -> list:
    """Every rank's picklable object, in rank order, on every rank."""
    if not world.launched:
        return [obj]
    parts = [None] * world.size
    dist.all_gather_object(parts, obj, group=_slow)
    return parts


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
    through this module's forward instead: its hooks gather the root-level parameters (Norm_f, the codebook C, the
    IDM and policy norms and heads), and the units (blocks, merge, embedding table, W_lm) gather their own as they
    are called (W_lm's loss method too: apply_fsdp registers it).
    One process uses the same wrapper, so parameter names (and checkpoints) do not depend on the world size.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn, *args):
        return fn(self.model, *args)


def llama_ends(llama: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """A Llama's embedding table and W_lm as units of their own ([first], [last]), each V x D (0.5B parameters at
    8B, 1 GB gathered in bf16): in the root group they would be gathered at once before the forward, held to the end
    of backward and reduce-scattered together (4.2 GB of float32 gradients at 8B) after the last block's backward,
    all of it exposed; as units the table is gathered alone, W_lm while the blocks run and its gradient
    reduce-scattered while they run backward (torchtitan shards them so too). Tied embeddings (one tensor for both)
    stay in the root: one tensor cannot be in two groups. A module without them (rl.py shards CoLA's policy alone):
    none."""
    if not (hasattr(llama, "tok_embeddings") and hasattr(llama, "output")) or llama.args.tie_embeddings:
        return [], []
    return [llama.tok_embeddings], [llama.output]


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The modules sharded one by one, in forward order: the embedding table, each trained Llama block and W_lm of
    the base (llama_ends), the IDM's and the policy's blocks, and the merge module if it trains (W_lm, last: the
    world model's loss reads it after the merge module). Frozen modules are not units: apply_fsdp leaves them
    whole."""
    if hasattr(model, "base"):                                  # CoLA
        first, last = llama_ends(model.base)
        units = first + list(model.base.layers) + list(model.idm.layers) + [model.merge] + list(
            model.policy.layers) + last
    else:                                                       # a plain Transformer
        first, last = llama_ends(model)
        units = first + list(model.layers) + last
    return [m for m in units if any(p.requires_grad for p in m.parameters())]


def backward_chains(model: nn.Module) -> list[list[nn.Module]]:
    """The units in the order each loss's forward runs them with gradient, one list per chain that backward walks in
    reverse: the base's embedding table, blocks and W_lm; the IDM's blocks then the merge module (Stage A's
    gradient reaches the IDM through the merge module); the policy's blocks. Only trained units (fsdp_units)."""
    units = set(fsdp_units(model))
    if hasattr(model, "base"):
        first, last = llama_ends(model.base)
        chains = [first + list(model.base.layers) + last, list(model.idm.layers) + [model.merge],
                  list(model.policy.layers)]
    else:
        first, last = llama_ends(model)
        chains = [first + list(model.layers) + last]
    return [c for c in ([m for m in chain if m in units] for chain in chains) if c]


def apply_fsdp(root: Root, mesh, param_dtype: torch.dtype | None, cpu_offload: bool = False):
    """Shard the trained part with FSDP2 and leave the frozen part whole on every rank.

    Trained: fully_shard every unit (fsdp_units: blocks, the merge module, the embedding table and W_lm of a trained
    base), then the root (its remaining trained parameters: norms, the IDM's and the policy's heads, the codebook C,
    tied embeddings); each call is one all-gather / reduce-scatter group.
    Frozen (requires_grad False, final before this call): not sharded but replicated, stored in the dtype they
    have (the official base in bf16: 16 GB at 8B). A frozen module then costs no collective at all, where sharded
    it would be all-gathered for every micro batch (15 GB per rank per micro batch for Stage A's base at 8B, and
    across nodes on two), in exchange for 14 GB more per GPU (infra/memory.py plans both).

    Prefetching: FSDP2 by default prefetches, in backward, the unit that ran before in forward, and it counts units
    that ran without gradient (fta-i's second phase runs the trained base under no_grad before the policy), so
    backward would all-gather a block it never uses. Each unit is told instead which unit its backward reaches next
    (backward_chains); the first of a chain names itself, which FSDP skips (already gathered). The last unit of the
    forward keeps its parameters gathered after forward, as backward needs them at once.

    param_dtype bfloat16: parameters are gathered and computed in bf16, gradients reduced in fp32, the sharded
    master weights stay in the dtype they have (fp32 for trained modules). cpu_offload keeps the shards, gradients
    and AdamW state in host memory; the optimizer step then runs on the CPU. mesh: 1-D (shard over every rank) or
    2-D ("replicate", "shard"): shard within a node, replicate across nodes (HSDP; device_mesh).
    """
    from torch.distributed.fsdp import (CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard,
                                        register_fsdp_forward_method)
    # cast_forward_inputs=False: a block's inputs include the float32 RoPE table, which must stay float32 (bf16
    # would round cos/sin and view_as_complex refuses it); activations are bf16 already since the weights are.
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None,
                              cast_forward_inputs=False)
    offload = CPUOffloadPolicy(pin_memory=mesh.device_type == "cuda") if cpu_offload else OffloadPolicy()
    units = fsdp_units(root.model)
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=mp, offload_policy=offload, reshard_after_forward=unit is not units[-1])
        if hasattr(unit, "loss"):                  # W_lm (model.LMHead): the training loss reads it in .loss
            register_fsdp_forward_method(unit, "loss")
    frozen = {p for p in root.parameters() if not p.requires_grad}
    fully_shard(root, mesh=mesh, mp_policy=mp, offload_policy=offload, ignored_params=frozen)
    for chain in backward_chains(root.model):
        for i, unit in enumerate(chain):
            unit.set_modules_to_backward_prefetch([chain[max(0, i - 1)]])


def start_phase(root: Root, groups: list[str]):
    """Before a training phase: of the units it trains (those holding parameters of `groups`), the last in forward
    order keeps its parameters gathered after forward (its backward comes next), the others free theirs. FTA-I's
    phases train different units (the base, then the policy), so this is set per phase."""
    if not hasattr(root, "reshard"):
        return                                                  # one process: nothing is sharded
    trained = {id(p) for name in groups for p in root.model.param_groups()[name]}
    units = [u for u in fsdp_units(root.model) if any(id(p) in trained for p in u.parameters())]
    for unit in fsdp_units(root.model):
        unit.set_reshard_after_forward(not (units and unit is units[-1]))


def sync_replicas(root: Root, last: bool):
    """HSDP (2-D mesh): average gradients across the replica groups only on the optimizer step's last micro batch.
    The earlier ones reduce-scatter within their group and FSDP adds the shards up locally
    (set_requires_all_reduce), so the cross-node all-reduce runs once per step instead of once per micro batch
    (16 times at the 8B default of 16 micro batches per rank: ~0.7 GB per rank each at Stage A). The sum is the
    same; one 1-D mesh, or one process, has no all-reduce to skip."""
    if hasattr(root, "set_requires_all_reduce"):
        root.set_requires_all_reduce(last)


def device_mesh(world: World, device: torch.device, shard: int = 0):
    """The ranks FSDP shards over: all of them (1-D), or groups of `shard` ranks (default: one node's,
    world.node_size) that each hold a whole sharded copy and average gradients across groups (2-D, HSDP): on
    several nodes only the gradients' all-reduce crosses the network, not every all-gather. A `shard` that does not
    divide the world size is refused earlier, with the flags (train.check_flags)."""
    from torch.distributed.device_mesh import init_device_mesh
    shard = shard or world.node_size
    if shard == world.size:
        return init_device_mesh(device.type, (world.size,))
    return init_device_mesh(device.type, (world.size // shard, shard), mesh_dim_names=("replicate", "shard"))


def unshard(root: Root):
    """Gather every FSDP unit of root (all started, then waited for): its modules then hold the whole parameters, in
    the mixed-precision gather dtype, until reshard(root). One all-gather per unit, where DTensor.full_tensor per
    parameter is one per parameter, in the stored (float32) dtype: rl.py refreshes its generating replica so every
    step (32 GB per rank at 8B token level in float32)."""
    from torch.distributed.fsdp import FSDPModule
    for handle in [m.unshard(async_op=True) for m in root.modules() if isinstance(m, FSDPModule)]:
        handle.wait()


def reshard(root: Root):
    """Free the gathered parameters a forward without backward left behind (FSDP keeps the root's, and the last
    unit's, gathered after forward; the module then holds the gathered tensors, not the sharded parameters the
    optimizer steps and checkpoints save)."""
    for m in root.modules():
        if hasattr(m, "reshard"):
            m.reshard()


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
    return {k: v for part in all_gather_objects(world, mine) for k, v in part.items()}


def own_digests(ckpt: Path, rank: int) -> dict[str, list[int]]:
    """{name: [bytes, CRC-32]} of the files of ckpt this rank wrote: DCP names a rank's shards __<rank>_<i>.distcp;
    rank 0 also takes the files no rank is named in (DCP's .metadata). Only file reads: safe in a background thread."""
    mine = [f for f in ckpt.iterdir() if f.name.startswith(f"__{rank}_")
            or (rank == 0 and not f.name.startswith("__"))]
    return {f.name: file_digest(f) for f in mine}


_digesting = None                  # one background thread: the CRC-32 of an async save's files, once written


def digest_after(future, ckpt: Path, rank: int):
    """A future of own_digests(ckpt, rank), computed in a background thread once DCP's write (future) is done."""
    global _digesting
    if _digesting is None:
        from concurrent.futures import ThreadPoolExecutor
        _digesting = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-crc")
    return _digesting.submit(lambda: (getattr(future, "upload_completion", future).result(),
                                      own_digests(ckpt, rank))[1])


def checkpoint_stager(device: torch.device):
    """The host copy --async-save writes from, kept for the whole run. DCP's default stages every save into fresh
    host memory, unpinned; this one (DCP's DefaultStager) keeps one buffer per tensor storage it has staged and
    refills it at the next save, pinned on CUDA, so the copy from the GPU runs at full speed without first paging
    in new memory. The copy stays synchronous (complete when start_save returns, so training may change the weights
    right after): only the writing runs in the background. The buffers stay allocated between saves (one
    checkpoint's shards per rank, in host memory), and a save must be waited for before the next refills them."""
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
    cuda = device.type == "cuda"
    return DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False, use_async_staging=False,
                                        use_non_blocking_copy=cuda))


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


def save_checkpoint(run_dir: Path, root: Root, optimizer, train_state: dict, world: World,
                    frozen: bool = True) -> Path:
    """Every rank writes its shards; then rank 0 writes train.json (atomically, last) with the size and CRC-32 of
    every file, and removes all checkpoints but this one and the KEEP - 1 complete ones before it.

    A crash at any moment leaves the previous checkpoints complete: they are deleted only after the new one is. A
    failed write raises OSError naming the checkpoint (DCP wraps the cause in a CheckpointException, which is a
    BaseException; it is unwrapped here).
    """
    return start_save(run_dir, root, optimizer, train_state, world, frozen=frozen).wait()


def state_options(frozen: bool, load: bool = False):
    """Which parameters a checkpoint holds. frozen True: all of them. frozen False (train.py's stages): those that
    train (requires_grad) and their AdamW state. A stage's frozen modules never change during the run, which rebuilds
    them from its --init when it resumes; at 8B Stage A's frozen base (16 GB bf16) and policy were otherwise staged in
    host memory by every rank under --async-save, written and checksummed at every checkpoint, for nothing. (qnet.py
    keeps frozen=True: its target network has no gradient but is copied from Q every 50 updates.) Loading asks for
    the same keys, so checkpoints written whole load either way; a trained key missing from the files stops
    dcp.load, so setting the keys read need not be strict about the frozen ones."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(ignore_frozen_params=not frozen, strict=frozen or not load)


def start_save(run_dir: Path, root: Root, optimizer, train_state: dict, world: World,
               asynchronous: bool = False, frozen: bool = True, stager=None) -> "PendingSave":
    """save_checkpoint in two halves: the DCP write starts now, PendingSave.wait() ends it (train.json, old
    checkpoints removed). asynchronous: DCP copies the state to host memory now (into stager's buffers, reused
    from save to save: checkpoint_stager; training may change the state right after) and writes the files in a
    background thread while training goes on, after which the same thread takes the CRC-32 of this rank's files;
    wait() before the next save, the export and the end of the run. Until wait() the checkpoint has no train.json:
    a crash meanwhile leaves it incomplete, removed at the next start, and the previous checkpoints complete."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict
    path = Path(run_dir) / "checkpoints" / f"step-{train_state['step']:07d}"
    if world.main and path.exists():            # a leftover of an earlier run: never mix its files with ours
        remove_checkpoint(path)
    barrier(world)
    if optimizer is None:
        state = {"model": get_model_state_dict(root, options=state_options(frozen))}
    else:
        msd, osd = get_state_dict(root, optimizer, options=state_options(frozen))
        state = {"model": msd, "optim": osd}
    try:
        with warnings.catch_warnings():         # the module-level filter, for callers that reset filters (pytest)
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            if asynchronous:
                future = dcp.async_save(state, checkpoint_id=path, no_dist=not world.launched, process_group=_slow,
                                        **({"async_stager": stager} if stager is not None else {}))
            else:
                future = dcp.save(state, checkpoint_id=path, no_dist=not world.launched, process_group=_slow)
    except CheckpointException as e:
        raise write_error(e, path) from None
    if not asynchronous:
        return PendingSave(Path(run_dir), path, None, None, optimizer is not None, train_state, world)
    return PendingSave(Path(run_dir), path, future, digest_after(future, path, world.rank), optimizer is not None,
                       train_state, world)


@dataclass
class PendingSave:
    run_dir: Path
    path: Path
    future: object                  # DCP's future of the background write (None: written already)
    digests: object                 # a future of own_digests, taken after that write (None: taken in wait)
    has_optim: bool
    train_state: dict
    world: World

    def written(self) -> bool:
        """This rank's files are written and their CRC-32 taken (in the background)."""
        return all(f is None or f.done() for f in (self.future, self.digests))

    def wait(self) -> Path:
        """The files written on every rank, then train.json (rank 0, last) and the older checkpoints removed."""
        from torch.distributed.checkpoint.api import CheckpointException
        from infra.files import atomic_write
        path, world = self.path, self.world
        if self.future is not None:
            try:
                getattr(self.future, "upload_completion", self.future).result()
            except CheckpointException as e:
                raise write_error(e, path) from None
            self.future = None
        mine = own_digests(path, world.rank) if self.digests is None else self.digests.result()
        barrier(world)
        names = broadcast_object(world, sorted(p.name for p in path.iterdir()) if world.main else None)
        found = {}
        for part in all_gather_objects(world, mine):
            found.update(part)
        missing = [n for n in names if n not in found]         # none with DCP's names; read here if ever
        found.update(file_digests(path, missing, world))
        files = {n: found[n] for n in names}

        def finish():
            atomic_write(path / "train.json", lambda t: t.write_text(json.dumps(
                {**self.train_state, "has_optim": self.has_optim, "world_size": world.size, "files": files},
                indent=1)))
            older = [d for d in complete_checkpoints(self.run_dir) if d < path]
            keep = {path, *older[max(0, len(older) - (KEEP - 1)):]}
            for old in checkpoint_dirs(self.run_dir):
                if old not in keep:
                    remove_checkpoint(old)
        on_main(world, finish)                  # a failure on rank 0 stops every rank
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


def load_checkpoint(ckpt: Path, root: Root, optimizer=None, world: World = World(), frozen: bool = True):
    """Model (and, if given, optimizer) state from a DCP checkpoint, resharded to this world size in place. A
    checkpoint DCP cannot read stops the run with one line (CheckpointException is a BaseException)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict, set_model_state_dict,
                                                         set_state_dict)
    if optimizer is None:
        state = {"model": get_model_state_dict(root, options=state_options(frozen))}
    else:
        msd, osd = get_state_dict(root, optimizer, options=state_options(frozen))
        state = {"model": msd, "optim": osd}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=ckpt, no_dist=not world.launched, process_group=_slow)
    except (CheckpointException, OSError) as e:
        cause = next(iter(e.failures.values()))[0] if isinstance(e, CheckpointException) else e
        raise SystemExit(f"{ckpt}: cannot read this checkpoint ({type(cause).__name__}: "
                         f"{(str(cause).splitlines() or [''])[0]}); delete it to resume from an earlier one") from None
    if optimizer is None:
        set_model_state_dict(root, state["model"], options=state_options(frozen, load=True))
    else:
        set_state_dict(root, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=state_options(frozen, load=True))
