"""The rollout sampler and the log-prob function."""
import pytest
import torch

import common
import speciarl


def _prompts(proc, exs, text=speciarl.PROMPT):
    return [common.encode_prompt(proc, e.image, text) for e in exs]


def test_sampled_logprobs_match_recomputed(tiny, toy_test):
    model, proc = tiny
    prompts = _prompts(proc, toy_test.examples[:3])
    g = torch.Generator().manual_seed(0)
    ro = common.sample(model, proc, prompts, group_size=4, max_new_tokens=24, temperature=0.9, generator=g)
    assert ro.completion_ids.shape[0] == 12 and len(ro.texts) == 12
    lp = common.completion_logprobs(model, proc, ro.row_prompts, ro.completion_ids, ro.completion_mask,
                                    temperature=0.9, micro_batch=5)
    assert (lp - ro.logprobs).abs().max().item() < 1e-4
    assert ro.completion_mask.sum() > 0


def test_greedy_equals_hf_generate(tiny, toy_test):
    model, proc = tiny
    prompts = _prompts(proc, toy_test.examples[:2])
    ro = common.sample(model, proc, prompts, group_size=1, max_new_tokens=30, temperature=0)
    ids = common.special_token_ids(proc)
    for i, p in enumerate(prompts):
        inp = common.collate_prompts(model, [p], ids["<|endoftext|>"], "cpu")
        inp.pop("position_ids")
        out = model.generate(**inp, do_sample=False, max_new_tokens=30, eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
                             pad_token_id=ids["<|endoftext|>"], suppress_tokens=[ids["<|image_pad|>"], ids["<|video_pad|>"]],
                             repetition_penalty=1.0, top_k=None, top_p=None, temperature=None)
        gen = out[0, inp["input_ids"].shape[1]:]
        n = int(ro.completion_mask[i].sum())
        assert gen[:n].tolist() == ro.completion_ids[i, :n].tolist()


def test_autocast_keeps_the_rollout_cache_in_the_compute_dtype(tiny, toy_test):
    """fp32 weights under bf16 autocast (dive_k and fine_r1 on one GPU or DDP): the preallocated KV cache is stored
    in bf16, what attention consumes anyway (RoPE hands over fp32 keys), and sampling under autocast agrees with the
    same call's recomputed log-probs."""
    model, proc = tiny
    prompts = _prompts(proc, toy_test.examples[:2])
    pad = common.special_token_ids(proc)["<|endoftext|>"]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        batch = common.collate_prompts(model, prompts, pad, "cpu")
        out = model(**batch, use_cache=True, logits_to_keep=1)
        width = batch["input_ids"].shape[1]
        cache = common.expand_cache(common.returned_cache(out), 3, width + 8)
        for layer in cache.layers:
            assert [b.dtype for b in layer.buffers] == [torch.bfloat16] * 2 and layer.dtype == torch.bfloat16
            assert layer.buffers[0].shape == (6, 2, width + 8, 32) and layer.keys.shape[2] == width
        g = torch.Generator().manual_seed(0)
        ro = common.sample(model, proc, prompts, group_size=3, max_new_tokens=16, temperature=0.9, generator=g)
        lp = common.completion_logprobs(model, proc, ro.row_prompts, ro.completion_ids, ro.completion_mask,
                                        temperature=0.9, micro_batch=6)
    assert ro.completion_mask.sum() > 0 and (lp - ro.logprobs).abs().max().item() < 1e-3  # 1e-5 measured


def test_row_seeds_give_each_row_its_own_stream(tiny, toy_test):
    """With row_seeds a row's sample depends on its seed only: the same whether its prompt is sampled alone or with
    others, in another prompt batch; a different seed draws differently; a one-token nucleus is still greedy (the
    inverse-CDF draw never picks a filtered-out token)."""
    model, proc = tiny
    prompts = _prompts(proc, toy_test.examples[:3])
    seeds = [11, 12, 21, 22, 31, 32]  # prompt-major: rows p*G+g
    together = common.sample(model, proc, prompts, group_size=2, max_new_tokens=24, temperature=1.0,
                             row_seeds=seeds)
    split = common.sample(model, proc, prompts, group_size=2, max_new_tokens=24, temperature=1.0,
                          row_seeds=seeds, prompt_batch=1)
    alone = common.sample(model, proc, prompts[1:2], group_size=2, max_new_tokens=24, temperature=1.0,
                          row_seeds=seeds[2:4])
    assert together.texts == split.texts and together.texts[2:4] == alone.texts
    lp = common.completion_logprobs(model, proc, together.row_prompts, together.completion_ids,
                                    together.completion_mask, temperature=1.0)
    assert (lp - together.logprobs).abs().max().item() < 1e-4
    other = common.sample(model, proc, prompts, group_size=2, max_new_tokens=24, temperature=1.0,
                          row_seeds=[s + 100 for s in seeds])
    assert other.texts != together.texts
    greedy = common.sample(model, proc, prompts, group_size=1, max_new_tokens=24, temperature=0)
    top1 = common.sample(model, proc, prompts, group_size=1, max_new_tokens=24, temperature=1.0, top_p=1e-6,
                         row_seeds=[1, 2, 3])
    assert top1.texts == greedy.texts
    # the draws follow the distribution: 4000 first tokens of one prompt at T=1.5 against their probabilities
    many = common.sample(model, proc, prompts[:1], group_size=4000, max_new_tokens=1, temperature=1.5,
                         row_seeds=range(4000))
    first, p_first = many.completion_ids[:, 0], many.logprobs[:, 0].exp()
    for token in first.unique():
        p = float(p_first[first == token][0])
        freq = float((first == token).float().mean())
        assert abs(freq - p) < 4 * (p * (1 - p) / 4000) ** 0.5 + 1e-3, (int(token), freq, p)
    assert len(first.unique()) > 1
    with pytest.raises(ValueError, match="5 row_seeds for 6 rows"):
        common.sample(model, proc, prompts, group_size=2, max_new_tokens=4, temperature=1.0, row_seeds=seeds[:5])


def test_mask_stops_at_first_eos():
    tokens = torch.tensor([[5, 7, 2, 9, 2], [2, 3, 3, 3, 3], [4, 4, 4, 4, 4]])
    assert common.completion_mask_from(tokens, [2, 99]).tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]


def test_rollout_masks_and_truncation(tiny, toy_test):
    model, proc = tiny
    ids = common.special_token_ids(proc)
    prompts = _prompts(proc, toy_test.examples[:2])
    ro = common.sample(model, proc, prompts, group_size=3, max_new_tokens=6, temperature=1.0,
                       generator=torch.Generator().manual_seed(1))
    assert bool(ro.truncated.all())  # 6 tokens cannot hold a whole answer
    ro = common.sample(model, proc, prompts, group_size=3, max_new_tokens=60, temperature=1.0,
                       generator=torch.Generator().manual_seed(1))
    eos = {ids["<|im_end|>"], ids["<|endoftext|>"]}
    for row in range(6):
        toks = ro.completion_ids[row].tolist()
        n = int(ro.completion_mask[row].sum())
        if not ro.truncated[row]:
            assert toks[n - 1] in eos and not any(t in eos for t in toks[:n - 1])
            assert all(t == ids["<|endoftext|>"] for t in toks[n:])


def test_left_padding_matches_alone(tiny, toy_test):
    """Prompts with different image sizes (so different lengths, left-padded together) score their completions the
    same as each prompt alone."""
    model, proc = tiny
    common.set_pixel_budget(proc, 56 * 56, 224 * 224)
    try:
        im = common.open_image(toy_test.examples[0].image)
        big = im.resize((168, 140))
        small = im.resize((84, 56))
        p_big = common.encode_prompt(proc, big, "Classify the image.")
        p_small = common.encode_prompt(proc, small, "Classify the image.")
        assert len(p_big) != len(p_small)
        ro = common.sample(model, proc, [p_big, p_small], group_size=2, max_new_tokens=16, temperature=1.0,
                           generator=torch.Generator().manual_seed(3))
        both = common.completion_logprobs(model, proc, ro.row_prompts, ro.completion_ids, ro.completion_mask)
        for row, p in enumerate(ro.row_prompts):
            alone = common.completion_logprobs(model, proc, [p], ro.completion_ids[row:row + 1],
                                               ro.completion_mask[row:row + 1])
            assert (alone[0] - both[row]).abs().max().item() < 1e-4
        assert (both - ro.logprobs).abs().max().item() < 1e-4
    finally:
        common.set_pixel_budget(proc, 112 * 112, 112 * 112)


def test_repetition_penalty_and_top_p_change_sampling(tiny, toy_test):
    model, proc = tiny
    prompts = _prompts(proc, toy_test.examples[:2])
    base = common.sample(model, proc, prompts, group_size=4, max_new_tokens=20, temperature=1.0, top_p=1e-6,
                         generator=torch.Generator().manual_seed(0))
    greedy = common.sample(model, proc, prompts, group_size=1, max_new_tokens=20, temperature=0)
    # sampling from a one-token nucleus is greedy decoding
    for i in range(2):
        n = int(greedy.completion_mask[i].sum())
        for j in range(4):
            assert base.completion_ids[i * 4 + j, :n].tolist() == greedy.completion_ids[i, :n].tolist()
    pen = common.sample(model, proc, prompts, group_size=1, max_new_tokens=20, temperature=0, repetition_penalty=5.0)
    assert pen.completion_ids.tolist() != greedy.completion_ids[:, :pen.completion_ids.shape[1]].tolist()


def test_top_p_filter():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = common.top_p_filter(logits, 0.7).isfinite()
    assert kept.tolist() == [[True, True, False, False]]


def test_sampler_passes_the_cache_under_its_current_name(tiny, toy_test, monkeypatch):
    """transformers 5.2x renamed the forward's `past_key_values` to `cache` (the old name warns on every call and goes
    away in 5.40): the sampler and the compiled step use whichever name the installed version's forward takes."""
    import inspect
    import warnings
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.utils import generic
    params = inspect.signature(Qwen2_5_VLForConditionalGeneration.forward).parameters
    assert common.cache_keyword() == ("cache" if "cache" in params else "past_key_values")
    model, proc = tiny
    told = []
    monkeypatch.setattr(generic.logger, "warning_once", lambda msg, *a, **k: told.append(msg), raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        common.sample(model, proc, _prompts(proc, toy_test.examples[:1]), group_size=2, max_new_tokens=6,
                      generator=torch.Generator().manual_seed(0))
    said = told + [str(w.message) for w in caught]
    assert not [m for m in said if "past_key_values" in m], said


def test_decode_steps_never_wait_for_the_host(tiny, toy_test, monkeypatch):
    """No host read (item, bool, cpu, tolist, int, float) inside a decode step, with top-p, a repetition penalty
    and the pad suppression on: the reads of a call do not grow with its length when the every-few-steps look at
    "has every row ended?" is off."""
    model, proc = tiny
    prompts = _prompts(proc, toy_test.examples[:2])
    monkeypatch.setattr(common, "FINISHED_CHECK_EVERY", 10 ** 6)
    reads = [0]
    for name in ("item", "__bool__", "cpu", "tolist", "__int__", "__float__"):
        def counted(self, *args, _read=getattr(torch.Tensor, name), **kwargs):
            reads[0] += 1
            return _read(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)

    def reads_of(new_tokens):
        reads[0] = 0
        common.sample(model, proc, prompts, group_size=3, max_new_tokens=new_tokens, temperature=1.0, top_p=0.9,
                      repetition_penalty=1.1, generator=torch.Generator().manual_seed(0))
        return reads[0]
    reads_of(4)  # first call: one-off reads (caches filled inside transformers)
    assert reads_of(6) == reads_of(16)


def test_top_p_filter_keeps_what_a_full_sort_keeps(monkeypatch):
    """Both nucleus filters (a sort up to SORTED_NUCLEUS_VOCAB tokens, above it the bisection on the probabilities'
    bits) against the sort-based rule of HF's TopPLogitsWarper (keep a token while the mass before it is below
    top_p), on random rows from flat to peaked."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 5000, generator=generator) * torch.linspace(0.1, 8, 16)[:, None]  # flat to peaked
    for top_p in (0.3, 0.9, 0.95, 0.999):
        probs, order = logits.softmax(-1).sort(-1, descending=True)
        before = probs.cumsum(-1) - probs  # [B, V] the mass sorted before each token
        expected = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, before < top_p)
        kept = common.top_p_filter(logits, top_p).isfinite()  # 5,000 tokens: the sort
        assert torch.equal(kept, expected), top_p
        monkeypatch.setattr(common, "SORTED_NUCLEUS_VOCAB", 100)  # the bisection
        kept = common.top_p_filter(logits, top_p).isfinite()
        monkeypatch.undo()
        assert (kept != expected).sum().item() <= 2, top_p  # float summation order may move the boundary token
