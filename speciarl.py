"""
speciarl.py: SpeciaRL (arXiv 2603.03197) in one file: specificity-aware RL for open-world fine-grained naming.

The model sees an image and "Classify the image.", reasons in <think> and names ONE label in <answer> (or 'None' to
abstain). A text-only verifier grades every answer against the true class on an ordered ladder

    wrong < abstain < generic < less_specific < specific = more_specific      (specific and more specific tie)

and the reward is anchored to the best answer of the image's own group of rollouts ("dynamic", dynamic_reward), so
the model is pushed to be as specific as it CAN be on that image, never past it. Training is GRPO with the PPO
ratio, clip 0.2, dual clip 3, a global token mean and a k3 KL to the frozen model, with LoRA on the language model.

Launch (defaults are the paper's: Qwen2.5-VL-7B-Instruct, LoRA r64 / alpha 32, vision frozen, 3000 CUB images, G = 10,
256 images per rollout batch in 2 optimizer steps, lr 3e-5, 15 epochs = 165 steps; the same command resumes)
  1 GPU     python speciarl.py --data cub --data-root /data/CUB_200_2011
  8 GPUs    torchrun --nproc-per-node 8 speciarl.py --data cub --data-root /data/CUB_200_2011
  2 nodes   torchrun --nnodes 2 --node-rank 0 --nproc-per-node 8 --rdzv_backend c10d --rdzv_endpoint HOST:PORT \
                speciarl.py --data cub --data-root /data/CUB_200_2011 --parallel fsdp
  CPU       python speciarl.py --data toy        (the tiny stand-in model, the TOY preset below)

Simplifications and changes (the full list, with what the released code does: README, "Every deviation")
  * the verifier is `--judge rules` (offline) by default; the paper's LLM judges run behind a server (openai:)
  * the k3 KL is clamped to [-10, 10] per token (as verl); the loss is a token mean over the whole optimizer step
  * with LoRA the KL reference is the policy with its adapters off (exactly the initial model), not a second copy
  * fp32 adapters over a bf16 base; each prompt is encoded once per group, in sampling and in scoring
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import time
from collections import Counter

import torch
import torch.distributed as dist
import torch.nn.functional as F

import common
import data
import evaluation
import judges
import lifecycle
import memory

# ----- 1. Prompts -----
# The paper's two prompts (released general_base / specific_base): classify; reasoning in <think>; one label or 'None'
# to abstain in <answer>; the format strictly. The chat template's default system prompt (the paper's configs: empty).
PROMPT = "Classify the image.\n" + judges.FORMAT_LINE.format(shape="a single label, or None to abstain")
SPECIFIC_PROMPT = PROMPT.replace("Classify the image.", "Classify the image, be specific.", 1)
PROMPTS = {"general": PROMPT, "specific": SPECIFIC_PROMPT}
# eval.py --protocol speciarl [--be-specific] and run_eval: one greedy answer per image, judged into the six labels
EVALS = {name: evaluation.Protocol("speciarl", evaluation.answer_batch, evaluation.answer_metrics, template=text,
                                   paper_scoring=False, be_specific=name == "specific",
                                   hm_keys=("hm", "correctness", "specificity")) for name, text in PROMPTS.items()}

# ----- 2. Data: the images of a step, and the verifier's labels -----
def batch_for_step(n_train: int, step: int, rollout_prompts: int, seed: int) -> list[int]:
    """Indices of the training images of rollout batch `step`: a fresh shuffle every epoch (seeded by the epoch),
    the last partial batch dropped (as verl does). A pure function of `step`, so resuming needs only the step."""
    epoch, within = divmod(step, n_train // rollout_prompts)  # steps per epoch
    order = list(range(n_train))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order[within * rollout_prompts:(within + 1) * rollout_prompts]

NO_ANSWER = "no_answer"  # missing or empty <answer>: reward -1, left out of the group's best
JUDGE_ERROR = judges.JUDGE_ERROR  # the verifier gave no valid label: reward 0, left out of the group's best

def judge_rollouts(judge, truths: list[str], answers: list[str | None]) -> list[str]:
    """One verifier label per rollout (one batched call; the judge caches per pair): NO_ANSWER for a missing or blank
    answer (punctuation only, '???', is judged, as in the paper's code), JUDGE_ERROR for a label off the ladder."""
    valid = [i for i, a in enumerate(answers) if a is not None]
    labels = [NO_ANSWER] * len(answers)
    for i, label in zip(valid, judge.judge([(truths[i], answers[i]) for i in valid])):
        labels[i] = label if label in judges.JUDGE_LABELS else JUDGE_ERROR
    return labels

# ----- 3. Reward: fn(completions, example) -> one reward per rollout; example: {"truth", "labels" of the group} -----
TIER = {"wrong": 0, "abstain": 1, "generic": 2, "less_specific": 3, "specific": 4, "more_specific": 4}

def dynamic_reward(completions: list[str], example: dict) -> list[float]:
    """SpeciaRL's best-in-group reward for the G rollouts of one image, from their verifier labels.

    Missing answers get -1 and judge errors 0, and neither takes part in finding the group's best tier. If the best
    tier is `wrong`, every valid rollout gets 0; otherwise valid rollouts in the best tier get 1 and the rest 0.
    >>> dynamic_reward([""] * 5, {"labels": ["less_specific", "specific", "no_answer", "more_specific", "generic"]})
    [0.0, 1.0, -1.0, 1.0, 0.0]
    >>> dynamic_reward([""] * 3, {"labels": ["wrong", "abstain", "judge_error"]})  # abstaining is the best it could do
    [0.0, 1.0, 0.0]
    """
    labels = example["labels"]
    best = max((TIER[label] for label in labels if label in TIER), default=None)
    return [-1.0 if label == NO_ANSWER else
            0.0 if label not in TIER or best == TIER["wrong"] else float(TIER[label] == best) for label in labels]

# The paper's static ablations: a fixed reward per label. `binary` is the standard RFT baseline.
STATIC_TABLES = {name: dict(zip(["more_specific", "specific", "less_specific", "generic", "abstain", "wrong"], row))
                 for name, row in [("binary", [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]),
                                   ("scala1", [1.0, 1.0, 0.75, 0.5, 0.25, 0.0]),
                                   ("scala2", [1.0, 1.0, 0.75, 0.5, 0.0, 0.0]),
                                   ("scala3", [1.0, 1.0, 0.75, 0.0, 0.0, 0.0])]}

def static_reward(table: dict[str, float]):
    """A per-rollout table lookup; a missing answer is -1, a judge error 0 (as in the paper's code).
    >>> static_reward(STATIC_TABLES["scala1"])([""] * 3, {"labels": ["generic", "no_answer", "judge_error"]})
    [0.5, -1.0, 0.0]
    """
    return lambda completions, example: [-1.0 if label == NO_ANSWER else table.get(label, 0.0)
                                         for label in example["labels"]]

# --rewards NAME[=WEIGHT],... picks from here; a new reward is one more entry with the same signature
REWARDS = {"dynamic": dynamic_reward, **{name: static_reward(table) for name, table in STATIC_TABLES.items()}}

def best_label(labels: list[str]) -> str:
    """The group's best label for logging (more_specific above specific here), or 'none' if nothing was valid."""
    valid = [label for label in labels if label in judges.JUDGE_LABELS]
    return max(valid, key=judges.JUDGE_LABELS.index) if valid else "none"

# ----- 4. Advantage -----
def group_advantages(rewards: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """GRPO advantages over each image's G rollouts (rows of `rewards`, [P, G]); -1 rewards take part here.
    group: (r - mean) / (std + eps) with the unbiased std (verl); none: r - mean (Dr.GRPO). Groups whose rewards are
    all equal get 0 (no policy gradient; only the KL acts on them).
    >>> group_advantages(torch.tensor([[1., 0., 0., -1.]]), "none", 1e-6)
    tensor([[ 1.,  0.,  0., -1.]])
    """
    centred = rewards - rewards.mean(1, keepdim=True)  # [P, G]
    if norm == "none":
        return centred
    std = rewards.std(1, keepdim=True).nan_to_num(0.0)  # [P, 1] (nan for G = 1)
    return torch.where(std > 0, centred / (std + eps), torch.zeros_like(centred))  # [P, G]

# ----- 5. The loss, written by hand -----
def speciarl_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None,
                  advantages: torch.Tensor, mask: torch.Tensor, *, clip_eps: float, dual_clip: float,
                  beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The SUM over completion tokens of the per-token PPO-clip + dual-clip + k3-KL loss (the caller divides by the
    token count of the whole optimizer step over all ranks: a global token mean). Also returns sums for logging.

    Per token t of rollout i, with ratio rho = exp(logp - old_logp) and A = advantages[i]:
        pg   = max(-A * rho, -A * clip(rho, 1 - eps, 1 + eps))          # PPO: the pessimistic of the two
        pg   = min(pg, -A * c)   if A < 0                                 # dual clip: a bad action with a huge
                                                                          # ratio costs at most c * |A|
        kl   = min(exp(ref - logp) - (ref - logp) - 1, 10)                # k3, >= 0, unbiased for KL(pi || ref);
                                                                          # capped at 10 as verl's low_var_kl is,
                                                                          # so a drifted token pulls back no harder
        loss = pg + beta * kl
    Worked example (eps 0.2, c 3, beta 0): A = +1, rho = 1.5 -> max(-1.5, -1.2) = -1.2 (clipped, no gradient);
    A = -1, rho = 0.5 -> max(0.5, 0.8) = 0.8 (clipped); A = -1, rho = 5 -> max(5, 1.2) = 5 -> min(5, 3) = 3 (dual
    clipped, no gradient); A = +1, rho = 1.1 -> -1.1 (inside the clip range, gradient -rho * grad logp).
    """
    mask = mask.to(logp.dtype)  # [B, T]
    adv = advantages.to(logp.dtype)[:, None]  # [B, 1]
    ratio = torch.exp((logp - old_logp).clamp(-20.0, 20.0))  # [B, T]
    surrogate = -adv * ratio  # [B, T]
    surrogate_clipped = -adv * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)  # [B, T]
    pg = torch.maximum(surrogate, surrogate_clipped)  # [B, T]
    clipped = (surrogate_clipped > surrogate).to(logp.dtype)  # [B, T] 1 where the clip bound is the active one
    dual = torch.zeros_like(pg)  # [B, T]
    if dual_clip > 0:
        cap = -adv * dual_clip  # [B, 1] only binds for A < 0, where it is positive
        dual = ((adv < 0) & (pg > cap)).to(logp.dtype)  # [B, T]
        pg = torch.where(adv < 0, torch.minimum(pg, cap), pg)  # [B, T]
    per_token = pg  # [B, T]
    kl = torch.zeros_like(pg)  # [B, T]
    if beta > 0:
        log_ref_ratio = (ref_logp - logp).clamp(-20.0, 20.0)  # [B, T]
        kl = (torch.exp(log_ref_ratio) - log_ref_ratio - 1.0).clamp(-10.0, 10.0)  # [B, T] verl's low_var_kl bound
        per_token = per_token + beta * kl  # [B, T]
    loss_sum = (per_token * mask).sum()  # []
    stats = {"pg_loss": (pg * mask).sum().detach(), "kl": (kl * mask).sum().detach(),
             "clip_frac": (clipped * mask).sum(), "dual_clip_frac": (dual * mask).sum(),
             "ratio": (ratio * mask).sum().detach()}
    return loss_sum, stats

# ----- 6. The train step: rollout -> verifier labels -> reward -> advantage -> log-probs -> mini-batch updates -----
def train_step(run: lifecycle.Run, step: int, images: list[data.Example], model, reference, optimizer, processor,
               judge, total_steps: int) -> dict:
    """One SpeciaRL step on this rank's images (all G rollouts of an image on this rank): the step's metrics over all
    ranks; --log-completions judged rollouts appended to <out>/rollouts.jsonl."""
    args, timer, G = run.args, run.timer, run.args.group_size
    with timer("encode"):
        prompts = [common.encode_prompt(processor, ex.image, PROMPTS[args.prompt]) for ex in images]
    seed = args.seed * 1_000_003 + step * 1009 + run.ranks.rank
    generator = torch.Generator(device=run.ranks.device).manual_seed(seed)
    model.eval()  # sampling needs the KV cache, which activation checkpointing turns off in train mode
    with timer("sample"), args.precision.context(), \
            common.gathered_params(model, common.fsdp_warmup_inputs(model, processor, prompts[0])):
        rollout = common.sample(model, processor, prompts, group_size=G, max_new_tokens=args.max_new_tokens,
                                temperature=args.temperature, top_p=args.top_p, generator=generator,
                                prompt_batch=args.sample_batch, compile_decode=bool(args.compile_decode))
    ids, mask, row_prompts = rollout.completion_ids, rollout.completion_mask, rollout.row_prompts  # [B, T], [B, T], [B]

    # verifier labels (one batched call), then each group's rewards and advantages; a stop (save_and_stop) when the
    # judge's server is gone after its retries (any rank) or above --max-judge-errors of all judged answers lack a label
    with timer("judge"):
        answers = [judges.parse_answer(text) for text in rollout.texts]  # [B] the first <answer>, None if missing
        truths = [ex.class_name for ex in images for _ in range(G)]  # [B]
        try:
            labels, failure = judge_rollouts(judge, truths, answers), ""  # [B]
        except judges.ServerError as e:
            labels, failure = [], str(e)
        local = [float(bool(failure)), float(labels.count(JUDGE_ERROR)), float(sum(a is not None for a in answers))]
        failed, errors, judged = common.all_reduce_sum(torch.tensor(local)).tolist()
        failure = failure or ("another rank lost the judge server" if failed else
                              judges.judge_error_stop(errors, judged, args.max_judge_errors))
        if failure:
            save_and_stop(failure, run.out, step, model, optimizer)
    groups = [lifecycle.group_rewards(REWARDS, args.reward_weights, rollout.texts[i * G:(i + 1) * G],
                                      {"truth": ex.class_name, "labels": labels[i * G:(i + 1) * G]})
              for i, ex in enumerate(images)]
    rewards = torch.stack([total for total, _ in groups])  # [P, G]
    parts = {name: torch.stack([group_parts[name] for _, group_parts in groups]) for name in args.reward_weights}
    advantages = group_advantages(rewards, args.adv_norm, args.adv_eps).view(-1)  # [B]

    # old log-probs, once, before any update (mini-batches 2.. are off-policy); with beta > 0 the frozen initial
    # model's: with LoRA the policy with its adapters off, else the reference copy
    logprobs = lambda m: common.completion_logprobs(  # noqa: E731  [B, T]
        m, processor, row_prompts, ids, mask, temperature=args.temperature, micro_batch=args.logprob_micro_batch,
        shared_prefix=bool(args.shared_prefix))
    with timer("logprobs"), args.precision.context():
        old_logp, ref_logp = logprobs(model), None  # [B, T]
        if args.beta > 0:
            with lora_disabled(model) if reference is None else contextlib.nullcontext():
                ref_logp = logprobs(model if reference is None else reference)  # [B, T]

    model.train()
    with timer("update"):
        loss_stats = update_policy(args, model, optimizer, run.guard, row_prompts, ids, mask, advantages, old_logp,
                                   ref_logp, common.special_token_ids(processor)["<|endoftext|>"], step=step,
                                   total_steps=total_steps)
    if args.log_completions and run.ranks.is_main:  # judged rollouts, the first of every group, then the second, ...
        with open(os.path.join(run.out, "rollouts.jsonl"), "a") as f:
            for r in [i * G + j for j in range(G) for i in range(len(images))][:args.log_completions]:
                i = r // G
                f.write(json.dumps({"step": step + 1, "image": images[i].id, "truth": images[i].class_name,
                                    "answer": answers[r], "label": labels[r],
                                    "group_best": best_label(labels[i * G:(i + 1) * G]),
                                    "reward": float(rewards.view(-1)[r])}) + "\n")
    return step_metrics(labels, rewards, parts, rollout, loss_stats, time.perf_counter() - run.t_step,
                        run.ranks.world_size)

def update_policy(args, model, optimizer, guard: lifecycle.NonFiniteGuard, row_prompts, ids, mask, advantages,
                  old_logp, ref_logp, pad_id: int, *, step: int, total_steps: int) -> Counter:
    """This rank's rollouts in --minibatches mini-batches (whole groups), one optimizer step each. Its loss is a token
    mean over ALL its completion tokens on ALL ranks (the token sum / the global count, x world size as DDP / FSDP2
    average gradients over ranks). Returns the summed loss statistics and the mean gradient norm."""
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    rows_per_minibatch = ids.shape[0] // args.minibatches
    totals = Counter()
    for minibatch in range(args.minibatches):
        rows = list(range(minibatch * rows_per_minibatch, (minibatch + 1) * rows_per_minibatch))
        tokens = lifecycle.global_token_count(mask[rows])  # all ranks, before any backward
        lifecycle.set_lr(optimizer, lifecycle.lr_at(step * args.minibatches + minibatch, base_lr=args.lr,
                                                    total_steps=total_steps * args.minibatches,
                                                    schedule=args.lr_schedule, warmup_steps=args.warmup_steps))

        def loss_of(chunk: list[int]):  # each image's prompt once for its G completions
            logp = common.score_completions(model, [row_prompts[i] for i in chunk], ids[chunk], mask[chunk], pad_id,
                                            args.temperature, bool(args.shared_prefix)).float()  # [b, t]
            loss_sum, stats = speciarl_loss(
                logp, old_logp[chunk].to(logp.device), None if ref_logp is None else ref_logp[chunk].to(logp.device),
                advantages[chunk].to(logp.device), mask[chunk].to(logp.device), clip_eps=args.clip_eps,
                dual_clip=args.dual_clip, beta=args.beta)
            return loss_sum * world_size / max(tokens, 1.0), stats  # global token mean (x world: ranks are averaged)
        chunks = [rows[i:i + args.micro_batch] for i in range(0, len(rows), args.micro_batch)]
        grad_norm, minibatch_stats = lifecycle.update(model, optimizer, guard, step + 1, chunks, loss_of,
                                                      grad_clip=args.grad_clip, precision=args.precision)
        totals.update(minibatch_stats)
        totals["grad_norm"] += grad_norm / args.minibatches
    return totals

LOSS_STATS = ("pg_loss", "kl", "clip_frac", "dual_clip_frac", "ratio")

def step_metrics(labels, rewards, parts, rollout, loss_stats, step_time, world_size) -> dict:
    """Per-step scalars over all ranks; correctness: the share of rollouts correct at any level, specificity: the
    share specific or more specific among the correct ones."""
    names = list(judges.JUDGE_LABELS) + [NO_ANSWER, JUDGE_ERROR]
    zero_std = (rewards.std(1) == 0).sum() if rewards.shape[1] > 1 else rewards.shape[0]  # groups without signal
    local = {**{name: labels.count(name) for name in names}, **{f"reward/{k}": v.sum() for k, v in parts.items()},
             **{k: loss_stats[k] for k in LOSS_STATS}, "reward": rewards.sum(), "rollouts": rewards.numel(),
             "groups": rewards.shape[0], "zero_std_groups": zero_std, "tokens": rollout.completion_mask.sum(),
             "truncated": rollout.truncated.sum(), "prompt_tokens": sum(len(p) for p in rollout.row_prompts)}
    summed = common.all_reduce_sum(torch.tensor([float(v) for v in local.values()], dtype=torch.float64))
    total = dict(zip(local, summed.tolist()))
    n, tokens = total["rollouts"], total["tokens"]  # the update visits every completion token once
    correct = sum(total[name] for name in judges.CORRECT_LABELS)
    return {**{f"share/{name}": total[name] / n for name in names}, "reward": total["reward"] / n,
            **{k: total[k] / n for k in total if k.startswith("reward/")}, "correctness": correct / n,
            "specificity": (total["specific"] + total["more_specific"]) / correct if correct else 0.0,
            "abstain_rate": total["abstain"] / n, "no_answer_rate": total[NO_ANSWER] / n,
            "judge_error_rate": total[JUDGE_ERROR] / n, "zero_std_groups": total["zero_std_groups"] / total["groups"],
            "pg_loss": total["pg_loss"] / tokens, "kl": total["kl"] / tokens, "clip_frac": total["clip_frac"] / tokens,
            "dual_clip_frac": total["dual_clip_frac"] / tokens, "ratio_mean": total["ratio"] / tokens,
            "grad_norm": loss_stats["grad_norm"], "completion_tokens": tokens / n, "truncated": total["truncated"] / n,
            "tokens_per_s": (tokens + total["prompt_tokens"]) / step_time / world_size}

def save_and_stop(reason: str, out: str, step: int, model, optimizer, eval_pending: bool = False):
    """A checkpoint of the steps done so far (marking its evaluation as still to do when that is what stopped), the
    judge cache intact, and a stop with one message; the same command resumes."""
    lifecycle.save_checkpoint(out, step, model, optimizer, {"eval_pending": eval_pending})
    raise SystemExit(f"{reason}. Checkpoint saved after step {step}, judged pairs kept in {out}/judge_cache.jsonl: "
                     f"rerun the same command to resume")

# ----- 7. The policy: LoRA adapters written by hand (no peft) -----
class LoRALinear(torch.nn.Module):
    """y = base(x) + scale * (x A^T) B^T, scale = alpha / rank. Adapters are kept in fp32 (an AdamW update of 3e-5
    would vanish in bf16 weights of magnitude 1e-2) and their output is cast to the layer's dtype."""

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float, generator: torch.Generator | None = None):
        super().__init__()
        self.base = base.requires_grad_(False)
        device = base.weight.device
        A = torch.empty(rank, base.in_features, dtype=torch.float32)
        torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)  # the nn.Linear / peft initialisation
        self.lora_A = torch.nn.Parameter(A.to(device))
        self.lora_B = torch.nn.Parameter(torch.zeros(base.out_features, rank, device=device, dtype=torch.float32))
        # the scale travels in the state dict, so a state dict can be merged without the module at hand
        self.register_buffer("lora_scale", torch.tensor(float(alpha) / rank, device=device))
        self.adapter_enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)  # [..., out]
        if not self.adapter_enabled:
            return out
        low = F.linear(x.to(self.lora_A.dtype), self.lora_A)  # [..., r]
        return out + (F.linear(low, self.lora_B) * self.lora_scale).to(out.dtype)  # [..., out]

def inject_lora(model, rank: int, alpha: float, seed: int = 0) -> list[str]:
    """Replace every nn.Linear inside the language model's decoder layers by a LoRALinear (in place), freeze all else
    and return the adapted layers' names; before wrap_model. The adapters come from their own seeded generator, so
    every rank starts from the same adapters (FSDP2 does not broadcast them)."""
    hf = common.unwrap(model).requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    layers = hf.model.language_model.layers
    names = [name for name, module in layers.named_modules() if isinstance(module, torch.nn.Linear)]
    for name in names:  # "0.self_attn.q_proj", ... layer by layer
        parent, _, child = name.rpartition(".")
        setattr(layers.get_submodule(parent), child, LoRALinear(layers.get_submodule(name), rank, alpha, generator))
    plain_save = hf.save_pretrained  # the Hugging Face export (lifecycle.export_hf, which passes the full state dict)
    hf.save_pretrained = lambda save_directory, *, state_dict, **kwargs: plain_save(  # writes merged, plain weights
        save_directory, state_dict=merge_lora_state_dict(state_dict), **kwargs)
    return [f"model.language_model.layers.{name}" for name in names]

def merge_lora_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A LoRA model's state dict -> the plain model's: for every adapted layer X, X.weight = X.base.weight +
    scale * B @ A (computed in fp32, stored in the base dtype), X.bias = X.base.bias; adapter keys dropped. Other
    keys pass through; an empty dict (non-zero ranks under FSDP2) stays empty."""
    out = {}
    for key, value in state_dict.items():
        prefix, _, rest = key.rpartition(".base.")  # X.base.weight -> X, weight
        adapted = prefix + ".lora_A" in state_dict
        if key.endswith((".lora_A", ".lora_B", ".lora_scale")):
            continue
        if adapted and rest == "weight":
            A, B = state_dict[prefix + ".lora_A"].float(), state_dict[prefix + ".lora_B"].float()
            value = (value.float() + float(state_dict[prefix + ".lora_scale"]) * (B @ A)).to(value.dtype)  # [out, in]
        out[f"{prefix}.{rest}" if adapted else key] = value
    return out

@contextlib.contextmanager
def lora_disabled(model):
    """Run the base model: adapters off inside the block (the frozen reference of the KL term)."""
    adapters = [m for m in common.unwrap(model).modules() if isinstance(m, LoRALinear)]
    for m in adapters:
        m.adapter_enabled = False
    try:
        yield
    finally:
        for m in adapters:
            m.adapter_enabled = True

# ----- 8. Evaluation (eval.py, protocol speciarl), and the flags: the paper's values, a toy preset for the CPU -----
def run_eval(args, model, processor, test, judge, out, step, optimizer) -> dict:
    """Greedy evaluation with the speciarl protocol -> {"eval/<number>": value}; collective. A judge server that
    stays away, or judge errors above --max-judge-errors, stop the run with a checkpoint whose evaluation the
    resumed run does first."""
    try:
        results = evaluation.evaluate_groups(
            model, processor, {"test": test}, [EVALS[args.prompt]], out=out, step=step, precision=args.precision,
            keys=None, name="eval/{key}", folder="", shown=("correctness", "specificity", "hm", "judge_errors"),
            judge=judge, seed=args.seed, max_new_tokens=args.eval_max_new_tokens, micro_batch=args.eval_batch,
            compile_decode=bool(args.compile_decode))
        errors = results["eval/judge_errors"]
        stop = judges.judge_error_stop(errors, results["eval/n"] + errors, args.max_judge_errors)
    except judges.ServerError as e:
        stop = str(e)
    if stop:
        save_and_stop(f"evaluation at step {step}: {stop}", out, step, model, optimizer, eval_pending=True)
    return results

# `--data toy` on a 2-core CPU: the tiny stand-in, short completions (its answers are ~30 tokens), a higher learning
# rate decaying linearly (at a constant 2e-3 the stand-in peaks mid-run, then falls back) and a smaller adapter for a
# 0.7M-parameter model, one epoch (30 steps), evaluation on all 360 held-out images (tests/test_speciarl_learning.py).
TOY = dict(model="tiny", rollout_prompts=16, max_new_tokens=48, lr=2e-3, lr_schedule="linear", lora_rank=16,
           epochs=1, eval_every=10, eval_max_new_tokens=48, eval_batch=120, save_every=10, sample_batch=16,
           micro_batch=80, logprob_micro_batch=160)

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    lifecycle.add_training_args(  # the paper's values
        parser, model="Qwen/Qwen2.5-VL-7B-Instruct", group_size=10, rewards="dynamic", lr=3e-5, lr_schedule="constant",
        beta=0.01, max_new_tokens=2048, micro_batch=32, eval_every=5, save_every=5, weight_decay=0.01, eval_batch=32,
        log_completions=16, train_limit=3000)
    g = parser.add_argument_group("SpeciaRL: data, prompt, verifier")
    g.add_argument("--classes", default="all", choices=["all", "base", "novel"], help="classes trained on (paper: all)")
    g.add_argument("--shots", type=int, default=None, help="k training images per class, drawn before --train-limit")
    g.add_argument("--prompt", choices=["general", "specific"], default="general",
                   help="'general' = 'Classify the image.' (paper); 'specific' adds ', be specific' (a baseline)")
    g.add_argument("--judge", default="rules", help="training verifier: 'rules' (offline), 'hf:<model>' (loaded here) "
                   "or 'openai:<model>' (served at --judge-url, e.g. by vLLM; paper: Qwen3-30B-A3B-Instruct)")
    g.add_argument("--judge-url", default=None, help="an openai: judge's OpenAI-compatible server, e.g. "
                   "http://HOST:8000/v1 (default $OPENAI_BASE_URL; key: $OPENAI_API_KEY); plain HTTP, no package")
    g.add_argument("--judge-concurrency", type=int, default=16, help="requests in flight per rank (openai: judge)")
    judges.add_judge_flags(g)
    g.add_argument("--eval-data", default=None, help="evaluation dataset (default: --data), its test split")
    g.add_argument("--eval-data-root", default=None, help="its folder (default: --data-root when it is --data)")
    g.add_argument("--eval-judge", default=None, help="evaluation verifier (default: --judge; paper: Llama-3-70B)")
    g.add_argument("--eval-judge-url", default=None, help="its server (default: --judge-url)")
    g = parser.add_argument_group("SpeciaRL: GRPO, LoRA, batching")
    g.add_argument("--rollout-prompts", type=int, default=256, help="images per rollout batch, all ranks (paper 256)")
    g.add_argument("--minibatches", type=int, default=2, help="optimizer steps per rollout batch (paper 2: 128 images)")
    g.add_argument("--epochs", type=int, default=15, help="passes over the training images (paper 15 = 165 steps)")
    g.add_argument("--clip-eps", type=float, default=0.2, help="PPO ratio clip, low and high (paper 0.2)")
    g.add_argument("--dual-clip", type=float, default=3.0, help="dual-clip cap, negative advantages (paper 3; 0: off)")
    g.add_argument("--adv-norm", choices=["group", "none"], default="group",
                   help="group: (r - mean) / (std + eps) (paper); none: r - mean (Dr.GRPO)")
    g.add_argument("--adv-eps", type=float, default=1e-6, help="eps of the group std (verl: 1e-6)")
    g.add_argument("--lora-rank", type=int, default=64, help="LoRA rank (paper 64); 0: full fine-tuning of the LM")
    g.add_argument("--lora-alpha", type=float, default=32.0, help="LoRA alpha, scale = alpha / rank (paper 32)")
    g.add_argument("--freeze-vision", type=int, default=1, help="keep the vision tower frozen (paper 1)")
    g.add_argument("--sample-batch", type=int, default=8, help="images per sampling call (memory, not maths)")
    g.add_argument("--logprob-micro-batch", type=int, default=20, help="rows per no-grad log-prob forward (memory)")
    return lifecycle.parse_flags(parser, argv, TOY, REWARDS)

def check_batches(args, world: int) -> int:
    """Images per rank, refused at start when the batch arithmetic does not divide (the paper's 256 images in 2
    mini-batches divide over 1, 2, 4, 8 and 16 ranks)."""
    lifecycle.require_divisible("--rollout-prompts", args.rollout_prompts, world, "the number of ranks")
    prompts_per_rank = args.rollout_prompts // world
    lifecycle.require_divisible("images per rank (--rollout-prompts / ranks)", prompts_per_rank, args.minibatches,
                                "--minibatches")
    return prompts_per_rank

def memory_estimate(args, processor, prompts_per_rank: int) -> dict:
    """This script's shapes and knobs for the memory estimate at start (memory.report_memory_budget)."""
    knobs = {"logits": "a smaller --logprob-micro-batch / --micro-batch; a smaller --sample-batch",
             "rollout KV cache": "--sample-batch (images per sampling call), --group-size, --max-new-tokens, "
                                 "--max-pixels",
             **dict.fromkeys(["gradients", "optimizer states"], "--lora-rank (a smaller adapter); --parallel fsdp"),
             "frozen reference": "--lora-rank > 0 (the reference is the adapter-free policy) or --beta 0"}
    return dict(rollout_rows=min(args.sample_batch, prompts_per_rank) * args.group_size, train_rows=args.micro_batch,
                prompt_tokens=memory.prompt_tokens_estimate(processor, PROMPTS[args.prompt]), knobs=knobs,
                logit_rows=max(args.micro_batch, args.logprob_micro_batch), new_tokens=args.max_new_tokens,
                rows_per_prompt=min(args.group_size, args.micro_batch) if args.shared_prefix else 1)

# ----- 9. main: set-up, data, models, verifiers, resume, the loop, export -----
def main(argv=None):
    args = parse_args(argv)
    if args.lora_rank > 0 and not args.freeze_vision:
        raise SystemExit("--freeze-vision 0 needs --lora-rank 0 (LoRA adapts the language model only)")
    prompts_per_rank = check_batches(args, lifecycle.launched_world_size())  # before the process group
    run = lifecycle.Run(args, "speciarl")

    # data: a fixed random subset of the training split; evaluation on a test split
    train = data.load_dataset(args.data, "train", root=args.data_root, classes=args.classes, shots=args.shots,
                              limit=args.train_limit, seed=args.seed)
    steps_per_epoch = len(train) // args.rollout_prompts
    if steps_per_epoch == 0:
        raise SystemExit(f"--rollout-prompts {args.rollout_prompts} is larger than the {len(train)} training images")
    total_steps = min(args.epochs * steps_per_epoch, args.max_steps or math.inf)
    eval_data = args.eval_data or args.data
    eval_root = args.eval_data_root or (args.data_root if eval_data == args.data else None)
    test = data.load_dataset(eval_data, "test", root=eval_root, limit=args.eval_limit,
                             seed=args.seed) if args.eval_every else None
    common.print0(f"{len(train)} training images, {steps_per_epoch} steps/epoch, {total_steps} steps of "
                  f"{args.rollout_prompts} images x {args.group_size} rollouts ({prompts_per_rank} images per rank, "
                  f"{args.minibatches} optimizer steps each)")

    # the policy (LoRA: frozen base in the compute dtype, fp32 adapters; full fine-tuning: fp32 master weights) and
    # the KL reference: the adapter-free policy with LoRA, a second copy without
    def trainable(model):  # -> what the trainable-parameters line adds
        if args.lora_rank > 0:
            adapted = inject_lora(model, args.lora_rank, args.lora_alpha)
            return f"LoRA r={args.lora_rank} alpha={args.lora_alpha} on {len(adapted)} linear layers"
        model.model.visual.requires_grad_(not args.freeze_vision)  # the LM, and the vision tower unless frozen
    model, processor, reference = run.load_policy(
        args.model, trainable=trainable, estimate=lambda processor: memory_estimate(args, processor, prompts_per_rank),
        reference=args.beta > 0 and args.lora_rank == 0, trained_weights=args.lora_rank == 0)
    optimizer = lifecycle.adamw(model, args.lr, args.weight_decay)

    # the verifiers: their judgements cached in one append-only file per run, shared by the ranks
    cache = os.path.join(run.out, "judge_cache.jsonl")
    server = dict(concurrency=args.judge_concurrency, max_tokens=args.judge_max_tokens,
                  thinking=bool(args.judge_thinking))
    judge = judges.get_judge(args.judge, train, cache, url=args.judge_url, **server)
    same_judge = (args.eval_judge or args.judge) == args.judge and eval_data == args.data
    eval_judge = judge if test is None or same_judge else judges.get_judge(
        args.eval_judge or args.judge, test, cache, url=args.eval_judge_url or args.judge_url, **server)
    evaluate = lambda step: run_eval(  # noqa: E731
        args, model, processor, test, eval_judge, run.out, step=step, optimizer=optimizer)

    # resume (the data order is a function of the step), the loop, export (adapters merged into plain weights)
    start = run.resume(model, optimizer, evaluate)["step"]
    if run.ranks.is_main:
        common.repair_jsonl_tail(os.path.join(run.out, "rollouts.jsonl"))  # a kill mid-write leaves a cut last line
    for step in run.steps(start, total_steps):
        images = [train.examples[i] for i in batch_for_step(len(train), step, args.rollout_prompts, args.seed)]
        record = train_step(run, step, images[run.ranks.rank::run.ranks.world_size], model, reference, optimizer,
                            processor, judge, total_steps)
        record.update({"lr": optimizer.param_groups[0]["lr"], **lifecycle.mean_over_ranks(judge.stats())})
        run.end_step(step + 1, record, model, optimizer, {}, evaluate, shown=("reward", "correctness", "specificity",
                     "abstain_rate", "no_answer_rate", "judge_error_rate", "kl", "clip_frac"))
    run.finish(model, processor, keys=["eval/correctness", "eval/specificity", "eval/hm", "eval/specificity_of_all"])

if __name__ == "__main__":
    lifecycle.run_script(main)
