"""Helper for tests/test_distributed.py, run under torchrun: train one stage exactly as train.py does, recording
every FSDP all-gather of the training steps (evaluations excluded): which unit, in forward or in backward, and
every gradient all-reduce FSDP runs across replica groups (HSDP, --shard-group): ["all-reduce", unit]. Rank 0
writes {phase: [[pass, unit], ...]} as JSON to OUT, then the test checks that backward gathers exactly the units
it computes gradients for, once each, and that HSDP all-reduces once per optimizer step.

    torchrun --standalone --nproc_per_node=2 tests/dist_gathers.py OUT train.py-flags...
"""
import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState  # noqa: E402
from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup  # noqa: E402

import train  # noqa: E402
from infra import trainer  # noqa: E402

record = {"on": True, "phase": None}
gathers: dict[str, list] = {}
unshard = FSDPParamGroup.unshard


def counting_unshard(self, async_op: bool = False):
    """FSDP's unshard, noting the calls that start an all-gather (not those it skips as already gathered)."""
    starts = self._all_gather_result is None and not self.is_unsharded and not (
        not self.unshard_in_backward and self._training_state == TrainingState.PRE_BACKWARD)
    if starts and record["on"]:
        where = "backward" if self._training_state == TrainingState.PRE_BACKWARD else "forward"
        gathers.setdefault(record["phase"], []).append([where, self._module_fqn.removeprefix("model.") or "root"])
    return unshard(self, async_op)


def counting_all_reduce(all_reduce):
    """dist.all_reduce, noting the calls FSDP's gradient reduction makes (foreach_reduce, under HSDP) with the unit
    whose gradients they average; every other all-reduce (the metrics' mean over ranks) passes unrecorded."""
    def wrapped(*a, **k):
        frame = sys._getframe(1)
        if frame.f_code.co_name == "foreach_reduce" and record["on"]:
            while frame is not None and not isinstance(frame.f_locals.get("self"), FSDPParamGroup):
                frame = frame.f_back
            unit = frame.f_locals["self"]._module_fqn.removeprefix("model.") or "root" if frame else "?"
            gathers.setdefault(record["phase"], []).append(["all-reduce", unit])
        return all_reduce(*a, **k)
    return wrapped


def recording_phases(make_optimizer):
    """trainer.make_optimizer runs as each phase starts: from then on, gathers belong to the groups it trains."""
    def wrapped(groups, names, cfg):
        record["phase"] = "+".join(names)
        return make_optimizer(groups, names, cfg)
    return wrapped


def quiet(evaluate):
    def wrapped(*a, **k):
        record["on"] = False
        try:
            return evaluate(*a, **k)
        finally:
            record["on"] = True
    return wrapped


if __name__ == "__main__":
    out, argv = sys.argv[1], sys.argv[2:]
    FSDPParamGroup.unshard = counting_unshard
    dist.all_reduce = counting_all_reduce(dist.all_reduce)
    trainer.make_optimizer = recording_phases(trainer.make_optimizer)
    trainer.Run.evaluate = quiet(trainer.Run.evaluate)
    trainer.Run.export = lambda self, root, result, llama_base=False: self.finish(result)
    train.main(argv)
    if os.environ.get("RANK", "0") == "0":
        Path(out).write_text(json.dumps(gathers))
