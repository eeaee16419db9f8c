"""The command-line contract every script keeps (README, 'Every script shares'): the same shared flags with the same
meaning, the same presets for the model, the same refusals of bad values, the same output paths."""
import argparse

import pytest

import common
import lifecycle
import dive_k
import eval as ev
import fine_r1
import speciarl

PARSERS = {"dive_k": dive_k.parse_args, "speciarl": speciarl.parse_args, "fine_r1": fine_r1.parse_args,
           "eval": lambda argv: ev.parse_args([*argv, "--protocol", "open"])}
TRAINING = ("dive_k", "speciarl", "fine_r1")
# flag -> a valid value (None: a switch-free flag checked for presence by parsing it)
EVERY_SCRIPT = {"--model": "tiny", "--data": "toy", "--data-root": "/data", "--out": "runs/x", "--dtype": "bf16-mixed",
                "--attn": "eager", "--compile-decode": "1", "--min-pixels": "3136", "--max-pixels": "401408",
                "--threads": "1"}
EVERY_TRAINING_SCRIPT = {"--max-steps": "3", "--seed": "1", "--group-size": "4", "--parallel": "fsdp",
                         "--activation-checkpointing": "1", "--export-dtype": "fp32", "--max-nonfinite": "2",
                         "--eval-every": "0", "--eval-limit": "5", "--eval-max-new-tokens": "9", "--save-every": "0",
                         "--lr": "1e-5", "--micro-batch": "2", "--temperature": "0.9", "--shots": "4",
                         "--max-new-tokens": "16"}


def parse(script, argv):
    return PARSERS[script](list(argv))


@pytest.mark.parametrize("script", list(PARSERS))
def test_every_shared_flag_is_accepted_with_the_same_name(script):
    flags = {**EVERY_SCRIPT, **(EVERY_TRAINING_SCRIPT if script in TRAINING else {})}
    args = parse(script, [item for flag, value in flags.items() for item in (flag, value)])
    for flag, value in flags.items():
        got = getattr(args, flag[2:].replace("-", "_"))
        assert str(got) == value or got == type(got)(value), (script, flag, got)


def test_presets_fill_the_model_and_data_the_same_way():
    for script in TRAINING:
        toy, cub = parse(script, []), parse(script, ["--data", "cub"])
        assert toy.data == "toy" and toy.model == "tiny", script  # the CPU quickstart, with no flag at all
        assert cub.model == "Qwen/Qwen2.5-VL-7B-Instruct", script  # real data: the papers' model, never the stand-in
        assert parse(script, ["--data", "cub", "--model", "M"]).model == "M"
    assert parse("eval", []).data == "toy"


@pytest.mark.parametrize("script", list(PARSERS))
@pytest.mark.parametrize("flag,value,message", [
    ("--max-pixels", "0", "--max-pixels 0: must be above 0"),
    ("--min-pixels", "999999999", "is above --max-pixels"),
    ("--dtype", "fp8", "invalid choice: 'fp8'"),
])
def test_bad_values_of_shared_flags_are_refused_alike(script, flag, value, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse(script, [flag, value])
    assert message in f"{e.value.code}{capsys.readouterr().err}"


@pytest.mark.parametrize("script", TRAINING)
@pytest.mark.parametrize("flag,value,message", [
    ("--max-steps", "0", "--max-steps 0: must be above 0"),
    ("--lr", "-1", "--lr -1.0: must be above 0"),
    ("--temperature", "0", "no learning signal"),
    ("--micro-batch", "0", "--micro-batch 0: must be above 0"),
    ("--eval-limit", "0", "leave it out to evaluate every image"),
    ("--eval-every", "-1", "--eval-every -1: must be 0 or more (0 = never)"),
])
def test_bad_values_of_training_flags_are_refused_alike(script, flag, value, message):
    with pytest.raises(SystemExit) as e:
        parse(script, [flag, value])
    assert message in str(e.value.code)


def test_a_negative_lora_rank_is_refused():
    """-1 once ran a full fine-tune whose KL reference was the policy itself (0 = no LoRA, > 0 = its rank)."""
    with pytest.raises(SystemExit) as e:
        parse("speciarl", ["--lora-rank", "-1"])
    assert "--lora-rank -1: must be 0 or more" in str(e.value.code)
    assert parse("speciarl", ["--lora-rank", "0"]).lora_rank == 0


def test_eval_every_zero_means_never_and_freeze_vision_takes_a_value():
    for script in TRAINING:
        help_text = next(a.help for a in _parser(script)._actions if "--eval-every" in a.option_strings)
        assert "0 = never" in help_text, script
    assert fine_r1.eval_sets_for(parse("fine_r1", ["--eval-every", "0"])) == {}
    for script in ("dive_k", "speciarl"):
        assert parse(script, ["--freeze-vision", "1"]).freeze_vision == 1
        assert parse(script, ["--freeze-vision", "0"]).freeze_vision == 0


def test_output_paths_follow_one_rule():
    assert lifecycle.default_run_dir("dive_k", "toy") == "runs/dive_k_toy"
    assert lifecycle.default_run_dir("speciarl", "cub") == "runs/speciarl_cub"
    assert lifecycle.default_run_dir("fine_r1", "/data/birds/{split}.jsonl") == "runs/fine_r1_all"
    assert lifecycle.default_run_dir("eval", "my_set.jsonl") == "runs/eval_my_set"
    assert common.eval_dir("runs/x", 30, "base") == "runs/x/eval/step_0000030/base"


def _parser(script) -> argparse.ArgumentParser:
    """The script's ArgumentParser, caught as its parse_args builds it."""
    caught = {}
    real = argparse.ArgumentParser.parse_args

    def grab(self, args=None, namespace=None):
        caught["parser"] = self
        return real(self, args, namespace)
    argparse.ArgumentParser.parse_args = grab
    try:
        parse(script, [])
    finally:
        argparse.ArgumentParser.parse_args = real
    return caught["parser"]


def launch_lines() -> list[tuple[str, str]]:
    """(where, command) of every `torchrun` line that README and the scripts' docstrings print, with backslash
    continuations joined and trailing notes (`# ...`, `(...)`) cut."""
    import ast
    import os
    import re
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    texts = {"README.md": open(os.path.join(root, "README.md")).read()}
    for name in ("dive_k.py", "speciarl.py", "fine_r1.py", "eval.py", "bench.py"):
        texts[name] = ast.get_docstring(ast.parse(open(os.path.join(root, name)).read()))
    found = []
    for where, text in texts.items():
        for match in re.finditer(r"torchrun --(?:[^\n]*\\\n)*[^\n]*", text):
            command = re.sub(r"\\\n", " ", match.group(0))
            command = re.split(r"\s#|\s{2,}\(", command)[0]
            found.append((where, command.rstrip("` ")))
    return found


def test_every_printed_torchrun_line_parses_with_the_installed_torchrun():
    """torchrun's own parser over every launch line (`--nproc` alone is ambiguous since torch 2.x added
    `--nproc-per-node` beside `--nproc_per_node`)."""
    import shlex
    from torch.distributed.run import get_args_parser
    lines = launch_lines()
    assert {where for where, _ in lines} >= {"README.md", "dive_k.py", "speciarl.py", "fine_r1.py", "eval.py",
                                             "bench.py"}
    for where, command in lines:
        args = get_args_parser().parse_args(shlex.split(command)[1:])
        assert args.nproc_per_node == "8", (where, command)
        assert args.training_script in [f"{name}.py" for name in (*PARSERS, "bench")], (where, command)
        script = args.training_script[:-3]
        if script in PARSERS:  # the script's own flags parse too
            PARSERS[script](args.training_script_args)
