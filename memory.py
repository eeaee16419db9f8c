"""
memory.py: the memory each method estimates at start, per GPU (or process on CPU), from the model's shapes and the
run's settings (tests/test_robustness.py checks a hand count; bench.py measures), printed with what reduces each part.
"""

import os

import torch

import common

MEMORY_KNOBS = {  # component -> what reduces it (a method passes its own flag names where they differ)
    "parameters": "--parallel fsdp over more GPUs (shards weights, gradients and optimizer states); --dtype bf16 "
                  "halves the weights (small updates then round away)",
    "gradients": "--parallel fsdp over more GPUs; train fewer parameters (freeze the vision tower, LoRA)",
    "optimizer states": "--parallel fsdp over more GPUs; train fewer parameters (freeze the vision tower, LoRA)",
    "frozen reference": "--beta 0 (no KL term, no reference model)",
    "gathered parameters": "none but a smaller model: FSDP2 holds the whole model in compute precision while sampling",
    "rollout KV cache": "fewer images per sampling call, a smaller --group-size, --max-new-tokens or --max-pixels",
    "activations": "a smaller --micro-batch; --activation-checkpointing 1",
    "logits": "a smaller --micro-batch (rows scored at once); fewer rows per sampling call",
    "load peak": "--dtype bf16 (weights in bf16); under FSDP2 each GPU holds one whole copy until it is sharded",
    "process so far": "nothing: the interpreter, torch and the data read so far (CPU only; a GPU starts empty)",
}

def memory_budget(*, n_params: int, n_trainable: int, text_config, world_size: int = 1, parallel: str = "ddp",
                  master_bytes: int = 4, compute_bytes: int = 4, reference: bool = False, rollout_rows: int = 0,
                  prompt_tokens: int = 0, new_tokens: int = 0, train_rows: int = 0, logit_rows: int | None = None,
                  rows_per_prompt: int = 1, activation_checkpointing: bool = False, vision_config=None,
                  vision_patches: int = 0, train_prompt_tokens: int | None = None) -> dict[str, float]:
    """Estimated bytes per GPU by part (FSDP2 shards over the world size), rough where it must be: per sampled logit 24
    bytes (fp32 logits, scores, probabilities, a float64 CDF); the load peak is over before the other parts exist. Not
    counted: the CUDA context and allocator slack (add 10-20%)."""
    shards = world_size if parallel == "fsdp" else 1
    tc, vc = text_config, vision_config
    layers, hidden = tc.num_hidden_layers, tc.hidden_size
    head_dim = getattr(tc, "head_dim", None) or hidden // tc.num_attention_heads
    train_prompt = prompt_tokens if train_prompt_tokens is None else train_prompt_tokens  # the updates' prompts
    logit_rows = train_rows if logit_rows is None else logit_rows

    def stored(depth: int, width: int, intermediate: int) -> int:  # activations kept per token (or trained patch)
        per_layer = 6 * width + 4 * intermediate
        return depth * width + per_layer if activation_checkpointing else depth * per_layer
    prompts = -(-train_rows // max(1, rows_per_prompt))  # the shared prefix: a prompt once for its group
    text = (train_rows * new_tokens + prompts * train_prompt) * stored(layers, hidden, tc.intermediate_size)
    kept_in = 1 if activation_checkpointing else layers  # the shared prefix: each completion's prompt K, V
    shared_kv = 2 * hidden * train_rows * train_prompt * kept_in * (rows_per_prompt > 1)
    vision = vision_patches * stored(vc.depth, vc.hidden_size, vc.intermediate_size) if vision_patches else 0
    scoring = min(logit_rows * new_tokens * tc.vocab_size, max(common.LOGITS_BUDGET, logit_rows * tc.vocab_size)) * (
        compute_bytes + 8)  # per score (in chunks): the projection, its fp32 copy, the log-sum-exp
    return {
        "parameters": n_params * master_bytes / shards,
        "gradients": n_trainable * master_bytes / shards,
        "optimizer states": 2 * n_trainable * master_bytes / shards,  # AdamW's two moments
        "frozen reference": n_params * master_bytes / shards if reference else 0.0,  # the KL's twin of the policy
        "gathered parameters": float(n_params * compute_bytes) if shards > 1 else 0.0,  # FSDP2's copy for sampling
        "rollout KV cache": float(layers * tc.num_key_value_heads * head_dim * 2 * compute_bytes
                                  * (prompt_tokens + new_tokens) * rollout_rows),
        "activations": float((text + shared_kv + vision) * compute_bytes),
        "logits": float(max(scoring, rollout_rows * tc.vocab_size * 24)),
        "load peak": n_params * master_bytes * (1 + (1 / shards if reference else 0)),  # until wrap_model shards it
    }

def image_tokens(processor) -> int:
    """Visual tokens of one image at the pixel budget, at most: one per 28 x 28 pixels (after the 2 x 2 merge)."""
    return int(processor.image_processor.size.get("longest_edge") or 0) // (28 * 28)

def prompt_tokens_estimate(processor, text: str) -> int:
    """Prompt length, upper bound: the text's tokens, the chat template (~20) and one image at the pixel budget."""
    return len(processor.tokenizer(text)["input_ids"]) + 20 + image_tokens(processor)

def _gib(n: float) -> str:  # 1.50 GiB, 12.00 MiB ...
    unit, scale = next(((u, s) for u, s in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)) if n >= s), ("B", 1))
    return f"{n / scale:.2f} {unit}" if scale > 1 else f"{n:.0f} B"

def device_memory(device: torch.device) -> int:
    return (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda"
            else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))

def report_memory_budget(model, dist: common.Dist, *, parallel: str, compute_dtype: torch.dtype | None = None,
                         knobs: dict[str, str] | None = None, title: str = "memory budget", check: bool = True,
                         image_tokens: int = 0, **work) -> str:
    """Print memory_budget of the `work` settings (parameters counted after freezing / LoRA, the meta device's too)
    with the knobs that reduce each part; stop (`check`; else warn) when it exceeds the device. Returns the mode:
    `parallel`, or for "auto" fsdp when several ranks train and a replica would not fit."""
    hf = common.unwrap(model)
    params = list(hf.parameters())
    n_params, n_trainable = sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)
    master, compute = params[0].dtype, compute_dtype or params[0].dtype
    have = device_memory(dist.device)
    rollout_rows, prompt_tokens, new_tokens = work["rollout_rows"], work["prompt_tokens"], work["new_tokens"]
    if any(p.requires_grad for p in hf.model.visual.parameters()):  # a trained tower: 4 patches per image token
        work["vision_patches"] = 4 * image_tokens * -(-work["train_rows"] // max(1, work.get("rows_per_prompt", 1)))
    so_far = 0
    if dist.device.type == "cpu" and os.path.exists("/proc/self/statm"):  # the process's resident memory now (Linux)
        with open("/proc/self/statm") as f:
            so_far = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def estimate(mode: str) -> tuple[dict[str, float], float]:
        budget = memory_budget(n_params=n_params, n_trainable=n_trainable, text_config=hf.config.text_config,
                               vision_config=hf.config.vision_config, world_size=dist.world_size, parallel=mode,
                               master_bytes=master.itemsize, compute_bytes=compute.itemsize, **work)
        budget["process so far"] = float(so_far)
        return budget, max(sum(v for k, v in budget.items() if k != "load peak"), budget["load peak"] + so_far)
    where = "GPU" if dist.device.type == "cuda" else "process (CPU)"
    if parallel == "auto":
        replica = estimate("ddp")[1]
        parallel = "fsdp" if dist.world_size > 1 and replica > 0.9 * have else "ddp"
        if dist.world_size > 1:  # one process has nothing to choose (no wrapper)
            common.print0(f"parallel: auto -> {parallel} ({dist.world_size} ranks; a whole replica per "
                          f"{where.removesuffix(' (CPU)')} needs about {_gib(replica)} of {_gib(have)})")
    budget, total = estimate(parallel)
    knobs = {**MEMORY_KNOBS, **(knobs or {})}
    name = lambda dt: str(dt).replace("torch.", "")  # noqa: E731
    sampled = (f"sampling {rollout_rows} rows of <= {prompt_tokens} prompt tokens (image at the pixel budget) + "
               f"{new_tokens} new; " if rollout_rows else f"sequences <= {prompt_tokens + new_tokens} tokens; ")
    lines = [f"{title} per {where}, estimated (rank 0 of {dist.world_size}, {parallel}, weights {name(master)}, "
             f"compute {name(compute)}; {n_params:,} parameters, {n_trainable:,} trained; {sampled}updates of "
             f"{work['train_rows']} rows): {_gib(total)} of {_gib(have)}. Largest first, with what reduces it:"]
    largest = sorted(((k, v) for k, v in budget.items() if v > 0 and k != "load peak"), key=lambda kv: -kv[1])
    lines += [f"  {i + 1}. {part:<20} {_gib(size):>11}  <- {knobs[part]}" for i, (part, size) in enumerate(largest)]
    lines.append(f"  while loading: {_gib(budget['load peak'])} (load peak)  <- {knobs['load peak']}")
    common.print0("\n".join(lines))
    if total > have:
        what = "; ".join(f"{part} {_gib(size)}: {knobs[part]}" for part, size in largest[:3])
        message = f"memory: estimated {_gib(total)} per {where}, more than its {_gib(have)}. Largest parts: {what}"
        if check:
            raise SystemExit(f"{message}. Stopped before loading; --memory-check 0 starts anyway")
        common.print0(f"warning: {message} (--memory-check 0: going on)")
    return parallel
