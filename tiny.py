"""
tiny.py: the CPU stand-in for Qwen2.5-VL, so that every test and quickstart runs on a laptop.

A Qwen2.5-VL of the real architecture (2 text layers, 2 vision blocks, a 600-token BPE vocabulary trained here) is
"pretrained" for a minute on the toy set with the methods' own prompts (dive_k, speciarl, fine_r1), answering in the
papers' <think> / <answer> format. It is built once and cached under a hash of its recipe and prompts;
common.load_model("tiny") returns it. Nothing in the methods depends on it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time

import torch

import common
import data
import dive_k
import fine_r1
import speciarl


# =====================================================================================================================
# The tiny stand-in model
# =====================================================================================================================

TINY_RECIPE = dict(  # everything that defines the cached tiny model; its hash names the cache folder
    version=3, vocab=600, hidden=128, layers=2, heads=4, kv_heads=2, intermediate=256,
    vision=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, fullatt_block_indexes=[1]),
    steps=200, batch=32, lr=1e-3, seed=0,
)
TINY_THINK = ["let me look at the colour, the pattern and the shape.", "i check the colour first, then the shape.",
              "the picture shows one object on a plain background."]
TINY_PROMPTS = [speciarl.PROMPT, speciarl.SPECIFIC_PROMPT, dive_k.MINE_PROMPT, dive_k.MCQ_PROMPT, fine_r1.CLOSED_PROMPT,
                fine_r1.QUESTION, *fine_r1.QUESTIONS, fine_r1.RL_SUFFIX, fine_r1.OPEN_PROMPT,
                str(dive_k.ANSWER_FORMATS), "speciarl answers v3"]


def tiny_model_dir() -> str:
    """The cached stand-in; its folder is named by a hash of the recipe and of the prompts it is pretrained on, so a
    change to either builds a new one."""
    key = hashlib.sha1(json.dumps([TINY_RECIPE, TINY_PROMPTS], sort_keys=True).encode()).hexdigest()[:10]
    path = os.path.join(common.CACHE_DIR, f"tiny-{key}")
    if not os.path.exists(os.path.join(path, "config.json")):
        build_tiny(path)
    return path


def tiny_example(ex: data.Example, ds: data.Dataset, rng: random.Random) -> tuple[str, str]:
    """(prompt, target) for one pretraining example of the stand-in: the methods' own prompts
    (each in its method file), each answered the way a real checkpoint would, except for the letter.

    Multiple choice (DiVE-k's lettered options, Fine-R1's option list): the stand-in names the class in its rationale
    and answers with that option's text, not its letter. A two-layer model did not learn the letter lookup (find the
    option line that matches, emit the letter before it) within the build budget: letter accuracy stayed at chance
    after 400 steps with 2 and with 4 layers. Open questions: SpeciaRL's prompts are answered sometimes less
    specifically (family), generically or with 'None', so that SpeciaRL has specificity to gain; DiVE-k's list prompt
    and Fine-R1's questions with the class name. The 'be specific' prompt is answered specifically more often."""
    think = rng.choice(TINY_THINK)
    names = ds.class_names
    u = rng.random()
    if u < 0.4:  # multiple choice: DiVE-k's 2-5 lettered options or Fine-R1's list of 4, the truth among them
        k = rng.randint(2, 5) if u < 0.25 else 4
        opts = rng.sample([n for n in names if n != ex.class_name], k - 1) + [ex.class_name]
        rng.shuffle(opts)
        prompt = dive_k.mcq_prompt(ds.kind, opts) if u < 0.25 else fine_r1.closed_prompt(ds.kind, opts)
        think, answer = f"it looks like a {ex.class_name}.", ex.class_name
    elif u < 0.55:  # DiVE-k's mining / two-step step 1: the class list in the prompt
        listed = rng.sample(names, len(names))
        prompt, answer = dive_k.mine_prompt(ds.kind, ds.name, listed), ex.class_name
    elif u < 0.85:  # SpeciaRL: general or 'be specific' (answered more specifically)
        specific = rng.random() < 0.5
        prompt = speciarl.SPECIFIC_PROMPT if specific else speciarl.PROMPT
        v = rng.random()
        family, generic = ds.hierarchy[ex.class_name]
        cuts = (0.85, 0.95, 0.98) if specific else (0.45, 0.78, 0.92)
        answer = ex.class_name if v < cuts[0] else family if v < cuts[1] else generic if v < cuts[2] else "None"
    else:  # Fine-R1: a question with its RL format request, or its open-world evaluation prompt
        question = rng.choice(fine_r1.QUESTIONS).format(kind=ds.kind)
        prompt = question + fine_r1.RL_SUFFIX if rng.random() < 0.5 else fine_r1.open_prompt(ds.kind)
        answer = ex.class_name
    return prompt, f"<think>{think}</think>\n<answer>{answer}</answer>"


def build_tiny(path: str):
    """Build and 'pretrain' the tiny stand-in, then save it as a standard HF directory at `path`.

    Deterministic (fixed seeds, one thread), about a minute on an idle 2-core CPU. The pretraining is deliberately
    short: the model learns the answer format fully but recognises the toy classes only partly (colour and pattern
    before shape), which leaves room for RL. Measured on the toy test split (360 images) for recipe version 3
    (eval.py, greedy): Fine-R1's open question 0.544, SpeciaRL's prompt 0.578, format 1.00; recipe version 2 had
    greedy open accuracy 0.56 and multiple-choice 0.62."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same model on every machine (and no spinning threads on a busy one)
    try:
        _build_tiny(path)
    finally:
        torch.set_num_threads(threads)


def _build_tiny(path: str):
    from transformers import Qwen2_5_VLForConditionalGeneration
    r = TINY_RECIPE
    t0 = time.time()
    common.print0(f"building the tiny stand-in model at {path} (once; cached) ...")
    train = data.load_toy("train")
    rng = random.Random(r["seed"])
    corpus = [tiny_example(ex, train, rng)[0] + tiny_example(ex, train, rng)[1] for ex in train.examples[:200]]
    corpus += [" ".join(train.class_names), "<think> </think> <answer> </answer> None shape"] * 20
    tok, special = common.train_tokenizer(corpus, r["vocab"])
    cfg = common.qwen_vl_config(hidden_size=r["hidden"], intermediate_size=r["intermediate"],
                                num_hidden_layers=r["layers"], num_attention_heads=r["heads"],
                                num_key_value_heads=r["kv_heads"], vocab_size=len(tok), tie=False, special_ids=special,
                                vision=r["vision"], rope_theta=1e4, max_positions=4096)
    torch.manual_seed(r["seed"])
    model = Qwen2_5_VLForConditionalGeneration(cfg)
    pixels = data.TOY_IMAGE_SIZE ** 2
    proc = common.processor_class()(image_processor=common.make_image_processor(pixels, pixels), tokenizer=tok,
                                    chat_template=common.CHAT_TEMPLATE)
    # supervised "pretraining": cross-entropy on the assistant tokens (target + <|im_end|>) only
    images = {ex.image: common.open_image(ex.image) for ex in train.examples}
    opt = torch.optim.AdamW(model.parameters(), lr=r["lr"], betas=(0.9, 0.98), weight_decay=0.0)
    im_end = special["<|im_end|>"]
    g = torch.Generator().manual_seed(r["seed"])
    for step in range(r["steps"]):
        idx = torch.randint(len(train.examples), (r["batch"],), generator=g).tolist()
        rows = []
        for i in idx:
            ex = train.examples[i]
            prompt, target = tiny_example(ex, train, rng)
            p = common.encode_prompt(proc, images[ex.image], prompt)
            tgt = torch.tensor(tok(target)["input_ids"] + [im_end])
            rows.append((p, tgt))
        loss = common.sft_loss(model, proc, [p for p, _ in rows], [t for _, t in rows])
        lr = r["lr"] * min(1.0, (step + 1) / 20)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == r["steps"] - 1:
            common.print0(f"  tiny pretraining step {step:4d}  loss {loss.item():.3f}  ({time.time() - t0:.0f}s)")
    tmp = f"{path}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    proc.save_pretrained(tmp)
    with open(os.path.join(tmp, "tiny_recipe.json"), "w") as f:
        json.dump(TINY_RECIPE, f, indent=1)
    try:
        os.replace(tmp, path)
    except OSError:  # another process finished first; use theirs
        shutil.rmtree(tmp, ignore_errors=True)
    common.print0(f"tiny stand-in ready in {time.time() - t0:.0f}s")
