"""Robustness across the entry points (issue 8): kills, bad input, batch arithmetic, NaN steps, caches cut by a crash,
a failing rank, the memory estimate. Every case runs on toy / tiny on the CPU, sized to seconds; see each test.

What is shown where (the rest is covered by other files, named here):
  * kill -9 mid-step, then the same command: fine_r1 TAPO end to end (test_kill_mid_step_...); DiVE-k's resume to the
    same parameters is tests/test_dive_k_dist.py::test_resume_reaches_the_same_parameters, the shared checkpoint
    mechanism tests/test_core_distributed.py::test_resume_reaches_same_parameters; SpeciaRL, stopped by the NaN
    guard and rerun, ends at the parameters of a run that never stopped (test_nonfinite_steps_...).
  * kill -9 while a checkpoint is being written: test_kill_while_writing_a_checkpoint_...
  * judge cache cut by a kill: tests/test_judges.py::test_cache_persisted_and_robust (unit) and the SpeciaRL run
    below; the DiVE-k mining cache: test_mining_cache_...
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types
import warnings

import pytest
import torch
from safetensors.torch import load_file

import common
import lifecycle
import data
import memory
import tiny
from conftest import ROOT, torchrun
from fake_datasets import make_cub, not_an_image

WORKER = os.path.join(ROOT, "tests", "robust_worker.py")
FAULTY = os.path.join(ROOT, "tests", "faulty.py")  # runs a method with a fault injected into its loss


def run_entry(args, env=None, timeout=300):
    """`python <args>` from the repo root as a user would run it: one process, no torchrun variables, no fault."""
    return run_entries(args, env=env, timeout=timeout)[0]


def run_entries(*commands, env=None, timeout=300):
    """run_entry for independent commands, side by side (each runs on one thread: the second core works too)."""
    drop = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    full = {k: v for k, v in os.environ.items() if k not in drop}
    full.update({"PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", **(env or {})})
    procs = [subprocess.Popen([sys.executable, *args], cwd=ROOT, env=full, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for args in commands]
    outputs = [p.communicate(timeout=timeout) for p in procs]
    return [subprocess.CompletedProcess(p.args, p.returncode, *output) for p, output in zip(procs, outputs)]


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def tree_bytes(root, skip=("config.json", "config_history.jsonl", ".lock")):
    """Every file under root -> its bytes (to show that a failed start damaged nothing). The two config files and the
    lock are left out: lifecycle.Run locks the directory and records every start's command there, before the
    inputs are read."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            if name not in skip:
                path = os.path.join(folder, name)
                with open(path, "rb") as f:
                    out[os.path.relpath(path, root)] = f.read()
    return out


def previous_run(out):
    """A run folder as an earlier run leaves it (checkpoint, latest, logs, caches)."""
    files = {"latest": "ckpt_0000001\n", "ckpt_0000001/state.json": '{"step": 1}', "metrics.jsonl": '{"step": 1}\n',
             "mcq.jsonl": '{"id": "a"}\n', "judge_cache.jsonl": '{"judge": "rules"}\n'}
    for rel, text in files.items():
        os.makedirs(os.path.dirname(os.path.join(out, rel)), exist_ok=True)
        with open(os.path.join(out, rel), "w") as f:
            f.write(text)
    return tree_bytes(out)


# ----- units: the fault hook, the guard, the memory arithmetic, divisibility, JSONL repair -----

def test_nonfinite_guard_skips_counts_resets_and_stops(tmp_path, capsys):
    guard = lifecycle.NonFiniteGuard(limit=2)
    assert guard.check(1, loss=0.5, grad_norm=torch.tensor(1.0))
    assert not guard.check(2, loss=float("nan"), grad_norm=1.0)
    assert guard.stats() == {"nonfinite/skipped": 1, "nonfinite/in_a_row": 1} and not guard.exhausted
    assert guard.check(3, loss=1.0, grad_norm=2.0) and guard.in_a_row == 0  # a good step ends the streak
    assert not guard.check(4, loss=1.0, grad_norm=torch.tensor(float("inf")))
    assert not guard.check(5, loss=float("-inf"), grad_norm=1.0)
    assert guard.exhausted and guard.stats() == {"nonfinite/skipped": 3, "nonfinite/in_a_row": 2}
    err = capsys.readouterr().err
    assert "step 2: non-finite loss or gradient" in err and "grad_norm=inf" in err
    assert "optimizer step skipped (2 in a row, 3 in all, the run stops at 2 in a row)" in err
    os.makedirs(tmp_path / "ckpt_0000005")
    (tmp_path / "ckpt_0000005" / "state.json").write_text('{"step": 5}')
    (tmp_path / "latest").write_text("ckpt_0000005\n")
    with pytest.raises(SystemExit, match=f"2 optimizer steps in a row .* saved in {tmp_path}/ckpt_0000005"):
        guard.stop(str(tmp_path))
    never = lifecycle.NonFiniteGuard(limit=0)
    for step in range(10):
        never.check(step, loss=float("nan"))
    assert never.skipped == 10 and not never.exhausted


def test_nonfinite_guard_decides_the_same_on_every_rank(tmp_path):
    """A NaN on one rank only skips the step on both (one all-reduce), so DDP / FSDP2 replicas never diverge."""
    torchrun([WORKER, "guard", str(tmp_path)], timeout=180)
    ranks = [json.loads((tmp_path / f"guard_rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert r["decisions"] == [True, False, True, False, True] and r["skipped"] == 2


def test_parallel_auto_and_the_fit_check_before_loading(capsys, monkeypatch):
    """On the 7B shape (meta device: nothing loaded), 8 ranks with 80 GiB each: `--parallel auto` picks FSDP2 (a whole
    replica needs far more), and the sharded estimate fits; one rank cannot fit it and stops with one line naming the
    knobs, or goes on with a warning under --memory-check 0. One rank of the tiny model: ddp."""
    shapes, _ = common.load_model("qwen2.5-vl-7b-random", device=torch.device("meta"), dtype=torch.float32)
    assert next(shapes.parameters()).is_meta
    monkeypatch.setattr(memory, "device_memory", lambda device: 80 * 2 ** 30)
    work = dict(reference=True, rollout_rows=160, prompt_tokens=700, new_tokens=1024, train_rows=4,
                rows_per_prompt=4, activation_checkpointing=True, compute_dtype=torch.bfloat16)
    eight = common.Dist(world_size=8)
    assert memory.report_memory_budget(shapes, eight, parallel="auto", **work) == "fsdp"
    assert "parallel: auto -> fsdp (8 ranks" in capsys.readouterr().out
    assert memory.report_memory_budget(shapes, eight, parallel="ddp", check=False, **work) == "ddp"
    assert "warning: memory: estimated" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        memory.report_memory_budget(shapes, common.Dist(), parallel="auto", **work)
    line = str(stop.value)
    assert re.match(r"memory: estimated 1\d\d\.\d\d GiB per process \(CPU\), more than its 80\.00 GiB", line)
    assert "\n" not in line
    assert "--parallel fsdp over more GPUs" in line and "--memory-check 0" in line
    tiny_shapes, _ = common.load_model("tiny", device=torch.device("meta"))
    assert memory.report_memory_budget(tiny_shapes, common.Dist(world_size=2), parallel="auto", **work) == "ddp"


def test_memory_budget_against_a_hand_count(tiny, capsys):
    model, _ = tiny
    tc = model.config.text_config  # 2 layers, 2 kv heads, head_dim 128 / 4 = 32, hidden 128, intermediate 256
    assert (tc.num_hidden_layers, tc.num_key_value_heads, tc.hidden_size, tc.intermediate_size) == (2, 2, 128, 256)
    n = sum(p.numel() for p in model.parameters())
    one = memory.memory_budget(n_params=n, n_trainable=n // 2, text_config=tc, rollout_rows=10, prompt_tokens=50,
                               new_tokens=14, train_rows=3)
    assert one["parameters"] == 4 * n and one["gradients"] == 4 * (n // 2) and one["optimizer states"] == 8 * (n // 2)
    assert one["frozen reference"] == 0 and one["gathered parameters"] == 0
    assert one["rollout KV cache"] == 2 * 2 * 32 * 2 * 4 * 64 * 10  # layers x kv x head_dim x (K, V) x B x tokens x rows
    assert one["activations"] == 3 * 64 * 4 * 2 * (6 * 128 + 4 * 256)
    shared = memory.memory_budget(n_params=n, n_trainable=n, text_config=tc, prompt_tokens=50, new_tokens=14,
                                  train_rows=3, rows_per_prompt=3)  # the shared prefix: one prompt for 3 rows
    assert shared["activations"] == ((3 * 14 + 50) * 2 * (6 * 128 + 4 * 256)  # + each row's copy of the prompt's K, V
                                     + 3 * 50 * 2 * 128 * 2) * 4
    ckpt = memory.memory_budget(n_params=n, n_trainable=n, text_config=tc, train_rows=3, prompt_tokens=50,
                                new_tokens=14, activation_checkpointing=True)
    assert ckpt["activations"] == 3 * 64 * 4 * (2 * 128 + 6 * 128 + 4 * 256)
    V = tc.vocab_size
    assert one["logits"] == max(3 * 14 * V * (4 + 8), 10 * V * 24)  # rows x new tokens x vocab x bytes (one chunk)
    assert one["load peak"] == 4 * n  # one process: the model as it stays
    fsdp = memory.memory_budget(n_params=n, n_trainable=n, text_config=tc, world_size=4, parallel="fsdp",
                                compute_bytes=2, reference=True, train_rows=2, logit_rows=8, new_tokens=1000)
    assert fsdp["parameters"] == n and fsdp["optimizer states"] == 2 * n and fsdp["frozen reference"] == n
    assert fsdp["gathered parameters"] == 2 * n  # a whole bf16 copy beside the fp32 shards while sampling
    assert fsdp["logits"] == 8 * 1000 * V * (2 + 8)  # all in one chunk at this small vocabulary
    qwen_vocab = type(tc)(**{**tc.to_dict(), "vocab_size": 151936})
    big = memory.memory_budget(n_params=n, n_trainable=n, text_config=qwen_vocab, compute_bytes=2, logit_rows=16,
                               new_tokens=256)
    assert big["logits"] == common.LOGITS_BUDGET * (2 + 8)  # at Qwen's vocabulary: chunks of the budget
    assert fsdp["load peak"] == 4 * n * (1 + 1 / 4)  # the reference loads whole beside the sharded policy
    # printed at start: the total, then each component largest first with what reduces it
    settings = dict(reference=True, rollout_rows=400, prompt_tokens=600, new_tokens=1000, train_rows=2)
    assert memory.report_memory_budget(model, common.Dist(), parallel="ddp", activation_checkpointing=False,
                                       knobs={"rollout KV cache": "--sample-batch"}, **settings) == "ddp"
    budget = memory.memory_budget(n_params=n, n_trainable=n, text_config=tc, **settings)
    out = capsys.readouterr().out
    assert "memory budget per process (CPU), estimated" in out and f"{n:,} parameters" in out
    rows = re.findall(r"^\s+(\d+)\. (.+?)\s+([\d.]+) (GiB|MiB|KiB)\s+<- (.+)$", out, re.M)
    assert "process so far" in [r[1] for r in rows]  # on CPU: the resident memory at the estimate
    rows = [r for r in rows if r[1] != "process so far"]
    steady = {k: v for k, v in budget.items() if k != "load peak"}
    assert [r[1] for r in rows] == sorted((k for k, v in steady.items() if v > 0), key=lambda k: -budget[k])
    assert "while loading:" in out
    assert rows[0][1] == "rollout KV cache" and rows[0][4] == "--sample-batch"  # 400 rows x 1600 tokens dominate


def test_require_divisible_refuses_with_the_numbers_and_a_suggestion():
    lifecycle.require_divisible("--prompts-per-step", 8, 2, "the number of ranks")
    with pytest.raises(SystemExit, match=r"--prompts-per-step = 7 is not divisible by the number of ranks = 2\. "
                                         r"Use a multiple of 2, e.g\. 6 or 8\."):
        lifecycle.require_divisible("--prompts-per-step", 7, 2, "the number of ranks")
    with pytest.raises(SystemExit, match=r"= 1 is not divisible by .* = 4\. Use a multiple of 4, e\.g\. 4\."):
        lifecycle.require_divisible("--rollout-prompts", 1, 4, "the number of ranks")
    with pytest.raises(SystemExit, match=r"--prompts-per-step = 0: must be a positive multiple"):
        lifecycle.require_divisible("--prompts-per-step", 0, 2, "the number of ranks")
    with pytest.raises(SystemExit, match=r"--minibatches = 0: must be at least 1"):
        lifecycle.require_divisible("images per rank", 4, 0, "--minibatches")


def test_repair_jsonl_tail(tmp_path):
    path = str(tmp_path / "cache.jsonl")
    assert common.repair_jsonl_tail(path) == 0  # no file yet
    whole = json.dumps({"a": 1}) + "\n"
    with open(path, "w") as f:
        f.write(whole + '{"a": 2, "b"')  # a kill in the middle of the second record
    assert common.repair_jsonl_tail(path) == len('{"a": 2, "b"')
    assert open(path).read() == whole
    with open(path, "a") as f:
        f.write('{"a": 3}')  # a whole record whose newline never came
    assert common.repair_jsonl_tail(path) == 0 and open(path).read() == whole + '{"a": 3}\n'
    assert common.repair_jsonl_tail(path) == 0 and open(path).read() == whole + '{"a": 3}\n'


def test_a_restart_with_other_settings_is_recorded_and_named(tmp_path, capsys):
    out = str(tmp_path)
    lifecycle.write_run_config(out, {"lr": 1e-6, "steps": 10, "tags": ("a", "b")})
    lifecycle.write_run_config(out, {"lr": 1e-6, "steps": 10, "tags": ("a", "b")})  # the same command again: silent
    assert "changed" not in capsys.readouterr().out
    with open(os.path.join(out, "config_history.jsonl"), "a") as f:
        f.write('{"started": "cut')  # a kill while the history was written
    lifecycle.write_run_config(out, {"lr": 2e-6, "steps": 10, "tags": ("a", "b"), "eval_every": 5})
    said = capsys.readouterr().out
    assert "changed: eval_every None -> 5, lr 1e-06 -> 2e-06" in said and "steps" not in said
    assert json.load(open(os.path.join(out, "config.json"))) == {"lr": 2e-6, "steps": 10, "tags": ["a", "b"],
                                                                 "eval_every": 5}
    history = read_jsonl(os.path.join(out, "config_history.jsonl"))
    assert [h["lr"] for h in history] == [1e-6, 1e-6, 2e-6] and all("started" in h for h in history)


# ----- crashes: a kill while writing a checkpoint, caches cut mid-write -----

def test_kill_while_writing_a_checkpoint_leaves_latest_usable_and_the_tmp_is_cleaned(tmp_path):
    out = tmp_path / "run"
    proc = run_entry([WORKER, "save-kill", str(out)], timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    half = out / "ckpt_0000002.tmp"
    assert half.is_dir() and any(half.iterdir())  # the step-2 shards were being written
    assert (out / "latest").read_text().strip() == "ckpt_0000001"
    assert lifecycle.latest_checkpoint(str(out)) == str(out / "ckpt_0000001")  # the .tmp is never read
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    state = lifecycle.load_checkpoint(lifecycle.latest_checkpoint(str(out)), model, optimizer)
    assert state == {"step": 1, "note": "step one"}
    step1 = torch.load(out / "params_step1.pt", weights_only=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, step1[k]), k
    (out / "ckpt_0000009.tmp").mkdir()  # a stale half-written folder of another step
    lifecycle.save_checkpoint(str(out), 2, model, optimizer, {"note": "again"})  # the next save cleans both
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("ckpt_")) == ["ckpt_0000001", "ckpt_0000002"]
    assert lifecycle.latest_checkpoint(str(out)) == str(out / "ckpt_0000002")


def test_mining_cache_cut_mid_write_is_reused_and_the_cut_image_mined_again(tiny, tmp_path):
    import dive_k
    args = dive_k.parse_args(["--data", "toy", "--mine-samples", "2", "--mine-max-new-tokens", "8",
                              "--mine-batch", "4"])
    args.precision = common.precision_for(args.dtype, common.Dist(), args.parallel)  # what main sets
    train = data.load_dataset("toy", "train", classes="base", limit=4, seed=0)
    # a previous run mined two images, then was killed in the middle of writing the third record
    cached = [{"id": ex.id, "image": ex.image, "truth": ex.class_name, "counts": {}, "n_samples": 2, "n_valid": 0,
               "truth_inserted": True, "padded": True, "status": "kept", "options": [ex.class_name, "cached option"],
               "answer": "A"} for ex in train.examples[:3]]
    with open(tmp_path / "mcq.part0.jsonl", "w") as f:
        f.writelines(json.dumps({"key": r["id"], "value": r}) + "\n" for r in cached[:2])
        f.write(json.dumps({"key": cached[2]["id"], "value": cached[2]})[:60])
    model, processor = tiny
    run = types.SimpleNamespace(out=str(tmp_path), ranks=common.Dist(), log=lifecycle.MetricsLog(str(tmp_path)))
    kept = dive_k.mine_training_set(model, processor, train, train.split_class_names, args, run, fsdp_inputs=None,
                                    log_summary=True)
    records = read_jsonl(tmp_path / "mcq.jsonl")  # every line parses (the new records did not glue onto the cut one)
    assert [r["id"] for r in records] == [ex.id for ex in train.examples]  # all four, in dataset order
    assert records[:2] == cached[:2]  # the cached questions were reused, not mined again
    assert "cached option" not in records[2]["options"] and records[2]["n_samples"] == 2  # the cut one was re-mined
    assert not list(tmp_path.glob("mcq.part*")) and len(kept) == sum(r["status"] == "kept" for r in records)


# ----- bad input: one clear message, a non-zero exit, nothing written before damaged -----

def _break_cub(tmp_path, what):
    base = make_cub(str(tmp_path / what))
    if what == "empty split file":
        open(os.path.join(base, "images.txt"), "w").close()
    elif what == "truncated split file":
        with open(os.path.join(base, "images.txt")) as f:
            lines = f.read().splitlines()
        with open(os.path.join(base, "images.txt"), "w") as f:
            f.write("\n".join(lines[:-1]) + "\n" + lines[-1].split()[0])  # the last line cut after its id
    elif what == "class list that does not match":
        with open(os.path.join(base, "image_class_labels.txt"), "a") as f:
            f.write("1 9\n")  # class 9 is not in classes.txt
    return base


def test_bad_data_and_model_paths_at_every_entry_point(tmp_path, capsys):
    import dive_k
    import eval as eval_lib
    import fine_r1
    import speciarl
    out = str(tmp_path / "run")
    before = previous_run(out)
    # (1) subprocesses, as a user runs them: exit status 1, the message on stderr, no traceback (HF_HUB_OFFLINE is
    # read by huggingface_hub at import: a fresh process)
    proc, offline = run_entries(["eval.py", "--model", str(tmp_path / "no_model"), "--protocol", "open", "--out", out],
                                ["eval.py", "--model", "someone/NoSuchModel-7B", "--protocol", "open"],
                                env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]  # a message, not a crash
    for text in [f"--model {tmp_path / 'no_model'}: no such directory", "Qwen2.5-VL checkpoint directory"]:
        assert text in proc.stderr, (text, proc.stderr[-3000:])
    assert offline.returncode == 1 and "Traceback" not in offline.stderr, offline.stderr[-2000:]
    assert "--model someone/NoSuchModel-7B: cannot load a Qwen2.5-VL checkpoint from it" in offline.stderr
    # (2) in-process main() of each entry point for the other cases (same code path, no interpreter start)
    wrong = tmp_path / "wrong_layout"
    (wrong / "images").mkdir(parents=True)
    json_dir = tmp_path / "mine"
    json_dir.mkdir()
    not_an_image(str(json_dir / "corrupt.jpg"))
    (json_dir / "classes.txt").write_text("red circle\nblue square\n")
    (json_dir / "train.jsonl").write_text(json.dumps({"image": "missing.jpg", "class_name": "red circle"}) + "\n" +
                                          json.dumps({"image": "corrupt.jpg", "class_name": "red circle"}) + "\n")
    not_qwen = tmp_path / "llama"
    not_qwen.mkdir()
    (not_qwen / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "no_config").mkdir()
    unknown_class = tmp_path / "unknown.jsonl"
    unknown_class.write_text(json.dumps({"image": str(json_dir / "corrupt.jpg"), "class_name": "green star"}) + "\n")
    (tmp_path / "classes.txt").write_text("red circle\nblue square\n")
    no_weights = tmp_path / "no_weights"  # a Qwen config and nothing else
    no_weights.mkdir()
    shutil.copy(os.path.join(tiny.tiny_model_dir(), "config.json"), no_weights)
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    run_dir = tmp_path / "a_run"  # a finished run: its own config.json, the model in final/
    (run_dir / "final").mkdir(parents=True)
    (run_dir / "config.json").write_text('{"lr": 0.0001}')
    shutil.copy(os.path.join(tiny.tiny_model_dir(), "config.json"), run_dir / "final")
    cases = [
        (dive_k.main, ["--data", "cub", "--data-root", str(wrong)],
         [f"images.txt not found under --data-root {wrong}", "Expected layout", "image_class_labels.txt"]),
        (speciarl.main, ["--data", "cub", "--data-root", str(tmp_path / "nowhere")],
         [f"--data-root {tmp_path / 'nowhere'} is not a directory", "Expected layout"]),
        (fine_r1.main, ["--data", str(json_dir / "{split}.jsonl"), "--eval-every", "0"],
         ["missing.jpg (missing)", "corrupt.jpg (not an image)", "split 'train' (base classes) has no usable image"]),
        (dive_k.main, ["--data", "cub", "--data-root", _break_cub(tmp_path, "empty split file")],
         "split 'train' (base classes) has no usable image"),
        (speciarl.main, ["--data", "cub", "--data-root", _break_cub(tmp_path, "truncated split file")],
         "images.txt line 40: expected 2 columns, got '40'"),
        (fine_r1.main, ["--data", "cub", "--eval-every", "0",
                        "--data-root", _break_cub(tmp_path, "class list that does not match")],
         "class id 9 is not in classes.txt"),
        (eval_lib.main, ["--model", "tiny", "--data", str(unknown_class), "--protocol", "open"],
         "has class_name 'green star', which is not in the class list"),
        (eval_lib.main, ["--model", str(not_qwen), "--protocol", "open"], "model_type='llama'; this project trains"),
        (eval_lib.main, ["--model", str(tmp_path / "no_config"), "--protocol", "open"], "config.json is missing"),
        (eval_lib.main, ["--model", str(no_weights), "--protocol", "open"],
         f"--model {no_weights}: cannot load a Qwen2.5-VL checkpoint from it (Error no file named model.safetensors"),
        (dive_k.main, ["--data", "toy", "--out", str(a_file)], f"--out {a_file} is a file; expected a run directory"),
        (dive_k.main, ["--data", "toy", "--eval-classes", "base,zzz"],
         "--eval-classes base,zzz: 'zzz' is not a class group; expected a comma list of all, base and novel"),
        (dive_k.main, ["--data", "toy", "--data-root", "/nonexistent"],
         "--data-root /nonexistent: --data toy is generated by this project and reads no folder"),
        (eval_lib.main, ["--model", str(run_dir), "--protocol", "open"],
         f"config.json says model_type=None; this project trains Qwen2.5-VL checkpoints (model_type 'qwen2_5_vl'); "
         f"{run_dir} looks like a run directory: use {run_dir / 'final'}"),
        (eval_lib.main, ["--model", "tiny", "--data", "toy", "--protocol", "open", "--max-new-tokens", "1000000000"],
         "--max-new-tokens 1000000000: expected 1 to 4096, the model's context (max_position_embeddings)"),
        (fine_r1.main, ["--data", "toy", "--cot-source", "teacher", "--teacher", str(not_qwen),
                        "--out", str(tmp_path / "teacher_run")], f"--teacher {not_qwen}: config.json says model_type"),
    ]
    for main, argv, expected in cases:
        with pytest.raises(SystemExit) as e:
            main(argv if "--out" in argv else argv + ["--out", out])
        said = capsys.readouterr().err + str(e.value.code)  # the notes before the stop, then its message
        for text in [expected] if isinstance(expected, str) else expected:
            assert text in said, (argv, text, said)
    assert tree_bytes(out) == before  # the earlier run's checkpoint, logs and caches are untouched


def test_repeated_records_and_classes_smaller_than_shots_are_said(tmp_path, capsys):
    """A JSONL that repeats a record is read once with a note; one image under two classes is refused naming both
    records; --shots above a class's size uses all of its images with a note."""
    (tmp_path / "classes.txt").write_text("red circle\nblue square\n")
    toy = data.load_dataset("toy", "test").examples
    for i, name in enumerate(("a.png", "b.png", "c.png")):
        shutil.copy(toy[i].image, tmp_path / name)
    rec = lambda image, name: json.dumps({"image": image, "class_name": name}) + "\n"  # noqa: E731
    (tmp_path / "repeat.jsonl").write_text(rec("a.png", "red circle") + rec("b.png", "blue square")
                                           + rec("a.png", "red circle") + rec("c.png", "red circle"))
    ds = data.load_dataset(str(tmp_path / "repeat.jsonl"), "test", shots=5)
    assert sorted(os.path.basename(e.image) for e in ds.examples) == ["a.png", "b.png", "c.png"]
    said = capsys.readouterr().out
    assert "1 records repeat an earlier record's image and class; each image is used once" in said
    assert "--shots 5: 2 of 2 classes of repeat.jsonl test have fewer images (fewest 1); all of theirs are used" in said
    (tmp_path / "clash.jsonl").write_text(rec("a.png", "red circle") + rec("b.png", "blue square")
                                          + rec("a.png", "blue square"))
    with pytest.raises(SystemExit, match=r"records 1 and 3 give the image 'a.png' two classes \('red circle', "
                                         r"'blue square'\); expected one class per image"):
        data.load_dataset(str(tmp_path / "clash.jsonl"), "test")


def test_batch_arithmetic_that_does_not_divide_is_refused_at_start(tmp_path):
    import dive_k
    import fine_r1
    import speciarl
    cases = [
        (speciarl.main, ["--rollout-prompts", "4", "--minibatches", "3"],
         "images per rank (--rollout-prompts / ranks) = 4 is not divisible by --minibatches = 3. Use a multiple of 3, "
         "e.g. 3 or 6."),
        (dive_k.main, ["--prompts-per-step", "0"], "--prompts-per-step 0: must be above 0"),
        (fine_r1.main, ["--rollout-batch", "6", "--prompts-per-step", "4"],
         "--rollout-batch = 6 is not divisible by --prompts-per-step = 4. Use a multiple of 4, e.g. 4 or 8."),
    ]
    for i, (main, argv, expected) in enumerate(cases):
        out = tmp_path / str(i)
        with pytest.raises(SystemExit) as e:
            main(["--data", "toy", "--out", str(out)] + argv)
        assert expected in str(e.value.code), e.value.code
        # refused before any stage ran (fine_r1: before CoT/SFT), or at parsing, before the run directory exists
        assert not out.exists() or sorted(os.listdir(out)) == [".lock", "config.json", "config_history.jsonl"]
    # 2 ranks: --prompts-per-step 3 does not split over them; both ranks refuse at once, no rank waits for the other.
    # Rank 0 starts 3 s late, so rank 1 refuses first: torchrun must not stop rank 0 before it has said why.
    late_rank0 = tmp_path / "late_rank0.py"
    late_rank0.write_text("import os, runpy, sys, time\nif os.environ['RANK'] == '0':\n    time.sleep(3)\n"
                          "sys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')\n")
    t0 = time.time()
    proc = torchrun([str(late_rank0), "dive_k.py", "--data", "toy", "--prompts-per-step", "3", "--out",
                     str(tmp_path / "two")], timeout=180, check=False)
    assert proc.returncode != 0  # said once, by rank 0, before the process group started
    assert proc.stderr.count("--prompts-per-step = 3 is not divisible by the number of ranks = 2. Use a multiple of "
                             "2, e.g. 2 or 4.") == 1, proc.stderr
    assert not os.path.exists(tmp_path / "two"), os.listdir(tmp_path / "two")
    print(f"2-rank refusal took {time.time() - t0:.1f}s")


@pytest.mark.parametrize("world", [1, 2, 4, 8, 16])
def test_every_method_starts_with_its_paper_defaults_on_1_to_16_ranks(world, capsys):
    """The README's launch lines: each method's paper batch sizes work out on 1, 2, 4, 8 and 16 ranks. DiVE-k keeps
    the paper's 6 questions per step where it divides and otherwise takes the nearest multiple of the ranks, said at
    start; a value the user set must still divide."""
    import dive_k
    import fine_r1
    import speciarl
    args = dive_k.parse_args(["--data", "cub"])
    per_step = dive_k.prompts_per_step_for(args, world)
    assert per_step == {1: 6, 2: 6, 4: 8, 8: 8, 16: 16}[world] and per_step % world == 0
    if per_step != 6:
        assert f"the preset's 6 does not divide over {world} ranks; using {per_step}" in capsys.readouterr().out
    user = dive_k.parse_args(["--data", "cub", "--prompts-per-step", "6"])
    if world in (4, 8, 16):
        with pytest.raises(SystemExit, match="--prompts-per-step = 6 is not divisible by the number of ranks"):
            dive_k.prompts_per_step_for(user, world)
    speciarl_args = speciarl.parse_args(["--data", "cub"])
    per_rank = speciarl.check_batches(speciarl_args, world)  # SystemExit if it does not divide
    assert per_rank * world == 256 and speciarl_args.minibatches == 2 and per_rank % 2 == 0
    fine_r1.check_batches(fine_r1.parse_args(["--data", "cub"]), ["sft", "tapo"], world)  # SystemExit if not


# ----- a failing rank, a NaN streak, a kill -9 mid-step: end to end on toy -----

SPECIARL = ["speciarl.py", "--data", "toy", "--export-dtype", "fp32",
            "--train-limit", "8", "--rollout-prompts", "2", "--group-size", "2",
            "--minibatches", "1", "--eval-every", "0", "--log-completions", "0", "--save-every", "1"]


def test_one_rank_failing_brings_the_whole_job_down_with_its_error(tmp_path):
    """Rank 1 raises in the middle of step 1; rank 0 is then blocked in a gloo collective (the token count / the DDP
    gradient all-reduce). torchrun sees rank 1 exit, kills rank 0 and exits non-zero showing rank 1's error; the
    subprocess timeout turns a hang into a failure."""
    out = str(tmp_path / "run")
    t0 = time.time()
    proc = torchrun([FAULTY, "raise", "1", "rank=1", "--", *SPECIARL, "--max-new-tokens", "8", "--max-steps", "2",
                     "--out", out], timeout=240, check=False)
    elapsed = time.time() - t0
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "RuntimeError: injected fault (raise 1 rank=1) at step 1 on rank 1" in output
    assert re.search(r"Root Cause \(first observed failure\):.*?rank\s*: 1 \(local_rank: 1\)", output, re.S), output
    assert not os.path.exists(os.path.join(out, "final")) and lifecycle.latest_checkpoint(out) is None
    print(f"the 2-rank job went down {elapsed:.1f}s after its start")


def test_nonfinite_steps_are_skipped_then_the_run_stops_with_a_checkpoint_and_resumes(tmp_path):
    """SpeciaRL, NaN loss at steps 2 and 3, --max-nonfinite 2: step 1 trains, 2 and 3 are skipped (counted, logged),
    the run stops after step 3 with a checkpoint holding step 1's weights; the same command resumes after them and
    ends where a run that skipped the same steps without stopping (--max-nonfinite 0) ends."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    out, never = str(tmp_path / "run"), str(tmp_path / "never_stops")
    argv = [*SPECIARL[1:], "--max-new-tokens", "40", "--max-steps", "4", "--max-nonfinite", "2", "--out", out]
    never_argv = argv[:-3] + ["0", "--out", never]  # ... "--max-nonfinite", "0", "--out", never
    # side by side: the run that stops, and one with the same NaN steps that never stops (compared at the end)
    proc, never_proc = run_entries([FAULTY, "nan", "2-3", "--", "speciarl.py", *argv],
                                   [FAULTY, "nan", "2-3", "--", "speciarl.py", *never_argv])
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "memory budget per process (CPU), estimated" in proc.stdout  # printed at start
    assert "warning: step 2: non-finite loss or gradient" in proc.stderr
    assert ("stopping: 2 optimizer steps in a row had a non-finite loss or gradient norm" in proc.stderr
            and f"saved in {out}/ckpt_0000003" in proc.stderr)
    steps = [r for r in read_jsonl(os.path.join(out, "metrics.jsonl")) if "reward" in r]
    assert [(r["step"], r["nonfinite/skipped"], r["nonfinite/in_a_row"]) for r in steps] == [(1, 0, 0), (2, 1, 1),
                                                                                           (3, 2, 2)]
    assert steps[0]["grad_norm"] > 0 and all(r["grad_norm"] != r["grad_norm"] for r in steps[1:])  # NaN
    saved = {}
    for step in (2, 3):
        dcp_to_torch_save(os.path.join(out, f"ckpt_000000{step}"), str(tmp_path / f"c{step}.pt"))
        saved[step] = torch.load(tmp_path / f"c{step}.pt", weights_only=True)
    for key, value in saved[3]["model"].items():
        assert torch.equal(value, saved[2]["model"][key]) and torch.isfinite(value).all(), key  # no update since
    assert max(v.abs().max() for k, v in saved[3]["model"].items() if k.endswith("lora_B")) > 0  # step 1 trained
    assert {float(s["step"]) for s in saved[3]["optim"]["state"].values()} == {1.0}  # one optimizer step taken
    # the judge cache is cut mid-write (as a kill would), then the same command, without the fault, resumes
    cache = os.path.join(out, "judge_cache.jsonl")
    assert read_jsonl(cache)  # the first run judged answers
    with open(cache, "a") as f:
        f.write('{"judge": "rules-v2:toy", "truth": "red')
    proc = run_entry(["speciarl.py", *argv])
    assert proc.returncode == 0 and f"resumed from {out}/ckpt_0000003 at step 3" in proc.stdout, proc.stderr[-3000:]
    steps = [r for r in read_jsonl(os.path.join(out, "metrics.jsonl")) if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and steps[-1]["grad_norm"] == steps[-1]["grad_norm"]
    # the same NaN steps, never stopping: the same step 4 (same images and samples) and the same final weights
    assert never_proc.returncode == 0, never_proc.stderr[-3000:]
    last = [[r for r in read_jsonl(os.path.join(run, "metrics.jsonl")) if r.get("step") == 4][-1] for run in (out, never)]
    for key in ("reward", "correctness", "completion_tokens", "share/specific", "no_answer_rate"):
        assert last[0][key] == last[1][key], key
    assert last[0]["pg_loss"] == pytest.approx(last[1]["pg_loss"], rel=1e-5, abs=1e-8)
    wa, wb = (load_file(os.path.join(run, "final", "model.safetensors")) for run in (out, never))
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6, rtol=0), k
    with open(cache) as f:
        lines = f.read().splitlines()
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except ValueError:
            assert line.startswith('{"judge": "rules-v2:toy", "truth": "red'), line  # only the cut line
    assert len(parsed) == len(lines) - 1  # new records start on their own line
    keys = [(r["judge"], r["truth"], r["prediction"]) for r in parsed]
    assert len(keys) == len(set(keys))  # pairs already in the cache were not judged (and appended) again


FINE_R1_TAPO = ["fine_r1.py", "--data", "toy", "--export-dtype", "fp32",
                "--stage", "tapo", "--rollout-batch", "2", "--sample-prompts", "2",
                "--prompts-per-step", "1", "--group-size", "2", "--max-new-tokens", "16", "--micro-batch", "4",
                "--logprob-micro-batch", "8", "--max-sample-rounds", "1", "--max-steps", "4", "--save-every", "2",
                "--eval-every", "0"]


def test_kill_mid_step_then_the_same_command_resumes_to_the_same_parameters(tmp_path):
    """fine_r1 TAPO, 2 rollout batches of 2 optimizer steps, a checkpoint after each batch. Killed with SIGKILL in
    the middle of step 3 (after batch 2 was sampled and scored, before its backward), the same command resumes
    from the step-2 checkpoint with the same data (cursor, triplets, sampling seeds) and ends at the parameters of
    a run that was never interrupted."""
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    proc, killed_proc = run_entries([*FINE_R1_TAPO, "--out", full], [FAULTY, "kill", "3", "--", *FINE_R1_TAPO,
                                                                    "--out", killed])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "memory budget (stage tapo) per process (CPU), estimated" in proc.stdout  # printed at start
    proc = killed_proc
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert "faulty.py: injecting kill at step 3 on rank 0" in proc.stderr
    assert lifecycle.latest_checkpoint(os.path.join(killed, "tapo")).endswith("ckpt_0000002")
    assert not os.path.exists(os.path.join(killed, "final"))
    with open(os.path.join(killed, "tapo", "metrics.jsonl"), "a") as f:
        f.write('{"step": 3, "stage": "tapo", "stale": true}\n')  # a step logged after the last checkpoint ...
        f.write('{"step": 4, "stage": "ta')  # ... and a kill in the middle of writing the next record
    proc = run_entry([*FINE_R1_TAPO, "--out", killed])  # the same command again
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {os.path.join(killed, 'tapo', 'ckpt_0000002')} at step 2 (data position 2)" in proc.stdout
    a, b = (read_jsonl(os.path.join(run, "tapo", "metrics.jsonl")) for run in (full, killed))
    assert [r["step"] for r in b] == [1, 2, 3, 4]  # steps 1-2 from the killed run, 3-4 from the resumed one (the
    # cut record dropped: every line parses; the stale step 3, redone, dropped: each step once)
    assert not any(r.get("stale") for r in b)
    last = [next(r for r in rec if r["step"] == 4) for rec in (a, b)]
    assert last[0]["completions"] == last[1]["completions"]  # the same triplets and samples: same data order
    assert last[0]["loss/loss"] == pytest.approx(last[1]["loss/loss"], rel=1e-5, abs=1e-8)
    wa, wb = (load_file(os.path.join(run, "final", "model.safetensors")) for run in (full, killed))
    base = load_file(os.path.join(tiny.tiny_model_dir(), "model.safetensors"))
    assert max((wa[k] - base[k]).abs().max().item() for k in wa) > 1e-6  # training moved the weights
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6, rtol=0), k


def test_run_directory_is_locked_and_the_log_keeps_each_step_once(tmp_path):
    """A second run on the same --out stops at once naming the first one's pid; resuming drops the records of the
    steps it redoes (those after the checkpoint's step; all of them when it starts over)."""
    out = str(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", "import lifecycle, sys, time; "
                               "lifecycle.make_run_dir(sys.argv[1]); print('locked', flush=True); time.sleep(60)", out],
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit, match=rf"--out {re.escape(out)} is in use by another run \(pid {holder.pid}\)"):
            lifecycle.make_run_dir(out)
    finally:
        holder.kill()
        holder.wait()
    lifecycle.make_run_dir(out)  # the kernel released the dead holder's lock
    lifecycle.make_run_dir(out)  # and this process may enter its own directory again
    with pytest.raises(SystemExit, match="is a file; expected a run directory"):
        lifecycle.make_run_dir(str(tmp_path / "run" / ".lock"))
    log = lifecycle.MetricsLog(out)
    for step in (0, 1, 2, 3, 4):
        log.log({"step": step, "loss": float(step)})
    log.resume_at(2)  # checkpoint at step 2: steps 3 and 4 are redone
    assert [r["step"] for r in read_jsonl(log.path)] == [0, 1, 2]
    log.resume_at(0)  # no checkpoint: the run starts over
    assert read_jsonl(log.path) == []


@pytest.mark.parametrize("signame,note", [("SIGINT", "lifecycle.RESUME_NOTE"), ("SIGTERM", "lifecycle.RESUME_NOTE"),
                                          ("SIGINT", "eval.INTERRUPTED")])  # eval.py keeps no checkpoint: says so
def test_ctrl_c_and_sigterm_end_with_one_line(signame, note):
    code = ("import eval, lifecycle, sys, time\n"
            "def main():\n    print('running', flush=True)\n    time.sleep(60)\n"
            f"lifecycle.run_script(main, {note})\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "running"
    proc.send_signal(getattr(signal, signame))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err
    module, name = note.split(".")
    assert err.strip() == "interrupted (rank 0): " + getattr(__import__(module), name)


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"),
                                   RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 512 vs 448")])
def test_a_full_disk_at_any_write_ends_with_one_line(error, capsys):
    """Any write point (an export, a log, a cache) that meets a full disk: one line, not a traceback; other errors
    still raise."""
    def fills(exc):
        def main():
            raise exc
        return main
    with pytest.raises(SystemExit) as e:
        lifecycle.run_script(fills(error))
    assert e.value.code == 1
    assert capsys.readouterr().err.strip() == f"stopped (rank 0): the disk is full ({error}); {lifecycle.RESUME_NOTE} " \
                                              f"once there is space"
    with pytest.raises(RuntimeError, match="something else"):
        lifecycle.run_script(fills(RuntimeError("something else")))


def test_a_full_disk_while_checkpointing_stops_with_one_line_and_keeps_the_last_checkpoint(tiny, tmp_path,
                                                                                        monkeypatch):
    import torch.distributed.checkpoint as dcp
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    out = str(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lifecycle.save_checkpoint(out, 1, model, optimizer, {})
        lifecycle.load_checkpoint(lifecycle.latest_checkpoint(out), model, optimizer)
    assert not [w for w in caught if "torch.distributed" in str(w.message)]  # one process: no dcp warning

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(dcp, "save", full)
    with pytest.raises(SystemExit) as e:
        lifecycle.save_checkpoint(out, 2, model, optimizer, {})
    assert "writing the checkpoint of step 2" in str(e.value.code) and "No space left on device" in str(e.value.code)
    assert f"previous checkpoint ({os.path.join(out, 'ckpt_0000001')}) is intact" in str(e.value.code)
    assert lifecycle.latest_checkpoint(out).endswith("ckpt_0000001") and not os.path.exists(out + "/ckpt_0000002.tmp")


def test_a_run_prints_its_steps_in_order_and_ends_with_its_evaluations(tmp_path, capsys, one_thread):
    """fine_r1's toy SFT, 60 steps: the preset is one short line; a tenth of the step lines are printed (every step is
    in metrics.jsonl); 'eval at step N' comes right before the line of step N; the run ends with the first -> last
    value of each evaluation; a progress bar draws nothing into output that is not a terminal (pytest's capture)."""
    import fine_r1
    out = str(tmp_path / "run")
    flags = ["--data", "toy", "--out", out, "--sft-epochs", "1", "--sft-batch", "4", "--sft-micro-batch", "4",
             "--eval-limit", "4", "--threads", "1"]
    fine_r1.main(flags + ["--stage", "cot"])
    capsys.readouterr()
    fine_r1.main(flags + ["--stage", "sft"])
    printed = capsys.readouterr()
    lines = printed.out.splitlines()
    preset = [line for line in lines if "preset for the" in line]
    where = os.path.join(out, "config.json")
    assert len(preset) == 1 and where in preset[0] and len(preset[0]) - len(where) < 80
    steps = [line.split()[3] for line in lines if line.startswith("fine_r1 sft step ")]
    assert steps == ["1/60"] + [f"{s}/60" for s in range(6, 61, 6)]
    assert len(read_jsonl(os.path.join(out, "sft", "metrics.jsonl"))) == 61  # step 0's evaluation and 60 steps
    evals = [i for i, line in enumerate(lines) if line.startswith("eval at step ")]
    assert [lines[i].split()[3] for i in evals] == ["0:", "60:"]
    assert lines[evals[1] + 1].startswith("fine_r1 sft step 60/60 ")  # the step's line right after its evaluation
    summary = lines.index("evaluations, first -> last:")
    first, last = (read_jsonl(os.path.join(out, "sft", "metrics.jsonl"))[i] for i in (0, -1))
    assert lines[summary + 1].split() == ["mcq/seen", f"{first['eval/mcq/seen']:.3f}", "(sft", "step", "0)", "->",
                                          f"{last['eval/mcq/seen']:.3f}", "(sft", "step", "60)"]
    assert "\x1b[A" not in printed.err and "img/s" not in printed.err  # no bar drawn
