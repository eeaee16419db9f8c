"""eval.py end to end on toy with the tiny stand-in, every protocol: metrics.json is checked against the numbers
recomputed here from predictions.jsonl (answers re-parsed, labels re-judged). Plus the harness's helpers, skipping
an unreadable image, and a 2-rank torchrun run (DDP and FSDP2) that must equal the single-process result.

Run as a script under torchrun, this file is that 2-rank worker (see `worker` at the bottom)."""
import dataclasses
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import data
import dive_k  # noqa: E402
import evaluation  # noqa: E402
import fine_r1  # noqa: E402
import judges
import speciarl  # noqa: E402
import tiny  # noqa: E402
import eval as ev  # noqa: E402

TOKENS = 48  # the stand-in's answers are ~25 tokens


def read_out(out):
    with open(os.path.join(out, "metrics.json")) as f:
        doc = json.load(f)
    with open(os.path.join(out, "predictions.jsonl")) as f:
        preds = [json.loads(line) for line in f]
    return doc, preds


def assert_parsed(preds):
    for p in preds:
        assert p["answer"] == judges.parse_answer(p["raw"]) and p["format_ok"] == judges.format_ok(p["raw"])
        assert p["parse_failure"] == (p["answer"] is None)


def assert_label_metrics(metrics, labels):
    """Shares, counts, accuracy, correctness, specificity, hm: recomputed by hand from the labels."""
    n = len(labels)
    correct = [lab in ("generic", "less_specific", "specific", "more_specific") for lab in labels]
    specific = [lab in ("specific", "more_specific") for lab in labels]
    assert metrics["n"] == n
    assert metrics["accuracy"] == pytest.approx(sum(specific) / n)
    assert metrics["correctness"] == pytest.approx(sum(correct) / n)
    sp = sum(specific) / sum(correct) if sum(correct) else 0.0
    assert metrics["specificity"] == pytest.approx(sp)
    c = sum(correct) / n
    assert metrics["hm"] == pytest.approx(2 * sp * c / (sp + c) if sp + c else 0.0)
    for lab in judges.JUDGE_LABELS:
        assert metrics[f"count/{lab}"] == labels.count(lab)
        assert metrics[f"share/{lab}"] == pytest.approx(labels.count(lab) / n)


@pytest.fixture(scope="module")
def toy24():
    return data.load_dataset("toy", "test", limit=24, seed=1)


# ----- helpers -----

def test_prompts_carry_every_instruction_of_the_papers():
    """Each prompt asks for what the released prompt asks for, item by item (our words), and the tiny stand-in is
    pretrained on exactly these texts (tiny.TINY_PROMPTS keys its cache)."""
    general = speciarl.PROMPT
    for phrase in ["Classify the image.\n", "<think> </think>", "<answer> </answer>",
                   "a single label, or None to abstain", "Follow this format exactly"]:
        assert phrase in general, phrase
    assert speciarl.SPECIFIC_PROMPT == general.replace("Classify the image.", "Classify the image, be specific.")
    mine = dive_k.mine_prompt("bird", "cub", ["Bobolink", "Gull"])
    for phrase in ["This is an image containing a bird.", "most likely species name of the bird",
                   "must be one of these categories: ['Bobolink', 'Gull']", "<think> ... </think> <answer> species "
                   "name </answer>", "Follow this format exactly"]:
        assert phrase in mine, phrase
    assert "most likely make model" in dive_k.mine_prompt("aircraft", "aircraft", ["707-320"])
    mcq = dive_k.mcq_prompt("bird", ["Laysan Albatross", "Bobolink"])
    for phrase in ["This is an image containing a bird.", "options below", "\nA. Laysan Albatross\nB. Bobolink\n",
                   "letter of the correct bird name", "<answer> option letter </answer>", "Follow this format exactly"]:
        assert phrase in mcq, phrase
    closed = fine_r1.closed_prompt("bird", ["Laysan Albatross", "Bobolink"])
    for phrase in ["Which bird is shown", "['Laysan Albatross', 'Bobolink']", "<think> </think>",
                   "final choice inside <answer> </answer>", "<think>...</think> <answer>choice</answer>"]:
        assert phrase in closed, phrase
    assert "inner monologue inside <think> </think>" in fine_r1.RL_SUFFIX
    for phrase in ["Which bird is shown", "This is a fine-grained question.", "<think> </think>", "<answer> </answer>"]:
        assert phrase in fine_r1.open_prompt("bird"), phrase
    # one wording everywhere: eval.py, the methods and the stand-in's pretraining
    assert ev.protocol_for("speciarl").template == speciarl.PROMPTS["general"] == speciarl.PROMPT
    assert ev.protocol_for("speciarl", be_specific=True).template == speciarl.SPECIFIC_PROMPT
    assert ev.protocol_for("mcq", "strict").template == dive_k.MCQ_PROMPT
    assert fine_r1.pose_question("bird", 1)[0].endswith(fine_r1.RL_SUFFIX)
    for text in [speciarl.PROMPT, speciarl.SPECIFIC_PROMPT, dive_k.MINE_PROMPT,
                 dive_k.MCQ_PROMPT, fine_r1.CLOSED_PROMPT, *fine_r1.QUESTIONS,
                 fine_r1.OPEN_PROMPT, fine_r1.RL_SUFFIX]:
        assert text in tiny.TINY_PROMPTS


def test_parse_choice_table():
    opts = ["red plain circle", "blue striped square", "green plain triangle"]
    table = [("B", 1), ("(C)", 2), ("A.", 0), ("C. green plain triangle", 2), ("B) blue", 1),
             ("blue striped square", 1), ("Blue-striped square", 1), ("D", None), ("b", None), ("", None),
             (None, None), ("A red circle", None), ("I think B", None)]
    for answer, want in table:
        assert evaluation.parse_choice(answer, opts) == want, answer


def test_top_answers_and_options(toy24):
    texts = [f"<think>x</think><answer>{a}</answer>" for a in
             ["Red circle", "blue", "red circle", "green", "blue", "Red-Circle", "pink", "grey", "green"]]
    texts += ["no answer", "<think>x</think><answer> </answer>"]
    options, counts, failures = evaluation.top_answers(texts)
    assert options == ["red circle", "blue", "green", "pink", "grey"] and counts == [3, 2, 2, 1, 1]
    assert failures == 2  # no tag, and a blank answer
    # as DiVE-k's evaluation reads step 1: the first answer, format prefixes removed, 100+ characters skipped
    texts = [f"<answer>{a}</answer><answer>x</answer>" for a in
             ["Species name: Laysan Albatross", "species: laysan albatross", "Make and model: Sooty Albatross",
              "shape name: red circle", "Laysan " * 15]]
    options, counts, _ = evaluation.top_answers(texts, answer_fmt="shape name")
    assert options == ["laysan albatross", "sooty albatross", "red circle"] and counts == [2, 1, 1]
    ds = data.load_dataset("toy", "test", classes="novel")
    ex = ds.examples[0]
    opts = evaluation.mcq_options(ex, ds, seed=3)
    assert len(set(opts)) == 4 and ex.class_name in opts and set(opts) <= set(ds.split_class_names)
    assert opts == evaluation.mcq_options(ex, ds, seed=3) and any(evaluation.mcq_options(ex, ds, seed=s) != opts for s in range(4, 9))
    # Fine-R1's files draw the wrong options from every class: a novel image gets seen-class distractors too
    wide = [evaluation.mcq_options(e, ds, seed=3, distractors="all") for e in ds.examples]
    assert all(len(set(o)) == 4 and e.class_name in o for o, e in zip(wide, ds.examples))
    seen_names = set(ds.class_names) - set(ds.split_class_names)
    assert 0.3 < sum(bool(set(o) & seen_names) for o in wide) / len(wide) < 1  # 1 - (11/23 10/22 9/21) = 0.91
    with pytest.raises(SystemExit, match="--mcq-distractors some"):
        ev.evaluate(None, None, ds, "mcq", mcq_distractors="some")
    assert evaluation.harmonic(0.5, 0.25) == pytest.approx(1 / 3) and evaluation.harmonic(0, 0) == 0.0
    table = ev.markdown_table({"base": {"accuracy": 0.5, "n": 4}, "novel": {"accuracy": 0.25, "n": 4}},
                              {"accuracy": 1 / 3})
    assert "| accuracy | 0.5000 | 0.2500 | 0.3333 |" in table and "| n | 4 | 4 |  |" in table


def test_evaluation_imports_no_method_and_in_run_keys_stay(tmp_path, monkeypatch, capsys):
    """evaluation.py is shared code: it imports no method, eval, bench or tiny. Each method's in-run evaluation goes
    through evaluate_groups and logs the keys it always logged (evaluate stubbed: the keys, not the numbers)."""
    import ast
    import contextlib
    import types
    with open(evaluation.__file__) as f:
        imported = {a.name for node in ast.walk(ast.parse(f.read())) if isinstance(node, (ast.Import, ast.ImportFrom))
                    for a in node.names}
    assert not imported & {"dive_k", "speciarl", "fine_r1", "eval", "bench", "tiny"}
    seen = []

    def fake_evaluate(model, processor, dataset, protocol, *, judge, out_dir, **settings):
        seen.append((protocol.name, os.path.relpath(out_dir, str(tmp_path))))
        return {"accuracy": 0.5 if dataset[0] in ("base", "seen") else 0.25, "truth_in_options": 1.0, "format_ok": 1.0,
                "n": 4, "judge_errors": 0, "correctness": 0.5, "specificity": 0.25, "hm": 1 / 3, "label": "x"}
    monkeypatch.setattr(evaluation, "evaluate", fake_evaluate)
    monkeypatch.setattr(judges, "get_judge", lambda *a, **k: "rules")
    model = types.SimpleNamespace(eval=lambda: None)
    args = types.SimpleNamespace(precision=types.SimpleNamespace(context=contextlib.nullcontext), seed=0,
                                 eval_max_new_tokens=8, eval_samples=2, eval_batch=2, eval_scoring="paper",
                                 compile_decode=0, protocols=["mcq", "open"], eval_protocols="mcq,open",
                                 mcq_distractors="all", prompt="specific", max_judge_errors=1)
    out = str(tmp_path)
    res = dive_k.evaluate_two_step(model, None, {"base": ["base"], "novel": ["novel"]}, args, out, 3)
    assert res == {"eval/base/accuracy": 0.5, "eval/base/truth_in_options": 1.0, "eval/base/format_ok": 1.0,
                   "eval/novel/accuracy": 0.25, "eval/novel/truth_in_options": 1.0, "eval/novel/format_ok": 1.0,
                   "eval/hm": pytest.approx(1 / 3)}
    assert seen == [("two_step", "eval/step_0000003/base"), ("two_step", "eval/step_0000003/novel")]
    assert capsys.readouterr().out.startswith("eval at step 3: base/accuracy 0.5, base/truth_in_options 1,")
    seen.clear()
    res = fine_r1.evaluate_all(model, None, {"seen": ["seen"] * 3, "unseen": ["unseen"] * 2}, args, out, 0)
    assert res == {"eval/mcq/seen": 0.5, "eval/mcq/unseen": 0.25, "eval/open/seen": 0.5, "eval/open/unseen": 0.25,
                   "eval/mcq/seen_n": 3, "eval/mcq/unseen_n": 2, "eval/mcq/avg": 0.375, "eval/open/seen_n": 3,
                   "eval/open/unseen_n": 2, "eval/open/avg": 0.375}
    assert [where for _, where in seen] == [f"eval/step_0000000/{p}_{g}" for p in ("mcq", "open")
                                            for g in ("seen", "unseen")]
    assert len([line for line in capsys.readouterr().out.splitlines() if line.startswith("eval at step 0:")]) == 1
    seen.clear()
    res = speciarl.run_eval(args, model, None, ["test"], None, out, 2, None)
    assert seen == [("speciarl", "eval/step_0000002")]
    assert set(res) == {"eval/accuracy", "eval/truth_in_options", "eval/format_ok", "eval/n", "eval/judge_errors",
                        "eval/correctness", "eval/specificity", "eval/hm"}
    assert "judge_errors 0, correctness 0.5, specificity 0.25, hm 0.3333 (" in capsys.readouterr().out


# ----- end to end, every protocol -----

def test_open(tiny, toy24, tmp_path):
    model, proc = tiny
    out = str(tmp_path / "open")
    metrics = ev.evaluate(model, proc, toy24, "open", seed=0, max_new_tokens=TOKENS, out_dir=out, progress=False)
    doc, preds = read_out(out)
    assert doc["metrics"] == metrics and doc["protocol"] == "open" and doc["settings"]["judge"] == "rules-v2:toy"
    assert [p["truth"] for p in preds] == [e.class_name for e in toy24.examples]
    assert_parsed(preds)
    judge = judges.get_judge("rules", toy24)  # a fresh judge, no shared cache
    for p in preds:
        assert p["label"] == ("wrong" if p["parse_failure"] else judge.judge([(p["truth"], p["answer"])])[0])
    assert_label_metrics({**metrics, "accuracy": metrics["specificity_of_all"]}, [p["label"] for p in preds])
    # paper scoring: accuracy is Fine-R1's text-include rule on each raw output
    assert [p["text_include"] for p in preds] == [evaluation.open_world_correct(p["raw"], p["truth"], "shape") for p in preds]
    assert metrics["accuracy"] == metrics["text_include"] == pytest.approx(sum(p["text_include"] for p in preds) / 24)
    norm = judges.normalize
    assert metrics["exact"] == pytest.approx(sum(norm(p["answer"] or "") == norm(p["truth"]) for p in preds) / 24)
    assert metrics["substring"] == pytest.approx(
        sum(bool(p["answer"]) and norm(p["truth"]) in norm(p["answer"]) for p in preds) / 24)
    assert metrics["parse_failures"] == sum(p["parse_failure"] for p in preds)
    assert metrics["format_ok"] == pytest.approx(sum(p["format_ok"] for p in preds) / 24)
    assert metrics["skipped_images"] == 0 and len(set(p["label"] for p in preds)) >= 2


def test_best_of_ranks_as_speciarl_released():
    """Released best-of-N ranks (lower is better): more specific 1 .. wrong 6, a failed parse 100, API errors 104-106
    (a judge error here)."""
    released = {"more_specific": 1, "specific": 2, "less_specific": 3, "generic": 4, "abstain": 5, "wrong": 6,
                "parse_failure": 100, judges.JUDGE_ERROR: 104}
    assert evaluation.BEST_OF_ORDER == sorted(released, key=released.get, reverse=True)


def test_speciarl_best_of(tiny, toy24, tmp_path):
    model, proc = tiny
    ds = dataclasses.replace(toy24, examples=toy24.examples[:8])
    out = str(tmp_path / "speciarl")
    cache = str(tmp_path / "cache.jsonl")
    judge = judges.get_judge("rules", ds, cache_path=cache)
    metrics = ev.evaluate(model, proc, ds, "speciarl", judge=judge, seed=0, max_new_tokens=TOKENS, best_of=3,
                          out_dir=out, progress=False)
    doc, preds = read_out(out)
    assert doc["metrics"] == metrics and metrics["best_of"] == 3
    assert doc["settings"]["sampling"] == {"temperature": 0.6, "top_p": 0.95}
    fresh = judges.get_judge("rules", ds)
    for p in preds:
        samples = p["samples"]
        assert len(samples) == 3
        ranks = []
        for s in samples:
            failed = s["answer"] is None
            assert s["label"] == ("wrong" if failed else fresh.judge([(p["truth"], s["answer"])])[0])
            ranks.append(evaluation.BEST_OF_ORDER.index("parse_failure" if failed else s["label"]))
        best = max(range(3), key=lambda j: (ranks[j], -j))  # best label, first on ties
        assert p["best_index"] == best and p["label"] == samples[best]["label"]
        assert p["raw"] == samples[best]["raw"]
    assert_label_metrics(metrics, [p["label"] for p in preds])
    with open(cache) as f:  # the judge cache holds every distinct pair once
        cached = [json.loads(line) for line in f]
    assert len(cached) == len({(c["truth"], c["prediction"]) for c in cached}) == judge.judged


def test_mcq_cli_base_novel(tmp_path, capsys):
    """Default (paper) scoring: Fine-R1's option list, right when the truth's name is in the answer."""
    out = str(tmp_path / "mcq")
    res = ev.main(["--model", "tiny", "--data", "toy", "--protocol", "mcq", "--classes", "base+novel", "--limit", "8",
                   "--max-new-tokens", str(TOKENS), "--out", out, "--no-progress", "--seed", "5"])
    accs = {}
    for half in ("base", "novel"):
        doc, preds = read_out(os.path.join(out, half))
        ds = data.load_dataset("toy", "test", classes=half)
        assert len(preds) == 8 and doc["settings"]["model"] == "tiny" and doc["settings"]["seed"] == 5
        assert doc["settings"]["scoring"] == "paper" and doc["settings"]["prompt"] == fine_r1.CLOSED_PROMPT
        assert_parsed(preds)
        for p in preds:
            opts = p["options"]
            assert len(set(opts)) == 4 and p["truth"] in opts and set(opts) <= set(ds.split_class_names)
            assert p["label"] == ("specific" if evaluation.closed_world_correct(p["raw"], p["truth"]) else "wrong")
        correct = sum(p["label"] == "specific" for p in preds)
        assert doc["metrics"]["accuracy"] == pytest.approx(correct / 8) and doc["metrics"]["correct"] == correct
        accs[half] = correct / 8
        assert res["results"][half] == doc["metrics"]
    with open(os.path.join(out, "metrics.json")) as f:
        top = json.load(f)
    b, n = accs["base"], accs["novel"]
    assert top["hm"]["accuracy"] == pytest.approx(2 * b * n / (b + n) if b + n else 0.0)
    assert top["base"]["accuracy"] == pytest.approx(b) and top["settings"]["classes"] == "base+novel"
    printed = capsys.readouterr().out
    assert "| metric | base | novel | HM |" in printed and f"| accuracy | {b:.4f} | {n:.4f} |" in printed
    # strict scoring: lettered options, the letter (or the option's exact text) in <answer>
    ev.main(["--model", "tiny", "--data", "toy", "--protocol", "mcq", "--classes", "base", "--limit", "8",
             "--max-new-tokens", str(TOKENS), "--out", out + "_strict", "--no-progress", "--scoring", "strict"])
    doc, preds = read_out(out + "_strict")
    assert doc["settings"]["prompt"] == dive_k.MCQ_PROMPT
    for p in preds:
        choice = evaluation.parse_choice(p["answer"], p["options"])
        assert p["letter"] == (None if choice is None else judges.LETTERS[choice])
        assert p["label"] == ("specific" if p["letter"] == p["truth_letter"] else "wrong")
    assert doc["metrics"]["invalid_choices"] == sum(p["invalid_choice"] for p in preds)


def test_paper_scoring_truth_tables():
    """Step 2 of two-step as DiVE-k's released evaluation reads it, and Fine-R1's closed-world substring rule."""
    opts = ["laysan albatross", "sooty albatross", "bobolink"]
    table = [("<answer>B</answer>", 1), ("<answer>b</answer>", 1), ("<answer>The answer is B.</answer>", 1),
             ("<answer>Option B</answer>", 1), ("I pick C.", 2),  # no tag: the whole response
             ("<answer>D</answer>", None), ("<answer>(B)</answer>", None), ("<answer>bobolink</answer>", None),
             ("<answer>C</answer><answer>A</answer>", 2),  # the first tag
             ("<answer>A or B.</answer>", 1),  # one candidate: only B is followed by punctuation
             ("<answer>A, I think the answer is B.</answer>", 1)]  # keywords and the end favour B
    for raw, want in table:
        assert evaluation.step2_choice(raw, opts, "paper") == want, raw
    assert evaluation.step2_choice("<answer>bobolink</answer>", opts, "strict") == 2  # strict reads the option's text
    assert evaluation.step2_choice("I pick C.", opts, "strict") is None  # and only the tag
    assert evaluation.closed_world_correct("<think>x</think><answer>Black_footed albatross</answer>", "Black footed Albatross")
    assert evaluation.closed_world_correct("<answer>it is a Laysan Albatross, not a sooty</answer>", "laysan albatross")
    assert evaluation.closed_world_correct("<answer>A</answer> <answer>Bobolink</answer>", "Bobolink")  # first to last tag
    assert not evaluation.closed_world_correct("Bobolink", "Bobolink")  # no tag: wrong
    assert not evaluation.closed_world_correct("<answer>B</answer>", "Bobolink")


OPEN_WORLD_TABLE = [  # raw output, truth, kind, right under Fine-R1's released open-world text-include rule
    ("<think>x</think><answer>A Black_footed albatross</answer>", "Black_footed Albatross", "bird", False),  # '_' kept
    ("<think>x</think><answer>a black footed albatross</answer>", "Black_footed Albatross", "bird", True),
    ("<answer>A</answer> then <answer>Bobolink</answer>", "Bobolink", "bird", True),  # first tag to the last
    ("I think it is a Bobolink.", "Bobolink", "bird", True),  # no tag: the whole output
    ("<answer> </answer> Bobolink", "Bobolink", "bird", True),  # a blank answer: the whole output
    ("<think>Bobolink?</think><answer>Rusty Blackbird</answer>", "Bobolink", "bird", False),
    ("<answer>Bobolink", "Bobolink", "bird", True),  # no closing tag: the whole output
    ("<answer>Honda Odyssey</answer>", "Honda Odyssey Minivan 2012", "car", True),  # cars: last two words dropped
    ("<answer>Honda Odyssey</answer>", "Honda Odyssey Minivan 2012", "bird", False),
    ("<answer>Honda Accord</answer>", "Honda Odyssey Minivan 2012", "car", False),
    ("<answer>Boeing 737-800</answer>", "737-800", "aircraft", True),
]


@pytest.mark.parametrize("raw,truth,kind,right", OPEN_WORLD_TABLE)
def test_open_world_scoring_is_fine_r1s_text_include(raw, truth, kind, right):
    assert evaluation.open_world_correct(raw, truth, kind) == right


def test_two_step(tiny, toy24, tmp_path):
    model, proc = tiny
    ds = dataclasses.replace(toy24, examples=toy24.examples[:8])
    out = str(tmp_path / "two_step")
    metrics = ev.evaluate(model, proc, ds, "two_step", seed=0, max_new_tokens=TOKENS, samples=6, out_dir=out,
                          progress=False)
    doc, preds = read_out(out)
    assert doc["metrics"] == metrics and doc["settings"]["samples"] == 6
    judge = judges.get_judge("rules", ds)
    for p in preds:
        assert len(p["step1_answers"]) == 6
        options, counts, failures = evaluation.top_answers(
            [f"<answer>{a}</answer>" if a is not None else "" for a in p["step1_answers"]])
        assert sorted(p["options"]) == sorted(options) and len(p["options"]) <= 5  # the top 5, shuffled
        assert p["step1_parse_failures"] == failures
        if not options:
            assert p["no_candidates"] and p["label"] == "wrong"
            continue
        assert_parsed([p])
        choice = evaluation.step2_choice(p["raw"], p["options"], "paper")  # DiVE-k's released letter reader
        assert p["prediction"] == (None if choice is None else p["options"][choice])
        want = "wrong" if p["prediction"] is None else judge.judge([(p["truth"], p["prediction"])])[0]
        assert p["label"] == want
        assert p["truth_in_options"] == any(judges.normalize(o) == judges.normalize(p["truth"]) for o in options)
    counted = [p for p in preds if not p["no_candidates"]]  # the released script drops images without candidates
    assert metrics["n"] == len(counted) and metrics["no_candidates"] == 8 - len(counted)
    assert_label_metrics(metrics, [p["label"] for p in counted])
    assert metrics["truth_in_options"] == pytest.approx(sum(p["truth_in_options"] for p in counted) / len(counted))
    strict = ev.evaluate(model, proc, ds, "two_step", seed=0, max_new_tokens=TOKENS, samples=6, progress=False,
                         scoring="strict", out_dir=str(tmp_path / "strict"))
    _, preds_strict = read_out(str(tmp_path / "strict"))
    for p, q in zip(preds, preds_strict):  # the same samples, read by the tag-only parser
        assert q["options"] == p["options"]
        if q["options"]:
            choice = evaluation.parse_choice(q["answer"], q["options"])
            assert q["prediction"] == (None if choice is None else q["options"][choice])
    assert strict["n"] == 8
    assert any(len(p["options"]) > 1 for p in preds)  # step 1 really sampled several answers
    # each image's samples come from its own random streams: another micro-batch (as another rank count would give)
    # draws the same answers
    again = ev.evaluate(model, proc, ds, "two_step", seed=0, max_new_tokens=TOKENS, samples=6, micro_batch=3,
                        out_dir=str(tmp_path / "again"), progress=False)
    _, preds_again = read_out(str(tmp_path / "again"))
    assert again == metrics
    assert [(p["step1_answers"], p["options"], p["raw"]) for p in preds_again] == [
        (p["step1_answers"], p["options"], p["raw"]) for p in preds]


def test_unreadable_image_skipped_and_counted(tiny, toy24, tmp_path):
    model, proc = tiny
    bad = str(tmp_path / "bad.png")
    with open(bad, "w") as f:
        f.write("not a png")
    exs = toy24.examples[:3] + [data.Example(bad, 0, toy24.class_names[0], "bad.png")]
    ds = dataclasses.replace(toy24, examples=exs)  # the load-time check bypassed: the image breaks at encode time
    ds = dataclasses.replace(ds, skipped={"not an image": 2})  # and two more were dropped when the split was read
    metrics = ev.evaluate(model, proc, ds, "mcq", max_new_tokens=TOKENS, out_dir=str(tmp_path / "o"), progress=False)
    assert metrics["n"] == 3 and metrics["skipped_images"] == 1 and metrics["skipped_at_load"] == 2
    _, preds = read_out(str(tmp_path / "o"))
    assert preds[3]["skipped"] and preds[3]["image"] == bad and len(preds) == 4


def test_bad_protocol_and_best_of(tiny, toy24):
    model, proc = tiny
    with pytest.raises(SystemExit, match="--protocol"):
        ev.evaluate(model, proc, toy24, "zero_shot")
    with pytest.raises(SystemExit, match="--best-of applies"):
        ev.evaluate(model, proc, toy24, "mcq", best_of=4)
    with pytest.raises(SystemExit, match="--be-specific is SpeciaRL's prompt baseline"):
        ev.evaluate(model, proc, toy24, "open", be_specific=True)
    with pytest.raises(SystemExit, match="--scoring loose"):
        ev.evaluate(model, proc, toy24, "mcq", scoring="loose")


# ----- two ranks: DDP (open, two_step, shared judge cache) and FSDP2 (mcq) equal one process -----

def test_two_ranks_equal_one_process(tiny, tmp_path):
    from conftest import torchrun
    model, proc = tiny
    ds = data.load_dataset("toy", "test", limit=6, seed=2)
    ref = {p: ev.evaluate(model, proc, ds, p, seed=0, max_new_tokens=TOKENS, micro_batch=1, samples=4,
                          out_dir=str(tmp_path / f"ref_{p}"), progress=False) for p in ("open", "mcq", "two_step")}
    out = str(tmp_path / "dist")
    torchrun([os.path.abspath(__file__), out], nproc=2)
    for p, parallel in WORKER_RUNS:  # two_step samples: each image's own streams, whatever its rank
        per_rank = [json.load(open(os.path.join(out, f"{p}_rank{r}.json"))) for r in range(2)]
        assert per_rank[0] == per_rank[1] == ref[p]  # every rank returns the same, equal to one process
        _, preds = read_out(os.path.join(out, p))
        _, ref_preds = read_out(str(tmp_path / f"ref_{p}"))
        fields = ("index", "raw", "label", "step1_answers")
        assert [[q.get(k) for k in fields] for q in preds] == [[q.get(k) for k in fields] for q in ref_preds]
    with open(os.path.join(out, "cache.jsonl")) as f:  # both ranks appended to one judge cache: every line whole
        lines = [json.loads(line) for line in f]
    assert len(lines) >= 1 and all(rec["judge"] == "rules-v2:toy" for rec in lines)


WORKER_RUNS = (("open", "ddp"), ("mcq", "fsdp"), ("two_step", "ddp"))


def worker(out):
    """2-rank worker: evaluate `open` and `two_step` on a DDP-wrapped and `mcq` on an FSDP2-wrapped tiny model."""
    import torch
    torch.set_num_threads(1)
    d = common.init_distributed()
    ds = data.load_dataset("toy", "test", limit=6, seed=2)
    os.makedirs(out, exist_ok=True)
    for protocol, parallel in WORKER_RUNS:
        model, proc = common.load_model("tiny", device=d.device)
        wrapped = common.wrap_model(model, d, parallel)
        judge = judges.get_judge("rules", ds, cache_path=os.path.join(out, "cache.jsonl"))
        res = ev.evaluate(wrapped, proc, ds, protocol, judge=judge, seed=0, max_new_tokens=TOKENS, micro_batch=1,
                          samples=4, out_dir=os.path.join(out, protocol), progress=False)
        with open(os.path.join(out, f"{protocol}_rank{d.rank}.json"), "w") as f:
            json.dump(res, f)
    common.cleanup_distributed()


if __name__ == "__main__":
    worker(sys.argv[1])


def test_eval_resolution_is_the_papers_whatever_the_checkpoint(tmp_path):
    """A trained export keeps the training pixel budget in its processor files and a hub checkpoint has Qwen's: eval.py
    reads every model's images at the papers' EVAL_PIXELS, so the same weights give the same predictions from a
    directory saved with a coarser budget, and metrics.json says which budget was used."""
    import shutil
    coarse = str(tmp_path / "coarse")
    shutil.copytree(tiny.tiny_model_dir(), coarse)
    proc = common.processor_class().from_pretrained(coarse)
    common.set_pixel_budget(proc, 56 * 56, 56 * 56)  # 4 image tokens instead of the stand-in's 16
    proc.save_pretrained(coarse)
    assert common.processor_class().from_pretrained(coarse).image_processor.size["longest_edge"] == 56 * 56
    runs = {}
    for name, model in (("tiny", "tiny"), ("coarse", coarse)):
        ev.main(["--model", model, "--data", "toy", "--protocol", "open", "--limit", "6", "--max-new-tokens",
                 str(TOKENS), "--out", str(tmp_path / name), "--no-progress"])
        runs[name] = read_out(str(tmp_path / name))
    for doc, _ in runs.values():
        assert (doc["settings"]["min_pixels"], doc["settings"]["max_pixels"]) == ev.EVAL_PIXELS
    assert [p["raw"] for p in runs["tiny"][1]] == [p["raw"] for p in runs["coarse"][1]]


def test_compiled_decode_flag_reaches_every_sampling_call(tmp_path, monkeypatch):
    """--compile-decode 1 decodes two_step's both steps with the static cache and compiled step (torch.compile is
    the identity here, to keep the test fast): the same predictions as the default decode, recorded in settings."""
    import torch
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    calls = []
    real = common.sample
    monkeypatch.setattr(common, "sample", lambda *a, **kw: calls.append(kw["compile_decode"]) or real(*a, **kw))
    docs = []
    for flag in ("0", "1"):
        out = str(tmp_path / f"compiled{flag}")
        ev.main(["--model", "tiny", "--data", "toy", "--protocol", "two_step", "--limit", "3", "--samples", "2",
                 "--max-new-tokens", str(TOKENS), "--out", out, "--no-progress", "--compile-decode", flag])
        docs.append(read_out(out))
    assert calls == [False, False, True, True]  # step 1 and step 2 of each run
    assert docs[1][0]["settings"]["compile_decode"] is True and docs[0][0]["settings"]["compile_decode"] is False
    assert [p["raw"] for p in docs[0][1]] == [p["raw"] for p in docs[1][1]]
