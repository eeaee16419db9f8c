"""fine_r1.py under torchrun with 2 ranks (DDP and FSDP2) on toy: every stage runs, the SFT step equals the same
step in one process, TAPO logs every loss term and exports. A few steps each."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import tiny
from conftest import ROOT, torchrun

# 12 rationales (one per seen class); SFT: 2 steps of 4 samples, one sample per micro-batch (so the 2-rank mean of
# per-sample losses is the same number as the 1-process mean); TAPO: one rollout batch of 4 triplets x (2 + 2)
# responses, 2 optimizer steps; evaluation on 4 images per class group.
FLAGS = ["fine_r1.py", "--data", "toy", "--export-dtype", "fp32",
         "--cot-per-class", "1", "--sft-batch", "4", "--sft-micro-batch", "1",
         "--sft-epochs", "0.6", "--rollout-batch", "4", "--sample-prompts", "4", "--prompts-per-step", "2",
         "--group-size", "2", "--max-new-tokens", "24", "--micro-batch", "2", "--logprob-micro-batch", "4",
         "--max-sample-rounds", "2", "--max-steps", "2", "--save-every", "1", "--eval-limit", "4",
         "--eval-max-new-tokens", "16"]


@pytest.fixture(scope="module")
def one_process_sft(tmp_path_factory):
    """The same CoT + SFT stages in a single process (no evaluation)."""
    out = str(tmp_path_factory.mktemp("fine_r1_single"))
    env = {**os.environ, "PYTHONPATH": ROOT}
    for stage in ("cot", "sft"):
        proc = subprocess.run([sys.executable, *FLAGS, "--stage", stage, "--eval-every", "0", "--out", out], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_run_every_stage(parallel, tmp_path, one_process_sft):
    out = str(tmp_path / parallel)
    torchrun([*FLAGS, "--parallel", parallel, "--out", out])
    # cot: one rationale per seen class, identical to the single process's
    with open(os.path.join(out, "cot.jsonl")) as a, open(os.path.join(one_process_sft, "cot.jsonl")) as b:
        assert a.read() == b.read()
    # sft: 2 steps; the 2-rank step equals the 1-process step (same samples, same mean over them)
    sft = read_jsonl(os.path.join(out, "sft", "metrics.jsonl"))
    assert [r["step"] for r in sft if "loss" in r] == [1, 2]
    assert {"eval/mcq/seen", "eval/mcq/unseen", "eval/open/seen", "eval/open/unseen"} <= set(sft[0])  # the baseline
    ours = load_file(os.path.join(out, "sft", "final", "model.safetensors"))
    single = load_file(os.path.join(one_process_sft, "sft", "final", "model.safetensors"))
    assert ours.keys() == single.keys()
    moved = 0
    for k in ours:
        assert torch.allclose(ours[k], single[k], atol=2e-6, rtol=0), k
    # the vision tower and merger stayed frozen in SFT, the language model moved
    base = load_file(os.path.join(tiny.tiny_model_dir(), "model.safetensors"))
    for k in ours:
        changed = not torch.equal(ours[k], base[k])
        if k.startswith("model.visual."):
            assert not changed, k
        moved += changed
    assert moved > 10
    # tapo: 2 optimizer steps from one rollout batch, every loss term finite, the model exported
    tapo = read_jsonl(os.path.join(out, "tapo", "metrics.jsonl"))
    steps = [r for r in tapo if "loss/pg" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        for key in ("loss/loss", "loss/pg", "loss/kl_neg", "loss/entropy", "loss/entropy_neg", "grad_norm"):
            assert math.isfinite(r[key]), (key, r)
        assert r["loss/entropy"] > 0 and r["loss/kl_neg"] >= 0
    last = steps[-1]
    assert last["dynamic/rounds"] >= 1 and last["dynamic/kept"] + last["dynamic/filled"] >= 2  # 2 groups per rank
    assert "eval/mcq/seen" in last and "time/sampling" in last and "time/update" in last
    assert os.path.exists(os.path.join(out, "final", "config.json"))
    assert os.path.exists(os.path.join(out, "tapo", "latest"))
