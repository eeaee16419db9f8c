"""
tiny.py: the CPU stand-in for Qwen2.5-VL, so that every test and quickstart runs on a laptop.

A Qwen2.5-VL of the real architecture (2 text layers, 2 vision blocks, a 600-token BPE vocabulary trained here),
"pretrained" briefly on the toy set with the methods' own prompts in the papers' <think> / <answer> format.
`python tiny.py` builds it (deterministic: fixed seeds, one thread), caches it under a hash of its recipe and prompts
and names it in common.tiny_pointer() for common.load_model("tiny"), which runs this file when nothing is built.

The pretraining is deliberately short: the format is learnt fully, the toy classes partly (colour and pattern before
shape), which leaves room for RL. Recipe 3, toy test split (360 images, eval.py, greedy): Fine-R1's open question
0.544, SpeciaRL's prompt 0.578, format 1.00. Multiple choice is answered with the option's text: a two-layer model
did not learn the letter lookup (letter accuracy at chance after 400 steps, with 2 and with 4 layers).
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

TINY_RECIPE = dict(  # everything that defines the cached tiny model; its hash names the cache folder
    version=3, vocab=600, hidden=128, layers=2, heads=4, kv_heads=2, intermediate=256,
    vision=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, fullatt_block_indexes=[1]),
    steps=200, batch=32, lr=1e-3, seed=0)
TINY_THINK = ["let me look at the colour, the pattern and the shape.", "i check the colour first, then the shape.",
              "the picture shows one object on a plain background."]
TINY_PROMPTS = [speciarl.PROMPT, speciarl.SPECIFIC_PROMPT, dive_k.MINE_PROMPT, dive_k.MCQ_PROMPT, fine_r1.CLOSED_PROMPT,
                fine_r1.QUESTION, *fine_r1.QUESTIONS, fine_r1.RL_SUFFIX, fine_r1.OPEN_PROMPT,
                str(dive_k.ANSWER_FORMATS), "speciarl answers v3"]

def tiny_model_dir() -> str:
    """The stand-in's folder, built when missing (a change to the recipe or the prompts builds a new one)."""
    folder = "tiny-" + hashlib.sha1(json.dumps([TINY_RECIPE, TINY_PROMPTS], sort_keys=True).encode()).hexdigest()[:10]
    path = os.path.join(common.CACHE_DIR, folder)
    if not os.path.exists(os.path.join(path, "config.json")):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # one thread: the same model on every machine (and no spinning threads on a busy one)
        try:
            build_tiny(path)
        finally:
            torch.set_num_threads(threads)
    pointer = common.tiny_pointer()
    with open(f"{pointer}.tmp{os.getpid()}", "w") as f:
        f.write(folder + "\n")
    os.replace(f"{pointer}.tmp{os.getpid()}", pointer)
    return path

def tiny_example(ex: data.Example, ds: data.Dataset, rng: random.Random) -> tuple[str, str]:
    """(prompt, target) of one pretraining example: one of the methods' prompts, answered as a real checkpoint would
    (multiple choice with the option's text). SpeciaRL's prompts are answered sometimes less specifically (family),
    generically or 'None', so it has specificity to gain; its 'be specific' prompt more often specifically."""
    think, answer = rng.choice(TINY_THINK), ex.class_name
    u = rng.random()
    if u < 0.4:  # multiple choice: DiVE-k's 2-5 lettered options or Fine-R1's list of 4, the truth among them
        k = rng.randint(2, 5) if u < 0.25 else 4
        opts = rng.sample([n for n in ds.class_names if n != ex.class_name], k - 1) + [ex.class_name]
        rng.shuffle(opts)
        prompt = dive_k.mcq_prompt(ds.kind, opts) if u < 0.25 else fine_r1.closed_prompt(ds.kind, opts)
        think = f"it looks like a {ex.class_name}."
    elif u < 0.55:  # DiVE-k's mining / two-step step 1: the class list in the prompt
        prompt = dive_k.mine_prompt(ds.kind, ds.name, rng.sample(ds.class_names, len(ds.class_names)))
    elif u < 0.85:  # SpeciaRL: general or 'be specific' (answered more specifically)
        specific = rng.random() < 0.5
        prompt = speciarl.SPECIFIC_PROMPT if specific else speciarl.PROMPT
        family, generic = ds.hierarchy[ex.class_name]
        v = rng.random()
        cuts = (0.85, 0.95, 0.98) if specific else (0.45, 0.78, 0.92)
        answer = ex.class_name if v < cuts[0] else family if v < cuts[1] else generic if v < cuts[2] else "None"
    else:  # Fine-R1: a question with its RL format request, or its open-world evaluation prompt
        question = rng.choice(fine_r1.QUESTIONS).format(kind=ds.kind)
        prompt = question + fine_r1.RL_SUFFIX if rng.random() < 0.5 else fine_r1.open_prompt(ds.kind)
    return prompt, f"<think>{think}</think>\n<answer>{answer}</answer>"

def build_tiny(path: str):
    """Build and 'pretrain' the stand-in, then save it as a standard Hugging Face directory at `path`."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    recipe, t0 = TINY_RECIPE, time.time()
    common.print0(f"building the tiny stand-in model at {path} (once; cached) ...")
    train = data.load_toy("train")
    rng = random.Random(recipe["seed"])
    corpus = [tiny_example(ex, train, rng)[0] + tiny_example(ex, train, rng)[1] for ex in train.examples[:200]]
    corpus += [" ".join(train.class_names), "<think> </think> <answer> </answer> None shape"] * 20
    tokenizer, special = common.train_tokenizer(corpus, recipe["vocab"])
    config = common.qwen_vl_config(
        hidden_size=recipe["hidden"], intermediate_size=recipe["intermediate"], num_hidden_layers=recipe["layers"],
        num_attention_heads=recipe["heads"], num_key_value_heads=recipe["kv_heads"], vocab_size=len(tokenizer),
        tie=False, special_ids=special, vision=recipe["vision"], rope_theta=1e4, max_positions=4096)
    torch.manual_seed(recipe["seed"])
    model = Qwen2_5_VLForConditionalGeneration(config)
    pixels = data.TOY_IMAGE_SIZE ** 2
    processor = common.processor_class()(image_processor=common.make_image_processor(pixels, pixels),
                                         tokenizer=tokenizer, chat_template=common.CHAT_TEMPLATE)
    # supervised "pretraining": cross-entropy on the assistant tokens (target + <|im_end|>) only
    images = {ex.image: common.open_image(ex.image) for ex in train.examples}
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], betas=(0.9, 0.98), weight_decay=0.0)
    draws = torch.Generator().manual_seed(recipe["seed"])
    for step in range(recipe["steps"]):
        drawn = [train.examples[i] for i in torch.randint(len(train.examples), (recipe["batch"],), generator=draws)]
        pairs = [tiny_example(ex, train, rng) for ex in drawn]
        prompts = [common.encode_prompt(processor, images[ex.image], prompt) for ex, (prompt, _) in zip(drawn, pairs)]
        targets = [torch.tensor(tokenizer(target)["input_ids"] + [special["<|im_end|>"]]) for _, target in pairs]
        loss = common.sft_loss(model, processor, prompts, targets)
        optimizer.param_groups[0]["lr"] = recipe["lr"] * min(1.0, (step + 1) / 20)  # one group: every parameter
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0 or step == recipe["steps"] - 1:
            common.print0(f"  tiny pretraining step {step:4d}  loss {loss.item():.3f}  ({time.time() - t0:.0f}s)")
    tmp = f"{path}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed build whose pid this process now has
    model.save_pretrained(tmp, safe_serialization=True)
    processor.save_pretrained(tmp)
    with open(os.path.join(tmp, "tiny_recipe.json"), "w") as f:
        json.dump(TINY_RECIPE, f, indent=1)
    try:
        os.replace(tmp, path)
    except OSError:  # another process finished first; use theirs
        shutil.rmtree(tmp, ignore_errors=True)
    common.print0(f"tiny stand-in ready in {time.time() - t0:.0f}s")

if __name__ == "__main__":
    print(f"tiny stand-in: {tiny_model_dir()}")
