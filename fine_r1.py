"""
fine_r1.py: Fine-R1 (arXiv 2602.07605) in one file: chain-of-thought data, CoT SFT, then TAPO.

Fine-R1 teaches a vision-language model to name fine-grained categories, trained on the seen (base) classes and
judged on seen and unseen (novel) ones, in three stages:
  cot   a teacher sees a training image, its class and 3-4 confusable classes and writes a four-part rationale; those
        that pass a filter are kept, at most one per seen class -> <out>/cot.jsonl
  sft   cross-entropy on the assistant tokens of those rationales, vision tower frozen -> <out>/sft/final
  tapo  Triplet-Augmented Policy Optimization, a DAPO-style GRPO on open questions: per triplet (anchor, positive =
        another image of its class, negative = an image of another class) G rollouts from the anchor and G from the
        positive form ONE group of 2G; every response is also scored under the negative image and the k3 KL between
        the two is MAXIMISED, so that the reasoning depends on the picture -> <out>/tapo, <out>/final
Launch (--stage cot | sft | tapo runs one stage; the same command resumes, a finished stage is skipped)
  1 GPU     python fine_r1.py --data cub --data-root /data/CUB_200_2011
  8 GPUs    torchrun --nproc-per-node 8 fine_r1.py --data cub --data-root /data/CUB_200_2011 --parallel fsdp
  2 nodes   torchrun --nnodes 2 --node-rank 0 --nproc-per-node 8 --rdzv_backend c10d --rdzv_endpoint HOST:PORT \
                fine_r1.py --data cub --data-root /data/CUB_200_2011 --parallel fsdp
  CPU       python fine_r1.py --data toy         (the three stages on the tiny stand-in)
Simplifications (each with the released code's way: README, "Every deviation")
  * the teacher is not published: ours is any Qwen2.5-VL or openai: server; on toy, the image's known attributes
  * confusable classes come from class-name similarity; each row is tokenised with its own image
  * the loss is the released code's (H_neg without gradient), a token mean over the whole optimizer step
  * fp32 master weights with bf16 compute; each prompt is encoded once per group, in sampling and in scoring
"""

from __future__ import annotations

import argparse
import collections
import difflib
import gc
import json
import math
import os
import random
import re
import time

import torch

import common
import data
import evaluation
import judges
import lifecycle
import memory

# ----- 1. Prompts, and TAPO's data: triplets (anchor, positive, negative) and their rollouts, 2G per group -----
# Closed world (the released eval_closedworld): the options as a Python list, the reasoning and the choice in tags.
QUESTION = "Which {kind} is shown in this picture?"
CLOSED_PROMPT = ("Question: {question} Choose one of the options {options}. Write your reasoning inside "
                 "<think> </think> and your final choice inside <answer> </answer>, in the form "
                 "<think>...</think> <answer>choice</answer>.")

def closed_prompt(kind: str, options: list[str]) -> str:
    return CLOSED_PROMPT.format(question=QUESTION.format(kind=kind), options=str(list(options)))

# Open questions (the paper's SFT data has 198 phrasings, its RL data one per domain; here four) and the RL format
# request; the open-world evaluation asks for the two tags in the RL prompt's words (asked as it was trained).
QUESTIONS = ["What is the {kind} in this image?", "Which {kind} is shown in this picture?",
             "What is the specific name of this {kind}?", "Name the {kind} in the image."]
RL_SUFFIX = ("\n\nFirst think the question through as an inner monologue inside <think> </think>, then give "
             "the final answer inside <answer> </answer>.")
OPEN_PROMPT = "{question} This is a fine-grained question." + RL_SUFFIX

def open_prompt(kind: str) -> str:
    return OPEN_PROMPT.format(question=QUESTION.format(kind=kind))

# The evaluation protocols (eval.py --protocol open / mcq, and evaluate_all): one greedy answer per image. open: judged,
# accuracy by Fine-R1's text-include rule; mcq: the truth and 3 distractors, right when the truth's name is answered.
OPEN_EVAL = evaluation.Protocol("open", evaluation.answer_batch, evaluation.answer_metrics, template=OPEN_PROMPT,
                                prompt=lambda dataset, options: open_prompt(dataset.kind), text_include=True)
MCQ_EVAL = evaluation.Protocol("mcq", evaluation.choice_batch, evaluation.choice_metrics, template=CLOSED_PROMPT,
                               prompt=lambda dataset, options: closed_prompt(dataset.kind, options), judged=False)
EVALS = {"open": OPEN_EVAL, "mcq": MCQ_EVAL}

def pose_question(kind: str, key, truth: str = "", others: list[str] = (), closed_frac: float = 0.0):
    """(question, distractors) of one sample, seeded by a stable key (image ids): an open phrasing with the RL format
    request and None, or with probability closed_frac (paper: 0) the closed prompt on the truth and 3 of `others`."""
    rng = random.Random(f"question/{key}")
    if closed_frac > 0 and rng.random() < closed_frac and len(others) >= 3:
        distractors = rng.sample(list(others), 3)
        options = distractors + [truth]
        rng.shuffle(options)
        return closed_prompt(kind, options), distractors
    return rng.choice(QUESTIONS).format(kind=kind) + RL_SUFFIX, None

Triplet = collections.namedtuple("Triplet", "anchor positive negative")  # of data.Example

def negative_classes(names: list[str], how: str, k: int) -> dict[str, list[str]]:
    return {a: [b for b in names if b != a] for a in names} if how == "random" else confusable_classes(names, k)

def make_triplet(anchor: data.Example, by_class: dict, negatives: dict, rng: random.Random) -> Triplet:
    same = [e for e in by_class[anchor.class_name] if e.image != anchor.image]
    if not same:
        raise SystemExit(f"class {anchor.class_name!r} has a single training image ({anchor.image}); TAPO's positive "
                         f"needs another image of the same class (use --shots >= 2)")
    negative_class = rng.choice(negatives[anchor.class_name])
    return Triplet(anchor, rng.choice(same), rng.choice(by_class[negative_class]))

# One triplet's 2G responses (rows 0..G-1 the anchor's, G..2G-1 the positive's), reward and parts [2G] each;
# neg_prompt: the same question with the negative image; accuracy: the first reward's mean, which dynamic sampling reads
Group = collections.namedtuple("Group", "triplet rollout neg_prompt reward parts accuracy")

def sample_groups(model, processor, triplets: list[Triplet], kind: str, seen_classes: list[str], args, generator):
    questions = [pose_question(kind, f"{t.anchor.id}|{t.positive.id}", t.anchor.class_name,
                               [c for c in seen_classes if c != t.anchor.class_name], args.closed_frac)[0]
                 for t in triplets]  # one question per triplet, asked with the anchor and with the positive
    prompts = [common.encode_prompt(processor, image, q) for t, q in zip(triplets, questions)
               for image in (t.anchor.image, t.positive.image)]  # [a1, p1, a2, ...]: prompt j owns rows j*G..j*G+G-1
    with args.precision.context():
        rollout = common.sample(model, processor, prompts, group_size=args.group_size, generator=generator,
                                max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                prompt_batch=args.rollout_prompt_batch, compile_decode=bool(args.compile_decode))
    groups = []
    for i, t in enumerate(triplets):
        rows = slice(2 * args.group_size * i, 2 * args.group_size * (i + 1))
        reward, parts = score(rollout.texts[rows], {"truth": t.anchor.class_name, **t._asdict()}, args.reward_weights)
        own = common.Rollout(prompts[2 * i:2 * i + 2], args.group_size, rollout.completion_ids[rows],
                             rollout.completion_mask[rows], rollout.logprobs[rows], rollout.truncated[rows],
                             rollout.texts[rows])
        groups.append(Group(t, own, common.encode_prompt(processor, t.negative.image, questions[i]), reward, parts,
                            float(next(iter(parts.values())).mean())))
    return groups

# ----- 2. Rewards (REWARDS, picked and weighted by --rewards), advantage, dynamic sampling -----
def accuracy_reward(completions: list[str], example: dict) -> list[float]:
    """1 if the lowercased truth is a substring of the <answer> text (the paper's rule).
    >>> accuracy_reward(["<think>x</think><answer>a RED CIRCLE, I think</answer>"], {"truth": "red circle"})
    [1.0]
    """
    truth = example["truth"].lower()
    return [float(a is not None and truth in a.lower()) for a in map(judges.parse_answer, completions)]

def exact_reward(completions: list[str], example: dict) -> list[float]:
    """1 if the <answer> text is the truth (both normalised), as eval.py's judges count; unlike the substring rule,
    nothing for several names in one answer or answer tags inside the rationale (the stand-in learned both).
    >>> exact_reward(["<think>x</think><answer>Red-Circle.</answer>", "<answer>red circle, red square</answer>"],
    ...              {"truth": "red circle"})
    [1.0, 0.0]
    """
    truth = judges.normalize(example["truth"])
    return [float(a is not None and judges.normalize(a) == truth) for a in map(judges.parse_answer, completions)]

def format_reward(completions: list[str], example: dict) -> list[float]:
    """1 if the completion is `<think>...</think> <answer>...</answer>` and nothing else."""
    return [float(judges.format_ok(c)) for c in completions]

REWARDS = {"accuracy": accuracy_reward, "exact": exact_reward, "format": format_reward}

def score(completions: list[str], example: dict, weights: dict[str, float]):
    """(reward [G] = sum of weight * reward, {name: [G]}) of one group. The rewards read each completion with the
    whitespace around every <, > and / removed, as the released reward does ("< answer >" is "<answer>").
    >>> score(["<think>x</think> < answer >red circle< / answer >"], {"truth": "red circle"},
    ...       {"accuracy": 0.9, "format": 0.1})[0]
    tensor([1.])
    """
    return lifecycle.group_rewards(REWARDS, weights, [re.sub(r"\s*([<>/])\s*", r"\1", c) for c in completions], example)

def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """A_i = (r_i - mean(r_group)) / (std(r_group) + eps), unbiased std (as verl); rows grouped by triplet.
    >>> group_advantages(torch.tensor([1.0, 0.0, 0.1, 0.1]), 2)
    tensor([ 0.7071, -0.7071,  0.0000,  0.0000])
    """
    r = rewards.double().view(-1, group_size)  # [P, 2G] float64: in float32 equal rewards of 0.1 get -0.0075, not 0
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)).float().reshape(-1)  # [P*2G]

def keep_groups(group_accuracy: torch.Tensor, low: float = 0.01, high: float = 0.99) -> torch.Tensor:
    """Dynamic sampling's filter: mean accuracy strictly inside (low, high), so right and wrong answers. [P] -> [P]."""
    return (group_accuracy > low) & (group_accuracy < high)

def dynamic_sampling(sample_round, quota: int, max_rounds: int, low: float = 0.01, high: float = 0.99):
    """(groups, stats): sample_round(round_index) until every rank holds `quota` groups keep_groups accepts (extras
    dropped, as verl), on every rank alike; a round where no group passes on any rank is kept whole (the released
    trainer: zero advantage, the KL and entropy terms still act); after `max_rounds`, filled with the last rejected."""
    kept, rejected, rounds, whole_rounds = [], [], 0, 0
    # every rank samples as long as one is short: the collectives inside sampling need all ranks
    while rounds < max_rounds and float(common.all_reduce_sum(torch.tensor([float(len(kept) < quota)]))[0]) > 0:
        groups = sample_round(rounds)
        keep = keep_groups(torch.tensor([g.accuracy for g in groups]), low, high)  # [P] bool
        if float(common.all_reduce_sum(keep.sum().float().view(1))[0]) == 0:  # nothing passed anywhere
            keep, whole_rounds = torch.ones_like(keep), whole_rounds + 1
        for g, ok in zip(groups, keep.tolist()):
            (kept if ok else rejected).append(g)
        rounds += 1
    sampled, filled = len(kept) + len(rejected), max(0, quota - len(kept))  # check_batches: enough are sampled
    return kept[:quota] + (rejected[-filled:] if filled else []), {
        "dynamic/rounds": rounds, "dynamic/sampled": sampled, "dynamic/kept": len(kept), "dynamic/filled": filled,
        "dynamic/kept_frac": len(kept) / max(1, sampled), "dynamic/whole_rounds": whole_rounds,
        "sampled_accuracy": sum(g.accuracy for g in kept + rejected) / max(1, sampled)}

# ----- 3. The TAPO loss, written by hand -----
def tapo_loss(logp: torch.Tensor, old_logp: torch.Tensor, neg_logp: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, *, normalizer: float, clip_low: float = 0.2, clip_high: float = 0.28,
              dual_clip: float = 3.0, kl_coef: float = 0.01, entropy_coef: float = 0.03,
              neg_entropy_coef: float = 0.03) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The TAPO loss of one micro-batch, summed over its tokens and divided by `normalizer`.

    Per token t of response i (logp: policy, own image, with grad; old_logp: the sampling policy, own image;
    neg_logp: the sampling policy with the NEGATIVE image, no grad):
        rho   = exp(clamp(logp - old_logp, -20, 20))
        pg    = max(-A rho, -A clip(rho, 1 - clip_low, 1 + clip_high)),  then for A < 0: min(pg, -dual_clip A)
        delta = clamp(neg_logp - logp, -20, 20),   k3 = clamp(exp(delta) - delta - 1, -10, 10)
        L     = mean_tok(pg) - kl_coef mean_tok(k3) + entropy_coef mean_tok(-logp)
                + neg_entropy_coef mean_tok(-neg_logp)
    mean_tok(x) = sum over the tokens of the whole optimizer step (all ranks) / their number; DDP and FSDP average
    gradients over ranks, so the caller passes normalizer = global token count / world size.
    The k3 term is subtracted: maximised, it pushes the response's likelihood under the true image away from the one
    under a different class's image. Tokens with k3 clamped at 10 get no gradient from it.

    Worked example (one response, two tokens, A = -1, normalizer 2, coefficients as default):
        logp = [-1, -2], old = [-1, -1], neg = [-3, -2]
        rho = [1, e^-1 = .368]; pg = max(rho, clip(rho, .8, 1.28)) = [1, .8], dual clip min(., 3) -> [1, .8]
        delta = [-2, 0], k3 = [e^-2 + 1 = 1.135, 0];   -logp = [1, 2];   -neg = [3, 2]
        L = 1.8/2 - .01 * 1.135/2 + .03 * 3/2 + .03 * 5/2 = .9 - .00568 + .045 + .075 = 1.01432
    """
    mask = mask.to(logp.dtype)  # [B, T]
    adv = advantages.to(logp.dtype)[:, None]  # [B, 1]
    ratio = torch.exp(torch.clamp(logp - old_logp, -20.0, 20.0))  # [B, T]
    surrogate = -adv * ratio  # [B, T]
    surrogate_clipped = -adv * ratio.clamp(1 - clip_low, 1 + clip_high)  # [B, T]
    pg_ppo = torch.maximum(surrogate, surrogate_clipped)  # [B, T] the PPO pessimistic bound
    pg = torch.where(adv < 0, torch.minimum(pg_ppo, -dual_clip * adv), pg_ppo)  # [B, T] dual clip: A < 0 costs <= c|A|
    delta = torch.clamp(neg_logp - logp, -20.0, 20.0)  # [B, T]
    k3 = torch.clamp(torch.exp(delta) - delta - 1.0, -10.0, 10.0)  # [B, T] k3 estimate of KL(own image || negative)
    clipped = (surrogate_clipped > surrogate) | (pg < pg_ppo)  # [B, T] a clip (either kind) is active
    def token_mean(values: torch.Tensor) -> torch.Tensor:  # [B, T] -> [], this micro-batch's share of the step's mean
        return (values * mask).sum() / normalizer
    pg_term, kl_term = token_mean(pg), token_mean(k3)  # []
    entropy, entropy_neg = token_mean(-logp), token_mean(-neg_logp)  # [] (neg_logp carries no gradient)
    loss = pg_term - kl_coef * kl_term + entropy_coef * entropy + neg_entropy_coef * entropy_neg  # []
    stats = {"pg": pg_term, "kl_neg": kl_term, "entropy": entropy, "entropy_neg": entropy_neg,
             "clip_frac": token_mean(clipped.to(mask.dtype)), "ratio": token_mean(ratio)}
    return loss, {"loss": loss.detach(), **{name: value.detach() for name, value in stats.items()}}

# ----- 4. The train steps: TAPO's rollout batch (advantages, old and negative-image log-probs), its update; SFT's -----
def rollout_batch(batch_index: int, cursor: int, model, processor, train, by_class, negatives, args, ranks, timer):
    """(batch, groups, metrics on this rank, data position after) of one rollout batch, sampled by dynamic_sampling."""
    def sample_round(round_index: int) -> list[Group]:
        # this rank's triplets: data positions start + rank, + world, ... of seeded epochs over the anchors, each
        # position's draws seeded by it (the same on resume and on any number of ranks)
        start, anchors, draw_seed = cursor + round_index * args.sample_prompts, train.examples, args.seed * 1_000_003
        triplets = [make_triplet(anchors[common.stream_position(pos, len(anchors), args.seed)], by_class, negatives,
                                 random.Random(draw_seed + pos))
                    for pos in range(start + ranks.rank, start + args.sample_prompts, ranks.world_size)]
        generator = torch.Generator().manual_seed(draw_seed + batch_index * 1009 + round_index * 13 + ranks.rank)
        started = time.perf_counter()
        groups = sample_groups(model, processor, triplets, train.kind, sorted(by_class), args, generator)
        if time.perf_counter() - started > 30:  # a long stage says where it is
            common.print0(f"tapo rollout batch {batch_index + 1}, sampling round {round_index + 1}: done")
        return groups

    model.eval()  # sampling needs the KV cache, which activation checkpointing turns off in train mode
    first = common.encode_prompt(processor, train.examples[0].image, pose_question(train.kind, 0)[0])
    with timer("sampling"), args.precision.context(), \
            common.gathered_params(model, common.fsdp_warmup_inputs(model, processor, first)):
        groups, metrics = dynamic_sampling(sample_round, args.rollout_batch // ranks.world_size, args.max_sample_rounds,
                                           args.acc_low, args.acc_high)
    cursor += metrics["dynamic/rounds"] * args.sample_prompts

    pad_id = common.special_token_ids(processor)["<|endoftext|>"]
    rollout = common.concat_rollouts([g.rollout for g in groups], pad_id)  # R rows, padded to the longest
    own, ids, mask = rollout.row_prompts, rollout.completion_ids, rollout.completion_mask  # [R], [R, T], [R, T]
    neg = [g.neg_prompt for g in groups for _ in g.rollout.texts]  # [R] each row's negative image
    rewards = torch.cat([g.reward for g in groups])  # [R]
    with timer("logprobs"), args.precision.context():  # each response under its own image, then the negative one
        old_logp, neg_logp = [common.completion_logprobs(
            model, processor, prompts, ids, mask, temperature=args.temperature, micro_batch=args.logprob_micro_batch,
            shared_prefix=bool(args.shared_prefix)) for prompts in (own, neg)]  # [R, T] each
        batch = dict(own=own, ids=ids, mask=mask, pad_id=pad_id, old_logp=old_logp, neg_logp=neg_logp,
                     advantages=group_advantages(rewards, 2 * args.group_size, args.adv_eps))  # [R]
    parts = {f"reward/{name}": float(torch.cat([g.parts[name] for g in groups]).mean()) for name in args.reward_weights}
    metrics.update({"reward": float(rewards.mean()), "completion_len": float(mask.sum()) / mask.shape[0], **parts,
                    "truncation_rate": float(rollout.truncated.float().mean())})
    return batch, groups, metrics, cursor

def tapo_update(model, optimizer, run: lifecycle.Run, step: int, batch: dict, rows: range, args):
    """Optimizer step `step` on the responses `rows` of the rollout batch, their token mean over all ranks."""
    normalizer = lifecycle.global_token_count(batch["mask"][rows.start:rows.stop]) / run.ranks.world_size

    def loss_of(micro: slice):
        width = max(1, int(batch["mask"][micro].sum(1).max()))  # trim the padding shared by these rows
        ids, mask = batch["ids"][micro, :width], batch["mask"][micro, :width]  # [b, t]
        logp = common.score_completions(model, batch["own"][micro], ids, mask, batch["pad_id"], args.temperature,
                                        bool(args.shared_prefix)).float()  # [b, t] each image's prompt once
        return tapo_loss(logp, batch["old_logp"][micro, :width].to(logp), batch["neg_logp"][micro, :width].to(logp),
                         batch["advantages"][micro].to(logp), mask.to(logp.device), normalizer=normalizer,
                         clip_low=args.clip_low, clip_high=args.clip_high, entropy_coef=args.entropy_coef,
                         dual_clip=args.dual_clip, kl_coef=args.kl_neg_coef, neg_entropy_coef=args.neg_entropy_coef)
    micro_batches = [slice(s, min(s + args.micro_batch, rows.stop)) for s in rows[::args.micro_batch]]
    return lifecycle.update(model, optimizer, run.guard, step, micro_batches, loss_of, grad_clip=args.grad_clip,
                            precision=args.precision)

def sft_example(processor, record: dict) -> tuple[common.EncodedPrompt, torch.Tensor]:
    """(prompt, target ids) of one rationale (no "system": Qwen's default): the labels its response and <|im_end|>."""
    im_end = common.special_token_ids(processor)["<|im_end|>"]
    return (common.encode_prompt(processor, record["image"], record["question"], record.get("system")),
            torch.tensor(processor.tokenizer(record["response"])["input_ids"] + [im_end]))  # [T]

# ----- 5. The stages: cot (teacher rationales through a four-part filter), then sft and tapo on the run lifecycle -----
# SFT asks as the paper's SFT samples (--sft-prompt paper): an R1-style system prompt and the bare question. The toy
# preset (rl) asks with TAPO's prompt and no system prompt: the stand-in, pretrained on the RL and evaluation prompts,
# lost its closed-world answers when SFT asked it the paper's way (tests/test_fine_r1_learning.py).
SFT_SYSTEM = ("The user asks a question and you, the assistant, answer it: you first reason it through, then give "
              "the answer. Put the reasoning inside <think> </think> and the answer inside <answer> </answer>, "
              "as in <think> your reasoning </think><answer> your answer </answer>.")

def sft_question(args, kind: str, example: data.Example, seen: list[str], confusable: dict) -> dict:
    """An image's SFT record but its response: the question (and system prompt) it is trained with, its candidates."""
    name = example.class_name
    text, distractors = pose_question(kind, example.id, name, [c for c in seen if c != name], args.closed_frac)
    paper = args.sft_prompt == "paper"
    return {"image": example.image, "id": example.id, "class_name": name, "candidates": distractors or confusable[name],
            "question": text.removesuffix(RL_SUFFIX) if paper else text, "system": SFT_SYSTEM if paper else None}

def response_text(rationale: str, class_name: str) -> str:
    """The SFT target format of the paper: <think>...</think>, a blank line, <answer>CLASS</answer>."""
    return f"<think>{rationale.strip()}</think>\n\n<answer>{class_name}</answer>"

# The fixed lines of the paper's rationales (present in 400 and 404 of its 404 SFT samples).
CANDIDATES_MARK = "The analysis of candidate subcategories:"
PREDICTION_MARK = "The prediction is:"

# The teacher's instruction (the paper's is not published; this asks for the four parts its data shows).
TEACHER_PROMPT = (
    "This image shows a {kind} of the category \"{truth}\". Categories that look similar: {candidates}.\n"
    "Explain step by step how to recognise it, as if you did not know the answer yet, in four parts:\n"
    "1. a visual analysis: the visible discriminative features as a numbered list (1. 2. 3. ...);\n"
    "2. a line starting with \"" + CANDIDATES_MARK + "\" that lists the similar categories;\n"
    "3. a comparison of those categories against the features;\n"
    "4. a final line \"" + PREDICTION_MARK + " {truth}\".\n"
    "Put the whole explanation in <think> </think> and then only the category name in <answer> </answer>.")

LIST_ITEM = re.compile(r"^\s*(?:(\d+)[.)]|[-*\u2022])\s+\S")  # "1. x", "2) x", "- x", "* x", "\u2022 x"

def _marker(text: str, mark: str, last: bool = False) -> tuple[int, int]:
    """(start, end) of the first (last) match of `mark`'s words (any case, spaces before a colon) or (-1, -1)."""
    pattern = re.escape(mark.rstrip(":")).replace("\\ ", "\\s+") + (r"\s*:" if mark.endswith(":") else "")
    spans = [m.span() for m in re.finditer(pattern, text, re.IGNORECASE)]
    return spans[-1 if last else 0] if spans else (-1, -1)

def candidate_block(body: str) -> tuple[str, str]:
    """Split the text after the candidate line's opening words into (the candidate list, what follows): that line's
    rest or the next filled line (an intro ending in ':' and its first item), then list items ("1.", "-", "  - "),
    across blank lines only into the next number (3. after 2.). As in the paper's samples: "A, B" or 1./- lines."""
    lines = body.split("\n")
    filled = lambda i: next((j for j in range(i, len(lines)) if lines[j].strip()), len(lines))  # noqa: E731
    take = [filled(0)]  # the list on the marker's own line, or on the next filled one
    if 0 < take[0] < len(lines) and not LIST_ITEM.match(lines[take[0]]) and lines[take[0]].rstrip().endswith(":"):
        take.append(filled(take[0] + 1))  # an introduction: its list follows
    i, take = min(take[-1] + 1, len(lines)), [j for j in take if j < len(lines)]
    numbers = [int(m.group(1)) for m in map(LIST_ITEM.match, (lines[j] for j in take)) if m and m.group(1)]
    number = numbers[-1] if numbers else None
    while i < len(lines):  # list items go on; blank lines only into the next number of a numbered list
        j = filled(i)
        m = LIST_ITEM.match(lines[j]) if j < len(lines) else None
        if not m or j > i and not (m.group(1) and number is not None and int(m.group(1)) == number + 1):
            break
        take.append(j)
        number, i = int(m.group(1)) if m.group(1) else number, j + 1
    return "\n".join(lines[j] for j in take), "\n".join(lines[i:])

def names_truth(text: str, truth: str, classes: list[str] = ()) -> bool:
    """The truth's name (normalised, whole words) in `text` and no longer class name holding it ("Border Collie" does
    not name "Collie"); a model year opening or closing it may be left out, as the paper's teacher often does, but
    not replaced by another number ("Falcon 900" does not name "Falcon 2000", nor "TT 2011" "TT 2012")."""
    said, name = f" {judges.normalize(text)} ", judges.normalize(truth)
    short = re.sub(r"^(19|20)\d\d |( (19|20)\d\d)$", "", name)
    year = name.replace(short, "").strip()
    found = f" {name} " in said or bool(year) and (f" {year} {short} " in said or f" {short} {year} " in said or
                                                  re.search(rf"(?<!\d) {re.escape(short)} (?!\d)", said) is not None)
    longer = {c for c in map(judges.normalize, classes) if c != name and f" {name} " in f" {c} "}
    return found and not any(f" {c} " in said for c in longer)

def check_rationale(completion: str, truth: str, marks=(CANDIDATES_MARK, PREDICTION_MARK), classes: list[str] = ()):
    """(the <think> text or None, the checks): format, the answer is the truth (normalised), and four parts (markdown
    ignored): analysis, a feature list before the candidate line (marks[0]); candidates, that line and its list
    (candidate_block); comparison, 3+ words after it, before the last prediction line (marks[1]) naming the truth."""
    think = re.search(r"<think>(.*?)</think>", completion, re.DOTALL)
    answer = judges.parse_answer(completion)
    text = re.sub(r"\*\*|__", "", think.group(1) if think else "")  # markdown bold
    text = re.sub(r"(?m)^[ \t]*#+[ \t]*", "", text)  # markdown headings
    (c_start, c_end), (p_start, p_end) = _marker(text, marks[0]), _marker(text, marks[1], last=True)
    listed = c_start >= 0 and p_start >= c_end  # the candidate line, and the prediction after it
    block, rest = candidate_block(text[c_end:p_start]) if listed else ("", "")
    features = text[:c_start] if c_start >= 0 else text
    checks = {"format": judges.format_ok(completion),
              "answer": answer is not None and judges.normalize(answer) == judges.normalize(truth),
              "analysis": any(LIST_ITEM.match(line) for line in features.split("\n"))
              or re.search(r"(^|\s)1[.)]\s", features) is not None,
              "candidates": len(block.split()) > 0 if listed else c_start >= 0, "comparison": len(rest.split()) >= 3,
              "prediction": p_start >= 0 and names_truth(text[p_end:], truth, classes)}
    return (think.group(1).strip() if all(checks.values()) else None), checks

# The same two lines in the toy rationale, worded in the tiny stand-in's vocabulary: its tokenizer was trained on the
# toy prompts, so the paper's lines cost it 38 single-character tokens, which a two-layer model copies badly.
TOY_CANDIDATES_MARK = "the options:"
TOY_PREDICTION_MARK = "the final answer is"

def attribute_rationale(class_name: str, candidates: list[str]) -> str:
    """A toy image's four-part rationale from its attributes (a toy class name is colour, pattern, shape), ~40 tokens:
    "1. colour: red 2. pattern: striped 3. shape: circle | the options: red plain circle, blue striped square | not
    plain, not blue | the final answer is red striped circle" (| a line break)."""
    attributes = class_name.split()  # each candidate, another class, differs in an attribute: its first is named
    differs = [next(w for w, mine in zip(c.split(), attributes) if w != mine) for c in candidates]
    features = " ".join(f"{label}: {word}" for label, word in zip(("1. colour", "2. pattern", "3. shape"), attributes))
    return (f"{features}\n{TOY_CANDIDATES_MARK} {', '.join(candidates)}\n"
            f"{', '.join('not ' + w for w in differs)}\n{TOY_PREDICTION_MARK} {class_name}")

def name_similarity(a: str, b: str) -> float:
    """How confusable two class names look: shared words (Jaccard) plus half the character similarity (difflib)."""
    a, b = judges.normalize(a), judges.normalize(b)
    words_a, words_b = set(a.split()), set(b.split())
    return len(words_a & words_b) / max(1, len(words_a | words_b)) + 0.5 * difflib.SequenceMatcher(None, a, b).ratio()

def confusable_classes(names: list[str], k: int) -> dict[str, list[str]]:
    """name -> the k other names most similar to it (ties broken by name, so the result is deterministic)."""
    return {a: sorted((b for b in names if b != a), key=lambda b: (-name_similarity(a, b), b))[:k] for a in names}

def run_cot(args, ranks: common.Dist, out: str) -> str:
    """Write <out>/cot.jsonl and return its path (or check and return --cot-data). Skipped when the file exists."""
    if args.cot_data:
        records = common.read_jsonl(args.cot_data, required=("image", "class_name", "question", "response"))
        common.print0(f"stage cot: using {len(records)} rationales from {args.cot_data}")
        return args.cot_data
    path = os.path.join(out, "cot.jsonl")
    # rank 0's view for all (it may write the file first): a rank skipping alone would wait in the next collectives
    if common.all_gather_objects(os.path.exists(path))[0]:
        common.print0(f"stage cot: {path} exists, skipped")
        return path
    train = load_split(args, "train", "base", limit=args.train_limit)
    seen = train.split_class_names
    confusable = confusable_classes(seen, args.cot_candidates)
    rng = random.Random(args.seed)  # the images each class offers the teacher, in a seeded order
    offers = {name: [ex for ex in train.examples if ex.class_name == name] for name in seen}
    offers = {name: [sft_question(args, train.kind, ex, seen, confusable) for ex in rng.sample(images, len(images))]
              for name, images in offers.items()}  # each image's SFT record but its response
    if args.cot_source == "attributes":
        records = [{**q, "response": response_text(attribute_rationale(name, q["candidates"]), name)}
                   for name in seen for q in offers[name][:args.cot_per_class]]
        stats = {"cot/tried": len(records)}
    else:  # the teacher, class by class over the ranks; a killed run redoes only the classes it did not finish
        done = common.resumable_map(out, "cot", seen, lambda names: teacher_rationales(
            names, args, ranks, out, train, seen, offers), ranks, "stage cot: seen classes")
        records = [r for name in seen for r in done[name]["records"]]  # class order, any rank count
        stats = collections.Counter()
        for result in done.values():
            stats.update({"cot/tried": result["tried"], **{f"cot/failed_{k}": n for k, n in result["fails"].items()}})
    stats = {"cot/classes": len(seen), **stats}
    if not records:
        raise SystemExit(f"stage cot: no rationale passed the filter ({stats}); try another --teacher, more "
                         f"--cot-samples / --cot-images-per-class, or --cot-data FILE")
    if ranks.is_main:
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        os.replace(path + ".tmp", path)
        common.remove_rank_parts(out, "cot")  # the teacher's per-rank progress, now merged
        lifecycle.MetricsLog(out).log({"step": 0, "stage": "cot", "cot/kept": len(records), **stats})
    common.barrier()
    common.print0(f"stage cot: {len(records)} rationales for {len({r['class_name'] for r in records})} of "
                  f"{len(seen)} seen classes -> {path}")
    return path

def teacher_rationales(names: list[str], args, ranks, out, train, seen, offers):
    """common.resumable_map's work: (class, {"records", "tried", "fails"}) for each class of `names`, by the teacher."""
    if not names:  # a rank with nothing left to write (every class done before a kill) loads no teacher
        return
    if (args.teacher or "").startswith("openai:"):  # a teacher behind a server: nothing loaded here
        teacher, processor = judges.OpenAIServer(args.teacher_url, args.teacher[7:], what="--teacher-url",
                                                 concurrency=args.teacher_concurrency), None
        teacher.check()
    else:  # the teacher is never updated: stored in the compute dtype (bf16 on GPU)
        frozen = common.precision_for(args.dtype, ranks, "ddp", trained_weights=False).compute
        teacher, processor = common.load_model(args.teacher or args.model, device=ranks.device, dtype=frozen,
                                               attn=args.attn, flag="--teacher" if args.teacher else "--model",
                                               min_pixels=args.sft_min_pixels, max_pixels=args.sft_max_pixels)
        teacher.eval()
    for position, name in enumerate(names):
        kept, tried, fails = [], 0, collections.Counter()
        for start in range(0, args.cot_images_per_class, args.cot_batch):
            posed = offers[name][start:min(start + args.cot_batch, args.cot_images_per_class)]
            if not posed or len(kept) >= args.cot_per_class:
                break
            requests = [(q["image"], TEACHER_PROMPT.format(kind=train.kind, truth=name,
                                                           candidates=", ".join(q["candidates"]))) for q in posed]
            generator = torch.Generator().manual_seed(args.seed * 1_000_003 + seen.index(name) * 101 + start)
            try:
                completions = teacher_completions(teacher, processor, requests, args, generator)
            except (judges.ServerError, judges.BadRequest) as e:  # a server teacher that failed
                raise SystemExit(f"stage cot: {e}. The classes finished so far are kept in {out}/cot.part*.jsonl: "
                                 f"rerun the same command to resume") from None
            for row, completion in enumerate(completions):
                q = posed[row // args.cot_samples]  # the record of its image: one rationale per image is kept
                rationale, checks = check_rationale(completion, name, classes=train.class_names)
                fails.update({check: int(not ok) for check, ok in checks.items()})  # every check counted, 0 too
                if rationale is not None and len(kept) < args.cot_per_class and q["id"] not in {r["id"] for r in kept}:
                    kept.append({**q, "response": response_text(rationale, name)})
            tried += len(completions)
        yield name, {"records": kept, "tried": tried, "fails": fails}
        common.print0(f"  cot class {position + 1}/{len(names)} (rank 0 shard) {name}: {len(kept)} kept")
    del teacher
    gc.collect()  # the memory back before the next stage loads
    torch.cuda.empty_cache()

def teacher_completions(teacher, processor, requests: list[tuple[str, str]], args, generator) -> list[str]:
    """--cot-samples completions per (image, instruction), image-major: a Qwen2.5-VL loaded here, or a server's."""
    if processor is None:  # a server
        def ask(image_and_text: tuple[str, str]) -> list[str]:
            replies = teacher.chat_image(*image_and_text, n=args.cot_samples, temperature=args.cot_temperature,
                                         top_p=args.cot_top_p, max_tokens=args.cot_max_new_tokens)
            if len(replies) != args.cot_samples:
                raise SystemExit(f"--teacher-url {teacher.url}: asked for n={args.cot_samples} completions, got "
                                 f"{len(replies)}; pass --cot-samples 1 for a server that ignores n")
            return replies
        return [text for replies in teacher.map(ask, requests) for text in replies]
    prompts = [common.encode_prompt(processor, image, text) for image, text in requests]
    return common.sample(teacher, processor, prompts, group_size=args.cot_samples, generator=generator,
                         max_new_tokens=args.cot_max_new_tokens, temperature=args.cot_temperature,
                         top_p=args.cot_top_p, compile_decode=bool(args.compile_decode)).texts

def run_sft(run: lifecycle.Run, cot_path: str, eval_sets: dict):
    """Fine-tune the policy on the rationales; export to <out>/sft/final. Skipped when that exists (resume)."""
    args, ranks, final = run.args, run.ranks, os.path.join(run.out, "final")
    if os.path.exists(os.path.join(final, "config.json")):
        common.print0(f"stage sft: {final} exists, skipped")
        return
    if not os.path.exists(cot_path):
        raise SystemExit(f"stage sft: {cot_path} does not exist; run --stage cot first or pass --cot-data FILE")
    records = common.read_jsonl(cot_path, required=("image", "class_name", "question", "response"))
    total_steps = max(1, math.ceil(args.sft_epochs * len(records) / args.sft_batch))
    model, processor, _ = run.load_policy(args.model, trainable=vision_trained(args.sft_train_vision),
                                          estimate=lambda processor: sft_estimate(processor, records, args),
                                          min_pixels=args.sft_min_pixels, max_pixels=args.sft_max_pixels)
    optimizer = lifecycle.adamw(model, args.sft_lr, args.sft_weight_decay)
    evaluate = lambda step: {"stage": "sft", **evaluate_all(model, processor, eval_sets, args, run.out, step)}  # noqa
    start = run.resume(model, optimizer, evaluate)["step"]  # the starting model evaluated first: the baseline
    common.print0(f"stage sft: {len(records)} rationales, {total_steps} steps of {args.sft_batch} "
                  f"({args.sft_batch // ranks.world_size} per rank), lr {args.sft_lr} cosine, warm-up "
                  f"{args.sft_warmup}, vision {'trained' if args.sft_train_vision else 'frozen'}")
    for step in run.steps(start, total_steps):
        lr = lifecycle.lr_at(step, base_lr=args.sft_lr, total_steps=total_steps, schedule="cosine",
                             warmup_steps=args.sft_warmup)
        lifecycle.set_lr(optimizer, lr)
        positions = range(step * args.sft_batch + ranks.rank, (step + 1) * args.sft_batch, ranks.world_size)
        batch = [records[common.stream_position(pos, len(records), args.seed)] for pos in positions]

        def loss_of(micro: list[dict]):  # the step's mean over samples: micro-batch token means weighted by rows
            rows = [sft_example(processor, r) for r in micro]
            loss = common.sft_loss(model, processor, [p for p, _ in rows], [t for _, t in rows])  # []
            return loss * len(rows) / len(batch), {"target_tokens": torch.tensor(sum(len(t) for _, t in rows))}
        micro_batches = [batch[s:s + args.sft_micro_batch] for s in range(0, len(batch), args.sft_micro_batch)]
        model.train()
        with run.timer("update"):  # the paper's SFT clips at 1.0
            grad_norm, stats = lifecycle.update(model, optimizer, run.guard, step + 1, micro_batches, loss_of,
                                                grad_clip=1.0, precision=args.precision)
        run.end_step(step + 1, {"stage": "sft", "lr": lr, "grad_norm": grad_norm, **lifecycle.mean_over_ranks(stats)},
                     model, optimizer, {"stage": "sft", "data_position": (step + 1) * args.sft_batch}, evaluate,
                     shown=("loss", "grad_norm"))
    lifecycle.export_hf(model, processor, final, dtype=args.export_dtype)
    common.print0(f"stage sft: done, exported to {final}")

def run_tapo(run: lifecycle.Run, eval_sets: dict, first_stage: bool):
    """TAPO from the SFT export (or --tapo-init / --model) in <out>/tapo, exported to <out>/final (skipped if there)."""
    args, ranks, out = run.args, run.ranks, os.path.dirname(run.out)
    final, sft_final = os.path.join(out, "final"), os.path.join(out, "sft", "final")
    if os.path.exists(os.path.join(final, "config.json")):
        common.print0(f"stage tapo: {final} exists, skipped")
        return
    init = args.tapo_init or (sft_final if os.path.exists(os.path.join(sft_final, "config.json")) else args.model)
    steps_per_batch = args.rollout_batch // args.prompts_per_step

    train = load_split(args, "train", "base", shots=args.shots, limit=args.train_limit)
    seen = sorted({ex.class_name for ex in train.examples})
    by_class = {name: [ex for ex in train.examples if ex.class_name == name] for name in seen}
    negatives = negative_classes(seen, args.negatives, args.confusable_k)
    total_steps = args.max_steps or steps_per_batch * max(1, math.floor(args.tapo_epochs * len(train.examples)
                                                                        / args.rollout_batch))
    model, processor, _ = run.load_policy(init, trainable=vision_trained(not args.tapo_freeze_vision),
                                          estimate=lambda proc: tapo_estimate(proc, train.kind, args, ranks.world_size))
    optimizer = lifecycle.adamw(model, args.lr, args.weight_decay)
    evaluate = lambda step: {"stage": "tapo", **evaluate_all(model, processor, eval_sets, args, run.out, step)}  # noqa
    state = run.resume(model, optimizer, evaluate if first_stage else None)  # after SFT its end is the baseline
    batch_index, cursor = state.get("batch", 0), state.get("data_position", 0)
    common.print0(f"stage tapo from {init}: {len(train.examples)} anchors of {len(by_class)} seen classes, "
                  f"{math.ceil(total_steps / steps_per_batch)} rollout batches of {args.rollout_batch} triplets x "
                  f"{2 * args.group_size} responses, {steps_per_batch} updates each, {args.negatives} negatives")
    rows_per_step = args.prompts_per_step // ranks.world_size * 2 * args.group_size  # one optimizer step, this rank
    for batch_start in run.steps(state["step"], total_steps, steps_per_batch):
        batch, groups, metrics, cursor = rollout_batch(batch_index, cursor, model, processor, train, by_class,
                                                       negatives, args, ranks, run.timer)
        batch_index += 1
        batch_end = min(batch_start + steps_per_batch, total_steps)
        model.train()
        for update, step in enumerate(range(batch_start, batch_end)):
            lr = lifecycle.lr_at(step, base_lr=args.lr, total_steps=total_steps, schedule=args.lr_schedule,
                                 warmup_steps=args.warmup_steps)
            lifecycle.set_lr(optimizer, lr)
            with run.timer("update"):
                grad_norm, terms = tapo_update(model, optimizer, run, step + 1, batch,
                                               range(update * rows_per_step, (update + 1) * rows_per_step), args)
            # a rank's terms are (its token sums) / (global tokens / world): their mean over ranks is the global mean
            record = {"step": step + 1, "stage": "tapo", "lr": lr, "grad_norm": grad_norm, **run.guard.stats(),
                      **{f"loss/{n}": v for n, v in lifecycle.mean_over_ranks(terms).items()}}
            if step + 1 == batch_end or run.guard.exhausted:  # the batch's last step (a non-finite streak ends it)
                break
            run.log.log(record)
        record.update({"rollout_batch": batch_index, **lifecycle.mean_over_ranks(metrics)})  # the batch's metrics
        if args.log_completions and ranks.is_main:  # go with its last optimizer step
            record["completions"] = [
                {"anchor": g.triplet.anchor.id, "positive": g.triplet.positive.id, "negative": g.triplet.negative.id,
                 "truth": g.triplet.anchor.class_name, "completion": g.rollout.texts[0], "reward": float(g.reward[0]),
                 **{n: float(v[0]) for n, v in g.parts.items()}} for g in groups[:args.log_completions]]
        run.end_step(record["step"], record, model, optimizer, {"stage": "tapo", "batch": batch_index,
                     "data_position": cursor}, evaluate, shown=("reward", "sampled_accuracy", "dynamic/kept_frac",
                                                                "loss/pg", "loss/kl_neg", "completion_len"))
    lifecycle.export_hf(model, processor, final, dtype=args.export_dtype)
    common.print0(f"stage tapo: done, exported to {final}")

def sft_estimate(processor, records: list[dict], args) -> dict:
    return dict(rollout_rows=0, new_tokens=args.cot_max_new_tokens, train_rows=args.sft_micro_batch,
                prompt_tokens=max(memory.prompt_tokens_estimate(processor, r["question"]) for r in records[:64]),
                title="memory budget (stage sft)",
                knobs={"activations": "a smaller --sft-micro-batch; --activation-checkpointing 1; --sft-max-pixels",
                       **dict.fromkeys(("gradients", "optimizer states"), "--parallel fsdp over more GPUs; keep the "
                                       "vision tower frozen (no --sft-train-vision)")})

def tapo_estimate(processor, kind: str, args, world_size: int) -> dict:
    return dict(rollout_rows=(args.rollout_prompt_batch or 2 * (args.sample_prompts // world_size)) * args.group_size,
                prompt_tokens=memory.prompt_tokens_estimate(processor, pose_question(kind, 0)[0]),
                new_tokens=args.max_new_tokens, train_rows=args.micro_batch,
                rows_per_prompt=min(args.group_size, args.micro_batch) if args.shared_prefix else 1,
                logit_rows=max(args.micro_batch, args.logprob_micro_batch), title="memory budget (stage tapo)",
                knobs={"logits": "a smaller --logprob-micro-batch / --micro-batch; a smaller --rollout-prompt-batch",
                       "rollout KV cache": "--rollout-prompt-batch (images per sampling call), --group-size, "
                                           "--max-new-tokens, --max-pixels",
                       **dict.fromkeys(("gradients", "optimizer states"),
                                       "--parallel fsdp over more GPUs; --tapo-freeze-vision")})

def load_split(args, split: str, classes: str, **kw) -> data.Dataset:
    return data.load_dataset(args.data, split, root=args.data_root, classes=classes, seed=args.seed, **kw)

def vision_trained(trained: bool):
    """load_policy's `trainable`: every parameter trains, the vision tower (and merger) only when `trained`."""
    def trainable(model):
        model.model.visual.requires_grad_(trained)
        return None if trained else "vision tower frozen"
    return trainable

def evaluate_all(model, processor, eval_sets: dict, args, out: str, step: int) -> dict:
    """Each protocol on the seen (base) and unseen (novel) classes: eval/<protocol>/<group>, <group>_n, avg of both."""
    result = evaluation.evaluate_groups(
        model, processor, eval_sets, [EVALS[name] for name in args.protocols], out=out, step=step,
        precision=args.precision, name="eval/{protocol}/{group}", folder="{protocol}_{group}", seed=args.seed,
        max_new_tokens=args.eval_max_new_tokens, micro_batch=args.eval_batch, mcq_distractors=args.mcq_distractors,
        compile_decode=bool(args.compile_decode))
    for name in args.protocols:
        result.update({f"eval/{name}/{group}_n": len(ds) for group, ds in eval_sets.items()})
        result[f"eval/{name}/avg"] = (result[f"eval/{name}/seen"] + result[f"eval/{name}/unseen"]) / 2
    return result

def eval_sets_for(args) -> dict:
    return {group: load_split(args, args.eval_split, classes, limit=args.eval_limit)
            for group, classes in (("seen", "base"), ("unseen", "novel")) if args.eval_every}

# ----- 6. Flags (the paper's values as defaults, a toy preset for the CPU), and main -----
# Toy preset (flags not given): 20 rationales per seen class (each training image, not 1 of 20: 12 SFT samples would
# not teach the tiny stand-in the format and the attributes); learning rates for a 0.7M-parameter model.
TOY = dict(model="tiny", **dict.fromkeys(("min_pixels", "max_pixels", "sft_min_pixels", "sft_max_pixels"),
                                          data.TOY_IMAGE_SIZE ** 2),
           cot_per_class=20, cot_candidates=2, cot_max_new_tokens=96, closed_frac=0.5, sft_prompt="rl", sft_lr=2e-3,
           sft_batch=16, sft_epochs=6.0, sft_micro_batch=16, rollout_batch=16, sample_prompts=16, prompts_per_step=8,
           lr=1e-4, tapo_epochs=4.0, rewards="exact=0.9,format=0.1", temperature=0.7, max_new_tokens=96,
           micro_batch=40, logprob_micro_batch=80, eval_every=90, eval_max_new_tokens=96, eval_batch=180, save_every=8)

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Fine-R1: CoT SFT + TAPO (triplet-augmented GRPO) with Qwen2.5-VL")
    # the shared flags with the paper's values; TAPO's rate is constant, it has no reference KL
    lifecycle.add_training_args(p, model="Qwen/Qwen2.5-VL-7B-Instruct", group_size=5, rewards="accuracy=0.9,format=0.1",
                                lr=1e-6, lr_schedule="constant", beta=None, max_new_tokens=2048, micro_batch=4,
                                eval_every=50, save_every=15, weight_decay=0.01, grad_clip=1.0, temperature=1.0,
                                top_p=0.99, eval_max_new_tokens=2048, eval_batch=8)
    p.set_defaults(min_pixels=256 * 28 * 28, max_pixels=1280 * 28 * 28)
    p.add_argument("--stage", default="all", choices=["cot", "sft", "tapo", "all"], help="all: cot, sft then tapo")
    g = p.add_argument_group("stage cot: the rationale data")
    add = lambda flag, default, help, **kw: g.add_argument(flag, default=default, help=help,  # noqa: E731
                                                           type=kw.pop("type", type(default)), **kw)
    add("--cot-data", None, "rationales to train on instead: JSONL of image, class_name, question, response", type=str)
    add("--cot-source", "auto", "who writes the rationales: a teacher, or (toy only) the image's attributes; auto: "
        "the teacher when --teacher is given or the data is not toy", choices=["auto", "teacher", "attributes"])
    add("--teacher", None, "a Qwen2.5-VL checkpoint (default --model) or openai:<model> at --teacher-url", type=str)
    add("--teacher-url", None, "OpenAI-compatible server of an openai: teacher, e.g. http://HOST:8000/v1 (default "
        "$OPENAI_BASE_URL, key $OPENAI_API_KEY); images sent inline", type=str)
    add("--teacher-concurrency", 16, "requests in flight per rank (openai:)")
    add("--cot-per-class", 1, "rationales kept per seen class (paper 1)")
    add("--cot-images-per-class", 4, "training images per class offered to the teacher until one rationale passes")
    add("--cot-samples", 2, "rationales sampled per image from the teacher")
    add("--cot-candidates", 3, "confusable classes in a rationale's candidate line (paper 3-4)")
    add("--cot-temperature", 0.7, "teacher sampling temperature")
    add("--cot-top-p", 0.95, "teacher nucleus sampling")
    add("--cot-max-new-tokens", 2048, "rationale length cap")
    add("--cot-batch", 8, "images per teacher sampling call (memory knob)")
    add("--closed-frac", 0.0, "share of SFT / TAPO questions asked closed-world, among 3 other seen classes (paper 0)")
    g = p.add_argument_group("stage sft")
    add("--sft-prompt", "paper", "paper: an R1-style system prompt and the bare question (the paper's SFT data); rl: "
        "TAPO's prompt (toy preset)", choices=["paper", "rl"])
    add("--sft-lr", 5e-6, "peak learning rate (paper 5e-6)")
    add("--sft-warmup", 6, "linear warm-up steps, then cosine decay (paper 6)")
    add("--sft-weight-decay", 0.1, "AdamW weight decay (paper 0.1)")
    add("--sft-batch", 64, "samples per optimizer step, all ranks (paper 64)")
    add("--sft-epochs", 10.0, "passes over the rationales (paper 10)")
    add("--sft-micro-batch", 4, "samples per forward/backward on a rank")
    g.add_argument("--sft-train-vision", action="store_true", help="also train the vision tower (paper: frozen)")
    add("--sft-min-pixels", 32 * 32, "SFT image pixel budget, lower (paper 32*32)")
    add("--sft-max-pixels", 768 * 768, "SFT image pixel budget, upper (paper 768*768)")
    g = p.add_argument_group("stage tapo (--group-size: rollouts per image; anchor's + positive's = one group of 2x)")
    add("--tapo-init", None, "checkpoint TAPO starts from (default: <out>/sft/final, else --model)", type=str)
    add("--shots", 4, "training images per seen class (paper 4)")
    add("--negatives", "confusable", "negative image from a random other class, or from one of the --confusable-k "
        "classes whose names are most similar to the anchor's", choices=["random", "confusable"])
    add("--confusable-k", 3, "candidate classes for a confusable negative")
    add("--rollout-batch", 192, "triplets (groups) per rollout batch after filtering, all ranks (paper 192)")
    add("--sample-prompts", 64, "triplets sampled per dynamic-sampling round, all ranks (paper 64)")
    add("--max-sample-rounds", 8, "sampling rounds per rollout batch, then it is filled with rejected groups")
    add("--acc-low", 0.01, "keep a group if its mean accuracy is > this (paper 0.01) ...")
    add("--acc-high", 0.99, "... and < this (paper 0.99)")
    add("--prompts-per-step", 64, "triplets per optimizer step, all ranks (paper 64: 3 steps per rollout batch)")
    add("--tapo-epochs", 5.0, "passes over the k-shot seen images (paper 5 for 7B; --max-steps wins)")
    add("--adv-eps", 1e-6, "eps in (r - mean) / (std + eps) (paper 1e-6)")
    add("--clip-low", 0.2, "PPO clip, lower side (paper 0.2)")
    add("--clip-high", 0.28, "PPO clip, upper side: clip-higher (paper 0.28)")
    add("--dual-clip", 3.0, "cap of the loss at c*|A| for A < 0 (paper 3)")
    add("--kl-neg-coef", 0.01, "weight of the k3 KL against the negative image, MAXIMISED (paper 0.01)")
    add("--entropy-coef", 0.03, "weight of mean(-logp) (paper 0.03)")
    add("--neg-entropy-coef", 0.03, "weight of mean(-logp_neg) (paper 0.03)")
    g.add_argument("--tapo-freeze-vision", action="store_true", help="freeze the vision tower (the paper trains it)")
    add("--logprob-micro-batch", 16, "responses per no-grad log-prob forward")
    add("--rollout-prompt-batch", None, "images per sampling call (memory knob; default: a whole round)", type=int)
    g = p.add_argument_group("evaluation")
    add("--eval-split", "test", "held-out split evaluated (default %(default)s)")
    add("--eval-protocols", "mcq,open", "eval.py protocols (closed and open world)")
    add("--mcq-distractors", "all", "mcq wrong options from every class, seen and unseen (all: the paper's files), or "
        "from the evaluated group only (split)", choices=["all", "split"])
    args = lifecycle.parse_flags(p, argv, TOY, REWARDS)
    if args.cot_source == "auto":
        args.cot_source = "attributes" if args.data == "toy" and not args.teacher else "teacher"
    if args.cot_source == "attributes" and args.data != "toy":
        raise SystemExit(f"--cot-source attributes needs --data toy (whose class names are the attributes); "
                         f"for --data {args.data} use a teacher model or --cot-data FILE")
    if args.cot_source == "attributes" and args.teacher:
        raise SystemExit(f"--teacher {args.teacher} with --cot-source attributes: the attributes write the "
                         f"rationales and the teacher would be ignored; drop one of the two")
    args.protocols = [s.strip() for s in args.eval_protocols.split(",") if s.strip()]
    if unknown := [name for name in args.protocols if name not in EVALS]:
        raise SystemExit(f"--eval-protocols {args.eval_protocols}: {unknown[0]!r} is not one of {', '.join(EVALS)}")
    return args

def check_batches(args, stages: list[str], world_size: int):
    """The batch arithmetic of the stages to run, refused with the numbers at the start (never after hours of SFT)."""
    if "sft" in stages:
        lifecycle.require_divisible("--sft-batch", args.sft_batch, world_size, "the number of ranks")
    if "tapo" not in stages:
        return
    for what, n in (("--rollout-batch", args.rollout_batch), ("--sample-prompts", args.sample_prompts),
                    ("--prompts-per-step", args.prompts_per_step)):
        lifecycle.require_divisible(what, n, world_size, "the number of ranks")
    lifecycle.require_divisible("--rollout-batch", args.rollout_batch, args.prompts_per_step, "--prompts-per-step")
    if args.max_sample_rounds * args.sample_prompts < args.rollout_batch:
        raise SystemExit(f"--max-sample-rounds {args.max_sample_rounds} x --sample-prompts {args.sample_prompts} "
                         f"< --rollout-batch {args.rollout_batch}: the batch could never be filled")

def main(argv=None):
    args = parse_args(argv)
    stages = ["cot", "sft", "tapo"] if args.stage == "all" else [args.stage]
    check_batches(args, stages, lifecycle.launched_world_size())  # before the process group
    run = lifecycle.Run(args, "fine_r1")
    common.print0(f"{'toy preset' if args.data == 'toy' else 'paper defaults'} for the flags not given (all values: "
                  f"{os.path.join(run.out, 'config.json')})")
    eval_sets = eval_sets_for(args)
    cot_path = run_cot(args, run.ranks, run.out) if "cot" in stages else \
        args.cot_data or os.path.join(run.out, "cot.jsonl")
    if "sft" in stages:
        run_sft(run.stage("sft"), cot_path, eval_sets)
        gc.collect()  # the SFT model and optimizer freed before TAPO loads
        torch.cuda.empty_cache()
    if "tapo" in stages:
        run_tapo(run.stage("tapo"), eval_sets, first_stage=stages[0] == "tapo")
    lifecycle.print_eval_summary([os.path.join(run.out, stage, "metrics.jsonl") for stage in ("sft", "tapo")])
    common.cleanup_distributed()
    return run.out

if __name__ == "__main__":
    lifecycle.run_script(main)
