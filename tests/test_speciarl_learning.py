"""SpeciaRL learns at toy scale: from the tiny stand-in, the CPU quickstart (`python speciarl.py --data toy`: one epoch,
30 rollout batches of 16 images x 10 rollouts, the learning rate decaying linearly) makes the model
more specific without costing correctness, measured with eval.py's `speciarl` protocol (greedy, rules judge) on the
360 held-out toy test images before and after, with standard errors (printed; run with -s to see them).

Asserted directions:
  * specificity (specific or more specific among the correct greedy answers, eval.py's definition) does not fall.
    With recipe v2 the stand-in answered a few images greedily with the generic 'shape' (0.962 -> 1.000); the v3
    stand-in (pretrained on the papers' prompts) names the class greedily whenever it is right (1.000 -> 1.000), so
    on toy the gain in specificity shows on-policy (last point) and the greedy gain shows in the specific share;
  * correctness (correct at any level) does not drop by more than 0.03;
  * the share of specific answers among all images (eval.py's `specificity_of_all`) rises by more than one paired
    standard error (the same images before and after: the s.d. of the per-image differences / sqrt(360));
  * on-policy: among the correct sampled training rollouts (T=1, what the reward sees), the specific share rises
    from the first steps to the last ones (the stand-in samples 'circle', 'shape' and 'None' far more often than it
    says them greedily).

Seeds tried (one torch thread; specific share before -> after, gain / paired s.e., images gained / lost; sampled
specificity, mean of steps 1-2 -> mean of the last 3; correctness equals the specific share, specificity 1.000 ->
1.000 in every run):
  seed 42 (the test's)  0.575 -> 0.650, +0.075 / 0.023 = 3.3 s.e., 48 / 21; sampled 0.81 -> 1.00
  seed 0                0.575 -> 0.597, +0.022 / 0.017 = 1.3 s.e., 22 / 14; sampled 0.81 -> 1.00
  seed 1                0.575 -> 0.628, +0.053 / 0.020 = 2.6 s.e., 37 / 18; sampled 0.82 -> 0.99
Every seed gains, but one seed's greedy gain ranges from 1.3 to 3.3 paired s.e.: the threshold is one s.e., which
every seed passes, where two would fail seed 0 (the preset is not tuned to one seed). The on-policy rise holds by
a wide margin for every seed.

The run is on one torch thread (a fixed count), side by side with the other learning tests' runs; seed 42 gives the
same numbers on two threads.
"""
import json
import math
import os

import torch

import common
import data
import judges
import eval as evaluation
from conftest import LEARNING_RUNS


SEED = 42  # the quickstart's default
LEARNING_RUNS[__name__] = {"speciarl": ["speciarl.py", "--data", "toy", "--eval-every", "0", "--save-every", "0",
                                        "--seed", str(SEED)]}  # the quickstart


def se(p: float, n: float) -> float:
    return math.sqrt(p * (1 - p) / n) if n else float("nan")


def summary(m: dict) -> dict:
    n = m["n"]
    correct = sum(m[f"count/{k}"] for k in judges.CORRECT_LABELS)
    return {"n": n, "specific_share": m["specificity_of_all"], "se_specific_share": se(m["specificity_of_all"], n),
            "correctness": m["correctness"], "se_correctness": se(m["correctness"], n),
            "specificity": m["specificity"], "se_specificity": se(m["specificity"], correct),
            "shares": {k: round(m[f"share/{k}"], 3) for k in judges.JUDGE_LABELS}}


def test_speciarl_raises_specificity_on_toy(tiny, tmp_path, one_thread, learning_runs):
    model0, proc = tiny
    test = data.load_dataset("toy", "test")  # 360 held-out images, 15 per class
    judge = judges.get_judge("rules", test)

    def measure(model, processor, name):
        return evaluation.evaluate(model, processor, test, "speciarl", judge=judge, max_new_tokens=48,
                                   micro_batch=120, progress=False, out_dir=str(tmp_path / f"eval_{name}"))

    before = summary(measure(model0, proc, "before"))
    out = learning_runs("speciarl")
    trained, proc2 = common.load_model(os.path.join(out, "final"), device=torch.device("cpu"))
    trained.eval()
    after = summary(measure(trained, proc2, "after"))
    with open(os.path.join(out, "metrics.jsonl")) as f:
        steps = [json.loads(line) for line in f if '"reward"' in line]
    sampled = [round(r["specificity"], 3) for r in steps]
    print("\nbefore", json.dumps(before), "\nafter ", json.dumps(after), "\nsampled specificity by step", sampled)

    assert after["specificity"] >= before["specificity"], (before, after)
    assert after["correctness"] >= before["correctness"] - 0.03, (before, after)
    specific = {name: {r["id"]: r["label"] in judges.SPECIFIC_LABELS
                       for r in map(json.loads, open(tmp_path / f"eval_{name}" / "predictions.jsonl"))}
                for name in ("before", "after")}
    diffs = [float(specific["after"][i]) - float(specific["before"][i]) for i in specific["before"]]
    gain = sum(diffs) / len(diffs)
    paired_se = math.sqrt(sum((x - gain) ** 2 for x in diffs) / (len(diffs) - 1) / len(diffs))
    print(f"specific share gain {gain:+.3f}, paired s.e. {paired_se:.4f}")
    assert abs(gain - (after["specific_share"] - before["specific_share"])) < 1e-9
    assert gain > paired_se, (gain, paired_se, before, after)
    assert sum(sampled[-3:]) / 3 > sum(sampled[:2]) / 2 + 0.1, sampled
