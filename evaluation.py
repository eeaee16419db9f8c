"""
evaluation.py: the evaluation machinery of eval.py and of the three training scripts' in-run evaluations.

A protocol is a record (Protocol): its prompts, the batch function that answers and scores a batch of images
(answer_batch: free answers, judged; choice_batch: multiple choice; two_step_batch: DiVE-k's two steps), the metrics
computed from the gathered per-image records, and what metrics.json records. A record whose prompts belong to a
method sits next to them (fine_r1.OPEN_EVAL and MCQ_EVAL, dive_k.TWO_STEP_EVAL, speciarl.EVALS); eval.py collects
them by name. `evaluate` runs one protocol on one dataset: call it on every rank (images sharded
examples[rank::world], records gathered) with a plain, DDP- or FSDP2-wrapped model. `evaluate_groups` is the
training scripts' evaluation. The protocols and their two scorings: README "Evaluation".
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import time
from collections import Counter
from types import SimpleNamespace
from typing import Callable

import torch

import common
import data
import judges

MCQ_DISTRACTORS, SCORINGS = ("split", "all"), ("paper", "strict")
TWO_STEP_OPTIONS = 5  # DiVE-k: the 5 most frequent step-1 answers
STEP1_MAX_CHARS = 100  # DiVE-k's two-step code skips step-1 answers of 100 characters or more
MCQ_OPTIONS = 4  # Fine-R1: truth + 3 distractors
BEST_OF_SAMPLING = dict(temperature=0.6, top_p=0.95)  # SpeciaRL's best-of-N
# best-of-N keeps the best label by SpeciaRL's evaluation ranks (more specific above specific), then parse failures,
# judge errors last (its released best-of-N ranks API errors below parse failures)
BEST_OF_ORDER = [judges.JUDGE_ERROR, "parse_failure", *judges.JUDGE_LABELS]
# DiVE-k's released letter extraction scores each candidate letter by these words nearby (its list, as released)
CHOICE_WORDS = ("answer", "correct", "choose", "select", "right", "think", "believe", "should",
                "\u7b54\u6848", "\u9009\u62e9", "\u6b63\u786e", "\u662f", "\u5bf9", "\u8ba4\u4e3a", "\u5e94\u8be5",
                "\u89c9\u5f97")
FIRST_TO_LAST_ANSWER = re.compile(r"<answer>(.*)</answer>", re.DOTALL)  # Fine-R1's evaluation reads this span

@dataclasses.dataclass(frozen=True)
class Protocol:
    name: str
    batch: Callable  # answer_batch, choice_batch or two_step_batch: (evaluate's job, [(index, example)]) -> records
    metrics: Callable  # answer_metrics, choice_metrics or two_step_metrics: (records, protocol, scoring) -> dict
    template: str | list  # the prompt template(s), as metrics.json records them
    prompt: Callable | None = None  # (dataset, options or None) -> the question; None: the template itself
    step2: Callable | None = None  # two_step: (kind, options) -> the lettered multiple-choice question
    answer_format: Callable | None = None  # two_step: dataset name -> the answer format prefix step 1 may echo
    sampling: dict | None = None  # two_step: step 1's sampling (the others answer greedily, or best-of-N)
    text_include: bool = False  # open: Fine-R1's open-world text-include accuracy (the paper scoring's accuracy)
    judged: bool = True  # a judge labels the answers (mcq: the scoring rule alone)
    paper_scoring: bool = True  # --scoring paper|strict applies
    be_specific: bool = False  # SpeciaRL's "be specific" prompt baseline
    hm_keys: tuple = ("accuracy",)  # the numbers that get a base / novel harmonic mean

    def question(self, dataset: data.Dataset, options: list[str] | None = None) -> str:
        return self.template if self.prompt is None else self.prompt(dataset, options)

# ----- 1. scoring -----
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
        score[letter] += sum(word.upper() in text[max(0, pos - 20):pos + 20] for word in CHOICE_WORDS)
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
    return judges.LETTERS.index(letter) if letter and letter in judges.LETTERS[:len(options)] else None

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
    text = (answer or "").strip()
    letter = re.fullmatch(r"\(?([A-Z])\)?\.?", text)
    if letter is None:
        norm = judges.normalize(text)
        for i, option in enumerate(options):
            if norm and norm == judges.normalize(option):
                return i
        letter = re.match(r"\(?([A-Z])(?:\)|\.|:)", text)
    if letter is None or letter.group(1) not in judges.LETTERS[:len(options)]:
        return None
    return judges.LETTERS.index(letter.group(1))

def rng_for(seed: int, example: data.Example, what: str) -> random.Random:
    """A per-image random stream (options, shuffles) that does not depend on sharding or batch order."""
    return random.Random(f"{seed}:{what}:{example.id or example.image}")

def row_seeds(live: list, seed: int, what: str, n: int) -> list[int]:
    """A random stream per sample of each image (common.sample's row_seeds): what an image draws depends on the seed
    and the image only, not on the ranks or the micro-batch it was evaluated in."""
    return [rng_for(seed, example, f"{what}:{j}").getrandbits(62) for _, example, _, _ in live for j in range(n)]

def mcq_options(example: data.Example, dataset: data.Dataset, seed: int, distractors: str = "split") -> list[str]:
    """The truth and 3 other classes, shuffled: distractors from the evaluated classes ('split'; all classes if the
    split has too few) or from every class of the dataset ('all')."""
    rng = rng_for(seed, example, "mcq")
    pool = [n for n in dataset.split_class_names if n != example.class_name]
    if distractors == "all" or len(pool) < MCQ_OPTIONS - 1:
        pool = [n for n in dataset.class_names if n != example.class_name]
    options = rng.sample(pool, min(MCQ_OPTIONS - 1, len(pool))) + [example.class_name]
    rng.shuffle(options)
    return options

def top_answers(texts: list[str], answer_fmt: str = "species name") -> tuple[list[str], list[int], int]:
    """Step 1 of two-step inference as DiVE-k's released evaluation reads it: the first <answer> texts, lowercased,
    answer-format prefixes ('species name: ', this dataset's) removed, 100+ characters skipped; the 5 most frequent
    (normalised, shown as first written, ties by first appearance), their counts, and the samples without a tag."""
    tagged = [judges.parse_answer(text) for text in texts]
    prefixes = (*judges.DIVEK_PREFIXES, f"{answer_fmt}: ")
    counts: Counter = Counter()
    shown: dict[str, str] = {}
    for answer in (judges.strip_prefixes(found, prefixes) for found in tagged if found is not None):
        key = judges.normalize(answer)
        if key and len(answer) < STEP1_MAX_CHARS:
            counts[key] += 1
            shown.setdefault(key, answer)
    top = counts.most_common(TWO_STEP_OPTIONS)  # stable: equal counts keep first-appearance order
    return [shown[key] for key, _ in top], [c for _, c in top], tagged.count(None)

# ----- 2. the batch functions: one protocol on a batch of this rank's images -----
def sample_texts(job, prompts: list, group_size: int = 1, row_seeds: list[int] | None = None, **sampling) -> list[str]:
    """common.sample's texts, greedy unless `sampling` says otherwise; nothing to sample: []."""
    if not prompts:
        return []
    return common.sample(job.model, job.processor, prompts, group_size=group_size, max_new_tokens=job.max_new_tokens,
                         row_seeds=row_seeds, compile_decode=job.compile_decode,
                         **(sampling or dict(temperature=0.0))).texts

def encode(job, batch: list, questions: list[str]) -> tuple[list[dict], list[tuple]]:
    """A record per image, and (record, example, prompt, image) for each readable one (the others: skipped)."""
    records, live = [], []
    for (index, example), text in zip(batch, questions):
        record = {"index": index, "id": example.id, "image": example.image, "truth": example.class_name}
        image = common.try_open_image(example.image)
        if image is None:
            record["skipped"] = True
        else:
            live.append((record, example, common.encode_prompt(job.processor, image, text), image))
        records.append(record)
    return records, live

def parsed(record: dict, raw: str) -> dict:
    """Fill the parse fields of a record from a raw output (the label is added by the caller's judge call)."""
    answer = judges.parse_answer(raw)
    record.update(raw=raw, answer=answer, format_ok=judges.format_ok(raw), parse_failure=answer is None)
    return record

def judge_records(judge, records: list[dict], field: str) -> None:
    """Label each record's `field` (an answer, a chosen option) against its truth; None is wrong without asking."""
    labels = iter(judge.judge([(record["truth"], record[field]) for record in records if record[field] is not None]))
    for record in records:
        record["label"] = "wrong" if record[field] is None else next(labels)

def answer_batch(job, batch: list) -> list[dict]:
    """open / speciarl: one greedy answer per image (best-of: N sampled, the best label kept), judged; a failed
    parse is wrong without asking the judge."""
    records, live = encode(job, batch, [job.protocol.question(job.dataset)] * len(batch))
    n = job.best_of or 1
    texts = sample_texts(job, [prompt for _, _, prompt, _ in live], n, row_seeds(live, job.seed, "best_of", n),
                         **(BEST_OF_SAMPLING if job.best_of else {}))
    for i, (record, example, _, _) in enumerate(live):
        candidates = [parsed({"truth": example.class_name}, raw) for raw in texts[i * n:(i + 1) * n]]
        judge_records(job.judge, candidates, "answer")
        ranks = [BEST_OF_ORDER.index("parse_failure" if c["parse_failure"] else c["label"]) for c in candidates]
        best = max(range(n), key=lambda j: (ranks[j], -j))  # ties: the lowest index
        record.update(candidates[best])
        if job.best_of:
            record["best_index"] = best
            record["samples"] = [{"raw": c["raw"], "answer": c["answer"], "label": c["label"]} for c in candidates]
        answer, truth = judges.normalize(record["answer"] or ""), judges.normalize(record["truth"])
        record["exact"] = bool(answer) and answer == truth  # reported beside the label, for transparency
        record["substring"] = bool(answer) and truth in answer
        if job.protocol.text_include:
            record["text_include"] = open_world_correct(record["raw"], example.class_name, job.dataset.kind)
    return records

def choice_batch(job, batch: list) -> list[dict]:
    """mcq: the truth and 3 distractors per image, one greedy answer. paper: right when the truth's name is inside
    the answer (closed_world_correct); strict: the truth's letter, or its exact text, in <answer> (parse_choice)."""
    options = {index: mcq_options(example, job.dataset, job.seed, job.mcq_distractors) for index, example in batch}
    records, live = encode(job, batch, [job.protocol.question(job.dataset, options[index]) for index, _ in batch])
    texts = sample_texts(job, [prompt for _, _, prompt, _ in live])
    for (record, example, _, _), raw in zip(live, texts):
        choices = options[record["index"]]
        record.update(options=choices, truth_letter=judges.LETTERS[choices.index(example.class_name)])
        parsed(record, raw)
        if job.scoring == "paper":
            correct = closed_world_correct(raw, example.class_name)
            record["invalid_choice"] = False
        else:
            choice = parse_choice(record["answer"], choices)
            record["letter"] = None if choice is None else judges.LETTERS[choice]
            record["prediction"] = None if choice is None else choices[choice]
            record["invalid_choice"] = record["answer"] is not None and choice is None
            correct = record["letter"] == record["truth_letter"]
        record["label"] = "specific" if correct else "wrong"
    return records

def two_step_batch(job, batch: list) -> list[dict]:
    """two_step: step 1 samples `samples` answers with the class list; step 2 asks greedily the lettered question
    over the 5 most frequent, shuffled; the chosen option is judged (no valid letter: wrong)."""
    protocol, samples = job.protocol, job.samples
    records, live = encode(job, batch, [protocol.question(job.dataset)] * len(batch))
    texts = sample_texts(job, [prompt for _, _, prompt, _ in live], samples,
                         row_seeds(live, job.seed, "two_step", samples), **protocol.sampling)
    step2 = []
    for i, (record, example, _, image) in enumerate(live):
        step1 = texts[i * samples:(i + 1) * samples]
        options, counts, failures = top_answers(step1, answer_fmt=protocol.answer_format(job.dataset.name))
        order = list(range(len(options)))
        rng_for(job.seed, example, "two_step").shuffle(order)
        record.update(step1_answers=[judges.parse_answer(t) for t in step1], options=[options[j] for j in order],
                      option_counts=[counts[j] for j in order], step1_parse_failures=failures,
                      truth_in_options=judges.normalize(example.class_name) in [judges.normalize(o) for o in options])
        if options:
            question = protocol.step2(job.dataset.kind, record["options"])
            step2.append((record, common.encode_prompt(job.processor, image, question)))
        else:  # nothing parsed in step 1: no question to ask, counted as a failed parse
            record.update(raw=None, answer=None, format_ok=False, parse_failure=True, letter=None, prediction=None,
                          invalid_choice=False, label="wrong", no_candidates=True)
    for (record, _), raw in zip(step2, sample_texts(job, [prompt for _, prompt in step2])):
        parsed(record, raw)
        choice = step2_choice(raw, record["options"], job.scoring)
        record["letter"] = None if choice is None else judges.LETTERS[choice]
        record["prediction"] = None if choice is None else record["options"][choice]
        record["invalid_choice"] = choice is None and (record["answer"] is not None or job.scoring == "paper")
        record["no_candidates"] = False
    judge_records(job.judge, [record for record, _ in step2], "prediction")
    return records

# ----- 3. metrics from the gathered records (the test recomputes them from predictions.jsonl) -----
def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0

def counted(records: list[dict], kept: list[dict]) -> dict:
    """The numbers of every protocol: images counted, skipped (unreadable), failed parses, format share."""
    return {"n": len(kept), "skipped_images": sum(bool(r.get("skipped")) for r in records),
            "parse_failures": sum(r["parse_failure"] for r in kept), "format_ok": mean(r["format_ok"] for r in kept)}

def answer_metrics(records: list[dict], protocol: Protocol, scoring: str) -> dict:
    """The judge's labels (judges.label_metrics), exact and substring match; open: text_include, which is the
    accuracy under paper scoring (strict: the judge's specific or more specific)."""
    kept = [r for r in records if not r.get("skipped")]
    out = {**counted(records, kept), **judges.label_metrics([r["label"] for r in kept])}
    out.update(exact=mean(r["exact"] for r in kept), substring=mean(r["substring"] for r in kept))
    if protocol.text_include:
        out["text_include"] = mean(r["text_include"] for r in kept)
        if scoring == "paper":
            out["accuracy"] = out["text_include"]
    return out

def choice_metrics(records: list[dict], protocol: Protocol, scoring: str) -> dict:
    kept = [r for r in records if not r.get("skipped")]
    correct = sum(r["label"] == "specific" for r in kept)
    return {**counted(records, kept), "accuracy": correct / len(kept) if kept else 0.0, "correct": correct,
            "invalid_choices": sum(r["invalid_choice"] for r in kept)}

def two_step_metrics(records: list[dict], protocol: Protocol, scoring: str) -> dict:
    """Paper scoring leaves images whose step 1 gave no answer out of the count, as DiVE-k's released evaluation
    does (they are counted in `no_candidates`); strict scoring counts them wrong."""
    kept = [r for r in records if not r.get("skipped")]
    no_candidates = sum(bool(r.get("no_candidates")) for r in kept)
    if scoring == "paper":
        kept = [r for r in kept if not r.get("no_candidates")]
    return {**counted(records, kept), **judges.label_metrics([r["label"] for r in kept]),
            "invalid_choices": sum(r["invalid_choice"] for r in kept), "no_candidates": no_candidates,
            "truth_in_options": mean(r["truth_in_options"] for r in kept),
            "step1_parse_failures": sum(r["step1_parse_failures"] for r in kept)}

def harmonic(b: float, n: float) -> float:
    return 2 * b * n / (b + n) if b + n > 0 else 0.0

# ----- 4. the harness -----
def evaluate(model, processor, dataset: data.Dataset, protocol: Protocol, *, judge=None, seed: int = 0,
             max_new_tokens: int = 256, samples: int = 20, best_of: int | None = None, out_dir: str | None = None,
             progress: bool = True, micro_batch: int = 8, mcq_distractors: str = "split", scoring: str = "paper",
             compile_decode: bool = False, extra_settings: dict | None = None) -> dict:
    """`protocol` on `dataset`; call it on every rank. Returns the same metrics dict on every rank; rank 0 writes
    metrics.json and predictions.jsonl to `out_dir` when given. Images are read at the processor's pixel budget."""
    if mcq_distractors not in MCQ_DISTRACTORS:
        raise SystemExit(f"--mcq-distractors {mcq_distractors}: expected one of {', '.join(MCQ_DISTRACTORS)}")
    if scoring not in SCORINGS:
        raise SystemExit(f"--scoring {scoring}: expected one of {', '.join(SCORINGS)}")
    if best_of and protocol.batch is not answer_batch:
        raise SystemExit(f"--best-of applies to the open and speciarl protocols, not {protocol.name}")
    if protocol.judged and judge is None:
        judge = judges.get_judge("rules", dataset)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    indexed = list(enumerate(dataset.examples))[rank::world]
    job = SimpleNamespace(model=model, processor=processor, dataset=dataset, protocol=protocol, judge=judge, seed=seed,
                          max_new_tokens=max_new_tokens, samples=samples, best_of=best_of, scoring=scoring,
                          mcq_distractors=mcq_distractors, compile_decode=compile_decode)
    t0, records = time.time(), []
    # FSDP2: gather the full parameters once for the whole evaluation (every rank enters once, whatever its shard
    # size); the warm-up forward uses the same first readable image on every rank. A no-op for plain and DDP models.
    first = next((im for im in map(common.try_open_image, (e.image for e in dataset.examples)) if im is not None), None)
    warmup = None if first is None else common.fsdp_warmup_inputs(model, processor,
                                                                  common.encode_prompt(processor, first, protocol.name))
    bar = common.progress_bar(progress and rank == 0, total=len(indexed), unit="img", leave=False,
                              desc=f"eval {protocol.name} {dataset.name}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), common.gathered_params(model, warmup):
            for start in range(0, len(indexed), micro_batch):
                records += protocol.batch(job, indexed[start:start + micro_batch])
                if bar is not None:
                    bar.update(len(indexed[start:start + micro_batch]))
    finally:  # also on a stop: the bar's line is cleared, so a stop message starts a line of its own
        if bar is not None:
            bar.close()
        model.train(was_training)
    records = sorted((r for part in common.all_gather_objects(records) for r in part), key=lambda r: r["index"])
    metrics = protocol.metrics(records, protocol, scoring)
    metrics["skipped_at_load"] = sum(dataset.skipped.values())  # missing / undecodable files, never in `records`
    if best_of:
        metrics["best_of"] = best_of
    if out_dir and rank == 0:
        sampling = {"step1": protocol.sampling, "step2": "greedy"} if protocol.sampling else "greedy"
        settings = {"protocol": protocol.name, "data": dataset.name, "split": dataset.split, "root": dataset.root,
                    "classes": dataset.classes, "class_names": dataset.split_class_names, "n_images": len(records),
                    "dataset_skipped_at_load": dataset.skipped, "seed": seed, "max_new_tokens": max_new_tokens,
                    "samples": samples if protocol.step2 else None, "best_of": best_of,
                    "judge": getattr(judge, "name", None), "judge_stats": judge.stats() if judge is not None else None,
                    "world_size": world, "micro_batch": micro_batch, "compile_decode": bool(compile_decode),
                    "min_pixels": processor.image_processor.size.get("shortest_edge"),
                    "max_pixels": processor.image_processor.size.get("longest_edge"),
                    "be_specific": protocol.be_specific,
                    "mcq_distractors": mcq_distractors if protocol.batch is choice_batch else None,
                    "scoring": scoring if protocol.paper_scoring else None, "seconds": round(time.time() - t0, 2),
                    "prompt": protocol.template, "sampling": BEST_OF_SAMPLING if best_of else sampling,
                    **(extra_settings or {})}
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "metrics.json"), "w") as f:
            json.dump({"protocol": protocol.name, "metrics": metrics, "settings": settings}, f, indent=1)
        with open(os.path.join(out_dir, "predictions.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    common.barrier()
    return metrics

def evaluate_groups(model, processor, eval_sets: dict[str, data.Dataset], protocols: list[Protocol], *, out: str,
                    step: int, precision, keys: tuple | None = ("accuracy",), name: str = "eval/{group}/{key}",
                    folder: str = "{group}", shown: tuple | None = None, judge=None, **settings) -> dict:
    """A training script's evaluation, on every rank: each protocol on each held-out group, written to
    <out>/eval/step_N/<folder>. Returns {name: number} for `keys` (None: every number) and eval/hm of base and
    novel accuracy when both are there; prints one line (the `shown` keys; default all)."""
    t0 = time.perf_counter()
    model.eval()
    result, line = {}, []
    for protocol in protocols:
        for group, dataset in eval_sets.items():
            where = folder.format(protocol=protocol.name, group=group)
            with precision.context():
                metrics = evaluate(model, processor, dataset, protocol,
                                   judge=judges.get_judge("rules", dataset) if judge is None else judge,
                                   out_dir=common.eval_dir(out, step, where), **settings)
            for key in keys or [k for k, v in metrics.items() if isinstance(v, (int, float))]:
                logged = name.format(protocol=protocol.name, group=group, key=key)
                result[logged] = metrics[key]
                if shown is None or key in shown:
                    line.append(f"{logged[5:]} {metrics[key]:.4g}")
    if "eval/base/accuracy" in result and "eval/novel/accuracy" in result:
        result["eval/hm"] = harmonic(result["eval/base/accuracy"], result["eval/novel/accuracy"])
        line.append(f"hm {result['eval/hm']:.4g}")
    common.print0(f"eval at step {step}: {', '.join(line)} ({time.perf_counter() - t0:.1f} s)")
    return result
