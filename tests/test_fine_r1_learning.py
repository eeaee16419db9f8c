"""Fine-R1 learns on toy: the CPU quickstart (`python fine_r1.py --data toy`: rationales from the toy attributes,
CoT SFT, TAPO, all from the tiny stand-in) raises the closed-world (mcq) and open-world (open) accuracies on the
seen (base) and unseen (novel) classes over the starting model, beyond evaluation noise.

Held out: the toy test split, 180 images of the 12 seen classes and 180 of the 12 unseen ones, each scored greedily
by eval.py under both protocols. Noise: the standard error of a difference of two accuracies on n = 180 images,
sqrt(p0 (1 - p0) / n + p1 (1 - p1) / n) (about 0.05 at p = 0.5); a gain counts when it exceeds 2 of those."""
import json
import math
import os
import subprocess
import sys

from conftest import ROOT

GROUPS = [(protocol, group) for protocol in ("mcq", "open") for group in ("seen", "unseen")]


def eval_records(path):
    with open(path) as f:
        return [r for r in map(json.loads, f) if "eval/mcq/seen" in r]


def test_sft_then_tapo_raise_seen_and_unseen_accuracy(tmp_path):
    out = str(tmp_path / "run")
    proc = subprocess.run([sys.executable, "fine_r1.py", "--data", "toy", "--out", out], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sft = eval_records(os.path.join(out, "sft", "metrics.jsonl"))
    tapo = eval_records(os.path.join(out, "tapo", "metrics.jsonl"))
    stages = {"start": sft[0], "after sft": sft[-1], "after tapo": tapo[-1]}
    assert sft[0]["step"] == 0
    lines = [f"{'':18}" + "".join(f"{name:>12}" for name in stages) + f"{'2 SE':>8}{'n':>6}"]
    for protocol, group in GROUPS:
        key = f"eval/{protocol}/{group}"
        n = stages["start"][key + "_n"]
        p0, p1 = stages["start"][key], stages["after tapo"][key]
        se = math.sqrt(p0 * (1 - p0) / n + p1 * (1 - p1) / n)
        lines.append(f"{protocol + ' ' + group:18}" + "".join(f"{r[key]:12.3f}" for r in stages.values())
                     + f"{2 * se:8.3f}{n:6d}")
        stages.setdefault("checks", []).append((key, p0, p1, se, n))
    print("\n" + "\n".join(lines))
    for key, p0, p1, se, n in stages["checks"]:
        assert n >= 150, (key, n)
        assert p1 - p0 > 2 * se, f"{key}: {p0:.3f} -> {p1:.3f} (2 SE = {2 * se:.3f}, n = {n})\n" + "\n".join(lines)
