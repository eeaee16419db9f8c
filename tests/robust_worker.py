"""Worker for tests/test_robustness.py (no model: a small nn.Linear, so it starts in a second or two).

  save-kill OUT   saves a checkpoint at step 1 (and the parameters of that step to OUT/params_step1.pt), takes a
                  second step, then sends itself SIGKILL in the middle of writing the step-2 checkpoint: after its
                  shards are written to ckpt_0000002.tmp, before the rename that would publish it.
  guard OUT       under torchrun: every rank runs the same NonFiniteGuard checks, with a NaN on rank 1 only at step 2
                  and an inf on rank 0 only at step 4; writes each rank's decisions to OUT/guard_rank<r>.json.
"""
import json
import os
import signal
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import lifecycle

torch.set_num_threads(1)
mode, out = sys.argv[1:3]
os.makedirs(out, exist_ok=True)

if mode == "save-kill":
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)

    def train_step():
        optimizer.zero_grad()
        model(torch.randn(5, 4)).pow(2).mean().backward()
        optimizer.step()

    train_step()
    lifecycle.save_checkpoint(out, 1, model, optimizer, {"note": "step one"})
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, os.path.join(out, "params_step1.pt"))
    train_step()
    publish = os.replace

    def replace_or_die(src, dst):
        if str(src).endswith("ckpt_0000002.tmp"):  # the step-2 shards are on disk, not yet renamed into place
            os.kill(os.getpid(), signal.SIGKILL)
        return publish(src, dst)

    os.replace = replace_or_die  # lifecycle.save_checkpoint calls os.replace to publish the folder
    lifecycle.save_checkpoint(out, 2, model, optimizer, {"note": "step two"})
    print("not reached: the process was to be killed while writing the checkpoint")
elif mode == "guard":
    d = common.init_distributed()
    guard = lifecycle.NonFiniteGuard(limit=3, device=d.device)
    nan, inf = float("nan"), float("inf")
    losses = {1: 1.0, 2: nan if d.rank == 1 else 1.0, 3: 1.0, 4: inf if d.rank == 0 else 1.0, 5: 1.0}
    decisions = [guard.check(step, loss=loss, grad_norm=torch.tensor(0.5)) for step, loss in losses.items()]
    with open(os.path.join(out, f"guard_rank{d.rank}.json"), "w") as f:
        json.dump({"decisions": decisions, **guard.stats(), "skipped": guard.skipped}, f)
    common.cleanup_distributed()
else:
    raise SystemExit(f"unknown mode {mode!r}")
