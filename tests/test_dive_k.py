"""DiVE-k unit tests: option mining on fixed fake answers, the reward registry on a truth table, advantages and the
hand-written loss against hand computations (both aggregation modes, with and without KL and clipping)."""
import json
import random

import pytest
import torch

import common
import dive_k
import judges
import lifecycle

BASE = ["Black footed Albatross", "Laysan Albatross", "Sooty Albatross", "Chuck will Widow", "Brewer Blackbird",
        "Red winged Blackbird", "Rusty Blackbird", "Bobolink"]


def question(answers, truth, seed=0, **kw):
    return dive_k.build_question(answers, truth, BASE, random.Random(seed), **kw)


# ----- mining -----

def test_top_k_by_frequency_with_truth_present():
    answers = (["Laysan Albatross"] * 6 + ["Sooty Albatross"] * 5 + ["Black footed Albatross"] * 3 +
               ["Bobolink"] * 2 + ["Rusty Blackbird"] * 2 + ["Brewer Blackbird"] * 1 + [None, "a bird", "Gull"])
    q = question(answers, "Bobolink")
    assert q["status"] == "kept"
    # five most frequent; Rusty (2) ties with Bobolink (2) and comes after it (first seen later); Brewer (1) is out
    assert sorted(q["options"]) == sorted(["Laysan Albatross", "Sooty Albatross", "Black footed Albatross",
                                           "Bobolink", "Rusty Blackbird"])
    assert q["options"][judges.LETTERS.index(q["answer"])] == "Bobolink"
    assert q["counts"] == {"Laysan Albatross": 6, "Sooty Albatross": 5, "Black footed Albatross": 3, "Bobolink": 2,
                           "Rusty Blackbird": 2, "Brewer Blackbird": 1}
    assert q["n_valid"] == 19 and q["n_samples"] == 22
    assert not q["truth_inserted"] and not q["padded"]


def test_missing_truth_replaces_the_least_frequent_option():
    answers = (["Laysan Albatross"] * 5 + ["Sooty Albatross"] * 4 + ["Rusty Blackbird"] * 3 +
               ["Brewer Blackbird"] * 2 + ["Bobolink"] * 1 + ["Black footed Albatross"] * 1)
    q = question(answers, "Chuck will Widow")
    # top-5 = Laysan, Sooty, Rusty, Brewer, Bobolink (Bobolink seen before Black footed); Bobolink is replaced
    assert sorted(q["options"]) == sorted(["Laysan Albatross", "Sooty Albatross", "Rusty Blackbird",
                                           "Brewer Blackbird", "Chuck will Widow"])
    assert q["truth_inserted"] and not q["padded"]
    assert q["options"][judges.LETTERS.index(q["answer"])] == "Chuck will Widow"
    # with fewer than five distinct answers the truth still replaces the least frequent one
    q = question(["Laysan Albatross"] * 3 + ["Sooty Albatross"] * 2, "Bobolink")
    assert sorted(q["options"]) == ["Bobolink", "Laysan Albatross"] and q["truth_inserted"]


def test_easy_image_is_dropped():
    q = question(["Bobolink"] * 7 + ["a bobolink?", None, "Gull"], "Bobolink")  # invalid answers do not count
    assert q["status"] == "easy" and q["options"] is None
    # online mining keeps it, with 2 random base classes
    q = question(["Bobolink"] * 7, "Bobolink", drop_easy=False)
    assert q["status"] == "easy" and len(q["options"]) == 3 and "Bobolink" in q["options"] and q["padded"]


@pytest.mark.parametrize("seed", range(5))
def test_one_distinct_answer_gets_the_truth_and_two_random_base_classes(seed):
    """The released code's rule where the paper is silent: with at most one distinct valid answer, the truth and 2
    random classes join it (4 options after one wrong answer, 3 after none)."""
    # no valid answer at all: truth + 2 random base classes
    q = question([None, "Gull", "Western Gull"], "Bobolink", seed=seed)
    assert len(q["options"]) == 3 and len(set(q["options"])) == 3 and set(q["options"]) <= set(BASE)
    assert "Bobolink" in q["options"] and q["padded"] and q["truth_inserted"]
    # one distinct wrong answer: it stays, the truth joins, two random base classes
    q = question(["Rusty Blackbird"] * 9, "Bobolink", seed=seed)
    assert len(q["options"]) == 4 and len(set(q["options"])) == 4
    assert {"Rusty Blackbird", "Bobolink"} <= set(q["options"])
    assert set(q["options"]) <= set(BASE) and q["padded"]
    # two distinct answers: no random classes
    q = question(["Rusty Blackbird"] * 3 + ["Bobolink"], "Bobolink", seed=seed)
    assert sorted(q["options"]) == ["Bobolink", "Rusty Blackbird"] and not q["padded"]


def test_answer_format_prefix_is_stripped_and_long_answers_are_ignored():
    """'species name: Laysan Albatross' is Laysan Albatross (the released mining strips its format's prefix); an
    answer over 120 characters is not counted."""
    prefixed = ["species name: Laysan Albatross"] * 4 + ["Species Name: Sooty Albatross"] * 2
    q = question(prefixed, "Laysan Albatross")
    assert q["counts"] == {"Laysan Albatross": 4, "Sooty Albatross": 2} and q["status"] == "kept"
    assert question(["species name: Laysan Albatross"] * 5, "Laysan Albatross")["status"] == "easy"
    cars = dive_k.build_question(["make model: 2012 Audi TTS Coupe"] * 3, "2012 Audi TTS Coupe",
                                 ["2012 Audi TTS Coupe", "2012 Audi R8 Coupe"], random.Random(0),
                                 prefixes=("make model: ",))
    assert cars["status"] == "easy"
    name = "Laysan Albatross of the " + "far northern Pacific islands " * 4  # a class name of 135 characters
    q = dive_k.build_question([name] * 3 + ["Sooty Albatross"] * 2, "Sooty Albatross", [name, "Sooty Albatross"],
                              random.Random(0))
    assert len(judges.normalize(name)) > 120 and q["counts"] == {"Sooty Albatross": 2} and q["status"] == "easy"
    assert dive_k.build_question([name] * 3, "Sooty Albatross", [name, "Sooty Albatross"], random.Random(0),
                                 max_chars=200)["counts"] == {name: 3}
    # the released mining maps the correct spelling "barberton" to Flowers' class name "barbeton daisy"
    flowers = ["barbeton daisy", "oxeye daisy"]
    daisy = dive_k.build_question(["Barberton Daisy"] * 3 + ["barbeton daisy", "oxeye daisy"], "oxeye daisy",
                                  flowers, random.Random(0))
    assert daisy["counts"] == {"barbeton daisy": 4, "oxeye daisy": 1}


def test_hyphens_case_and_possessives_normalise_to_the_class_name():
    answers = ["black-footed albatross", "Black-Footed  Albatross", "Chuck-will's-widow", "chuck will widow",
               "BLACK FOOTED ALBATROSS.", "Laysan-Albatross"]
    q = question(answers, "Laysan Albatross")
    assert q["counts"] == {"Black footed Albatross": 3, "Chuck will Widow": 2, "Laysan Albatross": 1}
    assert sorted(q["options"]) == sorted(["Black footed Albatross", "Chuck will Widow", "Laysan Albatross"])


def test_names_outside_the_base_classes_are_not_options():
    q = question(["Western Gull"] * 6 + ["Bobolink"] * 2 + ["Rusty Blackbird"], "Bobolink")
    assert "Western Gull" not in q["options"] and "Western Gull" not in q["counts"]
    assert sorted(q["options"]) == ["Bobolink", "Rusty Blackbird"]


def test_options_are_shuffled_and_lettered_deterministically():
    answers = ["Laysan Albatross"] * 5 + ["Sooty Albatross"] * 4 + ["Bobolink"] * 3 + ["Rusty Blackbird"] * 2
    orders = {tuple(question(answers, "Bobolink", seed=s)["options"]) for s in range(12)}
    assert len(orders) > 1  # shuffled
    assert question(answers, "Bobolink", seed=3) == question(answers, "Bobolink", seed=3)
    text = dive_k.mcq_prompt("bird", ["Laysan Albatross", "Bobolink"])
    assert "\nA. Laysan Albatross\nB. Bobolink\n" in text


def test_read_jsonl_skips_a_cut_last_line_and_rejects_garbage(tmp_path):
    path = tmp_path / "mcq.part0.jsonl"
    path.write_text(json.dumps({"id": "a"}) + "\n" + '{"id": "b", "opt')
    assert common.read_jsonl(str(path), skip_cut_tail=True) == [{"id": "a"}]
    with pytest.raises(SystemExit, match="mcq.part0.jsonl: line 2 is not JSON"):
        common.read_jsonl(str(path))  # a cut line is an error where nothing redoes it
    path.write_text(json.dumps({"id": "a"}) + "\n\n" + "not json\n" + json.dumps({"id": "c"}) + "\n")
    with pytest.raises(SystemExit, match="mcq.part0.jsonl: line 3 is not JSON"):  # blank lines counted, as an editor
        common.read_jsonl(str(path), skip_cut_tail=True)
    with pytest.raises(SystemExit, match=r"line 1 lacks \['options'\]"):
        common.read_jsonl(str(path), required=("id", "options"))


# ----- rewards -----

MCQ = {"options": ["Laysan Albatross", "Bobolink", "Rusty Blackbird"], "answer": "B"}
TRUTH_TABLE = [  # completion, format, mcq
    ("<think>it looks like a bobolink.</think>\n<answer>B</answer>", 1, 1),
    ("<think>x</think> <answer> B. Bobolink </answer>", 1, 1),
    ("<think>x</think><answer>(B)</answer>", 1, 1),
    ("<think>x</think><answer>b</answer>", 1, 1),
    ("<think>x</think><answer>A</answer>", 1, 0),
    ("<think>x</think><answer>D</answer>", 1, 0),  # no option D
    ("<think>x</think><answer>A, B</answer>", 1, 0),  # hedged
    ("<think>x</think><answer>A or B.</answer>", 1, 0),  # hedged with 'or' (only B is followed by punctuation)
    ("<think>x</think><answer>Either A or B</answer>", 1, 0),
    ("<think>x</think><answer>The answer is B.</answer>", 1, 1),
    ("<think>x</think><answer>Option B</answer>", 1, 1),
    ("<think>x</think><answer>B. a bobolink</answer>", 1, 1),  # an article after the letter is no hedge
    ("<think>x</think><answer>B</answer><answer>A</answer>", 1, 1),  # the first answer counts
    ("<think>x</think><answer>bobolink</answer>", 1, 1),  # exactly one option's text chooses it (the stand-in)
    ("<think>x</think><answer>Laysan</answer>", 1, 0),  # part of an option's text is no choice
    ("<think>x</think><answer>Western Gull</answer>", 1, 0),  # a name outside the options
    ("<think>x</think><answer>A bird</answer>", 1, 0),  # 'A' as an article is no letter
    # a letter before a bracket counts only as "(B)" or opening the answer: "B (not A)" chooses nothing (released)
    ("<think>x</think><answer>B (not A)</answer>", 1, 0),
    ("<think>x</think><answer>B) Bobolink</answer>", 1, 1),
    ("<answer>B</answer>", 0, 1),  # no think: format fails, the letter still counts
    ("<think>x</think><answer>B</answer> trailing", 0, 1),
    ("<think>x</think> B", 0, 0),  # no answer tag
    ("", 0, 0),
]


@pytest.mark.parametrize("completion,fmt,mcq", TRUTH_TABLE)
def test_reward_functions_on_a_truth_table(completion, fmt, mcq):
    assert dive_k.REWARDS["format"]([completion], MCQ) == [fmt]
    assert dive_k.REWARDS["mcq"]([completion], MCQ) == [mcq]
    weights = lifecycle.parse_rewards("format,mcq=2", dive_k.REWARDS)
    total, parts = lifecycle.group_rewards(dive_k.REWARDS, weights, [completion, ""], MCQ)
    assert total.tolist() == [fmt + 2 * mcq, 0.0] and parts["format"].tolist() == [fmt, 0.0]
    assert parts["mcq"].tolist() == [mcq, 0.0]


def test_random_reward_ignores_the_completion():
    random.seed(0)
    good = dive_k.REWARDS["random"]([TRUTH_TABLE[0][0]] * 400, MCQ)
    assert set(good) == {0.0, 1.0} and 0.4 < sum(good) / 400 < 0.6


# ----- advantages -----

def test_group_advantages_against_hand_computation():
    rewards = torch.tensor([2.0, 0.0, 1.0, 1.0, 0.0, 1.0, 2.0, 1.0])
    adv, zero = dive_k.group_advantages(rewards, 4, eps=1e-4)
    # group 1: mean 1, unbiased std sqrt((1+1+0+0)/3) = 0.8165; group 2: mean 1, std sqrt(2/3) as well
    s = (2 / 3) ** 0.5
    expect = torch.tensor([1, -1, 0, 0, -1, 0, 1, 0]) / (s + 1e-4)
    assert torch.allclose(adv, expect, atol=1e-6)
    assert zero.tolist() == [False, False]
    adv, zero = dive_k.group_advantages(torch.tensor([1.0, 1.0, 2.0, 0.0]), 2, eps=1e-4)
    assert zero.tolist() == [True, False] and adv[:2].tolist() == [0.0, 0.0]
    assert torch.allclose(adv[2:], torch.tensor([1.0, -1.0]) / (2 ** 0.5 + 1e-4))
    adv, _ = dive_k.group_advantages(torch.tensor([2.0, 0.0, 1.0, 1.0]), 4, scale=False)  # Dr. GRPO
    assert adv.tolist() == [1.0, -1.0, 0.0, 0.0]


# ----- loss -----

LOGP = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, -2.0]])  # [B=2, T=3]
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
ADV = torch.tensor([1.0, -1.0])


def run_loss(old=None, ref=None, beta=0.0, agg="seq", normalizer=2.0, clip=0.2):
    logp = LOGP.clone().requires_grad_(True)
    loss, stats = dive_k.grpo_loss(logp, logp.detach() if old is None else old, ref, ADV, MASK, beta=beta,
                                   clip_low=clip, clip_high=clip, loss_agg=agg, normalizer=normalizer)
    loss.backward()
    return float(loss.detach()), logp.grad, stats


def test_on_policy_loss_per_sequence_and_token_mean():
    # the docstring's worked example
    loss, grad, stats = run_loss(agg="seq", normalizer=2.0)
    assert loss == pytest.approx(0.0)
    # d/dlogp of -A * mean_t(rho): -A_i / len_i / B on unmasked tokens
    assert torch.allclose(grad, torch.tensor([[-1 / 2 / 2, -1 / 2 / 2, 0], [1 / 3 / 2, 1 / 3 / 2, 1 / 3 / 2]]))
    assert stats == {"kl_sum": 0.0, "clipped_sum": 0.0, "tokens": 5.0}
    loss, grad, _ = run_loss(agg="token", normalizer=5.0)
    assert loss == pytest.approx(0.2)
    assert torch.allclose(grad, torch.tensor([[-1 / 5, -1 / 5, 0], [1 / 5, 1 / 5, 1 / 5]]))


@pytest.mark.parametrize("agg,normalizer", [("seq", 2.0), ("token", 5.0)])
def test_k3_kl_term_against_hand_computation(agg, normalizer):
    ref = torch.tensor([[-1.5, -1.0, -9.0], [-0.3, -2.0, -1.0]])
    beta = 0.04
    loss, grad, stats = run_loss(ref=ref, beta=beta, agg=agg, normalizer=normalizer)
    delta = ref - LOGP
    k3 = torch.exp(delta) - delta - 1  # per token
    per_token = -ADV[:, None] + beta * k3
    if agg == "seq":
        expect = ((per_token * MASK).sum(1) / MASK.sum(1)).sum() / normalizer
        weight = MASK / MASK.sum(1, keepdim=True) / normalizer
    else:
        expect = (per_token * MASK).sum() / normalizer
        weight = MASK / normalizer
    assert loss == pytest.approx(float(expect), rel=1e-6)
    # d k3 / d logp = 1 - exp(ref - logp)
    expect_grad = weight * (-ADV[:, None] + beta * (1 - torch.exp(delta)))
    assert torch.allclose(grad, expect_grad, atol=1e-6)
    assert stats["kl_sum"] == pytest.approx(float((k3 * MASK).sum()), rel=1e-6)
    # the masked third token of row 0 has a large k3 and must not count
    assert k3[0, 2] > 1 and stats["tokens"] == 5.0


def test_ratio_clipping_against_hand_computation():
    # old log-probs chosen so that rho = exp(logp - old) is 1.5 / 1.1 / 0.7 ... per token
    rho = torch.tensor([[1.5, 1.1, 1.0], [0.7, 1.3, 0.9]])
    old = LOGP - torch.log(rho)
    loss, grad, stats = run_loss(old=old, agg="seq", normalizer=2.0, clip=0.2)
    # A = +1 row: min(rho, clip(rho)) -> 1.2 for 1.5 (clipped, no gradient), 1.1 unclipped
    # A = -1 row: min(-rho, -clip(rho)) -> -0.8 for 0.7 (clipped: -clip = -0.8 < -0.7), -1.3 for 1.3 (unclipped),
    #             -0.9 for 0.9
    row0 = -(1.2 + 1.1) / 2
    row1 = -(-0.8 - 1.3 - 0.9) / 3
    assert loss == pytest.approx((row0 + row1) / 2, rel=1e-6)
    # gradient: clipped tokens 0; others -A * rho / len / B
    expect = torch.tensor([[0.0, -1.1 / 2 / 2, 0.0], [0.0, 1.3 / 3 / 2, 0.9 / 3 / 2]])
    assert torch.allclose(grad, expect, atol=1e-6)
    assert stats["clipped_sum"] == 2.0  # two tokens where the clipped branch was taken


@pytest.mark.parametrize("agg", ["seq", "token"])
def test_micro_batches_add_up_to_the_full_batch(agg):
    """Gradient accumulation: the per-micro-batch losses with the step's normaliser sum to the one-shot loss."""
    torch.manual_seed(0)
    logp = torch.randn(6, 5)
    mask = (torch.rand(6, 5) > 0.3).float()
    mask[:, 0] = 1
    adv = torch.randn(6)
    ref = logp + 0.1 * torch.randn(6, 5)
    normalizer = 6.0 if agg == "seq" else float(mask.sum())
    kw = dict(beta=0.04, clip_low=0.2, clip_high=0.28, loss_agg=agg, normalizer=normalizer)
    full_p = logp.clone().requires_grad_(True)
    full, _ = dive_k.grpo_loss(full_p, full_p.detach(), ref, adv, mask, **kw)
    full.backward()
    part_p = logp.clone().requires_grad_(True)
    total = 0.0
    for rows in (slice(0, 2), slice(2, 6)):
        p = part_p[rows]
        loss, _ = dive_k.grpo_loss(p, p.detach(), ref[rows], adv[rows], mask[rows], **kw)
        loss.backward()
        total += float(loss.detach())
    assert total == pytest.approx(float(full.detach()), rel=1e-5, abs=1e-7)
    assert torch.allclose(part_p.grad, full_p.grad, atol=1e-7)


# ----- flags -----

def test_toy_preset_fills_only_unset_flags_and_paper_defaults_elsewhere():
    toy = dive_k.parse_args(["--data", "toy", "--lr", "3e-4"])
    assert toy.lr == 3e-4 and toy.group_size == dive_k.TOY["group_size"] and toy.beta == dive_k.TOY["beta"]
    assert toy.mine_samples == dive_k.TOY["mine_samples"] and toy.max_new_tokens == dive_k.TOY["max_new_tokens"]
    cub = dive_k.parse_args(["--data", "cub"])
    assert (cub.group_size, cub.prompts_per_step, cub.lr, cub.beta, cub.max_new_tokens, cub.mine_samples) == \
        (4, 6, 1e-6, 0.04, 1024, 20)
    assert (cub.mine_temperature, cub.mine_top_p, cub.mine_repetition_penalty, cub.max_options) == (1.0, 0.95, 1.1, 5)
    assert (cub.adv_eps, cub.updates_per_batch, cub.loss_agg, cub.lr_schedule) == (1e-4, 1, "seq", "linear")
    assert (cub.min_pixels, cub.max_pixels) == (3136, 401408)
    with pytest.raises(SystemExit):
        dive_k.parse_args(["--data", "toy", "--group-size", "1"])


def test_loss_normalizer_per_rank():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]])
    assert dive_k.loss_normalizer("seq", mask, world_size=2) == 3.0  # completions on this rank
    # token: all ranks' tokens of the step / world size (one process here: 6 / 1)
    assert dive_k.loss_normalizer("token", mask, world_size=1) == 6.0
