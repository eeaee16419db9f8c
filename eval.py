"""
eval.py: the one evaluation harness of the project, for every protocol of the three papers.

  open      Fine-R1's open-world setting: its question, "This is a fine-grained question.", and the request for
            <think> and <answer> worded as in its RL prompt (the released evaluation words it more briefly); one
            greedy free answer per image, judged; accuracy = specific or more specific. Exact match and substring
            match (the normalised truth inside the normalised answer, the ViRFT / Fine-R1 reward rule) are reported
            beside it.
  two_step  DiVE-k inference: step 1 draws `--samples` (20) answers with the split's class list in the prompt
            (T=1.0, top_p 0.95, repetition penalty 1.1, as in DiVE-k's mining), keeps the 5 most frequent parsed
            answers (answer-format prefixes such as 'species name: ' removed, answers of 100+ characters skipped, not
            filtered to valid names, no ground truth inserted), shuffles them; step 2 asks the same model the
            lettered multiple-choice question greedily; the chosen option is judged.
  mcq       closed world: 4 options = the truth + 3 other classes drawn at random, shuffled with a seed per image.
            Fine-R1's closed-world setting. `--mcq-distractors all` draws the 3 from every class of the dataset, seen
            and unseen alike, as the paper's released evaluation files do; `split` (the default here) only from the
            evaluated classes (base or novel).
  speciarl  SpeciaRL: one greedy answer per image, judged into six labels; the share of each label, correctness
            (correct at any level), specificity (specific or more specific among the correct), their harmonic mean.
            `--best-of N` samples N answers (T=0.6, top_p 0.95) and keeps the best label: the paper's upper bound.

Usage:
  python eval.py --model tiny --data toy --protocol open --limit 48
  python eval.py --model Qwen/Qwen2.5-VL-7B-Instruct --data cub --data-root /data/CUB_200_2011 \\
      --protocol two_step --classes base+novel --out runs/eval_cub
  torchrun --nproc-per-node 8 eval.py --model runs/dive_k_cub/export --data cub --data-root R --protocol two_step \\
      --classes base+novel --out runs/eval_cub      (images sharded over ranks, results gathered)
  python eval.py --model M --data food --data-root R --protocol speciarl \\
      --judge openai:meta-llama/Meta-Llama-3-70B-Instruct --judge-url http://HOST:8000/v1    (a vLLM server)

`--classes base+novel` evaluates the CoOp base and novel halves and reports HM = 2BN/(B+N). Written to --out:
metrics.json (every number, the counts behind it and the exact settings) and predictions.jsonl (image, truth, raw
output, parsed answer, judge label, and the protocol's extras). Failed parses count as wrong and are counted.

From a training script: `evaluate(model, processor, dataset, protocol, judge=..., out_dir=...)` on every rank; it
works on a plain, DDP- or FSDP2-wrapped model and returns the same metrics dict on every rank.

Scoring (`--scoring`, two_step, mcq and open). `paper` (the default) scores as the papers' released evaluations do, so a
number here sits next to the paper's column:
  * two_step, step 2: the first <answer> text, or the whole response when there is no tag, upper-cased; DiVE-k's
    letter reader (a capital followed by punctuation or the end; several candidates settled by nearby words such as
    'answer', then by position): 'b', 'The answer is B.', 'Option B' all choose B. Images whose step 1 gave no
    answer at all are left out of the count (`no_candidates`), as the released script drops them.
  * mcq: Fine-R1's prompt shows the options as a list without letters; right when the ground truth (lowercased)
    is inside the text from the first <answer> to the last </answer>. The released files always put the truth
    first; here the options are shuffled with a seed per image.
  * open: accuracy is Fine-R1's text-include rule (open_world_correct): the truth inside the text from the first
    <answer> to the last </answer>, or inside the whole response without one; for cars the truth without its body
    type and year. The judge's labels (first <answer>) are reported beside it (specificity_of_all, shares).
`strict`: lettered options, and only the <answer> tag counts: a letter ('B', '(B)', 'B.', 'B. name') or an option's
exact text chooses that option; images without step-1 answers count as wrong; open accuracy is the judge's share
of specific or more specific answers (text_include still reported).

Deviations from the papers, stated:
  * the judged answer is the text of the first <answer>...</answer> (judges.parse_answer), as in all three released
    training codes;
  * the judge is `rules` by default (offline, from the dataset's names and hierarchy); `--judge hf:<model>` runs an
    LLM judge here and `--judge openai:<model>` one behind a server, both with our six-label prompt in the spirit
    of SpeciaRL's (its released prompt is longer and gives examples);
    DiVE-k's released scripts grade two-step outputs with an LLM (Gemini through OpenRouter; README says which);
  * Fine-R1's open-world "relative similarity" score (SigLIP) is not reproduced; the open protocol is judged instead;
  * every sampled answer (two_step's step 1, best-of) draws from its own random stream, seeded by --seed, the image
    and the sample's index: results do not depend on the number of ranks or on --micro-batch.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
from collections import Counter

import torch

import common
import lifecycle
import data
import dive_k
import fine_r1
import judges
import speciarl

# ----- 1. prompts (each method file holds its own; the tiny stand-in was pretrained on them) and scoring -----

OPEN_PROMPT = speciarl.PROMPT  # SpeciaRL: classify, reasoning in <think>, one label or 'None' in <answer>
SPECIFIC_PROMPT = speciarl.SPECIFIC_PROMPT  # its "be specific" baseline (--be-specific)
# the open protocol asks Fine-R1's open-world question: fine_r1.open_prompt(kind)

PROTOCOLS = ("open", "two_step", "mcq", "speciarl")
MCQ_DISTRACTORS = ("split", "all")
SCORINGS = ("paper", "strict")
# Evaluation resolution, per protocol: the pixel budget of the paper's released evaluation. DiVE-k's
# eval/two_step_inference.py (with the base model's processor) and Fine-R1's eval/evaluation.py (with the evaluated
# model's) resize images through qwen_vl_utils.process_vision_info, whose defaults are 4*28*28 .. 16384*28*28;
# SpeciaRL's evaluator resizes nothing for Qwen and hands the images to vLLM, which applies the model's processor
# (Qwen's same defaults for a hub checkpoint). eval.py applies it to every model
# (--min-pixels / --max-pixels override), so a hub checkpoint and a trained export, whose processor keeps the
# training budget, are scored on the same image tokens.
EVAL_PIXELS = {"open": (3136, 12845056), "mcq": (3136, 12845056), "two_step": (3136, 12845056),
               "speciarl": (3136, 12845056)}
TWO_STEP_OPTIONS = 5  # DiVE-k: the 5 most frequent step-1 answers
STEP1_MAX_CHARS = 100  # DiVE-k's two-step code skips step-1 answers of 100 characters or more
MCQ_OPTIONS = 4  # Fine-R1: truth + 3 distractors
STEP1_SAMPLING = dict(temperature=1.0, top_p=0.95, repetition_penalty=1.1)  # DiVE-k's sampling
BEST_OF_SAMPLING = dict(temperature=0.6, top_p=0.95)  # SpeciaRL's best-of-N
# best-of-N keeps the best label by SpeciaRL's evaluation ranks (more specific above specific), then parse failures,
# judge errors last (its released best-of-N ranks API errors below parse failures)
BEST_OF_ORDER = [judges.JUDGE_ERROR, "parse_failure", *judges.JUDGE_LABELS]
# DiVE-k's released letter extraction scores each candidate letter by these words nearby (its list, as released)
CHOICE_WORDS = ("answer", "correct", "choose", "select", "right", "think", "believe", "should",
                "\u7b54\u6848", "\u9009\u62e9", "\u6b63\u786e", "\u662f", "\u5bf9", "\u8ba4\u4e3a", "\u5e94\u8be5",
                "\u89c9\u5f97")


def released_letter(text: str) -> str | None:
    """The letter DiVE-k's released evaluation reads from a step-2 answer: upper-cased, a capital not preceded by a
    letter and followed by . , ? ! : ; or the end. One candidate is the choice; among several, each occurrence scores
    +1 per keyword within 20 characters of the letter's first position, +2 when that position lies in the last 30%,
    +1 when punctuation follows it; the first best wins.
    >>> [released_letter(t) for t in ["b", "The answer is B.", "Option B", "B) Bobolink", "A or B.", "blue"]]
    ['B', 'B', 'B', None, 'B', None]
    """
    text = re.sub(r"\s+", " ", text.upper())
    found = re.findall(r"(?<![A-Z])([A-Z])(?=[.,?!:;]|$)", text)
    if len(found) <= 1:
        return found[0] if found else None
    score = dict.fromkeys(found, 0)
    for letter in found:  # every occurrence counts, as released
        pos = text.find(letter)
        context = text[max(0, pos - 20):pos + 20]
        score[letter] += sum(word.upper() in context for word in CHOICE_WORDS)
        score[letter] += 2 * (pos > 0.7 * len(text))  # near the end: usually the final answer
        score[letter] += pos < len(text) - 1 and text[pos + 1] in "\u3002.!\uff01,\uff0c"  # punctuation follows
    return max(score, key=score.get)


def step2_choice(raw: str, options: list[str], scoring: str) -> int | None:
    """Index of the option a step-2 answer chose. paper (DiVE-k's released evaluation): the first <answer> text, or
    the whole response when there is no tag, read by released_letter. strict: the <answer> tag only (parse_choice)."""
    if scoring == "strict":
        return parse_choice(judges.parse_answer(raw), options)
    found = judges.ANSWER_RE.search(raw)
    letter = released_letter(found.group(1).strip() if found else raw.strip())
    index = judges.LETTERS.index(letter) if letter else None
    return index if index is not None and index < len(options) else None


FIRST_TO_LAST_ANSWER = re.compile(r"<answer>(.*)</answer>", re.DOTALL)  # Fine-R1's evaluation reads this span


def closed_world_correct(raw: str, truth: str) -> bool:
    """Fine-R1's released closed-world scoring: the text from the first <answer> to the last </answer>, and right
    when the ground truth (lowercased, '_' -> ' ') is inside it (lowercased). No tag: wrong."""
    found = FIRST_TO_LAST_ANSWER.search(raw)
    return found is not None and truth.lower().replace("_", " ") in found.group(1).strip().lower().replace("_", " ")


def open_world_correct(raw: str, truth: str, kind: str) -> bool:
    """Fine-R1's released open-world text-include (TI) accuracy: the text from the first <answer> to the last
    </answer>, stripped, or the whole response when there is no such text; right when the truth (lowercased, '_' ->
    ' ') is inside it (lowercased). Cars: the truth without its last two words (body type and year)."""
    found = FIRST_TO_LAST_ANSWER.search(raw)
    text = (found.group(1).strip() if found else "") or raw
    name = " ".join(truth.lower().split()[:-2]) if kind == "car" else truth.lower().replace("_", " ")
    return name in text.lower()


def parse_choice(answer: str | None, options: list[str]) -> int | None:
    """Index of the chosen option (strict scoring): a bare letter ('B', '(B)', 'B.'), the option's text itself, or a
    letter that starts the answer ('B. red circle', 'B) ...'). None when nothing valid was chosen.
    >>> parse_choice("B", ["x", "y"]), parse_choice("y", ["x", "y"]), parse_choice("C", ["x", "y"])
    (1, 1, None)
    """
    if answer is None:
        return None
    text = answer.strip()
    m = re.fullmatch(r"\(?([A-Z])\)?\.?", text)
    if m is None:
        norm = judges.normalize(text)
        for i, opt in enumerate(options):
            if norm and norm == judges.normalize(opt):
                return i
        m = re.match(r"\(?([A-Z])(?:\)|\.|:)", text)
    if m is None:
        return None
    i = judges.LETTERS.index(m.group(1))
    return i if i < len(options) else None


def rng_for(seed: int, ex: data.Example, what: str) -> random.Random:
    """A per-image random stream (options, shuffles) that does not depend on sharding or batch order."""
    return random.Random(f"{seed}:{what}:{ex.id or ex.image}")


def row_seeds(live: list, seed: int, what: str, n: int) -> list[int]:
    """A random stream per sample of each image (common.sample's row_seeds): what an image draws depends on the seed
    and the image only, not on the ranks or the micro-batch it was evaluated in."""
    return [rng_for(seed, ex, f"{what}:{j}").getrandbits(62) for _, ex, _, _ in live for j in range(n)]


def mcq_options(ex: data.Example, dataset: data.Dataset, seed: int, distractors: str = "split") -> list[str]:
    """The truth and 3 other classes, shuffled: distractors from the evaluated classes ('split'; all classes if the
    split has too few) or from every class of the dataset ('all')."""
    rng = rng_for(seed, ex, "mcq")
    pool = [n for n in dataset.split_class_names if n != ex.class_name]
    if distractors == "all" or len(pool) < MCQ_OPTIONS - 1:
        pool = [n for n in dataset.class_names if n != ex.class_name]
    options = rng.sample(pool, min(MCQ_OPTIONS - 1, len(pool))) + [ex.class_name]
    rng.shuffle(options)
    return options


def top_answers(texts: list[str], k: int = TWO_STEP_OPTIONS,
                answer_fmt: str = "species name") -> tuple[list[str], list[int], int]:
    """Step 1 of two-step inference, as DiVE-k's released evaluation reads its samples: the first <answer> text,
    lowercased, the answer-format prefixes removed ('species name: ', 'make model: ', 'species: ', 'make and model: '
    and this dataset's own), answers of 100 characters or more skipped; then the k most frequent (counted by
    normalised text, shown as first written, ties broken by first appearance), their counts, and the number of
    samples without an answer tag."""
    counts: Counter = Counter()
    shown: dict[str, str] = {}
    failures = 0
    prefixes = (*judges.DIVEK_PREFIXES, f"{answer_fmt}: ")
    for t in texts:
        ans = judges.parse_answer(t)
        if ans is None:
            failures += 1
            continue
        ans = judges.strip_prefixes(ans, prefixes)
        key = judges.normalize(ans)
        if not key or len(ans) >= STEP1_MAX_CHARS:
            continue
        counts[key] += 1
        shown.setdefault(key, ans)
    top = counts.most_common(k)  # stable: equal counts keep first-appearance order
    return [shown[key] for key, _ in top], [c for _, c in top], failures


# ----- 2. one protocol on this rank's images -----

def _encode(processor, ex: data.Example, text: str):
    """(prompt, image), or (None, None) when the image cannot be read (warned and counted by try_open_image)."""
    image = common.try_open_image(ex.image)
    return (None, None) if image is None else (common.encode_prompt(processor, image, text), image)


def _base_record(idx: int, ex: data.Example) -> dict:
    return {"index": idx, "id": ex.id, "image": ex.image, "truth": ex.class_name}


def _judged(rec: dict, raw: str) -> dict:
    """Fill the parse fields of an open-answer record (the label is added by the caller's judge call)."""
    answer = judges.parse_answer(raw)
    rec.update(raw=raw, answer=answer, format_ok=judges.format_ok(raw), parse_failure=answer is None)
    return rec


def run_batch(model, processor, dataset, protocol, batch, *, judge, seed, max_new_tokens, samples, best_of,
              generator, be_specific, mcq_distractors="split", scoring="paper",
              compile_decode=False) -> list[dict]:
    """Records for a batch of (global index, example) pairs."""
    records, prompts, live = [], [], []
    if protocol == "speciarl":
        text = SPECIFIC_PROMPT if be_specific else OPEN_PROMPT
    elif protocol == "open":
        text = fine_r1.open_prompt(dataset.kind)
    elif protocol == "two_step":
        text = dive_k.mine_prompt(dataset.kind, dataset.name, dataset.split_class_names)
    for idx, ex in batch:
        if protocol == "mcq":  # paper: Fine-R1's option list; strict: lettered options, answer the letter
            options = mcq_options(ex, dataset, seed, mcq_distractors)
            text = fine_r1.closed_prompt(dataset.kind, options) if scoring == "paper" else \
                dive_k.mcq_prompt(dataset.kind, options)
        p, image = _encode(processor, ex, text)
        rec = _base_record(idx, ex)
        if p is None:
            rec["skipped"] = True
        else:
            live.append((rec, ex, p, image))
            if protocol == "mcq":
                rec.update(options=options, truth_letter=judges.LETTERS[options.index(ex.class_name)])
        records.append(rec)
    if not live:
        return records
    prompts = [p for _, _, p, _ in live]

    if protocol in ("open", "speciarl"):
        n = best_of or 1
        sampling = BEST_OF_SAMPLING if best_of else dict(temperature=0.0)
        roll = common.sample(model, processor, prompts, group_size=n, max_new_tokens=max_new_tokens,
                             generator=generator, row_seeds=row_seeds(live, seed, "best_of", n),
                             compile_decode=compile_decode, **sampling)
        for i, (rec, ex, _, _) in enumerate(live):
            cands = [_judged({}, raw) for raw in roll.texts[i * n:(i + 1) * n]]
            parsed = [c for c in cands if not c["parse_failure"]]  # a failed parse is wrong without asking the judge
            for c, lab in zip(parsed, judge.judge([(ex.class_name, c["answer"]) for c in parsed])):
                c["label"] = lab
            for c in cands:
                c.setdefault("label", "wrong")
                c["rank"] = BEST_OF_ORDER.index("parse_failure" if c["parse_failure"] else c["label"])
            best = max(range(n), key=lambda j: (cands[j]["rank"], -j))  # ties: the lowest index
            rec.update({k: v for k, v in cands[best].items() if k != "rank"})
            if best_of:
                rec["best_index"] = best
                rec["samples"] = [{"raw": c["raw"], "answer": c["answer"], "label": c["label"]} for c in cands]
            _add_match(rec)
            if protocol == "open":
                rec["text_include"] = open_world_correct(rec["raw"], ex.class_name, dataset.kind)
        return records

    if protocol == "mcq":
        roll = common.sample(model, processor, prompts, group_size=1, max_new_tokens=max_new_tokens, temperature=0.0,
                             generator=generator, compile_decode=compile_decode)
        for (rec, ex, _, _), raw in zip(live, roll.texts):
            _judged(rec, raw)
            if scoring == "paper":  # the truth's name inside the answer text
                correct = closed_world_correct(raw, ex.class_name)
                rec["invalid_choice"] = False
            else:  # the truth's letter (or its exact text)
                choice = parse_choice(rec["answer"], rec["options"])
                rec["letter"] = None if choice is None else judges.LETTERS[choice]
                rec["prediction"] = None if choice is None else rec["options"][choice]
                rec["invalid_choice"] = rec["answer"] is not None and choice is None
                correct = rec["letter"] == rec["truth_letter"]
            rec["label"] = "specific" if correct else "wrong"
        return records

    # two_step: step 1, K sampled answers with the class list; step 2, greedy multiple choice over the top 5
    roll = common.sample(model, processor, prompts, group_size=samples, max_new_tokens=max_new_tokens,
                         generator=generator, row_seeds=row_seeds(live, seed, "two_step", samples),
                         compile_decode=compile_decode, **STEP1_SAMPLING)
    step2 = []
    for i, (rec, ex, _, image) in enumerate(live):
        texts = roll.texts[i * samples:(i + 1) * samples]
        options, counts, failures = top_answers(texts, answer_fmt=dive_k.answer_format(dataset.name))
        order = list(range(len(options)))
        rng_for(seed, ex, "two_step").shuffle(order)
        rec.update(step1_answers=[judges.parse_answer(t) for t in texts], options=[options[j] for j in order],
                   option_counts=[counts[j] for j in order], step1_parse_failures=failures,
                   truth_in_options=any(judges.normalize(o) == judges.normalize(ex.class_name) for o in options))
        if options:
            question = dive_k.mcq_prompt(dataset.kind, rec["options"])
            step2.append((rec, common.encode_prompt(processor, image, question)))
        else:  # nothing parsed in step 1: no question to ask, counted as a failed parse
            rec.update(raw=None, answer=None, format_ok=False, parse_failure=True, letter=None, prediction=None,
                       invalid_choice=False, label="wrong", no_candidates=True)
    if step2:
        roll2 = common.sample(model, processor, [p for _, p in step2], group_size=1, max_new_tokens=max_new_tokens,
                              temperature=0.0, generator=generator, compile_decode=compile_decode)
        for (rec, _), raw in zip(step2, roll2.texts):
            _judged(rec, raw)
            choice = step2_choice(raw, rec["options"], scoring)
            rec["letter"] = None if choice is None else judges.LETTERS[choice]
            rec["prediction"] = None if choice is None else rec["options"][choice]
            rec["invalid_choice"] = choice is None and (rec["answer"] is not None or scoring == "paper")
            rec["no_candidates"] = False
        chosen = [rec for rec, _ in step2 if rec["prediction"] is not None]  # no valid letter: wrong, not judged
        for rec, lab in zip(chosen, judge.judge([(rec["truth"], rec["prediction"]) for rec in chosen])):
            rec["label"] = lab
        for rec, _ in step2:
            rec.setdefault("label", "wrong")
    return records


def _add_match(rec: dict):
    """Exact and substring match of the parsed answer against the truth (normalised), for transparency."""
    answer, truth = judges.normalize(rec.get("answer") or ""), judges.normalize(rec["truth"])
    rec["exact"] = bool(answer) and answer == truth
    rec["substring"] = bool(answer) and truth in answer


# ----- 3. metrics from the gathered records -----

def compute_metrics(records: list[dict], protocol: str, scoring: str = "paper") -> dict:
    """Every number of a protocol from its per-image records (the test recomputes these from predictions.jsonl).
    two_step with paper scoring leaves images whose step 1 gave no answer out of the count, as DiVE-k's released
    evaluation does (they are counted in `no_candidates`); strict scoring counts them wrong."""
    scored = [r for r in records if not r.get("skipped")]
    no_candidates = sum(bool(r.get("no_candidates")) for r in scored)
    if protocol == "two_step" and scoring == "paper":
        scored = [r for r in scored if not r.get("no_candidates")]
    n = len(scored)
    out = {"n": n, "skipped_images": sum(bool(r.get("skipped")) for r in records),
           "parse_failures": sum(r["parse_failure"] for r in scored),
           "format_ok": sum(r["format_ok"] for r in scored) / n if n else 0.0}
    if protocol == "mcq":
        correct = sum(r["label"] == "specific" for r in scored)
        out.update(accuracy=correct / n if n else 0.0, correct=correct,
                   invalid_choices=sum(r["invalid_choice"] for r in scored))
        return out
    out.update(judges.label_metrics([r["label"] for r in scored]))
    if protocol in ("open", "speciarl"):
        out.update(exact=sum(r["exact"] for r in scored) / n if n else 0.0,
                   substring=sum(r["substring"] for r in scored) / n if n else 0.0)
    if protocol == "open":  # paper: Fine-R1's text-include accuracy; strict: the judge's specific or more specific
        out["text_include"] = sum(r["text_include"] for r in scored) / n if n else 0.0
        if scoring == "paper":
            out["accuracy"] = out["text_include"]
    if protocol == "two_step":
        out.update(invalid_choices=sum(r["invalid_choice"] for r in scored),
                   no_candidates=no_candidates,
                   truth_in_options=sum(r["truth_in_options"] for r in scored) / n if n else 0.0,
                   step1_parse_failures=sum(r["step1_parse_failures"] for r in scored))
    return out


# ----- 4. the harness -----

def evaluate(model, processor, dataset: data.Dataset, protocol: str, *, judge=None, seed: int = 0,
             max_new_tokens: int = 256, samples: int = 20, best_of: int | None = None, out_dir: str | None = None,
             progress: bool = True, micro_batch: int = 8, be_specific: bool = False, mcq_distractors: str = "split",
             scoring: str = "paper", compile_decode: bool = False, extra_settings: dict | None = None) -> dict:
    """Evaluate `model` on `dataset` with one protocol; call it on every rank (images are sharded
    examples[rank::world] and the records gathered). Returns the same metrics dict on every rank; rank 0 writes
    metrics.json and predictions.jsonl to `out_dir` when given. `judge` defaults to the rules judge. Images are read
    at the processor's pixel budget (eval.py sets the papers' evaluation budget, EVAL_PIXELS)."""
    if protocol not in PROTOCOLS:
        raise SystemExit(f"--protocol {protocol}: expected one of {', '.join(PROTOCOLS)}")
    if mcq_distractors not in MCQ_DISTRACTORS:
        raise SystemExit(f"--mcq-distractors {mcq_distractors}: expected one of {', '.join(MCQ_DISTRACTORS)}")
    if scoring not in SCORINGS:
        raise SystemExit(f"--scoring {scoring}: expected one of {', '.join(SCORINGS)}")
    if be_specific and protocol != "speciarl":
        raise SystemExit(f"--be-specific is SpeciaRL's prompt baseline: it applies to the speciarl protocol, not "
                         f"{protocol}")
    if best_of and protocol not in ("open", "speciarl"):
        raise SystemExit(f"--best-of applies to the open and speciarl protocols, not {protocol}")
    if protocol != "mcq" and judge is None:
        judge = judges.get_judge("rules", dataset)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    indexed = list(enumerate(dataset.examples))[rank::world]
    device = next(common.unwrap(model).parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + rank)
    batches = [indexed[s:s + micro_batch] for s in range(0, len(indexed), micro_batch)]
    t0 = time.time()
    was_training = model.training
    model.eval()
    records = []
    # FSDP2: gather the full parameters once for the whole evaluation (every rank enters once, whatever its shard
    # size); the warm-up forward uses the same first image on every rank. A no-op for plain and DDP models.
    warm = _warmup_prompt(processor, dataset)
    try:
        with torch.no_grad(), common.gathered_params(
                model, common.fsdp_warmup_inputs(model, processor, warm) if warm is not None else None):
            bar = common.progress_bar(progress and rank == 0, total=len(indexed), unit="img", leave=False,
                                      desc=f"eval {protocol} {dataset.name}")
            try:
                for batch in batches:
                    records += run_batch(model, processor, dataset, protocol, batch, judge=judge, seed=seed,
                                         max_new_tokens=max_new_tokens, samples=samples, best_of=best_of,
                                         generator=generator, be_specific=be_specific,
                                         mcq_distractors=mcq_distractors, scoring=scoring,
                                         compile_decode=compile_decode)
                    if bar is not None:
                        bar.update(len(batch))
            finally:  # also on a stop: the bar's line is cleared, so a stop message starts a line of its own
                if bar is not None:
                    bar.close()
    finally:
        model.train(was_training)
    records = sorted((r for part in common.all_gather_objects(records) for r in part), key=lambda r: r["index"])
    metrics = compute_metrics(records, protocol, scoring)
    metrics["skipped_at_load"] = sum(dataset.skipped.values())  # missing / undecodable files, never in `records`
    if best_of:
        metrics["best_of"] = best_of
    if out_dir and rank == 0:
        settings = {"protocol": protocol, "data": dataset.name, "split": dataset.split, "root": dataset.root,
                    "classes": dataset.classes, "class_names": dataset.split_class_names, "n_images": len(records),
                    "dataset_skipped_at_load": dataset.skipped, "seed": seed, "max_new_tokens": max_new_tokens,
                    "samples": samples if protocol == "two_step" else None, "best_of": best_of,
                    "judge": getattr(judge, "name", None), "judge_stats": judge.stats() if judge is not None else None,
                    "world_size": world, "micro_batch": micro_batch, "compile_decode": bool(compile_decode),
                    "min_pixels": processor.image_processor.size.get("shortest_edge"),
                    "max_pixels": processor.image_processor.size.get("longest_edge"),
                    "be_specific": be_specific, "mcq_distractors": mcq_distractors if protocol == "mcq" else None,
                    "scoring": scoring if protocol in ("two_step", "mcq", "open") else None,
                    "seconds": round(time.time() - t0, 2),
                    "prompt": {"open": fine_r1.OPEN_PROMPT,
                               "speciarl": SPECIFIC_PROMPT if be_specific else OPEN_PROMPT,
                               "two_step": [dive_k.MINE_PROMPT, dive_k.MCQ_PROMPT],
                               "mcq": fine_r1.CLOSED_PROMPT if scoring == "paper" else dive_k.MCQ_PROMPT,
                               }[protocol],
                    "sampling": {"open": BEST_OF_SAMPLING if best_of else "greedy",
                                 "speciarl": BEST_OF_SAMPLING if best_of else "greedy",
                                 "two_step": {"step1": STEP1_SAMPLING, "step2": "greedy"}, "mcq": "greedy"}[protocol],
                    **(extra_settings or {})}
        write_results(out_dir, {"protocol": protocol, "metrics": metrics, "settings": settings}, records)
    common.barrier()
    return metrics


def _warmup_prompt(processor, dataset):
    for ex in dataset.examples:
        p, _ = _encode(processor, ex, OPEN_PROMPT)
        if p is not None:
            return p
    return None


def write_results(out_dir: str, metrics_doc: dict, records: list[dict]):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(metrics_doc, f, indent=1)
    with open(os.path.join(out_dir, "predictions.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


# ----- 5. reporting -----

def main_keys(protocol: str) -> list[str]:
    """The numbers that get a base / novel harmonic mean."""
    return ["hm", "correctness", "specificity"] if protocol == "speciarl" else ["accuracy"]


def harmonic(b: float, n: float) -> float:
    return 2 * b * n / (b + n) if b + n > 0 else 0.0


TABLE_KEYS = ["accuracy", "exact", "substring", "correctness", "specificity", "hm", *[f"share/{lab}" for lab in
              judges.JUDGE_LABELS], "truth_in_options", "format_ok", "n", "judge_errors", "parse_failures",
              "invalid_choices", "no_candidates", "skipped_images", "skipped_at_load"]


def markdown_table(results: dict[str, dict], hm: dict[str, float] | None = None) -> str:
    """| metric | <group> ... | HM | for the keys any group has."""
    groups = list(results)
    header = "| metric | " + " | ".join(groups) + (" | HM |" if hm else " |")
    lines = [header, "|" + "---|" * (len(groups) + 1 + bool(hm))]
    for key in TABLE_KEYS:
        if not any(key in m for m in results.values()):
            continue
        cells = [_fmt(results[g].get(key)) for g in groups]
        if hm:
            cells.append(_fmt(hm.get(key)) if key in hm else "")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(v) -> str:
    if v is None:
        return ""
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a Qwen2.5-VL checkpoint with the papers' protocols.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("what to evaluate")
    g.add_argument("--model", default="tiny", help="hub id, local Qwen2.5-VL directory (e.g. an export), or 'tiny'")
    g.add_argument("--data", default="toy", help="toy, cub, flowers, pets, cars, aircraft, dogs, food, or a .json / "
                   ".jsonl file of {image, class_name} records")
    g.add_argument("--data-root", default=None, help="the dataset folder in its official layout")
    g.add_argument("--split", default="test", help="train, val, test or trainval")
    g.add_argument("--classes", default="all", choices=["all", "base", "novel", "base+novel"],
                   help="CoOp class halves; base+novel reports both and their harmonic mean")
    g.add_argument("--limit", type=int, default=None, help="evaluate a random subset of this many images (per half)")
    g = p.add_argument_group("protocol")
    g.add_argument("--protocol", required=True, choices=PROTOCOLS, help="see the module docstring")
    g.add_argument("--judge", default="rules", help="rules, hf:<causal LM directory or hub id>, or openai:<model> "
                   "served at --judge-url (e.g. vLLM; SpeciaRL evaluates with Llama-3-70B-Instruct)")
    g.add_argument("--judge-url", default=None, help="OpenAI-compatible server of an openai: judge, e.g. "
                   "http://HOST:8000/v1 (default $OPENAI_BASE_URL; key from $OPENAI_API_KEY); plain HTTP")
    g.add_argument("--judge-concurrency", type=int, default=16, help="requests in flight per rank (openai: judge)")
    judges.add_judge_flags(g)
    g.add_argument("--judge-cache", default=None, help="JSONL cache of judged pairs (default <out>/judge_cache.jsonl)")
    g.add_argument("--samples", type=int, default=20, help="two_step: step-1 samples per image (DiVE-k 20)")
    g.add_argument("--best-of", type=int, default=None, help="open / speciarl: best of N samples at T=0.6, top_p 0.95")
    g.add_argument("--be-specific", action="store_true", help="speciarl: SpeciaRL's 'be specific' prompt")
    g.add_argument("--mcq-distractors", default="split", choices=MCQ_DISTRACTORS,
                   help="mcq: the 3 wrong options from the evaluated classes (split) or from every class, seen and "
                        "unseen (all: Fine-R1's released evaluation files)")
    g.add_argument("--scoring", default="paper", choices=SCORINGS,
                   help="two_step / mcq: 'paper' scores as the released evaluations do (DiVE-k: its letter parser, "
                        "also outside the tag; Fine-R1: options as a list, right when the truth's name is inside the "
                        "answer); 'strict': lettered options, only a letter or an option's exact text in <answer>")
    g.add_argument("--max-new-tokens", type=int, default=1024, help="answer length cap (DiVE-k 1024, SpeciaRL 2048)")
    g.add_argument("--seed", type=int, default=0, help="subset, options and sampling seed")
    g = p.add_argument_group("system")
    g.add_argument("--out", default=None, help="folder for metrics.json and predictions.jsonl (default "
                   "runs/eval_<data>_<protocol>)")
    g.add_argument("--micro-batch", type=int, default=8, help="images per sampling call")
    g.add_argument("--dtype", default="auto", choices=common.DTYPES, help="auto (bf16 on GPU, fp32 on CPU), "
                   "bf16-mixed (fp32 weights, bf16 compute), bf16, fp32")
    g.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    g.add_argument("--compile-decode", type=int, default=0, choices=[0, 1], help="decode with a static KV cache and "
                   "a torch.compile'd step (CUDA graphs on GPU; not with --attn flash_attention_2) (default 0)")
    g.add_argument("--min-pixels", type=int, default=None,
                   help="image pixel budget, lower bound (default: the paper's evaluation budget, EVAL_PIXELS: 3136)")
    g.add_argument("--max-pixels", type=int, default=None,
                   help="image pixel budget, upper bound (default: the paper's evaluation budget, EVAL_PIXELS: "
                        "12845056 = 16384*28*28)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads per process (default: the cores not busy "
                   "with other work, shared by the ranks); ignored on GPU")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    paper_min, paper_max = EVAL_PIXELS[args.protocol]  # the same resolution for a hub model and a trained export
    args.min_pixels = paper_min if args.min_pixels is None else args.min_pixels
    args.max_pixels = paper_max if args.max_pixels is None else args.max_pixels
    lifecycle.check_system_flags(args)
    return args


INTERRUPTED = ("an evaluation keeps no checkpoint; rerun the same command to evaluate from the start (pairs in the "
               "judge's cache are not judged again)")


def main(argv=None) -> dict:
    args = parse_args(argv)
    d = common.init_distributed()
    args.out = args.out or f"{lifecycle.default_run_dir('eval', args.data)}_{args.protocol}"
    if d.is_main:
        lifecycle.make_run_dir(args.out)  # before loading: a bad --out is one line, not a lost evaluation
    lifecycle.configure_threads(args.threads, d)
    precision = common.precision_for(args.dtype, d, "ddp", trained_weights=False)  # nothing is updated here
    model, processor = common.load_model(args.model, device=d.device, dtype=precision.weights, attn=args.attn,
                                         min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    model.eval()
    context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if not 0 < args.max_new_tokens <= (context or args.max_new_tokens):  # the sampler preallocates this many
        raise SystemExit(f"--max-new-tokens {args.max_new_tokens}: expected 1 to {context}, the model's context "
                         f"(max_position_embeddings), which the prompt shares")
    halves = ["base", "novel"] if args.classes == "base+novel" else [args.classes]
    judge = None
    cache = args.judge_cache or os.path.join(args.out, "judge_cache.jsonl")
    results = {}
    for half in halves:
        ds = data.load_dataset(args.data, args.split, root=args.data_root, classes=half, limit=args.limit,
                                 seed=args.seed)
        if judge is None and args.protocol != "mcq":  # one judge (and cache) for both halves
            judge = judges.get_judge(args.judge, ds, cache, url=args.judge_url, concurrency=args.judge_concurrency,
                                     max_tokens=args.judge_max_tokens, thinking=bool(args.judge_thinking))
        out = os.path.join(args.out, half) if len(halves) > 1 else args.out
        settings = {"model": args.model, "argv": sys.argv[1:] if argv is None else list(argv), "dtype": args.dtype,
                    "min_pixels": args.min_pixels, "max_pixels": args.max_pixels}
        try:
            with precision.context():
                results[half] = evaluate(model, processor, ds, args.protocol, judge=judge, seed=args.seed,
                                         max_new_tokens=args.max_new_tokens, samples=args.samples,
                                         best_of=args.best_of, out_dir=out, progress=not args.no_progress,
                                         micro_batch=args.micro_batch, be_specific=args.be_specific,
                                         mcq_distractors=args.mcq_distractors, scoring=args.scoring,
                                         compile_decode=bool(args.compile_decode), extra_settings=settings)
        except judges.ServerError as e:  # the judge's server went away: what it judged is in the cache
            raise SystemExit(f"{e}. The pairs judged so far are kept in {cache}: rerun "
                             f"the same command to continue") from None
    hm = None
    if len(halves) > 1:
        hm = {k: harmonic(results["base"][k], results["novel"][k]) for k in main_keys(args.protocol)}
        if d.is_main:
            with open(os.path.join(args.out, "metrics.json"), "w") as f:
                json.dump({"protocol": args.protocol, "classes": "base+novel", "base": results["base"],
                           "novel": results["novel"], "hm": hm, "settings": vars(args)}, f, indent=1)
    common.print0(f"\n{args.protocol} on {args.data} {args.split} ({args.model})\n" + markdown_table(results, hm))
    if judge is not None:
        common.print0(f"judge {judge.name} on rank 0: {judge.judged} pairs judged, {judge.hits} from the cache, "
                      f"{judge.errors} judge errors")
        for half, m in results.items():
            stop = judges.judge_error_stop(m["judge_errors"], m["n"] + m["judge_errors"], args.max_judge_errors)
            if stop:
                raise SystemExit(f"{stop}; {half} results written to {args.out}")
    common.cleanup_distributed()
    return {"results": results, "hm": hm}


if __name__ == "__main__":
    lifecycle.run_script(main, interrupted=INTERRUPTED)
