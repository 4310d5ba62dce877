"""infra/memory.py: how many bytes each training stage needs per GPU, planned by arithmetic and measured on fake tensors.

plan(stage, cfg, phases)
                       bytes per GPU by category (trained state, frozen weights, FSDP buffers, autocast copies,
                       activations, loss), arithmetic on the real module sizes (built on the meta device) and on the
                       constants the stage trains with: its phases (train.TRAINS[stage], passed in), ce_chunk_rows,
                       the bf16 rule of trainer.bf16_frozen_groups, cfg.micro_batch / seq_len /
                       activation_checkpointing
measure(stage, cfg, phases, losses, gpus)
                       peak bytes of one training micro step (forward, backward, AdamW) of that stage's own loss
                       functions (train.stage_losses, passed in), with every tensor fake (FakeTensorMode: shapes and
                       dtypes, no data), on one process or as rank 0 of a fake process group under FSDP: a
                       live-storage count
check_fits(stage, cfg, phases, world, device)
                       one line and exit when the plan exceeds the GPU; nothing on CPU

train.py passes its stage table in; this module imports no training script.

The 8B stages are those of PAPER.md §3 (micro batch 4 x 2048 tokens, bf16 mixed precision, AdamW).

Run it:
    python -m tools.bench --memory-plan                    # the table, one process and per GPU on 8 GPUs
    python -m pytest -q tests/test_memory.py         # plan against measurement for every stage at 8B shapes

Deviations (this is tooling; the paper reports no memory figures):
  - measure() runs on CPU fake tensors: CPU autocast and CPU kernels (flash attention for CPU, the for-loop AdamW
    with one parameter-sized temporary at a time). On CUDA the same ops are listed for bf16 and flash attention
    saves the same output and log-sum-exp; CUDA's fused AdamW has no temporaries, and the plan counts none;
  - under FSDP it measures rank 0 of a fake process group: collectives move no data, and rank 0's shards stand
    for every rank's;
  - neither the CUDA context nor the allocator's fragmentation (1-3 GB together) is counted by either.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed.device_mesh import init_device_mesh
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten

from cola import COLA_PRESETS, CoLA
from data import Batch
from infra import parallel
from infra.ce import ce_chunk_rows
from infra.trainer import autocast, enable_activation_checkpointing, make_optimizer, set_trainable
from model import PRESETS, Transformer

GiB = 2**30


# ----------------------------------------------------------------------------------------------------------------
# Measurement: a live-storage tracker under FakeTensorMode


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of every storage alive, as an allocator would: each op's new output storages are added when
    they appear and dropped once nothing refers to them (their weak reference expired). peak: the most at once.

    torch's MemTracker cannot be used: it hooks every parameter's gradient and fails on frozen ones. Under
    FakeTensorMode a storage has its real size but no data. Data-dependent results get a stand-in: every scalar read
    (loss.item(), int(k.max()), AdamW's step count) is 1, bincount(k, minlength=K) is K zeros; nothing read that
    way sets the size of a tensor.
    """

    def __init__(self, resizes: bool = False):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.now = self.peak = 0
        self.resizes = resizes         # reread sizes: FSDP frees and regrows gathered storages with resize_

    def sweep(self) -> int:
        """Drop the storages that died (and with resizes reread the others' sizes); the bytes alive now."""
        for k, (r, n) in list(self.live.items()):
            if r.expired():
                del self.live[k]
                self.now -= n
            elif self.resizes:
                m = torch.UntypedStorage._new_with_weak_ptr(k).nbytes()
                self.live[k] = (r, m)
                self.now += m - n
        return self.now

    def add(self, t: torch.Tensor):
        if is_traceable_wrapper_subclass(t):          # a DTensor (FSDP): the local shard holds the storage
            for inner in (getattr(t, name) for name in t.__tensor_flatten__()[0]):
                if isinstance(inner, torch.Tensor):
                    self.add(inner)
            return
        s = t.untyped_storage()
        ref = StorageWeakRef(s)        # keyed by the storage's address, which it keeps while we hold this ref
        if ref.cdata in self.live and not (self.resizes and s.nbytes() > self.live[ref.cdata][1]):
            return
        self.live[ref.cdata] = (ref, self.live.get(ref.cdata, (ref, 0))[1])
        self.sweep()
        if not self.resizes:
            self.live[ref.cdata] = (ref, s.nbytes())
            self.now += s.nbytes()
        self.peak = max(self.peak, self.now)          # the peak is taken at allocations

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            return 1
        if func is torch.ops.aten.bincount.default:    # codebook usage: K counts (its size depends on the data)
            return torch.zeros(kwargs.get("minlength", args[2] if len(args) > 2 else 0), dtype=torch.long,
                               device=args[0].device)
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.add(t)
        return out


# ----------------------------------------------------------------------------------------------------------------
# The plan: arithmetic


def block_activation_bytes(a, cast: bool) -> int:
    """Bytes per token one Llama block keeps for backward under bf16 autocast (flash attention: no T x T scores).
    Counted on the tensors the block's autograd graph holds (tests/test_memory.py checks it on a fake block):

      each RMSNorm   its float32 input (4 D), 1/rms (4), the normalised bf16 value (2 D) the weight's gradient
                     needs (a float32 residual stream, a float32 base on one process: the norm reads the stream
                     itself and normalises in float32, 4 D more per block, which plan() adds)
      projections    bf16 weights (FSDP's gathered, or a stored-bf16 base): the norm's bf16 output, once (2 D each
                     norm); float32 weights (one process): autocast casts the norm's float32 output once per
                     projection that reads it, 3 x 2 D for wq, wk, wv and 2 x 2 D for w1, w3
      attention      q and k after RoPE and v (2 D + 4 D_kv), its output (2 D) and log-sum-exp (4 H)
      SwiGLU         w1 x, w3 x, silu(w1 x) and the product, 2 F each

    20 D + 4 D_kv + 8 F + 4 H + 8 with bf16 weights, 6 D more with float32 ones (8B: 196 KiB / 220 KiB per token).
    """
    d_kv = a.n_kv_heads * a.head_dim
    return (20 + 6 * cast) * a.dim + 4 * d_kv + 8 * a.ffn_hidden + 4 * a.n_heads + 8


def merge_activation_bytes(dim: int, hidden: int, cast: bool) -> int:
    """Per token and merge layer (cola.MergeMLP, W_down(silu(W_gate [s; e]) * W_up [s; e])) under bf16 autocast:
    [s; e] in bf16 once (4 D) with bf16 weights, once per projection (2 x 4 D) with float32 ones; 2 F for each of
    W_gate x, W_up x, silu and the product."""
    return (8 if cast else 4) * dim + 8 * hidden


# What each phase of each stage runs, from train.py's losses: the stack whose blocks keep activations ("base",
# "idm", "policy"); whether the merge module is on the gradient path (None: fta-p's --base-grad decides); the loss,
# "lm" (lm_head_ce over V) or "actions" (masked_ce over K); the groups the forward reads (autocast caches a bf16
# copy of those with requires_grad, under no_grad too). What runs under no_grad keeps only its output h.
PATHS = {
    "base": [("base", False, "lm", {"base"})],
    "sft": [("base", False, "lm", {"base"})],
    "pretrain": [("idm", True, "lm", {"base", "idm", "codebook", "merge"})],      # h = sg(base(x)), IDM, merge
    "bc": [("policy", False, "actions", {"base", "idm", "policy"})],              # h, k* under no_grad; pi(h)
    "fta-i": [("base", True, "lm", {"base", "idm", "codebook", "merge"}),          # k from the frozen IDM
              ("policy", False, "actions", {"base", "idm", "policy"})],          # phase 2 is bc
    "fta-p": [("base", None, "lm", {"base", "policy", "codebook", "merge"})],     # a = argmax pi under no_grad
}


@dataclass
class Plan:
    """Bytes per GPU of one stage at its largest phase and moment. The categories add up to total."""
    stage: str
    preset: str
    gpus: int
    shard: int                 # ranks the trained groups are sharded over (1: one process, no FSDP)
    phase: int                 # which phase of train.TRAINS[stage] is the largest (0-based)
    moment: str                # "forward end", "loss backward" or "block recompute"
    trained: int               # parameters this phase trains
    state: int                 # every group some phase trains: weights, and this phase's grads + AdamW m, v
    frozen: int                # groups no phase trains, replicated at their stored dtype
    buffers: int               # FSDP: gathered bf16 root and two units (at the end: the root's fp32 gradient)
    copies: int                # one process: bf16 copies of float32 weights (autocast's cache, W_lm's)
    activations: int           # what the autograd graph keeps (blocks, merge, h, norms, heads), a recompute
    loss: int                  # lm_head_ce's chunk (and in backward its dW) or the CE over K
    phases: list = field(default_factory=list)   # total of each phase

    @property
    def total(self) -> int:
        return self.state + self.frozen + self.buffers + self.copies + self.activations + self.loss


def plan(stage: str, cfg, phases: list, gpus: int = 1, shard: int | None = None, shard_frozen: bool = False) -> Plan:
    """Bytes per GPU of `stage` at cfg's preset, micro batch B, sequence length T, dtype and activation
    checkpointing, on one process (gpus 1) or under torchrun with the trained groups sharded over `shard` ranks
    (default: the GPUs of one node, at most 8). Every phase is planned; the largest counts. Per phase:

    state        16 B per parameter of the phase's groups (float32 weight and gradient, AdamW m and v), 4 B for
                 those another phase trains (float32, no state now), all / shard;
    frozen       the groups no phase trains, whole on every rank: 2 B for the base when training in bf16 (its
                 official weights are bf16 values, trainer.bf16_frozen_groups), 4 B otherwise (float32 modules
                 trained by an earlier stage); shard_frozen plans the alternative parallel.apply_fsdp does not
                 take, frozen groups sharded too (/ shard, and gathered in bf16 like the trained ones);
    buffers      under FSDP (the units of parallel.fsdp_units): the trained root-level parameters gathered in
                 bf16 for the whole step, the two largest trained units gathered in bf16 (current, prefetched; of
                 a trained base's embedding table and W_lm, units too, only one is ever gathered, beside a block),
                 and at the end of backward the root-level gradient in float32 for its reduce-scatter;
    copies       one process: autocast's bf16 copy of every float32 matrix with requires_grad that the forward
                 reads (cached until the forward ends) and, when W_lm is float32 but frozen, lm_head_ce's copy;
    activations  the stack's blocks, on B (T+1) tokens (base, IDM) or B T (policy, a plain Llama):
                 block_activation_bytes each, or with activation checkpointing each block's input only (and in
                 backward one block recomputed plus its input's gradient); the merge layers on the gradient path
                 (merge_activation_bytes; a frozen float32 merge also keeps its weights' bf16 casts); Norm_f's
                 float32 input and normalised value; the stack's norm and head over K; the states h;
    loss         lm_head_ce: one chunk of ce_chunk_rows(V) positions at 12 B per logit, the saved world
                 state and log-sum-exp, and in backward the float32 dW [V, D] when W_lm trains and ds [B T, D];
                 masked_ce over K actions: 10 B per logit.
    Five moments can be the peak: the forward's end (copies alive), the loss's backward (copies freed, dW alive),
    a block's recompute, (merge off the gradient path) the merge's forward, whose graph lives until Norm_f(s_2)
    is detached, and under FSDP the root's reduce-scatter at the end of backward; the largest counts. bf16
    activations are 2 B, the residual stream and h 4 B where the base is float32 on one process. float32 training
    (no autocast) uses the same counts with 4 B activations (checked only at the tiny preset: 0-17% over). Not
    counted: the CUDA context and allocator fragmentation (1-3 GB together), the optimizer step's temporaries
    (none with CUDA's fused AdamW), RoPE tables (a few MB).
    """
    shard = shard or (1 if gpus == 1 else min(gpus, 8))
    one, bf16 = shard == 1, cfg.dtype == "bfloat16"
    with torch.device("meta"):
        model = stage_model(stage, cfg.preset)
    set_trainable(model, {g for ph in phases for g in ph})      # fsdp_units lists the trained units
    llama = stage in ("base", "sft")
    a, c = (model.args, None) if llama else (model.base_args, COLA_PRESETS[cfg.preset])
    groups = model.param_groups()
    n = {g: sum(p.numel() for p in ps) for g, ps in groups.items()}
    emb = (model if llama else model.base).tok_embeddings.weight       # a lookup: autocast casts no copy of it
    matrices = {g: sum(p.numel() for p in ps if p.dim() == 2 and p is not emb) for g, ps in groups.items()}
    union = {g for ph in phases for g in ph}
    trained_ids = {id(p) for g in union for p in groups[g]}
    units = parallel.fsdp_units(model)
    frozen_units = [u for u in (model.blocks() + ([] if llama else [model.merge])) if u not in units]
    in_units = {id(p) for u in units + frozen_units for p in u.parameters()}
    root = {g: sum(p.numel() for p in ps if id(p) not in in_units) for g, ps in groups.items()}
    size = lambda us: sorted((sum(p.numel() for p in u.parameters()) for u in us), reverse=True)   # noqa: E731
    first, last = parallel.llama_ends(model if llama else model.base)
    trained_units = [u for u in units if any(id(p) in trained_ids for p in u.parameters())]
    unit_sizes = size(u for u in trained_units if u not in first + last)
    ends = size(u for u in trained_units if u in first + last)
    if ends:                   # the embedding table and W_lm are never gathered together: one of them and a block
        unit_sizes = [ends[0]] + unit_sizes[:1]
    stored = {g: 2 if (bf16 and g not in union and g in bf16_groups(phases)) else 4 for g in n}
    B, T, V, D = cfg.micro_batch, cfg.seq_len, a.vocab_size, a.dim
    K = c.n_actions if c else 0
    N, N1 = B * T, B * (T + 1)
    e = 2 if bf16 else 4                                   # bytes of an activation
    res = 4 if (not bf16 or (one and stored["base"] == 4)) else 2      # the residual stream and h
    norm = 4 * D + 4 + 2 * D if bf16 else 8 * D + 4        # an RMSNorm: float32 input, 1/rms, normalised
    rows = min(N, ce_chunk_rows(V))
    plans = []
    for i, (this, (stack, merge, head, reads)) in enumerate(zip(phases, PATHS[stage])):
        merge = cfg.base_grad == "merge" if merge is None else merge
        state = sum((16 if g in this else 4) * n[g] for g in union) // shard
        frozen = sum(stored[g] * n[g] for g in n if g not in union)
        if shard_frozen and not one:                       # the alternative: frozen groups sharded too
            frozen //= shard
            buffers_frozen = 2 * sum(root[g] for g in n if g not in union) + 2 * 2 * sum(size(frozen_units)[:2])
        else:
            buffers_frozen = 0
        buffers = 0 if one else 2 * sum(root[g] for g in union) + 2 * 2 * sum(unit_sizes[:2]) + buffers_frozen
        root_grad = 0 if one else 4 * sum(root[g] for g in this)
        copies = 2 * sum(matrices[g] for g in reads & union) if (one and bf16) else 0
        if one and bf16 and head == "lm" and "base" not in union and stored["base"] == 4:
            copies += 2 * V * D                            # W_lm.to(bf16) in lm_head_ce, kept for backward
        layers = a.n_layers if stack == "base" else getattr(c, f"n_{stack}_layers")
        tokens = N if (stack == "policy" or llama) else N1
        blk = block_activation_bytes(a, one and bf16 and stored[stack] == 4) * e // 2
        blk += 4 * D if (bf16 and res == 4) else 0         # a float32 stream: both normalised values float32
        if cfg.activation_checkpointing:
            act, recompute = layers * res * D * tokens, (blk + 2 * res * D) * tokens
        else:
            act, recompute = layers * blk * tokens, 0
        act += N1 * res * D                                # h: the base's output, what the stacks read
        if stack != "base":                                # the action stack's norm and head (K logits, Gumbel)
            act += tokens * (norm + (2 * D if one and bf16 else 0) + 16 * K)
        else:                                              # Norm_f of the trained base
            act += N1 * norm
        world = 0                                          # the merge module's graph and Norm_f(s_2)
        if "merge" in reads:
            world = c.n_merge_layers * N * merge_activation_bytes(D, c.merge_hidden or a.ffn_hidden,
                                                                  one and bf16 and stored["merge"] == 4) * e // 2
            if "merge" not in this and stored["merge"] == 4 and bf16:
                world += 2 * n["merge"]                    # a frozen float32 merge: bf16 casts kept for backward
            world += N * norm
        if merge:
            act += world
        if head == "lm":
            act += N * (e * D + 4)                         # the world state W_lm reads, its log-sum-exp
            fwd_loss = 12 * rows * V
            bwd_loss = fwd_loss + (4 * V * D if "base" in this else 0) + e * N * D
        else:
            fwd_loss = bwd_loss = 10 * K * N
        moments = {"forward end": (buffers, copies, act, fwd_loss), "loss backward": (buffers, 0, act, bwd_loss),
                   "block recompute": (buffers, 0, act + recompute, 0),
                   # off the gradient path (fta-p's default), the merge's graph lives until Norm_f(s_2) is detached
                   "merge forward": (buffers, copies, act + (0 if merge else world), 0),
                   # FSDP: the root's gradients in float32 for their reduce-scatter, once backward has freed the rest
                   "root reduce-scatter": (buffers + root_grad, 0, 0, 0)}
        moment = max(moments, key=lambda m: sum(moments[m]))
        plans.append(Plan(stage, cfg.preset, gpus, shard, i, moment, sum(n[g] for g in this), state, frozen,
                          *moments[moment]))
    best = max(plans, key=lambda p: p.total)
    best.phases = [p.total for p in plans]
    return best


def stage_model(stage: str, preset: str):
    """The module a stage trains, on the current default device or mode: a plain Llama for sft and base, CoLA
    otherwise (train.py's stage functions)."""
    a = PRESETS[preset]
    return Transformer(a) if stage in ("base", "sft") else CoLA(a, COLA_PRESETS[preset])


def bf16_groups(phases: list) -> list[str]:
    """The frozen groups stored in bf16 when training in bf16: the base, whose official weights are bf16 values
    (trainer.bf16_frozen_groups checks exactness on the real weights; the new modules were trained in float32 by an
    earlier stage and are not)."""
    trained = {g for groups in phases for g in groups}
    return [] if "base" in trained else ["base"]


def measure(stage: str, cfg, phases: list, losses: list, gpus: int = 1) -> list[int]:
    """Peak bytes of one micro step of each phase of `stage` on one GPU, on fake tensors: [phase 1, ...].

    gpus 1: the model is built as trainer.Run.build does for one process (float32 parameters; requires_grad on
    every group any phase trains; activation checkpointing if cfg says so), with the groups of bf16_groups cast to
    bf16 (fake tensors hold no values for trainer.bf16_frozen_groups to check). gpus > 1 (at most 8, one node):
    rank 0 of a fake process group (no other process, collectives do nothing), the model built on meta as
    trainer.Run.build does under torchrun and sharded by parallel.apply_fsdp in bf16; the process group is
    destroyed before returning. Stage A uses the direct quantizer (pretrain_loss), not the VQ ablation.
    Each phase is measured in its steady state: AdamW's m and v exist and so do the gradients (a micro batch after
    the first of an accumulated step); then forward under bf16 autocast, backward, gradient clipping (one process)
    and the AdamW step of trainer.Run.train, counted by LiveBytes.
    """
    device, peaks = torch.device("cpu"), []
    B, T = cfg.micro_batch, cfg.seq_len
    with contextlib.ExitStack() as stack:
        if gpus > 1:
            model = fsdp_model(stage, cfg, phases, gpus, stack)
            stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
            model.to_empty(device=device)              # the shards (fake): FSDP's own buffers appear as it runs
            run = model
            model = model.model
        else:
            stack.enter_context(FakeTensorMode())
            model = run = stage_model(stage, cfg.preset)
            set_trainable(model, {g for groups in phases for g in groups})
            if cfg.dtype == "bfloat16":
                for name in bf16_groups(phases):         # what .to(torch.bfloat16) does (fake tensors refuse .to)
                    for p in getattr(model, name).parameters():
                        p.data = p.data.to(torch.bfloat16)
            if cfg.activation_checkpointing:
                enable_activation_checkpointing(model.blocks())
        for groups, loss_fn in zip(phases, losses):
            opt = make_optimizer(model.param_groups(), groups, cfg)
            params = [p for g in groups for p in model.param_groups()[g]]
            for p in params:
                p.grad = torch.zeros_like(p)
            opt.step()                                  # m and v exist from the first step on
            b = Batch(torch.zeros(B, T + 1, dtype=torch.long), torch.ones(B, T + 1, dtype=torch.bool),
                      torch.arange(B))
            live = LiveBytes(resizes=gpus > 1)
            with live:
                for t in [*model.parameters(), *(p.grad for p in params),
                          *(v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))]:
                    live.add(t)
                with autocast(cfg.dtype, device):
                    loss, _ = run(loss_fn, b) if gpus > 1 else loss_fn(model, b)
                loss.backward()
                if gpus == 1:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
            peaks.append(live.peak)
            opt.zero_grad(set_to_none=True)
            del opt, loss
    return peaks


def fsdp_model(stage: str, cfg, phases: list, gpus: int, stack):
    """parallel.Root of the stage's model on meta, sharded by parallel.apply_fsdp over a fake process group of
    `gpus` ranks (this process is rank 0), as trainer.Run.build does under torchrun; the group is destroyed when
    `stack` closes."""
    if dist.is_initialized():
        raise RuntimeError("memory.measure(gpus > 1) starts its own fake process group; one exists already")
    from torch.testing._internal.distributed.fake_pg import FakeStore     # registers the "fake" backend
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=gpus)
    stack.callback(dist.destroy_process_group)
    with torch.device("meta"):
        model = stage_model(stage, cfg.preset)
        if cfg.dtype == "bfloat16":
            for name in bf16_groups(phases):
                getattr(model, name).to(torch.bfloat16)
    set_trainable(model, {g for groups in phases for g in groups})
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model.blocks())
    root = parallel.Root(model)
    parallel.apply_fsdp(root, init_device_mesh("cpu", (gpus,)), torch.bfloat16 if cfg.dtype == "bfloat16" else None)
    return root


# ----------------------------------------------------------------------------------------------------------------
# The check train.py runs before any weight is loaded

CONTEXT_BYTES = 2 * GiB            # the CUDA context and allocator fragmentation, which the plan leaves out


def check_fits(stage: str, cfg, phases: list, world=None, device=None, capacity: int | None = None, shard: int | None = None):
    """Stop with one line when the plan of `stage` (plus CONTEXT_BYTES) exceeds one GPU's memory, and say what to
    run instead. capacity: bytes of one GPU (default: torch.cuda.get_device_properties(device).total_memory; on a
    CPU device with no capacity given nothing is checked). world: parallel.World (default one process); shard:
    ranks the trained groups are sharded over (default: world.node_size, the GPUs of one node). --cpu-offload
    moves the sharded state to host memory, which the plan does not model: not checked."""
    if capacity is None:
        if device is None or torch.device(device).type != "cuda":
            return
        capacity = torch.cuda.get_device_properties(torch.device(device)).total_memory
    if getattr(cfg, "cpu_offload", False):
        return
    gpus = world.size if world is not None and world.launched else 1
    if gpus > 1 and not shard:
        shard = world.node_size                    # parallel.device_mesh's default: the ranks of one node
    p = plan(stage, cfg, phases, gpus, shard)
    if p.total + CONTEXT_BYTES <= capacity:
        return
    where = "one process" if gpus == 1 else f"{gpus} processes (state sharded over {p.shard})"
    if gpus == 1 and plan(stage, cfg, phases, 8).total + CONTEXT_BYTES <= capacity:
        todo = f"run `torchrun --nproc_per_node=8 train.py --stage {stage} ...` to shard it over 8 GPUs"
    elif not cfg.activation_checkpointing and plan(stage, replace(cfg, activation_checkpointing=True), phases, gpus,
                                                   shard).total + CONTEXT_BYTES <= capacity:
        todo = "add --activation-checkpointing"
    elif cfg.micro_batch > 1:
        todo = ("lower --micro-batch, " + ("run under torchrun on more GPUs, " if gpus == 1 else "")
                + "or use --cpu-offload under torchrun")
    else:
        todo = "use more GPUs per node, or --cpu-offload under torchrun"
    raise SystemExit(f"stage {stage} at --preset {cfg.preset} needs {p.total / GiB:.1f} GiB per GPU on {where} "
                     f"(+{CONTEXT_BYTES / GiB:.0f} GiB CUDA context; `python -m tools.bench --memory-plan`), more than "
                     f"this GPU's {capacity / GiB:.1f} GiB: {todo}")



# ----------------------------------------------------------------------------------------------------------------
# rl.py: the same arithmetic for one RL step (rl.build's layout), and the check that runs before it loads anything


@dataclass
class RLPlan:
    """Bytes per GPU of rl.py at one level; total = replica + reference + state + buffers + max(KV cache, update,
    gather): the KV cache lives while rollouts are generated and is freed before the log-prob passes and the update;
    the refresh of the replica comes after the update."""
    level: str
    gpus: int
    trained: int               # parameters RL trains: the policy (latent) or the whole LM (token)
    replica: int               # what generates: the starting model (torchrun: a bf16 copy of all of it)
    reference: int             # the frozen copy of what RL trains
    state: int                 # float32 weights, gradients, AdamW m and v of the trained part (/ gpus)
    buffers: int               # FSDP: the gathered bf16 root group and two blocks of the trained part
    kv: int                    # generation's KV cache, base (and latent: policy) over rollouts x (prompt + new)
    update: int                # one micro batch's forward and backward (and, latent, the base's states h)
    gather: int = 0            # torchrun: the trained part gathered whole to refresh the replica (rl.sync)

    @property
    def total(self) -> int:
        return self.replica + self.reference + self.state + self.buffers + max(self.kv, self.update, self.gather)


def rl_plan(preset: str, level: str, gpus: int, rollouts: int, prompt: int, new: int, micro: int, bf16: bool = True,
            activation_checkpointing: bool = True, launched: bool | None = None) -> RLPlan:
    """rl.build's memory per GPU, GRPO, from the real module sizes (built on the meta device).

    torchrun (launched; default: gpus > 1): the replica is the whole starting model in bf16 (2 B per parameter:
    latent the CoLA, token the LM; 4 B in float32), the reference the trained part in bf16, the state 16 B per
    trained parameter / gpus, FSDP's buffers the trained root group and two blocks gathered in bf16, and the refresh
    of the replica gathers the whole trained part (gather). One process: the model itself trains, so the replica is
    the frozen part only, at 4 B per parameter (float32: earlier stages trained it; rl.build keeps only bf16-exact
    groups in bf16, which this plan does not assume: a latent start whose frozen base is the official bf16 one is
    planned ~17 GiB too high at 8B), the reference a float32 copy (4 B), no FSDP buffers, and the KV cache and the
    blocks' inputs in float32 (the dtype of the embedding the cache takes, and of the residual stream).
    KV cache: 2 (k, v) x layers x kv heads x head dim x 2 B per token (4 B in float32), base and (latent) policy.
    update: `micro` rollouts at once, each token keeping per trained block its input (2 D bytes; 4 D float32) with
    activation checkpointing plus one recomputed block, or every block's activations without; the loss over the
    classes it scores (12 B per token and class: float32 logits, their softmax and the gradient; K = 64 actions or
    V tokens); latent: the frozen base's states h of all the rank's rollouts, [rollouts, T, D], kept for every update.
    Not counted: the CUDA context and fragmentation (CONTEXT_BYTES); rank 0's held-out evaluation (its judge, and
    the generation and log-probs of --eval-problems rows at once, which at 8B token level with 64 problems of 1,536
    tokens needs more than the update: lower --eval-problems there); generation's per-step logits (rollouts x V x 4 B).
    """
    with torch.device("meta"):
        m = CoLA(PRESETS[preset], COLA_PRESETS[preset])
    a, c = m.base_args, m.args
    n = {k: sum(p.numel() for p in ps) for k, ps in m.param_groups().items()}
    launched = gpus > 1 if launched is None else launched
    lat, e = level == "latent", 2 if bf16 else 4
    e_run = e if launched else 4                 # one process: KV cache and residual stream in the weights' float32
    trained = n["policy"] if lat else n["base"]
    layers = c.n_policy_layers if lat else a.n_layers
    stack = m.policy if lat else m.base
    block = sum(p.numel() for p in stack.layers[0].parameters())
    whole = sum(n.values()) if lat else n["base"]
    kv_token = lambda L: 2 * L * a.n_kv_heads * a.head_dim * e_run                # noqa: E731
    T = prompt + new
    act = block_activation_bytes(a, cast=not launched) * (1 if bf16 and launched else 2)
    tokens = micro * T
    update = tokens * ((layers * e_run * a.dim + act) if activation_checkpointing else layers * act)
    update += tokens * 12 * (c.n_actions if lat else a.vocab_size) + (rollouts * T * e * a.dim if lat else 0)
    kv = rollouts * T * (kv_token(a.n_layers) + (kv_token(c.n_policy_layers) if lat else 0))
    if launched:
        replica, reference, state = e * whole, e * trained, 16 * trained // gpus
        buffers, gather = e * (trained - layers * block) + 2 * e * block, e * trained
    else:
        replica, reference, state, buffers, gather = 4 * (whole - trained), 4 * trained, 16 * trained, 0, 0
    return RLPlan(level, gpus, trained, replica, reference, state, buffers, kv, update, gather)


def check_rl_fits(cfg, world, device, prompt: int, capacity: int | None = None):
    """rl.py's check_fits: one line and exit, before any weight is read, when rl_plan (plus CONTEXT_BYTES) exceeds
    one GPU at this run's flags; nothing on a CPU device unless capacity is given. prompt: the longest prompt, tokens."""
    if capacity is None:
        if torch.device(device).type != "cuda":
            return
        capacity = torch.cuda.get_device_properties(torch.device(device)).total_memory
    bf16, gpus, launched = cfg.dtype == "bfloat16", world.size if world.launched else 1, world.launched

    def batch(n: int) -> tuple[int, int]:          # rollouts per rank on n GPUs (whole groups), update micro batch
        rollouts = max(1, cfg.prompts_per_step // n) * (cfg.group if cfg.algo == "grpo" else 1)
        return rollouts, min(cfg.micro_batch or rollouts, rollouts)

    def plan_of(n: int = gpus, **kw) -> RLPlan:
        rollouts, micro = batch(n)
        return rl_plan(cfg.preset, cfg.level, **{**dict(gpus=n, rollouts=rollouts, prompt=prompt, micro=micro,
                       new=cfg.max_new_tokens, bf16=bf16, activation_checkpointing=cfg.activation_checkpointing,
                       launched=launched or n > 1), **kw})
    rollouts, micro = batch(gpus)
    p = plan_of()
    if p.total + CONTEXT_BYTES <= capacity:
        return
    fits = lambda **kw: plan_of(**kw).total + CONTEXT_BYTES <= capacity                   # noqa: E731
    if not bf16 and fits(bf16=True):
        todo = "pass --dtype bfloat16 (or auto on a GPU that computes bf16)"
    elif gpus == 1 and fits(n=8):
        todo = f"run `torchrun --nproc_per_node=8 rl.py --level {cfg.level} ...` to shard the trained part over 8 GPUs"
    elif not cfg.activation_checkpointing and fits(activation_checkpointing=True):
        todo = "add --activation-checkpointing"
    elif micro > 1 and fits(micro=1):
        todo = "pass --micro-batch 1 (rollouts per forward/backward of the update; 0 is all of a rank's)"
    else:
        todo = "lower --prompts-per-step or --max-new-tokens"
    where = "one process" if not launched else f"{gpus} processes"
    raise SystemExit(f"rl.py --level {cfg.level} at --preset {cfg.preset} needs {p.total / GiB:.1f} GiB per GPU on "
                     f"{where} with {rollouts} rollouts of {prompt} + {cfg.max_new_tokens} tokens (+{CONTEXT_BYTES / GiB:.0f} "
                     f"GiB CUDA context; `python -m tools.bench --rl-memory-plan`), more than this GPU's "
                     f"{capacity / GiB:.1f} GiB: {todo}")
