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
  * the share of specific answers among all images (eval.py's `specificity_of_all`) rises by more than two standard
    errors of the difference;
  * on-policy: among the correct sampled training rollouts (T=1, what the reward sees), the specific share rises
    from the first steps to the last ones (the stand-in samples 'circle', 'shape' and 'None' far more often than it
    says them greedily).

Seen last (recipe v3): greedy correctness = specific share 0.578 -> 0.661 (s.e. 0.026 / 0.025), specificity 1.000
-> 1.000; sampled specificity 0.719 at step 1, 0.869 at step 2, 1.000 over the last three steps.
"""
import json
import math
import os

import torch

import common
import data
import judges
import eval as evaluation
import speciarl


SEED = 42  # the quickstart's default


def se(p: float, n: float) -> float:
    return math.sqrt(p * (1 - p) / n) if n else float("nan")


def summary(m: dict) -> dict:
    n = m["n"]
    correct = sum(m[f"count/{k}"] for k in judges.CORRECT_LABELS)
    return {"n": n, "specific_share": m["specificity_of_all"], "se_specific_share": se(m["specificity_of_all"], n),
            "correctness": m["correctness"], "se_correctness": se(m["correctness"], n),
            "specificity": m["specificity"], "se_specificity": se(m["specificity"], correct),
            "shares": {k: round(m[f"share/{k}"], 3) for k in judges.JUDGE_LABELS}}


def test_speciarl_raises_specificity_on_toy(tiny, tmp_path, one_thread):
    model0, proc = tiny
    test = data.load_dataset("toy", "test")  # 360 held-out images, 15 per class
    judge = judges.get_judge("rules", test)

    def measure(model, processor, name):
        return evaluation.evaluate(model, processor, test, "speciarl", judge=judge, max_new_tokens=48,
                                   micro_batch=120, progress=False, out_dir=str(tmp_path / f"eval_{name}"))

    before = summary(measure(model0, proc, "before"))
    out = str(tmp_path / "run")
    speciarl.main(["--data", "toy", "--out", out, "--eval-every", "0", "--save-every", "0", "--seed", str(SEED),
                   "--threads", "1"])  # the quickstart
    trained, proc2 = common.load_model(os.path.join(out, "final"), device=torch.device("cpu"))
    trained.eval()
    after = summary(measure(trained, proc2, "after"))
    with open(os.path.join(out, "metrics.jsonl")) as f:
        steps = [json.loads(line) for line in f if '"reward"' in line]
    sampled = [round(r["specificity"], 3) for r in steps]
    print("\nbefore", json.dumps(before), "\nafter ", json.dumps(after), "\nsampled specificity by step", sampled)

    assert after["specificity"] >= before["specificity"], (before, after)
    assert after["correctness"] >= before["correctness"] - 0.03, (before, after)
    gain = after["specific_share"] - before["specific_share"]
    assert gain > 2 * math.hypot(before["se_specific_share"], after["se_specific_share"]), (before, after)
    assert sum(sampled[-3:]) / 3 > sum(sampled[:2]) / 2 + 0.1, sampled
