"""One reward API in the three methods: a function registered from outside the method files (README, "Add a
reward") runs one training step of each method, is logged as its own component and enters the reward with its
weight."""
import json
import os

import pytest

import dive_k
import lifecycle


def length_penalty(completions, example):
    """-1 per 1,000 characters of rationale beyond the first 20 (README's example, with a smaller allowance)."""
    assert isinstance(example["truth"], str)  # every method hands its rewards the class name
    return [-0.001 * max(0, len(c.split("</think>")[0]) - 20) for c in completions]


def step_records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r.get("step", 0) >= 1 and "reward" in r]


def check(record, weights):
    assert "reward/length" in record and record["reward/length"] < 0  # the stand-in's rationales are longer than 20
    assert record["reward"] == pytest.approx(sum(w * record[f"reward/{n}"] for n, w in weights.items()), abs=1e-6)


def test_parse_rewards_weights_and_refusals():
    assert lifecycle.parse_rewards("format, mcq=2", dive_k.REWARDS) == {"format": 1.0, "mcq": 2.0}
    with pytest.raises(SystemExit, match="unknown reward 'lenght'; known: format, mcq, random"):
        lifecycle.parse_rewards("format,lenght", dive_k.REWARDS)
    with pytest.raises(SystemExit, match="the weight of mcq is 'x', not a number"):
        lifecycle.parse_rewards("mcq=x", dive_k.REWARDS)


def test_a_reward_from_outside_runs_in_dive_k(tmp_path, monkeypatch, tiny):
    monkeypatch.setitem(dive_k.REWARDS, "length", length_penalty)
    out = str(tmp_path / "dive_k")
    dive_k.main(["--data", "toy", "--max-steps", "1", "--train-limit", "12", "--mine-samples", "2",
                 "--prompts-per-step", "2", "--eval-every", "0", "--threads", "1", "--out", out,
                 "--rewards", "format,mcq,length=0.5"])
    check(step_records(out)[0], {"format": 1, "mcq": 1, "length": 0.5})


def test_a_reward_from_outside_runs_in_speciarl(tmp_path, monkeypatch, tiny):
    import speciarl
    monkeypatch.setitem(speciarl.REWARDS, "length", length_penalty)
    out = str(tmp_path / "speciarl")
    speciarl.main(["--data", "toy", "--max-steps", "1", "--rollout-prompts", "4", "--group-size", "4",
                   "--max-new-tokens", "32", "--eval-every", "0", "--threads", "1", "--out", out,
                   "--rewards", "dynamic,length=0.5"])
    check(step_records(out)[0], {"dynamic": 1, "length": 0.5})


def test_a_reward_from_outside_runs_in_fine_r1(tmp_path, monkeypatch, tiny):
    import fine_r1
    monkeypatch.setitem(fine_r1.REWARDS, "length", length_penalty)
    out = str(tmp_path / "fine_r1")
    fine_r1.main(["--data", "toy", "--stage", "tapo", "--max-steps", "1", "--rollout-batch", "1",
                  "--sample-prompts", "1", "--prompts-per-step", "1", "--group-size", "2", "--max-new-tokens", "32",
                  "--max-sample-rounds", "1", "--eval-every", "0", "--threads", "1", "--out", out,
                  "--rewards", "exact=0.9,format=0.1,length=0.5"])
    check(step_records(os.path.join(out, "tapo"))[0], {"exact": 0.9, "format": 0.1, "length": 0.5})
