"""Faults and bad input (issue #11): nothing lost, nothing silently wrong, one clear line for every mistake.

Tiers:
  resume   a damaged run directory (a checkpoint zeroed, overwritten, truncated, missing a file or its train.json; a
           half-written metrics line) is rerun with the same command: it falls back to the previous intact
           checkpoint, says so, and logs exactly the curve and final weights of the uninterrupted run (conftest's
           chain/base: 3 steps, checkpoints at steps 2 and 3);
  faults   a full disk during a save, a read-only --out-dir, two runs on one directory, a stale lock, a failed
           `data.py prepare`: one line, and the files before it are still there;
  refusals what a run will not write into (its --init, a model, another stage's run, other flags);
  input    bad flag values, bad shards and SFT files, and the generation CLIs of model.py and cola.py: the exit
           code, one line naming the flag or file, nothing written.

    python -m pytest -q tests/test_faults.py
"""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch

import cola
import data
import model as model_py
from infra import parallel, trainer
import train
from conftest import ENV, LM, LM_STEPS, REPO, cmd, read_rows, step_rows
from tokenizer import Tokenizer

BASE = [*LM, "--steps", LM_STEPS, "--ckpt-every", 2]      # the flags of conftest's chain/base


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: one torch thread, as the chain


# ----------------------------------------------------------------------------------------------------------------
# Helpers


def main_exit(argv, capsys, main=train.main) -> str:
    """The one-line message a CLI stops with (SystemExit(str): exit code 1)."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    capsys.readouterr()
    msg = e.value.code
    assert isinstance(msg, str), f"exit code {msg!r}, not a message"
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


def files_of(d: Path) -> dict:
    """Every file under d -> its bytes."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(Path(d).rglob("*")) if p.is_file()}


def comparable(rows):
    return [{k: v for k, v in r.items() if k != "tok_per_s"} for r in rows]


def same_run(run: Path, ref: Path):
    """Every logged step and the exported weights equal those of the uninterrupted run."""
    from safetensors.torch import load_file
    assert comparable(step_rows(run)) == comparable(step_rows(ref))
    a, b = load_file(ref / "final/model.safetensors"), load_file(run / "final/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "eval" in read_rows(run)[-1]


def rerun(run: Path, capsys, *extra) -> str:
    """The chain's base command on `run` (in this process); its stdout."""
    train.main([str(a) for a in ["--stage", "base", "--out-dir", run, *BASE, *extra]])
    return capsys.readouterr().out


@pytest.fixture
def base_copy(chain, tmp_path) -> Path:
    """A copy of the finished chain/base run (checkpoints step-2 and step-3)."""
    run = tmp_path / "run"
    shutil.copytree(chain / "base", run)
    return run


def shard(ckpt: Path) -> Path:
    return ckpt / "__0_0.distcp"


def overwrite(f: Path, at: int, data_: bytes):
    with open(f, "r+b") as fh:
        fh.seek(at)
        fh.write(data_)


DAMAGE = {
    "zeros in a weight": lambda c: overwrite(shard(c), shard(c).stat().st_size // 2, b"\0" * 4096),
    "random bytes in a weight": lambda c: overwrite(shard(c), shard(c).stat().st_size // 2,
                                                   np.random.default_rng(0).bytes(4096)),
    "truncated shard": lambda c: os.truncate(shard(c), shard(c).stat().st_size // 3),
    "missing .metadata": lambda c: (c / ".metadata").unlink(),
    "damaged train.json": lambda c: (c / "train.json").write_text('{"step": 3, "fil'),
    "train.json deleted": lambda c: (c / "train.json").unlink(),
}


# ----------------------------------------------------------------------------------------------------------------
# Resume: a damaged newest checkpoint -> the previous one, the same curve


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_to_the_previous(damage, chain, base_copy, capsys):
    DAMAGE[damage](base_copy / "checkpoints/step-0000003")
    out = rerun(base_copy, capsys)
    assert "resuming base from" in out and "step-0000002 at step 2" in out, out[-2000:]
    said = "incomplete checkpoint" if damage == "train.json deleted" else "damaged checkpoint"
    assert said in out and "step-0000003" in out, out[-2000:]
    same_run(base_copy, chain / "base")
    assert [d.name for d in parallel.checkpoint_dirs(base_copy)] == ["step-0000002", "step-0000003"]
    assert parallel.check_checkpoint(base_copy / "checkpoints/step-0000003") is None     # redone, intact


def test_no_intact_checkpoint_refuses_and_touches_nothing(base_copy, capsys):
    DAMAGE["zeros in a weight"](base_copy / "checkpoints/step-0000003")
    DAMAGE["truncated shard"](base_copy / "checkpoints/step-0000002")
    before = files_of(base_copy)
    msg = main_exit(["--stage", "base", "--out-dir", base_copy, *BASE], capsys)
    assert "step-0000003: damaged checkpoint" in msg and "no intact earlier one" in msg, msg
    assert f"delete {base_copy / 'checkpoints'}" in msg, msg
    assert files_of(base_copy) == before


def test_nan_message_names_the_verified_checkpoint(base_copy, capsys, monkeypatch):
    """A damaged checkpoint is never loaded, so never called "the last good one"."""
    DAMAGE["random bytes in a weight"](base_copy / "checkpoints/step-0000003")
    real = train.base_loss

    def nan_when_training(model, b):               # evaluation (no gradient) stays finite
        loss, metrics = real(model, b)
        return (loss * float("nan") if torch.is_grad_enabled() else loss), metrics
    monkeypatch.setattr(train, "base_loss", nan_when_training)
    msg = main_exit(["--stage", "base", "--out-dir", base_copy, *BASE], capsys)
    assert "loss is nan at step 2" in msg and "step-0000002, step 2) is kept" in msg, msg


def test_half_written_metrics_line_is_dropped_on_resume(chain, base_copy, capsys):
    with open(base_copy / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "phase": "lm", "lo')               # a kill in the middle of an append
    out = rerun(base_copy, capsys)
    assert "dropped a half-written last line" in out, out[-2000:]
    same_run(base_copy, chain / "base")
    assert all(line.endswith("}") for line in (base_copy / "metrics.jsonl").read_text().splitlines())


def test_damaged_metrics_line_is_one_line(base_copy, capsys):
    lines = (base_copy / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][:20]
    (base_copy / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    msg = main_exit(["--stage", "base", "--out-dir", base_copy, *BASE], capsys)
    assert "metrics.jsonl:2: not a JSON row" in msg, msg


def test_save_keeps_the_previous_checkpoint_until_the_next(chain):
    """Two complete, intact checkpoints: the newest and the one before, whose train.json lists every file."""
    ckpts = parallel.checkpoint_dirs(chain / "base")
    assert [d.name for d in ckpts] == ["step-0000002", "step-0000003"]
    for d in ckpts:
        files = parallel.read_train_state(d)["files"]
        assert sorted(files) == sorted(p.name for p in d.iterdir() if p.name != "train.json")
        assert parallel.check_checkpoint(d) is None


def test_async_saves_reuse_their_buffers_and_checksum_in_the_background(tmp_path, monkeypatch):
    """--async-save: the host buffers a save is staged into are the previous save's, refilled (not new memory each
    time), and the CRC-32 of the files is taken in the background thread once they are written: wait() reads no file
    again, and the checksums it records are the files'. The second checkpoint holds the weights of its own step."""
    root = parallel.Root(torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 4)))
    opt = torch.optim.AdamW(root.parameters())
    root(lambda m, x: m(x).sum(), torch.randn(2, 16)).backward()
    opt.step()
    stager, world = parallel.checkpoint_stager(torch.device("cpu")), parallel.World()
    cached = stager._state_dict_stager._cached_storage_mapping      # DCP's buffer per staged storage (private)
    buffers, weights = [], []
    for step in (1, 2):
        pending = parallel.start_save(tmp_path, root, opt, {"step": step}, world, asynchronous=True, stager=stager)
        weights.append([p.detach().clone() for p in root.parameters()])
        with torch.no_grad():                                      # training goes on: the save has its copy
            for p in root.parameters():
                p.add_(1.0)
        deadline = time.time() + 60
        while not pending.written() and time.time() < deadline:
            time.sleep(0.01)
        with monkeypatch.context() as mp:
            mp.setattr(parallel, "file_digest", lambda f: pytest.fail(f"{f} read again after its write"))
            ckpt = pending.wait()
        assert parallel.check_checkpoint(ckpt) is None               # the recorded CRC-32s are the files'
        buffers.append({id(v) for v in cached.values()})
    assert buffers[0] and buffers[0] == buffers[1]
    loaded = parallel.Root(torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 4)))
    parallel.load_checkpoint(tmp_path / "checkpoints/step-0000002", loaded)
    assert all(torch.equal(a, b) for a, b in zip(loaded.parameters(), weights[1]))
    stager.close()


# ----------------------------------------------------------------------------------------------------------------
# Faults: a full disk, a read-only directory, two runs at once


@pytest.mark.parametrize("extra", [[], ["--async-save"]])
def test_disk_full_during_a_save_loses_nothing(chain, tmp_path, capsys, monkeypatch, extra):
    """DCP reports a full disk as a CheckpointException (a BaseException) around a RuntimeError; the run says
    "No space left on device" with the path, keeps the previous checkpoint, and a rerun finishes the same curve.
    With --async-save the failure surfaces when the background write is waited for, with the same message."""
    import torch.distributed.checkpoint.filesystem as fs
    real_write, real_save, saves = fs._write_item, parallel.start_save, []

    def full_disk(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos") from \
            OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def second_save_fails(*a, **k):
        saves.append(1)
        monkeypatch.setattr(fs, "_write_item", full_disk if len(saves) == 2 else real_write)
        return real_save(*a, **k)
    monkeypatch.setattr(parallel, "start_save", second_save_fails)
    run = tmp_path / "run"
    msg = main_exit(["--stage", "base", "--out-dir", run, *BASE, *extra], capsys)
    assert "No space left on device" in msg and "step 3" in msg and str(run) in msg, msg
    assert parallel.resume_checkpoint(run) == run / "checkpoints/step-0000002"
    monkeypatch.setattr(parallel, "start_save", real_save)
    monkeypatch.setattr(fs, "_write_item", real_write)
    rerun(run, capsys)
    same_run(run, chain / "base")


@contextmanager
def mounted_tmpfs(path: Path, size: str):
    """A small real filesystem (root only: `mount -t tmpfs`), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_real_full_disk_then_more_space_finishes_the_same_curve(chain, tmp_path, capsys):
    """A 45 MiB tmpfs holds the base's checkpoint of step 2 (model + AdamW, 39 MB) but not that of step 3 besides
    it (the model alone, 13 MB): the save of step 3 fails for real."""
    with mounted_tmpfs(tmp_path / "disk", "45m") as disk:
        run = disk / "run"
        msg = main_exit(["--stage", "base", "--out-dir", run, *BASE], capsys)
        assert "No space left on device" in msg and str(run) in msg, msg
        assert parallel.resume_checkpoint(run) == run / "checkpoints/step-0000002"
        subprocess.run(["mount", "-o", "remount,size=128m", str(disk)], check=True)
        rerun(run, capsys)
        same_run(run, chain / "base")


def test_read_only_out_dir_is_one_line(base_copy, tmp_path, capsys):
    before = files_of(base_copy)
    if os.geteuid() != 0:
        os.chmod(base_copy, 0o555)
        ro = base_copy
    else:
        ctx = mounted_tmpfs(tmp_path / "ro", "128m")
        ro = ctx.__enter__()
        shutil.copytree(base_copy, ro / "run")
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        ro = ro / "run"
    try:
        msg = main_exit(["--stage", "base", "--out-dir", ro, *BASE], capsys)
        assert str(ro) in msg and ("Read-only file system" in msg or "Permission denied" in msg), msg
        assert files_of(ro) == before
    finally:
        if os.geteuid() != 0:
            os.chmod(base_copy, 0o755)
        else:
            ctx.__exit__(None, None, None)


def test_two_runs_on_one_directory(tmp_path, capsys):
    """The second run stops at once with the holder's pid; the first logs every step once."""
    run = tmp_path / "run"
    argv = cmd("base", run, *LM, "--steps", 30, "--ckpt-every", 10)
    first = subprocess.Popen(argv, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not step_rows(run):
            assert first.poll() is None and time.monotonic() < deadline, "the first run ended early"
            time.sleep(0.05)
        msg = main_exit(argv[2:], capsys)
        assert f"is in use by another run (pid {first.pid}" in msg and str(run / ".lock") in msg, msg
        assert first.wait(timeout=300) == 0
    finally:
        first.kill()
        first.wait()
    assert [r["step"] for r in step_rows(run)] == list(range(1, 31))
    assert not (run / ".lock").exists(), "the lock outlived its run"


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_lock_is_taken_over_a_live_or_foreign_one_refused(chain, base_copy, capsys):
    import socket
    lock = base_copy / ".lock"
    lock.write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname(), "since": "earlier"}))
    out = rerun(base_copy, capsys)
    assert "stale lock" in out and not lock.exists()
    same_run(base_copy, chain / "base")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for holder in ({"pid": sleeper.pid, "host": socket.gethostname()}, {"pid": 1, "host": "another-machine"}):
            lock.write_text(json.dumps({**holder, "since": "earlier"}))
            before = files_of(base_copy)
            msg = main_exit(["--stage", "base", "--out-dir", base_copy, *BASE], capsys)
            assert f"pid {holder['pid']} on {holder['host']}" in msg and f"delete {lock}" in msg, msg
            assert files_of(base_copy) == before
    finally:
        sleeper.send_signal(signal.SIGKILL)
        sleeper.wait()


# ----------------------------------------------------------------------------------------------------------------
# What a run refuses to write into


def test_refused_out_dirs_are_left_untouched(chain, tmp_path, capsys):
    model_dir = tmp_path / "llama"
    shutil.copytree(chain / "base/final", model_dir)
    other_stage = tmp_path / "other"
    other_stage.mkdir()
    shutil.copy(chain / "pretrain/config.json", other_stage / "config.json")
    cases = {   # out dir -> (argv, expected)
        chain / "base/final": (["--stage", "pretrain", "--init", chain / "base/final"], "overlaps --init"),
        chain / "pretrain": (["--stage", "pretrain", "--init", chain / "pretrain/final"], "overlaps --init"),
        model_dir: (["--stage", "base"], "holds a config.json that is not a run's"),
        other_stage: (["--stage", "base"], "holds a run of stage 'pretrain', not 'base'"),
    }
    cases = [*cases.items(), (chain / "pretrain", (["--stage", "pretrain", "--init", chain / "base/final", "--beta",
                                                    "0.5"], "was written with --beta 0.03, this run has 0.5"))]
    for out, (argv, expected) in cases:
        before = files_of(out)
        msg = main_exit([*argv, *LM, "--out-dir", out], capsys)
        assert expected in msg and "--out-dir" in msg, msg
        assert files_of(out) == before, out


# ----------------------------------------------------------------------------------------------------------------
# Bad flag values: one line, before anything is written


FLAGS = [   # (stage, flags, expected)
    ("base", ["--lr", "-1e-3"], "--lr -0.001: expected a finite number > 0"),
    ("base", ["--lr", "nan"], "--lr nan: expected a finite number > 0"),
    ("base", ["--min-lr", "inf"], "--min-lr inf: expected a finite number >= 0"),
    ("base", ["--seq-len", "0"], "--seq-len 0: expected an integer >= 1"),
    ("base", ["--ckpt-every", "0"], "--ckpt-every 0: expected an integer >= 1"),
    ("base", ["--log-every", "0"], "--log-every 0: expected an integer >= 1"),
    ("base", ["--eval-batches", "0"], "--eval-batches 0: expected an integer >= 1"),
    ("base", ["--steps", "0"], "--steps 0: expected an integer >= 1"),
    ("base", ["--steps", "-5"], "--steps -5: expected an integer >= 1"),
    ("base", ["--global-batch", "0"], "--global-batch 0: expected an integer >= 1"),
    ("base", ["--micro-batch", "0"], "--micro-batch 0: expected an integer >= 1"),
    ("base", ["--grad-clip", "-1"], "--grad-clip -1.0: expected a finite number > 0"),
    ("base", ["--warmup-steps", "-2"], "--warmup-steps -2: expected an integer >= -1"),
    ("base", ["--beta2", "1"], "--beta2 1.0: expected a finite number >= 0 and < 1"),
    ("base", ["--stop-at", "-1"], "--stop-at -1: expected an integer >= 0"),
    ("pretrain", ["--gumbel-tau", "0"], "--gumbel-tau 0.0: expected a finite number > 0"),
    ("sft", ["--epochs", "0"], "--epochs 0.0: expected a finite number > 0"),
    ("sft", ["--steps", "-1"], "--steps -1: expected an integer >= 0"),
]


@pytest.mark.parametrize("stage,flags,expected", FLAGS, ids=[" ".join(f[1]) + f" ({f[0]})" for f in FLAGS])
def test_bad_flag_value_is_one_line(stage, flags, expected, tmp_path, capsys):
    init = [] if stage == "base" else ["--init", tmp_path / "somewhere"]
    msg = main_exit(["--stage", stage, *init, *flags, "--out-dir", tmp_path / "run"], capsys)
    assert msg == expected, msg
    assert not (tmp_path / "run").exists()


def test_every_number_flag_declares_its_range():
    """The bounds live next to the fields (trainer.arg's `valid`), once for every stage."""
    for stage, cls in train.STAGE_ARGS.items():
        loose = [f.name for f in fields(cls) if f.type in ("int", "float") and not f.metadata["valid"]]
        assert not loose, f"{stage}: no range declared for {loose}"


@pytest.mark.parametrize("stage", ["base", "fta-i"])
def test_stage_help_says_each_default_once(stage, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--stage", stage, "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    entries = " ".join(out.split()).split(" --")
    assert all(entry.count("default") <= 1 for entry in entries), [e for e in entries if e.count("default") > 1]
    assert "(default: )" not in out


# ----------------------------------------------------------------------------------------------------------------
# Bad data: shards and SFT files, checked when the run opens them


def shard_dir(tmp_path: Path, ids, meta: dict | None = None, raw: bytes | None = None) -> Path:
    d = tmp_path / "shards"
    d.mkdir()
    (d / "shard_00000.bin").write_bytes(raw if raw is not None else np.asarray(ids, dtype=np.uint32).tobytes())
    if meta is not None:
        (d / "meta.json").write_text(json.dumps(meta))
    return d


SHARDS = {   # name -> (ids, meta, raw bytes, expected)
    "ids beyond the vocabulary": (np.arange(1000) % 700, None, None, "token id 699 is outside the vocabulary of 612"),
    "meta.json of another tokenizer": (np.arange(1000) % 500, {"tokenizer": "tokenizer.model", "vocab_size": 128256},
                                       None, "prepared with tokenizer tokenizer.model (128256 tokens)"),
    "a 3-byte shard": (None, None, b"abc", "shard_00000.bin has 3 bytes, not a whole number of uint32 tokens"),
    "too small for one window": (np.arange(10), None, None, "10 tokens, fewer than one window of --seq-len + 1 = 65"),
}


@pytest.mark.parametrize("case", list(SHARDS))
def test_bad_shards_are_one_line(case, tmp_path, capsys):
    ids, meta, raw, expected = SHARDS[case]
    d = shard_dir(tmp_path, ids, meta, raw)
    msg = main_exit(["--stage", "base", *LM, "--data", d, "--out-dir", tmp_path / "run"], capsys)
    assert msg.startswith(f"--data {d}: ") and expected in msg, msg
    assert not (tmp_path / "run").exists()


SFT = {   # name -> (file content or None for a missing file, expected)
    "not UTF-8": (b'{"prompt": "a", "response": "\xff\xfe"}\n', "not UTF-8 text"),
    "bad JSON": (b'{"prompt": "a", "response": "b"}\n{"prompt": \n', "train.jsonl:2: not valid JSON"),
    "a missing field": (b'{"prompt": "a", "answer": "b"}\n', 'train.jsonl:1: expected string fields "prompt"'),
    "a missing file": (None, "train.jsonl not found"),
}


@pytest.mark.parametrize("case", list(SFT))
def test_bad_sft_file_is_one_line(case, chain, tmp_path, capsys):
    content, expected = SFT[case]
    f = tmp_path / "train.jsonl"
    if content is not None:
        f.write_bytes(content)
    msg = main_exit(["--stage", "sft", "--init", chain / "base/final", *LM, "--sft-data", f, "--out-dir",
                     tmp_path / "run"], capsys)
    assert msg.startswith(f"--sft-data {f}: ") and expected in msg, msg
    assert not (tmp_path / "run").exists()


def test_failed_prepare_keeps_the_old_shards(tmp_path, capsys):
    tok = Tokenizer()
    (tmp_path / "a.txt").write_text("First document.\fSecond document.")
    (tmp_path / "b.txt").write_text("Another corpus.")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"txt": "no"}\n')
    out = tmp_path / "shards"
    data.prepare([tmp_path / "a.txt"], out, tok)
    before = files_of(out)
    with pytest.raises(SystemExit) as e:
        data.main(["prepare", str(tmp_path / "b.txt"), str(tmp_path / "bad.jsonl"), "--out", str(out)])
    msg = str(e.value.code)
    assert "bad.jsonl:2" in msg and "\n" not in msg, msg
    assert files_of(out) == before                                  # old shards and meta.json intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt", "bad.jsonl", "shards"]  # no temp dir
    (out / "notes.txt").write_text("mine")                            # not a shard directory any more: refused
    with pytest.raises(ValueError, match="holds files that are not shards"):
        data.prepare([tmp_path / "b.txt"], out, tok)
    assert (out / "notes.txt").read_text() == "mine"


# ----------------------------------------------------------------------------------------------------------------
# Generation CLIs: model.py and cola.py


LONG = "x" * 600      # 601 byte tokens: more than the tiny context of 512


def test_model_cli_mistakes_are_one_line(chain, tmp_path, capsys):
    llama, colad = chain / "base/final", chain / "bc/final"
    cases = [
        (["--ckpt", tmp_path / "nowhere", "--prompt", "a"], f"--ckpt {tmp_path / 'nowhere'}: directory not found"),
        (["--ckpt", colad, "--prompt", "a"], "is a CoLA checkpoint: generate with `python cola.py"),
        (["--ckpt", llama, "--prompt", LONG], "--prompt #1: 601 tokens leave no room in the model's context of 512"),
        (["--ckpt", llama, "--prompt", "a", "--max-new-tokens", "0"], "--max-new-tokens 0: expected an integer >= 1"),
        (["--ckpt", llama, "--prompt", "a", "--top-p", "0"], "--top-p 0.0: expected a number in (0, 1]"),
    ]
    for argv, expected in cases:
        msg = main_exit(argv, capsys, model_py.main)
        assert expected in msg, msg


def test_cola_cli_mistakes_are_one_line(chain, capsys):
    ck = ["--ckpt", chain / "bc/final", "--prompt", "a"]
    cases = [
        (["--top-k", "0"], "--top-k 0: expected an integer >= 1"),
        (["--max-new-tokens", "-3"], "--max-new-tokens -3: expected an integer >= 1"),
        (["--action", "5"], "--action 5 is only used with --mode fixed (this is --mode policy)"),
        (["--mode", "fixed", "--action", "99"], "--action 99: expected 0 <= action < 64"),
        (["--temperature", "nan"], "--temperature nan: expected a finite number >= 0"),
    ]
    for argv, expected in cases:
        msg = main_exit([*ck, *argv], capsys, cola.main)
        assert expected in msg, msg


def test_cola_cli_says_when_the_context_clips_max_new_tokens(chain, capsys):
    cola.main(["--ckpt", str(chain / "bc/final"), "--prompt", "y" * 500, "--max-new-tokens", "1000000",
               "--mode", "greedy"])
    err = capsys.readouterr().err
    assert "--max-new-tokens 1000000 exceeds what the context of 512 tokens leaves" in err
    assert "generating at most 11" in err, err


def tokenizer_model_file(path: Path, n_ranks: int) -> Path:
    """A tokenizer.model of the first n_ranks single bytes (+ merges of "a" when n_ranks > 256)."""
    import base64
    tokens = [bytes([b]) for b in range(min(n_ranks, 256))] + [b"a" * (k + 2) for k in range(max(0, n_ranks - 256))]
    path.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(tokens)))
    return path


@pytest.mark.parametrize("n_ranks", [200, 400])
def test_a_tokenizer_of_another_size_than_the_model_is_one_line(chain, tmp_path, capsys, n_ranks):
    """Every command that generates refuses a tokenizer whose V is not the model's (612 here): a larger one has ids
    past the embedding, a smaller one cannot decode ids the model may emit (tiktoken's KeyError mid-run)."""
    import mcts
    import qnet
    import rl
    import search_eval
    tok = tokenizer_model_file(tmp_path / "tokenizer.model", n_ranks)
    n_words = n_ranks + 256
    llama, colad = chain / "base/final", chain / "fta-i/final"
    cases = [
        (model_py.main, ["--ckpt", llama, "--prompt", "a"], f"--ckpt {llama}"),
        (cola.main, ["--ckpt", colad, "--prompt", "a"], f"--ckpt {colad}"),
        (mcts.main, ["--ckpt", colad, "--tokenizer", tok, "--n-rounds", "1"], f"--ckpt {colad}"),
        (rl.main, ["--init", colad, "--out-dir", tmp_path / "rl", "--steps", "1"], f"--init {colad}"),
        (qnet.main, ["--init", colad, "--out-dir", tmp_path / "q", "--steps", "1"], f"--init {colad}"),
        (search_eval.main, ["--ckpt", colad, "--llama", llama, "--methods", "greedy", "--out-dir", tmp_path / "se"],
         f"--ckpt {colad}"),
    ]
    for main, argv, what in cases:
        if "--tokenizer" not in argv:
            argv = [*argv, "--tokenizer", tok]
        msg = main_exit(argv, capsys, main)
        relation = "has" if n_words > 612 else "has only"
        assert f"the tokenizer {relation} {n_words} tokens but {what} has vocab_size 612" in msg, (main.__module__, msg)
    left = {d: sorted(p.name for p in (tmp_path / d).iterdir()) for d in ("rl", "q", "se") if (tmp_path / d).exists()}
    assert left in ({}, {"rl": [".lock"]}), left          # nothing written (rl.py's lock goes when the process ends)


def test_append_row_ends_a_half_written_line_first(tmp_path):
    """A kill mid-row leaves a broken last line; the next row goes on a line of its own (readers skip the broken
    one) instead of being glued to it."""
    f = tmp_path / "rows.jsonl"
    f.write_text('{"a": 1}\n{"method": "gre')
    trainer.append_row(f, {"b": 2})
    assert f.read_text().splitlines()[1:] == ['{"method": "gre', '{"b": 2}']
    trainer.append_row(f, {"c": 3})
    assert f.read_text().endswith('{"b": 2}\n{"c": 3}\n')


@pytest.mark.parametrize("flag", ["--rl-seeds", "--stage-seeds"])
@pytest.mark.parametrize("seeds", ["", "a,b", "0,0", "-1", "1,,2"])
def test_pipeline_seed_lists_are_distinct_integers(flag, seeds):
    import pipeline
    with pytest.raises(SystemExit, match=f"{flag} .*: expected"):
        pipeline.parse_pipeline_args(["--claims", flag, seeds])


@pytest.mark.parametrize("scale", ["nan", "inf", "0", "-1"])
def test_pipeline_scale_is_a_finite_positive_number(scale):
    import pipeline
    with pytest.raises(SystemExit, match=f"--scale {scale if scale not in ('0', '-1') else float(scale)}: expected a "
                                         f"finite number > 0"):
        pipeline.parse_pipeline_args(["--scale", scale])



# ----------------------------------------------------------------------------------------------------------------
# RL, Q-learning, search and evaluation: bad input and faults


def entry_points():
    """name -> main of every command with a seed, --max-new-tokens or an output flag."""
    import eval as eval_py
    import mcts
    import qnet
    import rl
    import search_eval
    return {"train": train.main, "rl": rl.main, "qnet": qnet.main, "mcts": mcts.main, "search_eval": search_eval.main,
            "eval": eval_py.main, "model": model_py.main, "cola": cola.main}


SEEDS = [   # (command, argv before the seed flag, the seed flag)
    ("train", ["--stage", "base"], "--seed"),
    ("rl", ["--init", "{tmp}/init"], "--seed"),
    ("qnet", ["--init", "{tmp}/init"], "--seed"),
    ("mcts", ["--ckpt", "{tmp}/init"], "--seed"),
    ("search_eval", ["--ckpt", "{tmp}/init"], "--problem-seed"),
    ("search_eval", ["--ckpt", "{tmp}/init"], "--seeds"),
    ("eval", ["diversity", "--ckpt", "{tmp}/init"], "--seed"),
    ("model", ["--ckpt", "{tmp}/init", "--prompt", "a"], "--seed"),
    ("cola", ["--ckpt", "{tmp}/init", "--prompt", "a"], "--seed"),
]


@pytest.mark.parametrize("seed", [2**70, 2**32, -1])
@pytest.mark.parametrize("command,argv,flag", SEEDS, ids=[f"{c} {f}" for c, _, f in SEEDS])
def test_a_seed_outside_0_to_2_32_is_one_line(command, argv, flag, seed, tmp_path, capsys):
    """numpy seeds from [0, 2**32) and torch overflows past 2**64: every seed flag says so before anything runs
    (it was a ValueError traceback from Run, or from the middle of a best-of-N run for --seeds)."""
    out = {"eval": ["--out", tmp_path / "out"], "mcts": [], "model": [], "cola": []}.get(command,
                                                                                         ["--out-dir", tmp_path / "out"])
    argv = [a.format(tmp=tmp_path) for a in argv] + [f"{flag}={seed}", *out]
    msg = main_exit(argv, capsys, entry_points()[command])
    name = flag.removeprefix("--")
    assert msg == f"--{name} {seed}: expected an integer >= 0 and < 4294967296", msg
    assert not (tmp_path / "out").exists()


def test_max_new_tokens_past_the_context_is_clipped_with_a_note(chain, tmp_path, capsys, monkeypatch):
    """--max-new-tokens 10**9 asked for [rows, 10**9] of sampling noise (4 GB a row) in rl.py, qnet.py and best-of-N:
    every command clips it to what the context leaves (511 of 512 here) with one note, as model.py and cola.py do,
    before anything runs (so config.json records 511 and the same command resumes)."""
    import mcts
    import qnet
    import rl
    import search_eval
    colad, llama, big = chain / "fta-i/final", chain / "sft/final", "1000000000"
    parsed = {"rl": rl.parse_args(["--init", str(colad), "--max-new-tokens", big]),
              "qnet": qnet.parse_q_args(["--init", str(colad), "--max-new-tokens", big]),
              "mcts": mcts.parse_search_args(["--ckpt", str(colad), "--max-new-tokens", big])}
    err = capsys.readouterr().err
    assert {k: c.max_new_tokens for k, c in parsed.items()} == {"rl": 511, "qnet": 511, "mcts": 511}
    assert err.count(f"note: --max-new-tokens {big} exceeds the context of 512 tokens of") == 3, err
    asked = []                                 # best-of-N's noise, at most the context
    real = search_eval.sample_uniforms
    monkeypatch.setattr(search_eval, "sample_uniforms", lambda *a: asked.append(a[-1]) or real(*a))
    search_eval.main([str(a) for a in ["--ckpt", colad, "--llama", llama, "--methods", "bon,token-bon", "--seeds", 0,
                                       "--problems", 1, "--budgets", 200, "--out-dir", tmp_path / "se",
                                       "--max-new-tokens", big]])
    err = capsys.readouterr().err
    assert asked and max(asked) == 511, asked
    assert "generating at most 511" in err and err.count("note: --max-new-tokens") == 1, err
    assert json.loads((tmp_path / "se/config.json").read_text())["max_new_tokens"] == 511


def test_a_damaged_trajectories_file_is_sampled_again(chain, tmp_path, capsys):
    """qnet.py keeps its sampled data in <run>/trajectories.pt; truncated (or overwritten), it stopped every rerun
    with torch's RuntimeError until deleted by hand. It is now sampled again, the same seeded rows, and the run
    resumes to exactly the uninterrupted run's curve and weights."""
    import qnet
    from safetensors.torch import load_file
    flags = ["--init", chain / "fta-i/final", "--steps", 2, "--prompts", 2, "--samples", 2, "--val-prompts", 1,
             "--max-new-tokens", 16, "--batch", 2, "--ckpt-every", 1, "--eval-every", 1]

    def q(run, *extra):
        qnet.main([str(a) for a in [*flags, "--out-dir", run, *extra]])
        return capsys.readouterr().out
    q(tmp_path / "ref")
    run = tmp_path / "run"
    q(run, "--stop-at", 1)
    f = run / "trajectories.pt"
    os.truncate(f, f.stat().st_size // 2)
    out = q(run)
    assert f"{f}: damaged (" in out and "sampling the same trajectories again" in out, out[-2000:]
    assert comparable(step_rows(run)) == comparable(step_rows(tmp_path / "ref"))
    a, b = (load_file(d / "final/model.safetensors") for d in (tmp_path / "ref", run))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    f.write_bytes(b"not a torch file")                       # overwritten: the same, for a rerun of the finished run
    assert "sampling the same trajectories again" in q(run)
    assert torch.load(f, weights_only=False)["train"] == torch.load(tmp_path / "ref/trajectories.pt",
                                                                     weights_only=False)["train"]


def test_an_output_path_that_cannot_be_written_is_refused_before_any_work(tmp_path, capsys):
    """eval.py --out naming a directory failed in the rename after the whole evaluation (IsADirectoryError); it is
    refused first, as is an --out under a file, a search_eval.py --out-dir that is a file. The --ckpt given holds no
    model: the refusal comes before anything reads it."""
    import eval as eval_py
    import search_eval
    (tmp_path / "a-dir").mkdir()
    (tmp_path / "a-file").write_text("mine")
    nowhere = tmp_path / "no-model"
    nowhere.mkdir()                                  # a directory (search_eval checks that first) holding no model
    cases = [
        (eval_py.main, ["controllability", "--ckpt", nowhere, "--out", tmp_path / "a-dir"],
         f"--out {tmp_path / 'a-dir'}: a directory; expected the path of a file to write"),
        (eval_py.main, ["diversity", "--ckpt", nowhere, "--out", tmp_path / "a-file/x.json"],
         f"--out {tmp_path / 'a-file/x.json'}: {tmp_path / 'a-file'} is a file, not a directory"),
        (search_eval.main, ["--ckpt", nowhere, "--methods", "greedy", "--out-dir", tmp_path / "a-file"],
         f"--out-dir {tmp_path / 'a-file'}: a file, not a directory"),
    ]
    for main, argv, expected in cases:
        assert main_exit(argv, capsys, main).startswith(expected)
    assert (tmp_path / "a-file").read_text() == "mine" and not any((tmp_path / "a-dir").iterdir())


def test_a_full_disk_while_eval_and_search_eval_write_keeps_what_was_there(chain, tmp_path, capsys, monkeypatch):
    """The disk fills in the middle of an output: eval.py's JSON and search_eval.py's config.json are written aside
    and renamed (the previous file stays whole), results.jsonl's rows before the failed one stay, and each is one
    line naming the file (eval.py's was an OSError traceback). A rerun after freeing space finishes. (mcts.py writes
    no file: it prints.)"""
    import eval as eval_py
    import search_eval
    real_text, real_write = Path.write_text, os.write

    def fills_in_the_middle(name):
        def write_text(self, text, *a, **k):
            if not self.name.startswith(f".{name}.tmp"):
                return real_text(self, text, *a, **k)
            real_text(self, text[:len(text) // 2], *a, **k)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write_text
    out = tmp_path / "c.json"
    out.write_text('{"previous": 1}\n')
    monkeypatch.setattr(Path, "write_text", fills_in_the_middle("c.json"))
    msg = main_exit(["controllability", "--ckpt", chain / "pretrain/final", "--batches", 1, "--seq-len", 32, "--out",
                     out], capsys, eval_py.main)
    assert msg.startswith(f"{out}: could not write it: No space left on device"), msg
    assert out.read_text() == '{"previous": 1}\n' and sorted(p.name for p in tmp_path.iterdir()) == ["c.json"]

    se = tmp_path / "se"
    flags = ["--ckpt", chain / "fta-i/final", "--methods", "greedy", "--max-new-tokens", 16, "--out-dir", se]
    monkeypatch.setattr(Path, "write_text", real_text)
    search_eval.main([str(a) for a in [*flags, "--problems", 1]])
    before = files_of(se)
    monkeypatch.setattr(Path, "write_text", fills_in_the_middle("config.json"))
    msg = main_exit([*flags, "--problems", 2], capsys, search_eval.main)
    assert msg.startswith(f"--out-dir {se}: cannot write the results there: No space left on device"), msg
    assert files_of(se) == before
    monkeypatch.setattr(Path, "write_text", real_text)
    results = se / "results.jsonl"

    def full_in_results(fd, b):                # half of the next row reaches results.jsonl
        if os.fstat(fd).st_ino != results.stat().st_ino:
            return real_write(fd, b)
        real_write(fd, b[:len(b) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "write", full_in_results)
    msg = main_exit([*flags, "--problems", 2], capsys, search_eval.main)
    monkeypatch.setattr(os, "write", real_write)
    assert msg.startswith(f"{results}: could not append a row: No space left on device"), msg
    assert results.read_bytes().startswith(before["results.jsonl"])
    search_eval.main([str(a) for a in [*flags, "--problems", 2]])
    assert len(search_eval.read_rows(results)) == 2


def interrupted(argv, capsys, main) -> str:
    """Ctrl-C's exit: status 130 and one line on stderr, no traceback -> that line."""
    try:
        main([str(a) for a in argv])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped as a KeyboardInterrupt: a traceback")
    except SystemExit as e:
        assert e.code == 130, e.code
    else:
        pytest.fail("the command did not stop")
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("interrupted (Ctrl-C)"), err[-2000:]
    return err.strip().splitlines()[-1]


def test_ctrl_c_in_every_command_is_one_line(chain, tmp_path, capsys, monkeypatch):
    """KeyboardInterrupt was a traceback in every command. Each now ends with exit status 130 and one line saying
    what the same command goes on from (trainer.interrupts_are_one_line), and leaves nothing behind."""
    import mcts
    import qnet
    import rl
    import search_eval
    mains = entry_points()

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(cola, "load", ctrl_c)                # every command but train.py loads through it
    colad = chain / "fta-i/final"
    for main, argv in ((rl.main, ["--init", colad, "--out-dir", tmp_path / "rl"]),
                       (qnet.main, ["--init", colad, "--out-dir", tmp_path / "q"]),
                       (mcts.main, ["--ckpt", colad]),
                       (search_eval.main, ["--ckpt", colad, "--methods", "greedy", "--out-dir", tmp_path / "se"]),
                       (mains["eval"], ["controllability", "--ckpt", colad, "--out", tmp_path / "c.json"])):
        line = interrupted(argv, capsys, main)
        assert "rerun the same command" in line, line
    monkeypatch.setattr(trainer.Run, "train", ctrl_c)
    line = interrupted(["--stage", "base", "--out-dir", tmp_path / "base", *BASE], capsys, train.main)
    assert line.endswith(f"rerun the same command to start {tmp_path / 'base'} over (no checkpoint yet)"), line
    assert not (tmp_path / "base/.lock").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]         # rl's, qnet's lock and directory gone


def test_ctrl_c_while_rl_saves_a_checkpoint_resumes_to_the_same_run(chain, tmp_path, capsys, monkeypatch):
    """Ctrl-C in the middle of the save of step 2 (its train.json not yet in): one line naming the checkpoint of step
    1 as where the rerun resumes; the rerun drops the incomplete step 2 and ends on the uninterrupted run's curve and
    weights."""
    import rl
    from infra import files
    from test_rl import FAST
    argv = ["--init", chain / "fta-i/final", *FAST, "--steps", 3, "--ckpt-every", 1, "--eval-every", 3]
    rl.main([str(a) for a in [*argv, "--out-dir", tmp_path / "ref"]])
    run, real = tmp_path / "run", files.atomic_write

    def ctrl_c_in_the_save_of_step_2(path, write_fn):
        if path.name == "train.json" and path.parent.name == "step-0000002":
            raise KeyboardInterrupt
        return real(path, write_fn)
    monkeypatch.setattr(files, "atomic_write", ctrl_c_in_the_save_of_step_2)
    capsys.readouterr()
    line = interrupted([*argv, "--out-dir", run], capsys, rl.main)
    assert line.endswith(f"to resume {run} from {run / 'checkpoints/step-0000001'} (step 1)"), line
    assert not (run / ".lock").exists() and not list(run.glob(".*tmp*"))
    monkeypatch.setattr(files, "atomic_write", real)
    rl.main([str(a) for a in [*argv, "--out-dir", run]])
    assert "step-0000002: incomplete checkpoint" in capsys.readouterr().out
    drop = ("rollout_s", "logprob_s", "update_s", "rollout_tok_per_s")
    clean = lambda rows: [{k: v for k, v in r.items() if k not in drop} for r in rows]    # noqa: E731
    assert clean(step_rows(run)) == clean(step_rows(tmp_path / "ref"))
    a, b = (cola.CoLA.from_pretrained(d / "final") for d in (tmp_path / "ref", run))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# ----------------------------------------------------------------------------------------------------------------
# Red-team round 2 (docs/reliability.md): rl.py, qnet.py, mcts.py, search_eval.py, eval.py


RL_FAST = ["--prompts-per-step", "2", "--group", "2", "--max-new-tokens", "6", "--eval-problems", "2", "--steps", "2",
           "--ckpt-every", "1", "--eval-every", "1", "--dtype", "float32"]
Q_FAST = ["--prompts", "2", "--samples", "2", "--val-prompts", "1", "--max-new-tokens", "6", "--batch", "2",
          "--steps", "2", "--ckpt-every", "1", "--eval-every", "1", "--target-every", "1", "--dtype", "float32"]


def test_an_out_dir_that_is_a_file_is_said_so(chain, tmp_path, capsys):
    """A run's --out-dir that is a file, or lies under one, was "cannot create the run's lock file: File exists ...
    free space or fix the directory's permissions"; now it says what the path is (every Run: train, rl, qnet)."""
    import rl
    f = tmp_path / "a-file"
    f.write_text("mine")
    for argv, expected in (([*cmd("base", f)[2:], "--steps", 1], f"--out-dir {f}: a file, not a directory"),
                           ([*cmd("base", f / "run")[2:], "--steps", 1], f"--out-dir {f / 'run'}: {f} is a file")):
        assert main_exit(argv, capsys).startswith(expected)
    assert main_exit(["--init", chain / "fta-i/final", "--out-dir", f, *RL_FAST], capsys, rl.main).startswith(
        f"--out-dir {f}: a file, not a directory")
    assert f.read_text() == "mine"


def test_trim_metrics_drops_the_final_row_of_a_run_that_says_its_step(tmp_path):
    rows = [{"eval": {"step": 0}}, {"step": 1}, {"step": 2}, {"eval": {"step": 2, "x": 1}}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    trainer.trim_metrics(tmp_path, 2, last=2)
    assert read_rows(tmp_path) == rows[:3]
    trainer.trim_metrics(tmp_path, 1, last=2)
    assert read_rows(tmp_path) == rows[:2]


def test_a_rerun_of_a_finished_rl_or_q_run_logs_its_final_row_once(chain, tmp_path, capsys):
    """Rerunning a finished rl.py / qnet.py run re-exports it; its final eval row (which says its step) used to be
    kept by trim_metrics and logged again: two final rows, metrics.jsonl no longer the uninterrupted run's."""
    import qnet
    import rl
    for main, argv in ((rl.main, RL_FAST), (qnet.main, Q_FAST)):
        run = tmp_path / main.__module__
        full = ["--init", str(chain / "fta-i/final"), "--out-dir", str(run), *argv]
        main(full)
        once = [r for r in read_rows(run) if "eval" in r]
        main(full)
        capsys.readouterr()
        assert [r for r in read_rows(run) if "eval" in r] == once, main.__module__


def test_a_trajectories_path_that_is_a_directory_is_one_line(chain, tmp_path, capsys):
    """qnet.py's trajectories.pt a directory: IsADirectoryError traceback; now one line, the directory kept."""
    import qnet
    run = tmp_path / "q"
    (run / "trajectories.pt").mkdir(parents=True)
    (run / "trajectories.pt/mine").write_text("x")
    msg = main_exit(["--init", chain / "fta-i/final", "--out-dir", run, *Q_FAST], capsys, qnet.main)
    assert msg.startswith(f"{run / 'trajectories.pt'}: not a file"), msg
    assert (run / "trajectories.pt/mine").read_text() == "x"


def test_search_eval_refuses_repeats_and_a_problem_count_that_cannot_end(tmp_path, capsys):
    """--problems 10^8 drew 2 * 10^9 problems looking for countdown-2's 13 distinct prompts (days, no output);
    --methods greedy,greedy printed greedy's rows twice; --seeds 0,0 ran one seed. All refused before any model."""
    import search_eval
    out = tmp_path / "ev"
    for flags, expected in ((["--problems", "100000000"], "--problems 100000000: expected an integer >= 1 and <= 10000"),
                            (["--methods", "greedy,greedy"], "--methods 'greedy,greedy': greedy is listed twice"),
                            (["--methods", "bon", "--seeds", "0,0"], "--seeds '0,0': 0 is listed twice")):
        argv = ["--ckpt", tmp_path, "--out-dir", out, *(["--methods", "greedy"] if "--methods" not in flags else []),
                *flags]
        assert main_exit(argv, capsys, search_eval.main).startswith(expected)
    assert not out.exists()


def test_outputs_inside_a_checkpoint_or_over_a_run_are_refused(chain, tmp_path, capsys):
    """eval.py --out CKPT/config.json replaced the model's config.json (the checkpoint was lost); search_eval.py
    --out-dir on an RL run directory replaced its config.json with its own (the run could no longer resume). Both
    are refused before any model loads, every file as it was."""
    import eval as eval_py
    import search_eval
    ckpt, run = tmp_path / "ckpt", tmp_path / "run"
    shutil.copytree(chain / "pretrain/final", ckpt)
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"stage": "rl-latent-grpo", "task": "countdown-2"}))
    before = (files_of(ckpt), files_of(run))
    for main, argv, expected in (
            (eval_py.main, ["controllability", "--ckpt", ckpt, "--out", ckpt / "config.json"],
             f"--out {ckpt / 'config.json'}: inside the model checkpoint {ckpt}"),
            (eval_py.main, ["actions", "--ckpt", chain / "pretrain/final", "--out", ckpt / "eval/a.json"],
             f"--out {ckpt / 'eval/a.json'}: inside the model checkpoint {ckpt}"),
            (search_eval.main, ["--ckpt", ckpt, "--methods", "greedy", "--out-dir", ckpt],
             f"--out-dir {ckpt}: inside the model checkpoint {ckpt}"),
            (search_eval.main, ["--ckpt", ckpt, "--methods", "greedy", "--out-dir", run],
             f"--out-dir {run} holds a config.json that is not search_eval.py's")):
        assert main_exit(argv, capsys, main).startswith(expected)
    assert (files_of(ckpt), files_of(run)) == before


def test_a_weights_file_higher_up_does_not_refuse_outputs_below_it(tmp_path):
    """Only the directory an output lands in is a checkpoint or not: a stray model.safetensors in a parent (a home
    directory) must not refuse every --out below it."""
    from infra.files import check_outside_models
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "results").mkdir()
    check_outside_models(tmp_path / "results" / "x.json", "--out")
    with pytest.raises(SystemExit, match="inside the model checkpoint"):
        check_outside_models(tmp_path / "x.json", "--out")


def test_mcts_flags_that_would_be_ignored_are_refused(chain, capsys):
    """--td-threshold / --extend-tokens without --qnet, --index with --problem: silently ignored before."""
    import mcts
    ckpt = ["--ckpt", str(chain / "fta-i/final")]
    for flags, expected in ((["--td-threshold", "0.5"], "--td-threshold is for MCTS-Q; it needs --qnet DIR"),
                            (["--extend-tokens=8"], "--extend-tokens is for MCTS-Q; it needs --qnet DIR"),
                            (["--index", "3", "--problem", '{"kind": "countdown", "prompt": "x", "answer": "5"}'],
                             "--index picks a held-out problem; --problem gives one already")):
        assert main_exit(ckpt + flags, capsys, mcts.main).startswith(expected)


def test_latent_rl_from_a_stage_a_export_says_its_policy_is_untrained(chain, capsys):
    """A pretrain export has a policy no stage trained; RL from it is allowed (it may be meant) but said."""
    import rl
    rl.main(["--level", "latent", "--init", str(chain / "pretrain/final"), "--eval-only", "--eval-problems", "1",
             "--max-new-tokens", "2", "--dtype", "float32"])
    assert "is a Stage A export: its policy was never trained" in capsys.readouterr().err
    rl.main(["--level", "latent", "--init", str(chain / "bc/final"), "--eval-only", "--eval-problems", "1",
             "--max-new-tokens", "2", "--dtype", "float32"])
    assert "never trained" not in capsys.readouterr().err
