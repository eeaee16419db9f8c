"""DiVE-k under torchrun with 2 CPU ranks: DDP and FSDP2 runs of the whole script (mining sharded over ranks with
uneven shards, a frozen reference for the KL, token-mean loss with gradient accumulation) agree with each other at
the first step, and a run stopped after one step and started again with the same command resumes to the same
parameters as a run that never stopped."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import torchrun

import common
import lifecycle

# 13 training images mined 3 at a time: 7 on rank 0, 6 on rank 1 (3 and 2 sampling calls: uneven on purpose)
ARGS = ["dive_k.py", "--data", "toy", "--export-dtype", "fp32",
        "--train-limit", "13", "--mine-batch", "3", "--mine-samples", "3",
        "--mine-max-new-tokens", "24", "--max-new-tokens", "24", "--group-size", "4", "--prompts-per-step", "4",
        "--micro-batch", "3", "--beta", "0.04", "--loss-agg", "token", "--save-every", "1",
        "--eval-every", "2", "--eval-classes", "base,novel", "--eval-limit", "3", "--eval-samples", "2",
        "--eval-max-new-tokens", "16"]


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def final_weights(out):
    files = [f for f in os.listdir(os.path.join(out, "final")) if f.endswith(".safetensors")]
    sd = {}
    for f in files:
        sd.update(load_file(os.path.join(out, "final", f)))
    return sd


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny):
    root = tmp_path_factory.mktemp("dive_k_dist")
    out = {}
    for parallel in ("ddp", "fsdp"):
        out[parallel] = str(root / parallel)
        torchrun(ARGS + ["--parallel", parallel, "--max-steps", "2", "--out", out[parallel]])
    return out


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_rank_run_mines_trains_logs_and_exports(runs, parallel, tiny):
    out = runs[parallel]
    with open(os.path.join(out, "mcq.jsonl")) as f:
        mcq = [json.loads(line) for line in f]
    assert len(mcq) == 13 and len({r["id"] for r in mcq}) == 13  # both ranks' shards merged, in dataset order
    assert not [p for p in os.listdir(out) if p.startswith("mcq.part")]
    rec = metrics(out)
    assert [r["mining/images"] for r in rec if r.get("event") == "mining"] == [13]  # logged once
    steps = [r for r in rec if r.get("step", 0) >= 1 and "reward" in r]
    assert [r["step"] for r in steps if "reward" in r] == [1, 2]
    evals = [r for r in rec if "eval/base/accuracy" in r]
    assert [r["step"] for r in evals] == [0, 2] and all("eval/novel/accuracy" in r and "eval/hm" in r for r in evals)
    assert os.path.exists(os.path.join(out, "eval", "step_0000002", "novel", "predictions.jsonl"))
    for key in ("reward", "reward/format", "reward/mcq", "accuracy", "format_rate", "kl", "clip_frac",
                "zero_std_frac", "completion_len", "truncation_rate", "lr", "grad_norm", "time/sampling",
                "time/logprobs", "time/update", "tokens_per_s", "completions"):
        assert key in steps[0], key
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy is the reference at the first step
    assert steps[1]["kl"] > 0  # ... and has moved away from it after one update
    # the exported directory is a standard HF checkpoint that loads, and training moved the weights
    model, _ = common.load_model(os.path.join(out, "final"), device=torch.device("cpu"))
    before = tiny[0].state_dict()
    moved = max((v - before[k]).abs().max().item() for k, v in model.state_dict().items())
    assert moved > 1e-5


def test_ddp_and_fsdp_agree_on_the_first_step(runs):
    a, b = (next(r for r in metrics(runs[p]) if r.get("step") == 1) for p in ("ddp", "fsdp"))
    # same samples (same seeds, same weights), so the same rewards; the loss and the gradient norm go through
    # different reductions (all-reduce vs reduce-scatter of DTensor shards) and must still agree
    for key in ("reward", "accuracy", "completion_len", "zero_std_frac"):
        assert a[key] == b[key], key
    # two-step evaluation of the same starting model, sharded over the ranks, gives the same numbers
    e_a, e_b = ({k: v for k, v in next(r for r in metrics(runs[p]) if r.get("step") == 0 and "eval/hm" in r).items()
                 if k.startswith("eval/")} for p in ("ddp", "fsdp"))
    assert e_a == e_b
    for key in ("loss", "grad_norm"):
        assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), key


def test_resume_reaches_the_same_parameters(runs, tmp_path):
    out = str(tmp_path / "resumed")
    torchrun(ARGS + ["--parallel", "fsdp", "--max-steps", "1", "--out", out])  # "killed" after step 1
    assert lifecycle.latest_checkpoint(out).endswith("ckpt_0000001")
    torchrun(ARGS + ["--parallel", "fsdp", "--max-steps", "2", "--out", out])  # same run, continued
    resumed, full = metrics(out), metrics(runs["fsdp"])
    assert [r["step"] for r in resumed if "reward" in r] == [1, 2]
    step2 = [next(r for r in rec if r.get("step") == 2) for rec in (resumed, full)]
    assert step2[0]["completions"] == step2[1]["completions"]  # the same questions, in the same data order
    assert step2[0]["loss"] == pytest.approx(step2[1]["loss"], rel=1e-5, abs=1e-8)
    a, b = final_weights(out), final_weights(runs["fsdp"])
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
