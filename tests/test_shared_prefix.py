"""The shared-prefix scoring path (common.score_completions): each prompt once for the completions that share it,
against one sequence per completion. Log-probs to 1e-5 and parameter gradients to 1e-5 relative, with sdpa and
eager attention, activation checkpointing, LoRA, and Fine-R1's layout. DDP / FSDP2: tests/test_core_distributed.py
(2 ranks scoring with the shared prefix against one process scoring per completion)."""
import copy

import pytest
import torch

import common
import fine_r1
import speciarl


@pytest.fixture(scope="module")
def rollout(tiny, toy_test):
    """Three prompts of different lengths (left padding) and image sizes; runs of 4, 3 and 1 rows."""
    model, proc = tiny
    images = [common.open_image(e.image) for e in toy_test.examples[:3]]
    prompts = [common.encode_prompt(proc, images[0], speciarl.PROMPT),
               common.encode_prompt(proc, images[1].resize((84, 56)), fine_r1.OPEN_PROMPT),
               common.encode_prompt(proc, images[2], "Classify.")]
    ro = common.sample(model, proc, prompts, group_size=4, max_new_tokens=20, temperature=1.0,
                       generator=torch.Generator().manual_seed(1))
    keep = list(range(7)) + [8]  # rows 0-3 (prompt 0), 4-6 (prompt 1), 8 (prompt 2 alone)
    return [ro.row_prompts[i] for i in keep], ro.completion_ids[keep], ro.completion_mask[keep]


def scores_and_grads(model, proc, rows, ids, mask, shared):
    pad = common.special_token_ids(proc)["<|endoftext|>"]
    model.zero_grad(set_to_none=True)
    logp = common.score_completions(model, rows, ids, mask, pad, 0.9, shared_prefix=shared)  # [B, T]
    weights = torch.linspace(-1, 1, ids.shape[0])[:, None]  # a loss that weighs rows differently
    (logp * mask * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return (logp * mask).detach(), grads


def assert_same(model, proc, rows, ids, mask):
    """Log-probs to 1e-5; the gradient to 1e-5 relative (all parameters together), each parameter's to 1e-4 (a small
    one's relative error is float32 summation noise: 1.3e-5 was seen on a LoRA A matrix)."""
    (a, ga), (b, gb) = (scores_and_grads(model, proc, rows, ids, mask, shared) for shared in (True, False))
    assert (a - b).abs().max().item() < 1e-5
    assert ga.keys() == gb.keys() and ga
    diff = torch.sqrt(sum(((ga[n] - g) ** 2).sum() for n, g in gb.items()))
    total = torch.sqrt(sum((g ** 2).sum() for g in gb.values()))
    assert (diff / total).item() < 1e-5, (diff / total).item()
    for name, g in gb.items():
        rel = ((ga[name] - g).norm() / g.norm().clamp(min=1e-12)).item()
        assert rel < 1e-4, (name, rel)


def test_runs_and_predictors(rollout):
    rows, ids, _ = rollout
    assert common.prompt_runs(rows) == [(0, 4), (4, 7), (7, 8)]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_prefix_equals_one_sequence_per_completion(tiny, rollout, attn):
    model, proc = tiny
    model = copy.deepcopy(model)
    model.set_attn_implementation(attn)
    assert_same(model, proc, *rollout)


def test_with_activation_checkpointing(tiny, rollout):
    model, proc = tiny
    model = copy.deepcopy(model)
    common.enable_activation_checkpointing(model)
    model.train()
    assert_same(model, proc, *rollout)


def test_with_lora(tiny, rollout):
    model, proc = tiny
    model = copy.deepcopy(model)
    speciarl.inject_lora(model, rank=4, alpha=8.0, seed=0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # adapters away from zero, so that their gradients differ from B = 0's
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    assert_same(model, proc, *rollout)


def test_fine_r1_layout(tiny, toy_test):
    """A Fine-R1 group: G rows on the anchor image and G on the positive one (two runs), then every row scored again
    with the question on a negative image (one run of 2G rows): per-row and shared agree, with and without grad."""
    model, proc = tiny
    images = [common.open_image(e.image) for e in toy_test.examples[5:8]]
    anchor, positive, negative = (common.encode_prompt(proc, im, fine_r1.OPEN_PROMPT) for im in images)
    ro = common.sample(model, proc, [anchor, positive], group_size=3, max_new_tokens=16, temperature=1.0,
                       generator=torch.Generator().manual_seed(2))
    assert_same(model, proc, ro.row_prompts, ro.completion_ids, ro.completion_mask)
    neg = [negative] * len(ro.row_prompts)
    a, b = (common.completion_logprobs(model, proc, neg, ro.completion_ids, ro.completion_mask, temperature=0.9,
                                       micro_batch=4, shared_prefix=shared) for shared in (True, False))
    assert (a - b).abs().max().item() < 1e-5
