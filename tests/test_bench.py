"""bench.py end to end on the tiny model (tiny settings, timings never asserted) and the fast log-prob path."""
import json

import pytest

import torch

import bench
import common
import speciarl

FIGURES = ["copy_bandwidth_GBps", "image_tokens", "prompt_tokens", "params",
           "sample_s", "sample_tok_s", "sample_tokens", "sample_peak_GiB", "prefill_s", "decode_step_ms",
           "decode_bytes_per_step_MB", "decode_bandwidth_fraction",
           "generate_s", "generate_tok_s", "generate_tokens", "generate_peak_GiB", "speedup_time", "speedup_tok_s",
           "sampled_identical", "greedy_identical", "greedy_tokens", "score_tokens",
           "logprob_s", "logprob_tok_s", "logprob_TFLOPs", "logprob_mfu", "logprob_peak_GiB",
           "update_s", "update_tok_s", "update_TFLOPs", "update_mfu", "update_peak_GiB"]


def test_bench_smoke_prints_table_and_json(tiny, capsys):
    argv = ["--model", "tiny", "--prompts", "1", "--group-size", "2", "--image-size", "56", "--new-tokens", "5",
            "--repeats", "1", "--warmup", "0", "--peak-tflops", "1"]
    result = bench.main(argv)
    lines = capsys.readouterr().out.strip().splitlines()
    last = json.loads(lines[-1])  # the last line is the JSON record
    assert any(line.startswith("| speedup_time |") for line in lines)  # the markdown table came first
    fig, settings = last["figures"], last["settings"]
    assert fig == json.loads(json.dumps(result["figures"]))
    missing = [k for k in FIGURES if k not in fig]
    assert not missing, missing
    for k in ("sample_s", "generate_s", "speedup_time", "logprob_tok_s", "update_tok_s"):
        assert set(fig[k]) == {"median", "min", "max"} and fig[k]["min"] <= fig[k]["median"] <= fig[k]["max"]
    # our sampler's G rows per prompt equal HF generate's greedy completion of that prompt, token for token
    assert fig["greedy_identical"] is True and fig["greedy_tokens"] > 0
    assert fig["image_tokens"] == 4  # 56 x 56 px: 4 x 4 patches of 14 px, merged 2 x 2
    assert fig["logprob_mfu"] is not None and fig["update_TFLOPs"] > fig["logprob_TFLOPs"] > 0
    for k in ("model", "prompts", "group_size", "image_size", "new_tokens", "temperature", "top_p", "repeats",
              "warmup", "device", "dtype", "torch", "transformers"):
        assert k in settings, k
    assert settings["group_size"] == 2 and settings["new_tokens"] == 5 and settings["device"] == "cpu"


def test_flop_accounting_covers_every_parameter(tiny):
    """The FLOP formula's parameter groups (decoder layers, final norm, lm_head, vision blocks, patch embedding,
    merger) plus the embedding table are the whole model: nothing counted twice, nothing left out."""
    model, _ = tiny
    s = bench.model_shape(model)
    embed = model.model.language_model.embed_tokens.weight.numel()
    parts = s["layers_params"] + s["norm_params"] + s["head_params"] + embed
    parts += s["blocks_params"] + s["patch_params"] + s["merger_params"]
    assert parts == s["total_params"] == sum(p.numel() for p in model.parameters())
    # one row, hand-computed: 2 x params x tokens + causal attention + head on the completion + the vision tower
    L, C, N = 30, 6, 16
    want = 2 * s["layers_params"] * L + 2 * s["n_layers"] * s["d_attn"] * L * L + 2 * s["d_model"] * s["vocab"] * C
    want += 2 * s["blocks_params"] * N + 4 * s["d_vis"] * N * N * s["n_blocks"]  # N <= window: every block sees N
    want += 2 * s["patch_params"] * N + 2 * s["merger_params"] * N / 4
    assert bench.forward_flops(s, [(L - C, [C], N)]) == want
    # the shared prefix: the prompt's pairs once, each completion over the prompt and itself
    shared = bench.forward_flops(s, [(L - C, [C, 2], N)]) - bench.forward_flops(s, [(L - C, [C], N)])
    assert shared == 2 * s["layers_params"] * 2 + 4 * s["n_layers"] * s["d_attn"] * (2 * (L - C) + 2) + \
        2 * s["d_model"] * s["vocab"] * 2


def test_chunked_head_logprobs_equal_full_logits(tiny, toy_test):
    """forward_logprobs projects and scores completion positions chunk by chunk inside the model's forward; values
    and every parameter's gradient must equal the plain path (full logits, then log-softmax)."""
    model, proc = tiny
    prompts = [common.encode_prompt(proc, e.image, speciarl.PROMPT) for e in toy_test.examples[:2]]
    ro = common.sample(model, proc, prompts, group_size=2, max_new_tokens=12, temperature=1.0,
                       generator=torch.Generator().manual_seed(0))
    pad = common.special_token_ids(proc)["<|endoftext|>"]
    inputs = common.scoring_inputs(model, ro.row_prompts, ro.completion_ids, ro.completion_mask, pad, "cpu")
    T = ro.completion_ids.shape[1]

    def plain():
        logits = model(**inputs, use_cache=False, logits_to_keep=T + 1).logits[:, :-1]  # [B, T, V]
        return torch.log_softmax(logits / 0.7, -1).gather(-1, ro.completion_ids[..., None])[..., 0]  # [B, T]

    results = []
    for fn in (plain, lambda: common.forward_logprobs(model, inputs, ro.completion_ids, 0.7)):
        model.zero_grad(set_to_none=True)
        logp = fn()
        (logp * ro.completion_mask).sum().backward()
        results.append((logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    model.zero_grad(set_to_none=True)
    (a, grads_a), (b, grads_b) = results
    assert a.shape == b.shape == ro.completion_ids.shape
    assert torch.allclose(a, b, atol=1e-5)
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-5), name
    assert grads_b["lm_head.weight"].abs().sum() > 0
    assert "forward" not in model.lm_head.__dict__  # the swap of lm_head.forward was undone


def test_static_cache_decode_equals_default(tiny, toy_test, monkeypatch):
    """sample(compile_decode=True) (static KV cache, fixed-shape step) draws the same tokens as the default decode.
    torch.compile is replaced by the identity here to keep the test fast: this checks the static-cache decode
    itself; the compiled step is the same function."""
    model, proc = tiny
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    common.set_pixel_budget(proc, 56 * 56, 224 * 224)
    try:
        im = common.open_image(toy_test.examples[0].image)
        prompts = [common.encode_prompt(proc, im.resize((168, 140)), "Classify the image."),  # two lengths: left pad
                   common.encode_prompt(proc, im.resize((84, 56)), speciarl.PROMPT)]
        for temperature, autocast in ((0.0, False), (1.0, False), (1.0, True)):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):  # fp32 weights, bf16 compute
                runs = [common.sample(model, proc, prompts, group_size=3, max_new_tokens=16, temperature=temperature,
                                      generator=torch.Generator().manual_seed(4), compile_decode=flag)
                        for flag in (False, True)]
            assert torch.equal(runs[0].completion_ids, runs[1].completion_ids)
            assert torch.equal(runs[0].completion_mask, runs[1].completion_mask)
            # bf16: attention over the whole static cache rounds differently (0.021 measured); same tokens
            assert (runs[0].logprobs - runs[1].logprobs).abs().max().item() < (5e-2 if autocast else 1e-4)
    finally:
        common.set_pixel_budget(proc, 112 * 112, 112 * 112)
        model.__dict__.pop("_fgrl_compiled_decode", None)


def test_compiled_decode_is_refused_with_flash_attention_2(tiny, toy_test, monkeypatch):
    """flash-attention 2 ignores the mask over the static cache's unwritten slots: the sampler refuses the pair with a
    message, and every script refuses the flags at start, before loading anything."""
    model, proc = tiny
    prompt = common.encode_prompt(proc, toy_test.examples[0].image, "Classify the image.")
    monkeypatch.setattr(model.config, "_attn_implementation", "flash_attention_2", raising=False)
    assert "flash-attention 2" in common.compile_decode_problem(model)
    with pytest.raises(ValueError, match="flash-attention 2"):
        common.sample(model, proc, [prompt], group_size=1, max_new_tokens=4, compile_decode=True)
    monkeypatch.undo()
    assert common.compile_decode_problem(model) is None
    import dive_k
    import eval as eval_lib
    import fine_r1
    for main, argv in ((dive_k.main, []), (speciarl.main, []), (fine_r1.main, []), (eval_lib.main, ["--protocol", "open"])):
        with pytest.raises(SystemExit) as e:
            main(argv + ["--compile-decode", "1", "--attn", "flash_attention_2"])
        assert "--compile-decode 1" in str(e.value.code), (main.__module__, e.value.code)


def test_nonfinite_logits_stop_sampling_with_a_message(tiny, toy_test):
    """A NaN in the weights: sampling raises NonFiniteLogits naming the step, not a multinomial device assert."""
    model, proc = tiny
    prompt = common.encode_prompt(proc, toy_test.examples[0].image, "Classify the image.")
    weight = model.lm_head.weight
    saved = weight.detach()[5].clone()
    with torch.no_grad():
        weight[5, 0] = float("nan")  # one row of the head: that token's logit is NaN everywhere
    try:
        with pytest.raises(common.NonFiniteLogits, match="NaN or inf"):
            common.sample(model, proc, [prompt], group_size=2, max_new_tokens=4, temperature=1.0,
                          generator=torch.Generator().manual_seed(0))
    finally:
        with torch.no_grad():
            weight[5] = saved
