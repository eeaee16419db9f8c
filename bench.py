"""
bench.py: speed and memory of the three phases of a GRPO step on Qwen2.5-VL, in one run.

  1. rollout   our sampler (common.sample: one prefill per prompt, its KV shared by the group) against Hugging Face
               `generate(num_return_sequences=G)` on the same prompts and settings: ratio, tokens/s, the decode step
               against the memory-bandwidth limit, whether greedy tokens match;
  2. log-probs the no-grad scoring pass (common.completion_logprobs): tokens/s, MFU;
  3. update    forward + backward + AdamW on the same rows (common.score_completions): tokens/s, MFU, peak memory;
               2 and 3 on both scoring paths in turn: the shared prefix (no suffix) and one row per completion (_rows).
Figures: median (min, max) of --repeats timed runs after --warmup; a markdown table, then ONE last line of JSON with
every figure and setting. Definitions and more launch lines: README, section "Speed".
  python bench.py --model tiny                                                              # CPU
  torchrun --nproc-per-node 8 bench.py --model Qwen/Qwen2.5-VL-7B-Instruct --parallel fsdp  # figures per GPU (rank 0)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import time
from types import SimpleNamespace

import torch

import common
import data
import speciarl

# dense bf16 peaks (TFLOP/s) by a substring of torch.cuda.get_device_name, most specific first
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0, "H800": 989.0,
                    "GH200": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0}

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    g = p.add_argument_group("model and workload")
    g.add_argument("--model", default="tiny", help="hub id, local directory, 'tiny', or a random preset: qwen2.5-vl-"
                   "30m-random, -35m-random (CPU; the real vocabulary), -3b-random, -7b-random (default %(default)s)")
    g.add_argument("--prompts", type=int, default=4, help="prompts per rollout batch (default %(default)s)")
    g.add_argument("--group-size", type=int, default=8, help="completions per prompt G (default %(default)s)")
    g.add_argument("--image-size", type=int, default=448, help="square image side, a multiple of 28: (S/28)^2 image "
                   "tokens (default %(default)s)")
    g.add_argument("--new-tokens", type=int, default=32, help="max new tokens per completion (default %(default)s)")
    g.add_argument("--temperature", type=float, default=1.0, help="of the timed rollouts (0 = greedy; with G > 1 "
                   "our sampler only; default 1)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default %(default)s)")
    g.add_argument("--micro-batch", type=int, default=None, help="rows per forward (default: the group size)")
    g.add_argument("--lr", type=float, default=1e-6, help="AdamW learning rate of the update pass")
    g.add_argument("--compile-decode", type=int, default=0, help="our sampler decodes with a static KV cache and "
                   "a torch.compile'd step (CUDA graphs on GPU); the warm-up pays the compilation (default 0)")
    g = p.add_argument_group("timing")
    g.add_argument("--repeats", type=int, default=3, help="timed runs per phase (default %(default)s)")
    g.add_argument("--warmup", type=int, default=1, help="untimed runs per phase first (default %(default)s)")
    g.add_argument("--phases", default="sample,generate,logprob,update",
                   help="comma-separated subset of sample, generate, logprob, update (default: all)")
    g.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak for MFU (default: by GPU name)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("system")
    g.add_argument("--parallel", choices=["ddp", "fsdp"], default="ddp", help="wrapper under torchrun")
    g.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="auto: bf16 on GPU, fp32 on CPU")
    g.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    g.add_argument("--max-pixels", type=int, default=None, help="image pixel budget (default: image-size^2)")
    g.add_argument("--activation-checkpointing", type=int, default=None,
                   help="recompute activations in the update's backward (default: on for GPU, off for CPU)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice; 1 "
                   "is steadier on a shared machine)")
    args = p.parse_args(argv)
    if args.image_size % 28:
        p.error(f"--image-size {args.image_size}: must be a multiple of 28 (patch 14 x merge 2), e.g. 448")
    args.phases = [s.strip() for s in args.phases.split(",") if s.strip()]
    if not set(args.phases) <= {"sample", "generate", "logprob", "update"}:
        p.error(f"--phases {','.join(args.phases)}: choose from sample, generate, logprob, update")
    if args.temperature == 0 and args.group_size > 1 and "generate" in args.phases:  # HF greedy: 1 row per prompt
        p.error("--temperature 0 with --group-size above 1 times our sampler alone: leave generate out of --phases "
                "(e.g. sample,logprob,update)")
    return args

def stats(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}

def alternate(fns: dict, warmup: int, repeats: int, device) -> dict:
    """{name: [(result, seconds, peak GiB) of each timed run]}: the fns in turn (a, b, a, b ...) after `warmup` untimed
    rounds, so that a change of machine load mid-run hits each alike. Peak: torch's on GPU, else the resident set's
    (the kernel's high-water mark, reset before each run on Linux; elsewhere the process's lifetime maximum)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda device: None)
    runs = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            else:  # Linux: 5 makes the peak resident set (ru_maxrss) the current one
                with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            sync(device)
            t0 = time.perf_counter()
            out = fn()
            sync(device)
            dt = time.perf_counter() - t0
            resident_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 2 ** 10  # from kiB
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else resident_peak
            if i >= warmup:
                runs[name].append((out, dt, peak / 2 ** 30))
    return runs

def copy_bandwidth(device) -> float:
    """Bytes per second of a large device-to-device copy (read + write counted), the practical memory limit."""
    n, reps = (2 ** 28, 10) if device.type == "cuda" else (2 ** 26, 3)  # 1 GiB of fp32 on GPU, 256 MiB on CPU
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = src.clone()  # allocated and touched before the timing
    runs = alternate({"copy": lambda: [dst.copy_(src) for _ in range(reps)]}, 0, 1, device)
    return 2 * n * 4 * reps / runs["copy"][0][1]  # one run's seconds

def completions(out) -> list[list[int]]:
    """Each row's completion tokens up to and including the first EOS (the padding cut off)."""
    return [row[:int(length)].tolist() for row, length in zip(out.completion_ids, out.completion_mask.sum(1))]

def model_shape(model) -> dict:
    """Parameter counts and sizes of the Hugging Face model for the FLOP and byte formulas (README: Speed)."""
    def numel(module) -> int:
        return sum(p.numel() for p in module.parameters())
    tc, vc = model.config.text_config, model.config.vision_config
    lm, vis = model.model.language_model, model.model.visual
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    window = (vc.window_size // vc.patch_size) ** 2  # patches per attention window (112 px / 14 px = 8 x 8)
    return dict(layers_params=numel(lm.layers), norm_params=numel(lm.norm), head_params=model.lm_head.weight.numel(),
                n_layers=tc.num_hidden_layers, d_model=tc.hidden_size, d_attn=tc.num_attention_heads * head_dim,
                kv_dim=tc.num_key_value_heads * head_dim, vocab=tc.vocab_size, blocks_params=numel(vis.blocks),
                patch_params=numel(vis.patch_embed), merger_params=numel(vis.merger), d_vis=vc.hidden_size,
                n_blocks=vc.depth, n_full=len(vc.fullatt_block_indexes), window=window, total_params=numel(model))

def forward_flops(shape: dict, rows: list[tuple[int, list[int], int]]) -> float:
    """Model FLOPs of one forward over sequences of (prompt tokens, [completion tokens of each completion that
    follows it], image patches): one completion per sequence on the per-row path, a group's on the shared one."""
    s = shape
    total = 0.0
    for prompt_len, comp_lens, N in rows:  # N image patches
        L = prompt_len + sum(comp_lens)
        pairs = prompt_len ** 2 / 2 + sum(c * prompt_len + c * c / 2 for c in comp_lens)  # causal query-key pairs
        total += 2 * s["layers_params"] * L + 4 * s["n_layers"] * s["d_attn"] * pairs
        total += 2 * s["d_model"] * s["vocab"] * sum(comp_lens)
        attn = s["n_full"] * N + (s["n_blocks"] - s["n_full"]) * min(N, s["window"])
        total += 2 * s["blocks_params"] * N + 4 * s["d_vis"] * N * attn
        total += 2 * s["patch_params"] * N + 2 * s["merger_params"] * N / 4
    return total

def main(argv=None) -> dict:
    args = parse_args(argv)
    dist = common.init_distributed()
    device = dist.device
    torch.set_num_threads(args.threads or torch.get_num_threads())
    args.threads = torch.get_num_threads()  # recorded in the settings
    common.seed_everything(args.seed)
    ac = args.activation_checkpointing if args.activation_checkpointing is not None else int(device.type == "cuda")
    max_pixels = args.max_pixels or args.image_size ** 2
    model, processor = common.load_model(args.model, device=device, dtype=args.dtype, attn=args.attn,
                                         min_pixels=min(3136, max_pixels), max_pixels=max_pixels)
    model.eval()
    param_dtype = next(model.parameters()).dtype
    wrapped = common.wrap_model(model, dist, args.parallel, activation_checkpointing=bool(ac), param_dtype=param_dtype)
    ids = common.special_token_ids(processor)
    pad_id, eos_ids = ids["<|endoftext|>"], [ids["<|im_end|>"], ids["<|endoftext|>"]]
    G, T, micro = args.group_size, args.new_tokens, args.micro_batch or args.group_size
    shape = model_shape(model)

    images = [common.open_image(e.image).resize((args.image_size, args.image_size))
              for e in data.load_dataset("toy", "test").examples]
    prompts = [common.encode_prompt(processor, images[i % len(images)], speciarl.PROMPT) for i in range(args.prompts)]

    bandwidth = copy_bandwidth(device)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    tflops = args.peak_tflops or next((tflops for key, tflops in PEAK_BF16_TFLOPS.items() if key in dev_name), None)
    if tflops is None and device.type == "cuda":
        common.print0(f"unknown GPU {dev_name!r}: no MFU (pass --peak-tflops)")
    fig: dict = {"copy_bandwidth_GBps": bandwidth / 1e9, "image_tokens": int((prompts[0].mm_token_type_ids == 1).sum()),
                 "prompt_tokens": len(prompts[0]), "params": shape["total_params"]}
    fsdp_warmup = common.fsdp_warmup_inputs(wrapped, processor, prompts[0])  # None unless the model is sharded

    # --- rollout: our sampler and Hugging Face generate on the same inputs and knobs, timed in alternation
    gen = torch.Generator(device=device).manual_seed(args.seed)
    torch.manual_seed(args.seed)  # generate draws from the global RNG

    def ours(temperature=args.temperature):
        with common.gathered_params(wrapped, fsdp_warmup):  # a sharded model: parameters gathered once per rollout
            return common.sample(wrapped, processor, prompts, group_size=G, max_new_tokens=T, temperature=temperature,
                                 top_p=args.top_p, generator=gen, compile_decode=bool(args.compile_decode))
    inputs = common.collate_prompts(model, prompts, pad_id, device)
    inputs.pop("position_ids")  # generate computes M-RoPE positions itself from mm_token_type_ids and the grid
    hf_knobs = dict(eos_token_id=eos_ids, pad_token_id=pad_id, max_new_tokens=T, repetition_penalty=1.0,
                    suppress_tokens=[ids["<|image_pad|>"], ids["<|video_pad|>"]])

    def hf_generate(greedy=False):  # the completions (the prompt cut off) and their mask, named as in a Rollout
        with common.gathered_params(wrapped, fsdp_warmup):
            if greedy:  # HF refuses num_return_sequences > 1 without sampling: one row per prompt
                seqs = model.generate(**inputs, do_sample=False, top_k=None, top_p=None, temperature=None, **hf_knobs)
            else:
                seqs = model.generate(**inputs, do_sample=args.temperature > 0, temperature=args.temperature or None,
                                      top_k=0, top_p=args.top_p, num_return_sequences=G, **hf_knobs)
        comp = seqs[:, inputs["input_ids"].shape[1]:]
        return SimpleNamespace(completion_ids=comp, completion_mask=common.completion_mask_from(comp, eos_ids))

    scoring = {"logprob", "update"} & set(args.phases)  # they score our rollout: "sample" runs too
    runs = alternate({name: fn for name, fn in (("sample", ours), ("generate", hf_generate))
                      if name in args.phases or (name == "sample" and scoring)}, args.warmup, args.repeats, device)
    tok_s = {}
    for name, done in runs.items():
        times, tokens = [dt for _, dt, _ in done], [int(out.completion_mask.sum()) for out, _, _ in done]
        tok_s[name] = [n / t for n, t in zip(tokens, times)]
        fig.update({f"{name}_s": stats(times), f"{name}_tok_s": stats(tok_s[name]), f"{name}_tokens": stats(tokens),
                    f"{name}_peak_GiB": max(p for _, _, p in done)})
    if len(runs) == 2:  # the ratio of each alternating pair, then the median
        fig["speedup_time"] = stats([g[1] / s[1] for s, g in zip(runs["sample"], runs["generate"])])
        fig["speedup_tok_s"] = stats([s / g for s, g in zip(tok_s["sample"], tok_s["generate"])])
    if "sample" in runs:
        sampler_stats = [out.stats for out, _, _ in runs["sample"]]
        step_s = [s["decode_s"] / max(1, s["decode_steps"] - 1) for s in sampler_stats]  # steps - 1 after the prefill
        mean_context = max(len(p) for p in prompts) + statistics.median([s["decode_steps"] for s in sampler_stats]) / 2
        # bytes a decode step must read: the language model's weights once, every row's K and V cache
        weights = shape["layers_params"] + shape["norm_params"] + shape["head_params"]
        kv_cache = shape["n_layers"] * 2 * len(prompts) * G * shape["kv_dim"] * mean_context
        step_bytes = (weights + kv_cache) * param_dtype.itemsize
        fig.update(prefill_s=stats([s["prefill_s"] for s in sampler_stats]),
                   decode_step_ms=stats([1e3 * x for x in step_s]), decode_bytes_per_step_MB=step_bytes / 1e6,
                   decode_bandwidth_fraction=step_bytes / bandwidth / statistics.median(step_s))
    if len(runs) == 2:
        # seeded alike, one multinomial a step: exact sampling draws the same tokens if the RNG streams match too
        fig["sampled_identical"] = all(completions(s[0]) == completions(g[0])
                                       for s, g in zip(runs["sample"], runs["generate"]))
        greedy = completions(ours(temperature=0))  # each of our G rows of prompt i = generate's greedy completion of i
        fig["greedy_identical"] = greedy == [row for row in completions(hf_generate(greedy=True)) for _ in range(G)]
        fig["greedy_tokens"] = sum(len(row) for row in greedy)

    # the scoring phases on our last timed rollout, both paths in turn (module docstring; "shared" is the default)
    if scoring:
        rollout = runs["sample"][-1][0]
        row_prompts, comp_ids, comp_mask = rollout.row_prompts, rollout.completion_ids, rollout.completion_mask
        # the sequences a path runs (prompt tokens, [completion tokens], image patches) per micro-batch and run of rows
        # sharing a prompt: one on the shared path; one a row, the later ones encoding no image (images_encoded_once)
        seqs = {"rows": [], "shared": []}
        for s in range(0, len(row_prompts), micro):
            for a, b in common.prompt_runs(row_prompts[s:s + micro]):
                prompt, comp_lens = row_prompts[s + a], comp_mask[s + a:s + b].sum(1).tolist()
                patches = int(prompt.image_grid_thw.prod())
                seqs["shared"].append((len(prompt), comp_lens, patches))
                seqs["rows"] += [(len(prompt), [c], patches if i == 0 else 0) for i, c in enumerate(comp_lens)]
        fig["score_tokens"] = sum(a + sum(b) for a, b, _ in seqs["rows"])  # prompt + completion tokens of every row
        fig["score_tokens_run_shared"] = sum(a + sum(b) for a, b, _ in seqs["shared"])  # what the shared path runs
        temperature = args.temperature or 1.0

        def report(phase: str, fn, flops_factor: int):  # fn(shared) timed on both paths, in turn
            done = alternate({"rows": lambda: fn(False), "shared": lambda: fn(True)}, args.warmup, args.repeats, device)
            for path, name in (("shared", phase), ("rows", f"{phase}_rows")):
                times = [t for _, t, _ in done[path]]
                flops = flops_factor * forward_flops(shape, seqs[path])  # FLOPs run; tokens/s: the tokens scored
                fig.update({f"{name}_s": stats(times), f"{name}_tok_s": stats([fig["score_tokens"] / t for t in times]),
                            f"{name}_TFLOPs": flops / 1e12,
                            f"{name}_mfu": flops / statistics.median(times) / (tflops * 1e12) if tflops else None,
                            f"{name}_peak_GiB": max(p for _, _, p in done[path])})
            fig[f"{phase}_speedup"] = stats([r[1] / s[1] for r, s in zip(done["rows"], done["shared"])])

        if "logprob" in args.phases:  # the no-grad pass
            report("logprob", lambda shared: common.completion_logprobs(
                wrapped, processor, row_prompts, comp_ids, comp_mask, temperature=temperature, micro_batch=micro,
                shared_prefix=shared), 1)
        if "update" in args.phases:  # forward + backward + AdamW, micro-batched, one optimizer step per run
            model.train()
            # fused AdamW kernel on GPU for plain tensors; the default (foreach) one for FSDP2's sharded DTensors
            fused = device.type == "cuda" and not (dist.distributed and args.parallel == "fsdp")
            opt = torch.optim.AdamW(wrapped.parameters(), lr=args.lr, fused=fused)
            advantages = torch.randn(len(row_prompts), generator=torch.Generator().manual_seed(args.seed)).to(device)

            def update(shared: bool):
                opt.zero_grad(set_to_none=True)
                for s in range(0, len(row_prompts), micro):
                    sl = slice(s, s + micro)
                    common.grad_sync(wrapped, s + micro >= len(row_prompts))  # as the methods: one all-reduce a step
                    logp = common.score_completions(wrapped, row_prompts[sl], comp_ids[sl], comp_mask[sl], pad_id,
                                                    temperature, shared_prefix=shared)  # [b, T]
                    mask = comp_mask[sl].to(device).float()  # [b, T] (the rollout's masks are on the CPU)
                    loss = -((logp * mask).sum(1) / mask.sum(1).clamp(min=1) * advantages[sl]).sum() / len(row_prompts)
                    loss.backward()
                opt.step()
            report("update", update, 3)

    settings = dict(vars(args), micro_batch=micro, activation_checkpointing=ac, world_size=dist.world_size,
                    dtype=str(param_dtype).replace("torch.", ""), torch=torch.__version__,
                    transformers=__import__("transformers").__version__,
                    device=f"{dev_name} x{dist.world_size}" if dist.world_size > 1 else dev_name)
    result = {"settings": settings, "figures": fig}
    common.print0(markdown(fig, settings), json.dumps(result), sep="\n")  # the table, then ONE last line of JSON
    common.cleanup_distributed()
    return result

def markdown(fig: dict, settings: dict) -> str:
    head = ("bench.py on {device}: model {model}, {prompts} prompts x G={group_size}, {prompt_tokens} prompt tokens "
            "({image_tokens} image), {new_tokens} new tokens, T={temperature}, top_p={top_p}, {dtype}, repeats "
            "{repeats} after {warmup} warm-up").format_map({**settings, **fig})
    lines = [head, "", "| figure | median | min | max |", "|---|---|---|---|"]
    for k, v in fig.items():
        cells = (f"{v['median']:.4g} | {v['min']:.4g} | {v['max']:.4g}" if isinstance(v, dict)
                 else f"{v:.4g} | |" if isinstance(v, float) else f"{v} | |")
        lines.append(f"| {k} | {cells} |")
    return "\n".join(lines)

if __name__ == "__main__":
    main()
