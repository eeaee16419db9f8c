"""fine_r1.py unit tests: the SFT label mask, triplets, rewards, advantages, the TAPO loss by hand, dynamic sampling,
the rationale filter and the toy preset. Seconds on a CPU."""
import json
import math
import os
import random
import re
from types import SimpleNamespace

import pytest
import torch

import common
import lifecycle
import data
import fine_r1
import judges


# ----- SFT: the loss sees the assistant tokens only -----

def test_sft_labels_are_the_assistant_tokens_only(tiny, toy_test):
    """common.sft_loss on fine_r1's (prompt, target) pairs equals the Hugging Face loss of the whole rendered
    conversation (chat template with the assistant turn) with every prompt position labelled -100."""
    model, proc = tiny
    tok = proc.tokenizer
    ids = common.special_token_ids(proc)
    exs = [toy_test.examples[0], toy_test.examples[40]]
    records = [{"image": ex.image, "class_name": ex.class_name, "question": fine_r1.pose_question("shape", ex.id)[0],
                "response": fine_r1.response_text(
                    fine_r1.attribute_rationale(ex.class_name, ["red plain circle"] * (i + 1)), ex.class_name)}
               for i, ex in enumerate(exs)]
    pairs = [fine_r1.sft_example(proc, r) for r in records]
    rows, labels = [], []
    for r, (prompt, target) in zip(records, pairs):
        # the target is exactly the response followed by <|im_end|>, nothing of the prompt
        assert tok.decode(target[:-1]) == r["response"] and int(target[-1]) == ids["<|im_end|>"]
        messages = common.chat_messages(r["question"]) + [{"role": "assistant", "content": r["response"]}]
        text = proc.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        full = proc(text=[text], images=[common.open_image(r["image"])], return_tensors="pt")
        n_prompt, n_target = len(prompt), len(target)
        assert full["input_ids"][0, :n_prompt].tolist() == prompt.input_ids.tolist()  # the prompt is a prefix
        assert full["input_ids"][0, n_prompt:n_prompt + n_target].tolist() == target.tolist()
        label = torch.full_like(full["input_ids"][0], -100)
        label[n_prompt:n_prompt + n_target] = target  # the assistant turn, up to and including <|im_end|>
        rows.append(full)
        labels.append(label)
    width = max(r["input_ids"].shape[1] for r in rows)

    def right_pad(t, value):
        return torch.nn.functional.pad(t, (0, width - t.shape[-1]), value=value)
    batch = dict(input_ids=torch.stack([right_pad(r["input_ids"][0], ids["<|endoftext|>"]) for r in rows]),
                 attention_mask=torch.stack([right_pad(r["attention_mask"][0], 0) for r in rows]),
                 mm_token_type_ids=torch.stack([right_pad(r["mm_token_type_ids"][0], 0) for r in rows]),
                 pixel_values=torch.cat([r["pixel_values"] for r in rows]),
                 image_grid_thw=torch.cat([r["image_grid_thw"] for r in rows]))
    hf_labels = torch.stack([right_pad(lab, -100) for lab in labels])
    with torch.no_grad():
        ours = common.sft_loss(model, proc, [p for p, _ in pairs], [t for _, t in pairs])
        reference = model(**batch, labels=hf_labels).loss
        # the mask matters: labelling the prompt as well gives a different loss
        everything = torch.where(batch["attention_mask"].bool(), batch["input_ids"], -100)
        everything[batch["mm_token_type_ids"].bool()] = -100
        unmasked = model(**batch, labels=everything).loss
    assert abs(float(ours) - float(reference)) < 1e-4, (float(ours), float(reference))
    assert abs(float(unmasked) - float(reference)) > 1e-2


# ----- triplets -----

def _pool(names, per_class):
    exs = [data.Example(f"/img/{n}_{i}.png", label, n, f"{n}_{i}") for label, n in enumerate(names)
           for i in range(per_class)]
    by_class = {}
    for e in exs:
        by_class.setdefault(e.class_name, []).append(e)
    return exs, by_class


@pytest.mark.parametrize("how", ["random", "confusable"])
def test_triplets_positive_same_class_other_image_negative_other_class(how):
    names = data.toy_class_names()[:12]
    exs, by_class = _pool(names, 4)
    negatives = fine_r1.negative_classes(names, how, 3)
    seen_negative_classes = set()
    for seed in range(30):
        rng = random.Random(seed)
        for anchor in exs:
            t = fine_r1.make_triplet(anchor, by_class, negatives, rng)
            assert t.anchor is anchor
            assert t.positive.class_name == anchor.class_name and t.positive.image != anchor.image
            assert t.negative.class_name != anchor.class_name
            assert t.negative.class_name in negatives[anchor.class_name]
            seen_negative_classes.add((anchor.class_name, t.negative.class_name))
    for name in names:  # every candidate class gets drawn (3 confusable ones, or all 11 others)
        assert {b for a, b in seen_negative_classes if a == name} == set(negatives[name])
        assert len(negatives[name]) == (3 if how == "confusable" else 11)


def test_confusable_classes_are_the_nearest_names():
    names = data.toy_class_names()
    near = fine_r1.confusable_classes(names, 3)
    for name, others in near.items():
        assert name not in others and len(others) == 3
        for o in others:  # on toy, the most similar names differ in exactly one attribute
            assert sum(a != b for a, b in zip(name.split(), o.split())) == 1, (name, o)
    # 2 of 4 distinct words shared (Jaccard 0.5); 12 matching characters of 18 + 16 (ratio 24/34)
    assert fine_r1.name_similarity("red striped circle", "red plain circle") == pytest.approx(0.5 + 0.5 * 24 / 34)


def test_a_class_with_one_image_cannot_give_a_positive():
    exs, by_class = _pool(["a b c", "d e f"], 1)
    with pytest.raises(SystemExit, match="single training image"):
        fine_r1.make_triplet(exs[0], by_class, fine_r1.negative_classes(["a b c", "d e f"], "random", 1),
                             random.Random(0))


# ----- reward, advantage -----

def test_rewards_truth_table():
    truth = "Red Striped Circle"
    cases = [  # completion, accuracy (lowercased truth inside <answer>: the paper), exact (normalised equality), format
        ("<think>x</think>\n\n<answer>red striped circle</answer>", 1, 1, 1),
        ("<think>x</think><answer>a RED STRIPED CIRCLE, I think</answer>", 1, 0, 1),
        ("<think>x</think><answer>red-striped circle.</answer>", 0, 1, 1),
        ("<think>x</think><answer>red striped square, red striped circle</answer>", 1, 0, 1),  # a hedge
        # the first <answer> runs to the first </answer>, as the papers' code reads it: the truth is inside, but the
        # text is not exactly the truth
        ("<think>x <answer>red striped circle\n</think><answer>red striped circle</answer>", 1, 0, 1),
        ("<think>x</think><answer>red circle</answer>", 0, 0, 1),
        ("<answer>red striped circle</answer>", 1, 1, 0),
        ("<think>x</think><answer>red striped circle</answer> trailing", 1, 1, 0),
        ("<think>red striped circle</think>", 0, 0, 0),
        ("red striped circle", 0, 0, 0),
    ]
    texts, example = [c[0] for c in cases], {"truth": truth}
    assert fine_r1.accuracy_reward(texts, example) == [float(c[1]) for c in cases]
    assert fine_r1.exact_reward(texts, example) == [float(c[2]) for c in cases]
    assert fine_r1.format_reward(texts, example) == [float(c[3]) for c in cases]
    reward, parts = fine_r1.score(texts, example, {"accuracy": 0.9, "format": 0.1})
    assert torch.allclose(reward, torch.tensor([0.9 * a + 0.1 * f for _, a, _, f in cases]))
    assert parts["accuracy"].tolist() == [float(a) for _, a, _, _ in cases]
    # the released reward first removes the whitespace around every <, > and /: (completion, truth, accuracy, format)
    spaced = [("<think> x </think>\n<answer> red striped circle </answer>\n", truth, 1, 1),
              (" < think >x< / think > < answer >red striped circle< / answer >", truth, 1, 1),
              ("<think>x</think><answer>F-16A / B</answer>", "F-16A/B", 1, 1),
              ("<think>x</think><answer>red striped circle</answer> trailing", truth, 1, 0)]
    for text, name, acc, fmt in spaced:
        _, parts = fine_r1.score([text], {"truth": name}, {"accuracy": 0.9, "format": 0.1})
        assert parts["accuracy"].tolist() == [acc] and parts["format"].tolist() == [fmt], text
    assert fine_r1.accuracy_reward([spaced[1][0]], example) == [0]  # the functions alone read the text as given
    weights = lifecycle.parse_rewards("exact=0.9,format", fine_r1.REWARDS)
    assert weights == {"exact": 0.9, "format": 1.0} and list(weights) == ["exact", "format"]  # order kept: the first
    with pytest.raises(SystemExit):  # is what dynamic sampling filters on
        lifecycle.parse_rewards("accuracy=0.9,lenght=0.1", fine_r1.REWARDS)


def test_group_advantages_z_score_over_the_group_of_ten():
    rewards = torch.tensor([1.0, 0.1, 0.1, 1.0, 0.0, 1.0, 0.1, 0.1, 0.1, 1.0] + [0.1] * 10)  # two groups of 10
    adv = fine_r1.group_advantages(rewards, 10, eps=1e-6)
    g = rewards[:10].tolist()
    mean = sum(g) / 10
    std = math.sqrt(sum((x - mean) ** 2 for x in g) / 9)  # unbiased
    assert torch.allclose(adv[:10], torch.tensor([(x - mean) / (std + 1e-6) for x in g]), atol=1e-6)
    assert torch.equal(adv[10:], torch.zeros(10))  # equal rewards: no signal


# ----- the TAPO loss against a hand computation -----

def _hand_tapo(logp, old, neg, adv, mask, normalizer, clip_low=0.2, clip_high=0.28, dual=3.0, kl_c=0.01, h_c=0.03,
               hn_c=0.03):
    """Term by term, token by token, in plain Python."""
    pg = kl = h = hn = 0.0
    for i in range(len(logp)):
        a = adv[i]
        for t in range(len(logp[i])):
            if not mask[i][t]:
                continue
            rho = math.exp(max(-20.0, min(20.0, logp[i][t] - old[i][t])))
            rho_c = max(1 - clip_low, min(1 + clip_high, rho))
            loss = max(-a * rho, -a * rho_c)
            if a < 0:
                loss = min(loss, -dual * a)
            pg += loss
            delta = max(-20.0, min(20.0, neg[i][t] - logp[i][t]))
            kl += max(-10.0, min(10.0, math.exp(delta) - delta - 1))
            h += -logp[i][t]
            hn += -neg[i][t]
    terms = {"pg": pg / normalizer, "kl_neg": kl / normalizer, "entropy": h / normalizer,
             "entropy_neg": hn / normalizer}
    terms["loss"] = terms["pg"] - kl_c * terms["kl_neg"] + h_c * terms["entropy"] + hn_c * terms["entropy_neg"]
    return terms


def test_tapo_loss_matches_a_hand_computation_including_the_clamps():
    # row 0 (A > 0): ratio inside the clip; ratio far above 1 + 0.28 (clipped); log-ratio 30 clamped to 20
    # row 1 (A < 0): ratio below 1 - 0.2 (clipped); ratio 2.5 -> dual clip 3|A| acts; a masked token with
    #                extreme values that must not count
    # delta = neg - logp: 25 (clamped to 20, then k3 clamped to 10), -30 (k3 = e^-20 + 19 -> 10), small ones
    logp = [[-1.0, -0.5, -0.2], [-2.0, -0.1, -50.0]]
    old = [[-1.1, -1.5, -30.2], [-1.5, -1.0, 0.0]]
    neg = [[-3.0, 24.5, -30.2], [-1.8, -0.3, 40.0]]
    adv = [0.7, -1.3]
    mask = [[1, 1, 1], [1, 1, 0]]
    normalizer = 2.5
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    lp = t(logp).requires_grad_(True)
    loss, terms = fine_r1.tapo_loss(lp, t(old), t(neg), t(adv), t(mask), normalizer=normalizer)
    hand = _hand_tapo(logp, old, neg, adv, mask, normalizer)
    for key in ("loss", "pg", "kl_neg", "entropy", "entropy_neg"):
        assert float(terms[key]) == pytest.approx(hand[key], rel=1e-9, abs=1e-12), key
    assert float(loss.detach()) == pytest.approx(hand["loss"], rel=1e-9)
    # the gradient with respect to logp equals finite differences of the hand computation
    loss.backward()
    for i, j in [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]:
        h = 1e-6
        up = [row[:] for row in logp]
        dn = [row[:] for row in logp]
        up[i][j] += h
        dn[i][j] -= h
        fd = (_hand_tapo(up, old, neg, adv, mask, normalizer)["loss"]
              - _hand_tapo(dn, old, neg, adv, mask, normalizer)["loss"]) / (2 * h)
        assert float(lp.grad[i, j]) == pytest.approx(fd, abs=1e-6), (i, j)
    assert float(lp.grad[1, 2]) == 0.0  # masked
    # at the clamped tokens the k3 term gives no gradient: only -A*1.28 (0) and the entropy term (-0.03/2.5) remain
    assert float(lp.grad[0, 1]) == pytest.approx(-0.03 / normalizer)


def test_tapo_dual_clip_and_worked_example():
    one = lambda x: torch.tensor([x], dtype=torch.float64)  # noqa: E731
    # A = -1, ratio e^2 = 7.39: PPO gives -A*rho = 7.39; the dual clip caps it at 3|A| = 3
    _, terms = fine_r1.tapo_loss(one([0.0]), one([-2.0]), one([0.0]), torch.tensor([-1.0], dtype=torch.float64),
                                 one([1.0]), normalizer=1.0)
    assert float(terms["pg"]) == pytest.approx(3.0)
    assert float(terms["clip_frac"]) == pytest.approx(1.0)
    # the docstring's worked example
    loss, terms = fine_r1.tapo_loss(one([-1.0, -2.0]), one([-1.0, -1.0]), one([-3.0, -2.0]),
                                    torch.tensor([-1.0], dtype=torch.float64), one([1.0, 1.0]), normalizer=2.0)
    assert float(loss) == pytest.approx(0.9 - 0.01 * (math.exp(-2) + 1) / 2 + 0.03 * 1.5 + 0.03 * 2.5)
    assert float(loss) == pytest.approx(1.01432, abs=1e-5)


# ----- dynamic sampling -----

def test_keep_groups_strictly_inside_the_bounds():
    acc = torch.tensor([0.0, 0.005, 0.01, 0.1, 0.5, 0.9, 0.99, 0.995, 1.0])
    assert fine_r1.keep_groups(acc, 0.01, 0.99).tolist() == [False, False, False, True, True, True, False, False, False]
    # groups of 10 responses: k right answers -> kept iff 1 <= k <= 9
    assert fine_r1.keep_groups(torch.arange(11) / 10).tolist() == [False] + [True] * 9 + [False]


def test_dynamic_sampling_keeps_exactly_the_groups_inside_and_samples_until_full():
    rounds = [[0.0, 0.3, 1.0, 0.5], [1.0, 0.0, 0.0, 0.1], [0.9, 0.2, 0.7, 0.0]]
    calls = []

    def sample_round(i):
        calls.append(i)
        return [SimpleNamespace(accuracy=a, tag=(i, j)) for j, a in enumerate(rounds[i])]
    groups, stats = fine_r1.dynamic_sampling(sample_round, quota=4, max_rounds=8)
    assert calls == [0, 1, 2]  # stopped as soon as 4 groups were kept
    assert [g.tag for g in groups] == [(0, 1), (0, 3), (1, 3), (2, 0)]  # the first four kept, in sampling order
    assert all(0.01 < g.accuracy < 0.99 for g in groups)
    assert stats["dynamic/kept"] == 6 and stats["dynamic/sampled"] == 12 and stats["dynamic/filled"] == 0
    # a cap on the rounds: the batch is filled with the latest rejected groups, and that is reported
    calls.clear()
    groups, stats = fine_r1.dynamic_sampling(sample_round, quota=4, max_rounds=1)
    assert calls == [0]
    assert [g.tag for g in groups] == [(0, 1), (0, 3), (0, 0), (0, 2)]
    assert stats["dynamic/filled"] == 2 and stats["dynamic/rounds"] == 1


def test_dynamic_sampling_keeps_a_round_in_which_no_group_passes_whole():
    """The released trainer keeps every group of a sampling round whose groups all fail the filter (all right or all
    wrong): they count toward the batch with zero advantage."""
    rounds = [[0.0, 1.0, 1.0], [0.5, 0.0, 0.2]]

    def sample_round(i):
        return [SimpleNamespace(accuracy=a, tag=(i, j)) for j, a in enumerate(rounds[i])]
    groups, stats = fine_r1.dynamic_sampling(sample_round, quota=4, max_rounds=8)
    assert [g.tag for g in groups] == [(0, 0), (0, 1), (0, 2), (1, 0)]  # round 0 whole, then the filter again
    assert stats["dynamic/whole_rounds"] == 1 and stats["dynamic/rounds"] == 2 and stats["dynamic/filled"] == 0
    adv = fine_r1.group_advantages(torch.tensor([1.0] * 10), 10)  # an all-right group of the kept round
    assert torch.equal(adv, torch.zeros(10))


def test_sft_warm_up_starts_at_zero_like_the_hf_schedule():
    """Fine-R1's SFT (LLaMA-Factory / HF Trainer): cosine with 6 warm-up steps; the first step's rate is 0."""
    lrs = [lifecycle.lr_at(s, base_lr=5e-6, total_steps=70, schedule="cosine", warmup_steps=6) for s in range(8)]
    assert lrs[0] == 0.0 and lrs[3] == pytest.approx(2.5e-6) and lrs[6] == pytest.approx(5e-6)
    assert lrs[7] == pytest.approx(5e-6 * 0.5 * (1 + math.cos(math.pi / 64)))


# ----- rationales -----

def test_toy_rationale_has_the_four_parts_and_the_filter_checks_each():
    names = data.toy_class_names()
    cands = fine_r1.confusable_classes(names, 2)["red striped circle"]
    think = fine_r1.attribute_rationale("red striped circle", cands)
    toy = (fine_r1.TOY_CANDIDATES_MARK, fine_r1.TOY_PREDICTION_MARK)
    good = fine_r1.response_text(think, "red striped circle")
    kept, checks = fine_r1.check_rationale(good, "red striped circle", toy)
    assert kept == think and all(checks.values())
    assert judges.format_ok(good) and fine_r1.accuracy_reward([good], {"truth": "red striped circle"}) == [1]
    # the paper's wording of the same rationale passes the default (paper) filter
    paper_think = think.replace(toy[0], fine_r1.CANDIDATES_MARK).replace(toy[1], fine_r1.PREDICTION_MARK)
    paper = fine_r1.response_text(paper_think, "red striped circle")
    assert all(fine_r1.check_rationale(paper, "red striped circle")[1].values())
    assert fine_r1.check_rationale(good, "red striped circle")[0] is None  # toy wording: not the paper's lines
    broken = {
        "analysis": paper.replace("1. colour", "colour"),
        "candidates": paper.replace(fine_r1.CANDIDATES_MARK, "Candidates:"),
        "comparison": paper.replace(think.split("\n")[2], ""),
        "prediction": paper.replace("The prediction is: red striped circle", "The prediction is: blue square"),
        "answer": paper.replace("<answer>red striped circle", "<answer>blue striped circle"),
        "format": paper + " and more",
    }
    for part, text in broken.items():
        kept, checks = fine_r1.check_rationale(text, "red striped circle")
        assert kept is None and not checks[part], (part, checks)


FEATURES = "Visual features:\n1. Plumage: dark brown back, pale rump.\n2. Bill: long, hooked, grey.\n\n"
COMPARE = ("\n\nComparison: the Laysan Albatross has a white head, the Sooty Albatross a uniformly dark body; "
           "the brown back and pale rump point to the Black footed Albatross.\n")
LAYOUTS = {  # rationales in the layouts a teacher writes (the paper's released samples use 2, 3, 4 and 6)
    "same line, commas": FEATURES + "The analysis of candidate subcategories: Black footed Albatross, Laysan "
                         "Albatross, Sooty Albatross" + COMPARE + "The prediction is: Black footed Albatross.",
    "next line, numbered": FEATURES + "The analysis of candidate subcategories: \n1. Black footed Albatross\n2. "
                           "Laysan Albatross\n3. Sooty Albatross" + COMPARE + "The prediction is: Black footed "
                                                                             "Albatross",
    "intro, blank, numbered": FEATURES + "The analysis of candidate subcategories:\nThe bird could be one of:\n\n1. "
                              "Black footed Albatross: dark.\n   - nests on islands\n2. Laysan Albatross: white "
                              "head.\n\n3. Sooty Albatross: all dark." + COMPARE + "The prediction is: Black "
                                                                                  "footed Albatross",
    "bullets": FEATURES.replace("1. ", "- ").replace("2. ", "- ") + "The analysis of candidate subcategories:\n- "
               "Black footed Albatross\n- Laysan Albatross" + COMPARE + "The prediction is: Black-footed albatross.",
    "markdown bold": "### Features\n" + FEATURES + "**The analysis of candidate subcategories:**\n1. **Black footed "
                     "Albatross**\n2. **Laysan Albatross**" + COMPARE + "**The prediction is:** Black footed "
                                                                        "Albatross.",
    "next line, comma list, prediction below": FEATURES + "THE ANALYSIS OF CANDIDATE SUBCATEGORIES : \nBlack "
                                               "footed Albatross, Laysan Albatross" + COMPARE + "The prediction is: "
                                               "taking all of this together, the species is\n\nBlack footed Albatross",
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_rationale_filter_accepts_a_teachers_layouts(layout):
    truth = "Black footed Albatross"
    think = LAYOUTS[layout]
    kept, checks = fine_r1.check_rationale(fine_r1.response_text(think, truth), truth)
    assert kept == think.strip() and all(checks.values()), checks
    # and still rejects the same rationale without a part, or predicting another class
    unlisted = think
    for item in ("1. ", "2. ", "- "):
        unlisted = unlisted.replace(item + "Plumage", "Plumage").replace(item + "Bill", "Bill")
    cut = think.rfind("The prediction is:") + len("The prediction is:")
    broken = {
        "analysis": unlisted,  # the features as prose, not a list
        "candidates": re.sub(r"(?i)(\*\*)?the analysis of candidate subcategories\s*:(\*\*)?", "Options:", think),
        "comparison": think.replace(COMPARE, "\n\n"),
        "prediction": think[:cut] + " Laysan Albatross.",
    }
    for part, text in broken.items():
        kept, checks = fine_r1.check_rationale(fine_r1.response_text(text, truth), truth)
        assert kept is None and not checks[part], (layout, part, checks)


def test_the_filter_finds_the_candidate_list_and_what_follows():
    block, rest = fine_r1.candidate_block(" \n1. A\n2. B\n\n\n- A vs B: A is larger.\n")
    assert block.split("\n") == ["1. A", "2. B"] and rest.split() == ["-", "A", "vs", "B:", "A", "is", "larger."]
    block, rest = fine_r1.candidate_block("\nIt could be:\n1. A\n\n2. B\nA is larger than B.")
    assert block.split("\n") == ["It could be:", "1. A", "2. B"] and rest == "A is larger than B."
    # a candidate line straight into the prediction has no comparison; no list at all has no candidates
    checks = lambda think: fine_r1.check_rationale(fine_r1.response_text(think, "A"), "A")[1]  # noqa: E731
    assert not checks("1. red\nThe analysis of candidate subcategories: A, B\nThe prediction is: A")["comparison"]
    assert not checks("1. red\nThe analysis of candidate subcategories:\nThe prediction is: A")["candidates"]



NAMES_TRUTH_TABLE = [  # prediction text, truth, the dataset's classes, names the truth
    ("The car is a Cadillac CTS-V Sedan.", "Cadillac CTS-V Sedan 2012", [], True),  # the model year left out
    ("a 2012 Audi TTS Coupe", "2012 Audi TTS Coupe", [], True),
    ("consistent with the 2012 Toyota Sequoia SUV.", "Toyota Sequoia SUV 2012", [], True),  # the year moved
    ("The car is a Cadillac CTS Sedan.", "Cadillac CTS-V Sedan 2012", [], False),  # make and model may not differ
    ("Audi TT Coupe 2011", "Audi TT Coupe 2012", [], False),  # nor the year
    ("a 2011 Audi TT Coupe", "Audi TT Coupe 2012", [], False),
    ("Falcon 900", "Falcon 2000", [], False),  # a model number is no year
    ("Dassault Falcon 2000.", "Falcon 2000", [], True),
    ("Border Collie", "Collie", ["Collie", "Border Collie"], False),  # another class that contains the truth
    ("Border Collie", "Border Collie", ["Collie", "Border Collie"], True),
    ("a Collie", "Collie", ["Collie", "Border Collie"], True),
    ("Laysan Albatross, not Sooty Albatross", "Laysan Albatross", ["Laysan Albatross", "Sooty Albatross"], True),
]


@pytest.mark.parametrize("text,truth,classes,named", NAMES_TRUTH_TABLE)
def test_names_truth_truth_table(text, truth, classes, named):
    assert fine_r1.names_truth(text, truth, classes) == named


def test_sft_asks_as_the_paper_and_the_toy_preset_as_tapo(tiny):
    """--sft-prompt paper: an R1-style system prompt and the bare question (the paper's SFT samples); rl (toy preset):
    TAPO's prompt under the default system prompt. A record's system prompt is what sft_example encodes."""
    _, proc = tiny
    example = data.Example(image="img1.jpg", label=0, class_name="Bobolink", id="img1")
    paper, rl = (fine_r1.sft_question(SimpleNamespace(sft_prompt=how, closed_frac=0.0), "bird", example, [],
                                      {"Bobolink": ["Dickcissel"]}) for how in ("paper", "rl"))
    assert rl == {"image": "img1.jpg", "id": "img1", "class_name": "Bobolink", "candidates": ["Dickcissel"],
                  "question": fine_r1.pose_question("bird", "img1")[0], "system": None}
    assert paper == {**rl, "question": rl["question"].removesuffix(fine_r1.RL_SUFFIX), "system": fine_r1.SFT_SYSTEM}
    assert "<think>" not in paper["question"] and rl["question"].endswith(fine_r1.RL_SUFFIX)
    assert fine_r1.parse_args(["--data", "cub", "--data-root", "/x"]).sft_prompt == "paper"
    assert fine_r1.parse_args(["--data", "toy"]).sft_prompt == "rl"
    image = data.load_dataset("toy", "test").examples[0].image
    record = {**paper, "image": image, "response": "<think>x</think>\n\n<answer>B</answer>"}
    text = proc.tokenizer.decode(fine_r1.sft_example(proc, record)[0].input_ids)
    assert fine_r1.SFT_SYSTEM in text and "You are a helpful assistant." not in text
    default = proc.tokenizer.decode(fine_r1.sft_example(proc, {**record, **rl, "image": image})[0].input_ids)
    assert "You are a helpful assistant." in default and fine_r1.SFT_SYSTEM not in default


# ----- flags -----

def test_toy_preset_fills_only_unset_flags():
    args = fine_r1.parse_args(["--data", "toy", "--lr", "0.5", "--out", "/tmp/x"])
    assert args.model == "tiny" and args.lr == 0.5 and args.rollout_batch == fine_r1.TOY["rollout_batch"]
    assert args.explicit == ["data", "lr", "out"]
    assert args.cot_source == "attributes"
    paper = fine_r1.parse_args(["--data", "cub", "--data-root", "/nowhere"])
    assert (paper.model, paper.lr, paper.sft_lr, paper.rollout_batch, paper.prompts_per_step, paper.group_size) == \
        ("Qwen/Qwen2.5-VL-7B-Instruct", 1e-6, 5e-6, 192, 64, 5)
    assert paper.reward_weights == {"accuracy": 0.9, "format": 0.1} and paper.cot_source == "teacher"
    assert args.reward_weights == {"exact": 0.9, "format": 0.1}
    with pytest.raises(SystemExit, match="toy"):
        fine_r1.parse_args(["--data", "cub", "--cot-source", "attributes"])


def test_a_teacher_is_never_ignored_silently():
    """--teacher on toy: --cot-source auto means the teacher; with --cot-source attributes it is refused."""
    assert fine_r1.parse_args(["--data", "toy", "--teacher", "openai:m"]).cot_source == "teacher"
    with pytest.raises(SystemExit, match="--teacher openai:m with --cot-source attributes: .* would be ignored"):
        fine_r1.parse_args(["--data", "toy", "--teacher", "openai:m", "--cot-source", "attributes"])


def paper_style_rationale(names, truth):
    """A response with the paper's two fixed lines, as a teacher would write it for `truth`, and the teacher's truth
    read back from its prompt."""
    think = fine_r1.attribute_rationale(truth, fine_r1.confusable_classes(names, 3)[truth])
    think = think.replace(fine_r1.TOY_CANDIDATES_MARK, fine_r1.CANDIDATES_MARK)
    return fine_r1.response_text(think.replace(fine_r1.TOY_PREDICTION_MARK, fine_r1.PREDICTION_MARK), truth)


def asked_truth(names, processor, prompts):
    text = processor.tokenizer.decode(prompts[0].input_ids)
    return next(n for n in names if f'category "{n}"' in text)


def test_teacher_cot_keeps_at_most_one_passing_rationale_per_class(tiny, tmp_path, monkeypatch):
    """The teacher path of stage cot with a canned teacher: per class, the first rationale that passes the filter
    is kept (at most --cot-per-class), failing ones are counted, nothing is kept for a class with none passing."""
    model, proc = tiny
    names = fine_r1.load_split(fine_r1.parse_args(["--data", "toy"]), "train", "base").split_class_names
    asked = []

    def canned_sample(teacher, processor, prompts, *, group_size, **kw):
        truth = asked_truth(names, processor, prompts)
        asked.append(truth)
        good = paper_style_rationale(names, truth)
        if truth == names[0]:  # every rationale fails for the first class: the answer is wrong
            texts = [good.replace(f"<answer>{truth}", "<answer>nothing")] * (len(prompts) * group_size)
        else:  # first a rationale without the candidate line, then good ones
            texts = [good.replace(fine_r1.CANDIDATES_MARK, "")] + [good] * (len(prompts) * group_size - 1)
        return SimpleNamespace(texts=texts)
    monkeypatch.setattr(common, "load_model", lambda *a, **k: (model, proc))
    monkeypatch.setattr(common, "sample", canned_sample)
    args = fine_r1.parse_args(["--data", "toy", "--cot-source", "teacher", "--cot-per-class", "1",
                               "--cot-images-per-class", "2", "--cot-batch", "2", "--cot-samples", "2",
                               "--out", str(tmp_path)])
    path = fine_r1.run_cot(args, common.Dist(), str(tmp_path))
    records = common.read_jsonl(path)
    assert sorted(asked) == sorted(names)  # one sampling call per class (2 images x 2 samples)
    assert [r["class_name"] for r in records] == names[1:]  # class order; none for the class that always failed
    for r in records:
        kept, checks = fine_r1.check_rationale(r["response"], r["class_name"])
        assert kept is not None and fine_r1.CANDIDATES_MARK in r["response"]
    log = common.read_jsonl(os.path.join(str(tmp_path), "metrics.jsonl"))[-1]
    assert log["cot/kept"] == 11 and log["cot/tried"] == 12 * 4
    assert log["cot/failed_answer"] == 4 and log["cot/failed_candidates"] == 11


def test_teacher_cot_resumes_after_a_kill(tiny, tmp_path, monkeypatch):
    """A run killed after 5 classes (and mid-write of the 6th) resumes with the 7 classes left and writes the same
    cot.jsonl and counts as an uninterrupted run; the per-rank progress files are removed once merged."""
    model, proc = tiny
    names = fine_r1.load_split(fine_r1.parse_args(["--data", "toy"]), "train", "base").split_class_names
    asked = []

    def canned_sample(teacher, processor, prompts, *, group_size, **kw):
        truth = asked_truth(names, processor, prompts)
        if kill_after is not None and len(asked) == kill_after:
            raise KeyboardInterrupt  # the kill
        asked.append(truth)
        good = paper_style_rationale(names, truth)
        return SimpleNamespace(texts=[good.replace("<answer>", "<answer>x") if truth == names[3] else good]
                               * (len(prompts) * group_size))
    monkeypatch.setattr(common, "load_model", lambda *a, **k: (model, proc))
    monkeypatch.setattr(common, "sample", canned_sample)
    flags = ["--data", "toy", "--cot-source", "teacher", "--cot-per-class", "1", "--cot-images-per-class", "2",
             "--cot-batch", "2", "--cot-samples", "2"]
    kill_after = None
    os.makedirs(tmp_path / "a")
    whole = common.read_jsonl(fine_r1.run_cot(fine_r1.parse_args(flags + ["--out", str(tmp_path / "a")]),
                                               common.Dist(), str(tmp_path / "a")))
    whole_log = common.read_jsonl(str(tmp_path / "a" / "metrics.jsonl"))[-1]
    out = str(tmp_path / "b")
    os.makedirs(out)
    asked.clear()
    kill_after = 5
    with pytest.raises(KeyboardInterrupt):
        fine_r1.run_cot(fine_r1.parse_args(flags + ["--out", out]), common.Dist(), out)
    with open(os.path.join(out, "cot.part0.jsonl"), "a") as f:
        f.write(f'{{"key": "{names[5]}", "value": {{"records": [{{"image": "cut mid-wri')  # killed writing the 6th
    asked.clear()
    kill_after = None
    resumed = common.read_jsonl(fine_r1.run_cot(fine_r1.parse_args(flags + ["--out", out]), common.Dist(), out))
    assert asked == names[5:]  # only the classes not finished before the kill
    assert resumed == whole and len(whole) == 11  # names[3]'s rationales all fail the answer check
    log = common.read_jsonl(os.path.join(out, "metrics.jsonl"))[-1]
    assert {k: v for k, v in log.items() if k.startswith("cot/")} == {
        k: v for k, v in whole_log.items() if k.startswith("cot/")}
    assert not [p for p in os.listdir(out) if p.startswith("cot.part")]


def test_rollout_groups_rows_images_and_negative_prompt(tiny):
    """A group holds G rows from the anchor image then G from the positive, with one question; the negative prompt
    asks the same question with the negative image; each row is scored against the anchor's class."""
    model, proc = tiny
    args = fine_r1.parse_args(["--data", "toy", "--group-size", "2", "--max-new-tokens", "12", "--closed-frac", "0.5"])
    args.precision = common.precision_for(args.dtype, common.Dist(), args.parallel)  # what main sets
    train = fine_r1.load_split(args, "train", "base", shots=4)
    by_class = {}
    for ex in train.examples:
        by_class.setdefault(ex.class_name, []).append(ex)
    negatives = fine_r1.negative_classes(sorted(by_class), "random", 0)
    triplets = [fine_r1.make_triplet(a, by_class, negatives, random.Random(i))
                for i, a in enumerate(train.examples[:3])]
    groups = fine_r1.sample_groups(model, proc, triplets, "shape", sorted(by_class), args,
                                   torch.Generator().manual_seed(0))
    tok = proc.tokenizer
    for t, g in zip(triplets, groups):
        assert g.rollout.completion_ids.shape[0] == 4 and len(g.rollout.texts) == 4 and g.reward.shape == (4,)
        image_of = {id(p): p for p in g.rollout.row_prompts}
        anchor = common.encode_prompt(proc, t.anchor.image, "x")
        positive = common.encode_prompt(proc, t.positive.image, "x")
        negative = common.encode_prompt(proc, t.negative.image, "x")
        assert all(torch.equal(p.pixel_values, anchor.pixel_values) for p in g.rollout.row_prompts[:2])
        assert all(torch.equal(p.pixel_values, positive.pixel_values) for p in g.rollout.row_prompts[2:])
        assert torch.equal(g.neg_prompt.pixel_values, negative.pixel_values)
        assert len(image_of) == 2  # rows share their prompt objects
        question = tok.decode(g.rollout.prompts[0].input_ids)
        assert tok.decode(g.rollout.prompts[1].input_ids) == question == tok.decode(g.neg_prompt.input_ids)
        expected, _ = fine_r1.score(g.rollout.texts, {"truth": t.anchor.class_name}, args.reward_weights)
        assert torch.equal(g.reward, expected)


def test_tapo_checkpoint_resume_continues_the_data_and_the_steps(tmp_path):
    """TAPO stopped after 1 rollout batch (a checkpoint at each step) and rerun with a larger budget continues from
    there with the saved data position instead of starting over (the first run's export is removed, as a kill before
    the end would have left it absent)."""
    import shutil
    out = str(tmp_path)
    flags = ["--data", "toy", "--stage", "tapo", "--out", out, "--rollout-batch", "1", "--sample-prompts", "1",
             "--prompts-per-step", "1", "--group-size", "2", "--max-new-tokens", "8", "--micro-batch", "4",
             "--eval-every", "0", "--save-every", "1", "--max-sample-rounds", "1"]
    fine_r1.main(flags + ["--max-steps", "1"])

    def state():
        return json.load(open(os.path.join(lifecycle.latest_checkpoint(os.path.join(out, "tapo")), "state.json")))
    assert (state()["step"], state()["batch"], state()["data_position"]) == (1, 1, 1)
    shutil.rmtree(os.path.join(out, "final"))
    fine_r1.main(flags + ["--max-steps", "2"])
    records = common.read_jsonl(os.path.join(out, "tapo", "metrics.jsonl"))
    assert [(r["step"], r["rollout_batch"]) for r in records] == [(1, 1), (2, 2)]  # resumed, not restarted
    assert records[-1]["completions"][0]["anchor"] != records[0]["completions"][0]["anchor"]  # the next triplet
    assert (state()["step"], state()["batch"], state()["data_position"]) == (2, 2, 2)
    assert os.path.exists(os.path.join(out, "final", "config.json"))
