"""
lifecycle.py: the life of a training run, written once for the three methods (and each Fine-R1 stage): the process
group, locked run directory, config.json and seeds; the policy loaded after the memory estimate on its shapes; resume;
the step loop's logging, evaluation and save cadence; one optimizer step over micro-batches (the loss stays in the
method); atomic sharded checkpoints with every rank's RNG; the <out>/final export; the rewards' one signature; the
shared flags; NaN / inf steps skipped on every rank together; Ctrl-C and a full disk ending a run with one line.

    run = lifecycle.Run(args, "dive_k")
    model, processor, reference = run.load_policy(args.model, trainable=..., estimate=..., reference=args.beta > 0)
    optimizer = lifecycle.adamw(model, args.lr, args.weight_decay)
    start = run.resume(model, optimizer, evaluate)["step"]
    for step in run.steps(start, total_steps):
        ...                                                       # the method's step
        run.end_step(step + 1, record, model, optimizer, {"data_position": ...}, evaluate)
    run.finish(model, processor)
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import math
import os
import pathlib
import random
import shutil
import sys
import tempfile
import time
import warnings
from collections import Counter
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist

import common
import memory
from common import (DTYPES, Dist, _fsdp_modules, all_reduce_sum, barrier, cleanup_distributed, init_distributed,
                    print0, progress_bar, read_jsonl, repair_jsonl_tail, seed_everything, unwrap)

# ----- 1. Rewards: one signature in every method -----
def parse_rewards(spec: str, registry: dict[str, Callable]) -> dict[str, float]:
    """--rewards "format,mcq=2" -> {"format": 1.0, "mcq": 2.0}: names from the method's REWARDS, weights default 1."""
    weights = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, weight = (s.strip() for s in item.partition("="))
        if name not in registry:
            raise SystemExit(f"--rewards {spec}: unknown reward {name!r}; known: {', '.join(sorted(registry))}")
        try:
            weights[name] = float(weight) if weight else 1.0
        except ValueError:
            raise SystemExit(f"--rewards {spec}: the weight of {name} is {weight!r}, not a number") from None
    if not weights:
        raise SystemExit(f"--rewards {spec!r}: name at least one of {', '.join(sorted(registry))}")
    return weights

def group_rewards(registry: dict[str, Callable], weights: dict[str, float], completions: list[str],
                  example: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One group's rewards: the weighted sum [G] and each named reward [G] (each function called once per group)."""
    parts = {}
    for name in weights:
        values = registry[name](completions, example)
        if len(values) != len(completions):
            raise ValueError(f"reward {name!r} gave {len(values)} values for {len(completions)} completions")
        parts[name] = torch.tensor(values, dtype=torch.float32)  # [G]
    return sum(weight * parts[name] for name, weight in weights.items()), parts

# ----- 2. The update: one optimizer step over micro-batches -----
def update(model, optimizer, guard: NonFiniteGuard, step: int, micro_batches: Sequence, loss_of: Callable,
           *, grad_clip: float, precision) -> tuple[float, Counter]:
    """`loss_of(rows)` -> (loss, stats) accumulated over the micro-batches; the step is taken unless the guard finds NaN
    / inf on any rank. Returns (gradient norm, the summed stats and "loss" as 0-d tensors: no host read per batch)."""
    optimizer.zero_grad(set_to_none=True)
    sums = Counter()
    for k, rows in enumerate(micro_batches):
        common.grad_sync(model, k == len(micro_batches) - 1)
        with precision.context():
            loss, stats = loss_of(rows)
        loss.backward()
        sums.update({**{name: value.detach() for name, value in stats.items()}, "loss": loss.detach()})
    common.grad_sync(model, True)
    grad_norm = common.clip_gradients([p for p in model.parameters() if p.requires_grad], grad_clip)
    if guard.check(step, loss=sums["loss"], grad_norm=grad_norm):
        optimizer.step()
    else:  # skipped: weights and optimizer state stay those of the last good step
        optimizer.zero_grad(set_to_none=True)
    return grad_norm, sums

def adamw(model, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW on the trainable parameters; 1-D ones (norm weights, biases) get no weight decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)

# ----- 3. The run -----
class Run:
    """One training run (or one stage of Fine-R1's, `run.stage("sft")`): where it writes, its log, timer and guard."""

    def __init__(self, args, script: str, out: str | None = None, ranks: Dist | None = None, parent: Run | None = None):
        if ranks is None:  # the process group, the locked run directory with config.json, threads, seeds
            ranks, out = init_distributed(), args.out or default_run_dir(script, args.data)
            if ranks.is_main:
                make_run_dir(out)
                write_run_config(out, {**vars(args), "world_size": ranks.world_size})
            barrier()
            configure_threads(args.threads, ranks)
            seed_everything(args.seed + ranks.rank)  # every rank differently
            if args.activation_checkpointing is None:
                args.activation_checkpointing = int(ranks.device.type == "cuda")
        self.args, self.ranks, self.out, self.script = args, ranks, out, script
        os.makedirs(out, exist_ok=True)
        self.log = MetricsLog(out, None if parent else args.wandb, vars(args))
        if parent is not None:  # a stage logs to its own metrics.jsonl and to the run's wandb run
            self.log.wandb = parent.log.wandb
        self.times: Counter = Counter()  # seconds per phase since the last record (self.timer)
        self.guard = NonFiniteGuard(args.max_nonfinite, device=ranks.device)  # NaN / inf steps skipped, counted, capped
        self.last_step, self.first, self.total, self.bar, self.t_step = 0, 0, 0, None, 0.0

    def stage(self, name: str) -> Run:
        """A stage with its own folder <out>/<name> (checkpoints, metrics.jsonl), in the same process group."""
        return Run(self.args, f"{self.script} {name}", os.path.join(self.out, name), self.ranks, parent=self)

    def load_policy(self, path: str, *, trainable: Callable, estimate: Callable, reference: bool = False,
                    trained_weights: bool = True, min_pixels: int | None = None, max_pixels: int | None = None):
        """(policy, processor, frozen reference or None). First the memory estimate on the model's shapes alone
        (`estimate(processor)` -> the method's memory.report_memory_budget arguments), which resolves --parallel auto
        and stops a run that would not fit; `trainable(model)` freezes what does not train (or adds LoRA)."""
        args, ranks = self.args, self.ranks
        pixels = dict(min_pixels=args.min_pixels if min_pixels is None else min_pixels,
                      max_pixels=args.max_pixels if max_pixels is None else max_pixels)
        args.precision = common.precision_for(args.dtype, ranks, args.parallel, trained_weights)
        shapes, processor = common.load_model(path, device=torch.device("meta"), dtype=args.precision.weights, **pixels)
        trainable(shapes)
        args.parallel = memory.report_memory_budget(
            shapes, ranks, parallel=args.parallel, reference=reference, compute_dtype=args.precision.compute,
            activation_checkpointing=bool(args.activation_checkpointing), check=bool(args.memory_check),
            image_tokens=memory.image_tokens(processor), **estimate(processor))
        args.precision = common.precision_for(args.dtype, ranks, args.parallel, trained_weights)
        print0(f"precision: {args.precision}")
        loading = dict(device=ranks.device, dtype=args.precision.weights, attn=args.attn, **pixels)
        model, processor = common.load_model(path, **loading)
        what = trainable(model)
        n_trained, n_all = (sum(p.numel() for p in model.parameters() if p.requires_grad or not only)
                            for only in (True, False))
        print0(f"trainable parameters: {n_trained:,} of {n_all:,} ({100 * n_trained / n_all:.2f}%)"
               + (f"; {what}" if isinstance(what, str) else ""))
        model = common.wrap_model(model, ranks, args.parallel, bool(args.activation_checkpointing),
                           param_dtype=args.precision.fsdp_param_dtype)  # sharded before the reference loads
        ref = None
        if reference:  # the policy's twin: same weights dtype, wrapping and compute, so the KL starts at 0 exactly
            ref, _ = common.load_model(path, **loading)
            ref.requires_grad_(False).eval()
            if args.parallel == "fsdp":
                ref = common.wrap_model(ref, ranks, "fsdp", param_dtype=args.precision.fsdp_param_dtype)
        return model, processor, ref

    def resume(self, model, optimizer, evaluate: Callable | None = None) -> dict:
        """The state of <out>/latest (model, optimizer and RNG restored) or {"step": 0}; a new run (or one whose
        evaluation a stop cut short) evaluates first: the baseline of the run."""
        ckpt = latest_checkpoint(self.out)
        state = load_checkpoint(ckpt, model, optimizer) if ckpt else {"step": 0}
        if ckpt:
            position = f" (data position {state['data_position']})" if "data_position" in state else ""
            print0(f"resumed from {ckpt} at step {state['step']}{position}")
        self.log.resume_at(state["step"])  # the steps about to be redone are logged once
        first = state["step"] == 0 and self.args.initial_eval
        if evaluate is not None and self.args.eval_every and (first or state.get("eval_pending")):
            with self.timer("eval"):
                record = {"step": state["step"], **evaluate(state["step"])}
            self.log.log({**record, **self.pop_times()})
        return state

    def steps(self, start: int, total: int, stride: int = 1):
        self.total, self.last_step, self.first = total, start, start
        self.bar = progress_bar(self.ranks.is_main, total=total, initial=start, desc=self.script)
        for step in range(start, total, stride):
            self.t_step = time.perf_counter()
            yield step
        if self.bar is not None:
            self.bar.close()

    def due(self, every: int, step: int) -> bool:
        """Whether a cadence of `every` steps falls in (last step, step], or the run ends at `step`."""
        return step >= self.total or bool(every) and step // every > self.last_step // every

    @contextlib.contextmanager
    def timer(self, phase: str):
        """`with run.timer("x"):` adds its wall time to the step's "time/x" (synchronised on GPU: honest numbers)."""
        sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
        sync()
        start = time.perf_counter()
        yield
        sync()
        self.times[f"time/{phase}"] += time.perf_counter() - start

    def pop_times(self) -> dict[str, float]:
        times, self.times = dict(self.times), Counter()
        return times

    def end_step(self, step: int, record: dict, model, optimizer, state: dict, evaluate: Callable | None = None,
                 shown: Sequence[str] = ()):
        """Log the step, evaluate and save on their cadence, show progress; a non-finite streak saves and stops."""
        record = {"step": step, **record, **self.guard.stats(), **mean_over_ranks(self.pop_times()),
                  "time/step": time.perf_counter() - self.t_step}
        if evaluate is not None and self.args.eval_every and self.due(self.args.eval_every, step):
            try:
                with self.timer("eval"):
                    record.update(evaluate(step))
            except SystemExit:  # an evaluation that stops the run (a judge server gone) keeps the step's record
                self.log.log(record)
                raise
            record.update(self.pop_times())
        self.log.log(record)
        summary = "  ".join(f"{k.split('/')[-1]} {record[k]:.3f}" for k in shown if k in record)
        if self.bar is not None and not self.bar.disable:
            self.bar.set_postfix_str(summary)
            self.bar.update(step - self.last_step)
        elif self.last_step == self.first or step >= self.total or self.due(max(1, self.total // 10), step):
            print0(f"{self.script} step {step}/{self.total}  {summary}  {record['time/step']:.1f}s")
        if self.due(self.args.save_every, step) or self.guard.exhausted:
            with self.timer("checkpoint"):
                save_checkpoint(self.out, step, model, optimizer, state)
        if self.guard.exhausted:  # --max-nonfinite steps in a row: stop with a message (checkpoint saved above)
            self.guard.stop(self.out)
        self.last_step = step

    def finish(self, model, processor, keys: list[str] | None = None):
        path = os.path.join(self.out, "final")
        export_hf(model, processor, path, dtype=self.args.export_dtype)
        print_eval_summary([os.path.join(self.out, "metrics.jsonl")], keys)
        print0(f"{self.script}: done; model exported to {path}")

# ----- 4. Flags declared once (eval.py shares the model and system ones), each script's paper values passed in -----
def add_model_args(parser, *, model: str = "tiny", min_pixels: int = 3136, max_pixels: int = 401408):
    """The model, data and system flags of every script, eval.py's included; returns the "system" group."""
    g = parser.add_argument_group("model and data")
    g.add_argument("--model", default=model, help="hub id, local Qwen2.5-VL directory (e.g. an export), 'tiny' (built "
                   "locally), or a random preset: qwen2.5-vl-3b-random / qwen2.5-vl-7b-random (default %(default)s)")
    g.add_argument("--data", default="toy", help="dataset name (toy, cub, flowers, pets, cars, aircraft, dogs, food) "
                   "or a JSON/JSONL file of {image, class_name} records (default %(default)s)")
    g.add_argument("--data-root", default=None, help="the dataset folder in its official layout")
    g = parser.add_argument_group("system")
    g.add_argument("--dtype", default="auto", choices=DTYPES, help="auto: on GPU bf16 compute over fp32 weights that "
                   "train and bf16 frozen ones (eval.py), on CPU fp32; bf16-mixed: fp32 weights, bf16 compute on any "
                   "device; bf16 / fp32: weights and compute")
    g.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"], help="attention kernel")
    g.add_argument("--compile-decode", type=int, default=0, choices=[0, 1], help="decode with a static KV cache and a "
                   "torch.compile'd step (CUDA graphs on GPU); one GPU or DDP, not with flash_attention_2")
    g.add_argument("--min-pixels", type=int, default=min_pixels, help="image pixel budget, lower bound")
    g.add_argument("--max-pixels", type=int, default=max_pixels, help="image pixel budget, upper bound")
    g.add_argument("--threads", type=int, default=None, help="CPU threads per process (default: the cores not busy "
                   "with other work, shared by the ranks); ignored on GPU")
    return g

def add_training_args(parser, *, model: str, group_size: int, rewards: str, lr: float, lr_schedule: str,
                      beta: float | None, max_new_tokens: int, micro_batch: int, eval_every: int, save_every: int,
                      weight_decay: float = 0.0, grad_clip: float = 1.0, temperature: float = 1.0, top_p: float = 1.0,
                      eval_max_new_tokens: int | None = None, eval_batch: int = 8, log_completions: int = 2,
                      train_limit: int | None = None):
    """Every flag of the three training scripts, the method's paper values as defaults (parse_flags adds the toy's)."""
    g = add_model_args(parser, model=model)
    g.add_argument("--parallel", choices=["auto", "ddp", "fsdp"], default="auto", help="DDP or FSDP2 under torchrun; "
                   "auto: FSDP2 when several ranks train and a whole replica per GPU would not fit (said at start)")
    g.add_argument("--memory-check", type=int, default=1, choices=[0, 1], help="1: a run whose memory estimate "
                   "exceeds the device's memory stops before loading; 0: warn and go on")
    g.add_argument("--shared-prefix", type=int, default=1, choices=[0, 1], help="score and update each group's "
                   "prompt once for its G completions (common.score_completions; exact); 0 = once per completion")
    g.add_argument("--activation-checkpointing", type=int, default=None,
                   help="recompute activations in the backward (default: on for GPU, off for CPU)")
    g.add_argument("--export-dtype", default="bf16", choices=list(EXPORT_DTYPES), help="weights of the exported "
                   "final/ model: bf16 (as hub checkpoints) or fp32 (an exact copy of fp32 master weights)")
    g.add_argument("--wandb", default=None, metavar="PROJECT", help="also log to this wandb project")
    g.add_argument("--max-nonfinite", type=int, default=5, help="optimizer steps in a row with a NaN / inf loss or "
                   "gradient (each one skipped) that stop the run with a checkpoint (0 = never stop)")
    g = parser.add_argument_group("run")
    g.add_argument("--out", default=None, help="run directory; rerunning the same command resumes from it")
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (optimizer steps; "
                   "SpeciaRL: rollout batches)")
    g.add_argument("--seed", type=int, default=42, help="global seed (data order, sampling)")
    g.add_argument("--group-size", type=int, default=group_size, help="completions per prompt (G)")
    g = parser.add_argument_group("training (shared by the three methods)")
    g.add_argument("--train-limit", type=int, default=train_limit, help="use at most this many training images (a "
                   "seeded subset; %(default)s = all)")
    g.add_argument("--rewards", default=rewards, help="NAME[=WEIGHT],... from the script's REWARDS registry, weights "
                   "default 1 (default %(default)s)")
    g.add_argument("--temperature", type=float, default=temperature, help="rollout temperature (%(default)s)")
    g.add_argument("--top-p", type=float, default=top_p, help="rollout nucleus sampling (%(default)s; 1 = off)")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="rollout length cap (%(default)s)")
    g.add_argument("--micro-batch", type=int, default=micro_batch, help="completions per forward / backward "
                   "(gradient accumulation; %(default)s)")
    if beta is not None:  # (Fine-R1's TAPO has no KL to a reference)
        g.add_argument("--beta", type=float, default=beta, help="weight of the KL to the frozen initial model; 0 "
                       "builds no reference (%(default)s)")
    g.add_argument("--lr", type=float, default=lr, help="AdamW learning rate (%(default)s)")
    g.add_argument("--lr-schedule", default=lr_schedule, choices=["constant", "linear", "cosine"],
                   help="decay to 0 over the run after the warm-up (%(default)s)")
    g.add_argument("--warmup-steps", type=int, default=0, help="linear learning-rate warm-up steps (%(default)s)")
    g.add_argument("--weight-decay", type=float, default=weight_decay, help="AdamW weight decay (%(default)s)")
    g.add_argument("--grad-clip", type=float, default=grad_clip, help="max global gradient norm (%(default)s; 0 = off)")
    g = parser.add_argument_group("evaluation, logging, checkpoints")
    g.add_argument("--eval-every", type=int, default=eval_every, help="evaluate every N steps, at the start and at "
                   "the end (%(default)s; 0 = never)")
    g.add_argument("--initial-eval", action=argparse.BooleanOptionalAction, default=True,
                   help="evaluate the starting model before step 1 (--no-initial-eval skips that baseline)")
    g.add_argument("--eval-limit", type=int, default=None, help="evaluate at most this many images per group")
    g.add_argument("--eval-max-new-tokens", type=int, default=eval_max_new_tokens or max_new_tokens,
                   help="evaluation answer length cap (%(default)s)")
    g.add_argument("--eval-batch", type=int, default=eval_batch, help="images per evaluation sampling call (memory "
                   "knob; %(default)s)")
    g.add_argument("--save-every", type=int, default=save_every, help="checkpoint every N steps (%(default)s; 0 = only "
                   "at the end)")
    g.add_argument("--log-completions", type=int, default=log_completions, help="sampled completions logged per "
                   "step with their rewards (metrics.jsonl; SpeciaRL: rollouts.jsonl; %(default)s)")

def parse_flags(parser, argv, toy: dict, registry: dict[str, Callable]):
    """Parse the command line; `--data toy` lays the `toy` preset over the paper's defaults (a flag given on the
    command line wins). `args.explicit` names the flags the user gave; `args.reward_weights` is --rewards parsed."""
    args = parser.parse_args(argv)
    if args.data == "toy":
        parser.set_defaults(**toy)
        args = parser.parse_args(argv)
    unset = object()
    given = parser.parse_args(argv, argparse.Namespace(**{a.dest: unset for a in parser._actions}))
    args.explicit = sorted(k for k, v in vars(given).items() if v is not unset)
    args.reward_weights = parse_rewards(args.rewards, registry)
    check_system_flags(args)
    return args

# ----- 5. Checkpoints and export -----
def _atomic_write_text(path: str, text: str):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

def save_checkpoint(out_dir: str, step: int, model, optimizer, extra: dict):
    """Everything to continue exactly: sharded model + optimizer (torch.distributed.checkpoint, DDP and FSDP2), every
    rank's RNG, the step and the method's `extra` state; written to a .tmp folder, renamed, and only then is `latest`
    pointed at it, so a kill at any moment leaves the previous checkpoint usable. The last two are kept."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    d_rank = dist.get_rank() if dist.is_initialized() else 0
    final = os.path.join(out_dir, f"ckpt_{step:07d}")
    tmp = final + ".tmp"
    if d_rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp, exist_ok=True)
    barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    try:
        _quiet_dcp(dcp.save, {"model": model_sd, "optim": optim_sd}, tmp)
        name, key, *rest = np.random.get_state()  # plain values and tensors: they load with weights_only=True
        rng = {"python": random.getstate(), "numpy": [name, key.tolist(), *rest], "torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
        torch.save({"rng": rng}, os.path.join(tmp, f"rng_rank{d_rank}.pt"))
        if d_rank == 0:
            pathlib.Path(tmp, "state.json").write_text(json.dumps({"step": step, **extra}))
    except (OSError, RuntimeError) as e:  # a full disk shows as OSError or as a RuntimeError from the writer
        shutil.rmtree(tmp, ignore_errors=True)
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise SystemExit(f"writing the checkpoint of step {step} to {tmp} failed ({reason}); is the disk full? The "
                         f"previous checkpoint ({latest_checkpoint(out_dir) or 'none yet'}) is intact: free some "
                         f"space and rerun the same command to resume from it") from None
    barrier()
    if d_rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _atomic_write_text(os.path.join(out_dir, "latest"), os.path.basename(final) + "\n")
        for stale in glob.glob(os.path.join(out_dir, "ckpt_*.tmp")):  # half-written by a killed run: never read
            shutil.rmtree(stale, ignore_errors=True)
        for old in sorted(glob.glob(os.path.join(out_dir, "ckpt_*")))[:-2]:
            if not old.endswith(".tmp") and old != final:
                shutil.rmtree(old, ignore_errors=True)
    barrier()

def _quiet_dcp(save_or_load: Callable, state: dict, path: str):
    """dcp.save / dcp.load without the noise of a one-process run ("torch.distributed is disabled ... assuming ...")."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        save_or_load(state, checkpoint_id=path)

def latest_checkpoint(out_dir: str) -> str | None:
    latest = pathlib.Path(out_dir, "latest")
    ckpt = os.path.join(out_dir, latest.read_text().strip()) if latest.exists() else None
    return ckpt if ckpt and os.path.exists(os.path.join(ckpt, "state.json")) else None

def load_checkpoint(ckpt: str, model, optimizer) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model_sd, optim_sd = get_state_dict(model, optimizer)
    _quiet_dcp(dcp.load, {"model": model_sd, "optim": optim_sd}, ckpt)  # in place
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    d_rank = dist.get_rank() if dist.is_initialized() else 0
    rng_file = os.path.join(ckpt, f"rng_rank{d_rank}.pt")
    if os.path.exists(rng_file):
        rng = torch.load(rng_file, weights_only=True)["rng"]
        version, internal, gauss = rng["python"]
        random.setstate((version, tuple(internal), gauss))  # (a list in older checkpoints)
        np.random.set_state(tuple(rng["numpy"]))
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return json.loads(pathlib.Path(ckpt, "state.json").read_text())

def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The full (unsharded) model state on CPU: rank 0 gets every tensor, other ranks get {} under FSDP2."""
    if _fsdp_modules(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}

EXPORT_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}  # --export-dtype
STOCK_PROCESSOR = "Qwen2_5_VLProcessor"  # the processor class a hub Qwen2.5-VL checkpoint names

def export_hf(model, processor, path: str, dtype: str = "bf16"):
    """A hub Qwen2.5-VL checkpoint (for transformers, vLLM, eval.py, load_model) in `dtype`, with the run's pixel
    budget. Collective under FSDP2 (every rank calls it); written to a .tmp folder, then renamed."""
    sd = full_state_dict(model)
    if int(os.environ.get("RANK", 0)) == 0:
        tmp = path.rstrip("/") + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        hf = unwrap(model)
        # tied weights are stored once (Qwen2.5-VL-3B's lm_head is its input embedding)
        ties = [getattr(config, "tie_word_embeddings", False) for config in (hf.config, hf.config.get_text_config())]
        skipped = set(getattr(hf, "_tied_weights_keys", None) or []) if any(ties) else set()
        torch_dtype = EXPORT_DTYPES[dtype]
        sd = {k: (v.to(torch_dtype) if v.is_floating_point() else v) for k, v in sd.items() if k not in skipped}
        hf.save_pretrained(tmp, state_dict=sd, safe_serialization=True)
        _set_json(os.path.join(tmp, "config.json"), dtype=str(torch_dtype).replace("torch.", ""))
        processor.save_pretrained(tmp)
        # the image-only subclass's files (processor_config.json naming it, chat_template.jinja) become a hub
        # checkpoint's: preprocessor_config.json naming Qwen2_5_VLProcessor, chat_template.json, the tokenizer's copy
        written, jinja = pathlib.Path(tmp, "processor_config.json"), pathlib.Path(tmp, "chat_template.jinja")
        image, template = json.loads(written.read_text())["image_processor"], jinja.read_text()
        written.unlink()
        jinja.unlink()
        _write_json(os.path.join(tmp, "preprocessor_config.json"), {
            **image, "min_pixels": image["size"]["shortest_edge"], "max_pixels": image["size"]["longest_edge"],
            "processor_class": STOCK_PROCESSOR})
        _write_json(os.path.join(tmp, "chat_template.json"), {"chat_template": template})
        _set_json(os.path.join(tmp, "tokenizer_config.json"), processor_class=STOCK_PROCESSOR, chat_template=template)
        umask = os.umask(0)
        os.umask(umask)
        for name in os.listdir(tmp):  # safetensors writes 0600; every file readable as the others (0644 usually)
            os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    barrier()

def _write_json(path: str, doc: dict):
    pathlib.Path(path).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")

def _set_json(path: str, **values):
    _write_json(path, {**json.loads(pathlib.Path(path).read_text()), **values})

# ----- 6. Logging, the run directory, flags -----
class MetricsLog:
    """Appends one JSON object per step to <out>/metrics.jsonl (rank 0), mirrors to wandb when asked and installed."""

    def __init__(self, out_dir: str, wandb_project: str | None = None, config: dict | None = None):
        self.is_main = int(os.environ.get("RANK", 0)) == 0
        self.path = os.path.join(out_dir, "metrics.jsonl")
        if self.is_main:  # a record cut by a crash would glue onto the first record of the resumed run
            repair_jsonl_tail(self.path)
        self.wandb = None
        if self.is_main and wandb_project:
            try:
                import wandb
            except ImportError:
                raise SystemExit("--wandb given but the wandb package is not installed (pip install wandb)")
            self.wandb = wandb.init(project=wandb_project, config=config, dir=out_dir)

    def resume_at(self, step: int):
        """Drop the records of the steps a resumed run redoes (after `step`; all at step 0): each step logged once."""
        if not self.is_main or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            lines = f.readlines()  # split at "\n" only
        redone = lambda s: isinstance(s, (int, float)) and (s > step or step == 0)  # noqa: E731
        keep = [line for line in lines if not redone(json.loads(line).get("step"))]
        if len(keep) < len(lines):
            _atomic_write_text(self.path, "".join(keep))
            print0(f"{self.path}: {len(lines) - len(keep)} records of steps after {step} dropped (they are redone)")

    def log(self, record: dict):
        if not self.is_main:
            return
        clean = {k: (float(v) if isinstance(v, (np.floating, torch.Tensor)) else v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in clean.items() if isinstance(v, (int, float))}, step=clean.get("step"))

def print_eval_summary(logs: list[str], keys: list[str] | None = None):
    """Each evaluation number in `logs` (`keys`, default every eval/ one), first -> last: the run's before -> after."""
    first, last = {}, {}
    for path in logs:
        for r in (read_jsonl(path) if int(os.environ.get("RANK", 0)) == 0 and os.path.exists(path) else []):
            for k, v in r.items():
                if (k in keys if keys else k.startswith("eval/") and not k.endswith("_n")) and isinstance(v, float):
                    at = f"{r['stage']} step {r['step']}" if "stage" in r else f"step {r['step']}"
                    first.setdefault(k, (at, v))
                    last[k] = (at, v)
    if first:
        print0("evaluations, first -> last:\n" + "\n".join(
            f"  {k[5:]:24} {first[k][1]:.3f} ({first[k][0]}) -> {last[k][1]:.3f} ({last[k][0]})" for k in first))

def lr_at(step: int, *, base_lr: float, total_steps: int, schedule: str = "constant", warmup_steps: int = 0) -> float:
    """Learning rate of optimizer step `step` (0-based), as the Hugging Face schedulers give it: linear warm-up from 0,
    then constant, or a linear / cosine decay to 0 over the remaining steps.
    >>> [round(lr_at(s, base_lr=1.0, total_steps=8, schedule="cosine", warmup_steps=2), 3) for s in range(4)]
    [0.0, 0.5, 1.0, 0.933]"""
    if warmup_steps and step < warmup_steps:
        return base_lr * step / warmup_steps
    if schedule == "constant":
        return base_lr
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return base_lr * (1.0 - progress)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine

def set_lr(optimizer, lr: float):
    for group in optimizer.param_groups:
        group["lr"] = lr

def write_run_config(out: str, config: dict):
    """<out>/config.json = this start's settings, also appended to config_history.jsonl. A resumed run says which
    settings changed (and resumes all the same: a new learning rate or evaluation cadence mid-run is legitimate)."""
    config = json.loads(json.dumps(config))  # tuples -> lists, as they read back
    path = os.path.join(out, "config.json")
    try:
        before = json.loads(pathlib.Path(path).read_text())
    except (OSError, ValueError):
        before = None
    if isinstance(before, dict):
        changed = [k for k in sorted(set(before) | set(config)) if before.get(k) != config.get(k)]
        if changed:
            print0(f"{out} was started before with other settings (all starts: config_history.jsonl); changed: "
                   + ", ".join(f"{k} {before.get(k)!r} -> {config.get(k)!r}" for k in changed))
    _atomic_write_text(path, json.dumps(config, indent=1))
    repair_jsonl_tail(os.path.join(out, "config_history.jsonl"))
    with open(os.path.join(out, "config_history.jsonl"), "a") as f:
        f.write(json.dumps({"started": time.strftime("%Y-%m-%dT%H:%M:%S"), **config}) + "\n")

_RUN_LOCKS: dict[str, Any] = {}  # run directory -> the open lock file this process holds (until it exits)

def make_run_dir(out: str):
    """Create --out and hold <out>/.lock while this process lives (flock: the kernel releases it even on kill -9): a
    second run on the same --out, or an --out that is a file or unwritable, stops at once with one line. Rank 0 only."""
    import atexit
    import fcntl
    if os.path.exists(out) and not os.path.isdir(out):
        raise SystemExit(f"--out {out} is a file; expected a run directory (new, or one to resume)")
    if os.path.realpath(out) in _RUN_LOCKS:  # this process already holds it (a script's main called twice)
        return
    try:
        os.makedirs(out, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()  # can it be written? (a writable .lock alone would not show it)
        f = open(os.path.join(out, ".lock"), "a+")
    except OSError as e:
        raise SystemExit(f"--out {out}: cannot create or write the run directory ({e.strerror})") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise SystemExit(f"--out {out} is in use by another run (pid {holder}): wait for it to end, stop it, or pass "
                         f"another --out") from None
    f.truncate(0)  # (opened "a+": the pid is written at the new end, 0)
    f.write(f"{os.getpid()}\n")
    f.flush()
    _RUN_LOCKS[os.path.realpath(out)] = f
    atexit.register(f.close)  # held to the end; the kernel releases the lock with the process anyway

RESUME_NOTE = "the last checkpoint is kept; rerun the same command to resume from it"

def run_script(main: Callable[[], Any], interrupted: str = RESUME_NOTE):
    """What every script's `__main__` calls: Ctrl-C, SIGTERM (torchrun stopping the other ranks) and a full disk end
    the run with one line, `interrupted` saying what is kept; after main the process group is destroyed while the
    interpreter is whole (a gloo group alive at exit can abort it)."""
    import gc
    import signal
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # raises KeyboardInterrupt, as Ctrl-C does
    try:
        main()
        gc.collect()
        cleanup_distributed()
    except KeyboardInterrupt:
        print(f"\ninterrupted (rank {os.environ.get('RANK', '0')}): {interrupted}", file=sys.stderr, flush=True)
        sys.exit(130)
    except (OSError, RuntimeError) as e:  # torch's zip writer reports a short write as "unexpected pos"
        if getattr(e, "errno", None) != 28 and not any(t in str(e) for t in ("No space left", "unexpected pos")):
            raise
        reason = str(e).strip().splitlines()[0][:200]
        print(f"\nstopped (rank {os.environ.get('RANK', '0')}): the disk is full ({reason}); {interrupted} once "
              f"there is space", file=sys.stderr, flush=True)
        sys.exit(1)

def configure_threads(threads: int | None, ranks: Dist):
    """Torch's CPU threads: --threads, else OMP_NUM_THREADS when set (torchrun sets it), else the cores not busy (the
    1-minute load average) shared by the ranks; torch's default, every core, crawls on a busy machine. Not for GPU."""
    if threads is None and os.environ.get("OMP_NUM_THREADS"):
        return
    if threads is None:
        cores = os.cpu_count() or 1
        busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        threads = max(1, min(cores // ranks.world_size, cores - int(busy)))  # a whole core's worth of load per core
        if ranks.device.type == "cpu" and threads < cores // ranks.world_size:
            print0(f"CPU threads per process: {threads} ({cores} cores, load {busy:.1f}; --threads to choose)")
    torch.set_num_threads(threads)

def default_run_dir(script: str, data: str) -> str:
    """Where a run writes when --out is not given, the same rule for every script: runs/<script>_<data>, a data file
    named by its stem (runs/dive_k_cub, runs/eval_cub_two_step, runs/fine_r1_birds for birds.jsonl)."""
    stem = os.path.splitext(os.path.basename(data.replace("{split}", "all")))[0] or "data"
    return os.path.join("runs", f"{script}_{stem}")

def launched_world_size() -> int:
    """The ranks torchrun started (1 without it), before the process group: batch sizes are checked before any wait."""
    return int(os.environ.get("WORLD_SIZE", 1))

def require_divisible(what: str, total: int, by: int, by_what: str):
    """Refuse at start (never hang later) batch arithmetic that does not divide: every rank stops, rank 0 says why.
    The other ranks leave quietly with status 0: a rank failing first would have torchrun kill rank 0 before it spoke;
    rank 0's status 1 fails the launch."""
    said = lambda message: message if int(os.environ.get("RANK", 0)) == 0 else 0  # noqa: E731
    if by <= 0:
        raise SystemExit(said(f"{by_what} = {by}: must be at least 1 ({what} = {total} is divided by it)."))
    if total <= 0:
        raise SystemExit(said(f"{what} = {total}: must be a positive multiple of {by_what} = {by}, e.g. {by}."))
    if total % by:
        lower, upper = (total // by) * by, (total // by + 1) * by
        raise SystemExit(said(f"{what} = {total} is not divisible by {by_what} = {by}. "
                              f"Use a multiple of {by}, e.g. {f'{lower} or ' if lower else ''}{upper}."))

# flags that must be above 0 / at least 0 wherever a script has them (None: unset, or "all"), and the why of some
POSITIVE_FLAGS = ("max_steps", "group_size", "min_pixels", "max_pixels", "limit", "train_limit", "eval_limit",
                  "micro_batch", "logprob_micro_batch", "sft_micro_batch", "eval_batch", "mine_batch",
                  "samples", "mine_samples", "best_of", "prompts_per_step", "rollout_prompts", "sample_batch",
                  "rollout_batch", "sample_prompts", "sft_batch", "minibatches", "max_new_tokens",
                  "eval_max_new_tokens", "mine_max_new_tokens", "cot_max_new_tokens", "lr", "sft_lr", "epochs",
                  "sft_epochs", "tapo_epochs", "temperature", "mine_temperature", "threads")
NONNEGATIVE_FLAGS = ("eval_every", "save_every", "warmup_steps", "sft_warmup", "max_nonfinite", "log_completions",
                     "beta", "weight_decay", "sft_weight_decay", "lora_rank")
WHY = {"temperature": "at 0 every completion of a group is the same, so GRPO has no learning signal",
       "mine_temperature": "at 0 the K mining samples are one answer repeated",
       "limit": "leave it out to use every image", "train_limit": "leave it out to use every image",
       "eval_limit": "leave it out to evaluate every image", "eval_every": "0 = never", "save_every": "0 = never"}

def check_system_flags(args):
    """Flag values and combinations every script refuses at start, before anything is loaded (one line each)."""
    for name in (*NONNEGATIVE_FLAGS, *POSITIVE_FLAGS):
        value, positive = getattr(args, name, None), name in POSITIVE_FLAGS
        if value is not None and ((not value > 0) if positive else value < 0):
            raise SystemExit(f"--{name.replace('_', '-')} {value}: must be {'above 0' if positive else '0 or more'}"
                             + (f" ({WHY[name]})" if name in WHY else ""))
    if args.min_pixels > args.max_pixels:
        raise SystemExit(f"--min-pixels {args.min_pixels} is above --max-pixels {args.max_pixels}: the image budget "
                         f"needs min <= max")
    if args.compile_decode and args.attn == "flash_attention_2":
        raise SystemExit("--compile-decode 1 with --attn flash_attention_2: the compiled decode attends over the whole "
                         "static KV cache, unwritten slots included, under a mask that flash-attention 2 ignores. Use "
                         "--attn sdpa with --compile-decode 1, or --compile-decode 0")
    if args.compile_decode and getattr(args, "parallel", "ddp") == "fsdp" and launched_world_size() > 1:
        raise SystemExit("--compile-decode 1 with --parallel fsdp on several ranks: the compiled decode needs the "
                         "unsharded model. Use --parallel ddp, or --compile-decode 0")

def global_token_count(mask: torch.Tensor) -> float:
    """Number of loss tokens in this optimizer step summed over all ranks (for a global token-mean)."""
    return float(all_reduce_sum(mask.sum().double().reshape(1).clone())[0])

def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    if not values:
        return values
    keys = sorted(values)
    total = all_reduce_sum(torch.tensor([float(values[k]) for k in keys], dtype=torch.float64))
    return dict(zip(keys, (total / (dist.get_world_size() if dist.is_initialized() else 1)).tolist()))

# ----- 7. Robustness (faults are injected by the tests: tests/faulty.py patches a method's loss) -----
class NonFiniteGuard:
    """Skip optimizer steps whose loss or gradient norm is NaN / inf on any rank, on every rank together (one
    all-reduced flag, so replicas never diverge); `limit` in a row (0 = never) make `exhausted` true, and the caller
    saves the last good weights and calls `stop`. A skipped step's data is consumed. Used by lifecycle.update."""

    def __init__(self, limit: int = 5, device: torch.device | str = "cpu"):
        self.limit = limit  # non-finite steps in a row that stop the run
        self.device = device  # where the all-reduced flag lives (a CUDA device under nccl)
        self.skipped, self.in_a_row = 0, 0  # steps skipped by this process: in all, in the current streak
        self.last: dict = {}  # the offending values of the last skipped step, on this rank

    def check(self, step: int, **values) -> bool:
        """True if every value (floats or 0-d tensors) is finite on every rank; else count and log the skip."""
        local = {k: float(v.detach().float()) if isinstance(v, torch.Tensor) else float(v) for k, v in values.items()}
        bad_here = not all(math.isfinite(v) for v in local.values())
        if all_reduce_sum(torch.tensor([float(bad_here)], device=self.device)).item() == 0:
            self.in_a_row = 0
            return True
        self.skipped += 1
        self.in_a_row += 1
        self.last = local
        rank = int(os.environ.get("RANK", 0))
        if bad_here or rank == 0:
            shown = ", ".join(f"{k}={v:g}" for k, v in local.items())
            print(f"warning: step {step}: non-finite loss or gradient ({'here' if bad_here else 'on another rank'}: "
                  f"rank {rank} {shown}); optimizer step skipped ({self.in_a_row} in a row, {self.skipped} in all"
                  f"{f', the run stops at {self.limit} in a row' if self.limit else ''})", file=sys.stderr, flush=True)
        return False

    @property
    def exhausted(self) -> bool:
        return bool(self.limit) and self.in_a_row >= self.limit

    def stats(self) -> dict[str, int]:
        return {"nonfinite/skipped": self.skipped, "nonfinite/in_a_row": self.in_a_row}

    def stop(self, out_dir: str):
        raise SystemExit(
            f"stopping: {self.in_a_row} optimizer steps in a row had a non-finite loss or gradient norm (last values "
            f"on rank {int(os.environ.get('RANK', 0))}: {self.last}); {self.skipped} steps skipped in all. The "
            f"weights and optimizer state of the last good step are saved in {latest_checkpoint(out_dir)}. Rerunning "
            f"the same command resumes after the bad steps. If it happens again: lower the learning rate, look at the "
            f"data of those steps (metrics.jsonl), train in fp32 (--dtype fp32), or allow more with --max-nonfinite.")

