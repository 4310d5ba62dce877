"""tools/gpucheck.py, the one-command GPU check, in its --dry-run mode on the CPU: every part runs (tiny shapes, a
torchrun of base -> pretrain with --async-save) and its JSON has what the GPU run reports, so the command cannot
rot between the sessions that have a GPU. ~40 CPU-seconds.

    python -m pytest -q tests/test_gpucheck.py
"""
import json

import pytest

from cola import COLA_PRESETS
from model import PRESETS
from tools import gpucheck


def test_dry_run_writes_every_part(tmp_path, capsys):
    out = tmp_path / "sub/gpucheck.json"
    r = gpucheck.main(["--dry-run", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(r))
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("gpucheck on ") and "Stage A" in line and "torchrun base->pretrain ok" in line, line
    assert all(r["attention"][d] and all(k.startswith("_scaled_dot_product") for k in r["attention"][d])
               for d in ("bfloat16", "float32")), r["attention"]
    assert r["logits"]["argmax_agree"] > 0.9 and 0 < r["logits"]["max_abs"] < 0.5
    assert r["loss"]["loss_diff"] < 1e-4 and r["loss"]["grad_rel_diff"] < 1e-3          # chunked = plain
    s = r["stage_a"]
    assert s["tokens_per_s"] > 0 and 0 < s["mfu_measured_peak"] < 1 and s["planned_bytes"] > 0
    assert all(r["rl"][k] > 0 for k in ("latent_rollout", "token_rollout", "latent_update", "token_update"))
    assert all(v["rc"] == 0 and v["final"] for v in r["torchrun"].values()) and len(r["torchrun"]) == 2
    assert "gpucheck-tiny" not in PRESETS and "gpucheck-tiny" not in COLA_PRESETS        # tables left as found


@pytest.mark.parametrize("flags, msg", [(["--layers", "0"], "--layers 0: expected 1..32"),
                                        (["--steps", "0"], "--steps 0: expected at least 1"),
                                        (["--device", "cuda"], "--device cuda: no CUDA device"),
                                        (["--out", "/"], "--out /: a directory")])
def test_bad_flags_are_one_line(flags, msg, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        gpucheck.main(["--dry-run", *flags])
    assert msg in str(e.value)
