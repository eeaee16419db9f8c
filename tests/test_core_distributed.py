"""DDP and FSDP2 under torchrun (gloo, 2 CPU ranks) against a single process; checkpoint resume."""
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, torchrun

import common
import lifecycle
import memory

WORKER = os.path.join(ROOT, "tests", "dist_worker.py")


def _single(args, extra_env=None):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", **(extra_env or {})}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    subprocess.run([sys.executable, WORKER] + args, cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)


SETUPS = ["ddp", "fsdp", "fsdp+ac"]  # +ac: activation checkpointing


@pytest.fixture(scope="module")
def single_step(tmp_path_factory, tiny):
    out = str(tmp_path_factory.mktemp("single"))
    _single(["step", "ddp", out], {"SCORE": "rows"})  # the reference: one sequence per completion, one process
    return load_file(os.path.join(out, "ddp", "params.safetensors"))


@pytest.fixture(scope="module")
def two_rank_steps(tmp_path_factory, tiny):
    """The step of every setup, on 2 ranks, in one launch (an interpreter start per setup would cost more)."""
    out = str(tmp_path_factory.mktemp("two"))
    torchrun([WORKER, "step", ",".join(SETUPS), out])
    return out


@pytest.mark.parametrize("setup", SETUPS)
def test_two_rank_step_equals_single_process(setup, single_step, two_rank_steps, tiny):
    """2 ranks scoring with the shared prefix (each prompt once for its completions), under DDP and FSDP2, with and
    without activation checkpointing: the same step as one process scoring one sequence per completion."""
    out = os.path.join(two_rank_steps, setup)
    two = load_file(os.path.join(out, "params.safetensors"))
    before = {k: v for k, v in tiny[0].state_dict().items()}
    assert two.keys() == single_step.keys()
    moved = max((single_step[k] - before[k]).abs().max().item() for k in two)
    assert moved > 1e-3  # the step did something
    for k in two:
        assert torch.allclose(two[k], single_step[k], atol=1e-5), k
    assert os.path.exists(os.path.join(out, "ok"))
    # the HF directory exported from the distributed run reloads and matches the saved parameters
    model, _ = common.load_model(os.path.join(out, "export"), device=torch.device("cpu"))
    sd = model.state_dict()
    for k in two:
        assert torch.allclose(sd[k], two[k]), k


@pytest.mark.parametrize("parallel", ["fsdp"])
def test_resume_reaches_same_parameters(parallel, tmp_path, tiny):
    """Sharded checkpoint + RNG restore: stop after step 3 (last checkpoint step 2), rerun, same parameters.
    FSDP2 here (sharded state is the harder case); DDP resume runs end to end through a training loop in
    test_speciarl_dist.py::test_ddp_run_and_resume and test_dive_k_dist.py."""
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    torchrun([WORKER, "train", parallel, full, "6", "0"])
    torchrun([WORKER, "train", parallel, resumed, "6", "3"])  # stops after step 3 (last checkpoint: step 2)
    assert lifecycle.latest_checkpoint(resumed).endswith("ckpt_0000002")
    torchrun([WORKER, "train", parallel, resumed, "6", "0"])  # same command again: resumes from step 2
    a = load_file(os.path.join(full, "final.safetensors"))
    b = load_file(os.path.join(resumed, "final.safetensors"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_precision_is_what_the_run_reports(tiny, toy_test, capsys):
    """--dtype, --parallel and the world size -> where the weights live and what the forward computes in. On one
    process FSDP2 wraps nothing, so bf16 compute over fp32 weights must come from autocast there (it used to run in
    fp32 while the memory report said bf16); sharded FSDP2 casts through its policy; fp32 matmuls on GPU use TF32."""
    fp32, bf16 = torch.float32, torch.bfloat16
    gpu = lambda world: common.Dist(world_size=world, device=torch.device("cuda"))  # noqa: E731 (nothing allocated)
    before = torch.get_float32_matmul_precision()
    try:
        table = [  # (dtype, parallel, world, trained weights) -> (weights, compute, via)
            (("auto", "ddp", 1, True), (fp32, bf16, "autocast")),
            (("auto", "fsdp", 1, True), (fp32, bf16, "autocast")),  # one process: nothing sharded
            (("auto", "ddp", 8, True), (fp32, bf16, "autocast")),
            (("auto", "fsdp", 8, True), (fp32, bf16, "fsdp")),
            (("auto", "fsdp", 8, False), (bf16, bf16, "weights")),  # LoRA's frozen base, evaluation
            (("bf16", "fsdp", 8, True), (bf16, bf16, "weights")),
            (("fp32", "ddp", 1, True), (fp32, fp32, "weights")),
        ]
        for (dtype, parallel, world, trained), want in table:
            p = common.precision_for(dtype, gpu(world), parallel, trained_weights=trained)
            assert (p.weights, p.compute, p.via) == want, (dtype, parallel, world, trained)
            assert p.fsdp_param_dtype == (bf16 if want[2] == "fsdp" else None)
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)
    cpu = common.Dist()
    assert common.precision_for("auto", cpu, "fsdp").compute == fp32 and torch.get_float32_matmul_precision() == before
    with pytest.raises(SystemExit, match="--dtype fp16"):
        common.precision_for("fp16", cpu, "ddp")

    # behaviour: one process, --parallel fsdp, bf16-mixed on this CPU: the model stays fp32, the forward is bf16
    model, proc = tiny
    p = common.precision_for("bf16-mixed", cpu, "fsdp")
    assert common.wrap_model(model, cpu, "fsdp", param_dtype=p.fsdp_param_dtype) is model
    prompt = common.encode_prompt(proc, toy_test.examples[0].image, "Classify the image.")
    seen = []
    hook = model.lm_head.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    try:
        with torch.no_grad(), p.context():
            model(**common.collate_prompts(model, [prompt], 0, "cpu"), logits_to_keep=1)
    finally:
        hook.remove()
    assert seen == [bf16] and next(model.parameters()).dtype == fp32
    memory.report_memory_budget(model, cpu, parallel="fsdp", reference=False, rollout_rows=0, prompt_tokens=10,
                                new_tokens=10, train_rows=1, activation_checkpointing=False, compute_dtype=p.compute)
    assert "weights float32, compute bfloat16" in capsys.readouterr().out
