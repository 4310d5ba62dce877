"""Several processes: torchrun with 2 CPU processes (gloo) and FSDP2, against one process.

Tiers:
  equal    every stage for 20 optimizer steps on 2 processes logs the per-step losses of 1 process at the same
           global batch (float32, within 1e-5 relative), and exports the same weights;
  bf16     --dtype bfloat16 on 2 processes (mixed precision, bf16 storage of a bf16 base, activation
           checkpointing) stays within 1e-3 of one process;
  resume   a 2-process run stopped at step 10 (--stop-at) resumes from its DCP checkpoint on 1 and on 2 processes
           and logs the uninterrupted run's steps 11..20;
  load     the model sharded over 2 processes (rank 0 reads, broadcast) gives one process's logits;
  errors   launch mistakes (world size vs global batch, a missing torchrun variable, the wrong --preset for
           --init, the pipeline under torchrun) stop with a message before any work.

A few seconds per run at toy sizes (seq_len 32, global batch 4); no timing assertions.

    python -m pytest -q tests/test_distributed.py
"""
import json
import math
import sys

import pytest
import torch

from infra import parallel
import train
from cola import CoLA
from conftest import LM, LM_STEPS, REPO, cmd, read_rows, run_ok, step_rows

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
N = 20                      # optimizer steps compared (fta-i: two phases of 10)
LM2 = ["--seq-len", "32", "--micro-batch", "1", "--global-batch", "4", "--eval-batches", "2", "--log-every", "1",
       "--dtype", "float32", "--ckpt-every", "10", "--steps", N]
TASK2 = ["--seq-len", "48", "--micro-batch", "1", "--global-batch", "4", "--eval-batches", "2", "--log-every", "1",
         "--dtype", "float32", "--ckpt-every", "10", "--steps", N]

# stage -> (--init inside the shared chain, flags kind)
STAGES = {"base": (None, "lm"), "pretrain": ("base/final", "lm"), "bc": ("pretrain/final", "lm"),
          "fta-i": ("bc/final", "task"), "fta-p": ("bc/final", "task"), "sft": ("base/final", "task")}
REL = 1e-5


def argv_for(stage, out, chain, task, procs, *extra):
    init, kind = STAGES[stage]
    flags = LM2 if kind == "lm" else task + TASK2           # later flags win: TASK2's shapes, task's data files
    if stage == "fta-i":
        flags = flags + ["--steps", N // 2]                 # two phases of N / 2 steps
    if init:
        flags = flags + ["--init", chain / init]
    argv = cmd(stage, out, *flags, *extra)
    return TORCHRUN + argv[1:] if procs == 2 else argv


@pytest.fixture(scope="module")
def runs(chain, task, tmp_path_factory):
    """(stage, processes) -> run directory, each run made once and on demand."""
    root = tmp_path_factory.mktemp("dist")
    done = {}

    def get(stage, procs):
        if (stage, procs) not in done:
            out = root / f"{stage}-{procs}"
            run_ok(argv_for(stage, out, chain, task, procs))
            done[stage, procs] = out
        return done[stage, procs]
    return get


def close(a: float, b: float, rel: float = REL) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-6)


def assert_same_rows(one, two, rel=REL):
    for a, b in zip(one, two):
        assert a["step"] == b["step"] and a["phase"] == b["phase"]
        for k in a.keys() - {"step", "phase", "tok_per_s", "peak_mem_gib"}:
            tol = rel * 10 if k == "grad_norm" else rel      # a norm of gradients, summed in another order
            assert close(a[k], b[k], tol), f"step {a['step']} {k}: one process {a[k]}, two {b[k]}"


# ----------------------------------------------------------------------------------------------------------------
# Equal: two processes compute what one computes


@pytest.mark.parametrize("stage", list(STAGES))
def test_two_processes_match_one(runs, stage):
    one, two = step_rows(runs(stage, 1)), step_rows(runs(stage, 2))
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, N + 1))
    assert all(math.isfinite(r["loss"]) for r in two)
    assert_same_rows(one, two)
    ev1, ev2 = read_rows(runs(stage, 1))[-1]["eval"], read_rows(runs(stage, 2))[-1]["eval"]
    assert ev2["world_size"] == 2 and ev1["world_size"] == 1
    for split, metrics in ev1["after"].items():
        for k, v in metrics.items():
            assert close(v, ev2["after"][split][k], 1e-4), (split, k, v, ev2["after"][split][k])


def test_hsdp_groups_match_one_process(runs, chain, task, tmp_path):
    """--shard-group 1 on 2 processes: a 2-D mesh of 2 replica groups of 1 shard each (HSDP, as across two nodes
    of one GPU): gradients averaged across the groups, the same losses as one process."""
    out = tmp_path / "hsdp"
    run_ok(argv_for("pretrain", out, chain, task, 2, "--shard-group", 1))
    one, two = step_rows(runs("pretrain", 1)), step_rows(out)
    assert [r["step"] for r in two] == list(range(1, N + 1))
    assert_same_rows(one, two)
    assert json.loads((out / "config.json").read_text())["shard_group"] == 1


@pytest.mark.parametrize("stage", ["pretrain", "fta-i"])
def test_two_processes_export_the_same_model(runs, stage):
    """final/ (CoLA layout, gathered on rank 0) loads and holds one process's weights; fta-i adds final-llama/.

    Weights agree to 1e-4 (measured: 1.5e-7 after pretrain, 6.5e-5 after fta-i, whose behaviour cloning drives its
    gradients towards zero, where AdamW's normalisation magnifies rounding differences)."""
    from safetensors.torch import load_file
    one, two = runs(stage, 1), runs(stage, 2)
    a, b = load_file(one / "final/model.safetensors"), load_file(two / "final/model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-4), (k, (a[k] - b[k]).abs().max())
    assert isinstance(CoLA.from_pretrained(two / "final"), CoLA)
    ck = parallel.latest_checkpoint(two)
    assert sorted(p.name for p in ck.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "train.json"]
    if stage == "fta-i":
        assert (two / "final-llama/config.json").exists() and "train_stage" not in \
            (two / "final-llama/config.json").read_text()


def test_bf16_two_processes(chain, tmp_path):
    """--dtype bfloat16 (what auto picks on hardware with native bf16) under FSDP: bf16 compute, fp32 gradient
    reduction, the RoPE table kept float32 (FSDP must not cast block inputs), and a frozen base whose weights are
    bf16 values (as the official ones are) stored in bf16, with activation checkpointing on. Losses stay within 1e-3 of one process under autocast, and
    the export keeps the base in bf16 and the trained IDM in float32."""
    from safetensors import safe_open
    from model import Transformer
    init = tmp_path / "base-bf16"
    Transformer.from_pretrained(chain / "base/final").to(torch.bfloat16).save_pretrained(init)
    flags = ["--init", init, "--seq-len", "32", "--micro-batch", "1", "--global-batch", "4", "--eval-batches", "1",
             "--log-every", "1", "--steps", "4", "--dtype", "bfloat16"]
    run_ok(cmd("pretrain", tmp_path / "one", *flags))
    run_ok(TORCHRUN + cmd("pretrain", tmp_path / "two", *flags, "--activation-checkpointing")[1:])
    one, two = step_rows(tmp_path / "one"), step_rows(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    for a, b in zip(one, two):
        assert close(a["loss"], b["loss"], 1e-3), (a["step"], a["loss"], b["loss"])
    with safe_open(tmp_path / "two/final/model.safetensors", "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert {v for k, v in dtypes.items() if k.startswith("model.layers.")} == {"BF16"}
    assert {v for k, v in dtypes.items() if k.startswith("model.action_layers.")} == {"F32"}


# ----------------------------------------------------------------------------------------------------------------
# Resume: a DCP checkpoint of 2 processes, continued on 1 or 2


@pytest.mark.parametrize("procs,extra", [(1, []), (2, ["--async-save"])])
def test_resume_two_process_checkpoint(runs, chain, task, tmp_path, procs, extra):
    """The 2-process run stops at step 10 and resumes on 1 process, or on 2 with checkpoints written in the
    background (--async-save, both runs)."""
    ref = step_rows(runs("pretrain", 2))
    out = tmp_path / "run"
    p = run_ok(argv_for("pretrain", out, chain, task, 2, "--stop-at", 10, *extra))
    assert "stopped after step 10" in p.stdout
    assert [r["step"] for r in step_rows(out)] == list(range(1, 11)) and not (out / "final").exists()
    ck = parallel.latest_checkpoint(out)
    assert ck.name == "step-0000010" and parallel.read_train_state(ck)["world_size"] == 2
    p = run_ok(argv_for("pretrain", out, chain, task, procs, *extra))
    assert f"at step 10 (written by 2 process(es), now {procs})" in p.stdout, p.stdout[-2000:]
    rows = step_rows(out)
    assert [r["step"] for r in rows] == list(range(1, N + 1))
    assert_same_rows(ref, rows)
    assert read_rows(out)[-1]["eval"]["world_size"] == procs


# ----------------------------------------------------------------------------------------------------------------
# Load: rank 0 reads the checkpoint, every rank gets its shards, the logits are one process's


def test_sharded_load_matches_one_process_logits(chain, tmp_path):
    import dist_logits
    out = tmp_path / "logits.pt"
    run_ok(TORCHRUN + [str(REPO / "tests/dist_logits.py"), str(chain / "pretrain/final"), str(out)])
    got = torch.load(out)
    model = CoLA.from_pretrained(chain / "pretrain/final")
    x = torch.randint(0, 512, (2, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = dist_logits.logits(model, x)
    assert torch.equal(got["k"], want["k"])
    for k in ("lm", "wm", "pi"):
        assert torch.allclose(got[k], want[k], atol=1e-5), (k, (got[k] - want[k]).abs().max())


# ----------------------------------------------------------------------------------------------------------------
# Communication: what FSDP all-gathers in a training step (tests/dist_gathers.py records it)

# stage -> (--init in the chain, flags, {phase: (units gathered in forward, units gathered in backward)}) for one
# micro batch. Frozen modules are whole on every rank and never gathered; backward gathers exactly the units it
# computes gradients for, last forward unit excepted (it stays gathered); "root" is the root group (norms, heads,
# C of the trained part).
GATHERS = {
    "pretrain": ("base/final", LM2, {"idm+codebook+merge": (["root", "idm.layers.0", "idm.layers.1", "merge"],
                                                            ["idm.layers.1", "idm.layers.0"])}),
    "bc": ("pretrain/final", LM2, {"policy": (["root", "policy.layers.0", "policy.layers.1"], ["policy.layers.0"])}),
    # a trained base: its embedding table and W_lm are units of their own (W_lm last in forward, so kept gathered)
    "fta-i": ("bc/final", TASK2, {
        "base": (["root", "base.tok_embeddings"] + [f"base.layers.{i}" for i in range(4)] + ["base.output"],
                 [f"base.layers.{i}" for i in (3, 2, 1, 0)] + ["base.tok_embeddings"]),
        # the policy phase runs the (trained, sharded) base under no_grad: gathered for forward, never in backward
        "policy": (["root", "base.tok_embeddings"] + [f"base.layers.{i}" for i in range(4)]
                   + ["policy.layers.0", "policy.layers.1"], ["policy.layers.0"])}),
    "sft": ("base/final", TASK2, {"base": (["root", "tok_embeddings"] + [f"layers.{i}" for i in range(4)] + ["output"],
                                           [f"layers.{i}" for i in (3, 2, 1, 0)] + ["tok_embeddings"])}),
}


@pytest.mark.parametrize("stage", list(GATHERS))
def test_backward_gathers_only_the_units_it_uses(chain, task, tmp_path, stage):
    """One optimizer step of 2 micro batches per rank on 2 processes: every micro batch gathers the expected units,
    in order. Before (everything sharded, FSDP's default prefetch): Stage A also gathered the 4 frozen base blocks
    in forward, the merge module again in backward, and the last base block in backward for nothing."""
    import json
    init, flags, want = GATHERS[stage]
    out = tmp_path / "gathers.json"
    argv = cmd(stage, tmp_path / "run", *(task if flags is TASK2 else []), *flags, "--init", chain / init,
               "--steps", 1, "--global-batch", 4, "--micro-batch", 1)
    run_ok(TORCHRUN + [str(REPO / "tests/dist_gathers.py"), str(out)] + argv[2:])
    got = json.loads(out.read_text())
    assert set(got) == set(want)
    for phase, (fwd, bwd) in want.items():
        one = [["forward", u] for u in fwd] + [["backward", u] for u in bwd]
        assert got[phase][:2 * len(one)] == one * 2, (phase, got[phase])


def test_hsdp_all_reduces_once_per_step(chain, task, tmp_path):
    """--shard-group 1 on 2 processes (2 replica groups), 2 micro batches per rank: the gradients cross the replica
    groups on the second micro batch only, one all-reduce per trained unit; before, one per unit and micro batch."""
    out = tmp_path / "gathers.json"
    argv = cmd("pretrain", tmp_path / "run", *LM2, "--init", chain / "base/final", "--steps", 1, "--global-batch", 4,
               "--micro-batch", 1, "--shard-group", 1)
    run_ok(TORCHRUN + [str(REPO / "tests/dist_gathers.py"), str(out)] + argv[2:])
    events = json.loads(out.read_text())["idm+codebook+merge"]
    reduces = [u for what, u in events if what == "all-reduce"]
    assert sorted(reduces) == sorted(["root", "idm.layers.0", "idm.layers.1", "merge"]), events
    starts = [i for i, e in enumerate(events) if e == ["forward", "root"]]   # each forward's (then the evaluation's)
    assert len(starts) >= 2, events
    assert all(i > starts[1] for i, e in enumerate(events) if e[0] == "all-reduce"), events


# ----------------------------------------------------------------------------------------------------------------
# Launch mistakes: one line, before any process group or file


RDZV = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29531"}


def launch_error(monkeypatch, capsys, env: dict, argv) -> str:
    for k in RDZV:
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit) as e:
        train.main([str(a) for a in argv])
    assert not torch.distributed.is_initialized()
    code = e.value.code
    return capsys.readouterr().err if isinstance(code, int) else str(code)


def test_error_world_size_does_not_divide_global_batch(monkeypatch, capsys, tmp_path):
    msg = launch_error(monkeypatch, capsys, RDZV, ["--stage", "base", "--out-dir", tmp_path / "run",
                                                    "--global-batch", "6", "--micro-batch", "2"])
    assert "--global-batch 6 is not a positive multiple of --micro-batch 2 x 2 processes" in msg, msg
    assert not (tmp_path / "run").exists()


def test_error_shard_group_does_not_divide_the_processes(monkeypatch, capsys, tmp_path):
    msg = launch_error(monkeypatch, capsys, RDZV, ["--stage", "base", "--out-dir", tmp_path / "run",
                                                    "--shard-group", "3"])
    assert "--shard-group 3: the 2 processes do not split into groups of 3" in msg, msg
    assert not (tmp_path / "run").exists()


def test_error_more_processes_than_gpus(monkeypatch):
    """LOCAL_RANK beyond the node's visible GPUs: one line, instead of two ranks sharing a GPU (local_rank modulo
    the GPU count, as before) or a CUDA error."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    world = parallel.World(rank=2, size=4, local_rank=2, launched=True, local_size=4)
    with pytest.raises(SystemExit, match=r"LOCAL_RANK 2: this node has 2 visible GPU\(s\): start at most that many"):
        parallel.init_process_group(world, "cuda")


@pytest.mark.parametrize("missing", ["MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"])
def test_error_missing_rendezvous_variable(monkeypatch, capsys, tmp_path, missing):
    env = {k: v for k, v in RDZV.items() if k != missing}
    msg = launch_error(monkeypatch, capsys, env, ["--stage", "base", "--out-dir", tmp_path / "run"])
    assert f"environment variable {missing} is not set" in msg and "torchrun" in msg, msg
    assert not (tmp_path / "run").exists()


def test_error_init_of_another_preset(monkeypatch, capsys, chain, tmp_path):
    msg = launch_error(monkeypatch, capsys, RDZV, ["--stage", "pretrain", "--preset", "llama-3.1-8b", "--init",
                                                    chain / "base/final", "--out-dir", tmp_path / "run"])
    assert "a model of dim 256 with 4 layers, but --preset llama-3.1-8b has dim 4096 with 32 layers; use " \
           "--preset tiny" in msg, msg


def test_error_resume_with_another_preset_or_stage(monkeypatch, capsys, chain, tmp_path):
    """A run directory holding another stage's checkpoint, or one written with other flags, is refused."""
    msg = launch_error(monkeypatch, capsys, RDZV, ["--stage", "bc", "--init", chain / "pretrain/final",
                                                    "--out-dir", chain / "pretrain", *LM])
    assert "checkpoint of stage 'pretrain', not 'bc'" in msg, msg
    msg = launch_error(monkeypatch, capsys, RDZV, ["--stage", "pretrain", "--init", chain / "base/final",
                                                    "--out-dir", chain / "pretrain", *LM, "--steps", LM_STEPS,
                                                    "--seed", "7"])
    assert "was written with --seed 0, this run has 7" in msg, msg


def test_error_pipeline_under_torchrun(monkeypatch, capsys):
    import pipeline
    for k, v in RDZV.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit, match="start it with python, not torchrun"):
        pipeline.main([])
    assert not torch.distributed.is_initialized()


def test_collective_timeouts(monkeypatch):
    """Training collectives time out after --collective-timeout seconds; the waits for slow work (rank 0 reading
    or exporting, checkpoint writes) use a separate gloo group that waits 2 hours."""
    import torch.distributed as dist
    for k, v in {**RDZV, "WORLD_SIZE": "1", "MASTER_PORT": "29577"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(parallel, "_slow", None)                             # restored after the test
    parallel.init_process_group(parallel.world_from_env(), "cpu", timeout=7)
    try:
        cpu = torch.device("cpu")
        assert dist.group.WORLD._get_backend(cpu).options._timeout.total_seconds() == 7
        assert parallel._slow._get_backend(cpu).options._timeout == parallel.SLOW_TIMEOUT
    finally:
        dist.destroy_process_group()


def test_world_from_env(monkeypatch):
    for k in RDZV:
        monkeypatch.delenv(k, raising=False)
    assert parallel.world_from_env() == parallel.World()                     # plain python: one process
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    for k, v in {**RDZV, "RANK": "1", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(k, v)
    assert parallel.world_from_env() == parallel.World(rank=1, size=2, local_rank=1, launched=True, local_size=2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")                              # two nodes of one process each
    assert parallel.world_from_env().local_size == 1
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(SystemExit, match=r"RANK=2 is not in \[0, WORLD_SIZE=2\)"):
        parallel.world_from_env()
