"""train.py tests: every stage end to end, kill-and-resume exactness, crash safety, user-facing errors, loss maths.

Tiers:
  smoke    every stage as a subprocess (`python train.py --stage ...`), chained through --init, a few steps each,
           and the whole pipeline at its smallest scale;
  resume   a run SIGKILLed after a checkpoint and rerun with the same command logs exactly the loss curve of an
           uninterrupted run (pretrain: Gumbel noise seeded per sequence; fta-i: killed inside phase 1 and at the
           phase boundary);
  crash    a failure while a checkpoint is being written, or a NaN loss, keeps the last good checkpoint loadable;
  errors   each predictable mistake (bad flag, wrong --init, missing data, too-long --seq-len ...) stops with a
           message that names it;
  unit     lr schedule, masked CE against a hand computation, optimizer groups, which parameters each loss trains.

All on CPU at toy sizes (seq_len 64 for LM stages, 256 for task stages, a handful of steps); no timing assertions.

    python -m pytest -q tests/test_train.py
"""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import cola
import model as model_py
import pipeline
from infra import ce as infra_ce
from infra import parallel
import train
from infra import trainer
from data import Batch

from conftest import ENV, LM, LM_STEPS, REPO, TASK_STEPS, cmd, read_rows, run_ok, step_rows

K = cola.COLA_PRESETS["tiny"].n_actions          # 64

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: one torch thread, as the chain


# ----------------------------------------------------------------------------------------------------------------
# Helpers


def load_ckpt(run_dir: Path) -> dict:
    """train.json of the newest complete checkpoint (stage, step, phase, has_optim, loader, config)."""
    latest = parallel.latest_checkpoint(run_dir)
    assert latest is not None, f"no complete checkpoint in {run_dir}"
    return parallel.read_train_state(latest)


def checkpoint_files(run_dir: Path) -> dict:
    """Every file under run_dir/checkpoints -> its bytes (to check that a failed run wrote nothing there)."""
    d = Path(run_dir) / "checkpoints"
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()} if d.exists() else {}


def numbers(obj):
    """Every int/float inside a nested dict/list."""
    if isinstance(obj, dict):
        for v in obj.values():
            yield from numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from numbers(v)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield obj


# ----------------------------------------------------------------------------------------------------------------
# Smoke: every stage, chained through --init, once per module


# run dir -> (stage, optimizer steps it logs: fta-i runs its two phases of --steps each)
SMOKE = {"base": ("base", LM_STEPS), "pretrain": ("pretrain", LM_STEPS), "vq": ("pretrain", LM_STEPS),
         "bc": ("bc", LM_STEPS), "fta-i": ("fta-i", 2 * TASK_STEPS), "fta-p": ("fta-p", TASK_STEPS),
         "sft": ("sft", TASK_STEPS)}


@pytest.mark.parametrize("name", list(SMOKE))
def test_smoke_stage_writes_run_dir(chain, name):
    stage, total = SMOKE[name]
    d = chain / name
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["stage"] == stage and cfg["out_dir"] == str(d)
    # --dtype auto (the default) resolved on this machine, and what decided it, recorded
    assert cfg["dtype"] == trainer.resolve_dtype("auto", "cpu")
    assert cfg["machine"]["native_bf16"] == trainer.native_bf16("cpu") and cfg["machine"]["cpu_capability"]

    rows = read_rows(d)
    steps = [r["step"] for r in rows if "step" in r]
    assert steps == list(range(1, total + 1)), f"{name}: logged steps {steps}"
    for r in rows[:-1]:
        assert "step" in r and math.isfinite(r["ce"]) and math.isfinite(r["grad_norm"]) and r["lr"] > 0
    ev = rows[-1].get("eval")
    assert ev is not None, f"{name}: last metrics row is not the final eval: {rows[-1]}"
    assert ev["stage"] == stage
    vals = list(numbers(ev))
    assert vals and all(math.isfinite(v) for v in vals), ev
    assert set(ev["after"]["lm_val"]) >= ({"lm"} if stage in ("base", "sft") or name == "vq" else
                                          {"lm", "wm_idm", "wm_policy", "policy_acc"})
    if stage in ("fta-i", "fta-p", "sft"):
        assert "task_val" in ev["after"]

    ck = load_ckpt(d)
    assert ck["stage"] == stage and ck["step"] == total
    if name == "vq":
        assert not (d / "final").exists(), "the VQ ablation exports nothing"
    else:
        fcfg = json.loads((d / "final/config.json").read_text())
        assert fcfg["train_stage"] == stage
        # one source of truth: the export records the flags it was trained with (Stage A's beta and tau among them)
        history = fcfg["train_history"]
        assert history[-1] == {k: v for k, v in cfg.items() if k not in ("world_size", "n_params", "machine")}
        assert [h["stage"] for h in history] == {"base": ["base"], "pretrain": ["base", "pretrain"],
                                                 "bc": ["base", "pretrain", "bc"], "sft": ["base", "sft"]}.get(
            stage, ["base", "pretrain", "bc", stage])
        assert "cola_beta" not in fcfg and "cola_gumbel_tau" not in fcfg
        if stage == "pretrain":
            assert history[-1]["beta"] == cfg["beta"] == 0.03 and history[-1]["gumbel_tau"] == cfg["gumbel_tau"]
        assert list((d / "final").glob("*.safetensors"))


@pytest.mark.parametrize("name", ["pretrain", "vq"])
def test_smoke_pretrain_codebook_usage(chain, name):
    cb = read_rows(chain / name)[-1]["eval"]["codebook"]
    assert 1 <= cb["alive"] <= K and 0 < cb["top_share"] <= 1
    for r in step_rows(chain / name):          # per-step usage of the (noisy / nearest) assignments
        assert 1 <= r["alive"] <= K


def test_smoke_frozen_parts_stay_frozen(chain):
    """Stage A and B never touch the base (same held-out LM loss, bit for bit); Stage B keeps IDM + merge (same
    world-model loss under IDM actions); FTA-I / FTA-P do change the base."""
    ev = {n: read_rows(chain / n)[-1]["eval"] for n in ("pretrain", "vq", "bc", "fta-i", "sft")}
    for n in ("pretrain", "vq", "bc"):
        assert ev[n]["after"]["lm_val"]["lm"] == ev[n]["before"]["lm_val"]["lm"], n
    assert ev["bc"]["after"]["lm_val"]["wm_idm"] == ev["bc"]["before"]["lm_val"]["wm_idm"]
    assert ev["fta-i"]["after"]["lm_val"]["lm"] != ev["fta-i"]["before"]["lm_val"]["lm"]
    assert ev["sft"]["after"]["lm_val"]["lm"] != ev["sft"]["before"]["lm_val"]["lm"]
    phases = [r["phase"] for r in step_rows(chain / "fta-i")]
    assert phases == ["fta-i/base"] * TASK_STEPS + ["fta-i/bc"] * TASK_STEPS


def test_pipeline_smallest_scale(tmp_path):
    """--scale 0.001 rounds every stage to 1 step (the smallest the pipeline runs); results.md has the table and
    results.json its numbers under fixed names; --claims adds the VQ ablation, the stages at another seed, RL once
    per --rl-seeds seed and the search, reading what the pipeline trained."""
    out = tmp_path / "runs"
    run_ok([sys.executable, str(REPO / "pipeline.py"), "--scale", "0.001", "--out-dir", str(out)], timeout=600)
    table = (out / "results.md").read_text()
    assert "| measurement" in table and "| value | paper / target |" in table
    line = next((l for l in table.splitlines() if "Stage A: alive actions (direct assignment)" in l), None)
    assert line is not None, table
    alive, of = line.split("|")[2].split("/")
    assert 1 <= float(alive) <= K and int(of) == K
    assert "VQ ablation" not in table and "RL latent" not in table         # --claims adds them
    for name in ("base", "pretrain", "bc", "fta-i", "fta-p", "sft"):
        assert load_ckpt(out / name)["stage"] and read_rows(out / name)[-1].get("eval"), name
    assert not (out / "pretrain-vq").exists() and not (out / "rl-latent-grpo").exists()
    res = json.loads((out / "results.json").read_text())
    assert res["tokenizer"]["vocab_size"] == 612 and res["stage_seeds"] == [0] and res["dtype"] in ("float32", "bfloat16")
    assert res["heldout"]["distinct_problems"] >= 200 and res["seconds"] > 0 and res["cpu"] and "rl" not in res
    assert res["copying"]["first"] > 0 and res["copying"]["second"] > 0 and "(copying)" in table
    assert set(res["retention"]) == {"fta-i", "fta-p", "sft"} and len(res["stages"]["general_sft"]) == 1
    # --claims: the VQ ablation and seed 1 of every stage after the base, RL at two seeds, the search
    run_ok([sys.executable, str(REPO / "pipeline.py"), "--claims", "--scale", "0.001", "--out-dir", str(out),
            "--stage-seeds", "0,1", "--rl-seeds", "0,3"], timeout=600)
    res2, table2 = json.loads((out / "results.json").read_text()), (out / "results.md").read_text()
    assert sorted(res2["reused"]) == sorted(str(out / n) for n in ("base", "pretrain", "bc", "fta-i", "fta-p", "sft"))
    for name in ("pretrain", "pretrain-vq", "bc", "fta-i", "fta-p", "sft"):
        assert read_rows(out / "seed1" / name)[-1].get("eval"), name
        assert json.loads((out / "seed1" / name / "config.json").read_text())["seed"] == 1
    assert res2["stage_seeds"] == [0, 1] and all(len(v) == 2 for v in res2["stages"].values())
    assert "(2 seeds: mean [range])" in table2 and "Stage A: alive actions (VQ ablation)" in table2
    for level, start in (("latent", "fta-i"), ("token", "sft")):        # the RL part: 2 GRPO steps from each
        history = json.loads((out / f"rl-{level}-grpo/final/config.json").read_text())["train_history"]
        assert [h["stage"] for h in history[-2:]] == [start, f"rl-{level}-grpo"]
        x = res2["rl"][level]
        assert x["init"] == str(out / start / "final") and x["run_dir"] == str(out / f"rl-{level}-grpo")
        assert [s["run_dir"] for s in x["per_seed"]] == [str(out / f"rl-{level}-grpo"), str(out / f"rl-{level}-grpo-seed3")]
        assert 0 <= x["success_before"] <= 1 and 0 <= x["success_after"] <= 1
        assert x["success_after"] == sum(s["success_after"] for s in x["per_seed"]) / 2
    assert "RL latent / token: held-out success, greedy" in table2 and "(2 seeds: mean [range after])" in table2
    for kind, starts in (("proxy", ("fta-i", "sft")), ("format", ("bc", "base"))):   # reward hacking; the format
        for level, start in zip(("latent", "token"), starts):
            cfg = json.loads((out / f"rl-{level}-{kind}-seed3/config.json").read_text())
            assert cfg["init"] == str(out / start / "final") and cfg["seed"] == 3
            assert (cfg["reward"], cfg["kl_coef"]) == (("proxy", 0.0) if kind == "proxy" else ("task", 1e-3))
    assert set(res2["rl_proxy"]["token"]) >= {"sampled_proxy_before", "sampled_format_after", "judge_nll_after"}
    assert len(res2["rl_format"]["latent"]["steps_to_format"]) == 2
    assert "reward hacking, latent / token: sampled well-formed" in table2 and "format: first step with" in table2
    d = res2["diversity"]                                                   # QD: 2 Stage A seeds, 2 RL seeds
    assert set(d["stage_a"]) == {"random latent actions", "base token sampling", "random tokens"}
    assert all(len(v) == 2 and all(x > 0 for x in v) for v in [*d["stage_a"].values(), *d["responses"].values()])
    assert set(d["responses"]) == {"latent before RL", "latent after RL", "token before RL", "token after RL",
                                   "random latent actions"} and "QD of the answers: token before" in table2
    assert set(res2["search"]) == {"greedy", "bon", "mcts", "token-greedy", "token-bon", "token-mcts", "mcts-q"}
    assert json.loads((out / "q-latent/config.json").read_text())["init"] == str(out / "fta-i/final")
    assert all(set(v) == {"20"} and 0 <= v["20"] <= 1 for v in res2["search"].values())
    assert res2["search_setup"]["problems"] == 2 and "matched FLOPs (base positions)" in table2
    assert "matched forward tokens" in table2

    # again: every run finished with the same flags, so nothing trains again and the numbers repeat
    import pipeline
    import rl
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "run_stage", lambda *a: pytest.fail(f"stage {a[0]} reran"))
        mp.setattr(rl, "main", lambda argv: pytest.fail(f"rl.py reran: {argv}"))
        pipeline.main(["--claims", "--scale", "0.001", "--out-dir", str(out), "--stage-seeds", "0,1", "--rl-seeds", "0,3"])
    again = json.loads((out / "results.json").read_text())
    keep = lambda d: {k: v for k, v in d.items() if k not in ("claims_seconds", "reused", "search_setup")}  # noqa: E731
    assert keep(again) == keep(res2) and len(again["reused"]) == 25          # base, 2 x 6 stages, 2 x 2 x 3 RL
    assert again["seconds"] == res["seconds"] and again["claims_seconds"] > 0  # the pipeline's time is kept
    assert "(25 runs read, not rerun)" in (out / "results.md").read_text()
    # a stage whose flags differ reruns, and so does everything that starts from it (here: from the base)
    cfg = json.loads((out / "base/config.json").read_text())
    assert pipeline.finished(out / "base", cfg, export=True) is not None
    assert pipeline.finished(out / "base", {**cfg, "steps": cfg["steps"] + 1}, export=True) is None
    assert pipeline.finished(out / "pretrain-vq", {}, export=True) is None            # the VQ ablation exports none
    assert pipeline.finished(out / "rl-latent-grpo", {}, export=True, step=999) is None
    # a flag added since a run finished (absent from its config.json) counts as its default if it is outside the
    # maths (here --compile), and only that
    old = {k: v for k, v in cfg.items() if k != "compile"}
    (out / "base/config.json").write_text(json.dumps(old))
    assert pipeline.finished(out / "base", cfg, export=True, defaults={"compile": False})
    assert pipeline.finished(out / "base", {**cfg, "compile": True}, export=True, defaults={"compile": False}) is None
    assert pipeline.finished(out / "base", cfg, export=True) is None
    assert pipeline.finished(out / "base", {**cfg, "maths": 1}, export=True, defaults={"maths": 1}) is None
    (out / "base/config.json").write_text(json.dumps(cfg))
    ran = []
    real_finished = pipeline.finished
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "finished", lambda d, *a, **k: None if Path(d).name == "base" else real_finished(d, *a, **k))
        mp.setattr(pipeline, "run_stage", lambda stage, c: ran.append(Path(c.out_dir).name) or  # (not trained again:
                   read_rows(c.out_dir)[-1]["eval"])                                          # its old result)
        mp.setattr(rl, "main", lambda argv: ran.append(Path(argv[argv.index("--out-dir") + 1]).name))
        mp.setattr(pipeline, "run_search", lambda a: None)
        pipeline.main(["--claims", "--scale", "0.001", "--out-dir", str(out), "--stage-seeds", "0", "--rl-seeds", "0"])
    assert ran == ["base", "pretrain", "bc", "fta-i", "fta-p", "sft", "pretrain-vq", "rl-latent-grpo", "rl-token-grpo",
                   "rl-latent-proxy", "rl-token-proxy", "rl-latent-format", "rl-token-format"]
    # a checkpoint rewritten by an earlier command (here: SFT's export) makes what started from it stale
    later = time.time() + 60
    os.utime(out / "sft/final/config.json", (later, later))
    ran.clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "run_stage", lambda stage, c: pytest.fail(f"stage {Path(c.out_dir).name} reran"))
        mp.setattr(rl, "main", lambda argv: ran.append(Path(argv[argv.index("--out-dir") + 1]).name))
        mp.setattr(pipeline, "run_search", lambda a: None)
        pipeline.main(["--claims", "--scale", "0.001", "--out-dir", str(out), "--stage-seeds", "0", "--rl-seeds", "0"])
    assert ran == ["rl-token-grpo", "rl-token-proxy"]                        # the format run starts from the base


def test_pipeline_claims_needs_the_pipeline_first(tmp_path, capsys):
    import pipeline
    with pytest.raises(SystemExit, match=r"--claims: .*results.json not found: run `python pipeline.py --out-dir"):
        pipeline.main(["--claims", "--out-dir", str(tmp_path)])
    (tmp_path / "results.json").write_text("{half")
    with pytest.raises(SystemExit, match=r"--claims: .*results.json is not JSON"):
        pipeline.main(["--claims", "--out-dir", str(tmp_path)])


# ----------------------------------------------------------------------------------------------------------------
# Resume: SIGKILL after a checkpoint, rerun the same command, get the uninterrupted loss curve


def kill_after_step(argv, run_dir: Path, step: int, timeout=120, until=lambda: True) -> None:
    """Start argv, wait until metrics.jsonl has logged `step` (so the checkpoint before it is on disk) and until()
    holds, SIGKILL."""
    run_dir.mkdir(parents=True)
    with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
        proc = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=ENV)
        try:
            deadline = time.monotonic() + timeout
            while not (any(r["step"] >= step for r in step_rows(run_dir)) and until()):
                if proc.poll() is not None:
                    pytest.fail(f"run exited ({proc.returncode}) before step {step}; see {log.name}")
                if time.monotonic() > deadline:
                    pytest.fail(f"no step {step} in {run_dir}/metrics.jsonl after {timeout} s")
                time.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    if proc.returncode != -signal.SIGKILL:
        pytest.fail(f"run finished ({proc.returncode}) before it could be killed: make it longer")


def comparable(rows):
    """Step rows without the wall-clock field."""
    return [{k: v for k, v in r.items() if k != "tok_per_s"} for r in rows]


def resumed_run(argv_ref, argv, ref_dir, run_dir, kill_step):
    """(reference rows, resumed rows, checkpoint the resume started from, rerun stdout)."""
    if not ref_dir.exists():
        run_ok(argv_ref)
    kill_after_step(argv, run_dir, kill_step)
    killed_rows = step_rows(run_dir)
    ck = load_ckpt(run_dir)
    assert ck["step"] < max(r["step"] for r in killed_rows), "nothing logged after the checkpoint: no trim tested"
    p = run_ok(argv)
    assert f"at step {ck['step']}" in p.stdout, p.stdout[-2000:]
    return step_rows(ref_dir), step_rows(run_dir), ck, p.stdout


PRE_N, PRE_EVERY = 12, 4


@pytest.fixture(scope="module")
def pretrain_resume(chain, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume-pretrain")
    args = ["--init", chain / "base/final", "--dtype", "float32", "--steps", PRE_N, "--ckpt-every", PRE_EVERY,
            *LM]
    ref, run = root / "ref", root / "killed"
    out = resumed_run(cmd("pretrain", ref, *args), cmd("pretrain", run, *args), ref, run, PRE_EVERY + 1)
    return (*out, ref, run)


def test_resume_pretrain_same_losses(pretrain_resume):
    """Gumbel noise, data order, AdamW state and model come back: every logged row equals the uninterrupted one."""
    ref_rows, rows, ck, _, _, _ = pretrain_resume
    assert ck["step"] >= PRE_EVERY and ck["step"] % PRE_EVERY == 0
    ref = {r["step"]: r for r in comparable(ref_rows)}
    assert sorted(ref) == list(range(1, PRE_N + 1))
    got = comparable(rows)
    assert [r["step"] for r in got if r["step"] > ck["step"]] == list(range(ck["step"] + 1, PRE_N + 1))
    for r in got:
        assert r == ref[r["step"]], f"step {r['step']}: resumed {r} != uninterrupted {ref[r['step']]}"
    assert [r["ce"] for r in got if r["step"] > ck["step"]] == [ref[s]["ce"] for s in range(ck["step"] + 1,
                                                                                          PRE_N + 1)]


def test_resume_pretrain_same_final_weights(pretrain_resume):
    from safetensors.torch import load_file
    *_, ref, run = pretrain_resume
    a, b = load_file(ref / "final/model.safetensors"), load_file(run / "final/model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_compile_gives_the_eager_losses(chain, tmp_path):
    """--compile (torch.compile of each block; inductor's C++ kernels on a CPU): the chain's base run, same flags,
    logs the eager run's losses (fused kernels round differently: within 1e-5 relative in float32, 2e-3 under bf16
    autocast, which --dtype auto picks on a CPU with native bf16). ~35 CPU-seconds of compiling."""
    out = tmp_path / "compiled"
    run_ok(cmd("base", out, *LM, "--steps", LM_STEPS, "--ckpt-every", 2, "--compile"), timeout=900)
    eager, compiled = step_rows(chain / "base"), step_rows(out)
    assert [r["step"] for r in eager] == [r["step"] for r in compiled] == list(range(1, LM_STEPS + 1))
    rel = 1e-5 if json.loads((out / "config.json").read_text())["dtype"] == "float32" else 2e-3
    for a, b in zip(eager, compiled):
        assert b["loss"] == pytest.approx(a["loss"], rel=rel), (a["step"], a["loss"], b["loss"])


@pytest.mark.parametrize("stage, frozen, trained", [("pretrain", ("base.", "policy."), ("idm.", "merge.")),
                                                     ("bc", ("base.", "idm.", "merge."), ("policy.",)),
                                                     ("vq", ("base.", "policy."), ("idm.", "merge."))])
def test_checkpoints_hold_what_trains(chain, stage, frozen, trained):
    """A DCP checkpoint holds the trained parameters and their AdamW state, not the frozen modules (the resumed run
    rebuilds those from --init): Stage A's has no base or policy tensor."""
    from torch.distributed.checkpoint import FileSystemReader
    ckpt = parallel.latest_checkpoint(chain / stage)
    keys = [k.removeprefix("model.model.") for k in FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
            if k.startswith("model.")]
    assert keys and not [k for k in keys if k.startswith(frozen)], keys
    assert all(any(k.startswith(t) for k in keys) for t in trained), keys


def test_resume_after_async_save_same_losses(pretrain_resume, chain, tmp_path):
    """--async-save writes the checkpoint in a background thread and completes it (train.json) once written: a run
    killed after that resumes from it and logs the uninterrupted run's rows."""
    ref_rows, *_, ref, _ = pretrain_resume
    run = tmp_path / "async"
    argv = cmd("pretrain", run, "--init", chain / "base/final", "--dtype", "float32", "--steps", PRE_N,
               "--ckpt-every", PRE_EVERY, *LM, "--async-save")
    kill_after_step(argv, run, PRE_EVERY + 1, until=lambda: parallel.latest_checkpoint(run) is not None)
    ck = load_ckpt(run)
    assert ck["step"] == PRE_EVERY and ck["config"]["async_save"] is True
    p = run_ok(argv)
    assert f"at step {PRE_EVERY}" in p.stdout, p.stdout[-2000:]
    assert comparable(step_rows(run)) == comparable(ref_rows)
    assert [d.name for d in parallel.complete_checkpoints(run)] == ["step-0000008", "step-0000012"]


def test_resume_pretrain_every_step_logged_once(pretrain_resume):
    _, rows, ck, _, _, _ = pretrain_resume
    assert [r["step"] for r in rows] == list(range(1, PRE_N + 1)), f"resumed from step {ck['step']}"


FTA_N = 4          # steps per phase: phase 1 (base under IDM actions) = steps 1..4, phase 2 (policy BC) = 5..8


@pytest.fixture(scope="module")
def fta_resume(chain, task, tmp_path_factory):
    """Two kills, one reference: killed inside phase 1 (--ckpt-every 2, resumes from step 2 with phase-1 AdamW
    state) and right after the boundary checkpoint (--ckpt-every FTA_N, resumes at step 4 = start of phase 2). The
    reference uses --ckpt-every FTA_N; checkpoint frequency does not enter the maths."""
    root = tmp_path_factory.mktemp("resume-fta-i")
    base = ["--init", chain / "bc/final", "--dtype", "float32", "--steps", FTA_N, *task]
    ref = root / "ref"
    argv_ref = cmd("fta-i", ref, *base, "--ckpt-every", FTA_N)
    inside = resumed_run(argv_ref, cmd("fta-i", root / "inside", *base, "--ckpt-every", 2), ref, root / "inside", 3)
    boundary = resumed_run(argv_ref, cmd("fta-i", root / "boundary", *base, "--ckpt-every", FTA_N), ref,
                           root / "boundary", FTA_N + 1)
    return {"inside": inside, "boundary": boundary}


def _check_fta(out, where):
    ref_rows, rows, ck, _ = out
    if where == "inside":
        assert ck["step"] < FTA_N and ck["phase"] == 0 and ck["has_optim"], \
            f"kill landed at checkpoint step {ck['step']}, not inside phase 1"
    else:
        assert ck["step"] == FTA_N and ck["phase"] == 1 and not ck["has_optim"], \
            f"kill landed at checkpoint step {ck['step']}, not at the phase boundary"
    ref = {r["step"]: r for r in comparable(ref_rows)}
    assert sorted(ref) == list(range(1, 2 * FTA_N + 1))
    got = comparable(rows)
    assert [r["step"] for r in got if r["step"] > ck["step"]] == list(range(ck["step"] + 1, 2 * FTA_N + 1))
    for r in got:
        assert r == ref[r["step"]], f"step {r['step']}: resumed {r} != uninterrupted {ref[r['step']]}"
    return rows


@pytest.mark.parametrize("where", ["inside", "boundary"])
def test_resume_fta_i_same_losses(fta_resume, where):
    _check_fta(fta_resume[where], where)


@pytest.mark.parametrize("where", ["inside", "boundary"])
def test_resume_fta_i_every_step_logged_once(fta_resume, where):
    rows = fta_resume[where][1]
    assert [r["step"] for r in rows] == list(range(1, 2 * FTA_N + 1))


# ----------------------------------------------------------------------------------------------------------------
# Crash safety


def test_crash_while_writing_checkpoint_keeps_previous(tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp
    net = parallel.Root(torch.nn.Linear(8, 4, bias=False))
    with torch.no_grad():
        net.model.weight.copy_(torch.arange(32.0).view(4, 8))
    parallel.save_checkpoint(tmp_path, net, None, {"step": 1}, parallel.World())
    real = dcp.save

    def broken_save(state, checkpoint_id, **k):    # a disk that fills up halfway through the shards
        Path(checkpoint_id).mkdir(parents=True)
        (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"half a shard")
        raise OSError("No space left on device")
    monkeypatch.setattr(dcp, "save", broken_save)
    with torch.no_grad():
        net.model.weight.zero_()
    with pytest.raises(OSError, match="No space left"):
        parallel.save_checkpoint(tmp_path, net, None, {"step": 2}, parallel.World())
    monkeypatch.setattr(dcp, "save", real)
    assert load_ckpt(tmp_path)["step"] == 1                 # the half-written step-2 is not "complete"
    parallel.load_checkpoint(parallel.latest_checkpoint(tmp_path), net)
    assert torch.equal(net.model.weight, torch.arange(32.0).view(4, 8))
    parallel.remove_incomplete_checkpoints(tmp_path)        # what the next run does first
    assert [d.name for d in parallel.checkpoint_dirs(tmp_path)] == ["step-0000001"]
    assert not list(tmp_path.rglob(".*.tmp*")), "a temporary file was left behind"


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)                        # the embedded corpus cache is data/cache under the cwd
    real, calls = train.base_loss, []

    def nan_on_third(model, b):          # the third training call (evaluation runs it without gradient too)
        loss, m = real(model, b)
        calls.extend([1] if torch.is_grad_enabled() else [])
        return (loss * float("nan"), m) if len(calls) == 3 else (loss, m)
    monkeypatch.setattr(train, "base_loss", nan_on_third)
    out = tmp_path / "base"
    with pytest.raises(SystemExit) as e:
        train.main(["--stage", "base", "--out-dir", str(out), "--steps", "6", "--ckpt-every", "1", "--log-every",
                    "1", "--seq-len", "32", "--micro-batch", "2", "--global-batch", "2", "--eval-batches", "1"])
    msg = str(e.value.code)
    assert "loss is nan at step 2" in msg and "step 2) is kept" in msg, msg
    assert load_ckpt(out)["step"] == 2
    assert [r["step"] for r in read_rows(out)] == [1, 2]
    assert not (out / "final").exists()


# ----------------------------------------------------------------------------------------------------------------
# --dtype auto: bf16 only where the hardware computes it (simulated both ways, whatever this CPU has)


@pytest.mark.parametrize("native", [False, True], ids=["no-native-bf16", "native-bf16"])
def test_dtype_auto_follows_the_hardware(native, monkeypatch, capsys):
    import qnet
    import rl
    monkeypatch.setattr(trainer, "native_bf16", lambda kind: native)
    monkeypatch.setattr(trainer, "_warned", [])                       # the warning is said once per process
    want = "bfloat16" if native else "float32"
    assert trainer.resolve_dtype("auto", "cpu") == want and trainer.resolve_dtype("float32", "cpu") == "float32"
    assert capsys.readouterr().out == ""
    assert trainer.resolve_dtype("bfloat16", "cpu") == "bfloat16"      # explicit bf16 still runs ...
    warned = capsys.readouterr().out                                  # ... with one line where it is emulated
    assert (warned.count("\n"), "--dtype bfloat16" in warned) == ((0, False) if native else (1, True)), warned
    assert trainer.resolve_dtype("bfloat16", "cpu") == "bfloat16" and capsys.readouterr().out == ""     # not again
    assert train.parse_args(["--stage", "base"])[1].dtype == want     # every script's default is auto
    assert pipeline.parse_pipeline_args([]).dtype == want
    assert train.parse_args(["--stage", "base", "--dtype", "float32"])[1].dtype == "float32"
    init = ["--init", str(REPO)]                                     # any directory: parsing reads no model
    assert rl.parse_args(init + ["--judge", "none"]).dtype == want
    assert qnet.parse_q_args(init).dtype == want
    with pytest.raises(SystemExit, match="--dtype 'fp16': expected one of auto, bfloat16, float32"):
        train.parse_args(["--stage", "base", "--dtype", "fp16"])


def test_dtype_auto_without_native_bf16_trains_in_float32_and_says_so(tmp_path, monkeypatch, capsys):
    """A run on a CPU without native bf16 (simulated): config.json holds the resolved float32, not "auto", and the
    machine that decided it; the run prints the line; the model computes in float32 (no bf16 frozen copy)."""
    monkeypatch.chdir(REPO)                        # the embedded corpus cache is data/cache under the cwd
    monkeypatch.setattr(trainer, "native_bf16", lambda kind: False)
    out = tmp_path / "base"
    train.main(["--stage", "base", "--out-dir", str(out), "--steps", "1", "--seq-len", "16", "--micro-batch", "2",
                "--global-batch", "2", "--eval-batches", "1"])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "float32" and cfg["machine"]["native_bf16"] is False
    assert cfg["machine"]["cpu"] and cfg["machine"]["device"] == "cpu"
    assert "dtype float32 on " in (printed := capsys.readouterr().out) and ", native bf16: no" in printed
    assert json.loads((out / "final/config.json").read_text())["train_history"][-1]["dtype"] == "float32"
    monkeypatch.setattr(trainer, "native_bf16", lambda kind: True)     # the same command on a bf16 machine
    with pytest.raises(SystemExit, match="was written with --dtype 'float32', this run has 'bfloat16' \\(--dtype auto "
                                         "records .* pass --dtype float32 to continue it\\)"):
        train.main(["--stage", "base", "--out-dir", str(out), "--steps", "1", "--seq-len", "16", "--micro-batch", "2",
                    "--global-batch", "2", "--eval-batches", "1"])


# ----------------------------------------------------------------------------------------------------------------
# Errors a user can make: each stops with a message that names the mistake


def exit_message(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        train.main([str(a) for a in argv])
    code = e.value.code
    return capsys.readouterr().err if isinstance(code, int) else str(code)


@pytest.mark.parametrize("stage", train.STAGES)
def test_help_of_every_stage(stage, capsys):
    """--help lists every flag with its default (a % in a help text once broke argparse's formatting)."""
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--stage", stage, "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--global-batch" in out and "--stop-at" in out and "(default" in out


def test_large_presets_checkpoint_activations_where_the_base_trains():
    """At 8B, fta-i / fta-p / sft need activation checkpointing to fit 80 GB (tools/bench.py --memory-plan)."""
    for stage in train.STAGES:
        init = [] if stage == "base" else ["--init", "somewhere"]
        _, cfg = train.parse_args(["--stage", stage, "--preset", "llama-3.1-8b", *init])
        assert cfg.activation_checkpointing == (stage in ("fta-i", "fta-p", "sft")), stage
        _, cfg = train.parse_args(["--stage", stage, *init])
        assert not cfg.activation_checkpointing, stage


def test_default_init_and_micro_batch_follow_the_users_command(tmp_path, monkeypatch, capsys):
    """`python train.py --stage pretrain` alone starts from runs/base/final (tiny preset); the micro batch the user
    did not set follows the global batch and the world size, one they set is kept (and checked)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs/base/final").mkdir(parents=True)
    _, cfg = train.parse_args(["--stage", "pretrain"])
    assert cfg.init == "runs/base/final" and cfg.micro_batch == 8 and cfg.global_batch == 8
    two = parallel.World(rank=0, size=2, launched=True)
    assert train.parse_args(["--stage", "base"], two)[1].micro_batch == 4            # 8 / 2 processes
    assert train.parse_args(["--stage", "base", "--global-batch", "12"], two)[1].micro_batch == 6
    _, cfg = train.parse_args(["--stage", "base", "--micro-batch", "8"], two)
    assert cfg.micro_batch == 8
    with pytest.raises(SystemExit, match="--global-batch 8 is not a positive multiple of --micro-batch 8 x 2"):
        train.check_flags("base", cfg, two)
    msg = exit_message(["--stage", "bc"], capsys)
    assert msg == ("stage bc starts from runs/pretrain/final, which does not exist: run `python train.py --stage "
                   "pretrain` first, or pass --init DIR"), msg
    msg = exit_message(["--stage", "bc", "--preset", "llama-3.1-8b"], capsys)
    assert "--init is required for stage bc at --preset llama-3.1-8b" in msg, msg


def test_help_without_a_stage_lists_the_stages(capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and all(s in out for s in train.STAGES + ["pipeline"]), out


def test_error_unknown_stage(capsys):
    msg = exit_message(["--stage", "nope"], capsys)
    assert "invalid choice: 'nope'" in msg and all(s in msg for s in train.STAGES + ["pipeline"]), msg


def test_error_missing_stage(capsys):
    msg = exit_message(["--steps", "3"], capsys)
    assert "--stage is required" in msg and "fta-i" in msg, msg


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)


def _bad(tmp_path, chain):
    """name -> (argv, expected text). Tiny shapes so the few that get as far as the data stay fast."""
    small = ["--seq-len", "32", "--micro-batch", "2", "--global-batch", "2", "--eval-batches", "1", "--steps", "2"]
    empty = tmp_path / "empty"
    empty.mkdir()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    shutil.copytree(chain / "pretrain/checkpoints", foreign / "checkpoints")
    return {
        "init from the wrong stage": (["--stage", "bc", "--init", chain / "base/final"], "written by stage 'base'"),
        "init directory missing": (["--stage", "pretrain", "--init", tmp_path / "nowhere"], "directory not found"),
        "init missing": (["--stage", "pretrain"], "run `python train.py --stage base` first, or pass --init DIR"),
        "empty data dir": (["--stage", "base", "--data", empty], "no .bin token shards"),
        "seq-len too long": (["--stage", "base", "--seq-len", "600"], "exceed the model's max_seq_len 512"),
        "global batch not a multiple": (["--stage", "base", *small, "--global-batch", "6", "--micro-batch", "4"],
                                        "--global-batch 6 is not a positive multiple of --micro-batch 4"),
        "out dir of another stage": (["--stage", "base", *small, "--out-dir", foreign],
                                     "checkpoint of stage 'pretrain'"),
        "unknown quantizer": (["--stage", "pretrain", "--init", chain / "base/final", "--quantizer", "fsq"],
                              "--quantizer 'fsq': expected direct or vq"),
        "unknown dtype": (["--stage", "base", *small, "--dtype", "float16"],
                          "--dtype 'float16': expected one of auto, bfloat16, float32"),
        "unknown preset": (["--stage", "base", "--preset", "nope"], "--preset 'nope'"),
    }


BAD = ["init from the wrong stage", "init directory missing", "init missing", "empty data dir", "seq-len too long",
       "global batch not a multiple", "out dir of another stage", "unknown quantizer", "unknown dtype",
       "unknown preset"]


@pytest.mark.parametrize("case", BAD)
def test_error_bad_input(case, chain, tmp_path, capsys, in_repo, monkeypatch):
    argv, expected = _bad(tmp_path, chain)[case]
    if case == "init missing":
        monkeypatch.chdir(tmp_path)          # no runs/base/final here: the tiny default --init does not exist
    if "--out-dir" not in argv:
        argv = argv + ["--out-dir", tmp_path / "run"]
    out = Path(argv[argv.index("--out-dir") + 1])
    before = checkpoint_files(out)
    msg = exit_message(argv, capsys)
    assert expected in msg, msg
    if case == "out dir of another stage":
        assert "use another --out-dir" in msg
    assert not (out / "metrics.jsonl").exists(), "an invalid run logged metrics"
    assert checkpoint_files(out) == before


def test_error_foreign_out_dir_left_untouched(chain, tmp_path, capsys, in_repo):
    foreign = tmp_path / "foreign"
    shutil.copytree(chain / "pretrain", foreign)
    before = {str(p): p.read_bytes() for p in foreign.rglob("*") if p.is_file()}
    msg = exit_message(["--stage", "base", "--out-dir", foreign, "--seq-len", "32", "--micro-batch", "2",
                        "--global-batch", "2", "--eval-batches", "1"], capsys)
    assert "checkpoint of stage 'pretrain'" in msg
    assert {str(p): p.read_bytes() for p in foreign.rglob("*") if p.is_file()} == before


def test_error_batch_flags_checked_before_work(tmp_path, capsys, in_repo, monkeypatch):
    def no_eval(*a, **k):
        raise AssertionError("evaluate() ran before the batch flags were validated")
    monkeypatch.setattr(trainer.Run, "evaluate", no_eval)
    msg = exit_message(["--stage", "base", "--out-dir", tmp_path / "run", "--global-batch", "6", "--micro-batch",
                        "4", "--seq-len", "32", "--eval-batches", "1"], capsys)
    assert "not a positive multiple of --micro-batch" in msg


# ----------------------------------------------------------------------------------------------------------------
# Unit maths


def test_lr_at_warmup_and_cosine():
    lr_at = lambda s: trainer.lr_at(s, 1e-3, 1e-4, 10, 100)     # noqa: E731
    assert lr_at(0) == pytest.approx(1e-3 / 10)
    assert lr_at(9) == pytest.approx(1e-3)            # warmup reaches lr on its last step
    assert lr_at(10) == pytest.approx(1e-3)           # cosine starts at lr
    assert lr_at(55) == pytest.approx((1e-3 + 1e-4) / 2)   # half way down
    assert lr_at(100) == pytest.approx(1e-4)
    assert lr_at(250) == pytest.approx(1e-4)          # stays at the floor
    warm = [lr_at(s) for s in range(10)]
    assert warm == sorted(warm)
    decay = [lr_at(s) for s in range(10, 101)]
    assert decay == sorted(decay, reverse=True)
    assert trainer.warmup_steps(train.FinetuneArgs(), 200) == 6     # -1: 3% of the phase's steps
    assert trainer.warmup_steps(train.FinetuneArgs(), 5) == 1


def test_masked_ce_matches_hand_computation():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]], [[0.5, 0.0], [0.0, 0.0], [3.0, -1.0]]])
    targets = torch.tensor([[0, 1, 0], [1, 0, 0]])
    mask = torch.tensor([[True, False, True], [False, True, True]])
    ce = [[-math.log(math.exp(2) / (math.exp(2) + 1)), -math.log(math.e / (math.e + 1)), math.log(2)],
          [-math.log(1 / (math.exp(0.5) + 1)), math.log(2), -math.log(math.exp(3) / (math.exp(3) + math.exp(-1)))]]
    want = (ce[0][0] + ce[0][2] + ce[1][1] + ce[1][2]) / 4
    assert infra_ce.masked_ce(logits, targets, mask).item() == pytest.approx(want, rel=1e-5)
    assert infra_ce.masked_ce(logits, targets, torch.ones(2, 3, dtype=torch.bool)).item() == \
        pytest.approx(sum(map(sum, ce)) / 6, rel=1e-5)
    assert infra_ce.masked_ce(logits, targets, torch.zeros(2, 3, dtype=torch.bool)).item() == 0.0   # no NaN


@pytest.fixture(scope="module")
def tiny_cola():
    torch.manual_seed(0)
    m = cola.CoLA(model_py.PRESETS["tiny"], cola.COLA_PRESETS["tiny"])
    m.init_weights()
    return m.train()


def test_make_optimizer_codebook_alone_without_weight_decay(tiny_cola):
    g = tiny_cola.param_groups()
    cfg = train.PretrainArgs(weight_decay=0.05)
    opt = trainer.make_optimizer(g, ["idm", "codebook", "merge"], cfg)
    wd = {pg["weight_decay"]: [id(p) for p in pg["params"]] for pg in opt.param_groups}
    assert sorted(wd) == [0.0, 0.05]
    assert wd[0.0] == [id(tiny_cola.codebook.weight)]
    assert set(wd[0.05]) == {id(p) for p in g["idm"] + g["merge"]} and len(wd[0.05]) == len(g["idm"] + g["merge"])
    # without the codebook: one group, all decayed
    opt = trainer.make_optimizer(g, ["policy"], cfg)
    assert [pg["weight_decay"] for pg in opt.param_groups] == [0.05]
    assert len(opt.param_groups[0]["params"]) == len(g["policy"])


# The optimizer each stage builds at each preset: the paper's fine-tuning betas (0.9, 0.95), the release's AdamW
# defaults (0.9, 0.999) in pre-training (Stage A, Stage B), weight decay 0.01 in pre-training and 0 in fine-tuning.
OPTIMIZER = {"base": (0.9, 0.95, 0.01), "pretrain": (0.9, 0.999, 0.01), "bc": (0.9, 0.999, 0.01),
             "fta-i": (0.9, 0.95, 0.0), "fta-p": (0.9, 0.95, 0.0), "sft": (0.9, 0.95, 0.0)}


@pytest.mark.parametrize("preset", ["tiny", "llama-3.1-8b"])
def test_optimizer_betas_and_weight_decay_per_stage_and_preset(preset, tiny_cola):
    for stage, (b1, b2, wd) in OPTIMIZER.items():
        if stage == "base" and preset != "tiny":
            continue
        init = [] if stage == "base" else ["--init", "somewhere"]
        _, cfg = train.parse_args(["--stage", stage, "--preset", preset, *init])
        opt = trainer.make_optimizer(tiny_cola.param_groups(), ["idm", "codebook"], cfg)
        assert opt.param_groups[0]["betas"] == (b1, b2), (stage, preset)
        assert opt.param_groups[0]["weight_decay"] == wd, (stage, preset)
        assert opt.param_groups[1]["weight_decay"] == 0.0                  # the codebook C, always
    _, cfg = train.parse_args(["--stage", "fta-p", "--preset", "llama-3.1-8b", "--init", "somewhere"])
    assert cfg.base_grad == "subtracted"                                  # the release's FTA-P at 8B


def only(model, params):
    """requires_grad on exactly these parameters."""
    keep = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


def batch(x, mask=None):
    return Batch(x, torch.ones_like(x, dtype=torch.bool) if mask is None else mask, torch.arange(len(x)))


def grads_of(model, b, loss_fn, trainable):
    only(model, trainable)
    model.zero_grad(set_to_none=True)
    loss, _ = loss_fn(model, b)
    loss.backward()
    g = model.param_groups()
    return {name: [p.grad for p in ps] for name, ps in g.items()}


def _has(grads):
    return all(gr is not None for gr in grads) and any(gr.abs().sum() > 0 for gr in grads)


def _none(grads):
    return all(gr is None for gr in grads)


def test_pretrain_loss_trains_idm_codebook_merge_only(tiny_cola):
    torch.manual_seed(1)
    b = batch(torch.randint(0, 512, (2, 17)))
    g = tiny_cola.param_groups()
    fn = lambda m, b: train.pretrain_loss(m, b, 2.0, 0.001, 0)                          # noqa: E731
    grads = grads_of(tiny_cola, b, fn, g["idm"] + g["codebook"] + g["merge"])       # as Stage A trains
    assert _has(grads["idm"]) and _has(grads["codebook"]) and _has(grads["merge"])
    assert _none(grads["base"]) and _none(grads["policy"])
    # even with everything trainable the base's embeddings and blocks get nothing (h = sg(base(x)) in the loss);
    # only Norm_f and W_lm, which the world model reuses on top of the merge module, would
    only(tiny_cola, list(tiny_cola.parameters()))
    tiny_cola.zero_grad(set_to_none=True)
    fn(tiny_cola, b)[0].backward()
    got = sorted(n for n, p in tiny_cola.base.named_parameters() if p.grad is not None)
    assert got == ["norm.weight", "output.weight"]
    assert all(p.grad is None for p in tiny_cola.policy.parameters())
    only(tiny_cola, list(tiny_cola.parameters()))


def test_bc_loss_trains_policy_only(tiny_cola):
    torch.manual_seed(2)
    b = batch(torch.randint(0, 512, (2, 17)))
    g = tiny_cola.param_groups()
    grads = grads_of(tiny_cola, b, train.bc_loss, g["policy"])
    assert _has(grads["policy"]) and _none(grads["idm"]) and _none(grads["base"])
    grads = grads_of(tiny_cola, b, train.bc_loss, list(tiny_cola.parameters()))     # labels and h under no_grad
    assert _has(grads["policy"])
    for name in ("idm", "base", "codebook", "merge"):
        assert _none(grads[name]), name
    only(tiny_cola, list(tiny_cola.parameters()))


def _response_batch():
    torch.manual_seed(3)
    x = torch.randint(0, 512, (2, 17))
    mask = torch.zeros(2, 17, dtype=torch.bool)
    mask[:, 9:] = True
    return batch(x, mask)


def test_fta_losses_train_the_base(tiny_cola):
    b = _response_batch()
    g = tiny_cola.param_groups()
    grads = grads_of(tiny_cola, b, train.fta_i_loss, g["base"])                        # FTA-I phase 1
    assert _has(grads["base"]) and _none(grads["idm"]) and _none(grads["policy"])
    for base_grad in ("subtracted", "merge"):
        grads = grads_of(tiny_cola, b, lambda m, b: train.fta_p_loss(m, b, base_grad), list(tiny_cola.parameters()))
        assert _has(grads["base"]) and _none(grads["policy"])    # greedy actions: no gradient through pi
    only(tiny_cola, list(tiny_cola.parameters()))


def test_losses_count_exactly_the_response_targets(tiny_cola):
    """Each loss averages the CE of the targets x_j whose mask[j] is True, predicted from position j - 1: checked
    against a by-hand loop over positions (a mask shifted by one gives another number)."""
    b = _response_batch()
    b.mask[0, 12] = False                                  # holes, so mask[:, 1:] and mask[:, :-1] differ
    b.mask[1, 3] = True
    x = b.tokens
    with torch.no_grad():
        h = tiny_cola.hidden(x)
        k = tiny_cola.idm_labels(h)                                            # [B, T]
        a = tiny_cola.policy_logits(h[:, :-1]).argmax(-1)                      # [B, T]
        logits = {"sft": tiny_cola.base.output(h[:, :-1]), "fta-i": tiny_cola.world_logits(h[:, :-1], k),
                  "fta-p": tiny_cola.world_logits(h[:, :-1], a), "bc": tiny_cola.policy_logits(h[:, :-1])}
    targets = {"sft": x, "fta-i": x, "fta-p": x, "bc": torch.cat([x[:, :1], k], 1)}   # target of position j - 1 at j

    def by_hand(name):
        ces = [F.cross_entropy(logits[name][i, j - 1][None], targets[name][i, j][None]).item()
               for i in range(x.shape[0]) for j in range(1, x.shape[1]) if b.mask[i, j]]
        return sum(ces) / len(ces)
    with torch.no_grad():
        got = {"sft": train.base_loss(tiny_cola.base, b)[0], "fta-i": train.fta_i_loss(tiny_cola, b)[0],
               "fta-p": train.fta_p_loss(tiny_cola, b, "subtracted")[0], "bc": train.bc_loss(tiny_cola, b)[0]}
    for name, loss in got.items():
        assert loss.item() == pytest.approx(by_hand(name), rel=1e-5), name


def test_bc_accuracy_counts_the_response_targets_only(tiny_cola, monkeypatch):
    """bc_loss's logged accuracy (argmax pi == k*) is over the masked targets: a policy right at every other position
    and wrong elsewhere, against the share of those positions among the masked ones only."""
    b = _response_batch()
    b.mask[0, 12] = False
    m = b.mask[:, 1:]
    with torch.no_grad():
        k = tiny_cola.idm_labels(tiny_cola.hidden(b.tokens))                   # [B, T]
    right = torch.zeros_like(m)
    right[:, ::3] = True
    want = torch.where(right, k, (k + 1) % tiny_cola.args.n_actions)                 # [B, T]
    K = tiny_cola.args.n_actions
    monkeypatch.setattr(tiny_cola, "policy_logits", lambda h, start_pos=0: 10.0 * F.one_hot(want, K).float())
    with torch.no_grad():
        acc = float(train.bc_loss(tiny_cola, b)[1]["acc"])
    assert acc == pytest.approx(right[m].float().mean().item()) and acc != pytest.approx(right.float().mean().item())


def test_fta_i_gradient_does_not_pass_through_the_idm(tiny_cola):
    """The release computes FTA-I's actions under no gradient: the base's gradient is exactly that of the world
    model's CE with the IDM's argmax actions held fixed (no straight-through path back through the frozen IDM)."""
    b = _response_batch()
    only(tiny_cola, tiny_cola.param_groups()["base"])
    with torch.no_grad():
        k = tiny_cola.idm_labels(tiny_cola.hidden(b.tokens))
    tiny_cola.zero_grad(set_to_none=True)
    h = tiny_cola.hidden(b.tokens)
    infra_ce.masked_ce(tiny_cola.world_logits(h[:, :-1], k), b.tokens[:, 1:], b.mask[:, 1:]).backward()
    want = [p.grad.clone() for p in tiny_cola.base.parameters()]
    tiny_cola.zero_grad(set_to_none=True)
    train.fta_i_loss(tiny_cola, b)[0].backward()
    for p, w in zip(tiny_cola.base.parameters(), want):
        assert torch.equal(p.grad, w)
    # and the IDM's weights would get nothing even if they were trainable
    grads = grads_of(tiny_cola, b, train.fta_i_loss, list(tiny_cola.parameters()))
    assert _none(grads["idm"]) and _none(grads["policy"])
    only(tiny_cola, list(tiny_cola.parameters()))


def test_fta_p_base_grad_chooses_the_side_of_the_difference(tiny_cola):
    """W_lm(Norm_f(s_2) - h_t): 'subtracted' trains the base through -h_t only (release), 'merge' through s_0 = h_t
    only. Same loss value; the gradient of h differs, and each equals its own autograd-by-hand version."""
    b = _response_batch()
    x, m = b.tokens, b.mask[:, 1:]
    only(tiny_cola, tiny_cola.param_groups()["base"])
    with torch.no_grad():
        h = tiny_cola.hidden(x)[:, :-1]
        a = tiny_cola.policy_logits(h).argmax(-1)
        e = torch.nn.functional.embedding(a, tiny_cola.codebook.weight.t())
    grads, losses = {}, {}
    for mode in ("subtracted", "merge"):
        hh = h.clone().requires_grad_(True)
        loss = infra_ce.masked_ce(tiny_cola.world_logits(hh, a, mode), x[:, 1:], m)
        grads[mode], losses[mode] = torch.autograd.grad(loss, hh)[0], loss.item()
        s2 = tiny_cola.merge(hh, e)
        by_hand = (tiny_cola.base.norm(s2).detach() - hh) if mode == "subtracted" else \
            (tiny_cola.base.norm(s2) - hh.detach())
        want = torch.autograd.grad(infra_ce.masked_ce(tiny_cola.base.output(by_hand), x[:, 1:], m), hh)[0]
        assert torch.allclose(grads[mode], want, atol=1e-7), mode
    assert losses["subtracted"] == losses["merge"]
    assert not torch.allclose(grads["subtracted"], grads["merge"])
    only(tiny_cola, list(tiny_cola.parameters()))


def test_activation_checkpointing_same_loss_and_grads():
    """Recomputing blocks in backward changes memory, not maths: same loss, same gradients, same parameter names."""
    import copy
    torch.manual_seed(0)
    m = model_py.Transformer(model_py.ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64,
                                                multiple_of=16, max_seq_len=64))
    m.init_weights()
    ac = copy.deepcopy(m)
    calls = []
    ff = ac.layers[0].feed_forward        # count calls (forward hooks do not fire during recomputation)
    ff_forward = ff.forward
    ff.forward = lambda *a, **k: (calls.append(1), ff_forward(*a, **k))[1]
    trainer.enable_activation_checkpointing(ac.layers)
    x = torch.randint(0, 64, (2, 17))
    (l1, _), (l2, _) = train.base_loss(m, batch(x)), train.base_loss(ac, batch(x))
    l1.backward()
    assert len(calls) == 1
    l2.backward()
    assert len(calls) == 2, "the block was not recomputed in backward"
    assert torch.equal(l1, l2)
    assert list(m.state_dict()) == list(ac.state_dict())
    for (n, p), (_, q) in zip(m.named_parameters(), ac.named_parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), n


def test_set_trainable_names_groups(tiny_cola):
    """requires_grad is set once per run, to the union of its phases' parameter groups (FSDP reads it once)."""
    for names in ({"idm", "codebook", "merge"}, {"policy"}, {"base", "policy"}, {"base"}):
        trainer.set_trainable(tiny_cola, names)
        for name, ps in tiny_cola.param_groups().items():
            assert all(p.requires_grad == (name in names) for p in ps), (names, name)
    only(tiny_cola, list(tiny_cola.parameters()))


def test_gumbel_noise_belongs_to_the_row_not_the_batch():
    """A sequence gets the same noise in any micro batch, on any rank: it is seeded by its data-stream position."""
    a = train.row_uniforms([5, 9], (3, 4), seed=1, device="cpu")
    b = train.row_uniforms([9], (3, 4), seed=1, device="cpu")
    assert a.shape == (2, 3, 4) and torch.equal(a[1], b[0]) and not torch.equal(a[0], a[1])
    assert not torch.equal(train.row_uniforms([9], (3, 4), seed=2, device="cpu")[0], b[0])
    assert 0 <= a.min() and a.max() < 1


# ----------------------------------------------------------------------------------------------------------------
# The chunked loss over the vocabulary (lm_head_ce)


def _head_problem(dtype=torch.float32, n=(3, 37), d=16, v=101, seed=0):
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(d, v, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(v, d, generator=g))
    s = torch.randn(*n, d, generator=g, dtype=dtype).requires_grad_()
    y = torch.randint(0, v, n, generator=g)
    m = torch.rand(n, generator=g) < 0.7
    return head, s, y, m


def _loss_and_grads(fn, g: float = 1.0):
    head, s, y, m = _head_problem()
    loss = fn(head, s, y, m)
    (g * loss).backward()                       # g != 1: the backward must scale by the incoming gradient
    return loss.detach(), s.grad, head.weight.grad


@pytest.mark.parametrize("chunk", [1, 7, 64, 110])
def test_chunked_ce_equals_unchunked_values_and_grads(chunk):
    """Every chunk size (one row, uneven, one chunk for all 111 positions) gives masked_ce(head(s))'s loss and the
    gradients of both s and W, float32, under an incoming gradient of 2.5 (a weighted sum of losses)."""
    want = _loss_and_grads(lambda h, s, y, m: infra_ce.masked_ce(h(s), y, m), 2.5)
    got = _loss_and_grads(lambda h, s, y, m: infra_ce.lm_head_ce(h, s, y, m, chunk=chunk), 2.5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_chunked_ce_under_bf16_autocast_matches_the_plain_path():
    """Under bf16 autocast both run the projection in bf16 and the softmax in float32: equal within bf16 rounding."""
    def run(fn):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _loss_and_grads(fn)
    want = run(lambda h, s, y, m: infra_ce.masked_ce(h(s), y, m))
    got = run(lambda h, s, y, m: infra_ce.lm_head_ce(h, s, y, m, chunk=5))
    assert got[0].dtype == torch.float32
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4)
    for a, b in zip(got[1:], want[1:]):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


def test_chunked_ce_frozen_head_gets_no_gradient_and_no_mask_counts_nothing():
    head, s, y, m = _head_problem()
    head.weight.requires_grad_(False)
    infra_ce.lm_head_ce(head, s, y, m, chunk=4).backward()
    assert head.weight.grad is None and s.grad is not None
    empty = infra_ce.lm_head_ce(head, s, y, torch.zeros_like(m), chunk=4)
    assert empty.item() == 0.0


def test_chunked_ce_peak_memory_is_bounded_at_8b_shapes():
    """At the 8B vocabulary and a 4 x 2048 micro batch (fake tensors: shapes only), the plain loss holds the whole
    [8192, 128256] logits several times over; the chunked one about one chunk's worth beyond its inputs and W's
    float32 gradient accumulator."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker
    V, D, B, T = 128_256, 4096, 4, 2048

    def peak(fn):
        with FakeTensorMode():
            head = torch.nn.Linear(D, V, bias=False, dtype=torch.bfloat16)
            s = torch.randn(B, T, D, dtype=torch.bfloat16, requires_grad=True)
            y, m = torch.zeros(B, T, dtype=torch.long), torch.ones(B, T, dtype=torch.bool)
            tracker = MemTracker()
            with tracker:
                fn(head, s, y, m).backward()
            return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    G = 2**30
    inputs = (V * D * 2 * 2 + B * T * D * 2 * 2)                  # W and its gradient, s and its gradient (bf16)
    plain = peak(lambda h, s, y, m: infra_ce.masked_ce(h(s), y, m))
    chunked = peak(lambda h, s, y, m: infra_ce.lm_head_ce(h, s, y, m))
    assert plain - inputs > 10 * G                                # logits bf16 + float32 + softmax: > 10 GiB
    extra = chunked - inputs
    assert extra < infra_ce.CE_CHUNK_BYTES + V * D * 4 + 0.25 * G, extra / G   # one chunk + dW (float32)
