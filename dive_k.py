"""
dive_k.py: DiVE-k (arXiv 2511.18305) in one file: GRPO on multiple-choice questions mined from the model's own
confusions.

Stage 1, before RL, samples the base model K times per training image with the base-class list in the prompt and
keeps its most frequent valid answers, plus the truth, as the options of a multiple-choice question. Stage 2 runs
GRPO on those questions: the policy reasons in <think>, answers a letter in <answer>, and is rewarded for the format
and for the right letter. At test time the model answers in two steps (eval.py --protocol two_step): K open answers
with the class list, then a greedy pick among its own top 5.

Launch
  1 GPU     python dive_k.py --data cub --data-root /data/CUB_200_2011
  8 GPUs    torchrun --nproc-per-node 8 dive_k.py --data cub --data-root /data/CUB_200_2011 --parallel fsdp
  2 nodes   torchrun --nnodes 2 --node-rank 0 --nproc-per-node 8 --rdzv_backend c10d --rdzv_endpoint HOST:PORT \
                dive_k.py --data cub --data-root /data/CUB_200_2011 --parallel fsdp
  CPU       python dive_k.py --data toy          (tiny stand-in model, toy shapes: 116 s on an idle 2-core CPU)
The same command resumes from the last checkpoint in --out (mining from its cache; --out on a filesystem every node
sees). A 7B model needs --parallel fsdp. The paper's 6 questions per step become 8 on 4 or 8 ranks, 16 on 16.

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
import memory


# =====================================================================================================================
# 1. Prompts: every instruction of the released prompts, in this project's words
# =====================================================================================================================

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
    """Stage 1: e.g. mine_prompt("bird", "cub", ["Bobolink", "Gull"]) asks for the most likely 'species name' of the
    bird, one of ['Bobolink', 'Gull']."""
    return MINE_PROMPT.format(kind=kind, answer_format=answer_format(dataset_name), categories=str(list(class_names)))


def mcq_prompt(kind: str, options: list[str]) -> str:
    """Stage 2: the options as 'A. name' lines, the answer a letter."""
    return MCQ_PROMPT.format(kind=kind, options="\n".join(f"{judges.LETTERS[i]}. {o}" for i, o in enumerate(options)))


# Two-step inference as an evaluation protocol (eval.py --protocol two_step, and evaluate_two_step below): step 1
# samples answers with the split's class list at the mining sampling (T=1.0, top_p 0.95, repetition penalty 1.1),
# step 2 asks the lettered question over the 5 most frequent, greedily.
TWO_STEP_EVAL = evaluation.Protocol(
    "two_step", evaluation.two_step_batch, evaluation.two_step_metrics, template=[MINE_PROMPT, MCQ_PROMPT],
    prompt=lambda dataset, options: mine_prompt(dataset.kind, dataset.name, dataset.split_class_names),
    step2=mcq_prompt, answer_format=answer_format, sampling=dict(temperature=1.0, top_p=0.95, repetition_penalty=1.1))


# =====================================================================================================================
# 2. Stage 1: top-k option mining (the method's own data)
# =====================================================================================================================

def build_question(answers: list[str | None], truth: str, base_classes: list[str], rng: random.Random, *,
                   max_options: int = 5, random_options: int = 2, drop_easy: bool = True,
                   prefixes: tuple[str, ...] = judges.DIVEK_PREFIXES[:2], max_chars: int = 120) -> dict:
    """The multiple-choice question of one image from its K sampled answers (the paper's rules, and the released
    code's where the paper is silent).

    answers: the parsed <answer> texts (None when a sample had none); truth: the image's class name;
    base_classes: the names an option may take. Returns a record with `status` "kept" or "easy".

      1. strip the answer-format prefix ("species name: ..."), drop answers over `max_chars` characters, normalise
         (hyphen == space, "'s" dropped, ...) and keep those naming a base class; count them
      2. only the truth was answered -> "easy" (dropped from training; kept with random options if drop_easy=False)
      3. options = the min(max_options, distinct) most frequent names (ties: the name answered first)
      4. at most one distinct valid answer -> the truth and `random_options` random base classes join it (so 4
         options after one wrong answer, 3 after none); otherwise a missing truth replaces the least frequent option
      5. shuffle; the answer is the truth's letter

    Example: answers ["Species name: Red-striped circle", "red striped circle", "blue square", None], truth "blue
    square", base classes ["red striped circle", "blue square", "green square"] -> counts {"red striped circle": 2,
    "blue square": 1}, options those two in a shuffled order, answer the letter of "blue square".
    """
    canonical = {judges.normalize(c): c for c in base_classes}
    counts = Counter()
    for a in answers:
        key = judges.normalize(judges.strip_prefixes(a, prefixes)) if a is not None else ""
        key = key.replace("barberton", "barbeton")  # the released mining's one spelling fix: Flowers' "barbeton daisy"
        name = canonical.get(key) if len(key) <= max_chars else None
        if name is not None:
            counts[name] += 1
    ranked = [name for name, _ in counts.most_common()]  # most frequent first; Counter keeps first-seen order on ties
    record = dict(truth=truth, counts=dict(counts), n_samples=len(answers), n_valid=sum(counts.values()),
                  truth_inserted=False, padded=False)
    easy = ranked == [truth]
    if easy and drop_easy:
        return {**record, "status": "easy", "options": None, "answer": None}
    options = ranked[:max_options]
    if len(ranked) <= 1:  # nothing to choose between: the mined answer (if any), the truth, random base classes
        record["truth_inserted"] = truth not in options
        if truth not in options:
            options.append(truth)
        pool = [c for c in base_classes if c not in options]
        options += rng.sample(pool, min(len(pool), random_options))
        record["padded"] = True
    elif truth not in options:
        options[-1] = truth  # replaces the least frequent option
        record["truth_inserted"] = True
    rng.shuffle(options)
    return {**record, "status": "easy" if easy else "kept", "options": options,
            "answer": judges.LETTERS[options.index(truth)]}


def mine(model, processor, examples: list[data.Example], base_classes: list[str], kind: str, args, d: common.Dist,
         *, seed: int, drop_easy: bool = True, progress=None) -> list[dict]:
    """Sample K answers per image with the base-class list in the prompt and build each image's question.
    One record per example (same order), with the counts behind it. Runs on the caller's shard of images; under
    FSDP2 the caller holds the gathered parameters (common.gathered_params), so that ranks with different numbers
    of images never wait on each other."""
    records = []
    prompt_text = mine_prompt(kind, args.data, base_classes)
    prefixes = (f"{answer_format(args.data)}: ",)  # the released mining strips its own format's prefix
    for start in range(0, len(examples), args.mine_batch):
        batch = examples[start:start + args.mine_batch]
        prompts = [common.encode_prompt(processor, ex.image, prompt_text) for ex in batch]
        # a seed per batch of images: a resumed mining run (same number of ranks) samples the same answers
        gen = torch.Generator().manual_seed(seed + start)
        with args.precision.context():
            ro = common.sample(model, processor, prompts, group_size=args.mine_samples,
                               max_new_tokens=args.mine_max_new_tokens, temperature=args.mine_temperature,
                               top_p=args.mine_top_p, top_k=0, repetition_penalty=args.mine_repetition_penalty,
                               generator=gen, compile_decode=bool(args.compile_decode))
        K = args.mine_samples
        for i, ex in enumerate(batch):
            answers = [judges.parse_answer(t) for t in ro.texts[i * K:(i + 1) * K]]
            rng = random.Random(f"{args.seed}/{ex.id}")  # option order depends on the image only
            q = build_question(answers, ex.class_name, base_classes, rng, max_options=args.max_options,
                               random_options=args.random_options, drop_easy=drop_easy, prefixes=prefixes)
            records.append({"id": ex.id, "image": ex.image, **q})
        if progress is not None:
            progress.update(len(batch))
    return records


def mine_offline(model, processor, train: data.Dataset, base_classes: list[str], args, d: common.Dist,
                 out: str, log: common.MetricsLog | None) -> list[dict]:
    """Stage 1 for the whole training set, cached to <out>/mcq.jsonl. Each rank mines its shard of the images not
    done yet and appends them to <out>/mcq.part<rank>.jsonl as it goes (so an interrupted run resumes); rank 0 then
    merges the parts in dataset order. Returns the kept questions."""
    final, parts = os.path.join(out, "mcq.jsonl"), common.RankParts(out, "mcq")
    if not os.path.exists(final):
        done = {rec["id"]: rec for rec in parts.records()}  # images mined by an earlier, interrupted run
        position = {ex.id: i for i, ex in enumerate(train.examples)}
        todo = [ex for ex in train.examples if ex.id not in done]
        mine_shard = todo[d.rank::d.world_size]
        common.print0(f"stage 1: mining {len(todo)} images ({len(done)} cached) with K={args.mine_samples} samples "
                      f"over {d.world_size} rank(s)")
        model.eval()
        bar = common.progress_bar(d.is_main, total=len(mine_shard), desc="mining")
        warmup = common.encode_prompt(processor, train.examples[0].image,
                                      mine_prompt(train.kind, args.data, base_classes))
        common.barrier()  # every rank has read the parts (and agrees on `todo`) before any rank appends to them
        with parts.append(d.rank) as f, \
                common.gathered_params(model, common.fsdp_warmup_inputs(model, processor, warmup)):
            for start in range(0, len(mine_shard), args.mine_batch):
                chunk = mine_shard[start:start + args.mine_batch]
                for rec in mine(model, processor, chunk, base_classes, train.kind, args, d,
                                seed=args.seed * 1_000_003 + position[chunk[0].id], progress=bar):
                    f.write(json.dumps(rec) + "\n")
                f.flush()
        if bar is not None:
            bar.close()
        common.barrier()
        if d.is_main:  # the parts, merged in dataset order
            done.update({rec["id"]: rec for rec in parts.records()})
            missing = [ex.id for ex in train.examples if ex.id not in done]
            if missing:
                raise SystemExit(f"{out}/mcq.part*.jsonl: {len(missing)} training images were not mined "
                                 f"(first: {missing[0]}); rerun the same command to finish mining")
            with open(final + ".tmp", "w") as f:
                f.writelines(json.dumps(done[ex.id]) + "\n" for ex in train.examples)
            os.replace(final + ".tmp", final)
            parts.remove()
        common.barrier()
    records = common.read_jsonl(final)
    summary = mining_summary(records)
    common.print0("stage 1 summary: " + ", ".join(f"{k.split('/')[-1]} {v:g}" for k, v in summary.items()))
    if log is not None:  # None when resuming: the summary is in metrics.jsonl already
        log.log({"step": 0, "event": "mining", **summary})
    return [r for r in records if r["status"] == "kept"]


def mining_summary(records: list[dict]) -> dict:
    kept = [r for r in records if r["status"] == "kept"]
    n = max(1, len(records))
    return {"mining/images": len(records), "mining/kept": len(kept),
            "mining/dropped_easy": sum(r["status"] == "easy" for r in records),
            "mining/truth_inserted": sum(r["truth_inserted"] for r in kept),
            "mining/padded": sum(r["padded"] for r in kept),
            "mining/valid_answer_rate": (sum(r["n_valid"] for r in records)
                                         / max(1, sum(r["n_samples"] for r in records))),
            "mining/truth_in_top_rate": sum(1 for r in records if r["counts"].get(r["truth"])) / n,
            "mining/mean_options": sum(len(r["options"]) for r in kept) / max(1, len(kept))}


def questions_for_step(step: int, items: list[dict], model, processor, base_classes: list[str], kind: str, args,
                       d: common.Dist, timer: common.PhaseTimer, warmup) -> tuple[list[dict], dict]:
    """This rank's questions of a step: positions step*P + rank, + world, ... of an endless stream of seeded epochs
    over the mined questions (the order depends only on the step, so a resume restores it exactly). With
    --online-mining the options are rebuilt now from the current policy (easy images kept, padded)."""
    positions = range(step * args.prompts_per_step + d.rank, (step + 1) * args.prompts_per_step, d.world_size)
    batch = [items[common.stream_position(pos, len(items), args.seed)] for pos in positions]
    if not args.online_mining:
        return batch, {}
    model.eval()
    with timer("mining"), common.gathered_params(model, common.fsdp_warmup_inputs(model, processor, warmup)):
        mined = mine(model, processor, [it["example"] for it in batch], base_classes, kind, args, d,
                     seed=(args.seed + 1_000_000 * (step + 1)) * 1009 + d.rank, drop_easy=False)
    return mined, {"mining/easy_frac": sum(q["status"] == "easy" for q in mined) / len(mined),
                   "mining/truth_inserted_frac": sum(q["truth_inserted"] for q in mined) / len(mined)}


# =====================================================================================================================
# 3. Reward: a registry of plain functions fn(completion, question) -> float
# =====================================================================================================================

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
    text = judges.parse_answer(completion)
    if text is None:
        return None
    upper = text.strip().upper()
    found = set(LETTER_RE.findall(upper))
    standalone = set(re.findall(r"(?<![A-Z0-9])[A-Z](?![A-Z0-9])", upper))
    if len(found) != 1 or (len(standalone) > 1 and judges.is_hedge(text)):
        return None
    letter = found.pop()
    return letter if letter in judges.LETTERS[:n_options] else None


def format_reward(completion: str, question: dict) -> float:
    """1 if the completion is `<think>...</think> <answer>...</answer>` and nothing else."""
    return float(judges.format_ok(completion))


def mcq_reward(completion: str, question: dict) -> float:
    """1 if the chosen option (by letter, or by its exact text) is the question's answer."""
    return float(chosen_letter(completion, question["options"]) == question["answer"])


def random_reward(completion: str, question: dict) -> float:
    """The control: a fair coin that ignores the completion (global RNG: seeded per rank, saved in checkpoints)."""
    return float(random.random() < 0.5)


REWARDS = {"format": format_reward, "mcq": mcq_reward, "random": random_reward}


def reward_names(spec: str) -> list[str]:
    """--rewards "format,mcq" -> ["format", "mcq"]; an unknown name stops the run with the known ones."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in REWARDS]
    if unknown or not names:
        raise SystemExit(f"--rewards {spec!r}: unknown reward(s) {unknown}; known: {sorted(REWARDS)}")
    return names


def score(texts: list[str], questions: list[dict], names: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Rewards of B completions (row b answers questions[b]): the sum of the named reward functions [B], and each
    component [B] for logging."""
    parts = {n: torch.tensor([REWARDS[n](t, q) for t, q in zip(texts, questions)]) for n in names}  # [B] each
    return sum(parts.values()), parts


# =====================================================================================================================
# 4. Advantage
# =====================================================================================================================

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


# =====================================================================================================================
# 5. The loss, written by hand
# =====================================================================================================================

def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None, advantages: torch.Tensor,
              mask: torch.Tensor, *, beta: float, clip_low: float, clip_high: float, loss_agg: str,
              normalizer: float) -> tuple[torch.Tensor, dict[str, float]]:
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
    elif loss_agg == "token":
        loss = (per_token * mask).sum() / normalizer  # []
    else:
        raise ValueError(f"loss_agg must be seq or token, got {loss_agg!r}")
    with torch.no_grad():
        clipped_taken = (clipped < unclipped).to(mask.dtype)  # [B, T] tokens where the clip changed the objective
        stats = {"kl_sum": (kl * mask).sum(), "clipped_sum": (clipped_taken * mask).sum(),
                 "tokens": mask.sum()}  # 0-d tensors: summed over micro-batches, read once per step
    return loss, stats


def loss_normalizer(loss_agg: str, mask: torch.Tensor, world_size: int) -> float:
    """What this rank divides its summed loss by, so that the gradient DDP / FSDP average over ranks is the mean
    over the whole step: its number of completions (seq), or the step's token count over all ranks divided by the
    number of ranks (token; all-reduced before any backward). mask: [B, T], this rank's completions."""
    if loss_agg == "seq":
        return float(mask.shape[0])
    return common.global_token_count(mask) / world_size


# =====================================================================================================================
# 6. The train step: rollout -> reward -> advantage -> log-probs -> micro-batched update
# =====================================================================================================================

def train_step(step: int, questions: list[dict], model, ref_model, optimizer, processor, kind: str, args,
               d: common.Dist, guard: common.NonFiniteGuard, timer: common.PhaseTimer) -> tuple[dict, float, list]:
    """One GRPO step on this rank's questions. Returns (metrics of this rank, the gradient norm, a few completions
    with their rewards for the log)."""
    # rollout: G completions per question, the whole group on this rank
    model.eval()  # sampling needs the KV cache, which activation checkpointing turns off in train mode
    prompts = [common.encode_prompt(processor, q["image"], mcq_prompt(kind, q["options"])) for q in questions]
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 1009 + d.rank)
    with timer("sampling"), args.precision.context(), \
            common.gathered_params(model, common.fsdp_warmup_inputs(model, processor, prompts[0])):
        ro = common.sample(model, processor, prompts, group_size=args.group_size, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, top_p=args.top_p, top_k=0, repetition_penalty=1.0,
                           generator=gen, compile_decode=bool(args.compile_decode))
    row_questions = [q for q in questions for _ in range(args.group_size)]  # row b answers row_questions[b]

    # reward and advantage
    rewards, components = score(ro.texts, row_questions, reward_names(args.rewards))  # [B], {name: [B]}
    advantages, zero_std = group_advantages(rewards, args.group_size, args.adv_eps, scale=not args.no_std)  # [B]

    # log-probs of the sampling policy (needed only when it moves before the last update) and of the reference
    ids, mask = ro.completion_ids, ro.completion_mask  # [B, T] each
    scored = lambda m: common.completion_logprobs(  # noqa: E731  [B, T]
        m, processor, ro.row_prompts, ids, mask, temperature=args.temperature, micro_batch=args.micro_batch,
        shared_prefix=bool(args.shared_prefix))
    with timer("logprobs"), args.precision.context():
        old_all = scored(model) if args.updates_per_batch > 1 else None  # [B, T]
        ref_all = scored(ref_model) if ref_model is not None else None  # [B, T]

    # update: gradient accumulation over micro-batches, each question's prompt run once for its G completions
    pad_id = common.special_token_ids(processor)["<|endoftext|>"]
    normalizer = loss_normalizer(args.loss_agg, mask, d.world_size)  # see grpo_loss
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    sums = Counter()
    with timer("update"):
        for _ in range(args.updates_per_batch):
            optimizer.zero_grad(set_to_none=True)
            update_loss = 0.0
            starts = list(range(0, ids.shape[0], args.micro_batch))
            for k, start in enumerate(starts):
                rows = slice(start, start + args.micro_batch)
                width = max(1, int(mask[rows].sum(1).max()))  # trim the padding shared by these rows
                mb_ids, mb_mask = ids[rows, :width], mask[rows, :width]  # [b, t]
                common.grad_sync(model, k == len(starts) - 1)
                with args.precision.context():
                    logp = common.score_completions(model, ro.row_prompts[rows], mb_ids, mb_mask, pad_id,
                                                    args.temperature, bool(args.shared_prefix)).float()  # [b, t]
                old = old_all[rows, :width].to(logp) if old_all is not None else logp.detach()  # [b, t]
                ref = ref_all[rows, :width].to(logp) if ref_all is not None else None  # [b, t]
                loss, stats = grpo_loss(logp, old, ref, advantages[rows].to(logp.device), mb_mask.to(logp.device),
                                        beta=args.beta, clip_low=args.clip_eps, clip_high=args.clip_eps_high,
                                        loss_agg=args.loss_agg, normalizer=normalizer)
                loss.backward()
                sums.update({**stats, "loss": loss.detach()})  # tensors: no host read per micro-batch
                update_loss += loss.detach()
            grad_norm = common.clip_gradients(params, args.grad_clip)
            if guard.check(step + 1, loss=update_loss, grad_norm=grad_norm):
                optimizer.step()
            else:  # NaN / inf: this optimizer step is skipped (counted and logged by the guard)
                optimizer.zero_grad(set_to_none=True)
    common.grad_sync(model, True)
    sums = {k: float(v) for k, v in sums.items()}  # the step's one read of the loss statistics

    tokens = float(mask.sum())
    rate = lambda reward: float(torch.tensor([reward(t, q) for t, q in zip(ro.texts, row_questions)]).mean())  # noqa: E731
    metrics = {"reward": float(rewards.mean()), "accuracy": rate(mcq_reward), "format_rate": rate(format_reward),
               "zero_std_frac": float(zero_std.float().mean()), "completion_len": tokens / len(ro.texts),
               "truncation_rate": float(ro.truncated.float().mean()),
               "kl": sums["kl_sum"] / max(1.0, sums["tokens"]),
               "clip_frac": sums["clipped_sum"] / max(1.0, sums["tokens"]),
               "loss": sums["loss"] / args.updates_per_batch,
               "mean_options": sum(len(q["options"]) for q in questions) / len(questions),
               **{f"reward/{n}": float(v.mean()) for n, v in components.items()}, "tokens": tokens}
    samples = [{"id": q["id"], "options": q["options"], "answer": q["answer"], "completion": t,
                "reward": float(rewards[i]), **{n: float(v[i]) for n, v in components.items()}}
               for i, (t, q) in enumerate(zip(ro.texts, row_questions)) if i % args.group_size == 0]
    return metrics, grad_norm, samples[:args.log_completions]


# =====================================================================================================================
# 7. Evaluation: two-step inference (eval.py)
# =====================================================================================================================

def evaluate_two_step(model, processor, eval_sets: dict, args, d: common.Dist, out: str, step: int) -> dict:
    """Two-step inference on every held-out group: accuracy, step 1's ceiling truth_in_options and format_ok per
    group, and the harmonic mean of base and novel accuracy when both are there."""
    return evaluation.evaluate_groups(
        model, processor, eval_sets, [TWO_STEP_EVAL], out=out, step=step, precision=args.precision,
        keys=("accuracy", "truth_in_options", "format_ok"), seed=args.seed, max_new_tokens=args.eval_max_new_tokens,
        samples=args.eval_samples, micro_batch=args.eval_batch, scoring=args.eval_scoring,
        compile_decode=bool(args.compile_decode))


# =====================================================================================================================
# 8. Flags: the paper's values, and a toy preset for the CPU
# =====================================================================================================================

# The paper's settings (SPEC section 4; trl-0.16 defaults where the scripts set nothing) and the toy preset. Flags
# listed here default to None on the command line: whatever the user sets wins, the preset fills the rest. The toy
# preset scores two-step strictly: the stand-in answers an option's text, which the paper's letter reader misses.
PAPER = dict(model="Qwen/Qwen2.5-VL-7B-Instruct", group_size=4, prompts_per_step=6, lr=1e-6, lr_schedule="linear",
             beta=0.04, max_new_tokens=1024, mine_samples=20, mine_max_new_tokens=1024, epochs=1.5, max_steps=None,
             micro_batch=4, eval_samples=20, eval_max_new_tokens=1024, eval_every=100, eval_limit=None, save_every=100,
             eval_classes="base,novel", eval_scoring="paper")

TOY = dict(model="tiny", group_size=8, prompts_per_step=16, lr=2e-4, lr_schedule="constant", beta=0.2,
           max_new_tokens=48, mine_samples=8, mine_max_new_tokens=48, epochs=None, max_steps=90, micro_batch=64,
           eval_samples=8, eval_max_new_tokens=48, eval_every=30, eval_limit=None, save_every=30,
           eval_classes="base,novel", eval_scoring="strict")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="DiVE-k: top-k option mining + GRPO on the model's own "
                                            "multiple-choice questions (Qwen2.5-VL)")
    common.add_common_args(p)  # --model --data --data-root --out --max-steps --seed --group-size, system flags
    p.set_defaults(model=None, group_size=None, max_steps=None)  # filled by the paper defaults or the toy preset
    g = p.add_argument_group("data")
    g.add_argument("--train-split", default="train", help="split the questions are mined from (default %(default)s)")
    g.add_argument("--classes", default="base", choices=["base", "novel", "all"],
                   help="classes trained on: CoOp base half (the paper's base-to-novel setting) or all (few-shot)")
    g.add_argument("--shots", type=int, default=None, help="k training images per class (the 4-shot setting)")
    g.add_argument("--train-limit", type=int, default=None, help="use at most this many training images")
    g = p.add_argument_group("stage 1: top-k option mining")
    g.add_argument("--mine-samples", type=int, default=None, help="K answers sampled per image (paper 20; toy 8)")
    g.add_argument("--mine-temperature", type=float, default=1.0, help="sampling temperature (paper 1.0)")
    g.add_argument("--mine-top-p", type=float, default=0.95, help="nucleus sampling (paper 0.95)")
    g.add_argument("--mine-repetition-penalty", type=float, default=1.1, help="HF-style penalty (paper 1.1)")
    g.add_argument("--mine-max-new-tokens", type=int, default=None, help="answer length cap (paper 1024; toy 48)")
    g.add_argument("--mine-batch", type=int, default=8, help="images per sampling call (memory knob)")
    g.add_argument("--max-options", type=int, default=5, help="options kept: the k most frequent answers (paper 5)")
    g.add_argument("--random-options", type=int, default=2,
                   help="with at most one distinct valid answer, the truth and this many random base classes join "
                        "it (the code: 2, so 4 options after one wrong answer, 3 after none)")
    g.add_argument("--online-mining", action="store_true",
                   help="rebuild the options from the current policy at every step instead of once before RL")
    g = p.add_argument_group("stage 2: GRPO")
    g.add_argument("--prompts-per-step", type=int, default=None,
                   help="questions per optimizer step over all ranks (paper 6 = 3 GPUs x 1 x grad-acc 2; toy 16)")
    g.add_argument("--micro-batch", type=int, default=None,
                   help="completions per forward/backward (gradient accumulation; paper-sized 4; toy 64)")
    g.add_argument("--epochs", type=float, default=None, help="passes over the questions when --max-steps is unset "
                   "(paper 1-1.5)")
    g.add_argument("--rewards", default="format,mcq",
                   help="comma list of reward functions summed into the reward (registry REWARDS: format, mcq, "
                        "random). `--rewards random` is the control run: a coin flip that ignores the completion")
    g.add_argument("--temperature", type=float, default=1.0, help="rollout temperature (paper 1.0)")
    g.add_argument("--top-p", type=float, default=1.0, help="rollout nucleus sampling (paper: off)")
    g.add_argument("--max-new-tokens", type=int, default=None, help="rollout length cap (paper 1024; toy 48)")
    g.add_argument("--adv-eps", type=float, default=1e-4, help="eps in (r - mean) / (std + eps) (paper 1e-4)")
    g.add_argument("--no-std", action="store_true", help="advantage r - mean without the std (Dr. GRPO)")
    g.add_argument("--beta", type=float, default=None,
                   help="weight of the k3 KL to the frozen initial model; 0 builds no reference (paper 0.04)")
    g.add_argument("--clip-eps", type=float, default=0.2, help="PPO clip, lower side (acts when updates > 1)")
    g.add_argument("--clip-eps-high", type=float, default=None, help="PPO clip, upper side (default = --clip-eps)")
    g.add_argument("--updates-per-batch", type=int, default=1,
                   help="optimizer steps on each rollout batch (paper 1: on-policy, ratio == 1)")
    g.add_argument("--loss-agg", default="seq", choices=["seq", "token"],
                   help="seq: token mean per completion, then mean over completions (GRPO, the paper); "
                        "token: one mean over every completion token of the optimizer step (DAPO)")
    g.add_argument("--lr", type=float, default=None, help="AdamW learning rate (paper 1e-6; toy 2e-4)")
    g.add_argument("--lr-schedule", default=None, choices=["constant", "linear", "cosine"],
                   help="decay to 0 over the run (paper: linear, no warm-up; toy: constant)")
    g.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps (paper 0)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (paper 0)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max global grad norm (paper 1.0; 0 = off)")
    g.add_argument("--freeze-vision", type=int, default=0, choices=[0, 1],
                   help="1: train the language model only (paper ablation); 0: vision tower too (paper default)")
    g = p.add_argument_group("evaluation, logging, checkpoints")
    g.add_argument("--eval-every", type=int, default=None,
                   help="two-step evaluation every N steps, at the start and at the end (0 = never; 100; toy 30)")
    g.add_argument("--eval-split", default="test", help="held-out split evaluated (default %(default)s)")
    g.add_argument("--eval-classes", default=None,
                   help="comma list of class groups evaluated: base, novel, all (default base,novel: the paper's "
                        "base-to-novel table, with their harmonic mean)")
    g.add_argument("--eval-limit", type=int, default=None, help="evaluate at most this many images per group")
    g.add_argument("--eval-samples", type=int, default=None, help="step-1 samples of two-step inference (paper 20)")
    g.add_argument("--eval-max-new-tokens", type=int, default=None, help="eval answer length cap")
    g.add_argument("--eval-scoring", default=None, choices=["paper", "strict"],
                   help="step-2 scoring (eval.py --scoring): paper = DiVE-k's released letter reader; strict = a "
                        "letter or an option's exact text in <answer> (toy: strict)")
    g.add_argument("--eval-batch", type=int, default=8, help="images per eval sampling call (memory knob)")
    g.add_argument("--initial-eval", action=argparse.BooleanOptionalAction, default=True,
                   help="evaluate the starting model before step 1 (--no-initial-eval skips that baseline)")
    g.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps (0 = only at the end)")
    g.add_argument("--log-completions", type=int, default=2, help="sampled completions written to metrics.jsonl "
                   "per step, with their rewards")
    args = p.parse_args(argv)
    preset = TOY if args.data == "toy" else PAPER
    args.preset_filled = []  # the flags the preset chose (a preset value may be fitted to the number of ranks)
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
            args.preset_filled.append(key)
    if args.clip_eps_high is None:
        args.clip_eps_high = args.clip_eps
    if args.group_size < 2:
        raise SystemExit(f"--group-size {args.group_size}: GRPO needs at least 2 completions per prompt")
    reward_names(args.rewards)  # refused here if a name is unknown
    wrong = [g for g in args.eval_classes.split(",") if g.strip() not in ("all", "base", "novel")]
    if wrong:
        raise SystemExit(f"--eval-classes {args.eval_classes}: {wrong[0]!r} is not a class group; expected a comma "
                         f"list of all, base and novel")
    common.check_system_flags(args)
    return args


def prompts_per_step_for(args, world_size: int) -> int:
    """Questions per optimizer step over all ranks (each rank takes an equal share). The paper's 6 does not divide
    over 4, 8 or 16 ranks: an unset --prompts-per-step then becomes the nearest multiple of the ranks (ties upward),
    said at start; a value the user set must divide."""
    n = args.prompts_per_step
    if n % world_size and "prompts_per_step" in getattr(args, "preset_filled", []):
        fitted = max(world_size, (n + world_size // 2) // world_size * world_size)
        common.print0(f"--prompts-per-step: the preset's {n} does not divide over {world_size} ranks; using {fitted} "
                      f"({fitted // world_size} per rank)")
        return fitted
    common.require_divisible("--prompts-per-step", n, world_size, "the number of ranks")
    return n


# =====================================================================================================================
# 9. main: set-up, data, models, resume, stage 1, the GRPO loop, export
# =====================================================================================================================

def main(argv=None):
    args = parse_args(argv)
    args.prompts_per_step = prompts_per_step_for(args, common.launched_world_size())  # before the process group
    d, out = common.setup_run(args, default_out=common.default_run_dir("dive_k", args.data))
    log = common.MetricsLog(out, args.wandb, vars(args))

    # data: training images of the base classes (or k shots of all classes), held-out class groups to evaluate
    train = data.load_dataset(args.data, args.train_split, root=args.data_root, classes=args.classes,
                              shots=args.shots, limit=args.train_limit, seed=args.seed)
    base_classes = train.split_class_names  # the names an option may take (base classes, or all in few-shot)
    eval_sets = {group: data.load_dataset(args.data, args.eval_split, root=args.data_root, classes=group,
                                          limit=args.eval_limit, seed=args.seed)
                 for group in (g.strip() for g in args.eval_classes.split(",")) if group and args.eval_every > 0}
    common.print0(f"data: {len(train)} {args.train_split} images of {len(base_classes)} {args.classes} classes; "
                  f"eval {', '.join(f'{g} {len(s)}' for g, s in eval_sets.items()) or 'off'}")

    # models: the policy (fp32 master weights, bf16 compute on GPU) and, when beta > 0, its frozen initial copy;
    # first their shapes alone, for the memory estimate (it picks --parallel auto and stops a run that would not fit)
    args.precision = common.precision_for(args.dtype, d, args.parallel)
    shapes, processor = common.load_model(args.model, device=torch.device("meta"), dtype=args.precision.weights,
                                          min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    shapes.model.visual.requires_grad_(not args.freeze_vision)
    args.parallel = report_memory(shapes, processor, train.kind, base_classes, args, d)
    args.precision = common.precision_for(args.dtype, d, args.parallel)
    common.print0(f"precision: {args.precision}")
    model, processor = common.load_model(args.model, device=d.device, dtype=args.precision.weights, attn=args.attn,
                                         min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    model.model.visual.requires_grad_(not args.freeze_vision)
    model = common.wrap_model(model, d, args.parallel, bool(args.activation_checkpointing),
                              param_dtype=args.precision.fsdp_param_dtype)  # sharded before the reference loads
    ref_model = None
    if args.beta > 0:  # the policy's twin (same weights dtype, wrapping and compute, so the KL starts at 0 exactly)
        ref_model, _ = common.load_model(args.model, device=d.device, dtype=args.precision.weights, attn=args.attn)
        ref_model.requires_grad_(False).eval()
        if args.parallel == "fsdp":
            ref_model = common.wrap_model(ref_model, d, "fsdp", param_dtype=args.precision.fsdp_param_dtype)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, betas=(0.9, 0.999),
                                  eps=1e-8, weight_decay=args.weight_decay)
    guard = common.NonFiniteGuard(args.max_nonfinite, device=d.device)  # NaN / inf steps: skipped, counted, capped
    start_step = common.resume(out, model, optimizer, log)["step"]  # the same command continues from <out>/latest

    # stage 1: the questions, mined once before RL (cached), or the images to mine at every step (--online-mining)
    warmup = None  # online mining: a prompt for FSDP2's warm-up forward before the parameters are gathered
    if args.online_mining:
        warmup = common.encode_prompt(processor, train.examples[0].image,
                                      mine_prompt(train.kind, args.data, base_classes))
        items = [{"id": ex.id, "image": ex.image, "truth": ex.class_name, "example": ex} for ex in train.examples]
    else:
        items = mine_offline(model, processor, train, base_classes, args, d, out, log if start_step == 0 else None)
    if not items:
        raise SystemExit("stage 1 kept no question (every image was easy); nothing to train on")
    total_steps = args.max_steps or math.ceil(args.epochs * len(items) / args.prompts_per_step)
    common.print0(f"stage 2: {len(items)} questions, {total_steps} steps of {args.prompts_per_step} prompts x "
                  f"G={args.group_size} ({args.prompts_per_step // d.world_size} prompts per rank)")

    # stage 2: GRPO
    timer = common.PhaseTimer()
    if eval_sets and start_step == 0 and args.initial_eval:  # the starting model's accuracy: the run's baseline
        log.log({"step": 0, **evaluate_two_step(model, processor, eval_sets, args, d, out, 0)})
    bar = common.progress_bar(d.is_main, total=total_steps, initial=start_step, desc="grpo")
    for step in range(start_step, total_steps):
        t_step = time.perf_counter()
        lr = common.lr_at(step, base_lr=args.lr, total_steps=total_steps, schedule=args.lr_schedule,
                          warmup_steps=args.warmup_steps)
        common.set_lr(optimizer, lr)
        questions, online = questions_for_step(step, items, model, processor, base_classes, train.kind, args, d,
                                               timer, warmup)
        metrics, grad_norm, samples = train_step(step, questions, model, ref_model, optimizer, processor, train.kind,
                                                 args, d, guard, timer)
        step_time = time.perf_counter() - t_step
        tokens = float(common.all_reduce_sum(torch.tensor([metrics.pop("tokens")]))[0])  # over all ranks
        record = {"step": step + 1, **common.mean_over_ranks({**metrics, **online}), "lr": lr, "grad_norm": grad_norm,
                  **guard.stats(), **common.mean_over_ranks(timer.pop()), "tokens_per_s": tokens / step_time}
        if args.log_completions and d.is_main:
            record["completions"] = samples
        if bar is not None:
            bar.set_postfix(reward=f"{record['reward']:.2f}", acc=f"{record['accuracy']:.2f}",
                            fmt=f"{record['format_rate']:.2f}")
            bar.update(1)
        if (bar is None or bar.disable) and (step == start_step or (step + 1) % max(1, total_steps // 10) == 0):
            common.print0(f"step {step + 1}/{total_steps}  reward {record['reward']:.3f}  accuracy "
                          f"{record['accuracy']:.3f}  format {record['format_rate']:.3f}  {step_time:.1f}s")
        if eval_sets and ((step + 1) % args.eval_every == 0 or step + 1 == total_steps):
            record.update(evaluate_two_step(model, processor, eval_sets, args, d, out, step + 1))
        log.log(record)
        if (args.save_every and (step + 1) % args.save_every == 0) or step + 1 == total_steps or guard.exhausted:
            common.save_checkpoint(out, step + 1, model, optimizer,
                                   {"data_position": (step + 1) * args.prompts_per_step, "total_steps": total_steps})
        if guard.exhausted:  # --max-nonfinite skipped steps in a row: stop with a message (checkpoint saved above)
            guard.stop(out)
    if bar is not None:
        bar.close()

    common.export_hf(model, processor, os.path.join(out, "final"), dtype=args.export_dtype)
    common.print_eval_summary([os.path.join(out, "metrics.jsonl")])
    common.print0(f"done: {total_steps} steps; model exported to {os.path.join(out, 'final')}")
    common.cleanup_distributed()
    return out


def report_memory(model, processor, kind: str, base_classes: list[str], args, d: common.Dist) -> str:
    """The memory estimate per GPU at start (memory.report_memory_budget), for the larger of the two sampling
    phases (mining, rollouts), with this script's knobs. Returns the parallel mode (--parallel auto resolved)."""
    phases = [(args.mine_batch * args.mine_samples, mine_prompt(kind, args.data, base_classes),
               args.mine_max_new_tokens),
              (args.prompts_per_step // d.world_size * args.group_size,
               mcq_prompt(kind, base_classes[:args.max_options]), args.max_new_tokens)]
    phases = [(rows, memory.prompt_tokens_estimate(processor, text), new) for rows, text, new in phases]
    kv_rows, prompt_tokens, new_tokens = max(phases, key=lambda phase: phase[0] * (phase[1] + phase[2]))
    return memory.report_memory_budget(
        model, d, parallel=args.parallel, reference=args.beta > 0, rollout_rows=kv_rows,
        prompt_tokens=prompt_tokens, new_tokens=new_tokens, train_rows=args.micro_batch,
        train_prompt_tokens=phases[1][1],  # the updates score multiple-choice prompts
        rows_per_prompt=min(args.group_size, args.micro_batch) if args.shared_prefix else 1,
        activation_checkpointing=bool(args.activation_checkpointing), compute_dtype=args.precision.compute,
        check=bool(args.memory_check), image_tokens=memory.image_tokens(processor),
        knobs={"rollout KV cache": "--mine-batch / --prompts-per-step (prompts per sampling call), --mine-samples / "
                                   "--group-size, --mine-max-new-tokens / --max-new-tokens, --max-pixels",
               "gradients": "--parallel fsdp over more GPUs; --freeze-vision",
               "optimizer states": "--parallel fsdp over more GPUs; --freeze-vision"})


# =====================================================================================================================
# 10. For the CPU stand-in
# =====================================================================================================================

def chosen_letter(completion: str, options: list[str]) -> str | None:
    """The chosen option's letter: a letter (answer_letter), or an answer that is exactly one option's text
    (normalised). The tiny stand-in answers with the option's text; real checkpoints answer with letters."""
    letter = answer_letter(completion, len(options))
    if letter is None:
        text = judges.normalize(judges.parse_answer(completion) or "")
        matches = [i for i, option in enumerate(options) if text and text == judges.normalize(option)]
        letter = judges.LETTERS[matches[0]] if len(matches) == 1 else None
    return letter


if __name__ == "__main__":
    common.run_script(main)
