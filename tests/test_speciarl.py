"""SpeciaRL unit tests: the reward truth tables, judging of rollouts, advantages, the loss against a hand computation,
the data order, the toy preset, and the hand-written LoRA (merge, reference, what trains)."""
import math

import pytest
import torch

import common
import lifecycle
import data
import judges
import speciarl
from speciarl import JUDGE_ERROR, NO_ANSWER

W, A, G, L, S, M = "wrong", "abstain", "generic", "less_specific", "specific", "more_specific"


# ----- rewards -----

def reward(name, labels):
    """REWARDS[name] on one group whose verifier labels are `labels` (the completions' text is not read)."""
    return speciarl.REWARDS[name]([""] * len(labels), {"truth": "red striped circle", "labels": labels})


DYNAMIC_CASES = {
    # name: (labels of one group, expected rewards)
    "all wrong": ([W, W, W, W], [0, 0, 0, 0]),
    "all wrong, with a missing answer": ([W, NO_ANSWER, W], [0, -1, 0]),
    "best abstain: abstaining is rewarded, wrong is not": ([W, A, A, W], [0, 1, 1, 0]),
    "best generic": ([G, A, W, G], [1, 0, 0, 1]),
    "best less specific": ([G, L, A, L, W], [0, 1, 0, 1, 0]),
    "best specific, more specific tied with it": ([S, M, L, G, A, W], [1, 1, 0, 0, 0, 0]),
    "more specific alone is the best tier": ([M, L, S, G], [1, 0, 1, 0]),
    "specific best, generic and less specific get nothing": ([L, G, S, L], [0, 0, 1, 0]),
    "parse failures mixed in": ([NO_ANSWER, G, NO_ANSWER, S], [-1, 0, -1, 1]),
    "parse failures do not count as the best (best generic)": ([NO_ANSWER, G, W], [-1, 1, 0]),
    "every answer missing": ([NO_ANSWER] * 3, [-1, -1, -1]),
    "judge errors get 0 and are not the best": ([JUDGE_ERROR, L, JUDGE_ERROR, W], [0, 1, 0, 0]),
    "judge errors beside wrong answers": ([JUDGE_ERROR, W, W], [0, 0, 0]),
    "judge errors and missing answers only": ([JUDGE_ERROR, NO_ANSWER], [0, -1]),
    "a single valid rollout is its own best": ([A], [1]),
}


@pytest.mark.parametrize("case", list(DYNAMIC_CASES))
def test_dynamic_reward_truth_table(case):
    labels, expected = DYNAMIC_CASES[case]
    assert reward("dynamic", labels) == [float(x) for x in expected]


def test_dynamic_reward_is_per_group():
    """The best tier comes from the image's own group only: the same label earns different rewards in two groups."""
    assert reward("dynamic", [L, G]) == [1.0, 0.0]
    assert reward("dynamic", [L, S]) == [0.0, 1.0]


# columns of the paper's table: more specific, specific, less specific, generic, abstain, wrong
STATIC_EXPECTED = {
    "binary": [1, 1, 0, 0, 0, 0],
    "scala1": [1, 1, 0.75, 0.5, 0.25, 0],
    "scala2": [1, 1, 0.75, 0.5, 0, 0],
    "scala3": [1, 1, 0.75, 0, 0, 0],
}


@pytest.mark.parametrize("name", list(STATIC_EXPECTED))
def test_static_reward_tables(name):
    labels = [M, S, L, G, A, W, NO_ANSWER, JUDGE_ERROR]
    expected = [float(x) for x in STATIC_EXPECTED[name]] + [-1.0, 0.0]
    assert reward(name, labels) == expected
    # static rewards do not look at the group: a label's reward is the same whatever else was answered
    assert reward(name, [L]) == reward(name, [L, S, S])[:1]


def test_reward_registry_names():
    assert set(speciarl.REWARDS) == {"dynamic", "binary", "scala1", "scala2", "scala3"}


def test_best_label_for_logging():
    assert speciarl.best_label([W, S, M, NO_ANSWER]) == M
    assert speciarl.best_label([NO_ANSWER, JUDGE_ERROR]) == "none"


# ----- answers and the verifier -----

class FakeJudge:
    """Records the pairs it was asked about; labels from a table, anything else is a judge error (None)."""

    def __init__(self, table):
        self.table, self.calls = table, []

    def judge(self, pairs):
        self.calls.append(list(pairs))
        return [self.table.get(answer) for _, answer in pairs]


def test_judge_rollouts_skips_missing_answers_and_flags_judge_errors():
    texts = ["<think>x</think><answer>red striped circle</answer>",
             "<think>x</think><answer> </answer>",  # empty answer
             "<think>x</think> no tags at all",  # missing answer
             "<answer>circle</answer>",
             "<answer>!!!</answer>",  # punctuation only: an answer the verifier judges (the paper's code)
             "<answer>banana</answer>"]  # the judge has no label for it
    answers = [judges.parse_answer(text) for text in texts]
    assert answers == ["red striped circle", None, None, "circle", "!!!", "banana"]
    judge = FakeJudge({"red striped circle": S, "circle": L, "!!!": "wrong"})
    labels = speciarl.judge_rollouts(judge, ["red striped circle"] * 6, answers)
    assert labels == [S, NO_ANSWER, NO_ANSWER, L, "wrong", JUDGE_ERROR]
    assert judge.calls == [[("red striped circle", "red striped circle"), ("red striped circle", "circle"),
                            ("red striped circle", "!!!"), ("red striped circle", "banana")]]  # one call, valid only
    assert speciarl.dynamic_reward(texts, {"truth": "red striped circle", "labels": labels}) == [
        1.0, -1.0, -1.0, 0.0, 0.0, 0.0]


def test_rules_judge_on_toy_labels_the_ladder():
    """The real verifier on the toy hierarchy (red striped circle -> circle -> shape): the labels the reward needs."""
    train = data.load_dataset("toy", "train")
    judge = judges.get_judge("rules", train)
    answers = ["red striped circle", "circle", "shape", "None", "blue plain square", "red circle or blue square"]
    texts = [f"<think>t</think><answer>{a}</answer>" for a in answers]
    answers = [judges.parse_answer(text) for text in texts]
    labels = speciarl.judge_rollouts(judge, ["red striped circle"] * len(texts), answers)
    assert labels == [S, L, G, A, W, W]


# ----- advantages -----

def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, -1.0], [1.0, 1.0, 1.0, 1.0]])
    # group 0: mean 0, unbiased std sqrt(2/3); group 1: all equal -> 0
    std = math.sqrt(2 / 3)
    expected = torch.tensor([[1 / std, 0.0, 0.0, -1 / std], [0.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(speciarl.group_advantages(rewards, "group", 0.0), expected, atol=1e-6)
    assert torch.allclose(speciarl.group_advantages(rewards, "none", 1e-6),
                          torch.tensor([[1.0, 0.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0]]))


# ----- the loss -----

def test_loss_against_hand_computation():
    """Three rollouts, ratios away from 1: PPO clip (both sides), dual clip and the unclipped region all occur."""
    rho = torch.tensor([[1.5, 1.1, 0.7, 2.0],   # A = +1: clipped at 1.2, inside, inside (min takes rho), clipped
                        [0.5, 0.9, 1.3, 5.0],   # A = -1: clipped at 0.8, inside, above 1.2 (max keeps 1.3), dual 3
                        [1.0, 4.0, 0.6, 1.0]])  # A = -2: inside, dual-capped at 3*2 = 6 (8 > 6), clip -> 0.8*2=1.6
    adv = torch.tensor([1.0, -1.0, -2.0])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0]])  # the last token of row 2 is padding
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0], [-0.7, -1.0, -2.0, -0.2], [-1.5, -0.3, -2.5, -1.0]])
    logp = (old + rho.log()).requires_grad_(True)
    ref = old - 0.3  # the reference is less sure: ref - logp = -0.3 - log(rho)
    beta = 0.01
    # per-token pg by hand: max(-A*rho, -A*clip(rho)), then min(., c*|A|) for A < 0
    pg = torch.tensor([[-1.2, -1.1, -0.7, -1.2],
                       [0.8, 0.9, 1.3, 3.0],
                       [2.0, 6.0, 1.6, 2.0]])
    d = -0.3 - rho.log()
    kl = torch.exp(d) - d - 1
    expected = ((pg + beta * kl) * mask).sum()
    loss, stats = speciarl.speciarl_loss(logp, old, ref, adv, mask, clip_eps=0.2, dual_clip=3.0, beta=beta)
    assert torch.allclose(loss, expected, atol=1e-5), (loss, expected)
    assert torch.allclose(stats["pg_loss"], (pg * mask).sum(), atol=1e-5)
    assert torch.allclose(stats["kl"], (kl * mask).sum(), atol=1e-6)
    # the PPO clip binds at (0,0) (0,3) (1,0) (2,2); the dual cap at (1,3) and (2,1)
    assert stats["clip_frac"].item() == 4
    assert stats["dual_clip_frac"].item() == 2  # (1,3) and (2,1)
    # gradient: zero wherever a clip binds; -A*rho + beta * dKL/dlogp elsewhere
    loss.backward()
    dkl = (1 - torch.exp(d))  # d/dlogp of exp(d) - d - 1 with d = ref - logp
    grad_pg = torch.tensor([[0.0, -1.1, -0.7, 0.0],
                            [0.0, 0.9, 1.3, 0.0],
                            [2.0, 0.0, 0.0, 2.0]])
    assert torch.allclose(logp.grad, (grad_pg + beta * dkl) * mask, atol=1e-5)


def test_loss_without_kl_and_dual_clip():
    logp = torch.tensor([[-1.0]])
    old = logp - math.log(5.0)  # rho = 5
    adv = torch.tensor([-1.0])
    loss, stats = speciarl.speciarl_loss(logp, old, None, adv, torch.ones(1, 1), clip_eps=0.2, dual_clip=0.0,
                                         beta=0.0)
    assert loss.item() == pytest.approx(5.0)  # plain PPO: max(5, 1.2)
    assert stats["kl"].item() == 0.0 and stats["dual_clip_frac"].item() == 0


# ----- data order and flags -----

def test_batch_for_step_epochs():
    n, b = 50, 16  # 3 steps per epoch, 2 images dropped each epoch
    epoch0 = [speciarl.batch_for_step(n, s, b, 42) for s in range(3)]
    flat = [i for batch in epoch0 for i in batch]
    assert len(set(flat)) == 48 and all(len(x) == b for x in epoch0)  # disjoint within an epoch
    assert speciarl.batch_for_step(n, 1, b, 42) == epoch0[1]  # a pure function of the step (resume)
    assert speciarl.batch_for_step(n, 3, b, 42) != epoch0[0]  # reshuffled next epoch


def test_toy_preset_fills_only_unset_flags():
    args = speciarl.parse_args(["--data", "toy", "--lr", "1e-4"])
    assert args.lr == 1e-4 and args.model == "tiny" and args.rollout_prompts == speciarl.TOY["rollout_prompts"]
    real = speciarl.parse_args(["--data", "cub"])
    assert real.model == "Qwen/Qwen2.5-VL-7B-Instruct" and real.lr == 3e-5 and real.group_size == 10
    assert (real.rollout_prompts, real.minibatches, real.lora_rank, real.lora_alpha) == (256, 2, 64, 32.0)
    assert (real.clip_eps, real.dual_clip, real.beta, real.max_new_tokens) == (0.2, 3.0, 0.01, 2048)


# ----- LoRA -----

def _inputs(model, proc, n=2):
    test = data.load_dataset("toy", "test")
    prompts = [common.encode_prompt(proc, ex.image, speciarl.PROMPTS["general"]) for ex in test.examples[:n]]
    pad = common.special_token_ids(proc)["<|endoftext|>"]
    return common.collate_prompts(model, prompts, pad, "cpu"), prompts


@pytest.fixture()
def lora_model(tiny):
    """A fresh copy of the tiny stand-in with rank-4 adapters whose B is non-zero (as after some training)."""
    model, proc = common.load_model("tiny", device=torch.device("cpu"))
    speciarl.inject_lora(model, rank=4, alpha=8)
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, speciarl.LoRALinear):
                m.lora_B.normal_(0, 0.05)
    return model, proc


def test_lora_merge_matches_adapters_and_export(lora_model, tiny, tmp_path):
    model, proc = lora_model
    base_model = tiny[0]
    inputs, _ = _inputs(model, proc)
    with torch.no_grad():
        with_adapters = model(**inputs).logits
        with speciarl.lora_disabled(model):
            without = model(**inputs).logits
        base = base_model(**inputs).logits
    assert (with_adapters - base).abs().max() > 1e-2  # the adapters do something
    assert torch.allclose(without, base, atol=1e-6)  # adapters off = the frozen base model (the KL reference)
    merged_sd = speciarl.merge_lora_state_dict(model.state_dict())
    assert not any("lora" in k or ".base." in k for k in merged_sd)
    assert set(merged_sd) == set(base_model.state_dict())
    # the export is a plain Qwen2.5-VL directory whose logits equal the adapted model's
    lifecycle.export_hf(model, proc, str(tmp_path / "final"), dtype="fp32")
    reloaded, _ = common.load_model(str(tmp_path / "final"), device=torch.device("cpu"))
    with torch.no_grad():
        merged = reloaded(**inputs).logits
    assert torch.allclose(merged, with_adapters, atol=1e-4), (merged - with_adapters).abs().max()


def test_lora_only_adapters_train(lora_model):
    """Two real update steps of the SpeciaRL loss: every adapter moves, nothing else does (vision included)."""
    model, proc = lora_model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert all(".language_model.layers." in n for n in trainable)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = speciarl.parse_args(["--data", "toy", "--minibatches", "2", "--micro-batch", "3", "--beta", "0.01"])
    args.precision = common.precision_for(args.dtype, common.Dist(), args.parallel)  # what main sets
    _, prompts = _inputs(model, proc, n=2)
    G = 3
    rollout = common.sample(model, proc, prompts, group_size=G, max_new_tokens=12, temperature=1.0,
                            generator=torch.Generator().manual_seed(0))
    rows = rollout.row_prompts
    old = common.completion_logprobs(model, proc, rows, rollout.completion_ids, rollout.completion_mask)
    with speciarl.lora_disabled(model):
        ref = common.completion_logprobs(model, proc, rows, rollout.completion_ids, rollout.completion_mask)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 1.0, -1.0])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    pad = common.special_token_ids(proc)["<|endoftext|>"]
    stats = speciarl.update_policy(args, model, opt, lifecycle.NonFiniteGuard(), rows, rollout.completion_ids,
                                   rollout.completion_mask, adv, old, ref, pad, step=0, total_steps=1)
    assert stats["grad_norm"] > 0
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if k.endswith(("lora_A", "lora_B"))}


def test_kl_is_clamped_at_ten_like_verls_low_var_kl():
    """verl's low_var_kl (the paper's trainer) bounds the per-token k3 to [-10, 10]: a token whose k3 is above 10
    counts 10 and pulls back with no gradient; a token below the bound keeps the plain k3 and its gradient."""
    logp = torch.tensor([[-1.0, -1.0]], requires_grad=True)
    ref = torch.tensor([[-1.0 + 3.0, -1.0 + 0.5]])  # d = ref - logp: 3 -> k3 = e^3 - 4 = 16.09; 0.5 -> 0.1487
    zero = torch.zeros(1)
    loss, stats = speciarl.speciarl_loss(logp, logp.detach(), ref, zero, torch.ones(1, 2), clip_eps=0.2,
                                         dual_clip=3.0, beta=1.0)
    k3_small = math.exp(0.5) - 0.5 - 1
    assert math.exp(3.0) - 4.0 > 10
    assert loss.item() == pytest.approx(10.0 + k3_small, abs=1e-5)
    assert stats["kl"].item() == pytest.approx(10.0 + k3_small, abs=1e-5)
    loss.backward()
    assert logp.grad[0, 0].item() == 0.0  # clamped: no pull-back beyond the bound
    assert logp.grad[0, 1].item() == pytest.approx(1 - math.exp(0.5), abs=1e-5)  # d k3 / d logp = 1 - e^d
