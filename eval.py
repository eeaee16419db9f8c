"""
eval.py: the command line of the evaluation harness (evaluation.py), for every protocol of the three papers:
open (Fine-R1's open world), two_step (DiVE-k's inference), mcq (Fine-R1's closed world), speciarl (SpeciaRL's six
labels). Each protocol's record sits next to its method's prompts; README "Evaluation" says what each measures, the
two scorings (--scoring paper|strict) and where they differ from the papers.

  python eval.py --model tiny --data toy --protocol open --limit 48
  torchrun --nproc-per-node 8 eval.py --model runs/dive_k_cub/final --data cub --data-root R --protocol two_step \\
      --classes base+novel --out runs/eval_cub      (images sharded over ranks, results gathered)

Writes metrics.json (every number, the counts behind it, the settings) and predictions.jsonl (one line per image)
to --out and prints a markdown table; `--classes base+novel` adds their harmonic mean.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import common
import lifecycle
import data
import dive_k
import evaluation
import fine_r1
import judges
import speciarl

PROTOCOLS = {"open": fine_r1.OPEN_EVAL, "two_step": dive_k.TWO_STEP_EVAL, "mcq": fine_r1.MCQ_EVAL,
             "speciarl": speciarl.EVALS["general"]}
EVAL_PIXELS = (3136, 12845056)  # the pixel budget of the papers' released evaluations (README)

def protocol_for(name: str, scoring: str = "paper", be_specific: bool = False) -> evaluation.Protocol:
    """The record of --protocol NAME under --scoring and --be-specific."""
    if name not in PROTOCOLS:
        raise SystemExit(f"--protocol {name}: expected one of {', '.join(PROTOCOLS)}")
    if be_specific and name != "speciarl":
        raise SystemExit(f"--be-specific is SpeciaRL's prompt baseline: it applies to --protocol speciarl, not {name}")
    if name == "mcq" and scoring == "strict":  # DiVE-k's lettered question instead
        return dataclasses.replace(fine_r1.MCQ_EVAL, template=dive_k.MCQ_PROMPT,
                                   prompt=lambda dataset, options: dive_k.mcq_prompt(dataset.kind, options))
    return speciarl.EVALS["specific"] if be_specific else PROTOCOLS[name]

def evaluate(model, processor, dataset: data.Dataset, protocol: str, *, scoring: str = "paper",
             be_specific: bool = False, **settings) -> dict:
    """evaluation.evaluate with the protocol given by name (call it on every rank)."""
    return evaluation.evaluate(model, processor, dataset, protocol_for(protocol, scoring, be_specific),
                               scoring=scoring, **settings)

TABLE_KEYS = ["accuracy", "exact", "substring", "correctness", "specificity", "hm", *[f"share/{lab}" for lab in
              judges.JUDGE_LABELS], "truth_in_options", "format_ok", "n", "judge_errors", "parse_failures",
              "invalid_choices", "no_candidates", "skipped_images", "skipped_at_load"]

def markdown_table(results: dict[str, dict], hm: dict[str, float] | None = None) -> str:
    """| metric | <group> ... | HM | for the keys any group has."""
    columns = list(results.values()) + ([hm] if hm else [])
    lines = ["| metric | " + " | ".join(results) + (" | HM |" if hm else " |"), "|" + "---|" * (len(columns) + 1)]
    for key in [key for key in TABLE_KEYS if any(key in m for m in results.values())]:
        cells = ["" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)
                 for value in (column.get(key) for column in columns)]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a Qwen2.5-VL checkpoint with the papers' protocols, at their "
                                "pixel budget (EVAL_PIXELS) whatever the checkpoint's processor says.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = lifecycle.add_model_args(p, min_pixels=EVAL_PIXELS[0], max_pixels=EVAL_PIXELS[1])
    g.add_argument("--out", help="folder for metrics.json and predictions.jsonl (default runs/eval_<data>_<protocol>)")
    g.add_argument("--micro-batch", type=int, default=8, help="images per sampling call")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("what to evaluate")
    g.add_argument("--split", default="test", help="train, val, test or trainval")
    g.add_argument("--classes", default="all", choices=["all", "base", "novel", "base+novel"],
                   help="CoOp class halves; base+novel reports both and their harmonic mean")
    g.add_argument("--limit", type=int, default=None, help="evaluate a random subset of this many images (per half)")
    g = p.add_argument_group("protocol")
    g.add_argument("--protocol", required=True, choices=PROTOCOLS, help="see README 'Evaluation'")
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
    g.add_argument("--mcq-distractors", default="split", choices=evaluation.MCQ_DISTRACTORS,
                   help="mcq: the 3 wrong options from the evaluated classes (split) or from every class, seen and "
                        "unseen (all: Fine-R1's released evaluation files)")
    g.add_argument("--scoring", default="paper", choices=evaluation.SCORINGS, help="two_step / mcq / open: 'paper' "
                   "scores as the released evaluations do, 'strict' reads only <answer> (README 'Evaluation')")
    g.add_argument("--max-new-tokens", type=int, default=1024, help="answer length cap (DiVE-k 1024, SpeciaRL 2048)")
    g.add_argument("--seed", type=int, default=0, help="subset, options and sampling seed")
    args = p.parse_args(argv)
    lifecycle.check_system_flags(args)
    return args

INTERRUPTED = ("an evaluation keeps no checkpoint; rerun the same command to evaluate from the start (pairs in the "
               "judge's cache are not judged again)")

def main(argv=None) -> dict:
    args = parse_args(argv)
    protocol = protocol_for(args.protocol, args.scoring, args.be_specific)
    ranks = common.init_distributed()
    args.out = args.out or f"{lifecycle.default_run_dir('eval', args.data)}_{args.protocol}"
    if ranks.is_main:
        lifecycle.make_run_dir(args.out)  # before loading: a bad --out is one line, not a lost evaluation
    lifecycle.configure_threads(args.threads, ranks)
    precision = common.precision_for(args.dtype, ranks, "ddp", trained_weights=False)  # nothing is updated here
    model, processor = common.load_model(args.model, device=ranks.device, dtype=precision.weights, attn=args.attn,
                                         min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if not 0 < args.max_new_tokens <= (context or args.max_new_tokens):  # the sampler preallocates this many
        raise SystemExit(f"--max-new-tokens {args.max_new_tokens}: expected 1 to {context}, the model's context "
                         f"(max_position_embeddings), which the prompt shares")
    halves = ["base", "novel"] if args.classes == "base+novel" else [args.classes]
    judge, hm, results = None, None, {}
    cache = args.judge_cache or os.path.join(args.out, "judge_cache.jsonl")
    for half in halves:
        ds = data.load_dataset(args.data, args.split, root=args.data_root, classes=half, limit=args.limit,
                               seed=args.seed)
        if judge is None and protocol.judged:  # one judge (and cache) for both halves
            judge = judges.get_judge(args.judge, ds, cache, url=args.judge_url, concurrency=args.judge_concurrency,
                                     max_tokens=args.judge_max_tokens, thinking=bool(args.judge_thinking))
        out = os.path.join(args.out, half) if len(halves) > 1 else args.out
        settings = {"model": args.model, "argv": sys.argv[1:] if argv is None else list(argv), "dtype": args.dtype,
                    "min_pixels": args.min_pixels, "max_pixels": args.max_pixels}
        try:
            with precision.context():
                results[half] = evaluation.evaluate(
                    model, processor, ds, protocol, judge=judge, seed=args.seed, max_new_tokens=args.max_new_tokens,
                    samples=args.samples, best_of=args.best_of, out_dir=out, progress=not args.no_progress,
                    micro_batch=args.micro_batch, mcq_distractors=args.mcq_distractors, scoring=args.scoring,
                    compile_decode=bool(args.compile_decode), extra_settings=settings)
        except judges.ServerError as e:  # the judge's server went away: what it judged is in the cache
            raise SystemExit(f"{e}. The pairs judged so far are kept in {cache}: rerun "
                             f"the same command to continue") from None
    if len(halves) > 1:
        hm = {k: evaluation.harmonic(results["base"][k], results["novel"][k]) for k in protocol.hm_keys}
        if ranks.is_main:
            with open(os.path.join(args.out, "metrics.json"), "w") as f:
                json.dump({"protocol": args.protocol, "classes": "base+novel", "base": results["base"],
                           "novel": results["novel"], "hm": hm, "settings": vars(args)}, f, indent=1)
    common.print0(f"\n{args.protocol} on {args.data} {args.split} ({args.model})\n" + markdown_table(results, hm))
    if judge is not None:
        common.print0(f"judge {judge.name} on rank 0: {judge.judged} pairs judged, {judge.hits} from the cache, "
                      f"{judge.errors} judge errors")
        for half, m in results.items():
            if stop := judges.judge_error_stop(m["judge_errors"], m["n"] + m["judge_errors"], args.max_judge_errors):
                raise SystemExit(f"{stop}; {half} results written to {args.out}")
    common.cleanup_distributed()
    return {"results": results, "hm": hm}

if __name__ == "__main__":
    lifecycle.run_script(main, interrupted=INTERRUPTED)
