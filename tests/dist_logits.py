"""Helper for tests/test_distributed.py, run under torchrun: build the sharded model of stage bc from INIT (a
pretrain export) exactly as train.py does (rank 0 reads, FSDP2 shards the trained policy, the frozen base and IDM
stay whole on every rank, rank 0's tensors are broadcast), then write
the logits of a fixed batch, computed through the sharded model, to OUT (rank 0). Exits non-zero if the policy is not
sharded or the frozen base is.

    torchrun --standalone --nproc_per_node=2 tests/dist_logits.py INIT OUT
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from infra import parallel  # noqa: E402
import train  # noqa: E402
from infra import trainer  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402


def logits(model, x):
    """Every head of CoLA on x [B, T+1]: base LM, world model under IDM actions, policy."""
    h = model.hidden(x)                                                                      # [B, T+1, D]
    k = model.idm_logits(h)[:, 1:].argmax(-1)                                                # [B, T]
    return {"lm": model.base.output(h), "wm": model.world_logits(h[:, :-1], k), "pi": model.policy_logits(h),
            "k": k}


def main(init: str, out: str):
    world = parallel.world_from_env()
    run_dir = str(Path(out).parent / "run")                 # never the repository's runs/
    stage, cfg = train.parse_args(["--stage", "bc", "--init", init, "--dtype", "float32", "--device", "cpu",
                                   "--out-dir", run_dir], world)
    run = trainer.Run(stage, cfg, world, **train.launch(cfg))
    phases = [trainer.Phase("stage-b", ["policy"], train.bc_loss, 1)]
    root = run.build(lambda device: train.load_init(stage, cfg, Tokenizer.find(init, None), device), phases)
    wq = root.model.policy.layers[0].attention.wq.weight                  # trained: sharded
    rows = wq.to_local().shape[0] if hasattr(wq, "to_local") else wq.shape[0]
    if world.size > 1 and rows != -(-wq.shape[0] // world.size):
        raise SystemExit(f"rank {world.rank}: the policy's wq holds {rows} of {wq.shape[0]} rows: not sharded")
    if hasattr(root.model.base.layers[0].attention.wq.weight, "to_local"):  # frozen: whole on every rank
        raise SystemExit(f"rank {world.rank}: the frozen base is sharded; it should be replicated")
    x = torch.randint(0, 512, (2, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        result = root(logits, x)
    if world.main:
        torch.save({k: v.detach().cpu() for k, v in result.items()}, out)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
