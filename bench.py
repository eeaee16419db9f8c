"""
bench.py: speed and memory of the three phases of a GRPO step on Qwen2.5-VL, in one run.

  1. rollout   our sampler (common.sample: prefill once per prompt, KV shared by the group) against Hugging Face
               `model.generate(num_return_sequences=G)` on the same prompts and the same sampling settings, as a
               ratio; generated tokens per second; the decode step against the memory-bandwidth limit; and a check
               that both give the same tokens under greedy decoding;
  2. log-probs the no-grad scoring pass of the rollout (common.completion_logprobs), tokens per second and MFU;
  3. update    forward + backward + AdamW step on the same rows (common.score_completions on the wrapped model),
               tokens per second, MFU and peak memory.
  Phases 2 and 3 run both scoring paths in alternation: the shared prefix (each prompt once for its group's
  completions; the figures without suffix) and one sequence per completion (suffix _rows), with their pairwise
  ratio (logprob_speedup, update_speedup: rows time / shared time, median of the pairs).
Every figure is the median (and min, max) over --repeats timed runs after --warmup untimed ones. The run prints a
markdown table, then ONE last line of JSON with every figure and every setting, so that runs can be compared.

Launch lines:
  python bench.py --model tiny                                     # CPU: 4 prompts of 256 image tokens, G=8, 32 tokens
  python bench.py --model qwen2.5-vl-30m-random --phases sample,logprob,update  # CPU: a model whose layers dominate
  python bench.py --model qwen2.5-vl-35m-random --phases sample,logprob,update  # CPU, the real 151,936 vocabulary
  python bench.py --model qwen2.5-vl-3b-random --prompts 8 --new-tokens 256     # one GPU, bf16, random weights
  python bench.py --model qwen2.5-vl-7b-random --prompts 4 --new-tokens 256
  torchrun --nproc-per-node 8 bench.py --model Qwen/Qwen2.5-VL-7B-Instruct --parallel fsdp  # figures are per GPU (rank 0)

How each figure is defined (tokens, the decode step's bandwidth limit, the FLOPs behind MFU, peak memory):
README, section "Speed".
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import threading
import time

import torch

import common
import data
import memory
import speciarl

# ----- 1. setup ---------------------------------------------------------------------------------------------------

# dense bf16 peaks (TFLOP/s) by a substring of torch.cuda.get_device_name, most specific first
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0, "H800": 989.0,
                    "GH200": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and workload")
    g.add_argument("--model", default="tiny", help="hub id, local directory, 'tiny', or a random preset: "
                   "qwen2.5-vl-30m-random or -35m-random (CPU; 35m has the real vocabulary), qwen2.5-vl-3b-random, "
                   "qwen2.5-vl-7b-random (default %(default)s)")
    g.add_argument("--prompts", type=int, default=4, help="prompts per rollout batch (default %(default)s)")
    g.add_argument("--group-size", type=int, default=8, help="completions per prompt G (default %(default)s)")
    g.add_argument("--image-size", type=int, default=448, help="square image side in pixels, a multiple of 28: "
                   "(S/28)^2 image tokens, 448 -> 256 (default %(default)s)")
    g.add_argument("--new-tokens", type=int, default=32, help="max new tokens per completion (default %(default)s)")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the timed rollouts "
                   "(0 = greedy; default %(default)s)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default %(default)s)")
    g.add_argument("--micro-batch", type=int, default=None, help="rows per log-prob / update forward "
                   "(default: the group size)")
    g.add_argument("--lr", type=float, default=1e-6, help="AdamW learning rate of the update pass")
    g.add_argument("--compile-decode", type=int, default=0, help="our sampler decodes with a static KV cache and a "
                   "torch.compile'd step (CUDA graphs on GPU); the warm-up run pays the compilation (default 0)")
    g = p.add_argument_group("timing")
    g.add_argument("--repeats", type=int, default=3, help="timed runs per phase (default %(default)s)")
    g.add_argument("--warmup", type=int, default=1, help="untimed runs per phase first (default %(default)s)")
    g.add_argument("--phases", default="sample,generate,logprob,update",
                   help="comma-separated subset of sample, generate, logprob, update (default: all)")
    g.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the device for MFU "
                   "(default: from the GPU name: H100/H200 989, A100 312)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("system")
    g.add_argument("--parallel", choices=["ddp", "fsdp"], default="ddp", help="wrapper under torchrun")
    g.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                   help="weights and compute: auto (bf16 on GPU, fp32 on CPU), bf16, fp32")
    g.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    g.add_argument("--max-pixels", type=int, default=None, help="image pixel budget (default: image-size^2)")
    g.add_argument("--activation-checkpointing", type=int, default=None,
                   help="recompute activations in the update's backward (default: on for GPU, off for CPU)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice); "
                   "1 gives steadier numbers on a machine shared with other jobs")
    args = p.parse_args(argv)
    if args.image_size % 28:
        p.error(f"--image-size {args.image_size}: must be a multiple of 28 (patch 14 x merge 2), e.g. 448")
    args.phases = [s.strip() for s in args.phases.split(",") if s.strip()]
    unknown = set(args.phases) - {"sample", "generate", "logprob", "update"}
    if unknown:
        p.error(f"--phases: unknown {sorted(unknown)}; choose from sample, generate, logprob, update")
    return args


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    """(result, seconds) of fn(), synchronised on GPU."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def stats(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


class ResidentPeak(threading.Thread):
    """The largest resident set of this process seen since start(), read from /proc/self/statm every 2 ms: a peak
    per phase on CPU, where ru_maxrss only knows the process's lifetime maximum. (Torch releases the GIL in its
    kernels, so the thread gets to look during them.)"""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.running = memory.resident_bytes(), True

    def run(self):
        while self.running:
            self.peak = max(self.peak, memory.resident_bytes())
            time.sleep(0.002)


_RESIDENT: ResidentPeak | None = None


def reset_peak(device):
    global _RESIDENT
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif os.path.exists("/proc/self/statm"):
        if _RESIDENT is not None:
            _RESIDENT.running = False
        _RESIDENT = ResidentPeak()
        _RESIDENT.start()


def peak_gib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    if _RESIDENT is not None:
        return max(_RESIDENT.peak, memory.resident_bytes()) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # kiB -> GiB, process-wide maximum


def copy_bandwidth(device) -> float:
    """Bytes per second of a large device-to-device copy (read + write counted), the practical memory limit."""
    n = (2 ** 28 if device.type == "cuda" else 2 ** 26)  # 1 GiB of fp32 on GPU, 256 MiB on CPU
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    reps = 10 if device.type == "cuda" else 3
    _, dt = timed(lambda: [dst.copy_(src) for _ in range(reps)], device)
    del src, dst
    return 2 * n * 4 * reps / dt


def device_peak_flops(device, override):
    if override:
        return override * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    common.print0(f"unknown GPU {name!r}: no MFU (pass --peak-tflops)")
    return None


def same_completions(ids_a, mask_a, ids_b, mask_b) -> bool:
    """Row for row the same completion tokens up to and including the first EOS (padding ignored)."""
    if ids_a.shape[0] != ids_b.shape[0]:
        return False
    for row in range(ids_a.shape[0]):
        n_a, n_b = int(mask_a[row].sum()), int(mask_b[row].sum())
        if n_a != n_b or ids_a[row, :n_a].tolist() != ids_b[row, :n_b].tolist():
            return False
    return True


# ----- 2. FLOP and byte counts ------------------------------------------------------------------------------------

def numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


def model_shape(model) -> dict:
    """Parameter counts and sizes for the FLOP and byte formulas (see the header docstring)."""
    hf = common.unwrap(model)
    tc, vc = hf.config.text_config, hf.config.vision_config
    lm, vis = hf.model.language_model, hf.model.visual
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    window = (vc.window_size // vc.patch_size) ** 2  # patches per attention window (112 px / 14 px = 8 x 8)
    return dict(
        layers_params=numel(lm.layers), norm_params=numel(lm.norm), head_params=hf.lm_head.weight.numel(),
        n_layers=tc.num_hidden_layers, d_model=tc.hidden_size, d_attn=tc.num_attention_heads * head_dim,
        kv_dim=tc.num_key_value_heads * head_dim, vocab=tc.vocab_size,
        blocks_params=numel(vis.blocks), patch_params=numel(vis.patch_embed), merger_params=numel(vis.merger),
        d_vis=vc.hidden_size, n_blocks=vc.depth, n_full=len(vc.fullatt_block_indexes), window=window,
        total_params=numel(hf))


def forward_flops(shape: dict, rows: list[tuple[int, list[int], int]]) -> float:
    """Model FLOPs of one forward over sequences of (prompt tokens, [completion tokens of each completion that
    follows it], image patches): one completion per sequence on the per-row path, a group's on the shared one."""
    s = shape
    total = 0.0
    for prompt_len, comp_lens, patches in rows:
        L = prompt_len + sum(comp_lens)
        pairs = prompt_len ** 2 / 2 + sum(c * prompt_len + c * c / 2 for c in comp_lens)  # causal query-key pairs
        total += 2 * s["layers_params"] * L + 4 * s["n_layers"] * s["d_attn"] * pairs
        total += 2 * s["d_model"] * s["vocab"] * sum(comp_lens)
        N = patches
        attn = s["n_full"] * N + (s["n_blocks"] - s["n_full"]) * min(N, s["window"])
        total += 2 * s["blocks_params"] * N + 4 * s["d_vis"] * N * attn
        total += 2 * s["patch_params"] * N + 2 * s["merger_params"] * N / 4
    return total


def decode_bytes_per_step(shape: dict, rows: int, mean_context: float, elsize: int) -> float:
    """Bytes one decode step must read: the language model's weights once, and every row's K and V cache."""
    weights = (shape["layers_params"] + shape["norm_params"] + shape["head_params"]) * elsize
    kv = shape["n_layers"] * 2 * rows * shape["kv_dim"] * mean_context * elsize
    return weights + kv


# ----- 3. the bench -----------------------------------------------------------------------------------------------

def main(argv=None) -> dict:
    args = parse_args(argv)
    d = common.init_distributed()
    device = d.device
    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()  # recorded in the settings
    common.seed_everything(args.seed)
    ac = args.activation_checkpointing if args.activation_checkpointing is not None else int(device.type == "cuda")
    max_pixels = args.max_pixels or args.image_size ** 2
    model, proc = common.load_model(args.model, device=device, dtype=args.dtype, attn=args.attn,
                                    min_pixels=min(3136, max_pixels), max_pixels=max_pixels)
    common.set_pixel_budget(proc, min(3136, max_pixels), max_pixels)
    model.eval()
    param_dtype = next(model.parameters()).dtype
    wrapped = common.wrap_model(model, d, args.parallel, activation_checkpointing=bool(ac), param_dtype=param_dtype)
    ids = common.special_token_ids(proc)
    pad_id, eos_ids = ids["<|endoftext|>"], [ids["<|im_end|>"], ids["<|endoftext|>"]]
    G, T = args.group_size, args.new_tokens
    micro = args.micro_batch or G
    shape = model_shape(model)

    # prompts: toy test images resized to image-size x image-size, the tiny model's classification prompt
    toy = data.load_dataset("toy", "test")
    images = [common.open_image(e.image).resize((args.image_size, args.image_size)) for e in toy.examples]
    prompts = [common.encode_prompt(proc, images[i % len(images)], speciarl.PROMPT)
               for i in range(args.prompts)]
    image_tokens = int((prompts[0].mm_token_type_ids == 1).sum())
    patches = [int(p.image_grid_thw.prod()) for p in prompts]

    bandwidth = copy_bandwidth(device)
    peak = device_peak_flops(device, args.peak_tflops)
    fig: dict = {"copy_bandwidth_GBps": bandwidth / 1e9, "image_tokens": image_tokens,
                 "prompt_tokens": len(prompts[0]), "params": shape["total_params"]}
    # sampling on a sharded model: gather the parameters once for the whole rollout phase (no-op otherwise)
    gather = lambda: common.gathered_params(wrapped, common.fsdp_warmup_inputs(wrapped, proc, prompts[0]))  # noqa: E731
    knobs = dict(temperature=args.temperature, top_p=args.top_p, top_k=0, repetition_penalty=1.0)

    # --- rollout: our sampler and Hugging Face generate on the same inputs and knobs, timed in alternation (ours,
    # generate, ours, generate ...) so that a change of machine load mid-run hits both alike
    gen = torch.Generator(device=device)
    gen.manual_seed(args.seed)
    torch.manual_seed(args.seed)  # generate draws from the global RNG

    def ours(**kw):
        with gather():
            return common.sample(wrapped, proc, prompts, group_size=G, max_new_tokens=T, generator=gen,
                                 compile_decode=bool(args.compile_decode), **{**knobs, **kw})
    hf = common.unwrap(wrapped)
    inputs = common.collate_prompts(hf, prompts, pad_id, device)
    inputs.pop("position_ids")  # generate computes M-RoPE positions itself from mm_token_type_ids and the grid
    hf_knobs = dict(eos_token_id=eos_ids, pad_token_id=pad_id, max_new_tokens=T, repetition_penalty=1.0,
                    suppress_tokens=[ids["<|image_pad|>"], ids["<|video_pad|>"]])

    def hf_generate(greedy=False):
        """[rows, T'] completion ids (prompt cut off) and their completion mask."""
        with gather():
            if greedy:  # HF refuses num_return_sequences > 1 without sampling: one row per prompt
                seqs = hf.generate(**inputs, do_sample=False, top_k=None, top_p=None, temperature=None, **hf_knobs)
            else:
                seqs = hf.generate(**inputs, do_sample=args.temperature > 0, temperature=args.temperature or None,
                                   top_k=0, top_p=args.top_p, num_return_sequences=G, **hf_knobs)
        comp = seqs[:, inputs["input_ids"].shape[1]:]
        return comp, common.completion_mask_from(comp, eos_ids)

    methods = {name: fn for name, fn in (("sample", ours), ("generate", hf_generate))
               if name in args.phases or (name == "sample" and {"logprob", "update"} & set(args.phases))}
    runs = {name: [] for name in methods}
    for i in range(args.warmup + args.repeats):
        for name, fn in methods.items():
            reset_peak(device)
            out, dt = timed(fn, device)
            if i >= args.warmup:
                runs[name].append((out, dt, peak_gib(device)))
    rollout = runs["sample"][-1][0] if "sample" in runs else None
    for name, done in runs.items():
        times = [dt for _, dt, _ in done]
        masks = [out.completion_mask if name == "sample" else out[1] for out, _, _ in done]
        tokens = [int(m.sum()) for m in masks]
        fig[f"{name}_s"] = stats(times)
        fig[f"{name}_tok_s"] = stats([n / t for n, t in zip(tokens, times)])
        fig[f"{name}_tokens"] = stats(tokens)
        fig[f"{name}_peak_GiB"] = max(p for _, _, p in done)
    if len(runs) == 2:  # the ratio of each alternating pair, then the median
        pairs = list(zip(runs["sample"], runs["generate"]))
        fig["speedup_time"] = stats([g[1] / s[1] for s, g in pairs])
        fig["speedup_tok_s"] = stats([(int(s[0].completion_mask.sum()) / s[1]) / (int(g[0][1].sum()) / g[1])
                                      for s, g in pairs])
    if "sample" in runs:
        st = [out.stats for out, _, _ in runs["sample"]]
        steps = [s["decode_steps"] for s in st]
        step_s = [s["decode_s"] / max(1, s["decode_steps"] - 1) for s in st]  # forwards = steps - 1 after prefill
        fig["prefill_s"] = stats([s["prefill_s"] for s in st])
        fig["decode_step_ms"] = stats([1e3 * x for x in step_s])
        width = max(len(p) for p in prompts)
        mean_ctx = width + statistics.median(steps) / 2
        elsize = torch.finfo(param_dtype).bits // 8
        step_bytes = decode_bytes_per_step(shape, len(prompts) * G, mean_ctx, elsize)
        fig["decode_bytes_per_step_MB"] = step_bytes / 1e6
        fig["decode_bandwidth_fraction"] = step_bytes / bandwidth / statistics.median(step_s)
    if len(runs) == 2:
        # both draw from a generator seeded alike, one multinomial per step over the same probabilities: when the
        # sampling is exact they draw the same tokens (reported, not required: it also needs the same RNG stream)
        fig["sampled_identical"] = all(same_completions(s[0].completion_ids, s[0].completion_mask, *g[0])
                                       for s, g in zip(runs["sample"], runs["generate"]))
        # greedy: every one of our G rows of prompt i must equal generate's greedy completion of prompt i
        ours_greedy = ours(temperature=0)
        comp, mask = hf_generate(greedy=True)
        fig["greedy_identical"] = same_completions(ours_greedy.completion_ids, ours_greedy.completion_mask,
                                                   comp.repeat_interleave(G, 0), mask.repeat_interleave(G, 0))
        fig["greedy_tokens"] = int(ours_greedy.completion_mask.sum())

    # rows to score: the last timed rollout of ours. Each scoring phase runs both paths of common.score_completions,
    # alternating (rows, shared, rows, shared ...): "rows" = one sequence per completion, "shared" = each prompt once
    # for the completions of its group (the default); the figures without a suffix are the shared path's
    if rollout is not None and ("logprob" in args.phases or "update" in args.phases):
        row_prompts, comp_ids, comp_mask = rollout.row_prompts, rollout.completion_ids, rollout.completion_mask
        # the per-row forward encodes an image once per run of rows that repeat it within a micro-batch
        # (common.images_encoded_once): a row that repeats the previous row's image adds no vision FLOPs
        rows = [(len(p), [int(comp_mask[r].sum())],
                 0 if r % micro and row_prompts[r - 1] is p else patches[r // G]) for r, p in enumerate(row_prompts)]
        # the shared path: per micro-batch, one sequence per run of rows sharing a prompt (its completions after it)
        packed = []
        for s in range(0, len(row_prompts), micro):
            for a, b in common.prompt_runs(row_prompts[s:s + micro]):
                packed.append((len(row_prompts[s + a]), comp_mask[s + a:s + b].sum(1).tolist(), patches[(s + a) // G]))
        work = {"rows": (sum(a + sum(b) for a, b, _ in rows), forward_flops(shape, rows)),
                "shared": (sum(a + sum(b) for a, b, _ in packed), forward_flops(shape, packed))}
        fig["score_tokens"] = work["rows"][0]  # prompt + completion tokens of every scored row
        fig["score_tokens_run_shared"] = work["shared"][0]  # the tokens the shared path actually runs
        temperature = args.temperature or 1.0

        def alternate(fn) -> dict:
            """{path: [(seconds, peak GiB)]} of fn(shared) over warm-up + repeats rounds of both paths."""
            done = {"rows": [], "shared": []}
            for i in range(args.warmup + args.repeats):
                for path in done:
                    reset_peak(device)
                    _, dt = timed(lambda: fn(path == "shared"), device)
                    if i >= args.warmup:
                        done[path].append((dt, peak_gib(device)))
            return done

        def report(phase: str, done: dict, flops_factor: int):
            for path, suffix in (("shared", ""), ("rows", "_rows")):
                times = [t for t, _ in done[path]]
                tokens, flops = work["rows"][0], work[path][1]  # tokens scored (per row, either path); FLOPs run
                fig[f"{phase}{suffix}_s"] = stats(times)
                fig[f"{phase}{suffix}_tok_s"] = stats([tokens / t for t in times])
                fig[f"{phase}{suffix}_TFLOPs"] = flops_factor * flops / 1e12
                fig[f"{phase}{suffix}_mfu"] = flops_factor * flops / statistics.median(times) / peak if peak else None
                fig[f"{phase}{suffix}_peak_GiB"] = max(p for _, p in done[path])
            fig[f"{phase}_speedup"] = stats([r / s for (r, _), (s, _) in zip(done["rows"], done["shared"])])

        # --- log-prob pass (no grad)
        if "logprob" in args.phases:
            report("logprob", alternate(lambda shared: common.completion_logprobs(
                wrapped, proc, row_prompts, comp_ids, comp_mask, temperature=temperature, micro_batch=micro,
                shared_prefix=shared)), 1)

        # --- update pass: forward + backward + AdamW, micro-batched, one optimizer step per run
        if "update" in args.phases:
            model.train()
            # fused AdamW kernel on GPU for plain tensors; the default (foreach) one for FSDP2's sharded DTensors
            fused = device.type == "cuda" and not (d.distributed and args.parallel == "fsdp")
            opt = torch.optim.AdamW(wrapped.parameters(), lr=args.lr, fused=fused)
            advantages = torch.randn(len(row_prompts), generator=torch.Generator().manual_seed(args.seed))  # [B]
            n_micro = (len(row_prompts) + micro - 1) // micro

            def update(shared: bool):
                opt.zero_grad(set_to_none=True)
                for k, s in enumerate(range(0, len(row_prompts), micro)):
                    sl = slice(s, s + micro)
                    common.grad_sync(wrapped, k == n_micro - 1)  # as the methods: DDP all-reduces once per step
                    logp = common.score_completions(wrapped, row_prompts[sl], comp_ids[sl], comp_mask[sl], pad_id,
                                                    temperature, shared_prefix=shared)  # [b, T]
                    mask = comp_mask[sl].to(logp.device).float()  # [b, T]
                    adv = advantages[sl].to(logp.device)  # [b]
                    loss = -((logp * mask).sum(1) / mask.sum(1).clamp(min=1) * adv).sum() / len(row_prompts)
                    loss.backward()
                opt.step()
            report("update", alternate(update), 3)
            model.eval()

    # ----- 4. report ----------------------------------------------------------------------------------------------
    settings = {k: v for k, v in vars(args).items()}
    settings.update(micro_batch=micro, activation_checkpointing=ac, dtype=str(param_dtype).replace("torch.", ""),
                    world_size=d.world_size, torch=torch.__version__, transformers=__import__("transformers").__version__)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    settings["device"] = f"{dev_name} x{d.world_size}" if d.world_size > 1 else dev_name
    result = {"settings": settings, "figures": fig}
    common.print0(markdown(fig, settings))
    common.print0(json.dumps(result))
    common.cleanup_distributed()
    return result


def markdown(fig: dict, settings: dict) -> str:
    """The table: one row per figure, median / min / max where repeated."""
    head = (f"bench.py on {settings['device']}: model {settings['model']}, {settings['prompts']} prompts x G="
            f"{settings['group_size']}, {fig['prompt_tokens']} prompt tokens ({fig['image_tokens']} image), "
            f"{settings['new_tokens']} new tokens, T={settings['temperature']}, top_p={settings['top_p']}, "
            f"{settings['dtype']}, repeats {settings['repeats']} after {settings['warmup']} warm-up")
    lines = [head, "", "| figure | median | min | max |", "|---|---|---|---|"]
    for k, v in fig.items():
        if isinstance(v, dict):
            lines.append(f"| {k} | {v['median']:.4g} | {v['min']:.4g} | {v['max']:.4g} |")
        elif isinstance(v, float):
            lines.append(f"| {k} | {v:.4g} | | |")
        else:
            lines.append(f"| {k} | {v} | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
