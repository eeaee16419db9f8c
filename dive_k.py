"""
dive_k.py: DiVE-k (arXiv 2511.18305) in one file: GRPO on multiple-choice questions mined from the model's own
confusions.

Stage 1, before RL, samples the base model K times per training image with the base-class list in the prompt and
keeps its most frequent valid answers, plus the truth, as the options of a multiple-choice question. Stage 2 runs
GRPO on those questions: the policy reasons in <think>, answers a letter in <answer>, and is rewarded for the format
and for the right letter. At test time the model answers in two steps (eval.py --protocol two_step): K open answers
with the class list, then a greedy pick among its own top 5.

Launch (the same command resumes from the last checkpoint in --out, mining from its cache)
  1 GPU     python dive_k.py --data cub --data-root /data/CUB_200_2011
  8 GPUs    torchrun --nproc-per-node 8 dive_k.py --data cub --data-root /data/CUB_200_2011
  2 nodes   torchrun --nnodes 2 --node-rank 0 --nproc-per-node 8 --rdzv_backend c10d --rdzv_endpoint HOST:PORT \
                dive_k.py --data cub --data-root /data/CUB_200_2011      (--out on a filesystem every node sees)
  CPU       python dive_k.py --data toy          (the tiny stand-in, the toy preset below)

Simplifications and changes (the full list, with what the released code does: README, "Every deviation")
  * GRPO with one update per rollout batch (ratio 1, as the paper), the k3 KL inside the per-token loss (beta
    0.04), the unbiased group std, a token mean per completion; the clip is written out for --updates-per-batch > 1
  * options keep the frequency order, a missing truth replaces the least frequent one, base classes only (2-5)
  * the letter is read from the first <answer> only and a hedge scores 0; an option's exact text also counts
  * fp32 master weights with bf16 compute; each prompt is encoded once per group, in sampling and in scoring
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import time
from collections import Counter

import torch

import common
import data
import evaluation
import judges
import lifecycle
import memory

# ----- 1. Prompts: every instruction of the released prompts, in this project's words -----
# Mining and two-step step 1 (released create_prompt): the object kind; the most likely name in the dataset's answer
# format; one of the listed categories (a Python list, as released); reasoning and answer tags; the format strictly.
MINE_PROMPT = ("This is an image containing a {kind}. Give the most likely {answer_format} of the {kind} in the "
               "image.\nThe {answer_format} must be one of these categories: {categories}.\n"
               + judges.FORMAT_LINE.format(shape="{answer_format}"))
# Multiple choice (released build_mcq_prompt): the object kind; pick from the options, one "X. name" per line; answer
# with the letter of the correct name; tags with '<answer> option letter </answer>'.
MCQ_PROMPT = ("This is an image containing a {kind}. Which of the options below is the {kind} in the image?\n"
              "{options}\nAnswer with the letter of the correct {kind} name.\n"
              + judges.FORMAT_LINE.format(shape="option letter"))
# The answer format the released prompts name per dataset (a model often echoes it: "species name: X").
ANSWER_FORMATS = {"cars": "make model", "aircraft": "make model", "toy": "shape name"}  # others: "species name"

def answer_format(dataset_name: str) -> str:
    return ANSWER_FORMATS.get(dataset_name, "species name")

def mine_prompt(kind: str, dataset_name: str, class_names: list[str]) -> str:
    return MINE_PROMPT.format(kind=kind, answer_format=answer_format(dataset_name), categories=str(list(class_names)))

def mcq_prompt(kind: str, options: list[str]) -> str:
    return MCQ_PROMPT.format(kind=kind, options="\n".join(f"{judges.LETTERS[i]}. {o}" for i, o in enumerate(options)))

# Two-step inference as an evaluation protocol (eval.py --protocol two_step, and evaluate_two_step below): step 1
# samples answers with the split's class list at the released mining's sampling (T=1.0, top_p 0.95, repetition
# penalty 1.1; fixed here, not the --mine-* flags), step 2 asks greedily over the 5 most frequent.
TWO_STEP_EVAL = evaluation.Protocol(
    "two_step", evaluation.two_step_batch, evaluation.two_step_metrics, template=[MINE_PROMPT, MCQ_PROMPT],
    prompt=lambda dataset, options: mine_prompt(dataset.kind, dataset.name, dataset.split_class_names),
    step2=mcq_prompt, answer_format=answer_format, sampling=dict(temperature=1.0, top_p=0.95, repetition_penalty=1.1))

# ----- 2. Stage 1: each image's question from the model's K answers (the method's data) -----
def build_question(answers: list[str | None], truth: str, base_classes: list[str], rng: random.Random, *,
                   max_options: int = 5, random_options: int = 2, drop_easy: bool = True,
                   prefixes: tuple[str, ...] = judges.DIVEK_PREFIXES[:2], max_chars: int = 120) -> dict:
    """The multiple-choice question of one image from its K parsed answers (None: a sample without <answer>), by the
    paper's rules and the released code's where the paper is silent:
      1. the format prefix ("species name: ") stripped, answers over `max_chars` dropped, the rest normalised and
         counted where they name a base class
      2. only the truth answered: "easy" (dropped from training; with drop_easy=False kept, with random options)
      3. options: the min(max_options, distinct) most frequent (ties: first answered); at most one distinct answer:
         the truth and `random_options` random base classes join it, else a missing truth replaces the least frequent
      4. shuffled; the answer is the truth's letter

    Example: answers ["Species name: Red-striped circle", "red striped circle", "blue square", None], truth "blue
    square", base classes ["red striped circle", "blue square", "green square"] -> counts {"red striped circle": 2,
    "blue square": 1}, options those two in a shuffled order, answer the letter of "blue square".
    """
    canonical = {judges.normalize(c): c for c in base_classes}
    # the released mining's one spelling fix: Flowers' class is "barbeton daisy"
    keys = [judges.normalize(judges.strip_prefixes(a, prefixes)).replace("barberton", "barbeton")
            for a in answers if a is not None]
    counts = Counter(canonical[key] for key in keys if key in canonical and len(key) <= max_chars)
    ranked = [name for name, _ in counts.most_common()]  # most frequent first; Counter keeps first-seen order on ties
    record = dict(truth=truth, counts=dict(counts), n_samples=len(answers), n_valid=sum(counts.values()))
    easy = ranked == [truth]
    if easy and drop_easy:
        return {**record, "truth_inserted": False, "padded": False, "status": "easy", "options": None, "answer": None}
    options = ranked[:max_options]
    truth_inserted, padded = truth not in options, len(ranked) <= 1
    if padded:  # nothing to choose between: the mined answer (if any), the truth, random base classes
        if truth_inserted:
            options.append(truth)
        pool = [c for c in base_classes if c not in options]
        options += rng.sample(pool, min(len(pool), random_options))
    elif truth_inserted:
        options[-1] = truth  # replaces the least frequent option
    rng.shuffle(options)
    return {**record, "truth_inserted": truth_inserted, "padded": padded, "status": "easy" if easy else "kept",
            "options": options, "answer": judges.LETTERS[options.index(truth)]}

def mine(model, processor, examples: list[data.Example], base_classes: list[str], kind: str, args, *, seed: int,
         drop_easy: bool = True) -> list[dict]:
    """K sampled answers per image (the base-class list in the prompt) -> each image's question, in order."""
    prompts = [common.encode_prompt(processor, ex.image, mine_prompt(kind, args.data, base_classes)) for ex in examples]
    with args.precision.context():
        rollout = common.sample(model, processor, prompts, group_size=args.mine_samples,
                                max_new_tokens=args.mine_max_new_tokens, temperature=args.mine_temperature,
                                top_p=args.mine_top_p, repetition_penalty=args.mine_repetition_penalty,
                                generator=torch.Generator().manual_seed(seed), compile_decode=bool(args.compile_decode))
    answers = [judges.parse_answer(text) for text in rollout.texts]  # image by image, K each
    return [{"id": ex.id, "image": ex.image,
             **build_question(answers[i * args.mine_samples:(i + 1) * args.mine_samples], ex.class_name, base_classes,
                              random.Random(f"{args.seed}/{ex.id}"),  # option order: seeded by the image only
                              max_options=args.max_options,
                              random_options=args.random_options, drop_easy=drop_easy,
                              prefixes=(f"{answer_format(args.data)}: ",))}
            for i, ex in enumerate(examples)]

# ----- 3. Reward: a registry of plain functions fn(completions, question) -> one reward per completion -----
# a letter not inside a word and followed by punctuation or the end ("B", "B.", "is B!"), or in brackets ("(B)"), or
# opening the answer with a bracket ("B) ..."); "B (not A)" chooses nothing, as in the released reader
LETTER_RE = re.compile(r"(?<![A-Z0-9])([A-Z])(?=[.,:;!?]|$|(?<=\(.)\)|(?<=\A.)\))")

def answer_letter(completion: str, n_options: int) -> str | None:
    """The option letter in the completion's first <answer> tag (LETTER_RE: "B", "b", "B.", "(B)", "B) ...",
    "Option B", "The answer is B.", "B. sooty albatross"). None when there is no answer tag, no letter, a letter
    past the options, or a hedge: two distinct letters ("A, B") or two letters joined by or / either / vs ("A or B.").
    >>> answer_letter("<answer>The answer is B.</answer>", 4), answer_letter("<answer>A or B.</answer>", 4)
    ('B', None)
    """
    text = judges.parse_answer(completion) or ""  # stripped; no answer tag: no letter
    upper = text.upper()
    found = set(LETTER_RE.findall(upper))
    standalone = set(re.findall(r"(?<![A-Z0-9])[A-Z](?![A-Z0-9])", upper))
    if len(found) != 1 or (len(standalone) > 1 and judges.is_hedge(text)):
        return None
    letter = found.pop()
    return letter if letter in judges.LETTERS[:n_options] else None

def chosen_letter(completion: str, options: list[str]) -> str | None:
    """The chosen option's letter: a letter (answer_letter), or an answer that is exactly one option's text
    (normalised; the tiny stand-in answers with the option's text, real checkpoints with letters)."""
    letter = answer_letter(completion, len(options))
    if letter is not None:  # most completions: the options' texts are never normalised
        return letter
    text = judges.normalize(judges.parse_answer(completion) or "")
    matches = [judges.LETTERS[i] for i, option in enumerate(options) if text and text == judges.normalize(option)]
    return matches[0] if len(matches) == 1 else None

def format_reward(completions: list[str], question: dict) -> list[float]:
    """1 for a completion that is `<think>...</think> <answer>...</answer>` and nothing else."""
    return [float(judges.format_ok(c)) for c in completions]

def mcq_reward(completions: list[str], question: dict) -> list[float]:
    """1 for a completion whose chosen option (by letter, or by its exact text) is the question's answer."""
    return [float(chosen_letter(c, question["options"]) == question["answer"]) for c in completions]

def random_reward(completions: list[str], question: dict) -> list[float]:
    """The control: a fair coin per completion that ignores it (global RNG: seeded per rank, saved in checkpoints)."""
    return [float(random.random() < 0.5) for _ in completions]

REWARDS = {"format": format_reward, "mcq": mcq_reward, "random": random_reward}

# ----- 4. Advantage -----
def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4,
                     scale: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """A_i = (r_i - mean(r_group)) / (std(r_group) + eps), std unbiased (as trl / the paper); mean only with
    scale=False (Dr. GRPO). Rows are grouped by prompt (prompt i owns rows i*G .. i*G+G-1).
    Returns (advantages [B], zero_std [P]: groups whose rewards are all equal, hence no gradient).

    Example: rewards [2, 0, 1, 1], G = 2 -> advantages [0.7071, -0.7071, 0, 0] (group 1: mean 1, std 1.4142),
    zero_std [False, True].
    """
    r = rewards.float().view(-1, group_size)  # [P, G]
    mean = r.mean(1, keepdim=True)  # [P, 1]
    std = r.std(1, keepdim=True)  # [P, 1]
    adv = (r - mean) / (std + eps) if scale else r - mean  # [P, G]
    return adv.reshape(-1), std.squeeze(1) == 0

# ----- 5. The loss, written by hand -----
def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None, advantages: torch.Tensor,
              mask: torch.Tensor, *, beta: float, clip_low: float, clip_high: float, loss_agg: str,
              normalizer: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss of one micro-batch of completions, summed and divided by `normalizer`.

    Per token t of completion i:   rho = exp(logp - old_logp)
        L_it = -min(rho * A_i, clip(rho, 1 - clip_low, 1 + clip_high) * A_i) + beta * k3_it
        k3_it = exp(ref - logp) - (ref - logp) - 1       (>= 0; only when ref_logp is given)
    Aggregation:
        seq:   sum_i [ mean_t L_it ]          / normalizer   (normalizer = completions on this rank: GRPO)
        token: sum_i sum_t L_it               / normalizer   (normalizer = tokens of the step / world size: DAPO)
    DDP and FSDP average gradients over ranks, hence "per rank" normalisers; the micro-batch losses of one step add
    up to the step's loss.

    Worked example, on-policy (old_logp = logp.detach(), so rho = 1 and its gradient is A * grad logp), beta = 0:
        advantages [1, -1], mask [[1, 1, 0], [1, 1, 1]]  ->  L = [[-1, -1, .], [1, 1, 1]]
        seq:   (mean(-1, -1) + mean(1, 1, 1)) / 2 = 0
        token: (-1 - 1 + 1 + 1 + 1) / 5 = 0.2     (the longer completion weighs more)
    The value of an on-policy loss says little; its gradient is what moves: sum_i A_i * mean_t grad logp_it / B.
    """
    mask = mask.to(logp.dtype)  # [B, T]
    ratio = torch.exp(logp - old_logp)  # [B, T]
    adv = advantages.to(logp.dtype)[:, None]  # [B, 1]
    unclipped = ratio * adv  # [B, T]
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * adv  # [B, T]
    per_token = -torch.minimum(unclipped, clipped)  # [B, T]
    kl = torch.zeros_like(logp)  # [B, T]
    if ref_logp is not None:
        delta = ref_logp - logp  # [B, T]
        kl = torch.exp(delta) - delta - 1  # [B, T] k3 estimator of KL(policy || ref)
        per_token = per_token + beta * kl  # [B, T]
    if loss_agg == "seq":
        per_seq = (per_token * mask).sum(1) / mask.sum(1).clamp(min=1)  # [B]
        loss = per_seq.sum() / normalizer  # []
    else:  # token
        loss = (per_token * mask).sum() / normalizer  # []
    with torch.no_grad():
        clipped_taken = (clipped < unclipped).to(mask.dtype)  # [B, T] tokens where the clip changed the objective
        stats = {"kl_sum": (kl * mask).sum(), "clipped_sum": (clipped_taken * mask).sum(), "tokens": mask.sum()}
    return loss, stats

def loss_normalizer(loss_agg: str, mask: torch.Tensor, world_size: int) -> float:
    """What this rank divides its summed loss by, so that the gradient DDP / FSDP average over ranks is the mean over
    the step: its completions (seq), or the step's tokens over all ranks / ranks (token). mask: [B, T], this rank's."""
    return float(mask.shape[0]) if loss_agg == "seq" else lifecycle.global_token_count(mask) / world_size

# ----- 6. The train step: rollout -> reward -> advantage -> log-probs -> micro-batched update -----
def train_step(step: int, questions: list[dict], model, reference, optimizer, processor, kind: str, args,
               run: lifecycle.Run) -> dict:
    """One GRPO step on this rank's questions (each question's G completions on this rank): the step's record."""
    timer, G = run.timer, args.group_size
    model.eval()  # sampling needs the KV cache, which activation checkpointing turns off in train mode
    prompts = [common.encode_prompt(processor, q["image"], mcq_prompt(kind, q["options"])) for q in questions]
    generator = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 1009 + run.ranks.rank)
    with timer("sampling"), args.precision.context(), \
            common.gathered_params(model, common.fsdp_warmup_inputs(model, processor, prompts[0])):
        rollout = common.sample(model, processor, prompts, group_size=G, max_new_tokens=args.max_new_tokens,
                                temperature=args.temperature, top_p=args.top_p, generator=generator,
                                compile_decode=bool(args.compile_decode))

    groups = [lifecycle.group_rewards(REWARDS, args.reward_weights, rollout.texts[i * G:(i + 1) * G], q)
              for i, q in enumerate(questions)]
    rewards = torch.cat([total for total, _ in groups])  # [B]
    components = {name: torch.cat([parts[name] for _, parts in groups]) for name in args.reward_weights}  # [B] each
    advantages, zero_std = group_advantages(rewards, G, args.adv_eps, scale=not args.no_std)  # [B]

    # log-probs of the sampling policy (needed only when it moves before the last update) and of the reference
    ids, mask = rollout.completion_ids, rollout.completion_mask  # [B, T] each
    logprobs = lambda m: common.completion_logprobs(  # noqa: E731  [B, T]
        m, processor, rollout.row_prompts, ids, mask, temperature=args.temperature, micro_batch=args.micro_batch,
        shared_prefix=bool(args.shared_prefix))
    with timer("logprobs"), args.precision.context():
        old_all = logprobs(model) if args.updates_per_batch > 1 else None  # [B, T]
        ref_all = logprobs(reference) if reference is not None else None  # [B, T]

    # update: gradient accumulation over micro-batches, each question's prompt run once for its G completions
    pad_id = common.special_token_ids(processor)["<|endoftext|>"]
    normalizer = loss_normalizer(args.loss_agg, mask, run.ranks.world_size)  # see grpo_loss

    def loss_of(rows: slice):
        width = max(1, int(mask[rows].sum(1).max()))  # trim the padding shared by these rows
        logp = common.score_completions(model, rollout.row_prompts[rows], ids[rows, :width], mask[rows, :width],
                                        pad_id, args.temperature, bool(args.shared_prefix)).float()  # [b, t]
        old = old_all[rows, :width].to(logp) if old_all is not None else logp.detach()  # [b, t]
        ref = ref_all[rows, :width].to(logp) if ref_all is not None else None  # [b, t]
        return grpo_loss(logp, old, ref, advantages[rows].to(logp.device), mask[rows, :width].to(logp.device),
                         beta=args.beta, clip_low=args.clip_eps, clip_high=args.clip_eps_high, loss_agg=args.loss_agg,
                         normalizer=normalizer)
    model.train()
    micro_batches = [slice(s, s + args.micro_batch) for s in range(0, ids.shape[0], args.micro_batch)]
    totals = Counter()
    with timer("update"):
        for _ in range(args.updates_per_batch):
            grad_norm, stats = lifecycle.update(model, optimizer, run.guard, step + 1, micro_batches, loss_of,
                                                grad_clip=args.grad_clip, precision=args.precision)
            totals.update(stats)
    totals = {k: float(v) for k, v in totals.items()}  # the step's one read of the loss statistics

    rate = lambda reward: sum(sum(reward(rollout.texts[i * G:(i + 1) * G], q)) for i, q in enumerate(questions)) \
        / len(rollout.texts)  # noqa: E731
    metrics = {"reward": float(rewards.mean()), "accuracy": rate(mcq_reward), "format_rate": rate(format_reward),
               "zero_std_frac": float(zero_std.float().mean()), "loss": totals["loss"] / args.updates_per_batch,
               "completion_len": float(mask.sum()) / len(rollout.texts),
               "truncation_rate": float(rollout.truncated.float().mean()),
               "kl": totals["kl_sum"] / max(1.0, totals["tokens"]),
               "clip_frac": totals["clipped_sum"] / max(1.0, totals["tokens"]),
               "mean_options": sum(len(q["options"]) for q in questions) / len(questions),
               **{f"reward/{n}": float(v.mean()) for n, v in components.items()}}
    if args.online_mining:  # the questions were mined for this step, by the policy
        metrics.update({"mining/easy_frac": sum(q["status"] == "easy" for q in questions) / len(questions),
                        "mining/truth_inserted_frac": sum(q["truth_inserted"] for q in questions) / len(questions)})
    record = {**lifecycle.mean_over_ranks(metrics), "grad_norm": grad_norm,  # tokens: all ranks' completions
              "tokens_per_s": lifecycle.global_token_count(mask) / (time.perf_counter() - run.t_step)}
    if args.log_completions and run.ranks.is_main:
        record["completions"] = [{"id": q["id"], "options": q["options"], "answer": q["answer"],
                                  "completion": rollout.texts[i * G], "reward": float(rewards[i * G]),
                                  **{n: float(v[i * G]) for n, v in components.items()}}
                                 for i, q in enumerate(questions)][:args.log_completions]
    return record

# ----- 7. Stage 1 over the training set (cached, resumable per rank), and each step's questions -----
def mine_training_set(model, processor, train: data.Dataset, base_classes: list[str], args, run: lifecycle.Run,
                      fsdp_inputs: dict | None, log_summary: bool) -> list[dict]:
    """Stage 1 for every training image, cached in <out>/mcq.jsonl (resumable per rank while it runs, merged in
    dataset order): the kept questions."""
    final = os.path.join(run.out, "mcq.jsonl")
    if not os.path.exists(final):
        by_id = {ex.id: (i, ex) for i, ex in enumerate(train.examples)}
        model.eval()

        def work(ids: list[str]):
            bar = common.progress_bar(run.ranks.is_main, total=len(ids), desc="mining")
            with common.gathered_params(model, fsdp_inputs):
                for start in range(0, len(ids), args.mine_batch):
                    chunk = [by_id[i][1] for i in ids[start:start + args.mine_batch]]
                    seed = args.seed * 1_000_003 + by_id[chunk[0].id][0]  # a resumed run samples the same answers
                    yield from ((q["id"], q) for q in mine(model, processor, chunk, base_classes, train.kind, args,
                                                           seed=seed))
                    if bar is not None:
                        bar.update(len(chunk))
            if bar is not None:
                bar.close()
        done = common.resumable_map(run.out, "mcq", list(by_id), work, run.ranks,
                                    f"stage 1: mining with K={args.mine_samples} samples")
        if run.ranks.is_main:
            with open(final + ".tmp", "w") as f:
                f.writelines(json.dumps(done[ex.id]) + "\n" for ex in train.examples)
            os.replace(final + ".tmp", final)
            common.remove_rank_parts(run.out, "mcq")
        common.barrier()
    questions = common.read_jsonl(final)
    kept = [q for q in questions if q["status"] == "kept"]
    summary = {"mining/images": len(questions), "mining/kept": len(kept),
               "mining/dropped_easy": sum(q["status"] == "easy" for q in questions),
               "mining/truth_inserted": sum(q["truth_inserted"] for q in kept),
               "mining/padded": sum(q["padded"] for q in kept),
               "mining/valid_answer_rate": (sum(q["n_valid"] for q in questions)
                                            / max(1, sum(q["n_samples"] for q in questions))),
               "mining/truth_in_top_rate": (sum(bool(q["counts"].get(q["truth"])) for q in questions)
                                            / max(1, len(questions))),
               "mining/mean_options": sum(len(q["options"]) for q in kept) / max(1, len(kept))}
    common.print0("stage 1 summary: " + ", ".join(f"{k.split('/')[-1]} {v:g}" for k, v in summary.items()))
    if log_summary:  # a resumed run has it in metrics.jsonl already
        run.log.log({"step": 0, "event": "mining", **summary})
    return kept

def questions_for_step(step: int, pool: list, model, processor, base_classes: list[str], kind: str, args,
                       run: lifecycle.Run, fsdp_inputs: dict | None) -> list[dict]:
    """This rank's questions: positions step*P + rank, + world, ... of an endless stream of seeded epochs over the
    pool (a resume restores the order exactly). --online-mining: the pool is images, mined now by the policy."""
    rank, world_size = run.ranks.rank, run.ranks.world_size
    positions = range(step * args.prompts_per_step + rank, (step + 1) * args.prompts_per_step, world_size)
    batch = [pool[common.stream_position(pos, len(pool), args.seed)] for pos in positions]
    if not args.online_mining:
        return batch
    model.eval()
    with run.timer("mining"), common.gathered_params(model, fsdp_inputs):
        return mine(model, processor, batch, base_classes, kind, args, drop_easy=False,
                    seed=(args.seed + 1_000_000 * (step + 1)) * 1009 + rank)

# ----- 8. Evaluation (two-step inference, eval.py); flags: the paper's values, a toy preset for the CPU -----
def evaluate_two_step(model, processor, eval_sets: dict, args, out: str, step: int) -> dict:
    """Two-step inference on every held-out group, and the harmonic mean of base and novel accuracy when both ran."""
    return evaluation.evaluate_groups(
        model, processor, eval_sets, [TWO_STEP_EVAL], out=out, step=step, precision=args.precision,
        keys=("accuracy", "truth_in_options", "format_ok"), seed=args.seed, max_new_tokens=args.eval_max_new_tokens,
        samples=args.eval_samples, micro_batch=args.eval_batch, scoring=args.eval_scoring,
        compile_decode=bool(args.compile_decode))

# `--data toy` on a 2-core CPU: the tiny stand-in, short completions, a higher learning rate and KL weight for a
# 0.7M-parameter model, 90 steps; two-step scored strictly (the stand-in answers an option's text, which the paper's
# letter reader misses). Measured in tests/test_dive_k_learning.py.
TOY = dict(model="tiny", group_size=8, prompts_per_step=16, lr=2e-4, lr_schedule="constant", beta=0.2,
           max_new_tokens=48, mine_samples=8, mine_max_new_tokens=48, max_steps=90, micro_batch=64, eval_samples=8,
           eval_max_new_tokens=48, eval_every=30, save_every=30, eval_scoring="strict")

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    lifecycle.add_training_args(  # the paper's values (README: DiVE-k; trl-0.16 defaults where its scripts set nothing)
        p, model="Qwen/Qwen2.5-VL-7B-Instruct", group_size=4, rewards="format,mcq", lr=1e-6, lr_schedule="linear",
        beta=0.04, max_new_tokens=1024, micro_batch=4, eval_every=100, save_every=100)
    g = p.add_argument_group("data")
    g.add_argument("--train-split", default="train", help="split the questions are mined from (default %(default)s)")
    g.add_argument("--classes", default="base", choices=["base", "novel", "all"],
                   help="classes trained on: CoOp base half (the paper's base-to-novel setting) or all (few-shot)")
    g.add_argument("--shots", type=int, default=None, help="k training images per class (the 4-shot setting)")
    g = p.add_argument_group("stage 1: top-k option mining")
    g.add_argument("--mine-samples", type=int, default=20, help="K answers sampled per image (%(default)s)")
    g.add_argument("--mine-temperature", type=float, default=1.0, help="sampling temperature (%(default)s)")
    g.add_argument("--mine-top-p", type=float, default=0.95, help="nucleus sampling (%(default)s)")
    g.add_argument("--mine-repetition-penalty", type=float, default=1.1, help="HF-style penalty (%(default)s)")
    g.add_argument("--mine-max-new-tokens", type=int, default=1024, help="answer length cap (%(default)s)")
    g.add_argument("--mine-batch", type=int, default=8, help="images per sampling call (memory knob; %(default)s)")
    g.add_argument("--max-options", type=int, default=5, help="options kept: the k most frequent answers (%(default)s)")
    g.add_argument("--random-options", type=int, default=2, help="random base classes that join the truth when at "
                   "most one distinct valid answer was mined (the released code: %(default)s)")
    g.add_argument("--online-mining", action="store_true", help="mine the options anew with the policy at every step")
    g = p.add_argument_group("stage 2: GRPO")
    g.add_argument("--prompts-per-step", type=int, default=6, help="questions per step, all ranks (paper 6)")
    g.add_argument("--epochs", type=float, default=1.5, help="passes over the questions (paper 1-1.5)")
    g.add_argument("--adv-eps", type=float, default=1e-4, help="eps in (r - mean) / (std + eps) (%(default)s)")
    g.add_argument("--no-std", action="store_true", help="advantage r - mean without the std (Dr. GRPO)")
    g.add_argument("--clip-eps", type=float, default=0.2, help="PPO clip, lower side (acts when updates > 1)")
    g.add_argument("--clip-eps-high", type=float, default=None, help="PPO clip, upper side (default = --clip-eps)")
    g.add_argument("--updates-per-batch", type=int, default=1, help="optimizer steps per rollout batch (1: on-policy)")
    g.add_argument("--loss-agg", default="seq", choices=["seq", "token"], help="seq: token mean per completion, then "
                   "over completions (GRPO, the paper); token: one mean over the step's tokens (DAPO)")
    g.add_argument("--freeze-vision", type=int, default=0, choices=[0, 1], help="1: train the LM only (an ablation)")
    g = p.add_argument_group("evaluation: two-step inference")
    g.add_argument("--eval-split", default="test", help="held-out split evaluated (default %(default)s)")
    g.add_argument("--eval-classes", default="base,novel", help="comma list of class groups evaluated: base, novel, "
                   "all (default %(default)s: the paper's base-to-novel table, with their harmonic mean)")
    g.add_argument("--eval-samples", type=int, default=20, help="step-1 samples of two-step inference (%(default)s)")
    g.add_argument("--eval-scoring", default="paper", choices=["paper", "strict"], help="step 2 (eval.py --scoring): "
                   "paper = the released letter reader; strict = a letter or an option's exact text (toy)")
    args = lifecycle.parse_flags(p, argv, TOY, REWARDS)
    args.clip_eps_high = args.clip_eps if args.clip_eps_high is None else args.clip_eps_high
    if args.group_size < 2:
        raise SystemExit(f"--group-size {args.group_size}: GRPO needs at least 2 completions per prompt")
    wrong = [g for g in args.eval_classes.split(",") if g.strip() not in ("all", "base", "novel")]
    if wrong:
        raise SystemExit(f"--eval-classes {args.eval_classes}: {wrong[0]!r} is not a class group; expected a comma "
                         f"list of all, base and novel")
    return args

def prompts_per_step_for(args, world_size: int) -> int:
    """Questions per optimizer step over all ranks. The paper's 6 does not divide over 4, 8 or 16 ranks: left unset it
    becomes the nearest multiple of the ranks (ties upward), said at start; a value the user set must divide."""
    n = args.prompts_per_step
    if n % world_size and "prompts_per_step" not in args.explicit:
        fitted = max(world_size, (n + world_size // 2) // world_size * world_size)
        common.print0(f"--prompts-per-step: the preset's {n} does not divide over {world_size} ranks; using {fitted} "
                      f"({fitted // world_size} per rank)")
        return fitted
    lifecycle.require_divisible("--prompts-per-step", n, world_size, "the number of ranks")
    return n

def memory_estimate(processor, kind: str, base_classes: list[str], args, world_size: int) -> dict:
    """memory.report_memory_budget's settings: the larger sampling phase (mining or rollouts), the update's rows."""
    phases = [(args.mine_batch * args.mine_samples, mine_prompt(kind, args.data, base_classes),
               args.mine_max_new_tokens),
              (args.prompts_per_step // world_size * args.group_size,
               mcq_prompt(kind, base_classes[:args.max_options]), args.max_new_tokens)]
    phases = [(rows, memory.prompt_tokens_estimate(processor, text), new) for rows, text, new in phases]
    kv_rows, prompt_tokens, new_tokens = max(phases, key=lambda phase: phase[0] * (phase[1] + phase[2]))
    knobs = {"rollout KV cache": "--mine-batch / --prompts-per-step (prompts per sampling call), --mine-samples / "
                                 "--group-size, --mine-max-new-tokens / --max-new-tokens, --max-pixels",
             **dict.fromkeys(["gradients", "optimizer states"], "--parallel fsdp over more GPUs; --freeze-vision")}
    return dict(rollout_rows=kv_rows, prompt_tokens=prompt_tokens, new_tokens=new_tokens, train_rows=args.micro_batch,
                train_prompt_tokens=phases[1][1],  # the updates score multiple-choice prompts
                rows_per_prompt=min(args.group_size, args.micro_batch) if args.shared_prefix else 1, knobs=knobs)

# ----- 9. main: set-up, data, models, resume, stage 1, the GRPO loop, export -----
def main(argv=None):
    args = parse_args(argv)
    args.prompts_per_step = prompts_per_step_for(args, lifecycle.launched_world_size())  # before the process group
    run = lifecycle.Run(args, "dive_k")

    # data: training images of the base classes (or k shots of all classes), held-out class groups to evaluate
    train = data.load_dataset(args.data, args.train_split, root=args.data_root, classes=args.classes,
                              shots=args.shots, limit=args.train_limit, seed=args.seed)
    base_classes = train.split_class_names  # the names an option may take (base classes, or all in few-shot)
    eval_sets = {group: data.load_dataset(args.data, args.eval_split, root=args.data_root, classes=group,
                                          limit=args.eval_limit, seed=args.seed)
                 for group in (g.strip() for g in args.eval_classes.split(",")) if group and args.eval_every > 0}
    common.print0(f"data: {len(train)} {args.train_split} images of {len(base_classes)} {args.classes} classes; "
                  f"eval {', '.join(f'{g} {len(s)}' for g, s in eval_sets.items()) or 'off'}")

    # models: the policy and, when beta > 0, its frozen initial copy (after the memory estimate on their shapes)
    model, processor, reference = run.load_policy(
        args.model, reference=args.beta > 0,
        trainable=lambda model: model.model.visual.requires_grad_(not args.freeze_vision),  # the paper trains it
        estimate=lambda processor: memory_estimate(processor, train.kind, base_classes, args, run.ranks.world_size))
    optimizer = lifecycle.adamw(model, args.lr, args.weight_decay)
    evaluate = (lambda step: evaluate_two_step(model, processor, eval_sets, args, run.out, step)) if eval_sets else None
    start = run.resume(model, optimizer, evaluate)["step"]  # the same command continues from <out>/latest

    # stage 1: the questions, mined once before RL (cached), or the images to mine at every step (--online-mining);
    # mining samples outside the update, so FSDP2 gathers the weights for it after a warm-up forward (built once)
    fsdp_inputs = common.fsdp_warmup_inputs(model, processor, common.encode_prompt(
        processor, train.examples[0].image, mine_prompt(train.kind, args.data, base_classes)))
    pool = train.examples if args.online_mining else \
        mine_training_set(model, processor, train, base_classes, args, run, fsdp_inputs, log_summary=start == 0)
    if not pool:
        raise SystemExit("stage 1 kept no question (every image was easy); nothing to train on")
    total_steps = args.max_steps or math.ceil(args.epochs * len(pool) / args.prompts_per_step)
    common.print0(f"stage 2: {len(pool)} {'images' if args.online_mining else 'questions'}, {total_steps} steps of "
                  f"{args.prompts_per_step} prompts x G={args.group_size} "
                  f"({args.prompts_per_step // run.ranks.world_size} prompts per rank)")

    for step in run.steps(start, total_steps):
        lr = lifecycle.lr_at(step, base_lr=args.lr, total_steps=total_steps, schedule=args.lr_schedule,
                             warmup_steps=args.warmup_steps)
        lifecycle.set_lr(optimizer, lr)
        questions = questions_for_step(step, pool, model, processor, base_classes, train.kind, args, run, fsdp_inputs)
        record = train_step(step, questions, model, reference, optimizer, processor, train.kind, args, run)
        run.end_step(step + 1, {**record, "lr": lr}, model, optimizer, evaluate=evaluate,
                     state={"data_position": (step + 1) * args.prompts_per_step, "total_steps": total_steps},
                     shown=("reward", "accuracy", "format_rate"))
    run.finish(model, processor)
    return run.out

if __name__ == "__main__":
    lifecycle.run_script(main)
