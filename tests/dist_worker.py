"""Worker for the distributed and resume tests (run under torchrun, or plain python for one process).

  step  SETUPS OUT   : for each setup of the comma list (ddp, fsdp, fsdp+ac: activation checkpointing), from a fresh
                       model: one SGD step of a policy-gradient loss on 4 fixed prompts, sharded over ranks; saves
                       the parameters, samples on the wrapped model, exports an HF directory, all in OUT/SETUP.
                       Scored with the shared prefix (SCORE=rows: one sequence per completion). One launch for all.
  train PARALLEL OUT STEPS STOP : AdamW steps with random data drawn from the global RNG, a checkpoint every 2 steps,
                       resuming from OUT if a checkpoint is there; exits after STOP steps (0 = never).
"""
import gc
import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import lifecycle
import data  # noqa: E402

torch.set_num_threads(1)


def policy_loss(model, wrapped, proc, pad, prompts, seeds, checkpointing=False):
    """Per-prompt sampling with its own seed, so a prompt's completions do not depend on which rank holds it."""
    model.eval()  # sampling needs the KV cache; activation checkpointing acts in train mode, for the scoring below
    # Under FSDP2 every forward all-gathers, and ranks' rollouts may end at different decode steps: sample on the
    # gathered parameters, as the methods do.
    with common.gathered_params(wrapped, common.fsdp_warmup_inputs(wrapped, proc, prompts[0])):
        rollouts = [common.sample(wrapped, proc, [p], group_size=2, max_new_tokens=12, temperature=1.0,
                                  generator=torch.Generator().manual_seed(s)) for p, s in zip(prompts, seeds)]
    ro = common.concat_rollouts(rollouts, pad)
    model.train(checkpointing)
    logp = common.score_completions(wrapped, ro.row_prompts, ro.completion_ids, ro.completion_mask, pad,
                                    shared_prefix=os.environ.get("SCORE") != "rows")  # [B, T]
    adv = torch.tensor([1.0, -0.5] * len(prompts))  # [B]
    mask = ro.completion_mask.float()
    return -((logp * mask).sum(1) / mask.sum(1) * adv).mean()


def one_step(d: common.Dist, setup: str, out: str):
    """One `step` setup, from a fresh model (FSDP2 changes the module it wraps). Everything that holds the process
    group (the wrapped model, its optimizer) is a local here, freed when this returns: the process group is then
    destroyed while the interpreter is fully alive. A gloo group still referenced at interpreter exit can abort the
    process ("terminate called without an active exception")."""
    parallel, checkpointing = setup.split("+")[0], setup.endswith("+ac")
    model, proc = common.load_model("tiny", device=d.device)
    pad = common.special_token_ids(proc)["<|endoftext|>"]
    exs = data.load_dataset("toy", "test").examples[:4]
    os.makedirs(out, exist_ok=True)
    mine = list(range(d.rank, 4, d.world_size))
    prompts = [common.encode_prompt(proc, exs[i].image, "Classify the image.") for i in mine]
    wrapped = common.wrap_model(model, d, parallel, activation_checkpointing=checkpointing)
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.5)
    loss = policy_loss(model, wrapped, proc, pad, prompts, mine, checkpointing)
    loss.backward()
    opt.step()
    sd = lifecycle.full_state_dict(wrapped)
    if d.is_main:
        save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(out, "params.safetensors"))
    # sampling on the wrapped (possibly sharded) model: parameters gathered once for the whole rollout
    with common.gathered_params(wrapped, common.fsdp_warmup_inputs(wrapped, proc, prompts[0])):
        ro = common.sample(wrapped, proc, prompts, group_size=3, max_new_tokens=10, temperature=1.0)
    assert ro.completion_ids.shape[0] == 3 * len(prompts)
    # the sharded model still trains after sampling
    loss = policy_loss(model, wrapped, proc, pad, prompts, mine, checkpointing)
    loss.backward()
    lifecycle.export_hf(wrapped, proc, os.path.join(out, "export"), dtype="fp32")
    if d.is_main:
        open(os.path.join(out, "ok"), "w").write("ok")


def train(d: common.Dist, parallel: str, out: str, total: int, stop: int):
    """The `train` mode (one_step's docstring says why the wrapped model is a local)."""
    model, proc = common.load_model("tiny", device=d.device)
    pad = common.special_token_ids(proc)["<|endoftext|>"]
    test = data.load_dataset("toy", "test")
    os.makedirs(out, exist_ok=True)
    common.seed_everything(1234 + d.rank)  # a fresh process is not otherwise seeded; resume restores this RNG
    wrapped = common.wrap_model(model, d, parallel)
    opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-3)
    start = 0
    ckpt = lifecycle.latest_checkpoint(out)
    if ckpt:
        start = lifecycle.load_checkpoint(ckpt, wrapped, opt)["step"]
    prompts_all = [common.encode_prompt(proc, e.image, "Classify the image.") for e in test.examples[:8]]
    for step in range(start, total):
        pick = torch.randint(0, 8, (2,)).tolist()  # the global RNG drives the data: restoring it matters
        seed = int(torch.randint(0, 10 ** 6, (1,)))
        loss = policy_loss(model, wrapped, proc, pad, [prompts_all[i] for i in pick],
                           [seed + d.rank, seed + 7 + d.rank])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 2 == 0:
            lifecycle.save_checkpoint(out, step + 1, wrapped, opt, {"note": "test"})
        if stop and step + 1 == stop:
            return  # stops here, as a killed run would (its last checkpoint: the last even step)
    sd = lifecycle.full_state_dict(wrapped)
    if d.is_main:
        save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(out, "final.safetensors"))


if __name__ == "__main__":
    dist = common.init_distributed()
    if sys.argv[1] == "step":
        for setup in sys.argv[2].split(","):
            one_step(dist, setup, os.path.join(sys.argv[3], setup))
            gc.collect()  # the setup's wrapped model is gone before the next one is built
    else:
        train(dist, sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    gc.collect()  # nothing of the run left that refers to the process group ...
    common.cleanup_distributed()  # ... before it is destroyed
