"""SpeciaRL on 2 ranks (torchrun, gloo, CPU): the update on 2 ranks equals the single-process update (DDP and FSDP2,
LoRA, 2 mini-batches with gradient accumulation, the global token mean; the export from the wrapped model is the
merged model), and speciarl.py runs end to end on toy with DDP and LoRA (then resumes from its checkpoint) and with
FSDP2 and full fine-tuning (a sharded reference copy for the KL).

Run as a script (`torchrun ... tests/test_speciarl_dist.py update CASE OUT`), this file is the 2-rank worker."""
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import common  # noqa: E402
import lifecycle
import data
import judges
import speciarl  # noqa: E402

# no gradient clipping here: a clipped gradient has norm 1 whatever its scale, which would hide a wrong normaliser
UPDATE_FLAGS = ["--data", "toy", "--minibatches", "2", "--micro-batch", "2", "--beta", "0.01", "--grad-clip", "1e9"]
N_PROMPTS, G = 4, 3


def lora_tiny(device="cpu"):
    """The tiny stand-in with rank-4 adapters, B drawn from a fixed seed (identical on every rank)."""
    model, proc = common.load_model("tiny", device=torch.device(device))
    speciarl.inject_lora(model, rank=4, alpha=8)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, speciarl.LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * 0.2)
    return model, proc


def prompts_for(proc):
    test = data.load_dataset("toy", "test")
    return [common.encode_prompt(proc, ex.image, speciarl.PROMPTS["general"]) for ex in test.examples[:N_PROMPTS]]


def run_update(model, proc, case, prompt_ids):
    """update_policy on the rows of `prompt_ids` (whole groups), plain SGD so the comparison is not washed out."""
    args = speciarl.parse_args(UPDATE_FLAGS)
    args.precision = common.precision_for(args.dtype, common.Dist(), args.parallel)  # fp32 on CPU, as main sets
    prompts = prompts_for(proc)
    rows = [p * G + j for p in prompt_ids for j in range(G)]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    pad = common.special_token_ids(proc)["<|endoftext|>"]
    return speciarl.update_policy(args, model, opt, lifecycle.NonFiniteGuard(), [prompts[r // G] for r in rows],
                                  case["ids"][rows], case["mask"][rows], case["adv"][rows], case["old"][rows],
                                  case["ref"][rows], pad, step=0, total_steps=1)


def adapters(state_dict):
    return {k: v.detach().float().clone() for k, v in state_dict.items() if k.endswith(("lora_A", "lora_B"))}


def make_case(path):
    """Fixed rollouts of 4 prompts x 3 (uneven lengths), their old / reference log-probs and advantages."""
    model, proc = lora_tiny()
    prompts = prompts_for(proc)
    ro = common.sample(model, proc, prompts, group_size=G, max_new_tokens=16, temperature=1.0,
                       generator=torch.Generator().manual_seed(3))
    rows = ro.row_prompts
    old = common.completion_logprobs(model, proc, rows, ro.completion_ids, ro.completion_mask)
    with speciarl.lora_disabled(model):
        ref = common.completion_logprobs(model, proc, rows, ro.completion_ids, ro.completion_mask)
    rewards = torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 1.0]])
    adv = speciarl.group_advantages(rewards, "group", 1e-6).view(-1)
    case = {"ids": ro.completion_ids, "mask": ro.completion_mask, "old": old, "ref": ref, "adv": adv}
    torch.save(case, path)
    return model, proc, case


def worker(mode, case_path, out):
    d = common.init_distributed()
    case = torch.load(case_path, weights_only=True)
    results = {}
    for parallel in ("ddp", "fsdp"):
        model, proc = lora_tiny()
        wrapped = common.wrap_model(model, d, parallel)
        mine = list(range(N_PROMPTS))[d.rank::d.world_size]  # as speciarl.main shards a rollout batch
        run_update(wrapped, proc, case, mine)
        sd = lifecycle.full_state_dict(wrapped)
        if d.is_main:
            results[parallel] = adapters(sd)
        # export from the wrapped (under FSDP2: sharded) LoRA model: merged plain weights
        lifecycle.export_hf(wrapped, proc, os.path.join(out, f"export_{parallel}"), dtype="fp32")
    if d.is_main:
        torch.save(results, os.path.join(out, "adapters.pt"))
    common.cleanup_distributed()


def test_two_rank_update_equals_single_process(tmp_path):
    from conftest import torchrun
    model, proc, case = make_case(str(tmp_path / "case.pt"))
    before = adapters(model.state_dict())
    run_update(model, proc, case, list(range(N_PROMPTS)))  # one process, all 4 prompts
    single = adapters(model.state_dict())
    torchrun(["tests/test_speciarl_dist.py", "update", str(tmp_path / "case.pt"), str(tmp_path)])
    two_rank = torch.load(tmp_path / "adapters.pt", weights_only=True)
    moved = max((single[k] - before[k]).abs().max().item() for k in single)
    assert moved > 1e-5
    for parallel in ("ddp", "fsdp"):
        assert set(two_rank[parallel]) == set(single)
        diff = max((two_rank[parallel][k] - single[k]).abs().max().item() for k in single)
        # a wrong normaliser (per-rank token mean, or no x world) would be off by a sizeable fraction of the update
        assert diff < 1e-3 * moved, (parallel, diff, moved)
    merged = speciarl.merge_lora_state_dict(model.state_dict())
    for parallel in ("ddp", "fsdp"):
        exported, _ = common.load_model(str(tmp_path / f"export_{parallel}"), device=torch.device("cpu"))
        sd = exported.state_dict()
        assert set(sd) == set(merged)
        assert max((sd[k] - merged[k]).abs().max().item() for k in merged) < 1e-5


def _records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


RUN_FLAGS = ["--data", "toy", "--rollout-prompts", "4", "--group-size", "4", "--max-new-tokens", "24",
             "--eval-every", "2", "--eval-limit", "8", "--eval-max-new-tokens", "24", "--save-every", "1",
             "--log-completions", "4"]


def _check_run(out, steps):
    recs = _records(out)
    train = [r for r in recs if "reward" in r]
    evals = [r for r in recs if "eval/correctness" in r]
    assert [r["step"] for r in train] == list(range(1, steps + 1))
    for r in train:
        assert -1.0 <= r["reward"] <= 1.0 and 0.0 <= r["correctness"] <= 1.0
        assert abs(sum(r[f"share/{n}"] for n in judges.JUDGE_LABELS + ["no_answer", "judge_error"]) - 1) < 1e-9
        assert r["kl"] >= 0 and r["grad_norm"] >= 0 and r["time/sample"] > 0 and r["tokens_per_s"] > 0
    assert evals[0]["step"] == 0 and 0 <= evals[-1]["eval/specificity"] <= 1
    with open(os.path.join(out, "rollouts.jsonl")) as f:
        logged = [json.loads(line) for line in f]
    assert logged and {"label", "group_best", "reward"} <= set(logged[0])
    final, _ = common.load_model(os.path.join(out, "final"), device=torch.device("cpu"))
    assert not any("lora" in k for k in final.state_dict())  # merged plain weights
    return train


def test_ddp_run_and_resume(tmp_path):
    from conftest import torchrun
    out = str(tmp_path / "ddp")
    torchrun(["speciarl.py", *RUN_FLAGS, "--parallel", "ddp", "--max-steps", "2", "--out", out])
    _check_run(out, 2)
    assert lifecycle.latest_checkpoint(out).endswith("ckpt_0000002")
    proc = torchrun(["speciarl.py", *RUN_FLAGS, "--parallel", "ddp", "--max-steps", "3", "--out", out])
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout
    _check_run(out, 3)


def test_fsdp_full_finetuning_run(tmp_path):
    """FSDP2 without LoRA: the language model trains in full and the KL reference is a second, sharded copy."""
    from conftest import torchrun
    out = str(tmp_path / "fsdp")
    proc = torchrun(["speciarl.py", *RUN_FLAGS, "--parallel", "fsdp", "--lora-rank", "0", "--lr", "1e-4",
                     "--max-steps", "2", "--export-dtype", "fp32", "--out", out])
    assert "LoRA" not in proc.stdout
    train = _check_run(out, 2)
    assert all(r["kl"] >= 0 for r in train) and train[-1]["kl"] > 0  # the reference copy is really used
    final, _ = common.load_model(os.path.join(out, "final"), device=torch.device("cpu"))
    base, _ = common.load_model("tiny", device=torch.device("cpu"))
    fsd, bsd = final.state_dict(), base.state_dict()
    changed = {k for k in bsd if not torch.equal(fsd[k], bsd[k])}
    assert changed and all("visual" not in k for k in changed)  # the language model moved, the vision tower did not


if __name__ == "__main__":
    torch.set_num_threads(1)
    worker(*sys.argv[1:4])
